//! A clean stop: SIGTERM ends egressd promptly even after it served proxied requests
//! (listeners in sandbox namespaces are closed), the audit log ends with `daemon-stop`,
//! and the sandbox stays confined by its pinned programs.
//!
//! Needs root, cgroup v2, bpffs, the egressd binaries and the proxy tools; skips otherwise.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::action;
use egress_tests::expect;
use egress_tests::proxy_fixture::{ProxyFixture, ProxyOpts};
use egress_tests::require_proxy_tools;
use egress_tests::world::CANARY_V4;

#[test]
fn sigterm_stops_promptly_and_confinement_stays() -> Result<()> {
    require_proxy_tools!();
    let mut fx = ProxyFixture::new(ProxyOpts::default())?;
    let out = fx.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "https://api.github.com/repos/acme/widgets",
    ])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "200",
        "proxied request failed: {out:?}"
    );

    let took = fx.daemon.terminate(Duration::from_secs(4))?;
    ensure!(
        took < Duration::from_secs(4),
        "egressd took {took:?} to stop"
    );
    let records = fx.daemon.audit_records()?;
    ensure!(
        records.last().and_then(action) == Some("daemon-stop"),
        "the audit log does not end with daemon-stop: {:?}",
        records.last()
    );
    expect::eperm(
        &fx.sandbox
            .probe("tcp-connect", IpAddr::V4(CANARY_V4), 9, &[])?,
    )?;
    expect::canary_silent(&fx.canary)?;

    // The stop counts as clean (its last records were written before it said so): the
    // next start reports no gap.
    fx.daemon.restart()?;
    let starts =
        egress_tests::util::poll(Duration::from_secs(10), Duration::from_millis(100), || {
            let starts: Vec<_> = fx
                .daemon
                .audit_records()?
                .into_iter()
                .filter(|r| action(r) == Some("daemon-start"))
                .collect();
            Ok((starts.len() >= 2).then_some(starts))
        })?
        .context("no daemon-start record after the restart")?;
    let again = &starts[starts.len() - 1];
    ensure!(
        again["egress"]
            .get("gap")
            .is_none_or(serde_json::Value::is_null),
        "a clean stop was reported as a gap: {again}"
    );
    Ok(())
}
