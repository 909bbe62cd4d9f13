//! The setup for the git push-rule and GitHub App token tests: a World with the HTTPS
//! origins of [`crate::https_origin`] (the git origin serving `acme/widgets` and
//! `acme/other`, accepting any token listed in a file), a fake GitHub App token endpoint
//! ([`TokenEndpoint`], `fixtures/token_endpoint.py`) on [`TOKENS_V4`]:443, the canary, a
//! sandbox whose `/etc/hosts` names the origins, and a daemon whose `github-app`
//! credential mints installation tokens from that endpoint with an RSA key made at test
//! time.
//!
//! The App's private key, the daemon configuration and the static `github-git` token
//! live in `secrets` (read only by the daemon); the token endpoint's directory holds the
//! public key, the list of minted tokens (which the git origin reads) and a log of every
//! mint; the sandbox gets only the exported proxy CA, a `HOME` and its clones
//! ([`GitFixture::assert_secrets_absent`] checks that none of the secrets reach it).
//!
//! The endpoint is named by address (`api_url: https://192.0.2.40`, certificate with
//! that IP as subjectAltName): the daemon resolves the endpoint's host name in its own
//! namespace, where the world's names do not exist, but dials from the world.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::audit::{get_str, summarize};
use crate::daemon::{tail, Daemon, DaemonOpts};
use crate::hosts_file::HostsFile;
use crate::https_origin::{GitAuth, HttpsOrigin, OriginOpts, OriginRequest, GIT_HOST};
use crate::pki::{random_hex, TestCa};
use crate::proxy_fixture::{sandbox_hosts, CLIENT_PATH, GIT_TOKEN_ENV, PROXY_PORT};
use crate::sandbox::Sandbox;
use crate::servers::{spawn_ready, Canary};
use crate::util::{poll, run_checked, ChildGuard, TempDir};
use crate::world::World;

/// The fake token endpoint (`api_url`), in the world.
pub const TOKENS_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
/// The App's id (the JWT's `iss`).
pub const APP_ID: u64 = 123;
/// The installation tokens are minted for.
pub const INSTALLATION_ID: u64 = 456;
/// The credential minting App tokens.
pub const APP_CREDENTIAL: &str = "github-app";
/// The credential with a fixed token from the daemon's environment.
pub const STATIC_CREDENTIAL: &str = "github-git";
/// The repository the rules allow.
pub const REPO: &str = "acme/widgets";
/// A repository the origin serves (to anyone with a token) but the rules do not allow.
pub const OTHER_REPO: &str = "acme/other";
/// What the daemon must ask the endpoint for (`repositories`, `permissions`).
pub const EXPECTED_MINT_BODY: &str =
    r#"{"repositories":["widgets"],"permissions":{"contents":"write"}}"#;

/// The brief's git rule: fetch and push `acme/widgets` on github.com with minted tokens,
/// pushes only to `refs/heads/agent/**` (and `refs/tags/agent/**`, which `tags: false`
/// still refuses: the tag switch is checked, not just the globs), no deletions.
pub const GIT_POLICY: &str = r#"version: 1
default: deny
rules:
  - name: github-git
    to: [192.0.2.11]
    ports: [443]
    action: proxy
    hosts: [github.com]
    credential: github-app
    git:
      repos: [acme/widgets]
      fetch: true
      push:
        refs: ["refs/heads/agent/**", "refs/tags/agent/**"]
        delete: false
        tags: false
"#;

/// Which key the daemon is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKey {
    /// The App's key, whose public half the endpoint verifies with.
    Matching,
    /// Another RSA key: every JWT the daemon signs fails verification.
    Foreign,
}

/// Knobs for [`GitFixture::new`].
#[derive(Debug, Clone)]
pub struct GitOpts {
    pub policy: String,
    /// Seconds a minted token lives (the endpoint rounds its expiry up to a whole second).
    pub token_life: u64,
    pub key: AppKey,
}

impl Default for GitOpts {
    fn default() -> Self {
        Self {
            policy: GIT_POLICY.to_string(),
            token_life: 3600,
            key: AppKey::Matching,
        }
    }
}

/// One mint, as the endpoint logged it.
#[derive(Debug, Clone)]
pub struct Mint {
    pub n: u64,
    pub token: String,
    pub jwt: String,
    pub claims: Value,
    pub body: Value,
    /// Unix time of the mint.
    pub issued_at: f64,
    /// Unix time the token expires (whole seconds).
    pub expires: u64,
}

/// `fixtures/token_endpoint.py` in the world on [`TOKENS_V4`]:443.
#[derive(Debug)]
pub struct TokenEndpoint {
    child: ChildGuard,
    dir: TempDir,
    tokens: PathBuf,
    mints: PathBuf,
    rejects: PathBuf,
    fail_file: PathBuf,
    pubkey: PathBuf,
}

impl TokenEndpoint {
    /// Starts the endpoint with a certificate for [`TOKENS_V4`] from `ca`, verifying JWTs
    /// with `pubkey`, minting tokens that live `life` seconds. `tokens` lists the tokens
    /// (the endpoint appends each one it mints).
    pub fn start(
        world: &World,
        ca: &TestCa,
        dir: TempDir,
        pubkey: &Path,
        tokens: &Path,
        life: u64,
    ) -> Result<Self> {
        world.add_host(IpAddr::V4(TOKENS_V4))?;
        let ip = TOKENS_V4.to_string();
        let leaf = ca.issue("token-endpoint", &[&ip])?;
        let mints = dir.path().join("mints.jsonl");
        let rejects = dir.path().join("rejects.jsonl");
        let fail_file = dir.path().join("fail");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work)?;
        let s = |p: &Path| p.display().to_string();
        let args = vec![
            "--bind".to_string(),
            format!("{ip}:443"),
            "--cert".into(),
            s(&leaf.cert),
            "--key".into(),
            s(&leaf.key),
            "--pubkey".into(),
            s(pubkey),
            "--app-id".into(),
            APP_ID.to_string(),
            "--installation-id".into(),
            INSTALLATION_ID.to_string(),
            "--life".into(),
            life.to_string(),
            "--tokens".into(),
            s(tokens),
            "--mints".into(),
            s(&mints),
            "--rejects".into(),
            s(&rejects),
            "--work".into(),
            s(&work),
            "--expect-body".into(),
            EXPECTED_MINT_BODY.into(),
            "--fail-file".into(),
            s(&fail_file),
        ];
        let child = spawn_ready(
            world.netns(),
            &dir,
            "token-endpoint",
            "token_endpoint.py",
            &args,
        )?;
        Ok(Self {
            child,
            dir,
            tokens: tokens.to_path_buf(),
            mints,
            rejects,
            fail_file,
            pubkey: pubkey.to_path_buf(),
        })
    }

    /// The App public key the endpoint verifies JWTs with (read at every request).
    pub fn pubkey(&self) -> &Path {
        &self.pubkey
    }

    /// Makes the endpoint answer every request with 500 (`true`) or work again.
    pub fn set_failing(&self, failing: bool) -> Result<()> {
        if failing {
            std::fs::write(&self.fail_file, "fail\n")
                .with_context(|| format!("write {}", self.fail_file.display()))
        } else {
            match std::fs::remove_file(&self.fail_file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("remove {}", self.fail_file.display()))
                }
                _ => Ok(()),
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The file of accepted tokens.
    pub fn tokens_file(&self) -> &Path {
        &self.tokens
    }

    /// Every mint so far, in order.
    pub fn mints(&self) -> Result<Vec<Mint>> {
        read_jsonl(&self.mints)?
            .iter()
            .map(|v| {
                Ok(Mint {
                    n: v["n"].as_u64().context("mint n")?,
                    token: v["token"].as_str().context("mint token")?.to_string(),
                    jwt: v["jwt"].as_str().context("mint jwt")?.to_string(),
                    claims: v["claims"].clone(),
                    body: v["body"].clone(),
                    issued_at: v["issued_at"].as_f64().context("mint issued_at")?,
                    expires: v["expires"].as_u64().context("mint expires")?,
                })
            })
            .collect()
    }

    /// Tokens revoked with `DELETE /installation/token` so far, in order.
    pub fn revoked(&self) -> Result<Vec<String>> {
        let mut path = self.tokens.clone().into_os_string();
        path.push(".revoked");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every refused mint request so far (`status`, `reason`).
    pub fn rejects(&self) -> Result<Vec<Value>> {
        read_jsonl(&self.rejects)
    }

    /// The endpoint's own log (stderr), for diagnostics.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("token-endpoint.log")).unwrap_or_default()
    }
}

/// Complete JSON lines of `path` (none if it does not exist).
fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l:?}", path.display())))
        .collect()
}

/// See the module documentation. Field order is drop order: sandbox processes first, then
/// the daemon, then servers, namespaces and files.
#[derive(Debug)]
pub struct GitFixture {
    pub sandbox: Sandbox,
    pub hosts: HostsFile,
    pub daemon: Daemon,
    pub tokens: TokenEndpoint,
    pub origin: HttpsOrigin,
    pub canary: Canary,
    pub world: World,
    pub ca: TestCa,
    secrets: TempDir,
    sandbox_dir: TempDir,
    proxy_ca: PathBuf,
    static_token: String,
    private_key: PathBuf,
}

/// `git -C <dir> -c ... <args>` on this machine (not in any namespace), for preparing
/// and inspecting repositories.
fn host_git(dir: &Path, args: &[&str]) -> Result<Output> {
    run_checked(
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env_clear()
            .env("PATH", CLIENT_PATH)
            .env("HOME", dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null()),
    )
}

/// A 2048-bit RSA key in PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`, as GitHub issues App keys)
/// at `key`, and its public half at `public` when given.
fn make_rsa_key(key: &Path, public: Option<&Path>) -> Result<()> {
    run_checked(
        Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(key)
            .arg("2048")
            .stdin(Stdio::null()),
    )
    .context("openssl genrsa")?;
    if let Some(public) = public {
        run_checked(
            Command::new("openssl")
                .args(["rsa", "-in"])
                .arg(key)
                .args(["-pubout", "-out"])
                .arg(public)
                .stdin(Stdio::null()),
        )
        .context("openssl rsa -pubout")?;
    }
    Ok(())
}

impl GitFixture {
    /// World, token endpoint, origins (with `acme/other`), canary, sandbox "sb" (with
    /// hosts file), daemon with both credentials, `opts.policy` attached, and the proxy
    /// CA exported to the sandbox directory.
    pub fn new(opts: GitOpts) -> Result<Self> {
        let static_token = format!("ghp_{}", random_hex(20)?);
        let secrets = TempDir::new("git-secrets")?;
        let sandbox_dir = TempDir::new("git-sandbox")?;
        let endpoint_dir = TempDir::new("token-endpoint")?;
        let ca = TestCa::new("git")?;
        let world = World::new()?;

        let private_key = secrets.path().join("app-key.pem");
        let public_key = endpoint_dir.path().join("app-key.pub.pem");
        make_rsa_key(&private_key, Some(&public_key))?;
        let configured_key = match opts.key {
            AppKey::Matching => private_key.clone(),
            AppKey::Foreign => {
                let other = secrets.path().join("foreign-key.pem");
                make_rsa_key(&other, None)?;
                other
            }
        };
        // The static credential's token is accepted too; minted ones are appended.
        let tokens_file = endpoint_dir.path().join("tokens.txt");
        std::fs::write(&tokens_file, format!("{static_token}\n"))?;
        let tokens = TokenEndpoint::start(
            &world,
            &ca,
            endpoint_dir,
            &public_key,
            &tokens_file,
            opts.token_life,
        )?;
        let origin = HttpsOrigin::start_with(
            &world,
            &ca,
            &static_token,
            OriginOpts {
                git_auth: GitAuth::TokensFile(tokens_file),
                extra_repos: vec![OTHER_REPO.to_string()],
            },
        )?;
        let canary = Canary::start(&world)?;
        let sandbox = world.add_sandbox("sb")?;
        let hosts = HostsFile::new(sandbox.netns(), &sandbox_hosts())?;

        let config = format!(
            r#"proxy_port: {PROXY_PORT}
proxy:
  upstream_ca: "{ca}"
  upstream_netns: "{world_ns}"
credentials:
  {STATIC_CREDENTIAL}:
    source: {{ env: {GIT_TOKEN_ENV} }}
    inject: {{ basic: {{ user: x-access-token }} }}
    hosts: [{GIT_HOST}]
  {APP_CREDENTIAL}:
    source:
      github_app:
        app_id: {APP_ID}
        private_key: "{key}"
        installation_id: {INSTALLATION_ID}
        api_url: "https://{TOKENS_V4}"
        repositories: [widgets]
        permissions: {{ contents: write }}
    inject: {{ basic: {{ user: x-access-token }} }}
    hosts: [{GIT_HOST}]
"#,
            ca = ca.cert().display(),
            world_ns = world.netns().path().display(),
            key = configured_key.display(),
        );
        let config = secrets.write("egressd.yaml", &config)?;
        let daemon = Daemon::start(DaemonOpts {
            extra_args: vec!["--config".into(), config.display().to_string()],
            env: vec![
                (GIT_TOKEN_ENV.into(), static_token.clone()),
                (
                    "RUST_LOG".into(),
                    "info,egress=debug,egressd=debug,agent_userspace=debug".into(),
                ),
            ],
            ..DaemonOpts::default()
        })?;
        let proxy_ca = sandbox_dir.path().join("egressd-ca.pem");
        let fx = Self {
            sandbox,
            hosts,
            daemon,
            tokens,
            origin,
            canary,
            world,
            ca,
            secrets,
            sandbox_dir,
            proxy_ca,
            static_token,
            private_key,
        };
        fx.attach(&opts.policy)?;
        let pem = fx.daemon.ctl_ok(["ca", "export"])?;
        let pem = String::from_utf8(pem.stdout).context("ca export is not UTF-8")?;
        ensure!(
            pem.contains("-----BEGIN CERTIFICATE-----"),
            "`egressctl ca export` printed no certificate: {pem:?}"
        );
        std::fs::write(&fx.proxy_ca, pem)?;
        std::fs::create_dir_all(fx.home())?;
        Ok(fx)
    }

    /// Attaches `yaml` as the sandbox's policy (replacing the one it has).
    pub fn attach(&self, yaml: &str) -> Result<()> {
        let policy = self.sandbox_dir.write("policy.yaml", yaml)?;
        let out = self.daemon.ctl([
            OsStr::new("attach"),
            OsStr::new("--cgroup"),
            self.sandbox.cgroup().path().as_os_str(),
            OsStr::new("--policy"),
            policy.as_os_str(),
            OsStr::new("--name"),
            OsStr::new(self.sandbox.label()),
            OsStr::new("--netns"),
            self.sandbox.netns().path().as_os_str(),
        ])?;
        if !out.status.success() {
            bail!(
                "attach failed ({}): {}{}\ndaemon log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
                tail(&self.daemon.log(), 30)
            );
        }
        Ok(())
    }

    /// The `github-git` credential's fixed token. Never give it to the sandbox.
    pub fn static_token(&self) -> &str {
        &self.static_token
    }

    /// The proxy's CA, as exported by `egressctl ca export`, in the sandbox directory.
    pub fn proxy_ca(&self) -> &Path {
        &self.proxy_ca
    }

    /// The directory the sandbox's clients use (and run in).
    pub fn sandbox_dir(&self) -> &Path {
        self.sandbox_dir.path()
    }

    /// `HOME` for clients in the sandbox.
    pub fn home(&self) -> PathBuf {
        self.sandbox_dir.path().join("home")
    }

    /// `https://github.com/<repo>.git`.
    pub fn url(repo: &str) -> String {
        format!("https://{GIT_HOST}/{repo}.git")
    }

    /// `program args` in the sandbox with only `PATH`, `HOME` and `env`, from the
    /// sandbox directory, bounded by `secs`.
    pub fn client<S: AsRef<OsStr>>(
        &self,
        secs: u32,
        program: &str,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Result<Output> {
        let mut cmd = self.sandbox.command_with_timeout(secs, program, args);
        cmd.env_clear()
            .env("PATH", CLIENT_PATH)
            .env("HOME", self.home())
            .current_dir(self.sandbox_dir.path())
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    /// `git -c http.sslCAInfo=<proxy CA> -c user.name=agent -c user.email=... <args>` in
    /// the sandbox: no system config, no prompts, no credential helper, 30 s bound.
    pub fn git(&self, args: &[&str]) -> Result<Output> {
        let ca = format!("http.sslCAInfo={}", self.proxy_ca.display());
        let mut all = vec![
            "-c",
            &ca,
            "-c",
            "user.name=agent",
            "-c",
            "user.email=agent@example.com",
            "-c",
            "credential.helper=",
        ];
        all.extend_from_slice(args);
        self.client(
            30,
            "git",
            &all,
            &[("GIT_CONFIG_NOSYSTEM", "1"), ("GIT_TERMINAL_PROMPT", "0")],
        )
    }

    /// [`GitFixture::git`], failing with its output unless it exits 0.
    pub fn git_ok(&self, args: &[&str]) -> Result<Output> {
        let out = self.git(args)?;
        if !out.status.success() {
            bail!(
                "git {args:?} failed ({}):\n{}\n{}\norigin: {}\ntoken endpoint: {}\ndaemon log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout),
                self.origin.error_logs(),
                self.tokens.log(),
                tail(&self.daemon.log(), 30)
            );
        }
        Ok(out)
    }

    /// curl in the sandbox trusting only the proxy's CA: `curl -sS --max-time 10
    /// --connect-timeout 3 --cacert <proxy ca> <args>`.
    pub fn curl(&self, args: &[&str]) -> Result<Output> {
        let ca = self.proxy_ca.display().to_string();
        let mut all = vec![
            "-sS",
            "--max-time",
            "10",
            "--connect-timeout",
            "3",
            "--cacert",
            &ca,
            "--capath",
            "/nonexistent",
        ];
        all.extend_from_slice(args);
        self.client(20, "curl", &all, &[])
    }

    /// curl in the world namespace, straight to the origins (no sandbox, no proxy),
    /// trusting the test CA, with the origins' names resolved by `--resolve`.
    pub fn world_curl(&self, args: &[&str]) -> Result<Output> {
        let ca = self.ca.cert().display().to_string();
        let resolves: Vec<String> = sandbox_hosts()
            .iter()
            .map(|(ip, name)| format!("{name}:443:{ip}"))
            .collect();
        let mut all: Vec<&str> = vec!["-sS", "--max-time", "10", "--cacert", &ca];
        for r in &resolves {
            all.push("--resolve");
            all.push(r);
        }
        all.extend_from_slice(args);
        let mut cmd = self.world.command("curl", &all);
        cmd.env_clear()
            .env("PATH", CLIENT_PATH)
            .stdin(Stdio::null());
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    /// Rotates the App's key: a new key pair replaces the daemon's private key file and
    /// the endpoint's public key (each by an atomic rename); the old private key is kept
    /// as `app-key.<n>.old.pem` beside it, so that [`GitFixture::secrets`] still
    /// looks for it.
    pub fn rotate_app_key(&self) -> Result<()> {
        let n = crate::util::next_id();
        let old = self.secrets.path().join(format!("app-key.{n}.old.pem"));
        std::fs::copy(&self.private_key, &old)?;
        let new_key = self.secrets.path().join(format!("app-key.{n}.new.pem"));
        let new_pub = self.secrets.path().join(format!("app-key.{n}.pub.pem"));
        make_rsa_key(&new_key, Some(&new_pub))?;
        std::fs::rename(&new_key, &self.private_key)?;
        let tmp_pub = self.tokens.pubkey().with_extension("new");
        std::fs::copy(&new_pub, &tmp_pub)?;
        std::fs::rename(&tmp_pub, self.tokens.pubkey())?;
        std::fs::remove_file(&new_pub)?;
        Ok(())
    }

    /// `git for-each-ref` of the origin's bare repository `repo`: one `<oid> <ref>` line
    /// per ref, sorted.
    pub fn origin_refs(&self, repo: &str) -> Result<String> {
        let out = host_git(
            &self.origin.repo_path(repo),
            &["for-each-ref", "--format=%(objectname) %(refname)"],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The daemon's own directory (configuration, App key).
    pub fn secrets_dir(&self) -> &Path {
        self.secrets.path()
    }

    /// Commits `content` as `file` on `branch` of the origin's `repo` directly (as
    /// someone else pushing to GitHub would), from a scratch clone on this machine.
    /// Returns the new commit's id.
    pub fn origin_commit(
        &self,
        repo: &str,
        branch: &str,
        file: &str,
        content: &str,
    ) -> Result<String> {
        let scratch = TempDir::new("origin-commit")?;
        let bare = self.origin.repo_path(repo).display().to_string();
        host_git(scratch.path(), &["clone", "-q", "-b", branch, &bare, "w"])?;
        let work = scratch.path().join("w");
        std::fs::write(work.join(file), content)?;
        host_git(&work, &["add", file])?;
        host_git(
            &work,
            &[
                "-c",
                "user.name=someone else",
                "-c",
                "user.email=else@example.com",
                "commit",
                "-q",
                "-m",
                "upstream change",
            ],
        )?;
        host_git(&work, &["push", "-q", "origin", &format!("HEAD:{branch}")])?;
        let out = host_git(&work, &["rev-parse", "HEAD"])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Whether the origin's repository `repo` holds object `oid`.
    pub fn origin_has_object(&self, repo: &str, oid: &str) -> Result<bool> {
        let status = Command::new("git")
            .arg("-C")
            .arg(self.origin.repo_path(repo))
            .args(["cat-file", "-e", oid])
            .env_clear()
            .env("PATH", CLIENT_PATH)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("git cat-file")?;
        Ok(status.success())
    }

    /// `git rev-parse <rev>` in the sandbox directory's clone `dir` (run on this machine).
    pub fn rev_parse(&self, dir: &str, rev: &str) -> Result<String> {
        let out = host_git(&self.sandbox_dir.path().join(dir), &["rev-parse", rev])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Every proxy `http-request` record so far.
    pub fn request_records(&self) -> Result<Vec<Value>> {
        Ok(self
            .daemon
            .audit_records()?
            .into_iter()
            .filter(|r| get_str(r, "event.action") == Some("http-request"))
            .collect())
    }

    /// Waits (at most `timeout`) for an `http-request` record matching `pred`.
    pub fn wait_request_record(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let found = poll(timeout, Duration::from_millis(50), || {
            Ok(self.request_records()?.into_iter().find(|r| pred(r)))
        })?;
        match found {
            Some(r) => Ok(r),
            None => bail!(
                "no http-request record {what} within {timeout:?}; request records:\n{}\nall:{}\ndaemon log:\n{}",
                self.request_records()
                    .unwrap_or_default()
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                summarize(&self.daemon.audit_records().unwrap_or_default()),
                tail(&self.daemon.log(), 30)
            ),
        }
    }

    /// The number of requests the origin has logged, once it has logged nothing new for
    /// 300 ms (at most 5 s): nginx logs a request only after its response is sent, so
    /// a client may finish before its last request is logged.
    pub fn origin_settled(&self) -> Result<usize> {
        let mut last = self.origin.requests()?.len();
        let mut stable_since = std::time::Instant::now();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.origin.requests()?.len();
            if now != last {
                last = now;
                stable_since = std::time::Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(300) {
                break;
            }
        }
        Ok(last)
    }

    /// Waits until the origin has logged `before + n` requests, then a little more to
    /// catch any extra one; fails unless exactly `n` are new. Returns them.
    pub fn origin_new_exactly(&self, before: usize, n: usize) -> Result<Vec<OriginRequest>> {
        if n > 0 {
            self.origin
                .wait_new_at_least(before, n, Duration::from_secs(5))?;
        }
        std::thread::sleep(crate::expect::CANARY_SETTLE);
        let got = self.origin.requests()?[before..].to_vec();
        ensure!(
            got.len() == n,
            "expected {n} new origin request(s), got {}: {got:#?}",
            got.len()
        );
        Ok(got)
    }

    /// The secrets: the static token, every minted token, every JWT the endpoint
    /// received, and the lines of the App's private key (PEM body).
    pub fn secrets(&self) -> Result<Vec<(String, String)>> {
        let mut out = vec![(
            "the github-git token".to_string(),
            self.static_token.clone(),
        )];
        for m in self.tokens.mints()? {
            out.push((format!("minted token #{}", m.n), m.token.clone()));
            out.push((format!("the JWT of mint #{}", m.n), m.jwt.clone()));
        }
        let mut keys = vec![self.private_key.clone()];
        for e in std::fs::read_dir(self.secrets.path())? {
            let p = e?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.starts_with("app-key.") && name.ends_with(".old.pem") {
                keys.push(p);
            }
        }
        for key in keys {
            let pem =
                std::fs::read_to_string(&key).with_context(|| format!("read {}", key.display()))?;
            let body: Vec<&str> = pem
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 32)
                .collect();
            ensure!(
                body.len() >= 10,
                "{} does not look like a PEM key",
                key.display()
            );
            for (i, line) in body.iter().enumerate() {
                out.push((
                    format!("line {} of the private key {}", i + 2, key.display()),
                    (*line).to_string(),
                ));
            }
            out.push((format!("the private key {}", key.display()), body.concat()));
        }
        Ok(out)
    }

    /// No secret ([`GitFixture::secrets`]) appears in the sandbox's environment, any file
    /// under the sandbox directory, the sandbox's hosts file, the audit log, the daemon's
    /// log, or the given client outputs.
    pub fn assert_secrets_absent(&self, outputs: &[&Output]) -> Result<()> {
        let secrets = self.secrets()?;
        let env = self.sandbox.run("env", &[] as &[&str])?;
        ensure!(env.status.success(), "env in the sandbox failed: {env:?}");
        let mut places: Vec<(String, Vec<u8>)> =
            vec![("the sandbox's environment".into(), env.stdout)];
        for f in crate::util::files_under(self.sandbox_dir.path())? {
            let bytes = std::fs::read(&f).with_context(|| format!("read {}", f.display()))?;
            places.push((f.display().to_string(), bytes));
        }
        for p in [
            self.hosts.path().to_path_buf(),
            self.daemon.audit_log(),
            self.daemon.log_path(),
        ] {
            let bytes = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
            places.push((p.display().to_string(), bytes));
        }
        for (i, o) in outputs.iter().enumerate() {
            places.push((format!("client output #{i} (stdout)"), o.stdout.clone()));
            places.push((format!("client output #{i} (stderr)"), o.stderr.clone()));
        }
        ensure!(
            !self.daemon.log().is_empty() && std::fs::metadata(self.daemon.audit_log())?.len() > 0,
            "the daemon log or audit log is empty: nothing to check"
        );
        for (place, bytes) in &places {
            let hay = String::from_utf8_lossy(bytes);
            for (what, secret) in &secrets {
                if let Some(at) = hay.find(secret.as_str()) {
                    let start = hay[..at].char_indices().rev().nth(80).map_or(0, |(i, _)| i);
                    bail!("{what} leaked into {place}: ...{}<SECRET>", &hay[start..at]);
                }
            }
        }
        Ok(())
    }
}
