//! The environment of the programs the daemon runs for credentials (`command` sources,
//! `revoke:` commands): the daemon's own, without the variables that hold secrets. A
//! credential read from the environment (`source: { env: VAR }`) and the AWS base key an
//! `sts_assume_role` source without a key file signs with (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) are the daemon's alone: a child, and whatever it starts, would
//! otherwise inherit them, readable in its `/proc/PID/environ` and in any environment
//! dump it writes. Other variables (a CLI's configuration, `PATH`, proxies) are kept,
//! as the programs may need them.
use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

/// The AWS base key's variables, read by `sts_assume_role` sources without a key file
/// (and only then kept from children: a `command` running the AWS CLI may need them).
pub(super) const AWS_KEY_VARS: [&str; 3] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// Names of variables credentials were read from, since the daemon started (a reload
/// only adds: keeping a dropped credential's variable from children costs nothing).
static SECRET_VARS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Notes that `var` holds a secret.
pub(super) fn note_secret_var(var: &str) {
    SECRET_VARS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(var.to_owned());
}

/// Removes every variable holding a secret from `command`'s environment.
pub(super) fn without_secrets(command: &mut tokio::process::Command) {
    for var in SECRET_VARS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        command.env_remove(var);
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    /// A child sees the daemon's other variables, but not the noted ones (an env
    /// credential's, the AWS key's once an STS source uses it), also when they are set.
    #[tokio::test]
    async fn children_do_not_inherit_secret_variables() {
        note_secret_var("EGRESS_TEST_CHILD_ENV_SECRET");
        for var in AWS_KEY_VARS {
            note_secret_var(var);
        }
        let mut command = tokio::process::Command::new("/usr/bin/env");
        command
            .env_clear()
            .env("EGRESS_TEST_CHILD_ENV_SECRET", "s3cret")
            .env("AWS_SECRET_ACCESS_KEY", "aws-secret")
            .env("AWS_SESSION_TOKEN", "aws-token")
            .env("EGRESS_TEST_CHILD_ENV_KEPT", "kept");
        without_secrets(&mut command);
        let out = command.output().await.unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        assert!(env.contains("EGRESS_TEST_CHILD_ENV_KEPT=kept"), "{env}");
        for gone in ["s3cret", "aws-secret", "aws-token"] {
            assert!(!env.contains(gone), "{gone} in {env}");
        }
    }
}
