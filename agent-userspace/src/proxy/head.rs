//! The HTTP/1 request-header timer (`proxy.header_secs`), kept apart from the idle
//! timer (`proxy.idle_secs`).
//!
//! hyper's own `header_read_timeout` starts as soon as an HTTP/1 connection waits for a
//! request, so an idle keep-alive connection would be closed after `header_secs`
//! instead of `idle_secs`. It is switched off; instead [`HeadTimed`] wraps the
//! plaintext stream hyper reads: the first byte that arrives while no request is in
//! progress starts the clock, the proxy stops it when hyper hands it the parsed request
//! ([`HeadClock::head_received`]), and a read still waiting when `header_secs` have
//! passed fails with [`io::ErrorKind::TimedOut`], which ends the connection. Between
//! requests only the idle timer applies.
//!
//! A pipelined request's head is timed too. Bytes that arrive while a request is in
//! flight are its body until the proxy says the body has ended ([`HeadClock::body_ended`]);
//! after that they are the next request's head, and start the clock. A read that carries
//! a whole head, its body (by `Content-Length`) and more bytes besides carries the next
//! head as well: the clock restarts for it when the first is received. The limit is
//! enforced once no request is in flight (a head cannot be parsed before the response
//! ahead of it is done).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Instant;

use super::io::Deadline;

/// Whether a request head is being received on one HTTP/1 connection, and since when.
#[derive(Debug)]
pub struct HeadClock {
    origin: Instant,
    /// Milliseconds after `origin`, plus one, when the first byte of the head being
    /// received arrived; 0 while none is.
    since: AtomicU64,
    /// Request heads received so far.
    requests: AtomicU64,
    /// The body of the request in flight has been read to its end.
    body_done: AtomicBool,
    /// The head being received came with the start of the next one.
    pipelined: AtomicBool,
    timed_out: AtomicBool,
    /// HTTP/2: the client is in the middle of a header block or another frame it must
    /// send whole (see [`super::h2head::BlockScan`]).
    h2_open: AtomicBool,
    /// HTTP/2: requests whose whole header block has arrived (see
    /// [`super::h2head::BlockScan::requests`]).
    h2_requests: AtomicU64,
}

impl HeadClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            since: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            body_done: AtomicBool::new(false),
            pipelined: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            h2_open: AtomicBool::new(false),
            h2_requests: AtomicU64::new(0),
        })
    }

    /// hyper parsed a whole request head: the clock stops until the next one starts.
    /// When the next head arrived with this one, its clock starts now.
    pub fn head_received(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.body_done.store(false, Ordering::Relaxed);
        if self.pipelined.swap(false, Ordering::Relaxed) {
            self.start();
        } else {
            self.since.store(0, Ordering::Relaxed);
        }
    }

    /// Request heads received so far: names the request in flight.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The body of request `request` (see [`HeadClock::requests`]) has been read to its
    /// end: bytes that follow belong to the next request's head. Late news of an earlier
    /// request is ignored.
    pub fn body_ended(&self, request: u64) {
        if request == self.requests() {
            self.body_done.store(true, Ordering::Relaxed);
        }
    }

    /// When the head being received started, if one is.
    pub fn head_started(&self) -> Option<Instant> {
        match self.since.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.origin + Duration::from_millis(ms - 1)),
        }
    }

    /// Whether a read failed because a head took longer than allowed.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Marks the connection as cut for a request header not complete in time (HTTP/2's
    /// timer, [`super::h2head::H2HeadTimed`], tells it this way).
    pub fn time_out(&self) {
        self.timed_out.store(true, Ordering::Relaxed);
    }

    pub fn set_h2_open(&self, open: bool) {
        self.h2_open.store(open, Ordering::Relaxed);
    }

    pub fn set_h2_requests(&self, requests: u64) {
        self.h2_requests.store(requests, Ordering::Relaxed);
    }

    /// HTTP/2: requests whose header block arrived whole and that the proxy's handler was
    /// not given, leaving out those the HTTP/2 layer reset (`reset`, each recorded as
    /// such): refused by that layer without a reset (a header list over its limit with
    /// the stream ended is answered 431 and nothing else), reset by the client before
    /// they were taken, or dropped as the connection ended before they were handed over.
    pub fn h2_unhandled(&self, reset: u64) -> u64 {
        self.h2_requests
            .load(Ordering::Relaxed)
            .saturating_sub(self.requests().saturating_add(reset))
    }

    /// Whether a request head (HTTP/2: a header block or another frame) has begun and not
    /// ended.
    pub fn incomplete(&self) -> bool {
        self.head_started().is_some() || self.h2_open.load(Ordering::Relaxed)
    }

    fn start(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.since.store(ms + 1, Ordering::Relaxed);
    }
}

/// The stream hyper's HTTP/1 server reads, with the header timer of [`HeadClock`].
/// `in_flight` counts the connection's requests whose response is not done: bytes read
/// while one is are its body (or a pipelined request, timed once it is its turn).
pub struct HeadTimed<S> {
    inner: S,
    clock: Arc<HeadClock>,
    in_flight: Arc<AtomicUsize>,
    limit: Duration,
    /// The head's deadline (or the next look at a head waiting behind a response).
    deadline: Deadline,
    /// A head is waiting for the response ahead of it: its time starts when that is done.
    behind_response: bool,
}

impl<S> HeadTimed<S> {
    pub fn new(
        inner: S,
        clock: Arc<HeadClock>,
        in_flight: Arc<AtomicUsize>,
        limit: Duration,
    ) -> Self {
        Self {
            inner,
            clock,
            in_flight,
            limit,
            deadline: Deadline::default(),
            behind_response: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadTimed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                // Line ends between messages are ignored (RFC 9112, 2.2): not a head.
                if this.clock.head_started().is_none() && !only_line_ends(read) {
                    if this.in_flight.load(Ordering::Relaxed) == 0 {
                        this.clock.start();
                        if carries_next_head(read) {
                            this.clock.pipelined.store(true, Ordering::Relaxed);
                        }
                    } else if this.clock.body_done.load(Ordering::Relaxed) {
                        this.clock.start();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Some(started) = this.clock.head_started() else {
                    return Poll::Pending;
                };
                // A pipelined head waits for the response ahead of it (or the rest of a
                // refused body) and gets its whole time after that: look again shortly.
                if this.in_flight.load(Ordering::Relaxed) > 0 {
                    this.behind_response = true;
                    this.deadline.poll_at(Instant::now() + RECHECK, cx);
                    return Poll::Pending;
                }
                let started = if std::mem::take(&mut this.behind_response) {
                    this.clock.start();
                    Instant::now()
                } else {
                    started
                };
                if this.deadline.poll_at(started + this.limit, cx) {
                    this.clock.time_out();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "request header not complete {} s after its first byte",
                            this.limit.as_secs()
                        ),
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

super::io::write_through!(HeadTimed);

/// How often a head waiting behind a response looks whether its turn has come.
const RECHECK: Duration = Duration::from_millis(250);

/// Whether `bytes` hold nothing but CR and LF.
fn only_line_ends(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| matches!(b, b'\r' | b'\n'))
}

/// Whether `bytes`, read at the start of a request head, hold more than that head and
/// its body (`Content-Length`, or none): the start of a pipelined request. A head not
/// whole in `bytes`, a chunked body or a head hyper would refuse anyway gives `false`.
fn carries_next_head(bytes: &[u8]) -> bool {
    let Some(end) = memchr::memmem::find(bytes, b"\r\n\r\n").map(|p| p + 4) else {
        return false;
    };
    if end == bytes.len() {
        return false;
    }
    // As many as hyper accepts.
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(
        request.parse(&bytes[..end]),
        Ok(httparse::Status::Complete(_))
    ) {
        return false;
    }
    let mut length = 0usize;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return false;
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                Some(n) => length = n,
                None => return false,
            }
        }
    }
    bytes
        .get(end.saturating_add(length)..)
        .is_some_and(|rest| !rest.is_empty() && !only_line_ends(rest))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn the_clock_runs_only_while_a_head_is_incomplete() {
        let (mut client, server) = tokio::io::duplex(64);
        let clock = HeadClock::new();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let limit = Duration::from_millis(300);
        let mut s = HeadTimed::new(server, clock.clone(), in_flight.clone(), limit);
        let mut buf = [0u8; 64];

        // Idle: nothing arrives for longer than the limit, the read just waits.
        let waited = tokio::time::timeout(limit * 3, s.read(&mut buf)).await;
        assert!(waited.is_err());
        assert!(clock.head_started().is_none());

        // A head starts and is received; then a request is in flight: no clock.
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 16);
        assert!(clock.head_started().is_some());
        clock.head_received();
        in_flight.fetch_add(1, Ordering::Relaxed);
        client.write_all(b"body").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        assert!(clock.head_started().is_none());
        in_flight.fetch_sub(1, Ordering::Relaxed);

        // The next head starts and stalls: the read fails after the limit.
        client.write_all(b"GET /next HTTP/1.1\r\nHo").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        let started = Instant::now();
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() <= limit + Duration::from_secs(5));
        assert!(clock.timed_out());
    }

    #[test]
    fn a_read_carrying_the_next_head_is_recognised() {
        assert!(carries_next_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET"));
        assert!(!carries_next_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!carries_next_head(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        let post = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody";
        assert!(!carries_next_head(post));
        assert!(carries_next_head(&[&post[..], b"G"].concat()));
        assert!(!carries_next_head(&[&post[..], b"\r\n"].concat()));
        assert!(!carries_next_head(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\nGET"
        ));
    }

    #[tokio::test]
    async fn a_pipelined_head_is_timed_once_the_response_ahead_is_done() {
        let (mut client, server) = tokio::io::duplex(256);
        let clock = HeadClock::new();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let limit = Duration::from_millis(300);
        let mut s = HeadTimed::new(server, clock.clone(), in_flight.clone(), limit);
        let mut buf = [0u8; 256];

        // A request with a body is in flight; its body is not timed.
        client.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        clock.head_received();
        in_flight.fetch_add(1, Ordering::Relaxed);
        client.write_all(b"body").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        assert!(clock.head_started().is_none());
        // News of an earlier request's body changes nothing; this one's does.
        clock.body_ended(clock.requests() - 1);
        client.write_all(b"more").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        assert!(clock.head_started().is_none());
        clock.body_ended(clock.requests());
        // Line ends between messages are not a head.
        client.write_all(b"\r\n").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        assert!(clock.head_started().is_none());

        // The next head arrives behind it, incomplete: its clock starts, but nothing
        // fails while the response ahead is still being sent.
        client.write_all(b"GET /next HTTP/1.1\r\nHo").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        assert!(clock.head_started().is_some());
        let waited = tokio::time::timeout(limit * 2, s.read(&mut buf)).await;
        assert!(waited.is_err(), "no timeout while a response is in flight");

        // The response is done: the head gets its whole time from then, no more.
        in_flight.fetch_sub(1, Ordering::Relaxed);
        let done = Instant::now();
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(done.elapsed() >= limit - Duration::from_millis(50));
        assert!(done.elapsed() <= limit + Duration::from_secs(5));
        assert!(clock.timed_out());
    }
}
