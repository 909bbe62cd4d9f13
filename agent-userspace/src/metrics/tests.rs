//! Counting from records, the exposition format, scrape-time values and the endpoint.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use time::macros::datetime;

use super::*;
use crate::{
    audit::{
        Alert, AlertKind, DnsEvent, DnsVerdict, Hook, NetworkDecision, ProxyEvent, RuleRef, Verdict,
    },
    audit::{ProxyRecord, ProxyVerdict, RecordKind, TlsMode},
    credentials::CredentialStats,
};

const T0: time::OffsetDateTime = datetime!(2026-11-21 22:03:04.123456 UTC);

fn decision(sandbox: &str, hook: Hook, verdict: Verdict, rule: RuleRef) -> Record {
    Record::Network(NetworkDecision {
        time: T0,
        sandbox: sandbox.into(),
        cgroup_id: 1,
        pid: 2,
        process_name: "curl".into(),
        uid: 0,
        gid: 0,
        socket_cookie: 3,
        netns_cookie: 4,
        hook,
        protocol: 6,
        destination_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        destination_port: 443,
        family: hook.family().unwrap_or(crate::audit::SocketFamily::Inet),
        verdict,
        rule,
        domain: Some("api.github.example".into()),
        option: None,
        reason: None,
    })
}

fn request(verdict: ProxyVerdict, reason: Option<&str>, duration_ms: u64) -> Record {
    Record::Proxy(ProxyEvent {
        time: T0,
        record: ProxyRecord {
            kind: RecordKind::Request,
            sandbox: "agent-1".into(),
            connection_id: "0000000000001000-0000000100000042".into(),
            rule_name: "github".into(),
            tls_mode: TlsMode::Intercept,
            original_dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 443),
            sni: Some("api.github.example".into()),
            method: Some("GET".into()),
            host: Some("api.github.example".into()),
            path: Some("/repos/acme/secret-project".into()),
            query_keys: None,
            status: Some(200),
            bytes_in: 10,
            bytes_out: 5000,
            duration_ms,
            credential: Some("github-token".into()),
            verdict,
            reason: reason.map(str::to_owned),
            git: None,
            scrubbed: 0,
            secret: None,
            forwarded: false,
            credential_use: None,
        },
    })
}

fn dns(verdict: DnsVerdict, rcode: &str) -> Record {
    Record::Dns(DnsEvent {
        time: T0,
        sandbox: "agent-1".into(),
        question_name: "exfil.example".into(),
        question_type: "A".into(),
        response_code: rcode.into(),
        resolved_ip: Vec::new(),
        verdict,
        rule: None,
        reason: None,
        upstream: None,
        refused: Vec::new(),
    })
}

/// The value of the sample line that starts with `series ` (name and labels exactly).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[test]
fn decisions_are_counted_by_sandbox_hook_verdict_and_rule() {
    let m = Metrics::default();
    for _ in 0..3 {
        m.observe(&decision(
            "agent-1",
            Hook::Connect4,
            Verdict::Deny,
            RuleRef::Default,
        ));
    }
    m.observe(&decision(
        "agent-1",
        Hook::Connect6,
        Verdict::Allow,
        RuleRef::Named("pypi".into()),
    ));
    m.observe(&decision(
        "agent-2",
        Hook::Sendmsg4,
        Verdict::Deny,
        RuleRef::Default,
    ));
    let text = m.encode().unwrap_or_default();
    assert_eq!(
        value(
            &text,
            r#"egressd_decisions_total{sandbox="agent-1",hook="connect4",verdict="deny",rule="default"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"egressd_decisions_total{sandbox="agent-1",hook="connect6",verdict="allow",rule="pypi"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"egressd_decisions_total{sandbox="agent-2",hook="sendmsg4",verdict="deny",rule="default"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&text, r#"egressd_audit_records_total{action="connect"}"#),
        Some(4.0)
    );
    assert_eq!(
        value(&text, r#"egressd_audit_records_total{action="sendmsg"}"#),
        Some(1.0)
    );
    // Addresses and names learned from DNS never become labels.
    assert!(!text.contains("192.0.2.10"), "{text}");
    assert!(!text.contains("api.github.example"), "{text}");
}

#[test]
fn proxy_requests_latency_upstream_errors_and_injections() {
    let m = Metrics::default();
    m.observe(&request(ProxyVerdict::Allow, None, 87));
    m.observe(&request(
        ProxyVerdict::Allow,
        Some("upstream connect timed out"),
        3000,
    ));
    m.observe(&request(ProxyVerdict::Deny, Some("method not allowed"), 1));
    let text = m.encode().unwrap_or_default();
    let s = r#"sandbox="agent-1",rule="github""#;
    assert_eq!(
        value(
            &text,
            &format!(r#"egressd_proxy_requests_total{{{s},kind="request",verdict="allow"}}"#)
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            &format!(r#"egressd_proxy_requests_total{{{s},kind="request",verdict="deny"}}"#)
        ),
        Some(1.0)
    );
    // Only the allowed request whose upstream failed is an upstream error.
    assert_eq!(
        value(
            &text,
            &format!("egressd_proxy_upstream_errors_total{{{s}}}")
        ),
        Some(1.0)
    );
    // A credential counts as injected only on allowed requests.
    assert_eq!(
        value(
            &text,
            &format!("egressd_credential_injections_total{{{s}}}")
        ),
        Some(2.0)
    );
    let h = format!(r#"{s},kind="request""#);
    assert_eq!(
        value(
            &text,
            &format!("egressd_proxy_duration_seconds_count{{{h}}}")
        ),
        Some(3.0)
    );
    let sum = value(&text, &format!("egressd_proxy_duration_seconds_sum{{{h}}}"));
    assert!(sum.is_some_and(|v| (v - 3.088).abs() < 1e-9), "{sum:?}");
    // 87 ms and 1 ms fall at or below the 0.16 s bucket; 3 s does not.
    assert_eq!(
        value(
            &text,
            &format!(r#"egressd_proxy_duration_seconds_bucket{{le="0.16",{h}}}"#)
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!("egressd_proxy_received_bytes_total{{{s}}}")),
        Some(15000.0)
    );
    assert_eq!(
        value(&text, &format!("egressd_proxy_sent_bytes_total{{{s}}}")),
        Some(30.0)
    );
    // No path, host or credential name in any label.
    assert!(!text.contains("secret-project"));
    assert!(!text.contains("github-token"));
}

#[test]
fn dns_alerts_and_bounded_response_codes() {
    let m = Metrics::default();
    m.observe(&dns(DnsVerdict::Allow, "NOERROR"));
    m.observe(&dns(DnsVerdict::Deny, "NXDOMAIN"));
    m.observe(&dns(DnsVerdict::Allow, "BADCOOKIE"));
    let mut alert = Alert::new(T0, AlertKind::DnsBudget, "agent-1", "over 20 queries/s");
    alert.count = 57;
    m.observe(&Record::Alert(alert));
    let text = m.encode().unwrap_or_default();
    assert_eq!(
        value(
            &text,
            r#"egressd_dns_queries_total{sandbox="agent-1",verdict="deny",rcode="NXDOMAIN"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"egressd_dns_queries_total{sandbox="agent-1",verdict="allow",rcode="other"}"#
        ),
        Some(1.0)
    );
    assert!(!text.contains("BADCOOKIE"));
    assert!(!text.contains("exfil.example"));
    assert_eq!(
        value(
            &text,
            r#"egressd_alerts_total{sandbox="agent-1",kind="dns-budget"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"egressd_alert_occurrences_total{sandbox="agent-1",kind="dns-budget"}"#
        ),
        Some(57.0)
    );
}

/// Containers come and go: a detached sandbox's series leave the exposition, every
/// family's, and the other sandboxes' stay.
#[test]
fn a_detached_sandboxs_series_are_removed() {
    let m = Metrics::default();
    let denied_connect =
        |sandbox: &str| decision(sandbox, Hook::Connect4, Verdict::Deny, RuleRef::Default);
    for sandbox in ["agent-2", "agent-1"] {
        m.observe(&denied_connect(sandbox));
    }
    m.observe(&request(ProxyVerdict::Allow, Some("upstream reset"), 12));
    m.observe(&request(ProxyVerdict::Deny, None, 1));
    m.observe(&dns(DnsVerdict::Deny, "NXDOMAIN"));
    m.observe(&Record::Alert(Alert::new(
        T0,
        AlertKind::DenialBurst,
        "agent-1",
        "many denials",
    )));
    let lifecycle = |sandbox: &str| crate::audit::SandboxLifecycle {
        time: T0,
        sandbox: sandbox.into(),
        cgroup_path: "/sys/fs/cgroup/unified/agent".into(),
        cgroup_id: 1,
        policy_path: "/etc/egressd/agent.yaml".into(),
        policy_digest: crate::audit::PolicyDigest::of(b"default: deny\n"),
        reason: None,
        packet_sockets_covered: None,
        posture: None,
    };
    let detach = |sandbox: &str| Record::SandboxDetach(lifecycle(sandbox));
    let before = m.encode().unwrap_or_default();
    let labelled = |text: &str, sandbox: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("sandbox=\"{sandbox}\"")))
            .count()
    };
    // decisions, proxy (2), upstream errors, injections, duration (buckets, sum, count),
    // bytes (2), DNS, alerts (2).
    assert!(labelled(&before, "agent-1") > 12, "{before}");
    m.observe(&detach("agent-1"));
    let after = m.encode().unwrap_or_default();
    assert_eq!(labelled(&after, "agent-1"), 0, "{after}");
    assert_eq!(
        value(
            &after,
            r#"egressd_decisions_total{sandbox="agent-2",hook="connect4",verdict="deny",rule="default"}"#
        ),
        Some(1.0),
        "{after}"
    );
    // Records of the detached sandbox that arrive late (its connections closed, kernel
    // events read after the detach) make no series again.
    m.observe(&request(
        ProxyVerdict::Deny,
        Some("closed by the daemon"),
        3,
    ));
    m.observe(&denied_connect("agent-1"));
    let late = m.encode().unwrap_or_default();
    assert_eq!(labelled(&late, "agent-1"), 0, "{late}");
    // A sandbox attached again under the name counts from zero.
    m.observe(&Record::SandboxAttach(lifecycle("agent-1")));
    m.observe(&denied_connect("agent-1"));
    let again = m.encode().unwrap_or_default();
    assert_eq!(labelled(&again, "agent-1"), 1, "{again}");
    m.observe(&detach("agent-1"));
    m.observe(&detach("agent-2"));
    let none = m.encode().unwrap_or_default();
    assert!(!none.contains("sandbox="), "{none}");
    assert_eq!(
        value(
            &none,
            r#"egressd_audit_records_total{action="sandbox-detach"}"#
        ),
        Some(3.0)
    );
}

#[test]
fn audit_writes_bytes_and_errors() {
    let m = Metrics::default();
    m.audit_written(700);
    m.audit_written(300);
    m.audit_write_failed();
    let text = m.encode().unwrap_or_default();
    assert_eq!(
        value(&text, "egressd_audit_written_records_total"),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "egressd_audit_written_bytes_total"),
        Some(1000.0)
    );
    assert_eq!(value(&text, "egressd_audit_write_errors_total"), Some(1.0));
    assert!(text.ends_with("# EOF\n"), "{text}");
}

fn full_snapshot() -> Snapshot {
    Snapshot {
        sandboxes: Some(2),
        ring: Some(RingUsage {
            used_bytes: 4096,
            capacity_bytes: 4 << 20,
        }),
        kernel_events_lost: Some(17),
        audit: Some(AuditTrail {
            healthy: false,
            queued: 12,
            lost: 3,
        }),
        proxy_open_connections: vec![("agent-1".into(), 3), ("agent-2".into(), 0)],
        credentials: vec![
            CredentialStats {
                name: "github".into(),
                source: "github_app",
                fetches: 4,
                failures: 1,
                expires_in: Some(Duration::from_secs(1800)),
            },
            CredentialStats {
                name: "pypi".into(),
                source: "file",
                fetches: 0,
                failures: 0,
                expires_in: None,
            },
        ],
    }
}

#[test]
fn scrape_time_values_come_from_the_snapshot() {
    let m = Metrics::new(Some(Arc::new(full_snapshot)));
    let text = m.encode().unwrap_or_default();
    assert_eq!(value(&text, "egressd_sandboxes"), Some(2.0), "{text}");
    assert_eq!(value(&text, "egressd_ring_buffer_used_bytes"), Some(4096.0));
    assert_eq!(
        value(&text, "egressd_ring_buffer_capacity_bytes"),
        Some(4_194_304.0)
    );
    assert_eq!(value(&text, "egressd_kernel_events_lost_total"), Some(17.0));
    assert_eq!(value(&text, "egressd_audit_healthy"), Some(0.0), "{text}");
    assert_eq!(value(&text, "egressd_audit_queued_records"), Some(12.0));
    assert_eq!(value(&text, "egressd_audit_records_lost_total"), Some(3.0));
    assert_eq!(
        value(
            &text,
            r#"egressd_proxy_open_connections{sandbox="agent-1"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &text,
            r#"egressd_proxy_open_connections{sandbox="agent-2"}"#
        ),
        Some(0.0)
    );
    let gh = r#"{credential="github",source="github_app"}"#;
    assert_eq!(
        value(&text, &format!("egressd_credential_fetches_total{gh}")),
        Some(4.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("egressd_credential_fetch_failures_total{gh}")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&text, &format!("egressd_credential_expiry_seconds{gh}")),
        Some(1800.0)
    );
    // A file credential does not expire: no expiry sample.
    assert!(!text.contains(r#"egressd_credential_expiry_seconds{credential="pypi""#));
    let fds = value(&text, "egressd_open_fds");
    assert!(fds.is_some_and(|n| n >= 3.0), "{fds:?}");
}

#[tokio::test]
async fn endpoint_serves_openmetrics_and_nothing_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let m = Arc::new(Metrics::default());
    m.observe(&decision(
        "agent-1",
        Hook::Connect4,
        Verdict::Deny,
        RuleRef::Default,
    ));
    let (addr, task) = serving(m).await;
    let get = |path: &'static str, method: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        out
    };
    let ok = get("/metrics", "GET").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.to_ascii_lowercase()
            .contains(&format!("content-type: {CONTENT_TYPE}")),
        "{ok}"
    );
    assert!(ok.contains(r#"egressd_decisions_total{sandbox="agent-1""#));
    assert!(ok.trim_end().ends_with("# EOF"));
    // Without OpenMetrics in `Accept`: the Prometheus text format.
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let mut plain = String::new();
    s.read_to_string(&mut plain)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert!(
        plain
            .to_ascii_lowercase()
            .contains(&format!("content-type: {TEXT_CONTENT_TYPE}")),
        "{plain}"
    );
    assert!(plain.contains("# HELP egressd_decisions_total "), "{plain}");
    assert!(!plain.contains("# EOF"));
    assert!(get("/", "GET").await.starts_with("HTTP/1.1 404"));
    assert!(get("/metrics", "POST").await.starts_with("HTTP/1.1 405"));
    task.abort();
}

#[test]
fn every_metric_the_dashboard_uses_exists() {
    let m = Metrics::new(Some(Arc::new(full_snapshot)));
    m.observe(&request(ProxyVerdict::Allow, Some("upstream reset"), 87));
    m.observe(&decision(
        "agent-1",
        Hook::Connect4,
        Verdict::Deny,
        RuleRef::Default,
    ));
    m.observe(&dns(DnsVerdict::Deny, "NXDOMAIN"));
    m.observe(&Record::Alert(Alert::new(
        T0,
        AlertKind::DenialBurst,
        "agent-1",
        "burst",
    )));
    m.audit_write_failed();
    let text = m.encode_prometheus_text().unwrap_or_default();
    let dashboard = include_str!("../../../deploy/grafana/egressd.json");
    let mut checked = 0;
    for (i, _) in dashboard.match_indices("egressd_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            text.lines().any(|l| {
                l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name} "))
                    || l.starts_with(&format!("# TYPE {name} "))
            }),
            "dashboard uses {name}, which the daemon does not export"
        );
        checked += 1;
    }
    assert!(checked > 10, "{checked}");
}

/// Sixteen clients that pipeline scrapes and never read the answers hold every slot only
/// for a connection's lifetime (1 s in tests): a scrape after it is served.
#[tokio::test]
async fn clients_that_never_read_do_not_stop_scrapes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let m = Arc::new(Metrics::default());
    for i in 0..200 {
        m.observe(&decision(
            &format!("agent-{i}"),
            Hook::Connect4,
            Verdict::Deny,
            RuleRef::Default,
        ));
    }
    let (addr, task) = serving(m).await;
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let s = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| unreachable!("{e}"));
        s.set_recv_buffer_size(4096)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut s = s
            .connect(addr)
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let scrapes = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
        // As much as the server reads; it stops reading once its answers back up.
        let _ =
            tokio::time::timeout(Duration::from_millis(200), s.write_all(scrapes.as_bytes())).await;
        stalled.push(s);
    }
    let started = std::time::Instant::now();
    let scrape = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    };
    let out = tokio::time::timeout(Duration::from_secs(10), scrape)
        .await
        .unwrap_or_else(|_| unreachable!("no scrape served behind stalled clients"));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(stalled);
    task.abort();
}

/// `/metrics` served from `m` on a loopback port: its address and the serving task.
async fn serving(m: Arc<Metrics>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (addr, serving) = serve(SocketAddr::from(([127, 0, 0, 1], 0)), m)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    (addr, tokio::spawn(serving))
}
