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
        // A pod cgroup removed and made again at the same path: its old sandbox goes now.
        self.reap_vanished();
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
        let problem = self.join_problem(
            &joining.name,
            &joining.cgroup,
            &joining.policy_path,
            &joining.init,
        );
        self.judged(
            &joining.name,
            &joining.container,
            &joining.policy_path,
            &joining.init,
            problem,
            "",
        )
    }

    /// A `Join` sent from inside the sandbox it names (a runtime's hook in the pod's
    /// cgroup): the container may only join that attached sandbox; nothing the caller
    /// sent but the container's id, its policy's path and its init is used, and no path
    /// it sent is opened.
    pub fn join_from_inside(
        &mut self,
        name: &str,
        container: &str,
        policy_path: &str,
        init: &RuntimeInit,
    ) -> Result<String, String> {
        self.reap_vanished();
        // A process looping on refused joins must not flood the trail: its refusals are
        // recorded one by one up to the control socket's limit per window, the rest
        // counted in a `rate-limit` alert.
        let over_limit = |core: &mut Self| {
            (!core.control_refusals.admit(name)).then(|| {
                format!(
                    "container {} joining pod sandbox {name:?} (asked from inside it) refused; \
                     counted, not recorded one by one (over this sandbox's control-socket \
                     refusals for the window)",
                    crate::text::sanitize(container, 64)
                )
            })
        };
        let Some(rec) = self.state.sandboxes.get(name) else {
            if let Some(counted) = over_limit(self) {
                return Err(counted);
            }
            let problem = Some("the sandbox is not attached".to_owned());
            return self.judged(
                name,
                container,
                policy_path,
                init,
                problem,
                " (asked from inside it)",
            );
        };
        let (cgroup, attached_policy) = (rec.cgroup.clone(), rec.policy_path.clone());
        let problem = self.join_problem(name, &cgroup, policy_path, init);
        if problem.is_some() {
            if let Some(counted) = over_limit(self) {
                return Err(counted);
            }
            // The runtime's own hook asks only for containers that meet the policy: a
            // refused join from inside the sandbox is something to look at.
            self.alerts.raise(crate::audit::Alert::new(
                time::OffsetDateTime::now_utc(),
                crate::audit::AlertKind::ControlSocket,
                name.to_owned(),
                "a process inside the sandbox asked to let a container in that the policy refuses"
                    .to_owned(),
            ));
        }
        // The record names the sandbox's policy, not text the caller sent.
        self.judged(
            name,
            container,
            &attached_policy,
            init,
            problem,
            " (asked from inside it)",
        )
    }

    /// The answer to a join, `problem` (if any) recorded as a `policy-rejected` record.
    fn judged(
        &mut self,
        name: &str,
        container: &str,
        policy_path: &str,
        init: &RuntimeInit,
        problem: Option<String>,
        from: &str,
    ) -> Result<String, String> {
        let container = crate::text::sanitize(container, 64);
        match problem {
            None => Ok(format!(
                "container {container} joined pod sandbox {name:?}; its init (pid {}) meets the policy",
                init.pid
            )),
            Some(problem) => {
                let problem = crate::text::sanitize(&problem, 1000);
                let error = format!(
                    "container {container} joining pod sandbox {name:?}{from} refused: {problem}"
                );
                self.policy_rejected(name.to_owned(), policy_path, None, error.clone());
                Err(error)
            }
        }
    }

    /// Why container init `init`, in pod cgroup `cgroup` with policy `policy_path`, may
    /// not start in attached sandbox `name`. Reads only the sandbox's cgroup tree and
    /// the init's `/proc` entries.
    fn join_problem(
        &self,
        name: &str,
        cgroup: &Path,
        policy_path: &str,
        init: &RuntimeInit,
    ) -> Option<String> {
        let Some(rec) = self.state.sandboxes.get(name) else {
            return Some("the sandbox is not attached".to_owned());
        };
        // The programs are attached to the directory with this id, not to its path.
        match Cgroup::open(&rec.cgroup) {
            Ok(c) if c.id == rec.cgroup_id => {}
            _ => {
                return Some(format!(
                    "{} is no longer the cgroup the sandbox confines",
                    rec.cgroup.display()
                ))
            }
        }
        if cgroup != rec.cgroup {
            return Some(format!(
                "the sandbox confines {}, not {}",
                rec.cgroup.display(),
                cgroup.display()
            ));
        }
        if rec.policy_path != policy_path {
            return Some(format!(
                "it asks for policy {policy_path}, the sandbox runs {}",
                rec.policy_path
            ));
        }
        if let Some(problem) = outside(&rec.cgroup, rec.netns_inode, init) {
            return Some(problem);
        }
        let caps = match posture::oci_capability_mask(&init.capabilities) {
            Ok(c) => c,
            Err(e) => return Some(format!("the container's OCI config: {e}")),
        };
        let Some(policy) = self.compiled.get(name) else {
            return Some("the sandbox's policy is not loaded".to_owned());
        };
        let held = Posture::of([init.pid], |_| Some(caps)).violations(policy.no_capabilities());
        (!held.is_empty()).then(|| {
            format!(
                "{}: require.no_capabilities: its init process (pid {}) would hold {}",
                rec.policy_path,
                init.pid,
                held.join(", ")
            )
        })
    }
}

/// Whether the container's init is outside the sandbox's cgroup (then its declared
/// capabilities would not count, and it would not be confined at all) or network
/// namespace (then the sandbox's proxy and resolver are not where it looks), as `/proc`
/// shows the process.
fn outside(cgroup: &Path, netns_inode: Option<u64>, init: &RuntimeInit) -> Option<String> {
    if !posture::pids_below(cgroup).contains(&init.pid) {
        return Some(format!(
            "its init process (pid {}) is not in {}",
            init.pid,
            cgroup.display()
        ));
    }
    let ns = PathBuf::from(format!("/proc/{}/ns/net", init.pid));
    let inode = match netns_id(&ns) {
        Ok((_, inode)) => inode,
        Err(e) => return Some(format!("its network namespace ({}): {e}", ns.display())),
    };
    match netns_inode {
        Some(expected) if expected == inode => None,
        Some(expected) => Some(format!(
            "its network namespace (net:[{inode}]) is not the pod's (net:[{expected}])"
        )),
        None => Some("the pod sandbox's network namespace is not known".to_owned()),
    }
}
