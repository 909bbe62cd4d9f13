//! Two sandboxes under one daemon with different policies, then detach.
//!
//! Needs root, cgroup v2, bpffs and the egressd binaries; skips otherwise.

use std::net::IpAddr;

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get_u64, Match};
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, DENY_ALL, WEB_ORIGIN_DENY};
use egress_tests::require_root;
use egress_tests::world::{CANARY_V4, ORIGIN_V4};

#[test]
fn two_sandboxes_side_by_side_then_detach() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    let other = fx.world.add_sandbox("sb2")?;
    let a = fx.sandbox.label();
    let b = other.label();
    fx.attach(WEB_ORIGIN_DENY)?;
    let deny_all = fx.policy("deny-all.yaml", DENY_ALL)?;
    fx.daemon.attach_ok(&other, &deny_all, b)?;

    let origin = format!("http://{ORIGIN_V4}/");
    let origin_ip = IpAddr::V4(ORIGIN_V4);
    expect::origin_body(&fx.sandbox.curl(&[&origin])?)?;
    expect::exit_code(&other.curl(&[&origin])?, expect::CURL_COULDNT_CONNECT)?;
    expect::eperm(&other.probe("tcp-connect", origin_ip, 80, &[])?)?;

    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", origin_ip, 80).sandbox(a),
    )?;
    let deny_b = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", origin_ip, 80).sandbox(b),
    )?;
    ensure!(
        get_u64(&deny_b, "egress.sandbox.cgroup_id") == Some(other.cgroup().id()),
        "deny record should name sb2's cgroup: {deny_b}"
    );
    let recs = fx.daemon.audit_records()?;
    ensure!(
        Match::decision("deny", origin_ip, 80)
            .sandbox(a)
            .find(&recs)
            .is_none(),
        "sandbox {a} was denied the origin it allows"
    );

    for (sb, name) in [(&fx.sandbox, a), (&other, b)] {
        let e = fx
            .daemon
            .status_sandbox(name)?
            .with_context(|| format!("{name} missing from status"))?;
        ensure!(get_u64(&e, "cgroup_id") == Some(sb.cgroup().id()), "{e}");
    }

    // Detach sb2: its traffic is no longer confined; sb stays confined.
    let out = fx.daemon.detach(b)?;
    ensure!(out.status.success(), "detach failed: {out:?}");
    ensure!(
        fx.daemon.status_sandbox(b)?.is_none(),
        "detached sandbox still in status"
    );
    fx.daemon
        .wait_for_match(RECORD_TIMEOUT, &Match::lifecycle("sandbox-detach"))?;
    expect::tcp_blocked(
        &fx.sandbox,
        a,
        &fx.daemon,
        &fx.canary,
        IpAddr::V4(CANARY_V4),
        9,
    )?;
    expect::origin_body(&other.curl(&[&origin])?)?;
    expect::probe_ok(&other.probe("tcp-connect", origin_ip, 80, &[])?)?;
    Ok(())
}

/// A sandbox cannot be attached inside another (both programs would run and re-judge
/// each other's redirects), deeper than the programs look, or around the daemon itself,
/// nor with a policy that does not parse: each attach is refused with a message saying
/// why, and recorded.
#[test]
fn nested_deep_and_daemon_cgroups_are_refused() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let inner = fx.sandbox.cgroup().path().join("inner");
    std::fs::create_dir(&inner)?;
    let policy = fx.policy("inner.yaml", DENY_ALL)?;
    let out = fx.daemon.ctl([
        "attach".as_ref(),
        "--cgroup".as_ref(),
        inner.as_os_str(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--name".as_ref(),
        "inner".as_ref(),
    ]);
    let _ = std::fs::remove_dir(&inner);
    let out = out?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("nested"),
        "nested attach was not refused: {out:?}"
    );

    // Deeper than the programs look for a sandbox among a task's ancestors.
    let deep_root = egress_tests::cgroup::CgroupGuard::new("deep")?;
    let mut deep = deep_root.path().to_path_buf();
    let mut made = Vec::new();
    for level in 0..16 {
        deep = deep.join(format!("l{level}"));
        std::fs::create_dir(&deep)?;
        made.push(deep.clone());
    }
    let out = fx.daemon.ctl([
        "attach".as_ref(),
        "--cgroup".as_ref(),
        deep.as_os_str(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--name".as_ref(),
        "deep".as_ref(),
    ]);
    for dir in made.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
    let out = out?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("levels deep"),
        "a cgroup 17 levels deep was attached: {out:?}"
    );

    // The daemon's own cgroup: it would judge the daemon's own traffic. (The policy only
    // audits, should the refusal ever fail.)
    let pid = fx.daemon.pid().context("daemon pid")?;
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line")?;
    let own = egress_tests::cgroup::cgroup2_mount()?.join(own.trim_start_matches('/'));
    let audit = fx.policy("audit.yaml", "version: 1\ndefault: audit\nrules: []\n")?;
    let out = fx.daemon.ctl([
        "attach".as_ref(),
        "--cgroup".as_ref(),
        own.as_os_str(),
        "--policy".as_ref(),
        audit.as_os_str(),
        "--name".as_ref(),
        "daemon-own".as_ref(),
    ])?;
    if out.status.success() {
        let _ = fx.daemon.ctl(["detach", "--name", "daemon-own"]);
    }
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("holds egressd itself"),
        "the daemon's own cgroup was attached: {out:?}"
    );

    // A name another cgroup's sandbox holds.
    let other = egress_tests::cgroup::CgroupGuard::new("taken")?;
    let out = fx.daemon.ctl([
        "attach".as_ref(),
        "--cgroup".as_ref(),
        other.path().as_os_str(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--name".as_ref(),
        fx.sandbox.label().as_ref(),
    ])?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already used"),
        "a sandbox name in use was given to another cgroup: {out:?}"
    );

    // A policy that does not parse: egressctl could tell at once, but the daemon is asked
    // all the same, so the refusal is recorded.
    let unparsable = fx.policy("unparsable.yaml", "version: 1\ndefault: maybe\nrules: []\n")?;
    let spare = egress_tests::cgroup::CgroupGuard::new("unparsable")?;
    let out = fx.daemon.ctl([
        "attach".as_ref(),
        "--cgroup".as_ref(),
        spare.path().as_os_str(),
        "--policy".as_ref(),
        unparsable.as_os_str(),
        "--name".as_ref(),
        "unparsable".as_ref(),
    ])?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("maybe"),
        "a policy that does not parse was not refused with its error: {out:?}"
    );

    // No --name, and a cgroup directory whose name is too long to be one (as a runtime's
    // `docker-<64 hex>.scope` is): the refusal says to give one.
    let long = egress_tests::cgroup::CgroupGuard::new(&"c".repeat(64))?;
    let out = fx.daemon.ctl([
        "attach".as_ref(),
        "--cgroup".as_ref(),
        long.path().as_os_str(),
        "--policy".as_ref(),
        policy.as_os_str(),
    ])?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("give one with --name"),
        "a cgroup name too long for a sandbox name was not refused with a hint: {out:?}"
    );
    expect::policy_rejected(&fx.daemon, |_| true, &["cccc", "give one with --name"])?;

    // Every refusal is in the trail, in the name asked for.
    for (name, why) in [
        ("inner", "nested"),
        ("deep", "levels deep"),
        ("daemon-own", "holds egressd itself"),
        (fx.sandbox.label(), "already used"),
        ("unparsable", "maybe"),
    ] {
        expect::policy_rejected(&fx.daemon, |n| n == name, &[why])
            .with_context(|| format!("refusal of {name}"))?;
    }
    Ok(())
}

/// A container removed without `detach`: egressd notices its cgroup is gone, detaches the
/// sandbox (recorded) and frees what it held.
#[test]
fn removed_cgroup_is_detached() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    let cgroup = egress_tests::cgroup::CgroupGuard::new("vanish")?;
    let policy = fx.policy("vanish.yaml", DENY_ALL)?;
    let out = fx.daemon.ctl([
        "attach".as_ref(),
        "--cgroup".as_ref(),
        cgroup.path().as_os_str(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--name".as_ref(),
        "vanish".as_ref(),
    ])?;
    ensure!(out.status.success(), "attach failed: {out:?}");
    ensure!(
        fx.daemon.status_sandbox("vanish")?.is_some(),
        "not attached"
    );
    drop(cgroup);
    let gone = egress_tests::util::poll(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(100),
        || Ok(fx.daemon.status_sandbox("vanish")?.is_none().then_some(())),
    )?;
    ensure!(
        gone.is_some(),
        "sandbox still listed after its cgroup was removed"
    );
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::lifecycle("sandbox-detach").sandbox("vanish"),
    )?;
    Ok(())
}

/// A process inside a sandbox that can reach the control socket (root, host mounts, as
/// the test bed's sandboxes) may read the status but nothing more: a detach is refused
/// and raises a `control-socket` alert; the same command from the host works.
#[test]
fn the_control_socket_refuses_processes_in_sandboxes() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let socket = fx.daemon.socket();
    let args = [
        "--socket".as_ref(),
        socket.as_os_str(),
        "detach".as_ref(),
        "--name".as_ref(),
        fx.sandbox.label().as_ref(),
    ];
    let out = fx
        .sandbox
        .run(egress_tests::daemon::egressctl_bin(), &args)?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("may only read the status"),
        "a sandboxed egressctl was served: {out:?}"
    );
    // Reading the status is allowed (a runtime's hook may run inside a pod's cgroup),
    // its own sandbox's only: another sandbox's policy, counters and quarantine reasons
    // are not its to read.
    let other = fx.world.add_sandbox("sb2")?;
    let deny_all = fx.policy("deny-all.yaml", DENY_ALL)?;
    fx.daemon.attach_ok(&other, &deny_all, other.label())?;
    let status = fx.sandbox.run(
        egress_tests::daemon::egressctl_bin(),
        &[
            "--socket".as_ref(),
            socket.as_os_str(),
            "status".as_ref(),
            "--json".as_ref(),
        ],
    )?;
    ensure!(status.status.success(), "status from a sandbox: {status:?}");
    let seen: serde_json::Value = serde_json::from_slice(&status.stdout)
        .with_context(|| format!("status --json: {status:?}"))?;
    let names: Vec<&str> = seen["sandboxes"]
        .as_array()
        .context("no sandboxes in the status")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    ensure!(
        names == [fx.sandbox.label()],
        "a sandboxed caller saw the status of {names:?}"
    );
    // Control: the host sees both.
    ensure!(fx.daemon.status_sandbox(other.label())?.is_some());
    ensure!(
        fx.daemon.status_sandbox(fx.sandbox.label())?.is_some(),
        "the sandbox detached itself"
    );
    let alert = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        egress_tests::audit::get_str(r, "event.action") == Some("control-socket")
    })?;
    ensure!(
        egress_tests::audit::get_str(&alert, "egress.sandbox.name") == Some(fx.sandbox.label()),
        "{alert}"
    );
    // A line that is no request is refused by the socket itself: recorded too, in the
    // sandbox's name.
    let probe = fx.sandbox.run(
        "python3",
        &[
            "-c".as_ref(),
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.connect(sys.argv[1])\n\
             s.sendall(b'not a request\\n')\n\
             print(s.recv(4096).decode())"
                .as_ref(),
            socket.as_os_str(),
        ],
    )?;
    ensure!(
        String::from_utf8_lossy(&probe.stdout).contains("malformed request"),
        "the socket's answer: {probe:?}"
    );
    let refused = fx.daemon.wait_for_record(RECORD_TIMEOUT, |r| {
        egress_tests::audit::get_str(r, "event.action") == Some("control-socket")
            && egress_tests::audit::get_str(r, "event.reason")
                .is_some_and(|why| why.contains("malformed request"))
    })?;
    ensure!(
        egress_tests::audit::get_str(&refused, "egress.sandbox.name") == Some(fx.sandbox.label()),
        "{refused}"
    );
    // Control: the host's own call.
    ensure!(fx.daemon.ctl(["status"])?.status.success());
    // A flood of such lines: 20 alerts a window, the rest counted in one rate-limit
    // alert, raised at the latest when the daemon stops.
    const FLOOD: u64 = 40;
    let flood = fx.sandbox.run(
        "python3",
        &[
            "-c".as_ref(),
            "import socket, sys\n\
             for _ in range(int(sys.argv[2])):\n\
             \x20   s = socket.socket(socket.AF_UNIX)\n\
             \x20   s.connect(sys.argv[1])\n\
             \x20   s.sendall(b'not a request\\n')\n\
             \x20   s.recv(4096)\n\
             \x20   s.close()"
                .as_ref(),
            socket.as_os_str(),
            FLOOD.to_string().as_ref(),
        ],
    )?;
    ensure!(flood.status.success(), "the flood: {flood:?}");
    let mut fx = fx;
    let (one_by_one, counted) = recorded_and_counted(&mut fx, |r| {
        egress_tests::audit::action(r) == Some("control-socket")
    })?;
    // The detach and the first line that was no request came before the flood.
    ensure!(
        one_by_one <= 20 && one_by_one + counted == FLOOD + 2,
        "{one_by_one} control-socket alerts and {counted} counted for {} refusals",
        FLOOD + 2
    );
    Ok(())
}

/// Stops the daemon (raising what its windows counted), then returns how many of the
/// sandbox's records `recorded` picks, and how many refusals its `rate-limit` alerts
/// counted instead.
fn recorded_and_counted(
    fx: &mut Fixture,
    recorded: impl Fn(&serde_json::Value) -> bool,
) -> Result<(u64, u64)> {
    fx.daemon.terminate(std::time::Duration::from_secs(10))?;
    let records = fx.daemon.audit_records()?;
    let mine: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| {
            egress_tests::audit::get_str(r, "egress.sandbox.name") == Some(fx.sandbox.label())
        })
        .collect();
    let one_by_one = mine.iter().filter(|r| recorded(r)).count() as u64;
    let counted = mine
        .iter()
        .filter(|r| egress_tests::audit::action(r) == Some("rate-limit"))
        .filter_map(|r| get_u64(r, "egress.alert.count"))
        .sum();
    Ok((one_by_one, counted))
}

/// Joins a process inside a sandbox asks for and the policy refuses (a loop of them) are
/// recorded one by one up to the control socket's limit per window, the rest counted in
/// one `rate-limit` alert: they cannot flood the trail.
#[test]
fn refused_joins_from_inside_a_sandbox_are_rate_limited() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let socket = fx.daemon.socket();
    const JOINS: u64 = 40;
    // A join of the caller's own sandbox, naming a policy other than the one attached.
    let request = serde_json::json!({
        "op": "join",
        "name": fx.sandbox.label(),
        "container": "looping",
        "cgroup": fx.sandbox.cgroup().path(),
        "policy_path": "another.yaml",
        "policy_source": "",
        "netns": "/proc/self/ns/net",
        "runtime_init": { "pid": 1, "capabilities": [] },
    })
    .to_string();
    let flood = fx.sandbox.run(
        "python3",
        &[
            "-c".as_ref(),
            "import socket, sys\n\
             refused = 0\n\
             for _ in range(int(sys.argv[3])):\n\
             \x20   s = socket.socket(socket.AF_UNIX)\n\
             \x20   s.connect(sys.argv[1])\n\
             \x20   s.sendall(sys.argv[2].encode() + b'\\n')\n\
             \x20   if b'refused' in s.recv(65536):\n\
             \x20       refused += 1\n\
             \x20   s.close()\n\
             print(refused)"
                .as_ref(),
            socket.as_os_str(),
            request.as_ref(),
            JOINS.to_string().as_ref(),
        ],
    )?;
    ensure!(
        flood.status.success()
            && String::from_utf8_lossy(&flood.stdout).trim() == JOINS.to_string(),
        "every join was to be refused: {flood:?}"
    );
    let mut fx = fx;
    let (one_by_one, counted) = recorded_and_counted(&mut fx, |r| {
        egress_tests::audit::action(r) == Some("policy-rejected")
            && egress_tests::audit::get_str(r, "error.message")
                .is_some_and(|m| m.contains("asked from inside it"))
    })?;
    ensure!(
        (1..=20).contains(&one_by_one) && one_by_one + counted == JOINS,
        "{one_by_one} refusals recorded and {counted} counted for {JOINS}"
    );
    Ok(())
}

/// A runtime's `poststop` detach (name and cgroup) is for a container that has stopped:
/// while the sandbox's cgroup still runs processes (a container created again under the
/// same name and path before the earlier one's hook reached the daemon) it is refused,
/// recorded, and the sandbox stays confined; once they are gone the daemon carries it out.
#[test]
fn a_late_poststop_does_not_detach_a_running_sandbox() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    fx.attach(WEB_ORIGIN_DENY)?;
    let mut sleeper = fx
        .sandbox
        .command_with_timeout(60, "sleep", &["30"])
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while fx.sandbox.cgroup().pids()?.is_empty() {
        ensure!(
            std::time::Instant::now() < deadline,
            "no process joined the sandbox"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let hook_detach = || -> Result<serde_json::Value> {
        let request = serde_json::json!({
            "op": "detach",
            "name": fx.sandbox.label(),
            "cgroup": fx.sandbox.cgroup().path(),
            "reason": "hook",
        })
        .to_string();
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket, sys\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.connect(sys.argv[1])\n\
                 s.sendall(sys.argv[2].encode() + b'\\n')\n\
                 print(s.recv(65536).decode())",
            ])
            .arg(fx.daemon.socket())
            .arg(&request)
            .output()?;
        serde_json::from_slice(&out.stdout).with_context(|| format!("{out:?}"))
    };
    let refused = hook_detach()?;
    ensure!(
        refused["ok"] == false
            && refused["error"]
                .as_str()
                .is_some_and(|e| e.contains("still runs processes")),
        "a poststop detached a sandbox that still runs processes: {refused}"
    );
    ensure!(
        fx.daemon.status_sandbox(fx.sandbox.label())?.is_some(),
        "the sandbox is gone"
    );
    // The refusal is in the trail (the hook records nothing at poststop).
    expect::policy_rejected(
        &fx.daemon,
        |s| s == fx.sandbox.label(),
        &["poststop", "still runs processes"],
    )?;
    expect::eperm(
        &fx.sandbox
            .probe("tcp-connect", IpAddr::V4(CANARY_V4), 9, &[])?,
    )?;
    // Its processes gone, the same request detaches it.
    sleeper.kill()?;
    sleeper.wait()?;
    fx.sandbox.cgroup().kill_all()?;
    // Empty once the last process has finished exiting, a moment after it left the list.
    let events = fx.sandbox.cgroup().path().join("cgroup.events");
    egress_tests::util::poll(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(20),
        || {
            Ok(std::fs::read_to_string(&events)?
                .contains("populated 0")
                .then_some(()))
        },
    )?
    .context("the sandbox's cgroup stayed populated")?;
    // The refused poststop is carried out by itself once the cgroup runs nothing.
    egress_tests::util::poll(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(100),
        || {
            Ok(fx
                .daemon
                .status_sandbox(fx.sandbox.label())?
                .is_none()
                .then_some(()))
        },
    )?
    .context("the refused poststop was not carried out once the cgroup ran nothing")?;
    let detach = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::lifecycle("sandbox-detach").sandbox(fx.sandbox.label()),
    )?;
    ensure!(
        egress_tests::audit::get_str(&detach, "event.reason") == Some("hook"),
        "{detach}"
    );
    Ok(())
}
