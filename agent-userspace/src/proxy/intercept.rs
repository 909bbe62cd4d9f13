//! Intercepted connections: TLS terminated with a leaf from the local CA, HTTP/1 and
//! HTTP/2 served by hyper, each request checked, stripped of client credentials, given
//! the rule's credential and re-sent (re-serialised by hyper, never as raw bytes) to the
//! original destination.

use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, EXPECT, HOST,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::body::{
    drain, BodyEnd, CountingBody, DrainBound, Finish, InFlight, RecordedBody, SecretWatch,
};
use super::error::ProxyError;
use super::git::{self, PushOutcome};
use super::h2head::H2HeadTimed;
use super::head::{HeadClock, HeadTimed};
use super::inject::{self, RequestScan};
use super::io::{idle_watch, Activity, Idle, Metered, PrefixedStream};
use super::method_override::{self, BodyCheck};
use super::range;
use super::refused::{
    connection_refusal, is_client_abort, H2Watch, StreamReset, CLIENT_ABORTED, CLOSED_BY_DAEMON,
};
use super::scrub::{self, OutboundScan, ResponseBody};
use super::target::{
    form_to_blob_uploads, judge_destination, judge_target, unjudged_second_target, TargetRefusal,
};
use super::upstream::{DialParams, PoolKey, Sender};
use super::{ConnInfo, Proxy};
use crate::audit::{query_keys, ProxyVerdict as Verdict, RecordKind, SecretFinding, TlsMode};
use crate::credentials::normalize_host;
use crate::text::sanitize;

/// Serves the certificate minted for the connection's (already checked) server name,
/// and nothing for any other name.
#[derive(Debug)]
pub(super) struct FixedCert {
    name: String,
    key: Arc<CertifiedKey>,
}

impl FixedCert {
    pub(super) fn new(name: &str, key: Arc<CertifiedKey>) -> Self {
        Self {
            name: name.to_owned(),
            key,
        }
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(normalize_host)?;
        (name == self.name).then(|| self.key.clone())
    }
}

/// The sandbox's side of an intercepted connection once its TLS handshake is done.
type SandboxTls = tokio_rustls::server::TlsStream<Metered<PrefixedStream<TcpStream>>>;

/// Handles one intercepted connection after its server name has been allowed.
pub(super) async fn intercept(
    proxy: Arc<Proxy>,
    stream: PrefixedStream<TcpStream>,
    conn: Arc<ConnInfo>,
    sni: String,
    started: Instant,
    handshake_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    unrecorded: super::Unrecorded,
) {
    let activity = Activity::new();
    // Boxed: the handshake, its timer and its refusals are over within a few round trips,
    // and the connection's future keeps room for its largest state for as long as the
    // connection is open.
    let handshake = Box::pin(handshake(&proxy, stream, &conn, &sni, started, &activity));
    let handshaken = handshake.await;
    // A failed handshake is recorded; a finished one's end is recorded by `serve`.
    unrecorded.disarm();
    let Some(tls) = handshaken else {
        return;
    };
    // The sandbox's handshake slot is free once the handshake is done.
    drop(handshake_permit);
    serve(proxy, tls, conn, sni, activity).await;
}

/// The sandbox-side TLS handshake with a leaf for `sni`; `None` once a failure is
/// recorded.
async fn handshake(
    proxy: &Proxy,
    stream: PrefixedStream<TcpStream>,
    conn: &ConnInfo,
    sni: &str,
    started: Instant,
    activity: &Arc<Activity>,
) -> Option<SandboxTls> {
    // The connection is refused, nothing forwarded: a deny (and, as every proxy refusal,
    // counted past the sandbox's share of recorded refusals instead of written).
    let connection_record = |reason: String| {
        let mut record = proxy.record(conn, TlsMode::Intercept, Some(sni), RecordKind::Connection);
        record.verdict = Verdict::Deny;
        record.reason = Some(reason);
        record.bytes_in = activity.bytes_read();
        record.bytes_out = activity.bytes_written();
        record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        (proxy.audit)(record);
    };

    let config = match proxy
        .ca
        .leaf_for(sni)
        .map_err(ProxyError::from)
        .and_then(|key| {
            // Git routes speak HTTP/1.1 only: git's HTTP/2 uploads stall with several
            // libcurl releases (7.88 in Debian 12 among them) on large pushes.
            let h2 = conn.route.git.is_none();
            proxy.downstream_tls(sni, key, h2)
        }) {
        Ok(config) => config,
        Err(e) => {
            connection_record(e.to_string());
            return None;
        }
    };

    let metered = Metered::new(stream, activity.clone());
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(metered);
    match tokio::time::timeout(proxy.timeouts.handshake, handshake).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(source)) => {
            // An ALPN list sharing nothing with the route's (an HTTP/2-only client on a
            // git route, which speaks HTTP/1.1 only) is the proxy's refusal, not trust.
            let no_alpn = source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .is_some_and(|e| matches!(e, rustls::Error::NoApplicationProtocol));
            let e = ProxyError::DownstreamIo {
                peer: conn.peer,
                op: if no_alpn {
                    "TLS handshake: the client offered no application protocol this route \
                     serves (HTTP/1.1 only on git routes, else HTTP/1.1 or HTTP/2)"
                } else {
                    "TLS handshake (does the sandbox trust the egressd CA?)"
                },
                source,
            };
            connection_record(e.to_string());
            None
        }
        Err(_) => {
            let e = ProxyError::DownstreamTimeout {
                peer: conn.peer,
                op: "TLS handshake",
                secs: proxy.timeouts.handshake.as_secs(),
            };
            connection_record(e.to_string());
            None
        }
    }
}

/// HTTP/2 streams one intercepted connection may have open at once (nginx's default is
/// 128).
const MAX_H2_STREAMS: u32 = 100;

/// Flow-control window of one upload stream from a sandbox: the most of its body the
/// proxy takes before the origin reads it.
const DOWNSTREAM_STREAM_WINDOW: u32 = 256 * 1024;
/// Of all upload streams of one sandbox connection together.
const DOWNSTREAM_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// An answer's bytes queued for a sandbox stream that does not read them.
const DOWNSTREAM_SEND_BUFFER: usize = 64 * 1024;

/// Serves HTTP on an intercepted connection until it ends, is cut by a timer or is idle
/// for `idle_secs`. The future returned is what every open connection holds: set up
/// before it is made, so it keeps no room for the values the setup moves away (an async
/// fn keeps its arguments, the TLS connection among them, for as long as it runs).
fn serve(
    proxy: Arc<Proxy>,
    tls: SandboxTls,
    conn: Arc<ConnInfo>,
    sni: String,
    activity: Arc<Activity>,
) -> impl Future<Output = ()> + Send {
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);

    let in_flight = Arc::new(AtomicUsize::new(0));
    let head_clock = HeadClock::new();
    // HTTP/2 only when the client chose it in ALPN.
    let h2 = alpn.as_deref() == Some(b"h2");
    let ctx = Arc::new(ConnCtx {
        head_clock: (!h2).then(|| head_clock.clone()),
        proxy: proxy.clone(),
        conn: conn.clone(),
        pool_key: Arc::new(PoolKey::new(&conn.sandbox, conn.original_dst, &sni)),
        target: target(&sni, Some(conn.original_dst.port())),
        sni: sni.clone(),
        in_flight: in_flight.clone(),
        activity: activity.clone(),
    });
    // Requests given to the handler, and refusals recorded below it: a connection that
    // ends with neither still gets a record.
    let handled = Arc::new(AtomicU64::new(0));
    let service = {
        let head_clock = head_clock.clone();
        let handled = handled.clone();
        hyper::service::service_fn(move |req| {
            // Called as soon as hyper has parsed the request head.
            head_clock.head_received();
            handled.fetch_add(1, Ordering::Relaxed);
            let in_flight = InFlight::new(&ctx.in_flight);
            let ctx = ctx.clone();
            // Boxed: hyper keeps room for one request's future beside every HTTP/1
            // connection for as long as it is open, so the (large) handler lives on the
            // heap only while a request is being handled, not in every idle connection.
            let handling = Box::pin(async move { ctx.handle(req, in_flight).await });
            async move { Ok::<_, Infallible>(handling.await) }
        })
    };

    // Every refusal below the handler is recorded as a denied request: HTTP/1 parse
    // errors (hyper answers those itself), HTTP/2 connection errors, and HTTP/2 streams
    // the HTTP/2 layer resets (seen in the frames written).
    let refused = {
        let (proxy, conn, sni, handled) =
            (proxy.clone(), conn.clone(), sni.clone(), handled.clone());
        move |status: Option<u16>, reason: String| {
            handled.fetch_add(1, Ordering::Relaxed);
            let mut record =
                proxy.record(&conn, TlsMode::Intercept, Some(&sni), RecordKind::Request);
            record.verdict = Verdict::Deny;
            record.status = status;
            record.reason = Some(reason);
            (proxy.audit)(record);
        }
    };
    // Refusing resets the HTTP/2 layer wrote, each recorded as it is seen.
    let resets = Arc::new(AtomicU64::new(0));
    let on_reset = {
        let (refused, resets) = (refused.clone(), resets.clone());
        move |reset: StreamReset| {
            resets.fetch_add(1, Ordering::Relaxed);
            refused(None, reset.reason());
        }
    };

    // ALPN has decided the protocol, so each connection gets only its own protocol's
    // state (a connection that could become either is sized for both). Boxed as it is:
    // an `async` block around it would keep room for it twice (the block's captured copy
    // beside the one being polled) for as long as the connection is open.
    let served: Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> = if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        // Extended CONNECT (`:protocol`) reaches the handler, which refuses and records
        // it, instead of being reset unseen by the HTTP/2 layer.
        builder
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            // Streams in flight on one connection (hyper's default is 200); the
            // sandbox's requests over all its connections are bounded in `handle`.
            .max_concurrent_streams(MAX_H2_STREAMS)
            // What a sandbox's stalled streams make the daemon hold (hyper's defaults are
            // a 1 MiB window per upload stream and per connection, and 400 KiB queued
            // per answer stream): on loopback, smaller ones cost no speed.
            .initial_stream_window_size(DOWNSTREAM_STREAM_WINDOW)
            .initial_connection_window_size(DOWNSTREAM_CONNECTION_WINDOW)
            .max_send_buf_size(DOWNSTREAM_SEND_BUFFER)
            .max_header_list_size(u32::try_from(proxy.config.max_header_bytes).unwrap_or(u32::MAX));
        let timed = H2HeadTimed::new(tls, head_clock.clone(), proxy.timeouts.header);
        let conn = builder.serve_connection(TokioIo::new(H2Watch::new(timed, on_reset)), service);
        Box::pin(conn)
    } else {
        let timed = HeadTimed::new(
            tls,
            head_clock.clone(),
            in_flight.clone(),
            proxy.timeouts.header,
        );
        let mut builder = hyper::server::conn::http1::Builder::new();
        // hyper's header timer would also close idle keep-alive connections: the header
        // timer is [`HeadTimed`]'s, the idle timer `idle_watch` below.
        builder
            .header_read_timeout(None)
            .max_buf_size(proxy.config.max_header_bytes)
            .keep_alive(true);
        let conn = builder.serve_connection(TokioIo::new(timed), service);
        Box::pin(conn)
    };
    let idle = proxy.timeouts.idle;
    // What a header timer cut off, in the refusal's words.
    let unfinished = if h2 {
        "HTTP/2 header block or frame"
    } else {
        "request header"
    };
    let started = std::time::Instant::now();
    async move {
        tokio::select! {
            result = served => {
                if let Err(error) = result {
                    debug!(peer = %conn.peer, connection_id = %conn.connection_id, %error, "Intercepted connection ended with an error");
                    if head_clock.timed_out() {
                        refused(None, format!(
                            "downstream client: {unfinished} not complete {} s after it began \
                             (proxy.header_secs); connection closed",
                            proxy.timeouts.header.as_secs()
                        ));
                    } else if let Some((status, reason)) = connection_refusal(&error) {
                        refused(status, reason);
                    }
                }
            }
            why = idle_watch(&activity, idle, || in_flight.load(Ordering::Relaxed) > 0) => {
                debug!(peer = %conn.peer, connection_id = %conn.connection_id, idle_secs = idle.as_secs(), ?why, "Closing idle intercepted connection");
                if why == Idle::Stalled {
                    // Whatever it held (the response's buffers, its upstream stream, its
                    // request permit) is let go.
                    refused(None, format!("{}; connection closed", why.reason(idle)));
                } else if head_clock.incomplete() {
                    refused(None, format!(
                        "downstream client: {unfinished} incomplete and no byte for {} s \
                         (proxy.idle_secs); connection closed",
                        idle.as_secs()
                    ));
                }
            }
        }
        // HTTP/2 requests that never reached the handler and were not reset left no
        // other trace: the HTTP/2 layer answers 431 to a header list over its limit on a
        // request without a body, and writes nothing more.
        if h2 {
            for _ in 0..head_clock.h2_unhandled(resets.load(Ordering::Relaxed)) {
                refused(
                    None,
                    format!(
                        "downstream client: HTTP/2 request not given to the proxy's checks: \
                         refused by the HTTP/2 layer (a header list over \
                         proxy.max_header_bytes, {} bytes, is answered 431), cancelled by the \
                         client before it was taken, or dropped as the connection ended; not \
                         forwarded",
                        proxy.config.max_header_bytes
                    ),
                );
            }
        }
        // A connection that ended before any request: nothing was forwarded, and the
        // trail says so.
        if handled.load(Ordering::Relaxed) == 0 {
            let mut record = proxy.record(
                &conn,
                TlsMode::Intercept,
                Some(&sni),
                RecordKind::Connection,
            );
            record.reason = Some(
                "downstream client: connection closed before any request; nothing forwarded"
                    .to_owned(),
            );
            record.bytes_in = activity.bytes_read();
            record.bytes_out = activity.bytes_written();
            record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            (proxy.audit)(record);
        }
    }
}

/// Why a request gets a response made by the proxy instead of the upstream's.
struct Refusal {
    status: StatusCode,
    verdict: Verdict,
    reason: String,
    /// A body of this content type instead of `reason` as text (a git status report).
    body: Option<(&'static str, Bytes)>,
}

impl Refusal {
    fn deny(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            verdict: Verdict::Deny,
            reason: reason.into(),
            body: None,
        }
    }

    /// An upstream failure: 502. Refusing to dial an address is a denial; anything
    /// else happened after the request was allowed.
    fn upstream(e: ProxyError) -> Self {
        let verdict = match e {
            ProxyError::UpstreamRefused { .. } => Verdict::Deny,
            _ => Verdict::Allow,
        };
        Self {
            status: StatusCode::BAD_GATEWAY,
            verdict,
            reason: e.to_string(),
            body: None,
        }
    }
}

/// A request's record while the handler runs: if hyper drops the handler first (the
/// client reset the stream or closed the connection), the record is emitted as a client
/// abort.
struct Pending {
    record: crate::audit::ProxyRecord,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    audit: super::AuditSink,
    armed: bool,
    /// The connection's [`super::ConnInfo::closing`].
    closing: Arc<std::sync::atomic::AtomicBool>,
}

impl Pending {
    /// The record, moved out (a record holds a dozen strings: no copy of them).
    fn disarm(mut self) -> crate::audit::ProxyRecord {
        self.armed = false;
        let empty = super::blank_record(
            self.record.kind,
            String::new(),
            String::new(),
            String::new(),
            self.record.tls_mode,
            self.record.original_dst,
            None,
        );
        std::mem::replace(&mut self.record, empty)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut record = self.record.clone();
        record.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        record.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let sent = if record.forwarded {
            ", after the request was sent upstream"
        } else {
            ""
        };
        let why = if self.closing.load(Ordering::SeqCst) {
            format!("{CLOSED_BY_DAEMON} before the response{sent}")
        } else {
            format!("{CLIENT_ABORTED}: the downstream client went away before the response{sent}")
        };
        record.reason = Some(format!(
            "{why}{}",
            record
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ));
        (self.audit)(record);
    }
}

struct ConnCtx {
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    sni: String,
    /// Which pooled upstream connections this connection's requests may use.
    pool_key: Arc<PoolKey>,
    /// `:authority` and `Host` of every upstream request, made once: the server name and
    /// the port the connection was made to (whatever port the request named).
    target: Option<(Authority, HeaderValue)>,
    in_flight: Arc<AtomicUsize>,
    /// The connection's byte and response clocks.
    activity: Arc<Activity>,
    /// An HTTP/1 connection's header clock, told when each request's body has ended.
    head_clock: Option<Arc<HeadClock>>,
}

/// The upstream `:authority` and `Host` for the server name and port, if they can be
/// made (443 is left out).
fn target(sni: &str, port: Option<u16>) -> Option<(Authority, HeaderValue)> {
    let authority = match port {
        Some(port) if port != 443 => Authority::try_from(format!("{sni}:{port}")).ok()?,
        _ => Authority::try_from(sni).ok()?,
    };
    let host = HeaderValue::from_str(authority.as_str()).ok()?;
    Some((authority, host))
}

type Forwarded = (Response<Incoming>, Option<Box<dyn FnOnce() + Send>>);

impl ConnCtx {
    async fn handle(
        &self,
        req: Request<Incoming>,
        mut in_flight: InFlight,
    ) -> Response<RecordedBody> {
        let started = Instant::now();
        let mut record = self.proxy.record(
            &self.conn,
            TlsMode::Intercept,
            Some(&self.sni),
            RecordKind::Request,
        );
        record.method = Some(req.method().as_str().to_owned());
        record.path = Some(req.uri().path().to_owned());
        record.query_keys = query_keys(req.uri().query());
        let bytes_in = Arc::new(AtomicU64::new(0));
        let secrets = SecretWatch::default();

        let mut pending = Pending {
            record,
            started,
            bytes_in: bytes_in.clone(),
            audit: self.proxy.audit.clone(),
            armed: true,
            closing: self.conn.closing.clone(),
        };
        // The body stays here until it is sent on. A refused request's is read to its end
        // (within bounds) beside the answer: dropped unread, HTTP/2 would reset the stream
        // under an upload still being sent, and the client could lose the answer. A client
        // waiting for `100 Continue` is not invited to send a body that goes nowhere.
        let (head, body) = req.into_parts();
        // Any of its `Expect` fields (hyper answers the last one).
        let waits_for_continue = head
            .headers
            .get_all(EXPECT)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        // HTTP/1: the header clock learns where this request's body ends.
        let mut body_end = None;
        if let Some(clock) = &self.head_clock {
            if body.is_end_stream() {
                clock.body_ended(clock.requests());
            } else {
                body_end = Some(BodyEnd::new(clock, &self.in_flight));
            }
        }
        let mut unsent = Some(body);
        // One sandbox's requests in flight are bounded over all its connections and
        // streams (each may hold a body read whole, an upstream connection, a response
        // the client does not read), so that it cannot take the proxy from the others.
        let forwarded = if in_flight.admit(&self.conn.requests) {
            self.forward(
                Request::from_parts(head, ()),
                &mut unsent,
                &mut body_end,
                &mut pending.record,
                &bytes_in,
                &secrets,
            )
            .await
        } else {
            Err(Refusal::deny(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "sandbox already has {} requests in flight through the proxy \
                     (proxy.max_requests_per_sandbox)",
                    self.proxy.config.max_requests_per_sandbox
                ),
            ))
        };
        let outcome = forwarded.and_then(|(response, on_complete)| {
            let (mut parts, body) = response.into_parts();
            let asked_range = parts.extensions.remove::<range::Widened>();
            // hyper keeps an HTTP/1 origin's own reason phrase among the extensions
            // and its server writes it back out: text that is never scanned for
            // secrets, so it goes (the sandbox gets the standard phrase), with
            // anything else hyper's client attached.
            parts.extensions.clear();
            // The byte range asked for, cut from the widened one the origin sent; a
            // partial answer the proxy did not ask for is not sent where responses are
            // scanned.
            // A widened range is scrubbed with the matcher it was widened for.
            let bad_gateway = |reason| Refusal::deny(StatusCode::BAD_GATEWAY, reason);
            let (matcher, window) = match asked_range {
                Some(widened) => {
                    // A secret first known since the range was widened (a token minted
                    // for another request meanwhile) may be longer than the margin: cut
                    // at an edge, its pieces would pass the scan.
                    let latest = self.proxy.secret_matcher();
                    if latest.is_some_and(|m| {
                        u64::try_from(m.span()).unwrap_or(u64::MAX) > widened.margin
                    }) {
                        return Err(bad_gateway(
                            "upstream server: a secret longer than the margin this byte \
                             range was widened by became known while it was asked; ask \
                             again"
                                .to_owned(),
                        ));
                    }
                    let window = widened
                        .narrow(&mut parts.status, &mut parts.headers)
                        .map_err(bad_gateway)?
                        .map(|window| (window, widened.margin));
                    (Some(widened.matcher), window)
                }
                None => {
                    let matcher = self.proxy.secret_matcher();
                    if matcher.is_some() {
                        range::unasked(parts.status, &parts.headers).map_err(bad_gateway)?;
                    }
                    (matcher, None)
                }
            };
            // Scrubbed (headers too) on every rule, with a credential or not: a secret
            // an origin stored could be read back through another host. Judged before
            // the hop-by-hop headers (its transfer codings) go; a body whose encoding
            // cannot be scanned is refused.
            let body = match matcher {
                Some(matcher) => scrub::scrub_response(
                    &mut parts.headers,
                    body,
                    matcher,
                    self.proxy.latest_matcher(),
                    secrets.scrubbed.clone(),
                    window,
                )
                .map_err(bad_gateway)?,
                None => ResponseBody::Plain(body),
            };
            strip_hop_by_hop(&mut parts.headers);
            // A session an origin opens for a request that carried the injected
            // credential is that credential's power in a form the scrubber does not know:
            // it stays with the proxy's side, which sends the credential each time.
            if self.conn.route.credential.is_some() {
                super::session::strip_sessions(&mut parts.headers);
            }
            Ok((parts, body, on_complete))
        });
        let record = pending.disarm();
        let mut finish = Finish {
            closing: self.conn.closing.clone(),
            record,
            started,
            bytes_in,
            audit: self.proxy.audit.clone(),
            on_complete: None,
            in_flight,
            secrets,
        };
        match outcome {
            Ok((mut parts, body, on_complete)) => {
                parts.version = Version::HTTP_11;
                finish.record.status = Some(parts.status.as_u16());
                finish.on_complete = on_complete;
                let handed = self.activity.response();
                Response::from_parts(parts, RecordedBody::upstream(body, finish, handed))
            }
            Err(refusal) => {
                // A body already read from (a push's commands) has had its `100 Continue`.
                let invited = !waits_for_continue || finish.bytes_in.load(Ordering::Relaxed) > 0;
                match unsent {
                    Some(body) if body.is_end_stream() => {
                        if let Some(end) = body_end {
                            end.ended();
                        }
                    }
                    Some(body) if invited => {
                        let push = finish.record.git.as_ref().is_some_and(|g| {
                            g.service == crate::policy::git::Service::ReceivePack.as_str()
                        });
                        let bound = if push {
                            DrainBound::PUSH
                        } else {
                            DrainBound::UPLOAD
                        };
                        // Counted among the sandbox's requests until it ends: a client
                        // cannot keep refused uploads streaming beyond its share. One
                        // refused for being past that share has no permit to count it:
                        // over HTTP/2 its body is dropped unread (the stream is reset
                        // after the answer); over HTTP/1 (one request at a time per
                        // connection, whose number is bounded) a little is read, so that
                        // the client sees the answer rather than a reset connection.
                        match finish.in_flight.take_permit() {
                            Some(permit) => {
                                tokio::spawn(async move {
                                    let _permit = permit;
                                    drain(body, body_end, bound).await;
                                });
                            }
                            None if body_end.is_some() => {
                                tokio::spawn(drain(body, body_end, DrainBound::OVER_SHARE));
                            }
                            None => {}
                        }
                    }
                    _ => {}
                }
                debug!(
                    connection_id = %self.conn.connection_id,
                    status = refusal.status.as_u16(),
                    reason = %refusal.reason,
                    "Request answered by the proxy"
                );
                finish.record.status = Some(refusal.status.as_u16());
                finish.record.verdict = refusal.verdict;
                // Reasons may quote what the request carried: never echo control characters.
                let (content_type, body) = refusal.body.unwrap_or_else(|| {
                    (
                        "text/plain; charset=utf-8",
                        Bytes::from(format!("{}\n", sanitize(&refusal.reason, 1000))),
                    )
                });
                finish.record.reason = Some(refusal.reason);
                let mut response = Response::new(RecordedBody::local(body, finish));
                *response.status_mut() = refusal.status;
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
        }
    }

    /// Judges `req`, makes the upstream request and sends it. `unsent` holds the
    /// request's body until it is sent on; a refusal may leave it there.
    async fn forward(
        &self,
        req: Request<()>,
        unsent: &mut Option<Incoming>,
        body_end: &mut Option<BodyEnd>,
        record: &mut crate::audit::ProxyRecord,
        bytes_in: &Arc<AtomicU64>,
        secrets: &SecretWatch,
    ) -> Result<Forwarded, Refusal> {
        // The sandbox should never hold a secret: one in its request has leaked, and goes
        // no further, whatever the rule.
        if let Some(matcher) = self.proxy.secret_matcher() {
            // The daemon's own failure, not the sandbox's doing: refused (fail closed)
            // without a secret finding, whose alert may quarantine the sandbox.
            if matcher.failed() {
                redact_record(record, &matcher);
                return Err(Refusal::deny(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the proxy could not build its secret matcher: requests are not scanned, \
                     so none is forwarded",
                ));
            }
            let found = scrub::find_in_head(req.method(), req.uri(), req.headers(), &matcher);
            if let Some((name, place)) = found {
                redact_record(record, &matcher);
                record.secret = Some(SecretFinding::outbound(&name, place));
                return Err(Refusal::deny(
                    StatusCode::FORBIDDEN,
                    format!("request carries the value of credential `{name}` in {place}"),
                ));
            }
        }
        // A placeholder travels only to its credential's hosts, and is replaced only where
        // its credential allows: any other sentinel in the head is refused here; the
        // rule's own (at one of its hosts) once it has been replaced where allowed.
        let rule_placeholder = self
            .conn
            .route
            .credential
            .clone()
            .filter(|c| self.proxy.credentials.is_placeholder(c))
            .filter(|c| self.proxy.credentials.sends_to(c, &self.sni));
        let placeholders = self.proxy.credentials.placeholders_for(&self.conn.sandbox);
        // Only a sentinel the proxy can replace is exempt from the check below.
        let own_sentinel = rule_placeholder
            .as_deref()
            .zip(placeholders.as_ref())
            .and_then(|(name, set)| {
                let sentinel = set.sentinel(name).filter(|s| !s.is_empty())?;
                let scope = self.proxy.credentials.placeholder_scope(name)?;
                let detect = set.detector_for(|c| c == name)?;
                Some((name, sentinel.to_owned(), scope.clone(), detect))
            });
        let own: Option<String> = own_sentinel.as_ref().map(|o| o.0.to_owned());
        if let Some(set) = &placeholders {
            let path = req.uri().path_and_query().map_or("", PathAndQuery::as_str);
            let found = misdirected_in_head(path, req.headers(), set.detector(), |c| {
                own.as_deref() != Some(c)
            });
            if let Some((name, place)) = found {
                return Err(self.misdirected(record, &name, place));
            }
        }
        if is_upgrade(&req) {
            return Err(Refusal::deny(
                StatusCode::FORBIDDEN,
                "upgrades are not allowed",
            ));
        }
        // What the origin will not see is not judged: the hop-by-hop headers, and those
        // `Connection` lists (a `Content-Type` listed there would be judged, then
        // removed), go before anything below reads the head.
        let mut req = req;
        strip_hop_by_hop(req.headers_mut());
        // TRACE/TRACK echo the request, injected credential included, back to the sandbox
        // (in any case: some servers read method names so).
        let method = req.method().as_str();
        if method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK") {
            return Err(Refusal::deny(
                StatusCode::FORBIDDEN,
                "TRACE and TRACK are not allowed (they echo the injected credential)",
            ));
        }
        // Methods are case-sensitive, and every check here reads them as written; but
        // origins differ in whether they upper-case one (Django, Werkzeug, Symfony and
        // Radicale do): a `post` would be judged as one method and run as another.
        if method.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(Refusal::deny(
                StatusCode::BAD_REQUEST,
                format!(
                    "downstream client: method {method:?} is not upper case (origins differ \
                     in whether they upper-case it)"
                ),
            ));
        }
        self.check_host(&req, record)?;
        // Judged once, in its normal form, and forwarded in exactly that form.
        let raw = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        let judged = match judge_target(&self.conn.route, req.method().as_str(), raw) {
            Ok(judged) => judged,
            Err(TargetRefusal::Ambiguous(reason)) => {
                return Err(Refusal::deny(StatusCode::BAD_REQUEST, reason))
            }
            Err(TargetRefusal::Denied { reason, git }) => {
                record.git = git;
                return Err(Refusal::deny(StatusCode::FORBIDDEN, reason));
            }
        };
        record.path = Some(judged.path().to_owned());
        // A second target in a form the policy cannot judge (a copy's source) is refused.
        if let Some(name) = unjudged_second_target(req.headers()) {
            return Err(Refusal::deny(
                StatusCode::FORBIDDEN,
                format!(
                    "downstream client: header {name} names a second object the request \
                     acts on (a copy, rename or link source), which the policy does not judge"
                ),
            ));
        }
        if form_to_blob_uploads(req.method().as_str(), judged.path(), req.headers()) {
            return Err(Refusal::deny(
                StatusCode::FORBIDDEN,
                "downstream client: a form body to a registry's blob uploads may mount a blob \
                 from another repository (`mount`, `from`), which the policy does not judge",
            ));
        }
        // WebDAV's second target (COPY, MOVE) is judged too, and sent as judged.
        let upstream = self.target.as_ref().map(|(a, _)| a).ok_or_else(|| {
            Refusal::deny(
                StatusCode::BAD_REQUEST,
                "downstream client: request target cannot be re-sent upstream",
            )
        })?;
        let destination = judge_destination(
            &self.conn.route,
            &self.sni,
            upstream,
            req.method().as_str(),
            req.headers(),
        )
        .map_err(|refusal| match refusal {
            TargetRefusal::Ambiguous(reason) => Refusal::deny(StatusCode::BAD_REQUEST, reason),
            TargetRefusal::Denied { reason, .. } => Refusal::deny(StatusCode::FORBIDDEN, reason),
        })?;
        let mut path_and_query = PathAndQuery::try_from(judged.target.as_str()).map_err(|_| {
            Refusal::deny(
                StatusCode::BAD_REQUEST,
                "downstream client: request target cannot be re-sent upstream",
            )
        })?;
        let push_rule = match (&self.conn.route.git, &judged.git) {
            (Some(rule), Some(request)) => {
                record.git = Some(git::audit_of(request));
                request.is_push().then_some(rule)
            }
            _ => None,
        };

        let (mut parts, ()) = req.into_parts();
        if let Some(destination) = destination {
            parts.headers.insert("destination", destination);
        }
        // The length the client declared: its body must bring exactly that. It is sent
        // on as one field in canonical form: HTTP/2 lets a client repeat the field, or
        // write `005`, when the numbers agree, and an upstream must not get two spellings
        // of what was judged as one.
        let declared = declared_length(&parts.headers).map_err(|why| {
            Refusal::deny(
                StatusCode::BAD_REQUEST,
                format!("downstream client: Content-Length {why}"),
            )
        })?;
        if let Some(length) = declared {
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        let Some(body) = unsent.as_mut() else {
            return Err(Refusal::deny(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request's body was already taken",
            ));
        };
        // A push's command list is judged before anything is sent upstream.
        let mut prefix = Bytes::new();
        // What a body read whole holds of the proxy's budget, kept until it is sent.
        let mut held_body = None;
        if let Some(rule) = push_rule {
            let idle = self.proxy.timeouts.idle;
            let inspected = Box::pin(git::inspect_push(
                rule,
                &parts.headers,
                body,
                idle,
                &self.conn.held_bodies,
            ))
            .await;
            if let Some(git) = &mut record.git {
                git.ref_updates = inspected.updates;
            }
            match inspected.outcome {
                PushOutcome::Forward(read, held) => {
                    prefix = read;
                    held_body = held;
                }
                PushOutcome::Refuse {
                    status,
                    reason,
                    report,
                    consumed,
                } => {
                    bytes_in.fetch_add(consumed, Ordering::Relaxed);
                    return Err(Refusal {
                        status,
                        verdict: Verdict::Deny,
                        reason,
                        body: report.map(|r| (git::RECEIVE_PACK_RESULT, r)),
                    });
                }
            }
        }
        // A POST whose body could name another method, where the rule refuses others:
        // the body is read whole and judged before anything is sent upstream.
        if push_rule.is_none()
            && method_override::body_matters(
                &self.conn.route,
                parts.method.as_str(),
                &judged.target,
            )
        {
            let idle = self.proxy.timeouts.idle;
            match Box::pin(method_override::check_body(
                &parts.headers,
                body,
                idle,
                &self.conn.held_bodies,
            ))
            .await
            {
                BodyCheck::Forward(read, held) => {
                    prefix = read;
                    held_body = held;
                }
                BodyCheck::Refuse { reason, consumed } => {
                    bytes_in.fetch_add(consumed, Ordering::Relaxed);
                    return Err(Refusal::deny(StatusCode::BAD_REQUEST, reason));
                }
                BodyCheck::Downstream(reason) => {
                    return Err(Refusal::deny(StatusCode::BAD_REQUEST, reason));
                }
                BodyCheck::Busy { reason, consumed } => {
                    bytes_in.fetch_add(consumed, Ordering::Relaxed);
                    return Err(Refusal::deny(StatusCode::SERVICE_UNAVAILABLE, reason));
                }
            }
        }
        // The rule's own placeholder credential, when this host is one of its hosts: its
        // sentinel is replaced in the head now where the credential allows, and in the
        // body as it streams if it allows that; anywhere else it refuses the request.
        let mut body_placeholder = None;
        let mut restore = Vec::new();
        if let Some((name, sentinel, scope, detect)) = own_sentinel {
            let in_head =
                misdirected_in_head(&judged.target, &parts.headers, &detect, |_| true).is_some();
            let has_body = !(body.is_end_stream() && prefix.is_empty());
            // A git rule's bodies are judged as they are (a push's command list, whose
            // pkt-line lengths a replacement of another length would reframe): never
            // rewritten, so the rule's own placeholder in one is refused as misdirected.
            let replace_in_body = scope.body && self.conn.route.git.is_none();
            let mut replaced = 0;
            if in_head || (has_body && replace_in_body) {
                let value = Box::pin(self.credential_value(name)).await?;
                let taken = inject::take_replaced_headers(
                    &mut parts.headers,
                    &sentinel,
                    &value,
                    &scope.headers,
                )
                .map_err(|e| match e {
                    inject::HeaderReplaceError::Ambiguous(header) => Refusal::deny(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "downstream client: header `{header}` carries the placeholder of \
                             credential `{name}` and other values too; send it once"
                        ),
                    ),
                    inject::HeaderReplaceError::Shape(header) => Refusal::deny(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "downstream client: header `{header}` carries the placeholder of \
                             credential `{name}` with other text; send it as the whole value, \
                             after a scheme (`Bearer <placeholder>`) or as the whole Basic user \
                             or password"
                        ),
                    ),
                    inject::HeaderReplaceError::Value => Refusal::deny(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "credential `{name}`: the value cannot be put in a header \
                             (value not shown)"
                        ),
                    ),
                })?;
                replaced += taken.len();
                // Put back after the sandbox's credential headers are stripped.
                restore = taken;
                let (target, in_query) =
                    inject::replace_in_query(&judged.target, &sentinel, &value, &scope.query)
                        .map_err(|param| {
                            Refusal::deny(
                                StatusCode::BAD_REQUEST,
                                format!(
                                    "downstream client: query parameter `{param}` carries the \
                                     placeholder of credential `{name}` with other text; send \
                                     it as the whole value"
                                ),
                            )
                        })?;
                if in_query > 0 {
                    replaced += in_query;
                    path_and_query = PathAndQuery::try_from(target.as_str()).map_err(|_| {
                        Refusal::deny(
                            StatusCode::BAD_REQUEST,
                            "downstream client: request target cannot be re-sent upstream",
                        )
                    })?;
                }
                // Whatever is left of it is in a place its credential does not allow.
                let left =
                    misdirected_in_head(path_and_query.as_str(), &parts.headers, &detect, |_| true);
                if let Some((_, place)) = left {
                    return Err(self.misdirected(record, name, place));
                }
                if has_body && replace_in_body {
                    if let Some(reason) = inject::body_encoding_refusal(&parts.headers) {
                        return Err(Refusal::deny(StatusCode::UNSUPPORTED_MEDIA_TYPE, reason));
                    }
                    let with = inject::body_replacement(&parts.headers, &value);
                    body_placeholder = Some((sentinel, with));
                }
                // A body's replacements are counted only as it streams, after the record
                // is made: with body replacement on, a request with a body is recorded as
                // using the credential.
                if replaced > 0 || body_placeholder.is_some() {
                    record.credential = Some(name.to_owned());
                    record.credential_use = self.proxy.credentials.usage(name).map(Box::new);
                }
            }
        }
        // A header whose placeholder was replaced goes back below, alone: a spelling of it
        // with `_` (read as the same name by CGI and Puma) goes as the injected ones' do.
        if restore.is_empty() {
            strip_request_headers(&mut parts.headers, &self.proxy.injected);
        } else {
            let mut names = self.proxy.injected.to_vec();
            names.extend(restore.iter().map(|(header, _)| header.clone()));
            strip_request_headers(&mut parts.headers, &names);
        }
        // A request with a body gets an HTTP/1 connection of its own, closed after it:
        // an origin that answers without reading the body (a method that gives it no
        // meaning, a static file, an early error) would read it as the next request on a
        // shared connection, and the proxy's next request (with its credential) as that
        // one's rest: a method and path nobody judged. Whatever the method or its case.
        let own_connection = !(body.is_end_stream() && prefix.is_empty());
        if own_connection {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        for (header, value) in restore {
            parts.headers.append(header, value);
        }
        let mut aws_signing = None;
        if let Some(name) = &self.conn.route.credential {
            // No credential is used that the audit trail could not record.
            if let Some(Err(reason)) = self.proxy.credential_gate.as_ref().map(|gate| gate()) {
                let body = Bytes::from(format!(
                    "proxy: credential `{name}` is not used right now ({reason}); try again later\n"
                ));
                return Err(Refusal {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    verdict: Verdict::Deny,
                    reason,
                    body: Some(("text/plain; charset=utf-8", body)),
                });
            }
            if let Some(param) = self.proxy.credentials.query_param(name) {
                if self.proxy.credentials.sends_to(name, &self.sni) {
                    let value = Box::pin(self.credential_value(name)).await?;
                    let target = inject::set_query_param(&judged.target, param, &value)
                        .map_err(|reason| Refusal::deny(StatusCode::BAD_REQUEST, reason))?;
                    path_and_query = PathAndQuery::try_from(target.as_str()).map_err(|_| {
                        Refusal::deny(
                            StatusCode::BAD_REQUEST,
                            "downstream client: request target cannot be re-sent upstream",
                        )
                    })?;
                    record.query_keys = query_keys(path_and_query.query());
                    record.credential = Some(name.clone());
                    record.credential_use = self.proxy.credentials.usage(name).map(Box::new);
                }
            }
            let aws = self.proxy.credentials.aws_signing(name);
            match aws {
                Some(signing) => {
                    let has_body = !body.is_end_stream() || !prefix.is_empty();
                    // Boxed, as the other rare, large awaits here: room for it would be
                    // in every request's future.
                    let prepared = Box::pin(super::aws::prepare(
                        &self.proxy.credentials,
                        name,
                        signing,
                        &self.conn.sandbox,
                        &self.sni,
                        &judged.target,
                        &mut parts.headers,
                        has_body,
                    ))
                    .await
                    .map_err(|r| Refusal {
                        status: r.status,
                        verdict: r.verdict,
                        reason: r.reason,
                        body: r
                            .body
                            .map(|b| ("text/plain; charset=utf-8", Bytes::from(b))),
                    })?;
                    if prepared.is_some() {
                        // S3 checks the signature over the path it decodes and encodes
                        // again: the path goes out in that form (the same key).
                        let wire =
                            crate::credentials::sigv4::s3::wire_target(path_and_query.as_str())
                                .map_err(|reason| Refusal::deny(StatusCode::BAD_REQUEST, reason))?;
                        path_and_query = PathAndQuery::try_from(wire.as_str()).map_err(|_| {
                            Refusal::deny(
                                StatusCode::BAD_REQUEST,
                                "downstream client: request target cannot be re-sent upstream",
                            )
                        })?;
                    }
                    if let Some(signing) = &prepared {
                        record.credential = Some(name.clone());
                        record.credential_use = self.proxy.credentials.usage(name).map(|usage| {
                            Box::new(crate::credentials::CredentialUse {
                                expires: Some(signing.expires()),
                                ..usage
                            })
                        });
                    }
                    aws_signing = prepared;
                }
                None => match self.proxy.credentials.header_for(name, &self.sni).await {
                    Ok(Some((header, value))) => {
                        parts.headers.insert(header, value);
                        record.credential = Some(name.clone());
                        record.credential_use = self.proxy.credentials.usage(name).map(Box::new);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        // The details (paths, the token service's answer) go to the audit
                        // record only; the sandbox learns that the credential is unavailable.
                        let body = Bytes::from(format!(
                            "proxy: credential `{name}` is unavailable; see the egress audit log\n"
                        ));
                        // Not sent: a refusal (the credential's failure closes it).
                        return Err(Refusal {
                            status: StatusCode::INTERNAL_SERVER_ERROR,
                            verdict: Verdict::Deny,
                            reason: ProxyError::from(e).to_string(),
                            body: Some(("text/plain; charset=utf-8", body)),
                        });
                    }
                },
            }
        }

        let mut asked_range = None;
        if let Some(matcher) = self.proxy.secret_matcher() {
            // Responses are scanned as they stream: ask for them unencoded, and for any
            // byte range with room around it for a whole secret. Only a read's range
            // selects the answer's bytes: on a write it says which bytes the write touches
            // (Azure's Put Page and Put Range), and goes as the sandbox sent it (an answer
            // in part is refused then, as to any request not widened).
            parts
                .headers
                .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            scrub::ask_for_scanned_charsets(&mut parts.headers);
            for name in scrub::MESSAGE_ACCEPT_ENCODINGS {
                if parts.headers.contains_key(name) {
                    parts
                        .headers
                        .insert(name, HeaderValue::from_static("identity"));
                }
            }
            if range::selects_answer(&parts.method) {
                asked_range = range::widen(&mut parts.headers, matcher);
            }
        }

        let bad_name = || {
            Refusal::deny(
                StatusCode::BAD_REQUEST,
                "downstream client: request target cannot be re-sent upstream",
            )
        };
        let (authority, host) = self.target.clone().ok_or_else(bad_name)?;

        let timeouts = &self.proxy.timeouts;
        let params = DialParams {
            dst: self.conn.original_dst,
            route: &self.conn.route,
            server_name: &self.sni,
            tls: &self.proxy.upstream_tls,
            connect_timeout: timeouts.connect,
            handshake_timeout: timeouts.handshake,
            dialer: &self.proxy.dialer,
        };
        let sender = self
            .proxy
            .pool
            .acquire(&self.pool_key, &params)
            .await
            .map_err(Refusal::upstream)?;

        // Signed last, over the request exactly as it is sent.
        if let Some(signing) = &aws_signing {
            signing
                .sign(
                    parts.method.as_str(),
                    authority.as_str(),
                    path_and_query.as_str(),
                    &mut parts.headers,
                )
                .map_err(|reason| Refusal::deny(StatusCode::BAD_REQUEST, reason))?;
        }
        parts.headers.remove(HOST);
        parts.extensions = http::Extensions::new();
        if sender.is_h2() {
            parts.version = Version::HTTP_2;
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(http::uri::Scheme::HTTPS);
            uri.authority = Some(authority);
            uri.path_and_query = Some(path_and_query);
            parts.uri = Uri::from_parts(uri).map_err(|_| bad_name())?;
        } else {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::from(path_and_query);
            parts.headers.insert(HOST, host);
        }
        // A body already over (a GET) has nothing to scan.
        let scan = if body.is_end_stream() && prefix.is_empty() {
            None
        } else {
            let mut scan = RequestScan {
                secrets: self
                    .proxy
                    .secret_matcher()
                    .map(|m| OutboundScan::new(m, secrets.outbound.clone())),
                ..RequestScan::default()
            };
            if let Some(set) = &placeholders {
                let store = &self.proxy.credentials;
                // Every sentinel but the rule's own where its body replacement is on.
                let own_in_body = own.as_deref().filter(|c| {
                    self.conn.route.git.is_none()
                        && store.placeholder_scope(c).is_some_and(|s| s.body)
                });
                let guard = match own_in_body {
                    Some(own) => set.detector_for(|c| c != own),
                    None => Some(set.detector().clone()),
                };
                scan.guard = guard.map(|m| OutboundScan::new(m, secrets.placeholder.clone()));
            }
            if let Some((sentinel, with)) = body_placeholder {
                scan.replace = crate::credentials::StreamReplacer::new(&sentinel, with);
                if scan.replace.is_none() {
                    return Err(Refusal::deny(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the placeholder's replacement could not be set up",
                    ));
                }
                parts.headers.remove(http::header::CONTENT_LENGTH);
            }
            (!scan.is_empty()).then_some(scan)
        };
        let Some(body) = unsent.take() else {
            return Err(Refusal::deny(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request's body was already taken",
            ));
        };
        let body_sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The bytes read to judge the body keep their budget until they are written.
        let prefix = match held_body.take() {
            Some(held) => held.tie(prefix),
            None => prefix,
        };
        let request = Request::from_parts(
            parts,
            CountingBody::with_prefix(prefix, body, bytes_in.clone(), scan)
                .ending_to(body_end.take())
                .stripping_trailers(self.proxy.trailer_filter.clone())
                .declaring(declared)
                .reporting_sent(body_sent.clone()),
        );

        let addr = SocketAddr::new(
            self.conn.original_dst.ip().to_canonical(),
            self.conn.original_dst.port(),
        );
        let wait = timeouts.idle;
        let timed_out = || {
            Refusal::upstream(ProxyError::UpstreamTimeout {
                addr,
                op: "waiting for the response",
                secs: wait.as_secs(),
            })
        };
        let failed = |source: hyper::Error| {
            // A placeholder in the body, at a host its credential does not list.
            if let Some(name) = secrets.placeholder.credential() {
                return Refusal::deny(
                    StatusCode::FORBIDDEN,
                    format!(
                        "request carries the placeholder of credential `{name}` in the body, \
                         {}; the upstream request was aborted before it was sent",
                        self.not_replaced_here(name)
                    ),
                );
            }
            // The body's scan stopped the request: nothing of the secret went out.
            if let Some(name) = secrets.outbound.credential() {
                return Refusal::deny(
                    StatusCode::FORBIDDEN,
                    format!(
                        "request carries the value of credential `{name}` in the body; the \
                         upstream request was aborted before it was sent"
                    ),
                );
            }
            if is_client_abort(&source) {
                // An HTTP/2 stream outlives its connection's task by a moment: the body
                // failed because the daemon closed the connection.
                let who = if self.conn.closing.load(Ordering::SeqCst) {
                    format!("{CLOSED_BY_DAEMON}: the request body was cut")
                } else {
                    format!("{CLIENT_ABORTED}: the downstream client's request body failed")
                };
                return Refusal {
                    status: StatusCode::BAD_REQUEST,
                    verdict: Verdict::Allow,
                    reason: format!(
                        "{who}: {}",
                        source
                            .source()
                            .map_or_else(|| source.to_string(), ToString::to_string)
                    ),
                    body: None,
                };
            }
            Refusal::upstream(ProxyError::UpstreamHttp {
                addr,
                op: "sending the request",
                source,
            })
        };
        let with_range = |mut response: Response<Incoming>| {
            if let Some(widened) = asked_range {
                response.extensions_mut().insert(widened);
            }
            response
        };
        // Last, after every wait: nothing goes out once the daemon closes the connection.
        self.unless_closing()?;
        // From here the request may reach the origin: its record is written in full
        // whatever follows (never summarised among a flood of abandoned requests).
        record.forwarded = true;
        // A refusal by the body's scan (a secret or a misplaced placeholder in it) aborted
        // the request before its body was complete: nothing was carried out, and such
        // refusals stay within the sandbox's refusal limit like any other.
        let mut failed = |source: hyper::Error| {
            let refusal = failed(source);
            if refusal.verdict == Verdict::Deny {
                record.forwarded = false;
            }
            refusal
        };
        match sender {
            Sender::H2(mut sender, slot) => {
                let response = tokio::time::timeout(wait, sender.send_request(request))
                    .await
                    .map_err(|_| timed_out())?
                    .map(with_range)
                    .map_err(&mut failed)?;
                // The request counts as in flight on its connection until its response
                // has been sent on (or abandoned).
                Ok((response, Some(Box::new(move || drop(slot)))))
            }
            Sender::H1(mut sender) => {
                let response = tokio::time::timeout(wait, sender.send_request(request))
                    .await
                    .map_err(|_| timed_out())?
                    .map(with_range)
                    .map_err(&mut failed)?;
                // A response that came before the whole body went out: the origin may
                // read the rest as a request of its own. The connection is not reused.
                let reuse = !own_connection && body_sent.load(Ordering::Relaxed);
                let pool = self.proxy.pool.clone();
                let key = self.pool_key.clone();
                Ok((
                    response,
                    Some(Box::new(move || {
                        if reuse {
                            pool.release_h1(&key, sender);
                        }
                    })),
                ))
            }
        }
    }

    /// Why credential `name`'s placeholder is not replaced in this request.
    fn not_replaced_here(&self, name: &str) -> String {
        if self.proxy.credentials.sends_to(name, &self.sni) {
            "where the credential's `inject.placeholder` does not allow it".to_owned()
        } else {
            format!("but {} is not one of the credential's hosts", self.sni)
        }
    }

    /// The refusal of a placeholder where it is not replaced (recorded, alerted).
    fn misdirected(
        &self,
        record: &mut crate::audit::ProxyRecord,
        name: &str,
        place: &'static str,
    ) -> Refusal {
        record.secret = Some(SecretFinding::placeholder(name, place));
        Refusal::deny(
            StatusCode::FORBIDDEN,
            format!(
                "request carries the placeholder of credential `{name}` in {place}, {}",
                self.not_replaced_here(name)
            ),
        )
    }

    /// Refuses what is still to be sent once the daemon closes this connection (a
    /// quarantine, a detach, a policy replaced): an HTTP/2 stream's task outlives the
    /// connection's by a moment, and what it judged under the old policy, or a credential
    /// it had from before a quarantine, must not go out after it.
    fn unless_closing(&self) -> Result<(), Refusal> {
        if !self.conn.closing.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(Refusal::deny(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{CLOSED_BY_DAEMON} before the request was sent; it was not sent"),
        ))
    }

    /// Credential `name`'s value for this connection's server name, through the
    /// credential gate; a refusal (recorded with the reason, never the value) otherwise.
    async fn credential_value(
        &self,
        name: &str,
    ) -> Result<Arc<crate::credentials::Secret>, Refusal> {
        self.unless_closing()?;
        if let Some(Err(reason)) = self.proxy.credential_gate.as_ref().map(|gate| gate()) {
            let body = Bytes::from(format!(
                "proxy: credential `{name}` is not used right now ({reason}); try again later\n"
            ));
            return Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                verdict: Verdict::Deny,
                reason,
                body: Some(("text/plain; charset=utf-8", body)),
            });
        }
        match self.proxy.credentials.value_for(name, &self.sni).await {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err(Refusal::deny(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("credential `{name}` is not sent to {}", self.sni),
            )),
            Err(e) => Err(Refusal {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                verdict: Verdict::Deny,
                reason: ProxyError::from(e).to_string(),
                body: Some((
                    "text/plain; charset=utf-8",
                    Bytes::from(format!(
                        "proxy: credential `{name}` is unavailable; see the egress audit log\n"
                    )),
                )),
            }),
        }
    }

    /// Checks that every name the request carries (Host header, `:authority` or an
    /// absolute URI) equals the TLS server name. A port given there is not used: the
    /// upstream request names the port the connection was made to (see `forward`).
    fn check_host(
        &self,
        req: &Request<()>,
        record: &mut crate::audit::ProxyRecord,
    ) -> Result<(), Refusal> {
        let mut hosts = req.headers().get_all(HOST).iter();
        let header = hosts.next();
        if hosts.next().is_some() {
            return Err(Refusal::deny(
                StatusCode::BAD_REQUEST,
                "downstream client: more than one Host header",
            ));
        }
        let mut names: Vec<Authority> = Vec::with_capacity(2);
        if let Some(authority) = req.uri().authority() {
            names.push(authority.clone());
        }
        if let Some(value) = header {
            let authority = Authority::try_from(value.as_bytes()).map_err(|_| {
                Refusal::deny(
                    StatusCode::BAD_REQUEST,
                    "downstream client: Host header is not a valid host[:port]",
                )
            })?;
            names.push(authority);
        }
        let Some(first) = names.first() else {
            return Err(Refusal::deny(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "misdirected request: no Host header or :authority (TLS server name {})",
                    self.sni
                ),
            ));
        };
        record.host = Some(normalize_host(first.host()));
        for authority in &names {
            let host = normalize_host(authority.host());
            if host != self.sni {
                return Err(Refusal::deny(
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "misdirected request: host {host} does not match TLS server name {}",
                        self.sni
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What a record shows of a request field that held a secret.
const REDACTED: &str = "[egressd:redacted]";

/// A request refused for carrying a secret is recorded without it: its method, path and
/// query keys are replaced where they hold one (all of them if the scan failed).
fn redact_record(
    record: &mut crate::audit::ProxyRecord,
    matcher: &crate::credentials::SecretMatcher,
) {
    for field in [&mut record.method, &mut record.path, &mut record.query_keys] {
        let holds = field
            .as_deref()
            .is_some_and(|t| matcher.failed() || scrub::find_in_target(t, matcher).is_some());
        if holds {
            *field = Some(REDACTED.to_owned());
        }
    }
}

/// CONNECT, an `Upgrade` header or `Connection: upgrade`, or HTTP/2 extended CONNECT.
/// The body length `headers` declare: `None` without `Content-Length`, an error when its
/// fields (or the comma-separated values in one) are not all the same decimal number.
fn declared_length(headers: &http::HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut declared = None;
    for field in headers.get_all(http::header::CONTENT_LENGTH) {
        let text = field.to_str().map_err(|_| "is not ASCII")?;
        for value in text.split(',') {
            let value = value.trim_matches([' ', '\t']);
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err("is not a decimal number");
            }
            let n = value.parse::<u64>().map_err(|_| "is too large")?;
            if declared.is_some_and(|d| d != n) {
                return Err("is given with different values");
            }
            declared = Some(n);
        }
    }
    Ok(declared)
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method().as_str().eq_ignore_ascii_case("CONNECT")
        || req.headers().contains_key(UPGRADE)
        || req.extensions().get::<hyper::ext::Protocol>().is_some()
        || connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers: the fixed list and those named in `Connection`.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    const HOP_BY_HOP: [HeaderName; 7] = [
        CONNECTION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
    ];
    // `TE: trailers` is end-to-end in effect (gRPC needs it, and HTTP/2 allows it).
    let te_trailers = headers
        .get_all(TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let listed: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    // One pass over the names the request has (a few), not a lookup of each listed one.
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            HOP_BY_HOP.contains(name)
                || listed.contains(name)
                || matches!(name.as_str(), "keep-alive" | "proxy-connection")
        })
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// A placeholder sentinel (any wire form) of a credential `check` accepts in the target
/// or a header: the credential and where.
fn misdirected_in_head(
    target: &str,
    headers: &HeaderMap,
    detector: &crate::credentials::SecretMatcher,
    check: impl Fn(&str) -> bool,
) -> Option<(String, &'static str)> {
    let mut found = None;
    let mut scan = |hay: &[u8], place: &'static str| {
        if found.is_some() {
            return;
        }
        detector.each_match(hay, |_, index| {
            let name = detector.name(index);
            if found.is_none() && check(name) {
                found = Some((name.to_owned(), place));
            }
        });
    };
    scan(target.as_bytes(), "the URL");
    for form in scrub::decoded_forms(target) {
        scan(&form, "the URL");
    }
    for (name, value) in headers {
        scan(value.as_bytes(), "a header");
        scan(name.as_str().as_bytes(), "a header");
    }
    found
}

/// Removes everything a sandbox could use to supply or probe credentials, and the
/// hop-by-hop headers.
pub(super) fn strip_request_headers(headers: &mut HeaderMap, injected: &[HeaderName]) {
    strip_hop_by_hop(headers);
    let stripped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| stripped_from_requests(name, injected))
        .cloned()
        .collect();
    for name in stripped {
        headers.remove(name);
    }
}

/// Whether a sandbox's request loses header `name` (with `injected`, the names
/// credentials set).
fn stripped_from_requests(name: &HeaderName, injected: &[HeaderName]) -> bool {
    let text = name.as_str();
    *name == AUTHORIZATION
        || *name == PROXY_AUTHORIZATION
        || injected.contains(name)
        // Headers some frameworks honour to run another method or path than the one the
        // rule checked.
        || OVERRIDE_HEADERS.contains(&text)
        // `Expect` was answered here (hyper's server sent `100 Continue` as the body was
        // read); sent on, an origin could answer it again, or wait for a body already
        // sent.
        || *name == EXPECT
        || text == "x-vault-wrap-ttl"
        // CGI gateways, Puma and S3 stores such as Ceph RGW read `X_HTTP_Method_Override`
        // as `X-HTTP-Method-Override` and `x-amz_copy_source` as `x-amz-copy-source`: a
        // name with `_` can stand for any field a check here looks at (and is left
        // unsigned by a signer that looks for `x-amz-`), so none is sent on, as nginx
        // does by default.
        || text.contains('_')
        // And those that tell it where the request was sent or came from.
        || crate::credentials::is_routing_header(text)
}

/// A request's trailers get what its headers get, and lose as well the fields a trailer
/// must not carry (RFC 9110, 6.5.1) that an origin merging trailers into the head could
/// act on: routing, framing and content fields.
pub(super) fn strip_request_trailers(trailers: &mut HeaderMap, injected: &[HeaderName]) {
    strip_request_headers(trailers, injected);
    for name in [
        TE,
        HOST,
        http::header::CONTENT_LENGTH,
        http::header::CONTENT_ENCODING,
        http::header::CONTENT_TYPE,
        http::header::CONTENT_RANGE,
        http::header::COOKIE,
        EXPECT,
        // What the proxy judges or rewrites in the head (a byte range it widens, a
        // WebDAV destination it judges), never taken from a trailer.
        http::header::RANGE,
        http::header::IF_RANGE,
        HeaderName::from_static("request-range"),
        HeaderName::from_static("x-ms-range"),
        HeaderName::from_static("destination"),
    ] {
        trailers.remove(name);
    }
    // A second target (`x-amz-copy-source`...) is refused in the head; a trailer would
    // reach a store that merges trailers into the request unjudged.
    let second: Vec<HeaderName> = trailers
        .keys()
        .filter(|name| super::target::second_target(name).is_some())
        .cloned()
        .collect();
    for name in second {
        trailers.remove(name);
    }
}

use crate::credentials::OVERRIDE_HEADERS;

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn request_headers_are_stripped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer sandbox"),
            ("proxy-authorization", "Basic x"),
            ("x-http-method-override", "DELETE"),
            ("x-original-url", "/admin"),
            ("x-forwarded-host", "admin.internal"),
            ("x-forwarded-for", "127.0.0.1"),
            ("forwarded", "host=admin.internal"),
            ("x-original-uri", "/admin"),
            ("x-real-ip", "127.0.0.1"),
            ("cf-connecting-ip", "127.0.0.1"),
            ("x-cluster-client-ip", "127.0.0.1"),
            ("x-script-name", "/public"),
            ("x-original-path", "/admin"),
            ("x-sendfile-type", "X-Accel-Redirect"),
            ("x-accel-mapping", ".*=/internal/admin"),
            ("x_http_method_override", "DELETE"),
            ("x_api_key", "sandbox-key"),
            ("content_length", "0"),
            ("accept_language", "x"),
            ("x-amz_copy_source", "/other-bucket/secret"),
            ("x-vault-namespace", "team-b"),
            ("x-vault-policy-override", "true"),
            ("expect", "100-continue"),
            ("x-api-key", "sandbox-key"),
            ("connection", "X-Custom-Hop"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("accept", "*/*"),
            ("content-length", "3"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_request_headers(&mut headers, &[HeaderName::from_static("x-api-key")]);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        // Every `_` name goes: a gateway may read it as the `-` one.
        assert_eq!(left, ["accept", "content-length"]);

        let mut headers = HeaderMap::new();
        headers.insert(TE, HeaderValue::from_static("trailers"));
        strip_request_headers(&mut headers, &[]);
        assert_eq!(headers.get(TE).unwrap(), "trailers");
    }

    #[test]
    fn request_trailers_lose_what_headers_lose_and_routing_and_framing_fields() {
        let mut trailers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer sandbox"),
            ("x-http-method-override", "DELETE"),
            ("x-api-key", "sandbox-key"),
            ("host", "elsewhere.example.net"),
            ("content-length", "0"),
            ("te", "trailers"),
            ("range", "bytes=0-3"),
            ("request-range", "bytes=0-3"),
            ("x-ms-range", "bytes=0-3"),
            ("if-range", "\"x\""),
            ("destination", "/elsewhere"),
            ("x-amz-copy-source", "/other-bucket/secret"),
            ("x-ms-copy-source", "https://other.blob.example/secret"),
            ("x-checksum", "abc"),
        ] {
            trailers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_request_trailers(&mut trailers, &[HeaderName::from_static("x-api-key")]);
        let left: Vec<_> = trailers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-checksum"]);
    }

    /// One length, however many times or ways it is written, or a refusal.
    #[test]
    fn declared_lengths_are_one_number() {
        let of = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            declared_length(&h)
        };
        assert_eq!(of(&[]), Ok(None));
        assert_eq!(of(&["5"]), Ok(Some(5)));
        assert_eq!(of(&["5", "005"]), Ok(Some(5)));
        assert_eq!(of(&["5, 5"]), Ok(Some(5)));
        assert_eq!(of(&["0"]), Ok(Some(0)));
        for bad in [
            &["5", "6"][..],
            &["5, 6"],
            &["+5"],
            &["-1"],
            &["5 5"],
            &[""],
            &["0x5"],
            &["99999999999999999999999"],
        ] {
            assert!(of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn upgrades_are_recognised() {
        use http::Method;
        let req = |method: Method, headers: &[(&'static str, &'static str)]| {
            let mut b = Request::builder().method(method).uri("/");
            for (n, v) in headers {
                b = b.header(*n, *v);
            }
            b.body(()).unwrap()
        };
        assert!(is_upgrade(&req(Method::CONNECT, &[])));
        assert!(is_upgrade(&req(Method::GET, &[("upgrade", "websocket")])));
        assert!(is_upgrade(&req(
            Method::GET,
            &[("connection", "keep-alive, Upgrade")]
        )));
        assert!(!is_upgrade(&req(
            Method::GET,
            &[("connection", "keep-alive")]
        )));
    }
}
