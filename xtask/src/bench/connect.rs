//! `cargo xtask bench connect`: what confinement costs a `connect()`.
//!
//! One run, side by side: TCP connects to a loopback listener from a process outside any
//! sandbox and from one inside an attached sandbox (policy allows the listener), in
//! alternating rounds so machine noise hits both alike. Reports p50/p99 per side and their
//! ratio, and the kernel programs' own run time from BPF statistics.
//!
//! Then the audit pipeline, twice: two workers inside the sandbox make TCP connects as fast
//! as they can (connects per second, whether every one became an audit record or was
//! counted as lost, and the daemon's CPU time per record); then UDP connects at a ladder
//! of fixed rates ([`super::audit`]), for the most records per second with none lost.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use egress_tests::{
    cgroup::CgroupGuard,
    daemon::{Daemon, DaemonOpts},
};

use super::{
    audit::{Ladder, LogCounter},
    percentile,
};
use crate::cmd::{bin_in, build_bins_in, require_root, step};

/// Measures `connects` connects and prints the latencies (ns), one per line.
pub(super) fn worker(addr: SocketAddr, connects: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let mut lat = Vec::with_capacity(connects);
    for _ in 0..connects.min(200) {
        drop(TcpStream::connect(addr)?); // warm-up
    }
    for _ in 0..connects {
        let t = Instant::now();
        let s = TcpStream::connect(addr)?;
        lat.push(t.elapsed().as_nanos() as u64);
        drop(s);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for l in lat {
        writeln!(out, "{l}")?;
    }
    Ok(())
}

/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`: the connect and sendmsg hooks whose time per decision
/// is the benchmark's program-time figure.
const PROG_TYPE_SOCK_ADDR: u32 = 18;

/// A program type's name as the kernel's `enum bpf_prog_type` numbers them, for the
/// types the daemon loads.
fn prog_type_name(t: u32) -> &'static str {
    match t {
        8 => "cgroup_skb (packets)",
        9 => "cgroup_sock (create, release)",
        13 => "sock_ops (TCP callbacks)",
        PROG_TYPE_SOCK_ADDR => "cgroup_sock_addr (connect, sendmsg)",
        23 => "cgroup_sysctl",
        25 => "cgroup_sockopt",
        29 => "lsm",
        _ => "other",
    }
}

/// (run count, run time ns) of the daemon's programs, summed per program type, from the
/// `fdinfo` of its program descriptors (filled while `bpf_stats_enabled` is 1).
fn prog_stats(daemon_pid: u32) -> BTreeMap<u32, (u64, u64)> {
    let mut by_type = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{daemon_pid}/fdinfo")) else {
        return by_type;
    };
    for e in rd.filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let (mut prog_type, mut cnt, mut ns) = (None, 0, 0);
        for l in text.lines() {
            let mut it = l.split_whitespace();
            match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
                (Some("prog_type:"), Some(v)) => prog_type = u32::try_from(v).ok(),
                (Some("run_cnt:"), Some(v)) => cnt = v,
                (Some("run_time_ns:"), Some(v)) => ns = v,
                _ => {}
            }
        }
        if let Some(t) = prog_type {
            let entry = by_type.entry(t).or_insert((0, 0));
            entry.0 += cnt;
            entry.1 += ns;
        }
    }
    by_type
}

/// A loopback listener with a deep accept queue: at flood rates a queue of std's 128 fills
/// whenever the accepting thread is descheduled, and every SYN dropped then costs its
/// connect a one-second retransmission, which would measure the queue, not confinement.
fn deep_listener() -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    // SAFETY: listen(2) on a socket we own; calling it again only changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// A loopback listener whose connections a thread accepts and closes; its address.
fn accepting_listener() -> std::io::Result<SocketAddr> {
    let listener = deep_listener()?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    Ok(addr)
}

/// CPU time of a process (all its threads, also those that have ended), in nanoseconds:
/// the kernel's per-process CPU clock, exact to the nanosecond; `/proc/PID/stat`'s
/// clock ticks (10 ms each) if that clock cannot be read.
pub(super) fn cpu_ns(pid: u32) -> u64 {
    let mut clock: libc::clockid_t = 0;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both out-pointers are valid for writes.
    let read = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
            && libc::clock_gettime(clock, &mut now) == 0
    };
    if read {
        return now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    }
    cpu_ns_from_ticks(pid)
}

/// User + system CPU time of a process from `/proc/PID/stat`, in nanoseconds (clock-tick
/// resolution).
fn cpu_ns_from_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after `)`.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
}

/// The audit-pipeline settings of `bench connect`.
pub(super) struct AuditOpts {
    /// TCP connects in the flood case.
    pub flood: usize,
    /// Rungs of the UDP ladder, events per second.
    pub rates: Vec<u64>,
    /// Seconds per rung.
    pub secs: f64,
    /// Workers sharing each rung's rate.
    pub workers: u64,
}

pub(super) fn run(
    connects: usize,
    rounds: usize,
    audit: &AuditOpts,
    release: bool,
    pause_daemon: bool,
) -> anyhow::Result<()> {
    let flood = audit.flood;
    require_root("the connect benchmark")?;
    build_bins_in(release)?;
    let build = if release { "release" } else { "debug" };
    // SAFETY: single-threaded here.
    unsafe {
        std::env::set_var("EGRESSD_BIN", bin_in(release, "egressd"));
        std::env::set_var("EGRESSCTL_BIN", bin_in(release, "egressctl"));
    }
    step("Starting a loopback listener, egressd, and a sandbox cgroup allowed to reach it");
    let cgroup = CgroupGuard::new("bench")?;
    let daemon = Daemon::start(DaemonOpts::default())?;
    let policy = daemon.dir().join("bench.yaml");
    std::fs::write(
        &policy,
        "version: 1\ndefault: deny\nrules:\n  - name: bench-listener\n    to: [127.0.0.1]\n    protocol: tcp\n    action: allow\n  - name: bench-udp\n    to: [127.0.0.1]\n    protocol: udp\n    action: allow\n",
    )?;
    let out = daemon.ctl([
        "attach".as_ref(),
        "--cgroup".as_ref(),
        cgroup.path().as_os_str(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--name".as_ref(),
        "bench".as_ref(),
    ])?;
    if !out.status.success() {
        bail!("attach failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let stats_before = std::fs::read_to_string(stats_path).unwrap_or_default();
    std::fs::write(stats_path, "1").context("enabling BPF statistics")?;
    let me = std::env::current_exe()?;
    let daemon_pid = daemon.pid().unwrap_or(0);

    // Each side of each round connects to a listener of its own: connections of earlier
    // rounds sit in TIME_WAIT, and sharing a destination with them would make connect()
    // search longer for a free source port as the rounds go on.
    let run_side = |inside: bool| -> anyhow::Result<Vec<u64>> {
        let addr = accepting_listener()?;
        let worker = format!(
            "exec '{}' bench connect-worker {addr} {connects}",
            me.display()
        );
        let script = if inside {
            format!("echo $$ > '{}' && {worker}", cgroup.procs_file().display())
        } else {
            worker
        };
        let out = Command::new("sh").args(["-c", &script]).output()?;
        if !out.status.success() {
            bail!("worker failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect())
    };

    step(&format!(
        "Measuring {rounds} rounds x {connects} connects per side, alternating"
    ));
    let (mut outside, mut inside) = (Vec::new(), Vec::new());
    let stats0 = prog_stats(daemon_pid);
    let signal = |sig: libc::c_int| {
        if pause_daemon && daemon_pid > 0 {
            // SAFETY: kill(2) on the daemon this bench started.
            unsafe { libc::kill(daemon_pid as libc::pid_t, sig) };
        }
    };
    for r in 0..rounds {
        outside.extend(run_side(false)?);
        signal(libc::SIGSTOP);
        let side = run_side(true);
        signal(libc::SIGCONT);
        inside.extend(side?);
        eprintln!("  round {}/{rounds} done", r + 1);
    }
    let stats1 = prog_stats(daemon_pid);

    step(&format!(
        "Audit pipeline: {flood} connects from two workers inside the sandbox at once"
    ));
    // First let the latency rounds' records arrive, so they are not counted here.
    let latency_inside = (rounds * (connects + connects.min(200))) as u64;
    let mut log = LogCounter::new(&daemon.audit_log());
    log.wait_for(latency_inside, Duration::from_secs(30))?;
    let (records0, lost0) = (log.connects, log.lost);
    let cpu0 = cpu_ns(daemon_pid);
    let started = Instant::now();
    let per_worker = flood / 2;
    // Each worker gets a listener of its own, so the connects of the latency rounds (in
    // TIME_WAIT) and of the other worker do not crowd its source ports.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let port = accepting_listener()?.port();
            let script = format!(
                "echo $$ > '{}' && exec '{}' bench connect-worker 127.0.0.1:{port} {per_worker} >/dev/null",
                cgroup.procs_file().display(),
                me.display()
            );
            Command::new("sh").args(["-c", &script]).spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut w in workers {
        if !w.wait()?.success() {
            bail!("flood worker failed");
        }
    }
    let flood_secs = started.elapsed().as_secs_f64();
    // Every connect made (warm-up included) must reach the log or be counted lost.
    let expected = 2 * (per_worker + per_worker.min(200)) as u64;
    log.wait_for(records0 + lost0 + expected, Duration::from_secs(30))?;
    let (records, lost) = (log.connects, log.lost);
    let cpu = cpu_ns(daemon_pid).saturating_sub(cpu0);
    let written = records - records0;

    let rungs = if audit.rates.is_empty() {
        Vec::new()
    } else {
        step(&format!(
            "Audit pipeline: UDP connects from {} workers inside the sandbox at {:?}/s, {} s each",
            audit.workers, audit.rates, audit.secs
        ));
        // Nothing is ever sent to it: a UDP connect only sets the peer.
        let udp_target = UdpSocket::bind("127.0.0.1:0")?;
        let ladder = Ladder {
            procs_file: &cgroup.procs_file(),
            exe: &me,
            target: udp_target.local_addr()?,
            daemon_pid,
            workers: audit.workers.max(1),
            secs: audit.secs,
        };
        ladder.climb(&audit.rates, &mut log)?
    };
    let _ = std::fs::write(stats_path, stats_before.trim());
    outside.sort_unstable();
    inside.sort_unstable();

    let us = |ns: u64| ns as f64 / 1000.0;
    let (o50, o99) = (percentile(&outside, 0.5), percentile(&outside, 0.99));
    let (i50, i99) = (percentile(&inside, 0.5), percentile(&inside, 0.99));
    // Per program type over the latency rounds: (runs, run time ns) made by them.
    let programs: BTreeMap<u32, (u64, u64)> = stats1
        .iter()
        .map(|(t, &(c, ns))| {
            let (c0, ns0) = stats0.get(t).copied().unwrap_or_default();
            (*t, (c.saturating_sub(c0), ns.saturating_sub(ns0)))
        })
        .filter(|(_, (c, _))| *c > 0)
        .collect();
    let (runs, run_ns) = programs
        .get(&PROG_TYPE_SOCK_ADDR)
        .copied()
        .unwrap_or_default();
    let per_run = if runs > 0 {
        run_ns as f64 / runs as f64
    } else {
        0.0
    };
    println!();
    println!(
        "connect() to 127.0.0.1 ({} samples per side, {build} build{})",
        outside.len(),
        if pause_daemon {
            "; daemon stopped during the inside rounds"
        } else {
            ""
        }
    );
    println!("{:<28} {:>10} {:>10}", "", "p50 (us)", "p99 (us)");
    println!(
        "{:<28} {:>10.1} {:>10.1}",
        "outside any sandbox",
        us(o50),
        us(o99)
    );
    println!(
        "{:<28} {:>10.1} {:>10.1}",
        "inside attached sandbox",
        us(i50),
        us(i99)
    );
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "ratio inside/outside",
        i50 as f64 / o50.max(1) as f64,
        i99 as f64 / o99.max(1) as f64
    );
    println!(
        "kernel programs: {runs} runs, {per_run:.0} ns per run (bpf_stats run_time_ns / run_cnt)"
    );
    // Every program a connect inside the sandbox runs, not only the decision: what the
    // inside p50 pays on top of the outside one, as far as the programs' own time goes.
    let connects_inside = latency_inside.max(1) as f64;
    println!(
        "all programs over the latency rounds ({} connects inside):",
        latency_inside
    );
    println!(
        "  {:<38} {:>10} {:>12} {:>12} {:>14}",
        "program type", "runs", "per connect", "ns per run", "ns per connect"
    );
    let mut total_ns = 0;
    for (t, (c, ns)) in &programs {
        total_ns += ns;
        println!(
            "  {:<38} {:>10} {:>12.2} {:>12.0} {:>14.0}",
            prog_type_name(*t),
            c,
            *c as f64 / connects_inside,
            *ns as f64 / *c as f64,
            *ns as f64 / connects_inside
        );
    }
    println!(
        "  {:<38} {:>10} {:>12} {:>12} {:>14.0}",
        "all",
        "",
        "",
        "",
        total_ns as f64 / connects_inside
    );
    println!(
        "audit pipeline, TCP flood: {expected} connects in {flood_secs:.2} s = {:.0} connects/s; {written} records written, {} lost; daemon CPU {:.2} us per record",
        expected as f64 / flood_secs,
        lost - lost0,
        cpu as f64 / 1000.0 / written.max(1) as f64
    );
    if !rungs.is_empty() {
        println!(
            "audit pipeline, UDP connects at fixed rates ({} s per rate):",
            audit.secs
        );
        println!(
            "{:>12} {:>12} {:>10} {:>10} {:>8} {:>14}",
            "offered /s", "made /s", "events", "written", "lost", "daemon us/rec"
        );
        for r in &rungs {
            println!(
                "{:>12} {:>12.0} {:>10} {:>10} {:>8} {:>14.2}",
                r.offered,
                r.achieved(),
                r.events,
                r.written,
                r.lost,
                r.cpu_per_record_us()
            );
        }
        match rungs.iter().filter(|r| r.complete()).max_by(|a, b| a.achieved().total_cmp(&b.achieved())) {
            Some(best) => println!(
                "audit pipeline: {:.0} records/s with none lost at {:.2} us of daemon CPU per record",
                best.achieved(),
                best.cpu_per_record_us()
            ),
            None => println!("audit pipeline: every rate lost records"),
        }
    }
    drop(daemon);
    drop(cgroup);
    Ok(())
}
