//! IPv6, and IPv4-mapped IPv6: an AF_INET6 connect to `::ffff:a.b.c.d` runs the kernel's
//! connect6 hook, never connect4, so a daemon applying only its IPv6 rules there would
//! leak the IPv4 deny list.
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::net::IpAddr;

use anyhow::{ensure, Result};
use egress_tests::audit::{get_str, Match};
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::world::{CANARY_V4, CANARY_V6, ORIGIN_V4, ORIGIN_V6};

#[test]
fn ipv6_allowed_and_denied() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label();

    expect::origin_body(
        &fx.sandbox
            .curl(&["-6", &format!("http://[{ORIGIN_V6}]/")])?,
    )?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V6(ORIGIN_V6), 80)
            .hook("connect6")
            .sandbox(name)
            .rule("web-origin"),
    )?;

    let recs = expect::tcp_blocked(
        &fx.sandbox,
        name,
        &fx.daemon,
        &fx.canary,
        IpAddr::V6(CANARY_V6),
        9,
    )?;
    for r in &recs {
        ensure!(
            get_str(r, "egress.hook") == Some("connect6")
                && get_str(r, "network.type") == Some("ipv6"),
            "v6 deny record should come from connect6/ipv6: {r}"
        );
    }
    Ok(())
}

#[test]
fn ipv4_mapped_ipv6_is_denied() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label();
    let mapped = format!("::ffff:{CANARY_V4}");

    let p = fx.sandbox.probe_host("tcp-connect", &mapped, 9, &[])?;
    expect::eperm(&p)?;
    // Matching folds ::ffff:203.0.113.66 to 203.0.113.66, so either spelling counts.
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::V4(CANARY_V4), 9)
            .transport("tcp")
            .hook("connect6")
            .sandbox(name),
    )?;

    // The unconnected UDP path must not be a bypass either. (No hook is required here:
    // udpv6_sendmsg hands a v4-mapped destination to udp_sendmsg, so the kernel runs
    // sendmsg4 for it, unlike connect, which stays in connect6.)
    let p = fx.sandbox.probe_host("udp-sendto", &mapped, 9, &[])?;
    expect::eperm(&p)?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::V4(CANARY_V4), 9)
            .transport("udp")
            .sandbox(name),
    )?;
    // Connected UDP to a mapped address goes through connect6.
    let p = fx
        .sandbox
        .probe_host("udp-connect-send", &mapped, 53, &[])?;
    expect::eperm(&p)?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::V4(CANARY_V4), 53)
            .transport("udp")
            .sandbox(name),
    )?;
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

/// AYA-NOTES: connect6 must apply the IPv4 policy to v4-mapped destinations. Denying
/// every mapped address would be safe but wrong; the IPv4 allow rule must apply.
#[test]
fn ipv4_mapped_ipv6_follows_ipv4_rules() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let p = fx
        .sandbox
        .probe_host("tcp-connect", &format!("::ffff:{ORIGIN_V4}"), 80, &[])?;
    expect::probe_ok(&p)?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(ORIGIN_V4), 80)
            .hook("connect6")
            .sandbox(fx.sandbox.label())
            .rule("web-origin"),
    )?;
    Ok(())
}
