//! Name-based policy, end to end: real clients in a sandbox (dig, curl, python's
//! `getaddrinfo`) resolve through egressd's per-sandbox resolver, which the kernel sends
//! every port-53 packet to; dnsmasq in the world is the authoritative upstream. A name the
//! policy allows resolves and its addresses become connectable for as long as the answer
//! lives; anything else gets NXDOMAIN (or REFUSED) without ever reaching dnsmasq, and an
//! address nobody resolved through an allowed name stays denied.
//!
//! The setup ([`DnsFixture`]): `api.example.com` is the origin (192.0.2.10),
//! `files.pypi.example` and `a.b.pypi.example` a second origin (192.0.2.31),
//! `pypi.example` and `evil.example` (and so `pypi.example.evil.example`) the canary
//! (203.0.113.66); the policy ([`NAMES_POLICY`]) allows `api.example.com` and
//! `**.pypi.example` on TCP 80. The sandbox's `resolv.conf` names 203.0.113.99, which
//! nobody serves: every answer it gets is egressd's.
//!
//! Needs root, cgroup v2, bpffs, dnsmasq, dig, curl and the egressd binaries
//! (`cargo build -p agent-userspace`); skips without root or tools. Run:
//! `cargo test -p egress-tests --test dns -- --test-threads=2`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get_str, get_u64, summarize, Match};
use egress_tests::dns_fixture::{
    dig, getaddrinfo, origin_hits, raw_query, DnsFixture, DnsMatch, API_NAME, EVIL_NAME,
    NAMES_POLICY, PYPI_ALIAS, PYPI_APEX, PYPI_CDN, PYPI_DEEP, PYPI_FILES, PYPI_LOOKALIKE,
    PYPI_ONLY_POLICY, PYPI_V4, UNSERVED_RESOLVER,
};
use egress_tests::dns_server::DNS_V4;
use egress_tests::expect::{self, records, RECORD_TIMEOUT};
use egress_tests::require_dns_tools;
use egress_tests::sandbox::Sandbox;
use egress_tests::servers::Canary;
use egress_tests::util::poll;
use egress_tests::world::{CANARY_V4, CANARY_V6, ORIGIN_V4};
use serde_json::Value;

/// curl's exit code for "Couldn't resolve host".
const CURL_COULDNT_RESOLVE: i32 = 6;
/// TTL of the world's answers in the tests that do not wait for expiry.
const LONG_TTL: u32 = 300;

fn origin() -> IpAddr {
    IpAddr::V4(ORIGIN_V4)
}

fn canary() -> IpAddr {
    IpAddr::V4(CANARY_V4)
}

fn pypi() -> IpAddr {
    IpAddr::V4(PYPI_V4)
}

fn v4(sb: &Sandbox) -> IpAddr {
    IpAddr::V4(sb.addrs().v4)
}

/// `name` resolved (dig) to exactly `want`, and the answer appeared to come from the
/// server dig asked (`server`, e.g. the unserved resolver of `resolv.conf`).
fn ensure_resolves(sb: &Sandbox, args: &[&str], want: IpAddr, server: &str) -> Result<()> {
    let d = dig(sb, args)?;
    ensure!(
        d.is("NOERROR") && d.addrs() == vec![want],
        "dig {args:?} in {} should answer {want}: {}",
        sb.label(),
        d.describe()
    );
    ensure!(
        d.server.as_deref().is_some_and(|s| s.starts_with(server)),
        "dig {args:?}: the answer should come from {server} as asked: {}",
        d.describe()
    );
    Ok(())
}

/// dig `args` got `status` and no addresses.
fn ensure_status(sb: &Sandbox, args: &[&str], status: &str) -> Result<()> {
    let d = dig(sb, args)?;
    ensure!(
        d.is(status) && d.addrs().is_empty(),
        "dig {args:?} in {} should get {status} and no address: {}",
        sb.label(),
        d.describe()
    );
    Ok(())
}

/// python's getaddrinfo fails for `name`.
fn ensure_unresolvable(sb: &Sandbox, name: &str) -> Result<()> {
    let r = getaddrinfo(sb, name)?;
    ensure!(
        !r.ok && r.addrs.is_empty(),
        "getaddrinfo({name}) in {} should fail: {}",
        sb.label(),
        r.raw
    );
    Ok(())
}

/// The allow record of a connect to an address learned from `domain`. `destination.domain`
/// is being added to the daemon: checked only when present (soft), so that this test
/// does not depend on it but catches a wrong value.
fn ensure_learned_allow(rec: &Value, domain: &str) -> Result<()> {
    if let Some(d) = get_str(rec, "destination.domain") {
        ensure!(
            d == domain,
            "destination.domain should be {domain} (where the address was learned): {rec}"
        );
    }
    Ok(())
}

/// Proof that TCP `ip:port` is blocked for `sb` while the origin at `ip` (if any) and the
/// canary hear nothing: curl exits 7, python's connect gets EPERM, both have deny
/// records, `hits` (requests the server at `ip` logged from the sandbox) is unchanged.
fn tcp_blocked_at(
    fx: &DnsFixture,
    sb: &Sandbox,
    ip: IpAddr,
    port: u16,
    hits: impl Fn() -> usize,
) -> Result<Vec<Value>> {
    let before_hits = hits();
    let m = Match::decision("deny", ip, port)
        .transport("tcp")
        .sandbox(sb.label());
    let before = m.all(&fx.daemon.audit_records()?).len();
    expect::exit_code(
        &sb.curl(&[&format!("http://{ip}:{port}/")])?,
        expect::CURL_COULDNT_CONNECT,
    )?;
    expect::eperm(&sb.probe("tcp-connect", ip, port, &[])?)?;
    let recs = records(&fx.daemon, &m, before + 2)?;
    expect::canary_silent(&fx.canary)?;
    ensure!(
        hits() == before_hits,
        "the server at {ip} logged a request from {} although the connect was denied",
        sb.label()
    );
    Ok(recs)
}

/// `len` characters of base32 (RFC 4648 alphabet, lower case), as a tunnelling tool
/// would pack data into a label.
fn base32_label(len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let data = b"egressd exfiltration probe: secret-token-0123456789";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data.iter().cycle() {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
            if out.len() == len {
                return out;
            }
        }
        acc &= (1 << bits) - 1;
    }
    out
}

#[test]
fn allowed_name_resolves_and_connects_by_name() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();
    let unserved = UNSERVED_RESOLVER.to_string();

    // dig, through resolv.conf's nameserver that nobody serves.
    ensure_resolves(sb, &[API_NAME], origin(), &unserved)?;
    // Letter case and a trailing dot do not matter.
    ensure_resolves(sb, &["API.Example.COM."], origin(), &unserved)?;
    // python (glibc's stub resolver).
    let r = getaddrinfo(sb, API_NAME)?;
    ensure!(
        r.ok && r.addrs == vec![origin()],
        "getaddrinfo({API_NAME}) should give {ORIGIN_V4} only: {}",
        r.raw
    );
    // curl by name reaches the origin.
    let hits = origin_hits(&fx.origin, v4(sb));
    expect::origin_body(&sb.curl(&[&format!("http://{API_NAME}/")])?)?;
    ensure!(
        origin_hits(&fx.origin, v4(sb)) == hits + 1,
        "the origin should have logged curl's request: {}",
        fx.origin.log()
    );

    let rec = fx.wait_dns_record(
        &DnsMatch::new(name, API_NAME)
            .qtype("A")
            .rcode("NOERROR")
            .verdict("allow")
            .rule("api")
            .resolved(origin()),
    )?;
    ensure!(
        get_str(&rec, "server.ip") == Some(&DNS_V4.to_string()[..])
            && get_u64(&rec, "server.port") == Some(53),
        "the record should name the upstream that answered ({DNS_V4}:53): {rec}"
    );
    ensure!(
        get_str(&rec, "event.outcome") == Some("success"),
        "outcome of an allowed query: {rec}"
    );
    let allow = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", origin(), 80)
            .transport("tcp")
            .sandbox(name)
            .rule("api"),
    )?;
    ensure_learned_allow(&allow, API_NAME)?;
    // The name went upstream (from the daemon, in the world), never from the sandbox.
    ensure!(
        fx.dns.asked(API_NAME),
        "dnsmasq never saw {API_NAME}:\n{}",
        fx.dns.log()
    );
    let sb_addr = sb.addrs().v4.to_string();
    ensure!(
        fx.dns.queries().iter().all(|q| q.from != sb_addr),
        "the sandbox reached dnsmasq itself:\n{}",
        fx.dns.log()
    );
    Ok(())
}

#[test]
fn unlisted_name_is_nxdomain_and_never_forwarded() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    // Refused queries count toward a denial burst as kernel denials do.
    let policy = format!("{NAMES_POLICY}alerts:\n  denial_burst: {{ count: 5, seconds: 30 }}\n");
    fx.attach(&fx.sandbox, &policy)?;
    let sb = &fx.sandbox;
    let name = sb.label();

    // Three clients: dig's status, python's gaierror, curl's "could not resolve".
    ensure_status(sb, &[EVIL_NAME], "NXDOMAIN")?;
    ensure_status(sb, &["AAAA", EVIL_NAME], "NXDOMAIN")?;
    ensure_unresolvable(sb, EVIL_NAME)?;
    expect::exit_code(
        &sb.curl(&[&format!("http://{EVIL_NAME}/")])?,
        CURL_COULDNT_RESOLVE,
    )?;

    let rec = fx.wait_dns_record(
        &DnsMatch::new(name, EVIL_NAME)
            .qtype("A")
            .rcode("NXDOMAIN")
            .verdict("deny"),
    )?;
    // Six refused queries and no kernel denial yet: the burst is the resolver's.
    let burst = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        get_str(r, "event.action") == Some("denial-burst")
    })?;
    ensure!(
        get_str(&burst, "egress.sandbox.name") == Some(name),
        "{burst}"
    );
    ensure!(
        get_str(&rec, "event.outcome") == Some("failure")
            && get_str(&rec, "event.reason").is_some_and(|r| !r.is_empty())
            && get_str(&rec, "dns.resolved_ip").is_none(),
        "the deny record should fail with a reason and no address: {rec}"
    );
    // Nothing about the name left the sandbox's resolver.
    ensure!(
        !fx.dns.asked_containing("evil"),
        "dnsmasq was asked about {EVIL_NAME}:\n{}",
        fx.dns.log()
    );
    // The address the name has in the world (the canary's) is not reachable either.
    expect::tcp_blocked(&fx.sandbox, name, &fx.daemon, &fx.canary, canary(), 80)?;

    // Control: dnsmasq does answer the name (asked from the world, after the checks).
    let world = fx
        .dns
        .query_from(fx.world.netns(), &["+short", EVIL_NAME])?;
    ensure!(
        String::from_utf8_lossy(&world.stdout).trim() == CANARY_V4.to_string(),
        "dnsmasq should answer {EVIL_NAME} with {CANARY_V4}: {world:?}"
    );
    Ok(())
}

#[test]
fn unresolved_address_is_denied_until_its_name_resolves() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();

    // The origin serves, but nothing told the kernel that api.example.com is 192.0.2.10.
    let recs = tcp_blocked_at(&fx, sb, origin(), 80, || origin_hits(&fx.origin, v4(sb)))?;
    for r in &recs {
        ensure!(
            get_str(r, "rule.name") == Some("default"),
            "the deny should be the default's: {r}"
        );
    }

    // Resolving the name opens exactly that address, on the rule's port.
    ensure_resolves(sb, &[API_NAME], origin(), &UNSERVED_RESOLVER.to_string())?;
    expect::origin_body(&sb.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    expect::probe_ok(&sb.probe("tcp-connect", origin(), 80, &[])?)?;
    let allow = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", origin(), 80)
            .sandbox(name)
            .rule("api"),
    )?;
    ensure_learned_allow(&allow, API_NAME)?;
    // Not other ports of it.
    expect::exit_code(
        &sb.curl(&[&format!("http://{ORIGIN_V4}:443/")])?,
        expect::CURL_COULDNT_CONNECT,
    )?;
    // And not another origin whose name nobody resolved.
    tcp_blocked_at(&fx, sb, pypi(), 80, || origin_hits(&fx.pypi_origin, v4(sb)))?;
    Ok(())
}

#[test]
fn learned_address_expires_after_ttl_and_grace() -> Result<()> {
    require_dns_tools!();
    // dnsmasq answers with TTL 1; the policy's min_ttl 1 + grace 1: two seconds.
    let fx = DnsFixture::new(1)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;

    let d = dig(sb, &[API_NAME])?;
    ensure!(
        d.is("NOERROR") && d.addrs() == vec![origin()],
        "dig {API_NAME}: {}",
        d.describe()
    );
    ensure!(
        d.answers.iter().all(|a| a.1 <= 1),
        "the TTL should be dnsmasq's (1 s): {}",
        d.describe()
    );
    let resolved = Instant::now();
    expect::probe_ok(&sb.probe("tcp-connect", origin(), 80, &[])?)?;

    // Bounded: the entry lives 2 s and the daemon sweeps every second.
    let limit = Duration::from_secs(8);
    let expired = poll(limit, Duration::from_millis(200), || {
        let p = sb.probe("tcp-connect", origin(), 80, &[])?;
        Ok(p.is_eperm().then_some(resolved.elapsed()))
    })?
    .with_context(|| {
        format!(
            "192.0.2.10:80 still allowed {limit:?} after resolving a 1 s answer (min_ttl 1, \
             grace 1); daemon log:\n{}",
            fx.daemon_tail(30)
        )
    })?;
    ensure!(
        expired >= Duration::from_secs(1),
        "the learned address went after {expired:?}, before its TTL"
    );

    // Now fully blocked again: curl, python, deny records, origin silent.
    tcp_blocked_at(&fx, sb, origin(), 80, || origin_hits(&fx.origin, v4(sb)))?;

    // Resolving again opens it again.
    resolves_and_reaches_the_origin(&fx, sb)
}

/// Two names with different rules resolve to one address: each rule lives as long as its
/// own name's answers, however often the other name is resolved (which used to keep the
/// first name's rule, and its port, open indefinitely), and a decision's record names the
/// name whose rule decided it.
#[test]
fn a_shared_address_keeps_each_names_rules_for_that_names_answers_only() -> Result<()> {
    require_dns_tools!();
    // TTL 1, min_ttl 1, grace 1: an answer's rules live two seconds.
    let fx = DnsFixture::new(1)?;
    let policy = format!(
        "version: 1\ndefault: deny\ndns:\n  upstream: [192.0.2.53]\n  min_ttl: 1\n  grace: 1\n\
         rules:\n  - name: deep\n    to: [{PYPI_DEEP}]\n    ports: [81]\n    protocol: tcp\n    \
         action: allow\n  - name: files\n    to: [{PYPI_FILES}]\n    ports: [80]\n    \
         protocol: tcp\n    action: allow\n"
    );
    fx.attach(&fx.sandbox, &policy)?;
    let sb = &fx.sandbox;
    let pypi = IpAddr::V4(PYPI_V4);
    for name in [PYPI_DEEP, PYPI_FILES] {
        let d = dig(sb, &[name])?;
        ensure!(
            d.is("NOERROR") && d.addrs() == vec![pypi],
            "dig {name}: {}",
            d.describe()
        );
    }
    let resolved = Instant::now();
    // Both rules are in force: port 81 is not refused (nothing listens there), 80 serves.
    let p = sb.probe("tcp-connect", pypi, 81, &[])?;
    ensure!(
        !p.is_eperm(),
        "port 81 refused right after resolving: {p:?}"
    );
    expect::probe_ok(&sb.probe("tcp-connect", pypi, 80, &[])?)?;
    let rec = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", pypi, 81)
            .sandbox(sb.label())
            .rule("deep"),
    )?;
    ensure!(
        get_str(&rec, "destination.domain") == Some(PYPI_DEEP),
        "the record of a connect rule `deep` allowed names another name: {rec}"
    );
    // Only `files` is resolved again, over and over: `deep`'s rule goes all the same.
    let limit = Duration::from_secs(8);
    let expired = poll(limit, Duration::from_millis(300), || {
        let d = dig(sb, &[PYPI_FILES])?;
        ensure!(d.is("NOERROR"), "dig {PYPI_FILES}: {}", d.describe());
        let p = sb.probe("tcp-connect", pypi, 81, &[])?;
        Ok(p.is_eperm().then_some(resolved.elapsed()))
    })?
    .with_context(|| {
        format!(
            "{pypi}:81 still open {limit:?} after the only answer for {PYPI_DEEP}, while \
             {PYPI_FILES} was resolved again and again; daemon log:\n{}",
            fx.daemon_tail(30)
        )
    })?;
    ensure!(
        expired >= Duration::from_secs(1),
        "rule `deep` went after {expired:?}, before its answer's TTL"
    );
    // `files` keeps its own rule (just resolved), and its record names it.
    let d = dig(sb, &[PYPI_FILES])?;
    ensure!(d.is("NOERROR"), "dig {PYPI_FILES}: {}", d.describe());
    expect::probe_ok(&sb.probe("tcp-connect", pypi, 80, &[])?)?;
    let rec = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", pypi, 80)
            .sandbox(sb.label())
            .rule("files"),
    )?;
    ensure!(
        get_str(&rec, "destination.domain") == Some(PYPI_FILES),
        "{rec}"
    );
    Ok(())
}

/// A query sent upstream and not answered when the daemon stops is recorded (the name
/// left the host) before `daemon-stop`, which stays the trail's last record.
#[test]
fn a_query_in_flight_at_the_stop_is_recorded_before_it() -> Result<()> {
    require_dns_tools!();
    let mut fx = DnsFixture::new(1)?;
    // An upstream that takes queries and never answers: the query stays in flight.
    let silent: IpAddr = "192.0.2.54".parse()?;
    fx.world.add_host(silent)?;
    let dir = egress_tests::util::TempDir::new("silent-upstream")?;
    let (listening, received) = (dir.path().join("listening"), dir.path().join("received"));
    let mut cmd = fx.world.netns().spawn_command(
        "python3",
        &[
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind((sys.argv[1], 53))\n\
             open(sys.argv[2], 'w').close()\n\
             while True:\n    s.recv(4096)\n    open(sys.argv[3], 'w').close()\n",
            &silent.to_string(),
            &listening.display().to_string(),
            &received.display().to_string(),
        ],
    );
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _silent = egress_tests::util::ChildGuard::new(cmd.spawn()?, "silent upstream");
    poll(Duration::from_secs(10), Duration::from_millis(20), || {
        Ok(listening.exists().then_some(()))
    })?
    .context("the silent upstream did not listen")?;
    let policy = NAMES_POLICY.replace("upstream: [192.0.2.53]", &format!("upstream: [{silent}]"));
    fx.attach(&fx.sandbox, &policy)?;
    let mut dig = fx
        .sandbox
        .command("dig", &["+time=8", "+tries=1", API_NAME])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // In flight once the upstream has it.
    poll(Duration::from_secs(10), Duration::from_millis(20), || {
        Ok(received.exists().then_some(()))
    })?
    .context("the query never reached the upstream")?;
    fx.daemon.terminate(Duration::from_secs(10))?;
    let _ = dig.kill();
    let _ = dig.wait();
    let records = fx.daemon.audit_records()?;
    let stop = records
        .iter()
        .position(|r| get_str(r, "event.action") == Some("daemon-stop"))
        .context("no daemon-stop record")?;
    ensure!(
        stop == records.len() - 1,
        "records after daemon-stop:{}",
        summarize(&records[stop..])
    );
    ensure!(
        records[..stop].iter().any(|r| {
            get_str(r, "event.action") == Some("dns-query")
                && get_str(r, "dns.question.name") == Some(API_NAME)
                && get_str(r, "event.reason").is_some_and(|m| m.contains("resolver stopped"))
        }),
        "no record of the query in flight before daemon-stop:{}",
        summarize(&records)
    );
    Ok(())
}

/// `API_NAME` resolves to the origin again, curl reaches it, and the connect is
/// recorded as allowed by rule `api`.
fn resolves_and_reaches_the_origin(fx: &DnsFixture, sb: &Sandbox) -> Result<()> {
    ensure_resolves(sb, &[API_NAME], origin(), &UNSERVED_RESOLVER.to_string())?;
    expect::origin_body(&sb.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", origin(), 80)
            .sandbox(sb.label())
            .rule("api"),
    )?;
    Ok(())
}

#[test]
fn addresses_learned_before_a_restart_are_not_kept_by_the_next_run() -> Result<()> {
    require_dns_tools!();
    // A long TTL: only the restart can take the learned address away.
    let mut fx = DnsFixture::new(300)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let name = fx.sandbox.label().to_owned();
    ensure_resolves(
        &fx.sandbox,
        &[API_NAME],
        origin(),
        &UNSERVED_RESOLVER.to_string(),
    )?;
    expect::probe_ok(&fx.sandbox.probe("tcp-connect", origin(), 80, &[])?)?;

    // The next run keeps its learned addresses in memory only: the previous run's are
    // dropped from the kernel, not kept without an expiry.
    fx.daemon.kill9()?;
    fx.daemon.restart()?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::lifecycle("sandbox-adopt").sandbox(&name),
    )?;
    tcp_blocked_at(&fx, &fx.sandbox, origin(), 80, || {
        origin_hits(&fx.origin, v4(&fx.sandbox))
    })?;

    // Resolving again opens it again.
    resolves_and_reaches_the_origin(&fx, &fx.sandbox)
}

#[test]
fn wildcard_allows_subdomains_not_apex_or_lookalike() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();
    let unserved = UNSERVED_RESOLVER.to_string();

    for n in [PYPI_FILES, PYPI_DEEP, "Files.PyPI.example"] {
        ensure_resolves(sb, &[n], pypi(), &unserved)?;
        fx.wait_dns_record(
            &DnsMatch::new(name, n)
                .rcode("NOERROR")
                .verdict("allow")
                .rule("pypi")
                .resolved(pypi()),
        )?;
    }
    let hits = origin_hits(&fx.pypi_origin, v4(sb));
    expect::origin_body(&sb.curl(&[&format!("http://{PYPI_FILES}/")])?)?;
    expect::origin_body(&sb.curl(&[&format!("http://{PYPI_DEEP}/")])?)?;
    ensure!(
        origin_hits(&fx.pypi_origin, v4(sb)) == hits + 2,
        "the pypi origin should have logged both requests: {}",
        fx.pypi_origin.log()
    );

    for n in [PYPI_APEX, PYPI_LOOKALIKE] {
        ensure_status(sb, &[n], "NXDOMAIN")?;
        ensure_unresolvable(sb, n)?;
        expect::exit_code(&sb.curl(&[&format!("http://{n}/")])?, CURL_COULDNT_RESOLVE)?;
        fx.wait_dns_record(&DnsMatch::new(name, n).rcode("NXDOMAIN").verdict("deny"))?;
        ensure!(
            !fx.dns.asked(n),
            "dnsmasq was asked about {n}:\n{}",
            fx.dns.log()
        );
    }
    ensure!(
        !fx.dns.asked_containing("evil"),
        "dnsmasq was asked about the lookalike:\n{}",
        fx.dns.log()
    );
    // What they are in the world (the canary) stays closed.
    expect::tcp_blocked(&fx.sandbox, name, &fx.daemon, &fx.canary, canary(), 80)?;

    // Control: dnsmasq answers every one of them (asked from the world, after the checks).
    for (n, want) in [
        (PYPI_FILES, PYPI_V4),
        (PYPI_DEEP, PYPI_V4),
        (PYPI_APEX, CANARY_V4),
        (PYPI_LOOKALIKE, CANARY_V4),
    ] {
        let o = fx.dns.query_from(fx.world.netns(), &["+short", n])?;
        ensure!(
            String::from_utf8_lossy(&o.stdout).trim() == want.to_string(),
            "dnsmasq should answer {n} with {want}: {o:?}"
        );
    }
    Ok(())
}

#[test]
fn cname_chain_must_be_allowed_throughout() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();

    // cdn.pypi.example -> files.pypi.example: both allowed, the address is learned for
    // the name asked.
    let d = dig(sb, &[PYPI_CDN])?;
    ensure!(
        d.is("NOERROR") && d.addrs() == vec![pypi()],
        "dig {PYPI_CDN} should follow the CNAME to {PYPI_V4}: {}",
        d.describe()
    );
    fx.wait_dns_record(
        &DnsMatch::new(name, PYPI_CDN)
            .qtype("A")
            .rcode("NOERROR")
            .verdict("allow")
            .rule("pypi")
            .resolved(pypi()),
    )?;
    expect::origin_body(&sb.curl(&[&format!("http://{PYPI_CDN}/")])?)?;

    // alias.pypi.example -> evil.example: the alias is allowed (and asked upstream), the
    // target is not, so the whole answer is NXDOMAIN and nothing is learned.
    ensure_status(sb, &[PYPI_ALIAS], "NXDOMAIN")?;
    ensure_unresolvable(sb, PYPI_ALIAS)?;
    let rec = fx.wait_dns_record(
        &DnsMatch::new(name, PYPI_ALIAS)
            .qtype("A")
            .rcode("NXDOMAIN")
            .verdict("deny"),
    )?;
    ensure!(
        get_str(&rec, "dns.resolved_ip").is_none()
            && get_str(&rec, "event.reason").is_some_and(|r| !r.is_empty()),
        "the CNAME refusal should say why and release no address: {rec}"
    );
    ensure!(
        fx.dns.asked(PYPI_ALIAS),
        "the allowed alias should have been asked upstream:\n{}",
        fx.dns.log()
    );
    // The target's address would have been allowed on port 80 by the `pypi` rule had it
    // been learned: it must still be closed.
    expect::tcp_blocked(&fx.sandbox, name, &fx.daemon, &fx.canary, canary(), 80)?;
    Ok(())
}

#[test]
fn dns_over_tcp_and_to_any_server_is_answered_by_egressd() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();
    let unserved = UNSERVED_RESOLVER.to_string();
    let canary_s = CANARY_V4.to_string();

    // UDP and TCP to resolv.conf's nameserver (nobody serves it), and TCP to it by hand.
    ensure_resolves(sb, &[API_NAME], origin(), &unserved)?;
    ensure_resolves(sb, &["+tcp", API_NAME], origin(), &unserved)?;
    let d = dig(sb, &["+tcp", &format!("@{UNSERVED_RESOLVER}"), API_NAME])?;
    ensure!(
        d.is("NOERROR") && d.server.as_deref().is_some_and(|s| s.ends_with("(TCP)")),
        "dig +tcp should get its answer over TCP: {}",
        d.describe()
    );
    // UDP to the canary's address, which listens on UDP 53, and TCP 53 there, where
    // nothing listens: egressd answers both, the canary hears nothing.
    ensure_resolves(
        sb,
        &[&format!("@{CANARY_V4}"), API_NAME],
        origin(),
        &canary_s,
    )?;
    ensure_resolves(
        sb,
        &["+tcp", &format!("@{CANARY_V4}"), API_NAME],
        origin(),
        &canary_s,
    )?;
    // Even asked straight at the world's real server, a forbidden name stays home.
    ensure_status(sb, &[&format!("@{DNS_V4}"), EVIL_NAME], "NXDOMAIN")?;
    ensure_status(sb, &["+tcp", &format!("@{DNS_V4}"), EVIL_NAME], "NXDOMAIN")?;

    // By hand, with sockets that connect (UDP, TCP) and that never do (UDP sendto), to
    // IPv4 and IPv6 servers: all answered by egressd. (Where the answer appears to come
    // from is checked by `answers_appear_to_come_from_the_server_asked`.)
    for server in [
        IpAddr::V4(UNSERVED_RESOLVER),
        canary(),
        IpAddr::V6(CANARY_V6),
    ] {
        for mode in ["udp-sendto", "udp-connect", "tcp"] {
            let a = raw_query(sb, server, API_NAME, mode, "A")?;
            ensure!(
                a.ok && a.id_match && a.rcode == Some(0) && a.addrs == vec![origin()],
                "{mode} query to {server}:53 should be answered {ORIGIN_V4}: {}",
                a.raw
            );
        }
    }
    expect::canary_silent(&fx.canary)?;
    ensure!(
        !fx.dns.asked_containing("evil"),
        "dnsmasq was asked about {EVIL_NAME}:\n{}",
        fx.dns.log()
    );
    let sb_addr = sb.addrs().v4.to_string();
    ensure!(
        fx.dns.queries().iter().all(|q| q.from != sb_addr),
        "the sandbox reached dnsmasq itself:\n{}",
        fx.dns.log()
    );

    // The kernel recorded the redirections, by transport.
    for (transport, ip) in [
        ("udp", IpAddr::V4(UNSERVED_RESOLVER)),
        ("tcp", IpAddr::V4(UNSERVED_RESOLVER)),
        ("udp", canary()),
        ("tcp", canary()),
        ("udp", IpAddr::V6(CANARY_V6)),
        ("tcp", IpAddr::V6(CANARY_V6)),
        ("udp", IpAddr::V4(DNS_V4)),
        ("tcp", IpAddr::V4(DNS_V4)),
    ] {
        fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("redirect", ip, 53)
                .transport(transport)
                .sandbox(name),
        )?;
    }
    // The unconnected sends were redirected at sendmsg.
    fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        Match::decision("redirect", canary(), 53)
            .transport("udp")
            .sandbox(name)
            .matches(r)
            && get_str(r, "event.action") == Some("sendmsg")
    })?;
    // One allowed record per A question (5 by dig, 9 by hand), and the denied ones.
    let allowed = DnsMatch::new(name, API_NAME).qtype("A").verdict("allow");
    let n = poll(RECORD_TIMEOUT, Duration::from_millis(50), || {
        let n = fx
            .daemon
            .audit_records()?
            .iter()
            .filter(|r| allowed.matches(r))
            .count();
        Ok((n >= 14).then_some(n))
    })?;
    ensure!(
        n.is_some(),
        "expected 14 allowed A records for {API_NAME}:{}",
        summarize(&fx.daemon.audit_records()?)
    );
    fx.wait_dns_record(
        &DnsMatch::new(name, EVIL_NAME)
            .rcode("NXDOMAIN")
            .verdict("deny"),
    )?;

    // From a socket bound to the sandbox's link (`SO_BINDTODEVICE`), DNS would leave by
    // the link, never reach the resolver on loopback: refused when sent, with a record,
    // and the canary (which serves UDP 53) hears nothing.
    for op in ["udp-sendto", "udp-connect-send", "tcp-connect"] {
        let p = sb.probe_host(op, &canary_s, 53, &["--device", "link"])?;
        expect::eperm(&p).with_context(|| format!("{op} {canary_s}:53 bound to the link"))?;
    }
    let bound = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        Match::decision("deny", canary(), 53)
            .sandbox(name)
            .matches(r)
            && get_str(r, "rule.name") == Some("bound-device")
    })?;
    ensure!(
        get_str(&bound, "rule.name") == Some("bound-device"),
        "{bound}"
    );
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

/// glibc, musl and dig drop a UDP answer whose source is not the server they asked, so the
/// kernel makes the resolver's answers look as if that server had sent them: recvfrom's
/// address on an unconnected socket, getpeername on a connected one, for UDP and TCP.
#[test]
fn answers_appear_to_come_from_the_server_asked() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;
    // Every case is run and reported, then the test fails if any went wrong.
    let mut wrong = Vec::new();
    for server in [
        IpAddr::V4(UNSERVED_RESOLVER),
        canary(),
        IpAddr::V6(CANARY_V6),
        // A dual-stack socket asking an IPv4 server (Java's resolvers do): its sends go
        // through the kernel's IPv4 path with the peer connect6 redirected to.
        IpAddr::V6(CANARY_V4.to_ipv6_mapped()),
    ] {
        for mode in ["udp-sendto", "udp-connect", "tcp"] {
            let a = raw_query(sb, server, API_NAME, mode, "A")?;
            ensure!(
                a.ok && a.id_match && a.rcode == Some(0) && a.addrs == vec![origin()],
                "{mode} query to {server}:53 should be answered {ORIGIN_V4}: {}",
                a.raw
            );
            if a.from != Some(SocketAddr::new(server.to_canonical(), 53)) {
                wrong.push(format!(
                    "{mode} to {server}:53: the answer's peer is {:?}",
                    a.from.map(|f| f.to_string())
                ));
            }
        }
    }
    expect::canary_silent(&fx.canary)?;
    ensure!(
        wrong.is_empty(),
        "answers should appear to come from the server asked (port 53):\n  {}",
        wrong.join("\n  ")
    );
    Ok(())
}

#[test]
fn long_label_is_refused_and_never_forwarded() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();

    // 50 and 41 characters: over the 40-character exfiltration guard, though the names
    // match `**.pypi.example` and dnsmasq would answer them.
    for len in [50, 41] {
        let label = base32_label(len);
        let qname = format!("{label}.{PYPI_FILES}");
        ensure_status(sb, &[&qname], "REFUSED")?;
        ensure_status(sb, &["+tcp", &qname], "REFUSED")?;
        ensure_unresolvable(sb, &qname)?;
        let rec =
            fx.wait_dns_record(&DnsMatch::new(name, &qname).rcode("REFUSED").verdict("deny"))?;
        ensure!(
            get_str(&rec, "event.reason").is_some_and(|r| !r.is_empty()),
            "the refusal should say why: {rec}"
        );
        ensure!(
            !fx.dns.asked_containing(&label[..16]),
            "dnsmasq received the long label:\n{}",
            fx.dns.log()
        );
    }
    expect::canary_silent(&fx.canary)?;

    // Control: 40 characters are within the guard and resolve.
    let label = base32_label(40);
    let qname = format!("{label}.{PYPI_FILES}");
    ensure_resolves(sb, &[&qname], pypi(), &UNSERVED_RESOLVER.to_string())?;
    ensure!(
        fx.dns.asked(&qname),
        "dnsmasq should have been asked {qname}:\n{}",
        fx.dns.log()
    );
    Ok(())
}

#[test]
fn quic_and_dns_over_tls_to_an_allowed_address_are_denied() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    let sb = &fx.sandbox;
    let name = sb.label();
    // A second canary on the allowed address itself: QUIC (UDP 443), DoT (TCP 853) and
    // HTTPS (TCP 443), none of which the `api` rule (TCP 80) allows.
    let sa = |port| std::net::SocketAddr::new(origin(), port);
    let side = Canary::start_on(fx.world.netns(), &[sa(853), sa(443)], &[sa(443), sa(853)])?;

    ensure_resolves(sb, &[API_NAME], origin(), &UNSERVED_RESOLVER.to_string())?;
    expect::origin_body(&sb.curl(&[&format!("http://{API_NAME}/")])?)?;

    // QUIC: unconnected and connected UDP to 443, by name (python resolves it through
    // egressd) and by address.
    expect::eperm(&sb.probe_host("udp-sendto", API_NAME, 443, &[])?)?;
    expect::eperm(&sb.probe("udp-connect-send", origin(), 443, &[])?)?;
    records(
        &fx.daemon,
        &Match::decision("deny", origin(), 443)
            .transport("udp")
            .sandbox(name),
        2,
    )?;

    // DNS over TLS: dig +tls to the allowed address gets no answer, the connect EPERM.
    let d = dig(sb, &["+tls", &format!("@{ORIGIN_V4}"), API_NAME])?;
    ensure!(
        d.status.is_none() && !d.out.status.success(),
        "dig +tls to {ORIGIN_V4}:853 should fail: {}",
        d.describe()
    );
    expect::eperm(&sb.probe("tcp-connect", origin(), 853, &[])?)?;
    expect::exit_code(
        &sb.curl(&[&format!("https://{API_NAME}:853/")])?,
        expect::CURL_COULDNT_CONNECT,
    )?;
    records(
        &fx.daemon,
        &Match::decision("deny", origin(), 853)
            .transport("tcp")
            .sandbox(name),
        3,
    )?;
    // HTTPS to it too: the rule is TCP 80 only.
    expect::exit_code(
        &sb.curl(&[&format!("https://{API_NAME}/")])?,
        expect::CURL_COULDNT_CONNECT,
    )?;
    records(
        &fx.daemon,
        &Match::decision("deny", origin(), 443)
            .transport("tcp")
            .sandbox(name),
        1,
    )?;

    std::thread::sleep(expect::CANARY_SETTLE);
    let got = side.received()?;
    ensure!(
        got.is_empty(),
        "the canary on {ORIGIN_V4} received traffic that should have been blocked: {got:#?}"
    );
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

#[test]
fn two_sandboxes_resolve_and_learn_separately() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    let other = fx.add_sandbox("sb2")?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    fx.attach(&other.sandbox, PYPI_ONLY_POLICY)?;
    let (a, b) = (&fx.sandbox, &other.sandbox);
    let unserved = UNSERVED_RESOLVER.to_string();

    // sb may resolve api.example.com and does.
    ensure_resolves(a, &[API_NAME], origin(), &unserved)?;
    expect::origin_body(&a.curl(&[&format!("http://{API_NAME}/")])?)?;
    let asked = fx.dns.queries_for(API_NAME).len();

    // sb2 may not: NXDOMAIN from its own resolver, nothing upstream.
    ensure_status(b, &[API_NAME], "NXDOMAIN")?;
    ensure_unresolvable(b, API_NAME)?;
    expect::exit_code(
        &b.curl(&[&format!("http://{API_NAME}/")])?,
        CURL_COULDNT_RESOLVE,
    )?;
    ensure!(
        fx.dns.queries_for(API_NAME).len() == asked,
        "sb2's query for {API_NAME} reached dnsmasq:\n{}",
        fx.dns.log()
    );
    fx.wait_dns_record(
        &DnsMatch::new(b.label(), API_NAME)
            .rcode("NXDOMAIN")
            .verdict("deny"),
    )?;
    fx.wait_dns_record(
        &DnsMatch::new(a.label(), API_NAME)
            .rcode("NOERROR")
            .verdict("allow")
            .resolved(origin()),
    )?;

    // The address sb learned is still closed to sb2.
    let recs = tcp_blocked_at(&fx, b, origin(), 80, || origin_hits(&fx.origin, v4(b)))?;
    for r in &recs {
        ensure!(
            get_str(r, "rule.name") == Some("default")
                && get_u64(r, "egress.sandbox.cgroup_id") == Some(b.cgroup().id()),
            "sb2's deny should be its default's, in its cgroup: {r}"
        );
    }
    ensure!(
        origin_hits(&fx.origin, v4(b)) == 0,
        "the origin heard from sb2: {}",
        fx.origin.log()
    );

    // sb2 resolves its own names; what it learns is closed to sb.
    ensure_resolves(b, &[PYPI_FILES], pypi(), &unserved)?;
    expect::origin_body(&b.curl(&[&format!("http://{PYPI_FILES}/")])?)?;
    tcp_blocked_at(&fx, a, pypi(), 80, || origin_hits(&fx.pypi_origin, v4(a)))?;
    // And sb keeps what it learned.
    expect::origin_body(&a.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    Ok(())
}

/// Every query redirected to the resolver keeps its socket's original destination on that
/// socket: sockets of the same or another sandbox, however many and however often
/// connected again, cannot push it out (the answers would then come from the resolver's
/// own address, which clients drop), and a closed socket's goes with it. A socket
/// connected to port 53 is checked after 66,000 others (more than a shared map of 65,536
/// entries holds) were connected to port 53, and connected again; beside it, one
/// connected after them.
#[test]
fn a_sockets_redirect_survives_any_number_of_others() -> Result<()> {
    require_dns_tools!();
    let fx = DnsFixture::new(LONG_TTL)?;
    fx.attach(&fx.sandbox, NAMES_POLICY)?;
    // Four processes hold 16,500 redirected sockets each at once (a process may hold
    // fewer than 20,000 here), each bound to a loopback address of its own: the local
    // port range has room for fewer than 30,000 sockets per address.
    const PROCESSES: usize = 4;
    const PER_PROCESS: usize = 16_500;
    const OTHERS: usize = PROCESSES * PER_PROCESS;
    let script = format!(
        "import os, resource, socket\n\
         hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
         first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         first.connect(('{UNSERVED_RESOLVER}', 53))\n\
         ready_r, ready_w = os.pipe()\n\
         go_r, go_w = os.pipe()\n\
         kids = []\n\
         for _ in range({PROCESSES}):\n\
         \x20   pid = os.fork()\n\
         \x20   if pid == 0:\n\
         \x20       held = []\n\
         \x20       for _ in range({PER_PROCESS}):\n\
         \x20           s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20           s.bind(('127.0.0.%d' % (2 + len(kids)), 0))\n\
         \x20           s.connect(('{UNSERVED_RESOLVER}', 53))\n\
         \x20           held.append(s)\n\
         \x20       for s in held:\n\
         \x20           s.connect(('{UNSERVED_RESOLVER}', 53))\n\
         \x20       os.write(ready_w, b'.')\n\
         \x20       os.read(go_r, 1)\n\
         \x20       os._exit(0)\n\
         \x20   kids.append(pid)\n\
         ready = 0\n\
         while ready < {PROCESSES}:\n\
         \x20   ready += len(os.read(ready_r, {PROCESSES}))\n\
         after = first.getpeername()\n\
         control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         control.connect(('{UNSERVED_RESOLVER}', 53))\n\
         fresh = control.getpeername()\n\
         os.write(go_w, b'.' * {PROCESSES})\n\
         for pid in kids:\n\
         \x20   os.waitpid(pid, 0)\n\
         print('%s:%d %s:%d' % (after + fresh))\n"
    );
    let out = fx.sandbox.run("python3", &["-c", &script])?;
    let asked = format!("{UNSERVED_RESOLVER}:53");
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == format!("{asked} {asked}"),
        "the peer of a socket redirected before {OTHERS} others, and of one redirected \
         after them (both should be {asked}): {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The storage is pinned: a restarted daemon keeps the destinations of sockets opened
    // before it.
    ensure!(
        fx.daemon.map_pinned("SOCK_STATE"),
        "the sockets' original destinations are not pinned"
    );
    // Positive control: the redirect itself still works.
    ensure_resolves(
        &fx.sandbox,
        &[&format!("@{UNSERVED_RESOLVER}"), API_NAME],
        origin(),
        &UNSERVED_RESOLVER.to_string(),
    )?;
    Ok(())
}
