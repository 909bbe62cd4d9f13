//! The proxy end to end with git rules: a real `git` client cloning and pushing through
//! the proxy to a local HTTPS origin that runs `git http-backend` on bare repositories
//! made here (the end-to-end tests skip, saying why, without git); pushes read from
//! pkt-lines, plain and gzip.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;
use crate::audit::{ProxyRecord, ProxyVerdict as Verdict};
use crate::credentials::{CredentialStore, RawCredentials};
use crate::policy::git::tests::{agent_rule, command, rule, B, Z};
use crate::policy::git::{CommandList, GitRule, RawGitRule};
use crate::proxy::{AuditSink, CertAuthority, ConnInfo, Proxy, ProxyConfig, Route};

const HOST: &str = "git.example.com";
const TOKEN: &str = "ghs_gittest_0123456789";
const LIMIT: Duration = Duration::from_secs(60);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether `git` and `git http-backend` can be run here; prints why not.
fn have_git() -> bool {
    let ok = std::process::Command::new("git")
        .args(["http-backend"])
        .env("REQUEST_METHOD", "GET")
        .env("PATH_INFO", "/none")
        .env("GIT_PROJECT_ROOT", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("skipped: `git` (with git http-backend) is not installed");
    }
    ok
}

/// Runs git with a clean environment, trusting `ca` and sending `HOST` to 127.0.0.1.
async fn git(cwd: &Path, env: &GitEnv, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new("git")
        .arg("-c")
        .arg(format!("http.curloptResolve={HOST}:{}:127.0.0.1", env.port))
        .args([
            "-c",
            "user.name=Agent",
            "-c",
            "user.email=agent@example.com",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "credential.helper=",
        ])
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &env.home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSL_CAINFO", &env.ca)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

struct GitEnv {
    port: u16,
    home: PathBuf,
    ca: PathBuf,
}

/// Plain git on a local path (for the origin's own repositories).
fn git_local(cwd: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Origin",
            "-c",
            "user.email=origin@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An HTTPS origin for `HOST` serving the bare repositories under `root` with `git
/// http-backend`, refusing requests without the injected credential.
async fn start_origin(root: PathBuf) -> (SocketAddr, String) {
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "git origin test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![HOST.to_owned()])
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let root = Arc::new(root);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let root = root.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let root = root.clone();
                    async move { Ok::<_, Infallible>(http_backend(req, &root).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, ca.pem())
}

async fn http_backend(req: Request<Incoming>, root: &Path) -> Response<Full<Bytes>> {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{TOKEN}"))
    );
    if req.headers().get("authorization").map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
        return Response::builder()
            .status(StatusCode::FORBIDDEN)
            .body(Full::new(Bytes::from_static(b"no credential\n")))
            .unwrap();
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", req.method().as_str())
        .env("PATH_INFO", req.uri().path())
        .env("QUERY_STRING", req.uri().query().unwrap_or(""))
        .env("CONTENT_TYPE", header("content-type"))
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.unwrap().stdout;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            out.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        })
        .unwrap();
    let head = String::from_utf8_lossy(&out[..split.0]).into_owned();
    let mut response = Response::builder();
    for line in head.lines() {
        let (name, value) = line.split_once(':').unwrap();
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            response = response.status(value[..3].parse::<u16>().unwrap());
        } else {
            response = response.header(name, value);
        }
    }
    response
        .body(Full::new(Bytes::copy_from_slice(&out[split.1..])))
        .unwrap()
}

struct Harness {
    env: GitEnv,
    records: mpsc::UnboundedReceiver<ProxyRecord>,
    credentials: Arc<CredentialStore>,
    /// The sandbox's share of the held-body budget.
    held: Arc<tokio::sync::Semaphore>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// The record of the last request whose path ends with `suffix`, among those so far.
    fn last(&mut self, suffix: &str) -> ProxyRecord {
        let mut found = None;
        while let Ok(r) = self.records.try_recv() {
            assert!(!format!("{r:?}").contains(TOKEN), "secret in record");
            if r.path.as_deref().is_some_and(|p| p.ends_with(suffix)) {
                found = Some(r);
            }
        }
        found.unwrap()
    }
}

/// The proxy on 127.0.0.1 for `HOST`, with a git rule, relaying to `origin`.
async fn start_proxy(origin: SocketAddr, origin_ca: &str, git_rule: GitRule) -> Harness {
    start_proxy_injecting(
        origin,
        origin_ca,
        git_rule,
        "{ basic: { user: x-access-token } }",
    )
    .await
}

/// [`start_proxy`] with the credential's `inject` given.
async fn start_proxy_injecting(
    origin: SocketAddr,
    origin_ca: &str,
    git_rule: GitRule,
    inject: &str,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(CertAuthority::load_or_create(dir.path().join("ca")).unwrap());
    let ca_file = dir.path().join("proxy-ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let origin_ca_file = dir.path().join("origin-ca.pem");
    std::fs::write(&origin_ca_file, origin_ca).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let raw: RawCredentials = serde_yaml_ng::from_str(&format!(
        "git:\n  source: {{ file: {} }}\n  inject: {inject}\n  hosts: [{HOST}]\n",
        token.display()
    ))
    .unwrap();
    let credentials = Arc::new(CredentialStore::from_config(&raw).unwrap());
    let kept = credentials.clone();
    let config = ProxyConfig {
        upstream_ca: Some(origin_ca_file),
        ..ProxyConfig::default()
    };
    let (tx, records) = mpsc::unbounded_channel();
    let audit: AuditSink = Arc::new(move |record| {
        let _ = tx.send(record);
    });
    let proxy = Arc::new(Proxy::new(config, ca, credentials, audit).unwrap());
    let route = Arc::new(Route {
        rule_name: "git".to_owned(),
        passthrough: false,
        credential: Some("git".to_owned()),
        host_allowed: Box::new(|name| name == HOST),
        request_allowed: Box::new(|_, _| Ok(())),
        explicitly_covers: Box::new(|ip| ip.is_loopback()),
        names_exactly: Box::new(|ip| ip.is_loopback()),
        git: Some(Arc::new(git_rule)),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(tokio::sync::Semaphore::new(
        proxy.config().max_requests_per_sandbox,
    ));
    // One sandbox's share of the held-body budget, over all its connections.
    let held = crate::proxy::held_bodies_share();
    let share = held.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((stream, peer)) = listener.accept().await {
            n += 1;
            let conn = ConnInfo {
                original_dst: origin,
                peer,
                sandbox: "sbx".to_owned(),
                connection_id: format!("conn-{n}"),
                route: route.clone(),
                requests: requests.clone(),
                held_bodies: share.clone(),
                closing: Arc::default(),
            };
            tokio::spawn(proxy.clone().serve(stream, conn));
        }
    });
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    Harness {
        env: GitEnv {
            port,
            home,
            ca: ca_file,
        },
        records,
        credentials: kept,
        held,
        _dir: dir,
    }
}

/// Bare `acme/widgets.git` and `acme/secret.git` under a new root, each with one
/// commit on main.
fn origin_repos() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let seed = root.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    git_local(&seed, &["init", "-q"]);
    std::fs::write(seed.join("README"), "hello\n").unwrap();
    git_local(&seed, &["add", "README"]);
    git_local(&seed, &["commit", "-q", "-m", "first"]);
    let repos = root.path().join("repos");
    for name in ["widgets", "secret"] {
        let bare = repos.join("acme").join(format!("{name}.git"));
        std::fs::create_dir_all(&bare).unwrap();
        git_local(&bare, &["init", "-q", "--bare"]);
        git_local(&seed, &["push", "-q", bare.to_str().unwrap(), "main"]);
    }
    (root, repos)
}

fn origin_ref(repos: &Path, name: &str) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--verify", "-q", name])
        .current_dir(repos.join("acme/widgets.git"))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_and_push_through_the_proxy() {
    if !have_git() {
        return;
    }
    tokio::time::timeout(LIMIT, async {
        let (_root, repos) = origin_repos();
        let (origin, origin_ca) = start_origin(repos.clone()).await;
        let mut h = start_proxy(origin, &origin_ca, agent_rule()).await;
        let work = tempfile::tempdir().unwrap();
        let url = format!("https://{HOST}:{}/acme/widgets.git", h.env.port);

        // Clone (protocol v2 upload-pack) with the credential injected.
        let (ok, err) = git(work.path(), &h.env, &["clone", "-q", &url, "w"]).await;
        assert!(ok, "clone: {err}");
        let r = h.last("/git-upload-pack");
        assert_eq!(r.verdict, Verdict::Allow);
        assert_eq!(r.credential.as_deref(), Some("git"));
        let audit = r.git.unwrap();
        assert_eq!((audit.repo.as_str(), audit.service.as_str()), ("acme/widgets", "git-upload-pack"));

        let w = work.path().join("w");
        std::fs::write(w.join("change"), "agent work\n").unwrap();
        git(&w, &h.env, &["add", "change"]).await;
        let (ok, err) = git(&w, &h.env, &["commit", "-q", "-m", "agent"]).await;
        assert!(ok, "{err}");

        // An allowed push goes through.
        let (ok, err) = git(&w, &h.env, &["push", "origin", "HEAD:refs/heads/agent/one"]).await;
        assert!(ok, "push: {err}");
        let head = git_local(&w, &["rev-parse", "HEAD"]);
        assert_eq!(origin_ref(&repos, "refs/heads/agent/one").as_deref(), Some(head.as_str()));
        let r = h.last("/git-receive-pack");
        assert_eq!(r.verdict, Verdict::Allow);
        assert_eq!(r.status, Some(200));
        let updates = r.git.unwrap().ref_updates;
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].ref_name, "refs/heads/agent/one");
        assert_eq!(updates[0].new, head);
        assert!(updates[0].allowed);

        // Pushing main is refused, and git says why.
        let main_before = origin_ref(&repos, "refs/heads/main");
        let (ok, err) = git(&w, &h.env, &["push", "origin", "HEAD:main"]).await;
        assert!(!ok);
        assert!(
            err.contains(
                "! [remote rejected] HEAD -> main (refused by egress policy: allowed refs/heads/agent/**)"
            ),
            "{err}"
        );
        assert_eq!(origin_ref(&repos, "refs/heads/main"), main_before);
        let r = h.last("/git-receive-pack");
        assert_eq!(r.verdict, Verdict::Deny);
        assert_eq!(r.status, Some(200));
        assert!(r.reason.unwrap().starts_with("git push refused: 1 of 1"));
        assert!(!r.git.unwrap().ref_updates[0].allowed);

        // A push larger than git's post buffer (sent chunked, after a probe request), and
        // than the 64 MiB drained after other refused uploads, is answered as soon as its
        // command list is judged, and the rest of its body read and dropped after the
        // answer, so that git still reads it.
        let mut noise = Vec::with_capacity(72 << 20);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        while noise.len() < 72 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(w.join("big"), &noise).unwrap();
        git(&w, &h.env, &["add", "big"]).await;
        let (ok, err) = git(&w, &h.env, &["commit", "-q", "-m", "big"]).await;
        assert!(ok, "{err}");
        let (ok, err) = git(&w, &h.env, &["push", "origin", "HEAD:main"]).await;
        assert!(!ok);
        assert!(
            err.contains("HEAD -> main (refused by egress policy: allowed refs/heads/agent/**)"),
            "{err}"
        );
        let r = h.last("/git-receive-pack");
        assert!(r.bytes_in < 1 << 20, "the pack was read before the answer: {r:?}");
        assert_eq!(origin_ref(&repos, "refs/heads/main"), main_before);

        // One refused ref stops the whole push.
        let (ok, err) = git(
            &w,
            &h.env,
            &["push", "origin", "HEAD:refs/heads/agent/two", "HEAD:refs/heads/release"],
        )
        .await;
        assert!(!ok);
        assert!(
            err.contains("! [remote rejected] HEAD -> agent/two (not pushed: another ref was refused)"),
            "{err}"
        );
        assert!(err.contains("HEAD -> release (refused by egress policy"), "{err}");
        assert_eq!(origin_ref(&repos, "refs/heads/agent/two"), None);

        // Deleting and tagging are off by default.
        let (ok, err) = git(&w, &h.env, &["push", "origin", ":refs/heads/agent/one"]).await;
        assert!(!ok);
        assert!(err.contains("deleting refs is not allowed"), "{err}");
        assert!(origin_ref(&repos, "refs/heads/agent/one").is_some());

        // Another repository is refused before anything reaches the origin.
        let secret = format!("https://{HOST}:{}/acme/secret.git", h.env.port);
        let (ok, err) = git(work.path(), &h.env, &["clone", "-q", &secret, "s"]).await;
        assert!(!ok);
        assert!(err.contains("403"), "{err}");
        let r = h.last("/info/refs");
        assert_eq!(r.verdict, Verdict::Deny);
        assert!(r.reason.unwrap().contains("acme/secret is not allowed"));
    })
    .await
    .unwrap();
}

/// A pkt-line.
fn pkt(s: &str) -> Vec<u8> {
    let mut v = format!("{:04x}", s.len() + 4).into_bytes();
    v.extend_from_slice(s.as_bytes());
    v
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A git route speaks HTTP/1.1 only: a client offering only HTTP/2 is refused in the TLS
/// handshake, and that is a recorded refusal, not a trust problem.
#[tokio::test]
async fn a_client_offering_only_http2_on_a_git_route_is_refused_and_recorded() {
    tokio::time::timeout(LIMIT, async {
        let (_root, repos) = origin_repos();
        let (origin, origin_ca) = start_origin(repos).await;
        let mut h = start_proxy(origin, &origin_ca, agent_rule()).await;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(&h.env.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", h.env.port))
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from(HOST).unwrap();
        let refused = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        assert!(refused.is_err());
        let record = tokio::time::timeout(Duration::from_secs(5), h.records.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.verdict, Verdict::Deny);
        let reason = record.reason.unwrap_or_default();
        assert!(
            reason.contains("no application protocol this route serves"),
            "{reason}"
        );
    })
    .await
    .unwrap();
}

/// A push's command list is held in the sandbox's share of the held-body budget while it
/// is read: with the share spent, the push is refused with 503 and recorded, and nothing
/// reaches the origin; with the share back, the same push goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_push_is_charged_to_the_sandboxs_share() {
    if !have_git() {
        return;
    }
    tokio::time::timeout(LIMIT, async {
        let (_root, repos) = origin_repos();
        let (origin, origin_ca) = start_origin(repos.clone()).await;
        let mut h = start_proxy(origin, &origin_ca, agent_rule()).await;
        let work = tempfile::tempdir().unwrap();
        let url = format!("https://{HOST}:{}/acme/widgets.git", h.env.port);
        let (ok, err) = git(work.path(), &h.env, &["clone", "-q", &url, "w"]).await;
        assert!(ok, "clone: {err}");
        let w = work.path().join("w");
        std::fs::write(w.join("change"), "agent work\n").unwrap();
        git(&w, &h.env, &["add", "change"]).await;
        let (ok, err) = git(&w, &h.env, &["commit", "-q", "-m", "agent"]).await;
        assert!(ok, "{err}");

        // Other reads of this sandbox hold all but a few bytes of its share.
        let all = h.held.available_permits();
        let taken = h
            .held
            .clone()
            .try_acquire_many_owned(u32::try_from(all - 16).unwrap())
            .unwrap();
        let (ok, err) = git(
            &w,
            &h.env,
            &["push", "origin", "HEAD:refs/heads/agent/busy"],
        )
        .await;
        assert!(!ok, "a push went through with the share spent: {err}");
        let r = h.last("/git-receive-pack");
        assert_eq!((r.verdict, r.status), (Verdict::Deny, Some(503)), "{r:?}");
        assert!(
            r.reason.as_deref().unwrap_or("").contains("already holds"),
            "{r:?}"
        );
        assert_eq!(origin_ref(&repos, "refs/heads/agent/busy"), None);

        // The share back, the same push goes through, and what it held is given back.
        drop(taken);
        let (ok, err) = git(
            &w,
            &h.env,
            &["push", "origin", "HEAD:refs/heads/agent/busy"],
        )
        .await;
        assert!(ok, "push: {err}");
        assert!(origin_ref(&repos, "refs/heads/agent/busy").is_some());
        let freed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while h.held.available_permits() != all {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            freed.is_ok(),
            "{} of {all} permits back",
            h.held.available_permits()
        );
    })
    .await
    .unwrap();
}

/// A git rule's bodies are judged as sent and never rewritten: a placeholder with body
/// replacement on would change a judged command list's pkt-line lengths (and store the
/// secret in a ref name); the sentinel in a push is refused as misdirected instead, while
/// the header placeholder still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placeholder_in_a_push_body_is_never_replaced() {
    if !have_git() {
        return;
    }
    tokio::time::timeout(LIMIT, async {
        let (_root, repos) = origin_repos();
        let (origin, origin_ca) = start_origin(repos.clone()).await;
        let mut h = start_proxy_injecting(
            origin,
            &origin_ca,
            agent_rule(),
            "{ placeholder: { headers: [authorization], body: true } }",
        )
        .await;
        let sentinel = h.credentials.placeholder("sbx", "git").unwrap();
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{sentinel}"));
        let header = format!("http.extraHeader=Authorization: Basic {basic}");
        let work = tempfile::tempdir().unwrap();
        let url = format!("https://{HOST}:{}/acme/widgets.git", h.env.port);
        // Positive control: the header placeholder is replaced.
        let (ok, err) = git(
            work.path(),
            &h.env,
            &["-c", &header, "clone", "-q", &url, "w"],
        )
        .await;
        assert!(ok, "clone: {err}");
        let w = work.path().join("w");
        std::fs::write(w.join("change"), "agent work\n").unwrap();
        git(&w, &h.env, &["add", "change"]).await;
        let (ok, err) = git(&w, &h.env, &["commit", "-q", "-m", "agent"]).await;
        assert!(ok, "{err}");
        let target = format!("HEAD:refs/heads/agent/{sentinel}");
        let (ok, err) = git(&w, &h.env, &["-c", &header, "push", "origin", &target]).await;
        assert!(!ok, "a push naming the placeholder went through: {err}");
        let refs = git_local(&repos.join("acme/widgets.git"), &["for-each-ref"]);
        assert!(!refs.contains(TOKEN) && !refs.contains(&sentinel), "{refs}");
        let r = h.last("/git-receive-pack");
        assert_eq!(r.verdict, Verdict::Deny, "{r:?}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_pushes_are_inspected_and_forwarded_as_sent() {
    if !have_git() {
        return;
    }
    tokio::time::timeout(LIMIT, async {
        let (_root, repos) = origin_repos();
        let (origin, origin_ca) = start_origin(repos.clone()).await;
        let main = origin_ref(&repos, "refs/heads/main").unwrap();
        let bare = repos.join("acme/widgets.git");
        git_local(&bare, &["update-ref", "refs/heads/agent/old", &main]);
        let rule = rule("repos: [acme/widgets]\npush: { refs: [\"refs/heads/agent/**\"], delete: true }\n");
        let mut h = start_proxy(origin, &origin_ca, rule).await;

        let tls = {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(
                rustls_pki_types::CertificateDer::pem_file_iter(&h.env.ca)
                    .unwrap()
                    .map(Result::unwrap),
            );
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth()
        };
        let port = h.env.port;
        let push = |body: Vec<u8>| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
                    .connect(rustls_pki_types::ServerName::try_from(HOST).unwrap(), tcp)
                    .await
                    .unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
                tokio::spawn(conn);
                let request = Request::builder()
                    .method(Method::POST)
                    .uri("/acme/widgets/git-receive-pack")
                    .header("host", HOST)
                    .header("content-type", "application/x-git-receive-pack-request")
                    .header("content-encoding", "gzip")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let response = sender.send_request(request).await.unwrap();
                let status = response.status();
                let ct = response.headers().get("content-type").cloned();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, ct, body)
            }
        };

        // Refused: the proxy answers with a plain (no side-band) status report.
        let mut body = pkt(&format!("{main} {Z} refs/heads/main\0report-status"));
        body.extend_from_slice(b"0000");
        let (status, ct, answer) = push(gzip(&body)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct.unwrap(), RECEIVE_PACK_RESULT);
        assert_eq!(
            &answer[..],
            b"000eunpack ok\n004dng refs/heads/main refused by egress policy: allowed refs/heads/agent/**\n0000"
        );
        assert!(origin_ref(&repos, "refs/heads/main").is_some());
        let r = h.last("/git-receive-pack");
        assert_eq!(r.verdict, Verdict::Deny);
        assert_eq!(r.bytes_in, gzip(&body).len() as u64);

        // Allowed (a deletion needs no pack): the compressed body reaches git as sent.
        let mut body = pkt(&format!("{main} {Z} refs/heads/agent/old\0report-status"));
        body.extend_from_slice(b"0000");
        let (status, _, answer) = push(gzip(&body)).await;
        assert_eq!(status, StatusCode::OK);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains("ok refs/heads/agent/old"), "{answer}");
        assert_eq!(origin_ref(&repos, "refs/heads/agent/old"), None);
        let r = h.last("/git-receive-pack");
        assert_eq!(r.verdict, Verdict::Allow);
        assert_eq!(r.bytes_in, gzip(&body).len() as u64);

        // Malformed: refused with 403 and why.
        let (status, _, answer) = push(gzip(b"00zz")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(String::from_utf8_lossy(&answer).contains("not four hex digits"));
    })
    .await
    .unwrap();
}

/// git reads capabilities split by tabs and line ends too, and `push-options=<x>` as
/// `push-options`: neither may hide the options that follow from the judgement.
#[test]
fn push_options_cannot_hide_behind_another_capability_spelling() {
    let pkt = |s: &str| format!("{:04x}{s}", s.len() + 4);
    let body = |caps: &str| {
        format!(
            "{}0000{}0000PACK",
            pkt(&format!("{Z} {B} refs/heads/agent/x\0{caps}")),
            pkt("ci.skip\n")
        )
        .into_bytes()
    };
    // Announced with a value: the options are read (and judged).
    let list = parse_commands(&body("report-status push-options=1"))
        .unwrap()
        .unwrap();
    assert_eq!(list.options, ["ci.skip"]);
    assert!(agent_rule().judge_push(&list).refused.is_some());
    // Separated as git also separates them: refused, never read as "no options".
    for caps in [
        "report-status\tpush-options",
        "report-status\rpush-options",
        "report-status\npush-options side-band-64k",
        "report-status\u{b}push-options",
    ] {
        let err = parse_commands(&body(caps)).unwrap_err();
        assert!(
            err.contains("capability list holds byte"),
            "{caps:?}: {err}"
        );
    }
    // A capability that only starts like it is another one: the options are not read as
    // options, and what follows the section is then not a pack, so the push is refused.
    let raw = body("report-status push-optionsx");
    let list = parse_commands(&raw).unwrap().unwrap();
    assert!(list.options.is_empty());
    let err = super::try_parse(&raw, super::Encoding::Identity, true);
    assert!(err.is_err(), "{err:?}");
}

#[test]
fn push_options_are_refused_unless_listed() {
    let pkt = |s: &str| format!("{:04x}{s}", s.len() + 4);
    let body = |options: &[&str]| {
        let mut b = pkt(&format!(
            "{Z} {B} refs/heads/agent/x\0report-status push-options"
        ));
        b.push_str("0000");
        for o in options {
            b.push_str(&pkt(&format!("{o}\n")));
        }
        b.push_str("0000PACK");
        b.into_bytes()
    };
    let raw = body(&["ci.skip", "merge_request.title=x\u{1b}[31m"]);
    let list = parse_commands(&raw).unwrap().unwrap();
    assert_eq!(list.options, ["ci.skip", "merge_request.title=x\u{1b}[31m"]);
    assert_eq!(list.len, raw.len() - 4);
    // Cut anywhere before the options' flush: more bytes needed.
    for cut in 0..list.len {
        assert_eq!(parse_commands(&raw[..cut]), Ok(None), "cut at {cut}");
    }
    // Without the capability, what follows the flush is the pack, not options.
    let plain = parse_commands(
        format!(
            "{}0000PACK",
            pkt(&format!("{Z} {B} refs/heads/agent/x\0report-status"))
        )
        .as_bytes(),
    )
    .unwrap()
    .unwrap();
    assert!(plain.options.is_empty());

    let none = agent_rule();
    let j = none.judge_push(&list);
    let summary = j.refused.unwrap();
    assert!(
        summary.contains("push option \"ci.skip\" is not allowed (allowed: none)"),
        "{summary}"
    );
    assert!(j.results.iter().all(Result::is_err));
    let report = status_report(&list, &j.results);
    let text = String::from_utf8_lossy(&report);
    assert!(
        text.contains("ng refs/heads/agent/x refused by egress policy: push option"),
        "{text}"
    );

    let listed = rule(
        "repos: [a/b]\npush: { refs: [\"refs/heads/agent/**\"], options: [ci.skip, \"merge_request.title=*\"] }\n",
    );
    assert_eq!(listed.judge_push(&list).refused, None);
    let other = parse_commands(&body(&["ci.skipx"])).unwrap().unwrap();
    assert!(listed.judge_push(&other).refused.is_some());
    let escaped = parse_commands(&body(&["x\u{1b}]0;owned\u{7}"]))
        .unwrap()
        .unwrap();
    let j = listed.judge_push(&escaped);
    let report = status_report(&escaped, &j.results);
    assert!(
        !report.contains(&0x1b) && !report.contains(&0x07),
        "{report:?}"
    );
    let any = rule("repos: [a/b]\npush: { refs: [\"refs/**\"], options: true }\n");
    assert_eq!(any.judge_push(&escaped).refused, None);
    let off = rule("repos: [a/b]\npush: { refs: [\"refs/**\"], options: false }\n");
    assert!(off.judge_push(&other).refused.is_some());

    let err = |yaml: &str| {
        GitRule::compile(&serde_yaml_ng::from_str::<RawGitRule>(yaml).unwrap()).unwrap_err()
    };
    for bad in [
        "[\"\"]",
        "[\"a b\"]",
        "[\"ci.*\"]",
        "[\"=*\"]",
        "[\"a*=*\"]",
    ] {
        let e = err(&format!(
            "repos: [a/b]\npush: {{ refs: [\"refs/**\"], options: {bad} }}\n"
        ));
        assert!(e.starts_with("push.options[0]:"), "{bad}: {e}");
    }
}

#[test]
fn control_characters_in_ref_names_are_escaped_in_reports() {
    let name = "refs/heads/agent/x\u{1b}[2J\r\u{85}";
    let list = CommandList {
        commands: vec![command(Z, B, name)],
        capabilities: vec!["report-status".to_owned()],
        options: Vec::new(),
        len: 0,
    };
    let j = agent_rule().judge_push(&list);
    assert!(j.refused.is_some());
    let report = status_report(&list, &j.results);
    let text = String::from_utf8(report.to_vec()).unwrap();
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert!(
        text.contains("ng refs/heads/agent/x\\u{1b}[2J\\u{d}\\u{85} refused"),
        "{text:?}"
    );
}
