//! The OCI runtime hook (`egressctl oci-hook`): confines a container before its first
//! instruction and releases it when it stops.
//!
//! A runtime (runc, crun, podman, CRI-O) runs the hook at `createRuntime`, after it made
//! the container's namespaces and cgroup and before the container's process runs anything
//! of its own; the hook attaches that cgroup with the policy the container's annotations
//! name, and the runtime starts the container only when the hook exits 0. Any doubt (the
//! daemon down or slow, no policy, an unknown policy name, a container sharing the host's
//! network) is a non-zero exit, so the container is not created. At `poststop` the hook
//! detaches the sandbox (recorded with reason `hook`).
//!
//! Policies are chosen by name from a host directory (`/etc/egressd/policies/NAME.yaml`),
//! never read from a path the container's creator supplies.
mod spec;

use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};

pub use spec::{Config, State};

use crate::{
    cgroup,
    control::{self, DetachReason, Request, Response, RuntimeInit},
};

/// Annotation naming the policy (a file name in the policy directory, without `.yaml`).
pub const ANNOTATION_POLICY: &str = "io.egressd.policy";
/// Annotation naming the sandbox in status and audit records [default: the container id].
pub const ANNOTATION_SANDBOX: &str = "io.egressd.sandbox";
/// Set by CRI-O and containerd's CRI on every container of a pod.
pub const ANNOTATION_K8S_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const ANNOTATION_K8S_POD: &str = "io.kubernetes.pod.name";
/// CRI-O's annotation holding a container's labels (JSON). CRI-O also writes each label
/// into the container's annotations, after the pod's annotations, so a label of the same
/// key overrides one: a pod author could choose a policy or claim a sandbox name past an
/// admission policy that checks annotations. (The `io.kubernetes.pod.*` labels are
/// kubelet's own, set from the pod's metadata over any of the pod's.)
const ANNOTATION_CRIO_LABELS: &str = "io.kubernetes.cri-o.Labels";

/// Longest state document read from standard input.
const MAX_STATE: u64 = 1 << 20;
/// Longest `config.json` read.
const MAX_CONFIG: u64 = 16 << 20;

/// When the runtime runs the hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// After the namespaces and cgroup exist, before the container runs anything: attach.
    CreateRuntime,
    /// The older name of the same moment, for runtimes without `createRuntime`.
    Prestart,
    /// After the container stopped: detach.
    Poststop,
}

/// What one sandbox covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// Each container is its own sandbox (its cgroup, its network namespace).
    Container,
    /// A Kubernetes pod is one sandbox: the pod's cgroup (the parent of its containers')
    /// with the pod's network namespace covers every container in it. The first container
    /// attaches it; each later one joins it, judged against its policy (see
    /// [`Request::Join`]); the pod cgroup's removal detaches it.
    Pod,
}

/// The hook's settings (from its command line in the runtime's hook configuration).
#[derive(Debug, Clone)]
pub struct HookOptions {
    pub socket: PathBuf,
    /// Host directory of policies, chosen by name.
    pub policy_dir: PathBuf,
    /// Policy for containers without the annotation; none: such containers are refused.
    pub default_policy: Option<String>,
    /// Bound on the whole exchange with the daemon.
    pub timeout: Duration,
    /// Kubernetes namespaces whose containers are not confined (the daemon's own).
    pub exempt_namespaces: Vec<String>,
    pub scope: Scope,
}

/// What the hook decided to do for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not confined, and why.
    Exempt(String),
    Attach {
        name: String,
        cgroup: PathBuf,
        netns: PathBuf,
        policy_path: PathBuf,
        /// The container's init process and the capabilities its config gives it.
        init: RuntimeInit,
    },
    /// Detach the named sandbox if it confines `cgroup` (the container's, from its
    /// config: at `poststop` its process is gone).
    Detach { name: String, cgroup: PathBuf },
    /// Nothing to do at this stage (pod scope: the pod outlives its containers).
    Nothing(String),
}

/// Runs the hook: reads the state from `stdin`, does the stage's work, and returns the
/// line to print. An error means a non-zero exit (the runtime does not start the container).
///
/// Every refusal is recorded: one the daemon made (or could not be asked about) is in
/// its own trail or nowhere, any other (the state or config unreadable, the plan refused,
/// the policy file unreadable) is sent to the daemon as `HookRefused` (at the stages that
/// create a container; a `poststop` failure refuses nothing).
pub fn run(stage: Stage, opts: &HookOptions, stdin: impl Read) -> anyhow::Result<String> {
    let mut container = None;
    let result = run_stage(stage, opts, stdin, &mut container);
    // At `poststop` the container ran: a failure then refused nothing.
    let refusing = stage != Stage::Poststop;
    if let Err(e) = &result {
        if refusing && !e.chain().any(|c| c.is::<DaemonExchange>()) {
            // The container will not start: the daemon records why (if it can be reached;
            // the runtime logs the error either way).
            let _ = call(
                opts,
                Request::HookRefused {
                    container: container.unwrap_or_else(|| "(unknown)".to_owned()),
                    reason: format!("{e:#}"),
                },
            );
        }
    }
    result
}

/// An error from the exchange with the daemon: it refused (and recorded why) or did not
/// answer (and cannot record anything).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DaemonExchange(String);

/// The hook's work; `container` is set to the container's id once the state is read.
fn run_stage(
    stage: Stage,
    opts: &HookOptions,
    stdin: impl Read,
    container: &mut Option<String>,
) -> anyhow::Result<String> {
    let mut text = String::new();
    stdin
        .take(MAX_STATE)
        .read_to_string(&mut text)
        .context("reading the OCI state from standard input")?;
    let state: State =
        serde_json::from_str(&text).context("the OCI state on standard input is not valid")?;
    *container = Some(state.id.clone());
    let config = read_config(&state.bundle)?;
    match plan(stage, opts, &state, &config)? {
        Plan::Exempt(why) | Plan::Nothing(why) => Ok(why),
        Plan::Attach {
            name,
            cgroup,
            netns,
            policy_path,
            init,
        } => {
            let source = std::fs::read_to_string(&policy_path)
                .with_context(|| format!("reading policy {}", policy_path.display()))?;
            if opts.scope == Scope::Pod {
                // The pod's first container attaches it, each later one joins it (judged
                // as an attach would be); the daemon decides which under one lock.
                let resp = call(
                    opts,
                    Request::Join {
                        name,
                        container: state.id.clone(),
                        cgroup,
                        policy_path: policy_path.display().to_string(),
                        policy_source: source,
                        netns,
                        runtime_init: init,
                    },
                )?;
                return answer(resp);
            }
            let resp = call(
                opts,
                Request::Attach {
                    cgroup,
                    name: Some(name),
                    policy_path: policy_path.display().to_string(),
                    policy_source: source,
                    netns: Some(netns),
                    runtime_init: Some(init),
                },
            )?;
            answer(resp)
        }
        Plan::Detach { name, cgroup } => {
            let resp = call(
                opts,
                Request::Detach {
                    name: Some(name.clone()),
                    cgroup: Some(cgroup),
                    reason: Some(DetachReason::Hook),
                },
            )?;
            match resp.error.as_deref() {
                // Already gone (the daemon reaped the removed cgroup first).
                Some(e) if !resp.ok && e.starts_with("no sandbox named") => {
                    Ok(format!("sandbox {name:?} was already detached"))
                }
                _ => answer(resp),
            }
        }
    }
}

fn answer(resp: Response) -> anyhow::Result<String> {
    if resp.ok {
        Ok(resp.message.unwrap_or_default())
    } else {
        Err(DaemonExchange(format!(
            "egressd refused: {}",
            resp.error.unwrap_or_else(|| "no reason given".into())
        ))
        .into())
    }
}

fn read_config(bundle: &Path) -> anyhow::Result<Config> {
    let path = bundle.join("config.json");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_CONFIG)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

/// The daemon's answer within the timeout, or an error (the daemon is down or slow).
fn call(opts: &HookOptions, req: Request) -> anyhow::Result<Response> {
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = opts.socket.clone();
    let timeout = opts.timeout;
    std::thread::spawn(move || {
        let _ = tx.send(control::call_timeout(&socket, &req, timeout));
    });
    match rx.recv_timeout(opts.timeout) {
        Ok(r) => r.map_err(|e| DaemonExchange(format!("{e:#}")).into()),
        Err(_) => Err(DaemonExchange(format!(
            "egressd did not answer within {:?} (socket {}); refusing to start the container unconfined",
            opts.timeout,
            opts.socket.display()
        ))
        .into()),
    }
}

/// Decides what to do from the state and config alone (plus the host's `/proc` and
/// cgroup filesystem for the container's process).
pub fn plan(
    stage: Stage,
    opts: &HookOptions,
    state: &State,
    config: &Config,
) -> anyhow::Result<Plan> {
    let annotations = merged_annotations(state, config);
    reserved_labels(&annotations)?;
    if let Some(ns) = annotations.get(ANNOTATION_K8S_NAMESPACE) {
        // podman copies an image's annotations into the container's: a namespace claim
        // exempts only a container the kubelet placed in a pod's cgroup, which no image
        // chooses.
        if opts.exempt_namespaces.iter().any(|e| e == ns) && in_a_kubernetes_pod(config) {
            return Ok(Plan::Exempt(format!(
                "container {} is in exempt namespace {ns:?}; not confined",
                state.id
            )));
        }
    }
    let name = sandbox_name(opts.scope, &state.id, &annotations)?;
    match stage {
        Stage::Poststop if opts.scope == Scope::Pod => Ok(Plan::Nothing(format!(
            "pod sandbox {name:?} stays until its cgroup is removed"
        ))),
        Stage::Poststop => match config.cgroups_path() {
            Some(p) => Ok(Plan::Detach {
                name,
                cgroup: configured_cgroup(p)?,
            }),
            None => Ok(Plan::Nothing(format!(
                "no cgroupsPath in the config to match sandbox {name:?} against; the daemon detaches it when its cgroup is removed"
            ))),
        },
        Stage::CreateRuntime | Stage::Prestart => {
            let policy = annotations
                .get(ANNOTATION_POLICY)
                .cloned()
                .or_else(|| opts.default_policy.clone())
                .with_context(|| {
                    format!(
                        "container {} has no {ANNOTATION_POLICY} annotation and the hook has no --default-policy; refusing to start it unconfined",
                        state.id
                    )
                })?;
            let policy_path = policy_file(&opts.policy_dir, &policy)?;
            let pid = state.pid.filter(|p| *p > 0).with_context(|| {
                format!(
                    "the OCI state of {} has no pid (run the hook at createRuntime)",
                    state.id
                )
            })?;
            // The namespace the container is in, not the one its config asks for (a
            // `path` can join the host's).
            let cgroupns = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
            let own_cgroupns =
                cgroupns(&format!("/proc/{pid}/ns/cgroup")) != cgroupns("/proc/self/ns/cgroup");
            if let Some(mount) = config.writable_host_cgroups(own_cgroupns) {
                bail!(
                    "container {} mounts the cgroup hierarchy writable ({mount}) without a \
                     cgroup namespace of its own: its root could move itself out of the \
                     sandbox's cgroup; refusing (mount it read-only, or give the container a \
                     cgroup namespace)",
                    state.id
                );
            }
            let cgroup = container_cgroup(pid, config.cgroups_path())?;
            let cgroup = match opts.scope {
                Scope::Container => cgroup,
                Scope::Pod => cgroup
                    .parent()
                    .map(Path::to_path_buf)
                    .context("the container's cgroup has no parent to be its pod's")?,
            };
            // The daemon names sandboxes' cgroups by their canonical path.
            let cgroup = std::fs::canonicalize(&cgroup)
                .with_context(|| format!("cgroup {}", cgroup.display()))?;
            let netns = container_netns(pid, config)?;
            Ok(Plan::Attach {
                name,
                cgroup,
                netns,
                policy_path,
                init: RuntimeInit {
                    pid,
                    capabilities: config.process_capabilities(),
                },
            })
        }
    }
}

/// Whether the runtime placed the container in a Kubernetes pod's cgroup (`kubepods`
/// slices under the systemd driver, `/kubepods/...` under cgroupfs).
fn in_a_kubernetes_pod(config: &Config) -> bool {
    config
        .cgroups_path()
        .is_some_and(|p| p.split(['/', ':', '-', '.']).any(|part| part == "kubepods"))
}

/// Refuses a container whose labels use an `io.egressd.*` key (see
/// [`ANNOTATION_CRIO_LABELS`]): which of the two the annotation now holds cannot be told.
fn reserved_labels(annotations: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let Some(json) = annotations.get(ANNOTATION_CRIO_LABELS) else {
        return Ok(());
    };
    let labels: BTreeMap<String, serde_json::Value> = serde_json::from_str(json)
        .with_context(|| format!("{ANNOTATION_CRIO_LABELS} is not a JSON object; refusing"))?;
    if let Some(key) = labels.keys().find(|k| k.starts_with("io.egressd.")) {
        anyhow::bail!(
            "the pod has a label {key:?}, which the runtime copies over the annotation of the \
             same key that egressd reads; refusing to start it (set io.egressd.* as \
             annotations, never labels)"
        );
    }
    Ok(())
}

/// Annotations of the config, overridden by those the runtime put in the state.
fn merged_annotations(state: &State, config: &Config) -> BTreeMap<String, String> {
    let mut all = config.annotations.clone();
    all.extend(state.annotations.clone());
    all
}

/// The sandbox's name: the annotation, else (pod scope) `k8s/NAMESPACE/POD`, else the
/// container id.
pub fn sandbox_name(
    scope: Scope,
    id: &str,
    annotations: &BTreeMap<String, String>,
) -> anyhow::Result<String> {
    let name = match (annotations.get(ANNOTATION_SANDBOX), scope) {
        (Some(n), _) => n.clone(),
        (None, Scope::Pod) => {
            let ns = annotations.get(ANNOTATION_K8S_NAMESPACE);
            let pod = annotations.get(ANNOTATION_K8S_POD);
            match (ns, pod) {
                (Some(ns), Some(pod)) => pod_sandbox_name(ns, pod),
                _ => bail!(
                    "pod scope needs the {ANNOTATION_K8S_NAMESPACE} and {ANNOTATION_K8S_POD} annotations (set by CRI-O), or {ANNOTATION_SANDBOX}"
                ),
            }
        }
        (None, Scope::Container) => id.to_string(),
    };
    if let Some(problem) = crate::text::sandbox_name_problem(&name) {
        bail!("{problem}");
    }
    Ok(name)
}

/// A pod's sandbox name, `k8s/NAMESPACE/POD`; one longer than a sandbox name may be
/// (Kubernetes allows 63-character namespaces and 253-character pod names) is cut and
/// ends in `+` and 12 hex digits of the SHA-256 of the whole, so that every container of
/// the pod gets the same name and two pods whose names begin alike get two.
fn pod_sandbox_name(namespace: &str, pod: &str) -> String {
    const MAX: usize = 64;
    let whole = format!("k8s/{namespace}/{pod}");
    if whole.len() <= MAX {
        return whole;
    }
    crate::text::cut_with_digest(&whole, whole.chars(), MAX, '+')
}

/// `DIR/NAME.yaml` for a policy name; names with a `/`, `..`, or anything but letters,
/// digits, `-`, `_` and `.` are refused, so an annotation can only pick among the host's
/// policies.
pub fn policy_file(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!(
            "policy name {name:?} is not valid: a file name in {} without `.yaml` (letters, digits, -, _, ., no `/` or `..`)",
            dir.display()
        );
    }
    let path = dir.join(format!("{name}.yaml"));
    let meta = std::fs::metadata(&path).with_context(|| {
        format!(
            "policy {name:?}: {} does not exist (policies are chosen by name from {})",
            path.display(),
            dir.display()
        )
    })?;
    if !meta.is_file() {
        bail!("policy {name:?}: {} is not a file", path.display());
    }
    Ok(path)
}

/// The cgroup v2 directory a config's `linux.cgroupsPath` names (cgroupfs or systemd form).
fn configured_cgroup(cgroups_path: &str) -> anyhow::Result<PathBuf> {
    let rel = match cgroup::systemd_cgroup_path(cgroups_path) {
        Some(p) => p,
        None => PathBuf::from(cgroups_path.trim_start_matches('/')),
    };
    Ok(cgroup::cgroup2_mount()?.join(rel))
}

/// The container's cgroup v2 directory: where its process is. When the config names a
/// cgroup (cgroupfs or systemd form), the process must be in it (or below it), or the
/// hook refuses: it confines what it was asked to, or nothing.
pub fn container_cgroup(pid: u32, cgroups_path: Option<&str>) -> anyhow::Result<PathBuf> {
    let actual = cgroup::of_pid(pid).context("reading the container process's cgroup")?;
    let Some(configured) = cgroups_path else {
        return Ok(actual);
    };
    let expected = configured_cgroup(configured)?;
    if actual.starts_with(&expected) {
        return Ok(expected);
    }
    // A relative cgroupfs path is placed under the runtime's own cgroup by some runtimes.
    let rel = Path::new(configured);
    if rel.is_relative() && !configured.contains(':') && actual.ends_with(rel) {
        return Ok(actual);
    }
    bail!(
        "the container's process {pid} is in cgroup {}, not in {} (from cgroupsPath {configured:?}); refusing",
        actual.display(),
        expected.display()
    )
}

/// The container's network namespace: the one its config joins (a stable path such as
/// `/var/run/netns/NAME`) when that is the process's, else `/proc/PID/ns/net`. A
/// container that shares the host's namespace is refused: its proxy listener would be on
/// the host's loopback.
pub fn container_netns(pid: u32, config: &Config) -> anyhow::Result<PathBuf> {
    let proc_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let inode = |p: &Path| -> anyhow::Result<u64> {
        Ok(std::fs::metadata(p)
            .with_context(|| format!("network namespace {}", p.display()))?
            .ino())
    };
    let own = inode(&proc_path)?;
    let host = inode(Path::new("/proc/self/ns/net"))?;
    if !config.has_network_namespace() || own == host {
        bail!(
            "the container shares the host's network namespace; egressd confines containers with their own"
        );
    }
    match config.network_namespace_path() {
        Some(p) if inode(p).ok() == Some(own) => Ok(p.clone()),
        _ => Ok(proc_path),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    /// A writable cgroup hierarchy with no cgroup namespace lets the container's root
    /// leave its cgroup: refused; read-only, or with a cgroup namespace, it is not.
    #[test]
    fn writable_host_cgroups_are_found() {
        // The namespaces the container is in: `cgroup` when it has one of its own.
        let config = |namespaces: &[&str], mounts: serde_json::Value| -> (Config, bool) {
            let config = serde_json::from_value(serde_json::json!({ "mounts": mounts })).unwrap();
            (config, namespaces.contains(&"cgroup"))
        };
        let cgroup = |options: &[&str]| {
            serde_json::json!([{ "destination": "/sys/fs/cgroup", "type": "cgroup",
                                 "source": "cgroup", "options": options }])
        };
        let bind = |source: &str, dest: &str, options: &[&str]| {
            serde_json::json!([{ "destination": dest, "type": "bind",
                                 "source": source, "options": options }])
        };
        let writable = [
            config(&["network"], cgroup(&["nosuid", "rw"])),
            config(
                &["network"],
                bind("/sys/fs/cgroup", "/host-cgroups", &["rbind"]),
            ),
            config(
                &["network"],
                bind("/sys/fs/cgroup/unified", "/x", &["bind", "rw"]),
            ),
            config(&["network"], bind("/sys", "/host-sys", &["rbind", "rw"])),
            config(&["network"], bind("/", "/host", &["rbind"])),
            // `ro` on a recursive bind leaves the mounts below it writable.
            config(&["network"], bind("/sys", "/host-sys", &["rbind", "ro"])),
            // The last of `ro` and `rw` counts.
            config(&["network"], cgroup(&["ro", "rw"])),
            // The source as the host resolves it.
            config(
                &["network"],
                bind("/proc/self/root/sys/fs/cgroup", "/c", &["bind"]),
            ),
            config(
                &["network"],
                bind("/sys/../sys/fs/cgroup", "/c", &["bind", "rw"]),
            ),
        ];
        for (c, own) in &writable {
            assert!(c.writable_host_cgroups(*own).is_some(), "{c:?}");
        }
        let safe = [
            config(&["network"], cgroup(&["nosuid", "ro"])),
            config(&["network", "cgroup"], cgroup(&["rw"])),
            config(&["network"], bind("/sys", "/host-sys", &["bind", "rw"])),
            config(&["network"], bind("/srv/data", "/data", &["rbind", "rw"])),
            config(&["network"], bind("/sys", "/host-sys", &["rbind", "rro"])),
            config(&["network"], cgroup(&["rw", "ro"])),
            config(
                &["network"],
                serde_json::json!([{ "destination": "/sys", "type": "sysfs",
                                                      "source": "sysfs", "options": ["rw"] }]),
            ),
        ];
        for (c, own) in &safe {
            assert!(c.writable_host_cgroups(*own).is_none(), "{c:?}");
        }
    }

    fn opts(scope: Scope) -> HookOptions {
        HookOptions {
            socket: "/nonexistent/egressd.sock".into(),
            policy_dir: "/nonexistent".into(),
            default_policy: None,
            timeout: Duration::from_secs(1),
            exempt_namespaces: vec!["egressd-system".into()],
            scope,
        }
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A stand-in daemon on a socket in `dir`: answers each request with `answer` and
    /// keeps what it was sent.
    fn fake_daemon(
        dir: &Path,
        answer: Response,
    ) -> (PathBuf, std::sync::Arc<std::sync::Mutex<Vec<Request>>>) {
        use std::io::{BufRead, Write};
        let socket = dir.join("egressd.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&stream)
                    .read_line(&mut line)
                    .unwrap();
                kept.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
                let mut out = serde_json::to_vec(&answer).unwrap();
                out.push(b'\n');
                stream.write_all(&out).unwrap();
            }
        });
        (socket, seen)
    }

    #[test]
    fn every_refusal_but_the_daemons_own_is_sent_to_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, seen) = fake_daemon(dir.path(), Response::error("policy refused"));
        let opts = HookOptions {
            socket,
            ..opts(Scope::Container)
        };
        let state = |bundle: &Path| {
            format!(
                r#"{{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":1,"bundle":{:?}}}"#,
                bundle.display().to_string()
            )
        };
        let refused = |seen: &[Request]| -> Vec<(String, String)> {
            seen.iter()
                .filter_map(|r| match r {
                    Request::HookRefused { container, reason } => {
                        Some((container.clone(), reason.clone()))
                    }
                    _ => None,
                })
                .collect()
        };

        // A state that is not JSON: refused, recorded for an unknown container.
        assert!(run(Stage::CreateRuntime, &opts, "{".as_bytes()).is_err());
        // A bundle without a config: refused, recorded in the container's name.
        let missing = dir.path().join("no-bundle");
        let e = run(Stage::CreateRuntime, &opts, state(&missing).as_bytes()).unwrap_err();
        assert!(format!("{e:#}").contains("config.json"), "{e:#}");
        let got = refused(&seen.lock().unwrap());
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "(unknown)");
        assert!(got[0].1.contains("not valid"), "{}", got[0].1);
        assert_eq!(got[1].0, "c1");
        assert!(got[1].1.contains("config.json"), "{}", got[1].1);

        // At poststop the container ran: a failure there refused nothing.
        seen.lock().unwrap().clear();
        assert!(run(Stage::Poststop, &opts, state(&missing).as_bytes()).is_err());
        assert!(refused(&seen.lock().unwrap()).is_empty());

        // The daemon refusing a detach records it itself: nothing more is sent.
        let bundle = dir.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            r#"{"linux":{"cgroupsPath":"/agents/c1"}}"#,
        )
        .unwrap();
        seen.lock().unwrap().clear();
        let e = run(Stage::Poststop, &opts, state(&bundle).as_bytes()).unwrap_err();
        assert!(
            format!("{e:#}").contains("egressd refused: policy refused"),
            "{e:#}"
        );
        let seen = seen.lock().unwrap();
        assert!(
            matches!(seen.as_slice(), [Request::Detach { .. }]),
            "{seen:?}"
        );
    }

    /// What the container can raise, by uid and `noNewPrivileges`: the bounding set
    /// counts unless no new privileges may be gained.
    #[test]
    fn capabilities_a_container_can_get() {
        let config = |user: u32, nnp: bool| -> Config {
            serde_json::from_value(serde_json::json!({"process": {
                "user": {"uid": user},
                "noNewPrivileges": nnp,
                "capabilities": {"effective": ["CAP_CHOWN"], "bounding": ["CAP_CHOWN", "CAP_NET_RAW"]}
            }}))
            .unwrap()
        };
        let with_raw = ["CAP_CHOWN".to_string(), "CAP_NET_RAW".to_string()];
        assert_eq!(config(0, false).process_capabilities(), with_raw);
        assert_eq!(
            config(0, true).process_capabilities(),
            ["CAP_CHOWN".to_string()]
        );
        assert_eq!(config(1000, false).process_capabilities(), with_raw);
        assert_eq!(
            config(1000, true).process_capabilities(),
            ["CAP_CHOWN".to_string()]
        );
    }

    #[test]
    fn parses_runtime_state_and_config() {
        let state: State = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":4242,
                "bundle":"/run/b","annotations":{"io.egressd.policy":"agent"}}"#,
        )
        .unwrap();
        assert_eq!(state.pid, Some(4242));
        assert_eq!(state.annotations[ANNOTATION_POLICY], "agent");
        let config: Config = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","process":{"args":["sh"]},
                "linux":{"cgroupsPath":"machine.slice:libpod:abc",
                "namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/x"}]}}"#,
        )
        .unwrap();
        assert!(config.has_network_namespace());
        assert_eq!(
            config.network_namespace_path(),
            Some(&PathBuf::from("/var/run/netns/x"))
        );
        assert_eq!(config.cgroups_path(), Some("machine.slice:libpod:abc"));
        let bare: Config = serde_json::from_str("{}").unwrap();
        assert!(!bare.has_network_namespace());
    }

    #[test]
    fn policy_names_cannot_leave_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent.yaml"), "version: 1\n").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/x.yaml"), "version: 1\n").unwrap();
        assert_eq!(
            policy_file(dir.path(), "agent").unwrap(),
            dir.path().join("agent.yaml")
        );
        for bad in [
            "../agent",
            "sub/x",
            "/etc/passwd",
            "..",
            ".hidden",
            "a..b",
            "",
            "a b",
            "x\n",
        ] {
            assert!(policy_file(dir.path(), bad).is_err(), "{bad:?} accepted");
        }
        let e = policy_file(dir.path(), "missing").unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn pod_labels_may_not_shadow_what_egressd_reads() {
        let state: State = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":4242,"bundle":"/b"}"#,
        )
        .unwrap();
        let plan_with = |labels: &str| {
            let config: Config = serde_json::from_value(serde_json::json!({
                "annotations": {
                    ANNOTATION_POLICY: "open",
                    ANNOTATION_CRIO_LABELS: labels,
                }
            }))
            .unwrap();
            plan(Stage::Poststop, &opts(Scope::Container), &state, &config)
        };
        // Positive control: the labels kubelet gives every container, and the pod's own.
        let kubelet = r#"{"app":"agent","io.kubernetes.container.name":"main",
            "io.kubernetes.pod.name":"p-1","io.kubernetes.pod.namespace":"team",
            "io.kubernetes.pod.uid":"0b5e0c6e-1"}"#;
        assert!(plan_with(kubelet).is_ok());
        for labels in [
            r#"{"app":"agent","io.egressd.policy":"open"}"#,
            r#"{"io.egressd.sandbox":"agent-1","io.kubernetes.pod.name":"p-1"}"#,
            "not json",
        ] {
            assert!(plan_with(labels).is_err(), "{labels}");
        }
    }

    #[test]
    fn sandbox_names() {
        let id = "0123456789abcdef";
        assert_eq!(sandbox_name(Scope::Container, id, &ann(&[])).unwrap(), id);
        assert_eq!(
            sandbox_name(
                Scope::Container,
                id,
                &ann(&[(ANNOTATION_SANDBOX, "agent-7")])
            )
            .unwrap(),
            "agent-7"
        );
        assert_eq!(
            sandbox_name(
                Scope::Pod,
                id,
                &ann(&[
                    (ANNOTATION_K8S_NAMESPACE, "team"),
                    (ANNOTATION_K8S_POD, "p-1")
                ])
            )
            .unwrap(),
            "k8s/team/p-1"
        );
        assert!(sandbox_name(Scope::Pod, id, &ann(&[])).is_err());
        assert!(sandbox_name(Scope::Container, &"x".repeat(65), &ann(&[])).is_err());
        // Kubernetes' longest names still make a valid name, the same for every
        // container of the pod, and another for a pod whose name begins alike.
        let long_pod = |pod: &str| {
            let ns = "n".repeat(63);
            sandbox_name(
                Scope::Pod,
                id,
                &ann(&[(ANNOTATION_K8S_NAMESPACE, &ns), (ANNOTATION_K8S_POD, pod)]),
            )
            .unwrap()
        };
        let a = long_pod(&"p".repeat(253));
        assert_eq!(a.len(), 64);
        assert!(a.starts_with("k8s/nnnn"), "{a}");
        assert_eq!(a, long_pod(&"p".repeat(253)));
        assert_ne!(a, long_pod(&format!("{}q", "p".repeat(252))));
    }

    #[test]
    fn exempt_namespace_and_missing_policy() {
        let state = State {
            id: "c1".into(),
            status: "creating".into(),
            pid: Some(1),
            bundle: "/nonexistent".into(),
            annotations: ann(&[(ANNOTATION_K8S_NAMESPACE, "egressd-system")]),
        };
        let in_pod = |path: &str| -> Config {
            serde_json::from_value(serde_json::json!({"linux": {"cgroupsPath": path}})).unwrap()
        };
        for path in [
            "kubepods-besteffort-pod1234.slice:crio:c1",
            "/kubepods/burstable/pod1234/c1",
        ] {
            assert!(
                matches!(
                    plan(
                        Stage::CreateRuntime,
                        &opts(Scope::Container),
                        &state,
                        &in_pod(path)
                    )
                    .unwrap(),
                    Plan::Exempt(_)
                ),
                "{path}"
            );
        }
        // Outside a pod's cgroup (podman, where an image's annotations become the
        // container's) the claim exempts nothing.
        let config = Config::default();
        for outside in [
            config.clone(),
            in_pod("machine.slice:libpod:c1"),
            in_pod("/kubepodsx/c1"),
        ] {
            let e = plan(
                Stage::CreateRuntime,
                &opts(Scope::Container),
                &state,
                &outside,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("refusing to start it unconfined"), "{e}");
        }
        let state = State {
            annotations: ann(&[(ANNOTATION_K8S_NAMESPACE, "team")]),
            ..state
        };
        let e = plan(
            Stage::CreateRuntime,
            &opts(Scope::Container),
            &state,
            &config,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("refusing to start it unconfined"), "{e}");
        // Without a cgroupsPath the hook cannot tell whose sandbox a name is: it leaves
        // the detach to the daemon's reaper.
        assert!(matches!(
            plan(Stage::Poststop, &opts(Scope::Container), &state, &config).unwrap(),
            Plan::Nothing(_)
        ));
        let config: Config =
            serde_json::from_str(r#"{"linux":{"cgroupsPath":"/agents/c1"}}"#).unwrap();
        let mount = cgroup::cgroup2_mount().unwrap();
        assert_eq!(
            plan(Stage::Poststop, &opts(Scope::Container), &state, &config).unwrap(),
            Plan::Detach {
                name: "c1".into(),
                cgroup: mount.join("agents/c1")
            }
        );
    }
}
