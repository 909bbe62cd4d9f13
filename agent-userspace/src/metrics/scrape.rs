//! Values read when Prometheus scrapes, not counted from records: the daemon's state
//! (through a [`SnapshotFn`]) and the process's open file descriptors.

use std::{fmt, sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Unit,
};

use crate::credentials::CredentialStats;

/// Fill of the kernel's event ring buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingUsage {
    /// Bytes written by the kernel and not yet consumed by the daemon.
    pub used_bytes: u64,
    /// Size of the ring's data area.
    pub capacity_bytes: u64,
}

/// The audit trail as a scrape sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct AuditTrail {
    /// Records are being written (false while writes fail or one is blocked).
    pub healthy: bool,
    /// Records kept in memory while the log cannot be written.
    pub queued: u64,
    /// Records numbered and never written, since the daemon started.
    pub lost: u64,
}

/// What the daemon reports at scrape time. `None` leaves a metric out (not known).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Sandboxes attached now.
    pub sandboxes: Option<u64>,
    pub ring: Option<RingUsage>,
    /// Kernel events that could not be put in the ring buffer, since the maps were made.
    pub kernel_events_lost: Option<u64>,
    /// The audit trail's state (`egressctl status`'s), if known.
    pub audit: Option<AuditTrail>,
    /// Open proxied connections, by sandbox name.
    pub proxy_open_connections: Vec<(String, u64)>,
    /// Every configured credential.
    pub credentials: Vec<CredentialStats>,
}

/// Called on each scrape, on a blocking thread (it may take the daemon's lock).
pub type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

pub(super) struct ScrapeCollector {
    snapshot: Option<SnapshotFn>,
}

impl ScrapeCollector {
    pub(super) fn new(snapshot: Option<SnapshotFn>) -> Self {
        Self { snapshot }
    }
}

impl fmt::Debug for ScrapeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapeCollector").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabel {
    sandbox: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabel {
    credential: String,
    source: &'static str,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: i64,
) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        if let Some(fds) = open_fds() {
            gauge(
                &mut encoder,
                "open_fds",
                "File descriptors the daemon has open",
                None,
                to_i64(fds),
            )?;
        }
        if let Some(limit) = fd_limit() {
            gauge(
                &mut encoder,
                "max_fds",
                "The daemon's soft limit on open file descriptors (RLIMIT_NOFILE)",
                None,
                to_i64(limit),
            )?;
        }
        let Some(snapshot) = &self.snapshot else {
            return Ok(());
        };
        let s = snapshot();
        if let Some(n) = s.sandboxes {
            gauge(
                &mut encoder,
                "sandboxes",
                "Sandboxes attached",
                None,
                to_i64(n),
            )?;
        }
        if let Some(ring) = s.ring {
            gauge(
                &mut encoder,
                "ring_buffer_used",
                "Bytes of kernel events in the ring buffer not yet read by the daemon",
                Some(&Unit::Bytes),
                to_i64(ring.used_bytes),
            )?;
            gauge(
                &mut encoder,
                "ring_buffer_capacity",
                "Size of the kernel event ring buffer",
                Some(&Unit::Bytes),
                to_i64(ring.capacity_bytes),
            )?;
        }
        if let Some(lost) = s.kernel_events_lost {
            counter(
                &mut encoder,
                "kernel_events_lost",
                "Kernel decision events not recorded one by one: they did not fit in the ring buffer, could not be decoded, or came while the audit writer was far behind (each is reported in an events-lost audit record)",
                lost,
            )?;
        }
        if let Some(audit) = s.audit {
            gauge(
                &mut encoder,
                "audit_healthy",
                "1 while audit records are being written, 0 while writes fail or one is blocked (credentials are then refused unless audit.on_failure is continue)",
                None,
                i64::from(audit.healthy),
            )?;
            gauge(
                &mut encoder,
                "audit_queued_records",
                "Audit records kept in memory while the log cannot be written",
                None,
                to_i64(audit.queued),
            )?;
            counter(
                &mut encoder,
                "audit_records_lost",
                "Audit records numbered and never written (each range is reported in an audit-lost record)",
                audit.lost,
            )?;
        }
        {
            let metric_type = MetricType::Gauge;
            let mut family = encoder.encode_descriptor(
                "proxy_open_connections",
                "Proxied connections open now, by sandbox",
                None,
                metric_type,
            )?;
            for (sandbox, n) in &s.proxy_open_connections {
                let labels = SandboxLabel {
                    sandbox: sandbox.clone(),
                };
                ConstGauge::new(to_i64(*n)).encode(family.encode_family(&labels)?)?;
            }
        }
        if !s.credentials.is_empty() {
            {
                let mut family = encoder.encode_descriptor(
                    "credential_fetches",
                    "Values fetched from a credential's source (token mints, command runs)",
                    None,
                    MetricType::Counter,
                )?;
                for c in &s.credentials {
                    let labels = CredentialLabel {
                        credential: c.name.clone(),
                        source: c.source,
                    };
                    ConstCounter::new(c.fetches).encode(family.encode_family(&labels)?)?;
                }
            }
            {
                let mut family = encoder.encode_descriptor(
                    "credential_fetch_failures",
                    "Failed fetches from a credential's source",
                    None,
                    MetricType::Counter,
                )?;
                for c in &s.credentials {
                    let labels = CredentialLabel {
                        credential: c.name.clone(),
                        source: c.source,
                    };
                    ConstCounter::new(c.failures).encode(family.encode_family(&labels)?)?;
                }
            }
            let mut family = encoder.encode_descriptor(
                "credential_expiry",
                "Seconds until the credential's current value expires (tokens) or is fetched again (commands); absent for files and environment variables",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for c in &s.credentials {
                if let Some(left) = c.expires_in {
                    let labels = CredentialLabel {
                        credential: c.name.clone(),
                        source: c.source,
                    };
                    ConstGauge::new(seconds(left)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Entries of `/proc/self/fd` (the directory handle read itself is not counted).
pub(super) fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    let n = entries.filter(|e| e.is_ok()).count() as u64;
    Some(n.saturating_sub(1))
}

fn fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}
