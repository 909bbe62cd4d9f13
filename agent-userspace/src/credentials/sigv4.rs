//! Re-signing a forwarded request with AWS Signature Version 4 (`inject: { aws_sigv4 }`).
//!
//! The sandbox signs with dummy keys, or not at all. The proxy removes every signing
//! header it sent ([`strip`]), refuses presigned URLs ([`presigned_key`]: a signature in
//! the query would be forwarded as the sandbox wrote it), and signs exactly the request it
//! forwards ([`sign`]) with the sandbox's STS session, using the `aws-sigv4` crate. Signed
//! headers are `host`, `content-type`, `content-md5` and every `x-amz-*` header, of
//! which only an allowlist is accepted ([`s3::refused_header`]), as only ordinary S3
//! query keys are ([`s3::refused_query_key`]).
//!
//! The payload hash ([`Payload`]) follows what the sandbox's client declared in
//! `X-Amz-Content-Sha256`:
//! - a hex SHA-256: signed as is (the server checks it against the body it receives);
//! - `STREAMING-UNSIGNED-PAYLOAD-TRAILER` (aws-chunked with a checksum trailer, as recent
//!   SDKs and the CLI send uploads): signed as such, the chunked body forwarded unchanged
//!   (its chunks carry no signatures);
//! - `UNSIGNED-PAYLOAD`, none, or anything else: `UNSIGNED-PAYLOAD` (S3 only), or the
//!   empty body's hash when the request has no body;
//! - a copy (`X-Amz-Copy-Source`, an object the rules never saw): refused;
//! - signed aws-chunked forms (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]`,
//!   `STREAMING-AWS4-ECDSA-...`): refused, because each chunk carries a signature chained
//!   from the sandbox's dummy key that no server would accept and the proxy does not
//!   re-sign chunk by chunk.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign as sigv4_sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
    SigningSettings, UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::aws::Session;

pub mod s3;

/// The headers a sandbox's own signature travels in; removed from every request on an
/// `aws_sigv4` rule.
pub const SIGNING_HEADERS: [&str; 4] = [
    "authorization",
    "x-amz-security-token",
    "x-amz-date",
    "x-amz-content-sha256",
];

/// The SHA-256 of an empty body.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// What the signature says about the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// No body: the empty hash.
    Empty,
    /// `UNSIGNED-PAYLOAD` (S3).
    Unsigned,
    /// The body's SHA-256 as the sandbox's client declared it.
    Precomputed(String),
    /// `STREAMING-UNSIGNED-PAYLOAD-TRAILER`: aws-chunked, unsigned chunks and trailer.
    StreamingUnsignedTrailer,
}

impl Payload {
    /// How the payload appears in an audit record.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Unsigned => "UNSIGNED-PAYLOAD",
            Self::Precomputed(_) => "sha256",
            Self::StreamingUnsignedTrailer => "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        }
    }
}

/// The query key that makes `query` a presigned request (`X-Amz-Signature`,
/// `X-Amz-Credential`, any other `X-Amz-*`, or SigV2's `AWSAccessKeyId` / `Signature`),
/// if any. The query is the judged, normalised one (unreserved characters decoded).
pub fn presigned_key(query: Option<&str>) -> Option<String> {
    let query = query?;
    query
        .split('&')
        .map(|pair| pair.split_once('=').map_or(pair, |(k, _)| k))
        .find(|key| {
            let lower = key.to_ascii_lowercase();
            lower.starts_with("x-amz-") || lower == "awsaccesskeyid" || lower == "signature"
        })
        .map(str::to_owned)
}

/// Removes the sandbox's signing headers and says how the body is to be signed, or why
/// the request cannot be signed (never quoting a header value).
pub fn strip(headers: &mut HeaderMap, has_body: bool, service: &str) -> Result<Payload, String> {
    // CopyObject / UploadPartCopy read a second object, named in a header that no rule
    // judges: refused rather than signed.
    if headers.contains_key("x-amz-copy-source") {
        return Err(
            "X-Amz-Copy-Source names an object the policy's rules do not judge; copies are \
             refused"
                .to_owned(),
        );
    }
    let mut values = headers.get_all("x-amz-content-sha256").iter();
    let declared = values
        .next()
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if values.next().is_some() {
        return Err("more than one X-Amz-Content-Sha256 header".to_owned());
    }
    for name in SIGNING_HEADERS {
        headers.remove(name);
    }
    let declared = declared.as_deref().unwrap_or("");
    if declared == "STREAMING-UNSIGNED-PAYLOAD-TRAILER" {
        return if service == "s3" {
            Ok(Payload::StreamingUnsignedTrailer)
        } else {
            Err(format!(
                "an aws-chunked body is signed only for s3, not for service {service}"
            ))
        };
    }
    if declared.starts_with("STREAMING-") {
        return Err(
            "signed aws-chunked uploads (X-Amz-Content-Sha256: STREAMING-AWS4-...) are not \
             re-signed: configure the client for unsigned payloads (the AWS CLI and SDKs \
             use them over HTTPS)"
                .to_owned(),
        );
    }
    if declared.len() == 64 && declared.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Payload::Precomputed(declared.to_ascii_lowercase()));
    }
    if !has_body {
        return Ok(Payload::Empty);
    }
    if service == "s3" {
        return Ok(Payload::Unsigned);
    }
    Err(format!(
        "a request body for service {service} must declare its SHA-256 in \
         X-Amz-Content-Sha256 to be signed"
    ))
}

/// Signs the request that is forwarded: `method`, `authority` (the `Host` sent),
/// `path_and_query` (the judged target) and the signed subset of `headers`; adds
/// `Authorization`, `X-Amz-Date`, `X-Amz-Security-Token` and, for S3,
/// `X-Amz-Content-Sha256` to `headers` (marked sensitive where secret).
#[expect(
    clippy::too_many_arguments,
    reason = "each is one part of the canonical request"
)]
pub fn sign(
    method: &str,
    authority: &str,
    path_and_query: &str,
    headers: &mut HeaderMap,
    session: &Session,
    service: &str,
    region: &str,
    payload: &Payload,
    now: SystemTime,
) -> Result<(), String> {
    let mut settings = SigningSettings::default();
    if service == "s3" {
        // S3 checks the path as sent, encoded once, and wants the payload hash header.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let identity = session.signing_identity();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| format!("AWS signing: {e}"))?;
    let mut signed: Vec<(&str, &str)> = vec![("host", authority)];
    for (name, value) in headers.iter() {
        let n = name.as_str();
        if n.starts_with("x-amz-") || n == "content-type" || n == "content-md5" {
            let value = value
                .to_str()
                .map_err(|_| format!("header {n} is not visible ASCII and cannot be signed"))?;
            signed.push((n, value));
        }
    }
    let body = match payload {
        Payload::Empty => SignableBody::Precomputed(EMPTY_SHA256.to_owned()),
        Payload::Unsigned => SignableBody::UnsignedPayload,
        Payload::Precomputed(hash) => SignableBody::Precomputed(hash.clone()),
        Payload::StreamingUnsignedTrailer => SignableBody::StreamingUnsignedPayloadTrailer,
    };
    let url = format!("https://{authority}{path_and_query}");
    let request = SignableRequest::new(method, url.as_str(), signed.into_iter(), body)
        .map_err(|e| format!("AWS signing: {e}"))?;
    let (instructions, _) = sigv4_sign(request, &params.into())
        .map_err(|e| format!("AWS signing: {e}"))?
        .into_parts();
    let (new_headers, params) = instructions.into_parts();
    if !params.is_empty() {
        return Err("AWS signing: the signer asked for query parameters".to_owned());
    }
    for header in new_headers {
        let name = HeaderName::from_bytes(header.name().as_bytes())
            .map_err(|_| "AWS signing: the signer made an invalid header name".to_owned())?;
        let mut value = HeaderValue::from_str(header.value())
            .map_err(|_| "AWS signing: the signer made an invalid header value".to_owned())?;
        value.set_sensitive(header.sensitive() || name == http::header::AUTHORIZATION);
        headers.insert(name, value);
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests;
