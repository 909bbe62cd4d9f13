//! Nothing is silently lost: when the ring buffer fills while egressd is away, the kernel
//! counts the events it could not reserve, and the daemon reports them in an
//! `events-lost` record once it is back, naming the sandbox whose events they were; the
//! decisions themselves never depended on delivery (every connect is still denied).
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::time::Duration;

use anyhow::{ensure, Result};
use egress_tests::audit::{get_u64, summarize};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::world::CANARY_V4;

/// More connects than the 4 MiB ring buffer holds (104-byte events plus 8-byte headers).
const CONNECTS: usize = 60_000;

/// How many of the daemon's audit records `keep` keeps.
fn count_records(fx: &Fixture, keep: impl Fn(&serde_json::Value) -> bool) -> Result<usize> {
    Ok(fx
        .daemon
        .audit_records()?
        .iter()
        .filter(|r| keep(r))
        .count())
}

#[test]
fn ring_buffer_overflow_is_reported_not_silent() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;

    // The daemon is gone: nothing drains the pinned ring buffer.
    fx.daemon.kill9()?;
    let denied = fx
        .sandbox
        .refused_connects(&CANARY_V4.to_string(), 9, CONNECTS)?;
    ensure!(
        denied == CONNECTS,
        "every connect must be denied whether or not its event fits: {denied} of {CONNECTS}"
    );
    ensure!(
        fx.canary.received()?.is_empty(),
        "the canary received traffic"
    );

    fx.daemon.restart()?;
    let lost = fx.daemon.wait_for_record(Duration::from_secs(20), |r| {
        egress_tests::audit::action(r) == Some("events-lost")
    })?;
    let count = get_u64(&lost, "egress.lost.count").unwrap_or(0);
    let total = get_u64(&lost, "egress.lost.total").unwrap_or(0);
    let delivered = count_records(&fx, |r| egress_tests::audit::verdict(r) == Some("deny"))?;
    ensure!(
        count > 0 && total >= count,
        "events-lost record without a count: {lost}"
    );
    // And whose they were: all this sandbox's.
    let by_sandbox = lost["egress"]["lost"]["sandboxes"].as_array();
    ensure!(
        by_sandbox.is_some_and(|list| list.len() == 1
            && list[0]["name"].as_str() == Some(fx.sandbox.label())
            && list[0]["count"].as_u64() == Some(count)),
        "events-lost record does not name the sandbox and its count: {lost}"
    );
    // Every connect is accounted for: delivered as a record, or counted as lost. The
    // events read back from the ring may still be on their way to the log.
    let delivered =
        egress_tests::util::poll(Duration::from_secs(20), Duration::from_millis(200), || {
            let n = count_records(&fx, |r| egress_tests::audit::verdict(r) == Some("deny"))?;
            Ok((n as u64 + total >= CONNECTS as u64).then_some(n))
        })?
        .unwrap_or(delivered);
    ensure!(
        delivered as u64 + total >= CONNECTS as u64,
        "{delivered} delivered + {total} lost < {CONNECTS} decisions\n{}",
        summarize(&fx.daemon.audit_records()?)
    );
    Ok(())
}

/// UDP to the origin's port 9 allowed, everything else denied.
const UDP_ALLOWED: &str = r#"version: 1
default: deny
rules:
  - name: origin-udp
    to: [192.0.2.10]
    ports: [9]
    protocol: udp
    action: allow
"#;

/// Allowed UDP connects that fill the ring buffer (each one event, no packet sent).
const FILLERS: usize = 45_000;
/// Calls made once it is full: none of them can be recorded one by one.
const HIDDEN: usize = 100;

/// In the sandbox, while the daemon is stopped: `FILLERS` allowed UDP connects, then
/// `HIDDEN` more calls, TCP connects to the canary (denied) or allowed UDP connects.
fn fill_the_ring_then(fx: &Fixture, denials: bool) -> Result<()> {
    let last = if denials {
        format!(
            "for _ in range({HIDDEN}):\n\
             \x20   s = socket.socket()\n\
             \x20   try:\n\
             \x20       s.connect(('{CANARY_V4}', 9))\n\
             \x20   except PermissionError:\n\
             \x20       n += 1\n\
             \x20   finally:\n\
             \x20       s.close()\n"
        )
    } else {
        format!(
            "for _ in range({HIDDEN}):\n\
             \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             \x20   s.connect(('192.0.2.10', 9))\n\
             \x20   n += 1\n\
             \x20   s.close()\n"
        )
    };
    let script = format!(
        "import socket\n\
         n = 0\n\
         for _ in range({FILLERS}):\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.connect(('192.0.2.10', 9))\n\
         \x20   s.close()\n\
         {last}\
         print(n)\n"
    );
    fx.daemon.set_paused(true)?;
    let out = fx.sandbox.run("python3", &["-c", &script]);
    fx.daemon.set_paused(false)?;
    let out = out?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.trim() == HIDDEN.to_string(),
        "{HIDDEN} calls {}: {stdout:?} {}",
        if denials { "refused" } else { "allowed" },
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A sandbox that fills the ring buffer cannot hide its denials from the denial burst:
/// the denials lost count toward it. Allowed calls lost do not (a sandbox must not be
/// quarantined for a flood, its own or another's).
#[test]
fn denials_lost_in_a_full_ring_still_make_a_burst() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(UDP_ALLOWED)?;

    // Only allowed calls lost: counted in events-lost, no burst.
    fill_the_ring_then(&fx, false)?;
    fx.daemon.wait_for_record(Duration::from_secs(20), |r| {
        egress_tests::audit::action(r) == Some("events-lost")
    })?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        count_records(&fx, |r| egress_tests::audit::action(r)
            == Some("denial-burst"))?
            == 0,
        "lost allowed calls made a denial burst\n{}",
        summarize(&fx.daemon.audit_records()?)
    );
    // Denials lost: a burst, though not one of them was recorded one by one.
    fill_the_ring_then(&fx, true)?;
    let burst = fx.daemon.wait_for_record(Duration::from_secs(20), |r| {
        egress_tests::audit::action(r) == Some("denial-burst")
    })?;
    ensure!(
        egress_tests::audit::get_str(&burst, "egress.sandbox.name") == Some(fx.sandbox.label())
            && egress_tests::audit::get_str(&burst, "event.reason")
                .is_some_and(|r| r.contains("could not be recorded")),
        "{burst}"
    );
    let delivered = count_records(&fx, |r| egress_tests::audit::verdict(r) == Some("deny"))?;
    ensure!(
        delivered < 50,
        "{delivered} denials delivered: the ring was not full\n{}",
        summarize(&fx.daemon.audit_records()?)
    );
    ensure!(
        fx.canary.received()?.is_empty(),
        "the canary received traffic"
    );
    Ok(())
}
