//! Policy validation through egressctl: a bad file is rejected whole with a
//! `file:line:column` message, and a running sandbox keeps its old policy.
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use egress_tests::expect::{self, all_output, find_location};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::world::{CANARY_V4, ORIGIN_V4};

/// `ports: ["9000-80"]` (a range running backwards) in rule 1; line 6, from column 12,
/// holds the bad value.
const BAD_RANGE: &str = r#"version: 1
default: deny
rules:
  - name: web-origin
    to: [192.0.2.10]
    ports: ["9000-80"]
    protocol: tcp
    action: allow
"#;
const BAD_VALUE_LINE: u32 = 6;

/// Checks that a failed command names the bad file with a location inside the bad rule;
/// returns the message from the location to the end of its line.
fn rejected_with_location(out: &std::process::Output, file: &Path, what: &str) -> Result<String> {
    ensure!(
        !out.status.success(),
        "{what} accepted a malformed policy: {out:?}"
    );
    let text = all_output(out);
    let (line, col, message) = find_location(&text, file)
        .with_context(|| format!("{what}: no {}:LINE:COLUMN in {text:?}", file.display()))?;
    ensure!(
        line == BAD_VALUE_LINE && col > 4,
        "{what}: location {line}:{col} should point at the bad value on line \
         {BAD_VALUE_LINE}: {message}"
    );
    ensure!(
        message.contains("ports"),
        "{what}: message should name the field `ports`: {message}"
    );
    eprintln!("{what}: {message}");
    Ok(message)
}

#[test]
fn malformed_policy_is_rejected_with_location() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    let bad = fx.policy("bad.yaml", BAD_RANGE)?;
    let good = fx.policy("good.yaml", WEB_ORIGIN_DENY)?;

    let out = fx.daemon.attach(&fx.sandbox, &bad, fx.sandbox.label())?;
    let attach_msg = rejected_with_location(&out, &bad, "attach")?;
    ensure!(
        fx.daemon.status_sandbox(fx.sandbox.label())?.is_none(),
        "a rejected attach left the sandbox listed"
    );

    let out = fx.daemon.ctl([
        std::ffi::OsStr::new("policy"),
        std::ffi::OsStr::new("check"),
        bad.as_os_str(),
    ])?;
    let check_msg = rejected_with_location(&out, &bad, "policy check")?;
    ensure!(
        attach_msg == check_msg,
        "attach and policy check disagree:\n  attach: {attach_msg}\n  check:  {check_msg}"
    );

    let out = fx.daemon.ctl([
        std::ffi::OsStr::new("policy"),
        std::ffi::OsStr::new("check"),
        good.as_os_str(),
    ])?;
    ensure!(
        out.status.success(),
        "policy check rejected a good policy: {out:?}"
    );
    Ok(())
}

#[test]
fn bad_replacement_keeps_old_policy() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    let name = fx.sandbox.label();
    fx.attach(WEB_ORIGIN_DENY)?;
    let origin_url = format!("http://{ORIGIN_V4}/");
    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    let before = fx
        .daemon
        .status_sandbox(name)?
        .context("sandbox missing from status")?;

    let bad = fx.policy("bad.yaml", BAD_RANGE)?;
    let out = fx.daemon.attach(&fx.sandbox, &bad, name)?;
    rejected_with_location(&out, &bad, "replacement attach")?;

    let after = fx
        .daemon
        .status_sandbox(name)?
        .context("sandbox vanished after a rejected replacement")?;
    ensure!(
        before.get("policy") == after.get("policy"),
        "policy changed after a rejected replacement: {before} -> {after}"
    );
    // Old policy still in force: the origin is allowed, the canary denied.
    expect::origin_body(&fx.sandbox.curl(&[&origin_url])?)?;
    expect::tcp_blocked(
        &fx.sandbox,
        name,
        &fx.daemon,
        &fx.canary,
        IpAddr::V4(CANARY_V4),
        9,
    )?;
    Ok(())
}
