//! The per-sandbox DNS resolver: it answers only for names the sandbox's policy allows,
//! and installs every address it releases in the kernel before the sandbox sees it.
//!
//! The kernel rewrites all DNS a sandbox sends (UDP and TCP port 53, to any server) to
//! its resolver port on the sandbox's own loopback, so each sandbox has its own listeners
//! ([`serve_udp`], [`serve_tcp`]) and a [`ResolverCtx`] saying whose they are. Per query:
//!
//! 1. The query is parsed (`query`). Anything but one `IN` question in a standard query
//!    is refused or answered `FORMERR`; so is a name longer than 253 characters, with a
//!    label longer than [`ResolverCtx::max_label`] (the exfiltration guard, default
//!    [`DEFAULT_MAX_LABEL`]), or with characters other than letters, digits, `-` and `_`.
//! 2. A name [`Policy::name_allowed`] refuses is answered `NXDOMAIN` at once: no upstream
//!    ever sees it, so the name itself cannot carry data out.
//! 3. A query type other than A and AAAA is `REFUSED` unless the policy's
//!    `dns.query_types` lists it (never `ANY`, `AXFR` or `IXFR`); a query over the
//!    sandbox's budget ([`budget`]) is `REFUSED` too, and summarised in one alert per
//!    window. Neither reaches upstream.
//! 4. An allowed name is asked of the policy's `dns.upstream` resolvers, or the daemon's
//!    defaults, in order, from the [`Dialer`]'s namespace (`upstream`), in a query rebuilt
//!    canonically (lower-case name, fresh id, RD only, our own OPT record): the client's
//!    letter case, id, flags and EDNS options never leave. A timeout moves on to the
//!    next server, a truncated UDP answer is asked again over TCP.
//! 5. The answer is checked (`answer`): every CNAME owner and target must be allowed too,
//!    or the sandbox gets `NXDOMAIN`. The A/AAAA addresses on the chain from the question
//!    are checked against the rules' `answers` and handed to [`ResolverCtx::learn`] with
//!    the rules of [`Policy::rules_for_name`]; only when that succeeded is the answer
//!    released (else `SERVFAIL`), so the sandbox's next connect already finds its address
//!    in the kernel. Every A/AAAA record not installed is removed from the answer and
//!    listed in the record's `egress.dns.refused` with why. Other query types are
//!    forwarded the same way but teach the kernel nothing.
//!
//! A quarantined sandbox's queries ([`ResolverCtx::quarantined`]) are all answered
//! `REFUSED` after step 1, and recorded.
//!
//! Every query a listener reads ends in exactly one [`DnsRecord`] for the audit trail,
//! except those shed while [`MAX_UDP_IN_FLIGHT`] queries (or [`MAX_TCP_CONNECTIONS`]
//! connections) are already being served: those are counted, and each [`ALERT_WINDOW`]
//! with any raises one `rate-limit` alert with the count ([`shed`]).
//! All upstream work is bounded by [`ResolverCtx::timeout`] per server and transport.
pub(crate) mod answer;
pub mod budget;
pub(crate) mod query;
mod upstream;

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use time::OffsetDateTime;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    task::JoinSet,
};
use tracing::{debug, warn};

pub use crate::audit::{DnsEvent as DnsRecord, DnsVerdict, RefusedAnswer};
use crate::{
    audit::{Alert, AlertKind},
    net::Dialer,
    policy::Policy,
};
use budget::{Budget, ALERT_WINDOW};

use crate::alerts::RefusalRecords;

/// The longest a learned address is kept in the kernel (seconds); answers say no more.
pub const MAX_ANSWER_TTL: u32 = 3600;
/// Addresses one answer may install (the rest are left out of it): round-robin sets are
/// far smaller, and the record naming them stays one line a shipper takes whole.
pub const MAX_LEARNED_PER_ANSWER: usize = 32;
/// Refused addresses a record lists (it gives their number).
pub const MAX_REFUSED_RECORDED: usize = 16;
/// Default [`ResolverCtx::max_label`]: the exfiltration guard. Real host names rarely
/// have labels over 40 characters, while tunnelling tools pack data into labels of the
/// full 63; a name whose labels are all at most this long passes.
pub const DEFAULT_MAX_LABEL: usize = 40;
/// Longest name, in characters without the trailing dot (RFC 1035's 255 wire bytes).
pub const MAX_NAME: usize = 253;
/// Queries one UDP listener serves at once; more are dropped (the client retries).
pub const MAX_UDP_IN_FLIGHT: usize = 256;
/// TCP connections one listener serves at once; more are closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Refused queries one listener records one by one per [`ALERT_WINDOW`] (see
/// [`refusal_records`]).
pub const REFUSALS_RECORDED: u32 = 1000;
/// A TCP connection is closed when a whole query (or writing its answer) takes longer.
#[cfg(not(test))]
pub const TCP_IDLE: Duration = Duration::from_secs(10);
#[cfg(test)]
pub const TCP_IDLE: Duration = Duration::from_secs(1);

/// One address an answer released, for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The name the sandbox asked for (lower case, no trailing dot); the rules come from
    /// it even when the address belongs to a CNAME target.
    pub name: String,
    /// An A or AAAA address from the answer.
    pub addr: IpAddr,
    /// [`Policy::rules_for_name`] of `name`: never empty.
    pub rule_ids: Vec<u16>,
    /// The record's TTL in seconds, as the upstream sent it; the entry should live
    /// [`DnsConfig::lifetime`](crate::policy::DnsConfig::lifetime) of it.
    pub ttl: u32,
}

/// An address [`ResolverCtx::learn`] would not install, and why.
pub type Refusal = (IpAddr, String);
/// `ResolverCtx::learn`.
pub type LearnFn = Arc<dyn Fn(&[Learned]) -> Result<Vec<Refusal>, String> + Send + Sync>;
/// `ResolverCtx::audit`.
pub type DnsAuditSink = Arc<dyn Fn(DnsRecord) + Send + Sync>;
/// `ResolverCtx::alert`.
pub type AlertSink = Arc<dyn Fn(Alert) + Send + Sync>;
/// Told of every query refused by the policy, recorded one by one or counted past the
/// refusal limit alike (a denial burst counts them all).
pub type DenialSink = Arc<dyn Fn() + Send + Sync>;

/// Everything one sandbox's resolver needs; shared by its UDP and TCP listeners.
pub struct ResolverCtx {
    /// `egress.sandbox.name` of the records.
    pub sandbox: String,
    /// The sandbox's policy, swapped by the daemon on policy change; read once per query.
    pub policy: Arc<RwLock<Arc<Policy>>>,
    /// Used when the policy has no `dns` section.
    pub default_upstream: Vec<SocketAddr>,
    /// Makes the upstream sockets, in the upstream network namespace.
    pub dialer: Arc<Dialer>,
    /// Installs learned addresses in the kernel; called BEFORE the answer is released.
    /// Returns the addresses it refused to install (with why), which are then removed
    /// from the answer; `Err(reason)` makes the answer `SERVFAIL`. It runs on a runtime
    /// worker thread, so it should only make quick calls (map updates), never wait.
    pub learn: LearnFn,
    /// Where the records go.
    pub audit: DnsAuditSink,
    /// Every refusal, whether its record is written or counted.
    pub denied: DenialSink,
    /// Where budget alerts go (one per [`ALERT_WINDOW`] over budget).
    pub alert: AlertSink,
    /// The sandbox's DNS budget state; limits come from the policy of each query.
    pub budget: Arc<Mutex<Budget>>,
    /// How long one upstream server gets to answer, per transport (e.g. 3 s).
    pub timeout: Duration,
    /// Longest label a question may have, at most 63; [`DEFAULT_MAX_LABEL`] is the
    /// exfiltration guard.
    pub max_label: usize,
    /// Set while the sandbox is quarantined: every query is answered `REFUSED` and
    /// recorded, and nothing is asked upstream.
    pub quarantined: Arc<AtomicBool>,
}

impl fmt::Debug for ResolverCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolverCtx")
            .field("sandbox", &self.sandbox)
            .field("default_upstream", &self.default_upstream)
            .field("timeout", &self.timeout)
            .field("max_label", &self.max_label)
            .finish_non_exhaustive()
    }
}

/// How a query arrived, which bounds the answer's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// Queries (or TCP connections) a listener drops because too many are being served:
/// too many to record one by one while the resolver is overloaded, so counted, with one
/// `rate-limit` alert per [`ALERT_WINDOW`] in which any were.
fn shed(ctx: &ResolverCtx, what: String) -> RefusalRecords {
    RefusalRecords::described(
        0,
        ALERT_WINDOW,
        Arc::new(move |n| format!("{n} DNS {what}")),
        ctx.alert.clone(),
    )
}

/// One transport's bounds, shared by a resolver's listeners of that transport (IPv4 and
/// IPv6): what may be served at once, what is dropped past it, and the refusals recorded
/// one by one.
pub struct TransportLimits {
    permits: Arc<Semaphore>,
    shed: RefusalRecords,
    refusals: Arc<RefusalRecords>,
}

/// A resolver's bounds, per transport, whatever number of listeners serve it.
pub struct ResolverLimits {
    udp: TransportLimits,
    tcp: TransportLimits,
}

impl ResolverLimits {
    /// Raises now what the windows counted and have not raised yet (the resolver stops).
    pub fn flush(&self) {
        for t in [&self.udp, &self.tcp] {
            t.shed.flush();
            t.refusals.flush();
        }
    }

    pub fn new(ctx: &ResolverCtx) -> Arc<Self> {
        Arc::new(Self {
            udp: TransportLimits {
                permits: Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT)),
                shed: shed(
                    ctx,
                    format!(
                        "queries (over {MAX_UDP_IN_FLIGHT} in flight) dropped unanswered: the \
                         sandbox's resolver was at its limit"
                    ),
                ),
                refusals: Arc::new(refusal_records(ctx)),
            },
            tcp: TransportLimits {
                permits: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
                shed: shed(
                    ctx,
                    format!(
                        "TCP connections (over {MAX_TCP_CONNECTIONS} open) dropped unanswered: \
                         the sandbox's resolver was at its limit"
                    ),
                ),
                refusals: Arc::new(refusal_records(ctx)),
            },
        })
    }
}

/// Serves DNS over UDP on `socket` (bound by the daemon in the sandbox's namespace) until
/// the task is aborted, within the resolver's `limits`. Each query is answered by its own
/// task.
pub async fn serve_udp(socket: UdpSocket, ctx: Arc<ResolverCtx>, limits: Arc<ResolverLimits>) {
    let socket = Arc::new(socket);
    let TransportLimits {
        permits,
        shed,
        refusals,
    } = &limits.udp;
    // A datagram longer than the buffer is cut short and then fails to parse.
    let mut buf = vec![0u8; 4096];
    // The queries' tasks end with this one: a resolver stopped (a policy that names no
    // hosts, a detach) answers nothing more under the context it was stopped with.
    let mut queries = JoinSet::new();
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            Some(done) = queries.join_next(), if !queries.is_empty() => {
                said_if_panicked(&ctx.sandbox, done);
                continue;
            }
        };
        let (len, peer) = match received {
            Ok(x) => x,
            Err(e) => {
                warn!(sandbox = %ctx.sandbox, error = %e, "DNS UDP receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(sandbox = %ctx.sandbox, %peer, "Too many DNS queries in flight; dropped one");
            shed.count(&ctx.sandbox);
            continue;
        };
        let query = buf[..len].to_vec();
        let (socket, ctx, refusals) = (socket.clone(), ctx.clone(), refusals.clone());
        queries.spawn(async move {
            let _permit = permit;
            if let Some(reply) = resolve(&ctx, &refusals, &query, Transport::Udp).await {
                if let Err(e) = socket.send_to(&reply, peer).await {
                    debug!(sandbox = %ctx.sandbox, %peer, error = %e, "DNS UDP answer not sent");
                }
            }
        });
    }
}

/// A query's (or a TCP connection's) task that panicked got no answer, and may have left
/// no record: the daemon's log says so, loudly.
fn said_if_panicked(sandbox: &str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(
                sandbox,
                "A DNS task (a query's, or a TCP connection's) panicked: its queries got no \
                 answer and may have no audit record"
            );
        }
    }
}

/// Serves DNS over TCP (RFC 7766: each message behind a 2-byte length) on `listener`
/// until the task is aborted, within the resolver's `limits`; one task per connection,
/// queries on a connection answered in order.
pub async fn serve_tcp(listener: TcpListener, ctx: Arc<ResolverCtx>, limits: Arc<ResolverLimits>) {
    let TransportLimits {
        permits,
        shed,
        refusals,
    } = &limits.tcp;
    // Each connection's task ends with this one: a connection held open must not go on
    // resolving under the policy (and outside the quarantine) of a resolver that stopped.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                said_if_panicked(&ctx.sandbox, done);
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(sandbox = %ctx.sandbox, error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(sandbox = %ctx.sandbox, %peer, "Too many DNS TCP connections; closed one");
            shed.count(&ctx.sandbox);
            continue;
        };
        let (ctx, refusals) = (ctx.clone(), refusals.clone());
        connections.spawn(async move {
            let _permit = permit;
            serve_connection(stream, &ctx, &refusals).await;
        });
    }
}

/// Answers the queries on one TCP connection until the client closes it, stalls for
/// [`TCP_IDLE`], or sends something that gets no answer.
async fn serve_connection(mut stream: TcpStream, ctx: &ResolverCtx, refusals: &RefusalRecords) {
    loop {
        let mut len = [0u8; 2];
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            // A query begun and not finished: refused (nothing sent on), and said so.
            unfinished => {
                if refusals.admit(&ctx.sandbox) {
                    let how = match unfinished {
                        Err(_) => format!("did not send them all within {} s", TCP_IDLE.as_secs()),
                        _ => "closed the connection before sending them all".to_owned(),
                    };
                    let mut record = unread_query(ctx);
                    record.reason = Some(format!(
                        "a DNS-over-TCP query announced {} bytes and {how}; nothing answered \
                         or sent on",
                        query.len()
                    ));
                    (ctx.audit)(finish(record));
                }
                return;
            }
        }
        let Some(reply) = resolve(ctx, refusals, &query, Transport::Tcp).await else {
            return;
        };
        // `answer::encode` keeps TCP answers within 65535 bytes.
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Refused queries a listener records one by one: at most [`REFUSALS_RECORDED`] per
/// [`ALERT_WINDOW`]; the rest of the window are counted in one `rate-limit` alert. A
/// refused name never left the host, and a sandbox sending refused queries in a tight
/// loop (one connected UDP socket, no kernel event each) must not turn each into a line
/// of the trail.
fn refusal_records(ctx: &ResolverCtx) -> RefusalRecords {
    RefusalRecords::new(
        REFUSALS_RECORDED,
        ALERT_WINDOW,
        "refused DNS queries",
        ctx.alert.clone(),
    )
}

/// Handles one query: returns the bytes to send back (`None`: send nothing) after
/// emitting its record (a refusal's only while [`RefusalRecords`] admits it).
async fn resolve(
    ctx: &ResolverCtx,
    refusals: &RefusalRecords,
    bytes: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let (reply, record) = decide(ctx, bytes, transport).await;
    debug!(
        sandbox = %ctx.sandbox,
        name = %record.question_name,
        qtype = %record.question_type,
        rcode = %record.response_code,
        verdict = ?record.verdict,
        "DNS query"
    );
    if record.verdict == DnsVerdict::Deny {
        (ctx.denied)();
    }
    // Only refusals of queries that never left the host are limited: one sent upstream
    // (then refused for its answer) is always recorded, its name having gone out.
    if record.verdict == DnsVerdict::Allow
        || record.upstream.is_some()
        || refusals.admit(&ctx.sandbox)
    {
        (ctx.audit)(record);
    }
    reply
}

/// The record of a query sent upstream, written when the query's task ends before the
/// answer came (the resolver stopped): the name left the host, so the trail says so.
struct InFlight<'a> {
    record: Option<DnsRecord>,
    audit: &'a DnsAuditSink,
}

impl InFlight<'_> {
    /// The answer (or the upstream's failure) came: the query's own record follows.
    fn landed(mut self) {
        self.record = None;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.response_code = rcode_name(ResponseCode::ServFail);
            record.reason = Some(
                "the resolver stopped before the upstream answered (the query was sent \
                 upstream; the sandbox got no answer)"
                    .to_owned(),
            );
            (self.audit)(finish(record));
        }
    }
}

/// The record of a query not read yet: refused as malformed until it is known to be more.
fn unread_query(ctx: &ResolverCtx) -> DnsRecord {
    DnsRecord {
        time: OffsetDateTime::now_utc(),
        sandbox: ctx.sandbox.clone(),
        question_name: String::new(),
        question_type: String::new(),
        response_code: rcode_name(ResponseCode::FormErr),
        resolved_ip: Vec::new(),
        refused: Vec::new(),
        verdict: DnsVerdict::Deny,
        rule: None,
        reason: None,
        upstream: None,
    }
}

/// The reply and record for one query.
async fn decide(
    ctx: &ResolverCtx,
    bytes: &[u8],
    transport: Transport,
) -> (Option<Vec<u8>>, DnsRecord) {
    let policy = ctx.policy.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mut record = unread_query(ctx);
    let question = match query::inspect(bytes, ctx.max_label) {
        Ok(q) => q,
        Err(rejected) => {
            if let Some((name, qtype)) = rejected.question {
                record.question_name = name;
                record.question_type = type_name(qtype);
            }
            record.response_code = rcode_name(rejected.code);
            record.reason = Some(rejected.reason);
            return (rejected.reply, finish(record));
        }
    };
    record.question_name = question.name.clone();
    record.question_type = type_name(question.qtype);
    if ctx.quarantined.load(Ordering::Acquire) {
        record.response_code = rcode_name(ResponseCode::Refused);
        record.reason = Some("the sandbox is quarantined".to_owned());
        return (
            question.error_reply(ResponseCode::Refused, false),
            finish(record),
        );
    }

    let rule_ids = if policy.name_allowed(&question.name) {
        policy.rules_for_name(&question.name)
    } else {
        Vec::new()
    };
    let Some(&first_rule) = rule_ids.first() else {
        let decision = policy.decide_name(&question.name);
        record.rule = policy.rule_name(decision.rule_id).map(str::to_owned);
        record.reason = Some(match &record.rule {
            Some(rule) => format!("name is denied by rule `{rule}`"),
            None => "name is not allowed by the policy".to_owned(),
        });
        record.response_code = rcode_name(ResponseCode::NXDomain);
        return (
            question.error_reply(ResponseCode::NXDomain, true),
            finish(record),
        );
    };
    record.verdict = DnsVerdict::Allow;
    record.rule = policy.rule_name(first_rule).map(str::to_owned);

    let refuse = |mut record: DnsRecord, reason: String| {
        record.verdict = DnsVerdict::Deny;
        record.response_code = rcode_name(ResponseCode::Refused);
        record.reason = Some(reason);
        (
            question.error_reply(ResponseCode::Refused, false),
            finish(record),
        )
    };
    if !policy.query_type_allowed(question.qtype) {
        let why = format!(
            "query type {} is not answered (A and AAAA are, and the types the policy's \
             `dns.query_types` lists; never ANY, AXFR or IXFR)",
            type_name(question.qtype)
        );
        return refuse(record, why);
    }
    if let Err(why) = spend_budget(ctx, &policy, &rule_ids, &question.name) {
        return refuse(record, why);
    }

    let upstreams = policy
        .dns()
        .map(|d| d.upstream.as_slice())
        .filter(|u| !u.is_empty())
        .unwrap_or(&ctx.default_upstream);
    let servfail = |mut record: DnsRecord, reason: String| {
        record.response_code = rcode_name(ResponseCode::ServFail);
        record.resolved_ip.clear();
        record.reason = Some(reason);
        (
            question.error_reply(ResponseCode::ServFail, false),
            finish(record),
        )
    };
    // The query leaves the host now: if the resolver stops before the answer comes (a
    // detach, a policy that names no hosts), the record is written all the same.
    let in_flight = InFlight {
        record: Some(record.clone()),
        audit: &ctx.audit,
    };
    let exchanged = upstream::exchange(
        &ctx.dialer,
        upstreams,
        ctx.timeout,
        &question,
        &ctx.quarantined,
    )
    .await;
    in_flight.landed();
    let response = match exchanged {
        Ok(exchanged) => {
            record.upstream = Some(exchanged.server);
            exchanged.response
        }
        Err(failure) => {
            record.upstream = failure.server;
            return servfail(record, failure.reason);
        }
    };
    // A quarantine that began while the upstream answered: nothing of the answer is
    // delivered or learned (an answer that teaches no address, a TXT record or a
    // no-such-name, still carries data in).
    if ctx.quarantined.load(Ordering::Acquire) {
        record.verdict = DnsVerdict::Deny;
        record.response_code = rcode_name(ResponseCode::Refused);
        record.reason = Some("the sandbox was quarantined while the answer came".to_owned());
        return (
            question.error_reply(ResponseCode::Refused, false),
            finish(record),
        );
    }

    let crossing = |name: &str| {
        policy
            .proxy_overtaken(&rule_ids, &policy.rules_for_name(name))
            .map(|(asked, theirs)| format!("rule `{asked}` against rule `{theirs}`"))
    };
    let addrs = match answer::check(
        &response,
        &question.qname,
        |n| policy.name_allowed(n),
        crossing,
    ) {
        Ok(addrs) => addrs,
        Err(reason) => {
            record.verdict = DnsVerdict::Deny;
            record.rule = None;
            record.reason = Some(reason);
            record.response_code = rcode_name(ResponseCode::NXDomain);
            return (
                question.error_reply(ResponseCode::NXDomain, true),
                finish(record),
            );
        }
    };
    // Only address questions teach the kernel; an answer to anything else may carry
    // addresses too (ANY, glue), but they are not what the client asked to connect to.
    let mut response = response;
    let mut refused: Vec<RefusedAnswer> = Vec::new();
    let mut learned: Vec<Learned> = Vec::new();
    if matches!(question.qtype, RecordType::A | RecordType::AAAA) {
        for (addr, ttl) in addrs {
            if learned.len() >= MAX_LEARNED_PER_ANSWER {
                refused.push(RefusedAnswer {
                    ip: addr,
                    reason: format!(
                        "more than {MAX_LEARNED_PER_ANSWER} addresses in one answer (the rest \
                         are left out)"
                    ),
                });
                continue;
            }
            match policy.answer_refusal(&rule_ids, addr) {
                Some(reason) => refused.push(RefusedAnswer { ip: addr, reason }),
                None => learned.push(Learned {
                    name: question.name.clone(),
                    addr,
                    rule_ids: rule_ids.clone(),
                    ttl,
                }),
            }
        }
    }
    if !learned.is_empty() {
        match (ctx.learn)(&learned) {
            Ok(not_installed) => {
                for (ip, reason) in not_installed {
                    learned.retain(|l| l.addr != ip);
                    refused.push(RefusedAnswer { ip, reason });
                }
            }
            Err(e) => {
                // egressd refuses the answer (a learned-address cap, a quarantine that
                // began meanwhile, a sandbox gone): a denial, counted as one.
                record.verdict = DnsVerdict::Deny;
                return servfail(
                    record,
                    format!("the agent could not install the answer's addresses: {e}"),
                );
            }
        }
    }
    let installed: Vec<IpAddr> = learned.iter().map(|l| l.addr).collect();
    for ip in answer::keep_only(&mut response, &installed) {
        if !refused.iter().any(|r| r.ip == ip) {
            refused.push(RefusedAnswer {
                ip,
                reason: "not an address of the name asked in an address question (only \
                         those are installed)"
                    .into(),
            });
        }
    }
    answer::cap_ttls(&mut response, MAX_ANSWER_TTL);
    record.resolved_ip = installed;
    if !refused.is_empty() {
        record.reason = Some(if refused.len() > MAX_REFUSED_RECORDED {
            format!(
                "{} answer address(es) refused; the first {MAX_REFUSED_RECORDED} in \
                 egress.dns.refused",
                refused.len()
            )
        } else {
            format!(
                "{} answer address(es) refused; see egress.dns.refused",
                refused.len()
            )
        });
    }
    // A record stays one line a shipper takes whole: an answer can hold thousands.
    refused.truncate(MAX_REFUSED_RECORDED);
    record.refused = refused;
    let limit = match transport {
        Transport::Udp => question.udp_limit(),
        Transport::Tcp => usize::from(u16::MAX),
    };
    match answer::encode(response, &question, limit) {
        Ok((reply, code)) => {
            record.response_code = rcode_name(code);
            (Some(reply), finish(record))
        }
        Err(e) => servfail(
            record,
            format!("the agent could not encode the answer: {e}"),
        ),
    }
}

/// Spends one query of the sandbox's budget, or says why it is over; the first refusal
/// in a window schedules the window's one alert.
fn spend_budget(
    ctx: &ResolverCtx,
    policy: &Policy,
    rule_ids: &[u16],
    name: &str,
) -> Result<(), String> {
    let patterns = policy.wildcards_for_name(rule_ids, name);
    let limits = policy.dns_budget();
    let now = Instant::now();
    let mut budget = ctx.budget.lock().unwrap_or_else(|p| p.into_inner());
    let Err(over) = budget.admit(now, &limits, name, &patterns) else {
        return Ok(());
    };
    if budget.refused(now, &over) {
        // The timer holds the alert sink weakly: a resolver stopped meanwhile raised the
        // window's alert itself, and the sink (the audit trail behind it) is not kept
        // alive past the stop by a timer.
        let (state, alert, sandbox) = (
            ctx.budget.clone(),
            Arc::downgrade(&ctx.alert),
            ctx.sandbox.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(ALERT_WINDOW).await;
            if let Some(alert) = alert.upgrade() {
                raise_budget_alert(&state, &alert, sandbox);
            }
        });
    }
    Err(over.reason())
}

/// Raises the `dns-budget` alert of the window open in `budget`, if one is: at the
/// window's end, or at once when the resolver stops.
pub fn raise_budget_alert(budget: &Mutex<Budget>, alert: &AlertSink, sandbox: String) {
    let summary = budget
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take_alert(Instant::now());
    if let Some(summary) = summary {
        warn!(%sandbox, count = summary.count, "DNS budget exceeded");
        let mut record = Alert::new(
            OffsetDateTime::now_utc(),
            AlertKind::DnsBudget,
            sandbox,
            summary.reason(),
        );
        record.count = summary.count;
        record.window_seconds = Some(summary.window.as_secs().max(1));
        alert(record);
    }
}

/// Stamps the record with the time the query was done.
fn finish(mut record: DnsRecord) -> DnsRecord {
    record.time = OffsetDateTime::now_utc();
    record
}

/// `dns.response_code`: the RFC mnemonic, upper case.
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::YXDomain => "YXDOMAIN".into(),
        ResponseCode::YXRRSet => "YXRRSET".into(),
        ResponseCode::NXRRSet => "NXRRSET".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::NotZone => "NOTZONE".into(),
        ResponseCode::BADVERS => "BADVERS".into(),
        ResponseCode::BADCOOKIE => "BADCOOKIE".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// `dns.question.type`: the mnemonic, or `TYPEnnn` (RFC 3597) for unnamed types.
fn type_name(qtype: RecordType) -> String {
    match qtype {
        RecordType::Unknown(n) => format!("TYPE{n}"),
        other => <&'static str>::from(other).to_owned(),
    }
}
