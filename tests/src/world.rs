//! The fake internet: a `world` network namespace holding every "remote" host, and
//! sandbox namespaces joined to it by veth pairs.
//!
//! Addressing (documentation ranges only, see TESTBED.md):
//! - world hosts live on the loopback interface of the world namespace (this kernel has
//!   no `dummy` link type, and `lo` of a private namespace is just as private):
//!   [`ORIGIN_V4`]/[`ORIGIN_V6`] (HTTP origin) and [`CANARY_V4`]/[`CANARY_V6`] (forbidden);
//!   more can be added with [`World::add_host`].
//! - sandbox `i` (0..16) gets the /28 `198.51.100.16*i` and the /64 `2001:db8:1:i::`;
//!   the sandbox end is `.2`/`::2`, the world end `.1`/`::1`, and the sandbox's default
//!   routes point at the world end. Sandbox 0 is thus 198.51.100.2 and 2001:db8:1::2.
//!
//! Every World is its own set of namespaces, so concurrent tests reuse these addresses
//! without clashing.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{bail, Context, Result};

use crate::cgroup::CgroupGuard;
use crate::netns::{unique_ifname, veth_pair, Netns};
use crate::sandbox::Sandbox;

/// The HTTP origin's IPv4 address.
pub const ORIGIN_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The HTTP origin's IPv6 address.
pub const ORIGIN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// A forbidden destination (IPv4); the canary listens here.
pub const CANARY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
/// A forbidden destination (IPv6); the canary listens here.
pub const CANARY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x66);

/// The interface carrying host addresses inside the world namespace.
pub const HOSTS_DEV: &str = "lo";

/// Most sandboxes one World can hold (16 /28 subnets of 198.51.100.0/24).
pub const MAX_SANDBOXES: u8 = 16;

/// True for the documentation ranges the test bed may use.
pub fn is_documentation(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            matches!(
                (o[0], o[1], o[2]),
                (192, 0, 2) | (198, 51, 100) | (203, 0, 113)
            )
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0x2001 && s[1] == 0x0db8
        }
    }
}

/// Addresses of one sandbox and of the world end of its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxAddrs {
    pub index: u8,
    pub v4: Ipv4Addr,
    pub v4_gateway: Ipv4Addr,
    pub v4_prefix: u8,
    pub v6: Ipv6Addr,
    pub v6_gateway: Ipv6Addr,
    pub v6_prefix: u8,
}

impl SandboxAddrs {
    pub fn for_index(index: u8) -> Result<Self> {
        if index >= MAX_SANDBOXES {
            bail!("at most {MAX_SANDBOXES} sandboxes per World");
        }
        let base = index * 16;
        let seg = u16::from(index);
        Ok(Self {
            index,
            v4: Ipv4Addr::new(198, 51, 100, base + 2),
            v4_gateway: Ipv4Addr::new(198, 51, 100, base + 1),
            v4_prefix: 28,
            v6: Ipv6Addr::new(0x2001, 0xdb8, 1, seg, 0, 0, 0, 2),
            v6_gateway: Ipv6Addr::new(0x2001, 0xdb8, 1, seg, 0, 0, 0, 1),
            v6_prefix: 64,
        })
    }
}

/// The world namespace. Sandboxes made by [`World::add_sandbox`] are independent guards
/// and may be dropped before or after it.
#[derive(Debug)]
pub struct World {
    netns: Netns,
    next_sandbox: AtomicU8,
}

impl World {
    /// Creates the world namespace with the origin and canary addresses.
    pub fn new() -> Result<Self> {
        let netns = Netns::new("world")?;
        let world = Self {
            netns,
            next_sandbox: AtomicU8::new(0),
        };
        for ip in [
            IpAddr::V4(ORIGIN_V4),
            IpAddr::V6(ORIGIN_V6),
            IpAddr::V4(CANARY_V4),
            IpAddr::V6(CANARY_V6),
        ] {
            world.add_host(ip)?;
        }
        Ok(world)
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Adds a host address (documentation ranges only) to the world.
    pub fn add_host(&self, ip: IpAddr) -> Result<()> {
        if !is_documentation(ip) {
            bail!("{ip} is not in a documentation range; the test bed never uses real addresses");
        }
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        self.netns.add_addr(HOSTS_DEV, ip, prefix)
    }

    /// Creates a sandbox: its own network namespace linked to the world by a veth pair,
    /// with default routes to the world, and its own cgroup.
    pub fn add_sandbox(&self, label: &str) -> Result<Sandbox> {
        let index = self.next_sandbox.fetch_add(1, Ordering::Relaxed);
        let addrs = SandboxAddrs::for_index(index)?;
        let cgroup = CgroupGuard::new(label)?;
        let netns = Netns::new(label)?;
        let sb_if = unique_ifname("s")?;
        let w_if = unique_ifname("w")?;
        veth_pair(&netns, &sb_if, &self.netns, &w_if)
            .with_context(|| format!("link sandbox {label} to the world"))?;
        netns.add_addr(&sb_if, IpAddr::V4(addrs.v4), addrs.v4_prefix)?;
        netns.add_addr(&sb_if, IpAddr::V6(addrs.v6), addrs.v6_prefix)?;
        self.netns
            .add_addr(&w_if, IpAddr::V4(addrs.v4_gateway), addrs.v4_prefix)?;
        self.netns
            .add_addr(&w_if, IpAddr::V6(addrs.v6_gateway), addrs.v6_prefix)?;
        netns.default_route(IpAddr::V4(addrs.v4_gateway))?;
        netns.default_route(IpAddr::V6(addrs.v6_gateway))?;
        Ok(Sandbox::new(label, netns, cgroup, addrs, sb_if))
    }

    /// A bounded command run inside the world namespace (e.g. to check a server).
    pub fn command<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        self.netns.command(20, program, args)
    }
}
