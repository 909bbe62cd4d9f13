//! Everything that touches the kernel's BPF objects: mounting bpffs, loading the programs,
//! attaching them to sandbox cgroups through pinned links, writing the policy maps, and
//! reading decision events from the ring buffer.
//!
//! Layout under the bpffs directory (default `/sys/fs/bpf/egressd`):
//!
//! ```text
//! v<ABI>/maps/<MAP>                 maps, pinned by name (shared by every program instance)
//! v<ABI>/links/<cgroup id>/<hook>   one pinned link per program per sandbox
//! v<ABI>/global/lsm_socket_create    the system-wide BPF LSM link
//! ```
//!
//! Pinned links keep every sandbox confined while no daemon runs; removing a link pin (and
//! dropping the last handle) is what detaches a program.
mod attach;
mod bpffs;
mod compat;
mod events;
mod loader;
mod lsm;
mod maps;
mod ring_usage;

pub use attach::{attach_lsm, attached_cgroups, lsm_pinned, Links};
pub use bpffs::{ensure_bpffs, PinLayout};
pub use compat::compat_setsockopt_coverage;
pub use events::{consume_unread, EventReader, KernelEvent};
pub use loader::{Programs, HOOKS};
pub use lsm::{active_lsms, LsmSupport};
pub use maps::{read_lost, PeerMap, PolicyMaps};
pub use ring_usage::RingUsageProbe;

use std::{io, path::PathBuf};

/// Errors from the kernel side, each naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error(
        "the kernel refused program `{program}` ({hook}): {source}. egressd needs cgroup v2 \
         and BPF cgroup_sock_addr hooks (Linux >= 5.8 with CONFIG_CGROUP_BPF); it will not \
         run unenforced"
    )]
    Program {
        program: &'static str,
        hook: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("policy for sandbox needs {needed} prefixes but the kernel map is full")]
    MapFull { needed: usize },
    #[error("{0}")]
    Other(String),
}

impl BpfError {
    fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
    fn map(map: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            map,
            source: Box::new(source),
        }
    }
}
