//! Whether BPF LSM programs run on this kernel: `bpf` must be in the active LSM list
//! (`/sys/kernel/security/lsm`, on securityfs, which we mount when it is missing). A BPF
//! LSM program attaches on kernels where `bpf` is built in but not active, and then never
//! runs, so the list is what decides whether packet sockets are covered.
use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

use super::BpfError;

const SECURITYFS: &str = "/sys/kernel/security";
const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// What the kernel says about its LSMs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LsmSupport {
    /// The active LSMs in order, as the kernel lists them.
    pub active: Vec<String>,
}

impl LsmSupport {
    /// Parses the comma-separated list the kernel writes to `/sys/kernel/security/lsm`.
    pub fn parse(list: &str) -> Self {
        Self {
            active: list
                .trim()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }

    /// Whether BPF LSM programs run.
    pub fn bpf_active(&self) -> bool {
        self.active.iter().any(|l| l == "bpf")
    }
}

/// Reads the active LSM list, mounting securityfs first if it is not mounted.
pub fn active_lsms() -> Result<LsmSupport, BpfError> {
    if !Path::new(LSM_LIST).exists() {
        mount_securityfs()?;
    }
    let list =
        std::fs::read_to_string(LSM_LIST).map_err(|e| BpfError::io("reading", LSM_LIST, e))?;
    Ok(LsmSupport::parse(&list))
}

fn mount_securityfs() -> Result<(), BpfError> {
    let target = CString::new(Path::new(SECURITYFS).as_os_str().as_bytes())
        .map_err(|_| BpfError::Other("bad securityfs path".into()))?;
    let fstype = c"securityfs";
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Mounted meanwhile (EBUSY) is fine; anything else means we cannot tell.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(BpfError::io("mount securityfs at", SECURITYFS, e));
        }
    }
    tracing::info!(path = SECURITYFS, "Mounted securityfs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::LsmSupport;

    #[test]
    fn parses_the_kernel_list() {
        let l = LsmSupport::parse("lockdown,capability,landlock,bpf\n");
        assert_eq!(l.active, ["lockdown", "capability", "landlock", "bpf"]);
        assert!(l.bpf_active());
        let l = LsmSupport::parse("capability,apparmor\n");
        assert!(!l.bpf_active());
        // "bpf" must be a whole entry, not part of one.
        assert!(!LsmSupport::parse("notbpf,bpfx").bpf_active());
        assert!(LsmSupport::parse("").active.is_empty());
    }
}
