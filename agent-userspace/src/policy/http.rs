//! HTTP request rules of proxy rules: which methods and paths the proxy lets through.
//!
//! A request target is normalised once ([`normalize_target`]): percent-encoded
//! unreserved characters are decoded and other encodings get upper-case hex, which no
//! origin reads differently; a path that an origin could read two ways (`/a/../b`,
//! `/a//b`, `/a/%2e%2e/b`, `/a%2Fb`, `/a/%C0%AE%C0%AE/b`, ...) is refused outright rather
//! than interpreted. The proxy judges that form and forwards exactly it. The query string
//! is ignored by path rules.
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

/// Methods whose request body names the resources they act on: WebDAV's `BIND` and
/// `REBIND` (the resource to bind, anywhere on the server), `UNBIND` (the binding to
/// remove), `SEARCH` (its scope) and `REPORT` (the resources of a multiget, or of a
/// version tree); versioning's (DeltaV, RFC 3253) `UPDATE` and `VERSION-CONTROL` (the
/// version whose content is copied in), `MERGE` (its source), `CHECKOUT` and `CHECKIN`
/// (an activity set), `BASELINE-CONTROL` (a baseline); redirect references' (RFC 4437)
/// `MKREDIRECTREF` and `UPDATEREDIRECTREF` (where they point). Judging the path judges
/// none of those, so a rule allows them only by name in an `http:` entry: `*` does not
/// match them, nor does a rule without `http:`.
pub const BODY_TARGET_METHODS: [&str; 13] = [
    "BIND",
    "REBIND",
    "UNBIND",
    "SEARCH",
    "REPORT",
    "UPDATE",
    "VERSION-CONTROL",
    "MERGE",
    "CHECKOUT",
    "CHECKIN",
    "BASELINE-CONTROL",
    "MKREDIRECTREF",
    "UPDATEREDIRECTREF",
];

/// Whether `method` names its targets in its body ([`BODY_TARGET_METHODS`]), in any
/// case: Django, Werkzeug, Symfony and Radicale upper-case the method they run.
pub fn names_targets_in_body(method: &str) -> bool {
    BODY_TARGET_METHODS
        .iter()
        .any(|m| m.eq_ignore_ascii_case(method))
}

/// Segments of Elasticsearch's and OpenSearch's multi-target endpoints, whose body names
/// other indices and documents (`{"_index": "prod"}`), also in a GET.
const MULTI_TARGET_SEGMENTS: [&str; 4] = ["_mget", "_msearch", "_bulk", "_mtermvectors"];

/// The segment of `path` (normal form) that makes a `method` request to it a batch
/// endpoint's, whose body carries whole requests the origin runs one by one, or names
/// their targets: Google's `/batch/...` (`multipart/mixed` of `application/http` parts),
/// OData's and Microsoft Graph's `$batch` (JSON or multipart), for any method but GET and
/// HEAD; Elasticsearch's and OpenSearch's `_mget`, `_msearch`, `_bulk` and
/// `_mtermvectors` (which read or write the indices their body names), for any method;
/// Google Cloud Storage's `copyTo` and `rewriteTo` (whose path goes on to name a second
/// bucket and object, written with the credential), for any method but GET and HEAD.
/// Judging the outer request judges none of the inner ones (nor a wildcard the second
/// target), so a rule allows such a request only where an `http:` path names the segment
/// itself: a wildcard does not.
pub fn batch_segment<'a>(method: &str, path: &'a str) -> Option<&'a str> {
    let reads = method == "GET" || method == "HEAD";
    path.split('/').find(|s| {
        let batch = s.eq_ignore_ascii_case("batch")
            || s.to_ascii_lowercase().ends_with("$batch")
            || s.to_ascii_lowercase().ends_with("%24batch")
            || s.eq_ignore_ascii_case("copyTo")
            || s.eq_ignore_ascii_case("rewriteTo");
        (batch && !reads)
            || MULTI_TARGET_SEGMENTS
                .iter()
                .any(|m| s.eq_ignore_ascii_case(m))
    })
}

impl MethodPattern {
    pub fn matches(&self, method: &str) -> bool {
        match self {
            Self::Any => is_token(method) && !names_targets_in_body(method),
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
        // A pattern only a refused or rewritten path could match would silently allow
        // nothing.
        match normalize_path(s) {
            Err(why) => return Err(bad(&format!("{why}; such request paths are refused"))),
            Ok(normal) if normal != s => {
                return Err(bad(&format!(
                    "request paths are matched in their normal form: write it as {normal}"
                )))
            }
            Ok(_) => {}
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

impl PathGlob {
    /// Whether the pattern has `segment` itself (ASCII case ignored) as one of its
    /// segments, not only a wildcard that would match it.
    pub fn names_segment(&self, segment: &str) -> bool {
        self.segments
            .iter()
            .any(|g| matches!(g, GlobSegment::One(s) if s.eq_ignore_ascii_case(segment)))
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
/// else is literal; but a pattern that is `*` alone matches only a non-empty segment (a
/// trailing slash is an empty last segment, and many origins route `/a/` as `/a`: a
/// rule for `/a/*`, one item of `/a`, must not reach what `/a` does). Greedy with
/// backtracking to the last star: linear in practice.
fn match_segment(pattern: &[u8], text: &[u8]) -> bool {
    if pattern == b"*" {
        return !text.is_empty();
    }
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

/// The one form of a request target that the proxy judges and forwards, or why there is
/// none. Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded and
/// other percent-encodings get upper-case hex digits (forms every origin reads alike,
/// RFC 3986 section 6.2.2); anything an origin could read two ways is refused: `.` and
/// `..` segments (also encoded), `//`, an encoded `/`, `\`, `;`, `?`, `#` or `%`, a
/// control character (raw or encoded), percent-encoded bytes that are not
/// UTF-8 (overlong forms such as `%C0%AE` included), characters that Unicode
/// compatibility folding turns into ASCII (full-width `．` or `／`), and fragments. The
/// query is kept as sent. The error says why in a few words, without the target (see
/// [`target_for_reason`]). Normalising a normalised target gives it back unchanged.
pub fn normalize_target(path_and_query: &str) -> Result<String, String> {
    if path_and_query.contains('#') {
        return Err("has a fragment (`#`)".into());
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    if !path.starts_with('/') {
        return Err("not an absolute path".into());
    }
    let mut out = normalize_path(path).map_err(|why| format!("ambiguous path: {why}"))?;
    if let Some(query) = query {
        if let Some(c) = query.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!("the query contains {c:?}"));
        }
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

/// The path of a normalised target (without its query).
pub(crate) fn path_only(path_and_query: &str) -> &str {
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

/// Whether RFC 3986 calls `b` unreserved: decoding it never changes what a URI means.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A non-ASCII character whose compatibility form (NFKC, which some origins apply before
/// routing) holds ASCII: full-width and small forms, dot leaders, vertical presentation
/// forms (`︰` is `..`), `℀` (`a/c`), the Greek question mark (`;`), ligatures (`ﬁ`)...
/// Any of them could become punctuation a router acts on (`.`, `/`, `;`, `?`) or letters
/// the patterns did not see.
fn folds_to_ascii(c: char) -> bool {
    use unicode_normalization::UnicodeNormalization as _;
    !c.is_ascii() && std::iter::once(c).nfkc().any(|d| d.is_ascii())
}

/// [`normalize_target`] for the path alone (starting with `/`).
fn normalize_path(path: &str) -> Result<String, String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    // Every byte the origin sees once it has decoded everything: must be UTF-8.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            if !b.is_ascii_graphic() || b == b'\\' {
                let c = path[i..].chars().next().unwrap_or('?');
                return Err(format!("contains {c:?}"));
            }
            // Path parameters: servers such as Tomcat read `/a/..;/b` as `/b`.
            if b == b';' {
                return Err("contains `;` (path parameters)".into());
            }
            out.push(char::from(b));
            decoded.push(b);
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).and_then(|h| {
            let h = std::str::from_utf8(h).ok()?;
            u8::from_str_radix(h, 16).ok()
        });
        let Some(value) = hex else {
            return Err("has a `%` not followed by two hex digits".into());
        };
        match value {
            b'/' => return Err("contains an encoded `/` (%2F)".into()),
            b'\\' => return Err("contains an encoded `\\` (%5C)".into()),
            0 => return Err("contains an encoded NUL (%00)".into()),
            // Decoded by a server that splits after decoding, or decoded twice.
            b';' => return Err("contains an encoded `;` (%3B)".into()),
            b'?' => return Err("contains an encoded `?` (%3F)".into()),
            b'#' => return Err("contains an encoded `#` (%23)".into()),
            b'%' => return Err("contains an encoded `%` (%25, double encoding)".into()),
            v if v < 0x20 || v == 0x7f => {
                return Err(format!("contains an encoded control character (%{v:02X})"))
            }
            v if is_unreserved(v) => out.push(char::from(v)),
            v => out.push_str(&format!("%{v:02X}")),
        }
        decoded.push(value);
        i += 3;
    }
    let text = std::str::from_utf8(&decoded)
        .map_err(|_| "percent-encoded bytes that are not UTF-8 (or an overlong form)")?;
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(format!("contains an encoded control character {c:?}"));
    }
    if let Some(c) = text.chars().find(|&c| folds_to_ascii(c)) {
        return Err(format!(
            "contains {c:?}, which Unicode folding turns into ASCII punctuation"
        ));
    }
    let segments: Vec<&str> = out.get(1..).unwrap_or_default().split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        // An empty last segment is a trailing slash, which is canonical.
        if segment.is_empty() && i != last {
            return Err("contains `//`".into());
        }
        if *segment == "." || *segment == ".." {
            return Err(format!("contains a `{segment}` segment"));
        }
        // Windows and IIS drop trailing dots and spaces from a name: `..%20` would be `..`.
        if segment.contains('.') && only_dots_and_spaces(segment) {
            return Err("contains a segment of only dots and spaces".into());
        }
    }
    Ok(out)
}

/// Whether a segment of a normal form is made of nothing but `.` and encoded spaces.
fn only_dots_and_spaces(segment: &str) -> bool {
    let mut rest = segment;
    while !rest.is_empty() {
        rest = match rest.strip_prefix('.').or_else(|| rest.strip_prefix("%20")) {
            Some(after) => after,
            None => return false,
        };
    }
    true
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
    /// which is ignored) is allowed by this entry, judged in its normal form (see
    /// [`normalize_target`]). An ambiguous path is never allowed.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        let Ok(target) = normalize_target(path) else {
            return false;
        };
        let path = path_only(&target);
        let batch = batch_segment(method, path);
        self.methods.iter().any(|m| m.matches(method))
            && self.paths.iter().any(|p| {
                p.matches_canonical(path) && batch.is_none_or(|segment| p.names_segment(segment))
            })
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
            ("/a/*", "/a/", false),
            ("/a/*/", "/a//", false),
            ("/a/*/c", "/a//c", false),
            ("/a/**", "/a/", true),
            ("/a/*", "/a/.x", true),
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
        assert_eq!(normalize_target("/a/b?c=d"), Ok("/a/b?c=d".into()));
        assert_eq!(
            normalize_target("/a/../b?x"),
            Err("ambiguous path: contains a `..` segment".into())
        );
        assert_eq!(
            normalize_target("/a%2fb"),
            Err("ambiguous path: contains an encoded `/` (%2F)".into())
        );
        assert_eq!(normalize_target("a"), Err("not an absolute path".into()));
        for dotted in [
            "/a/..%20/b",
            "/a/.%20",
            "/a/...",
            "/a/..%2E/b",
            "/a/%20.%20/b",
        ] {
            assert_eq!(
                normalize_target(dotted),
                Err("ambiguous path: contains a segment of only dots and spaces".into()),
                "{dotted}"
            );
        }
        for fine in ["/a/.well-known/x", "/a/v1.2", "/a/%20/b", "/a/..x"] {
            assert!(normalize_target(fine).is_ok(), "{fine}");
        }
        assert_eq!(
            normalize_target("/a?b#c"),
            Err("has a fragment (`#`)".into())
        );
        assert_eq!(target_for_reason("/a?token=x"), "/a");
        assert_eq!(target_for_reason("/a b\n/é"), "/a b\\n/\\u{e9}");
        let long = format!("/{}", "a".repeat(300));
        assert_eq!(target_for_reason(&long), format!("/{}...", "a".repeat(199)));
    }

    #[test]
    fn normal_forms() {
        for (raw, normal) in [
            ("/", "/"),
            ("/a/%41b", "/a/Ab"),
            ("/%7Euser/%5f%2D%2e", "/~user/_-."),
            ("/a%20b", "/a%20B".replace('B', "b").as_str()),
            ("/a%2a", "/a%2A"),
            ("/%c3%a9", "/%C3%A9"),
            ("/a/?q=%2e%2e/x", "/a/?q=%2e%2e/x"),
            ("/a/b.git/", "/a/b.git/"),
        ] {
            assert_eq!(normalize_target(raw).as_deref(), Ok(normal), "{raw}");
            assert_eq!(normalize_target(normal).as_deref(), Ok(normal), "{normal}");
        }
        for raw in [
            "/a/%2e%2E/b",
            "/a/%2e",
            "/a/.%2e",
            "/%2e%2e",
            "/a/%C0%AE%C0%AE/b",
            "/a/%E0%80%AE",
            "/a/%ff",
            "/a/%c3",
            "/a%01b",
            "/a%7Fb",
            "/a%C2%85b",
            "/a/%EF%BC%8E%EF%BC%8E/b",
            "/a%EF%BC%8Fb",
            // Compatibility forms beyond the full-width block: `︰` (`..`), `︙`,
            // `℀` (`a/c`), the Greek question mark (`;`), `⁇`, `⒈` (`1.`), `ﬁ`.
            "/a/%EF%B8%B0/b",
            "/a/%EF%B8%99/b",
            "/a/%E2%84%80/b",
            "/a/%CD%BE/b",
            "/a/%E2%81%87/b",
            "/a/%E2%92%88/b",
            "/a/%EF%AC%81/b",
            "/a\\b",
            "/a;b",
            "/a/%3b",
            "/a/b?x y",
        ] {
            assert!(normalize_target(raw).is_err(), "{raw}");
        }
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
