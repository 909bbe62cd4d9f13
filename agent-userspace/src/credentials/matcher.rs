//! [`SecretMatcher`]: one Aho-Corasick automaton over every current secret value of every
//! credential, in each form it can take on the wire ([`forms`]). The proxy uses it to
//! scrub secrets an origin reflects back and to refuse requests from a sandbox that carry
//! one. The store rebuilds it whenever a value changes (a file rotates, a command runs
//! again after its `ttl`, a token is minted).
//!
//! The automaton reports overlapping matches (`MatchKind::Standard`), so that when two
//! patterns overlap every byte of both is found, not only the leftmost one.

use std::fmt;
use std::ops::Range;

use aho_corasick::{AhoCorasick, Input, MatchKind};
use base64::Engine as _;

/// Forms shorter than this are not matched: they would match ordinary text. A secret this
/// short is a configuration mistake the daemon warns about.
pub const MIN_PATTERN_LEN: usize = 8;

/// How many final characters a value (plain or base64) may lack and still be matched.
pub const CUT_SHORT: usize = 8;

/// The fewest characters a cut-short value keeps to be matched: fewer would be a piece
/// other values of its kind could share.
const MIN_CUT_LEN: usize = 16;

/// The automaton over all known secret forms, and which credential each pattern is of.
pub struct SecretMatcher {
    ac: Option<AhoCorasick>,
    /// Index into `names` of each pattern.
    owner: Vec<usize>,
    /// Whether each pattern is a value cut short (it may be the start of a longer match).
    cut: Vec<bool>,
    names: Vec<String>,
    max_len: usize,
    /// The patterns with a `=`, without it (see [`Self::each_match_cut`]), and which
    /// pattern each was made from.
    eq_free: Option<AhoCorasick>,
    eq_free_of: Vec<usize>,
    /// The bytes some pattern has, in either ASCII case: every match is a run of them, so
    /// only such runs are searched (see [`Runs`]).
    in_pattern: ByteSet,
    /// The bytes a match across line breaks may cover: [`Self::in_pattern`] and those
    /// of the breaks [`joined`] takes out.
    in_joined: ByteSet,
    /// The bytes a match in a text with escapes decoded may cover: [`Self::in_pattern`]
    /// and those of the escapes [`decoded`] decodes ([`ESCAPE_BYTES`]).
    in_decoded: ByteSet,
    /// The shortest pattern (with or without its `=`).
    min_len: usize,
}

impl fmt::Debug for SecretMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretMatcher")
            .field("credentials", &self.names)
            .field("patterns", &self.owner.len())
            .finish_non_exhaustive()
    }
}

impl Default for SecretMatcher {
    fn default() -> Self {
        Self::empty()
    }
}

impl SecretMatcher {
    /// Matches nothing.
    pub fn empty() -> Self {
        Self {
            ac: None,
            owner: Vec::new(),
            cut: Vec::new(),
            names: Vec::new(),
            max_len: 0,
            eq_free: None,
            eq_free_of: Vec::new(),
            in_pattern: ByteSet::default(),
            in_joined: ByteSet::default(),
            in_decoded: ByteSet::default(),
            min_len: 0,
        }
    }

    /// An automaton over `(credential name, secret value)` pairs, each expanded to its
    /// [`forms`]. A credential may appear more than once (its current and previous value).
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut names: Vec<String> = Vec::new();
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut seen: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        let mut owner = Vec::new();
        let mut cut = Vec::new();
        for (name, value) in secrets {
            let index = match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    names.push(name.to_owned());
                    names.len() - 1
                }
            };
            for (form, cut_short) in forms_of(value) {
                if seen.insert(form.clone()) {
                    patterns.push(form);
                    owner.push(index);
                    cut.push(cut_short);
                }
            }
        }
        let max_len = patterns.iter().map(Vec::len).max().unwrap_or(0);
        let mut in_pattern = ByteSet::default();
        for p in &patterns {
            in_pattern.add_any_case(p);
        }
        let mut in_joined = in_pattern.clone();
        in_joined.add_any_case(BREAK_BYTES);
        let mut in_decoded = in_pattern.clone();
        in_decoded.add_any_case(ESCAPE_BYTES);
        let (mut eq_free_patterns, eq_free_of): (Vec<Vec<u8>>, Vec<usize>) = patterns
            .iter()
            .enumerate()
            .filter(|(_, p)| p.contains(&b'='))
            .map(|(i, p)| {
                (
                    p.iter()
                        .copied()
                        .filter(|&b| b != b'=')
                        .collect::<Vec<u8>>(),
                    i,
                )
            })
            // Without its `=`, a form this short would match ordinary text (and one of `=`
            // alone, everything): such a value is found in its own forms only.
            .filter(|(p, _)| p.len() >= MIN_PATTERN_LEN)
            .unzip();
        let ac = automaton(&patterns);
        let eq_free = automaton(&eq_free_patterns);
        let min_len = patterns
            .iter()
            .chain(&eq_free_patterns)
            .map(Vec::len)
            .min()
            .unwrap_or(0);
        for p in eq_free_patterns.iter_mut() {
            zeroize::Zeroize::zeroize(p);
        }
        // Zero the copies of the secrets made for the automaton's construction.
        for p in patterns.iter_mut() {
            zeroize::Zeroize::zeroize(p);
        }
        for mut p in seen.drain() {
            zeroize::Zeroize::zeroize(&mut p);
        }
        Self {
            // A build failure (far beyond any real pattern set) leaves no automaton over
            // patterns that exist: see `failed`, on which callers fail closed.
            ac,
            owner,
            cut,
            names,
            max_len,
            eq_free,
            eq_free_of,
            in_pattern,
            in_joined,
            in_decoded,
            min_len,
        }
    }

    /// No secret is known: nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    /// Patterns exist but an automaton over them (the `=`-free one too) could not be
    /// built; callers fail closed.
    pub fn failed(&self) -> bool {
        let eq_free_failed = !self.eq_free_of.is_empty() && self.eq_free.is_none();
        !self.owner.is_empty() && (self.ac.is_none() || eq_free_failed)
    }

    /// Length of the longest pattern.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The most bytes of a text one match may cover: the longest pattern with a line
    /// break of up to [`LINE_BREAK_MAX`] bytes between each two of its characters (see
    /// [`Self::each_match_cut`]). A stream scanner keeps `span - 1` bytes back.
    pub fn span(&self) -> usize {
        self.max_len + self.max_len.saturating_sub(1) * LINE_BREAK_MAX
    }

    /// The credential of a match, by the index [`Self::each_match`] reports.
    pub fn name(&self, index: usize) -> &str {
        self.names.get(index).map_or("", String::as_str)
    }

    /// The first credential whose secret (in any form, across line breaks too, as
    /// [`Self::each_match_cut`] finds them) occurs in `hay`.
    pub fn find(&self, hay: &[u8]) -> Option<&str> {
        let ac = self.ac.as_ref()?;
        for run in Runs::new(hay, &self.in_pattern, self.min_len) {
            if let Some(m) = ac.find(Input::new(hay).span(run)) {
                return Some(self.name(self.owner[m.pattern().as_usize()]));
            }
        }
        let mut found = None;
        self.each_match_across_breaks(hay, ac, &mut |_, index, _, _| {
            found.get_or_insert(index);
        });
        found.map(|index| self.name(index))
    }

    /// Calls `f(range, credential index)` for every match in `hay`, overlapping ones
    /// included (those across line breaks after the others).
    pub fn each_match(&self, hay: &[u8], mut f: impl FnMut(Range<usize>, usize)) {
        self.each_match_cut(hay, |range, index, _| f(range, index));
    }

    /// [`Self::each_match`], also telling whether the match is of a value cut short (so
    /// that bytes after it could make it part of a longer one).
    ///
    /// Text wrapped at a fixed width (MIME and PEM base64, `xxd -p` hex, quoted-printable
    /// soft breaks) is matched too: `hay` is also searched with each single line break
    /// between two other bytes taken out ([`BREAKS`]: `\n`, `\r\n`, `\r` and the odd
    /// orders, and the same as JSON escapes; a soft break's `=` before one, a folding
    /// space or tab after it), and, where a value has `=`, with every `=` taken out; such
    /// a match is reported over the bytes it covers, breaks included. A run of two
    /// breaks or more is not taken out, nor more than [`LINE_BREAK_MAX`] bytes between
    /// two characters (so no match covers more than [`Self::span`] bytes).
    ///
    /// Text with escapes is matched whatever mix of styles its encoder writes (Go's
    /// `encoding/json` writes `\"` and `\u0026`, ASP.NET's HTML encoder `&amp;` and
    /// `&#x2B;`), and whichever of its symbols it escapes: `hay` is also searched with
    /// each JSON, HTML and percent escape decoded ([`decoded`]); such a match is reported
    /// over the bytes it covers, escapes whole.
    ///
    /// A match is made of bytes the patterns have (and breaks), so only runs of those
    /// bytes at least as long as the shortest pattern are searched ([`Runs`]): most of a
    /// compressed or binary body is skipped, and what is found is what a search of every
    /// byte finds.
    pub fn each_match_cut(&self, hay: &[u8], mut f: impl FnMut(Range<usize>, usize, bool)) {
        self.each_match_framed(hay, |range, index, cut, _| f(range, index, cut));
    }

    /// [`Self::each_match_cut`], also telling whether the match was found across git
    /// sideband packets' headers ([`pkt_header_at`]) and nothing else: a scrubber may keep
    /// those headers in place, unless another match covers them.
    pub fn each_match_framed(
        &self,
        hay: &[u8],
        mut f: impl FnMut(Range<usize>, usize, bool, bool),
    ) {
        let Some(ac) = &self.ac else { return };
        for run in Runs::new(hay, &self.in_pattern, self.min_len) {
            for m in ac.find_overlapping_iter(Input::new(hay).span(run)) {
                let pattern = m.pattern().as_usize();
                f(m.range(), self.owner[pattern], self.cut[pattern], false);
            }
        }
        self.each_match_across_breaks(hay, ac, &mut f);
    }

    /// The matches of [`Self::each_match_cut`] that have something taken out inside (a
    /// line break, or a `=` in the search without them) or decoded (an escape).
    fn each_match_across_breaks(
        &self,
        hay: &[u8],
        ac: &AhoCorasick,
        f: &mut impl FnMut(Range<usize>, usize, bool, bool),
    ) {
        self.each_joined_match(hay, ac, Join::Breaks, f);
        // A `=` before a break is a soft break, or a character of the secret itself, and
        // one text may have both: where a pattern has a `=`, the text is also searched
        // with every `=` taken out (breaks or not), by the same patterns without theirs.
        if let Some(eq_free) = &self.eq_free {
            self.each_joined_match(hay, eq_free, Join::BreaksAndEq, f);
        }
        // Packets' headers apart: a search of its own, so that the searches above find
        // what they found without it (four hex digits of a value before a band byte are
        // not taken for a header there).
        if memchr::memchr3(1, 2, 3, hay).is_some() {
            self.each_joined_match(hay, ac, Join::PktHeaders, f);
        }
        self.each_decoded_match(hay, ac, f);
    }

    /// Matches of `ac` in `hay` with its escapes decoded ([`decoded`]), mapped back to the
    /// bytes of `hay` they cover (each escape whole); those with nothing decoded inside
    /// are left out (found by the search of `hay` itself), and so are those covering more
    /// than [`Self::span`] bytes (a stream scanner would not hold them whole). Only runs
    /// of the bytes such a match may cover are decoded and searched: one more byte than
    /// the shortest pattern at least (an escape is longer than what it stands for).
    fn each_decoded_match(
        &self,
        hay: &[u8],
        ac: &AhoCorasick,
        f: &mut impl FnMut(Range<usize>, usize, bool, bool),
    ) {
        let span = self.span();
        let runs = Runs::new(hay, &self.in_decoded, self.min_len + 1).unmerged();
        for run in runs {
            let offset = run.start;
            let Some((text, escapes)) = decoded(hay, run) else {
                continue;
            };
            // The bytes of `hay` the byte at `j` of the decoded text stands for.
            let source = |j: usize| {
                let i = escapes.partition_point(|(out, _)| out.start <= j);
                match i.checked_sub(1).map(|i| &escapes[i]) {
                    Some((out, src)) if j < out.end => src.clone(),
                    Some((out, src)) => src.end + (j - out.end)..src.end + (j - out.end) + 1,
                    None => offset + j..offset + j + 1,
                }
            };
            for m in ac.find_overlapping_iter(&text) {
                let range = source(m.start()).start..source(m.end() - 1).end;
                if range.len() == m.len() || range.len() > span {
                    continue;
                }
                let pattern = m.pattern().as_usize();
                f(range, self.owner[pattern], self.cut[pattern], false);
            }
        }
    }

    /// Matches of `ac` in `hay` joined across its line breaks ([`joined`]), mapped back to
    /// the bytes of `hay` they cover; those with nothing taken out inside are left out
    /// (found by the search of `hay` itself). `ac` is [`Self::eq_free`] for
    /// [`Join::BreaksAndEq`]. Only runs of the bytes such a match may cover are joined
    /// and searched: one more byte than the shortest pattern at least (something taken
    /// out inside).
    fn each_joined_match(
        &self,
        hay: &[u8],
        ac: &AhoCorasick,
        join: Join,
        f: &mut impl FnMut(Range<usize>, usize, bool, bool),
    ) {
        let runs = Runs::new(hay, &self.in_joined, self.min_len + 1).unmerged();
        for run in runs {
            let offset = run.start;
            let Some((joined, taken)) = joined(hay, run, join) else {
                continue;
            };
            // Where the byte at `j` of the joined text is in `hay`.
            let at = |j: usize| {
                let before = taken.partition_point(|&(k, _)| k <= j);
                offset + j + before.checked_sub(1).map_or(0, |i| taken[i].1)
            };
            for m in ac.find_overlapping_iter(&joined) {
                let range = at(m.start())..at(m.end() - 1) + 1;
                if range.len() == m.len() {
                    continue;
                }
                let pattern = if join == Join::BreaksAndEq {
                    self.eq_free_of[m.pattern().as_usize()]
                } else {
                    m.pattern().as_usize()
                };
                // Across a header indeed (that pass joins lines too).
                let framed = join == Join::PktHeaders
                    && range
                        .clone()
                        .any(|i| pkt_header_at(hay, i).is_some_and(|h| h.end <= range.end));
                f(range, self.owner[pattern], self.cut[pattern], framed);
            }
        }
    }
}

/// An automaton over `patterns` (none for none; none if it cannot be built, which
/// [`SecretMatcher::failed`] reports). Any case: hex comes in both, and an origin that
/// upper-cases what it echoes still gives most of the secret away. A contiguous NFA: for
/// one credential's 74 patterns it takes 31 KB where the DFA Aho-Corasick would choose
/// takes 823 KB, which left the cache to the proxy's work, for no measurable gain in
/// speed.
fn automaton(patterns: &[Vec<u8>]) -> Option<AhoCorasick> {
    if patterns.is_empty() {
        return None;
    }
    AhoCorasick::builder()
        .match_kind(MatchKind::Standard)
        .ascii_case_insensitive(true)
        .kind(Some(aho_corasick::AhoCorasickKind::ContiguousNFA))
        .build(patterns)
        .ok()
}

/// A set of byte values.
#[derive(Clone)]
struct ByteSet([bool; 256]);

impl Default for ByteSet {
    fn default() -> Self {
        Self([false; 256])
    }
}

impl ByteSet {
    /// Adds `bytes`, ASCII letters in both cases.
    fn add_any_case(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0[usize::from(b)] = true;
            self.0[usize::from(b.to_ascii_lowercase())] = true;
            self.0[usize::from(b.to_ascii_uppercase())] = true;
        }
    }

    fn has(&self, b: u8) -> bool {
        self.0[usize::from(b)]
    }
}

/// Runs in a text that gaps this short separate are searched as one (a search has a
/// cost of its own).
const RUN_MERGE_GAP: usize = 64;

/// The maximal runs of bytes of a set, at least `min` long, in order: where a match of
/// patterns made of those bytes can be. Runs nearer than [`RUN_MERGE_GAP`] are given as
/// one range (unless [`Runs::unmerged`]); each range starts and ends at a run's edge.
///
/// Each probe looks `min - 1` bytes ahead: a byte outside the set there rules out every
/// run starting before it, so most of a text that holds no candidate (compressed or
/// binary data) is skipped `min` bytes at a time.
struct Runs<'a> {
    hay: &'a [u8],
    set: &'a ByteSet,
    min: usize,
    at: usize,
    merge: bool,
    next: Option<Range<usize>>,
}

impl<'a> Runs<'a> {
    fn new(hay: &'a [u8], set: &'a ByteSet, min: usize) -> Self {
        Self {
            hay,
            set,
            min: min.max(1),
            at: 0,
            merge: true,
            next: None,
        }
    }

    fn unmerged(mut self) -> Self {
        self.merge = false;
        self
    }

    /// The next run of at least `min` bytes of the set, from `at`.
    fn next_run(&mut self) -> Option<Range<usize>> {
        let (hay, set) = (self.hay, self.set);
        loop {
            let probe = self.at.checked_add(self.min - 1)?;
            let &b = hay.get(probe)?;
            if !set.has(b) {
                self.at = probe + 1;
                continue;
            }
            // `at` follows a byte outside the set (or is 0): the run starts after it.
            let mut start = probe;
            while start > self.at && set.has(hay[start - 1]) {
                start -= 1;
            }
            let mut end = probe + 1;
            while end < hay.len() && set.has(hay[end]) {
                end += 1;
            }
            self.at = end + 1;
            if end - start >= self.min {
                return Some(start..end);
            }
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let mut range = self.next.take().or_else(|| self.next_run())?;
        while self.merge {
            match self.next_run() {
                Some(run) if run.start - range.end < RUN_MERGE_GAP => range.end = run.end,
                other => {
                    self.next = other;
                    break;
                }
            }
        }
        Some(range)
    }
}

/// The most bytes taken out between two characters of a match: one line break with a
/// soft break's `=` and a folding space (six at most: `=\\r\\n ` with the break as JSON
/// escapes), and, where the text is searched with every `=` taken out, a value's own `==`
/// beside it.
pub const LINE_BREAK_MAX: usize = 8;

/// Line breaks, longest first: LF, CRLF, CR and the odd orders text tools write, and the
/// same as JSON string escapes (`\n` in a JSON text that wraps base64 at a width).
const BREAKS: [&[u8]; 8] = [
    b"\r\r\n", b"\r\n", b"\n\r", b"\n", b"\r", b"\\r\\n", b"\\n", b"\\r",
];

/// Every byte [`joined`] may take out: those of [`BREAKS`], a soft break's `=`, a folding
/// space or tab, and a git sideband packet's header ([`pkt_header_at`]).
const BREAK_BYTES: &[u8] = b"\r\n\\rn= \t0123456789abcdef\x01\x02\x03";

/// The header of a git sideband packet starting at `i` (four hex digits of length, then
/// the band: 1 data, 2 progress, 3 error), as the range it covers, if it joins two other
/// bytes. git sends what a server's hooks print in packets of at most 128 bytes (and
/// `upload-pack` its progress likewise), so a value echoed there can have a header
/// inside it that the client takes out. No secret has a band byte, so four hex digits
/// before one are never the value's own.
pub fn pkt_header_at(hay: &[u8], i: usize) -> Option<Range<usize>> {
    let header = hay.get(i..i + 5)?;
    if !matches!(header[4], 1..=3) {
        return None;
    }
    // git writes the length in lower-case hex, and it counts the header itself.
    let mut length = Some(0u16);
    for &b in &header[..4] {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        length = length.map(|n| n << 4 | u16::from(digit));
    }
    let joins = length.is_some_and(|n| n >= 5)
        && i > 0
        && !matches!(hay[i - 1], b'\r' | b'\n' | 1..=3)
        && hay
            .get(i + 5)
            .is_some_and(|b| !matches!(b, b'\r' | b'\n' | 1..=3));
    joins.then_some(i..i + 5)
}

/// The line break at `i` in `hay` (with the `=` of a soft break before it, and one space
/// or tab folding the next line after it), as the range it covers, if it joins two other
/// bytes: something that is not itself a break on either side.
fn break_at(hay: &[u8], i: usize) -> Option<Range<usize>> {
    let body = BREAKS.iter().find(|b| hay[i..].starts_with(b))?.len();
    let mut end = i + body;
    if matches!(hay.get(end), Some(b' ' | b'\t')) {
        end += 1;
    }
    let starts_break = |at: usize| BREAKS.iter().any(|b| hay[at..].starts_with(b));
    let before_ok = i > 0 && !matches!(hay[i - 1], b'\r' | b'\n' | b'\\');
    let after_ok = end < hay.len() && !starts_break(end);
    (before_ok && after_ok).then_some(i..end)
}

/// What [`joined`] takes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Join {
    /// Line breaks that join two other bytes (with a soft break's `=`).
    Breaks,
    /// Those, and every `=`.
    BreaksAndEq,
    /// git sideband packets' headers ([`pkt_header_at`]) as well as line breaks: a value
    /// wrapped at a width (base64, PEM) that git then cuts into packets. Searched only
    /// where a header is.
    PktHeaders,
}

/// `hay[within]` with each line break that joins two other bytes taken out (a `=` before
/// one too, as a quoted-printable soft break; with [`Join::BreaksAndEq`], every `=`; with
/// [`Join::PktHeaders`], packets' headers instead), and where bytes
/// were taken out: for each place, the offset in the joined text of the byte after it and
/// the bytes taken out up to there. `None` when nothing is taken out. Breaks are
/// judged in the whole of `hay` (what is on either side), so a part gives what the whole
/// text's joining gives there.
#[expect(
    clippy::type_complexity,
    reason = "a text and its offsets, used together once"
)]
fn joined(hay: &[u8], within: Range<usize>, join: Join) -> Option<(Vec<u8>, Vec<(usize, usize)>)> {
    let part = hay.get(within.clone())?;
    let drop_eq = join == Join::BreaksAndEq;
    let headers = join == Join::PktHeaders;
    // Most texts have no break that joins two bytes (an audit line ends in one): nothing
    // is copied for them.
    let breaks = || {
        if headers {
            memchr::memchr3_iter(1, 2, 3, part).any(|i| {
                (within.start + i)
                    .checked_sub(4)
                    .is_some_and(|at| at >= within.start && pkt_header_at(hay, at).is_some())
            })
        } else {
            memchr::memchr3_iter(b'\n', b'\r', b'\\', part)
                .any(|i| break_at(hay, within.start + i).is_some())
        }
    };
    let eq_taken = drop_eq && part.contains(&b'=');
    if !eq_taken && !breaks() {
        return None;
    }
    let mut out = Vec::with_capacity(part.len());
    let mut taken: Vec<(usize, usize)> = Vec::new();
    let mut skipped = 0;
    let mut joins = false;
    let mut skip = |out: &Vec<u8>, n: usize, taken: &mut Vec<(usize, usize)>| {
        skipped += n;
        match taken.last_mut() {
            Some(last) if last.0 == out.len() => last.1 = skipped,
            _ => taken.push((out.len(), skipped)),
        }
    };
    // What was taken out since the last byte kept: at most one line break and
    // LINE_BREAK_MAX bytes in all, so that no match covers more than `span` bytes (a
    // chain of soft breaks, `=\n=\n...`, or a run of `=`, would otherwise join bytes any
    // distance apart, past what a stream scanner holds back).
    let mut gap = 0;
    let mut gap_break = false;
    let mut i = within.start;
    while i < within.end {
        let b = hay[i];
        if drop_eq && b == b'=' && gap < LINE_BREAK_MAX {
            joins = true;
            skip(&out, 1, &mut taken);
            gap += 1;
            i += 1;
            continue;
        }
        let fits =
            |r: &Range<usize>, from: usize| !gap_break && gap + (r.end - from) <= LINE_BREAK_MAX;
        // A soft break: `=` and the break after it.
        if b == b'=' && i + 1 < hay.len() {
            if let Some(r) = break_at(hay, i + 1).filter(|r| i > 0 && fits(r, i)) {
                joins = true;
                skip(&out, r.end - i, &mut taken);
                gap += r.end - i;
                gap_break = true;
                i = r.end;
                continue;
            }
        }
        let header = if headers {
            pkt_header_at(hay, i).filter(|r| r.end <= within.end)
        } else {
            None
        };
        let taken_out = match header {
            Some(h) => Some(h),
            None if matches!(b, b'\n' | b'\r' | b'\\') => break_at(hay, i),
            None => None,
        };
        if let Some(r) = taken_out.filter(|r| fits(r, i)) {
            joins = true;
            skip(&out, r.len(), &mut taken);
            gap += r.len();
            gap_break = true;
            i = r.end;
            continue;
        }
        out.push(b);
        gap = 0;
        gap_break = false;
        i += 1;
    }
    joins.then_some((out, taken))
}

/// The most bytes of a text an escape [`decoded`] decodes may take per byte it stands
/// for: as many as a character and the most [`joined`] takes out beside it, so that a
/// match in a decoded text covers no more than one across line breaks would (`&#x0002B;`
/// for `+`, `&#x1F600;` for four bytes; not `&#0000043;`).
const ESCAPE_MAX: usize = 1 + LINE_BREAK_MAX;

/// Every byte of an escape [`decoded`] decodes, in either ASCII case: `\` and the JSON
/// escapes' (`\"`, `\\`, `\/`, `\'`, `\u` and hex), `&`, `#`, `;` and the letters of
/// HTML's named references (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`) and numeric
/// ones (`&#x2B;`, `&#43;`), and `%`.
const ESCAPE_BYTES: &[u8] = b"\\\"/'%&#;0123456789abcdefglmopqstux";

/// The escape at the start of `text`, if it is one: how many bytes it takes, and the
/// bytes it stands for (UTF-8 for a character). JSON's `\"`, `\\`, `\/` (and `\'`),
/// `\uXXXX` (a surrogate pair as one character); HTML's `&amp;`, `&lt;`, `&gt;`,
/// `&quot;`, `&apos;`, `&#xHH;` and `&#DD;`; and `%HH`. Hex digits, `x`, `u` and names
/// in any case (an origin may upper-case what it echoes). Line breaks (`\n`) are
/// [`joined`]'s.
fn escape_at(text: &[u8]) -> Option<(usize, [u8; 4], usize)> {
    fn number(digits: &[u8], radix: u32) -> Option<u32> {
        if digits.is_empty() {
            return None;
        }
        digits.iter().try_fold(0u32, |n, &d| {
            let d = char::from(d).to_digit(radix)?;
            n.checked_mul(radix)?.checked_add(d)
        })
    }
    fn character(code: u32, len: usize) -> Option<(usize, [u8; 4], usize)> {
        let c = char::from_u32(code)?;
        let mut bytes = [0u8; 4];
        let n = c.encode_utf8(&mut bytes).len();
        Some((len, bytes, n))
    }
    let found = match *text.first()? {
        b'%' => {
            let b = u8::try_from(number(text.get(1..3)?, 16)?).ok()?;
            Some((3, [b, 0, 0, 0], 1))
        }
        b'\\' => match *text.get(1)? {
            b @ (b'"' | b'\\' | b'/' | b'\'') => Some((2, [b, 0, 0, 0], 1)),
            b'u' | b'U' => {
                let unit = number(text.get(2..6)?, 16)?;
                if (0xD800..0xDC00).contains(&unit) {
                    let low = text
                        .get(6..12)
                        .filter(|l| l[0] == b'\\' && l[1].eq_ignore_ascii_case(&b'u'))
                        .and_then(|l| number(&l[2..], 16))
                        .filter(|low| (0xDC00..0xE000).contains(low))?;
                    character(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00), 12)
                } else {
                    // A lone low surrogate is no character: `from_u32` refuses it.
                    character(unit, 6)
                }
            }
            _ => None,
        },
        b'&' => {
            const NAMED: [(&[u8], u8); 5] = [
                (b"&amp;", b'&'),
                (b"&lt;", b'<'),
                (b"&gt;", b'>'),
                (b"&quot;", b'"'),
                (b"&apos;", b'\''),
            ];
            let named = NAMED.iter().find(|(name, _)| {
                text.get(..name.len())
                    .is_some_and(|t| t.eq_ignore_ascii_case(name))
            });
            if let Some(&(name, b)) = named {
                Some((name.len(), [b, 0, 0, 0], 1))
            } else if text.get(1) == Some(&b'#') {
                let hex = matches!(text.get(2), Some(b'x' | b'X'));
                let from = if hex { 3 } else { 2 };
                // Seven digits at most (leading zeros included): longer is cut below.
                let digits = text.get(from..).unwrap_or_default();
                let semicolon = digits.iter().take(8).position(|&b| b == b';')?;
                let code = number(&digits[..semicolon], if hex { 16 } else { 10 })?;
                character(code, from + semicolon + 1)
            } else {
                None
            }
        }
        _ => None,
    };
    found.filter(|&(len, _, n)| len <= ESCAPE_MAX * n)
}

/// `hay[within]` with each escape [`escape_at`] reads decoded, left to right (`\\u0026`
/// is `\` then `u0026`), and where each decoded one is: its bytes in the decoded text and
/// the bytes of `hay` it was. `None` when nothing is decoded. Within a maximal run of
/// [`ESCAPE_BYTES`] (and others), what is decoded is what decoding the whole text gives
/// there: no escape starts before the run and ends in it.
#[expect(
    clippy::type_complexity,
    reason = "a text and its offsets, used together once"
)]
fn decoded(
    hay: &[u8],
    within: Range<usize>,
) -> Option<(Vec<u8>, Vec<(Range<usize>, Range<usize>)>)> {
    let part = hay.get(within.clone())?;
    // Most runs have no escape: nothing is copied for them.
    let mut next = memchr::memchr3(b'\\', b'&', b'%', part)?;
    let mut out = Vec::with_capacity(part.len());
    let mut escapes = Vec::new();
    let mut i = 0;
    loop {
        out.extend_from_slice(&part[i..next]);
        i = next;
        match escape_at(&part[i..]) {
            Some((len, bytes, n)) => {
                let start = within.start + i;
                escapes.push((out.len()..out.len() + n, start..start + len));
                out.extend_from_slice(&bytes[..n]);
                i += len;
            }
            None => {
                out.push(part[i]);
                i += 1;
            }
        }
        match memchr::memchr3(b'\\', b'&', b'%', &part[i..]) {
            Some(at) => next = i + at,
            None => break,
        }
    }
    out.extend_from_slice(&part[i..]);
    (!escapes.is_empty()).then_some((out, escapes))
}

/// The forms a secret takes on the wire, each at least [`MIN_PATTERN_LEN`] bytes:
///
/// - the value itself (which every header value built from it contains, and `user:secret`
///   before it is encoded);
/// - base64 (standard and URL-safe alphabets) of the value at each of the three byte
///   alignments it can have inside a larger encoded text, keeping only the characters
///   that depend on the value alone: this covers the base64 of the bare value, of
///   `user:secret` (HTTP Basic) and of anything else with the value inside;
/// - each of those with its symbols percent-encoded (`%2B`), as `\u00XX` (JSON) or as HTML
///   character references (`&#x2F;`, `&#47;`, and `&amp;` and the like as template
///   engines escape `&<>"'`): every combination of its symbols escaped
///   and kept when it has at most [`MAX_ESCAPE_SUBSET`] kinds (encoders differ: Python's
///   `quote()` keeps `/`, .NET escapes `+` and keeps `/`), else all of them and all but
///   `/`; percent-encoded twice (a URL quoted inside another); JSON-escaped (with and
///   without `/` as `\/`, non-ASCII as `\uXXXX`, or every symbol as `\u00XX`). Each
///   in one style: a text whose encoder mixes them (Go's `\"` and `\u0026`, ASP.NET's
///   `&amp;` and `&#x2B;`), or escapes other symbols than these, is searched decoded
///   instead ([`SecretMatcher::each_match_cut`]);
/// - the value's bytes in hex: contiguous, space-separated (as in AWS's
///   `CanonicalRequestBytes`) and each behind `%`;
/// - the value and its base64 forms in UTF-16, little- and big-endian (ASCII ones).
///
/// Patterns match in any ASCII case. Each is a whole form, or the value (plain or
/// base64) cut short by at most [`CUT_SHORT`] characters, as an origin that quotes the
/// first N bytes of a header would return it (the sandbox may choose what precedes the
/// secret, and so where the cut falls); never a shorter piece, which a structured secret
/// could share with others (a JWT's header, a token's fixed prefix). The longest, the
/// space-separated hex, with line breaks between its characters ([`SecretMatcher::span`]),
/// sets how much of a streamed body is held back.
pub fn forms(secret: &str) -> Vec<Vec<u8>> {
    forms_of(secret).into_iter().map(|(form, _)| form).collect()
}

/// [`forms`], each with whether it is the value cut short.
fn forms_of(secret: &str) -> Vec<(Vec<u8>, bool)> {
    let raw = secret.as_bytes();
    let mut bases: Vec<Vec<u8>> = vec![raw.to_vec()];
    for engine in [
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        for align in 0..3 {
            let mut input = vec![0u8; align];
            input.extend_from_slice(raw);
            let encoded = engine.encode(&input);
            // Characters of groups that mix in bytes before or after the value depend on
            // those bytes: keep whole groups of the value only.
            let start = if align == 0 { 0 } else { 4 };
            let end = (input.len() / 3) * 4;
            if end > start {
                bases.push(encoded.as_bytes()[start..end].to_vec());
            }
            zeroize::Zeroize::zeroize(&mut input);
        }
    }
    let mut out: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut add_as = |form: Vec<u8>, cut_short: bool| {
        if form.len() >= MIN_PATTERN_LEN && !out.iter().any(|(f, _)| *f == form) {
            out.push((form, cut_short));
        }
    };
    // Only for a value long enough to be a form itself: the hex of a short one is long
    // enough to be a pattern but not to be told from ordinary text.
    if raw.len() >= MIN_PATTERN_LEN {
        for hex_sep in ["", " ", "%"] {
            add_as(hex_bytes(raw, hex_sep), false);
        }
    }
    for base in &bases {
        add_as(base.clone(), false);
        // A body in UTF-16 (`charset=utf-16le`): each ASCII character beside a zero byte
        // (of a form long enough to be one itself, as for hex).
        if base.is_ascii() && base.len() >= MIN_PATTERN_LEN {
            add_as(base.iter().flat_map(|&b| [b, 0]).collect(), false);
            add_as(base.iter().flat_map(|&b| [0, b]).collect(), false);
        }
        for style in [
            Escape::Percent,
            Escape::JsonUnicode,
            Escape::HtmlHex,
            Escape::HtmlDecimal,
        ]
        .into_iter()
        .chain(HTML_NAMED)
        {
            for escaped in escaped_sets(base, style) {
                add_as(escape_some(base, &escaped, style), false);
            }
        }
        // A URL quoted again inside another (`next=...%252B...`).
        for once in [percent_encode(base, b""), percent_encode(base, b"/")] {
            add_as(percent_encode(&once, b""), false);
            add_as(percent_encode(&once, b"/"), false);
        }
        if let Ok(text) = std::str::from_utf8(base) {
            add_as(json_escape(text, false, false), false);
            add_as(json_escape(text, true, false), false);
            add_as(json_escape(text, false, true), false);
            add_as(json_escape(text, true, true), false);
            add_as(json_escape_symbols(text), false);
        }
    }
    // Cut short: every length from the whole down to CUT_SHORT fewer, so what a cut
    // leaves is scrubbed whole wherever it falls; only where that keeps MIN_CUT_LEN
    // characters. After the whole forms, so a piece equal to one of them is that.
    // The proxy itself percent-encodes a value it puts in a query or form, and an origin
    // quoting a URL or a JSON text (`\/`) cut short quotes that form: so those are cut
    // too (the source cut, then escaped).
    for base in &bases {
        for cut in 1..=CUT_SHORT {
            if base.len() >= MIN_CUT_LEN + cut {
                let short = &base[..base.len() - cut];
                add_as(short.to_vec(), true);
                for escaped in escaped_sets(short, Escape::Percent) {
                    add_as(escape_some(short, &escaped, Escape::Percent), true);
                }
                add_as(percent_encode(short, b""), true);
                if let Ok(text) = std::str::from_utf8(short) {
                    add_as(json_escape(text, true, false), true);
                    // .NET's JSON encoder (`\u002B`), HTML character references.
                    add_as(json_escape_symbols(text), true);
                }
                for style in [Escape::HtmlHex, Escape::HtmlDecimal] {
                    let symbols: Vec<u8> = short
                        .iter()
                        .copied()
                        .filter(|b| b.is_ascii() && !b.is_ascii_alphanumeric())
                        .collect();
                    add_as(escape_some(short, &symbols, style), true);
                }
                // Engines differ on which of `&<>"'` they escape where (text or
                // attribute): each combination, as for the whole value.
                for style in HTML_NAMED {
                    for escaped in escaped_sets(short, style) {
                        add_as(escape_some(short, &escaped, style), true);
                    }
                }
            }
        }
    }
    out
}

/// Each byte as two lower-case hex digits, `sep` before each but the first (`%`: before
/// each).
fn hex_bytes(bytes: &[u8], sep: &str) -> Vec<u8> {
    let leading = sep == "%";
    let mut out = String::with_capacity(bytes.len() * (2 + sep.len()));
    for (i, b) in bytes.iter().enumerate() {
        if leading || i > 0 {
            out.push_str(sep);
        }
        out.push_str(&format!("{b:02x}"));
    }
    out.into_bytes()
}

/// How an escaped ASCII symbol is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// `%2B` (non-ASCII bytes are always escaped so).
    Percent,
    /// `\u002B`
    JsonUnicode,
    /// `&#x2b;`
    HtmlHex,
    /// `&#43;`
    HtmlDecimal,
    /// HTML's own escaping of `&`, `<`, `>`, `"` and `'` only, as template engines write
    /// it: `&amp;`, `&lt;`, `&gt;`, then `"` and `'` as named here (engines differ:
    /// `&quot;` or `&#34;`; `&#39;`, `&#x27;`, `&#039;` or `&apos;`).
    HtmlNamed {
        quot: &'static str,
        apos: &'static str,
    },
}

/// The `"` and `'` of the template engines' HTML escaping: ERB and Go's `html/template`
/// (`&#34;` there), Jinja's markupsafe, Python's `html.escape`, PHP's `htmlspecialchars`.
const HTML_NAMED: [Escape; 5] = [
    Escape::HtmlNamed {
        quot: "&quot;",
        apos: "&#39;",
    },
    Escape::HtmlNamed {
        quot: "&#34;",
        apos: "&#39;",
    },
    Escape::HtmlNamed {
        quot: "&quot;",
        apos: "&#x27;",
    },
    Escape::HtmlNamed {
        quot: "&quot;",
        apos: "&#039;",
    },
    Escape::HtmlNamed {
        quot: "&quot;",
        apos: "&apos;",
    },
];

impl Escape {
    /// Whether an encoder in this style escapes ASCII symbol `b` at all.
    fn may_escape(self, b: u8) -> bool {
        match self {
            // `~` is unreserved, but Java's `URLEncoder` and PHP's `urlencode` escape it.
            Self::Percent => !matches!(b, b'-' | b'.' | b'_'),
            Self::HtmlNamed { .. } => matches!(b, b'&' | b'<' | b'>' | b'"' | b'\''),
            Self::JsonUnicode | Self::HtmlHex | Self::HtmlDecimal => true,
        }
    }
}

/// Distinct symbols in a value up to which every combination of them escaped or kept is a
/// form; past it, all of them escaped, all but `/`, and each one alone.
const MAX_ESCAPE_SUBSET: usize = 3;

/// The sets of symbols an encoder in `style` may escape in `bytes`: encoders differ on
/// which (Python's `quote()` keeps `/`, .NET's JSON and HTML encoders escape `+` and keep
/// `/`), so every combination of the symbols present, when they are few.
fn escaped_sets(bytes: &[u8], style: Escape) -> Vec<Vec<u8>> {
    let mut symbols: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| b.is_ascii() && !b.is_ascii_alphanumeric())
        .filter(|&b| style.may_escape(b))
        .collect();
    symbols.sort_unstable();
    symbols.dedup();
    // HTML's own escaping has at most five symbols, which escapers pick among by where
    // the text goes (`&<>` only in text, `&<>"` keeping `'`...): every combination.
    let named = matches!(style, Escape::HtmlNamed { .. });
    // `~` (unreserved; only some encoders escape it) does not count towards the limit:
    // a value that had every combination before `~` could be escaped still has them.
    let counted = symbols
        .iter()
        .filter(|&&b| !(style == Escape::Percent && b == b'~'))
        .count();
    if counted > MAX_ESCAPE_SUBSET && !named {
        // Each symbol alone (an encoder that escapes only `+`), and all but what common
        // encoders keep: none, `/`, and for percent-encoding JavaScript's
        // `encodeURIComponent` and `encodeURI`, Java's `URLEncoder`, .NET's `UrlEncode`,
        // PHP's `rawurlencode` and Python's `quote` and `quote_plus`.
        let kept_by_encoders: &[&[u8]] = match style {
            Escape::Percent => &[
                b"",
                b"/",
                b"~",
                b"/~",
                b"!~*'()",
                b";,/?:@&=+$!~*'()#",
                b"*",
                b"!*()",
            ],
            _ => &[b"", b"/"],
        };
        let mut sets: Vec<Vec<u8>> = symbols.iter().map(|&b| vec![b]).collect();
        for kept in kept_by_encoders {
            let set: Vec<u8> = symbols
                .iter()
                .copied()
                .filter(|b| !kept.contains(b))
                .collect();
            if !set.is_empty() && !sets.contains(&set) {
                sets.push(set);
            }
        }
        return sets;
    }
    (0..1u32 << symbols.len())
        .map(|mask| {
            symbols
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, &b)| b)
                .collect()
        })
        .collect()
}

/// `bytes` with the symbols in `escaped` written in `style` (and, for percent-encoding,
/// every non-ASCII byte as `%XX`).
fn escape_some(bytes: &[u8], escaped: &[u8], style: Escape) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for &b in bytes {
        let escape = escaped.contains(&b) || (style == Escape::Percent && !b.is_ascii());
        if !escape {
            out.push(b);
            continue;
        }
        match style {
            Escape::Percent => {
                out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            Escape::JsonUnicode => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            Escape::HtmlHex => out.extend_from_slice(format!("&#x{b:x};").as_bytes()),
            Escape::HtmlDecimal => out.extend_from_slice(format!("&#{b};").as_bytes()),
            Escape::HtmlNamed { quot, apos } => out.extend_from_slice(match b {
                b'&' => b"&amp;",
                b'<' => b"&lt;",
                b'>' => b"&gt;",
                b'"' => quot.as_bytes(),
                b'\'' => apos.as_bytes(),
                _ => std::slice::from_ref(&b),
            }),
        }
    }
    out
}

/// Every byte outside RFC 3986's unreserved set and `keep` as `%XX`.
fn percent_encode(bytes: &[u8], keep: &[u8]) -> Vec<u8> {
    let escaped: Vec<u8> = (0..0x80u8)
        .filter(|b| !b.is_ascii_alphanumeric() && !b"-._~".contains(b) && !keep.contains(b))
        .collect();
    escape_some(bytes, &escaped, Escape::Percent)
}

/// The JSON string body of `text` with every character but ASCII letters and digits as
/// `\uXXXX` (UTF-16), as some encoders write symbols (`\u002B`).
fn json_escape_symbols(text: &str) -> Vec<u8> {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out.into_bytes()
}

/// The JSON string body of `text` (no quotes): `"`, `\` and control characters escaped,
/// `/` as `\/` if `slash`, non-ASCII as `\uXXXX` (UTF-16) if `ascii`.
fn json_escape(text: &str, slash: bool, ascii: bool) -> Vec<u8> {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' if slash => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.into_bytes()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    /// A token-shaped value made at run time: `ghp_` and `n` random letters and digits.
    fn fake_token(n: usize) -> String {
        use ring::rand::SecureRandom as _;
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let mut bytes = vec![0u8; n];
        ring::rand::SystemRandom::new().fill(&mut bytes).unwrap();
        let body: String = bytes
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
            .collect();
        format!("ghp_{body}")
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Some form of the secret occurs in `text`.
    fn found(secret: &str, text: &str) -> bool {
        let m = SecretMatcher::new([("c", secret)]);
        m.find(text.as_bytes()).is_some()
    }

    #[test]
    fn every_derived_form_is_found() {
        let secret = "ghp_Ab/9+x\"é~tok";
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let b64url = |s: &[u8]| base64::engine::general_purpose::URL_SAFE.encode(s);
        let cases = [
            format!("Authorization: Bearer {secret}"),
            format!(
                "Basic {}",
                b64(format!("x-access-token:{secret}").as_bytes())
            ),
            format!("Basic {}", b64(format!("u:{secret}").as_bytes())),
            format!("Basic {}", b64(format!("ab:{secret}").as_bytes())),
            format!("token={}", b64(secret.as_bytes())),
            format!("token={}", b64url(secret.as_bytes())),
            format!(
                "q={}",
                String::from_utf8(percent_encode(secret.as_bytes(), b"")).unwrap()
            ),
            format!(
                "q={}",
                lower_hex_escapes(
                    &String::from_utf8(percent_encode(secret.as_bytes(), b"")).unwrap()
                )
            ),
            serde_json::json!({ "auth": secret }).to_string(),
            format!(
                "{{\"auth\":\"{}\"}}",
                String::from_utf8(json_escape(secret, true, true)).unwrap()
            ),
            format!(
                "{{\"auth\":\"{}\"}}",
                String::from_utf8(json_escape(secret, true, false)).unwrap()
            ),
        ];
        for text in &cases {
            assert!(found(secret, text), "not found in {text:?}");
        }
        // Python's json.dumps: ensure_ascii, `/` left alone.
        assert!(found(secret, "{\"a\": \"ghp_Ab/9+x\\\"\\u00e9~tok\"}"));
        assert!(!found(secret, "ghp_Ab/9+x\"e~tok"));
        assert!(!found(secret, "nothing to see here"));
    }

    /// `%XX` escapes with lower-case hex digits.
    fn lower_hex_escapes(s: &str) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(at) = rest.find('%') {
            out.push_str(&rest[..at]);
            let esc = rest.get(at..at + 3).unwrap_or(&rest[at..]);
            out.push_str(&esc.to_ascii_lowercase());
            rest = &rest[at + esc.len()..];
        }
        out.push_str(rest);
        out
    }

    /// Encodings that escape only some characters: an AWS-style secret (with `/` and `+`)
    /// as Python's `quote()` (keeps `/`), .NET's JSON (`\u002B`), HTML references, upper
    /// case, and hex as AWS's `CanonicalRequestBytes` shows it.
    #[test]
    fn partial_escapes_case_and_hex_are_found() {
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let spaced: Vec<String> = secret.bytes().map(|b| format!("{b:02x}")).collect();
        let cases = [
            secret.replace('+', "%2B"),
            secret.replace('+', "%2b"),
            secret.replace('+', "\\u002B").replace('/', "\\u002F"),
            secret.replace('+', "&#x2B;").replace('/', "&#x2F;"),
            secret.replace('+', "&#43;").replace('/', "&#47;"),
            secret.to_ascii_uppercase(),
            spaced.concat(),
            spaced.concat().to_ascii_uppercase(),
            spaced.join(" "),
            format!("%{}", spaced.join("%").to_ascii_uppercase()),
            // One symbol escaped, the other kept (.NET's JSON and HTML encoders escape
            // `+` and keep `/`), and the value percent-encoded twice (a URL quoted again
            // inside another: `next=...%252B...`).
            secret.replace('+', "\\u002B"),
            secret.replace('+', "&#x2B;"),
            secret.replace('/', "%2F"),
            secret.replace('+', "%252B"),
            secret.replace('+', "%252B").replace('/', "%252F"),
            secret.replace('+', "%252B").replace('/', "%2F"),
        ];
        // A value with more kinds of symbol than every combination is made for: each one
        // escaped alone is still found.
        let many = "wJalrXUtnFEMI/K7MDENG+bPx=RfiCYEX!AMPLEKEY";
        let m = SecretMatcher::new([("aws", many)]);
        for text in [
            many.replace('+', "\\u002B"),
            many.replace('!', "%21"),
            many.replace('=', "&#61;"),
        ] {
            assert!(m.find(text.as_bytes()).is_some(), "not found in {text:?}");
        }
        let m = SecretMatcher::new([("aws", secret)]);
        for text in &cases {
            assert!(m.find(text.as_bytes()).is_some(), "not found in {text:?}");
        }
        assert!(m.find(b"the EXAMPLE of a KEY").is_none());
    }

    /// A password with HTML's special characters, echoed in an HTML page by a template
    /// engine (named references for `&<>`, engines' own forms for the quotes), whole and
    /// cut short.
    #[test]
    fn html_named_references_are_found() {
        let secret = "pa&ss<w0rd>\"q'uoted-long-enough";
        let m = SecretMatcher::new([("basic", secret)]);
        let named = |quot: &str, apos: &str| {
            secret
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', quot)
                .replace('\'', apos)
        };
        for wire in [
            named("&quot;", "&#39;"),
            named("&#34;", "&#39;"),
            named("&quot;", "&#x27;"),
            named("&quot;", "&#039;"),
            named("&quot;", "&apos;"),
            // Only `&` escaped, the rest kept (an engine escaping text, not attributes).
            secret.replace('&', "&amp;"),
            // `&<>` only (Python's `html.escape(s, quote=False)`, XML text escapers), and
            // `&<>"` keeping `'` (Java's `escapeHtml4`, PHP before 8.1).
            secret
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;"),
            secret
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;"),
        ] {
            assert!(m.find(wire.as_bytes()).is_some(), "not found in {wire:?}");
            for cut in 1..=CUT_SHORT {
                let echo = &wire.as_bytes()[..wire.len() - cut];
                assert!(m.find(echo).is_some(), "{wire} cut {cut}");
            }
        }
    }

    /// The range of the one match that covers the most of `hay`, if any.
    fn widest(m: &SecretMatcher, hay: &str) -> Option<Range<usize>> {
        let mut widest: Option<Range<usize>> = None;
        m.each_match(hay.as_bytes(), |r, _| {
            if widest.as_ref().is_none_or(|w| r.len() > w.len()) {
                widest = Some(r);
            }
        });
        widest
    }

    /// Encoders that escape symbols in more than one style (and only some of them) echo
    /// a secret in forms no single-style pattern is: found decoded, each echo whole (one
    /// match over all of it, escapes included), cut short too.
    #[test]
    fn mixed_escape_styles_are_found_whole() {
        let cases: [(&str, &str); 9] = [
            // Go's `encoding/json`: `\"` and `\\`, but `&<>` (and U+2028/9) as `\u00XX`.
            ("Xk9\"vQ&7mP2wL8rT4nB6", "Xk9\\\"vQ\\u00267mP2wL8rT4nB6"),
            (
                "Xk9\"vQ<7m>P2\\wL8\u{2028}rT4nB6",
                "Xk9\\\"vQ\\u003c7m\\u003eP2\\\\wL8\\u2028rT4nB6",
            ),
            // .NET's System.Text.Json: `+&'"<>` and backtick as `\u00XX` (upper case), `\`
            // as `\\`.
            (
                "Xk9+vQ&7m'P2\"wL8<rT>4`nB6\\",
                "Xk9\\u002BvQ\\u00267m\\u0027P2\\u0022wL8\\u003CrT\\u003E4\\u0060nB6\\\\",
            ),
            // ASP.NET Core's HtmlEncoder: `&<>"` named, others as `&#xHH;`.
            ("Xk9+vQ&7mP2wL8rT4nB6", "Xk9&#x2B;vQ&amp;7mP2wL8rT4nB6"),
            (
                "Xk9+vQ&7m'P2\"wL8<rT4nB6",
                "Xk9&#x2B;vQ&amp;7m&#x27;P2&quot;wL8&lt;rT4nB6",
            ),
            // Python's `html.escape`.
            (
                "Xk9<vQ&7m'P2\"wL8>rT4nB6",
                "Xk9&lt;vQ&amp;7m&#x27;P2&quot;wL8&gt;rT4nB6",
            ),
            // Some symbols escaped, others kept, more kinds than every combination is made
            // for: `+&` escaped, `-_` kept, in each numeric style.
            (
                "Xk9+vQ&7m-P2_wL8rT4nB6",
                "Xk9\\u002bvQ\\u00267m-P2_wL8rT4nB6",
            ),
            ("Xk9+vQ&7m-P2_wL8rT4nB6", "Xk9&#43;vQ&#38;7m-P2_wL8rT4nB6"),
            ("Xk9+vQ&7m-P2_wL8rT4nB6", "Xk9%2BvQ&#x26;7m-P2_wL8rT4nB6"),
        ];
        for (secret, echo) in cases {
            let m = SecretMatcher::new([("c", secret)]);
            let prefix = "{\"error\":\"bad token ";
            let hay = format!("{prefix}{echo}\"}}");
            let whole = prefix.len()..prefix.len() + echo.len();
            assert_eq!(widest(&m, &hay), Some(whole), "{echo}");
            assert_eq!(m.find(hay.as_bytes()), Some("c"), "{echo}");
            // Cut short after a character the origin kept as is.
            let cut = &echo[..echo.len() - 2];
            assert_eq!(widest(&m, cut), Some(0..cut.len()), "{cut}");
        }
    }

    /// Decoding finds only what is the secret: another value with the same escapes, the
    /// secret with one character changed, or escapes alone are not a match; an escape too
    /// long for its byte (past what a stream scanner holds back) is not decoded.
    #[test]
    fn decoded_text_that_is_not_the_secret_is_not_a_match() {
        let secret = "Xk9\"vQ&7mP2wL8rT4nB6";
        let m = SecretMatcher::new([("c", secret)]);
        for benign in [
            "Xk8\\\"vQ\\u00267mP2wL8rT4nB6",
            "Xk9\\\"vQ\\u00277mP2wL8rT4nB6",
            "Xk9&quot;vQ&lt;7mP2wL8rT4nB6",
            "{\"msg\":\"a \\u0026 b \\\"quoted\\\" &amp; &#x2B; %2B \\\\u0026\"}",
            "Xk9&#00000034;vQ&amp;7mP2wL8rT4nB6",
        ] {
            assert!(m.find(benign.as_bytes()).is_none(), "{benign}");
        }
        assert_eq!(
            decoded(b"a\\\\u0026%zz&#x;&#0000043;&#x2b;", 0..31).map(|(t, _)| t),
            Some(b"a\\u0026%zz&#x;&#0000043;+".to_vec())
        );
    }

    /// A structured secret shares parts with others of its kind (every HS256 JWT starts
    /// with the same header): only the whole value is a pattern, so another token of the
    /// kind is not taken for it.
    #[test]
    fn another_token_of_the_same_kind_is_not_a_match() {
        let header = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
        let ours = format!("{header}.eyJzdWIiOiJhZ2VudC0xIn0.c2lnbmF0dXJlLW9mLXRoZS1maXJzdA");
        let theirs = format!("{header}.eyJzdWIiOiJhZ2VudC0yIn0.YW5vdGhlci1zaWduYXR1cmUtaGVyZQ");
        let m = SecretMatcher::new([("jwt", ours.as_str())]);
        assert!(m.find(ours.as_bytes()).is_some());
        assert!(m.find(format!("Bearer {theirs}").as_bytes()).is_none());
        assert!(m
            .find(format!("{{\"token\":\"{theirs}\"}}").as_bytes())
            .is_none());
    }

    /// An origin quoting the first N bytes of what it was sent returns the value cut
    /// short: scrubbed wherever the cut falls within the last CUT_SHORT characters, its
    /// base64 too; a cut that keeps less is not the value's (it may be a shared prefix).
    #[test]
    fn a_value_cut_short_is_found() {
        let secret = fake_token(36);
        let secret = secret.as_str();
        let m = SecretMatcher::new([("c", secret)]);
        for cut in 1..=CUT_SHORT {
            let echo = format!("bad credential: Bearer {}", &secret[..secret.len() - cut]);
            let mut ranges = Vec::new();
            m.each_match(echo.as_bytes(), |r, _| ranges.push(r));
            let end = ranges.iter().map(|r| r.end).max();
            assert_eq!(end, Some(echo.len()), "cut {cut}: {ranges:?}");
        }
        let short = &secret[..secret.len() - CUT_SHORT - 1];
        assert!(m.find(short.as_bytes()).is_none());
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("x-access-token:{secret}").as_bytes());
        assert!(m.find(&basic.as_bytes()[..basic.len() - 6]).is_some());
        // Cut short in the percent-encoded form the proxy sends in a query or form (and
        // in JSON with `\/`), wherever the cut falls.
        let symbols = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let m = SecretMatcher::new([("c", symbols)]);
        let pct: String = symbols
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let json = symbols.replace('/', "\\/");
        let dotnet = symbols.replace('/', "\\u002F").replace('+', "\\u002B");
        let html = symbols.replace('/', "&#x2F;").replace('+', "&#x2B;");
        for wire in [pct, json, dotnet, html] {
            for cut in 1..=CUT_SHORT {
                let echo = &wire.as_bytes()[..wire.len() - cut];
                assert!(m.find(echo).is_some(), "{wire} cut {cut}");
            }
        }
        // A short value has no cut-short forms.
        assert!(forms("short-secret-123").iter().all(|f| f.len() >= 16));
    }

    /// A value a server's hook printed, cut by git's sideband packets (128 bytes at most,
    /// each behind its header) wherever the cut falls, is found over the bytes it covers,
    /// headers included; the headers around it are left alone.
    #[test]
    fn a_value_across_git_sideband_packets_is_found() {
        let secret = fake_token(40);
        let m = SecretMatcher::new([("c", secret.as_str())]);
        for pad in 0..=secret.len() {
            let text = format!("{}HTTP_AUTHORIZATION=Bearer {secret}\n", "x".repeat(pad));
            let mut wire = Vec::new();
            let mut offsets = Vec::new();
            for piece in text.as_bytes().chunks(37) {
                wire.extend_from_slice(format!("{:04x}\x02", piece.len() + 5).as_bytes());
                offsets.push(wire.len());
                wire.extend_from_slice(piece);
            }
            let mut ranges = Vec::new();
            m.each_match(&wire, |r, _| ranges.push(r));
            let start = pad + "HTTP_AUTHORIZATION=Bearer ".len();
            // Where the value starts and ends on the wire.
            let on_wire = |at: usize| offsets[at / 37] + at % 37;
            let whole = on_wire(start)..on_wire(start + secret.len() - 1) + 1;
            assert!(
                ranges.contains(&whole),
                "pad {pad}: {ranges:?} for {whole:?}"
            );
        }
        // A band byte with no header before it joins nothing.
        let half = secret.len() / 2;
        let broken = format!("{}\x02{}", &secret[..half], &secret[half..]);
        assert!(m.find(broken.as_bytes()).is_none());
    }

    /// A value with `~` and three other kinds of symbols keeps every combination of the
    /// others escaped (as before `~` could be escaped), with `~` kept or escaped.
    #[test]
    fn a_tilde_does_not_count_towards_the_combinations() {
        let secret = "a~b+c/d=e-long-enough-value";
        let m = SecretMatcher::new([("c", secret)]);
        for escaped in [&b"+"[..], b"/=", b"+=", b"~+", b"~/="] {
            let wire: String = secret
                .bytes()
                .map(|b| {
                    if escaped.contains(&b) {
                        format!("%{b:02X}")
                    } else {
                        char::from(b).to_string()
                    }
                })
                .collect();
            assert!(m.find(wire.as_bytes()).is_some(), "{wire}");
        }
    }

    /// A value with many kinds of symbols, percent-encoded as common encoders do (each
    /// keeps its own set: JavaScript's `encodeURIComponent` `!~*'()`, Java's `URLEncoder`
    /// `*` and escapes `~`, .NET `!*()`, PHP's `urlencode` nothing), is found, whole and
    /// cut short.
    #[test]
    fn a_value_percent_encoded_by_common_encoders_is_found() {
        let secret = "pa~ss!w0rd(x)*+/y'z&Long-Value_1";
        let m = SecretMatcher::new([("c", secret)]);
        for kept in [&b"!~*'()"[..], b"*", b"!*()", b"", b"~", b"/~"] {
            let wire: String = secret
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._".contains(&b) || kept.contains(&b) {
                        char::from(b).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            assert!(m.find(wire.as_bytes()).is_some(), "{wire}");
            assert!(
                m.find(&wire.as_bytes()[..wire.len() - 2]).is_some(),
                "{wire} cut short"
            );
        }
    }

    #[test]
    fn base64_at_any_offset_in_a_larger_text() {
        let secret = "s3cr3t-t0ken-value";
        for prefix in ["", "a", "ab", "abc", "user:", "x-access-token:"] {
            for suffix in ["", "z", "zz", "zzz"] {
                let text = format!("{prefix}{secret}{suffix}");
                for e in [
                    &base64::engine::general_purpose::STANDARD,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ] {
                    let enc = e.encode(text.as_bytes());
                    assert!(found(secret, &enc), "{text:?} -> {enc:?}");
                }
            }
        }
    }

    #[test]
    fn short_forms_are_left_out_and_names_are_reported() {
        assert!(forms("abc").is_empty());
        assert!(SecretMatcher::new([("c", "abc")]).is_empty());
        let m = SecretMatcher::new([("one", "first-secret-1"), ("two", "second-secret-2")]);
        assert_eq!(m.find(b"xx second-secret-2 xx"), Some("two"));
        assert_eq!(m.find(b"first-secret-1"), Some("one"));
        let mut seen = Vec::new();
        m.each_match(b"first-secret-1second-secret-2", |r, i| {
            seen.push((r, m.name(i).to_owned()));
        });
        assert_eq!(
            seen,
            [(0..14, "one".to_owned()), (14..29, "two".to_owned())]
        );
        assert!(m.max_len() >= 15);
        assert!(!format!("{m:?}").contains("secret-1"));
        // A value of `=` alone has no `=`-free form (it would match everywhere).
        let m = SecretMatcher::new([("eq", "==========")]);
        let mut seen = Vec::new();
        m.each_match(b"a=b, c=\nd ==========", |r, _| seen.push(r));
        assert_eq!(seen, vec![10..20]);
    }

    /// The `=`-free search is part of what the matcher promises: without its automaton
    /// the matcher has failed, and callers refuse rather than scan with half of it.
    #[test]
    fn a_missing_eq_free_automaton_is_a_failure() {
        let mut m = SecretMatcher::new([("c", "tok=en+with/eq==signs")]);
        assert!(!m.failed() && !m.eq_free_of.is_empty());
        m.eq_free = None;
        assert!(m.failed());
        let mut m = SecretMatcher::new([("c", "no-equals-sign-here")]);
        m.eq_free = None;
        assert!(!m.failed());
    }

    #[test]
    fn overlapping_patterns_are_all_reported() {
        let m = SecretMatcher::new([("a", "abcdefgh"), ("b", "efghijkl")]);
        let mut ranges = Vec::new();
        m.each_match(b"..abcdefghijkl..", |r, _| ranges.push(r));
        assert!(
            ranges.contains(&(2..10)) && ranges.contains(&(6..14)),
            "{ranges:?}"
        );
        assert!(contains(b"..abcdefghijkl..", b"efgh"));
    }

    /// Every match, sorted: what [`SecretMatcher::each_match_cut`] reports.
    fn all_matches(m: &SecretMatcher, hay: &[u8]) -> Vec<(usize, usize, usize, bool)> {
        let mut out = Vec::new();
        m.each_match_cut(hay, |r, owner, cut| out.push((r.start, r.end, owner, cut)));
        out.sort_unstable();
        out
    }

    /// Searching only the runs of pattern bytes finds exactly what searching every byte
    /// finds: the same matcher with every byte in its sets and a run length of one is the
    /// search of the whole text, here compared on texts mixing binary noise, prose and
    /// secrets in their forms, cut short, in any case and wrapped with line breaks.
    #[test]
    fn searching_runs_finds_what_searching_everything_finds() {
        let secrets = [
            ("a", fake_token(36)),
            ("b", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned()),
            ("c", "tok=en+with/eq==signs.and~more".to_owned()),
            ("d", "k9=Zq7Wx".to_owned()),
        ];
        let pairs = || secrets.iter().map(|(n, v)| (*n, v.as_str()));
        let runs = SecretMatcher::new(pairs());
        let mut whole = SecretMatcher::new(pairs());
        whole.in_pattern = ByteSet([true; 256]);
        whole.in_joined = ByteSet([true; 256]);
        whole.in_decoded = ByteSet([true; 256]);
        whole.min_len = 1;
        let forms: Vec<Vec<u8>> = secrets.iter().flat_map(|(_, v)| forms(v)).collect();
        let breaks: [&[u8]; 12] = [
            b"\n",
            b"\r\n",
            b"=\n",
            b"=\r\n",
            b"\\n",
            b"\n ",
            b"\r\r\n",
            b"=",
            b"=\n=\n=\n=\n",
            b"==========",
            b"===\\r\\n ",
            b"=\\r\\n=\\r\\n",
        ];
        let prose = b"The quick brown fox: {\"json\": [1, 2]} <a href=\"/x?y=z&w=%2F\">\r\n";
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            usize::try_from(x % n as u64).unwrap()
        };
        // Chains of soft breaks and runs of `=` join nothing past a scanner's hold-back.
        for (secret, filler) in [(&secrets[0].1, &b"=\n"[..]), (&secrets[2].1, b"=")] {
            let hay = [
                &secret.as_bytes()[..3],
                &filler.repeat(runs.span()),
                &secret.as_bytes()[3..],
            ]
            .concat();
            let found = all_matches(&runs, &hay);
            assert!(
                found.iter().all(|(s, e, _, _)| e - s <= runs.span()),
                "{found:?}"
            );
        }
        // Each form alone, with one break at each place, between bytes no pattern has.
        for form in &forms {
            for brk in breaks {
                for at in 1..form.len() {
                    let hay = [b"\x01", &form[..at], brk, &form[at..], b"\x01"].concat();
                    assert_eq!(
                        all_matches(&runs, &hay),
                        all_matches(&whole, &hay),
                        "{hay:?}"
                    );
                }
            }
        }
        let (mut matched, mut across, mut escaped) = (0, 0, 0);
        for _ in 0..400 {
            let mut hay = Vec::new();
            for _ in 0..1 + rand(8) {
                match rand(4) {
                    0 => hay.extend((0..rand(300)).map(|_| rand(256) as u8)),
                    1 => hay.extend_from_slice(&prose[..rand(prose.len())]),
                    _ => {
                        let form = &forms[rand(forms.len())];
                        let form = &form[..form.len() - rand(10).min(form.len())];
                        // Some forms with some bytes escaped, each in a style of its own.
                        let escapes = rand(3) == 0;
                        for &b in form {
                            let escape = match if escapes { rand(8) } else { 4 } {
                                0 => format!("%{b:02X}"),
                                1 => format!("\\u{b:04x}"),
                                2 => format!("&#x{b:X};"),
                                3 => format!("&#{b};"),
                                _ => String::new(),
                            };
                            if !escape.is_empty() {
                                hay.extend_from_slice(escape.as_bytes());
                            } else if rand(4) == 0 {
                                hay.push(b.to_ascii_uppercase());
                            } else {
                                hay.push(b);
                            }
                            if !escapes && rand(12) == 0 {
                                hay.extend_from_slice(breaks[rand(breaks.len())]);
                            }
                        }
                    }
                }
            }
            let expected = all_matches(&whole, &hay);
            assert_eq!(all_matches(&runs, &hay), expected, "{hay:?}");
            // No match covers more than a stream scanner holds back.
            assert!(
                expected.iter().all(|(s, e, _, _)| e - s <= runs.span()),
                "{hay:?}"
            );
            assert_eq!(runs.find(&hay), whole.find(&hay), "{hay:?}");
            matched += expected.len();
            across += expected
                .iter()
                .filter(|(s, e, _, _)| hay[*s..*e].iter().any(|b| matches!(b, b'\n' | b'\r')))
                .count();
            escaped += expected
                .iter()
                .filter(|(s, e, _, _)| hay[*s..*e].iter().any(|b| matches!(b, b'%' | b';')))
                .count();
        }
        assert!(
            matched > 400 && across > 100 && escaped > 100,
            "{matched} matches, {across} across breaks, {escaped} with escapes"
        );
    }

    #[test]
    fn runs_are_maximal_long_enough_and_merged_when_near() {
        let mut set = ByteSet::default();
        set.add_any_case(b"ab");
        let hay = b"ab.aBbA..abababab....................................................................bab.x";
        let got: Vec<_> = Runs::new(hay, &set, 4).unmerged().collect();
        assert_eq!(got, [3..7, 9..17]);
        assert_eq!(Runs::new(hay, &set, 4).collect::<Vec<_>>(), vec![3..17]);
        assert_eq!(Runs::new(hay, &set, 3).collect::<Vec<_>>(), [3..17, 85..88]);
        assert_eq!(Runs::new(b"abab", &set, 4).next(), Some(0..4));
        assert!(Runs::new(b"aba", &set, 4).next().is_none());
    }
}
