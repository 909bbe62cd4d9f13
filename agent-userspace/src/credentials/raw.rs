//! The `credentials:` section of the daemon configuration, as written in YAML.
//!
//! These types only mirror the file (unknown keys are rejected); [`super::CredentialStore::from_config`]
//! checks them and builds the immutable store.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole `credentials:` map: credential name -> definition.
pub type RawCredentials = BTreeMap<String, RawCredential>;

/// One credential: where its value comes from, how it is sent, and to which hosts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    /// Where the secret value is read from: a one-key map such as `{ file: /path }`.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub source: RawSource,
    /// How the value is put into requests.
    pub inject: RawInject,
    /// The only server names (TLS SNI / Host) the credential is ever sent to: exact names,
    /// compared case-insensitively, a trailing dot ignored. No wildcards.
    pub hosts: Vec<String>,
}

/// Where a secret value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RawSource {
    /// `{ file: /path }`: read at every use, one trailing newline removed, so a rotated
    /// file takes effect at once.
    File(PathBuf),
    /// `{ env: NAME }`: the daemon's environment variable, read once at load.
    Env(String),
    /// `{ command: { argv: [...], ttl: 300 } }`: a program run without a shell.
    Command(RawCommand),
}

/// A program that prints the secret on standard output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCommand {
    /// Program (absolute path) and arguments; no shell is involved.
    pub argv: Vec<String>,
    /// Seconds a printed value is reused before the program is run again; 0 runs it for
    /// every use. Defaults to 300.
    #[serde(default = "default_ttl")]
    pub ttl: u64,
}

fn default_ttl() -> u64 {
    300
}

/// How the value is injected: either `{ header: NAME, format: "Bearer {}" }` or
/// `{ basic: { user: NAME } }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    /// Header name to set, e.g. `Authorization` or `X-Api-Key`.
    pub header: Option<String>,
    /// The header value with `{}` standing for the secret, once. Defaults to `{}`.
    pub format: Option<String>,
    /// HTTP Basic authentication: `Authorization: Basic base64(user:secret)`.
    pub basic: Option<RawBasic>,
}

/// HTTP Basic authentication with the secret as password.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBasic {
    /// The user name (must not contain `:`).
    pub user: String,
}
