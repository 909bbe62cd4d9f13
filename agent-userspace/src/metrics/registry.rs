//! The metric families and how each audit record kind updates them.

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long a detached sandbox's name is remembered, so that records arriving after its
/// detach make no series again.
const GONE_FOR: Duration = Duration::from_secs(300);

use prometheus_client::{
    encoding::{prometheus_text, text, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

use super::scrape::{ScrapeCollector, SnapshotFn};
use crate::{
    audit::{DnsEvent, DnsVerdict, NetworkDecision, ProxyEvent, Record},
    audit::{ProxyVerdict, RecordKind},
};

/// Kernel decisions (`connect`, `sendmsg`, `socket` records).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    sandbox: String,
    hook: &'static str,
    verdict: &'static str,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    sandbox: String,
    verdict: &'static str,
    /// The response code sent to the sandbox, from a fixed list (`other` beyond it).
    rcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    sandbox: String,
    rule: String,
    /// `request` (one HTTP request) or `connection` (a passthrough relay, or a connection
    /// that ended before any request).
    kind: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxRuleLabels {
    sandbox: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    sandbox: String,
    rule: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    sandbox: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// Proxy durations from 5 ms to about 41 s.
#[derive(Clone)]
struct DurationBuckets;

impl MetricConstructor<Histogram> for DurationBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.005, 2.0, 14))
    }
}

/// A series labelled with a sandbox, and which family holds it: what a sandbox's detach
/// removes.
enum Series {
    Decision(DecisionLabels),
    Dns(DnsLabels),
    Proxy(ProxyLabels),
    UpstreamErrors(SandboxRuleLabels),
    Duration(DurationLabels),
    BytesSent(SandboxRuleLabels),
    BytesReceived(SandboxRuleLabels),
    Injected(SandboxRuleLabels),
    Alerts(AlertLabels),
    AlertOccurrences(AlertLabels),
}

/// Every metric of the daemon. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    records: Family<ActionLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    dns_queries: Family<DnsLabels, Counter>,
    proxy: Family<ProxyLabels, Counter>,
    proxy_upstream_errors: Family<SandboxRuleLabels, Counter>,
    proxy_duration: Family<DurationLabels, Histogram, DurationBuckets>,
    proxy_bytes_sent: Family<SandboxRuleLabels, Counter>,
    proxy_bytes_received: Family<SandboxRuleLabels, Counter>,
    credentials_injected: Family<SandboxRuleLabels, Counter>,
    alerts: Family<AlertLabels, Counter>,
    alert_occurrences: Family<AlertLabels, Counter>,
    audit_written: Counter,
    audit_bytes: Counter,
    audit_errors: Counter,
    /// Which series each sandbox's records created, and which sandboxes are gone.
    series: Mutex<Tracked>,
}

/// The series each sandbox's records created, by sandbox name: removed when its
/// `sandbox-detach` record is counted, so that hosts where containers come and go do not
/// keep a series for every container they ever ran.
#[derive(Default)]
struct Tracked {
    by_sandbox: HashMap<String, Vec<Series>>,
    /// Sandboxes detached lately, and when: their late records make no series.
    gone: HashMap<String, Instant>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// All families, registered under the `egressd_` prefix. `snapshot`, if given, is
    /// called on each scrape for the values no audit record carries.
    pub fn new(snapshot: Option<SnapshotFn>) -> Self {
        let mut registry = Registry::with_prefix("egressd");
        let m = Self {
            records: Family::default(),
            decisions: Family::default(),
            dns_queries: Family::default(),
            proxy: Family::default(),
            proxy_upstream_errors: Family::default(),
            proxy_duration: Family::new_with_constructor(DurationBuckets),
            proxy_bytes_sent: Family::default(),
            proxy_bytes_received: Family::default(),
            credentials_injected: Family::default(),
            alerts: Family::default(),
            alert_occurrences: Family::default(),
            audit_written: Counter::default(),
            audit_bytes: Counter::default(),
            audit_errors: Counter::default(),
            series: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "audit_records",
            "Records given to the audit trail, by event.action",
            m.records.clone(),
        );
        registry.register(
            "decisions",
            "Kernel decisions on connect, sendmsg and socket creation, by sandbox, hook, verdict and rule",
            m.decisions.clone(),
        );
        registry.register(
            "dns_queries",
            "DNS queries answered for sandboxes, by verdict and response code",
            m.dns_queries.clone(),
        );
        registry.register(
            "proxy_requests",
            "Proxied HTTP requests and connections, by sandbox, rule, kind and verdict",
            m.proxy.clone(),
        );
        registry.register(
            "proxy_upstream_errors",
            "Allowed proxied requests or connections whose upstream failed",
            m.proxy_upstream_errors.clone(),
        );
        registry.register_with_unit(
            "proxy_duration",
            "Time from the start of a proxied request (or connection) to its end",
            Unit::Seconds,
            m.proxy_duration.clone(),
        );
        registry.register_with_unit(
            "proxy_sent",
            "Body bytes (connections: all bytes) the proxy relayed from sandboxes upstream",
            Unit::Bytes,
            m.proxy_bytes_sent.clone(),
        );
        registry.register_with_unit(
            "proxy_received",
            "Body bytes (connections: all bytes) the proxy relayed from upstream to sandboxes",
            Unit::Bytes,
            m.proxy_bytes_received.clone(),
        );
        registry.register(
            "credential_injections",
            "Proxied requests a credential was added to, by sandbox and rule",
            m.credentials_injected.clone(),
        );
        registry.register(
            "alerts",
            "Alert records, by sandbox and kind (dns-budget counts DNS budget hits)",
            m.alerts.clone(),
        );
        registry.register(
            "alert_occurrences",
            "Occurrences the alert records summarise (the sum of egress.alert.count)",
            m.alert_occurrences.clone(),
        );
        registry.register(
            "audit_written_records",
            "Audit records written to the audit log",
            m.audit_written.clone(),
        );
        registry.register_with_unit(
            "audit_written",
            "Bytes written to the audit log",
            Unit::Bytes,
            m.audit_bytes.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed writes to the audit log",
            m.audit_errors.clone(),
        );
        registry.register_collector(Box::new(ScrapeCollector::new(snapshot)));
        Self { registry, ..m }
    }

    /// The OpenMetrics text exposition of every metric, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The Prometheus text format 0.0.4, for clients that do not ask for OpenMetrics.
    pub fn encode_prometheus_text(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Counts one record given to the audit trail.
    pub fn observe(&self, record: &Record) {
        self.records
            .get_or_create(&ActionLabels {
                action: record.action(),
            })
            .inc();
        match record {
            Record::SandboxDetach(d) => return self.forget(&d.sandbox),
            Record::SandboxAttach(a) | Record::SandboxAdopt(a) => {
                self.tracked().gone.remove(&a.sandbox);
            }
            _ => {}
        }
        match record {
            Record::Network(r) => self.decision(r),
            Record::Dns(r) => self.dns(r),
            Record::Proxy(r) => self.proxy(r),
            Record::Alert(a) => {
                let labels = AlertLabels {
                    sandbox: a.sandbox.clone(),
                    kind: a.kind.as_str(),
                };
                if let Some(m) = self.series(&self.alerts, &labels, &a.sandbox, Series::Alerts) {
                    m.inc();
                }
                if let Some(m) = self.series(
                    &self.alert_occurrences,
                    &labels,
                    &a.sandbox,
                    Series::AlertOccurrences,
                ) {
                    m.inc_by(a.count.max(1));
                }
            }
            _ => {}
        }
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The metric of `labels` in `family`, created if it is not there yet; a created one
    /// is remembered under `sandbox`, as `keep` names it. `None` for a sandbox detached
    /// lately: what its last records say (its proxied connections closed, a query in
    /// flight, kernel events read late) makes no series again. Only a series not there
    /// yet takes the lock.
    fn series<'f, S, M, C>(
        &self,
        family: &'f Family<S, M, C>,
        labels: &S,
        sandbox: &str,
        keep: impl FnOnce(S) -> Series,
    ) -> Option<impl std::ops::Deref<Target = M> + 'f>
    where
        S: Clone + Hash + Eq,
        C: MetricConstructor<M>,
    {
        if let Some(metric) = family.get(labels) {
            return Some(metric);
        }
        // Created while the list is held, so that a detach in between cannot miss it.
        let mut tracked = self.tracked();
        if tracked.gone.contains_key(sandbox) {
            return None;
        }
        tracked
            .by_sandbox
            .entry(sandbox.to_owned())
            .or_default()
            .push(keep(labels.clone()));
        let metric = family.get_or_create(labels);
        drop(tracked);
        Some(metric)
    }

    /// Removes every series a detached sandbox's records created, and makes no more for
    /// it until it is attached again (detached names are kept for [`GONE_FOR`]).
    fn forget(&self, sandbox: &str) {
        let gone = {
            let mut tracked = self.tracked();
            let now = Instant::now();
            tracked
                .gone
                .retain(|_, at| now.duration_since(*at) < GONE_FOR);
            tracked.gone.insert(sandbox.to_owned(), now);
            tracked.by_sandbox.remove(sandbox)
        };
        let Some(gone) = gone else {
            return;
        };
        for series in gone {
            match series {
                Series::Decision(l) => self.decisions.remove(&l),
                Series::Dns(l) => self.dns_queries.remove(&l),
                Series::Proxy(l) => self.proxy.remove(&l),
                Series::UpstreamErrors(l) => self.proxy_upstream_errors.remove(&l),
                Series::Duration(l) => self.proxy_duration.remove(&l),
                Series::BytesSent(l) => self.proxy_bytes_sent.remove(&l),
                Series::BytesReceived(l) => self.proxy_bytes_received.remove(&l),
                Series::Injected(l) => self.credentials_injected.remove(&l),
                Series::Alerts(l) => self.alerts.remove(&l),
                Series::AlertOccurrences(l) => self.alert_occurrences.remove(&l),
            };
        }
    }

    fn decision(&self, r: &NetworkDecision) {
        let labels = DecisionLabels {
            sandbox: r.sandbox.clone(),
            hook: r.hook.as_str(),
            verdict: r.verdict.as_str(),
            rule: r.rule.name().to_owned(),
        };
        if let Some(m) = self.series(&self.decisions, &labels, &r.sandbox, Series::Decision) {
            m.inc();
        }
    }

    fn dns(&self, r: &DnsEvent) {
        let labels = DnsLabels {
            sandbox: r.sandbox.clone(),
            verdict: match r.verdict {
                DnsVerdict::Allow => "allow",
                DnsVerdict::Deny => "deny",
            },
            rcode: rcode_label(&r.response_code),
        };
        if let Some(m) = self.series(&self.dns_queries, &labels, &r.sandbox, Series::Dns) {
            m.inc();
        }
    }

    fn proxy(&self, e: &ProxyEvent) {
        let r = &e.record;
        let kind = match r.kind {
            RecordKind::Request => "request",
            RecordKind::Connection => "connection",
        };
        let sandbox_rule = SandboxRuleLabels {
            sandbox: r.sandbox.clone(),
            rule: r.rule_name.clone(),
        };
        let sandbox = r.sandbox.as_str();
        let labels = ProxyLabels {
            sandbox: r.sandbox.clone(),
            rule: r.rule_name.clone(),
            kind,
            verdict: r.verdict.as_str(),
        };
        if let Some(m) = self.series(&self.proxy, &labels, sandbox, Series::Proxy) {
            m.inc();
        }
        // The proxy reports an allowed request whose upstream then failed as an allow
        // with a reason (the proxy let it through; the origin did not answer).
        if r.verdict == ProxyVerdict::Allow && r.reason.as_deref().is_some_and(|s| !s.is_empty()) {
            if let Some(m) = self.series(
                &self.proxy_upstream_errors,
                &sandbox_rule,
                sandbox,
                Series::UpstreamErrors,
            ) {
                m.inc();
            }
        }
        if r.verdict == ProxyVerdict::Allow
            && r.credential.as_deref().is_some_and(|s| !s.is_empty())
        {
            if let Some(m) = self.series(
                &self.credentials_injected,
                &sandbox_rule,
                sandbox,
                Series::Injected,
            ) {
                m.inc();
            }
        }
        let labels = DurationLabels {
            sandbox: r.sandbox.clone(),
            rule: r.rule_name.clone(),
            kind,
        };
        if let Some(m) = self.series(&self.proxy_duration, &labels, sandbox, Series::Duration) {
            m.observe(r.duration_ms as f64 / 1000.0);
        }
        if let Some(m) = self.series(
            &self.proxy_bytes_sent,
            &sandbox_rule,
            sandbox,
            Series::BytesSent,
        ) {
            m.inc_by(r.bytes_in);
        }
        if let Some(m) = self.series(
            &self.proxy_bytes_received,
            &sandbox_rule,
            sandbox,
            Series::BytesReceived,
        ) {
            m.inc_by(r.bytes_out);
        }
    }

    pub fn audit_written(&self, bytes: usize) {
        self.audit_written.inc();
        self.audit_bytes
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    pub fn audit_write_failed(&self) {
        self.audit_errors.inc();
    }
}

/// DNS response codes as a label: the common ones by name, anything an upstream might
/// invent as `other`, so a resolver cannot grow the label set.
fn rcode_label(code: &str) -> &'static str {
    const KNOWN: [&str; 6] = [
        "NOERROR", "NXDOMAIN", "REFUSED", "SERVFAIL", "FORMERR", "NOTIMP",
    ];
    KNOWN.into_iter().find(|k| *k == code).unwrap_or("other")
}
