//! `cargo xtask bench ...`: benchmarks. Each runs the things it compares side by side in
//! one run on this machine, prints a table, and removes everything it made (namespaces,
//! cgroups, pins, files), also on error or Ctrl-C.
//!
//! - `connect` ([`connect`]): what confinement costs a `connect()`.
//! - `proxy` ([`proxy`]): HTTPS through egressd's credential-injecting proxy versus
//!   straight to the origin and versus nginx as a TLS-terminating reverse proxy.
mod audit;
mod connect;
mod proxy;

use std::net::SocketAddr;

#[derive(clap::Subcommand)]
pub enum Which {
    /// connect() latency inside an attached sandbox versus outside.
    Connect {
        /// Connects per round per side.
        #[arg(long, default_value_t = 1000)]
        connects: usize,
        /// Rounds (each runs outside, then inside): many short ones, so that the machine's
        /// drift between rounds falls on both sides alike.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Connects in the audit-pipeline case (two workers inside the sandbox at once).
        /// Keep it under the ephemeral port range (~28k): past it, connect() itself slows
        /// down searching for a port while earlier connections sit in TIME_WAIT.
        #[arg(long, default_value_t = 20_000)]
        flood: usize,
        /// Rates (events per second, comma-separated) of the UDP audit-pipeline ladder,
        /// climbed until a rate loses a record; `--audit-rates` alone skips it.
        #[arg(
            long,
            value_delimiter = ',',
            num_args = 0..,
            default_value = "50000,100000,150000,200000,300000"
        )]
        audit_rates: Vec<u64>,
        /// Seconds per rate of the ladder.
        #[arg(long, default_value_t = 1.0)]
        audit_secs: f64,
        /// Workers sharing each rate of the ladder.
        #[arg(long, default_value_t = 2)]
        audit_workers: u64,
        /// Measure the release build (as users run it); the default debug build is labelled.
        #[arg(long)]
        release: bool,
        /// Diagnostic: stop the daemon (SIGSTOP) during the inside latency rounds, so they
        /// show what the kernel programs cost without the daemon's work on the same cores
        /// (events wait in the ring buffer; the records come once it continues).
        #[arg(long)]
        pause_daemon: bool,
    },
    /// HTTPS req/s, latency and CPU per request through egressd's proxy, straight to the
    /// origin, and through nginx (and mitmproxy) as reverse proxies; memory per held
    /// connection (needs nginx, wrk, h2load, curl, openssl, python3).
    Proxy(proxy::Args),
    /// Internal: the measuring client (run by `bench connect`).
    #[command(hide = true)]
    ConnectWorker { addr: SocketAddr, connects: usize },
    /// Internal: a paced UDP connect() loop (run by `bench connect`).
    #[command(hide = true)]
    AuditWorker {
        addr: SocketAddr,
        count: u64,
        rate: u64,
    },
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Connect {
            connects,
            rounds,
            flood,
            audit_rates,
            audit_secs,
            audit_workers,
            release,
            pause_daemon,
        } => connect::run(
            connects,
            rounds,
            &connect::AuditOpts {
                flood,
                rates: audit_rates,
                secs: audit_secs,
                workers: audit_workers,
            },
            release,
            pause_daemon,
        ),
        Which::Proxy(args) => proxy::run(&args),
        Which::ConnectWorker { addr, connects } => connect::worker(addr, connects),
        Which::AuditWorker { addr, count, rate } => audit::worker(addr, count, rate),
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
