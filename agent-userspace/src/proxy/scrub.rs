//! Secrets in transit: scrubbing what an origin reflects, refusing what a sandbox sends.
//!
//! Both directions use the credential store's [`SecretMatcher`] (every current secret of
//! every credential, in every form it takes on the wire) through a [`StreamScrubber`],
//! which finds matches split across reads, chunks and frames (and text wrapped in lines)
//! by keeping the last `span - 1` bytes of the stream back until the next piece arrives. Memory stays
//! bounded whatever the size of the body.
//!
//! - **Responses** on a rule with a credential: every match in a header, trailer or body
//!   is replaced by [`MARKER`] cut or padded to the length of what it replaces, so the
//!   framing (`Content-Length`, chunk sizes) stays valid and a body is never buffered.
//!   Such requests go upstream with `Accept-Encoding: identity`; an origin that encodes
//!   anyway with gzip or deflate has its body decoded, scrubbed and sent on unencoded
//!   (`Content-Encoding` and `Content-Length` removed); any other encoding is refused with
//!   a 502, as it could not be scanned.
//! - **Requests** on every intercepted rule: a secret in the URL or a header refuses the
//!   request before anything is sent; one in the body aborts the upstream request before
//!   the piece holding it is sent (the held-back tail guarantees no complete match has
//!   gone out).

use std::collections::{BTreeSet, VecDeque};
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::credentials::matcher::{CUT_SHORT, LINE_BREAK_MAX};
use crate::credentials::SecretMatcher;

use super::range::Window;

/// The most bytes the characters a value cut short lacks can take in a text, a line break
/// between each two of them.
const CUT_REACH: usize = CUT_SHORT * (1 + LINE_BREAK_MAX);

/// What replaces a secret: cut to the length of a shorter match, padded with `*` for a
/// longer one, so that the response keeps its length.
pub const MARKER: &[u8] = b"[egressd:scrubbed]";

/// Body input decoded per step (gzip and deflate), which bounds the decoded output held
/// at once to about this times the best compression ratio (1032 for deflate).
const DECODE_STEP: usize = 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The marker byte at offset `i` of a replaced range.
fn marker_byte(i: usize) -> u8 {
    MARKER.get(i).copied().unwrap_or(b'*')
}

/// Matches of one request, in either direction: how many, and of which credentials.
#[derive(Debug, Default)]
pub struct Tally {
    count: AtomicU64,
    credentials: Mutex<BTreeSet<String>>,
}

impl Tally {
    fn add(&self, matcher: &SecretMatcher, index: usize) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut names = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        if !names.contains(matcher.name(index)) {
            names.insert(matcher.name(index).to_owned());
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The credentials matched, sorted.
    pub fn credentials(&self) -> Vec<String> {
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Replaces every match in `bytes` (a whole, self-contained value) with the marker.
/// Returns whether anything was replaced.
fn scrub_in_place(bytes: &mut [u8], matcher: &SecretMatcher, tally: &Tally) -> bool {
    let found = merged_matches(bytes, matcher, 0, bytes.len(), tally);
    mask(bytes, &found);
    !found.ranges.is_empty()
}

/// What [`merged_matches`] found: the ranges to replace, and the git sideband packets'
/// headers inside them to keep in place.
#[derive(Debug, Default)]
struct Found {
    ranges: Vec<std::ops::Range<usize>>,
    headers: Vec<std::ops::Range<usize>>,
}

/// Matches in `hay`, overlapping ones merged, in order. Each occurrence is counted once:
/// a match inside another (a run of the secret within the whole value) is not counted,
/// nor one ending at or before `seen` (counted before). A value cut short that ends at or
/// after `open_from` is not counted yet either: the bytes after it, still to come, may
/// make it part of the whole value (it is found again with them, in the bytes kept back).
///
/// A match found across git sideband packets' headers keeps those headers (the client
/// reads the same framing), unless another match covers any byte of one: then four
/// "hex digits" before a band byte may be the value's own, and everything is replaced.
fn merged_matches(
    hay: &[u8],
    matcher: &SecretMatcher,
    seen: usize,
    open_from: usize,
    tally: &Tally,
) -> Found {
    // Each match, its credential, whether it is of a value cut short, and whether it was
    // found across git sideband packets' headers (rare: only then are they split apart).
    let mut found: Vec<(std::ops::Range<usize>, usize, bool, bool)> = Vec::new();
    matcher.each_match_framed(hay, |range, index, cut, across_headers| {
        found.push((range, index, cut, across_headers));
    });
    let (headers, tails) = if found.iter().any(|m| m.3) {
        let (framed, unframed): (Vec<_>, Vec<_>) = found.iter().partition(|m| m.3);
        let framed: Vec<(std::ops::Range<usize>, bool)> =
            framed.into_iter().map(|m| (m.0.clone(), m.2)).collect();
        let unframed = unframed.into_iter().map(|m| m.0.clone()).collect();
        kept_headers(hay, &framed, unframed)
    } else {
        (Vec::new(), Vec::new())
    };
    // By start, the longest first: a match ending within one before it lies inside it.
    found.sort_by(|(a, ..), (b, ..)| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut reach = 0;
    for (range, index, cut, _) in &found {
        let counted_before =
            range.end <= seen && !(*cut && range.end > seen.saturating_sub(CUT_REACH));
        let still_open = *cut && range.end > open_from;
        if range.end > reach && !counted_before && !still_open {
            tally.add(matcher, *index);
        }
        reach = reach.max(range.end);
    }
    let mut ranges: Vec<std::ops::Range<usize>> = found.into_iter().map(|(r, ..)| r).collect();
    if !tails.is_empty() {
        ranges.extend(tails);
        ranges.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    }
    Found {
        ranges: union(ranges),
        headers,
    }
}

/// Ranges sorted by start merged where they overlap or touch.
fn union(sorted: Vec<std::ops::Range<usize>>) -> Vec<std::ops::Range<usize>> {
    let mut merged: Vec<std::ops::Range<usize>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Whether `at` lies in one of the disjoint sorted `ranges`.
fn within(ranges: &[std::ops::Range<usize>], at: usize) -> bool {
    overlaps(ranges, &(at..at + 1))
}

/// Whether `range` shares a byte with one of the disjoint sorted `ranges`.
fn overlaps(ranges: &[std::ops::Range<usize>], range: &std::ops::Range<usize>) -> bool {
    let i = ranges.partition_point(|r| r.end <= range.start);
    ranges.get(i).is_some_and(|r| r.start < range.end)
}

/// The git sideband packets' headers inside matches found across them (`framed`, each
/// with whether it is of a value cut short) that may stay in place: those no other match
/// (`unframed`) covers any byte of. And the digits to mask of a "header" right after a
/// match cut short, unless a match covers it: a value whose own last hex digits were taken
/// for a length. Each byte of `hay` is looked at once, each header found by search.
fn kept_headers(
    hay: &[u8],
    framed: &[(std::ops::Range<usize>, bool)],
    mut unframed: Vec<std::ops::Range<usize>>,
) -> (Vec<std::ops::Range<usize>>, Vec<std::ops::Range<usize>>) {
    use crate::credentials::matcher::pkt_header_at;
    unframed.sort_by_key(|r| r.start);
    let unframed = union(unframed);
    let mut spans: Vec<std::ops::Range<usize>> = framed.iter().map(|(r, _)| r.clone()).collect();
    spans.sort_by_key(|r| r.start);
    let spans = union(spans);
    let mut headers = Vec::new();
    for span in &spans {
        let mut i = span.start;
        while i < span.end {
            match pkt_header_at(hay, i).filter(|h| h.end <= span.end) {
                Some(h) => {
                    i = h.end;
                    if !overlaps(&unframed, &h) {
                        headers.push(h);
                    }
                }
                None => i += 1,
            }
        }
    }
    let mut tails = Vec::new();
    let mut dropped = Vec::new();
    for (r, cut) in framed {
        if !*cut || within(&spans, r.end) || within(&unframed, r.end) {
            continue;
        }
        if let Some(h) = pkt_header_at(hay, r.end) {
            tails.push(r.end..h.start + 4);
            dropped.push(h.start);
        }
    }
    if !dropped.is_empty() {
        dropped.sort_unstable();
        headers.retain(|h| dropped.binary_search(&h.start).is_err());
    }
    (headers, tails)
}

/// Replaces each range with the marker, but for the packets' headers [`merged_matches`]
/// keeps (a value echoed across git sideband packets): the client still reads the stream.
fn mask(bytes: &mut [u8], found: &Found) {
    let mut headers = found.headers.iter().peekable();
    for r in &found.ranges {
        let mut i = r.start;
        let mut n = 0;
        while i < r.end {
            while headers.next_if(|h| h.end <= i).is_some() {}
            if let Some(h) = headers.next_if(|h| h.start == i) {
                i = h.end;
                continue;
            }
            bytes[i] = marker_byte(n);
            n += 1;
            i += 1;
        }
    }
}

/// Scrubs header values (response headers and trailers); returns how many values changed.
pub fn scrub_headers(headers: &mut HeaderMap, matcher: &SecretMatcher, tally: &Tally) -> usize {
    let mut changed = 0;
    // A secret in a header's name (names cannot carry the marker): the header goes.
    let named: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| matcher.find(name.as_str().as_bytes()).is_some())
        .cloned()
        .collect();
    for name in named {
        let bytes = name.as_str().as_bytes();
        merged_matches(bytes, matcher, 0, bytes.len(), tally);
        headers.remove(&name);
        changed += 1;
    }
    for value in headers.values_mut() {
        if matcher.find(value.as_bytes()).is_none() {
            continue;
        }
        let mut bytes = value.as_bytes().to_vec();
        if scrub_in_place(&mut bytes, matcher, tally) {
            // The marker is visible ASCII: the value stays valid. Should that ever fail,
            // the value is emptied rather than kept.
            *value = HeaderValue::from_bytes(&bytes).unwrap_or(HeaderValue::from_static(""));
            changed += 1;
        }
    }
    changed
}

/// The first credential whose secret occurs in the request's method, target or a header
/// (name or value), and where.
pub fn find_in_head(
    method: &http::Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    matcher: &SecretMatcher,
) -> Option<(String, &'static str)> {
    if let Some(name) = matcher.find(method.as_str().as_bytes()) {
        return Some((name.to_owned(), "the method"));
    }
    let target = uri.path_and_query().map_or("", |p| p.as_str());
    let authority = uri.authority().map_or("", |a| a.as_str());
    if let Some(name) =
        find_in_target(authority, matcher).or_else(|| find_in_target(target, matcher))
    {
        return Some((name.to_owned(), "the URL"));
    }
    for (name, value) in headers {
        if let Some(c) = matcher
            .find(value.as_bytes())
            .or_else(|| matcher.find(name.as_str().as_bytes()))
        {
            return Some((c.to_owned(), "a header"));
        }
    }
    None
}

/// The credential whose secret occurs in `target` (part of a URL), as sent or
/// percent-decoded (see [`decoded_forms`]).
pub fn find_in_target<'m>(target: &str, matcher: &'m SecretMatcher) -> Option<&'m str> {
    matcher.find(target.as_bytes()).or_else(|| {
        decoded_forms(target)
            .iter()
            .find_map(|form| matcher.find(form))
    })
}

/// How many times a request target is percent-decoded for the head checks: once, and
/// again for a target encoded twice.
const DECODE_ROUNDS: usize = 2;

/// `target` as an origin may read it: with its `%XX` escapes decoded, once and then again
/// while escapes remain (at most [`DECODE_ROUNDS`]). Empty when it has none. The head
/// checks look for secrets and sentinels in these forms as well as in the one sent, so
/// `%67hp_...` is seen as what it decodes to.
pub(super) fn decoded_forms(target: &str) -> Vec<Vec<u8>> {
    let mut forms: Vec<Vec<u8>> = Vec::new();
    for _ in 0..DECODE_ROUNDS {
        let last = forms.last().map_or(target.as_bytes(), Vec::as_slice);
        match percent_decode_once(last) {
            Some(decoded) => forms.push(decoded),
            None => break,
        }
    }
    forms
}

/// `bytes` with every valid `%XX` escape decoded (others kept as they are), or `None` if
/// it has no valid escape.
fn percent_decode_once(bytes: &[u8]) -> Option<Vec<u8>> {
    let hex = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut decoded = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                decoded = true;
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    decoded.then_some(out)
}

/// A byte stream with secrets replaced, matches split across pieces included.
pub struct StreamScrubber {
    matcher: Arc<SecretMatcher>,
    /// Bytes kept back: a match may start in them and end in the next piece.
    keep: usize,
    /// The kept bytes as received (matched against)...
    tail_in: Vec<u8>,
    /// ...and as they will be sent (with what is already known to be masked).
    tail_out: Vec<u8>,
    /// Pieces gathered, not scanned yet (see [`Self::push`]).
    pending: Vec<u8>,
    /// Whether pieces are gathered to the kept size before a scan: always in the daemon;
    /// tests also scan each piece alone, so that what is kept back between scans is
    /// exercised by short bodies too.
    gather: bool,
    tally: Arc<Tally>,
}

impl StreamScrubber {
    pub fn new(matcher: Arc<SecretMatcher>, tally: Arc<Tally>) -> Self {
        let keep = matcher.span().saturating_sub(1);
        Self {
            matcher,
            keep,
            tail_in: Vec::new(),
            tail_out: Vec::new(),
            pending: Vec::new(),
            gather: true,
            tally,
        }
    }

    /// Matches with `matcher` from the next piece on (the bytes kept back included),
    /// keeping back as much as its longest form needs.
    pub fn set_matcher(&mut self, matcher: Arc<SecretMatcher>) {
        self.keep = matcher.span().saturating_sub(1);
        self.matcher = matcher;
    }

    /// Takes the next piece; returns what may be sent now (possibly empty). Pieces are
    /// gathered until they are as long as what is kept back: each scan goes over the kept
    /// bytes again, so scanning each tiny piece (a body sent a byte per frame) would cost
    /// that much per byte. Holding more back is never less safe.
    pub fn push(&mut self, piece: &[u8]) -> Bytes {
        self.pending.extend_from_slice(piece);
        if self.gather && self.pending.len() < self.keep {
            return Bytes::new();
        }
        let gathered = std::mem::take(&mut self.pending);
        self.scan(&gathered)
    }

    /// Scans the kept bytes and `piece`; returns what may be sent now.
    fn scan(&mut self, piece: &[u8]) -> Bytes {
        let old = self.tail_in.len();
        let mut buf = Vec::with_capacity(old + piece.len());
        buf.extend_from_slice(&self.tail_in);
        buf.extend_from_slice(piece);
        // Matches that ended in the old tail were counted last time, but for values cut
        // short in its last CUT_REACH bytes: the bytes after them tell whether they were
        // the start of the whole one. So are those ending in this buffer's last bytes.
        let open_from = buf.len().saturating_sub(CUT_REACH);
        let found = merged_matches(&buf, &self.matcher, old, open_from, &self.tally);
        let cut = buf.len().saturating_sub(self.keep);
        if found.ranges.is_empty() && self.tail_in == self.tail_out {
            self.tail_in.clear();
            self.tail_in.extend_from_slice(&buf[cut..]);
            self.tail_out.clone_from(&self.tail_in);
            buf.truncate(cut);
            return Bytes::from(buf);
        }
        let next_in = buf[cut..].to_vec();
        buf[..old].copy_from_slice(&self.tail_out);
        mask(&mut buf, &found);
        self.tail_in = next_in;
        self.tail_out = buf[cut..].to_vec();
        buf.truncate(cut);
        Bytes::from(buf)
    }

    /// The end of the stream: what was kept back (its matches masked already; those in
    /// its last CUT_REACH bytes counted now).
    pub fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        if !self.pending.is_empty() {
            let gathered = std::mem::take(&mut self.pending);
            out.extend_from_slice(&self.scan(&gathered));
        }
        // Only the values cut short left open last time are counted now: everything
        // else in the tail was counted when it arrived.
        let len = self.tail_in.len();
        merged_matches(&self.tail_in, &self.matcher, len, len, &self.tally);
        self.tail_in.clear();
        out.append(&mut self.tail_out);
        Bytes::from(out)
    }

    /// Bytes kept back now.
    pub fn held(&self) -> usize {
        self.tail_out.len() + self.pending.len()
    }
}

/// Response headers that declare each message of a body compressed (gRPC, Connect
/// streaming), whatever its `Content-Encoding`.
const MESSAGE_ENCODINGS: [&str; 2] = ["grpc-encoding", "connect-content-encoding"];

/// Request headers that ask for compressed messages in the answer: set to `identity` on a
/// scrubbed route, as `Accept-Encoding` is.
pub const MESSAGE_ACCEPT_ENCODINGS: [&str; 2] = ["grpc-accept-encoding", "connect-accept-encoding"];

/// Charsets in which the secrets' forms are matched: ASCII and its supersets (an ASCII
/// secret is the same bytes in them), and UTF-16 (whose forms the matcher has). Another
/// (UTF-32, UTF-7, EBCDIC, ...) would carry a reflected secret in bytes no scan reads, which
/// the sandbox's client decodes.
fn scanned_charset(charset: &str) -> bool {
    let c = charset
        .trim()
        .trim_matches('"')
        .to_ascii_lowercase()
        .replace('_', "-");
    let single_byte = c
        .strip_prefix("iso-8859-")
        .or_else(|| c.strip_prefix("iso8859-"));
    let windows = c
        .strip_prefix("windows-125")
        .or_else(|| c.strip_prefix("cp125"));
    matches!(
        c.as_str(),
        "utf-8"
            | "utf8"
            | "binary"
            | "latin-1"
            | "us-ascii"
            | "ascii"
            | "latin1"
            | "iso-latin-1"
            | "koi8-r"
            | "koi8-u"
            | "gb2312"
            | "gbk"
            | "gb18030"
            | "big5"
            | "shift_jis"
            | "sjis"
            | "euc-jp"
            | "euc-kr"
            | "utf-16"
            | "utf-16le"
            | "utf-16be"
    ) || single_byte.is_some_and(|n| matches!(n.parse::<u8>(), Ok(1..=16)))
        || windows.is_some_and(|n| n.len() == 1 && n.as_bytes()[0].is_ascii_digit())
}

/// The `charset` parameters of a `Content-Type` value (RFC 9110 8.3.1), as written.
fn charsets(value: &str) -> impl Iterator<Item = &str> {
    value.split(';').skip(1).filter_map(|p| {
        let (name, v) = p.split_once('=')?;
        name.trim().eq_ignore_ascii_case("charset").then_some(v)
    })
}

/// Refuses a response whose `Content-Type` names a charset the scan does not read.
fn check_charset(headers: &HeaderMap) -> Result<(), String> {
    for value in headers.get_all(http::header::CONTENT_TYPE) {
        let text = String::from_utf8_lossy(value.as_bytes());
        if charsets(&text).any(|c| !scanned_charset(c)) {
            return Err(
                "upstream server: response charset cannot be scanned for reflected secrets \
                 (not ASCII-compatible, UTF-8 or UTF-16)"
                    .to_owned(),
            );
        }
    }
    Ok(())
}

/// Takes out of a request what asks an origin for its answer in another charset
/// (`Accept-Charset`, and `charset` parameters of `Accept`): the answer is scanned in the
/// charsets [`scanned_charset`] names only.
pub fn ask_for_scanned_charsets(headers: &mut HeaderMap) {
    headers.remove(http::header::ACCEPT_CHARSET);
    let accepts: Vec<HeaderValue> = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .cloned()
        .collect();
    if accepts
        .iter()
        .all(|v| charsets_in_accept(v.as_bytes()).is_none())
    {
        return;
    }
    headers.remove(http::header::ACCEPT);
    for value in accepts {
        let kept = charsets_in_accept(value.as_bytes())
            .unwrap_or_else(|| String::from_utf8_lossy(value.as_bytes()).into_owned());
        if let Ok(v) = HeaderValue::from_str(&kept) {
            headers.append(http::header::ACCEPT, v);
        }
    }
}

/// An `Accept` value without its `charset` parameters; `None` when it has none.
fn charsets_in_accept(value: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(value);
    let mut found = false;
    let ranges: Vec<String> = text
        .split(',')
        .map(|range| {
            range
                .split(';')
                .filter(|p| {
                    let charset = p
                        .split_once('=')
                        .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("charset"));
                    found |= charset;
                    !charset
                })
                .collect::<Vec<_>>()
                .join(";")
        })
        .collect();
    found.then(|| ranges.join(","))
}

/// A response's `Content-Encoding`, as far as scrubbing is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    /// Anything else (br, zstd, compress, a list of codings): cannot be scanned.
    Other(String),
}

/// The comma-separated tokens of every `name` field (codings, connection options),
/// trimmed, lower-cased, empty ones left out.
pub(super) fn header_tokens(
    headers: &HeaderMap,
    name: impl http::header::AsHeaderName,
) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

impl Encoding {
    pub fn of(headers: &HeaderMap) -> Self {
        let codings: Vec<String> = header_tokens(headers, CONTENT_ENCODING)
            .into_iter()
            .filter(|c| c != "identity")
            .collect();
        match codings.as_slice() {
            [] => Self::Identity,
            [one] if one == "gzip" || one == "x-gzip" => Self::Gzip,
            [one] if one == "deflate" => Self::Deflate,
            _ => Self::Other(shown(&codings)),
        }
    }
}

/// Codings as a reason may show them: registered names as they are, anything else (an
/// origin's free text, which could hold a secret it was sent) as `?`.
fn shown(codings: &[String]) -> String {
    const REGISTERED: &[&str] = &[
        "aes128gcm",
        "br",
        "chunked",
        "compress",
        "dcb",
        "dcz",
        "deflate",
        "exi",
        "gzip",
        "identity",
        "pack200-gzip",
        "trailers",
        "x-compress",
        "x-gzip",
        "zstd",
    ];
    codings
        .iter()
        .map(|c| {
            if REGISTERED.contains(&c.as_str()) {
                c.as_str()
            } else {
                "?"
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The transfer codings of a response, lower-cased.
fn transfer_codings(headers: &HeaderMap) -> Vec<String> {
    header_tokens(headers, http::header::TRANSFER_ENCODING)
}

/// A streaming decoder for a body the origin encoded although asked not to.
enum Decoder {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    /// `deflate` is zlib-wrapped by the RFC; some servers send raw deflate. Decided on the
    /// first two bytes.
    Deflate(Option<DeflateKind>, Vec<u8>),
}

enum DeflateKind {
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
}

impl Decoder {
    fn new(encoding: &Encoding) -> Option<Self> {
        match encoding {
            Encoding::Gzip => Some(Self::Gzip(flate2::write::GzDecoder::new(Vec::new()))),
            Encoding::Deflate => Some(Self::Deflate(None, Vec::new())),
            _ => None,
        }
    }

    /// Decodes `input`, returning the output so far.
    fn write(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Gzip(d) => {
                d.write_all(input)?;
                Ok(std::mem::take(d.get_mut()))
            }
            Self::Deflate(kind, start) => {
                let kind = match kind {
                    Some(k) => k,
                    None => {
                        start.extend_from_slice(input);
                        if start.len() < 2 {
                            return Ok(Vec::new());
                        }
                        let zlib = start[0] & 0x0f == 8
                            && (u16::from(start[0]) << 8 | u16::from(start[1])) % 31 == 0;
                        let first = std::mem::take(start);
                        let k = kind.insert(if zlib {
                            DeflateKind::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
                        } else {
                            DeflateKind::Raw(flate2::write::DeflateDecoder::new(Vec::new()))
                        });
                        return k.write(&first);
                    }
                };
                kind.write(input)
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Gzip(d) => {
                d.try_finish()?;
                Ok(std::mem::take(d.get_mut()))
            }
            Self::Deflate(Some(k), _) => k.finish(),
            Self::Deflate(None, start) if start.is_empty() => Ok(Vec::new()),
            Self::Deflate(None, _) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "truncated deflate stream",
            )),
        }
    }
}

impl DeflateKind {
    fn write(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Zlib(d) => {
                d.write_all(input)?;
                Ok(std::mem::take(d.get_mut()))
            }
            Self::Raw(d) => {
                d.write_all(input)?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Zlib(d) => {
                d.try_finish()?;
                Ok(std::mem::take(d.get_mut()))
            }
            Self::Raw(d) => {
                d.try_finish()?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }
}

/// Sets up scrubbing of a response: scrubs its headers, and returns its body scrubbed
/// (then cut to `window`, the byte range the sandbox asked for, when the origin was asked
/// for a wider one), or `Err(reason)` when its encoding cannot be scanned.
///
/// `latest` gives the matcher over the secrets known now: a value first read or minted
/// while the body streams (a credential first used by another request, a rotation) is
/// matched from the next piece on. The origin cannot have had it before it was known
/// (it is known before it is sent anywhere), so what went before needs no second look.
/// The values known when the response began stay matched to its end, even those the
/// store forgets meanwhile (after rotations).
pub fn scrub_response(
    headers: &mut HeaderMap,
    body: Incoming,
    matcher: Arc<SecretMatcher>,
    latest: LatestMatcher,
    tally: Arc<Tally>,
    window: Option<(Window, u64)>,
) -> Result<ResponseBody, String> {
    if matcher.failed() {
        return Err("the proxy could not build its secret matcher".to_owned());
    }
    // hyper undoes `chunked` only: another transfer coding (`gzip, chunked`) would pass
    // the scan still encoded and be undone by the sandbox's client.
    let codings = transfer_codings(headers);
    if codings.iter().any(|c| c != "chunked") {
        return Err(format!(
            "upstream server: response Transfer-Encoding `{}` cannot be scanned for \
             reflected secrets",
            shown(&codings)
        ));
    }
    // gRPC and Connect compress each message of a body declared as identity; the proxy
    // asks for none (`grpc-accept-encoding: identity`), and an answer compressed anyway
    // would pass the scan unread and be undone by the sandbox's client. (No body, as
    // to a HEAD or with a 204 or 304: nothing to read.)
    let bodiless = body.is_end_stream();
    for name in MESSAGE_ENCODINGS.iter().filter(|_| !bodiless) {
        let codings: Vec<String> = header_tokens(headers, *name)
            .into_iter()
            .filter(|c| c != "identity")
            .collect();
        if !codings.is_empty() {
            return Err(format!(
                "upstream server: response `{name}` `{}` (compressed messages) cannot be \
                 scanned for reflected secrets",
                shown(&codings)
            ));
        }
    }
    if !bodiless {
        check_charset(headers)?;
    }
    scrub_headers(headers, &matcher, &tally);
    // And with the secrets known now, if more are (a byte range's matcher is the one
    // it was widened with).
    let now = latest();
    if !Arc::ptr_eq(&now, &matcher) {
        if now.failed() {
            return Err("the proxy could not build its secret matcher".to_owned());
        }
        scrub_headers(headers, &now, &tally);
    }
    let encoding = Encoding::of(headers);
    let decoder = if body.is_end_stream() {
        None
    } else {
        match &encoding {
            Encoding::Identity => None,
            Encoding::Gzip | Encoding::Deflate => {
                // Sent on decoded: its length is not known until the end.
                headers.remove(CONTENT_ENCODING);
                headers.remove(CONTENT_LENGTH);
                Decoder::new(&encoding)
            }
            Encoding::Other(coding) => {
                return Err(format!(
                    "upstream server: response Content-Encoding `{coding}` cannot be scanned \
                     for reflected secrets (the request asked for identity)"
                ))
            }
        }
    };
    Ok(ResponseBody::Scrubbed(Box::new(ScrubbedBody {
        inner: body,
        decoder,
        pending: Bytes::new(),
        scrubber: StreamScrubber::new(matcher.clone(), tally.clone()),
        later: None,
        matcher,
        latest,
        tally,
        queue: VecDeque::new(),
        ended: false,
        margin: window.as_ref().map(|(_, margin)| *margin),
        window: window.map(|(window, _)| window),
    })))
}

/// A response body on its way to the sandbox: as received, or scrubbed (and cut to a
/// byte range).
pub enum ResponseBody {
    Plain(Incoming),
    Scrubbed(Box<ScrubbedBody>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Plain(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            Self::Scrubbed(b) => b.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Plain(b) => b.is_end_stream(),
            Self::Scrubbed(b) => b.ended && b.queue.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Plain(b) => b.size_hint(),
            Self::Scrubbed(b) => match &b.window {
                Some(window) => SizeHint::with_exact(b.queued() + window.remaining()),
                // Same length as received, unless decoded.
                None if b.decoder.is_none() => b.inner.size_hint(),
                None => SizeHint::default(),
            },
        }
    }
}

/// Scrubs a response's trailers as its body was: with the secrets known when the response
/// began (which the store may have forgotten since, after rotations), then with those
/// known now (`latest`, if it is another matcher). A cookie has no place in trailers (RFC
/// 9110, 6.5.1), and a session or token an origin hands out there would reach the sandbox
/// past the head's removal: such fields go, on every route.
fn scrub_trailers(
    trailers: &mut HeaderMap,
    started: &Arc<SecretMatcher>,
    latest: &Arc<SecretMatcher>,
    tally: &Tally,
) {
    scrub_headers(trailers, started, tally);
    if !Arc::ptr_eq(started, latest) {
        scrub_headers(trailers, latest, tally);
    }
    super::session::strip_sessions(trailers);
}

/// A response body scrubbed (and decoded, if the origin encoded it) as it streams.
pub struct ScrubbedBody {
    inner: Incoming,
    decoder: Option<Decoder>,
    /// Encoded input not yet decoded (decoded one step at a time).
    pending: Bytes,
    /// Scrubs with the secrets known when the response began, for its whole length
    /// (values the store forgets meanwhile, after rotations, stay matched)...
    scrubber: StreamScrubber,
    /// ...and then, once the store's matcher changed, with the latest one.
    later: Option<StreamScrubber>,
    /// The latest matcher seen.
    matcher: Arc<SecretMatcher>,
    latest: LatestMatcher,
    tally: Arc<Tally>,
    /// Frames ready to go, in order.
    queue: VecDeque<Frame<Bytes>>,
    /// The upstream body is over (its end is in `queue` or sent).
    ended: bool,
    /// The bytes of the scrubbed body the sandbox asked for (a byte range cut from the
    /// wider one asked of the origin); all of them when `None`.
    window: Option<Window>,
    /// With a window, the bytes it was widened by on each side: a secret first known
    /// while the body streams that is longer could straddle a cut edge unseen.
    margin: Option<u64>,
}

/// Why the proxy itself ended a response body it could no longer scrub: a refusal, not
/// an upstream failure.
#[derive(Debug)]
pub struct ProxyCut(pub &'static str);

impl std::fmt::Display for ProxyCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ProxyCut {}

/// The matcher over the secrets known now.
pub type LatestMatcher = Arc<dyn Fn() -> Arc<SecretMatcher> + Send + Sync>;

impl ScrubbedBody {
    fn data(&mut self, decoded: &[u8]) -> Result<(), BoxError> {
        self.follow_latest()?;
        let mut out = self.scrubber.push(decoded);
        if let Some(later) = &mut self.later {
            out = later.push(&out);
        }
        self.send(out);
        Ok(())
    }

    /// Matches with the secrets known now from here on (one pointer compare while
    /// nothing changed); a matcher that could not be built ends the body.
    fn follow_latest(&mut self) -> Result<(), BoxError> {
        let now = (self.latest)();
        if !Arc::ptr_eq(&now, &self.matcher) {
            if now.failed() {
                return Err(Box::new(ProxyCut(
                    "the proxy could not build its secret matcher",
                )));
            }
            if self
                .margin
                .is_some_and(|margin| u64::try_from(now.span()).unwrap_or(u64::MAX) > margin)
            {
                return Err(Box::new(ProxyCut(
                    "a secret longer than the margin this byte range was widened by became \
                     known while it streamed",
                )));
            }
            match &mut self.later {
                Some(later) => later.set_matcher(now.clone()),
                None => self.later = Some(StreamScrubber::new(now.clone(), self.tally.clone())),
            }
            self.matcher = now;
        }
        Ok(())
    }

    /// Queues scrubbed bytes, cut to the window.
    fn send(&mut self, out: Bytes) {
        let out = match &mut self.window {
            Some(window) => window.cut(&out),
            None => out,
        };
        if !out.is_empty() {
            self.queue.push_back(Frame::data(out));
        }
    }

    /// Data bytes queued and not yet sent.
    fn queued(&self) -> u64 {
        self.queue
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum()
    }

    /// The upstream body ended: flushes the decoder and the scrubber.
    fn end(&mut self, trailers: Option<HeaderMap>) -> Result<(), BoxError> {
        if let Some(d) = &mut self.decoder {
            let rest = d
                .finish()
                .map_err(|e| format!("upstream server: response body cannot be decoded: {e}"))?;
            self.data(&rest)?;
        }
        self.follow_latest()?;
        let mut tail = self.scrubber.finish();
        if let Some(later) = &mut self.later {
            let mut out = later.push(&tail).to_vec();
            out.extend_from_slice(&later.finish());
            tail = Bytes::from(out);
        }
        self.send(tail);
        if let Some(mut t) = trailers {
            scrub_trailers(&mut t, &self.scrubber.matcher, &self.matcher, &self.tally);
            self.queue.push_back(Frame::trailers(t));
        }
        self.ended = true;
        Ok(())
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(frame) = self.queue.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            if !self.pending.is_empty() {
                let step = self.pending.split_to(self.pending.len().min(DECODE_STEP));
                let decoded = match &mut self.decoder {
                    Some(d) => d.write(&step).map_err(|e| {
                        format!("upstream server: response body cannot be decoded: {e}")
                    })?,
                    None => step.to_vec(),
                };
                self.data(&decoded)?;
                if self.pending.is_empty() && self.inner.is_end_stream() {
                    self.end(None)?;
                }
                continue;
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.end(None)?,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if self.decoder.is_some() {
                            self.pending = data;
                        } else {
                            self.data(&data)?;
                            if self.inner.is_end_stream() {
                                self.end(None)?;
                            }
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.end(Some(trailers))?;
                        }
                    }
                },
            }
        }
    }
}

/// What a request body's scan found: set once, by the body, read by the request's
/// handler and record.
#[derive(Debug, Default)]
pub struct OutboundHit(OnceLock<String>);

impl OutboundHit {
    /// The credential seen, if any.
    pub fn credential(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// A request body's scan for secrets on the way out: pieces are held back as the
/// scrubber holds them, and the stream fails at the first match, before the piece
/// holding it is sent.
pub struct OutboundScan {
    scrubber: StreamScrubber,
    tally: Arc<Tally>,
    hit: Arc<OutboundHit>,
}

impl OutboundScan {
    pub fn new(matcher: Arc<SecretMatcher>, hit: Arc<OutboundHit>) -> Self {
        let tally = Arc::new(Tally::default());
        Self {
            scrubber: StreamScrubber::new(matcher, tally.clone()),
            tally,
            hit,
        }
    }

    fn check(&self) -> Result<(), BoxError> {
        if self.tally.count() == 0 {
            return Ok(());
        }
        let name = self
            .tally
            .credentials()
            .into_iter()
            .next()
            .unwrap_or_default();
        let _ = self.hit.0.set(name);
        Err("request body carries a secret: upstream request aborted".into())
    }

    /// The part of `piece` (after what was held) that may be sent, or an error if a
    /// secret was seen.
    pub fn push(&mut self, piece: &[u8]) -> Result<Bytes, BoxError> {
        let out = self.scrubber.push(piece);
        self.check()?;
        Ok(out)
    }

    /// Trailers are scanned whole, names and values (a name is forwarded too).
    pub fn trailers(&mut self, trailers: &HeaderMap) -> Result<(), BoxError> {
        for (name, value) in trailers {
            for text in [name.as_str().as_bytes(), value.as_bytes()] {
                let mut bytes = text.to_vec();
                scrub_in_place(&mut bytes, &self.scrubber.matcher, &self.tally);
            }
        }
        self.check()
    }

    /// The end of the body: what was held back, or an error if a secret was seen (one
    /// ending in the last bytes is counted only now).
    pub fn finish(&mut self) -> Result<Bytes, BoxError> {
        let out = self.scrubber.finish();
        self.check()?;
        Ok(out)
    }

    pub fn held(&self) -> usize {
        self.scrubber.held()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    const SECRET: &str = "ghp_0123456789abcdefXYZ";

    fn matcher(secrets: &[(&'static str, &'static str)]) -> Arc<SecretMatcher> {
        Arc::new(SecretMatcher::new(secrets.iter().copied()))
    }

    /// Runs `input` through a scrubber in the given pieces, gathered to the kept size as
    /// the daemon does, and again scanning each piece alone (what is kept back between
    /// scans then matters even in a short body): both give the same bytes and counts.
    fn scrub_pieces(m: &Arc<SecretMatcher>, pieces: &[&[u8]]) -> (Vec<u8>, Arc<Tally>) {
        let run = |gather: bool| {
            let tally = Arc::new(Tally::default());
            let mut s = StreamScrubber::new(m.clone(), tally.clone());
            s.gather = gather;
            let mut out = Vec::new();
            for p in pieces {
                out.extend_from_slice(&s.push(p));
                assert!(s.held() < 2 * m.span().max(1));
            }
            out.extend_from_slice(&s.finish());
            (out, tally)
        };
        let (out, tally) = run(true);
        let (alone, alone_tally) = run(false);
        assert_eq!(alone, out, "each piece scanned alone");
        assert_eq!(
            (alone_tally.count(), alone_tally.credentials()),
            (tally.count(), tally.credentials()),
            "counts with each piece scanned alone"
        );
        (out, tally)
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Answers in a charset whose bytes the scan reads pass; another (UTF-32, UTF-7,
    /// EBCDIC) is refused; a request's wishes for another charset are taken out.
    #[test]
    fn charsets_outside_the_scanned_ones_are_neither_asked_for_nor_passed() {
        for (content_type, ok) in [
            ("application/json", true),
            ("text/html; charset=UTF-8", true),
            ("text/html;charset=\"windows-1252\"", true),
            ("text/plain; charset=iso-8859-15", true),
            ("text/plain; charset=ISO_8859-1", true),
            ("application/octet-stream; charset=binary", true),
            ("application/json; charset=utf-16le", true),
            ("application/json; charset=utf-32be", false),
            ("text/plain; charset=UTF-7", false),
            ("text/plain; format=flowed; charset=IBM037", false),
            ("text/plain; charset=iso-8859-99", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
            assert_eq!(check_charset(&h).is_ok(), ok, "{content_type}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            http::header::ACCEPT_CHARSET,
            HeaderValue::from_static("utf-32"),
        );
        h.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json; charset=utf-32; q=0.9, text/plain"),
        );
        ask_for_scanned_charsets(&mut h);
        assert!(h.get(http::header::ACCEPT_CHARSET).is_none());
        assert_eq!(
            h[http::header::ACCEPT],
            "application/json; q=0.9, text/plain"
        );
        // An Accept without charsets is left as it was.
        let mut h = HeaderMap::new();
        h.insert(http::header::ACCEPT, HeaderValue::from_static("*/*;q=0.8"));
        ask_for_scanned_charsets(&mut h);
        assert_eq!(h[http::header::ACCEPT], "*/*;q=0.8");
    }

    /// Trailers are scrubbed with the secrets known when the response began as well as
    /// the latest: a value rotated out of the store while the body streamed is masked.
    #[test]
    fn trailers_keep_the_secrets_known_when_the_response_began() {
        const NEWER: &str = "ghp_9876543210fedcbaQRS";
        let started = matcher(&[("s", SECRET)]);
        let latest = matcher(&[("s", NEWER)]);
        let mut t = HeaderMap::new();
        t.insert("x-echo-old", HeaderValue::from_static(SECRET));
        t.insert("x-echo-new", HeaderValue::from_static(NEWER));
        t.insert("set-cookie", HeaderValue::from_static("session=1"));
        t.insert("x-plain", HeaderValue::from_static("ok"));
        t.insert("x-subject-token", HeaderValue::from_static("gAAAAsession"));
        let tally = Tally::default();
        scrub_trailers(&mut t, &started, &latest, &tally);
        for name in ["x-echo-old", "x-echo-new"] {
            let v = t.get(name).unwrap().as_bytes();
            assert!(
                !contains(v, SECRET.as_bytes()) && !contains(v, NEWER.as_bytes()),
                "{name}"
            );
        }
        assert_eq!(t.get("x-plain").unwrap(), "ok");
        assert!(t.get("set-cookie").is_none());
        assert!(t.get("x-subject-token").is_none());
        assert_eq!(tally.count(), 2);
        // The same matcher twice is one pass.
        let mut t = HeaderMap::new();
        t.insert("x-echo-old", HeaderValue::from_static(SECRET));
        let tally = Tally::default();
        scrub_trailers(&mut t, &started, &started, &tally);
        assert_eq!(tally.count(), 1);
    }

    /// A body split in two anywhere is scrubbed as it is whole: forms wrapped with breaks,
    /// and chains of soft breaks or runs of `=` longer than the hold-back (which end a
    /// match, whole or split).
    #[test]
    fn a_body_split_anywhere_is_scrubbed_as_it_is_whole() {
        for secret in [SECRET, "tok=en+with/eq==signs"] {
            let m = Arc::new(SecretMatcher::new([("s", secret)]));
            let (head, tail) = secret.split_at(3);
            let chain = "=\n".repeat(m.span());
            let equals = "=".repeat(m.span() + 10);
            let bodies = [
                (format!("pre {head}=\r\n{tail} post"), true),
                (format!("pre {head}\\r\\n {tail} post"), true),
                (format!("pre {head}{chain}{tail} post"), false),
                (format!("pre {head}{equals}{tail} post"), false),
            ];
            for (body, masked) in &bodies {
                let body = body.as_bytes();
                let (whole, _) = scrub_pieces(&m, &[body]);
                assert_eq!(
                    !contains(&whole, tail.as_bytes()),
                    *masked,
                    "{secret} {body:?}"
                );
                for at in 0..=body.len() {
                    let (split, _) = scrub_pieces(&m, &[&body[..at], &body[at..]]);
                    assert_eq!(split, whole, "{secret} split at {at}");
                }
            }
        }
    }

    #[test]
    fn split_at_every_byte_position_in_every_form() {
        use base64::Engine as _;
        let m = matcher(&[("github", SECRET)]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let forms = [
            format!("{{\"headers\":{{\"Authorization\":\"Bearer {SECRET}\"}}}}"),
            format!(
                "auth=Basic {}\n",
                b64.encode(format!("x-access-token:{SECRET}"))
            ),
            format!("b64={}", b64.encode(SECRET)),
            format!(
                "q={}",
                b64.encode(format!("x-access-token:{SECRET}"))
                    .replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D")
            ),
            format!("x{SECRET}y{SECRET}"),
            // The longest form a few bytes before the end, and the value cut short.
            format!(
                "q={}\"}}",
                SECRET
                    .bytes()
                    .map(|b| format!("%{b:02X}"))
                    .collect::<String>()
            ),
            format!("err: Bearer {}", &SECRET[..SECRET.len() - 3]),
            format!("err: Bearer {}\n", &SECRET[..SECRET.len() - 5]),
        ];
        for text in &forms {
            let input = text.as_bytes();
            let (whole, t) = scrub_pieces(&m, &[input]);
            assert_eq!(whole.len(), input.len());
            assert!(t.count() >= 1, "{text}");
            assert!(!contains(&whole, SECRET.as_bytes()), "{text}");
            for at in 0..=input.len() {
                let (out, tally) = scrub_pieces(&m, &[&input[..at], &input[at..]]);
                assert_eq!(out, whole, "split at {at} of {text}");
                assert_eq!(tally.count(), t.count(), "split at {at} of {text}");
                assert_eq!(tally.credentials(), ["github"]);
            }
            // One byte at a time.
            let pieces: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(scrub_pieces(&m, &pieces).0, whole);
        }
    }

    /// What a server's hook printed, relayed by git in sideband packets that cut the
    /// secret anywhere: masked, the packets' headers kept, so the client reads the same
    /// framing and no byte of the secret; the same with the stream split anywhere.
    #[test]
    fn a_secret_across_git_sideband_packets_is_masked_and_the_framing_kept() {
        let m = matcher(&[("github", SECRET)]);
        for cut in 1..SECRET.len() {
            let text = format!("remote: HTTP_AUTHORIZATION=token {SECRET}\n");
            let at = text.find(SECRET).unwrap() + cut;
            let packet = |data: &str| format!("{:04x}\x02{data}", data.len() + 5);
            let wire = format!("{}{}0000", packet(&text[..at]), packet(&text[at..]));
            let (out, t) = scrub_pieces(&m, &[wire.as_bytes()]);
            assert_eq!(t.count(), 1, "cut {cut}");
            assert_eq!(out.len(), wire.len());
            // The framing as sent: each packet's header where it was.
            let second = 5 + at;
            assert_eq!(out[..5], wire.as_bytes()[..5], "cut {cut}");
            assert_eq!(out[second..second + 5], wire.as_bytes()[second..second + 5]);
            let data: Vec<u8> = [&out[5..second], &out[second + 5..out.len() - 4]].concat();
            assert!(!contains(&data, &SECRET.as_bytes()[..8]), "cut {cut}");
            assert!(
                !contains(&data, &SECRET.as_bytes()[SECRET.len() - 8..]),
                "cut {cut}"
            );
            assert!(data.starts_with(b"remote: HTTP_AUTHORIZATION=token "));
            // Split anywhere: the same bytes.
            for split in [1, at, at + 3, at + 5, at + 7, wire.len() - 6] {
                let (head, tail) = wire.as_bytes().split_at(split);
                assert_eq!(
                    scrub_pieces(&m, &[head, tail]).0,
                    out,
                    "cut {cut} split {split}"
                );
            }
        }
    }

    /// Packets small enough that a value crosses several headers, and a value ending
    /// exactly at a packet's end: every header stays in place (the client reads the
    /// stream), and the value is masked.
    #[test]
    fn every_header_around_a_secret_stays_in_place() {
        let m = matcher(&[("github", SECRET)]);
        for size in [4, 7, 9, 23] {
            for pad in 0..size {
                let text = format!("{}{SECRET}", "x".repeat(pad));
                let mut wire = Vec::new();
                let mut headers = Vec::new();
                for piece in text.as_bytes().chunks(size).chain([&b"after\n"[..]]) {
                    headers.push(wire.len());
                    wire.extend_from_slice(format!("{:04x}\x02", piece.len() + 5).as_bytes());
                    wire.extend_from_slice(piece);
                }
                wire.extend_from_slice(b"0000");
                let (out, t) = scrub_pieces(&m, &[&wire]);
                assert_eq!(t.count(), 1, "size {size} pad {pad}");
                for &h in &headers {
                    assert_eq!(
                        out[h..h + 5],
                        wire[h..h + 5],
                        "size {size} pad {pad} at {h}"
                    );
                }
                let data: Vec<u8> = out
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !headers.iter().any(|h| (*h..h + 5).contains(i)))
                    .map(|(_, b)| *b)
                    .collect();
                assert!(
                    !contains(&data, &SECRET.as_bytes()[..6]),
                    "size {size} pad {pad}"
                );
                assert!(data.ends_with(b"after\n0000"));
            }
        }
    }

    /// A value wrapped at a width (base64 of 76 columns) that git then cuts into packets:
    /// a line break and a packet's header inside it. Masked, the header kept.
    #[test]
    fn a_wrapped_secret_across_sideband_packets_is_masked() {
        let m = matcher(&[("github", SECRET)]);
        for brk in 1..SECRET.len() - 1 {
            for cut in 1..SECRET.len() {
                if cut == brk {
                    continue;
                }
                let mut wrapped = SECRET.to_owned();
                wrapped.insert(brk, '\n');
                let text = format!("remote: {wrapped}\n");
                let at = 8 + cut + usize::from(cut > brk);
                let packet = |data: &str| format!("{:04x}\x02{data}", data.len() + 5);
                let wire = format!("{}{}", packet(&text[..at]), packet(&text[at..]));
                let (out, t) = scrub_pieces(&m, &[wire.as_bytes()]);
                assert_eq!(t.count(), 1, "break {brk} cut {cut}: {wire:?}");
                let second = 5 + at;
                assert_eq!(out[second..second + 5], wire.as_bytes()[second..second + 5]);
                assert!(!contains(&out, &SECRET.as_bytes()[..6]), "{brk} {cut}");
                assert!(!contains(&out, &SECRET.as_bytes()[SECRET.len() - 6..]));
            }
        }
    }

    /// A secret ending in hex digits: before a band byte they are the secret's, not a
    /// header, where the secret is found whole (here across a line break, by the search
    /// that joins lines), or cut short across a real header: every byte of it is masked.
    #[test]
    fn hex_digits_of_a_secret_before_a_band_byte_are_masked() {
        const HEX_TAIL: &str = "tok_Zq9Wv2Lr8Kp0deadbeef";
        let m = matcher(&[("c", HEX_TAIL)]);
        let (head, tail) = HEX_TAIL.split_at(6);
        for after in ["\x02X", "\x02Zzz", "\x01 more", "\x02b", "\x02bee"] {
            for text in [
                format!("echo {HEX_TAIL}{after}"),
                format!("echo {head}\n{tail}{after}"),
            ] {
                let (out, t) = scrub_pieces(&m, &[text.as_bytes()]);
                assert!(t.count() >= 1, "{text:?}");
                let at = text.find(head).unwrap();
                let end = at + HEX_TAIL.len() + usize::from(text.contains('\n'));
                assert!(
                    out[at..end]
                        .iter()
                        .all(|b| MARKER.contains(b) || *b == b'*' || *b == b'\n'),
                    "{text:?} -> {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
        // Cut by a real header too, the hex tail followed by a band byte: found cut short
        // across the header, and the tail masked.
        let packet = |data: &str| format!("{:04x}\x02{data}", data.len() + 5);
        let wire = format!(
            "{}{}",
            packet(&format!("echo {head}")),
            packet(&format!("{tail}\x02Xrest"))
        );
        let (out, t) = scrub_pieces(&m, &[wire.as_bytes()]);
        assert!(t.count() >= 1, "{wire:?}");
        assert!(
            !contains(&out, b"beef") && !contains(&out, head.as_bytes()),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }

    /// Text wrapped at a fixed width: the break may fall anywhere in the secret's form
    /// (the sandbox chooses what precedes it). Wherever a break falls, and whatever its
    /// kind, the whole form is masked with the break inside it, in one piece or split
    /// anywhere.
    #[test]
    fn wrapped_forms_are_found_across_their_line_breaks() {
        use base64::Engine as _;
        let m = matcher(&[("github", SECRET)]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let echoed = format!("authorization: Bearer {SECRET}\r\n");
        let at = echoed.find(SECRET).unwrap();
        let hex: String = SECRET.bytes().map(|b| format!("{b:02x}")).collect();
        // Each text, and where the secret's form lies in it (for base64, the groups that
        // depend on the secret alone).
        let texts = [
            (echoed.clone(), at..at + SECRET.len()),
            (format!("00{hex}00"), 2..2 + hex.len()),
            (
                b64.encode(&echoed),
                at.div_ceil(3) * 4..(at + SECRET.len()) / 3 * 4,
            ),
        ];
        let masked = |b: &u8| MARKER.contains(b) || *b == b'*';
        for (text, form) in &texts {
            for brk in [
                "\n", "\r\n", "=\r\n", "=\n", "\r", "\n\r", "\r\r\n", "\n ", "\r\n\t", "\\n",
                "\\r\\n", "=\\r\\n ",
            ] {
                for k in form.start + 1..form.end {
                    let input = format!("{}{brk}{}", &text[..k], &text[k..]);
                    let (out, t) = scrub_pieces(&m, &[input.as_bytes()]);
                    assert!(t.count() >= 1, "{input:?}");
                    let mut joined = out.clone();
                    joined.drain(k..k + brk.len());
                    assert!(
                        joined[form.clone()].iter().all(masked),
                        "break {brk:?} at {k}: {}",
                        String::from_utf8_lossy(&out)
                    );
                    let split = k + brk.len() / 2;
                    let (pieces, _) = scrub_pieces(
                        &m,
                        &[&input.as_bytes()[..split], &input.as_bytes()[split..]],
                    );
                    assert_eq!(pieces, out, "split at {split} of {input:?}");
                }
            }
        }
        // A `=` of the secret itself right before a break is not taken for a soft break.
        let signed = "sv=2024-11-04&sig=Zm9vYmFyYmF6cXV4MTIzNDU2";
        let m2 = matcher(&[("sas", signed)]);
        for k in 1..signed.len() {
            for brk in ["\n", "\r\n"] {
                let input = format!("url={}{brk}{}&", &signed[..k], &signed[k..]);
                let (out, t) = scrub_pieces(&m2, &[input.as_bytes()]);
                assert!(t.count() >= 1, "{input:?}");
                let kept = String::from_utf8_lossy(&out).replace(['\r', '\n'], "");
                assert!(
                    !kept.contains(&signed[k.saturating_sub(4)..]),
                    "{input:?}: {kept}"
                );
            }
        }
        // Both in one text: a break after the secret's own `=`, and a soft break.
        let mixed = format!("{}\n{}=\n{}", &signed[..3], &signed[3..20], &signed[20..]);
        let (out, t) = scrub_pieces(&m2, &[mixed.as_bytes()]);
        assert!(t.count() >= 1, "{mixed:?}");
        assert!(
            !String::from_utf8_lossy(&out).contains(&signed[20..]),
            "{}",
            String::from_utf8_lossy(&out)
        );
        // Two breaks in a row end a match: a blank line is not passed over.
        let apart = format!("{}\n\n{}", &SECRET[..10], &SECRET[10..]);
        assert_eq!(scrub_pieces(&m, &[apart.as_bytes()]).1.count(), 0);
    }

    /// Header values and targets are judged by the same matching as bodies: a form
    /// wrapped with an escaped line break in a header is found and masked there too.
    #[test]
    fn wrapped_forms_are_found_in_headers() {
        let m = matcher(&[("github", SECRET)]);
        let wrapped = format!("{}\\n{}", &SECRET[..9], &SECRET[9..]);
        assert_eq!(m.find(wrapped.as_bytes()), Some("github"));
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_str(&wrapped).unwrap());
        let tally = Tally::default();
        assert_eq!(scrub_headers(&mut h, &m, &tally), 1);
        let value = h["x-echo"].to_str().unwrap();
        assert!(
            !value.contains(&SECRET[..9]) && !value.contains(&SECRET[9..]),
            "{value}"
        );
    }

    /// A body in UTF-16 carries the secret with a zero byte beside each character.
    #[test]
    fn utf16_bodies_are_scrubbed() {
        let m = matcher(&[("github", SECRET)]);
        let json = format!("{{\"auth\": \"Bearer {SECRET}\"}}");
        for bytes in [
            json.encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect::<Vec<u8>>(),
            json.encode_utf16().flat_map(u16::to_be_bytes).collect(),
        ] {
            let (out, tally) = scrub_pieces(&m, &[&bytes]);
            // The two byte orders' forms overlap by all but a byte: one or two counted.
            assert!(tally.count() >= 1);
            let text: String = out
                .iter()
                .filter(|b| **b != 0)
                .map(|&b| b as char)
                .collect();
            assert!(!text.contains(SECRET), "{text}");
        }
    }

    #[test]
    fn the_marker_keeps_the_length_and_the_rest_is_untouched() {
        let m = matcher(&[("github", SECRET)]);
        let input = format!("before {SECRET} after");
        let (out, tally) = scrub_pieces(&m, &[input.as_bytes()]);
        let expected = format!(
            "before {}{} after",
            std::str::from_utf8(MARKER).unwrap(),
            "*".repeat(SECRET.len() - MARKER.len())
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(tally.count(), 1);

        // No secret: byte for byte, whatever the pieces.
        let plain: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let pieces: Vec<&[u8]> = plain.chunks(333).collect();
        let (out, tally) = scrub_pieces(&m, &pieces);
        assert_eq!(out, plain);
        assert_eq!(tally.count(), 0);
    }

    #[test]
    fn overlapping_secrets_are_masked_whole() {
        let m = matcher(&[("a", "abcdefgh1234"), ("b", "1234ijklmnop")]);
        let input = b"..abcdefgh1234ijklmnop..";
        for at in 0..=input.len() {
            let (out, tally) = scrub_pieces(&m, &[&input[..at], &input[at..]]);
            assert_eq!(&out[..2], b"..");
            assert_eq!(&out[out.len() - 2..], b"..");
            assert!(
                out[2..22].iter().all(|b| MARKER.contains(b) || *b == b'*'),
                "{at}: {}",
                String::from_utf8_lossy(&out)
            );
            assert_eq!(tally.count(), 2, "split at {at}");
            assert_eq!(tally.credentials(), ["a", "b"]);
        }
    }

    #[test]
    fn headers_and_head_checks() {
        let m = matcher(&[("github", SECRET)]);
        let mut h = HeaderMap::new();
        h.insert(
            "x-echo",
            HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap(),
        );
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let tally = Tally::default();
        assert_eq!(scrub_headers(&mut h, &m, &tally), 1);
        assert!(!h["x-echo"].to_str().unwrap().contains(SECRET));
        assert!(h["x-echo"]
            .to_str()
            .unwrap()
            .starts_with("Bearer [egressd:scrubbed]"));
        assert_eq!(h["content-type"], "application/json");

        let uri: http::Uri = format!("/search?q={SECRET}").parse().unwrap();
        assert_eq!(
            find_in_head(&http::Method::GET, &uri, &HeaderMap::new(), &m),
            Some(("github".into(), "the URL"))
        );
        // Percent-encoded, even where nothing needs encoding, and encoded twice: an
        // origin may decode what the proxy forwards as it is.
        let every = SECRET
            .bytes()
            .map(|b| format!("%{b:02x}"))
            .collect::<String>();
        for target in [
            format!("/search?q=%67hp_{}", &SECRET[4..]),
            format!("/a/{every}"),
            format!("/search?q=%2567hp_{}", &SECRET[4..]),
        ] {
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(
                find_in_head(&http::Method::GET, &uri, &HeaderMap::new(), &m),
                Some(("github".into(), "the URL")),
                "{target}"
            );
        }
        let uri: http::Uri = "/search?q=ok%20%zz%4".parse().unwrap();
        assert_eq!(
            find_in_head(&http::Method::GET, &uri, &HeaderMap::new(), &m),
            None
        );
        assert_eq!(
            decoded_forms("/a%2541b%zz%4"),
            [b"/a%41b%zz%4".to_vec(), b"/aAb%zz%4".to_vec()]
        );
        assert!(decoded_forms("/plain?x=%zz").is_empty());
        let uri: http::Uri = "/search?q=ok".parse().unwrap();
        assert_eq!(find_in_head(&http::Method::GET, &uri, &h, &m), None);
        h.insert("x-leak", HeaderValue::from_str(SECRET).unwrap());
        assert_eq!(
            find_in_head(&http::Method::GET, &uri, &h, &m),
            Some(("github".into(), "a header"))
        );
    }

    #[test]
    fn outbound_scan_stops_before_the_secret_is_released() {
        let m = matcher(&[("github", SECRET)]);
        let pct_hex: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
        let spaced: Vec<String> = SECRET.bytes().map(|b| format!("{b:02x}")).collect();
        // The raw value, and the longest forms a few bytes before the body's end.
        for body in [
            format!("{{\"note\":\"hello\",\"token\":\"{SECRET}\"}}"),
            format!("q={pct_hex}\"}}"),
            format!("dump: {} ok", spaced.join(" ")),
            format!("t={}", &SECRET[..SECRET.len() - 3]),
        ] {
            stopped_at_every_split(&m, &body);
        }
        // A clean body passes whole.
        let hit = Arc::new(OutboundHit::default());
        let mut scan = OutboundScan::new(m, hit.clone());
        let mut sent = scan.push(b"{\"note\":\"fine\"}").unwrap().to_vec();
        sent.extend_from_slice(&scan.finish().unwrap());
        assert_eq!(sent, b"{\"note\":\"fine\"}");
        assert_eq!(hit.credential(), None);
    }

    #[test]
    fn outbound_trailers_are_scanned_by_name_and_value() {
        let m = matcher(&[("github", SECRET)]);
        let hex: String = SECRET.bytes().map(|b| format!("{b:02x}")).collect();
        let mut clean = HeaderMap::new();
        clean.insert("x-checksum", HeaderValue::from_static("abc"));
        let mut named = clean.clone();
        named.insert(
            http::HeaderName::from_bytes(hex.as_bytes()).unwrap(),
            HeaderValue::from_static("1"),
        );
        let mut valued = clean.clone();
        valued.insert("x-note", HeaderValue::from_str(SECRET).unwrap());
        for (trailers, refused) in [(clean, false), (named, true), (valued, true)] {
            let hit = Arc::new(OutboundHit::default());
            let mut scan = OutboundScan::new(m.clone(), hit.clone());
            assert_eq!(scan.trailers(&trailers).is_err(), refused, "{trailers:?}");
            assert_eq!(hit.credential().is_some(), refused);
        }
    }

    /// `body`, cut in two anywhere, is refused before the secret in it is released.
    fn stopped_at_every_split(m: &Arc<SecretMatcher>, body: &str) {
        let input = body.as_bytes();
        for at in 0..=input.len() {
            let hit = Arc::new(OutboundHit::default());
            let mut scan = OutboundScan::new(m.clone(), hit.clone());
            let mut sent: Vec<u8> = Vec::new();
            let mut failed = false;
            for piece in [&input[..at], &input[at..]] {
                match scan.push(piece) {
                    Ok(b) => sent.extend_from_slice(&b),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            // A secret in the body's last bytes is known for whole only at its end.
            if !failed {
                match scan.finish() {
                    Ok(b) => sent.extend_from_slice(&b),
                    Err(_) => failed = true,
                }
            }
            assert!(failed, "split at {at} of {body}");
            assert_eq!(hit.credential(), Some("github"));
            assert!(!contains(&sent, SECRET.as_bytes()), "split at {at}");
        }
    }

    #[test]
    fn encodings() {
        let enc = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
            Encoding::of(&h)
        };
        assert_eq!(Encoding::of(&HeaderMap::new()), Encoding::Identity);
        assert_eq!(enc("identity"), Encoding::Identity);
        assert_eq!(enc("GZIP"), Encoding::Gzip);
        assert_eq!(enc("x-gzip"), Encoding::Gzip);
        assert_eq!(enc("deflate"), Encoding::Deflate);
        assert_eq!(enc("br"), Encoding::Other("br".into()));
        assert_eq!(enc("gzip, br"), Encoding::Other("gzip, br".into()));
        // An unregistered coding is not repeated: it is the origin's free text.
        assert_eq!(
            enc("gzip, Bearer not-a-registered-coding"),
            Encoding::Other("gzip, ?".into())
        );

        // The decoders, one byte at a time.
        let text = format!("{{\"echo\":\"Bearer {SECRET}\"}}").repeat(50);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(text.as_bytes()).unwrap();
        let z = z.finish().unwrap();
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(text.as_bytes()).unwrap();
        let raw = raw.finish().unwrap();
        for (encoding, bytes) in [
            (Encoding::Gzip, gz),
            (Encoding::Deflate, z),
            (Encoding::Deflate, raw),
        ] {
            let mut d = Decoder::new(&encoding).unwrap();
            let mut out = Vec::new();
            for b in bytes.chunks(1) {
                out.extend(d.write(b).unwrap());
            }
            out.extend(d.finish().unwrap());
            assert_eq!(out, text.as_bytes());
        }
        let mut d = Decoder::new(&Encoding::Gzip).unwrap();
        assert!(d.write(b"not gzip at all").is_err() || d.finish().is_err());
    }
}
