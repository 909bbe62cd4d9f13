//! Filters, the one-line format, and following a file through rotation and truncation.

use std::{fs::OpenOptions, io::Write, path::Path};

use serde_json::json;
use time::macros::datetime;

use super::*;

fn connect_deny() -> Value {
    json!({
        "@timestamp": "2026-11-21T22:03:04.123456Z",
        "event": {"kind": "event", "action": "connect", "outcome": "failure", "sequence": 7},
        "process": {"pid": 4242, "name": "curl"},
        "network": {"type": "ipv4", "transport": "tcp", "iana_number": "6"},
        "destination": {"ip": "203.0.113.7", "port": 443},
        "rule": {"name": "default"},
        "egress": {"sandbox": {"name": "agent-1"}, "verdict": "deny", "hook": "connect4"}
    })
}

fn http_allow() -> Value {
    json!({
        "@timestamp": "2026-11-21T22:05:00.000000Z",
        "event": {"kind": "event", "action": "http-request", "outcome": "success", "sequence": 8},
        "url": {"domain": "api.github.com", "path": "/repos/acme/widgets/pulls", "query": "state="},
        "http": {"request": {"method": "GET", "body": {"bytes": 0}}, "response": {"status_code": 200, "body": {"bytes": 12}}},
        "rule": {"name": "github-api"},
        "egress": {"sandbox": {"name": "agent-2"}, "verdict": "allow", "credential": {"name": "github"}}
    })
}

fn dns_deny() -> Value {
    json!({
        "@timestamp": "2026-11-21T22:06:00.000000Z",
        "event": {"kind": "event", "action": "dns-query", "outcome": "failure", "reason": "name is not allowed\nby the policy", "sequence": 9},
        "dns": {"question": {"name": "evil.example", "type": "A"}, "response_code": "NXDOMAIN"},
        "egress": {"sandbox": {"name": "agent-1"}, "verdict": "deny"}
    })
}

fn alert() -> Value {
    json!({
        "@timestamp": "2026-11-21T22:07:00.000000Z",
        "event": {"kind": "alert", "action": "dns-budget", "outcome": "success", "reason": "over budget", "sequence": 10},
        "egress": {"sandbox": {"name": "agent-1"}, "alert": {"count": 57, "window_seconds": 10, "response": "record"}}
    })
}

/// A process name, a reason or a torn line holding terminal escapes is shown escaped.
#[test]
fn control_characters_never_reach_the_terminal() {
    let mut r = connect_deny();
    r["process"]["name"] = serde_json::json!("\u{1b}[8mhide");
    r["event"]["reason"] = serde_json::json!("ref \u{1b}[1A\u{1b}[2K\u{7}");
    let line = format_line(&r);
    assert!(!line.chars().any(char::is_control), "{line:?}");
    assert!(line.contains("\\u{1b}[8mhide"), "{line}");
    // Nor a bidirectional override, which would show the fields after it reordered.
    r["process"]["name"] = serde_json::json!("x\u{202e}hg=elur");
    let line = format_line(&r);
    assert!(
        !line.contains('\u{202e}') && line.contains("x\\u{202e}hg=elur"),
        "{line}"
    );
    let torn = render("{\"torn \u{1b}[2J", &Filter::default(), false);
    assert!(
        torn.as_deref()
            .is_some_and(|t| !t.chars().any(char::is_control)),
        "{torn:?}"
    );
}

/// A value a sandbox chose cannot pass for another field: one with a space, a quote or
/// `=` is quoted, and a reason's quotes are escaped.
#[test]
fn chosen_values_cannot_forge_fields() {
    let mut r = connect_deny();
    r["process"]["name"] = serde_json::json!("x  rule=github");
    r["event"]["reason"] = serde_json::json!("a\"  rule=\"github");
    let line = format_line(&r);
    assert!(
        line.contains(r#" by "x  rule=github"[4242]"#)
            && line.ends_with(r#"  rule=default  reason="a\"  rule=\"github""#),
        "{line}"
    );
    let mut h = http_allow();
    h["url"]["path"] = serde_json::json!("/a b");
    h["http"]["request"]["method"] = serde_json::json!("GET x=1");
    let line = format_line(&h);
    assert!(
        line.contains(r#""GET x=1" "https://api.github.com/a b?state=""#),
        "{line}"
    );
}

#[test]
fn lines_say_who_what_verdict_rule_and_reason() {
    let line = format_line(&connect_deny());
    assert_eq!(
        line,
        "2026-11-21T22:03:04.123456Z  agent-1          DENY     connect         203.0.113.7:443/tcp by curl[4242]  rule=default"
    );
    let line = format_line(&http_allow());
    assert!(
        line.contains("ALLOW    http-request    GET https://api.github.com/repos/acme/widgets/pulls?state= -> 200  rule=github-api  credential=github"),
        "{line}"
    );
    // A reason is kept on one line.
    let line = format_line(&dns_deny());
    assert!(
        line.contains("evil.example A -> NXDOMAIN  reason=\"name is not allowed by the policy\""),
        "{line}"
    );
    let line = format_line(&alert());
    assert!(
        line.contains("ALERT    dns-budget      x57 in 10s  reason=\"over budget\""),
        "{line}"
    );
}

#[test]
fn filters_combine() {
    let all = [connect_deny(), http_allow(), dns_deny(), alert()];
    let count = |f: &Filter| all.iter().filter(|r| f.matches(r)).count();
    assert_eq!(count(&Filter::default()), 4);
    let agent1 = Filter {
        sandbox: Some("agent-1".into()),
        ..Default::default()
    };
    assert_eq!(count(&agent1), 3);
    let deny = Filter {
        verdict: Some("deny".into()),
        ..agent1.clone()
    };
    assert_eq!(count(&deny), 2);
    let dns = Filter {
        kind: Some("dns".into()),
        ..deny.clone()
    };
    assert_eq!(count(&dns), 1);
    let network = Filter {
        kind: Some("network".into()),
        ..Default::default()
    };
    assert_eq!(count(&network), 1);
    let alerts = Filter {
        kind: Some("alert".into()),
        ..Default::default()
    };
    assert_eq!(count(&alerts), 1);
    let by_action = Filter {
        kind: Some("http-request".into()),
        ..Default::default()
    };
    assert_eq!(count(&by_action), 1);
    let since = Filter {
        since: Some(datetime!(2026-11-21 22:05:00 UTC)),
        ..Default::default()
    };
    assert_eq!(count(&since), 3);
}

#[test]
fn groups_take_every_action_of_their_kind() {
    let with_action = |action: &str| json!({"event": {"kind": "event", "action": action}});
    let kind = |k: &str| Filter {
        kind: Some(k.into()),
        ..Default::default()
    };
    for action in [
        "connect",
        "sendmsg",
        "socket",
        "setsockopt",
        "packet",
        "bind",
        "sysctl",
        "connection-cut",
    ] {
        assert!(kind("network").matches(&with_action(action)), "{action}");
        assert!(!kind("lifecycle").matches(&with_action(action)), "{action}");
    }
    for action in ["sandbox-quarantine", "sandbox-release", "credential-revoke"] {
        assert!(kind("lifecycle").matches(&with_action(action)), "{action}");
        assert!(!kind("network").matches(&with_action(action)), "{action}");
    }
    assert!(!kind("network").matches(&with_action("dns-query")));
}

#[test]
fn kind_argument_is_a_known_action_alert_or_group() {
    for ok in [
        "network",
        "lifecycle",
        "alert",
        "connection-cut",
        "secret-outbound",
    ] {
        assert_eq!(parse_kind(ok), Ok(ok.to_owned()));
    }
    for typo in ["netwrok", "Network", "dns_query", ""] {
        assert_eq!(parse_kind(typo), Err(FilterError::Kind(typo.to_owned())));
        let err = FilterError::Kind(typo.to_owned()).to_string();
        assert!(err.to_string().contains("network, dns"), "{err}");
    }
}

#[test]
fn since_and_verdict_arguments() {
    let now = datetime!(2026-11-21 22:10:00 UTC);
    // Too far back to write as a date: from the beginning, not a panic.
    for far in ["10000000d", "999999999999999999d", "9223372036854775807s"] {
        assert_eq!(
            parse_since(far, now),
            Ok(datetime!(0000-01-01 00:00 UTC)),
            "{far}"
        );
    }
    assert_eq!(
        parse_since("10m", now),
        Ok(datetime!(2026-11-21 22:00:00 UTC))
    );
    assert_eq!(
        parse_since("2h", now),
        Ok(datetime!(2026-11-21 20:10:00 UTC))
    );
    assert_eq!(
        parse_since("1d", now),
        Ok(datetime!(2026-11-20 22:10:00 UTC))
    );
    assert_eq!(
        parse_since("2026-11-21T22:03:04Z", now),
        Ok(datetime!(2026-11-21 22:03:04 UTC))
    );
    for bad in ["", "10", "m", "10y", "yesterday"] {
        assert!(parse_since(bad, now).is_err(), "{bad}");
    }
    assert_eq!(parse_verdict("DENY"), Ok("deny".into()));
    assert!(parse_verdict("blocked").is_err());
}

#[test]
fn render_json_damage_and_filtering() {
    let f = Filter::default();
    let raw = connect_deny().to_string();
    assert_eq!(render(&raw, &f, true).as_deref(), Some(raw.as_str()));
    assert_eq!(
        render("{\"torn", &f, false).as_deref(),
        Some("(not a record) {\"torn")
    );
    assert_eq!(render("", &f, false), None);
    let deny = Filter {
        verdict: Some("deny".into()),
        ..Default::default()
    };
    assert_eq!(render("{\"torn", &deny, false), None);
    assert_eq!(render(&http_allow().to_string(), &deny, false), None);
}

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| unreachable!("{e}"));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| unreachable!("{e}"));
}

#[test]
fn follows_appends_renames_and_truncation() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let log = dir.path().join("audit.jsonl");
    append(&log, "old-1\nold-2\n");
    let mut f = Follower::open(&log, Start::End).unwrap_or_else(|e| unreachable!("{e}"));
    assert!(f.poll().unwrap_or_default().is_empty());

    // A line arrives in two writes.
    append(&log, "a-1\na-");
    assert_eq!(f.poll().unwrap_or_default(), vec!["a-1"]);
    append(&log, "2\n");
    assert_eq!(f.poll().unwrap_or_default(), vec!["a-2"]);

    // logrotate `create`: rename, a late write to the old file, then a new file.
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap_or_else(|e| unreachable!("{e}"));
    append(&rotated, "a-3\n");
    assert_eq!(
        f.poll().unwrap_or_default(),
        vec!["a-3"],
        "old file read while the path is missing"
    );
    append(&rotated, "a-4\n");
    append(&log, "b-1\n");
    assert_eq!(f.poll().unwrap_or_default(), vec!["a-4", "b-1"]);
    assert_eq!(f.rotations(), 1);

    // copytruncate: the same file starts over.
    append(&log, "b-2\n");
    assert_eq!(f.poll().unwrap_or_default(), vec!["b-2"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .and_then(|f| f.set_len(0))
        .unwrap_or_else(|e| unreachable!("{e}"));
    append(&log, "c-1\n");
    assert_eq!(f.poll().unwrap_or_default(), vec!["c-1"]);
    assert_eq!(f.rotations(), 2);

    // Truncated and written to the very same length between two polls.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .and_then(|f| f.set_len(0))
        .unwrap_or_else(|e| unreachable!("{e}"));
    append(&log, "c-2\n");
    assert_eq!(f.poll().unwrap_or_default(), vec!["c-2"]);
    assert_eq!(f.rotations(), 3);
    append(&log, "c-3\n");
    assert_eq!(f.poll().unwrap_or_default(), vec!["c-3"]);
}

#[test]
fn waits_for_a_missing_file_and_reads_it_from_the_start() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let log = dir.path().join("audit.jsonl");
    let mut f = Follower::open(&log, Start::End).unwrap_or_else(|e| unreachable!("{e}"));
    assert!(f.poll().unwrap_or_default().is_empty());
    append(&log, "first\n");
    assert_eq!(f.poll().unwrap_or_default(), vec!["first"]);
}

#[test]
fn a_large_log_is_read_a_piece_at_a_time() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let log = dir.path().join("audit.jsonl");
    let line = format!("{}\n", "x".repeat(999));
    append(&log, &line.repeat(10_000)); // 10 MB
    let mut f = Follower::open(&log, Start::Beginning).unwrap_or_else(|e| unreachable!("{e}"));
    let mut polls = Vec::new();
    loop {
        let n = f.poll().unwrap_or_default().len();
        if n == 0 {
            break;
        }
        polls.push(n);
    }
    assert_eq!(polls.iter().sum::<usize>(), 10_000);
    assert!(polls.len() >= 3, "{polls:?}");
}
