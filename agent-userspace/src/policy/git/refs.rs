//! Ref names: the checks `git check-ref-format` (and `receive-pack`) apply, and the
//! `push.refs` globs a rule allows.

/// Why `name` is not a ref name `git receive-pack` would accept, or `None` when it is
/// one. The rules are those of git's `check_refname_format` as receive-pack applies it:
/// `refs/` and at least two more components (`refs/heads/x`), no component empty (`//`)
/// or starting with `.` or ending with `.lock`, no `..`, `@{`, control character, space,
/// `~ ^ : ? * [ \`, not ending with `/` or `.`, and not `@`.
pub fn invalid_ref_name(name: &str) -> Option<&'static str> {
    if name == "@" {
        return Some("is `@`");
    }
    let Some(rest) = name.strip_prefix("refs/") else {
        return Some("does not start with `refs/`");
    };
    if name.ends_with('/') {
        return Some("ends with `/`");
    }
    if name.ends_with('.') {
        return Some("ends with `.`");
    }
    if name.contains("..") {
        return Some("contains `..`");
    }
    if name.contains("@{") {
        return Some("contains `@{`");
    }
    if let Some(c) = name.chars().find(|&c| {
        c.is_ascii_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\')
    }) {
        return Some(if c.is_ascii_control() {
            "contains a control character"
        } else {
            "contains one of space ~ ^ : ? * [ \\"
        });
    }
    let mut components = 0usize;
    for component in rest.split('/') {
        if component.is_empty() {
            return Some("has an empty component (`//`)");
        }
        if component.starts_with('.') {
            return Some("has a component starting with `.`");
        }
        if component.ends_with(".lock") {
            return Some("has a component ending with `.lock`");
        }
        components += 1;
    }
    if components < 2 {
        return Some("needs at least two components after `refs/` (e.g. refs/heads/NAME)");
    }
    None
}

/// One `push.refs` entry, e.g. `refs/heads/agent/**` or `refs/tags/v*`.
///
/// Segments are matched one by one: `**` as a whole segment matches any number of
/// segments (at least one when it is the last segment, so `refs/heads/agent/**` covers
/// what lies under `refs/heads/agent/` but not `refs/heads/agent` itself), and `*` inside
/// a segment matches any characters but `/`. Everything else is literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefGlob {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`.
    Any,
    /// Literal pieces separated by `*`: `a*b*` is `["a", "b", ""]`.
    Pattern(Vec<String>),
}

impl RefGlob {
    /// Checks and compiles a glob; the error says what is wrong and what would be valid.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix("refs/") else {
            return Err(format!(
                "`{text}` must start with `refs/`, e.g. `refs/heads/agent/**`"
            ));
        };
        if rest.is_empty() {
            return Err(format!(
                "`{text}` names no ref; use e.g. `refs/heads/**` for every branch"
            ));
        }
        let mut segments = vec![Segment::Pattern(vec!["refs".to_owned()])];
        for part in rest.split('/') {
            if part == "**" {
                segments.push(Segment::Any);
                continue;
            }
            if part.is_empty() {
                return Err(format!(
                    "`{text}` has an empty segment (`//` or a trailing `/`)"
                ));
            }
            if part.contains("**") {
                return Err(format!(
                    "`{text}`: `**` must be a whole segment (`a/**/b`), not part of `{part}`"
                ));
            }
            // The literal pieces must be possible in a valid ref name; `*` is the only
            // special character.
            let probe = format!("refs/x/{}", part.replace('*', "x"));
            if let Some(why) = invalid_ref_name(&probe) {
                return Err(format!(
                    "`{text}`: segment `{part}` can never match a valid ref name: it {why}"
                ));
            }
            segments.push(Segment::Pattern(
                part.split('*').map(str::to_owned).collect(),
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            segments,
        })
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `name` matches. Dynamic programming over (glob segment, name segment), so
    /// the cost is bounded by their product whatever the `**` count.
    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('/').collect();
        let (g, n) = (self.segments.len(), parts.len());
        // reach[j]: the first i glob segments can match the first j name segments.
        let mut reach = vec![false; n + 1];
        reach[0] = true;
        for (i, segment) in self.segments.iter().enumerate() {
            let last = i + 1 == g;
            let mut next = vec![false; n + 1];
            match segment {
                Segment::Any => {
                    // Zero or more segments; one or more when it ends the glob.
                    let min = usize::from(last);
                    if let Some(first) = reach.iter().position(|&r| r) {
                        for slot in next.iter_mut().skip(first + min) {
                            *slot = true;
                        }
                    }
                }
                Segment::Pattern(pieces) => {
                    for j in 0..n {
                        if reach[j] && piece_match(pieces, parts[j]) {
                            next[j + 1] = true;
                        }
                    }
                }
            }
            reach = next;
        }
        reach[n]
    }
}

/// Whether one name segment matches literal pieces joined by `*`.
fn piece_match(pieces: &[String], segment: &str) -> bool {
    match pieces {
        [] => segment.is_empty(),
        [only] => only == segment,
        [first, middle @ .., last] => {
            let Some(mut rest) = segment.strip_prefix(first.as_str()) else {
                return false;
            };
            if rest.len() < last.len() || !rest.ends_with(last.as_str()) {
                return false;
            }
            rest = &rest[..rest.len() - last.len()];
            // Greedy leftmost matching is exact for `*` without other wildcards.
            for piece in middle {
                match rest.find(piece.as_str()) {
                    Some(at) => rest = &rest[at + piece.len()..],
                    None => return false,
                }
            }
            true
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn ref_names_follow_check_ref_format() {
        for good in [
            "refs/heads/main",
            "refs/heads/agent/feature-1",
            "refs/tags/v1.0",
            "refs/heads/a@b",
            "refs/heads/ünïcode",
            "refs/heads/x.lck",
        ] {
            assert_eq!(invalid_ref_name(good), None, "{good}");
        }
        for bad in [
            "@",
            "main",
            "heads/main",
            "refs/main",
            "refs/heads/",
            "refs/heads/x.",
            "refs/heads//x",
            "refs/heads/.hidden",
            "refs/heads/x.lock",
            "refs/heads/x.lock/y",
            "refs/heads/a..b",
            "refs/heads/a@{1}",
            "refs/heads/a b",
            "refs/heads/a~1",
            "refs/heads/a^",
            "refs/heads/a:b",
            "refs/heads/a?",
            "refs/heads/a*",
            "refs/heads/a[",
            "refs/heads/a\\b",
            "refs/heads/a\u{7f}",
            "refs/heads/a\tb",
        ] {
            assert!(invalid_ref_name(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn globs_match_by_segment() {
        let g = |s: &str| RefGlob::parse(s).unwrap();
        let agent = g("refs/heads/agent/**");
        assert!(agent.matches("refs/heads/agent/x"));
        assert!(agent.matches("refs/heads/agent/a/b/c"));
        assert!(!agent.matches("refs/heads/agent"));
        assert!(!agent.matches("refs/heads/agents/x"));
        assert!(!agent.matches("refs/heads/main"));

        let mid = g("refs/**/wip");
        assert!(mid.matches("refs/wip"));
        assert!(mid.matches("refs/heads/wip"));
        assert!(mid.matches("refs/heads/a/b/wip"));
        assert!(!mid.matches("refs/heads/wip/x"));

        let star = g("refs/heads/agent-*");
        assert!(star.matches("refs/heads/agent-1"));
        assert!(star.matches("refs/heads/agent-"));
        assert!(!star.matches("refs/heads/agent-1/x"));
        assert!(!star.matches("refs/heads/agent"));

        let pieces = g("refs/tags/v*.*-rc*");
        assert!(pieces.matches("refs/tags/v1.2-rc3"));
        assert!(pieces.matches("refs/tags/v1.2.3-rc"));
        assert!(!pieces.matches("refs/tags/v1-rc3"));
        let ends = g("refs/heads/*ab*ab");
        assert!(ends.matches("refs/heads/abab"));
        assert!(!ends.matches("refs/heads/aba"));

        assert!(g("refs/heads/main").matches("refs/heads/main"));
        assert!(!g("refs/heads/main").matches("refs/heads/main2"));
        assert!(g("refs/**").matches("refs/heads/x"));
    }

    #[test]
    fn bad_globs_are_rejected() {
        for bad in [
            "heads/x",
            "refs/",
            "refs//x",
            "refs/heads/",
            "refs/heads/a**",
            "refs/heads/x.lock",
            "refs/heads/.x",
            "refs/heads/a b",
            "refs/heads/a?",
            "refs/heads/[ab]",
        ] {
            assert!(RefGlob::parse(bad).is_err(), "{bad}");
        }
    }
}
