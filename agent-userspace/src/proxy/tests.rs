//! End-to-end tests of [`Proxy::serve`] on loopback: a local HTTPS origin with a test CA
//! made here, the proxy on accepted sockets, and a rustls + hyper client.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, HOST, LOCATION, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

use super::*;
use crate::credentials::{CredentialStore, RawCredentials};

const NAME: &str = "api.example.com";
/// Allowed by the route but not among the credential's hosts.
const OTHER: &str = "other.example.com";
const TOKEN: &str = "ghp-test-token-0123";
const EXPECTED_AUTH: &str = "Bearer ghp-test-token-0123";
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut).await.unwrap()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------------------
// The origin
// ---------------------------------------------------------------------------------------

struct Origin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    ca_pem: String,
}

/// The open `/tail` response's sender: `/feed` writes the `Authorization` it received
/// into it (an origin that streams a request log).
type Tail = Arc<std::sync::Mutex<Option<http_body_util::channel::Sender<Bytes>>>>;

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `/tail` and `/feed` (see [`Tail`]), else [`echo`].
async fn origin_service(
    req: Request<Incoming>,
    tail: Tail,
) -> Result<Response<OriginBody>, Infallible> {
    match req.uri().path() {
        "/tail" => {
            let (mut tx, body) = http_body_util::channel::Channel::new(8);
            let _ = tx.send_data(Bytes::from_static(b"log:\n")).await;
            *tail.lock().unwrap() = Some(tx);
            Ok(Response::new(body.boxed()))
        }
        "/feed" => {
            let sent = req
                .headers()
                .get(AUTHORIZATION)
                .map(|v| Bytes::copy_from_slice(v.as_bytes()))
                .unwrap_or_default();
            let taken = tail.lock().unwrap().take();
            if let Some(mut tx) = taken {
                let _ = tx.send_data(sent).await;
                let _ = tx.send_data(Bytes::from_static(b"\nend\n")).await;
            }
            Ok(Response::new(
                Full::new(Bytes::from_static(b"fed\n")).boxed(),
            ))
        }
        "/held-range" => {
            // Answers once `/feed` sent what it received, with the byte range asked of
            // it (and all of it in a header: stored object metadata).
            let (tx, mut fed) = http_body_util::channel::Channel::new(8);
            *tail.lock().unwrap() = Some(tx);
            let value = match fed.frame().await {
                Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
                _ => Bytes::new(),
            };
            let asked = req
                .headers()
                .get(http::header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes="))
                .and_then(|v| v.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
            let len = value.len();
            let (first, last) = asked.unwrap_or((0, len.saturating_sub(1)));
            let last = last.min(len.saturating_sub(1));
            Ok(Response::builder()
                .status(StatusCode::PARTIAL_CONTENT)
                .header(
                    http::header::CONTENT_RANGE,
                    format!("bytes {first}-{last}/{len}"),
                )
                .header(
                    "x-stored",
                    http::HeaderValue::from_maybe_shared(value.clone()).unwrap(),
                )
                .body(Full::new(value.slice(first..=last)).boxed())
                .unwrap())
        }
        "/range-stream" => {
            // The byte range asked at once, its first bytes now, the rest what `/feed`
            // sends (its length unknown: `*`).
            let (mut tx, body) = http_body_util::channel::Channel::new(8);
            let _ = tx.send_data(Bytes::from_static(b"ab")).await;
            *tail.lock().unwrap() = Some(tx);
            Ok(Response::builder()
                .status(StatusCode::PARTIAL_CONTENT)
                .header(http::header::CONTENT_RANGE, "bytes 0-3/*")
                .body(body.boxed())
                .unwrap())
        }
        _ => echo(req).await.map(|r| r.map(|b| b.boxed())),
    }
}

/// An HTTPS origin on 127.0.0.1 for NAME and OTHER, signed by a CA made here. It echoes
/// what it received: whether Authorization was the expected credential, Host, path and
/// body size. `/redirect` answers 302; `/slow...` answers after half a second.
async fn start_origin(h2: bool) -> Origin {
    start_origin_named(h2, &[NAME, OTHER]).await
}

/// [`start_origin`] with a certificate for `names` only.
async fn start_origin_named(h2: bool, names: &[&str]) -> Origin {
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test origin CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let served = requests.clone();
    let tail: Tail = Arc::default();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let served = served.clone();
            let tail = tail.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    served.fetch_add(1, Ordering::SeqCst);
                    origin_service(req, tail.clone())
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Origin {
        addr,
        accepted,
        requests,
        ca_pem: ca.pem(),
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let auths: Vec<_> = req.headers().get_all(AUTHORIZATION).iter().collect();
    let auth = match auths.as_slice() {
        [] => "none",
        [one] if *one == EXPECTED_AUTH => "expected",
        [_] => "other",
        _ => "several",
    };
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if path == "/reason" {
        // An origin whose error's status line quotes the credential it was sent.
        let sent = req
            .headers()
            .get(AUTHORIZATION)
            .map_or(&b""[..], |v| v.as_bytes());
        let phrase = [&b"bad credential "[..], sent].concat();
        let mut response = Response::new(Full::new(Bytes::from_static(b"denied\n")));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        response
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::try_from(phrase).unwrap());
        return Ok(response);
    }
    if path == "/te-gzip" {
        // An origin that gzips the credential it was sent as a transfer coding, which
        // the sandbox's client could undo itself.
        let sent = req
            .headers()
            .get(AUTHORIZATION)
            .map_or(&b""[..], |v| v.as_bytes());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, sent).unwrap();
        return Ok(Response::builder()
            .header(TRANSFER_ENCODING, "gzip, chunked")
            .body(Full::new(Bytes::from(gz.finish().unwrap())))
            .unwrap());
    }
    if path.starts_with("/grpc-gzip") {
        // A gRPC origin that sends back the credential it was sent, in a message it
        // compresses when the client asked for gzip (or always, with `?anyway`), and
        // says what it was asked in a header.
        let sent = req
            .headers()
            .get(AUTHORIZATION)
            .map_or(&b""[..], |v| v.as_bytes());
        let asked = req
            .headers()
            .get("grpc-accept-encoding")
            .map_or(&b""[..], |v| v.as_bytes())
            .to_vec();
        let compress = path.ends_with("?anyway") || asked.windows(4).any(|w| w == b"gzip");
        let (flag, message, encoding) = if compress {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, sent).unwrap();
            (1u8, gz.finish().unwrap(), "gzip")
        } else {
            (0u8, sent.to_vec(), "identity")
        };
        let mut framed = vec![flag];
        framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(&message);
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-encoding", encoding)
            .header("x-asked", asked)
            .body(Full::new(Bytes::from(framed)))
            .unwrap());
    }
    if path == "/te-echo" {
        // An origin that names the credential it was sent as a transfer coding.
        let sent = req
            .headers()
            .get(AUTHORIZATION)
            .map_or(&b""[..], |v| v.as_bytes());
        let coding = [sent, &b", chunked"[..]].concat();
        return Ok(Response::builder()
            .header(TRANSFER_ENCODING, coding)
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap());
    }
    if path == "/cookie" {
        // An origin that opens a session for the credential it was sent.
        return Ok(Response::builder()
            .header("set-cookie", "session=opened-for-the-credential; Secure")
            .header("x-kept", "yes")
            .header(
                "x-vault-wrap-ttl-seen",
                req.headers().contains_key("x-vault-wrap-ttl").to_string(),
            )
            .body(Full::new(Bytes::from_static(b"ok\n")))
            .unwrap());
    }
    if path == "/big" {
        // More than the proxy's and the client's socket buffers hold.
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; 48 << 20]))));
    }
    if path == "/redirect" {
        return Ok(Response::builder()
            .status(StatusCode::FOUND)
            .header(LOCATION, "https://elsewhere.example.net/next")
            .body(Full::new(Bytes::from_static(b"moved\n")))
            .unwrap());
    }
    let version = req.version();
    let destination = req
        .headers()
        .get("destination")
        .map(|d| format!("destination={}\n", d.to_str().unwrap_or("?")))
        .unwrap_or_default();
    let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
    let text = format!(
        "auth={auth}\nhost={host}\npath={path}\nbody={}\nversion={version:?}\n{destination}",
        body.unwrap_or(usize::MAX)
    );
    Ok(Response::new(Full::new(Bytes::from(text))))
}

// ---------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Spec {
    passthrough: bool,
    covers_loopback: bool,
}

const INTERCEPT: Spec = Spec {
    passthrough: false,
    covers_loopback: true,
};

/// The connections served, as the daemon keeps them to close them.
type ServedConns =
    Arc<std::sync::Mutex<Vec<(tokio::task::AbortHandle, Arc<std::sync::atomic::AtomicBool>)>>>;

struct Harness {
    addr: SocketAddr,
    records: mpsc::UnboundedReceiver<ProxyRecord>,
    ca_pem: String,
    proxy: Arc<Proxy>,
    served: ServedConns,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Closes every connection as the daemon does (a quarantine, a detach).
    fn close_all(&self) {
        for (task, closing) in self.served.lock().unwrap().drain(..) {
            closing.store(true, Ordering::SeqCst);
            task.abort();
        }
    }

    /// Marks every connection closing without ending its task: an HTTP/2 stream's task
    /// still running after the daemon closed its connection.
    fn mark_closing(&self) {
        for (_, closing) in self.served.lock().unwrap().iter() {
            closing.store(true, Ordering::SeqCst);
        }
    }

    async fn record(&mut self) -> ProxyRecord {
        let record = tokio::time::timeout(Duration::from_secs(5), self.records.recv())
            .await
            .unwrap()
            .unwrap();
        let text = format!("{record:?}");
        assert!(!text.contains(TOKEN), "secret in record: {text}");
        record
    }
}

/// From the daemon's own namespace, an address of the host is dialled only where the
/// rule names it alone: covering it (a wider network, an `answers` entry) is not enough.
#[test]
fn the_hosts_own_address_needs_a_rule_naming_it_alone() {
    let dialer = crate::net::Dialer::default();
    let dst = SocketAddr::from(([127, 0, 0, 1], 443));
    let mut r = route(INTERCEPT);
    r.explicitly_covers = Box::new(|_| true);
    r.names_exactly = Box::new(|_| false);
    let refused = super::upstream::check_dial(dst, &r, &dialer).unwrap_err();
    assert!(
        refused.to_string().contains("an address of this host"),
        "{refused}"
    );
    r.names_exactly = Box::new(|ip| ip == IpAddr::from([127, 0, 0, 1]));
    assert_eq!(super::upstream::check_dial(dst, &r, &dialer).unwrap(), dst);
}

fn route(spec: Spec) -> Route {
    Route {
        rule_name: "test-rule".to_owned(),
        passthrough: spec.passthrough,
        credential: Some("github".to_owned()),
        host_allowed: Box::new(|name| name == NAME || name == OTHER),
        request_allowed: Box::new(|method, path| {
            if path.starts_with("/forbidden") {
                Err("path /forbidden is not allowed by rule test-rule".to_owned())
            } else if path.starts_with("/post-only") && method != "POST" {
                Err(format!(
                    "{method} is not allowed on /post-only by rule test-rule"
                ))
            } else {
                Ok(())
            }
        }),
        explicitly_covers: Box::new(move |ip| {
            spec.covers_loopback && ip == IpAddr::from([127, 0, 0, 1])
        }),
        names_exactly: Box::new(move |ip| {
            spec.covers_loopback && ip == IpAddr::from([127, 0, 0, 1])
        }),
        git: None,
    }
}

async fn start_proxy(dst: SocketAddr, origin_ca_pem: &str, spec: Spec) -> Harness {
    start_proxy_with(dst, origin_ca_pem, ProxyConfig::default(), move |_| {
        ("sbx", spec)
    })
    .await
}

/// A proxy with `config` (its CA and handshake timeout set here) whose `n`-th accepted
/// connection (from 1) comes from the sandbox and through the rule `conn(n)` says.
/// An intercepting proxy with short header and idle timers, for the timer tests.
async fn start_timed_proxy(origin: &Origin, header_secs: u64, idle_secs: u64) -> Harness {
    let config = ProxyConfig {
        header_secs,
        idle_secs,
        ..ProxyConfig::default()
    };
    start_proxy_with(origin.addr, &origin.ca_pem, config, |_| ("sbx", INTERCEPT)).await
}

async fn start_proxy_with(
    dst: SocketAddr,
    origin_ca_pem: &str,
    config: ProxyConfig,
    conn: impl Fn(u64) -> (&'static str, Spec) + Send + 'static,
) -> Harness {
    start_proxy_gated(dst, origin_ca_pem, config, conn, None).await
}

/// [`start_proxy_with`] with a credential gate.
async fn start_proxy_gated(
    dst: SocketAddr,
    origin_ca_pem: &str,
    config: ProxyConfig,
    conn: impl Fn(u64) -> (&'static str, Spec) + Send + 'static,
    gate: Option<super::CredentialGate>,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(CertAuthority::load_or_create(dir.path().join("ca")).unwrap());
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let origin_ca = dir.path().join("origin-ca.pem");
    std::fs::write(&origin_ca, origin_ca_pem).unwrap();
    let raw: RawCredentials = serde_yaml_ng::from_str(&format!(
        "github:\n  source: {{ file: {} }}\n  inject: {{ header: Authorization, format: \"Bearer {{}}\" }}\n  hosts: [{NAME}]\n",
        token.display()
    ))
    .unwrap();
    let credentials = Arc::new(CredentialStore::from_config(&raw).unwrap());
    let config = ProxyConfig {
        upstream_ca: Some(origin_ca),
        handshake_secs: 5,
        ..config
    };
    let (tx, records) = mpsc::unbounded_channel();
    let audit: AuditSink = Arc::new(move |record| {
        let _ = tx.send(record);
    });
    let mut proxy = Proxy::new(config, ca.clone(), credentials, audit).unwrap();
    if let Some(gate) = gate {
        proxy = proxy.with_credential_gate(gate);
    }
    let proxy = Arc::new(proxy);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = proxy.clone();
    let served: ServedConns = Arc::default();
    let open = served.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        // Each sandbox's requests in flight, as the daemon keeps them.
        let mut requests: HashMap<&'static str, Arc<tokio::sync::Semaphore>> = HashMap::new();
        while let Ok((stream, peer)) = listener.accept().await {
            n += 1;
            let (sandbox, spec) = conn(n);
            let max = serving.config().max_requests_per_sandbox;
            let conn = ConnInfo {
                original_dst: dst,
                peer,
                sandbox: sandbox.to_owned(),
                connection_id: format!("conn-{n}"),
                route: Arc::new(route(spec)),
                requests: requests
                    .entry(sandbox)
                    .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(max)))
                    .clone(),
                held_bodies: crate::proxy::held_bodies_share(),
                closing: Arc::default(),
            };
            let closing = conn.closing.clone();
            let task = tokio::spawn(serving.clone().serve(stream, conn));
            open.lock().unwrap().push((task.abort_handle(), closing));
        }
    });
    Harness {
        addr,
        records,
        ca_pem: ca.ca_pem(),
        proxy,
        served,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

fn client_config(trust_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trust_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    trust_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(client_config(trust_pem, alpn))
        .connect(name, tcp)
        .await
}

async fn h1_client(
    addr: SocketAddr,
    name: &str,
    trust_pem: &str,
) -> http1::SendRequest<Full<Bytes>> {
    let tls = tls_connect(addr, name, trust_pem, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (sender, conn) = http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    sender
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

fn request(
    method: Method,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send(sender: &mut http1::SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    sender.ready().await.unwrap();
    let response = sender.send_request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get(sender: &mut http1::SendRequest<Full<Bytes>>, host: &str, path: &str) -> Reply {
    send(sender, request(Method::GET, host, path, &[], "")).await
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn credential_is_injected_and_client_authorization_replaced() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;

        let reply = get(&mut client, NAME, "/repos/x?token=abc&page=2").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body.contains("auth=expected\n"), "{}", reply.body);
        assert!(
            reply
                .body
                .contains(&format!("host={NAME}:{}\n", origin.addr.port())),
            "{}",
            reply.body
        );
        assert!(
            reply.body.contains("path=/repos/x?token=abc&page=2\n"),
            "{}",
            reply.body
        );
        // The origin offers h2, so the proxy speaks HTTP/2 upstream.
        assert!(reply.body.contains("version=HTTP/2.0"), "{}", reply.body);
        let record = h.record().await;
        assert_eq!(record.kind, RecordKind::Request);
        assert_eq!(record.tls_mode, TlsMode::Intercept);
        assert_eq!(record.verdict, Verdict::Allow);
        assert_eq!(record.status, Some(200));
        assert_eq!(record.credential.as_deref(), Some("github"));
        assert_eq!(record.sni.as_deref(), Some(NAME));
        assert_eq!(record.host.as_deref(), Some(NAME));
        assert_eq!(record.method.as_deref(), Some("GET"));
        assert_eq!(record.path.as_deref(), Some("/repos/x"));
        assert_eq!(record.query_keys.as_deref(), Some("token=&page="));
        assert_eq!(record.sandbox, "sbx");
        assert_eq!(record.rule_name, "test-rule");
        assert_eq!(record.original_dst, origin.addr);
        assert_eq!(record.bytes_out, reply.body.len() as u64);
        assert_eq!(record.reason, None);

        let reply = send(
            &mut client,
            request(
                Method::POST,
                NAME,
                "/upload",
                &[
                    ("authorization", "Bearer sandbox-own-token"),
                    ("proxy-authorization", "Basic eA=="),
                ],
                "hello",
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body.contains("auth=expected\n"), "{}", reply.body);
        assert!(reply.body.contains("body=5\n"), "{}", reply.body);
        let record = h.record().await;
        assert_eq!(record.bytes_in, 5);
        assert_eq!(record.method.as_deref(), Some("POST"));

        // Both requests went over one upstream connection.
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn credentials_are_refused_while_the_gate_is_closed() {
    within(async {
        let origin = start_origin(true).await;
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate_open = open.clone();
        let gate: super::CredentialGate = Arc::new(move || {
            if gate_open.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("the audit log cannot be written".to_owned())
            }
        });
        let mut h = start_proxy_gated(
            origin.addr,
            &origin.ca_pem,
            ProxyConfig::default(),
            |_| ("sbx", INTERCEPT),
            Some(gate),
        )
        .await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;

        let reply = get(&mut client, NAME, "/repos/x").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            reply.body.contains("the audit log cannot be written"),
            "{}",
            reply.body
        );
        assert!(!reply.body.contains(TOKEN));
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.status, Some(503));
        assert_eq!(record.credential, None);
        assert_eq!(
            record.reason.as_deref(),
            Some("the audit log cannot be written")
        );
        assert_eq!(
            origin.accepted.load(Ordering::SeqCst),
            0,
            "nothing was sent"
        );

        open.store(true, Ordering::SeqCst);
        let reply = get(&mut client, NAME, "/repos/x").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body.contains("auth=expected\n"), "{}", reply.body);
        assert_eq!(h.record().await.credential.as_deref(), Some("github"));
    })
    .await;
}

#[tokio::test]
async fn an_origin_reason_phrase_is_not_sent_back() {
    within(async {
        let origin = start_origin(false).await;
        let h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let response = client
            .send_request(request(Method::GET, NAME, "/reason", &[], ""))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // hyper's client hands a non-standard phrase over as this extension; the
        // standard one ("Unauthorized") is not.
        let phrase = response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert!(
            phrase.is_none(),
            "{:?}",
            phrase.map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned())
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"denied\n");
    })
    .await;
}

/// gRPC message compression is not asked for, and an answer compressed anyway (its
/// messages hold bytes no scan reads, which the client undoes) is refused.
#[tokio::test]
async fn grpc_messages_compressed_anyway_are_refused() {
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let accepts = [("grpc-accept-encoding", "gzip, deflate")];
        // Asked for none: the message comes back plain, scrubbed.
        let response = client
            .send_request(request(Method::GET, NAME, "/grpc-gzip", &accepts, ""))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-asked"], "identity");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains(TOKEN), "{body:?}");
        h.record().await;
        // Compressed anyway: refused.
        let response = client
            .send_request(request(
                Method::GET,
                NAME,
                "/grpc-gzip?anyway",
                &accepts,
                "",
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("grpc-encoding"), "{body}");
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.status, Some(502));
    })
    .await;
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_refused() {
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, NAME, "/te-gzip").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.body);
        assert!(reply.body.contains("Transfer-Encoding"), "{}", reply.body);
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.status, Some(502));
        // The refusal does not repeat a coding the origin made up (the credential).
        let reply = get(&mut client, NAME, "/te-echo").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.body);
        let lower = reply.body.to_ascii_lowercase();
        assert!(
            !lower.contains(&TOKEN.to_ascii_lowercase()),
            "{}",
            reply.body
        );
        let record = h.record().await;
        assert!(
            !format!("{record:?}")
                .to_ascii_lowercase()
                .contains(&TOKEN.to_ascii_lowercase()),
            "{record:?}"
        );
        // Control: the same origin's plain answers pass.
        assert_eq!(get(&mut client, NAME, "/").await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn http2_downstream_to_http1_upstream_reuses_the_connection() {
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"h2", b"http/1.1"])
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        for i in 0..3 {
            let req = Request::builder()
                .uri(format!("https://{NAME}/item/{i}"))
                .header(AUTHORIZATION, "Bearer sandbox")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = client.send_request(req).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8(body.to_vec()).unwrap();
            assert!(body.contains("auth=expected\n"), "{body}");
            assert!(
                body.contains(&format!("host={NAME}:{}\n", origin.addr.port())),
                "{body}"
            );
            assert!(body.contains("version=HTTP/1.1"), "{body}");
            let record = h.record().await;
            assert_eq!(record.status, Some(200));
            assert_eq!(record.path, Some(format!("/item/{i}")));
        }
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn host_other_than_sni_is_misdirected() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, OTHER, "/").await;
        assert_eq!(reply.status, StatusCode::MISDIRECTED_REQUEST);
        assert!(
            reply.body.contains("does not match TLS server name"),
            "{}",
            reply.body
        );
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.status, Some(421));
        assert_eq!(record.credential, None);
        // Case and a trailing dot are ignored; a port in Host is not forwarded: the
        // origin is told the port the connection was made to (origins may route on it).
        let reply = get(&mut client, "API.example.com.:8443", "/").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let forwarded = format!("host={NAME}:{}\n", origin.addr.port());
        assert!(reply.body.contains(&forwarded), "{}", reply.body);
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn disallowed_path_is_forbidden_with_the_reason() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, NAME, "/forbidden/thing?x=1").await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(
            reply.body,
            "path /forbidden is not allowed by rule test-rule\n"
        );
        assert_eq!(
            reply.headers.get("content-type").unwrap(),
            "text/plain; charset=utf-8"
        );
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.status, Some(403));
        assert_eq!(
            record.reason.as_deref(),
            Some("path /forbidden is not allowed by rule test-rule")
        );
        // Nothing reached the origin.
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn a_secret_first_known_while_a_response_streams_is_scrubbed_from_it() {
    within(async {
        let origin = start_origin(true).await;
        let h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        // No secret is known yet when the stream opens (on the host the credential is
        // not sent to).
        assert!(h.proxy.credentials.matcher().is_empty());
        let mut watcher = h1_client(h.addr, OTHER, &h.ca_pem).await;
        let stream = watcher
            .send_request(request(Method::GET, OTHER, "/tail", &[], ""))
            .await
            .unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        // Another request reads the credential (first use) and has it sent to the origin,
        // which writes it into the open stream.
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let fed = send(&mut client, request(Method::GET, NAME, "/feed", &[], "")).await;
        assert_eq!(fed.status, StatusCode::OK);
        let got = stream.into_body().collect().await.unwrap().to_bytes();
        let got = String::from_utf8_lossy(&got);
        assert!(got.ends_with("\nend\n"), "{got:?}");
        assert!(!got.contains(TOKEN), "secret reached the sandbox: {got:?}");
        assert!(got.contains("[egressd:scrubbed]"), "{got:?}");
    })
    .await;
}

/// A byte range is widened by the longest secret known when it is asked; one first known
/// before its answer (a credential read for another request, which the origin stores)
/// may be longer: the answer is refused, not cut to pieces of the secret that pass.
#[tokio::test]
async fn a_secret_first_known_while_a_byte_range_is_asked_ends_its_answer() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        assert!(h.proxy.credentials.matcher().is_empty());
        let mut watcher = h1_client(h.addr, OTHER, &h.ca_pem).await;
        let range = [("range", "bytes=0-3")];
        let asked = tokio::spawn(watcher.send_request(request(
            Method::GET,
            OTHER,
            "/held-range",
            &range,
            "",
        )));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let fed = send(&mut client, request(Method::GET, NAME, "/feed", &[], "")).await;
        assert_eq!(fed.status, StatusCode::OK);
        let answer = asked.await.unwrap().unwrap();
        let status = answer.status();
        let stored = answer.headers().get("x-stored").cloned();
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{stored:?} {body}");
        assert!(body.contains("ask again"), "{body}");
        let records = [h.record().await, h.record().await];
        assert!(
            records
                .iter()
                .any(|r| r.status == Some(502) && r.verdict == Verdict::Deny),
            "{records:?}"
        );
    })
    .await;
}

/// The same while the answer streams: a secret first known after the head, longer than
/// the margin, ends the body rather than pass cut at its edge.
#[tokio::test]
async fn a_secret_first_known_while_a_byte_range_streams_ends_it() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        assert!(h.proxy.credentials.matcher().is_empty());
        let mut watcher = h1_client(h.addr, OTHER, &h.ca_pem).await;
        let range = [("range", "bytes=0-3")];
        let answer = watcher
            .send_request(request(Method::GET, OTHER, "/range-stream", &range, ""))
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::PARTIAL_CONTENT);
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let fed = send(&mut client, request(Method::GET, NAME, "/feed", &[], "")).await;
        assert_eq!(fed.status, StatusCode::OK);
        let got = answer.into_body().collect().await;
        assert!(got.is_err(), "the range streamed on: {got:?}");
        // The proxy's refusal, recorded as one (not as the upstream failing).
        let mut cut = None;
        for _ in 0..3 {
            let record = h.record().await;
            if record.path.as_deref() == Some("/range-stream") {
                cut = Some(record);
                break;
            }
        }
        let cut = cut.unwrap();
        assert_eq!(cut.verdict, Verdict::Deny);
        let reason = cut.reason.unwrap_or_default();
        assert!(
            reason.starts_with("proxy: response body ended: a secret longer"),
            "{reason}"
        );
    })
    .await;
}

/// Where no credential is configured no value can become known: responses pass as the
/// origin sent them (no forced identity encoding, no range checks).
#[test]
fn nothing_is_scrubbed_where_no_credential_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(CertAuthority::load_or_create(dir.path().join("ca")).unwrap());
    let audit: AuditSink = Arc::new(|_| {});
    let none: RawCredentials = serde_yaml_ng::from_str("{}").unwrap();
    let empty = Arc::new(CredentialStore::from_config(&none).unwrap());
    let proxy = Proxy::new(ProxyConfig::default(), ca.clone(), empty, audit.clone()).unwrap();
    assert!(proxy.secret_matcher().is_none());
    // With one configured, even before its value is read, responses are scanned.
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let one: RawCredentials = serde_yaml_ng::from_str(&format!(
        "c:\n  source: {{ file: {} }}\n  inject: {{ header: X-Key }}\n  hosts: [{NAME}]\n",
        token.display()
    ))
    .unwrap();
    let one = Arc::new(CredentialStore::from_config(&one).unwrap());
    let proxy = Proxy::new(ProxyConfig::default(), ca, one, audit).unwrap();
    assert!(proxy.secret_matcher().is_some_and(|m| m.is_empty()));
}

#[tokio::test]
async fn a_request_the_daemon_cuts_short_is_recorded_as_its_doing() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        // Positive control: a client that goes away is recorded as such.
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let waiting = client.send_request(request(Method::GET, NAME, "/slow", &[], ""));
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(waiting);
        drop(client);
        let r = h.record().await;
        let reason = r.reason.unwrap_or_default();
        assert!(reason.starts_with("client aborted"), "{reason}");
        // The daemon closing the connection while the origin is still answering.
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let waiting =
            tokio::spawn(client.send_request(request(Method::GET, NAME, "/slow", &[], "")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.close_all();
        assert!(waiting.await.unwrap().is_err());
        let r = h.record().await;
        let reason = r.reason.unwrap_or_default();
        assert!(reason.starts_with("closed by the daemon"), "{reason}");
        assert_eq!(origin.requests.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// A request still running when the daemon closes its connection (an HTTP/2 stream's
/// task outlives the connection's) is not sent: refused, recorded, the origin untouched.
#[tokio::test]
async fn nothing_is_sent_once_the_daemon_closes_the_connection() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        // Positive control: served on the same connection before.
        let reply = send(&mut client, request(Method::GET, NAME, "/", &[], "")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(h.record().await.status, Some(200));
        let sent = origin.requests.load(Ordering::SeqCst);
        h.mark_closing();
        let reply = send(&mut client, request(Method::GET, NAME, "/", &[], "")).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        let r = h.record().await;
        let reason = r.reason.unwrap_or_default();
        assert!(reason.starts_with("closed by the daemon"), "{reason}");
        assert!(reason.contains("not sent"), "{reason}");
        assert_eq!(origin.requests.load(Ordering::SeqCst), sent);
    })
    .await;
}

#[tokio::test]
async fn sessions_opened_for_the_credential_stay_with_the_proxy() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = send(
            &mut client,
            request(
                Method::GET,
                NAME,
                "/cookie",
                &[("x-vault-wrap-ttl", "60s")],
                "",
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            reply.headers.get("set-cookie").is_none(),
            "{:?}",
            reply.headers
        );
        assert_eq!(reply.headers.get("x-kept").unwrap(), "yes");
        // A wrapped answer (a token that unwraps to it) is never asked for.
        assert_eq!(reply.headers.get("x-vault-wrap-ttl-seen").unwrap(), "false");
        assert_eq!(h.record().await.status, Some(200));
    })
    .await;
}

#[tokio::test]
async fn trace_and_lower_case_methods_are_refused() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        for method in ["TRACE", "trace", "Track"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let reply = send(&mut client, request(method, NAME, "/", &[], "")).await;
            assert_eq!(reply.status, StatusCode::FORBIDDEN);
            let record = h.record().await;
            assert_eq!(record.verdict, Verdict::Deny);
            assert!(
                record.reason.as_deref().unwrap_or("").contains("TRACE"),
                "{record:?}"
            );
        }
        // A method not in upper case: judged as written, some origins would run it
        // upper-cased, as another method.
        for method in ["get", "post", "Delete", "pROPFIND"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let reply = send(&mut client, request(method, NAME, "/", &[], "")).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST);
            let record = h.record().await;
            assert_eq!(record.verdict, Verdict::Deny);
            assert!(
                record
                    .reason
                    .as_deref()
                    .unwrap_or("")
                    .contains("upper case"),
                "{record:?}"
            );
        }
        assert_eq!(origin.requests.load(Ordering::SeqCst), 0);
        // Positive control: the same method in upper case is judged as the rule says.
        let reply = send(&mut client, request(Method::GET, NAME, "/", &[], "")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn upgrades_are_refused() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = send(
            &mut client,
            request(
                Method::GET,
                NAME,
                "/socket",
                &[
                    (UPGRADE.as_str(), "websocket"),
                    (CONNECTION.as_str(), "Upgrade"),
                ],
                "",
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(reply.body, "upgrades are not allowed\n");
        assert_eq!(h.record().await.verdict, Verdict::Deny);
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn redirects_come_back_unfollowed() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, NAME, "/redirect").await;
        assert_eq!(reply.status, StatusCode::FOUND);
        assert_eq!(
            reply.headers.get(LOCATION).unwrap(),
            "https://elsewhere.example.net/next"
        );
        assert_eq!(reply.body, "moved\n");
        let record = h.record().await;
        assert_eq!(record.status, Some(302));
        assert_eq!(record.verdict, Verdict::Allow);
    })
    .await;
}

#[tokio::test]
async fn credential_goes_only_to_its_hosts() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, OTHER, &h.ca_pem).await;
        let reply = send(
            &mut client,
            request(
                Method::GET,
                OTHER,
                "/",
                &[("authorization", "Bearer sandbox")],
                "",
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        // Neither the credential (not for this host) nor the sandbox's own header.
        assert!(reply.body.contains("auth=none\n"), "{}", reply.body);
        let record = h.record().await;
        assert_eq!(record.credential, None);
        assert_eq!(record.sni.as_deref(), Some(OTHER));
    })
    .await;
}

fn alert_of(err: &std::io::Error) -> Option<rustls::AlertDescription> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// A connection that completes its handshake and closes without a request still leaves
/// a record, on either protocol; the origin is never dialled.
#[tokio::test]
async fn a_connection_closed_before_any_request_is_recorded() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
            let mut tls = tls_connect(h.addr, NAME, &h.ca_pem, &[alpn]).await.unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut tls).await.unwrap();
            drop(tls);
            let record = h.record().await;
            assert_eq!(record.kind, RecordKind::Connection);
            assert_eq!(record.verdict, Verdict::Allow);
            assert_eq!(record.sni.as_deref(), Some("api.example.com"));
            let reason = record.reason.unwrap_or_default();
            assert!(reason.contains("closed before any request"), "{reason}");
        }
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn server_name_not_allowed_gets_no_certificate() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let err = tls_connect(h.addr, "evil.example.com", &h.ca_pem, &[b"http/1.1"])
            .await
            .unwrap_err();
        assert_eq!(
            alert_of(&err),
            Some(rustls::AlertDescription::UnrecognisedName),
            "{err}"
        );
        let record = h.record().await;
        assert_eq!(record.kind, RecordKind::Connection);
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.sni.as_deref(), Some("evil.example.com"));
        let reason = record.reason.unwrap();
        assert!(reason.starts_with("downstream client"), "{reason}");
        assert!(
            reason.contains("not allowed by rule `test-rule`"),
            "{reason}"
        );
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn missing_server_name_or_plain_http_is_refused() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        // rustls sends no SNI for an IP address.
        let err = tls_connect(h.addr, "127.0.0.1", &h.ca_pem, &[])
            .await
            .unwrap_err();
        assert_eq!(
            alert_of(&err),
            Some(rustls::AlertDescription::UnrecognisedName),
            "{err}"
        );
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.sni, None);
        assert!(record.reason.unwrap().contains("no TLS server name"));

        let mut tcp = TcpStream::connect(h.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut tcp,
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        )
        .await
        .unwrap();
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert!(record
            .reason
            .unwrap()
            .contains("not a valid TLS ClientHello"));
    })
    .await;
}

#[tokio::test]
async fn passthrough_refuses_an_encrypted_client_hello() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    within(async {
        let origin = start_origin(true).await;
        let spec = Spec {
            passthrough: true,
            covers_loopback: true,
        };
        let mut h = start_proxy(origin.addr, &origin.ca_pem, spec).await;
        // Control: the same client hello without the extension is passed through.
        let mut client = h1_client(h.addr, NAME, &origin.ca_pem).await;
        let reply = get(&mut client, NAME, "/control").await;
        assert_eq!(reply.status, StatusCode::OK);
        drop(client);
        assert_eq!(h.record().await.verdict, Verdict::Allow);

        let mut conn = rustls::ClientConnection::new(
            client_config(&origin.ca_pem, &[b"http/1.1"]),
            ServerName::try_from(NAME).unwrap(),
        )
        .unwrap();
        let mut plain = Vec::new();
        conn.write_tls(&mut plain).unwrap();
        let hello = super::hello::with_extension(&plain, 0xfe0d, &super::hello::ech_outer());
        let mut tcp = TcpStream::connect(h.addr).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, super::hello::ALERT_ILLEGAL_PARAMETER);
        let record = h.record().await;
        assert_eq!(record.kind, RecordKind::Connection);
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.sni.as_deref(), Some(NAME));
        let reason = record.reason.unwrap();
        assert!(reason.contains("Encrypted Client Hello"), "{reason}");
        // The origin saw the control's connection only.
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn passthrough_relays_to_the_origin_untouched() {
    within(async {
        let origin = start_origin(true).await;
        let spec = Spec {
            passthrough: true,
            covers_loopback: true,
        };
        let mut h = start_proxy(origin.addr, &origin.ca_pem, spec).await;
        // The client trusts the origin's CA, not ours: it talks TLS with the origin.
        let mut client = h1_client(h.addr, NAME, &origin.ca_pem).await;
        let reply = send(
            &mut client,
            request(
                Method::GET,
                NAME,
                "/p?q=1",
                &[("authorization", "Bearer sandbox-own")],
                "",
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        // Not replaced, not stripped: the proxy did not touch the request.
        assert!(reply.body.contains("auth=other\n"), "{}", reply.body);
        assert!(reply.body.contains("path=/p?q=1\n"), "{}", reply.body);
        drop(client);
        let record = h.record().await;
        assert_eq!(record.kind, RecordKind::Connection);
        assert_eq!(record.tls_mode, TlsMode::Passthrough);
        assert_eq!(record.verdict, Verdict::Allow);
        assert_eq!(record.sni.as_deref(), Some(NAME));
        assert_eq!(record.credential, None);
        assert!(record.bytes_in > 200, "{record:?}");
        assert!(record.bytes_out > reply.body.len() as u64, "{record:?}");

        // Our CA is not involved: a client trusting only it fails.
        assert!(tls_connect(h.addr, NAME, &h.ca_pem, &[]).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn loopback_upstream_not_covered_is_refused() {
    within(async {
        let origin = start_origin(true).await;
        let spec = Spec {
            passthrough: false,
            covers_loopback: false,
        };
        let mut h = start_proxy(origin.addr, &origin.ca_pem, spec).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, NAME, "/").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert!(reply.body.starts_with("upstream server"), "{}", reply.body);
        assert!(reply.body.contains("loopback"), "{}", reply.body);
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.status, Some(502));
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 0);

        let spec = Spec {
            passthrough: true,
            covers_loopback: false,
        };
        let mut h = start_proxy(origin.addr, &origin.ca_pem, spec).await;
        assert!(tls_connect(h.addr, NAME, &origin.ca_pem, &[])
            .await
            .is_err());
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert!(record.reason.unwrap().contains("loopback"));
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn unreachable_upstream_gives_502_naming_upstream() {
    within(async {
        let origin = start_origin(true).await;
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let mut h = start_proxy(closed, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, NAME, "/").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert!(
            reply
                .body
                .starts_with(&format!("upstream server {closed}: connecting")),
            "{}",
            reply.body
        );
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Allow);
        assert_eq!(record.status, Some(502));
    })
    .await;
}

#[tokio::test]
async fn upstream_with_untrusted_certificate_gives_502() {
    within(async {
        let origin = start_origin(true).await;
        let stranger = start_origin(true).await;
        // The proxy trusts `stranger`'s CA only, so `origin`'s certificate fails.
        let mut h = start_proxy(origin.addr, &stranger.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, NAME, "/").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert!(reply.body.contains("TLS handshake"), "{}", reply.body);
        assert_eq!(h.record().await.status, Some(502));
    })
    .await;
}

/// A certificate from a trusted CA, but for another name, is refused as an untrusted
/// one is: the credential is never sent to a server that has not proved the name.
#[tokio::test]
async fn upstream_certificate_for_another_name_gives_502() {
    within(async {
        let origin = start_origin_named(true, &["elsewhere.example"]).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, NAME, "/").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert!(reply.body.contains("TLS handshake"), "{}", reply.body);
        assert_eq!(h.record().await.status, Some(502));
        assert_eq!(origin.requests.load(Ordering::SeqCst), 0);
        // Positive control: the same CA, a certificate for the name.
        let origin = start_origin_named(true, &[NAME]).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        assert_eq!(get(&mut client, NAME, "/").await.status, StatusCode::OK);
        assert_eq!(h.record().await.status, Some(200));
        assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// A request with a body, whatever its method (an origin may answer without reading the
/// body and then read it as a request of its own), goes on an HTTP/1 connection that is
/// not used again; bodiless requests share one.
#[tokio::test]
async fn a_request_with_a_body_gets_an_upstream_connection_of_its_own() {
    within(async {
        let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE];
        for method in methods {
            let origin = start_origin(false).await;
            let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
            let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
            for _ in 0..2 {
                assert_eq!(
                    get(&mut client, NAME, "/plain").await.status,
                    StatusCode::OK
                );
                h.record().await;
            }
            assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
            let with_body = request(method.clone(), NAME, "/smuggle", &[], "GET /x HTTP/1.1\r\n");
            let reply = send(&mut client, with_body).await;
            assert_eq!(reply.status, StatusCode::OK, "{method}: {}", reply.body);
            h.record().await;
            assert_eq!(
                get(&mut client, NAME, "/after").await.status,
                StatusCode::OK
            );
            h.record().await;
            // The body's request reused the idle connection; the one after it needed a
            // new one.
            assert_eq!(origin.accepted.load(Ordering::SeqCst), 2, "{method}");
            assert_eq!(origin.requests.load(Ordering::SeqCst), 4, "{method}");
        }
    })
    .await;
}

#[tokio::test]
async fn upstream_connections_are_shared_by_downstream_connections() {
    within(async {
        for h2 in [true, false] {
            let origin = start_origin(h2).await;
            let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
            // One after the other, then two at once: one upstream connection for HTTP/2;
            // for HTTP/1, one per request in flight.
            for _ in 0..2 {
                let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
                let reply = get(&mut client, NAME, "/seq").await;
                assert!(reply.body.contains("auth=expected\n"), "{}", reply.body);
                assert_eq!(h.record().await.status, Some(200));
            }
            assert_eq!(origin.accepted.load(Ordering::SeqCst), 1, "h2: {h2}");
            assert_eq!(h.proxy.pool.counts(), (usize::from(h2), usize::from(!h2)));
            let mut a = h1_client(h.addr, NAME, &h.ca_pem).await;
            let mut b = h1_client(h.addr, NAME, &h.ca_pem).await;
            let (ra, rb) = tokio::join!(get(&mut a, NAME, "/a"), get(&mut b, NAME, "/b"));
            assert_eq!((ra.status, rb.status), (StatusCode::OK, StatusCode::OK));
            assert!(ra.body.contains("auth=expected\n"), "{}", ra.body);
            assert!(rb.body.contains("auth=expected\n"), "{}", rb.body);
            let accepted = origin.accepted.load(Ordering::SeqCst);
            if h2 {
                assert_eq!(accepted, 1);
            } else {
                assert!((1..=2).contains(&accepted), "{accepted}");
            }
            assert_eq!(origin.requests.load(Ordering::SeqCst), 4);
        }
    })
    .await;
}

#[tokio::test]
async fn busy_http2_upstream_connections_get_company() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"h2"])
            .await
            .unwrap();
        let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        // Slow responses keep their requests in flight on the upstream connection.
        let n = upstream::MAX_STREAMS_PER_H2 + 1;
        let mut slow = Vec::new();
        for i in 0..n {
            let req = Request::builder()
                .uri(format!("https://{NAME}/slow/{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            slow.push(tokio::spawn(client.clone().send_request(req)));
        }
        while origin.requests.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // 65 requests at once on a cold pool: one waits for another's dial, not 65 dials.
        assert_eq!(h.proxy.pool.counts(), (2, 0));
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 2);
        for response in slow {
            let response = response.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(String::from_utf8_lossy(&body).contains("auth=expected\n"));
            assert_eq!(h.record().await.status, Some(200));
        }
        // Both stay pooled; new requests go to the first again.
        let req = Request::builder()
            .uri(format!("https://{NAME}/after"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = client.clone().send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// A refused upload still streaming in (its body drained after the answer) keeps its
/// turn among the sandbox's requests until the drain ends: refused uploads cannot be held
/// open beyond the sandbox's share.
#[tokio::test]
async fn a_refused_upload_being_drained_keeps_its_turn() {
    within(async {
        let origin = start_origin(true).await;
        let config = ProxyConfig {
            max_requests_per_sandbox: 2,
            ..ProxyConfig::default()
        };
        let mut h =
            start_proxy_with(origin.addr, &origin.ca_pem, config, |_| ("sbx", INTERCEPT)).await;
        let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"h2"])
            .await
            .unwrap();
        let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut senders = Vec::new();
        for i in 0..2 {
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(8);
            tx.send_data(Bytes::from_static(b"part")).await.unwrap();
            let req = Request::builder()
                .method(Method::POST)
                .uri(format!("https://{NAME}/forbidden/{i}"))
                .body(body.boxed())
                .unwrap();
            let response = client.clone().send_request(req).await.unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            assert_eq!(h.record().await.status, Some(403));
            // The upload goes on: its body is being drained.
            senders.push(tx);
        }
        let get = |i: usize| {
            let req = Request::builder()
                .uri(format!("https://{NAME}/after/{i}"))
                .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
                .unwrap();
            client.clone().send_request(req)
        };
        let refused = get(0).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        let record = h.record().await;
        assert!(
            record
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("proxy.max_requests_per_sandbox"),
            "{record:?}"
        );
        // An upload refused for being past the sandbox's share is not drained (nothing
        // would count it): its stream is reset, and its sender finds the body dropped.
        let (mut over, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
        over.send_data(Bytes::from_static(b"part")).await.unwrap();
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{NAME}/forbidden/over"))
            .body(body.boxed())
            .unwrap();
        let response = client.clone().send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        h.record().await;
        // (A drain would read 64 MiB; the flow-control windows hold a few at most.)
        let mut sent = 0usize;
        while over
            .send_data(Bytes::from(vec![b'x'; 16 * 1024]))
            .await
            .is_ok()
        {
            sent += 16 * 1024;
            assert!(
                sent < 8 * 1024 * 1024,
                "the refused upload is still being read"
            );
        }
        // The uploads end: their drains end, their turns come back.
        drop(senders);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let response = get(1).await.unwrap();
            let status = response.status();
            h.record().await;
            if status == StatusCode::OK {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{status}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_sandboxs_requests_in_flight_are_bounded_over_its_connections() {
    within(async {
        let origin = start_origin(true).await;
        let config = ProxyConfig {
            max_requests_per_sandbox: 2,
            ..ProxyConfig::default()
        };
        // Connections 1 and 2 are the sandbox's, 3 another sandbox's.
        let mut h = start_proxy_with(origin.addr, &origin.ca_pem, config, |n| {
            (if n == 3 { "other" } else { "sbx" }, INTERCEPT)
        })
        .await;
        let mut clients = Vec::new();
        for _ in 0..2 {
            let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"h2"])
                .await
                .unwrap();
            let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            clients.push(client);
        }
        let slow = |client: &http2::SendRequest<Full<Bytes>>, i: usize| {
            let req = Request::builder()
                .uri(format!("https://{NAME}/slow/{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            tokio::spawn(client.clone().send_request(req))
        };
        // Two slow requests on the first connection take the sandbox's two turns.
        let held = [slow(&clients[0], 0), slow(&clients[0], 1)];
        while origin.requests.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A third, on its other connection, is refused at once, and recorded.
        let refused = slow(&clients[1], 2).await.unwrap().unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(record.status, Some(503));
        assert!(
            record
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("proxy.max_requests_per_sandbox"),
            "{record:?}"
        );
        assert_eq!(origin.requests.load(Ordering::SeqCst), 2, "not sent on");
        // Another sandbox is not held up by it.
        let mut other = h1_client(h.addr, NAME, &h.ca_pem).await;
        assert_eq!(get(&mut other, NAME, "/").await.status, StatusCode::OK);
        assert_eq!(h.record().await.status, Some(200));
        // The turns come back with the answers.
        for response in held {
            let response = response.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.into_body().collect().await.unwrap();
            assert_eq!(h.record().await.status, Some(200));
        }
        let again = slow(&clients[1], 3).await.unwrap().unwrap();
        assert_eq!(again.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn pooled_connection_is_not_used_by_a_rule_that_may_not_dial_it() {
    within(async {
        let origin = start_origin(true).await;
        let refused = Spec {
            passthrough: false,
            covers_loopback: false,
        };
        let mut h = start_proxy_with(
            origin.addr,
            &origin.ca_pem,
            ProxyConfig::default(),
            move |n| ("sbx", if n == 1 { INTERCEPT } else { refused }),
        )
        .await;
        let mut allowed = h1_client(h.addr, NAME, &h.ca_pem).await;
        assert_eq!(get(&mut allowed, NAME, "/").await.status, StatusCode::OK);
        assert_eq!(h.record().await.verdict, Verdict::Allow);
        assert_eq!(h.proxy.pool.counts(), (1, 0));

        // Same sandbox, destination and server name, but a rule that does not cover
        // loopback: refused although a connection to the address is pooled.
        let mut other = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut other, NAME, "/").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert!(reply.body.contains("loopback"), "{}", reply.body);
        let record = h.record().await;
        assert_eq!(record.verdict, Verdict::Deny);
        assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
        // The first connection still has its upstream.
        assert_eq!(get(&mut allowed, NAME, "/").await.status, StatusCode::OK);
        assert_eq!(origin.requests.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn sandboxes_and_server_names_do_not_share_upstream_connections() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy_with(origin.addr, &origin.ca_pem, ProxyConfig::default(), |n| {
            (if n % 2 == 1 { "sbx-a" } else { "sbx-b" }, INTERCEPT)
        })
        .await;
        for name in [NAME, NAME, OTHER, OTHER] {
            let mut client = h1_client(h.addr, name, &h.ca_pem).await;
            assert_eq!(get(&mut client, name, "/").await.status, StatusCode::OK);
            assert_eq!(h.record().await.sni.as_deref(), Some(name));
        }
        // (sbx-a, NAME), (sbx-b, NAME), (sbx-a, OTHER), (sbx-b, OTHER).
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 4);
        assert_eq!(h.proxy.pool.counts(), (4, 0));
    })
    .await;
}

#[tokio::test]
async fn unused_upstream_connections_are_closed_after_the_idle_timeout() {
    within(async {
        for h2 in [true, false] {
            let origin = start_origin(h2).await;
            let config = ProxyConfig {
                idle_secs: 1,
                ..ProxyConfig::default()
            };
            let mut h =
                start_proxy_with(origin.addr, &origin.ca_pem, config, |_| ("sbx", INTERCEPT)).await;
            let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
            assert_eq!(get(&mut client, NAME, "/").await.status, StatusCode::OK);
            h.record().await;
            drop(client);
            assert_eq!(h.proxy.pool.counts(), (usize::from(h2), usize::from(!h2)));
            // The reaper runs every second; the connection is gone within two.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert_eq!(h.proxy.pool.counts(), (0, 0), "h2: {h2}");
            let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
            assert_eq!(get(&mut client, NAME, "/").await.status, StatusCode::OK);
            assert_eq!(origin.accepted.load(Ordering::SeqCst), 2);
        }
    })
    .await;
}

#[tokio::test]
async fn downstream_tls_sessions_resume() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(h.ca_pem.as_bytes()).unwrap())
                .unwrap();
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let tcp = TcpStream::connect(h.addr).await.unwrap();
                let name = ServerName::try_from(NAME.to_owned()).unwrap();
                let tls = connector.connect(name, tcp).await.unwrap();
                kinds.push(tls.get_ref().1.handshake_kind());
                // A request, so that the client reads the TLS 1.3 ticket.
                let (mut sender, conn) = http1::handshake(TokioIo::new(tls)).await.unwrap();
                tokio::spawn(conn);
                assert_eq!(get(&mut sender, NAME, "/").await.status, StatusCode::OK);
                assert_eq!(h.record().await.status, Some(200));
            }
            assert_eq!(
                kinds,
                [
                    Some(rustls::HandshakeKind::Full),
                    Some(rustls::HandshakeKind::Resumed)
                ],
                "{version:?}"
            );
        }
    })
    .await;
}

#[test]
fn config_defaults_and_unknown_fields() {
    let config: ProxyConfig = serde_yaml_ng::from_str("idle_secs: 30\n").unwrap();
    assert_eq!(
        config,
        ProxyConfig {
            idle_secs: 30,
            ..ProxyConfig::default()
        }
    );
    assert_eq!(ProxyConfig::default().max_header_bytes, 65536);
    assert!(serde_yaml_ng::from_str::<ProxyConfig>("idle: 30\n").is_err());
}

#[test]
fn bad_config_values_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(CertAuthority::load_or_create(dir.path()).unwrap());
    let credentials = Arc::new(CredentialStore::default());
    let audit: AuditSink = Arc::new(|_| {});
    let make = |config| Proxy::new(config, ca.clone(), credentials.clone(), audit.clone());
    let err = make(ProxyConfig {
        idle_secs: 0,
        ..ProxyConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("proxy.idle_secs"), "{err}");
    assert!(make(ProxyConfig {
        max_header_bytes: 100,
        ..ProxyConfig::default()
    })
    .is_err());
    let err = make(ProxyConfig {
        max_connections_per_sandbox: 0,
        ..ProxyConfig::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("max_connections_per_sandbox"),
        "{err}"
    );
    let err = make(ProxyConfig {
        max_handshakes_per_sandbox: 0,
        ..ProxyConfig::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("max_handshakes_per_sandbox"),
        "{err}"
    );
    // 0 would answer every request 503; past the semaphore's bound, it would panic.
    for max in [0, usize::MAX >> 3] {
        let err = make(ProxyConfig {
            max_requests_per_sandbox: max,
            ..ProxyConfig::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("max_requests_per_sandbox"),
            "{err}"
        );
    }
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = make(ProxyConfig {
        upstream_ca: Some(empty),
        ..ProxyConfig::default()
    })
    .unwrap_err();
    assert!(matches!(err, ProxyError::UpstreamCa(_)), "{err}");
    assert_eq!(err.party(), Party::Proxy);
    let missing = make(ProxyConfig {
        upstream_ca: Some(Path::new("/nonexistent/ca.pem").to_owned()),
        ..ProxyConfig::default()
    })
    .unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/ca.pem"),
        "{missing}"
    );
}

// ---------------------------------------------------------------------------------------
// What is forwarded is what was judged; refusals below the handler are recorded
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_normal_form_is_forwarded_and_ambiguous_paths_get_400() {
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let reply = get(&mut client, NAME, "/a/%41b/%7e%c3%a9?q=%2e%2e").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            reply.body.contains("path=/a/Ab/~%C3%A9?q=%2e%2e\n"),
            "{}",
            reply.body
        );
        let record = h.record().await;
        assert_eq!(record.path.as_deref(), Some("/a/Ab/~%C3%A9"));
        // `%2e%2e` is `..` to the origin: refused, never interpreted.
        let reply = get(&mut client, NAME, "/a/%2e%2e/forbidden").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.body.contains("`..` segment"), "{}", reply.body);
        let record = h.record().await;
        assert_eq!((record.verdict, record.status), (Verdict::Deny, Some(400)));
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// Where a rule allows POST but not DELETE, a POST whose form, multipart or JSON body
/// names another method is refused before anything reaches the origin; a POST body
/// without one arrives whole, and bodies frameworks do not parse are not read.
#[tokio::test]
async fn a_post_body_naming_another_method_is_refused_where_the_rule_refuses_it() {
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        let post = |path: &str, ct: Option<&'static str>, body: &'static str| {
            let headers: Vec<(&str, &str)> = ct.map(|ct| ("content-type", ct)).into_iter().collect();
            request(Method::POST, NAME, path, &headers, body)
        };
        let form = Some("application/x-www-form-urlencoded");
        for (ct, body) in [
            (form, "title=x&_method=DELETE"),
            (form, "title=x&%5Fmethod=DELETE"),
            (None, "+_method=DELETE"),
            (
                Some("multipart/form-data; boundary=b"),
                "--b\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--b--\r\n",
            ),
            (Some("application/json"), r#"{"title":"x","_method":"DELETE"}"#),
            // Laravel reads JSON wherever the type names it; PHP takes `'` quotes.
            (
                Some("application/x-www-form-urlencoded, application/json"),
                r#"{"_method":"DELETE"}"#,
            ),
            (
                Some("multipart/form-data; boundary=b"),
                "--b\r\nContent-Disposition: form-data; name='_method'\r\n\r\nDELETE\r\n--b--\r\n",
            ),
            // Rack 2 reads a name from its first run without brackets; qs unwraps one.
            (form, "[_method]=DELETE"),
            (form, "title=x&_method]=DELETE"),
            (form, "]_method=DELETE"),
            (
                Some("multipart/form-data; boundary=b"),
                "--b\r\nContent-Disposition: form-data; name=\"[_method]\"\r\n\r\nDELETE\r\n--b--\r\n",
            ),
            // ASP.NET decodes `%uXXXX`.
            (form, "X%u002DHTTP-Method-Override=DELETE"),
            // Express drops a byte order mark.
            (Some("application/json"), "\u{feff}{\"_method\":\"DELETE\"}"),
            // `JSON.parse` takes a lone surrogate that a strict parser refuses.
            (
                Some("application/json"),
                r#"{"\ud800":0,"_method":"DELETE"}"#,
            ),
            // Only the first value is read by a parser that reads one.
            (Some("application/json"), "{\"_method\":\"DELETE\"}\n{}"),
            // Go joins a name's RFC 2231 pieces; Tomcat decodes an RFC 2047 word.
            (
                Some("multipart/form-data; boundary=b"),
                "--b\r\nContent-Disposition: form-data; name*0=\"_met\"; name*1=\"hod\"\r\n\r\nDELETE\r\n--b--\r\n",
            ),
            (
                Some("multipart/form-data; boundary=b"),
                "--b\r\nContent-Disposition: form-data; name=\"=?UTF-8?B?X21ldGhvZA==?=\"\r\n\r\nDELETE\r\n--b--\r\n",
            ),
        ] {
            let reply = send(&mut client, post("/post-only/1", ct, body)).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}: {}", reply.body);
            assert!(reply.body.contains("a method to run"), "{}", reply.body);
            let record = h.record().await;
            assert_eq!((record.verdict, record.status), (Verdict::Deny, Some(400)));
        }
        // A charset that hides the keys from a byte-wise reading, named wherever a
        // framework finds it (ASP.NET: after `,` too), JSON's included.
        for ct in [
            "application/json; charset=utf-16le",
            "application/x-www-form-urlencoded, charset=IBM037",
        ] {
            let reply = send(&mut client, post("/post-only/1", Some(ct), "{}")).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{ct}: {}", reply.body);
            assert!(reply.body.contains("cannot be checked"), "{}", reply.body);
            let record = h.record().await;
            assert_eq!((record.verdict, record.status), (Verdict::Deny, Some(400)));
        }
        // A type the origin never sees (`Connection` lists it) is not the one judged.
        let hidden = request(
            Method::POST,
            NAME,
            "/post-only/1",
            &[
                ("content-type", "application/octet-stream"),
                ("connection", "content-type"),
            ],
            "_method=DELETE",
        );
        let reply = send(&mut client, hidden).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        h.record().await;
        assert_eq!(origin.requests.load(Ordering::SeqCst), 0);
        // Positive controls: no override field; a body no framework parses; a path
        // where the rule allows every method.
        for (path, ct, body) in [
            ("/post-only/1", form, "title=x&payment_method=card"),
            ("/post-only/1", Some("application/octet-stream"), "_method=DELETE"),
            // Not one JSON value (NDJSON): no framework reads fields from it.
            (
                "/post-only/1",
                Some("application/json"),
                "{\"index\":{}}\n{\"_method\":\"DELETE\"}\n",
            ),
            ("/any/1", form, "_method=DELETE"),
        ] {
            let reply = send(&mut client, post(path, ct, body)).await;
            assert_eq!(reply.status, StatusCode::OK, "{path} {body}: {}", reply.body);
            assert!(
                reply.body.contains(&format!("body={}\n", body.len())),
                "{}",
                reply.body
            );
            assert_eq!(h.record().await.verdict, Verdict::Allow);
        }
        assert_eq!(origin.requests.load(Ordering::SeqCst), 4);
    })
    .await;
}

/// WebDAV's COPY and MOVE act on `Destination` too: judged like the request's target
/// (refused where the rule refuses it, or names another host) and sent as judged.
#[tokio::test]
async fn a_destination_is_judged_and_sent_as_judged() {
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut client = h1_client(h.addr, NAME, &h.ca_pem).await;
        // The origin's port is the connection's: the Destination names it.
        let authority = format!("{NAME}:{}", origin.addr.port());
        let mv = |dest: &str| {
            let dest = dest.replace("{NAME}", &authority);
            let mut req = request(Method::from_bytes(b"MOVE").unwrap(), NAME, "/a", &[], "");
            req.headers_mut()
                .insert("destination", http::HeaderValue::from_str(&dest).unwrap());
            req
        };
        let reply = send(&mut client, mv("https://{NAME}/b%41")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert!(
            reply
                .body
                .contains(&format!("destination=https://{authority}/bA\n")),
            "{}",
            reply.body
        );
        h.record().await;
        for (dest, status) in [
            ("https://{NAME}/forbidden/x", StatusCode::FORBIDDEN),
            ("/forbidden/x", StatusCode::FORBIDDEN),
            ("https://elsewhere.example/b", StatusCode::BAD_REQUEST),
            ("https://{NAME}/a/%2e%2e/forbidden", StatusCode::BAD_REQUEST),
            // What the origin would read as another origin: another scheme, port, a user.
            ("http://{NAME}/b", StatusCode::BAD_REQUEST),
            ("https://user@{NAME}/b", StatusCode::BAD_REQUEST),
            (&format!("https://{NAME}/b"), StatusCode::BAD_REQUEST),
        ] {
            let reply = send(&mut client, mv(dest)).await;
            assert_eq!(reply.status, status, "{dest}: {}", reply.body);
            assert!(reply.body.contains("Destination"), "{}", reply.body);
            assert_eq!(h.record().await.verdict, Verdict::Deny);
        }
        assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// Writes `raw` on a fresh TLS connection (ALPN `alpn`) and reads until the proxy closes
/// it or `until` holds for what was read.
async fn raw_exchange(
    h: &Harness,
    alpn: &[u8],
    raw: &[u8],
    until: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tls = tls_connect(h.addr, NAME, &h.ca_pem, &[alpn]).await.unwrap();
    tls.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !until(&got) {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

#[tokio::test]
async fn requests_the_http1_parser_refuses_are_recorded() {
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let flood: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
        for (raw, status) in [
            (
                format!("GET /a HTTP/1.1\r\nHost: {NAME}\r\nBad Header\r\n\r\n"),
                400,
            ),
            (format!("GET /a HTTP/9.9\r\nHost: {NAME}\r\n\r\n"), 400),
            (format!("G(T /a HTTP/1.1\r\nHost: {NAME}\r\n\r\n"), 400),
            (
                format!("GET /a HTTP/1.1\r\nHost: {NAME}\r\n{flood}\r\n"),
                431,
            ),
        ] {
            let got = raw_exchange(&h, b"http/1.1", raw.as_bytes(), |_| false).await;
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.starts_with(&format!("HTTP/1.1 {status}")),
                "{raw:?}: {text}"
            );
            let record = h.record().await;
            assert_eq!(record.verdict, Verdict::Deny, "{raw:?}");
            assert_eq!(record.kind, RecordKind::Request);
            assert_eq!(record.status, Some(status));
            let reason = record.reason.unwrap();
            assert!(reason.contains("refused by the parser"), "{reason}");
        }
        // HTTP/2 without choosing it in ALPN: refused by the HTTP/1 parser.
        let got = raw_exchange(&h, b"http/1.1", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", |_| {
            false
        })
        .await;
        assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 "), "{got:?}");
        assert_eq!(h.record().await.verdict, Verdict::Deny);
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An HPACK literal header field without indexing, new name.
fn hpack(name: &str, value: &str) -> Vec<u8> {
    let mut v = vec![0u8, name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v.push(value.len() as u8);
    v.extend_from_slice(value.as_bytes());
    v
}

/// The frames (type, stream, payload) in `bytes`, as far as they are complete.
fn h2_frames(bytes: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(h) = bytes.get(at..at + 9) {
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let Some(payload) = bytes.get(at + 9..at + 9 + len) else {
            break;
        };
        out.push((h[3], stream, payload.to_vec()));
        at += 9 + len;
    }
    out
}

#[tokio::test]
async fn http2_protocol_errors_and_extended_connect_are_recorded() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let mut raw = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        raw.extend(h2_frame(0x4, 0, 0, &[]));
        // Stream 1: a connection-specific header, which HTTP/2 forbids.
        let mut block = vec![0x82, 0x87, 0x84];
        block.extend(hpack(":authority", NAME));
        block.extend(hpack("connection", "keep-alive"));
        raw.extend(h2_frame(0x1, 0x5, 1, &block));
        // Stream 3: extended CONNECT (a WebSocket over HTTP/2).
        let mut block = hpack(":method", "CONNECT");
        block.extend(hpack(":protocol", "websocket"));
        block.extend([0x87, 0x84]);
        block.extend(hpack(":authority", NAME));
        raw.extend(h2_frame(0x1, 0x5, 3, &block));
        let done = |got: &[u8]| {
            let frames = h2_frames(got);
            frames.iter().any(|f| f.0 == 0x3 && f.1 == 1)
                && frames.iter().any(|f| f.0 == 0x0 && f.1 == 3)
        };
        let got = raw_exchange(&h, b"h2", &raw, done).await;
        let frames = h2_frames(&got);
        assert!(
            frames
                .iter()
                .any(|(kind, stream, p)| *kind == 0x3 && *stream == 1 && p[..] == [0, 0, 0, 1]),
            "no PROTOCOL_ERROR reset: {frames:?}"
        );
        let mut reasons = Vec::new();
        for _ in 0..2 {
            let record = h.record().await;
            assert_eq!(record.verdict, Verdict::Deny);
            reasons.push(record.reason.unwrap());
        }
        reasons.sort();
        assert!(
            reasons[0].contains("HTTP/2 stream 1 refused by the HTTP/2 layer: PROTOCOL_ERROR"),
            "{reasons:?}"
        );
        assert_eq!(reasons[1], "upgrades are not allowed");
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn an_aborted_upload_is_recorded_as_a_client_abort() {
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 100000\r\n\r\n{}",
            "x".repeat(1000)
        );
        {
            use tokio::io::AsyncWriteExt as _;
            let mut tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"http/1.1"])
                .await
                .unwrap();
            tls.write_all(head.as_bytes()).await.unwrap();
            tls.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Dropped mid-body.
        }
        let record = h.record().await;
        let reason = record.reason.unwrap_or_default();
        assert!(reason.starts_with("client aborted"), "{reason}");
        assert!(!reason.contains("upstream"), "{reason}");
    })
    .await;
}

#[tokio::test]
async fn idle_connections_last_idle_secs_and_slow_headers_header_secs() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_timed_proxy(&origin, 1, 3).await;

        // An idle keep-alive connection outlives header_secs and is closed after idle_secs.
        let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"http/1.1"])
            .await
            .unwrap();
        let (mut sender, conn) = http1::handshake(TokioIo::new(tls)).await.unwrap();
        let conn = tokio::spawn(conn);
        assert_eq!(get(&mut sender, NAME, "/").await.status, StatusCode::OK);
        h.record().await;
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert!(!conn.is_finished(), "closed after header_secs while idle");
        assert_eq!(get(&mut sender, NAME, "/").await.status, StatusCode::OK);
        h.record().await;
        let quiet = tokio::time::Instant::now();
        // Closed by the proxy (without a TLS close_notify: the connection is dropped).
        let _ = conn.await.unwrap();
        let closed_after = quiet.elapsed();
        assert!(
            closed_after >= Duration::from_millis(2900) && closed_after < Duration::from_secs(8),
            "closed after {closed_after:?}, idle_secs is 3"
        );
        assert_eq!(origin.requests.load(Ordering::SeqCst), 2);

        // A header dripped one line at a time (never idle) is cut off after header_secs.
        let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"http/1.1"])
            .await
            .unwrap();
        let (mut rd, mut wr) = tokio::io::split(tls);
        let started = tokio::time::Instant::now();
        let drip = tokio::spawn(async move {
            wr.write_all(format!("GET /loris HTTP/1.1\r\nHost: {NAME}\r\n").as_bytes())
                .await?;
            for i in 0..20 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                wr.write_all(format!("x-drip-{i}: 1\r\n").as_bytes())
                    .await?;
            }
            std::io::Result::Ok(())
        });
        let mut buf = [0u8; 1024];
        let got = rd.read(&mut buf).await;
        let cut_after = started.elapsed();
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
        assert!(
            cut_after >= Duration::from_millis(900) && cut_after < Duration::from_millis(2900),
            "cut after {cut_after:?}: header_secs is 1, idle_secs 3"
        );
        drip.abort();
        let record = h.record().await;
        assert_eq!(record.kind, RecordKind::Request);
        assert_eq!(record.verdict, Verdict::Deny);
        let reason = record.reason.unwrap();
        assert!(reason.contains("proxy.header_secs"), "{reason}");
        assert_eq!(origin.requests.load(Ordering::SeqCst), 2);
        // The idle close above recorded nothing.
        assert!(h.records.try_recv().is_err());
    })
    .await;
}

/// A client that asks for a response and reads none of it does not hold the connection
/// (its buffers, the upstream stream, the request's permit) for ever: once the proxy's
/// writes have waited five times `idle_secs` for it, the connection is closed and that is
/// recorded.
#[tokio::test]
async fn a_response_the_client_never_reads_is_cut_after_idle_secs() {
    use tokio::io::AsyncWriteExt as _;
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_timed_proxy(&origin, 1, 1).await;
        let mut tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"http/1.1"])
            .await
            .unwrap();
        tls.write_all(format!("GET /big HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let asked = tokio::time::Instant::now();
        // Nothing is read; the proxy's refusal comes once its writes waited 5 s (five
        // times idle_secs).
        expect_stall_cut(&mut h, asked).await;
        drop(tls);
    })
    .await;
}

/// Waits for the deny record of a connection cut because its client took nothing for
/// five times `idle_secs` (1 s in these tests) since `asked`.
async fn expect_stall_cut(h: &mut Harness, asked: tokio::time::Instant) {
    let stalled = loop {
        let record = tokio::time::timeout(Duration::from_secs(15), h.records.recv())
            .await
            .unwrap()
            .unwrap();
        if record
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("read nothing of what the proxy sent"))
        {
            break record;
        }
    };
    let after = asked.elapsed();
    assert!(
        after >= Duration::from_secs(5) && after < Duration::from_secs(15),
        "{after:?}"
    );
    assert_eq!(stalled.verdict, Verdict::Deny);
}

/// The same over HTTP/2 from a client that never opens its receive window: no socket
/// write ever waits (nothing may be sent), but the response it was given goes untaken,
/// and is cut after five times `idle_secs` too (it held its upstream stream, buffers and
/// request turn).
#[tokio::test]
async fn an_http2_response_behind_a_closed_window_is_cut_after_idle_secs() {
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_timed_proxy(&origin, 1, 1).await;
        let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"h2"])
            .await
            .unwrap();
        let (client, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(format!("https://{NAME}/big"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let asked = tokio::time::Instant::now();
        let response = client.clone().send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        expect_stall_cut(&mut h, asked).await;
        drop(response);
    })
    .await;
}

/// HTTP/2's header timer: a header block begun and never finished (CONTINUATION frames
/// without END_HEADERS, then silence) is cut after `header_secs` and recorded; a whole request
/// on another connection is answered, and an idle HTTP/2 connection outlives
/// `header_secs`.
#[tokio::test]
async fn an_http2_header_list_over_the_limit_is_recorded_though_the_http2_layer_answers_it() {
    use super::h2head::frame;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    within(async {
        let origin = start_origin(false).await;
        let config = ProxyConfig {
            max_header_bytes: 8192,
            ..ProxyConfig::default()
        };
        let mut h =
            start_proxy_with(origin.addr, &origin.ca_pem, config, |_| ("sbx", INTERCEPT)).await;
        let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"h2"])
            .await
            .unwrap();
        let (mut rd, mut wr) = tokio::io::split(tls);
        // :method GET, :scheme https, :path /, :authority NAME (HPACK, no huffman).
        let mut small = vec![0x82, 0x87, 0x84, 0x41, u8::try_from(NAME.len()).unwrap()];
        small.extend_from_slice(NAME.as_bytes());
        // The same and 200 x `accept-encoding: gzip, deflate` (one byte each, 60 in the
        // header list's size): 12,000 bytes decoded from a 220-byte frame.
        let mut big = small.clone();
        big.extend([0x90; 200]);
        let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        opening.extend(frame(0x4, 0, 0, &[]));
        // Both END_STREAM | END_HEADERS: a positive control on stream 1, the oversized
        // request on stream 3.
        opening.extend(frame(0x1, 0x5, 1, &small));
        opening.extend(frame(0x1, 0x5, 3, &big));
        wr.write_all(&opening).await.unwrap();

        // Frames back until stream 1 has ended and stream 3 has had its answer.
        let (mut ended_1, mut answered_3) = (false, false);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !(ended_1 && answered_3) {
            let n = rd.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the proxy closed the connection");
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
                ended_1 |= stream == 1 && matches!(kind, 0x0 | 0x1) && flags & 0x1 != 0;
                answered_3 |= stream == 3 && kind == 0x1;
                buf.drain(..9 + len);
            }
        }
        drop((rd, wr));

        let control = h.record().await;
        assert_eq!(control.verdict, Verdict::Allow);
        assert_eq!(control.status, Some(200));
        let refused = h.record().await;
        assert_eq!(refused.kind, RecordKind::Request);
        assert_eq!(refused.verdict, Verdict::Deny);
        let reason = refused.reason.unwrap();
        assert!(
            reason.contains("refused by the HTTP/2 layer")
                && reason.contains("proxy.max_header_bytes"),
            "{reason}"
        );
        // Only the control reached the origin.
        assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn an_unfinished_http2_header_block_is_cut_after_header_secs_and_recorded() {
    use super::h2head::frame;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_timed_proxy(&origin, 1, 4).await;

        // Control: a whole request is answered, and the idle connection stays open past
        // header_secs.
        let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"h2"])
            .await
            .unwrap();
        let (mut client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::builder()
            .uri(format!("https://{NAME}/whole"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(
            client.send_request(req).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(h.record().await.status, Some(200));
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert!(
            !conn.is_finished(),
            "an idle HTTP/2 connection closed after header_secs"
        );

        // Each attack: what opens the connection, then pieces sent one after another,
        // each after a pause; the connection is never idle for idle_secs.
        let preface = || {
            let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            opening.extend(frame(0x4, 0, 0, &[]));
            opening
        };
        let long_frame = frame(0x1, 0x4 | 0x1, 1, &[0x90; 60]);
        let attacks = [
            (
                // HEADERS (END_STREAM, no END_HEADERS): :method GET, :scheme https; two
                // CONTINUATION frames (accept-encoding, a header that may repeat), never
                // END_HEADERS, then nothing: the cut comes from the timer, not a read.
                "a header block that never ends",
                [preface(), frame(0x1, 0x1, 1, &[0x82, 0x87])].concat(),
                vec![
                    (300, frame(0x9, 0, 1, &[0x90])),
                    (300, frame(0x9, 0, 1, &[0x90])),
                    (30_000, Vec::new()),
                ],
            ),
            (
                // One frame flagged END_HEADERS whose payload drips a byte at a time:
                // timed until the frame's last byte.
                "a header frame dripped a byte at a time",
                [preface(), long_frame[..12].to_vec()].concat(),
                long_frame[12..].iter().map(|b| (200, vec![*b])).collect(),
            ),
        ];
        for (what, opening, pieces) in attacks {
            let tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"h2"])
                .await
                .unwrap();
            let (mut rd, mut wr) = tokio::io::split(tls);
            let started = tokio::time::Instant::now();
            let drip = tokio::spawn(async move {
                wr.write_all(&opening).await?;
                for (pause, piece) in pieces {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    wr.write_all(&piece).await?;
                }
                std::io::Result::Ok(())
            });
            // Read until the proxy closes (its SETTINGS and ACK come first).
            let mut buf = [0u8; 4096];
            while let Ok(1..) = rd.read(&mut buf).await {}
            let cut_after = started.elapsed();
            assert!(
                cut_after >= Duration::from_millis(900) && cut_after < Duration::from_millis(3500),
                "{what}: cut after {cut_after:?}; header_secs is 1, idle_secs 4"
            );
            drip.abort();
            let record = h.record().await;
            assert_eq!(record.kind, RecordKind::Request, "{what}");
            assert_eq!(record.verdict, Verdict::Deny, "{what}");
            let reason = record.reason.unwrap();
            assert!(reason.contains("HTTP/2 header block"), "{what}: {reason}");
            assert!(reason.contains("proxy.header_secs"), "{what}: {reason}");
            // Nothing of the unfinished request reached the origin.
            assert_eq!(origin.requests.load(Ordering::SeqCst), 1, "{what}");
        }
    })
    .await;
}

/// A request refused on its head while its client is still uploading (the body arriving
/// in two pieces) gets the proxy's answer and, over HTTP/2, a cleanly ended stream: the
/// rest of the body is read and dropped, never reset under the client's upload.
#[tokio::test]
async fn a_request_refused_mid_upload_gets_its_answer() {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt as _;
    within(async {
        let origin = start_origin(true).await;
        let mut h = start_proxy(origin.addr, &origin.ca_pem, INTERCEPT).await;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &h.ca_pem).unwrap();
        let port = h.addr.port();
        for version in ["--http2", "--http1.1"] {
            let mut curl = tokio::process::Command::new("curl")
                .args(["-sS", version, "-o", "/dev/null", "-w", "%{http_code}"])
                .args(["--cacert", ca.to_str().unwrap()])
                .args(["--resolve", &format!("{NAME}:{port}:127.0.0.1")])
                .args(["-H", "content-length: 10", "-T", "-"])
                .arg(format!("https://{NAME}:{port}/forbidden/upload"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut stdin = curl.stdin.take().unwrap();
            stdin.write_all(b"hello").await.unwrap();
            stdin.flush().await.unwrap();
            // This request's record (the previous client's connection may end with one).
            let mut record = h.record().await;
            for _ in 0..3 {
                if record.path.as_deref() == Some("/forbidden/upload") {
                    break;
                }
                record = h.record().await;
            }
            assert_eq!(record.status, Some(403), "{version}: {record:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Over HTTP/1.1 curl may stop sending once the answer is in.
            let _ = stdin.write_all(b"world").await;
            drop(stdin);
            let out = curl.wait_with_output().await.unwrap();
            assert_eq!(
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout).as_ref()
                ),
                (Some(0), "403"),
                "curl {version}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(origin.requests.load(Ordering::SeqCst), 0);
    })
    .await;
}

/// A request head pipelined behind another and left incomplete is cut off after
/// `header_secs` (not kept for `idle_secs`) and recorded: whether it came in the same
/// write as the request ahead of it or after that request's body.
#[tokio::test]
async fn a_stalled_pipelined_head_is_timed_and_recorded() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_timed_proxy(&origin, 1, 6).await;
        let cases = [
            format!("GET /a HTTP/1.1\r\nHost: {NAME}\r\n\r\nGET /b HTTP/1.1\r\nHo"),
            format!(
                "POST /a HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 4\r\n\r\nbodyGET /b HTTP/1.1\r\nHo"
            ),
        ];
        for (i, bytes) in cases.iter().enumerate() {
            let mut tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"http/1.1"])
                .await
                .unwrap();
            let started = tokio::time::Instant::now();
            tls.write_all(bytes.as_bytes()).await.unwrap();
            let mut response = Vec::new();
            let _ = tls.read_to_end(&mut response).await;
            let closed_after = started.elapsed();
            let text = String::from_utf8_lossy(&response);
            assert!(text.starts_with("HTTP/1.1 200"), "case {i}: {text}");
            assert!(
                closed_after < Duration::from_secs(4),
                "case {i}: closed after {closed_after:?}: header_secs is 1, idle_secs 6"
            );
            assert_eq!(h.record().await.status, Some(200), "case {i}");
            let record = h.record().await;
            assert_eq!(record.verdict, Verdict::Deny, "case {i}");
            let reason = record.reason.unwrap();
            assert!(reason.contains("proxy.header_secs"), "case {i}: {reason}");
        }

        // Control: two whole heads in one write are both answered, and the connection
        // then stays open past header_secs like any idle keep-alive connection.
        let mut tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"http/1.1"])
            .await
            .unwrap();
        let two = format!("GET /a HTTP/1.1\r\nHost: {NAME}\r\n\r\nGET /b HTTP/1.1\r\nHost: {NAME}\r\n\r\n");
        tls.write_all(two.as_bytes()).await.unwrap();
        for _ in 0..2 {
            assert_eq!(h.record().await.status, Some(200));
        }
        tokio::time::sleep(Duration::from_millis(2000)).await;
        tls.write_all(format!("GET /c HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(h.record().await.status, Some(200));
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while seen.windows(12).filter(|w| w == b"HTTP/1.1 200").count() < 3 {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(h.records.try_recv().is_err());
    })
    .await;
}

/// A refused HTTP/1.1 upload still arriving slowly is read to its end without being
/// taken for a stalled request head, and the connection serves the next request.
#[tokio::test]
async fn a_slow_refused_upload_is_not_a_stalled_head() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    within(async {
        let origin = start_origin(false).await;
        let mut h = start_timed_proxy(&origin, 1, 6).await;
        let mut tls = tls_connect(h.addr, NAME, &h.ca_pem, &[b"http/1.1"])
            .await
            .unwrap();
        let head =
            format!("PUT /forbidden/x HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 30\r\n\r\n");
        tls.write_all(head.as_bytes()).await.unwrap();
        let record = h.record().await;
        assert_eq!(record.status, Some(403));
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            tls.write_all(&[b'x'; 10]).await.unwrap();
        }
        tls.write_all(format!("GET /next HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(12).any(|w| w == b"HTTP/1.1 200") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 403"));
        assert_eq!(h.record().await.status, Some(200));
        assert!(h.records.try_recv().is_err());
    })
    .await;
}
