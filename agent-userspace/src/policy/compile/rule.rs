//! Compiled rules: what each rule matches and does ([`Rule`], [`Action`], [`Protocol`],
//! [`DefaultAction`]), and the checks of the parts only proxy and passthrough rules have
//! (server names, HTTP rules, credentials).

use std::{collections::HashSet, fmt};

use agent_common::{action, proto};
use ipnet::IpNet;

use crate::policy::{
    error::{CompileError, FieldPath},
    host::HostPattern,
    http::HttpRule,
    raw::{RawHttpRule, RawProtocol, RawRule},
    Verdict,
};

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
    pub(in crate::policy) name: String,
    pub(in crate::policy) nets: Vec<IpNet>,
    pub(in crate::policy) names: Vec<HostPattern>,
    pub(in crate::policy) ports: Vec<(u16, u16)>,
    pub(in crate::policy) protocol: Protocol,
    pub(in crate::policy) action: Action,
    /// Non-empty exactly for proxy and passthrough rules; no duplicates.
    pub(in crate::policy) hosts: Vec<HostPattern>,
    /// Proxy rules only.
    pub(in crate::policy) credential: Option<String>,
    /// Proxy rules only; non-empty when present.
    pub(in crate::policy) http: Option<Vec<HttpRule>>,
    /// Proxy rules only: git smart-HTTP checks.
    pub(in crate::policy) git: Option<std::sync::Arc<crate::policy::git::GitRule>>,
    /// Rules with names only: the networks those names may resolve to (non-empty when
    /// present; normalised like `nets`).
    pub(in crate::policy) answers: Option<Vec<IpNet>>,
}

impl Rule {
    /// The rule's git checks, when it has `git:`.
    pub fn git(&self) -> Option<&std::sync::Arc<crate::policy::git::GitRule>> {
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

/// Whether two rules' port lists share a port (an empty list is every port).
pub(in crate::policy) fn ports_overlap(a: &[(u16, u16)], b: &[(u16, u16)]) -> bool {
    a.is_empty()
        || b.is_empty()
        || a.iter()
            .any(|&(lo, hi)| b.iter().any(|&(l, h)| lo <= h && l <= hi))
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

/// The parts of a rule that only proxy and passthrough rules have, checked.
pub(super) struct Proxied {
    pub(super) protocol: Protocol,
    pub(super) hosts: Vec<HostPattern>,
    pub(super) credential: Option<String>,
    pub(super) http: Option<Vec<HttpRule>>,
    pub(super) git: Option<std::sync::Arc<crate::policy::git::GitRule>>,
}

/// Checks `protocol`, `hosts`, `credential` and `http` against the rule's action.
/// `names` are the host names of the rule's `to`, which `hosts` defaults to.
pub(super) fn compile_proxied(
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
            crate::policy::git::GitRule::compile(g)
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

pub(super) fn compile_http(
    list: &[RawHttpRule],
    at: &FieldPath,
) -> Result<Vec<HttpRule>, CompileError> {
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

pub(super) fn check_credential_name(name: &str) -> Result<(), String> {
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
