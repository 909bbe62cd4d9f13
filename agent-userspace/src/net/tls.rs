//! The TLS trust every outgoing HTTPS connection of the daemon shares: upstream origins
//! behind the proxy, and the credential stores and APIs the daemon talks to itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use tracing::{debug, warn};

/// Why a client TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The extra CA bundle could not be read.
    #[error("reading CA bundle {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The extra CA bundle is unusable.
    #[error("CA bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    /// rustls refused the configuration.
    #[error("TLS client setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// The client TLS configuration for servers the daemon dials: system roots plus the
/// optional extra CA bundle, ALPN `h2` and `http/1.1`.
pub fn client_config(
    provider: Arc<CryptoProvider>,
    extra_ca: Option<&Path>,
) -> Result<Arc<ClientConfig>, TrustError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        warn!(%error, "Could not load some system root certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    debug!(added, ignored, "Loaded system root certificates");
    if let Some(path) = extra_ca {
        let bundle_err = |reason: String| TrustError::Bundle {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|source| TrustError::Read {
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
