//! cgroup v2 directories for sandboxes.
//!
//! The cgroup2 mount point is read from `/proc/self/mountinfo` (on this machine it is
//! `/sys/fs/cgroup/unified`, a hybrid layout, elsewhere `/sys/fs/cgroup`), never assumed.
//! The cgroup id the kernel reports (`bpf_get_current_cgroup_id`) is the inode number of
//! the directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{signal, unique_name};

/// One parsed line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// All mounts visible to this process.
pub fn mounts() -> Result<Vec<Mount>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// Parses `id parent maj:min root mount_point opts [optional...] - fstype source superopts`.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mount_point = left.split(' ').nth(4)?;
    let fs_type = right.split(' ').next()?;
    Some(Mount {
        mount_point: PathBuf::from(unescape_octal(mount_point)),
        fs_type: fs_type.to_string(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the cgroup v2 hierarchy (the first `cgroup2` mount).
pub fn cgroup2_mount() -> Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .context("no cgroup2 filesystem in /proc/self/mountinfo")
}

/// True when `path` is itself a mount point of the bpf filesystem.
pub fn is_bpffs_mount(path: &Path) -> Result<bool> {
    Ok(mounts()?
        .iter()
        .any(|m| m.fs_type == "bpf" && m.mount_point == path))
}

/// A uniquely named cgroup v2 directory. Drop kills every process left in it, waits until
/// it is empty, then removes it.
#[derive(Debug)]
pub struct CgroupGuard {
    path: PathBuf,
    id: u64,
}

impl CgroupGuard {
    /// Creates `<cgroup2 mount>/egress-test-<pid>-<n>-<name>`.
    pub fn new(name: &str) -> Result<Self> {
        let root = cgroup2_mount()?;
        let path = root.join(unique_name(name));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let id = std::fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino();
        Ok(Self { path, id })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id: inode number of the directory.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `<dir>/cgroup.procs`, where writing a pid moves that process into the cgroup.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let text = std::fs::read_to_string(self.procs_file())
            .with_context(|| format!("read {}", self.procs_file().display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Moves process `pid` into this cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.procs_file(), pid.to_string())
            .with_context(|| format!("move {pid} into {}", self.path.display()))
    }

    /// Kills every process in the cgroup and waits (bounded) until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        let kill_file = self.path.join("cgroup.kill");
        let start = Instant::now();
        for round in 0..250 {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            // cgroup.kill (Linux 5.14+) kills atomically, forks included; otherwise
            // SIGKILL each pid, repeating to catch children forked meanwhile.
            if kill_file.exists() {
                if round % 25 == 0 {
                    std::fs::write(&kill_file, "1")
                        .with_context(|| format!("write {}", kill_file.display()))?;
                }
            } else {
                for pid in pids {
                    signal(pid, libc::SIGKILL);
                }
            }
            if start.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "processes {:?} still in {} after 10 s",
            self.pids()?,
            self.path.display()
        )
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all() {
            eprintln!("warning: {e:#}");
        }
        // rmdir can fail with EBUSY for a moment after the last task exits (zombies being
        // reaped by their parent); retry briefly.
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("warning: cannot remove cgroup {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let l = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_mountinfo_line(l),
            Some(Mount {
                mount_point: PathBuf::from("/sys/fs/cgroup/unified"),
                fs_type: "cgroup2".into()
            })
        );
        let l = "50 31 0:40 / /tmp/a\\040b rw shared:5 - bpf bpf rw";
        assert_eq!(
            parse_mountinfo_line(l).map(|m| m.mount_point),
            Some(PathBuf::from("/tmp/a b"))
        );
    }
}
