//! Quarantine end to end: `egressctl quarantine` under load closes the sandbox's open
//! keep-alive proxied connection, refuses every new connect (also to addresses it resolved
//! and used before) with a deny record and nothing reaching an origin, refuses its DNS,
//! revokes the credential with its `revoke` command (and a GitHub App token with the API),
//! survives a daemon restart, and `egressctl release` restores the policy. A burst of denials quarantines a sandbox by
//! itself when its policy says so.
//!
//! Needs root, nginx, openssl, curl, git, python3, dnsmasq and dig; skips otherwise.
use std::net::IpAddr;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get_str, get_u64, Match};
use egress_tests::daemon::Daemon;
use egress_tests::dns_fixture::{dig, UNSERVED_RESOLVER};
use egress_tests::dns_server::{Answer, DnsServer};
use egress_tests::expect::{self, all_output, CURL_COULDNT_CONNECT};
use egress_tests::git_fixture::{GitFixture, GitOpts};
use egress_tests::https_origin::{
    basic, API_HOST, API_V4, GIT_HOST, GIT_V4, PINNED_BODY, PINNED_HOST, PINNED_V4, REPO_BODY,
};
use egress_tests::proxy_fixture::{ProxyFixture, ProxyOpts, CLIENT_PATH, PROXY_POLICY};
use egress_tests::util::TempDir;
use egress_tests::world::CANARY_V4;
use egress_tests::{require_dns_tools, require_proxy_tools};
use serde_json::Value;

const REPO_URL: &str = "https://api.github.com/repos/acme/widgets";

/// Names resolved by the daemon (dnsmasq upstream), the API through the proxy with the
/// `github` credential, the pinned origin allowed directly.
const NAMES_POLICY: &str = r#"version: 1
default: deny
dns:
  upstream: [192.0.2.53]
  min_ttl: 300
rules:
  - name: github-api
    to: [api.github.com]
    ports: [443]
    action: proxy
    credential: github
    http:
      - methods: [GET, HEAD]
        paths: ["/repos/acme/widgets/**"]
  - name: pinned
    to: [pinned.example]
    ports: [443]
    protocol: tcp
    action: allow
"#;

/// A keep-alive client that resolves the API's name once, then sends requests on one
/// connection every 20 ms until it fails (at most 20 s), then connects afresh to the
/// address it resolved. Prints one JSON line.
const KEEPALIVE_CLIENT: &str = r#"
import errno, http.client, json, socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[1])
addr = socket.getaddrinfo("api.github.com", 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
c = http.client.HTTPSConnection("api.github.com", 443, context=ctx, timeout=5)
ok, err, deadline = 0, None, time.time() + 20
while time.time() < deadline:
    try:
        c.request("GET", "/repos/acme/widgets")
        r = c.getresponse()
        r.read()
        if r.status != 200:
            err = "status %d" % r.status
            break
        ok += 1
    except Exception as e:
        err = type(e).__name__
        break
    time.sleep(0.02)
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((addr, 443))
    new = "connected"
except OSError as e:
    new = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps({"addr": addr, "ok": ok, "err": err, "new": new}), flush=True)
"#;

fn world_answers() -> Vec<Answer> {
    vec![
        Answer::new(API_HOST, IpAddr::V4(API_V4)),
        Answer::new(GIT_HOST, IpAddr::V4(GIT_V4)),
        Answer::new(PINNED_HOST, IpAddr::V4(PINNED_V4)),
    ]
}

fn curl_pinned(fx: &ProxyFixture) -> Result<Output> {
    let ca = fx.ca.cert().display().to_string();
    fx.curl_trusting(&ca, &["https://pinned.example/"])
}

fn status_of(fx: &ProxyFixture, name: &str) -> Result<Value> {
    fx.daemon
        .status_sandbox(name)?
        .with_context(|| format!("sandbox {name} missing from status"))
}

fn records(daemon: &Daemon, m: &Match, n: usize) -> Result<Vec<Value>> {
    expect::records(daemon, m, n)
}

/// A python script making `n` TCP connects to the canary, printing `EPERM` for each the
/// kernel refuses (and the error otherwise).
fn canary_connects(n: usize) -> String {
    format!(
        "import socket\nfor i in range({n}):\n    s = socket.socket()\n    s.settimeout(1)\n    \
         try:\n        s.connect(('{CANARY_V4}', 80))\n    except PermissionError:\n        \
         print('EPERM')\n    except OSError as e:\n        print(e)\n"
    )
}

fn dig_status(fx: &ProxyFixture, name: &str) -> Result<String> {
    let d = dig(&fx.sandbox, &[&format!("@{UNSERVED_RESOLVER}"), name, "A"])?;
    Ok(d.status.clone().unwrap_or_else(|| d.describe()))
}

#[test]
fn quarantine_under_load_survives_restart_and_release_restores() -> Result<()> {
    require_proxy_tools!();
    require_dns_tools!();
    // The revoke command writes what it reads on stdin where only this test looks, and
    // prints it too: that output must go nowhere.
    let revoke_dir = TempDir::new("revoke")?;
    let revoked = revoke_dir.path().join("revoked");
    let script = revoke_dir.write(
        "revoke.sh",
        &format!(
            "#!/bin/sh\ncat > '{}'\ncat '{}'\ncat '{}' >&2\n",
            revoked.display(),
            revoked.display(),
            revoked.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let mut fx = ProxyFixture::new(ProxyOpts {
        policy: NAMES_POLICY.into(),
        nameserver: Some(IpAddr::V4(UNSERVED_RESOLVER)),
        github_revoke: Some(vec![script.display().to_string()]),
        ..ProxyOpts::default()
    })?;
    let _dns = DnsServer::start(&fx.world, &world_answers(), 300)?;
    let name = fx.sandbox.label().to_string();
    let proxy_ca = fx.proxy_ca().display().to_string();

    // Positive controls: the direct rule and DNS work before quarantine.
    let out = curl_pinned(&fx)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == PINNED_BODY,
        "pinned origin before quarantine: {}",
        all_output(&out)
    );
    ensure!(dig_status(&fx, API_HOST)? == "NOERROR");

    // Load: a keep-alive connection sending requests through the proxy.
    let mut cmd =
        fx.sandbox
            .command_with_timeout(40, "python3", &["-c", KEEPALIVE_CLIENT, &proxy_ca]);
    cmd.env_clear()
        .env("PATH", CLIENT_PATH)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let client = cmd.spawn()?;
    let before = fx.origin.requests()?.len();
    fx.origin
        .wait_new_at_least(before, 5, Duration::from_secs(15))?;
    let pinned_before = pinned_requests(&fx)?;

    let out = fx.daemon.ctl([
        "quarantine",
        &name,
        "--reason",
        "test: suspected exfiltration",
    ])?;
    ensure!(out.status.success(), "quarantine: {}", all_output(&out));
    // A request already on its way when the switch happened may still land; none after.
    std::thread::sleep(Duration::from_millis(300));
    let settled = fx.origin.requests()?.len();

    let out = client.wait_with_output()?;
    let line = String::from_utf8_lossy(&out.stdout);
    let result: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("client printed no result: {}", all_output(&out)))?;
    ensure!(
        result["ok"].as_u64().unwrap_or(0) >= 5 && !result["err"].is_null(),
        "the keep-alive connection was not closed by quarantine: {result}"
    );
    ensure!(
        result["new"] == "EPERM" && result["addr"] == API_V4.to_string(),
        "a new connect to the resolved address was not refused with EPERM: {result}"
    );
    ensure!(
        fx.origin.requests()?.len() == settled,
        "a request reached the origin after quarantine"
    );

    // Recorded: the quarantine, and the refused connect.
    let q = records(
        &fx.daemon,
        &Match::lifecycle("sandbox-quarantine").sandbox(&name),
        1,
    )?;
    ensure!(
        get_str(&q[0], "egress.quarantine.trigger") == Some("operator")
            && get_str(&q[0], "event.reason") == Some("test: suspected exfiltration"),
        "quarantine record: {}",
        q[0]
    );
    records(
        &fx.daemon,
        &Match::decision("deny", IpAddr::V4(API_V4), 443).sandbox(&name),
        1,
    )?;
    // The revoke command got the token on stdin; the revocation is recorded by name.
    let r = records(
        &fx.daemon,
        &Match::lifecycle("credential-revoke").sandbox(&name),
        1,
    )?;
    ensure!(
        get_str(&r[0], "egress.credential.name") == Some("github")
            && get_str(&r[0], "event.outcome") == Some("success"),
        "revoke record: {}",
        r[0]
    );
    let got = std::fs::read_to_string(&revoked).context("the revoke command did not run")?;
    ensure!(
        got == format!("{}\n", fx.token()),
        "the revoke command did not get the token"
    );

    // Every other way out is refused too: a direct rule's address (resolved before, as a
    // client with a cached answer would use it), and DNS.
    let ca = fx.ca.cert().display().to_string();
    let resolve = format!("{PINNED_HOST}:443:{PINNED_V4}");
    let out = fx.curl_trusting(&ca, &["--resolve", &resolve, "https://pinned.example/"])?;
    expect::exit_code(&out, CURL_COULDNT_CONNECT)?;
    records(
        &fx.daemon,
        &Match::decision("deny", IpAddr::V4(PINNED_V4), 443).sandbox(&name),
        1,
    )?;
    ensure!(
        pinned_requests(&fx)? == pinned_before,
        "the pinned origin got a request"
    );
    ensure!(dig_status(&fx, API_HOST)? == "REFUSED");
    let refused = records(&fx.daemon, &Match::lifecycle("dns-query").sandbox(&name), 1)?;
    ensure!(
        refused
            .iter()
            .any(|r| get_str(r, "dns.response_code") == Some("REFUSED")),
        "no REFUSED dns-query record: {refused:?}"
    );
    expect::canary_silent(&fx.canary)?;

    let st = status_of(&fx, &name)?;
    ensure!(
        st["quarantine"]["trigger"] == "operator"
            && st["quarantine"]["reason"] == "test: suspected exfiltration",
        "status: {st}"
    );
    let table = fx.daemon.ctl_ok(["status"])?;
    ensure!(
        String::from_utf8_lossy(&table.stdout).contains("QUARANTINED since"),
        "status table: {}",
        all_output(&table)
    );
    // Quarantining again changes nothing.
    let again = fx.daemon.ctl_ok(["quarantine", &name])?;
    ensure!(String::from_utf8_lossy(&again.stdout).contains("already quarantined"));

    // Restart while quarantined: the kernel stays deny-all all along, the new daemon
    // keeps the sandbox quarantined.
    fx.daemon.terminate(Duration::from_secs(10))?;
    expect::eperm(
        &fx.sandbox
            .probe("tcp-connect", IpAddr::V4(API_V4), 443, &[])?,
    )?;
    fx.daemon.restart()?;
    records(
        &fx.daemon,
        &Match::lifecycle("sandbox-adopt").sandbox(&name),
        1,
    )?;
    let st = status_of(&fx, &name)?;
    ensure!(
        st["quarantine"]["trigger"] == "operator",
        "after restart: {st}"
    );
    expect::eperm(
        &fx.sandbox
            .probe("tcp-connect", IpAddr::V4(PINNED_V4), 443, &[])?,
    )?;
    ensure!(dig_status(&fx, API_HOST)? == "REFUSED");
    let out = fx.curl(&[REPO_URL])?;
    ensure!(
        !out.status.success(),
        "API reachable after restart: {}",
        all_output(&out)
    );

    // Release: the policy is back (positive control for everything refused above).
    let out = fx.daemon.ctl_ok(["release", &name])?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains("released"));
    records(
        &fx.daemon,
        &Match::lifecycle("sandbox-release").sandbox(&name),
        1,
    )?;
    ensure!(status_of(&fx, &name)?.get("quarantine").is_none());
    ensure!(dig_status(&fx, API_HOST)? == "NOERROR");
    let out = fx.curl(&[REPO_URL])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == REPO_BODY,
        "API after release: {}",
        all_output(&out)
    );
    let out = curl_pinned(&fx)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == PINNED_BODY,
        "pinned origin after release: {}",
        all_output(&out)
    );
    let second = fx.daemon.ctl(["release", &name])?;
    ensure!(!second.status.success(), "a second release succeeded");
    fx.assert_token_absent(&[])
}

/// Requests the pinned origin received so far.
fn pinned_requests(fx: &ProxyFixture) -> Result<usize> {
    Ok(fx
        .origin
        .requests()?
        .iter()
        .filter(|r| r.sni == PINNED_HOST || r.host == PINNED_HOST)
        .count())
}

#[test]
fn a_denial_burst_quarantines_when_the_policy_says_so() -> Result<()> {
    require_proxy_tools!();
    let policy = format!(
        "{PROXY_POLICY}alerts:\n  responses: {{ denial-burst: quarantine }}\n  denial_burst: {{ count: 8, seconds: 5 }}\n"
    );
    let fx = ProxyFixture::new(ProxyOpts {
        policy,
        ..ProxyOpts::default()
    })?;
    let name = fx.sandbox.label().to_string();
    // Positive control, and fewer denials than the threshold do nothing.
    let out = fx.curl(&[REPO_URL])?;
    ensure!(out.status.success(), "before: {}", all_output(&out));
    let run = |n: usize| -> Result<String> {
        let out = fx.client(10, "python3", &["-c", &canary_connects(n)], &[])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(run(3)?.matches("EPERM").count() == 3);
    std::thread::sleep(Duration::from_millis(500));
    ensure!(status_of(&fx, &name)?.get("quarantine").is_none());

    // 12 more within a second: one alert, and the sandbox is quarantined.
    ensure!(run(12)?.matches("EPERM").count() == 12);
    let alert = records(
        &fx.daemon,
        &Match::lifecycle("denial-burst").sandbox(&name),
        1,
    )?;
    let a = &alert[0];
    ensure!(
        get_str(a, "event.kind") == Some("alert")
            && get_str(a, "egress.alert.response") == Some("quarantine")
            && get_u64(a, "egress.alert.count") == Some(8)
            && get_u64(a, "egress.alert.window_seconds") == Some(5),
        "alert: {a}"
    );
    let q = records(
        &fx.daemon,
        &Match::lifecycle("sandbox-quarantine").sandbox(&name),
        1,
    )?;
    ensure!(
        get_str(&q[0], "egress.quarantine.trigger") == Some("denial-burst"),
        "quarantine record: {}",
        q[0]
    );
    ensure!(status_of(&fx, &name)?["quarantine"]["trigger"] == "denial-burst");
    // Summarised: the 7 denials after the 8th, in the same window, raise nothing more.
    std::thread::sleep(Duration::from_millis(500));
    let all = fx.daemon.audit_records()?;
    ensure!(
        Match::lifecycle("denial-burst").all(&all).len() == 1,
        "more than one burst alert"
    );
    // The API the policy allowed is refused now, and its origin got nothing.
    let before = fx.origin.requests()?.len();
    let out = fx.curl(&[REPO_URL])?;
    expect::exit_code(&out, CURL_COULDNT_CONNECT)?;
    records(
        &fx.daemon,
        &Match::decision("deny", IpAddr::V4(API_V4), 443).sandbox(&name),
        1,
    )?;
    ensure!(fx.origin.requests()?.len() == before);
    expect::canary_silent(&fx.canary)?;

    fx.daemon.ctl_ok(["release", &name])?;
    let out = fx.curl(&[REPO_URL])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == REPO_BODY,
        "after release: {}",
        all_output(&out)
    );
    fx.assert_token_absent(&[])
}

/// A `github_app` credential's live installation token is revoked with the API when its
/// sandbox is quarantined: the origin refuses it from then on; after release the next use
/// mints a new one.
#[test]
fn quarantine_revokes_the_github_app_token() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    let name = fx.sandbox.label().to_string();
    fx.git_ok(&["clone", "-q", &GitFixture::url("acme/widgets"), "widgets"])?;
    let minted = fx.tokens.mints()?;
    ensure!(minted.len() == 1, "expected one mint: {minted:#?}");
    let first = minted[0].token.clone();
    let info_refs = "https://github.com/acme/widgets.git/info/refs?service=git-upload-pack";
    let auth = format!("Authorization: {}", basic(&first));
    let direct = |want: &str| -> Result<()> {
        let out = fx.world_curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &auth,
            info_refs,
        ])?;
        ensure!(
            String::from_utf8_lossy(&out.stdout) == want,
            "the origin answered the first token with {} (want {want})",
            all_output(&out)
        );
        Ok(())
    };
    direct("200")?;

    fx.daemon
        .ctl_ok(["quarantine", &name, "--reason", "test"])?;
    let r = records(
        &fx.daemon,
        &Match::lifecycle("credential-revoke").sandbox(&name),
        1,
    )?;
    ensure!(
        get_str(&r[0], "egress.credential.name") == Some("github-app")
            && get_str(&r[0], "event.outcome") == Some("success"),
        "revoke record: {}",
        r[0]
    );
    ensure!(
        fx.tokens.revoked()? == [first.clone()],
        "the endpoint revoked {:?}",
        fx.tokens.revoked()?
    );
    // Revoked for everyone, not only refused to the sandbox.
    direct("401")?;
    let fetch = fx.git(&["-C", "widgets", "fetch", "-q", "origin"])?;
    ensure!(
        !fetch.status.success(),
        "fetch while quarantined: {}",
        all_output(&fetch)
    );

    fx.daemon.ctl_ok(["release", &name])?;
    fx.git_ok(&["-C", "widgets", "fetch", "-q", "origin"])?;
    let minted = fx.tokens.mints()?;
    ensure!(
        minted.len() == 2 && minted[1].token != first,
        "expected a new token after release: {minted:#?}"
    );
    let log = std::fs::read_to_string(fx.daemon.audit_log())?;
    ensure!(
        !log.contains(&first),
        "the revoked token is in the audit log"
    );
    Ok(())
}

/// A quarantine the sandbox set off itself (a denial burst) does not revoke a credential
/// another sandbox still uses: the shared `github_app` token stays valid, and the record
/// says why it was not revoked.
#[test]
fn a_self_inflicted_quarantine_leaves_shared_credentials_alone() -> Result<()> {
    require_proxy_tools!();
    let policy = format!(
        "{}alerts:\n  responses: {{ denial-burst: quarantine }}\n  denial_burst: {{ count: 8, seconds: 5 }}\n",
        egress_tests::git_fixture::GIT_POLICY
    );
    let fx = GitFixture::new(GitOpts {
        policy: policy.clone(),
        ..GitOpts::default()
    })?;
    let name = fx.sandbox.label().to_string();
    // A second sandbox (an empty cgroup in the same namespace) with the same credential.
    let other_cgroup =
        egress_tests::cgroup::CgroupGuard::new(&egress_tests::util::unique_name("other"))?;
    let other_policy = fx.sandbox_dir().join("other.yaml");
    std::fs::write(&other_policy, &policy)?;
    fx.daemon.ctl_ok([
        std::ffi::OsStr::new("attach"),
        std::ffi::OsStr::new("--cgroup"),
        other_cgroup.path().as_os_str(),
        std::ffi::OsStr::new("--policy"),
        other_policy.as_os_str(),
        std::ffi::OsStr::new("--name"),
        std::ffi::OsStr::new("other"),
        std::ffi::OsStr::new("--netns"),
        fx.sandbox.netns().path().as_os_str(),
    ])?;
    fx.git_ok(&["clone", "-q", &GitFixture::url("acme/widgets"), "widgets"])?;
    ensure!(fx.tokens.mints()?.len() == 1, "expected one mint");

    // Denied connects, fast: the sandbox quarantines itself.
    let out = fx.client(10, "python3", &["-c", &canary_connects(12)], &[])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout)
            .matches("EPERM")
            .count()
            == 12,
        "denied connects: {}",
        all_output(&out)
    );
    records(
        &fx.daemon,
        &Match::lifecycle("sandbox-quarantine").sandbox(&name),
        1,
    )?;
    let r = records(
        &fx.daemon,
        &Match::lifecycle("credential-revoke").sandbox(&name),
        1,
    )?;
    ensure!(
        get_str(&r[0], "egress.credential.name") == Some("github-app")
            && get_str(&r[0], "event.outcome") == Some("failure")
            && get_str(&r[0], "event.reason").is_some_and(|why| why.contains("other")),
        "revoke record: {}",
        r[0]
    );
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        fx.tokens.revoked()?.is_empty(),
        "the shared token was revoked: {:?}",
        fx.tokens.revoked()?
    );
    fx.daemon.ctl_ok(["detach", "--name", "other"])?;
    Ok(())
}

/// UDP and TCP to the canary's port 9 allowed, as a direct (not proxied) rule.
const CANARY_ALLOWED: &str = r#"version: 1
default: deny
rules:
  - name: canary-direct
    to: [203.0.113.66]
    ports: [9]
    action: allow
"#;

/// Runs `script` with python in the fixture's sandbox and waits (10 s at most) for it to
/// create `ready`; `what` says what did not happen otherwise.
fn spawn_until_ready(
    fx: &egress_tests::fixture::Fixture,
    script: &str,
    ready: &std::path::Path,
    what: &str,
) -> Result<std::process::Child> {
    let mut cmd = fx.sandbox.command("python3", &["-c", script]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let started = std::time::Instant::now();
    while !ready.exists() {
        ensure!(started.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Quarantines the fixture's sandbox, then lets `child` go on (it waits for `go`) and
/// returns its output.
fn quarantine_then_go(
    fx: &egress_tests::fixture::Fixture,
    reason: &str,
    go: &std::path::Path,
    child: std::process::Child,
) -> Result<Output> {
    let out = fx
        .daemon
        .ctl(["quarantine", fx.sandbox.label(), "--reason", reason])?;
    ensure!(out.status.success(), "quarantine: {}", all_output(&out));
    std::fs::write(go, "go")?;
    Ok(child.wait_with_output()?)
}

/// The `packet` record of a packet the quarantine dropped at egress.
fn quarantine_drop_record(fx: &egress_tests::fixture::Fixture) -> Result<Value> {
    fx.daemon.wait_for_record(Duration::from_secs(10), |r| {
        get_str(r, "event.action") == Some("packet")
            && r["egress"]["option"]["name"] == "quarantine"
    })
}

/// A quarantine also silences what no later connect or send hook sees: a UDP socket
/// connected, and a TCP connection opened, under an `allow` rule before it. Their packets
/// are dropped (to anywhere but loopback), with a record.
#[test]
fn quarantine_silences_sockets_connected_before_it() -> Result<()> {
    egress_tests::require_root!();
    let fx = egress_tests::fixture::Fixture::new()?;
    fx.attach(CANARY_ALLOWED)?;
    let dir = TempDir::new("quarantine-sockets")?;
    let (ready, go) = (dir.path().join("ready"), dir.path().join("go"));
    let script = format!(
        r#"
import os, socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("{CANARY_V4}", 9))
u.send(b"udp-pre")
t = socket.create_connection(("{CANARY_V4}", 9), timeout=5)
t.sendall(b"tcp-pre")
open("{ready}", "w").close()
for _ in range(400):
    if os.path.exists("{go}"):
        break
    time.sleep(0.05)
for name, send in (("udp", lambda: u.send(b"udp-post")), ("tcp", lambda: t.sendall(b"tcp-post"))):
    try:
        send()
        print(name, "sent", flush=True)
    except OSError as e:
        print(name, "errno", e.errno, flush=True)
time.sleep(1)
"#,
        ready = ready.display(),
        go = go.display()
    );
    let child = spawn_until_ready(
        &fx,
        &script,
        &ready,
        "the sandbox's sockets did not connect",
    )?;
    // Positive control: both reached the canary before the quarantine.
    let got =
        |what: &[u8]| -> Result<bool> { Ok(fx.canary.received()?.iter().any(|e| e.data == what)) };
    egress_tests::util::poll(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok((got(b"udp-pre")? && got(b"tcp-pre")?).then_some(()))
    })?
    .context("the canary did not get udp-pre and tcp-pre")?;
    let out = quarantine_then_go(&fx, "test: sockets opened before", &go, child)?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The connected UDP socket's send fails at once; TCP's is buffered, never delivered.
    ensure!(text.contains("udp errno 1"), "{}", all_output(&out));
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        !got(b"udp-post")? && !got(b"tcp-post")?,
        "the canary got data sent after the quarantine: {:?}",
        fx.canary.received()?
    );
    let rec = quarantine_drop_record(&fx)?;
    ensure!(
        get_str(&rec, "egress.sandbox.name") == Some(fx.sandbox.label())
            && get_str(&rec, "event.outcome") == Some("failure"),
        "{rec}"
    );
    Ok(())
}

/// A relay on `127.0.0.1:7000` sending each stream on to the canary's port 9 (a service
/// mesh's local proxy); writes its argument's path once it listens.
const RELAY: &str = r#"
import socket, sys, threading
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 7000))
l.listen(8)
open(sys.argv[1], "w").close()
while True:
    c, _ = l.accept()
    # Marked, so the NAT rule (as a mesh's excludes its proxy) leaves it alone.
    u = socket.socket()
    u.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1)
    u.settimeout(5)
    u.connect((sys.argv[2], 9))
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    threading.Thread(target=pump, args=(u, c), daemon=True).start()
"#;

/// NAT in the sandbox's namespace (a service mesh's `REDIRECT` of every connection to
/// its local proxy, which sends the stream on) rewrites a packet's destination to
/// loopback before the egress hook sees it. A quarantine still silences a connection
/// opened before it, judged by the socket's own peer, with a record.
#[test]
fn quarantine_silences_connections_nat_redirects_to_loopback() -> Result<()> {
    egress_tests::require_root!();
    let fx = egress_tests::fixture::Fixture::new()?;
    fx.attach(CANARY_ALLOWED)?;
    let dir = TempDir::new("quarantine-nat")?;
    let (listening, ready, go) = (
        dir.path().join("listening"),
        dir.path().join("ready"),
        dir.path().join("go"),
    );
    let ns = fx.sandbox.netns();
    // The relay runs in the sandbox's namespace but not in its cgroup, as a mesh's
    // proxy runs in a container of its own.
    let canary = CANARY_V4.to_string();
    let mut cmd = ns.spawn_command(
        "python3",
        &["-c", RELAY, &listening.display().to_string(), &canary],
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let _relay = egress_tests::util::ChildGuard::new(cmd.spawn()?, "relay");
    egress_tests::util::poll(Duration::from_secs(10), Duration::from_millis(20), || {
        Ok(listening.exists().then_some(()))
    })?
    .context("the relay did not listen")?;
    let out = ns
        .command(
            10,
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                &canary,
                "-p",
                "tcp",
                "--dport",
                "9",
                "-m",
                "mark",
                "!",
                "--mark",
                "1",
                "-j",
                "REDIRECT",
                "--to-ports",
                "7000",
            ],
        )
        .output()?;
    ensure!(out.status.success(), "iptables: {}", all_output(&out));
    let script = format!(
        r#"
import os, socket, time
t = socket.create_connection(("{CANARY_V4}", 9), timeout=5)
t.sendall(b"nat-pre")
open("{ready}", "w").close()
for _ in range(400):
    if os.path.exists("{go}"):
        break
    time.sleep(0.05)
try:
    t.sendall(b"nat-post")
    print("tcp sent", flush=True)
except OSError as e:
    print("tcp errno", e.errno, flush=True)
time.sleep(1)
"#,
        ready = ready.display(),
        go = go.display()
    );
    let child = spawn_until_ready(
        &fx,
        &script,
        &ready,
        "the sandbox's connection did not open",
    )?;
    // Positive control: before the quarantine the stream reaches the canary, through the
    // relay (the canary sees the relay's address, not the sandbox's).
    let got =
        |what: &[u8]| -> Result<bool> { Ok(fx.canary.received()?.iter().any(|e| e.data == what)) };
    egress_tests::util::poll(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(got(b"nat-pre")?.then_some(()))
    })?
    .context("the canary did not get nat-pre through the relay")?;
    let out = quarantine_then_go(&fx, "test: a connection NAT sends to loopback", &go, child)?;
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        !got(b"nat-post")?,
        "the canary got data sent after the quarantine: {:?} ({})",
        fx.canary.received()?,
        all_output(&out)
    );
    let rec = quarantine_drop_record(&fx)?;
    ensure!(
        get_str(&rec, "egress.sandbox.name") == Some(fx.sandbox.label())
            && get_str(&rec, "destination.ip") == Some(canary.as_str()),
        "{rec}"
    );
    Ok(())
}

/// The canary refused, the origin's web port allowed: what replaces [`CANARY_ALLOWED`].
const CANARY_REFUSED: &str = r#"version: 1
default: deny
rules:
  - name: origin-web
    to: [192.0.2.10]
    ports: [80]
    action: allow
"#;

/// A replaced policy also judges the connections opened under the one before: a TCP
/// connection and a connected UDP socket to the canary, allowed then and refused now, are
/// closed (their next sends fail, the canary gets nothing more), each with a
/// `connection-cut` record. Positive control: a connection to the origin, which the new
/// policy allows, goes on working.
#[test]
fn a_replaced_policy_closes_the_connections_it_refuses() -> Result<()> {
    egress_tests::require_root!();
    let fx = egress_tests::fixture::Fixture::new()?;
    let both = CANARY_ALLOWED.replace(
        "rules:\n",
        "rules:\n  - name: origin-web\n    to: [192.0.2.10]\n    ports: [80]\n    action: allow\n",
    );
    fx.attach(&both)?;
    let dir = TempDir::new("policy-cut")?;
    let (ready, go) = (dir.path().join("ready"), dir.path().join("go"));
    let script = format!(
        r#"
import os, socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("{CANARY_V4}", 9))
u.send(b"udp-pre")
t = socket.create_connection(("{CANARY_V4}", 9), timeout=5)
t.sendall(b"tcp-pre")
# A listener on the connection's own port: the connection must not pass for one that
# listener accepted.
l = socket.socket()
l.bind(("127.0.0.1", t.getsockname()[1]))
l.listen(1)
o = socket.create_connection(("192.0.2.10", 80), timeout=5)
open("{ready}", "w").close()
for _ in range(400):
    if os.path.exists("{go}"):
        break
    time.sleep(0.05)
for name, send in (("udp", lambda: u.send(b"udp-post")), ("tcp", lambda: t.sendall(b"tcp-post"))):
    try:
        send()
        print(name, "sent", flush=True)
    except OSError as e:
        print(name, "errno", e.errno, flush=True)
try:
    o.sendall(b"GET / HTTP/1.0\r\nHost: origin\r\n\r\n")
    print("origin", o.recv(12).decode(errors="replace"), flush=True)
except OSError as e:
    print("origin errno", e.errno, flush=True)
"#,
        ready = ready.display(),
        go = go.display()
    );
    let child = spawn_until_ready(
        &fx,
        &script,
        &ready,
        "the sandbox's sockets did not connect",
    )?;
    let got =
        |what: &[u8]| -> Result<bool> { Ok(fx.canary.received()?.iter().any(|e| e.data == what)) };
    egress_tests::util::poll(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok((got(b"udp-pre")? && got(b"tcp-pre")?).then_some(()))
    })?
    .context("the canary did not get udp-pre and tcp-pre")?;
    let replaced = fx.attach(CANARY_REFUSED);
    std::fs::write(&go, "go")?;
    replaced?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !text.contains("udp sent") && !text.contains("tcp sent"),
        "sends on the closed sockets succeeded: {}",
        all_output(&out)
    );
    ensure!(
        text.contains("origin HTTP/1."),
        "the connection the new policy allows was cut: {}",
        all_output(&out)
    );
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        !got(b"udp-post")? && !got(b"tcp-post")?,
        "the canary got data sent after the replacement: {:?}",
        fx.canary.received()?
    );
    let cuts = egress_tests::util::poll(Duration::from_secs(5), Duration::from_millis(50), || {
        let cut: Vec<Value> = fx
            .daemon
            .audit_records()?
            .into_iter()
            .filter(|r| get_str(r, "event.action") == Some("connection-cut"))
            .collect();
        Ok((cut.len() >= 2).then_some(cut))
    })?
    .context("no connection-cut records for the two sockets")?;
    for transport in ["tcp", "udp"] {
        let rec = cuts
            .iter()
            .find(|r| get_str(r, "network.transport") == Some(transport))
            .with_context(|| format!("no {transport} connection-cut record: {cuts:?}"))?;
        ensure!(
            get_str(rec, "destination.ip") == Some(&CANARY_V4.to_string())
                && get_u64(rec, "destination.port") == Some(9)
                && get_str(rec, "egress.verdict") == Some("deny")
                && get_str(rec, "egress.sandbox.name") == Some(fx.sandbox.label())
                && get_str(rec, "event.reason").is_some_and(|m| m.contains("closed")),
            "{rec}"
        );
    }
    ensure!(
        cuts.len() == 2,
        "only the two canary sockets should be cut: {cuts:?}"
    );
    Ok(())
}
