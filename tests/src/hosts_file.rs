//! Names for a namespace: `/etc/netns/<netns>/hosts`, which `ip netns exec` bind-mounts
//! over `/etc/hosts` for every program it starts in that namespace (every sandbox and
//! world command of this harness goes through `ip netns exec`).
//!
//! For sandboxes without name-based policy this is how `api.github.com` reaches a
//! sandbox's curl, git and python. A `resolv.conf` naming `127.0.0.1` goes with it, so
//! a name that is not in the file fails at once instead of waiting for the host's
//! nameserver, which is unreachable from our namespaces. The DNS tests instead write a
//! `resolv.conf` naming a world address nobody serves ([`HostsFile::with_nameserver`]),
//! whose queries only egressd's interception can answer. The guard removes both files and
//! their directory on drop, and `/etc/netns` itself when this process created it and
//! nothing else is left in it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Where `ip netns exec` looks for per-namespace `/etc` files.
pub const ETC_NETNS: &str = "/etc/netns";

/// (live guards in this process, whether this process created `/etc/netns`).
static ROOT: Mutex<(usize, bool)> = Mutex::new((0, false));

/// `/etc/netns/<netns>/hosts`, removed on drop.
#[derive(Debug)]
pub struct HostsFile {
    dir: PathBuf,
    file: PathBuf,
    resolv: PathBuf,
}

impl HostsFile {
    /// Writes a hosts file for `netns` with localhost plus `entries` (address, names), and
    /// a `resolv.conf` naming `127.0.0.1`.
    pub fn new(netns: &Netns, entries: &[(IpAddr, &str)]) -> Result<Self> {
        Self::with_resolv(
            netns,
            entries,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
    }

    /// Like [`HostsFile::new`], with a `resolv.conf` naming `nameserver` instead. For
    /// sandboxes whose DNS egressd intercepts: an address nobody serves
    /// (e.g. 203.0.113.99) proves that an answer came from egressd's resolver, which the
    /// kernel sends every port-53 packet to, whatever server it was addressed to.
    pub fn with_nameserver(
        netns: &Netns,
        entries: &[(IpAddr, &str)],
        nameserver: IpAddr,
    ) -> Result<Self> {
        Self::with_resolv(
            netns,
            entries,
            &format!("nameserver {nameserver}\noptions timeout:2 attempts:2\n"),
        )
    }

    fn with_resolv(netns: &Netns, entries: &[(IpAddr, &str)], resolv_conf: &str) -> Result<Self> {
        let root = Path::new(ETC_NETNS);
        let dir = root.join(netns.name());
        let file = dir.join("hosts");
        let resolv = dir.join("resolv.conf");
        {
            let mut state = ROOT
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !root.exists() {
                state.1 = true;
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            state.0 += 1;
        }
        let guard = Self { dir, file, resolv };
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for (ip, names) in entries {
            text.push_str(&format!("{ip} {names}\n"));
        }
        std::fs::write(&guard.file, text)
            .with_context(|| format!("write {}", guard.file.display()))?;
        std::fs::write(&guard.resolv, resolv_conf)
            .with_context(|| format!("write {}", guard.resolv.display()))?;
        Ok(guard)
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    /// `/etc/netns/<netns>/resolv.conf`.
    pub fn resolv_path(&self) -> &Path {
        &self.resolv
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        for f in [&self.file, &self.resolv] {
            if let Err(e) = std::fs::remove_file(f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("warning: remove {}: {e}", f.display());
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: rmdir {}: {e}", self.dir.display());
            }
        }
        let mut state = ROOT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.0 = state.0.saturating_sub(1);
        if state.0 == 0 && state.1 {
            // Ours and now unused; if another process put something there, it stays.
            if std::fs::remove_dir(ETC_NETNS).is_ok() {
                state.1 = false;
            }
        }
    }
}
