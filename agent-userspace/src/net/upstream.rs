//! [`UpstreamOptions`]: how the daemon reaches servers outside the sandboxes (TLS trust and
//! the network namespace sockets come from), shared by the proxy, the DNS resolver's
//! upstream and the credential sources.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;

use super::dial::Dialer;
use super::tls::{client_config, TrustError};

/// Why the upstream options could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TLS trust is unusable.
    #[error("upstream_ca: {0}")]
    Trust(#[from] TrustError),
    /// The upstream network namespace could not be entered.
    #[error("upstream_netns {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where connections to outside servers come from, and which servers are trusted.
#[derive(Clone, Default)]
pub struct UpstreamOptions {
    /// TLS client configuration; `None`: the system roots. Users replace its ALPN list
    /// as their protocol needs.
    pub tls: Option<Arc<ClientConfig>>,
    /// Where connections come from; `None`: the daemon's own network namespace.
    pub dialer: Option<Arc<Dialer>>,
}

impl fmt::Debug for UpstreamOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamOptions")
            .field("tls", &self.tls.is_some())
            .field("dialer", &self.dialer)
            .finish()
    }
}

impl UpstreamOptions {
    /// The system roots plus `extra_ca`, and sockets from the network namespace at
    /// `netns` (the daemon's own when `None`).
    pub fn new(extra_ca: Option<&Path>, netns: Option<&Path>) -> Result<Self, UpstreamError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = client_config(provider, extra_ca)?;
        let dialer = match netns {
            Some(path) => Some(Arc::new(Dialer::in_netns(path).map_err(|source| {
                UpstreamError::Netns {
                    path: path.to_owned(),
                    source,
                }
            })?)),
            None => None,
        };
        Ok(Self {
            tls: Some(tls),
            dialer,
        })
    }
}
