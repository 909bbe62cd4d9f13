//! `egressctl`: attach sandboxes to `egressd`, detach them, show status, and check or test
//! policy files offline.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
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
    Attach {
        /// cgroup v2 directory of the sandbox (absolute, or relative to the cgroup2 mount).
        #[arg(long)]
        cgroup: PathBuf,
        /// Policy file (YAML).
        #[arg(long)]
        policy: PathBuf,
        /// Sandbox name shown in status and audit records [default: the cgroup's directory name].
        #[arg(long)]
        name: Option<String>,
        /// Network namespace of the sandbox, for the proxy listener (e.g. /var/run/netns/X
        /// or /proc/PID/ns/net) [default: that of a process in the cgroup].
        #[arg(long)]
        netns: Option<PathBuf>,
    },
    /// Remove a sandbox's confinement.
    #[command(group = clap::ArgGroup::new("which").required(true))]
    Detach {
        #[arg(long, group = "which")]
        name: Option<String>,
        #[arg(long, group = "which")]
        cgroup: Option<PathBuf>,
    },
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
            policy: path,
            name,
            netns,
        } => {
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
            &Request::Detach { name, cgroup },
        )?),
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
                if status.packet_sockets_covered {
                    println!("packet sockets: refused in sandboxes (BPF LSM)");
                } else {
                    println!(
                        "packet sockets: NOT COVERED ({}); sandboxes holding CAP_NET_RAW can send raw frames anywhere",
                        status.packet_sockets_note.as_deref().unwrap_or("unknown")
                    );
                }
                println!(
                    "{:<20} {:>10} {:<8} {:>9} {:>9} {:>9} {:>10}  POLICY",
                    "SANDBOX", "CGROUP ID", "DEFAULT", "ALLOWED", "DENIED", "AUDITED", "REDIRECTED"
                );
                for s in status.sandboxes {
                    println!(
                        "{:<20} {:>10} {:<8} {:>9} {:>9} {:>9} {:>10}  {}{}",
                        s.name,
                        s.cgroup_id,
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
