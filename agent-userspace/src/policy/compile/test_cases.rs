//! A policy's own test cases (`tests:`): connect, name and request tests, checked against
//! the rules they name.

use std::{collections::HashMap, net::IpAddr};

use crate::policy::{
    error::{CompileError, FieldPath},
    raw::{RawConnect, RawName, RawRequest, RawTarget, RawTest, RawTransport, RawVerdict},
    Verdict,
};

use super::*;

/// A checked `connect:` policy test to an address ([`NameTest`] holds those to names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTest {
    /// Position in the file's `tests:` list.
    pub(in crate::policy) index: usize,
    pub(in crate::policy) text: String,
    pub(in crate::policy) addr: IpAddr,
    pub(in crate::policy) port: u16,
    pub(in crate::policy) protocol: Protocol,
    pub(in crate::policy) expect: Verdict,
    pub(in crate::policy) rule_id: u16,
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
    pub(in crate::policy) index: usize,
    pub(in crate::policy) text: String,
    pub(in crate::policy) name: String,
    pub(in crate::policy) kind: NameTestKind,
    pub(in crate::policy) expect: Verdict,
    pub(in crate::policy) rule_id: u16,
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
    pub(in crate::policy) index: usize,
    pub(in crate::policy) text: String,
    pub(in crate::policy) method: String,
    pub(in crate::policy) url: String,
    pub(in crate::policy) expect: Verdict,
    pub(in crate::policy) rule_id: u16,
    pub(in crate::policy) credential: Option<String>,
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

/// A checked test of any kind.
pub(super) enum Test {
    Connect(PolicyTest),
    Request(RequestTest),
    Name(NameTest),
}

/// What a raw test is about.
pub(super) enum Subject<'a> {
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

pub(super) fn compile_test(
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
