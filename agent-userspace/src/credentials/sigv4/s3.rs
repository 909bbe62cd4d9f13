//! What a sandbox may ask S3 for on an `aws_sigv4` route beyond the method and path its
//! rules judge. The proxy signs every `x-amz-*` header it forwards, so a header that
//! changes what S3 does (an ACL, an object lock, a customer or KMS key, a redirect, tags)
//! would be signed with the sandbox's session although no rule judged it; likewise a
//! sub-resource in the query (`?acl`, `?retention`, `?restore`, `?delete`...) turns an
//! allowed `PUT`/`POST` on a path into another operation. Both are allowlists: anything
//! not named here is refused.

/// `x-amz-*` headers forwarded and signed as sent (exact names).
const HEADERS: [&str; 5] = [
    "x-amz-sdk-checksum-algorithm",
    "x-amz-decoded-content-length",
    "x-amz-expected-bucket-owner",
    // SDKs other than the CLI send their version here; it changes nothing.
    "x-amz-user-agent",
    // Removed before signing (see `SIGNING_HEADERS`); listed so they pass this check.
    "x-amz-date",
];

/// `x-amz-*` header prefixes forwarded and signed as sent: user metadata and checksums
/// (`x-amz-checksum-crc32`, `-mode`, `-algorithm`, `-type`...).
const HEADER_PREFIXES: [&str; 2] = ["x-amz-meta-", "x-amz-checksum-"];

/// Query keys an S3 request may carry: multipart uploads (the CLI's large uploads),
/// object reads and listings. Sub-resources that change an object or bucket's settings
/// (`acl`, `tagging`, `retention`, `legal-hold`, `restore`, `select`, `torrent`,
/// `delete`, `policy`, `versioning`...) are not among them.
const QUERY_KEYS: [&str; 25] = [
    // Multipart: CreateMultipartUpload, UploadPart, CompleteMultipartUpload,
    // AbortMultipartUpload, ListParts, ListMultipartUploads.
    "uploads",
    "uploadId",
    "partNumber",
    "max-parts",
    "part-number-marker",
    "max-uploads",
    "key-marker",
    "upload-id-marker",
    // Object reads.
    "versionId",
    "response-cache-control",
    "response-content-disposition",
    "response-content-encoding",
    "response-content-language",
    "response-content-type",
    "response-expires",
    // The operation hint some SDKs add (`x-id=GetObject`).
    "x-id",
    // Listings: ListObjects(V2), ListObjectVersions.
    "list-type",
    "prefix",
    "delimiter",
    "encoding-type",
    "max-keys",
    "continuation-token",
    "start-after",
    "fetch-owner",
    "marker",
];

/// The first `x-amz-*` header in `headers` that is not forwarded on an S3 route, with
/// the reason (naming the header, never quoting a value other than an
/// encryption or storage class name).
pub fn refused_header(headers: &http::HeaderMap) -> Option<String> {
    for (name, value) in headers {
        let n = name.as_str();
        if !n.starts_with("x-amz-") || super::SIGNING_HEADERS.contains(&n) {
            continue;
        }
        if HEADERS.contains(&n) || HEADER_PREFIXES.iter().any(|p| n.starts_with(p)) {
            continue;
        }
        let value = value.to_str().unwrap_or("");
        let ok = match n {
            // The trailer of an aws-chunked upload may name a checksum only.
            "x-amz-trailer" => value
                .split(',')
                .all(|t| t.trim().to_ascii_lowercase().starts_with("x-amz-checksum-")),
            // S3-managed keys, or the account's default KMS key; a key id is refused
            // (x-amz-server-side-encryption-aws-kms-key-id is not allowed).
            "x-amz-server-side-encryption" => matches!(value, "AES256" | "aws:kms"),
            "x-amz-storage-class" => value == "STANDARD",
            _ => false,
        };
        if !ok {
            return Some(match n {
                "x-amz-trailer" => {
                    "header x-amz-trailer names a trailer other than a checksum; refused".to_owned()
                }
                "x-amz-server-side-encryption" => {
                    "header x-amz-server-side-encryption: only AES256 or aws:kms (the default \
                     key) is signed"
                        .to_owned()
                }
                "x-amz-storage-class" => {
                    "header x-amz-storage-class: only STANDARD is signed".to_owned()
                }
                _ => format!(
                    "header {n} changes what S3 does beyond the method and path the rules \
                     judge; it is not signed (allowed: x-amz-meta-*, x-amz-checksum-*, \
                     x-amz-sdk-checksum-algorithm, x-amz-trailer, \
                     x-amz-decoded-content-length, x-amz-expected-bucket-owner, \
                     x-amz-server-side-encryption, x-amz-storage-class)"
                ),
            });
        }
    }
    None
}

/// The first query key of `query` (the judged, normalised query) that is not an
/// ordinary S3 read, listing or multipart key, with the reason.
pub fn refused_query_key(query: Option<&str>) -> Option<String> {
    let query = query?;
    query
        .split('&')
        .map(|pair| pair.split_once('=').map_or(pair, |(k, _)| k))
        .find(|key| !key.is_empty() && !QUERY_KEYS.contains(key))
        .map(|key| {
            let shown = crate::text::sanitize(key, 64);
            format!(
                "S3 sub-resource or query key `{shown}` is not signed: only object reads, \
                 listings and multipart uploads are (refused: acl, tagging, retention, \
                 legal-hold, restore, select, torrent, delete and other sub-resources)"
            )
        })
}

/// The request target as sent to S3 and signed: the path with every byte outside the
/// unreserved set and `/` percent-encoded (S3 signs the key it decodes, encoded so; a raw
/// `(` signed as `(` fails its check), escapes kept as they are. The query as judged,
/// but a raw `+` is refused: the signer reads it as a space, S3 may not.
pub fn wire_target(target: &str) -> Result<String, String> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if query.is_some_and(|q| q.contains('+')) {
        return Err(
            "a raw `+` in an S3 query is read as a space by the signer and may not be by S3; \
             send it as %2B (or %20)"
                .to_owned(),
        );
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(target.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let escape = b == b'%'
            && bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
        if escape {
            out.push_str(&path[i..i + 3]);
            i += 3;
            continue;
        }
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
        i += 1;
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests;
