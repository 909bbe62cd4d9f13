//! Small shared helpers: unique names, temp dirs, bounded waits and checked commands.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Prefix of every resource (netns, cgroup, bpffs dir, temp dir) this harness creates.
pub const PREFIX: &str = "egress-test";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh number, unique within this process.
pub fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `egress-test-<pid>-<n>-<label>`: unique on this machine while this process lives.
pub fn unique_name(label: &str) -> String {
    format!("{PREFIX}-{}-{}-{label}", std::process::id(), next_id())
}

/// Why privileged tests cannot run here, or `None` when they can.
pub fn skip_reason() -> Option<String> {
    match effective_uid() {
        Ok(0) => {}
        Ok(uid) => return Some(format!("needs root (euid is {uid})")),
        Err(e) => return Some(format!("cannot read euid: {e:#}")),
    }
    if let Err(e) = crate::cgroup::cgroup2_mount() {
        return Some(format!("no cgroup v2 mount: {e:#}"));
    }
    match std::fs::read_to_string("/proc/filesystems") {
        Ok(fs)
            if fs
                .lines()
                .any(|l| l.split_whitespace().last() == Some("bpf")) => {}
        Ok(_) => return Some("kernel has no bpf filesystem (bpffs)".into()),
        Err(e) => return Some(format!("cannot read /proc/filesystems: {e}")),
    }
    for tool in ["ip", "timeout", "sh"] {
        if which(tool).is_none() {
            return Some(format!("`{tool}` not found in PATH"));
        }
    }
    None
}

/// Effective uid from /proc/self/status (no unsafe libc call needed).
pub fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid: line in /proc/self/status")?;
    let euid = line
        .split_whitespace()
        .nth(2)
        .context("short Uid: line in /proc/self/status")?;
    euid.parse().context("parse euid")
}

/// First match of `name` in `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The python interpreter for fixtures: `EGRESS_TEST_PYTHON`, else `/usr/bin/python3`,
/// else `python3` from `PATH`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EGRESS_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let system = PathBuf::from("/usr/bin/python3");
    if system.is_file() {
        return system;
    }
    PathBuf::from("python3")
}

/// Path of a script in `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Runs a command to completion and fails, with its stderr, when it exits non-zero.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// `timeout -k 2 <secs> <program> <args>`: the command is killed if it outlives `secs`.
pub fn bounded<S: AsRef<OsStr>>(secs: u32, program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("-k").arg("2").arg(secs.to_string()).arg(program);
    cmd.args(args);
    cmd
}

/// Polls `f` every `every` until it returns `Some`, at most `timeout` long.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        if start.elapsed() >= timeout {
            return Ok(None);
        }
        std::thread::sleep(every);
    }
}

/// Keeps temp dirs for post-mortem when `EGRESS_TEST_KEEP` is set.
pub fn keep_artifacts() -> bool {
    std::env::var_os("EGRESS_TEST_KEEP").is_some()
}

/// A directory under `std::env::temp_dir()`, removed recursively on drop (unless
/// `EGRESS_TEST_KEEP` is set, then its path is printed).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(unique_name(label));
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `<dir>/<name>` and returns the path.
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::write(&p, contents).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if keep_artifacts() {
            eprintln!("EGRESS_TEST_KEEP: keeping {}", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Sends `sig` to `pid`. Returns false when the process no longer exists.
pub fn signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; pid > 0 so it
    // never addresses a process group or "every process".
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Makes a spawned child receive SIGKILL if the spawning thread dies, so a crashed test
/// run does not leave servers or daemons behind.
pub fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and allocates nothing, which is
    // all pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A long-running child process killed (SIGKILL, by its pid) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<std::process::Child>,
    what: String,
}

impl ChildGuard {
    pub fn new(child: std::process::Child, what: impl Into<String>) -> Self {
        Self {
            child: Some(child),
            what: what.into(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` if the child has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} already reaped", self.what),
        }
    }

    /// Sends `sig`, then waits up to `grace` for exit, then SIGKILLs. Always reaps.
    /// Sends `sig` and waits up to `grace` for the process to exit by itself; returns how
    /// long that took, or an error (after SIGKILL) if it did not exit in time.
    pub fn terminate(&mut self, sig: i32, grace: Duration) -> anyhow::Result<Duration> {
        let Some(mut child) = self.child.take() else {
            anyhow::bail!("{} is not running", self.what);
        };
        signal(child.id(), sig);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!(
            "{} did not exit within {grace:?} of signal {sig}",
            self.what
        )
    }

    pub fn stop(&mut self, sig: i32, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        signal(child.id(), sig);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = child.kill() {
            eprintln!("warning: kill {} ({}): {e}", self.what, child.id());
        }
        let _ = child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL, Duration::from_secs(2));
    }
}

/// Every regular file under `dir` (depth-bounded).
pub fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    fn go(dir: &Path, out: &mut Vec<PathBuf>, depth: u32) -> Result<()> {
        if depth > 16 {
            return Ok(());
        }
        for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                go(&e.path(), out, depth + 1)?;
            } else if t.is_file() {
                out.push(e.path());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(dir, &mut out, 0)?;
    Ok(out)
}
