//! DNS is not a data channel, end to end: what a sandbox asks through an allowed name
//! reaches the world's resolver only as a canonical A or AAAA question, within budget,
//! and answers outside a rule's `answers:` never reach the sandbox.
//!
//! The setup is [`DnsFixture`]'s world (dnsmasq answering `api.example.com` with the
//! origin, `evil.example` with the canary, `<x>.files.pypi.example` with the second
//! origin). In [`canonical_queries_listed_types_and_pinned_answers`] the policy's
//! upstream is a small relay in the world that writes down every query's bytes as they
//! arrive and passes them on to dnsmasq, so the test reads exactly what left egressd;
//! it answers `rebind.example` itself, with 127.0.0.1 beside the origin.
//!
//! Needs root, cgroup v2, bpffs, dnsmasq, dig, curl, python3 and the egressd binaries;
//! skips without root or tools. Run:
//! `cargo test -p egress-tests --test dns_channel -- --test-threads=2`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use egress_tests::audit::{get, get_str, get_u64};
use egress_tests::dns_fixture::{dig, DnsFixture, DnsMatch, API_NAME, EVIL_NAME, PYPI_FILES};
use egress_tests::expect;
use egress_tests::require_dns_tools;
use egress_tests::util::{kill_with_parent, poll, python, ChildGuard, TempDir};
use egress_tests::world::{CANARY_V4, ORIGIN_V4};
use serde_json::Value;

/// The name the relay answers with 127.0.0.1 and the origin.
const REBIND_NAME: &str = "rebind.example";
/// The relay's address in the world.
const RELAY_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 54);
/// curl's exit code for "Couldn't resolve host".
const CURL_COULDNT_RESOLVE: i32 = 6;
/// TTL of the world's answers.
const TTL: u32 = 300;
/// The budget test's limit of distinct names under `**.pypi.example` per minute.
const NAME_LIMIT: usize = 5;
/// How many distinct names the budget test asks.
const BURST: usize = 12;

/// Queries go through the relay; `api.example.com` and `evil.example` are pinned to
/// 192.0.2.0/24 (the origin is there, the canary is not).
const RELAY_POLICY: &str = r#"version: 1
default: deny
dns:
  upstream: [192.0.2.54]
rules:
  - name: api
    to: [api.example.com]
    answers: [192.0.2.0/24]
    ports: [80]
    protocol: tcp
    action: allow
  - name: pinned
    to: [evil.example]
    answers: [192.0.2.0/24]
    ports: [80]
    protocol: tcp
    action: allow
  - name: rebind
    to: [rebind.example]
    ports: [80]
    protocol: tcp
    action: allow
"#;

/// A tight name budget under `**.pypi.example`; dnsmasq straight.
const BUDGET_POLICY: &str = r#"version: 1
default: deny
dns:
  budget: {names_per_suffix_per_minute: 5}
rules:
  - name: api
    to: [api.example.com]
    ports: [80]
    protocol: tcp
    action: allow
  - name: pypi
    to: ["**.pypi.example"]
    ports: [80]
    protocol: tcp
    action: allow
"#;

/// Receives UDP queries on ADDR:53, appends each one's bytes (hex) to LOG, sends it on
/// to UPSTREAM:53 unchanged and relays the reply. One query at a time. It answers
/// [`REBIND_NAME`] itself: A records 127.0.0.1 and the origin (a rebinding attempt
/// beside a real address), no AAAA.
const RELAY_PY: &str = r#"
import socket, sys
listen, upstream, log, ready = sys.argv[1:5]

def local_answer(q):
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
        i += 1 + q[i]
    if ".".join(labels) != "rebind.example":
        return None
    qtype = int.from_bytes(q[i + 1:i + 3], "big")
    addrs = [bytes([127, 0, 0, 1]), bytes([192, 0, 2, 10])] if qtype == 1 else []
    head = q[:2] + b"\x81\x80\x00\x01" + len(addrs).to_bytes(2, "big") + b"\x00" * 4
    body = q[12:i + 5]
    for a in addrs:
        body += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04" + a
    return head + body

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((listen, 53))
open(ready, "w").close()
while True:
    q, peer = s.recvfrom(4096)
    with open(log, "a") as f:
        f.write(q.hex() + "\n")
    own = local_answer(q)
    if own is not None:
        s.sendto(own, peer)
        continue
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    try:
        u.sendto(q, (upstream, 53))
        r, _ = u.recvfrom(4096)
        s.sendto(r, peer)
    except OSError:
        pass
    u.close()
"#;

/// The relay, killed on drop.
struct Relay {
    _child: ChildGuard,
    log: PathBuf,
    _dir: TempDir,
}

impl Relay {
    fn start(fx: &DnsFixture) -> Result<Self> {
        fx.world.add_host(IpAddr::V4(RELAY_V4))?;
        let dir = TempDir::new("dns-relay")?;
        let script = dir.write("relay.py", RELAY_PY)?;
        let log = dir.path().join("queries.hex");
        let ready = dir.path().join("ready");
        let args = [
            script.display().to_string(),
            RELAY_V4.to_string(),
            fx.dns.addr().ip().to_string(),
            log.display().to_string(),
            ready.display().to_string(),
        ];
        let mut cmd = fx.world.netns().spawn_command(python(), &args);
        cmd.stdin(Stdio::null());
        kill_with_parent(&mut cmd);
        let child = ChildGuard::new(cmd.spawn().context("spawn the DNS relay")?, "dns relay");
        if poll(Duration::from_secs(10), Duration::from_millis(50), || {
            Ok(ready.exists().then_some(()))
        })?
        .is_none()
        {
            bail!("the DNS relay did not start");
        }
        Ok(Self {
            _child: child,
            log,
            _dir: dir,
        })
    }

    /// Every query the relay received, as sent.
    fn queries(&self) -> Result<Vec<Vec<u8>>> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|l| {
                (0..l.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&l[i..i + 2], 16).context("hex"))
                    .collect()
            })
            .collect()
    }
}

/// The one form a query for (`name`, `qtype`) may have upstream, bar its id: flags RD
/// only, one question (lower case, class IN), one plain OPT record advertising 1232
/// bytes, no DO bit, no options.
fn canonical(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(0));
        q.extend_from_slice(label.to_ascii_lowercase().as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    q
}

/// The message id dig printed (`;; ->>HEADER<<- opcode: QUERY, status: ..., id: N`).
fn dig_id(out: &std::process::Output) -> Option<u16> {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("->>HEADER<<-"))?;
    line.rsplit("id: ").next()?.trim().parse().ok()
}

fn dns_records(fx: &DnsFixture) -> Result<Vec<Value>> {
    Ok(fx
        .daemon
        .audit_records()?
        .into_iter()
        .filter(|r| get_str(r, "event.action") == Some("dns-query"))
        .collect())
}

#[test]
fn canonical_queries_listed_types_and_pinned_answers() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(TTL)?;
    let relay = Relay::start(&fx)?;
    fx.attach(&fx.sandbox, RELAY_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();

    // Positive controls: A answered and connectable, AAAA answered (empty in this world).
    let d = dig(sb, &[API_NAME])?;
    ensure!(
        d.is("NOERROR") && d.addrs() == [IpAddr::V4(ORIGIN_V4)],
        "A {API_NAME}: {}",
        d.describe()
    );
    let d = dig(sb, &["AAAA", API_NAME])?;
    ensure!(d.is("NOERROR"), "AAAA {API_NAME}: {}", d.describe());
    expect::origin_body(&sb.curl(&[&format!("http://{API_NAME}/")])?)?;

    // Mixed case, CD, AD, DO, and EDNS options (padding, client subnet, a private one):
    // answered, and what went upstream is the canonical query with a fresh id.
    let before = relay.queries()?.len();
    let mixed = "ApI.eXaMpLe.CoM";
    let out = sb.run(
        "dig",
        &[
            "+time=2",
            "+tries=1",
            "+cdflag",
            "+adflag",
            "+dnssec",
            "+ednsopt=12:00000000",
            "+ednsopt=65001:63686f73656e2d64617461",
            "+subnet=198.51.100.0/24",
            mixed,
        ],
    )?;
    let client_id = dig_id(&out);
    let d = egress_tests::dns_fixture::parse_dig(out);
    ensure!(
        d.is("NOERROR") && d.addrs() == [IpAddr::V4(ORIGIN_V4)],
        "dig {mixed} with flags and options: {}",
        d.describe()
    );
    let sent = relay.queries()?;
    let new = &sent[before..];
    ensure!(new.len() == 1, "one query upstream, got {new:02x?}");
    ensure!(
        new[0][2..] == canonical(API_NAME, 1)[..],
        "the upstream query is not canonical:\n got {:02x?}\nwant {:02x?}",
        &new[0][2..],
        canonical(API_NAME, 1)
    );
    let upstream_id = u16::from_be_bytes([new[0][0], new[0][1]]);
    ensure!(
        client_id.is_some_and(|id| id != upstream_id),
        "the upstream id {upstream_id} should not be the client's {client_id:?}"
    );

    // Query types the policy does not list, ANY and AXFR: REFUSED, never upstream.
    for (args, qtype) in [
        (vec!["TXT", API_NAME], "TXT"),
        (vec!["ANY", API_NAME], "ANY"),
        (vec!["+tcp", "MX", API_NAME], "MX"),
        (vec!["HTTPS", API_NAME], "HTTPS"),
    ] {
        let d = dig(sb, &args)?;
        ensure!(
            d.is("REFUSED") && d.answers.is_empty(),
            "dig {args:?}: {}",
            d.describe()
        );
        let rec = fx.wait_dns_record(
            &DnsMatch::new(name, API_NAME)
                .qtype(qtype)
                .rcode("REFUSED")
                .verdict("deny"),
        )?;
        ensure!(
            get_str(&rec, "event.reason").is_some_and(|r| r.contains("is not answered")),
            "{rec}"
        );
    }
    // dig's AXFR goes over TCP and prints no header; the record and the log tell.
    let _ = sb.run("dig", &["+time=2", "+tries=1", "AXFR", API_NAME])?;
    fx.wait_dns_record(
        &DnsMatch::new(name, API_NAME)
            .qtype("AXFR")
            .rcode("REFUSED")
            .verdict("deny"),
    )?;
    let asked: Vec<String> = fx
        .dns
        .queries_for(API_NAME)
        .into_iter()
        .map(|q| q.qtype)
        .collect();
    ensure!(
        asked.iter().all(|t| t == "A" || t == "AAAA"),
        "dnsmasq was asked other types: {asked:?}\n{}",
        fx.dns.log()
    );
    // Every query that left egressd is canonical, and dnsmasq saw only lower case.
    for q in relay.queries()? {
        let qtype = q
            .len()
            .checked_sub(15)
            .map(|at| u16::from_be_bytes([q[at], q[at + 1]]));
        let ok = [1u16, 28].iter().any(|&t| {
            [API_NAME, EVIL_NAME, REBIND_NAME]
                .iter()
                .any(|n| q[2..] == canonical(n, t)[..])
        });
        ensure!(
            ok,
            "a non-canonical query went upstream (type {qtype:?}): {q:02x?}"
        );
    }
    ensure!(
        fx.dns
            .queries()
            .iter()
            .all(|q| q.name == q.name.to_ascii_lowercase()),
        "dnsmasq saw upper case:\n{}",
        fx.dns.log()
    );

    // `evil.example` answers with the canary, outside the rule's `answers`: not released.
    let d = dig(sb, &[EVIL_NAME])?;
    ensure!(
        d.is("NOERROR") && d.addrs().is_empty(),
        "{EVIL_NAME} should answer no address: {}",
        d.describe()
    );
    expect::exit_code(
        &sb.curl(&[&format!("http://{EVIL_NAME}/")])?,
        CURL_COULDNT_RESOLVE,
    )?;
    let rec = fx.wait_dns_record(
        &DnsMatch::new(name, EVIL_NAME)
            .qtype("A")
            .rcode("NOERROR")
            .verdict("allow"),
    )?;
    ensure!(get(&rec, "dns.resolved_ip").is_none(), "{rec}");
    let refused = get(&rec, "egress.dns.refused")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    ensure!(
        refused.len() == 1
            && get_str(&refused[0], "ip") == Some(CANARY_V4.to_string().as_str())
            && get_str(&refused[0], "reason")
                .is_some_and(|r| r.contains("outside the `answers` of rule `pinned`")),
        "the canary's address should be listed as refused: {rec}"
    );
    // Not installed either: a connect by address is denied, the canary hears nothing.
    expect::tcp_blocked(sb, name, &fx.daemon, &fx.canary, IpAddr::V4(CANARY_V4), 80)?;
    // The allowed name still connects.
    expect::origin_body(&sb.curl(&[&format!("http://{API_NAME}/")])?)?;

    // A rebinding answer: 127.0.0.1 is dropped (special, no rule names it), the origin
    // beside it is installed, released and connectable.
    let d = dig(sb, &[REBIND_NAME])?;
    ensure!(
        d.is("NOERROR") && d.addrs() == [IpAddr::V4(ORIGIN_V4)],
        "{REBIND_NAME} should answer only the origin: {}",
        d.describe()
    );
    let rec = fx.wait_dns_record(
        &DnsMatch::new(name, REBIND_NAME)
            .qtype("A")
            .rcode("NOERROR")
            .verdict("allow"),
    )?;
    let refused = get(&rec, "egress.dns.refused")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    ensure!(
        egress_tests::dns_fixture::resolved_ips(&rec) == [IpAddr::V4(ORIGIN_V4)]
            && refused.len() == 1
            && get_str(&refused[0], "ip") == Some("127.0.0.1")
            && get_str(&refused[0], "reason").is_some_and(|r| r.contains("loopback address")),
        "resolved_ip should hold the origin only, 127.0.0.1 refused as loopback: {rec}"
    );
    expect::origin_body(&sb.curl(&[&format!("http://{REBIND_NAME}/")])?)?;
    Ok(())
}

#[test]
fn distinct_names_over_budget_are_refused_with_one_alert() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(TTL)?;
    fx.attach(&fx.sandbox, BUDGET_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();

    let names: Vec<String> = (0..BURST).map(|i| format!("n{i}.{PYPI_FILES}")).collect();
    let mut statuses = Vec::new();
    for n in &names {
        statuses.push(dig(sb, &[n])?.status.unwrap_or_default());
    }
    let want: Vec<&str> = (0..BURST)
        .map(|i| if i < NAME_LIMIT { "NOERROR" } else { "REFUSED" })
        .collect();
    ensure!(statuses == want, "statuses {statuses:?}, want {want:?}");
    // Only the names within budget reached dnsmasq.
    for (i, n) in names.iter().enumerate() {
        ensure!(
            fx.dns.asked(n) == (i < NAME_LIMIT),
            "dnsmasq asked {n}: {}\n{}",
            fx.dns.asked(n),
            fx.dns.log()
        );
    }
    for n in &names[NAME_LIMIT..] {
        let rec = fx.wait_dns_record(&DnsMatch::new(name, n).rcode("REFUSED").verdict("deny"))?;
        ensure!(
            get_str(&rec, "event.reason")
                .is_some_and(|r| r.contains("distinct names under `**.pypi.example`")),
            "{rec}"
        );
    }

    // Positive controls: a name already counted, and an exact name outside the wildcard.
    let d = dig(sb, &[&names[0]])?;
    ensure!(d.is("NOERROR") && !d.addrs().is_empty(), "{}", d.describe());
    expect::origin_body(&sb.curl(&[&format!("http://{API_NAME}/")])?)?;

    // One alert for the window, counting every refusal.
    let alert = fx.daemon.wait_for_record(Duration::from_secs(20), |r| {
        get_str(r, "event.action") == Some("dns-budget")
    })?;
    let refused = BURST - NAME_LIMIT;
    ensure!(
        get_str(&alert, "event.kind") == Some("alert")
            && get_str(&alert, "egress.sandbox.name") == Some(name)
            && get_u64(&alert, "egress.alert.count") == Some(refused as u64),
        "the alert should count {refused} refusals: {alert}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let alerts = fx
        .daemon
        .audit_records()?
        .into_iter()
        .filter(|r| get_str(r, "event.action") == Some("dns-budget"))
        .count();
    ensure!(alerts == 1, "{alerts} dns-budget alerts, want one");
    let refusals = dns_records(&fx)?
        .iter()
        .filter(|r| get_str(r, "dns.response_code") == Some("REFUSED"))
        .count();
    ensure!(
        refusals == refused,
        "{refusals} REFUSED records, want {refused}"
    );
    expect::canary_silent(&fx.canary)?;
    Ok(())
}
