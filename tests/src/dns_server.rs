//! The world's authoritative DNS server: dnsmasq (Debian `dnsmasq-base`) in the world
//! namespace, answering for the test bed's names from its command line only.
//!
//! It runs in the foreground (`--no-daemon`, so the pid the harness holds is dnsmasq's
//! and it is killed by that pid on drop) with `--conf-file=/dev/null --no-resolv
//! --no-hosts`: it reads neither this machine's configuration nor its resolver or hosts
//! file, and it never forwards anything (it has no upstream servers). It binds one
//! address in the world ([`DNS_V4`] by default, added to the world by [`DnsServer::start`])
//! with `--bind-interfaces`, so it never listens anywhere else.
//!
//! Each [`Answer::Addr`] becomes `--address=/<name>/<ip>` (which also answers every name
//! below `<name>`, the longest configured suffix winning) plus `--local=/<name>/`, so a
//! question of the other address family gets an empty NOERROR answer rather than
//! REFUSED, and `--host-record=<name>,<ip>` so that an [`Answer::Cname`] (`--cname`) may
//! point at it. Every answer carries the TTL `--local-ttl`.
//!
//! `--log-queries` writes one line per question to a log file (`query[A] <name> from
//! <client>`): [`DnsServer::asked`] is how a test proves a name never reached the world.
//! Readiness is checked with `dig` in the world namespace for [`READY_NAME`], a name no
//! test asks about.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::util::{kill_with_parent, poll, which, ChildGuard, TempDir};
use crate::world::World;

/// The world's DNS server address.
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

/// The name the readiness check asks for (answered with the server's own address).
pub const READY_NAME: &str = "ready.dnsmasq.test";

/// Bound on waiting for dnsmasq to answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One configured answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `name` (and every name below it) is `addr`.
    Addr { name: String, addr: IpAddr },
    /// `name` is a CNAME of `target`, which must be the name of an [`Answer::Addr`]
    /// (dnsmasq only points CNAMEs at names it knows exactly).
    Cname { name: String, target: String },
}

impl Answer {
    pub fn new(name: &str, addr: IpAddr) -> Self {
        Self::Addr {
            name: name.to_string(),
            addr,
        }
    }

    pub fn cname(name: &str, target: &str) -> Self {
        Self::Cname {
            name: name.to_string(),
            target: target.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Addr { name, .. } | Self::Cname { name, .. } => name,
        }
    }
}

/// One line of dnsmasq's query log: `query[<qtype>] <name> from <client>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedQuery {
    pub qtype: String,
    /// As received (dnsmasq keeps the client's letter case).
    pub name: String,
    pub from: String,
}

/// dnsmasq in a namespace, killed (by its pid) on drop.
#[derive(Debug)]
pub struct DnsServer {
    child: ChildGuard,
    dir: TempDir,
    listen: IpAddr,
    ttl: u32,
}

/// Why the DNS tests cannot run here (dnsmasq or dig missing), or `None`.
pub fn missing_tools() -> Option<String> {
    let missing: Vec<&str> = ["dnsmasq", "dig", "curl"]
        .into_iter()
        .filter(|t| which(t).is_none() && !PathBuf::from("/usr/sbin").join(t).is_file())
        .collect();
    (!missing.is_empty()).then(|| format!("not found: {}", missing.join(", ")))
}

/// `dnsmasq` from `PATH`, else `/usr/sbin/dnsmasq` (not in a non-root user's `PATH`).
fn dnsmasq_bin() -> PathBuf {
    which("dnsmasq").unwrap_or_else(|| PathBuf::from("/usr/sbin/dnsmasq"))
}

impl DnsServer {
    /// Adds [`DNS_V4`] to the world and serves `answers` there on port 53, every answer
    /// with TTL `ttl` seconds.
    pub fn start(world: &World, answers: &[Answer], ttl: u32) -> Result<Self> {
        world.add_host(IpAddr::V4(DNS_V4))?;
        Self::start_on(world.netns(), IpAddr::V4(DNS_V4), answers, ttl)
    }

    /// Serves `answers` on `listen`:53 (an address that already exists in `netns`).
    pub fn start_on(netns: &Netns, listen: IpAddr, answers: &[Answer], ttl: u32) -> Result<Self> {
        let dir = TempDir::new("dnsmasq")?;
        let log_path = dir.path().join("queries.log");
        let out_path = dir.path().join("dnsmasq.out");
        let mut args = vec![
            "--no-daemon".to_string(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--no-poll".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={listen}"),
            "--port=53".into(),
            "--pid-file=".into(),
            "--cache-size=0".into(),
            "--log-queries".into(),
            format!("--log-facility={}", log_path.display()),
            format!("--local-ttl={ttl}"),
            format!("--address=/{READY_NAME}/{listen}"),
            format!("--local=/{READY_NAME}/"),
        ];
        let mut locals: Vec<&str> = Vec::new();
        for a in answers {
            let name = a.name();
            if name.is_empty() || name.contains(['/', ' ', ',']) {
                bail!("bad DNS name {name:?} for dnsmasq");
            }
            match a {
                Answer::Addr { name, addr } => {
                    args.push(format!("--address=/{name}/{addr}"));
                    // Also known exactly, so that a CNAME may point at it.
                    args.push(format!("--host-record={name},{addr}"));
                    if !locals.contains(&name.as_str()) {
                        locals.push(name);
                    }
                }
                Answer::Cname { name, target } => {
                    if !answers
                        .iter()
                        .any(|t| matches!(t, Answer::Addr { name, .. } if name == target))
                    {
                        bail!("CNAME {name} -> {target}: no address answer for {target}");
                    }
                    args.push(format!("--cname={name},{target}"));
                }
            }
        }
        args.extend(locals.iter().map(|n| format!("--local=/{n}/")));

        let out =
            File::create(&out_path).with_context(|| format!("create {}", out_path.display()))?;
        let err = out.try_clone()?;
        let mut cmd = netns.spawn_command(dnsmasq_bin(), &args);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        kill_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let mut server = Self {
            child: ChildGuard::new(child, "dnsmasq"),
            dir,
            listen,
            ttl,
        };
        server.wait_ready(netns)?;
        Ok(server)
    }

    fn wait_ready(&mut self, netns: &Netns) -> Result<()> {
        let want = self.listen.to_string();
        let up = poll(READY_TIMEOUT, Duration::from_millis(100), || {
            if let Some(status) = self.child.try_wait()? {
                bail!("dnsmasq exited ({status}): {}", self.output());
            }
            let o = self.query_from(netns, &["+short", READY_NAME])?;
            Ok((String::from_utf8_lossy(&o.stdout).trim() == want).then_some(()))
        })?;
        if up.is_none() {
            bail!(
                "dnsmasq did not answer within {READY_TIMEOUT:?}: {}",
                self.output()
            );
        }
        Ok(())
    }

    /// `dig @<server> +time=1 +tries=1 <args>` run in `netns` (straight to the server,
    /// no sandbox, no egressd), e.g. to show that the server does answer a name.
    pub fn query_from(&self, netns: &Netns, args: &[&str]) -> Result<Output> {
        let server = format!("@{}", self.listen);
        let mut all = vec![server.as_str(), "+time=1", "+tries=1"];
        all.extend_from_slice(args);
        let mut cmd = netns.command(10, "dig", &all);
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen, 53)
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// dnsmasq's own stdout and stderr.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.out")).unwrap_or_default()
    }

    /// The raw query log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("queries.log")).unwrap_or_default()
    }

    /// Every question logged so far, the readiness checks left out.
    pub fn queries(&self) -> Vec<LoggedQuery> {
        self.log()
            .lines()
            .filter_map(parse_query_line)
            .filter(|q| !q.name.eq_ignore_ascii_case(READY_NAME))
            .collect()
    }

    /// Questions for exactly `name` (letter case and one trailing dot ignored).
    pub fn queries_for(&self, name: &str) -> Vec<LoggedQuery> {
        let want = normalize(name);
        self.queries()
            .into_iter()
            .filter(|q| normalize(&q.name) == want)
            .collect()
    }

    /// Whether any question for `name` (any type) reached the server.
    pub fn asked(&self, name: &str) -> bool {
        !self.queries_for(name).is_empty()
    }

    /// Whether any question whose name contains `fragment` (case-insensitive) reached
    /// the server: catches a name that arrived with a suffix or prefix added.
    pub fn asked_containing(&self, fragment: &str) -> bool {
        let f = fragment.to_ascii_lowercase();
        self.queries()
            .iter()
            .any(|q| q.name.to_ascii_lowercase().contains(&f))
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.child.stop(libc::SIGTERM, Duration::from_secs(2));
    }
}

fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Parses `... dnsmasq[pid]: query[A] name from 1.2.3.4`.
pub fn parse_query_line(line: &str) -> Option<LoggedQuery> {
    let at = line.find("query[")?;
    let rest = &line[at + "query[".len()..];
    let (qtype, rest) = rest.split_once(']')?;
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_string();
    (words.next()? == "from").then_some(())?;
    let from = words.next()?.to_string();
    Some(LoggedQuery {
        qtype: qtype.to_string(),
        name,
        from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_query_lines() {
        let l = "Nov 21 22:50:06 dnsmasq[8792]: query[AAAA] Api.Example.com from 192.0.2.53";
        assert_eq!(
            parse_query_line(l),
            Some(LoggedQuery {
                qtype: "AAAA".into(),
                name: "Api.Example.com".into(),
                from: "192.0.2.53".into(),
            })
        );
        assert_eq!(
            parse_query_line("dnsmasq[1]: config api.example.com is 192.0.2.10"),
            None
        );
        assert_eq!(normalize("API.example.COM."), "api.example.com");
    }
}
