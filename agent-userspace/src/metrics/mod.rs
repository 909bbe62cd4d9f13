//! Prometheus metrics, served on an opt-in address (`metrics:` in the daemon config, or
//! `--metrics`) at `/metrics`: OpenMetrics text when the scraper asks for it (Prometheus
//! does), the Prometheus text format otherwise.
//!
//! Almost everything is counted from the typed audit record stream: the audit handle
//! calls [`observe`] for every record it is given and the writer reports every line it
//! wrote or failed to write, so a metric and the audit trail can never disagree about
//! what happened. The few values no record carries (ring-buffer fill, kernel events lost,
//! open proxied connections, credential state, open file descriptors) are read when
//! Prometheus scrapes, through a [`Snapshot`] the daemon provides.
//!
//! Labels are bounded: sandbox, rule and credential names (which the operator chooses; a
//! sandbox's series are removed when it is detached),
//! and fixed vocabularies (verdict, hook, alert kind). No address, host name, path or
//! query ever becomes a label.

mod registry;
mod scrape;
mod server;

#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

pub use registry::Metrics;
pub use scrape::{AuditTrail, RingUsage, Snapshot, SnapshotFn};
pub use server::{serve, MetricsError, CONTENT_TYPE, TEXT_CONTENT_TYPE};

use crate::audit::Record;

/// The daemon's metrics, once installed. Records are counted only after [`install`], so
/// tools and tests that write audit logs without a daemon cost nothing here.
static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();

/// Makes `metrics` the process's metrics, fed by every audit record from now on. Returns
/// the metrics already installed if there were some.
pub fn install(metrics: Arc<Metrics>) -> Arc<Metrics> {
    GLOBAL.get_or_init(|| metrics).clone()
}

/// Counts one record given to the audit trail (called by the audit handle).
pub fn observe(record: &Record) {
    if let Some(m) = GLOBAL.get() {
        m.observe(record);
    }
}

/// Counts one line the audit writer wrote, of `bytes` bytes.
pub fn audit_written(bytes: usize) {
    if let Some(m) = GLOBAL.get() {
        m.audit_written(bytes);
    }
}

/// Counts one failed audit write.
pub fn audit_write_failed() {
    if let Some(m) = GLOBAL.get() {
        m.audit_write_failed();
    }
}
