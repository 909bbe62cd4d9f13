//! cgroup v2 directories: finding the cgroup2 mount and the id the kernel uses for a
//! directory (its inode number, what `bpf_get_current_cgroup_id` returns).
use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a directory on the cgroup2 filesystem (mounted at {1})")]
    NotCgroup2(PathBuf, PathBuf),
    #[error("{0} has no cgroup v2 line (0::PATH)")]
    NoUnifiedLine(PathBuf),
}

impl CgroupError {
    /// The cgroup directory does not exist (as opposed to a failure to look).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The mount point of the cgroup v2 hierarchy, read from `/proc/self/mountinfo` (it is
/// `/sys/fs/cgroup` on unified hosts and `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

/// Why sandboxes could not be confined on this host, if so: before Linux 5.15, writing
/// `net_cls.classid` or `net_prio.ifpriomap` in a cgroup v1 hierarchy stops the kernel
/// from giving new sockets their cgroup v2 cgroup (they get the root's, where no sandbox's
/// programs run), so with either controller mounted any process allowed to write those
/// files could turn confinement off for every socket made after. Read from
/// `/proc/self/mountinfo` and the kernel release.
pub fn v1_socket_hazard() -> Option<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    socket_hazard(&mountinfo, release.trim())
}

fn socket_hazard(mountinfo: &str, release: &str) -> Option<String> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version >= (5, 15) {
        return None;
    }
    let controller = mountinfo.lines().find_map(|line| {
        let (_, right) = line.split_once(" - ")?;
        let mut fields = right.split_whitespace();
        (fields.next()? == "cgroup").then_some(())?;
        let options = fields.nth(1)?;
        options
            .split(',')
            .find(|o| *o == "net_cls" || *o == "net_prio")
            .map(str::to_owned)
    })?;
    Some(format!(
        "the cgroup v1 {controller} controller is mounted on Linux {release} (before 5.15): \
         a write to its files would take every new socket out of its cgroup v2 cgroup, and \
         so out of confinement; unmount net_cls/net_prio or run Linux 5.15 or later"
    ))
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> ..."
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(unescape))?
    })
}

fn unescape(s: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as octal.
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Levels of cgroups a sandbox may make below its own ([`Cgroup::bound_tree`]): room
/// for nested runtimes and a container's own systemd (`user.slice/user-1000.slice/
/// user@1000.service/user.slice/libpod-ID.scope/container/system.slice/x.service`), and
/// fewer than the 16 the daemon's walk of the tree reads.
pub const TREE_DEPTH: u32 = 12;
/// Cgroups a sandbox may make below its own, in all.
pub const TREE_DESCENDANTS: u32 = 1024;

/// A checked cgroup v2 directory.
#[derive(Clone, Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl Cgroup {
    /// Resolves `path` (see [`resolve`]) and checks that it is a cgroup v2 directory.
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let mount = cgroup2_mount()?;
        let full = resolve_in(&mount, path);
        let full = fs::canonicalize(&full).map_err(|source| CgroupError::Io {
            path: full.clone(),
            source,
        })?;
        let meta = fs::metadata(&full).map_err(|source| CgroupError::Io {
            path: full.clone(),
            source,
        })?;
        if !meta.is_dir() || !is_cgroup2(&full) {
            return Err(CgroupError::NotCgroup2(full, mount));
        }
        Ok(Self {
            path: full,
            id: meta.ino(),
        })
    }

    /// Bounds the tree a sandbox may build below its cgroup ([`TREE_DEPTH`] levels,
    /// [`TREE_DESCENDANTS`] cgroups), where the runtime left it unbounded (`max`): the
    /// daemon walks that tree for the sandbox's processes, and a sandbox with a writable
    /// cgroup mount could otherwise make each walk take seconds, or hide a process below
    /// the levels walked. A tighter bound the runtime set stays. Returns what could not
    /// be set (the caller warns).
    pub fn bound_tree(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for (file, bound) in [
            ("cgroup.max.depth", TREE_DEPTH),
            ("cgroup.max.descendants", TREE_DESCENDANTS),
        ] {
            let path = self.path.join(file);
            let outcome = fs::read_to_string(&path).and_then(|now| {
                let now = now.trim();
                let tighter = now.parse::<u32>().is_ok_and(|n| n <= bound);
                if tighter {
                    Ok(())
                } else {
                    fs::write(&path, bound.to_string())
                }
            });
            if let Err(e) = outcome {
                failed.push(format!("{file}: {e}"));
            }
        }
        failed
    }

    /// Whether a process is in it or below (`populated 1` in `cgroup.events`); `None`
    /// when that cannot be read.
    pub fn populated(&self) -> Option<bool> {
        let events = fs::read_to_string(self.path.join("cgroup.events")).ok()?;
        events
            .lines()
            .find_map(|l| l.strip_prefix("populated "))
            .map(|v| v.trim() == "1")
    }
}

/// Where a cgroup path points: a relative path is under the cgroup2 mount; an absolute
/// one is taken as it is when it names a cgroup2 directory, else as relative to the mount
/// (the form `/proc/PID/cgroup`, `podman inspect` and runtimes print, e.g.
/// `/libpod_parent/libpod-ID`).
pub fn resolve(path: &Path) -> Result<PathBuf, CgroupError> {
    Ok(resolve_in(&cgroup2_mount()?, path))
}

fn resolve_in(mount: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        if path.starts_with(mount) || (path.is_dir() && is_cgroup2(path)) {
            return path.to_path_buf();
        }
        let rel = path.strip_prefix("/").unwrap_or(path);
        let under = mount.join(rel);
        if under.is_dir() {
            return under;
        }
        path.to_path_buf()
    } else {
        mount.join(path)
    }
}

/// The cgroup v2 directory of process `pid`, from its `0::PATH` line in `/proc/PID/cgroup`.
pub fn of_pid(pid: u32) -> Result<PathBuf, CgroupError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&file).map_err(|source| CgroupError::Io {
        path: file.clone(),
        source,
    })?;
    let rel = parse_proc_cgroup(&text).ok_or_else(|| CgroupError::NoUnifiedLine(file.clone()))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// The unified-hierarchy path in a `/proc/PID/cgroup` file (`0::/a/b`; hybrid hosts list
/// the v1 hierarchies too).
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)"))
}

/// The cgroup path a runtime makes from an OCI `linux.cgroupsPath` written for the
/// systemd driver, `SLICE:PREFIX:NAME`: `a-b.slice` nests as `a.slice/a-b.slice`, and the
/// unit is `PREFIX-NAME.scope` (or `NAME` itself when it is a `.slice`). Returns `None`
/// when the string is not of that form.
pub fn systemd_cgroup_path(cgroups_path: &str) -> Option<PathBuf> {
    let mut parts = cgroups_path.split(':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || name.is_empty() || cgroups_path.contains('/') {
        return None;
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut out = expand_slice(slice)?;
    if name.ends_with(".slice") {
        out.push(name);
    } else if prefix.is_empty() {
        out.push(format!("{name}.scope"));
    } else {
        out.push(format!("{prefix}-{name}.scope"));
    }
    Some(out)
}

/// `a-b-c.slice` -> `a.slice/a-b.slice/a-b-c.slice` (`-.slice` is the root).
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if stem == "-" {
        return Some(PathBuf::new());
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return None;
    }
    let mut out = PathBuf::new();
    let mut acc = String::new();
    for part in stem.split('-') {
        if !acc.is_empty() {
            acc.push('-');
        }
        acc.push_str(part);
        out.push(format!("{acc}.slice"));
    }
    Some(out)
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-parameter.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    let magic = st.f_type as i64;
    rc == 0 && magic == CGROUP2_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_directory_is_not_found() {
        let io = |kind| CgroupError::Io {
            path: "/x".into(),
            source: std::io::Error::from(kind),
        };
        assert!(io(std::io::ErrorKind::NotFound).is_not_found());
        assert!(!io(std::io::ErrorKind::PermissionDenied).is_not_found());
        assert!(!CgroupError::NoCgroup2.is_not_found());
    }

    #[test]
    fn net_cls_or_net_prio_before_5_15_is_a_hazard() {
        let with = |controllers: &str| {
            format!(
                "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n\
                 40 31 0:35 / /sys/fs/cgroup/x rw,relatime - cgroup cgroup rw,{controllers}\n\
                 41 31 0:36 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
            )
        };
        let why = socket_hazard(&with("net_cls,net_prio"), "5.10.0-28-amd64").unwrap_or_default();
        assert!(why.contains("net_cls") && why.contains("5.10.0"), "{why}");
        assert!(socket_hazard(&with("net_prio"), "5.4.0").is_some());
        // Fixed in 5.15; other controllers do not matter.
        assert_eq!(socket_hazard(&with("net_cls"), "5.15.0"), None);
        assert_eq!(socket_hazard(&with("net_cls"), "6.18.44-fc"), None);
        assert_eq!(socket_hazard(&with("cpu,cpuacct"), "5.10.0"), None);
        // A v2 mount is not a v1 controller.
        assert_eq!(
            socket_hazard(
                "41 31 0:36 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,net_cls\n",
                "5.4.0"
            ),
            None
        );
    }

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn leading_slash_is_under_the_mount_unless_it_exists() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            resolve_in(mount, Path::new("/sys/fs/cgroup/unified/a")),
            PathBuf::from("/sys/fs/cgroup/unified/a")
        );
        assert_eq!(
            resolve_in(mount, Path::new("agents/a")),
            PathBuf::from("/sys/fs/cgroup/unified/agents/a")
        );
        // Neither exists here: taken as given, and the caller's open reports that path.
        assert_eq!(
            resolve_in(mount, Path::new("/no-such-egressd-dir/x")),
            PathBuf::from("/no-such-egressd-dir/x")
        );
    }

    #[test]
    fn proc_cgroup_unified_line() {
        let hybrid =
            "12:pids:/libpod_parent/libpod-abc\n1:name=systemd:/x\n0::/libpod_parent/libpod-abc\n";
        assert_eq!(parse_proc_cgroup(hybrid), Some("/libpod_parent/libpod-abc"));
        assert_eq!(parse_proc_cgroup("0::/\n"), Some("/"));
        assert_eq!(parse_proc_cgroup("3:cpu:/a\n"), None);
    }

    #[test]
    fn systemd_cgroups_paths() {
        let p = |s: &str| systemd_cgroup_path(s).map(|p| p.display().to_string());
        assert_eq!(
            p("machine.slice:libpod:0123abcd").as_deref(),
            Some("machine.slice/libpod-0123abcd.scope")
        );
        assert_eq!(
            p("kubepods-besteffort-pod12.slice:crio:ffee").as_deref(),
            Some("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/crio-ffee.scope")
        );
        assert_eq!(p(":runc:c1").as_deref(), Some("system.slice/runc-c1.scope"));
        assert_eq!(p("-.slice::c1").as_deref(), Some("c1.scope"));
        assert_eq!(
            p("user.slice::agents.slice").as_deref(),
            Some("user.slice/agents.slice")
        );
        assert_eq!(p("/libpod_parent/x"), None);
        assert_eq!(p("a:b"), None);
        assert_eq!(p("bad:p:n"), None);
        assert_eq!(p("a--b.slice:p:n"), None);
        assert_eq!(p("machine.slice:p:"), None);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }
}
