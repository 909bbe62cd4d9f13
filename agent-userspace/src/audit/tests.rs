//! Encoding and writer tests: every record kind goes through the writer into a file and is
//! checked line by line against `schema/audit-record.schema.json`.
#![expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::{
    collections::HashMap,
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use agent_common::{ConnectEvent, EventHeader};
use serde_json::Value;
use time::{macros::datetime, OffsetDateTime};

use super::*;

const SCHEMA: &str = include_str!("../../schema/audit-record.schema.json");

fn schema() -> Value {
    serde_json::from_str(SCHEMA).unwrap()
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema())
        .unwrap()
}

/// Every schema violation of one line, readable in a failure message.
fn violations(validator: &jsonschema::Validator, line: &Value) -> Vec<String> {
    validator
        .iter_errors(line)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect()
}

/// A change that must make a valid record invalid.
type Mutation = fn(&mut Value);

const T0: OffsetDateTime = datetime!(2026-11-21 22:03:04.123456789 UTC);

fn digest(text: &str) -> PolicyDigest {
    PolicyDigest::of(text.as_bytes())
}

fn network(
    hook: Hook,
    protocol: u32,
    ip: IpAddr,
    port: u16,
    verdict: Verdict,
    rule: RuleRef,
) -> NetworkDecision {
    NetworkDecision {
        time: T0,
        sandbox: "agent-1".into(),
        cgroup_id: 81_234,
        pid: 4242,
        process_name: "curl".into(),
        uid: 1000,
        gid: 1000,
        socket_cookie: 0x1_0000_0042,
        netns_cookie: 0x1000,
        hook,
        family: hook.family().unwrap_or(if ip.is_ipv4() {
            SocketFamily::Inet
        } else {
            SocketFamily::Inet6
        }),
        protocol,
        destination_ip: ip,
        destination_port: port,
        verdict,
        rule,
        domain: None,
        option: None,
        reason: None,
    }
}

/// A refusal as the option, packet and LSM programs report it, decoded the daemon's way.
fn refusal(hook: u8, family: u8, protocol: u16, level: u16, name: u16, addr: [u8; 16]) -> Record {
    let ev = ConnectEvent {
        header: EventHeader {
            version: agent_common::ABI_VERSION as u16,
            kind: agent_common::event_kind::CONNECT,
            _pad: 0,
        },
        ts_ns: 5,
        cgroup_id: 81_234,
        socket_cookie: 0x42,
        netns_cookie: 0,
        pid: 4242,
        uid: 1000,
        gid: 1000,
        sandbox_index: 1,
        rule_id: 0,
        dst_port: 0,
        family,
        verdict: agent_common::verdict::DENY,
        hook,
        _pad: 0,
        protocol,
        policy_slot: 0,
        opt_level: level,
        opt_name: name,
        comm: *b"sidedoor\0\0\0\0\0\0\0\0",
        addr,
    };
    let clock = ClockOffset::from_nanos(T0.unix_timestamp_nanos() - 5);
    NetworkDecision::from_event(&ev, &clock, "agent-1".into(), RuleRef::Default)
        .unwrap()
        .into()
}

/// One of each refusal kind the option, packet and LSM programs report.
fn refusals() -> Vec<Record> {
    use agent_common::{hook, sockopt};
    let mut v4 = [0u8; 16];
    v4[..4].copy_from_slice(&[203, 0, 113, 66]);
    let v6: [u8; 16] = "2001:db8::66"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    vec![
        refusal(
            hook::SETSOCKOPT,
            4,
            6,
            sockopt::SOL_IP,
            sockopt::IP_OPTIONS,
            [0; 16],
        ),
        refusal(
            hook::SETSOCKOPT,
            6,
            17,
            sockopt::SOL_IPV6,
            sockopt::IPV6_RTHDR,
            [0; 16],
        ),
        refusal(hook::SKB_EGRESS, 4, 17, 0, sockopt::IPOPT_LSRR, v4),
        refusal(hook::SKB_EGRESS, 6, 0, sockopt::IPPROTO_ROUTING, 4, v6),
        refusal(hook::LSM_SOCKET_CREATE, 0, 768, 17, 3, [0; 16]),
        refusal(hook::SOCK_CREATE4, 4, 262, 0, 0, [0; 16]),
        refusal(hook::SKB_EGRESS, 4, 17, sockopt::QUARANTINED, 0, v4),
        refusal(
            hook::SYSCTL,
            0,
            0,
            0,
            agent_common::sysctl::NONLOCAL_BIND,
            [0; 16],
        ),
    ]
}

fn lifecycle(name: &str) -> SandboxLifecycle {
    SandboxLifecycle {
        time: T0,
        sandbox: name.into(),
        cgroup_path: PathBuf::from(format!("/sys/fs/cgroup/agents/{name}")),
        cgroup_id: 81_234,
        policy_path: PathBuf::from("/etc/egressd/policies/agent.yaml"),
        policy_digest: digest("default: deny\n"),
        reason: None,
        packet_sockets_covered: None,
        posture: None,
    }
}

fn detached(name: &str, reason: DetachReason) -> SandboxLifecycle {
    SandboxLifecycle {
        reason: Some(reason),
        ..lifecycle(name)
    }
}

/// An allowed intercepted request that got a credential, as the proxy reports it.
fn proxy_request() -> ProxyRecord {
    ProxyRecord {
        kind: RecordKind::Request,
        sandbox: "agent-1".into(),
        connection_id: "0000000000001000-0000000100000042".into(),
        rule_name: "github".into(),
        tls_mode: TlsMode::Intercept,
        original_dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 443),
        sni: Some("api.github.example".into()),
        method: Some("GET".into()),
        host: Some("api.github.example".into()),
        path: Some("/repos/acme/widget/issues".into()),
        query_keys: Some("state=&per_page=".into()),
        status: Some(200),
        bytes_in: 0,
        bytes_out: 5123,
        duration_ms: 87,
        credential: Some("github-token".into()),
        verdict: ProxyVerdict::Allow,
        reason: None,
        git: None,
        scrubbed: 0,
        secret: None,
        forwarded: false,
        credential_use: Some(Box::new(crate::credentials::CredentialUse {
            kind: "header",
            source: "vault",
            expires: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000)),
        })),
    }
}

/// A push refused by a rule with `git:`: one ref outside `push.refs`, one allowed.
fn proxy_git_push_refused() -> ProxyRecord {
    ProxyRecord {
        host: Some("github.example".into()),
        sni: Some("github.example".into()),
        method: Some("POST".into()),
        path: Some("/acme/widget.git/git-receive-pack".into()),
        query_keys: None,
        bytes_in: 1204,
        bytes_out: 131,
        verdict: ProxyVerdict::Deny,
        reason: Some(
            "git push refused: 1 of 2 ref updates refused; refs/heads/main: refused by egress \
             policy: allowed refs/heads/agent/**"
                .into(),
        ),
        git: Some(GitAudit {
            repo: "acme/widget".into(),
            service: "git-receive-pack".into(),
            ref_updates: vec![
                RefUpdate {
                    ref_name: "refs/heads/main".into(),
                    old: "1".repeat(40),
                    new: "2".repeat(40),
                    allowed: false,
                },
                RefUpdate {
                    ref_name: "refs/heads/agent/x".into(),
                    old: "0".repeat(40),
                    new: "2".repeat(40),
                    allowed: true,
                },
            ],
        }),
        ..proxy_request()
    }
}

/// Past its refusal limit, a sandbox's refusals are counted, not written, but for a
/// push's (with its ref updates), a secret found, a refused dial upstream, or a request
/// abandoned after it was sent upstream; a refused
/// fetch and a misplaced placeholder (when only recorded) are counted like any other
/// refusal.
#[test]
fn which_refusals_may_be_summarised() {
    let time = datetime!(2026-11-15 10:00 UTC);
    let may = |r: &ProxyRecord| r.may_be_summarised(r.alert(time).as_ref());
    let refused = ProxyRecord {
        verdict: ProxyVerdict::Deny,
        reason: Some("path not allowed".into()),
        ..proxy_request()
    };
    assert!(may(&refused));
    assert!(!may(&proxy_request()), "an allowed request");
    // One its client gave up on before any response (an HTTP/2 stream reset at once),
    // and not one answered (its client gone after the status).
    let abandoned = ProxyRecord {
        status: None,
        reason: Some(format!("{CLIENT_ABORTED}: the downstream client went away")),
        ..proxy_request()
    };
    assert!(may(&abandoned));
    assert!(!may(&ProxyRecord {
        status: Some(200),
        ..abandoned.clone()
    }));
    // Nor one abandoned after it was sent upstream: it may have been carried out with the
    // credential, and a flood of cheap refusals before it must not hide it.
    assert!(!may(&ProxyRecord {
        forwarded: true,
        ..abandoned.clone()
    }));
    assert!(!may(&proxy_git_push_refused()));
    let fetch = ProxyRecord {
        path: Some("/acme/other.git/info/refs".into()),
        reason: Some("git repository not allowed".into()),
        git: Some(GitAudit {
            repo: "acme/other".into(),
            service: "git-upload-pack".into(),
            ref_updates: Vec::new(),
        }),
        ..proxy_git_push_refused()
    };
    assert!(may(&fetch), "a refused fetch");
    let upstream = ProxyRecord {
        reason: Some("upstream address not allowed by the rule".into()),
        ..refused.clone()
    };
    assert!(!may(&upstream));
    let secret = ProxyRecord {
        secret: Some(SecretFinding::outbound("github-token", "the URL")),
        ..refused.clone()
    };
    assert!(!may(&secret));
    let placeholder = ProxyRecord {
        secret: Some(SecretFinding::placeholder("openai", "the body")),
        ..refused
    };
    assert!(may(&placeholder));
    // Unless the sandbox's settings answer it with a quarantine: refusals sent first must
    // not spare the sandbox its response.
    let mut quarantining = placeholder.alert(time);
    if let Some(alert) = &mut quarantining {
        alert.response = AlertResponse::Quarantine;
    }
    assert!(!placeholder.may_be_summarised(quarantining.as_ref()));
}

/// A passthrough relay that ran to its end.
fn proxy_passthrough() -> ProxyRecord {
    ProxyRecord {
        kind: RecordKind::Connection,
        rule_name: "npm".into(),
        tls_mode: TlsMode::Passthrough,
        // The kernel saw an IPv4-mapped destination on an inet6 socket.
        original_dst: SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped()),
            443,
        ),
        sni: Some("registry.npm.example".into()),
        method: None,
        host: None,
        path: None,
        query_keys: None,
        status: None,
        bytes_in: 2048,
        bytes_out: 1_048_576,
        duration_ms: 1500,
        credential: None,
        ..proxy_request()
    }
}

/// A connection refused at the TLS stage because the client sent no server name.
fn proxy_refused_no_sni() -> ProxyRecord {
    ProxyRecord {
        tls_mode: TlsMode::Intercept,
        original_dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 443),
        sni: None,
        bytes_in: 0,
        bytes_out: 7,
        duration_ms: 3,
        verdict: ProxyVerdict::Deny,
        reason: Some(
            "downstream client 10.200.0.2:40000: sent no TLS server name (SNI); connections \
             by IP address are not proxied"
                .into(),
        ),
        ..proxy_passthrough()
    }
}

/// A response whose origin reflected the injected credential three times.
fn proxy_scrubbed() -> ProxyRecord {
    ProxyRecord {
        path: Some("/repos/acme/widget/echo".into()),
        scrubbed: 3,
        secret: Some(SecretFinding::reflected(vec!["github-token".into()], 3)),
        ..proxy_request()
    }
}

#[test]
fn scrubbed_secrets_are_counted_and_alerted_by_name_only() {
    let line: Value =
        serde_json::from_slice(&proxy_event(proxy_scrubbed()).encode(1).unwrap()).unwrap();
    assert_eq!(line["egress"]["scrubbed"], 3);
    assert!(validator().is_valid(&line), "{line}");
    // Nothing scrubbed: no field.
    let line: Value =
        serde_json::from_slice(&proxy_event(proxy_request()).encode(1).unwrap()).unwrap();
    assert!(line["egress"].get("scrubbed").is_none(), "{line}");

    let alert = proxy_scrubbed().alert(T0).unwrap();
    assert_eq!(alert.kind, AlertKind::SecretReflected);
    assert_eq!(alert.count, 3);
    assert_eq!(alert.rule.as_deref(), Some("github"));
    assert_eq!(alert.domain.as_deref(), Some("api.github.example"));
    assert_eq!(alert.path.as_deref(), Some("/repos/acme/widget/echo"));
    assert_eq!(alert.credential.as_deref(), Some("github-token"));
    let line: Value = serde_json::from_slice(&Record::from(alert).encode(2).unwrap()).unwrap();
    assert_eq!(line["event"]["action"], "secret-reflected");
    assert!(validator().is_valid(&line), "{line}");

    let outbound = ProxyRecord {
        verdict: ProxyVerdict::Deny,
        status: Some(403),
        secret: Some(SecretFinding::outbound("github-token", "the URL")),
        ..proxy_request()
    };
    let alert = outbound.alert(T0).unwrap();
    assert_eq!(alert.kind, AlertKind::SecretOutbound);
    assert!(alert.reason.contains("the URL"), "{}", alert.reason);
    assert!(proxy_request().alert(T0).is_none());

    // A placeholder at a host its credential does not list: its own alert kind.
    let misdirected = ProxyRecord {
        verdict: ProxyVerdict::Deny,
        status: Some(403),
        credential: None,
        credential_use: None,
        secret: Some(SecretFinding::placeholder("openai", "the body")),
        ..proxy_request()
    };
    let line: Value =
        serde_json::from_slice(&proxy_event(misdirected.clone()).encode(3).unwrap()).unwrap();
    assert!(validator().is_valid(&line), "{line}");
    let alert = misdirected.alert(T0).unwrap();
    assert_eq!(alert.kind, AlertKind::PlaceholderMisdirected);
    assert_eq!(alert.credential.as_deref(), Some("openai"));
    assert!(alert.reason.contains("the body"), "{}", alert.reason);
    let line: Value = serde_json::from_slice(&Record::from(alert).encode(4).unwrap()).unwrap();
    assert_eq!(line["event"]["action"], "placeholder-misdirected");
    assert!(validator().is_valid(&line), "{line}");
}

fn proxy_event(record: ProxyRecord) -> Record {
    ProxyEvent { time: T0, record }.into()
}

/// Both proxy kinds: allow with a credential, deny with a reason, allow whose upstream
/// failed, passthrough relay, and a connection refused without SNI.
/// A request re-signed with an AWS STS session.
fn proxy_aws_signed() -> ProxyRecord {
    ProxyRecord {
        sni: Some("acme-data.s3.amazonaws.com".into()),
        host: Some("acme-data.s3.amazonaws.com".into()),
        method: Some("PUT".into()),
        path: Some("/agent/out/report.txt".into()),
        query_keys: None,
        credential: Some("aws-s3".into()),
        credential_use: Some(Box::new(crate::credentials::CredentialUse {
            kind: "aws_sigv4",
            source: "sts_assume_role",
            expires: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_763_763_484)),
        })),
        ..proxy_request()
    }
}

#[test]
fn aws_session_credentials_name_kind_and_end() {
    let line: Value =
        serde_json::from_slice(&proxy_event(proxy_aws_signed()).encode(1).unwrap()).unwrap();
    assert_eq!(
        line["egress"]["credential"],
        serde_json::json!({
            "name": "aws-s3",
            "kind": "aws_sigv4",
            "source": "sts_assume_role",
            "expires": "2025-11-21T22:18:04Z"
        })
    );
    assert!(violations(&validator(), &line).is_empty());
}

fn proxy_kinds() -> Vec<Record> {
    vec![
        proxy_event(proxy_request()),
        proxy_event(proxy_aws_signed()),
        proxy_event(ProxyRecord {
            original_dst: SocketAddr::new(IpAddr::V6("2001:db8::443".parse().unwrap()), 8443),
            method: Some("DELETE".into()),
            path: Some("/repos/acme/widget".into()),
            query_keys: None,
            status: Some(403),
            bytes_in: 0,
            bytes_out: 61,
            duration_ms: 0,
            credential: None,
            verdict: ProxyVerdict::Deny,
            reason: Some("method DELETE is not allowed by rule `github`".into()),
            ..proxy_request()
        }),
        proxy_event(ProxyRecord {
            method: Some("POST".into()),
            query_keys: None,
            status: Some(502),
            bytes_in: 312,
            bytes_out: 0,
            reason: Some("upstream server 192.0.2.10:443: connection reset".into()),
            ..proxy_request()
        }),
        proxy_event(proxy_passthrough()),
        proxy_event(proxy_refused_no_sni()),
        // Refused by the HTTP/1 parser before any method or path was known.
        proxy_event(ProxyRecord {
            method: None,
            host: None,
            path: None,
            query_keys: None,
            status: Some(431),
            bytes_in: 0,
            bytes_out: 0,
            credential: None,
            verdict: ProxyVerdict::Deny,
            reason: Some(
                "downstream client: HTTP/1 request refused by the parser: message head is too \
                 large"
                    .into(),
            ),
            ..proxy_request()
        }),
        // The client went away mid-upload.
        proxy_event(ProxyRecord {
            status: None,
            bytes_out: 0,
            reason: Some(
                "client aborted: the downstream client went away before the response".into(),
            ),
            ..proxy_request()
        }),
        proxy_event(proxy_git_push_refused()),
        proxy_event(proxy_scrubbed()),
        proxy_event(ProxyRecord {
            path: Some("/acme/widget/info/refs".into()),
            query_keys: Some("service=".into()),
            git: Some(GitAudit {
                repo: "acme/widget".into(),
                service: "git-upload-pack".into(),
                ref_updates: Vec::new(),
            }),
            ..proxy_request()
        }),
    ]
}

/// An allowed A query answered with two addresses (one written IPv4-mapped).
fn dns_allowed() -> DnsEvent {
    DnsEvent {
        time: T0,
        sandbox: "agent-1".into(),
        question_name: "api.github.example".into(),
        question_type: "A".into(),
        response_code: "NOERROR".into(),
        resolved_ip: vec![
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            IpAddr::V6(Ipv4Addr::new(192, 0, 2, 11).to_ipv6_mapped()),
        ],
        refused: Vec::new(),
        verdict: DnsVerdict::Allow,
        rule: Some("github".into()),
        reason: None,
        upstream: Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)),
            53,
        )),
    }
}

/// A name the policy does not allow: NXDOMAIN, no upstream asked.
fn dns_denied() -> DnsEvent {
    DnsEvent {
        question_name: "exfil.example".into(),
        question_type: "AAAA".into(),
        response_code: "NXDOMAIN".into(),
        resolved_ip: Vec::new(),
        verdict: DnsVerdict::Deny,
        rule: None,
        reason: Some("name is not allowed by the policy".into()),
        upstream: None,
        ..dns_allowed()
    }
}

/// DNS records: allowed with addresses, denied, refused label, unparseable query, an
/// allowed query whose upstream timed out, and a forwarded non-address type.
fn dns_kinds() -> Vec<Record> {
    vec![
        dns_allowed().into(),
        dns_denied().into(),
        DnsEvent {
            question_name: format!("{}.example", "a".repeat(41)),
            response_code: "REFUSED".into(),
            reason: Some("label of 41 characters is longer than the 40 allowed".into()),
            ..dns_denied()
        }
        .into(),
        DnsEvent {
            question_name: String::new(),
            question_type: String::new(),
            response_code: "FORMERR".into(),
            reason: Some("malformed query".into()),
            ..dns_denied()
        }
        .into(),
        DnsEvent {
            response_code: "SERVFAIL".into(),
            resolved_ip: Vec::new(),
            reason: Some("upstream server [2001:db8::53]:53: no answer within 3 s".into()),
            upstream: Some("[2001:db8::53]:53".parse().unwrap()),
            ..dns_allowed()
        }
        .into(),
        DnsEvent {
            question_type: "TYPE65280".into(),
            resolved_ip: Vec::new(),
            ..dns_allowed()
        }
        .into(),
        dns_with_refused().into(),
        DnsEvent {
            question_type: "TXT".into(),
            response_code: "REFUSED".into(),
            reason: Some("query type TXT is not answered".into()),
            ..dns_denied()
        }
        .into(),
    ]
}

/// An answer of which one address was released and two refused.
fn dns_with_refused() -> DnsEvent {
    DnsEvent {
        resolved_ip: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))],
        refused: vec![
            crate::audit::RefusedAnswer {
                ip: IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped()),
                reason: "127.0.0.1 is a loopback address".into(),
            },
            crate::audit::RefusedAnswer {
                ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
                reason: "the address is outside the `answers` of rule `github`".into(),
            },
        ],
        reason: Some("2 answer address(es) refused; see egress.dns.refused".into()),
        ..dns_allowed()
    }
}

/// One of every kind, and every verdict and address shape for network decisions.
fn every_kind() -> Vec<Record> {
    let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    let v6 = IpAddr::V6("2001:db8::53".parse().unwrap());
    let mapped = IpAddr::V6(Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped());
    vec![
        network(
            Hook::Connect4,
            6,
            v4,
            443,
            Verdict::Allow,
            RuleRef::Named("github".into()),
        )
        .into(),
        network(Hook::Connect6, 6, v6, 443, Verdict::Deny, RuleRef::Default).into(),
        network(
            Hook::Connect6,
            6,
            mapped,
            80,
            Verdict::Audit,
            RuleRef::Default,
        )
        .into(),
        network(
            Hook::Connect4,
            6,
            v4,
            443,
            Verdict::Redirect,
            RuleRef::Named("api".into()),
        )
        .into(),
        network(
            Hook::Sendmsg4,
            17,
            v4,
            53,
            Verdict::Allow,
            RuleRef::Named("dns".into()),
        )
        .into(),
        network(Hook::Sendmsg6, 17, v6, 53, Verdict::Deny, RuleRef::Default).into(),
        network(
            Hook::Sendmsg6,
            17,
            mapped,
            123,
            Verdict::Audit,
            RuleRef::Default,
        )
        .into(),
        // A protocol ECS has no transport name for here: only network.iana_number.
        network(Hook::Connect4, 253, v4, 9, Verdict::Deny, RuleRef::Default).into(),
        // A bind to the proxy's port refused.
        network(
            Hook::Bind4,
            6,
            IpAddr::from([127, 0, 0, 1]),
            15001,
            Verdict::Deny,
            RuleRef::Named("proxy-port".into()),
        )
        .into(),
        network(
            Hook::Bind6,
            17,
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            15302,
            Verdict::Deny,
            RuleRef::Named("dns-resolver".into()),
        )
        .into(),
        // A connection the sandbox's new policy refuses, cut by the daemon.
        NetworkDecision {
            pid: 0,
            process_name: String::new(),
            reason: Some(
                "connection opened under the sandbox's earlier policy; its new policy \
                 refuses it: closed"
                    .into(),
            ),
            ..network(
                Hook::PolicyChange,
                6,
                v4,
                443,
                Verdict::Deny,
                RuleRef::Named("github".into()),
            )
        }
        .into(),
        // Raw and ICMP sockets refused at creation: no destination yet.
        network(
            Hook::SockCreate4,
            1,
            IpAddr::from([0, 0, 0, 0]),
            0,
            Verdict::Deny,
            RuleRef::Default,
        )
        .into(),
        network(
            Hook::SockCreate6,
            58,
            IpAddr::from([0u8; 16]),
            0,
            Verdict::Deny,
            RuleRef::Default,
        )
        .into(),
        EventsLost {
            time: T0,
            count: 17,
            total: 40,
            sandboxes: vec![
                LostBySandbox {
                    name: "agent-1".into(),
                    count: 15,
                },
                LostBySandbox {
                    name: "index 7".into(),
                    count: 2,
                },
            ],
        }
        .into(),
        DaemonStart {
            time: T0,
            pid: 1234,
            adopted_sandboxes: 0,
            previous_seen: None,
        }
        .into(),
        DaemonStart {
            time: T0,
            pid: 1234,
            adopted_sandboxes: 3,
            previous_seen: Some(datetime!(2026-11-21 21:58:00 UTC)),
        }
        .into(),
        DaemonStop {
            time: T0,
            pid: 1234,
            reason: StopReason::Signal,
        }
        .into(),
        DaemonStop {
            time: T0,
            pid: 1234,
            reason: StopReason::Request,
        }
        .into(),
        DaemonStop {
            time: T0,
            pid: 1234,
            reason: StopReason::Error,
        }
        .into(),
        Record::SandboxAttach(SandboxLifecycle {
            packet_sockets_covered: Some(false),
            posture: Some(crate::posture::Posture {
                pids: [10, 11].into(),
                caps: 0xa80425fb,
            }),
            ..lifecycle("agent-1")
        }),
        Record::SandboxDetach(detached("agent-1", DetachReason::Operator)),
        Record::SandboxDetach(detached("agent-1", DetachReason::Hook)),
        Record::SandboxDetach(detached("agent-1", DetachReason::CgroupRemoved)),
        Record::SandboxAdopt(lifecycle("agent-2")),
        PolicyChange {
            time: T0,
            sandbox: "agent-1".into(),
            policy_path: PathBuf::from("/etc/egressd/policies/agent.yaml"),
            previous_digest: digest("default: deny\n"),
            digest: digest("default: audit\n"),
        }
        .into(),
        PolicyRejected {
            time: T0,
            sandbox: "agent-1".into(),
            policy_path: PathBuf::from("/etc/egressd/policies/agent.yaml"),
            policy_digest: Some(digest("rules: [\n")),
            error: "agent.yaml:3:5: rules[0].port: 70000 is not a port (0-65535)".into(),
        }
        .into(),
        PolicyRejected {
            time: T0,
            sandbox: "agent-3".into(),
            policy_path: PathBuf::from("/etc/egressd/policies/missing.yaml"),
            policy_digest: None,
            error: "/etc/egressd/policies/missing.yaml: No such file or directory".into(),
        }
        .into(),
        AuditLost {
            time: T0,
            count: 7,
            first_sequence: 4,
            last_sequence: 10,
            sandboxes: vec![LostBySandbox {
                name: "agent-1".into(),
                count: 6,
            }],
            since: Some(T0),
            error: "No space left on device (os error 28)".into(),
        }
        .into(),
        AuditLost {
            time: T0,
            count: 1,
            first_sequence: 9,
            last_sequence: 9,
            sandboxes: Vec::new(),
            since: None,
            error: "numbered by the previous run of the daemon but not written".into(),
        }
        .into(),
        AuditRewritten {
            time: T0,
            count: 12,
            first_sequence: 40,
            last_sequence: 51,
            complete: true,
            reason: "the log was truncated in place from 9120 to 0 bytes".into(),
        }
        .into(),
    ]
    .into_iter()
    .chain(proxy_kinds())
    .chain(dns_kinds())
    .chain(alert_kinds())
    .chain(quarantine_kinds())
    .collect()
}

fn quarantine(reason: Option<&str>, trigger: &str) -> Quarantine {
    Quarantine {
        time: T0,
        sandbox: "agent-1".into(),
        cgroup_path: PathBuf::from("/sys/fs/cgroup/agents/agent-1"),
        cgroup_id: 81_234,
        reason: reason.map(str::to_owned),
        trigger: trigger.into(),
        error: None,
    }
}

/// Quarantine and release, by an operator and by an alert; revocations that worked and
/// one that failed.
fn quarantine_kinds() -> Vec<Record> {
    vec![
        Record::SandboxQuarantine(quarantine(Some("investigating"), "operator")),
        Record::SandboxQuarantine(quarantine(
            Some("60 denied decisions within 10 s"),
            "denial-burst",
        )),
        Record::SandboxRelease(quarantine(None, "operator")),
        Record::SandboxQuarantine(Quarantine {
            error: Some("switching the kernel to deny-all failed: no space".into()),
            ..quarantine(Some("60 denied decisions within 10 s"), "denial-burst")
        }),
        CredentialRevoke {
            time: T0,
            sandbox: "agent-1".into(),
            credential: "github".into(),
            revoked: true,
            reason: "installation token revoked with the GitHub API".into(),
        }
        .into(),
        CredentialRevoke {
            time: T0,
            sandbox: "agent-1".into(),
            credential: "vault".into(),
            revoked: false,
            reason: "revoke command /usr/local/bin/revoke exited with exit status: 1".into(),
        }
        .into(),
    ]
}

#[test]
fn quarantine_and_revoke_fields() {
    let validator = validator();
    let encode = |r: Record| -> Value { serde_json::from_slice(&r.encode(1).unwrap()).unwrap() };
    let q = encode(Record::SandboxQuarantine(quarantine(
        Some("burst"),
        "denial-burst",
    )));
    assert_eq!(q["event"]["action"], "sandbox-quarantine");
    assert_eq!(q["event"]["kind"], "event");
    assert_eq!(q["event"]["type"], serde_json::json!(["change"]));
    assert_eq!(q["event"]["reason"], "burst");
    assert_eq!(q["egress"]["quarantine"]["trigger"], "denial-burst");
    assert_eq!(q["egress"]["sandbox"]["cgroup_id"], 81_234);
    let r = encode(Record::SandboxRelease(quarantine(None, "operator")));
    assert_eq!(r["event"]["action"], "sandbox-release");
    assert!(r["event"].get("reason").is_none());
    let revoke = encode(
        CredentialRevoke {
            time: T0,
            sandbox: "agent-1".into(),
            credential: "github".into(),
            revoked: false,
            reason: "no answer".into(),
        }
        .into(),
    );
    assert_eq!(revoke["event"]["outcome"], "failure");
    assert_eq!(revoke["event"]["category"], serde_json::json!(["iam"]));
    assert_eq!(revoke["egress"]["credential"]["name"], "github");
    for good in [&q, &r, &revoke] {
        assert!(validator.is_valid(good), "{good}");
    }
    let cases: Vec<(&str, &Value, Mutation)> = vec![
        ("unknown trigger", &q, |v| {
            v["egress"]["quarantine"]["trigger"] = "whim".into()
        }),
        ("quarantine without trigger", &q, |v| {
            v["egress"].as_object_mut().unwrap().remove("quarantine");
        }),
        ("quarantine as alert", &q, |v| {
            v["event"]["kind"] = "alert".into()
        }),
        ("revoke without credential", &revoke, |v| {
            v["egress"].as_object_mut().unwrap().remove("credential");
        }),
        ("revoke without reason", &revoke, |v| {
            v["event"].as_object_mut().unwrap().remove("reason");
        }),
        ("revoke carrying a value", &revoke, |v| {
            v["egress"]["credential"]["value"] = "ghp_x".into()
        }),
    ];
    for (what, good, mutate) in cases {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(!validator.is_valid(&bad), "schema accepted: {what}");
    }
}

/// One alert of every kind, with and without the optional fields.
fn alert_kinds() -> Vec<Record> {
    AlertKind::ALL
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let mut alert = Alert::new(T0, kind, "agent-1", format!("{} seen", kind.as_str()));
            if i % 2 == 0 {
                alert.count = 12;
                alert.window_seconds = Some(10);
                alert.rule = Some("github-api".into());
                alert.domain = Some("api.github.com".into());
                alert.path = Some("/repos/acme/widgets".into());
                alert.credential = Some("github".into());
                alert.response = AlertResponse::Quarantine;
            }
            alert.into()
        })
        .collect()
}

#[test]
fn alerts_are_alert_kind_and_name_credentials_only() {
    let mut alert = Alert::new(
        T0,
        AlertKind::SecretReflected,
        "agent-1",
        "origin echoed it",
    );
    alert.credential = Some("github".into());
    alert.domain = Some("api.github.com".into());
    alert.count = 0;
    let line: Value = serde_json::from_slice(&Record::from(alert).encode(3).unwrap()).unwrap();
    assert_eq!(line["event"]["kind"], "alert");
    assert_eq!(line["event"]["action"], "secret-reflected");
    assert_eq!(
        line["event"]["category"],
        serde_json::json!(["intrusion_detection"])
    );
    assert_eq!(line["egress"]["credential"]["name"], "github");
    // A count of zero is written as one: an alert is about at least one occurrence.
    assert_eq!(line["egress"]["alert"]["count"], 1);
    assert_eq!(line["egress"]["alert"]["response"], "record");
    assert!(violations(&validator(), &line).is_empty());
    // A non-alert action may not claim to be an alert.
    let mut bad = line.clone();
    bad["event"]["action"] = "dns-query".into();
    assert!(!validator().is_valid(&bad));
    let mut bad = line;
    bad["event"]["kind"] = "event".into();
    assert!(!validator().is_valid(&bad));
}

fn read_lines(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "log must end with a newline");
    text.lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap();
            assert!(value.is_object(), "not one object: {line}");
            value
        })
        .collect()
}

fn sequence(line: &Value) -> u64 {
    line["event"]["sequence"].as_u64().unwrap()
}

fn write_all(path: &Path, records: &[Record]) -> Vec<u64> {
    let mut writer = AuditWriter::open(AuditSink::File(path.to_owned())).unwrap();
    records.iter().map(|r| writer.write(r).unwrap()).collect()
}

#[test]
fn schema_is_a_valid_2020_12_schema() {
    jsonschema::draft202012::meta::validate(&schema()).unwrap();
}

#[test]
fn every_kind_written_to_a_file_matches_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut records = every_kind();
    records.extend(refusals());
    let seqs = write_all(&path, &records);
    assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>());

    let lines = read_lines(&path);
    assert_eq!(lines.len(), records.len());
    let validator = validator();
    for (line, record) in lines.iter().zip(&records) {
        let errors = violations(&validator, line);
        assert!(errors.is_empty(), "{line}\n{}", errors.join("\n"));
        assert_eq!(line["event"]["action"], record.action());
        assert_eq!(line["@timestamp"], "2026-11-21T22:03:04.123456Z");
        assert_eq!(line["observer"]["product"], "egressd");
        assert_eq!(line["observer"]["version"], VERSION);
    }
    for pair in lines.windows(2) {
        assert!(sequence(&pair[1]) > sequence(&pair[0]));
    }
    // Every kind the schema names is represented, and nothing else.
    let actions: std::collections::BTreeSet<_> = lines
        .iter()
        .map(|l| l["event"]["action"].as_str().unwrap().to_owned())
        .collect();
    let named: std::collections::BTreeSet<_> = schema()["properties"]["event"]["properties"]
        ["action"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, named);
    let listed: std::collections::BTreeSet<_> = crate::audit::action::ALL
        .iter()
        .map(|a| (*a).to_owned())
        .chain(AlertKind::ALL.iter().map(|k| k.as_str().to_owned()))
        .collect();
    assert_eq!(actions, listed);
}

#[test]
fn refusals_name_what_was_refused() {
    let lines: Vec<Value> = refusals()
        .iter()
        .map(|r| serde_json::from_slice(&r.encode(1).unwrap()).unwrap())
        .collect();
    assert_eq!(lines[0]["event"]["action"], "setsockopt");
    assert_eq!(lines[0]["egress"]["option"]["name"], "IP_OPTIONS");
    assert!(lines[0].get("destination").is_none());
    assert_eq!(lines[1]["egress"]["option"]["name"], "IPV6_RTHDR");
    assert_eq!(lines[1]["egress"]["socket"]["family"], "inet6");
    // A dropped packet names the option and the first hop it was really sent to.
    assert_eq!(lines[2]["event"]["action"], "packet");
    assert_eq!(lines[2]["egress"]["option"]["name"], "ipv4-options");
    assert_eq!(lines[2]["egress"]["option"]["type"], 131);
    assert_eq!(lines[2]["destination"]["ip"], "203.0.113.66");
    assert!(lines[2]["event"]["reason"]
        .as_str()
        .unwrap()
        .contains("loose source route"));
    assert!(lines[2].get("process").is_none());
    assert_eq!(lines[3]["egress"]["option"]["name"], "ipv6-routing-header");
    assert_eq!(lines[3]["egress"]["option"]["type"], 4);
    assert!(lines[3]["network"].get("iana_number").is_none());
    // Packet sockets: the family by name, no network or destination.
    assert_eq!(lines[4]["event"]["action"], "socket");
    assert_eq!(lines[4]["egress"]["socket"]["family"], "packet");
    assert_eq!(lines[4]["egress"]["hook"], "lsm_socket_create");
    assert!(lines[4].get("network").is_none());
    // MPTCP is not TCP.
    assert_eq!(lines[5]["network"]["transport"], "mptcp");
    assert!(lines[5]["network"].get("iana_number").is_none());
    assert_eq!(lines[5]["egress"]["socket"]["protocol"], 262);
    // A quarantined sandbox's packet: no source-routing option, the quarantine named.
    assert_eq!(lines[6]["event"]["action"], "packet");
    assert_eq!(lines[6]["egress"]["option"]["name"], "quarantine");
    assert!(lines[6]["egress"]["option"].get("type").is_none());
    assert_eq!(lines[6]["destination"]["ip"], "203.0.113.66");
    assert!(lines[6]["event"]["reason"]
        .as_str()
        .unwrap()
        .contains("denied everything"));
    // A sysctl write: no socket, network or destination; the sysctl named.
    assert_eq!(lines[7]["event"]["action"], "sysctl");
    assert_eq!(lines[7]["egress"]["hook"], "sysctl");
    assert_eq!(lines[7]["egress"]["option"]["name"], "ip_nonlocal_bind");
    assert!(lines[7]["egress"].get("socket").is_none());
    assert!(lines[7].get("network").is_none());
    assert!(lines[7].get("destination").is_none());
    assert!(lines[7]["event"]["reason"]
        .as_str()
        .unwrap()
        .contains("forged source"));
}

#[test]
fn socket_families_are_named() {
    assert_eq!(SocketFamily::from_af(17).name(), "packet");
    assert_eq!(SocketFamily::from_af(44).name(), "xdp");
    assert_eq!(SocketFamily::from_af(40).name(), "vsock");
    assert_eq!(SocketFamily::from_af(10).name(), "inet6");
    assert_eq!(SocketFamily::from_af(250).name(), "af-250");
}

#[test]
fn network_fields_use_ecs_names_and_nesting() {
    let mapped = IpAddr::V6(Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped());
    let record: Record = network(
        Hook::Connect6,
        6,
        mapped,
        80,
        Verdict::Audit,
        RuleRef::Default,
    )
    .into();
    let line: Value = serde_json::from_slice(&record.encode(7).unwrap()).unwrap();
    assert_eq!(
        line,
        serde_json::json!({
            "@timestamp": "2026-11-21T22:03:04.123456Z",
            "ecs": {"version": ECS_VERSION},
            "event": {
                "kind": "event",
                "category": ["network"],
                "type": ["connection", "allowed"],
                "action": "connect",
                "outcome": "success",
                "sequence": 7
            },
            "observer": {"product": "egressd", "version": VERSION},
            "process": {"pid": 4242, "name": "curl"},
            "user": {"id": "1000"},
            "group": {"id": "1000"},
            "network": {"type": "ipv4", "transport": "tcp", "iana_number": "6"},
            "destination": {"ip": "198.51.100.7", "port": 80},
            "rule": {"name": "default"},
            "egress": {
                "sandbox": {"name": "agent-1", "cgroup_id": 81234},
                "socket": {"cookie": 0x1_0000_0042_u64, "family": "inet6", "protocol": 6},
                "netns": {"cookie": 4096},
                "hook": "connect6",
                "verdict": "audit",
                "connection": {"id": "0000000000001000-0000000100000042"}
            }
        })
    );
}

#[test]
fn deny_is_a_failure_and_ipv6_stays_ipv6() {
    let v6 = IpAddr::V6("2001:db8::1".parse().unwrap());
    let record: Record =
        network(Hook::Sendmsg6, 17, v6, 53, Verdict::Deny, RuleRef::Default).into();
    let line: Value = serde_json::from_slice(&record.encode(1).unwrap()).unwrap();
    assert_eq!(line["event"]["outcome"], "failure");
    assert_eq!(
        line["event"]["type"],
        serde_json::json!(["connection", "denied"])
    );
    assert_eq!(line["event"]["action"], "sendmsg");
    assert_eq!(line["network"]["type"], "ipv6");
    assert_eq!(line["network"]["transport"], "udp");
    assert_eq!(line["destination"]["ip"], "2001:db8::1");
}

#[test]
fn lifecycle_fields() {
    let start: Record = DaemonStart {
        time: datetime!(2026-11-21 22:00:30 UTC),
        pid: 99,
        adopted_sandboxes: 2,
        previous_seen: Some(datetime!(2026-11-21 21:58:00 UTC)),
    }
    .into();
    let line: Value = serde_json::from_slice(&start.encode(1).unwrap()).unwrap();
    // Whole seconds still carry six sub-second digits.
    assert_eq!(line["@timestamp"], "2026-11-21T22:00:30.000000Z");
    assert_eq!(
        line["egress"]["gap"]["previous_seen"],
        "2026-11-21T21:58:00.000000Z"
    );
    assert_eq!(line["egress"]["gap"]["seconds"], 150.0);
    assert_eq!(line["egress"]["daemon"]["adopted_sandboxes"], 2);
    assert_eq!(line["process"]["pid"], 99);

    let change: Record = PolicyChange {
        time: T0,
        sandbox: "a".into(),
        policy_path: "/p.yaml".into(),
        previous_digest: digest("old"),
        digest: digest("new"),
    }
    .into();
    let line: Value = serde_json::from_slice(&change.encode(2).unwrap()).unwrap();
    assert_eq!(line["egress"]["policy"]["digest"], digest("new").as_str());
    assert_eq!(
        line["egress"]["policy"]["previous_digest"],
        digest("old").as_str()
    );
    assert_eq!(
        line["event"]["category"],
        serde_json::json!(["configuration"])
    );
}

#[test]
fn proxy_request_fields_use_ecs_names_and_nesting() {
    let line: Value =
        serde_json::from_slice(&proxy_event(proxy_request()).encode(3).unwrap()).unwrap();
    assert_eq!(
        line,
        serde_json::json!({
            "@timestamp": "2026-11-21T22:03:04.123456Z",
            "ecs": {"version": ECS_VERSION},
            "event": {
                "kind": "event",
                "category": ["network", "web"],
                "type": ["connection", "allowed"],
                "action": "http-request",
                "outcome": "success",
                "duration": 87_000_000,
                "sequence": 3
            },
            "observer": {"product": "egressd", "version": VERSION},
            "destination": {"ip": "192.0.2.10", "port": 443},
            "url": {
                "domain": "api.github.example",
                "path": "/repos/acme/widget/issues",
                "query": "state=&per_page="
            },
            "http": {
                "request": {"method": "GET", "body": {"bytes": 0}},
                "response": {"status_code": 200, "body": {"bytes": 5123}}
            },
            "tls": {"client": {"server_name": "api.github.example"}},
            "rule": {"name": "github"},
            "egress": {
                "sandbox": {"name": "agent-1"},
                "connection": {"id": "0000000000001000-0000000100000042"},
                "verdict": "allow",
                "tls_mode": "intercept",
                "credential": {
                    "name": "github-token",
                    "kind": "header",
                    "source": "vault",
                    "expires": "2027-01-15T08:00:00Z"
                }
            }
        })
    );
}

#[test]
fn proxy_connection_fields() {
    let line: Value =
        serde_json::from_slice(&proxy_event(proxy_passthrough()).encode(1).unwrap()).unwrap();
    assert_eq!(line["event"]["action"], "tls-connection");
    assert_eq!(line["event"]["category"], serde_json::json!(["network"]));
    assert_eq!(line["event"]["duration"], 1_500_000_000_u64);
    // The v4-mapped original destination is written as IPv4.
    assert_eq!(
        line["destination"],
        serde_json::json!({"ip": "198.51.100.7", "port": 443, "bytes": 1_048_576})
    );
    assert_eq!(line["source"], serde_json::json!({"bytes": 2048}));
    assert_eq!(
        line["url"],
        serde_json::json!({"domain": "registry.npm.example"})
    );
    assert_eq!(line["tls"]["client"]["server_name"], "registry.npm.example");
    assert_eq!(line["egress"]["tls_mode"], "passthrough");
    assert!(line.get("http").is_none(), "{line}");

    let line: Value =
        serde_json::from_slice(&proxy_event(proxy_refused_no_sni()).encode(2).unwrap()).unwrap();
    assert_eq!(line["event"]["outcome"], "failure");
    assert_eq!(
        line["event"]["type"],
        serde_json::json!(["connection", "denied"])
    );
    assert!(line["event"]["reason"]
        .as_str()
        .unwrap()
        .contains("no TLS server name"));
    assert_eq!(line["egress"]["verdict"], "deny");
    for absent in ["url", "tls", "http"] {
        assert!(line.get(absent).is_none(), "{absent} in {line}");
    }
    assert!(line["egress"].get("credential").is_none(), "{line}");
}

#[test]
fn proxy_query_values_never_reach_the_log() {
    // The proxy is meant to hand over keys only; a raw query that slipped through is
    // reduced again.
    let record = proxy_event(ProxyRecord {
        query_keys: Some("access_token=s3cret&page=2&&flag".into()),
        ..proxy_request()
    });
    let text = String::from_utf8(record.encode(1).unwrap()).unwrap();
    assert!(!text.contains("s3cret"), "{text}");
    let line: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(line["url"]["query"], "access_token=&page=&flag=");
    assert!(validator().is_valid(&line));

    // Nothing left: no url.query at all.
    let record = proxy_event(ProxyRecord {
        query_keys: Some("&&".into()),
        ..proxy_request()
    });
    let line: Value = serde_json::from_slice(&record.encode(1).unwrap()).unwrap();
    assert!(line["url"].get("query").is_none(), "{line}");
}

#[test]
fn proxy_url_domain_falls_back_to_the_server_name() {
    let record = proxy_event(ProxyRecord {
        host: None,
        ..proxy_request()
    });
    let line: Value = serde_json::from_slice(&record.encode(1).unwrap()).unwrap();
    assert_eq!(line["url"]["domain"], "api.github.example");
    // Empty strings count as absent rather than producing empty ECS values.
    let record = proxy_event(ProxyRecord {
        host: Some(String::new()),
        sni: Some(String::new()),
        path: None,
        query_keys: None,
        credential: Some(String::new()),
        reason: Some(String::new()),
        ..proxy_request()
    });
    let line: Value = serde_json::from_slice(&record.encode(1).unwrap()).unwrap();
    for absent in ["url", "tls"] {
        assert!(line.get(absent).is_none(), "{absent} in {line}");
    }
    assert!(line["event"].get("reason").is_none(), "{line}");
    assert!(line["egress"].get("credential").is_none(), "{line}");
    assert!(validator().is_valid(&line), "{line}");
}

#[test]
fn proxy_git_fields() {
    let line: Value =
        serde_json::from_slice(&proxy_event(proxy_git_push_refused()).encode(1).unwrap()).unwrap();
    assert_eq!(
        line["egress"]["git"],
        serde_json::json!({
            "repo": "acme/widget",
            "service": "git-receive-pack",
            "ref_updates": [
                {"ref_name": "refs/heads/main", "old": "1".repeat(40), "new": "2".repeat(40), "allowed": false},
                {"ref_name": "refs/heads/agent/x", "old": "0".repeat(40), "new": "2".repeat(40), "allowed": true}
            ]
        })
    );
    assert_eq!(line["egress"]["verdict"], "deny");
    assert!(validator().is_valid(&line), "{line}");
    // No ref updates: the key is left out.
    let line: Value = serde_json::from_slice(
        &proxy_event(ProxyRecord {
            git: Some(GitAudit {
                repo: "acme/widget".into(),
                service: "git-upload-pack".into(),
                ref_updates: Vec::new(),
            }),
            ..proxy_request()
        })
        .encode(1)
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        line["egress"]["git"],
        serde_json::json!({"repo": "acme/widget", "service": "git-upload-pack"})
    );
    assert!(proxy_event(proxy_request()).encode(1).is_ok());
}

#[test]
fn schema_catches_proxy_drift() {
    let validator = validator();
    let encode = |r: ProxyRecord| -> Value {
        serde_json::from_slice(&proxy_event(r).encode(1).unwrap()).unwrap()
    };
    let request = encode(proxy_request());
    let passthrough = encode(proxy_passthrough());
    let refused = encode(proxy_refused_no_sni());
    let push = encode(proxy_git_push_refused());
    for good in [&request, &passthrough, &refused, &push] {
        let errors = violations(&validator, good);
        assert!(errors.is_empty(), "{good}\n{}", errors.join("\n"));
    }

    let cases: Vec<(&str, &Value, Mutation)> = vec![
        ("credential value beside its name", &request, |v| {
            v["egress"]["credential"]["value"] = "ghp_x".into()
        }),
        ("query with a value", &request, |v| {
            v["url"]["query"] = "state=open".into()
        }),
        ("dotted ECS key", &request, |v| {
            v["http.request.method"] = "GET".into()
        }),
        ("header bytes field", &request, |v| {
            v["http"]["request"]["bytes"] = 10.into()
        }),
        ("request headers", &request, |v| {
            v["http"]["request"]["headers"] = serde_json::json!({"authorization": "x"})
        }),
        ("allow reported as failure", &request, |v| {
            v["event"]["outcome"] = "failure".into()
        }),
        ("kernel-only verdict", &request, |v| {
            v["egress"]["verdict"] = "redirect".into()
        }),
        ("request without http", &request, |v| {
            v.as_object_mut().unwrap().remove("http");
        }),
        ("request with connection byte counts", &request, |v| {
            v["source"] = serde_json::json!({"bytes": 1})
        }),
        ("request without web category", &request, |v| {
            v["event"]["category"] = serde_json::json!(["network"])
        }),
        ("missing duration", &request, |v| {
            v["event"].as_object_mut().unwrap().remove("duration");
        }),
        ("duration in seconds", &request, |v| {
            v["event"]["duration"] = 0.087.into()
        }),
        ("mapped destination written as IPv6", &passthrough, |v| {
            v["destination"]["ip"] = "::ffff:198.51.100.7".into()
        }),
        ("passthrough as a request", &passthrough, |v| {
            v["event"]["action"] = "http-request".into();
            v["event"]["category"] = serde_json::json!(["network", "web"]);
            v.as_object_mut().unwrap().remove("source");
            v["destination"].as_object_mut().unwrap().remove("bytes");
            v["http"] = serde_json::json!({
                "request": {"body": {"bytes": 0}},
                "response": {"body": {"bytes": 0}}
            });
        }),
        ("connection with http", &passthrough, |v| {
            v["http"] = serde_json::json!({
                "request": {"body": {"bytes": 0}},
                "response": {"body": {"bytes": 0}}
            })
        }),
        ("connection with a path", &passthrough, |v| {
            v["url"]["path"] = "/".into()
        }),
        ("connection with a credential", &passthrough, |v| {
            v["egress"]["credential"] = serde_json::json!({"name": "npm-token"})
        }),
        ("connection without destination bytes", &passthrough, |v| {
            v["destination"].as_object_mut().unwrap().remove("bytes");
        }),
        ("server name without url.domain", &passthrough, |v| {
            v.as_object_mut().unwrap().remove("url");
        }),
        ("deny reported as allowed", &refused, |v| {
            v["event"]["type"] = serde_json::json!(["connection", "allowed"])
        }),
        ("empty reason", &refused, |v| {
            v["event"]["reason"] = "".into()
        }),
        ("malformed connection id", &refused, |v| {
            v["egress"]["connection"]["id"] = "42".into()
        }),
        ("unknown tls mode", &refused, |v| {
            v["egress"]["tls_mode"] = "bump".into()
        }),
        ("git on a connection", &passthrough, |v| {
            v["egress"]["git"] = serde_json::json!({"repo": "a/b", "service": "git-upload-pack"})
        }),
        ("git repo as a URL", &push, |v| {
            v["egress"]["git"]["repo"] = "https://github.example/acme/widget".into()
        }),
        ("unknown git service", &push, |v| {
            v["egress"]["git"]["service"] = "git-upload-archive".into()
        }),
        ("ref updates on a fetch", &push, |v| {
            v["egress"]["git"]["service"] = "git-upload-pack".into()
        }),
        ("short object id", &push, |v| {
            v["egress"]["git"]["ref_updates"][0]["new"] = "abc".into()
        }),
        ("ref update without verdict", &push, |v| {
            v["egress"]["git"]["ref_updates"][0]
                .as_object_mut()
                .unwrap()
                .remove("allowed");
        }),
    ];
    for (what, good, mutate) in cases {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(!validator.is_valid(&bad), "schema accepted: {what}");
    }
}

#[test]
fn dns_fields_use_ecs_names_and_nesting() {
    let line: Value =
        serde_json::from_slice(&Record::from(dns_allowed()).encode(4).unwrap()).unwrap();
    assert_eq!(
        line,
        serde_json::json!({
            "@timestamp": "2026-11-21T22:03:04.123456Z",
            "ecs": {"version": ECS_VERSION},
            "event": {
                "kind": "event",
                "category": ["network"],
                "type": ["protocol", "allowed"],
                "action": "dns-query",
                "outcome": "success",
                "sequence": 4
            },
            "observer": {"product": "egressd", "version": VERSION},
            "dns": {
                "question": {"name": "api.github.example", "type": "A"},
                "response_code": "NOERROR",
                "resolved_ip": ["192.0.2.10", "192.0.2.11"]
            },
            "server": {"ip": "192.0.2.53", "port": 53},
            "rule": {"name": "github"},
            "egress": {"sandbox": {"name": "agent-1"}, "verdict": "allow"}
        })
    );

    let line: Value =
        serde_json::from_slice(&Record::from(dns_denied()).encode(5).unwrap()).unwrap();
    assert_eq!(line["event"]["outcome"], "failure");
    assert_eq!(
        line["event"]["type"],
        serde_json::json!(["protocol", "denied"])
    );
    assert_eq!(line["event"]["reason"], "name is not allowed by the policy");
    assert_eq!(
        line["dns"],
        serde_json::json!({
            "question": {"name": "exfil.example", "type": "AAAA"},
            "response_code": "NXDOMAIN"
        })
    );
    assert_eq!(line["egress"]["verdict"], "deny");
    for absent in ["rule", "server"] {
        assert!(line.get(absent).is_none(), "{absent} in {line}");
    }

    // Refused answer addresses: beside, never inside, dns.resolved_ip.
    let line: Value =
        serde_json::from_slice(&Record::from(dns_with_refused()).encode(6).unwrap()).unwrap();
    assert_eq!(
        line["dns"]["resolved_ip"],
        serde_json::json!(["192.0.2.10"])
    );
    assert_eq!(
        line["egress"]["dns"],
        serde_json::json!({"refused": [
            {"ip": "127.0.0.1", "reason": "127.0.0.1 is a loopback address"},
            {"ip": "198.51.100.7", "reason": "the address is outside the `answers` of rule `github`"}
        ]})
    );
    assert!(validator().is_valid(&line), "{line}");
}

#[test]
fn schema_catches_dns_drift() {
    let validator = validator();
    let allowed: Value =
        serde_json::from_slice(&Record::from(dns_allowed()).encode(1).unwrap()).unwrap();
    let denied: Value =
        serde_json::from_slice(&Record::from(dns_denied()).encode(1).unwrap()).unwrap();
    for good in [&allowed, &denied] {
        assert!(validator.is_valid(good), "{good}");
    }
    let cases: Vec<(&str, &Value, Mutation)> = vec![
        ("deny that releases addresses", &denied, |v| {
            v["dns"]["resolved_ip"] = serde_json::json!(["192.0.2.1"])
        }),
        ("deny without a reason", &denied, |v| {
            v["event"].as_object_mut().unwrap().remove("reason");
        }),
        ("deny as success", &denied, |v| {
            v["event"]["outcome"] = "success".into()
        }),
        ("allow typed as denied", &allowed, |v| {
            v["event"]["type"] = serde_json::json!(["protocol", "denied"])
        }),
        ("addresses in an NXDOMAIN answer", &allowed, |v| {
            v["dns"]["response_code"] = "NXDOMAIN".into()
        }),
        ("lower-case response code", &allowed, |v| {
            v["dns"]["response_code"] = "noerror".into()
        }),
        ("empty resolved_ip", &allowed, |v| {
            v["dns"]["resolved_ip"] = serde_json::json!([])
        }),
        ("mapped resolved ip", &allowed, |v| {
            v["dns"]["resolved_ip"] = serde_json::json!(["::ffff:192.0.2.1"])
        }),
        ("unknown dns field", &allowed, |v| {
            v["dns"]["answers"] = serde_json::json!([])
        }),
        ("missing question outside FORMERR", &allowed, |v| {
            v["dns"].as_object_mut().unwrap().remove("question");
            v["dns"].as_object_mut().unwrap().remove("resolved_ip");
        }),
        ("verdict audit", &allowed, |v| {
            v["egress"]["verdict"] = "audit".into()
        }),
        ("connection id on a dns record", &allowed, |v| {
            v["egress"]["connection"] =
                serde_json::json!({"id": "0000000000001000-0000000100000042"})
        }),
        ("duration on a dns record", &allowed, |v| {
            v["event"]["duration"] = 1.into()
        }),
        ("server without port", &allowed, |v| {
            v["server"] = serde_json::json!({"ip": "192.0.2.53"})
        }),
        ("empty refused list", &allowed, |v| {
            v["egress"]["dns"] = serde_json::json!({"refused": []})
        }),
        ("refused address without a reason", &allowed, |v| {
            v["egress"]["dns"] = serde_json::json!({"refused": [{"ip": "127.0.0.1"}]})
        }),
        ("refused address written mapped", &allowed, |v| {
            v["egress"]["dns"] =
                serde_json::json!({"refused": [{"ip": "::ffff:127.0.0.1", "reason": "x"}]})
        }),
    ];
    for (what, good, mutate) in cases {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(!validator.is_valid(&bad), "schema accepted: {what}");
    }
}

#[test]
fn timestamps_are_converted_to_utc() {
    let t = datetime!(2026-11-22 00:03:04.5 +02:00);
    assert_eq!(
        format_timestamp(t, "test", "@timestamp").unwrap(),
        "2026-11-21T22:03:04.500000Z"
    );
}

#[test]
fn schema_catches_drift() {
    let validator = validator();
    let record: Record = network(
        Hook::Connect4,
        6,
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        443,
        Verdict::Allow,
        RuleRef::Default,
    )
    .into();
    let good: Value = serde_json::from_slice(&record.encode(1).unwrap()).unwrap();
    assert!(validator.is_valid(&good));

    let mutations: Vec<(&str, Mutation)> = vec![
        ("unknown top-level field", |v| v["extra"] = 1.into()),
        ("dotted key instead of nesting", |v| {
            v["event.outcome"] = "success".into()
        }),
        ("unknown egress field", |v| {
            v["egress"]["secret"] = "x".into()
        }),
        ("allow reported as failure", |v| {
            v["event"]["outcome"] = "failure".into()
        }),
        ("numeric user.id", |v| v["user"]["id"] = 1000.into()),
        ("mapped address written as IPv6", |v| {
            v["network"]["type"] = "ipv6".into();
            v["destination"]["ip"] = "::ffff:192.0.2.1".into();
            v["egress"]["hook"] = "connect6".into();
            v["egress"]["socket"]["family"] = "inet6".into();
        }),
        ("IPv6 destination with network.type ipv4", |v| {
            v["destination"]["ip"] = "2001:db8::1".into()
        }),
        ("timestamp without micros", |v| {
            v["@timestamp"] = "2026-11-21T22:03:04Z".into()
        }),
        ("missing sequence", |v| {
            v["event"].as_object_mut().unwrap().remove("sequence");
        }),
        ("unknown action", |v| v["event"]["action"] = "bind".into()),
        ("wrong family for hook", |v| {
            v["egress"]["socket"]["family"] = "inet6".into()
        }),
    ];
    for (what, mutate) in mutations {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(!validator.is_valid(&bad), "schema accepted: {what}");
    }
}

#[test]
fn reopening_continues_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let records = every_kind();
    assert_eq!(write_all(&path, &records[..3]), vec![1, 2, 3]);

    let mut writer = AuditWriter::open(AuditSink::File(path.clone())).unwrap();
    let tail = writer.tail().unwrap().clone();
    assert_eq!(tail.sequence, 3);
    assert_eq!(
        tail.timestamp,
        Some(datetime!(2026-11-21 22:03:04.123456 UTC))
    );
    assert!(!tail.ended_cleanly());
    assert_eq!(tail.unclean_stop_last_seen(), tail.timestamp);
    assert_eq!(writer.next_sequence(), 4);
    let stop: Record = DaemonStop {
        time: T0,
        pid: 1,
        reason: StopReason::Signal,
    }
    .into();
    assert_eq!(writer.write(&stop).unwrap(), 4);
    drop(writer);

    let writer = AuditWriter::open(AuditSink::File(path.clone())).unwrap();
    assert!(writer.tail().unwrap().ended_cleanly());
    assert_eq!(writer.tail().unwrap().unclean_stop_last_seen(), None);
    assert_eq!(writer.next_sequence(), 5);
    drop(writer);

    let lines = read_lines(&path);
    assert_eq!(
        lines.iter().map(sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

#[test]
fn a_torn_last_line_is_terminated_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_all(&path, &every_kind()[..2]);
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(br#"{"@timestamp":"2026-11-21T22:03:04.1"#)
        .unwrap();

    let seqs = write_all(&path, &every_kind()[2..4]);
    assert_eq!(seqs, vec![3, 4]);
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5);
    assert!(
        serde_json::from_str::<Value>(lines[2]).is_err(),
        "fragment stays on its own line"
    );
    for line in [lines[0], lines[1], lines[3], lines[4]] {
        assert!(validator().is_valid(&serde_json::from_str(line).unwrap()));
    }

    // The fragment is now a complete but unparseable line in the middle; reopening still
    // finds the real last record.
    assert_eq!(write_all(&path, &every_kind()[..1]), vec![5]);
}

#[test]
fn a_damaged_last_line_falls_back_to_the_previous_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_all(&path, &every_kind()[..2]);
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"garbage\n\n")
        .unwrap();
    assert_eq!(write_all(&path, &every_kind()[..1]), vec![3]);
}

#[test]
fn a_file_that_is_not_an_audit_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    fs::write(&path, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    let err = AuditWriter::open(AuditSink::File(path.clone())).unwrap_err();
    assert!(matches!(err, AuditError::NoSequence { .. }), "{err}");
    assert!(err.to_string().contains("passwd"), "{err}");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "root:x:0:0:root:/root:/bin/bash\n"
    );
}

/// The log is not opened through a symbolic link (whoever placed one would choose the
/// file root appends to): refused, saying why, and the file it points at untouched; the
/// file itself opens.
#[test]
fn a_symbolic_link_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    fs::write(&target, "kept\n").unwrap();
    let link = dir.path().join("audit.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = AuditWriter::open(AuditSink::File(link.clone())).unwrap_err();
    assert!(matches!(err, AuditError::Open { .. }), "{err}");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(fs::read_to_string(&target).unwrap(), "kept\n");
    // A link to a stream (`/dev/stdout` is one) is followed: nothing there is rotated.
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    assert!(AuditWriter::open(AuditSink::File(link.clone())).is_ok());
    // Control: a plain file at the same place opens.
    fs::remove_file(&link).unwrap();
    assert!(AuditWriter::open(AuditSink::File(link)).is_ok());
}

#[test]
fn new_file_and_directory_modes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log/egressd/audit.jsonl");
    let writer = AuditWriter::open(AuditSink::File(path.clone())).unwrap();
    assert_eq!(writer.next_sequence(), 1);
    assert!(writer.tail().is_none());
    let file_mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    let dir_mode = fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    // The umask may only take bits away.
    assert_eq!(file_mode & !0o640, 0, "{file_mode:o}");
    assert_eq!(file_mode & 0o600, 0o600, "{file_mode:o}");
    assert_eq!(dir_mode & !0o750, 0, "{dir_mode:o}");
    assert_eq!(dir_mode & 0o700, 0o700, "{dir_mode:o}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_handles_give_one_line_per_record() {
    const TASKS: u32 = 16;
    const PER_TASK: u16 = 250;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_all(&path, &every_kind()[..1]);

    let (handle, task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    assert_eq!(task.next_sequence(), 2);
    let writer = tokio::spawn(task.run());
    let mut producers = Vec::new();
    for t in 0..TASKS {
        let handle = handle.clone();
        producers.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let mut r = network(
                    Hook::Connect6,
                    6,
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                    i,
                    Verdict::Allow,
                    RuleRef::Default,
                );
                r.pid = t;
                handle.emit(r);
                if i % 32 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    assert!(!handle.is_closed());
    drop(handle);
    let summary = writer.await.unwrap().unwrap();
    let total = u64::from(TASKS) * u64::from(PER_TASK);
    assert_eq!(summary.records, total);
    assert_eq!(summary.next_sequence, total + 2);

    let lines = read_lines(&path);
    assert_eq!(lines.len() as u64, total + 1);
    assert_eq!(
        lines.iter().map(sequence).collect::<Vec<_>>(),
        (1..=total + 1).collect::<Vec<_>>()
    );
    // Each producer's records keep their order.
    let mut next_port: HashMap<u64, u64> = HashMap::new();
    for line in &lines[1..] {
        let pid = line["process"]["pid"].as_u64().unwrap();
        let port = line["destination"]["port"].as_u64().unwrap();
        let expected = next_port.entry(pid).or_insert(0);
        assert_eq!(port, *expected);
        *expected += 1;
    }
    let validator = validator();
    assert!(lines.iter().all(|l| validator.is_valid(l)));
}

#[test]
fn concurrent_appenders_never_interleave_lines() {
    const PER_WRITER: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    // Separate open file descriptions, as separate processes would have. Opened before any
    // writing so no writer mistakes another's write in progress for a torn line.
    let writers: Vec<_> = (0..4)
        .map(|_| AuditWriter::open(AuditSink::File(path.clone())).unwrap())
        .collect();
    let threads: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(t, mut writer)| {
            std::thread::spawn(move || {
                for _ in 0..PER_WRITER {
                    let r: Record = PolicyRejected {
                        time: T0,
                        sandbox: format!("writer-{t}"),
                        policy_path: PathBuf::from("/etc/egressd/policies/agent.yaml"),
                        policy_digest: None,
                        // Most lines cross a page boundary, so a write split by the
                        // kernel would show.
                        error: "x".repeat(3_500),
                    }
                    .into();
                    writer.write(&r).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 4 * PER_WRITER);
    let mut per_writer: HashMap<String, usize> = HashMap::new();
    for line in &lines {
        assert_eq!(line["error"]["message"].as_str().unwrap().len(), 3_500);
        *per_writer
            .entry(line["egress"]["sandbox"]["name"].to_string())
            .or_default() += 1;
    }
    assert!(
        per_writer.values().all(|&n| n == PER_WRITER),
        "{per_writer:?}"
    );
}

#[tokio::test]
async fn emitting_after_the_task_is_gone_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, task) = AuditLog::open(AuditSink::File(dir.path().join("a.jsonl"))).unwrap();
    drop(task);
    assert!(handle.is_closed());
    handle.emit(EventsLost {
        time: T0,
        count: 1,
        total: 1,
        sandboxes: Vec::new(),
    });
}

#[tokio::test]
async fn records_sent_together_keep_their_order_and_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    let writer = tokio::spawn(task.run());
    handle.emit(denied(1));
    handle.emit_all((2..=5).map(denied).collect());
    handle.emit_all(Vec::new());
    handle.emit(denied(6));
    handle.emit_all(vec![denied(7)]);
    drop(handle);
    let summary = writer.await.unwrap().unwrap();
    assert_eq!(summary.records, 7);
    let lines = read_lines(&path);
    let ports: Vec<u64> = lines
        .iter()
        .map(|l| l["destination"]["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, (1..=7).collect::<Vec<_>>());
    let sequences: Vec<u64> = lines.iter().map(sequence).collect();
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "{sequences:?}"
    );
}

/// The queue bounds only what waits for a log that cannot be written: a batch larger
/// than it, sent to a writable log, is written whole.
#[tokio::test]
async fn a_batch_larger_than_the_queue_is_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let config = AuditConfig {
        queue_records: 3,
        ..AuditConfig::default()
    };
    let (handle, task) = AuditLog::open_with(AuditSink::File(path.clone()), &config, None).unwrap();
    let writer = tokio::spawn(task.run());
    handle.emit_all((1..=10).map(denied).collect());
    drop(handle);
    let summary = writer.await.unwrap().unwrap();
    assert_eq!(summary.records, 10);
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 10);
    assert!(
        lines.iter().all(|l| l["event"]["action"] == "connect"),
        "{lines:?}"
    );
}

/// An audit log on a FIFO with its writer running, and the FIFO's reading end, opened
/// non-blocking and not read yet (the writer's writes block once the pipe is full).
fn log_on_a_fifo() -> (
    tempfile::TempDir,
    AuditHandle,
    tokio::task::JoinHandle<Result<AuditSummary, AuditError>>,
    std::fs::File,
) {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.fifo");
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let (handle, task) =
        AuditLog::open_with(AuditSink::File(path.clone()), &AuditConfig::default(), None).unwrap();
    let writer = tokio::spawn(task.run());
    let fifo = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .unwrap();
    (dir, handle, writer, fifo)
}

/// Reads `fifo` (non-blocking) into `text` until `writer` has finished, for at most
/// `within`, then whatever is left in the pipe.
async fn read_fifo_to_end(
    fifo: &mut std::fs::File,
    writer: &tokio::task::JoinHandle<Result<AuditSummary, AuditError>>,
    text: &mut Vec<u8>,
    within: std::time::Duration,
) {
    use std::io::Read as _;
    let mut chunk = vec![0u8; 1 << 20];
    let start = std::time::Instant::now();
    while !writer.is_finished() && start.elapsed() < within {
        match fifo.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            read => text.extend_from_slice(&chunk[..read.unwrap()]),
        }
    }
    while let Ok(n) = fifo.read(&mut chunk) {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_blocked_by_a_reader_that_stopped_reading_makes_the_trail_unhealthy() {
    use std::io::Read as _;
    use std::time::Duration;
    // The reader's end is open but not read: the test always drains it before it
    // asserts, so a failure cannot leave the writer's thread blocked for ever.
    let (_dir, handle, writer, mut fifo) = log_on_a_fifo();
    // Far more than the pipe holds, with nothing reading it: the writer's write blocks.
    let records = 2000u16;
    handle.emit_all((1..=records).map(denied).collect());
    let started = std::time::Instant::now();
    while handle.healthy() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unhealthy_after = started.elapsed();
    let gate_closed = !handle.healthy();
    let report = handle.health();
    // The reader comes back: everything is written and the trail is healthy again.
    let mut text = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let draining = std::time::Instant::now();
    while text.iter().filter(|b| **b == b'\n').count() < usize::from(records)
        && draining.elapsed() < Duration::from_secs(10)
    {
        match fifo.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            read => text.extend_from_slice(&chunk[..read.unwrap()]),
        }
    }
    assert!(
        gate_closed && !report.healthy,
        "the trail stayed healthy behind a blocked write"
    );
    // Not before the write had been blocked for WRITE_STALL (500 ms in tests).
    assert!(
        unhealthy_after >= Duration::from_millis(400),
        "{unhealthy_after:?}"
    );
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|e| e.contains("blocked")),
        "{report:?}"
    );
    assert_eq!(
        text.iter().filter(|b| **b == b'\n').count(),
        usize::from(records)
    );
    assert!(handle.healthy());
    drop(handle);
    writer.await.unwrap().unwrap();
}

/// The records queued to the writer and not taken yet are counted (the kernel event
/// reader holds back on it): batches count as their records, not as one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_counts_records_not_yet_taken_by_the_writer() {
    use std::time::Duration;
    let (_dir, handle, writer, mut fifo) = log_on_a_fifo();
    // Far more than the pipe holds: the writer blocks in its write.
    handle.emit_all((1..=2000u16).map(denied).collect());
    let started = std::time::Instant::now();
    while handle.healthy() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let blocked = !handle.healthy();
    for _ in 0..3 {
        handle.emit_all((1..=10_000u16).map(denied).collect());
    }
    handle.emit(denied(1));
    let behind = handle.backlog();
    // The reader comes back: everything is taken, the backlog is gone.
    let (mut lines, mut chunk) = (0, vec![0u8; 1 << 20]);
    let start = std::time::Instant::now();
    while (handle.backlog() > 0 || lines < 32_001) && start.elapsed() < Duration::from_secs(20) {
        use std::io::Read as _;
        match fifo.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            read => {
                lines += chunk[..read.unwrap()]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
            }
        }
    }
    assert!(blocked, "the writer never blocked");
    assert_eq!(behind, 30_001);
    assert_eq!(handle.backlog(), 0);
    assert_eq!(lines, 32_001);
    drop(handle);
    let mut rest = Vec::new();
    read_fifo_to_end(&mut fifo, &writer, &mut rest, Duration::from_secs(10)).await;
    writer.await.unwrap().unwrap();
}

/// A write that blocks must not grow the daemon without bound: the queue to the writer
/// is bounded, and records that find it full are numbered and reported as lost, so the
/// sequence has no gap an `audit-lost` record does not explain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_find_the_queue_full_are_reported_lost() {
    use std::io::Read as _;
    use std::time::Duration;
    let (_dir, handle, writer, mut fifo) = log_on_a_fifo();
    // Nothing reads: the writer blocks, the queue fills, the rest cannot be queued.
    let emitted = super::writer::QUEUE_MESSAGES + 20_000;
    for i in 0..emitted {
        handle.emit(denied((i % 60_000) as u16 + 1));
    }
    // Records are being lost (not yet reported): no credential is used meanwhile
    // (asserted once the log is read, so a failure does not leave the writer blocked).
    let healthy_while_losing = handle.healthy();
    // The reader comes back.
    let mut text = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    let draining = std::time::Instant::now();
    let lost_seen = |text: &[u8]| String::from_utf8_lossy(text).contains("\"audit-lost\"");
    // A record after the flood makes the writer take the count.
    handle.emit(denied(1));
    while !(lost_seen(&text) && text.ends_with(b"\n"))
        && draining.elapsed() < Duration::from_secs(20)
    {
        match fifo.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            read => text.extend_from_slice(&chunk[..read.unwrap()]),
        }
    }
    // Reported: healthy again.
    let healthy_after = lost_seen(&text) && handle.healthy();
    drop(handle);
    // Whatever is still on its way.
    read_fifo_to_end(&mut fifo, &writer, &mut text, Duration::from_secs(10)).await;
    writer.await.unwrap().unwrap();
    assert!(
        !healthy_while_losing,
        "healthy while records found the queue full"
    );
    assert!(healthy_after, "still unhealthy after the loss was reported");
    let lines: Vec<serde_json::Value> = String::from_utf8(text)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut covered = std::collections::BTreeSet::new();
    let mut lost = 0;
    for l in &lines {
        covered.insert(l["event"]["sequence"].as_u64().unwrap());
        if l["event"]["action"] == "audit-lost" {
            let (first, last) = (
                l["egress"]["audit_lost"]["first_sequence"]
                    .as_u64()
                    .unwrap(),
                l["egress"]["audit_lost"]["last_sequence"].as_u64().unwrap(),
            );
            lost += last - first + 1;
            covered.extend(first..=last);
        }
    }
    assert!(lost > 0, "nothing found the queue full");
    let written = lines
        .iter()
        .filter(|l| l["event"]["action"] == "connect")
        .count();
    assert_eq!(written as u64 + lost, emitted as u64 + 1);
    // Every number from the first to the last is a record or inside a reported range.
    let (first, last) = (*covered.first().unwrap(), *covered.last().unwrap());
    assert_eq!(
        covered.len() as u64,
        last - first + 1,
        "a gap no record explains"
    );
}

#[test]
fn kernel_events_decode() {
    let clock = ClockOffset::from_nanos(1_700_000_000_000_000_000);
    let mut ev = ConnectEvent {
        header: EventHeader {
            version: 1,
            kind: 1,
            _pad: 0,
        },
        ts_ns: 5_000_000_123,
        cgroup_id: 7,
        socket_cookie: 8,
        netns_cookie: 9,
        pid: 10,
        uid: 11,
        gid: 12,
        sandbox_index: 1,
        rule_id: 0,
        dst_port: 443,
        family: 4,
        verdict: agent_common::verdict::DENY,
        hook: agent_common::hook::CONNECT4,
        _pad: 0,
        protocol: 6,
        policy_slot: 1,
        opt_level: 0,
        opt_name: 0,
        comm: *b"python3\0\0\0\0\0\0\0\0\0",
        addr: [192, 0, 2, 33, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    };
    let d = NetworkDecision::from_event(&ev, &clock, "s".into(), RuleRef::Default).unwrap();
    assert_eq!(d.process_name, "python3");
    assert_eq!(d.destination_ip, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 33)));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.time.unix_timestamp_nanos(), 1_700_000_005_000_000_123);
    assert_eq!(
        d.connection_id().to_string(),
        "0000000000000009-0000000000000008"
    );

    ev.hook = agent_common::hook::CONNECT6;
    ev.family = 6;
    ev.addr = Ipv4Addr::new(192, 0, 2, 33).to_ipv6_mapped().octets();
    let d = NetworkDecision::from_event(&ev, &clock, "s".into(), RuleRef::Default).unwrap();
    let line: Value = serde_json::from_slice(&Record::from(d).encode(1).unwrap()).unwrap();
    assert_eq!(line["destination"]["ip"], "192.0.2.33");
    assert_eq!(line["network"]["type"], "ipv4");
    assert_eq!(line["egress"]["socket"]["family"], "inet6");

    ev.family = 4;
    assert!(matches!(
        NetworkDecision::from_event(&ev, &clock, "s".into(), RuleRef::Default),
        Err(DecodeError::Family { .. })
    ));
    ev.family = 6;
    ev.verdict = 99;
    assert_eq!(
        NetworkDecision::from_event(&ev, &clock, "s".into(), RuleRef::Default),
        Err(DecodeError::Verdict(99))
    );
}

#[test]
fn policy_digest_is_sha256_hex() {
    assert_eq!(
        PolicyDigest::of(b"").as_str(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        PolicyDigest::of(b"abc").to_string(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        PolicyDigest::from_hex(PolicyDigest::of(b"abc").as_str()),
        Some(PolicyDigest::of(b"abc"))
    );
    assert_eq!(PolicyDigest::from_hex("ABC"), None);
}

#[test]
fn schema_checks_each_kind_by_action() {
    let validator = validator();
    let encode = |r: Record| -> Value { serde_json::from_slice(&r.encode(1).unwrap()).unwrap() };
    let start = encode(
        DaemonStart {
            time: T0,
            pid: 1,
            adopted_sandboxes: 0,
            previous_seen: None,
        }
        .into(),
    );
    let attach = encode(Record::SandboxAttach(lifecycle("a")));
    let change = encode(
        PolicyChange {
            time: T0,
            sandbox: "a".into(),
            policy_path: "/p.yaml".into(),
            previous_digest: digest("old"),
            digest: digest("new"),
        }
        .into(),
    );
    let lost = encode(
        EventsLost {
            time: T0,
            count: 1,
            total: 1,
            sandboxes: vec![LostBySandbox {
                name: "agent-1".into(),
                count: 1,
            }],
        }
        .into(),
    );
    for good in [&start, &attach, &change, &lost] {
        assert!(validator.is_valid(good), "{good}");
    }

    let cases: Vec<(&str, &Value, Mutation)> = vec![
        ("network fields on daemon-start", &start, |v| {
            v["destination"] = serde_json::json!({"ip": "192.0.2.1", "port": 1})
        }),
        ("daemon-start without pid", &start, |v| {
            v["process"] = serde_json::json!({})
        }),
        ("attach typed as change", &attach, |v| {
            v["event"]["type"] = serde_json::json!(["change"])
        }),
        ("attach as adopt action keeps creation type", &attach, |v| {
            v["event"]["action"] = "sandbox-adopt".into()
        }),
        ("short digest", &attach, |v| {
            v["egress"]["policy"]["digest"] = "abc".into()
        }),
        ("change without previous digest", &change, |v| {
            v["egress"]["policy"]
                .as_object_mut()
                .unwrap()
                .remove("previous_digest");
        }),
        ("lost count as string", &lost, |v| {
            v["egress"]["lost"]["count"] = "1".into()
        }),
        ("lost reported as alert", &lost, |v| {
            v["event"]["kind"] = "alert".into()
        }),
    ];
    for (what, good, mutate) in cases {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(!validator.is_valid(&bad), "schema accepted: {what}");
    }
}

/// Records of every kind, with `awkward` in every string that comes from outside.
fn awkward_records(awkward: &str) -> Vec<Record> {
    let mut odd_network = network(
        Hook::Sendmsg6,
        17,
        IpAddr::V6("fe80::1:2:3:4".parse().unwrap()),
        53,
        Verdict::Redirect,
        RuleRef::Named(awkward.into()),
    );
    odd_network.process_name = awkward.into();
    odd_network.sandbox = awkward.into();
    odd_network.domain = Some(awkward.into());
    odd_network.reason = Some(awkward.into());
    odd_network.socket_cookie = u64::MAX;
    odd_network.netns_cookie = 0x0123_4567_89ab_cdef;
    odd_network.uid = u32::MAX;
    let mut odd_proxy = proxy_request();
    odd_proxy.path = Some(format!("/{awkward}"));
    odd_proxy.reason = Some(awkward.into());
    odd_proxy.method = Some(awkward.into());
    let mut records = every_kind();
    records.extend(refusals());
    records.push(odd_network.into());
    records.push(proxy_event(odd_proxy));
    records
}

/// The encoder writes the layout itself; serde_json, given the same layout, must write the
/// same bytes, for every kind and for strings that need escaping.
#[test]
fn lines_are_what_serde_json_writes() {
    let awkward = "quote \" backslash \\ newline \n tab \t nul \u{0} esc \u{1b} é … €";
    for (i, record) in awkward_records(awkward).iter().enumerate() {
        let sequence = [1, 9, 10, 99_999, u64::MAX][i % 5];
        let line = record.encode(sequence).unwrap();
        assert_eq!(
            String::from_utf8(line).unwrap(),
            String::from_utf8(record.encode_with_serde(sequence).unwrap()).unwrap(),
            "{}",
            record.action()
        );
    }
}

/// Characters a reader must not meet raw (DEL, C1, bidirectional and zero-width
/// formatting, line separators) are escaped where serde_json writes them raw: the line
/// reads back as the same values, and holds none of them.
#[test]
fn lines_spell_out_what_would_mislead_a_reader() {
    let awkward = "del \u{7f} csi \u{9b}31m nel \u{85} rlo \u{202e}gh=elur \u{2066}x\u{2069} \
                   zw \u{200b} bom \u{feff} ls \u{2028} ps \u{2029} alm \u{61c} end";
    for record in awkward_records(awkward) {
        let line = String::from_utf8(record.encode(7).unwrap()).unwrap();
        let body = line.strip_suffix('\n').unwrap();
        assert!(
            !body.chars().any(crate::text::misleads),
            "{}: {body}",
            record.action()
        );
        let ours: serde_json::Value = serde_json::from_str(body).unwrap();
        let theirs: serde_json::Value =
            serde_json::from_slice(&record.encode_with_serde(7).unwrap()).unwrap();
        assert_eq!(ours, theirs, "{}", record.action());
    }
    // Lines too long for one write are shortened, and escaped alike.
    let long = awkward.repeat(60);
    let mut shortened = 0;
    for record in awkward_records(&long) {
        let line = String::from_utf8(record.encode(7).unwrap()).unwrap();
        let body = line.strip_suffix('\n').unwrap();
        assert!(!body.chars().any(crate::text::misleads), "{body}");
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        if value["egress"]["truncated"] == true {
            shortened += 1;
        }
    }
    assert!(shortened >= 2, "{shortened} lines shortened");
}

#[test]
#[ignore = "prints one line of every kind, for reading"]
fn print_every_kind() {
    for (i, r) in every_kind().iter().enumerate() {
        print!(
            "{}",
            String::from_utf8(r.encode(i as u64 + 1).unwrap()).unwrap()
        );
    }
}

#[test]
fn a_line_completed_after_open_is_not_taken_for_torn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_all(&path, &every_kind()[..1]);
    // Another appender's line, caught half written when we open...
    let other = String::from_utf8(every_kind()[1].encode(2).unwrap()).unwrap();
    let (head, rest) = other.split_at(40);
    let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(head.as_bytes()).unwrap();
    let mut writer = AuditWriter::open(AuditSink::File(path.clone())).unwrap();
    // ...and finished before our first write: no blank line appears.
    file.write_all(rest.as_bytes()).unwrap();
    writer.write(&every_kind()[2]).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(text.lines().all(|l| !l.is_empty()));
}

// ---------------------------------------------------------------------------------------
// Never silent: write failures, loss accounting, sequence continuity, rotation
// ---------------------------------------------------------------------------------------

fn denied(port: u16) -> Record {
    network(
        Hook::Connect4,
        6,
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        port,
        Verdict::Deny,
        RuleRef::Default,
    )
    .into()
}

/// A record that cannot be encoded (its time before the year 0000) takes its number and
/// is reported lost in its place, saying why; the records around it are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_encoded_is_reported_lost_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    let writer = tokio::spawn(task.run());
    handle.emit(denied(1));
    let mut ancient = network(
        Hook::Connect4,
        6,
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        2,
        Verdict::Deny,
        RuleRef::Default,
    );
    ancient.time = OffsetDateTime::from_unix_timestamp(-62_200_000_000).unwrap();
    handle.emit(ancient);
    handle.emit(denied(3));
    drop(handle);
    writer.await.unwrap().unwrap();
    let lines = read_lines(&path);
    let seqs: Vec<u64> = lines.iter().map(sequence).collect();
    assert_eq!(seqs, vec![1, 3, 4], "{lines:#?}");
    let lost = &lines[1];
    assert_eq!(lost["event"]["action"], "audit-lost");
    assert_eq!(lost["egress"]["audit_lost"]["first_sequence"], 2);
    assert_eq!(lost["egress"]["audit_lost"]["count"], 1);
    let why = lost["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("could not be encoded"), "{lost}");
}

/// Polls `cond` every 20 ms for at most 10 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(cond(), "timed out waiting for: {what}");
}

fn lines_of(paths: &[PathBuf]) -> Vec<Value> {
    paths
        .iter()
        .filter(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .flat_map(|p| read_lines(p))
        .collect()
}

/// A log path on a full disk: every write to `/dev/full` fails with ENOSPC; removing the
/// link "frees space".
fn full_disk() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    // `/dev/full` itself (a character device 1:7) at the log's path: every write fails
    // with ENOSPC until the node is removed (the log is not opened through a link).
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mknod reads the NUL-terminated path, which outlives the call.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 7)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    (dir, path)
}

/// A configuration that keeps three records in memory while the log cannot be written.
fn three_in_memory() -> AuditConfig {
    AuditConfig {
        queue_records: 3,
        ..AuditConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_queues_counts_and_reports_the_exact_loss() {
    let (dir, path) = full_disk();
    let seq_file = dir.path().join("state/audit-sequence");
    let (handle, task) = AuditLog::open_with(
        AuditSink::File(path.clone()),
        &three_in_memory(),
        Some(seq_file.clone()),
    )
    .unwrap();
    assert!(handle.healthy());
    let writer = tokio::spawn(task.run());
    for port in 1..=10 {
        handle.emit(denied(port));
    }
    eventually("unhealthy", || !handle.healthy()).await;
    eventually("all ten taken", || handle.health().lost == 7).await;
    let health = handle.health();
    assert!(!health.healthy);
    assert!(
        health.error.as_deref().unwrap().contains("No space left"),
        "{health:?}"
    );
    assert!(health.failing_since.is_some());
    assert!(health.write_errors >= 1);

    fs::remove_file(&path).unwrap();
    eventually("healthy again", || handle.healthy()).await;
    handle.emit(denied(11));
    drop(handle);
    let summary = writer.await.unwrap().unwrap();
    assert_eq!(summary.next_sequence, 13);

    let lines = read_lines(&path);
    let seqs: Vec<u64> = lines.iter().map(sequence).collect();
    // 1-3 were kept in memory and written late; 4-10 were dropped and are accounted for
    // by the loss record (11); 12 came after recovery.
    assert_eq!(seqs, vec![1, 2, 3, 11, 12]);
    let lost = &lines[3];
    assert_eq!(lost["event"]["action"], "audit-lost");
    assert_eq!(lost["egress"]["audit_lost"]["count"], 7);
    assert_eq!(lost["egress"]["audit_lost"]["first_sequence"], 4);
    assert_eq!(lost["egress"]["audit_lost"]["last_sequence"], 10);
    assert!(lost["error"]["message"]
        .as_str()
        .unwrap()
        .contains("No space left"));
    let validator = validator();
    for line in &lines {
        let errors = violations(&validator, line);
        assert!(errors.is_empty(), "{line}\n{}", errors.join("\n"));
    }
    assert_eq!(
        fs::read_to_string(&seq_file)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec![format!("{:020}", 12), format!("{:020}", 12)]
    );
}

/// A credential's use while the log cannot be written, behind a flood that fills the
/// queue: its record is kept (past the bound), the drops on each side of it are reported
/// as two exact ranges, and nothing else is lost unaccounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_record_is_not_pushed_out_by_a_flood() {
    let (_dir, path) = full_disk();
    let (handle, task) =
        AuditLog::open_with(AuditSink::File(path.clone()), &three_in_memory(), None).unwrap();
    let writer = tokio::spawn(task.run());
    let flood = |ports: std::ops::RangeInclusive<u16>| {
        handle.emit_all(ports.map(denied).collect());
    };
    flood(1..=10);
    eventually("unhealthy", || !handle.healthy()).await;
    let mut used = proxy_request();
    used.credential = Some("github-token".into());
    handle.emit(proxy_event(used));
    flood(11..=20);
    // A request without a credential is not kept past the bound.
    let mut plain = proxy_request();
    plain.credential = None;
    handle.emit(proxy_event(plain));
    eventually("all taken", || handle.health().lost == 18).await;

    fs::remove_file(&path).unwrap();
    eventually("healthy again", || handle.healthy()).await;
    drop(handle);
    writer.await.unwrap().unwrap();
    let lines = read_lines(&path);
    let seqs: Vec<u64> = lines.iter().map(sequence).collect();
    // 1-3 kept; 4-10 dropped, their loss record (11) queued before the credential's
    // record (12), kept; 13-23 dropped; their loss record last. Every gap is explained by
    // a record numbered below whatever follows it.
    assert_eq!(seqs, vec![1, 2, 3, 11, 12, 24], "{lines:#?}");
    assert_eq!(lines[4]["event"]["action"], "http-request");
    assert_eq!(lines[4]["egress"]["credential"]["name"], "github-token");
    let ranges: Vec<(u64, u64, u64)> = [&lines[3], &lines[5]]
        .iter()
        .map(|l| {
            assert_eq!(l["event"]["action"], "audit-lost");
            let lost = &l["egress"]["audit_lost"];
            // Whose they were: every one of this flood's, one sandbox's.
            assert_eq!(
                lost["sandboxes"],
                serde_json::json!([{"name": "agent-1", "count": lost["count"]}]),
                "{l}"
            );
            (
                lost["first_sequence"].as_u64().unwrap(),
                lost["last_sequence"].as_u64().unwrap(),
                lost["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ranges, vec![(4, 10, 7), (13, 23, 11)]);
}

/// The queue to the writer full (a reader that stopped reading): a record of what a
/// credential did still reaches the log, kept aside from the flood that is counted lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_record_is_kept_when_the_queue_to_the_writer_is_full() {
    use std::time::Duration;
    let (_dir, handle, writer, mut fifo) = log_on_a_fifo();
    for i in 0..super::writer::QUEUE_MESSAGES + 10_000 {
        handle.emit(denied((i % 60_000) as u16 + 1));
    }
    let mut used = proxy_request();
    used.credential = Some("github-token".into());
    handle.emit(proxy_event(used));
    // The flood's records are lost, the credential's kept aside: the trail is not
    // healthy, but a credential's use is still recorded, so credentials are not refused
    // for every sandbox because one flooded (unless the blocked write has meanwhile
    // outlasted the stall watch, which does refuse them).
    assert!(!handle.healthy());
    let stalled = handle.health().error.is_some_and(|e| e.contains("blocked"));
    assert!(handle.records_credential_use() || stalled);
    // Past the flood, and not vital: counted lost like the flood.
    let mut plain = proxy_request();
    plain.credential = None;
    handle.emit(proxy_event(plain));
    drop(handle);
    let mut text = Vec::new();
    read_fifo_to_end(&mut fifo, &writer, &mut text, Duration::from_secs(30)).await;
    writer.await.unwrap().unwrap();
    let lines: Vec<Value> = String::from_utf8(text)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"]["action"] == "http-request")
        .collect();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["egress"]["credential"]["name"], "github-token");
    // Kept aside, it still comes after every record queued before it.
    let last_connect = lines
        .iter()
        .filter(|l| l["event"]["action"] == "connect")
        .map(sequence)
        .max()
        .unwrap();
    assert!(sequence(requests[0]) > last_connect, "{}", requests[0]);
    let lost: u64 = lines
        .iter()
        .filter(|l| l["event"]["action"] == "audit-lost")
        .map(|l| l["egress"]["audit_lost"]["count"].as_u64().unwrap())
        .sum();
    let connects = lines
        .iter()
        .filter(|l| l["event"]["action"] == "connect")
        .count() as u64;
    assert!(lost > 0, "nothing found the queue full");
    // Every record emitted is written or counted lost: the flood, the plain request.
    assert_eq!(
        connects + lost,
        super::writer::QUEUE_MESSAGES as u64 + 10_000 + 1
    );
    // And each one lost is counted as its sandbox's.
    let by_sandbox: u64 = lines
        .iter()
        .filter(|l| l["event"]["action"] == "audit-lost")
        .flat_map(|l| {
            l["egress"]["audit_lost"]["sandboxes"]
                .as_array()
                .unwrap_or_else(|| unreachable!("no sandboxes: {l}"))
        })
        .map(|s| {
            assert_eq!(s["name"], "agent-1");
            s["count"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(by_sandbox, lost);
}

/// A sandbox flooding alerts while the log cannot be written keeps at most its share of
/// the reserve: another sandbox's credential record is still kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sandbox_cannot_take_the_whole_reserve() {
    let (_dir, path) = full_disk();
    let (handle, task) =
        AuditLog::open_with(AuditSink::File(path.clone()), &three_in_memory(), None).unwrap();
    let writer = tokio::spawn(task.run());
    handle.emit_all((1..=5).map(denied).collect());
    eventually("unhealthy", || !handle.healthy()).await;
    let share = super::writer::VITAL_SHARE;
    let flood = share + 100;
    handle.emit_all(
        (0..flood)
            .map(|_| Alert::new(T0, AlertKind::PlaceholderMisdirected, "flood", "x").into())
            .collect(),
    );
    let mut used = proxy_request();
    used.sandbox = "agent-1".into();
    handle.emit(proxy_event(used));
    eventually("all taken", || {
        handle.health().lost == (2 + flood - share) as u64
    })
    .await;
    fs::remove_file(&path).unwrap();
    eventually("healthy again", || handle.healthy()).await;
    drop(handle);
    writer.await.unwrap().unwrap();
    let lines = read_lines(&path);
    let alerts = lines
        .iter()
        .filter(|l| l["event"]["kind"] == "alert")
        .count();
    assert_eq!(alerts, share);
    assert!(
        lines.iter().any(|l| l["event"]["action"] == "http-request"
            && l["egress"]["sandbox"]["name"] == "agent-1"),
        "the other sandbox's credential record was pushed out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_when_the_outage_fits_in_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs/audit.jsonl");
    let (handle, task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    let writer = tokio::spawn(task.run());
    handle.emit(denied(1));
    eventually("first written", || {
        fs::read_to_string(&path).is_ok_and(|t| t.lines().count() == 1)
    })
    .await;
    // The directory is removed, and a file takes its name so it cannot be made again.
    fs::remove_dir_all(dir.path().join("logs")).unwrap();
    fs::write(dir.path().join("logs"), "in the way").unwrap();
    for port in 2..=5 {
        handle.emit(denied(port));
    }
    eventually("unhealthy", || !handle.healthy()).await;
    assert_eq!(handle.health().lost, 0);
    fs::remove_file(dir.path().join("logs")).unwrap();
    eventually("healthy again", || handle.healthy()).await;
    drop(handle);
    writer.await.unwrap().unwrap();
    // The directory was created again; the queued records are all there, in order, and
    // no loss record was needed.
    let seqs: Vec<u64> = read_lines(&path).iter().map(sequence).collect();
    assert_eq!(seqs, vec![2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_log_is_created_again_with_the_records_written_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    let writer = tokio::spawn(task.run());
    handle.emit(denied(1));
    eventually("first written", || {
        fs::read_to_string(&path).is_ok_and(|t| t.lines().count() == 1)
    })
    .await;
    fs::remove_file(&path).unwrap();
    handle.emit(denied(2));
    handle.emit(denied(3));
    drop(handle);
    writer.await.unwrap().unwrap();
    let seqs: Vec<u64> = read_lines(&path).iter().map(sequence).collect();
    assert_eq!(seqs, vec![2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_follows_a_moved_log_and_numbering_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let seq_file = dir.path().join("audit-sequence");
    let (handle, task) = AuditLog::open_with(
        AuditSink::File(path.clone()),
        &AuditConfig::default(),
        Some(seq_file.clone()),
    )
    .unwrap();
    let writer = tokio::spawn(task.run());
    for port in 1..=3 {
        handle.emit(denied(port));
    }
    eventually("three written", || {
        fs::read_to_string(&path).is_ok_and(|t| t.lines().count() == 3)
    })
    .await;
    // logrotate `create`: move away, then SIGHUP.
    fs::rename(&path, &rotated).unwrap();
    handle.emit(denied(4));
    handle.reopen();
    handle.emit(denied(5));
    drop(handle);
    writer.await.unwrap().unwrap();
    let old: Vec<u64> = read_lines(&rotated).iter().map(sequence).collect();
    let new: Vec<u64> = read_lines(&path).iter().map(sequence).collect();
    assert_eq!((old, new), (vec![1, 2, 3, 4], vec![5]));

    // A restart after the log was rotated away again continues from the state file.
    fs::rename(&path, &rotated).unwrap();
    let (handle, task) = AuditLog::open_with(
        AuditSink::File(path.clone()),
        &AuditConfig::default(),
        Some(seq_file.clone()),
    )
    .unwrap();
    assert_eq!(task.next_sequence(), 6);
    drop((handle, task));

    // Numbers a previous run gave out but never wrote are reported first.
    fs::write(&seq_file, format!("{:020} {:020}\n", 9, 5)).unwrap();
    let (handle, task) = AuditLog::open_with(
        AuditSink::File(path.clone()),
        &AuditConfig::default(),
        Some(seq_file.clone()),
    )
    .unwrap();
    let writer = tokio::spawn(task.run());
    handle.emit(denied(6));
    drop(handle);
    writer.await.unwrap().unwrap();
    let lines = read_lines(&path);
    assert_eq!(lines.iter().map(sequence).collect::<Vec<_>>(), vec![10, 11]);
    assert_eq!(lines[0]["event"]["action"], "audit-lost");
    assert_eq!(lines[0]["egress"]["audit_lost"]["first_sequence"], 6);
    assert_eq!(lines[0]["egress"]["audit_lost"]["last_sequence"], 9);
    assert_eq!(lines[0]["egress"]["audit_lost"]["count"], 4);

    // Records a stopping daemon still held unnumbered (its writer did not finish within
    // the stop's bound) get numbers of their own at the next start, reported lost, once.
    crate::audit::note_unnumbered_at_stop(&seq_file, 3).unwrap();
    for _ in 0..2 {
        let (handle, task) = AuditLog::open_with(
            AuditSink::File(path.clone()),
            &AuditConfig::default(),
            Some(seq_file.clone()),
        )
        .unwrap();
        let writer = tokio::spawn(task.run());
        handle.emit(denied(7));
        drop(handle);
        writer.await.unwrap().unwrap();
    }
    let lines = read_lines(&path);
    assert_eq!(
        lines.iter().map(sequence).collect::<Vec<_>>(),
        vec![10, 11, 15, 16, 17]
    );
    let lost = &lines[2]["egress"]["audit_lost"];
    assert_eq!(lines[2]["event"]["action"], "audit-lost");
    assert_eq!(
        (
            &lost["first_sequence"],
            &lost["last_sequence"],
            &lost["count"]
        ),
        (&12.into(), &14.into(), &3.into())
    );
    assert!(lines[2]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("before they were numbered"));

    // The stopping writer went on for a moment and numbered (and wrote) two of the three
    // counted: only the third is reported, under a number of its own.
    crate::audit::note_unnumbered_at_stop(&seq_file, 3).unwrap();
    fs::write(&seq_file, format!("{:020} {:020}\n", 19, 19)).unwrap();
    let (handle, task) = AuditLog::open_with(
        AuditSink::File(path.clone()),
        &AuditConfig::default(),
        Some(seq_file.clone()),
    )
    .unwrap();
    let writer = tokio::spawn(task.run());
    drop(handle);
    writer.await.unwrap().unwrap();
    let lines = read_lines(&path);
    let last = lines.last().unwrap();
    assert_eq!(sequence(last), 21);
    let lost = &last["egress"]["audit_lost"];
    assert_eq!(
        (
            &lost["first_sequence"],
            &lost["last_sequence"],
            &lost["count"]
        ),
        (&20.into(), &20.into(), &1.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_rotation_keeps_n_files_and_a_continuous_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let config = AuditConfig {
        rotate: Some(RotateConfig {
            max_bytes: 4096,
            keep: 2,
        }),
        ..AuditConfig::default()
    };
    let (handle, task) = AuditLog::open_with(AuditSink::File(path.clone()), &config, None).unwrap();
    let writer = tokio::spawn(task.run());
    for port in 1..=60 {
        handle.emit(denied(port));
        if port % 5 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    drop(handle);
    let summary = writer.await.unwrap().unwrap();
    assert_eq!(summary.next_sequence, 61);
    let files: Vec<PathBuf> = ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    assert!(files.iter().all(|f| f.exists()), "{files:?}");
    assert!(!dir.path().join("audit.jsonl.3").exists());
    // Checked after each batch the writer takes, so a file may pass the size a little.
    for f in &files[..2] {
        let len = fs::metadata(f).unwrap().len();
        assert!(len >= 4096, "{}: {len}", f.display());
    }
    let seqs: Vec<u64> = lines_of(&files).iter().map(sequence).collect();
    let first = seqs[0];
    assert!(first > 1, "the oldest file was removed");
    assert_eq!(seqs, (first..=60).collect::<Vec<_>>());
}

#[test]
fn audit_config_is_checked() {
    let parse = |y: &str| serde_yaml_ng::from_str::<AuditConfig>(y);
    let c = parse("{}").unwrap();
    assert_eq!(c.on_failure, OnFailure::RefuseCredentials);
    assert!(c.validate().is_ok());
    let c = parse("on_failure: continue\nrotate: {max_bytes: 1048576, keep: 5}").unwrap();
    assert_eq!(c.on_failure, OnFailure::Continue);
    assert_eq!(c.rotate.unwrap().keep, 5);
    assert!(parse("on_failure: ignore").is_err());
    assert!(
        parse("rotate: {max_bytes: 10}").is_err(),
        "keep is required"
    );
    let small = parse("rotate: {max_bytes: 10, keep: 1}").unwrap();
    assert!(small.validate().unwrap_err().contains("rotate.max_bytes"));
    let none = parse("rotate: {max_bytes: 5000, keep: 0}").unwrap();
    assert!(none.validate().unwrap_err().contains("rotate.keep"));
    assert!(parse("queue_records: 0").unwrap().validate().is_err());
}

#[test]
fn the_example_config_sections_parse() {
    let example: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(include_str!("../../config/egressd.example.yaml")).unwrap();
    let audit: AuditConfig = serde_yaml_ng::from_value(example["audit"].clone()).unwrap();
    assert_eq!(audit, AuditConfig::default());
    audit.validate().unwrap();
    let proxy: crate::proxy::ProxyConfig =
        serde_yaml_ng::from_value(example["proxy"].clone()).unwrap();
    assert_eq!(proxy, crate::proxy::ProxyConfig::default());
    // The commented rotation example is valid too.
    let rotate: AuditConfig =
        serde_yaml_ng::from_str("rotate: { max_bytes: 104857600, keep: 10 }").unwrap();
    rotate.validate().unwrap();
}

/// A record whose strings come from the sandbox (a long path, many query keys, long ref
/// names, a reason quoting them) is still one line of at most `PIPE_BUF` bytes, valid
/// against the schema, marked truncated, its identity fields and every list entry intact.
#[test]
fn oversized_records_are_shortened_to_one_pipe_write() {
    let validator = validator();
    let update = |i: usize| RefUpdate {
        ref_name: format!("refs/heads/agent/{}", "b".repeat(200 + i)),
        old: "1".repeat(40),
        new: "2".repeat(40),
        allowed: false,
    };
    let record = |updates: usize| ProxyRecord {
        path: Some(format!("/acme/{}/git-receive-pack", "é".repeat(5000))),
        query_keys: Some(
            (0..500)
                .map(|i| format!("key{i}="))
                .collect::<Vec<_>>()
                .join("&"),
        ),
        reason: Some(format!("git push refused: {}", "\u{1}quoted ".repeat(800))),
        git: Some(GitAudit {
            repo: "acme/widget".into(),
            service: "git-receive-pack".into(),
            ref_updates: (0..updates).map(update).collect(),
        }),
        ..proxy_git_push_refused()
    };
    let record_10 = record(10);
    let line = proxy_event(record_10.clone()).encode(77).unwrap();
    assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
    assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
    assert_eq!(line.last(), Some(&b'\n'));
    let value: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(violations(&validator, &value), Vec::<String>::new());
    assert_eq!(value["egress"]["truncated"], true);
    assert_eq!(value["event"]["sequence"], 77);
    assert_eq!(value["event"]["action"], "http-request");
    assert_eq!(
        value["egress"]["connection"]["id"],
        record_10.connection_id.as_str()
    );
    assert_eq!(
        value["egress"]["git"]["ref_updates"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    assert_eq!(
        value["egress"]["git"]["ref_updates"][3]["old"],
        "1".repeat(40)
    );
    let path = value["url"]["path"].as_str().unwrap();
    assert!(
        path.starts_with("/acme/éé") && path.ends_with('…'),
        "{path}"
    );
    assert!(value["event"]["reason"].as_str().unwrap().ends_with('…'));

    // Lists are never cut: a push of 200 long refs is written whole, longer, and marked.
    let line = proxy_event(record(200)).encode(78).unwrap();
    assert!(line.len() > MAX_LINE);
    let value: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(violations(&validator, &value), Vec::<String>::new());
    assert_eq!(value["egress"]["truncated"], true);
    assert_eq!(
        value["egress"]["git"]["ref_updates"]
            .as_array()
            .unwrap()
            .len(),
        200
    );

    // An ordinary record is untouched and carries no mark.
    let line = proxy_event(proxy_git_push_refused()).encode(79).unwrap();
    let value: Value = serde_json::from_slice(&line).unwrap();
    assert!(value["egress"].get("truncated").is_none());
    assert_eq!(value["url"]["path"], "/acme/widget.git/git-receive-pack");
}

/// Whatever field a secret reached (a ref name a sandbox chose, a reason quoting it), the
/// line written has it masked and is still a record of its kind.
#[tokio::test]
async fn a_secret_in_any_field_is_masked_before_the_record_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, task) =
        AuditLog::open_with(AuditSink::File(path.clone()), &AuditConfig::default(), None).unwrap();
    let secret = "Zq8rTq2Lw0pXv5Nc3Hs7";
    assert!(handle.redact_with(finds(secret)));
    let mut record = proxy_git_push_refused();
    record.reason = Some(format!(
        "git push refused: refs/heads/agent/{secret}: refused"
    ));
    if let Some(git) = record.git.as_mut() {
        git.ref_updates[1].ref_name = format!("refs/heads/agent/{secret}");
    }
    handle.emit(proxy_event(record));
    handle.emit(proxy_event(proxy_git_push_refused()));
    writer_done(handle, task).await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(secret), "{text}");
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["egress"]["git"]["ref_updates"][1]["ref_name"],
        "refs/heads/agent/[redacted]**********"
    );
    assert!(lines[0]["event"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("agent/[redacted]")));
    // The record without it is written as it was.
    assert_eq!(
        lines[1]["egress"]["git"]["ref_updates"][1]["ref_name"],
        "refs/heads/agent/x"
    );
}

async fn writer_done(handle: AuditHandle, task: AuditTask) {
    let writer = tokio::spawn(task.run());
    drop(handle);
    writer.await.unwrap().unwrap();
}

/// A record too long for one line is shortened by cutting its strings; a secret in them is
/// masked before the cut, so no piece of it (too short for the search to recognise)
/// survives.
#[tokio::test]
async fn a_secret_is_masked_before_a_long_record_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, task) =
        AuditLog::open_with(AuditSink::File(path.clone()), &AuditConfig::default(), None).unwrap();
    let secret = "Zq8rTq2Lw0pXv5Nc3Hs7";
    handle.redact_with(finds(secret));
    let mut record = proxy_git_push_refused();
    if let Some(git) = record.git.as_mut() {
        let template = git.ref_updates[0].clone();
        git.ref_updates = (0..80)
            .map(|k| RefUpdate {
                ref_name: format!("refs/heads/agent/{}{secret}", "x".repeat(k)),
                ..template.clone()
            })
            .collect();
    }
    handle.emit(proxy_event(record));
    writer_done(handle, task).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["egress"]["truncated"], true, "{text}");
    assert!(!text.contains(&secret[..12]), "{text}");
    assert!(text.contains("[redacted]"), "{text}");
}

/// A search for secrets that finds `secret` wherever it occurs.
fn finds(secret: &'static str) -> crate::audit::FindSecrets {
    std::sync::Arc::new(move |line: &[u8]| {
        line.windows(secret.len())
            .enumerate()
            .filter(|(_, w)| *w == secret.as_bytes())
            .map(|(i, _)| i..i + secret.len())
            .collect()
    })
}

/// Writes reach only the page cache; a disk that could not store them says so only to the
/// next sync. That failure is not passed over: the records written since the last sync
/// are reported in an `audit-lost` record with their range, the trail counts them, and it
/// is unhealthy until a sync succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_reports_the_records_it_may_have_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, mut task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    task.fail_next_sync(std::io::ErrorKind::Other);
    let writer = tokio::spawn(task.run());
    // Past the first sync's time (200 ms in tests), so this batch is synced after it is
    // written.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    handle.emit_all(vec![denied(1), denied(2)]);
    eventually("loss reported", || {
        fs::read_to_string(&path).is_ok_and(|t| t.lines().count() == 3)
    })
    .await;
    let health = handle.health();
    assert_eq!((health.lost, health.write_errors), (2, 1), "{health:?}");
    // Unhealthy (credentials refused by default) until a sync succeeds.
    assert!(!health.healthy, "{health:?}");
    assert!(health
        .error
        .as_deref()
        .is_some_and(|e| e.contains("fdatasync")));
    // Later records are written and synced as usual, and the trail is healthy again.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    handle.emit(denied(3));
    eventually("healthy again", || handle.healthy()).await;
    drop(handle);
    writer.await.unwrap().unwrap();
    let lines = read_lines(&path);
    let seqs: Vec<u64> = lines.iter().map(sequence).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let lost = &lines[2];
    assert_eq!(lost["event"]["action"], "audit-lost", "{lost}");
    assert_eq!(lost["egress"]["audit_lost"]["first_sequence"], 1, "{lost}");
    assert_eq!(lost["egress"]["audit_lost"]["last_sequence"], 2, "{lost}");
    assert!(lost.to_string().contains("fdatasync"), "{lost}");
}

/// A write may reach the page cache while `fdatasync` hangs (an NFS server gone, a
/// suspended device): the trail is unhealthy once the sync has been blocked past
/// WRITE_STALL, as for a blocked write, and healthy again once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_blocked_by_a_hung_file_system_makes_the_trail_unhealthy() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, mut task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    task.stall_next_sync(Duration::from_secs(2));
    let writer = tokio::spawn(task.run());
    // Past the first sync's time (200 ms in tests), so this batch is synced after it is
    // written, and that sync hangs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.emit(denied(1));
    eventually("written", || {
        fs::read_to_string(&path).is_ok_and(|t| t.lines().count() == 1)
    })
    .await;
    let started = std::time::Instant::now();
    while handle.healthy() && started.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = handle.health();
    assert!(!health.healthy, "healthy behind a hung sync: {health:?}");
    assert!(
        health
            .error
            .as_deref()
            .is_some_and(|e| e.contains("blocked")),
        "{health:?}"
    );
    eventually("healthy again", || handle.healthy()).await;
    drop(handle);
    writer.await.unwrap().unwrap();
}

/// logrotate's `copytruncate`: the log is copied, records are appended meanwhile, then it
/// is emptied. The writer notices at its next append and writes the last seconds' records
/// again, followed by an `audit-rewritten` record: the copy and the log together hold
/// every record, and each number found twice is the same record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_truncated_in_place_gets_its_last_records_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    let writer = tokio::spawn(task.run());
    let written = |n: usize| {
        let path = path.clone();
        move || fs::read_to_string(&path).is_ok_and(|t| t.lines().count() >= n)
    };
    handle.emit_all((1..=5).map(denied).collect());
    eventually("five records", written(5)).await;
    let copy = fs::read(&path).unwrap();
    // Between the copy and the truncation: in neither file unless written again.
    handle.emit_all((6..=8).map(denied).collect());
    eventually("eight records", written(8)).await;
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    handle.emit(denied(9));
    drop(handle);
    writer.await.unwrap().unwrap();

    let copied: Vec<Value> = copy
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let after = read_lines(&path);
    let notice = after
        .iter()
        .find(|l| l["event"]["action"] == "audit-rewritten");
    assert!(notice.is_some(), "no audit-rewritten record: {after:?}");
    let notice = notice.unwrap();
    let rewritten = &notice["egress"]["audit_rewritten"];
    assert_eq!(rewritten["first_sequence"], 1, "{notice}");
    assert_eq!(rewritten["last_sequence"], 8, "{notice}");
    assert_eq!(rewritten["count"], 8, "{notice}");
    assert_eq!(rewritten["complete"], true, "{notice}");
    assert!(
        notice["event"]["reason"]
            .as_str()
            .unwrap()
            .contains("truncated in place"),
        "{notice}"
    );
    // Every record is in the copy or the log; a number in both is the same record.
    let mut by_number: std::collections::BTreeMap<u64, Value> = Default::default();
    for line in copied.iter().chain(&after) {
        if let Some(seen) = by_number.insert(sequence(line), line.clone()) {
            assert_eq!(&seen, line, "two records numbered {}", sequence(line));
        }
    }
    let ports: Vec<u64> = by_number
        .values()
        .filter_map(|l| l["destination"]["port"].as_u64())
        .collect();
    assert_eq!(ports, (1..=9).collect::<Vec<_>>());
    // The log itself is in order: the records again, what followed, then the notice.
    let order: Vec<u64> = after.iter().map(sequence).collect();
    assert!(order.windows(2).all(|w| w[1] > w[0]), "{order:?}");
}

/// The same with logrotate's `postrotate` `SIGHUP` (a reopen) between the truncation and
/// the next append, and a truncation by hand to a size mid-line: the reopen finds the
/// truncation, and the records written again start on a line of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncation_found_by_a_reopen_or_mid_line_is_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (handle, task) = AuditLog::open(AuditSink::File(path.clone())).unwrap();
    let writer = tokio::spawn(task.run());
    let lines_at_least = |n: usize| {
        let path = path.clone();
        move || fs::read_to_string(&path).is_ok_and(|t| t.lines().count() >= n)
    };
    let truncate_to = |len: u64| {
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len)
            .unwrap();
    };
    handle.emit_all((1..=4).map(denied).collect());
    eventually("four records", lines_at_least(4)).await;
    truncate_to(0);
    handle.reopen();
    handle.emit(denied(5));
    eventually("rewritten", lines_at_least(6)).await;
    let after = read_lines(&path);
    let actions: Vec<&str> = after
        .iter()
        .map(|l| l["event"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "connect",
            "connect",
            "connect",
            "connect",
            "connect",
            "audit-rewritten"
        ],
        "{after:#?}"
    );
    assert_eq!(after[5]["egress"]["audit_rewritten"]["first_sequence"], 1);
    assert_eq!(after[5]["egress"]["audit_rewritten"]["last_sequence"], 4);

    // Cut by hand in the middle of the first line.
    truncate_to(10);
    handle.emit(denied(6));
    drop(handle);
    writer.await.unwrap().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let fragment = lines.next().unwrap();
    assert_eq!(fragment.len(), 10, "{text}");
    let rest: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    let notice = rest
        .iter()
        .find(|l| l["event"]["action"] == "audit-rewritten");
    assert!(notice.is_some(), "{text}");
    let ports: Vec<u64> = rest
        .iter()
        .filter_map(|l| l["destination"]["port"].as_u64())
        .collect();
    // Everything written in the window again (the first rewrite included), then 6.
    assert_eq!(ports, [1, 2, 3, 4, 5, 6], "{text}");
}
