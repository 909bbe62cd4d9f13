//! The compiled credential store: checked definitions, value fetching and header building.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::process::Stdio;
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex, RwLock,
};
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::aws::{AwsSts, Session as AwsSession};
use super::error::CredentialError;
use super::file::FileSource;
use super::github_app::GithubApp;
use super::matcher::SecretMatcher;
use super::placeholder::{Placeholders, SandboxPlaceholders};
use super::raw::{RawCredential, RawInject, RawSource};
use super::revoke::RevokeCommand;
use super::secret::Secret;
use super::state::{CredentialState, CredentialUse, LastFetch};
use super::vault::Vault;
use crate::net::UpstreamOptions;

/// How long a `command` source may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest secret accepted from a file or a command's output.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Header names a credential may not set: they frame or route the request, and
/// overriding them would break or redirect it.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "content-type",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "cookie",
];

/// Lower-cases a host name and drops one trailing dot, the form every comparison of
/// names in the proxy and the credential store uses.
pub fn normalize_host(host: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

/// Whether `host` is already in [`normalize_host`]'s form (as the proxy's names are), so
/// that it can be compared without a copy.
fn is_normalized(host: &str) -> bool {
    !host.ends_with('.') && !host.bytes().any(|b| b.is_ascii_uppercase())
}

/// Values kept per credential for matching after a newer one replaced them: a rotated or
/// renewed value stays valid at its issuer for a while (a GitHub App token for an hour, an
/// STS session up to twelve), and a copy an origin kept can come back all that time. Each
/// is kept for [`KNOWN_FOR`] after it was replaced, the last [`KNOWN_AT_LEAST`] always,
/// and at most [`KNOWN_AT_MOST`]: every value is a set of patterns in the one automaton
/// that scans every response and record, and a source that changes often (STS sessions
/// every ten minutes per sandbox) must not grow it without bound.
/// A `command` may print a value valid far longer than its `ttl` (a session token of
/// hours, run every ten minutes): its values are kept up to one per `ttl` over
/// [`KNOWN_FOR`], and at most [`KNOWN_AT_MOST_COMMAND`].
const KNOWN_FOR: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
const KNOWN_AT_LEAST: usize = 2;
const KNOWN_AT_MOST: usize = 4;
const KNOWN_AT_MOST_COMMAND: usize = 64;

/// How long the daemon's start waits for the values it reads ahead
/// ([`CredentialStore::prime`]), all read at once.
const READ_AHEAD_TIMEOUT: Duration = Duration::from_secs(3);

/// How many values of a `command` source refreshed every `ttl` are kept.
pub(super) fn known_at_most_for_ttl(ttl: Duration) -> usize {
    let per_window = KNOWN_FOR.as_secs() / ttl.as_secs().max(1) + 1;
    usize::try_from(per_window)
        .unwrap_or(usize::MAX)
        .clamp(KNOWN_AT_MOST, KNOWN_AT_MOST_COMMAND)
}

/// All configured credentials, checked. Values are fetched on use by
/// [`CredentialStore::header_for`].
#[derive(Debug, Default)]
pub struct CredentialStore {
    credentials: BTreeMap<String, Credential>,
    known: KnownSecrets,
    placeholders: Placeholders,
}

/// Revoked values each credential remembers (in memory: a restart forgets them).
const REVOKED_KEPT: usize = 16;

/// A value and when it was noted (again, if it came back into use).
type Noted = (Arc<Secret>, std::time::Instant);

/// The values the store has handed out (or read ahead, see
/// [`CredentialStore::prime`]), and the matcher over them.
#[derive(Default)]
struct KnownSecrets {
    /// Per credential (or slot), oldest first, each with when it was noted.
    values: Mutex<BTreeMap<String, Vec<Noted>>>,
    /// Credentials that keep more than [`KNOWN_AT_MOST`] values (`command` sources).
    at_most: BTreeMap<String, usize>,
    matcher: RwLock<Arc<SecretMatcher>>,
}

impl fmt::Debug for KnownSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KnownSecrets(<redacted>)")
    }
}

impl KnownSecrets {
    /// Records `secret` as credential `name`'s current value; rebuilds the matcher when it
    /// is new. `name` may be a slot of a credential, `credential\0slot` (one per AWS
    /// session value): the matcher reports the part before the NUL.
    fn note(&self, name: &str, secret: &Arc<Secret>) {
        let shown = name.split('\0').next().unwrap_or(name);
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let list = values.entry(name.to_owned()).or_default();
        let now = std::time::Instant::now();
        if let Some(at) = list
            .iter()
            .position(|(s, _)| Arc::ptr_eq(s, secret) || **s == **secret)
        {
            // In use again (a value rolled back): the newest, from now.
            let (known, _) = list.remove(at);
            list.push((known, now));
            return;
        }
        list.push((secret.clone(), now));
        let at_most = self.at_most.get(name).copied().unwrap_or(KNOWN_AT_MOST);
        let young = forget_old(list, now, at_most);
        forget_idle_slots(&mut values, now);
        if young > 0 {
            tracing::warn!(
                credential = shown,
                dropped = young,
                kept = at_most,
                "Values replaced less than 12 h ago are no longer scrubbed from responses: \
                 this credential changes more often than the values kept allow; if they stay \
                 valid longer, lengthen its ttl"
            );
        }
        if secret.expose().len() < super::matcher::MIN_PATTERN_LEN {
            tracing::warn!(
                credential = shown,
                min = super::matcher::MIN_PATTERN_LEN,
                "Credential value is too short to be scrubbed from responses or detected in requests"
            );
        }
        let matcher = SecretMatcher::new(values.iter().flat_map(|(n, list)| {
            let n = n.split('\0').next().unwrap_or(n);
            list.iter().map(move |(s, _)| (n, s.expose()))
        }));
        tracing::debug!(credential = shown, ?matcher, "Secret matcher rebuilt");
        *self.matcher.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(matcher);
    }
}

/// Marks a slot whose values are the daemon's own (its store token, its base key): in
/// use for as long as the daemon runs, never forgotten for want of use.
const LONG_LIVED_SLOT: &str = "daemon:";

/// Drops every value of the slots (`credential\0slot`: one sandbox's STS session) none of
/// whose values was noted within [`KNOWN_FOR`] before `now`: a session is noted at each
/// use and lasts at most that long, so such a slot's values are all expired (its sandbox
/// detached, most often); kept, they would grow the matcher without bound.
pub(super) fn forget_idle_slots<T>(
    values: &mut BTreeMap<String, Vec<(T, std::time::Instant)>>,
    now: std::time::Instant,
) {
    values.retain(|name, list| {
        !name.contains('\0')
            || name.contains(&format!("\0{LONG_LIVED_SLOT}"))
            || list
                .iter()
                .any(|(_, at)| now.saturating_duration_since(*at) <= KNOWN_FOR)
    });
}

/// Drops the values (oldest first) replaced longer than [`KNOWN_FOR`] before `now`, keeping
/// the last [`KNOWN_AT_LEAST`], and any past `at_most`. Returns how many of those dropped
/// were replaced less than [`KNOWN_FOR`] before (and may still be valid).
pub(super) fn forget_old<T>(
    list: &mut Vec<(T, std::time::Instant)>,
    now: std::time::Instant,
    at_most: usize,
) -> usize {
    // A value is replaced when the next one is noted: its age counts from then.
    let mut stale = 0;
    while stale + KNOWN_AT_LEAST < list.len()
        && now.saturating_duration_since(list[stale + 1].1) > KNOWN_FOR
    {
        stale += 1;
    }
    let over = list.len().saturating_sub(stale).saturating_sub(at_most);
    list.drain(..stale + over);
    over
}

#[derive(Debug)]
struct Credential {
    name: String,
    source: Source,
    inject: Inject,
    hosts: BTreeSet<String>,
    header: HeaderCache,
    /// Fetches from a `command` source and failed fetches from any source except
    /// `github_app`, which counts its own mints.
    fetches: AtomicU64,
    failures: AtomicU64,
    revoke: Option<RevokeCommand>,
    /// When a new value was last had, and the last error (for `egressctl credentials`).
    last: LastFetch,
    /// The values a quarantine revoked (the last [`REVOKED_KEPT`]): never sent again,
    /// while the source still gives one (a file or variable unchanged, a KV secret not
    /// rotated) or gives one back (a replica, a restored backup).
    revoked: std::sync::Mutex<Vec<Arc<Secret>>>,
    /// The source's own secrets noted among the known secrets so far: its logins (a
    /// Vault token each) or its base key's changes (AWS).
    noted_login: AtomicU64,
}

/// A credential's state for metrics: its name and source kind, never its value.
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialStats {
    pub name: String,
    /// `file`, `env`, `command`, `github_app` or `vault`.
    pub source: &'static str,
    /// Values obtained from the source: token mints and command runs (files and
    /// environment variables are read, not fetched, and secret-store reads are not
    /// counted here: 0).
    pub fetches: u64,
    /// Fetches or reads that failed, including a failed token renewal while the current
    /// token was still used.
    pub failures: u64,
    /// How long the current value is still used: until a token expires or a command's
    /// output is fetched again. `None` when there is none or it does not expire.
    pub expires_in: Option<Duration>,
}

/// The header value last built, and the secret it was built from: rebuilt only when the
/// source hands out a different value, so a request costs no formatting or validation.
#[derive(Default)]
struct HeaderCache(Mutex<Option<(Arc<Secret>, HeaderValue)>>);

impl fmt::Debug for HeaderCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeaderCache(<redacted>)")
    }
}

impl HeaderCache {
    fn get(&self, secret: &Arc<Secret>) -> Option<HeaderValue> {
        let cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match cached.as_ref() {
            Some((from, value)) if Arc::ptr_eq(from, secret) => Some(value.clone()),
            _ => None,
        }
    }

    fn set(&self, secret: Arc<Secret>, value: HeaderValue) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((secret, value));
    }
}

enum Source {
    File(FileSource),
    Env { var: String, value: Arc<Secret> },
    Command(CommandSource),
    GithubApp(GithubApp),
    Vault(Vault),
    Aws(AwsSts),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(file) => file.fmt(f),
            Self::Env { var, value } => f
                .debug_struct("Env")
                .field("var", var)
                .field("value", value)
                .finish(),
            Self::Command(c) => f
                .debug_struct("Command")
                .field("argv", &c.argv)
                .field("ttl", &c.ttl)
                .finish_non_exhaustive(),
            Self::GithubApp(app) => app.fmt(f),
            Self::Vault(v) => v.fmt(f),
            Self::Aws(a) => a.fmt(f),
        }
    }
}

struct CommandSource {
    argv: Vec<String>,
    ttl: Duration,
    timeout: Duration,
    /// Held across the program's run, so that concurrent callers wait for one run and
    /// share its value instead of starting their own.
    cache: tokio::sync::Mutex<Option<Cached>>,
}

struct Cached {
    value: Arc<Secret>,
    fetched: Instant,
}

#[derive(Debug)]
enum Inject {
    Header {
        name: HeaderName,
        prefix: String,
        suffix: String,
    },
    Basic {
        user: String,
    },
    /// `inject.query`: the value as this query parameter.
    Query {
        param: String,
    },
    /// `inject.placeholder`: a per-sandbox sentinel replaced by the proxy, where this
    /// allows.
    Placeholder(super::state::PlaceholderScope),
    /// The request is re-signed with AWS SigV4 (see [`CredentialStore::aws_session`]).
    AwsSigv4 {
        service: String,
        region: String,
    },
}

impl Inject {
    /// The header the credential sets, if it is sent in one.
    fn header_name(&self) -> Option<HeaderName> {
        match self {
            Self::Header { name, .. } => Some(name.clone()),
            // A re-signed request's Authorization is the proxy's: the sandbox's is stripped.
            Self::Basic { .. } | Self::AwsSigv4 { .. } => Some(http::header::AUTHORIZATION),
            Self::Query { .. } | Self::Placeholder(_) => None,
        }
    }

    /// `egress.credential.kind`: how the value is sent.
    fn kind(&self) -> &'static str {
        match self {
            Self::Header { .. } => "header",
            Self::Basic { .. } => "basic",
            Self::Query { .. } => "query",
            Self::Placeholder(_) => "placeholder",
            Self::AwsSigv4 { .. } => "aws_sigv4",
        }
    }
}

impl CredentialStore {
    /// Checks and compiles the `credentials:` section. Any invalid entry rejects the
    /// whole section. `env` sources are read here, `github_app` keys checked. HTTPS
    /// sources trust the system roots and dial from the daemon's own namespace; see
    /// [`Self::from_config_with`].
    pub fn from_config<'a, I>(raw: I) -> Result<Self, CredentialError>
    where
        I: IntoIterator<Item = (&'a String, &'a RawCredential)>,
    {
        Self::from_config_with(raw, &UpstreamOptions::default())
    }

    /// [`Self::from_config`], with HTTPS sources (`github_app`) using `upstream`'s TLS
    /// trust and dialer, e.g. the proxy's ([`UpstreamOptions::new`]).
    pub fn from_config_with<'a, I>(
        raw: I,
        upstream: &UpstreamOptions,
    ) -> Result<Self, CredentialError>
    where
        I: IntoIterator<Item = (&'a String, &'a RawCredential)>,
    {
        let mut credentials = BTreeMap::new();
        for (name, def) in raw {
            let credential = compile(name, def, upstream)?;
            credentials.insert(name.clone(), credential);
        }
        let placeholders = Placeholders::new(
            credentials
                .values()
                .filter(|c| matches!(c.inject, Inject::Placeholder(_)))
                .map(|c| c.name.clone())
                .collect(),
        );
        let at_most = credentials
            .values()
            .filter_map(|c| match &c.source {
                Source::Command(cmd) => Some((c.name.clone(), known_at_most_for_ttl(cmd.ttl))),
                _ => None,
            })
            .collect();
        let store = Self {
            credentials,
            known: KnownSecrets {
                at_most,
                ..KnownSecrets::default()
            },
            placeholders,
        };
        for credential in store.credentials.values() {
            if let Source::Env { value, .. } = &credential.source {
                store.known.note(&credential.name, value);
            }
        }
        Ok(store)
    }

    /// Reads every value that outlives the daemon once, all at once, so that it is matched
    /// from the start, before any request used it: after a restart an origin may still
    /// hold (and send back) a value the previous run injected. That is every `file`
    /// source, a Vault or OpenBao KV secret, and a `command`'s output (cached for its
    /// `ttl`, so the first request does not run it again). Values minted per use (GitHub
    /// App tokens, Vault leases, STS sessions) become known when first minted, before
    /// they are first injected. Bounded by [`READ_AHEAD_TIMEOUT`]; errors are left for the
    /// request that needs the value to report. Returns how many values were read, and the
    /// names of the credentials whose value was not (which [`Self::read_ahead_unbounded`] tries
    /// again: until then their value is not matched).
    pub async fn prime(&self) -> (usize, Vec<(String, String)>) {
        let names: Vec<String> = self
            .credentials
            .values()
            .filter(|c| match &c.source {
                Source::File(_) | Source::Command(_) => true,
                Source::Vault(v) => !v.is_lease(),
                Source::Env { .. } | Source::GithubApp(_) | Source::Aws(_) => false,
            })
            .map(|c| c.name.clone())
            .collect();
        let unread = self.read_ahead(&names).await;
        (names.len() - unread.len(), unread)
    }

    /// Notes credential's new `value`, and what its source holds of its own (the daemon's
    /// token for the store it reads from): the proxy never sends those, so one in a
    /// request has leaked (refused), one in a response is scrubbed, and the log and
    /// stderr mask them like any value.
    fn note_value(&self, credential: &Credential, value: &Arc<Secret>) {
        self.known.note(&credential.name, value);
        self.note_store_token(credential);
    }

    /// Notes the daemon's token for the store `credential` reads from, once per login.
    fn note_store_token(&self, credential: &Credential) {
        let Source::Vault(v) = &credential.source else {
            return;
        };
        if v.logins() == credential.noted_login.load(Ordering::Acquire) {
            return;
        }
        if let Some((logins, token)) = v.daemon_token() {
            self.known.note(
                &format!("{}\0{LONG_LIVED_SLOT}store-token", credential.name),
                &Arc::new(token),
            );
            credential.noted_login.store(logins, Ordering::Release);
        }
    }

    /// Reads the values of credentials `names` ahead (see [`Self::prime`]), each within
    /// [`READ_AHEAD_TIMEOUT`]; returns the names of those not read, each with why.
    async fn read_ahead(&self, names: &[String]) -> Vec<(String, String)> {
        let ahead = names.iter().filter_map(|n| self.credentials.get(n));
        let read = futures_util::future::join_all(ahead.map(|credential| async move {
            let read = credential.read_ahead_value();
            // The proxy waits for this: a store that is away, or a file that blocks (a
            // FIFO, a hung mount), costs at most this, and its value is read on first use.
            let value = match tokio::time::timeout(READ_AHEAD_TIMEOUT, read).await {
                Ok(value) => value,
                Err(_) => {
                    let why = format!("not read within {} s", READ_AHEAD_TIMEOUT.as_secs_f32());
                    credential.last.note(Err(why.clone()));
                    Err(why)
                }
            };
            (credential, value)
        }))
        .await;
        let mut unread = Vec::new();
        for (credential, value) in read {
            match value {
                Ok(secret) => self.note_value(credential, &secret),
                Err(why) => unread.push((credential.name.clone(), why)),
            }
        }
        unread
    }

    /// Reads credential `name`'s value ahead with no time limit, noting it for the
    /// matcher: a read that blocks (a FIFO, a hung mount) stays the one in progress, never
    /// started again beside it.
    pub async fn read_ahead_unbounded(&self, name: &str) -> Result<(), String> {
        let credential = self
            .credentials
            .get(name)
            .ok_or_else(|| CredentialError::Unknown(name.to_owned()).to_string())?;
        let secret = credential.read_ahead_value().await?;
        self.note_value(credential, &secret);
        Ok(())
    }

    /// The matcher over every credential's current (and previous) value seen so far.
    pub fn matcher(&self) -> Arc<SecretMatcher> {
        self.known
            .matcher
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a credential of that name is configured.
    pub fn contains(&self, name: &str) -> bool {
        self.credentials.contains_key(name)
    }

    /// No credential is configured.
    pub fn is_empty(&self) -> bool {
        self.credentials.is_empty()
    }

    /// The configured credential names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.credentials.keys().map(String::as_str).collect()
    }

    /// Every header name some credential sets, each once. The proxy removes these from
    /// sandbox requests so that a sandbox can neither supply nor probe them.
    pub fn injected_header_names(&self) -> Vec<HeaderName> {
        let mut names: Vec<HeaderName> = Vec::new();
        for credential in self.credentials.values() {
            let Some(name) = credential.inject.header_name() else {
                continue;
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// The header that carries credential `name` to server `host`, or `None` when
    /// `host` is not one of the credential's `hosts` (the value is then not even
    /// fetched). The header value is marked sensitive.
    pub async fn header_for(
        &self,
        name: &str,
        host: &str,
    ) -> Result<Option<(HeaderName, HeaderValue)>, CredentialError> {
        let credential = self
            .credentials
            .get(name)
            .ok_or_else(|| CredentialError::Unknown(name.to_owned()))?;
        let Some(header) = credential.inject.header_name() else {
            return Ok(None);
        };
        if !credential.sends_to(host) {
            return Ok(None);
        }
        if matches!(credential.inject, Inject::AwsSigv4 { .. }) {
            return Err(CredentialError::Aws {
                credential: credential.name.clone(),
                reason: "signs requests (aws_sigv4) and is never sent as a header".to_owned(),
            });
        }
        let secret = credential.fetch().await?;
        // A login since the last noted (its value may be unchanged): two loads otherwise.
        self.note_store_token(credential);
        if let Some(value) = credential.header.get(&secret) {
            return Ok(Some((header, value)));
        }
        // A value not seen before (first use, rotation, renewal): match it from now on,
        // before it is sent anywhere.
        self.note_value(credential, &secret);
        let text: Zeroizing<String> = match &credential.inject {
            Inject::Header { prefix, suffix, .. } => {
                let mut s = Zeroizing::new(String::with_capacity(
                    prefix.len() + secret.expose().len() + suffix.len(),
                ));
                s.push_str(prefix);
                s.push_str(secret.expose());
                s.push_str(suffix);
                s
            }
            Inject::Query { .. } | Inject::Placeholder(_) | Inject::AwsSigv4 { .. } => {
                return Ok(None)
            }
            Inject::Basic { user } => {
                let mut pair = Zeroizing::new(String::new());
                pair.push_str(user);
                pair.push(':');
                pair.push_str(secret.expose());
                let mut s = Zeroizing::new(String::from("Basic "));
                base64::engine::general_purpose::STANDARD.encode_string(pair.as_bytes(), &mut s);
                s
            }
        };
        let mut value =
            HeaderValue::from_str(&text).map_err(|_| CredentialError::InvalidValue {
                credential: credential.name.clone(),
                reason: "is not a valid HTTP header value",
            })?;
        value.set_sensitive(true);
        credential.header.set(secret, value.clone());
        Ok(Some((header, value)))
    }

    /// Credential `name`'s value for a request to `host`, for the injection forms the
    /// proxy applies itself (`query`, `placeholder`); `None` when `host` is not one of
    /// the credential's `hosts` (the value is then not fetched).
    pub async fn value_for(
        &self,
        name: &str,
        host: &str,
    ) -> Result<Option<Arc<Secret>>, CredentialError> {
        let credential = self
            .credentials
            .get(name)
            .ok_or_else(|| CredentialError::Unknown(name.to_owned()))?;
        if !credential.sends_to(host) {
            return Ok(None);
        }
        let secret = credential.fetch().await?;
        // A login since the last noted (its value may be unchanged): two loads otherwise.
        self.note_store_token(credential);
        // Matched (scrubbed, refused outbound) from now on, before it is sent anywhere.
        self.known.note(&credential.name, &secret);
        Ok(Some(secret))
    }

    /// The query parameter credential `name` is sent in, if it is a `query` credential.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        match &self.credentials.get(name)?.inject {
            Inject::Query { param } => Some(param),
            _ => None,
        }
    }

    /// Whether credential `name` is injected as a placeholder.
    pub fn is_placeholder(&self, name: &str) -> bool {
        self.credentials
            .get(name)
            .is_some_and(|c| matches!(c.inject, Inject::Placeholder(_)))
    }

    /// Where credential `name`'s placeholder is replaced, if it is a placeholder.
    pub fn placeholder_scope(&self, name: &str) -> Option<&super::state::PlaceholderScope> {
        match &self.credentials.get(name)?.inject {
            Inject::Placeholder(scope) => Some(scope),
            _ => None,
        }
    }

    /// Whether credential `name` may be sent to server `host`.
    pub fn sends_to(&self, name: &str, host: &str) -> bool {
        self.credentials.get(name).is_some_and(|c| c.sends_to(host))
    }

    /// Uses the placeholder key in `dir` (see [`super::placeholder`]), creating it if
    /// needed, so that sentinels survive daemon restarts.
    pub fn load_placeholder_key(&mut self, dir: &std::path::Path) -> Result<(), CredentialError> {
        self.placeholders.load_key(dir)
    }

    /// Sandbox `sandbox`'s sentinel for placeholder credential `credential`.
    pub fn placeholder(&self, sandbox: &str, credential: &str) -> Result<String, String> {
        if !self.contains(credential) {
            return Err(CredentialError::Unknown(credential.to_owned()).to_string());
        }
        if !self.is_placeholder(credential) {
            return Err(format!(
                "credential `{credential}` is not injected as a placeholder (its `inject:` \
                 is not `{{ placeholder: {{}} }}`)"
            ));
        }
        Ok(self.placeholders.sentinel(sandbox, credential))
    }

    /// Every placeholder sentinel of sandbox `sandbox`; `None` when no credential is a
    /// placeholder.
    pub fn placeholders_for(&self, sandbox: &str) -> Option<Arc<SandboxPlaceholders>> {
        if self.placeholders.is_empty() {
            return None;
        }
        self.placeholders.for_sandbox(sandbox)
    }

    /// What an audit record says about credential `name` having been used: its kind,
    /// source and when its value expires (if known). Never waits.
    pub fn usage(&self, name: &str) -> Option<CredentialUse> {
        let c = self.credentials.get(name)?;
        Some(CredentialUse {
            kind: c.inject.kind(),
            source: c.source_kind(),
            expires: c
                .expires_in()
                .map(|left| std::time::SystemTime::now() + left),
        })
    }

    /// Each credential's state for `egressctl credentials`: never a value. Never waits.
    pub fn states(&self) -> Vec<CredentialState> {
        self.credentials
            .values()
            .map(|c| {
                let (at, error) = c.last.get();
                CredentialState {
                    name: c.name.clone(),
                    kind: c.inject.kind().to_owned(),
                    source: c.source_kind().to_owned(),
                    hosts: c.hosts.iter().cloned().collect(),
                    last_fetch: at.map(super::state::rfc3339),
                    expires: c
                        .expires_in()
                        .map(|left| super::state::rfc3339(std::time::SystemTime::now() + left)),
                    last_error: error,
                    detail: match &c.source {
                        Source::Vault(v) => v.detail(),
                        _ => None,
                    },
                    sandboxes: Vec::new(),
                }
            })
            .collect()
    }

    /// The signing service and region of credential `name` when it is an `aws_sigv4`
    /// credential, else `None`.
    pub fn aws_signing(&self, name: &str) -> Option<(&str, &str)> {
        match &self.credentials.get(name)?.inject {
            Inject::AwsSigv4 { service, region } => Some((service, region)),
            _ => None,
        }
    }

    /// Sandbox `sandbox`'s STS session of credential `name` for server `host`, or `None`
    /// when `host` is not one of the credential's `hosts`. Its secret key and token are
    /// matched (scrubbed from responses, refused in requests) before they are used.
    pub async fn aws_session(
        &self,
        name: &str,
        sandbox: &str,
        host: &str,
    ) -> Result<Option<Arc<AwsSession>>, CredentialError> {
        let credential = self
            .credentials
            .get(name)
            .ok_or_else(|| CredentialError::Unknown(name.to_owned()))?;
        if !credential.hosts.contains(&normalize_host(host)) {
            return Ok(None);
        }
        let Source::Aws(sts) = &credential.source else {
            return Err(CredentialError::Aws {
                credential: name.to_owned(),
                reason: "is not an sts_assume_role credential".to_owned(),
            });
        };
        let session = sts.session(sandbox).await;
        credential.last.note(
            session
                .as_ref()
                .map(|s| &s.secret_access_key)
                .map_err(ToString::to_string),
        );
        let session = session?;
        self.known.note(
            &format!("{name}\0{sandbox}\0secret"),
            &session.secret_access_key,
        );
        self.known
            .note(&format!("{name}\0{sandbox}\0token"), &session.session_token);
        // The base key the sessions are asked for with: never sent by the proxy either.
        // Noted once per change (one load otherwise).
        if sts.base_changes() != credential.noted_login.load(Ordering::Acquire) {
            let (changes, parts) = sts.base_secrets();
            for (i, part) in parts.iter().enumerate() {
                self.known
                    .note(&format!("{name}\0{LONG_LIVED_SLOT}base-{i}"), part);
            }
            credential.noted_login.store(changes, Ordering::Release);
        }
        Ok(Some(session))
    }

    /// Each credential's fetch counts and time left, by name. Never waits: a value being
    /// fetched right now shows no expiry until it is in.
    pub fn stats(&self) -> Vec<CredentialStats> {
        self.credentials
            .values()
            .map(|c| {
                let (source, fetches, failures, expires_in) = match &c.source {
                    Source::File(_) => ("file", 0, c.failures.load(Ordering::Relaxed), None),
                    Source::Env { .. } => ("env", 0, 0, None),
                    Source::Command(cmd) => {
                        let left = cmd.cache.try_lock().ok().and_then(|cache| {
                            cache
                                .as_ref()
                                .map(|cached| cmd.ttl.saturating_sub(cached.fetched.elapsed()))
                        });
                        (
                            "command",
                            c.fetches.load(Ordering::Relaxed),
                            c.failures.load(Ordering::Relaxed),
                            left,
                        )
                    }
                    Source::GithubApp(app) => {
                        let (mints, failures, left) = app.stats();
                        ("github_app", mints, failures, left)
                    }
                    Source::Vault(v) => (
                        "vault",
                        c.fetches.load(Ordering::Relaxed),
                        c.failures.load(Ordering::Relaxed),
                        v.expires_in(),
                    ),
                    Source::Aws(a) => {
                        let (mints, failures) = a.counts();
                        ("sts_assume_role", mints, failures, None)
                    }
                };
                CredentialStats {
                    name: c.name.clone(),
                    source,
                    fetches,
                    failures,
                    expires_in,
                }
            })
            .collect()
    }

    /// Whether quarantine can revoke credential `name`: it has a `revoke` command or is a
    /// `github_app` source.
    pub fn can_revoke(&self, name: &str) -> bool {
        self.credentials.get(name).is_some_and(|c| {
            c.revoke.is_some()
                || matches!(c.source, Source::GithubApp(_))
                || matches!(&c.source, Source::Vault(v) if v.is_lease())
        })
    }

    /// Whether credential `name` is signed with sessions minted per sandbox (an
    /// `sts_assume_role` source): quarantine drops the sandbox's own (which its traffic may
    /// have leaked), whoever else uses the credential.
    pub fn drops_sessions(&self, name: &str) -> bool {
        self.credentials
            .get(name)
            .is_some_and(|c| matches!(c.source, Source::Aws(_)))
    }

    /// What quarantine does to credential `name` for `sandbox`: its own STS session is
    /// dropped (the next request mints another), which is no revocation (one issued stays
    /// valid until it ends): `Err` saying so; anything else is revoked ([`Self::revoke`]).
    pub async fn revoke_for(&self, name: &str, sandbox: &str) -> Result<String, String> {
        if let Some(Source::Aws(sts)) = self.credentials.get(name).map(|c| &c.source) {
            let dropped = sts.forget_sandbox(sandbox).await;
            // Not a revocation: a session AWS issued stays valid until it ends.
            return Err(format!(
                "not revoked: STS sessions cannot be revoked before they end, and stay valid \
                 at AWS until then; {} cached session of this sandbox dropped, so its next \
                 request after a release assumes the role anew (deny sessions issued before \
                 now with aws:TokenIssueTime at the role to end them)",
                usize::from(dropped)
            ));
        }
        self.revoke(name).await
    }

    /// Whether credential `name` holds leases from a secret store (revoked when the last
    /// sandbox using it goes).
    pub fn holds_leases(&self, name: &str) -> bool {
        self.credentials
            .get(name)
            .is_some_and(|c| matches!(&c.source, Source::Vault(v) if v.is_lease()))
    }

    /// Drops what is held for sandbox `sandbox` alone (it detached): its cached STS
    /// sessions, so that a sandbox given the same name later never gets them. How many
    /// sessions were dropped.
    pub async fn forget_sandbox(&self, sandbox: &str) -> usize {
        let mut dropped = 0;
        for credential in self.credentials.values() {
            if let Source::Aws(sts) = &credential.source {
                dropped += usize::from(sts.forget_sandbox(sandbox).await);
            }
        }
        dropped
    }

    /// Revokes credential `name`'s live value: the value the daemon holds (a cached
    /// command output or installation token, which is dropped so the next use fetches a
    /// new one; a file's or variable's current value). A `github_app` token is revoked
    /// with the API; a `revoke` command, if configured, then gets the value on standard
    /// input. A `vault` lease is revoked at the store (a KV secret is only dropped from the
    /// cache). Returns what was done, or why it failed; neither ever contains the value.
    pub async fn revoke(&self, name: &str) -> Result<String, String> {
        let credential = self
            .credentials
            .get(name)
            .ok_or_else(|| format!("no credential named {name:?}"))?;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let live: Option<Arc<Secret>> = match &credential.source {
            Source::Vault(v) => {
                let (value, outcome) = v.revoke().await;
                match outcome {
                    Ok(how) => done.push(how),
                    Err(why) => failed.push(why),
                }
                value
            }
            Source::GithubApp(app) => app.take_token().await,
            Source::Aws(a) => {
                let n = a.forget().await;
                return Ok(format!(
                    "{n} STS session(s) dropped from the cache (STS sessions cannot be revoked \
                     before they end; new requests get new sessions)"
                ));
            }
            Source::Command(cmd) => cmd.cache.lock().await.take().map(|c| c.value),
            Source::Env { value, .. } => Some(value.clone()),
            Source::File(_) => Some(credential.value().await.map_err(|e| e.to_string())?),
        };
        let Some(value) = live else {
            return if failed.is_empty() {
                Ok("no live value held; nothing to revoke".to_owned())
            } else {
                Err(failed.join("; "))
            };
        };
        // Never sent again from now, whether or not the revocation below succeeds: it was
        // revoked because it may be exposed.
        {
            let mut revoked = credential.revoked.lock().unwrap_or_else(|p| p.into_inner());
            if !revoked.iter().any(|old| old.expose() == value.expose()) {
                if revoked.len() >= REVOKED_KEPT {
                    revoked.remove(0);
                }
                revoked.push(value.clone());
            }
        }
        if let Source::GithubApp(app) = &credential.source {
            match app.revoke(&value).await {
                Ok(how) => done.push(how),
                Err(why) => failed.push(why),
            }
        }
        if let Some(cmd) = &credential.revoke {
            match cmd.run(&value).await {
                Ok(how) => done.push(how),
                Err(why) => failed.push(why),
            }
        }
        if failed.is_empty() {
            Ok(done.join("; "))
        } else {
            Err(failed.join("; "))
        }
    }

    /// Test hook: a shorter command (and token mint) timeout.
    #[cfg(test)]
    pub(crate) fn set_command_timeout(&mut self, timeout: Duration) {
        for c in self.credentials.values_mut() {
            match &mut c.source {
                Source::Command(cmd) => cmd.timeout = timeout,
                Source::GithubApp(app) => app.timeout = timeout,
                Source::Vault(v) => v.timeout = timeout,
                Source::Aws(a) => a.timeout = timeout,
                _ => {}
            }
        }
    }

    /// Test hook: check `file` sources more (or less) often than every second.
    #[cfg(test)]
    pub(crate) fn set_file_check_interval(&mut self, every: Duration) {
        for c in self.credentials.values_mut() {
            if let Source::File(file) = &mut c.source {
                file.set_check_interval(every);
            }
        }
    }

    /// Test hook: how many times credential `name`'s file was checked, and read.
    #[cfg(test)]
    pub(crate) fn file_counts(&self, name: &str) -> Option<(usize, usize)> {
        match &self.credentials.get(name)?.source {
            Source::File(file) => Some(file.counts()),
            _ => None,
        }
    }
}

impl Credential {
    fn sends_to(&self, host: &str) -> bool {
        if is_normalized(host) {
            self.hosts.contains(host)
        } else {
            self.hosts.contains(&normalize_host(host))
        }
    }

    fn source_kind(&self) -> &'static str {
        match &self.source {
            Source::File(_) => "file",
            Source::Env { .. } => "env",
            Source::Command(_) => "command",
            Source::GithubApp(_) => "github_app",
            Source::Vault(_) => "vault",
            Source::Aws(_) => "sts_assume_role",
        }
    }

    /// How long the current value is still used, when that is known. Never waits.
    fn expires_in(&self) -> Option<Duration> {
        match &self.source {
            Source::Command(cmd) => cmd.cache.try_lock().ok().and_then(|cache| {
                cache
                    .as_ref()
                    .map(|cached| cmd.ttl.saturating_sub(cached.fetched.elapsed()))
            }),
            Source::GithubApp(app) => app.stats().2,
            Source::Vault(v) => v.expires_in(),
            // One session per sandbox: each record names its own session's end.
            Source::File(_) | Source::Env { .. } | Source::Aws(_) => None,
        }
    }

    /// [`Self::value`], noting when a new value came and the last error; a value revoked
    /// at a quarantine is refused until the source gives another.
    async fn fetch(&self) -> Result<Arc<Secret>, CredentialError> {
        let result = self.value().await.and_then(|value| {
            let revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            if revoked.iter().any(|old| old.expose() == value.expose()) {
                return Err(CredentialError::Revoked {
                    credential: self.name.clone(),
                });
            }
            Ok(value)
        });
        self.last.note(result.as_ref().map_err(ToString::to_string));
        result
    }

    /// The value read ahead of any request: a Vault KV secret read as such, any other
    /// source's current value. Its outcome is noted, so `egressctl credentials` shows it as it shows a request's;
    /// an error comes as its text.
    async fn read_ahead_value(&self) -> Result<Arc<Secret>, String> {
        let read = match &self.source {
            Source::Vault(v) => Box::pin(v.read_ahead()).await,
            _ => self.value().await,
        }
        .map_err(|e| e.to_string());
        self.last.note(read.as_ref().map_err(Clone::clone));
        read
    }

    async fn value(&self) -> Result<Arc<Secret>, CredentialError> {
        match &self.source {
            Source::Env { value, .. } => Ok(value.clone()),
            Source::File(file) => {
                let read_err = |source| CredentialError::Read {
                    credential: self.name.clone(),
                    path: file.path().to_owned(),
                    source,
                };
                let value = file
                    .value(MAX_SECRET_BYTES, |bytes| self.file_secret(bytes), read_err)
                    .await;
                if value.is_err() {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                }
                value
            }
            Source::Command(cmd) => {
                let mut cache = cmd.cache.lock().await;
                if let Some(cached) = cache.as_ref() {
                    if cached.fetched.elapsed() < cmd.ttl {
                        return Ok(cached.value.clone());
                    }
                }
                let value = self.run(cmd).await;
                let counter = if value.is_ok() {
                    &self.fetches
                } else {
                    &self.failures
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let value = Arc::new(value?);
                *cache = Some(Cached {
                    value: value.clone(),
                    fetched: Instant::now(),
                });
                Ok(value)
            }
            // Boxed: these fetch over HTTPS (a future of several KiB), which every
            // request's future would otherwise make room for, whatever its source.
            Source::GithubApp(app) => Box::pin(app.token()).await,
            Source::Vault(v) => {
                let value = Box::pin(v.value()).await;
                if value.is_err() {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                }
                value
            }
            Source::Aws(_) => Err(CredentialError::Aws {
                credential: self.name.clone(),
                reason: "an sts_assume_role source has no single value; it signs requests"
                    .to_owned(),
            }),
        }
    }

    /// A secret file's contents as the secret: UTF-8, one trailing newline (LF or CRLF)
    /// removed, checked.
    fn file_secret(&self, mut bytes: Zeroizing<Vec<u8>>) -> Result<Secret, CredentialError> {
        let mut text = self.to_text(&mut bytes)?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        self.check(&text)?;
        Ok(Secret::new(std::mem::take(&mut *text)))
    }

    async fn run(&self, cmd: &CommandSource) -> Result<Secret, CredentialError> {
        let program = cmd.argv.first().cloned().unwrap_or_default();
        let fail = |reason: String| CredentialError::Command {
            credential: self.name.clone(),
            program: program.clone(),
            reason,
        };
        let mut command = tokio::process::Command::new(&program);
        super::child_env::without_secrets(&mut command);
        let mut child = command
            .args(cmd.argv.iter().skip(1))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // The program's diagnostics could echo the secret; they are not kept.
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot start: {e}")))?;
        let stdout = child.stdout.take();
        let collect = async {
            let mut bytes = Zeroizing::new(Vec::new());
            if let Some(out) = stdout {
                out.take(MAX_SECRET_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|e| fail(format!("reading its output: {e}")))?;
            }
            let status = child
                .wait()
                .await
                .map_err(|e| fail(format!("waiting for it: {e}")))?;
            Ok::<_, CredentialError>((bytes, status))
        };
        let (mut bytes, status) = match tokio::time::timeout(cmd.timeout, collect).await {
            Ok(result) => result?,
            // Dropping `collect` drops the child, which kills it (kill_on_drop).
            Err(_) => {
                return Err(fail(format!(
                    "did not finish within {} s and was killed",
                    cmd.timeout.as_secs_f32()
                )))
            }
        };
        if !status.success() {
            return Err(fail(format!("exited with {status}")));
        }
        let text = self.to_text(&mut bytes)?;
        let trimmed = text.trim();
        self.check(trimmed)?;
        Ok(Secret::new(trimmed.to_owned()))
    }

    fn to_text(
        &self,
        bytes: &mut Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<String>, CredentialError> {
        if bytes.len() as u64 > MAX_SECRET_BYTES {
            return Err(self.invalid("is larger than 64 KiB"));
        }
        let owned = std::mem::take(&mut **bytes);
        match String::from_utf8(owned) {
            Ok(s) => Ok(Zeroizing::new(s)),
            Err(e) => {
                // Put the bytes back so that they are zeroed with `bytes`.
                **bytes = e.into_bytes();
                Err(self.invalid("is not valid UTF-8"))
            }
        }
    }

    fn check(&self, value: &str) -> Result<(), CredentialError> {
        check_value(value).map_err(|reason| self.invalid(reason))
    }

    fn invalid(&self, reason: &'static str) -> CredentialError {
        CredentialError::InvalidValue {
            credential: self.name.clone(),
            reason,
        }
    }
}

/// Refuses values that would split or corrupt a header. Returns the reason, never the
/// value.
pub(super) fn check_value(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("is empty");
    }
    if value.contains(['\r', '\n', '\0']) {
        return Err("contains CR, LF or NUL");
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err("contains a control character");
    }
    Ok(())
}

fn compile(
    name: &str,
    raw: &RawCredential,
    upstream: &UpstreamOptions,
) -> Result<Credential, CredentialError> {
    let config = |field: &'static str, reason: String| CredentialError::Config {
        credential: name.to_owned(),
        field,
        reason,
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(config(
            "name",
            "a credential name is non-empty and uses only letters, digits, `-`, `_` and `.`"
                .to_owned(),
        ));
    }

    let source = match &raw.source {
        RawSource::File(path) => {
            if !path.is_absolute() {
                return Err(config(
                    "source.file",
                    format!("{} is not an absolute path", path.display()),
                ));
            }
            Source::File(FileSource::new(path.clone()))
        }
        RawSource::Env(var) => {
            super::child_env::note_secret_var(var);
            let value = std::env::var(var).map_err(|_| CredentialError::EnvMissing {
                credential: name.to_owned(),
                var: var.clone(),
            })?;
            let value = Secret::new(value);
            check_value(value.expose()).map_err(|reason| CredentialError::InvalidValue {
                credential: name.to_owned(),
                reason,
            })?;
            Source::Env {
                var: var.clone(),
                value: Arc::new(value),
            }
        }
        RawSource::Command(cmd) => {
            let Some(program) = cmd.argv.first() else {
                return Err(config(
                    "source.command.argv",
                    "needs at least the program to run".to_owned(),
                ));
            };
            if !std::path::Path::new(program).is_absolute() {
                return Err(config(
                    "source.command.argv",
                    format!(
                        "program `{program}` must be an absolute path (no PATH lookup, no shell)"
                    ),
                ));
            }
            Source::Command(CommandSource {
                argv: cmd.argv.clone(),
                ttl: Duration::from_secs(cmd.ttl),
                timeout: COMMAND_TIMEOUT,
                cache: tokio::sync::Mutex::new(None),
            })
        }
        RawSource::GithubApp(app) => Source::GithubApp(GithubApp::compile(name, app, upstream)?),
        RawSource::Vault(v) => Source::Vault(Vault::compile(name, v)?),
        RawSource::StsAssumeRole(r) => Source::Aws(AwsSts::compile(name, r, upstream)?),
    };

    let inject = match &raw.inject.aws_sigv4 {
        Some(aws) => compile_aws_inject(&raw.inject, aws),
        None => compile_inject(&raw.inject),
    }
    .map_err(|(field, reason)| config(field, reason))?;
    match (&source, &inject) {
        (Source::Aws(_), Inject::AwsSigv4 { .. }) => {}
        (Source::Aws(_), _) => {
            return Err(config(
                "inject",
                "an sts_assume_role source needs inject: { aws_sigv4: { service, region } }"
                    .to_owned(),
            ))
        }
        (_, Inject::AwsSigv4 { .. }) => {
            return Err(config(
                "source",
                "inject: aws_sigv4 needs an { sts_assume_role: {...} } source".to_owned(),
            ))
        }
        _ => {}
    }

    if raw.hosts.is_empty() {
        return Err(config(
            "hosts",
            "must list at least one server name the credential may be sent to".to_owned(),
        ));
    }
    let mut hosts = BTreeSet::new();
    for host in &raw.hosts {
        let normalized = normalize_host(host);
        let valid = !normalized.is_empty()
            && normalized.len() <= 253
            && normalized
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid {
            return Err(config(
                "hosts",
                format!(
                    "`{host}` is not an exact host name (letters, digits, `-`, `_`, `.`; no \
                     wildcards, ports or schemes)"
                ),
            ));
        }
        hosts.insert(normalized);
    }

    // An STS session is per sandbox and cannot be revoked by its value: a `revoke`
    // command would never run. Said at start (a configuration that loaded before still
    // does), and quarantine's record says what it did instead (cached sessions dropped).
    let revoke_applies = !matches!(source, Source::Aws(_));
    if raw.revoke.is_some() && !revoke_applies {
        tracing::warn!(
            credential = name,
            "credentials.{name}.revoke: an sts_assume_role source's sessions cannot be revoked \
             by value, so this command is never run (quarantine drops the cached sessions; \
             AWS's aws:TokenIssueTime deny policy revokes issued ones at the role); remove it"
        );
    }
    let revoke = raw
        .revoke
        .as_ref()
        .filter(|_| revoke_applies)
        .map(|r| RevokeCommand::compile(name, r))
        .transpose()?;

    Ok(Credential {
        name: name.to_owned(),
        source,
        inject,
        hosts,
        header: HeaderCache::default(),
        fetches: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        revoke,
        last: LastFetch::default(),
        revoked: std::sync::Mutex::default(),
        noted_login: AtomicU64::new(0),
    })
}

fn compile_inject(raw: &RawInject) -> Result<Inject, (&'static str, String)> {
    if let Some(inject) = super::state::compile_query_or_placeholder(raw)? {
        return Ok(match inject {
            super::state::OtherInject::Query(param) => Inject::Query { param },
            super::state::OtherInject::Placeholder(scope) => Inject::Placeholder(scope),
        });
    }
    match (&raw.header, &raw.format, &raw.basic) {
        (Some(header), format, None) => {
            let name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                (
                    "inject.header",
                    format!("`{header}` is not a valid HTTP header name"),
                )
            })?;
            if FORBIDDEN_HEADERS.contains(&name.as_str()) || name.as_str().starts_with(':') {
                return Err((
                    "inject.header",
                    format!(
                        "`{header}` frames or routes the request and cannot carry a credential"
                    ),
                ));
            }
            let format = format.as_deref().unwrap_or("{}");
            let mut parts = format.split("{}");
            let (Some(prefix), Some(suffix), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err((
                    "inject.format",
                    format!("`{format}` must contain `{{}}` (the secret) exactly once"),
                ));
            };
            let fixed = format!("{prefix}{suffix}");
            if check_value(&format!("{fixed}x")).is_err() || HeaderValue::from_str(&fixed).is_err()
            {
                return Err((
                    "inject.format",
                    format!("`{format}` contains characters not allowed in a header value"),
                ));
            }
            Ok(Inject::Header {
                name,
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
            })
        }
        (None, None, Some(basic)) => {
            if basic.user.contains(':') || check_value(&basic.user).is_err() {
                return Err((
                    "inject.basic.user",
                    "must be non-empty, without `:` or control characters".to_owned(),
                ));
            }
            Ok(Inject::Basic {
                user: basic.user.clone(),
            })
        }
        (None, Some(_), None) => Err((
            "inject.format",
            "`format` needs `header`, e.g. { header: Authorization, format: \"Bearer {}\" }"
                .to_owned(),
        )),
        (None, None, None) => Err((
            "inject",
            "needs one of { header: NAME, format: \"...{}...\" }, { basic: { user: NAME } }, \
             { query: { param: NAME } } or { placeholder: {} }"
                .to_owned(),
        )),
        (_, _, Some(_)) => Err((
            "inject",
            "`basic` cannot be combined with `header` or `format`".to_owned(),
        )),
    }
}

fn compile_aws_inject(
    raw: &RawInject,
    aws: &super::raw::RawAwsSigv4,
) -> Result<Inject, (&'static str, String)> {
    if raw.header.is_some()
        || raw.format.is_some()
        || raw.basic.is_some()
        || raw.query.is_some()
        || raw.placeholder.is_some()
    {
        return Err((
            "inject",
            "give one injection form: `aws_sigv4` cannot be combined with `header`, \
             `format`, `basic`, `query` or `placeholder`"
                .to_owned(),
        ));
    }
    let word = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if !word(&aws.service) {
        return Err((
            "inject.aws_sigv4.service",
            format!("`{}` is not a signing name such as s3", aws.service),
        ));
    }
    // Only S3's operations are judged (method, path, sub-resources and headers, see
    // `sigv4::s3`); another service's operation travels in `X-Amz-Target` or the body.
    if aws.service != "s3" {
        return Err((
            "inject.aws_sigv4.service",
            format!(
                "`{}` is not supported: only `s3` is signed, because the operations of other \
                 services (in X-Amz-Target or an Action= body) cannot be judged by the rules yet",
                aws.service
            ),
        ));
    }
    if !word(&aws.region) {
        return Err((
            "inject.aws_sigv4.region",
            format!("`{}` is not a region such as us-east-1", aws.region),
        ));
    }
    Ok(Inject::AwsSigv4 {
        service: aws.service.clone(),
        region: aws.region.clone(),
    })
}
