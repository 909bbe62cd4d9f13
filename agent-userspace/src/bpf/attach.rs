//! Attaching programs to a sandbox's cgroup through pinned links, and finding the links a
//! previous daemon left pinned.
use std::{fs, fs::File, path::Path};

use aya::programs::{links::FdLink, CgroupAttachMode};

use super::{
    loader::{SOCK_CREATE, SOCK_OPS},
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
            let result = (|| {
                let err = |e| BpfError::Program {
                    program: name,
                    hook,
                    source: Box::new(e),
                };
                // Single: the kernel's cgroup bpf_link attach accepts only this mode
                // (AllowMultiple fails with EINVAL), and links still coexist.
                let fd_link: FdLink = if name == SOCK_CREATE {
                    let prog = programs.sock_create()?;
                    let id = prog
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(err)?;
                    prog.take_link(id).map_err(err)?.try_into()
                } else if name == SOCK_OPS {
                    let prog = programs.sock_ops()?;
                    let id = prog
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(err)?;
                    prog.take_link(id).map_err(err)?.try_into()
                } else {
                    let prog = programs.program(name)?;
                    let id = prog
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(err)?;
                    prog.take_link(id).map_err(err)?.try_into()
                }
                .map_err(|e| BpfError::Other(format!("link for {hook} is not an fd link: {e}")))?;
                fd_link
                    .pin(&pin)
                    .map_err(|e| BpfError::Other(format!("pinning {}: {e}", pin.display())))?;
                Ok::<_, BpfError>(())
            })();
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

    /// Removes every link pin of the sandbox: the programs stop running for that cgroup.
    pub fn detach(&self, cgroup_id: u64) -> Result<bool, BpfError> {
        let dir = self.layout.sandbox_links(cgroup_id);
        if !dir.exists() {
            return Ok(false);
        }
        for (_, hook) in HOOKS {
            let pin = dir.join(hook);
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
