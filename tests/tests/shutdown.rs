//! A clean stop: SIGTERM ends egressd promptly even after it served proxied requests
//! (listeners in sandbox namespaces are closed), the audit log ends with `daemon-stop`,
//! and the sandbox stays confined by its pinned programs.
//!
//! Needs root, cgroup v2, bpffs, the egressd binaries and the proxy tools; skips otherwise.

use std::io::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{action, get_str};
use egress_tests::expect;
use egress_tests::proxy_fixture::{ProxyFixture, ProxyOpts};
use egress_tests::require_proxy_tools;
use egress_tests::util::TempDir;
use egress_tests::world::CANARY_V4;

#[test]
fn sigterm_stops_promptly_and_confinement_stays() -> Result<()> {
    require_proxy_tools!();
    let mut fx = ProxyFixture::new(ProxyOpts::default())?;
    proxied_request_ok(&fx)?;

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
    restart_reports_no_gap(&mut fx)?;
    Ok(())
}

/// A proxied request still in flight when the daemon stops is not served past the stop:
/// SIGTERM closes it (its client sees the connection end), records it as closed by the
/// daemon before `daemon-stop`, and the daemon still stops promptly and cleanly.
#[test]
fn sigterm_closes_proxied_connections_and_records_them_before_the_stop() -> Result<()> {
    require_proxy_tools!();
    let mut fx = ProxyFixture::new(ProxyOpts::default())?;
    let mut client = fx
        .sandbox
        .tls_session("192.0.2.10:443", "api.github.com", &["-quiet"])?;
    // A request whose body never comes whole (the origin waits for all of it before it
    // answers): in flight at the stop.
    let mut stdin = client.stdin.take().context("no stdin")?;
    stdin.write_all(
        b"GET /repos/acme/widgets/echo/held HTTP/1.1\r\nHost: api.github.com\r\n\
          Content-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\npartial",
    )?;
    stdin.flush()?;
    // The handshake and the request head take a moment to reach the handler.
    std::thread::sleep(Duration::from_secs(1));

    let took = fx.daemon.terminate(Duration::from_secs(4))?;
    ensure!(
        took < Duration::from_secs(4),
        "egressd took {took:?} to stop"
    );
    // The client's connection ends with the stop (its output ends).
    let mut rest = Vec::new();
    let mut stdout = client.stdout.take().context("no stdout")?;
    std::io::Read::read_to_end(&mut stdout, &mut rest)?;
    drop(stdin);
    let _ = client.kill();
    let _ = client.wait();
    let records = fx.daemon.audit_records()?;
    let stop = records
        .iter()
        .position(|r| action(r) == Some("daemon-stop"))
        .context("no daemon-stop record")?;
    ensure!(stop == records.len() - 1, "records after daemon-stop");
    ensure!(
        records[..stop].iter().any(|r| {
            get_str(r, "url.path") == Some("/repos/acme/widgets/echo/held")
                && get_str(r, "event.reason").is_some_and(|m| m.contains("closed by the daemon"))
        }),
        "no record of the request closed by the daemon before daemon-stop: {:#?}",
        &records[..stop]
    );
    // A clean stop: the next start reports no gap.
    restart_reports_no_gap(&mut fx)?;
    Ok(())
}

/// A credential revocation still under way at SIGTERM (its command has not returned) is
/// stopped and recorded before `daemon-stop`, as not revoked: the quarantine said it was
/// revoking, so the trail says what became of it.
#[test]
fn sigterm_records_a_revocation_under_way_before_the_stop() -> Result<()> {
    require_proxy_tools!();
    let dir = TempDir::new("revoke")?;
    let started = dir.path().join("started");
    let script = dir.write(
        "revoke.sh",
        &format!(
            "#!/bin/sh\ncat > /dev/null\ntouch '{}'\nexec sleep 60\n",
            started.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let mut fx = ProxyFixture::new(ProxyOpts {
        github_revoke: Some(vec![script.display().to_string()]),
        ..ProxyOpts::default()
    })?;
    let name = fx.sandbox.label().to_string();
    // The credential is used, so it has a live value to revoke.
    proxied_request_ok(&fx)?;
    let out = fx
        .daemon
        .ctl(["quarantine", &name, "--reason", "test: stop mid-revocation"])?;
    ensure!(out.status.success(), "quarantine: {out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !started.exists() {
        ensure!(
            std::time::Instant::now() < deadline,
            "the revoke command did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let took = fx.daemon.terminate(Duration::from_secs(20))?;
    ensure!(
        took < Duration::from_secs(15),
        "egressd took {took:?} to stop"
    );
    let records = fx.daemon.audit_records()?;
    let stop = records
        .iter()
        .position(|r| action(r) == Some("daemon-stop"))
        .context("no daemon-stop record")?;
    ensure!(
        stop == records.len() - 1,
        "records after daemon-stop: {:#?}",
        &records[stop..]
    );
    let revokes: Vec<_> = records[..stop]
        .iter()
        .filter(|r| action(r) == Some("credential-revoke"))
        .collect();
    ensure!(
        revokes.len() == 1
            && get_str(revokes[0], "egress.credential.name") == Some("github")
            && get_str(revokes[0], "event.outcome") == Some("failure")
            && get_str(revokes[0], "event.reason")
                .is_some_and(|r| r.contains("daemon stopped before the revocation finished")),
        "no record of the revocation cut short, before daemon-stop: {revokes:#?}"
    );
    Ok(())
}

/// A request through the proxy from the sandbox, with the credential injected, answers 200.
fn proxied_request_ok(fx: &ProxyFixture) -> Result<()> {
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
    Ok(())
}

/// Starts the daemon again and checks that its `daemon-start` record reports no gap: the
/// stop before it was clean.
fn restart_reports_no_gap(fx: &mut ProxyFixture) -> Result<()> {
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
