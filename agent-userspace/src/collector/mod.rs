//! An optional second audit sink: every record written to the audit log is also shipped
//! to a collector as RFC 5424 syslog over TCP with octet-counting framing (RFC 6587), e.g.
//! to rsyslog's `imtcp` or a SIEM's syslog input.
//!
//! The audit log stays the record of truth: the writer hands each line it wrote to a
//! bounded queue and never waits for the collector. A task sends the queue in order,
//! reconnecting (with back-off) when the connection fails or the collector stops reading;
//! the message being sent when it failed is sent again, after those written before it
//! that the collector had not acknowledged (a reset discards TCP's send queue), so a
//! collector may see a record twice (same `event.sequence`) but, short of the queue
//! overflowing, not lose one. When the queue is full, records are
//! dropped and counted (so are messages past [`MAX_UNACKED`] a failed connection took
//! unacknowledged, which a reconnection cannot send again), and the next message the collector gets is a
//! `collector-lost` record with the count and the sequence range, so a gap is explained
//! while the daemon runs. The queue is in memory: what it holds when the daemon dies (or
//! stops with the collector away past the flush's 2 s) leaves gaps no record explains; the
//! audit log has them.

#[cfg(test)]
mod tests;

use std::{
    net::SocketAddr,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use serde::Deserialize;
use time::OffsetDateTime;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::mpsc};

use crate::audit::{format_timestamp, ECS_VERSION, PRODUCT, VERSION};

/// `collector:` in the daemon config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// The collector's syslog TCP input, `address:port`.
    pub syslog_tcp: SocketAddr,
    /// Records held while the collector is slow or unreachable; beyond this they are
    /// dropped and reported in a `collector-lost` record (default 10000).
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_queue() -> usize {
    10_000
}

/// syslog facility 13 (log audit), severity 6 (informational).
/// A write the collector does not take within this long forces a new connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many unacknowledged messages are kept to send again.
const MAX_UNACKED: usize = 16_384;

const PRI: u8 = 13 * 8 + 6;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Records dropped because the queue was full, or written but forgotten before the
/// collector acknowledged them, not yet reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Lost {
    count: u64,
    first: u64,
    last: u64,
}

impl Lost {
    /// Counts one more, `first` and `last` the lowest and highest numbers seen (records
    /// forgotten unacknowledged are older than those the queue dropped meanwhile).
    fn add(&mut self, sequence: u64) {
        if self.count == 0 {
            (self.first, self.last) = (sequence, sequence);
        }
        self.count += 1;
        self.first = self.first.min(sequence);
        self.last = self.last.max(sequence);
    }

    fn merge(&mut self, other: Self) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other;
            return;
        }
        self.count += other.count;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

/// A record's `event.sequence`; `None` for a line without one (the `collector-lost`
/// records this sink makes). Only on rare paths is a line read again, for its number.
fn sequence_of(json: &[u8]) -> Option<u64> {
    serde_json::from_slice::<SequenceOnly>(json)
        .ok()
        .map(|r| r.event.sequence)
}

/// What losing the record `json` loses: the record itself, or, for a `collector-lost`
/// record of this sink's own (no `event.sequence`), the records it counted.
fn carried(json: &[u8]) -> Lost {
    if let Some(sequence) = sequence_of(json) {
        let mut lost = Lost::default();
        lost.add(sequence);
        return lost;
    }
    serde_json::from_slice::<LostOnly>(json)
        .map(|r| Lost {
            count: r.egress.lost.count,
            first: r.egress.lost.first_sequence,
            last: r.egress.lost.last_sequence,
        })
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct LostOnly {
    egress: LostEgress,
}

#[derive(Deserialize)]
struct LostEgress {
    lost: LostCounts,
}

#[derive(Deserialize)]
struct LostCounts {
    count: u64,
    first_sequence: u64,
    last_sequence: u64,
}

/// Counts `lost`, for the next `collector-lost` record.
fn count_lost(lost: Lost) {
    if let Some(sink) = SINK.get() {
        sink.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .merge(lost);
    }
}

/// The record a framed message carries: what follows its eighth space, the octet count
/// included (see [`frame`]).
fn framed_json(msg: &[u8]) -> &[u8] {
    msg.splitn(9, |&b| b == b' ').nth(8).unwrap_or_default()
}

struct Sink {
    tx: mpsc::Sender<Vec<u8>>,
    lost: Mutex<Lost>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Starts shipping to the collector (once per process); returns the task to spawn.
pub fn start(config: &CollectorConfig) -> Option<impl std::future::Future<Output = ()>> {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    SINK.set(Sink {
        tx,
        lost: Mutex::new(Lost::default()),
    })
    .ok()?;
    Some(run(config.syslog_tcp, rx))
}

/// Queues one line the audit writer wrote (called by the writer). Never blocks.
pub fn forward(line: &[u8]) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let line = line.trim_ascii();
    if sink.tx.try_send(line.to_vec()).is_err() {
        let mut lost = Lost::default();
        lost.add(sequence_of(line).unwrap_or(0));
        count_lost(lost);
    }
}

#[derive(Deserialize)]
struct SequenceOnly {
    event: EventSequence,
}

#[derive(Deserialize)]
struct EventSequence {
    sequence: u64,
}

/// Waits (at most `limit`) until the queue is empty, e.g. before the daemon exits.
pub async fn flush(limit: Duration) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let deadline = tokio::time::Instant::now() + limit;
    while sink.tx.capacity() < sink.tx.max_capacity() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if sink.tx.capacity() < sink.tx.max_capacity() {
        tracing::warn!(
            queued = sink.tx.max_capacity() - sink.tx.capacity(),
            "Stopping with audit records not yet sent to the collector (they are in the audit log)"
        );
    }
}

fn take_lost() -> Option<Lost> {
    let sink = SINK.get()?;
    let mut lost = sink.lost.lock().unwrap_or_else(|p| p.into_inner());
    (lost.count > 0).then(|| std::mem::take(&mut *lost))
}

/// `LEN SP <PRI>1 TIMESTAMP HOSTNAME APP PROCID MSGID SD MSG`: one octet-counted RFC 5424
/// message carrying `json` as its MSG.
fn frame(json: &[u8], hostname: &str, now: OffsetDateTime) -> Vec<u8> {
    let ts = format_timestamp(now, "syslog", "timestamp").unwrap_or_else(|_| "-".into());
    let head = format!(
        "<{PRI}>1 {ts} {hostname} {PRODUCT} {} audit - ",
        std::process::id()
    );
    let len = head.len() + json.len();
    let mut out = format!("{len} {head}").into_bytes();
    out.extend_from_slice(json);
    out
}

/// The record sent in place of records the queue could not hold.
fn lost_record(lost: Lost, now: OffsetDateTime) -> Vec<u8> {
    let ts = format_timestamp(now, "collector-lost", "@timestamp").unwrap_or_default();
    serde_json::json!({
        "@timestamp": ts,
        "ecs": {"version": ECS_VERSION},
        "event": {
            "kind": "event",
            "category": ["network"],
            "type": ["error"],
            "action": "collector-lost",
            "outcome": "failure",
            "reason": "the collector queue was full, or the connection failed with more records unacknowledged than are kept to send again; these records are in the audit log only",
        },
        "observer": {"product": PRODUCT, "version": VERSION},
        "egress": {"lost": {"count": lost.count, "first_sequence": lost.first, "last_sequence": lost.last}},
    })
    .to_string()
    .into_bytes()
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]);
    // RFC 5424 HOSTNAME: printable US-ASCII without spaces, or `-`.
    if rc != 0 || name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        "-".into()
    } else {
        name.into_owned()
    }
}

async fn run(addr: SocketAddr, mut rx: mpsc::Receiver<Vec<u8>>) {
    let host = hostname();
    let mut backoff = BACKOFF_MIN;
    // Messages to send before the queue: those taken but not known to be received.
    let mut pending: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    // Messages written to the connection that the collector has not yet acknowledged
    // (the kernel's send queue): a reset loses them, so they go again on the next one.
    let mut unacked = Unacked::default();
    loop {
        let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%addr, error = %e, "Cannot reach the audit collector; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(_) => {
                tracing::warn!(%addr, "Connecting to the audit collector timed out; retrying");
                continue;
            }
        };
        tracing::info!(%addr, "Shipping audit records to the collector");
        backoff = BACKOFF_MIN;
        loop {
            let msg = match pending.pop_front() {
                Some(m) => m,
                None => match take_lost() {
                    Some(lost) => frame(
                        &lost_record(lost, OffsetDateTime::now_utc()),
                        &host,
                        OffsetDateTime::now_utc(),
                    ),
                    None => match rx.recv().await {
                        Some(json) => frame(&json, &host, OffsetDateTime::now_utc()),
                        None => return,
                    },
                },
            };
            // What the collector acknowledged meanwhile (an idle connection's last
            // messages) is not sent again, nor counted lost, should it fail now.
            unacked.acknowledge(unsent_bytes(&stream));
            // The collector never talks back: anything readable is its end closing. A
            // write into a connection already closed would be lost without an error.
            let closed = match stream.try_read(&mut [0u8; 1]) {
                Ok(_) => true,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            let failed = if closed {
                Some("the audit collector closed the connection".to_owned())
            } else {
                match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&msg)).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("sending to the audit collector failed: {e}")),
                    Err(_) => Some(format!(
                        "the audit collector read nothing for {} s",
                        WRITE_TIMEOUT.as_secs()
                    )),
                }
            };
            if let Some(why) = failed {
                tracing::warn!(%addr, %why, resent = unacked.len(), "Reconnecting to the audit collector");
                // What it may not have received goes first, then this message; what was
                // forgotten unacknowledged is counted lost.
                let (mut again, forgotten) = unacked.take();
                count_lost(forgotten);
                again.push_back(msg);
                again.append(&mut pending);
                pending = again;
                break;
            }
            unacked.push(msg, unsent_bytes(&stream));
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Bytes written to `stream` that its peer has not acknowledged (`SIOCOUTQ`); unknown is
/// taken as everything.
fn unsent_bytes(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd as _;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
    if rc == 0 {
        usize::try_from(outq).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    }
}

/// The last messages written, as many as cover the bytes not yet acknowledged.
#[derive(Default)]
struct Unacked {
    messages: std::collections::VecDeque<Vec<u8>>,
    bytes: usize,
    /// Records forgotten past the cap before the peer acknowledged them: lost if the
    /// connection fails before it does.
    forgotten: Lost,
}

impl Unacked {
    /// Adds `msg`, just written, and forgets the oldest messages the peer has
    /// acknowledged, given `outstanding` bytes still unacknowledged; past the cap, the
    /// oldest are forgotten anyway, and counted until an acknowledgement covers them.
    fn push(&mut self, msg: Vec<u8>, outstanding: usize) {
        self.bytes += msg.len();
        self.messages.push_back(msg);
        self.acknowledge(outstanding);
    }

    /// Forgets the oldest messages the peer has acknowledged, given `outstanding` bytes
    /// still unacknowledged; past the cap, the oldest are forgotten anyway, and counted
    /// until an acknowledgement covers them.
    fn acknowledge(&mut self, outstanding: usize) {
        // TCP acknowledges in order: when what is kept covers all that is outstanding,
        // those forgotten before were received.
        if outstanding <= self.bytes {
            self.forgotten = Lost::default();
        }
        while let Some(front) = self.messages.front().map(Vec::len) {
            let acknowledged = self.bytes - front >= outstanding;
            if !acknowledged && self.messages.len() <= MAX_UNACKED {
                break;
            }
            self.bytes -= front;
            let Some(gone) = self.messages.pop_front() else {
                break;
            };
            if !acknowledged {
                self.forgotten.merge(carried(framed_json(&gone)));
            }
        }
    }

    fn len(&self) -> usize {
        self.messages.len()
    }

    /// The messages to send again after a failure, and those forgotten unacknowledged.
    fn take(&mut self) -> (std::collections::VecDeque<Vec<u8>>, Lost) {
        self.bytes = 0;
        (
            std::mem::take(&mut self.messages),
            std::mem::take(&mut self.forgotten),
        )
    }
}
