//! HTTPS origins in the world namespace: a fake GitHub (API and git smart-HTTP) and a
//! "pinned" origin, all served by one nginx process (Debian's, with ssl and http2).
//!
//! - `api.github.com` on [`API_V4`]:443: `/repos/acme/widgets...` answers 200 (201 for
//!   `POST .../issues`) only with `Authorization: Bearer <token>` (or `Bearer
//!   <token>-run<N>`, what the command credential fixture prints), else 401;
//!   [`MOVED_PATH`] answers `302 Location: `[`MOVED_TO`] (also only with the token).
//! - `github.com` on [`GIT_V4`]:443: the bare repository `acme/widgets.git`, served by
//!   `fixtures/git_backend.py` (`git http-backend` as CGI) behind nginx, only with
//!   `Authorization: Basic base64(x-access-token:<token>)`, else 401. With
//!   [`GitAuth::TokensFile`] ([`HttpsOrigin::start_with`]) it serves every repository
//!   under `acme/` (see [`OriginOpts::extra_repos`]) and the git backend itself accepts
//!   any token listed in a file that may grow while it runs (minted tokens).
//! - `pinned.example` on [`PINNED_V4`]:443: answers [`PINNED_BODY`] to anyone.
//! - [`ECHO_PATH`]`<route>` on `api.github.com` and `/echo/<route>` on `github.com`:
//!   `fixtures/echo_origin.py` behind nginx (unbuffered), which reflects the
//!   `Authorization` it received in a header, a JSON body, a chunked body split inside
//!   the token, a gzip body, base64; `/echo/plain` has no secret; `POST .../sink` stores
//!   the body it got ([`HttpsOrigin::echo_received`]).
//!
//! Certificates come from a [`TestCa`]. nginx writes one JSON line per request to its
//! access log, including the `Authorization` and `Proxy-Authorization` headers it
//! received, so a test can see exactly what reached the origin ([`HttpsOrigin::requests`]).
//! nginx runs with `master_process off` so that the spawned pid is the only process, and
//! it is killed by that pid on drop.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::pki::{Leaf, TestCa};
use crate::servers::{spawn_ready, READY_TIMEOUT};
use crate::util::{kill_with_parent, poll, run_checked, ChildGuard, TempDir};
use crate::world::{World, ORIGIN_V4};

/// `api.github.com`.
pub const API_V4: Ipv4Addr = ORIGIN_V4;
/// `github.com` (git smart-HTTP).
pub const GIT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// `pinned.example` (passed through by the proxy).
pub const PINNED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);

pub const API_HOST: &str = "api.github.com";
pub const GIT_HOST: &str = "github.com";
pub const PINNED_HOST: &str = "pinned.example";

/// What `GET /repos/acme/widgets` returns with the right token.
pub const REPO_BODY: &str = "{\"full_name\":\"acme/widgets\",\"private\":true}\n";
/// What `POST /repos/acme/widgets/issues` returns with the right token (status 201).
pub const ISSUE_BODY: &str = "{\"number\":1}\n";
/// What the origin returns without the right token (status 401).
pub const UNAUTHORIZED_BODY: &str = "{\"message\":\"Bad credentials\"}\n";
/// What `pinned.example` returns.
pub const PINNED_BODY: &str = "pinned origin\n";
/// Path on `api.github.com` answering a redirect to another host.
pub const MOVED_PATH: &str = "/repos/acme/widgets/moved";
/// Where [`MOVED_PATH`] points.
pub const MOVED_TO: &str = "https://elsewhere.example/";
/// Prefix of the reflecting routes on `api.github.com`.
pub const ECHO_PATH: &str = "/repos/acme/widgets/echo/";

/// The file at the top of the `acme/widgets` repository, and its contents.
pub const REPO_FILE: (&str, &str) = ("README.md", "# widgets\nmade by the egress test bed\n");

/// One request as the origin's nginx logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRequest {
    /// The local address it arrived on (which origin).
    pub server_addr: String,
    /// TLS server name the client sent.
    pub sni: String,
    pub host: String,
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub protocol: String,
    pub status: u16,
    /// `Authorization` as received ("" when absent).
    pub authorization: String,
    /// `Proxy-Authorization` as received ("" when absent).
    pub proxy_authorization: String,
    pub remote_addr: String,
    /// `Range` as received ("" when absent).
    pub range: String,
    /// `x-ms-range` as received ("" when absent).
    pub x_ms_range: String,
}

impl OriginRequest {
    fn from_json(v: &Value) -> Result<Self> {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        Ok(Self {
            server_addr: s("server_addr"),
            sni: s("sni"),
            host: s("host"),
            method: s("method"),
            uri: s("uri"),
            protocol: s("protocol"),
            status: s("status").parse().context("status")?,
            authorization: s("authorization"),
            proxy_authorization: s("proxy_authorization"),
            remote_addr: s("remote_addr"),
            range: s("range"),
            x_ms_range: s("x_ms_range"),
        })
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or("")
    }
}

/// How the git origin (`github.com`) checks the credential.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GitAuth {
    /// nginx accepts only `Basic base64(x-access-token:<token>)` with the origin's token.
    #[default]
    Token,
    /// The git backend accepts `Basic base64(x-access-token:<t>)` for any line `<t>` of
    /// this file, read at each request; nginx passes every `acme/` request through.
    TokensFile(PathBuf),
}

/// Knobs for [`HttpsOrigin::start_with`].
#[derive(Debug, Clone, Default)]
pub struct OriginOpts {
    pub git_auth: GitAuth,
    /// More bare repositories (`owner/name`, served under `acme/` only with
    /// [`GitAuth::TokensFile`]), each a copy of `acme/widgets` made by [`make_named_repo`].
    pub extra_repos: Vec<String>,
}

/// nginx + the git backend, with their certificates and logs.
///
/// Field order is drop order: servers die before their directory goes.
#[derive(Debug)]
pub struct HttpsOrigin {
    nginx: ChildGuard,
    git_backend: ChildGuard,
    echo: ChildGuard,
    dir: TempDir,
    token: String,
    leaf: Leaf,
    pinned_leaf: Leaf,
    git_root: PathBuf,
}

/// `Bearer <token>`: what the API origin wants.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `Basic base64(x-access-token:<token>)`: what the git origin wants.
pub fn basic(token: &str) -> String {
    format!(
        "Basic {}",
        base64(format!("x-access-token:{token}").as_bytes())
    )
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Creates `<root>/acme/widgets.git`, a bare repository with one commit on `main`
/// holding [`REPO_FILE`].
pub fn make_repo(root: &Path) -> Result<PathBuf> {
    make_named_repo(root, "acme/widgets")
}

/// Creates `<root>/<owner>/<name>.git`, a bare repository with one commit on `main`
/// holding [`REPO_FILE`].
pub fn make_named_repo(root: &Path, repo: &str) -> Result<PathBuf> {
    let valid = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let Some((owner, name)) = repo.split_once('/').filter(|(o, n)| valid(o) && valid(n)) else {
        bail!("{repo:?} is not owner/name");
    };
    let bare = root.join(owner).join(format!("{name}.git"));
    let work = root.join(format!("work-{owner}-{name}"));
    std::fs::create_dir_all(&bare)?;
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join(REPO_FILE.0), REPO_FILE.1)?;
    let git = |dir: &Path, args: &[&str]| -> Result<()> {
        run_checked(
            Command::new("git")
                .arg("-C")
                .arg(dir)
                .args([
                    "-c",
                    "user.name=egress test",
                    "-c",
                    "user.email=test@example.com",
                ])
                .args(["-c", "init.defaultBranch=main"])
                .args(args)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", root)
                .stdin(Stdio::null()),
        )
        .map(|_| ())
    };
    git(&bare, &["init", "-q", "--bare"])?;
    git(&bare, &["symbolic-ref", "HEAD", "refs/heads/main"])?;
    git(&work, &["init", "-q"])?;
    git(&work, &["add", "."])?;
    git(&work, &["commit", "-q", "-m", "initial commit"])?;
    let bare_s = bare.display().to_string();
    git(&work, &["push", "-q", &bare_s, "HEAD:refs/heads/main"])?;
    std::fs::remove_dir_all(&work)?;
    Ok(bare)
}

impl HttpsOrigin {
    /// Starts the origins in `world` (adding [`GIT_V4`] and [`PINNED_V4`] to it), with
    /// certificates from `ca`, accepting `token`.
    pub fn start(world: &World, ca: &TestCa, token: &str) -> Result<Self> {
        Self::start_with(world, ca, token, OriginOpts::default())
    }

    /// [`HttpsOrigin::start`] with a choice of credential check and more repositories.
    pub fn start_with(world: &World, ca: &TestCa, token: &str, opts: OriginOpts) -> Result<Self> {
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("test tokens are [A-Za-z0-9_]+, got {token:?}");
        }
        for ip in [GIT_V4, PINNED_V4] {
            world.add_host(IpAddr::V4(ip))?;
        }
        let dir = TempDir::new("https-origin")?;
        let leaf = ca.issue("github", &[API_HOST, GIT_HOST])?;
        let pinned_leaf = ca.issue("pinned", &[PINNED_HOST])?;

        let git_root = dir.path().join("git");
        make_repo(&git_root)?;
        for repo in &opts.extra_repos {
            make_named_repo(&git_root, repo)?;
        }
        let mut backend_args = vec!["--root".to_string(), git_root.display().to_string()];
        if let GitAuth::TokensFile(file) = &opts.git_auth {
            backend_args.push("--tokens-file".into());
            backend_args.push(file.display().to_string());
        }
        let git_backend = spawn_ready(
            world.netns(),
            &dir,
            "git-backend",
            "git_backend.py",
            &backend_args,
        )?;
        let ready = dir.path().join("git-backend.ready");
        let port: u16 = std::fs::read_to_string(&ready)
            .with_context(|| format!("read {}", ready.display()))?
            .trim()
            .parse()
            .context("git backend port")?;

        let received = dir.path().join("echo-received.jsonl");
        let echo = spawn_ready(
            world.netns(),
            &dir,
            "echo-origin",
            "echo_origin.py",
            &["--received".to_string(), received.display().to_string()],
        )?;
        let ready = dir.path().join("echo-origin.ready");
        let echo_port: u16 = std::fs::read_to_string(&ready)
            .with_context(|| format!("read {}", ready.display()))?
            .trim()
            .parse()
            .context("echo origin port")?;

        for sub in ["tmp", "logs"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        let conf = dir.path().join("nginx.conf");
        let ports = Ports {
            git: port,
            echo: echo_port,
        };
        std::fs::write(
            &conf,
            nginx_conf(
                dir.path(),
                token,
                &leaf,
                &pinned_leaf,
                ports,
                &opts.git_auth,
            ),
        )?;
        let nginx = spawn_nginx(world, dir.path(), &conf)?;
        Ok(Self {
            nginx,
            git_backend,
            echo,
            dir,
            token: token.to_string(),
            leaf,
            pinned_leaf,
            git_root,
        })
    }

    /// The token the origins accept.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The certificate of `api.github.com` / `github.com`.
    pub fn leaf(&self) -> &Leaf {
        &self.leaf
    }

    /// The certificate of `pinned.example`.
    pub fn pinned_leaf(&self) -> &Leaf {
        &self.pinned_leaf
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The bare repository `owner/name` of the git origin (`<root>/<owner>/<name>.git`).
    pub fn repo_path(&self, repo: &str) -> PathBuf {
        self.git_root.join(format!("{repo}.git"))
    }

    pub fn nginx_pid(&self) -> Option<u32> {
        self.nginx.pid()
    }

    pub fn git_backend_pid(&self) -> Option<u32> {
        self.git_backend.pid()
    }

    pub fn echo_pid(&self) -> Option<u32> {
        self.echo.pid()
    }

    /// Every request body the echo origin's `sink` route received, raw (one JSON line
    /// each: `{"path": ..., "body": ...}`).
    pub fn echo_received(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("echo-received.jsonl")).unwrap_or_default()
    }

    /// The raw access log.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join("access.log")).unwrap_or_default()
    }

    /// nginx's error log and the git backend's log, for diagnostics.
    pub fn error_logs(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "nginx error.log:\n{}\ngit-backend.log:\n{}",
            read(self.dir.path().join("logs").join("error.log")),
            read(self.dir.path().join("git-backend.log"))
        )
    }

    /// Every request logged so far, in order.
    pub fn requests(&self) -> Result<Vec<OriginRequest>> {
        let text = self.access_log();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value =
                    serde_json::from_str(l).with_context(|| format!("access log line {l:?}"))?;
                OriginRequest::from_json(&v)
            })
            .collect()
    }

    /// Waits (at most `timeout`) until more than `before` requests are logged; returns the
    /// new ones. nginx logs a request when it is done, a moment after the client has
    /// its response.
    pub fn wait_new(&self, before: usize, timeout: Duration) -> Result<Vec<OriginRequest>> {
        self.wait_new_at_least(before, 1, timeout)
    }

    /// Waits (at most `timeout`) until at least `n` requests after the first `before` are
    /// logged; returns all requests after the first `before`.
    pub fn wait_new_at_least(
        &self,
        before: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<OriginRequest>> {
        let got = poll(timeout, Duration::from_millis(25), || {
            let all = self.requests()?;
            Ok((all.len() >= before + n && all.len() > before).then(|| all[before..].to_vec()))
        })?;
        match got {
            Some(v) => Ok(v),
            None => bail!(
                "the origin logged fewer than {n} new requests after {before} within \
                 {timeout:?}; log:\n{}",
                self.access_log()
            ),
        }
    }
}

fn spawn_nginx(world: &World, dir: &Path, conf: &Path) -> Result<ChildGuard> {
    let out_path = dir.join("logs").join("nginx.out");
    let out = File::create(&out_path)?;
    let out2 = out.try_clone()?;
    let prefix = format!("{}/", dir.display());
    let conf_s = conf.display().to_string();
    let err_s = dir.join("logs").join("error.log").display().to_string();
    let mut cmd = world
        .netns()
        .spawn_command("nginx", &["-p", &prefix, "-c", &conf_s, "-e", &err_s]);
    cmd.stdin(Stdio::null()).stdout(out).stderr(out2);
    kill_with_parent(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let mut guard = ChildGuard::new(child, "nginx");
    let want: Vec<SocketAddr> = [API_V4, GIT_V4, PINNED_V4]
        .iter()
        .map(|ip| SocketAddr::new(IpAddr::V4(*ip), 443))
        .collect();
    let pid = guard.pid().context("nginx pid")?;
    let up = poll(READY_TIMEOUT, Duration::from_millis(25), || {
        if let Some(status) = guard.try_wait()? {
            bail!(
                "nginx exited ({status}): {}{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(dir.join("logs").join("error.log")).unwrap_or_default()
            );
        }
        Ok(listening(pid, &want).then_some(()))
    })?;
    if up.is_none() {
        bail!(
            "nginx not listening on {want:?} after {READY_TIMEOUT:?}: {}",
            std::fs::read_to_string(dir.join("logs").join("error.log")).unwrap_or_default()
        );
    }
    Ok(guard)
}

/// True when the process `pid` sees TCP listeners on every IPv4 address of `want`
/// (`/proc/<pid>/net/tcp` lists the sockets of that process's network namespace).
pub fn listening(pid: u32, want: &[SocketAddr]) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let listeners: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A"))
                .then(|| f.get(1).copied())
                .flatten()
        })
        .collect();
    want.iter().all(|sa| match sa.ip() {
        IpAddr::V4(v4) => {
            let key = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.octets()), sa.port());
            listeners.contains(&key.as_str())
        }
        IpAddr::V6(_) => false,
    })
}

/// Loopback ports of the servers behind nginx.
struct Ports {
    git: u16,
    echo: u16,
}

fn nginx_conf(
    dir: &Path,
    token: &str,
    leaf: &Leaf,
    pinned: &Leaf,
    ports: Ports,
    git_auth: &GitAuth,
) -> String {
    let git_port = ports.git;
    let echo_port = ports.echo;
    // Unbuffered, so that the echo origin's pieces reach the client as separate reads.
    let echo_proxy = format!(
        "proxy_pass http://127.0.0.1:{echo_port}; proxy_buffering off; \
         proxy_http_version 1.1; gzip off;"
    );
    let d = dir.display();
    let (cert, key) = (leaf.cert.display(), leaf.key.display());
    let (pcert, pkey) = (pinned.cert.display(), pinned.key.display());
    let basic = basic(token);
    let unauthorized = UNAUTHORIZED_BODY.replace('"', "\\\"").replace('\n', "\\n");
    let repo = REPO_BODY.replace('"', "\\\"").replace('\n', "\\n");
    let issue = ISSUE_BODY.replace('"', "\\\"").replace('\n', "\\n");
    let pinned_body = PINNED_BODY.replace('\n', "\\n");
    let git_location = match git_auth {
        GitAuth::Token => format!(
            r#"location /acme/widgets.git/ {{
            if ($git_ok = 0) {{
                add_header WWW-Authenticate 'Basic realm="GitHub"' always;
                return 401 "{unauthorized}";
            }}
            proxy_pass http://127.0.0.1:{git_port};
        }}"#
        ),
        // The backend checks the (growing) token list itself.
        GitAuth::TokensFile(_) => format!(
            r#"location /acme/ {{
            proxy_pass http://127.0.0.1:{git_port};
        }}"#
        ),
    };
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/logs/nginx.pid;
error_log {d}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format egress escape=json '{{"server_addr":"$server_addr","sni":"$ssl_server_name",'
        '"host":"$host","method":"$request_method","uri":"$request_uri",'
        '"protocol":"$server_protocol","status":"$status",'
        '"authorization":"$http_authorization",'
        '"proxy_authorization":"$http_proxy_authorization","remote_addr":"$remote_addr",'
        '"range":"$http_range","x_ms_range":"$http_x_ms_range"}}';
    access_log {d}/logs/access.log egress;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    client_max_body_size 16m;
    default_type application/json;
    ssl_protocols TLSv1.2 TLSv1.3;
    map_hash_bucket_size 256;
    map $http_authorization $api_ok {{
        default 0;
        "~^Bearer {token}(-run[0-9]+)?$" 1;
    }}
    map $http_authorization $git_ok {{
        default 0;
        "{basic}" 1;
    }}
    server {{
        listen {api}:443 ssl http2;
        server_name {api_host};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location = {moved} {{
            if ($api_ok = 0) {{ return 401 "{unauthorized}"; }}
            return 302 {moved_to};
        }}
        location {echo} {{ {echo_proxy} }}
        location = /repos/acme/widgets/issues {{
            if ($api_ok = 0) {{ return 401 "{unauthorized}"; }}
            return 201 "{issue}";
        }}
        location /repos/acme/widgets {{
            if ($api_ok = 0) {{ return 401 "{unauthorized}"; }}
            return 200 "{repo}";
        }}
        location / {{ return 404 "{{\"message\":\"Not Found\"}}\n"; }}
    }}
    server {{
        listen {git}:443 ssl http2;
        server_name {git_host};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        {git_location}
        location /echo/ {{ {echo_proxy} }}
        location / {{ return 404 "{{\"message\":\"Not Found\"}}\n"; }}
    }}
    server {{
        listen {pinned_ip}:443 ssl http2;
        server_name {pinned_host};
        ssl_certificate {pcert};
        ssl_certificate_key {pkey};
        default_type text/plain;
        location / {{ return 200 "{pinned_body}"; }}
    }}
}}
"#,
        api = API_V4,
        api_host = API_HOST,
        git = GIT_V4,
        git_host = GIT_HOST,
        pinned_ip = PINNED_V4,
        pinned_host = PINNED_HOST,
        moved = MOVED_PATH,
        moved_to = MOVED_TO,
        echo = ECHO_PATH,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(basic("t"), "Basic eC1hY2Nlc3MtdG9rZW46dA==");
    }
}
