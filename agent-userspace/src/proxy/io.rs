//! Stream wrappers: replaying buffered bytes, and counting bytes and activity; the timer
//! the header-timing wrappers share.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A timer kept across polls of a stream wrapper: made on first use, moved when its
/// deadline changes.
#[derive(Debug, Default)]
pub struct Deadline(Option<Pin<Box<Sleep>>>);

impl Deadline {
    /// Whether `at` has passed; if not, the task is woken when it does.
    pub fn poll_at(&mut self, at: Instant, cx: &mut Context<'_>) -> bool {
        let sleep = match &mut self.0 {
            Some(sleep) => {
                if sleep.deadline() != at {
                    sleep.as_mut().reset(at);
                }
                sleep
            }
            None => self.0.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// A stream whose first reads return `prefix` (bytes already read from `inner`, such as
/// a peeked ClientHello), then continue with `inner`. Writes go straight to `inner`.
#[derive(Debug)]
pub struct PrefixedStream<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> PrefixedStream<S> {
    /// `prefix` is returned before anything read from `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// `AsyncWrite` for a read-side wrapper `$wrapper<S>` (a struct with an `inner: S`
/// field): every write goes straight to `inner`. With `observe = method`, the wrapper's
/// `method(pending: bool)` is told after each write and flush whether it had to wait.
macro_rules! write_through {
    ($wrapper:ident $(, observe = $observe:ident)?) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let this = self.get_mut();
                let poll = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
                $(this.$observe(poll.is_pending());)?
                poll
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let this = self.get_mut();
                let poll = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
                $(this.$observe(poll.is_pending());)?
                poll
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let this = self.get_mut();
                let poll = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
                $(this.$observe(poll.is_pending());)?
                poll
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}
pub(super) use write_through;

write_through!(PrefixedStream);

/// When bytes last moved on a connection, and how many each way.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
    /// 1 + the millisecond (since `origin`) a write began to wait for the peer to read,
    /// while it waits; 0 otherwise.
    blocked_ms: AtomicU64,
    /// The responses being sent on the connection, each with when it last gave the
    /// connection something to send that was not taken since ([`Handed`]).
    responses: std::sync::Mutex<Vec<std::sync::Weak<Handed>>>,
}

/// One response's clock: 1 + the millisecond (since the connection's origin) it last gave
/// the connection a frame (or its head) that the connection has not come back for since;
/// 0 while it waits on its upstream, or is over. An HTTP/2 client that never opens its
/// receive window leaves it running (no socket write ever waits, so the write clock does
/// not).
#[derive(Debug)]
pub struct Handed {
    origin: Instant,
    since_ms: AtomicU64,
}

impl Handed {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// A frame went to the connection: from now, until it comes back for more.
    pub fn handed(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The connection came back and the response waits on its upstream (or is over).
    pub fn waiting(&self) {
        if self.since_ms.load(Ordering::Relaxed) != 0 {
            self.since_ms.store(0, Ordering::Relaxed);
        }
    }

    fn untaken_for(&self) -> Option<Duration> {
        match self.since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(self.now_ms().saturating_sub(since))),
        }
    }
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            blocked_ms: AtomicU64::new(0),
            responses: std::sync::Mutex::default(),
        })
    }

    /// A clock for a response whose head goes to the connection now (handed from now).
    pub fn response(&self) -> Arc<Handed> {
        let clock = Arc::new(Handed {
            origin: self.origin,
            since_ms: AtomicU64::new(0),
        });
        clock.handed();
        let mut responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        responses.retain(|r| r.strong_count() > 0);
        responses.push(Arc::downgrade(&clock));
        clock
    }

    /// The longest a response of the connection has waited for it to take what it gave.
    pub fn response_untaken_for(&self) -> Option<Duration> {
        let responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        responses
            .iter()
            .filter_map(|r| r.upgrade())
            .filter_map(|r| r.untaken_for())
            .max()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Notes what a write to the wrapped stream did: bytes written, or that it waits for
    /// the peer (from its first wait), or neither any more.
    fn wrote(&self, poll: &Poll<io::Result<usize>>) {
        match poll {
            Poll::Ready(Ok(n)) => {
                self.written.fetch_add(*n as u64, Ordering::Relaxed);
                self.touch();
                self.write_done();
            }
            Poll::Ready(Err(_)) => self.write_done(),
            Poll::Pending => self.write_waits(),
        }
    }

    /// A write had to wait (the peer's window is full): noted once, from its first wait.
    fn write_waits(&self) {
        if self.blocked_ms.load(Ordering::Relaxed) != 0 {
            return;
        }
        let now = self.now_ms().saturating_add(1);
        let _ = self
            .blocked_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A write went through (or failed): no longer waiting.
    fn write_done(&self) {
        // Read first: most writes never waited, and a load leaves the line shared.
        if self.blocked_ms.load(Ordering::Relaxed) != 0 {
            self.blocked_ms.store(0, Ordering::Relaxed);
        }
    }

    /// How long a write has waited for the peer to read, if one waits.
    pub fn write_blocked_for(&self) -> Option<Duration> {
        match self.blocked_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(
                self.now_ms().saturating_sub(since - 1),
            )),
        }
    }

    /// How long no byte has moved.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Bytes read from the wrapped stream.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written to the wrapped stream.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// Counts bytes and records activity on `inner`.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            this.activity.read.fetch_add(n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.wrote(&poll);
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.wrote(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Why [`idle_watch`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// No byte moved for the whole time, and nothing was in flight.
    Quiet,
    /// A write waited the whole time for the peer to read (a response it does not take),
    /// busy or not.
    Stalled,
}

impl Idle {
    /// Why a connection closed for this, to end an audit reason with.
    pub fn reason(self, idle: Duration) -> String {
        match self {
            Self::Quiet => format!("no byte for {} s (proxy.idle_secs)", idle.as_secs()),
            Self::Stalled => format!(
                "the downstream client read nothing of what the proxy sent for {} s ({} times \
                 proxy.idle_secs)",
                (idle * STALL_FACTOR).as_secs(),
                STALL_FACTOR
            ),
        }
    }
}

/// How many times `idle` a write may wait for the peer to read. A socket is writable
/// again only once about a third of its send buffer (up to 4 MiB) has drained, so a
/// client reading steadily but slowly leaves writes waiting for a while each: at five
/// times the default 60 s, one reading about 5 KB/s is never cut, one reading nothing is.
pub const STALL_FACTOR: u32 = 5;

/// Returns once no byte has moved for `idle` while `busy()` is false, or once a write has
/// waited [`STALL_FACTOR`] times `idle` for the peer to read. A busy connection (a
/// request waiting on its upstream) is otherwise never idle.
pub async fn idle_watch(activity: &Activity, idle: Duration, busy: impl Fn() -> bool) -> Idle {
    loop {
        let stalled = |waited: Option<Duration>| waited.is_some_and(|w| w >= idle * STALL_FACTOR);
        if stalled(activity.write_blocked_for()) || stalled(activity.response_untaken_for()) {
            return Idle::Stalled;
        }
        let quiet = activity.idle_for();
        if quiet >= idle {
            if !busy() {
                return Idle::Quiet;
            }
            // Looked at again within the time a stalled write may wait.
            tokio::time::sleep(idle / 4).await;
        } else {
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn prefix_is_replayed_before_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let activity = Activity::new();
        let mut s = Metered::new(PrefixedStream::new(b"hello".to_vec(), b), activity.clone());
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
        assert_eq!(activity.bytes_read(), 11);
    }

    #[tokio::test]
    async fn idle_watch_waits_for_quiet_and_not_busy() {
        let idle = Duration::from_millis(100);
        let activity = Activity::new();
        let started = Instant::now();
        assert_eq!(idle_watch(&activity, idle, || false).await, Idle::Quiet);
        assert!(started.elapsed() >= idle);
        let busy_until = Instant::now() + Duration::from_millis(250);
        idle_watch(&activity, idle, || Instant::now() < busy_until).await;
        assert!(Instant::now() >= busy_until);
        // A write waiting for the peer ends the watch even while busy.
        activity.write_waits();
        let started = Instant::now();
        assert_eq!(idle_watch(&activity, idle, || true).await, Idle::Stalled);
        assert!(
            started.elapsed() >= idle * STALL_FACTOR - idle / 2,
            "{:?}",
            started.elapsed()
        );
        activity.write_done();
        assert_eq!(activity.write_blocked_for(), None);
    }
}
