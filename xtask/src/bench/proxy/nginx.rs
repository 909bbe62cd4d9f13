//! The two nginx processes of the proxy benchmark, both in the world namespace: the origin
//! and the reference reverse proxy.
//!
//! Each runs with `master_process off` (so `worker_processes 1` in effect: the spawned pid
//! is the one process that serves, and it is killed by that pid on drop), `access_log
//! off`, and its own directory for pid file, temp paths and error log. Keeping the origin
//! and the reverse proxy in separate processes gives each a worker of its own, as the
//! origin and egressd have. The reverse proxy may run as several such processes on one
//! `reuseport` address, as nginx's worker processes with `reuseport` serve it, so that it
//! spreads over as many cores as egressd's proxy workers.
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use egress_tests::{
    https_origin::listening,
    pki::Leaf,
    servers::READY_TIMEOUT,
    util::{kill_with_parent, poll, ChildGuard},
    world::World,
};

/// One nginx process, killed (SIGKILL, by pid) on drop.
#[derive(Debug)]
pub struct Nginx {
    child: ChildGuard,
    error_log: PathBuf,
}

impl Nginx {
    /// Writes `conf` (made by [`origin_conf`] or [`reverse_proxy_conf`] for `dir`) and runs
    /// nginx on it in the world namespace; returns once it listens on every address of
    /// `listen`, waiting at most [`READY_TIMEOUT`].
    pub fn start(
        world: &World,
        dir: &Path,
        conf: &str,
        listen: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("write {}", conf_path.display()))?;
        let error_log = dir.join("error.log");
        let out_path = dir.join("nginx.out");
        let out = File::create(&out_path)?;
        let out2 = out.try_clone()?;
        let prefix = format!("{}/", dir.display());
        let conf_s = conf_path.display().to_string();
        let err_s = error_log.display().to_string();
        let mut cmd = world
            .netns()
            .spawn_command("nginx", &["-p", &prefix, "-c", &conf_s, "-e", &err_s]);
        cmd.stdin(Stdio::null()).stdout(out).stderr(out2);
        kill_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let mut nginx = Self {
            child: ChildGuard::new(child, "nginx"),
            error_log,
        };
        let pid = nginx.pid().context("nginx pid")?;
        let up = poll(READY_TIMEOUT, Duration::from_millis(25), || {
            if let Some(status) = nginx.child.try_wait()? {
                bail!(
                    "nginx ({}) exited ({status}): {}{}",
                    conf_path.display(),
                    std::fs::read_to_string(&out_path).unwrap_or_default(),
                    nginx.errors()
                );
            }
            Ok(listening(pid, listen).then_some(()))
        })?;
        if up.is_none() {
            bail!(
                "nginx ({}) not listening on {listen:?} after {READY_TIMEOUT:?}: {}",
                conf_path.display(),
                nginx.errors()
            );
        }
        Ok(nginx)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The error log (warnings and worse), for diagnostics.
    pub fn errors(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }
}

/// What every nginx of the benchmark shares: one process, no access log, files in `dir`.
fn preamble(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 8192;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
"#
    )
}

/// The origin: `listen` (HTTPS and HTTP/2) with `leaf`, answering `body` at every path,
/// the request's `Authorization` header at `auth_path`, and the file `large.1` at
/// `large.0`.
pub fn origin_conf(
    dir: &Path,
    listen: &[IpAddr],
    leaf: &Leaf,
    body: &str,
    auth_path: &str,
    large: (&str, &Path),
) -> String {
    let mut c = preamble(dir);
    c.push_str("    server {\n");
    for ip in listen {
        c.push_str(&format!("        listen {ip}:443 ssl http2;\n"));
    }
    c.push_str(&format!(
        r#"        ssl_certificate {cert};
        ssl_certificate_key {key};
        default_type text/plain;
        location = {auth_path} {{ return 200 "$http_authorization"; }}
        location = {large_path} {{ default_type application/octet-stream; alias {large_file}; }}
        location / {{ return 200 "{body}"; }}
    }}
}}
"#,
        cert = leaf.cert.display(),
        key = leaf.key.display(),
        body = body.replace('\n', "\\n"),
        large_path = large.0,
        large_file = large.1.display(),
    ));
    c
}

/// The reference: nginx terminating TLS on `listen`:443 with `leaf`, setting
/// `Authorization: <authorization>` and `Host: <host>`, and forwarding to `upstream`:443
/// over TLS verified against `ca` (server name `host`), through a keep-alive pool. With
/// `reuseport`, other processes may listen on the same address.
#[expect(
    clippy::too_many_arguments,
    reason = "one per line of the configuration it writes"
)]
pub fn reverse_proxy_conf(
    dir: &Path,
    listen: IpAddr,
    reuseport: bool,
    leaf: &Leaf,
    upstream: IpAddr,
    host: &str,
    ca: &Path,
    authorization: &str,
) -> String {
    let mut c = preamble(dir);
    c.push_str(&format!(
        r#"    upstream origin {{
        server {upstream}:443;
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen}:443 ssl http2{reuseport};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass https://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {host};
            proxy_set_header Authorization "{authorization}";
            proxy_ssl_server_name on;
            proxy_ssl_name {host};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_trusted_certificate {ca};
        }}
    }}
}}
"#,
        cert = leaf.cert.display(),
        key = leaf.key.display(),
        ca = ca.display(),
        reuseport = if reuseport { " reuseport" } else { "" },
    ));
    c
}
