//! Connections a replaced policy no longer allows. The kernel judges a connection once,
//! at `connect()` (and a connected UDP socket's sends without an address not at all), so
//! a connection opened under a sandbox's earlier policy would outlive it. When a policy is
//! replaced, the sandbox's TCP connections and connected UDP sockets are judged again:
//! those the old policy allowed and the new one refuses, or would send to the proxy, are
//! closed in the kernel (`SOCK_DESTROY`); each is recorded as a `connection-cut` record.
//!
//! The sandbox's sockets are those created in its cgroup or below, and those its
//! processes hold (made elsewhere, or in a cgroup removed since), in the network
//! namespace it was attached in and every one its processes are in. Which end opened a
//! connection is not asked (a listener on a connection's own port would pass for its
//! origin): one the old policy refused could not have been opened under it, so it was
//! accepted from outside, which the kernel never judges, and stays. Its connections to
//! the daemon's listeners are left alone (the proxy closes its own when a policy changes).
//!
//! The work runs outside the daemon's lock, on a thread of its own: closing a socket
//! takes the socket's lock, which a sandbox's thread can hold (a send blocked on memory
//! it controls), and that must not hold the daemon.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::audit::{
    AuditHandle, Hook, NetworkDecision, PolicyDigest, PolicyRejected, Record, RuleRef,
    SocketFamily, Verdict,
};
use crate::net::sock_diag::{self, InetSocket};
use crate::policy::{self, Decision, Policy, Protocol};

use super::netns::OpenNetns;

/// How long an attach waits for the judging before it answers (the work goes on).
const WAIT: Duration = Duration::from_secs(10);

/// What judging a sandbox's connections needs.
#[derive(Clone)]
pub struct Judge {
    pub policy: Arc<Policy>,
    /// The policy replaced: only a connection it allowed (one the sandbox could have
    /// opened under it) is cut; one it refuses was accepted from outside (the kernel
    /// judges connects, not what the sandbox accepts) and is left alone.
    pub old_policy: Option<Arc<Policy>>,
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
        let decision = decide(&self.policy, names, ip, peer.port(), protocol);
        let opened_under_old = self.old_policy.as_ref().is_none_or(|old| {
            decide(old, names, ip, peer.port(), protocol).verdict != policy::Verdict::Deny
        });
        match decision.verdict {
            policy::Verdict::Allow | policy::Verdict::Audit => None,
            policy::Verdict::Deny | policy::Verdict::Redirect if opened_under_old => {
                Some((decision, names.and_then(|n| n.first().cloned())))
            }
            policy::Verdict::Deny | policy::Verdict::Redirect => None,
        }
    }
}

/// `policy`'s decision for a connection to `ip`: with the rules that `names` (the names
/// the address was learned from) carry where its resolver would learn it (not over a
/// static deny, nor a special address no rule names), as the kernel decides.
fn decide(
    policy: &Policy,
    names: Option<&Vec<String>>,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Decision {
    let rule_ids: Vec<u16> = names
        .into_iter()
        .flatten()
        .flat_map(|n| {
            let ids = policy.rules_for_name(n);
            if super::dns::learning_refusal(policy, &ids, ip).is_some() {
                Vec::new()
            } else {
                super::dns::rules_carrying(policy, ids, ip)
            }
        })
        .collect();
    policy.decide_learned(ip, port, protocol, &rule_ids)
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

/// Which of a sandbox's connections existed when its policy was replaced, by network
/// namespace: only those are judged again (a later one was judged by the new policy at
/// its `connect()`, perhaps to an address the new resolver learned).
pub struct Snapshot {
    spaces: Vec<(OpenNetns, HashSet<u64>)>,
    errors: Vec<String>,
}

impl Snapshot {
    /// Lists the sandbox's TCP connections and connected UDP sockets (created in its
    /// cgroup tree or held by its processes) in `attached_netns` and every namespace its
    /// processes are in. Reads only (no socket's lock is taken): made under the daemon's
    /// lock, right after the new policy is in force.
    pub fn take(cgroup: &Path, attached_netns: Option<&Path>) -> Self {
        let pids: Vec<u32> = crate::posture::Posture::read(cgroup)
            .pids
            .into_iter()
            .collect();
        let mut opened: Vec<OpenNetns> = Vec::new();
        let paths = attached_netns.map(Path::to_path_buf).into_iter().chain(
            pids.iter()
                .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net"))),
        );
        for path in paths {
            if let Ok(ns) = OpenNetns::open(&path) {
                if opened.iter().all(|s| s.id() != ns.id()) {
                    opened.push(ns);
                }
            }
        }
        let cgroups = cgroup_ids(cgroup);
        let held = held_sockets(&pids);
        let mut spaces = Vec::new();
        let mut errors = Vec::new();
        for ns in opened {
            let (cgroups, held) = (cgroups.clone(), held.clone());
            let listed = super::netns::in_netns(&ns, move || {
                Ok(sandbox_sockets(&cgroups, &held)?
                    .into_iter()
                    .map(|s| s.cookie)
                    .collect::<HashSet<u64>>())
            });
            match listed {
                Ok(cookies) if cookies.is_empty() => {}
                Ok(cookies) => spaces.push((ns, cookies)),
                Err(e) => errors.push(format!("{}: {e}", ns.path().display())),
            }
        }
        Self { spaces, errors }
    }
}

/// The sandbox's connections in the calling thread's namespace.
fn sandbox_sockets(cgroups: &HashSet<u64>, held: &HashSet<u64>) -> io::Result<Vec<InetSocket>> {
    let mut sockets = sock_diag::connected()?;
    // A handshake half-open to a listener (no socket of its own yet, inode 0) says no
    // cgroup; any other socket without one means the kernel does not say.
    sockets.retain(|s| s.inode != 0 || s.cgroup_id.is_some());
    if sockets.iter().any(|s| s.cgroup_id.is_none()) {
        return Err(io::Error::other(
            "the kernel does not say which cgroup its sockets were made in",
        ));
    }
    sockets
        .retain(|s| s.cgroup_id.is_some_and(|id| cgroups.contains(&id)) || held.contains(&s.inode));
    Ok(sockets)
}

/// One sandbox's connections to judge again once its policy is replaced.
pub struct CutJob {
    pub sandbox: String,
    pub cgroup_id: u64,
    pub snapshot: Snapshot,
    pub judge: Judge,
    pub audit: AuditHandle,
    /// The sandbox's policy epoch, and its value for this job: a later replacement, a
    /// detach or the daemon's stop moves it on, and the job stops.
    pub epoch: Arc<AtomicU64>,
    pub at: u64,
    /// The new policy's file and digest, for the record of what could not be judged.
    pub policy_path: PathBuf,
    pub policy_digest: PolicyDigest,
}

/// Records that the sandbox's connections opened under its old policy could not all be
/// judged again (`why`): a `policy-rejected` record, as for a resolver that did not
/// start, so that what stays open is in the trail, not only in the attach's answer.
fn record_unjudged(
    audit: &AuditHandle,
    sandbox: &str,
    policy_path: &Path,
    policy_digest: &PolicyDigest,
    why: &str,
) {
    audit.emit(Record::PolicyRejected(PolicyRejected {
        time: OffsetDateTime::now_utc(),
        sandbox: sandbox.to_owned(),
        policy_path: policy_path.to_owned(),
        policy_digest: Some(policy_digest.clone()),
        error: format!(
            "the policy is in force, but connections opened under the old policy could not \
             all be judged again ({why}); those stay open until they end"
        ),
    }));
}

/// What the job's thread in a namespace needs.
struct Context {
    sandbox: String,
    cgroup_id: u64,
    judge: Judge,
    audit: AuditHandle,
    epoch: Arc<AtomicU64>,
    at: u64,
}

impl Context {
    fn current(&self) -> bool {
        self.epoch.load(Ordering::Acquire) == self.at
    }
}

/// What became of a connection judged again.
enum Outcome {
    Closed,
    /// Gone before it could be closed.
    Gone,
    Failed(String),
}

/// Counts over the namespaces.
#[derive(Default)]
struct Tally {
    closed: usize,
    failed: usize,
    superseded: bool,
}

impl CutJob {
    /// Runs the job on a thread of its own; waits for it [`WAIT`] at most. Returns what
    /// the attach should say: how many were closed, or a warning.
    pub fn run(self) -> Option<String> {
        let unjudged = (
            self.audit.clone(),
            self.sandbox.clone(),
            self.policy_path.clone(),
            self.policy_digest.clone(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("egressd-cut".to_owned())
            .spawn(move || {
                let said = self.judge_all();
                let _ = tx.send(said);
            });
        if let Err(e) = spawned {
            let (audit, sandbox, path, digest) = unjudged;
            record_unjudged(&audit, &sandbox, &path, &digest, &format!("no thread: {e}"));
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
        let Self {
            sandbox,
            cgroup_id,
            snapshot,
            judge,
            audit,
            epoch,
            at,
            policy_path,
            policy_digest,
        } = self;
        let context = Arc::new(Context {
            sandbox,
            cgroup_id,
            judge,
            audit,
            epoch,
            at,
        });
        let mut errors = snapshot.errors;
        let mut tally = Tally::default();
        for (ns, cookies) in snapshot.spaces {
            let ctx = context.clone();
            match super::netns::in_netns(&ns, move || cut_here(&ctx, &cookies)) {
                Ok(t) => {
                    tally.closed += t.closed;
                    tally.failed += t.failed;
                    tally.superseded |= t.superseded;
                }
                Err(e) => errors.push(format!("{}: {e}", ns.path().display())),
            }
        }
        if !errors.is_empty() {
            tracing::error!(sandbox = %context.sandbox, errors = ?errors, "Judging connections after a policy change failed");
            record_unjudged(
                &context.audit,
                &context.sandbox,
                &policy_path,
                &policy_digest,
                &errors.join("; "),
            );
        }
        let mut said = Vec::new();
        if tally.closed > 0 {
            said.push(format!(
                "closed {} connection(s) opened under the old policy that the new one refuses",
                tally.closed
            ));
        }
        if tally.failed > 0 {
            said.push(format!(
                "WARNING: {} connection(s) the new policy refuses could not be closed (see \
                 their connection-cut records); they stay open until they end",
                tally.failed
            ));
        }
        if tally.superseded {
            said.push(
                "the sandbox's policy changed again (or it was detached) meanwhile: the rest \
                 is judged by what came after"
                    .to_owned(),
            );
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
}

/// In the calling thread's namespace: of the connections `cookies` names, those the new
/// policy refuses, each closed and recorded at once; then a look that each is gone.
fn cut_here(ctx: &Context, cookies: &HashSet<u64>) -> io::Result<Tally> {
    let netns_cookie = namespace_cookie()?;
    let mut tally = Tally::default();
    let mut closed: HashSet<u64> = HashSet::new();
    let record =
        |socket: &InetSocket, decision: &Decision, domain: Option<String>, outcome: &Outcome| {
            ctx.audit.emit(Record::Network(record(
                ctx,
                netns_cookie,
                socket,
                decision,
                domain,
                outcome,
            )));
        };
    let mut judged = Vec::new();
    for socket in sock_diag::connected()?
        .into_iter()
        .filter(|s| cookies.contains(&s.cookie))
    {
        if !ctx.current() {
            tally.superseded = true;
            break;
        }
        let Some((decision, domain)) = ctx.judge.refuses(socket.peer, socket.tcp) else {
            continue;
        };
        let outcome = match sock_diag::destroy(&socket) {
            Ok(true) => {
                tally.closed += 1;
                closed.insert(socket.cookie);
                Outcome::Closed
            }
            Ok(false) => Outcome::Gone,
            Err(e) => {
                tally.failed += 1;
                Outcome::Failed(e.to_string())
            }
        };
        record(&socket, &decision, domain.clone(), &outcome);
        judged.push((socket, decision, domain));
    }
    if closed.is_empty() || !ctx.current() {
        return Ok(tally);
    }
    // The kernel finds a socket by its addresses: where two share them, it may have
    // closed another (or none). One still connected is said to stay open.
    let still: HashSet<u64> = sock_diag::connected()?
        .into_iter()
        .map(|s| s.cookie)
        .filter(|c| closed.contains(c))
        .collect();
    for (socket, decision, domain) in judged.iter().filter(|(s, ..)| still.contains(&s.cookie)) {
        tally.closed -= 1;
        tally.failed += 1;
        record(
            socket,
            decision,
            domain.clone(),
            &Outcome::Failed("still connected after SOCK_DESTROY".to_owned()),
        );
    }
    Ok(tally)
}

/// The calling thread's namespace's cookie, from an unbound socket (the namespace may
/// have no address up).
fn namespace_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the descriptor is owned from here.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nothing else.
    let probe = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    super::netns::netns_cookie(&probe)
}

fn record(
    ctx: &Context,
    netns_cookie: u64,
    s: &InetSocket,
    decision: &Decision,
    domain: Option<String>,
    outcome: &Outcome,
) -> NetworkDecision {
    let refuses = if decision.verdict == policy::Verdict::Redirect {
        "sends such connections to the proxy"
    } else {
        "refuses it"
    };
    let what = match outcome {
        Outcome::Closed => "closed".to_owned(),
        Outcome::Gone => "it ended before it could be closed".to_owned(),
        Outcome::Failed(e) => format!("closing it failed ({e}): it stays open"),
    };
    NetworkDecision {
        time: OffsetDateTime::now_utc(),
        sandbox: ctx.sandbox.clone(),
        cgroup_id: s.cgroup_id.unwrap_or(ctx.cgroup_id),
        pid: 0,
        process_name: String::new(),
        uid: s.uid,
        gid: 0,
        socket_cookie: s.cookie,
        netns_cookie,
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
        rule: ctx
            .judge
            .policy
            .rule_name(decision.rule_id)
            .map_or(RuleRef::Default, |n| RuleRef::Named(n.to_string())),
        domain,
        option: None,
        reason: Some(format!(
            "connection opened under the sandbox's earlier policy; its new policy {refuses}: \
             {what}"
        )),
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
            old_policy: None,
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
        assert!(
            !refused("192.0.2.10:80", false),
            "no protocol named: UDP too"
        );
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

    /// Only what the replaced policy allowed is cut: a connection it refused was not
    /// opened under it (one the sandbox accepted from outside, which no hook judges).
    #[test]
    fn what_the_old_policy_refused_was_accepted_and_stays() {
        let old = r#"
version: 1
default: deny
rules:
  - name: canary
    to: [203.0.113.66]
    ports: [9]
    action: allow
"#;
        let mut j = judge(POLICY, &[]);
        j.old_policy = Some(Arc::new(crate::policy::parse_str(old, "old.yaml").unwrap()));
        let refused = |peer: &str| j.refuses(peer.parse().unwrap(), true).is_some();
        assert!(refused("203.0.113.66:9"), "allowed then, refused now");
        assert!(
            !refused("198.51.100.200:40000"),
            "refused then: an accepted connection"
        );
        assert!(!refused("192.0.2.10:80"), "allowed now");
    }
}
