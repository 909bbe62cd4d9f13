//! Where the credential goes besides a header, end to end with curl and python in a
//! sandbox against nginx origins that log what they received:
//!
//! - `inject: { query: { param: api_key } }` on `github.com`: the origin gets the token as
//!   `api_key` (the value the sandbox sent under that name is gone), the audit record
//!   shows the query by its keys only, and names the credential, its kind and source; a
//!   key a server could read as `api_key` (`API_KEY`, `api_key;x`) is refused (400).
//! - `inject: { placeholder: { query: [key], body: true } }` on `api.github.com`: the
//!   sandbox is given its sentinel by `egressctl placeholder`; in `Authorization` (the
//!   API answers only with the real token), the `key` query parameter and a JSON body
//!   (python, `Content-Length` re-framed) the origin gets the token. At that same host, in
//!   a header or query parameter not enabled, or in the path, it is refused (403) with a
//!   deny record and a `placeholder-misdirected` alert; beside a second `Authorization`
//!   value it is refused (400). The same sentinel sent to `github.com` (allowed, but not
//!   one of the credential's hosts) in a header, in the URL (percent-encoded) or in a
//!   body is refused (403) likewise; the
//!   origin gets nothing of any of these; the same requests without it pass (positive
//!   control), and without the sentinel the API refuses (the credential is not added by
//!   itself, nor recorded as used).
//!
//! Needs what `tests/proxy.rs` needs, and python3. Run:
//! `cargo test -p egress-tests --test credentials_inject -- --test-threads=2`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::get_str;
use egress_tests::expect::{all_output, RECORD_TIMEOUT};
use egress_tests::https_origin::{bearer, ECHO_PATH, REPO_BODY};
use egress_tests::proxy_fixture::{ProxyFixture, ProxyOpts, GIT_TOKEN_ENV};
use egress_tests::require_proxy_tools;
use egress_tests::util::poll;
use serde_json::Value;

const POLICY: &str = r#"version: 1
default: deny
rules:
  - name: api
    to: [192.0.2.10]
    ports: [443]
    action: proxy
    hosts: [api.github.com]
    credential: api-placeholder
    http:
      - methods: [GET, POST]
        paths: ["/repos/acme/widgets/**"]
  - name: echo
    to: [192.0.2.11]
    ports: [443]
    action: proxy
    hosts: [github.com]
    credential: api-query
    http:
      - methods: [GET, POST]
        paths: ["/echo/**"]
"#;

fn credentials() -> String {
    format!(
        "  api-query:
    source: {{ env: {GIT_TOKEN_ENV} }}
    inject: {{ query: {{ param: api_key }} }}
    hosts: [github.com]
  api-placeholder:
    source: {{ env: {GIT_TOKEN_ENV} }}
    inject: {{ placeholder: {{ query: [key], body: true }} }}
    hosts: [api.github.com]
"
    )
}

/// curl's status code (after `@@`) and body.
fn curl_status(fx: &ProxyFixture, args: &[&str]) -> Result<(u16, String)> {
    let mut all = args.to_vec();
    all.extend(["-w", "\n@@%{http_code}"]);
    let out = fx.curl(&all)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .rsplit_once("\n@@")
        .with_context(|| format!("curl printed no status: {}", all_output(&out)))?;
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// python3 in the sandbox POSTs `body` as JSON to `url`; returns the status and body.
fn python_post_json(fx: &ProxyFixture, url: &str, body: &str) -> Result<(u16, String)> {
    let script = r#"
import json, ssl, sys, urllib.request, urllib.error
url, ca, body = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
req = urllib.request.Request(url, data=body.encode(), method="POST",
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
"#;
    let python = egress_tests::util::python().display().to_string();
    let ca = fx.proxy_ca().display().to_string();
    let out = fx.client(20, &python, &["-c", script, url, &ca, body], &[])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("python printed no JSON: {}", all_output(&out)))?;
    let v: Value = serde_json::from_str(line)?;
    Ok((
        u16::try_from(v["status"].as_u64().unwrap_or(0)).unwrap_or(0),
        v["body"].as_str().unwrap_or("").to_owned(),
    ))
}

/// The last proxy record whose path and status are these.
fn record(fx: &ProxyFixture, path: &str, status: u16) -> Result<Value> {
    fx.wait_proxy_record(RECORD_TIMEOUT, &format!("{path} -> {status}"), |r| {
        get_str(r, "url.path") == Some(path) && r["http"]["response"]["status_code"] == status
    })
}

#[test]
fn query_and_placeholder_injection_reach_only_the_credentials_hosts() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts {
        policy: POLICY.to_string(),
        extra_credentials: credentials(),
        ..ProxyOpts::default()
    })?;
    let token = fx.token().to_owned();

    // The sandbox's sentinel, from the operator's command; a non-placeholder credential
    // has none.
    let out = fx
        .daemon
        .ctl_ok(["placeholder", fx.sandbox.label(), "api-placeholder"])?;
    let sentinel = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(
        sentinel.starts_with("egress-placeholder-") && sentinel.len() == 19 + 32,
        "placeholder: {sentinel:?}"
    );
    let again = fx
        .daemon
        .ctl_ok(["placeholder", fx.sandbox.label(), "api-placeholder"])?;
    ensure!(String::from_utf8(again.stdout)?.trim() == sentinel);
    let refused = fx
        .daemon
        .ctl(["placeholder", fx.sandbox.label(), "api-query"])?;
    ensure!(
        !refused.status.success(),
        "a query credential has no placeholder"
    );

    // Query: the origin gets the token as api_key, and only ours.
    let before = fx.origin.requests()?.len();
    let (status, _) = curl_status(
        &fx,
        &["https://github.com/echo/plain?api_key=sandbox-guess&x=1"],
    )?;
    ensure!(status == 200, "query-injected request: {status}");
    let seen = fx.origin_new_exactly(before, 1)?;
    ensure!(
        seen[0].uri == format!("/echo/plain?x=1&api_key={token}"),
        "the origin should get exactly the injected parameter: {:?}",
        seen[0].uri
    );
    let r = record(&fx, "/echo/plain", 200)?;
    ensure!(
        get_str(&r, "url.query") == Some("x=&api_key=")
            && r["egress"]["credential"]["name"] == "api-query"
            && r["egress"]["credential"]["kind"] == "query"
            && r["egress"]["credential"]["source"] == "env",
        "the record should show the query by its keys and name the credential: {r}"
    );
    // A key a server could take for the injected one: refused, nothing sent.
    let before = fx.origin.requests()?.len();
    for url in [
        "https://github.com/echo/variant?API_KEY=mine",
        "https://github.com/echo/variant?api_key;x=1",
    ] {
        let (status, _) = curl_status(&fx, &[url])?;
        ensure!(status == 400, "{url}: {status}");
    }
    fx.origin_new_exactly(before, 0)?;
    let r = record(&fx, "/echo/variant", 400)?;
    ensure!(get_str(&r, "egress.verdict") == Some("deny"), "{r}");

    // Placeholder in Authorization: the API answers only with the real token.
    let before = fx.origin.requests()?.len();
    let auth = format!("Authorization: Bearer {sentinel}");
    let (status, body) = curl_status(
        &fx,
        &["-H", &auth, "https://api.github.com/repos/acme/widgets"],
    )?;
    ensure!(
        status == 200 && body == REPO_BODY,
        "placeholder in a header: {status} {body:?}"
    );
    let seen = fx.origin_new_exactly(before, 1)?;
    ensure!(seen[0].authorization == bearer(&token), "{:?}", seen[0]);
    let r = record(&fx, "/repos/acme/widgets", 200)?;
    ensure!(
        r["egress"]["credential"]["name"] == "api-placeholder"
            && r["egress"]["credential"]["kind"] == "placeholder",
        "{r}"
    );
    // Without it, nothing is added: the API refuses.
    let (status, _) = curl_status(&fx, &["https://api.github.com/repos/acme/widgets"])?;
    ensure!(status == 401, "no placeholder, no credential: {status}");
    let r = record(&fx, "/repos/acme/widgets", 401)?;
    ensure!(
        r["egress"]["credential"].is_null(),
        "nothing replaced, no credential recorded: {r}"
    );

    // At the credential's own host, anywhere not enabled: refused, recorded, alerted;
    // beside a second Authorization value: refused as ambiguous. The origin gets nothing.
    let before = fx.origin.requests()?.len();
    let other_header = format!("X-Other: {sentinel}");
    let widgets = "https://api.github.com/repos/acme/widgets";
    let in_query = format!("{widgets}?q={sentinel}");
    let in_path = format!("{widgets}/{sentinel}");
    for (args, place) in [
        (
            vec!["-H", auth.as_str(), "-H", &other_header, widgets],
            "a header",
        ),
        (vec!["-H", auth.as_str(), &in_query], "the URL"),
        (vec![in_path.as_str()], "the URL"),
    ] {
        let (status, _) = curl_status(&fx, &args)?;
        ensure!(status == 403, "sentinel in {place} not enabled: {status}");
    }
    let (status, _) = curl_status(
        &fx,
        &[
            "-H",
            &auth,
            "-H",
            "Authorization: Bearer sandbox-own",
            widgets,
        ],
    )?;
    ensure!(status == 400, "second Authorization value: {status}");
    fx.origin_new_exactly(before, 0)?;
    for place in ["a header", "the URL"] {
        let denied = fx.wait_proxy_record(RECORD_TIMEOUT, place, |r| {
            get_str(r, "url.domain") == Some("api.github.com")
                && get_str(r, "egress.verdict") == Some("deny")
                && get_str(r, "event.reason").is_some_and(|why| {
                    why.contains("placeholder of credential `api-placeholder`")
                        && why.contains(place)
                        && why.contains("does not allow it")
                })
        })?;
        ensure!(denied["http"]["response"]["status_code"] == 403, "{denied}");
    }
    let ambiguous = record(&fx, "/repos/acme/widgets", 400)?;
    ensure!(
        get_str(&ambiguous, "egress.verdict") == Some("deny")
            && get_str(&ambiguous, "event.reason")
                .is_some_and(|why| why.contains("`authorization`")),
        "{ambiguous}"
    );

    // Placeholder in the query parameter it is enabled for.
    let before = fx.origin.requests()?.len();
    let url = format!("https://api.github.com{ECHO_PATH}plain?key={sentinel}&y=2");
    let (status, _) = curl_status(&fx, &[&url])?;
    ensure!(status == 200, "placeholder in the query: {status}");
    let seen = fx.origin_new_exactly(before, 1)?;
    ensure!(
        seen[0].uri == format!("{ECHO_PATH}plain?key={token}&y=2"),
        "{:?}",
        seen[0].uri
    );

    // Placeholder in a JSON body, from python (Content-Length given; re-framed).
    let sink = format!("https://api.github.com{ECHO_PATH}sink");
    let json = format!("{{\"model\":\"m\",\"api_key\":\"{sentinel}\",\"n\":1}}");
    let (status, body) = python_post_json(&fx, &sink, &json)?;
    ensure!(status == 200, "placeholder in a JSON body: {status} {body}");
    let received = fx.origin.echo_received();
    ensure!(
        received.contains(&format!(
            "{{\\\"model\\\":\\\"m\\\",\\\"api_key\\\":\\\"{token}\\\",\\\"n\\\":1}}"
        )),
        "the origin should get the body with the token: {received}"
    );

    // The sentinel at github.com (allowed, not the credential's host): refused in a
    // header, in the URL and in a body, recorded, alerted; the origin gets nothing.
    let before = fx.origin.requests()?.len();
    let header = format!("X-Api-Key: {sentinel}");
    let (status, _) = curl_status(&fx, &["-H", &header, "https://github.com/echo/plain"])?;
    ensure!(
        status == 403,
        "misdirected placeholder in a header: {status}"
    );
    fx.origin_new_exactly(before, 0)?;
    // The same in the URL, its first letter percent-encoded (an origin decodes it).
    let before = fx.origin.requests()?.len();
    let encoded = format!("https://github.com/echo/plain?k=%65{}", &sentinel[1..]);
    let (status, _) = curl_status(&fx, &[&encoded])?;
    ensure!(
        status == 403,
        "misdirected placeholder, encoded, in the URL: {status}"
    );
    fx.origin_new_exactly(before, 0)?;
    let received_before = fx.origin.echo_received();
    let before = fx.origin.requests()?.len();
    let (status, _) = python_post_json(
        &fx,
        "https://github.com/echo/sink",
        &format!(
            "{{\"padding\":\"{}\",\"key\":\"{sentinel}\"}}",
            "p".repeat(3000)
        ),
    )?;
    ensure!(status == 403, "misdirected placeholder in a body: {status}");
    // The request head may have gone ahead of the body; the body never did, so nginx
    // (which buffers request bodies) passed nothing on to the origin behind it.
    std::thread::sleep(Duration::from_millis(300));
    let new = fx.origin.requests()?[before..].to_vec();
    ensure!(new.iter().all(|r| r.status != 200), "{new:#?}");
    ensure!(
        fx.origin.echo_received() == received_before,
        "the origin received a misdirected placeholder"
    );
    for place in ["a header", "the URL", "the body"] {
        let denied = fx.wait_proxy_record(RECORD_TIMEOUT, place, |r| {
            get_str(r, "url.domain") == Some("github.com")
                && get_str(r, "egress.verdict") == Some("deny")
                && get_str(r, "event.reason").is_some_and(|why| {
                    why.contains("placeholder of credential `api-placeholder`")
                        && why.contains(place)
                })
        })?;
        ensure!(denied["http"]["response"]["status_code"] == 403, "{denied}");
    }
    let alerts = poll(RECORD_TIMEOUT, Duration::from_millis(100), || {
        let alerts: Vec<Value> = fx
            .daemon
            .audit_records()?
            .into_iter()
            .filter(|r| get_str(r, "event.action") == Some("placeholder-misdirected"))
            .collect();
        Ok((alerts.len() >= 6).then_some(alerts))
    })?
    .context("no placeholder-misdirected alerts")?;
    let at = |domain: &str| {
        alerts
            .iter()
            .filter(|a| get_str(a, "url.domain") == Some(domain))
            .count()
    };
    ensure!(
        alerts
            .iter()
            .all(|a| get_str(a, "egress.credential.name") == Some("api-placeholder"))
            && at("github.com") == 3
            && at("api.github.com") == 3,
        "{alerts:?}"
    );

    // Positive control: the same requests without the sentinel pass.
    let before = fx.origin.requests()?.len();
    let (status, _) = curl_status(
        &fx,
        &["-H", "X-Api-Key: none", "https://github.com/echo/plain"],
    )?;
    ensure!(status == 200, "control: {status}");
    let (status, _) = python_post_json(&fx, "https://github.com/echo/sink", "{\"key\":\"none\"}")?;
    ensure!(status == 200, "control body: {status}");
    fx.origin_new_exactly(before, 2)?;

    // The token is nowhere the sandbox or an auditor can see; the sentinel is not in the
    // daemon's log either.
    ensure!(
        !fx.daemon.log().contains(&sentinel),
        "the sentinel is in the daemon's log"
    );
    fx.assert_token_absent(&[])
}
