//! Secrets never come back and never go out, end to end.
//!
//! - Reflected: an origin (`fixtures/echo_origin.py` behind nginx) sends the injected
//!   `Authorization` back in a header, a JSON body, a chunked body split inside the token,
//!   a gzip body it encodes although asked for identity, base64, text wrapped at a fixed
//!   width (MIME base64, hex, quoted-printable) and UTF-16; curl in the sandbox,
//!   over HTTP/1.1 and HTTP/2, receives the marker instead, never the token in any form;
//!   each request's record counts what was scrubbed and raises a `secret-reflected` alert.
//!   A body in an encoding the proxy cannot scan is refused (502); a body with no secret
//!   passes byte for byte. The origin's stored copy, read back through a rule with no
//!   credential, is scrubbed too.
//! - Outbound: a request from the sandbox carrying the token (a leak: the sandbox was
//!   handed it for the test) in the query, the path, a query key, the method, a header,
//!   base64 in a header, a JSON body or deep inside a large body is refused with 403 and
//!   a `secret-outbound` alert (the record shows none of it), on the
//!   rule with the credential and on a rule with none; the origin gets nothing of it. The
//!   same requests without the token pass.
//!
//! Needs what `tests/proxy.rs` needs, and python3. Run:
//! `cargo test -p egress-tests --test secrets -- --test-threads=2`.

use std::process::Output;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use egress_tests::audit::{get_str, get_u64};
use egress_tests::expect::{all_output, RECORD_TIMEOUT};
use egress_tests::https_origin::{base64, bearer, ECHO_PATH};
use egress_tests::proxy_fixture::{ProxyFixture, ProxyOpts};
use egress_tests::require_proxy_tools;
use egress_tests::util::poll;
use serde_json::Value;

/// The API behind the `github` credential, with the echo routes, and `github.com` behind
/// a rule with no credential.
const POLICY: &str = r#"version: 1
default: deny
rules:
  - name: github-api
    to: [192.0.2.10]
    ports: [443]
    action: proxy
    hosts: [api.github.com]
    credential: github
    http:
      - methods: [GET, POST]
        paths: ["/repos/acme/widgets/**"]
  - name: no-credential
    to: [192.0.2.11]
    ports: [443]
    action: proxy
    hosts: [github.com]
    http:
      - methods: [GET, POST]
        paths: ["/echo/**"]
"#;

/// What the proxy puts in place of a secret (its start).
const MARKER: &str = "[egressd:scrubbed]";

fn echo_url(route: &str) -> String {
    format!("https://api.github.com{ECHO_PATH}{route}")
}

/// A range on a write says which bytes the write touches (Azure's Put Page clears
/// `bytes=131072-131583` with `x-ms-page-write: clear`): it reaches the origin as the
/// sandbox sent it, never widened as a read's range is (which would clear 128 KiB more).
/// Positive control: a read's range is widened.
#[test]
fn a_writes_range_reaches_the_origin_as_sent() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts {
        policy: POLICY.to_string(),
        ..ProxyOpts::default()
    })?;
    let sink = echo_url("sink");
    let before = fx.origin.requests()?.len();
    let (code, _, out) = curl_i(
        &fx,
        &[
            "--http2",
            "-H",
            "Range: bytes=131072-131583",
            "-H",
            "x-ms-range: bytes=512-1023",
            "--data-binary",
            "page",
            &sink,
        ],
    )?;
    ensure!(
        code == 200,
        "the write was not carried out: {}",
        all_output(&out)
    );
    let seen = fx.origin.wait_new(before, Duration::from_secs(10))?;
    let write = seen
        .iter()
        .find(|r| r.method == "POST" && r.uri.ends_with("/sink"))
        .with_context(|| format!("the write did not reach the origin: {seen:?}"))?;
    ensure!(
        write.range == "bytes=131072-131583" && write.x_ms_range == "bytes=512-1023",
        "the write's ranges were changed on the way: {write:?}"
    );
    let before = fx.origin.requests()?.len();
    let (code, _, out) = curl_i(
        &fx,
        &[
            "--http2",
            "-H",
            "Range: bytes=131072-131583",
            &echo_url("plain"),
        ],
    )?;
    ensure!(code == 206 || code == 200, "{}", all_output(&out));
    let seen = fx.origin.wait_new(before, Duration::from_secs(10))?;
    ensure!(
        seen.iter()
            .any(|r| r.method == "GET" && !r.range.is_empty() && r.range != "bytes=131072-131583"),
        "a read's range was not widened: {seen:?}"
    );
    Ok(())
}

/// `curl -i` (headers and body on stdout) plus the status code after `@@`.
fn curl_i(fx: &ProxyFixture, args: &[&str]) -> Result<(u16, String, Output)> {
    let mut all = vec!["-i"];
    all.extend_from_slice(args);
    all.extend(["-w", "\n@@%{http_code}"]);
    let out = fx.curl(&all)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some((body, code)) = text.rsplit_once("\n@@") else {
        bail!("curl printed no -w trailer: {}", all_output(&out));
    };
    Ok((code.trim().parse().unwrap_or(0), body.to_string(), out))
}

/// The body of `fixtures/echo_origin.py`'s `plain` route.
fn plain_body() -> String {
    (0..4000)
        .map(|i| format!("line {i:05} of the plain body\n"))
        .collect()
}

/// Waits for records matching `pred` until there are `n`; returns them.
fn wait_records(
    fx: &ProxyFixture,
    n: usize,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Vec<Value>> {
    let found = poll(RECORD_TIMEOUT, Duration::from_millis(50), || {
        let got: Vec<Value> = fx
            .daemon
            .audit_records()?
            .into_iter()
            .filter(|r| pred(r))
            .collect();
        Ok((got.len() >= n).then_some(got))
    })?;
    match found {
        Some(v) => Ok(v),
        None => bail!(
            "fewer than {n} records {what} within {RECORD_TIMEOUT:?}; records:\n{}",
            fx.daemon
                .audit_records()?
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

fn path_is(r: &Value, path: &str) -> bool {
    get_str(r, "url.path") == Some(path)
}

#[test]
fn reflected_secrets_are_scrubbed_over_http1_and_http2() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts {
        policy: POLICY.to_string(),
        ..ProxyOpts::default()
    })?;
    let token = fx.token().to_string();
    // Every form the origin sends back.
    let forms = [
        token.clone(),
        base64(token.as_bytes()),
        base64(bearer(&token).as_bytes()),
    ];
    let mut outputs = Vec::new();
    for version in ["--http1.1", "--http2"] {
        for (route, status) in [
            ("header", 200),
            ("json", 401),
            ("chunked", 200),
            ("gzip", 200),
            ("base64", 200),
        ] {
            let (code, text, out) = curl_i(&fx, &[version, &echo_url(route)])?;
            let ctx = || format!("{version} {route}: {}", all_output(&out));
            ensure!(code == status, "status {code}, wanted {status}: {}", ctx());
            for form in &forms {
                ensure!(
                    !text.contains(form.as_str()),
                    "a form of the token reached the sandbox: {}",
                    ctx()
                );
            }
            ensure!(text.contains(MARKER), "no marker: {}", ctx());
            if route == "gzip" {
                // The proxy asked for identity; the origin encoded anyway and the proxy
                // decoded, scrubbed and sent the body on unencoded.
                ensure!(
                    text.contains("\"accept_encoding\": \"identity\""),
                    "the origin was not asked for identity: {}",
                    ctx()
                );
                ensure!(
                    !text.to_ascii_lowercase().contains("content-encoding: gzip"),
                    "{}",
                    ctx()
                );
            }
            outputs.push(out);
        }

        // Text wrapped at a fixed width (MIME base64, `xxd -p` hex, quoted-printable), the
        // breaks falling everywhere in the token: with the breaks taken out, no block
        // holds any form of it. And a body in UTF-16.
        let (code, text, out) = curl_i(&fx, &[version, &echo_url("wrapped")])?;
        ensure!(code == 200, "wrapped: {}", all_output(&out));
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let blocks: Vec<&str> = body.split("\n\n").collect();
        ensure!(blocks.len() >= 180, "wrapped: {} blocks", blocks.len());
        let hex: String = token.bytes().map(|b| format!("{b:02x}")).collect();
        let wrapped_forms: Vec<String> = (0..3)
            .map(|align| {
                let mut bytes = vec![0u8; align];
                bytes.extend_from_slice(token.as_bytes());
                let encoded = base64(&bytes);
                let start = if align == 0 { 0 } else { 4 };
                encoded[start..bytes.len() / 3 * 4].to_string()
            })
            .chain([token.clone(), hex])
            .collect();
        for block in &blocks {
            let joined = block.replace("=\r\n", "").replace(['\r', '\n'], "");
            for form in &wrapped_forms {
                ensure!(
                    !joined
                        .to_ascii_lowercase()
                        .contains(&form.to_ascii_lowercase()),
                    "{version} wrapped: a form of the token reached the sandbox: {block:?}"
                );
            }
        }
        ensure!(body.contains(MARKER), "wrapped: no marker");
        outputs.push(out);
        let (code, text, out) = curl_i(&fx, &[version, &echo_url("utf16")])?;
        ensure!(code == 200, "utf16: {}", all_output(&out));
        ensure!(
            !text.replace('\0', "").contains(&token),
            "{version} utf16: the token reached the sandbox: {}",
            all_output(&out)
        );
        outputs.push(out);

        // An encoding the proxy cannot scan is refused, and recorded.
        let (code, text, out) = curl_i(&fx, &[version, &echo_url("br")])?;
        ensure!(code == 502, "br must be refused: {}", all_output(&out));
        ensure!(!text.contains(&token), "{}", all_output(&out));
        outputs.push(out);

        // Positive control: no secret, byte for byte (and the whole body).
        let out = fx.curl(&[version, &echo_url("plain")])?;
        ensure!(out.status.success(), "{}", all_output(&out));
        ensure!(
            out.stdout == plain_body().as_bytes(),
            "the plain body changed on its way ({} bytes, wanted {})",
            out.stdout.len(),
            plain_body().len()
        );
        outputs.push(out);
    }

    // An origin that keeps what it was sent serves the token back through a rule with no
    // credential (github.com, same origin): scrubbed there too.
    for version in ["--http1.1", "--http2"] {
        let (code, text, out) = curl_i(&fx, &[version, "https://github.com/echo/stored"])?;
        let ctx = || format!("{version} stored: {}", all_output(&out));
        ensure!(code == 200, "status {code}: {}", ctx());
        ensure!(text.contains(MARKER), "no marker: {}", ctx());
        for form in &forms {
            ensure!(
                !text.contains(form.as_str()),
                "the token came back: {}",
                ctx()
            );
        }
        outputs.push(out);
    }
    let stored = wait_records(&fx, 2, "alerting on /echo/stored", |r| {
        get_str(r, "event.action") == Some("secret-reflected") && path_is(r, "/echo/stored")
    })?;
    for a in &stored {
        ensure!(get_str(a, "rule.name") == Some("no-credential"), "{a}");
        ensure!(get_str(a, "url.domain") == Some("github.com"), "{a}");
    }

    // Byte ranges: the sandbox learns where the marker is, then asks for the token's
    // bytes a few at a time (each piece too short for any scan to recognise). Each piece
    // is cut from the scrubbed body: the pieces put together are the marker's bytes.
    let ranged = echo_url("ranged");
    for version in ["--http1.1", "--http2"] {
        let whole = fx.curl(&[version, &ranged])?;
        ensure!(whole.status.success(), "{}", all_output(&whole));
        let whole = String::from_utf8_lossy(&whole.stdout).into_owned();
        let at = whole
            .find(MARKER)
            .with_context(|| format!("{version} ranged: no marker in {whole:?}"))?;
        let len = token.len();
        let mut pieces = String::new();
        for first in (at..at + len).step_by(7) {
            let last = (first + 6).min(at + len - 1);
            let (code, text, out) = curl_i(
                &fx,
                &[
                    version,
                    "-H",
                    &format!("Range: bytes={first}-{last}"),
                    &ranged,
                ],
            )?;
            let ctx = || format!("{version} bytes={first}-{last}: {}", all_output(&out));
            ensure!(code == 206, "status {code}: {}", ctx());
            ensure!(
                text.to_ascii_lowercase().contains(&format!(
                    "content-range: bytes {first}-{last}/{}",
                    whole.len()
                )),
                "{}",
                ctx()
            );
            let body = text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b)
                .with_context(ctx)?;
            ensure!(body.len() == last - first + 1, "{}", ctx());
            pieces.push_str(body);
            outputs.push(out);
        }
        ensure!(
            pieces == whole[at..at + len] && pieces != token,
            "{version}: the pieces put together are {pieces:?}, not the scrubbed bytes"
        );
        // A range in a header other origins read (Azure's x-ms-range) is not passed on:
        // the origin answers with the whole body, scrubbed.
        let (code, text, out) = curl_i(
            &fx,
            &[
                version,
                "-H",
                &format!("x-ms-range: bytes={at}-{}", at + 6),
                &ranged,
            ],
        )?;
        ensure!(
            code == 200 && text.ends_with(whole.as_str()),
            "{version} x-ms-range: {}",
            all_output(&out)
        );
        outputs.push(out);
        // Positive controls: a range without the token is the origin's bytes; a suffix
        // range is cut from the end; a list of ranges gets the whole (scrubbed) body.
        let (code, text, out) = curl_i(&fx, &[version, "-H", "Range: bytes=0-17", &ranged])?;
        ensure!(
            code == 206 && text.ends_with("\r\n\r\n{\"authorization\": "),
            "{version} bytes=0-17: {}",
            all_output(&out)
        );
        let (code, text, out) = curl_i(&fx, &[version, "-H", "Range: bytes=-3", &ranged])?;
        ensure!(
            code == 206 && text.ends_with("\"}\n"),
            "{version} bytes=-3: {}",
            all_output(&out)
        );
        let (code, text, out) = curl_i(&fx, &[version, "-H", "Range: bytes=0-3,5-8", &ranged])?;
        ensure!(
            code == 200 && text.ends_with(whole.as_str()),
            "{version} a list of ranges: {}",
            all_output(&out)
        );
        outputs.push(out);
    }

    // Each reflecting request's record counts what was scrubbed, and has an alert; so
    // does each byte range cut from a scrubbed piece.
    for route in [
        "header", "json", "chunked", "gzip", "base64", "ranged", "wrapped", "utf16",
    ] {
        let path = format!("{ECHO_PATH}{route}");
        let records = wait_records(&fx, 2, &format!("scrubbed on {path}"), |r| {
            get_str(r, "event.action") == Some("http-request")
                && path_is(r, &path)
                && get_u64(r, "egress.scrubbed").is_some_and(|n| n >= 1)
        })?;
        for r in &records {
            ensure!(
                get_str(r, "egress.credential.name") == Some("github"),
                "{r}"
            );
        }
        let alerts = wait_records(&fx, 2, &format!("alerting on {path}"), |r| {
            get_str(r, "event.action") == Some("secret-reflected") && path_is(r, &path)
        })?;
        for a in &alerts {
            ensure!(get_str(a, "event.kind") == Some("alert"), "{a}");
            ensure!(get_str(a, "rule.name") == Some("github-api"), "{a}");
            ensure!(get_str(a, "url.domain") == Some("api.github.com"), "{a}");
            ensure!(
                matches!(
                    get_str(a, "egress.credential.name"),
                    Some("github" | "github-git")
                ),
                "{a}"
            );
            ensure!(
                get_u64(a, "egress.alert.count").is_some_and(|n| n >= 1),
                "{a}"
            );
        }
    }
    let br = format!("{ECHO_PATH}br");
    let refused = wait_records(&fx, 2, "refusing br", |r| {
        get_str(r, "event.action") == Some("http-request") && path_is(r, &br)
    })?;
    for r in &refused {
        ensure!(get_str(r, "egress.verdict") == Some("deny"), "{r}");
        ensure!(get_u64(r, "http.response.status_code") == Some(502), "{r}");
        ensure!(
            get_str(r, "event.reason").is_some_and(|m| m.contains("Content-Encoding `br`")),
            "{r}"
        );
    }
    // The control raised nothing.
    let plain = format!("{ECHO_PATH}plain");
    let records = fx.daemon.audit_records()?;
    ensure!(
        !records.iter().any(|r| path_is(r, &plain)
            && (get_u64(r, "egress.scrubbed").is_some()
                || get_str(r, "event.kind") == Some("alert"))),
        "the positive control was scrubbed"
    );

    let outs: Vec<&Output> = outputs.iter().collect();
    fx.assert_token_absent(&outs)?;
    for form in &forms[1..] {
        for o in &outs {
            ensure!(
                !String::from_utf8_lossy(&o.stdout).contains(form.as_str()),
                "base64 form leaked"
            );
        }
    }
    Ok(())
}

#[test]
fn requests_carrying_a_secret_are_refused_before_they_leave() -> Result<()> {
    require_proxy_tools!();
    // Recorded only, so that every form can be tried from one sandbox (by default the
    // first one quarantines it: see the next test).
    let fx = ProxyFixture::new(ProxyOpts {
        policy: format!("{POLICY}alerts:\n  responses: {{secret-outbound: record}}\n"),
        ..ProxyOpts::default()
    })?;
    // The sandbox holds the token for this test: a leak the proxy must stop.
    let token = fx.token().to_string();
    let big = {
        let mut b = "x".repeat(150_000);
        b.push_str(&format!("\"token\":\"{token}\""));
        b.push_str(&"y".repeat(50_000));
        b
    };
    let big_file = fx.sandbox_dir().join("big-body.txt");
    std::fs::write(&big_file, &big)?;
    let big_arg = format!("@{}", big_file.display());
    let header = format!("X-Debug: {token}");
    let b64_header = format!("X-Debug: {}", base64(format!("user:{token}").as_bytes()));
    let json = format!("{{\"note\":\"hi\",\"token\":\"{token}\"}}");

    for (rule, base) in [
        ("github-api", format!("https://api.github.com{ECHO_PATH}")),
        ("no-credential", "https://github.com/echo/".to_string()),
    ] {
        let cases: Vec<(&str, Vec<String>)> = vec![
            ("query", vec![format!("{base}json?access_token={token}")]),
            // Where the record would show it: the path, a query key, the method.
            ("path", vec![format!("{base}json/{token}")]),
            ("query key", vec![format!("{base}json?{token}")]),
            (
                "method",
                vec!["-X".into(), token.clone(), format!("{base}json")],
            ),
            (
                "header",
                vec!["-H".into(), header.clone(), format!("{base}json")],
            ),
            (
                "base64 header",
                vec!["-H".into(), b64_header.clone(), format!("{base}json")],
            ),
            (
                "json body",
                vec![
                    "-H".into(),
                    "Content-Type: application/json".into(),
                    "--data-binary".into(),
                    json.clone(),
                    format!("{base}sink"),
                ],
            ),
            (
                "large body",
                vec![
                    "--data-binary".into(),
                    big_arg.clone(),
                    format!("{base}sink"),
                ],
            ),
        ];
        for (what, args) in &cases {
            let before = fx.origin.requests()?.len();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, text, out) = curl_i(&fx, &args)?;
            let ctx = || format!("{rule} {what}: {}", all_output(&out));
            ensure!(code == 403, "not refused: {}", ctx());
            ensure!(
                text.contains("carries the value of credential"),
                "{}",
                ctx()
            );
            if what.contains("body") {
                // The headers may have gone ahead of the body; the body never did, so
                // nginx (which buffers request bodies) passed nothing on, and whatever it
                // logged was not answered by the origin.
                let new = fx.origin.requests()?[before..].to_vec();
                ensure!(new.iter().all(|r| r.status != 200), "{}: {new:#?}", ctx());
            } else {
                fx.origin_new_exactly(before, 0).with_context(ctx)?;
            }
            ensure!(
                !fx.origin.echo_received().contains(&token),
                "the origin got the token: {}",
                ctx()
            );
            // (nginx logs the Authorization the proxy injected; the URI is the sandbox's.)
            ensure!(
                fx.origin
                    .requests()?
                    .iter()
                    .all(|r| !r.uri.contains(&token)),
                "the token reached the origin in a URL: {}",
                ctx()
            );
        }
        let alerts = wait_records(
            &fx,
            cases.len(),
            &format!("secret-outbound on {rule}"),
            |r| {
                get_str(r, "event.action") == Some("secret-outbound")
                    && get_str(r, "rule.name") == Some(rule)
            },
        )?;
        for a in &alerts {
            ensure!(get_str(a, "event.kind") == Some("alert"), "{a}");
            ensure!(
                matches!(
                    get_str(a, "egress.credential.name"),
                    Some("github" | "github-git")
                ),
                "{a}"
            );
        }
        let denied = wait_records(&fx, cases.len(), &format!("denied on {rule}"), |r| {
            get_str(r, "event.action") == Some("http-request")
                && get_str(r, "rule.name") == Some(rule)
                && get_str(r, "egress.verdict") == Some("deny")
                && get_u64(r, "http.response.status_code") == Some(403)
        })?;
        ensure!(denied.len() == cases.len(), "{denied:#?}");

        // Positive controls: the same requests without the token pass.
        let (code, _, out) = curl_i(
            &fx,
            &[
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "{\"note\":\"hi\"}",
                &format!("{base}sink"),
            ],
        )?;
        ensure!(code == 200, "{rule} clean body: {}", all_output(&out));
        let clean = big.replace(&token, &"t".repeat(token.len()));
        std::fs::write(&big_file, &clean)?;
        let (code, _, out) = curl_i(&fx, &["--data-binary", &big_arg, &format!("{base}sink")])?;
        ensure!(code == 200, "{rule} clean large body: {}", all_output(&out));
        std::fs::write(&big_file, &big)?;
        let (code, _, out) = curl_i(
            &fx,
            &["-H", "X-Debug: nothing", &format!("{base}plain?q=1")],
        )?;
        ensure!(
            code == 200,
            "{rule} clean query and header: {}",
            all_output(&out)
        );
    }
    let received = fx.origin.echo_received();
    ensure!(
        received.matches(r#"\"note\":\"hi\""#).count() == 2,
        "the clean bodies did not arrive: {received}"
    );
    ensure!(
        received.contains(&"t".repeat(40)),
        "the clean large body did not arrive"
    );
    ensure!(!received.contains(&token));

    // A name the sandbox chooses (here the TLS server name, refused) reaches the audit
    // trail only masked: every record is searched before it is written.
    let name = format!("{token}.api.github.com");
    let out = fx.curl(&[
        "--resolve",
        &format!("{name}:443:192.0.2.10"),
        &format!("https://{name}/"),
    ])?;
    ensure!(
        !out.status.success(),
        "a server name no rule lists was served: {}",
        all_output(&out)
    );
    wait_records(&fx, 1, "naming the masked server name", |r| {
        get_str(r, "tls.client.server_name").is_some_and(|n| n.starts_with("[redacted]"))
    })?;
    for p in [fx.daemon.audit_log(), fx.daemon.log_path()] {
        let text = std::fs::read_to_string(&p)?;
        ensure!(!text.contains(&token), "the token reached {}", p.display());
    }
    Ok(())
}

/// By default a secret in a request quarantines the sandbox: it should never hold one,
/// and each refusal would otherwise tell a sandbox holding part of a value whether a
/// guessed next character is right.
#[test]
fn a_secret_in_a_request_quarantines_the_sandbox_by_default() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts {
        policy: POLICY.to_string(),
        ..ProxyOpts::default()
    })?;
    let clean = echo_url("plain?q=1");
    // Positive control: a clean request passes.
    let (code, _, out) = curl_i(&fx, &[&clean])?;
    ensure!(code == 200, "clean request: {}", all_output(&out));
    let before = fx.origin.requests()?.len();
    let token = fx.token().to_string();
    let (code, _, out) = curl_i(&fx, &["-H", &format!("X-Note: {token}"), &clean])?;
    ensure!(code == 403, "not refused: {}", all_output(&out));
    fx.origin_new_exactly(before, 0)?;
    let quarantined = wait_records(&fx, 1, "sandbox-quarantine", |r| {
        get_str(r, "event.action") == Some("sandbox-quarantine")
            && get_str(r, "egress.quarantine.trigger") == Some("secret-outbound")
    })?;
    ensure!(
        get_str(&quarantined[0], "event.outcome") != Some("failure"),
        "{}",
        quarantined[0]
    );
    // The same clean request no longer reaches the origin.
    let (code, _, out) = curl_i(&fx, &[&clean])?;
    ensure!(
        code != 200,
        "quarantined sandbox still served: {}",
        all_output(&out)
    );
    fx.origin_new_exactly(before, 0)?;
    Ok(())
}

/// The daemon's memory holds the credentials: it dumps no core, and neither does any
/// program it runs (the core size limit, unlike the dumpable flag, survives `exec`). The
/// harness starts it with core dumps allowed, as a container runtime may.
#[test]
fn the_daemon_and_its_children_dump_no_core() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    // The harness could start it with cores allowed only below a hard limit above 0.
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives across the call.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut own) } == 0);
    ensure!(
        own.rlim_max > 0,
        "the test's own hard core limit is 0: the daemon cannot be seen lowering it"
    );
    let pid = fx.daemon.pid().context("the daemon has no pid")?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .context("no core limit in /proc/PID/limits")?;
    let fields: Vec<&str> = core.split_whitespace().collect();
    ensure!(
        fields.get(4..6) == Some(&["0", "0"][..]),
        "the daemon's core size limit should be 0 (soft and hard): {core}"
    );
    Ok(())
}

/// A session token an origin hands out in a response header for a request that carried
/// the injected credential (Keystone's `X-Subject-Token`, Swift's `X-Auth-Token`) is the
/// credential's power in a form the scrubber does not know: it never reaches the
/// sandbox. Positive control: the same answer through a rule without a credential keeps
/// its headers.
#[test]
fn session_tokens_opened_with_the_credential_stay_with_the_proxy() -> Result<()> {
    require_proxy_tools!();
    let fx = ProxyFixture::new(ProxyOpts {
        policy: POLICY.to_string(),
        ..ProxyOpts::default()
    })?;
    let lower = |s: &str| s.to_ascii_lowercase();
    for http in ["--http1.1", "--http2"] {
        let (code, text, out) = curl_i(&fx, &[http, &echo_url("session")])?;
        ensure!(code == 200, "{http}: {}", all_output(&out));
        ensure!(
            [
                "x-subject-token",
                "x-auth-token",
                "x-acme-session-id",
                "api-token"
            ]
            .iter()
            .all(|name| !lower(&text).contains(name)),
            "{http}: a session token reached the sandbox: {text}"
        );
        let (code, text, out) = curl_i(&fx, &[http, "https://github.com/echo/session"])?;
        ensure!(code == 200, "{http} (no credential): {}", all_output(&out));
        ensure!(
            lower(&text).contains("x-subject-token: gaaaaasession0123456789")
                && lower(&text).contains("x-acme-session-id: acme0123456789session"),
            "{http}: the answer of a rule without a credential lost its headers: {text}"
        );
    }
    Ok(())
}
