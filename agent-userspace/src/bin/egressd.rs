//! `egressd`: the privileged daemon that confines sandbox cgroups.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use egress::{
    alerts::{AlertSettings, RawAlerts},
    audit::AuditConfig,
    control::DEFAULT_SOCKET,
    credentials::{CredentialStore, RawCredentials, UpstreamOptions},
    daemon::{self, DaemonOptions},
    proxy::ProxyConfig,
};
use serde::Deserialize;

#[derive(Parser)]
#[command(
    name = "egressd",
    version,
    about = "Confine sandbox cgroups' network egress with eBPF and audit every decision"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (as root).
    Run(RunArgs),
    /// Print shell completions for egressd (the build installs them).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print egressd's man page (roff; the build installs it).
    #[command(hide = true)]
    Manpage,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Daemon configuration file (YAML); command-line options override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Audit log file (JSONL), or `-` for stdout [default: /var/log/egressd/audit.jsonl].
    #[arg(long)]
    audit_log: Option<String>,
    /// Control socket [default: /run/egressd/egressd.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Directory on bpffs for pinned maps and links [default: /sys/fs/bpf/egressd].
    #[arg(long)]
    bpffs: Option<PathBuf>,
    /// Directory for the daemon's state [default: /var/lib/egressd].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// `--config` file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// Audit log path, or `-` for stdout.
    audit_log: Option<String>,
    /// Control socket path.
    socket: Option<PathBuf>,
    /// bpffs directory for pins.
    bpffs: Option<PathBuf>,
    /// State directory.
    state_dir: Option<PathBuf>,
    /// Address to serve Prometheus metrics on (`/metrics`); off when unset.
    metrics: Option<std::net::SocketAddr>,
    /// Also ship every audit record to a syslog collector (RFC 5424 over TCP).
    collector: Option<egress::collector::CollectorConfig>,
    /// Port of the proxy listener on each sandbox's loopback (default 15001).
    proxy_port: Option<u16>,
    /// A sandbox's DNS resolver listens on this port plus its index (default 15300).
    dns_port_base: Option<u16>,
    /// Resolvers asked for sandboxes whose policy has no `dns:` section: addresses, port 53
    /// unless given (`192.0.2.53`, `192.0.2.53:5353`, `[2001:db8::53]:53`).
    #[serde(default)]
    dns_upstream: Vec<egress::policy::raw::RawUpstream>,
    /// Proxy timeouts, per-sandbox limits and the extra upstream CA bundle.
    #[serde(default)]
    proxy: ProxyConfig,
    /// What happens while the audit log cannot be written, and built-in rotation.
    #[serde(default)]
    audit: AuditConfig,
    /// Credentials the proxy injects, by name. Never put in sandbox policies.
    #[serde(default, deserialize_with = "egress::unique_keys::map")]
    credentials: RawCredentials,
    /// Alert responses and denial-burst figures for sandboxes whose policy does not set
    /// them (same keys as a policy's `alerts:`).
    #[serde(default)]
    alerts: RawAlerts,
}

fn options(args: RunArgs) -> anyhow::Result<DaemonOptions> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            serde_yaml_ng::from_str::<ConfigFile>(&text).map_err(|e| {
                let at = e
                    .location()
                    .map(|l| format!(":{}:{}", l.line(), l.column()))
                    .unwrap_or_default();
                let message = egress::text::strip_positions(&e.to_string());
                anyhow::anyhow!("{}{at}: {message}", path.display())
            })?
        }
        None => ConfigFile::default(),
    };
    let config_name = args
        .config
        .as_ref()
        .map_or_else(|| "configuration".to_string(), |p| p.display().to_string());
    file.audit
        .validate()
        .map_err(|e| anyhow::anyhow!("{config_name}: audit: {e}"))?;
    // Relative paths would depend on the directory the daemon was started from, and
    // `egressctl audit --config` would read another file than the daemon writes.
    let absolute = |field: &str, path: Option<&Path>| match path {
        // `-` is stdout, for the audit log only.
        Some(p) if field == "audit_log" && p == Path::new("-") => Ok(()),
        Some(p) if !p.is_absolute() => Err(anyhow::anyhow!(
            "{config_name}: {field}: {} is a relative path; give an absolute one",
            p.display()
        )),
        _ => Ok(()),
    };
    absolute(
        "audit_log",
        args.audit_log
            .as_deref()
            .or(file.audit_log.as_deref())
            .map(Path::new),
    )?;
    absolute("socket", args.socket.as_deref().or(file.socket.as_deref()))?;
    absolute("bpffs", args.bpffs.as_deref().or(file.bpffs.as_deref()))?;
    absolute(
        "state_dir",
        args.state_dir.as_deref().or(file.state_dir.as_deref()),
    )?;
    absolute("proxy.upstream_ca", file.proxy.upstream_ca.as_deref())?;
    absolute("proxy.upstream_netns", file.proxy.upstream_netns.as_deref())?;
    if file.collector.as_ref().is_some_and(|c| c.queue == 0) {
        anyhow::bail!("{config_name}: collector.queue: 0 holds no record; give at least 1");
    }
    let proxy_port = file.proxy_port.unwrap_or(15001);
    let dns_port_base = file.dns_port_base.unwrap_or(15300);
    check_ports(proxy_port, dns_port_base).map_err(|e| anyhow::anyhow!("{config_name}: {e}"))?;
    Ok(DaemonOptions {
        audit: file.audit,
        audit_log: args
            .audit_log
            .or(file.audit_log)
            .unwrap_or_else(|| "/var/log/egressd/audit.jsonl".into()),
        socket: args
            .socket
            .or(file.socket)
            .unwrap_or_else(|| DEFAULT_SOCKET.into()),
        bpffs: args
            .bpffs
            .or(file.bpffs)
            .unwrap_or_else(|| "/sys/fs/bpf/egressd".into()),
        state_dir: args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| "/var/lib/egressd".into()),
        proxy_port,
        dns_port_base,
        dns_upstream: file.dns_upstream.into_iter().map(|u| u.0).collect(),
        credentials: CredentialStore::from_config_with(
            &file.credentials,
            &UpstreamOptions::new(
                file.proxy.upstream_ca.as_deref(),
                file.proxy.upstream_netns.as_deref(),
            )
            .map_err(|e| anyhow::anyhow!("{config_name}: proxy: {e}"))?,
        )
        .map_err(|e| anyhow::anyhow!("{config_name}: credentials: {e}"))?,
        alerts: AlertSettings::compile(&file.alerts)
            .map_err(|e| anyhow::anyhow!("{config_name}: alerts.{}: {}", e.field, e.message))?,
        proxy: file.proxy,
        metrics: args.metrics.or(file.metrics),
        collector: file.collector,
        proxy_threads: egress::proxy::configured_threads().map_err(anyhow::Error::msg)?,
    })
}

/// The proxy's port and the resolvers' ports (one per sandbox from `dns_port_base`) must
/// be ports, and apart: the kernel programs read port 0 as "no proxy" or "no resolver
/// range" (proxy rules would deny everything, resolver ports would go unguarded), and a
/// resolver's port that is the proxy's fails only when that sandbox is attached.
fn check_ports(proxy_port: u16, dns_port_base: u16) -> Result<(), String> {
    if proxy_port == 0 {
        return Err("proxy_port: 0 is not a port (1 to 65535)".to_owned());
    }
    let sandboxes = agent_common::MAX_SANDBOXES;
    let last = u32::from(dns_port_base) + sandboxes - 1;
    if dns_port_base == 0 || last > u32::from(u16::MAX) {
        return Err(format!(
            "dns_port_base: {dns_port_base} leaves no room for {sandboxes} resolvers' ports \
             (use 1 to {})",
            u32::from(u16::MAX) + 1 - sandboxes
        ));
    }
    if (u32::from(dns_port_base)..=last).contains(&u32::from(proxy_port)) {
        return Err(format!(
            "proxy_port: {proxy_port} is among the resolvers' ports ({dns_port_base} to \
             {last}, from dns_port_base)"
        ));
    }
    Ok(())
}

/// Raises the soft limit on open files as far as it goes: every proxied connection, DNS
/// socket and control connection is a descriptor, and the per-sandbox and control-socket
/// caps are what keep one client from using them all, not this limit.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "Reading the open-file limit failed");
        return;
    }
    let before = lim.rlim_cur;
    // Root may raise the hard limit up to fs.nr_open.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(lim.rlim_max);
    let want = nr_open.clamp(lim.rlim_max, 1 << 20);
    for target in [want, lim.rlim_max] {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: target.max(lim.rlim_max),
        };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            tracing::info!(before, now = target, "Open-file limit raised");
            return;
        }
    }
    tracing::warn!(limit = before, error = %std::io::Error::last_os_error(), "Could not raise the open-file limit");
}

/// jemalloc, with background threads that return freed memory to the system: measured
/// against glibc's malloc (which kept the memory of closed connections) and mimalloc,
/// it keeps idle proxied connections smallest and gives their memory back after they
/// close (BENCHMARKS.md, Memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The runtime's worker threads: `EGRESSD_WORKER_THREADS` (1 to 64), default 2.
fn worker_threads() -> anyhow::Result<usize> {
    Ok(egress::proxy::threads_setting("EGRESSD_WORKER_THREADS")
        .map_err(anyhow::Error::msg)?
        .unwrap_or(2))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(egress::daemon::log::LogLine::new)
        // Plain text: every control character in a line is escaped on the way out.
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = match Cli::parse().command {
        Command::Run(args) => args,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "egressd", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            return match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("egressd: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "egressd: must run as root (it loads eBPF programs and attaches them to cgroups)"
        );
        return ExitCode::FAILURE;
    }
    // Its memory holds credentials: no core dump of it, and no ptrace or /proc/PID/mem
    // by anything short of CAP_SYS_PTRACE.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        eprintln!(
            "egressd: cannot make itself non-dumpable: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    // Nor of the programs it runs (a `command` source printing a secret, a revoke hook
    // reading one): `exec` makes a process dumpable again, but the core size limit is
    // inherited, whatever the service manager or container runtime set.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct it is given, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        eprintln!(
            "egressd: cannot turn core dumps off: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    raise_nofile_limit();
    let result = options(args).and_then(|opts| {
        let workers = worker_threads()?;
        // Before anything is loaded, adopted or numbered, and held until the last record
        // is written (past the runtime's shutdown below).
        let claim = daemon::claim_for(&opts)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?;
        // A panic of the daemon's own task (not of a connection's or a query's, which the
        // runtime contains and their records account for) ends the process at once:
        // unwinding would drop the runtime, which waits for the audit writer, which the
        // proxy's worker threads keep open, so the process would hang on, still proxying,
        // with no kernel events read. The pinned programs keep enforcing; the service
        // manager starts the daemon again, which reports the unclean stop.
        let run = std::panic::AssertUnwindSafe(|| runtime.block_on(daemon::run(opts, &claim)));
        let Ok(result) = std::panic::catch_unwind(run) else {
            // Not `eprintln!`, which panics when stderr is gone.
            let _ = writeln!(
                std::io::stderr(),
                "egressd: the daemon's main task panicked (above); exiting now so that it is \
                 restarted (sandboxes stay confined by their pinned programs)"
            );
            std::process::exit(70);
        };
        // The stop waited for the audit writer already (boundedly); a writer still held
        // (its last records then count the stop as unclean) must not hold the exit.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        drop(claim);
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egressd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{check_ports, ConfigFile};

    #[test]
    fn dns_upstream_takes_addresses_as_policies_do() {
        let file: ConfigFile = serde_yaml_ng::from_str(
            "dns_upstream: [192.0.2.53, \"192.0.2.54:5353\", \"2001:db8::53\"]\n",
        )
        .unwrap_or_default();
        let got: Vec<String> = file.dns_upstream.iter().map(|u| u.0.to_string()).collect();
        assert_eq!(
            got,
            ["192.0.2.53:53", "192.0.2.54:5353", "[2001:db8::53]:53"]
        );
        let Err(e) = serde_yaml_ng::from_str::<ConfigFile>("dns_upstream: [resolver.example]\n")
        else {
            unreachable!("a name was taken as a resolver")
        };
        assert!(e.to_string().contains("is a name"), "{e}");
    }

    #[test]
    fn ports_are_ports_and_apart() {
        assert_eq!(check_ports(15001, 15300), Ok(()));
        assert_eq!(check_ports(16400, 15300), Ok(()));
        let refused = |proxy, base| check_ports(proxy, base).err().unwrap_or_default();
        assert!(refused(0, 15300).starts_with("proxy_port: 0 is not a port"));
        assert!(refused(15001, 0).starts_with("dns_port_base: 0 leaves no room"));
        assert!(refused(15001, 65000).contains("use 1 to 64512"));
        assert!(refused(15301, 15300).contains("among the resolvers' ports (15300 to 16323"));
        assert!(refused(16323, 15300).contains("among the resolvers' ports"));
    }
}
