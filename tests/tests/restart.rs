//! egressd killed with SIGKILL: the pinned programs keep enforcing with no daemon, and a
//! restarted daemon re-adopts the sandbox, reports the gap, and drains the decisions the
//! kernel recorded while it was down.
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get, get_u64, summarize, Match};
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::util::poll;
use egress_tests::world::{CANARY_V4, ORIGIN_V4};

#[test]
fn sigkill_keeps_enforcing_and_restart_readopts() -> Result<()> {
    require_root!();
    let mut fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label().to_string();
    let canary = IpAddr::V4(CANARY_V4);
    let origin = IpAddr::V4(ORIGIN_V4);
    let origin_url = format!("http://{ORIGIN_V4}/");

    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    expect::tcp_blocked(&fx.sandbox, &name, &fx.daemon, &fx.canary, canary, 9)?;
    let allow = Match::decision("allow", origin, 80).sandbox(&name);
    let allows_before = expect::records(&fx.daemon, &allow, 1)?.len();

    fx.daemon.kill9()?;
    ensure!(!fx.daemon.is_running(), "egressd survived SIGKILL");

    // No daemon: denies hold, allows still allowed. Distinct ports mark these attempts.
    expect::exit_code(
        &fx.sandbox.curl(&[&format!("http://{CANARY_V4}:443/")])?,
        expect::CURL_COULDNT_CONNECT,
    )?;
    expect::eperm(&fx.sandbox.probe("tcp-connect", canary, 443, &[])?)?;
    expect::eperm(&fx.sandbox.probe("udp-sendto", canary, 53, &[])?)?;
    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    expect::canary_silent(&fx.canary)?;

    fx.daemon.restart()?;

    let entry = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        fx.daemon.status_sandbox(&name)
    })?
    .context("restarted daemon does not list the sandbox")?;
    ensure!(
        get_u64(&entry, "cgroup_id") == Some(fx.sandbox.cgroup().id()),
        "re-adopted entry has the wrong cgroup: {entry}"
    );
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::lifecycle("sandbox-adopt").sandbox(&name),
    )?;
    let start = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        Match::lifecycle("daemon-start").matches(r)
            && get(r, "egress.gap").is_some_and(|g| !g.is_null())
    })?;
    eprintln!("daemon-start after SIGKILL: {start}");

    // Decisions taken while the daemon was down, drained from the pinned ring buffer.
    let down_deny = Match::decision("deny", canary, 443)
        .transport("tcp")
        .sandbox(&name);
    expect::records(&fx.daemon, &down_deny, 2)?;
    expect::records(
        &fx.daemon,
        &Match::decision("deny", canary, 53)
            .transport("udp")
            .sandbox(&name),
        1,
    )?;
    expect::records(&fx.daemon, &allow, allows_before + 1).with_context(|| {
        format!(
            "the allowed connect made while down is missing:{}",
            summarize(&fx.daemon.audit_records().unwrap_or_default())
        )
    })?;

    // And it keeps enforcing and recording after the restart.
    expect::tcp_blocked(&fx.sandbox, &name, &fx.daemon, &fx.canary, canary, 80)?;
    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    Ok(())
}
