use std::time::{Duration, SystemTime};

use super::*;

fn session() -> Session {
    Session::for_test(
        "ASIAEXAMPLESESSION01",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "FwoGZXIvYXdzEXAMPLETOKEN",
    )
}

fn at_2013() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_369_353_600) // 2013-05-24T00:00:00Z
}

#[test]
fn presigned_queries_are_recognised() {
    for q in [
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=a&X-Amz-Signature=b",
        "x-id=GetObject&x-amz-signature=b",
        "AWSAccessKeyId=AKIA&Expires=1&Signature=x",
        "X-Amz-Security-Token",
    ] {
        assert!(presigned_key(Some(q)).is_some(), "{q}");
    }
    for q in [
        "list-type=2&prefix=agent%2F",
        "x-id=GetObject",
        "uploads",
        "",
    ] {
        assert_eq!(presigned_key(Some(q)), None, "{q}");
    }
    assert_eq!(presigned_key(None), None);
}

#[test]
fn signing_headers_are_stripped_and_the_payload_classified() {
    let headers = |sha: Option<&'static str>| {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("AWS4-HMAC-SHA256 dummy"),
        );
        h.insert("x-amz-security-token", HeaderValue::from_static("sandbox"));
        h.insert("x-amz-date", HeaderValue::from_static("20130524T000000Z"));
        h.insert("x-amz-meta-a", HeaderValue::from_static("1"));
        if let Some(sha) = sha {
            h.insert("x-amz-content-sha256", HeaderValue::from_static(sha));
        }
        h
    };
    let hash = "44CE7DD67C959E0D3524FFAC1771DFBBA87D2B6B4B4E99E42034A8B803F8B072";
    for (sha, body, service, want) in [
        (None, false, "s3", Ok(Payload::Empty)),
        (Some("UNSIGNED-PAYLOAD"), false, "s3", Ok(Payload::Empty)),
        (Some("UNSIGNED-PAYLOAD"), true, "s3", Ok(Payload::Unsigned)),
        (None, true, "s3", Ok(Payload::Unsigned)),
        (
            Some(hash),
            true,
            "s3",
            Ok(Payload::Precomputed(hash.to_ascii_lowercase())),
        ),
        (
            Some("STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
            true,
            "s3",
            Ok(Payload::StreamingUnsignedTrailer),
        ),
        (
            Some("STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
            true,
            "s3",
            Err(()),
        ),
        (
            Some("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"),
            true,
            "s3",
            Err(()),
        ),
        (
            Some("STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
            true,
            "sqs",
            Err(()),
        ),
        (None, true, "sqs", Err(())),
        (None, false, "sqs", Ok(Payload::Empty)),
    ] {
        let mut h = headers(sha);
        let got = strip(&mut h, body, service).map_err(|_| ());
        assert_eq!(got, want, "{sha:?} body={body} {service}");
        for name in SIGNING_HEADERS {
            assert!(!h.contains_key(name), "{name} left");
        }
        assert!(h.contains_key("x-amz-meta-a"));
    }
}

#[test]
fn copies_are_refused() {
    let mut h = HeaderMap::new();
    h.insert(
        "x-amz-copy-source",
        HeaderValue::from_static("/acme-data/private/secret.txt"),
    );
    let err = strip(&mut h, false, "s3").unwrap_err();
    assert!(err.contains("Copy-Source"), "{err}");
}

/// The Authorization value's parts.
fn auth_parts(h: &HeaderMap) -> (String, String, String) {
    let auth = h.get("authorization").unwrap().to_str().unwrap().to_owned();
    let field = |k: &str| {
        auth.split([' ', ','])
            .find_map(|p| p.strip_prefix(k))
            .unwrap()
            .to_owned()
    };
    (
        field("Credential="),
        field("SignedHeaders="),
        field("Signature="),
    )
}

#[test]
fn s3_requests_are_signed_with_the_session() {
    let mut h = HeaderMap::new();
    h.insert("x-amz-meta-owner", HeaderValue::from_static("agent"));
    h.insert("content-type", HeaderValue::from_static("text/plain"));
    h.insert("user-agent", HeaderValue::from_static("aws-cli/1"));
    h.insert("accept-encoding", HeaderValue::from_static("identity"));
    sign(
        "PUT",
        "acme-data.s3.amazonaws.com",
        "/agent/out/report.txt",
        &mut h,
        &session(),
        "s3",
        "us-east-1",
        &Payload::Unsigned,
        at_2013(),
    )
    .unwrap();
    let (credential, signed, signature) = auth_parts(&h);
    assert_eq!(
        credential,
        "ASIAEXAMPLESESSION01/20130524/us-east-1/s3/aws4_request"
    );
    assert_eq!(
        signed,
        "content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-owner;x-amz-security-token"
    );
    assert_eq!(signature.len(), 64);
    assert_eq!(h.get("x-amz-content-sha256").unwrap(), "UNSIGNED-PAYLOAD");
    assert_eq!(h.get("x-amz-date").unwrap(), "20130524T000000Z");
    assert_eq!(
        h.get("x-amz-security-token").unwrap(),
        "FwoGZXIvYXdzEXAMPLETOKEN"
    );
    assert!(h.get("authorization").unwrap().is_sensitive());
    assert!(h.get("x-amz-security-token").unwrap().is_sensitive());
    // Never the secret itself.
    for (_, v) in &h {
        assert!(!v.as_bytes().windows(8).any(|w| w == b"EXAMPLEK"));
    }

    // The same request for another key, method or payload signs differently; the same
    // one signs the same.
    let sig = |method: &str, path: &str, payload: Payload| {
        let mut h = HeaderMap::new();
        sign(
            method,
            "s3.amazonaws.com",
            path,
            &mut h,
            &session(),
            "s3",
            "us-east-1",
            &payload,
            at_2013(),
        )
        .unwrap();
        auth_parts(&h).2
    };
    let base = sig("GET", "/acme-data/agent/a.txt", Payload::Empty);
    assert_eq!(base, sig("GET", "/acme-data/agent/a.txt", Payload::Empty));
    assert_ne!(base, sig("GET", "/acme-data/agent/b.txt", Payload::Empty));
    assert_ne!(base, sig("HEAD", "/acme-data/agent/a.txt", Payload::Empty));
    assert_ne!(
        base,
        sig("GET", "/acme-data/agent/a.txt", Payload::Unsigned)
    );
    assert_ne!(
        base,
        sig(
            "GET",
            "/acme-data?list-type=2&prefix=agent%2F",
            Payload::Empty
        )
    );
}

/// The signature checked against SigV4 computed here from the specification's steps
/// (canonical request, string to sign, derived key), for an S3 ListObjectsV2 request.
#[test]
fn signature_matches_the_specification() {
    use sha2::{Digest, Sha256};
    let mut h = HeaderMap::new();
    sign(
        "GET",
        "s3.amazonaws.com",
        "/acme-data?list-type=2&prefix=agent%2F",
        &mut h,
        &session(),
        "s3",
        "us-east-1",
        &Payload::Empty,
        at_2013(),
    )
    .unwrap();
    let (_, signed, signature) = auth_parts(&h);
    assert_eq!(
        signed,
        "host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
    );
    let canonical = format!(
        "GET\n/acme-data\nlist-type=2&prefix=agent%2F\nhost:s3.amazonaws.com\n\
         x-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:20130524T000000Z\n\
         x-amz-security-token:FwoGZXIvYXdzEXAMPLETOKEN\n\n{signed}\n{EMPTY_SHA256}"
    );
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let hmac = |key: &[u8], data: &str| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        ring::hmac::sign(&key, data.as_bytes()).as_ref().to_vec()
    };
    let k = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "20130524");
    let k = hmac(&k, "us-east-1");
    let k = hmac(&k, "s3");
    let k = hmac(&k, "aws4_request");
    assert_eq!(signature, hex(&hmac(&k, &to_sign)));
}
