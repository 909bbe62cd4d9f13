//! Connections a replaced policy no longer allows. The kernel judges a connection once,
//! at `connect()` (and a connected UDP socket's sends without an address not at all), so
//! a connection opened under a sandbox's earlier policy would outlive it. When a policy is
//! replaced, the sandbox's TCP connections and connected UDP sockets are judged again by
//! the new one, and those it refuses, or would send to the proxy, are closed in the kernel
//! (`SOCK_DESTROY`); each is recorded as a `connection-cut` record.
//!
//! The sandbox's sockets are those created in its cgroup or below, in its network
//! namespace. Left alone: connections accepted by its own listeners (no connect of the
//! sandbox's made them) and its connections to the daemon's listeners (the proxy closes
//! its own when a policy changes).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use crate::net::sock_diag::{self, InetSocket, Listing};
use crate::policy::{Decision, Policy, Protocol, Verdict};

use super::netns::OpenNetns;

/// A connection judged again and closed.
#[derive(Debug)]
pub struct Cut {
    pub socket: InetSocket,
    pub decision: Decision,
    /// The name its address was learned from, if any.
    pub domain: Option<String>,
    /// Whether closing it failed, and why.
    pub failed: Option<String>,
}

/// What judging a sandbox's connections needs.
#[derive(Clone)]
pub struct Judge {
    pub policy: Arc<Policy>,
    /// Names each address was learned from under the old policy (the new one decides
    /// what those names may reach).
    pub learned: HashMap<IpAddr, Vec<String>>,
    /// Ports of the daemon's listeners on loopback (proxy, resolver).
    pub daemon_ports: HashSet<u16>,
}

impl Judge {
    /// The new policy's decision for a connection to `peer`, and the name it was learned
    /// from, if the connection must go; `None` if it may stay.
    fn refuses(&self, peer: SocketAddr, tcp: bool) -> Option<(Decision, Option<String>)> {
        let ip = crate::net::judged_as(peer.ip());
        if ip.is_loopback() && self.daemon_ports.contains(&peer.port()) {
            return None;
        }
        let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
        let names = self.learned.get(&ip);
        let rule_ids: Vec<u16> = names
            .into_iter()
            .flatten()
            .flat_map(|n| self.policy.rules_for_name(n))
            .collect();
        let decision = self
            .policy
            .decide_learned(ip, peer.port(), protocol, &rule_ids);
        match decision.verdict {
            Verdict::Allow | Verdict::Audit => None,
            Verdict::Deny | Verdict::Redirect => {
                Some((decision, names.and_then(|n| n.first().cloned())))
            }
        }
    }
}

/// The ids of `cgroup` and every cgroup below it (a cgroup v2 id is its directory's
/// inode number).
pub fn cgroup_ids(cgroup: &Path) -> HashSet<u64> {
    let mut ids = HashSet::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        ids.insert(meta.ino());
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    ids
}

/// Judges the connections of the sockets created in `cgroups`, in `netns` (the daemon's
/// own when `None`), and closes those `judge` refuses. Returns them with the namespace's
/// cookie (the one the kernel programs record).
pub fn cut_refused(
    netns: Option<&OpenNetns>,
    cgroups: HashSet<u64>,
    judge: Judge,
) -> io::Result<(u64, Vec<Cut>)> {
    let work = move || {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0")
            .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
        let cookie = super::netns::netns_cookie(&probe)?;
        drop(probe);
        let ours = |s: &InetSocket| s.cgroup_id.is_some_and(|id| cgroups.contains(&id));
        // Connections the sandbox's own listeners accepted: judged by nothing at connect.
        let listening: HashSet<u16> = sock_diag::list(Listing::TcpListening)?
            .into_iter()
            .filter(ours)
            .map(|s| s.local.port())
            .collect();
        let mut sockets: Vec<InetSocket> = sock_diag::list(Listing::TcpConnected)?
            .into_iter()
            .filter(|s| ours(s) && !listening.contains(&s.local.port()))
            .collect();
        sockets.extend(
            sock_diag::list(Listing::UdpConnected)?
                .into_iter()
                .filter(ours),
        );
        let mut cuts = Vec::new();
        for socket in sockets {
            let Some((decision, domain)) = judge.refuses(socket.peer, socket.tcp) else {
                continue;
            };
            let failed = sock_diag::destroy(&socket).err().map(|e| e.to_string());
            cuts.push(Cut {
                socket,
                decision,
                domain,
                failed,
            });
        }
        Ok((cookie, cuts))
    };
    match netns {
        Some(ns) => super::netns::in_netns(ns, work),
        None => work(),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn judge(policy: &str, learned: &[(&str, &str)]) -> Judge {
        let mut by_ip: HashMap<IpAddr, Vec<String>> = HashMap::new();
        for (ip, name) in learned {
            by_ip
                .entry(ip.parse().unwrap())
                .or_default()
                .push((*name).to_owned());
        }
        Judge {
            policy: Arc::new(crate::policy::parse_str(policy, "test.yaml").unwrap()),
            learned: by_ip,
            daemon_ports: HashSet::from([15001]),
        }
    }

    const POLICY: &str = r#"
version: 1
default: deny
rules:
  - name: web
    to: [192.0.2.10]
    ports: [80]
    action: allow
  - name: names
    to: [api.example.com]
    ports: [443]
    action: allow
"#;

    #[test]
    fn the_new_policy_decides_what_stays() {
        let j = judge(
            POLICY,
            &[
                ("198.51.100.7", "api.example.com"),
                ("198.51.100.8", "other.example.com"),
            ],
        );
        let refused = |peer: &str, tcp: bool| j.refuses(peer.parse().unwrap(), tcp).is_some();
        assert!(!refused("192.0.2.10:80", true), "allowed by address");
        assert!(refused("192.0.2.10:81", true), "another port");
        assert!(refused("192.0.2.11:80", true), "another address");
        assert!(
            !refused("198.51.100.7:443", true),
            "learned from a name still allowed"
        );
        assert!(
            refused("198.51.100.8:443", true),
            "learned from a name no longer allowed"
        );
        // IPv4-mapped: judged as the IPv4 address, as the kernel does.
        assert!(!refused("[::ffff:192.0.2.10]:80", true));
        assert!(refused("[::ffff:192.0.2.11]:80", true));
        // The daemon's listeners on loopback stay; other loopback ports are judged.
        assert!(!refused("127.0.0.1:15001", true));
        assert!(refused("127.0.0.1:15002", true));
    }
}
