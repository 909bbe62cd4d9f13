//! Keeping audit lines within one atomic pipe write.
//!
//! Some of a record's strings come from the sandbox or the network (paths, query keys,
//! names, reasons quoting them), so a line could otherwise grow without bound. A write of
//! more than `PIPE_BUF` bytes to a pipe may be interleaved with another writer's (the
//! daemon's own diagnostics when both streams share a pipe), and log shippers cut long
//! lines. A record whose line would be longer is encoded again with its longest strings
//! cut to one length (ending in `…`; query keys after a whole key), the shortest that
//! makes it fit, and carries `egress.truncated: true`.
//!
//! Lengths are counted as written, escapes included (a control character takes six
//! bytes), so a string of control characters the sandbox chose is cut like a long one.
//! Nothing that identifies or decides is cut: strings of at most [`FLOOR`] bytes
//! (addresses, ids, timestamps, digests, names of rules and sandboxes), `@timestamp`,
//! `ecs`, `observer`, `event` (but its reason), and no list loses an entry (the
//! addresses a DNS answer installed, the refs a push updated: both bounded where they
//! are made, 32 addresses per answer and 16 refs per push). A record whose protected
//! part alone is longer than `PIPE_BUF` is written whole, longer.

use serde::Serialize;
use serde_json::Value;

/// The longest line, its `\n` included, when the record allows.
pub const MAX_LINE: usize = libc::PIPE_BUF;

/// Strings this long or shorter are never cut.
const FLOOR: usize = 64;

/// Keys at the top of a record that are never shortened.
const KEPT: [&str; 3] = ["@timestamp", "ecs", "observer"];

/// `wire` encoded (without its `\n`) for a record whose full encoding is at least
/// [`MAX_LINE`] bytes: shortened to fit if it can be.
pub(super) fn shortened(
    wire: &impl Serialize,
    mask: &dyn Fn(&mut String),
) -> serde_json::Result<Vec<u8>> {
    let mut value = serde_json::to_value(wire)?;
    // Secrets are masked before anything is cut: a cut could leave a piece of one too
    // short for the search to recognise.
    visit(&mut value, &mut |s, _| mask(s));
    if let Some(egress) = value.get_mut("egress").and_then(Value::as_object_mut) {
        egress.insert("truncated".to_owned(), Value::Bool(true));
    }
    let mut line = encoded(&value);
    // Escaping makes the encoded length differ from the strings' own: a few rounds.
    for _ in 0..8 {
        if line.len() < MAX_LINE {
            break;
        }
        let mut lengths = Vec::new();
        visit(&mut value, &mut |s, _| lengths.push(written_len(s)));
        let Some(cap) = cap_for(&mut lengths, line.len() + 1 - MAX_LINE) else {
            break;
        };
        visit(&mut value, &mut |s, query| {
            if query {
                cut_query(s, cap);
            } else {
                cut(s, cap);
            }
        });
        // A query none of whose keys fits is not written.
        if let Some(url) = value.get_mut("url").and_then(Value::as_object_mut) {
            if url.get("query").is_some_and(|q| q == "") {
                url.remove("query");
            }
        }
        line = encoded(&value);
    }
    Ok(line)
}

/// `value` as a line is written (the escaping of [`super::json`], not serde_json's).
fn encoded(value: &Value) -> Vec<u8> {
    let mut line = Vec::with_capacity(MAX_LINE);
    super::json::Json::json(value, &mut line);
    line
}

/// The largest length that, every cuttable string longer than it cut to it, saves at
/// least `excess` bytes; the floor if none does; `None` if nothing can be cut.
fn cap_for(lengths: &mut [usize], excess: usize) -> Option<usize> {
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    if lengths.first().is_none_or(|&l| l <= FLOOR) {
        return None;
    }
    let saved = |cap: usize| -> usize { lengths.iter().map(|&l| l.saturating_sub(cap)).sum() };
    // `saved` falls as `cap` grows: the largest cap in [FLOOR, longest) saving enough.
    let (mut low, mut high) = (FLOOR, lengths[0]);
    if saved(low) < excess {
        return Some(FLOOR);
    }
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if saved(mid) >= excess {
            low = mid;
        } else {
            high = mid;
        }
    }
    Some(low)
}

/// Calls `f` on every string that may be cut (longer than [`FLOOR`], outside the kept
/// keys), with whether it is `url.query`.
fn visit(value: &mut Value, f: &mut impl FnMut(&mut String, bool)) {
    let Some(top) = value.as_object_mut() else {
        return;
    };
    for (key, field) in top.iter_mut() {
        match key.as_str() {
            k if KEPT.contains(&k) => {}
            "event" => {
                if let Some(Value::String(reason)) = field.get_mut("reason") {
                    if written_len(reason) > FLOOR {
                        f(reason, false);
                    }
                }
            }
            "url" => {
                for (name, part) in field.as_object_mut().into_iter().flatten() {
                    if name == "query" {
                        if let Value::String(query) = part {
                            if written_len(query) > FLOOR {
                                f(query, true);
                            }
                        }
                    } else {
                        strings(part, f);
                    }
                }
            }
            _ => strings(field, f),
        }
    }
}

fn strings(value: &mut Value, f: &mut impl FnMut(&mut String, bool)) {
    match value {
        Value::String(s) if written_len(s) > FLOOR => f(s, false),
        Value::Array(items) => items.iter_mut().for_each(|v| strings(v, f)),
        Value::Object(fields) => fields.values_mut().for_each(|v| strings(v, f)),
        _ => {}
    }
}

/// The bytes `s` takes in a line, its escapes included, without the quotes.
fn written_len(s: &str) -> usize {
    s.chars().map(super::json::written_len).sum()
}

/// Cuts `s` to at most `max` bytes as written, on a character boundary, ending in `…`.
fn cut(s: &mut String, max: usize) {
    if written_len(s) <= max {
        return;
    }
    let room = max.saturating_sub('…'.len_utf8());
    let (mut used, mut end) = (0, 0);
    for (i, c) in s.char_indices() {
        used += super::json::written_len(c);
        if used > room {
            break;
        }
        end = i + c.len_utf8();
    }
    s.truncate(end);
    s.push('…');
}

/// Cuts `key=&key=...` to its whole keys within `max` bytes as written (none: empty).
fn cut_query(query: &mut String, max: usize) {
    if written_len(query) <= max {
        return;
    }
    // The last `&` with what is before it within `max`.
    let (mut used, mut end) = (0, 0);
    for (i, c) in query.char_indices() {
        if c == '&' {
            end = i;
        }
        used += super::json::written_len(c);
        if used > max {
            break;
        }
    }
    query.truncate(end);
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn strings_are_cut_on_character_boundaries() {
        let mut s = "ééééé".to_owned();
        cut(&mut s, 6);
        assert_eq!(s, "é…");
        let mut s = "short".to_owned();
        cut(&mut s, 16);
        assert_eq!(s, "short");
        let mut s = "x".repeat(40);
        cut(&mut s, 16);
        assert_eq!(s.len(), 16);
        assert!(s.ends_with('…'));
    }

    /// A string of control characters is measured as written (six bytes each): cut like
    /// a long one, so a push of sixteen such ref names still fits one write.
    #[test]
    fn escapes_count_in_what_is_cut() {
        let mut s = "\u{1}".repeat(64);
        assert_eq!(written_len(&s), 6 * 64);
        cut(&mut s, 64);
        assert_eq!(s, format!("{}…", "\u{1}".repeat(10)));
        assert!(written_len(&s) <= 64);
        let update = serde_json::json!({
            "ref_name": "\u{1}".repeat(64),
            "old": "0".repeat(64),
            "new": "1".repeat(64),
            "allowed": false,
        });
        let record = serde_json::json!({
            "@timestamp": "2026-12-05T13:00:00.000000Z",
            "event": {"action": "request", "reason": "git push refused"},
            "egress": {"git": {"ref_updates": vec![update; 16]}},
        });
        let line = shortened(&record, &|_| {}).unwrap();
        assert!(line.len() < MAX_LINE, "{} bytes", line.len());
        let back: Value = serde_json::from_slice(&line).unwrap();
        let updates = back["egress"]["git"]["ref_updates"].as_array().unwrap();
        assert_eq!(updates.len(), 16);
        assert!(updates.iter().all(|u| u["old"] == "0".repeat(64)));
        assert_eq!(back["egress"]["truncated"], true);
    }

    #[test]
    fn query_keys_are_cut_after_a_whole_key() {
        let mut q = "a=&bb=&ccc=".to_owned();
        cut_query(&mut q, 7);
        assert_eq!(q, "a=&bb=");
        let mut q = "a=&bb=".to_owned();
        cut_query(&mut q, 6);
        assert_eq!(q, "a=&bb=");
        let mut q = "abcdef=&b=".to_owned();
        cut_query(&mut q, 4);
        assert_eq!(q, "");
        // Measured as written: each `"` takes two bytes.
        let mut q = "a\"=&b\"\"=&c=".to_owned();
        cut_query(&mut q, 11);
        assert_eq!(q, "a\"=&b\"\"=");
        cut_query(&mut q, 10);
        assert_eq!(q, "a\"=");
    }

    #[test]
    fn the_cap_is_the_largest_that_saves_enough() {
        assert_eq!(cap_for(&mut [10, 20], 5), None);
        assert_eq!(cap_for(&mut [1000, 100], 100), Some(900));
        // 1000 and 500 both cut to 400 save 700.
        assert_eq!(cap_for(&mut [500, 1000, 80], 700), Some(400));
        assert_eq!(cap_for(&mut [500, 1000], 10_000), Some(FLOOR));
    }
}
