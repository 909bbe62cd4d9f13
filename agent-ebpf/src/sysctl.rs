//! `cgroup/sysctl` on each sandbox cgroup: writes to the network sysctls that would undo
//! what the other programs rely on are refused with EPERM. A process that is root in the
//! user namespace owning the sandbox's network namespace may write that namespace's
//! `/proc/sys/net` without any capability, so checking capabilities is not enough:
//! - `ip_nonlocal_bind` (IPv4 and IPv6) other than 0 lets a socket bind to, and send from,
//!   an address that is not the host's, which the socket options `IP_FREEBIND` and
//!   `IP_TRANSPARENT` (refused in sockopt.rs) would otherwise be needed for: a forged
//!   source sends the answers to a packet (an ICMP error quoting it, an echoing server)
//!   to an address no hook judged;
//! - `ip_local_reserved_ports` holds the daemon's listener ports out of the kernel's own
//!   port choice (see the daemon's netns module): any write is refused;
//! - `route_localnet` other than 0 routes loopback addresses off the loopback device.
//!
//! Reads, and every other sysctl, are left alone (container runtimes write some, such as
//! `ping_group_range`, from inside the container's cgroup).
use agent_common::{hook, sysctl};
use aya_ebpf::{
    helpers::generated::{bpf_sysctl_get_name, bpf_sysctl_get_new_value},
    macros::cgroup_sysctl,
    programs::SysctlContext,
};

use crate::decide::{count_deny, find_sandbox, report, Call, Decided, Dest, Origin};

/// `BPF_F_SYSCTL_BASE_NAME`: only the last part of the name (`ip_nonlocal_bind`).
const BASE_NAME: u64 = 1;
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const NONLOCAL_BIND: &[u8; 16] = b"ip_nonlocal_bind";
const RESERVED_PORTS: &[u8; 23] = b"ip_local_reserved_ports";
const ROUTE_LOCALNET: &[u8; 14] = b"route_localnet";

#[cgroup_sysctl]
pub fn egress_sysctl(ctx: SysctlContext) -> i32 {
    // SAFETY: context pointer from the kernel; 4-byte loads of 4-byte fields.
    let (write, pos) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.sysctl).write),
            core::ptr::read_volatile(&(*ctx.sysctl).file_pos),
        )
    };
    if write == 0 {
        return ALLOW;
    }
    let mut name = [0u8; 32];
    // SAFETY: the buffer is valid for its length; the helper NUL-terminates.
    let len = unsafe { bpf_sysctl_get_name(ctx.sysctl, name.as_mut_ptr().cast(), 32, BASE_NAME) };
    // A name that does not fit is none of ours.
    if len < 0 {
        return ALLOW;
    }
    let which = if is(&name, len, NONLOCAL_BIND) {
        sysctl::NONLOCAL_BIND
    } else if is(&name, len, RESERVED_PORTS) {
        sysctl::RESERVED_PORTS
    } else if is(&name, len, ROUTE_LOCALNET) {
        sysctl::ROUTE_LOCALNET
    } else {
        return ALLOW;
    };
    // Turning a switch off is harmless, when written whole from the start.
    if which != sysctl::RESERVED_PORTS && pos == 0 && writes_zero(&ctx) {
        return ALLOW;
    }
    let index = find_sandbox().map_or(0, |sb| sb.index);
    let call = Call {
        hook: hook::SYSCTL,
        family: 0,
        protocol: 0,
        dest: Dest::V4([0; 4]),
        port: 0,
        raw_addr: [0; 16],
        opt_level: 0,
        opt_name: which,
    };
    count_deny(index);
    report(&Origin::task(), &call, Decided::refused(index, 0));
    DENY
}

/// Whether `name` (of length `len`, as the helper returned) is `want`, byte by byte.
#[inline(always)]
fn is<const N: usize>(name: &[u8; 32], len: i64, want: &[u8; N]) -> bool {
    if len != N as i64 {
        return false;
    }
    let mut i = 0;
    while i < N {
        if name[i] != want[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether the value being written is exactly `0`, optionally followed by a newline.
#[inline(always)]
fn writes_zero(ctx: &SysctlContext) -> bool {
    let mut value = [0u8; 4];
    // SAFETY: the buffer is valid for its length; the helper NUL-terminates.
    let len = unsafe { bpf_sysctl_get_new_value(ctx.sysctl, value.as_mut_ptr().cast(), 4) };
    match len {
        1 => value[0] == b'0',
        2 => value[0] == b'0' && value[1] == b'\n',
        _ => false,
    }
}
