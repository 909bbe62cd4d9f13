//! Git push rules and GitHub App installation tokens, end to end: the stock git client in
//! a sandbox that holds no token and trusts only the proxy's exported CA clones, fetches
//! and pushes through egressd to a real `git http-backend` origin in the world namespace;
//! egressd injects installation tokens it mints from a fake GitHub App token endpoint
//! (which verifies the JWT's RS256 signature with the App's public key), and judges each
//! push's ref updates before any byte of it reaches the origin.
//!
//! The setup is [`GitFixture`]: `github.com` (192.0.2.11) behind the brief's git rule
//! ([`GIT_POLICY`]: `acme/widgets`, fetch, push to `refs/heads/agent/**` only, no
//! deletions, no tags) with the `github-app` credential; `acme/other` exists on the
//! origin, so only the policy can refuse it. Refusals are proved three ways: git's own
//! message, the audit record (`egress.git.*`), and the origin (its access log and its
//! refs, compared with `git for-each-ref` before and after).
//!
//! Needs root, cgroup v2, bpffs, nginx, openssl, curl, git, python3 and the egressd
//! binaries (`cargo build -p agent-userspace`); skips without root. Run:
//! `cargo test -p egress-tests --test git -- --test-threads=2`.

use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get, get_str, get_u64};
use egress_tests::expect::{self, all_output, RECORD_TIMEOUT};
use egress_tests::git_fixture::{
    AppKey, GitFixture, GitOpts, Mint, APP_CREDENTIAL, APP_ID, OTHER_REPO, REPO,
};
use egress_tests::https_origin::{basic, OriginRequest, REPO_FILE};
use egress_tests::require_proxy_tools;
use serde_json::Value;

const ZERO: &str = "0000000000000000000000000000000000000000";
const RECEIVE_PACK: &str = "/acme/widgets.git/git-receive-pack";

/// One `egress.git.ref_updates` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Update {
    ref_name: String,
    old: String,
    new: String,
    allowed: bool,
}

impl Update {
    fn new(ref_name: &str, old: &str, new: &str, allowed: bool) -> Self {
        Self {
            ref_name: ref_name.into(),
            old: old.into(),
            new: new.into(),
            allowed,
        }
    }
}

fn updates(rec: &Value) -> Vec<Update> {
    get(rec, "egress.git.ref_updates")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|u| Update {
                    ref_name: u["ref_name"].as_str().unwrap_or("").into(),
                    old: u["old"].as_str().unwrap_or("").into(),
                    new: u["new"].as_str().unwrap_or("").into(),
                    allowed: u["allowed"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn is_request(r: &Value, method: &str, path: &str) -> bool {
    get_str(r, "http.request.method") == Some(method) && get_str(r, "url.path") == Some(path)
}

fn status(r: &Value) -> Option<u64> {
    get_u64(r, "http.response.status_code")
}

fn ensure_field(rec: &Value, path: &str, want: &str) -> Result<()> {
    ensure!(
        get_str(rec, path) == Some(want),
        "{path} should be {want:?} in {rec}"
    );
    Ok(())
}

/// The record of the receive-pack POST whose ref updates are exactly `want`, in any
/// order (git sorts the commands its own way).
fn push_record(fx: &GitFixture, want: &[Update]) -> Result<Value> {
    let key = |u: &Update| (u.ref_name.clone(), u.old.clone(), u.new.clone(), u.allowed);
    let mut want: Vec<_> = want.iter().map(key).collect();
    want.sort();
    fx.wait_request_record(RECORD_TIMEOUT, &format!("push {want:?}"), |r| {
        let mut got: Vec<_> = updates(r).iter().map(key).collect();
        got.sort();
        is_request(r, "POST", RECEIVE_PACK) && got == want
    })
}

/// A refused push's record: deny, the rule, the repository and service, a reason, and
/// no credential (nothing went upstream).
fn ensure_refused_push(rec: &Value) -> Result<()> {
    ensure_field(rec, "egress.verdict", "deny")?;
    ensure_field(rec, "rule.name", "github-git")?;
    ensure_field(rec, "egress.git.repo", REPO)?;
    ensure_field(rec, "egress.git.service", "git-receive-pack")?;
    ensure!(
        get_str(rec, "event.reason").is_some_and(|r| r.contains("refused")),
        "a refused push's record should say why: {rec}"
    );
    ensure!(
        get_str(rec, "egress.credential.name").is_none(),
        "a refused push names an injected credential: {rec}"
    );
    Ok(())
}

/// `git clone` of `repo` into `dir` in the sandbox.
fn clone(fx: &GitFixture, repo: &str, dir: &str) -> Result<Output> {
    fx.git_ok(&["clone", "-q", &GitFixture::url(repo), dir])
}

/// An empty commit in the sandbox's clone `dir`; returns its id.
fn commit(fx: &GitFixture, dir: &str, message: &str) -> Result<String> {
    fx.git_ok(&["-C", dir, "commit", "-q", "--allow-empty", "-m", message])?;
    fx.rev_parse(dir, "HEAD")
}

/// A push that must fail with git's per-ref `! [remote rejected] <ref> (<reason>)` for
/// each of `refused` (the destination ref as git prints it, and part of the reason).
fn ensure_rejected(out: &Output, refused: &[(&str, &str)]) -> Result<()> {
    let text = all_output(out);
    ensure!(!out.status.success(), "the push must fail: {text}");
    for (dst, why) in refused {
        // `! [remote rejected] <src> -> <dst> (<why>)`, or for a deletion
        // `! [remote rejected] <dst> (<why>)`.
        let line = text
            .lines()
            .find(|l| {
                l.contains("! [remote rejected]")
                    && (l.contains(&format!("-> {dst} (")) || l.contains(&format!("] {dst} (")))
            })
            .with_context(|| format!("no `! [remote rejected] ... {dst} (...)` line in: {text}"))?;
        ensure!(
            line.contains(why),
            "the rejection of {dst} should say {why:?}: {line:?}"
        );
    }
    Ok(())
}

/// Where the origin's access log and the proxy's request records stood.
#[derive(Debug, Clone, Copy)]
struct Mark {
    origin: usize,
    records: usize,
}

impl Mark {
    fn take(fx: &GitFixture) -> Result<Self> {
        Ok(Self {
            origin: fx.origin_settled()?,
            records: fx.request_records()?.len(),
        })
    }
}

/// No push reached the origin since `mark`: the only receive-pack POSTs the origin got
/// are ones the proxy forwarded without any ref update. (git sends such a request, a
/// lone flush-pkt, to probe authentication before a push larger than
/// `http.postBuffer`; it updates nothing.)
fn no_push_reached(fx: &GitFixture, mark: Mark) -> Result<()> {
    std::thread::sleep(expect::CANARY_SETTLE);
    let after = fx.origin.requests()?;
    let pushes: Vec<&OriginRequest> = after[mark.origin..]
        .iter()
        .filter(|r| r.method == "POST" && r.path().ends_with("/git-receive-pack"))
        .collect();
    let records = fx.request_records()?;
    let forwarded: Vec<&Value> = records[mark.records..]
        .iter()
        .filter(|r| {
            get_str(r, "http.request.method") == Some("POST")
                && get_str(r, "url.path").is_some_and(|p| p.ends_with("/git-receive-pack"))
                && get_str(r, "egress.verdict") == Some("allow")
        })
        .collect();
    for r in &forwarded {
        ensure!(
            updates(r).is_empty() && get_u64(r, "http.request.body.bytes") == Some(4),
            "a push with ref updates was forwarded: {r}"
        );
    }
    ensure!(
        pushes.len() <= forwarded.len(),
        "a refused push reached the origin: {pushes:#?}\nforwarded: {forwarded:#?}"
    );
    Ok(())
}

/// Every request the origin logged since `mark` carried `Basic x-access-token:<token>`
/// and succeeded.
fn ensure_origin_auth(reqs: &[OriginRequest], token: &str) -> Result<()> {
    let want = basic(token);
    for r in reqs {
        ensure!(
            r.authorization == want && r.status == 200 && r.proxy_authorization.is_empty(),
            "the origin should see the minted token {token:?} and answer 200: {r:#?}"
        );
    }
    Ok(())
}

/// The mint was asked for as GitHub wants: a JWT issued by the App, valid for at most
/// ten minutes, and the configured repositories and permissions.
fn ensure_mint_request(m: &Mint) -> Result<()> {
    ensure!(
        m.claims["iss"].as_u64() == Some(APP_ID)
            || m.claims["iss"].as_str() == Some(APP_ID.to_string().as_str()),
        "iss: {}",
        m.claims
    );
    let (iat, exp) = (
        m.claims["iat"].as_u64().unwrap_or(0),
        m.claims["exp"].as_u64().unwrap_or(0),
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    ensure!(
        iat <= now && exp > iat && exp - iat <= 600,
        "JWT times: {}",
        m.claims
    );
    ensure!(
        m.body
            == serde_json::json!({"repositories": ["widgets"], "permissions": {"contents": "write"}}),
        "mint body: {}",
        m.body
    );
    Ok(())
}

fn mints(fx: &GitFixture) -> Result<Vec<Mint>> {
    fx.tokens.mints()
}

/// Unix time now, in seconds.
fn now_unix() -> Result<f64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64())
}

/// Sleeps until the Unix time `t` (at most 30 s).
fn sleep_until(t: f64) -> Result<()> {
    let left = (t - now_unix()?).clamp(0.0, 30.0);
    std::thread::sleep(Duration::from_secs_f64(left));
    Ok(())
}

#[test]
fn clone_and_fetch_use_a_minted_token() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    ensure!(
        mints(&fx)?.is_empty(),
        "a token was minted before any request"
    );
    let before = fx.origin_settled()?;

    let cloned = clone(&fx, REPO, "widgets")?;
    let got = std::fs::read_to_string(fx.sandbox_dir().join("widgets").join(REPO_FILE.0))?;
    ensure!(got == REPO_FILE.1, "cloned {}: {got:?}", REPO_FILE.0);

    let minted = mints(&fx)?;
    ensure!(minted.len() == 1, "expected one mint: {minted:#?}");
    ensure_mint_request(&minted[0])?;
    let token = minted[0].token.clone();
    let reqs = fx
        .origin
        .wait_new_at_least(before, 2, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &token)?;
    ensure!(
        reqs.iter()
            .any(|r| r.method == "GET"
                && r.uri == "/acme/widgets.git/info/refs?service=git-upload-pack")
            && reqs
                .iter()
                .any(|r| r.method == "POST" && r.uri == "/acme/widgets.git/git-upload-pack"),
        "clone requests at the origin: {reqs:#?}"
    );

    // Someone else pushes to main; the sandbox fetches it.
    let upstream = fx.origin_commit(REPO, "main", "NEWS.md", "news\n")?;
    let mark = fx.origin_settled()?;
    let fetched = fx.git_ok(&["-C", "widgets", "fetch", "-q", "origin"])?;
    let remote_main = fx.rev_parse("widgets", "refs/remotes/origin/main")?;
    ensure!(
        remote_main == upstream,
        "fetch got origin/main {remote_main}, the origin has {upstream}"
    );
    let reqs = fx
        .origin
        .wait_new_at_least(mark, 2, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &token)?;
    ensure!(
        mints(&fx)?.len() == 1,
        "the fetch minted again within the token's life"
    );

    // The origin itself insists on a token it issued: straight from the world, without
    // one or with a forged one it answers 401, with the minted one 200.
    let refs_url = "https://github.com/acme/widgets.git/info/refs?service=git-upload-pack";
    for (user, want) in [
        (None, "401"),
        (Some("x-access-token:ghs_forged0000".to_string()), "401"),
        (Some(format!("x-access-token:{token}")), "200"),
    ] {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        if let Some(u) = &user {
            args.extend(["-u", u.as_str()]);
        }
        args.push(refs_url);
        let out = fx.world_curl(&args)?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == want,
            "direct request with {:?}: expected {want}: {}",
            user.as_deref().map(|u| u.split(':').next().unwrap_or("")),
            all_output(&out)
        );
    }

    // The `.git` suffix is optional in URLs.
    let bare_url = "https://github.com/acme/widgets";
    let listed = fx.git_ok(&["ls-remote", bare_url, "refs/heads/main"])?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).starts_with(&upstream),
        "ls-remote {bare_url}: {}",
        all_output(&listed)
    );
    let rec = fx.wait_request_record(RECORD_TIMEOUT, "GET /acme/widgets/info/refs", |r| {
        is_request(r, "GET", "/acme/widgets/info/refs")
    })?;
    ensure_field(&rec, "egress.verdict", "allow")?;
    ensure_field(&rec, "egress.git.repo", REPO)?;

    for (method, path) in [
        ("GET", "/acme/widgets.git/info/refs"),
        ("POST", "/acme/widgets.git/git-upload-pack"),
    ] {
        let rec = fx.wait_request_record(RECORD_TIMEOUT, &format!("{method} {path}"), |r| {
            is_request(r, method, path) && status(r) == Some(200)
        })?;
        ensure_field(&rec, "egress.verdict", "allow")?;
        ensure_field(&rec, "rule.name", "github-git")?;
        ensure_field(&rec, "egress.credential.name", APP_CREDENTIAL)?;
        ensure_field(&rec, "egress.git.repo", REPO)?;
        ensure_field(&rec, "egress.git.service", "git-upload-pack")?;
        ensure_field(&rec, "url.domain", "github.com")?;
    }
    // The sandbox cannot reach the token endpoint itself.
    expect::eperm(&fx.sandbox.probe(
        "tcp-connect",
        std::net::IpAddr::V4(egress_tests::git_fixture::TOKENS_V4),
        443,
        &[],
    )?)?;
    expect::canary_silent(&fx.canary)?;
    fx.assert_secrets_absent(&[&cloned, &fetched, &listed])
}

#[test]
fn concurrent_first_requests_share_one_mint() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    let url = GitFixture::url(REPO);
    let before = fx.origin_settled()?;
    let outs: Vec<Result<Output>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| fx.git_ok(&["ls-remote", &url])))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("git thread panicked")))
            })
            .collect()
    });
    let outs: Vec<Output> = outs.into_iter().collect::<Result<_>>()?;
    let minted = mints(&fx)?;
    ensure!(
        minted.len() == 1,
        "four concurrent first requests should share one mint: {minted:#?}"
    );
    let reqs = fx
        .origin
        .wait_new_at_least(before, 4, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &minted[0].token)?;
    let refs: Vec<&Output> = outs.iter().collect();
    fx.assert_secrets_absent(&refs)
}

#[test]
fn failed_renewal_keeps_the_current_token_until_it_expires() -> Result<()> {
    require_proxy_tools!();
    const LIFE: u64 = 8;
    let fx = GitFixture::new(GitOpts {
        token_life: LIFE,
        ..GitOpts::default()
    })?;
    let url = GitFixture::url(REPO);
    let mut outs = Vec::new();
    outs.push(fx.git_ok(&["ls-remote", &url])?);
    let first = mints(&fx)?.first().context("no mint")?.clone();
    let half = first.issued_at + (first.expires as f64 - first.issued_at) / 2.0;

    // The endpoint goes down. Past half the token's life the daemon tries to renew,
    // fails, and keeps using the current token.
    fx.tokens.set_failing(true)?;
    sleep_until(half + 0.7)?;
    let mark = fx.origin_settled()?;
    outs.push(fx.git_ok(&["ls-remote", &url])?);
    // A second request right after does not ask again (the daemon waits before retrying).
    outs.push(fx.git_ok(&["ls-remote", &url])?);
    ensure!(
        now_unix()? < first.expires as f64,
        "the test was too slow: the first token expired before the checks"
    );
    let reqs = fx
        .origin
        .wait_new_at_least(mark, 2, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &first.token)?;
    let rejects = fx.tokens.rejects()?;
    ensure!(
        rejects.len() == 1 && rejects[0]["status"] == 500,
        "expected exactly one failed renewal attempt: {rejects:?}"
    );
    ensure!(
        mints(&fx)?.len() == 1,
        "a token was minted by a failing endpoint"
    );

    // Once the token has expired, with the endpoint still down, requests fail in the
    // proxy and nothing reaches the origin.
    sleep_until(first.expires as f64 + 0.7)?;
    let mark = fx.origin_settled()?;
    let failed = fx.git(&["ls-remote", &url])?;
    ensure!(
        !failed.status.success(),
        "with the token expired and no new one, ls-remote must fail: {}",
        all_output(&failed)
    );
    fx.origin_new_exactly(mark, 0)?;
    let rec = fx.wait_request_record(RECORD_TIMEOUT, "the request without a token", |r| {
        is_request(r, "GET", "/acme/widgets.git/info/refs") && status(r).is_some_and(|c| c >= 500)
    })?;
    ensure!(
        get_str(&rec, "event.reason").is_some_and(|r| r.contains(APP_CREDENTIAL)),
        "the record should name the failed credential: {rec}"
    );
    outs.push(failed);

    // The endpoint is back: the next request mints a new token.
    fx.tokens.set_failing(false)?;
    let mark = fx.origin_settled()?;
    outs.push(fx.git_ok(&["ls-remote", &url])?);
    let minted = mints(&fx)?;
    ensure!(minted.len() == 2, "expected a second mint: {minted:#?}");
    let reqs = fx
        .origin
        .wait_new_at_least(mark, 1, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &minted[1].token)?;
    let refs: Vec<&Output> = outs.iter().collect();
    fx.assert_secrets_absent(&refs)
}

#[test]
fn push_to_agent_branch_works_and_main_is_refused() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    let cloned = clone(&fx, REPO, "widgets")?;
    let main0 = fx.rev_parse("widgets", "HEAD")?;

    // Allowed: a new branch under agent/.
    let a = commit(&fx, "widgets", "agent work")?;
    let mark = fx.origin_settled()?;
    let pushed = fx.git_ok(&["-C", "widgets", "push", "origin", "HEAD:refs/heads/agent/x"])?;
    let refs = fx.origin_refs(REPO)?;
    ensure!(
        refs.contains(&format!("{a} refs/heads/agent/x\n"))
            && refs.contains(&format!("{main0} refs/heads/main\n")),
        "the origin should have agent/x at {a} and main unchanged: {refs}"
    );
    let rec = push_record(&fx, &[Update::new("refs/heads/agent/x", ZERO, &a, true)])?;
    ensure_field(&rec, "egress.verdict", "allow")?;
    ensure_field(&rec, "egress.git.service", "git-receive-pack")?;
    ensure_field(&rec, "egress.credential.name", APP_CREDENTIAL)?;
    ensure!(status(&rec) == Some(200), "push status: {rec}");
    let reqs = fx
        .origin
        .wait_new_at_least(mark, 2, Duration::from_secs(5))?;
    let token = mints(&fx)?.first().context("no mint")?.token.clone();
    ensure_origin_auth(&reqs, &token)?;
    ensure!(
        reqs.iter()
            .any(|r| r.method == "POST" && r.uri == "/acme/widgets.git/git-receive-pack"),
        "the allowed push should reach the origin: {reqs:#?}"
    );

    // Refused: main. Nothing of the push reaches the origin.
    let b = commit(&fx, "widgets", "straight to main")?;
    let refs_before = fx.origin_refs(REPO)?;
    let mark = Mark::take(&fx)?;
    let refused = fx.git(&["-C", "widgets", "push", "origin", "HEAD:main"])?;
    ensure_rejected(
        &refused,
        &[(
            "main",
            "refused by egress policy: allowed refs/heads/agent/**",
        )],
    )?;
    ensure!(
        fx.origin_refs(REPO)? == refs_before,
        "the refused push changed the origin's refs"
    );
    ensure!(
        !fx.origin_has_object(REPO, &b)?,
        "the refused push's commit {b} reached the origin"
    );
    no_push_reached(&fx, mark)?;
    let rec = push_record(&fx, &[Update::new("refs/heads/main", &main0, &b, false)])?;
    ensure_refused_push(&rec)?;

    // All or nothing: an allowed ref pushed with a refused one is not pushed either.
    let mark = Mark::take(&fx)?;
    let mixed = fx.git(&[
        "-C",
        "widgets",
        "push",
        "origin",
        "HEAD:refs/heads/agent/y",
        "HEAD:refs/heads/main",
    ])?;
    ensure_rejected(
        &mixed,
        &[
            ("main", "refused by egress policy"),
            ("agent/y", "another ref was refused"),
        ],
    )?;
    ensure!(
        fx.origin_refs(REPO)? == refs_before,
        "the refused mixed push changed the origin's refs"
    );
    no_push_reached(&fx, mark)?;
    let rec = push_record(
        &fx,
        &[
            Update::new("refs/heads/agent/y", ZERO, &b, true),
            Update::new("refs/heads/main", &main0, &b, false),
        ],
    )?;
    ensure_refused_push(&rec)?;
    expect::canary_silent(&fx.canary)?;
    fx.assert_secrets_absent(&[&cloned, &pushed, &refused, &mixed])
}

/// A server hook that prints the injected token (as `env` shows a request's
/// `Authorization`) has it relayed by git in sideband packets of 128 bytes at most, which
/// cut it: the sandbox's git prints the hook's output with the token masked across the
/// packets, and the push succeeds (the packets' framing is kept). The request's record
/// counts it.
#[test]
fn a_token_a_server_hook_prints_is_masked_across_sideband_packets() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    clone(&fx, REPO, "widgets")?;
    let token = mints(&fx)?.first().context("no mint")?.token.clone();
    // 100 bytes before it: git reads a hook's output 128 bytes at a time.
    let pad = "x".repeat(100);
    let hook = fx.origin.repo_path(REPO).join("hooks").join("pre-receive");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\ncat >/dev/null\nprintf '%s%s\\n' {pad} {token}\n"),
    )?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let a = commit(&fx, "widgets", "hook")?;
    let pushed = fx.git_ok(&[
        "-C",
        "widgets",
        "push",
        "origin",
        "HEAD:refs/heads/agent/hook",
    ])?;
    let said = String::from_utf8_lossy(&pushed.stderr);
    ensure!(
        said.contains(&format!("remote: {pad}[egressd:scrubbed]")),
        "the hook's output as the sandbox saw it: {said}"
    );
    ensure!(
        !said.contains(&token[..8]) && !said.contains(&token[token.len() - 8..]),
        "the token reached the sandbox: {said}"
    );
    // Control: the hook printed the token itself, and the push went through.
    ensure!(fx
        .origin_refs(REPO)?
        .contains(&format!("{a} refs/heads/agent/hook\n")));
    let rec = push_record(&fx, &[Update::new("refs/heads/agent/hook", ZERO, &a, true)])?;
    ensure!(
        get_u64(&rec, "egress.scrubbed").is_some_and(|n| n >= 1),
        "the push's record: {rec}"
    );
    Ok(())
}

#[test]
fn deleting_tagging_and_other_repositories_are_refused() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    clone(&fx, REPO, "widgets")?;
    let a = commit(&fx, "widgets", "agent work")?;
    fx.git_ok(&[
        "-C",
        "widgets",
        "push",
        "-q",
        "origin",
        "HEAD:refs/heads/agent/x",
    ])?;
    let refs_before = fx.origin_refs(REPO)?;
    ensure!(
        refs_before.contains(&format!("{a} refs/heads/agent/x\n")),
        "setup: agent/x should be on the origin: {refs_before}"
    );
    let other_before = fx.origin_refs(OTHER_REPO)?;
    let mark = Mark::take(&fx)?;
    let mut outs = Vec::new();

    // Deleting a branch the globs allow: refused (delete: false).
    let deleted = fx.git(&["-C", "widgets", "push", "origin", "--delete", "agent/x"])?;
    ensure_rejected(
        &deleted,
        &[(
            "agent/x",
            "refused by egress policy: deleting refs is not allowed",
        )],
    )?;
    ensure_refused_push(&push_record(
        &fx,
        &[Update::new("refs/heads/agent/x", &a, ZERO, false)],
    )?)?;
    let colon = fx.git(&["-C", "widgets", "push", "origin", ":agent/x"])?;
    ensure_rejected(&colon, &[("agent/x", "deleting refs is not allowed")])?;
    outs.push(deleted);
    outs.push(colon);

    // A tag outside the globs, and one inside them (refused because tags: false).
    fx.git_ok(&["-C", "widgets", "tag", "v1"])?;
    fx.git_ok(&["-C", "widgets", "tag", "agent/v2"])?;
    let tag = fx.git(&["-C", "widgets", "push", "origin", "refs/tags/v1"])?;
    ensure_rejected(
        &tag,
        &[(
            "v1",
            "refused by egress policy: allowed refs/heads/agent/**",
        )],
    )?;
    ensure_refused_push(&push_record(
        &fx,
        &[Update::new("refs/tags/v1", ZERO, &a, false)],
    )?)?;
    let tag2 = fx.git(&["-C", "widgets", "push", "origin", "refs/tags/agent/v2"])?;
    ensure_rejected(
        &tag2,
        &[("agent/v2", "refused by egress policy: tags are not allowed")],
    )?;
    ensure_refused_push(&push_record(
        &fx,
        &[Update::new("refs/tags/agent/v2", ZERO, &a, false)],
    )?)?;
    let all_tags = fx.git(&["-C", "widgets", "push", "origin", "--tags"])?;
    ensure!(
        !all_tags.status.success(),
        "git push --tags must be refused: {}",
        all_output(&all_tags)
    );
    outs.extend([tag, tag2, all_tags]);

    // Another repository, which exists on the origin: refused at the ref advertisement.
    let other_url = GitFixture::url(OTHER_REPO);
    let other = fx.git(&[
        "-C",
        "widgets",
        "push",
        &other_url,
        "HEAD:refs/heads/agent/x",
    ])?;
    ensure!(
        !other.status.success() && all_output(&other).contains("403"),
        "pushing to {OTHER_REPO} must be refused with 403: {}",
        all_output(&other)
    );
    let other_clone = fx.git(&["clone", "-q", &other_url, "other"])?;
    ensure!(
        !other_clone.status.success() && all_output(&other_clone).contains("403"),
        "cloning {OTHER_REPO} must be refused with 403: {}",
        all_output(&other_clone)
    );
    for service in ["git-receive-pack", "git-upload-pack"] {
        let rec =
            fx.wait_request_record(RECORD_TIMEOUT, &format!("{OTHER_REPO} {service}"), |r| {
                is_request(r, "GET", "/acme/other.git/info/refs")
                    && get_str(r, "egress.git.service") == Some(service)
            })?;
        ensure_field(&rec, "egress.verdict", "deny")?;
        ensure_field(&rec, "egress.git.repo", OTHER_REPO)?;
        ensure!(status(&rec) == Some(403), "status: {rec}");
        ensure!(
            get_str(&rec, "event.reason").is_some_and(|r| r.contains("not allowed")),
            "reason: {rec}"
        );
    }
    outs.extend([other, other_clone]);

    // Nothing changed on the origin, and none of it reached it.
    ensure!(
        fx.origin_refs(REPO)? == refs_before,
        "refused pushes changed {REPO}'s refs"
    );
    ensure!(
        fx.origin_refs(OTHER_REPO)? == other_before,
        "refused pushes changed {OTHER_REPO}'s refs"
    );
    no_push_reached(&fx, mark)?;
    let reached = fx.origin.requests()?;
    ensure!(
        reached[mark.origin..]
            .iter()
            .all(|r| !r.uri.contains("/acme/other")),
        "a request for {OTHER_REPO} reached the origin: {:#?}",
        &reached[mark.origin..]
    );
    let refused_updates: Vec<Update> = fx
        .request_records()?
        .iter()
        .filter(|r| is_request(r, "POST", RECEIVE_PACK))
        .flat_map(updates)
        .filter(|u| !u.allowed)
        .collect();
    ensure!(
        refused_updates.len() >= 5,
        "expected allowed=false updates for two deletions and the tags: {refused_updates:#?}"
    );
    let refs: Vec<&Output> = outs.iter().collect();
    fx.assert_secrets_absent(&refs)
}

#[test]
fn malformed_receive_pack_bodies_never_reach_the_origin() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    let refs_before = fx.origin_refs(REPO)?;
    let before = fx.origin_settled()?;
    let a = "1".repeat(40);
    let b = "2".repeat(40);
    let pkt = |payload: &str| format!("{:04x}{payload}", payload.len() + 4);
    // (label, body, ref update the record must show when the commands could be read)
    let cases: Vec<(&str, Vec<u8>, Option<Update>)> = vec![
        ("length not hex", b"zzzz garbage".to_vec(), None),
        ("length 3", b"0003".to_vec(), None),
        (
            "truncated",
            format!("0100{a} {b} refs/heads/agent/x").into_bytes(),
            None,
        ),
        (
            "no flush",
            pkt(&format!("{a} {b} refs/heads/agent/x\0report-status")).into_bytes(),
            None,
        ),
        (
            "not a command",
            format!("{}0000", pkt("hello world\n")).into_bytes(),
            None,
        ),
        (
            "short object id",
            format!("{}0000", pkt("1234 5678 refs/heads/agent/x\n")).into_bytes(),
            None,
        ),
        (
            "bad ref name",
            format!("{}0000", pkt(&format!("{a} {b} refs/heads/agent/x.lock\n"))).into_bytes(),
            Some(Update::new("refs/heads/agent/x.lock", &a, &b, false)),
        ),
        (
            "ref outside the repository's refs",
            format!("{}0000", pkt(&format!("{a} {b} HEAD\n"))).into_bytes(),
            Some(Update::new("HEAD", &a, &b, false)),
        ),
        // git reads a tab as a capability separator: push options announced that way
        // must not pass unjudged.
        (
            "push-options after a tab",
            format!(
                "{}0000{}0000PACK",
                pkt(&format!(
                    "{a} {b} refs/heads/agent/x\0report-status\tpush-options"
                )),
                pkt("ci.skip\n")
            )
            .into_bytes(),
            None,
        ),
        // Whatever follows the command list is forwarded unread: only a pack may.
        (
            "pkt-lines where the pack belongs",
            format!(
                "{}0000{}0000PACK",
                pkt(&format!("{a} {b} refs/heads/agent/x\0report-status")),
                pkt("ci.skip\n")
            )
            .into_bytes(),
            None,
        ),
    ];
    let url = format!("https://github.com{RECEIVE_PACK}");
    let mut outs = Vec::new();
    for (i, (label, body, update)) in cases.iter().enumerate() {
        let file = format!("body-{i}.bin");
        std::fs::write(fx.sandbox_dir().join(&file), body)?;
        let out = fx.curl(&[
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/x-git-receive-pack-request",
            "-H",
            "Accept: application/x-git-receive-pack-result",
            "--data-binary",
            &format!("@{file}"),
            &url,
        ])?;
        let code: u16 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        ensure!(
            out.status.success() && (400..500).contains(&code),
            "{label}: expected a 4xx refusal, got {code}: {}",
            all_output(&out)
        );
        // Each case's record: the n-th refused receive-pack POST.
        let n = i + 1;
        let recs = egress_tests::util::poll(RECORD_TIMEOUT, Duration::from_millis(50), || {
            let recs: Vec<Value> = fx
                .request_records()?
                .into_iter()
                .filter(|r| is_request(r, "POST", RECEIVE_PACK))
                .collect();
            Ok((recs.len() >= n).then_some(recs))
        })?
        .with_context(|| format!("{label}: no record of the refused POST"))?;
        let rec = &recs[n - 1];
        ensure!(
            status(rec) == Some(u64::from(code)),
            "{label}: record status vs {code}: {rec}"
        );
        ensure_field(rec, "egress.verdict", "deny")?;
        ensure_field(rec, "egress.git.repo", REPO)?;
        ensure_field(rec, "egress.git.service", "git-receive-pack")?;
        ensure!(
            get_str(rec, "event.reason").is_some_and(|r| !r.is_empty()),
            "{label}: no reason: {rec}"
        );
        let want: Vec<Update> = update.iter().cloned().collect();
        ensure!(
            updates(rec) == want,
            "{label}: ref updates should be {want:?}: {rec}"
        );
        outs.push(out);
    }

    // Non-git requests on the git rule: refused too.
    for path in [
        "/acme/widgets",
        "/acme/widgets.git/HEAD",
        "/acme/widgets.git/info/refs",
        "/acme/widgets.git/objects/info/packs",
    ] {
        let out = fx.curl(&[
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://github.com{path}"),
        ])?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == "403",
            "GET {path} on the git rule: expected 403: {}",
            all_output(&out)
        );
        let rec = fx.wait_request_record(RECORD_TIMEOUT, &format!("GET {path}"), |r| {
            is_request(r, "GET", path)
        })?;
        ensure_field(&rec, "egress.verdict", "deny")?;
        outs.push(out);
    }

    fx.origin_new_exactly(before, 0)?;
    ensure!(
        fx.origin_refs(REPO)? == refs_before,
        "the origin's refs changed"
    );
    ensure!(mints(&fx)?.is_empty(), "a refused request minted a token");
    expect::canary_silent(&fx.canary)?;
    let refs: Vec<&Output> = outs.iter().collect();
    fx.assert_secrets_absent(&refs)
}

#[test]
fn app_token_is_reused_while_valid_and_renewed() -> Result<()> {
    require_proxy_tools!();
    const LIFE: u64 = 8;
    let fx = GitFixture::new(GitOpts {
        token_life: LIFE,
        ..GitOpts::default()
    })?;
    let url = GitFixture::url(REPO);
    let mut outs = Vec::new();

    // Two git operations within the token's life: one mint.
    let before = fx.origin_settled()?;
    outs.push(clone(&fx, REPO, "widgets")?);
    outs.push(fx.git_ok(&["-C", "widgets", "fetch", "-q", "origin"])?);
    let done = now_unix()?;
    let minted = mints(&fx)?;
    let first = minted.first().context("the clone minted no token")?.clone();
    // The daemon renews once less than half of the token's life remains.
    let half = first.issued_at + (first.expires as f64 - first.issued_at) / 2.0;
    ensure!(
        done < half - 0.2,
        "clone and fetch took until {:.1} s after the mint: too slow to test reuse within \
         half of a {LIFE} s token",
        done - first.issued_at
    );
    ensure!(
        minted.len() == 1,
        "two git operations within the token's life minted {} tokens: {minted:#?}",
        minted.len()
    );
    ensure_mint_request(&first)?;
    let reqs = fx
        .origin
        .wait_new_at_least(before, 3, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &first.token)?;

    // Past half its life, still before it expires: renewed.
    sleep_until(half + 0.7)?;
    let mark = fx.origin_settled()?;
    outs.push(fx.git_ok(&["ls-remote", &url])?);
    let minted = mints(&fx)?;
    ensure!(
        minted.len() == 2,
        "past half of the token's life the next request should mint once more: {minted:#?}"
    );
    let second = minted[1].clone();
    ensure_mint_request(&second)?;
    ensure!(
        second.issued_at < first.expires as f64,
        "the renewal should come before the first token expires: {first:#?} {second:#?}"
    );
    let reqs = fx
        .origin
        .wait_new_at_least(mark, 1, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &second.token)?;

    // Past its whole life: a new token again.
    sleep_until(second.expires as f64 + 0.7)?;
    let mark = fx.origin_settled()?;
    outs.push(fx.git_ok(&["ls-remote", &url])?);
    let minted = mints(&fx)?;
    ensure!(
        minted.len() == 3,
        "after the token expired the next request should mint: {minted:#?}"
    );
    let third = minted[2].clone();
    ensure_mint_request(&third)?;
    let reqs = fx
        .origin
        .wait_new_at_least(mark, 1, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &third.token)?;

    let tokens: std::collections::BTreeSet<&str> = [&first, &second, &third]
        .iter()
        .map(|m| m.token.as_str())
        .collect();
    ensure!(tokens.len() == 3, "the minted tokens should differ");
    ensure!(
        fx.tokens.rejects()?.is_empty(),
        "the endpoint refused a mint: {:?}",
        fx.tokens.rejects()?
    );
    // Every request on the rule names the App credential.
    let recs = fx.request_records()?;
    ensure!(
        !recs.is_empty()
            && recs.iter().all(|r| {
                get_str(r, "egress.credential.name") == Some(APP_CREDENTIAL)
                    && get_str(r, "egress.verdict") == Some("allow")
            }),
        "records: {recs:#?}"
    );
    let refs: Vec<&Output> = outs.iter().collect();
    fx.assert_secrets_absent(&refs)
}

#[test]
fn jwt_signed_with_another_key_is_refused_by_the_endpoint() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts {
        key: AppKey::Foreign,
        ..GitOpts::default()
    })?;
    let before = fx.origin_settled()?;
    let out = fx.git(&["ls-remote", &GitFixture::url(REPO)])?;
    ensure!(
        !out.status.success(),
        "ls-remote without a valid token must fail: {}",
        all_output(&out)
    );
    let rejects = fx.tokens.rejects()?;
    ensure!(
        !rejects.is_empty()
            && rejects.iter().all(|r| r["status"] == 401
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("bad signature"))),
        "the endpoint should refuse the foreign signature: {rejects:?}\n{}",
        fx.tokens.log()
    );
    ensure!(mints(&fx)?.is_empty(), "a token was minted");
    let rec = fx.wait_request_record(RECORD_TIMEOUT, "the failed request", |r| {
        is_request(r, "GET", "/acme/widgets.git/info/refs")
    })?;
    let code = status(&rec).unwrap_or(0);
    ensure!(
        code >= 500,
        "without a token the proxy should answer an error of its own: {rec}"
    );
    ensure!(
        get_str(&rec, "event.reason")
            .is_some_and(|r| r.contains(APP_CREDENTIAL) || r.contains("401")),
        "the record should say the credential failed: {rec}"
    );
    fx.origin_new_exactly(before, 0)?;
    fx.assert_secrets_absent(&[&out])
}

#[test]
fn large_and_gzip_pushes_are_judged_before_forwarding() -> Result<()> {
    require_proxy_tools!();
    let fx = GitFixture::new(GitOpts::default())?;
    let mut outs = Vec::new();
    outs.push(clone(&fx, REPO, "widgets")?);
    let main0 = fx.rev_parse("widgets", "HEAD")?;

    // A push larger than git's 1 MiB post buffer goes out chunked: the command list is
    // judged from the first chunk and the rest is streamed to the origin.
    let random = egress_tests::pki::random_hex(2 * 1024 * 1024)?;
    std::fs::write(fx.sandbox_dir().join("widgets").join("big.bin"), &random)?;
    fx.git_ok(&["-C", "widgets", "add", "big.bin"])?;
    fx.git_ok(&["-C", "widgets", "commit", "-q", "-m", "big"])?;
    let big = fx.rev_parse("widgets", "HEAD")?;
    outs.push(fx.git_ok(&[
        "-C",
        "widgets",
        "push",
        "origin",
        "HEAD:refs/heads/agent/big",
    ])?);
    ensure!(
        fx.origin_refs(REPO)?
            .contains(&format!("{big} refs/heads/agent/big\n")),
        "the large push should land on the origin"
    );
    let rec = push_record(
        &fx,
        &[Update::new("refs/heads/agent/big", ZERO, &big, true)],
    )?;
    ensure!(
        get_u64(&rec, "http.request.body.bytes").is_some_and(|b| b > 1024 * 1024),
        "the record should count the streamed body: {rec}"
    );

    // The same size refused: git reads the proxy's report after the body is drained.
    std::fs::write(
        fx.sandbox_dir().join("widgets").join("big2.bin"),
        random.to_uppercase(),
    )?;
    fx.git_ok(&["-C", "widgets", "add", "big2.bin"])?;
    fx.git_ok(&["-C", "widgets", "commit", "-q", "-m", "big2"])?;
    let big2 = fx.rev_parse("widgets", "HEAD")?;
    let refs_before = fx.origin_refs(REPO)?;
    let mark = Mark::take(&fx)?;
    let refused = fx.git(&["-C", "widgets", "push", "origin", "HEAD:main"])?;
    ensure_rejected(&refused, &[("main", "refused by egress policy")])?;
    no_push_reached(&fx, mark)?;
    ensure!(
        fx.origin_refs(REPO)? == refs_before,
        "the origin's refs changed"
    );
    ensure!(
        !fx.origin_has_object(REPO, &big2)?,
        "the refused push's commit reached the origin"
    );
    outs.push(refused);

    // Hand-made gzip-encoded pushes (no pack needed: the new ref names an object the
    // origin has, and an empty pack follows the commands).
    let empty_pack = {
        let out = std::process::Command::new("git")
            .args(["pack-objects", "-q", "--stdout"])
            .current_dir(fx.origin.repo_path(REPO))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(std::process::Stdio::null())
            .output()?;
        ensure!(
            out.status.success() && out.stdout.starts_with(b"PACK"),
            "empty pack: {out:?}"
        );
        out.stdout
    };
    for (i, (ref_name, allowed)) in [("refs/heads/agent/gz", true), ("refs/heads/gz", false)]
        .into_iter()
        .enumerate()
    {
        let line = format!("{ZERO} {main0} {ref_name}\0report-status agent=test");
        let mut body = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
        body.extend_from_slice(&empty_pack);
        let plain = format!("gz-{i}.bin");
        std::fs::write(fx.sandbox_dir().join(&plain), &body)?;
        let gz = fx.client(10, "gzip", &["-kf", &plain], &[])?;
        ensure!(gz.status.success(), "gzip: {}", all_output(&gz));
        let mark = Mark::take(&fx)?;
        let out = fx.curl(&[
            "--http1.1",
            "-H",
            "Content-Type: application/x-git-receive-pack-request",
            "-H",
            "Content-Encoding: gzip",
            "--data-binary",
            &format!("@{plain}.gz"),
            &format!("https://github.com{RECEIVE_PACK}"),
        ])?;
        let answer = String::from_utf8_lossy(&out.stdout).into_owned();
        let refs = fx.origin_refs(REPO)?;
        if allowed {
            ensure!(
                out.status.success() && answer.contains(&format!("ok {ref_name}")),
                "gzip push of {ref_name}: {}",
                all_output(&out)
            );
            ensure!(
                refs.contains(&format!("{main0} {ref_name}\n")),
                "{ref_name} should be on the origin: {refs}"
            );
            let reqs = fx
                .origin
                .wait_new_at_least(mark.origin, 1, Duration::from_secs(5))?;
            ensure!(reqs.iter().all(|r| r.status == 200), "{reqs:#?}");
        } else {
            ensure!(
                out.status.success()
                    && answer.contains(&format!("ng {ref_name} refused by egress policy")),
                "gzip push of {ref_name} should be refused with a report: {}",
                all_output(&out)
            );
            ensure!(
                !refs.contains(ref_name),
                "{ref_name} reached the origin: {refs}"
            );
            no_push_reached(&fx, mark)?;
        }
        push_record(&fx, &[Update::new(ref_name, ZERO, &main0, allowed)])?;
        outs.push(out);
    }

    // Paths another server might read differently (400), and a query on the POST (403):
    // refused.
    let mark = fx.origin_settled()?;
    for (path, want) in [
        ("/acme/widgets.git/../other.git/git-receive-pack", "400"),
        ("/acme/widgets.git//git-receive-pack", "400"),
        ("/acme/widgets.git/git-receive-pack?service=x", "403"),
        ("/acme/other.git%2f..%2fwidgets.git/git-receive-pack", "400"),
    ] {
        let out = fx.curl(&[
            "--http1.1",
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/x-git-receive-pack-request",
            "--data-binary",
            "0000",
            &format!("https://github.com{path}"),
        ])?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == want,
            "POST {path}: expected {want}: {}",
            all_output(&out)
        );
    }
    fx.origin_new_exactly(mark, 0)?;

    // Git rules speak HTTP/1.1 to the sandbox, whatever the client offers.
    let out = fx.curl(&[
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        "https://github.com/acme/widgets.git/info/refs?service=git-upload-pack",
    ])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "1.1 200",
        "curl --http2 on the git rule: {}",
        all_output(&out)
    );
    let refs: Vec<&Output> = outs.iter().collect();
    fx.assert_secrets_absent(&refs)
}

#[test]
fn rotated_app_key_is_used_for_the_next_mint() -> Result<()> {
    require_proxy_tools!();
    const LIFE: u64 = 4;
    let fx = GitFixture::new(GitOpts {
        token_life: LIFE,
        ..GitOpts::default()
    })?;
    let url = GitFixture::url(REPO);
    let mut outs = vec![fx.git_ok(&["ls-remote", &url])?];
    let first = mints(&fx)?.first().context("no mint")?.clone();
    let half = first.issued_at + (first.expires as f64 - first.issued_at) / 2.0;

    // The App's key is replaced (the endpoint now accepts only the new one). The daemon
    // reads the key file for every mint, so its renewal is signed with the new key.
    fx.rotate_app_key()?;
    sleep_until(half + 0.7)?;
    let mark = fx.origin_settled()?;
    outs.push(fx.git_ok(&["ls-remote", &url])?);
    let minted = mints(&fx)?;
    ensure!(
        minted.len() == 2 && fx.tokens.rejects()?.is_empty(),
        "the renewal after the key rotation should be signed with the new key: mints \
         {minted:#?}, refused: {:?}",
        fx.tokens.rejects()?
    );
    let reqs = fx
        .origin
        .wait_new_at_least(mark, 1, Duration::from_secs(5))?;
    ensure_origin_auth(&reqs, &minted[1].token)?;
    let refs: Vec<&Output> = outs.iter().collect();
    fx.assert_secrets_absent(&refs)
}
