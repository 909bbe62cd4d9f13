//! Real containers for the end-to-end tests: a root filesystem built here from Debian's
//! busybox-static (no registry), OCI bundles whose `config.json` joins a test network
//! namespace and runs `egressctl oci-hook`, and runc with a private state directory.
//!
//! Each [`Runc`] keeps its containers' state under its own `--root`, and its drop deletes
//! every container it ran (`runc delete --force`), which also removes their cgroups.
use std::ffi::OsStr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::daemon::egressctl_bin;
use crate::util::{bounded, unique_name, which, TempDir};

/// Why container tests cannot run here, if they cannot.
pub fn missing_tools() -> Option<String> {
    for tool in ["runc", "busybox"] {
        if which(tool).is_none() {
            return Some(format!(
                "{tool} not found (scripts/setup.sh installs runc and busybox-static)"
            ));
        }
    }
    None
}

/// Why podman tests cannot run here, if they cannot.
pub fn missing_podman() -> Option<String> {
    missing_tools().or_else(|| {
        which("podman")
            .is_none()
            .then(|| "podman not found (scripts/setup.sh installs it)".to_string())
    })
}

/// Applets linked in the image.
const APPLETS: &[&str] = &[
    "sh", "wget", "cat", "echo", "sleep", "true", "ls", "timeout",
];

/// A container root filesystem: busybox-static and its applets.
#[derive(Debug)]
pub struct Image {
    dir: TempDir,
}

impl Image {
    pub fn build() -> Result<Self> {
        let dir = TempDir::new("image")?;
        let root = dir.path().join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let busybox = which("busybox").context("busybox not found")?;
        std::fs::copy(&busybox, root.join("bin/busybox"))
            .with_context(|| format!("copy {}", busybox.display()))?;
        for a in APPLETS {
            symlink("busybox", root.join("bin").join(a))?;
        }
        Ok(Self { dir })
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Adds Debian's curl with the shared libraries it loads (as `ldd` lists them, at the
    /// same paths), so the image has a real TLS client.
    pub fn add_curl(&self) -> Result<()> {
        let curl = which("curl").context("curl not found")?;
        let out = crate::util::run_checked(Command::new("ldd").arg(&curl))?;
        let mut files = vec![curl.clone()];
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                files.push(PathBuf::from(p));
            }
        }
        for f in files {
            let dest = self.rootfs().join(f.strip_prefix("/").unwrap_or(&f));
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(&f, &dest).with_context(|| format!("copy {}", f.display()))?;
        }
        Ok(())
    }

    /// Writes a file into the image (e.g. the proxy's CA certificate).
    pub fn add_file(&self, path: &str, contents: &[u8]) -> Result<()> {
        let dest = self.rootfs().join(path.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&dest, contents).with_context(|| format!("write {}", dest.display()))
    }
}

/// Settings of the hook entries a bundle's `config.json` carries.
#[derive(Debug, Clone)]
pub struct HookSetup {
    pub socket: PathBuf,
    pub policy_dir: PathBuf,
    pub timeout_secs: u32,
    /// More `oci-hook` options (e.g. `--scope pod`).
    pub extra: Vec<String>,
}

impl HookSetup {
    /// `egressctl --socket S oci-hook STAGE --policy-dir D --timeout T`.
    pub fn args(&self, stage: &str) -> Vec<String> {
        vec![
            "egressctl".into(),
            "--socket".into(),
            self.socket.display().to_string(),
            "oci-hook".into(),
            stage.into(),
            "--policy-dir".into(),
            self.policy_dir.display().to_string(),
            "--timeout".into(),
            self.timeout_secs.to_string(),
        ]
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect()
    }

    fn entry(&self, stage: &str) -> Value {
        json!({
            "path": egressctl_bin().display().to_string(),
            "args": self.args(stage),
            "timeout": self.timeout_secs + 5,
        })
    }
}

/// What a container runs and where.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub args: Vec<String>,
    /// Network namespace to join; `None` makes a new (loopback-only) one.
    pub netns: Option<PathBuf>,
    /// `linux.cgroupsPath`.
    pub cgroups_path: String,
    pub annotations: Vec<(String, String)>,
    pub hooks: Option<HookSetup>,
    /// Capabilities added to the runtime's default sets (`CAP_SYS_ADMIN`), as a
    /// `privileged` container or a debug one would hold them.
    pub capabilities: Vec<String>,
    /// The cgroup hierarchy mounted read-write at `/sys/fs/cgroup` (the runtime's
    /// default spec mounts it read-only, with no cgroup namespace).
    pub writable_cgroups: bool,
}

/// runc with a private state directory.
#[derive(Debug)]
pub struct Runc {
    dir: TempDir,
    ids: std::sync::Mutex<Vec<String>>,
}

impl Runc {
    pub fn new() -> Result<Self> {
        let dir = TempDir::new("runc")?;
        std::fs::create_dir_all(dir.path().join("state"))?;
        Ok(Self {
            dir,
            ids: Default::default(),
        })
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `runc --root R <args>`, bounded.
    pub fn command<S: AsRef<OsStr>>(&self, secs: u32, args: &[S]) -> Command {
        let mut cmd = bounded(secs, "runc", &["--root"]);
        cmd.arg(self.root()).args(args).stdin(Stdio::null());
        cmd
    }

    /// Writes a bundle for `spec` on `image` and returns its directory.
    pub fn bundle(&self, image: &Image, id: &str, spec: &ContainerSpec) -> Result<PathBuf> {
        let bundle = self.dir.path().join(format!("bundle-{id}"));
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(&bundle)?;
        crate::util::run_checked(
            Command::new("runc")
                .arg("spec")
                .arg("--bundle")
                .arg(&bundle),
        )?;
        let path = bundle.join("config.json");
        let mut config: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        config["root"] = json!({ "path": image.rootfs().display().to_string(), "readonly": true });
        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!(spec.args);
        config["hostname"] = json!("ctr");
        let mut namespaces: Vec<Value> = config["linux"]["namespaces"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n["type"] != "network")
            .collect();
        namespaces.push(match &spec.netns {
            Some(p) => json!({ "type": "network", "path": p.display().to_string() }),
            None => json!({ "type": "network" }),
        });
        config["linux"]["namespaces"] = json!(namespaces);
        config["linux"]["cgroupsPath"] = json!(spec.cgroups_path);
        if spec.writable_cgroups {
            // And no cgroup namespace of its own, whatever the runtime's default spec says.
            if let Some(ns) = config["linux"]["namespaces"].as_array_mut() {
                ns.retain(|n| n["type"] != "cgroup");
            }
            if let Some(mounts) = config["mounts"].as_array_mut() {
                for m in mounts
                    .iter_mut()
                    .filter(|m| m["destination"] == "/sys/fs/cgroup")
                {
                    if let Some(options) = m["options"].as_array_mut() {
                        options.retain(|o| o != "ro");
                        options.push(json!("rw"));
                    }
                }
            }
        }
        for set in ["bounding", "effective", "permitted"] {
            if let Some(list) = config["process"]["capabilities"][set].as_array_mut() {
                list.extend(spec.capabilities.iter().map(|c| json!(c)));
            }
        }
        let annotations: serde_json::Map<String, Value> = spec
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        config["annotations"] = Value::Object(annotations);
        if let Some(h) = &spec.hooks {
            config["hooks"] = json!({
                "createRuntime": [h.entry("create-runtime")],
                "poststop": [h.entry("poststop")],
            });
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        Ok(bundle)
    }

    /// `runc run --bundle B ID` to completion (the container's output is in the result).
    pub fn run(&self, image: &Image, id: &str, spec: &ContainerSpec) -> Result<Output> {
        let bundle = self.bundle(image, id, spec)?;
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
        let mut cmd = self.command(30, &[OsStr::new("run"), OsStr::new("--bundle")]);
        cmd.arg(&bundle).arg(id);
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    /// [`Runc::run`] with runc itself (and so the hooks it runs) started inside cgroup
    /// directory `cgroup`, as CRI-O starts it from conmon with `conmon_cgroup = "pod"`.
    pub fn run_from_cgroup(
        &self,
        image: &Image,
        id: &str,
        spec: &ContainerSpec,
        cgroup: &Path,
    ) -> Result<Output> {
        let bundle = self.bundle(image, id, spec)?;
        self.track(id);
        let procs = cgroup.join("cgroup.procs");
        let mut cmd = bounded(
            30,
            "sh",
            &[
                OsStr::new("-c"),
                OsStr::new("echo $$ > \"$0\" && exec \"$@\""),
                procs.as_os_str(),
                OsStr::new("runc"),
                OsStr::new("--root"),
                self.root().as_os_str(),
                OsStr::new("run"),
                OsStr::new("--bundle"),
                bundle.as_os_str(),
                OsStr::new(id),
            ],
        );
        cmd.stdin(Stdio::null());
        cmd.output().with_context(|| format!("spawn {cmd:?}"))
    }

    /// Deletes `id` when this guard drops (for containers started with [`Runc::command`]).
    pub fn track(&self, id: &str) {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
    }

    /// Container ids runc still knows.
    pub fn list(&self) -> Result<Vec<String>> {
        let out = self.command(10, &["list", "-q"]).output()?;
        if !out.status.success() {
            bail!("runc list: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|p| p.into_inner()));
        for id in ids {
            let _ = self.command(10, &["delete", "--force", &id]).output();
        }
    }
}

/// A unique `linux.cgroupsPath` (cgroupfs form, relative to the cgroup2 mount).
pub fn unique_cgroups_path(label: &str) -> String {
    format!("/{}", unique_name(label))
}

/// Removes a cgroup directory runc left (it removes its own on delete; this is a guard
/// for failed tests).
pub fn remove_cgroup(cgroups_path: &str) {
    if let Ok(mount) = crate::cgroup::cgroup2_mount() {
        let _ = std::fs::remove_dir(mount.join(cgroups_path.trim_start_matches('/')));
    }
}

/// Stdout and stderr of an output, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The shipped podman/CRI-O hook configuration (`deploy/oci/hooks.d/egressd.json`) with
/// the test's binary, socket and policy directory, written to `dir` for `--hooks-dir`.
pub fn hooks_dir_from_shipped(dir: &Path, setup: &HookSetup) -> Result<PathBuf> {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy/oci/hooks.d");
    let out = dir.join("hooks.d");
    std::fs::create_dir_all(&out)?;
    for e in std::fs::read_dir(&shipped).with_context(|| format!("read {}", shipped.display()))? {
        let e = e?;
        let mut hook: Value = serde_json::from_slice(&std::fs::read(e.path())?)
            .with_context(|| format!("{} is not JSON", e.path().display()))?;
        let stage = hook["stages"][0]
            .as_str()
            .context("a shipped hook has no stage")?;
        let stage = match stage {
            "createRuntime" => "create-runtime",
            other => other,
        }
        .to_string();
        hook["hook"]["path"] = json!(egressctl_bin().display().to_string());
        hook["hook"]["args"] = json!(setup.args(&stage));
        std::fs::write(out.join(e.file_name()), serde_json::to_vec_pretty(&hook)?)?;
    }
    Ok(out)
}
