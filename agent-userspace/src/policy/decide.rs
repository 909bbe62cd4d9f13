//! The decision for one connection, as a pure function of the policy. The kernel programs
//! compute the same answer from the entries `kernel_rules()` writes; a unit test in
//! `kernel` holds the two equal.
use std::{fmt, net::IpAddr};

use agent_common::verdict;

use super::compile::{rule_id, Policy, Protocol, Rule};

/// The outcome for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed only because the policy default is `audit`.
    Audit,
    /// Sent to the egress proxy by a proxy or passthrough rule, which then judges the TLS
    /// server name and, for a proxy rule, each request.
    Redirect,
}

impl Verdict {
    /// The `agent_common::verdict` code, as found in kernel events.
    pub fn kernel_code(self) -> u8 {
        match self {
            Self::Allow => verdict::ALLOW,
            Self::Deny => verdict::DENY,
            Self::Audit => verdict::AUDIT,
            Self::Redirect => verdict::REDIRECT,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::Redirect => "redirect",
        })
    }
}

/// A verdict and who gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    pub verdict: Verdict,
    /// 1-based position of the deciding rule; 0 when the default decided.
    pub rule_id: u16,
}

impl Policy {
    /// Decides a connection to `ip:port` over `protocol` (`Tcp` or `Udp`; `Any` matches
    /// only rules without a protocol, as the kernel does for other protocol numbers).
    ///
    /// An IPv4-mapped or NAT64 IPv6 address is judged as its IPv4 address. Among the (rule, net)
    /// pairs whose net contains the address, the longest prefix comes first, then the
    /// earlier rule; the first whose ports and protocol match decides. Otherwise the
    /// default does. Names in `to` play no part: they grant only addresses learned
    /// through DNS, which [`Policy::decide_learned`] judges.
    pub fn decide(&self, ip: IpAddr, port: u16, protocol: Protocol) -> Decision {
        let ip = routed(crate::net::judged_as(ip));
        // (prefix length, rule index) of the best candidate so far; a later rule only
        // wins with a strictly longer prefix, so equal prefixes keep file order.
        let mut best: Option<(u8, usize)> = None;
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.matches_port(port, protocol) {
                continue;
            }
            let Some(len) = longest_match(rule, ip) else {
                continue;
            };
            if best.is_none_or(|(best_len, _)| len > best_len) {
                best = Some((len, index));
            }
        }
        match best.and_then(|(_, index)| Some((index, self.rules.get(index)?))) {
            Some((index, rule)) => Decision {
                verdict: rule.action.verdict(),
                rule_id: rule_id(index),
            },
            None => self.default_decision(),
        }
    }

    /// Decides a connection to `ip`, an address learned by resolving a name that
    /// [`Policy::rules_for_name`] gave `rule_ids`, as the kernel does with the entry
    /// [`Policy::learned_entries`] writes for it: first the name rules (policy order),
    /// then, as [`Policy::decide`], the static rules whose destinations contain `ip`, then
    /// the default. So a learned address never loses what static rules grant it.
    pub fn decide_learned(
        &self,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
        rule_ids: &[u16],
    ) -> Decision {
        self.decide_by_rules(rule_ids, port, protocol)
            .unwrap_or_else(|| self.decide(ip, port, protocol))
    }
}

/// Where the kernel takes a connection to `ip`: the unspecified address (`0.0.0.0`, `::`)
/// goes to loopback, so it is judged as `127.0.0.1` / `::1`, as the kernel programs do.
fn routed(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// The longest of the rule's prefixes containing `ip`.
fn longest_match(rule: &Rule, ip: IpAddr) -> Option<u8> {
    rule.nets
        .iter()
        .filter(|net| net.contains(&ip))
        .map(|net| net.prefix_len())
        .max()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::policy::parse_str;

    fn decide(policy: &Policy, connect: &str) -> (Verdict, Option<String>) {
        let (target, protocol) = match connect.rsplit_once('/') {
            Some((t, "udp")) => (t, Protocol::Udp),
            Some((t, "tcp")) => (t, Protocol::Tcp),
            _ => (connect, Protocol::Tcp),
        };
        let addr: std::net::SocketAddr = target.parse().unwrap();
        let d = policy.decide(addr.ip(), addr.port(), protocol);
        (d.verdict, policy.rule_name(d.rule_id).map(str::to_owned))
    }

    /// Runs a table of connections against a policy: (connect, verdict, rule or "").
    fn check(src: &str, cases: &[(&str, Verdict, &str)]) {
        let policy = parse_str(src, "test.yaml").unwrap();
        for (connect, verdict, rule) in cases {
            let want_rule = (!rule.is_empty()).then(|| rule.to_string());
            assert_eq!(decide(&policy, connect), (*verdict, want_rule), "{connect}");
        }
    }

    use Verdict::{Allow, Audit, Deny};

    #[test]
    fn nested_prefixes_longest_first() {
        // The /24 limits ports for its hosts; the /8 allows everything else in 10/8.
        check(
            "version: 1
rules:
  - name: wide
    to: [10.0.0.0/8]
    action: allow
  - name: narrow
    to: [10.1.2.0/24]
    ports: [443]
    action: deny
  - name: host
    to: [10.1.2.3]
    ports: [22]
    protocol: tcp
    action: allow
",
            &[
                ("10.9.9.9:22", Allow, "wide"),
                ("10.1.2.4:443", Deny, "narrow"),
                ("10.1.2.4:80", Allow, "wide"),
                ("10.1.2.3:22", Allow, "host"),
                ("10.1.2.3:22/udp", Allow, "wide"),
                ("10.1.2.3:443", Deny, "narrow"),
                ("[::ffff:10.1.2.3]:443", Deny, "narrow"),
                ("11.0.0.1:22", Deny, ""),
            ],
        );
    }

    #[test]
    fn the_unspecified_address_is_judged_as_loopback() {
        check(
            "version: 1
default: deny
rules:
  - name: no-loopback
    to: [127.0.0.0/8, \"::1\"]
    action: deny
  - name: anything-else
    to: [0.0.0.0/0, \"::/0\"]
    action: allow
",
            &[
                ("0.0.0.0:22", Deny, "no-loopback"),
                ("[::]:22", Deny, "no-loopback"),
                ("[::ffff:0.0.0.0]:22/udp", Deny, "no-loopback"),
                ("192.0.2.1:22", Allow, "anything-else"),
            ],
        );
    }

    #[test]
    fn equal_prefixes_keep_rule_order() {
        check(
            "version: 1
default: audit
rules:
  - name: first
    to: [192.0.2.0/24]
    ports: [80]
    action: deny
  - name: second
    to: [192.0.2.0/24, 198.51.100.0/24]
    action: allow
",
            &[
                ("192.0.2.1:80", Deny, "first"),
                ("192.0.2.1:81", Allow, "second"),
                ("198.51.100.1:80", Allow, "second"),
                ("203.0.113.1:80", Audit, ""),
            ],
        );
    }

    #[test]
    fn cidr_edges() {
        check(
            "version: 1
rules:
  - name: host4
    to: [192.0.2.7/32]
    ports: [1]
    action: allow
  - name: host6
    to: [\"2001:db8::7/128\"]
    ports: [65535]
    action: allow
  - name: all4
    to: [0.0.0.0/0]
    ports: [53]
    protocol: udp
    action: allow
  - name: all6
    to: [\"::/0\"]
    ports: [\"1-1024\"]
    protocol: tcp
    action: allow
  - name: mapped
    to: [\"::ffff:203.0.113.0/120\"]
    ports: [8080]
    action: allow
",
            &[
                ("192.0.2.7:1", Allow, "host4"),
                ("192.0.2.7:2", Deny, ""),
                ("192.0.2.8:1", Deny, ""),
                ("[2001:db8::7]:65535", Allow, "host6"),
                ("[2001:db8::7]:1024", Allow, "all6"),
                ("[2001:db8::7]:65534", Deny, ""),
                ("8.8.8.8:53/udp", Allow, "all4"),
                ("8.8.8.8:53/tcp", Deny, ""),
                ("[2001:4860::8888]:53/tcp", Allow, "all6"),
                ("[2001:4860::8888]:53/udp", Deny, ""),
                // Mapped addresses follow the IPv4 rules, never ::/0.
                ("[::ffff:8.8.8.8]:53/udp", Allow, "all4"),
                ("[::ffff:8.8.8.8]:80/tcp", Deny, ""),
                // A mapped CIDR in the file is an IPv4 rule.
                ("203.0.113.9:8080", Allow, "mapped"),
                ("[::ffff:203.0.113.9]:8080", Allow, "mapped"),
                ("203.0.114.9:8080", Deny, ""),
                // So do NAT64 ones (64:ff9b::/96), never ::/0.
                ("[64:ff9b::808:808]:53/udp", Allow, "all4"),
                ("[64:ff9b::808:808]:80/tcp", Deny, ""),
                ("[64:ff9b::cb00:7109]:8080", Allow, "mapped"),
                ("[64:ff9b:1::808:808]:80/tcp", Allow, "all6"),
            ],
        );
    }

    #[test]
    fn ports_and_protocols() {
        check(
            "version: 1
rules:
  - name: web
    to: [192.0.2.0/24]
    ports: [80, \"8000-8100\", 65535]
    protocol: tcp
    action: allow
  - name: dns
    to: [192.0.2.0/24]
    ports: [53]
    protocol: udp
    action: allow
  - name: any-proto
    to: [192.0.2.0/24]
    ports: [\"1-10\"]
    action: allow
  - name: any-port
    to: [198.51.100.1]
    action: allow
",
            &[
                ("192.0.2.1:80", Allow, "web"),
                ("192.0.2.1:80/udp", Deny, ""),
                ("192.0.2.1:7999", Deny, ""),
                ("192.0.2.1:8000", Allow, "web"),
                ("192.0.2.1:8100", Allow, "web"),
                ("192.0.2.1:8101", Deny, ""),
                ("192.0.2.1:65535", Allow, "web"),
                ("192.0.2.1:53/udp", Allow, "dns"),
                ("192.0.2.1:53/tcp", Deny, ""),
                ("192.0.2.1:1/udp", Allow, "any-proto"),
                ("192.0.2.1:10/tcp", Allow, "any-proto"),
                ("192.0.2.1:11/tcp", Deny, ""),
                ("192.0.2.1:0", Deny, ""),
                ("198.51.100.1:0", Allow, "any-port"),
                ("198.51.100.1:65535/udp", Allow, "any-port"),
            ],
        );
    }

    #[test]
    fn any_protocol_connection_matches_only_any_rules() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: t, to: [192.0.2.1], protocol: tcp, action: allow}
  - {name: a, to: [192.0.2.0/24], action: deny}
",
            "t.yaml",
        )
        .unwrap();
        let ip = "192.0.2.1".parse().unwrap();
        assert_eq!(policy.decide(ip, 1, Protocol::Tcp).rule_id, 1);
        assert_eq!(policy.decide(ip, 1, Protocol::Any).rule_id, 2);
    }

    #[test]
    fn defaults() {
        for (default, verdict) in [("deny", Deny), ("audit", Audit)] {
            let src = format!(
                "version: 1\ndefault: {default}\nrules:\n  - {{name: r, to: [192.0.2.1], action: deny}}\n"
            );
            check(
                &src,
                &[
                    ("192.0.2.1:1", Deny, "r"),
                    ("192.0.2.2:1", verdict, ""),
                    ("[2001:db8::1]:1/udp", verdict, ""),
                ],
            );
        }
        // No `default:` means deny.
        check("version: 1\n", &[("192.0.2.1:443", Deny, "")]);
    }

    #[test]
    fn rule_names_by_id() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: a, to: [192.0.2.1], action: allow}
  - {name: b.c_d-e, to: [192.0.2.2], action: deny}
",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(policy.rule_name(0), None);
        assert_eq!(policy.rule_name(1), Some("a"));
        assert_eq!(policy.rule_name(2), Some("b.c_d-e"));
        assert_eq!(policy.rule_name(3), None);
        assert_eq!(policy.rule_name(u16::MAX), None);
    }
}
