//! Connections a replaced policy no longer allows. The kernel judges a connection once,
//! at `connect()` (and a connected UDP socket's sends without an address not at all), so
//! a connection opened under a sandbox's earlier policy would outlive it. When a policy is
//! replaced, the sandbox's TCP connections and connected UDP sockets are judged again by
//! the new one, and those it refuses, or would send to the proxy, are closed in the kernel
//! (`SOCK_DESTROY`); each is recorded as a `connection-cut` record.
//!
//! The sandbox's sockets are those created in its cgroup or below, and those its
//! processes hold (made elsewhere, or in a cgroup removed since), in the network
//! namespace it was attached in and every one its processes are in. Connections it
//! accepted are judged too: a connection carries data out whichever end opened it. Its
//! connections to the daemon's listeners are left alone (the proxy closes its own when a
//! policy changes).
//!
//! The work runs outside the daemon's lock, on a thread of its own: closing a socket
//! takes the socket's lock, which a sandbox's thread can hold (a send blocked on memory
//! it controls), and that must not hold the daemon.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::audit::{AuditHandle, Hook, NetworkDecision, Record, RuleRef, SocketFamily, Verdict};
use crate::net::sock_diag::{self, InetSocket, Listing};
use crate::policy::{self, Decision, Policy, Protocol};

use super::netns::OpenNetns;

/// How long an attach waits for the judging before it answers (the work goes on).
const WAIT: Duration = Duration::from_secs(10);
/// Passes over the namespace's sockets: a connect judged under the old policy may be
/// hashed just after a listing.
const PASSES: usize = 3;

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
    /// The new policy's decision for a connection to `peer`, and the name its address
    /// was learned from, if the connection must go; `None` if it may stay.
    fn refuses(&self, peer: SocketAddr, tcp: bool) -> Option<(Decision, Option<String>)> {
        let ip = crate::net::judged_as(peer.ip());
        if ip.is_loopback() && self.daemon_ports.contains(&peer.port()) {
            return None;
        }
        let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
        let names = self.learned.get(&ip);
        // What the new policy's resolver would let the names make reachable: nothing
        // where it would refuse to learn the address (a static deny over it, a special
        // address no rule names), and only the rules that may carry it.
        let rule_ids: Vec<u16> = names
            .into_iter()
            .flatten()
            .flat_map(|n| {
                let ids = self.policy.rules_for_name(n);
                if super::dns::learning_refusal(&self.policy, &ids, ip).is_some() {
                    Vec::new()
                } else {
                    super::dns::rules_carrying(&self.policy, ids, ip)
                }
            })
            .collect();
        let decision = self
            .policy
            .decide_learned(ip, peer.port(), protocol, &rule_ids);
        match decision.verdict {
            policy::Verdict::Allow | policy::Verdict::Audit => None,
            policy::Verdict::Deny | policy::Verdict::Redirect => {
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

/// The inode numbers of the sockets `pids` hold open.
fn held_sockets(pids: &[u32]) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(n) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                inodes.insert(n);
            }
        }
    }
    inodes
}

/// One sandbox's connections to judge again once its policy is replaced.
pub struct CutJob {
    pub sandbox: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The namespace it was attached in, if known by path.
    pub attached_netns: Option<PathBuf>,
    pub judge: Judge,
    pub audit: AuditHandle,
}

/// A connection judged again and closed (or not).
struct Cut {
    socket: InetSocket,
    decision: Decision,
    domain: Option<String>,
    netns_cookie: u64,
    outcome: Outcome,
}

enum Outcome {
    Closed,
    /// Gone before it could be closed.
    Gone,
    Failed(String),
}

impl CutJob {
    /// Runs the job on a thread of its own; waits for it [`WAIT`] at most. Returns what
    /// the attach should say: how many were closed, or a warning.
    pub fn run(self) -> Option<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("egressd-cut".to_owned())
            .spawn(move || {
                let said = self.judge_all();
                let _ = tx.send(said);
            });
        if let Err(e) = spawned {
            return Some(format!(
                "WARNING: connections opened under the old policy were not judged again (no \
                 thread: {e}); they stay open until they end"
            ));
        }
        match rx.recv_timeout(WAIT) {
            Ok(said) => said,
            Err(_) => Some(format!(
                "WARNING: judging the connections opened under the old policy took over {} s; \
                 it goes on, and each one closed is recorded",
                WAIT.as_secs()
            )),
        }
    }

    fn judge_all(self) -> Option<String> {
        let pids: Vec<u32> = crate::posture::Posture::read(&self.cgroup)
            .pids
            .into_iter()
            .collect();
        // Every namespace its processes are in (a process may have made one of its own),
        // and the one it was attached in.
        let mut spaces: Vec<OpenNetns> = Vec::new();
        let paths = self.attached_netns.iter().cloned().chain(
            pids.iter()
                .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net"))),
        );
        for path in paths {
            if let Ok(ns) = OpenNetns::open(&path) {
                if spaces.iter().all(|s| s.id() != ns.id()) {
                    spaces.push(ns);
                }
            }
        }
        let cgroups = cgroup_ids(&self.cgroup);
        let held = held_sockets(&pids);
        let mut errors = Vec::new();
        let mut cuts = Vec::new();
        for ns in &spaces {
            let (cgroups, held, judge) = (cgroups.clone(), held.clone(), self.judge.clone());
            match super::netns::in_netns(ns, move || cut_here(&cgroups, &held, &judge)) {
                Ok(found) => cuts.extend(found),
                Err(e) => errors.push(format!("{}: {e}", ns.path().display())),
            }
        }
        let mut closed = 0;
        let mut failed = 0;
        for cut in &cuts {
            match cut.outcome {
                Outcome::Closed => closed += 1,
                Outcome::Failed(_) => failed += 1,
                Outcome::Gone => {}
            }
            self.audit.emit(Record::Network(self.record(cut)));
        }
        if !errors.is_empty() {
            tracing::error!(sandbox = %self.sandbox, errors = ?errors, "Judging connections after a policy change failed");
        }
        let mut said = Vec::new();
        if closed > 0 {
            said.push(format!(
                "closed {closed} connection(s) opened under the old policy that the new one \
                 refuses"
            ));
        }
        if failed > 0 {
            said.push(format!(
                "WARNING: {failed} connection(s) the new policy refuses could not be closed \
                 (see their connection-cut records); they stay open until they end"
            ));
        }
        if !errors.is_empty() {
            said.push(format!(
                "WARNING: connections opened under the old policy could not all be judged \
                 again ({}); those stay open until they end",
                errors.join("; ")
            ));
        }
        (!said.is_empty()).then(|| said.join("; "))
    }

    fn record(&self, cut: &Cut) -> NetworkDecision {
        let s = &cut.socket;
        let refuses = if cut.decision.verdict == policy::Verdict::Redirect {
            "sends such connections to the proxy"
        } else {
            "refuses it"
        };
        let what = match &cut.outcome {
            Outcome::Closed => "closed".to_owned(),
            Outcome::Gone => "it ended before it could be closed".to_owned(),
            Outcome::Failed(e) => format!("closing it failed ({e}): it stays open"),
        };
        NetworkDecision {
            time: OffsetDateTime::now_utc(),
            sandbox: self.sandbox.clone(),
            cgroup_id: s.cgroup_id.unwrap_or(self.cgroup_id),
            pid: 0,
            process_name: String::new(),
            uid: s.uid,
            gid: 0,
            socket_cookie: s.cookie,
            netns_cookie: cut.netns_cookie,
            hook: Hook::PolicyChange,
            family: if s.v6 {
                SocketFamily::Inet6
            } else {
                SocketFamily::Inet
            },
            protocol: if s.tcp { 6 } else { 17 },
            destination_ip: s.peer.ip(),
            destination_port: s.peer.port(),
            verdict: Verdict::Deny,
            rule: self
                .judge
                .policy
                .rule_name(cut.decision.rule_id)
                .map_or(RuleRef::Default, |n| RuleRef::Named(n.to_string())),
            domain: cut.domain.clone(),
            option: None,
            reason: Some(format!(
                "connection opened under the sandbox's earlier policy; its new policy \
                 {refuses}: {what}"
            )),
        }
    }
}

/// In the calling thread's namespace: the sandbox's connections (created in `cgroups`,
/// or held by its processes: `held`) that `judge` refuses, each closed.
fn cut_here(cgroups: &HashSet<u64>, held: &HashSet<u64>, judge: &Judge) -> io::Result<Vec<Cut>> {
    // An unbound socket: the namespace may have no address up.
    // SAFETY: plain socket(2); the descriptor is owned from here.
    let probe = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if probe < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nothing else.
    let probe = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(probe) };
    let netns_cookie = super::netns::netns_cookie(&probe)?;
    drop(probe);
    let mut cuts: Vec<Cut> = Vec::new();
    // Each judged socket's place in `cuts` (`None`: it may stay).
    let mut seen: HashMap<u64, Option<usize>> = HashMap::new();
    for _ in 0..PASSES {
        let mut sockets = sock_diag::list(Listing::TcpConnected)?;
        sockets.extend(sock_diag::list(Listing::UdpConnected)?);
        let mut found = 0;
        for socket in sockets {
            if socket.cgroup_id.is_none() {
                return Err(io::Error::other(
                    "the kernel does not say which cgroup its sockets were made in",
                ));
            }
            let ours = socket.cgroup_id.is_some_and(|id| cgroups.contains(&id))
                || held.contains(&socket.inode);
            if !ours {
                continue;
            }
            if let Some(judged) = seen.get(&socket.cookie) {
                // Closed (or not found) in an earlier pass, and still connected: the
                // kernel closed another socket of the same addresses, or none.
                if let Some(cut) = judged.and_then(|i| cuts.get_mut(i)) {
                    if !matches!(cut.outcome, Outcome::Failed(_)) {
                        cut.outcome =
                            Outcome::Failed("still connected after SOCK_DESTROY".to_owned());
                    }
                }
                continue;
            }
            seen.insert(socket.cookie, None);
            let Some((decision, domain)) = judge.refuses(socket.peer, socket.tcp) else {
                continue;
            };
            found += 1;
            seen.insert(socket.cookie, Some(cuts.len()));
            let outcome = match sock_diag::destroy(&socket) {
                Ok(true) => Outcome::Closed,
                Ok(false) => Outcome::Gone,
                Err(e) => Outcome::Failed(e.to_string()),
            };
            cuts.push(Cut {
                socket,
                decision,
                domain,
                netns_cookie,
                outcome,
            });
        }
        if found == 0 {
            break;
        }
    }
    Ok(cuts)
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
  - name: no-metadata
    to: [198.51.100.66]
    action: deny
"#;

    #[test]
    fn the_new_policy_decides_what_stays() {
        let j = judge(
            POLICY,
            &[
                ("198.51.100.7", "api.example.com"),
                ("198.51.100.8", "other.example.com"),
                ("198.51.100.66", "api.example.com"),
                ("10.1.2.3", "api.example.com"),
            ],
        );
        let refused = |peer: &str, tcp: bool| j.refuses(peer.parse().unwrap(), tcp).is_some();
        assert!(!refused("192.0.2.10:80", true), "allowed by address");
        assert!(!refused("192.0.2.10:80", false), "no protocol named: UDP too");
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
        // The new policy's resolver would not learn these for the name.
        assert!(
            refused("198.51.100.66:443", true),
            "a static deny covers it"
        );
        assert!(
            refused("10.1.2.3:443", true),
            "a private address no rule names"
        );
        // IPv4-mapped: judged as the IPv4 address, as the kernel does.
        assert!(!refused("[::ffff:192.0.2.10]:80", true));
        assert!(refused("[::ffff:192.0.2.11]:80", true));
        // The daemon's listeners on loopback stay; other loopback ports are judged.
        assert!(!refused("127.0.0.1:15001", true));
        assert!(refused("127.0.0.1:15002", true));
    }
}
