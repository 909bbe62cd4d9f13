//! Attaching programs to a sandbox's cgroup through pinned links, and finding the links a
//! previous daemon left pinned.
use std::{
    fs,
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    CgroupAttachMode, CgroupSkbAttachType,
};

use super::{
    loader::{SETSOCKOPT, SKB_EGRESS, SOCK_CREATE, SOCK_OPS, SOCK_RELEASE, SYSCTL},
    BpfError, PinLayout, Programs, HOOKS,
};

/// Operations on the pinned links of sandboxes.
pub struct Links<'a> {
    pub layout: &'a PinLayout,
}

impl Links<'_> {
    /// Attaches every program to `cgroup_dir` and pins each link under
    /// `links/<cgroup_id>/<hook>`. Hooks already pinned (e.g. by a previous daemon) are kept,
    /// so this also completes a partial attach. On error, links made by this call are removed.
    pub fn attach(
        &self,
        programs: &mut Programs,
        cgroup_dir: &Path,
        cgroup_id: u64,
    ) -> Result<(), BpfError> {
        let dir = self.layout.sandbox_links(cgroup_id);
        fs::create_dir_all(&dir).map_err(|e| BpfError::io("creating", &dir, e))?;
        let cgroup =
            File::open(cgroup_dir).map_err(|e| BpfError::io("opening cgroup", cgroup_dir, e))?;
        let mut made = Vec::new();
        for (name, hook) in HOOKS {
            let pin = dir.join(hook);
            if pin.exists() {
                continue;
            }
            let result = attach_hook(programs, &cgroup, name, hook, &pin);
            if let Err(e) = result {
                for p in &made {
                    let _ = fs::remove_file(p);
                }
                return Err(e);
            }
            made.push(pin);
        }
        Ok(())
    }

    /// Replaces each pinned link whose program is not the one this daemon loaded (the
    /// sandbox was attached by an older build): the new link is attached and pinned beside
    /// the old one, then renamed over it, so the cgroup is never without the hook (both
    /// run for a moment, which can only refuse more). Returns the hooks replaced.
    pub fn refresh(
        &self,
        programs: &mut Programs,
        cgroup_dir: &Path,
        cgroup_id: u64,
    ) -> Result<Vec<&'static str>, BpfError> {
        let dir = self.layout.sandbox_links(cgroup_id);
        let cgroup =
            File::open(cgroup_dir).map_err(|e| BpfError::io("opening cgroup", cgroup_dir, e))?;
        let tags: std::collections::HashMap<u32, u64> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|info| (info.id(), info.tag()))
            .collect();
        let mut replaced = Vec::new();
        for (name, hook) in HOOKS {
            let pin = dir.join(hook);
            if !pin.exists() {
                continue;
            }
            let linked = PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|link| FdLink::from(link).info().ok())
                .and_then(|info| tags.get(&info.program_id()).copied());
            if linked == Some(programs.tag(name)?) {
                continue;
            }
            // bpffs refuses names with a dot.
            let fresh = dir.join(format!("{hook}_new"));
            let _ = fs::remove_file(&fresh);
            attach_hook(programs, &cgroup, name, hook, &fresh)?;
            fs::rename(&fresh, &pin).map_err(|e| BpfError::io("renaming link pin to", &pin, e))?;
            replaced.push(hook);
        }
        Ok(replaced)
    }

    /// Removes every link pin of the sandbox: the programs stop running for that cgroup.
    pub fn detach(&self, cgroup_id: u64) -> Result<bool, BpfError> {
        let dir = self.layout.sandbox_links(cgroup_id);
        if !dir.exists() {
            return Ok(false);
        }
        for pin in HOOKS
            .iter()
            .flat_map(|(_, hook)| [dir.join(hook), dir.join(format!("{hook}_new"))])
        {
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(BpfError::io("unpinning", &pin, e)),
            }
        }
        fs::remove_dir(&dir).map_err(|e| BpfError::io("removing", &dir, e))?;
        Ok(true)
    }

    /// Hooks pinned for a cgroup.
    pub fn pinned_hooks(&self, cgroup_id: u64) -> Vec<&'static str> {
        let dir = self.layout.sandbox_links(cgroup_id);
        HOOKS
            .iter()
            .map(|(_, h)| *h)
            .filter(|h| dir.join(h).exists())
            .collect()
    }
}

/// Attaches program `name` to `cgroup` at `hook` and pins the link at `pin`.
fn attach_hook(
    programs: &mut Programs,
    cgroup: &File,
    name: &'static str,
    hook: &'static str,
    pin: &Path,
) -> Result<(), BpfError> {
    let err = |e| BpfError::Program {
        program: name,
        hook,
        source: Box::new(e),
    };
    // Single: the kernel's cgroup bpf_link attach accepts only this mode
    // (AllowMultiple fails with EINVAL), and links still coexist.
    let fd_link: FdLink = if name == SOCK_CREATE || name == SOCK_RELEASE {
        let prog = programs.cgroup_sock(name, hook)?;
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        prog.take_link(id).map_err(err)?.try_into()
    } else if name == SETSOCKOPT {
        // aya 0.14 cannot turn a cgroup_sockopt link into a pinnable FdLink, so
        // this one link is created and pinned with the bpf syscall directly.
        let prog = programs.setsockopt()?;
        let prog_fd = prog.fd().map_err(err)?.as_fd().as_raw_fd();
        raw::link_create_and_pin(prog_fd, cgroup.as_raw_fd(), raw::BPF_CGROUP_SETSOCKOPT, pin)?;
        return Ok(());
    } else if name == SYSCTL {
        // The same for cgroup_sysctl links.
        let prog = programs.sysctl()?;
        let prog_fd = prog.fd().map_err(err)?.as_fd().as_raw_fd();
        raw::link_create_and_pin(prog_fd, cgroup.as_raw_fd(), raw::BPF_CGROUP_SYSCTL, pin)?;
        return Ok(());
    } else if name == SKB_EGRESS {
        let prog = programs.skb_egress()?;
        let id = prog
            .attach(
                cgroup,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .map_err(err)?;
        prog.take_link(id).map_err(err)?.try_into()
    } else if name == SOCK_OPS {
        let prog = programs.sock_ops()?;
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        prog.take_link(id).map_err(err)?.try_into()
    } else {
        let prog = programs.program(name)?;
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        prog.take_link(id).map_err(err)?.try_into()
    }
    .map_err(|e| BpfError::Other(format!("link for {hook} is not an fd link: {e}")))?;
    fd_link
        .pin(pin)
        .map_err(|e| BpfError::Other(format!("pinning {}: {e}", pin.display())))?;
    Ok::<_, BpfError>(())
}

/// cgroup ids that have a link directory pinned.
pub fn attached_cgroups(layout: &PinLayout) -> Result<Vec<u64>, BpfError> {
    let dir = layout.links();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(BpfError::io("listing", &dir, e)),
    };
    let mut ids: Vec<u64> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Pin file name of the system-wide LSM link under `global/`.
const LSM_PIN: &str = "lsm_socket_create";

/// Attaches the LSM `socket_create` program for the whole system and pins its link, so it
/// keeps refusing packet sockets in sandboxes while no daemon runs. A link a previous
/// daemon pinned is replaced without a gap: the new one is attached and pinned beside it,
/// then renamed over the old pin (both run meanwhile, which only refuses more).
pub fn attach_lsm(programs: &mut Programs, layout: &PinLayout) -> Result<(), BpfError> {
    let dir = layout.global();
    fs::create_dir_all(&dir).map_err(|e| BpfError::io("creating", &dir, e))?;
    let pin = dir.join(LSM_PIN);
    let fresh = dir.join(format!("{LSM_PIN}_new"));
    let _ = fs::remove_file(&fresh);
    let err = |e| BpfError::Program {
        program: super::loader::LSM_SOCKET_CREATE,
        hook: "lsm/socket_create",
        source: Box::new(e),
    };
    let prog = programs.lsm_socket_create()?;
    let id = prog.attach().map_err(err)?;
    let link: FdLink = prog.take_link(id).map_err(err)?.into();
    link.pin(&fresh)
        .map_err(|e| BpfError::Other(format!("pinning {}: {e}", fresh.display())))?;
    fs::rename(&fresh, &pin).map_err(|e| BpfError::io("renaming link pin to", &pin, e))?;
    Ok(())
}

/// Whether the system-wide LSM link is pinned.
pub fn lsm_pinned(layout: &PinLayout) -> bool {
    layout.global().join(LSM_PIN).exists()
}

/// The two bpf(2) commands aya 0.14 does not offer for cgroup_sockopt links.
mod raw {
    use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

    use super::BpfError;

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    pub const BPF_CGROUP_SETSOCKOPT: u32 = 22;
    pub const BPF_CGROUP_SYSCTL: u32 = 18;

    /// `union bpf_attr`, large enough for both commands; unused bytes must be zero.
    #[repr(C, align(8))]
    struct Attr([u8; 64]);

    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
        // SAFETY: the attr buffer outlives the call and its size is passed with it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut Attr,
                std::mem::size_of::<Attr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// Creates a cgroup bpf_link (mode "single", no flags) and pins it at `pin`; the link fd
    /// is closed afterwards, the pin keeps the link.
    pub fn link_create_and_pin(
        prog_fd: i32,
        cgroup_fd: i32,
        attach_type: u32,
        pin: &Path,
    ) -> Result<(), BpfError> {
        let mut attr = Attr([0; 64]);
        // struct { u32 prog_fd; u32 target_fd; u32 attach_type; u32 flags; ... }
        attr.0[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&(cgroup_fd as u32).to_ne_bytes());
        attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
        let link_fd = bpf(BPF_LINK_CREATE, &mut attr)
            .map_err(|e| BpfError::io("bpf_link_create for", pin, e))? as i32;
        // SAFETY: the kernel just returned this fd to us; OwnedFd closes it on drop.
        let link =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(link_fd) };
        let path = CString::new(pin.as_os_str().as_bytes())
            .map_err(|_| BpfError::Other(format!("pin path {pin:?} contains a NUL byte")))?;
        let mut attr = Attr([0; 64]);
        // struct { u64 pathname; u32 bpf_fd; u32 file_flags; ... }
        attr.0[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
        attr.0[8..12]
            .copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&link) as u32).to_ne_bytes());
        bpf(BPF_OBJ_PIN, &mut attr).map_err(|e| BpfError::io("pinning link at", pin, e))?;
        Ok(())
    }
}
