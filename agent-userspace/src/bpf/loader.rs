//! Loads the eBPF object once per daemon run, with its maps pinned (and reused) under the
//! versioned bpffs directory.
use aya::{
    programs::{CgroupSkb, CgroupSock, CgroupSockAddr, CgroupSockopt, CgroupSysctl, Lsm, SockOps},
    Btf, Ebpf, EbpfLoader,
};

use super::{BpfError, PinLayout};

/// (program symbol, hook name) for every program attached to a sandbox cgroup. The hook
/// name is also the link's pin file name. The first ten are cgroup_sock_addr programs;
/// `sock_ops` records redirected connections' source ports for the proxy; `sock_release`
/// removes a closed socket's unclaimed `BY_PEER` entry; `setsockopt` and `skb_egress` refuse source routes
/// set by socket option and drop packets carrying one; `sysctl` refuses writes to the
/// network sysctls that would undo those guarantees.
pub const HOOKS: [(&str, &str); 16] = [
    ("egress_connect4", "connect4"),
    ("egress_connect6", "connect6"),
    ("egress_sendmsg4", "sendmsg4"),
    ("egress_sendmsg6", "sendmsg6"),
    ("egress_recvmsg4", "recvmsg4"),
    ("egress_recvmsg6", "recvmsg6"),
    ("egress_getpeername4", "getpeername4"),
    ("egress_getpeername6", "getpeername6"),
    ("egress_bind4", "bind4"),
    ("egress_bind6", "bind6"),
    (SOCK_OPS, "sock_ops"),
    (SOCK_CREATE, "sock_create"),
    (SOCK_RELEASE, "sock_release"),
    (SETSOCKOPT, "setsockopt"),
    (SKB_EGRESS, "skb_egress"),
    (SYSCTL, "sysctl"),
];

/// Symbol of the program refusing writes to guarding network sysctls.
pub const SYSCTL: &str = "egress_sysctl";

/// Symbol of the program refusing source-routing socket options.
pub const SETSOCKOPT: &str = "egress_setsockopt";

/// Symbol of the program dropping packets with IPv4 options or an IPv6 routing header.
pub const SKB_EGRESS: &str = "egress_skb";

/// Symbol of the BPF LSM program refusing non-inet socket families in sandboxes; attached
/// once for the whole system, not per cgroup.
pub const LSM_SOCKET_CREATE: &str = "egress_lsm_socket_create";

/// Symbol of the program that refuses raw, ICMP and other non-TCP/UDP sockets.
pub const SOCK_CREATE: &str = "egress_sock_create";

/// Symbol of the program that removes a closed socket's unclaimed `BY_PEER` entry.
pub const SOCK_RELEASE: &str = "egress_sock_release";

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
            } else if name == SOCK_CREATE || name == SOCK_RELEASE {
                programs.cgroup_sock(name, hook)?.load().map_err(err)?;
            } else if name == SETSOCKOPT {
                programs.setsockopt()?.load().map_err(err)?;
            } else if name == SKB_EGRESS {
                programs.skb_egress()?.load().map_err(err)?;
            } else if name == SYSCTL {
                programs.sysctl()?.load().map_err(err)?;
            } else {
                programs.program(name)?.load().map_err(err)?;
            }
        }
        Ok(programs)
    }

    /// The tag (a hash of the instructions, the same however often they are loaded) of
    /// the loaded program `name`.
    pub(crate) fn tag(&self, name: &'static str) -> Result<u64, BpfError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or_else(|| BpfError::Other(format!("program {name} missing from the object")))?;
        program
            .info()
            .map(|info| info.tag())
            .map_err(|e| BpfError::Other(format!("reading the tag of program {name}: {e}")))
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

    /// A cgroup_sock program (`sock_create`, `sock_release`).
    pub(crate) fn cgroup_sock(
        &mut self,
        name: &'static str,
        hook: &'static str,
    ) -> Result<&mut CgroupSock, BpfError> {
        self.typed(name, hook)
    }

    fn typed<T>(&mut self, name: &'static str, hook: &'static str) -> Result<&mut T, BpfError>
    where
        for<'p> &'p mut T:
            TryFrom<&'p mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
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

    pub(crate) fn setsockopt(&mut self) -> Result<&mut CgroupSockopt, BpfError> {
        self.typed(SETSOCKOPT, "setsockopt")
    }

    pub(crate) fn sysctl(&mut self) -> Result<&mut CgroupSysctl, BpfError> {
        self.typed(SYSCTL, "sysctl")
    }

    pub(crate) fn skb_egress(&mut self) -> Result<&mut CgroupSkb, BpfError> {
        self.typed(SKB_EGRESS, "skb_egress")
    }

    /// Loads the LSM program against the kernel's BTF. Fails where the kernel has no BTF
    /// or no BPF LSM support; the caller reports that packet sockets are not covered.
    pub(crate) fn lsm_socket_create(&mut self) -> Result<&mut Lsm, BpfError> {
        let btf = Btf::from_sys_fs().map_err(|e| {
            BpfError::Other(format!(
                "reading the kernel BTF (/sys/kernel/btf/vmlinux): {e}"
            ))
        })?;
        let prog: &mut Lsm = self.typed(LSM_SOCKET_CREATE, "lsm/socket_create")?;
        if prog.fd().is_err() {
            prog.load("socket_create", &btf).map_err(|e| {
                BpfError::Other(format!(
                    "the kernel refused to load the BPF LSM program {LSM_SOCKET_CREATE}: {e} \
                     (kernels under lockdown or built to refuse BTF tracing and LSM programs \
                     answer EPERM)"
                ))
            })?;
        }
        Ok(prog)
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
