//! Body wrappers that count bytes (and scan request bodies for secrets), and emit a
//! request's record when its response ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::head::HeadClock;
use super::inject::RequestScan;
use super::scrub::{OutboundHit, ResponseBody, Tally};
use super::AuditSink;
use crate::audit::{ProxyRecord, SecretFinding};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the next frame of a request body read before it is sent on brought.
pub enum Piece {
    Data(Bytes),
    Trailers,
    End,
}

/// The next piece of `body` (empty data frames skipped); `Err` (why, for the record) if
/// the client's body failed or stalled for `idle`.
pub async fn next_piece(body: &mut Incoming, idle: std::time::Duration) -> Result<Piece, String> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx));
        match tokio::time::timeout(idle, frame).await {
            Err(_) => {
                return Err(format!(
                    "downstream client: request body stalled for {} s",
                    idle.as_secs()
                ))
            }
            Ok(None) => return Ok(Piece::End),
            Ok(Some(Err(e))) => {
                return Err(format!(
                    "{}: reading the request body: {e}",
                    super::refused::CLIENT_ABORTED
                ))
            }
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => return Ok(Piece::Data(data)),
                Err(_) => return Ok(Piece::Trailers),
            },
        }
    }
}

/// A request body on its way upstream, counting its bytes. It may start with bytes the
/// proxy already read from the client (a git push's command list), sent first. With a
/// scan, pieces are held back and scanned for secrets (see [`RequestScan`]); the body
/// fails, which aborts the upstream request, at the first one seen.
pub struct CountingBody {
    prefix: Option<Bytes>,
    /// Taken out when the scan stops the body, to be drained (see [`drain`]).
    inner: Option<Incoming>,
    count: Arc<AtomicU64>,
    /// Boxed, as the trailers: a request body is moved several times on its way (into the
    /// request, the HTTP client, its task), and most bodies are neither.
    scan: Option<Box<RequestScan>>,
    /// The scan is over and what it held back has been sent.
    flushed: bool,
    /// Trailers to send after the held-back bytes.
    trailers: Option<Box<http::HeaderMap>>,
    /// Told once the client's body has been read to its end (HTTP/1).
    end: Option<BodyEnd>,
    /// Takes out of the client's trailers what is not sent on (they are scanned whole).
    trailer_filter: Option<TrailerFilter>,
    /// The length the client's `Content-Length` declared: a body that ends at another
    /// (an HTTP/2 stream reset with `NO_ERROR` ends it early) fails.
    declared: Option<u64>,
    /// Set once the whole body has been handed on.
    sent: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// What [`CountingBody::stripping_trailers`] applies to a request's trailers.
pub type TrailerFilter = Arc<dyn Fn(&mut http::HeaderMap) + Send + Sync>;

impl CountingBody {
    /// `prefix`, then what is left of `inner`, scanned by `scan` if given.
    pub fn with_prefix(
        prefix: Bytes,
        inner: Incoming,
        count: Arc<AtomicU64>,
        scan: Option<RequestScan>,
    ) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            inner: Some(inner),
            count,
            flushed: scan.is_none(),
            scan: scan.map(Box::new),
            trailers: None,
            end: None,
            trailer_filter: None,
            declared: None,
            sent: None,
        }
    }

    /// Fails the body if the client's ends at another length than `declared`.
    pub fn declaring(mut self, declared: Option<u64>) -> Self {
        self.declared = declared;
        self
    }

    /// Sets `sent` once the whole body has been handed on (at once, if there is none).
    pub fn reporting_sent(mut self, sent: Arc<std::sync::atomic::AtomicBool>) -> Self {
        sent.store(self.is_end_stream(), Ordering::Relaxed);
        self.sent = Some(sent);
        self
    }

    /// Tells `end` (an HTTP/1 request's) when the client's body has been read.
    pub fn ending_to(mut self, end: Option<BodyEnd>) -> Self {
        self.end = end;
        self
    }

    /// Applies `filter` to the client's trailers before they are sent on.
    pub fn stripping_trailers(mut self, filter: TrailerFilter) -> Self {
        self.trailer_filter = Some(filter);
        self
    }

    /// A piece from the client: counted, and passed through the scan.
    fn piece(&mut self, data: Bytes) -> Result<Bytes, BoxError> {
        self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        let out = match &mut self.scan {
            None => Ok(data),
            Some(scan) => scan.push(&data),
        };
        if out.is_err() {
            self.stop();
        }
        out
    }

    /// The scan stopped the body: the upstream request is aborted (this body fails), and
    /// the rest of the client's upload is read and dropped, so that the client gets the
    /// proxy's refusal instead of a reset stream.
    fn stop(&mut self) {
        if let (Some(inner), Ok(runtime)) =
            (self.inner.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(drain(inner, self.end.take(), DrainBound::UPLOAD));
        }
    }

    /// The client's body is over: an error if it did not bring what it declared.
    fn short_of_declared(&self) -> Option<BoxError> {
        let got = self.count.load(Ordering::Relaxed);
        let declared = self.declared.filter(|&d| d != got)?;
        Some(
            format!(
                "the request body ended after {got} of the {declared} bytes its Content-Length \
                 declared"
            )
            .into(),
        )
    }

    fn inner_ended(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }
}

impl CountingBody {
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
        }
        if let Some(prefix) = this.prefix.take() {
            let out = this.piece(prefix);
            return Poll::Ready(Some(out.map(Frame::data)));
        }
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(Some(Err("request body refused".into())));
            };
            let frame = match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    if let Some(e) = this.short_of_declared() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    if !this.flushed {
                        this.flushed = true;
                        if let Some(scan) = &mut this.scan {
                            let rest = match scan.finish() {
                                Ok(rest) => rest,
                                Err(e) => {
                                    this.stop();
                                    return Poll::Ready(Some(Err(e)));
                                }
                            };
                            if !rest.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(rest))));
                            }
                        }
                    }
                    return Poll::Ready(None);
                }
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    let mut out = match this.piece(data) {
                        Ok(out) => out,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    };
                    if this.inner_ended() {
                        if let Some(e) = this.short_of_declared() {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    if this.inner_ended() && !this.flushed {
                        // The last piece: send what was held back with it.
                        this.flushed = true;
                        if let Some(scan) = &mut this.scan {
                            let rest = match scan.finish() {
                                Ok(rest) => rest,
                                Err(e) => {
                                    this.stop();
                                    return Poll::Ready(Some(Err(e)));
                                }
                            };
                            if !rest.is_empty() {
                                let mut all = Vec::with_capacity(out.len() + rest.len());
                                all.extend_from_slice(&out);
                                all.extend_from_slice(&rest);
                                out = Bytes::from(all);
                            }
                        }
                    }
                    if out.is_empty() && !this.inner_ended() {
                        continue;
                    }
                    Frame::data(out)
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(mut trailers) => {
                        if let Some(scan) = &mut this.scan {
                            if let Err(e) = scan.trailers(&trailers) {
                                this.stop();
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                        if let Some(filter) = &this.trailer_filter {
                            filter(&mut trailers);
                        }
                        if let Some(scan) = &mut this.scan {
                            if !this.flushed {
                                // Trailers end the body: what was held back goes first.
                                this.flushed = true;
                                let rest = match scan.finish() {
                                    Ok(rest) => rest,
                                    Err(e) => {
                                        this.stop();
                                        return Poll::Ready(Some(Err(e)));
                                    }
                                };
                                if !rest.is_empty() {
                                    this.trailers = Some(Box::new(trailers));
                                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                                }
                            }
                        }
                        Frame::trailers(trailers)
                    }
                    Err(_) => continue,
                },
            };
            return Poll::Ready(Some(Ok(frame)));
        }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let out = this.poll_body(cx);
        if let Some(sent) = &this.sent {
            // Over, or all the declared bytes handed on (an HTTP/1 upstream stops polling
            // there, before an HTTP/2 client's separate end of stream or trailers).
            let all_declared = this.declared.is_some_and(|d| {
                d == this.count.load(Ordering::Relaxed) && this.prefix.is_none() && this.flushed
            });
            if matches!(out, Poll::Ready(None)) || this.is_end_stream() || all_declared {
                sent.store(true, Ordering::Relaxed);
            }
        }
        // The client's body is over (not stopped by the scan: then it is being drained).
        if this.end.is_some()
            && (matches!(out, Poll::Ready(None))
                || this.inner.as_ref().is_some_and(Incoming::is_end_stream))
        {
            if let Some(end) = this.end.take() {
                end.ended();
            }
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.trailers.is_none() && self.inner_ended() && self.flushed
    }

    fn size_hint(&self) -> SizeHint {
        // A body whose sentinels are replaced has a length no one knows in advance: it
        // goes chunked (HTTP/1.1) or as DATA frames without a length (HTTP/2).
        if self.scan.as_deref().is_some_and(RequestScan::resizes) && !self.is_end_stream() {
            return SizeHint::new();
        }
        let inner = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint);
        let held = self.scan.as_ref().map_or(0, |s| s.held() as u64);
        let len = self.prefix.as_ref().map_or(0, |p| p.len() as u64) + held;
        if len == 0 {
            return inner;
        }
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(len));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(len));
        }
        hint
    }
}

/// How much of a refused request's body is read and dropped after the answer, so that a
/// client still sending it gets to read the answer (HTTP/1 clients such as git send the
/// whole body first). Nothing read is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DrainBound {
    bytes: u64,
    total: std::time::Duration,
}

impl DrainBound {
    /// A refused upload: 64 MiB within 30 s.
    pub(super) const UPLOAD: Self = Self {
        bytes: 64 * 1024 * 1024,
        total: std::time::Duration::from_secs(30),
    };
    /// An HTTP/1 upload refused for being past the sandbox's share of requests (no
    /// permit counts it): 1 MiB within 5 s.
    pub(super) const OVER_SHARE: Self = Self {
        bytes: 1024 * 1024,
        total: std::time::Duration::from_secs(5),
    };
    /// A refused git push, whose client shows the proxy's per-ref report only once it has
    /// sent its whole pack: 1 GiB within 10 minutes.
    pub(super) const PUSH: Self = Self {
        bytes: 1024 * 1024 * 1024,
        total: std::time::Duration::from_secs(600),
    };
}

/// Reads what is left of a refused request body and drops it, within `bound`; tells
/// `end` (an HTTP/1 request's) if it reached the end.
pub(super) async fn drain(mut body: Incoming, end: Option<BodyEnd>, bound: DrainBound) {
    let read = async {
        let mut total = 0u64;
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(frame)) => {
                    total += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if total > bound.bytes {
                        return;
                    }
                }
                Some(Err(_)) => return,
                None => break,
            }
        }
        if let Some(end) = end {
            end.ended();
        }
    };
    let _ = tokio::time::timeout(bound.total, read).await;
}

/// The end of one HTTP/1 request's body, for its connection's header clock. Until it is
/// told (or dropped), the request counts as in flight: bytes read meanwhile are its body,
/// not the next request's head, and the connection is not idle.
pub struct BodyEnd {
    clock: Arc<HeadClock>,
    request: u64,
    _reading: InFlight,
}

impl BodyEnd {
    /// For the request whose head `clock` received last.
    pub fn new(clock: &Arc<HeadClock>, in_flight: &Arc<AtomicUsize>) -> Self {
        Self {
            clock: clock.clone(),
            request: clock.requests(),
            _reading: InFlight::new(in_flight),
        }
    }

    pub fn ended(self) {
        self.clock.body_ended(self.request);
    }
}

/// Counts a connection's requests whose response is still being sent, so that the idle
/// timeout never cuts a request that is waiting on its upstream.
pub struct InFlight {
    counter: Arc<AtomicUsize>,
    /// The sandbox's turn among its requests in flight, held to the end of the answer.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl InFlight {
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self {
            counter: counter.clone(),
            permit: None,
        }
    }

    /// Takes one of the sandbox's `requests` permits for this request; `false` when
    /// none is free.
    pub fn admit(&mut self, requests: &Arc<tokio::sync::Semaphore>) -> bool {
        self.permit = requests.clone().try_acquire_owned().ok();
        self.permit.is_some()
    }

    /// The request's permit, for work that outlives its answer (the drain of a refused
    /// upload): it stays counted among the sandbox's requests until that work ends.
    pub fn take_permit(&mut self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permit.take()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What is done when a response has been sent (or abandoned).
pub struct Finish {
    /// The request's record, complete but for byte counts, duration and outcome.
    pub record: ProxyRecord,
    pub started: Instant,
    /// Request body bytes, counted by the [`CountingBody`] sent upstream.
    pub bytes_in: Arc<AtomicU64>,
    pub audit: AuditSink,
    /// Run only when the response was read to its end (gives an HTTP/1 connection back
    /// for reuse).
    pub on_complete: Option<Box<dyn FnOnce() + Send>>,
    pub in_flight: InFlight,
    /// Secrets scrubbed from the response, and one seen in the request body.
    pub secrets: SecretWatch,
    /// The connection's [`super::ConnInfo::closing`].
    pub closing: Arc<std::sync::atomic::AtomicBool>,
}

/// What a request's scans found, filled in while its bodies stream.
#[derive(Debug, Default, Clone)]
pub struct SecretWatch {
    pub scrubbed: Arc<Tally>,
    pub outbound: Arc<OutboundHit>,
    /// A placeholder sentinel in the body, at a host its credential does not list.
    pub placeholder: Arc<OutboundHit>,
}

impl SecretWatch {
    /// Puts the findings into the record: the scrub count and at most one finding
    /// (a secret going out outweighs one coming back).
    pub fn fill(&self, record: &mut ProxyRecord) {
        record.scrubbed = self.scrubbed.count();
        if let Some(name) = self.placeholder.credential() {
            if record.secret.is_none() {
                record.secret = Some(SecretFinding::placeholder(name, "the body"));
            }
        } else if let Some(name) = self.outbound.credential() {
            if record.secret.is_none() {
                record.secret = Some(SecretFinding::outbound(name, "the body"));
            }
        } else if record.scrubbed > 0 && record.secret.is_none() {
            record.secret = Some(SecretFinding::reflected(
                self.scrubbed.credentials(),
                record.scrubbed,
            ));
        }
    }
}

enum Inner {
    Upstream(ResponseBody),
    Local(Option<Bytes>),
}

/// The response body sent to the sandbox: the upstream's, streamed, or a short text the
/// proxy made. Emits the request's record once, at the end or when dropped.
pub struct RecordedBody {
    inner: Inner,
    bytes_out: u64,
    /// Boxed: the response body is moved several times on its way out (into the
    /// response, through the HTTP server), the record only written at its end.
    finish: Option<Box<Finish>>,
    /// The proxy ended the body itself (it could no longer scrub it): recorded as a deny.
    cut: bool,
    /// How long what it gave the connection has gone untaken (an upstream response's).
    handed: Option<Arc<super::io::Handed>>,
}

impl RecordedBody {
    /// The upstream's response, `handed` from when its head goes to the connection.
    pub fn upstream(body: ResponseBody, finish: Finish, handed: Arc<super::io::Handed>) -> Self {
        Self {
            inner: Inner::Upstream(body),
            bytes_out: 0,
            finish: Some(Box::new(finish)),
            cut: false,
            handed: Some(handed),
        }
    }

    pub fn local(text: Bytes, finish: Finish) -> Self {
        Self {
            inner: Inner::Local(Some(text)),
            bytes_out: 0,
            finish: Some(Box::new(finish)),
            cut: false,
            handed: None,
        }
    }

    fn inner_ended(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Local(b) => b.is_none(),
        }
    }

    fn complete(&mut self, ended: bool, error: Option<String>) {
        let Some(finish) = self.finish.take() else {
            return;
        };
        let Finish {
            mut record,
            started,
            bytes_in,
            audit,
            on_complete,
            in_flight,
            secrets,
            closing,
        } = *finish;
        secrets.fill(&mut record);
        if self.cut {
            record.verdict = crate::audit::ProxyVerdict::Deny;
        }
        record.bytes_in = bytes_in.load(Ordering::Relaxed);
        record.bytes_out = self.bytes_out;
        record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if record.reason.is_none() {
            record.reason = match error {
                Some(e) => Some(e),
                None if !ended && closing.load(Ordering::SeqCst) => Some(format!(
                    "response not sent to the end: {}",
                    super::refused::CLOSED_BY_DAEMON
                )),
                None if !ended => {
                    Some("response not sent to the end: the downstream client went away".to_owned())
                }
                None => None,
            };
        }
        if ended {
            if let Some(f) = on_complete {
                f();
            }
        }
        drop(in_flight);
        audit(record);
    }
}

/// The proxy's own reason for ending a body, wherever it sits in the error's chain.
fn find_cut<'a>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a super::scrub::ProxyCut> {
    loop {
        if let Some(cut) = e.downcast_ref::<super::scrub::ProxyCut>() {
            return Some(cut);
        }
        e = e.source()?;
    }
}

impl Body for RecordedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let poll = match &mut this.inner {
            Inner::Upstream(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Pending => {
                    // Waiting on the upstream, not on the client.
                    if let Some(h) = &this.handed {
                        h.waiting();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => Some(Ok(frame)),
                Poll::Ready(Some(Err(e))) => Some(Err(e)),
                Poll::Ready(None) => None,
            },
            Inner::Local(text) => text.take().map(|t| Ok(Frame::data(t))),
        };
        match poll {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes_out += data.len() as u64;
                }
                if this.inner_ended() {
                    this.complete(true, None);
                    this.handed = None;
                } else if let Some(h) = &this.handed {
                    h.handed();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let reason = match find_cut(e.as_ref()) {
                    Some(cut) => {
                        this.cut = true;
                        format!("proxy: response body ended: {cut}")
                    }
                    None => format!("upstream server: response body failed: {e}"),
                };
                this.complete(false, Some(reason));
                this.handed = None;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.complete(true, None);
                this.handed = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner_ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Local(Some(t)) => SizeHint::with_exact(t.len() as u64),
            Inner::Local(None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for RecordedBody {
    fn drop(&mut self) {
        let ended = self.inner_ended();
        self.complete(ended, None);
    }
}
