//! What the proxy forwards is what it judged, end to end with real git, curl and raw TLS
//! clients in a sandbox and a real `git http-backend` origin ([`GitFixture`]):
//!
//! - the origin also serves `acme/Widgets` and `acme/widgets.git` (stored as
//!   `acme/widgets.git.git`), which `git http-backend` treats as repositories of their
//!   own; path tricks that would reach them (or any other) through a rule for
//!   `acme/widgets` are refused, and a harmless encoding is forwarded in its normal form;
//! - push options are refused with git's own status report unless the rule lists them;
//! - requests the HTTP/1 parser refuses, and uploads the client gives up on, are recorded;
//! - nothing a request carried comes back with control characters in it.
//!
//! Each refusal is proved by the client's error, a deny record, and the origin (access
//! log, refs). Needs root and the proxy tools; skips without them. Run:
//! `cargo test -p egress-tests --test git_judged -- --test-threads=2`.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get_str, get_u64};
use egress_tests::expect::{all_output, RECORD_TIMEOUT};
use egress_tests::git_fixture::{GitFixture, GitOpts, GIT_POLICY, REPO};
use egress_tests::proxy_fixture::CLIENT_PATH;
use egress_tests::require_proxy_tools;
use egress_tests::util::{fixture, poll, python};
use serde_json::Value;

const ZERO: &str = "0000000000000000000000000000000000000000";
const ADVERTISEMENT: &str = "/info/refs?service=git-upload-pack";

/// `git <args>` on this machine, on the origin's files.
fn host_git(args: &[&str]) -> Result<Output> {
    let out = Command::new("git")
        .args(args)
        .env_clear()
        .env("PATH", CLIENT_PATH)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null())
        .output()
        .context("spawn git")?;
    ensure!(out.status.success(), "git {args:?}: {}", all_output(&out));
    Ok(out)
}

/// `curl --path-as-is -o <body file> -w %{http_code} https://github.com<path>` in the
/// sandbox: (status, body bytes).
fn curl_path(fx: &GitFixture, path: &str) -> Result<(String, Vec<u8>)> {
    let body = fx.sandbox_dir().join("curl-body");
    let _ = std::fs::remove_file(&body);
    let out = fx.curl(&[
        "--http1.1",
        "--path-as-is",
        "--globoff",
        "-o",
        &body.display().to_string(),
        "-w",
        "%{http_code}",
        &format!("https://github.com{path}"),
    ])?;
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((code, std::fs::read(&body).unwrap_or_default()))
}

/// `fixtures/raw_tls.py` in the sandbox: sends `bytes` to github.com:443 (the proxy) and
/// returns what came back.
fn raw_tls(fx: &GitFixture, bytes: &[u8], abort: bool) -> Result<Vec<u8>> {
    let script = fixture("raw_tls.py").display().to_string();
    let ca = fx.proxy_ca().display().to_string();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut args = vec![
        script.as_str(),
        "--host",
        "github.com",
        "--cafile",
        &ca,
        "--hex",
        &hex,
    ];
    if abort {
        args.push("--abort");
    }
    let out = fx.client(20, &python().display().to_string(), &args, &[])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("raw_tls.py printed no JSON: {}", all_output(&out)))?;
    let v: Value = serde_json::from_str(line)?;
    let hex = v["response_hex"].as_str().unwrap_or_default();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).context("hex"))
        .collect()
}

fn is_deny(r: &Value) -> bool {
    get_str(r, "egress.verdict") == Some("deny")
}

fn reason(r: &Value) -> &str {
    get_str(r, "event.reason").unwrap_or_default()
}

/// No byte of `bytes` is a control character other than the line structure of an HTTP
/// response (CR, LF) or git's pkt-line side-band byte 1.
fn ensure_no_echoed_controls(what: &str, bytes: &[u8], allowed: &[u8]) -> Result<()> {
    let bad: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| (*b < 0x20 || *b == 0x7f) && !allowed.contains(b))
        .collect();
    ensure!(
        bad.is_empty()
            && !String::from_utf8_lossy(bytes)
                .chars()
                .any(|c| ('\u{80}'..='\u{9f}').contains(&c)),
        "{what}: control characters echoed back {bad:?}: {:?}",
        String::from_utf8_lossy(bytes)
    );
    Ok(())
}

#[test]
fn only_the_judged_repository_is_forwarded() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    // Two repositories a looser judge would take for acme/widgets.
    let widgets = fx.origin.repo_path(REPO).display().to_string();
    for other in ["acme/Widgets", "acme/widgets.git"] {
        let path = fx.origin.repo_path(other).display().to_string();
        host_git(&["clone", "-q", "--bare", &widgets, &path])?;
    }
    // Straight to the origin, they are served: forwarded, these paths would reach them.
    let token = format!("x-access-token:{}", fx.static_token());
    for path in ["/acme/Widgets.git", "/acme/widgets.git.git"] {
        let out = fx.world_curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            &token,
            &format!("https://github.com{path}{ADVERTISEMENT}"),
        ])?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == "200",
            "the origin should serve {path}: {}",
            all_output(&out)
        );
    }

    let mark = fx.origin_settled()?;
    let records_before = fx.request_records()?.len();
    // git itself, on the other spellings: refused, with the spelling to use.
    let mut outs = Vec::new();
    for repo in ["acme/Widgets", "acme/widgets.git"] {
        let out = fx.git(&["ls-remote", &GitFixture::url(repo)])?;
        let text = all_output(&out);
        ensure!(
            !out.status.success() && text.contains("403") && text.contains("not allowed"),
            "git ls-remote {repo} should be refused: {text}"
        );
        outs.push(out);
    }
    let text = all_output(&outs[0]);
    ensure!(text.contains("did you mean acme/widgets?"), "{text}");
    // Path tricks: ambiguous forms get 400, other repositories or services 403.
    let cases = [
        (
            format!("/acme/widgets.git/../Widgets.git{ADVERTISEMENT}"),
            "400",
        ),
        (
            format!("/acme/widgets/%2e%2e/Widgets.git{ADVERTISEMENT}"),
            "400",
        ),
        (format!("//acme/widgets.git{ADVERTISEMENT}"), "400"),
        (
            format!("/acme/widgets.git%2F..%2FWidgets.git{ADVERTISEMENT}"),
            "400",
        ),
        (
            format!("/acme/%C0%AE%C0%AE/acme/Widgets.git{ADVERTISEMENT}"),
            "400",
        ),
        (format!("/acme/wid%1B]0;x%07gets.git{ADVERTISEMENT}"), "400"),
        (format!("/acme/Widgets.git{ADVERTISEMENT}"), "403"),
        (format!("/acme/widgets.git.git{ADVERTISEMENT}"), "403"),
        (format!("/acme/widgets/.git{ADVERTISEMENT}"), "403"),
        (
            "/acme/widgets.git/info/refs?service=git-upload-pack&service=git-receive-pack".into(),
            "403",
        ),
        (
            "/acme/widgets.git/info/refs?service=git%2Dreceive-pack".into(),
            "403",
        ),
    ];
    for (path, want) in &cases {
        let (code, body) = curl_path(&fx, path)?;
        ensure!(
            code == *want,
            "{path}: expected {want}, got {code}: {:?}",
            String::from_utf8_lossy(&body)
        );
        ensure_no_echoed_controls(path, &body, b"\n")?;
    }
    let n = cases.len() + 2;
    let records = poll(RECORD_TIMEOUT, Duration::from_millis(50), || {
        let records = fx.request_records()?;
        Ok((records.len() >= records_before + n).then_some(records))
    })?
    .context("not every refusal was recorded")?;
    let new = &records[records_before..];
    ensure!(
        new.len() == n && new.iter().all(is_deny),
        "every refusal should have a deny record: {new:#?}"
    );
    for r in new {
        let status = get_u64(r, "http.response.status_code");
        ensure!(
            matches!(status, Some(400 | 403)) && !reason(r).is_empty(),
            "deny record without status or reason: {r}"
        );
    }
    fx.origin_new_exactly(mark, 0)?;

    // Positive controls: an encoded unreserved character is forwarded decoded (the form
    // judged), and git works on the listed spelling.
    let (code, _) = curl_path(&fx, &format!("/%61cme/wid%67ets.git{ADVERTISEMENT}"))?;
    ensure!(code == "200", "encoded acme/widgets: {code}");
    let got = fx.origin_new_exactly(mark, 1)?;
    ensure!(
        got[0].uri == format!("/acme/widgets.git{ADVERTISEMENT}"),
        "the origin should get the judged form: {got:#?}"
    );
    let out = fx.git_ok(&["ls-remote", &GitFixture::url(REPO)])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("refs/heads/main"),
        "{}",
        all_output(&out)
    );
    let refs: Vec<&Output> = outs.iter().chain([&out]).collect();
    fx.assert_secrets_absent(&refs)
}

/// A receive-pack POST whose command list updates `ref_name` to `new`, asking for a
/// status report, with `extra` after the flush, sent with `Content-Length: length`
/// (the whole body when `None`).
fn receive_pack(ref_name: &str, new: &str, extra: &[u8], length: Option<usize>) -> Vec<u8> {
    let line = format!("{ZERO} {new} {ref_name}\0report-status");
    let mut body = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
    body.extend_from_slice(extra);
    let mut req = format!(
        "POST /acme/widgets.git/git-receive-pack HTTP/1.1\r\nHost: github.com\r\n\
         Content-Type: application/x-git-receive-pack-request\r\n\
         Accept: application/x-git-receive-pack-result\r\nContent-Length: {}\r\n\r\n",
        length.unwrap_or(body.len())
    )
    .into_bytes();
    req.extend_from_slice(&body);
    req
}

#[test]
fn push_options_parser_refusals_and_aborts_are_judged_and_recorded() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    let bare = fx.origin.repo_path(REPO).display().to_string();
    host_git(&[
        "-C",
        &bare,
        "config",
        "receive.advertisePushOptions",
        "true",
    ])?;
    fx.git_ok(&["clone", "-q", &GitFixture::url(REPO), "w"])?;
    fx.git_ok(&[
        "-C",
        "w",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "agent work",
    ])?;
    let head = fx.rev_parse("w", "HEAD")?;

    // A push option the rule does not list: git's own report, nothing lands.
    let before = fx.origin_refs(REPO)?;
    let out = fx.git(&[
        "-C",
        "w",
        "push",
        "-o",
        "ci.skip",
        "origin",
        "HEAD:refs/heads/agent/opt",
    ])?;
    let text = all_output(&out);
    ensure!(
        !out.status.success()
            && text.contains("! [remote rejected]")
            && text.contains("push option \"ci.skip\" is not allowed"),
        "git push -o ci.skip should be rejected with the reason: {text}"
    );
    ensure!(
        fx.origin_refs(REPO)? == before,
        "refs changed: {}",
        fx.origin_refs(REPO)?
    );
    let rec = fx.wait_request_record(RECORD_TIMEOUT, "refusing the push option", |r| {
        is_deny(r) && reason(r).contains("push option")
    })?;
    ensure!(get_str(&rec, "egress.git.repo") == Some(REPO), "{rec}");
    // Positive control: the same push without the option lands.
    fx.git_ok(&["-C", "w", "push", "origin", "HEAD:refs/heads/agent/plain"])?;
    ensure!(
        fx.origin_refs(REPO)?
            .contains(&format!("{head} refs/heads/agent/plain")),
        "the plain push should land"
    );

    // A ref name with control characters: refused, and escaped in the report.
    let report = raw_tls(
        &fx,
        &receive_pack(
            "refs/heads/agent/x\u{1b}]0;owned\u{7}\u{1b}[2J",
            &head,
            b"",
            None,
        ),
        false,
    )?;
    let text = String::from_utf8_lossy(&report).into_owned();
    ensure!(
        text.starts_with("HTTP/1.1 200") && text.contains("ng refs/heads/agent/x\\u{1b}]0;owned"),
        "the report should name the ref escaped: {text:?}"
    );
    ensure_no_echoed_controls("status report", &report, b"\r\n")?;
    fx.wait_request_record(RECORD_TIMEOUT, "refusing the control ref", |r| {
        is_deny(r) && reason(r).contains("invalid ref name")
    })?;

    // Requests hyper's HTTP/1 parser refuses before the proxy's handler.
    let mark = fx.origin_settled()?;
    let flood: String = (0..200).map(|i| format!("X-F{i}: v\r\n")).collect();
    for (raw, status) in [
        (
            "GET /acme/widgets.git/info/refs HTTP/1.1\r\nHost: github.com\r\nBad Header\r\n\r\n"
                .to_string(),
            400,
        ),
        (
            "GET /acme/widgets.git/info/refs HTTP/7.1\r\nHost: github.com\r\n\r\n".to_string(),
            400,
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: github.com\r\n{flood}\r\n"),
            431,
        ),
    ] {
        let got = raw_tls(&fx, raw.as_bytes(), false)?;
        ensure!(
            got.starts_with(format!("HTTP/1.1 {status}").as_bytes()),
            "{raw:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let parser = |r: &Value| is_deny(r) && reason(r).contains("refused by the parser");
    fx.wait_request_record(RECORD_TIMEOUT, "for a header flood", |r| {
        parser(r) && get_u64(r, "http.response.status_code") == Some(431)
    })?;
    let n = fx
        .request_records()?
        .into_iter()
        .filter(|r| parser(r))
        .count();
    ensure!(n == 3, "three parser refusals should be recorded, got {n}");
    fx.origin_new_exactly(mark, 0)?;

    // An upload the client gives up on mid-pack: a client abort, and nothing lands.
    let partial = receive_pack(
        "refs/heads/agent/abort",
        &head,
        b"PACK\0\0\0\x02",
        Some(1 << 20),
    );
    raw_tls(&fx, &partial, true)?;
    let rec = fx.wait_request_record(RECORD_TIMEOUT, "for the aborted upload", |r| {
        reason(r).starts_with("client aborted")
    })?;
    ensure!(!reason(&rec).contains("upstream"), "{rec}");
    ensure!(
        !fx.origin_refs(REPO)?.contains("refs/heads/agent/abort"),
        "the aborted push landed"
    );

    // With the option listed, the same push lands; another option is still refused.
    let policy = GIT_POLICY.replace(
        "        tags: false\n",
        "        tags: false\n        options: [ci.skip]\n",
    );
    ensure!(policy.contains("options: [ci.skip]"), "{policy}");
    fx.attach(&policy)?;
    fx.git_ok(&[
        "-C",
        "w",
        "push",
        "-o",
        "ci.skip",
        "origin",
        "HEAD:refs/heads/agent/opt",
    ])?;
    ensure!(
        fx.origin_refs(REPO)?
            .contains(&format!("{head} refs/heads/agent/opt")),
        "the push with a listed option should land"
    );
    let out = fx.git(&[
        "-C",
        "w",
        "push",
        "-o",
        "merge_request.create",
        "origin",
        "HEAD:refs/heads/agent/mr",
    ])?;
    ensure!(
        !out.status.success()
            && all_output(&out).contains("push option \"merge_request.create\" is not allowed"),
        "{}",
        all_output(&out)
    );
    ensure!(
        !fx.origin_refs(REPO)?.contains("refs/heads/agent/mr"),
        "agent/mr landed"
    );
    fx.assert_secrets_absent(&[&out])
}
