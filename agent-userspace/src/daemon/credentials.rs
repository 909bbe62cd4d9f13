//! The control requests about credentials: `egressctl credentials` (each credential's
//! state, never a value) and `egressctl placeholder` (a sandbox's sentinel for a
//! placeholder credential).

use super::core::Core;
use crate::credentials::CredentialState;

impl Core {
    /// Every configured credential's state, with the attached sandboxes whose policy
    /// names it.
    pub fn credential_states(&self) -> Vec<CredentialState> {
        let mut states = self.proxy.credentials().states();
        for state in &mut states {
            let mut users: Vec<String> = self
                .compiled
                .iter()
                .filter(|(name, policy)| {
                    self.state.sandboxes.contains_key(*name)
                        && policy.credential_names().contains(&state.name.as_str())
                })
                .map(|(name, _)| name.clone())
                .collect();
            users.sort_unstable();
            state.sandboxes = users;
            // An error may quote what a store answered: masked like the daemon's log.
            if let Some(error) = &mut state.last_error {
                crate::daemon::log::mask(error);
            }
            if let Some(detail) = &mut state.detail {
                crate::daemon::log::mask(detail);
            }
        }
        states
    }

    /// Sandbox `sandbox`'s sentinel for placeholder credential `credential`: the sandbox
    /// must be attached and its policy must name the credential.
    pub fn placeholder(&self, sandbox: &str, credential: &str) -> Result<String, String> {
        if !self.state.sandboxes.contains_key(sandbox) {
            return Err(format!("no sandbox named {sandbox:?} is attached"));
        }
        let names_it = self
            .compiled
            .get(sandbox)
            .is_some_and(|p| p.credential_names().contains(&credential));
        let sentinel = self.proxy.credentials().placeholder(sandbox, credential)?;
        if !names_it {
            return Err(format!(
                "the policy of sandbox {sandbox:?} names no rule with credential \
                 `{credential}`, so its placeholder would never be replaced"
            ));
        }
        Ok(sentinel)
    }
}
