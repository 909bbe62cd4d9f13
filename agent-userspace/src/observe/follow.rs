//! Reading an audit log as it grows, across rotations.
//!
//! Each [`Follower::poll`] reads what was appended since the last one and then looks at
//! the path again: a different inode there means the file was rotated (renamed away and
//! a new one created), so the old file is read to its end once more and reading goes on
//! at the start of the new one. The same inode with fewer bytes than were read, or with
//! other bytes than were read just before the read position, means it was truncated
//! (`copytruncate`) and written again, so reading starts over at 0; the second check
//! catches a file rewritten to the same length between two polls. While the path is
//! missing (between the rename and the create) the old file is still read.

use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
};

/// Where a follower starts in the file that is there when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Beginning,
    /// After what the file holds now (only new records are shown).
    End,
}

/// A line longer than this is handed out in pieces rather than buffered without bound.
const MAX_LINE: usize = 1 << 20;
/// Most bytes one poll reads, so that a large log is shown a piece at a time. More than
/// `MAX_LINE`, so a poll that stops here has always handed out at least one line.
const POLL_BUDGET: u64 = 4 << 20;
const CHUNK: usize = 64 * 1024;

pub struct Follower {
    path: PathBuf,
    current: Option<Open>,
    /// Bytes after the last newline read, waiting for the rest of their line.
    partial: Vec<u8>,
    /// Set when the follower has switched files: counts rotations, for the caller.
    rotations: u64,
}

struct Open {
    file: File,
    dev: u64,
    ino: u64,
    offset: u64,
    /// The last bytes read, ending at `offset`: if the file no longer holds them there,
    /// it was truncated and written again.
    seen: Vec<u8>,
}

/// How many of the last bytes read are kept to recognise a rewritten file: more than a
/// whole record, so that they include the last record's `@timestamp` and
/// `event.sequence` (records often end alike).
const SEEN: usize = 4096;

impl Follower {
    /// Starts following `path`. A missing file is waited for (and then read from its
    /// start); any other error opening it is returned.
    pub fn open(path: impl Into<PathBuf>, start: Start) -> io::Result<Self> {
        let path = path.into();
        let current = match open(&path) {
            Ok(mut o) => {
                if start == Start::End {
                    o.offset = o.file.metadata()?.len();
                    let from = o.offset.saturating_sub(SEEN as u64);
                    let mut seen = vec![0; usize::try_from(o.offset - from).unwrap_or(0)];
                    o.file.read_exact_at(&mut seen, from)?;
                    o.seen = seen;
                }
                Some(o)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            current,
            partial: Vec::new(),
            rotations: 0,
        })
    }

    /// How many times a rotation or truncation was followed.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Complete lines appended since the last call, without their `\n`, up to a few
    /// MiB at a time: an empty result means the follower has caught up.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        let Some(cur) = self.current.as_mut() else {
            match open(&self.path) {
                Ok(o) => self.current = Some(o),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(lines),
                Err(e) => return Err(e),
            }
            return self.poll();
        };
        if rewritten(cur)? {
            cur.offset = 0;
            cur.seen.clear();
            self.partial.clear();
            self.rotations += 1;
        }
        if read_to_end(cur, &mut self.partial, &mut lines)? {
            // Not caught up yet: rotation is looked for once the end is reached.
            return Ok(lines);
        }
        match std::fs::metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) != (cur.dev, cur.ino) => {
                // Rotated: whatever reached the old file before its writer moved on.
                while read_to_end(cur, &mut self.partial, &mut lines)? {}
                self.flush_partial(&mut lines);
                self.rotations += 1;
                match open(&self.path) {
                    Ok(o) => {
                        self.current = Some(o);
                        let Some(new) = self.current.as_mut() else {
                            return Ok(lines);
                        };
                        read_to_end(new, &mut self.partial, &mut lines)?;
                    }
                    // Gone again already: keep the old one until a new file appears.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(meta) if meta.len() < cur.offset => {
                // Truncated in place (copytruncate): the file starts over.
                cur.offset = 0;
                cur.seen.clear();
                self.partial.clear();
                self.rotations += 1;
                read_to_end(cur, &mut self.partial, &mut lines)?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(lines)
    }

    /// The unterminated end of a file that will not grow any more is a line of its own.
    fn flush_partial(&mut self, lines: &mut Vec<String>) {
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
    }
}

fn open(path: &Path) -> io::Result<Open> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    Ok(Open {
        file,
        dev: meta.dev(),
        ino: meta.ino(),
        offset: 0,
        seen: Vec::new(),
    })
}

/// Whether the bytes before the read position are not the ones read there.
fn rewritten(cur: &Open) -> io::Result<bool> {
    if cur.seen.is_empty() {
        return Ok(false);
    }
    let len = cur.file.metadata()?.len();
    if len < cur.offset {
        return Ok(true);
    }
    let mut now = vec![0; cur.seen.len()];
    cur.file
        .read_exact_at(&mut now, cur.offset - cur.seen.len() as u64)?;
    Ok(now != cur.seen)
}

/// Reads from the read position on, up to [`POLL_BUDGET`] bytes; returns whether it
/// stopped there (more may follow) rather than at the end of the file.
fn read_to_end(cur: &mut Open, partial: &mut Vec<u8>, lines: &mut Vec<String>) -> io::Result<bool> {
    let mut buf = vec![0; CHUNK];
    let mut budget = POLL_BUDGET;
    loop {
        if budget == 0 {
            return Ok(true);
        }
        let n = match cur.file.read_at(&mut buf, cur.offset) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        cur.offset += n as u64;
        budget = budget.saturating_sub(n as u64);
        let keep = cur.seen.len().saturating_add(n).saturating_sub(SEEN);
        cur.seen.drain(..keep.min(cur.seen.len()));
        cur.seen.extend_from_slice(&buf[n.saturating_sub(SEEN)..n]);
        let mut rest = &buf[..n];
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            partial.extend_from_slice(&rest[..nl]);
            lines.push(String::from_utf8_lossy(partial).into_owned());
            partial.clear();
            rest = &rest[nl + 1..];
        }
        partial.extend_from_slice(rest);
        if partial.len() > MAX_LINE {
            lines.push(String::from_utf8_lossy(partial).into_owned());
            partial.clear();
        }
    }
}
