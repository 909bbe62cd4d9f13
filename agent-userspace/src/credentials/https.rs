//! A small HTTPS client for credential sources that fetch from a server (a secret store's
//! API): one request per connection, HTTP/1.1, bounded answer, the server's certificate
//! verified. Plain `http://` is accepted only for loopback addresses, where no network
//! carries the token.
//!
//! Requests and answers may carry secrets (the store's token, the secret itself): bodies
//! are returned in [`Zeroizing`] buffers and no error message quotes either.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use crate::net::Dialer;

/// Largest answer read.
pub(super) const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// Where a server is: scheme, host, port and a path prefix, parsed once.
#[derive(Debug, Clone)]
pub(super) struct Server {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
    /// The URL's path without its trailing `/`.
    prefix: String,
}

impl Server {
    /// Parses `url` (`https://host[:port][/prefix]`, or `http://` with a loopback IP).
    pub(super) fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("`{url}` is not a URL such as https://vault.example:8200"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("`{url}` must be an https:// URL")),
        };
        let Some(authority) = uri.authority() else {
            return Err(format!("`{url}` has no host"));
        };
        if authority.as_str().contains('@') {
            return Err(format!("`{url}` must not carry user information"));
        }
        if uri.query().is_some() {
            return Err(format!("`{url}` must not carry a query"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !tls && !host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
            return Err(format!(
                "`{url}`: plain http:// is allowed only to a loopback address; use https://"
            ));
        }
        Ok(Self {
            tls,
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            host,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// `host[:port]` as the URL gave it: the `Host` header sent.
    pub(super) fn authority(&self) -> &str {
        &self.authority
    }

    /// The URL's path prefix (no trailing `/`).
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full URL of `path` (which starts with `/`), for messages.
    pub(super) fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}{path}", self.authority, self.prefix)
    }
}

/// A client for one server.
pub(super) struct Client {
    server: Server,
    tls: Arc<ClientConfig>,
    dialer: Option<Arc<Dialer>>,
    /// How long one call may take in all (name lookup, connect, TLS, request, answer): a
    /// server that accepts and never answers must not hold a credential's lock, or a
    /// quarantine's revocations, for ever.
    deadline: Duration,
}

/// [`Client`]'s deadline for one call, unless set otherwise.
pub(super) const CALL_DEADLINE: Duration = Duration::from_secs(10);

impl Client {
    /// `tls` is used as is except for its ALPN list, which becomes `http/1.1`.
    pub(super) fn new(server: Server, tls: &ClientConfig, dialer: Option<Arc<Dialer>>) -> Self {
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            server,
            tls: Arc::new(tls),
            dialer,
            deadline: CALL_DEADLINE,
        }
    }

    /// The same client with another deadline per call.
    pub(super) fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    pub(super) fn server(&self) -> &Server {
        &self.server
    }

    /// One request over a new connection. `headers` are added as given (mark secret ones
    /// sensitive); a body is sent as JSON. Returns the status and up to
    /// [`MAX_ANSWER_BYTES`] of the answer.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), String> {
        self.call_as(method, path, headers, body, "application/json")
            .await
    }

    /// [`Self::call`] with a body of another content type (a form for AWS STS), within
    /// the client's deadline.
    pub(super) async fn call_as(
        &self,
        method: Method,
        path: &str,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Option<Zeroizing<Vec<u8>>>,
        content_type: &'static str,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), String> {
        let call = self.call_unbounded(method.clone(), path, headers, body, content_type);
        tokio::time::timeout(self.deadline, call)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{method} {}: no answer within {} s",
                    self.server.url(path),
                    self.deadline.as_secs_f64()
                ))
            })
    }

    async fn call_unbounded(
        &self,
        method: Method,
        path: &str,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Option<Zeroizing<Vec<u8>>>,
        content_type: &'static str,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), String> {
        let s = &self.server;
        let url = s.url(path);
        let addrs: Vec<SocketAddr> = match s.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, s.port)],
            Err(_) => tokio::net::lookup_host((s.host.as_str(), s.port))
                .await
                .map_err(|e| format!("resolving {}: {e}", s.host))?
                .collect(),
        };
        let mut last = format!("{} has no addresses", s.host);
        let mut tcp = None;
        for addr in addrs {
            let connect = async {
                match &self.dialer {
                    Some(d) => d.connect(addr).await,
                    None => tokio::net::TcpStream::connect(addr).await,
                }
            };
            match connect.await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last = format!("connecting to {addr}: {e}"),
            }
        }
        let tcp = tcp.ok_or(last)?;

        let uri: Uri = format!("{}{path}", s.prefix)
            .parse()
            .map_err(|_| format!("{url} is not a valid request path"))?;
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(HOST, s.authority.as_str())
            .header(USER_AGENT, concat!("egressd/", env!("CARGO_PKG_VERSION")));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() {
            request = request
                .header(CONTENT_TYPE, content_type)
                .header(CONTENT_LENGTH, body.len());
        }
        // The body may hold a secret (a login's secret id): sent from a copy that hyper
        // owns and drops, while ours is wiped.
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
                &body,
            )))
            .map_err(|e| format!("building the request to {url}: {e}"))?;
        drop(body);

        if s.tls {
            let name = ServerName::try_from(s.host.clone())
                .map_err(|_| format!("{:?} is not a valid TLS server name", s.host))?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {}: {e}", s.authority))?;
            exchange(stream, request, &method, &url).await
        } else {
            exchange(tcp, request, &method, &url).await
        }
    }
}

/// A spawned task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn exchange<S>(
    stream: S,
    request: Request<http_body_util::Full<bytes::Bytes>>,
    method: &Method,
    url: &str,
) -> Result<(StatusCode, Zeroizing<Vec<u8>>), String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP with {url}: {e}"))?;
    // Ended however this call ends: at its deadline the future is dropped mid-way.
    let conn = AbortOnDrop(tokio::spawn(conn));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut bytes = Zeroizing::new(Vec::new());
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| format!("reading the answer of {url}: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_ANSWER_BYTES {
                return Err(format!(
                    "the answer of {url} is larger than {MAX_ANSWER_BYTES} bytes"
                ));
            }
            bytes.extend_from_slice(&data);
        }
    }
    drop(conn);
    Ok((status, bytes))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_and_refuses_plain_http_off_loopback() {
        let s = Server::parse("https://vault.example:8200/").unwrap();
        assert_eq!(
            s.url("/v1/sys/health"),
            "https://vault.example:8200/v1/sys/health"
        );
        let s = Server::parse("http://127.0.0.1:8200").unwrap();
        assert_eq!(s.port, 8200);
        assert!(!s.tls);
        Server::parse("http://[::1]:8200").unwrap();
        for bad in [
            "http://vault.example:8200",
            "http://192.0.2.1:8200",
            "ftp://vault.example",
            "https://user:pw@vault.example",
            "https://vault.example/?x=1",
            "vault.example",
        ] {
            assert!(Server::parse(bad).is_err(), "{bad}");
        }
    }

    /// A server that accepts the connection and never answers: the call fails at its
    /// deadline (with what it was waiting for), it does not wait for ever.
    #[tokio::test]
    async fn a_server_that_never_answers_fails_the_call_at_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                kept.push(conn);
            }
        });
        let server = Server::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = crate::net::tls::client_config(provider, None).unwrap();
        let client = Client::new(server, &tls, None).with_deadline(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let err = client
            .call(Method::PUT, "/v1/sys/leases/revoke", Vec::new(), None)
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            err,
            format!("PUT http://127.0.0.1:{port}/v1/sys/leases/revoke: no answer within 0.3 s")
        );
        held.abort();
    }
}
