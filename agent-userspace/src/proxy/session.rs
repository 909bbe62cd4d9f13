//! Response fields that hand out a session opened with the request's credential.
//!
//! A login answer can carry a token of its own (OpenStack Keystone's `X-Subject-Token`,
//! Swift's v1 `X-Auth-Token` and `X-Storage-Token`, a cookie, an API's own
//! `X-Session-Token`): that is the credential's power in a form the scrubber does not
//! know. On a route with a credential such fields stay with the proxy's side, which sends
//! the credential each time; in trailers they go on every route (no protocol hands a
//! session out there).

use http::HeaderMap;

/// Words that mark a field name as carrying a session, a token or a secret.
/// (`Authorization` is not one: an origin echoing the credential there has it scrubbed,
/// as anywhere else.)
const WORDS: [&str; 6] = [
    "token", "session", "secret", "api-key", "apikey", "password",
];

/// Whether a field named `name` (lower case, as `http` keeps names) hands out a session.
pub fn hands_out_session(name: &str) -> bool {
    name == "set-cookie" || name == "set-cookie2" || WORDS.iter().any(|w| name.contains(w))
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
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("set-cookie", "sid=1"),
            ("x-subject-token", "gAAAA"),
            ("x-auth-token", "AUTH_tk"),
            ("x-storage-token", "AUTH_tk"),
            ("x-session-token", "s"),
            ("x-acme-session", "s"),
            ("x-client-secret", "s"),
            ("x-api-key", "k"),
            ("x-echo-authorization", "[egressd:scrubbed]"),
            ("content-type", "application/json"),
            ("etag", "\"1\""),
            ("x-ratelimit-remaining", "10"),
            ("www-authenticate", "Bearer"),
        ] {
            h.append(http::HeaderName::from_static(name), value.parse().unwrap());
        }
        h.append("set-cookie", "other=2".parse().unwrap());
        assert_eq!(strip_sessions(&mut h), 8);
        let mut left: Vec<_> = h.keys().map(|n| n.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "content-type",
                "etag",
                "www-authenticate",
                "x-echo-authorization",
                "x-ratelimit-remaining"
            ]
        );
    }
}
