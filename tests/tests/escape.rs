//! Escape attempts from inside a sandbox: confinement follows the cgroup, so neither
//! daemonising away from the launching shell nor making a new network namespace helps,
//! a connection opened by TCP Fast Open (from `sendto`, with no `connect`) is judged
//! like any other, and the unspecified address (`0.0.0.0`, `::`), which the kernel
//! takes to loopback, is judged as loopback.
//! `harness.rs` shows both attempts succeed when no daemon is running.
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::net::IpAddr;

use anyhow::{ensure, Result};
use egress_tests::audit::{get_u64, Match};
use egress_tests::cgroup::cgroup2_mount;
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::sandbox::wait_probe_file;
use egress_tests::world::{CANARY_V4, CANARY_V6, ORIGIN_V4};

/// Session id of this test process (field 6 of /proc/self/stat).
fn own_sid() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let (_, rest) = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow::anyhow!("odd /proc/self/stat"))?;
    // rest: " S ppid pgrp session ..."
    Ok(rest
        .split_whitespace()
        .nth(3)
        .ok_or_else(|| anyhow::anyhow!("short /proc/self/stat"))?
        .parse()?)
}

#[test]
fn daemonised_grandchild_is_confined() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let out = fx.dir.path().join("grandchild.json");
    fx.sandbox
        .spawn_daemonised_probe(&out, "tcp-connect", &CANARY_V4.to_string(), 9)?;
    let p = wait_probe_file(&out)?;
    expect::eperm(&p)?;

    // It really was a detached grandchild still in the sandbox cgroup.
    let rel = fx.sandbox.cgroup().path().strip_prefix(cgroup2_mount()?)?;
    ensure!(
        p.raw["cgroup"][0].as_str() == Some(&format!("0::/{}", rel.display())),
        "grandchild not in the sandbox cgroup: {}",
        p.raw
    );
    // setsid put it in a session of its own, away from the test's.
    ensure!(
        p.raw["sid"].as_u64().is_some() && p.raw["sid"].as_u64() != Some(own_sid()?),
        "grandchild shares the test's session: {}",
        p.raw
    );

    let rec = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::V4(CANARY_V4), 9)
            .transport("tcp")
            .sandbox(fx.sandbox.label()),
    )?;
    ensure!(
        get_u64(&rec, "process.pid") == p.raw["pid"].as_u64(),
        "record pid should be the grandchild's ({}): {rec}",
        p.raw["pid"]
    );
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

#[test]
fn new_network_namespace_inside_sandbox_is_confined() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    // The target address lives on the new namespace's own lo with a listener: with no
    // hook this connect succeeds (harness self-test), without a route problem to blame.
    for (host, ip) in [
        (CANARY_V4.to_string(), IpAddr::V4(CANARY_V4)),
        (CANARY_V6.to_string(), IpAddr::V6(CANARY_V6)),
    ] {
        let p = fx.sandbox.probe_in_new_netns(&host, 9)?;
        expect::eperm(&p)?;
        ensure!(
            p.raw["listener_accepted"].as_bool() == Some(false),
            "the local listener accepted: {}",
            p.raw
        );
        fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("deny", ip, 9)
                .transport("tcp")
                .sandbox(fx.sandbox.label()),
        )?;
    }
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

#[test]
fn tcp_fast_open_from_sendto_is_judged_like_connect() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    // Positive control: the allowed origin, reached the same way, gets the data.
    let p = fx
        .sandbox
        .probe("tcp-fastopen", IpAddr::V4(ORIGIN_V4), 80, &[])?;
    expect::probe_ok(&p)?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(ORIGIN_V4), 80)
            .transport("tcp")
            .sandbox(fx.sandbox.label()),
    )?;
    // The SYN leaves from `sendto(MSG_FASTOPEN)`: IPv4, IPv6 and IPv4-mapped IPv6.
    for (host, ip) in [
        (CANARY_V4.to_string(), IpAddr::V4(CANARY_V4)),
        (CANARY_V6.to_string(), IpAddr::V6(CANARY_V6)),
        (format!("::ffff:{CANARY_V4}"), IpAddr::V4(CANARY_V4)),
    ] {
        let m = Match::decision("deny", ip, 9)
            .transport("tcp")
            .sandbox(fx.sandbox.label());
        let before = m.all(&fx.daemon.audit_records()?).len();
        let p = fx.sandbox.probe_host("tcp-fastopen", &host, 9, &[])?;
        expect::eperm(&p)?;
        expect::records(&fx.daemon, &m, before + 1)?;
    }
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

/// Loopback denied, everything else allowed.
const NO_LOOPBACK: &str = r#"version: 1
default: deny
rules:
  - name: no-loopback
    to: [127.0.0.0/8, "::1"]
    action: deny
  - name: anything-else
    to: [0.0.0.0/0, "::/0"]
    action: allow
"#;

#[test]
fn the_unspecified_address_is_judged_as_the_loopback_it_reaches() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(NO_LOOPBACK)?;
    // Positive control: an address the policy allows.
    expect::probe_ok(
        &fx.sandbox
            .probe("tcp-connect", IpAddr::V4(ORIGIN_V4), 80, &[])?,
    )?;
    // A listener on the sandbox's own loopback; without the hook each of these connects
    // reaches it (the kernel sends 0.0.0.0 and :: to loopback).
    for (op, host, ip) in [
        ("tcp-connect", "0.0.0.0", IpAddr::from([0u8; 4])),
        ("tcp-connect", "::", IpAddr::from([0u8; 16])),
        ("udp-sendto", "0.0.0.0", IpAddr::from([0u8; 4])),
    ] {
        let listen: &[&str] = if op == "tcp-connect" {
            &["--listen"]
        } else {
            &[]
        };
        let p = fx.sandbox.probe_host(op, host, 7777, listen)?;
        expect::eperm(&p)?;
        ensure!(
            p.raw["listener_accepted"].as_bool() != Some(true),
            "{op} {host}: the loopback listener accepted: {}",
            p.raw
        );
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("deny", ip, 7777).sandbox(fx.sandbox.label()),
        )?;
        ensure!(
            egress_tests::audit::get_str(&rec, "rule.name") == Some("no-loopback"),
            "{op} {host}: {rec}"
        );
    }
    Ok(())
}

/// Loopback allowed; the sandbox's own address (and everything else) refused.
const LOOPBACK_ONLY: &str = r#"version: 1
default: deny
rules:
  - name: loopback
    to: [127.0.0.0/8, "::1"]
    action: allow
"#;

#[test]
fn the_unspecified_address_from_a_chosen_source_is_refused() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(LOOPBACK_ONLY)?;
    let own = fx.sandbox.addrs().v4.to_string();
    let mapped_own = format!("::ffff:{own}");
    // Positive control: from an unbound socket, 0.0.0.0 reaches loopback, which is allowed.
    let p = fx
        .sandbox
        .probe_host("tcp-connect", "0.0.0.0", 7780, &["--listen"])?;
    expect::probe_ok(&p)?;
    ensure!(
        p.raw["listener_accepted"].as_bool() == Some(true),
        "{}",
        p.raw
    );
    // The sandbox's own address is refused by the policy when named...
    let p = fx
        .sandbox
        .probe_host("tcp-connect", &own, 7781, &["--listen"])?;
    expect::eperm(&p)?;
    // ...and the kernel takes 0.0.0.0 from a socket bound to it there, not to loopback:
    // refused, not judged as loopback; the listener on that address gets nothing.
    for (op, host, source, port) in [
        ("tcp-connect", "0.0.0.0", own.as_str(), 7782),
        ("tcp-connect", "::ffff:0.0.0.0", mapped_own.as_str(), 7783),
        // UDP's source may be chosen per message (IP_PKTINFO) or by IP_UNICAST_IF.
        ("udp-sendto", "0.0.0.0", own.as_str(), 7784),
        ("udp-connect-send", "0.0.0.0", own.as_str(), 7785),
    ] {
        let listen_on = if host.contains(':') {
            mapped_own.as_str()
        } else {
            own.as_str()
        };
        let mut extra = vec!["--source", source];
        if op == "tcp-connect" {
            extra.extend(["--listen-on", listen_on]);
        }
        let p = fx.sandbox.probe_host(op, host, port, &extra)?;
        expect::eperm(&p)?;
        ensure!(
            p.raw["listener_accepted"].as_bool() != Some(true),
            "{op} {host} from {source}: the listener on the sandbox's own address accepted: {}",
            p.raw
        );
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("deny", IpAddr::from([0u8; 4]), port).sandbox(fx.sandbox.label()),
        )?;
        ensure!(
            egress_tests::audit::get_str(&rec, "rule.name") == Some("unspecified-address"),
            "{op} {host}: {rec}"
        );
    }
    // 0.0.0.0 in the NAT64 prefix goes to the translator, never to loopback: refused
    // even from an unbound socket.
    let p = fx
        .sandbox
        .probe_host("tcp-connect", "64:ff9b::", 7786, &[])?;
    expect::eperm(&p)?;
    let rec = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        r["destination"]["port"] == 7786
            && egress_tests::audit::get_str(r, "rule.name") == Some("unspecified-address")
    })?;
    ensure!(egress_tests::audit::verdict(&rec) == Some("deny"), "{rec}");
    Ok(())
}

/// A sandbox cannot build an unbounded cgroup tree below its own (the daemon walks it for
/// the sandbox's processes, under its lock, each second): the attach bounds it to 12
/// levels and 1,024 cgroups, enforced by the kernel whoever creates them. Positive
/// control: a tree within the bounds is made.
#[test]
fn a_sandboxs_cgroup_tree_is_bounded() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let root = fx.sandbox.cgroup().path().to_path_buf();
    let read = |file: &str| std::fs::read_to_string(root.join(file)).map(|s| s.trim().to_owned());
    ensure!(
        read("cgroup.max.depth")? == "12" && read("cgroup.max.descendants")? == "1024",
        "bounds not set: depth {:?}, descendants {:?}",
        read("cgroup.max.depth"),
        read("cgroup.max.descendants")
    );
    // Made children are removed whatever happens, deepest first.
    struct Made(Vec<std::path::PathBuf>);
    impl Drop for Made {
        fn drop(&mut self) {
            for dir in self.0.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    let mut made = Made(Vec::new());
    let mut dir = root.clone();
    for level in 1..=13 {
        dir = dir.join(format!("l{level}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => made.0.push(dir.clone()),
            Err(e) => {
                ensure!(level == 13, "level {level} refused: {e}");
                break;
            }
        }
        ensure!(level < 13, "a 13th level below the sandbox was made");
    }
    // 12 made so far; up to 1,024 in all.
    let mut refused = None;
    for i in 0..1100 {
        let wide = root.join(format!("w{i}"));
        match std::fs::create_dir(&wide) {
            Ok(()) => made.0.push(wide),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = refused.ok_or_else(|| anyhow::anyhow!("1,108 cgroups made below the sandbox"))?;
    ensure!(
        made.0.len() == 1024,
        "{} cgroups made below the sandbox before the refusal at w{i} ({e})",
        made.0.len()
    );
    Ok(())
}
