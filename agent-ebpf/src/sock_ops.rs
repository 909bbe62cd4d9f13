//! `sockops` on each sandbox cgroup: when a connection that connect4/6 redirected to the
//! proxy gets its source port (`BPF_SOCK_OPS_TCP_CONNECT_CB`, before the SYN is sent), copy
//! its original destination from the socket's `SOCK_STATE` to `BY_PEER[netns cookie, source
//! address, source port]`, which is all the proxy can see of it after `accept()`; when the
//! connection is over (`TCP_CLOSE`), remove that entry if the proxy never took it.
use agent_common::{PeerKey, RULE_DNS};
use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie, macros::sock_ops, programs::SockOpsContext,
    EbpfContext,
};

use crate::{
    decide::mapped,
    maps::{BY_PEER, SOCK_STATE},
};

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
/// A state change of a socket that asked for them (`BPF_SOCK_OPS_STATE_CB_FLAG`): only
/// connections redirected to the proxy do.
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;
/// `TCP_CLOSE`: the connection is over (refused, reset, timed out, or closed).
const TCP_CLOSE: u32 = 7;
const AF_INET: u32 = 2;

/// Named `egress_sock_ops`, not `sockops`, which clashes with a symbol in bpf-linker.
#[sock_ops]
pub fn egress_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => remember_peer(&ctx),
        // args: old state, new state.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => forget_peer(&ctx),
        _ => {}
    }
    // sock_ops return values do not decide anything here; 1 = ok.
    1
}

#[inline(always)]
fn remember_peer(ctx: &SockOpsContext) {
    // SAFETY: context pointer from the kernel; `sk` may be null, checked below.
    let sk: *mut core::ffi::c_void = unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast();
    if sk.is_null() {
        return;
    }
    let Some(state) = SOCK_STATE.get(sk) else {
        // Not redirected. (An entry under the same source address and port may be
        // another socket's, waiting for the proxy to accept it: Linux gives one port to
        // connections to different peers.)
        return;
    };
    // Every TCP connect of the sandbox comes here: the rest only for a redirected one.
    // DNS over TCP goes to the resolver, which needs no original destination; keeping it
    // out of the shared `BY_PEER` stops a DNS flood from evicting other sandboxes' entries.
    if state.has_orig == 0 || state.orig.rule_id == RULE_DNS {
        return;
    }
    let addr = if ctx.family() == AF_INET {
        mapped(ctx.local_ip4().to_ne_bytes())
    } else {
        // Constant offsets only: the verifier refuses context reads through a computed pointer.
        // SAFETY: context pointer from the kernel.
        let words = unsafe {
            [
                core::ptr::read_volatile(&(*ctx.ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ctx.ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ctx.ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ctx.ops).local_ip6[3]),
            ]
        };
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = words[i].to_ne_bytes();
            addr[i * 4] = b[0];
            addr[i * 4 + 1] = b[1];
            addr[i * 4 + 2] = b[2];
            addr[i * 4 + 3] = b[3];
            i += 1;
        }
        addr
    };
    let key = PeerKey {
        // SAFETY: helper valid in sock_ops programs.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        // local_port is host order in sock_ops.
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    // State-change callbacks are asked for first (asking for these flags cannot fail), so
    // that whatever happens next the entry is removed when the connection is over, if
    // the proxy never took it: a refused connect leaves the socket open, and its source
    // free for another process of the namespace to bind.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG);
    if BY_PEER.insert(key, state.orig, 0).is_ok() {
        // The socket's storage exists (read above): writing it cannot fail.
        let _ = SOCK_STATE.update(sk, |state| {
            state.peer = key;
            state.has_peer = 1;
        });
    }
    // The socket keeps its original destination: getpeername on the sandbox's socket
    // still reports the destination it asked for.
}

/// Removes the `BY_PEER` entry of a redirected connection that is over, if it is still
/// this socket's (the proxy may have taken it, and the key been reused since).
#[inline(always)]
fn forget_peer(ctx: &SockOpsContext) {
    // SAFETY: context pointer from the kernel; `sk` may be null, checked below.
    let sk: *mut core::ffi::c_void = unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast();
    if sk.is_null() {
        return;
    }
    let pending = SOCK_STATE.update(sk, |state| {
        let key = (state.has_peer == 1).then_some(state.peer);
        state.has_peer = 0;
        key
    });
    if let Some(key) = pending.flatten() {
        crate::decide::forget_own_peer(key, ctx.as_ptr());
    }
}
