//! A local HTTPS token endpoint (test CA made here, 127.0.0.1) that checks each JWT with
//! the App's public key and counts the tokens it mints.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::USER_AGENT;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use rsa::pkcs1::{EncodeRsaPrivateKey as _, EncodeRsaPublicKey as _};
use rsa::pkcs8::EncodePrivateKey as _;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use super::*;
use crate::credentials::{CredentialStore, RawCredentials, RawSource};
use crate::net::Dialer;

const APP_ID: u64 = 123;
const INSTALLATION: u64 = 456;

/// One RSA key for all tests: (PKCS#1 PEM private key, PKCS#1 DER public key). Made at
/// test time; generating it takes a second or two in a debug build.
fn app_key() -> &'static (String, Vec<u8>) {
    static KEY: OnceLock<(String, Vec<u8>)> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let pem = key.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let public = key.to_public_key().to_pkcs1_der().unwrap();
        (pem.to_string(), public.as_bytes().to_vec())
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Endpoint {
    url: String,
    client_tls: Arc<ClientConfig>,
    minted: Arc<AtomicUsize>,
    /// Milliseconds each token lives.
    life_ms: Arc<AtomicU64>,
    /// Answer 500 instead of a token.
    failing: Arc<AtomicBool>,
    /// Tokens revoked with `DELETE /installation/token`.
    revoked: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Starts the token endpoint with a fresh test CA and a certificate for 127.0.0.1.
async fn start_endpoint() -> Endpoint {
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "token endpoint test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client_tls = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let minted = Arc::new(AtomicUsize::new(0));
    let life_ms = Arc::new(AtomicU64::new(3_600_000));
    let failing = Arc::new(AtomicBool::new(false));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let revoked: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let state = (
        minted.clone(),
        life_ms.clone(),
        failing.clone(),
        revoked.clone(),
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move {
                        if req.method() == Method::DELETE {
                            return Ok::<_, Infallible>(revoke(&req, &state.0, &state.3));
                        }
                        Ok::<_, Infallible>(answer(req, &state.0, &state.1, &state.2).await)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Endpoint {
        url: format!("https://{addr}"),
        client_tls,
        minted,
        life_ms,
        failing,
        revoked,
    }
}

/// `DELETE /installation/token`, authorised by a token this endpoint minted: 204.
fn revoke(
    req: &Request<Incoming>,
    minted: &AtomicUsize,
    revoked: &std::sync::Mutex<Vec<String>>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/installation/token" {
        return json(404, &serde_json::json!({ "message": "Not Found" }));
    }
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let known = token
        .strip_prefix("ghs_test")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n >= 1 && n <= minted.load(Ordering::SeqCst));
    let mut list = revoked.lock().unwrap();
    if !known || list.contains(&token) {
        return json(401, &serde_json::json!({ "message": "Bad credentials" }));
    }
    list.push(token);
    Response::builder()
        .status(204)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn json(status: u16, value: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap()
}

/// What GitHub does, checked strictly: the JWT's signature and claims, the headers and
/// the body.
async fn answer(
    req: Request<Incoming>,
    minted: &AtomicUsize,
    life_ms: &AtomicU64,
    failing: &AtomicBool,
) -> Response<Full<Bytes>> {
    let refuse = |why: &str| json(401, &serde_json::json!({ "message": why }));
    if req.method() != Method::POST
        || req.uri().path() != format!("/app/installations/{INSTALLATION}/access_tokens")
    {
        return json(404, &serde_json::json!({ "message": "Not Found" }));
    }
    if req.headers().get(ACCEPT).map(HeaderValue::as_bytes) != Some(b"application/vnd.github+json")
        || !req.headers().contains_key(USER_AGENT)
    {
        return refuse("bad headers");
    }
    let Some(jwt) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
    else {
        return refuse("no bearer JWT");
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts.as_slice() else {
        return refuse("not a JWT");
    };
    let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &app_key().1);
    let signed = format!("{header}.{claims}");
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return refuse("signature is not base64url");
    };
    if public.verify(signed.as_bytes(), &signature).is_err() {
        return refuse("A JSON web token could not be decoded");
    }
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    if header["alg"] != "RS256"
        || claims["iss"] != APP_ID
        || exp - iat != 600
        || !(now - 70..=now - 50).contains(&iat)
    {
        return refuse("bad claims");
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    if body
        != serde_json::json!({"repositories": ["widgets"], "permissions": {"contents": "write"}})
    {
        return json(422, &serde_json::json!({ "message": "bad body" }));
    }
    if failing.load(Ordering::SeqCst) {
        return json(500, &serde_json::json!({ "message": "Server Error" }));
    }
    let n = minted.fetch_add(1, Ordering::SeqCst) + 1;
    let life = time::Duration::milliseconds(life_ms.load(Ordering::SeqCst) as i64);
    let expires_at = (OffsetDateTime::now_utc() + life).format(&Rfc3339).unwrap();
    json(
        201,
        &serde_json::json!({ "token": format!("ghs_test{n}"), "expires_at": expires_at }),
    )
}

fn write_key(dir: &Path) -> PathBuf {
    let path = dir.join("app.pem");
    std::fs::write(&path, &app_key().0).unwrap();
    path
}

fn raw(url: &str, key: &Path, extra: &str) -> RawCredentials {
    serde_yaml_ng::from_str(&format!(
        "github:\n  source:\n    github_app:\n      app_id: {APP_ID}\n      private_key: {}\n      installation_id: {INSTALLATION}\n      api_url: {url}\n      repositories: [widgets]\n      permissions: {{ contents: write }}\n{extra}  inject: {{ basic: {{ user: x-access-token }} }}\n  hosts: [github.com]\n",
        key.display()
    ))
    .unwrap()
}

fn store_for(ep: &Endpoint, key: &Path) -> CredentialStore {
    let upstream = UpstreamOptions {
        tls: Some(ep.client_tls.clone()),
        dialer: Some(Arc::new(Dialer::default())),
    };
    CredentialStore::from_config_with(&raw(&ep.url, key, ""), &upstream).unwrap()
}

/// The token inside the injected `Authorization: Basic` header.
async fn token(store: &CredentialStore) -> Result<String, CredentialError> {
    let (_, value) = store.header_for("github", "github.com").await?.unwrap();
    assert!(value.is_sensitive());
    let encoded = value.to_str().unwrap().strip_prefix("Basic ").unwrap();
    let pair = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap();
    Ok(pair.strip_prefix("x-access-token:").unwrap().to_owned())
}

#[tokio::test]
async fn token_is_minted_once_shared_and_renewed() {
    let ep = start_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(store_for(&ep, &write_key(dir.path())));
    // A short life: renewed once half of it is gone.
    ep.life_ms.store(3000, Ordering::SeqCst);

    // Concurrent first callers share one mint.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { token(&store).await.unwrap() })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), "ghs_test1");
    }
    assert_eq!(ep.minted.load(Ordering::SeqCst), 1);
    // Reused while valid.
    assert_eq!(token(&store).await.unwrap(), "ghs_test1");
    assert_eq!(ep.minted.load(Ordering::SeqCst), 1);

    // Past half its life: renewed.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(token(&store).await.unwrap(), "ghs_test2");
    assert_eq!(ep.minted.load(Ordering::SeqCst), 2);

    // A renewal that fails keeps the current token, and is not retried at once.
    ep.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(token(&store).await.unwrap(), "ghs_test2");
    assert_eq!(token(&store).await.unwrap(), "ghs_test2");
    // Once it has expired, the failure shows, without the key or any token.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = token(&store).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("answered 500"), "{text}");
    assert!(text.contains("Server Error"), "{text}");
    assert!(!text.contains("ghs_"), "{text}");
    let debug = format!("{store:?} {err:?}");
    assert!(!debug.contains("ghs_"), "{debug}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    assert!(debug.contains("app_id: 123"), "{debug}");

    // Back to normal: a long-lived token is reused.
    ep.failing.store(false, Ordering::SeqCst);
    ep.life_ms.store(3_600_000, Ordering::SeqCst);
    assert_eq!(token(&store).await.unwrap(), "ghs_test3");
    assert_eq!(token(&store).await.unwrap(), "ghs_test3");
    assert_eq!(ep.minted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn wrong_key_or_untrusted_endpoint_fails_cleanly() {
    let ep = start_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    // Another RSA key: the endpoint cannot verify the JWT.
    let other = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let other_path = dir.path().join("other.pem");
    std::fs::write(
        &other_path,
        other
            .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let store = store_for(&ep, &other_path);
    let text = token(&store).await.unwrap_err().to_string();
    assert!(text.contains("answered 401"), "{text}");
    assert!(text.contains("could not be decoded"), "{text}");
    assert!(!text.contains("eyJ"), "JWT in error: {text}");
    assert_eq!(ep.minted.load(Ordering::SeqCst), 0);

    // The system roots do not trust the test CA.
    let untrusted =
        CredentialStore::from_config(&raw(&ep.url, &write_key(dir.path()), "")).unwrap();
    let text = token(&untrusted).await.unwrap_err().to_string();
    assert!(text.contains("TLS with"), "{text}");
    assert_eq!(ep.minted.load(Ordering::SeqCst), 0);
}

fn app(r: &mut RawCredentials) -> &mut RawGithubApp {
    match &mut r.get_mut("github").unwrap().source {
        RawSource::GithubApp(app) => app,
        other => unreachable!("{other:?}"),
    }
}

#[test]
fn config_is_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path());
    // The error as the user sees it, or "loaded".
    let load = |raw: &RawCredentials| match CredentialStore::from_config(raw) {
        Ok(_) => "loaded".to_owned(),
        Err(e) => e.to_string(),
    };
    let mut r = raw("https://api.github.com", &key, "");
    assert_eq!(load(&r), "loaded");

    app(&mut r).api_url = "http://api.github.com".into();
    assert!(
        load(&r)
            .contains("source.github_app.api_url: `http://api.github.com` must be an https:// URL"),
        "{}",
        load(&r)
    );
    app(&mut r).api_url = "https://ghe.example.com/api/v3/".into();
    assert_eq!(load(&r), "loaded");
    app(&mut r).repositories = vec!["acme/widgets".into()];
    assert!(load(&r).contains("without the owner"), "{}", load(&r));
    app(&mut r).repositories.clear();
    app(&mut r).permissions = [("contents".to_owned(), "rw".to_owned())].into();
    assert!(load(&r).contains("read, write, admin"), "{}", load(&r));
    app(&mut r).permissions.clear();
    app(&mut r).app_id = 0;
    assert!(
        load(&r).starts_with("credentials.github.source.github_app.app_id"),
        "{}",
        load(&r)
    );
    app(&mut r).app_id = 1;
    app(&mut r).private_key = "key.pem".into();
    assert!(load(&r).contains("not an absolute path"), "{}", load(&r));

    let not_key = dir.path().join("cert.pem");
    std::fs::write(
        &not_key,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    app(&mut r).private_key = not_key;
    assert!(load(&r).contains("no PEM private key"), "{}", load(&r));
    let ec = dir.path().join("ec.pem");
    std::fs::write(&ec, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    app(&mut r).private_key = ec;
    assert!(load(&r).contains("not RSA"), "{}", load(&r));
    app(&mut r).private_key = dir.path().join("missing.pem");
    assert!(load(&r).contains("cannot read"), "{}", load(&r));

    // Unknown keys are refused.
    let text = format!(
        "github:\n  source:\n    github_app: {{ app_id: 1, installation_id: 2, private_key: {}, scope: all }}\n  inject: {{ header: Authorization }}\n  hosts: [github.com]\n",
        key.display()
    );
    assert!(serde_yaml_ng::from_str::<RawCredentials>(&text).is_err());
}

/// What the daemon logs while `f` runs on this thread.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    text
}

#[test]
fn tokens_not_narrowed_are_warned_of_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path());
    let load = |raw: RawCredentials| logged(|| drop(CredentialStore::from_config(&raw).unwrap()));
    // Narrowed both ways: nothing said.
    let said = load(raw("https://api.github.com", &key, ""));
    assert!(!said.contains("not narrowed"), "{said}");
    let mut r = raw("https://api.github.com", &key, "");
    app(&mut r).repositories.clear();
    let said = load(r.clone());
    assert!(said.contains("WARN"), "{said}");
    assert!(
        said.contains("every repository of the installation"),
        "{said}"
    );
    assert!(!said.contains("every permission"), "{said}");
    app(&mut r).permissions.clear();
    let said = load(r);
    assert!(
        said.contains("every repository of the installation, with every permission the App has"),
        "{said}"
    );
}

#[test]
fn jwt_has_the_claims_github_expects() {
    let key = parse_key(app_key().0.as_bytes()).unwrap();
    let jwt = sign_jwt(&key, 42, 1_700_000_000).unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(
        URL_SAFE_NO_PAD.decode(parts[0]).unwrap(),
        br#"{"alg":"RS256","typ":"JWT"}"#
    );
    assert_eq!(
        URL_SAFE_NO_PAD.decode(parts[1]).unwrap(),
        br#"{"iat":1699999940,"exp":1700000540,"iss":42}"#
    );
    let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &app_key().1);
    public
        .verify(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        )
        .unwrap();

    let ep = endpoint("https://ghe.example.com:8443/api/v3/", 9).unwrap();
    // Host, port and path prefix of api_url: the client requests `path` below the prefix.
    assert_eq!(
        ep.url,
        "https://ghe.example.com:8443/api/v3/app/installations/9/access_tokens"
    );
    assert_eq!(ep.path, "/app/installations/9/access_tokens");
    assert_eq!(
        Server::parse("https://ghe.example.com:8443/api/v3/")
            .unwrap()
            .url(&ep.path),
        ep.url
    );
    let ep = endpoint(GITHUB_API_URL, 9).unwrap();
    assert_eq!(ep.path, "/app/installations/9/access_tokens");
    assert_eq!(
        ep.url,
        "https://api.github.com/app/installations/9/access_tokens"
    );
    assert!(endpoint("https://user:pw@api.github.com", 1).is_err());
    assert!(endpoint("https://api.github.com/?x=1", 1).is_err());
    assert!(endpoint("api.github.com", 1).is_err());
}

#[tokio::test]
async fn quarantine_revokes_the_live_token_with_the_api() {
    let ep = start_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store_for(&ep, &write_key(dir.path()));
    assert!(store.can_revoke("github"));
    // Nothing minted yet: nothing to revoke, and nothing is minted to revoke it.
    let none = store.revoke("github").await.unwrap();
    assert!(none.contains("no live value"), "{none}");
    assert_eq!(ep.minted.load(Ordering::SeqCst), 0);
    assert_eq!(token(&store).await.unwrap(), "ghs_test1");
    let how = store.revoke("github").await.unwrap();
    assert!(how.contains("204"), "{how}");
    assert!(!how.contains("ghs_"), "{how}");
    assert_eq!(*ep.revoked.lock().unwrap(), ["ghs_test1"]);
    // The revoked token is gone from the cache: the next use mints a new one.
    assert_eq!(token(&store).await.unwrap(), "ghs_test2");
    // A refusal is an error that names the endpoint and status, never the token.
    ep.revoked.lock().unwrap().push("ghs_test2".into());
    let err = store.revoke("github").await.unwrap_err();
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("ghs_"), "{err}");
}
