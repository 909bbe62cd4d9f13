//! Observability: a real Prometheus server scrapes the daemon's `/metrics` while a sandbox
//! makes an allowed and a denied connect, `promtool` checks the exposition,
//! `egressctl audit show|follow` render the audit log and follow it through rotation, and
//! a real rsyslogd receives the collector feed through a restart, with the overflow
//! accounted for by a `collector-lost` record.
//!
//! Needs root, cgroup v2 and bpffs (skipped with a message otherwise), Debian's
//! `prometheus` (`prometheus`, `promtool`) and `rsyslog` packages (installed by
//! scripts/setup.sh) and the egressd / egressctl binaries.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use egress_tests::{
    audit::Match,
    daemon::{egressctl_bin, DaemonOpts},
    expect::{self, RECORD_TIMEOUT},
    fixture::{Fixture, WEB_ORIGIN_DENY},
    require_root,
    util::{bounded, kill_with_parent, poll, run_checked, which, ChildGuard, TempDir},
    world::{CANARY_V4, ORIGIN_V4},
};
use serde_json::Value;

/// Removes terminal colour codes from the daemon's log.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address the daemon says it serves metrics on (it was given port 0).
fn metrics_addr(log: &str) -> Option<String> {
    let log = strip_ansi(log);
    let line = log
        .lines()
        .find(|l| l.contains("Serving Prometheus metrics"))?;
    let addr = line.split("bound=").nth(1)?.split_whitespace().next()?;
    Some(addr.to_owned())
}

fn free_loopback_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn curl(args: &[&str]) -> Result<String> {
    let out = run_checked(&mut bounded(
        10,
        "curl",
        &[&["-sS", "--fail"], args].concat(),
    ))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Asks Prometheus for `query` until it returns a sample whose value satisfies `ok`.
fn prometheus_value(api: &str, query: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    let found = poll(Duration::from_secs(30), Duration::from_millis(500), || {
        // Until Prometheus listens, a refused connection just means "not yet".
        let Ok(body) = curl(&[
            "-G",
            &format!("{api}/api/v1/query"),
            "--data-urlencode",
            &format!("query={query}"),
        ]) else {
            return Ok(None);
        };
        let v: Value =
            serde_json::from_str(&body).with_context(|| format!("Prometheus answered {body}"))?;
        let value = v["data"]["result"]
            .as_array()
            .and_then(|r| r.first())
            .and_then(|s| s["value"][1].as_str())
            .and_then(|s| s.parse::<f64>().ok());
        Ok(value.filter(|v| ok(*v)))
    })?;
    found.with_context(|| format!("Prometheus never had a matching sample for {query}"))
}

#[test]
fn prometheus_scrapes_decisions_and_promtool_accepts_them() -> Result<()> {
    require_root!();
    let (Some(prometheus), Some(promtool)) = (which("prometheus"), which("promtool")) else {
        bail!("prometheus and promtool are needed (Debian package `prometheus`; scripts/setup.sh installs it)");
    };
    let fx = Fixture::with_opts(DaemonOpts {
        extra_args: vec!["--metrics".into(), "127.0.0.1:0".into()],
        ..Default::default()
    })?;
    let target =
        metrics_addr(&fx.daemon.log()).context("the daemon did not say where it serves metrics")?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label().to_owned();

    // An allowed connect (positive control) and a denied one, proved three ways.
    expect::origin_body(&fx.sandbox.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(ORIGIN_V4), 80).sandbox(&name),
    )?;
    expect::tcp_blocked(
        &fx.sandbox,
        &name,
        &fx.daemon,
        &fx.canary,
        IpAddr::V4(CANARY_V4),
        9,
    )?;

    // The exposition as a plain client gets it passes promtool's checks.
    let text = curl(&[&format!("http://{target}/metrics")])?;
    let mut check = Command::new(&promtool);
    check
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = check.spawn().context("spawn promtool")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // No address reaches a label.
    ensure!(
        !text.contains(&CANARY_V4.to_string()),
        "an address in the metrics:\n{text}"
    );

    // A real Prometheus scrapes it (OpenMetrics) every second.
    let dir = TempDir::new("prometheus")?;
    let port = free_loopback_port()?;
    let config = dir.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: egressd\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )?;
    let mut cmd = Command::new(&prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log"))?);
    kill_with_parent(&mut cmd);
    let _prom = ChildGuard::new(cmd.spawn().context("spawn prometheus")?, "prometheus");
    let api = format!("http://127.0.0.1:{port}");

    let up = prometheus_value(&api, r#"up{job="egressd"}"#, |v| v == 1.0).with_context(|| {
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    })?;
    ensure!(up == 1.0);
    prometheus_value(
        &api,
        &format!(
            r#"sum(egressd_decisions_total{{sandbox="{name}",verdict="deny",hook="connect4",rule="default"}})"#
        ),
        |v| v >= 2.0,
    )?;
    prometheus_value(
        &api,
        &format!(
            r#"sum(egressd_decisions_total{{sandbox="{name}",verdict="allow",rule="web-origin"}})"#
        ),
        |v| v >= 1.0,
    )?;
    prometheus_value(&api, "egressd_audit_written_records_total", |v| v >= 3.0)?;
    prometheus_value(&api, "egressd_ring_buffer_capacity_bytes", |v| v > 0.0)?;
    prometheus_value(&api, "egressd_open_fds", |v| v > 0.0)?;
    prometheus_value(&api, "egressd_sandboxes", |v| v == 1.0)?;

    // The same decisions, read back from the audit log by the live view.
    let out = fx.daemon.ctl([
        "audit",
        "show",
        "--file",
        &fx.daemon.audit_log().display().to_string(),
        "--sandbox",
        &name,
        "--verdict",
        "deny",
    ])?;
    ensure!(out.status.success(), "audit show failed: {out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = shown.lines().collect();
    ensure!(
        lines.len() >= 2
            && lines
                .iter()
                .all(|l| l.contains(&name) && l.contains(" DENY "))
            && lines
                .iter()
                .any(|l| l.contains(&format!("connect         {CANARY_V4}:9/tcp"))),
        "audit show --verdict deny printed:\n{shown}"
    );
    Ok(())
}

/// Lines a child prints, collected by a thread so that reads can time out.
fn line_reader(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for the next `n` lines.
fn next_lines(rx: &mpsc::Receiver<String>, n: usize, what: &str) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => out.push(l),
            Err(_) => bail!("{what}: expected {n} lines, got {out:?}"),
        }
    }
    Ok(out)
}

fn record(seq: u64, sandbox: &str, verdict: &str, port: u16) -> String {
    format!(
        r#"{{"@timestamp":"2026-11-21T22:03:{:02}.000000Z","event":{{"kind":"event","action":"connect","outcome":"failure","sequence":{seq}}},"destination":{{"ip":"203.0.113.66","port":{port}}},"network":{{"type":"ipv4","transport":"tcp","iana_number":"6"}},"rule":{{"name":"default"}},"egress":{{"sandbox":{{"name":"{sandbox}"}},"verdict":"{verdict}"}}}}"#,
        seq % 60
    ) + "\n"
}

fn append(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[test]
fn audit_follow_filters_and_follows_rotation() -> Result<()> {
    let dir = TempDir::new("follow")?;
    let log = dir.path().join("audit.jsonl");
    // Already there when follow starts: not shown (follow starts at the end).
    append(&log, &record(1, "agent-a", "deny", 1))?;

    let mut cmd = Command::new(egressctl_bin());
    cmd.args([
        "audit",
        "follow",
        "--verdict",
        "deny",
        "--sandbox",
        "agent-a",
        "--file",
    ])
    .arg(&log)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    kill_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("spawn egressctl audit follow")?;
    let stdout = child.stdout.take().context("follow stdout")?;
    let stderr = child.stderr.take().context("follow stderr")?;
    let _guard = ChildGuard::new(child, "egressctl audit follow");
    let rx = line_reader(stdout);
    // It says on stderr once it has opened the file and gone to its end.
    let ready = next_lines(&line_reader(stderr), 1, "start")?;
    ensure!(ready[0].contains("following"), "follow said {ready:?}");

    append(&log, &record(2, "agent-a", "deny", 2))?;
    append(&log, &record(3, "agent-a", "allow", 3))?; // filtered: verdict
    append(&log, &record(4, "agent-b", "deny", 4))?; // filtered: sandbox
    let got = next_lines(&rx, 1, "appended")?;
    ensure!(
        got[0].contains("203.0.113.66:2/tcp") && got[0].contains(" DENY "),
        "{got:?}"
    );

    // logrotate `create`: the file is renamed, the writer still appends a record to it,
    // then a new file appears at the path.
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&log, &rotated)?;
    append(&rotated, &record(5, "agent-a", "deny", 5))?;
    std::thread::sleep(Duration::from_millis(500));
    append(&log, &record(6, "agent-a", "deny", 6))?;
    let got = next_lines(&rx, 2, "rotated")?;
    ensure!(
        got[0].contains("203.0.113.66:5/tcp") && got[1].contains("203.0.113.66:6/tcp"),
        "after rotation: {got:?}"
    );

    // copytruncate: the same file is emptied and written again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)?
        .set_len(0)?;
    append(&log, &record(7, "agent-a", "deny", 7))?;
    let got = next_lines(&rx, 1, "truncated")?;
    ensure!(
        got[0].contains("203.0.113.66:7/tcp"),
        "after truncation: {got:?}"
    );

    // Nothing that the filters exclude came through.
    std::thread::sleep(Duration::from_millis(500));
    ensure!(rx.try_recv().is_err(), "unexpected extra output");

    // `show` with --json prints the matching lines unchanged.
    let out = run_checked(
        Command::new(egressctl_bin())
            .args(["audit", "show", "--json", "--kind", "network", "--file"])
            .arg(&rotated),
    )?;
    let shown = String::from_utf8_lossy(&out.stdout);
    ensure!(
        shown
            == format!(
                "{}{}{}{}{}",
                record(1, "agent-a", "deny", 1),
                record(2, "agent-a", "deny", 2),
                record(3, "agent-a", "allow", 3),
                record(4, "agent-b", "deny", 4),
                record(5, "agent-a", "deny", 5)
            ),
        "audit show --json printed:\n{shown}"
    );
    Ok(())
}

/// An rsyslogd of our own: `imtcp` on `port` (octet-counted framing), each message's MSG
/// written to `received.log` in `dir`.
fn start_rsyslog(rsyslogd: &Path, dir: &Path, port: u16) -> Result<ChildGuard> {
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            r#"global(workDirectory="{dir}")
module(load="imtcp")
template(name="msgonly" type="string" string="%msg%\n")
ruleset(name="egressd") {{
  action(type="omfile" file="{dir}/received.log" template="msgonly")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="egressd")
"#,
            dir = dir.display()
        ),
    )?;
    let mut cmd = Command::new(rsyslogd);
    cmd.arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("rsyslogd.err"))?);
    kill_with_parent(&mut cmd);
    let guard = ChildGuard::new(cmd.spawn().context("spawn rsyslogd")?, "rsyslogd");
    let up = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ()))
    })?;
    ensure!(
        up.is_some(),
        "rsyslogd did not listen on {port}: {}",
        std::fs::read_to_string(dir.join("rsyslogd.err")).unwrap_or_default()
    );
    Ok(guard)
}

/// The JSON records rsyslog received.
fn received(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("received.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect()
}

fn sequence(v: &Value) -> Option<u64> {
    v["event"]["sequence"].as_u64()
}

#[test]
fn records_reach_rsyslog_through_a_restart_and_overflow_is_reported() -> Result<()> {
    require_root!();
    let Some(rsyslogd) = which("rsyslogd") else {
        bail!("rsyslogd is needed (Debian package `rsyslog`; scripts/setup.sh installs it)");
    };
    let dir = TempDir::new("rsyslog")?;
    let port = free_loopback_port()?;
    let config = dir.write(
        "egressd.yaml",
        &format!("collector:\n  syslog_tcp: 127.0.0.1:{port}\n  queue: 4\n"),
    )?;
    let mut rsyslog = start_rsyslog(&rsyslogd, dir.path(), port)?;
    let fx = Fixture::with_opts(DaemonOpts {
        extra_args: vec!["--config".into(), config.display().to_string()],
        ..Default::default()
    })?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let name = fx.sandbox.label().to_owned();
    expect::origin_body(&fx.sandbox.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(ORIGIN_V4), 80).sandbox(&name),
    )?;

    // Every record so far reaches the collector as written to the log.
    let got = poll(Duration::from_secs(15), Duration::from_millis(200), || {
        let r = received(dir.path());
        Ok(r.iter()
            .any(|v| v["event"]["action"] == "connect")
            .then_some(r))
    })?
    .context("the allowed connect never reached rsyslog")?;
    let log = fx.daemon.audit_records()?;
    for v in &got {
        ensure!(
            log.contains(v),
            "rsyslog got a record the audit log does not hold: {v}"
        );
    }
    ensure!(
        got.iter().any(|v| v["event"]["action"] == "daemon-start"),
        "daemon-start not shipped: {got:?}"
    );

    // The collector goes away; more records than the queue holds are written meanwhile.
    rsyslog.stop(libc::SIGTERM, Duration::from_secs(5));
    let before = fx.daemon.audit_records()?.len();
    for port in 20..30 {
        let p = fx
            .sandbox
            .probe("tcp-connect", IpAddr::V4(CANARY_V4), port, &[])?;
        expect::eperm(&p)?;
    }
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok((fx.daemon.audit_records()?.len() >= before + 10).then_some(()))
    })?
    .context("the denied connects were not recorded")?;
    expect::canary_silent(&fx.canary)?;

    // Back again: the queued records arrive, and a collector-lost record accounts for the
    // rest, so every sequence number since the first shipped is either there or counted.
    let _rsyslog = start_rsyslog(&rsyslogd, dir.path(), port)?;
    let got = poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let r = received(dir.path());
        Ok(r.iter()
            .any(|v| v["event"]["action"] == "collector-lost")
            .then_some(r))
    })?
    .with_context(|| {
        format!(
            "no collector-lost record; rsyslog got {:?}",
            received(dir.path())
        )
    })?;
    let mut lost_ranges = Vec::new();
    let mut shipped = std::collections::BTreeSet::new();
    for v in &got {
        if v["event"]["action"] == "collector-lost" {
            let l = &v["egress"]["lost"];
            let (count, first, last) = (
                l["count"].as_u64().unwrap_or(0),
                l["first_sequence"].as_u64().unwrap_or(0),
                l["last_sequence"].as_u64().unwrap_or(0),
            );
            ensure!(
                count >= 1 && first <= last && count <= last - first + 1,
                "bad loss record {v}"
            );
            lost_ranges.push((first, last));
        } else if let Some(s) = sequence(v) {
            shipped.insert(s);
        }
    }
    let log = fx.daemon.audit_records()?;
    let first = shipped.iter().next().copied().unwrap_or(1);
    let newest_lost = lost_ranges.iter().map(|r| r.1).max().unwrap_or(0);
    for s in log
        .iter()
        .filter_map(sequence)
        .filter(|s| (first..=newest_lost).contains(s))
    {
        ensure!(
            shipped.contains(&s) || lost_ranges.iter().any(|(a, b)| (*a..=*b).contains(&s)),
            "sequence {s} neither shipped nor reported lost (lost: {lost_ranges:?})"
        );
    }
    Ok(())
}
