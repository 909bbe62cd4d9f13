//! UDP: unconnected sends are decided at sendmsg4/6, connected sockets at connect4/6
//! (AYA-NOTES), so both paths are probed, on IPv4 and IPv6.
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use egress_tests::audit::{get_str, Match};
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::world::{CANARY_V4, CANARY_V6};

#[test]
fn udp_sendto_and_connected_send_are_denied() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label();
    let cases: [(&str, IpAddr, u16, &str, &str); 4] = [
        (
            "udp-sendto",
            IpAddr::V4(CANARY_V4),
            9,
            "sendmsg4",
            "sendmsg",
        ),
        (
            "udp-sendto",
            IpAddr::V6(CANARY_V6),
            9,
            "sendmsg6",
            "sendmsg",
        ),
        (
            "udp-connect-send",
            IpAddr::V4(CANARY_V4),
            53,
            "connect4",
            "connect",
        ),
        (
            "udp-connect-send",
            IpAddr::V6(CANARY_V6),
            53,
            "connect6",
            "connect",
        ),
    ];
    for (op, ip, port, hook, action) in cases {
        let p = fx.sandbox.probe(op, ip, port, &[])?;
        expect::eperm(&p)?;
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("deny", ip, port)
                .transport("udp")
                .hook(hook)
                .sandbox(name),
        )?;
        ensure!(
            get_str(&rec, "event.action") == Some(action),
            "{op}: event.action should be {action}: {rec}"
        );
    }
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

/// Positive control: a UDP allow rule delivers, so "the canary got nothing" above is not
/// an artefact of the topology.
#[test]
fn udp_allowed_by_rule_is_delivered() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(
        r#"version: 1
default: deny
rules:
  - name: canary-udp
    to: [203.0.113.66]
    ports: [9]
    protocol: udp
    action: allow
"#,
    )?;
    let p = fx.sandbox.probe(
        "udp-sendto",
        IpAddr::V4(CANARY_V4),
        9,
        &["--send", "udp-ok"],
    )?;
    expect::probe_ok(&p)?;
    let got = fx.canary.wait_for(Duration::from_secs(5), |e| {
        e.proto == "udp" && e.data == b"udp-ok"
    })?;
    ensure!(got.is_some(), "allowed datagram never arrived");
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(CANARY_V4), 9)
            .transport("udp")
            .rule("canary-udp"),
    )?;
    // Same address, other port: still denied.
    expect::eperm(
        &fx.sandbox
            .probe("udp-sendto", IpAddr::V4(CANARY_V4), 53, &[])?,
    )?;
    Ok(())
}
