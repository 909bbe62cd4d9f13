//! BPF LSM `socket_create`, attached once for the whole system: a task inside a sandbox
//! cgroup (its own cgroup or an ancestor is in `SANDBOXES`) may create only unix, inet,
//! inet6 and netlink sockets. Packet sockets (`AF_PACKET`, which `CAP_NET_RAW` opens and
//! which sends hand-built frames to any address), `AF_XDP`, vsock, CAN, Bluetooth, TIPC,
//! RDS, SMC and the rest never reach the cgroup inet hooks, so they are refused here with
//! EPERM. Sockets the kernel creates for itself (`kern != 0`) are left alone.
//!
//! Runs only when `bpf` is in the kernel's active LSM list; the daemon reports when not.
use agent_common::{family, hook};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::decide::{count_deny, find_sandbox, report, Call, Decided, Dest, Origin};

const EPERM: i32 = 1;

/// `LSM_HOOK(int, 0, socket_create, int family, int type, int protocol, int kern)`; the
/// fifth argument is the verdict of the LSM programs that ran before this one.
#[lsm(hook = "socket_create")]
pub fn egress_lsm_socket_create(ctx: LsmContext) -> i32 {
    let fam: i32 = ctx.arg(0);
    let type_: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    if kern != 0 {
        return 0;
    }
    let f = fam as u32;
    if f == u32::from(family::AF_UNIX)
        || f == u32::from(family::AF_INET)
        || f == u32::from(family::AF_INET6)
        || f == u32::from(family::AF_NETLINK)
    {
        return 0;
    }
    // Tasks outside every sandbox are none of this program's business.
    let Some(sb) = find_sandbox() else {
        return 0;
    };
    let call = Call {
        hook: hook::LSM_SOCKET_CREATE,
        family: 0,
        // The number the caller asked for, which may not fit the event's 16 bits (the
        // kernel's own field): recorded as 65535 then.
        protocol: if (0..=0xffff).contains(&protocol) {
            protocol as u32
        } else {
            0xffff
        },
        dest: Dest::V4([0; 4]),
        port: 0,
        raw_addr: [0; 16],
        opt_level: fam as u16,
        opt_name: type_ as u16,
    };
    count_deny(sb.index);
    report(&Origin::task(), &call, Decided::refused(sb.index, 0));
    -EPERM
}
