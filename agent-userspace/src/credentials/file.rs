//! `file` sources: the secret is kept in memory and the file is looked at again at most
//! once per [`CHECK_INTERVAL`], so a request costs no file system access (and no hop to
//! tokio's blocking pool) while a rotated file still takes effect within about a second.
//!
//! A check is one `stat(2)`: the file is read again only when its device, inode, size,
//! mtime or ctime changed (a rename over it, a rewrite in place, a Kubernetes secret's
//! symlink swap). Timestamps are coarse, so a rewrite of the same size within the same
//! clock tick as the previous read would keep its stamp; a file read less than
//! [`RACY_WINDOW`] after it last changed is therefore read again at the next check,
//! whatever its stamp says (git's "racily clean" rule).
//!
//! Failures are not cached: a missing or invalid file fails every request, read each time,
//! until it is fixed.

use std::fs::{File, Metadata};
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use zeroize::Zeroizing;

use super::error::CredentialError;
use super::secret::Secret;

/// How long a value read from a file is used before the file is checked again: the
/// longest a rotated file can go unnoticed.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A file changed less than this before it was read may change again without its stamp
/// showing it, so it is read again at the next check.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What identifies one version of a file, as `stat(2)` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file changed so shortly before `now` that a further change might not
    /// show in its stamp (or its times are in the future).
    fn is_racy(&self, now: SystemTime) -> bool {
        let nanos = |(secs, nsec): (i64, i64)| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        let changed = nanos(self.mtime).max(nanos(self.ctime));
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        now.saturating_sub(changed) < i128::try_from(RACY_WINDOW.as_nanos()).unwrap_or(0)
    }
}

struct Cached {
    value: Arc<Secret>,
    stamp: Stamp,
    /// Read again at the next check even if the stamp is unchanged.
    racy: bool,
    checked: Instant,
}

/// What a check found.
enum Fetched {
    /// Same stamp as the cached value's.
    Unchanged,
    /// The file's bytes (at most `limit + 1` of them) and stamp.
    Read {
        stamp: Stamp,
        racy: bool,
        bytes: Zeroizing<Vec<u8>>,
    },
}

/// A secret file and the value last read from it.
pub(super) struct FileSource {
    path: PathBuf,
    check_every: Duration,
    cached: Mutex<Option<Cached>>,
    /// Held across a check, so that concurrent callers wait for one check and share it.
    refresh: tokio::sync::Mutex<()>,
    /// Checks, and reads of the file, so far.
    #[cfg(test)]
    counts: Mutex<(usize, usize)>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("File").field(&self.path).finish()
    }
}

impl FileSource {
    pub(super) fn new(path: PathBuf) -> Self {
        Self {
            path,
            check_every: CHECK_INTERVAL,
            cached: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
            #[cfg(test)]
            counts: Mutex::new((0, 0)),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Test hook: check the file more (or less) often.
    #[cfg(test)]
    pub(super) fn set_check_interval(&mut self, every: Duration) {
        self.check_every = every;
    }

    /// Test hook: how many times the file was checked, and read, so far.
    #[cfg(test)]
    pub(super) fn counts(&self) -> (usize, usize) {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value, from memory when the file was checked less than the interval ago.
    /// `decode` turns the file's bytes (at most `limit + 1` read) into the secret, or
    /// says why they are not one; `read_err` names an I/O failure.
    pub(super) async fn value(
        &self,
        limit: u64,
        decode: impl FnOnce(Zeroizing<Vec<u8>>) -> Result<Secret, CredentialError>,
        read_err: impl FnOnce(io::Error) -> CredentialError,
    ) -> Result<Arc<Secret>, CredentialError> {
        if let Some(value) = self.fresh() {
            return Ok(value);
        }
        let _checking = self.refresh.lock().await;
        // Another caller may have checked while this one waited.
        if let Some(value) = self.fresh() {
            return Ok(value);
        }
        let previous = self.lock().as_ref().map(|c| (c.stamp, c.racy));
        let path = self.path.clone();
        let fetched = tokio::task::spawn_blocking(move || fetch(&path, previous, limit))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("reading task failed: {e}"))));
        #[cfg(test)]
        {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            counts.0 += 1;
            counts.1 += usize::from(matches!(fetched, Ok(Fetched::Read { .. })));
        }
        let mut cached = self.lock();
        let (stamp, racy, bytes) = match fetched {
            Ok(Fetched::Unchanged) => {
                if let Some(c) = cached.as_mut() {
                    c.checked = Instant::now();
                    return Ok(c.value.clone());
                }
                // Not reached: `Unchanged` needs a cached stamp, which only this
                // function (holding `refresh`) removes. Read again next time.
                return Err(read_err(io::Error::other("cached value vanished")));
            }
            Ok(Fetched::Read { stamp, racy, bytes }) => (stamp, racy, bytes),
            Err(e) => {
                *cached = None;
                return Err(read_err(e));
            }
        };
        match decode(bytes) {
            Ok(secret) => {
                let value = Arc::new(secret);
                *cached = Some(Cached {
                    value: value.clone(),
                    stamp,
                    racy,
                    checked: Instant::now(),
                });
                Ok(value)
            }
            Err(e) => {
                *cached = None;
                Err(e)
            }
        }
    }

    fn fresh(&self) -> Option<Arc<Secret>> {
        let cached = self.lock();
        let c = cached.as_ref()?;
        (c.checked.elapsed() < self.check_every).then(|| c.value.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        // The guarded data is replaced whole, never left half-updated.
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// On a blocking-pool thread: `Unchanged` when the file still has `previous`'s stamp
/// (and was not racy), else its stamp and contents, the stamp taken before reading so
/// that a change during the read shows at the next check.
fn fetch(path: &Path, previous: Option<(Stamp, bool)>, limit: u64) -> io::Result<Fetched> {
    if let Some((stamp, false)) = previous {
        if Stamp::of(&std::fs::metadata(path)?) == stamp {
            return Ok(Fetched::Unchanged);
        }
    }
    let file = File::open(path)?;
    let stamp = Stamp::of(&file.metadata()?);
    let racy = stamp.is_racy(SystemTime::now());
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok(Fetched::Read { stamp, racy, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_changes_are_racy() {
        let stamp = |secs: i64| Stamp {
            dev: 1,
            ino: 2,
            len: 3,
            mtime: (secs, 0),
            ctime: (secs, 500),
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(stamp(1_000).is_racy(now));
        assert!(stamp(999).is_racy(now));
        assert!(stamp(5_000).is_racy(now), "in the future");
        assert!(!stamp(997).is_racy(now));
    }
}
