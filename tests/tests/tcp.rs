//! IPv4 TCP: an allowed connect reaches the origin, a denied one is stopped in the kernel.
//!
//! Needs root, cgroup v2 and bpffs (skipped with a message otherwise) and the egressd /
//! egressctl binaries (`cargo build -p agent-userspace`).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get, get_str, get_u64, Match};
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::util::poll;
use egress_tests::world::{CANARY_V4, ORIGIN_V4};

#[test]
fn allowed_tcp_connect_succeeds() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label();

    expect::origin_body(&fx.sandbox.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;

    let rec = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(ORIGIN_V4), 80)
            .transport("tcp")
            .hook("connect4")
            .sandbox(name)
            .rule("web-origin"),
    )?;
    ensure!(
        get_str(&rec, "event.outcome") == Some("success"),
        "allow record outcome: {rec}"
    );
    fx.daemon
        .wait_for_match(RECORD_TIMEOUT, &Match::lifecycle("sandbox-attach"))?;

    let entry = fx
        .daemon
        .status_sandbox(name)?
        .context("attached sandbox missing from status")?;
    ensure!(
        get_u64(&entry, "cgroup_id") == Some(fx.sandbox.cgroup().id()),
        "status cgroup_id {entry} != {}",
        fx.sandbox.cgroup().id()
    );
    // Counters are fed from the kernel's events; give them a moment.
    let counted = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let e = fx.daemon.status_sandbox(name)?;
        Ok(e.filter(|e| get_u64(e, "allowed").unwrap_or(0) >= 1))
    })?;
    ensure!(
        counted.is_some(),
        "status never counted the allowed connect"
    );
    Ok(())
}

#[test]
fn denied_tcp_connect_is_blocked() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label();
    let canary = IpAddr::V4(CANARY_V4);

    // curl exit 7 + python PermissionError + deny records + silent canary.
    let recs = expect::tcp_blocked(&fx.sandbox, name, &fx.daemon, &fx.canary, canary, 9)?;
    // A denied port that the canary also listens on, and a port nothing allows.
    expect::tcp_blocked(&fx.sandbox, name, &fx.daemon, &fx.canary, canary, 80)?;
    // The allowed rule is port-specific: the origin on another port is denied too.
    expect::exit_code(
        &fx.sandbox.curl(&[&format!("http://{ORIGIN_V4}:443/")])?,
        expect::CURL_COULDNT_CONNECT,
    )?;

    // The record carries the contract's fields.
    let rec = recs
        .iter()
        .find(|r| get_str(r, "process.name") == Some("curl"))
        .with_context(|| format!("no deny record from curl: {recs:#?}"))?;
    let checks: [(&str, Option<&str>); 6] = [
        ("event.outcome", Some("failure")),
        ("event.action", Some("connect")),
        ("egress.hook", Some("connect4")),
        ("network.type", Some("ipv4")),
        ("rule.name", Some("default")),
        ("user.id", Some("0")),
    ];
    for (path, want) in checks {
        ensure!(
            get_str(rec, path) == want,
            "{path} should be {want:?} in {rec}"
        );
    }
    ensure!(
        get_u64(rec, "egress.sandbox.cgroup_id") == Some(fx.sandbox.cgroup().id()),
        "cgroup_id in {rec}"
    );
    ensure!(
        get_u64(rec, "process.pid").is_some_and(|p| p > 0),
        "pid in {rec}"
    );
    ensure!(get_str(rec, "@timestamp").is_some(), "@timestamp in {rec}");
    ensure!(
        get_u64(rec, "event.sequence").is_some(),
        "event.sequence in {rec}"
    );
    ensure!(
        get(rec, "event.category")
            .and_then(|c| c.as_array())
            .is_some_and(|c| c.iter().any(|v| v == "network")),
        "event.category in {rec}"
    );

    let counted = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let e = fx.daemon.status_sandbox(name)?;
        Ok(e.filter(|e| get_u64(e, "denied").unwrap_or(0) >= 4))
    })?;
    ensure!(
        counted.is_some(),
        "status never counted the denies: {}",
        fx.daemon.status_json()?
    );
    Ok(())
}
