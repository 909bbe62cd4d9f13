//! `compile()`: checks a [`RawPolicy`] as a whole and turns it into an immutable [`Policy`]
//! whose every rule the kernel can hold. Nothing downstream re-validates a `Policy`, so
//! every invariant the decision and kernel code rely on is established here.
use std::{collections::HashMap, fmt, net::IpAddr};

use agent_common::{action, proto};
use ipnet::{IpNet, Ipv4Net};

use super::{
    error::{CompileError, FieldPath},
    kernel::KernelRulesError,
    raw::{
        check_host_bits, check_port_range, RawAction, RawDefault, RawDest, RawPolicy, RawProtocol,
        RawTest, RawTransport, RawVerdict, VALID_PORTS,
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
    pub(super) rules: Vec<Rule>,
    pub(super) tests: Vec<PolicyTest>,
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

    /// The policy's own tests, in file order.
    pub fn tests(&self) -> &[PolicyTest] {
        &self.tests
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
    pub(super) ports: Vec<(u16, u16)>,
    pub(super) protocol: Protocol,
    pub(super) action: Action,
}

impl Rule {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Destinations: at least one, host bits clear, IPv4-mapped IPv6 ones turned into
    /// IPv4, no duplicates.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
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
}

impl Action {
    /// The `agent_common::action` code.
    pub fn kernel_code(self) -> u8 {
        match self {
            Self::Allow => action::ALLOW,
            Self::Deny => action::DENY,
        }
    }

    /// The verdict a connection gets when this rule decides it.
    pub fn verdict(self) -> Verdict {
        match self {
            Self::Allow => Verdict::Allow,
            Self::Deny => Verdict::Deny,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// A checked policy test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTest {
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
/// Checked here: the version; at most [`MAX_RULES`] rules; rule names non-empty,
/// `[A-Za-z0-9_.-]`, unique and not `none`/`default`; at least one destination per rule,
/// none a host name (not supported yet), none with host bits set; port ranges within
/// 1-65535 with `lo <= hi`, and `ports:` not an empty list; only `allow`/`deny` actions;
/// test `rule:` values naming a rule; and that the kernel can hold every prefix's rules.
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
                "a rule needs at least one destination (valid: a list of IP addresses and \
                 CIDRs, like [192.0.2.7, 10.0.0.0/8])",
            ));
        }
        let mut nets = Vec::with_capacity(raw_rule.to.len());
        for (j, dest) in raw_rule.to.iter().enumerate() {
            let field = at.key("to").index(j);
            let net = match dest {
                RawDest::Net(net) => *net,
                RawDest::Host(host) => {
                    return Err(CompileError::new(
                        field,
                        format!(
                            "host name `{host}` needs the DNS resolver, which this build \
                             does not have yet; valid here: IP addresses and CIDRs"
                        ),
                    ));
                }
            };
            check_host_bits(net).map_err(|m| CompileError::new(field.clone(), m))?;
            let net = normalise_net(net);
            if !nets.contains(&net) {
                nets.push(net);
            }
            first_seen.entry(net).or_insert(field);
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
            other @ (RawAction::Proxy | RawAction::Passthrough) => {
                return Err(CompileError::new(
                    at.key("action"),
                    format!(
                        "action `{}` needs the proxy, which this build does not have yet; \
                         valid here: allow, deny",
                        other.as_str()
                    ),
                ));
            }
        };

        rules.push(Rule {
            name: raw_rule.name.clone(),
            nets,
            ports,
            protocol: match raw_rule.protocol {
                RawProtocol::Any => Protocol::Any,
                RawProtocol::Tcp => Protocol::Tcp,
                RawProtocol::Udp => Protocol::Udp,
            },
            action,
        });
    }

    let tests = raw
        .tests
        .iter()
        .enumerate()
        .map(|(i, t)| compile_test(t, &names, root.key("tests").index(i)))
        .collect::<Result<Vec<_>, _>>()?;

    let policy = Policy {
        default: match raw.default {
            RawDefault::Deny => DefaultAction::Deny,
            RawDefault::Audit => DefaultAction::Audit,
        },
        rules,
        tests,
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

fn compile_test(
    raw: &RawTest,
    names: &HashMap<&str, usize>,
    at: FieldPath,
) -> Result<PolicyTest, CompileError> {
    let rule_id = match raw.rule.as_deref() {
        None => 0,
        Some(word) if DEFAULT_RULE_WORDS.contains(&word) => 0,
        Some(name) => match names.get(name) {
            Some(&i) => rule_id(i),
            None => {
                let mut known: Vec<&str> = names.keys().copied().collect();
                known.sort_unstable();
                known.extend(DEFAULT_RULE_WORDS);
                return Err(CompileError::new(
                    at.key("rule"),
                    format!(
                        "no rule is named `{name}` (valid: {})",
                        known
                            .iter()
                            .map(|n| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        },
    };
    Ok(PolicyTest {
        text: raw.connect.text.clone(),
        addr: raw.connect.addr,
        port: raw.connect.port,
        protocol: match raw.connect.transport {
            RawTransport::Tcp => Protocol::Tcp,
            RawTransport::Udp => Protocol::Udp,
        },
        expect: match raw.expect {
            RawVerdict::Allow => Verdict::Allow,
            RawVerdict::Deny => Verdict::Deny,
            RawVerdict::Audit => Verdict::Audit,
        },
        rule_id,
    })
}

/// 1-based id of the rule at `index`. `compile` caps rules at [`MAX_RULES`], so this
/// never saturates for a compiled policy.
pub(super) fn rule_id(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}
