//! `egressctl`: attach sandboxes to `egressd`, detach, quarantine and release them, show
//! status, and check or test policy files offline.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use egress::{
    control::{self, Request, DEFAULT_SOCKET},
    policy,
};

#[derive(Parser)]
#[command(
    name = "egressctl",
    version,
    about = "Control egressd: confine sandbox cgroups with egress policies"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, env = "EGRESSD_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Confine a cgroup v2 directory with a policy (or replace the policy of a sandbox).
    #[command(group = clap::ArgGroup::new("target").required(true))]
    Attach {
        /// cgroup v2 directory of the sandbox: relative to the cgroup2 mount, or absolute;
        /// an absolute path that is not a directory there is taken relative to the mount,
        /// as `/proc/PID/cgroup` and `podman inspect` print it.
        #[arg(long, group = "target")]
        cgroup: Option<PathBuf>,
        /// A process of the sandbox: its cgroup and its network namespace are attached.
        #[arg(long, group = "target", conflicts_with = "netns")]
        pid: Option<u32>,
        /// Policy file (YAML).
        #[arg(long)]
        policy: PathBuf,
        /// Sandbox name shown in status and audit records [default: the cgroup's directory name].
        #[arg(long)]
        name: Option<String>,
        /// Network namespace of the sandbox, for the proxy listener and resolver (e.g.
        /// /var/run/netns/X or /proc/PID/ns/net) [default: that of a process in the cgroup;
        /// required when the cgroup is still empty and the policy proxies or names hosts].
        #[arg(long)]
        netns: Option<PathBuf>,
    },
    /// OCI runtime hook: confine a container at createRuntime, before its first
    /// instruction; release it at poststop. Reads the OCI state on standard input. Any
    /// failure exits non-zero, so the runtime does not start the container.
    OciHook {
        /// The hook stage this invocation is registered for.
        #[arg(value_enum)]
        stage: egress::oci::Stage,
        /// Host directory of policies; containers pick one by name with the
        /// `io.egressd.policy` annotation.
        #[arg(long, default_value = "/etc/egressd/policies")]
        policy_dir: PathBuf,
        /// Policy name for containers without the annotation [default: refuse them].
        #[arg(long)]
        default_policy: Option<String>,
        /// Seconds to wait for the daemon before refusing the container.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Kubernetes namespace whose containers are not confined (repeatable; the
        /// daemon's own namespace belongs here).
        #[arg(long = "exempt-namespace")]
        exempt_namespaces: Vec<String>,
        /// One sandbox per container, or per Kubernetes pod (the pod's cgroup).
        #[arg(long, value_enum, default_value = "container")]
        scope: egress::oci::Scope,
    },
    /// Remove a sandbox's confinement.
    #[command(group = clap::ArgGroup::new("which").required(true))]
    Detach {
        #[arg(long, group = "which")]
        name: Option<String>,
        #[arg(long, group = "which")]
        cgroup: Option<PathBuf>,
    },
    /// Switch a sandbox to deny-all at once: every connect and send is refused in the
    /// kernel, its proxied connections are closed, its DNS is refused, and the live values
    /// of its credentials are revoked where a revocation is configured. Lasts until
    /// `release`, also across daemon restarts.
    Quarantine {
        /// The sandbox's name.
        name: String,
        /// Why, for the audit record and `status`.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Give a quarantined sandbox its policy back.
    Release {
        /// The sandbox's name.
        name: String,
    },
    /// Print shell completions for egressctl (the build installs them).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print egressctl's man page (roff; the build installs it).
    #[command(hide = true)]
    Manpage,
    /// Show the daemon and every sandbox with its policy and counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The proxy's local certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check or test policy files without a daemon.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM) to install into sandbox images' trust stores.
    Export,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse and compile each file; report the first error of each.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run each file's `tests:` section.
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egressctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Attach {
            cgroup,
            pid,
            policy: path,
            name,
            netns,
        } => {
            let (cgroup, netns) = match (cgroup, pid) {
                (_, Some(pid)) => (
                    egress::cgroup::of_pid(pid)
                        .with_context(|| format!("finding the cgroup of process {pid}"))?,
                    Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
                ),
                (Some(c), None) => (c, netns),
                (None, None) => bail!("name the sandbox with --cgroup DIR or --pid PID"),
            };
            let source = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            // Check locally first for a fast, precise error; the daemon checks again.
            policy::parse_str(&source, &path.display().to_string())?;
            let req = Request::Attach {
                cgroup,
                name,
                policy_path: path.display().to_string(),
                policy_source: source,
                netns: netns.map(|p| std::path::absolute(&p).unwrap_or(p)),
            };
            respond(control::call(&cli.socket, &req)?)
        }
        Command::Detach { name, cgroup } => respond(control::call(
            &cli.socket,
            &Request::Detach {
                name,
                cgroup,
                reason: None,
            },
        )?),
        Command::Quarantine { name, reason } => respond(control::call(
            &cli.socket,
            &Request::Quarantine { name, reason },
        )?),
        Command::Release { name } => {
            respond(control::call(&cli.socket, &Request::Release { name })?)
        }
        Command::OciHook {
            stage,
            policy_dir,
            default_policy,
            timeout,
            exempt_namespaces,
            scope,
        } => {
            let opts = egress::oci::HookOptions {
                socket: cli.socket,
                policy_dir,
                default_policy,
                timeout: std::time::Duration::from_secs(timeout.max(1)),
                exempt_namespaces,
                scope,
            };
            let msg = egress::oci::run(stage, &opts, std::io::stdin().lock())?;
            // Runtimes show a hook's output in their logs; keep it to one line.
            eprintln!("egressctl oci-hook: {msg}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "egressctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::Export,
        } => {
            let resp = control::call(&cli.socket, &Request::CaExport)?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            print!("{}", resp.message.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let resp = control::call(&cli.socket, &Request::Status)?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            let Some(status) = resp.status else {
                bail!("egressd sent no status")
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!(
                    "egressd {} (pid {}), up since {}, audit log {}, kernel events lost: {}",
                    status.version,
                    status.pid,
                    status.started_at,
                    status.audit_log,
                    status.events_lost
                );
                if let Some(audit) = &status.audit {
                    if audit.healthy {
                        println!(
                            "audit trail: healthy ({} records lost since start)",
                            audit.lost
                        );
                    } else {
                        println!(
                            "audit trail: UNHEALTHY since {}: {} ({} records queued, {} lost)",
                            audit.failing_since.as_deref().unwrap_or("?"),
                            audit.error.as_deref().unwrap_or("writes fail"),
                            audit.queued,
                            audit.lost
                        );
                    }
                }
                if status.packet_sockets_covered {
                    println!("packet sockets: refused in sandboxes (BPF LSM)");
                } else {
                    println!(
                        "packet sockets: NOT COVERED ({}); sandboxes holding CAP_NET_RAW can send raw frames anywhere",
                        status.packet_sockets_note.as_deref().unwrap_or("unknown")
                    );
                }
                println!(
                    "{:<20} {:>10} {:<16} {:<8} {:>9} {:>9} {:>9} {:>10}  POLICY",
                    "SANDBOX",
                    "CGROUP ID",
                    "NETNS",
                    "DEFAULT",
                    "ALLOWED",
                    "DENIED",
                    "AUDITED",
                    "REDIRECTED"
                );
                for s in status.sandboxes {
                    println!(
                        "{:<20} {:>10} {:<16} {:<8} {:>9} {:>9} {:>9} {:>10}  {}{}",
                        s.name,
                        s.cgroup_id,
                        s.netns_inode
                            .map_or_else(|| "-".to_string(), |i| format!("net:[{i}]")),
                        s.default,
                        s.allowed,
                        s.denied,
                        s.audited,
                        s.redirected,
                        s.policy,
                        if s.hooks.len() < egress::bpf::HOOKS.len() {
                            "  (PARTIALLY ATTACHED)"
                        } else {
                            ""
                        }
                    );
                    if let Some(q) = &s.quarantine {
                        println!(
                            "{:<20} QUARANTINED since {} by {}{}",
                            "",
                            q.since,
                            q.trigger,
                            q.reason
                                .as_deref()
                                .map(|r| format!(": {r}"))
                                .unwrap_or_default()
                        );
                    }
                    let risky: Vec<&str> = s
                        .capabilities
                        .iter()
                        .map(String::as_str)
                        .filter(|c| egress::posture::RISKY.contains(c))
                        .collect();
                    if !risky.is_empty() {
                        println!(
                            "  posture: {} process(es) hold {}{}",
                            s.processes,
                            risky.join(", "),
                            if s.can_leave_cgroup {
                                " (can leave its cgroup)"
                            } else {
                                ""
                            }
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Check { files },
        } => {
            let mut failed = false;
            for f in files {
                match policy::load_file(&f) {
                    Ok(p) => println!(
                        "{}: ok ({} rules, default {})",
                        f.display(),
                        p.rules().len(),
                        p.default_action()
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Policy {
            command: PolicyCommand::Test { files },
        } => {
            let mut failed = 0usize;
            let mut total = 0usize;
            for f in files {
                let p = match policy::load_file(&f) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("{e}");
                        failed += 1;
                        continue;
                    }
                };
                for outcome in p.run_tests() {
                    total += 1;
                    if outcome.passed {
                        println!("{}: {outcome}", f.display());
                    } else {
                        println!("{}: {outcome}", f.display());
                        failed += 1;
                    }
                }
            }
            println!("{total} policy tests, {failed} failed");
            Ok(if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn respond(resp: control::Response) -> anyhow::Result<ExitCode> {
    if resp.ok {
        if let Some(m) = resp.message {
            println!("{m}");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        bail!(
            "{}",
            resp.error
                .unwrap_or_else(|| "egressd refused the request".into())
        )
    }
}
