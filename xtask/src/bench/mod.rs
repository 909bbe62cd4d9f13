//! `cargo xtask bench ...`: benchmarks. Each runs the things it compares side by side in
//! one run on this machine, prints a table, and removes everything it made (namespaces,
//! cgroups, pins, files), also on error or Ctrl-C.
//!
//! - `connect` ([`connect`]): what confinement costs a `connect()`.
//! - `proxy` ([`proxy`]): HTTPS through egressd's credential-injecting proxy versus
//!   straight to the origin and versus nginx as a TLS-terminating reverse proxy.
mod connect;
mod proxy;

use std::net::SocketAddr;

#[derive(clap::Subcommand)]
pub enum Which {
    /// connect() latency inside an attached sandbox versus outside.
    Connect {
        /// Connects per round per side.
        #[arg(long, default_value_t = 5000)]
        connects: usize,
        /// Rounds (each runs outside, then inside).
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Connects in the audit-pipeline case (two workers inside the sandbox at once).
        /// Keep it under the ephemeral port range (~28k): past it, connect() itself slows
        /// down searching for a port while earlier connections sit in TIME_WAIT.
        #[arg(long, default_value_t = 20_000)]
        flood: usize,
        /// Measure the release build (as users run it); the default debug build is labelled.
        #[arg(long)]
        release: bool,
    },
    /// HTTPS req/s, latency and CPU per request through egressd's proxy, straight to the
    /// origin, and through nginx (and mitmproxy) as reverse proxies; memory per held
    /// connection (needs nginx, wrk, h2load, curl, openssl, python3).
    Proxy(proxy::Args),
    /// Internal: the measuring client (run by `bench connect`).
    #[command(hide = true)]
    ConnectWorker { addr: SocketAddr, connects: usize },
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Connect {
            connects,
            rounds,
            flood,
            release,
        } => connect::run(connects, rounds, flood, release),
        Which::Proxy(args) => proxy::run(&args),
        Which::ConnectWorker { addr, connects } => connect::worker(addr, connects),
    }
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank; 0 when there are none.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
