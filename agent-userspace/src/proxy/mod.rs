//! The proxy: what happens to a sandbox connection the kernel redirected to us.
//!
//! The daemon accepts each redirected connection, recovers its original destination and
//! calls [`Proxy::serve`] with the policy [`Route`] that redirected it. The proxy reads
//! the TLS ClientHello without consuming it ([`hello`]) and refuses, with no
//! certificate, a connection whose server name the route does not allow. Then either:
//!
//! - **passthrough**: the untouched bytes are relayed to the original destination;
//! - **intercept**: TLS is terminated with a leaf from the local [`CertAuthority`], each
//!   HTTP request is checked (Host = server name, method and path allowed, no
//!   upgrades; on a rule with `git:`, only git smart-HTTP requests, see [`git`]),
//!   stripped of client-supplied credentials and hop-by-hop headers, given
//!   the route's credential, and re-sent by hyper over verified TLS to the original
//!   destination, never anywhere else, on an upstream connection the sandbox's
//!   intercepted connections to that destination and server name share (see
//!   [`upstream`]).
//!
//! Every request, and every connection refused or ended before a request, produces one
//! [`ProxyRecord`] for the audit sink.
mod aws;
mod body;
mod ca;
mod error;
pub mod git;
mod h2head;
mod head;
mod held;
pub(crate) mod hello;
mod inject;
mod intercept;
mod io;
mod method_override;
mod passthrough;
mod range;
mod refused;
mod scrub;
mod session;
pub(crate) mod target;
mod upstream;
mod workers;

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderName;
use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

pub use ca::{CaError, CertAuthority, CA_CERT_FILE, CA_COMMON_NAME, CA_KEY_FILE};
pub use error::{Party, ProxyError};
pub use held::sandbox_share as held_bodies_share;
pub use scrub::MARKER as SCRUB_MARKER;
pub use workers::{configured_threads, threads_setting, Workers};

use crate::audit::{ProxyRecord, ProxyVerdict as Verdict, RecordKind, TlsMode};
use crate::credentials::{normalize_host, CredentialStore};
use crate::net::{self, Dialer};

/// Where the audit records go.
pub type AuditSink = Arc<dyn Fn(ProxyRecord) + Send + Sync>;

/// Asked right before a credential is added to a request: `Err(reason)` refuses the
/// request instead (e.g. while the audit trail cannot record it). Cheap: once per request.
pub type CredentialGate = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// One redirected connection, as the daemon hands it over.
#[derive(Debug)]
pub struct ConnInfo {
    /// Where the sandbox wanted to go (from the kernel).
    pub original_dst: SocketAddr,
    /// The sandbox client's address.
    pub peer: SocketAddr,
    /// Sandbox name.
    pub sandbox: String,
    /// Shared with the kernel connect audit record.
    pub connection_id: String,
    /// The policy rule that redirected it.
    pub route: Arc<Route>,
    /// The sandbox's requests in flight, shared by all its connections
    /// (`max_requests_per_sandbox` permits).
    pub requests: Arc<tokio::sync::Semaphore>,
    /// Bytes of the sandbox's form and JSON bodies read whole to be judged, shared by
    /// all its connections ([`held_bodies_share`]).
    pub held_bodies: Arc<tokio::sync::Semaphore>,
    /// Set by the daemon just before it closes the connection (quarantine, detach, a
    /// policy replaced): what it cuts short is recorded as its doing, not the client's.
    pub closing: Arc<std::sync::atomic::AtomicBool>,
}

/// `Route::host_allowed`: whether a server name is allowed.
pub type HostCheck = Box<dyn Fn(&str) -> bool + Send + Sync>;
/// `Route::request_allowed`: `Ok(())` or `Err(reason)` for (method, path-and-query).
pub type RequestCheck = Box<dyn Fn(&str, &str) -> Result<(), String> + Send + Sync>;
/// `Route::explicitly_covers`: whether the rule names this special address.
pub type AddressCheck = Box<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// What the policy rule that redirected a connection allows, as functions of the
/// connection's names and requests.
pub struct Route {
    /// The rule's name, for records and messages.
    pub rule_name: String,
    /// Relay bytes unchanged instead of intercepting.
    pub passthrough: bool,
    /// The credential to inject, by name (intercept only).
    pub credential: Option<String>,
    /// Whether a TLS server name / Host is allowed by the rule's `hosts`.
    pub host_allowed: HostCheck,
    /// Ok(()) or Err(short plain-text reason) for (method, path-and-query).
    pub request_allowed: RequestCheck,
    /// Whether dialing this upstream IP is explicitly covered by the rule (for loopback,
    /// link-local, private, metadata addresses).
    pub explicitly_covers: AddressCheck,
    /// Whether a static network in the rule's `to` is this address alone (`/32`,
    /// `/128`): what the proxy needs to dial an address of its own host.
    pub names_exactly: AddressCheck,
    /// The rule's `git:` block: when present, only git smart-HTTP requests of its
    /// repositories pass (after `request_allowed`), and pushes have their ref updates
    /// checked before anything is forwarded.
    pub git: Option<Arc<crate::policy::git::GitRule>>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("rule_name", &self.rule_name)
            .field("passthrough", &self.passthrough)
            .field("credential", &self.credential)
            .field("git", &self.git)
            .finish_non_exhaustive()
    }
}

/// The `proxy:` section of the daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Extra PEM CA bundle trusted for upstream servers, besides the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// Network namespace (e.g. `/var/run/netns/egress`) to dial upstream servers from;
    /// default: the daemon's own.
    pub upstream_netns: Option<PathBuf>,
    /// Seconds for a sandbox to send its ClientHello and finish the TLS handshake; also
    /// bounds the upstream TLS handshake. Default 10.
    pub handshake_secs: u64,
    /// Seconds for a sandbox to send a complete request header, counted from the header's
    /// first byte (HTTP/2: from the header block's first frame to its END_HEADERS);
    /// waiting for a request is `idle_secs`. Default 10.
    pub header_secs: u64,
    /// Seconds to connect to the upstream server. Default 10.
    pub connect_secs: u64,
    /// Seconds without traffic after which a connection is closed; also bounds the wait
    /// for an upstream response header, and how long an unused upstream connection is
    /// kept for reuse. Default 60.
    pub idle_secs: u64,
    /// Largest request header accepted, in bytes (at least 8192). Default 65536.
    pub max_header_bytes: usize,
    /// Scrub secrets from responses and refuse requests that carry one. Default true.
    /// `false` is for measuring what that costs only: it lets an origin hand the
    /// injected credential to the sandbox. UNSAFE.
    pub scrub: bool,
    /// Proxied connections one sandbox may have open at once; more are refused (and
    /// recorded) at once. Default 1024.
    pub max_connections_per_sandbox: usize,
    /// TLS handshakes (ClientHello included) one sandbox may have in progress; more wait
    /// up to `handshake_secs` for a turn, then are refused and recorded. Default 64.
    pub max_handshakes_per_sandbox: usize,
    /// Requests one sandbox may have in flight at once, over all its connections (HTTP/2
    /// streams included), from their head to the end of their answer; more are answered
    /// 503 and recorded. Default 256.
    pub max_requests_per_sandbox: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            upstream_ca: None,
            upstream_netns: None,
            handshake_secs: 10,
            header_secs: 10,
            connect_secs: 10,
            idle_secs: 60,
            max_header_bytes: 64 * 1024,
            scrub: true,
            max_connections_per_sandbox: 1024,
            max_handshakes_per_sandbox: 64,
            max_requests_per_sandbox: 256,
        }
    }
}

/// Server TLS configurations kept (per ALPN set), each for one server name.
const MAX_SERVER_CONFIGS: usize = 1024;
/// TLS 1.2 sessions remembered for resumption by session id (TLS 1.3 and TLS 1.2
/// clients that take tickets use tickets, which take no memory here).
const SESSION_CACHE_SIZE: usize = 1024;

/// A server TLS configuration for one server name, and the leaf it presents.
/// By server name: the leaf, its configuration, and when it was last handed out (a full
/// map loses the one used longest ago).
type ServerConfigs = HashMap<String, (Arc<CertifiedKey>, Arc<ServerConfig>, std::time::Instant)>;

struct Timeouts {
    handshake: Duration,
    header: Duration,
    connect: Duration,
    idle: Duration,
}

/// The proxy; one per daemon, shared by all connections.
pub struct Proxy {
    dialer: Arc<Dialer>,
    config: ProxyConfig,
    timeouts: Timeouts,
    ca: Arc<CertAuthority>,
    credentials: Arc<CredentialStore>,
    /// Header names the credential store sets, removed from every sandbox request.
    injected: Arc<[HeaderName]>,
    /// What is taken out of a sandbox request's trailers (made once, shared by requests).
    trailer_filter: body::TrailerFilter,
    upstream_tls: Arc<ClientConfig>,
    /// Upstream connections, shared by all intercepted connections.
    pool: Arc<upstream::UpstreamPool>,
    /// Server TLS configurations by server name: `[0]` offers HTTP/1.1 only, `[1]` also
    /// h2. Built once per name (and leaf), so that connections share them and with them
    /// the session cache and ticket keys.
    server_configs: Mutex<[ServerConfigs; 2]>,
    /// TLS session state shared by every server configuration: a sandbox client that
    /// reconnects can resume its session, which skips the certificate and its signature
    /// (the key exchange is still fresh).
    session_cache: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
    provider: Arc<CryptoProvider>,
    audit: AuditSink,
    credential_gate: Option<CredentialGate>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.config)
            .field("ca", &self.ca)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Checks the configuration and loads the upstream trust roots (system roots plus
    /// `upstream_ca`).
    pub fn new(
        config: ProxyConfig,
        ca: Arc<CertAuthority>,
        credentials: Arc<CredentialStore>,
        audit: Arc<dyn Fn(ProxyRecord) + Send + Sync>,
    ) -> Result<Self, ProxyError> {
        let secs = |field: &'static str, value: u64| {
            if (1..=3600).contains(&value) {
                Ok(Duration::from_secs(value))
            } else {
                Err(ProxyError::Config {
                    field,
                    reason: format!("{value} is out of range: use 1 to 3600 seconds"),
                })
            }
        };
        let timeouts = Timeouts {
            handshake: secs("handshake_secs", config.handshake_secs)?,
            header: secs("header_secs", config.header_secs)?,
            connect: secs("connect_secs", config.connect_secs)?,
            idle: secs("idle_secs", config.idle_secs)?,
        };
        // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
        if !(8192..=16 * 1024 * 1024).contains(&config.max_header_bytes) {
            return Err(ProxyError::Config {
                field: "max_header_bytes",
                reason: format!(
                    "{} is out of range: use 8192 to 16777216 bytes",
                    config.max_header_bytes
                ),
            });
        }
        for (field, value) in [
            (
                "max_connections_per_sandbox",
                config.max_connections_per_sandbox,
            ),
            (
                "max_handshakes_per_sandbox",
                config.max_handshakes_per_sandbox,
            ),
            ("max_requests_per_sandbox", config.max_requests_per_sandbox),
        ] {
            if !(1..=1 << 20).contains(&value) {
                return Err(ProxyError::Config {
                    field,
                    reason: format!("{value} is out of range: use 1 to 1048576"),
                });
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let upstream_tls =
            net::tls::client_config(provider.clone(), config.upstream_ca.as_deref())?;
        let dialer = match &config.upstream_netns {
            Some(ns) => Dialer::in_netns(ns).map_err(|e| ProxyError::Config {
                field: "upstream_netns",
                reason: format!("{}: {e}", ns.display()),
            })?,
            None => Dialer::default(),
        };
        let injected: Arc<[HeaderName]> = credentials.injected_header_names().into();
        Ok(Self {
            dialer: Arc::new(dialer),
            trailer_filter: {
                let injected = injected.clone();
                Arc::new(move |trailers| intercept::strip_request_trailers(trailers, &injected))
            },
            injected,
            config,
            ca,
            credentials,
            upstream_tls,
            pool: Arc::new(upstream::UpstreamPool::new(timeouts.idle)),
            timeouts,
            server_configs: Mutex::new([HashMap::new(), HashMap::new()]),
            session_cache: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
            ticketer: rustls::crypto::ring::Ticketer::new()?,
            provider,
            audit,
            credential_gate: None,
        })
    }

    /// The matcher over every known secret (perhaps none yet), or `None` when scrubbing
    /// is switched off (`proxy.scrub: false`) or no credential is configured.
    fn secret_matcher(&self) -> Option<Arc<crate::credentials::SecretMatcher>> {
        // Nothing to scrub where no credential is configured: no value can become known.
        if !self.config.scrub || self.credentials.is_empty() {
            return None;
        }
        // Even while no secret is known yet: one may become known (another request reads
        // or mints it) while a response streams, which then follows the latest matcher.
        Some(self.credentials.matcher())
    }

    /// The matcher over the secrets known at each call.
    fn latest_matcher(&self) -> scrub::LatestMatcher {
        let credentials = self.credentials.clone();
        Arc::new(move || credentials.matcher())
    }

    /// Refuses requests that would get a credential while `gate` says no.
    pub fn with_credential_gate(mut self, gate: CredentialGate) -> Self {
        self.credential_gate = Some(gate);
        self
    }

    /// Where upstream connections (and the DNS resolvers' upstream queries) come from.
    pub fn dialer(&self) -> Arc<Dialer> {
        self.dialer.clone()
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Closes a connection the daemon will not serve (a per-sandbox limit is reached)
    /// and records the refusal; `reason` says which limit.
    pub async fn refuse_connection(&self, mut stream: TcpStream, conn: ConnInfo, reason: String) {
        let reason = ProxyError::Downstream {
            peer: conn.peer,
            reason,
        };
        self.refuse(&mut stream, &conn, None, reason, &[], Instant::now())
            .await;
    }

    /// Records a connection to the proxy's port that is closed before it could be served
    /// (not redirected by the kernel, a sandbox without a route, a rule that is not a
    /// proxy rule): every refusal leaves a record, also those no sandbox policy decided.
    /// The record of a connection closed unserved.
    pub fn record_unserved(
        &self,
        sandbox: &str,
        rule_name: &str,
        connection_id: String,
        original_dst: std::net::SocketAddr,
        reason: String,
    ) {
        self.record_unserved_as(
            TlsMode::Intercept,
            sandbox,
            rule_name,
            connection_id,
            original_dst,
            reason,
        );
    }

    /// [`Proxy::record_unserved`] for a connection whose rule says how it is served.
    fn record_unserved_as(
        &self,
        mode: TlsMode,
        sandbox: &str,
        rule_name: &str,
        connection_id: String,
        original_dst: std::net::SocketAddr,
        reason: String,
    ) {
        let mut record = blank_record(
            RecordKind::Connection,
            sandbox.to_owned(),
            connection_id,
            rule_name.to_owned(),
            mode,
            original_dst,
            None,
        );
        record.verdict = Verdict::Deny;
        record.reason = Some(reason);
        (self.audit)(record);
    }

    /// Handles one redirected connection to its end. Failures are reported as records
    /// and debug logs; nothing is returned.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, conn: ConnInfo) {
        let unrecorded = Unrecorded::new(&self, &conn);
        self.serve_limited(stream, conn, None, unrecorded).await;
    }

    /// [`Proxy::serve`] holding `handshake_permit` (the sandbox's turn to handshake)
    /// until the TLS handshake is done, and `unrecorded` until a stage that records the
    /// connection's end takes over.
    pub async fn serve_limited(
        self: Arc<Self>,
        stream: TcpStream,
        conn: ConnInfo,
        handshake_permit: Option<tokio::sync::OwnedSemaphorePermit>,
        unrecorded: Unrecorded,
    ) {
        let started = Instant::now();
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(conn);
        // Boxed, like the TLS handshake and the relay: a connection's future is sized for
        // the largest state it can be in, for as long as it lives, and the ClientHello's
        // read, timer and refusals are large and over within the first round trip.
        let Some((stream, sni)) = Box::pin(self.admit(stream, &conn, started)).await else {
            // Refused and recorded.
            unrecorded.disarm();
            return;
        };
        if conn.route.passthrough {
            drop(handshake_permit);
            // The relay records its end, however it comes.
            unrecorded.disarm();
            Box::pin(passthrough::relay(self, stream, conn, sni, started)).await;
        } else {
            intercept::intercept(
                self,
                stream,
                conn,
                sni,
                started,
                handshake_permit,
                unrecorded,
            )
            .await;
        }
    }

    /// Reads the ClientHello and checks its server name against the route: the stream
    /// (the hello put back in front) and the normalised name, or `None` once the
    /// connection is refused and recorded.
    async fn admit(
        &self,
        mut stream: TcpStream,
        conn: &ConnInfo,
        started: Instant,
    ) -> Option<(io::PrefixedStream<TcpStream>, String)> {
        let hello = tokio::time::timeout(
            self.timeouts.handshake,
            hello::read_client_hello(&mut stream),
        )
        .await;
        let hello = match hello {
            Ok(Ok(hello)) => hello,
            Ok(Err(e)) => {
                let alert = match &e {
                    hello::HelloError::NotTls { alert, .. } => alert.clone(),
                    _ => Vec::new(),
                };
                let reason = ProxyError::Downstream {
                    peer: conn.peer,
                    reason: e.to_string(),
                };
                self.refuse(&mut stream, conn, None, reason, &alert, started)
                    .await;
                return None;
            }
            Err(_) => {
                let reason = ProxyError::DownstreamTimeout {
                    peer: conn.peer,
                    op: "waiting for the TLS ClientHello",
                    secs: self.timeouts.handshake.as_secs(),
                };
                self.refuse(&mut stream, conn, None, reason, &[], started)
                    .await;
                return None;
            }
        };
        let Some(sni) = hello.server_name.as_deref().map(normalize_host) else {
            let reason = ProxyError::Downstream {
                peer: conn.peer,
                reason: "sent no TLS server name (SNI); connections by IP address are not \
                         proxied"
                    .to_owned(),
            };
            self.refuse(
                &mut stream,
                conn,
                None,
                reason,
                &hello::ALERT_UNRECOGNIZED_NAME,
                started,
            )
            .await;
            return None;
        };
        let refusal = if !(conn.route.host_allowed)(&sni) {
            Some((
                format!(
                    "server name {sni} is not allowed by rule `{}`",
                    conn.route.rule_name
                ),
                &hello::ALERT_UNRECOGNIZED_NAME,
            ))
        } else if conn.route.passthrough && hello.encrypted_client_hello {
            // The server reads the encrypted inner hello and may serve the name in it,
            // which the proxy cannot see to judge.
            Some((
                format!(
                    "sent an Encrypted Client Hello: the server name it is for is hidden, so \
                     it is not passed through (rule `{}`; clients that send one, GREASE \
                     included, need an intercept rule)",
                    conn.route.rule_name
                ),
                &hello::ALERT_ILLEGAL_PARAMETER,
            ))
        } else {
            None
        };
        if let Some((reason, alert)) = refusal {
            let reason = ProxyError::Downstream {
                peer: conn.peer,
                reason,
            };
            self.refuse(&mut stream, conn, Some(sni), reason, alert, started)
                .await;
            return None;
        }
        debug!(connection_id = %conn.connection_id, %sni, passthrough = conn.route.passthrough, "Server name allowed");
        Some((io::PrefixedStream::new(hello.buffered, stream), sni))
    }

    /// Ends a connection at the TLS stage: sends `alert` (if any), closes, records a
    /// denial.
    async fn refuse(
        &self,
        stream: &mut TcpStream,
        conn: &ConnInfo,
        sni: Option<String>,
        reason: ProxyError,
        alert: &[u8],
        started: Instant,
    ) {
        debug!(connection_id = %conn.connection_id, %reason, "Connection refused at the TLS stage");
        let mut bytes_out = 0;
        if !alert.is_empty() {
            let sent = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(alert).await?;
                stream.shutdown().await
            })
            .await;
            if matches!(sent, Ok(Ok(()))) {
                bytes_out = alert.len() as u64;
            }
        }
        let mode = if conn.route.passthrough {
            TlsMode::Passthrough
        } else {
            TlsMode::Intercept
        };
        let mut record = self.record(conn, mode, sni.as_deref(), RecordKind::Connection);
        record.verdict = Verdict::Deny;
        record.reason = Some(reason.to_string());
        record.bytes_out = bytes_out;
        record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        (self.audit)(record);
    }

    /// A record for `conn` with the connection's fields filled in and verdict allow.
    fn record(
        &self,
        conn: &ConnInfo,
        tls_mode: TlsMode,
        sni: Option<&str>,
        kind: RecordKind,
    ) -> ProxyRecord {
        blank_record(
            kind,
            conn.sandbox.clone(),
            conn.connection_id.clone(),
            conn.route.rule_name.clone(),
            tls_mode,
            conn.original_dst,
            sni.map(str::to_owned),
        )
    }

    /// The TLS server configuration for intercepted connections to `server_name` (already
    /// allowed by the route): TLS 1.2 and 1.3, ALPN `h2` (unless `h2` is false) and
    /// `http/1.1`, `leaf` for that name and nothing for any other. One configuration per
    /// name and leaf, shared by its connections; session resumption by ticket (TLS 1.3
    /// and 1.2) or session id (TLS 1.2), never 0-RTT data. rustls resumes a session only
    /// for the server name it was made for, and the name is checked against the route
    /// before any handshake, resumed or not.
    fn downstream_tls(
        &self,
        server_name: &str,
        leaf: Arc<CertifiedKey>,
        h2: bool,
    ) -> Result<Arc<ServerConfig>, ProxyError> {
        // Entries are inserted whole; a panic elsewhere cannot leave one half-made.
        let configs = || {
            self.server_configs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if let Some((key, config, used)) = configs()[usize::from(h2)].get_mut(server_name) {
            if Arc::ptr_eq(key, &leaf) {
                *used = std::time::Instant::now();
                return Ok(config.clone());
            }
        }
        let resolver = Arc::new(intercept::FixedCert::new(server_name, leaf.clone()));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = if h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        config.session_storage = self.session_cache.clone();
        config.ticketer = self.ticketer.clone();
        // One ticket is enough to resume the next connection, and each costs an
        // encryption and a record in every full handshake.
        config.send_tls13_tickets = 1;
        config.max_early_data_size = 0;
        let config = Arc::new(config);
        let mut all = configs();
        let map = &mut all[usize::from(h2)];
        if map.len() >= MAX_SERVER_CONFIGS && !map.contains_key(server_name) {
            // The one used longest ago goes, not all: names in use keep theirs.
            evict_least_used(map, |(_, _, used)| *used);
        }
        map.insert(
            server_name.to_owned(),
            (leaf, config.clone(), std::time::Instant::now()),
        );
        Ok(config)
    }
}

/// Removes the entry of `cache` used longest ago (`used` says when each was).
fn evict_least_used<V>(cache: &mut HashMap<String, V>, used: impl Fn(&V) -> std::time::Instant) {
    let oldest = cache
        .iter()
        .min_by_key(|(_, v)| used(v))
        .map(|(name, _)| name.clone());
    if let Some(oldest) = oldest {
        cache.remove(&oldest);
    }
}

/// A record of a connection or request with nothing yet known of what it did (allowed,
/// until a refusal says otherwise).
fn blank_record(
    kind: RecordKind,
    sandbox: String,
    connection_id: String,
    rule_name: String,
    tls_mode: TlsMode,
    original_dst: std::net::SocketAddr,
    sni: Option<String>,
) -> ProxyRecord {
    ProxyRecord {
        kind,
        sandbox,
        connection_id,
        rule_name,
        tls_mode,
        original_dst,
        sni,
        method: None,
        host: None,
        path: None,
        query_keys: None,
        status: None,
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0,
        credential: None,
        verdict: Verdict::Allow,
        reason: None,
        git: None,
        scrubbed: 0,
        secret: None,
        forwarded: false,
        credential_use: None,
    }
}

/// A redirected connection's record should the daemon close it (a policy replaced, a
/// detach, a quarantine, the daemon stopping) before it reaches a stage that records its
/// own end: while it waits for a TLS handshake turn, its ClientHello or its TLS handshake.
/// Dropped armed, it records the connection as closed unserved.
pub struct Unrecorded {
    proxy: Arc<Proxy>,
    sandbox: String,
    rule_name: String,
    connection_id: String,
    original_dst: std::net::SocketAddr,
    mode: TlsMode,
    armed: bool,
}

impl Unrecorded {
    pub fn new(proxy: &Arc<Proxy>, conn: &ConnInfo) -> Self {
        Self {
            proxy: proxy.clone(),
            sandbox: conn.sandbox.clone(),
            rule_name: conn.route.rule_name.clone(),
            connection_id: conn.connection_id.clone(),
            original_dst: conn.original_dst,
            mode: if conn.route.passthrough {
                TlsMode::Passthrough
            } else {
                TlsMode::Intercept
            },
            armed: true,
        }
    }

    /// A stage that records the connection's end has it now (or has recorded it).
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Unrecorded {
    fn drop(&mut self) {
        if self.armed {
            self.proxy.record_unserved_as(
                self.mode,
                &self.sandbox,
                &self.rule_name,
                std::mem::take(&mut self.connection_id),
                self.original_dst,
                "closed by the daemon before its TLS handshake was done (the sandbox's \
                 policy was replaced, it was detached or quarantined, or the daemon stopped)"
                    .to_owned(),
            );
        }
    }
}
