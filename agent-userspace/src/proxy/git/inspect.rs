//! Reading a push's command list off the request body before anything is forwarded.
//!
//! The raw bytes read are kept and forwarded first, unchanged (still gzip-compressed if
//! they were), followed by the rest of the body as it arrives. While they are held they
//! are charged to the sandbox's share of the proxy's held-body budget, and the reading
//! is bounded in time. A refused push is answered at once; the proxy reads and drops the
//! rest of its body afterwards, within bounds, so that its client reads the answer.

use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_ENCODING;
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use super::pkt::{parse_commands, status_report, wants_report};
use crate::audit::RefUpdate;
use crate::policy::git::{CommandList, GitRule, PushJudgement};
use crate::proxy::body::{next_piece, Piece};
use crate::proxy::held::{Held, HeldBody, Spent, MAX_HELD_BYTES, MAX_HELD_PER_SANDBOX};

/// Largest command section accepted (decompressed), flush included.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Largest number of raw bytes buffered while looking for the end of the command
/// section: the section itself, compressed or not, plus what came in the same frames.
const MAX_BUFFERED_BYTES: usize = 4 * MAX_COMMAND_BYTES;

/// Longest time the command section may take to arrive, however steadily it trickles
/// (a byte now and then must not hold its buffer for ever).
const MAX_COMMAND_SECS: u64 = 120;

/// What to do with a push.
#[derive(Debug)]
pub enum PushOutcome {
    /// Forward these bytes (as read, so possibly compressed), then the rest of the body;
    /// the budget they hold is kept until they are sent.
    Forward(Bytes, Option<HeldBody>),
    /// Answer the client with `status` and, when it asked for one, a receive-pack
    /// `report` (to be sent as `application/x-git-receive-pack-result`) instead of
    /// `reason` as text. Nothing was forwarded; `consumed` body bytes were read.
    Refuse {
        status: StatusCode,
        reason: String,
        report: Option<Bytes>,
        consumed: u64,
    },
}

/// A push as the rule sees it.
#[derive(Debug)]
pub struct Inspected {
    /// The ref updates asked for (empty when the command list could not be read).
    pub updates: Vec<RefUpdate>,
    pub outcome: PushOutcome,
}

/// Reads a `git-receive-pack` request's command list from `body`, holding its bytes in
/// the sandbox's `share` of the held-body budget, judges it with `rule`, and either hands
/// back the bytes read (to be forwarded first) or refuses the whole push at once.
pub async fn inspect_push(
    rule: &GitRule,
    headers: &HeaderMap,
    body: &mut Incoming,
    idle: Duration,
    share: &Arc<Semaphore>,
) -> Inspected {
    let refuse = |status, reason, report, consumed| Inspected {
        updates: Vec::new(),
        outcome: PushOutcome::Refuse {
            status,
            reason,
            report,
            consumed,
        },
    };
    let encoding = match Encoding::from_headers(headers) {
        Ok(e) => e,
        Err(reason) => return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, reason, None, 0),
    };
    let (raw, list, held) = match read_commands(body, encoding, idle, share).await {
        Ok(read) => read,
        Err(ReadError::Invalid(reason, consumed)) => {
            return refuse(StatusCode::FORBIDDEN, reason, None, consumed);
        }
        Err(ReadError::Busy(reason, consumed)) => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, reason, None, consumed);
        }
        Err(ReadError::Downstream(reason, consumed)) => {
            return refuse(StatusCode::BAD_REQUEST, reason, None, consumed);
        }
    };
    let judgement = rule.judge_push(&list);
    let updates = ref_updates(&list, &judgement);
    let Some(reason) = judgement.refused else {
        return Inspected {
            updates,
            outcome: PushOutcome::Forward(raw, held),
        };
    };
    let consumed = raw.len() as u64;
    let (status, report) = if wants_report(&list) {
        (
            StatusCode::OK,
            Some(status_report(&list, &judgement.results)),
        )
    } else {
        (StatusCode::FORBIDDEN, None)
    };
    Inspected {
        updates,
        outcome: PushOutcome::Refuse {
            status,
            reason,
            report,
            consumed,
        },
    }
}

/// How the request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    /// From `Content-Encoding`: none, `identity`, `gzip` or `x-gzip`; anything else (or
    /// several codings) cannot be inspected and is an error.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, String> {
        let mut codings = headers
            .get_all(CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
        let first = codings.next();
        if codings.next().is_some() {
            return Err(
                "git push: a body with several content codings cannot be inspected".to_owned(),
            );
        }
        match first {
            None => Ok(Self::Identity),
            Some(c) if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip") => {
                Ok(Self::Gzip)
            }
            Some(c) => Err(format!(
                "git push: Content-Encoding {c:?} cannot be inspected (use gzip or none)"
            )),
        }
    }
}

/// Why the command section could not be had, and how many body bytes were read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The client sent something that is not a valid command section.
    Invalid(String, u64),
    /// The client's body failed or stalled, or took too long.
    Downstream(String, u64),
    /// The held-body budget (the sandbox's share or the daemon's) is spent.
    Busy(String, u64),
}

/// Reads from `body` until the command section is complete, charging what it holds to
/// `share`. Returns the raw bytes read (to be forwarded first), the parsed section, and
/// the budget the bytes hold.
pub async fn read_commands(
    body: &mut Incoming,
    encoding: Encoding,
    idle: Duration,
    share: &Arc<Semaphore>,
) -> Result<(Bytes, CommandList, Option<HeldBody>), ReadError> {
    let mut reader = CommandReader::new(encoding);
    let mut held = Held::new(share);
    // What a parse of a gzip body's start inflates, beside the bytes read (its buffer
    // may double past the limit once).
    let inflated = match encoding {
        Encoding::Identity => 0,
        Encoding::Gzip => 2 * (MAX_COMMAND_BYTES + PACK_MAGIC.len()),
    };
    let read = async {
        loop {
            let consumed = reader.raw.len() as u64;
            let data = match next_piece(body, idle).await {
                Ok(Piece::Data(data)) => data,
                Ok(Piece::Trailers | Piece::End) => {
                    return reader
                        .finish()
                        .map_err(|why| ReadError::Invalid(why, consumed));
                }
                Err(why) => return Err(ReadError::Downstream(why, consumed)),
            };
            // The room is charged before it is taken: what the buffer growing may make
            // (twice what it had, or what is needed), then what it made.
            let consumed = consumed + data.len() as u64;
            let need = reader.raw.len() + data.len();
            let grown = if need > reader.raw.capacity() {
                need.max(2 * reader.raw.capacity())
            } else {
                0
            };
            let charged = held.grow_to(grown + inflated).and_then(|()| {
                reader.raw.reserve(data.len());
                held.grow_to(reader.raw.capacity() + inflated)
            });
            if let Err(spent) = charged {
                let (who, most) = match spent {
                    Spent::Sandbox => ("the sandbox", MAX_HELD_PER_SANDBOX),
                    Spent::Daemon => ("the daemon", MAX_HELD_BYTES),
                };
                return Err(ReadError::Busy(
                    format!(
                        "proxy: git push refused: {who} already holds {} MiB of request \
                         bodies read to be judged; try again",
                        most >> 20
                    ),
                    consumed,
                ));
            }
            if let Some(list) = reader
                .push(&data)
                .map_err(|why| ReadError::Invalid(why, consumed))?
            {
                return Ok(list);
            }
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(MAX_COMMAND_SECS), read).await;
    let list = match outcome {
        Ok(done) => done?,
        Err(_) => {
            return Err(ReadError::Downstream(
                format!(
                    "downstream client: a git push's command list took over \
                     {MAX_COMMAND_SECS} s to arrive"
                ),
                reader.raw.len() as u64,
            ))
        }
    };
    Ok((reader.raw.freeze(), list, held.into_body()))
}

/// The body's first bytes, parsed for the command list as they arrive: again only when
/// they have doubled since the last try (or at the limit, or the end), so a list sent a
/// byte at a time (or gzip that inflates to nothing) costs time linear in its length,
/// not quadratic.
struct CommandReader {
    encoding: Encoding,
    raw: BytesMut,
    /// Length at the last parse.
    parsed_at: usize,
    /// Parses tried (for tests).
    parses: usize,
}

impl CommandReader {
    fn new(encoding: Encoding) -> Self {
        Self {
            encoding,
            raw: BytesMut::new(),
            parsed_at: 0,
            parses: 0,
        }
    }

    fn parse(&mut self, ended: bool) -> Result<Option<CommandList>, String> {
        self.parses += 1;
        self.parsed_at = self.raw.len();
        try_parse(&self.raw, self.encoding, ended)
    }

    /// Takes the next piece; the list once it is complete.
    fn push(&mut self, data: &[u8]) -> Result<Option<CommandList>, String> {
        self.raw.extend_from_slice(data);
        let over = self.raw.len() > MAX_BUFFERED_BYTES;
        if over || self.raw.len() >= self.parsed_at.saturating_mul(2).max(1) {
            if let Some(list) = self.parse(false)? {
                return Ok(Some(list));
            }
            if over {
                return Err(format!(
                    "git push: no end of the command list within the first \
                     {MAX_BUFFERED_BYTES} bytes of the body"
                ));
            }
        }
        Ok(None)
    }

    /// The body ended: the list, or why there is none.
    fn finish(&mut self) -> Result<CommandList, String> {
        self.parse(true)?.ok_or_else(|| {
            "git push: the body ended before the command list's flush-pkt".to_owned()
        })
    }
}

/// The command section at the start of the body bytes received so far (`ended`: the
/// whole body), with what follows it checked: a pack (`PACK`) or, at the end of the
/// body, nothing. `Ok(None)`: more bytes are needed.
///
/// The bytes after the section are forwarded unread, so a section that ends earlier than
/// git's own reading of it (options or commands git would see and the parse did not)
/// must not pass: those bytes would not start a pack.
pub(crate) fn try_parse(
    raw: &[u8],
    encoding: Encoding,
    ended: bool,
) -> Result<Option<CommandList>, String> {
    let invalid = |e: String| format!("git push: {e}");
    let plain = match encoding {
        Encoding::Identity => std::borrow::Cow::Borrowed(raw),
        Encoding::Gzip => std::borrow::Cow::Owned(
            gunzip_prefix(raw, MAX_COMMAND_BYTES + PACK_MAGIC.len()).map_err(invalid)?,
        ),
    };
    let window = &plain[..plain.len().min(MAX_COMMAND_BYTES)];
    let Some(list) = parse_commands(window).map_err(invalid)? else {
        if window.len() == MAX_COMMAND_BYTES {
            return Err(invalid(format!(
                "the command list is longer than {MAX_COMMAND_BYTES} bytes"
            )));
        }
        return Ok(None);
    };
    let rest = &plain[list.len..];
    let seen = &rest[..rest.len().min(PACK_MAGIC.len())];
    if seen == PACK_MAGIC || (ended && seen.is_empty()) {
        return Ok(Some(list));
    }
    if !ended && PACK_MAGIC.starts_with(seen) {
        return Ok(None);
    }
    Err(invalid(format!(
        "what follows the command list is not a pack (starts {:?}, not \"PACK\")",
        String::from_utf8_lossy(seen)
    )))
}

/// The first bytes of a packfile.
const PACK_MAGIC: &[u8] = b"PACK";

/// Decompresses as much of the gzip stream's start as `raw` holds, up to `limit` bytes.
/// A stream cut short is not an error (more may come); a corrupt one is.
fn gunzip_prefix(raw: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(limit.min(raw.len() * 4));
    let mut decoder = flate2::read::GzDecoder::new(raw).take(limit as u64);
    match decoder.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(out),
        Err(e) => Err(format!("the gzip-encoded body is invalid: {e}")),
    }
}

/// The record's ref updates: every command of the push with the rule's verdict on it.
fn ref_updates(list: &CommandList, judgement: &PushJudgement) -> Vec<RefUpdate> {
    list.commands
        .iter()
        .zip(&judgement.allowed)
        .map(|(c, &allowed)| RefUpdate {
            ref_name: c.name.clone(),
            old: c.old.clone(),
            new: c.new.clone(),
            allowed,
        })
        .collect()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A body sent a byte at a time is parsed a logarithmic number of times: gzip that
    /// inflates to nothing (empty stored blocks) cannot make each byte re-inflate all
    /// before it. A list that completes is still found, at the latest at the end.
    #[test]
    fn a_list_sent_a_byte_at_a_time_is_parsed_logarithmically_often() {
        let mut stream = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        for _ in 0..20_000 {
            stream.extend_from_slice(&[0, 0, 0, 0xff, 0xff]);
        }
        let mut reader = CommandReader::new(Encoding::Gzip);
        let mut refused = false;
        for b in &stream {
            let pushed = reader.push(std::slice::from_ref(b));
            assert!(!matches!(pushed, Ok(Some(_))), "no list in empty blocks");
            if pushed.is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused || reader.raw.len() == stream.len());
        assert!(reader.parses <= 20, "{} parses", reader.parses);

        let z = "0".repeat(40);
        let b = "b".repeat(40);
        let body = format!(
            "{}0000PACK",
            pkt_line(&format!("{z} {b} refs/heads/agent/x\0report-status"))
        );
        let mut reader = CommandReader::new(Encoding::Identity);
        let mut found = None;
        for b in body.as_bytes() {
            if let Some(list) = reader.push(std::slice::from_ref(b)).unwrap() {
                found = Some(list);
                break;
            }
        }
        let list = match found {
            Some(list) => list,
            None => reader.finish().unwrap(),
        };
        assert_eq!(list.commands.len(), 1);
        assert!(reader.parses <= 12, "{} parses", reader.parses);
    }

    fn pkt_line(s: &str) -> String {
        format!("{:04x}{s}", s.len() + 4)
    }

    #[test]
    fn gzip_bodies_are_inspected_as_they_arrive() {
        let a = "1".repeat(40);
        let b = "2".repeat(40);
        let line = format!("{a} {b} refs/heads/main\0report-status");
        let mut plain = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
        plain.extend_from_slice(b"PACK");
        plain.extend_from_slice(&[7u8; 5000]);
        let compressed = gzip(&plain);
        let mut found = None;
        for cut in 0..=compressed.len() {
            if let Some(list) = try_parse(&compressed[..cut], Encoding::Gzip, false).unwrap() {
                found = Some((cut, list));
                break;
            }
        }
        let (cut, list) = found.unwrap();
        assert!(cut <= compressed.len());
        assert_eq!(list.commands[0].name, "refs/heads/main");

        let err = try_parse(
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff\x07\x00\x00",
            Encoding::Gzip,
            false,
        );
        assert!(err.is_err(), "{err:?}");
        assert!(try_parse(b"not gzip at all", Encoding::Gzip, false).is_err());

        // A command list that never ends is cut at the bound, compressed or not.
        let mut endless = Vec::new();
        while endless.len() <= MAX_COMMAND_BYTES {
            let line = format!("{a} {b} refs/heads/x{}", endless.len());
            endless.extend_from_slice(format!("{:04x}{line}", line.len() + 4).as_bytes());
        }
        assert!(try_parse(&endless, Encoding::Identity, false).is_err());
        assert!(try_parse(&gzip(&endless), Encoding::Gzip, false).is_err());
    }

    #[test]
    fn only_a_pack_or_the_end_of_the_body_may_follow_the_command_list() {
        let a = "1".repeat(40);
        let line = format!("{a} {} refs/heads/main\0report-status", "0".repeat(40));
        let section = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
        let with = |tail: &[u8]| [section.as_slice(), tail].concat();
        for encoding in [Encoding::Identity, Encoding::Gzip] {
            let body = |tail: &[u8]| match encoding {
                Encoding::Identity => with(tail),
                Encoding::Gzip => gzip(&with(tail)),
            };
            let parse = |tail: &[u8], ended| try_parse(&body(tail), encoding, ended);
            // A pack, or (a delete-only push) nothing at the end of the body.
            assert!(parse(b"PACK\0\0\0\x02", false).unwrap().is_some());
            assert!(parse(b"", true).unwrap().is_some());
            // Not yet known: more bytes are needed.
            assert_eq!(parse(b"", false), Ok(None));
            if encoding == Encoding::Identity {
                assert_eq!(parse(b"PA", false), Ok(None));
            }
            // Anything else (pkt-lines git would read as options or commands) is refused.
            for tail in [&b"000cci.skip\n0000PACK"[..], b"0000", b"PA", b"junk"] {
                let err = parse(tail, true).unwrap_err();
                assert!(err.contains("not a pack"), "{tail:?}: {err:?}");
            }
        }
    }

    #[test]
    fn content_encodings() {
        let h = |v: &[&'static str]| {
            let mut m = HeaderMap::new();
            for v in v {
                m.append(CONTENT_ENCODING, http::HeaderValue::from_static(v));
            }
            Encoding::from_headers(&m)
        };
        assert_eq!(h(&[]), Ok(Encoding::Identity));
        assert_eq!(h(&["identity"]), Ok(Encoding::Identity));
        assert_eq!(h(&["gzip"]), Ok(Encoding::Gzip));
        assert_eq!(h(&["X-Gzip"]), Ok(Encoding::Gzip));
        assert!(h(&["br"]).is_err());
        assert!(h(&["gzip", "gzip"]).is_err());
        assert!(h(&["gzip, deflate"]).is_err());
    }
}
