//! The daemon's consistent core: kernel maps, pinned links, persistent state and the audit
//! records of every change to them. Every public method leaves all four in agreement.
use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_common::{SandboxInfo, MAX_POLICY_SLOTS, MAX_SANDBOXES};
use time::OffsetDateTime;

use super::{
    connections,
    dns::{host_net, uses_dns, DnsRuntime, LearnedAddr},
    netns::{netns_id, netns_of_cgroup, CgroupNetns, HostNetns, NetnsId, OpenNetns},
    proxy::ProxyRuntime,
    state::{QuarantineState, SandboxRecord, State},
};
use crate::{
    alerts::{Alerts, DenialBursts},
    audit::{
        Alert, AlertKind, AuditHandle, CredentialRevoke, DetachReason, EventsLost, LostBySandbox,
        PolicyChange, PolicyDigest, PolicyRejected, Quarantine, Record, RuleRef, SandboxLifecycle,
    },
    bpf::{attached_cgroups, BpfError, Links, PinLayout, PolicyMaps, Programs, HOOKS},
    cgroup::Cgroup,
    control::{Admission, DaemonStatus, QuarantineStatus, SandboxStatus},
    policy::{self, Policy},
    posture::Posture,
};

/// Learned addresses one sandbox may hold at once (the kernel maps are shared).
const MAX_LEARNED_PER_SANDBOX: usize = 4096;
/// Learned addresses all sandboxes may hold at once: half the kernel's rule tables, so
/// that sandboxes learning names cannot leave no room for another policy's own rules.
const MAX_LEARNED_ALL: usize = agent_common::MAX_PREFIXES as usize / 2;
/// A sandbox's share of [`MAX_LEARNED_ALL`] is never below this, however many are
/// attached (past that many, the total bounds them all).
const MIN_LEARNED_SHARE: usize = 256;
/// Longest TTL honoured for a learned address, in seconds.
const MAX_LEARNED_TTL: u32 = crate::dns::MAX_ANSWER_TTL;
/// The policy slot a quarantined sandbox's kernel entry points at. Slots handed out start
/// at 1, so this one never holds a rule: every decision falls to the (deny) default.
use agent_common::QUARANTINE_SLOT;
/// `trigger` of a quarantine an operator asked for.
const BY_OPERATOR: &str = "operator";
/// Longest `--reason` kept.
const MAX_REASON: usize = 512;

/// How a sandbox arrives at `attach`, besides its cgroup and policy.
#[derive(Debug, Default)]
pub struct Arrival {
    /// Its network namespace (for the proxy listener); default: that of a process in the
    /// cgroup, else the daemon's.
    pub netns: Option<PathBuf>,
    /// The container's init process at `createRuntime` (the OCI hook), whose posture is
    /// read from the capabilities its config gives it.
    pub runtime_init: Option<crate::control::RuntimeInit>,
}

pub struct Core {
    /// Runtime detaches refused while the sandbox's cgroup ran processes, by sandbox name,
    /// with the cgroup they were for: carried out once it runs none.
    pub poststops_waiting: std::collections::HashMap<String, u64>,
    /// The connections of a sandbox whose policy was just replaced, to be judged again
    /// by the request's handler once it lets the lock go.
    pub pending_cut: Option<connections::CutJob>,
    /// Each sandbox's policy epoch, moved on by a replacement, a detach or the stop.
    pub cut_epochs: HashMap<String, Arc<std::sync::atomic::AtomicU64>>,
    /// The daemon is stopping: control requests that would change anything are refused
    /// (their records would follow `daemon-stop`).
    pub stopping: bool,
    /// Every write of the state file goes through it.
    pub saver: Arc<super::state::StateSaver>,
    /// Credential revocations running in the background.
    pub revocations: Arc<super::revocations::Revocations>,
    /// Control-socket refusals recorded one by one, per caller's sandbox and window.
    pub control_refusals: crate::alerts::RefusalRecords,
    /// Policy slots no sandbox entry names any more, each with when it stopped being
    /// named: emptied [`RETIRE_AFTER`] later ([`Core::clear_retired`]), not at once, so a
    /// decision that read the old entry just before finds the old rules whole, not a
    /// slot half emptied (a narrow deny gone before the broad allow around it).
    pub retiring: Vec<(u32, std::time::Instant, bool)>,
    pub layout: PinLayout,
    pub bpffs: PathBuf,
    pub programs: Programs,
    pub maps: PolicyMaps,
    pub state: State,
    pub state_dir: PathBuf,
    pub audit: AuditHandle,
    pub audit_log: String,
    pub started_at: OffsetDateTime,
    /// Compiled policies by sandbox name (for rule names in records).
    pub compiled: std::collections::HashMap<String, Arc<Policy>>,
    /// Sandboxes detached within [`DEPARTED_FOR`], by index: kernel events they caused
    /// before the detach may be read after it, and still name them and their rules. Their
    /// indices are not given to new sandboxes meanwhile.
    pub departed: std::collections::HashMap<u32, Departed>,
    /// Policies replaced within [`DEPARTED_FOR`], by the kernel slot they were in: kernel
    /// events decided by them may be read after the replacement, and still name their
    /// rules. Their slots are not given to new policies meanwhile.
    pub replaced: std::collections::HashMap<u32, Replaced>,
    /// The credential-injecting proxy and its listeners.
    pub proxy: ProxyRuntime,
    /// Per-sandbox resolvers and the addresses they learned.
    pub dns: DnsRuntime,
    /// Where alerts are raised; applies each sandbox's configured responses.
    pub alerts: Alerts,
    /// Denied decisions per sandbox, for `denial-burst` alerts.
    pub bursts: DenialBursts,
    /// The kernel's count of lost denials per sandbox index when last looked at (from
    /// this daemon's start: denials lost while no daemon ran have no time to burst in).
    pub lost_denied_seen: std::collections::HashMap<u32, u64>,
    /// Runs credential revocations after a quarantine.
    pub runtime: tokio::runtime::Handle,
    /// Whether the BPF LSM program keeps sandboxes from creating packet sockets; `Err`
    /// says why not.
    pub packet_sockets: Result<(), String>,
    /// Whether compat (32-bit) calls cannot set socket options the option hook never sees
    /// (the kernel runs none); `Err` says why they can.
    pub compat_setsockopt: Result<(), String>,
    /// Source-routing refusals per sandbox not yet summarised in an alert.
    pub source_routing: std::collections::HashMap<String, RefusalWindow>,
    /// Processes whose posture was read, per sandbox, by pid; new ones are read on the
    /// next pass, known ones still alive outside the cgroup have left it, and known ones
    /// are read again for capabilities they gained.
    pub known_pids:
        std::collections::HashMap<String, std::collections::BTreeMap<u32, KnownProcess>>,
    /// `policy-rejected` records written: an attach that failed without adding one is
    /// recorded by [`Core::attach_parsed`].
    pub rejections: std::cell::Cell<u64>,
    /// Kernel events counted as lost that the kernel's counters do not hold (undecodable
    /// ones, another build's unread ones): added to `egress.lost.total`.
    pub lost_unread: u64,
}

/// A detached sandbox, kept for naming its last kernel events.
#[derive(Clone, Debug)]
pub struct Departed {
    pub name: String,
    pub policy: Option<Arc<Policy>>,
    pub at: std::time::Instant,
}

/// A policy replaced, kept for naming the rules of its late events.
pub struct Replaced {
    pub policy: Arc<Policy>,
    pub at: std::time::Instant,
}

/// How long a detached sandbox's index keeps naming it (and is not reused).
const DEPARTED_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a slot no entry names keeps its rules: far longer than any one decision that
/// read the entry before it changed runs.
const RETIRE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// A sandbox process whose posture was read.
#[derive(Clone, Copy, Debug, Default)]
pub struct KnownProcess {
    /// Its start time: with the pid it names one process.
    pub start: u64,
    /// The capabilities it held when last read without a gain pending.
    pub caps: u64,
    /// Capabilities gained since, seen once: a gain seen on two passes in a row is
    /// alerted (a runtime's init holds more for a moment, never after a pass).
    pub pending: u64,
}

/// Refusals of one kind for one sandbox since the last alert about them.
#[derive(Debug)]
pub struct RefusalWindow {
    pub count: u64,
    pub since: std::time::Instant,
    /// What was refused (option and header names), for the alert's reason.
    pub what: std::collections::BTreeSet<&'static str>,
}

/// Whether a quarantine set off by `trigger` revokes credentials other sandboxes still
/// use: an operator's does, and so does one for a secret seen where it should not be (the
/// sandbox sent one, or an origin echoed one): the value itself is exposed. One for
/// behaviour (a denial burst, a budget) revokes only what the sandbox alone uses, so that
/// a sandbox cannot revoke what the others work with by misbehaving.
fn revokes_shared(trigger: &str) -> bool {
    trigger == BY_OPERATOR || trigger.starts_with("secret-")
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Core {
    fn links(&self) -> Links<'_> {
        Links {
            layout: &self.layout,
        }
    }

    pub fn save_state(&self) {
        if let Err(e) = self.try_save_state() {
            tracing::error!(error = %e, "Saving state failed");
        }
    }

    /// Saves the state now, through the saver (which waits for a write in progress).
    fn try_save_state(&self) -> anyhow::Result<()> {
        let number = self.saver.number();
        self.saver
            .write(number, &self.state, &self.state_dir)
            .map(|_| ())
    }

    fn lifecycle(rec: &SandboxRecord) -> SandboxLifecycle {
        SandboxLifecycle {
            time: now(),
            sandbox: rec.name.clone(),
            cgroup_path: rec.cgroup.clone(),
            cgroup_id: rec.cgroup_id,
            policy_path: PathBuf::from(&rec.policy_path),
            policy_digest: PolicyDigest::of(rec.policy_source.as_bytes()),
            reason: None,
            packet_sockets_covered: None,
            posture: None,
        }
    }

    /// An attach or adopt record, which also says what the kernel does not cover and what
    /// the sandbox's processes hold.
    fn confined(&self, rec: &SandboxRecord, posture: &Posture) -> SandboxLifecycle {
        SandboxLifecycle {
            packet_sockets_covered: Some(self.packet_sockets.is_ok()),
            posture: Some(posture.clone()),
            ..Self::lifecycle(rec)
        }
    }

    /// Alerts when processes of the sandbox share the daemon's or the host's network
    /// namespace (a policy without proxy rules or names may be attached so): the host's
    /// abstract unix sockets, which no hook judges, are open to them, and its loopback
    /// services as far as the policy's loopback rules allow. Returns the warning to show.
    fn alert_host_netns(&self, sandbox: &str, posture: &Posture, who: &str) -> Option<String> {
        let hosts = HostNetns::read().ok()?;
        let sharing = posture
            .pids
            .iter()
            .filter_map(|pid| netns_id(Path::new(&format!("/proc/{pid}/ns/net"))).ok())
            .filter(|id| hosts.holds(*id))
            .count();
        if sharing == 0 {
            return None;
        }
        let reason = format!(
            "{who} ({sharing} process(es)) share the host's network namespace: the host's \
             abstract unix sockets (which no hook judges) are open to them, and its \
             loopback services as far as the policy's loopback rules allow; give the \
             sandbox a network namespace of its own"
        );
        let mut alert = Alert::new(now(), AlertKind::RiskyPosture, sandbox, reason.clone());
        alert.count = sharing as u64;
        self.alerts.raise(alert);
        Some(reason)
    }

    /// Alerts when processes of the sandbox share the host's (or the daemon's) PID or
    /// mount namespace. With the PID namespace, a process sees the host's processes and
    /// can trace one of its own user (where Yama's `ptrace_scope` is 0) or take its
    /// sockets (`pidfd_getfd`): a socket made outside the sandbox's cgroup is judged by
    /// no program of the sandbox's. With the mount namespace, the daemon's credential
    /// files and the host's unix sockets are in reach as far as file permissions allow.
    /// Returns the warning to show.
    fn alert_host_namespaces(&self, sandbox: &str, posture: &Posture, who: &str) -> Option<String> {
        let shared: Vec<(usize, String)> = [
            (
                "pid",
                "PID namespace (they can trace or take the sockets of unconfined host \
                 processes, which no hook of the sandbox's judges)",
            ),
            (
                "mnt",
                "mount namespace (the daemon's credential files and the host's unix \
                 sockets are in reach as far as file permissions allow)",
            ),
        ]
        .into_iter()
        .filter_map(|(kind, what)| {
            let host = |pid: &str| netns_id(Path::new(&format!("/proc/{pid}/ns/{kind}"))).ok();
            let hosts = [host("self"), host("1")];
            let sharing = posture
                .pids
                .iter()
                .filter_map(|pid| host(&pid.to_string()))
                .filter(|id| hosts.contains(&Some(*id)))
                .count();
            (sharing > 0).then_some((sharing, format!("{sharing} share the host's {what}")))
        })
        .collect();
        if shared.is_empty() {
            return None;
        }
        let reason = format!(
            "{who}: {}; give the sandbox namespaces of its own",
            shared
                .iter()
                .map(|(_, s)| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
        let mut alert = Alert::new(now(), AlertKind::RiskyPosture, sandbox, reason.clone());
        alert.count = shared.iter().map(|(n, _)| *n).max().unwrap_or(1) as u64;
        self.alerts.raise(alert);
        Some(reason)
    }

    /// Raises a risky-posture alert when processes hold capabilities that get around the
    /// kernel programs; `who` says which processes (at attach, or new ones).
    fn alert_posture(&self, sandbox: &str, posture: &Posture, who: &str) {
        let mut risky = posture.risky();
        if risky.is_empty() {
            return;
        }
        // CAP_NET_RAW only matters where packet sockets are not refused.
        if self.packet_sockets.is_ok() {
            risky.retain(|c| *c != "net_raw");
            if risky.is_empty() {
                return;
            }
        }
        let mut reason = format!(
            "{who} ({} process(es)) hold {}",
            posture.pids.len(),
            risky.join(", ")
        );
        if posture.can_leave_cgroup() {
            reason.push_str(
                "; with sys_admin a process can mount cgroup2 and leave the sandbox's cgroup",
            );
        }
        let mut alert = Alert::new(now(), AlertKind::RiskyPosture, sandbox, reason);
        alert.count = posture.pids.len().max(1) as u64;
        self.alerts.raise(alert);
    }

    /// Each sandbox's name and cgroup, for [`Self::walk_sandboxes`] off the lock.
    pub fn sandbox_cgroups(&self) -> Vec<(String, PathBuf)> {
        self.state
            .sandboxes
            .values()
            .map(|r| (r.name.clone(), r.cgroup.clone()))
            .collect()
    }

    /// The processes in each sandbox's cgroup tree: reads the file system only, so the
    /// caller runs it without the daemon's lock (a tree of many cgroups takes a while).
    pub fn walk_sandboxes(
        sandboxes: Vec<(String, PathBuf)>,
    ) -> Vec<(String, PathBuf, std::collections::BTreeSet<u32>)> {
        sandboxes
            .into_iter()
            .map(|(name, cgroup)| {
                let alive = crate::posture::pids_below(&cgroup);
                (name, cgroup, alive)
            })
            .collect()
    }

    /// Reads the posture of processes that appeared in sandboxes since the last pass and
    /// alerts when they hold risky capabilities; alerts when a process seen in a sandbox is
    /// still alive but no longer in its cgroup tree (it moved itself, or was moved, out).
    /// The trees are walked already ([`Self::walk_sandboxes`]); a sandbox detached or
    /// attached elsewhere meanwhile is skipped (its next walk is the next pass's).
    pub fn check_walked_processes(
        &mut self,
        walked: Vec<(String, PathBuf, std::collections::BTreeSet<u32>)>,
    ) {
        // Read once for the pass, and only if some process is not where the walk saw it.
        let mut mount = None;
        for (name, cgroup, alive) in walked {
            if self
                .state
                .sandboxes
                .get(&name)
                .is_none_or(|r| r.cgroup != cgroup)
            {
                continue;
            }
            let mut known = self.known_pids.remove(&name).unwrap_or_default();
            let mut escaped = Vec::new();
            // A process the walk did not list (a tree larger than it reads) but whose
            // own cgroup is still in the sandbox's tree has not left.
            let mut still_inside = |pid: u32| {
                let mount = mount.get_or_insert_with(|| crate::cgroup::cgroup2_mount().ok());
                crate::posture::cgroup_of(pid).is_some_and(|c| {
                    mount
                        .as_ref()
                        .is_some_and(|m| m.join(c.trim_start_matches('/')).starts_with(&cgroup))
                })
            };
            for (pid, k) in &known {
                if !alive.contains(pid)
                    && crate::posture::start_time(*pid) == Some(k.start)
                    && !still_inside(*pid)
                {
                    escaped.push(format!(
                        "pid {pid} now in {}",
                        crate::posture::cgroup_of(*pid).unwrap_or_else(|| "?".into())
                    ));
                }
            }
            if !escaped.is_empty() {
                let mut alert = Alert::new(
                    now(),
                    AlertKind::CgroupEscape,
                    name.clone(),
                    format!(
                        "{} process(es) left the sandbox's cgroup {} while alive: {}",
                        escaped.len(),
                        cgroup.display(),
                        escaped.join(", ")
                    ),
                );
                alert.count = escaped.len() as u64;
                self.alerts.raise(alert);
            }
            // Known processes that gained capabilities (a set-user-ID or file-capability
            // program run after they were read).
            // A pid now naming another process (reused) is read as a new one below.
            known.retain(|pid, k| {
                !alive.contains(pid) || crate::posture::start_time(*pid) == Some(k.start)
            });
            for (pid, k) in known.iter_mut().filter(|(p, _)| alive.contains(p)) {
                let Some(now) = crate::posture::capabilities_of(*pid) else {
                    continue;
                };
                let gained = now & !k.caps;
                if gained == 0 {
                    *k = KnownProcess {
                        caps: now,
                        pending: 0,
                        ..*k
                    };
                } else if gained & k.pending != 0 {
                    let posture = Posture {
                        pids: [*pid].into(),
                        caps: gained & k.pending,
                    };
                    self.alert_posture(
                        &name,
                        &posture,
                        &format!("pid {pid} (capabilities gained since it was first read)"),
                    );
                    *k = KnownProcess {
                        caps: now,
                        pending: 0,
                        ..*k
                    };
                } else {
                    k.pending = gained;
                }
            }
            // The processes listed above, not read before (the tree is walked once).
            let posture = Posture::of(
                alive.iter().copied().filter(|p| !known.contains_key(p)),
                crate::posture::capabilities_of,
            );
            if !posture.pids.is_empty() {
                self.alert_posture(&name, &posture, "new processes");
            }
            let mut next: std::collections::BTreeMap<u32, KnownProcess> = known
                .into_iter()
                .filter(|(p, _)| alive.contains(p))
                .collect();
            next.extend(Self::known(&posture));
            self.known_pids.insert(name, next);
        }
    }

    /// The processes a posture was read from, with their start times and capabilities as
    /// they are now.
    fn known(posture: &Posture) -> Vec<(u32, KnownProcess)> {
        posture
            .pids
            .iter()
            .filter_map(|&pid| {
                let start = crate::posture::start_time(pid)?;
                let caps = crate::posture::capabilities_of(pid)?;
                Some((
                    pid,
                    KnownProcess {
                        start,
                        caps,
                        pending: 0,
                    },
                ))
            })
            .collect()
    }

    /// Remembers the processes a posture was read from.
    fn remember(&mut self, sandbox: &str, posture: &Posture) {
        let pids = Self::known(posture).into_iter().collect();
        self.known_pids.insert(sandbox.to_string(), pids);
    }

    /// Counts a source-routing refusal for the next summarising alert.
    pub fn note_source_routing(&mut self, sandbox: &str, what: &'static str) {
        let w = self
            .source_routing
            .entry(sandbox.to_string())
            .or_insert_with(|| RefusalWindow {
                count: 0,
                since: std::time::Instant::now(),
                what: Default::default(),
            });
        w.count += 1;
        w.what.insert(what);
    }

    /// One alert per sandbox for the source-routing refusals since the last call.
    pub fn flush_alerts(&mut self) {
        for (sandbox, w) in self.source_routing.drain() {
            let names: Vec<&str> = w.what.iter().copied().collect();
            let mut alert = Alert::new(
                now(),
                AlertKind::SourceRouting,
                sandbox,
                format!(
                    "{} attempt(s) to route packets elsewhere than the judged address, to send \
                     them from an address not the host's, or to join multicast groups (which the \
                     kernel announces to the link), were refused ({})",
                    w.count,
                    names.join(", ")
                ),
            );
            alert.count = w.count;
            alert.window_seconds = Some(w.since.elapsed().as_secs().max(1));
            self.alerts.raise(alert);
        }
    }

    fn detached(rec: &SandboxRecord, reason: DetachReason) -> SandboxLifecycle {
        SandboxLifecycle {
            reason: Some(reason),
            ..Self::lifecycle(rec)
        }
    }

    /// The network namespace a sandbox's listeners belong in: the one named at attach
    /// (checked to be the same namespace it was then), else that of a process in its cgroup.
    /// An empty cgroup without a named namespace is refused, and so is the daemon's own
    /// namespace: the proxy and resolver would listen on the host's loopback, where any
    /// host process could spend the sandbox's budget in its name, or take their ports
    /// while the daemon restarts.
    fn sandbox_netns(
        cgroup: &Path,
        netns: Option<&Path>,
        inode: Option<u64>,
    ) -> Result<OpenNetns, String> {
        let path = Self::named_or_found_netns(cgroup, netns, inode)?;
        // Opened once: what is checked below is the namespace the listeners are bound in,
        // whatever the path names by then.
        let opened = OpenNetns::open(&path)
            .map_err(|e| format!("network namespace {}: {e}", path.display()))?;
        let theirs = opened.id();
        if let Some(want) = inode.filter(|want| *want != theirs.1) {
            return Err(format!(
                "network namespace {} is no longer the one attached (inode {} now, {want} then)",
                path.display(),
                theirs.1
            ));
        }
        let hosts =
            HostNetns::read().map_err(|e| format!("the daemon's own network namespace: {e}"))?;
        if hosts.holds(theirs) {
            return Err(format!(
                "the sandbox shares the daemon's network namespace or the host's ({}): its \
                 proxy listener and resolver would be on the host's loopback, open to every \
                 host process; give the sandbox a network namespace of its own, or a policy without proxy \
                 rules and names",
                path.display()
            ));
        }
        Ok(opened)
    }

    fn named_or_found_netns(
        cgroup: &Path,
        netns: Option<&Path>,
        inode: Option<u64>,
    ) -> Result<PathBuf, String> {
        match netns {
            // Checked against the inode seen at attach once opened (`sandbox_netns`).
            Some(p) => Ok(p.to_path_buf()),
            None => netns_of_cgroup(cgroup, inode).map_err(|why| {
                let name_it = "name it with --netns PATH (e.g. /var/run/netns/NAME or \
                               /proc/PID/ns/net), or attach a running process with --pid PID";
                match why {
                    CgroupNetns::Empty => format!(
                        "cgroup {} has no process yet, so its network namespace is unknown; \
                         {name_it}",
                        cgroup.display()
                    ),
                    CgroupNetns::Several(n) => format!(
                        "the processes of cgroup {} are in {n} network namespaces, so the \
                         sandbox's is not known; {name_it}",
                        cgroup.display()
                    ),
                    CgroupNetns::Gone(inode) => format!(
                        "no process of cgroup {} is in the network namespace it was attached \
                         in (inode {inode}) any more; the sandbox's proxy and resolver are not \
                         put anywhere else; attach it again, naming the namespace with --netns",
                        cgroup.display()
                    ),
                }
            }),
        }
    }

    /// The sandbox's kernel entry: its policy, or deny-all while it is quarantined.
    fn kernel_entry(&self, rec: &SandboxRecord, policy: &Policy) -> SandboxInfo {
        if rec.quarantine.is_some() {
            return self.quarantine_entry(rec, Some(policy));
        }
        SandboxInfo {
            index: rec.index,
            policy_slot: rec.slot,
            default_action: policy.default_action().kernel_code(),
            _pad: 0,
            proxy_port: self.proxy.port,
            dns_port: if uses_dns(policy) {
                self.dns.port_for(rec.index)
            } else {
                0
            },
            dns_base: self.dns.base_port,
        }
    }

    /// Deny-all: an empty policy slot, default deny, nothing redirected. DNS still goes to the
    /// sandbox's resolver (when it has one), which refuses every query and records it.
    /// Without a compiled policy (one that no longer compiles after an upgrade) there is
    /// no resolver either, and port 53 is denied like everything else.
    fn quarantine_entry(&self, rec: &SandboxRecord, policy: Option<&Policy>) -> SandboxInfo {
        let dns_port = if policy.is_some_and(uses_dns) {
            self.dns.port_for(rec.index)
        } else {
            0
        };
        self.deny_all_entry(rec.index, dns_port)
    }

    /// An entry in sandbox `index`'s name that denies everything (the empty quarantine
    /// slot), sending DNS to `dns_port` if not 0.
    fn deny_all_entry(&self, index: u32, dns_port: u16) -> SandboxInfo {
        SandboxInfo {
            index,
            policy_slot: QUARANTINE_SLOT,
            default_action: agent_common::action::DENY,
            _pad: 0,
            // Nothing is redirected from an empty slot; the port names the listener the
            // sandbox still may not connect to or bind.
            proxy_port: self.proxy.port,
            dns_port,
            dns_base: self.dns.base_port,
        }
    }

    fn uses_proxy(policy: &Policy) -> bool {
        policy
            .rules()
            .iter()
            .any(|r| r.is_proxy() || r.is_passthrough())
    }

    /// Checks what a policy needs from the daemon (credentials it names exist) and starts
    /// the proxy listener in the sandbox's network namespace when it has proxy rules;
    /// returns that namespace (the caller records the sandbox as its user).
    fn prepare_proxy(
        &mut self,
        policy: &Policy,
        cgroup: &Path,
        netns: Option<&Path>,
        inode: Option<u64>,
    ) -> Result<Option<NetnsId>, String> {
        for name in policy.credential_names() {
            if !self.proxy.has_credential(name) {
                let defined = self.proxy.credential_names();
                let defined = if defined.is_empty() {
                    "it defines none: add it under `credentials:` in the config".to_owned()
                } else {
                    format!("defined: {}", defined.join(", "))
                };
                return Err(format!(
                    "policy names credential {name:?}, which the daemon's config does not \
                     define ({defined})"
                ));
            }
        }
        if !Self::uses_proxy(policy) && !uses_dns(policy) {
            return Ok(None);
        }
        let netns = Self::sandbox_netns(cgroup, netns, inode)?;
        if !Self::uses_proxy(policy) {
            return Ok(None);
        }
        self.proxy.ensure_listener(&netns).map(Some).map_err(|e| {
            format!(
                "starting the proxy listener in {}: {e}",
                netns.path().display()
            )
        })
    }

    /// Lets the proxy serve the sandbox's redirected connections (never while it is
    /// quarantined).
    fn set_route(&self, rec: &SandboxRecord, policy: &Arc<Policy>) {
        self.proxy
            .names
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.index, rec.name.clone());
        if rec.quarantine.is_some() {
            self.drop_route(rec.index);
            return;
        }
        self.proxy
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.index, (rec.name.clone(), policy.clone(), rec.slot));
    }

    /// Starts (or updates, or stops) the sandbox's resolver to match its policy.
    fn start_dns(&mut self, rec: &SandboxRecord, policy: &Arc<Policy>) -> Result<(), String> {
        if !uses_dns(policy) {
            self.dns.stop(rec.index);
            return Ok(());
        }
        let netns = Self::sandbox_netns(&rec.cgroup, rec.netns.as_deref(), rec.netns_inode)?;
        self.dns.ensure(rec.index, &rec.name, policy, &netns)
    }

    /// Puts addresses a sandbox's resolver learned into its kernel rules; called before
    /// the answer is released to the sandbox.
    /// Returns the addresses it refused to install, with why; the resolver removes them
    /// from the answer.
    pub fn learn(
        &mut self,
        index: u32,
        learned: &[crate::dns::Learned],
    ) -> Result<Vec<crate::dns::Refusal>, String> {
        let rec = self.state.by_index(index).ok_or("sandbox is gone")?.clone();
        if rec.quarantine.is_some() {
            return Err("the sandbox is quarantined".into());
        }
        let policy = self
            .compiled
            .get(&rec.name)
            .ok_or("sandbox has no policy")?
            .clone();
        let dns = policy.dns().cloned();
        // Counted once per answer, not per address: the table is shared by all sandboxes.
        let held = self.dns.learned.keys().filter(|(i, _)| *i == index).count();
        // An answer goes in whole or not at all under the cap: one refused half-way would
        // leave addresses installed that its SERVFAIL record does not list.
        let mut new: Vec<std::net::IpAddr> = learned
            .iter()
            .map(|l| crate::net::judged_as(l.addr))
            .filter(|a| {
                self.dns
                    .learned
                    .get(&(index, *a))
                    .is_none_or(|old| old.slot != rec.slot)
            })
            .collect();
        new.sort_unstable();
        new.dedup();
        // Each sandbox's share of what all may hold, so that a few cannot take it all.
        let share = (MAX_LEARNED_ALL / self.state.sandboxes.len().max(1))
            .clamp(MIN_LEARNED_SHARE, MAX_LEARNED_PER_SANDBOX);
        if held + new.len() > share {
            return Err(format!(
                "sandbox {} would hold more than {share} learned addresses (its share of \
                 {MAX_LEARNED_ALL} over {} sandboxes, at most {MAX_LEARNED_PER_SANDBOX})",
                rec.name,
                self.state.sandboxes.len()
            ));
        }
        if self.dns.learned.len() + new.len() > MAX_LEARNED_ALL {
            return Err(format!(
                "the sandboxes would hold more than {MAX_LEARNED_ALL} learned addresses in all \
                 (the rest of the kernel's rule tables is kept for policies' own rules)"
            ));
        }
        let mut refused = Vec::new();
        let mut install_failed_said = false;
        for l in learned {
            // Judge the name by the policy in force now, not the one the query started
            // under: a replacement in between must not be widened by a late answer.
            let ids_now = policy.rules_for_name(&l.name);
            if ids_now.is_empty() {
                // Each refused address is in the query's DNS record: the log says it at
                // debug only, so a sandbox looping on such a name cannot flood it.
                tracing::debug!(sandbox = %rec.name, name = %l.name, "Answer for a name the current policy no longer allows; not learned");
                refused.push((
                    l.addr,
                    "the policy in force no longer allows the name".to_owned(),
                ));
                continue;
            }
            let addr = crate::net::judged_as(l.addr);
            if let Some(why) = super::dns::learning_refusal(&policy, &ids_now, addr) {
                tracing::debug!(sandbox = %rec.name, name = %l.name, %addr, %why, "Not learning a DNS answer");
                refused.push((l.addr, why));
                continue;
            }
            let ids_now = super::dns::rules_carrying(&policy, ids_now, addr);
            let key = (index, addr);
            let known = self
                .dns
                .learned
                .get(&key)
                .filter(|old| old.slot == rec.slot);
            // An address another name already holds under a rule that sends it another
            // way (directly, or through the proxy): the kernel could not tell the names'
            // connections apart, so one rule would serve both. First come, first served.
            // Rules whose answers ran out (not yet swept) hold nothing any more.
            let now = std::time::Instant::now();
            let held = known.map(|old| old.rule_ids_at(now)).unwrap_or_default();
            let held = held.as_slice();
            let fresh: Vec<u16> = ids_now
                .iter()
                .copied()
                .filter(|id| !held.contains(id))
                .collect();
            if let Some((theirs, ours)) = policy.crossing_paths(held, &fresh) {
                let why = format!(
                    "it is already an address of a name rule `{theirs}` covers, which sends \
                     connections another way than rule `{ours}` (one directly, one through \
                     the proxy): a connection to it could not be told apart"
                );
                tracing::debug!(sandbox = %rec.name, name = %l.name, %addr, %why, "Not learning a DNS answer");
                refused.push((l.addr, why));
                continue;
            }
            // An address several allowed names resolve to gets all their rules.
            let mut rule_ids = held.to_vec();
            for id in &ids_now {
                if !rule_ids.contains(id) {
                    rule_ids.push(*id);
                }
            }
            rule_ids.sort_unstable();
            // An address that cannot be installed is left out of the answer (and listed
            // among its refused addresses); those installed before it stay, and are listed.
            let installed = policy
                .learned_entries(addr, &rule_ids)
                .map_err(|e| e.to_string())
                .and_then(|entries| {
                    self.maps
                        .set_prefix(rec.slot, host_net(addr), &entries)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = installed {
                // A kernel failure, said once per answer (it lists every address refused).
                if !install_failed_said {
                    tracing::warn!(sandbox = %rec.name, name = %l.name, %addr, error = %e, "Installing a learned address failed (the query's DNS record lists every address left out)");
                    install_failed_said = true;
                }
                refused.push((l.addr, format!("installing it in the kernel failed: {e}")));
                continue;
            }
            // TTLs are capped so an answer cannot pin an address for ever.
            let ttl = l.ttl.min(MAX_LEARNED_TTL);
            let lifetime = dns.as_ref().map_or_else(
                || {
                    let d = crate::policy::DnsConfig::DEFAULT_MIN_TTL;
                    std::time::Duration::from_secs(
                        u64::from(ttl.max(d)) + u64::from(crate::policy::DnsConfig::DEFAULT_GRACE),
                    )
                },
                |d| d.lifetime(ttl),
            );
            let expires = now + lifetime;
            // Each of this name's rules lives as long as its answers say; the others keep
            // the time their own names' answers gave them.
            let mut rules = known.map(|old| old.rules.clone()).unwrap_or_default();
            rules.retain(|_, (_, until)| *until > now);
            for id in ids_now {
                let until = rules
                    .get(&id)
                    .map_or(expires, |(_, until)| (*until).max(expires));
                rules.insert(id, (l.name.clone(), until));
            }
            debug_assert_eq!(rules.keys().copied().collect::<Vec<_>>(), rule_ids);
            let expires = known.map_or(expires, |old| old.expires.max(expires));
            self.dns.learned.insert(
                key,
                LearnedAddr {
                    name: l.name.clone(),
                    rules,
                    slot: rec.slot,
                    expires,
                },
            );
        }
        Ok(refused)
    }

    /// Carries out the runtime detaches refused while their sandbox's cgroup ran processes
    /// ([`Core::detach`]), once it runs none (or is gone); forgets those whose sandbox
    /// went or now confines another cgroup.
    pub fn detach_stopped(&mut self) {
        let waiting: Vec<(String, u64)> = self.poststops_waiting.drain().collect();
        for (name, cgroup_id) in waiting {
            let Some(rec) = self.state.sandboxes.get(&name) else {
                continue;
            };
            if rec.cgroup_id != cgroup_id {
                continue;
            }
            if runs_processes(rec) {
                self.poststops_waiting.insert(name, cgroup_id);
                continue;
            }
            let cgroup = rec.cgroup.clone();
            match self.detach(Some(name.clone()), Some(cgroup), DetachReason::Hook) {
                Ok(_) => {
                    tracing::info!(sandbox = %name, "A runtime's poststop carried out once its cgroup ran nothing")
                }
                Err(e) => {
                    tracing::warn!(sandbox = %name, error = %e, "Carrying out a runtime's poststop failed")
                }
            }
        }
    }

    /// Detaches sandboxes whose cgroup directory is gone (the container was removed
    /// without `detach`), so their index, slot, links and resolver are freed.
    pub fn reap_vanished(&mut self) {
        let gone: Vec<String> = self
            .state
            .sandboxes
            .values()
            .filter(|r| match std::fs::metadata(&r.cgroup) {
                Ok(m) => std::os::unix::fs::MetadataExt::ino(&m) != r.cgroup_id,
                // Only a cgroup that is not there is gone: any other error (a transient
                // failure, too many open files) must not detach a live sandbox.
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            })
            .map(|r| r.name.clone())
            .collect();
        for name in gone {
            match self.detach(Some(name.clone()), None, DetachReason::CgroupRemoved) {
                Ok(_) => tracing::info!(sandbox = %name, "cgroup removed; sandbox detached"),
                Err(e) => {
                    tracing::warn!(sandbox = %name, error = %e, "Detaching a sandbox whose cgroup is gone failed")
                }
            }
        }
    }

    /// Removes learned addresses whose TTL and grace have run out, restoring what static
    /// rules say about the same address.
    pub fn expire_learned(&mut self) {
        self.clear_retired();
        let now = std::time::Instant::now();
        for (index, addr, l) in self.dns.expired(now) {
            let net = host_net(addr);
            let name = self.state.by_index(index).map(|r| r.name.clone());
            // Still held by an answer whose rules are not all over: the entry is made
            // again of the rules still in force (maybe none: its static rules alone).
            let left = l.rule_ids_at(now);
            let policy = name.as_ref().and_then(|n| self.compiled.get(n)).cloned();
            if let (true, Some(policy)) = (l.expires > now, policy) {
                let rebuilt = policy
                    .learned_entries(addr, &left)
                    .map_err(|e| e.to_string())
                    .and_then(|entries| {
                        self.maps
                            .set_prefix(l.slot, net, &entries)
                            .map_err(|e| e.to_string())
                    });
                match rebuilt {
                    Ok(()) => {
                        if let Some(entry) = self.dns.learned.get_mut(&(index, addr)) {
                            entry.rules.retain(|_, (_, until)| *until > now);
                        }
                        tracing::debug!(%addr, name = %l.name, "Some rules of a learned address expired");
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "Removing the expired rules of a learned address failed")
                    }
                }
                continue;
            }
            let stat = name
                .as_ref()
                .and_then(|n| self.compiled.get(n))
                .and_then(|p| p.static_entry(net));
            let r = match stat {
                Some(rules) => self.maps.set_prefix(l.slot, net, &rules),
                None => self.maps.remove_prefix(l.slot, net),
            };
            if let Err(e) = r {
                tracing::warn!(%addr, error = %e, "Removing an expired learned address failed");
                continue;
            }
            tracing::debug!(%addr, name = %l.name, "Learned address expired");
            self.dns.learned.remove(&(index, addr));
        }
    }

    fn drop_route(&self, index: u32) {
        self.proxy
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
    }

    fn install(&mut self, slot: u32, policy: &Policy) -> Result<(), String> {
        let rules = policy.kernel_rules().map_err(|e| e.to_string())?;
        self.maps.clear_slot(slot).map_err(|e| e.to_string())?;
        self.maps
            .install_rules(slot, &rules.v4, &rules.v6)
            .map_err(|e| e.to_string())
    }

    /// Empties `slot` once no decision can still be reading it: no entry names it now.
    fn retire_slot(&mut self, slot: u32) {
        self.retiring.push((slot, std::time::Instant::now(), false));
    }

    /// Empties the slots retired [`RETIRE_AFTER`] ago or more (run periodically and before
    /// a slot is chosen).
    /// A slot that fails to empty stays to be tried again (said once). What the daemon's
    /// stop leaves is emptied by the next start's adoption.
    pub fn clear_retired(&mut self) {
        let mut retiring = std::mem::take(&mut self.retiring);
        retiring.retain_mut(|(slot, at, said)| {
            if at.elapsed() < RETIRE_AFTER {
                return true;
            }
            match self.maps.clear_slot(*slot) {
                Ok(()) => false,
                Err(e) => {
                    if !*said {
                        tracing::warn!(error = %e, slot = *slot, "Clearing a policy slot no sandbox uses failed; trying again");
                        *said = true;
                    }
                    true
                }
            }
        });
        self.retiring = retiring;
    }

    fn free_slot(&mut self) -> Result<u32, String> {
        self.clear_retired();
        self.replaced.retain(|_, r| r.at.elapsed() < DEPARTED_FOR);
        let mut busy = self.maps.used_slots();
        busy.extend(self.replaced.keys().copied());
        busy.extend(self.retiring.iter().map(|(slot, ..)| *slot));
        self.state
            .free_slot(MAX_POLICY_SLOTS, &busy)
            .ok_or_else(|| "no free policy slot in the kernel maps".to_string())
    }

    /// Parses and compiles a policy, kernel rules included: the slow part of an attach,
    /// done before the daemon's lock is taken so other sandboxes' audit and DNS go on.
    pub fn prepare_policy(source: &str, policy_path: &str) -> Result<Policy, String> {
        let policy = policy::parse_str(source, policy_path).map_err(|e| e.to_string())?;
        policy.kernel_rules().map_err(|e| e.to_string())?;
        Ok(policy)
    }

    /// Attaches a new sandbox or replaces an attached sandbox's policy, with the policy
    /// already through [`Core::prepare_policy`] (outside the lock). Every refusal is a
    /// `policy-rejected` record (a busy name, a cgroup already attached or nested, a
    /// listener that cannot bind, ...), in the name asked for or the cgroup's.
    pub fn attach_parsed(
        &mut self,
        cgroup: &Path,
        name: Option<String>,
        policy_path: String,
        source: String,
        arrival: Arrival,
        parsed: Result<Policy, String>,
    ) -> Result<String, String> {
        let recorded = self.rejections.get();
        // The name asked for, else the cgroup's, shown safely; never empty (the schema
        // says so).
        let asked = name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| {
                cgroup.file_name().map_or_else(
                    || cgroup.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                )
            });
        let sandbox = match crate::text::sanitize(asked.trim(), 64) {
            s if s.is_empty() => "(unnamed)".to_owned(),
            s => s,
        };
        let digest = PolicyDigest::of(source.as_bytes());
        let path = policy_path.clone();
        let result = self.attach_checked(cgroup, name, policy_path, source, arrival, parsed);
        if let Err(error) = &result {
            if self.rejections.get() == recorded {
                let error = crate::text::sanitize(error, 1000);
                self.policy_rejected(
                    sandbox,
                    &path,
                    Some(digest),
                    format!("attach refused: {error}"),
                );
            }
        }
        result
    }

    fn attach_checked(
        &mut self,
        cgroup: &Path,
        name: Option<String>,
        policy_path: String,
        source: String,
        arrival: Arrival,
        parsed: Result<Policy, String>,
    ) -> Result<String, String> {
        let Arrival {
            netns,
            runtime_init,
        } = arrival;
        let cgroup = Cgroup::open(cgroup).map_err(|e| e.to_string())?;
        // A container re-created at once under the same id gets a new cgroup at the same
        // path: the sandbox of the old one goes now, not at the next housekeeping tick.
        self.reap_vanished();
        let (name, named) = match name {
            Some(n) => (n, true),
            None => (
                cgroup
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(|| "the cgroup root cannot be a sandbox".to_string())?,
                false,
            ),
        };
        if let Some(problem) = crate::text::sandbox_name_problem(&name) {
            // A runtime's cgroup names (`docker-<64 hex>.scope`) are often too long.
            return Err(if named {
                problem
            } else {
                format!("{problem} (the name of its cgroup directory: give one with --name)")
            });
        }
        check_placement(&cgroup.path)?;
        let policy = match parsed {
            Ok(p) => p,
            Err(error) => {
                self.policy_rejected(
                    name.clone(),
                    &policy_path,
                    Some(PolicyDigest::of(source.as_bytes())),
                    error.clone(),
                );
                let keep = if self.state.sandboxes.contains_key(&name) {
                    "; the sandbox keeps its current policy"
                } else {
                    ""
                };
                return Err(format!("{error}{keep}"));
            }
        };
        if let Some(other) = self.state.by_cgroup(cgroup.id) {
            if other.name != name {
                return Err(format!(
                    "cgroup {} is already attached as sandbox {:?}",
                    cgroup.path.display(),
                    other.name
                ));
            }
        }
        // A sandbox inside (or around) another would run both sandboxes' programs: the
        // inner one's redirects would then be judged again by the outer one's.
        if let Some(other) = self.state.sandboxes.values().find(|o| {
            o.cgroup_id != cgroup.id
                && (o.cgroup.starts_with(&cgroup.path) || cgroup.path.starts_with(&o.cgroup))
        }) {
            return Err(format!(
                "cgroup {} is nested with sandbox {:?} ({}); sandboxes cannot nest",
                cgroup.path.display(),
                other.name,
                other.cgroup.display()
            ));
        }
        let existing = self.state.sandboxes.get(&name).cloned();
        if let Some(old) = &existing {
            if old.cgroup_id != cgroup.id {
                return Err(format!(
                    "sandbox name {name:?} is already used by cgroup {}",
                    old.cgroup.display()
                ));
            }
            // A runtime's hook attaches a container that is starting: one that names a
            // running sandbox and is placed in its cgroup (a raw `cgroupsPath`, a shared
            // cgroup) would otherwise replace that sandbox's policy with its own.
            if runtime_init.is_some() {
                let error = format!(
                    "sandbox {name:?} is already attached to cgroup {}: a starting \
                     container's hook does not replace a running sandbox's policy (detach it \
                     first, or run the hook in pod scope to join it)",
                    cgroup.path.display()
                );
                self.policy_rejected(
                    name.clone(),
                    &policy_path,
                    Some(PolicyDigest::of(source.as_bytes())),
                    error.clone(),
                );
                return Err(error);
            }
        }
        let posture = match &runtime_init {
            Some(init) => {
                let caps = crate::posture::oci_capability_mask(&init.capabilities)
                    .map_err(|e| format!("the container's OCI config: {e}"))?;
                Posture::read_declared(&cgroup.path, init.pid, caps)
            }
            None => Posture::read(&cgroup.path),
        };
        let held = posture.violations(policy.no_capabilities());
        let unmet = if !held.is_empty() {
            Some(format!(
                "{policy_path}: require.no_capabilities: processes in {} hold {} (pids {})",
                cgroup.path.display(),
                held.join(", "),
                posture
                    .pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
        } else if policy.requires_non_inet_refused() {
            self.packet_sockets.as_ref().err().map(|why| {
                format!(
                    "{policy_path}: require.non_inet_sockets_refused: this daemon cannot \
                     refuse packet, vsock and other non-inet sockets ({why})"
                )
            })
        } else {
            None
        };
        if let Some(error) = unmet {
            self.policy_rejected(
                name.clone(),
                &policy_path,
                Some(PolicyDigest::of(source.as_bytes())),
                error.clone(),
            );
            let keep = if existing.is_some() {
                "; the sandbox keeps its current policy"
            } else {
                ""
            };
            return Err(format!("{error}{keep}"));
        }
        let (netns, inode) = match netns {
            Some(p) => {
                let id =
                    netns_id(&p).map_err(|e| format!("network namespace {}: {e}", p.display()))?;
                (Some(p), Some(id.1))
            }
            None => match existing.as_ref().map(|o| (o.netns.clone(), o.netns_inode)) {
                Some(kept @ (_, Some(_))) => kept,
                // Not named: the namespace its processes are in now is remembered, so that
                // a process that makes one of its own later is not taken for the
                // sandbox's when the listeners are set up again (a restart, a new policy).
                kept => {
                    let found = netns_of_cgroup(&cgroup.path, None)
                        .ok()
                        .and_then(|p| netns_id(&p).ok());
                    match found {
                        Some(id) => (None, Some(id.1)),
                        None => kept.unwrap_or((None, None)),
                    }
                }
            },
        };
        let listener = match self.prepare_proxy(&policy, &cgroup.path, netns.as_deref(), inode) {
            Ok(l) => l,
            Err(e) => {
                self.proxy.close_unused();
                return Err(e);
            }
        };
        let policy = Arc::new(policy);
        let result = match existing {
            Some(old) => self.replace_policy(old, policy, policy_path, source, (netns, inode)),
            None => self.attach_new(
                cgroup,
                name,
                policy,
                policy_path,
                source,
                (netns, inode),
                posture,
            ),
        };
        match &result {
            Ok((index, _)) => self.proxy.set_user(*index, listener),
            Err(_) => self.proxy.close_unused(),
        }
        result.map(|(_, msg)| msg)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "each argument is one checked piece of the attach request"
    )]
    fn attach_new(
        &mut self,
        cgroup: Cgroup,
        name: String,
        policy: Arc<Policy>,
        policy_path: String,
        source: String,
        (netns, netns_inode): (Option<PathBuf>, Option<u64>),
        posture: Posture,
    ) -> Result<(u32, String), String> {
        self.departed.retain(|_, d| d.at.elapsed() < DEPARTED_FOR);
        let departed: Vec<u32> = self.departed.keys().copied().collect();
        let index = self
            .state
            .free_index(MAX_SANDBOXES, &departed)
            .ok_or_else(|| format!("at most {} sandboxes", MAX_SANDBOXES - 1))?;
        let slot = self.free_slot()?;
        let rec = SandboxRecord {
            name: name.clone(),
            cgroup: cgroup.path.clone(),
            cgroup_id: cgroup.id,
            index,
            slot,
            policy_digest: PolicyDigest::of(source.as_bytes()).as_str().to_string(),
            policy_path,
            policy_source: source,
            attached_at: rfc3339(now()),
            netns,
            netns_inode,
            quarantine: None,
        };
        self.maps.reset_counters(index).map_err(|e| e.to_string())?;
        self.start_dns(&rec, &policy)?;
        if let Err(e) = self.install(slot, &policy) {
            // Its resolver must not outlive the attach: the next sandbox given the index
            // would find it answering in this one's namespace, in this one's name.
            self.dns.stop(index);
            let _ = self.maps.clear_slot(slot);
            return Err(e);
        }
        // The sandbox entry exists before the programs run, so the first decision already
        // has its policy.
        let result = self
            .maps
            .set_sandbox(cgroup.id, self.kernel_entry(&rec, &policy))
            .and_then(|()| {
                Links {
                    layout: &self.layout,
                }
                .attach(&mut self.programs, &cgroup.path, cgroup.id)
            });
        if let Err(e) = result {
            self.dns.stop(index);
            let _ = self.links().detach(cgroup.id);
            let _ = self.maps.remove_sandbox(cgroup.id);
            let _ = self.maps.clear_slot(slot);
            return Err(e.to_string());
        }
        let unbounded = cgroup.bound_tree();
        for why in &unbounded {
            tracing::warn!(sandbox = %name, cgroup = %cgroup.path.display(), "The sandbox's cgroup tree could not be bounded: {why}");
        }
        self.audit
            .emit(Record::SandboxAttach(self.confined(&rec, &posture)));
        self.alert_posture(&name, &posture, "processes at attach");
        let shared_netns = self.alert_host_netns(&name, &posture, "processes at attach");
        let shared_ns = self.alert_host_namespaces(&name, &posture, "processes at attach");
        let mut msg = format!(
            "attached sandbox {name:?} (cgroup {}, id {}) with {} rules, default {}",
            rec.cgroup.display(),
            rec.cgroup_id,
            policy.rules().len(),
            policy.default_action()
        );
        if let Err(why) = &self.packet_sockets {
            msg.push_str(&format!(
                "; WARNING: packet sockets are not covered ({why})"
            ));
        }
        let risky = posture.risky();
        if !risky.is_empty() {
            msg.push_str(&format!(
                "; WARNING: sandbox processes hold {}",
                risky.join(", ")
            ));
        }
        for why in [shared_netns, shared_ns].into_iter().flatten() {
            msg.push_str(&format!("; WARNING: {why}"));
        }
        if !unbounded.is_empty() {
            msg.push_str(&format!(
                "; WARNING: the cgroups it may create below its own are not bounded ({})",
                unbounded.join("; ")
            ));
        }
        self.remember(&name, &posture);
        self.set_route(&rec, &policy);
        self.alerts.set_sandbox(&name, policy.alerts().clone());
        self.bursts.forget(index);
        self.state.sandboxes.insert(name.clone(), rec);
        self.compiled.insert(name, policy);
        self.save_state();
        Ok((index, msg))
    }

    fn replace_policy(
        &mut self,
        old: SandboxRecord,
        policy: Arc<Policy>,
        policy_path: String,
        source: String,
        (netns, netns_inode): (Option<PathBuf>, Option<u64>),
    ) -> Result<(u32, String), String> {
        let slot = self.free_slot()?;
        self.install(slot, &policy)?;
        let mut rec = old.clone();
        rec.slot = slot;
        rec.policy_path = policy_path;
        rec.policy_digest = PolicyDigest::of(source.as_bytes()).as_str().to_string();
        rec.policy_source = source;
        rec.netns = netns;
        rec.netns_inode = netns_inode;
        // One map update switches every later decision to the new rules; until it has
        // succeeded nothing else changes, so a failure leaves the old policy whole.
        if let Err(e) = self
            .maps
            .set_sandbox(rec.cgroup_id, self.kernel_entry(&rec, &policy))
        {
            let _ = self.maps.clear_slot(slot);
            return Err(e.to_string());
        }
        self.set_route(&rec, &policy);
        self.alerts.set_sandbox(&rec.name, policy.alerts().clone());
        self.proxy.close_connections(rec.index);
        // The names each address was learned from: connections to it are judged again by
        // what the new policy lets those names reach.
        let learned = self.learned_names(rec.index);
        // Addresses learned under the old rules go with the old slot; clients re-resolve.
        self.dns.learned.retain(|(i, _), _| *i != rec.index);
        let dns_problem = self.start_dns(&rec, &policy).err();
        if let Some(e) = &dns_problem {
            tracing::error!(sandbox = %rec.name, error = %e, "DNS resolver did not start; the sandbox's DNS fails until it does");
            // The kernel already sends the sandbox's DNS to a port nothing listens on.
            self.policy_rejected(
                rec.name.clone(),
                &rec.policy_path,
                Some(PolicyDigest::of(rec.policy_source.as_bytes())),
                format!(
                    "the policy is in force but its DNS resolver did not start ({e}); the \
                     sandbox's DNS queries fail until it is attached again"
                ),
            );
        }
        self.retire_slot(old.slot);
        self.audit.emit(Record::PolicyChange(PolicyChange {
            time: now(),
            sandbox: rec.name.clone(),
            policy_path: PathBuf::from(&rec.policy_path),
            previous_digest: PolicyDigest::of(old.policy_source.as_bytes()),
            digest: PolicyDigest::of(rec.policy_source.as_bytes()),
        }));
        // Which connections are the old policy's, listed now (the new one is in force);
        // judged once the daemon's lock is let go (see `connections`).
        let epoch = self.cut_epoch(&rec.name);
        let at = epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        self.pending_cut = Some(connections::CutJob {
            sandbox: rec.name.clone(),
            cgroup_id: rec.cgroup_id,
            snapshot: connections::Snapshot::take(&rec.cgroup, rec.netns.as_deref()),
            epoch,
            at,
            policy_path: PathBuf::from(&rec.policy_path),
            policy_digest: PolicyDigest::of(rec.policy_source.as_bytes()),
            judge: connections::Judge {
                policy: policy.clone(),
                old_policy: self.compiled.get(&rec.name).cloned(),
                learned,
                daemon_ports: [
                    self.proxy.port,
                    self.dns.port_for(rec.index),
                    self.dns.base_port,
                ]
                .into_iter()
                .filter(|p| *p != 0)
                .collect(),
            },
            audit: self.audit.clone(),
        });
        let mut msg = format!(
            "replaced the policy of sandbox {:?}: {} rules, default {}",
            rec.name,
            policy.rules().len(),
            policy.default_action()
        );
        if let Some(e) = dns_problem {
            msg.push_str(&format!("; WARNING: its DNS resolver did not start: {e}"));
        }
        if rec.quarantine.is_some() {
            msg.push_str("; the sandbox stays quarantined until `egressctl release`");
        }
        let index = rec.index;
        if let Some(previous) = self.compiled.insert(rec.name.clone(), policy) {
            self.replaced.insert(
                old.slot,
                Replaced {
                    policy: previous,
                    at: std::time::Instant::now(),
                },
            );
        }
        self.state.sandboxes.insert(rec.name.clone(), rec);
        self.save_state();
        Ok((index, msg))
    }

    /// Sandbox `name`'s policy epoch, which a cut job checks before each connection it
    /// closes (see [`connections::CutJob`]).
    fn cut_epoch(&mut self, name: &str) -> Arc<std::sync::atomic::AtomicU64> {
        self.cut_epochs.entry(name.to_owned()).or_default().clone()
    }

    /// Stops the cut jobs of sandbox `name` (all with `None`) before their next
    /// connection: its policy changed again, it was detached, or the daemon stops.
    pub fn supersede_cuts(&mut self, name: Option<&str>) {
        for (sandbox, epoch) in &self.cut_epochs {
            if name.is_none_or(|n| n == sandbox) {
                epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
        if let Some(n) = name {
            self.cut_epochs.remove(n);
        }
    }

    /// The names each address sandbox `index` learned was learned from.
    fn learned_names(&self, index: u32) -> HashMap<IpAddr, Vec<String>> {
        let mut names: HashMap<IpAddr, Vec<String>> = HashMap::new();
        for ((i, ip), learned) in &self.dns.learned {
            if *i != index {
                continue;
            }
            let entry = names.entry(*ip).or_default();
            for name in learned
                .rules
                .values()
                .map(|(name, _)| name)
                .chain([&learned.name])
            {
                if !entry.contains(name) {
                    entry.push(name.clone());
                }
            }
        }
        names
    }

    /// Removes confinement by name or cgroup path (by name, when both are given, only if
    /// the sandbox is that cgroup's). A cgroup with links pinned but no state (left by a
    /// lost state directory) is detached too.
    pub fn detach(
        &mut self,
        name: Option<String>,
        cgroup: Option<PathBuf>,
        reason: DetachReason,
    ) -> Result<String, String> {
        let (rec, cgroup_id) = match (name, cgroup) {
            (Some(n), expected) => {
                let rec = self
                    .state
                    .sandboxes
                    .get(&n)
                    .cloned()
                    .ok_or_else(|| format!("no sandbox named {n:?}"))?;
                // Name and cgroup together (a runtime hook): only that cgroup's sandbox
                // goes, so a container named like another cannot release the other.
                if let Some(path) = expected {
                    let want = crate::cgroup::resolve(&path).map_err(|e| e.to_string())?;
                    if rec.cgroup != want {
                        return Err(format!(
                            "sandbox {n:?} confines cgroup {}, not {}; not detached",
                            rec.cgroup.display(),
                            want.display()
                        ));
                    }
                }
                // A runtime's `poststop` is for a container that has stopped: a sandbox
                // whose cgroup still runs processes is a later container of the same name
                // and path (created again before the earlier one's hook reached the
                // daemon), which must stay confined.
                if reason == DetachReason::Hook {
                    // What cannot be told counts as running: the sandbox stays confined.
                    if runs_processes(&rec) {
                        let error = format!(
                            "a runtime's poststop asked to detach sandbox {n:?}, whose cgroup \
                             {} still runs processes (or cannot be read): an earlier \
                             container's poststop; not detached now (it is once the cgroup \
                             runs none)",
                            rec.cgroup.display()
                        );
                        tracing::warn!(sandbox = %n, "{error}");
                        self.policy_rejected(n.clone(), &rec.policy_path, None, error.clone());
                        // Kept: once the cgroup runs nothing, the container has stopped
                        // too, and the detach it asked for is carried out then.
                        self.poststops_waiting.insert(n.clone(), rec.cgroup_id);
                        return Err(error);
                    }
                }
                let id = rec.cgroup_id;
                (Some(rec), id)
            }
            (None, Some(path)) => {
                let cg = Cgroup::open(&path).map_err(|e| e.to_string())?;
                (self.state.by_cgroup(cg.id).cloned(), cg.id)
            }
            (None, None) => return Err("name a sandbox (--name) or a cgroup (--cgroup)".into()),
        };
        let unpinned = self.links().detach(cgroup_id).map_err(|e| e.to_string())?;
        self.maps
            .remove_sandbox(cgroup_id)
            .map_err(|e| e.to_string())?;
        match rec {
            Some(rec) => {
                let _ = self.maps.clear_slot(rec.slot);
                self.audit
                    .emit(Record::SandboxDetach(Self::detached(&rec, reason)));
                self.drop_route(rec.index);
                self.proxy
                    .names
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&rec.index);
                self.proxy.close_connections(rec.index);
                self.proxy.forget_limits(rec.index);
                self.proxy.set_user(rec.index, None);
                self.dns.forget(rec.index);
                self.alerts.remove_sandbox(&rec.name);
                self.bursts.forget(rec.index);
                self.state.sandboxes.remove(&rec.name);
                self.supersede_cuts(Some(&rec.name));
                let policy = self.compiled.remove(&rec.name);
                self.departed.insert(
                    rec.index,
                    Departed {
                        name: rec.name.clone(),
                        policy: policy.clone(),
                        at: std::time::Instant::now(),
                    },
                );
                self.save_state();
                let store = self.proxy.credentials();
                let name = rec.name.clone();
                self.runtime.spawn(async move {
                    let n = store.forget_sandbox(&name).await;
                    if n > 0 {
                        tracing::info!(sandbox = %name, sessions = n, "Dropped the detached sandbox's STS sessions");
                    }
                });
                if let Some(policy) = policy {
                    self.revoke_unused_leases(&rec.name, &policy);
                }
                Ok(format!(
                    "detached sandbox {:?} (cgroup {})",
                    rec.name,
                    rec.cgroup.display()
                ))
            }
            None if unpinned => Ok(format!(
                "detached cgroup id {cgroup_id} (no sandbox record)"
            )),
            None => Err(format!("cgroup id {cgroup_id} is not attached")),
        }
    }

    /// Switches a sandbox to deny-all: one kernel map update points it at an empty policy
    /// slot with default deny and no proxy (so every later connect or send fails with
    /// EPERM and is recorded), the proxy stops serving it and closes its open
    /// connections, its resolver refuses every query, and the live values of the
    /// credentials its policy names are revoked where a revocation is configured. The
    /// state is saved before the kernel is switched, so a daemon that dies in between
    /// quarantines it when it restarts (a failed save is reported, not a reason to wait). `trigger` is `operator` or an alert kind.
    pub fn quarantine(
        &mut self,
        name: &str,
        reason: Option<String>,
        trigger: &str,
    ) -> Result<String, String> {
        let mut rec = self
            .state
            .sandboxes
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no sandbox named {name:?}"))?;
        if let Some(q) = &rec.quarantine {
            // One whose kernel switch failed before is switched now.
            let switched = self
                .maps
                .sandbox(rec.cgroup_id)
                .is_some_and(|e| e.policy_slot == QUARANTINE_SLOT);
            if !switched {
                let policy = self.compiled.get(name).cloned();
                let entry = self.quarantine_entry(&rec, policy.as_deref());
                if let Err(e) = self.maps.set_sandbox(rec.cgroup_id, entry) {
                    return Err(format!(
                        "sandbox {name:?} is quarantined in the daemon, but switching the \
                         kernel to deny-all failed again: {e}"
                    ));
                }
                tracing::warn!(sandbox = %rec.name, "Quarantine's kernel switch done on a second attempt");
                // The trail's failed quarantine is complete now.
                self.audit.emit(Record::SandboxQuarantine(quarantine_record(
                    &rec,
                    q.reason.clone(),
                    &q.trigger,
                    None,
                )));
            }
            return Ok(format!(
                "sandbox {name:?} is already quarantined (since {}, by {})",
                q.since, q.trigger
            ));
        }
        // A sandbox whose stored policy no longer compiles can still be quarantined.
        let policy = self.compiled.get(name).cloned();
        let reason = reason
            .map(|r| stored_reason(&r, super::log::mask))
            .filter(|r| !r.trim().is_empty());
        rec.quarantine = Some(QuarantineState {
            since: rfc3339(now()),
            trigger: trigger.to_string(),
            reason: reason.clone(),
        });
        self.state.sandboxes.insert(rec.name.clone(), rec.clone());
        // Isolation comes first: a state that cannot be saved does not stop it, but the
        // operator is told it may not outlive a daemon restart.
        let unsaved = self.try_save_state().err().map(|e| {
            tracing::error!(sandbox = %rec.name, error = %e, "Saving the quarantine failed; quarantining anyway");
            format!("; WARNING: saving the state failed ({e}), so a restarted daemon would not know it is quarantined")
        });
        // Stale rules in the reserved slot would make quarantine less than deny-all.
        if let Err(e) = self.maps.clear_slot(QUARANTINE_SLOT) {
            tracing::warn!(error = %e, "Clearing the quarantine slot failed");
        }
        let entry = self.quarantine_entry(&rec, policy.as_deref());
        let kernel = self.maps.set_sandbox(rec.cgroup_id, entry);
        // What the daemon serves is cut whatever the kernel did: a sandbox whose kernel
        // entry could not be switched still gets no proxied connection and no answer.
        // The route goes before the connections, so the proxy's accept loop cannot keep
        // one it was still setting up (it checks the route again under the same lock).
        self.drop_route(rec.index);
        self.proxy.close_connections(rec.index);
        self.dns.set_quarantined(rec.index, true);
        if let Err(e) = kernel {
            // It stays quarantined (a restarted daemon switches the kernel at adoption,
            // `egressctl release` undoes the rest), and the trail says what is not cut.
            let error = format!(
                "switching the kernel to deny-all failed: {e}; the proxy and resolver refuse \
                 the sandbox, but connections and sends its policy allows directly are NOT \
                 refused"
            );
            tracing::error!(sandbox = %rec.name, trigger, %error, "Sandbox quarantined in part");
            self.audit.emit(Record::SandboxQuarantine(quarantine_record(
                &rec,
                reason,
                trigger,
                Some(error.clone()),
            )));
            if let Some(p) = policy {
                self.revoke_credentials(&rec.name, &p, revokes_shared(trigger));
            }
            return Err(error);
        }
        self.audit.emit(Record::SandboxQuarantine(quarantine_record(
            &rec, reason, trigger, None,
        )));
        tracing::warn!(sandbox = %rec.name, trigger, "Sandbox quarantined");
        let revoking = policy
            .map(|p| self.revoke_credentials(&rec.name, &p, revokes_shared(trigger)))
            .unwrap_or_default();
        let mut msg = format!(
            "quarantined sandbox {:?}: every connection is refused, its proxied connections are closed and its DNS is refused",
            rec.name
        );
        msg.push_str(unsaved.as_deref().unwrap_or_default());
        let store = self.proxy.credentials();
        let (sessions, revoked): (Vec<String>, Vec<String>) =
            revoking.into_iter().partition(|n| store.drops_sessions(n));
        if !revoked.is_empty() {
            msg.push_str(&format!(
                "; revoking the live values of {} (see the audit log)",
                revoked.join(", ")
            ));
        }
        if !sessions.is_empty() {
            msg.push_str(&format!(
                "; dropping its cached STS session of {} (not revoked: an issued session \
                 stays valid at AWS until it ends; see the audit log)",
                sessions.join(", ")
            ));
        }
        Ok(msg)
    }

    /// Starts revoking, in the background, the live values of the credentials the policy
    /// names that have a revocation; each outcome is one `credential-revoke` record.
    /// Returns their names. Unless `shared_too` (see [`revokes_shared`]), a credential
    /// another sandbox that is not quarantined still uses is left alone, with a record
    /// saying so.
    fn revoke_credentials(&self, sandbox: &str, policy: &Policy, shared_too: bool) -> Vec<String> {
        let store = self.proxy.credentials();
        let mut names = Vec::new();
        let mut shared = Vec::new();
        for name in policy.credential_names() {
            // A sandbox's own STS session is dropped whoever else signs with the role.
            if store.drops_sessions(name) {
                names.push(name.to_string());
                continue;
            }
            if !store.can_revoke(name) {
                continue;
            }
            let users = if shared_too {
                Vec::new()
            } else {
                self.other_users(sandbox, name)
            };
            if users.is_empty() {
                names.push(name.to_string());
            } else {
                shared.push((name.to_string(), users));
            }
        }
        for (credential, users) in shared {
            tracing::warn!(%sandbox, %credential, others = users.len(), "Not revoking a credential other sandboxes use");
            self.audit.emit(Record::CredentialRevoke(CredentialRevoke {
                time: now(),
                sandbox: sandbox.to_string(),
                credential,
                revoked: false,
                reason: format!(
                    "not revoked: still used by {} other sandbox(es) ({}); a quarantine for \
                     behaviour revokes only credentials no other sandbox uses",
                    users.len(),
                    users.join(", ")
                ),
            }));
        }
        self.spawn_revocations(sandbox, names)
    }

    /// The sandboxes other than `sandbox`, not quarantined, whose policy names `credential`.
    fn other_users(&self, sandbox: &str, credential: &str) -> Vec<String> {
        let mut users: Vec<String> = self
            .compiled
            .iter()
            .filter(|(name, _)| name.as_str() != sandbox)
            .filter(|(name, _)| {
                self.state
                    .sandboxes
                    .get(name.as_str())
                    .is_some_and(|r| r.quarantine.is_none())
            })
            .filter(|(_, p)| p.credential_names().contains(&credential))
            .map(|(name, _)| name.clone())
            .collect();
        users.sort();
        users
    }

    /// After a detach: leases (secret-store credentials) that the detached sandbox's policy
    /// named and no remaining sandbox's policy names are revoked at the store, so no live
    /// secret outlasts the last sandbox that could use it.
    fn revoke_unused_leases(&self, sandbox: &str, policy: &Policy) {
        let store = self.proxy.credentials();
        let names: Vec<String> = policy
            .credential_names()
            .into_iter()
            .filter(|n| store.holds_leases(n))
            .filter(|n| {
                !self
                    .compiled
                    .values()
                    .any(|p| p.credential_names().contains(n))
            })
            .map(str::to_string)
            .collect();
        self.spawn_revocations(sandbox, names);
    }

    /// Revokes `names` in the background, one `credential-revoke` record each.
    fn spawn_revocations(&self, sandbox: &str, names: Vec<String>) -> Vec<String> {
        self.revocations.start(
            &self.runtime,
            self.proxy.credentials(),
            self.audit.clone(),
            sandbox,
            &names,
        );
        names
    }

    /// Gives a quarantined sandbox its policy back (one kernel map update), lets the
    /// proxy serve it and its resolver answer again.
    pub fn release(&mut self, name: &str) -> Result<String, String> {
        let mut rec = self
            .state
            .sandboxes
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no sandbox named {name:?}"))?;
        let Some(q) = rec.quarantine.take() else {
            return Err(format!("sandbox {name:?} is not quarantined"));
        };
        let policy = self
            .compiled
            .get(name)
            .cloned()
            .ok_or_else(|| format!("sandbox {name:?} has no compiled policy"))?;
        self.maps
            .set_sandbox(rec.cgroup_id, self.kernel_entry(&rec, &policy))
            .map_err(|e| format!("restoring the kernel entry failed, still quarantined: {e}"))?;
        self.dns.set_quarantined(rec.index, false);
        self.set_route(&rec, &policy);
        self.bursts.forget(rec.index);
        self.audit.emit(Record::SandboxRelease(quarantine_record(
            &rec,
            None,
            BY_OPERATOR,
            None,
        )));
        tracing::info!(sandbox = %rec.name, "Sandbox released");
        self.state.sandboxes.insert(rec.name.clone(), rec);
        self.save_state();
        Ok(format!(
            "released sandbox {name:?} (quarantined since {} by {}): its policy is in force again",
            q.since, q.trigger
        ))
    }

    /// An operator's `egressctl quarantine`.
    pub fn quarantine_by_operator(
        &mut self,
        name: &str,
        reason: Option<String>,
    ) -> Result<String, String> {
        self.quarantine(name, reason, BY_OPERATOR)
    }

    /// Counts a denied kernel decision and raises a `denial-burst` alert when it completes
    /// a burst (at most one per window).
    pub fn note_denial(&mut self, index: u32, ts_ns: u64) {
        if let Some(alert) = self.denial_burst(index, ts_ns) {
            self.alerts.raise(alert);
        }
    }

    /// Counts one denial toward sandbox `index`'s burst window; the `denial-burst` alert
    /// it completes, if any, for the caller to raise (after the records before it).
    pub fn denial_burst(&mut self, index: u32, ts_ns: u64) -> Option<Alert> {
        let name = self.state.by_index(index).map(|r| r.name.clone())?;
        let config = self.alerts.burst_config(&name);
        let burst = self.bursts.observe(index, ts_ns, config)?;
        let mut alert = Alert::new(
            now(),
            AlertKind::DenialBurst,
            name,
            format!(
                "{} denied decisions within {:.1} s (threshold {} in {} s)",
                burst.count,
                burst.span_ns as f64 / 1e9,
                config.count,
                config.seconds
            ),
        );
        alert.count = burst.count;
        alert.window_seconds = Some(u64::from(config.seconds));
        Some(alert)
    }

    /// Takes over what a previous daemon left: every sandbox in the state keeps its pinned
    /// links (programs attached meanwhile keep enforcing); missing pieces are restored.
    /// Returns the number of sandboxes adopted.
    pub fn reconcile(&mut self) -> u32 {
        let mut adopted = 0;
        let records: Vec<SandboxRecord> = self.state.sandboxes.values().cloned().collect();
        for rec in records {
            // Its tests passed when it was attached; failing now (after an upgrade) they
            // change nothing it enforces: said in the log, and the policy kept.
            let policy = match policy::parse_untested(&rec.policy_source, &rec.policy_path) {
                Ok(p) => {
                    let failing = p.run_tests().iter().filter(|o| !o.passed).count();
                    if failing > 0 {
                        tracing::warn!(
                            sandbox = %rec.name,
                            policy = %rec.policy_path,
                            failing,
                            "The stored policy's own tests fail with this build; it is enforced \
                             as before, but attaching it again will be refused until its tests pass"
                        );
                    }
                    p
                }
                Err(e) => {
                    // Without the policy nothing can serve the sandbox's proxied
                    // connections and DNS, nor expire the addresses its slot learned from
                    // DNS (the kernel entries carry no expiry, and which of the slot's
                    // entries were learned only the policy says): the sandbox is denied
                    // everything, and its slot emptied, until it is attached again.
                    let denied = self
                        .maps
                        .set_sandbox(rec.cgroup_id, self.quarantine_entry(&rec, None));
                    let outcome = match &denied {
                        Ok(()) => {
                            // Only once no entry names it: an empty slot decides by the
                            // entry's default.
                            self.retire_slot(rec.slot);
                            "the sandbox is denied everything until it is attached again".to_owned()
                        }
                        Err(ke) => format!(
                            "switching the sandbox to deny-all failed too ({ke}): the kernel \
                             keeps the rules it has"
                        ),
                    };
                    tracing::error!(sandbox = %rec.name, error = %e, "Stored policy no longer compiles; {outcome}");
                    self.policy_rejected(
                        rec.name.clone(),
                        &rec.policy_path,
                        Some(PolicyDigest::of(rec.policy_source.as_bytes())),
                        format!(
                            "the stored policy no longer compiles at adoption ({e}); \
                             {outcome}"
                        ),
                    );
                    continue;
                }
            };
            let alive = match Cgroup::open(&rec.cgroup) {
                Ok(c) if c.id == rec.cgroup_id => {
                    // Attached by an earlier version, or bounded since by someone else.
                    for why in c.bound_tree() {
                        tracing::warn!(sandbox = %rec.name, "The adopted sandbox's cgroup tree could not be bounded: {why}");
                    }
                    true
                }
                Ok(_) => false,
                // Kept (and confined) unless the directory is really gone.
                Err(e) => !e.is_not_found(),
            };
            if !alive {
                tracing::warn!(sandbox = %rec.name, cgroup = %rec.cgroup.display(), "cgroup is gone; removing the sandbox");
                let _ = self.links().detach(rec.cgroup_id);
                let _ = self.maps.remove_sandbox(rec.cgroup_id);
                let _ = self.maps.clear_slot(rec.slot);
                self.audit.emit(Record::SandboxDetach(Self::detached(
                    &rec,
                    DetachReason::CgroupRemoved,
                )));
                self.state.sandboxes.remove(&rec.name);
                self.supersede_cuts(Some(&rec.name));
                // Its events still queued in the kernel are named by it, not by a sandbox
                // given its index next.
                self.departed.insert(
                    rec.index,
                    Departed {
                        name: rec.name.clone(),
                        policy: Some(Arc::new(policy)),
                        at: std::time::Instant::now(),
                    },
                );
                continue;
            }
            // What could not be restored is said in the trail too, not only in the log:
            // the sandbox's traffic that depends on it is refused meanwhile.
            let adoption_failed = |core: &Self, what: String| {
                core.policy_rejected(
                    rec.name.clone(),
                    &rec.policy_path,
                    Some(PolicyDigest::of(rec.policy_source.as_bytes())),
                    format!("at adoption: {what}"),
                );
            };
            match self.prepare_proxy(&policy, &rec.cgroup, rec.netns.as_deref(), rec.netns_inode) {
                Ok(listener) => self.proxy.set_user(rec.index, listener),
                Err(e) => {
                    tracing::error!(sandbox = %rec.name, error = %e, "Restoring the proxy for an adopted sandbox failed; its proxied connections fail until fixed");
                    adoption_failed(
                        self,
                        format!(
                            "restoring the proxy failed ({e}); its proxied connections are \
                             refused until the sandbox is attached again"
                        ),
                    );
                }
            }
            let policy = Arc::new(policy);
            self.set_route(&rec, &policy);
            self.alerts.set_sandbox(&rec.name, policy.alerts().clone());
            if rec.quarantine.is_some() {
                tracing::warn!(sandbox = %rec.name, "Adopted sandbox is quarantined; it stays so until `egressctl release`");
                self.dns.set_quarantined(rec.index, true);
            }
            if let Err(e) = self.start_dns(&rec, &policy) {
                tracing::error!(sandbox = %rec.name, error = %e, "Restoring the DNS resolver of an adopted sandbox failed");
                adoption_failed(
                    self,
                    format!(
                        "restoring the DNS resolver failed ({e}); its DNS queries are refused \
                         until the sandbox is attached again"
                    ),
                );
            }
            // The slot gets exactly the policy's static rules again: addresses a previous
            // run learned through DNS have no expiry in this one (it keeps them in
            // memory), so they are dropped and clients resolve again, as after a policy
            // replacement.
            let synced = match policy
                .kernel_rules()
                .map_err(|e| e.to_string())
                .and_then(|rules| {
                    self.maps
                        .sync_rules(rec.slot, &rules.v4, &rules.v6)
                        .map_err(|e| e.to_string())
                }) {
                Ok(0) => true,
                Ok(dropped) => {
                    tracing::info!(sandbox = %rec.name, dropped, "Addresses learned before the restart dropped; clients resolve again");
                    true
                }
                Err(e) => {
                    tracing::error!(sandbox = %rec.name, error = %e, "Restoring the policy's kernel rules failed; the sandbox is denied everything until it is attached again");
                    self.policy_rejected(
                        rec.name.clone(),
                        &rec.policy_path,
                        Some(PolicyDigest::of(rec.policy_source.as_bytes())),
                        format!(
                            "restoring the policy's kernel rules at adoption failed ({e}); \
                             the sandbox is denied everything until it is attached again"
                        ),
                    );
                    false
                }
            };
            // The slot was brought to the policy in place (never emptied while in use);
            // a slot that could not be is not used: deny all.
            let want = if synced {
                self.kernel_entry(&rec, &policy)
            } else {
                self.quarantine_entry(&rec, Some(&policy))
            };
            if self.maps.sandbox(rec.cgroup_id) != Some(want) {
                tracing::warn!(sandbox = %rec.name, "Kernel entry differs from the state; restoring it");
                if let Err(e) = self.maps.set_sandbox(rec.cgroup_id, want) {
                    tracing::error!(sandbox = %rec.name, error = %e, "Restoring kernel entries failed");
                    adoption_failed(
                        self,
                        format!(
                            "restoring the sandbox's kernel entry failed ({e}); the kernel \
                             keeps the entry it has"
                        ),
                    );
                }
            }
            let links = Links {
                layout: &self.layout,
            };
            if links.pinned_hooks(rec.cgroup_id).len() < HOOKS.len() {
                let r = links.attach(&mut self.programs, &rec.cgroup, rec.cgroup_id);
                if let Err(e) = r {
                    tracing::error!(sandbox = %rec.name, error = %e, "Re-attaching missing hooks failed");
                    adoption_failed(
                        self,
                        format!(
                            "re-attaching its missing hooks failed ({e}); calls those hooks \
                             judge are NOT judged until the sandbox is attached again"
                        ),
                    );
                }
            }
            // Programs of an older build keep running for the sandbox until replaced.
            match links.refresh(&mut self.programs, &rec.cgroup, rec.cgroup_id) {
                Ok(replaced) if replaced.is_empty() => {}
                Ok(replaced) => {
                    tracing::info!(sandbox = %rec.name, hooks = ?replaced, "Programs of another build replaced by this daemon's")
                }
                Err(e) => {
                    tracing::error!(sandbox = %rec.name, error = %e, "Replacing programs of another build failed");
                    adoption_failed(
                        self,
                        format!(
                            "replacing the programs of another build failed ({e}); they keep \
                             judging the sandbox's calls"
                        ),
                    );
                }
            }
            let posture = Posture::read(&rec.cgroup);
            self.audit
                .emit(Record::SandboxAdopt(self.confined(&rec, &posture)));
            self.alert_posture(&rec.name, &posture, "processes at adoption");
            self.alert_host_netns(&rec.name, &posture, "processes at adoption");
            self.alert_host_namespaces(&rec.name, &posture, "processes at adoption");
            self.remember(&rec.name, &posture);
            self.compiled.insert(rec.name.clone(), policy);
            adopted += 1;
        }
        if let Ok(ids) = attached_cgroups(&self.layout) {
            for id in ids
                .into_iter()
                .filter(|id| self.state.by_cgroup(*id).is_none())
            {
                // Its kernel entry still names the index and policy slot it had, which a
                // new sandbox may be given: it would then be judged by that sandbox's
                // rules, in its name. Deny all, in no sandbox's name.
                let orphan = self.deny_all_entry(0, 0);
                let outcome = match self.maps.set_sandbox(id, orphan) {
                    Ok(()) => "it is denied everything".to_owned(),
                    Err(e) => {
                        tracing::error!(cgroup_id = id, error = %e, "Could not make the kernel entry of a cgroup with no sandbox record deny all");
                        format!("making it deny everything failed ({e})")
                    }
                };
                tracing::warn!(cgroup_id = id, "Links are pinned for a cgroup with no sandbox record; it stays confined (deny all) until `egressctl detach --cgroup`");
                // Its traffic stops here: the trail says why, in no sandbox's name.
                self.policy_rejected(
                    "unknown".to_owned(),
                    "",
                    None,
                    format!(
                        "at adoption: cgroup id {id} has the daemon's programs attached but no \
                         sandbox record (the state directory was lost, or not saved at its \
                         attach); {outcome} until `egressctl detach --cgroup` or a new attach"
                    ),
                );
            }
        }
        for (id, _) in self.maps.sandboxes() {
            if self.state.by_cgroup(id).is_none() && self.links().pinned_hooks(id).is_empty() {
                let _ = self.maps.remove_sandbox(id);
            }
        }
        // Slots with rules that no entry names (a replaced policy's, emptied a second
        // later, when the daemon stopped before): emptied now, or they stay taken.
        // Only if every entry could be read: one missed would lose the rules it names.
        match self.maps.sandboxes_all() {
            Ok(entries) => {
                let named: std::collections::HashSet<u32> = entries
                    .into_iter()
                    .map(|(_, info)| info.policy_slot)
                    .chain(self.state.sandboxes.values().map(|r| r.slot))
                    .collect();
                for slot in self.maps.used_slots() {
                    if slot != QUARANTINE_SLOT && !named.contains(&slot) {
                        tracing::info!(slot, "Emptying a policy slot no sandbox uses");
                        self.retire_slot(slot);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Sandbox entries could not all be read; policy slots no sandbox uses are kept")
            }
        }
        self.retire_other_builds();
        self.save_state();
        adopted
    }

    /// Links and maps another build pinned under another ABI version: its programs
    /// would go on judging each sandbox beside this build's, by rules no daemon updates
    /// (a detach would leave them confining), and their events would never be read. A
    /// sandbox this daemon confines with all its own hooks loses the other build's links
    /// (its own were pinned first: no moment unconfined); the other build's directory
    /// (maps, the system-wide LSM link) goes once no sandbox's links are left in it. A
    /// cgroup this daemon has no record of keeps them, and stays confined.
    fn retire_other_builds(&mut self) {
        for other in PinLayout::others(&self.bpffs) {
            let mut kept = 0;
            for id in attached_cgroups(&other).unwrap_or_default() {
                let ours = self.state.by_cgroup(id).is_some()
                    && self.links().pinned_hooks(id).len() == HOOKS.len();
                if !ours {
                    kept += 1;
                    tracing::warn!(layout = %other.root().display(), cgroup_id = id, "Another build's links confine a cgroup this daemon has no record of; left in place");
                    continue;
                }
                match std::fs::remove_dir_all(other.sandbox_links(id)) {
                    Ok(()) => {
                        tracing::info!(layout = %other.root().display(), cgroup_id = id, "Another build's links for an adopted sandbox removed")
                    }
                    Err(e) => {
                        kept += 1;
                        tracing::error!(layout = %other.root().display(), cgroup_id = id, error = %e, "Removing another build's links failed; its programs keep judging the sandbox too");
                    }
                }
            }
            if kept == 0 {
                // What its programs recorded while no daemon read them is counted (and
                // reported as lost) before its ring buffer goes.
                let unread = crate::bpf::consume_unread(&other.maps());
                // And what its programs could not even put in that buffer.
                let lost = crate::bpf::read_lost(&other.maps());
                match std::fs::remove_dir_all(other.root()) {
                    Ok(()) => {
                        tracing::warn!(layout = %other.root().display(), "Another build's pinned programs and maps removed");
                        self.report_unread(&other, unread);
                        self.report_other_lost(&other, lost);
                    }
                    Err(e) => {
                        tracing::error!(layout = %other.root().display(), error = %e, "Removing another build's pinned objects failed")
                    }
                }
            }
        }
    }

    /// `egress.lost.total`: the kernel's counters and the events counted as lost here.
    pub fn lost_total(&self) -> u64 {
        self.maps.lost_total() + self.lost_unread
    }

    /// An `events-lost` record for the events another build's programs recorded and no
    /// daemon read (this build cannot decode them), named `build vN` in
    /// `egress.lost.sandboxes` (no sandbox name has a space).
    fn report_unread(&mut self, other: &PinLayout, unread: Result<u64, BpfError>) {
        let build = other.name();
        match unread {
            Ok(0) => {}
            Ok(count) => {
                tracing::warn!(layout = %other.root().display(), count, "Events another build recorded and no daemon read: reported as lost");
                self.lost_unread += count;
                self.audit.emit(Record::EventsLost(EventsLost {
                    time: now(),
                    count,
                    total: self.lost_total(),
                    sandboxes: vec![LostBySandbox {
                        name: format!("build {build}"),
                        count,
                    }],
                }));
            }
            Err(e) => {
                tracing::error!(layout = %other.root().display(), error = %e, "Another build's unread events could not be counted; they are lost");
            }
        }
    }

    /// An `events-lost` record for the events another build's programs could not put in
    /// its ring buffer and no record reported (its loss counters go with its maps), by
    /// sandbox, each named with the build: `name (build vN)`.
    fn report_other_lost(
        &mut self,
        other: &PinLayout,
        lost: Result<(u64, Vec<(u32, u64)>), BpfError>,
    ) {
        let build = other.name();
        let (total, by_index) = match lost {
            Ok(lost) => lost,
            Err(e) => {
                tracing::error!(layout = %other.root().display(), error = %e, "Another build's loss counters could not be read; its unreported losses are not counted");
                return;
            }
        };
        let abi = build
            .strip_prefix('v')
            .and_then(|v| v.parse().ok())
            .unwrap_or(u32::MAX);
        let (count, by_index) = self.state.unreported_lost(abi, total, &by_index);
        if count == 0 {
            return;
        }
        tracing::warn!(layout = %other.root().display(), count, "Events another build could not record and no record reported: reported as lost");
        let mut sandboxes = std::collections::BTreeMap::<String, u64>::new();
        for (index, count) in by_index {
            let name = format!("{} (build {build})", self.index_name(index));
            *sandboxes.entry(name).or_default() += count;
        }
        let sandboxes = crate::audit::lost_by_sandbox(sandboxes);
        self.lost_unread += count;
        self.audit.emit(Record::EventsLost(EventsLost {
            time: now(),
            count,
            total: self.lost_total(),
            sandboxes,
        }));
    }

    /// The name of sandbox `index` for a loss report: attached, detached lately, `none`
    /// (index 0: no sandbox found), or `index N`.
    pub fn index_name(&self, index: u32) -> String {
        match self.state.by_index(index) {
            Some(rec) => rec.name.clone(),
            None if index == 0 => "none".to_owned(),
            None => self
                .departed
                .get(&index)
                .map_or_else(|| format!("index {index}"), |d| d.name.clone()),
        }
    }

    /// What a control-socket caller in `cgroup` (`None`: one that cannot be placed) may
    /// ask: anything, unless it is in a sandbox's cgroup tree, or could be; then only the
    /// status, with a `control-socket` alert, but for a `Join` naming the caller's own
    /// sandbox (`joins`), which may let a container in that meets the policy.
    pub fn control_from(&mut self, cgroup: Option<&Path>, joins: Option<&str>) -> Admission {
        let (sandbox, seen, why) = match cgroup {
            Some(cgroup) => {
                let Some(rec) = self.sandbox_at(cgroup) else {
                    return Admission::Any;
                };
                if joins == Some(rec.name.as_str()) {
                    // A runtime's hook in the pod's cgroup, for the pod's next container.
                    return Admission::JoinOwnSandbox;
                }
                (
                    rec.name.clone(),
                    format!("a process in cgroup {}", cgroup.display()),
                    format!(
                        "processes in sandbox {:?} may only read the status",
                        rec.name
                    ),
                )
            }
            // Outside the daemon's cgroup namespace, or gone before it could be read: it
            // may be a sandbox's.
            None => (
                "unknown".to_owned(),
                "a process whose cgroup cannot be placed".to_owned(),
                "the caller's cgroup cannot be read".to_owned(),
            ),
        };
        if !self.control_refusals.admit(&sandbox) {
            return Admission::StatusOnly(why);
        }
        tracing::warn!(sandbox = %sandbox, caller = %seen, "Control socket request refused: status only");
        self.alerts.raise(Alert::new(
            now(),
            AlertKind::ControlSocket,
            sandbox,
            format!(
                "{seen} sent a request other than status to the daemon's control socket; refused"
            ),
        ));
        Admission::StatusOnly(why)
    }

    /// The sandbox whose cgroup tree holds cgroup directory `cgroup` (a control-socket
    /// caller's), if one.
    pub fn sandbox_at(&self, cgroup: &Path) -> Option<&SandboxRecord> {
        self.state
            .sandboxes
            .values()
            .find(|r| cgroup.starts_with(&r.cgroup))
    }

    /// The control socket refused a caller in `cgroup` before reading a request of it
    /// (`why`, the answer it was given): a `control-socket` alert in the name of the
    /// sandbox the caller is in (`unknown` if it cannot be placed), or of `host process`
    /// (no sandbox name has a space), so a client that does not report it (a runtime's
    /// hook refused while the daemon is busy, a probe from inside a sandbox) leaves a
    /// record.
    pub fn control_refused(&mut self, cgroup: Option<&Path>, why: &str, count: u64) {
        let (sandbox, seen) = match cgroup {
            Some(cgroup) => (
                self.sandbox_at(cgroup)
                    .map_or_else(|| "host process".to_owned(), |r| r.name.clone()),
                format!("a process in cgroup {}", cgroup.display()),
            ),
            None => (
                "unknown".to_owned(),
                "a process whose cgroup cannot be placed".to_owned(),
            ),
        };
        if !self.control_refusals.admit_n(&sandbox, count) {
            return;
        }
        let why: String = why.chars().take(200).collect();
        tracing::warn!(sandbox = %sandbox, caller = %seen, %why, count, "Control socket refused a caller");
        let mut alert = Alert::new(
            now(),
            AlertKind::ControlSocket,
            sandbox,
            format!("the daemon's control socket refused {seen}: {why}"),
        );
        alert.count = count.max(1);
        self.alerts.raise(alert);
    }

    /// The OCI hook refused to start container `container`: a `policy-rejected` record in
    /// the container's name (`oci:ID`), so the refusal is in the trail.
    pub fn hook_refused(&mut self, container: &str, reason: &str) {
        let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
        let sandbox = format!(
            "{}{}",
            crate::text::REFUSED_CONTAINER_PREFIX,
            cut(container, 64)
        );
        tracing::warn!(%sandbox, reason = %cut(reason, 1000), "The OCI hook refused a container");
        self.policy_rejected(
            sandbox,
            "oci-hook",
            None,
            format!("OCI hook refused the container: {}", cut(reason, 1000)),
        );
    }

    /// Records a policy (or container) refused for `sandbox`.
    pub(super) fn policy_rejected(
        &self,
        sandbox: String,
        policy_path: &str,
        policy_digest: Option<PolicyDigest>,
        error: String,
    ) {
        self.rejections.set(self.rejections.get() + 1);
        self.audit.emit(Record::PolicyRejected(PolicyRejected {
            time: now(),
            sandbox,
            policy_path: PathBuf::from(policy_path),
            policy_digest,
            // A parser's message quotes what it refused, from a file anyone may have
            // written: escaped and bounded like every other outside text in a record.
            error: crate::text::sanitize(&error, 2000),
        }));
    }

    /// Sandbox and rule names for a kernel event decided in policy slot `slot`.
    pub fn names(&self, sandbox_index: u32, slot: u16, rule_id: u16) -> (String, RuleRef) {
        let special = special_rule(rule_id);
        let Some(rec) = self.state.by_index(sandbox_index) else {
            // Detached since the event: its name and rules as they were.
            return match self.departed.get(&sandbox_index) {
                Some(d) => (d.name.clone(), departed_rule(rule_id, d.policy.as_deref())),
                None => ("unknown".into(), special.unwrap_or(RuleRef::Default)),
            };
        };
        let rule = match special {
            Some(rule) => rule,
            None => match deciding_policy(
                u32::from(slot),
                (rec.slot, self.compiled.get(&rec.name)),
                &self.replaced,
            ) {
                Ok(policy) => policy
                    .and_then(|p| p.rule_name(rule_id))
                    .map_or(RuleRef::Default, |n| RuleRef::Named(n.to_string())),
                // Decided in a slot whose policy is gone (read over a minute late, or
                // before a restart): not named by the current policy's rule at that place.
                Err(()) => RuleRef::Named(format!("rule {rule_id} of a replaced policy")),
            },
        };
        (rec.name.clone(), rule)
    }

    /// The daemon's status, with every sandbox or only the one named `only` (a caller
    /// inside a sandbox sees its own, never another's).
    pub fn status(&self, only: Option<&str>) -> DaemonStatus {
        let sandboxes = self
            .state
            .sandboxes
            .values()
            .filter(|rec| only.is_none_or(|name| rec.name == name))
            .map(|rec| {
                let c = self.maps.counters(rec.index);
                let policy = self.compiled.get(&rec.name);
                let netns = rec
                    .netns
                    .clone()
                    .or_else(|| netns_of_cgroup(&rec.cgroup, rec.netns_inode).ok());
                let netns_inode = netns
                    .as_deref()
                    .and_then(|p| netns_id(p).ok())
                    .map(|id| id.1);
                let posture = Posture::read(&rec.cgroup);
                SandboxStatus {
                    name: rec.name.clone(),
                    cgroup: rec.cgroup.clone(),
                    cgroup_id: rec.cgroup_id,
                    policy: rec.policy_path.clone(),
                    policy_digest: rec.policy_digest.clone(),
                    default: policy
                        .map(|p| p.default_action().to_string())
                        .unwrap_or_default(),
                    rules: policy.map_or(0, |p| p.rules().len()),
                    attached_at: rec.attached_at.clone(),
                    netns,
                    netns_inode,
                    hooks: self
                        .links()
                        .pinned_hooks(rec.cgroup_id)
                        .iter()
                        .map(|h| h.to_string())
                        .collect(),
                    allowed: c.allowed,
                    denied: c.denied,
                    audited: c.audited,
                    redirected: c.redirected,
                    quarantine: rec.quarantine.as_ref().map(|q| QuarantineStatus {
                        since: q.since.clone(),
                        trigger: q.trigger.clone(),
                        reason: q.reason.clone(),
                    }),
                    processes: posture.pids.len(),
                    capabilities: posture
                        .capabilities()
                        .iter()
                        .map(|c| c.to_string())
                        .collect(),
                    can_leave_cgroup: posture.can_leave_cgroup(),
                }
            })
            .collect();
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: rfc3339(self.started_at),
            bpffs: self.bpffs.clone(),
            audit_log: self.audit_log.clone(),
            events_lost: self.lost_total(),
            proxy_listeners: self.proxy.listening_in().len(),
            audit: Some(self.audit.health()),
            packet_sockets_covered: self.packet_sockets.is_ok(),
            packet_sockets_note: self.packet_sockets.clone().err(),
            compat_setsockopt_covered: self.compat_setsockopt.is_ok(),
            compat_setsockopt_note: self.compat_setsockopt.clone().err(),
            sandboxes,
        }
    }
}

/// Whether the sandbox's own cgroup (the directory with its id) may still run processes:
/// what cannot be told counts as running; a cgroup gone, or replaced by another at its
/// path, does not run the sandbox's.
fn runs_processes(rec: &SandboxRecord) -> bool {
    match Cgroup::open(&rec.cgroup) {
        // Unreadable: gone meanwhile (removed between the open and the read) is not
        // running; anything else is.
        Ok(c) if c.id == rec.cgroup_id => c.populated().unwrap_or_else(|| c.path.exists()),
        Ok(_) => false,
        Err(e) => !e.is_not_found(),
    }
}

/// Refuses a cgroup the kernel programs cannot confine as a sandbox: one deeper than they
/// look for sandboxes among a task's ancestors (its descendants would be judged by no
/// policy), or one holding the daemon itself (its own upstream and DNS traffic would be
/// judged by a sandbox's policy).
fn check_placement(cgroup: &Path) -> Result<(), String> {
    let mount = crate::cgroup::cgroup2_mount().map_err(|e| e.to_string())?;
    let depth = cgroup
        .strip_prefix(&mount)
        .map_or(0, |rel| rel.components().count());
    if depth > agent_common::MAX_CGROUP_DEPTH as usize {
        return Err(format!(
            "cgroup {} is {depth} levels deep; sandboxes may be at most {} levels below the \
             cgroup2 root",
            cgroup.display(),
            agent_common::MAX_CGROUP_DEPTH
        ));
    }
    let own = crate::cgroup::of_pid(std::process::id()).map_err(|e| e.to_string())?;
    if own.starts_with(cgroup) {
        return Err(format!(
            "cgroup {} holds egressd itself ({}); attach the sandbox's own cgroup",
            cgroup.display(),
            own.display()
        ));
    }
    Ok(())
}

/// The body of a `sandbox-quarantine` or `sandbox-release` record for `rec`.
fn quarantine_record(
    rec: &SandboxRecord,
    reason: Option<String>,
    trigger: &str,
    error: Option<String>,
) -> Quarantine {
    Quarantine {
        time: now(),
        sandbox: rec.name.clone(),
        cgroup_path: rec.cgroup.clone(),
        cgroup_id: rec.cgroup_id,
        reason,
        trigger: trigger.to_string(),
        error,
    }
}

/// The policy that decided a kernel event in `slot`, for a sandbox whose current policy is
/// `current` (its slot, the policy): the current, or one replaced from that slot since;
/// `None` if that one is no longer known.
fn deciding_policy<'a>(
    slot: u32,
    (current_slot, current): (u32, Option<&'a Arc<Policy>>),
    replaced: &'a std::collections::HashMap<u32, Replaced>,
) -> Result<Option<&'a Arc<Policy>>, ()> {
    if slot == current_slot {
        return Ok(current);
    }
    replaced.get(&slot).map(|r| Some(&r.policy)).ok_or(())
}

/// A quarantine's reason as kept in the state and shown by `status`, outside the audit
/// trail's masking: control characters blanked, cut to [`MAX_REASON`], and every known
/// secret masked by `mask` (an alert's reason may quote what the sandbox sent, a host
/// name holding a secret).
fn stored_reason(reason: &str, mask: impl Fn(&mut String)) -> String {
    let mut r = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect::<String>();
    mask(&mut r);
    r
}

/// `rule.name` of a refusal by no policy rule (`rule_id` 0 or a `RULE_*` id), named alike
/// whether the sandbox is still attached; `None` for a policy rule's id. Each name is one
/// of [`crate::policy::DAEMON_RULE_NAMES`], which no rule may take.
fn special_rule(rule_id: u16) -> Option<RuleRef> {
    let name = match rule_id {
        0 => return Some(RuleRef::Default),
        // DNS sent to the sandbox's own resolver, not a policy rule.
        agent_common::RULE_DNS => "dns-resolver",
        // A connect to the proxy's port the kernel did not redirect there.
        agent_common::RULE_PROXY_PORT => "proxy-port",
        // 0.0.0.0 from a call that chose its source address: not judged as loopback.
        agent_common::RULE_UNSPECIFIED => "unspecified-address",
        // A redirect to the daemon's listeners from a socket bound to another device.
        agent_common::RULE_BOUND_DEVICE => "bound-device",
        _ => return None,
    };
    Some(RuleRef::Named(name.to_owned()))
}

/// `rule.name` of an event of a sandbox detached since, by the policy it had.
fn departed_rule(rule_id: u16, policy: Option<&Policy>) -> RuleRef {
    special_rule(rule_id).unwrap_or_else(|| {
        policy
            .and_then(|p| p.rule_name(rule_id))
            .map_or(RuleRef::Default, |n| RuleRef::Named(n.to_string()))
    })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::sync::Arc;

    use super::{
        deciding_policy, departed_rule, revokes_shared, special_rule, stored_reason, Replaced,
    };
    use crate::audit::{AlertKind, RuleRef};
    use crate::policy::parse_str;

    /// The names of the kernel's own decisions are names no policy rule may take.
    #[test]
    fn the_daemons_rule_names_are_reserved() {
        use agent_common::{RULE_BOUND_DEVICE, RULE_DNS, RULE_PROXY_PORT, RULE_UNSPECIFIED};
        for id in [
            RULE_DNS,
            RULE_PROXY_PORT,
            RULE_UNSPECIFIED,
            RULE_BOUND_DEVICE,
        ] {
            let Some(RuleRef::Named(name)) = special_rule(id) else {
                unreachable!("rule id {id} has no name");
            };
            assert!(
                crate::policy::DAEMON_RULE_NAMES.contains(&name.as_str()),
                "{name}"
            );
        }
    }

    /// An event decided before a replacement, read after it, is named by the rules of the
    /// policy that decided it; one from a slot whose policy is no longer known is not
    /// named by the current policy's rules.
    #[test]
    fn late_events_are_named_by_the_policy_that_decided_them() {
        let policy = |rule: &str| {
            Arc::new(
                parse_str(
                    &format!(
                        "version: 1\ndefault: deny\nrules:\n  - name: {rule}\n    to: [192.0.2.1]\n    action: allow\n"
                    ),
                    "p.yaml",
                )
                .unwrap(),
            )
        };
        let (old, new) = (policy("old-rule"), policy("new-rule"));
        let replaced = std::collections::HashMap::from([(
            3,
            Replaced {
                policy: old,
                at: std::time::Instant::now(),
            },
        )]);
        let name = |slot| {
            deciding_policy(slot, (4, Some(&new)), &replaced)
                .map(|p| p.and_then(|p| p.rule_name(1)).map(|n| n.to_string()))
        };
        assert_eq!(name(3), Ok(Some("old-rule".to_owned())));
        assert_eq!(name(4), Ok(Some("new-rule".to_owned())));
        assert_eq!(name(9), Err(()));
    }

    /// A detached sandbox's late events keep the names of refusals by no policy rule
    /// (they were `default` before), and its policy's rule names.
    #[test]
    fn departed_sandboxes_events_are_named_like_attached_ones() {
        use crate::audit::RuleRef;
        let policy = parse_str(
            "version: 1\ndefault: deny\nrules:\n  - name: r\n    to: [192.0.2.1]\n    action: allow\n",
            "p.yaml",
        )
        .unwrap();
        let named = |s: &str| RuleRef::Named(s.to_owned());
        for (id, want) in [
            (agent_common::RULE_BOUND_DEVICE, named("bound-device")),
            (agent_common::RULE_UNSPECIFIED, named("unspecified-address")),
            (agent_common::RULE_PROXY_PORT, named("proxy-port")),
            (agent_common::RULE_DNS, named("dns-resolver")),
            (1, named("r")),
            (0, RuleRef::Default),
        ] {
            assert_eq!(departed_rule(id, Some(&policy)), want, "{id}");
        }
        assert_eq!(
            departed_rule(agent_common::RULE_BOUND_DEVICE, None),
            named("bound-device")
        );
        assert_eq!(departed_rule(1, None), RuleRef::Default);
    }

    /// A quarantine's reason is kept and shown masked, on one line.
    #[test]
    fn a_stored_reason_is_masked_and_on_one_line() {
        let mask = |t: &mut String| *t = t.replace("tok-secret-123", "[redacted]****");
        assert_eq!(
            stored_reason("sent tok-secret-123.api.example.com\nforged", mask),
            "sent [redacted]****.api.example.com forged"
        );
    }

    #[test]
    fn only_exposure_or_an_operator_revokes_shared_credentials() {
        assert!(revokes_shared("operator"));
        assert!(revokes_shared(AlertKind::SecretOutbound.as_str()));
        assert!(revokes_shared(AlertKind::SecretReflected.as_str()));
        assert!(!revokes_shared(AlertKind::DenialBurst.as_str()));
        assert!(!revokes_shared(AlertKind::RateLimit.as_str()));
    }
}
