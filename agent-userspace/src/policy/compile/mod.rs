//! `compile()`: checks a [`RawPolicy`] as a whole and turns it into an immutable [`Policy`]
//! whose every rule the kernel can hold. Nothing downstream re-validates a `Policy`, so
//! every invariant the decision and kernel code rely on is established here.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use agent_common::MAX_RULES_PER_PREFIX;
use ipnet::{IpNet, Ipv4Net};

use super::{
    dns::{compile_dns, DnsConfig},
    error::{CompileError, FieldPath},
    host::HostPattern,
    kernel::KernelRulesError,
    raw::{
        check_host_bits, check_port_range, RawAction, RawDefault, RawDest, RawPolicy, VALID_PORTS,
    },
};

mod names;
mod rule;
mod test_cases;

pub use names::DAEMON_RULE_NAMES;
use names::{check_name, compile_answers};
use rule::compile_proxied;
pub(in crate::policy) use rule::ports_overlap;
pub use rule::{Action, DefaultAction, Protocol, Rule};
use test_cases::{compile_test, Test};
pub use test_cases::{NameTest, NameTestKind, PolicyTest, RequestTest};

/// A proxy or passthrough rule must not name loopback addresses (in `to` or `answers`):
/// the proxy dials from the daemon's network namespace (or `proxy.upstream_netns`), where
/// `127.0.0.1` is the host's loopback, never the sandbox's: such a rule would hand the
/// sandbox the host's local services, with a credential added.
fn check_not_loopback(net: &IpNet, action: RawAction, at: FieldPath) -> Result<(), CompileError> {
    if !matches!(action, RawAction::Proxy | RawAction::Passthrough)
        || !crate::net::names_loopback(net)
    {
        return Ok(());
    }
    let action = match action {
        RawAction::Proxy => "proxy",
        _ => "passthrough",
    };
    Err(CompileError::new(
        at,
        format!(
            "{net} is a loopback address, and `action: {action}` connections are made from \
             the daemon's network namespace, where loopback is the host's, not the \
             sandbox's (valid: `action: allow` for a service on the sandbox's own loopback, \
             or an address the daemon reaches as the sandbox would)"
        ),
    ))
}

/// A proxy or passthrough rule's names must not be allowed directly by an earlier `allow`
/// rule on a port both take: an address learned for such a name gets its rules in file
/// order, so the kernel would let the connection through before the proxy rule is
/// reached, and nothing the proxy rule checks (requests, git refs, the credential) would
/// apply, while `request:` tests still judged them as the proxy would.
fn check_shadowed_proxy_names(rules: &[Rule], root: &FieldPath) -> Result<(), CompileError> {
    for (i, rule) in rules.iter().enumerate() {
        if !matches!(rule.action, Action::Proxy | Action::Passthrough) {
            continue;
        }
        for earlier in &rules[..i] {
            // Two rules that serve a name on one port: the connection is served by the
            // rule of the name the sandbox resolved, whatever name it then asks for, so
            // whose checks and credential apply would depend on that choice (and a
            // `request:` test judges by the first).
            // (Only where one address can be both rules': a name may resolve anywhere.)
            let may_meet = !rule.names.is_empty()
                || !earlier.names.is_empty()
                || rule.nets.iter().any(|n| {
                    earlier
                        .nets
                        .iter()
                        .any(|e| e.contains(&n.network()) || n.contains(&e.network()))
                });
            if matches!(earlier.action, Action::Proxy | Action::Passthrough)
                && may_meet
                && ports_overlap(&earlier.ports, &rule.ports)
            {
                let shared = rule
                    .hosts
                    .iter()
                    .find(|n| earlier.hosts.iter().any(|e| e.overlaps(n)));
                if let Some(name) = shared {
                    return Err(CompileError::new(
                        root.key("rules").index(i).key("to"),
                        format!(
                            "serves names matching `{}` that the earlier rule `{}` serves too, \
                             on a port both take: which rule's checks and credential apply \
                             would depend on the name the sandbox resolved (valid: one proxy \
                             or passthrough rule per name and port; narrow `hosts` or `ports`)",
                            name, earlier.name
                        ),
                    ));
                }
                continue;
            }
            if earlier.action != Action::Allow
                || !earlier.protocol.covers(Protocol::Tcp)
                || !ports_overlap(&earlier.ports, &rule.ports)
            {
                continue;
            }
            let shared = rule
                .names
                .iter()
                .find(|n| earlier.names.iter().any(|e| e.overlaps(n)));
            if let Some(name) = shared {
                return Err(CompileError::new(
                    root.key("rules").index(i).key("to"),
                    format!(
                        "names matching `{}` are allowed directly by the earlier rule `{}` on \
                         a port this rule takes, so their connections would never reach the \
                         proxy and nothing this rule checks would apply (valid: put this \
                         rule before `{}`, or narrow that rule's names or ports)",
                        name, earlier.name, earlier.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A proxy or passthrough rule's networks must not be taken by an earlier `allow` rule of
/// the same network on a port both take: the kernel decides an address by the rules of its
/// longest matching prefix, the first of them in file order whose port and protocol match,
/// so the `allow` lets the connection straight out and nothing the proxy rule checks
/// applies. (A more specific `allow` inside a proxy rule's network is a carve-out the
/// author wrote, and stays valid.)
fn check_shadowed_proxy_nets(rules: &[Rule], root: &FieldPath) -> Result<(), CompileError> {
    // Each network of a TCP `allow` rule, with the first such rule listing it.
    let mut allowed: HashMap<IpNet, Vec<usize>> = HashMap::new();
    for (j, rule) in rules.iter().enumerate() {
        if rule.action == Action::Allow && rule.protocol.covers(Protocol::Tcp) {
            for net in &rule.nets {
                allowed.entry(*net).or_default().push(j);
            }
        }
    }
    for (i, rule) in rules.iter().enumerate() {
        if !matches!(rule.action, Action::Proxy | Action::Passthrough) {
            continue;
        }
        for net in &rule.nets {
            let taken = allowed.get(net).and_then(|js| {
                js.iter()
                    .copied()
                    .find(|&j| j < i && ports_overlap(&rules[j].ports, &rule.ports))
            });
            if let Some(j) = taken {
                let other = &rules[j].name;
                return Err(CompileError::new(
                    root.key("rules").index(i).key("to"),
                    format!(
                        "the address {net} is allowed directly by the earlier rule `{other}` on \
                         a port this rule takes, so connections there would never reach the \
                         proxy and nothing this rule checks would apply (valid: put this rule \
                         before `{other}`, or narrow that rule's ports)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A `deny` rule's names must not be matched already by an earlier rule that is not a
/// `deny`: the first rule whose names match decides whether a name resolves, so a name of
/// the deny that such a rule wholly covers would resolve, and the `deny` would never apply
/// to it.
fn check_dead_deny_names(rules: &[Rule], root: &FieldPath) -> Result<(), CompileError> {
    for (i, rule) in rules.iter().enumerate() {
        if rule.action != Action::Deny {
            continue;
        }
        for name in &rule.names {
            let earlier = rules[..i].iter().find_map(|e| {
                (e.action != Action::Deny)
                    .then(|| e.names.iter().find(|n| n.covers(name)).map(|n| (e, n)))
                    .flatten()
            });
            if let Some((earlier, by)) = earlier {
                return Err(CompileError::new(
                    root.key("rules").index(i).key("to"),
                    format!(
                        "every name matching `{name}` is matched first by `{by}` of the earlier \
                         rule `{}`, and the first rule whose names match decides whether a name \
                         resolves, so this deny would never apply (valid: put this rule before \
                         `{}`)",
                        earlier.name, earlier.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The only policy format version.
pub const POLICY_VERSION: u64 = 1;
/// Rule ids are 1-based and 0 means "the default"; the limit keeps ids small in events.
pub const MAX_RULES: usize = 255;
/// Test `rule:` values that mean "the default decided"; no rule may be named so.
pub(super) const DEFAULT_RULE_WORDS: [&str; 2] = ["none", "default"];

/// A checked policy. Built only by `compile()`, so it always satisfies the invariants
/// listed there, and it fits the kernel's maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub(in crate::policy) default: DefaultAction,
    pub(in crate::policy) dns: Option<DnsConfig>,
    /// `require.no_capabilities`: capability names, checked.
    pub(in crate::policy) no_capabilities: Vec<String>,
    /// `require.non_inet_sockets_refused`.
    pub(in crate::policy) non_inet_sockets_refused: bool,
    pub(in crate::policy) rules: Vec<Rule>,
    pub(in crate::policy) tests: Vec<PolicyTest>,
    pub(in crate::policy) request_tests: Vec<RequestTest>,
    pub(in crate::policy) name_tests: Vec<NameTest>,
    pub(in crate::policy) alerts: crate::alerts::AlertSettings,
    /// The kernel entries, computed once by `compile()` (which must check that they fit).
    pub(in crate::policy) kernel: std::sync::OnceLock<super::KernelRules>,
}

impl Policy {
    /// What happens when no rule matches.
    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    /// Rules in file order; rule id `n` is `rules()[n - 1]`.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The `alerts:` section (empty when the file has none: the daemon's settings apply).
    pub fn alerts(&self) -> &crate::alerts::AlertSettings {
        &self.alerts
    }

    /// Capabilities no sandbox process may hold at attach (`require.no_capabilities`).
    pub fn no_capabilities(&self) -> &[String] {
        &self.no_capabilities
    }

    /// Whether the attach needs non-inet sockets refused in the sandbox
    /// (`require.non_inet_sockets_refused`).
    pub fn requires_non_inet_refused(&self) -> bool {
        self.non_inet_sockets_refused
    }

    /// The `dns:` section; `None` when the file has none (the daemon's settings apply).
    pub fn dns(&self) -> Option<&DnsConfig> {
        self.dns.as_ref()
    }

    /// The policy's own `connect:` tests to addresses, in file order.
    pub fn tests(&self) -> &[PolicyTest] {
        &self.tests
    }

    /// The policy's own `resolve:` tests and `connect:` tests to names, in file order.
    pub fn name_tests(&self) -> &[NameTest] {
        &self.name_tests
    }

    /// The policy's own `request:` tests, in file order.
    pub fn request_tests(&self) -> &[RequestTest] {
        &self.request_tests
    }

    /// The rule with a 1-based id; `None` for 0 (the default) and unknown ids.
    pub fn rule(&self, rule_id: u16) -> Option<&Rule> {
        usize::from(rule_id)
            .checked_sub(1)
            .and_then(|i| self.rules.get(i))
    }

    /// The name of the rule with a 1-based id; `None` for 0 (the default) and unknown ids.
    pub fn rule_name(&self, rule_id: u16) -> Option<&str> {
        self.rule(rule_id).map(Rule::name)
    }

    /// The proxy or passthrough rule with a 1-based id, as found in a redirected
    /// connection; `None` for 0, unknown ids and rules with other actions.
    pub fn proxy_rule(&self, rule_id: u16) -> Option<&Rule> {
        self.rule(rule_id)
            .filter(|r| r.is_proxy() || r.is_passthrough())
    }

    /// Whether the resolver answers questions of `qtype`: A and AAAA always, others when
    /// `dns.query_types` lists them.
    pub fn query_type_allowed(&self, qtype: hickory_proto::rr::RecordType) -> bool {
        use hickory_proto::rr::RecordType;
        matches!(qtype, RecordType::A | RecordType::AAAA)
            || self
                .dns
                .as_ref()
                .is_some_and(|d| d.query_types.contains(&qtype))
    }

    /// `dns.budget`, or the defaults.
    pub fn dns_budget(&self) -> super::DnsBudget {
        self.dns.as_ref().map(|d| d.budget).unwrap_or_default()
    }

    /// Why `addr`, in an answer for a name whose rules are `rule_ids`, is outside what
    /// those rules' `answers` allow (it must lie in the `answers` of every one that has
    /// them); `None` when it may be learned as far as `answers` go.
    pub fn answer_refusal(&self, rule_ids: &[u16], addr: IpAddr) -> Option<String> {
        let addr = crate::net::judged_as(addr);
        rule_ids
            .iter()
            .filter_map(|&id| self.rule(id))
            .find_map(|rule| {
                let pins = rule.answers()?;
                (!pins.iter().any(|n| n.contains(&addr))).then(|| {
                    format!(
                        "the address is outside the `answers` of rule `{}`",
                        rule.name()
                    )
                })
            })
    }

    /// The wildcard patterns (`*.x`, `**.x`) of the rules in `rule_ids` that match
    /// `qname`, written out, each once: the suffixes whose name budget the query spends.
    pub fn wildcards_for_name(&self, rule_ids: &[u16], qname: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for rule in rule_ids.iter().filter_map(|&id| self.rule(id)) {
            for pattern in rule.names() {
                let text = pattern.to_string();
                if pattern.is_wildcard() && pattern.matches(qname) && !out.contains(&text) {
                    out.push(text);
                }
            }
        }
        out
    }

    /// The credentials the rules name, sorted, each once: the daemon must have all of
    /// them configured before it applies this policy.
    pub fn credential_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.rules.iter().filter_map(Rule::credential).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// `::ffff:a.b.c.d/n` (n >= 96) becomes `a.b.c.d/(n - 96)`: the kernel judges mapped
/// destinations by the IPv4 rules, so that is where such a prefix must go. (A NAT64
/// prefix is refused instead: see `raw::check_nat64`.)
pub fn normalise_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if let Some(len) = v6.prefix_len().checked_sub(96) {
                if let Ok(n) = Ipv4Net::new(v4, len) {
                    return IpNet::V4(n);
                }
            }
        }
    }
    net
}

/// Checks `raw` and builds the policy. Fails on the first problem found, naming the
/// field; a failing policy is never partly applied.
///
/// Checked here: the version; a `dns:` section's upstreams (at least one) and limits
/// (`min_ttl` at most a day, `grace` at most an hour); at most [`MAX_RULES`] rules; rule
/// names non-empty, `[A-Za-z0-9_.-]`, unique and not `none`/`default`; at least one
/// destination per rule (addresses, CIDRs or host names), none with host bits set; port
/// ranges within 1-65535 with `lo <= hi`, and `ports:` not an empty list; that proxy and
/// passthrough rules have non-empty `hosts` (given, or the names of `to`) and are TCP,
/// that passthrough rules have no `credential` or `http`, and allow and deny rules none of
/// the three; non-empty `http`, `methods` and `paths` lists; each test has exactly one of
/// `connect:`, `request:` and `resolve:`, a `rule:` naming a rule that can decide it (for
/// a request a proxy or passthrough rule, for a name a rule with names), and for a request
/// or a name `expect: allow|deny`; a `credential:` (requests only) some rule injects; and
/// that the kernel can hold every prefix's rules, and every name rule's entries for one
/// learned address.
pub fn compile(raw: &RawPolicy) -> Result<Policy, CompileError> {
    let root = FieldPath::root();
    if raw.version != POLICY_VERSION {
        return Err(CompileError::new(
            root.key("version"),
            format!(
                "unsupported policy version {} (valid: {POLICY_VERSION})",
                raw.version
            ),
        ));
    }
    if raw.rules.len() > MAX_RULES {
        return Err(CompileError::new(
            root.key("rules"),
            format!(
                "{} rules, more than the {MAX_RULES} a policy may have (valid: at most \
                 {MAX_RULES} rules; list several destinations or ports in one rule)",
                raw.rules.len()
            ),
        ));
    }

    let dns = raw
        .dns
        .as_ref()
        .map(|d| compile_dns(d, &root.key("dns")))
        .transpose()?;

    let alerts = match &raw.alerts {
        None => crate::alerts::AlertSettings::default(),
        Some(a) => crate::alerts::AlertSettings::compile(a)
            .map_err(|e| CompileError::new(root.key("alerts").key(e.field), e.message))?,
    };

    let mut rules = Vec::with_capacity(raw.rules.len());
    let mut names: HashMap<&str, usize> = HashMap::new();
    // Where each prefix is first written, to point kernel-limit errors at the file.
    let mut first_seen: HashMap<IpNet, FieldPath> = HashMap::new();
    for (i, raw_rule) in raw.rules.iter().enumerate() {
        let at = root.key("rules").index(i);
        check_name(&raw_rule.name).map_err(|m| CompileError::new(at.key("name"), m))?;
        if let Some(first) = names.insert(raw_rule.name.as_str(), i) {
            return Err(CompileError::new(
                at.key("name"),
                format!(
                    "rule name `{}` is already used by rules[{first}] (valid: a name no \
                     other rule has)",
                    raw_rule.name
                ),
            ));
        }

        if raw_rule.to.is_empty() {
            return Err(CompileError::new(
                at.key("to"),
                "a rule needs at least one destination (valid: a list of IP addresses, \
                 CIDRs and host names, like [192.0.2.7, 10.0.0.0/8, api.example.com])",
            ));
        }
        // Duplicates are dropped through sets, keeping the first occurrence's order: a rule
        // may list tens of thousands of destinations.
        let mut nets = Vec::with_capacity(raw_rule.to.len());
        let mut seen_nets = HashSet::with_capacity(raw_rule.to.len());
        let mut host_names: Vec<HostPattern> = Vec::new();
        let mut seen_names = HashSet::new();
        for (j, dest) in raw_rule.to.iter().enumerate() {
            let net = match dest {
                RawDest::Net(net) => *net,
                RawDest::Host(pattern) => {
                    if seen_names.insert(pattern) {
                        host_names.push(pattern.clone());
                    }
                    continue;
                }
            };
            check_host_bits(net).map_err(|m| CompileError::new(at.key("to").index(j), m))?;
            let net = normalise_net(net);
            check_not_loopback(&net, raw_rule.action, at.key("to").index(j))?;
            if seen_nets.insert(net) {
                nets.push(net);
            }
            first_seen
                .entry(net)
                .or_insert_with(|| at.key("to").index(j));
        }

        let ports = match &raw_rule.ports {
            None => Vec::new(),
            Some(list) if list.is_empty() => {
                return Err(CompileError::new(
                    at.key("ports"),
                    "an empty port list matches nothing (valid: omit `ports` for any port, \
                     or list ports and ranges like [443, \"8000-8100\"])",
                ));
            }
            Some(list) => {
                let mut ports = Vec::with_capacity(list.len());
                for (j, range) in list.iter().enumerate() {
                    check_port_range(range.lo, range.hi).map_err(|why| {
                        CompileError::new(
                            at.key("ports").index(j),
                            format!(
                                "invalid port range {}-{}: {why} ({VALID_PORTS})",
                                range.lo, range.hi
                            ),
                        )
                    })?;
                    ports.push((range.lo, range.hi));
                }
                ports
            }
        };

        let action = match raw_rule.action {
            RawAction::Allow => Action::Allow,
            RawAction::Deny => Action::Deny,
            RawAction::Proxy => Action::Proxy,
            RawAction::Passthrough => Action::Passthrough,
        };
        let proxied = compile_proxied(raw_rule, action, &host_names, &at)?;
        // Without ports, a credential goes to whatever TLS service at the rule's addresses
        // the sandbox connects to (an admin or debug listener that logs headers), on any
        // port: a credential is bound to the ports its service answers on.
        if proxied.credential.is_some() && ports.is_empty() {
            return Err(CompileError::new(
                at.key("credential"),
                "a rule that injects a credential must list its `ports`: without them the \
                 credential is sent to any TLS service at the rule's addresses, on any port \
                 the sandbox connects to (valid: `ports: [443]`, or the ports the service \
                 answers on)",
            ));
        }

        // A learned address gets the entries of every rule its name matched; one rule's
        // must fit on their own. (Static prefixes are checked below, with their whole
        // lists; a learned list that overflows is refused when it is built.)
        let own_entries = ports.len().max(1);
        if !host_names.is_empty() && own_entries > MAX_RULES_PER_PREFIX {
            return Err(CompileError::new(
                at.key("ports"),
                format!(
                    "{own_entries} port ranges, more than the {MAX_RULES_PER_PREFIX} kernel \
                     entries one learned address can hold (valid: at most \
                     {MAX_RULES_PER_PREFIX} ports and ranges; merge them into ranges like \
                     \"8000-8100\")"
                ),
            ));
        }

        let answers = compile_answers(raw_rule, &host_names, &at)?;
        for net in answers.as_deref().unwrap_or_default() {
            check_not_loopback(net, raw_rule.action, at.key("answers"))?;
        }
        rules.push(Rule {
            name: raw_rule.name.clone(),
            nets,
            names: host_names,
            ports,
            protocol: proxied.protocol,
            action,
            hosts: proxied.hosts,
            credential: proxied.credential,
            http: proxied.http,
            git: proxied.git,
            answers,
        });
    }

    check_shadowed_proxy_names(&rules, &root)?;
    check_shadowed_proxy_nets(&rules, &root)?;
    check_dead_deny_names(&rules, &root)?;

    let mut tests = Vec::new();
    let mut request_tests = Vec::new();
    let mut name_tests = Vec::new();
    for (i, raw_test) in raw.tests.iter().enumerate() {
        let at = root.key("tests").index(i);
        match compile_test(raw_test, i, &names, &rules, at)? {
            Test::Connect(t) => tests.push(t),
            Test::Request(t) => request_tests.push(t),
            Test::Name(t) => name_tests.push(t),
        }
    }

    let mut no_capabilities = Vec::new();
    if let Some(list) = raw
        .require
        .as_ref()
        .and_then(|r| r.no_capabilities.as_ref())
    {
        if list.is_empty() {
            return Err(CompileError::new(
                root.key("require").key("no_capabilities"),
                "an empty capability list requires nothing (valid: names like [sys_admin, \
                 net_admin], or remove `no_capabilities`)",
            ));
        }
        for (i, name) in list.iter().enumerate() {
            let name = name.trim().to_ascii_lowercase();
            let name = name.strip_prefix("cap_").unwrap_or(&name).to_string();
            if crate::posture::capability_bit(&name).is_none() {
                return Err(CompileError::new(
                    root.key("require").key("no_capabilities").index(i),
                    format!(
                        "unknown capability {:?} (valid: lowercase names such as sys_admin, \
                         net_admin, net_raw, bpf)",
                        list[i]
                    ),
                ));
            }
            if !no_capabilities.contains(&name) {
                no_capabilities.push(name);
            }
        }
    }

    let policy = Policy {
        no_capabilities,
        non_inet_sockets_refused: raw
            .require
            .as_ref()
            .is_some_and(|r| r.non_inet_sockets_refused),
        default: match raw.default {
            RawDefault::Deny => DefaultAction::Deny,
            RawDefault::Audit => DefaultAction::Audit,
        },
        dns,
        rules,
        tests,
        request_tests,
        name_tests,
        alerts,
        kernel: std::sync::OnceLock::new(),
    };

    // Rejecting here, not when the maps are written, means a policy that loads always fits.
    match policy.kernel_rules() {
        Ok(_) => Ok(policy),
        Err(e @ KernelRulesError::TooManyEntries { prefix, .. }) => Err(CompileError::new(
            first_seen
                .remove(&prefix)
                .unwrap_or_else(|| root.key("rules")),
            e.to_string(),
        )),
    }
}

/// 1-based id of the rule at `index`. `compile` caps rules at [`MAX_RULES`], so this
/// never saturates for a compiled policy.
pub(super) fn rule_id(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}
