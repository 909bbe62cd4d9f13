//! Credentials the proxy injects on behalf of sandboxes, which never see them.
//!
//! The daemon config's `credentials:` section is parsed into the [`raw`] types and
//! compiled by [`CredentialStore::from_config`] (or [`CredentialStore::from_config_with`],
//! which says how HTTPS sources reach their servers). Each credential has a source
//! (`file`, kept in memory and read again when the file changes, which is checked at most
//! every [`FILE_CHECK_INTERVAL`]; `env`, read at load; `command`, run without a shell and
//! cached for its `ttl`; `github_app`, installation tokens minted with a GitHub App's key
//! and renewed before they expire, see [`github_app`]; `vault`, KV secrets and leases from
//! an OpenBao or Vault server, see `vault.rs`; `sts_assume_role`, AWS session credentials
//! per sandbox, see `aws.rs`), an injection form (a header with a format, HTTP Basic, a
//! query parameter, a per-sandbox placeholder the proxy replaces, see [`placeholder`], or
//! `aws_sigv4`: the request re-signed, see [`sigv4`]), the exact hosts it may be sent to,
//! and optionally how to revoke its live value when a sandbox using it is quarantined
//! ([`CredentialStore::revoke`]). Values live in [`Secret`], which never prints them, and
//! no error of this module contains one.
mod aws;
mod child_env;
mod error;
mod file;
pub mod github_app;
mod https;
pub mod matcher;
pub mod placeholder;
pub mod raw;
mod revoke;
mod secret;
pub mod sigv4;
mod state;
mod store;
mod vault;

pub use crate::net::UpstreamOptions;
pub use aws::{Session as AwsSession, STS_TIMEOUT};
pub use error::CredentialError;
pub use file::CHECK_INTERVAL as FILE_CHECK_INTERVAL;
pub use matcher::SecretMatcher;
pub use placeholder::{SandboxPlaceholders, StreamReplacer};
pub use raw::{
    RawAppRole, RawAwsSigv4, RawBasic, RawCommand, RawCredential, RawCredentials, RawGithubApp,
    RawInject, RawPlaceholder, RawQuery, RawRevoke, RawSource, RawStsAssumeRole, RawVault,
    RawVaultAuth, RawVaultKv, RawVaultLease,
};
pub use revoke::REVOKE_TIMEOUT;
pub use secret::Secret;
pub use state::{
    is_routing_header, rfc3339, CredentialState, CredentialUse, PlaceholderScope, OVERRIDE_HEADERS,
};
pub use store::{normalize_host, CredentialStats, CredentialStore, COMMAND_TIMEOUT};
pub use vault::VAULT_TIMEOUT;

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests;
