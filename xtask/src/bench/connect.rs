//! `cargo xtask bench connect`: what confinement costs a `connect()`.
//!
//! One run, side by side: TCP connects to a loopback listener from a process outside any
//! sandbox and from one inside an attached sandbox (policy allows the listener), in
//! alternating rounds so machine noise hits both alike. Reports p50/p99 per side and their
//! ratio, and the kernel programs' own run time from BPF statistics.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context};
use egress_tests::{
    cgroup::CgroupGuard,
    daemon::{Daemon, DaemonOpts},
};

use super::percentile;
use crate::cmd::{bin, build_bins, require_root, step};

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

/// (run count, run time ns) summed over the daemon's cgroup_sock_addr programs.
fn prog_stats(daemon_pid: u32) -> (u64, u64) {
    let mut cnt = 0;
    let mut ns = 0;
    let Ok(rd) = std::fs::read_dir(format!("/proc/{daemon_pid}/fdinfo")) else {
        return (0, 0);
    };
    for e in rd.filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        // prog_type 18 = BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        if !text
            .lines()
            .any(|l| l.split_whitespace().eq(["prog_type:", "18"]))
        {
            continue;
        }
        for l in text.lines() {
            let mut it = l.split_whitespace();
            match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
                (Some("run_cnt:"), Some(v)) => cnt += v,
                (Some("run_time_ns:"), Some(v)) => ns += v,
                _ => {}
            }
        }
    }
    (cnt, ns)
}

pub(super) fn run(connects: usize, rounds: usize) -> anyhow::Result<()> {
    require_root("the connect benchmark")?;
    build_bins()?;
    // SAFETY: single-threaded here.
    unsafe {
        std::env::set_var("EGRESSD_BIN", bin("egressd"));
        std::env::set_var("EGRESSCTL_BIN", bin("egressctl"));
    }
    step("Starting a loopback listener, egressd, and a sandbox cgroup allowed to reach it");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let cgroup = CgroupGuard::new("bench")?;
    let daemon = Daemon::start(DaemonOpts::default())?;
    let policy = daemon.dir().join("bench.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\ndefault: deny\nrules:\n  - name: bench-listener\n    to: [127.0.0.1]\n    ports: [{}]\n    protocol: tcp\n    action: allow\n",
            addr.port()
        ),
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

    let run_side = |inside: bool| -> anyhow::Result<Vec<u64>> {
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
    let (c0, t0) = prog_stats(daemon_pid);
    for r in 0..rounds {
        outside.extend(run_side(false)?);
        inside.extend(run_side(true)?);
        eprintln!("  round {}/{rounds} done", r + 1);
    }
    let (c1, t1) = prog_stats(daemon_pid);
    let _ = std::fs::write(stats_path, stats_before.trim());
    outside.sort_unstable();
    inside.sort_unstable();

    let us = |ns: u64| ns as f64 / 1000.0;
    let (o50, o99) = (percentile(&outside, 0.5), percentile(&outside, 0.99));
    let (i50, i99) = (percentile(&inside, 0.5), percentile(&inside, 0.99));
    let runs = c1.saturating_sub(c0);
    let per_run = if runs > 0 {
        (t1 - t0) as f64 / runs as f64
    } else {
        0.0
    };
    println!();
    println!(
        "connect() to 127.0.0.1 ({} samples per side)",
        outside.len()
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
    drop(daemon);
    drop(cgroup);
    Ok(())
}
