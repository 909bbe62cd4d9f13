//! A later container of a pod sandbox (`egressctl oci-hook --scope pod`): the pod's first
//! container attached the pod's cgroup, so the next one starts inside it, confined from
//! its first instruction. It is still judged as an attach would judge it: its init
//! process must be inside the sandbox's cgroup, it must ask for the sandbox's policy, and
//! the capabilities its config gives it must meet the policy's `require.no_capabilities`.
//! A refusal is a `policy-rejected` record in the sandbox's name, and the runtime does not
//! start the container.

use std::path::Path;

use super::core::Core;
use crate::{
    cgroup::Cgroup,
    control::RuntimeInit,
    posture::{self, Posture},
};

impl Core {
    /// Lets container `container` (its init process `init`) start in pod sandbox `name`,
    /// which must confine `cgroup` with the policy at `policy_path`; `Err` (recorded)
    /// refuses it.
    pub fn join(
        &mut self,
        name: &str,
        container: &str,
        cgroup: &Path,
        policy_path: &str,
        init: &RuntimeInit,
    ) -> Result<String, String> {
        let rec = self
            .state
            .sandboxes
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no sandbox named {name:?} to join"))?;
        let opened = Cgroup::open(cgroup).map_err(|e| e.to_string())?;
        if opened.id != rec.cgroup_id {
            return Err(format!(
                "sandbox {name:?} confines {}, not {}",
                rec.cgroup.display(),
                cgroup.display()
            ));
        }
        let refusal = self.join_problem(&rec.cgroup, name, &rec.policy_path, policy_path, init);
        if let Some(problem) = refusal {
            let container: String = container.chars().take(64).collect();
            let error =
                format!("container {container} joining pod sandbox {name:?} refused: {problem}");
            self.policy_rejected(name.to_owned(), policy_path, None, error.clone());
            return Err(error);
        }
        Ok(format!(
            "pod sandbox {name:?} already confines {}; the container's init (pid {}) meets its policy",
            rec.cgroup.display(),
            init.pid
        ))
    }

    /// Why container init `init` may not start in the sandbox confining `cgroup`.
    fn join_problem(
        &self,
        cgroup: &Path,
        name: &str,
        attached_policy: &str,
        asked_policy: &str,
        init: &RuntimeInit,
    ) -> Option<String> {
        if attached_policy != asked_policy {
            return Some(format!(
                "it asks for policy {asked_policy}, the sandbox runs {attached_policy}"
            ));
        }
        // Declared capabilities count only for a process found in the cgroup: one outside
        // it would not be confined at all.
        if !posture::pids_below(cgroup).contains(&init.pid) {
            return Some(format!(
                "its init process (pid {}) is not in {}",
                init.pid,
                cgroup.display()
            ));
        }
        let caps = match posture::oci_capability_mask(&init.capabilities) {
            Ok(c) => c,
            Err(e) => return Some(format!("the container's OCI config: {e}")),
        };
        let Some(policy) = self.compiled.get(name) else {
            return Some("the sandbox's policy is not loaded".to_owned());
        };
        let held = Posture::of([init.pid], |_| Some(caps)).violations(policy.no_capabilities());
        if held.is_empty() {
            None
        } else {
            Some(format!(
                "{attached_policy}: require.no_capabilities: its init process (pid {}) would hold {}",
                init.pid,
                held.join(", ")
            ))
        }
    }
}
