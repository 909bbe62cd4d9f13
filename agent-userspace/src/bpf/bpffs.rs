//! The bpf filesystem: mounted by us when missing (as Cilium does), and the versioned
//! directory layout of our pins.
use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, fs::DirBuilderExt},
    path::{Path, PathBuf},
};

use agent_common::ABI_VERSION;

use super::BpfError;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> Result<bool, BpfError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| BpfError::Other(format!("path {path:?} contains a NUL byte")))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a zeroed out-parameter of the right type.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(BpfError::io(
            "statfs",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `dir` is on a bpf filesystem, mounting one at `/sys/fs/bpf` if `dir` lives
/// below it and nothing is mounted there yet. Returns whether we mounted it.
pub fn ensure_bpffs(dir: &Path) -> Result<bool, BpfError> {
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    if is_bpffs(&existing)? {
        return Ok(false);
    }
    let default = Path::new(DEFAULT_MOUNT);
    if !dir.starts_with(default) || !default.is_dir() || is_bpffs(default)? {
        return Err(BpfError::Other(format!(
            "{} is not on a bpf filesystem; mount one (mount -t bpf bpf {}) or choose a \
             directory under {DEFAULT_MOUNT}",
            dir.display(),
            existing.display()
        )));
    }
    let src = c"bpf";
    let target = CString::new(default.as_os_str().as_bytes())
        .map_err(|_| BpfError::Other("bad mount path".into()))?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(BpfError::io(
            "mount bpffs at",
            default,
            std::io::Error::last_os_error(),
        ));
    }
    tracing::info!(path = DEFAULT_MOUNT, "Mounted bpffs");
    Ok(true)
}

/// Where our pins live. The ABI version is part of the path: maps pinned by a build with a
/// different layout are never reused (aya reuses a pinned map without checking its type).
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(base: &Path) -> Self {
        Self {
            root: base.join(format!("v{ABI_VERSION}")),
        }
    }

    /// The layouts other builds (other ABI versions) pinned under `base`.
    pub fn others(base: &Path) -> Vec<Self> {
        let ours = format!("v{ABI_VERSION}");
        let Ok(rd) = fs::read_dir(base) else {
            return Vec::new();
        };
        let mut out: Vec<Self> = rd
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name != ours
                    && name.len() > 1
                    && name.starts_with('v')
                    && name[1..].bytes().all(|b| b.is_ascii_digit())
                    && e.file_type().is_ok_and(|t| t.is_dir())
            })
            .map(|e| Self { root: e.path() })
            .collect();
        out.sort_by(|a, b| a.root.cmp(&b.root));
        out
    }

    /// The layout's name as records give it: its directory's, `vN`.
    pub fn name(&self) -> String {
        self.root
            .file_name()
            .map_or_else(|| "?".into(), |n| n.to_string_lossy().into_owned())
    }

    /// The directory holding this layout.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Links that are not per sandbox (the LSM program).
    pub fn global(&self) -> PathBuf {
        self.root.join("global")
    }

    pub fn sandbox_links(&self, cgroup_id: u64) -> PathBuf {
        self.links().join(cgroup_id.to_string())
    }

    pub fn create(&self) -> Result<(), BpfError> {
        for d in [self.maps(), self.links(), self.global()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| BpfError::io("creating", &d, e))?;
        }
        Ok(())
    }
}
