//! Servers inside the world namespace: the HTTP origin and the canary.
//!
//! Both are small python3 scripts in `tests/fixtures/`, started with `ip netns exec` (which
//! `exec`s, so the child's pid is the server's) and killed by that pid on drop. Each binds
//! specific addresses only, so the origin never answers on a canary address. `start`
//! returns once the script has written its ready file (written after every socket is
//! bound), polling for at most [`READY_TIMEOUT`].

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns::Netns;
use crate::util::{fixture, kill_with_parent, poll, python, ChildGuard, TempDir};
use crate::world::{World, CANARY_V4, CANARY_V6, ORIGIN_V4, ORIGIN_V6};

/// Bound on waiting for a server to listen.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the origin serves at `/`.
pub const ORIGIN_BODY: &str = "hello from origin\n";

/// TCP ports the canary listens on, on each canary address.
pub const CANARY_TCP_PORTS: [u16; 3] = [9, 80, 443];
/// UDP ports the canary listens on, on each canary address.
pub const CANARY_UDP_PORTS: [u16; 2] = [9, 53];

fn endpoint(sa: &SocketAddr) -> String {
    // SocketAddr's Display already brackets IPv6: [2001:db8::66]:9
    sa.to_string()
}

/// Spawns `python3 <script> <args>` in `netns`, logs to `<dir>/<name>.log`, and waits
/// for `<dir>/<name>.ready`.
pub fn spawn_ready(
    netns: &Netns,
    dir: &TempDir,
    name: &str,
    script: &str,
    args: &[String],
) -> Result<ChildGuard> {
    let log_path = dir.path().join(format!("{name}.log"));
    let ready = dir.path().join(format!("{name}.ready"));
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let log2 = log.try_clone()?;
    let mut all = vec![fixture(script).display().to_string()];
    all.extend(args.iter().cloned());
    all.push("--ready".into());
    all.push(ready.display().to_string());
    let mut cmd = netns.spawn_command(python(), &all);
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    kill_with_parent(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let mut guard = ChildGuard::new(child, name);
    let up = poll(READY_TIMEOUT, Duration::from_millis(25), || {
        if ready.exists() {
            return Ok(Some(()));
        }
        if let Some(status) = guard.try_wait()? {
            bail!(
                "{name} exited ({status}) before listening: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        Ok(None)
    })?;
    if up.is_none() {
        bail!(
            "{name} not listening after {READY_TIMEOUT:?}: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    Ok(guard)
}

/// A plain-HTTP origin serving [`ORIGIN_BODY`] at `/`.
#[derive(Debug)]
pub struct Origin {
    child: ChildGuard,
    dir: TempDir,
    binds: Vec<SocketAddr>,
}

impl Origin {
    /// Listens on ORIGIN_V4:80 and [ORIGIN_V6]:80 in the world.
    pub fn start(world: &World) -> Result<Self> {
        Self::start_on(
            world.netns(),
            &[
                SocketAddr::new(IpAddr::V4(ORIGIN_V4), 80),
                SocketAddr::new(IpAddr::V6(ORIGIN_V6), 80),
            ],
        )
    }

    /// Listens on the given addresses (which must exist in `netns`).
    pub fn start_on(netns: &Netns, binds: &[SocketAddr]) -> Result<Self> {
        let dir = TempDir::new("origin")?;
        let root = dir.path().join("www");
        std::fs::create_dir(&root)?;
        std::fs::write(root.join("index.html"), ORIGIN_BODY)?;
        let mut args = Vec::new();
        for b in binds {
            args.push("--bind".to_string());
            args.push(endpoint(b));
        }
        args.push("--root".into());
        args.push(root.display().to_string());
        let child = spawn_ready(netns, &dir, "origin", "origin.py", &args)?;
        Ok(Self {
            child,
            dir,
            binds: binds.to_vec(),
        })
    }

    pub fn binds(&self) -> &[SocketAddr] {
        &self.binds
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The server's request log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("origin.log")).unwrap_or_default()
    }
}

/// One thing the canary saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryEvent {
    /// "tcp" or "udp".
    pub proto: String,
    /// "accept" (TCP connection), "data" (TCP bytes) or "datagram" (UDP).
    pub kind: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub data: Vec<u8>,
}

impl CanaryEvent {
    fn from_json(v: &Value) -> Result<Self> {
        let sa = |ip: &str, port: &str| -> Result<SocketAddr> {
            let ip: IpAddr = v[ip]
                .as_str()
                .context("missing ip")?
                .parse()
                .context("bad ip")?;
            let port = v[port].as_u64().context("missing port")?;
            Ok(SocketAddr::new(ip, u16::try_from(port)?))
        };
        let hex = v["data"].as_str().unwrap_or("");
        let data = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .context("bad hex data")?;
        Ok(Self {
            proto: v["proto"].as_str().unwrap_or("").to_string(),
            kind: v["kind"].as_str().unwrap_or("").to_string(),
            peer: sa("peer_ip", "peer_port")?,
            local: sa("local_ip", "local_port")?,
            data,
        })
    }

    /// The local address with IPv4-mapped IPv6 folded to IPv4.
    pub fn local_ip(&self) -> IpAddr {
        self.local.ip().to_canonical()
    }
}

/// A listener on forbidden addresses that records everything it receives.
#[derive(Debug)]
pub struct Canary {
    child: ChildGuard,
    dir: TempDir,
    log: PathBuf,
}

impl Canary {
    /// Listens on CANARY_V4 and CANARY_V6, TCP [`CANARY_TCP_PORTS`] and UDP
    /// [`CANARY_UDP_PORTS`], in the world.
    pub fn start(world: &World) -> Result<Self> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for ip in [IpAddr::V4(CANARY_V4), IpAddr::V6(CANARY_V6)] {
            tcp.extend(CANARY_TCP_PORTS.iter().map(|p| SocketAddr::new(ip, *p)));
            udp.extend(CANARY_UDP_PORTS.iter().map(|p| SocketAddr::new(ip, *p)));
        }
        Self::start_on(world.netns(), &tcp, &udp)
    }

    /// Listens on the given TCP and UDP addresses in `netns`.
    pub fn start_on(netns: &Netns, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Result<Self> {
        let dir = TempDir::new("canary")?;
        let log = dir.path().join("received.jsonl");
        let mut args = Vec::new();
        for t in tcp {
            args.push("--tcp".to_string());
            args.push(endpoint(t));
        }
        for u in udp {
            args.push("--udp".to_string());
            args.push(endpoint(u));
        }
        args.push("--log".into());
        args.push(log.display().to_string());
        let child = spawn_ready(netns, &dir, "canary", "canary.py", &args)?;
        Ok(Self { child, dir, log })
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// Everything received so far (complete lines only). Empty for a proved block.
    pub fn received(&self) -> Result<Vec<CanaryEvent>> {
        let text = match std::fs::read_to_string(&self.log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("read {}", self.log.display())),
        };
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value =
                    serde_json::from_str(l).with_context(|| format!("canary line {l:?}"))?;
                CanaryEvent::from_json(&v)
            })
            .collect()
    }

    /// Waits (bounded by `timeout`) for an event matching `pred`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&CanaryEvent) -> bool,
    ) -> Result<Option<CanaryEvent>> {
        poll(timeout, Duration::from_millis(25), || {
            Ok(self.received()?.into_iter().find(|e| pred(e)))
        })
    }
}
