//! The upstream side: which addresses may be dialled, the TLS client configuration, and
//! the per-downstream-connection set of upstream HTTP connections.
//!
//! The proxy only ever dials the connection's original destination, the address the
//! sandbox itself asked the kernel for: it never resolves names, so a Host header
//! cannot steer it elsewhere. Addresses that reach the host or its network (loopback,
//! private, link-local, cloud metadata, ...) are refused unless the rule covers them
//! explicitly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::body::CountingBody;
use super::error::ProxyError;
use super::Route;

const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254);

/// Idle upstream HTTP/1 connections kept per downstream connection.
const MAX_IDLE_H1: usize = 4;

/// Why `ip` may not be dialled without the rule covering it explicitly, or `None` for an
/// ordinary public address. IPv4-mapped and NAT64 addresses are judged by the IPv4
/// address inside.
pub fn special_address(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return special_v4(Ipv4Addr::new(a, b, c, d));
            }
            if v6 == METADATA_V6 {
                Some("cloud metadata address")
            } else if v6.is_loopback() {
                Some("loopback address")
            } else if v6.is_unspecified() {
                Some("unspecified address")
            } else if v6.is_multicast() {
                Some("multicast address")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local address")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local) address")
            } else {
                None
            }
        }
    }
}

fn special_v4(v4: Ipv4Addr) -> Option<&'static str> {
    if v4 == METADATA_V4 {
        Some("cloud metadata address")
    } else if v4.is_loopback() {
        Some("loopback address")
    } else if v4.is_unspecified() || v4.octets()[0] == 0 {
        Some("unspecified address")
    } else if v4.is_private() {
        Some("private (RFC 1918) address")
    } else if v4.is_link_local() {
        Some("link-local address")
    } else if v4.is_multicast() {
        Some("multicast address")
    } else if v4.is_broadcast() {
        Some("broadcast address")
    } else {
        None
    }
}

/// The client TLS configuration for upstream servers: system roots plus the optional
/// extra CA bundle, ALPN `h2` and `http/1.1`.
pub fn client_config(
    provider: Arc<CryptoProvider>,
    extra_ca: Option<&Path>,
) -> Result<Arc<ClientConfig>, ProxyError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        warn!(%error, "Could not load some system root certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    debug!(added, ignored, "Loaded system root certificates");
    if let Some(path) = extra_ca {
        let bundle_err = |reason: String| ProxyError::UpstreamCa {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|source| ProxyError::Io {
            op: "reading upstream CA bundle",
            path: path.to_owned(),
            source,
        })?;
        let mut count = 0usize;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bundle_err(format!("invalid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bundle_err(format!("certificate {}: {e}", count + 1)))?;
            count += 1;
        }
        if count == 0 {
            return Err(bundle_err(
                "contains no `-----BEGIN CERTIFICATE-----` block".to_owned(),
            ));
        }
    }
    if roots.is_empty() {
        warn!("No trusted root certificates for upstream servers: every intercepted request will fail");
    }
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Opens a TCP connection to `dst`, refusing special addresses the rule does not cover.
pub async fn dial(
    dst: SocketAddr,
    route: &Route,
    connect_timeout: Duration,
    dialer: &super::dialer::Dialer,
) -> Result<TcpStream, ProxyError> {
    let ip = dst.ip().to_canonical();
    let addr = SocketAddr::new(ip, dst.port());
    if let Some(what) = special_address(ip) {
        if !(route.explicitly_covers)(ip) {
            return Err(ProxyError::UpstreamRefused {
                addr,
                reason: format!(
                    "{ip} is a {what}, not covered explicitly by rule `{}`",
                    route.rule_name
                ),
            });
        }
    }
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
    H2(http2::SendRequest<CountingBody>),
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self, Self::H2(_))
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
    pub dialer: &'a super::dialer::Dialer,
}

/// The upstream connections of one downstream connection: one HTTP/2 connection shared
/// by all requests, or HTTP/1 connections used one request at a time and kept for the
/// next. Dropped with the downstream connection, which closes them.
#[derive(Default)]
pub struct UpstreamPool {
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    h2: Option<http2::SendRequest<CountingBody>>,
    h1_idle: Vec<http1::SendRequest<CountingBody>>,
}

impl UpstreamPool {
    /// A connection ready for a request: a reused one when possible, else a new one.
    pub async fn acquire(&self, params: &DialParams<'_>) -> Result<Sender, ProxyError> {
        loop {
            let candidate = {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(h2) = &state.h2 {
                    if !h2.is_closed() {
                        return Ok(Sender::H2(h2.clone()));
                    }
                    state.h2 = None;
                }
                state.h1_idle.pop()
            };
            let Some(mut h1) = candidate else { break };
            if h1.is_closed() {
                continue;
            }
            // A returned connection becomes ready as soon as its connection task has
            // seen the end of the previous response; this wait is normally immediate.
            if let Ok(Ok(())) = tokio::time::timeout(params.connect_timeout, h1.ready()).await {
                return Ok(Sender::H1(h1));
            }
        }
        let sender = connect(params).await?;
        if let Sender::H2(h2) = &sender {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.h2 = Some(h2.clone());
        }
        Ok(sender)
    }

    /// Gives back an HTTP/1 connection whose response has been read to the end.
    pub fn release_h1(&self, sender: http1::SendRequest<CountingBody>) {
        if sender.is_closed() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.h1_idle.len() < MAX_IDLE_H1 {
            state.h1_idle.push(sender);
        }
    }
}

async fn connect(params: &DialParams<'_>) -> Result<Sender, ProxyError> {
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
    let io = TokioIo::new(tls);
    let http_err = |source| ProxyError::UpstreamHttp {
        addr,
        op: "HTTP handshake",
        source,
    };
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%addr, %error, "Upstream HTTP/2 connection ended");
            }
        });
        Ok(Sender::H2(sender))
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
        Ok(Sender::H1(sender))
    }
}

#[cfg(test)]
mod tests {
    use super::special_address;

    #[test]
    fn special_addresses() {
        let special = |s: &str| special_address(s.parse().unwrap_or_else(|_| [0, 0, 0, 0].into()));
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(special(ip).is_some(), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "203.0.113.5",
            "2001:db8::1",
            "2606:4700::1",
        ] {
            assert!(special(ip).is_none(), "{ip}");
        }
        assert_eq!(special("169.254.169.254"), Some("cloud metadata address"));
        assert_eq!(special("fd00:ec2::254"), Some("cloud metadata address"));
    }
}
