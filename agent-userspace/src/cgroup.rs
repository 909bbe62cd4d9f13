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

/// A checked cgroup v2 directory.
#[derive(Clone, Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl Cgroup {
    /// Resolves `path` (absolute, or relative to the cgroup2 mount) and checks that it is a
    /// cgroup v2 directory.
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let mount = cgroup2_mount()?;
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else {
            mount.join(path)
        };
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
    fn unescapes_octal() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }
}
