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

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Whether a request head is being received on one HTTP/1 connection, and since when.
#[derive(Debug)]
pub struct HeadClock {
    origin: Instant,
    /// Milliseconds after `origin`, plus one, when the first byte of the head being
    /// received arrived; 0 while none is.
    since: AtomicU64,
    timed_out: AtomicBool,
}

impl HeadClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            since: AtomicU64::new(0),
            timed_out: AtomicBool::new(false),
        })
    }

    /// hyper parsed a whole request head: the clock stops until the next one starts.
    pub fn head_received(&self) {
        self.since.store(0, Ordering::Relaxed);
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
    /// Made the first time a head is not complete in one read; reset after that.
    sleep: Option<Pin<Box<Sleep>>>,
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
            sleep: None,
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
                if buf.filled().len() > before
                    && this.in_flight.load(Ordering::Relaxed) == 0
                    && this.clock.head_started().is_none()
                {
                    this.clock.start();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Some(started) = this.clock.head_started() else {
                    return Poll::Pending;
                };
                let deadline = started + this.limit;
                let sleep = match &mut this.sleep {
                    Some(sleep) => {
                        if sleep.deadline() != deadline {
                            sleep.as_mut().reset(deadline);
                        }
                        sleep
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if sleep.as_mut().poll(cx).is_ready() {
                    this.clock.timed_out.store(true, Ordering::Relaxed);
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
}
