//! Packets go only where the judged address says. A sandbox cannot make the kernel route
//! its packets through another address than the one connect/sendmsg judged: IPv4 source
//! routes (`IP_OPTIONS` loose and strict, by setsockopt on TCP and UDP; `IP_RETOPTS` as
//! control data on a UDP message) and IPv6 routing headers (`IPV6_RTHDR` types 0, 2 and 4
//! by setsockopt, the RFC 2292 form, and control data) are refused and recorded, with an
//! alert that summarises them. So are the options that would let a socket send from an
//! address that is not the host's (`IP_FREEBIND`, `IP_TRANSPARENT`, IPv6 forms): the bind
//! to that address then fails, and nothing leaves from it; so are writes to the namespace's
//! sysctls that would allow it (`ip_nonlocal_bind`), undo the daemon's port reservations
//! or route loopback addresses off the loopback device. Packet sockets are refused where the kernel runs BPF LSM
//! programs; where it does not, `status` and the attach record say they are not covered.
//! MPTCP sockets are refused and recorded as MPTCP, not TCP.
//!
//! Proved three ways: the C helper's errno, the deny records, and a packet capture in the
//! world namespace that saw nothing addressed to the first hop (and nothing with IPv4
//! options or an IPv6 routing header), beside positive controls that did go out.
//!
//! Needs root, cgroup v2, bpffs, gcc, tcpdump and the egressd binaries; skips otherwise.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{action, get_str, get_u64};
use egress_tests::expect;
use egress_tests::fixture::Fixture;
use egress_tests::require_root;
use egress_tests::util::{fixture, poll, which, ChildGuard};
use egress_tests::world::{CANARY_V4, CANARY_V6, ORIGIN_V4, ORIGIN_V6};
use serde_json::Value;

/// TCP and UDP to the origin on port 80 and to loopback port 9 are allowed; everything
/// else is denied.
const POLICY: &str = r#"version: 1
default: deny
rules:
  - name: origin
    to: [192.0.2.10, "2001:db8::10"]
    ports: [80]
    action: allow
  - name: loopback
    to: [127.0.0.1, "::1"]
    ports: [9]
    action: allow
"#;

/// Cases the helper must see refused with EPERM by egressd.
const REFUSED: [&str; 30] = [
    "udp4-freebind-setsockopt",
    "udp4-transparent-setsockopt",
    "udp6-freebind-setsockopt",
    "udp6-transparent-setsockopt",
    "tcp4-lsrr-setsockopt",
    "udp4-lsrr-setsockopt",
    "tcp4-ssrr-setsockopt",
    "udp4-ssrr-setsockopt",
    "udp4-retopts-cmsg",
    "udp6-rthdr0-setsockopt",
    "tcp6-rthdr0-setsockopt",
    "udp6-rthdr2-setsockopt",
    "tcp6-rthdr2-setsockopt",
    "udp6-rthdr4-setsockopt",
    "tcp6-rthdr4-setsockopt",
    "udp6-2292rthdr-setsockopt",
    "udp4-join-group",
    "udp4-join-source",
    "udp4-mcast-join-group",
    "udp6-join-group",
    "udp6-mcast-join-group",
    "udp6-flowlabel-cmsg",
    "mptcp-socket",
    "udp4-bound-dev-loopback",
    "udp6-bound-dev-loopback",
    "udp4-unicast-if-loopback",
    "sysctl-nonlocal-bind4",
    "sysctl-nonlocal-bind6",
    "sysctl-reserved-ports",
    "sysctl-route-localnet",
];

/// Positive controls that must succeed.
const ALLOWED: [&str; 13] = [
    "udp4-connected-cmsg",
    "udp6-connected-cmsg",
    "tcp4-lsrr-then-connect",
    "tcp4-ssrr-then-connect",
    "udp4-ip-tos",
    "udp4-plain-send",
    "udp4-clear-options",
    "udp6-plain-send",
    "tcp4-nodelay",
    "tcp4-plain-connect",
    "udp4-loopback-send",
    "sysctl-nonlocal-bind6-off",
    "sysctl-ping-group-range",
];

fn build_helper(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let out = dir.join("sidedoor");
    let status = Command::new("gcc")
        .args(["-Wall", "-O1", "-o"])
        .arg(&out)
        .arg(fixture("sidedoor.c"))
        .status()
        .context("running gcc")?;
    ensure!(status.success(), "gcc failed on sidedoor.c");
    Ok(out)
}

/// Lines of a pcap that match a tcpdump filter.
fn matching(pcap: &std::path::Path, filter: &str) -> Result<Vec<String>> {
    decoded(pcap, filter, false)
}

/// Lines of a pcap that match a tcpdump filter, decoded verbosely (`verbose`: a
/// membership report's groups and sources) or not.
fn decoded(pcap: &std::path::Path, filter: &str, verbose: bool) -> Result<Vec<String>> {
    let out = Command::new("tcpdump")
        .arg(if verbose { "-nv" } else { "-n" })
        .arg("-r")
        .arg(pcap)
        .arg(filter)
        .stderr(Stdio::null())
        .output()
        .context("tcpdump -r")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn source_routes_and_packet_sockets_are_refused() -> Result<()> {
    require_root!();
    if which("gcc").is_none() || which("tcpdump").is_none() {
        eprintln!("skipping: needs gcc and tcpdump (scripts/setup.sh installs them)");
        return Ok(());
    }
    let fx = Fixture::new()?;
    fx.attach(POLICY)?;
    let helper = build_helper(fx.dir.path())?;

    // Capture everything the world receives from the sandbox while the helper runs.
    let pcap = fx.dir.path().join("world.pcap");
    let log = fx.dir.path().join("tcpdump.log");
    let child = fx
        .world
        .netns()
        .spawn_command(
            "tcpdump",
            &[
                "-i",
                "any",
                "-n",
                // Hand each packet over as it arrives: without it, packets still in the
                // kernel's capture block when tcpdump is stopped are counted but lost.
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-w",
                &pcap.display().to_string(),
                "ip or ip6",
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawning tcpdump")?;
    let mut tcpdump = ChildGuard::new(child, "tcpdump");
    poll(Duration::from_secs(10), Duration::from_millis(50), || {
        Ok(std::fs::read_to_string(&log)?
            .contains("listening on")
            .then_some(()))
    })?
    .context("tcpdump did not start listening")?;

    // Where the kernel runs 32-bit calls (whose setsockopt no cgroup hook sees), the
    // daemon says so; the helper then shows the option set that way.
    let status = fx.daemon.status_json()?;
    let compat_open = status["compat_setsockopt_covered"].as_bool() == Some(false);
    let mut args = vec![
        CANARY_V4.to_string(),
        ORIGIN_V4.to_string(),
        CANARY_V6.to_string(),
        ORIGIN_V6.to_string(),
        "80".to_string(),
    ];
    if compat_open {
        args.push("compat".to_string());
    }
    let out = fx.sandbox.run(&helper, &args)?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let results: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once(' ')).collect();
    for case in REFUSED {
        ensure!(
            results.get(case) == Some(&"EPERM"),
            "{case}: expected EPERM, got {:?}\n{text}",
            results.get(case)
        );
    }
    for case in ALLOWED {
        ensure!(
            results.get(case) == Some(&"ok"),
            "{case}: expected ok, got {:?}\n{text}",
            results.get(case)
        );
    }
    // The kernel takes only type 2 (Mobile IPv6) routing headers as control data, and only
    // when built with it; either the kernel refuses it or the packet is dropped (EPERM).
    let cmsg6 = results.get("udp6-rthdr2-cmsg").copied();
    ensure!(
        matches!(cmsg6, Some("EPERM" | "EINVAL")),
        "udp6-rthdr2-cmsg: expected EPERM or EINVAL, got {cmsg6:?}\n{text}"
    );

    if compat_open {
        // Not refused, and said plainly: in the status and in `egressctl status`.
        ensure!(
            status["compat_setsockopt_note"]
                .as_str()
                .is_some_and(|s| s.contains("int $0x80")),
            "status says 32-bit setsockopt is not covered but not why: {status}"
        );
        let text_status = fx.daemon.ctl_ok(["status"])?;
        ensure!(
            String::from_utf8_lossy(&text_status.stdout).contains("32-bit setsockopt: NOT COVERED"),
            "egressctl status does not say 32-bit setsockopt is not covered"
        );
        for case in [
            "udp4-freebind-compat",
            "udp4-freebind-socketcall",
            "udp4-reuseaddr-compat",
        ] {
            ensure!(
                results.get(case) == Some(&"ok"),
                "{case}: a 32-bit call the status calls unjudged gave {:?}\n{text}",
                results.get(case)
            );
        }
    }

    // Packet sockets: refused where BPF LSM runs; otherwise said plainly.
    let covered = status["packet_sockets_covered"].as_bool() == Some(true);
    let packet = results.get("packet-socket").copied();
    if covered {
        ensure!(packet == Some("EPERM"), "packet socket: {packet:?}\n{text}");
    } else {
        eprintln!(
            "note: packet sockets are not covered on this kernel: {}",
            status["packet_sockets_note"]
        );
        ensure!(
            status["packet_sockets_note"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "status says packet sockets are not covered but not why: {status}"
        );
        let text_status = fx.daemon.ctl_ok(["status"])?;
        ensure!(
            String::from_utf8_lossy(&text_status.stdout).contains("packet sockets: NOT COVERED"),
            "egressctl status does not say packet sockets are not covered"
        );
    }

    // A policy can make that a condition of the attach: where it is not met, the
    // replacement is refused (recorded) and the sandbox keeps its policy.
    let strict = fx.policy(
        "strict.yaml",
        &POLICY.replace(
            "default: deny\n",
            "default: deny\nrequire:\n  non_inet_sockets_refused: true\n",
        ),
    )?;
    let out = fx.daemon.attach(&fx.sandbox, &strict, fx.sandbox.label())?;
    if covered {
        ensure!(out.status.success(), "strict policy refused: {out:?}");
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("require.non_inet_sockets_refused"),
            "strict policy attached where non-inet sockets are not refused: {out:?}"
        );
        poll(Duration::from_secs(5), Duration::from_millis(100), || {
            Ok(fx
                .daemon
                .audit_records()?
                .iter()
                .any(|r| {
                    action(r) == Some("policy-rejected")
                        && get_str(r, "error.message")
                            .is_some_and(|m| m.contains("non_inet_sockets_refused"))
                })
                .then_some(()))
        })?
        .context("no policy-rejected record for require.non_inet_sockets_refused")?;
    }

    // Records: every refusal, named.
    let records = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let all = fx.daemon.audit_records()?;
        let alerts: u64 = all
            .iter()
            .filter(|r| action(r) == Some("source-routing"))
            .filter_map(|r| get_u64(r, "egress.alert.count"))
            .sum();
        Ok((alerts >= 16).then_some(all))
    })?
    .context("no source-routing alerts summing to 16 refusals")?;
    let denied = |act: &str, name: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| {
                action(r) == Some(act)
                    && get_str(r, "egress.verdict") == Some("deny")
                    && get_str(r, "egress.option.name") == Some(name)
                    && get_str(r, "egress.sandbox.name") == Some(fx.sandbox.label())
            })
            .collect()
    };
    ensure!(
        denied("setsockopt", "IP_OPTIONS").len() >= 4,
        "IP_OPTIONS records"
    );
    ensure!(
        denied("setsockopt", "IPV6_RTHDR").len() >= 6,
        "IPV6_RTHDR records"
    );
    ensure!(
        !denied("setsockopt", "IPV6_2292RTHDR").is_empty(),
        "IPV6_2292RTHDR records"
    );
    for name in [
        "IP_FREEBIND",
        "IP_TRANSPARENT",
        "IPV6_FREEBIND",
        "IPV6_TRANSPARENT",
        "IP_ADD_MEMBERSHIP",
        "IP_ADD_SOURCE_MEMBERSHIP",
        "MCAST_JOIN_GROUP",
        "IPV6_ADD_MEMBERSHIP",
        "IPV6_FLOWLABEL_MGR",
    ] {
        ensure!(!denied("setsockopt", name).is_empty(), "{name} records");
    }

    for name in [
        "ip_nonlocal_bind",
        "ip_local_reserved_ports",
        "route_localnet",
    ] {
        ensure!(!denied("sysctl", name).is_empty(), "sysctl {name} records");
    }
    ensure!(
        denied("sysctl", "ip_nonlocal_bind").len() == 2,
        "ip_nonlocal_bind records: {:?} (two refused, the write of 0 allowed)",
        denied("sysctl", "ip_nonlocal_bind")
    );
    ensure!(
        denied("packet", "loopback-off-link").len() >= 3,
        "loopback-off-link records: {:?}",
        denied("packet", "loopback-off-link")
    );
    let dropped = denied("packet", "ipv4-options");
    ensure!(
        dropped
            .iter()
            .any(|r| get_u64(r, "egress.option.type") == Some(131)
                && get_str(r, "destination.ip") == Some(&CANARY_V4.to_string())),
        "no packet record naming the loose source route and its first hop: {dropped:?}"
    );
    // A connected socket's send with control data is not judged as a send to loopback
    // port 0 (it was refused so, and recorded under a destination never used).
    let portless: Vec<&Value> = records
        .iter()
        .filter(|r| action(r) == Some("sendmsg") && get_u64(r, "destination.port") == Some(0))
        .collect();
    ensure!(
        portless.is_empty(),
        "sends recorded to port 0: {portless:?}"
    );
    let mptcp = records
        .iter()
        .find(|r| get_u64(r, "egress.socket.protocol") == Some(262))
        .context("no record of the MPTCP socket")?;
    ensure!(
        get_str(mptcp, "network.transport") == Some("mptcp"),
        "MPTCP recorded as {:?}",
        get_str(mptcp, "network.transport")
    );
    let attach = records
        .iter()
        .find(|r| action(r) == Some("sandbox-attach"))
        .context("no attach record")?;
    ensure!(
        attach["egress"]["coverage"]["packet_sockets"].as_bool() == Some(covered),
        "attach record coverage disagrees with status: {attach}"
    );
    if covered {
        ensure!(
            records
                .iter()
                .any(|r| get_str(r, "egress.hook") == Some("lsm_socket_create")
                    && get_str(r, "egress.socket.family") == Some("packet")),
            "no record of the refused packet socket"
        );
    }

    // Nothing reached the first hops; the positive controls did reach the origin. Wait
    // for the controls first (a packet held for neighbour discovery arrives up to a
    // second or more after it was sent), then a settle time for anything else.
    let _ = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let v4 = matching(&pcap, "dst host 192.0.2.10 and udp").unwrap_or_default();
        let v6 = matching(&pcap, "dst host 2001:db8::10 and udp").unwrap_or_default();
        Ok((!v4.is_empty() && !v6.is_empty()).then_some(()))
    });
    std::thread::sleep(expect::CANARY_SETTLE);
    tcpdump.terminate(libc::SIGINT, Duration::from_secs(5))?;
    // The forged source's bind failed: the address is not the host's.
    for case in ["udp4-forged-bind", "udp6-forged-bind"] {
        ensure!(
            results.get(case) == Some(&"EADDRNOTAVAIL"),
            "{case}: expected EADDRNOTAVAIL, got {:?}\n{text}",
            results.get(case)
        );
    }
    for filter in [
        "dst host 203.0.113.66 or dst host 2001:db8::66",
        "src host 203.0.113.66 or src host 2001:db8::66",
        "ip and ip[0] & 0xf > 5",
        "dst net 127.0.0.0/8 or dst host ::1",
        "ip6 and ip6[6] == 43",
    ] {
        let seen = matching(&pcap, filter)?;
        ensure!(seen.is_empty(), "capture matched {filter:?}: {seen:?}");
    }
    // No membership report named a group or source the helper chose.
    let reports: Vec<String> = decoded(&pcap, "igmp or ip6", true)?
        .into_iter()
        .filter(|l| {
            ["239.1.2.", "198.51.100.77", "ff0e::1:2:"]
                .iter()
                .any(|g| l.contains(g))
        })
        .collect();
    ensure!(
        reports.is_empty(),
        "membership reports left the sandbox: {reports:?}"
    );
    let to_origin = matching(&pcap, "dst host 192.0.2.10 and udp")?;
    ensure!(
        !to_origin.is_empty(),
        "positive control: no UDP to the origin captured; capture: {:?}; tcpdump: {}",
        matching(&pcap, "ip or ip6")?,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let to_origin6 = matching(&pcap, "dst host 2001:db8::10 and udp")?;
    ensure!(
        !to_origin6.is_empty(),
        "positive control: no UDPv6 to the origin captured; IPv6 capture: {:?}; helper: {text}",
        matching(&pcap, "ip6")?
    );
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

#[test]
fn posture_is_recorded_and_required() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    // A process in the sandbox at attach; the test bed runs it as root with every
    // capability, the worst posture a container can have.
    let child = fx
        .sandbox
        .command("sleep", &["30"])
        .stdout(Stdio::null())
        .spawn()
        .context("spawning sleep in the sandbox")?;
    let _sleeper = ChildGuard::new(child, "sleep");
    poll(Duration::from_secs(5), Duration::from_millis(50), || {
        let procs = std::fs::read_to_string(fx.sandbox.cgroup().procs_file())?;
        Ok((!procs.trim().is_empty()).then_some(()))
    })?
    .context("no process joined the sandbox cgroup")?;

    let strict = fx.policy(
        "strict.yaml",
        &format!("{POLICY}require:\n  no_capabilities: [sys_admin, net_admin, net_raw]\n"),
    )?;
    let out = fx.daemon.ctl([
        OsStr::new("attach"),
        OsStr::new("--cgroup"),
        fx.sandbox.cgroup().path().as_os_str(),
        OsStr::new("--policy"),
        strict.as_os_str(),
        OsStr::new("--name"),
        OsStr::new(fx.sandbox.label()),
    ])?;
    ensure!(
        !out.status.success(),
        "attach with a violated require succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("sys_admin"),
        "refusal does not name sys_admin: {err}"
    );
    let rejected = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(fx
            .daemon
            .audit_records()?
            .into_iter()
            .find(|r| action(r) == Some("policy-rejected")))
    })?
    .context("no policy-rejected record")?;
    ensure!(
        get_str(&rejected, "error.message").is_some_and(|m| m.contains("net_admin")),
        "policy-rejected record does not name the capabilities: {rejected}"
    );
    ensure!(
        fx.daemon.status_sandbox(fx.sandbox.label())?.is_none(),
        "the refused sandbox was attached"
    );

    // Without the requirement: attached, posture recorded, alert raised, status shows it.
    fx.attach(POLICY)?;
    let records = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        let all = fx.daemon.audit_records()?;
        // The capabilities' alert (the test bed's processes also share the host's PID
        // and mount namespaces, which raises one of its own).
        Ok(all
            .iter()
            .any(|r| {
                action(r) == Some("risky-posture")
                    && get_str(r, "event.reason").is_some_and(|m| m.contains("sys_admin"))
            })
            .then_some(all))
    })?
    .context("no risky-posture alert for the capabilities")?;
    let attach = records
        .iter()
        .find(|r| action(r) == Some("sandbox-attach"))
        .context("no attach record")?;
    let posture = &attach["egress"]["posture"];
    ensure!(
        posture["can_leave_cgroup"].as_bool() == Some(true)
            && posture["risky_capabilities"]
                .as_array()
                .is_some_and(|a| a.iter().any(|c| c == "sys_admin"))
            && posture["processes"].as_u64() >= Some(1),
        "attach record posture: {posture}"
    );
    let status = fx
        .daemon
        .status_sandbox(fx.sandbox.label())?
        .context("sandbox missing from status")?;
    ensure!(
        status["can_leave_cgroup"].as_bool() == Some(true),
        "status posture: {status}"
    );

    // With CAP_SYS_ADMIN the process can leave: move it to the root cgroup (as it could
    // itself) and the daemon's next pass raises a cgroup-escape alert.
    let pid: i32 = std::fs::read_to_string(fx.sandbox.cgroup().procs_file())?
        .lines()
        .next()
        .context("sandbox cgroup is empty")?
        .trim()
        .parse()?;
    let root = egress_tests::cgroup::cgroup2_mount()?.join("cgroup.procs");
    std::fs::write(&root, pid.to_string()).context("moving the process out")?;
    let escape = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok(fx
            .daemon
            .audit_records()?
            .into_iter()
            .find(|r| action(r) == Some("cgroup-escape")))
    })?;
    // The process is outside every guard now: end it before checking.
    // SAFETY: kill(2) with a positive pid we read from the cgroup just now.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let escape = escape.context("no cgroup-escape alert")?;
    ensure!(
        get_str(&escape, "event.reason").is_some_and(|r| r.contains(&format!("pid {pid}"))),
        "cgroup-escape alert does not name the process: {escape}"
    );
    Ok(())
}

/// A process read without risky capabilities that later takes them (it makes a user
/// namespace of its own, where it holds every capability) holds them from then on: the
/// daemon reads known processes again and raises a `risky-posture` alert for the gain.
/// (It runs with `no_new_privs`: without it, its bounding set, which a set-user-ID or
/// file-capability program would give it, counts from the first read.)
#[test]
fn capabilities_gained_after_attach_are_alerted() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(POLICY)?;
    // As nobody, with no capabilities and no new privileges; after a while it enters a
    // user namespace of its own as its root.
    let child = fx
        .sandbox
        .command(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--no-new-privs",
                "sh",
                "-c",
                "sleep 2.5; exec unshare -Ur sleep 8",
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .context("spawning setpriv in the sandbox")?;
    let _guard = ChildGuard::new(child, "setpriv");
    let gained = |records: &[Value]| {
        records.iter().any(|r| {
            action(r) == Some("risky-posture")
                && get_str(r, "event.reason").is_some_and(|m| m.contains("gained"))
        })
    };
    // Before the exec: read as holding nothing, no gain alerted.
    std::thread::sleep(Duration::from_millis(2000));
    ensure!(
        !gained(&fx.daemon.audit_records()?),
        "a gain was alerted before the program ran"
    );
    let alert = poll(Duration::from_secs(8), Duration::from_millis(100), || {
        let all = fx.daemon.audit_records()?;
        Ok(gained(&all).then_some(all))
    })?
    .context("no risky-posture alert for the gained capabilities")?;
    let reason = alert
        .iter()
        .filter(|r| action(r) == Some("risky-posture"))
        .filter_map(|r| get_str(r, "event.reason"))
        .find(|m| m.contains("gained"))
        .unwrap_or_default()
        .to_owned();
    ensure!(reason.contains("sys_admin"), "{reason}");
    Ok(())
}

/// `egressctl attach` of `cgroup` as sandbox `name` with [`POLICY`].
fn attach_cgroup(
    fx: &Fixture,
    cgroup: &egress_tests::cgroup::CgroupGuard,
    name: &str,
) -> Result<std::process::Output> {
    let policy = fx.policy(&format!("{name}.yaml"), POLICY)?;
    fx.daemon.ctl([
        OsStr::new("attach"),
        OsStr::new("--cgroup"),
        cgroup.path().as_os_str(),
        OsStr::new("--policy"),
        policy.as_os_str(),
        OsStr::new("--name"),
        OsStr::new(name),
    ])
}

/// A new cgroup (its name ending in `name`) holding a `sleep` started as the host starts
/// a process (in every namespace of the test's own).
fn sleeper_in(name: &str) -> Result<(egress_tests::cgroup::CgroupGuard, ChildGuard)> {
    let cgroup = egress_tests::cgroup::CgroupGuard::new(name)?;
    let child = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .context("spawning sleep")?;
    let sleeper = ChildGuard::new(child, "sleep");
    cgroup.add(sleeper.pid().context("sleep has no pid")?)?;
    Ok((cgroup, sleeper))
}

/// A policy without proxy rules or names may be attached to a cgroup whose processes
/// share the host's network namespace; the host's abstract unix sockets (which no hook
/// judges) are open to them, so the attach says so, and a `risky-posture` alert records
/// it. Positive control: the fixture's sandbox, in a namespace of its own, gets neither.
#[test]
fn a_sandbox_in_the_hosts_network_namespace_is_warned_of() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    let p = fx.policy("own.yaml", POLICY)?;
    let own = fx.daemon.attach_ok(&fx.sandbox, &p, fx.sandbox.label())?;
    let shown = String::from_utf8_lossy(&own.stdout).to_string();
    ensure!(
        !shown.contains("network namespace"),
        "a sandbox with its own namespace was warned of: {shown}"
    );
    let (cgroup, sleeper) = sleeper_in("hostns")?;
    let name = format!("{}-host", fx.sandbox.label());
    let out = attach_cgroup(&fx, &cgroup, &name)?;
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success() && shown.contains("share the host's network namespace"),
        "attach in the host's namespace: {shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alert = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(fx.daemon.audit_records()?.into_iter().find(|r| {
            action(r) == Some("risky-posture")
                && get_str(r, "egress.sandbox.name") == Some(name.as_str())
                && get_str(r, "event.reason").is_some_and(|m| m.contains("network namespace"))
        }))
    })?
    .context("no risky-posture alert for the sandbox in the host's namespace")?;
    ensure!(
        get_str(&alert, "event.reason").is_some_and(|m| m.contains("abstract unix sockets")),
        "{alert}"
    );
    ensure!(
        !fx.daemon.audit_records()?.iter().any(|r| {
            action(r) == Some("risky-posture")
                && get_str(r, "egress.sandbox.name") == Some(fx.sandbox.label())
                && get_str(r, "event.reason").is_some_and(|m| m.contains("network namespace"))
        }),
        "the sandbox with its own namespace was alerted as sharing the host's"
    );
    fx.daemon.ctl_ok(["detach", "--name", &name])?;
    drop(sleeper);
    Ok(())
}

/// Processes that share the host's PID namespace can trace or take the sockets of
/// unconfined host processes (sockets no hook of the sandbox's judges), and with its mount
/// namespace reach the daemon's credential files: the attach warns of both, and a
/// `risky-posture` alert records it. Positive control: processes in PID and mount
/// namespaces of their own get neither.
#[test]
fn a_sandbox_sharing_the_hosts_pid_and_mount_namespaces_is_warned_of() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    let shared = |text: &str| text.contains("PID namespace") || text.contains("mount namespace");
    let attach = |cgroup: &egress_tests::cgroup::CgroupGuard, name: &str| -> Result<String> {
        let out = attach_cgroup(&fx, cgroup, name)?;
        ensure!(
            out.status.success(),
            "attach {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // A process started as the host starts one shares both.
    let (cgroup, sleeper) = sleeper_in("hostpid")?;
    let host = format!("{}-host", fx.sandbox.label());
    let shown = attach(&cgroup, &host)?;
    ensure!(
        shown.contains("share the host's PID namespace") && shown.contains("mount namespace"),
        "the attach did not warn of the shared namespaces: {shown}"
    );
    let alert = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(fx.daemon.audit_records()?.into_iter().find(|r| {
            action(r) == Some("risky-posture")
                && get_str(r, "egress.sandbox.name") == Some(host.as_str())
                && get_str(r, "event.reason").is_some_and(shared)
        }))
    })?
    .context("no risky-posture alert for the shared namespaces")?;
    ensure!(
        get_str(&alert, "event.reason").is_some_and(|m| m.contains("take the sockets")),
        "{alert}"
    );
    fx.daemon.ctl_ok(["detach", "--name", &host])?;
    drop(sleeper);
    // A process in PID and mount namespaces of its own: `unshare` stays outside, its
    // child (pid 1 of the new namespace) goes into the cgroup.
    let own = egress_tests::cgroup::CgroupGuard::new("ownns")?;
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
            "sleep",
            "30",
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("spawning unshare")?;
    let unshare = ChildGuard::new(child, "unshare");
    let parent = unshare.pid().context("unshare has no pid")?;
    let inner: u32 = poll(Duration::from_secs(5), Duration::from_millis(20), || {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        Ok(children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok()))
    })?
    .context("unshare started no child")?;
    own.add(inner)?;
    let name = format!("{}-own", fx.sandbox.label());
    let shown = attach(&own, &name)?;
    ensure!(
        !shared(&shown),
        "attach of processes in namespaces of their own: {shown}"
    );
    // Records reach the log in order: the attach's record is there, and no such alert.
    poll(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(fx
            .daemon
            .audit_records()?
            .iter()
            .any(|r| {
                action(r) == Some("sandbox-attach")
                    && get_str(r, "egress.sandbox.name") == Some(name.as_str())
            })
            .then_some(()))
    })?
    .context("no attach record for the sandbox with its own namespaces")?;
    ensure!(
        !fx.daemon.audit_records()?.iter().any(|r| {
            action(r) == Some("risky-posture")
                && get_str(r, "egress.sandbox.name") == Some(name.as_str())
                && get_str(r, "event.reason").is_some_and(shared)
        }),
        "processes in namespaces of their own were alerted as sharing the host's"
    );
    fx.daemon.ctl_ok(["detach", "--name", &name])?;
    drop(unshare);
    Ok(())
}
