//! What the repository ships for installing egressd: the Kubernetes manifests (validated
//! with `kubernetes-validate --strict`, their policies with `egressctl policy test`), the
//! systemd unit (`systemd-analyze verify`) and the readiness notification it relies on
//! (`Type=notify`: egressd sends `READY=1` to `$NOTIFY_SOCKET` once it serves requests).
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use egress_tests::daemon::{egressctl_bin, egressd_bin, Daemon, DaemonOpts};
use egress_tests::util::{run_checked, TempDir};
use egress_tests::{require_root, skip_if};

/// The virtual environment `scripts/setup.sh` makes for the Python tools.
const VENV: &str = "/opt/egressd-venv";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/kubernetes"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

#[test]
fn kubernetes_manifests_validate_and_their_policies_pass_their_tests() -> Result<()> {
    let validate = Path::new(VENV).join("bin/kubernetes-validate");
    skip_if!((!validate.is_file()).then(|| format!(
        "{} not found (scripts/setup.sh installs kubernetes-validate)",
        validate.display()
    )));
    let files = manifests()?;
    ensure!(files.len() >= 3, "manifests missing: {files:?}");
    let out = Command::new(&validate)
        .arg("--strict")
        .args(&files)
        .output()?;
    ensure!(
        out.status.success(),
        "kubernetes-validate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The validator itself refuses what it should (a field no schema has).
    let dir = TempDir::new("k8s")?;
    let bad = dir.write(
        "bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\nbogus: 1\n",
    )?;
    ensure!(
        !Command::new(&validate)
            .arg("--strict")
            .arg(&bad)
            .status()?
            .success(),
        "kubernetes-validate accepted an unknown field"
    );

    // Every policy and hook configuration in the ConfigMaps.
    let script = r#"
import json, sys, yaml, pathlib
out = pathlib.Path(sys.argv[1])
for f in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(f)):
        if doc and doc.get("kind") == "ConfigMap":
            for k, v in doc.get("data", {}).items():
                if k.endswith(".json"):
                    json.loads(v)
                (out / k).write_text(v)
"#;
    let out = Command::new(Path::new(VENV).join("bin/python3"))
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .args(&files)
        .output()?;
    ensure!(out.status.success(), "extracting ConfigMaps: {out:?}");
    let policies: Vec<PathBuf> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && p.file_name()
                    .is_some_and(|n| n != "egressd.yaml" && n != "bad.yaml")
        })
        .collect();
    ensure!(!policies.is_empty(), "no policies in the ConfigMap");
    run_checked(
        Command::new(egressctl_bin())
            .args(["policy", "test"])
            .args(&policies),
    )?;
    // Every pod policy shipped refuses pods holding a capability that gets around the
    // kernel programs (another network namespace, NAT and tunnels, raw frames).
    for policy in &policies {
        let text = std::fs::read_to_string(policy)?;
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("no_capabilities:"))
            .with_context(|| format!("{} has no require.no_capabilities", policy.display()))?;
        for cap in ["sys_admin", "net_admin", "net_raw"] {
            ensure!(
                line.contains(cap),
                "{}: require.no_capabilities lacks {cap}",
                policy.display()
            );
        }
    }
    // The daemon's configuration there rotates the log it writes to a hostPath.
    let config = std::fs::read_to_string(dir.path().join("egressd.yaml"))?;
    ensure!(
        config.contains("rotate:"),
        "the DaemonSet's egressd.yaml does not rotate the audit log"
    );
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> Result<()> {
    skip_if!(egress_tests::util::which("systemd-analyze")
        .is_none()
        .then(|| "systemd-analyze not found".to_string()));
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/egressd.service"))?;
    for want in [
        "Type=notify",
        "LimitNOFILE=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        ensure!(unit.contains(want), "the unit lacks {want}");
    }
    // Verify against the binary just built (the unit names the installed path).
    let dir = TempDir::new("unit")?;
    let bin = egressd_bin();
    let unit = unit.replace("/usr/local/bin/egressd", &bin.display().to_string());
    let path = dir.write("egressd.service", &unit)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    // Verify also loads the units this one orders itself against, which a host without
    // them reports as missing; only problems with this unit count.
    let own: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("egressd.service") && !l.contains("not found"))
        .collect();
    ensure!(own.is_empty(), "systemd-analyze verify: {err}");
    Ok(())
}

#[test]
fn egressd_notifies_readiness() -> Result<()> {
    require_root!();
    let dir = TempDir::new("notify")?;
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let daemon = Daemon::start(DaemonOpts {
        env: vec![("NOTIFY_SOCKET".to_string(), sock_path.display().to_string())],
        ..DaemonOpts::default()
    })?;
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).context("no readiness notification")?;
    ensure!(
        &buf[..n] == b"READY=1",
        "got {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Ready means ready: the control socket answers.
    daemon.ctl_ok(["status"])?;
    Ok(())
}

#[test]
fn man_pages_and_completions_are_generated() -> Result<()> {
    for bin in [egressd_bin(), egressctl_bin()] {
        let man = run_checked(Command::new(&bin).arg("manpage"))?;
        let man = String::from_utf8_lossy(&man.stdout);
        ensure!(man.contains(".TH"), "{} manpage is not roff", bin.display());
        for shell in ["bash", "zsh", "fish"] {
            let out = run_checked(Command::new(&bin).args(["completions", shell]))?;
            ensure!(
                !out.stdout.is_empty(),
                "{} {shell} completions empty",
                bin.display()
            );
        }
    }
    let man = run_checked(Command::new(egressctl_bin()).arg("manpage"))?;
    ensure!(
        String::from_utf8_lossy(&man.stdout).contains("oci\\-hook"),
        "egressctl's man page lacks oci-hook"
    );
    Ok(())
}
