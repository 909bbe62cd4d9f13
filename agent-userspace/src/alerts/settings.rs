//! The `alerts:` section of a policy and of the daemon's configuration, and its checked
//! form: the response per alert kind and the denial-burst threshold.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::burst::BurstConfig;
use crate::audit::{AlertKind, AlertResponse};

/// The `alerts:` section of a policy, and of the daemon's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Alert kind (`secret-reflected`, `secret-outbound`, `dns-budget`, `denial-burst`,
    /// `cgroup-escape`, `risky-posture`, `source-routing`, `rate-limit`) -> `record` or
    /// `quarantine`. Kinds not listed take the daemon's setting, else `record`.
    #[serde(default, deserialize_with = "crate::unique_keys::map")]
    pub responses: BTreeMap<String, RawResponse>,
    /// When a `denial-burst` alert is raised: `count` denied decisions within `seconds`
    /// (default 50 in 10).
    #[serde(default)]
    pub denial_burst: Option<RawBurst>,
}

/// `record` or `quarantine`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawResponse {
    Record,
    Quarantine,
}

/// `alerts.denial_burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBurst {
    /// Denied decisions that make a burst (1-100000).
    pub count: u64,
    /// Window length in seconds (1-3600).
    pub seconds: u64,
}

/// A checked `alerts:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertSettings {
    /// Only the kinds the section lists.
    pub responses: Vec<(AlertKind, AlertResponse)>,
    pub denial_burst: Option<BurstConfig>,
}

/// Why an `alerts:` section is invalid: the field (below `alerts`) and what would be valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertsError {
    pub field: &'static str,
    pub message: String,
}

impl AlertSettings {
    /// Checks an `alerts:` section.
    pub fn compile(raw: &RawAlerts) -> Result<Self, AlertsError> {
        let mut responses = Vec::new();
        for (name, response) in &raw.responses {
            let kind = AlertKind::parse(name).ok_or_else(|| AlertsError {
                field: "responses",
                message: format!(
                    "`{name}` is not an alert kind (valid: {})",
                    AlertKind::ALL.map(AlertKind::as_str).join(", ")
                ),
            })?;
            let response = match response {
                RawResponse::Record => AlertResponse::Record,
                RawResponse::Quarantine => AlertResponse::Quarantine,
            };
            responses.push((kind, response));
        }
        let denial_burst = match raw.denial_burst {
            None => None,
            Some(b) => {
                let count = u32::try_from(b.count)
                    .ok()
                    .filter(|c| (1..=BurstConfig::MAX_COUNT).contains(c))
                    .ok_or_else(|| AlertsError {
                        field: "denial_burst",
                        message: format!(
                            "count {} is out of range (valid: 1-{})",
                            b.count,
                            BurstConfig::MAX_COUNT
                        ),
                    })?;
                let seconds = u32::try_from(b.seconds)
                    .ok()
                    .filter(|s| (1..=BurstConfig::MAX_SECONDS).contains(s))
                    .ok_or_else(|| AlertsError {
                        field: "denial_burst",
                        message: format!(
                            "seconds {} is out of range (valid: 1-{})",
                            b.seconds,
                            BurstConfig::MAX_SECONDS
                        ),
                    })?;
                Some(BurstConfig { count, seconds })
            }
        };
        Ok(Self {
            responses,
            denial_burst,
        })
    }

    pub(super) fn response(&self, kind: AlertKind) -> Option<AlertResponse> {
        self.responses
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, r)| *r)
    }
}
