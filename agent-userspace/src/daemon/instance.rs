//! One daemon per state directory and per directory of pinned objects. A second `egressd
//! run` beside a running one would take over its control socket, number audit records the
//! first one numbers too, and load, pin and detach the same programs: it is refused
//! before it changes anything.
//!
//! Each claim is an exclusive `flock` held until the process has stopped (the kernel
//! drops it when the process ends, however it ends): on `<state_dir>/egressd.lock`, which
//! also holds the holder's pid for the message, and on the bpffs directory itself. The
//! control socket's path is checked too: a socket another daemon answers on, or a file
//! that is not a socket, is refused (see [`crate::control::check_free`]).

use std::{
    fs::{DirBuilder, File},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::{fd::AsRawFd, unix::fs::DirBuilderExt as _},
    path::Path,
};

use anyhow::{bail, Context as _};

const LOCK_FILE: &str = "egressd.lock";

/// Held while the daemon runs; dropping it (or the process ending) releases the claims.
#[derive(Debug)]
pub struct InstanceLock {
    _state: File,
    _bpffs: Option<File>,
}

/// Claims what `opts` names for this process (mounting bpffs and making its directory if
/// need be), or says which daemon holds it. To be held until the process has stopped.
pub fn claim_for(opts: &super::DaemonOptions) -> anyhow::Result<InstanceLock> {
    crate::bpf::ensure_bpffs(&opts.bpffs)?;
    // On bpffs, which lives in memory: gone after every boot.
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.bpffs)
        .with_context(|| format!("creating {}", opts.bpffs.display()))?;
    let lock = claim(&opts.state_dir, &opts.bpffs)?;
    crate::control::check_free(&opts.socket)
        .with_context(|| format!("control socket {}", opts.socket.display()))?;
    Ok(lock)
}

/// Claims `state_dir` and `bpffs` (which must exist) for this process, or says which
/// daemon holds them.
fn claim(state_dir: &Path, bpffs: &Path) -> anyhow::Result<InstanceLock> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let path = state_dir.join(LOCK_FILE);
    let mut state =
        crate::own_file::open_rw(&path).with_context(|| format!("opening {}", path.display()))?;
    if !try_lock(&state).with_context(|| format!("locking {}", path.display()))? {
        let mut pid = String::new();
        let _ = state.read_to_string(&mut pid);
        let pid = pid.trim();
        bail!(
            "another egressd{} is running with state directory {}: stop it first \
             (`systemctl stop egressd`), or give this one its own --state-dir, --bpffs and \
             --socket",
            if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            },
            state_dir.display()
        );
    }
    state.set_len(0)?;
    state.seek(SeekFrom::Start(0))?;
    writeln!(state, "{}", std::process::id())?;

    // The pins are shared by whatever daemon points at them, whatever its state directory.
    let dir = File::open(bpffs).with_context(|| format!("opening {}", bpffs.display()))?;
    let bpffs_lock = match try_lock(&dir) {
        Ok(true) => Some(dir),
        Ok(false) => bail!(
            "another egressd holds the pinned programs under {}: stop it first, or give this \
             one its own --bpffs",
            bpffs.display()
        ),
        // A filesystem that cannot lock a directory: the state directory's claim stands.
        Err(e) => {
            tracing::debug!(error = %e, dir = %bpffs.display(), "Cannot lock the bpffs directory");
            None
        }
    };
    Ok(InstanceLock {
        _state: state,
        _bpffs: bpffs_lock,
    })
}

/// `Ok(false)` if another open file holds the lock.
fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor this function borrows for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_is_refused_until_the_first_ends() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let pins = dir.path().join("pins");
        std::fs::create_dir(&pins).unwrap();
        let first = claim(&state, &pins).unwrap();
        let held = std::fs::read_to_string(state.join(LOCK_FILE)).unwrap();
        assert_eq!(held.trim(), std::process::id().to_string());

        // flock claims belong to open files: a second open in this process conflicts as
        // another process's would.
        let err = claim(&state, &pins).unwrap_err().to_string();
        assert!(err.contains("another egressd"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );

        // Another state directory, the same pins.
        let err = claim(&dir.path().join("other"), &pins)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pinned programs"), "{err}");

        drop(first);
        let again = claim(&state, &pins).unwrap();
        drop(again);
    }
}
