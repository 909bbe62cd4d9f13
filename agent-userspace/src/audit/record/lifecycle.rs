//! Records of the daemon's and sandboxes' lives: start and stop, attach, detach and
//! adoption, policy changes, quarantine, credential revocation, lost audit records, and
//! alerts.

use std::path::PathBuf;

use time::OffsetDateTime;

use super::*;

/// Audit records that were given sequence numbers but never reached the log: the log
/// could not be written for longer than the writer's queue lasted, or the daemon stopped
/// before it could write them. The numbers form one range; no other record uses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditLost {
    pub time: OffsetDateTime,
    /// `egress.audit_lost.count`: how many records were lost (the size of the range).
    pub count: u64,
    /// `egress.audit_lost.first_sequence`: the first lost `event.sequence`.
    pub first_sequence: u64,
    /// `egress.audit_lost.last_sequence`: the last lost `event.sequence`.
    pub last_sequence: u64,
    /// `egress.audit_lost.sandboxes`: how many of them each sandbox's were, where the
    /// writer knew: the 16 with the most, then `other sandboxes` (records about no
    /// sandbox are not listed; empty: not known).
    pub sandboxes: Vec<super::kernel::LostBySandbox>,
    /// `egress.audit_lost.since`: when writes began to fail, when this daemon saw it.
    pub since: Option<OffsetDateTime>,
    /// `error.message`: the write error, or why the records were not written.
    pub error: String,
}

/// The log was truncated in place (logrotate's `copytruncate`, or by hand) while the
/// writer had it open: records written shortly before may be in neither the copy nor the
/// log, so the writer wrote them again, before this record. The range's numbers occur
/// twice where the copy holds them too: the same record, with the same `event.sequence`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRewritten {
    pub time: OffsetDateTime,
    /// `egress.audit_rewritten.count`: how many records were written again.
    pub count: u64,
    /// `egress.audit_rewritten.first_sequence`: the first rewritten `event.sequence`.
    pub first_sequence: u64,
    /// `egress.audit_rewritten.last_sequence`: the last rewritten `event.sequence`.
    pub last_sequence: u64,
    /// `egress.audit_rewritten.complete`: whether every record written within the window
    /// before the truncation was kept to be written again (false: the memory bound cut
    /// it, and records just before `first_sequence` may be missing).
    pub complete: bool,
    /// `event.reason`: what was found (the sizes) and what was done.
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonStart {
    pub time: OffsetDateTime,
    /// `process.pid` of the daemon.
    pub pid: u32,
    /// `egress.daemon.adopted_sandboxes`: sandboxes taken over from a previous run.
    pub adopted_sandboxes: u32,
    /// `egress.gap.previous_seen`: set only after an unclean stop, to the last time the
    /// previous daemon was known alive; `egress.gap.seconds` is computed from it.
    pub previous_seen: Option<OffsetDateTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonStop {
    pub time: OffsetDateTime,
    /// `process.pid` of the daemon.
    pub pid: u32,
    /// `event.reason`.
    pub reason: StopReason,
}

/// Why the daemon stops: `event.reason` of a `daemon-stop` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM or SIGINT.
    Signal,
    /// Asked to over the control socket.
    Request,
    /// A fatal error; `event.outcome` is `failure`.
    Error,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Request => "request",
            Self::Error => "error",
        }
    }

    pub(super) fn outcome(self) -> Outcome {
        match self {
            Self::Signal | Self::Request => Outcome::Success,
            Self::Error => Outcome::Failure,
        }
    }
}

/// Body of `sandbox-attach`, `sandbox-detach` and `sandbox-adopt`; wrap it with
/// [`Record::SandboxAttach`] and friends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxLifecycle {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `egress.sandbox.cgroup_path`.
    pub cgroup_path: PathBuf,
    /// `egress.sandbox.cgroup_id`.
    pub cgroup_id: u64,
    /// `egress.policy.path`.
    pub policy_path: PathBuf,
    /// `egress.policy.digest`.
    pub policy_digest: PolicyDigest,
    /// `event.reason` of a `sandbox-detach` record: why the confinement ended.
    pub reason: Option<DetachReason>,
    /// `egress.coverage.packet_sockets` (attach and adopt): whether the sandbox is kept from
    /// creating packet and other non-inet sockets (BPF LSM active and attached).
    pub packet_sockets_covered: Option<bool>,
    /// `egress.posture` (attach and adopt): what the sandbox's processes hold.
    pub posture: Option<crate::posture::Posture>,
}

/// Why a sandbox was detached: `event.reason` of a `sandbox-detach` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DetachReason {
    /// `egressctl detach` (or another control-socket client that gave no reason).
    Operator,
    /// A container runtime's `poststop` hook (`egressctl oci-hook`).
    Hook,
    /// The sandbox's cgroup directory was removed (or replaced by a new one at the same path).
    CgroupRemoved,
}

impl DetachReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Hook => "hook",
            Self::CgroupRemoved => "cgroup-removed",
        }
    }
}

impl SandboxLifecycle {
    pub(super) fn fill<'a>(&'a self, wire: &mut Wire<'a>, type_: &'static [&'static str]) {
        wire.egress.coverage = self
            .packet_sockets_covered
            .map(|packet_sockets| WireCoverage { packet_sockets });
        wire.egress.posture = self.posture.as_ref().map(|p| WirePosture {
            processes: p.pids.len(),
            capabilities: p.capabilities(),
            risky_capabilities: p.risky(),
            can_leave_cgroup: p.can_leave_cgroup(),
        });
        wire.event.type_ = type_;
        wire.event.reason = self.reason.map(DetachReason::as_str);
        wire.egress.sandbox = Some(WireSandbox {
            name: &self.sandbox,
            cgroup_id: Some(self.cgroup_id),
            cgroup_path: Some(self.cgroup_path.to_string_lossy()),
        });
        wire.egress.policy = Some(WirePolicy {
            path: self.policy_path.to_string_lossy(),
            digest: Some(&self.policy_digest),
            previous_digest: None,
        });
    }
}

/// Body of `sandbox-quarantine` and `sandbox-release`; wrap it with
/// [`Record::SandboxQuarantine`] or [`Record::SandboxRelease`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantine {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `egress.sandbox.cgroup_path`.
    pub cgroup_path: PathBuf,
    /// `egress.sandbox.cgroup_id`.
    pub cgroup_id: u64,
    /// `event.reason`: why, in the operator's words or the alert's.
    pub reason: Option<String>,
    /// `egress.quarantine.trigger`: `operator`, or the alert kind whose configured
    /// response it was (`denial-burst`, ...).
    pub trigger: String,
    /// `error.message`, with `event.outcome: failure`: why it could not be done (a
    /// quarantine an alert ordered that the kernel refused, say).
    pub error: Option<String>,
}

impl Quarantine {
    pub(super) fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        wire.event.type_ = &["change"];
        wire.event.reason = non_empty(&self.reason);
        if let Some(message) = &self.error {
            wire.event.outcome = Outcome::Failure;
            wire.error = Some(WireError { message });
        }
        wire.egress.sandbox = Some(WireSandbox {
            name: &self.sandbox,
            cgroup_id: Some(self.cgroup_id),
            cgroup_path: Some(self.cgroup_path.to_string_lossy()),
        });
        wire.egress.quarantine = Some(WireQuarantine {
            trigger: &self.trigger,
        });
    }
}

/// `credential-revoke`: what quarantine (or the detach of the last sandbox using a leased
/// credential) did to one credential's live value. Names only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRevoke {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`: the quarantined (or detached) sandbox whose policy names it.
    pub sandbox: String,
    /// `egress.credential.name`.
    pub credential: String,
    /// `event.outcome`: whether the revocation succeeded.
    pub revoked: bool,
    /// `event.reason`: how it was revoked, or why it failed (never the value).
    pub reason: String,
}

impl CredentialRevoke {
    pub(super) fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        wire.event.category = &["iam"];
        wire.event.type_ = &["deletion"];
        wire.event.outcome = if self.revoked {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        wire.event.reason = Some(&self.reason);
        wire.egress.sandbox = Some(WireSandbox::named(&self.sandbox));
        wire.egress.credential = Some(WireCredential::named(&self.credential));
    }
}

/// A sandbox's policy was replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyChange {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `egress.policy.path` of the new policy.
    pub policy_path: PathBuf,
    /// `egress.policy.previous_digest`.
    pub previous_digest: PolicyDigest,
    /// `egress.policy.digest`.
    pub digest: PolicyDigest,
}

/// A policy was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRejected {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name` the policy was meant for.
    pub sandbox: String,
    /// `egress.policy.path`.
    pub policy_path: PathBuf,
    /// `egress.policy.digest` of the refused contents, when they could be read.
    pub policy_digest: Option<PolicyDigest>,
    /// `error.message`: the policy compiler's message (file, line, field, what is valid).
    /// Policy errors never quote credential values, which live outside policy files.
    pub error: String,
}

pub(super) fn fill_alert<'a>(r: &'a Alert, wire: &mut Wire<'a>) {
    wire.event.kind = "alert";
    wire.event.category = &["intrusion_detection"];
    wire.event.type_ = &["info"];
    wire.event.outcome = Outcome::Success;
    wire.event.reason = Some(&r.reason);
    wire.url = WireUrl::new(non_empty(&r.domain), non_empty(&r.path), None);
    wire.rule = non_empty(&r.rule).map(|name| WireRule { name });
    wire.egress.sandbox = Some(WireSandbox::named(&r.sandbox));
    wire.egress.credential = non_empty(&r.credential).map(WireCredential::named);
    wire.egress.alert = Some(WireAlert {
        count: r.count.max(1),
        window_seconds: r.window_seconds,
        response: r.response.as_str(),
    });
}
