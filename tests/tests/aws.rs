//! AWS through the proxy, end to end, against moto (IAM, STS and S3 with request
//! authentication on): the sandbox runs the real AWS CLI with dummy keys; the daemon
//! assumes a role with its own IAM key (one STS session per sandbox, named after it, with
//! an inline session policy), strips the sandbox's signature and re-signs each request it
//! forwards. Proved here:
//! - moto refuses a wrong signature and an unsigned request (the negative controls), and
//!   accepts the daemon's: so a request moto served was signed by the proxy;
//! - GET and PUT inside the policy's prefix work, virtual-hosted and path style, the
//!   upload's content checked on the server;
//! - PUT and GET outside the prefix are refused (CLI error, audit deny record, nothing
//!   reached the server, the object does not exist);
//! - a multipart upload (the CLI's large files) is signed;
//! - a presigned URL, a signed aws-chunked upload, a header that changes what S3 does
//!   (`--acl`) and a sub-resource (`?acl`) are refused the same way;
//! - an STS failure refuses the request with the reason in the audit record, and the next
//!   request after the fault is fixed succeeds;
//! - a sandbox detached and attached again under the same name gets a new session;
//! - neither the daemon's IAM secret nor any session secret or token is in the sandbox's
//!   view (environment, files, CLI output), the audit log or the daemon's log.
//!
//! Needs root, the proxy tools, and moto/awscli/boto3 in /opt/egressd-venv
//! (`scripts/setup.sh`). Run: `cargo test -p egress-tests --test aws -- --test-threads=2`.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use egress_tests::audit::{get_str, Match};
use egress_tests::expect::all_output;
use egress_tests::moto::{
    self, Moto, AWS_V4, BUCKET_HOST, PATH_STYLE_V4, ROLE_ARN, S3_HOST, STS_HOST,
};
use egress_tests::proxy_fixture::{ProxyFixture, ProxyOpts};
use egress_tests::sandbox::Sandbox;
use egress_tests::util::TempDir;
use egress_tests::{require_proxy_tools, skip_if};
use serde_json::Value;

const POLICY: &str = r#"version: 1
default: deny
rules:
  - name: s3-acme-data
    to: [192.0.2.30]
    ports: [443]
    action: proxy
    hosts: [acme-data.s3.amazonaws.com]
    credential: aws-s3
    http:
      - methods: [GET, HEAD]
        paths: ["/agent/**"]
      - methods: [PUT, POST]
        paths: ["/agent/out/**"]
  - name: s3-path-style
    to: [192.0.2.31]
    ports: [443]
    action: proxy
    hosts: [s3.amazonaws.com]
    credential: aws-s3
    http:
      - methods: [GET, HEAD]
        paths: ["/acme-data/agent/**"]
      - methods: [PUT]
        paths: ["/acme-data/agent/out/**"]
"#;

const SESSION_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:GetObject","s3:PutObject"],"Resource":"arn:aws:s3:::acme-data/agent/*"}]}"#;

/// What the sandbox's CLI is given: dummy keys.
const DUMMY_KEY: &str = "AKIASANDBOXDUMMY0000";
const DUMMY_SECRET: &str = "sandbox-dummy-secret-0000000000000000000";

fn credential_yaml(key_file: &std::path::Path) -> String {
    format!(
        r#"  aws-s3:
    source:
      sts_assume_role:
        role_arn: "{ROLE_ARN}"
        endpoint: "https://{AWS_V4}"
        credentials_file: "{}"
        session_policy: '{SESSION_POLICY}'
        tags: {{ sandbox: "{{sandbox}}" }}
    inject: {{ aws_sigv4: {{ service: s3, region: us-east-1 }} }}
    hosts: [{BUCKET_HOST}, {S3_HOST}]
"#,
        key_file.display()
    )
}

struct Aws {
    fx: ProxyFixture,
    moto: Moto,
    _keys: TempDir,
    key_file: PathBuf,
}

impl Aws {
    fn write_key(&self, secret: &str) -> Result<()> {
        std::fs::write(
            &self.key_file,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
                self.moto.key_id
            ),
        )?;
        Ok(())
    }

    /// `aws <args>` in `sandbox` with dummy keys, trusting the proxy's CA; `path_style`
    /// selects path-style addressing.
    fn cli(&self, sandbox: &Sandbox, path_style: bool, args: &[&str]) -> Result<Output> {
        let config = self.fx.sandbox_dir().join(if path_style {
            "aws-config-path"
        } else {
            "aws-config"
        });
        std::fs::write(
            &config,
            format!(
                "[default]\nregion = us-east-1\nretry_mode = standard\nmax_attempts = 1\n\
                 s3 =\n    multipart_threshold = 5MB\n    multipart_chunksize = 5MB\n{}",
                if path_style {
                    "    addressing_style = path\n"
                } else {
                    ""
                }
            ),
        )?;
        let ca = self.fx.proxy_ca().display().to_string();
        let config = config.display().to_string();
        let mut all = vec!["--cli-connect-timeout", "5", "--cli-read-timeout", "10"];
        if path_style {
            all.extend(["--endpoint-url", "https://s3.amazonaws.com"]);
        }
        all.extend_from_slice(args);
        let aws = moto::aws_cli().display().to_string();
        self.fx.client_in(
            sandbox,
            60,
            &aws,
            &all,
            &[
                ("AWS_ACCESS_KEY_ID", DUMMY_KEY),
                ("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET),
                ("AWS_CA_BUNDLE", &ca),
                ("AWS_CONFIG_FILE", &config),
                ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ],
        )
    }

    fn ok(&self, what: &str, out: &Output) -> Result<()> {
        ensure!(
            out.status.success(),
            "{what} should succeed: {}\nrecent records:\n{}\n{}",
            all_output(out),
            self.recent_records(),
            self.moto.logs()
        );
        Ok(())
    }

    fn recent_records(&self) -> String {
        let records = self.fx.proxy_records().unwrap_or_default();
        records
            .iter()
            .rev()
            .take(8)
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last request record for `path`.
    fn record_for(&self, path: &str) -> Result<Value> {
        self.fx
            .wait_proxy_record(Duration::from_secs(5), &format!("for {path}"), |r| {
                r["url"]["path"] == path && r["event"]["action"] == "http-request"
            })?;
        self.fx
            .proxy_records()?
            .into_iter()
            .rev()
            .find(|r| r["url"]["path"] == path)
            .context("record vanished")
    }
}

/// The AWS names in a sandbox's hosts file.
fn hosts_lines() -> String {
    format!("{AWS_V4} {BUCKET_HOST} {STS_HOST}\n{PATH_STYLE_V4} {S3_HOST}\n")
}

fn start() -> Result<Aws> {
    let keys = TempDir::new("aws-daemon-key")?;
    let key_file = keys.path().join("credentials");
    let fx = ProxyFixture::new(ProxyOpts {
        policy: POLICY.to_owned(),
        extra_credentials: credential_yaml(&key_file),
        ..ProxyOpts::default()
    })?;
    let moto = Moto::start(&fx.world, &fx.ca)?;
    // The sandbox finds the AWS names in its hosts file.
    let line = hosts_lines();
    let mut hosts = std::fs::read_to_string(fx.hosts.path())?;
    hosts.push_str(&line);
    std::fs::write(fx.hosts.path(), hosts)?;
    let aws = Aws {
        fx,
        moto,
        _keys: keys,
        key_file,
    };
    aws.write_key(&aws.moto.secret.clone())?;
    Ok(aws)
}

#[test]
fn aws_cli_is_re_signed_within_its_prefix_and_refused_outside() -> Result<()> {
    require_proxy_tools!();
    skip_if!(moto::missing());
    let t = start()?;
    let sb = &t.fx.sandbox;

    // Negative controls: moto checks signatures.
    let controls = t.moto.controls(&t.fx.world)?;
    ensure!(
        controls["wrong_secret"] == "SignatureDoesNotMatch"
            && controls["unsigned"].as_u64().is_some_and(|c| c == 403)
            && controls["right_secret"] == "accepted",
        "moto must refuse a wrong signature and an unsigned request: {controls}"
    );

    // GET inside the prefix, virtual-hosted style.
    let get = t.cli(
        sb,
        false,
        &["s3", "cp", "s3://acme-data/agent/in/data.txt", "-"],
    )?;
    t.ok("GET agent/in/data.txt", &get)?;
    ensure!(
        String::from_utf8_lossy(&get.stdout) == "input for the agent\n",
        "downloaded: {}",
        all_output(&get)
    );
    // A byte range: asked of moto widened (room for a whole secret around it), signed
    // as sent, and cut by the proxy to the bytes the client asked for.
    let part = t.fx.sandbox_dir().join("part.txt");
    let part_s = part.display().to_string();
    let ranged = t.cli(
        sb,
        false,
        &[
            "s3api",
            "get-object",
            "--bucket",
            "acme-data",
            "--key",
            "agent/in/data.txt",
            "--range",
            "bytes=6-8",
            &part_s,
        ],
    )?;
    t.ok("ranged GET agent/in/data.txt", &ranged)?;
    ensure!(
        std::fs::read_to_string(&part)? == "for"
            && String::from_utf8_lossy(&ranged.stdout).contains("bytes 6-8/20"),
        "ranged GET: {:?}, {}",
        std::fs::read_to_string(&part),
        all_output(&ranged)
    );
    let record = t.record_for("/agent/in/data.txt")?;
    let credential = &record["egress"]["credential"];
    ensure!(
        credential["name"] == "aws-s3"
            && credential["kind"] == "aws_sigv4"
            && credential["source"] == "sts_assume_role"
            && credential["expires"]
                .as_str()
                .is_some_and(|e| e.ends_with('Z')),
        "the record names the credential, its kind and expiry: {record}"
    );

    // PUT inside the prefix (the CLI's upload: aws-chunked with a checksum trailer),
    // virtual-hosted style; then path style with s3api.
    let upload = t.fx.sandbox_dir().join("report.txt");
    std::fs::write(&upload, "report from the agent\n")?;
    let upload_s = upload.display().to_string();
    let put = t.cli(
        sb,
        false,
        &["s3", "cp", &upload_s, "s3://acme-data/agent/out/report.txt"],
    )?;
    t.ok("PUT agent/out/report.txt", &put)?;
    ensure!(
        t.moto
            .object(&t.fx.world, "agent/out/report.txt")?
            .as_deref()
            == Some("report from the agent\n"),
        "moto should hold the uploaded report"
    );
    let put = t.cli(
        sb,
        true,
        &[
            "s3api",
            "put-object",
            "--bucket",
            "acme-data",
            "--key",
            "agent/out/path-style.txt",
            "--body",
            &upload_s,
        ],
    )?;
    t.ok("path-style PUT", &put)?;
    ensure!(
        t.moto
            .object(&t.fx.world, "agent/out/path-style.txt")?
            .as_deref()
            == Some("report from the agent\n"),
        "moto should hold the path-style upload"
    );
    let get = t.cli(
        sb,
        true,
        &[
            "s3api",
            "get-object",
            "--bucket",
            "acme-data",
            "--key",
            "agent/in/data.txt",
            "/dev/stdout",
        ],
    )?;
    t.ok("path-style GET", &get)?;
    ensure!(
        String::from_utf8_lossy(&get.stdout).contains("input for the agent"),
        "path-style download: {}",
        all_output(&get)
    );

    // Outside the prefix: refused, recorded, nothing reached moto.
    let refused: [(&str, bool, Vec<&str>); 3] = [
        (
            "/private/evil.txt",
            false,
            vec!["s3", "cp", &upload_s, "s3://acme-data/private/evil.txt"],
        ),
        (
            "/acme-data/agent/in/overwrite.txt",
            true,
            vec![
                "s3api",
                "put-object",
                "--bucket",
                "acme-data",
                "--key",
                "agent/in/overwrite.txt",
                "--body",
                &upload_s,
            ],
        ),
        (
            "/private/secret.txt",
            false,
            vec!["s3", "cp", "s3://acme-data/private/secret.txt", "-"],
        ),
    ];
    for (path, path_style, args) in &refused {
        let out = t.cli(sb, *path_style, args)?;
        ensure!(
            !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("not for"),
            "{path} must be refused: {}",
            all_output(&out)
        );
        let record = t.record_for(path)?;
        ensure!(
            record["egress"]["verdict"] == "deny",
            "{path}: deny record expected: {record}"
        );
        ensure!(
            !t.moto.access_log().contains(path),
            "{path} reached moto:\n{}",
            t.moto.access_log()
        );
    }
    for key in ["private/evil.txt", "agent/in/overwrite.txt"] {
        ensure!(
            t.moto.object(&t.fx.world, key)?.is_none(),
            "{key} must not exist on the server"
        );
    }

    // A presigned URL (made by the CLI from the dummy keys) is refused.
    let presign = t.cli(
        sb,
        false,
        &["s3", "presign", "s3://acme-data/agent/in/data.txt"],
    )?;
    t.ok("aws s3 presign", &presign)?;
    let url = String::from_utf8_lossy(&presign.stdout).trim().to_owned();
    ensure!(
        url.contains("X-Amz-Signature") || url.contains("Signature="),
        "{url}"
    );
    let before = t.moto.access_log().lines().count();
    let curl =
        t.fx.curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])?;
    ensure!(
        String::from_utf8_lossy(&curl.stdout) == "403",
        "presigned GET must be refused: {}",
        all_output(&curl)
    );
    // The same path's earlier (allowed) record is there already: wait for this one, which
    // may be written a moment after curl has the answer.
    let record =
        t.fx.wait_proxy_record(Duration::from_secs(5), "the presigned GET's refusal", |r| {
            r["url"]["path"] == "/agent/in/data.txt"
                && r["event"]["action"] == "http-request"
                && r["egress"]["verdict"] == "deny"
        })?;
    ensure!(
        record["egress"]["verdict"] == "deny"
            && record["event"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("presigned")),
        "presigned refusal record: {record}"
    );
    ensure!(
        t.moto.access_log().lines().count() == before,
        "the presigned request reached moto"
    );

    // A signed aws-chunked upload (chunk signatures chained from the sandbox's key) is
    // refused, not forwarded.
    let before = t.moto.access_log().lines().count();
    let chunked = t.fx.curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "-H",
        "x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "-H",
        "x-amz-decoded-content-length: 5",
        "--data-binary",
        "5;chunk-signature=00\r\nhello\r\n0;chunk-signature=00\r\n\r\n",
        "https://acme-data.s3.amazonaws.com/agent/out/chunked.txt",
    ])?;
    ensure!(
        String::from_utf8_lossy(&chunked.stdout) == "400",
        "a signed-chunk upload must be refused: {}",
        all_output(&chunked)
    );
    let record = t.record_for("/agent/out/chunked.txt")?;
    ensure!(
        record["egress"]["verdict"] == "deny"
            && record["event"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("aws-chunked")),
        "signed-chunk refusal record: {record}"
    );
    ensure!(
        t.moto.access_log().lines().count() == before
            && t.moto
                .object(&t.fx.world, "agent/out/chunked.txt")?
                .is_none(),
        "the signed-chunk upload reached moto"
    );

    // A header that changes what S3 does (an ACL) and a sub-resource (`?acl`) on an
    // allowed PUT are refused, named in the record, and never reach moto.
    let before = t.moto.access_log().lines().count();
    let acl = t.cli(
        sb,
        false,
        &[
            "s3",
            "cp",
            "--acl",
            "public-read",
            &upload_s,
            "s3://acme-data/agent/out/acl.txt",
        ],
    )?;
    ensure!(
        !acl.status.success(),
        "a PUT with x-amz-acl must fail: {}",
        all_output(&acl)
    );
    let record = t.record_for("/agent/out/acl.txt")?;
    ensure!(
        record["egress"]["verdict"] == "deny"
            && record["event"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("x-amz-acl")),
        "x-amz-acl refusal record: {record}"
    );
    let put_acl = t.cli(
        sb,
        false,
        &[
            "s3api",
            "put-object-acl",
            "--bucket",
            "acme-data",
            "--key",
            "agent/out/report.txt",
            "--acl",
            "public-read",
        ],
    )?;
    ensure!(
        !put_acl.status.success(),
        "PUT ?acl must fail: {}",
        all_output(&put_acl)
    );
    let record = t.record_for("/agent/out/report.txt")?;
    ensure!(
        record["egress"]["verdict"] == "deny"
            && record["event"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("`acl`")),
        "?acl refusal record: {record}"
    );
    ensure!(
        t.moto.access_log().lines().count() == before
            && t.moto.object(&t.fx.world, "agent/out/acl.txt")?.is_none(),
        "a refused ACL request reached moto:\n{}",
        t.moto.access_log()
    );

    // The session is named after the sandbox and carries the session policy.
    let sessions = t.moto.sessions(&t.fx.world)?;
    let label = sb.label();
    let ours: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["session_name"] == label)
        .collect();
    ensure!(
        !ours.is_empty(),
        "no STS session named {label}: {sessions:?}"
    );
    let policy: Value = serde_json::from_str(ours[0]["policy"].as_str().unwrap_or("null"))?;
    ensure!(
        policy == serde_json::from_str::<Value>(SESSION_POLICY)?,
        "session policy as sent: {policy}"
    );

    // STS failure: a second sandbox needs its own session while the daemon's key is
    // wrong: refused with the reason recorded; fixed, the next request works.
    t.write_key("wrong-secret-0000000000000000000000000")?;
    let other = t.fx.add_sandbox("aws2", POLICY)?;
    let mut hosts = std::fs::read_to_string(other.hosts.path())?;
    hosts.push_str(&hosts_lines());
    std::fs::write(other.hosts.path(), hosts)?;
    let failed = t.cli(
        &other.sandbox,
        false,
        &[
            "s3api",
            "head-object",
            "--bucket",
            "acme-data",
            "--key",
            "agent/in/data.txt",
        ],
    )?;
    ensure!(
        !failed.status.success(),
        "a request without a session must fail: {}",
        all_output(&failed)
    );
    let records = t.fx.proxy_records()?;
    let refusal = records
        .iter()
        .rev()
        .find(|r| r["egress"]["sandbox"]["name"] == "aws2")
        .context("no record for the second sandbox")?;
    let reason = refusal["event"]["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("STS AssumeRole") && reason.contains(ROLE_ARN),
        "the record should say STS failed: {refusal}"
    );
    t.write_key(&t.moto.secret.clone())?;
    std::thread::sleep(Duration::from_millis(1200));
    let recovered = t.cli(
        &other.sandbox,
        false,
        &["s3", "cp", "s3://acme-data/agent/in/data.txt", "-"],
    )?;
    t.ok("after the key is fixed", &recovered)?;

    // A sandbox's session goes with it: one attached later under the same name (a
    // container re-created under its id) assumes the role anew, never inherits it.
    let minted = |t: &Aws| -> Result<usize> {
        Ok(t.moto
            .sessions(&t.fx.world)?
            .iter()
            .filter(|s| s["session_name"] == "aws2")
            .count())
    };
    let before = minted(&t)?;
    t.fx.daemon.detach("aws2")?;
    t.fx.attach(&other.sandbox, "aws2", POLICY)?;
    let again = t.cli(
        &other.sandbox,
        false,
        &["s3", "cp", "s3://acme-data/agent/in/data.txt", "-"],
    )?;
    t.ok("after the sandbox was attached again", &again)?;
    ensure!(
        before == 1 && minted(&t)? == 2,
        "the re-attached sandbox was not given a new session ({before} before)"
    );
    // Quarantine drops the sandbox's session (its traffic may have leaked it): recorded,
    // and after the release the sandbox signs with a new one.
    t.fx.daemon
        .ctl_ok(["quarantine", "aws2", "--reason", "test: a leaked session"])?;
    let revoked = t.fx.daemon.wait_for_match(
        Duration::from_secs(10),
        &Match::lifecycle("credential-revoke").sandbox("aws2"),
    )?;
    ensure!(
        get_str(&revoked, "egress.credential.name") == Some("aws-s3")
            && get_str(&revoked, "event.outcome") == Some("failure")
            && get_str(&revoked, "event.reason").is_some_and(|r| {
                r.starts_with("not revoked") && r.contains("1 cached session of this sandbox")
            }),
        "the quarantine did not drop the sandbox's session: {revoked}"
    );
    t.fx.daemon.ctl_ok(["release", "aws2"])?;
    let released = t.cli(
        &other.sandbox,
        false,
        &["s3", "cp", "s3://acme-data/agent/in/data.txt", "-"],
    )?;
    t.ok("after the release", &released)?;
    ensure!(
        minted(&t)? == 3,
        "the released sandbox signed with its dropped session"
    );

    // No secret anywhere the sandbox or an auditor looks.
    let sessions = t.moto.sessions(&t.fx.world)?;
    let mut secrets: Vec<String> = vec![t.moto.secret.clone()];
    for s in &sessions {
        for k in ["secret_access_key", "session_token"] {
            if let Some(v) = s[k].as_str() {
                secrets.push(v.to_owned());
            }
        }
    }
    ensure!(
        secrets.len() >= 3,
        "no session values to look for: {sessions:?}"
    );
    let env = sb.run("env", &[] as &[&str])?;
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("the sandbox's environment".into(), env.stdout),
        (
            "the audit log".into(),
            std::fs::read(t.fx.daemon.audit_log())?,
        ),
        (
            "the daemon's log".into(),
            std::fs::read(t.fx.daemon.log_path())?,
        ),
    ];
    for f in egress_tests::util::files_under(t.fx.sandbox_dir())? {
        places.push((f.display().to_string(), std::fs::read(&f)?));
    }
    for (i, out) in [&get, &put, &presign, &recovered, &failed]
        .iter()
        .enumerate()
    {
        places.push((format!("CLI output {i}"), all_output(out).into_bytes()));
    }
    for (what, bytes) in &places {
        let text = String::from_utf8_lossy(bytes);
        for s in &secrets {
            if text.contains(s.as_str()) {
                bail!("a secret ({} chars) leaked into {what}", s.len());
            }
        }
    }

    // A multipart upload (CreateMultipartUpload `?uploads`, UploadPart
    // `?partNumber&uploadId`, CompleteMultipartUpload `?uploadId`) is signed. Last: moto's
    // state dump (`Moto::sessions`) fails once it holds upload parts.
    let big = t.fx.sandbox_dir().join("big.txt");
    let big_body = "0123456789abcdef".repeat(6 * 65536);
    std::fs::write(&big, &big_body)?;
    let big_s = big.display().to_string();
    let put = t.cli(
        sb,
        false,
        &["s3", "cp", &big_s, "s3://acme-data/agent/out/big.txt"],
    )?;
    t.ok("multipart PUT agent/out/big.txt", &put)?;
    ensure!(
        t.moto.access_log().contains("uploadId=")
            && t.moto.object(&t.fx.world, "agent/out/big.txt")?.as_deref() == Some(&*big_body),
        "moto should hold the multipart upload:\n{}",
        t.moto.access_log()
    );
    Ok(())
}
