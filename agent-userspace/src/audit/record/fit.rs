//! Keeping every audit line within one atomic pipe write.
//!
//! Some of a record's strings come from the sandbox or the network (paths, query keys,
//! names, reasons quoting them), so a line could otherwise grow without bound. A write of
//! more than `PIPE_BUF` bytes to a pipe may be interleaved with another writer's (the
//! daemon's own diagnostics when both streams share a pipe), and log shippers cut long
//! lines. A record whose line would be longer is encoded again with its longest strings
//! cut (ending in `…`) and its longest lists shortened, tighter each pass, and carries
//! `egress.truncated: true`. Timestamps, versions, `event` (but its reason) and the
//! sequence number are never touched.

use serde::Serialize;
use serde_json::Value;

/// The longest line, its `\n` included.
pub const MAX_LINE: usize = libc::PIPE_BUF;

/// The passes: (most bytes kept of a string, most entries kept of a list).
const PASSES: [(usize, usize); 4] = [(1024, 32), (256, 8), (64, 2), (16, 1)];

/// Keys at the top of a record that are never shortened.
const KEPT: [&str; 3] = ["@timestamp", "ecs", "observer"];

/// `wire` encoded (without its `\n`) so that the line fits in [`MAX_LINE`], for a record
/// whose full encoding does not. After the last pass the line is returned as it is.
pub(super) fn shortened(wire: &impl Serialize) -> serde_json::Result<Vec<u8>> {
    let mut value = serde_json::to_value(wire)?;
    if let Some(egress) = value.get_mut("egress").and_then(Value::as_object_mut) {
        egress.insert("truncated".to_owned(), Value::Bool(true));
    }
    let mut line = Vec::new();
    for (string_max, list_max) in PASSES {
        if let Some(top) = value.as_object_mut() {
            for (key, field) in top.iter_mut() {
                match key.as_str() {
                    k if KEPT.contains(&k) => {}
                    "event" => {
                        if let Some(reason) = field.get_mut("reason") {
                            shorten(reason, string_max, list_max);
                        }
                    }
                    // Query keys stay `key=&key=...`: cut after a whole key.
                    "url" => {
                        let Some(url) = field.as_object_mut() else {
                            continue;
                        };
                        for (name, part) in url.iter_mut() {
                            match (name.as_str(), part) {
                                ("query", Value::String(query)) => cut_query(query, string_max),
                                (_, part) => shorten(part, string_max, list_max),
                            }
                        }
                        // No whole key fits: none is written.
                        if url.get("query").is_some_and(|q| q == "") {
                            url.remove("query");
                        }
                    }
                    _ => shorten(field, string_max, list_max),
                }
            }
        }
        line.clear();
        serde_json::to_writer(&mut line, &value)?;
        if line.len() < MAX_LINE {
            break;
        }
    }
    Ok(line)
}

fn shorten(value: &mut Value, string_max: usize, list_max: usize) {
    match value {
        Value::String(s) => cut(s, string_max),
        Value::Array(items) => {
            items.truncate(list_max);
            for item in items {
                shorten(item, string_max, list_max);
            }
        }
        Value::Object(fields) => {
            for field in fields.values_mut() {
                shorten(field, string_max, list_max);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, ending in `…`.
fn cut(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

/// Cuts `key=&key=...` to its whole keys within `max` bytes (none: empty).
fn cut_query(query: &mut String, max: usize) {
    if query.len() <= max {
        return;
    }
    let end = query.as_bytes()[..=max]
        .iter()
        .rposition(|b| *b == b'&')
        .unwrap_or(0);
    query.truncate(end);
}

#[cfg(test)]
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
    }
}
