//! Matching egressd audit records (JSONL, ECS field names, nested objects).
//!
//! Matchers read only the fields they are asked about and ignore everything else, so the
//! daemon may add fields freely. IP addresses are compared as parsed addresses with
//! IPv4-mapped IPv6 folded to IPv4 (`::ffff:203.0.113.66` == `203.0.113.66`), so either
//! spelling in a record matches.

use std::net::IpAddr;

use serde_json::Value;

/// Kernel decision actions (`event.action`).
pub const DECISION_ACTIONS: [&str; 2] = ["connect", "sendmsg"];

/// The value at a dotted path (`"egress.sandbox.name"`); keys may contain `@`.
pub fn get<'a>(record: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(record, |v, key| v.get(key))
}

/// The string at a dotted path.
pub fn get_str<'a>(record: &'a Value, path: &str) -> Option<&'a str> {
    get(record, path).and_then(Value::as_str)
}

/// The unsigned integer at a dotted path (also accepts a decimal string).
pub fn get_u64(record: &Value, path: &str) -> Option<u64> {
    match get(record, path)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `event.action`.
pub fn action(record: &Value) -> Option<&str> {
    get_str(record, "event.action")
}

/// `egress.verdict`.
pub fn verdict(record: &Value) -> Option<&str> {
    get_str(record, "egress.verdict")
}

/// `destination.ip`, parsed and canonicalised (mapped IPv6 -> IPv4).
pub fn dest_ip(record: &Value) -> Option<IpAddr> {
    get_str(record, "destination.ip")?
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

/// `destination.port`.
pub fn dest_port(record: &Value) -> Option<u16> {
    get_u64(record, "destination.port").and_then(|p| u16::try_from(p).ok())
}

/// `egress.sandbox.name`.
pub fn sandbox_name(record: &Value) -> Option<&str> {
    get_str(record, "egress.sandbox.name")
}

/// True for a kernel decision record (connect / sendmsg).
pub fn is_decision(record: &Value) -> bool {
    action(record).is_some_and(|a| DECISION_ACTIONS.contains(&a))
}

/// A conjunction of optional field conditions. Unset fields match anything.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub action: Option<String>,
    pub decision: bool,
    pub verdict: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub transport: Option<String>,
    pub hook: Option<String>,
    pub sandbox: Option<String>,
    pub rule: Option<String>,
}

impl Match {
    /// A kernel decision with this verdict to `ip:port`.
    pub fn decision(verdict: &str, ip: IpAddr, port: u16) -> Self {
        Self {
            decision: true,
            verdict: Some(verdict.into()),
            ip: Some(ip.to_canonical()),
            port: Some(port),
            ..Self::default()
        }
    }

    /// A lifecycle record with this `event.action`.
    pub fn lifecycle(action: &str) -> Self {
        Self {
            action: Some(action.into()),
            ..Self::default()
        }
    }

    pub fn transport(mut self, t: &str) -> Self {
        self.transport = Some(t.into());
        self
    }

    pub fn hook(mut self, h: &str) -> Self {
        self.hook = Some(h.into());
        self
    }

    pub fn sandbox(mut self, name: &str) -> Self {
        self.sandbox = Some(name.into());
        self
    }

    pub fn rule(mut self, name: &str) -> Self {
        self.rule = Some(name.into());
        self
    }

    pub fn matches(&self, r: &Value) -> bool {
        let eq = |want: &Option<String>, path: &str| {
            want.as_deref().is_none_or(|w| get_str(r, path) == Some(w))
        };
        (!self.decision || is_decision(r))
            && eq(&self.action, "event.action")
            && eq(&self.verdict, "egress.verdict")
            && eq(&self.transport, "network.transport")
            && eq(&self.hook, "egress.hook")
            && eq(&self.sandbox, "egress.sandbox.name")
            && eq(&self.rule, "rule.name")
            && self.ip.is_none_or(|ip| dest_ip(r) == Some(ip))
            && self.port.is_none_or(|p| dest_port(r) == Some(p))
    }

    /// First matching record.
    pub fn find<'a>(&self, records: &'a [Value]) -> Option<&'a Value> {
        records.iter().find(|r| self.matches(r))
    }

    /// All matching records.
    pub fn all<'a>(&self, records: &'a [Value]) -> Vec<&'a Value> {
        records.iter().filter(|r| self.matches(r)).collect()
    }
}

/// First kernel decision with `verdict` to `ip:port`.
pub fn find_decision<'a>(
    records: &'a [Value],
    verdict: &str,
    ip: IpAddr,
    port: u16,
) -> Option<&'a Value> {
    Match::decision(verdict, ip, port).find(records)
}

/// First lifecycle record with `event.action == action`.
pub fn find_lifecycle<'a>(records: &'a [Value], action: &str) -> Option<&'a Value> {
    Match::lifecycle(action).find(records)
}

/// One short line per record, for error messages.
pub fn summarize(records: &[Value]) -> String {
    let mut s = String::new();
    for r in records {
        s.push_str(&format!(
            "\n  {} {} {} {}:{} {} hook={} type={} sandbox={} rule={}",
            get_u64(r, "event.sequence")
                .map(|n| n.to_string())
                .unwrap_or_default(),
            action(r).unwrap_or("-"),
            verdict(r).unwrap_or("-"),
            get_str(r, "destination.ip").unwrap_or("-"),
            dest_port(r).map(|p| p.to_string()).unwrap_or_default(),
            get_str(r, "network.transport").unwrap_or("-"),
            get_str(r, "egress.hook").unwrap_or("-"),
            get_str(r, "network.type").unwrap_or("-"),
            sandbox_name(r).unwrap_or("-"),
            get_str(r, "rule.name").unwrap_or("-"),
        ));
    }
    if s.is_empty() {
        s.push_str(" (no records)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn matches_decision_with_mapped_address() {
        let r: Value = serde_json::json!({
            "@timestamp": "2025-01-01T00:00:00Z",
            "event": {"sequence": 3, "action": "connect", "outcome": "failure"},
            "egress": {"verdict": "deny", "hook": "connect6",
                       "sandbox": {"name": "a", "cgroup_id": 7}, "extra": true},
            "destination": {"ip": "::ffff:203.0.113.66", "port": 9},
            "network": {"transport": "tcp", "type": "ipv6"},
            "rule": {"name": "default"}
        });
        let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66));
        let recs = vec![r];
        assert!(find_decision(&recs, "deny", ip, 9).is_some());
        assert!(find_decision(&recs, "allow", ip, 9).is_none());
        assert!(Match::decision("deny", ip, 9)
            .hook("connect6")
            .sandbox("a")
            .transport("tcp")
            .find(&recs)
            .is_some());
        assert!(Match::decision("deny", ip, 9)
            .sandbox("b")
            .find(&recs)
            .is_none());
        assert!(find_lifecycle(&recs, "daemon-start").is_none());
    }
}
