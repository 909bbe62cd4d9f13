//! The setup for the credential-injecting proxy tests: a World with the HTTPS origins of
//! [`crate::https_origin`] and the canary, a sandbox whose `/etc/hosts` names them, and
//! a daemon configured with a test CA as its upstream CA, the world as the namespace it
//! dials upstream servers from, and two credentials holding a fake token made at test
//! time.
//!
//! Two directories keep the secret apart from what the sandbox is given:
//! - `secrets`: the daemon's configuration, the token file and the credential command,
//!   read only by the daemon;
//! - `sandbox_dir`: what clients in the sandbox use: the exported proxy CA, a `HOME`,
//!   clone targets. [`ProxyFixture::assert_token_absent`] checks it (recursively), the
//!   sandbox's environment, the hosts file, the audit log and the daemon's own log for the
//!   token.
//!
//! (The sandbox shares this machine's mount and pid namespaces and runs as root, so it
//! could read `secrets` or the daemon's `/proc/<pid>/environ` if it looked; keeping
//! secrets from a root sandbox is the job of the container runtime, not of the proxy.)

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::audit::{get_str, summarize};
use crate::daemon::{tail, Daemon, DaemonOpts};
use crate::hosts_file::HostsFile;
use crate::https_origin::{
    HttpsOrigin, OriginRequest, API_HOST, API_V4, GIT_HOST, GIT_V4, PINNED_HOST, PINNED_V4,
};
use crate::pki::{random_hex, TestCa};
use crate::sandbox::Sandbox;
use crate::servers::Canary;
use crate::util::{poll, TempDir};
use crate::world::{World, CANARY_V4};

/// The proxy listener's port in each sandbox namespace.
pub const PROXY_PORT: u16 = 15001;
/// A name that the sandbox resolves to the canary: where the origin's redirect points.
pub const ELSEWHERE_HOST: &str = "elsewhere.example";
/// Environment variable of the daemon holding the git credential (`source: {env: ...}`).
pub const GIT_TOKEN_ENV: &str = "EGRESS_TEST_GIT_TOKEN";

/// `PATH` of client commands, which otherwise run with an empty environment: this
/// machine's environment names CA bundles (`SSL_CERT_FILE`, `GIT_SSL_CAINFO`,
/// `CURL_CA_BUNDLE`, ...) that would override what a test tells a client to trust.
pub const CLIENT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The policy of the brief: the API through the proxy with the `github` credential,
/// limited to one repository; git smart-HTTP on github.com with `github-git`; one
/// origin passed through.
pub const PROXY_POLICY: &str = r#"version: 1
default: deny
rules:
  - name: github-api
    to: [192.0.2.10]
    ports: [443]
    action: proxy
    hosts: [api.github.com]
    credential: github
    http:
      - methods: [GET, HEAD]
        paths: ["/repos/acme/widgets/**"]
      - methods: [POST]
        paths: ["/repos/acme/widgets/issues"]
  - name: github-git
    to: [192.0.2.11]
    ports: [443]
    action: proxy
    hosts: [github.com]
    credential: github-git
    http:
      - methods: [GET]
        paths: ["/acme/widgets.git/info/refs"]
      - methods: [POST]
        paths: ["/acme/widgets.git/git-upload-pack"]
  - name: pinned
    to: [192.0.2.20]
    ports: [443]
    action: passthrough
    hosts: [pinned.example]
"#;

/// The same destinations allowed plainly (no proxy): the sandbox talks to the origins
/// itself and holds no token.
pub const DIRECT_POLICY: &str = r#"version: 1
default: deny
rules:
  - name: direct
    to: [192.0.2.10, 192.0.2.11, 192.0.2.20]
    ports: [443]
    protocol: tcp
    action: allow
"#;

/// Where the `github` credential's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubSource {
    /// `{ file: <secrets>/github-token }`.
    File,
    /// `{ command: { argv: [<secrets>/token-cmd.sh], ttl } }`: the script appends a line
    /// to [`ProxyFixture::command_counter`] and prints `<token>-run<N>`, N its run count.
    Command { ttl: u64 },
    /// A `source:` value written by the test (YAML flow style).
    Custom(String),
}

/// Knobs for [`ProxyFixture::new`].
#[derive(Debug, Clone)]
pub struct ProxyOpts {
    pub policy: String,
    pub github: GithubSource,
    /// When set, the sandbox resolves names through DNS (this `nameserver`, which the
    /// daemon's redirect answers) instead of a hosts file naming the origins.
    pub nameserver: Option<IpAddr>,
    /// The `github` credential's `revoke: { argv }`, when set.
    pub github_revoke: Option<Vec<String>>,
    /// More entries of the config's `credentials:` map (YAML, indented by two spaces).
    pub extra_credentials: String,
    /// Appended to the daemon's configuration file (top-level YAML keys).
    pub extra_config: String,
    /// Audit log path instead of the daemon's default (see [`DaemonOpts::audit_log`]).
    pub audit_log: Option<PathBuf>,
}

impl Default for ProxyOpts {
    fn default() -> Self {
        Self {
            policy: PROXY_POLICY.to_string(),
            github: GithubSource::File,
            nameserver: None,
            github_revoke: None,
            extra_credentials: String::new(),
            extra_config: String::new(),
            audit_log: None,
        }
    }
}

/// A sandbox with its hosts file, attached with some policy.
#[derive(Debug)]
pub struct NamedSandbox {
    pub sandbox: Sandbox,
    pub hosts: HostsFile,
}

/// See the module documentation. Field order is drop order: sandbox processes first, then
/// the daemon (and its pins), then servers, namespaces and files.
#[derive(Debug)]
pub struct ProxyFixture {
    pub sandbox: Sandbox,
    pub hosts: HostsFile,
    pub daemon: Daemon,
    pub origin: HttpsOrigin,
    pub canary: Canary,
    pub world: World,
    pub ca: TestCa,
    secrets: TempDir,
    sandbox_dir: TempDir,
    proxy_ca: PathBuf,
    token: String,
}

/// Programs the proxy tests run (besides the harness's own `ip`, `timeout`, `sh`).
pub const TOOLS: [&str; 5] = ["nginx", "openssl", "curl", "git", "getent"];

/// Why the proxy tests cannot run here (a missing program), or `None`.
pub fn missing_tools() -> Option<String> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| crate::util::which(t).is_none())
        .collect();
    (!missing.is_empty()).then(|| format!("not found in PATH: {}", missing.join(", ")))
}

/// The hosts file every proxy-test sandbox gets.
pub fn sandbox_hosts() -> Vec<(IpAddr, &'static str)> {
    vec![
        (IpAddr::V4(API_V4), API_HOST),
        (IpAddr::V4(GIT_V4), GIT_HOST),
        (IpAddr::V4(PINNED_V4), PINNED_HOST),
        (IpAddr::V4(CANARY_V4), ELSEWHERE_HOST),
    ]
}

impl ProxyFixture {
    /// World, origins, canary, sandbox "sb" (with hosts file), daemon with the proxy
    /// configuration, `opts.policy` attached to the sandbox, and the proxy CA exported to
    /// the sandbox directory.
    pub fn new(opts: ProxyOpts) -> Result<Self> {
        let token = format!("ghp_{}", random_hex(20)?);
        let secrets = TempDir::new("proxy-secrets")?;
        let sandbox_dir = TempDir::new("proxy-sandbox")?;
        let ca = TestCa::new("origins")?;
        let world = World::new()?;
        let origin = HttpsOrigin::start(&world, &ca, &token)?;
        let canary = Canary::start(&world)?;
        let sandbox = world.add_sandbox("sb")?;
        let hosts = match opts.nameserver {
            Some(ns) => HostsFile::with_nameserver(sandbox.netns(), &[], ns)?,
            None => HostsFile::new(sandbox.netns(), &sandbox_hosts())?,
        };

        let config = write_config(&secrets, &ca, &world, &token, &opts)?;
        let daemon = Daemon::start(DaemonOpts {
            audit_log: opts.audit_log.clone(),
            extra_args: vec!["--config".into(), config.display().to_string()],
            env: vec![
                (GIT_TOKEN_ENV.into(), token.clone()),
                ("RUST_LOG".into(), "info,egress=debug".into()),
            ],
            ..DaemonOpts::default()
        })?;
        let proxy_ca = sandbox_dir.path().join("egressd-ca.pem");
        let fx = Self {
            sandbox,
            hosts,
            daemon,
            origin,
            canary,
            world,
            ca,
            secrets,
            sandbox_dir,
            proxy_ca,
            token,
        };
        fx.attach(&fx.sandbox, fx.sandbox.label(), &opts.policy)?;
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

    /// The fake token (what the origins require). Never give it to the sandbox.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The proxy's CA, as exported by `egressctl ca export`, in the sandbox directory.
    pub fn proxy_ca(&self) -> &Path {
        &self.proxy_ca
    }

    /// The directory the sandbox's clients use.
    pub fn sandbox_dir(&self) -> &Path {
        self.sandbox_dir.path()
    }

    /// `HOME` for clients in the sandbox (git writes there).
    pub fn home(&self) -> PathBuf {
        self.sandbox_dir.path().join("home")
    }

    /// The credential command's run counter (one line per run).
    pub fn command_counter(&self) -> PathBuf {
        self.secrets.path().join("token-cmd.count")
    }

    /// Runs of the credential command so far.
    pub fn command_runs(&self) -> usize {
        std::fs::read_to_string(self.command_counter())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// `egressctl attach --cgroup --policy --name --netns` for `sandbox`, failing on a
    /// non-zero exit.
    pub fn attach(&self, sandbox: &Sandbox, name: &str, yaml: &str) -> Result<PathBuf> {
        let policy = self
            .sandbox_dir
            .write(&format!("policy-{name}.yaml"), yaml)?;
        self.daemon.attach_in_netns_ok(sandbox, &policy, name)?;
        Ok(policy)
    }

    /// Another sandbox in the same world, with the same hosts file, attached with `yaml`.
    pub fn add_sandbox(&self, label: &str, yaml: &str) -> Result<NamedSandbox> {
        let sandbox = self.world.add_sandbox(label)?;
        let hosts = HostsFile::new(sandbox.netns(), &sandbox_hosts())?;
        self.attach(&sandbox, label, yaml)?;
        Ok(NamedSandbox { sandbox, hosts })
    }

    /// `program args` in the sandbox with a clean environment: only `PATH`
    /// ([`CLIENT_PATH`]), `HOME` ([`ProxyFixture::home`]) and `env`; run from the sandbox
    /// directory, bounded by `secs`.
    pub fn client<S: AsRef<OsStr>>(
        &self,
        secs: u32,
        program: &str,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Result<Output> {
        self.client_in(&self.sandbox, secs, program, args, env)
    }

    /// [`ProxyFixture::client`] in another sandbox.
    pub fn client_in<S: AsRef<OsStr>>(
        &self,
        sandbox: &Sandbox,
        secs: u32,
        program: &str,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Result<Output> {
        let mut cmd = sandbox.command_with_timeout(secs, program, args);
        cmd.env_clear()
            .env("PATH", CLIENT_PATH)
            .env("HOME", self.home())
            .current_dir(self.sandbox_dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    /// curl in the sandbox trusting only the proxy's CA: `curl -sS --max-time 5
    /// --connect-timeout 3 --cacert <proxy ca> <args>`.
    pub fn curl(&self, args: &[&str]) -> Result<Output> {
        let ca = self.proxy_ca.display().to_string();
        self.curl_trusting(&ca, args)
    }

    /// curl in the sandbox trusting only the CA file `ca`.
    pub fn curl_trusting(&self, ca: &str, args: &[&str]) -> Result<Output> {
        self.curl_in(&self.sandbox, ca, args)
    }

    /// curl in `sandbox` trusting only the CA file `ca`.
    pub fn curl_in(&self, sandbox: &Sandbox, ca: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec![
            "-sS",
            "--max-time",
            "5",
            "--connect-timeout",
            "3",
            "--cacert",
            ca,
            "--capath",
            "/nonexistent",
        ];
        all.extend_from_slice(args);
        self.client_in(sandbox, 20, "curl", &all, &[])
    }

    /// curl in the world namespace (straight to the origins, no sandbox, no proxy),
    /// trusting the origins' CA, with the names resolved by `--resolve`.
    pub fn world_curl(&self, args: &[&str]) -> Result<Output> {
        let ca = self.ca.cert().display().to_string();
        let resolves: Vec<String> = sandbox_hosts()
            .iter()
            .map(|(ip, name)| format!("{name}:443:{ip}"))
            .collect();
        let mut all: Vec<&str> = vec!["-sS", "--max-time", "5", "--cacert", &ca];
        for r in &resolves {
            all.push("--resolve");
            all.push(r);
        }
        all.extend_from_slice(args);
        let mut cmd = self.world.command("curl", &all);
        cmd.env_clear().env("PATH", CLIENT_PATH);
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    /// `python3 fixtures/https_get.py <args>` in the sandbox; parses its JSON line.
    pub fn python_get(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Value> {
        let script = crate::util::fixture("https_get.py").display().to_string();
        let mut all: Vec<&str> = vec![&script];
        all.extend_from_slice(args);
        let python = crate::util::python().display().to_string();
        let out = self.client(20, &python, &all, env)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| {
                format!(
                    "https_get.py printed no JSON ({}): {stdout:?} {:?}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        serde_json::from_str(line).with_context(|| format!("https_get.py output {line:?}"))
    }

    /// `git <args>` in the sandbox with `HOME` = [`ProxyFixture::home`], no system config,
    /// no prompts and a 30 s bound.
    pub fn git(&self, args: &[&str]) -> Result<Output> {
        self.git_in(&self.sandbox, args)
    }

    /// [`ProxyFixture::git`] in another sandbox.
    pub fn git_in(&self, sandbox: &Sandbox, args: &[&str]) -> Result<Output> {
        self.client_in(
            sandbox,
            30,
            "git",
            args,
            &[("GIT_CONFIG_NOSYSTEM", "1"), ("GIT_TERMINAL_PROMPT", "0")],
        )
    }

    /// Every proxy record (`http-request` and `tls-connection`) so far.
    pub fn proxy_records(&self) -> Result<Vec<Value>> {
        Ok(self
            .daemon
            .audit_records()?
            .into_iter()
            .filter(|r| {
                matches!(
                    get_str(r, "event.action"),
                    Some("http-request" | "tls-connection")
                )
            })
            .collect())
    }

    /// Waits (at most `timeout`) for a proxy record matching `pred`.
    pub fn wait_proxy_record(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let found = poll(timeout, Duration::from_millis(50), || {
            Ok(self.proxy_records()?.into_iter().find(|r| pred(r)))
        })?;
        match found {
            Some(r) => Ok(r),
            None => bail!(
                "no proxy record {what} within {timeout:?}; proxy records:\n{}\nall:{}\ndaemon log:\n{}",
                self.proxy_records()
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

    /// The token appears nowhere the sandbox or an auditor can see: the sandbox's
    /// environment (`env` run inside it), every file under the sandbox directory, the
    /// sandbox's hosts file, the audit log, the daemon's log, and the given client
    /// outputs.
    pub fn assert_token_absent(&self, outputs: &[&Output]) -> Result<()> {
        let token = self.token.as_str();
        // What any process in the sandbox inherits (the harness's own environment).
        let env = self.sandbox.run("env", &[] as &[&str])?;
        ensure!(env.status.success(), "env in the sandbox failed: {env:?}");
        ensure!(
            !String::from_utf8_lossy(&env.stdout).is_empty(),
            "env printed nothing"
        );
        check_bytes("the sandbox's environment", &env.stdout, token)?;
        for f in crate::util::files_under(self.sandbox_dir.path())? {
            let bytes = std::fs::read(&f).with_context(|| format!("read {}", f.display()))?;
            check_bytes(&f.display().to_string(), &bytes, token)?;
            // git stores objects compressed; the token has no business in them either way
            // (it is never in a URL or config), so plain bytes suffice.
        }
        for p in [
            self.hosts.path().to_path_buf(),
            self.daemon.audit_log(),
            self.daemon.log_path(),
        ] {
            let bytes = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
            check_bytes(&p.display().to_string(), &bytes, token)?;
        }
        for (i, o) in outputs.iter().enumerate() {
            check_bytes(&format!("client output #{i} (stdout)"), &o.stdout, token)?;
            check_bytes(&format!("client output #{i} (stderr)"), &o.stderr, token)?;
        }
        Ok(())
    }

    /// Waits until the origin has logged `before + n` requests, then a little more to
    /// catch any extra one; fails unless exactly `n` are new. Returns them.
    pub fn origin_new_exactly(&self, before: usize, n: usize) -> Result<Vec<OriginRequest>> {
        let got = if n == 0 {
            std::thread::sleep(crate::expect::CANARY_SETTLE);
            self.origin.requests()?[before..].to_vec()
        } else {
            self.origin
                .wait_new_at_least(before, n, Duration::from_secs(5))?;
            std::thread::sleep(Duration::from_millis(200));
            self.origin.requests()?[before..].to_vec()
        };
        ensure!(
            got.len() == n,
            "expected {n} new origin request(s), got {}: {got:#?}",
            got.len()
        );
        Ok(got)
    }
}

fn check_bytes(what: &str, bytes: &[u8], token: &str) -> Result<()> {
    let hay = String::from_utf8_lossy(bytes);
    if let Some(at) = hay.find(token) {
        let start = hay[..at].char_indices().rev().nth(80).map_or(0, |(i, _)| i);
        bail!(
            "the token leaked into {what}: ...{}...",
            hay[start..at].to_string() + "<TOKEN>"
        );
    }
    Ok(())
}

/// Writes the daemon configuration (and the token file or command) into `secrets`.
/// The daemon dials upstream servers from the world namespace (`proxy.upstream_netns`):
/// from its own (the host's) it would send packets for documentation addresses out of
/// this machine.
fn write_config(
    secrets: &TempDir,
    ca: &TestCa,
    world: &World,
    token: &str,
    opts: &ProxyOpts,
) -> Result<PathBuf> {
    let github_revoke = opts.github_revoke.as_deref();
    let extra_credentials = opts.extra_credentials.as_str();
    let extra = opts.extra_config.as_str();
    let source = match &opts.github {
        GithubSource::File => {
            let f = secrets.write("github-token", &format!("{token}\n"))?;
            format!("{{ file: \"{}\" }}", f.display())
        }
        GithubSource::Command { ttl } => {
            let counter = secrets.path().join("token-cmd.count");
            let script = secrets.write(
                "token-cmd.sh",
                &format!(
                    "#!/bin/sh\n# Prints a token and counts its runs.\necho run >> '{c}'\n\
                     n=$(wc -l < '{c}')\nprintf '%s-run%s\\n' '{token}' \"$n\"\n",
                    c = counter.display()
                ),
            )?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
            format!(
                "{{ command: {{ argv: [\"{}\"], ttl: {ttl} }} }}",
                script.display()
            )
        }
        GithubSource::Custom(source) => source.clone(),
    };
    let revoke = github_revoke.map_or_else(String::new, |argv| {
        let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
        format!("    revoke: {{ argv: [{}] }}\n", argv.join(", "))
    });
    let config = format!(
        r#"proxy_port: {PROXY_PORT}
proxy:
  upstream_ca: "{ca}"
  upstream_netns: "{world_ns}"
credentials:
  github:
    source: {source}
    inject: {{ header: Authorization, format: "Bearer {{}}" }}
    hosts: [{API_HOST}]
{revoke}  github-git:
    source: {{ env: {GIT_TOKEN_ENV} }}
    inject: {{ basic: {{ user: x-access-token }} }}
    hosts: [{GIT_HOST}]
{extra_credentials}
"#,
        ca = ca.cert().display(),
        world_ns = world.netns().path().display(),
    );
    secrets.write("egressd.yaml", &format!("{config}{extra}"))
}
