//! Host-side library target of the eBPF crate. Empty: it exists so `agent-userspace` can
//! declare a build-dependency that makes cargo rebuild the programs when they change.
#![no_std]
