//! `cargo xtask demo-containers`: containers confined from their first instruction by the
//! OCI hook, with runc and (when installed) podman, in a small fake internet.
//!
//! The image is built from busybox-static; each container joins a network namespace
//! linked to the demo's world (documentation addresses only); the hook picks the policy by
//! name from a policy directory made for the demo. Everything is removed at the end.
use std::process::Output;

use anyhow::{bail, Context};
use egress_tests::{
    container::{self, hooks_dir_from_shipped, ContainerSpec, HookSetup, Image, Runc},
    daemon::{Daemon, DaemonOpts},
    servers::{Canary, Origin},
    util::{bounded, unique_name, TempDir},
    world::{World, CANARY_V4, ORIGIN_V4},
};

use crate::cmd::{bin, build_bins, require_root, step, workspace};
use crate::demo::{field, summary};

fn show(what: &str, out: &Output) {
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    let status = out
        .status
        .code()
        .map_or("killed".to_string(), |c| format!("exit {c}"));
    println!("  $ {what}\n    -> {status}");
    for l in text(&out.stdout)
        .lines()
        .chain(text(&out.stderr).lines())
        .take(8)
    {
        println!("       {l}");
    }
}

pub fn run() -> anyhow::Result<()> {
    require_root("the demo")?;
    if let Some(why) = container::missing_tools() {
        bail!("{why}");
    }
    build_bins()?;
    // SAFETY: single-threaded here; the harness reads these to find the binaries.
    unsafe {
        std::env::set_var("EGRESSD_BIN", bin("egressd"));
        std::env::set_var("EGRESSCTL_BIN", bin("egressctl"));
    }

    step("A fake internet (an origin, a canary), egressd, and a policy directory");
    let world = World::new()?;
    let _origin = Origin::start(&world)?;
    let canary = Canary::start(&world)?;
    let sandbox = world.add_sandbox("ctr")?;
    let daemon = Daemon::start(DaemonOpts::default())?;
    let dir = TempDir::new("demo-containers")?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::copy(
        workspace().join("policies/demo.yaml"),
        policies.join("web.yaml"),
    )
    .context("copying policies/demo.yaml")?;
    println!(
        "  policy `web` = policies/demo.yaml: TCP 80/443 to the origin ({ORIGIN_V4}); everything else denied"
    );
    let image = Image::build()?;
    let hooks = HookSetup {
        socket: daemon.socket(),
        policy_dir: policies.clone(),
        timeout_secs: 5,
        extra: Vec::new(),
    };
    let script = format!(
        "timeout 5 wget -q -O - http://{CANARY_V4}:9/; echo \"first instruction: exit $?\"; timeout 5 wget -q -O - http://{ORIGIN_V4}/"
    );

    step("runc: config.json runs `egressctl oci-hook` at createRuntime and poststop");
    let runc = Runc::new()?;
    let id = unique_name("demo");
    let cgroups_path = container::unique_cgroups_path("demo");
    let out = runc.run(
        &image,
        &id,
        &ContainerSpec {
            args: vec!["sh".into(), "-c".into(), script.clone()],
            netns: Some(sandbox.netns().path()),
            cgroups_path: cgroups_path.clone(),
            annotations: vec![("io.egressd.policy".into(), "web".into())],
            hooks: Some(hooks.clone()),
            ..ContainerSpec::default()
        },
    )?;
    container::remove_cgroup(&cgroups_path);
    show(
        &format!("runc run {id}   # its first instruction: wget the canary"),
        &out,
    );

    step("runc with the daemon stopped: the hook fails closed, the container is not created");
    let id2 = unique_name("nodaemon");
    let cgroups_path = container::unique_cgroups_path("nodaemon");
    let out = runc.run(
        &image,
        &id2,
        &ContainerSpec {
            args: vec![
                "sh".into(),
                "-c".into(),
                "echo this line never prints".into(),
            ],
            netns: Some(sandbox.netns().path()),
            cgroups_path: cgroups_path.clone(),
            annotations: vec![("io.egressd.policy".into(), "web".into())],
            hooks: Some(HookSetup {
                socket: dir.path().join("no-daemon.sock"),
                ..hooks.clone()
            }),
            ..ContainerSpec::default()
        },
    )?;
    container::remove_cgroup(&cgroups_path);
    show(&format!("runc run {id2}"), &out);

    if container::missing_podman().is_none() {
        step("podman: the shipped hooks.d files, selected by the io.egressd.policy annotation");
        let hooks_dir = hooks_dir_from_shipped(dir.path(), &hooks)?;
        let name = unique_name("podman");
        let mut cmd = bounded(
            60,
            "podman",
            &["--runtime", "runc", "--cgroup-manager", "cgroupfs"],
        );
        cmd.arg("--hooks-dir")
            .arg(&hooks_dir)
            .args(["run", "--rm", "--no-hosts"])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .arg("--network")
            .arg(format!("ns:{}", sandbox.netns().path().display()))
            .args(["--annotation", "io.egressd.policy=web"])
            .args(["--annotation", &format!("io.egressd.sandbox={name}")])
            .arg("--rootfs")
            .arg(image.rootfs())
            .args(["sh", "-c", &script]);
        let out = cmd.output().context("running podman")?;
        show(
            "podman run --annotation io.egressd.policy=web ... sh -c 'wget canary; wget origin'",
            &out,
        );
    }

    step("Audit log: each container attached before its first connect, detached by the hook");
    for v in daemon.audit_records()? {
        let reason = field(&v, "event.reason");
        println!(
            "  #{:<3} {}{}",
            field(&v, "event.sequence"),
            summary(&v),
            if reason.is_empty() || field(&v, "event.action") != "sandbox-detach" {
                String::new()
            } else {
                format!(" reason={reason}")
            }
        );
    }
    step("The canary (the denied destination) received:");
    let got = canary.received()?;
    println!("  {} connections", got.len());
    if !got.is_empty() {
        bail!("the canary received traffic: {got:?}");
    }
    step("Done; removing the demo's namespaces, cgroups, containers and pins");
    Ok(())
}
