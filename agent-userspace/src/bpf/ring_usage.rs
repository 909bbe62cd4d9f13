//! How full the event ring buffer is, read from its consumer and producer positions.
//!
//! aya's `RingBuf` keeps both positions private, so this maps the two position pages
//! again, read-only: the kernel lays a BPF ring buffer out as one consumer page, one
//! producer page, then the data pages (`kernel/bpf/ringbuf.c`), and allows read-only
//! mappings of any of them. The difference of the positions is what the kernel has
//! written and the daemon not yet consumed.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;

use super::BpfError;

/// A read-only view of a ring buffer's positions; cheap to read from any thread.
pub struct RingUsageProbe {
    consumer: NonNull<libc::c_void>,
    producer: NonNull<libc::c_void>,
    page: usize,
    capacity: u64,
}

// SAFETY: the mappings are read-only and only read with atomic loads; the kernel is the
// only writer of the producer page and the daemon's reader of the consumer page.
unsafe impl Send for RingUsageProbe {}
// SAFETY: as above; `used_bytes` takes `&self` and only loads.
unsafe impl Sync for RingUsageProbe {}

impl RingUsageProbe {
    /// Maps the positions of the ring buffer map behind `fd`.
    pub fn new(fd: BorrowedFd<'_>) -> Result<Self, BpfError> {
        let owned = fd
            .try_clone_to_owned()
            .map_err(|e| BpfError::io("duplicating ring buffer fd", "EVENTS", e))?;
        let info = MapData::from_fd(owned)
            .and_then(|m| m.info())
            .map_err(|e| BpfError::map("EVENTS", e))?;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| BpfError::Other("page size unknown".into()))?;
        let consumer = map_page(fd, 0, page)?;
        let producer = match map_page(fd, page, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: `consumer` was mapped above with this length and is unused.
                unsafe { libc::munmap(consumer.as_ptr(), page) };
                return Err(e);
            }
        };
        Ok(Self {
            consumer,
            producer,
            page,
            capacity: u64::from(info.max_entries()),
        })
    }

    /// Bytes written by the kernel (records and their headers) not yet consumed.
    pub fn used_bytes(&self) -> u64 {
        // The positions are `unsigned long` at the start of each page, written by the
        // kernel and the consumer with release stores.
        // SAFETY: both pointers are page-aligned mappings of at least 8 readable bytes
        // that live as long as `self`.
        let (consumer, producer) = unsafe {
            (
                (*self.consumer.as_ptr().cast::<AtomicU64>()).load(Ordering::Acquire),
                (*self.producer.as_ptr().cast::<AtomicU64>()).load(Ordering::Acquire),
            )
        };
        producer.wrapping_sub(consumer).min(self.capacity)
    }

    /// Size of the data area (the map's `max_entries`).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }
}

impl Drop for RingUsageProbe {
    fn drop(&mut self) {
        // SAFETY: both were mapped by `new` with length `page` and are not used after this.
        unsafe {
            libc::munmap(self.consumer.as_ptr(), self.page);
            libc::munmap(self.producer.as_ptr(), self.page);
        }
    }
}

fn map_page(
    fd: BorrowedFd<'_>,
    offset: usize,
    len: usize,
) -> Result<NonNull<libc::c_void>, BpfError> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| BpfError::Other("ring buffer page offset out of range".into()))?;
    // SAFETY: a fresh shared read-only mapping chosen by the kernel; nothing else is
    // touched.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_fd().as_raw_fd(),
            offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(BpfError::io(
            "mapping ring buffer positions",
            "EVENTS",
            io::Error::last_os_error(),
        ));
    }
    NonNull::new(ptr).ok_or_else(|| BpfError::Other("mmap returned a null mapping".into()))
}
