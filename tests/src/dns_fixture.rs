//! The setup for the name-based policy tests: a World whose dnsmasq ([`DnsServer`]) is
//! the authoritative server for the test bed's names, two HTTP origins and the canary, a
//! sandbox whose `resolv.conf` names [`UNSERVED_RESOLVER`] (a world address nobody
//! serves, so only egressd's interception can answer), and a daemon that resolves and
//! dials from the world namespace.
//!
//! The world's names ([`world_answers`]), each also covering the names below it:
//!
//! | Name                 | Address                  | Serves                       |
//! |----------------------|--------------------------|------------------------------|
//! | `api.example.com`    | [`ORIGIN_V4`]            | the origin, TCP 80           |
//! | `files.pypi.example` | [`PYPI_V4`]              | a second origin, TCP 80      |
//! | `a.b.pypi.example`   | [`PYPI_V4`]              | the same                     |
//! | `pypi.example`       | [`CANARY_V4`]            | the canary (the apex, denied)|
//! | `evil.example`       | [`CANARY_V4`]            | the canary                   |
//!
//! so `pypi.example.evil.example` and any `<label>.pypi.example` resolve upstream too.
//! Two CNAMEs: `cdn.pypi.example` -> `files.pypi.example` (a chain the policy allows
//! throughout) and `alias.pypi.example` -> `evil.example` (an allowed name pointing at
//! one that is not).
//!
//! Daemon configuration: `proxy.upstream_netns` is the world (nothing egressd sends
//! upstream can leave this machine) and `dns_upstream` the world's dnsmasq.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::audit::{get, get_str, summarize};
use crate::daemon::{tail, Daemon, DaemonOpts};
use crate::dns_server::{Answer, DnsServer, DNS_V4};
use crate::hosts_file::HostsFile;
use crate::sandbox::Sandbox;
use crate::servers::{Canary, Origin};
use crate::util::{fixture, poll, python, TempDir};
use crate::world::{World, CANARY_V4, ORIGIN_V4};

/// A world address no server listens on: the sandboxes' `resolv.conf` nameserver.
pub const UNSERVED_RESOLVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
/// The second origin (the `**.pypi.example` names).
pub const PYPI_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 31);

pub const API_NAME: &str = "api.example.com";
pub const PYPI_FILES: &str = "files.pypi.example";
pub const PYPI_DEEP: &str = "a.b.pypi.example";
pub const PYPI_APEX: &str = "pypi.example";
pub const EVIL_NAME: &str = "evil.example";
/// A name that ends in an allowed wildcard's suffix only after an extra domain.
pub const PYPI_LOOKALIKE: &str = "pypi.example.evil.example";
/// CNAME of [`PYPI_FILES`].
pub const PYPI_CDN: &str = "cdn.pypi.example";
/// CNAME of [`EVIL_NAME`].
pub const PYPI_ALIAS: &str = "alias.pypi.example";

/// Port of the sandboxes' resolvers: `dns_port_base` of the daemon configuration.
pub const DNS_PORT_BASE: u16 = 15300;

/// The DNS tests' policy: `api.example.com` and `**.pypi.example` on TCP 80, names
/// resolved by the world's dnsmasq, learned addresses living max(TTL, 1) + 1 seconds.
pub const NAMES_POLICY: &str = r#"version: 1
default: deny
dns:
  upstream: [192.0.2.53]
  min_ttl: 1
  grace: 1
rules:
  - name: api
    to: [api.example.com]
    ports: [80]
    protocol: tcp
    action: allow
  - name: pypi
    to: ["**.pypi.example"]
    ports: [80]
    protocol: tcp
    action: allow
"#;

/// Only `**.pypi.example`: a sandbox that may not resolve `api.example.com`.
pub const PYPI_ONLY_POLICY: &str = r#"version: 1
default: deny
dns:
  upstream: [192.0.2.53]
  min_ttl: 1
  grace: 1
rules:
  - name: pypi
    to: ["**.pypi.example"]
    ports: [80]
    protocol: tcp
    action: allow
"#;

/// What the world's dnsmasq answers.
pub fn world_answers() -> Vec<Answer> {
    vec![
        Answer::new(API_NAME, IpAddr::V4(ORIGIN_V4)),
        Answer::new(PYPI_FILES, IpAddr::V4(PYPI_V4)),
        Answer::new(PYPI_DEEP, IpAddr::V4(PYPI_V4)),
        Answer::new(PYPI_APEX, IpAddr::V4(CANARY_V4)),
        Answer::new(EVIL_NAME, IpAddr::V4(CANARY_V4)),
        Answer::cname(PYPI_CDN, PYPI_FILES),
        Answer::cname(PYPI_ALIAS, EVIL_NAME),
    ]
}

/// A sandbox plus its `resolv.conf` guard.
#[derive(Debug)]
pub struct DnsSandbox {
    pub sandbox: Sandbox,
    pub resolv: HostsFile,
}

/// See the module documentation. Field order is drop order: sandbox processes first,
/// then the resolver files, the daemon (and its pins), the servers, the namespaces, and
/// the temp dir.
#[derive(Debug)]
pub struct DnsFixture {
    pub sandbox: Sandbox,
    pub resolv: HostsFile,
    pub daemon: Daemon,
    pub dns: DnsServer,
    pub canary: Canary,
    pub pypi_origin: Origin,
    pub origin: Origin,
    pub world: World,
    pub dir: TempDir,
}

impl DnsFixture {
    /// World, origins, canary, dnsmasq answering [`world_answers`] with TTL `ttl`,
    /// sandbox "sb" and the daemon (nothing attached yet).
    pub fn new(ttl: u32) -> Result<Self> {
        let dir = TempDir::new("dns-fixture")?;
        let world = World::new()?;
        let origin = Origin::start(&world)?;
        world.add_host(IpAddr::V4(PYPI_V4))?;
        let pypi_origin =
            Origin::start_on(world.netns(), &[SocketAddr::new(IpAddr::V4(PYPI_V4), 80)])?;
        let canary = Canary::start(&world)?;
        let dns = DnsServer::start(&world, &world_answers(), ttl)?;
        let sandbox = world.add_sandbox("sb")?;
        let resolv =
            HostsFile::with_nameserver(sandbox.netns(), &[], IpAddr::V4(UNSERVED_RESOLVER))?;
        let config = dir.write(
            "egressd.yaml",
            &format!(
                "proxy:\n  upstream_netns: \"{}\"\ndns_port_base: {DNS_PORT_BASE}\n\
                 dns_upstream: [\"{DNS_V4}:53\"]\n",
                world.netns().path().display()
            ),
        )?;
        let daemon = Daemon::start(DaemonOpts {
            extra_args: vec!["--config".into(), config.display().to_string()],
            env: vec![("RUST_LOG".into(), "info,egress=debug".into())],
            ..DaemonOpts::default()
        })?;
        Ok(Self {
            sandbox,
            resolv,
            daemon,
            dns,
            canary,
            pypi_origin,
            origin,
            world,
            dir,
        })
    }

    /// Another sandbox in the same world with the same `resolv.conf` (not attached).
    pub fn add_sandbox(&self, label: &str) -> Result<DnsSandbox> {
        let sandbox = self.world.add_sandbox(label)?;
        let resolv =
            HostsFile::with_nameserver(sandbox.netns(), &[], IpAddr::V4(UNSERVED_RESOLVER))?;
        Ok(DnsSandbox { sandbox, resolv })
    }

    /// `egressctl attach --cgroup --policy --name --netns` (the resolver binds in the
    /// sandbox's namespace), failing on a non-zero exit.
    pub fn attach(&self, sandbox: &Sandbox, yaml: &str) -> Result<PathBuf> {
        let name = sandbox.label();
        let policy = self.dir.write(&format!("policy-{name}.yaml"), yaml)?;
        self.daemon.attach_in_netns_ok(sandbox, &policy, name)?;
        Ok(policy)
    }

    /// Waits (bounded) for a `dns-query` record of `sandbox` matching `m`.
    pub fn wait_dns_record(&self, m: &DnsMatch) -> Result<Value> {
        wait_dns_record(&self.daemon, m)
    }

    /// The daemon's log, last `n` lines (for failure messages).
    pub fn daemon_tail(&self, n: usize) -> String {
        tail(&self.daemon.log(), n)
    }
}

/// Waits (at most [`crate::expect::RECORD_TIMEOUT`]) for a `dns-query` record matching
/// `m`; the error lists the DNS records there are and the daemon's log.
pub fn wait_dns_record(daemon: &Daemon, m: &DnsMatch) -> Result<Value> {
    let found = poll(
        crate::expect::RECORD_TIMEOUT,
        Duration::from_millis(50),
        || Ok(daemon.audit_records()?.into_iter().find(|r| m.matches(r))),
    )?;
    match found {
        Some(r) => Ok(r),
        None => {
            let recs = daemon.audit_records().unwrap_or_default();
            let dns: Vec<String> = recs
                .iter()
                .filter(|r| is_dns_query(r))
                .map(Value::to_string)
                .collect();
            bail!(
                "no dns-query record {m:?} within {:?}; dns records:\n{}\nall:{}\ndaemon log:\n{}",
                crate::expect::RECORD_TIMEOUT,
                dns.join("\n"),
                summarize(&recs),
                tail(&daemon.log(), 30)
            )
        }
    }
}

/// True for a record of the resolver.
pub fn is_dns_query(r: &Value) -> bool {
    get_str(r, "event.action") == Some("dns-query")
}

/// `dns.resolved_ip` of a record, parsed (empty when absent).
pub fn resolved_ips(r: &Value) -> Vec<IpAddr> {
    get(r, "dns.resolved_ip")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter_map(|s| s.parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical())
                .collect()
        })
        .unwrap_or_default()
}

/// Conditions on a `dns-query` record; unset fields match anything.
#[derive(Debug, Clone, Default)]
pub struct DnsMatch {
    pub sandbox: Option<String>,
    pub name: Option<String>,
    pub qtype: Option<String>,
    pub rcode: Option<String>,
    pub verdict: Option<String>,
    pub rule: Option<String>,
    pub resolved: Option<IpAddr>,
}

impl DnsMatch {
    /// A `dns-query` record of `sandbox` for `name`.
    pub fn new(sandbox: &str, name: &str) -> Self {
        Self {
            sandbox: Some(sandbox.into()),
            name: Some(name.to_ascii_lowercase()),
            ..Self::default()
        }
    }

    pub fn qtype(mut self, t: &str) -> Self {
        self.qtype = Some(t.into());
        self
    }

    pub fn rcode(mut self, c: &str) -> Self {
        self.rcode = Some(c.into());
        self
    }

    pub fn verdict(mut self, v: &str) -> Self {
        self.verdict = Some(v.into());
        self
    }

    pub fn rule(mut self, r: &str) -> Self {
        self.rule = Some(r.into());
        self
    }

    /// `dns.resolved_ip` contains `ip`.
    pub fn resolved(mut self, ip: IpAddr) -> Self {
        self.resolved = Some(ip.to_canonical());
        self
    }

    pub fn matches(&self, r: &Value) -> bool {
        let eq = |want: &Option<String>, path: &str| {
            want.as_deref().is_none_or(|w| get_str(r, path) == Some(w))
        };
        is_dns_query(r)
            && eq(&self.sandbox, "egress.sandbox.name")
            && eq(&self.name, "dns.question.name")
            && eq(&self.qtype, "dns.question.type")
            && eq(&self.rcode, "dns.response_code")
            && eq(&self.verdict, "egress.verdict")
            && eq(&self.rule, "rule.name")
            && self.resolved.is_none_or(|ip| resolved_ips(r).contains(&ip))
    }
}

/// What `dig` printed: the header's status, the answer section, the server line.
#[derive(Debug)]
pub struct Dig {
    /// `NOERROR`, `NXDOMAIN`, `REFUSED`, ... or `None` when no answer came.
    pub status: Option<String>,
    /// (name, ttl, type, data) of each answer record.
    pub answers: Vec<(String, u32, String, String)>,
    /// The `;; SERVER:` line's value, e.g. `203.0.113.99#53(203.0.113.99) (UDP)`.
    pub server: Option<String>,
    pub out: Output,
}

impl Dig {
    /// The A and AAAA addresses of the answer.
    pub fn addrs(&self) -> Vec<IpAddr> {
        self.answers
            .iter()
            .filter(|(_, _, t, _)| t == "A" || t == "AAAA")
            .filter_map(|(_, _, _, d)| d.parse().ok())
            .collect()
    }

    pub fn is(&self, status: &str) -> bool {
        self.status.as_deref() == Some(status)
    }

    /// For error messages.
    pub fn describe(&self) -> String {
        format!(
            "status {:?}, answers {:?}, server {:?}, exit {:?}\n{}{}",
            self.status,
            self.answers,
            self.server,
            self.out.status.code(),
            String::from_utf8_lossy(&self.out.stdout),
            String::from_utf8_lossy(&self.out.stderr)
        )
    }
}

/// `dig +time=2 +tries=1 <args>` in `sandbox` (a real client: its query goes wherever
/// `args` or the sandbox's `resolv.conf` say), parsed.
pub fn dig(sandbox: &Sandbox, args: &[&str]) -> Result<Dig> {
    let mut all = vec!["+time=2", "+tries=1"];
    all.extend_from_slice(args);
    let out = sandbox.run("dig", &all)?;
    Ok(parse_dig(out))
}

/// Parses dig's default output.
pub fn parse_dig(out: Output) -> Dig {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.lines().find_map(|l| {
        let (_, rest) = l.split_once("status: ")?;
        Some(rest.split(',').next()?.trim().to_string())
    });
    let server = text
        .lines()
        .find_map(|l| l.strip_prefix(";; SERVER: ").map(str::to_string));
    let mut answers = Vec::new();
    let mut in_answer = false;
    for l in text.lines() {
        if l.starts_with(";; ANSWER SECTION:") {
            in_answer = true;
            continue;
        }
        if in_answer {
            if l.trim().is_empty() || l.starts_with(';') {
                in_answer = false;
                continue;
            }
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 5 {
                answers.push((
                    f[0].trim_end_matches('.').to_string(),
                    f[1].parse().unwrap_or(0),
                    f[3].to_string(),
                    f[4..].join(" "),
                ));
            }
        }
    }
    Dig {
        status,
        answers,
        server,
        out,
    }
}

/// What `fixtures/resolve.py` (python's `socket.getaddrinfo`) got.
#[derive(Debug)]
pub struct Resolved {
    pub ok: bool,
    pub addrs: Vec<IpAddr>,
    pub error: Option<String>,
    pub raw: Value,
}

/// `python3 fixtures/resolve.py <name>` in `sandbox`.
pub fn getaddrinfo(sandbox: &Sandbox, name: &str) -> Result<Resolved> {
    let script = fixture("resolve.py");
    let out = sandbox.run(python(), &[script.as_os_str(), OsStr::new(name)])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "resolve.py printed no JSON ({}): {stdout:?} {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let raw: Value = serde_json::from_str(line).with_context(|| format!("resolve.py {line:?}"))?;
    Ok(Resolved {
        ok: raw["ok"].as_bool().unwrap_or(false),
        addrs: raw["addrs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|s| s.parse().ok())
                    .collect()
            })
            .unwrap_or_default(),
        error: raw["error"].as_str().map(str::to_string),
        raw,
    })
}

/// What `fixtures/dns_query.py` got for one hand-made query.
#[derive(Debug)]
pub struct RawAnswer {
    pub ok: bool,
    /// Where the answer came from, as the socket API reports it.
    pub from: Option<SocketAddr>,
    pub rcode: Option<u64>,
    pub addrs: Vec<IpAddr>,
    /// The answer carried the query's id.
    pub id_match: bool,
    pub raw: Value,
}

/// `python3 fixtures/dns_query.py <server> <name> --mode <mode> --type <qtype>` in
/// `sandbox`: `mode` is `udp-sendto` (never connected), `udp-connect` or `tcp`.
pub fn raw_query(
    sandbox: &Sandbox,
    server: IpAddr,
    name: &str,
    mode: &str,
    qtype: &str,
) -> Result<RawAnswer> {
    let script = fixture("dns_query.py").display().to_string();
    let server = server.to_string();
    let args = [
        script.as_str(),
        &server,
        name,
        "--mode",
        mode,
        "--type",
        qtype,
    ];
    let out = sandbox.run(python(), &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "dns_query.py printed no JSON ({}): {stdout:?} {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let raw: Value =
        serde_json::from_str(line).with_context(|| format!("dns_query.py {line:?}"))?;
    let from = raw["from"].as_array().and_then(|a| {
        let ip: IpAddr = a.first()?.as_str()?.parse().ok()?;
        let port = u16::try_from(a.get(1)?.as_u64()?).ok()?;
        Some(SocketAddr::new(ip.to_canonical(), port))
    });
    Ok(RawAnswer {
        ok: raw["ok"].as_bool().unwrap_or(false),
        from,
        rcode: raw["rcode"].as_u64(),
        addrs: raw["addrs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|s| s.parse().ok())
                    .collect()
            })
            .unwrap_or_default(),
        id_match: raw["id_match"].as_bool().unwrap_or(false),
        raw,
    })
}

/// Requests `origin` logged from `client` (python's http.server logs one line per request,
/// starting with the client address; a bare connect with junk logs one too).
pub fn origin_hits(origin: &Origin, client: IpAddr) -> usize {
    let prefix = format!("{client} ");
    origin
        .log()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::ExitStatus;

    #[test]
    fn parses_dig_output() {
        let text = "\n; <<>> DiG 9.18 <<>> api.example.com\n;; global options: +cmd\n\
;; Got answer:\n;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 34909\n\
;; flags: qr aa rd ra; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 1\n\n\
;; QUESTION SECTION:\n;api.example.com.\t\tIN\tA\n\n;; ANSWER SECTION:\n\
api.example.com.\t1\tIN\tA\t192.0.2.10\n\n;; Query time: 4 msec\n\
;; SERVER: 203.0.113.99#53(203.0.113.99) (UDP)\n";
        let d = parse_dig(Output {
            status: ExitStatus::from_raw(0),
            stdout: text.as_bytes().to_vec(),
            stderr: Vec::new(),
        });
        assert_eq!(d.status.as_deref(), Some("NOERROR"));
        assert_eq!(
            d.answers,
            vec![(
                "api.example.com".to_string(),
                1,
                "A".to_string(),
                "192.0.2.10".to_string()
            )]
        );
        assert_eq!(d.addrs(), vec![IpAddr::V4(ORIGIN_V4)]);
        assert_eq!(
            d.server.as_deref(),
            Some("203.0.113.99#53(203.0.113.99) (UDP)")
        );
    }
}
