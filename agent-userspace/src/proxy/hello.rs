//! Reading the TLS ClientHello without consuming it.
//!
//! The bytes are kept and also fed to a `rustls::server::Acceptor`, which parses the
//! hello (server name, ALPN) with rustls' own parser. The caller then replays the kept
//! bytes in front of the socket ([`super::io::PrefixedStream`]), so that either a TLS
//! server (intercept) or the real upstream (passthrough) sees the untouched hello.

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Bytes of ClientHello accepted at most. Real hellos, post-quantum key shares
/// included, stay well under this.
pub const MAX_HELLO_BYTES: usize = 32 * 1024;

/// TLS alert `unrecognized_name` (112), fatal, as a plaintext record: what a client
/// gets when its server name is missing or not allowed.
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// A parsed ClientHello and the raw bytes it came in.
#[derive(Debug)]
pub struct Hello {
    /// The SNI server name, if the client sent one.
    pub server_name: Option<String>,
    /// Everything read from the client so far, to be replayed.
    pub buffered: Vec<u8>,
}

/// Why no ClientHello could be had.
#[derive(Debug)]
pub enum HelloError {
    /// The client closed the connection before a complete hello.
    Closed,
    /// More than [`MAX_HELLO_BYTES`] without a complete hello.
    TooLarge,
    /// Not TLS, or a malformed hello; `alert` is the TLS alert to send back.
    NotTls { reason: String, alert: Vec<u8> },
    /// Reading from the client failed.
    Io(std::io::Error),
}

impl std::fmt::Display for HelloError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("closed the connection before a complete ClientHello"),
            Self::TooLarge => write!(f, "ClientHello larger than {MAX_HELLO_BYTES} bytes"),
            Self::NotTls { reason, .. } => write!(f, "not a valid TLS ClientHello: {reason}"),
            Self::Io(e) => write!(f, "reading the ClientHello: {e}"),
        }
    }
}

/// Reads from `stream` until a complete ClientHello has arrived. The caller bounds
/// this with its handshake timeout.
pub async fn read_client_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Hello, HelloError> {
    let mut acceptor = Acceptor::default();
    // Read straight into the buffer kept for the handshake (no read buffer in the
    // connection's future, which lives as long as the connection).
    let mut buffered = Vec::with_capacity(2048);
    loop {
        if buffered.capacity() - buffered.len() < 1024 {
            buffered.reserve(4096);
        }
        let start = buffered.len();
        let n = stream
            .read_buf(&mut buffered)
            .await
            .map_err(HelloError::Io)?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        if buffered.len() > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        let mut rest = &buffered[start..];
        while !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(0) => return Err(HelloError::TooLarge),
                Ok(_) => {}
                Err(e) => {
                    return Err(HelloError::NotTls {
                        reason: e.to_string(),
                        alert: Vec::new(),
                    })
                }
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let server_name = accepted.client_hello().server_name().map(str::to_owned);
                return Ok(Hello {
                    server_name,
                    buffered,
                });
            }
            Ok(None) => {}
            Err((err, mut alert)) => {
                let mut bytes = Vec::new();
                // Best effort: the alert is a courtesy to the client.
                let _ = alert.write_all(&mut bytes);
                return Err(HelloError::NotTls {
                    reason: err.to_string(),
                    alert: bytes,
                });
            }
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt as _;

    use super::*;

    /// The first flight of a real rustls client for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn server_name_is_parsed_and_bytes_kept_even_in_small_pieces() {
        let hello = client_hello("api.example.com");
        let (mut tx, mut rx) = tokio::io::duplex(16);
        let bytes = hello.clone();
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(7) {
                tx.write_all(piece).await.unwrap();
            }
            tx
        });
        let got = read_client_hello(&mut rx).await.unwrap();
        assert_eq!(got.server_name.as_deref(), Some("api.example.com"));
        assert_eq!(got.buffered, hello);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn ip_address_clients_send_no_server_name() {
        let hello = client_hello("192.0.2.1");
        let got = read_client_hello(&mut &hello[..]).await.unwrap();
        assert_eq!(got.server_name, None);
    }

    #[tokio::test]
    async fn plain_http_is_not_tls() {
        let mut req = &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..];
        let err = read_client_hello(&mut req).await.unwrap_err();
        assert!(matches!(err, HelloError::NotTls { .. }), "{err}");
        let mut short = &client_hello("a.example.com")[..20];
        assert!(matches!(
            read_client_hello(&mut short).await,
            Err(HelloError::Closed)
        ));
    }
}
