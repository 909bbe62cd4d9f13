//! The daemon's control socket: a root-only Unix socket speaking one JSON request and one
//! JSON response per line. `egressctl` is its client; container-runtime hooks can be too.
mod client;
mod protocol;
mod server;

pub use client::{call, call_timeout};
pub use protocol::{
    decode_request, DaemonStatus, DetachReason, QuarantineStatus, Request, Response, RuntimeInit,
    SandboxStatus,
};
pub use server::{bind, check_free, serve, Admission, Handler};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/egressd/egressd.sock";
