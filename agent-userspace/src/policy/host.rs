//! Host-name patterns: the names in a rule's `to` (which DNS names the sandbox may
//! resolve, and so which learned addresses the rule covers), and the TLS server names
//! (SNI) and HTTP `Host` values a proxy or passthrough rule serves.
//!
//! Both compare names a sandboxed client chose, so matching is strict: both the
//! pattern and the candidate must be syntactically valid DNS names, comparison is ASCII
//! case-insensitive and ignores one trailing dot, and a wildcard stands for whole labels
//! only. `*.github.com` therefore never matches `github.com`, `a.b.github.com`,
//! `evilgithub.com` or `github.com.evil.example`.
use std::{fmt, str::FromStr};

/// Appended to every host-pattern error.
pub(crate) const VALID_HOST: &str = "valid: a DNS name like api.example.com, \
     *.example.com (one label in front) or **.example.com (one or more labels in front)";

/// Longest DNS name, in characters, without the trailing dot.
const MAX_NAME: usize = 253;
/// Longest DNS label.
const MAX_LABEL: usize = 63;

/// A checked host-name pattern: `api.example.com`, `*.example.com` or `**.example.com`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPattern {
    kind: Kind,
    /// The name, or for a wildcard the part after `*.`/`**.`; lower case, no trailing dot.
    name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// The name itself.
    Exact,
    /// `*.name`: exactly one label before `name`.
    OneLabel,
    /// `**.name`: one or more labels before `name`.
    AnyLabels,
}

impl HostPattern {
    /// Parses and normalises a pattern (lower case, one trailing dot removed). The error
    /// says what is wrong and what would be valid.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_bare(text)
            .map_err(|why| format!("invalid host name {text:?}: {why} ({VALID_HOST})"))
    }

    /// [`HostPattern::parse`], with an error that says only what is wrong, for callers
    /// that frame it themselves (a `to:` destination, a test's name).
    pub(crate) fn parse_bare(text: &str) -> Result<Self, String> {
        let bad = |why: &str| why.to_owned();
        let lower = text.trim().to_ascii_lowercase();
        let normal = lower.strip_suffix('.').unwrap_or(&lower);
        if normal.is_empty() {
            return Err(bad("is empty"));
        }
        let (kind, name) = if let Some(rest) = normal.strip_prefix("**.") {
            (Kind::AnyLabels, rest)
        } else if let Some(rest) = normal.strip_prefix("*.") {
            (Kind::OneLabel, rest)
        } else {
            (Kind::Exact, normal)
        };
        if name.contains('*') || normal == "*" || normal == "**" {
            return Err(bad(
                "`*` may only be the whole first label, followed by a domain: `*.` for one \
                 label or `**.` for one or more",
            ));
        }
        if normal.len() > MAX_NAME {
            return Err(bad(&format!("is longer than {MAX_NAME} characters")));
        }
        check_name(name).map_err(|why| bad(&why))?;
        if name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(bad(
                "looks like an IP address; `hosts` lists TLS server names, addresses go in `to`",
            ));
        }
        Ok(Self {
            kind,
            name: name.to_owned(),
        })
    }

    /// Whether this is `*.name` or `**.name` rather than one name.
    pub fn is_wildcard(&self) -> bool {
        self.kind != Kind::Exact
    }

    /// Whether `name` (a TLS server name or an HTTP `Host` without port) is covered. Case
    /// is ignored, and so is one trailing dot; anything that is not a valid DNS name
    /// matches nothing.
    pub fn matches(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        let candidate = lower.strip_suffix('.').unwrap_or(&lower);
        if candidate.len() > MAX_NAME || check_name(candidate).is_err() {
            return false;
        }
        match self.kind {
            Kind::Exact => candidate == self.name,
            Kind::OneLabel | Kind::AnyLabels => {
                // `candidate` = `<prefix>.<self.name>` with a non-empty prefix; the byte
                // before the suffix must be the dot, so `evilgithub.com` is not taken.
                let Some(prefix) = candidate
                    .strip_suffix(self.name.as_str())
                    .and_then(|p| p.strip_suffix('.'))
                else {
                    return false;
                };
                // The candidate is a valid name, so the prefix is non-empty labels.
                !prefix.is_empty() && (self.kind == Kind::AnyLabels || !prefix.contains('.'))
            }
        }
    }
}

impl HostPattern {
    /// Whether some name matches both patterns.
    pub fn overlaps(&self, other: &Self) -> bool {
        let under = |longer: &str, shorter: &str| {
            longer
                .strip_suffix(shorter)
                .is_some_and(|p| p.ends_with('.'))
        };
        match (self.kind, other.kind) {
            (Kind::Exact, _) => other.matches(&self.name),
            (_, Kind::Exact) => self.matches(&other.name),
            (Kind::OneLabel, Kind::OneLabel) => self.name == other.name,
            (Kind::AnyLabels, Kind::AnyLabels) => {
                self.name == other.name
                    || under(&self.name, &other.name)
                    || under(&other.name, &self.name)
            }
            // `*.x` and `**.y` share names when x is y or lies under it.
            (Kind::OneLabel, Kind::AnyLabels) => {
                self.name == other.name || under(&self.name, &other.name)
            }
            (Kind::AnyLabels, Kind::OneLabel) => other.overlaps(self),
        }
    }
}

impl HostPattern {
    /// Whether every name `other` matches, this pattern matches too.
    pub fn covers(&self, other: &Self) -> bool {
        let under = |longer: &str, shorter: &str| {
            longer
                .strip_suffix(shorter)
                .is_some_and(|p| p.ends_with('.'))
        };
        match (self.kind, other.kind) {
            (_, Kind::Exact) => self.matches(&other.name),
            (Kind::Exact, _) => false,
            (Kind::OneLabel, Kind::OneLabel) => self.name == other.name,
            (Kind::OneLabel, Kind::AnyLabels) => false,
            // `**.x` takes every name under x, so every `*.y` or `**.y` with y = x or
            // y under x.
            (Kind::AnyLabels, _) => self.name == other.name || under(&other.name, &self.name),
        }
    }
}

impl FromStr for HostPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Exact => f.write_str(&self.name),
            Kind::OneLabel => write!(f, "*.{}", self.name),
            Kind::AnyLabels => write!(f, "**.{}", self.name),
        }
    }
}

/// Whether a URL's host (lower case) is an IPv4 address or a DNS name, allowing one
/// trailing dot.
pub(crate) fn is_name_or_ipv4(host: &str) -> bool {
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    name.len() <= MAX_NAME && check_name(name).is_ok()
}

/// Checks lower-case DNS syntax: dot-separated labels of 1-63 `[a-z0-9-]`, none starting
/// or ending with `-`.
fn check_name(name: &str) -> Result<(), String> {
    for label in name.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "label `{label}` is longer than {MAX_LABEL} characters"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "label `{label}` contains {c:?}; labels are letters, digits and `-`"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label `{label}` starts or ends with `-`"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn parse_normalises() {
        for (text, shown) in [
            ("api.github.com", "api.github.com"),
            ("API.GitHub.COM", "api.github.com"),
            ("api.github.com.", "api.github.com"),
            (" api.github.com ", "api.github.com"),
            ("*.GitHub.com.", "*.github.com"),
            ("**.github.com", "**.github.com"),
            ("localhost", "localhost"),
            ("x-1.a0.example", "x-1.a0.example"),
            ("1password.com", "1password.com"),
            ("*.com", "*.com"),
        ] {
            assert_eq!(
                HostPattern::parse(text).unwrap().to_string(),
                shown,
                "{text}"
            );
        }
        let long_label = "a".repeat(63);
        assert!(HostPattern::parse(&format!("{long_label}.example")).is_ok());
        let name253 = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        assert_eq!(name253.len(), 253);
        assert!(HostPattern::parse(&name253).is_ok());
        assert!(HostPattern::parse(&format!("{name253}.")).is_ok());
    }

    #[test]
    fn invalid_patterns() {
        let cases = [
            ("", "is empty"),
            (".", "is empty"),
            ("*", "`*` may only be the whole first label"),
            ("**", "`*` may only be the whole first label"),
            ("*.", "`*` may only be the whole first label"),
            ("a.*.example.com", "`*` may only be the whole first label"),
            ("*example.com", "`*` may only be the whole first label"),
            ("a*.example.com", "`*` may only be the whole first label"),
            ("***.example.com", "`*` may only be the whole first label"),
            ("*.*.example.com", "`*` may only be the whole first label"),
            ("example.*", "`*` may only be the whole first label"),
            ("a..b", "has an empty label"),
            (".example.com", "has an empty label"),
            ("example.com..", "has an empty label"),
            ("-a.example.com", "label `-a` starts or ends with `-`"),
            ("a-.example.com", "label `a-` starts or ends with `-`"),
            ("a_b.example.com", "label `a_b` contains '_'"),
            ("a b.example.com", "label `a b` contains ' '"),
            ("exämple.com", "contains 'ä'"),
            ("192.0.2.10", "looks like an IP address"),
            ("*.10", "looks like an IP address"),
            ("api.github.com:443", "contains ':'"),
            ("https://api.github.com", "contains ':'"),
        ];
        for (text, why) in cases {
            let err = HostPattern::parse(text).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid host name {text:?}: ")) && err.contains(why),
                "{text:?}: {err}"
            );
            assert!(err.ends_with(&format!("({VALID_HOST})")), "{err}");
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(HostPattern::parse(&long)
            .unwrap_err()
            .contains("longer than 63"));
        let long = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62));
        assert!(HostPattern::parse(&long)
            .unwrap_err()
            .contains("longer than 253"));
    }

    #[test]
    fn overlapping_patterns() {
        let p = |t: &str| HostPattern::parse(t).unwrap();
        for (a, b, shared) in [
            ("api.example.com", "api.example.com", true),
            ("api.example.com", "*.example.com", true),
            ("api.example.com", "**.example.com", true),
            ("a.api.example.com", "*.example.com", false),
            ("example.com", "*.example.com", false),
            ("*.example.com", "*.example.com", true),
            ("*.api.example.com", "*.example.com", false),
            ("**.example.com", "**.api.example.com", true),
            ("*.api.example.com", "**.example.com", true),
            ("*.example.com", "**.api.example.com", false),
            ("*.example.com", "**.example.com", true),
            ("**.example.org", "**.example.com", false),
            ("*.evilexample.com", "**.example.com", false),
        ] {
            assert_eq!(p(a).overlaps(&p(b)), shared, "{a} {b}");
            assert_eq!(p(b).overlaps(&p(a)), shared, "{b} {a}");
        }
    }

    #[test]
    fn covering_matrix() {
        let p = |s: &str| HostPattern::parse(s).unwrap();
        // (a, b, every name b matches a matches too)
        for (a, b, covers) in [
            ("a.example.com", "a.example.com", true),
            ("a.example.com", "b.example.com", false),
            ("a.example.com", "*.example.com", false),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", false),
            ("*.example.com", "*.example.com", true),
            ("*.example.com", "**.example.com", false),
            ("*.example.com", "*.b.example.com", false),
            ("**.example.com", "a.b.example.com", true),
            ("**.example.com", "example.com", false),
            ("**.example.com", "*.example.com", true),
            ("**.example.com", "*.b.example.com", true),
            ("**.example.com", "**.b.example.com", true),
            ("**.example.com", "**.example.com", true),
            ("**.example.com", "**.evilexample.com", false),
            ("**.b.example.com", "**.example.com", false),
            ("**.b.example.com", "*.example.com", false),
        ] {
            assert_eq!(p(a).covers(&p(b)), covers, "{a} {b}");
            // Covering is overlapping.
            assert!(!covers || p(a).overlaps(&p(b)), "{a} {b}");
        }
    }

    #[test]
    fn matching_matrix() {
        // (pattern, candidate, matches)
        let cases = [
            // Exact.
            ("api.github.com", "api.github.com", true),
            ("api.github.com", "API.GitHub.Com", true),
            ("api.github.com", "api.github.com.", true),
            ("API.github.com.", "api.github.com", true),
            ("api.github.com", "api.github.com..", false),
            ("api.github.com", "github.com", false),
            ("api.github.com", "x.api.github.com", false),
            ("api.github.com", "api.github.com.evil.example", false),
            ("api.github.com", "evilapi.github.com", false),
            ("api.github.com", "api-github.com", false),
            ("api.github.com", "", false),
            ("api.github.com", ".", false),
            ("api.github.com", " api.github.com", false),
            ("api.github.com", "api.github.com:443", false),
            // One label.
            ("*.github.com", "a.github.com", true),
            ("*.github.com", "API.GITHUB.COM.", true),
            ("*.github.com", "github.com", false),
            ("*.github.com", "github.com.", false),
            ("*.github.com", ".github.com", false),
            ("*.github.com", "a.b.github.com", false),
            ("*.github.com", "github.com.evil.example", false),
            ("*.github.com", "a.github.com.evil.example", false),
            ("*.github.com", "evilgithub.com", false),
            ("*.github.com", "a.evilgithub.com", false),
            ("*.github.com", "*.github.com", false),
            ("*.github.com", "a..github.com", false),
            ("*.github.com", "-a.github.com", false),
            ("*.github.com", "a_b.github.com", false),
            // One or more labels.
            ("**.github.com", "a.github.com", true),
            ("**.github.com", "a.b.github.com", true),
            ("**.github.com", "x.y.z.github.com.", true),
            ("**.github.com", "github.com", false),
            ("**.github.com", "evilgithub.com", false),
            ("**.github.com", "a.evilgithub.com", false),
            ("**.github.com", "github.com.evil.example", false),
            ("**.github.com", "a..github.com", false),
            ("**.github.com", ".a.github.com", false),
        ];
        for (pattern, candidate, want) in cases {
            let p = HostPattern::parse(pattern).unwrap();
            assert_eq!(p.matches(candidate), want, "{pattern} vs {candidate:?}");
        }
        let long = format!("{}.github.com", ["a"; 130].join("."));
        assert!(long.len() > MAX_NAME);
        assert!(!HostPattern::parse("**.github.com").unwrap().matches(&long));
    }
}
