//! Records of the per-sandbox DNS resolvers.

use std::net::{IpAddr, SocketAddr};

use time::OffsetDateTime;

use super::*;

/// A DNS query from a sandbox, as its resolver handled it: answered from upstream,
/// answered NXDOMAIN because the policy does not allow the name, refused, or failed.
///
/// Written with the ECS `dns.*` fields; the upstream resolver that answered is
/// `server.ip`/`server.port` (ECS: the server side of the exchange the resolver made).
/// The name is recorded lower-case without its trailing dot, so letter case cannot carry
/// data into the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    /// `@timestamp`: when the resolver finished with the query.
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `dns.question.name`; empty when the query could not be parsed (then the question
    /// is left out).
    pub question_name: String,
    /// `dns.question.type`, e.g. `A`, `AAAA`, `HTTPS`, or `TYPE65280` for unnamed types.
    pub question_type: String,
    /// `dns.response_code` sent to the sandbox: `NOERROR`, `NXDOMAIN`, `REFUSED`,
    /// `SERVFAIL`, `FORMERR`, or whatever other code the upstream resolver answered.
    pub response_code: String,
    /// `dns.resolved_ip`: the A/AAAA addresses released to the sandbox (and installed in
    /// the kernel before that), and only those. IPv4-mapped addresses are written as IPv4.
    pub resolved_ip: Vec<IpAddr>,
    /// `egress.dns.refused`: addresses the upstream answer held that were neither
    /// installed nor released (a special address, outside the rule's `answers`, covered
    /// by a deny rule, ...), each with why.
    pub refused: Vec<RefusedAnswer>,
    /// `egress.verdict`; also decides `event.outcome` and `event.type`.
    pub verdict: DnsVerdict,
    /// `rule.name`: the first policy rule that allows the name; for a denied name, the
    /// `deny` rule that matched it, if any.
    pub rule: Option<String>,
    /// `event.reason`: why a query was denied, or what failed after it was allowed.
    pub reason: Option<String>,
    /// `server.ip` and `server.port`: the upstream resolver that answered, or the last one
    /// tried.
    pub upstream: Option<SocketAddr>,
}

/// An answer's address the resolver did not release, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedAnswer {
    pub ip: IpAddr,
    pub reason: String,
}

impl DnsEvent {
    pub(super) fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        let verdict = self.verdict.as_verdict();
        wire.event.category = &["network"];
        wire.event.type_ = match self.verdict {
            DnsVerdict::Allow => &["protocol", "allowed"],
            DnsVerdict::Deny => &["protocol", "denied"],
        };
        // As for the proxy: only a deny failed; an allowed query whose upstream then failed
        // is a success whose `event.reason` says what went wrong.
        wire.event.outcome = verdict.outcome();
        wire.event.reason = non_empty(&self.reason);
        wire.dns = Some(WireDns {
            question: (!self.question_name.is_empty()).then_some(WireDnsQuestion {
                name: &self.question_name,
                type_: &self.question_type,
            }),
            response_code: &self.response_code,
            resolved_ip: self
                .resolved_ip
                .iter()
                .map(|ip| ip.to_canonical())
                .collect(),
        });
        wire.server = self.upstream.map(|a| WireServer {
            ip: a.ip().to_canonical(),
            port: a.port(),
        });
        wire.rule = non_empty(&self.rule).map(|name| WireRule { name });
        wire.egress.sandbox = Some(WireSandbox::named(&self.sandbox));
        wire.egress.verdict = Some(verdict);
        wire.egress.dns = (!self.refused.is_empty()).then(|| WireEgressDns {
            refused: self
                .refused
                .iter()
                .map(|r| WireRefusedAnswer {
                    ip: r.ip.to_canonical(),
                    reason: &r.reason,
                })
                .collect(),
        });
    }
}

/// `egress.verdict` of a DNS query: the resolver answers for a name or it does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsVerdict {
    Allow,
    Deny,
}

impl DnsVerdict {
    pub(super) fn as_verdict(self) -> Verdict {
        match self {
            Self::Allow => Verdict::Allow,
            Self::Deny => Verdict::Deny,
        }
    }
}
