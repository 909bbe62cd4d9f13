//! Only TCP and UDP sockets exist in a sandbox: raw and ICMP ("ping") sockets, which no
//! connect or sendmsg hook would judge (a ping socket's sendto and a raw socket's writes
//! bypass them), are refused at creation with EPERM and recorded.
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::time::Duration;

use anyhow::{ensure, Result};
use egress_tests::audit::{action, get_str};
use egress_tests::expect;
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::util::poll;
use serde_json::Value;

const SCRIPT: &str = r#"
import socket
cases = [
    ("ping4", (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)),
    ("raw4", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
    ("raw6", (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)),
    ("tcp", (socket.AF_INET, socket.SOCK_STREAM, 0)),
    ("udp6", (socket.AF_INET6, socket.SOCK_DGRAM, 0)),
]
for name, args in cases:
    try:
        socket.socket(*args).close()
        print(name, "ok")
    except PermissionError:
        print(name, "EPERM")
"#;

#[test]
fn raw_and_icmp_sockets_are_refused() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    // Let the kernel itself allow ping sockets in the sandbox's namespace, so the refusal
    // below is ours and not the ping_group_range check that runs first.
    let sysctl = fx
        .sandbox
        .sh("sysctl -qw net.ipv4.ping_group_range='0 2147483647'")?;
    ensure!(sysctl.status.success(), "sysctl failed: {sysctl:?}");
    let out = fx.sandbox.run("python3", &["-c", SCRIPT])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for want in [
        "ping4 EPERM",
        "raw4 EPERM",
        "raw6 EPERM",
        "tcp ok",
        "udp6 ok",
    ] {
        ensure!(
            text.contains(want),
            "expected {want:?} in {text:?} ({out:?})"
        );
    }
    let refused = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        let all: Vec<Value> = fx
            .daemon
            .audit_records()?
            .into_iter()
            .filter(|r| action(r) == Some("socket") && get_str(r, "egress.verdict") == Some("deny"))
            .collect();
        Ok((all.len() >= 3).then_some(all))
    })?
    .unwrap_or_default();
    ensure!(
        refused.len() >= 3,
        "expected 3 socket deny records, got {refused:?}"
    );
    ensure!(
        refused
            .iter()
            .any(|r| get_str(r, "egress.hook") == Some("sock_create6")),
        "no sock_create6 record: {refused:?}"
    );
    expect::canary_silent(&fx.canary)?;
    Ok(())
}
