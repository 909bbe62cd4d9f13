//! mitmproxy as a peer of the proxy benchmark (`--peers ...,mitmproxy`): `mitmdump` in
//! reverse mode in the world namespace, terminating TLS with the run's test leaf, adding
//! the same `Authorization` header with a small addon, and forwarding to the same origin
//! over TLS verified against the run's test CA.
//!
//! mitmproxy comes from PyPI, installed on first use into a virtual environment of its
//! own ([`VENV`]), never into the system's Python.
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use egress_tests::{
    https_origin::listening,
    pki::Leaf,
    util::{kill_with_parent, poll, ChildGuard},
    world::World,
};

use crate::cmd::step;

/// The benchmark's own Python environment for mitmproxy.
pub const VENV: &str = "/opt/egressd-bench-venv";

/// mitmproxy starts a Python interpreter and imports a lot: allow more than for nginx.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `mitmdump` from [`VENV`], installed from PyPI first if it is not there.
pub fn ensure_installed() -> anyhow::Result<PathBuf> {
    let venv = Path::new(VENV);
    let mitmdump = venv.join("bin/mitmdump");
    if mitmdump.is_file() {
        return Ok(mitmdump);
    }
    step(&format!(
        "Installing mitmproxy from PyPI into {VENV} (first use only; a minute or two)"
    ));
    if !venv.join("bin/pip").is_file() {
        let status = Command::new("python3")
            .args(["-m", "venv", VENV])
            .status()
            .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
        ensure!(status.success(), "python3 -m venv {VENV} failed ({status})");
    }
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--progress-bar", "off", "mitmproxy"])
        .status()
        .context("pip install mitmproxy")?;
    ensure!(
        status.success(),
        "pip install mitmproxy into {VENV} failed ({status})"
    );
    ensure!(
        mitmdump.is_file(),
        "{} missing after installing mitmproxy",
        mitmdump.display()
    );
    Ok(mitmdump)
}

/// What mitmdump does: listen on `listen`, present `leaf`, add
/// `Authorization: <authorization>` and forward to `https://<upstream_host>:443` (which
/// the world namespace must resolve to the origin), verifying it against `ca`.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub listen: SocketAddr,
    pub leaf: &'a Leaf,
    pub upstream_host: &'a str,
    pub ca: &'a Path,
    pub authorization: &'a str,
}

/// One mitmdump process, killed (by pid) on drop.
#[derive(Debug)]
pub struct Mitmproxy {
    child: ChildGuard,
    log: PathBuf,
}

impl Mitmproxy {
    /// Runs mitmdump in `world` as `spec` says.
    pub fn start(
        mitmdump: &Path,
        world: &World,
        dir: &Path,
        spec: &Spec<'_>,
    ) -> anyhow::Result<Self> {
        let Spec {
            listen,
            leaf,
            upstream_host,
            ca,
            authorization,
        } = *spec;
        std::fs::create_dir_all(dir)?;
        // mitmproxy wants the certificate and its key in one PEM file.
        let pem = format!(
            "{}{}",
            std::fs::read_to_string(&leaf.cert)?,
            std::fs::read_to_string(&leaf.key)?
        );
        let cert = dir.join("leaf.pem");
        std::fs::write(&cert, pem)?;
        let header = dir.join("authorization");
        std::fs::write(&header, authorization)?;
        let addon = dir.join("add_header.py");
        std::fs::write(
            &addon,
            format!(
                "VALUE = open({:?}).read()\n\n\ndef request(flow):\n    flow.request.headers[\"Authorization\"] = VALUE\n",
                header.display().to_string()
            ),
        )?;
        let log = dir.join("mitmdump.log");
        let out = File::create(&log)?;
        let out2 = out.try_clone()?;
        let mode = format!("reverse:https://{upstream_host}:443@{}", listen.port());
        let args: Vec<String> = vec![
            "--quiet".into(),
            "--mode".into(),
            mode,
            "--listen-host".into(),
            listen.ip().to_string(),
            "--certs".into(),
            format!("*={}", cert.display()),
            "--set".into(),
            format!("confdir={}", dir.join("conf").display()),
            "--set".into(),
            format!("ssl_verify_upstream_trusted_ca={}", ca.display()),
            "--set".into(),
            "flow_detail=0".into(),
            "--set".into(),
            "termlog_verbosity=warn".into(),
            "-s".into(),
            addon.display().to_string(),
        ];
        let mut cmd = world.netns().spawn_command(mitmdump, &args);
        cmd.stdin(Stdio::null()).stdout(out).stderr(out2);
        kill_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let mut m = Self {
            child: ChildGuard::new(child, "mitmdump"),
            log,
        };
        let pid = m.pid().context("mitmdump pid")?;
        let up = poll(READY_TIMEOUT, Duration::from_millis(100), || {
            if let Some(status) = m.child.try_wait()? {
                bail!("mitmdump exited ({status}): {}", m.errors());
            }
            Ok(listening(pid, &[listen]).then_some(()))
        })?;
        if up.is_none() {
            bail!(
                "mitmdump not listening on {listen} after {READY_TIMEOUT:?}: {}",
                m.errors()
            );
        }
        Ok(m)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// What mitmdump printed (warnings and errors only), for diagnostics.
    pub fn errors(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
