//! `compile()`: checks a [`RawPolicy`] as a whole and turns it into an immutable [`Policy`]
//! whose every rule the kernel can hold. Nothing downstream re-validates a `Policy`, so
//! every invariant the decision and kernel code rely on is established here.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
};

use agent_common::{action, proto, MAX_RULES_PER_PREFIX};
use ipnet::{IpNet, Ipv4Net};

use super::{
    dns::{compile_dns, DnsConfig},
    error::{CompileError, FieldPath},
    host::HostPattern,
    http::HttpRule,
    kernel::KernelRulesError,
    raw::{
        check_host_bits, check_port_range, RawAction, RawConnect, RawDefault, RawDest, RawHttpRule,
        RawName, RawPolicy, RawProtocol, RawRequest, RawRule, RawTarget, RawTest, RawTransport,
        RawVerdict, VALID_PORTS,
    },
    Verdict,
};

/// The only policy format version.
pub const POLICY_VERSION: u64 = 1;
/// Rule ids are 1-based and 0 means "the default"; the limit keeps ids small in events.
pub const MAX_RULES: usize = 255;
/// Test `rule:` values that mean "the default decided"; no rule may be named so.
const DEFAULT_RULE_WORDS: [&str; 2] = ["none", "default"];

/// A checked policy. Built only by `compile()`, so it always satisfies the invariants
/// listed there, and it fits the kernel's maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub(super) default: DefaultAction,
    pub(super) dns: Option<DnsConfig>,
    /// `require.no_capabilities`: capability names, checked.
    pub(super) no_capabilities: Vec<String>,
    pub(super) rules: Vec<Rule>,
    pub(super) tests: Vec<PolicyTest>,
    pub(super) request_tests: Vec<RequestTest>,
    pub(super) name_tests: Vec<NameTest>,
    pub(super) alerts: crate::alerts::AlertSettings,
    /// The kernel entries, computed once by `compile()` (which must check that they fit).
    pub(super) kernel: std::sync::OnceLock<super::KernelRules>,
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
        let addr = addr.to_canonical();
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

/// What happens to a connection no rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DefaultAction {
    Deny,
    /// Allow, but record the connection as one the policy would have denied.
    Audit,
}

impl DefaultAction {
    /// The `agent_common::action` code for `SandboxInfo::default_action`.
    pub fn kernel_code(self) -> u8 {
        match self {
            Self::Deny => action::DENY,
            Self::Audit => action::AUDIT,
        }
    }
}

impl fmt::Display for DefaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Deny => "deny",
            Self::Audit => "audit",
        })
    }
}

/// A checked rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub(super) name: String,
    pub(super) nets: Vec<IpNet>,
    pub(super) names: Vec<HostPattern>,
    pub(super) ports: Vec<(u16, u16)>,
    pub(super) protocol: Protocol,
    pub(super) action: Action,
    /// Non-empty exactly for proxy and passthrough rules; no duplicates.
    pub(super) hosts: Vec<HostPattern>,
    /// Proxy rules only.
    pub(super) credential: Option<String>,
    /// Proxy rules only; non-empty when present.
    pub(super) http: Option<Vec<HttpRule>>,
    /// Proxy rules only: git smart-HTTP checks.
    pub(super) git: Option<std::sync::Arc<super::git::GitRule>>,
    /// Rules with names only: the networks those names may resolve to (non-empty when
    /// present; normalised like `nets`).
    pub(super) answers: Option<Vec<IpNet>>,
}

impl Rule {
    /// The rule's git checks, when it has `git:`.
    pub fn git(&self) -> Option<&std::sync::Arc<super::git::GitRule>> {
        self.git.as_ref()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `answers`: the networks the rule's names may resolve to; `None` when any address
    /// may be learned (special ones still need a rule naming them).
    pub fn answers(&self) -> Option<&[IpNet]> {
        self.answers.as_deref()
    }

    /// The addresses and CIDRs of `to`: host bits clear, IPv4-mapped IPv6 ones turned
    /// into IPv4, no duplicates. Empty when `to` lists only names. Together with
    /// [`Rule::names`], never both empty.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// The host names and wildcards of `to`, normalised, no duplicates. They match no
    /// address by themselves: the rule covers the addresses the daemon learns when the
    /// sandbox resolves a matching name ([`Policy::rules_for_name`]).
    pub fn names(&self) -> &[HostPattern] {
        &self.names
    }

    /// Whether one of [`Rule::names`] matches `qname` (case and one trailing dot
    /// ignored).
    pub fn matches_name(&self, qname: &str) -> bool {
        self.names.iter().any(|n| n.matches(qname))
    }

    /// Inclusive port ranges with `1 <= lo <= hi`. Empty means any port (including 0,
    /// as the kernel's 0-65535 entry does).
    pub fn ports(&self) -> &[(u16, u16)] {
        &self.ports
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn action(&self) -> Action {
        self.action
    }

    /// The names a proxy or passthrough rule serves (non-empty for those, normalised,
    /// without duplicates; when the file omits `hosts`, the names of `to`); empty for
    /// allow and deny rules.
    pub fn hosts(&self) -> &[HostPattern] {
        &self.hosts
    }

    /// Whether one of [`Rule::hosts`] matches `name`, a TLS server name or an HTTP `Host`
    /// without its port. Always false for allow and deny rules.
    pub fn allows_host(&self, name: &str) -> bool {
        self.hosts.iter().any(|h| h.matches(name))
    }

    /// The credential a proxy rule injects: a name from the daemon's configuration.
    pub fn credential(&self) -> Option<&str> {
        self.credential.as_deref()
    }

    /// A proxy rule's request rules (non-empty); `None` when every request is allowed.
    pub fn http(&self) -> Option<&[HttpRule]> {
        self.http.as_deref()
    }

    /// TLS intercepted, requests checked, credential injected.
    pub fn is_proxy(&self) -> bool {
        self.action == Action::Proxy
    }

    /// TLS relayed unchanged once the server name is checked against `hosts`.
    pub fn is_passthrough(&self) -> bool {
        self.action == Action::Passthrough
    }

    /// Whether the rule's port and protocol conditions hold (the address is matched
    /// separately, because its prefix length decides between rules).
    pub fn matches_port(&self, port: u16, protocol: Protocol) -> bool {
        self.protocol.covers(protocol)
            && (self.ports.is_empty()
                || self.ports.iter().any(|&(lo, hi)| lo <= port && port <= hi))
    }
}

/// A transport protocol: a rule's condition, or the protocol of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
}

impl Protocol {
    /// Whether a rule with this protocol applies to a connection using `other`. Like the
    /// kernel, an `Any` rule covers everything and a specific one only itself.
    pub fn covers(self, other: Protocol) -> bool {
        self == Protocol::Any || self == other
    }

    /// The `agent_common::proto` code.
    pub fn kernel_code(self) -> u8 {
        match self {
            Self::Any => proto::ANY,
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Any => "any",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// What a rule does with a matching connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Redirect to the proxy, which terminates TLS, checks requests and injects the
    /// rule's credential.
    Proxy,
    /// Redirect to the proxy, which checks the TLS server name and relays TLS unchanged.
    Passthrough,
}

impl Action {
    /// The `agent_common::action` code.
    pub fn kernel_code(self) -> u8 {
        match self {
            Self::Allow => action::ALLOW,
            Self::Deny => action::DENY,
            Self::Proxy => action::PROXY,
            Self::Passthrough => action::PASSTHROUGH,
        }
    }

    /// The verdict a connection gets when this rule decides it.
    pub fn verdict(self) -> Verdict {
        match self {
            Self::Allow => Verdict::Allow,
            Self::Deny => Verdict::Deny,
            Self::Proxy | Self::Passthrough => Verdict::Redirect,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Proxy => "proxy",
            Self::Passthrough => "passthrough",
        })
    }
}

/// A checked `connect:` policy test to an address ([`NameTest`] holds those to names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTest {
    /// Position in the file's `tests:` list.
    pub(super) index: usize,
    pub(super) text: String,
    pub(super) addr: IpAddr,
    pub(super) port: u16,
    pub(super) protocol: Protocol,
    pub(super) expect: Verdict,
    pub(super) rule_id: u16,
}

impl PolicyTest {
    /// The `connect:` text as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `Tcp` or `Udp`.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn expect(&self) -> Verdict {
        self.expect
    }

    /// 1-based id of the rule that must decide; 0 when the default must.
    pub fn rule_id(&self) -> u16 {
        self.rule_id
    }
}

/// A checked `resolve:` test, or a `connect:` test to a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameTest {
    /// Position in the file's `tests:` list.
    pub(super) index: usize,
    pub(super) text: String,
    pub(super) name: String,
    pub(super) kind: NameTestKind,
    pub(super) expect: Verdict,
    pub(super) rule_id: u16,
}

/// What a [`NameTest`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NameTestKind {
    /// `resolve:`: whether the resolver answers for the name (`expect: allow`) or refuses
    /// it (`deny`), and which rule decides that ([`Policy::decide_name`]).
    Resolve,
    /// `connect: NAME:PORT`: a connection to an address the name resolved to, where no
    /// rule lists that address ([`Policy::decide_name_connect`]).
    Connect { port: u16, protocol: Protocol },
}

impl NameTest {
    /// The `resolve:` or `connect:` text as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The name, lower case, without a trailing dot.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> NameTestKind {
        self.kind
    }

    pub fn expect(&self) -> Verdict {
        self.expect
    }

    /// 1-based id of the rule that must decide; 0 when none may.
    pub fn rule_id(&self) -> u16 {
        self.rule_id
    }
}

/// A checked `request:` policy test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestTest {
    /// Position in the file's `tests:` list.
    pub(super) index: usize,
    pub(super) text: String,
    pub(super) method: String,
    pub(super) url: String,
    pub(super) expect: Verdict,
    pub(super) rule_id: u16,
    pub(super) credential: Option<String>,
}

impl RequestTest {
    /// The `request:` text as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    /// An `https://` URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `Allow` or `Deny`.
    pub fn expect(&self) -> Verdict {
        self.expect
    }

    /// 1-based id of the rule that must decide; 0 when no rule may serve the host.
    pub fn rule_id(&self) -> u16 {
        self.rule_id
    }

    /// The credential that must be injected; `None` for none.
    pub fn credential(&self) -> Option<&str> {
        self.credential.as_deref()
    }
}

/// `::ffff:a.b.c.d/n` (n >= 96) becomes `a.b.c.d/(n - 96)`: the kernel judges mapped
/// destinations by the IPv4 rules, so that is where such a prefix must go.
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
    if let Some(req) = &raw.require {
        for (i, name) in req.no_capabilities.iter().enumerate() {
            let name = name.trim().to_ascii_lowercase();
            let name = name.strip_prefix("cap_").unwrap_or(&name).to_string();
            if crate::posture::capability_bit(&name).is_none() {
                return Err(CompileError::new(
                    root.key("require").key("no_capabilities").index(i),
                    format!(
                        "unknown capability {:?} (valid: lowercase names such as sys_admin, \
                         net_admin, net_raw, bpf)",
                        req.no_capabilities[i]
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

/// A rule's `answers`: only beside names in `to`, addresses and CIDRs only, at least one.
fn compile_answers(
    raw: &RawRule,
    names: &[HostPattern],
    at: &FieldPath,
) -> Result<Option<Vec<IpNet>>, CompileError> {
    let Some(list) = &raw.answers else {
        return Ok(None);
    };
    let field = at.key("answers");
    if names.is_empty() {
        return Err(CompileError::new(
            field,
            "`answers` pins what the rule's host names resolve to, and this rule's `to` has \
             none (valid: host names in `to`, or remove `answers`)",
        ));
    }
    if list.is_empty() {
        return Err(CompileError::new(
            field,
            "an empty `answers` list lets the names resolve to nothing (valid: addresses and \
             CIDRs like [192.0.2.0/24, \"2001:db8::/32\"], or remove `answers`)",
        ));
    }
    let mut nets = Vec::with_capacity(list.len());
    for (j, dest) in list.iter().enumerate() {
        let RawDest::Net(net) = dest else {
            return Err(CompileError::new(
                field.index(j),
                "`answers` lists addresses and CIDRs, not names (valid: like 192.0.2.0/24 or \
                 \"2001:db8::/32\")",
            ));
        };
        check_host_bits(*net).map_err(|m| CompileError::new(field.index(j), m))?;
        let net = normalise_net(*net);
        if !nets.contains(&net) {
            nets.push(net);
        }
    }
    Ok(Some(nets))
}

fn check_name(name: &str) -> Result<(), String> {
    const VALID: &str = "valid: letters, digits, `_`, `.` and `-`";
    if name.is_empty() {
        return Err(format!("a rule needs a non-empty name ({VALID})"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("rule name {name:?} contains {c:?} ({VALID})"));
    }
    if DEFAULT_RULE_WORDS.contains(&name) {
        return Err(format!(
            "rule name `{name}` is reserved: tests write `rule: {name}` for the default \
             ({VALID}, other than `none` and `default`)"
        ));
    }
    Ok(())
}

/// The parts of a rule that only proxy and passthrough rules have, checked.
struct Proxied {
    protocol: Protocol,
    hosts: Vec<HostPattern>,
    credential: Option<String>,
    http: Option<Vec<HttpRule>>,
    git: Option<std::sync::Arc<super::git::GitRule>>,
}

/// Checks `protocol`, `hosts`, `credential` and `http` against the rule's action.
/// `names` are the host names of the rule's `to`, which `hosts` defaults to.
fn compile_proxied(
    raw: &RawRule,
    action: Action,
    names: &[HostPattern],
    at: &FieldPath,
) -> Result<Proxied, CompileError> {
    let is_proxied = matches!(action, Action::Proxy | Action::Passthrough);
    if !is_proxied {
        let only = |key: &'static str, who: &str, with: &str| {
            CompileError::new(
                at.key(key),
                format!(
                    "`{key}` applies only to {who} rules, not to `action: {action}` \
                     (valid: {with}, or remove `{key}`)"
                ),
            )
        };
        if raw.hosts.is_some() {
            return Err(only(
                "hosts",
                "proxy and passthrough",
                "`action: proxy` or `action: passthrough`",
            ));
        }
        if raw.credential.is_some() {
            return Err(only("credential", "proxy", "`action: proxy`"));
        }
        if raw.http.is_some() {
            return Err(only("http", "proxy", "`action: proxy`"));
        }
        if raw.git.is_some() {
            return Err(only("git", "proxy", "`action: proxy`"));
        }
        return Ok(Proxied {
            protocol: match raw.protocol {
                None | Some(RawProtocol::Any) => Protocol::Any,
                Some(RawProtocol::Tcp) => Protocol::Tcp,
                Some(RawProtocol::Udp) => Protocol::Udp,
            },
            hosts: Vec::new(),
            credential: None,
            http: None,
            git: None,
        });
    }

    if let Some(p @ (RawProtocol::Any | RawProtocol::Udp)) = raw.protocol {
        let p = match p {
            RawProtocol::Udp => "udp",
            _ => "any",
        };
        return Err(CompileError::new(
            at.key("protocol"),
            format!(
                "protocol `{p}` does not fit `action: {action}`: the proxy handles TLS over \
                 TCP only (valid: `protocol: tcp`, or omit `protocol`)"
            ),
        ));
    }
    let hosts = match &raw.hosts {
        // The names the sandbox resolved to reach the rule are the names it may ask for.
        None if !names.is_empty() => names.to_vec(),
        None => {
            return Err(CompileError::new(
                at.key("action"),
                format!(
                    "`action: {action}` needs `hosts`, the names the TLS server name and the \
                     HTTP Host must match (valid: add a list like `hosts: [api.example.com]`, \
                     or put host names in `to`, which `hosts` then defaults to)"
                ),
            ));
        }
        Some(list) if list.is_empty() => {
            return Err(CompileError::new(
                at.key("hosts"),
                "an empty host list matches nothing (valid: names like [api.example.com, \
                 \"*.example.com\"])",
            ));
        }
        Some(list) => {
            let mut seen = HashSet::with_capacity(list.len());
            let mut hosts: Vec<HostPattern> = Vec::with_capacity(list.len());
            for host in list {
                if seen.insert(host) {
                    hosts.push(host.clone());
                }
            }
            hosts
        }
    };
    if action == Action::Passthrough {
        let relayed = |key: &'static str, what: &str| {
            CompileError::new(
                at.key(key),
                format!(
                    "a passthrough rule relays TLS unchanged, so it cannot {what} (valid: \
                     `action: proxy`, or remove `{key}`)"
                ),
            )
        };
        if raw.credential.is_some() {
            return Err(relayed("credential", "inject a credential"));
        }
        if raw.http.is_some() {
            return Err(relayed("http", "check requests"));
        }
        if raw.git.is_some() {
            return Err(relayed("git", "check git operations"));
        }
    }
    if let Some(name) = &raw.credential {
        check_credential_name(name).map_err(|m| CompileError::new(at.key("credential"), m))?;
    }
    let http = raw
        .http
        .as_ref()
        .map(|list| compile_http(list, &at.key("http")))
        .transpose()?;
    let git = raw
        .git
        .as_ref()
        .map(|g| {
            super::git::GitRule::compile(g)
                .map(std::sync::Arc::new)
                .map_err(|m| CompileError::new(at.key("git"), m))
        })
        .transpose()?;
    Ok(Proxied {
        protocol: Protocol::Tcp,
        hosts,
        credential: raw.credential.clone(),
        http,
        git,
    })
}

fn compile_http(list: &[RawHttpRule], at: &FieldPath) -> Result<Vec<HttpRule>, CompileError> {
    if list.is_empty() {
        return Err(CompileError::new(
            at.clone(),
            "an empty `http` list refuses every request (valid: omit `http` to allow every \
             request, or list entries like `- {methods: [GET], paths: [\"/**\"]}`)",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(j, entry)| {
            if entry.methods.is_empty() {
                return Err(CompileError::new(
                    at.index(j).key("methods"),
                    "an empty method list matches nothing (valid: methods like [GET, HEAD], \
                     or [\"*\"] for any)",
                ));
            }
            if entry.paths.is_empty() {
                return Err(CompileError::new(
                    at.index(j).key("paths"),
                    "an empty path list matches nothing (valid: path patterns like \
                     [\"/repos/acme/**\"], or [\"/**\"] for any)",
                ));
            }
            Ok(HttpRule {
                methods: entry.methods.clone(),
                paths: entry.paths.clone(),
            })
        })
        .collect()
}

fn check_credential_name(name: &str) -> Result<(), String> {
    const VALID: &str = "valid: the name of a credential in the daemon configuration: \
         letters, digits, `_`, `.` and `-`";
    if name.is_empty() {
        return Err(format!("a credential name cannot be empty ({VALID})"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("credential name {name:?} contains {c:?} ({VALID})"));
    }
    Ok(())
}

/// A checked test of any kind.
enum Test {
    Connect(PolicyTest),
    Request(RequestTest),
    Name(NameTest),
}

/// What a raw test is about.
enum Subject<'a> {
    Connect(&'a RawConnect),
    Request(&'a RawRequest),
    Resolve(&'a RawName),
}

impl Subject<'_> {
    /// Whether `rule` can ever decide this test, and if not, why.
    fn eligible(&self, rule: &Rule) -> Result<(), &'static str> {
        match self {
            Self::Connect(RawConnect {
                target: RawTarget::Addr(_),
                ..
            }) => Ok(()),
            Self::Request(_) if rule.is_proxy() || rule.is_passthrough() => Ok(()),
            Self::Request(_) => Err("is not a proxy or passthrough rule, so it never decides a \
                 request"),
            Self::Connect(_) | Self::Resolve(_) if !rule.names.is_empty() => Ok(()),
            Self::Connect(_) => Err("has no host names in `to`, so it never decides a \
                 connection to a name"),
            Self::Resolve(_) => Err("has no host names in `to`, so it never decides whether a \
                 name resolves"),
        }
    }
}

fn compile_test(
    raw: &RawTest,
    index: usize,
    names: &HashMap<&str, usize>,
    rules: &[Rule],
    at: FieldPath,
) -> Result<Test, CompileError> {
    let given: Vec<&'static str> = [
        raw.connect.as_ref().map(|_| "connect"),
        raw.request.as_ref().map(|_| "request"),
        raw.resolve.as_ref().map(|_| "resolve"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let subject = match (&raw.connect, &raw.request, &raw.resolve) {
        (Some(connect), None, None) => Subject::Connect(connect),
        (None, Some(request), None) => Subject::Request(request),
        (None, None, Some(name)) => Subject::Resolve(name),
        (None, None, None) => {
            return Err(CompileError::new(
                at,
                "a test needs `connect:`, `request:` or `resolve:` (valid: `connect: \
                 192.0.2.7:443`, `request: GET https://api.example.com/` or `resolve: \
                 api.example.com`)",
            ));
        }
        _ => {
            let second = given.get(1).copied().unwrap_or("request");
            return Err(CompileError::new(
                at.key(second),
                format!(
                    "a test has one of `connect:`, `request:` and `resolve:`, not several \
                     (here: `{}`) (valid: one test per connection, request or name)",
                    given.join("`, `")
                ),
            ));
        }
    };
    let rule_id = match raw.rule.as_deref() {
        None => 0,
        Some(word) if DEFAULT_RULE_WORDS.contains(&word) => 0,
        Some(name) => {
            let found = names.get(name).and_then(|&i| Some((i, rules.get(i)?)));
            match found.map(|(i, rule)| (i, subject.eligible(rule))) {
                Some((i, Ok(()))) => rule_id(i),
                found => {
                    let mut known: Vec<&str> = rules
                        .iter()
                        .filter(|r| subject.eligible(r).is_ok())
                        .map(Rule::name)
                        .collect();
                    known.sort_unstable();
                    known.extend(DEFAULT_RULE_WORDS);
                    let why = match found {
                        Some((_, Err(why))) => format!("rule `{name}` {why}"),
                        _ => format!("no rule is named `{name}`"),
                    };
                    return Err(CompileError::new(
                        at.key("rule"),
                        format!(
                            "{why} (valid: {})",
                            known
                                .iter()
                                .map(|n| format!("`{n}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
    };
    let expect = match raw.expect {
        RawVerdict::Allow => Verdict::Allow,
        RawVerdict::Deny => Verdict::Deny,
        RawVerdict::Audit => Verdict::Audit,
        RawVerdict::Redirect => Verdict::Redirect,
    };
    if raw.credential.is_some() && !matches!(subject, Subject::Request(_)) {
        return Err(CompileError::new(
            at.key("credential"),
            "`credential` applies only to `request:` tests (valid: remove it)",
        ));
    }

    let request = match subject {
        Subject::Request(request) => request,
        Subject::Connect(connect) => {
            let protocol = match connect.transport {
                RawTransport::Tcp => Protocol::Tcp,
                RawTransport::Udp => Protocol::Udp,
            };
            return Ok(match &connect.target {
                RawTarget::Addr(addr) => Test::Connect(PolicyTest {
                    index,
                    text: connect.text.clone(),
                    addr: *addr,
                    port: connect.port,
                    protocol,
                    expect,
                    rule_id,
                }),
                RawTarget::Name(name) => Test::Name(NameTest {
                    index,
                    text: connect.text.clone(),
                    name: name.clone(),
                    kind: NameTestKind::Connect {
                        port: connect.port,
                        protocol,
                    },
                    expect,
                    rule_id,
                }),
            });
        }
        Subject::Resolve(name) => {
            if !matches!(expect, Verdict::Allow | Verdict::Deny) {
                return Err(CompileError::new(
                    at.key("expect"),
                    format!(
                        "a name resolves or not, so it is allowed or denied, never \
                         `{expect}` (valid: allow, deny)"
                    ),
                ));
            }
            if expect == Verdict::Allow && rule_id == 0 {
                return Err(CompileError::new(
                    at.key("expect"),
                    "a name resolves only through a rule: `expect: allow` needs `rule:`, the \
                     first rule whose names match (valid: add `rule: NAME`, or `expect: \
                     deny`)",
                ));
            }
            return Ok(Test::Name(NameTest {
                index,
                text: name.text.clone(),
                name: name.name.clone(),
                kind: NameTestKind::Resolve,
                expect,
                rule_id,
            }));
        }
    };

    if !matches!(expect, Verdict::Allow | Verdict::Deny) {
        return Err(CompileError::new(
            at.key("expect"),
            format!("a request is allowed or denied, never `{expect}` (valid: allow, deny)"),
        ));
    }
    if let Some(name) = &raw.credential {
        let mut known: Vec<&str> = rules.iter().filter_map(Rule::credential).collect();
        known.sort_unstable();
        known.dedup();
        if !known.contains(&name.as_str()) {
            let valid = known
                .iter()
                .map(|n| format!("`{n}`"))
                .chain(["omit `credential` for none".to_owned()])
                .collect::<Vec<_>>()
                .join(", ");
            return Err(CompileError::new(
                at.key("credential"),
                format!("no rule injects a credential named `{name}` (valid: {valid})"),
            ));
        }
    }
    Ok(Test::Request(RequestTest {
        index,
        text: request.text.clone(),
        method: request.method.clone(),
        url: request.url.clone(),
        expect,
        rule_id,
        credential: raw.credential.clone(),
    }))
}

/// 1-based id of the rule at `index`. `compile` caps rules at [`MAX_RULES`], so this
/// never saturates for a compiled policy.
pub(super) fn rule_id(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}
