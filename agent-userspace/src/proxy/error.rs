//! [`ProxyError`]: what went wrong, and who failed.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::ca::CaError;
use crate::credentials::CredentialError;

/// Which side of the proxy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    /// The sandbox's client.
    Downstream,
    /// The server the sandbox wanted to reach.
    Upstream,
    /// The proxy itself (its configuration, CA or credentials).
    Proxy,
}

/// A proxy failure. Every message starts with who failed: `downstream client`,
/// `upstream server` or `proxy`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Reading from or writing to the sandbox client failed.
    #[error("downstream client {peer}: {op}: {source}")]
    DownstreamIo {
        peer: SocketAddr,
        op: &'static str,
        source: std::io::Error,
    },
    /// The sandbox client broke the protocol (not TLS, no server name, ...).
    #[error("downstream client {peer}: {reason}")]
    Downstream { peer: SocketAddr, reason: String },
    /// The sandbox client was too slow.
    #[error("downstream client {peer}: timed out after {secs} s while {op}")]
    DownstreamTimeout {
        peer: SocketAddr,
        op: &'static str,
        secs: u64,
    },
    /// Connecting to, or talking TLS with, the upstream server failed.
    #[error("upstream server {addr}: {op}: {source}")]
    UpstreamIo {
        addr: SocketAddr,
        op: &'static str,
        source: std::io::Error,
    },
    /// The upstream server's HTTP failed.
    #[error("upstream server {addr}: {op}: {source}")]
    UpstreamHttp {
        addr: SocketAddr,
        op: &'static str,
        source: hyper::Error,
    },
    /// The upstream server was too slow.
    #[error("upstream server {addr}: timed out after {secs} s while {op}")]
    UpstreamTimeout {
        addr: SocketAddr,
        op: &'static str,
        secs: u64,
    },
    /// The proxy refuses to dial this upstream address.
    #[error("upstream server {addr}: refused to connect: {reason}")]
    UpstreamRefused { addr: SocketAddr, reason: String },
    /// A file the proxy needs could not be read.
    #[error("proxy: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The extra upstream CA bundle is unusable.
    #[error("proxy: upstream_ca: {0}")]
    UpstreamCa(#[from] crate::net::TrustError),
    /// A configuration value is out of range.
    #[error("proxy: config field `proxy.{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    /// Building a TLS configuration failed.
    #[error("proxy: TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// The local certificate authority failed.
    #[error("proxy: certificate authority: {0}")]
    Ca(#[from] CaError),
    /// A credential could not be had.
    #[error("proxy: {0}")]
    Credential(#[from] CredentialError),
}

impl ProxyError {
    /// Who failed.
    pub fn party(&self) -> Party {
        match self {
            Self::DownstreamIo { .. }
            | Self::Downstream { .. }
            | Self::DownstreamTimeout { .. } => Party::Downstream,
            Self::UpstreamIo { .. }
            | Self::UpstreamHttp { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamRefused { .. } => Party::Upstream,
            Self::Io { .. }
            | Self::UpstreamCa(_)
            | Self::Config { .. }
            | Self::Tls(_)
            | Self::Ca(_)
            | Self::Credential(_) => Party::Proxy,
        }
    }
}
