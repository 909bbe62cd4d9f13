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

/// A NAT64 address (`64:ff9b::a.b.c.d`) reaches `a.b.c.d` through a translator: it is
/// judged by the IPv4 rules, so an IPv4 `deny` holds even where IPv6 is allowed broadly.
#[test]
fn nat64_addresses_follow_ipv4_rules() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(&format!(
        r#"version: 1
default: deny
rules:
  - name: any-v6
    to: ["::/0"]
    action: allow
  - name: canary
    to: [{CANARY_V4}]
    action: deny
  - name: web-origin
    to: [{ORIGIN_V4}]
    ports: [80]
    action: allow
"#
    ))?;
    let name = fx.sandbox.label();
    // 64:ff9b::a.b.c.d
    let nat64 = |v4: std::net::Ipv4Addr| {
        std::net::Ipv6Addr::from((0x64_ff9b_u128 << 96) | u128::from(u32::from(v4)))
    };
    let p = fx
        .sandbox
        .probe_host("tcp-connect", &nat64(CANARY_V4).to_string(), 9, &[])?;
    expect::eperm(&p)?;
    // The record names the address the client wrote, and the IPv4 rule that judged it.
    let rec = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::V6(nat64(CANARY_V4)), 9)
            .hook("connect6")
            .sandbox(name),
    )?;
    ensure!(get_str(&rec, "rule.name") == Some("canary"), "{rec}");
    // Positive control: the IPv4 allow rule applies the same way (the kernel lets the
    // connect go; this test bed has no translator to carry it).
    let p = fx
        .sandbox
        .probe_host("tcp-connect", &nat64(ORIGIN_V4).to_string(), 80, &[])?;
    ensure!(
        !p.is_eperm(),
        "NAT64 of the allowed origin refused: {}",
        p.raw
    );
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V6(nat64(ORIGIN_V4)), 80)
            .hook("connect6")
            .sandbox(name)
            .rule("web-origin"),
    )?;
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

/// `connect(::)` goes to `::ffff:127.0.0.1` from a socket bound to an IPv4-mapped address
/// (to `::1` from others): it is judged as where it goes, so an IPv6-only loopback rule
/// does not let it reach IPv4 loopback.
#[test]
fn unspecified_ipv6_is_judged_as_where_the_kernel_takes_it() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(
        r#"version: 1
default: deny
rules:
  - name: v6-loopback
    to: ["::1"]
    action: allow
"#,
    )?;
    let script = r#"
import json, socket
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 7781))
listener.listen(4)
out = {}
for case, bind in [("mapped", ("::ffff:127.0.0.1", 0)), ("plain", None)]:
    s = socket.socket(socket.AF_INET6)
    if bind:
        s.bind(bind)
    try:
        s.connect(("::", 7781))
        out[case] = "ok"
    except OSError as e:
        out[case] = e.__class__.__name__ + ":" + str(e.errno)
listener.setblocking(False)
accepted = 0
try:
    while True:
        listener.accept()
        accepted += 1
except BlockingIOError:
    pass
out["accepted"] = accepted
print(json.dumps(out))
"#;
    let python = egress_tests::util::python().display().to_string();
    let out = fx.sandbox.run(&python, &["-c", script])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))?;
    // Bound to a mapped address: to 127.0.0.1, which the policy does not allow.
    ensure!(
        v["mapped"]
            .as_str()
            .is_some_and(|r| r.starts_with("PermissionError")),
        "connect(::) from a mapped-bound socket: {v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The record names the address the client wrote.
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 7781)
            .hook("connect6")
            .sandbox(fx.sandbox.label()),
    )?;
    // Nothing reached the IPv4 loopback listener.
    ensure!(
        v["accepted"] == 0,
        "the IPv4 loopback listener accepted: {v}"
    );
    // Positive control: from an unbound socket it is ::1, which the policy allows (no
    // listener there: refused by the peer, not by the policy).
    ensure!(
        v["plain"]
            .as_str()
            .is_some_and(|r| !r.starts_with("PermissionError")),
        "connect(::) from an unbound socket: {v}"
    );
    Ok(())
}
