//! A sandbox: a network namespace joined to the world plus a cgroup v2 directory.
//!
//! [`Sandbox::command`] starts a program in both: a shell first writes its own pid to the
//! cgroup's `cgroup.procs` (so every descendant, forked or daemonised, stays in the
//! cgroup), then `exec`s `ip netns exec`. The cgroup is joined before `ip netns exec`
//! because that remounts `/sys` for the namespace, hiding the host's cgroup mount.

use std::ffi::{OsStr, OsString};
use std::net::IpAddr;
use std::process::{Command, Output};

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cgroup::CgroupGuard;
use crate::netns::Netns;
use crate::util::{fixture, poll, python};
use crate::world::SandboxAddrs;

/// Default time bound for a command run in a sandbox.
pub const COMMAND_TIMEOUT_SECS: u32 = 20;

/// A confined environment. Drop order: the cgroup first (its processes are killed and
/// the directory removed), then the namespace.
#[derive(Debug)]
pub struct Sandbox {
    label: String,
    cgroup: CgroupGuard,
    netns: Netns,
    addrs: SandboxAddrs,
    ifname: String,
}

/// Outcome of `fixtures/probe.py`: one socket operation inside a sandbox.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The operation completed (connect + send, or sendto).
    pub ok: bool,
    /// errno of the failure, e.g. 1 (EPERM) when a cgroup hook denied it.
    pub errno: Option<i64>,
    /// Symbolic errno name, e.g. "EPERM".
    pub errname: Option<String>,
    /// Python raised `PermissionError`.
    pub permission_error: bool,
    /// The whole JSON line (pid, ppid, sid, cgroup, netns, error text, ...).
    pub raw: Value,
}

impl Probe {
    /// Denied by the kernel hook: EPERM surfaced as Python's `PermissionError`.
    pub fn is_eperm(&self) -> bool {
        !self.ok && self.errno == Some(i64::from(libc::EPERM)) && self.permission_error
    }
}

impl Sandbox {
    pub(crate) fn new(
        label: &str,
        netns: Netns,
        cgroup: CgroupGuard,
        addrs: SandboxAddrs,
        ifname: String,
    ) -> Self {
        Self {
            label: label.to_string(),
            cgroup,
            netns,
            addrs,
            ifname,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn cgroup(&self) -> &CgroupGuard {
        &self.cgroup
    }

    pub fn addrs(&self) -> &SandboxAddrs {
        &self.addrs
    }

    /// Name of the sandbox's end of the veth pair.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// A command running `program args` inside the sandbox (its netns and its cgroup),
    /// killed after [`COMMAND_TIMEOUT_SECS`].
    pub fn command<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        self.command_with_timeout(COMMAND_TIMEOUT_SECS, program, args)
    }

    /// Like [`Sandbox::command`] with an explicit time bound in seconds.
    pub fn command_with_timeout<S: AsRef<OsStr>>(
        &self,
        secs: u32,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "2", &secs.to_string(), "sh", "-c"])
            .arg(r#"procs=$1; ns=$2; shift 2; echo $$ > "$procs" && exec ip netns exec "$ns" "$@""#)
            .arg("sh")
            .arg(self.cgroup.procs_file())
            .arg(self.netns.name())
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs a command in the sandbox to completion and returns its output (any exit code).
    pub fn run<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Result<Output> {
        let mut cmd = self.command(program, args);
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    /// `n` TCP connects to `host:port` from the sandbox, one socket each, as fast as
    /// Python makes them: how many were refused with EPERM (a flood that fills the ring
    /// buffer while no daemon reads it).
    pub fn refused_connects(&self, host: &str, port: u16, n: usize) -> Result<usize> {
        let script = format!(
            "import socket\n\
             denied = 0\n\
             for _ in range({n}):\n\
             \x20   s = socket.socket()\n\
             \x20   try:\n\
             \x20       s.connect(('{host}', {port}))\n\
             \x20   except PermissionError:\n\
             \x20       denied += 1\n\
             \x20   finally:\n\
             \x20       s.close()\n\
             print(denied)\n"
        );
        let out = self.run("python3", &["-c", &script])?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("connect flood: {out:?}"))
    }

    /// `openssl s_client -connect <addr> -servername <sni> <extra>` in the sandbox, its
    /// input and output piped (a TLS session held open while its input is), bounded to
    /// 30 s.
    pub fn tls_session(
        &self,
        addr: &str,
        sni: &str,
        extra: &[&str],
    ) -> Result<std::process::Child> {
        let mut args = vec!["s_client", "-connect", addr, "-servername", sni];
        args.extend_from_slice(extra);
        self.command_with_timeout(30, "openssl", &args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("spawn openssl s_client")
    }

    /// `sh -c <script>` in the sandbox.
    pub fn sh(&self, script: &str) -> Result<Output> {
        self.run("sh", &["-c", script])
    }

    /// `curl -sS --max-time 5 --connect-timeout 3 <args>` in the sandbox.
    pub fn curl(&self, args: &[&str]) -> Result<Output> {
        let mut all: Vec<&str> = vec!["-sS", "--max-time", "5", "--connect-timeout", "3"];
        all.extend_from_slice(args);
        self.run("curl", &all)
    }

    /// Runs `fixtures/probe.py <op> <host> <port> <extra>` in the sandbox.
    pub fn probe(&self, op: &str, host: IpAddr, port: u16, extra: &[&str]) -> Result<Probe> {
        self.probe_host(op, &host.to_string(), port, extra)
    }

    /// Starts a probe as a daemonised grandchild: `setsid` + double fork, so by the time it
    /// connects its parent and grandparent have exited and it belongs to no shell the test
    /// waits for. Returns at once; the probe's JSON appears in `out` (see
    /// [`wait_probe_file`]).
    pub fn spawn_daemonised_probe(
        &self,
        out: &Path,
        op: &str,
        host: &str,
        port: u16,
    ) -> Result<()> {
        let o = self.sh(&daemonised_probe_script(out, op, host, port))?;
        if !o.status.success() {
            bail!("daemonising shell failed: {o:?}");
        }
        Ok(())
    }

    /// Probes TCP `host:port` from a brand-new network namespace made inside the sandbox
    /// (`unshare -n`), with `host` put on that namespace's own `lo` and a listener bound
    /// there. Without a cgroup hook the connect succeeds locally (see the harness
    /// self-test), so EPERM proves the hook follows the cgroup, not the namespace.
    pub fn probe_in_new_netns(&self, host: &str, port: u16) -> Result<Probe> {
        let out = self.sh(&unshare_probe_script(host, port))?;
        parse_probe(&out)
    }

    /// Like [`Sandbox::probe`] with the host as text (e.g. `::ffff:203.0.113.66`).
    pub fn probe_host(&self, op: &str, host: &str, port: u16, extra: &[&str]) -> Result<Probe> {
        let args = probe_args(op, host, port, extra);
        let out = self.run(python(), &args)?;
        parse_probe(&out)
    }
}

/// Arguments for `python3 probe.py ...`.
pub fn probe_args(op: &str, host: &str, port: u16, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        fixture("probe.py").into(),
        op.into(),
        host.into(),
        port.to_string().into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

fn shell_words(args: Vec<OsString>) -> Result<String> {
    let mut words = Vec::new();
    for a in args {
        let a = a
            .into_string()
            .map_err(|a| anyhow::anyhow!("non-UTF-8 argument {a:?}"))?;
        if a.contains(['\'', '"', '\\', '$', '`', ' ']) {
            bail!("argument {a:?} needs quoting; keep probe paths and arguments plain");
        }
        words.push(a);
    }
    Ok(words.join(" "))
}

/// Shell for [`Sandbox::spawn_daemonised_probe`]: setsid + double fork; the grandchild
/// waits 0.3 s (its ancestors are gone by then), probes, and renames its output into
/// place so readers never see a partial file.
pub fn daemonised_probe_script(out: &Path, op: &str, host: &str, port: u16) -> String {
    let args = shell_words(probe_args(op, host, port, &[])).unwrap_or_default();
    let out = out.display();
    format!(
        "setsid sh -c '(sleep 0.3; timeout 10 {py} {args} > {out}.tmp 2>&1; mv {out}.tmp {out}) &' \
         < /dev/null > /dev/null 2>&1 &",
        py = python().display(),
    )
}

/// Shell for [`Sandbox::probe_in_new_netns`].
pub fn unshare_probe_script(host: &str, port: u16) -> String {
    let args =
        shell_words(probe_args("tcp-connect", host, port, &["--listen"])).unwrap_or_default();
    let prefix = if host.contains(':') { "128" } else { "32" };
    format!(
        "exec unshare -n sh -c 'ip link set lo up && ip addr add {host}/{prefix} dev lo nodad 2>/dev/null \
         || ip addr add {host}/{prefix} dev lo; exec {py} {args}'",
        py = python().display(),
    )
}

/// Waits (at most 15 s) for a probe JSON file written by a daemonised probe.
pub fn wait_probe_file(path: &Path) -> Result<Probe> {
    let text = poll(Duration::from_secs(15), Duration::from_millis(50), || {
        Ok(std::fs::read_to_string(path).ok())
    })?
    .with_context(|| format!("{} never written", path.display()))?;
    probe_from_json(text.trim())
}

/// Parses the JSON line printed by `probe.py`.
pub fn parse_probe(out: &Output) -> Result<Probe> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "probe printed no JSON ({}); stdout: {stdout:?}; stderr: {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    probe_from_json(line)
}

/// Parses one `probe.py` JSON line.
pub fn probe_from_json(line: &str) -> Result<Probe> {
    let raw: Value =
        serde_json::from_str(line).with_context(|| format!("probe output {line:?}"))?;
    Ok(Probe {
        ok: raw["ok"].as_bool().unwrap_or(false),
        errno: raw["errno"].as_i64(),
        errname: raw["errname"].as_str().map(str::to_string),
        permission_error: raw["permission_error"].as_bool().unwrap_or(false),
        raw,
    })
}
