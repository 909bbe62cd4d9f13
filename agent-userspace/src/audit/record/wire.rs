//! The wire layout: borrowed views of a record in ECS nesting, built per write and
//! serialised once, by the [`Json`] impls beside each type. The `Serialize` derives
//! describe the same layout for [`super::fit`]'s rare second pass; a test holds the two
//! to the same bytes.

use std::{borrow::Cow, net::IpAddr};

use serde::{Serialize, Serializer};

use super::json::{string, Json, Obj};
use super::*;

/// An RFC 3339 timestamp's text (see [`format_timestamp`]), kept on the stack.
#[derive(Clone, Copy)]
pub(super) struct Stamp(pub(super) [u8; 27]);

impl Stamp {
    pub(super) fn as_str(&self) -> &str {
        // Written as ASCII digits and separators only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Serialize for Stamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Json for Stamp {
    fn json(&self, out: &mut Vec<u8>) {
        out.push(b'"');
        out.extend_from_slice(&self.0);
        out.push(b'"');
    }
}

/// A number written as a JSON string (`user.id`, `network.iana_number`), as ECS types them.
#[derive(Clone, Copy)]
pub(super) struct NumberText(pub(super) u32);

impl Serialize for NumberText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(itoa::Buffer::new().format(self.0))
    }
}

impl Json for NumberText {
    fn json(&self, out: &mut Vec<u8>) {
        out.push(b'"');
        out.extend_from_slice(itoa::Buffer::new().format(self.0).as_bytes());
        out.push(b'"');
    }
}

#[derive(Serialize)]
pub(super) struct Wire<'a> {
    #[serde(rename = "@timestamp")]
    pub(super) timestamp: Stamp,
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

impl Json for Wire<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        // Every field, so that one added to the struct cannot be left out here.
        let Self {
            timestamp,
            ecs,
            event,
            observer,
            process,
            user,
            group,
            network,
            source,
            destination,
            url,
            http,
            tls,
            dns,
            server,
            rule,
            error,
            egress,
        } = self;
        let mut o = Obj::new(out);
        o.field("@timestamp", timestamp)
            .field("ecs", ecs)
            .field("event", event)
            .field("observer", observer)
            .opt("process", process)
            .opt("user", user)
            .opt("group", group)
            .opt("network", network)
            .opt("source", source)
            .opt("destination", destination)
            .opt("url", url)
            .opt("http", http)
            .opt("tls", tls)
            .opt("dns", dns)
            .opt("server", server)
            .opt("rule", rule)
            .opt("error", error)
            .field("egress", egress)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct Ecs {
    pub(super) version: &'static str,
}

impl Json for Ecs {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { version } = self;
        Obj::new(out).field("version", version).end();
    }
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

impl Json for WireEvent<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            kind,
            category,
            type_,
            action,
            outcome,
            reason,
            duration,
            sequence,
        } = self;
        Obj::new(out)
            .field("kind", kind)
            .field("category", category)
            .field("type", type_)
            .field("action", action)
            .field("outcome", outcome)
            .opt("reason", reason)
            .opt("duration", duration)
            .field("sequence", sequence)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct Observer {
    pub(super) product: &'static str,
    pub(super) version: &'static str,
}

impl Json for Observer {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { product, version } = self;
        Obj::new(out)
            .field("product", product)
            .field("version", version)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireProcess<'a> {
    pub(super) pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) name: Option<&'a str>,
}

impl Json for WireProcess<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { pid, name } = self;
        Obj::new(out).field("pid", pid).opt("name", name).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireId {
    pub(super) id: NumberText,
}

impl Json for WireId {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { id } = self;
        Obj::new(out).field("id", id).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireNetwork {
    #[serde(rename = "type")]
    pub(super) type_: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) transport: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) iana_number: Option<NumberText>,
}

impl Json for WireNetwork {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            type_,
            transport,
            iana_number,
        } = self;
        Obj::new(out)
            .field("type", type_)
            .opt("transport", transport)
            .opt("iana_number", iana_number)
            .end();
    }
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

impl Json for WireDestination<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            ip,
            port,
            domain,
            bytes,
        } = self;
        Obj::new(out)
            .field("ip", ip)
            .opt("port", port)
            .opt("domain", domain)
            .opt("bytes", bytes)
            .end();
    }
}

/// `source`, `http.request.body` and `http.response.body`.
#[derive(Serialize)]
pub(super) struct WireBytes {
    pub(super) bytes: u64,
}

impl Json for WireBytes {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { bytes } = self;
        Obj::new(out).field("bytes", bytes).end();
    }
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

impl Json for WireUrl<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            domain,
            path,
            query,
        } = self;
        Obj::new(out)
            .opt("domain", domain)
            .opt("path", path)
            .opt("query", query)
            .end();
    }
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

impl Json for WireHttp<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { request, response } = self;
        Obj::new(out)
            .field("request", request)
            .field("response", response)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireHttpRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) method: Option<&'a str>,
    pub(super) body: WireBytes,
}

impl Json for WireHttpRequest<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { method, body } = self;
        Obj::new(out)
            .opt("method", method)
            .field("body", body)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireHttpResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) status_code: Option<u16>,
    pub(super) body: WireBytes,
}

impl Json for WireHttpResponse {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { status_code, body } = self;
        Obj::new(out)
            .opt("status_code", status_code)
            .field("body", body)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireTls<'a> {
    pub(super) client: WireTlsClient<'a>,
}

impl Json for WireTls<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { client } = self;
        Obj::new(out).field("client", client).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireTlsClient<'a> {
    pub(super) server_name: &'a str,
}

impl Json for WireTlsClient<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { server_name } = self;
        Obj::new(out).field("server_name", server_name).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireDns<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) question: Option<WireDnsQuestion<'a>>,
    pub(super) response_code: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) resolved_ip: Vec<IpAddr>,
}

impl Json for WireDns<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            question,
            response_code,
            resolved_ip,
        } = self;
        let mut o = Obj::new(out);
        o.opt("question", question)
            .field("response_code", response_code);
        if !resolved_ip.is_empty() {
            o.field("resolved_ip", resolved_ip);
        }
        o.end();
    }
}

#[derive(Serialize)]
pub(super) struct WireDnsQuestion<'a> {
    pub(super) name: &'a str,
    #[serde(rename = "type")]
    pub(super) type_: &'a str,
}

impl Json for WireDnsQuestion<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { name, type_ } = self;
        Obj::new(out).field("name", name).field("type", type_).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireServer {
    pub(super) ip: IpAddr,
    pub(super) port: u16,
}

impl Json for WireServer {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { ip, port } = self;
        Obj::new(out).field("ip", ip).field("port", port).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireRule<'a> {
    pub(super) name: &'a str,
}

impl Json for WireRule<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { name } = self;
        Obj::new(out).field("name", name).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireError<'a> {
    pub(super) message: &'a str,
}

impl Json for WireError<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { message } = self;
        Obj::new(out).field("message", message).end();
    }
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
    pub(super) lost: Option<WireLost<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) audit_lost: Option<WireAuditLost<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) audit_rewritten: Option<WireAuditRewritten>,
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

impl Json for WireEgress<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            sandbox,
            socket,
            netns,
            hook,
            verdict,
            option,
            connection,
            tls_mode,
            credential,
            scrubbed,
            git,
            lost,
            audit_lost,
            audit_rewritten,
            daemon,
            gap,
            policy,
            alert,
            quarantine,
            dns,
            coverage,
            posture,
        } = self;
        Obj::new(out)
            .opt("sandbox", sandbox)
            .opt("socket", socket)
            .opt("netns", netns)
            .opt("hook", hook)
            .opt("verdict", verdict)
            .opt("option", option)
            .opt("connection", connection)
            .opt("tls_mode", tls_mode)
            .opt("credential", credential)
            .opt("scrubbed", scrubbed)
            .opt("git", git)
            .opt("lost", lost)
            .opt("audit_lost", audit_lost)
            .opt("audit_rewritten", audit_rewritten)
            .opt("daemon", daemon)
            .opt("gap", gap)
            .opt("policy", policy)
            .opt("alert", alert)
            .opt("quarantine", quarantine)
            .opt("dns", dns)
            .opt("coverage", coverage)
            .opt("posture", posture)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireQuarantine<'a> {
    pub(super) trigger: &'a str,
}

impl Json for WireQuarantine<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { trigger } = self;
        Obj::new(out).field("trigger", trigger).end();
    }
}

/// `egress.dns`: what the resolver kept from the sandbox.
#[derive(Serialize)]
pub(super) struct WireEgressDns<'a> {
    pub(super) refused: Vec<WireRefusedAnswer<'a>>,
}

impl Json for WireEgressDns<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { refused } = self;
        Obj::new(out).field("refused", refused).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireRefusedAnswer<'a> {
    pub(super) ip: IpAddr,
    pub(super) reason: &'a str,
}

impl Json for WireRefusedAnswer<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { ip, reason } = self;
        Obj::new(out).field("ip", ip).field("reason", reason).end();
    }
}

#[derive(Serialize)]
pub(super) struct WirePosture {
    pub(super) processes: usize,
    pub(super) capabilities: Vec<&'static str>,
    pub(super) risky_capabilities: Vec<&'static str>,
    pub(super) can_leave_cgroup: bool,
}

impl Json for WirePosture {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            processes,
            capabilities,
            risky_capabilities,
            can_leave_cgroup,
        } = self;
        Obj::new(out)
            .field("processes", processes)
            .field("capabilities", capabilities)
            .field("risky_capabilities", risky_capabilities)
            .field("can_leave_cgroup", can_leave_cgroup)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireCoverage {
    pub(super) packet_sockets: bool,
}

impl Json for WireCoverage {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { packet_sockets } = self;
        Obj::new(out).field("packet_sockets", packet_sockets).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireSandbox<'a> {
    pub(super) name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) cgroup_path: Option<Cow<'a, str>>,
}

impl Json for WireSandbox<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            name,
            cgroup_id,
            cgroup_path,
        } = self;
        Obj::new(out)
            .field("name", name)
            .opt("cgroup_id", cgroup_id)
            .opt("cgroup_path", cgroup_path)
            .end();
    }
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

impl Json for WireSocket {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            cookie,
            family,
            protocol,
        } = self;
        Obj::new(out)
            .field("cookie", cookie)
            .field("family", family)
            .field("protocol", protocol)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireOption {
    pub(super) name: &'static str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub(super) type_: Option<u16>,
}

impl Json for WireOption {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { name, type_ } = self;
        Obj::new(out).field("name", name).opt("type", type_).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireNetns {
    pub(super) cookie: u64,
}

impl Json for WireNetns {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { cookie } = self;
        Obj::new(out).field("cookie", cookie).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireConnection<'a> {
    pub(super) id: WireConnectionId<'a>,
}

impl Json for WireConnection<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { id } = self;
        Obj::new(out).field("id", id).end();
    }
}

/// The kernel record builds the id from its cookies; the proxy hands over the same id
/// already written out.
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum WireConnectionId<'a> {
    Kernel(ConnectionId),
    Proxy(&'a str),
}

impl Json for WireConnectionId<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        match self {
            Self::Kernel(id) => id.json(out),
            Self::Proxy(id) => string(id, out),
        }
    }
}

/// `egress.credential`: the name, and on a proxy record how it was sent, where it came
/// from and when it expires; the value never reaches the audit code.
#[derive(Serialize)]
pub(super) struct WireCredential<'a> {
    pub(super) name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) expires: Option<String>,
}

impl Json for WireCredential<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            name,
            kind,
            source,
            expires,
        } = self;
        Obj::new(out)
            .field("name", name)
            .opt("kind", kind)
            .opt("source", source)
            .opt("expires", expires)
            .end();
    }
}

impl<'a> WireCredential<'a> {
    pub(super) fn named(name: &'a str) -> Self {
        Self {
            name,
            kind: None,
            source: None,
            expires: None,
        }
    }
}

/// `egress.git`: the repository, service and, for a push, its ref updates.
#[derive(Serialize)]
pub(super) struct WireGit<'a> {
    pub(super) repo: &'a str,
    pub(super) service: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) ref_updates: Vec<WireRefUpdate<'a>>,
}

impl Json for WireGit<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            repo,
            service,
            ref_updates,
        } = self;
        let mut o = Obj::new(out);
        o.field("repo", repo).field("service", service);
        if !ref_updates.is_empty() {
            o.field("ref_updates", ref_updates);
        }
        o.end();
    }
}

#[derive(Serialize)]
pub(super) struct WireRefUpdate<'a> {
    pub(super) ref_name: &'a str,
    pub(super) old: &'a str,
    pub(super) new: &'a str,
    pub(super) allowed: bool,
}

impl Json for WireRefUpdate<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            ref_name,
            old,
            new,
            allowed,
        } = self;
        Obj::new(out)
            .field("ref_name", ref_name)
            .field("old", old)
            .field("new", new)
            .field("allowed", allowed)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireLost<'a> {
    pub(super) count: u64,
    pub(super) total: u64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub(super) sandboxes: &'a [LostBySandbox],
}

impl Json for WireLost<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            count,
            total,
            sandboxes,
        } = self;
        let mut obj = Obj::new(out);
        obj.field("count", count).field("total", total);
        if !sandboxes.is_empty() {
            obj.field("sandboxes", *sandboxes);
        }
        obj.end();
    }
}

impl Json for LostBySandbox {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { name, count } = self;
        Obj::new(out)
            .field("name", name)
            .field("count", count)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireAuditLost<'a> {
    pub(super) count: u64,
    pub(super) first_sequence: u64,
    pub(super) last_sequence: u64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub(super) sandboxes: &'a [LostBySandbox],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) since: Option<Stamp>,
}

impl Json for WireAuditLost<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            count,
            first_sequence,
            last_sequence,
            sandboxes,
            since,
        } = self;
        let mut obj = Obj::new(out);
        obj.field("count", count)
            .field("first_sequence", first_sequence)
            .field("last_sequence", last_sequence);
        if !sandboxes.is_empty() {
            obj.field("sandboxes", *sandboxes);
        }
        obj.opt("since", since).end();
    }
}

#[derive(Serialize)]
pub(super) struct WireAuditRewritten {
    pub(super) count: u64,
    pub(super) first_sequence: u64,
    pub(super) last_sequence: u64,
    pub(super) complete: bool,
}

impl Json for WireAuditRewritten {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            count,
            first_sequence,
            last_sequence,
            complete,
        } = self;
        Obj::new(out)
            .field("count", count)
            .field("first_sequence", first_sequence)
            .field("last_sequence", last_sequence)
            .field("complete", complete)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireDaemon {
    pub(super) adopted_sandboxes: u32,
}

impl Json for WireDaemon {
    fn json(&self, out: &mut Vec<u8>) {
        let Self { adopted_sandboxes } = self;
        Obj::new(out)
            .field("adopted_sandboxes", adopted_sandboxes)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireGap {
    pub(super) previous_seen: Stamp,
    pub(super) seconds: f64,
}

impl Json for WireGap {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            previous_seen,
            seconds,
        } = self;
        Obj::new(out)
            .field("previous_seen", previous_seen)
            .field("seconds", seconds)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WirePolicy<'a> {
    pub(super) path: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) digest: Option<&'a PolicyDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) previous_digest: Option<&'a PolicyDigest>,
}

impl Json for WirePolicy<'_> {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            path,
            digest,
            previous_digest,
        } = self;
        Obj::new(out)
            .field("path", path)
            .opt("digest", digest)
            .opt("previous_digest", previous_digest)
            .end();
    }
}

#[derive(Serialize)]
pub(super) struct WireAlert {
    pub(super) count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) window_seconds: Option<u64>,
    pub(super) response: &'static str,
}

impl Json for WireAlert {
    fn json(&self, out: &mut Vec<u8>) {
        let Self {
            count,
            window_seconds,
            response,
        } = self;
        Obj::new(out)
            .field("count", count)
            .opt("window_seconds", window_seconds)
            .field("response", response)
            .end();
    }
}

impl Json for Hook {
    fn json(&self, out: &mut Vec<u8>) {
        string(self.as_str(), out);
    }
}

impl Json for Verdict {
    fn json(&self, out: &mut Vec<u8>) {
        string(self.as_str(), out);
    }
}

impl Json for Outcome {
    fn json(&self, out: &mut Vec<u8>) {
        string(self.as_str(), out);
    }
}

impl Json for SocketFamily {
    fn json(&self, out: &mut Vec<u8>) {
        string(&self.name(), out);
    }
}

impl Json for PolicyDigest {
    fn json(&self, out: &mut Vec<u8>) {
        string(self.as_str(), out);
    }
}

impl Json for ConnectionId {
    /// `"<netns cookie>-<socket cookie>"`, 16 lowercase hex digits each.
    fn json(&self, out: &mut Vec<u8>) {
        let mut text = *b"\"0000000000000000-0000000000000000\"";
        for (cookie, at) in [(self.netns_cookie, 1), (self.socket_cookie, 18)] {
            for (i, b) in text[at..at + 16].iter_mut().enumerate() {
                *b = HEX[((cookie >> (60 - 4 * i)) & 0xf) as usize];
            }
        }
        out.extend_from_slice(&text);
    }
}
