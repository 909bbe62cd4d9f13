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
    /// `{ vault: { address, auth: {...}, kv: {...} | lease: {...} } }`: a secret from an
    /// OpenBao or Vault server, read with the daemon's own AppRole or token.
    Vault(RawVault),
    /// `{ sts_assume_role: { role_arn, duration, session_name, ... } }`: AWS session
    /// credentials, one STS session per sandbox; only with `inject: { aws_sigv4: ... }`.
    StsAssumeRole(RawStsAssumeRole),
}

/// AWS STS `AssumeRole` with the daemon's own AWS key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStsAssumeRole {
    /// The role to assume, e.g. `arn:aws:iam::123456789012:role/agent-s3`.
    pub role_arn: String,
    /// Seconds each session lasts (900..=43200); default 900. Renewed when a third is left.
    #[serde(default = "default_sts_duration")]
    pub duration: u32,
    /// The session's name, `{sandbox}` (required) and `{credential}` replaced; default
    /// `{sandbox}`, so the provider's logs (CloudTrail) name the sandbox.
    #[serde(default = "default_session_name")]
    pub session_name: String,
    /// An inline IAM policy (JSON text) narrowing the session below the role's rights.
    #[serde(default)]
    pub session_policy: Option<String>,
    /// Session tags; `{sandbox}` in a value is replaced by the sandbox's name.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The region of the STS endpoint and of its signature; default `us-east-1`.
    #[serde(default = "default_aws_region")]
    pub region: String,
    /// The STS endpoint; default `https://sts.<region>.amazonaws.com` (a private STS or
    /// a test server; `http://` only to a loopback address).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The daemon's own AWS key: an AWS shared-credentials file (or plain
    /// `aws_access_key_id = ...` / `aws_secret_access_key = ...` lines), read again for
    /// each `AssumeRole`. Absent: the daemon's `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) environment variables.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// The profile (section) of `credentials_file`; default `default`.
    #[serde(default = "default_aws_profile")]
    pub profile: String,
}

fn default_sts_duration() -> u32 {
    900
}

fn default_session_name() -> String {
    "{sandbox}".to_owned()
}

fn default_aws_region() -> String {
    "us-east-1".to_owned()
}

fn default_aws_profile() -> String {
    "default".to_owned()
}

/// `inject: { aws_sigv4: { service: s3, region: us-east-1 } }`: every request is re-signed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwsSigv4 {
    /// The signing name of the service, e.g. `s3`.
    pub service: String,
    /// The region the requests are signed for, e.g. `eu-west-1`.
    pub region: String,
}

/// An OpenBao / HashiCorp Vault source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    /// The server, e.g. `https://vault.example:8200` (`http://` only to a loopback address).
    pub address: String,
    /// A PEM bundle of CAs to trust for the server besides the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How the daemon logs in: `{ approle: {...} }` or `{ token_file: /path }`.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub auth: RawVaultAuth,
    /// A KV version 2 secret's field, read again every `refresh` seconds. Exactly one of
    /// `kv` and `lease` is given.
    #[serde(default)]
    pub kv: Option<RawVaultKv>,
    /// A dynamic secret with a lease, renewed before it ends and revocable.
    #[serde(default)]
    pub lease: Option<RawVaultLease>,
}

/// The daemon's own identity at the store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RawVaultAuth {
    /// A token in a file (read again at each login, so a rotated file takes effect).
    TokenFile(PathBuf),
    /// AppRole login with a role id and a secret id, each in a file.
    Approle(RawAppRole),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
    /// Where the AppRole method is mounted; default `approle`.
    #[serde(default = "default_approle_mount")]
    pub mount: String,
}

fn default_approle_mount() -> String {
    "approle".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultKv {
    /// The KV v2 mount; default `secret`.
    #[serde(default = "default_kv_mount")]
    pub mount: String,
    /// The secret's path inside the mount, e.g. `agents/github`.
    pub path: String,
    /// The field of the secret that holds the value.
    pub field: String,
    /// Seconds between reads; a new version takes effect within this time. Default 60.
    #[serde(default = "default_refresh")]
    pub refresh: u64,
}

fn default_kv_mount() -> String {
    "secret".to_owned()
}

fn default_refresh() -> u64 {
    60
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultLease {
    /// The API path that issues the secret, e.g. `database/creds/agent` or
    /// `auth/token/create/agent`.
    pub path: String,
    /// `GET` (secrets engines' `creds` paths) or `POST` (token creation); default `GET`.
    #[serde(default = "default_lease_method")]
    pub method: String,
    /// Dotted path of the value in the answer, e.g. `data.password` or `auth.client_token`.
    pub field: String,
}

fn default_lease_method() -> String {
    "GET".to_owned()
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

/// How the value is injected: `{ header: NAME, format: "Bearer {}" }`,
/// `{ basic: { user: NAME } }`, `{ query: { param: NAME } }` or `{ placeholder: {} }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    /// Header name to set, e.g. `Authorization` or `X-Api-Key`.
    pub header: Option<String>,
    /// The header value with `{}` standing for the secret, once. Defaults to `{}`.
    pub format: Option<String>,
    /// HTTP Basic authentication: `Authorization: Basic base64(user:secret)`.
    pub basic: Option<RawBasic>,
    /// The value as a query parameter of the forwarded request (replacing any the
    /// sandbox sent under that name).
    #[serde(default)]
    pub query: Option<RawQuery>,
    /// The sandbox is given a sentinel (`egressctl placeholder SANDBOX CREDENTIAL`) to
    /// put where its client wants a key; the proxy replaces it with the value, in
    /// requests its rule allows to the credential's hosts, in `Authorization` and only
    /// where [`RawPlaceholder`] enables more. A sentinel anywhere else is refused.
    #[serde(default)]
    pub placeholder: Option<RawPlaceholder>,
    /// AWS Signature Version 4 with an `sts_assume_role` source's session: whatever
    /// signing the sandbox sent is stripped and the forwarded request signed anew.
    #[serde(default)]
    pub aws_sigv4: Option<RawAwsSigv4>,
}

/// `inject: { query: { param: api_key } }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuery {
    /// The query parameter's name, e.g. `api_key` (letters, digits, `-`, `_`, `.`).
    pub param: String,
}

/// `inject: { placeholder: { headers: [X-Api-Key], query: [key], body: false } }`: where,
/// besides `Authorization`, the sentinel is replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlaceholder {
    /// Further request headers whose value may carry the sentinel.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Query parameters whose value may carry the sentinel.
    #[serde(default)]
    pub query: Vec<String>,
    /// Replace it in the request body too. This lets the sandbox choose where the value
    /// lands (any field of any request the rule allows): only for APIs that neither echo
    /// nor store request content.
    #[serde(default)]
    pub body: bool,
}

/// HTTP Basic authentication with the secret as password.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBasic {
    /// The user name (must not contain `:`).
    pub user: String,
}
