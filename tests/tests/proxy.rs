//! The credential-injecting TLS proxy, end to end: real clients in a sandbox (curl over
//! HTTP/1.1 and HTTP/2, python's urllib, git) that hold no token and trust only the
//! proxy's exported CA reach real HTTPS origins (nginx, `git http-backend`) in the world
//! namespace, and succeed only because egressd adds the credential; everything the
//! policy does not allow is refused, recorded, and never reaches an origin (a POST whose
//! form body names another method among them).
//!
//! The setup ([`ProxyFixture`]): `api.github.com` (192.0.2.10) and `github.com`
//! (192.0.2.11) behind `action: proxy` rules with the `github` (Bearer) and `github-git`
//! (Basic, `x-access-token`) credentials, `pinned.example` (192.0.2.20) behind an
//! `action: passthrough` rule, names from the sandbox's `/etc/netns/<ns>/hosts`, and
//! `elsewhere.example` pointing at the canary. `tests/proxy_origins.rs` checks the
//! origins themselves without a daemon.
//!
//! Needs root, cgroup v2, bpffs, nginx, openssl, curl, git and the egressd binaries
//! (`cargo build -p agent-userspace`); skips without root. Run:
//! `cargo test -p egress-tests --test proxy -- --test-threads=2`.

use std::net::IpAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use egress_tests::audit::{get_str, get_u64, Match};
use egress_tests::expect::{self, all_output, RECORD_TIMEOUT};
use egress_tests::https_origin::{
    basic, bearer, OriginRequest, API_V4, ECHO_PATH, GIT_V4, ISSUE_BODY, MOVED_PATH, MOVED_TO,
    PINNED_BODY, PINNED_V4, REPO_BODY, REPO_FILE, UNAUTHORIZED_BODY,
};
use egress_tests::pki::spki_pin;
use egress_tests::proxy_fixture::{
    GithubSource, ProxyFixture, ProxyOpts, DIRECT_POLICY, ELSEWHERE_HOST,
};
use egress_tests::require_proxy_tools;
use serde_json::Value;

const REPO_URL: &str = "https://api.github.com/repos/acme/widgets";
const ISSUES_URL: &str = "https://api.github.com/repos/acme/widgets/issues";
const GIT_URL: &str = "https://github.com/acme/widgets.git";
const PINNED_URL: &str = "https://pinned.example/";

/// curl's exit codes.
const CURL_SSL_CONNECT: i32 = 35;
const CURL_PEER_FAILED_VERIFICATION: i32 = 60;

/// What curl printed, split from its `-w` trailer.
#[derive(Debug)]
struct Resp {
    body: String,
    status: u16,
    version: String,
    redirect: String,
    out: Output,
}

/// curl with `-w` reporting status, HTTP version and redirect URL after the body.
fn curl_resp(fx: &ProxyFixture, args: &[&str]) -> Result<Resp> {
    let mut all = args.to_vec();
    all.extend(["-w", "\n@@%{http_code} %{http_version} %{redirect_url}"]);
    parse_resp(fx.curl(&all)?)
}

fn parse_resp(out: Output) -> Result<Resp> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some((body, trailer)) = text.rsplit_once("\n@@") else {
        bail!("curl printed no -w trailer: {}", all_output(&out));
    };
    let mut f = trailer.splitn(3, ' ');
    let status = f.next().unwrap_or("").parse().unwrap_or(0);
    let version = f.next().unwrap_or("").to_string();
    let redirect = f.next().unwrap_or("").trim().to_string();
    Ok(Resp {
        body: body.to_string(),
        status,
        version,
        redirect,
        out,
    })
}

/// The response was `status` with `body` (when given) over HTTP `version` (when given).
fn ensure_resp(r: &Resp, status: u16, body: Option<&str>, version: Option<&str>) -> Result<()> {
    ensure!(
        r.out.status.success()
            && r.status == status
            && body.is_none_or(|b| r.body == b)
            && version.is_none_or(|v| r.version == v),
        "expected {status} {body:?} over HTTP {version:?}, got {} {:?} over {:?}: {}",
        r.status,
        r.body,
        r.version,
        all_output(&r.out)
    );
    Ok(())
}

fn sandbox_ip(fx: &ProxyFixture) -> String {
    fx.sandbox.addrs().v4.to_string()
}

/// Every request reached the origin with `auth`, via the proxy (not from the sandbox's
/// own address: the daemon dials from the world namespace) and with no
/// `Proxy-Authorization`.
fn ensure_injected(fx: &ProxyFixture, reqs: &[OriginRequest], auth: &str) -> Result<()> {
    for r in reqs {
        ensure!(
            r.authorization == auth,
            "the origin got Authorization {:?}, not the injected credential: {r:#?}",
            r.authorization
        );
        ensure!(
            r.proxy_authorization.is_empty(),
            "Proxy-Authorization reached the origin: {r:#?}"
        );
        ensure!(
            r.remote_addr != sandbox_ip(fx),
            "the request came straight from the sandbox, not through the proxy: {r:#?}"
        );
    }
    Ok(())
}

fn is_request(r: &Value, method: &str, path: &str) -> bool {
    get_str(r, "event.action") == Some("http-request")
        && get_str(r, "http.request.method") == Some(method)
        && get_str(r, "url.path") == Some(path)
}

/// The proxy's record of `method path` answered with `status`.
fn request_record(fx: &ProxyFixture, method: &str, path: &str, status: u16) -> Result<Value> {
    fx.wait_proxy_record(
        RECORD_TIMEOUT,
        &format!("{method} {path} -> {status}"),
        |r| {
            is_request(r, method, path)
                && get_u64(r, "http.response.status_code") == Some(u64::from(status))
        },
    )
}

/// `path` has `want` in the record.
fn ensure_field(rec: &Value, path: &str, want: &str) -> Result<()> {
    ensure!(
        get_str(rec, path) == Some(want),
        "{path} should be {want:?} in {rec}"
    );
    Ok(())
}

/// The allowed request's record names the rule, credential, server name and sandbox, and
/// shares its connection id with the kernel's `redirect` record for the connect.
fn ensure_allowed_record(
    fx: &ProxyFixture,
    rec: &Value,
    rule: &str,
    credential: Option<&str>,
    host: &str,
    dst: IpAddr,
) -> Result<()> {
    ensure_field(rec, "egress.verdict", "allow")?;
    ensure_field(rec, "rule.name", rule)?;
    ensure_field(rec, "url.domain", host)?;
    ensure_field(rec, "tls.client.server_name", host)?;
    ensure_field(rec, "egress.sandbox.name", fx.sandbox.label())?;
    ensure!(
        get_str(rec, "egress.credential.name") == credential,
        "egress.credential.name should be {credential:?} in {rec}"
    );
    ensure_linked(fx, rec, dst)
}

/// The kernel recorded the connect behind `rec` as `redirect`, with the same
/// `egress.connection.id`.
fn ensure_linked(fx: &ProxyFixture, rec: &Value, dst: IpAddr) -> Result<()> {
    let id = get_str(rec, "egress.connection.id")
        .filter(|id| !id.is_empty())
        .with_context(|| format!("no egress.connection.id in {rec}"))?
        .to_string();
    let m = Match::decision("redirect", dst, 443).sandbox(fx.sandbox.label());
    fx.daemon
        .wait_for_record(RECORD_TIMEOUT, |r| {
            m.matches(r) && get_str(r, "egress.connection.id") == Some(&id)
        })
        .with_context(|| format!("kernel redirect record with egress.connection.id {id}"))?;
    Ok(())
}

/// The origin logged nothing new since `before`, and the canary heard nothing.
fn nothing_reached(fx: &ProxyFixture, before: usize) -> Result<()> {
    fx.origin_new_exactly(before, 0)?;
    expect::canary_silent(&fx.canary)
}

#[test]
fn curl_http1_and_http2_get_the_injected_token() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let before = fx.origin.requests()?.len();

    let h1 = curl_resp(&fx, &["--http1.1", REPO_URL])?;
    ensure_resp(&h1, 200, Some(REPO_BODY), Some("1.1"))?;
    let h2 = curl_resp(&fx, &["--http2", REPO_URL])?;
    ensure_resp(&h2, 200, Some(REPO_BODY), Some("2"))?;
    let created = curl_resp(
        &fx,
        &[
            "--http2",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{\"title\":\"t\"}",
            ISSUES_URL,
        ],
    )?;
    ensure_resp(&created, 201, Some(ISSUE_BODY), Some("2"))?;
    let head = curl_resp(&fx, &["--http1.1", "-I", REPO_URL])?;
    ensure_resp(&head, 200, None, Some("1.1"))?;

    let reqs = fx.origin_new_exactly(before, 4)?;
    ensure_injected(&fx, &reqs, &bearer(fx.token()))?;
    ensure!(
        reqs.iter()
            .all(|r| r.sni == "api.github.com" && r.host == "api.github.com"),
        "server name / host at the origin: {reqs:#?}"
    );
    let methods: Vec<&str> = reqs.iter().map(|r| r.method.as_str()).collect();
    ensure!(
        methods == ["GET", "GET", "POST", "HEAD"],
        "methods: {reqs:#?}"
    );

    let api = IpAddr::V4(API_V4);
    let get = request_record(&fx, "GET", "/repos/acme/widgets", 200)?;
    ensure_allowed_record(
        &fx,
        &get,
        "github-api",
        Some("github"),
        "api.github.com",
        api,
    )?;
    ensure_field(&get, "egress.tls_mode", "intercept")?;
    let post = request_record(&fx, "POST", "/repos/acme/widgets/issues", 201)?;
    ensure_allowed_record(
        &fx,
        &post,
        "github-api",
        Some("github"),
        "api.github.com",
        api,
    )?;
    request_record(&fx, "HEAD", "/repos/acme/widgets", 200)?;
    let n = fx
        .proxy_records()?
        .iter()
        .filter(|r| is_request(r, "GET", "/repos/acme/widgets"))
        .count();
    ensure!(
        n == 2,
        "expected 2 GET records (HTTP/1.1 and HTTP/2), got {n}"
    );

    fx.assert_token_absent(&[&h1.out, &h2.out, &created.out, &head.out])
}

#[test]
fn without_the_proxy_rule_the_origin_answers_401() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let direct = fx.add_sandbox("direct", DIRECT_POLICY)?;
    let origin_ca = fx.ca.cert().display().to_string();
    let proxy_ca = fx.proxy_ca().display().to_string();
    let before = fx.origin.requests()?.len();

    // Allowed plainly, the sandbox reaches the real origin, which wants a token it lacks.
    let out = fx.curl_in(
        &direct.sandbox,
        &origin_ca,
        &[
            "-w",
            "\n@@%{http_code} %{http_version} %{redirect_url}",
            REPO_URL,
        ],
    )?;
    let r = parse_resp(out)?;
    ensure_resp(&r, 401, Some(UNAUTHORIZED_BODY), None)?;
    // It is the origin's own certificate, not one from the proxy's CA.
    let out = fx.curl_in(&direct.sandbox, &proxy_ca, &[REPO_URL])?;
    expect::exit_code(&out, CURL_PEER_FAILED_VERIFICATION)?;
    // git is refused too (asks for a user name it cannot get).
    let out = fx.git_in(
        &direct.sandbox,
        &[
            "-c",
            &format!("http.sslCAInfo={origin_ca}"),
            "clone",
            "-q",
            GIT_URL,
            "direct-clone",
        ],
    )?;
    ensure!(
        !out.status.success() && all_output(&out).contains("could not read Username"),
        "a direct clone must be refused with 401: {}",
        all_output(&out)
    );

    let reqs = fx
        .origin
        .wait_new_at_least(before, 2, Duration::from_secs(5))?;
    let direct_ip = direct.sandbox.addrs().v4.to_string();
    ensure!(
        reqs.iter()
            .all(|r| r.authorization.is_empty() && r.status == 401 && r.remote_addr == direct_ip),
        "direct requests: {reqs:#?}"
    );
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(API_V4), 443)
            .sandbox("direct")
            .rule("direct"),
    )?;

    // The same request from the proxied sandbox succeeds.
    ensure_resp(&curl_resp(&fx, &[REPO_URL])?, 200, Some(REPO_BODY), None)?;
    Ok(())
}

/// A policy that allows the sandbox its own loopback, with the proxy rules beside it.
fn loopback_allowed_policy() -> String {
    format!(
        "{}  - name: own-loopback\n    to: [127.0.0.0/8, \"::1\"]\n    action: allow\n",
        egress_tests::proxy_fixture::PROXY_POLICY
    )
}

#[test]
fn the_proxy_port_is_neither_reachable_directly_nor_bindable_from_the_sandbox() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts {
        policy: loopback_allowed_policy(),
        ..ProxyOpts::default()
    })?;
    // Controls: loopback is allowed (a listener on another port accepts), and the
    // redirected path to the proxy works.
    expect::probe_ok(
        &fx.sandbox
            .probe_host("tcp-connect", "127.0.0.1", 7777, &["--listen"])?,
    )?;
    ensure_resp(&curl_resp(&fx, &[REPO_URL])?, 200, Some(REPO_BODY), None)?;
    // The proxy's own port, reached without the kernel's redirect, in each spelling.
    let port = egress_tests::proxy_fixture::PROXY_PORT;
    for (host, ip) in [
        ("127.0.0.1", IpAddr::from([127, 0, 0, 1])),
        ("::1", IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        ("0.0.0.0", IpAddr::from([0u8; 4])),
        ("::ffff:127.0.0.1", IpAddr::from([127, 0, 0, 1])),
    ] {
        let p = fx.sandbox.probe_host("tcp-connect", host, port, &[])?;
        expect::eperm(&p).with_context(|| format!("connect to {host}:{port}"))?;
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("deny", ip, port).sandbox(fx.sandbox.label()),
        )?;
        ensure!(
            get_str(&rec, "rule.name") == Some("proxy-port"),
            "{host}: {rec}"
        );
    }
    // The proxy itself never saw those connections.
    ensure!(
        !fx.daemon.log().contains("did not redirect"),
        "a direct connection reached the proxy"
    );
    // A process in the sandbox's network namespace but outside its cgroup (no program
    // judges it) does reach the port: the proxy closes the connection unserved, and that
    // refusal is recorded too.
    let out = fx
        .sandbox
        .netns()
        .command(
            10,
            "curl",
            &[
                "-sk",
                "--max-time",
                "5",
                &format!("https://127.0.0.1:{port}/"),
            ],
        )
        .output()?;
    ensure!(
        !out.status.success(),
        "the proxy served it: {}",
        all_output(&out)
    );
    let rec = fx.wait_proxy_record(RECORD_TIMEOUT, "the unredirected connection", |r| {
        get_str(r, "event.action") == Some("tls-connection")
            && get_str(r, "rule.name") == Some("proxy-port")
    })?;
    ensure_field(&rec, "egress.verdict", "deny")?;
    ensure!(
        get_str(&rec, "event.reason").is_some_and(|m| m.contains("did not redirect")),
        "{rec}"
    );

    // Nor the resolvers' ports (another sandbox's resolver would answer in its name).
    for (op, host) in [("udp-sendto", "127.0.0.1"), ("tcp-connect", "::1")] {
        let p = fx.sandbox.probe_host(op, host, 15300 + 9, &[])?;
        expect::eperm(&p).with_context(|| format!("{op} {host}:15309"))?;
    }
    let rec = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::from([127, 0, 0, 1]), 15309).sandbox(fx.sandbox.label()),
    )?;
    ensure!(get_str(&rec, "rule.name") == Some("dns-resolver"), "{rec}");

    // Nor may the sandbox bind the ports of the daemon's listeners (it would take their
    // traffic while the daemon restarts): the proxy's, and any sandbox's resolver's.
    // Control: another port binds.
    expect::probe_ok(&fx.sandbox.probe_host("tcp-bind", "127.0.0.1", 7778, &[])?)?;
    let dns_port = 15300 + 7;
    for (op, host, ip, port, rule) in [
        (
            "tcp-bind",
            "127.0.0.1",
            IpAddr::from([127, 0, 0, 1]),
            port,
            "proxy-port",
        ),
        (
            "tcp-bind",
            "0.0.0.0",
            IpAddr::from([0u8; 4]),
            port,
            "proxy-port",
        ),
        (
            "tcp-bind",
            "::",
            IpAddr::from([0u8; 16]),
            port,
            "proxy-port",
        ),
        (
            "udp-bind",
            "127.0.0.1",
            IpAddr::from([127, 0, 0, 1]),
            dns_port,
            "dns-resolver",
        ),
        (
            "udp-bind",
            "::1",
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            dns_port,
            "dns-resolver",
        ),
    ] {
        let p = fx.sandbox.probe_host(op, host, port, &[])?;
        expect::eperm(&p).with_context(|| format!("{op} {host}:{port}"))?;
        let rec = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
            get_str(r, "event.action") == Some("bind")
                && get_str(r, "destination.ip") == Some(&ip.to_string())
                && get_u64(r, "destination.port") == Some(u64::from(port))
        })?;
        ensure!(
            get_str(&rec, "rule.name") == Some(rule)
                && get_str(&rec, "egress.verdict") == Some("deny"),
            "{op} {host}: {rec}"
        );
    }
    // A socket the kernel redirected, disconnected (`connect(AF_UNSPEC)`) and connected
    // again elsewhere, without a redirect, leaves no destination for the proxy under its
    // new source address (another socket connecting to the proxy from that address would
    // be served as if it were going there).
    let script = r#"
import ctypes, json, socket, struct, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 7779))
listener.listen(1)
s = socket.socket()
s.connect((sys.argv[1], 443))
libc = ctypes.CDLL(None, use_errno=True)
unspec = struct.pack("=H14x", socket.AF_UNSPEC)
rc = libc.connect(s.fileno(), unspec, len(unspec))
s.connect(("127.0.0.1", 7779))
print(json.dumps({"rc": rc, "port": s.getsockname()[1]}))
"#;
    let python = egress_tests::util::python().display().to_string();
    let out = fx.client(
        20,
        &python,
        &[
            "-c",
            script,
            &egress_tests::https_origin::API_V4.to_string(),
        ],
        &[],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: Value = serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("reconnect script: {}", all_output(&out)))?,
    )?;
    ensure!(line["rc"] == 0, "connect(AF_UNSPEC) failed: {line}");
    let second = line["port"].as_u64().context("no port")?;
    let by_peer = fx.daemon.maps_dir().join("BY_PEER");
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&by_peer)
        .output()
        .context("bpftool (scripts/setup.sh installs it)")?;
    ensure!(dump.status.success(), "bpftool: {}", all_output(&dump));
    let entries: Vec<Value> = serde_json::from_slice(&dump.stdout)?;
    let byte = |v: &Value| {
        u8::from_str_radix(v.as_str().unwrap_or("").trim_start_matches("0x"), 16).unwrap_or(0)
    };
    let stale = entries.iter().any(|e| {
        let key: Vec<u8> = e["key"]
            .as_array()
            .map(|k| k.iter().map(byte).collect())
            .unwrap_or_default();
        key.len() >= 26
            && key[8..24] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
            && u64::from(u16::from_ne_bytes([key[24], key[25]])) == second
    });
    ensure!(
        !stale,
        "the proxy would take 127.0.0.1:{second} (an unredirected connection) for a redirected one"
    );

    // A quarantined sandbox may still not bind it (it would take the proxy's traffic
    // across a restart, other sandboxes' in a shared namespace included).
    let out = fx.daemon.ctl([
        "quarantine",
        fx.sandbox.label(),
        "--reason",
        "test: listener ports",
    ])?;
    ensure!(out.status.success(), "quarantine: {}", all_output(&out));
    let binds = || -> Result<usize> {
        Ok(fx
            .daemon
            .audit_records()?
            .iter()
            .filter(|r| {
                get_str(r, "event.action") == Some("bind")
                    && get_u64(r, "destination.port") == Some(u64::from(port))
                    && get_str(r, "rule.name") == Some("proxy-port")
            })
            .count())
    };
    let before = binds()?;
    let p = fx.sandbox.probe_host("tcp-bind", "127.0.0.1", port, &[])?;
    expect::eperm(&p).context("bind to the proxy's port while quarantined")?;
    egress_tests::util::poll(RECORD_TIMEOUT, Duration::from_millis(50), || {
        Ok((binds()? > before).then_some(()))
    })?
    .context("no proxy-port bind record while quarantined")?;
    Ok(())
}

/// A connection the kernel would redirect to the proxy, from a socket bound to the
/// sandbox's link (`SO_BINDTODEVICE`), could never reach the daemon's
/// loopback listeners: it would leave by the link and wait, unanswered, holding its
/// redirect entry. Refused at connect with a record; the same connect unbound is served.
#[test]
fn a_redirect_from_a_socket_bound_to_another_device_is_refused() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let before = fx.origin.requests()?.len();
    // Positive control: unbound, the connect is redirected to the proxy.
    expect::probe_ok(
        &fx.sandbox
            .probe_host("tcp-connect", "192.0.2.10", 443, &[])?,
    )?;
    for (op, host, port) in [
        ("tcp-connect", "192.0.2.10", 443),
        ("tcp-connect", "192.0.2.20", 443),
    ] {
        let p = fx
            .sandbox
            .probe_host(op, host, port, &["--device", "link"])?;
        expect::eperm(&p).with_context(|| format!("{op} {host}:{port} bound to the link"))?;
        let ip: IpAddr = host.parse()?;
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("deny", ip, port).sandbox(fx.sandbox.label()),
        )?;
        ensure!(
            get_str(&rec, "rule.name") == Some("bound-device"),
            "{op} {host}: {rec}"
        );
    }
    nothing_reached(&fx, before)
}

#[test]
fn python_urllib_gets_the_injected_token() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let ca = fx.proxy_ca().display().to_string();
    let before = fx.origin.requests()?.len();

    let check = |v: &Value, status: u64, body: Option<&str>| -> Result<()> {
        ensure!(
            v["ok"] == true
                && v["status"].as_u64() == Some(status)
                && body.is_none_or(|b| v["body"].as_str() == Some(b)),
            "python: expected {status} {body:?}, got {v}"
        );
        Ok(())
    };
    check(
        &fx.python_get(&[REPO_URL, "--cafile", &ca], &[])?,
        200,
        Some(REPO_BODY),
    )?;
    // The default context with SSL_CERT_FILE pointing at the exported CA.
    check(
        &fx.python_get(&[REPO_URL], &[("SSL_CERT_FILE", &ca)])?,
        200,
        Some(REPO_BODY),
    )?;
    check(
        &fx.python_get(
            &[
                ISSUES_URL,
                "--cafile",
                &ca,
                "--method",
                "POST",
                "--header",
                "Content-Type: application/json",
                "--data",
                "{\"title\":\"py\"}",
            ],
            &[],
        )?,
        201,
        Some(ISSUE_BODY),
    )?;
    // Without the proxy's CA python refuses the intercepted connection.
    let origin_only = fx.ca.cert().display().to_string();
    let v = fx.python_get(&[REPO_URL, "--cafile", &origin_only], &[])?;
    ensure!(
        v["ok"] == false
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("CERTIFICATE_VERIFY_FAILED")),
        "python trusting only the origin CA must fail verification: {v}"
    );

    let reqs = fx.origin_new_exactly(before, 3)?;
    ensure_injected(&fx, &reqs, &bearer(fx.token()))?;
    let rec = request_record(&fx, "POST", "/repos/acme/widgets/issues", 201)?;
    ensure_allowed_record(
        &fx,
        &rec,
        "github-api",
        Some("github"),
        "api.github.com",
        IpAddr::V4(API_V4),
    )?;
    fx.assert_token_absent(&[])
}

#[test]
fn git_clone_over_smart_http_gets_the_injected_token() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let ca = format!("http.sslCAInfo={}", fx.proxy_ca().display());
    let before = fx.origin.requests()?.len();

    let out = fx.git(&["-c", &ca, "clone", "-q", GIT_URL, "widgets"])?;
    ensure!(
        out.status.success(),
        "git clone through the proxy failed: {}\n{}",
        all_output(&out),
        fx.origin.error_logs()
    );
    let clone = fx.sandbox_dir().join("widgets");
    let got = std::fs::read_to_string(clone.join(REPO_FILE.0))?;
    ensure!(got == REPO_FILE.1, "cloned {}: {got:?}", REPO_FILE.0);

    let reqs = fx
        .origin
        .wait_new_at_least(before, 2, Duration::from_secs(5))?;
    ensure_injected(&fx, &reqs, &basic(fx.token()))?;
    ensure!(
        reqs.iter().any(|r| r.method == "GET"
            && r.uri == "/acme/widgets.git/info/refs?service=git-upload-pack"
            && r.status == 200)
            && reqs.iter().any(|r| r.method == "POST"
                && r.uri == "/acme/widgets.git/git-upload-pack"
                && r.status == 200)
            && reqs.iter().all(|r| r.sni == "github.com"),
        "git requests at the origin: {reqs:#?}"
    );
    let rec = request_record(&fx, "GET", "/acme/widgets.git/info/refs", 200)?;
    ensure_allowed_record(
        &fx,
        &rec,
        "github-git",
        Some("github-git"),
        "github.com",
        IpAddr::V4(GIT_V4),
    )?;
    request_record(&fx, "POST", "/acme/widgets.git/git-upload-pack", 200)?;

    // Pushing is not in the rule's `http` list: the receive-pack POST is refused by the
    // proxy and never reaches the origin.
    let commit = fx.git(&[
        "-C",
        "widgets",
        "-c",
        "user.name=agent",
        "-c",
        "user.email=agent@example.com",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "agent change",
    ])?;
    ensure!(
        commit.status.success(),
        "git commit: {}",
        all_output(&commit)
    );
    let mark = fx.origin.requests()?.len();
    let push = fx.git(&[
        "-C",
        "widgets",
        "-c",
        &ca,
        "push",
        "-q",
        "origin",
        "HEAD:refs/heads/main",
    ])?;
    ensure!(
        !push.status.success(),
        "git push must be refused: {}",
        all_output(&push)
    );
    request_record(&fx, "POST", "/acme/widgets.git/git-receive-pack", 403).and_then(|r| {
        ensure_field(&r, "egress.verdict", "deny")?;
        ensure_field(&r, "rule.name", "github-git")
    })?;
    std::thread::sleep(expect::CANARY_SETTLE);
    let after = fx.origin.requests()?;
    ensure!(
        after[mark..]
            .iter()
            .all(|r| !r.uri.contains("git-receive-pack") || r.method == "GET"),
        "a receive-pack POST reached the origin: {:#?}",
        &after[mark..]
    );
    fx.assert_token_absent(&[&out, &push])
}

#[test]
fn token_appears_nowhere_the_sandbox_or_auditor_looks() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let ca = fx.proxy_ca().display().to_string();
    // Verbose clients print every header they send and receive.
    let v1 = fx.curl(&["-v", "--http1.1", REPO_URL])?;
    let v2 = fx.curl(&[
        "-v",
        "--http2",
        "-H",
        "Authorization: Bearer stolen",
        REPO_URL,
    ])?;
    let denied = fx.curl(&["-v", "-X", "DELETE", REPO_URL])?;
    let py = fx.client(
        20,
        &egress_tests::util::python().display().to_string(),
        &[
            "-c",
            "import os,ssl,sys,urllib.request as u;\
             c=ssl.create_default_context(cafile=sys.argv[1]);\
             r=u.urlopen(sys.argv[2],context=c,timeout=10);\
             print(r.status,dict(r.headers),r.read().decode(),dict(os.environ))",
            &ca,
            REPO_URL,
        ],
        &[],
    )?;
    ensure!(
        String::from_utf8_lossy(&py.stdout).starts_with("200 "),
        "python: {}",
        all_output(&py)
    );
    let git = fx.git(&[
        "-c",
        &format!("http.sslCAInfo={ca}"),
        "clone",
        "-q",
        GIT_URL,
        "w",
    ])?;
    ensure!(git.status.success(), "git clone: {}", all_output(&git));
    let trace = fx.client(
        30,
        "git",
        &["-c", &format!("http.sslCAInfo={ca}"), "ls-remote", GIT_URL],
        &[
            ("GIT_TRACE_CURL", "1"),
            ("GIT_CONFIG_NOSYSTEM", "1"),
            ("GIT_TERMINAL_PROMPT", "0"),
        ],
    )?;
    ensure!(
        trace.status.success(),
        "git ls-remote: {}",
        all_output(&trace)
    );
    for o in [&v1, &v2] {
        ensure!(o.status.success(), "curl -v: {}", all_output(o));
    }
    ensure!(
        String::from_utf8_lossy(&denied.stdout).len() < 200,
        "403 body should be a short reason: {}",
        all_output(&denied)
    );
    request_record(&fx, "GET", "/repos/acme/widgets", 200)?;
    request_record(&fx, "DELETE", "/repos/acme/widgets", 403)?;
    fx.assert_token_absent(&[&v1, &v2, &denied, &py, &git, &trace])
}

/// curl with `args`, over HTTP/1.1 and HTTP/2, gets `status` with a body naming `naming`;
/// its output is kept in `outs` (to search for the token).
fn refused_on_both(
    fx: &ProxyFixture,
    args: &[&str],
    status: u16,
    naming: &str,
    outs: &mut Vec<Output>,
) -> Result<()> {
    for http in ["--http1.1", "--http2"] {
        let mut with = vec![http];
        with.extend_from_slice(args);
        let r = curl_resp(fx, &with)?;
        ensure!(
            r.status == status && r.body.contains(naming),
            "{args:?} ({http}): expected {status} naming {naming}, got {} {:?}: {}",
            r.status,
            r.body,
            all_output(&r.out)
        );
        outs.push(r.out);
    }
    Ok(())
}

#[test]
fn request_outside_the_http_rules_is_refused_with_403_or_400() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let before = fx.origin.requests()?.len();
    // (method, URL, path in the record, status); each allowed by none of the rule's `http`
    // entries (403), or ambiguous (400).
    let cases: [(&str, &str, &str, u16); 5] = [
        ("DELETE", REPO_URL, "/repos/acme/widgets", 403),
        ("GET", "https://api.github.com/user", "/user", 403),
        (
            "POST",
            "https://api.github.com/repos/acme/widgets/pulls",
            "/repos/acme/widgets/pulls",
            403,
        ),
        (
            "GET",
            "https://api.github.com/repos/acme/other",
            "/repos/acme/other",
            403,
        ),
        (
            "GET",
            "https://api.github.com/repos/acme/widgets/../other",
            "/repos/acme/widgets/../other",
            400,
        ),
    ];
    let mut outs = Vec::new();
    for (method, url, path, want) in cases {
        for http in ["--http1.1", "--http2"] {
            let r = curl_resp(&fx, &[http, "--path-as-is", "-X", method, url])?;
            ensure!(
                r.out.status.success()
                    && r.status == want
                    && !r.body.is_empty()
                    && r.body.len() < 200,
                "{method} {url} ({http}): expected {want} with a short reason, got {} {:?}: {}",
                r.status,
                r.body,
                all_output(&r.out)
            );
            outs.push(r.out);
        }
        let rec = request_record(&fx, method, path, want)?;
        ensure_field(&rec, "egress.verdict", "deny")?;
        ensure_field(&rec, "rule.name", "github-api")?;
        ensure_field(&rec, "event.outcome", "failure")?;
        ensure!(
            get_str(&rec, "event.reason").is_some_and(|r| !r.is_empty()),
            "deny record without event.reason: {rec}"
        );
        ensure!(
            get_str(&rec, "egress.credential.name").is_none(),
            "a refused request names an injected credential: {rec}"
        );
        ensure_linked(&fx, &rec, IpAddr::V4(API_V4))?;
    }
    // A POST the rule allows whose form body names a method it refuses (Rails and
    // Laravel would run a DELETE): 400. (`curl_http1_and_http2_get_the_injected_token`
    // POSTs a JSON body to the same path: the positive control.)
    for body in [["-d", "_method=DELETE"], ["-F", "_method=DELETE"]] {
        refused_on_both(
            &fx,
            &[body[0], body[1], ISSUES_URL],
            400,
            "\"_method\"",
            &mut outs,
        )?;
    }
    let rec = request_record(&fx, "POST", "/repos/acme/widgets/issues", 400)?;
    ensure_field(&rec, "egress.verdict", "deny")?;
    // An allowed GET that names a second object, a copy or rename source the policy
    // cannot judge: 403, the header named. (The same GET without it is the positive
    // control of `curl_http1_and_http2_get_the_injected_token`.)
    for header in [
        "x-goog-copy-source: /acme/secret/db.dump",
        "X-Ms-Rename-Source: /fs/prod/ledger.csv",
        "X-Container-Sync-To: //realm/cluster/AUTH_other/c",
    ] {
        let name = header
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        refused_on_both(&fx, &["-H", header, REPO_URL], 403, &name, &mut outs)?;
    }
    let rec = request_record(&fx, "GET", "/repos/acme/widgets", 403)?;
    ensure!(
        get_str(&rec, "event.reason").is_some_and(|r| r.contains("second object")),
        "refusal record without its reason: {rec}"
    );
    // An Elasticsearch multi-get under the allowed prefix, whose body names other
    // indices (a GET with a body there): 403, the segment named.
    refused_on_both(
        &fx,
        &[
            "-X",
            "GET",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"docs":[{"_index":"prod","_id":"1"}]}"#,
            &format!("{REPO_URL}/_mget"),
        ],
        403,
        "_mget",
        &mut outs,
    )?;
    // Objects named in the query and body instead (OpenStack Swift's large-object
    // manifest, bulk delete): 403, the parameter named.
    for (query, key) in [
        ("?multipart-manifest=put", "multipart-manifest"),
        ("?bulk%2Ddelete", "bulk-delete"),
    ] {
        refused_on_both(&fx, &[&format!("{REPO_URL}{query}")], 403, key, &mut outs)?;
        let rec = fx.wait_proxy_record(RECORD_TIMEOUT, &format!("403 for {query}"), |r| {
            get_str(r, "event.action") == Some("http-request")
                && get_u64(r, "http.response.status_code") == Some(403)
                && get_str(r, "event.reason").is_some_and(|why| why.contains(key))
        })?;
        ensure_field(&rec, "egress.verdict", "deny")?;
    }
    nothing_reached(&fx, before)?;
    let refs: Vec<&Output> = outs.iter().collect();
    fx.assert_token_absent(&refs)
}

#[test]
fn host_differing_from_sni_is_refused_with_421() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let before = fx.origin.requests()?.len();
    // SNI api.github.com, Host github.com (a host the credential also covers) and
    // evil.example; over HTTP/2 curl sends the Host header as :authority.
    for host in ["github.com", "evil.example", "api.github.com.evil.example"] {
        for http in ["--http1.1", "--http2"] {
            let r = curl_resp(&fx, &[http, "-H", &format!("Host: {host}"), REPO_URL])?;
            ensure!(
                r.out.status.success() && r.status == 421,
                "Host {host} on an api.github.com connection ({http}): expected 421, got {}: {}",
                r.status,
                all_output(&r.out)
            );
        }
        let rec = fx.wait_proxy_record(RECORD_TIMEOUT, &format!("421 for Host {host}"), |r| {
            get_str(r, "event.action") == Some("http-request")
                && get_u64(r, "http.response.status_code") == Some(421)
                && get_str(r, "url.domain") == Some(host)
        })?;
        ensure_field(&rec, "egress.verdict", "deny")?;
        ensure_field(&rec, "tls.client.server_name", "api.github.com")?;
    }
    nothing_reached(&fx, before)
}

#[test]
fn unknown_server_name_gets_no_certificate() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let before = fx.origin.requests()?.len();
    let ca = fx.proxy_ca().display().to_string();
    let api = API_V4.to_string();
    // Names the rule for 192.0.2.10 does not serve: unknown, lookalike, and a name another
    // rule serves (github.com is the git rule's, at another address).
    for name in ["evil.example", "api.github.com.evil.example", "github.com"] {
        let resolve = format!("{name}:443:{api}");
        let out = fx.curl(&[
            "--resolve",
            &resolve,
            &format!("https://{name}/repos/acme/widgets"),
        ])?;
        expect::exit_code(&out, CURL_SSL_CONNECT)?;
        // Also with verification off: there is simply no certificate to accept.
        let out = fx.curl(&["-k", "--resolve", &resolve, &format!("https://{name}/")])?;
        expect::exit_code(&out, CURL_SSL_CONNECT)?;
        let rec = fx.wait_proxy_record(
            RECORD_TIMEOUT,
            &format!("refused server name {name}"),
            |r| {
                get_str(r, "event.action") == Some("tls-connection")
                    && get_str(r, "tls.client.server_name") == Some(name)
            },
        )?;
        ensure_field(&rec, "egress.verdict", "deny")?;
        ensure_field(&rec, "rule.name", "github-api")?;
        ensure_linked(&fx, &rec, IpAddr::V4(API_V4))?;
    }
    // openssl s_client shows the handshake ending without a certificate, with a bad name
    // and with none at all.
    for sni in [&["-servername", "evil.example"][..], &["-noservername"][..]] {
        let mut args = vec!["s_client", "-connect", "192.0.2.10:443", "-CAfile", &ca];
        args.extend_from_slice(sni);
        let out = fx.client(10, "openssl", &args, &[])?;
        let text = all_output(&out);
        ensure!(
            text.contains("no peer certificate available") && !text.contains("BEGIN CERTIFICATE"),
            "openssl s_client {sni:?} got a certificate: {text}"
        );
    }
    // Records are written asynchronously: wait (bounded) for the last handshake's.
    let count_refused = || -> Result<usize> {
        Ok(fx
            .proxy_records()?
            .into_iter()
            .filter(|r| {
                get_str(r, "event.action") == Some("tls-connection")
                    && get_str(r, "egress.verdict") == Some("deny")
            })
            .count())
    };
    let refused = egress_tests::util::poll(RECORD_TIMEOUT, Duration::from_millis(50), || {
        let n = count_refused()?;
        Ok((n >= 8).then_some(n))
    })?
    .map_or_else(count_refused, Ok)?;
    ensure!(
        refused >= 8,
        "expected a deny record per refused handshake (8), got {refused}"
    );
    nothing_reached(&fx, before)
}

/// A name a `deny` rule keeps from resolving is not served by a proxy rule whose wildcard
/// `hosts` cover it either (on an address it shares with an allowed name, a front end
/// serving both would otherwise answer for it).
#[test]
fn a_denied_name_is_not_served_under_a_wildcard() -> Result<()> {
    require_proxy_tools!();
    let policy = r#"version: 1
default: deny
rules:
  - name: no-uploads
    to: [uploads.github.com]
    action: deny
  - name: github-api
    to: [192.0.2.10]
    ports: [443]
    action: proxy
    hosts: ["*.github.com"]
    credential: github
"#;
    let fx = ProxyFixture::new(ProxyOpts {
        policy: policy.to_string(),
        ..ProxyOpts::default()
    })?;
    // Positive control: a name the wildcard serves.
    let ok = curl_resp(&fx, &[REPO_URL])?;
    ensure_resp(&ok, 200, Some(REPO_BODY), None)?;
    let before = fx.origin.requests()?.len();
    let name = "uploads.github.com";
    let resolve = format!("{name}:443:{API_V4}");
    let out = fx.curl(&[
        "--resolve",
        &resolve,
        &format!("https://{name}/repos/acme/widgets"),
    ])?;
    expect::exit_code(&out, CURL_SSL_CONNECT)?;
    let rec = fx.wait_proxy_record(RECORD_TIMEOUT, "the denied name refused", |r| {
        get_str(r, "event.action") == Some("tls-connection")
            && get_str(r, "tls.client.server_name") == Some(name)
    })?;
    ensure_field(&rec, "egress.verdict", "deny")?;
    ensure_field(&rec, "rule.name", "github-api")?;
    nothing_reached(&fx, before)
}

#[test]
fn client_authorization_never_reaches_the_origin() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let before = fx.origin.requests()?.len();
    let stolen = [
        "-H",
        "Authorization: Bearer stolen",
        "-H",
        "Proxy-Authorization: Basic c3RvbGVuOnN0b2xlbg==",
    ];
    for http in ["--http1.1", "--http2"] {
        let mut args = vec![http];
        args.extend_from_slice(&stolen);
        args.push(REPO_URL);
        ensure_resp(&curl_resp(&fx, &args)?, 200, Some(REPO_BODY), None)?;
    }
    // Odd spellings: lower case, twice, and on the git origin with Basic.
    ensure_resp(
        &curl_resp(
            &fx,
            &[
                "--http1.1",
                "-H",
                "authorization: token stolen",
                "-H",
                "AUTHORIZATION: Bearer stolen2",
                REPO_URL,
            ],
        )?,
        200,
        Some(REPO_BODY),
        None,
    )?;
    let git_refs = format!("{GIT_URL}/info/refs?service=git-upload-pack");
    let r = curl_resp(&fx, &["-u", "x-access-token:stolen", &git_refs])?;
    ensure_resp(&r, 200, None, None)?;
    let py = fx.python_get(
        &[
            REPO_URL,
            "--cafile",
            &fx.proxy_ca().display().to_string(),
            "--header",
            "Authorization: Bearer stolen",
        ],
        &[],
    )?;
    ensure!(py["status"].as_u64() == Some(200), "python: {py}");

    let reqs = fx.origin_new_exactly(before, 5)?;
    let (api, git): (Vec<OriginRequest>, Vec<OriginRequest>) =
        reqs.into_iter().partition(|r| r.sni == "api.github.com");
    ensure_injected(&fx, &api, &bearer(fx.token()))?;
    ensure_injected(&fx, &git, &basic(fx.token()))?;
    let log = fx.origin.access_log();
    for s in [
        "stolen",
        "c3RvbGVu",
        &egress_tests::https_origin::base64(b"x-access-token:stolen"),
    ] {
        ensure!(!log.contains(s), "{s:?} reached the origin: {log}");
    }
    Ok(())
}

#[test]
fn redirect_to_another_host_is_returned_unfollowed() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let before = fx.origin.requests()?.len();
    let url = format!("https://api.github.com{MOVED_PATH}");
    for http in ["--http1.1", "--http2"] {
        let r = curl_resp(&fx, &[http, "-D", "-", "-o", "/dev/null", &url])?;
        ensure!(
            r.out.status.success()
                && r.status == 302
                && r.redirect == MOVED_TO
                && r.body
                    .to_ascii_lowercase()
                    .contains(&format!("location: {MOVED_TO}")),
            "expected 302 to {MOVED_TO} ({http}): {} {:?} {:?}: {}",
            r.status,
            r.redirect,
            r.body,
            all_output(&r.out)
        );
    }
    let reqs = fx.origin_new_exactly(before, 2)?;
    ensure_injected(&fx, &reqs, &bearer(fx.token()))?;
    ensure!(
        reqs.iter().all(|r| r.uri == MOVED_PATH && r.status == 302),
        "{reqs:#?}"
    );
    let rec = request_record(&fx, "GET", MOVED_PATH, 302)?;
    ensure_field(&rec, "egress.verdict", "allow")?;
    // Nobody went to elsewhere.example (the canary's address, in the world the proxy
    // dials from), and the proxy made no other request for it.
    expect::canary_silent(&fx.canary)?;
    ensure!(
        !fx.proxy_records()?
            .iter()
            .any(|r| get_str(r, "url.domain") == Some(ELSEWHERE_HOST)),
        "the proxy handled a request for {ELSEWHERE_HOST}"
    );
    Ok(())
}

/// A passthrough connection the daemon closes (here on a quarantine) is recorded, with
/// its byte counts and why it ended: the record was made only when the relay ended by
/// itself.
#[test]
fn a_passthrough_connection_closed_by_the_daemon_is_recorded() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let origin_ca = fx.ca.cert().display().to_string();
    // A TLS session with the origin, held open (its input stays open).
    let mut client = fx.sandbox.tls_session(
        &format!("{PINNED_V4}:443"),
        "pinned.example",
        &["-CAfile", &origin_ca],
    )?;
    let mut guard_stdin = client.stdin.take();
    // The handshake is done once openssl prints the certificate chain it verified.
    let mut stdout = client.stdout.take().context("no stdout")?;
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    while !String::from_utf8_lossy(&seen).contains("Verify return code")
        && started.elapsed() < Duration::from_secs(10)
    {
        let mut chunk = [0u8; 4096];
        let n = std::io::Read::read(&mut stdout, &mut chunk)?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&chunk[..n]);
    }
    ensure!(
        String::from_utf8_lossy(&seen).contains("Verify return code: 0"),
        "no TLS session with the origin: {}",
        String::from_utf8_lossy(&seen)
    );
    let out = fx.daemon.ctl([
        "quarantine",
        fx.sandbox.label(),
        "--reason",
        "test: passthrough record",
    ])?;
    ensure!(out.status.success(), "quarantine: {}", all_output(&out));
    let rec = fx.wait_proxy_record(RECORD_TIMEOUT, "the closed passthrough relay", |r| {
        get_str(r, "event.action") == Some("tls-connection")
            && get_str(r, "rule.name") == Some("pinned")
    })?;
    ensure_field(&rec, "egress.tls_mode", "passthrough")?;
    ensure!(
        get_str(&rec, "event.reason").is_some_and(|m| m.contains("closed by the daemon")),
        "{rec}"
    );
    ensure!(
        get_u64(&rec, "source.bytes").is_some_and(|n| n > 0)
            || get_u64(&rec, "destination.bytes").is_some_and(|n| n > 0),
        "no byte counts: {rec}"
    );
    drop(guard_stdin.take());
    let _ = client.kill();
    let _ = client.wait();
    Ok(())
}

#[test]
fn passthrough_keeps_the_origin_certificate() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let before = fx.origin.requests()?.len();
    let origin_ca = fx.ca.cert().display().to_string();
    let proxy_ca = fx.proxy_ca().display().to_string();
    let pin = spki_pin(&fx.origin.pinned_leaf().cert)?;

    // Trusting only the origin's CA and pinning its key: works, so the bytes are the
    // origin's own TLS.
    let out = fx.curl_trusting(&origin_ca, &["--pinnedpubkey", &pin, PINNED_URL])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == PINNED_BODY,
        "pinned client through passthrough: {}",
        all_output(&out)
    );
    let out = fx.curl_trusting(&origin_ca, &["--http1.1", PINNED_URL])?;
    ensure!(
        out.status.success(),
        "passthrough over HTTP/1.1: {}",
        all_output(&out)
    );
    // The proxy's CA minted nothing for it ...
    let out = fx.curl_trusting(&proxy_ca, &[PINNED_URL])?;
    expect::exit_code(&out, CURL_PEER_FAILED_VERIFICATION)?;
    // ... whereas the intercepted origin fails the same pinned client.
    let out = fx.curl_trusting(&origin_ca, &[REPO_URL])?;
    expect::exit_code(&out, CURL_PEER_FAILED_VERIFICATION)?;
    let api_pin = spki_pin(&fx.origin.leaf().cert)?;
    let out = fx.curl_trusting(&proxy_ca, &["--pinnedpubkey", &api_pin, REPO_URL])?;
    ensure!(
        !out.status.success(),
        "the proxy presented the origin's own key: {}",
        all_output(&out)
    );

    // Exactly the two pinned-client requests arrive; the failed handshakes sent none.
    let reqs = fx.origin_new_exactly(before, 2)?;
    let pinned: Vec<&OriginRequest> = reqs.iter().filter(|r| r.sni == "pinned.example").collect();
    ensure!(
        pinned.len() == 2,
        "both requests should reach pinned.example: {reqs:#?}"
    );
    for r in &pinned {
        ensure!(
            r.authorization.is_empty() && r.status == 200 && r.remote_addr != sandbox_ip(&fx),
            "passthrough request at the origin: {r:#?}"
        );
    }
    let rec = fx.wait_proxy_record(RECORD_TIMEOUT, "passthrough connection", |r| {
        get_str(r, "event.action") == Some("tls-connection")
            && get_str(r, "rule.name") == Some("pinned")
            && get_str(r, "egress.verdict") == Some("allow")
    })?;
    ensure_field(&rec, "egress.tls_mode", "passthrough")?;
    ensure_field(&rec, "tls.client.server_name", "pinned.example")?;
    ensure!(
        get_str(&rec, "egress.credential.name").is_none(),
        "passthrough injected: {rec}"
    );
    ensure_linked(&fx, &rec, IpAddr::V4(PINNED_V4))?;

    // A name the passthrough rule does not list is refused before any byte is relayed.
    let mark = fx.origin.requests()?.len();
    let out = fx.curl_trusting(
        &origin_ca,
        &[
            "--resolve",
            &format!("www.pinned.example:443:{PINNED_V4}"),
            "https://www.pinned.example/",
        ],
    )?;
    expect::exit_code(&out, CURL_SSL_CONNECT)?;
    let rec = fx.wait_proxy_record(RECORD_TIMEOUT, "refused passthrough name", |r| {
        get_str(r, "tls.client.server_name") == Some("www.pinned.example")
    })?;
    ensure_field(&rec, "egress.verdict", "deny")?;
    ensure_field(&rec, "rule.name", "pinned")?;
    nothing_reached(&fx, mark)
}

#[test]
fn killed_daemon_leaves_redirected_connections_failing() -> Result<()> {
    require_proxy_tools!();
    let mut fx = ProxyFixture::new(ProxyOpts::default())?;
    ensure_resp(&curl_resp(&fx, &[REPO_URL])?, 200, Some(REPO_BODY), None)?;
    fx.origin.wait_new(0, Duration::from_secs(5))?;
    let before = fx.origin.requests()?.len();

    fx.daemon.kill9()?;
    ensure!(!fx.daemon.is_running(), "egressd survived SIGKILL");

    let origin_ca = fx.ca.cert().display().to_string();
    for (ca, url) in [
        (fx.proxy_ca().display().to_string(), REPO_URL),
        (origin_ca.clone(), REPO_URL),
        (origin_ca.clone(), PINNED_URL),
        (origin_ca.clone(), GIT_URL),
    ] {
        let out = fx.curl_trusting(&ca, &[url])?;
        expect::exit_code(&out, expect::CURL_COULDNT_CONNECT)
            .with_context(|| format!("{url} with the proxy dead"))?;
    }
    // The kernel still sends the connect to the (now closed) proxy port: refused, not
    // EPERM, and not to the origin.
    for ip in [API_V4, GIT_V4, PINNED_V4] {
        let p = fx.sandbox.probe("tcp-connect", IpAddr::V4(ip), 443, &[])?;
        ensure!(
            !p.ok && p.errname.as_deref() == Some("ECONNREFUSED"),
            "connect to {ip}:443 with the proxy dead: {}",
            p.raw
        );
    }
    let git = fx.git(&[
        "-c",
        &format!("http.sslCAInfo={origin_ca}"),
        "clone",
        "-q",
        GIT_URL,
        "w",
    ])?;
    ensure!(
        !git.status.success(),
        "git clone with the proxy dead: {}",
        all_output(&git)
    );
    nothing_reached(&fx, before)?;
    // Still confined otherwise.
    expect::eperm(
        &fx.sandbox
            .probe("tcp-connect", IpAddr::V4(API_V4), 80, &[])?,
    )?;
    // Each refused connect left its redirect entry (made before the SYN); a closed
    // socket's goes with it, so nothing stale is left for another process of the
    // namespace to take, and a loop of them cannot push out others' entries.
    let entries = fx.daemon.map_entries("BY_PEER")?;
    const CONNECTS: usize = 300;
    let script = format!(
        "import socket\n\
         refused = 0\n\
         for _ in range({CONNECTS}):\n\
         \x20   s = socket.socket()\n\
         \x20   try:\n\
         \x20       s.connect(('{API_V4}', 443))\n\
         \x20   except ConnectionRefusedError:\n\
         \x20       refused += 1\n\
         \x20   s.close()\n\
         print(refused)\n"
    );
    let out = fx.sandbox.run("python3", &["-c", &script])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == CONNECTS.to_string(),
        "connects with the proxy dead: {}",
        all_output(&out)
    );
    let left = fx.daemon.map_entries("BY_PEER")?;
    ensure!(
        left < entries + CONNECTS / 10,
        "{CONNECTS} refused connects left {left} redirect entries (from {entries})"
    );
    // Nor when the sockets stay open after the refusal (a client that keeps its socket,
    // or retries later): the entry goes when the connection is over, not when the socket
    // is closed, which may be never.
    let script = format!(
        "import socket, sys\n\
         held = []\n\
         for _ in range({CONNECTS}):\n\
         \x20   s = socket.socket()\n\
         \x20   try:\n\
         \x20       s.connect(('{API_V4}', 443))\n\
         \x20   except ConnectionRefusedError:\n\
         \x20       held.append(s)\n\
         print(len(held), flush=True)\n\
         sys.stdin.read()\n"
    );
    let mut child = fx
        .sandbox
        .command("python3", &["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut refused = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("no stdout")?),
        &mut refused,
    )?;
    let left_open = fx.daemon.map_entries("BY_PEER");
    drop(child.stdin.take());
    let _ = child.wait();
    ensure!(
        refused.trim() == CONNECTS.to_string(),
        "connects with the proxy dead, sockets kept: {refused}"
    );
    let left_open = left_open?;
    ensure!(
        left_open < left + CONNECTS / 10,
        "{CONNECTS} refused connects whose sockets are still open left {left_open} redirect \
         entries (from {left})"
    );
    Ok(())
}

#[test]
fn command_credential_is_rerun_after_its_ttl() -> Result<()> {
    require_proxy_tools!();
    const TTL: u64 = 2;
    let fx = ProxyFixture::new(ProxyOpts {
        github: GithubSource::Command { ttl: TTL },
        ..ProxyOpts::default()
    })?;
    let before = fx.origin.requests()?.len();
    let runs0 = fx.command_runs();

    let t0 = Instant::now();
    ensure_resp(&curl_resp(&fx, &[REPO_URL])?, 200, Some(REPO_BODY), None)?;
    let runs1 = fx.command_runs();
    ensure!(
        runs1 >= 1 && runs1 <= runs0 + 1,
        "first request: the command ran {runs0} -> {runs1} times"
    );
    ensure_resp(&curl_resp(&fx, &[REPO_URL])?, 200, Some(REPO_BODY), None)?;
    let runs2 = fx.command_runs();
    let within = t0.elapsed();
    ensure!(
        within < Duration::from_secs(TTL),
        "two requests took {within:?}, longer than the {TTL} s ttl: cannot test reuse"
    );
    ensure!(
        runs2 == runs1,
        "a request within the ttl ran the command again ({runs1} -> {runs2})"
    );

    std::thread::sleep(Duration::from_secs(TTL) + Duration::from_millis(700));
    ensure_resp(&curl_resp(&fx, &[REPO_URL])?, 200, Some(REPO_BODY), None)?;
    let runs3 = fx.command_runs();
    ensure!(
        runs3 == runs2 + 1,
        "after the ttl the command should run once more ({runs2} -> {runs3})"
    );

    let reqs = fx.origin_new_exactly(before, 3)?;
    let auth: Vec<&str> = reqs.iter().map(|r| r.authorization.as_str()).collect();
    let first = bearer(&format!("{}-run{runs1}", fx.token()));
    let fresh = bearer(&format!("{}-run{runs3}", fx.token()));
    ensure!(
        auth == [first.as_str(), first.as_str(), fresh.as_str()],
        "the origin should see run {runs1} twice, then run {runs3}: {auth:?}"
    );
    ensure!(reqs.iter().all(|r| r.status == 200), "{reqs:#?}");
    fx.assert_token_absent(&[])
}

/// A keep-alive connection does not outlive its sandbox's confinement: after a detach,
/// the proxy closes it, so no further request on it gets the credential.
#[test]
fn detach_closes_open_proxied_connections() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let go = fx.sandbox_dir().join("second-request.go");
    let script = format!(
        r#"
import http.client, os, ssl, sys, time
ctx = ssl.create_default_context(cafile="{ca}")
c = http.client.HTTPSConnection("api.github.com", 443, context=ctx, timeout=5)
c.request("GET", "/repos/acme/widgets")
r = c.getresponse(); r.read()
print("first", r.status, flush=True)
for _ in range(200):
    if os.path.exists("{go}"):
        break
    time.sleep(0.05)
try:
    c.request("GET", "/repos/acme/widgets")
    r = c.getresponse(); r.read()
    print("second", r.status, flush=True)
except Exception as e:
    print("second closed", type(e).__name__, flush=True)
"#,
        ca = fx.proxy_ca().display(),
        go = go.display()
    );
    let mut cmd = fx.sandbox.command("python3", &["-c", &script]);
    cmd.env_clear()
        .env("PATH", egress_tests::proxy_fixture::CLIENT_PATH)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn()?;
    // Wait until the first request went through, then detach.
    let first = fx.origin.wait_new_at_least(0, 1, Duration::from_secs(10))?;
    ensure!(first.len() == 1, "first request did not arrive: {first:?}");
    let out = fx.daemon.detach(fx.sandbox.label())?;
    ensure!(out.status.success(), "detach failed: {out:?}");
    std::fs::write(&go, "go")?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("first 200"), "first request failed: {out:?}");
    ensure!(
        text.contains("second closed"),
        "the keep-alive connection survived the detach: {out:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let all = fx.origin.requests()?;
    ensure!(
        all.len() == 1,
        "a request reached the origin after the detach: {all:?}"
    );
    Ok(())
}

/// A connection the daemon closes before its TLS handshake (here: it never sends its
/// ClientHello, and the sandbox is detached meanwhile) leaves a record, as every other
/// closed connection does.
#[test]
fn a_connection_closed_before_its_handshake_is_recorded() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let go = fx.sandbox_dir().join("detached");
    let ready = fx.sandbox_dir().join("connected");
    let script = format!(
        r#"
import os, socket, time
s = socket.create_connection(("api.github.com", 443), timeout=5)
print("connected", flush=True)
open("{ready}", "w").close()
for _ in range(200):
    if os.path.exists("{go}"):
        break
    time.sleep(0.05)
s.settimeout(5)
try:
    print("read", len(s.recv(1)), flush=True)
except Exception as e:
    print("read failed", type(e).__name__, flush=True)
"#,
        go = go.display(),
        ready = ready.display()
    );
    let mut cmd = fx.sandbox.command("python3", &["-c", &script]);
    cmd.env_clear()
        .env("PATH", egress_tests::proxy_fixture::CLIENT_PATH)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn()?;
    let connected = Instant::now();
    while !ready.exists() {
        ensure!(
            connected.elapsed() < Duration::from_secs(10),
            "the sandbox did not connect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The proxy has accepted it and waits for its ClientHello.
    std::thread::sleep(Duration::from_millis(300));
    let out = fx.daemon.detach(fx.sandbox.label())?;
    ensure!(out.status.success(), "detach failed: {out:?}");
    std::fs::write(&go, "go")?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("connected"), "{out:?}");
    ensure!(
        text.contains("read 0") || text.contains("read failed"),
        "the connection outlived the detach: {out:?}"
    );
    let closed = fx.daemon.wait_for_record(Duration::from_secs(10), |r| {
        get_str(r, "event.action") == Some("tls-connection")
            && get_str(r, "event.reason").is_some_and(|s| s.contains("before its TLS handshake"))
    })?;
    ensure!(
        get_str(&closed, "egress.sandbox.name") == Some(fx.sandbox.label())
            && get_str(&closed, "event.outcome") == Some("failure"),
        "{closed}"
    );
    Ok(())
}

/// A sandbox attached without `--netns` keeps the network namespace its processes were in
/// at attach: a process of its cgroup that makes a namespace of its own later (and comes
/// first in the cgroup) does not get the proxy's listener when the policy is replaced.
#[test]
fn a_sandbox_attached_without_its_netns_keeps_the_one_seen_at_attach() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let sandbox = fx.world.add_sandbox("found")?;
    let _hosts = egress_tests::hosts_file::HostsFile::new(
        sandbox.netns(),
        &egress_tests::proxy_fixture::sandbox_hosts(),
    )?;
    // The sandbox's own process, in a child cgroup: the one found at attach.
    let inner = sandbox.cgroup().path().join("inner");
    std::fs::create_dir(&inner)?;
    let spawn_in =
        |procs: &std::path::Path, exec: &str| -> Result<egress_tests::util::ChildGuard> {
            let child = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(r#"echo $$ > "$1" && exec {exec}"#))
                .arg("sh")
                .arg(procs)
                .spawn()?;
            let guard = egress_tests::util::ChildGuard::new(child, "sleeper");
            egress_tests::util::poll(Duration::from_secs(5), Duration::from_millis(20), || {
                let procs = std::fs::read_to_string(procs).unwrap_or_default();
                Ok((!procs.trim().is_empty()).then_some(()))
            })?
            .context("the sleeper never joined its cgroup")?;
            Ok(guard)
        };
    let ns = sandbox.netns().name().to_owned();
    let own = spawn_in(
        &inner.join("cgroup.procs"),
        &format!("ip netns exec {ns} sleep 120"),
    )?;
    let dir = egress_tests::util::TempDir::new("found-policy")?;
    let policy = dir.write("policy.yaml", egress_tests::proxy_fixture::PROXY_POLICY)?;
    let attach_and_get = |what: &str| -> Result<()> {
        fx.daemon.attach_ok(&sandbox, &policy, "found")?;
        let out = fx.curl_in(
            &sandbox,
            &fx.proxy_ca().display().to_string(),
            &["-w", "\n%{http_code}", REPO_URL],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.ends_with("\n200") && text.contains(REPO_BODY.trim()),
            "{what}: a proxied GET from the sandbox's namespace failed: {}",
            all_output(&out)
        );
        Ok(())
    };
    attach_and_get("attached")?;
    // A process that made a namespace of its own, first in the sandbox's cgroup itself.
    let other = spawn_in(&sandbox.cgroup().procs_file(), "unshare -n sleep 120")?;
    std::thread::sleep(Duration::from_millis(300));
    attach_and_get("policy replaced after a process made its own namespace")?;
    drop(other);
    drop(own);
    egress_tests::util::poll(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(std::fs::remove_dir(&inner).is_ok().then_some(()))
    })?
    .context("the child cgroup could not be removed")?;
    Ok(())
}

/// `sent` requests over one HTTP/2 connection to a path no rule allows, each refused
/// (403 from the proxy, nothing sent upstream).
fn refuse_many(fx: &ProxyFixture, sent: u64) -> Result<()> {
    let url = format!("https://api.github.com/repos/other/x[1-{sent}]");
    let out = fx.curl(&[
        "--http2",
        "-Z",
        "--parallel-max",
        "50",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &url,
    ])?;
    let refused = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| *l == "403")
        .count() as u64;
    ensure!(
        refused == sent,
        "expected {sent} refusals (403), got {refused}: {}",
        all_output(&out)
    );
    Ok(())
}

/// A request sent upstream (with the credential) whose client then goes away is written
/// in full even past the sandbox's refusal limit: a flood of cheap refusals before it
/// cannot make it one count among abandoned requests.
#[test]
fn a_request_abandoned_after_it_was_sent_upstream_is_recorded_past_the_limit() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    // Past the 1,000 refusals recorded one by one per 10 s.
    refuse_many(&fx, 1100)?;
    let before = fx.origin.requests()?.len();
    // The origin answers after 5 s; the client gives up after 1.
    let slow = format!("https://api.github.com{ECHO_PATH}slow");
    let out = fx.curl(&["--http2", "--max-time", "1", "-o", "/dev/null", &slow])?;
    ensure!(
        out.status.code() == Some(28),
        "curl should have timed out: {}",
        all_output(&out)
    );
    // It reached the origin, with the credential.
    let seen = fx.origin.wait_new(before, RECORD_TIMEOUT)?;
    ensure!(
        seen.iter().any(|r| r.uri.ends_with("/slow")),
        "the slow request did not reach the origin: {seen:?}"
    );
    let path = format!("{ECHO_PATH}slow");
    let record = fx.wait_proxy_record(RECORD_TIMEOUT, "the abandoned request", |r| {
        is_request(r, "GET", &path)
    })?;
    ensure!(
        get_str(&record, "egress.credential.name") == Some("github")
            && get_str(&record, "event.reason").is_some_and(|r| {
                r.starts_with("client aborted") && r.contains("after the request was sent upstream")
            }),
        "the record should name the credential and say the request was sent: {record}"
    );
    Ok(())
}

/// Refusals past the per-window limit are counted, not written one by one; when the
/// daemon stops before the window ends, the count is raised then (a `rate-limit` alert
/// before the stop record): every refusal is in the trail, one way or the other.
#[test]
fn refusals_counted_in_a_window_are_raised_when_the_daemon_stops() -> Result<()> {
    require_proxy_tools!();
    let mut fx = ProxyFixture::new(ProxyOpts::default())?;
    // More refusals than the 1,000 recorded one by one per 10 s, over one HTTP/2
    // connection (a path no rule allows: 403 from the proxy, nothing sent upstream).
    const SENT: u64 = 1100;
    let before = fx.origin.requests()?.len();
    let started = Instant::now();
    refuse_many(&fx, SENT)?;
    // Stopped well inside the window that began with the first refusal.
    fx.daemon.terminate(Duration::from_secs(10))?;
    ensure!(
        started.elapsed() < Duration::from_secs(8),
        "the refusals and the stop took {:?}: the window may have ended by itself",
        started.elapsed()
    );
    let records = fx.daemon.audit_records()?;
    let one_by_one = records
        .iter()
        .filter(|r| {
            get_str(r, "event.action") == Some("http-request")
                && get_str(r, "url.path").is_some_and(|p| p.starts_with("/repos/other/x"))
        })
        .count() as u64;
    let alert = records
        .iter()
        .position(|r| {
            get_str(r, "event.kind") == Some("alert")
                && get_str(r, "event.action") == Some("rate-limit")
        })
        .context("no rate-limit alert in the trail")?;
    let counted = get_u64(&records[alert], "egress.alert.count").unwrap_or(0);
    ensure!(
        one_by_one + counted == SENT && one_by_one <= 1000,
        "{one_by_one} refusals recorded one by one and {counted} counted, not {SENT}: {}",
        records[alert]
    );
    let stop = records
        .iter()
        .position(|r| get_str(r, "event.action") == Some("daemon-stop"))
        .context("no stop record")?;
    ensure!(alert < stop, "the alert came after the stop record");
    nothing_reached(&fx, before)
}
