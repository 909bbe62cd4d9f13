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

#[test]
fn ring_buffer_overflow_is_reported_not_silent() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;

    // The daemon is gone: nothing drains the pinned ring buffer.
    fx.daemon.kill9()?;
    let script = format!(
        "import socket, errno\n\
         denied = 0\n\
         for _ in range({CONNECTS}):\n\
         \x20   s = socket.socket()\n\
         \x20   try:\n\
         \x20       s.connect(('{CANARY_V4}', 9))\n\
         \x20   except PermissionError:\n\
         \x20       denied += 1\n\
         \x20   finally:\n\
         \x20       s.close()\n\
         print(denied)\n"
    );
    let out = fx.sandbox.run("python3", &["-c", &script])?;
    let denied: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    ensure!(
        denied == CONNECTS,
        "every connect must be denied whether or not its event fits: {denied} of {CONNECTS} \
         ({})",
        String::from_utf8_lossy(&out.stderr)
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
    let delivered = fx
        .daemon
        .audit_records()?
        .iter()
        .filter(|r| egress_tests::audit::verdict(r) == Some("deny"))
        .count();
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
    // Every connect is accounted for: delivered as a record, or counted as lost.
    ensure!(
        delivered as u64 + total >= CONNECTS as u64,
        "{delivered} delivered + {total} lost < {CONNECTS} decisions\n{}",
        summarize(&fx.daemon.audit_records()?)
    );
    Ok(())
}
