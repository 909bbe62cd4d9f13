//! Property tests: the policy matchers against naive reference implementations written
//! plainly here (host patterns, which rules a name gets, path globs), on inputs drawn
//! from small alphabets so that near misses (`evilgithub.com`, `/a/b/` vs `/a/b`) are
//! frequent.
use proptest::prelude::*;

use super::{
    http::{normalize_target, HttpRule, MethodPattern, PathGlob},
    parse_str, HostPattern,
};

// ---- host names --------------------------------------------------------------------

/// A DNS name as RFC 1123 has it: labels of 1-63 letters, digits and `-`, not at either
/// end, at most 253 characters; compared in lower case.
fn naive_valid_name(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    name.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Lower case, one trailing dot dropped.
fn naive_fold(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    lower.strip_suffix('.').unwrap_or(&lower).to_owned()
}

/// Whether `pattern` (already valid) covers `candidate`, label by label.
fn naive_host_match(pattern: &str, candidate: &str) -> bool {
    let candidate = naive_fold(candidate);
    if !naive_valid_name(&candidate) {
        return false;
    }
    let pattern = naive_fold(pattern);
    let cand: Vec<&str> = candidate.split('.').collect();
    let (extra, base): (Option<bool>, &str) = if let Some(b) = pattern.strip_prefix("**.") {
        (Some(true), b)
    } else if let Some(b) = pattern.strip_prefix("*.") {
        (Some(false), b)
    } else {
        (None, pattern.as_str())
    };
    let base: Vec<&str> = base.split('.').collect();
    match extra {
        None => cand == base,
        Some(many) => {
            cand.len() > base.len()
                && cand[cand.len() - base.len()..] == base[..]
                && (many || cand.len() == base.len() + 1)
        }
    }
}

/// Whether every name `b` (a valid pattern) matches, `a` matches too: checked on names
/// made with a label no generated pattern uses, one and two deep for wildcards.
fn naive_covers(a: &str, b: &str) -> bool {
    let folded = naive_fold(b);
    let base = strip_wildcard(&folded);
    if folded.starts_with("**.") {
        naive_host_match(a, &format!("q0q.{base}"))
            && naive_host_match(a, &format!("q0q.q0q.{base}"))
    } else if folded.starts_with("*.") {
        naive_host_match(a, &format!("q0q.{base}"))
    } else {
        naive_host_match(a, base)
    }
}

/// The pattern without its one leading `*.` or `**.`.
fn strip_wildcard(pattern: &str) -> &str {
    pattern
        .strip_prefix("**.")
        .or_else(|| pattern.strip_prefix("*."))
        .unwrap_or(pattern)
}

/// Labels that make near misses likely.
fn label() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "a",
        "b",
        "ab",
        "github",
        "evilgithub",
        "com",
        "example",
        "x-y",
        "-a",
        "a-",
        "A",
        "Com",
        "a_b",
        "1",
        "",
        "*",
    ])
    .prop_map(str::to_owned)
}

fn name() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(label(), 1..5),
        prop::sample::select(vec!["", "", ".", ".."]),
    )
        .prop_map(|(labels, tail)| format!("{}{tail}", labels.join(".")))
}

fn pattern() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["", "", "*.", "**."]),
        prop::collection::vec(label(), 1..4),
    )
        .prop_map(|(head, labels)| format!("{head}{}", labels.join(".")))
}

/// A candidate that is often the pattern itself with labels added, dropped or changed.
fn candidate_for(pattern: String) -> impl Strategy<Value = (String, String)> {
    let base = pattern
        .trim_start_matches("**.")
        .trim_start_matches("*.")
        .to_owned();
    (
        Just(pattern),
        prop_oneof![
            name(),
            (prop::collection::vec(label(), 0..3), Just(base.clone())).prop_map(|(front, base)| {
                let mut labels = front;
                labels.push(base);
                labels.join(".")
            }),
            Just(base.clone()).prop_map(|b| format!("{b}.")),
            Just(base).prop_map(|b| format!("x{b}")),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn host_patterns_match_like_the_reference(
        (pattern, candidate) in pattern().prop_flat_map(candidate_for)
    ) {
        let Ok(compiled) = HostPattern::parse(&pattern) else {
            // Only the names the reference calls valid (and not address-like) parse.
            let base = naive_fold(strip_wildcard(&pattern));
            prop_assert!(
                !naive_valid_name(&base)
                    || base.rsplit('.').next().is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit())),
                "{pattern:?} refused"
            );
            return Ok(());
        };
        prop_assert_eq!(
            compiled.matches(&candidate),
            naive_host_match(&pattern, &candidate),
            "{} vs {:?}", pattern, candidate
        );
    }

    /// Which rules a looked-up name gets: the first rule whose names match decides
    /// whether it resolves at all (a deny rule: no); then every non-deny rule whose names
    /// match, in order.
    #[test]
    fn rules_for_a_name_follow_the_reference(
        rules in prop::collection::vec((pattern(), any::<bool>()), 1..5),
        query in name(),
    ) {
        let mut src = String::from("version: 1\nrules:\n");
        let mut kept: Vec<(String, bool)> = Vec::new();
        for (pattern, deny) in &rules {
            if HostPattern::parse(pattern).is_err() {
                continue;
            }
            let action = if *deny { "deny" } else { "allow" };
            src.push_str(&format!(
                "  - {{name: r{}, to: [\"{pattern}\"], action: {action}}}\n",
                kept.len() + 1
            ));
            kept.push((pattern.clone(), *deny));
        }
        prop_assume!(!kept.is_empty());
        let policy = match parse_str(&src, "prop.yaml") {
            Ok(p) => p,
            // A deny whose every name an earlier allow matches is refused: checked below.
            Err(e) if e.to_string().contains("this deny would never apply") => {
                let dead = kept.iter().enumerate().any(|(i, (p, deny))| {
                    *deny && kept[..i].iter().any(|(e, d)| !d && naive_covers(e, p))
                });
                prop_assert!(dead, "{}: {}", src, e);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("{src}: {e}"))),
        };
        // Otherwise no deny is dead.
        prop_assert!(!kept.iter().enumerate().any(|(i, (p, deny))| {
            *deny && kept[..i].iter().any(|(e, d)| !d && naive_covers(e, p))
        }), "{}", src);
        let matching: Vec<(u16, bool)> = kept
            .iter()
            .zip(1u16..)
            .filter(|((p, _), _)| naive_host_match(p, &query))
            .map(|((_, deny), id)| (id, *deny))
            .collect();
        let want: Vec<u16> = match matching.first() {
            None | Some((_, true)) => Vec::new(),
            Some(_) => matching.iter().filter(|(_, deny)| !deny).map(|(id, _)| *id).collect(),
        };
        prop_assert_eq!(policy.rules_for_name(&query), want.clone(), "{}\n{}", src, query);
        prop_assert_eq!(policy.name_allowed(&query), !want.is_empty());
    }
}

// ---- paths --------------------------------------------------------------------------

/// Whole-segment glob, by plain recursion: `**` takes zero or more segments, `*` within
/// a segment any run of characters, but `*` alone only a non-empty segment.
fn naive_path_match(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| naive_path_match(rest, &path[skip..])),
        Some((glob, rest)) => {
            !path.is_empty()
                && naive_segment_match(glob.as_bytes(), path[0].as_bytes())
                && naive_path_match(rest, &path[1..])
        }
    }
}

fn naive_segment_match(glob: &[u8], text: &[u8]) -> bool {
    if glob == b"*" && text.is_empty() {
        return false;
    }
    naive_run_match(glob, text)
}

fn naive_run_match(glob: &[u8], text: &[u8]) -> bool {
    match glob.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| naive_run_match(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && naive_run_match(rest, &text[1..]),
    }
}

fn glob_segment() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "a", "b", "ab", "*", "**", "a*", "*b", "*.json", "x.json", "%20", "a*b*",
    ])
    .prop_map(str::to_owned)
}

fn path_segment() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "a", "b", "ab", "aab", "abb", "x.json", ".json", "%20", "%2e", "", ".", "..", "%41",
        "a%2Fb", "c",
    ])
    .prop_map(str::to_owned)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// A rule allows a request exactly when the method matches and, in its one normal
    /// form, the path matches a pattern by the plain recursive definition.
    #[test]
    fn path_rules_match_like_the_reference(
        patterns in prop::collection::vec(
            (prop::collection::vec(glob_segment(), 0..4), any::<bool>()), 1..3),
        segments in prop::collection::vec(path_segment(), 0..5),
        slash in any::<bool>(),
        query in prop::sample::select(vec!["", "?x=1", "?a/../b"]),
        method in prop::sample::select(vec!["GET", "POST", "get"]),
    ) {
        let texts: Vec<String> = patterns
            .iter()
            .map(|(segs, slash)| format!("/{}{}", segs.join("/"), if *slash { "/" } else { "" }))
            .collect();
        let globs: Vec<PathGlob> = texts.iter().filter_map(|t| t.parse().ok()).collect();
        prop_assume!(!globs.is_empty());
        let rule = HttpRule {
            methods: vec![MethodPattern::Token("GET".into())],
            paths: globs.clone(),
        };
        let path = format!("/{}{}", segments.join("/"), if slash { "/" } else { "" });
        let target = format!("{path}{query}");
        let want = method == "GET"
            && normalize_target(&target).is_ok_and(|normal| {
                let normal_path = normal.split_once('?').map_or(normal.as_str(), |(p, _)| p);
                let segs: Vec<&str> = normal_path[1..].split('/').collect();
                globs.iter().any(|g| {
                    let pat: Vec<&str> = g.as_str()[1..].split('/').collect();
                    naive_path_match(&pat, &segs)
                })
            });
        prop_assert_eq!(rule.allows(method, &target), want, "{:?} {}", texts, target);
    }

    /// Normalising is idempotent, and a normal form holds nothing an origin could read
    /// two ways.
    #[test]
    fn normal_forms_are_fixed_points(raw in "(/|[a-zA-Z0-9._~;%-]|%[0-9a-fA-F]{2}){0,24}(\\?[ -~]{0,6})?") {
        if let Ok(normal) = normalize_target(&raw) {
            prop_assert_eq!(normalize_target(&normal), Ok(normal.clone()));
            let path = normal.split_once('?').map_or(normal.as_str(), |(p, _)| p);
            prop_assert!(!path.contains("//") && !path.contains(';'));
            prop_assert!(path.split('/').all(|s| s != "." && s != ".."));
        }
    }
}
