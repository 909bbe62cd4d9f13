//! What the daemon does about alerts: the configured response per alert kind (`record` or
//! `quarantine`), the one entry point every producer raises alerts through
//! ([`Alerts::raise`]), the denial-burst detector ([`DenialBursts`]), and the limit on
//! refusals recorded one by one ([`RefusalRecords`]).
//!
//! Responses come from the sandbox's policy (`alerts.responses`), then from the daemon's
//! configuration (the same keys), else `record`. `raise` writes the alert with the
//! response it got; a `quarantine` response is handed to the daemon's core as a
//! [`QuarantineOrder`], which switches the sandbox to deny-all at once (see
//! `egressctl quarantine`). `raise` never blocks and takes no daemon lock, so any task or
//! thread may call it, including code that holds the daemon's core.
mod burst;
mod refusals;
mod settings;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use tokio::sync::mpsc;

pub use burst::{Burst, BurstConfig, DenialBursts};
pub use refusals::RefusalRecords;
pub use settings::{AlertSettings, AlertsError, RawAlerts, RawBurst, RawResponse};

use crate::audit::{Alert, AlertKind, AlertResponse, AuditHandle, Record};

/// A sandbox to quarantine because of an alert; carried out by the daemon's core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineOrder {
    pub sandbox: String,
    pub kind: AlertKind,
    /// The alert's reason.
    pub reason: String,
}

/// The alert dispatcher. Cheap to clone; hand one to every alert producer.
#[derive(Clone, Debug)]
pub struct Alerts {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    audit: AuditHandle,
    /// The daemon configuration's `alerts:`.
    defaults: AlertSettings,
    /// Each attached sandbox's policy `alerts:`, by sandbox name.
    sandboxes: RwLock<HashMap<String, AlertSettings>>,
    orders: mpsc::UnboundedSender<QuarantineOrder>,
}

impl Alerts {
    /// A dispatcher writing to `audit`, and the queue of quarantine orders the daemon's
    /// core must carry out.
    pub fn new(
        audit: AuditHandle,
        defaults: AlertSettings,
    ) -> (Self, mpsc::UnboundedReceiver<QuarantineOrder>) {
        let (orders, rx) = mpsc::unbounded_channel();
        let inner = Inner {
            audit,
            defaults,
            sandboxes: RwLock::default(),
            orders,
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            rx,
        )
    }

    /// Sets the policy's `alerts:` of a sandbox (attach, policy change, adoption).
    pub fn set_sandbox(&self, sandbox: &str, settings: AlertSettings) {
        self.inner
            .sandboxes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox.to_owned(), settings);
    }

    /// Forgets a detached sandbox.
    pub fn remove_sandbox(&self, sandbox: &str) {
        self.inner
            .sandboxes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox);
    }

    /// The response configured for `kind` alerts of `sandbox` (see [`default_response`]).
    pub fn response_for(&self, sandbox: &str, kind: AlertKind) -> AlertResponse {
        let from_policy = self
            .inner
            .sandboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sandbox)
            .and_then(|s| s.response(kind));
        from_policy
            .or_else(|| self.inner.defaults.response(kind))
            .unwrap_or_else(|| default_response(kind))
    }

    /// The denial-burst figures for `sandbox`.
    pub fn burst_config(&self, sandbox: &str) -> BurstConfig {
        let from_policy = self
            .inner
            .sandboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sandbox)
            .and_then(|s| s.denial_burst);
        from_policy
            .or(self.inner.defaults.denial_burst)
            .unwrap_or_default()
    }

    /// Raises an alert: applies the response configured for its kind and sandbox, sets
    /// [`Alert::response`] accordingly, writes it to the audit trail, and for
    /// `quarantine` orders the sandbox quarantined (the `sandbox-quarantine` record
    /// follows the alert). Returns the response. Producers summarise before calling this:
    /// one alert per burst or window, never one per packet.
    pub fn raise(&self, mut alert: Alert) -> AlertResponse {
        let response = self.response_for(&alert.sandbox, alert.kind);
        alert.response = response;
        let order = (response == AlertResponse::Quarantine).then(|| QuarantineOrder {
            sandbox: alert.sandbox.clone(),
            kind: alert.kind,
            reason: alert.reason.clone(),
        });
        tracing::warn!(sandbox = %alert.sandbox, kind = alert.kind.as_str(), count = alert.count, response = response.as_str(), "Alert");
        self.inner.audit.emit(Record::Alert(alert));
        if let Some(order) = order {
            if self.inner.orders.send(order).is_err() {
                tracing::error!(
                    "The daemon is stopping; a quarantine ordered by an alert was not carried out"
                );
            }
        }
        response
    }
}

/// The response to `kind` when neither the policy nor the daemon's configuration names
/// one: `quarantine` for `secret-outbound` (a sandbox should never hold a secret; and each
/// refusal would tell a sandbox that holds part of one whether a guessed next character is
/// right, as the cut-short forms are matched too), else `record`.
pub fn default_response(kind: AlertKind) -> AlertResponse {
    match kind {
        AlertKind::SecretOutbound => AlertResponse::Quarantine,
        _ => AlertResponse::Record,
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::audit::AuditLog;

    fn settings(yaml: &str) -> Result<AlertSettings, AlertsError> {
        let raw: RawAlerts = serde_yaml_ng::from_str(yaml).unwrap();
        AlertSettings::compile(&raw)
    }

    /// A kind listed twice is an error, not the last one winning silently (a
    /// `quarantine` above turned into `record` below).
    #[test]
    fn a_kind_listed_twice_is_an_error() {
        let err = serde_yaml_ng::from_str::<RawAlerts>(
            "responses:\n  secret-outbound: quarantine\n  secret-outbound: record\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`secret-outbound` is listed twice"), "{err}");
        let ok: RawAlerts =
            serde_yaml_ng::from_str("responses:\n  secret-outbound: quarantine\n").unwrap();
        assert_eq!(ok.responses.len(), 1);
    }

    #[test]
    fn sections_are_checked() {
        let s = settings(
            "responses: {secret-outbound: quarantine, denial-burst: record}\n\
             denial_burst: {count: 5, seconds: 2}\n",
        )
        .unwrap();
        assert_eq!(
            s.response(AlertKind::SecretOutbound),
            Some(AlertResponse::Quarantine)
        );
        assert_eq!(
            s.response(AlertKind::DenialBurst),
            Some(AlertResponse::Record)
        );
        assert_eq!(s.response(AlertKind::DnsBudget), None);
        assert_eq!(
            s.denial_burst,
            Some(BurstConfig {
                count: 5,
                seconds: 2
            })
        );
        let e = settings("responses: {secret-leak: quarantine}\n").unwrap_err();
        assert_eq!(e.field, "responses");
        assert!(e.message.contains("secret-reflected"), "{e:?}");
        let e = settings("denial_burst: {count: 0, seconds: 2}\n").unwrap_err();
        assert!(e.message.contains("count 0"), "{e:?}");
        let e = settings("denial_burst: {count: 3, seconds: 0}\n").unwrap_err();
        assert!(e.message.contains("seconds 0"), "{e:?}");
        assert!(serde_yaml_ng::from_str::<RawAlerts>("responses: {dns-budget: panic}\n").is_err());
        assert!(serde_yaml_ng::from_str::<RawAlerts>("respond: {}\n").is_err());
    }

    #[tokio::test]
    async fn raise_applies_policy_then_daemon_then_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (audit, task) = AuditLog::open(crate::audit::AuditSink::File(path.clone())).unwrap();
        let task = tokio::spawn(task.run());
        let defaults =
            settings("responses: {dns-budget: quarantine, secret-reflected: quarantine}\n")
                .unwrap();
        let (alerts, mut orders) = Alerts::new(audit, defaults);
        alerts.set_sandbox(
            "a",
            settings("responses: {secret-reflected: record, denial-burst: quarantine}\ndenial_burst: {count: 3, seconds: 1}\n").unwrap(),
        );
        let t = time::OffsetDateTime::now_utc();
        let raise = |kind, sandbox: &str| alerts.raise(Alert::new(t, kind, sandbox, "seen"));
        // The policy overrides the daemon; the daemon fills in; else record.
        assert_eq!(
            raise(AlertKind::SecretReflected, "a"),
            AlertResponse::Record
        );
        assert_eq!(
            raise(AlertKind::DenialBurst, "a"),
            AlertResponse::Quarantine
        );
        assert_eq!(raise(AlertKind::DnsBudget, "a"), AlertResponse::Quarantine);
        assert_eq!(raise(AlertKind::RateLimit, "a"), AlertResponse::Record);
        // Named nowhere: a secret in a request quarantines.
        assert_eq!(
            raise(AlertKind::SecretOutbound, "a"),
            AlertResponse::Quarantine
        );
        assert_eq!(
            raise(AlertKind::SecretReflected, "b"),
            AlertResponse::Quarantine
        );
        assert_eq!(
            alerts.burst_config("a"),
            BurstConfig {
                count: 3,
                seconds: 1
            }
        );
        assert_eq!(alerts.burst_config("b"), BurstConfig::DEFAULT);
        let got: Vec<(String, AlertKind)> = std::iter::from_fn(|| orders.try_recv().ok())
            .map(|o| (o.sandbox, o.kind))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".to_owned(), AlertKind::DenialBurst),
                ("a".to_owned(), AlertKind::DnsBudget),
                ("a".to_owned(), AlertKind::SecretOutbound),
                ("b".to_owned(), AlertKind::SecretReflected),
            ]
        );
        alerts.remove_sandbox("a");
        assert_eq!(raise(AlertKind::DenialBurst, "a"), AlertResponse::Record);
        drop(alerts);
        task.await.unwrap().unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let responses: Vec<&str> = lines
            .iter()
            .map(|l| l["egress"]["alert"]["response"].as_str().unwrap())
            .collect();
        assert_eq!(
            responses,
            [
                "record",
                "quarantine",
                "quarantine",
                "record",
                "quarantine",
                "quarantine",
                "record"
            ]
        );
    }
}
