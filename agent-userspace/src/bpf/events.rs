//! Reads decision events from the pinned ring buffer. The buffer outlives the daemon, so
//! events from while it was down are read when it comes back.
//!
//! The kernel programs submit events without waking the reader, and force a wake-up only
//! when unread data grows past another multiple of 64 KiB (see `submit_flags` in the eBPF
//! crate): a wake-up per event would cost several times the decision itself. The reader
//! therefore also polls every [`POLL_INTERVAL`], which bounds how late a record is.
use std::{io, os::fd::AsRawFd, time::Duration};

use agent_common::{event_kind, ConnectEvent, ABI_VERSION};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::{BpfError, Programs};

/// A decoded kernel event.
#[derive(Clone, Debug)]
pub enum KernelEvent {
    Connect(ConnectEvent),
    /// An entry this build cannot decode (other ABI version or kind): counted, not dropped
    /// silently.
    Unknown {
        version: u16,
        kind: u16,
        len: usize,
    },
}

/// How often the reader looks for events submitted without a wake-up. Records reach the
/// audit log at most this late (plus the writer's own batching).
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Consumes the events left in another build's pinned ring buffer (`maps`: that build's
/// maps directory) and returns how many there were: what its programs recorded and no
/// daemon read, before that build's pins are removed. (Another ABI version's events are
/// not decoded: their layout is that build's.)
pub fn consume_unread(maps: &std::path::Path) -> Result<u64, BpfError> {
    let data = MapData::from_pin(maps.join("EVENTS")).map_err(|e| BpfError::map("EVENTS", e))?;
    let mut ring =
        RingBuf::try_from(aya::maps::Map::RingBuf(data)).map_err(|e| BpfError::map("EVENTS", e))?;
    let mut unread = 0;
    while ring.next().is_some() {
        unread += 1;
    }
    Ok(unread)
}

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    pub fn new(programs: &mut Programs) -> Result<Self, BpfError> {
        let map = programs
            .ebpf
            .take_map("EVENTS")
            .ok_or(BpfError::MissingMap("EVENTS"))?;
        let ring = RingBuf::try_from(map).map_err(|e| BpfError::map("EVENTS", e))?;
        let fd = ring.as_raw_fd();
        // SAFETY: the ring buffer owns the fd and lives as long as the AsyncFd that wraps it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| {
                BpfError::io("registering ring buffer fd", format!("fd {fd}"), e.into())
            })?;
        Ok(Self { ring })
    }

    /// Waits for events and returns everything available (at least one event): woken by
    /// the kernel past its threshold, or finding them on the next poll.
    pub async fn next_batch(&mut self) -> io::Result<Vec<KernelEvent>> {
        loop {
            let out = self.drain_now();
            if !out.is_empty() {
                return Ok(out);
            }
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    let ring = guard.get_inner_mut();
                    let mut out = Vec::new();
                    while let Some(item) = ring.next() {
                        out.push(decode(&item));
                    }
                    guard.clear_ready();
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }

    /// A probe of how full the ring buffer is, usable from other threads.
    pub fn usage_probe(&self) -> Result<super::RingUsageProbe, BpfError> {
        super::RingUsageProbe::new(std::os::fd::AsFd::as_fd(self.ring.get_ref()))
    }

    /// Drains what is buffered now without waiting.
    pub fn drain_now(&mut self) -> Vec<KernelEvent> {
        let ring = self.ring.get_mut();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            out.push(decode(&item));
        }
        out
    }
}

fn decode(bytes: &[u8]) -> KernelEvent {
    let read_u16 = |off: usize| {
        bytes
            .get(off..off + 2)
            .map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let (version, kind) = (read_u16(0), read_u16(2));
    if u32::from(version) == ABI_VERSION
        && kind == event_kind::CONNECT
        && bytes.len() >= size_of::<ConnectEvent>()
    {
        // SAFETY: length checked; ConnectEvent is plain old data; read_unaligned makes no
        // alignment assumption about the ring buffer slot.
        let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnectEvent>()) };
        return KernelEvent::Connect(ev);
    }
    KernelEvent::Unknown {
        version,
        kind,
        len: bytes.len(),
    }
}
