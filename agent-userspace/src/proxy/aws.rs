//! Requests on a rule whose credential is `aws_sigv4`: the sandbox's signing is stripped,
//! presigned URLs and unsignable payloads are refused, the sandbox's STS session is
//! fetched, and the request the proxy forwards is signed (see
//! [`crate::credentials::sigv4`]).

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, StatusCode};

use super::error::ProxyError;
use crate::audit::ProxyVerdict as Verdict;
use crate::credentials::sigv4::{self, Payload};
use crate::credentials::{AwsSession, CredentialStore};

/// What signs one forwarded request.
pub(super) struct AwsSigning {
    session: Arc<AwsSession>,
    service: String,
    region: String,
    payload: Payload,
}

/// Why the request is answered by the proxy.
pub(super) struct AwsRefusal {
    pub status: StatusCode,
    pub verdict: Verdict,
    pub reason: String,
    /// What the sandbox is told instead of `reason` (which may name the endpoint).
    pub body: Option<String>,
}

impl AwsRefusal {
    fn deny(status: StatusCode, reason: String) -> Self {
        Self {
            status,
            verdict: Verdict::Deny,
            reason,
            body: None,
        }
    }
}

impl AwsSigning {
    /// When the session ends, for the audit record.
    pub(super) fn expires(&self) -> std::time::SystemTime {
        self.session.expiration().into()
    }

    /// Signs the request as forwarded.
    pub(super) fn sign(
        &self,
        method: &str,
        authority: &str,
        path_and_query: &str,
        headers: &mut HeaderMap,
    ) -> Result<(), String> {
        sigv4::sign(
            method,
            authority,
            path_and_query,
            headers,
            &self.session,
            &self.service,
            &self.region,
            &self.payload,
            SystemTime::now(),
        )
    }
}

/// Strips the sandbox's signing from `headers` and gets what signs the request, or
/// refuses it. `target` is the judged request target; `None` when `host` is not one of
/// the credential's hosts (the request then goes unsigned, as other credentials go
/// without their header).
#[expect(
    clippy::too_many_arguments,
    reason = "the request's parts, taken apart"
)]
pub(super) async fn prepare(
    store: &CredentialStore,
    name: &str,
    (service, region): (&str, &str),
    sandbox: &str,
    host: &str,
    target: &str,
    headers: &mut HeaderMap,
    has_body: bool,
) -> Result<Option<AwsSigning>, AwsRefusal> {
    let query = target.split_once('?').map(|(_, q)| q);
    if let Some(key) = sigv4::presigned_key(query) {
        return Err(AwsRefusal::deny(
            StatusCode::FORBIDDEN,
            format!(
                "presigned AWS request refused (query key {key}): the proxy signs requests \
                 itself with credential `{name}`"
            ),
        ));
    }
    // Only S3 is signed (the credential store accepts no other service): an operation
    // is its method and path, which the rules judged, plus the sub-resources and
    // headers refused here.
    if let Some(reason) = sigv4::s3::refused_query_key(query) {
        return Err(AwsRefusal::deny(StatusCode::FORBIDDEN, reason));
    }
    let payload = sigv4::strip(headers, has_body, service)
        .map_err(|reason| AwsRefusal::deny(StatusCode::BAD_REQUEST, reason))?;
    if let Some(reason) = sigv4::s3::refused_header(headers) {
        return Err(AwsRefusal::deny(StatusCode::FORBIDDEN, reason));
    }
    match store.aws_session(name, sandbox, host).await {
        Ok(None) => Ok(None),
        Ok(Some(session)) => Ok(Some(AwsSigning {
            session,
            service: service.to_owned(),
            region: region.to_owned(),
            payload,
        })),
        Err(e) => Err(AwsRefusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            verdict: Verdict::Deny,
            reason: ProxyError::from(e).to_string(),
            body: Some(format!(
                "proxy: credential `{name}` is unavailable; see the egress audit log\n"
            )),
        }),
    }
}
