//! The `vault` source: secrets from an OpenBao or HashiCorp Vault server.
//!
//! The daemon logs in with its own identity (an AppRole, or a token from a file), keeps that
//! token renewed, and reads either
//! - a **KV version 2** secret (`kv: {mount, path, field}`): read again every `refresh`
//!   seconds, so a new version takes effect within that time; or
//! - a **lease** (`lease: {path, field}`): a dynamic secret (a secrets engine's lease, or a
//!   token from `auth/token/create/...`), renewed when a third of its time is left, a new one
//!   issued when renewal is refused, and revoked by [`Vault::revoke`].
//!
//! Failures refuse the request that needs the credential, with a reason that names the
//! server and path but never a token or secret; the next request tries again (at most once
//! a second), so recovery is automatic. The store is reached from the daemon's own network
//! namespace, over TLS verified against the system roots plus `ca_file` (plain `http://`
//! only to a loopback address).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use super::error::CredentialError;
use super::https::{Client, Server};
use super::raw::{RawVault, RawVaultAuth};
use super::secret::Secret;

/// How long one exchange with the store may take.
pub const VAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failure, no new attempt for this long (requests are refused meanwhile).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Largest role id / secret id / token file read.
const MAX_ID_BYTES: u64 = 8 * 1024;

/// A configured store source with its cache.
pub(super) struct Vault {
    credential: String,
    client: Client,
    auth: Auth,
    secret: SecretSpec,
    pub(super) timeout: Duration,
    /// Held across a fetch, so concurrent callers share one.
    state: tokio::sync::Mutex<State>,
    /// Logins made so far: a new one is a new token for the known secrets.
    logins: std::sync::atomic::AtomicU64,
}

enum Auth {
    Token(PathBuf),
    AppRole {
        mount: String,
        role_id: PathBuf,
        secret_id: PathBuf,
    },
}

enum SecretSpec {
    Kv {
        mount: String,
        path: String,
        field: String,
        refresh: Duration,
    },
    Lease {
        path: String,
        method: Method,
        field: Vec<String>,
    },
}

#[derive(Default)]
struct State {
    login: Option<Login>,
    value: Option<Held>,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

/// The daemon's own token.
struct Login {
    token: Secret,
    /// When to renew it (or log in again); `None`: it does not expire.
    renew_at: Option<Instant>,
    expires: Option<Instant>,
    renewable: bool,
}

/// The secret currently handed out.
struct Held {
    value: Arc<Secret>,
    /// KV: the version read; leases: 0.
    version: u64,
    /// When to read again (KV) or renew (lease).
    renew_at: Instant,
    /// When the value must no longer be used (a lease's end); KV: `None`.
    expires: Option<Instant>,
    lease: Option<Lease>,
}

/// How a dynamic secret is renewed and revoked.
enum Lease {
    /// A secrets engine's lease: `sys/leases/renew` and `sys/leases/revoke`.
    Id { id: String, renewable: bool },
    /// A token issued to the daemon for the sandbox: `auth/token/renew` and `revoke`.
    Token { renewable: bool },
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("credential", &self.credential)
            .field("server", self.client.server())
            .finish_non_exhaustive()
    }
}

/// The answer of a read, login or lease call (the parts we use).
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    lease_id: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
    #[serde(default)]
    auth: Option<AuthAnswer>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct AuthAnswer {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

impl Vault {
    /// Checks the configuration; nothing is fetched until the first use.
    pub(super) fn compile(credential: &str, raw: &RawVault) -> Result<Self, CredentialError> {
        let config = |field: &'static str, reason: String| CredentialError::Config {
            credential: credential.to_owned(),
            field,
            reason,
        };
        let server = Server::parse(&raw.address).map_err(|r| config("source.vault.address", r))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = crate::net::tls::client_config(provider, raw.ca_file.as_deref())
            .map_err(|e| config("source.vault.ca_file", e.to_string()))?;
        let client = Client::new(server, &tls, None).with_deadline(VAULT_TIMEOUT);

        let absolute = |field: &'static str, p: &Path| {
            if p.is_absolute() {
                Ok(p.to_path_buf())
            } else {
                Err(config(
                    field,
                    format!("{} is not an absolute path", p.display()),
                ))
            }
        };
        let auth = match &raw.auth {
            RawVaultAuth::TokenFile(p) => Auth::Token(absolute("source.vault.auth.token_file", p)?),
            RawVaultAuth::Approle(a) => Auth::AppRole {
                mount: checked_path(&a.mount)
                    .map_err(|r| config("source.vault.auth.approle.mount", r))?,
                role_id: absolute("source.vault.auth.approle.role_id_file", &a.role_id_file)?,
                secret_id: absolute(
                    "source.vault.auth.approle.secret_id_file",
                    &a.secret_id_file,
                )?,
            },
        };
        let secret = match (&raw.kv, &raw.lease) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(config(
                    "source.vault",
                    "needs exactly one of `kv:` (a KV version 2 secret) and `lease:` (a dynamic \
                     secret)"
                        .into(),
                ))
            }
            (Some(kv), None) => {
                if kv.field.is_empty() {
                    return Err(config("source.vault.kv.field", "must name a field".into()));
                }
                if kv.refresh == 0 {
                    return Err(config(
                        "source.vault.kv.refresh",
                        "must be at least 1 second".into(),
                    ));
                }
                SecretSpec::Kv {
                    mount: checked_path(&kv.mount)
                        .map_err(|r| config("source.vault.kv.mount", r))?,
                    path: checked_path(&kv.path).map_err(|r| config("source.vault.kv.path", r))?,
                    field: kv.field.clone(),
                    refresh: Duration::from_secs(kv.refresh),
                }
            }
            (None, Some(lease)) => {
                let method = match lease.method.to_ascii_uppercase().as_str() {
                    "GET" => Method::GET,
                    "POST" => Method::POST,
                    other => {
                        return Err(config(
                            "source.vault.lease.method",
                            format!("`{other}` is not GET or POST"),
                        ))
                    }
                };
                let field: Vec<String> = lease.field.split('.').map(str::to_owned).collect();
                if field.iter().any(String::is_empty) {
                    return Err(config(
                        "source.vault.lease.field",
                        format!(
                            "`{}` is not a dotted path into the answer such as data.password \
                             or auth.client_token",
                            lease.field
                        ),
                    ));
                }
                SecretSpec::Lease {
                    path: checked_path(&lease.path)
                        .map_err(|r| config("source.vault.lease.path", r))?,
                    method,
                    field,
                }
            }
        };
        Ok(Self {
            credential: credential.to_owned(),
            client,
            auth,
            secret,
            timeout: VAULT_TIMEOUT,
            state: tokio::sync::Mutex::new(State::default()),
            logins: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The value read ahead of any request (see `CredentialStore::prime`): as
    /// [`Vault::value`], but a failure leaves no backoff behind, so that the first request
    /// asks the store again itself (a secret stored after the daemon started is found).
    pub(super) async fn read_ahead(&self) -> Result<Arc<Secret>, CredentialError> {
        let result = self.value().await;
        if result.is_err() {
            self.state.lock().await.retry_at = None;
        }
        result
    }

    /// The current value: cached while fresh, else read, renewed or issued anew.
    pub(super) async fn value(&self) -> Result<Arc<Secret>, CredentialError> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(held) = &state.value {
            let usable = held.expires.is_none_or(|e| now < e);
            if usable && now < held.renew_at {
                return Ok(held.value.clone());
            }
        }
        if state.retry_at.is_some_and(|at| now < at) {
            // A lease still valid is used until its end while the store is away.
            if let Some(held) = state
                .value
                .as_ref()
                .filter(|h| h.expires.is_some_and(|e| now < e))
            {
                return Ok(held.value.clone());
            }
            return Err(self.error(
                state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the store failed a moment ago".to_owned()),
            ));
        }
        let refreshed = tokio::time::timeout(self.timeout, self.refresh(&mut state)).await;
        let result = match refreshed {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer from {} within {} s",
                self.client.server().url(""),
                self.timeout.as_secs()
            )),
        };
        match result {
            Ok(value) => {
                state.retry_at = None;
                state.last_error = None;
                Ok(value)
            }
            Err(reason) => {
                // The attempt may have taken up to its timeout: a lease that ended
                // meanwhile is not used.
                let now = Instant::now();
                state.retry_at = Some(now + RETRY_AFTER);
                state.last_error = Some(reason.clone());
                if let Some(held) = state
                    .value
                    .as_ref()
                    .filter(|h| h.expires.is_some_and(|e| now < e))
                {
                    warn!(credential = %self.credential, %reason, "Could not renew the lease; using the current secret until it ends");
                    return Ok(held.value.clone());
                }
                Err(self.error(reason))
            }
        }
    }

    /// Whether the source holds leases (which the store can revoke).
    pub(super) fn is_lease(&self) -> bool {
        matches!(self.secret, SecretSpec::Lease { .. })
    }

    /// Takes the value held (the next use reads or issues a new one) and, for a lease,
    /// revokes it at the store so it stops working at once. Returns the value taken, if
    /// any, and what was done or why it failed (never a value).
    pub(super) async fn revoke(&self) -> (Option<Arc<Secret>>, Result<String, String>) {
        let mut state = self.state.lock().await;
        let Some(held) = state.value.take() else {
            return (None, Ok("no live value held".to_owned()));
        };
        let Some(lease) = held.lease else {
            return (
                Some(held.value),
                Ok("a KV secret is not revocable at the store; dropped from the cache".to_owned()),
            );
        };
        let token = match self.login_token(&mut state).await {
            Ok(t) => t,
            Err(why) => return (Some(held.value), Err(why)),
        };
        let (path, body) = match &lease {
            Lease::Id { id, .. } => (
                "/v1/sys/leases/revoke",
                json_body(&one_field("lease_id", id)),
            ),
            Lease::Token { .. } => (
                "/v1/auth/token/revoke",
                json_body(&one_field("token", held.value.expose())),
            ),
        };
        let outcome = match body {
            Err(why) => Err(why),
            Ok(body) => match self.call(Method::PUT, path, Some(&token), Some(body)).await {
                Ok((status, _)) if status.is_success() => {
                    info!(credential = %self.credential, "Revoked the credential's lease at the store");
                    Ok(format!(
                        "lease revoked at {}",
                        self.client.server().url(path)
                    ))
                }
                Ok((status, answer)) => Err(format!(
                    "{} answered {status} to the revocation{}",
                    self.client.server().url(path),
                    store_message(&answer)
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )),
                Err(why) => Err(why),
            },
        };
        (Some(held.value), outcome)
    }

    fn error(&self, reason: String) -> CredentialError {
        CredentialError::Vault {
            credential: self.credential.clone(),
            reason,
        }
    }

    async fn refresh(&self, state: &mut State) -> Result<Arc<Secret>, String> {
        // A lease that is due for renewal is renewed rather than replaced.
        if let Some(held) = &state.value {
            if let Some(lease) = &held.lease {
                let now = Instant::now();
                if held.expires.is_some_and(|e| now < e) && lease.renewable() {
                    match self.renew_lease(state).await {
                        Ok(()) => {
                            if let Some(h) = &state.value {
                                return Ok(h.value.clone());
                            }
                        }
                        Err(reason) => {
                            debug!(credential = %self.credential, %reason, "Lease renewal refused; issuing a new one")
                        }
                    }
                }
            }
        }
        let token = self.login_token(state).await?;
        let held = match self.read_or_issue(&token).await {
            Ok(held) => held,
            // The store refused the daemon's token (revoked, or its policy changed): log
            // in again at once rather than keep a dead token until it would expire.
            Err(e) if e.forbidden && state.login.as_ref().is_some_and(|l| l.token == token) => {
                info!(credential = %self.credential, "The store refused the daemon's token; logging in again");
                state.login = None;
                let token = self.login_token(state).await?;
                self.read_or_issue(&token).await.map_err(|e| e.reason)?
            }
            Err(e) => return Err(e.reason),
        };
        if let Some(old) = &state.value {
            if old.version != held.version && held.lease.is_none() {
                info!(credential = %self.credential, from = old.version, to = held.version, "A new version of the secret is in use");
            }
        }
        let value = held.value.clone();
        state.value = Some(held);
        Ok(value)
    }

    async fn read_or_issue(&self, token: &Secret) -> Result<Held, StoreError> {
        match &self.secret {
            SecretSpec::Kv {
                mount,
                path,
                field,
                refresh,
            } => self.read_kv(token, mount, path, field, *refresh).await,
            SecretSpec::Lease {
                path,
                method,
                field,
            } => self.issue_lease(token, path, method, field).await,
        }
    }

    /// How long the value held is still used: a lease's end, a KV secret's next read.
    /// `None` when nothing is held or the state is busy. Never waits.
    pub(super) fn expires_in(&self) -> Option<Duration> {
        let state = self.state.try_lock().ok()?;
        let held = state.value.as_ref()?;
        let now = Instant::now();
        Some(
            held.expires
                .unwrap_or(held.renew_at)
                .saturating_duration_since(now),
        )
    }

    /// What `egressctl credentials` shows of the source: the KV version or the lease held,
    /// and the last failure. Never a value or token. Never waits.
    pub(super) fn detail(&self) -> Option<String> {
        let state = self.state.try_lock().ok()?;
        let held = match (&state.value, &self.secret) {
            (Some(held), SecretSpec::Kv { mount, path, .. }) => {
                format!("kv {mount}/{path} version {}", held.version)
            }
            (Some(held), SecretSpec::Lease { path, .. }) => format!(
                "lease from {path}{}",
                match &held.lease {
                    Some(Lease::Id { renewable, .. } | Lease::Token { renewable })
                        if *renewable =>
                        " (renewable)",
                    _ => "",
                }
            ),
            (None, _) => "no value held".to_owned(),
        };
        Some(held)
    }

    /// The daemon's own token, if it holds one now (and is not fetching), with the number
    /// of logins it came from: never sent by the proxy, masked like any secret.
    pub(super) fn daemon_token(&self) -> Option<(u64, Secret)> {
        let state = self.state.try_lock().ok()?;
        let logins = self.logins.load(std::sync::atomic::Ordering::Acquire);
        state.login.as_ref().map(|l| (logins, l.token.clone()))
    }

    /// Logins made so far.
    pub(super) fn logins(&self) -> u64 {
        self.logins.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The daemon's token: the cached one, renewed when due, or a new login.
    async fn login_token(&self, state: &mut State) -> Result<Secret, String> {
        let now = Instant::now();
        if let Some(login) = &state.login {
            let valid = login.expires.is_none_or(|e| now < e);
            let due = login.renew_at.is_some_and(|r| now >= r);
            if valid && !due {
                return Ok(login.token.clone());
            }
            if valid && login.renewable {
                let token = login.token.clone();
                match self
                    .call(
                        Method::POST,
                        "/v1/auth/token/renew-self",
                        Some(&token),
                        None,
                    )
                    .await
                {
                    Ok((status, body)) if status.is_success() => {
                        let answer: Answer = parse(&body)?;
                        if let Some(auth) = answer.auth {
                            state.login = Some(login_from(token.clone(), &auth, now));
                            return Ok(token);
                        }
                    }
                    Ok((status, _)) => {
                        debug!(credential = %self.credential, %status, "The store refused to renew the daemon's token; logging in again")
                    }
                    Err(reason) => return Err(reason),
                }
            }
        }
        let login = self.login(now).await?;
        let token = login.token.clone();
        state.login = Some(login);
        self.logins
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(token)
    }

    async fn login(&self, now: Instant) -> Result<Login, String> {
        match &self.auth {
            Auth::Token(path) => {
                let token = Secret::new(read_id(path)?.as_str().to_owned());
                // The token's own time to live, so it is renewed before it ends.
                let (status, body) = self
                    .call(
                        Method::GET,
                        "/v1/auth/token/lookup-self",
                        Some(&token),
                        None,
                    )
                    .await?;
                if !status.is_success() {
                    return Err(format!(
                        "{} answered {status}: the token in {} is not valid",
                        self.client.server().url("/v1/auth/token/lookup-self"),
                        path.display()
                    ));
                }
                #[derive(Deserialize)]
                struct Lookup {
                    data: LookupData,
                }
                #[derive(Deserialize)]
                struct LookupData {
                    #[serde(default)]
                    ttl: u64,
                    #[serde(default)]
                    renewable: bool,
                }
                let lookup: Lookup = parse(&body)?;
                Ok(login_from(
                    token,
                    &AuthAnswer {
                        client_token: String::new(),
                        lease_duration: lookup.data.ttl,
                        renewable: lookup.data.renewable,
                    },
                    now,
                ))
            }
            Auth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let (role, secret) = (read_id(role_id)?, read_id(secret_id)?);
                let body = json_body(&std::collections::BTreeMap::from([
                    ("role_id", role.as_str()),
                    ("secret_id", secret.as_str()),
                ]))?;
                drop((role, secret));
                let path = format!("/v1/auth/{mount}/login");
                let (status, answer) = self.call(Method::POST, &path, None, Some(body)).await?;
                if !status.is_success() {
                    return Err(format!(
                        "{} answered {status}{}",
                        self.client.server().url(&path),
                        store_message(&answer)
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ));
                }
                let answer: Answer = parse(&answer)?;
                let auth = answer.auth.ok_or_else(|| {
                    format!("{} answered no token", self.client.server().url(&path))
                })?;
                let token = Secret::new(auth.client_token.clone());
                debug!(credential = %self.credential, ttl = auth.lease_duration, "Logged in to the secret store with the AppRole");
                Ok(login_from(token, &auth, now))
            }
        }
    }

    async fn read_kv(
        &self,
        token: &Secret,
        mount: &str,
        path: &str,
        field: &str,
        refresh: Duration,
    ) -> Result<Held, StoreError> {
        let url_path = format!("/v1/{mount}/data/{path}");
        let url = self.client.server().url(&url_path);
        let started = Instant::now();
        let (status, body) = self.call(Method::GET, &url_path, Some(token), None).await?;
        if !status.is_success() {
            return Err(StoreError::answered(&url, status, &body));
        }
        let answer: Answer = parse(&body)?;
        let data = answer.data.unwrap_or(Value::Null);
        let version = data
            .pointer("/metadata/version")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let value = data
            .pointer("/data")
            .and_then(|d| d.get(field))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                format!("{url} has no string field `{field}` (is it a KV version 2 secret?)")
            })?;
        let value = Secret::new(value.to_owned());
        super::store::check_value(value.expose())
            .map_err(|why| format!("field `{field}` of {url} {why} (value not shown)"))?;
        Ok(Held {
            value: Arc::new(value),
            version,
            renew_at: started + refresh,
            expires: None,
            lease: None,
        })
    }

    async fn issue_lease(
        &self,
        token: &Secret,
        path: &str,
        method: &Method,
        field: &[String],
    ) -> Result<Held, StoreError> {
        let url_path = format!("/v1/{path}");
        let url = self.client.server().url(&url_path);
        let started = Instant::now();
        let body = (method == Method::POST).then(|| Zeroizing::new(b"{}".to_vec()));
        let (status, answer) = self
            .call(method.clone(), &url_path, Some(token), body)
            .await?;
        if !status.is_success() {
            return Err(StoreError::answered(&url, status, &answer));
        }
        let json: Value = serde_json::from_slice(&answer)
            .map_err(|_| format!("{url} did not answer a JSON object"))?;
        let mut at = &json;
        for key in field {
            at = at
                .get(key)
                .ok_or_else(|| format!("{url}: the answer has no `{}`", field.join(".")))?;
        }
        let value = at
            .as_str()
            .ok_or_else(|| format!("{url}: `{}` is not a string", field.join(".")))?;
        let value = Secret::new(value.to_owned());
        super::store::check_value(value.expose())
            .map_err(|why| format!("`{}` of {url} {why} (value not shown)", field.join(".")))?;
        let parsed: Answer =
            serde_json::from_value(json).map_err(|_| format!("{url} did not answer a lease"))?;
        let (lease, duration) = if !parsed.lease_id.is_empty() {
            (
                Lease::Id {
                    id: parsed.lease_id,
                    renewable: parsed.renewable,
                },
                parsed.lease_duration,
            )
        } else if let Some(auth) = &parsed.auth {
            (
                Lease::Token {
                    renewable: auth.renewable,
                },
                auth.lease_duration,
            )
        } else {
            return Err(format!(
                "{url} answered no lease (neither lease_id nor auth); use `kv:` for static secrets"
            )
            .into());
        };
        if duration == 0 {
            return Err(format!("{url} answered a lease of 0 seconds").into());
        }
        let life = Duration::from_secs(duration);
        debug!(credential = %self.credential, life_secs = duration, "Issued a new lease");
        Ok(Held {
            value: Arc::new(value),
            version: 0,
            renew_at: started + life * 2 / 3,
            expires: Some(started + life),
            lease: Some(lease),
        })
    }

    /// Renews the held lease in place.
    async fn renew_lease(&self, state: &mut State) -> Result<(), String> {
        let token = self.login_token(state).await?;
        let Some(held) = state.value.as_mut() else {
            return Err("nothing to renew".to_owned());
        };
        let Some(lease) = &held.lease else {
            return Err("not a lease".to_owned());
        };
        let started = Instant::now();
        let (path, body) = match lease {
            Lease::Id { id, .. } => (
                "/v1/sys/leases/renew",
                json_body(&one_field("lease_id", id))?,
            ),
            Lease::Token { .. } => (
                "/v1/auth/token/renew",
                json_body(&one_field("token", held.value.expose()))?,
            ),
        };
        let (status, answer) = self
            .call(Method::PUT, path, Some(&token), Some(body))
            .await?;
        if !status.is_success() {
            return Err(format!(
                "{} answered {status}",
                self.client.server().url(path)
            ));
        }
        let answer: Answer = parse(&answer)?;
        let duration = answer
            .auth
            .as_ref()
            .map_or(answer.lease_duration, |a| a.lease_duration);
        // A renewal that no longer extends the lease (its maximum reached) is refused, so
        // a new lease is issued before this one ends.
        let remaining = held
            .expires
            .map_or(Duration::ZERO, |e| e.saturating_duration_since(started));
        if duration == 0 || Duration::from_secs(duration) <= remaining / 2 {
            return Err("the lease is at its maximum time to live".to_owned());
        }
        let life = Duration::from_secs(duration);
        held.renew_at = started + life * 2 / 3;
        held.expires = Some(started + life);
        debug!(credential = %self.credential, life_secs = duration, "Renewed the lease");
        Ok(())
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&Secret>,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), String> {
        let mut headers = Vec::new();
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(token.expose())
                .map_err(|_| "the store token is not a valid header value".to_owned())?;
            value.set_sensitive(true);
            headers.push((HeaderName::from_static("x-vault-token"), value));
        }
        headers.push((
            HeaderName::from_static("x-vault-request"),
            HeaderValue::from_static("true"),
        ));
        self.client.call(method, path, headers, body).await
    }
}

/// A failed read or issue: why, and whether the store refused the daemon's token.
struct StoreError {
    reason: String,
    forbidden: bool,
}

impl From<String> for StoreError {
    fn from(reason: String) -> Self {
        Self {
            reason,
            forbidden: false,
        }
    }
}

impl StoreError {
    fn answered(url: &str, status: StatusCode, body: &[u8]) -> Self {
        Self {
            reason: format!(
                "{url} answered {status}{}",
                store_message(body)
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
            forbidden: status == StatusCode::FORBIDDEN,
        }
    }
}

impl Lease {
    fn renewable(&self) -> bool {
        match self {
            Self::Id { renewable, .. } | Self::Token { renewable } => *renewable,
        }
    }
}

fn login_from(token: Secret, auth: &AuthAnswer, now: Instant) -> Login {
    let (renew_at, expires) = if auth.lease_duration == 0 {
        (None, None)
    } else {
        let life = Duration::from_secs(auth.lease_duration);
        (Some(now + life * 2 / 3), Some(now + life))
    };
    Login {
        token,
        renew_at,
        expires,
        renewable: auth.renewable,
    }
}

/// A JSON request body in a buffer that is wiped when dropped (bodies carry secret ids
/// and lease tokens).
fn json_body(value: &impl serde::Serialize) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut buf = Zeroizing::new(Vec::with_capacity(128));
    serde_json::to_writer(&mut *buf, value).map_err(|e| format!("encoding the request: {e}"))?;
    Ok(buf)
}

/// `{"<key>": "<value>"}`.
fn one_field<'a>(key: &'a str, value: &'a str) -> std::collections::BTreeMap<&'a str, &'a str> {
    std::collections::BTreeMap::from([(key, value)])
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body)
        .map_err(|_| "the store did not answer the expected JSON".to_owned())
}

/// The store's own error messages (`{"errors": [...]}`), which never quote secrets.
fn store_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<String>,
    }
    let errors: Errors = serde_json::from_slice(body).ok()?;
    let text = errors.errors.join("; ");
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    (!text.is_empty()).then_some(text)
}

/// A role id, secret id or token from a file: one trailing newline removed.
fn read_id(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_ID_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_ID_BYTES {
        return Err(format!(
            "{} is larger than {MAX_ID_BYTES} bytes",
            path.display()
        ));
    }
    let text =
        std::str::from_utf8(&bytes).map_err(|_| format!("{} is not UTF-8", path.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() || text.chars().any(char::is_control) {
        return Err(format!(
            "{} is empty or holds a control character",
            path.display()
        ));
    }
    Ok(Zeroizing::new(text.to_owned()))
}

/// A mount or path inside the store's API: segments of letters, digits and `-_.+@`,
/// no empty, `.` or `..` segment, so what is configured is the path requested.
fn checked_path(p: &str) -> Result<String, String> {
    let p = p.trim_matches('/');
    let ok = !p.is_empty()
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '@'))
        });
    if ok {
        Ok(p.to_owned())
    } else {
        Err(format!(
            "`{p}` is not a store path (segments of letters, digits, `-_.+@`, no `.` or `..`)"
        ))
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn store_paths_are_checked_once() {
        assert_eq!(checked_path("/secret/").unwrap(), "secret");
        assert_eq!(checked_path("agent/github").unwrap(), "agent/github");
        for bad in [
            "", "/", "a//b", "a/../b", "a/./b", "a/b?x", "a/b#c", "a/%2e%2e", "a b",
        ] {
            assert!(checked_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn store_messages_are_bounded_and_clean() {
        let m = store_message(br#"{"errors":["permission denied","line\nbreak"]}"#).unwrap();
        assert_eq!(m, "permission denied; linebreak");
        assert!(store_message(b"not json").is_none());
    }

    #[test]
    fn ids_are_read_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id");
        std::fs::write(&p, "abc-123\n").unwrap();
        assert_eq!(read_id(&p).unwrap().as_str(), "abc-123");
        std::fs::write(&p, "").unwrap();
        assert!(read_id(&p).is_err());
        std::fs::write(&p, "a\nb").unwrap();
        assert!(read_id(&p).is_err());
    }
}
