//! Running egressd in the foreground and driving it with egressctl.
//!
//! Binaries: `EGRESSD_BIN` / `EGRESSCTL_BIN` if set, else `<workspace>/target/debug/egressd`
//! and `egressctl` (build them with `cargo build -p agent-userspace`).
//!
//! Each [`Daemon`] gets its own temp dir (audit log, control socket, state dir, daemon
//! log) and its own bpffs directory, so tests run side by side.
//!
//! bpffs: if `EGRESS_TEST_BPFFS_ROOT` is set, or `/sys/fs/bpf` is a bpffs mount, the
//! daemon gets a unique directory `egress-test-<pid>-<n>-bpffs` under it. Otherwise
//! (this machine has no bpffs mounted at `/sys/fs/bpf`) the harness mounts a private
//! bpffs instance on a unique temp directory and unmounts it on drop; every bpffs mount
//! is a separate instance, so nothing outside the test sees it.
//!
//! Cleanup and why it is not `egressctl detach`: links are pinned so that enforcement
//! survives the daemon, and after [`Daemon::kill9`] (or a crashed test) there is no
//! daemon to ask. Drop therefore stops the daemon (SIGTERM, then SIGKILL after a grace
//! period) and then removes the test's bpffs directory recursively: unpinning the last
//! reference to each cgroup bpf_link detaches its program from the cgroup, and unpinning
//! the maps frees them. The sandbox cgroups are removed by their own guards.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::audit::summarize;
use crate::cgroup::is_bpffs_mount;
use crate::sandbox::Sandbox;
use crate::util::{
    bounded, keep_artifacts, kill_with_parent, poll, run_checked, unique_name, ChildGuard, TempDir,
};

/// Bound on any single egressctl invocation.
pub const CTL_TIMEOUT_SECS: u32 = 20;

/// `EGRESSD_BIN` or `<workspace>/target/debug/egressd`.
pub fn egressd_bin() -> PathBuf {
    bin_path("EGRESSD_BIN", "egressd")
}

/// `EGRESSCTL_BIN` or `<workspace>/target/debug/egressctl`.
pub fn egressctl_bin() -> PathBuf {
    bin_path("EGRESSCTL_BIN", "egressctl")
}

fn bin_path(var: &str, name: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("debug")
            .join(name),
    }
}

/// A unique bpffs directory for one daemon; removed recursively (unpinning everything)
/// on drop, and unmounted if the harness mounted it.
#[derive(Debug)]
pub struct BpffsDir {
    path: PathBuf,
    private_mount: bool,
}

impl BpffsDir {
    pub fn new() -> Result<Self> {
        let shared_root = match std::env::var_os("EGRESS_TEST_BPFFS_ROOT") {
            Some(r) => Some(PathBuf::from(r)),
            None => {
                let sys = PathBuf::from("/sys/fs/bpf");
                is_bpffs_mount(&sys)?.then_some(sys)
            }
        };
        match shared_root {
            Some(root) => {
                let path = root.join(unique_name("bpffs"));
                std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
                Ok(Self {
                    path,
                    private_mount: false,
                })
            }
            None => {
                let path = std::env::temp_dir().join(unique_name("bpffs"));
                std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
                let guard = Self {
                    path,
                    private_mount: true,
                };
                run_checked(
                    Command::new("mount")
                        .args(["-t", "bpf", "bpf"])
                        .arg(&guard.path),
                )
                .context("mount a private bpffs instance (no bpffs at /sys/fs/bpf)")?;
                Ok(guard)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every file (pin) under the directory, for diagnostics.
    pub fn list(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: u32) {
            if depth > 8 {
                return;
            }
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, out, depth + 1);
                    } else {
                        out.push(p);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.path, &mut out, 0);
        out
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if self.private_mount {
            // Unmounting drops the instance's references to every pin at once.
            let ok = Command::new("umount")
                .arg(&self.path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.path).status();
            }
            if let Err(e) = std::fs::remove_dir(&self.path) {
                eprintln!("warning: rmdir {}: {e}", self.path.display());
            }
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Extra knobs for [`Daemon::start`].
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    /// Appended to `egressd run ...`.
    pub extra_args: Vec<String>,
    /// Extra environment (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Bound on waiting for `egressctl status` to succeed.
    pub ready_timeout: Duration,
    /// Audit log path instead of `<temp dir>/audit.jsonl` (e.g. on a small tmpfs).
    pub audit_log: Option<PathBuf>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        Self {
            extra_args: Vec::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            audit_log: None,
        }
    }
}

/// An egressd process plus its directories.
///
/// Field order is drop order: the process guard, then the bpffs dir (unpins), then the
/// temp dir.
#[derive(Debug)]
pub struct Daemon {
    child: Option<ChildGuard>,
    bpffs: BpffsDir,
    dir: TempDir,
    opts: DaemonOpts,
}

impl Daemon {
    /// Starts `egressd run` in the foreground and waits until `egressctl status` works.
    pub fn start(opts: DaemonOpts) -> Result<Self> {
        let dir = TempDir::new("daemon")?;
        let bpffs = BpffsDir::new()?;
        let mut d = Self {
            child: None,
            bpffs,
            dir,
            opts,
        };
        d.spawn()?;
        Ok(d)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn audit_log(&self) -> PathBuf {
        self.opts
            .audit_log
            .clone()
            .unwrap_or_else(|| self.dir.path().join("audit.jsonl"))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("egressd.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn bpffs(&self) -> &BpffsDir {
        &self.bpffs
    }

    /// Where the daemon pins its kernel maps: under its ABI version's directory.
    pub fn maps_dir(&self) -> PathBuf {
        self.bpffs
            .path()
            .join(format!("v{}", agent_common::ABI_VERSION))
            .join("maps")
    }

    /// Whether the daemon pinned a kernel map named `name`.
    pub fn map_pinned(&self, name: &str) -> bool {
        self.maps_dir().join(name).exists()
    }

    /// How many entries the daemon's pinned kernel map `name` holds (`BY_PEER`, ...),
    /// read with bpftool.
    pub fn map_entries(&self, name: &str) -> Result<usize> {
        let pinned = self.maps_dir().join(name);
        let dump = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&pinned)
            .output()
            .context("bpftool (scripts/setup.sh installs it)")?;
        ensure!(
            dump.status.success(),
            "bpftool map dump pinned {}: {}{} (pinned maps: {:?})",
            pinned.display(),
            String::from_utf8_lossy(&dump.stderr),
            String::from_utf8_lossy(&dump.stdout),
            std::fs::read_dir(self.maps_dir())
                .map(|rd| rd
                    .filter_map(|e| e.ok().map(|e| e.file_name()))
                    .collect::<Vec<_>>())
                .unwrap_or_default()
        );
        Ok(serde_json::from_slice::<Vec<Value>>(&dump.stdout)?.len())
    }

    /// The daemon's stdout+stderr (all generations, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("egressd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildGuard::pid)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("egressd already running");
        }
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let log2 = log.try_clone()?;
        let bin = egressd_bin();
        if !bin.is_file() {
            bail!(
                "{} not found: build it with `cargo build -p agent-userspace` or set EGRESSD_BIN",
                bin.display()
            );
        }
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .arg("--audit-log")
            .arg(self.audit_log())
            .arg("--socket")
            .arg(self.socket())
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(&self.opts.extra_args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        kill_with_parent(&mut cmd);
        core_dumps_allowed(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        self.child = Some(ChildGuard::new(child, "egressd"));
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let timeout = self.opts.ready_timeout;
        let ready = poll(timeout, Duration::from_millis(100), || {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
                    bail!(
                        "egressd exited ({status}) before it was ready; log:\n{}",
                        tail(&self.log(), 40)
                    );
                }
            }
            let out = self.ctl(["status"])?;
            Ok(out.status.success().then_some(()))
        })?;
        if ready.is_none() {
            bail!(
                "`egressctl status` did not succeed within {timeout:?}; log:\n{}",
                tail(&self.log(), 40)
            );
        }
        Ok(())
    }

    /// SIGKILL the daemon, keeping its bpffs and state dirs (pinned programs keep enforcing).
    pub fn kill9(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut c) => {
                c.stop(libc::SIGKILL, Duration::from_secs(5));
                Ok(())
            }
            None => bail!("egressd is not running"),
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the daemon: a daemon that cannot keep up,
    /// whose programs keep deciding meanwhile.
    pub fn set_paused(&self, paused: bool) -> Result<()> {
        let pid = self.pid().context("egressd is not running")?;
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) with a pid this harness started and still holds.
        let rc = unsafe { libc::kill(i32::try_from(pid)?, signal) };
        ensure!(
            rc == 0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// SIGTERM the daemon and wait (at most `grace`) for it to exit by itself; keeps its
    /// directories. Returns how long it took.
    pub fn terminate(&mut self, grace: Duration) -> Result<Duration> {
        match self.child.take() {
            Some(mut c) => c.terminate(libc::SIGTERM, grace),
            None => bail!("egressd is not running"),
        }
    }

    /// Starts egressd again with the same directories and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.spawn()
    }

    /// `egressctl --socket <sock> <args>`, bounded; returns the output whatever the exit.
    pub fn ctl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = bounded(CTL_TIMEOUT_SECS, egressctl_bin(), &["--socket"]);
        cmd.arg(self.socket()).args(args).stdin(Stdio::null());
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    /// Like [`Daemon::ctl`] but fails on a non-zero exit.
    pub fn ctl_ok<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.ctl(&args)?;
        if !out.status.success() {
            bail!(
                "egressctl {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
            );
        }
        Ok(out)
    }

    /// `egressctl attach --cgroup <dir> --policy <file> --name <name>` (any exit).
    pub fn attach(&self, sandbox: &Sandbox, policy: &Path, name: &str) -> Result<Output> {
        self.ctl([
            OsStr::new("attach"),
            OsStr::new("--cgroup"),
            sandbox.cgroup().path().as_os_str(),
            OsStr::new("--policy"),
            policy.as_os_str(),
            OsStr::new("--name"),
            OsStr::new(name),
        ])
    }

    /// [`Daemon::attach_ok`] naming the sandbox's network namespace (`--netns`), where the
    /// proxy listener and the DNS resolver are bound.
    pub fn attach_in_netns_ok(&self, sandbox: &Sandbox, policy: &Path, name: &str) -> Result<()> {
        let out = self.ctl([
            OsStr::new("attach"),
            OsStr::new("--cgroup"),
            sandbox.cgroup().path().as_os_str(),
            OsStr::new("--policy"),
            policy.as_os_str(),
            OsStr::new("--name"),
            OsStr::new(name),
            OsStr::new("--netns"),
            sandbox.netns().path().as_os_str(),
        ])?;
        self.ensure_attached(name, &out)
    }

    fn ensure_attached(&self, name: &str, out: &Output) -> Result<()> {
        if !out.status.success() {
            bail!(
                "attach {name} failed ({}): {}{}\ndaemon log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
                tail(&self.log(), 30)
            );
        }
        Ok(())
    }

    /// [`Daemon::attach`], failing on a non-zero exit.
    pub fn attach_ok(&self, sandbox: &Sandbox, policy: &Path, name: &str) -> Result<Output> {
        let out = self.attach(sandbox, policy, name)?;
        self.ensure_attached(name, &out)?;
        Ok(out)
    }

    /// `egressctl detach --name <name>` (any exit).
    pub fn detach(&self, name: &str) -> Result<Output> {
        self.ctl(["detach", "--name", name])
    }

    /// `egressctl status --json`, parsed.
    pub fn status_json(&self) -> Result<Value> {
        let out = self.ctl_ok(["status", "--json"])?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "status --json is not JSON: {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The entry of `status --json` `.sandboxes[]` with this name.
    pub fn status_sandbox(&self, name: &str) -> Result<Option<Value>> {
        let status = self.status_json()?;
        let list = status["sandboxes"]
            .as_array()
            .with_context(|| format!("status has no sandboxes array: {status}"))?;
        Ok(list
            .iter()
            .find(|s| s["name"].as_str() == Some(name))
            .cloned())
    }

    /// Every complete line of the audit log, parsed. A line that is not JSON is an error;
    /// a trailing line without its newline (being written) is skipped.
    pub fn audit_records(&self) -> Result<Vec<Value>> {
        let path = self.audit_log();
        let text = match std::fs::read_to_string(&path) {
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
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: not JSON: {l:?}", path.display(), i + 1))
            })
            .collect()
    }

    /// Polls the audit log until a record matches `pred`, at most `timeout`.
    pub fn wait_for_record(
        &self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let found = poll(timeout, Duration::from_millis(50), || {
            Ok(self.audit_records()?.into_iter().find(|r| pred(r)))
        })?;
        match found {
            Some(r) => Ok(r),
            None => bail!(
                "no matching audit record within {timeout:?}; records:{}",
                summarize(&self.audit_records().unwrap_or_default())
            ),
        }
    }

    /// [`Daemon::wait_for_record`] with an [`crate::audit::Match`].
    pub fn wait_for_match(&self, timeout: Duration, m: &crate::audit::Match) -> Result<Value> {
        self.wait_for_record(timeout, |r| m.matches(r))
            .with_context(|| format!("waiting for {m:?}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(libc::SIGTERM, Duration::from_secs(5));
        }
        if std::thread::panicking() || keep_artifacts() {
            eprintln!(
                "egressd log ({}):\n{}\npins: {:?}",
                self.log_path().display(),
                tail(&self.log(), 60),
                self.bpffs.list()
            );
        }
    }
}

/// Last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts the daemon as a service manager or container runtime that allows core dumps
/// would (containerd's unit sets `LimitCORE=infinity`): the soft core size limit raised to
/// the hard one, so that the daemon is seen to lower it itself.
fn core_dumps_allowed(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getrlimit and setrlimit are async-signal-safe and allocate nothing; the
    // struct lives on this stack across both calls.
    unsafe {
        cmd.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_CORE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_CORE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
