//! Revocation of a credential's live value when its sandbox is quarantined: a configured
//! `revoke:` command, which gets the value on standard input (never in its arguments or
//! environment, which other local users could read; nor any other secret the daemon
//! read from its own environment, see `child_env`), and for `github_app` sources the
//! API's revoke-installation-token call.
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use super::error::CredentialError;
use super::raw::RawRevoke;
use super::secret::Secret;

/// How long a revoke command may run before it is killed.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A checked `revoke:` command.
#[derive(Debug, Clone)]
pub(super) struct RevokeCommand {
    argv: Vec<String>,
    pub(super) timeout: Duration,
}

impl RevokeCommand {
    pub(super) fn compile(credential: &str, raw: &RawRevoke) -> Result<Self, CredentialError> {
        let config = |reason: String| CredentialError::Config {
            credential: credential.to_owned(),
            field: "revoke.argv",
            reason,
        };
        let Some(program) = raw.argv.first() else {
            return Err(config("needs at least the program to run".to_owned()));
        };
        if !std::path::Path::new(program).is_absolute() {
            return Err(config(format!(
                "program `{program}` must be an absolute path (no PATH lookup, no shell)"
            )));
        }
        Ok(Self {
            argv: raw.argv.clone(),
            timeout: REVOKE_TIMEOUT,
        })
    }

    pub(super) fn program(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }

    /// Runs the command with `value` and a newline on its standard input. Its output is
    /// discarded (it could echo the value). Succeeds when it exits with status 0.
    pub(super) async fn run(&self, value: &Secret) -> Result<String, String> {
        let program = self.program().to_owned();
        let mut command = tokio::process::Command::new(&program);
        super::child_env::without_secrets(&mut command);
        let mut child = command
            .args(self.argv.iter().skip(1))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("revoke command {program} cannot start: {e}"))?;
        let stdin = child.stdin.take();
        let work = async {
            if let Some(mut stdin) = stdin {
                // A command that does not read its input is not an error by itself; its
                // exit status says whether it revoked.
                let _ = stdin.write_all(value.expose().as_bytes()).await;
                let _ = stdin.write_all(b"\n").await;
                drop(stdin);
            }
            child.wait().await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Err(_) => Err(format!(
                "revoke command {program} did not finish within {} s and was killed",
                self.timeout.as_secs()
            )),
            Ok(Err(e)) => Err(format!("revoke command {program}: waiting for it: {e}")),
            Ok(Ok(status)) if status.success() => Ok(format!("revoke command {program} succeeded")),
            Ok(Ok(status)) => Err(format!("revoke command {program} exited with {status}")),
        }
    }
}
