//! Text the daemon sends back to a sandbox or writes in a reason (refusal bodies, git
//! status reports, policy messages): never a control character, and bounded, whatever the
//! request carried.

/// Characters that change how the text around them is shown without being seen: the
/// bidirectional formatting controls (an override makes `rule=gh` read backwards or
/// moves text across a field), zero-width and other invisible format characters (soft
/// hyphen, invisible operators, interlinear annotation), variation selectors, the blank
/// fillers that show nothing, and the tag characters (`U+E0000`..`U+E007F`: an ASCII text
/// no one sees, which a language model reading the log does).
fn reorders_or_hides(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{034f}'
            | '\u{061c}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e007f}'
            | '\u{e0100}'..='\u{e01ef}'
    )
}

/// Characters a reader of a line must never meet raw: control characters (C0, DEL, C1:
/// a terminal obeys some, `U+0085` ends a line for some readers), the bidirectional,
/// zero-width and other invisible ones ([`reorders_or_hides`]), and the line and
/// paragraph separators (line ends for JavaScript and for some log viewers).
pub fn misleads(c: char) -> bool {
    c.is_control() || reorders_or_hides(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Why `name` cannot name a sandbox, if it cannot: 1-64 characters, each an ASCII letter
/// or digit or one of `. _ - / : @ +`. A sandbox's name is in every record, label and
/// status line about it, so it must read as what it is: no white space, no characters
/// that look like others (`prod-agent` and `prod-agent` with a zero-width space would be
/// two sandboxes the same to the eye, in the log, the SIEM and the dashboard).
pub fn sandbox_name_problem(name: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/:@+".contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        Some(format!(
            "invalid sandbox name {:?}: 1-64 characters, each an ASCII letter or digit or \
             one of . _ - / : @ +",
            sanitize(name, 100)
        ))
    } else if RESERVED_SANDBOX_NAMES
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name))
        || name
            .get(..REFUSED_CONTAINER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(REFUSED_CONTAINER_PREFIX))
    {
        Some(format!(
            "sandbox name {name:?} is reserved: records name what no sandbox can be placed \
             in so (`unknown`, `none`, and `oci:` and an id for a container the OCI hook \
             refused; choose another)"
        ))
    } else {
        None
    }
}

/// Names records give where no sandbox is known (an event of a detached one no longer
/// remembered, a connection the proxy cannot place, the index of none): no sandbox may
/// take one, or its records could not be told from those.
pub const RESERVED_SANDBOX_NAMES: [&str; 2] = ["unknown", "none"];

/// What the name of a container the OCI hook refused begins with (the container's id
/// follows): no sandbox's name may.
pub const REFUSED_CONTAINER_PREFIX: &str = "oci:";

/// `s` with every character that [`misleads`] written as `\u{..}`, and cut to at most `max` bytes (on a
/// character boundary, ending in `...` when cut).
pub fn sanitize(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let start = out.len();
        if misleads(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
        if out.len() > max {
            out.truncate(start);
            // Room for the ellipsis.
            while out.len() + 3 > max {
                match out.pop() {
                    Some(_) => {}
                    None => break,
                }
            }
            out.push_str("...");
            break;
        }
    }
    out
}

/// The SHA-256 of `bytes`, lower-case hex (64 digits).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .flat_map(|b| [b >> 4, b & 0xf])
        .map(|n| char::from_digit(u32::from(n), 16).unwrap_or('0'))
        .collect()
}

/// A name too long for a field of `max` characters, made to fit: the first characters of
/// `shown` (the name, with characters the field refuses replaced), `sep`, and 12 hex
/// digits of the SHA-256 of `whole` (the name as it was), so that names beginning alike
/// stay apart and one name always gives the same.
pub fn cut_with_digest(
    whole: &str,
    shown: impl Iterator<Item = char>,
    max: usize,
    sep: char,
) -> String {
    const DIGEST_HEX: usize = 12;
    let mut out: String = shown.take(max.saturating_sub(DIGEST_HEX + 1)).collect();
    out.push(sep);
    out.push_str(&sha256_hex(whole.as_bytes())[..DIGEST_HEX]);
    out
}

/// Removes every ` at line L column C` and ` at position N` (a YAML or JSON parser's
/// message, for a caller that names the position itself).
pub fn strip_positions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let Some(at) = rest.find(" at ") else {
            out.push_str(rest);
            return out;
        };
        let after = &rest[at + 4..];
        let consumed = position_len(after);
        out.push_str(&rest[..at]);
        if consumed == 0 {
            out.push_str(" at ");
        }
        rest = &after[consumed..];
    }
}

/// Length of a leading `line L column C` or `position N`, or 0.
fn position_len(s: &str) -> usize {
    fn digits(s: &str) -> usize {
        s.bytes().take_while(u8::is_ascii_digit).count()
    }
    if let Some(r) = s.strip_prefix("line ") {
        let n = digits(r);
        if n > 0 {
            if let Some(c) = r[n..].strip_prefix(" column ") {
                let m = digits(c);
                if m > 0 {
                    return "line ".len() + n + " column ".len() + m;
                }
            }
        }
    } else if let Some(r) = s.strip_prefix("position ") {
        let n = digits(r);
        if n > 0 {
            return "position ".len() + n;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::{sandbox_name_problem, sanitize};

    #[test]
    fn sandbox_names_read_as_what_they_are() {
        for good in [
            "agent-1",
            "k8s/default/web-0",
            "crio-3f2a.scope",
            "a",
            "x@y:z+1",
        ] {
            assert_eq!(sandbox_name_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "prod-agent\u{200b}",
            "a b",
            "x  rule=github",
            "é",
            "a\nb",
            "a\"b",
            &"a".repeat(65),
            "unknown",
            "none",
            "Unknown",
            "NONE",
            "oci:3f2a",
            "OCI:x",
        ] {
            assert!(sandbox_name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn control_characters_never_pass() {
        assert_eq!(sanitize("plain text", 100), "plain text");
        assert_eq!(
            sanitize("a\nb\r\0c\u{1b}[31m", 100),
            "a\\u{a}b\\u{d}\\u{0}c\\u{1b}[31m"
        );
        assert_eq!(sanitize("x\u{85}y\u{7f}é", 100), "x\\u{85}y\\u{7f}é");
        // Bidirectional overrides and zero-width characters are shown, not obeyed.
        assert_eq!(
            sanitize("a\u{202e}hg=elur\u{2066}b\u{200b}", 100),
            "a\\u{202e}hg=elur\\u{2066}b\\u{200b}"
        );
        assert_eq!(sanitize("a\u{2028}b\u{2029}", 100), "a\\u{2028}b\\u{2029}");
        assert_eq!(sanitize(&"a".repeat(50), 10), "aaaaaaa...");
        assert_eq!(sanitize(&"é".repeat(50), 10), "ééé...");
        assert_eq!(sanitize("ab\n", 5), "ab...");
        for s in [
            "\u{0}\u{1}\u{9}\u{a}\u{d}\u{1b}\u{7f}\u{80}\u{9f}",
            &"\n".repeat(2000),
        ] {
            let out = sanitize(s, 64);
            assert!(
                out.len() <= 64 && !out.chars().any(char::is_control),
                "{out:?}"
            );
        }
    }
}
