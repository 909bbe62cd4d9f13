//! `egressctl`: attach sandboxes to `egressd`, detach, quarantine and release them, show
//! status, check or test policy files offline, and read the audit log.
use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use egress::{
    control::{self, Request, DEFAULT_SOCKET},
    observe, policy,
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
        /// Sandbox name shown in status and audit records: 1-64 ASCII letters, digits and
        /// `. _ - / : @ +` [default: the cgroup's directory name].
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
        /// Seconds to wait for the daemon before refusing the container (1 to 3600).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
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
        /// The sandbox's name (as `egressctl status` lists it).
        #[arg(long, group = "which")]
        name: Option<String>,
        /// The sandbox's cgroup directory.
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
    /// Show the daemon and every sandbox with its policy and counters (asked from inside a
    /// sandbox: that sandbox only).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List each credential the daemon holds: kind, source, hosts, last fetch, expiry,
    /// last error and the sandboxes using it. Never a value.
    Credentials {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's placeholder for a `placeholder` credential: give it to the
    /// sandbox (an environment variable, a config file); the proxy replaces it with the
    /// credential's value on requests to the credential's hosts.
    Placeholder {
        /// The sandbox's name.
        sandbox: String,
        /// The credential's name (its `inject:` is `{ placeholder: {} }`).
        credential: String,
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
    /// Read the audit log: one line per record, filtered.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print the records in the log that match, then exit.
    Show(AuditArgs),
    /// Print new records as they are written, following rotations (with --since: first
    /// the matching records already there).
    Follow(AuditArgs),
}

#[derive(clap::Args)]
struct AuditArgs {
    /// Only this sandbox's records.
    #[arg(long, value_name = "NAME")]
    sandbox: Option<String>,
    /// Only records with this verdict: allow, deny, audit or redirect.
    #[arg(long, value_parser = observe::parse_verdict)]
    verdict: Option<String>,
    /// Only records of this kind: an event.action (connect, dns-query, http-request,
    /// secret-outbound, ...), `alert`, or a group: network (every kernel decision and
    /// connection-cut), dns, proxy, http, lifecycle (daemon and sandbox start, stop,
    /// attach, detach, adopt, quarantine, release; credential-revoke), policy.
    #[arg(long, value_name = "K", value_parser = observe::parse_kind)]
    kind: Option<String>,
    /// Only records at or after T: RFC 3339 (2026-11-21T22:03:04Z) or a duration ago (30s, 10m, 2h, 1d).
    #[arg(long, value_name = "T")]
    since: Option<String>,
    /// Print the matching records as they are in the log (JSON lines).
    #[arg(long)]
    json: bool,
    /// The audit log [default: `audit_log` of --config, else /var/log/egressd/audit.jsonl].
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// The daemon's config file, to find its audit log.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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
        /// Policy files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run each file's `tests:` section.
    Test {
        /// Policy files (YAML).
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
            // The daemon checks the policy and records a refusal (`policy-rejected`),
            // whatever its reason: a policy that does not parse goes to it too. The local
            // check speaks only when the daemon cannot be asked.
            let checked = policy::parse_str(&source, &path.display().to_string());
            let req = Request::Attach {
                cgroup,
                name,
                policy_path: path.display().to_string(),
                policy_source: source,
                netns: netns.map(|p| std::path::absolute(&p).unwrap_or(p)),
                runtime_init: None,
            };
            match (control::call(&cli.socket, &req), checked) {
                (Ok(response), _) => respond(response),
                (Err(e), Ok(_)) => Err(e),
                (Err(e), Err(refused)) => bail!(
                    "{refused}\n(egressd did not answer, so this refusal may not be in the \
                     audit log: {e:#})"
                ),
            }
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
                timeout: std::time::Duration::from_secs(timeout),
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
        Command::Credentials { json } => {
            let resp = control::call(&cli.socket, &Request::Credentials)?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            let Some(states) = resp.credentials else {
                bail!("egressd sent no credentials")
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&states)?);
            } else {
                print!("{}", credentials_table(&states));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Placeholder {
            sandbox,
            credential,
        } => {
            let resp = control::call(
                &cli.socket,
                &Request::Placeholder {
                    sandbox,
                    credential,
                },
            )?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            println!("{}", resp.message.unwrap_or_default());
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
                if !status.compat_setsockopt_covered {
                    println!(
                        "32-bit setsockopt: NOT COVERED ({})",
                        status
                            .compat_setsockopt_note
                            .as_deref()
                            .unwrap_or("unknown")
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
                        shown(&s.name),
                        s.cgroup_id,
                        s.netns_inode
                            .map_or_else(|| "-".to_string(), |i| format!("net:[{i}]")),
                        s.default,
                        s.allowed,
                        s.denied,
                        s.audited,
                        s.redirected,
                        shown(&s.policy),
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
                                .map(|r| format!(": {}", shown(r)))
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
        Command::Audit { command } => audit(command),
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
                let p = match policy::load_file_untested(&f) {
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

/// Where the daemon writes its audit log by default.
const DEFAULT_AUDIT_LOG: &str = "/var/log/egressd/audit.jsonl";

fn audit_log_path(args: &AuditArgs) -> anyhow::Result<PathBuf> {
    if let Some(file) = &args.file {
        return Ok(file.clone());
    }
    let Some(config) = &args.config else {
        return Ok(DEFAULT_AUDIT_LOG.into());
    };
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    match doc.get("audit_log") {
        None => Ok(DEFAULT_AUDIT_LOG.into()),
        Some(serde_yaml_ng::Value::String(s)) if s == "-" => bail!(
            "{}: audit_log is `-` (stdout): read it where the daemon's stdout goes",
            config.display()
        ),
        Some(serde_yaml_ng::Value::String(s)) => Ok(s.into()),
        Some(_) => bail!("{}: audit_log must be a path", config.display()),
    }
}

/// How often `audit follow` looks for new records.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);

fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    let (follow, args) = match command {
        AuditCommand::Show(a) => (false, a),
        AuditCommand::Follow(a) => (true, a),
    };
    let path = audit_log_path(&args)?;
    let since = args
        .since
        .as_deref()
        .map(|s| observe::parse_since(s, time::OffsetDateTime::now_utc()))
        .transpose()?;
    let filter = observe::Filter {
        sandbox: args.sandbox,
        verdict: args.verdict,
        kind: args.kind,
        since,
    };
    let start = if follow && since.is_none() {
        observe::Start::End
    } else {
        observe::Start::Beginning
    };
    let mut follower = observe::Follower::open(&path, start)
        .with_context(|| format!("opening {}", path.display()))?;
    if !follow && !path.exists() {
        bail!("{}: no such file", path.display());
    }
    if follow {
        // On stderr, so that stdout carries records only.
        eprintln!(
            "egressctl: following {}{}",
            path.display(),
            if path.exists() {
                ""
            } else {
                " (not there yet)"
            }
        );
    }
    let mut out = std::io::stdout().lock();
    loop {
        let lines = follower
            .poll()
            .with_context(|| format!("reading {}", path.display()))?;
        let caught_up = lines.is_empty();
        for line in lines {
            if let Some(text) = observe::render(&line, &filter, args.json) {
                if writeln!(out, "{text}").is_err() {
                    // The reader went away (e.g. `| head`): nothing left to do.
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        if !caught_up {
            continue;
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        if out.flush().is_err() {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(FOLLOW_POLL);
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

/// Text a sandbox or pod author may have chosen (a sandbox name from an annotation, a
/// quarantine reason quoting a cgroup name), as a terminal shows it harmlessly: control,
/// bidirectional and zero-width characters escaped.
fn shown(s: &str) -> String {
    egress::text::sanitize(s, 4096)
}

/// `egressctl credentials` as a table: one line per credential, then its last error.
fn credentials_table(states: &[egress::credentials::CredentialState]) -> String {
    // Every cell as the terminal should show it: what a store answered (an error, a
    // detail) may carry characters that reorder or hide text.
    let dash = |s: &Option<String>| s.as_deref().map_or_else(|| "-".to_owned(), shown);
    let rows: Vec<[String; 8]> = states
        .iter()
        .map(|c| {
            [
                shown(&c.name),
                shown(&c.kind),
                shown(&c.source),
                shown(&c.hosts.join(",")),
                dash(&c.last_fetch),
                dash(&c.expires),
                if c.sandboxes.is_empty() {
                    "-".to_owned()
                } else {
                    shown(&c.sandboxes.join(","))
                },
                dash(&c.detail),
            ]
        })
        .collect();
    let header = [
        "CREDENTIAL",
        "KIND",
        "SOURCE",
        "HOSTS",
        "LAST FETCH",
        "EXPIRES",
        "SANDBOXES",
        "DETAIL",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[&str], out: &mut String| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header, &mut out);
    for (row, state) in rows.iter().zip(states) {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells, &mut out);
        if let Some(error) = &state.last_error {
            out.push_str(&format!("  last error: {}\n", shown(error)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_sandbox_chose_cannot_drive_the_terminal() {
        let state = egress::credentials::CredentialState {
            name: "github".to_owned(),
            kind: "header".to_owned(),
            source: "file".to_owned(),
            hosts: vec!["api.github.com".to_owned()],
            last_fetch: None,
            expires: None,
            // What a secret store answered: shown escaped too.
            last_error: Some("denied\u{202e}\u{200b} by policy".to_owned()),
            detail: Some("role\u{2066}x".to_owned()),
            sandboxes: vec!["agent\u{1b}]0;owned\u{7}\u{202e}x".to_owned()],
        };
        let table = credentials_table(&[state]);
        assert!(
            !table.contains('\u{1b}')
                && !table.contains('\u{202e}')
                && !table.contains('\u{200b}')
                && !table.contains('\u{2066}'),
            "{table}"
        );
        assert!(table.contains("last error: denied\\u{202e}"), "{table}");
        assert!(table.contains("agent\\u{1b}]0;owned"), "{table}");
        assert_eq!(shown("plain-name"), "plain-name");
    }
}
