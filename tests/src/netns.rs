//! Named network namespaces (`ip netns`), veth pairs and addresses.
//!
//! Interfaces are always created directly inside our namespaces (`ip -n NS link add ...
//! peer ... netns OTHER`), never in the host namespace, so deleting the namespaces removes
//! them and the host's interfaces are never touched.

use std::ffi::OsStr;
use std::net::IpAddr;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{bounded, run_checked, unique_name};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// A named network namespace, deleted on drop. Its `lo` is up.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `egress-test-<pid>-<n>-<label>`.
    pub fn new(label: &str) -> Result<Self> {
        let name = unique_name(label);
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection on links made here (link-local addresses
        // included): an address still tentative drops the first packets sent through it.
        run_checked(&mut ns.command(
            10,
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        ))
        .context("sysctl accept_dad")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`, the bind mount `ip netns add` made (what `egressctl
    /// attach --netns` takes).
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> <args>` and fails on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `timeout <secs> ip netns exec <ns> <program> <args>`: a client bounded in time.
    pub fn command<S: AsRef<OsStr>>(
        &self,
        secs: u32,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Command {
        let mut cmd = bounded(secs, "ip", &["netns", "exec", &self.name]);
        cmd.arg(program).args(args);
        cmd
    }

    /// `ip netns exec <ns> <program> <args>` with no time bound, for servers that the
    /// caller owns and kills.
    pub fn spawn_command<S: AsRef<OsStr>>(
        &self,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        cmd
    }

    /// Adds an address with prefix to `dev`; IPv6 addresses skip duplicate address
    /// detection (`nodad`) so they are usable at once instead of tentative.
    pub fn add_addr(&self, dev: &str, addr: IpAddr, prefix: u8) -> Result<()> {
        let cidr = format!("{addr}/{prefix}");
        match addr {
            IpAddr::V4(_) => self.ip(&["addr", "add", &cidr, "dev", dev])?,
            IpAddr::V6(_) => self.ip(&["-6", "addr", "add", &cidr, "dev", dev, "nodad"])?,
        };
        Ok(())
    }

    /// `ip link set <dev> up`.
    pub fn link_up(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "up"]).map(|_| ())
    }

    /// Default route (v4 or v6 after the gateway's family) via `gw`.
    pub fn default_route(&self, gw: IpAddr) -> Result<()> {
        let fam = if gw.is_ipv4() { "-4" } else { "-6" };
        self.ip(&[fam, "route", "add", "default", "via", &gw.to_string()])
            .map(|_| ())
    }

    /// Creates a dummy interface (for host addresses) and brings it up.
    pub fn add_dummy(&self, dev: &str) -> Result<()> {
        check_ifname(dev)?;
        self.ip(&["link", "add", dev, "type", "dummy"])?;
        self.link_up(dev)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also destroys the veth ends and dummies inside it.
        let r = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
        match r {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns delete {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns delete {}: {e}", self.name),
        }
    }
}

/// Fails when `name` is not a valid interface name.
pub fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > IFNAME_MAX || name.contains(['/', ' ', ':']) {
        bail!("bad interface name {name:?} (1..={IFNAME_MAX} chars, no '/', ' ' or ':')");
    }
    Ok(())
}

/// Creates a veth pair with end `a` in `ns_a` and end `b` in `ns_b`, both up.
pub fn veth_pair(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) -> Result<()> {
    check_ifname(a)?;
    check_ifname(b)?;
    ns_a.ip(&[
        "link",
        "add",
        a,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        ns_b.name(),
    ])
    .with_context(|| format!("veth {a}@{} <-> {b}@{}", ns_a.name(), ns_b.name()))?;
    ns_a.link_up(a)?;
    ns_b.link_up(b)?;
    Ok(())
}

/// A short unique interface name: `eg<pid hex>n<counter hex><tag>`, at most 15 chars.
pub fn unique_ifname(tag: &str) -> Result<String> {
    let name = format!(
        "eg{:x}n{:x}{tag}",
        std::process::id(),
        crate::util::next_id()
    );
    check_ifname(&name)?;
    Ok(name)
}
