//! Records numbered and encoded but not yet known written, kept back to back in one buffer
//! so that the writer appends many whole lines with one `write(2)` and allocates nothing
//! per record once the buffer has grown to its working size.

use std::collections::VecDeque;

/// The most bytes one `write(2)` of a batch carries to a file. A batch always holds whole
/// lines (at least one, however long).
pub(super) const FILE_CHUNK: usize = 1 << 20;

/// The most bytes one `write(2)` carries to stdout: a write to a pipe of at most
/// `PIPE_BUF` bytes is never interleaved with another writer's, so lines stay whole even
/// when the daemon's own diagnostics share the pipe.
/// Every line fits: records are encoded within [`super::MAX_LINE`] bytes.
pub(super) const PIPE_CHUNK: usize = super::MAX_LINE;

/// Encoded lines in sequence order: `buf` holds them end to end, each ending in `\n`;
/// `lines` their sequence numbers and lengths, front first.
#[derive(Debug, Default)]
pub(super) struct PendingLines {
    buf: Vec<u8>,
    lines: VecDeque<(u64, usize)>,
}

impl PendingLines {
    /// Appends the line `encode` writes at the end of the buffer, numbered `sequence`.
    /// Nothing is kept if `encode` fails.
    pub(super) fn push_with<E>(
        &mut self,
        sequence: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.buf.len();
        match encode(&mut self.buf) {
            Ok(()) => {
                self.lines.push_back((sequence, self.buf.len() - start));
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(start);
                Err(e)
            }
        }
    }

    /// Appends a line already encoded (ending in `\n`).
    #[cfg(test)]
    pub(super) fn push(&mut self, sequence: u64, line: &[u8]) {
        self.buf.extend_from_slice(line);
        self.lines.push_back((sequence, line.len()));
    }

    pub(super) fn len(&self) -> usize {
        self.lines.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Sequence numbers of the first and last pending line.
    pub(super) fn first_sequence(&self) -> Option<u64> {
        self.lines.front().map(|(s, _)| *s)
    }

    pub(super) fn last_sequence(&self) -> Option<u64> {
        self.lines.back().map(|(s, _)| *s)
    }

    /// Sequence number of the line at `index` from the front.
    pub(super) fn sequence(&self, index: usize) -> Option<u64> {
        self.lines.get(index).map(|(s, _)| *s)
    }

    /// The lines from `skip` on, as many whole ones as fit in `max` bytes (at least one):
    /// their bytes and their lengths.
    pub(super) fn chunk(
        &self,
        skip: usize,
        max: usize,
    ) -> (&[u8], impl Iterator<Item = usize> + '_) {
        let start: usize = self.lines.iter().take(skip).map(|(_, len)| len).sum();
        let mut end = start;
        let mut count = 0;
        for (_, len) in self.lines.iter().skip(skip) {
            if count > 0 && end - start + len > max {
                break;
            }
            end += len;
            count += 1;
        }
        let lengths = self
            .lines
            .iter()
            .skip(skip)
            .take(count)
            .map(|(_, len)| *len);
        (&self.buf[start..end], lengths)
    }

    /// Removes the first `n` lines (written); returns the sequence of the last removed.
    pub(super) fn remove_front(&mut self, n: usize) -> Option<u64> {
        let n = n.min(self.lines.len());
        if n == 0 {
            return None;
        }
        let mut bytes = 0;
        let mut last = None;
        for (sequence, len) in self.lines.drain(..n) {
            bytes += len;
            last = Some(sequence);
        }
        if self.lines.is_empty() {
            self.buf.clear();
            // A long outage may have grown the buffer far past what normal batches need.
            if self.buf.capacity() > 4 * FILE_CHUNK {
                self.buf.shrink_to(FILE_CHUNK);
            }
        } else {
            self.buf.drain(..bytes);
        }
        last
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    fn pending(lines: &[&str]) -> PendingLines {
        let mut p = PendingLines::default();
        for (i, l) in lines.iter().enumerate() {
            p.push(i as u64 + 1, l.as_bytes());
        }
        p
    }

    #[test]
    fn chunks_hold_whole_lines_up_to_the_limit() {
        let p = pending(&["aaaa\n", "bb\n", "cccccc\n", "d\n"]);
        let (bytes, lens) = p.chunk(0, 9);
        assert_eq!(bytes, b"aaaa\nbb\n");
        assert_eq!(lens.collect::<Vec<_>>(), [5, 3]);
        let (bytes, lens) = p.chunk(2, 9);
        assert_eq!(bytes, b"cccccc\nd\n");
        assert_eq!(lens.count(), 2);
        // A line longer than the limit goes alone.
        let (bytes, _) = p.chunk(2, 3);
        assert_eq!(bytes, b"cccccc\n");
        let (bytes, lens) = p.chunk(4, 9);
        assert!(bytes.is_empty());
        assert_eq!(lens.count(), 0);
    }

    #[test]
    fn removing_written_lines_keeps_the_rest_in_order() {
        let mut p = pending(&["aaaa\n", "bb\n", "cccccc\n"]);
        assert_eq!(p.remove_front(2), Some(2));
        assert_eq!(p.len(), 1);
        assert_eq!(p.first_sequence(), Some(3));
        assert_eq!(p.chunk(0, 100).0, b"cccccc\n");
        assert_eq!(p.remove_front(0), None);
        assert_eq!(p.remove_front(5), Some(3));
        assert!(p.is_empty());
        assert_eq!(p.chunk(0, 100).0, b"");
    }

    #[test]
    fn a_failed_encoding_leaves_nothing_behind() {
        let mut p = pending(&["aaaa\n"]);
        let r: Result<(), ()> = p.push_with(2, |buf| {
            buf.extend_from_slice(b"half");
            Err(())
        });
        assert!(r.is_err());
        assert_eq!(p.len(), 1);
        assert_eq!(p.chunk(0, 100).0, b"aaaa\n");
        p.push_with::<()>(2, |buf| {
            buf.extend_from_slice(b"bb\n");
            Ok(())
        })
        .unwrap();
        assert_eq!(p.chunk(0, 100).0, b"aaaa\nbb\n");
        assert_eq!(p.last_sequence(), Some(2));
    }
}
