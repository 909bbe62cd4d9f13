//! The upstream side: which addresses may be dialled, the TLS client configuration, and
//! the pool of upstream HTTP connections shared by intercepted connections.
//!
//! The proxy only ever dials the connection's original destination, the address the
//! sandbox itself asked the kernel for: it never resolves names, so a Host header
//! cannot steer it elsewhere. Special addresses ([`crate::net::special`]: loopback,
//! private, link-local, cloud metadata, tunnels into IPv4, ...) are refused unless the
//! rule covers them explicitly; that check is made for every request, also when a
//! pooled connection serves it, so a rule that may not dial an address never gets a
//! connection to it.
//!
//! The pool is keyed by sandbox, original destination and TLS server name: everything
//! that decides what an upstream connection is (where it goes, which name its
//! certificate was verified for) and nothing about the request, whose credential travels
//! in a header of that request only. HTTP/2 connections are shared by concurrent
//! requests; HTTP/1 connections serve one request at a time and wait, idle, for the next.
//! Connections of different sandboxes are never mixed, so one sandbox cannot exhaust or
//! disturb (stream limits, flow control, a connection-level error) another's. An HTTP/2
//! connection takes at most [`MAX_STREAMS_PER_H2`] requests at once; more open another,
//! so that long responses (event streams, downloads) never queue the requests behind
//! them on a server's stream limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::body::CountingBody;
use super::error::ProxyError;
use super::Route;

/// Idle upstream HTTP/1 connections kept per pool key, and in all per proxy worker.
const MAX_IDLE_H1: usize = 64;
const MAX_IDLE_H1_TOTAL: usize = 1024;
/// Requests in flight on one upstream HTTP/2 connection before another is opened: below
/// the stream limits servers commonly set (100 to 250).
pub const MAX_STREAMS_PER_H2: usize = 64;
/// HTTP/2 connections per pool key; past this, requests share the least busy one.
const MAX_H2_PER_KEY: usize = 16;
/// Flow-control window of a whole upstream HTTP/2 connection (hyper's default is 5 MiB,
/// with 2 MiB per stream).
const H2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Flow-control window of one upstream HTTP/2 stream (hyper's default is 2 MiB): what a
/// response whose reader in the sandbox stalls holds in the daemon. With a sandbox's 256
/// requests in flight, 128 MiB at most (512 MiB with the default); 512 KiB keeps one
/// stream at 25 MB/s over a 20 ms round trip.
const H2_STREAM_WINDOW: u32 = 512 * 1024;
/// Pool keys (sandbox, destination, server name) with connections kept at most per proxy
/// worker; past this, new connections are used for their request and closed.
const MAX_KEYS: usize = 1024;
/// Of those, and of the idle HTTP/1 connections, one sandbox's share (per worker): a
/// sandbox reaching many destinations or names (a wildcard rule) fills its own share, not
/// the pool every other sandbox's connections are kept in.
const MAX_KEYS_PER_SANDBOX: usize = MAX_KEYS / 8;
const MAX_IDLE_H1_PER_SANDBOX: usize = MAX_IDLE_H1_TOTAL / 8;

/// `dst` in canonical form if `route` may dial it from `dialer`: refuses special
/// addresses the rule does not cover, and the host's own addresses (from the daemon's own
/// namespace) the rule does not name exactly.
pub fn check_dial(
    dst: SocketAddr,
    route: &Route,
    dialer: &crate::net::Dialer,
) -> Result<SocketAddr, ProxyError> {
    let ip = dst.ip().to_canonical();
    let addr = SocketAddr::new(ip, dst.port());
    if let Some(special) = crate::net::special_address(ip) {
        if !(route.explicitly_covers)(ip) {
            return Err(ProxyError::UpstreamRefused {
                addr,
                reason: format!(
                    "{ip} is a {special}, not covered explicitly by rule `{}`",
                    route.rule_name
                ),
            });
        }
    }
    // The host's own addresses are special from where the daemon dials: a name whose
    // answers the sandbox can choose would otherwise reach the host's own services.
    let own = dialer
        .is_own_address(ip)
        .map_err(|source| ProxyError::UpstreamIo {
            addr,
            op: "reading the host's own addresses before connecting",
            source,
        })?;
    if own && !(route.names_exactly)(ip) {
        return Err(ProxyError::UpstreamRefused {
            addr,
            reason: format!(
                "{ip} is an address of this host (the proxy dials from the daemon's network \
                 namespace), not named alone in the `to` of rule `{}`",
                route.rule_name
            ),
        });
    }
    Ok(addr)
}

/// Opens a TCP connection to `dst`, refusing special addresses the rule does not cover.
pub async fn dial(
    dst: SocketAddr,
    route: &Route,
    connect_timeout: Duration,
    dialer: &crate::net::Dialer,
) -> Result<TcpStream, ProxyError> {
    let addr = check_dial(dst, route, dialer)?;
    let stream = tokio::time::timeout(connect_timeout, dialer.connect(addr))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout {
            addr,
            op: "connecting",
            secs: connect_timeout.as_secs(),
        })?
        .map_err(|source| ProxyError::UpstreamIo {
            addr,
            op: "connecting",
            source,
        })?;
    // Small requests and responses should not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// One HTTP connection to the upstream server.
pub enum Sender {
    H1(http1::SendRequest<CountingBody>),
    /// With the request's place among the connection's requests in flight, to be held
    /// until its response has been sent on.
    H2(http2::SendRequest<CountingBody>, StreamSlot),
}

/// One request in flight on a pooled HTTP/2 connection; dropping it ends that.
pub struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(streams: &Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::Relaxed);
        Self(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self, Self::H2(..))
    }
}

/// What a new upstream connection needs.
pub struct DialParams<'a> {
    pub dst: SocketAddr,
    pub route: &'a Route,
    pub server_name: &'a str,
    pub tls: &'a Arc<ClientConfig>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub dialer: &'a crate::net::Dialer,
}

/// What a pooled connection is for: a connection is only ever reused for the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    sandbox: String,
    /// Canonical (IPv4-mapped IPv6 addresses as IPv4).
    dst: SocketAddr,
    /// Normalised, as checked against the route and verified in the certificate.
    server_name: String,
    /// The proxy worker thread (0 off them): each keeps its upstream connections, so that
    /// a request and the connection it is sent on run on one thread.
    worker: usize,
}

impl PoolKey {
    pub fn new(sandbox: &str, dst: SocketAddr, server_name: &str) -> Self {
        Self {
            sandbox: sandbox.to_owned(),
            dst: SocketAddr::new(dst.ip().to_canonical(), dst.port()),
            server_name: server_name.to_owned(),
            worker: super::workers::current(),
        }
    }
}

/// Upstream connections kept for reuse, shared by all intercepted connections: one
/// HTTP/2 connection per key shared by all its requests, or idle HTTP/1 connections used
/// one request at a time. Unused connections are closed after the idle timeout.
pub struct UpstreamPool {
    idle_timeout: Duration,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    entries: HashMap<PoolKey, Entry>,
    /// Idle HTTP/1 connections in all entries.
    idle_h1: usize,
    /// Keys and idle HTTP/1 connections, by sandbox.
    by_sandbox: HashMap<String, Share>,
    reaper: bool,
}

/// What one sandbox holds of the pool.
#[derive(Clone, Copy, Default)]
struct Share {
    keys: usize,
    idle_h1: usize,
}

impl PoolState {
    /// Adds to `sandbox`'s share, made if it has none (its name copied only then).
    fn add_to_share(&mut self, sandbox: &str, add: impl Fn(&mut Share)) {
        match self.by_sandbox.get_mut(sandbox) {
            Some(share) => add(share),
            None => {
                let mut share = Share::default();
                add(&mut share);
                self.by_sandbox.insert(sandbox.to_owned(), share);
            }
        }
    }

    /// `idle_h1` and `by_sandbox` counted again from the entries (after a sweep).
    fn recount(&mut self) {
        self.by_sandbox.clear();
        self.idle_h1 = 0;
        for (key, entry) in &self.entries {
            let share = self.by_sandbox.entry(key.sandbox.clone()).or_default();
            share.keys += 1;
            share.idle_h1 += entry.h1_idle.len();
            self.idle_h1 += entry.h1_idle.len();
        }
    }
}

#[derive(Default)]
struct Entry {
    /// Shared HTTP/2 connections.
    h2: Vec<H2Conn>,
    /// Idle HTTP/1 connections and since when; the most recently used last.
    h1_idle: Vec<(http1::SendRequest<CountingBody>, Instant)>,
    /// What the server chose last time (ALPN), once known.
    speaks_h2: Option<bool>,
    /// The connection being made for this key, if any: set to `true` if it was made,
    /// closed (its sender dropped) when the attempt is over.
    dialing: Option<watch::Receiver<bool>>,
}

/// What [`UpstreamPool::acquire`] does next.
enum Step {
    /// Use this pooled HTTP/2 connection.
    Ready(Sender),
    /// Use this idle HTTP/1 connection if it is still good.
    Idle(http1::SendRequest<CountingBody>, Instant),
    /// Wait for the connection another request is making, then look again.
    Wait(watch::Receiver<bool>),
    /// Make a new connection; waiters are told how it went through the gate.
    Dial(Option<watch::Sender<bool>>),
}

struct H2Conn {
    sender: http2::SendRequest<CountingBody>,
    /// Requests in flight.
    streams: Arc<AtomicUsize>,
    /// When a request last took it.
    last_used: Instant,
}

impl H2Conn {
    fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }
}

impl Entry {
    /// Nothing pooled and no connection being made: the entry may go.
    fn is_empty(&self) -> bool {
        self.h2.is_empty()
            && self.h1_idle.is_empty()
            && self
                .dialing
                .as_ref()
                .is_none_or(|d| d.has_changed().is_err())
    }

    /// A shared HTTP/2 connection for one more request, unless all are busy and there is
    /// room for another.
    fn h2_for_request(&mut self, now: Instant) -> Option<Sender> {
        self.h2.retain(|c| !c.sender.is_closed());
        let free = self
            .h2
            .iter()
            .position(|c| c.streams() < MAX_STREAMS_PER_H2);
        let chosen = match free {
            Some(i) => i,
            None if self.h2.len() < MAX_H2_PER_KEY => return None,
            None => (0..self.h2.len()).min_by_key(|&i| self.h2[i].streams())?,
        };
        let conn = &mut self.h2[chosen];
        conn.last_used = now;
        Some(Sender::H2(
            conn.sender.clone(),
            StreamSlot::take(&conn.streams),
        ))
    }

    /// Takes out what is closed or unused for `idle`, to be dropped outside the lock.
    fn expire(&mut self, now: Instant, idle: Duration, dead: &mut Dead) {
        let (keep, gone): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.h2).into_iter().partition(|c| {
                !c.sender.is_closed()
                    && (c.streams() > 0 || now.saturating_duration_since(c.last_used) < idle)
            });
        self.h2 = keep;
        dead.h2.extend(gone.into_iter().map(|c| c.sender));
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.h1_idle)
            .into_iter()
            .partition(|(h1, since)| {
                !h1.is_closed() && now.saturating_duration_since(*since) < idle
            });
        self.h1_idle = keep;
        dead.h1.extend(gone.into_iter().map(|(h1, _)| h1));
    }
}

/// Connections taken out of the pool; dropping them (outside the lock) closes them once
/// no request uses them.
#[derive(Default)]
struct Dead {
    h2: Vec<http2::SendRequest<CountingBody>>,
    h1: Vec<http1::SendRequest<CountingBody>>,
}

impl UpstreamPool {
    /// An empty pool whose connections are closed after `idle_timeout` unused.
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout,
            state: Mutex::new(PoolState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every update leaves the map consistent; a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection ready for a request to `key`: a pooled one when possible, else a new
    /// one. The route's dial check comes first, whether or not a connection is pooled.
    ///
    /// While a key's first connection, or another HTTP/2 connection for it, is being
    /// made, other requests that need one wait for it (once, at most as long as a dial
    /// may take) instead of each dialling its own; a server known to speak HTTP/1 only is
    /// dialled in parallel, one connection per request in flight.
    pub async fn acquire(
        self: &Arc<Self>,
        key: &PoolKey,
        params: &DialParams<'_>,
    ) -> Result<Sender, ProxyError> {
        check_dial(params.dst, params.route, params.dialer)?;
        // Set once a wait was in vain (the dial failed or took too long): dial then.
        let mut wait_failed = false;
        loop {
            let step = {
                let mut state = self.lock();
                self.next_step(&mut state, key, wait_failed)
            };
            match step {
                Step::Ready(sender) => return Ok(sender),
                Step::Idle(mut h1, since) => {
                    if h1.is_closed() || since.elapsed() >= self.idle_timeout {
                        continue;
                    }
                    // A returned connection becomes ready as soon as its connection task
                    // has seen the end of the previous response; normally at once.
                    let ready = tokio::time::timeout(params.connect_timeout, h1.ready()).await;
                    if let Ok(Ok(())) = ready {
                        return Ok(Sender::H1(h1));
                    }
                }
                Step::Wait(mut dialing) => {
                    let bound = params.connect_timeout + params.handshake_timeout;
                    // `changed` returns once the dialling request is done: Ok after it
                    // said it succeeded, an error if it just went away.
                    let done = tokio::time::timeout(bound, dialing.changed()).await;
                    wait_failed = !matches!(done, Ok(Ok(()))) || !*dialing.borrow_and_update();
                }
                Step::Dial(gate) => {
                    // Boxed: a TCP and TLS dial (several KiB of future) is rare next to
                    // the pooled connections every request's future would make room for.
                    let sender = Box::pin(self.dial_new(key, params)).await;
                    if let Some(gate) = gate {
                        // Waiters look at the pool again, which now holds the new
                        // connection (or, if it was HTTP/1, dial their own).
                        let _ = gate.send(sender.is_ok());
                    }
                    return sender;
                }
            }
        }
    }

    /// What `acquire` does next, decided under the lock.
    fn next_step(
        self: &Arc<Self>,
        state: &mut PoolState,
        key: &PoolKey,
        wait_failed: bool,
    ) -> Step {
        let Some(entry) = self.entry(state, key) else {
            return Step::Dial(None);
        };
        if let Some(sender) = entry.h2_for_request(Instant::now()) {
            return Step::Ready(sender);
        }
        if entry.h2.is_empty() {
            if let Some((h1, since)) = entry.h1_idle.pop() {
                state.idle_h1 -= 1;
                if let Some(share) = state.by_sandbox.get_mut(&key.sandbox) {
                    share.idle_h1 = share.idle_h1.saturating_sub(1);
                }
                return Step::Idle(h1, since);
            }
        }
        if !wait_failed {
            if let Some(dialing) = &entry.dialing {
                // `has_changed` fails once the dialling request has dropped its sender.
                if dialing.has_changed().is_ok() {
                    return Step::Wait(dialing.clone());
                }
            }
        }
        if entry.speaks_h2 == Some(false) {
            return Step::Dial(None);
        }
        let (gate, dialing) = watch::channel(false);
        entry.dialing = Some(dialing);
        Step::Dial(Some(gate))
    }

    /// A new connection for `key`; an HTTP/2 one is pooled for others to share.
    async fn dial_new(
        self: &Arc<Self>,
        key: &PoolKey,
        params: &DialParams<'_>,
    ) -> Result<Sender, ProxyError> {
        let connected = connect(params).await?;
        let mut state = self.lock();
        let entry = self.entry(&mut state, key);
        let h2 = match connected {
            Connected::H1(h1) => {
                if let Some(entry) = entry {
                    entry.speaks_h2 = Some(false);
                }
                return Ok(Sender::H1(h1));
            }
            Connected::H2(h2) => h2,
        };
        let streams = Arc::new(AtomicUsize::new(0));
        let slot = StreamSlot::take(&streams);
        if let Some(entry) = entry {
            entry.speaks_h2 = Some(true);
            // Past the cap the new connection serves its one request and closes.
            if entry.h2.len() < MAX_H2_PER_KEY {
                entry.h2.push(H2Conn {
                    sender: h2.clone(),
                    streams,
                    last_used: Instant::now(),
                });
            }
        }
        Ok(Sender::H2(h2, slot))
    }

    /// Gives back an HTTP/1 connection whose response has been read to the end.
    pub fn release_h1(self: &Arc<Self>, key: &PoolKey, sender: http1::SendRequest<CountingBody>) {
        if sender.is_closed() {
            return;
        }
        let mut state = self.lock();
        let workers = super::workers::count();
        let held = state
            .by_sandbox
            .get(&key.sandbox)
            .map_or(0, |share| share.idle_h1);
        if state.idle_h1 >= MAX_IDLE_H1_TOTAL * workers || held >= MAX_IDLE_H1_PER_SANDBOX * workers
        {
            return;
        }
        if let Some(entry) = self.entry(&mut state, key) {
            if entry.h1_idle.len() < MAX_IDLE_H1 {
                entry.h1_idle.push((sender, Instant::now()));
                state.idle_h1 += 1;
                state.add_to_share(&key.sandbox, |share| share.idle_h1 += 1);
            }
        }
    }

    /// The entry for `key`, made if there is room, and the reaper started with the first.
    fn entry<'a>(
        self: &Arc<Self>,
        state: &'a mut PoolState,
        key: &PoolKey,
    ) -> Option<&'a mut Entry> {
        if !state.entries.contains_key(key) {
            let workers = super::workers::count();
            let held = state
                .by_sandbox
                .get(&key.sandbox)
                .map_or(0, |share| share.keys);
            if state.entries.len() >= MAX_KEYS * workers || held >= MAX_KEYS_PER_SANDBOX * workers {
                return None;
            }
            state.entries.insert(key.clone(), Entry::default());
            state.add_to_share(&key.sandbox, |share| share.keys += 1);
        }
        if !state.reaper {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                state.reaper = true;
                runtime.spawn(reap(Arc::downgrade(self), self.idle_timeout));
            }
        }
        state.entries.get_mut(key)
    }

    /// Closes what has been unused for the idle timeout, and forgets closed connections.
    fn sweep(&self) {
        let now = Instant::now();
        let mut dead = Dead::default();
        {
            let mut state = self.lock();
            state.entries.retain(|_, entry| {
                entry.expire(now, self.idle_timeout, &mut dead);
                !entry.is_empty()
            });
            state.recount();
        }
        if !dead.h1.is_empty() || !dead.h2.is_empty() {
            debug!(
                h1 = dead.h1.len(),
                h2 = dead.h2.len(),
                "Closing unused upstream connections"
            );
        }
        drop(dead);
    }

    /// Connections pooled now: (HTTP/2, idle HTTP/1), for tests.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        state.entries.values().fold((0, 0), |(h2, h1), e| {
            (h2 + e.h2.len(), h1 + e.h1_idle.len())
        })
    }
}

/// Sweeps the pool every half idle timeout (at least every second, at most every 30 s)
/// until the pool is gone.
async fn reap(pool: Weak<UpstreamPool>, idle: Duration) {
    let every = (idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep();
    }
}

/// A new upstream connection, by the protocol the server chose.
enum Connected {
    H1(http1::SendRequest<CountingBody>),
    H2(http2::SendRequest<CountingBody>),
}

async fn connect(params: &DialParams<'_>) -> Result<Connected, ProxyError> {
    let tcp = dial(
        params.dst,
        params.route,
        params.connect_timeout,
        params.dialer,
    )
    .await?;
    let addr = SocketAddr::new(params.dst.ip().to_canonical(), params.dst.port());
    let name = ServerName::try_from(params.server_name.to_owned()).map_err(|_| {
        ProxyError::UpstreamRefused {
            addr,
            reason: format!("{:?} is not a valid TLS server name", params.server_name),
        }
    })?;
    let tls = tokio::time::timeout(
        params.handshake_timeout,
        tokio_rustls::TlsConnector::from(params.tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| ProxyError::UpstreamTimeout {
        addr,
        op: "TLS handshake",
        secs: params.handshake_timeout.as_secs(),
    })?
    .map_err(|source| ProxyError::UpstreamIo {
        addr,
        op: "TLS handshake",
        source,
    })?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    // Boxed: hyper's HTTP/2 client spawns a task per request whose future has room for
    // the whole connection, TLS state included; behind a pointer, each is 1.5 KiB less
    // to allocate and copy.
    let io = TokioIo::new(Box::new(tls));
    let http_err = |source| ProxyError::UpstreamHttp {
        addr,
        op: "HTTP handshake",
        source,
    };
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // The connection is shared: a few responses whose readers stall (each may
            // hold its stream window unread) must not use up the whole connection's
            // window and hold up every other request on it.
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .handshake(io)
            .await
            .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%addr, %error, "Upstream HTTP/2 connection ended");
            }
        });
        Ok(Connected::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%addr, %error, "Upstream HTTP/1 connection ended");
            }
        });
        Ok(Connected::H1(sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sandbox reaching many destinations fills its own share of the pool's keys;
    /// another sandbox's connections are still kept.
    #[tokio::test]
    async fn a_sandbox_fills_its_share_of_keys_not_the_pool() {
        let pool = Arc::new(UpstreamPool::new(Duration::from_secs(60)));
        let share = MAX_KEYS_PER_SANDBOX * super::super::workers::count();
        let mut state = pool.lock();
        for port in 0..share + 10 {
            let dst = SocketAddr::from(([192, 0, 2, 1], 1000 + port as u16));
            let key = PoolKey::new("greedy", dst, "a.example");
            let kept = pool.entry(&mut state, &key).is_some();
            assert_eq!(kept, port < share, "key {port} of {share}");
        }
        let other = PoolKey::new(
            "other",
            SocketAddr::from(([192, 0, 2, 2], 443)),
            "b.example",
        );
        assert!(pool.entry(&mut state, &other).is_some());
        // The shares are counted again from what is kept.
        state.recount();
        assert_eq!(state.by_sandbox["greedy"].keys, share);
        assert_eq!(state.by_sandbox["other"].keys, 1);
    }
}
