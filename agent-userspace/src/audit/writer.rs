//! Appends encoded records to the audit file (or stdout) and numbers them.
//!
//! Each record becomes one line ending in `\n`. The writer task appends the lines queued
//! at each wake-up back to back with a single `write(2)` (whole lines only, at most 1 MiB;
//! to stdout at most `PIPE_BUF`, 4096 bytes, the most a pipe keeps whole); only a short
//! write is continued. On a file opened with `O_APPEND` the kernel places every such write
//! whole at the end, so lines from concurrent appenders never interleave.
//!
//! Sequence numbers belong to the writer, not the caller: a reopened file continues after
//! the `event.sequence` of its last complete record, so a restarted daemon extends the
//! same numbering and a gap always means lost records. One writer per file is assumed.
//! A file that ends in a fragment (a crash mid-write) gets a `\n` in front of the next
//! record, so the fragment stays a line of its own instead of spoiling that record.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt,
    fs::{DirBuilder, File, OpenOptions},
    io::{self, Read, Write},
    os::{
        fd::AsFd,
        unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};
use tokio::sync::mpsc;
use tracing::error;

use super::{
    batch::{PendingLines, FILE_CHUNK, PIPE_CHUNK},
    recent::{RecentLines, RECENT_FOR},
    record::{action, AuditLost, AuditRewritten, EncodeError, Record},
    redact::{FindSecrets, Redactor},
};

/// Where the audit trail goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditSink {
    /// Appended to; created with mode 0640 (parent directories 0750) if missing.
    File(PathBuf),
    /// The process's stdout, e.g. for a journald or container log collector.
    Stdout,
}

impl fmt::Display for AuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Stdout => f.write_str("stdout"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("creating audit log directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening audit log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the end of audit log {} to continue its sequence: {source}", path.display())]
    ReadTail {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "audit log {}: none of the complete lines in its last {scanned} bytes is an audit \
         record with event.sequence, so its numbering cannot be continued; move the file \
         aside to start a new log",
        path.display()
    )]
    NoSequence { path: PathBuf, scanned: u64 },
    #[error("duplicating stdout for the audit log: {source}")]
    Stdout {
        #[source]
        source: io::Error,
    },
    #[error("writing an audit record to {sink}: {source}")]
    Write {
        sink: AuditSink,
        #[source]
        source: io::Error,
    },
    #[error("syncing audit log {sink}: {source}")]
    Sync {
        sink: AuditSink,
        #[source]
        source: io::Error,
    },
    #[error("audit writer thread ended abnormally: {0}")]
    Join(#[source] tokio::task::JoinError),
}

/// The last record of a log that existed before this writer opened it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogTail {
    /// Its `event.sequence`; this writer continues with the next number.
    pub sequence: u64,
    /// Its `@timestamp`, if it parses as RFC 3339.
    pub timestamp: Option<OffsetDateTime>,
    /// Its `event.action`.
    pub action: Option<String>,
}

impl LogTail {
    /// Whether the previous daemon's last word was `daemon-stop`.
    pub fn ended_cleanly(&self) -> bool {
        self.action.as_deref() == Some(action::DAEMON_STOP)
    }

    /// The last time the previous daemon was seen, if it did not stop cleanly: a candidate
    /// for `DaemonStart::previous_seen` when the daemon has nothing more precise.
    pub fn unclean_stop_last_seen(&self) -> Option<OffsetDateTime> {
        if self.ended_cleanly() {
            None
        } else {
            self.timestamp
        }
    }
}

/// Synchronous writer: used by [`AuditTask`] and directly by tests and tools.
#[derive(Debug)]
pub struct AuditWriter {
    sink: AuditSink,
    /// `None` after a write failed: the next write opens the path again.
    out: Option<File>,
    next_sequence: u64,
    tail: Option<LogTail>,
    /// The output ends in a partial line (a crash or a failed write cut it short): the next
    /// record starts with `\n` so it does not get glued onto that fragment.
    torn: bool,
    /// The file looked torn when opened. That may also have been another appender caught
    /// mid-write, so it is checked again right before the first write.
    recheck_torn: bool,
    /// Masks secrets in each record as it is encoded.
    redactor: Redactor,
    /// The size a regular log file has after this writer's last append (`None`: stdout,
    /// a pipe, or no file open): a smaller one means it was truncated in place.
    /// Kept across a close, so that a reopen of the same file finds a truncation made
    /// while it was closed.
    expected_len: Option<u64>,
    /// Device and inode of the regular file written last (kept across a close): lines
    /// written under another identity went to another file.
    file_id: Option<(u64, u64)>,
    /// A truncation a reopen found, `(expected, found)` sizes, not yet reported.
    truncation_found: Option<(u64, u64)>,
    /// The file closed after a failed write had been deleted by then.
    closed_gone: bool,
    #[cfg(test)]
    sync_fault: Option<io::ErrorKind>,
    #[cfg(test)]
    sync_stall: Option<Duration>,
}

impl AuditWriter {
    pub fn open(sink: AuditSink) -> Result<Self, AuditError> {
        match &sink {
            AuditSink::Stdout => {
                // A duplicate of fd 1 as a File: writes go straight to write(2), bypassing
                // std's line buffer, and dropping it leaves the real stdout open.
                let fd = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| AuditError::Stdout { source })?;
                Ok(Self {
                    sink,
                    out: Some(File::from(fd)),
                    next_sequence: 1,
                    tail: None,
                    torn: false,
                    recheck_torn: false,
                    redactor: Redactor::default(),
                    expected_len: None,
                    file_id: None,
                    truncation_found: None,
                    closed_gone: false,
                    #[cfg(test)]
                    sync_fault: None,
                    #[cfg(test)]
                    sync_stall: None,
                })
            }
            AuditSink::File(path) => {
                let (out, scan) = open_and_scan(path)?;
                let tail = match scan.found {
                    Found::Record(tail) => Some(tail),
                    Found::Nothing => None,
                    Found::NotALog => {
                        return Err(AuditError::NoSequence {
                            path: path.clone(),
                            scanned: scan.scanned,
                        })
                    }
                };
                let next_sequence = tail.as_ref().map_or(1, |t| t.sequence.saturating_add(1));
                let expected_len = regular_len(&out);
                let file_id = regular_id(&out);
                Ok(Self {
                    sink,
                    out: Some(out),
                    next_sequence,
                    tail,
                    torn: scan.torn,
                    recheck_torn: scan.torn,
                    redactor: Redactor::default(),
                    expected_len,
                    file_id,
                    truncation_found: None,
                    closed_gone: false,
                    #[cfg(test)]
                    sync_fault: None,
                    #[cfg(test)]
                    sync_stall: None,
                })
            }
        }
    }

    /// Numbers, encodes and appends one record; returns its `event.sequence`.
    ///
    /// A number is used up once the record is encoded, even when the write fails, so the
    /// log shows a gap rather than two records with one number. An encoding failure is
    /// `InvalidData` wrapping an [`EncodeError`] and uses no number.
    pub fn write(&mut self, record: &Record) -> io::Result<u64> {
        let (sequence, line) = self
            .encode_next(record)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.write_line(&line)?;
        Ok(sequence)
    }

    /// Gives `record` the next sequence number and encodes it; the number is used up only
    /// when encoding succeeds.
    pub fn encode_next(&mut self, record: &Record) -> Result<(u64, Vec<u8>), EncodeError> {
        let sequence = self.next_sequence;
        let mut line = Vec::with_capacity(768);
        encode_masked(&self.redactor, record, sequence, &mut line)?;
        self.next_sequence = sequence.saturating_add(1);
        Ok((sequence, line))
    }

    /// [`AuditWriter::encode_next`] into the pending lines of the writer task.
    fn encode_next_into(
        &mut self,
        record: &Record,
        pending: &mut PendingLines,
    ) -> Result<u64, EncodeError> {
        let sequence = self.next_sequence;
        pending.push_with(sequence, |buf| {
            encode_masked(&self.redactor, record, sequence, buf)
        })?;
        self.next_sequence = sequence.saturating_add(1);
        Ok(sequence)
    }

    /// Appends one encoded line with a single `write(2)` (continued only after a short
    /// write). After a failed write the file is closed, and the next call opens the path
    /// again (creating its directory and the file if they are gone).
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.write_lines(line).map_err(|(_, e)| e)?;
        line_written(line);
        Ok(())
    }

    /// Appends whole lines (each ending in `\n`) with a single `write(2)` (continued only
    /// after a short write). On an error, says how many bytes of `lines` were written; the
    /// file is then closed, and the next call opens the path again.
    fn write_lines(&mut self, lines: &[u8]) -> Result<(), (usize, io::Error)> {
        if self.out.is_none() {
            self.reopen().map_err(|e| (0, into_io(e)))?;
        }
        let Some(out) = self.out.as_mut() else {
            return Err((0, io::ErrorKind::NotConnected.into()));
        };
        if self.recheck_torn {
            self.recheck_torn = false;
            // If the check fails, a stray blank line is the lesser harm.
            self.torn = ends_mid_line(out).unwrap_or(true);
        }
        let mut buf;
        // A `\n` in front ends the fragment a failed write left, in the same write(2).
        let prefix = usize::from(self.torn);
        let bytes = if self.torn {
            buf = Vec::with_capacity(lines.len() + 1);
            buf.push(b'\n');
            buf.extend_from_slice(lines);
            &buf[..]
        } else {
            lines
        };
        let mut written = 0;
        while written < bytes.len() {
            let error = match out.write(&bytes[written..]) {
                Ok(0) => io::ErrorKind::WriteZero.into(),
                Ok(n) => {
                    written += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            // The file now ends mid-line unless the write stopped exactly after one.
            if written > 0 {
                self.torn = bytes[written - 1] != b'\n';
            }
            crate::metrics::audit_write_failed();
            self.close();
            return Err((written.saturating_sub(prefix), error));
        }
        self.torn = false;
        if let Some(len) = &mut self.expected_len {
            *len += bytes.len() as u64;
        }
        Ok(())
    }

    /// Whether the open log file was truncated in place since this writer's last append
    /// (logrotate's `copytruncate`): `Some((expected, found))` sizes, once per truncation.
    /// One `fstat`; never for stdout or a pipe.
    pub(super) fn truncated_in_place(&mut self) -> Option<(u64, u64)> {
        if let Some(found) = self.truncation_found.take() {
            return Some(found);
        }
        let expected = self.expected_len?;
        let found = regular_len(self.out.as_ref()?)?;
        // Longer: another appender (one writer per file is assumed); follow it.
        self.expected_len = Some(found);
        if found >= expected {
            return None;
        }
        // Cut to a size of its own (by hand): it may end mid-line.
        self.recheck_torn |= found > 0;
        Some((expected, found))
    }

    /// Opens the path again and appends there from now on: after `logrotate` moved the
    /// file away (`SIGHUP`), after a failed write, or after built-in rotation. Numbering
    /// continues; if the file found there already holds a higher `event.sequence`, after
    /// that. A no-op for stdout.
    pub fn reopen(&mut self) -> Result<(), AuditError> {
        let AuditSink::File(path) = &self.sink else {
            return Ok(());
        };
        // A file still open stays open until the new one is: while it is, no other file
        // can have its inode, so an equal identity means the same file. One closed after
        // a failed write is not held (its space and file system stay free): if it was
        // deleted after that, a new file given its inode is taken for it, and the lines of
        // the last seconds are written again, announced, which loses nothing.
        let previous = self.out.take();
        let previous_gone = match &previous {
            Some(f) => f.metadata().is_ok_and(|m| m.nlink() == 0),
            None => self.closed_gone,
        };
        let opened = open_and_scan(path);
        drop(previous);
        let (out, scan) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                self.closed_gone = previous_gone;
                return Err(e);
            }
        };
        self.closed_gone = false;
        if let Found::Record(tail) = &scan.found {
            self.next_sequence = self.next_sequence.max(tail.sequence.saturating_add(1));
        }
        self.torn = scan.torn;
        self.recheck_torn = scan.torn;
        let (id, len) = (regular_id(&out), regular_len(&out));
        // The same file again (a reopen after a failed write, or a `SIGHUP` after
        // `copytruncate`): one truncated while it was closed is found now.
        if let (Some(expected), Some(found)) = (self.expected_len, len) {
            if id.is_some() && id == self.file_id && !previous_gone && found < expected {
                self.truncation_found = Some((expected, found));
                self.recheck_torn |= found > 0;
            }
        }
        self.expected_len = len;
        self.file_id = id;
        self.out = Some(out);
        Ok(())
    }

    /// Device and inode of the regular file written last, kept across a close.
    pub(super) fn file_id(&self) -> Option<(u64, u64)> {
        self.file_id
    }

    fn close(&mut self) {
        if matches!(self.sink, AuditSink::File(_)) {
            if let Some(out) = self.out.take() {
                self.closed_gone = out.metadata().is_ok_and(|m| m.nlink() == 0);
            }
        }
    }

    /// Whether the open file has been deleted (no name links to it any more), so what is
    /// written to it is lost. False for stdout and when the file is not open.
    pub fn file_removed(&self) -> bool {
        match (&self.sink, &self.out) {
            (AuditSink::File(_), Some(out)) => out.metadata().is_ok_and(|m| m.nlink() == 0),
            _ => false,
        }
    }

    /// Size of the open file, if one is open.
    fn file_len(&self) -> Option<u64> {
        match (&self.sink, &self.out) {
            (AuditSink::File(_), Some(out)) => out.metadata().ok().map(|m| m.len()),
            _ => None,
        }
    }

    /// Forces written records to stable storage. `Ok(false)` when there was nothing to
    /// sync: stdout, a closed file (after a failed write), or a path that is not a regular
    /// file, such as a named pipe, which has no storage.
    pub fn sync(&mut self) -> io::Result<bool> {
        let (AuditSink::File(_), Some(out)) = (&self.sink, &self.out) else {
            return Ok(false);
        };
        #[cfg(test)]
        if let Some(kind) = self.sync_fault.take() {
            return Err(io::Error::from(kind));
        }
        #[cfg(test)]
        if let Some(stall) = self.sync_stall.take() {
            std::thread::sleep(stall);
        }
        if out.metadata()?.file_type().is_file() {
            out.sync_data().map(|()| true)
        } else {
            Ok(false)
        }
    }

    /// Makes the next [`Self::sync`] of an open file fail with `kind`, as a disk that
    /// could not store what was written reports it.
    #[cfg(test)]
    pub(super) fn fail_next_sync(&mut self, kind: io::ErrorKind) {
        self.sync_fault = Some(kind);
    }

    /// Makes the next [`Self::sync`] of an open file take `stall`, as a hung file system
    /// (an NFS server gone, a suspended device) holds `fdatasync`.
    #[cfg(test)]
    pub(super) fn stall_next_sync(&mut self, stall: Duration) {
        self.sync_stall = Some(stall);
    }

    /// The number the next record will get.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Numbers `n` records that were lost before they could be encoded; returns the first
    /// and last number given.
    fn skip(&mut self, n: u64) -> (u64, u64) {
        let first = self.next_sequence;
        self.next_sequence = first.saturating_add(n);
        (first, self.next_sequence.saturating_sub(1))
    }

    /// Makes numbering continue after `last_used` if that is further than where it stands
    /// (a number persisted by an earlier run whose log has since been rotated away).
    pub fn continue_after(&mut self, last_used: u64) {
        self.next_sequence = self.next_sequence.max(last_used.saturating_add(1));
    }

    /// The last record the file held when it was opened.
    pub fn tail(&self) -> Option<&LogTail> {
        self.tail.as_ref()
    }

    pub fn sink(&self) -> &AuditSink {
        &self.sink
    }
}

/// Device and inode of `file` if it is a regular file.
fn regular_id(file: &File) -> Option<(u64, u64)> {
    file.metadata()
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| (m.dev(), m.ino()))
}

/// The size of `file` if it is a regular file (a pipe or device has none to truncate).
fn regular_len(file: &File) -> Option<u64> {
    file.metadata()
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| m.len())
}

/// Counts a written line and hands it to the collector.
/// Appends `record` to `out` as one line with every secret masked (its strings before a
/// shortening cuts them, then the whole line), and says so in the daemon's log.
fn encode_masked(
    redactor: &Redactor,
    record: &Record,
    sequence: u64,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let start = out.len();
    record.encode_into_masked(sequence, out, &|s| redactor.mask_string(s))?;
    let masked = redactor.apply(&mut out[start..]);
    if masked > 0 {
        tracing::warn!(
            sequence,
            masked,
            "A secret reached an audit record; masked before it was written"
        );
    }
    Ok(())
}

fn line_written(line: &[u8]) {
    crate::metrics::audit_written(line.len());
    crate::collector::forward(line);
}

fn into_io(e: AuditError) -> io::Error {
    match e {
        AuditError::CreateDir { source, .. }
        | AuditError::Open { source, .. }
        | AuditError::ReadTail { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

fn open_and_scan(path: &Path) -> Result<(File, TailScan), AuditError> {
    let out = open_append(path)?;
    let scan = scan_tail(&out).map_err(|source| AuditError::ReadTail {
        path: path.to_owned(),
        source,
    })?;
    Ok((out, scan))
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|source| AuditError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    // Not through a symbolic link to a file: whoever could place one would choose the
    // file that the daemon, as root, appends to (and the records it truncates on
    // rotation). A link to a stream (`/dev/stdout`, `/proc/self/fd/1`: a pipe, a
    // terminal) is followed: nothing there is truncated or rotated.
    let open = |follow: bool| {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o640)
            .custom_flags(if follow { 0 } else { libc::O_NOFOLLOW })
            .open(path)
    };
    let opened = match open(false) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => match std::fs::metadata(path) {
            Ok(target) if !target.is_file() && !target.is_dir() => open(true),
            _ => Err(io::Error::new(
                e.kind(),
                "it is a symbolic link to a file, which the audit log is not opened \
                     through: name the file itself",
            )),
        },
        other => other,
    };
    opened.map_err(|source| AuditError::Open {
        path: path.to_owned(),
        source,
    })
}

fn ends_mid_line(file: &File) -> io::Result<bool> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    let mut last = [0];
    file.read_exact_at(&mut last, len - 1)?;
    Ok(last != [b'\n'])
}

/// The first window read from the end of an existing log; doubled while no record is found.
/// Messages the queue to the writer holds (a message is a record, or a batch of kernel
/// events); producers that find it full count what they could not queue.
pub const QUEUE_MESSAGES: usize = 65_536;

const TAIL_WINDOW_START: u64 = 64 * 1024;
/// Beyond this much unparseable tail the file is not taken for an audit log.
const TAIL_WINDOW_MAX: u64 = 16 * 1024 * 1024;

struct TailScan {
    found: Found,
    torn: bool,
    scanned: u64,
}

enum Found {
    Record(LogTail),
    /// Empty, or no complete non-blank line yet.
    Nothing,
    NotALog,
}

#[derive(Deserialize)]
struct TailLine {
    #[serde(rename = "@timestamp")]
    timestamp: Option<String>,
    event: TailEvent,
}

#[derive(Deserialize)]
struct TailEvent {
    sequence: u64,
    action: Option<String>,
}

/// Finds the last complete line that is a record. Normally that is the very last line;
/// earlier lines are tried only when it is damaged (e.g. a fragment terminated by recovery).
fn scan_tail(file: &File) -> io::Result<TailScan> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(TailScan {
            found: Found::Nothing,
            torn: false,
            scanned: 0,
        });
    }
    let mut window = TAIL_WINDOW_START;
    loop {
        let start = len.saturating_sub(window);
        let mut buf = vec![0; usize::try_from(len - start).map_err(io::Error::other)?];
        file.read_exact_at(&mut buf, start)?;
        let torn = buf.last() != Some(&b'\n');
        let scanned = len - start;
        let at_file_start = start == 0;
        let done = |found| {
            Ok(TailScan {
                found,
                torn,
                scanned,
            })
        };

        if let Some(last_newline) = buf.iter().rposition(|&b| b == b'\n') {
            let mut lines = buf[..last_newline].split(|&b| b == b'\n');
            // Unless the window starts the file, its first piece may be a line's tail.
            if !at_file_start {
                lines.next();
            }
            let mut any_content = false;
            for line in lines.rev() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                any_content = true;
                if let Ok(parsed) = serde_json::from_slice::<TailLine>(line) {
                    let timestamp = parsed
                        .timestamp
                        .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok());
                    return done(Found::Record(LogTail {
                        sequence: parsed.event.sequence,
                        timestamp,
                        action: parsed.event.action,
                    }));
                }
            }
            if at_file_start {
                return done(if any_content {
                    Found::NotALog
                } else {
                    Found::Nothing
                });
            }
        } else if at_file_start {
            // Only a fragment: the very first write was cut short.
            return done(Found::Nothing);
        }
        if window >= TAIL_WINDOW_MAX {
            return done(Found::NotALog);
        }
        window *= 2;
    }
}

/// The `audit:` section of the daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// What the proxy does while audit records cannot be written.
    pub on_failure: OnFailure,
    /// Built-in size-based rotation; off by default (use logrotate and `SIGHUP`).
    pub rotate: Option<RotateConfig>,
    /// Records held in memory while the log cannot be written; records beyond this are
    /// counted and reported in an `audit-lost` record once writing works again.
    pub queue_records: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            on_failure: OnFailure::RefuseCredentials,
            rotate: None,
            queue_records: 20_000,
        }
    }
}

impl AuditConfig {
    /// Checks the values; the message names the field and what would be valid.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=10_000_000).contains(&self.queue_records) {
            return Err(format!(
                "queue_records: {} is out of range: use 1 to 10000000",
                self.queue_records
            ));
        }
        if let Some(r) = &self.rotate {
            if r.max_bytes < 4096 {
                return Err(format!(
                    "rotate.max_bytes: {} is too small: use at least 4096",
                    r.max_bytes
                ));
            }
            if !(1..=1000).contains(&r.keep) {
                return Err(format!(
                    "rotate.keep: {} is out of range: use 1 to 1000",
                    r.keep
                ));
            }
        }
        Ok(())
    }
}

/// `audit.on_failure`: what happens to requests that would use a credential while the
/// audit log cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// The proxy refuses them (503), so no credential is used unrecorded. Everything else,
    /// and kernel enforcement, goes on; their records wait in the queue.
    #[default]
    RefuseCredentials,
    /// The proxy goes on injecting credentials; their records wait in the queue and are
    /// lost (and counted) once it overflows. Weaker: credentials may be used unrecorded.
    Continue,
}

/// `audit.rotate`: once the log reaches `max_bytes` it is renamed to `<path>.1` (older
/// ones shift to `.2` ... `.<keep>`, the oldest is removed) and a new file is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateConfig {
    pub max_bytes: u64,
    pub keep: u32,
}

/// How the audit trail is doing, for `egressctl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHealth {
    /// False while records cannot be written.
    pub healthy: bool,
    /// When writes began to fail (RFC 3339), while they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    /// The last write error, while writes fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Records waiting to be written.
    pub queued: u64,
    /// Records lost (numbered, never written) since this daemon started.
    pub lost: u64,
    /// Failed writes since this daemon started.
    pub write_errors: u64,
}

/// How long one `write(2)` to the log may be blocked before the trail counts as
/// unhealthy. A sink that blocks (a reader of stdout that stopped reading, a frozen or
/// hung file system) fails no write, yet records no longer reach it.
#[cfg(not(test))]
const WRITE_STALL: Duration = Duration::from_secs(5);
#[cfg(test)]
const WRITE_STALL: Duration = Duration::from_millis(500);

/// Shared between the writer thread and every handle.
#[derive(Debug)]
struct Health {
    /// Records the queue to the writer had no room for: numbered and reported as lost by
    /// the writer when it next takes from the queue.
    unqueued: AtomicU64,
    /// Of those, vital records ([`vital`]) the reserve had no room for either: until they
    /// are reported, a credential's use could go unrecorded.
    vital_unqueued: AtomicU64,
    /// Of those, how many were each sandbox's.
    unqueued_by: Mutex<BTreeMap<String, u64>>,
    /// A reopen was asked for (set even when the queue had no room for the message).
    reopen: AtomicBool,
    failing: AtomicBool,
    report: Mutex<AuditHealth>,
    origin: Instant,
    /// Milliseconds after `origin`, plus one, when the write in progress began; 0 while
    /// none is.
    writing_since: AtomicU64,
    /// Vital records ([`vital`]) that found the queue to the writer full, kept for it.
    overflow: Mutex<Overflow>,
    /// `overflow` holds records.
    overflowed: AtomicBool,
    /// Messages queued to the writer so far (counted just after each is queued, so a
    /// count read meanwhile may be one short: a record kept aside is then taken just
    /// before that message, never stranded): a record kept aside is taken only after the
    /// messages queued before it.
    sent: AtomicU64,
    /// Records in the queue to the writer, not yet taken by it (added before a message
    /// is queued, taken off when it is not, or when the writer takes it).
    queued: AtomicU64,
}

/// Vital records kept past a full queue to the writer: at most [`VITAL_RESERVE`] held at
/// once, of which at most [`VITAL_SHARE`] one sandbox's, so that a sandbox flooding the
/// trail (denied connects, refused queries, or vital records of its own) cannot push out
/// what another's credential did.
#[derive(Debug, Default)]
struct Overflow {
    /// Each record with the number of messages queued before it, and its owner.
    records: VecDeque<(u64, Option<String>, Record)>,
    by_owner: HashMap<Option<String>, usize>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            unqueued: AtomicU64::new(0),
            vital_unqueued: AtomicU64::new(0),
            unqueued_by: Mutex::default(),
            reopen: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            report: Mutex::new(AuditHealth::default()),
            origin: Instant::now(),
            writing_since: AtomicU64::new(0),
            overflow: Mutex::new(Overflow::default()),
            overflowed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        }
    }
}

impl Health {
    fn report(&self) -> MutexGuard<'_, AuditHealth> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn overflow(&self) -> MutexGuard<'_, Overflow> {
        self.overflow.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the vital records of a message that found the queue full (within the
    /// reserve), and counts the rest as unqueued, with their sandboxes; returns how many
    /// records were not kept, and how many of those were vital.
    fn keep_vital(&self, message: Message) -> (u64, u64) {
        let records = match message {
            Message::Record(r) => vec![*r],
            Message::Records(v) => v,
            Message::Reopen => return (0, 0),
        };
        if !records.iter().any(|r| vital(r).is_some()) {
            let mut by = self.unqueued_by.lock().unwrap_or_else(|p| p.into_inner());
            for record in &records {
                count_by_sandbox(&mut by, record.sandbox(), 1);
            }
            // Counted with their owners, under the same lock the writer takes both by.
            self.unqueued
                .fetch_add(records.len() as u64, Ordering::SeqCst);
            return (records.len() as u64, 0);
        }
        let after = self.sent.load(Ordering::Acquire);
        let mut unkept = 0;
        let mut vital_unkept = 0;
        let mut overflow = self.overflow();
        let mut by = self.unqueued_by.lock().unwrap_or_else(|p| p.into_inner());
        for record in records {
            let Some(owner) = vital(&record).map(|o| o.map(str::to_owned)) else {
                unkept += 1;
                count_by_sandbox(&mut by, record.sandbox(), 1);
                continue;
            };
            let room = overflow.records.len() < VITAL_RESERVE;
            let kept = overflow.by_owner.entry(owner.clone()).or_default();
            if room && *kept < VITAL_SHARE {
                *kept += 1;
                overflow.records.push_back((after, owner, record));
            } else {
                unkept += 1;
                vital_unkept += 1;
                count_by_sandbox(&mut by, record.sandbox(), 1);
            }
        }
        if unkept > 0 {
            self.unqueued.fetch_add(unkept, Ordering::SeqCst);
        }
        drop(by);
        if !overflow.records.is_empty() {
            self.overflowed.store(true, Ordering::Release);
        }
        (unkept, vital_unkept)
    }

    /// The vital records kept past a full queue that were queued no earlier than the
    /// `received`-th message, oldest first; their owners' shares are free again.
    fn take_overflow(&self, received: u64) -> Vec<Record> {
        if !self.overflowed.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut overflow = self.overflow();
        let mut out = Vec::new();
        while overflow
            .records
            .front()
            .is_some_and(|(after, _, _)| *after <= received)
        {
            let Some((_, owner, record)) = overflow.records.pop_front() else {
                break;
            };
            if let Some(kept) = overflow.by_owner.get_mut(&owner) {
                *kept = kept.saturating_sub(1);
                if *kept == 0 {
                    overflow.by_owner.remove(&owner);
                }
            }
            out.push(record);
        }
        if overflow.records.is_empty() {
            self.overflowed.store(false, Ordering::Release);
        }
        out
    }

    /// Every vital record kept past a full queue (the last producer is gone).
    fn take_all_overflow(&self) -> Vec<Record> {
        self.take_overflow(u64::MAX)
    }

    /// Runs one operation on the log's storage (a write, `fdatasync`, a reopen, a
    /// rename, the sequence file) under the stall watch: the trail is unhealthy once one
    /// has been blocked past [`WRITE_STALL`].
    fn watch<R>(&self, op: impl FnOnce() -> R) -> R {
        self.write_started();
        let out = op();
        self.write_ended();
        out
    }

    fn write_started(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.writing_since.store(ms + 1, Ordering::Release);
    }

    fn write_ended(&self) {
        self.writing_since.store(0, Ordering::Release);
    }

    /// How long the operation on the log's storage in progress has been
    /// blocked, once that is past [`WRITE_STALL`].
    fn stalled(&self) -> Option<Duration> {
        let since = self.writing_since.load(Ordering::Acquire);
        if since == 0 {
            return None;
        }
        let blocked = self
            .origin
            .elapsed()
            .saturating_sub(Duration::from_millis(since - 1));
        (blocked > WRITE_STALL).then_some(blocked)
    }
}

/// The sequence numbers of the last record numbered and the last written, kept in a small
/// file in the state directory so numbering continues after a restart even when the log
/// itself was rotated away, and so records numbered but never written are reported by the
/// next run. Overwritten in place (fixed width), which needs no new disk blocks.
#[derive(Debug)]
struct SequenceFile {
    path: PathBuf,
    file: Option<File>,
    stored: (u64, u64),
    warned: bool,
}

const SEQUENCE_LINE: usize = 20 + 1 + 20 + 1;

impl SequenceFile {
    /// Opens (creating) the file; returns it and the stored (numbered, written) pair.
    fn open(path: PathBuf) -> Result<(Self, Option<(u64, u64)>), AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| AuditError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        let file = crate::own_file::open_rw(&path).map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
        let mut text = String::new();
        (&file)
            .read_to_string(&mut text)
            .map_err(|source| AuditError::ReadTail {
                path: path.clone(),
                source,
            })?;
        let stored = parse_sequence_line(&text);
        if stored.is_none() && !text.trim().is_empty() {
            tracing::warn!(path = %path.display(), "Audit sequence file is damaged; numbering continues from the log");
        }
        let this = Self {
            path,
            file: Some(file),
            stored: stored.unwrap_or((0, 0)),
            warned: false,
        };
        Ok((this, stored))
    }

    /// Forces what was stored to stable storage.
    fn sync(&mut self) {
        let Some(f) = &self.file else {
            return;
        };
        if let Err(e) = f.sync_data() {
            if !self.warned {
                self.warned = true;
                error!(path = %self.path.display(), error = %e, "Syncing the audit sequence file failed");
            }
        }
    }

    fn store(&mut self, numbered: u64, written: u64) {
        if self.stored == (numbered, written) {
            return;
        }
        let line = format!("{numbered:020} {written:020}\n");
        debug_assert_eq!(line.len(), SEQUENCE_LINE);
        let result = match &self.file {
            Some(f) => f.write_all_at(line.as_bytes(), 0),
            None => return,
        };
        match result {
            Ok(()) => {
                self.stored = (numbered, written);
                self.warned = false;
            }
            Err(e) if !self.warned => {
                self.warned = true;
                error!(path = %self.path.display(), error = %e, "Saving the audit sequence number failed");
            }
            Err(_) => {}
        }
    }
}

/// Beside the sequence file: how many records a stopping daemon still held unnumbered
/// (queued to a writer that did not finish in time). The next start numbers them as lost.
fn unnumbered_path(sequence_file: &Path) -> PathBuf {
    let mut name = sequence_file.as_os_str().to_owned();
    name.push(".unnumbered");
    PathBuf::from(name)
}

/// Notes, beside `sequence_file`, that `count` records were still held, never numbered,
/// when the daemon stopped without waiting for its writer: the next start reports them
/// in an `audit-lost` record of their own numbers. With the count goes the last number
/// the sequence file held then: a writer that numbered some of them after the note (it
/// runs on for a moment) stored a higher one, and those are not counted twice.
pub fn note_unnumbered_at_stop(sequence_file: &Path, count: u64) -> io::Result<()> {
    if count == 0 {
        return Ok(());
    }
    let numbered = stored_sequence(sequence_file).map_or(0, |(n, _)| n);
    let path = unnumbered_path(sequence_file);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    file.write_all(format!("{count} {numbered}\n").as_bytes())?;
    file.sync_all()
}

/// The records [`note_unnumbered_at_stop`] counted that the writer did not number after
/// all (`numbered`: the last number the sequence file holds now); 0 without a note.
fn unnumbered_at_last_stop(sequence_file: &Path, numbered: u64) -> u64 {
    let text = std::fs::read_to_string(unnumbered_path(sequence_file)).unwrap_or_default();
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(count)), Some(Ok(then))) => count.saturating_sub(numbered.saturating_sub(then)),
        _ => 0,
    }
}

/// The (numbered, written) pair stored in `sequence_file`, if it holds one.
pub fn stored_sequence(sequence_file: &Path) -> Option<(u64, u64)> {
    parse_sequence_line(&std::fs::read_to_string(sequence_file).ok()?)
}

fn parse_sequence_line(text: &str) -> Option<(u64, u64)> {
    let mut parts = text.split_whitespace();
    let numbered = parts.next()?.parse().ok()?;
    let written = parts.next()?.parse().ok()?;
    (written <= numbered).then_some((numbered, written))
}

/// Records given to the writer and not numbered yet: queued, kept aside past a full
/// queue, or counted as not queued.
pub struct Unnumbered(Arc<Health>);

impl Unnumbered {
    pub fn count(&self) -> u64 {
        let overflow = self.0.overflow.lock().map_or(0, |o| o.records.len() as u64);
        self.0.queued.load(Ordering::Acquire) + self.0.unqueued.load(Ordering::Acquire) + overflow
    }
}

/// Entry point of the asynchronous API.
#[derive(Debug)]
pub struct AuditLog;

impl AuditLog {
    /// Opens the sink (reading an existing file's last sequence number) and returns the
    /// handle records are sent through and the task that writes them. Spawn
    /// `task.run()`; it finishes once every handle is dropped.
    pub fn open(sink: AuditSink) -> Result<(AuditHandle, AuditTask), AuditError> {
        Self::open_with(sink, &AuditConfig::default(), None)
    }

    /// [`AuditLog::open`] with rotation and queue settings, and a file (in the daemon's
    /// state directory) that carries the sequence numbers across restarts and rotations.
    /// Records an earlier run numbered but never wrote are reported first, in an
    /// `audit-lost` record.
    pub fn open_with(
        sink: AuditSink,
        config: &AuditConfig,
        sequence_file: Option<PathBuf>,
    ) -> Result<(AuditHandle, AuditTask), AuditError> {
        let mut writer = AuditWriter::open(sink)?;
        let mut pending = PendingLines::default();
        let mut written = writer.next_sequence().saturating_sub(1);
        let mut unnumbered_note = None;
        let sequence_file = match sequence_file {
            None => None,
            Some(path) => {
                let (file, stored) = SequenceFile::open(path.clone())?;
                let unnumbered =
                    unnumbered_at_last_stop(&path, stored.map_or(0, |(numbered, _)| numbered));
                // Removed once the loss record's numbers are stored (see `run_blocking`).
                unnumbered_note = Some(unnumbered_path(&path));
                if let Some((numbered, stored_written)) = stored {
                    let in_log = writer.tail().map_or(0, |t| t.sequence);
                    writer.continue_after(numbered);
                    let done = stored_written.max(in_log);
                    written = done.max(numbered);
                    if numbered > done {
                        written = done;
                        let lost = AuditLost {
                            time: OffsetDateTime::now_utc(),
                            count: numbered - done,
                            first_sequence: done + 1,
                            last_sequence: numbered,
                            sandboxes: Vec::new(),
                            since: None,
                            error: "numbered by the previous run of the daemon but not written \
                                    before it stopped"
                                .to_owned(),
                        };
                        error!(
                            count = lost.count,
                            first = lost.first_sequence,
                            last = lost.last_sequence,
                            "Audit records of the previous run were never written"
                        );
                        let _ = writer.encode_next_into(&Record::AuditLost(lost), &mut pending);
                    }
                }
                if unnumbered > 0 {
                    // Numbers of their own, after everything the last run numbered.
                    let first = writer.next_sequence();
                    let last = first + unnumbered - 1;
                    writer.continue_after(last);
                    let lost = AuditLost {
                        time: OffsetDateTime::now_utc(),
                        count: unnumbered,
                        first_sequence: first,
                        last_sequence: last,
                        sandboxes: Vec::new(),
                        since: None,
                        error: "held by the previous run of the daemon when it stopped, before \
                                they were numbered: its writer did not finish within the stop's \
                                bound; they may not have been written (numbered here to count \
                                them)"
                            .to_owned(),
                    };
                    error!(
                        count = unnumbered,
                        first,
                        last,
                        "Audit records held at the previous stop may never have been written"
                    );
                    let _ = writer.encode_next_into(&Record::AuditLost(lost), &mut pending);
                }
                Some(file)
            }
        };
        let health = Arc::new(Health::default());
        health.report().healthy = true;
        let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
        Ok((
            AuditHandle {
                tx,
                health: health.clone(),
                redactor: writer.redactor.clone(),
            },
            AuditTask {
                writer,
                rx,
                health,
                pending,
                dropped: None,
                vital_kept: HashMap::new(),
                failing_since: None,
                last_error: None,
                reopen_wanted: false,
                lost_reason: None,
                rotate: config.rotate,
                queue_records: config.queue_records.max(1),
                sequence_file,
                unnumbered_note,
                written,
                synced: written,
                last_sync: Instant::now(),
                sync_failing: false,
                records: 0,
                recent: RecentLines::default(),
                recent_file: None,
                rewrite_due: None,
                received: 0,
            },
        ))
    }
}

/// What goes through the queue to the writer thread.
#[derive(Debug)]
enum Message {
    Record(Box<Record>),
    /// Records in order, sent at once by a producer that makes many together (the kernel
    /// event reader).
    Records(Vec<Record>),
    /// Open the path again (`SIGHUP` after logrotate moved the file).
    Reopen,
}

/// Cheap to clone; hand one to every component that produces records.
#[derive(Clone, Debug)]
pub struct AuditHandle {
    tx: mpsc::Sender<Message>,
    health: Arc<Health>,
    redactor: Redactor,
}

impl AuditHandle {
    /// Installs the search for secrets every record goes through before it is written
    /// (only the first call counts; records encoded before it are not searched).
    pub fn redact_with(&self, find: FindSecrets) -> bool {
        self.redactor.install(find)
    }

    /// Queues a record. Never blocks. The queue to the writer holds [`QUEUE_MESSAGES`]
    /// messages (a write that blocks must not grow the daemon without bound): what finds
    /// it full is counted, and the writer numbers it and reports it in an `audit-lost`
    /// record, so the gap is always explained; but a vital record ([`vital`]) is kept
    /// aside for the writer, within a reserve with a share per sandbox. While the log cannot be written the writer
    /// keeps a bounded number of records and counts the rest (see
    /// [`AuditConfig::queue_records`]). If the task has stopped the record cannot be
    /// written and that is logged.
    pub fn emit(&self, record: impl Into<Record>) {
        let record = record.into();
        crate::metrics::observe(&record);
        self.send(Message::Record(Box::new(record)), 1);
    }

    fn send(&self, message: Message, records: u64) {
        self.health.queued.fetch_add(records, Ordering::AcqRel);
        let result = self.tx.try_send(message);
        if result.is_err() {
            self.health.queued.fetch_sub(records, Ordering::AcqRel);
        }
        match result {
            Ok(()) => {
                self.health.sent.fetch_add(1, Ordering::Release);
            }
            Err(mpsc::error::TrySendError::Full(message)) => {
                // Vital records are kept aside (within a reserve), the rest counted.
                // The loss first (counted inside), then its vital part: the writer, which
                // clears the vital count by what it saw before taking the loss, never
                // clears one whose loss it has not taken.
                let (unkept, vital_unkept) = self.health.keep_vital(message);
                if vital_unkept > 0 {
                    self.health
                        .vital_unqueued
                        .fetch_add(vital_unkept, Ordering::SeqCst);
                }
                if unkept < records {
                    // The writer takes what was kept once it has taken the messages queued
                    // before: make sure one more follows, should it have emptied the queue
                    // meanwhile (with the queue still full, this fails and is not needed).
                    if self.tx.try_send(Message::Records(Vec::new())).is_ok() {
                        self.health.sent.fetch_add(1, Ordering::Release);
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                error!(records, "Audit writer has stopped; records not written");
            }
        }
    }

    /// Queues records in order with one message: what [`AuditHandle::emit`] does for each,
    /// for a producer that makes many at a time.
    pub fn emit_all(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        records.iter().for_each(crate::metrics::observe);
        let n = records.len() as u64;
        self.send(Message::Records(records), n);
    }

    /// Records queued to the writer and not yet taken by it: a producer that can wait (the
    /// kernel event reader, whose ring buffer counts what it cannot hold) holds back
    /// while this is high, so a writer that blocks does not grow the daemon without bound.
    pub fn backlog(&self) -> u64 {
        self.health.queued.load(Ordering::Acquire)
    }

    /// What the writer still holds unnumbered, readable after every handle is gone.
    pub fn unnumbered(&self) -> Unnumbered {
        Unnumbered(self.health.clone())
    }

    /// Asks the writer to open the log's path again (after logrotate moved the file).
    /// Records emitted before this call go to the old file, later ones to the new one.
    pub fn reopen(&self) {
        // In the queue, so records emitted before go to the old file; a flag only when
        // the queue is full, so the reopen is not lost.
        match self.tx.try_send(Message::Reopen) {
            Ok(()) => {
                self.health.sent.fetch_add(1, Ordering::Release);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.health.reopen.store(true, Ordering::Release);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Whether records are being written: false from a failed write until everything
    /// queued meanwhile is written, while a write, sync or reopen of the log has been
    /// blocked for longer than [`WRITE_STALL`], and while records that found the queue
    /// full are not yet reported (a credential is not used while its request's record
    /// could be among them): [`Self::records_credential_use`], and no record unqueued.
    pub fn healthy(&self) -> bool {
        self.records_credential_use() && self.health.unqueued.load(Ordering::Relaxed) == 0
    }

    /// Whether a credential's use is recorded if it happens now: as [`Self::healthy`],
    /// except that records which found the queue full count only when one of them was
    /// vital (a credentialed request's, an alert...: [`vital`]) and found no room in the
    /// reserve either. A sandbox flooding the trail with records of its own (connections
    /// closed unused, refused queries) loses those, reported in `audit-lost`, without
    /// stopping every sandbox's credentials.
    pub fn records_credential_use(&self) -> bool {
        !self.health.failing.load(Ordering::Acquire)
            && self.health.vital_unqueued.load(Ordering::SeqCst) == 0
            && self.health.stalled().is_none()
            && !self.tx.is_closed()
    }

    /// The details behind [`AuditHandle::healthy`], for status.
    pub fn health(&self) -> AuditHealth {
        let mut report = self.health.report().clone();
        if let Some(blocked) = self.health.stalled() {
            report.healthy = false;
            report.error.get_or_insert_with(|| {
                format!(
                    "a write, sync or reopen of the audit log has been blocked for {} s (a \
                     reader that stopped reading, or a frozen or hung file system)",
                    blocked.as_secs()
                )
            });
        }
        if self.tx.is_closed() {
            report.healthy = false;
            report
                .error
                .get_or_insert_with(|| "the audit writer has stopped".to_owned());
        }
        report
    }

    /// Whether the task has stopped, so emitted records go nowhere.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Most records the writer takes from the queue at once.
const BATCH: usize = 1024;

/// How long the writer lets records gather after writing a batch that emptied the queue.
/// Under load this turns one wake-up of the writer thread per record (a futex wake and a
/// context switch, paid partly by the thread that emitted it) into one per interval; it
/// delays a record by at most this much and changes nothing else: every record is still
/// written, in order, as one whole line; the lines gathered go out in one `write(2)`.
const GATHER: Duration = Duration::from_millis(2);

/// First wait before writing again after a failure; doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How often records written to a log file are forced to stable storage (`fdatasync`),
/// when something was written since the last time. Writes only reach the page cache: a
/// disk that fails to store them reports it only to the next sync, which is how such a
/// loss is found and reported instead of passing unseen.
#[cfg(not(test))]
const SYNC_EVERY: Duration = Duration::from_secs(1);
#[cfg(test)]
const SYNC_EVERY: Duration = Duration::from_millis(200);

/// Records numbered but dropped because the queue was full: one contiguous range, since
/// once dropping starts every later record is dropped until the queue is written, but
/// for a vital one ([`vital`]), which closes the range: its `audit-lost` record is queued
/// at once, before the vital one (a later drop opens another range).
#[derive(Clone, Debug)]
struct Dropped {
    first: u64,
    last: u64,
    /// How many were each sandbox's (records of none are not counted here).
    by_sandbox: BTreeMap<String, u64>,
}

impl Dropped {
    fn new(first: u64, last: u64) -> Self {
        Self {
            first,
            last,
            by_sandbox: BTreeMap::new(),
        }
    }
}

/// Sandboxes named one by one in an `audit-lost` record, those with the most lost first;
/// the rest are counted together, so the record stays one short line.
const LOST_SANDBOXES_NAMED: usize = 16;

/// What goes into `egress.audit_lost.sandboxes` and `egress.events_lost.sandboxes`: the
/// [`LOST_SANDBOXES_NAMED`] sandboxes with the most lost, then `other sandboxes` (no
/// sandbox name has a space) for the rest, so that a loss report stays one short line
/// however many sandboxes lost records.
pub fn lost_by_sandbox(counts: BTreeMap<String, u64>) -> Vec<crate::audit::LostBySandbox> {
    let mut counts = counts;
    let others = counts.remove(OTHER_SANDBOXES).unwrap_or(0);
    let mut counts: Vec<(String, u64)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rest: u64 = counts
        .iter()
        .skip(LOST_SANDBOXES_NAMED)
        .map(|(_, count)| count)
        .sum::<u64>()
        + others;
    counts.truncate(LOST_SANDBOXES_NAMED);
    let mut named: Vec<crate::audit::LostBySandbox> = counts
        .into_iter()
        .map(|(name, count)| crate::audit::LostBySandbox { name, count })
        .collect();
    if rest > 0 {
        named.push(crate::audit::LostBySandbox {
            name: OTHER_SANDBOXES.to_owned(),
            count: rest,
        });
    }
    named
}

/// Sandboxes counted apart while losses wait to be reported; past them, together.
const LOST_SANDBOXES_COUNTED: usize = 1024;

/// Counts `n` more lost records of `sandbox` (none: not counted by sandbox); past
/// [`LOST_SANDBOXES_COUNTED`] names, as `other sandboxes`.
fn count_by_sandbox(counts: &mut BTreeMap<String, u64>, sandbox: Option<&str>, n: u64) {
    let Some(mut name) = sandbox else {
        return;
    };
    if counts.len() >= LOST_SANDBOXES_COUNTED && !counts.contains_key(name) {
        name = OTHER_SANDBOXES;
    }
    match counts.get_mut(name) {
        Some(count) => *count += n,
        None => {
            counts.insert(name.to_owned(), n);
        }
    }
}

/// The name the sandboxes past those named are counted under (no sandbox name has a
/// space).
const OTHER_SANDBOXES: &str = "other sandboxes";

/// Vital records kept beyond [`AuditConfig::queue_records`] while the log cannot be
/// written (then they are dropped and counted like the rest).
pub const VITAL_RESERVE: usize = 4096;

/// Vital records one sandbox may have kept in the reserve at once: a sandbox flooding
/// alerts cannot take the room of others' credential records.
pub(super) const VITAL_SHARE: usize = VITAL_RESERVE / 8;

/// Whether a record is kept past a full queue, and whose it is (`Some(None)`: a vital
/// record of no sandbox): what a credential did (a proxy record naming one), alerts,
/// quarantines, releases, revocations and kernel losses. A sandbox that floods the trail
/// (denied connects, refused queries) while the log cannot be written must not push
/// these out.
fn vital(record: &Record) -> Option<Option<&str>> {
    match record {
        Record::Proxy(e)
            if e.record
                .credential
                .as_deref()
                .is_some_and(|c| !c.is_empty()) =>
        {
            Some(Some(e.record.sandbox.as_str()))
        }
        Record::Alert(a) => Some(Some(a.sandbox.as_str())),
        Record::SandboxQuarantine(q) | Record::SandboxRelease(q) => Some(Some(q.sandbox.as_str())),
        Record::CredentialRevoke(r) => Some(Some(r.sandbox.as_str())),
        Record::EventsLost(_) => Some(None),
        _ => None,
    }
}

/// Writes queued records in order until every [`AuditHandle`] is gone.
#[derive(Debug)]
pub struct AuditTask {
    writer: AuditWriter,
    rx: mpsc::Receiver<Message>,
    health: Arc<Health>,
    /// Numbered and encoded, not yet known to be written.
    pending: PendingLines,
    dropped: Option<Dropped>,
    /// Vital records kept past the bound, by sandbox (`None`: of none), since the queue
    /// was last written whole: each sandbox gets a share of the reserve.
    vital_kept: HashMap<Option<String>, usize>,
    failing_since: Option<OffsetDateTime>,
    last_error: Option<String>,
    reopen_wanted: bool,
    /// Why records were lost when the log itself did not fail (the queue was full).
    lost_reason: Option<String>,
    rotate: Option<RotateConfig>,
    queue_records: usize,
    sequence_file: Option<SequenceFile>,
    /// The count of records the last stop held unnumbered, removed once this run has
    /// stored the numbers it reported them under.
    unnumbered_note: Option<PathBuf>,
    /// The last sequence number known written.
    written: u64,
    /// The last sequence number known on stable storage (or written before this run).
    synced: u64,
    last_sync: Instant,
    /// The last sync failed: the trail is unhealthy until one succeeds (records reach the
    /// file but maybe not the disk, so credentials are not used unrecorded meanwhile).
    sync_failing: bool,
    records: u64,
    /// Lines written in the last seconds, for a truncation in place (see [`recent`]).
    recent: RecentLines,
    /// [`AuditWriter::file_id`] when `recent` was last added to.
    recent_file: Option<(u64, u64)>,
    /// A truncation in place found (`(expected, found)` sizes) whose lines are not yet
    /// written again.
    rewrite_due: Option<(u64, u64)>,
    /// Messages taken from the queue.
    received: u64,
}

/// What a finished [`AuditTask`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditSummary {
    pub records: u64,
    pub next_sequence: u64,
}

impl AuditTask {
    /// The last record the file held before this run, e.g. to detect an unclean stop.
    pub fn tail(&self) -> Option<&LogTail> {
        self.writer.tail()
    }

    /// The number the next record will get.
    pub fn next_sequence(&self) -> u64 {
        self.writer.next_sequence()
    }

    #[cfg(test)]
    pub(super) fn fail_next_sync(&mut self, kind: io::ErrorKind) {
        self.writer.fail_next_sync(kind);
    }

    #[cfg(test)]
    pub(super) fn stall_next_sync(&mut self, stall: Duration) {
        self.writer.stall_next_sync(stall);
    }

    /// Writes until all handles are dropped, then syncs the file. Writes happen on a
    /// blocking-pool thread so a slow disk never stalls the runtime. The thread takes
    /// everything queued at each wake-up and, after a batch that emptied the queue, waits
    /// a couple of milliseconds for more before it sleeps on the queue again, so that it
    /// is not woken once per record. The lines taken at a wake-up are written back to back
    /// with one `write(2)` (whole lines, at most 1 MiB, or `PIPE_BUF` to stdout).
    ///
    /// A record that cannot be encoded is numbered and reported lost in an `audit-lost`
    /// record that says why. A write
    /// error never stops the task: it closes the file, marks the trail unhealthy, keeps
    /// up to `queue_records` records (numbering and counting the rest) and tries again,
    /// opening the path afresh, with a growing pause (0.1 s to 2 s). Once everything kept
    /// is written it writes an `audit-lost` record for what was dropped, with the exact
    /// count and sequence range, and the trail is healthy again. If the log was deleted
    /// while open, it is created again and the last batch written again. The task returns
    /// an error only if records are still unwritten when the last handle is dropped.
    pub async fn run(self) -> Result<AuditSummary, AuditError> {
        tokio::task::spawn_blocking(move || self.run_blocking())
            .await
            .map_err(AuditError::Join)?
    }

    fn run_blocking(mut self) -> Result<AuditSummary, AuditError> {
        let mut batch = Vec::with_capacity(BATCH);
        let mut retry = RETRY_MIN;
        // A loss an earlier run left is reported before anything else.
        if !self.pending.is_empty() {
            self.flush();
        }
        // Its numbers are stored: the note of the last stop's unnumbered records may go.
        self.store_sequence();
        if let Some(note) = self.unnumbered_note.take() {
            let _ = std::fs::remove_file(note);
        }
        let mut closed = false;
        loop {
            if self.failing_since.is_some() {
                // Wait, then take what arrived meanwhile without blocking.
                std::thread::sleep(retry);
                retry = (retry * 2).min(RETRY_MAX);
                loop {
                    match self.rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
            } else {
                retry = RETRY_MIN;
                if closed || self.rx.blocking_recv_many(&mut batch, BATCH) == 0 {
                    break;
                }
            }
            let full = batch.len() >= BATCH;
            for message in batch.drain(..) {
                self.take(message);
            }
            self.store_sequence();
            self.flush();
            self.store_sequence();
            if self.last_sync.elapsed() >= SYNC_EVERY && !self.sync_written() {
                // Its loss record, at once.
                self.flush();
                self.store_sequence();
            }
            if closed && self.failing_since.is_some() {
                break;
            }
            if self.failing_since.is_none() && !full {
                std::thread::sleep(GATHER);
            }
        }
        // Records that could not be queued at the very end are reported (or written) too.
        if self.health.unqueued.load(Ordering::Relaxed) > 0
            || self.health.overflowed.load(Ordering::Acquire)
        {
            self.take_unqueued();
            for record in self.health.take_all_overflow() {
                self.take_record(&record);
            }
            self.flush();
            self.store_sequence();
        }
        // A loss record a failed sync at rotation left.
        if !self.pending.is_empty() && self.failing_since.is_none() {
            self.flush();
            self.store_sequence();
        }
        if !self.sync_written() {
            // The loss record of the failed sync, written and synced once more.
            self.flush();
            self.sync_written();
        }
        self.store_sequence();
        let unreported = self.dropped.as_ref().map(|d| d.first);
        if let Some(first) = self.pending.first_sequence().or(unreported) {
            let last = self
                .dropped
                .as_ref()
                .map_or(self.pending.last_sequence().unwrap_or(first), |d| d.last);
            let source = io::Error::other(format!(
                "records {first} to {last} could not be written before the daemon stopped: {}",
                self.last_error.as_deref().unwrap_or("write failed")
            ));
            error!(first, last, "Audit records not written at shutdown");
            return Err(AuditError::Write {
                sink: self.writer.sink().clone(),
                source,
            });
        }
        Ok(AuditSummary {
            records: self.records,
            next_sequence: self.writer.next_sequence(),
        })
    }

    /// Takes one message: numbers and queues its records, or reopens.
    fn take(&mut self, message: Message) {
        self.received += 1;
        let records = match &message {
            Message::Reopen => 0,
            Message::Record(_) => 1,
            Message::Records(records) => records.len() as u64,
        };
        self.take_unqueued();
        match message {
            Message::Reopen => {
                // Records emitted before the reopen go to the old file.
                self.flush();
                self.reopen_wanted = true;
            }
            Message::Record(record) => self.take_record(&record),
            Message::Records(records) => records.iter().for_each(|r| self.take_record(r)),
        }
        // Off the queue's count once numbered (a stop that stops waiting counts what is
        // neither: a flush above may block).
        self.health.queued.fetch_sub(records, Ordering::AcqRel);
        self.take_overflow();
    }

    /// Takes the vital records producers kept aside when the queue to this thread was
    /// full, once the messages queued before each are taken (after the loss of the others
    /// is numbered: they were sent no earlier).
    fn take_overflow(&mut self) {
        for record in self.health.take_overflow(self.received) {
            self.take_record(&record);
        }
    }

    /// Numbers the records producers could not queue (the queue to this thread was full)
    /// as dropped: the next `audit-lost` record reports them with the rest.
    fn take_unqueued(&mut self) {
        // The vital losses seen before the loss is taken are in it (a handle counts the
        // loss first): only those are cleared, later ones wait for the next take.
        // The count and its owners together: producers add both under this lock.
        let mut by_lock = self
            .health
            .unqueued_by
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let vital = self.health.vital_unqueued.load(Ordering::SeqCst);
        let n = self.health.unqueued.swap(0, Ordering::SeqCst);
        let by = std::mem::take(&mut *by_lock);
        drop(by_lock);
        self.health
            .vital_unqueued
            .fetch_sub(vital, Ordering::SeqCst);
        if n == 0 {
            return;
        }
        // Numbered at once (nothing is written in between, so a write that blocks leaves
        // them counted among the numbered): records already kept were numbered before
        // them and are written first, the loss record after them.
        let (first, last) = self.writer.skip(n);
        let d = self.dropped.get_or_insert(Dropped::new(first, last));
        d.last = last;
        for (name, count) in by {
            count_by_sandbox(&mut d.by_sandbox, Some(&name), count);
        }
        self.health.report().lost += n;
        tracing::warn!(
            count = n,
            first,
            last,
            "Audit queue full; records lost (reported as audit-lost)"
        );
        if self.last_error.is_none() {
            self.lost_reason = Some(
                "the queue to the audit writer was full (records came faster than the log \
                 took them)"
                    .to_owned(),
            );
        }
        // Reported now while the log is writable, so the records queued behind are
        // written, not dropped after the range.
        if self.failing_since.is_none() {
            self.flush();
        }
    }

    /// Numbers and queues one record, or counts it as dropped when the queue is full.
    fn take_record(&mut self, record: &Record) {
        // The queue bounds what waits for a log that cannot be written: while the log is
        // writable, a full queue is written out first (one message can carry a whole
        // ring buffer of kernel events).
        if self.pending.len() >= self.queue_records
            && self.failing_since.is_none()
            && self.dropped.is_none()
        {
            self.flush();
        }
        let full = self.dropped.is_some() || self.pending.len() >= self.queue_records;
        // A vital record is kept past the bound, in a reserve of its own (a share of it
        // per sandbox), and closes the range being dropped, whose loss record goes first:
        // what a credential did is not lost to a flood of others, and every gap stays
        // explained by a record numbered below what follows it.
        if full && self.pending.len() + 1 < self.queue_records + VITAL_RESERVE {
            if let Some(owner) = vital(record) {
                let kept = self.vital_kept.entry(owner.map(str::to_owned)).or_default();
                if *kept < VITAL_SHARE {
                    *kept += 1;
                    if let Some(range) = self.dropped.take() {
                        self.queue_loss(range);
                    }
                    if let Err(e) = self.writer.encode_next_into(record, &mut self.pending) {
                        self.unencodable(record, &e);
                    }
                    return;
                }
            }
        }
        if full {
            // Dropped either way: one that cannot be encoded still takes its number, so
            // the range reported lost counts it.
            let sequence = match self.writer.encode_next(record) {
                Ok((sequence, _)) => sequence,
                Err(e) => {
                    error!(action = record.action(), error = %e, "Audit record not encodable");
                    self.writer.skip(1).0
                }
            };
            let d = self.dropped.get_or_insert(Dropped::new(sequence, sequence));
            d.last = sequence;
            count_by_sandbox(&mut d.by_sandbox, record.sandbox(), 1);
            self.health.report().lost += 1;
        } else if let Err(e) = self.writer.encode_next_into(record, &mut self.pending) {
            self.unencodable(record, &e);
        }
    }

    /// A record that cannot be encoded (a time outside what RFC 3339 writes) takes its
    /// number all the same and is reported lost in its place, saying why: the trail has
    /// no gap that nothing explains.
    fn unencodable(&mut self, record: &Record, e: &EncodeError) {
        error!(action = record.action(), error = %e, "Audit record not encodable; reported lost");
        let (first, last) = self.writer.skip(1);
        let mut dropped = Dropped::new(first, last);
        count_by_sandbox(&mut dropped.by_sandbox, record.sandbox(), 1);
        self.queue_lost(
            dropped,
            None,
            format!("the {} record could not be encoded: {e}", record.action()),
        );
    }

    /// Numbers and queues the `audit-lost` record of a dropped range.
    fn queue_loss(&mut self, dropped: Dropped) {
        error!(
            count = dropped.last - dropped.first + 1,
            first = dropped.first,
            last = dropped.last,
            "Audit records lost while the log could not be written"
        );
        let error = self
            .last_error
            .clone()
            .or_else(|| self.lost_reason.take())
            .unwrap_or_else(|| "audit log could not be written".to_owned());
        self.queue_lost(dropped, self.failing_since, error);
    }

    /// Numbers and queues an `audit-lost` record for `range`, lost for `error`.
    fn queue_lost(&mut self, range: Dropped, since: Option<OffsetDateTime>, error: String) {
        let lost = AuditLost {
            time: OffsetDateTime::now_utc(),
            count: range.last - range.first + 1,
            first_sequence: range.first,
            last_sequence: range.last,
            sandboxes: lost_by_sandbox(range.by_sandbox),
            since,
            error,
        };
        if let Err(e) = self
            .writer
            .encode_next_into(&Record::AuditLost(lost), &mut self.pending)
        {
            error!(error = %e, "Loss record not encodable");
        }
    }

    /// Stores the last record numbered and the last one known to be on stable storage (a
    /// file's): after a power loss the log may lack what was written but not synced, and
    /// those must count as never written.
    fn store_sequence(&mut self) {
        let numbered = self.writer.next_sequence().saturating_sub(1);
        // A stream (standard output, a FIFO) has no storage to sync: written is written.
        let written = if self.writer.file_id().is_some() {
            self.synced
        } else {
            self.written
        };
        if let Some(f) = &mut self.sequence_file {
            self.health.watch(|| f.store(numbered, written));
        }
    }

    /// Writes what is pending (then the loss record, if records were dropped); on an
    /// error, notes it and leaves the rest for the next try.
    fn flush(&mut self) {
        // What is numbered so far is stored before a write that may block: a stop that
        // stops waiting counts as unnumbered only what is neither stored nor queued (a
        // flush inside a batch once left the batch's numbered records in neither).
        self.store_sequence();
        // A reopen whose message found the queue full.
        if self.health.reopen.swap(false, Ordering::AcqRel) {
            self.reopen_wanted = true;
        }
        if self.reopen_wanted {
            // What went to the file being closed is synced (or its loss reported, in the
            // file opened next) before the new file makes later syncs about another one.
            self.sync_written();
            self.reopen_wanted = false;
            match self.health.watch(|| self.writer.reopen()) {
                Ok(()) => tracing::info!(sink = %self.writer.sink(), "Audit log reopened"),
                Err(e) => {
                    self.failed(e.to_string());
                    return;
                }
            }
        }
        loop {
            if let Err(e) = self.write_pending() {
                self.failed(e.to_string());
                return;
            }
            let Some(dropped) = self.dropped.take() else {
                break;
            };
            self.queue_loss(dropped);
        }
        // Everything kept is written: the reserve is whole again.
        self.vital_kept.clear();
        if let Some(since) = self.failing_since.take() {
            tracing::warn!(sink = %self.writer.sink(), failing_since = %since, "Audit log writable again");
            self.last_error = None;
            let mut report = self.health.report();
            report.failing_since = None;
            report.queued = 0;
            drop(report);
            if !self.sync_failing {
                self.mark_healthy();
            }
        }
        self.rotate_if_due();
    }

    /// Writes every pending line, as many whole lines per `write(2)` as a chunk holds;
    /// they leave the queue only once written to a file that still has a name (a deleted
    /// log is created again and the lines written again).
    fn write_pending(&mut self) -> io::Result<()> {
        let max = match self.writer.sink() {
            AuditSink::Stdout => PIPE_CHUNK,
            AuditSink::File(_) => FILE_CHUNK,
        };
        let mut attempts = 0;
        loop {
            let mut done = 0;
            let mut result = Ok(());
            while done < self.pending.len() {
                if let Err(e) = self.rewrite_if_truncated() {
                    result = Err(e);
                    break;
                }
                let (bytes, lengths) = self.pending.chunk(done, max);
                let first = done;
                let outcome = self.health.watch(|| self.writer.write_lines(bytes));
                let (written, error) = match outcome {
                    Ok(()) => (bytes.len(), None),
                    Err((written, e)) => (written, Some(e)),
                };
                // Lines written whole are counted and forwarded; a line cut short stays
                // pending and is written again whole.
                let mut offset = 0;
                for len in lengths {
                    if offset + len > written {
                        break;
                    }
                    line_written(&bytes[offset..offset + len]);
                    offset += len;
                    done += 1;
                }
                if done > first && matches!(self.writer.sink(), AuditSink::File(_)) {
                    if self.recent_file != self.writer.file_id() {
                        // Those went to a file since moved away, whole.
                        self.recent.clear();
                        self.recent_file = self.writer.file_id();
                    }
                    if let (Some(from), Some(to)) = (
                        self.pending.sequence(first),
                        self.pending.sequence(done - 1),
                    ) {
                        self.recent.push(
                            Instant::now(),
                            &bytes[..offset],
                            from,
                            to,
                            (done - first) as u64,
                        );
                    }
                }
                if let Some(e) = error {
                    result = Err(e);
                    break;
                }
            }
            if self.writer.file_removed() && attempts < 2 {
                attempts += 1;
                tracing::warn!(sink = %self.writer.sink(), records = done, "Audit log was deleted while open; creating it again and writing the last records again");
                self.health
                    .watch(|| self.writer.reopen())
                    .map_err(into_io)?;
                continue;
            }
            if let Some(last) = self.pending.remove_front(done) {
                self.written = last;
                self.records += done as u64;
            }
            return result;
        }
    }

    /// If the log was truncated in place since the last append (logrotate's
    /// `copytruncate`), writes the lines of the last seconds again, which may be in
    /// neither the copy nor the log, and queues an `audit-rewritten` record saying so.
    /// An error leaves the rewrite due for the next try.
    fn rewrite_if_truncated(&mut self) -> io::Result<()> {
        if let Some(found) = self.health.watch(|| self.writer.truncated_in_place()) {
            self.rewrite_due.get_or_insert(found);
        }
        let Some((expected, found)) = self.rewrite_due else {
            return Ok(());
        };
        // The lines of the file written last, even if another is open by now (a rewrite
        // that failed, then a reopen elsewhere): they are in neither.
        let Some(rewrite) = self.recent.joined() else {
            self.rewrite_due = None;
            return Ok(());
        };
        let outcome = self
            .health
            .watch(|| self.writer.write_lines(&rewrite.bytes));
        outcome.map_err(|(_, e)| e)?;
        self.rewrite_due = None;
        // Written again now: at risk again from the next copy and truncation.
        self.recent.clear();
        self.recent.push(
            Instant::now(),
            &rewrite.bytes,
            rewrite.first,
            rewrite.last,
            rewrite.lines,
        );
        tracing::warn!(
            sink = %self.writer.sink(),
            expected,
            found,
            first = rewrite.first,
            last = rewrite.last,
            "Audit log truncated in place; the last records written again"
        );
        let window = RECENT_FOR.as_secs();
        let cut = match rewrite.cut {
            None => String::new(),
            Some((first, last)) => format!(
                "; the memory bound cut the {window} s window: records {first} to {last} may \
                 be in neither file"
            ),
        };
        // A range being dropped is closed first, with its loss record: the rewrite record
        // is written, and must not be counted inside a range reported lost.
        if let Some(range) = self.dropped.take() {
            self.queue_loss(range);
        }
        let record = AuditRewritten {
            time: OffsetDateTime::now_utc(),
            count: rewrite.lines,
            first_sequence: rewrite.first,
            last_sequence: rewrite.last,
            complete: rewrite.cut.is_none(),
            reason: format!(
                "the log was truncated in place from {expected} to {found} bytes (logrotate \
                 copytruncate, or by hand): the records written in the {window} s before its \
                 last append were written again, and the copy may hold them too, with the \
                 same event.sequence{cut}"
            ),
        };
        if let Err(e) = self
            .writer
            .encode_next_into(&Record::AuditRewritten(record), &mut self.pending)
        {
            error!(error = %e, "Rewrite record not encodable");
        }
        Ok(())
    }

    /// A sync that failed before has succeeded: healthy again unless writes still fail.
    fn sync_recovered(&mut self) {
        if std::mem::take(&mut self.sync_failing) && self.failing_since.is_none() {
            tracing::warn!(sink = %self.writer.sink(), "Audit log synced again");
            self.mark_healthy();
        }
    }

    /// The trail works again: its status says so and credentials are served again.
    fn mark_healthy(&self) {
        let mut report = self.health.report();
        report.healthy = true;
        report.error = None;
        drop(report);
        self.health.failing.store(false, Ordering::Release);
    }

    /// Forces the records written so far to stable storage. If that fails, the records
    /// written since the last sync may never reach the disk: they are reported in an
    /// `audit-lost` record with their range (queued now, written at the next flush, to
    /// a file opened afresh). Returns whether the sync succeeded.
    fn sync_written(&mut self) -> bool {
        self.last_sync = Instant::now();
        if self.written <= self.synced {
            return true;
        }
        match self.health.watch(|| self.writer.sync()) {
            // Synced, or nothing to sync (a sink with no storage, such as a named pipe).
            Ok(true) => {
                self.synced = self.written;
                self.sync_recovered();
                // The sequence file says so, on stable storage too: after a power loss
                // it must not be older than the log it describes by more than a sync.
                self.store_sequence();
                if let Some(f) = &mut self.sequence_file {
                    self.health.watch(|| f.sync());
                }
                true
            }
            // A closed file is synced once it is open again (or its loss reported then).
            Ok(false) if self.writer.out.is_none() => true,
            Ok(false) => {
                self.synced = self.written;
                self.sync_recovered();
                true
            }
            Err(e) => {
                let (first, last) = (self.synced + 1, self.written);
                self.synced = self.written;
                crate::metrics::audit_write_failed();
                error!(sink = %self.writer.sink(), error = %e, first, last, "Syncing the audit log failed; records written since the last sync may not be on disk");
                self.sync_failing = true;
                self.health.failing.store(true, Ordering::Release);
                let mut report = self.health.report();
                report.healthy = false;
                report.error = Some(format!("fdatasync: {e}"));
                report.write_errors += 1;
                report.lost += last - first + 1;
                drop(report);
                self.queue_lost(
                    Dropped::new(first, last),
                    None,
                    format!(
                        "written, but forcing them to stable storage failed (fdatasync: {e}); \
                         they may not be on disk"
                    ),
                );
                self.reopen_wanted = true;
                false
            }
        }
    }

    fn failed(&mut self, error: String) {
        if self.failing_since.is_none() {
            self.failing_since = Some(OffsetDateTime::now_utc());
            error!(sink = %self.writer.sink(), error = %error, "Audit log cannot be written; keeping records in memory and retrying");
        }
        self.health.failing.store(true, Ordering::Release);
        let mut report = self.health.report();
        report.healthy = false;
        report.failing_since = self.failing_since.and_then(|t| t.format(&Rfc3339).ok());
        report.error = Some(error.clone());
        report.queued = self.pending.len() as u64;
        report.write_errors += 1;
        self.last_error = Some(error);
    }

    /// Built-in rotation: once the file reaches `max_bytes`, shift `<path>.N` up by one,
    /// rename the log to `<path>.1` and start a new one. Numbering continues.
    fn rotate_if_due(&mut self) {
        let (Some(rotate), AuditSink::File(path)) = (self.rotate, self.writer.sink().clone())
        else {
            return;
        };
        if self
            .writer
            .file_len()
            .is_none_or(|len| len < rotate.max_bytes)
        {
            return;
        }
        let numbered = |n: u32| {
            let mut p = path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        // Before the file is renamed away, so that a loss is reported in the log that
        // goes on being written.
        if !self.sync_written() {
            return;
        }
        for n in (1..rotate.keep).rev() {
            match self
                .health
                .watch(|| std::fs::rename(numbered(n), numbered(n + 1)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(error = %e, "Shifting a rotated audit log failed"),
            }
        }
        if let Err(e) = self.health.watch(|| std::fs::rename(&path, numbered(1))) {
            tracing::error!(path = %path.display(), error = %e, "Rotating the audit log failed; appending to it");
            return;
        }
        match self.health.watch(|| self.writer.reopen()) {
            Ok(()) => tracing::info!(path = %path.display(), "Audit log rotated"),
            Err(e) => self.failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod lost_by_sandbox_tests {
    use super::{lost_by_sandbox, LOST_SANDBOXES_NAMED};

    /// The most lost first, the rest counted together: one short line whatever the number
    /// of sandboxes.
    #[test]
    fn the_sandboxes_with_the_most_lost_are_named() {
        let counts = (0..40u64).map(|i| (format!("sb-{i:02}"), i + 1)).collect();
        let named = lost_by_sandbox(counts);
        assert_eq!(named.len(), LOST_SANDBOXES_NAMED + 1);
        assert_eq!((named[0].name.as_str(), named[0].count), ("sb-39", 40));
        let rest: u64 = (1..=40 - LOST_SANDBOXES_NAMED as u64).sum();
        let last = &named[LOST_SANDBOXES_NAMED];
        assert_eq!((last.name.as_str(), last.count), ("other sandboxes", rest));
        assert!(lost_by_sandbox(Default::default()).is_empty());
    }

    /// Past the names counted apart, the rest are counted together, and reported so.
    #[test]
    fn names_past_the_bound_are_counted_together() {
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..super::LOST_SANDBOXES_COUNTED + 10 {
            super::count_by_sandbox(&mut counts, Some(&format!("oci:{i}")), 1);
        }
        assert_eq!(counts.len(), super::LOST_SANDBOXES_COUNTED + 1);
        let named = lost_by_sandbox(counts);
        let last = named.last().map(|l| (l.name.as_str(), l.count));
        let rest = super::LOST_SANDBOXES_COUNTED - LOST_SANDBOXES_NAMED + 10;
        assert_eq!(last, Some(("other sandboxes", rest as u64)));
    }
}
