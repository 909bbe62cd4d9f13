//! A container of a Kubernetes pod (`egressctl oci-hook --scope pod`): the pod is one
//! sandbox. The first container to arrive attaches it; each later one starts inside it,
//! confined from its first instruction, and is still judged as an attach would judge it:
//! its init process must be inside the sandbox's cgroup and network namespace, it must ask
//! for the sandbox's policy, and the capabilities its config gives it must meet the
//! policy's `require.no_capabilities`. A later container never replaces the pod's policy.
//! A refusal is a `policy-rejected` record in the sandbox's name, and the runtime does not
//! start the container.

use std::path::{Path, PathBuf};

use super::{
    core::{Arrival, Core},
    netns::netns_id,
};
use crate::{
    cgroup::Cgroup,
    control::RuntimeInit,
    policy::Policy,
    posture::{self, Posture},
};

/// A pod's container asking to be let in (the `Join` control request).
#[derive(Debug)]
pub struct Joining {
    /// The pod sandbox's name.
    pub name: String,
    /// The container's id.
    pub container: String,
    /// The pod's cgroup.
    pub cgroup: PathBuf,
    pub policy_path: String,
    /// The container's network namespace.
    pub netns: PathBuf,
    /// The container's init process and the capabilities its config gives it.
    pub init: RuntimeInit,
}

impl Core {
    /// Attaches pod sandbox `joining.name` if it does not exist (as an attach with the
    /// container's namespace and init), else lets the container join it.
    pub fn attach_or_join(
        &mut self,
        joining: Joining,
        source: String,
        parsed: Result<Policy, String>,
    ) -> Result<String, String> {
        if !self.state.sandboxes.contains_key(&joining.name) {
            return self.attach_parsed(
                &joining.cgroup,
                Some(joining.name),
                joining.policy_path,
                source,
                Arrival {
                    netns: Some(joining.netns),
                    runtime_init: Some(joining.init),
                },
                parsed,
            );
        }
        match self.join_problem(&joining) {
            None => Ok(format!(
                "container {} joined pod sandbox {:?} ({}); its init (pid {}) meets the policy",
                joining.container,
                joining.name,
                joining.cgroup.display(),
                joining.init.pid
            )),
            Some(problem) => {
                let container = crate::text::sanitize(&joining.container, 64);
                let problem = crate::text::sanitize(&problem, 1000);
                let error = format!(
                    "container {container} joining pod sandbox {:?} refused: {problem}",
                    joining.name
                );
                self.policy_rejected(
                    joining.name.clone(),
                    &joining.policy_path,
                    None,
                    error.clone(),
                );
                Err(error)
            }
        }
    }

    /// Why the container may not start in the attached sandbox it names.
    fn join_problem(&self, joining: &Joining) -> Option<String> {
        let Some(rec) = self.state.sandboxes.get(&joining.name) else {
            return Some("the sandbox is not attached".to_owned());
        };
        let opened = match Cgroup::open(&joining.cgroup) {
            Ok(c) => c,
            Err(e) => return Some(e.to_string()),
        };
        if opened.id != rec.cgroup_id {
            return Some(format!(
                "the sandbox confines {}, not {}",
                rec.cgroup.display(),
                joining.cgroup.display()
            ));
        }
        if rec.policy_path != joining.policy_path {
            return Some(format!(
                "it asks for policy {}, the sandbox runs {}",
                joining.policy_path, rec.policy_path
            ));
        }
        if let Some(problem) = outside(&rec.cgroup, rec.netns_inode, joining) {
            return Some(problem);
        }
        let caps = match posture::oci_capability_mask(&joining.init.capabilities) {
            Ok(c) => c,
            Err(e) => return Some(format!("the container's OCI config: {e}")),
        };
        let Some(policy) = self.compiled.get(&joining.name) else {
            return Some("the sandbox's policy is not loaded".to_owned());
        };
        let held =
            Posture::of([joining.init.pid], |_| Some(caps)).violations(policy.no_capabilities());
        (!held.is_empty()).then(|| {
            format!(
                "{}: require.no_capabilities: its init process (pid {}) would hold {}",
                rec.policy_path,
                joining.init.pid,
                held.join(", ")
            )
        })
    }
}

/// Whether the container's init is outside the sandbox's cgroup (then its declared
/// capabilities would not count, and it would not be confined at all) or network
/// namespace (then the sandbox's proxy and resolver are not where it looks).
fn outside(cgroup: &Path, netns_inode: Option<u64>, joining: &Joining) -> Option<String> {
    if !posture::pids_below(cgroup).contains(&joining.init.pid) {
        return Some(format!(
            "its init process (pid {}) is not in {}",
            joining.init.pid,
            cgroup.display()
        ));
    }
    let inode = match netns_id(&joining.netns) {
        Ok((_, inode)) => inode,
        Err(e) => {
            return Some(format!(
                "its network namespace {}: {e}",
                joining.netns.display()
            ))
        }
    };
    match netns_inode {
        Some(expected) if expected != inode => Some(format!(
            "its network namespace ({}) is not the pod's",
            joining.netns.display()
        )),
        _ => None,
    }
}
