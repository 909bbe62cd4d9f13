//! Assertions shared by the end-to-end tests, returning errors with context instead of
//! panicking (the harness library follows the workspace's no-panic lints).
//!
//! A block is proved three ways (TESTBED.md): the client sees the error, the audit log
//! holds the deny record, and the canary received nothing.

use std::net::IpAddr;
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use serde_json::Value;

use crate::audit::{summarize, Match};
use crate::daemon::Daemon;
use crate::sandbox::{Probe, Sandbox};
use crate::servers::{Canary, ORIGIN_BODY};

/// Bound on waiting for an audit record to appear.
pub const RECORD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the canary is given to notice a packet that should never have come.
pub const CANARY_SETTLE: Duration = Duration::from_millis(300);

/// curl's exit code for "Failed to connect" (what EPERM from connect() becomes).
pub const CURL_COULDNT_CONNECT: i32 = 7;

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// curl succeeded and printed the origin's body.
pub fn origin_body(out: &Output) -> Result<()> {
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == ORIGIN_BODY,
        "expected the origin body: {}",
        describe(out)
    );
    Ok(())
}

/// The command exited with `code`.
pub fn exit_code(out: &Output, code: i32) -> Result<()> {
    ensure!(
        out.status.code() == Some(code),
        "expected exit code {code}: {}",
        describe(out)
    );
    Ok(())
}

/// The probe failed with EPERM raised as `PermissionError`.
pub fn eperm(p: &Probe) -> Result<()> {
    ensure!(
        p.is_eperm(),
        "expected EPERM/PermissionError, got {}",
        p.raw
    );
    Ok(())
}

/// The probe succeeded.
pub fn probe_ok(p: &Probe) -> Result<()> {
    ensure!(p.ok, "expected success, got {}", p.raw);
    Ok(())
}

/// The canary has received nothing (checked after [`CANARY_SETTLE`]).
pub fn canary_silent(canary: &Canary) -> Result<()> {
    std::thread::sleep(CANARY_SETTLE);
    let got = canary.received()?;
    if !got.is_empty() {
        bail!("the canary received traffic that should have been blocked: {got:#?}");
    }
    Ok(())
}

/// Waits until at least `n` records match `m`; returns them.
pub fn records(daemon: &Daemon, m: &Match, n: usize) -> Result<Vec<Value>> {
    let mut last = Vec::new();
    let rounds = RECORD_TIMEOUT.as_millis() / 50;
    for _ in 0..rounds {
        let all = daemon.audit_records()?;
        last = m.all(&all).into_iter().cloned().collect::<Vec<_>>();
        if last.len() >= n {
            return Ok(last);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "expected {n} records matching {m:?}, found {}; all records:{}",
        last.len(),
        summarize(&daemon.audit_records().unwrap_or_default())
    )
}

/// Waits for a `policy-rejected` record for a sandbox `sandbox` accepts whose
/// `error.message` contains each of `words`.
pub fn policy_rejected(
    daemon: &Daemon,
    sandbox: impl Fn(&str) -> bool,
    words: &[&str],
) -> Result<Value> {
    let found = crate::util::poll(RECORD_TIMEOUT, Duration::from_millis(100), || {
        Ok(daemon.audit_records()?.into_iter().find(|r| {
            crate::audit::get_str(r, "event.action") == Some("policy-rejected")
                && crate::audit::get_str(r, "egress.sandbox.name").is_some_and(&sandbox)
                && crate::audit::get_str(r, "error.message")
                    .is_some_and(|m| words.iter().all(|w| m.contains(w)))
        }))
    })?;
    match found {
        Some(r) => Ok(r),
        None => {
            let all = daemon.audit_records().unwrap_or_default();
            let said: Vec<&str> = all
                .iter()
                .filter(|r| crate::audit::get_str(r, "event.action") == Some("policy-rejected"))
                .filter_map(|r| crate::audit::get_str(r, "error.message"))
                .collect();
            bail!(
                "no policy-rejected record saying {words:?}; those there say {said:#?}; all \
                 records:{}",
                summarize(&all)
            )
        }
    }
}

/// Full proof that TCP to `ip:port` is blocked for `sandbox`: curl exits 7, python's
/// connect raises PermissionError (EPERM), both attempts have deny records naming the
/// sandbox, and the canary saw nothing. Returns the deny records.
pub fn tcp_blocked(
    sandbox: &Sandbox,
    sandbox_name: &str,
    daemon: &Daemon,
    canary: &Canary,
    ip: IpAddr,
    port: u16,
) -> Result<Vec<Value>> {
    let url = match ip {
        IpAddr::V4(v4) => format!("http://{v4}:{port}/"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}/"),
    };
    let m = Match::decision("deny", ip, port)
        .transport("tcp")
        .sandbox(sandbox_name);
    let before = m.all(&daemon.audit_records()?).len();
    let out = sandbox.curl(&[&url])?;
    exit_code(&out, CURL_COULDNT_CONNECT)?;
    let p = sandbox.probe("tcp-connect", ip, port, &[])?;
    eperm(&p)?;
    let recs = records(daemon, &m, before + 2)?;
    canary_silent(canary)?;
    Ok(recs)
}

/// Finds `<path>:<line>:<column>` in `text`, where `<path>` is `path` as given or just its
/// file name. Returns (line, column, rest of that text line starting at the path).
pub fn find_location(text: &str, path: &std::path::Path) -> Option<(u32, u32, String)> {
    let full = path.display().to_string();
    let name = path.file_name()?.to_string_lossy().into_owned();
    for needle in [full.as_str(), name.as_str()] {
        for (start, _) in text.match_indices(needle) {
            let rest = &text[start + needle.len()..];
            let Some(rest) = rest.strip_prefix(':') else {
                continue;
            };
            let line_digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let Some(rest) = rest[line_digits.len()..].strip_prefix(':') else {
                continue;
            };
            let col_digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let (Ok(line), Ok(col)) = (line_digits.parse(), col_digits.parse()) else {
                continue;
            };
            let message = text[start..].lines().next().unwrap_or("").to_string();
            return Some((line, col, message));
        }
    }
    None
}

/// stdout and stderr of a command, concatenated, for message searches.
pub fn all_output(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_locations() {
        let p = std::path::Path::new("/tmp/x/bad.yaml");
        let t = "error: /tmp/x/bad.yaml:6:13: rules[0].ports[0]: bad range\nmore";
        assert_eq!(
            find_location(t, p),
            Some((
                6,
                13,
                "/tmp/x/bad.yaml:6:13: rules[0].ports[0]: bad range".into()
            ))
        );
        assert_eq!(
            find_location("in bad.yaml:2:1 oops", p).map(|l| (l.0, l.1)),
            Some((2, 1))
        );
        assert_eq!(find_location("bad.yaml: nope", p), None);
    }
}
