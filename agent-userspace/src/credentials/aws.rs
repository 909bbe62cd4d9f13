//! The `sts_assume_role` source: AWS session credentials from STS `AssumeRole`, one session
//! per (credential, sandbox), used by the proxy to re-sign each request with SigV4.
//!
//! The daemon's own AWS key (the one allowed to assume the role) comes from a file (the AWS
//! shared-credentials format, or plain `aws_access_key_id = ...` lines) or from the
//! daemon's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`), read again for every `AssumeRole` so a rotated key takes effect.
//! The session is named after the sandbox (`session_name`, default `{sandbox}`), so the
//! provider's own logs (CloudTrail) say which sandbox acted, and may be narrowed by an
//! inline session policy and tagged.
//!
//! A session is renewed when a third of its time is left. A failed `AssumeRole` refuses
//! the request with a reason naming the endpoint, the role and STS's error code, never a
//! key; a session still valid is used until it ends meanwhile, and the next attempt comes
//! at most a second later, so recovery is automatic.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::error::CredentialError;
use super::https::{Client, Server};
use super::raw::RawStsAssumeRole;
use super::secret::Secret;
use crate::net::UpstreamOptions;

/// How long one `AssumeRole` exchange may take.
pub const STS_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failure, no new attempt for this long (requests are refused meanwhile).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Largest credentials file read.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// The STS API version the form names.
const STS_VERSION: &str = "2011-06-15";

/// One sandbox's STS session: what signs its requests.
pub struct Session {
    pub access_key_id: String,
    pub secret_access_key: Arc<Secret>,
    pub session_token: Arc<Secret>,
    /// When STS says the session ends (for audit records).
    pub expiration: time::OffsetDateTime,
    expires: Instant,
    renew_at: Instant,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Credentials for the signer. (They copy the values into the signer's own type.)
    pub(crate) fn signing_identity(&self) -> aws_smithy_runtime_api::client::identity::Identity {
        Credentials::new(
            self.access_key_id.clone(),
            self.secret_access_key.expose().to_owned(),
            Some(self.session_token.expose().to_owned()),
            None,
            "egressd-sts",
        )
        .into()
    }

    /// A session with these values, ending in 15 minutes.
    #[cfg(test)]
    pub(crate) fn for_test(access_key_id: &str, secret: &str, token: &str) -> Self {
        let now = Instant::now();
        Self {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: Arc::new(Secret::new(secret.to_owned())),
            session_token: Arc::new(Secret::new(token.to_owned())),
            expiration: time::OffsetDateTime::now_utc() + Duration::from_secs(900),
            expires: now + Duration::from_secs(900),
            renew_at: now + Duration::from_secs(600),
        }
    }

    /// When the session ends.
    pub fn expiration(&self) -> time::OffsetDateTime {
        self.expiration
    }
}

/// A configured `sts_assume_role` source with its sessions.
pub(super) struct AwsSts {
    credential: String,
    client: Client,
    role_arn: String,
    duration: u32,
    session_name: String,
    session_policy: Option<String>,
    tags: BTreeMap<String, String>,
    region: String,
    base: Base,
    pub(super) timeout: Duration,
    /// Sessions by sandbox name; held across an `AssumeRole` so concurrent callers share one.
    sessions: tokio::sync::Mutex<HashMap<String, Slot>>,
    mints: AtomicU64,
    failures: AtomicU64,
    /// The base key's secret parts as last read to ask for a session.
    base_parts: std::sync::Mutex<Vec<Arc<Secret>>>,
    /// Times `base_parts` changed: the known secrets note them once per change.
    base_changes: AtomicU64,
}

enum Base {
    File { path: PathBuf, profile: String },
    Env,
}

#[derive(Default)]
struct Slot {
    session: Option<Arc<Session>>,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

impl fmt::Debug for AwsSts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSts")
            .field("credential", &self.credential)
            .field("endpoint", self.client.server())
            .field("role_arn", &self.role_arn)
            .finish_non_exhaustive()
    }
}

/// The daemon's own key, as read for one `AssumeRole`.
struct BaseKey {
    access_key_id: String,
    secret: Secret,
    token: Option<Secret>,
}

impl AwsSts {
    /// Checks the configuration; nothing is fetched until the first use.
    pub(super) fn compile(
        credential: &str,
        raw: &RawStsAssumeRole,
        upstream: &UpstreamOptions,
    ) -> Result<Self, CredentialError> {
        let config = |field: &'static str, reason: String| CredentialError::Config {
            credential: credential.to_owned(),
            field,
            reason,
        };
        if !raw.role_arn.starts_with("arn:") || raw.role_arn.split(':').count() < 6 {
            return Err(config(
                "source.sts_assume_role.role_arn",
                format!(
                    "`{}` is not a role ARN such as arn:aws:iam::123456789012:role/agent",
                    raw.role_arn
                ),
            ));
        }
        if !(900..=43_200).contains(&raw.duration) {
            return Err(config(
                "source.sts_assume_role.duration",
                format!("{} s is outside STS's 900..=43200 seconds", raw.duration),
            ));
        }
        let sample = session_name(&raw.session_name, credential, "sandbox-name");
        if !raw.session_name.contains("{sandbox}") || sample.len() < 2 {
            return Err(config(
                "source.sts_assume_role.session_name",
                format!(
                    "`{}` must contain {{sandbox}} (so the provider's logs name the sandbox)",
                    raw.session_name
                ),
            ));
        }
        let session_policy = match &raw.session_policy {
            None => None,
            Some(text) => {
                let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    config(
                        "source.sts_assume_role.session_policy",
                        format!("is not JSON: {e}"),
                    )
                })?;
                Some(value.to_string())
            }
        };
        if raw.tags.len() > 50
            || raw
                .tags
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 256)
        {
            return Err(config(
                "source.sts_assume_role.tags",
                "at most 50 tags, keys of 1..=128 and values of at most 256 characters".into(),
            ));
        }
        let region = raw.region.clone();
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(config(
                "source.sts_assume_role.region",
                format!("`{region}` is not a region name such as us-east-1"),
            ));
        }
        let endpoint = raw
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
        let server =
            Server::parse(&endpoint).map_err(|r| config("source.sts_assume_role.endpoint", r))?;
        let tls = match &upstream.tls {
            Some(tls) => (**tls).clone(),
            None => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let tls = crate::net::tls::client_config(provider, None)
                    .map_err(|e| config("source.sts_assume_role.endpoint", e.to_string()))?;
                (*tls).clone()
            }
        };
        let client = Client::new(server, &tls, upstream.dialer.clone()).with_deadline(STS_TIMEOUT);
        let base = match &raw.credentials_file {
            None => {
                // The base key is the daemon's alone: kept from the programs it runs.
                for var in super::child_env::AWS_KEY_VARS {
                    super::child_env::note_secret_var(var);
                }
                Base::Env
            }
            Some(file) => {
                if !file.is_absolute() {
                    return Err(config(
                        "source.sts_assume_role.credentials_file",
                        format!("{} is not an absolute path", file.display()),
                    ));
                }
                Base::File {
                    path: file.clone(),
                    profile: raw.profile.clone(),
                }
            }
        };
        if session_policy.is_none() {
            warn!(
                credential,
                role = raw.role_arn,
                "STS sessions are not narrowed by a `session_policy`: each has all of the \
                 role's rights"
            );
        }
        Ok(Self {
            credential: credential.to_owned(),
            client,
            role_arn: raw.role_arn.clone(),
            duration: raw.duration,
            session_name: raw.session_name.clone(),
            session_policy,
            tags: raw.tags.clone(),
            region,
            base,
            timeout: STS_TIMEOUT,
            sessions: tokio::sync::Mutex::new(HashMap::new()),
            mints: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            base_parts: std::sync::Mutex::new(Vec::new()),
            base_changes: AtomicU64::new(0),
        })
    }

    /// (sessions obtained, failed attempts).
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.mints.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// Drops every cached session (STS sessions cannot be revoked before they end).
    pub(super) async fn forget(&self) -> usize {
        let mut sessions = self.sessions.lock().await;
        let n = sessions.values().filter(|s| s.session.is_some()).count();
        sessions.clear();
        n
    }

    /// Drops sandbox `sandbox`'s cached session (it detached): a sandbox given the same
    /// name later gets a session of its own. Whether one was cached.
    pub(super) async fn forget_sandbox(&self, sandbox: &str) -> bool {
        self.sessions
            .lock()
            .await
            .remove(sandbox)
            .is_some_and(|s| s.session.is_some())
    }

    /// Sandbox `sandbox`'s session: cached while fresh, else a new `AssumeRole`.
    pub(super) async fn session(&self, sandbox: &str) -> Result<Arc<Session>, CredentialError> {
        let mut sessions = self.sessions.lock().await;
        let slot = sessions.entry(sandbox.to_owned()).or_default();
        let now = Instant::now();
        let valid = |s: &Arc<Session>| now + Duration::from_secs(30) < s.expires;
        if let Some(s) = slot.session.as_ref().filter(|s| now < s.renew_at) {
            return Ok(s.clone());
        }
        if slot.retry_at.is_some_and(|at| now < at) {
            if let Some(s) = slot.session.as_ref().filter(|s| valid(s)) {
                return Ok(s.clone());
            }
            return Err(self.error(
                slot.last_error
                    .clone()
                    .unwrap_or_else(|| "STS failed a moment ago".to_owned()),
            ));
        }
        let result = match tokio::time::timeout(self.timeout, self.assume_role(sandbox)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer from {} within {} s",
                self.client.server().url("/"),
                self.timeout.as_secs()
            )),
        };
        match result {
            Ok(session) => {
                self.mints.fetch_add(1, Ordering::Relaxed);
                info!(credential = %self.credential, sandbox, expiration = %session.expiration(), "New STS session");
                let session = Arc::new(session);
                slot.session = Some(session.clone());
                slot.retry_at = None;
                slot.last_error = None;
                Ok(session)
            }
            Err(reason) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                slot.retry_at = Some(now + RETRY_AFTER);
                slot.last_error = Some(reason.clone());
                if let Some(s) = slot.session.as_ref().filter(|s| valid(s)) {
                    warn!(credential = %self.credential, sandbox, %reason, "Could not renew the STS session; using the current one until it ends");
                    return Ok(s.clone());
                }
                Err(self.error(reason))
            }
        }
    }

    fn error(&self, reason: String) -> CredentialError {
        CredentialError::Aws {
            credential: self.credential.clone(),
            reason,
        }
    }

    async fn assume_role(&self, sandbox: &str) -> Result<Session, String> {
        let base = self.base_key()?;
        {
            let mut parts = self.base_parts.lock().unwrap_or_else(|p| p.into_inner());
            let same = parts.first().is_some_and(|s| **s == base.secret)
                && parts.get(1).map(|t| &**t) == base.token.as_ref();
            if !same {
                *parts = std::iter::once(base.secret.clone())
                    .chain(base.token.clone())
                    .map(Arc::new)
                    .collect();
                self.base_changes.fetch_add(1, Ordering::Release);
            }
        }
        let name = session_name(&self.session_name, &self.credential, sandbox);
        let mut pairs: Vec<(String, String)> = vec![
            ("Action".into(), "AssumeRole".into()),
            ("Version".into(), STS_VERSION.into()),
            ("RoleArn".into(), self.role_arn.clone()),
            ("RoleSessionName".into(), name),
            ("DurationSeconds".into(), self.duration.to_string()),
        ];
        if let Some(policy) = &self.session_policy {
            pairs.push(("Policy".into(), policy.clone()));
        }
        for (i, (k, v)) in self.tags.iter().enumerate() {
            pairs.push((format!("Tags.member.{}.Key", i + 1), k.clone()));
            pairs.push((
                format!("Tags.member.{}.Value", i + 1),
                v.replace("{sandbox}", sandbox),
            ));
        }
        let body = Zeroizing::new(form(&pairs).into_bytes());

        let server = self.client.server();
        let content_type = "application/x-www-form-urlencoded";
        let url = format!("https://{}{}/", server.authority(), server.prefix());
        let identity = Credentials::new(
            base.access_key_id.clone(),
            base.secret.expose().to_owned(),
            base.token.as_ref().map(|t| t.expose().to_owned()),
            None,
            "egressd-base",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("sts")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| format!("signing the AssumeRole request: {e}"))?;
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            [("host", server.authority()), ("content-type", content_type)].into_iter(),
            SignableBody::Bytes(&body),
        )
        .map_err(|e| format!("signing the AssumeRole request: {e}"))?;
        let (instructions, _) = sign(signable, &params.into())
            .map_err(|e| format!("signing the AssumeRole request: {e}"))?
            .into_parts();
        let mut headers = Vec::new();
        for (name, value) in instructions.headers() {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| "the signer made an invalid header name".to_owned())?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| "the signer made an invalid header value".to_owned())?;
            value.set_sensitive(true);
            headers.push((name, value));
        }
        let (status, answer) = self
            .client
            .call_as(Method::POST, "/", headers, Some(body), content_type)
            .await?;
        let text = std::str::from_utf8(&answer)
            .map_err(|_| format!("{url} answered {status} with a body that is not UTF-8"))?;
        if !status.is_success() {
            // `<ErrorResponse><Error>...` (STS), `<ErrorResponse><Errors><Error>...` or a
            // bare `<Error>` (emulations).
            let error = quick_xml::de::from_str::<ErrorResponse>(text)
                .map(|e| e.error)
                .or_else(|_| {
                    quick_xml::de::from_str::<ErrorsResponse>(text).map(|e| e.errors.error)
                })
                .or_else(|_| quick_xml::de::from_str::<StsError>(text));
            let why = match error {
                Ok(e) => format!("{}: {}", printable(&e.code), printable(&e.message)),
                // An error answer holds no secret; its start says what went wrong.
                Err(_) => format!("answer not understood: {}", printable(text)),
            };
            return Err(format!(
                "STS AssumeRole of {} at {url} answered {status}: {why}",
                self.role_arn
            ));
        }
        let parsed: AssumeRoleResponse = quick_xml::de::from_str(text)
            // Not the parser's words: they may quote the answer, whose values are secret.
            .map_err(|_| format!("the AssumeRole answer of {url} is not understood"))?;
        let c = parsed.assume_role_result.credentials;
        let expiration = time::OffsetDateTime::parse(
            c.expiration.trim(),
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|_| format!("the AssumeRole answer of {url} has no valid Expiration"))?;
        let secret = Secret::new(c.secret_access_key);
        let token = Secret::new(c.session_token);
        if super::store::check_value(secret.expose()).is_err()
            || super::store::check_value(token.expose()).is_err()
            || super::store::check_value(&c.access_key_id).is_err()
        {
            return Err(format!(
                "the AssumeRole answer of {url} holds an unusable key (not shown)"
            ));
        }
        let left = (expiration - time::OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        if left < Duration::from_secs(60) {
            return Err(format!(
                "the session STS issued ends in {} s; the clocks may disagree",
                left.as_secs()
            ));
        }
        let now = Instant::now();
        Ok(Session {
            access_key_id: c.access_key_id,
            secret_access_key: Arc::new(secret),
            session_token: Arc::new(token),
            expiration,
            expires: now + left,
            renew_at: now + left * 2 / 3,
        })
    }

    /// The base key's secret parts (the secret access key, and its session token if it
    /// has one) as last read to ask for a session: never sent by the proxy, masked like
    /// any secret.
    pub(super) fn base_secrets(&self) -> (u64, Vec<Arc<Secret>>) {
        let parts = self.base_parts.lock().unwrap_or_else(|p| p.into_inner());
        (self.base_changes.load(Ordering::Acquire), parts.clone())
    }

    /// Times the base key's parts changed (one load).
    pub(super) fn base_changes(&self) -> u64 {
        self.base_changes.load(Ordering::Acquire)
    }

    fn base_key(&self) -> Result<BaseKey, String> {
        match &self.base {
            Base::Env => {
                let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
                let (Some(id), Some(secret)) =
                    (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
                else {
                    return Err("the daemon's environment has no AWS_ACCESS_KEY_ID and \
                                AWS_SECRET_ACCESS_KEY"
                        .to_owned());
                };
                Ok(BaseKey {
                    access_key_id: id,
                    secret: Secret::new(secret),
                    token: var("AWS_SESSION_TOKEN").map(Secret::new),
                })
            }
            Base::File { path, profile } => read_key_file(path, profile),
        }
    }
}

/// `application/x-www-form-urlencoded`, every byte but letters, digits and `-_.~`
/// percent-encoded (space as `+`): the form AWS SDKs send, which servers that re-encode
/// the parsed form before checking its hash also arrive at.
fn form(pairs: &[(String, String)]) -> String {
    let encode = |s: &str, out: &mut String| {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    out.push(char::from(b));
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    };
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode(k, &mut out);
        out.push('=');
        encode(v, &mut out);
    }
    out
}

/// STS's error message as one line of printable ASCII, at most 200 characters.
fn printable(message: &str) -> String {
    message
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { ' ' })
        .take(200)
        .collect()
}

/// The session name for `sandbox`: the template with `{sandbox}` and `{credential}`
/// replaced, as it is when STS takes every character and it fits STS's 64. Otherwise the
/// characters STS refuses are turned into `-`, and a hash of the whole name follows what
/// fits, so that two sandboxes never share a session name (`k8s/team/a-x` and
/// `k8s/team-a/x` would both read `k8s-team-a-x`).
fn session_name(template: &str, credential: &str, sandbox: &str) -> String {
    const MAX: usize = 64;
    let name = template
        .replace("{sandbox}", sandbox)
        .replace("{credential}", credential);
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c);
    if name.len() <= MAX && name.chars().all(allowed) {
        return name;
    }
    let shown = name.chars().map(|c| if allowed(c) { c } else { '-' });
    crate::text::cut_with_digest(&name, shown, MAX, '-')
}

/// Reads the daemon's key from an AWS shared-credentials file (`[profile]` sections) or a
/// plain file of `key = value` lines (taken as the `default` profile).
fn read_key_file(path: &Path, profile: &str) -> Result<BaseKey, String> {
    use std::io::Read as _;
    let mut bytes = Zeroizing::new(Vec::new());
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE_BYTES).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read the AWS key file {}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("the AWS key file {} is not UTF-8", path.display()))?;
    parse_key_file(text, profile).map_err(|why| format!("{}: {why}", path.display()))
}

fn parse_key_file(text: &str, profile: &str) -> Result<BaseKey, String> {
    let mut section = "default".to_owned();
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().trim_start_matches("profile ").trim().to_owned();
            continue;
        }
        if section != profile {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(value.to_owned()),
            "aws_secret_access_key" => secret = Some(Secret::new(value.to_owned())),
            "aws_session_token" => token = Some(Secret::new(value.to_owned())),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret)) if !access_key_id.is_empty() => Ok(BaseKey {
            access_key_id,
            secret,
            token,
        }),
        _ => Err(format!(
            "profile `{profile}` has no aws_access_key_id and aws_secret_access_key"
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumeRoleResponse {
    assume_role_result: AssumeRoleResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumeRoleResult {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorResponse {
    error: StsError,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorsResponse {
    errors: ErrorResponse,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsError {
    code: String,
    #[serde(default)]
    message: String,
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn session_names_carry_the_sandbox_and_fit_sts() {
        assert_eq!(session_name("{sandbox}", "s3", "agent-1"), "agent-1");
        let mapped = session_name("egressd-{credential}-{sandbox}", "s3", "pod/ns:x y");
        assert!(mapped.starts_with("egressd-s3-pod-ns-x-y-"), "{mapped}");
        assert_eq!(mapped.len(), "egressd-s3-pod-ns-x-y-".len() + 12);
        // Names that map or cut alike stay apart.
        let a = session_name("{sandbox}", "c", "k8s/team/a-x");
        let b = session_name("{sandbox}", "c", "k8s/team-a/x");
        assert_ne!(a, b);
        let long = |last| session_name("{sandbox}", "c", &format!("{}{last}", "a".repeat(100)));
        assert_ne!(long('1'), long('2'));
        assert_eq!(long('1').len(), 64);
        for n in [a, b, long('1')] {
            assert!(n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)));
        }
    }

    #[test]
    fn key_files_in_both_forms() {
        let shared = "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s1\n\
                      [profile egress]\naws_access_key_id=AKIAEGRESS\naws_secret_access_key=s2\n\
                      aws_session_token = t2\n";
        let k = parse_key_file(shared, "egress").unwrap();
        assert_eq!(k.access_key_id, "AKIAEGRESS");
        assert_eq!(k.secret.expose(), "s2");
        assert_eq!(k.token.unwrap().expose(), "t2");
        let k = parse_key_file(shared, "default").unwrap();
        assert_eq!(k.access_key_id, "AKIADEFAULT");
        assert!(k.token.is_none());
        let plain =
            "# the daemon's key\naws_access_key_id = AKIAPLAIN\naws_secret_access_key = s3\n";
        assert_eq!(
            parse_key_file(plain, "default").unwrap().access_key_id,
            "AKIAPLAIN"
        );
        let err = parse_key_file(plain, "other").err().unwrap();
        assert!(err.contains("other") && !err.contains("s3"), "{err}");
    }

    #[test]
    fn sts_answers_are_parsed() {
        let ok = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/agent/sb</Arn>
      <AssumedRoleId>AROA:sb</AssumedRoleId></AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
      <SecretAccessKey>secret/key+value</SecretAccessKey>
      <SessionToken>FwoGZXIvYXdzE-token</SessionToken>
      <Expiration>2030-01-01T00:15:00Z</Expiration>
    </Credentials>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>r</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#;
        let r: AssumeRoleResponse = quick_xml::de::from_str(ok).unwrap();
        let c = r.assume_role_result.credentials;
        assert_eq!(c.access_key_id, "ASIAEXAMPLE");
        assert_eq!(c.secret_access_key, "secret/key+value");
        assert_eq!(c.session_token, "FwoGZXIvYXdzE-token");
        assert_eq!(c.expiration, "2030-01-01T00:15:00Z");
        let err = r#"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>
<Message>not authorized to perform sts:AssumeRole</Message></Error><RequestId>x</RequestId></ErrorResponse>"#;
        let e: ErrorResponse = quick_xml::de::from_str(err).unwrap();
        assert_eq!(e.error.code, "AccessDenied");
        assert!(e.error.message.contains("sts:AssumeRole"));
        let nested = "<ErrorResponse><Errors><Error><Code>SignatureDoesNotMatch</Code>\
                      <Message>m</Message></Error></Errors></ErrorResponse>";
        let e: ErrorsResponse = quick_xml::de::from_str(nested).unwrap();
        assert_eq!(e.errors.error.code, "SignatureDoesNotMatch");
        assert!(quick_xml::de::from_str::<ErrorResponse>(nested).is_err());
    }

    #[test]
    fn forms_encode_all_but_unreserved() {
        let pairs = [
            (
                "Policy".to_owned(),
                r#"{"Resource":"arn:aws:s3:::b/a/*"} x~"#.to_owned(),
            ),
            ("RoleSessionName".to_owned(), "sb".to_owned()),
        ];
        assert_eq!(
            form(&pairs),
            "Policy=%7B%22Resource%22%3A%22arn%3Aaws%3As3%3A%3A%3Ab%2Fa%2F%2A%22%7D+x~&RoleSessionName=sb"
        );
    }
}
