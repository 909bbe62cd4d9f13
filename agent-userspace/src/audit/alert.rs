//! Alert records (`event.kind: alert`): something an operator should look at now, not
//! only a decision to keep. Producers summarise: one alert per burst or window, carrying
//! the count, never one per packet or query.
//!
//! Like every record, an alert is built from names, ids and counts only: it says *which*
//! credential was reflected or seen outbound, never its value.

use time::OffsetDateTime;

/// What an alert is about; `event.action` of the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlertKind {
    /// An origin sent back a secret the proxy injected; the proxy scrubbed it.
    SecretReflected,
    /// A request from the sandbox carried a current secret value; it was refused.
    SecretOutbound,
    /// A sandbox went over its DNS budget (queries per second or names per suffix).
    DnsBudget,
    /// Many denied decisions in a short time.
    DenialBurst,
    /// A task left its sandbox's cgroup.
    CgroupEscape,
    /// A sandbox was attached with a risky posture (capabilities, writable cgroupfs).
    RiskyPosture,
    /// A socket option or control message that would route packets elsewhere than the
    /// judged address (source routing, routing headers) was refused.
    SourceRouting,
    /// A sandbox went over a request or upload budget.
    RateLimit,
    /// A sandbox sent a credential's placeholder to a host the credential does not list;
    /// the request was refused.
    PlaceholderMisdirected,
    /// A process in a sandbox connected to the daemon's control socket; refused.
    ControlSocket,
}

impl AlertKind {
    /// `event.action` of the record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecretReflected => "secret-reflected",
            Self::SecretOutbound => "secret-outbound",
            Self::DnsBudget => "dns-budget",
            Self::DenialBurst => "denial-burst",
            Self::CgroupEscape => "cgroup-escape",
            Self::RiskyPosture => "risky-posture",
            Self::SourceRouting => "source-routing",
            Self::RateLimit => "rate-limit",
            Self::PlaceholderMisdirected => "placeholder-misdirected",
            Self::ControlSocket => "control-socket",
        }
    }

    /// Every kind, for schema tests and configuration parsing.
    pub const ALL: [AlertKind; 10] = [
        Self::SecretReflected,
        Self::SecretOutbound,
        Self::DnsBudget,
        Self::DenialBurst,
        Self::CgroupEscape,
        Self::RiskyPosture,
        Self::SourceRouting,
        Self::RateLimit,
        Self::PlaceholderMisdirected,
        Self::ControlSocket,
    ];

    /// The kind named `s` (its `event.action`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// What the daemon did about an alert: `egress.alert.response`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AlertResponse {
    /// Recorded only.
    #[default]
    Record,
    /// The sandbox was quarantined (deny-all) because of it.
    Quarantine,
}

impl AlertResponse {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::Quarantine => "quarantine",
        }
    }
}

/// One alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// `@timestamp`: when the alert was raised (the end of the window it summarises).
    pub time: OffsetDateTime,
    pub kind: AlertKind,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `event.reason`: what happened, in words. Never a secret value.
    pub reason: String,
    /// `egress.alert.count`: occurrences this record summarises (at least 1).
    pub count: u64,
    /// `egress.alert.window_seconds`: the window the count was taken over, if any.
    pub window_seconds: Option<u64>,
    /// `rule.name`: the policy rule involved, if any.
    pub rule: Option<String>,
    /// `url.domain` and `url.path` of the request involved, if any.
    pub domain: Option<String>,
    pub path: Option<String>,
    /// `egress.credential.name`: the credential involved (its name only).
    pub credential: Option<String>,
    /// `egress.alert.response`.
    pub response: AlertResponse,
}

impl Alert {
    /// An alert with no rule, request or credential attached; fill those in as needed.
    pub fn new(
        time: OffsetDateTime,
        kind: AlertKind,
        sandbox: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            time,
            kind,
            sandbox: sandbox.into(),
            reason: reason.into(),
            count: 1,
            window_seconds: None,
            rule: None,
            domain: None,
            path: None,
            credential: None,
            response: AlertResponse::Record,
        }
    }
}
