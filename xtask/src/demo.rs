//! `cargo xtask demo`: a sandbox confined in a small fake internet, with real clients, and
//! the audit records their traffic produced.
//!
//! Everything runs in network namespaces and a cgroup made for the demo, on documentation
//! addresses, with a test CA and a fake token made for the run, and is removed when the
//! demo ends (also on error).
use std::process::Output;

use anyhow::{bail, Context};
use egress_tests::{
    proxy_fixture::{ProxyFixture, ProxyOpts},
    servers::Origin,
    world::{CANARY_V4, ORIGIN_V4},
};

use crate::cmd::{bin, build_bins, require_root, step, workspace};

fn show(what: &str, out: &Output) {
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    let status = out
        .status
        .code()
        .map_or("killed".to_string(), |c| format!("exit {c}"));
    println!(
        "  $ {what}\n    -> {status}  {}  {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn field(v: &serde_json::Value, path: &str) -> String {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .map_or(String::new(), |x| match x {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
}

fn summary(v: &serde_json::Value) -> String {
    let s = |p| field(v, p);
    match s("event.action").as_str() {
        "connect" | "sendmsg" => format!(
            "{:<12} {:<8} {:<8} {}:{}/{} rule={}",
            s("event.action"),
            s("egress.verdict"),
            s("process.name"),
            s("destination.ip"),
            s("destination.port"),
            s("network.transport"),
            s("rule.name")
        ),
        "http-request" | "tls-connection" => format!(
            "{:<12} {:<8} {} {}{} -> {} rule={} credential={} {}",
            s("event.action"),
            s("egress.verdict"),
            s("http.request.method"),
            s("url.domain"),
            s("url.path"),
            s("http.response.status_code"),
            s("rule.name"),
            s("egress.credential.name"),
            s("event.reason")
        ),
        other => format!("{other:<12} {}", s("egress.sandbox.name")),
    }
}

pub fn run() -> anyhow::Result<()> {
    require_root("the demo")?;
    build_bins()?;
    // SAFETY: single-threaded here; the harness reads these to find the binaries.
    unsafe {
        std::env::set_var("EGRESSD_BIN", bin("egressd"));
        std::env::set_var("EGRESSCTL_BIN", bin("egressctl"));
    }

    step("Building a fake internet, starting egressd, attaching policies/agent.yaml");
    let policy = std::fs::read_to_string(workspace().join("policies/agent.yaml"))
        .context("reading policies/agent.yaml")?;
    let fx = ProxyFixture::new(ProxyOpts {
        policy,
        ..ProxyOpts::default()
    })?;
    let _http_origin = Origin::start(&fx.world)?;
    println!("  http://{ORIGIN_V4}/          a plain web origin (rule web-origin: allow)");
    println!(
        "  https://api.github.com       a fake GitHub API on {ORIGIN_V4}:443 that requires a token"
    );
    println!("  {CANARY_V4}              a canary that records anything reaching it");
    println!("  sandbox cgroup {}", fx.sandbox.cgroup().path().display());
    println!("  the daemon holds the token; the sandbox trusts only `egressctl ca export`");

    step("Running real clients inside the sandbox (no token, no proxy settings)");
    let origin = format!("http://{ORIGIN_V4}/");
    show(&format!("curl {origin}"), &fx.sandbox.curl(&[&origin])?);
    let api = "https://api.github.com/repos/acme/widgets/pulls";
    show(
        &format!("curl {api}"),
        &fx.curl(&["-w", " [HTTP %{http_code}]", api])?,
    );
    let other = "https://api.github.com/repos/acme/widgets";
    show(
        &format!("curl -X DELETE {other}   (method not allowed)"),
        &fx.curl(&["-w", " [HTTP %{http_code}]", "-X", "DELETE", other])?,
    );
    let canary_url = format!("http://{CANARY_V4}/");
    show(
        &format!("curl {canary_url}   (not in the policy)"),
        &fx.sandbox.curl(&[&canary_url])?,
    );
    let udp = format!(
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'leak', ('{CANARY_V4}', 53))"
    );
    show(
        "python3: sendto(b'leak', 203.0.113.66:53/udp)   (not in the policy)",
        &fx.sandbox.run("python3", &["-c", &udp])?,
    );

    step("What the GitHub origin received");
    std::thread::sleep(std::time::Duration::from_millis(300));
    for r in fx.origin.requests()? {
        let auth = if r.authorization.is_empty() {
            "none"
        } else {
            "Bearer <the daemon's token>"
        };
        println!(
            "  {} {} {} -> {}  Authorization: {auth}",
            r.method, r.host, r.uri, r.status
        );
    }
    let env = fx.sandbox.run("env", &[] as &[&str])?;
    let leaked = String::from_utf8_lossy(&env.stdout).contains(fx.token());
    println!(
        "  token in the sandbox's environment: {}",
        if leaked { "YES" } else { "no" }
    );

    step("egressctl status");
    let status = fx.daemon.ctl(["status"])?;
    print!("{}", String::from_utf8_lossy(&status.stdout));

    step("Audit log (JSONL; one record per kernel decision, proxied request and lifecycle event)");
    let log = std::fs::read_to_string(fx.daemon.audit_log()).context("reading the audit log")?;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        println!("  #{:<3} {}", field(&v, "event.sequence"), summary(&v));
    }
    println!("\n  full records: {}", fx.daemon.audit_log().display());
    if let Some(last) = log.lines().rev().find(|l| l.contains("\"http-request\"")) {
        println!("  a proxied request in full:\n  {last}");
    }
    if log.contains(fx.token()) {
        bail!("the token appears in the audit log");
    }
    println!("  token in the audit log: no");

    step("The canary (the denied destination) received:");
    let got = fx.canary.received()?;
    println!("  {} connections or datagrams", got.len());
    if !got.is_empty() {
        bail!("the canary received traffic: {got:?}");
    }
    step("Done; removing the demo's namespaces, cgroup, servers and pins");
    Ok(())
}
