//! The resolver end to end on loopback, without privileges: real UDP and TCP listeners,
//! a fake upstream resolver built with hickory-proto, a policy parsed from YAML, and
//! `learn`/`audit` closures that write down what they were given and when.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA, CNAME, TXT},
        Name, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::*;
use crate::policy::parse_str;

/// Upstream timeout in these tests: short, since some tests wait for it on purpose.
const TIMEOUT: Duration = Duration::from_millis(300);
/// How long `learn` takes: long enough that an answer released before it returned would
/// reach the client first.
const LEARN_DELAY: Duration = Duration::from_millis(150);

/// A fully qualified name, as names are on the wire.
fn name(text: &str) -> Name {
    let mut n = Name::from_ascii(text).unwrap();
    n.set_fqdn(true);
    n
}

/// The fake upstream's answer to `query`, or `None` to stay silent. `tcp` says how it was
/// asked: `big.github.example` answers UDP with TC set and TCP in full.
fn fake_answer(query: &Message, tcp: bool) -> Option<Message> {
    let q = query.queries.first()?.clone();
    let qname = q.name.to_ascii().to_ascii_lowercase();
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.recursion_available = true;
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.add_query(q.clone());
    let a = |n: &str, ip: [u8; 4], ttl: u32| {
        Record::from_rdata(name(n), ttl, RData::A(A(Ipv4Addr::from(ip))))
    };
    let cname =
        |from: &str, to: &str| Record::from_rdata(name(from), 300, RData::CNAME(CNAME(name(to))));
    match (qname.as_str(), q.query_type) {
        ("api.github.example.", RecordType::A) => {
            resp.add_answer(a("api.github.example.", [192, 0, 2, 10], 60));
            resp.add_answer(a("api.github.example.", [192, 0, 2, 11], 30));
            // Not on the chain from the question: passed on, never learned.
            resp.add_answer(a("unrelated.example.", [203, 0, 113, 9], 60));
        }
        ("api.github.example.", RecordType::AAAA) => {
            resp.add_answer(Record::from_rdata(
                q.name.clone(),
                120,
                RData::AAAA(AAAA("2001:db8::10".parse::<Ipv6Addr>().unwrap())),
            ));
        }
        ("api.github.example.", RecordType::TXT) => {
            resp.add_answer(Record::from_rdata(
                q.name.clone(),
                60,
                RData::TXT(TXT::new(vec!["v=hello".into()])),
            ));
        }
        ("www.github.example.", RecordType::A) => {
            resp.add_answer(cname("www.github.example.", "edge.github.example."));
            resp.add_answer(a("edge.github.example.", [192, 0, 2, 20], 45));
        }
        ("edge.github.example.", RecordType::A) => {
            resp.add_answer(a("edge.github.example.", [192, 0, 2, 20], 45));
        }
        ("alias.github.example.", RecordType::A) => {
            resp.add_answer(cname("alias.github.example.", "tracker.evil.example."));
            resp.add_answer(a("tracker.evil.example.", [198, 51, 100, 66], 60));
        }
        ("loop.github.example.", RecordType::A) => {
            resp.add_answer(a("loop.github.example.", [127, 0, 0, 1], 60));
        }
        ("slow.github.example.", _) => return None,
        ("big.github.example.", RecordType::A) => {
            if tcp {
                for i in 1..=100u8 {
                    resp.add_answer(a("big.github.example.", [192, 0, 2, i], 60));
                }
            } else {
                resp.metadata.truncation = true;
            }
        }
        _ => resp.metadata.response_code = ResponseCode::NXDomain,
    }
    Some(resp)
}

/// A fake upstream resolver on 127.0.0.1, UDP and TCP on the same port.
struct Fake {
    addr: SocketAddr,
    /// (`udp` or `tcp`, lower-case name with its trailing dot) of every query seen.
    seen: Arc<Mutex<Vec<(&'static str, String)>>>,
    /// Every query as it arrived.
    messages: Arc<Mutex<Vec<Message>>>,
}

impl Fake {
    async fn start() -> Self {
        // The UDP port the kernel picks may be taken for TCP (by another test's
        // connection, say): try again with another.
        let mut tries = 0;
        let (udp, addr, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            let bound = TcpListener::bind(addr).await;
            if tries < 20
                && bound
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
            {
                tries += 1;
                continue;
            }
            break (udp, addr, bound.unwrap());
        };
        let seen: Arc<Mutex<Vec<(&'static str, String)>>> = Arc::default();
        let messages: Arc<Mutex<Vec<Message>>> = Arc::default();
        let (log, raw) = (seen.clone(), messages.clone());
        let note = move |transport: &'static str, m: &Message| {
            if let Some(q) = m.queries.first() {
                let n = q.name.to_ascii().to_ascii_lowercase();
                log.lock().unwrap().push((transport, n));
            }
            raw.lock().unwrap().push(m.clone());
        };
        let note_tcp = note.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (len, peer) = udp.recv_from(&mut buf).await.unwrap();
                let query = Message::from_vec(&buf[..len]).unwrap();
                note("udp", &query);
                if let Some(resp) = fake_answer(&query, false) {
                    udp.send_to(&resp.to_vec().unwrap(), peer).await.unwrap();
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                let note = note_tcp.clone();
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    stream.read_exact(&mut len).await.unwrap();
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    stream.read_exact(&mut buf).await.unwrap();
                    let query = Message::from_vec(&buf).unwrap();
                    note("tcp", &query);
                    if let Some(resp) = fake_answer(&query, true) {
                        let bytes = resp.to_vec().unwrap();
                        let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
                        stream.write_all(&len).await.unwrap();
                        stream.write_all(&bytes).await.unwrap();
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            messages,
        }
    }

    fn seen(&self) -> Vec<(&'static str, String)> {
        self.seen.lock().unwrap().clone()
    }
}

fn policy_yaml(upstream: &[SocketAddr]) -> String {
    policy_with(upstream, "  query_types: [TXT]\n", "")
}

/// The tests' policy with more `dns:` keys (`dns_extra`, indented) and more rules
/// (`rules_extra`, first in the list).
fn policy_with(upstream: &[SocketAddr], dns_extra: &str, rules_extra: &str) -> String {
    let upstream: Vec<String> = upstream.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "\
version: 1
dns:
  upstream: [{}]
{dns_extra}rules:
{rules_extra}
  - name: no-secrets
    to: [secret.github.example]
    action: deny
  - name: github
    to: [\"**.github.example\"]
    ports: [443]
    action: allow
  - name: github-any
    to: [api.github.example]
    action: allow
",
        upstream.join(", ")
    )
}

/// A resolver on loopback with a policy whose upstreams are `upstream`.
struct Harness {
    ctx: Arc<ResolverCtx>,
    udp: SocketAddr,
    tcp: SocketAddr,
    /// The UDP and TCP listeners' tasks, as the daemon holds them to stop the resolver.
    listeners: Vec<tokio::task::AbortHandle>,
    learned: Arc<Mutex<Vec<Learned>>>,
    /// `learn` and test-client events, in the order they happened.
    order: Arc<Mutex<Vec<&'static str>>>,
    records: Arc<Mutex<Vec<DnsRecord>>>,
    alerts: Arc<Mutex<Vec<Alert>>>,
    /// Refusals the resolver reported for a denial burst.
    denials: Arc<std::sync::atomic::AtomicU64>,
}

impl Harness {
    async fn start(upstream: &[SocketAddr], learn_fails: bool) -> Self {
        Self::start_with(&policy_yaml(upstream), learn_fails).await
    }

    async fn start_with(policy: &str, learn_fails: bool) -> Self {
        let policy = parse_str(policy, "dns-test.yaml").unwrap();
        let learned: Arc<Mutex<Vec<Learned>>> = Arc::default();
        let order: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let records: Arc<Mutex<Vec<DnsRecord>>> = Arc::default();
        let alerts: Arc<Mutex<Vec<Alert>>> = Arc::default();
        let denials: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let (l, o, r, a) = (
            learned.clone(),
            order.clone(),
            records.clone(),
            alerts.clone(),
        );
        let ctx = Arc::new(ResolverCtx {
            sandbox: "agent-1".into(),
            policy: Arc::new(RwLock::new(Arc::new(policy))),
            default_upstream: Vec::new(),
            dialer: Arc::new(Dialer::default()),
            learn: Arc::new(move |entries: &[Learned]| {
                std::thread::sleep(LEARN_DELAY);
                o.lock().unwrap().push("learn");
                l.lock().unwrap().extend_from_slice(entries);
                if learn_fails {
                    Err("map full".into())
                } else {
                    // The daemon refuses special addresses it is handed.
                    Ok(entries
                        .iter()
                        .filter(|e| crate::net::special_address(e.addr).is_some())
                        .map(|e| (e.addr, "a special address".to_owned()))
                        .collect())
                }
            }),
            audit: Arc::new(move |record| r.lock().unwrap().push(record)),
            denied: {
                let d = denials.clone();
                Arc::new(move || {
                    d.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })
            },
            alert: Arc::new(move |alert| a.lock().unwrap().push(alert)),
            budget: Arc::default(),
            timeout: TIMEOUT,
            max_label: DEFAULT_MAX_LABEL,
            quarantined: Arc::default(),
        });
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let limits = ResolverLimits::new(&ctx);
        let listeners = vec![
            tokio::spawn(serve_udp(udp, ctx.clone(), limits.clone())).abort_handle(),
            tokio::spawn(serve_tcp(tcp, ctx.clone(), limits)).abort_handle(),
        ];
        Self {
            ctx,
            listeners,
            udp: udp_addr,
            tcp: tcp_addr,
            learned,
            order,
            records,
            alerts,
            denials,
        }
    }

    fn query(qname: &Name, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(qname.clone(), qtype));
        m
    }

    /// Asks over UDP and checks the answer carries our id and question.
    async fn udp(&self, qname: &str, qtype: RecordType) -> Message {
        self.udp_name(&name(qname), qtype).await
    }

    async fn udp_name(&self, qname: &Name, qtype: RecordType) -> Message {
        let query = Self::query(qname, qtype);
        let reply = self.udp_raw(&query.to_vec().unwrap()).await.unwrap();
        self.order.lock().unwrap().push("answer");
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, query.metadata.id);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.queries, query.queries);
        reply
    }

    /// Sends raw bytes over UDP; `None` when nothing comes back within 2 s.
    async fn udp_raw(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(self.udp).await.unwrap();
        sock.send(bytes).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let len = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(buf[..len].to_vec())
    }

    /// Asks several questions on one TCP connection.
    async fn tcp(&self, questions: &[(&str, RecordType)]) -> Vec<Message> {
        let mut stream = TcpStream::connect(self.tcp).await.unwrap();
        let mut out = Vec::new();
        for (qname, qtype) in questions {
            let query = Self::query(&name(qname), *qtype);
            let bytes = query.to_vec().unwrap();
            let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
            stream.write_all(&len).await.unwrap();
            stream.write_all(&bytes).await.unwrap();
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.unwrap();
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf).await.unwrap();
            let reply = Message::from_vec(&buf).unwrap();
            assert_eq!(reply.metadata.id, query.metadata.id);
            assert_eq!(reply.queries, query.queries);
            out.push(reply);
        }
        out
    }

    fn records(&self) -> Vec<DnsRecord> {
        self.records.lock().unwrap().clone()
    }

    /// The one record so far; fails if there are more or fewer.
    fn only_record(&self) -> DnsRecord {
        let records = self.records();
        assert_eq!(records.len(), 1, "{records:#?}");
        records.into_iter().next().unwrap()
    }

    /// Waits for a record that is emitted without an answer.
    async fn wait_record(&self) -> DnsRecord {
        for _ in 0..200 {
            if let Some(r) = self.records().first() {
                return r.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        unreachable!("no record emitted")
    }
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_name_is_learned_before_the_answer_is_released() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let reply = h.udp("API.GitHub.example.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    // The address off the chain from the question is neither learned nor released.
    assert_eq!(addrs(&reply), [ip("192.0.2.10"), ip("192.0.2.11")]);
    assert_eq!(*h.order.lock().unwrap(), ["learn", "answer"]);
    // Only the chain's addresses, with the name's rules in policy order and their TTLs.
    let learned = h.learned.lock().unwrap().clone();
    assert_eq!(
        learned,
        [
            Learned {
                name: "api.github.example".into(),
                addr: ip("192.0.2.10"),
                rule_ids: vec![2, 3],
                ttl: 60,
            },
            Learned {
                name: "api.github.example".into(),
                addr: ip("192.0.2.11"),
                rule_ids: vec![2, 3],
                ttl: 30,
            },
        ]
    );
    assert_eq!(fake.seen(), [("udp", "api.github.example.".to_owned())]);
    let r = h.only_record();
    assert_eq!(r.sandbox, "agent-1");
    assert_eq!(r.question_name, "api.github.example");
    assert_eq!(r.question_type, "A");
    assert_eq!(r.response_code, "NOERROR");
    assert_eq!(r.resolved_ip, [ip("192.0.2.10"), ip("192.0.2.11")]);
    assert_eq!(r.refused.len(), 1, "{r:?}");
    assert_eq!(r.refused[0].ip, ip("203.0.113.9"));
    assert_eq!(r.verdict, DnsVerdict::Allow);
    assert_eq!(r.rule.as_deref(), Some("github"));
    assert_eq!(r.upstream, Some(fake.addr));
    // The record encodes and matches the audit schema's shape.
    crate::audit::Record::from(r).encode(1).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaaa_and_cname_chains_within_the_policy_are_learned() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let reply = h.udp("api.github.example", RecordType::AAAA).await;
    assert_eq!(addrs(&reply), [ip("2001:db8::10")]);
    let reply = h.udp("www.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&reply), [ip("192.0.2.20")]);
    let learned = h.learned.lock().unwrap().clone();
    assert_eq!(learned.len(), 2, "{learned:?}");
    assert_eq!(
        learned[1],
        Learned {
            // The rules are those of the name asked, not of the CNAME target.
            name: "www.github.example".into(),
            addr: ip("192.0.2.20"),
            rule_ids: vec![2],
            ttl: 45,
        }
    );
    assert_eq!(h.records()[1].resolved_ip, [ip("192.0.2.20")]);
}

/// A CNAME must not lend a proxied target's addresses to a name allowed straight out:
/// `www` is allowed straight out, but its target `edge` only through the proxy. Learned
/// under `www`'s rule, `edge`'s addresses would be reached directly, past the proxy's
/// checks: the answer is withheld and recorded. The other way round is no bypass, and
/// with the same way on both sides (the base policy) the chain is learned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cname_to_a_name_sent_another_way_is_withheld() {
    let fake = Fake::start().await;
    let h = Harness::start_with(
        &policy_with(
            &[fake.addr],
            "",
            "  - name: edge-proxied\n    to: [edge.github.example]\n    ports: [443]\n    action: proxy\n",
        ),
        false,
    )
    .await;
    let reply = h.udp("www.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(addrs(&reply).is_empty());
    assert!(h.learned.lock().unwrap().is_empty());
    let r = &h.records()[0];
    assert_eq!(r.verdict, DnsVerdict::Deny, "{r:?}");
    let why = r.reason.as_deref().unwrap_or("");
    assert!(
        why.contains("edge.github.example") && why.contains("edge-proxied"),
        "{r:?}"
    );
    // The proxied name itself still resolves, under its own rule.
    let reply = h.udp("edge.github.example", RecordType::A).await;
    assert_eq!(addrs(&reply), [ip("192.0.2.20")]);

    // The other way round is no bypass: a name served through the proxy (ahead of the
    // wildcard `allow` that matches it too) whose CNAME target is allowed straight out
    // gets its answer, under its own rules.
    let fake = Fake::start().await;
    let h = Harness::start_with(
        &policy_with(
            &[fake.addr],
            "",
            "  - name: www-proxied\n    to: [www.github.example]\n    ports: [443]\n    action: proxy\n",
        ),
        false,
    )
    .await;
    let reply = h.udp("www.github.example", RecordType::A).await;
    assert_eq!(addrs(&reply), [ip("192.0.2.20")], "{:?}", h.records());
    let learned = h.learned.lock().unwrap().clone();
    assert_eq!(learned.len(), 1, "{learned:?}");
    assert_eq!(learned[0].rule_ids.first(), Some(&1), "{learned:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_not_allowed_is_nxdomain_without_asking_upstream() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    for qname in [
        "exfil.evil.example",
        "github.example",
        "api.github.example.evil.example",
    ] {
        let reply = h.udp(qname, RecordType::A).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NXDomain,
            "{qname}"
        );
        assert!(reply.metadata.authoritative);
        assert!(reply.answers.is_empty());
    }
    assert!(fake.seen().is_empty(), "{:?}", fake.seen());
    assert!(h.learned.lock().unwrap().is_empty());
    let records = h.records();
    assert_eq!(records.len(), 3);
    let r = &records[0];
    assert_eq!(r.question_name, "exfil.evil.example");
    assert_eq!(r.response_code, "NXDOMAIN");
    assert_eq!(r.verdict, DnsVerdict::Deny);
    assert_eq!(
        r.reason.as_deref(),
        Some("name is not allowed by the policy")
    );
    assert_eq!(r.rule, None);
    assert_eq!(r.upstream, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_denied_by_a_rule_names_the_rule() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let reply = h.udp("secret.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(fake.seen().is_empty());
    let r = h.only_record();
    assert_eq!(r.verdict, DnsVerdict::Deny);
    assert_eq!(r.rule.as_deref(), Some("no-secrets"));
    assert_eq!(
        r.reason.as_deref(),
        Some("name is denied by rule `no-secrets`")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cname_to_a_name_not_allowed_is_nxdomain() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let reply = h.udp("alias.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(reply.answers.is_empty());
    assert!(h.learned.lock().unwrap().is_empty());
    let r = h.only_record();
    assert_eq!(r.verdict, DnsVerdict::Deny);
    assert_eq!(r.response_code, "NXDOMAIN");
    assert!(r.resolved_ip.is_empty());
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("tracker.evil.example"),
        "{r:?}"
    );
    assert_eq!(r.upstream, Some(fake.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_labels_and_odd_characters_are_refused() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    // 41 characters: over the exfiltration guard, although the policy allows the name.
    let long = format!("{}.github.example", "a".repeat(DEFAULT_MAX_LABEL + 1));
    let reply = h.udp(&long, RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    let r = h.only_record();
    assert_eq!(r.verdict, DnsVerdict::Deny);
    assert_eq!(r.response_code, "REFUSED");
    assert_eq!(r.question_name, long);
    assert!(
        r.reason.as_deref().unwrap().contains("41 characters"),
        "{r:?}"
    );
    // A label holding a dot would read as a name under github.example.
    let mut dotted = Name::from_labels([&b"x.api"[..], b"github", b"example"]).unwrap();
    dotted.set_fqdn(true);
    let reply = h.udp_name(&dotted, RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert!(fake.seen().is_empty(), "{:?}", fake.seen());
    // 40 characters passes the guard and is asked upstream (which knows no such name).
    let ok = format!("{}.github.example", "b".repeat(DEFAULT_MAX_LABEL));
    let reply = h.udp(&ok, RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(fake.seen().len(), 1);
    let r = h.records().pop().unwrap();
    assert_eq!(r.verdict, DnsVerdict::Allow);
    assert_eq!(r.response_code, "NXDOMAIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_queries_work_and_share_a_connection() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let replies = h
        .tcp(&[
            ("api.github.example", RecordType::A),
            ("exfil.evil.example", RecordType::A),
        ])
        .await;
    assert_eq!(
        addrs(&replies[0])[..2],
        [ip("192.0.2.10"), ip("192.0.2.11")]
    );
    assert_eq!(replies[1].metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(h.learned.lock().unwrap().len(), 2);
    let records = h.records();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].verdict, DnsVerdict::Allow);
    assert_eq!(records[1].verdict, DnsVerdict::Deny);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_answer_is_asked_again_over_tcp() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    // Over TCP the client gets the first 32 of 100 addresses, learned first; the record
    // counts the rest and lists a few (one line a shipper takes whole).
    let replies = h.tcp(&[("big.github.example", RecordType::A)]).await;
    assert_eq!(addrs(&replies[0]).len(), MAX_LEARNED_PER_ANSWER);
    let r = h.records().remove(0);
    assert_eq!(r.resolved_ip.len(), MAX_LEARNED_PER_ANSWER);
    assert_eq!(r.refused.len(), MAX_REFUSED_RECORDED);
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|m| m.starts_with("68 answer address(es) refused")),
        "{r:?}"
    );
    assert_eq!(
        fake.seen(),
        [
            ("udp", "big.github.example.".to_owned()),
            ("tcp", "big.github.example.".to_owned())
        ]
    );
    assert_eq!(h.learned.lock().unwrap().len(), MAX_LEARNED_PER_ANSWER);
    // Over UDP without EDNS the same answer does not fit 512 bytes: sent truncated.
    let reply = h.udp("big.github.example", RecordType::A).await;
    assert!(reply.metadata.truncation);
    assert!(reply.answers.is_empty());
    assert_eq!(h.records()[1].response_code, "NOERROR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_is_servfail_and_the_next_upstream_is_tried() {
    let fake = Fake::start().await;
    // A server that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let h = Harness::start(&[silent_addr, fake.addr], false).await;

    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(h.records()[0].upstream, Some(fake.addr));

    let reply = h.udp("slow.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    let r = h.records().pop().unwrap();
    assert_eq!(r.response_code, "SERVFAIL");
    assert_eq!(r.verdict, DnsVerdict::Allow);
    assert_eq!(r.upstream, Some(fake.addr));
    let reason = r.reason.unwrap();
    assert!(reason.contains("2 upstream servers failed"), "{reason}");
    assert!(reason.contains("no answer within 300 ms"), "{reason}");
    drop(silent);
}

/// A query already sent upstream when the resolver stops (a detach) still leaves its
/// record: its name left the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_in_flight_when_the_resolver_stops_is_recorded() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let h = Harness::start(&[silent.local_addr().unwrap()], false).await;
    let query = Harness::query(&name("exfil-1234.github.example"), RecordType::A);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&query.to_vec().unwrap(), h.udp)
        .await
        .unwrap();
    // The upstream has it; the resolver stops before any answer.
    let mut buf = [0u8; 512];
    tokio::time::timeout(Duration::from_secs(2), silent.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(h.records().is_empty(), "{:#?}", h.records());
    for listener in &h.listeners {
        listener.abort();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let records = h.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r.question_name, "exfil-1234.github.example");
    assert_eq!(r.verdict, DnsVerdict::Allow);
    assert_eq!(r.response_code, "SERVFAIL");
    let reason = r.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("resolver stopped before the upstream answered"),
        "{reason}"
    );
}

/// A sandbox quarantined while its query waits on a silent server asks no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_stops_a_query_going_on_to_the_next_server() {
    let fake = Fake::start().await;
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let h = Harness::start(&[silent.local_addr().unwrap(), fake.addr], false).await;
    let query = Harness::query(&name("api.github.example"), RecordType::A);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(h.udp).await.unwrap();
    client.send(&query.to_vec().unwrap()).await.unwrap();
    let mut buf = [0u8; 512];
    tokio::time::timeout(Duration::from_secs(2), silent.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    h.ctx.quarantined.store(true, Ordering::Release);
    let mut reply = vec![0u8; 4096];
    let len = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let reply = Message::from_vec(&reply[..len]).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(
        fake.seen.lock().unwrap().is_empty(),
        "the next server was asked"
    );
    let r = h.records().pop().unwrap();
    let reason = r.reason.unwrap_or_default();
    assert!(reason.contains("quarantined meanwhile"), "{reason}");
}

/// A DNS-over-TCP query begun and never finished is refused (nothing sent upstream) and
/// recorded once the connection has been quiet for the idle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_query_never_finished_is_recorded() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let mut stream = TcpStream::connect(h.tcp).await.unwrap();
    // 40 bytes announced, 5 sent.
    stream.write_all(&[0, 40, 1, 2, 3, 4, 5]).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    let r = h.only_record();
    assert_eq!(r.verdict, DnsVerdict::Deny);
    let reason = r.reason.unwrap_or_default();
    assert!(
        reason.contains("announced 40 bytes and did not send them all"),
        "{reason}"
    );
    assert!(fake.seen.lock().unwrap().is_empty());
}

/// A sandbox quarantined while the upstream answers gets nothing of the answer, even one
/// that teaches no address (a no-such-name here: data in all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_while_the_answer_comes_delivers_none_of_it() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let h = Harness::start(&[upstream.local_addr().unwrap()], false).await;
    let query = Harness::query(&name("api.github.example"), RecordType::A);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(h.udp).await.unwrap();
    client.send(&query.to_vec().unwrap()).await.unwrap();
    let mut buf = [0u8; 512];
    let (len, from) = tokio::time::timeout(Duration::from_secs(2), upstream.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    h.ctx.quarantined.store(true, Ordering::Release);
    let mut answer = Message::from_vec(&buf[..len]).unwrap();
    answer.metadata.message_type = MessageType::Response;
    answer.metadata.response_code = ResponseCode::NXDomain;
    upstream
        .send_to(&answer.to_vec().unwrap(), from)
        .await
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let len = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let reply = Message::from_vec(&reply[..len]).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    let r = h.records().pop().unwrap();
    assert_eq!(r.verdict, DnsVerdict::Deny);
    let reason = r.reason.unwrap_or_default();
    assert!(
        reason.contains("quarantined while the answer came"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learn_error_is_servfail() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], true).await;
    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(reply.answers.is_empty());
    let r = h.only_record();
    assert_eq!(r.response_code, "SERVFAIL");
    assert!(r.resolved_ip.is_empty());
    assert!(r.reason.as_deref().unwrap().contains("map full"), "{r:?}");
    // egressd's own refusal (a cap, a quarantine), not the upstream's failure.
    assert_eq!(r.verdict, DnsVerdict::Deny);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_types_are_forwarded_but_learn_nothing() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let reply = h.udp("api.github.example", RecordType::TXT).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(reply.answers.len(), 1);
    assert!(h.learned.lock().unwrap().is_empty());
    let r = h.only_record();
    assert_eq!(r.question_type, "TXT");
    assert_eq!(r.verdict, DnsVerdict::Allow);
    assert!(r.resolved_ip.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_get_formerr_or_nothing() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    // A header promising one question that is not there.
    let header = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let reply = Message::from_vec(&h.udp_raw(&header).await.unwrap()).unwrap();
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    let r = h.only_record();
    assert_eq!(r.response_code, "FORMERR");
    assert_eq!(r.verdict, DnsVerdict::Deny);
    assert!(r.question_name.is_empty());
    h.records.lock().unwrap().clear();

    // Too short for a header: no answer, still a record.
    assert_eq!(h.udp_raw(&[1, 2, 3]).await, None);
    let r = h.wait_record().await;
    assert_eq!(r.response_code, "FORMERR");
    h.records.lock().unwrap().clear();

    // Two questions.
    let mut two = Harness::query(&name("api.github.example"), RecordType::A);
    two.add_query(Query::query(name("www.github.example"), RecordType::A));
    let reply = Message::from_vec(&h.udp_raw(&two.to_vec().unwrap()).await.unwrap()).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert!(fake.seen().is_empty());
    assert_eq!(h.only_record().response_code, "FORMERR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_swap_applies_to_the_next_query() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let stricter = parse_str(
        &format!(
            "version: 1\ndns:\n  upstream: [\"{}\"]\nrules:\n  - {{name: other, to: [other.example], action: allow}}\n",
            fake.addr
        ),
        "swap.yaml",
    )
    .unwrap();
    *h.ctx.policy.write().unwrap() = Arc::new(stricter);
    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(fake.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_sandbox_is_refused_without_asking_upstream() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    h.ctx
        .quarantined
        .store(true, std::sync::atomic::Ordering::Release);
    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert!(reply.answers.is_empty());
    let replies = h.tcp(&[("api.github.example", RecordType::AAAA)]).await;
    assert_eq!(replies[0].metadata.response_code, ResponseCode::Refused);
    assert!(fake.seen().is_empty(), "{:?}", fake.seen());
    assert!(h.learned.lock().unwrap().is_empty());
    let records = h.records();
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(r.response_code, "REFUSED");
        assert_eq!(r.verdict, DnsVerdict::Deny);
        assert_eq!(r.reason.as_deref(), Some("the sandbox is quarantined"));
        assert_eq!(r.question_name, "api.github.example");
    }
    // Released: answered again.
    h.ctx
        .quarantined
        .store(false, std::sync::atomic::Ordering::Release);
    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_types_zone_transfers_and_any_are_refused_without_upstream() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    for qtype in [
        RecordType::MX,
        RecordType::HTTPS,
        RecordType::NULL,
        RecordType::ANY,
        RecordType::AXFR,
        RecordType::IXFR,
        RecordType::Unknown(65280),
    ] {
        let reply = h.udp("api.github.example", qtype).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::Refused,
            "{qtype}"
        );
        assert!(reply.answers.is_empty());
    }
    // Over TCP too.
    let replies = h.tcp(&[("api.github.example", RecordType::AXFR)]).await;
    assert_eq!(replies[0].metadata.response_code, ResponseCode::Refused);
    assert!(fake.seen().is_empty(), "{:?}", fake.seen());
    let records = h.records();
    assert_eq!(records.len(), 8);
    for r in &records {
        assert_eq!(r.verdict, DnsVerdict::Deny, "{r:?}");
        assert_eq!(r.response_code, "REFUSED");
        assert!(
            r.reason.as_deref().unwrap().contains("is not answered"),
            "{r:?}"
        );
    }
    assert_eq!(records[0].question_type, "MX");
    assert_eq!(records[6].question_type, "TYPE65280");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_queries_are_rebuilt_canonically() {
    use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    // Mixed case, CD and AD set, opcode bits and EDNS with DO and two options.
    let mut query = Harness::query(&name("aPi.GiThUb.ExAmPlE."), RecordType::A);
    query.metadata.checking_disabled = true;
    query.metadata.authentic_data = true;
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(4000);
    edns.set_dnssec_ok(true);
    edns.options_mut().insert(EdnsOption::Unknown(
        u16::from(EdnsCode::Padding),
        vec![7; 40],
    ));
    edns.options_mut()
        .insert(EdnsOption::Unknown(65001, b"chosen-data".to_vec()));
    query.edns = Some(edns);
    let reply = h.udp_raw(&query.to_vec().unwrap()).await.unwrap();
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, query.metadata.id);
    assert_eq!(addrs(&reply), [ip("192.0.2.10"), ip("192.0.2.11")]);
    // The client's question, as asked, comes back to it.
    assert_eq!(reply.queries, query.queries);

    let sent = fake.messages.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    let up = &sent[0];
    assert_eq!(up.queries.len(), 1);
    assert_eq!(up.queries[0].name.to_ascii(), "api.github.example.");
    assert_eq!(up.queries[0].query_type, RecordType::A);
    assert_eq!(up.queries[0].query_class, hickory_proto::rr::DNSClass::IN);
    assert_ne!(up.metadata.id, query.metadata.id);
    assert!(up.metadata.recursion_desired);
    assert!(!up.metadata.checking_disabled);
    assert!(!up.metadata.authentic_data);
    assert_eq!(up.metadata.op_code, OpCode::Query);
    let up_edns = up.edns.as_ref().unwrap();
    assert_eq!(up_edns.max_payload(), super::query::EDNS_PAYLOAD);
    assert!(!up_edns.flags().dnssec_ok);
    assert!(up_edns.options().as_ref().is_empty(), "{up_edns:?}");
    // The whole wire form is what the question alone determines, bar the id.
    let mut wire = up.to_vec().unwrap();
    wire[..2].copy_from_slice(&[0, 0]);
    let mut canonical = Harness::query(&name("api.github.example."), RecordType::A);
    canonical.metadata.id = 0;
    canonical.edns = Some(super::query::our_edns(false));
    assert_eq!(wire, canonical.to_vec().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_names_over_budget_are_refused_with_one_alert() {
    let fake = Fake::start().await;
    let policy = policy_with(
        &[fake.addr],
        "  budget: {names_per_suffix_per_minute: 3}\n",
        "",
    );
    let h = Harness::start_with(&policy, false).await;
    let mut codes = Vec::new();
    for i in 0..8 {
        let reply = h.udp(&format!("x{i}.github.example"), RecordType::A).await;
        codes.push(reply.metadata.response_code);
    }
    // Three distinct names go upstream (NXDOMAIN from the fake), then REFUSED.
    assert_eq!(codes[..3], [ResponseCode::NXDomain; 3]);
    assert_eq!(codes[3..], [ResponseCode::Refused; 5]);
    assert_eq!(fake.seen().len(), 3);
    // A name already counted, and an exact name of another rule, still resolve.
    let reply = h.udp("x0.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    // `api.github.example` is under the wildcard too: over budget as a new name.
    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    let refused: Vec<DnsRecord> = h
        .records()
        .into_iter()
        .filter(|r| r.response_code == "REFUSED")
        .collect();
    assert_eq!(refused.len(), 6);
    assert!(refused.iter().all(|r| r.verdict == DnsVerdict::Deny
        && r.reason
            .as_deref()
            .unwrap()
            .contains("distinct names under `**.github.example`")));
    // One alert for the window, with the count, after it closes.
    assert!(h.alerts.lock().unwrap().is_empty());
    tokio::time::sleep(budget::ALERT_WINDOW + Duration::from_millis(500)).await;
    let alerts = h.alerts.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::DnsBudget);
    assert_eq!(alerts[0].count, 6);
    assert_eq!(alerts[0].sandbox, "agent-1");
    assert_eq!(alerts[0].window_seconds, Some(10));
    crate::audit::Record::Alert(alerts[0].clone())
        .encode(1)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_resolvers_limit_are_counted_in_one_alert() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    // Held open without a query: each keeps one of the listener's slots.
    let mut held = Vec::new();
    for _ in 0..MAX_TCP_CONNECTIONS + 5 {
        held.push(TcpStream::connect(h.tcp).await.unwrap());
    }
    // The five over the limit are closed at once, unanswered.
    let mut closed = 0;
    for stream in &mut held[MAX_TCP_CONNECTIONS..] {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await;
        closed += usize::from(matches!(read, Ok(Ok(0) | Err(_))));
    }
    assert_eq!(closed, 5);
    assert!(h.alerts.lock().unwrap().is_empty());
    tokio::time::sleep(budget::ALERT_WINDOW + Duration::from_millis(500)).await;
    let alerts = h.alerts.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::RateLimit);
    assert_eq!(alerts[0].count, 5);
    assert!(alerts[0].reason.contains("TCP connections"), "{alerts:?}");
    drop(held);
}

/// A tight loop of refused queries on one socket: every one is answered, the first
/// [`REFUSALS_RECORDED`] of the window are recorded one by one, the rest counted in one
/// `rate-limit` alert; allowed queries are still recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_queries_past_the_limit_are_counted_not_recorded_one_by_one() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let over = 25;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(h.udp).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..REFUSALS_RECORDED as usize + over {
        let query = Harness::query(&name(&format!("x{i}.evil.example")), RecordType::A);
        sock.send(&query.to_vec().unwrap()).await.unwrap();
        let len = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let reply = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain, "{i}");
    }
    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    // A query that went upstream and was refused for its answer (a CNAME to a name the
    // policy does not allow) is recorded all the same: its name left the host.
    let reply = h.udp("alias.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    let records = h.records();
    assert!(
        records
            .iter()
            .any(|r| r.question_name == "alias.github.example" && r.verdict == DnsVerdict::Deny),
        "the refused answer was not recorded"
    );
    let refused = records
        .iter()
        .filter(|r| r.verdict == DnsVerdict::Deny && r.upstream.is_none())
        .count();
    assert_eq!(refused, REFUSALS_RECORDED as usize);
    // Every refusal counts toward a denial burst, recorded or counted alike (the refused
    // answer too).
    assert_eq!(
        h.denials.load(std::sync::atomic::Ordering::Relaxed),
        u64::from(REFUSALS_RECORDED) + over as u64 + 1
    );
    assert_eq!(
        records.last().map(|r| r.question_name.as_str()),
        Some("api.github.example")
    );
    tokio::time::sleep(budget::ALERT_WINDOW + Duration::from_millis(500)).await;
    let alerts = h.alerts.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::RateLimit);
    assert_eq!(alerts[0].count, over as u64);
    assert!(
        alerts[0].reason.contains("refused DNS queries"),
        "{alerts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_resolver_answers_nothing_more_on_connections_held_open() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let ask = |qname: &str| {
        let bytes = Harness::query(&name(qname), RecordType::A)
            .to_vec()
            .unwrap();
        let mut framed = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        framed
    };
    // Positive control: the connection is served before the resolver stops.
    let mut stream = TcpStream::connect(h.tcp).await.unwrap();
    stream.write_all(&ask("api.github.example")).await.unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.unwrap();
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await.unwrap();
    let asked = fake.seen.lock().unwrap().len();
    assert_eq!(asked, 1, "the positive control was asked upstream");
    // The daemon stops the resolver (a policy naming no hosts, a detach).
    for listener in &h.listeners {
        listener.abort();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The connection held open is closed, not served under the old policy.
    let _ = stream.write_all(&ask("api.github.example")).await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        fake.seen.lock().unwrap().len(),
        asked,
        "nothing more was asked upstream"
    );
    assert_eq!(h.records().len(), 1, "{:#?}", h.records());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_rate_over_budget_is_refused() {
    let fake = Fake::start().await;
    let policy = policy_with(
        &[fake.addr],
        "  budget: {queries_per_second: 1, burst: 2}\n",
        "",
    );
    let h = Harness::start_with(&policy, false).await;
    let mut codes = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..4 {
        codes.push(
            h.udp("api.github.example", RecordType::A)
                .await
                .metadata
                .response_code,
        );
    }
    // A second's worth of budget comes back while the queries run on a loaded machine
    // (one query a second): that many may pass beyond the burst.
    let refilled = usize::try_from(started.elapsed().as_secs()).unwrap_or(usize::MAX);
    assert_eq!(codes[..2], [ResponseCode::NoError, ResponseCode::NoError]);
    let refused = codes
        .iter()
        .filter(|c| **c == ResponseCode::Refused)
        .count();
    assert!(
        refused >= 2usize.saturating_sub(refilled),
        "{codes:?} in {refilled} s"
    );
    assert_eq!(fake.seen().len(), 4 - refused);
    if refused > 0 {
        assert!(h.records().iter().any(|r| r
            .reason
            .as_deref()
            .is_some_and(|w| w.contains("queries per second"))));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_outside_the_pins_are_refused_and_recorded() {
    let fake = Fake::start().await;
    let policy = policy_with(
        &[fake.addr],
        "",
        "  - name: pinned\n    to: [api.github.example]\n    answers: [192.0.2.10/32]\n    action: allow\n",
    );
    let h = Harness::start_with(&policy, false).await;
    let reply = h.udp("api.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&reply), [ip("192.0.2.10")]);
    let learned = h.learned.lock().unwrap().clone();
    assert_eq!(learned.len(), 1);
    assert_eq!(learned[0].addr, ip("192.0.2.10"));
    let r = h.only_record();
    assert_eq!(r.resolved_ip, [ip("192.0.2.10")]);
    let refused: Vec<(IpAddr, &str)> = r
        .refused
        .iter()
        .map(|x| (x.ip, x.reason.as_str()))
        .collect();
    assert_eq!(
        refused,
        [
            (
                ip("192.0.2.11"),
                "the address is outside the `answers` of rule `pinned`"
            ),
            (
                ip("203.0.113.9"),
                "not an address of the name asked in an address question (only those are \
                 installed)"
            ),
        ]
    );
    let line = String::from_utf8(crate::audit::Record::from(r).encode(1).unwrap()).unwrap();
    assert!(
        line.contains(r#""refused":[{"ip":"192.0.2.11","reason":"#),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_the_daemon_refuses_are_not_released() {
    let fake = Fake::start().await;
    let h = Harness::start(&[fake.addr], false).await;
    let reply = h.udp("www.github.example", RecordType::A).await;
    assert_eq!(addrs(&reply), [ip("192.0.2.20")]);
    let reply = h.udp("loop.github.example", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(addrs(&reply).is_empty(), "{reply:?}");
    let r = h.records().pop().unwrap();
    assert!(r.resolved_ip.is_empty());
    assert_eq!(r.refused.len(), 1);
    assert_eq!(r.refused[0].ip, ip("127.0.0.1"));
    assert_eq!(r.refused[0].reason, "a special address");
}
