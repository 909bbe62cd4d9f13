//! `cargo xtask demo`: a sandbox confined in a small fake internet, with real clients, and
//! the audit records their traffic produced.
//!
//! Everything runs in network namespaces and a cgroup made for the demo, on documentation
//! addresses, and is removed when the demo ends (also on error).
use std::process::Output;

use anyhow::{bail, Context};
use egress_tests::{
    daemon::{Daemon, DaemonOpts},
    servers::{Canary, Origin},
    world::{World, CANARY_V4, ORIGIN_V4},
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

pub fn run() -> anyhow::Result<()> {
    require_root("the demo")?;
    build_bins()?;
    // SAFETY: single-threaded here; the harness reads these to find the binaries.
    unsafe {
        std::env::set_var("EGRESSD_BIN", bin("egressd"));
        std::env::set_var("EGRESSCTL_BIN", bin("egressctl"));
    }

    step("Building a fake internet (network namespaces, documentation addresses)");
    let world = World::new()?;
    let sandbox = world.add_sandbox("agent")?;
    let _origin = Origin::start(&world)?;
    let canary = Canary::start(&world)?;
    println!("  origin  http://{ORIGIN_V4}/  (an allowed web server)");
    println!("  canary  {CANARY_V4}  (records anything that reaches it)");
    println!("  sandbox cgroup {}", sandbox.cgroup().path().display());

    step("Starting egressd and attaching policies/demo.yaml to the sandbox");
    let daemon = Daemon::start(DaemonOpts::default())?;
    let policy = workspace().join("policies/demo.yaml");
    let out = daemon.attach(&sandbox, &policy, "agent")?;
    show(
        "egressctl attach --cgroup <sandbox> --policy policies/demo.yaml --name agent",
        &out,
    );
    if !out.status.success() {
        bail!("attach failed:\n{}", daemon.log());
    }

    step("Running real clients inside the sandbox");
    let origin = format!("http://{ORIGIN_V4}/");
    show(
        &format!("curl {origin}   (allowed by rule web-origin)"),
        &sandbox.curl(&[&origin])?,
    );
    let canary_url = format!("http://{CANARY_V4}/");
    show(
        &format!("curl {canary_url}   (not in the policy)"),
        &sandbox.curl(&[&canary_url])?,
    );
    let udp = format!(
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'leak', ('{CANARY_V4}', 53))"
    );
    show(
        "python3: sendto(b'leak', 203.0.113.66:53/udp)   (not in the policy)",
        &sandbox.run("python3", &["-c", &udp])?,
    );

    step("egressctl status");
    let status = daemon.ctl(["status"])?;
    print!("{}", String::from_utf8_lossy(&status.stdout));

    step("Audit log (JSONL; one record per kernel decision and lifecycle event)");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = std::fs::read_to_string(daemon.audit_log()).context("reading the audit log")?;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let s = |p: &str| {
            p.split('.')
                .try_fold(&v, |v, k| v.get(k))
                .map_or(String::new(), |x| match x {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
        };
        let what = match s("event.action").as_str() {
            "connect" | "sendmsg" => format!(
                "{:<7} {:<6} {} {}:{}/{} rule={}",
                s("event.action"),
                s("egress.verdict"),
                s("process.name"),
                s("destination.ip"),
                s("destination.port"),
                s("network.transport"),
                s("rule.name")
            ),
            other => format!("{other} {}", s("egress.sandbox.name")),
        };
        println!("  #{:<3} {}  {what}", s("event.sequence"), s("@timestamp"));
    }
    println!("\n  full records: {}", daemon.audit_log().display());
    if let Some(last) = log.lines().rev().find(|l| l.contains("\"deny\"")) {
        println!("  a deny record in full:\n  {last}");
    }

    step("The canary (the denied destination) received:");
    let got = canary.received()?;
    println!("  {} connections or datagrams", got.len());
    if !got.is_empty() {
        bail!("the canary received traffic: {got:?}");
    }
    step("Done; removing the demo's namespaces, cgroup and pins");
    Ok(())
}
