//! A human-readable, filtered view of the audit log, for `egressctl audit show|follow`
//! (in the spirit of `hubble observe`): one line per record with time, sandbox, verdict,
//! action, what it was about (address, name or URL), rule and reason.
//!
//! It reads the JSONL file directly, so it works whether or not the daemon runs, and
//! [`Follower`] keeps reading across rotations: a new file at the path (logrotate's
//! `create`, or the daemon's own rotation) or a truncated one (`copytruncate`).
//! Lines are taken as JSON values, not as the daemon's record types, so a view built
//! from an older or newer release still shows what it can.

mod follow;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::Value;

use crate::audit::{action, AlertKind};
use time::{format_description::well_known::Rfc3339, Duration, OffsetDateTime};

pub use follow::{Follower, Start};

/// Which records to show. Every set condition must hold.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `egress.sandbox.name`, exactly.
    pub sandbox: Option<String>,
    /// `egress.verdict`: `allow`, `deny`, `audit` or `redirect`.
    pub verdict: Option<String>,
    /// `event.action` (`connect`, `dns-query`, `http-request`, `secret-outbound`, ...),
    /// `event.kind` (`alert`), or a group of [`KIND_GROUPS`]; checked by [`parse_kind`].
    pub kind: Option<String>,
    /// Records at or after this time.
    pub since: Option<OffsetDateTime>,
}

/// Why a filter argument was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error(
        "--since {0:?}: expected an RFC 3339 time (2026-11-21T22:03:04Z) or a duration back \
         from now (30s, 10m, 2h, 1d)"
    )]
    Since(String),
    #[error("--verdict {0:?}: expected allow, deny, audit or redirect")]
    Verdict(String),
    #[error(
        "--kind {0:?}: expected an event.action ({actions}), `alert`, or a group ({groups})",
        actions = known_actions().collect::<Vec<_>>().join(", "),
        groups = KIND_GROUPS.iter().map(|(g, _)| *g).collect::<Vec<_>>().join(", ")
    )]
    Kind(String),
}

/// The `--kind` groups and the actions each stands for.
pub const KIND_GROUPS: [(&str, &[&str]); 6] = [
    // Every decision of a kernel program, and the connections a new policy cut.
    (
        "network",
        &[
            action::CONNECT,
            action::SENDMSG,
            action::SOCKET,
            action::SETSOCKOPT,
            action::PACKET,
            action::BIND,
            action::SYSCTL,
            action::CONNECTION_CUT,
        ],
    ),
    ("dns", &[action::DNS_QUERY]),
    ("http", &[action::HTTP_REQUEST]),
    ("proxy", &[action::HTTP_REQUEST, action::TLS_CONNECTION]),
    (
        "lifecycle",
        &[
            action::DAEMON_START,
            action::DAEMON_STOP,
            action::SANDBOX_ATTACH,
            action::SANDBOX_DETACH,
            action::SANDBOX_ADOPT,
            action::SANDBOX_QUARANTINE,
            action::SANDBOX_RELEASE,
            action::CREDENTIAL_REVOKE,
        ],
    ),
    ("policy", &[action::POLICY_CHANGE, action::POLICY_REJECTED]),
];

fn known_actions() -> impl Iterator<Item = &'static str> {
    action::ALL
        .into_iter()
        .chain(AlertKind::ALL.into_iter().map(AlertKind::as_str))
}

/// Checks `--kind`: a filter that can match nothing is a typo, not an empty log.
pub fn parse_kind(s: &str) -> Result<String, FilterError> {
    let known =
        s == "alert" || KIND_GROUPS.iter().any(|(g, _)| *g == s) || known_actions().any(|a| a == s);
    if known {
        Ok(s.to_owned())
    } else {
        Err(FilterError::Kind(s.to_owned()))
    }
}

/// Parses `--since`: an RFC 3339 time, or a duration back from `now` such as `10m`.
pub fn parse_since(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, FilterError> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let err = || FilterError::Since(s.to_owned());
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| err())?;
    let unit_secs: i64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(err()),
    };
    // Further back than a date can be written: everything.
    let earliest = || time::macros::datetime!(0000-01-01 00:00 UTC);
    Ok(n.checked_mul(unit_secs)
        .and_then(|secs| now.checked_sub(Duration::seconds(secs)))
        .unwrap_or_else(earliest))
}

/// Checks `--verdict`.
pub fn parse_verdict(s: &str) -> Result<String, FilterError> {
    let v = s.to_ascii_lowercase();
    if ["allow", "deny", "audit", "redirect"].contains(&v.as_str()) {
        Ok(v)
    } else {
        Err(FilterError::Verdict(s.to_owned()))
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// Whether `action`/`kind` belong to the `--kind` asked for.
fn kind_matches(want: &str, action: &str, kind: &str) -> bool {
    want == action
        || want == kind
        || KIND_GROUPS
            .iter()
            .any(|(group, actions)| *group == want && actions.contains(&action))
}

impl Filter {
    /// Whether the record passes. A line that is not a JSON object never does.
    pub fn matches(&self, record: &Value) -> bool {
        if !record.is_object() {
            return false;
        }
        if let Some(want) = &self.sandbox {
            if str_at(record, &["egress", "sandbox", "name"]) != Some(want.as_str()) {
                return false;
            }
        }
        if let Some(want) = &self.verdict {
            if str_at(record, &["egress", "verdict"]) != Some(want.as_str()) {
                return false;
            }
        }
        if let Some(want) = &self.kind {
            let action = str_at(record, &["event", "action"]).unwrap_or("");
            let kind = str_at(record, &["event", "kind"]).unwrap_or("");
            if !kind_matches(want, action, kind) {
                return false;
            }
        }
        if let Some(since) = self.since {
            let t = str_at(record, &["@timestamp"])
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
            if t.is_none_or(|t| t < since) {
                return false;
            }
        }
        true
    }
}

/// One line for a record: time, sandbox, verdict, action, subject, rule, reason.
pub fn format_line(r: &Value) -> String {
    let time = str_at(r, &["@timestamp"]).unwrap_or("-");
    let sandbox = word(str_at(r, &["egress", "sandbox", "name"]).unwrap_or("-"));
    let action = str_at(r, &["event", "action"]).unwrap_or("?");
    let verdict = match str_at(r, &["egress", "verdict"]) {
        Some(v) => v.to_ascii_uppercase(),
        None if str_at(r, &["event", "kind"]) == Some("alert") => "ALERT".into(),
        None => match str_at(r, &["event", "outcome"]) {
            Some("failure") => "FAILED".into(),
            _ => "-".into(),
        },
    };
    let mut line = format!(
        "{time}  {sandbox:<16} {verdict:<8} {action:<15} {}",
        subject(r, action)
    );
    if let Some(rule) = str_at(r, &["rule", "name"]) {
        let _ = write!(line, "  rule={}", word(rule));
    }
    if let Some(cred) = str_at(r, &["egress", "credential", "name"]) {
        let _ = write!(line, "  credential={}", word(cred));
    }
    let reason = str_at(r, &["event", "reason"]).or_else(|| str_at(r, &["error", "message"]));
    if let Some(reason) = reason {
        let _ = write!(line, "  reason={:?}", reason.replace(['\n', '\r'], " "));
    }
    // Fields a sandbox chose (a process name, a ref name, a path) must not drive the
    // operator's terminal: control characters are shown escaped.
    crate::text::sanitize(&line, usize::MAX)
}

/// A value a sandbox or the network may have chosen, as one word of the line: as it is
/// when it is one, quoted and escaped when it holds white space, a quote or a backslash
/// (a process named `x  rule=github` must not read as a field).
fn word(s: &str) -> Cow<'_, str> {
    if !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\\') || crate::text::misleads(c))
    {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("{s:?}"))
    }
}

/// What the record is about, in a few words.
fn subject(r: &Value, action: &str) -> String {
    let dest = || {
        let ip = str_at(r, &["destination", "ip"])?;
        let port = at(r, &["destination", "port"])?.as_u64()?;
        Some(if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        })
    };
    match action {
        "connect" | "sendmsg" | "socket" => {
            let mut s = dest().unwrap_or_else(|| "-".into());
            if let Some(t) = str_at(r, &["network", "transport"]) {
                let _ = write!(s, "/{t}");
            }
            if let Some(d) = str_at(r, &["destination", "domain"]) {
                let _ = write!(s, " ({})", word(d));
            }
            if let Some(p) = str_at(r, &["process", "name"]) {
                let pid = at(r, &["process", "pid"])
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let _ = write!(s, " by {}[{pid}]", word(p));
            }
            s
        }
        "dns-query" => {
            let name = str_at(r, &["dns", "question", "name"]).unwrap_or("?");
            let qtype = str_at(r, &["dns", "question", "type"]).unwrap_or("?");
            let rcode = str_at(r, &["dns", "response_code"]).unwrap_or("?");
            let mut s = format!("{} {} -> {}", word(name), word(qtype), word(rcode));
            if let Some(ips) = at(r, &["dns", "resolved_ip"]).and_then(Value::as_array) {
                let ips: Vec<&str> = ips.iter().filter_map(Value::as_str).collect();
                if !ips.is_empty() {
                    let _ = write!(s, " {}", ips.join(","));
                }
            }
            s
        }
        "http-request" => {
            let method = str_at(r, &["http", "request", "method"]).unwrap_or("?");
            let domain = str_at(r, &["url", "domain"]).unwrap_or("?");
            let path = str_at(r, &["url", "path"]).unwrap_or("");
            let mut url = format!("https://{domain}{path}");
            if let Some(q) = str_at(r, &["url", "query"]) {
                let _ = write!(url, "?{q}");
            }
            let mut s = format!("{} {}", word(method), word(&url));
            if let Some(status) =
                at(r, &["http", "response", "status_code"]).and_then(Value::as_u64)
            {
                let _ = write!(s, " -> {status}");
            }
            s
        }
        "tls-connection" => {
            let name = str_at(r, &["tls", "client", "server_name"]).unwrap_or("(no server name)");
            match dest() {
                Some(d) => format!("{} via {d}", word(name)),
                None => word(name).into_owned(),
            }
        }
        "events-lost" => {
            let count = at(r, &["egress", "lost", "count"])
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let total = at(r, &["egress", "lost", "total"])
                .and_then(Value::as_u64)
                .unwrap_or(0);
            format!("{count} kernel events lost ({total} in total)")
        }
        "sandbox-attach" | "sandbox-detach" | "sandbox-adopt" | "policy-change"
        | "policy-rejected" => str_at(r, &["egress", "policy", "path"])
            .unwrap_or("-")
            .to_owned(),
        "daemon-start" | "daemon-stop" => {
            let pid = at(r, &["process", "pid"])
                .and_then(Value::as_u64)
                .unwrap_or(0);
            format!("pid {pid}")
        }
        _ => {
            // Alerts and kinds this build does not know: what they name, if anything.
            let mut s = String::new();
            if let Some(count) = at(r, &["egress", "alert", "count"]).and_then(Value::as_u64) {
                let _ = write!(s, "x{count}");
                if let Some(w) =
                    at(r, &["egress", "alert", "window_seconds"]).and_then(Value::as_u64)
                {
                    let _ = write!(s, " in {w}s");
                }
            }
            if let Some(d) = str_at(r, &["url", "domain"]) {
                let path = str_at(r, &["url", "path"]).unwrap_or("");
                let _ = write!(s, "{}{d}{path}", if s.is_empty() { "" } else { " " });
            }
            if s.is_empty() {
                s.push('-');
            }
            s
        }
    }
}

/// What to print for one raw line, or `None` when it is filtered out. A line that is not
/// JSON is shown as it is (marked), unless a filter is set, so damage is visible.
pub fn render(line: &str, filter: &Filter, json: bool) -> Option<String> {
    let trimmed = line.trim_end_matches(['\n', '\r']);
    if trimmed.trim().is_empty() {
        return None;
    }
    match serde_json::from_str::<Value>(trimmed) {
        Ok(v) if filter.matches(&v) => Some(if json {
            trimmed.to_owned()
        } else {
            format_line(&v)
        }),
        Ok(_) => None,
        Err(_) => {
            let unfiltered = filter.sandbox.is_none()
                && filter.verdict.is_none()
                && filter.kind.is_none()
                && filter.since.is_none();
            (unfiltered && !json)
                .then(|| crate::text::sanitize(&format!("(not a record) {trimmed}"), usize::MAX))
        }
    }
}
