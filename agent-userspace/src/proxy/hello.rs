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

/// TLS alert `illegal_parameter` (47), fatal, as a plaintext record.
pub const ALERT_ILLEGAL_PARAMETER: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 47];

/// The `encrypted_client_hello` extension (RFC 9849): the hello carries another, encrypted
/// one, whose server name the proxy cannot read.
const EXTENSION_ECH: u16 = 0xfe0d;

/// Whether an extension type hides the server name: ECH, its drafts' code points
/// (`0xff02`, `0xfe08`..`0xfe0c`) and the older encrypted SNI (`0xffce`), which servers
/// that deployed them may still honour.
fn hides_server_name(extension: u16) -> bool {
    matches!(extension, 0xfe08..=EXTENSION_ECH | 0xff02 | 0xffce)
}

/// A parsed ClientHello and the raw bytes it came in.
#[derive(Debug)]
pub struct Hello {
    /// The SNI server name, if the client sent one.
    pub server_name: Option<String>,
    /// The hello carries an Encrypted Client Hello (or a GREASE one: they cannot be told
    /// apart): the server may act on a server name other than `server_name`.
    pub encrypted_client_hello: bool,
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
                // rustls has parsed the hello, so it is well formed; unreadable counts as
                // carrying one.
                let encrypted_client_hello = extension_types(&buffered)
                    .is_none_or(|types| types.iter().any(|&t| hides_server_name(t)));
                return Ok(Hello {
                    server_name,
                    encrypted_client_hello,
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

/// The extension types of the ClientHello at the start of `records` (TLS records as
/// read, the hello possibly spread over several), or `None` if they cannot be read.
fn extension_types(records: &[u8]) -> Option<Vec<u16>> {
    let u16_at = |b: &[u8], at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    let u24_at = |b: &[u8], at: usize| -> Option<usize> {
        Some(usize::from(*b.get(at)?) << 16 | usize::from(u16_at(b, at + 1)?))
    };
    // The handshake message, from the payloads of the handshake records that carry it.
    let mut message = Vec::new();
    let mut rest = records;
    while rest.first() == Some(&22) {
        let len = usize::from(u16_at(rest, 3)?);
        message.extend_from_slice(rest.get(5..5 + len)?);
        rest = &rest[5 + len..];
        if message.len() >= 4 && message.len() >= 4 + u24_at(&message, 1)? {
            break;
        }
    }
    if message.first() != Some(&1) {
        return None;
    }
    let body = message.get(4..4 + u24_at(&message, 1)?)?;
    // Version and random, then the session id, cipher suites and compression methods.
    let mut at = 2 + 32;
    at += 1 + usize::from(*body.get(at)?);
    at += 2 + usize::from(u16_at(body, at)?);
    at += 1 + usize::from(*body.get(at)?);
    let end = at + 2 + usize::from(u16_at(body, at)?);
    let extensions = body.get(at + 2..end)?;
    let mut types = Vec::new();
    let mut at = 0;
    while at < extensions.len() {
        types.push(u16_at(extensions, at)?);
        at += 4 + usize::from(u16_at(extensions, at + 2)?);
    }
    (at == extensions.len()).then_some(types)
}

/// `hello` (one record, as a rustls client writes it) with an extension added at the
/// end of its list, every length it sits in grown to match.
#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
pub(super) fn with_extension(hello: &[u8], kind: u16, data: &[u8]) -> Vec<u8> {
    let added = 4 + data.len();
    let mut out = hello.to_vec();
    let grow16 = |b: &mut [u8], at: usize| {
        let v = usize::from(u16::from_be_bytes([b[at], b[at + 1]])) + added;
        b[at..at + 2].copy_from_slice(&u16::try_from(v).unwrap().to_be_bytes());
    };
    grow16(&mut out, 3);
    let hs = usize::from(out[6]) << 16 | usize::from(out[7]) << 8 | usize::from(out[8]);
    let hs = (hs + added).to_be_bytes();
    out[6..9].copy_from_slice(&hs[hs.len() - 3..]);
    // The extensions' length: after version, random, session id, suites, compression.
    let mut at = 9 + 2 + 32;
    at += 1 + usize::from(out[at]);
    at += 2 + usize::from(u16::from_be_bytes([out[at], out[at + 1]]));
    at += 1 + usize::from(out[at]);
    grow16(&mut out, at);
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An outer Encrypted Client Hello extension's body (RFC 9849): type outer, HKDF-SHA256,
/// AES-128-GCM, a config id, an encapsulated key and an encrypted payload.
#[cfg(test)]
pub(super) fn ech_outer() -> Vec<u8> {
    let mut ech = vec![0, 0, 1, 0, 1, 7, 0, 32];
    ech.extend([0x42; 32]);
    ech.extend([0, 96]);
    ech.extend([0x17; 96]);
    ech
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
    async fn an_encrypted_client_hello_is_seen() {
        let plain = client_hello("api.example.com");
        let got = read_client_hello(&mut &plain[..]).await.unwrap();
        assert!(!got.encrypted_client_hello);
        assert!(!extension_types(&plain).unwrap().contains(&EXTENSION_ECH));
        let ech = with_extension(&plain, EXTENSION_ECH, &ech_outer());
        let got = read_client_hello(&mut &ech[..]).await.unwrap();
        assert_eq!(got.server_name.as_deref(), Some("api.example.com"));
        assert!(got.encrypted_client_hello);
        // The drafts' code points and the older encrypted SNI are taken for one too.
        for hiding in [0xfe08, 0xfe0c, 0xff02, 0xffce] {
            let old = with_extension(&plain, hiding, &ech_outer());
            assert!(
                read_client_hello(&mut &old[..])
                    .await
                    .unwrap()
                    .encrypted_client_hello,
                "{hiding:#x}"
            );
        }
        // Another extension added the same way is not taken for one.
        let other = with_extension(&plain, 0xfafa, &[]);
        assert!(
            !read_client_hello(&mut &other[..])
                .await
                .unwrap()
                .encrypted_client_hello
        );
        // The same hello split over two records.
        let body = &ech[5..];
        let mut split = Vec::new();
        for part in [&body[..100], &body[100..]] {
            split.extend([22, 3, 3]);
            split.extend(u16::try_from(part.len()).unwrap().to_be_bytes());
            split.extend_from_slice(part);
        }
        assert!(extension_types(&split).unwrap().contains(&EXTENSION_ECH));
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
