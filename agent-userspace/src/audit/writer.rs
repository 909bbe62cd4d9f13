//! Appends encoded records to the audit file (or stdout) and numbers them.
//!
//! Each record becomes one buffer ending in `\n` and goes out in a single `write(2)`;
//! only a short write is continued. On a file opened with `O_APPEND` the kernel places
//! every such write whole at the end, so lines from concurrent appenders never interleave.
//! (On a pipe the same holds up to `PIPE_BUF`, 4096 bytes, which every record stays
//! well under.)
//!
//! Sequence numbers belong to the writer, not the caller: a reopened file continues after
//! the `event.sequence` of its last complete record, so a restarted daemon extends the
//! same numbering and a gap always means lost records. One writer per file is assumed.
//! A file that ends in a fragment (a crash mid-write) gets a `\n` in front of the next
//! record, so the fragment stays a line of its own instead of spoiling that record.

use std::{
    fmt,
    fs::{DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::{
        fd::AsFd,
        unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use time::{format_description::well_known::Rfc3339, OffsetDateTime};
use tokio::sync::mpsc;
use tracing::error;

use super::record::{action, EncodeError, Record};

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
    out: File,
    next_sequence: u64,
    tail: Option<LogTail>,
    /// The output ends in a partial line (a crash or a failed write cut it short): the next
    /// record starts with `\n` so it does not get glued onto that fragment.
    torn: bool,
    /// The file looked torn when opened. That may also have been another appender caught
    /// mid-write, so it is checked again right before the first write.
    recheck_torn: bool,
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
                    out: File::from(fd),
                    next_sequence: 1,
                    tail: None,
                    torn: false,
                    recheck_torn: false,
                })
            }
            AuditSink::File(path) => {
                let out = open_append(path)?;
                let scan = scan_tail(&out).map_err(|source| AuditError::ReadTail {
                    path: path.clone(),
                    source,
                })?;
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
                Ok(Self {
                    sink,
                    out,
                    next_sequence,
                    tail,
                    torn: scan.torn,
                    recheck_torn: scan.torn,
                })
            }
        }
    }

    /// Numbers, encodes and appends one record; returns its `event.sequence`.
    ///
    /// A number is used up even when the write fails, so the log shows a gap rather than
    /// two records with one number. An encoding failure is `InvalidData` wrapping an
    /// [`EncodeError`].
    pub fn write(&mut self, record: &Record) -> io::Result<u64> {
        let sequence = self.next_sequence;
        self.next_sequence = sequence.saturating_add(1);
        let mut line = record
            .encode(sequence)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if self.recheck_torn {
            self.recheck_torn = false;
            // If the check fails, a stray blank line is the lesser harm.
            self.torn = ends_mid_line(&self.out).unwrap_or(true);
        }
        if self.torn {
            line.insert(0, b'\n');
        }
        let mut written = 0;
        while written < line.len() {
            match self.out.write(&line[written..]) {
                Ok(0) => {
                    self.torn |= written > 0;
                    crate::metrics::audit_write_failed();
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.torn |= written > 0;
                    crate::metrics::audit_write_failed();
                    return Err(e);
                }
            }
        }
        self.torn = false;
        crate::metrics::audit_written(written);
        crate::collector::forward(sequence, &line);
        Ok(sequence)
    }

    /// Forces written records to stable storage (a no-op for stdout).
    pub fn sync(&mut self) -> io::Result<()> {
        match self.sink {
            AuditSink::File(_) => self.out.sync_data(),
            AuditSink::Stdout => Ok(()),
        }
    }

    /// The number the next record will get.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// The last record the file held when it was opened.
    pub fn tail(&self) -> Option<&LogTail> {
        self.tail.as_ref()
    }

    pub fn sink(&self) -> &AuditSink {
        &self.sink
    }
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
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| AuditError::Open {
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

/// Entry point of the asynchronous API.
#[derive(Debug)]
pub struct AuditLog;

impl AuditLog {
    /// Opens the sink (reading an existing file's last sequence number) and returns the
    /// handle records are sent through and the task that writes them. Spawn
    /// `task.run()`; it finishes once every handle is dropped.
    pub fn open(sink: AuditSink) -> Result<(AuditHandle, AuditTask), AuditError> {
        let writer = AuditWriter::open(sink)?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((AuditHandle { tx }, AuditTask { writer, rx }))
    }
}

/// Cheap to clone; hand one to every component that produces records.
#[derive(Clone, Debug)]
pub struct AuditHandle {
    tx: mpsc::UnboundedSender<Record>,
}

impl AuditHandle {
    /// Queues a record. Never blocks and never drops while the task runs: the queue is
    /// unbounded, so a slow disk costs memory, not audit records. If the task has stopped
    /// (it returns the write error) the record cannot be written and that is logged.
    pub fn emit(&self, record: impl Into<Record>) {
        let record = record.into();
        crate::metrics::observe(&record);
        if let Err(mpsc::error::SendError(record)) = self.tx.send(record) {
            error!(
                action = record.action(),
                "Audit writer has stopped; record not written"
            );
        }
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
/// written, in order, with its own `write(2)`.
const GATHER: Duration = Duration::from_millis(2);

/// Writes queued records in order until every [`AuditHandle`] is gone.
#[derive(Debug)]
pub struct AuditTask {
    writer: AuditWriter,
    rx: mpsc::UnboundedReceiver<Record>,
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

    /// Writes until all handles are dropped, then syncs the file. Writes happen on a
    /// blocking-pool thread so a slow disk never stalls the runtime. The thread takes
    /// everything queued at each wake-up and, after a batch that emptied the queue, waits
    /// a couple of milliseconds for more before it sleeps on the queue again, so that it
    /// is not woken once per record; each record is still one `write(2)`.
    ///
    /// A record that cannot be encoded is logged and skipped (its number stays unused);
    /// an I/O error stops the task and is returned, after which [`AuditHandle::is_closed`]
    /// is true, so the daemon can decide whether to go on without an audit trail.
    pub async fn run(self) -> Result<AuditSummary, AuditError> {
        tokio::task::spawn_blocking(move || self.run_blocking())
            .await
            .map_err(AuditError::Join)?
    }

    fn run_blocking(mut self) -> Result<AuditSummary, AuditError> {
        let mut records = 0;
        let mut batch = Vec::with_capacity(BATCH);
        while self.rx.blocking_recv_many(&mut batch, BATCH) > 0 {
            let full = batch.len() == BATCH;
            for record in batch.drain(..) {
                match self.writer.write(&record) {
                    Ok(_) => records += 1,
                    Err(e) if e.get_ref().is_some_and(|inner| inner.is::<EncodeError>()) => {
                        error!(action = record.action(), error = %e, "Audit record not encodable; skipped");
                    }
                    Err(source) => {
                        let sink = self.writer.sink().clone();
                        error!(%sink, action = record.action(), error = %source, "Audit write failed; audit writer stopping");
                        return Err(AuditError::Write { sink, source });
                    }
                }
            }
            if !full {
                std::thread::sleep(GATHER);
            }
        }
        self.writer.sync().map_err(|source| AuditError::Sync {
            sink: self.writer.sink().clone(),
            source,
        })?;
        Ok(AuditSummary {
            records,
            next_sequence: self.writer.next_sequence(),
        })
    }
}
