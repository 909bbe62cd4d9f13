//! The memory that reads of request bodies hold while the proxy judges them (a form or
//! JSON body read whole for a method override, a push's command list): charged by the
//! byte of buffer to the sandbox's share and to the daemon's budget, so that one
//! sandbox cannot grow the daemon or take the room of others.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

/// Bytes of request bodies the whole daemon holds while reading them to judge them, over
/// every sandbox: past it, a body to be read is refused with 503 instead of the daemon
/// growing.
pub const MAX_HELD_BYTES: usize = 256 << 20;

/// Bytes of such bodies one sandbox holds at most, over all its connections and streams,
/// so that one sandbox cannot take the whole budget from the others.
pub const MAX_HELD_PER_SANDBOX: usize = MAX_HELD_BYTES / 8;

/// What the reads of [`check_body`] hold, in bytes of buffer.
static HELD: Semaphore = Semaphore::const_new(MAX_HELD_BYTES);

/// The buffer room one read holds, charged to its sandbox's share and to the daemon's
/// budget; given back when dropped.
pub(super) struct Held<'s> {
    sandbox: &'s Arc<Semaphore>,
    permits: Option<(OwnedSemaphorePermit, SemaphorePermit<'static>)>,
}

/// The budget a body read whole still holds while it is forwarded: given back when the
/// request body sent upstream is dropped.
#[derive(Debug)]
pub struct HeldBody {
    _sandbox: OwnedSemaphorePermit,
    _daemon: SemaphorePermit<'static>,
}

impl HeldBody {
    /// `bytes` holding this budget until the last of them is dropped, by whatever writes
    /// them upstream (not when they are handed on: a writer may queue them).
    pub fn tie(self, bytes: Bytes) -> Bytes {
        Bytes::from_owner(Tied { bytes, _held: self })
    }
}

/// Bytes and the budget they hold.
struct Tied {
    bytes: Bytes,
    _held: HeldBody,
}

impl AsRef<[u8]> for Tied {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Which budget a read found spent.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Spent {
    Sandbox,
    Daemon,
}

impl<'s> Held<'s> {
    pub(super) fn new(sandbox: &'s Arc<Semaphore>) -> Self {
        Self {
            sandbox,
            permits: None,
        }
    }

    /// What the read holds, to be kept while its bytes are.
    pub(super) fn into_body(self) -> Option<HeldBody> {
        self.permits.map(|(sandbox, daemon)| HeldBody {
            _sandbox: sandbox,
            _daemon: daemon,
        })
    }

    pub(super) fn bytes(&self) -> usize {
        self.permits.as_ref().map_or(0, |(p, _)| p.num_permits())
    }

    /// Holds `total` bytes in all (the buffer's capacity, not just what it holds: each
    /// byte of room counts, however small the pieces that filled it).
    pub(super) fn grow_to(&mut self, total: usize) -> Result<(), Spent> {
        let more = total.saturating_sub(self.bytes());
        if more == 0 {
            return Ok(());
        }
        let more32 = u32::try_from(more).map_err(|_| Spent::Sandbox)?;
        let mine = self
            .sandbox
            .clone()
            .try_acquire_many_owned(more32)
            .map_err(|_| Spent::Sandbox)?;
        let daemon = HELD.try_acquire_many(more32).map_err(|_| Spent::Daemon)?;
        match self.permits.as_mut() {
            Some((m, d)) => {
                m.merge(mine);
                d.merge(daemon);
            }
            None => self.permits = Some((mine, daemon)),
        }
        Ok(())
    }
}

/// A sandbox's share of the bytes held by reads of request bodies to judge them.
pub fn sandbox_share() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_HELD_PER_SANDBOX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sandbox filling its share of the bytes held for body reads leaves the others
    /// theirs; the charge is the buffer's bytes, however small the pieces (a piece of 256
    /// bytes is not charged as a KiB); and the room comes back when a read ends.
    #[test]
    #[expect(clippy::unwrap_used, reason = "tests fail loudly")]
    fn a_sandbox_holds_only_its_share_of_read_bodies() {
        let (greedy, other) = (sandbox_share(), sandbox_share());
        let mut reads: Vec<Held<'_>> = Vec::new();
        let mut filled = 0;
        while filled + (1 << 20) <= MAX_HELD_PER_SANDBOX {
            let mut read = Held::new(&greedy);
            read.grow_to(1 << 20).unwrap();
            reads.push(read);
            filled += 1 << 20;
        }
        let mut one_more = Held::new(&greedy);
        assert_eq!(one_more.grow_to(1), Err(Spent::Sandbox));
        let mut theirs = Held::new(&other);
        theirs.grow_to(1 << 20).unwrap();
        // Charged by the byte.
        let mut small = Held::new(&other);
        small.grow_to(256).unwrap();
        small.grow_to(512).unwrap();
        assert_eq!(small.bytes(), 512);
        assert_eq!(
            other.available_permits(),
            MAX_HELD_PER_SANDBOX - (1 << 20) - 512
        );
        drop(reads);
        assert_eq!(greedy.available_permits(), MAX_HELD_PER_SANDBOX);
        one_more.grow_to(1).unwrap();
        // A body read whole keeps its share while it is forwarded, not just while read.
        let kept = small.into_body();
        assert_eq!(
            other.available_permits(),
            MAX_HELD_PER_SANDBOX - (1 << 20) - 512
        );
        drop(kept);
        drop(theirs);
        assert_eq!(other.available_permits(), MAX_HELD_PER_SANDBOX);
    }
}
