//! Loads the eBPF object once per daemon run, with its maps pinned (and reused) under the
//! versioned bpffs directory.
use aya::{
    programs::{CgroupSock, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};

use super::{BpfError, PinLayout};

/// (program symbol, hook name) for every program attached to a sandbox cgroup. The hook
/// name is also the link's pin file name. All but the last are cgroup_sock_addr programs;
/// `sock_ops` records redirected connections' source ports for the proxy.
pub const HOOKS: [(&str, &str); 10] = [
    ("egress_connect4", "connect4"),
    ("egress_connect6", "connect6"),
    ("egress_sendmsg4", "sendmsg4"),
    ("egress_sendmsg6", "sendmsg6"),
    ("egress_recvmsg4", "recvmsg4"),
    ("egress_recvmsg6", "recvmsg6"),
    ("egress_getpeername4", "getpeername4"),
    ("egress_getpeername6", "getpeername6"),
    (SOCK_OPS, "sock_ops"),
    (SOCK_CREATE, "sock_create"),
];

/// Symbol of the program that refuses raw, ICMP and other non-TCP/UDP sockets.
pub const SOCK_CREATE: &str = "egress_sock_create";

/// Symbol of the sock_ops program.
pub const SOCK_OPS: &str = "egress_sock_ops";

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
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps())
            .load(object)
            .map_err(|e| BpfError::Load(Box::new(e)))?;
        let mut programs = Self { ebpf };
        for (name, hook) in HOOKS {
            let err = |e| BpfError::Program {
                program: name,
                hook,
                source: Box::new(e),
            };
            if name == SOCK_OPS {
                programs.sock_ops()?.load().map_err(err)?;
            } else if name == SOCK_CREATE {
                programs.sock_create()?.load().map_err(err)?;
            } else {
                programs.program(name)?.load().map_err(err)?;
            }
        }
        Ok(programs)
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

    pub(crate) fn sock_create(&mut self) -> Result<&mut CgroupSock, BpfError> {
        self.ebpf
            .program_mut(SOCK_CREATE)
            .ok_or_else(|| {
                BpfError::Other(format!("program {SOCK_CREATE} missing from the object"))
            })?
            .try_into()
            .map_err(|e| BpfError::Program {
                program: SOCK_CREATE,
                hook: "sock_create",
                source: Box::new(e),
            })
    }

    pub(crate) fn sock_ops(&mut self) -> Result<&mut SockOps, BpfError> {
        self.ebpf
            .program_mut(SOCK_OPS)
            .ok_or_else(|| BpfError::Other(format!("program {SOCK_OPS} missing from the object")))?
            .try_into()
            .map_err(|e| BpfError::Program {
                program: SOCK_OPS,
                hook: "sock_ops",
                source: Box::new(e),
            })
    }
}
