//! Kernel programs that confine sandbox cgroups.
//!
//! Each program is attached to every sandbox's cgroup v2 directory and decides every
//! `connect()` (TCP and connected UDP) and every unconnected UDP `sendmsg()` against the
//! sandbox's compiled rules, writes the decision to the ring buffer, and returns the verdict.
//! The verdict never depends on whether the event could be delivered, and every error path
//! denies.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The atomic add of per-CPU counters (`decide::bump`) is written as BPF assembly.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod bind;
mod connect4;
mod connect6;
mod decide;
mod lsm;
mod maps;
mod recvmsg;
mod sendmsg4;
mod sendmsg6;
mod sk_storage;
mod skb;
mod sock_create;
mod sock_ops;
mod sock_release;
mod sockopt;
mod sysctl;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Built for the host only so `cargo build --workspace` works; the programs run in the kernel.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
