//! The lines most recently written to a log file, kept for a few seconds so that they can
//! be written again if the file is truncated in place under the writer: logrotate's
//! `copytruncate` copies the file and then empties it, and what was appended between the
//! copy and the truncation is in neither file.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far back, from the last write before a truncation, lines are kept: longer than
/// logrotate takes to copy a log of any size this writer rotates in practice.
pub(super) const RECENT_FOR: Duration = Duration::from_secs(5);

/// The most bytes kept: past it the oldest lines go even within [`RECENT_FOR`], and a
/// rewrite says it may be incomplete.
pub(super) const RECENT_BYTES: usize = 4 << 20;

/// One `write(2)` of whole lines, numbered `first..=last`.
#[derive(Debug)]
struct Written {
    at: Instant,
    bytes: Vec<u8>,
    first: u64,
    last: u64,
    lines: u64,
}

/// Lines written within [`RECENT_FOR`] of the newest, at most [`RECENT_BYTES`].
#[derive(Debug, Default)]
pub(super) struct RecentLines {
    writes: VecDeque<Written>,
    bytes: usize,
    /// The numbers of writes within the window let go for the byte bound since the last
    /// clear, first and last.
    cut: Option<(u64, u64)>,
}

/// What [`RecentLines::take`] hands back: the lines to write again and their range.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Rewrite {
    pub(super) bytes: Vec<u8>,
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) lines: u64,
    /// The records within the window let go for the byte bound, first and last: they may
    /// be in neither file.
    pub(super) cut: Option<(u64, u64)>,
}

impl RecentLines {
    /// Keeps `bytes`, `lines` whole lines numbered `first..=last`, written at `at`.
    pub(super) fn push(&mut self, at: Instant, bytes: &[u8], first: u64, last: u64, lines: u64) {
        if bytes.is_empty() {
            return;
        }
        self.writes.push_back(Written {
            at,
            bytes: bytes.to_vec(),
            first,
            last,
            lines,
        });
        self.bytes += bytes.len();
        while let Some(oldest) = self.writes.front() {
            let stale = at.saturating_duration_since(oldest.at) > RECENT_FOR;
            let over = self.bytes > RECENT_BYTES && self.writes.len() > 1;
            if !stale && !over {
                break;
            }
            if over && !stale {
                let (first, last) = (oldest.first, oldest.last);
                self.cut = Some(
                    self.cut
                        .map_or((first, last), |(f, l)| (f.min(first), l.max(last))),
                );
            }
            self.bytes -= oldest.bytes.len();
            self.writes.pop_front();
        }
    }

    /// Everything kept, oldest first; `None` when nothing is.
    pub(super) fn joined(&self) -> Option<Rewrite> {
        let first = self.writes.front()?.first;
        let last = self.writes.back()?.last;
        let mut bytes = Vec::with_capacity(self.bytes);
        let mut lines = 0;
        for w in &self.writes {
            bytes.extend_from_slice(&w.bytes);
            lines += w.lines;
        }
        Some(Rewrite {
            bytes,
            first,
            last,
            lines,
            cut: self.cut,
        })
    }

    /// Forgets everything kept (written again, or written to a file since moved away).
    pub(super) fn clear(&mut self) {
        self.writes.clear();
        self.bytes = 0;
        self.cut = None;
    }

    /// [`Self::joined`], then [`Self::clear`].
    #[cfg(test)]
    fn take(&mut self) -> Option<Rewrite> {
        let got = self.joined();
        self.clear();
        got
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_window_before_the_newest_write() {
        let t0 = Instant::now();
        let mut r = RecentLines::default();
        assert_eq!(r.take(), None);
        r.push(t0, b"1\n2\n", 1, 2, 2);
        r.push(t0 + Duration::from_secs(3), b"3\n", 3, 3, 1);
        // Time passing without writes forgets nothing: the window ends at the last write.
        r.push(t0 + Duration::from_secs(7), b"4\n", 4, 4, 1);
        let got = r.take().unwrap();
        assert_eq!(
            got,
            Rewrite {
                bytes: b"3\n4\n".to_vec(),
                first: 3,
                last: 4,
                lines: 2,
                cut: None
            }
        );
        assert_eq!(r.take(), None);
    }

    #[test]
    fn the_byte_bound_cuts_and_says_so() {
        let t0 = Instant::now();
        let mut r = RecentLines::default();
        let big = vec![b'x'; RECENT_BYTES / 2];
        for n in 1..=3 {
            r.push(t0, &big, n, n, 1);
        }
        let got = r.take().unwrap();
        assert_eq!((got.first, got.last, got.cut), (2, 3, Some((1, 1))));
        // One write larger than the bound is kept whole.
        r.push(t0, &vec![b'y'; RECENT_BYTES + 1], 9, 9, 1);
        let got = r.take().unwrap();
        assert_eq!((got.first, got.cut), (9, None));
    }
}
