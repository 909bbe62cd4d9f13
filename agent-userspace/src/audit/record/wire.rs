//! The wire layout: borrowed views of a record in ECS nesting, built per write and
//! serialised once.

use std::{borrow::Cow, net::IpAddr};

use serde::Serialize;

use super::*;

#[derive(Serialize)]
pub(super) struct Wire<'a> {
    #[serde(rename = "@timestamp")]
    pub(super) timestamp: String,
    pub(super) ecs: Ecs,
    pub(super) event: WireEvent<'a>,
    pub(super) observer: Observer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) process: Option<WireProcess<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) user: Option<WireId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) group: Option<WireId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) network: Option<WireNetwork>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) source: Option<WireBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) destination: Option<WireDestination<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) url: Option<WireUrl<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) http: Option<WireHttp<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) tls: Option<WireTls<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) dns: Option<WireDns<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) server: Option<WireServer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) rule: Option<WireRule<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<WireError<'a>>,
    pub(super) egress: WireEgress<'a>,
}

#[derive(Serialize)]
pub(super) struct Ecs {
    pub(super) version: &'static str,
}

#[derive(Serialize)]
pub(super) struct WireEvent<'a> {
    pub(super) kind: &'static str,
    pub(super) category: &'static [&'static str],
    #[serde(rename = "type")]
    pub(super) type_: &'static [&'static str],
    pub(super) action: &'static str,
    pub(super) outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<&'a str>,
    /// Nanoseconds, as ECS defines it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) duration: Option<u64>,
    pub(super) sequence: u64,
}

#[derive(Serialize)]
pub(super) struct Observer {
    pub(super) product: &'static str,
    pub(super) version: &'static str,
}

#[derive(Serialize)]
pub(super) struct WireProcess<'a> {
    pub(super) pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) name: Option<&'a str>,
}

#[derive(Serialize)]
pub(super) struct WireId {
    pub(super) id: String,
}

#[derive(Serialize)]
pub(super) struct WireNetwork {
    #[serde(rename = "type")]
    pub(super) type_: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) transport: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) iana_number: Option<String>,
}

#[derive(Serialize)]
pub(super) struct WireDestination<'a> {
    pub(super) ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) port: Option<u16>,
    /// The name an allowed address was learned from (DNS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) domain: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) bytes: Option<u64>,
}

/// `source`, `http.request.body` and `http.response.body`.
#[derive(Serialize)]
pub(super) struct WireBytes {
    pub(super) bytes: u64,
}

#[derive(Serialize)]
pub(super) struct WireUrl<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) domain: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) query: Option<String>,
}

impl<'a> WireUrl<'a> {
    /// `None` rather than an empty `url` object.
    pub(super) fn new(
        domain: Option<&'a str>,
        path: Option<&'a str>,
        query: Option<String>,
    ) -> Option<Self> {
        (domain.is_some() || path.is_some() || query.is_some()).then_some(Self {
            domain,
            path,
            query,
        })
    }
}

#[derive(Serialize)]
pub(super) struct WireHttp<'a> {
    pub(super) request: WireHttpRequest<'a>,
    pub(super) response: WireHttpResponse,
}

#[derive(Serialize)]
pub(super) struct WireHttpRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) method: Option<&'a str>,
    pub(super) body: WireBytes,
}

#[derive(Serialize)]
pub(super) struct WireHttpResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) status_code: Option<u16>,
    pub(super) body: WireBytes,
}

#[derive(Serialize)]
pub(super) struct WireTls<'a> {
    pub(super) client: WireTlsClient<'a>,
}

#[derive(Serialize)]
pub(super) struct WireTlsClient<'a> {
    pub(super) server_name: &'a str,
}

#[derive(Serialize)]
pub(super) struct WireDns<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) question: Option<WireDnsQuestion<'a>>,
    pub(super) response_code: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) resolved_ip: Vec<IpAddr>,
}

#[derive(Serialize)]
pub(super) struct WireDnsQuestion<'a> {
    pub(super) name: &'a str,
    #[serde(rename = "type")]
    pub(super) type_: &'a str,
}

#[derive(Serialize)]
pub(super) struct WireServer {
    pub(super) ip: IpAddr,
    pub(super) port: u16,
}

#[derive(Serialize)]
pub(super) struct WireRule<'a> {
    pub(super) name: &'a str,
}

#[derive(Serialize)]
pub(super) struct WireError<'a> {
    pub(super) message: &'a str,
}

#[derive(Default, Serialize)]
pub(super) struct WireEgress<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) sandbox: Option<WireSandbox<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) socket: Option<WireSocket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) netns: Option<WireNetns>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) hook: Option<Hook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) verdict: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) option: Option<WireOption>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) connection: Option<WireConnection<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) tls_mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) credential: Option<WireCredential<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) scrubbed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) git: Option<WireGit<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) lost: Option<WireLost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) audit_lost: Option<WireAuditLost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) daemon: Option<WireDaemon>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) gap: Option<WireGap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) policy: Option<WirePolicy<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) alert: Option<WireAlert>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) quarantine: Option<WireQuarantine<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) dns: Option<WireEgressDns<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) coverage: Option<WireCoverage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) posture: Option<WirePosture>,
}

#[derive(Serialize)]
pub(super) struct WireQuarantine<'a> {
    pub(super) trigger: &'a str,
}

/// `egress.dns`: what the resolver kept from the sandbox.
#[derive(Serialize)]
pub(super) struct WireEgressDns<'a> {
    pub(super) refused: Vec<WireRefusedAnswer<'a>>,
}

#[derive(Serialize)]
pub(super) struct WireRefusedAnswer<'a> {
    pub(super) ip: IpAddr,
    pub(super) reason: &'a str,
}

#[derive(Serialize)]
pub(super) struct WirePosture {
    pub(super) processes: usize,
    pub(super) capabilities: Vec<&'static str>,
    pub(super) risky_capabilities: Vec<&'static str>,
    pub(super) can_leave_cgroup: bool,
}

#[derive(Serialize)]
pub(super) struct WireCoverage {
    pub(super) packet_sockets: bool,
}

#[derive(Serialize)]
pub(super) struct WireSandbox<'a> {
    pub(super) name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) cgroup_path: Option<Cow<'a, str>>,
}

impl<'a> WireSandbox<'a> {
    pub(super) fn named(name: &'a str) -> Self {
        Self {
            name,
            cgroup_id: None,
            cgroup_path: None,
        }
    }
}

#[derive(Serialize)]
pub(super) struct WireSocket {
    pub(super) cookie: u64,
    pub(super) family: SocketFamily,
    /// The kernel's protocol number, full width.
    pub(super) protocol: u32,
}

#[derive(Serialize)]
pub(super) struct WireOption {
    pub(super) name: &'static str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub(super) type_: Option<u16>,
}

#[derive(Serialize)]
pub(super) struct WireNetns {
    pub(super) cookie: u64,
}

#[derive(Serialize)]
pub(super) struct WireConnection<'a> {
    pub(super) id: WireConnectionId<'a>,
}

/// The kernel record builds the id from its cookies; the proxy hands over the same id
/// already written out.
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum WireConnectionId<'a> {
    Kernel(ConnectionId),
    Proxy(&'a str),
}

/// `egress.credential`: the name only; the value never reaches the audit code.
#[derive(Serialize)]
pub(super) struct WireCredential<'a> {
    pub(super) name: &'a str,
}

/// `egress.git`: the repository, service and, for a push, its ref updates.
#[derive(Serialize)]
pub(super) struct WireGit<'a> {
    pub(super) repo: &'a str,
    pub(super) service: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) ref_updates: Vec<WireRefUpdate<'a>>,
}

#[derive(Serialize)]
pub(super) struct WireRefUpdate<'a> {
    pub(super) ref_name: &'a str,
    pub(super) old: &'a str,
    pub(super) new: &'a str,
    pub(super) allowed: bool,
}

#[derive(Serialize)]
pub(super) struct WireLost {
    pub(super) count: u64,
    pub(super) total: u64,
}

#[derive(Serialize)]
pub(super) struct WireAuditLost {
    pub(super) count: u64,
    pub(super) first_sequence: u64,
    pub(super) last_sequence: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) since: Option<String>,
}

#[derive(Serialize)]
pub(super) struct WireDaemon {
    pub(super) adopted_sandboxes: u32,
}

#[derive(Serialize)]
pub(super) struct WireGap {
    pub(super) previous_seen: String,
    pub(super) seconds: f64,
}

#[derive(Serialize)]
pub(super) struct WirePolicy<'a> {
    pub(super) path: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) digest: Option<&'a PolicyDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) previous_digest: Option<&'a PolicyDigest>,
}

#[derive(Serialize)]
pub(super) struct WireAlert {
    pub(super) count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) window_seconds: Option<u64>,
    pub(super) response: &'static str,
}
