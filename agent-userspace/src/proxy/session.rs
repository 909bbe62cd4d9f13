//! Response fields that hand out a session opened with the request's credential.
//!
//! A login answer can carry a token of its own (OpenStack Keystone's `X-Subject-Token`,
//! Swift's v1 `X-Auth-Token` and `X-Storage-Token`, a cookie, an API's own
//! `X-Session-Token`, a sliding session's new `Authorization`): that is the credential's
//! power in a form the scrubber does not know. On a route with a credential such fields
//! stay with the proxy's side, which sends the credential each time; in trailers they go
//! on every route (no protocol hands a session out there).

use http::HeaderMap;

/// Words that, as a whole `-`-separated part of a field's name, mark it as carrying a
/// session, a token or a secret (`x-api-key` and `x-apikey` alike). Whole parts only:
/// `x-ratelimit-remaining-tokens` (a count) and `x-ms-continuationtoken` (a page cursor)
/// are not sessions.
const WORDS: [&str; 9] = [
    "token",
    "session",
    "secret",
    "password",
    "apikey",
    "authorization",
    "jwt",
    "sid",
    "credential",
];

/// Names that hold one of [`WORDS`] but hand out no power: Azure Cosmos DB's session
/// consistency token (a log position, sent back to read one's own writes).
const NOT_SESSIONS: [&str; 1] = ["x-ms-session-token"];

/// Whether a field named `name` (lower case, as `http` keeps names) hands out a session.
pub fn hands_out_session(name: &str) -> bool {
    if name == "set-cookie" || name == "set-cookie2" {
        return true;
    }
    if NOT_SESSIONS.contains(&name) || name.contains("ratelimit") {
        return false;
    }
    let parts: Vec<&str> = name.split(['-', '_']).collect();
    parts.iter().any(|p| WORDS.contains(p))
        || parts.windows(2).any(|w| w[0] == "api" && w[1] == "key")
}

/// Takes out the fields that hand out a session; returns how many names went.
pub fn strip_sessions(headers: &mut HeaderMap) -> usize {
    let names: Vec<_> = headers
        .keys()
        .filter(|n| hands_out_session(n.as_str()))
        .cloned()
        .collect();
    for name in &names {
        headers.remove(name);
    }
    names.len()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn sessions_tokens_and_cookies_go_and_other_fields_stay() {
        for name in [
            "set-cookie",
            "x-subject-token",
            "x-auth-token",
            "x-storage-token",
            "x-session-token",
            "x-acme-session-id",
            "x-client-secret",
            "x-api-key",
            "x-apikey",
            "api-token",
            "authorization",
            "x-new-authorization",
            "x-jwt",
            "x-amz-security-token",
            "x-vault-token",
            "x-csrf-token",
        ] {
            assert!(hands_out_session(name), "{name}");
        }
        for name in [
            "content-type",
            "etag",
            "www-authenticate",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-limit-tokens",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-input-tokens-limit",
            "x-ms-continuationtoken",
            "x-ms-session-token",
            "x-request-id",
            "x-tokenizer-version",
            "x-sessions-count",
        ] {
            assert!(!hands_out_session(name), "{name}");
        }
        let mut h = HeaderMap::new();
        h.append("set-cookie", "a=1".parse().unwrap());
        h.append("set-cookie", "b=2".parse().unwrap());
        h.append("x-subject-token", "gAAAA".parse().unwrap());
        h.append("etag", "\"1\"".parse().unwrap());
        assert_eq!(strip_sessions(&mut h), 2);
        assert_eq!(h.len(), 1);
        assert_eq!(h["etag"], "\"1\"");
    }
}
