//! Loads the eBPF object once per daemon run, with its maps pinned (and reused) under the
//! versioned bpffs directory.
use aya::{programs::CgroupSockAddr, Ebpf, EbpfLoader};

use super::{BpfError, PinLayout};

/// (program symbol, hook name) for every program attached to a sandbox cgroup. The hook
/// name is also the link's pin file name.
pub const HOOKS: [(&str, &str); 4] = [
    ("egress_connect4", "connect4"),
    ("egress_connect6", "connect6"),
    ("egress_sendmsg4", "sendmsg4"),
    ("egress_sendmsg6", "sendmsg6"),
];

/// The loaded programs and the maps they share.
pub struct Programs {
    pub(crate) ebpf: Ebpf,
}

impl Programs {
    /// Loads and verifies every program. Fails, naming the hook, when the kernel lacks one:
    /// the daemon must never run with a hook missing.
    pub fn load(layout: &PinLayout) -> Result<Self, BpfError> {
        layout.create()?;
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps())
            .load(object)
            .map_err(|e| BpfError::Load(Box::new(e)))?;
        for (name, hook) in HOOKS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| BpfError::Other(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e| BpfError::Program {
                    program: name,
                    hook,
                    source: Box::new(e),
                })?;
            prog.load().map_err(|e| BpfError::Program {
                program: name,
                hook,
                source: Box::new(e),
            })?;
        }
        Ok(Self { ebpf })
    }

    pub(crate) fn program(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr, BpfError> {
        let hook = HOOKS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("?", |(_, h)| h);
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| BpfError::Other(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|e| BpfError::Program {
                program: name,
                hook,
                source: Box::new(e),
            })
    }

    /// (hook, run count, total run time in ns) of this daemon's program instances. Counts
    /// only accumulate while BPF statistics are enabled (`sysctl kernel.bpf_stats_enabled`).
    pub fn stats(&self) -> Vec<(&'static str, u64, u64)> {
        HOOKS
            .iter()
            .filter_map(|(name, hook)| {
                let prog: &CgroupSockAddr = self.ebpf.program(name)?.try_into().ok()?;
                let info = prog.info().ok()?;
                Some((*hook, info.run_count(), info.run_time().as_nanos() as u64))
            })
            .collect()
    }
}
