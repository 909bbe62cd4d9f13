//! The `github_app` source: short-lived GitHub App installation tokens.
//!
//! The daemon holds the App's private key; sandboxes never see it nor the tokens. To
//! mint a token it signs a JWT (RS256, `iat` a minute in the past to allow for clock
//! drift, `exp` nine minutes ahead, `iss` the App id) and POSTs it to
//! `{api_url}/app/installations/{id}/access_tokens`, optionally narrowing the token to
//! some repositories and permissions. The token is cached and renewed when less than
//! five minutes (or half its life, if it lives shorter) remain; concurrent callers wait
//! for one mint. A failed renewal keeps using the current token until it expires.
//!
//! The token endpoint is reached over HTTPS with the daemon's upstream trust (system
//! roots plus `proxy.upstream_ca`) and from its upstream network namespace, when the
//! daemon passes them in [`UpstreamOptions`]. Host names are resolved with the
//! daemon's own resolver.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::PrivateKeyDer;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::time::Instant;
use tracing::{debug, warn};
use zeroize::Zeroizing;

use super::error::CredentialError;
use super::https::{Client, Server};
use super::raw::RawGithubApp;
use super::secret::Secret;
use crate::net::{tls::client_config, UpstreamOptions};

/// The default `api_url`.
pub const GITHUB_API_URL: &str = "https://api.github.com";
/// How long one mint (connect, TLS, request, response) may take.
pub const MINT_TIMEOUT: Duration = Duration::from_secs(15);
/// Renew when less than this is left (or half the token's life, if shorter).
const RENEW_MARGIN: Duration = Duration::from_secs(5 * 60);
/// After a failed renewal, callers use the current token without retrying for this long.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Largest token endpoint response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Largest private key file read.
const MAX_KEY_BYTES: u64 = 64 * 1024;

/// A configured GitHub App source, with its token cache.
pub(super) struct GithubApp {
    credential: String,
    app_id: u64,
    installation_id: u64,
    key_path: PathBuf,
    endpoint: Endpoint,
    /// The JSON request body (repositories and permissions; no secret).
    request_body: String,
    /// HTTPS to the API (the proxy's upstream trust and dialer).
    client: Client,
    pub(super) timeout: Duration,
    /// Held across a mint, so that concurrent callers share it.
    cache: tokio::sync::Mutex<Cache>,
    /// Tokens minted, and mints that failed (metrics).
    mints: std::sync::atomic::AtomicU64,
    failures: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Cache {
    token: Option<Token>,
    /// Set after a failed renewal: no new attempt before then.
    retry_at: Option<Instant>,
}

struct Token {
    value: Arc<Secret>,
    renew_at: Instant,
    expires: Instant,
}

#[derive(Debug, Clone)]
struct Endpoint {
    /// `/app/installations/{id}/access_tokens`, below any path prefix of `api_url`.
    path: String,
    url: String,
    /// `/installation/token` (DELETE revokes the token it is called with).
    revoke_path: String,
    revoke_url: String,
}

impl fmt::Debug for GithubApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubApp")
            .field("app_id", &self.app_id)
            .field("installation_id", &self.installation_id)
            .field("private_key", &self.key_path)
            .field("endpoint", &self.endpoint.url)
            .finish_non_exhaustive()
    }
}

impl GithubApp {
    /// Checks the configuration and that the private key is a usable RSA key.
    pub(super) fn compile(
        credential: &str,
        raw: &RawGithubApp,
        upstream: &UpstreamOptions,
    ) -> Result<Self, CredentialError> {
        let config = |field: &'static str, reason: String| CredentialError::Config {
            credential: credential.to_owned(),
            field,
            reason,
        };
        if raw.app_id == 0 {
            return Err(config(
                "source.github_app.app_id",
                "must be the App's numeric id (App settings, \"App ID\")".to_owned(),
            ));
        }
        if raw.installation_id == 0 {
            return Err(config(
                "source.github_app.installation_id",
                "must be the numeric id of the App's installation on the account".to_owned(),
            ));
        }
        if !raw.private_key.is_absolute() {
            return Err(config(
                "source.github_app.private_key",
                format!("{} is not an absolute path", raw.private_key.display()),
            ));
        }
        let bytes = read_key_file(&raw.private_key).map_err(|reason| {
            config(
                "source.github_app.private_key",
                format!("{}: {reason}", raw.private_key.display()),
            )
        })?;
        parse_key(&bytes).map_err(|reason| {
            config(
                "source.github_app.private_key",
                format!("{}: {reason}", raw.private_key.display()),
            )
        })?;

        let endpoint = endpoint(&raw.api_url, raw.installation_id)
            .map_err(|reason| config("source.github_app.api_url", reason))?;

        if raw.repositories.len() > 500 {
            return Err(config(
                "source.github_app.repositories",
                "GitHub accepts at most 500 repositories per token".to_owned(),
            ));
        }
        for repo in &raw.repositories {
            let valid = !repo.is_empty()
                && repo.len() <= 100
                && repo
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !valid {
                return Err(config(
                    "source.github_app.repositories",
                    format!(
                        "`{repo}` is not a repository name (just the name, without the owner: \
                         letters, digits, `_`, `.`, `-`)"
                    ),
                ));
            }
        }
        for (name, level) in &raw.permissions {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                return Err(config(
                    "source.github_app.permissions",
                    format!("`{name}` is not a GitHub App permission name (e.g. contents)"),
                ));
            }
            if !matches!(level.as_str(), "read" | "write" | "admin") {
                return Err(config(
                    "source.github_app.permissions",
                    format!("{name}: `{level}` is not one of read, write, admin"),
                ));
            }
        }
        let mut body = serde_json::Map::new();
        if !raw.repositories.is_empty() {
            body.insert("repositories".to_owned(), raw.repositories.clone().into());
        }
        if !raw.permissions.is_empty() {
            let permissions: serde_json::Map<String, serde_json::Value> = raw
                .permissions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect();
            body.insert("permissions".to_owned(), permissions.into());
        }
        let request_body = serde_json::Value::Object(body).to_string();

        let tls = match &upstream.tls {
            Some(tls) => tls.clone(),
            None => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                client_config(provider, None)
                    .map_err(|e| config("source.github_app", format!("TLS client setup: {e}")))?
            }
        };
        let server = Server::parse(&raw.api_url)
            .map_err(|reason| config("source.github_app.api_url", reason))?;
        let client = Client::new(server, &tls, upstream.dialer.clone()).with_deadline(MINT_TIMEOUT);

        // Allowed, as GitHub allows it, but not what a reader of "scoped tokens" expects.
        let unnarrowed = match (raw.repositories.is_empty(), raw.permissions.is_empty()) {
            (true, true) => {
                Some("every repository of the installation, with every permission the App has")
            }
            (true, false) => Some("every repository of the installation"),
            (false, true) => Some("every permission the App has"),
            (false, false) => None,
        };
        if let Some(reach) = unnarrowed {
            warn!(
                credential,
                "GitHub App tokens are not narrowed: each reaches {reach}; list \
                 `repositories` and `permissions` to limit them"
            );
        }
        Ok(Self {
            credential: credential.to_owned(),
            app_id: raw.app_id,
            installation_id: raw.installation_id,
            key_path: raw.private_key.clone(),
            endpoint,
            request_body,
            client,
            timeout: MINT_TIMEOUT,
            cache: tokio::sync::Mutex::new(Cache::default()),
            mints: Default::default(),
            failures: Default::default(),
        })
    }

    /// A valid installation token: the cached one, or a new one.
    pub(super) async fn token(&self) -> Result<Arc<Secret>, CredentialError> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let current = cache.token.as_ref().filter(|t| now < t.expires);
        if let Some(token) = current {
            let waiting = cache.retry_at.is_some_and(|at| now < at);
            if now < token.renew_at || waiting {
                return Ok(token.value.clone());
            }
        }
        let minted = match tokio::time::timeout(self.timeout, self.mint()).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer from {} within {} s",
                self.endpoint.url,
                self.timeout.as_secs()
            )),
        };
        let counter = if minted.is_ok() {
            &self.mints
        } else {
            &self.failures
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match minted {
            Ok(token) => {
                let value = token.value.clone();
                cache.token = Some(token);
                cache.retry_at = None;
                Ok(value)
            }
            Err(reason) => {
                // The attempt may have taken up to its timeout: a token that ended
                // meanwhile is not sent.
                let now = Instant::now();
                if let Some(token) = cache.token.as_ref().filter(|t| now < t.expires) {
                    warn!(credential = %self.credential, %reason, "Could not renew the GitHub App token; using the current one until it expires");
                    let value = token.value.clone();
                    cache.retry_at = Some(now + RETRY_AFTER);
                    return Ok(value);
                }
                Err(CredentialError::GithubApp {
                    credential: self.credential.clone(),
                    reason,
                })
            }
        }
    }

    /// Tokens minted, failed mints, and how long the current token is still valid (`None`
    /// without one, or while a mint holds the cache).
    pub(super) fn stats(&self) -> (u64, u64, Option<Duration>) {
        let left = self.cache.try_lock().ok().and_then(|cache| {
            let now = Instant::now();
            cache
                .token
                .as_ref()
                .filter(|t| now < t.expires)
                .map(|t| t.expires - now)
        });
        (
            self.mints.load(std::sync::atomic::Ordering::Relaxed),
            self.failures.load(std::sync::atomic::Ordering::Relaxed),
            left,
        )
    }

    /// Signs a JWT and asks the token endpoint for an installation token.
    async fn mint(&self) -> Result<Token, String> {
        let key_bytes = tokio::task::spawn_blocking({
            let path = self.key_path.clone();
            move || read_key_file(&path)
        })
        .await
        .map_err(|_| "reading the private key: task failed".to_owned())?
        .map_err(|reason| format!("private key {}: {reason}", self.key_path.display()))?;
        let key = parse_key(&key_bytes)
            .map_err(|reason| format!("private key {}: {reason}", self.key_path.display()))?;
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_owned())?
            .as_secs();
        let jwt = sign_jwt(&key, self.app_id, wall)?;
        drop(key);

        let started = Instant::now();
        let (status, body) = self.post(&jwt).await?;
        drop(jwt);
        if status != StatusCode::CREATED && status != StatusCode::OK {
            return Err(format!(
                "{} answered {status}{}",
                self.endpoint.url,
                github_message(&body)
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ));
        }
        #[derive(Deserialize)]
        struct Answer {
            token: String,
            expires_at: String,
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|_| {
            format!(
                "{} did not answer a JSON object with `token` and `expires_at`",
                self.endpoint.url
            )
        })?;
        let value = Secret::new(answer.token);
        super::store::check_value(value.expose())
            .map_err(|why| format!("the token {why} (value not shown)"))?;
        let expires_at = OffsetDateTime::parse(&answer.expires_at, &Rfc3339).map_err(|_| {
            format!(
                "expires_at {:?} is not an RFC 3339 time",
                answer.expires_at.chars().take(40).collect::<String>()
            )
        })?;
        let life = expires_at - OffsetDateTime::now_utc();
        let life = Duration::try_from(life)
            .ok()
            .filter(|l| !l.is_zero())
            .ok_or_else(|| {
                format!(
                    "the token expired at {} already by the local clock (is the clock right?)",
                    answer.expires_at
                )
            })?;
        let margin = RENEW_MARGIN.min(life / 2);
        debug!(credential = %self.credential, life_secs = life.as_secs(), "Minted a GitHub App installation token");
        Ok(Token {
            value: Arc::new(value),
            renew_at: started + (life - margin),
            expires: started + life,
        })
    }

    /// Takes the cached installation token out of the cache (the next use mints a new
    /// one), if one is still valid.
    pub(super) async fn take_token(&self) -> Option<Arc<Secret>> {
        let mut cache = self.cache.lock().await;
        let token = cache.token.take()?;
        (Instant::now() < token.expires).then_some(token.value)
    }

    /// Revokes an installation token: `DELETE {api_url}/installation/token`, authorised
    /// by the token itself; GitHub answers 204.
    pub(super) async fn revoke(&self, token: &Secret) -> Result<String, String> {
        let mut bearer = Zeroizing::new(String::from("Bearer "));
        bearer.push_str(token.expose());
        let call = self.request(
            Method::DELETE,
            &self.endpoint.revoke_path,
            &self.endpoint.revoke_url,
            &bearer,
            None,
        );
        let (status, body) = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(format!(
                    "no answer from {} within {} s",
                    self.endpoint.revoke_url,
                    self.timeout.as_secs()
                ))
            }
        };
        if status != StatusCode::NO_CONTENT {
            return Err(format!(
                "DELETE {} answered {status}{}",
                self.endpoint.revoke_url,
                github_message(&body)
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ));
        }
        debug!(credential = %self.credential, "Revoked a GitHub App installation token");
        Ok(format!(
            "installation token revoked (DELETE {} answered {status})",
            self.endpoint.revoke_url
        ))
    }

    /// One HTTPS POST to the token endpoint over a new connection. Returns the status and
    /// up to [`MAX_RESPONSE_BYTES`] of the body.
    async fn post(&self, jwt: &str) -> Result<(StatusCode, Zeroizing<Vec<u8>>), String> {
        let mut bearer = Zeroizing::new(String::from("Bearer "));
        bearer.push_str(jwt);
        let ep = &self.endpoint;
        self.request(
            Method::POST,
            &ep.path,
            &ep.url,
            &bearer,
            Some(self.request_body.clone()),
        )
        .await
    }

    /// One HTTPS request to the API over a new connection, with `authorization`. Returns
    /// the status and up to [`MAX_RESPONSE_BYTES`] of the body.
    async fn request(
        &self,
        method: Method,
        path: &str,
        url: &str,
        authorization: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), String> {
        let mut authorization = HeaderValue::from_str(authorization)
            .map_err(|_| "the authorization is not a valid header value".to_owned())?;
        authorization.set_sensitive(true);
        let headers = vec![
            (AUTHORIZATION, authorization),
            (
                ACCEPT,
                HeaderValue::from_static("application/vnd.github+json"),
            ),
            (
                HeaderName::from_static("x-github-api-version"),
                HeaderValue::from_static("2022-11-28"),
            ),
        ];
        let (status, bytes) = self
            .client
            .call(
                method,
                path,
                headers,
                body.map(|b| Zeroizing::new(b.into_bytes())),
            )
            .await?;
        if bytes.len() > MAX_RESPONSE_BYTES {
            return Err(format!(
                "the answer of {url} is larger than {MAX_RESPONSE_BYTES} bytes"
            ));
        }
        Ok((status, bytes))
    }
}

/// Parses `api_url` and builds the token endpoint of installation `id`.
fn endpoint(api_url: &str, id: u64) -> Result<Endpoint, String> {
    let uri: Uri = api_url
        .parse()
        .map_err(|_| format!("`{api_url}` is not a URL such as {GITHUB_API_URL}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("`{api_url}` must be an https:// URL"));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("`{api_url}` has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!("`{api_url}` must not carry user information"));
    }
    if uri.query().is_some() {
        return Err(format!("`{api_url}` must not carry a query"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(Endpoint {
        path: format!("/app/installations/{id}/access_tokens"),
        url: format!("https://{authority}{prefix}/app/installations/{id}/access_tokens"),
        revoke_path: "/installation/token".to_owned(),
        revoke_url: format!("https://{authority}{prefix}/installation/token"),
    })
}

fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_KEY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_KEY_BYTES {
        return Err("is larger than 64 KiB; is it a private key?".to_owned());
    }
    Ok(bytes)
}

/// The RSA key in a PEM file: PKCS#1 (`BEGIN RSA PRIVATE KEY`, what GitHub hands out)
/// or PKCS#8 (`BEGIN PRIVATE KEY`). Errors never quote the file.
fn parse_key(pem: &[u8]) -> Result<RsaKeyPair, String> {
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
        "holds no PEM private key (expected a PEM block of type `RSA PRIVATE KEY`, as \
         GitHub issues it, or `PRIVATE KEY`)"
            .to_owned()
    })?;
    let key = match &der {
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        _ => return Err("holds a private key that is not RSA".to_owned()),
    };
    key.map_err(|e| match e.to_string().as_str() {
        "WrongAlgorithm" => "holds a private key that is not RSA".to_owned(),
        why => format!("holds an RSA key that cannot sign RS256: {why}"),
    })
}

/// `header.claims.signature`, RS256, valid from a minute ago for ten minutes (GitHub's
/// maximum), issued by the App.
fn sign_jwt(key: &RsaKeyPair, app_id: u64, now: u64) -> Result<Zeroizing<String>, String> {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"iat":{},"exp":{},"iss":{app_id}}}"#,
        now.saturating_sub(60),
        now + 540
    ));
    let mut jwt = Zeroizing::new(format!("{header}.{claims}"));
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        jwt.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "signing the JWT failed".to_owned())?;
    jwt.push('.');
    URL_SAFE_NO_PAD.encode_string(&signature, &mut jwt);
    Ok(jwt)
}

/// GitHub's `message` from an error answer, on one line and cut short.
fn github_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Error {
        message: String,
    }
    let error: Error = serde_json::from_slice(body).ok()?;
    let message: String = error
        .message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    Some(message)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests;
