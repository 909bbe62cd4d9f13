//! The policy as LPM-trie entries for the kernel programs.
//!
//! The kernel looks up only the longest prefix containing the destination and tries that
//! prefix's list in order. So each prefix's list carries, besides its own rules, the rules
//! of every shorter prefix that contains it, ordered as `decide()` orders them (longest
//! prefix first, then rule position, then port-range order). Then the first matching
//! entry is the rule `decide()` picks: any policy prefix containing the destination also
//! contains the longest one, so no rule that could apply is missing from its list.
//!
//! Names in `to` add entries at run time: an address learned by resolving a name gets a
//! /32 or /128 entry ([`Policy::learned_entries`]) listing the name's rules first, then
//! the static list that address would otherwise get. Being the longest prefix possible,
//! it shadows every static prefix, which is why it must repeat their rules; when it
//! expires, the daemon restores the static entry at that prefix, if the policy has one
//! ([`Policy::static_entry`]), or deletes it.
use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    net::IpAddr,
};

use agent_common::{PrefixRules, RuleEntry, MAX_RULES_PER_PREFIX};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::compile::{normalise_net, rule_id, Policy};

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
        if let Some(rules) = self.kernel.get() {
            return Ok(rules.clone());
        }
        let rules = self.build_kernel_rules()?;
        let _ = self.kernel.set(rules.clone());
        Ok(rules)
    }

    fn build_kernel_rules(&self) -> Result<KernelRules, KernelRulesError> {
        // Rules by destination network: the rules applying at a prefix are those listing
        // one of its (at most 129) supernets, found by lookup instead of by scanning every
        // rule for every prefix, so large policies compile in time linear in their size.
        let mut by_net: HashMap<IpNet, Vec<usize>> = HashMap::new();
        for (index, rule) in self.rules.iter().enumerate() {
            for net in &rule.nets {
                let rules = by_net.entry(*net).or_default();
                if rules.last() != Some(&index) {
                    rules.push(index);
                }
            }
        }
        let prefixes: BTreeSet<IpNet> = by_net.keys().copied().collect();
        // Only lengths some destination has can hold a supernet (per family, longest first).
        let mut lengths: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        for net in &prefixes {
            let family = &mut lengths[usize::from(net.addr().is_ipv6())];
            if !family.contains(&net.prefix_len()) {
                family.push(net.prefix_len());
            }
        }
        for family in &mut lengths {
            family.sort_unstable_by(|a, b| b.cmp(a));
        }
        let mut taken = vec![false; self.rules.len()];
        let mut out = KernelRules::default();
        for prefix in prefixes {
            let mut applying: Vec<(u8, usize)> = Vec::new();
            let family = &lengths[usize::from(prefix.addr().is_ipv6())];
            for &len in family.iter().filter(|&&len| len <= prefix.prefix_len()) {
                let Ok(net) = IpNet::new(prefix.addr(), len) else {
                    continue;
                };
                for &index in by_net.get(&net.trunc()).into_iter().flatten() {
                    // The first (longest) net containing the prefix is the one that counts.
                    if !std::mem::replace(&mut taken[index], true) {
                        applying.push((len, index));
                    }
                }
            }
            for &(_, index) in &applying {
                taken[index] = false;
            }
            applying.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let order: Vec<usize> = applying.into_iter().map(|(_, index)| index).collect();
            let entries = self.list(prefix, &order)?;
            match prefix {
                IpNet::V4(net) => out.v4.push((net, entries)),
                IpNet::V6(net) => out.v6.push((net, entries)),
            }
        }
        Ok(out)
    }

    /// The entry list for an address learned by resolving a name whose rules are
    /// `rule_ids` (from [`Policy::rules_for_name`]; taken in policy order, unknown ids
    /// ignored): those rules' entries, then the entries of every static rule whose
    /// destinations contain `addr` (longest prefix first, then policy order), each rule
    /// once. To be written at `addr`/32 (IPv4, also for an IPv4-mapped address) or /128.
    /// [`Policy::decide_learned`] is the same decision. Fails if the list is longer than
    /// `MAX_RULES_PER_PREFIX`.
    pub fn learned_entries(
        &self,
        addr: IpAddr,
        rule_ids: &[u16],
    ) -> Result<PrefixRules, KernelRulesError> {
        let prefix = IpNet::from(crate::net::judged_as(addr));
        let mut order: Vec<usize> = rule_ids
            .iter()
            .filter_map(|&id| usize::from(id).checked_sub(1))
            .filter(|&index| index < self.rules.len())
            .collect();
        order.sort_unstable();
        order.dedup();
        // A rule already listed for the name would only repeat itself: same ports,
        // protocol and action.
        let statics: Vec<usize> = self
            .applying(prefix)
            .into_iter()
            .filter(|index| !order.contains(index))
            .collect();
        order.extend(statics);
        self.list(prefix, &order)
    }

    /// A rule among `held` and one among `added` that could both apply to one connection
    /// (protocols and ports overlap) but send it different ways: one lets it through as
    /// it is (`allow`), the other sends it to the proxy (`proxy`, `passthrough`). For an
    /// address two names resolve to, the kernel cannot tell which name a connection
    /// meant: the first of them in the file would serve both, and a proxy rule's checks
    /// would be skipped. Returns their names (held first).
    pub fn crossing_paths(&self, held: &[u16], added: &[u16]) -> Option<(&str, &str)> {
        use super::Action;
        let rule = |id: u16| {
            usize::from(id)
                .checked_sub(1)
                .and_then(|index| self.rules.get(index))
        };
        let proxied = |a: Action| matches!(a, Action::Proxy | Action::Passthrough);
        for &a in held {
            for &b in added {
                let (Some(ra), Some(rb)) = (rule(a), rule(b)) else {
                    continue;
                };
                let kinds = (ra.action(), rb.action());
                if matches!(kinds.0, Action::Deny) || matches!(kinds.1, Action::Deny) {
                    continue;
                }
                if proxied(kinds.0) == proxied(kinds.1) {
                    continue;
                }
                let protocols =
                    ra.protocol().covers(rb.protocol()) || rb.protocol().covers(ra.protocol());
                if protocols && super::compile::ports_overlap(ra.ports(), rb.ports()) {
                    return Some((ra.name(), rb.name()));
                }
            }
        }
        None
    }

    /// A rule of `target` (a name the asked name leads to by CNAME) that sends
    /// connections to the proxy (`proxy`, `passthrough`), and the `allow` rule of `asked`
    /// (the asked name's, in file order) that would take some of them first, if any. The
    /// target's addresses are learned with the asked name's rules, and the kernel serves
    /// a connection by the first of them that matches its protocol and port: an `allow`
    /// there would let the target's connections skip the proxy. (An asked name whose
    /// earlier rules send those ports through the proxy only sends more through it.)
    /// Returns their names (asked first).
    pub fn proxy_overtaken(&self, asked: &[u16], target: &[u16]) -> Option<(&str, &str)> {
        use super::Action;
        let rule = |id: u16| {
            usize::from(id)
                .checked_sub(1)
                .and_then(|index| self.rules.get(index))
        };
        let mut asked_rules: Vec<(u16, &super::Rule)> = asked
            .iter()
            .filter_map(|&id| rule(id).map(|r| (id, r)))
            .collect();
        asked_rules.sort_by_key(|(id, _)| *id);
        for &b in target {
            let Some(rb) =
                rule(b).filter(|r| matches!(r.action(), Action::Proxy | Action::Passthrough))
            else {
                continue;
            };
            // The target rule's ports no earlier rule of the asked name has taken yet.
            let mut open = port_set(rb.ports());
            for (_, ra) in &asked_rules {
                if open.is_empty() {
                    break;
                }
                let protocols =
                    ra.protocol().covers(rb.protocol()) || rb.protocol().covers(ra.protocol());
                if !protocols || !super::compile::ports_overlap(&open, ra.ports()) {
                    continue;
                }
                if ra.action() == Action::Allow {
                    return Some((ra.name(), rb.name()));
                }
                // Taken (through the proxy, or refused) only where it applies to every
                // connection the target's rule would carry.
                if ra.protocol().covers(rb.protocol()) {
                    open = subtract(&open, &port_set(ra.ports()));
                }
            }
        }
        None
    }

    /// The static entry list at exactly `net` (an IPv4-mapped prefix is taken as IPv4),
    /// as [`Policy::kernel_rules`] has it; `None` when no rule lists that prefix. The
    /// daemon restores it when a learned entry at the same prefix expires.
    pub fn static_entry(&self, net: IpNet) -> Option<PrefixRules> {
        let net = normalise_net(net);
        self.rules
            .iter()
            .any(|rule| rule.nets.contains(&net))
            .then(|| self.prefix_rules(net).ok())
            .flatten()
    }

    fn prefix_rules(&self, prefix: IpNet) -> Result<PrefixRules, KernelRulesError> {
        let order = self.applying(prefix);
        self.list(prefix, &order)
    }

    /// Indices of the rules with a destination containing `prefix`, ordered as
    /// `decide()` tries them: longest such destination first, then policy order.
    fn applying(&self, prefix: IpNet) -> Vec<usize> {
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
        applying.into_iter().map(|(_, index)| index).collect()
    }

    /// The entries of the rules at `order` (indices), in that order, as one list.
    fn list(&self, prefix: IpNet, order: &[usize]) -> Result<PrefixRules, KernelRulesError> {
        let mut entries = Vec::new();
        for &index in order {
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
                rules: order
                    .iter()
                    .filter_map(|&i| self.rules.get(i))
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

/// A rule's ports as ranges (none: every port).
fn port_set(ports: &[(u16, u16)]) -> Vec<(u16, u16)> {
    if ports.is_empty() {
        vec![(0, u16::MAX)]
    } else {
        ports.to_vec()
    }
}

/// The ports of `set` not in `taken` (both as ranges).
fn subtract(set: &[(u16, u16)], taken: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut left = set.to_vec();
    for &(tlo, thi) in taken {
        let mut next = Vec::new();
        for (lo, hi) in left {
            if thi < lo || hi < tlo {
                next.push((lo, hi));
                continue;
            }
            if lo < tlo {
                next.push((lo, tlo - 1));
            }
            if thi < hi {
                next.push((thi + 1, hi));
            }
        }
        left = next;
    }
    left
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    #[test]
    fn names_sharing_an_address_must_not_cross_the_proxy() {
        let policy = parse_str(
            "version: 1\ndefault: deny\nrules:\n\
             - {name: pkgs, to: [files.example], ports: [443], protocol: tcp, action: allow}\n\
             - {name: api, to: [api.example], ports: [443], action: proxy}\n\
             - {name: web, to: [web.example], ports: [80], protocol: tcp, action: allow}\n\
             - {name: dns, to: [ns.example], ports: [443], protocol: udp, action: allow}\n\
             - {name: more, to: [more.example], ports: [443], protocol: tcp, action: allow}\n",
            "t.yaml",
        )
        .unwrap();
        let (pkgs, api, web, dns, more) = (1, 2, 3, 4, 5);
        assert_eq!(
            policy.crossing_paths(&[pkgs], &[api]),
            Some(("pkgs", "api"))
        );
        assert_eq!(
            policy.crossing_paths(&[api], &[pkgs]),
            Some(("api", "pkgs"))
        );
        // Other ports, another protocol, or the same kind: no crossing.
        assert_eq!(policy.crossing_paths(&[web], &[api]), None);
        assert_eq!(policy.crossing_paths(&[dns], &[api]), None);
        assert_eq!(policy.crossing_paths(&[pkgs], &[more]), None);
    }

    /// A CNAME target served through the proxy is overtaken when the first rule of the
    /// asked name that takes one of its ports lets connections straight out, whether or
    /// not the asked name holds the proxy rule too; not when an earlier rule of the asked
    /// name sends those ports through the proxy itself.
    #[test]
    fn a_proxied_target_is_overtaken_by_the_asked_names_first_match() {
        let policy = |rules: &str| {
            parse_str(
                &format!("version: 1\ndefault: deny\nrules:\n{rules}"),
                "t.yaml",
            )
            .unwrap()
        };
        // Whether `edge.x.example`, a CNAME target of `www.x.example`, is overtaken.
        let overtaken = |rules: &str| {
            let p = policy(rules);
            p.proxy_overtaken(
                &p.rules_for_name("www.x.example"),
                &p.rules_for_name("edge.x.example"),
            )
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        };
        // The asked name allowed straight out, the target through the proxy. (An allow
        // ahead of a proxy rule both names match is refused when the policy is read.)
        assert_eq!(
            overtaken(
                "- {name: www, to: [www.x.example], ports: [443], action: allow}\n\
             - {name: edge, to: [edge.x.example], ports: [443], action: proxy}\n",
            ),
            Some(("www".to_owned(), "edge".to_owned()))
        );
        assert!(parse_str(
            "version: 1\nrules:\n\
             - {name: www, to: [www.x.example], ports: [443], action: allow}\n\
             - {name: all, to: [\"*.x.example\"], ports: [443], action: proxy}\n",
            "t.yaml"
        )
        .is_err());
        // The asked name's own proxy rule first: its allow never takes port 443.
        assert_eq!(
            overtaken(
                "- {name: www, to: [www.x.example], ports: [443], action: proxy}\n\
             - {name: edge, to: [edge.x.example], ports: [443], action: proxy}\n\
             - {name: rest, to: [\"**.x.example\"], ports: [443], action: allow}\n",
            ),
            None
        );
        // ...unless it takes only some of the target's ports.
        assert_eq!(
            overtaken(
                "- {name: www, to: [www.x.example], ports: [443], action: proxy}\n\
             - {name: edge, to: [edge.x.example], ports: [443, 8443], action: proxy}\n\
             - {name: rest, to: [\"**.x.example\"], ports: [443, 8443], action: allow}\n",
            ),
            Some(("rest".to_owned(), "edge".to_owned()))
        );
        // Other ports: nothing to overtake.
        assert_eq!(
            overtaken(
                "- {name: www, to: [www.x.example], ports: [80], action: allow}\n\
             - {name: edge, to: [edge.x.example], ports: [443], action: proxy}\n",
            ),
            None
        );
    }

    #[test]
    fn port_ranges_subtract() {
        assert_eq!(subtract(&[(0, 100)], &[(10, 20)]), [(0, 9), (21, 100)]);
        assert_eq!(subtract(&[(10, 20)], &[(0, 100)]), []);
        assert_eq!(
            subtract(&[(0, 65535)], &[(0, 0), (65535, 65535)]),
            [(1, 65534)]
        );
        assert_eq!(port_set(&[]), [(0, u16::MAX)]);
    }

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
        let list = match crate::net::judged_as(ip) {
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

    /// `k` with `list` written at `ip`/32 or /128, as the daemon writes a learned entry
    /// (replacing a static entry at the same prefix).
    fn with_entry(k: &KernelRules, ip: IpAddr, list: Option<PrefixRules>) -> KernelRules {
        let mut k = k.clone();
        match crate::net::judged_as(ip) {
            IpAddr::V4(a) => {
                let net = Ipv4Net::from(a);
                k.v4.retain(|(n, _)| *n != net);
                k.v4.extend(list.map(|l| (net, l)));
                k.v4.sort_by_key(|(n, _)| *n);
            }
            IpAddr::V6(a) => {
                let net = Ipv6Net::from(a);
                k.v6.retain(|(n, _)| *n != net);
                k.v6.extend(list.map(|l| (net, l)));
                k.v6.sort_by_key(|(n, _)| *n);
            }
        }
        k
    }

    /// Names that the generated and handwritten policies' patterns match in various ways.
    const QUERIES: [&str; 6] = [
        "a.example",
        "b.a.example",
        "x.example",
        "api.github.com",
        "other.test",
        "a.other.test",
    ];

    fn assert_kernel_equals_decide(src: &str, rng: &mut Lcg) {
        let policy = parse_str(src, "gen.yaml").unwrap();
        let k = policy.kernel_rules().unwrap();
        let mut ports = vec![0u16, 1, 2, 22, 53, 79, 80, 81, 443, 444, 8080, 65534, 65535];
        for rule in policy.rules() {
            for &(lo, hi) in rule.ports() {
                ports.extend([lo - 1, lo, hi, hi.saturating_add(1)]);
            }
        }
        let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Any];
        let probes = probe_addrs(&k, rng);
        for &ip in &probes {
            for &port in &ports {
                for protocol in protocols {
                    assert_eq!(
                        kernel_decide(&k, policy.default_action(), ip, port, protocol),
                        policy.decide(ip, port, protocol),
                        "{ip} port {port} {protocol}\n{src}"
                    );
                }
            }
        }

        // Learned addresses: some probes (at and beside static prefixes, in both
        // families, mapped or not), each learned for one query's rules or for any rules.
        let all: Vec<u16> = (1..=policy.rules().len() as u16).collect();
        for (n, &ip) in probes.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
            let rule_ids = match n % 4 {
                3 => all.iter().copied().filter(|_| rng.one_in(2)).collect(),
                _ => {
                    let query: &&str = rng.pick(&QUERIES);
                    policy.rules_for_name(query)
                }
            };
            let Ok(list) = policy.learned_entries(ip, &rule_ids) else {
                continue;
            };
            let learned = with_entry(&k, ip, Some(list));
            for &port in &ports {
                for protocol in protocols {
                    assert_eq!(
                        kernel_decide(&learned, policy.default_action(), ip, port, protocol),
                        policy.decide_learned(ip, port, protocol, &rule_ids),
                        "learned {ip} for rules {rule_ids:?}, port {port} {protocol}\n{src}"
                    );
                }
            }
            // Other addresses are not affected.
            let other = probes[(n + 1) % probes.len()];
            if crate::net::judged_as(other) != crate::net::judged_as(ip) {
                assert_eq!(
                    kernel_decide(&learned, policy.default_action(), other, 443, Protocol::Tcp),
                    policy.decide(other, 443, Protocol::Tcp),
                    "{other} beside learned {ip}\n{src}"
                );
            }
            // Expiry restores exactly the static maps.
            let host = IpNet::from(crate::net::judged_as(ip));
            let expired = with_entry(&learned, ip, policy.static_entry(host));
            assert_eq!(expired, k, "after {ip} expired\n{src}");
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
            "version: 1
default: audit
rules:
  - {name: no-b, to: [b.a.example], action: deny}
  - {name: gh, to: [api.github.com, 192.0.2.10], ports: [443], action: proxy}
  - {name: web, to: [\"**.example\", 192.0.2.0/24], ports: [80, 443], protocol: tcp, action: allow}
  - {name: one, to: [\"*.example\"], ports: [\"1-1024\"], protocol: udp, action: allow}
  - {name: net, to: [10.0.0.0/8, \"2001:db8::/32\"], ports: [22], action: deny}
  - {name: pin, to: [\"*.other.test\"], action: passthrough}
  - {name: late, to: [other.test, 10.1.0.0/16], ports: [8080], action: deny}
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
        let names = [
            "a.example",
            "*.example",
            "**.example",
            "*.a.example",
            "b.a.example",
            "api.github.com",
            "**.test",
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
                    let pool: &[&str] = if rng.one_in(3) {
                        &nets6
                    } else if rng.one_in(3) {
                        &names
                    } else {
                        &nets4
                    };
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
            // Random rules can shadow each other in ways the policy refuses (a deny
            // after an allow of the same names): nothing to compare then.
            if let Err(e) = parse_str(&src, "gen.yaml") {
                let e = e.to_string();
                assert!(e.contains("this deny would never apply"), "{src}\n{e}");
                continue;
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
    fn learned_entries_keep_static_rules() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: net, to: [192.0.2.0/24], ports: [80], protocol: tcp, action: allow}
  - {name: host, to: [192.0.2.7], ports: [22], action: deny}
  - {name: api, to: [api.example.com], ports: [443], protocol: tcp, action: allow}
  - {name: both, to: [192.0.2.0/25, \"*.example.com\"], ports: [\"9000-9001\"], action: allow}
  - {name: six, to: [\"2001:db8::/32\"], action: deny}
  - {name: gh, to: [api.example.com], ports: [8443], action: proxy}
",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(policy.rules_for_name("api.example.com"), [3, 4, 6]);
        let entries = |l: &PrefixRules| l.entries[..l.count as usize].to_vec();
        let entry = |port_lo, port_hi, rule_id, protocol, action| RuleEntry {
            port_lo,
            port_hi,
            rule_id,
            protocol,
            action,
        };
        let api = entry(443, 443, 3, proto::TCP, action::ALLOW);
        let both = entry(9000, 9001, 4, proto::ANY, action::ALLOW);
        let gh = entry(8443, 8443, 6, proto::TCP, action::PROXY);
        let host = entry(22, 22, 2, proto::ANY, action::DENY);
        let net = entry(80, 80, 1, proto::TCP, action::ALLOW);
        let six = entry(0, 65535, 5, proto::ANY, action::DENY);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();

        // Name rules first (policy order, whatever order the ids come in), then the
        // static rules for the address, longest prefix first; `both` is not repeated.
        for (addr, ids) in [
            ("192.0.2.7", &[3, 4, 6][..]),
            ("::ffff:192.0.2.7", &[6, 4, 3, 4]),
        ] {
            let list = policy.learned_entries(ip(addr), ids).unwrap();
            assert_eq!(entries(&list), [api, both, gh, host, net], "{addr}");
        }
        assert_eq!(
            entries(&policy.learned_entries(ip("192.0.2.7"), &[3]).unwrap()),
            [api, host, both, net]
        );
        // Outside the static prefixes only the name rules apply; unknown ids are ignored.
        assert_eq!(
            entries(
                &policy
                    .learned_entries(ip("198.51.100.1"), &[3, 0, 99])
                    .unwrap()
            ),
            [api]
        );
        assert_eq!(
            entries(&policy.learned_entries(ip("2001:db8::1"), &[3]).unwrap()),
            [api, six]
        );
        // No name rules: exactly what the static list for that address says.
        assert_eq!(
            entries(&policy.learned_entries(ip("192.0.2.7"), &[]).unwrap()),
            [host, both, net]
        );

        // Static lists by exact prefix, for restoring after a learned entry expires.
        let net_of = |s: &str| s.parse::<IpNet>().unwrap();
        let k = policy.kernel_rules().unwrap();
        let host_list = k.v4.iter().find(|(n, _)| n.prefix_len() == 32).unwrap().1;
        assert_eq!(policy.static_entry(net_of("192.0.2.7/32")), Some(host_list));
        assert_eq!(
            policy.static_entry(net_of("::ffff:192.0.2.7/128")),
            Some(host_list)
        );
        assert_eq!(entries(&host_list), [host, both, net]);
        assert_eq!(policy.static_entry(net_of("192.0.2.8/32")), None);
        assert_eq!(policy.static_entry(net_of("2001:db8::1/128")), None);
        assert!(policy.static_entry(net_of("2001:db8::/32")).is_some());
        // Names never reach the static maps.
        assert_eq!(k.v4.len(), 3);
        assert_eq!(k.v6.len(), 1);
    }

    #[test]
    fn learned_entries_that_overflow_are_refused() {
        let many: Vec<String> = (1..=15).map(|p| p.to_string()).collect();
        let src = format!(
            "version: 1
rules:
  - {{name: wide, to: [10.0.0.0/8], ports: [80, 443], action: allow}}
  - {{name: named, to: [a.example], ports: [{}], action: allow}}
",
            many.join(", ")
        );
        let policy = parse_str(&src, "t.yaml").unwrap();
        let ids = policy.rules_for_name("a.example");
        let fits = policy.learned_entries("192.0.2.1".parse().unwrap(), &ids);
        assert_eq!(fits.unwrap().count, 15);
        let err = policy
            .learned_entries("10.1.2.3".parse().unwrap(), &ids)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "prefix 10.1.2.3/32 needs 17 kernel entries, more than the 16 allowed per \
             prefix; rules involved: `named` (15 port ranges), `wide` (2 port ranges) (valid: \
             at most 16 (rule, port range) pairs apply to one prefix, counting rules for \
             prefixes that contain it; merge port ranges or rules)"
        );
        // One name rule alone must fit.
        let many: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        let src = format!(
            "version: 1\nrules:\n  - {{name: named, to: [a.example], ports: [{}], action: allow}}\n",
            many.join(", ")
        );
        assert_eq!(
            parse_str(&src, "t.yaml").unwrap_err().to_string(),
            "t.yaml:3:43: rules[0].ports: 17 port ranges, more than the 16 kernel entries one \
             learned address can hold (valid: at most 16 ports and ranges; merge them into \
             ranges like \"8000-8100\")"
        );
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

    /// A policy of about 660 KiB: 250 rules, each a /16 and 160 /24s inside it, plus one
    /// rule listing 6,000 addresses. Compiling used to compare every prefix with every
    /// rule, and every destination with the rule's earlier ones (seconds for this one);
    /// now it takes time linear in the policy.
    fn large_policy() -> String {
        let mut y = String::from("version: 1\ndefault: deny\nrules:\n");
        for r in 0..250u32 {
            y.push_str(&format!(
                "  - name: r{r}\n    ports: [443]\n    protocol: tcp\n    action: allow\n    to: [10.{r}.0.0/16",
            ));
            for k in 0..160u32 {
                y.push_str(&format!(", 10.{r}.{k}.0/24"));
            }
            y.push_str("]\n");
        }
        y.push_str("  - name: many\n    ports: [80]\n    action: allow\n    to: [");
        for i in 0..6000u32 {
            y.push_str(&format!("203.0.{}.{}, ", i / 250, i % 250));
        }
        y.push_str("203.0.113.0/24]\n");
        y
    }

    #[test]
    fn large_policies_compile_in_linear_time_and_match_the_direct_lists() {
        let y = large_policy();
        assert!(y.len() > 600 * 1024 && y.len() < 1 << 20, "{}", y.len());
        let t = std::time::Instant::now();
        crate::policy::parse_raw(&y, "large.yaml").unwrap();
        let parsed = t.elapsed();
        // parse_str compiles, kernel entries included.
        let p = parse_str(&y, "large.yaml").unwrap();
        let took = t.elapsed() - parsed;
        let t = std::time::Instant::now();
        let k = p.build_kernel_rules().unwrap();
        let kernel = t.elapsed();
        eprintln!(
            "{} bytes: YAML {parsed:?}, parse and compile {took:?} (kernel entries {kernel:?})",
            y.len()
        );
        assert_eq!(p.kernel_rules().unwrap(), k);
        // Debug build, shared CI machine: generous, but far below the quadratic seconds.
        assert!(took < std::time::Duration::from_secs(8), "took {took:?}");
        // The indexed lists are exactly what scanning every rule gives.
        for (net, list) in k.v4.iter().step_by(199) {
            assert_eq!(p.prefix_rules(IpNet::V4(*net)).unwrap(), *list, "at {net}");
        }
        assert!(k.v4.len() > 6000);
    }
}
