//! Body wrappers that count bytes, and emit a request's record when its response ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::record::ProxyRecord;
use super::AuditSink;

/// A request body on its way upstream, counting its bytes. It may start with bytes the
/// proxy already read from the client (a git push's command list), sent first.
pub struct CountingBody {
    prefix: Option<Bytes>,
    inner: Incoming,
    count: Arc<AtomicU64>,
}

impl CountingBody {
    /// `prefix`, then what is left of `inner`.
    pub fn with_prefix(prefix: Bytes, inner: Incoming, count: Arc<AtomicU64>) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            inner,
            count,
        }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take() {
            this.count.fetch_add(prefix.len() as u64, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            if let Some(data) = frame.data_ref() {
                this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let Some(prefix) = &self.prefix else {
            return inner;
        };
        let len = prefix.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(len));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(len));
        }
        hint
    }
}

/// Counts a connection's requests whose response is still being sent, so that the idle
/// timeout never cuts a request that is waiting on its upstream.
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
}

enum Inner {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

/// The response body sent to the sandbox: the upstream's, streamed, or a short text the
/// proxy made. Emits the request's record once, at the end or when dropped.
pub struct RecordedBody {
    inner: Inner,
    bytes_out: u64,
    finish: Option<Finish>,
}

impl RecordedBody {
    pub fn upstream(body: Incoming, finish: Finish) -> Self {
        Self {
            inner: Inner::Upstream(body),
            bytes_out: 0,
            finish: Some(finish),
        }
    }

    pub fn local(text: Bytes, finish: Finish) -> Self {
        Self {
            inner: Inner::Local(Some(text)),
            bytes_out: 0,
            finish: Some(finish),
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
        } = finish;
        record.bytes_in = bytes_in.load(Ordering::Relaxed);
        record.bytes_out = self.bytes_out;
        record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if record.reason.is_none() {
            record.reason = match error {
                Some(e) => Some(e),
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
                Poll::Pending => return Poll::Pending,
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
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.complete(
                    false,
                    Some(format!("upstream server: response body failed: {e}")),
                );
                Poll::Ready(Some(Err(Box::new(e))))
            }
            None => {
                this.complete(true, None);
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
