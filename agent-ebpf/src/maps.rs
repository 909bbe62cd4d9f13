//! Maps shared by the programs. All are pinned by name under the daemon's versioned bpffs
//! directory, so enforcement and its counters survive the daemon.
use crate::sk_storage::SkStorage;
use agent_common::{
    ConnectEvent, OrigDst, PeerKey, PrefixRules, SandboxCounters, SandboxInfo, V4Key, V6Key,
    MAX_PREFIXES, MAX_REDIRECTS, MAX_SANDBOXES,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};

/// cgroup id -> sandbox.
#[map]
pub static SANDBOXES: HashMap<u64, SandboxInfo> = HashMap::pinned(MAX_SANDBOXES, 0);

/// How many sandboxes are denied everything (their entry names `QUARANTINE_SLOT`), kept
/// by the daemon with `SANDBOXES`: while it is 0, the `skb_egress` program does not look
/// a packet's sandbox up.
#[map]
pub static DENY_ALL: Array<u32> = Array::pinned(1, 0);

/// (policy slot, IPv4 prefix) -> rules for that prefix.
#[map]
pub static RULES_V4: LpmTrie<V4Key, PrefixRules> = LpmTrie::pinned(MAX_PREFIXES, 0);

/// (policy slot, IPv6 prefix) -> rules for that prefix.
#[map]
pub static RULES_V6: LpmTrie<V6Key, PrefixRules> = LpmTrie::pinned(MAX_PREFIXES, 0);

/// Per-sandbox decision counters, indexed by sandbox index.
#[map]
pub static COUNTERS: PerCpuArray<SandboxCounters> = PerCpuArray::pinned(MAX_SANDBOXES, 0);

/// Events that could not be reserved in `EVENTS` (index 0). The daemon reports increases.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// The same, by the sandbox index of the event that could not be reserved (0: none
/// found), so a report can say whose records are missing.
#[map]
pub static LOST_BY_SANDBOX: PerCpuArray<u64> = PerCpuArray::pinned(MAX_SANDBOXES, 0);

/// Of those, the denials, by sandbox index: they count toward a sandbox's denial burst
/// though their records are missing (a sandbox filling the ring cannot hide its denials
/// from it), where lost allowed calls must not.
#[map]
pub static LOST_DENIED_BY_SANDBOX: PerCpuArray<u64> = PerCpuArray::pinned(MAX_SANDBOXES, 0);

/// Decision events for the audit log. 4 MiB holds ~40k events while the daemon is away.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned((4 << 20) as u32, 0);

const _: () = assert!(core::mem::size_of::<ConnectEvent>().is_multiple_of(8));

/// What a redirected socket (a connection to the proxy, DNS to the sandbox's resolver)
/// keeps on itself: where it asked to go, which replies and `getpeername` show instead of
/// the daemon's loopback listener and which sock_ops copies to `BY_PEER` once the
/// connection has its source port; and that `BY_PEER` key, so that the entry goes when
/// the connection is over if the proxy never took it. One value, created by the redirect
/// (a redirect that cannot create it is refused): later steps only write into it, so
/// none of them can fail for memory and leave a `BY_PEER` entry nothing removes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockState {
    /// Valid while `has_orig` is 1.
    pub orig: OrigDst,
    /// Valid while `has_peer` is 1.
    pub peer: PeerKey,
    pub has_orig: u8,
    pub has_peer: u8,
    pub _pad: [u8; 6],
}

/// Each socket's [`SockState`], kept on the socket and freed with it: no sandbox can push
/// out another's.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// (netns cookie, source address, source port) -> original destination, read (and removed)
/// by the proxy after `accept()`.
#[map]
pub static BY_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::pinned(MAX_REDIRECTS, 0);
