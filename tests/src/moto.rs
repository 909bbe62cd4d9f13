//! A real AWS emulation for the AWS tests: `moto_server` (IAM, STS and S3, from the
//! `moto[server]` PyPI package that `scripts/setup.sh` installs into /opt/egressd-venv) on
//! a loopback port of the world namespace, behind nginx on [`AWS_V4`]:443 and
//! [`PATH_STYLE_V4`]:443, which
//! terminates TLS with a certificate from the test CA for [`S3_HOST`], [`BUCKET_HOST`],
//! [`STS_HOST`] and the address itself (the daemon's STS endpoint).
//!
//! `fixtures/moto_admin.py` (run with the venv's Python in the world, straight to moto)
//! creates the daemon's IAM user, the role it assumes, the bucket and its objects, and
//! then turns moto's request authentication on: from then on a request whose signature
//! does not verify with a key moto issued is refused ([`Moto::controls`] proves it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::expect::all_output;
use crate::https_origin::listening;
use crate::pki::TestCa;
use crate::servers::READY_TIMEOUT;
use crate::util::{fixture, kill_with_parent, poll, ChildGuard, TempDir};
use crate::world::World;

/// The address of the AWS endpoints in the world.
pub const AWS_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
/// The address of path-style S3 ([`S3_HOST`]): a proxy rule is chosen by address before
/// the server name is seen, so each style gets its own.
pub const PATH_STYLE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 31);
/// Path-style S3.
pub const S3_HOST: &str = "s3.amazonaws.com";
/// Virtual-hosted-style S3 for the test bucket.
pub const BUCKET_HOST: &str = "acme-data.s3.amazonaws.com";
/// STS by name (the daemon uses the address: its own resolver does not know the name).
pub const STS_HOST: &str = "sts.amazonaws.com";
/// The role the daemon assumes.
pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/agent-s3";
/// The venv with moto, boto3 and the AWS CLI.
pub const VENV: &str = "/opt/egressd-venv/bin";
/// moto's port on the world's loopback.
const MOTO_PORT: u16 = 4566;

/// The AWS CLI of the venv.
pub fn aws_cli() -> PathBuf {
    Path::new(VENV).join("aws")
}

fn venv_python() -> PathBuf {
    Path::new(VENV).join("python3")
}

/// Why the AWS tests cannot run here, or `None`.
pub fn missing() -> Option<String> {
    let need = [
        Path::new(VENV).join("moto_server"),
        aws_cli(),
        venv_python(),
    ];
    need.iter().find(|p| !p.is_file()).map(|p| {
        format!(
            "{} not found: run scripts/setup.sh (moto[server], awscli, boto3)",
            p.display()
        )
    })
}

/// moto and its TLS front. Killed on drop.
#[derive(Debug)]
pub struct Moto {
    nginx: ChildGuard,
    moto: ChildGuard,
    dir: TempDir,
    /// The daemon's IAM key, created by the setup.
    pub key_id: String,
    pub secret: String,
}

impl Moto {
    /// Starts moto and nginx in `world` (adding [`AWS_V4`] to it) and runs the setup.
    pub fn start(world: &World, ca: &TestCa) -> Result<Self> {
        let dir = TempDir::new("moto")?;
        for sub in ["logs", "tmp"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        world.add_host(IpAddr::V4(AWS_V4))?;
        world.add_host(IpAddr::V4(PATH_STYLE_V4))?;
        let leaf = ca.issue("aws", &[S3_HOST, BUCKET_HOST, STS_HOST, "192.0.2.30"])?;

        let log = std::fs::File::create(dir.path().join("logs/moto.log"))?;
        let mut cmd = world.netns().spawn_command(
            Path::new(VENV).join("moto_server"),
            &["-H", "127.0.0.1", "-p", &MOTO_PORT.to_string()],
        );
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        kill_with_parent(&mut cmd);
        let moto = ChildGuard::new(cmd.spawn().context("spawn moto_server")?, "moto_server");

        let d = dir.path().display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/logs/nginx.pid;
error_log {d}/logs/error.log info;
events {{ worker_connections 128; }}
http {{
    access_log {d}/logs/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    client_max_body_size 16m;
    server {{
        listen {AWS_V4}:443 ssl;
        listen {PATH_STYLE_V4}:443 ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://127.0.0.1:{MOTO_PORT};
            proxy_set_header Host $http_host;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"#,
            cert = leaf.cert.display(),
            key = leaf.key.display(),
        );
        let conf_path = dir.write("nginx.conf", &conf)?;
        let out = std::fs::File::create(dir.path().join("logs/nginx.out"))?;
        let prefix = format!("{d}/");
        let conf_s = conf_path.display().to_string();
        let mut cmd = world
            .netns()
            .spawn_command("nginx", &["-p", prefix.as_str(), "-c", conf_s.as_str()]);
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        kill_with_parent(&mut cmd);
        let nginx = ChildGuard::new(cmd.spawn().context("spawn nginx")?, "nginx (aws)");

        let mut this = Self {
            nginx,
            moto,
            dir,
            key_id: String::new(),
            secret: String::new(),
        };
        let moto_pid = this.moto.pid().context("moto pid")?;
        let nginx_pid = this.nginx.pid().context("nginx pid")?;
        let want_moto = [SocketAddr::new(Ipv4Addr::LOCALHOST.into(), MOTO_PORT)];
        let want_nginx = [
            SocketAddr::new(AWS_V4.into(), 443),
            SocketAddr::new(PATH_STYLE_V4.into(), 443),
        ];
        // moto_server is a Python program: allow it more than the usual start time.
        let up = poll(READY_TIMEOUT * 3, Duration::from_millis(100), || {
            if let Some(status) = this.moto.try_wait()? {
                bail!("moto_server exited ({status}): {}", this.log("moto.log"));
            }
            if let Some(status) = this.nginx.try_wait()? {
                bail!("nginx exited ({status}): {}", this.log("error.log"));
            }
            // moto_server may run in a child process of `ip netns exec`'s program.
            let moto_up = listening(moto_pid, &want_moto) || world_listening(world, MOTO_PORT);
            Ok((moto_up && listening(nginx_pid, &want_nginx)).then_some(()))
        })?;
        ensure!(
            up.is_some(),
            "moto or nginx not listening: {}{}",
            this.log("moto.log"),
            this.log("error.log")
        );
        let key = this.admin(world, &["setup"])?;
        this.key_id = key["access_key_id"]
            .as_str()
            .context("no key id")?
            .to_owned();
        this.secret = key["secret_access_key"]
            .as_str()
            .context("no secret")?
            .to_owned();
        Ok(this)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join(name)).unwrap_or_default()
    }

    /// moto's and nginx's logs, for diagnostics.
    pub fn logs(&self) -> String {
        format!(
            "moto.log:\n{}\nnginx access.log:\n{}\nnginx error.log:\n{}",
            crate::daemon::tail(&self.log("moto.log"), 40),
            crate::daemon::tail(&self.log("access.log"), 40),
            crate::daemon::tail(&self.log("error.log"), 20)
        )
    }

    /// nginx's access log: every request that reached moto.
    pub fn access_log(&self) -> String {
        self.log("access.log")
    }

    /// `moto_admin.py <endpoint> <args>` in the world; its JSON output.
    pub fn admin(&self, world: &World, args: &[&str]) -> Result<Value> {
        let script = fixture("moto_admin.py").display().to_string();
        let endpoint = format!("http://127.0.0.1:{MOTO_PORT}");
        let mut all: Vec<&str> = vec![script.as_str(), endpoint.as_str()];
        all.extend_from_slice(args);
        let mut cmd = world.command(venv_python(), &all);
        cmd.env_clear()
            .env("PATH", crate::proxy_fixture::CLIENT_PATH)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("HOME", self.dir.path());
        let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
        ensure!(
            out.status.success(),
            "moto_admin.py {args:?}: {}\n{}",
            all_output(&out),
            self.logs()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("moto_admin.py {args:?}: {stdout}"))
    }

    /// The content of `acme-data/<key>` as moto holds it, read with the daemon's key.
    pub fn object(&self, world: &World, key: &str) -> Result<Option<String>> {
        let v = self.admin(world, &["object", key, &self.key_id, &self.secret])?;
        ensure!(v.get("error").is_none(), "reading {key}: {v}");
        Ok(v["body"].as_str().map(str::to_owned))
    }

    /// Negative controls of moto's authentication (see the fixture).
    pub fn controls(&self, world: &World) -> Result<Value> {
        self.admin(world, &["controls", &self.key_id, &self.secret])
    }

    /// The STS sessions moto issued.
    pub fn sessions(&self, world: &World) -> Result<Vec<Value>> {
        let v = self.admin(world, &["sessions"])?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// Whether something in the world listens on 127.0.0.1:`port` (seen from `ss`).
fn world_listening(world: &World, port: u16) -> bool {
    let out = world
        .command("ss", &["-Hltn", &format!("sport = :{port}")])
        .output();
    out.is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}
