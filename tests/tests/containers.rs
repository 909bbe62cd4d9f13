//! Real containers (runc and podman from Debian, an image built from busybox-static)
//! confined by `egressctl oci-hook` from their first instruction, and the daemon's side of
//! container lifecycles: `attach --pid`, cgroup paths as runtimes print them, empty
//! cgroups, a cgroup re-created at the same path, listeners closed with their last
//! sandbox, and 20 containers created and removed in a loop.
//!
//! Each container joins a sandbox network namespace linked to the test bed's world
//! (documentation addresses only), or a fresh loopback-only namespace.
//!
//! Needs root, cgroup v2, bpffs, runc and busybox (podman for the podman test); skips
//! otherwise.
use std::ffi::OsStr;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use egress_tests::audit::{get_str, get_u64, Match};
use egress_tests::container::{
    self, hooks_dir_from_shipped, text, unique_cgroups_path, ContainerSpec, HookSetup, Image, Runc,
};
use egress_tests::daemon::Daemon;
use egress_tests::expect::{self, RECORD_TIMEOUT};
use egress_tests::fixture::{Fixture, DENY_ALL, WEB_ORIGIN_DENY};
use egress_tests::https_origin::REPO_BODY;
use egress_tests::proxy_fixture::{ProxyFixture, ProxyOpts, PROXY_POLICY};
use egress_tests::servers::ORIGIN_BODY;
use egress_tests::util::{bounded, poll, unique_name};
use egress_tests::world::{CANARY_V4, ORIGIN_V4};
use egress_tests::{require_root, skip_if};

/// A policy whose passthrough rule needs the proxy listener in the sandbox's namespace.
const PASSTHROUGH: &str = r#"version: 1
default: deny
rules:
  - name: tls-origin
    to: [192.0.2.10]
    ports: [443]
    action: passthrough
    hosts: [origin.example]
"#;

/// The container's first instruction is a connect to the canary; then the origin. (busybox
/// 1.35's `wget -T` crashes, so `timeout` bounds it.)
fn first_instruction_script() -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "timeout 5 wget -q -O - http://{CANARY_V4}:9/; echo \"denied-rc=$?\"; timeout 5 wget -q -O - http://{ORIGIN_V4}/"
        ),
    ]
}

fn policy_dir(fx: &Fixture) -> Result<PathBuf> {
    let dir = fx.dir.path().join("policies");
    std::fs::create_dir_all(&dir)?;
    // Requires what a runtime's default set leaves out: the container's own
    // capabilities are judged, not those its runtime's init process holds at attach.
    let strict = WEB_ORIGIN_DENY.replacen(
        "version: 1\n",
        "version: 1\nrequire:\n  no_capabilities: [sys_admin, net_admin, net_raw]\n",
        1,
    );
    std::fs::write(dir.join("web.yaml"), strict)?;
    std::fs::write(dir.join("passthrough.yaml"), PASSTHROUGH)?;
    // No requirement at all: a policy a container could bring to loosen another's.
    std::fs::write(dir.join("open.yaml"), WEB_ORIGIN_DENY)?;
    Ok(dir)
}

fn hook_setup(daemon: &Daemon, policy_dir: &Path, timeout_secs: u32) -> HookSetup {
    HookSetup {
        socket: daemon.socket(),
        policy_dir: policy_dir.to_path_buf(),
        timeout_secs,
        extra: Vec::new(),
    }
}

/// The container's output shows the canary refused with EPERM and the origin served.
fn check_confined_output(out: &std::process::Output) -> Result<()> {
    let all = text(out);
    ensure!(out.status.success(), "container failed: {all}");
    ensure!(
        all.contains("Operation not permitted") && all.contains("denied-rc=1"),
        "the first connect was not refused with EPERM: {all}"
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout).ends_with(ORIGIN_BODY),
        "the allowed origin did not answer: {all}"
    );
    Ok(())
}

/// Deny record for the canary, allow record for the origin, the canary saw nothing,
/// and the poststop hook's detach record (reason `hook`).
fn check_records(fx: &Fixture, name: &str) -> Result<()> {
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("deny", IpAddr::V4(CANARY_V4), 9).sandbox(name),
    )?;
    fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::decision("allow", IpAddr::V4(ORIGIN_V4), 80).sandbox(name),
    )?;
    expect::canary_silent(&fx.canary)?;
    let detach = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::lifecycle("sandbox-detach").sandbox(name),
    )?;
    ensure!(
        get_str(&detach, "event.reason") == Some("hook"),
        "detach record should say the hook detached it: {detach}"
    );
    ensure!(
        fx.daemon.status_sandbox(name)?.is_none(),
        "sandbox {name} still attached after its container stopped"
    );
    Ok(())
}

#[test]
fn runc_hook_confines_from_the_first_instruction() -> Result<()> {
    require_root!();
    skip_if!(container::missing_tools());
    let fx = Fixture::new()?;
    let policies = policy_dir(&fx)?;
    let image = Image::build()?;
    let runc = Runc::new()?;
    let id = unique_name("ctr");
    let cgroups_path = unique_cgroups_path("ctr");
    let spec = ContainerSpec {
        args: first_instruction_script(),
        netns: Some(fx.sandbox.netns().path()),
        cgroups_path: cgroups_path.clone(),
        annotations: vec![("io.egressd.policy".into(), "web".into())],
        hooks: Some(hook_setup(&fx.daemon, &policies, 5)),
        capabilities: Vec::new(),
        writable_cgroups: false,
    };
    let out = runc.run(&image, &id, &spec)?;
    container::remove_cgroup(&cgroups_path);
    check_confined_output(&out)?;
    check_records(&fx, &id)?;
    let attach = fx.daemon.wait_for_match(
        RECORD_TIMEOUT,
        &Match::lifecycle("sandbox-attach").sandbox(&id),
    )?;
    ensure!(
        get_str(&attach, "egress.sandbox.cgroup_path")
            .is_some_and(|p| p.ends_with(cgroups_path.trim_start_matches('/'))),
        "the hook attached another cgroup than the container's: {attach}"
    );
    // The posture is the container's (`runc spec`'s default set), not that of `runc
    // init`, which still holds every capability when the hook runs.
    let caps: Vec<&str> = attach["egress"]["posture"]["capabilities"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    ensure!(
        caps == ["kill", "net_bind_service", "audit_write"],
        "attach posture: {attach}"
    );
    ensure!(
        attach["egress"]["posture"]["can_leave_cgroup"] == false,
        "attach posture: {attach}"
    );

    // A container that claims another's sandbox name is not created, and its poststop
    // hook (runc runs it while cleaning up) does not release the other sandbox.
    fx.attach(DENY_ALL)?;
    let victim = fx.sandbox.label();
    let cgroups_path = unique_cgroups_path("claim");
    let out = runc.run(
        &image,
        &unique_name("claim"),
        &ContainerSpec {
            args: vec!["echo".into(), "container-ran".into()],
            cgroups_path: cgroups_path.clone(),
            annotations: vec![
                ("io.egressd.policy".into(), "web".into()),
                ("io.egressd.sandbox".into(), victim.into()),
            ],
            ..spec.clone()
        },
    )?;
    container::remove_cgroup(&cgroups_path);
    ensure!(
        !out.status.success() && !text(&out).contains("container-ran\n"),
        "a container claiming another sandbox's name ran: {}",
        text(&out)
    );
    let s = fx.daemon.status_sandbox(victim)?;
    ensure!(
        s.is_some_and(|s| get_u64(&s, "cgroup_id") == Some(fx.sandbox.cgroup().id())),
        "the other sandbox was released"
    );

    // Nor is one placed in the other's cgroup itself (a raw `cgroupsPath`): its hook
    // would otherwise replace the running sandbox's policy with its own. (A process of
    // the sandbox, holding no capability the policy could refuse, keeps its cgroup from
    // being removed by runc's cleanup.)
    let before = fx.daemon.status_sandbox(victim)?.context("no victim")?;
    let mut resident = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(["sleep", "30"])
        .spawn()?;
    fx.sandbox.cgroup().add(resident.id())?;
    let mount = egress_tests::cgroup::cgroup2_mount()?;
    let victims_path = format!(
        "/{}",
        fx.sandbox.cgroup().path().strip_prefix(&mount)?.display()
    );
    let out = runc.run(
        &image,
        &unique_name("inside"),
        &ContainerSpec {
            args: vec!["echo".into(), "container-ran".into()],
            cgroups_path: victims_path,
            annotations: vec![
                ("io.egressd.policy".into(), "open".into()),
                ("io.egressd.sandbox".into(), victim.into()),
            ],
            ..spec.clone()
        },
    );
    let _ = resident.kill();
    let _ = resident.wait();
    let out = out?;
    ensure!(
        !out.status.success() && !text(&out).contains("container-ran\n"),
        "a container placed in another sandbox's cgroup ran: {}",
        text(&out)
    );
    let after = fx
        .daemon
        .status_sandbox(victim)?
        .context("the victim was released")?;
    ensure!(
        get_str(&after, "policy_digest") == get_str(&before, "policy_digest")
            && get_str(&after, "policy_digest").is_some(),
        "the victim's policy changed: {before} -> {after}"
    );
    expect::policy_rejected(&fx.daemon, |s| s == victim, &["already attached"])?;

    // A container with the cgroup hierarchy writable and no cgroup namespace of its own
    // (its root could write itself out of the sandbox's cgroup) is not created.
    let cgroups_path = unique_cgroups_path("cgrw");
    let out = runc.run(
        &image,
        &unique_name("cgrw"),
        &ContainerSpec {
            args: vec!["echo".into(), "container-ran".into()],
            cgroups_path: cgroups_path.clone(),
            annotations: vec![("io.egressd.policy".into(), "web".into())],
            writable_cgroups: true,
            ..spec.clone()
        },
    )?;
    container::remove_cgroup(&cgroups_path);
    ensure!(
        !out.status.success() && !text(&out).contains("container-ran\n"),
        "a container with the cgroup hierarchy writable ran: {}",
        text(&out)
    );
    expect::policy_rejected(
        &fx.daemon,
        |n| n.starts_with("oci:"),
        &["OCI hook refused", "cgroup hierarchy writable"],
    )?;
    Ok(())
}

#[test]
fn runc_container_is_not_created_when_the_daemon_is_slow_or_down() -> Result<()> {
    require_root!();
    skip_if!(container::missing_tools());
    let mut fx = Fixture::new()?;
    let policies = policy_dir(&fx)?;
    let image = Image::build()?;
    let runc = Runc::new()?;
    let marker = "container-ran";
    let args = vec![
        "sh".to_string(),
        "-c".to_string(),
        format!("echo {marker}; timeout 5 wget -q -O - http://{CANARY_V4}:9/"),
    ];

    // Slow: a socket that accepts and never answers. The hook gives up after its timeout.
    let slow_sock = fx.dir.path().join("slow.sock");
    let _slow = std::os::unix::net::UnixListener::bind(&slow_sock)?;
    let slow = HookSetup {
        socket: slow_sock,
        policy_dir: policies.clone(),
        timeout_secs: 1,
        extra: Vec::new(),
    };
    let id = unique_name("slow");
    let cgroups_path = unique_cgroups_path("slow");
    let started = Instant::now();
    let out = runc.run(
        &image,
        &id,
        &ContainerSpec {
            args: args.clone(),
            netns: Some(fx.sandbox.netns().path()),
            cgroups_path: cgroups_path.clone(),
            annotations: vec![("io.egressd.policy".into(), "web".into())],
            hooks: Some(slow),
            capabilities: Vec::new(),
            writable_cgroups: false,
        },
    )?;
    let took = started.elapsed();
    container::remove_cgroup(&cgroups_path);
    let all = text(&out);
    ensure!(
        !out.status.success() && !all.contains(&format!("{marker}\n")),
        "the container ran although the daemon did not answer: {all}"
    );
    ensure!(
        all.contains("did not answer within"),
        "runc should report the hook's timeout: {all}"
    );
    ensure!(took < Duration::from_secs(15), "the hook took {took:?}");

    // Down: no socket at all.
    fx.daemon.terminate(Duration::from_secs(10))?;
    let id = unique_name("down");
    let cgroups_path = unique_cgroups_path("down");
    let out = runc.run(
        &image,
        &id,
        &ContainerSpec {
            args,
            netns: Some(fx.sandbox.netns().path()),
            cgroups_path: cgroups_path.clone(),
            annotations: vec![("io.egressd.policy".into(), "web".into())],
            hooks: Some(hook_setup(&fx.daemon, &policies, 3)),
            capabilities: Vec::new(),
            writable_cgroups: false,
        },
    )?;
    container::remove_cgroup(&cgroups_path);
    let all = text(&out);
    ensure!(
        !out.status.success() && !all.contains(&format!("{marker}\n")),
        "the container ran although the daemon is down: {all}"
    );
    ensure!(
        all.contains("connecting to egressd"),
        "runc should report the hook's error: {all}"
    );
    ensure!(
        !runc.list()?.contains(&id),
        "runc kept a container whose hook failed"
    );
    expect::canary_silent(&fx.canary)?;
    Ok(())
}

#[test]
fn podman_hooks_dir_with_an_annotation_selected_policy() -> Result<()> {
    require_root!();
    skip_if!(container::missing_podman());
    let fx = Fixture::new()?;
    let policies = policy_dir(&fx)?;
    let image = Image::build()?;
    let hooks = hooks_dir_from_shipped(fx.dir.path(), &hook_setup(&fx.daemon, &policies, 5))?;
    let name = unique_name("podman");
    let podman = |policy: &str, args: &[String]| -> Result<std::process::Output> {
        let mut cmd = bounded(
            60,
            "podman",
            &["--runtime", "runc", "--cgroup-manager", "cgroupfs"],
        );
        cmd.arg("--hooks-dir")
            .arg(&hooks)
            .args(["run", "--rm", "--no-hosts"])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .arg("--network")
            .arg(format!("ns:{}", fx.sandbox.netns().path().display()))
            .args(["--annotation", &format!("io.egressd.policy={policy}")])
            .args(["--annotation", &format!("io.egressd.sandbox={name}")])
            .arg("--rootfs")
            .arg(image.rootfs())
            .args(args);
        cmd.output().context("running podman")
    };
    let out = podman("web", &first_instruction_script())?;
    check_confined_output(&out)?;
    check_records(&fx, &name)?;

    // A policy name that tries to leave the policy directory: the container never runs.
    let out = podman(
        "../policies/web",
        &["sh".into(), "-c".into(), "echo container-ran".into()],
    )?;
    let all = text(&out);
    ensure!(
        !out.status.success() && !all.contains("container-ran\n"),
        "a container with a policy path in its annotation ran: {all}"
    );
    ensure!(all.contains("is not valid"), "no reason given: {all}");
    // The refusal is in the audit trail too.
    egress_tests::expect::policy_rejected(
        &fx.daemon,
        |n| n.starts_with("oci:"),
        &["OCI hook refused", "is not valid"],
    )?;
    Ok(())
}

/// Number of sockets among a process's open files.
fn socket_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .count())
}

#[test]
fn twenty_containers_in_a_loop_leave_nothing_behind() -> Result<()> {
    require_root!();
    skip_if!(container::missing_tools());
    let fx = Fixture::new()?;
    let policies = policy_dir(&fx)?;
    let image = Image::build()?;
    let runc = Runc::new()?;
    let pid = fx.daemon.pid().context("daemon pid")?;
    let baseline = socket_fds(pid)?;
    // The same id every time: each container is re-created at once after the last.
    let id = unique_name("loop");
    let cgroups_path = unique_cgroups_path("loop");
    let spec = ContainerSpec {
        args: vec!["true".into()],
        netns: None,
        cgroups_path: cgroups_path.clone(),
        annotations: vec![("io.egressd.policy".into(), "passthrough".into())],
        hooks: Some(hook_setup(&fx.daemon, &policies, 5)),
        capabilities: Vec::new(),
        writable_cgroups: false,
    };
    let started = Instant::now();
    for i in 0..20 {
        let out = runc.run(&image, &id, &spec)?;
        ensure!(out.status.success(), "container {i}: {}", text(&out));
    }
    let took = started.elapsed();
    container::remove_cgroup(&cgroups_path);
    eprintln!("20 containers created, confined, removed in {took:?}");
    let attached = expect::records(
        &fx.daemon,
        &Match::lifecycle("sandbox-attach").sandbox(&id),
        20,
    )?;
    let detached = expect::records(
        &fx.daemon,
        &Match::lifecycle("sandbox-detach").sandbox(&id),
        20,
    )?;
    ensure!(
        attached.len() == 20 && detached.len() == 20,
        "attach/detach records"
    );
    let status = fx.daemon.status_json()?;
    ensure!(
        status["sandboxes"].as_array().is_some_and(Vec::is_empty),
        "sandboxes left: {status}"
    );
    ensure!(
        get_u64(&status, "proxy_listeners") == Some(0),
        "proxy listeners left: {status}"
    );
    let settled = poll(Duration::from_secs(3), Duration::from_millis(50), || {
        Ok((socket_fds(pid)? <= baseline).then_some(()))
    })?;
    ensure!(
        settled.is_some(),
        "the daemon holds {} sockets, {baseline} before the loop (listeners keep namespaces alive)",
        socket_fds(pid)?
    );
    ensure!(runc.list()?.is_empty(), "runc kept containers");
    Ok(())
}

/// Waits until the sandbox has a process inside its network namespace; returns its pid.
fn sandbox_process(fx: &Fixture) -> Result<u32> {
    let want = std::fs::metadata(fx.sandbox.netns().path())?.ino();
    let found = poll(Duration::from_secs(5), Duration::from_millis(20), || {
        for pid in fx.sandbox.cgroup().pids()? {
            let ino = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
            if ino.ok() == Some(want) {
                return Ok(Some(pid));
            }
        }
        Ok(None)
    })?;
    found.context("no process of the sandbox entered its network namespace")
}

#[test]
fn attach_by_pid_runtime_paths_empty_cgroups_and_recreated_cgroups() -> Result<()> {
    require_root!();
    let fx = Fixture::new()?;
    let policies = policy_dir(&fx)?;
    let passthrough = policies.join("passthrough.yaml");
    let deny_all = fx.policy("deny-all.yaml", DENY_ALL)?;
    let ns_inode = std::fs::metadata(fx.sandbox.netns().path())?.ino();
    let mut sleeper = fx.sandbox.command("sleep", &["30"]).spawn()?;
    let result = (|| -> Result<()> {
        let pid = sandbox_process(&fx)?;

        // --pid: the process's cgroup and network namespace.
        fx.daemon.ctl_ok([
            OsStr::new("attach"),
            OsStr::new("--pid"),
            OsStr::new(&pid.to_string()),
            OsStr::new("--policy"),
            passthrough.as_os_str(),
            OsStr::new("--name"),
            OsStr::new("bypid"),
        ])?;
        let s = fx
            .daemon
            .status_sandbox("bypid")?
            .context("bypid not attached")?;
        ensure!(
            get_u64(&s, "cgroup_id") == Some(fx.sandbox.cgroup().id()),
            "{s}"
        );
        ensure!(get_u64(&s, "netns_inode") == Some(ns_inode), "{s}");
        ensure!(get_u64(&fx.daemon.status_json()?, "proxy_listeners") == Some(1));
        let out = fx.daemon.ctl_ok(["status"])?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("net:[{ns_inode}]")),
            "status table lacks the netns: {out:?}"
        );
        // The last sandbox of the namespace goes: so does its listener.
        fx.daemon.ctl_ok(["detach", "--name", "bypid"])?;
        ensure!(get_u64(&fx.daemon.status_json()?, "proxy_listeners") == Some(0));
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::lifecycle("sandbox-detach").sandbox("bypid"),
        )?;
        ensure!(get_str(&rec, "event.reason") == Some("operator"), "{rec}");

        // A leading-slash path as /proc/PID/cgroup prints it.
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let printed = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line")?
            .to_string();
        ensure!(
            printed.starts_with('/') && !Path::new(&printed).exists(),
            "{printed}"
        );
        fx.daemon.ctl_ok([
            "attach",
            "--cgroup",
            &printed,
            "--policy",
            &deny_all.display().to_string(),
            "--name",
            "slash",
        ])?;
        let s = fx
            .daemon
            .status_sandbox("slash")?
            .context("slash not attached")?;
        ensure!(
            get_u64(&s, "cgroup_id") == Some(fx.sandbox.cgroup().id()),
            "{s}"
        );
        fx.daemon.ctl_ok(["detach", "--name", "slash"])?;
        Ok(())
    })();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    result?;

    // An empty cgroup with a policy that needs a listener, without --netns: refused.
    let mount = egress_tests::cgroup::cgroup2_mount()?;
    let empty = mount.join(unique_name("empty"));
    std::fs::create_dir(&empty)?;
    let result = (|| -> Result<()> {
        let attach = |netns: Option<&Path>| {
            let mut args: Vec<&OsStr> = vec![
                OsStr::new("attach"),
                OsStr::new("--cgroup"),
                empty.as_os_str(),
                OsStr::new("--policy"),
                passthrough.as_os_str(),
                OsStr::new("--name"),
                OsStr::new("empty"),
            ];
            if let Some(n) = netns {
                args.extend([OsStr::new("--netns"), n.as_os_str()]);
            }
            fx.daemon.ctl(args)
        };
        let out = attach(None)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("has no process yet") && err.contains("--netns"),
            "an empty cgroup was attached without a network namespace: {out:?}"
        );
        ensure!(fx.daemon.status_sandbox("empty")?.is_none());
        ensure!(get_u64(&fx.daemon.status_json()?, "proxy_listeners") == Some(0));
        // Nor is the daemon's own namespace a sandbox's: its listeners would be on the
        // host's loopback.
        let host = std::path::PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
        let out = attach(Some(&host))?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("shares the daemon's network namespace"),
            "a sandbox in the daemon's network namespace was attached: {out:?}"
        );
        ensure!(fx.daemon.status_sandbox("empty")?.is_none());
        ensure!(get_u64(&fx.daemon.status_json()?, "proxy_listeners") == Some(0));
        let netns = fx.sandbox.netns().path();
        let out = attach(Some(&netns))?;
        ensure!(out.status.success(), "attach with --netns failed: {out:?}");

        // The same path, a new cgroup (a container re-created under the same id): the old
        // sandbox is reaped at once and the new attach succeeds.
        std::fs::remove_dir(&empty)?;
        std::fs::create_dir(&empty)?;
        let out = attach(Some(&netns))?;
        ensure!(
            out.status.success(),
            "re-created cgroup was refused: {out:?}"
        );
        let s = fx.daemon.status_sandbox("empty")?.context("not attached")?;
        ensure!(
            get_u64(&s, "cgroup_id") == Some(std::fs::metadata(&empty)?.ino()),
            "{s}"
        );
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::lifecycle("sandbox-detach").sandbox("empty"),
        )?;
        ensure!(
            get_str(&rec, "event.reason") == Some("cgroup-removed"),
            "{rec}"
        );
        fx.daemon.ctl_ok(["detach", "--name", "empty"])?;
        ensure!(get_u64(&fx.daemon.status_json()?, "proxy_listeners") == Some(0));
        Ok(())
    })();
    let _ = std::fs::remove_dir(&empty);
    result
}

/// Pod scope: the first container of a pod attaches the pod's cgroup (the parent of its
/// containers') as one sandbox; the pod's next container starts inside it, confined from
/// its first instruction; a container of an exempt namespace is not confined; removing
/// the pod's cgroup detaches the sandbox.
#[test]
fn pod_scope_confines_every_container_of_a_pod() -> Result<()> {
    require_root!();
    skip_if!(container::missing_tools());
    let fx = Fixture::new()?;
    let policies = policy_dir(&fx)?;
    let image = Image::build()?;
    let runc = Runc::new()?;
    let mut hooks = hook_setup(&fx.daemon, &policies, 5);
    hooks.extra = ["--scope", "pod", "--exempt-namespace", "egressd-system"]
        .map(String::from)
        .to_vec();
    let pod_cgroup = unique_cgroups_path("pod");
    let pod = unique_name("p");
    let k8s = |ns: &str| {
        vec![
            ("io.kubernetes.pod.namespace".to_string(), ns.to_string()),
            ("io.kubernetes.pod.name".to_string(), pod.clone()),
            ("io.egressd.policy".to_string(), "web".to_string()),
        ]
    };
    let spec = |ns: &str, leaf: &str, args: Vec<String>| ContainerSpec {
        args,
        netns: Some(fx.sandbox.netns().path()),
        cgroups_path: format!("{pod_cgroup}/{leaf}"),
        annotations: k8s(ns),
        hooks: Some(hooks.clone()),
        capabilities: Vec::new(),
        writable_cgroups: false,
    };
    let result = (|| -> Result<()> {
        let name = format!("k8s/team/{pod}");
        // The pod's first container stays up while the second runs.
        let first = runc.bundle(
            &image,
            &format!("{pod}-a"),
            &spec("team", "a", vec!["sleep".into(), "30".into()]),
        )?;
        let mut cmd = runc.command(
            40,
            &[OsStr::new("run"), OsStr::new("-d"), OsStr::new("--bundle")],
        );
        cmd.arg(&first).arg(format!("{pod}-a"));
        runc.track(&format!("{pod}-a"));
        // A detached container keeps runc's stdio: give it a file, not a pipe to wait on.
        let log = fx.dir.path().join("pod-a.log");
        let status = cmd
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(fx.dir.path().join("pod-a.err"))?)
            .status()?;
        ensure!(
            status.success(),
            "first container: {status}: {}",
            std::fs::read_to_string(fx.dir.path().join("pod-a.err")).unwrap_or_default()
        );
        let s = fx
            .daemon
            .status_sandbox(&name)?
            .context("pod sandbox not attached")?;
        ensure!(
            get_str(&s, "cgroup").is_some_and(|c| c.ends_with(pod_cgroup.trim_start_matches('/'))),
            "the pod sandbox is not the pod's cgroup: {s}"
        );
        let out = runc.run(
            &image,
            &format!("{pod}-b"),
            &spec("team", "b", first_instruction_script()),
        )?;
        check_confined_output(&out)?;
        fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::decision("deny", IpAddr::V4(CANARY_V4), 9).sandbox(&name),
        )?;
        expect::canary_silent(&fx.canary)?;
        ensure!(
            fx.daemon.status_sandbox(&name)?.is_some(),
            "the pod sandbox went with one of its containers"
        );
        // A later container is judged as an attach would judge it: one holding what the
        // pod's policy forbids (a `privileged` or debug container), or asking for another
        // policy, is not started, and the refusal is recorded in the pod's name.
        let started = vec!["echo".to_string(), "container-started".to_string()];
        let refused = [
            (
                "c",
                ContainerSpec {
                    capabilities: vec!["CAP_SYS_ADMIN".into()],
                    ..spec("team", "c", started.clone())
                },
                "require.no_capabilities",
            ),
            (
                "d",
                ContainerSpec {
                    annotations: k8s("team")
                        .into_iter()
                        .map(|(k, v)| match k.as_str() {
                            "io.egressd.policy" => (k, "passthrough".to_string()),
                            _ => (k, v),
                        })
                        .collect(),
                    ..spec("team", "d", started.clone())
                },
                "asks for policy",
            ),
        ];
        for (leaf, spec, why) in refused {
            let out = runc.run(&image, &format!("{pod}-{leaf}"), &spec)?;
            let all = text(&out);
            ensure!(
                !out.status.success()
                    && !all.contains("container-started")
                    && all.contains("egressd refused")
                    && all.contains(why),
                "container {leaf} started in the pod sandbox: {all}"
            );
            expect::policy_rejected(&fx.daemon, |s| s == name, &[&format!("{pod}-{leaf}"), why])?;
        }
        ensure!(
            fx.daemon.status_sandbox(&name)?.is_some(),
            "a refused container took the pod sandbox with it"
        );
        // Beside them, a container holding only the runtime's defaults still starts.
        let out = runc.run(
            &image,
            &format!("{pod}-e"),
            &spec("team", "e", started.clone()),
        )?;
        ensure!(
            out.status.success() && text(&out).contains("container-started"),
            "a later container meeting the policy was refused: {}",
            text(&out)
        );
        // So does one whose runtime, and so its hook, runs inside the pod's cgroup (CRI-O's
        // conmon with `conmon_cgroup = "pod"`): a process in a sandbox may join it.
        let pod_dir = PathBuf::from(get_str(&s, "cgroup").context("no cgroup in status")?);
        let out = runc.run_from_cgroup(
            &image,
            &format!("{pod}-f"),
            &spec("team", "f", started),
            &pod_dir,
        )?;
        ensure!(
            out.status.success() && text(&out).contains("container-started"),
            "a later container whose hook runs in the pod's cgroup was refused: {}",
            text(&out)
        );
        ensure!(
            !fx.daemon
                .audit_records()?
                .iter()
                .any(|r| get_str(r, "event.action") == Some("control-socket")),
            "the pod's own hook raised a control-socket alert"
        );
        // ...and is judged the same from there.
        let out = runc.run_from_cgroup(
            &image,
            &format!("{pod}-g"),
            &ContainerSpec {
                capabilities: vec!["CAP_SYS_ADMIN".into()],
                ..spec("team", "g", vec!["echo".into(), "container-started".into()])
            },
            &pod_dir,
        )?;
        ensure!(
            !out.status.success() && !text(&out).contains("container-started"),
            "a container holding CAP_SYS_ADMIN joined from inside the pod: {}",
            text(&out)
        );
        expect::policy_rejected(
            &fx.daemon,
            |s| s == name,
            &[
                &format!("{pod}-g"),
                "asked from inside it",
                "require.no_capabilities",
            ],
        )?;
        // The runtime's own hook asks only for what meets the policy: this is alerted.
        fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::lifecycle("control-socket").sandbox(&name),
        )?;

        // Exempt namespace: the hook lets a container the kubelet placed in a pod's
        // cgroup (a `kubepods` one) start unconfined...
        let kubepods = unique_cgroups_path("kubepods");
        let exempt_cgroup = format!("{kubepods}/kubepods/{}", unique_name("exempt"));
        let out = runc.run(
            &image,
            &unique_name("exempt"),
            &ContainerSpec {
                cgroups_path: exempt_cgroup.clone(),
                ..spec("egressd-system", "unused", vec!["true".into()])
            },
        )?;
        container::remove_cgroup(&exempt_cgroup);
        container::remove_cgroup(&format!("{kubepods}/kubepods"));
        container::remove_cgroup(&kubepods);
        ensure!(out.status.success(), "exempt container: {}", text(&out));

        ensure!(
            fx.daemon.status_json()?["sandboxes"]
                .as_array()
                .map(Vec::len)
                == Some(1),
            "an exempt container was attached"
        );
        // ...but not one anywhere else (podman copies an image's annotations into the
        // container's): that one is confined like any other.
        let claimed = unique_cgroups_path("claimed");
        let out = runc.run(
            &image,
            &unique_name("claimed"),
            &ContainerSpec {
                cgroups_path: format!("{claimed}/leaf"),
                ..spec("egressd-system", "unused", vec!["true".into()])
            },
        )?;
        let claimed_name = format!("k8s/egressd-system/{pod}");
        let attached = fx.daemon.status_sandbox(&claimed_name)?.is_some();
        container::remove_cgroup(&format!("{claimed}/leaf"));
        container::remove_cgroup(&claimed);
        ensure!(
            out.status.success() && attached,
            "a container outside a pod's cgroup was exempted: {}",
            text(&out)
        );
        fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::lifecycle("sandbox-detach").sandbox(&claimed_name),
        )?;

        // The pod goes: its cgroup is removed and the sandbox with it.
        let out = runc
            .command(20, &["delete", "--force", &format!("{pod}-a")])
            .output()?;
        ensure!(out.status.success(), "runc delete: {}", text(&out));
        container::remove_cgroup(&pod_cgroup);
        let rec = fx.daemon.wait_for_match(
            RECORD_TIMEOUT,
            &Match::lifecycle("sandbox-detach").sandbox(&name),
        )?;
        ensure!(
            get_str(&rec, "event.reason") == Some("cgroup-removed"),
            "{rec}"
        );
        Ok(())
    })();
    let _ = runc
        .command(20, &["delete", "--force", &format!("{pod}-a")])
        .output();
    container::remove_cgroup(&format!("{pod_cgroup}/a"));
    for leaf in ["b", "c", "d", "e", "f", "g"] {
        container::remove_cgroup(&format!("{pod_cgroup}/{leaf}"));
    }
    container::remove_cgroup(&pod_cgroup);
    result
}

/// A container whose image trusts the proxy's CA reaches the API through the proxy, which
/// adds the credential; the container never sees the token.
#[test]
fn runc_container_uses_the_proxy_with_the_ca_in_its_image() -> Result<()> {
    egress_tests::require_proxy_tools!();
    skip_if!(container::missing_tools());
    let fx = ProxyFixture::new(ProxyOpts::default())?;
    let dir = egress_tests::util::TempDir::new("policies")?;
    std::fs::write(dir.path().join("github.yaml"), PROXY_POLICY)?;
    let image = Image::build()?;
    image.add_curl()?;
    image.add_file("/etc/egressd-ca.pem", &std::fs::read(fx.proxy_ca())?)?;
    let runc = Runc::new()?;
    let id = unique_name("api");
    let cgroups_path = unique_cgroups_path("api");
    let url = "https://api.github.com/repos/acme/widgets";
    let out = runc.run(
        &image,
        &id,
        &ContainerSpec {
            args: [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--cacert",
                "/etc/egressd-ca.pem",
                "--capath",
                "/nonexistent",
                "--resolve",
                "api.github.com:443:192.0.2.10",
                url,
            ]
            .map(String::from)
            .to_vec(),
            netns: Some(fx.sandbox.netns().path()),
            cgroups_path: cgroups_path.clone(),
            annotations: vec![("io.egressd.policy".into(), "github".into())],
            hooks: Some(hook_setup(&fx.daemon, dir.path(), 5)),
            capabilities: Vec::new(),
            writable_cgroups: false,
        },
    )?;
    container::remove_cgroup(&cgroups_path);
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == REPO_BODY,
        "the container did not get the API's answer through the proxy: {}",
        text(&out)
    );
    let rec = fx.wait_proxy_record(RECORD_TIMEOUT, "the container's request", |r| {
        get_str(r, "egress.sandbox.name") == Some(id.as_str())
            && get_u64(r, "http.response.status_code") == Some(200)
    })?;
    ensure!(
        get_str(&rec, "egress.credential.name") == Some("github"),
        "the request record does not name the injected credential: {rec}"
    );
    fx.assert_token_absent(&[&out])?;
    Ok(())
}
