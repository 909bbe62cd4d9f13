//! HTTP request rules of proxy rules: which methods and paths the proxy lets through.
//!
//! Paths are compared as sent, byte for byte, without decoding: an upstream server may
//! decode and normalise a path differently from any rule here, so a path that could be
//! read two ways (`/a/../b`, `/a//b`, `/a/%2e%2e/b`, `/a%2Fb`, ...) is refused outright
//! rather than interpreted. The query string is ignored.
use std::{fmt, str::FromStr};

/// Appended to every method error.
pub(crate) const VALID_METHOD: &str =
    "valid: an upper-case method like GET or POST (letters, digits, `-`, `_`), or \"*\" for any";
/// Appended to every path-pattern error.
pub(crate) const VALID_PATH: &str = "valid: an absolute path like /repos/acme/widgets, where \
     `*` matches within one segment and a whole segment `**` matches any number of segments";

/// A method a rule allows: one token, or any.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MethodPattern {
    /// `"*"`.
    Any,
    /// An upper-case token such as `GET`; compared case-sensitively, as HTTP does.
    Token(String),
}

impl MethodPattern {
    pub fn matches(&self, method: &str) -> bool {
        match self {
            Self::Any => is_token(method),
            Self::Token(token) => token == method,
        }
    }
}

impl FromStr for MethodPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid method {s:?}: {why} ({VALID_METHOD})");
        if s == "*" {
            return Ok(Self::Any);
        }
        if s.is_empty() {
            return Err(bad("is empty"));
        }
        if s.bytes().any(|b| b.is_ascii_lowercase()) {
            let upper = s.to_ascii_uppercase();
            if is_method_name(&upper) {
                return Err(bad(&format!(
                    "methods are case-sensitive and upper case: did you mean {upper}?"
                )));
            }
        }
        if !is_method_name(s) {
            return Err(bad("is not a method name"));
        }
        Ok(Self::Token(s.to_owned()))
    }
}

impl fmt::Display for MethodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Token(t) => f.write_str(t),
        }
    }
}

fn is_method_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// RFC 9110 `token`: what a request's method may be at all.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An absolute path pattern: `/repos/acme/widgets/**`, `/repos/*/issues`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PathGlob {
    text: String,
    segments: Vec<GlobSegment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum GlobSegment {
    /// Zero or more whole segments.
    AnySegments,
    /// One segment; `*` in it matches any run of characters other than `/`.
    One(String),
}

impl PathGlob {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `path` (without query) matches. The caller checks it is canonical.
    fn matches_canonical(&self, path: &str) -> bool {
        let segments: Vec<&str> = path.get(1..).unwrap_or_default().split('/').collect();
        match_segments(&self.segments, &segments)
    }
}

impl FromStr for PathGlob {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid path pattern {s:?}: {why} ({VALID_PATH})");
        let Some(rest) = s.strip_prefix('/') else {
            return Err(bad("does not start with `/`"));
        };
        if let Some(c) = s.chars().find(|c| matches!(c, '?' | '#')) {
            return Err(bad(&format!(
                "contains {c:?}; patterns match the path only (the query is ignored)"
            )));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '\\'))
        {
            return Err(bad(&format!(
                "contains {c:?}, which a request path never does unencoded"
            )));
        }
        // A pattern only a refused path could match would silently allow nothing.
        if let Err(why) = check_canonical(s) {
            return Err(bad(&format!("{why}; such request paths are refused")));
        }
        let mut segments = Vec::new();
        for segment in rest.split('/') {
            if segment == "**" {
                // `/a/**/**` means the same as `/a/**`; keep matching linear.
                if segments.last() != Some(&GlobSegment::AnySegments) {
                    segments.push(GlobSegment::AnySegments);
                }
            } else if segment.contains("**") {
                return Err(bad(&format!(
                    "segment `{segment}` mixes `**` with other characters; `**` must be a \
                     whole segment, and `*` matches within one"
                )));
            } else {
                segments.push(GlobSegment::One(segment.to_owned()));
            }
        }
        Ok(Self {
            text: s.to_owned(),
            segments,
        })
    }
}

impl fmt::Display for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whole-path match: `AnySegments` takes zero or more segments. Dynamic programming over
/// (pattern, path) positions, so no input makes it exponential.
fn match_segments(pattern: &[GlobSegment], path: &[&str]) -> bool {
    // reach[j]: the first `i` pattern segments can match the first `j` path segments.
    let mut reach = vec![false; path.len() + 1];
    reach[0] = true;
    for glob in pattern {
        let mut next = vec![false; path.len() + 1];
        match glob {
            GlobSegment::AnySegments => {
                let mut any = false;
                for (j, slot) in next.iter_mut().enumerate() {
                    any |= reach[j];
                    *slot = any;
                }
            }
            GlobSegment::One(seg) => {
                for (j, segment) in path.iter().enumerate() {
                    next[j + 1] = reach[j] && match_segment(seg.as_bytes(), segment.as_bytes());
                }
            }
        }
        reach = next;
    }
    reach[path.len()]
}

/// Glob within one segment: `*` matches any run of bytes (the segment has no `/`), all
/// else is literal. Greedy with backtracking to the last star: linear in practice.
fn match_segment(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Splits a request target into path and query, and refuses it unless the path is
/// canonical. Returns the path; the error says why in a few words, without the target
/// (see [`target_for_reason`]).
pub(crate) fn canonical_path(path_and_query: &str) -> Result<&str, String> {
    let path = path_only(path_and_query);
    if !path.starts_with('/') {
        return Err("not an absolute path".into());
    }
    if path_and_query.contains('#') {
        return Err("has a fragment (`#`)".into());
    }
    check_canonical(path).map_err(|why| format!("non-canonical path: {why}"))?;
    Ok(path)
}

fn path_only(path_and_query: &str) -> &str {
    path_and_query
        .split_once('?')
        .map_or(path_and_query, |(p, _)| p)
}

/// The path of a request target as reasons show it: no query (which may carry secrets),
/// at most 200 characters, anything but printable ASCII escaped (reasons end up in logs).
pub(crate) fn target_for_reason(path_and_query: &str) -> String {
    const MAX: usize = 200;
    let path = path_only(path_and_query);
    let mut out = String::with_capacity(path.len().min(MAX));
    for c in path.chars().take(MAX) {
        if c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    if path.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// Why `path` (starting with `/`, no query) could be read two ways, if it could.
fn check_canonical(path: &str) -> Result<(), String> {
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic() || *c == '\\') {
        return Err(format!("contains {c:?}"));
    }
    // Path parameters: servers such as Tomcat read `/a/..;/b` as `/b`.
    if path.contains(';') {
        return Err("contains `;` (path parameters)".into());
    }
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| {
            let h = std::str::from_utf8(h).ok()?;
            u8::from_str_radix(h, 16).ok()
        });
        match hex {
            None => return Err("has a `%` not followed by two hex digits".into()),
            Some(b'/') => return Err("contains an encoded `/` (%2F)".into()),
            Some(b'\\') => return Err("contains an encoded `\\` (%5C)".into()),
            Some(0) => return Err("contains an encoded NUL (%00)".into()),
            // Decoded by a server that splits after decoding, or decoded twice.
            Some(b';') => return Err("contains an encoded `;` (%3B)".into()),
            Some(b'?') => return Err("contains an encoded `?` (%3F)".into()),
            Some(b'#') => return Err("contains an encoded `#` (%23)".into()),
            Some(b'%') => return Err("contains an encoded `%` (%25, double encoding)".into()),
            Some(_) => {}
        }
    }
    let segments: Vec<&str> = path.get(1..).unwrap_or_default().split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        // An empty last segment is a trailing slash, which is canonical.
        if segment.is_empty() && i != last {
            return Err("contains `//`".into());
        }
        // `%2e` is `.` to servers that decode before normalising.
        let decoded = segment.replace("%2e", ".").replace("%2E", ".");
        if decoded == "." || decoded == ".." {
            return Err(format!("contains a `{segment}` segment"));
        }
    }
    Ok(())
}

/// One entry of a proxy rule's `http:` list: any of `methods` on any of `paths`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpRule {
    pub(super) methods: Vec<MethodPattern>,
    pub(super) paths: Vec<PathGlob>,
}

impl HttpRule {
    /// Non-empty.
    pub fn methods(&self) -> &[MethodPattern] {
        &self.methods
    }

    /// Non-empty.
    pub fn paths(&self) -> &[PathGlob] {
        &self.paths
    }

    /// Whether a request with this method and target (a path, optionally with a query,
    /// which is ignored) is allowed by this entry. A non-canonical path is never allowed.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        let Ok(path) = canonical_path(path) else {
            return false;
        };
        self.methods.iter().any(|m| m.matches(method))
            && self.paths.iter().any(|p| p.matches_canonical(path))
    }
}

impl fmt::Display for HttpRule {
    /// `GET,HEAD /a/**, /b`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.methods.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{m}")?;
        }
        for (i, p) in self.paths.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { ", " })?;
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn rule(methods: &[&str], paths: &[&str]) -> HttpRule {
        HttpRule {
            methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
            paths: paths.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn path_glob_matrix() {
        // (pattern, path, matches)
        let cases = [
            ("/a/**", "/a", true),
            ("/a/**", "/a/", true),
            ("/a/**", "/a/b", true),
            ("/a/**", "/a/b/c", true),
            ("/a/**", "/a/b/c/", true),
            ("/a/**", "/ab", false),
            ("/a/**", "/ab/c", false),
            ("/a/**", "/", false),
            ("/a/**", "/b/a", false),
            ("/a", "/a", true),
            ("/a", "/a/", false),
            ("/a", "/A", false),
            ("/a/", "/a/", true),
            ("/a/", "/a", false),
            ("/", "/", true),
            ("/", "/a", false),
            ("/**", "/", true),
            ("/**", "/anything/at/all", true),
            ("/a/*", "/a/b", true),
            ("/a/*", "/a/", true),
            ("/a/*", "/a", false),
            ("/a/*", "/a/b/c", false),
            ("/a/*/c", "/a/b/c", true),
            ("/a/*/c", "/a/b/x/c", false),
            ("/a/**/c", "/a/c", true),
            ("/a/**/c", "/a/b/x/c", true),
            ("/a/**/c", "/a/b/x/d", false),
            ("/a/**/**/c", "/a/c", true),
            ("/a/*.json", "/a/x.json", true),
            ("/a/*.json", "/a/.json", true),
            ("/a/*.json", "/a/x.jsonx", false),
            ("/a/*.json", "/a/x/y.json", false),
            ("/a/v*-*", "/a/v1-2", true),
            ("/a/v*-*", "/a/v12", false),
            ("/a/x*y*z", "/a/xaayzbz", true),
            ("/a/x*y*z", "/a/xaazy", false),
            ("/repos/acme/widgets/**", "/repos/acme/widgets/pulls", true),
            (
                "/repos/acme/widgets/**",
                "/repos/acme/widgetsx/pulls",
                false,
            ),
            ("/repos/acme/widgets/**", "/repos/acme/widgets?x=1", true),
            ("/repos/acme/widgets/**", "/repos/acme/wid?gets/x", false),
            ("/a%20b", "/a%20b", true),
            ("/a%20b", "/a b", false),
            ("/a%20b", "/a%2520b", false),
            // Query strings are ignored, whatever they hold.
            ("/a", "/a?b=/c/../d&e=%2f", true),
            ("/a", "/a?", true),
            ("/a/b", "/a?/b", false),
            // Non-canonical paths are refused even where the pattern would match.
            ("/**", "/a/../b", false),
            ("/**", "/a/./b", false),
            ("/**", "/a//b", false),
            ("/**", "//a", false),
            ("/**", "/a/..", false),
            ("/**", "/a/.", false),
            ("/**", "/..", false),
            ("/**", "/a/%2e%2e/b", false),
            ("/**", "/a/.%2E/b", false),
            ("/**", "/a/%2E/b", false),
            ("/**", "/a%2fb", false),
            ("/**", "/a%2Fb", false),
            ("/**", "/a%5cb", false),
            ("/**", "/a\\b", false),
            ("/**", "/a%00b", false),
            ("/**", "/a%zzb", false),
            ("/**", "/a/..;/b", false),
            ("/**", "/a;jsessionid=1/b", false),
            ("/**", "/a%3b/b", false),
            ("/**", "/a%3F/b", false),
            ("/**", "/a%23b", false),
            ("/**", "/a/%252e%252e/b", false),
            ("/**", "/a/%41b", true),
            ("/**", "/a%2", false),
            ("/**", "/a b", false),
            ("/**", "/a#b", false),
            ("/**", "/a?b#c", false),
            ("/**", "a/b", false),
            ("/**", "*", false),
            ("/**", "", false),
            ("/**", "https://x/a", false),
            ("/**", "/é", false),
            // Dots inside names are fine.
            ("/**", "/a/.well-known/b", true),
            ("/**", "/a/..b/c", true),
            ("/**", "/a/b.", true),
        ];
        for (pattern, path, want) in cases {
            let r = rule(&["*"], &[pattern]);
            assert_eq!(r.allows("GET", path), want, "{pattern} vs {path:?}");
        }
    }

    #[test]
    fn methods() {
        let r = rule(&["GET", "HEAD"], &["/**"]);
        assert!(r.allows("GET", "/x"));
        assert!(r.allows("HEAD", "/x"));
        assert!(!r.allows("get", "/x"));
        assert!(!r.allows("POST", "/x"));
        assert!(!r.allows("", "/x"));
        let any = rule(&["*"], &["/x"]);
        assert!(any.allows("PATCH", "/x"));
        assert!(any.allows("M-SEARCH", "/x"));
        assert!(!any.allows("", "/x"));
        assert!(!any.allows("GET /y", "/x"));
        assert_eq!(
            rule(&["GET", "HEAD"], &["/a/**", "/b"]).to_string(),
            "GET,HEAD /a/**, /b"
        );
    }

    #[test]
    fn invalid_methods() {
        for (text, why) in [
            ("", "is empty"),
            ("get", "did you mean GET?"),
            ("Post", "did you mean POST?"),
            ("GE T", "is not a method name"),
            ("GET*", "is not a method name"),
            ("**", "is not a method name"),
            ("GÉT", "is not a method name"),
        ] {
            let err = text.parse::<MethodPattern>().unwrap_err();
            assert!(
                err.starts_with(&format!("invalid method {text:?}: ")) && err.contains(why),
                "{text:?}: {err}"
            );
            assert!(err.ends_with(&format!("({VALID_METHOD})")), "{err}");
        }
        assert_eq!(
            "M-SEARCH".parse(),
            Ok(MethodPattern::Token("M-SEARCH".into()))
        );
    }

    #[test]
    fn invalid_path_patterns() {
        for (text, why) in [
            ("", "does not start with `/`"),
            ("a/b", "does not start with `/`"),
            ("*/a", "does not start with `/`"),
            ("/a?b=1", "contains '?'"),
            ("/a#b", "contains '#'"),
            ("/a b", "contains ' '"),
            ("/a\\b", "contains '\\\\'"),
            ("/a/**b", "segment `**b` mixes `**`"),
            ("/a/b**", "segment `b**` mixes `**`"),
            ("/a/***", "segment `***` mixes `**`"),
            ("/a//b", "contains `//`; such request paths are refused"),
            ("/a/../b", "contains a `..` segment"),
            ("/a/.", "contains a `.` segment"),
            ("/a%2Fb", "encoded `/`"),
            ("/a%", "`%` not followed by two hex digits"),
        ] {
            let err = text.parse::<PathGlob>().unwrap_err();
            assert!(
                err.starts_with(&format!("invalid path pattern {text:?}: ")) && err.contains(why),
                "{text:?}: {err}"
            );
            assert!(err.ends_with(&format!("({VALID_PATH})")), "{err}");
        }
    }

    #[test]
    fn canonical_reasons() {
        assert_eq!(canonical_path("/a/b?c=d"), Ok("/a/b"));
        assert_eq!(
            canonical_path("/a/../b?x"),
            Err("non-canonical path: contains a `..` segment".into())
        );
        assert_eq!(
            canonical_path("/a%2fb"),
            Err("non-canonical path: contains an encoded `/` (%2F)".into())
        );
        assert_eq!(canonical_path("a"), Err("not an absolute path".into()));
        assert_eq!(canonical_path("/a?b#c"), Err("has a fragment (`#`)".into()));
        assert_eq!(target_for_reason("/a?token=x"), "/a");
        assert_eq!(target_for_reason("/a b\n/é"), "/a b\\n/\\u{e9}");
        let long = format!("/{}", "a".repeat(300));
        assert_eq!(target_for_reason(&long), format!("/{}...", "a".repeat(199)));
    }

    #[test]
    fn many_double_stars_stay_fast() {
        let pattern = format!("/{}x", "**/a/".repeat(30));
        let r = rule(&["*"], &[&pattern]);
        let path = format!("/{}", "a/".repeat(200));
        assert!(!r.allows("GET", &path));
        let r = rule(&["*"], &[&format!("/{}", "*a".repeat(30))]);
        assert!(!r.allows("GET", &format!("/{}b", "a".repeat(1000))));
    }
}
