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
    /// How to revoke the live value when a sandbox whose policy names the credential is
    /// quarantined: `{ argv: [/path/program, args...] }`, run without a shell with the
    /// value on standard input. (`github_app` tokens are also revoked with the API.)
    #[serde(default)]
    pub revoke: Option<RawRevoke>,
}

/// A program that revokes the value it reads on standard input; exit status 0 = revoked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRevoke {
    /// Program (absolute path) and arguments; no shell is involved.
    pub argv: Vec<String>,
}

/// Where a secret value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RawSource {
    /// `{ file: /path }`: one trailing newline removed; kept in memory and read again
    /// when the file changes (checked at most once a second), so a rotated file takes
    /// effect within about a second.
    File(PathBuf),
    /// `{ env: NAME }`: the daemon's environment variable, read once at load.
    Env(String),
    /// `{ command: { argv: [...], ttl: 300 } }`: a program run without a shell.
    Command(RawCommand),
    /// `{ github_app: { app_id: 123, private_key: /path/key.pem, installation_id: 456 } }`:
    /// short-lived installation tokens minted with a GitHub App's key.
    GithubApp(RawGithubApp),
}

/// A GitHub App whose installation tokens are minted on demand and renewed before they
/// expire.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGithubApp {
    /// The App's numeric id ("App ID" in its settings); the JWT's issuer.
    pub app_id: u64,
    /// Absolute path of the App's PEM private key (as GitHub issues it, PKCS#1, or
    /// PKCS#8). Checked at load, read again for every mint so a rotated key takes effect.
    pub private_key: PathBuf,
    /// The installation (the App on one account) to mint tokens for.
    pub installation_id: u64,
    /// The REST API root; default `https://api.github.com` (GitHub Enterprise Server:
    /// `https://HOST/api/v3`).
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Narrows each token to these repositories of the installation (names without the
    /// owner); default: all the installation can reach.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Narrows each token to these permissions, e.g. `{ contents: write }` (levels `read`,
    /// `write`, `admin`); default: all the App has.
    #[serde(default)]
    pub permissions: BTreeMap<String, String>,
}

fn default_api_url() -> String {
    super::github_app::GITHUB_API_URL.to_owned()
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
