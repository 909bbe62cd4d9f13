//! Files of the daemon's own beside its state (the audit sequence, the instance lock):
//! readable and writable by root only, and never opened through a symbolic link someone
//! put in their place.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// Opens `path` for reading and writing, creating it with mode 0600 if missing, keeping
/// what it holds.
pub fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}
