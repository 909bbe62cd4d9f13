use http::{HeaderMap, HeaderValue};

use super::*;

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, HeaderValue::from_static(v));
    }
    h
}

#[test]
fn what_the_cli_sends_is_accepted() {
    // `aws s3 cp` upload (aws-chunked, CRC32 trailer), download, head, multipart.
    for pairs in [
        &[
            ("x-amz-sdk-checksum-algorithm", "CRC32"),
            ("x-amz-trailer", "x-amz-checksum-crc32"),
            ("x-amz-decoded-content-length", "22"),
            ("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-security-token", "sandbox"),
            ("content-encoding", "aws-chunked"),
            ("content-type", "text/plain"),
        ][..],
        &[("x-amz-checksum-mode", "ENABLED")],
        &[
            ("x-amz-checksum-algorithm", "CRC32"),
            ("x-amz-checksum-type", "COMPOSITE"),
        ],
        &[("x-amz-checksum-crc32", "AAAAAA==")],
        &[
            ("x-amz-meta-owner", "agent"),
            ("x-amz-expected-bucket-owner", "123456789012"),
        ],
        &[("x-amz-server-side-encryption", "AES256")],
        &[("x-amz-server-side-encryption", "aws:kms")],
        &[("x-amz-storage-class", "STANDARD")],
        &[("x-amz-user-agent", "aws-sdk-rust/1")],
        &[],
    ] {
        assert_eq!(refused_header(&headers(pairs)), None, "{pairs:?}");
    }
}

#[test]
fn headers_that_change_what_s3_does_are_refused_by_name() {
    for (name, value) in [
        ("x-amz-acl", "public-read"),
        (
            "x-amz-grant-read",
            "uri=\"http://acs.amazonaws.com/groups/global/AllUsers\"",
        ),
        ("x-amz-grant-full-control", "id=1"),
        ("x-amz-object-lock-mode", "COMPLIANCE"),
        (
            "x-amz-object-lock-retain-until-date",
            "2099-01-01T00:00:00Z",
        ),
        ("x-amz-object-lock-legal-hold", "ON"),
        ("x-amz-server-side-encryption-customer-algorithm", "AES256"),
        ("x-amz-server-side-encryption-customer-key", "a2V5"),
        (
            "x-amz-server-side-encryption-aws-kms-key-id",
            "arn:aws:kms:us-east-1:1:key/x",
        ),
        ("x-amz-server-side-encryption-context", "e30="),
        ("x-amz-server-side-encryption-bucket-key-enabled", "true"),
        ("x-amz-website-redirect-location", "https://evil.example/"),
        ("x-amz-tagging", "a=b"),
        ("x-amz-request-payer", "requester"),
        ("x-amz-metadata-directive", "REPLACE"),
        ("x-amz-bypass-governance-retention", "true"),
        ("x-amz-mfa", "1 2"),
        ("X-Amz-Something-New", "1"),
    ] {
        let h = headers(&[("x-amz-meta-a", "1"), (name, value)]);
        let reason = refused_header(&h).unwrap();
        assert!(
            reason.contains(&name.to_ascii_lowercase()),
            "{name}: {reason}"
        );
        assert!(
            !reason.contains(value),
            "{name}: the value is quoted: {reason}"
        );
    }
    for (name, value) in [
        ("x-amz-server-side-encryption", "aws:kms:dsse"),
        ("x-amz-server-side-encryption", "AES256x"),
        ("x-amz-storage-class", "GLACIER"),
        ("x-amz-storage-class", "DEEP_ARCHIVE"),
        ("x-amz-trailer", "x-amz-acl"),
        ("x-amz-trailer", "x-amz-checksum-crc32, x-amz-tagging"),
    ] {
        let reason = refused_header(&headers(&[(name, value)])).unwrap();
        assert!(reason.contains(name), "{name}: {reason}");
    }
}

#[test]
fn sub_resources_other_than_reads_listings_and_multipart_are_refused() {
    for q in [
        "uploads",
        "uploads=",
        "uploadId=abc&partNumber=2",
        "uploadId=abc",
        "list-type=2&prefix=agent%2F&delimiter=%2F&encoding-type=url",
        "x-id=GetObject",
        "versionId=3&response-content-type=text%2Fplain",
        "",
    ] {
        assert_eq!(refused_query_key(Some(q)), None, "{q}");
    }
    assert_eq!(refused_query_key(None), None);
    for (q, key) in [
        ("acl", "acl"),
        ("acl=", "acl"),
        ("retention", "retention"),
        ("legal-hold", "legal-hold"),
        ("tagging", "tagging"),
        ("versionId=1&tagging", "tagging"),
        ("restore", "restore"),
        ("select&select-type=2", "select"),
        ("torrent", "torrent"),
        ("delete", "delete"),
        ("policy", "policy"),
        ("ACL", "ACL"),
        ("uploads&acl", "acl"),
    ] {
        let reason = refused_query_key(Some(q)).unwrap();
        assert!(reason.contains(&format!("`{key}`")), "{q}: {reason}");
    }
}

/// S3 signs the key it decodes, encoded with everything but unreserved characters and
/// `/` as `%XX`: the path goes out in exactly that form (what the SDKs send already
/// passes unchanged), so what is signed is what S3 checks.
#[test]
fn the_path_goes_out_as_s3_encodes_it() {
    assert_eq!(
        wire_target("/agent/x(1)!$'*,=:@.txt").unwrap(),
        "/agent/x%281%29%21%24%27%2A%2C%3D%3A%40.txt"
    );
    // Escapes stay; unreserved and `/` stay; the query is kept.
    assert_eq!(
        wire_target("/agent/a%20b~c_d-e.f?list-type=2&prefix=agent%2F").unwrap(),
        "/agent/a%20b~c_d-e.f?list-type=2&prefix=agent%2F"
    );
    // What botocore sends for the same key is already in this form.
    assert_eq!(
        wire_target("/agent/x%281%29.txt").unwrap(),
        "/agent/x%281%29.txt"
    );
    assert!(wire_target("/agent/x?prefix=a+b").is_err());
}
