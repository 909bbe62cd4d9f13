//! `default: audit`: traffic outside the rules flows, and is recorded as "audit".
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use egress_tests::audit::{get_str, Match};
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, WEB_ORIGIN_AUDIT};
use egress_tests::require_root;
use egress_tests::world::{CANARY_V4, CANARY_V6, ORIGIN_V4};

#[test]
fn audit_default_lets_traffic_flow_and_records_it() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_AUDIT)?;
    let name = fx.sandbox.label();

    let cases: [(&str, IpAddr, u16, &str, &[u8]); 3] = [
        (
            "tcp-connect",
            IpAddr::V4(CANARY_V4),
            9,
            "tcp",
            b"audit-tcp4",
        ),
        (
            "tcp-connect",
            IpAddr::V6(CANARY_V6),
            443,
            "tcp",
            b"audit-tcp6",
        ),
        ("udp-sendto", IpAddr::V4(CANARY_V4), 9, "udp", b"audit-udp4"),
    ];
    for (op, ip, port, proto, payload) in cases {
        let text = String::from_utf8_lossy(payload).into_owned();
        expect::probe_ok(&fx.sandbox.probe(op, ip, port, &["--send", &text])?)?;
        let got = fx.canary.wait_for(Duration::from_secs(5), |e| {
            e.proto == proto && e.local_ip() == ip && e.local.port() == port && e.data == payload
        })?;
        ensure!(got.is_some(), "{op} {ip}:{port}: canary never got {text}");
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("audit", ip, port)
                .transport(proto)
                .sandbox(name),
        )?;
        ensure!(
            get_str(&rec, "event.outcome") == Some("success"),
            "audited traffic flowed, so outcome should be success: {rec}"
        );
    }
    // curl too: it connects (any exit but "couldn't connect").
    let out = fx.sandbox.curl(&[&format!("http://{CANARY_V4}:80/")])?;
    ensure!(
        out.status.code() != Some(expect::CURL_COULDNT_CONNECT),
        "curl could not connect in audit mode: {out:?}"
    );

    // The explicit allow rule still reports "allow", not "audit".
    expect::origin_body(&fx.sandbox.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(ORIGIN_V4), 80)
            .sandbox(name)
            .rule("web-origin"),
    )?;
    Ok(())
}
