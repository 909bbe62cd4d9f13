//! The policy as LPM-trie entries for the kernel programs.
//!
//! The kernel looks up only the longest prefix containing the destination and tries that
//! prefix's list in order. So each prefix's list carries, besides its own rules, the rules
//! of every shorter prefix that contains it, ordered as `decide()` orders them (longest
//! prefix first, then rule position, then port-range order). Then the first matching
//! entry is the rule `decide()` picks: any policy prefix containing the destination also
//! contains the longest one, so no rule that could apply is missing from its list.
use std::{collections::BTreeSet, fmt::Write as _};

use agent_common::{PrefixRules, RuleEntry, MAX_RULES_PER_PREFIX};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::compile::{rule_id, Policy};

/// Every prefix of a policy with its entry list, per address family, sorted by prefix.
/// IPv4-mapped destinations are looked up in `v4`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelRules {
    pub v4: Vec<(Ipv4Net, PrefixRules)>,
    pub v6: Vec<(Ipv6Net, PrefixRules)>,
}

/// The policy does not fit the kernel's maps.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KernelRulesError {
    #[error(
        "prefix {prefix} needs {entries} kernel entries, more than the \
         {MAX_RULES_PER_PREFIX} allowed per prefix; rules involved: {} (valid: at most \
         {MAX_RULES_PER_PREFIX} (rule, port range) pairs apply to one prefix, counting \
         rules for prefixes that contain it; merge port ranges or rules)",
        describe(rules)
    )]
    TooManyEntries {
        prefix: IpNet,
        entries: usize,
        /// Each rule applying to the prefix, with its number of port ranges.
        rules: Vec<(String, usize)>,
    },
}

fn describe(rules: &[(String, usize)]) -> String {
    let mut out = String::new();
    for (i, (name, ranges)) in rules.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "`{name}`");
        if *ranges > 1 {
            let _ = write!(out, " ({ranges} port ranges)");
        }
    }
    out
}

impl Policy {
    /// The entries to write under this policy's slot. Fails if a prefix would need more
    /// than `MAX_RULES_PER_PREFIX` entries (`compile` already rejects such policies).
    pub fn kernel_rules(&self) -> Result<KernelRules, KernelRulesError> {
        let prefixes: BTreeSet<IpNet> = self
            .rules
            .iter()
            .flat_map(|r| r.nets.iter().copied())
            .collect();
        let mut out = KernelRules::default();
        for prefix in prefixes {
            let entries = self.prefix_rules(prefix)?;
            match prefix {
                IpNet::V4(net) => out.v4.push((net, entries)),
                IpNet::V6(net) => out.v6.push((net, entries)),
            }
        }
        Ok(out)
    }

    fn prefix_rules(&self, prefix: IpNet) -> Result<PrefixRules, KernelRulesError> {
        // (longest of the rule's nets containing `prefix`, rule index). A rule with
        // several such nets appears once: its later copies could never match where the
        // first did not, since ports and protocol are the same.
        let mut applying: Vec<(u8, usize)> = self
            .rules
            .iter()
            .enumerate()
            .filter_map(|(index, rule)| {
                rule.nets
                    .iter()
                    .filter(|net| net.contains(&prefix))
                    .map(|net| net.prefix_len())
                    .max()
                    .map(|len| (len, index))
            })
            .collect();
        applying.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));

        let mut entries = Vec::new();
        for &(_, index) in &applying {
            let Some(rule) = self.rules.get(index) else {
                continue;
            };
            let ranges: &[(u16, u16)] = if rule.ports.is_empty() {
                // The kernel's "any port", which includes port 0.
                &[(0, u16::MAX)]
            } else {
                &rule.ports
            };
            for &(port_lo, port_hi) in ranges {
                entries.push(RuleEntry {
                    port_lo,
                    port_hi,
                    rule_id: rule_id(index),
                    protocol: rule.protocol.kernel_code(),
                    action: rule.action.kernel_code(),
                });
            }
        }

        if entries.len() > MAX_RULES_PER_PREFIX {
            return Err(KernelRulesError::TooManyEntries {
                prefix,
                entries: entries.len(),
                rules: applying
                    .iter()
                    .filter_map(|&(_, i)| self.rules.get(i))
                    .map(|r| (r.name.clone(), r.ports.len().max(1)))
                    .collect(),
            });
        }
        let mut list = PrefixRules::default();
        for (slot, entry) in list.entries.iter_mut().zip(&entries) {
            *slot = *entry;
        }
        list.count = u32::try_from(entries.len()).unwrap_or(0);
        Ok(list)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use agent_common::{action, proto};

    use super::*;
    use crate::policy::{parse_str, Decision, DefaultAction, Protocol, Verdict};

    /// What the kernel programs do with these entries (see agent-ebpf `decide.rs`).
    fn kernel_decide(
        k: &KernelRules,
        default: DefaultAction,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> Decision {
        let list = match ip.to_canonical() {
            IpAddr::V4(a) => {
                k.v4.iter()
                    .filter(|(n, _)| n.contains(&a))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(_, l)| l)
            }
            IpAddr::V6(a) => {
                k.v6.iter()
                    .filter(|(n, _)| n.contains(&a))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(_, l)| l)
            }
        };
        let p = protocol.kernel_code();
        let hit = list.and_then(|l| {
            l.entries[..l.count as usize].iter().find(|e| {
                (e.protocol == proto::ANY || e.protocol == p)
                    && e.port_lo <= port
                    && port <= e.port_hi
            })
        });
        match hit {
            Some(e) if e.action == action::ALLOW => Decision {
                verdict: Verdict::Allow,
                rule_id: e.rule_id,
            },
            // The kernel redirects TCP only (and denies when it cannot redirect).
            Some(e)
                if (e.action == action::PROXY || e.action == action::PASSTHROUGH)
                    && protocol == Protocol::Tcp =>
            {
                Decision {
                    verdict: Verdict::Redirect,
                    rule_id: e.rule_id,
                }
            }
            Some(e) => Decision {
                verdict: Verdict::Deny,
                rule_id: e.rule_id,
            },
            None if default == DefaultAction::Audit => Decision {
                verdict: Verdict::Audit,
                rule_id: 0,
            },
            None => Decision {
                verdict: Verdict::Deny,
                rule_id: 0,
            },
        }
    }

    /// A small deterministic generator, so failures reproduce.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn one_in(&mut self, n: u64) -> bool {
            self.next() % n == 1
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.next() as usize % items.len()]
        }
    }

    /// Addresses at and around every prefix's edges, their mapped forms, and others.
    fn probe_addrs(k: &KernelRules, rng: &mut Lcg) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (n, _) in &k.v4 {
            let lo = u32::from(n.network());
            let hi = u32::from(n.broadcast());
            for a in [
                lo.wrapping_sub(1),
                lo,
                lo + (hi - lo) / 2,
                hi,
                hi.wrapping_add(1),
            ] {
                let a = Ipv4Addr::from(a);
                out.push(IpAddr::V4(a));
                out.push(IpAddr::V6(a.to_ipv6_mapped()));
            }
        }
        for (n, _) in &k.v6 {
            let lo = u128::from(n.network());
            let hi = u128::from(n.broadcast());
            for a in [
                lo.wrapping_sub(1),
                lo,
                lo + (hi - lo) / 2,
                hi,
                hi.wrapping_add(1),
            ] {
                out.push(IpAddr::V6(Ipv6Addr::from(a)));
            }
        }
        for _ in 0..50 {
            out.push(IpAddr::V4(Ipv4Addr::from(rng.next() as u32)));
            let a = (u128::from(rng.next()) << 96) | u128::from(rng.next());
            out.push(IpAddr::V6(Ipv6Addr::from(a)));
        }
        out
    }

    fn assert_kernel_equals_decide(src: &str, rng: &mut Lcg) {
        let policy = parse_str(src, "gen.yaml").unwrap();
        let k = policy.kernel_rules().unwrap();
        let mut ports = vec![0u16, 1, 2, 22, 53, 79, 80, 81, 443, 444, 8080, 65534, 65535];
        for rule in policy.rules() {
            for &(lo, hi) in rule.ports() {
                ports.extend([lo - 1, lo, hi, hi.saturating_add(1)]);
            }
        }
        for ip in probe_addrs(&k, rng) {
            for &port in &ports {
                for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Any] {
                    assert_eq!(
                        kernel_decide(&k, policy.default_action(), ip, port, protocol),
                        policy.decide(ip, port, protocol),
                        "{ip} port {port} {protocol}\n{src}"
                    );
                }
            }
        }
    }

    #[test]
    fn kernel_equals_decide_on_handwritten_policies() {
        let mut rng = Lcg(1);
        for src in [
            "version: 1
rules:
  - {name: wide, to: [10.0.0.0/8], action: allow}
  - {name: narrow, to: [10.1.2.0/24], ports: [443], action: deny}
  - {name: host, to: [10.1.2.3], ports: [22], protocol: tcp, action: allow}
",
            "version: 1
default: audit
rules:
  - {name: all, to: [0.0.0.0/0, \"::/0\"], ports: [53], protocol: udp, action: allow}
  - {name: v6, to: [\"2001:db8::/32\", \"2001:db8:1::/48\"], ports: [\"1-1024\", 8080], action: deny}
  - {name: v6host, to: [\"2001:db8:1::1\"], protocol: tcp, action: allow}
  - {name: mapped, to: [\"::ffff:192.0.2.0/120\", 192.0.2.128/25], ports: [80], action: allow}
  - {name: same, to: [192.0.2.0/24], action: deny}
",
            "version: 1
rules:
  - {name: gh, to: [192.0.2.10], ports: [443], action: proxy, hosts: [api.github.com]}
  - {name: pin, to: [192.0.2.0/24, \"2001:db8::/32\"], action: passthrough, hosts: [a.example]}
  - {name: net, to: [192.0.2.0/24], action: allow}
  - {name: six, to: [\"2001:db8::1\"], ports: [443], protocol: tcp, action: deny}
",
        ] {
            assert_kernel_equals_decide(src, &mut rng);
        }
    }

    #[test]
    fn kernel_equals_decide_on_generated_policies() {
        let mut rng = Lcg(42);
        let nets4 = [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3",
            "10.1.2.128/25",
            "192.0.2.0/24",
            "192.0.2.7",
            "::ffff:10.1.0.0/112",
        ];
        let nets6 = [
            "::/0",
            "2001:db8::/32",
            "2001:db8::/48",
            "2001:db8::1",
            "2001:db8:0:1::/64",
        ];
        let ports = [
            "1",
            "22",
            "53",
            "80",
            "443",
            "\"1-1024\"",
            "\"8000-8100\"",
            "65535",
        ];
        for round in 0..200 {
            let mut src = format!(
                "version: 1\ndefault: {}\nrules:\n",
                if round % 2 == 0 { "deny" } else { "audit" }
            );
            for r in 0..(1 + rng.next() % 5) {
                let mut to = Vec::new();
                for _ in 0..(1 + rng.next() % 2) {
                    let pool: &[&str] = if rng.one_in(3) { &nets6 } else { &nets4 };
                    to.push(format!("\"{}\"", rng.pick(pool)));
                }
                let mut line = format!("  - name: r{r}\n    to: [{}]\n", to.join(", "));
                if !rng.one_in(3) {
                    let n = 1 + rng.next() % 2;
                    let ps: Vec<&str> = (0..n).map(|_| *rng.pick(&ports)).collect();
                    let _ = writeln!(line, "    ports: [{}]", ps.join(", "));
                }
                let _ = writeln!(line, "    protocol: {}", rng.pick(&["any", "tcp", "udp"]));
                let _ = writeln!(line, "    action: {}", rng.pick(&["allow", "deny"]));
                src.push_str(&line);
            }
            assert_kernel_equals_decide(&src, &mut rng);
        }
    }

    #[test]
    fn lists_carry_containing_prefixes_in_order() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: wide, to: [10.0.0.0/8], action: allow}
  - {name: narrow, to: [10.1.2.0/24], ports: [443, \"8000-8100\"], protocol: tcp, action: deny}
  - {name: also-wide, to: [10.0.0.0/8, 10.1.0.0/16], protocol: udp, action: deny}
  - {name: six, to: [\"2001:db8::/32\"], action: allow}
",
            "t.yaml",
        )
        .unwrap();
        let k = policy.kernel_rules().unwrap();
        let entry = |port_lo, port_hi, rule_id, protocol, action| RuleEntry {
            port_lo,
            port_hi,
            rule_id,
            protocol,
            action,
        };
        let list = |entries: &[RuleEntry]| {
            let mut l = PrefixRules {
                count: entries.len() as u32,
                ..Default::default()
            };
            l.entries[..entries.len()].copy_from_slice(entries);
            l
        };
        let wide = entry(0, 65535, 1, proto::ANY, action::ALLOW);
        let also_wide_8 = entry(0, 65535, 3, proto::UDP, action::DENY);
        assert_eq!(
            k.v4,
            vec![
                ("10.0.0.0/8".parse().unwrap(), list(&[wide, also_wide_8])),
                // also-wide's /16 sorts before wide's /8.
                ("10.1.0.0/16".parse().unwrap(), list(&[also_wide_8, wide])),
                (
                    "10.1.2.0/24".parse().unwrap(),
                    list(&[
                        entry(443, 443, 2, proto::TCP, action::DENY),
                        entry(8000, 8100, 2, proto::TCP, action::DENY),
                        also_wide_8,
                        wide,
                    ])
                ),
            ]
        );
        assert_eq!(
            k.v6,
            vec![(
                "2001:db8::/32".parse().unwrap(),
                list(&[entry(0, 65535, 4, proto::ANY, action::ALLOW)])
            )]
        );
    }

    #[test]
    fn proxy_and_passthrough_action_codes() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: gh, to: [192.0.2.10], ports: [443], action: proxy, hosts: [api.github.com]}
  - {name: pin, to: [192.0.2.20], ports: [443], action: passthrough, hosts: [p.example]}
  - {name: v6, to: [\"2001:db8::10\"], action: proxy, protocol: tcp, hosts: [\"*.example\"]}
",
            "t.yaml",
        )
        .unwrap();
        let k = policy.kernel_rules().unwrap();
        let entries = |l: &PrefixRules| l.entries[..l.count as usize].to_vec();
        let entry = |port_lo, port_hi, rule_id, action| RuleEntry {
            port_lo,
            port_hi,
            rule_id,
            protocol: proto::TCP,
            action,
        };
        assert_eq!(k.v4.len(), 2);
        assert_eq!(entries(&k.v4[0].1), [entry(443, 443, 1, action::PROXY)]);
        assert_eq!(
            entries(&k.v4[1].1),
            [entry(443, 443, 2, action::PASSTHROUGH)]
        );
        assert_eq!(entries(&k.v6[0].1), [entry(0, 65535, 3, action::PROXY)]);
        assert_eq!(action::PROXY, 4);
        assert_eq!(action::PASSTHROUGH, 5);
        let ip = "192.0.2.10".parse().unwrap();
        let d = policy.decide(ip, 443, Protocol::Tcp);
        assert_eq!((d.verdict, d.rule_id), (Verdict::Redirect, 1));
        assert_eq!(d.verdict.kernel_code(), agent_common::verdict::REDIRECT);
        // Proxy rules are TCP: UDP to the same address falls to the default.
        let d = policy.decide(ip, 443, Protocol::Udp);
        assert_eq!((d.verdict, d.rule_id), (Verdict::Deny, 0));
    }

    #[test]
    fn too_many_entries_names_prefix_and_rules() {
        let ports: Vec<String> = (1..=15).map(|p| p.to_string()).collect();
        let src = format!(
            "version: 1
rules:
  - {{name: wide, to: [10.0.0.0/8], ports: [{}], action: allow}}
  - {{name: narrow, to: [10.1.0.0/16], ports: [80, 443], action: deny}}
",
            ports.join(", ")
        );
        let err = parse_str(&src, "big.yaml").unwrap_err().to_string();
        assert_eq!(
            err,
            "big.yaml:4:25: rules[1].to[0]: prefix 10.1.0.0/16 needs 17 kernel entries, more \
             than the 16 allowed per prefix; rules involved: `narrow` (2 port ranges), `wide` \
             (15 port ranges) (valid: at most 16 (rule, port range) pairs apply to one \
             prefix, counting rules for prefixes that contain it; merge port ranges or rules)"
        );
        // Exactly 16 fits.
        let src = src.replace("[80, 443]", "[80]");
        let k = parse_str(&src, "ok.yaml").unwrap().kernel_rules().unwrap();
        assert_eq!(k.v4[1].1.count, 16);
    }
}
