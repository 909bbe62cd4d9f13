//! The parts of the OCI runtime documents the hook reads: the container state a runtime
//! writes to a hook's standard input, and the bundle's `config.json`. Unknown fields are
//! ignored (runtimes add their own); only what the hook uses is modelled.
use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

/// The state JSON on a hook's standard input (runtime-spec `state`).
#[derive(Debug, Clone, Deserialize)]
pub struct State {
    /// The container id.
    pub id: String,
    /// `creating` at `createRuntime`, `stopped` at `poststop`.
    #[serde(default)]
    pub status: String,
    /// The container's init process, in its namespaces and cgroup (0 or absent once gone).
    #[serde(default)]
    pub pid: Option<u32>,
    /// The bundle directory holding `config.json`.
    pub bundle: PathBuf,
    /// Annotations from the config (runtimes copy them into the state).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The bundle's `config.json`, as far as the hook reads it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub linux: Option<Linux>,
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
}

/// `mounts[]`: what the container sees where.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Mount {
    #[serde(default)]
    pub destination: PathBuf,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub source: Option<PathBuf>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// `process`: what the container's first process runs with.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Process {
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub user: Option<User>,
    #[serde(default, rename = "noNewPrivileges")]
    pub no_new_privileges: bool,
}

/// `process.user`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct User {
    #[serde(default)]
    pub uid: u32,
}

/// `process.capabilities`: names such as `CAP_NET_RAW`, per set.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub effective: Vec<String>,
    #[serde(default)]
    pub permitted: Vec<String>,
    #[serde(default)]
    pub ambient: Vec<String>,
    #[serde(default)]
    pub bounding: Vec<String>,
    #[serde(default)]
    pub inheritable: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Linux {
    /// cgroupfs (`/a/b` or `a/b`) or systemd (`SLICE:PREFIX:NAME`) form.
    #[serde(default, rename = "cgroupsPath")]
    pub cgroups_path: Option<String>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub type_: String,
    /// A namespace to join (e.g. `/var/run/netns/NAME`); absent when the runtime makes one.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

impl Config {
    /// Whether the container gets a network namespace of its own (or joins a named one),
    /// rather than sharing the runtime's.
    pub fn has_network_namespace(&self) -> bool {
        self.linux
            .as_ref()
            .is_some_and(|l| l.namespaces.iter().any(|n| n.type_ == "network"))
    }

    /// The path of the network namespace the container joins, when the config names one.
    pub fn network_namespace_path(&self) -> Option<&PathBuf> {
        self.linux.as_ref().and_then(|l| {
            l.namespaces
                .iter()
                .find(|n| n.type_ == "network")
                .and_then(|n| n.path.as_ref())
        })
    }

    /// The capabilities the container's process holds or can raise at will (its
    /// effective, permitted and ambient sets; without `noNewPrivileges`, also its
    /// bounding and inheritable sets, which a program it runs gets: any program run as
    /// uid 0, a set-user-ID or file-capability one otherwise), as named in the config;
    /// none when the config gives none.
    pub fn process_capabilities(&self) -> Vec<String> {
        let Some(process) = self.process.as_ref() else {
            return Vec::new();
        };
        let Some(caps) = process.capabilities.as_ref() else {
            return Vec::new();
        };
        // With `noNewPrivileges` an exec gains nothing, run as root or not.
        let gains_on_exec = !process.no_new_privileges;
        let on_exec: &[String] = if gains_on_exec { &caps.bounding } else { &[] };
        let inherited: &[String] = if gains_on_exec {
            &caps.inheritable
        } else {
            &[]
        };
        let mut names: Vec<String> = caps
            .effective
            .iter()
            .chain(&caps.permitted)
            .chain(&caps.ambient)
            .chain(on_exec)
            .chain(inherited)
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// A writable mount of the cgroup hierarchy in a container that shares the host's
    /// cgroup namespace (`own_cgroupns`: the hook compares the container's with its own):
    /// its root can write a `cgroup.procs` outside its own cgroup and leave the sandbox (a
    /// cgroup namespace confines such writes to its own subtree). Names the mount, if
    /// there is one. A recursive bind is read-only only with `rro` (`ro` makes its top
    /// mount read-only, not those below it); of `ro` and `rw`, the last counts.
    pub fn writable_host_cgroups(&self, own_cgroupns: bool) -> Option<String> {
        if own_cgroupns {
            return None;
        }
        let cgroupfs = std::path::Path::new("/sys/fs/cgroup");
        self.mounts.iter().find_map(|m| {
            let kind = m.type_.as_deref().unwrap_or("");
            let recursive = m.options.iter().any(|o| o == "rbind");
            let last_ro = m
                .options
                .iter()
                .rev()
                .find(|o| *o == "ro" || *o == "rw")
                .is_some_and(|o| o == "ro");
            let read_only = m.options.iter().any(|o| o == "rro") || (last_ro && !recursive);
            // As the host resolves it (`/proc/1/root/...`, `..`, a symlink).
            let resolved = m
                .source
                .as_deref()
                .map(|s| std::fs::canonicalize(s).unwrap_or_else(|_| s.to_path_buf()));
            let source = resolved.as_deref();
            let exposes = matches!(kind, "cgroup" | "cgroup2")
                || source.is_some_and(|s| s.starts_with(cgroupfs))
                || (recursive && source.is_some_and(|s| cgroupfs.starts_with(s)))
                || (matches!(kind, "bind" | "rbind") && m.destination.starts_with(cgroupfs));
            (exposes && !read_only).then(|| {
                format!(
                    "{} ({}{})",
                    m.destination.display(),
                    if kind.is_empty() { "bind" } else { kind },
                    source.map_or(String::new(), |s| format!(" of {}", s.display()))
                )
            })
        })
    }

    pub fn cgroups_path(&self) -> Option<&str> {
        self.linux
            .as_ref()
            .and_then(|l| l.cgroups_path.as_deref())
            .filter(|p| !p.is_empty())
    }
}
