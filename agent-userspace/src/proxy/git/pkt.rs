//! pkt-lines: the command list at the start of a `git-receive-pack` request, and the
//! status report the proxy answers with when it refuses a push.
//!
//! A pkt-line is four hex digits giving its length (including those four) and that many
//! bytes less four; `0000` is a flush. The request is (gitprotocol-pack(5)):
//!
//! ```text
//! *PKT-LINE("shallow" SP oid)
//! PKT-LINE(old-oid SP new-oid SP refname NUL capabilities) *PKT-LINE(old SP new SP ref)
//! flush-pkt
//! [push options, flush] [packfile]
//! ```
//!
//! The command list is parsed, and, when the first command announces `push-options`, the
//! option lines up to the next flush; what follows is forwarded untouched.

use bytes::{BufMut as _, Bytes, BytesMut};

use crate::policy::git::{is_zero, Command, CommandList};
use crate::text::sanitize;

/// Largest pkt-line length (header included) git allows.
pub const MAX_PKT_LEN: usize = 65520;
/// Largest payload of one side-band-64k packet (length, band byte, data).
const SIDEBAND_64K_DATA: usize = MAX_PKT_LEN - 5;
/// Largest payload of one (old, 1000-byte) side-band packet.
const SIDEBAND_DATA: usize = 1000 - 5;

/// Parses the command section at the start of `buf`. `Ok(None)`: more bytes are
/// needed. `Err`: the section is malformed (the message says how, and never quotes more
/// than a ref name).
pub fn parse_commands(buf: &[u8]) -> Result<Option<CommandList>, String> {
    let mut list = CommandList::default();
    let mut at = 0usize;
    let mut oid_len: Option<usize> = None;
    let mut seen_command = false;
    loop {
        let Some(header) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        let len = pkt_len(header)?;
        if len == 0 {
            at += 4;
            if seen_command && list.has("push-options") {
                return parse_options(buf, at, list);
            }
            list.len = at;
            return Ok(Some(list));
        }
        if len < 4 {
            return Err(format!(
                "pkt-line length {len} is not allowed in a push's command list"
            ));
        }
        if len == 4 {
            return Err("empty pkt-line in a push's command list".to_owned());
        }
        let Some(payload) = buf.get(at + 4..at + len) else {
            return Ok(None);
        };
        at += len;
        let payload = payload.strip_suffix(b"\n").unwrap_or(payload);

        if !seen_command {
            if let Some(oid) = payload.strip_prefix(b"shallow ") {
                check_oid(oid, &mut oid_len)?;
                continue;
            }
            if payload.starts_with(b"push-cert\0") {
                return Err(
                    "signed pushes (push-cert) are not supported through the egress proxy"
                        .to_owned(),
                );
            }
        }
        let line = if seen_command {
            payload
        } else {
            match payload.iter().position(|&b| b == 0) {
                Some(nul) => {
                    let caps = &payload[nul + 1..];
                    // git separates capabilities by any of space, tab, CR and LF: only
                    // single spaces are read here, so anything else is refused rather
                    // than read differently (a tab-separated `push-options` would hide
                    // the options from the judgement).
                    if let Some(&b) = caps.iter().find(|&&b| b != b' ' && !b.is_ascii_graphic()) {
                        return Err(format!(
                            "the capability list holds byte 0x{b:02x} (only printable ASCII \
                             separated by spaces is accepted)"
                        ));
                    }
                    let caps = std::str::from_utf8(caps)
                        .map_err(|_| "the capability list is not UTF-8".to_owned())?;
                    list.capabilities = caps
                        .split(' ')
                        .filter(|c| !c.is_empty())
                        .map(str::to_owned)
                        .collect();
                    &payload[..nul]
                }
                None => payload,
            }
        };
        seen_command = true;
        if line.contains(&0) {
            return Err("a command after the first carries a NUL byte".to_owned());
        }
        if list.commands.len() == MAX_COMMANDS {
            return Err(format!(
                "more than {MAX_COMMANDS} ref updates in one push (push them in parts): its \
                 record lists every one"
            ));
        }
        list.commands.push(parse_command(line, &mut oid_len)?);
    }
}

/// Ref updates one push may carry: the push's record lists each, and stays one line a
/// log shipper takes whole.
pub const MAX_COMMANDS: usize = 16;

/// The push options after the command list (from `at`): pkt-lines up to a flush.
fn parse_options(
    buf: &[u8],
    mut at: usize,
    mut list: CommandList,
) -> Result<Option<CommandList>, String> {
    loop {
        let Some(header) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        let len = pkt_len(header)?;
        if len == 0 {
            list.len = at + 4;
            return Ok(Some(list));
        }
        if len <= 4 {
            return Err(format!(
                "pkt-line length {len} is not allowed among push options"
            ));
        }
        let Some(payload) = buf.get(at + 4..at + len) else {
            return Ok(None);
        };
        at += len;
        let payload = payload.strip_suffix(b"\n").unwrap_or(payload);
        let option =
            std::str::from_utf8(payload).map_err(|_| "a push option is not UTF-8".to_owned())?;
        list.options.push(option.to_owned());
    }
}

/// The length a pkt-line header gives.
fn pkt_len(header: &[u8]) -> Result<usize, String> {
    let mut len = 0usize;
    for &b in header {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => {
                return Err(format!(
                    "pkt-line length {:?} is not four hex digits",
                    String::from_utf8_lossy(header)
                ))
            }
        };
        len = len * 16 + usize::from(digit);
    }
    if len > MAX_PKT_LEN {
        return Err(format!(
            "pkt-line length {len} exceeds the maximum {MAX_PKT_LEN}"
        ));
    }
    Ok(len)
}

fn parse_command(line: &[u8], oid_len: &mut Option<usize>) -> Result<Command, String> {
    let text = std::str::from_utf8(line).map_err(|_| "a push command is not UTF-8".to_owned())?;
    let mut fields = text.splitn(3, ' ');
    let (Some(old), Some(new), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
        return Err("a push command is not `<old-oid> <new-oid> <ref>`".to_owned());
    };
    check_oid(old.as_bytes(), oid_len)?;
    check_oid(new.as_bytes(), oid_len)?;
    if is_zero(old) && is_zero(new) {
        return Err(format!(
            "the command for {name} has zero object ids on both sides"
        ));
    }
    if name.is_empty() {
        return Err("a push command has an empty ref name".to_owned());
    }
    Ok(Command {
        old: old.to_ascii_lowercase(),
        new: new.to_ascii_lowercase(),
        name: name.to_owned(),
    })
}

/// An object id: 40 (SHA-1) or 64 (SHA-256) hex digits, the same length throughout.
fn check_oid(oid: &[u8], oid_len: &mut Option<usize>) -> Result<(), String> {
    if !(oid.len() == 40 || oid.len() == 64) || !oid.iter().all(u8::is_ascii_hexdigit) {
        return Err("an object id is not 40 or 64 hex digits".to_owned());
    }
    match oid_len {
        Some(len) if *len != oid.len() => {
            Err("object ids of different lengths (SHA-1 and SHA-256) are mixed".to_owned())
        }
        _ => {
            *oid_len = Some(oid.len());
            Ok(())
        }
    }
}

/// Appends one pkt-line holding `payload`. Callers keep payloads under the limit.
fn put_pkt(out: &mut BytesMut, payload: &[u8]) {
    let len = payload.len() + 4;
    out.put_slice(format!("{len:04x}").as_bytes());
    out.put_slice(payload);
}

/// Whether the client asked for a status report at all (`report-status` or
/// `report-status-v2`); without one it would not read the proxy's answer.
pub fn wants_report(list: &CommandList) -> bool {
    list.has("report-status") || list.has("report-status-v2")
}

/// The body of a receive-pack response reporting every command: `unpack ok`, then
/// `ok <ref>` or `ng <ref> <reason>` per command, then a flush; carried on side-band
/// channel 1 (followed by a flush) when the client asked for `side-band-64k` or
/// `side-band`. Reasons are cut to at most 1000 bytes; control characters in reasons and
/// ref names are escaped (`\u{a}`), never echoed.
pub fn status_report(list: &CommandList, results: &[Result<(), String>]) -> Bytes {
    let mut report = BytesMut::new();
    put_pkt(&mut report, b"unpack ok\n");
    for (command, result) in list.commands.iter().zip(results) {
        // Echoed as sent when it is printable (git matches it to the ref it pushed);
        // a name with control characters is refused anyway, and escaped here.
        let name = sanitize(&command.name, MAX_PKT_LEN / 2);
        let line = match result {
            Ok(()) => format!("ok {name}\n"),
            Err(reason) => format!("ng {name} {}\n", sanitize(reason, 1000)),
        };
        // A ref name is bounded by the request's own pkt-line, so this fits.
        put_pkt(&mut report, line.as_bytes());
    }
    report.put_slice(b"0000");

    let chunk = if list.has("side-band-64k") {
        SIDEBAND_64K_DATA
    } else if list.has("side-band") {
        SIDEBAND_DATA
    } else {
        return report.freeze();
    };
    let mut out = BytesMut::with_capacity(report.len() + 16);
    for piece in report.chunks(chunk) {
        let mut payload = Vec::with_capacity(piece.len() + 1);
        payload.push(1u8);
        payload.extend_from_slice(piece);
        put_pkt(&mut out, &payload);
    }
    out.put_slice(b"0000");
    out.freeze()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    fn pkt(s: &str) -> Vec<u8> {
        let mut v = format!("{:04x}", s.len() + 4).into_bytes();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn request(lines: &[String]) -> Vec<u8> {
        let mut v: Vec<u8> = lines.iter().flat_map(|l| pkt(l)).collect();
        v.extend_from_slice(b"0000PACK");
        v
    }

    #[test]
    fn a_push_updates_at_most_sixteen_refs() {
        let lines = |n: usize| -> Vec<String> {
            (0..n)
                .map(|i| {
                    let caps = if i == 0 { "\0report-status" } else { "" };
                    format!("{Z} {B} refs/heads/agent/{i}{caps}")
                })
                .collect()
        };
        let list = parse_commands(&request(&lines(MAX_COMMANDS)))
            .unwrap()
            .unwrap();
        assert_eq!(list.commands.len(), MAX_COMMANDS);
        let e = parse_commands(&request(&lines(MAX_COMMANDS + 1))).unwrap_err();
        assert!(e.contains("more than 16 ref updates"), "{e}");
    }

    #[test]
    fn command_list_is_parsed() {
        let body = request(&[
            format!("{A} {B} refs/heads/main\0report-status side-band-64k agent=git/2.47.3"),
            format!("{Z} {B} refs/heads/agent/x"),
            format!("{A} {Z} refs/tags/v1\n"),
        ]);
        let list = parse_commands(&body).unwrap().unwrap();
        assert_eq!(list.len, body.len() - 4);
        assert_eq!(
            list.capabilities,
            ["report-status", "side-band-64k", "agent=git/2.47.3"]
        );
        assert_eq!(list.commands.len(), 3);
        assert_eq!(list.commands[0].name, "refs/heads/main");
        assert_eq!(list.commands[1].old, Z);
        assert!(!list.commands[1].is_delete());
        assert_eq!(list.commands[2].name, "refs/tags/v1");
        assert!(list.commands[2].is_delete());

        // Every prefix short of the flush needs more bytes.
        for cut in 0..list.len {
            assert_eq!(parse_commands(&body[..cut]), Ok(None), "cut at {cut}");
        }
        // A bare flush: git's probe request.
        assert_eq!(parse_commands(b"0000").unwrap().unwrap().commands, []);
        // Shallow lines first; SHA-256 ids.
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let body = request(&[
            format!("shallow {a}"),
            format!("{a} {b} refs/heads/main\0report-status"),
        ]);
        let list = parse_commands(&body).unwrap().unwrap();
        assert_eq!(list.commands[0].new, b);
    }

    #[test]
    fn malformed_command_lists_are_refused() {
        let bad: Vec<Vec<u8>> = vec![
            b"00zz".to_vec(),
            b"0003".to_vec(),
            b"0004".to_vec(),
            b"0001".to_vec(),
            b"fff1".to_vec(),
            request(&[format!("{A} {B}")]),
            request(&[format!("{A} {B}refs/heads/x")]),
            request(&[format!("{A}x {B} refs/heads/x")]),
            request(&[format!("{Z} {Z} refs/heads/x")]),
            request(&[format!("{A} {} refs/heads/x", "b".repeat(64))]),
            request(&[format!("{A} {B} ")]),
            request(&[
                format!("{A} {B} refs/heads/x\0caps"),
                format!("{A} {B} refs/heads/y\0z"),
            ]),
            request(&["push-cert\0report-status".to_owned()]),
            request(&["shallow 12".to_owned()]),
        ];
        for body in bad {
            assert!(
                parse_commands(&body).is_err(),
                "{:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn status_report_bytes() {
        let body = request(&[
            format!("{A} {B} refs/heads/main\0report-status side-band-64k"),
            format!("{Z} {B} refs/heads/agent/x"),
        ]);
        let mut list = parse_commands(&body).unwrap().unwrap();
        let results = [
            Err("refused by egress policy: allowed refs/heads/agent/**".to_owned()),
            Err("not pushed: another ref was refused".to_owned()),
        ];
        let inner = "000eunpack ok\n\
                     004dng refs/heads/main refused by egress policy: allowed refs/heads/agent/**\n\
                     003eng refs/heads/agent/x not pushed: another ref was refused\n\
                     0000";
        let mut expected = format!("{:04x}\u{1}", inner.len() + 5).into_bytes();
        expected.extend_from_slice(inner.as_bytes());
        expected.extend_from_slice(b"0000");
        assert_eq!(status_report(&list, &results), expected);

        list.capabilities = vec!["report-status".to_owned()];
        assert_eq!(status_report(&list, &results), inner.as_bytes());
        assert!(wants_report(&list));
        list.capabilities = vec!["side-band".to_owned(), "report-status-v2".to_owned()];
        let banded = status_report(&list, &[Ok(()), Err("x".repeat(3000))]);
        // Split into 1000-byte side-band packets, each on band 1.
        assert!(banded.starts_with(b"03e8\x01000eunpack ok\n"), "{banded:?}");
        list.capabilities.clear();
        assert!(!wants_report(&list));
    }
}
