//! Byte ranges of scrubbed responses.
//!
//! A range the sandbox chooses could cut a reflected secret into pieces no scan
//! recognises (`bytes=0-6`, then `bytes=7-13`, ...). So the proxy asks the origin for the
//! range widened on each side by the most bytes a match can cover, scrubs that, and sends
//! the sandbox exactly the bytes it asked for, cut from the scrubbed piece: a secret that
//! overlaps the asked range lies whole inside the widened one. A request for several
//! ranges, or in another unit, goes without `Range` and `If-Range`; the origin answers
//! with the whole representation, as HTTP lets any server answer a range request.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, IF_RANGE, RANGE,
};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::credentials::SecretMatcher;

/// The one byte range the sandbox asked for (first and last byte, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// `bytes=FIRST-LAST`
    FromTo(u64, u64),
    /// `bytes=FIRST-`
    From(u64),
    /// `bytes=-LENGTH`: the last LENGTH bytes.
    Suffix(u64),
}

/// Headers some origins read as a range in place of `Range` (Apache's `Request-Range`,
/// Azure Storage's `x-ms-range`): removed, so that only the widened `Range` selects bytes.
const OTHER_RANGE_HEADERS: [&str; 2] = ["request-range", "x-ms-range"];

/// A range asked of the origin wider than the sandbox asked: what it asked, by how much it
/// was widened, and the matcher whose longest form set that (the answer is scrubbed with
/// it, whatever the credentials became meanwhile).
#[derive(Clone)]
pub struct Widened {
    pub asked: Asked,
    pub margin: u64,
    pub matcher: Arc<SecretMatcher>,
}

impl Widened {
    /// [`narrow`] for this range.
    pub fn narrow(
        &self,
        status: &mut StatusCode,
        headers: &mut HeaderMap,
    ) -> Result<Option<Window>, String> {
        narrow(self.asked, self.margin, status, headers)
    }
}

/// The least a range is widened by, whatever secrets are known when it is asked: a
/// value first known while it is answered (a session minted for another sandbox) that
/// is longer than the margin ends the answer, so the margin has room for any value
/// sources give in practice (an STS session token is about 1 KiB, 9 KiB as matched
/// across line breaks). Tests use one byte, to exercise that end with short values.
#[cfg(not(test))]
const MIN_MARGIN: u64 = 64 * 1024;
#[cfg(test)]
const MIN_MARGIN: u64 = 1;

/// Whether a range on a request of `method` selects the bytes of the answer (RFC 9110
/// 14.2: `GET`, and `HEAD` as its head), and so is widened. On another method it is
/// the request's own meaning (a write's place in a blob) and must reach the origin as the
/// sandbox sent it.
pub fn selects_answer(method: &http::Method) -> bool {
    method == http::Method::GET || method == http::Method::HEAD
}

/// Rewrites the request's `Range` to one widened by the most bytes one of `matcher`'s
/// matches covers ([`SecretMatcher::span`]), at least [`MIN_MARGIN`], and returns
/// what was asked; removes `Range` and `If-Range` when it is not one byte range, and every
/// other header an origin may take a range from. `None`: no range goes to the origin.
pub fn widen(headers: &mut HeaderMap, matcher: Arc<SecretMatcher>) -> Option<Widened> {
    let margin = u64::try_from(matcher.span())
        .unwrap_or(u64::MAX)
        .max(MIN_MARGIN);
    widen_by(headers, margin).map(|asked| Widened {
        asked,
        margin,
        matcher,
    })
}

/// [`widen`] by `margin` bytes.
fn widen_by(headers: &mut HeaderMap, margin: u64) -> Option<Asked> {
    for name in OTHER_RANGE_HEADERS {
        headers.remove(name);
    }
    if !headers.contains_key(RANGE) {
        return None;
    }
    let widened = widened_range(headers, margin);
    if widened.is_none() {
        headers.remove(RANGE);
        headers.remove(IF_RANGE);
    }
    widened
}

/// Sets `Range` to the one byte range it holds widened by `margin`; `None` when it holds
/// anything else (the caller removes it).
fn widened_range(headers: &mut HeaderMap, margin: u64) -> Option<Asked> {
    let mut values = headers.get_all(RANGE).iter();
    let asked = match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok().and_then(parse)?,
        _ => return None,
    };
    let widened = match asked {
        Asked::FromTo(first, last) => format!(
            "bytes={}-{}",
            first.saturating_sub(margin),
            last.saturating_add(margin)
        ),
        Asked::From(first) => format!("bytes={}-", first.saturating_sub(margin)),
        Asked::Suffix(len) => format!("bytes=-{}", len.saturating_add(margin)),
    };
    headers.insert(RANGE, HeaderValue::from_str(&widened).ok()?);
    Some(asked)
}

/// One byte range in a `Range` value (RFC 9110 14.1.1; the unit is case-insensitive).
fn parse(value: &str) -> Option<Asked> {
    let (unit, spec) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return None;
    }
    let (first, last) = spec.trim().split_once('-')?;
    match (first.is_empty(), last.is_empty()) {
        (false, false) => {
            let (first, last) = (digits(first)?, digits(last)?);
            (first <= last).then_some(Asked::FromTo(first, last))
        }
        (false, true) => Some(Asked::From(digits(first)?)),
        (true, false) => Some(Asked::Suffix(digits(last)?)),
        (true, true) => None,
    }
}

/// A decimal number of digits only (no sign, no spaces).
fn digits(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Which bytes of the (widened) body the sandbox gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    skip: u64,
    take: u64,
}

impl Window {
    /// Cuts the next `piece` of the body to the window, keeping track of its position.
    pub fn cut(&mut self, piece: &Bytes) -> Bytes {
        let len = piece.len() as u64;
        let skipped = self.skip.min(len);
        self.skip -= skipped;
        let kept = (len - skipped).min(self.take);
        self.take -= kept;
        // Both within `piece`, whose length is a usize.
        piece.slice(skipped as usize..(skipped + kept) as usize)
    }

    /// Bytes still to come.
    pub fn remaining(&self) -> u64 {
        self.take
    }
}

/// A partial answer to a request the proxy did not widen (no `Range` asked, or one it
/// removed): its bytes were chosen some other way (a query like S3's `partNumber`) and
/// may cut a secret anywhere, so it is refused.
pub fn unasked(status: StatusCode, headers: &HeaderMap) -> Result<(), String> {
    if status == StatusCode::PARTIAL_CONTENT || headers.contains_key(CONTENT_RANGE) {
        return Err(
            "upstream server: answered with part of a body the proxy did not ask for as a \
             byte range, whose edges could cut a reflected secret where no scan finds it"
                .to_owned(),
        );
    }
    Ok(())
}

/// Turns the origin's answer to a widened range into the answer to the range asked:
/// its `Content-Range` and `Content-Length`, and the window of its body to send. Only
/// bytes at least `margin` inside the origin's piece (or at the body's own start or end)
/// are sent, so a secret crossing an edge of the piece is never sent cut: an origin that
/// started later than asked is refused, one that ended sooner gets its answer shortened.
/// A `206` that is not one plain byte range of identity bytes cannot be cut (a piece of a
/// compressed stream cannot be scanned either): `Err(reason)`. Other statuses pass as
/// they are (`200`: the origin sent everything; `416`: the asked range is unsatisfiable
/// too, as it lies inside the widened one).
pub fn narrow(
    asked: Asked,
    margin: u64,
    status: &mut StatusCode,
    headers: &mut HeaderMap,
) -> Result<Option<Window>, String> {
    if *status != StatusCode::PARTIAL_CONTENT {
        return Ok(None);
    }
    let refuse = |what: &str| {
        Err(format!(
            "upstream server: answered a byte range with {what}, which the proxy cannot cut \
             to the range asked after scanning it for reflected secrets"
        ))
    };
    if headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/byteranges")
        })
    {
        return refuse("several ranges");
    }
    if headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return refuse("a Content-Encoding");
    }
    let mut ranges = headers.get_all(CONTENT_RANGE).iter();
    let Some((start, end, total)) = (match (ranges.next(), ranges.next()) {
        (Some(v), None) => v.to_str().ok().and_then(content_range),
        _ => None,
    }) else {
        return refuse("no single valid Content-Range");
    };
    let (first, last) = match (asked, total) {
        (Asked::FromTo(first, last), _) => (first, last.min(end)),
        (Asked::From(first), _) => (first, end),
        (Asked::Suffix(len), Some(total)) => (total.saturating_sub(len), end),
        (Asked::Suffix(_), None) => return refuse("an unknown complete length to a suffix range"),
    };
    let last = total.map_or(last, |t| last.min(t.saturating_sub(1)));
    if first > last || total == Some(0) {
        // Nothing of what was asked exists (the widened range reached back into bytes
        // that do).
        *status = StatusCode::RANGE_NOT_SATISFIABLE;
        let total = total.map_or_else(|| "*".to_owned(), |t| t.to_string());
        let Ok(range) = HeaderValue::from_str(&format!("bytes */{total}")) else {
            return refuse("a length it cannot restate");
        };
        headers.insert(CONTENT_RANGE, range);
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        return Ok(Some(Window { skip: 0, take: 0 }));
    }
    // The bytes whose every neighbourhood of `margin` the scan saw.
    let safe_from = if start == 0 {
        0
    } else {
        start.saturating_add(margin)
    };
    let safe_to = if total.is_some_and(|t| end + 1 == t) {
        end
    } else {
        end.saturating_sub(margin)
    };
    if first < safe_from {
        return refuse("bytes starting later than asked");
    }
    let last = last.min(safe_to);
    if last < first {
        return refuse("too few bytes around the range asked");
    }
    let take = last - first + 1;
    if first != start || last != end {
        drop_digests(headers);
    }
    let total = total.map_or_else(|| "*".to_owned(), |t| t.to_string());
    let Ok(range) = HeaderValue::from_str(&format!("bytes {first}-{last}/{total}")) else {
        return refuse("a range it cannot restate");
    };
    headers.insert(CONTENT_RANGE, range);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(take));
    Ok(Some(Window {
        skip: first - start,
        take,
    }))
}

/// Removes checksums of the bytes the origin sent, which the cut bytes no longer match
/// (a client checking them would refuse the answer): `Content-MD5`, `Content-Digest`
/// (RFC 9530) and S3's `x-amz-checksum-*`.
fn drop_digests(headers: &mut HeaderMap) {
    let names: Vec<_> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name == "content-md5" || name == "content-digest" || name.starts_with("x-amz-checksum-")
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
fn content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (unit, rest) = value.trim().split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, total) = rest.trim().split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last) = (digits(first)?, digits(last)?);
    let total = if total == "*" {
        None
    } else {
        Some(digits(total)?)
    };
    (first <= last && total.is_none_or(|t| last < t)).then_some((first, last, total))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn headers(pairs: &[(http::header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn one_byte_range_is_widened_by_the_margin() {
        for (value, asked, widened) in [
            ("bytes=100-106", Asked::FromTo(100, 106), "bytes=40-166"),
            ("bytes=10-16", Asked::FromTo(10, 16), "bytes=0-76"),
            ("BYTES = 100-", Asked::From(100), "bytes=40-"),
            ("bytes=-7", Asked::Suffix(7), "bytes=-67"),
        ] {
            let mut h = headers(&[(RANGE, value), (IF_RANGE, "\"etag\"")]);
            assert_eq!(widen_by(&mut h, 60), Some(asked), "{value}");
            assert_eq!(h.get(RANGE).unwrap(), widened, "{value}");
            assert!(h.contains_key(IF_RANGE), "{value}");
        }
    }

    #[test]
    fn anything_but_one_byte_range_goes_without_range() {
        for value in [
            "bytes=0-6,7-13",
            "bytes=7-3",
            "bytes=-",
            "bytes=+1-2",
            "bytes=1-99999999999999999999999",
            "items=0-6",
            "bytes 0-6",
        ] {
            let mut h = headers(&[(RANGE, value), (IF_RANGE, "\"etag\"")]);
            assert_eq!(widen_by(&mut h, 60), None, "{value}");
            assert!(
                !h.contains_key(RANGE) && !h.contains_key(IF_RANGE),
                "{value}"
            );
        }
        let mut two = headers(&[(RANGE, "bytes=0-6"), (RANGE, "bytes=7-13")]);
        assert_eq!(widen_by(&mut two, 60), None);
        assert!(!two.contains_key(RANGE));
        assert_eq!(widen_by(&mut HeaderMap::new(), 60), None);
    }

    #[test]
    fn the_answer_is_cut_to_the_range_asked() {
        // Asked 100-106, widened to 40-166, origin sent it all.
        let mut status = StatusCode::PARTIAL_CONTENT;
        let checksum = http::header::HeaderName::from_static("x-amz-checksum-crc32");
        let mut h = headers(&[
            (CONTENT_RANGE, "bytes 40-166/1000"),
            (checksum.clone(), "rC90eQ=="),
            (http::header::ETAG, "\"e\""),
        ]);
        let mut w = narrow(Asked::FromTo(100, 106), 60, &mut status, &mut h)
            .unwrap()
            .unwrap();
        assert_eq!(h.get(CONTENT_RANGE).unwrap(), "bytes 100-106/1000");
        // The origin's checksum was of the bytes it sent; the entity tag stays.
        assert!(!h.contains_key(&checksum) && h.contains_key(http::header::ETAG));
        assert_eq!(h.get(CONTENT_LENGTH).unwrap(), "7");
        let body = Bytes::from((40..=166u8).collect::<Vec<_>>());
        let mut out = w.cut(&body.slice(..50)).to_vec();
        out.extend_from_slice(&w.cut(&body.slice(50..)));
        assert_eq!(out, (100..=106u8).collect::<Vec<_>>());
        assert_eq!(w.remaining(), 0);

        // A suffix and an open range near the end, resolved against the length.
        let mut h = headers(&[(CONTENT_RANGE, "bytes 933-999/1000")]);
        let w = narrow(Asked::Suffix(7), 60, &mut status, &mut h)
            .unwrap()
            .unwrap();
        assert_eq!(h.get(CONTENT_RANGE).unwrap(), "bytes 993-999/1000");
        assert_eq!(w, Window { skip: 60, take: 7 });
        let mut h = headers(&[(CONTENT_RANGE, "bytes 933-999/1000")]);
        let w = narrow(Asked::From(1000 - 7), 60, &mut status, &mut h)
            .unwrap()
            .unwrap();
        assert_eq!(h.get(CONTENT_RANGE).unwrap(), "bytes 993-999/1000");
        assert_eq!(w, Window { skip: 60, take: 7 });
    }

    /// An origin that sends less than the widened range: bytes within `margin` of an edge
    /// of its piece (other than the body's own start or end) are not sent, since a secret
    /// crossing that edge was scanned cut.
    #[test]
    fn bytes_near_the_edges_of_a_shorter_piece_are_not_sent() {
        let mut status = StatusCode::PARTIAL_CONTENT;
        // Asked 1000-, widened to 940-; the origin capped it at 66475 of 100000.
        let mut h = headers(&[(CONTENT_RANGE, "bytes 940-66475/100000")]);
        let w = narrow(Asked::From(1000), 60, &mut status, &mut h)
            .unwrap()
            .unwrap();
        assert_eq!(h.get(CONTENT_RANGE).unwrap(), "bytes 1000-66415/100000");
        assert_eq!(
            w,
            Window {
                skip: 60,
                take: 65416
            }
        );
        // Started later than asked: the first bytes asked were not seen with what
        // precedes them.
        let mut h = headers(&[(CONTENT_RANGE, "bytes 990-2000/100000")]);
        assert!(narrow(Asked::From(1000), 60, &mut status, &mut h).is_err());
        // The body's own start and end are edges no secret crosses.
        let mut h = headers(&[(CONTENT_RANGE, "bytes 0-9/10")]);
        let w = narrow(Asked::FromTo(2, 5), 60, &mut status, &mut h)
            .unwrap()
            .unwrap();
        assert_eq!(w, Window { skip: 2, take: 4 });
        // Of an unknown length, the end is an edge too.
        let mut h = headers(&[(CONTENT_RANGE, "bytes 940-999/*")]);
        assert!(narrow(Asked::From(993), 60, &mut status, &mut h).is_err());
    }

    #[test]
    fn a_partial_answer_not_asked_for_is_refused() {
        assert!(unasked(StatusCode::PARTIAL_CONTENT, &HeaderMap::new()).is_err());
        let h = headers(&[(CONTENT_RANGE, "bytes 0-9/100")]);
        assert!(unasked(StatusCode::OK, &h).is_err());
        assert!(unasked(StatusCode::OK, &HeaderMap::new()).is_ok());
        let mut h = headers(&[
            (RANGE, "bytes=0-6"),
            (
                http::header::HeaderName::from_static("x-ms-range"),
                "bytes=0-6",
            ),
            (
                http::header::HeaderName::from_static("request-range"),
                "bytes=0-6",
            ),
        ]);
        widen_by(&mut h, 60);
        assert!(!h.contains_key("x-ms-range") && !h.contains_key("request-range"));
        assert_eq!(h.get(RANGE).unwrap(), "bytes=0-66");
    }

    #[test]
    fn a_range_past_the_end_is_unsatisfiable() {
        // Asked 1000-1010 of 990 bytes: the widened 940-1070 still reached bytes.
        let mut status = StatusCode::PARTIAL_CONTENT;
        let mut h = headers(&[(CONTENT_RANGE, "bytes 940-989/990")]);
        let w = narrow(Asked::FromTo(1000, 1010), 60, &mut status, &mut h)
            .unwrap()
            .unwrap();
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(h.get(CONTENT_RANGE).unwrap(), "bytes */990");
        assert_eq!(w.remaining(), 0);
    }

    #[test]
    fn answers_that_cannot_be_cut_are_refused() {
        for pairs in [
            vec![(CONTENT_TYPE, "multipart/byteranges; boundary=x")],
            vec![
                (CONTENT_RANGE, "bytes 40-166/1000"),
                (CONTENT_ENCODING, "gzip"),
            ],
            vec![],
            vec![(CONTENT_RANGE, "bytes 40-166/100")],
            vec![
                (CONTENT_RANGE, "bytes 40-166/1000"),
                (CONTENT_RANGE, "bytes 0-1/1000"),
            ],
            // Starts after the bytes asked.
            vec![(CONTENT_RANGE, "bytes 101-166/1000")],
        ] {
            let mut status = StatusCode::PARTIAL_CONTENT;
            let mut h = headers(&pairs);
            assert!(
                narrow(Asked::FromTo(100, 106), 60, &mut status, &mut h).is_err(),
                "{pairs:?}"
            );
        }
        let mut status = StatusCode::PARTIAL_CONTENT;
        let mut h = headers(&[(CONTENT_RANGE, "bytes 0-9/*")]);
        assert!(narrow(Asked::Suffix(5), 60, &mut status, &mut h).is_err());
    }

    #[test]
    fn other_statuses_pass() {
        for status in [StatusCode::OK, StatusCode::RANGE_NOT_SATISFIABLE] {
            let mut s = status;
            let mut h = headers(&[(CONTENT_LENGTH, "1000")]);
            assert_eq!(narrow(Asked::FromTo(0, 6), 60, &mut s, &mut h), Ok(None));
            assert_eq!(s, status);
            assert_eq!(h.get(CONTENT_LENGTH).unwrap(), "1000");
        }
    }
}
