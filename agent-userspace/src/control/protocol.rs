//! Request and response types of the control socket.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::audit::DetachReason;

/// A container's init process as a runtime hook sees it at `createRuntime`: it runs the
/// runtime's own code with the runtime's capabilities, and drops to the container's
/// (`process.capabilities` of its OCI config) before the container's first instruction.
/// Its posture is read from those.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeInit {
    pub pid: u32,
    /// Capability names as the OCI config spells them (`CAP_NET_RAW`): the union of its
    /// effective, permitted and ambient sets.
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Confine a cgroup with a policy, or replace the policy of an attached sandbox.
    Attach {
        cgroup: PathBuf,
        name: Option<String>,
        /// Where the policy came from (used in messages and records).
        policy_path: String,
        /// The policy text; the daemon compiles it itself.
        policy_source: String,
        /// Network namespace of the sandbox (for the proxy listener); default: that of a
        /// process in the cgroup, else the daemon's.
        #[serde(default)]
        netns: Option<PathBuf>,
        /// Set by the OCI hook at `createRuntime`: the container's init process, which
        /// still holds the runtime's capabilities, and those it will hold.
        #[serde(default)]
        runtime_init: Option<RuntimeInit>,
    },
    /// A container of a Kubernetes pod (the OCI hook in pod scope): attaches the pod's
    /// sandbox if there is none by that name, as [`Request::Attach`] does; otherwise the
    /// container joins it, never replacing its policy: the sandbox must confine `cgroup`
    /// with the policy at `policy_path`, and the container's init must be inside it, in
    /// its network namespace, and meet the policy's requirements. Decided under one lock,
    /// so two containers starting at once cannot both attach. A process inside the sandbox
    /// it names may send it (a runtime's hook can run in the pod's cgroup).
    Join {
        name: String,
        /// The container's id, from the runtime's state (for the record of a refusal).
        container: String,
        cgroup: PathBuf,
        policy_path: String,
        policy_source: String,
        netns: PathBuf,
        runtime_init: RuntimeInit,
    },
    /// Remove confinement, by sandbox name or by cgroup path; with both, the named sandbox
    /// only if it confines that cgroup.
    Detach {
        name: Option<String>,
        cgroup: Option<PathBuf>,
        /// Why, for the audit record [default: operator].
        #[serde(default)]
        reason: Option<DetachReason>,
    },
    Status,
    /// Switch a sandbox to deny-all: kernel, proxy and DNS; revoke its live credentials.
    Quarantine {
        name: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Give a quarantined sandbox its policy back.
    Release {
        name: String,
    },
    /// The local CA certificate (PEM) sandboxes must trust for the proxy.
    CaExport,
    /// Each credential's state (kind, source, hosts, last fetch, expiry, last error,
    /// sandboxes using it), never a value.
    Credentials,
    /// A sandbox's placeholder sentinel for a `placeholder` credential.
    Placeholder {
        sandbox: String,
        credential: String,
    },
    /// The OCI hook refused to let a container start (it is not attached): recorded.
    HookRefused {
        /// The container's id, from the runtime's state.
        container: String,
        /// Why (at most a few hundred characters).
        reason: String,
    },
}

/// Decodes one request line as the daemon reads it off the socket (the newline may still
/// be on it): UTF-8 JSON of a [`Request`]. `Err` is the error to answer with instead.
pub fn decode_request(line: Vec<u8>) -> Result<Request, String> {
    let line = String::from_utf8(line).map_err(|_| "malformed request: not UTF-8".to_owned())?;
    serde_json::from_str::<Request>(&line).map_err(|e| format!("malformed request: {e}"))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Vec<crate::credentials::CredentialState>>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: Some(message.into()),
            ..Default::default()
        }
    }
    pub fn error(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub started_at: String,
    pub bpffs: PathBuf,
    pub audit_log: String,
    /// Kernel events that could not be delivered, since the maps were created.
    pub events_lost: u64,
    /// Network namespaces the proxy listens in (one per namespace some sandbox uses).
    #[serde(default)]
    pub proxy_listeners: usize,
    /// Whether audit records are being written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::audit::AuditHealth>,
    /// Whether sandboxes are kept from creating packet (and other non-inet) sockets: the
    /// BPF LSM program is attached and `bpf` is an active LSM.
    #[serde(default)]
    pub packet_sockets_covered: bool,
    /// Why not, when they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet_sockets_note: Option<String>,
    /// Whether socket options set by compat (32-bit) calls are covered: the kernel runs
    /// no such calls (the option hook never sees theirs).
    #[serde(default)]
    pub compat_setsockopt_covered: bool,
    /// Why not, when they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compat_setsockopt_note: Option<String>,
    pub sandboxes: Vec<SandboxStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SandboxStatus {
    pub name: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub policy: String,
    pub policy_digest: String,
    pub default: String,
    pub rules: usize,
    pub attached_at: String,
    /// Network namespace of the sandbox's proxy listener and resolver: the path given at
    /// attach, else that of a process in the cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Inode of that network namespace (`net:[INODE]` in `/proc/PID/ns/net`'s link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
    /// Hooks whose links are pinned (all of them when confined).
    pub hooks: Vec<String>,
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    /// Connections sent to the proxy or DNS to the sandbox's resolver.
    #[serde(default)]
    pub redirected: u64,
    /// Set while the sandbox is quarantined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineStatus>,
    /// Processes in the sandbox's cgroup tree now.
    #[serde(default)]
    pub processes: usize,
    /// Union of their effective capabilities, by name.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Whether one holds CAP_SYS_ADMIN (could mount cgroup2 and leave the cgroup).
    #[serde(default)]
    pub can_leave_cgroup: bool,
}

/// Why and since when a sandbox is quarantined.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QuarantineStatus {
    /// RFC 3339.
    pub since: String,
    /// `operator`, or the alert kind whose response it was.
    pub trigger: String,
    #[serde(default)]
    pub reason: Option<String>,
}
