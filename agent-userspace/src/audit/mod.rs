//! The JSONL audit trail a SIEM ingests: one Elastic Common Schema JSON object per line,
//! built only from typed records ([`Record`]) and written only by [`AuditWriter`], which
//! numbers every line (`event.sequence`) and appends whole lines, many per `write(2)`. The
//! daemon sends records through a cloneable [`AuditHandle`] to an [`AuditTask`];
//! [`ClockOffset`] turns kernel event times into `@timestamp`s. The format is pinned by
//! `schema/audit-record.schema.json`, which the tests validate every record kind against.

mod alert;
mod batch;
mod clock;
mod recent;
mod record;
mod redact;
mod timestamp;
mod writer;

#[cfg(test)]
mod tests;

pub use alert::{Alert, AlertKind, AlertResponse};
pub use clock::ClockOffset;
pub use record::{
    action, format_timestamp, query_keys, AuditLost, AuditRewritten, ConnectionId,
    CredentialRevoke, DaemonStart, DaemonStop, DecodeError, DetachReason, DnsEvent, DnsVerdict,
    EncodeError, EventsLost, GitAudit, Hook, LostBySandbox, NetworkDecision, PolicyChange,
    PolicyDigest, PolicyRejected, ProxyEvent, ProxyRecord, ProxyVerdict, Quarantine, Record,
    RecordKind, RefUpdate, RefusedAnswer, RefusedOption, RuleRef, SandboxLifecycle,
    SecretDirection, SecretFinding, SocketFamily, StopReason, TlsMode, Verdict, CLIENT_ABORTED,
    ECS_VERSION, MAX_LINE, PRODUCT, VERSION,
};
pub use redact::{FindSecrets, Redactor};
pub use writer::{lost_by_sandbox, note_unnumbered_at_stop};
pub use writer::{
    AuditConfig, AuditError, AuditHandle, AuditHealth, AuditLog, AuditSink, AuditSummary,
    AuditTask, AuditWriter, LogTail, OnFailure, RotateConfig, Unnumbered,
};
