//! The audit trail's last check: each record, once encoded, is scanned for every known
//! secret whatever field carries it (a git ref name, a DNS name, a reason quoting what a
//! sandbox sent), and each match is masked in place before the line is written. The
//! daemon installs the search once its credentials are loaded; this module knows nothing
//! of them, only where a JSON line may be changed and stay valid.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// Finds the secrets in one encoded record: their byte ranges, in any order, overlapping
/// or not.
pub type FindSecrets = Arc<dyn Fn(&[u8]) -> Vec<Range<usize>> + Send + Sync>;

/// What stands in for a masked byte, as the proxy's marker does: `[redacted]` and then
/// `*` for as long as the secret was (in records and the daemon's log alike).
const MARKER: &[u8] = b"[redacted]";

/// The search every record goes through before it is written, shared by the audit
/// handle (which installs it) and the writer.
#[derive(Clone, Default)]
pub struct Redactor(Arc<OnceLock<FindSecrets>>);

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Redactor")
            .field(&self.0.get().is_some())
            .finish()
    }
}

impl Redactor {
    /// Installs the search; only the first call counts.
    pub fn install(&self, find: FindSecrets) -> bool {
        self.0.set(find).is_ok()
    }

    /// Masks every secret in `line` (one encoded record). Returns how many ranges were
    /// masked.
    pub fn apply(&self, line: &mut [u8]) -> usize {
        let merged = self.found(line);
        mask_json(line, &merged);
        merged.len()
    }

    /// Masks every secret in one string of a record, before it is encoded (and perhaps
    /// cut): a match that does not begin and end on character boundaries takes the whole
    /// string with it.
    pub fn mask_string(&self, s: &mut String) {
        let merged = self.found(s.as_bytes());
        if merged
            .iter()
            .any(|r| !s.is_char_boundary(r.start) || !s.is_char_boundary(r.end))
        {
            *s = String::from_utf8_lossy(MARKER).into_owned();
            return;
        }
        for r in merged {
            let len = r.len();
            let marker: String = (0..len)
                .map(|i| char::from(MARKER.get(i).copied().unwrap_or(b'*')))
                .collect();
            s.replace_range(r, &marker);
        }
    }

    /// The secrets' ranges in `text`, overlapping ones merged, in order.
    fn found(&self, text: &[u8]) -> Vec<Range<usize>> {
        let Some(find) = self.0.get() else {
            return Vec::new();
        };
        let mut found = find(text);
        found.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(found.len());
        for r in found {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged
    }
}

/// Replaces, within each range, the bytes of JSON string content that stand for
/// themselves (not a quote, not part of an escape like `\"` or `\u002B`, ASCII only) with
/// the marker: the line stays valid JSON, and what is left of a secret is at most the
/// punctuation its escapes spell.
fn mask_json(line: &mut [u8], ranges: &[Range<usize>]) {
    if ranges.is_empty() {
        return;
    }
    let mut in_string = false;
    // Bytes of an escape still to pass (after its backslash).
    let mut escape_left = 0u8;
    let mut next = 0;
    for i in 0..line.len() {
        let b = line[i];
        let plain = if escape_left > 0 {
            escape_left -= 1;
            if escape_left == 0 && b == b'u' && i > 0 && line[i - 1] == b'\\' {
                escape_left = 4;
            }
            false
        } else if in_string {
            match b {
                b'"' => {
                    in_string = false;
                    false
                }
                b'\\' => {
                    escape_left = 1;
                    false
                }
                _ => b.is_ascii(),
            }
        } else {
            if b == b'"' {
                in_string = true;
            }
            false
        };
        while next < ranges.len() && ranges[next].end <= i {
            next += 1;
        }
        if plain {
            if let Some(r) = ranges.get(next).filter(|r| r.start <= i) {
                let at = i - r.start;
                line[i] = MARKER.get(at).copied().unwrap_or(b'*');
            }
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn find(needles: &'static [&'static str]) -> FindSecrets {
        Arc::new(move |hay: &[u8]| {
            let mut out = Vec::new();
            for n in needles {
                let n = n.as_bytes();
                for (i, w) in hay.windows(n.len()).enumerate() {
                    if w == n {
                        out.push(i..i + n.len());
                    }
                }
            }
            out
        })
    }

    #[test]
    fn secrets_in_any_field_are_masked_and_the_line_stays_json() {
        let r = Redactor::default();
        let mut line = br#"{"git":{"ref":"refs/heads/agent/SECRETVALUE1234"},"reason":"pushed SECRETVALUE1234 \"x\""}"#.to_vec();
        assert_eq!(r.apply(&mut line), 0, "nothing installed, nothing changes");
        assert!(r.install(find(&["SECRETVALUE1234"])));
        assert_eq!(r.apply(&mut line), 2);
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(!text.contains("SECRETVALUE"), "{text}");
        assert!(text.contains("agent/[redacted]*****\""), "{text}");
        serde_json::from_slice::<serde_json::Value>(&line).unwrap();
    }

    #[test]
    fn escapes_inside_a_match_are_kept_whole() {
        let r = Redactor::default();
        // The secret `ab"c+def/ghij` as JSON spells it, with its `+` as \u002B.
        r.install(find(&[r#"ab\"c\u002Bdef\/ghij"#]));
        let mut line = br#"{"a":"x ab\"c\u002Bdef\/ghij y","b":1}"#.to_vec();
        assert_eq!(r.apply(&mut line), 1);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let a = value["a"].as_str().unwrap();
        assert!(!a.contains("def") && !a.contains("ghij"), "{a}");
        assert!(a.starts_with("x [r") && a.ends_with(" y"), "{a}");
    }

    #[test]
    fn overlapping_matches_are_one_range() {
        let r = Redactor::default();
        r.install(find(&["SECRETVALUE", "VALUE1234"]));
        let mut line = br#"{"a":"SECRETVALUE1234"}"#.to_vec();
        assert_eq!(r.apply(&mut line), 1);
        assert_eq!(line, br#"{"a":"[redacted]*****"}"#.to_vec());
    }
}
