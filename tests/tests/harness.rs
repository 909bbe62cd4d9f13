//! Self-tests of the harness: they need root but not egressd.
//!
//! They check that the fake internet works with no confinement (so a block seen in the
//! other tests is the daemon's doing), that the canary records what reaches it, that the
//! escape-attempt commands used elsewhere really would escape without the daemon, and
//! that every guard cleans up. Skipped (with a message) when not root or when cgroup v2 /
//! bpffs are unavailable.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::cgroup::{cgroup2_mount, CgroupGuard};
use egress_tests::daemon::BpffsDir;
use egress_tests::expect;
use egress_tests::require_root;
use egress_tests::sandbox::wait_probe_file;
use egress_tests::servers::{Canary, Origin};
use egress_tests::util::python;
use egress_tests::world::{World, CANARY_V4, CANARY_V6, ORIGIN_V4, ORIGIN_V6};

fn netns_exists(name: &str) -> Result<bool> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name)))
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; our guards reap, so gone means gone.
    PathBuf::from(format!("/proc/{pid}")).exists()
}

#[test]
fn origin_reachable_from_sandbox_without_daemon() -> Result<()> {
    require_root!();
    let world = World::new()?;
    let _origin = Origin::start(&world)?;
    let sb = world.add_sandbox("sb")?;
    expect::origin_body(&sb.curl(&[&format!("http://{ORIGIN_V4}/")])?)?;
    expect::origin_body(&sb.curl(&["-6", &format!("http://[{ORIGIN_V6}]/")])?)?;
    // The origin does not answer on the canary addresses (nothing listens there).
    let p = sb.probe("tcp-connect", IpAddr::V4(CANARY_V4), 80, &[])?;
    ensure!(
        p.errname.as_deref() == Some("ECONNREFUSED"),
        "expected ECONNREFUSED from a canary address without canary: {}",
        p.raw
    );
    Ok(())
}

#[test]
fn canary_records_tcp_and_udp_without_daemon() -> Result<()> {
    require_root!();
    let world = World::new()?;
    let canary = Canary::start(&world)?;
    let sb = world.add_sandbox("sb")?;
    ensure!(canary.received()?.is_empty(), "fresh canary not empty");

    expect::probe_ok(&sb.probe("tcp-connect", IpAddr::V4(CANARY_V4), 9, &["--send", "t4"])?)?;
    expect::probe_ok(&sb.probe("tcp-connect", IpAddr::V6(CANARY_V6), 443, &["--send", "t6"])?)?;
    expect::probe_ok(&sb.probe("udp-sendto", IpAddr::V4(CANARY_V4), 9, &["--send", "u4"])?)?;
    expect::probe_ok(&sb.probe(
        "udp-connect-send",
        IpAddr::V6(CANARY_V6),
        53,
        &["--send", "u6"],
    )?)?;
    expect::probe_ok(&sb.probe_host(
        "tcp-connect",
        "::ffff:203.0.113.66",
        80,
        &["--send", "m"],
    )?)?;
    expect::probe_ok(&sb.probe("tcp-fastopen", IpAddr::V6(CANARY_V6), 9, &["--send", "f6"])?)?;
    // curl too, so "curl exit 7" in the real tests is not a quirk of the topology.
    let out = sb.curl(&[&format!("http://{CANARY_V4}:9/")])?;
    ensure!(
        out.status.code() != Some(expect::CURL_COULDNT_CONNECT),
        "curl could not connect to the canary without a daemon: {out:?}"
    );

    let want: [(&str, &str, SocketAddr, &[u8]); 6] = [
        (
            "tcp",
            "data",
            SocketAddr::new(IpAddr::V4(CANARY_V4), 9),
            b"t4",
        ),
        (
            "tcp",
            "data",
            SocketAddr::new(IpAddr::V6(CANARY_V6), 443),
            b"t6",
        ),
        (
            "udp",
            "datagram",
            SocketAddr::new(IpAddr::V4(CANARY_V4), 9),
            b"u4",
        ),
        (
            "udp",
            "datagram",
            SocketAddr::new(IpAddr::V6(CANARY_V6), 53),
            b"u6",
        ),
        (
            "tcp",
            "data",
            SocketAddr::new(IpAddr::V4(CANARY_V4), 80),
            b"m",
        ),
        (
            "tcp",
            "data",
            SocketAddr::new(IpAddr::V6(CANARY_V6), 9),
            b"f6",
        ),
    ];
    for (proto, kind, local, data) in want {
        let got = canary.wait_for(Duration::from_secs(5), |e| {
            e.proto == proto && e.kind == kind && e.local == local && e.data == data
        })?;
        ensure!(
            got.is_some(),
            "canary did not record {proto} {kind} {data:?} at {local}: {:#?}",
            canary.received()?
        );
    }
    // Every connection also has an accept event, with the sandbox as peer.
    let accepts: Vec<_> = canary
        .received()?
        .into_iter()
        .filter(|e| e.kind == "accept")
        .collect();
    ensure!(accepts.len() >= 4, "accepts: {accepts:#?}");
    let sb_v4 = IpAddr::V4(sb.addrs().v4);
    ensure!(
        accepts.iter().any(|e| e.peer.ip().to_canonical() == sb_v4),
        "no accept from the sandbox address {sb_v4}: {accepts:#?}"
    );
    Ok(())
}

#[test]
fn sandbox_commands_run_in_cgroup_and_netns() -> Result<()> {
    require_root!();
    let world = World::new()?;
    let sb = world.add_sandbox("sb")?;
    let rel = sb
        .cgroup()
        .path()
        .strip_prefix(cgroup2_mount()?)
        .context("cgroup under mount")?
        .display()
        .to_string();
    let p = sb.probe("udp-sendto", IpAddr::V4(CANARY_V4), 9, &[])?;
    ensure!(
        p.raw["cgroup"][0].as_str() == Some(&format!("0::/{rel}")),
        "probe not in the sandbox cgroup: {}",
        p.raw
    );
    let host_ns = std::fs::read_link("/proc/self/ns/net")?
        .display()
        .to_string();
    ensure!(
        p.raw["netns"].as_str() != Some(host_ns.as_str()),
        "probe ran in the host netns"
    );
    // cgroup id is the inode number.
    use std::os::unix::fs::MetadataExt;
    ensure!(std::fs::metadata(sb.cgroup().path())?.ino() == sb.cgroup().id());
    Ok(())
}

#[test]
fn escape_commands_escape_without_daemon() -> Result<()> {
    // Controls for the confinement tests: without egressd, a daemonised grandchild and a
    // process in a fresh network namespace both connect, so EPERM there is the hook.
    require_root!();
    let world = World::new()?;
    let canary = Canary::start(&world)?;
    let sb = world.add_sandbox("sb")?;
    let dir = egress_tests::util::TempDir::new("escape")?;
    let out_file = dir.path().join("grandchild.json");
    sb.spawn_daemonised_probe(&out_file, "tcp-connect", &CANARY_V4.to_string(), 9)?;
    let p = wait_probe_file(&out_file)?;
    expect::probe_ok(&p)?;
    ensure!(p.raw["ppid"].as_u64() != Some(u64::from(std::process::id())));
    ensure!(
        canary
            .wait_for(Duration::from_secs(5), |e| e.kind == "data")?
            .is_some(),
        "grandchild traffic not seen"
    );

    let p = sb.probe_in_new_netns("203.0.113.66", 9)?;
    expect::probe_ok(&p)?;
    ensure!(
        p.raw["listener_accepted"].as_bool() == Some(true),
        "{}",
        p.raw
    );
    let p = sb.probe_in_new_netns("2001:db8::66", 9)?;
    expect::probe_ok(&p)?;
    Ok(())
}

#[test]
fn guards_clean_up_everything() -> Result<()> {
    require_root!();
    let (netns_names, cgroup_paths, pids, bpffs_path) = {
        let world = World::new()?;
        let origin = Origin::start(&world)?;
        let canary = Canary::start(&world)?;
        let a = world.add_sandbox("a")?;
        let b = world.add_sandbox("b")?;
        // A process left behind in each sandbox (killed by the cgroup guard).
        for sb in [&a, &b] {
            sb.command("sleep", &["30"]).spawn()?;
            let started = egress_tests::util::poll(
                Duration::from_secs(5),
                Duration::from_millis(20),
                || Ok((!sb.cgroup().pids()?.is_empty()).then_some(())),
            )?;
            ensure!(
                started.is_some(),
                "sleep never joined {}",
                sb.cgroup().path().display()
            );
        }
        let bpffs = BpffsDir::new()?;
        std::fs::create_dir(bpffs.path().join("sub"))?;
        let mut pids: Vec<u32> = [origin.pid(), canary.pid()].into_iter().flatten().collect();
        pids.extend(a.cgroup().pids()?);
        pids.extend(b.cgroup().pids()?);
        (
            vec![
                world.netns().name().to_string(),
                a.netns().name().to_string(),
                b.netns().name().to_string(),
            ],
            vec![
                a.cgroup().path().to_path_buf(),
                b.cgroup().path().to_path_buf(),
            ],
            pids,
            bpffs.path().to_path_buf(),
        )
    };
    for n in &netns_names {
        ensure!(!netns_exists(n)?, "netns {n} left behind");
    }
    for c in &cgroup_paths {
        ensure!(!c.exists(), "cgroup {} left behind", c.display());
    }
    // Server pids were reaped; sandbox pids were children of `timeout` (our child, which
    // we did not wait for), so allow them a moment to be reaped.
    let all_gone =
        egress_tests::util::poll(Duration::from_secs(5), Duration::from_millis(50), || {
            Ok(pids
                .iter()
                .all(|p| !pid_alive(*p) || is_zombie(*p))
                .then_some(()))
        })?;
    ensure!(all_gone.is_some(), "processes left: {pids:?}");
    ensure!(
        !bpffs_path.exists(),
        "bpffs dir {} left",
        bpffs_path.display()
    );
    Ok(())
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn cgroup_guard_kills_and_removes() -> Result<()> {
    require_root!();
    let path;
    {
        let cg = CgroupGuard::new("guard")?;
        path = cg.path().to_path_buf();
        let mut child = std::process::Command::new(python())
            .args(["-c", "import time; time.sleep(30)"])
            .spawn()?;
        cg.add(child.id())?;
        ensure!(cg.pids()? == vec![child.id()]);
        drop(cg);
        let status = child.wait()?;
        ensure!(!status.success(), "child survived the cgroup guard");
    }
    ensure!(!path.exists(), "{} left", path.display());
    Ok(())
}
