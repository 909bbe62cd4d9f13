//! Small value types several record families share.

use std::fmt;

use serde::{Serialize, Serializer};

/// An optional string, with an empty one taken as absent.
pub(super) fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// `rule.name`: the matching rule, or the sandbox default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleRef {
    /// Recorded as `default`; policy rule names cannot take that name.
    Default,
    Named(String),
}

impl RuleRef {
    pub fn name(&self) -> &str {
        match self {
            Self::Default => "default",
            Self::Named(name) => name,
        }
    }
}

/// sha256 of a policy file's bytes, lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct PolicyDigest(String);

impl PolicyDigest {
    /// Digest of the policy file contents exactly as read.
    pub fn of(contents: &[u8]) -> Self {
        Self(crate::text::sha256_hex(contents))
    }

    /// Accepts a digest stored earlier (64 lowercase hex digits).
    pub fn from_hex(hex: &str) -> Option<Self> {
        (hex.len() == 64 && hex.bytes().all(|b| HEX.contains(&b))).then(|| Self(hex.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub(super) const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `egress.connection.id`: identifies one socket across the kernel record and the proxy's
/// records. Socket cookies are unique per boot; the netns cookie makes the id say where
/// it lives. Written as `<netns cookie>-<socket cookie>`, each 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    pub netns_cookie: u64,
    pub socket_cookie: u64,
}

impl ConnectionId {
    pub fn new(netns_cookie: u64, socket_cookie: u64) -> Self {
        Self {
            netns_cookie,
            socket_cookie,
        }
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:016x}", self.netns_cookie, self.socket_cookie)
    }
}

impl Serialize for ConnectionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// ECS `event.outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}
