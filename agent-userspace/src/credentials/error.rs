//! Errors of the credential store. None of them ever carries a secret value.

use std::path::PathBuf;

/// A credential could not be configured or its value could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The configuration of one credential is invalid.
    #[error("credentials.{credential}.{field}: {reason}")]
    Config {
        credential: String,
        field: &'static str,
        reason: String,
    },
    /// An `env` source names a variable the daemon does not have.
    #[error(
        "credentials.{credential}.source.env: environment variable `{var}` is not set or not \
         valid UTF-8"
    )]
    EnvMissing { credential: String, var: String },
    /// A `file` source could not be read.
    #[error("credential `{credential}`: cannot read secret file {path}: {source}")]
    Read {
        credential: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A `command` source failed (could not start, timed out, exited non-zero).
    #[error("credential `{credential}`: command {program}: {reason}")]
    Command {
        credential: String,
        program: String,
        reason: String,
    },
    /// The secret value is unusable; the value itself is never shown.
    #[error("credential `{credential}`: the secret value {reason} (value not shown)")]
    InvalidValue {
        credential: String,
        reason: &'static str,
    },
    /// A `github_app` source could not mint a token (and had none still valid).
    #[error("credential `{credential}`: GitHub App token: {reason}")]
    GithubApp { credential: String, reason: String },
    /// A `vault` source could not read, issue or renew the secret (and had none still
    /// valid).
    #[error("credential `{credential}`: secret store: {reason}")]
    Vault { credential: String, reason: String },
    /// An `sts_assume_role` source could not get a session (and had none still valid).
    #[error("credential `{credential}`: AWS: {reason}")]
    Aws { credential: String, reason: String },
    /// The source still gives the value a quarantine revoked.
    #[error(
        "credential `{credential}`: its value was revoked (at a quarantine) and its source \
         still gives it; it is used again once the source gives a new one"
    )]
    Revoked { credential: String },
    /// No credential of that name is configured.
    #[error("unknown credential `{0}`: not defined under `credentials:` in the daemon config")]
    Unknown(String),
}
