//! One server per database: an exclusive lock on a file beside it, `<db>-lock`.
//!
//! Why: a hubbub trusts that its store thread is the only writer of its database. Resends are
//! recognised from ids kept in that thread's memory (see `resend.rs`), and a hub routes only the
//! messages its own loop received. A second server started on the same file — another port, a
//! forgotten terminal, a service manager that restarts too eagerly — would store a resent message
//! twice and would never deliver live what the other one stored. SQLite's own locks cannot stop
//! it: they guard one transaction at a time, not who serves the file.
//!
//! What it owns: the lock file, the lock on it (held for as long as the store runs, released by
//! the kernel when the process ends however it ends, so a crash leaves no stale lock to clear by
//! hand), and the holder's process id written in it for the error the next server reports.
//!
//! What it must not do: lock the database file itself. SQLite keeps POSIX locks on that file, and
//! closing any other handle to it in this process would drop them. Nor stop a server on a file
//! system that cannot lock at all: that is warned about and served, as before this existed.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, ErrorKind, Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::{beside, StoreError};

/// Held by the store for as long as it runs; dropping it releases the database to another server.
pub(super) struct Ownership {
    /// None where the file system could not lock (warned about when claimed).
    _lock: Option<File>,
}

/// `<db>-lock`, beside SQLite's `<db>-wal` and the index's `<db>-index`.
pub fn lock_path(db_path: &Path) -> PathBuf {
    beside(db_path, "-lock")
}

/// The database's real path, symbolic links resolved, as SQLite resolves them to name its WAL: two
/// paths to one file must lock one lock file. A file not created yet resolves through its directory.
fn real_path(db_path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(db_path) {
        return real;
    }
    let parent = match db_path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(parent), db_path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => db_path.to_path_buf(),
    }
}

/// Takes the database for this process, or says which server already has it. Never waits: the
/// other server may run for months.
pub(super) fn claim(db_path: &Path) -> Result<Ownership, StoreError> {
    let path = lock_path(&real_path(db_path));
    let (mut file, writable) = match open_lock_file(&path) {
        Ok(opened) => opened,
        // No directory: SQLite reports that in its own words a moment later.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Ownership { _lock: None }),
        Err(e) => return Ok(unguarded(&path, &e.to_string())),
    };
    match file.try_lock() {
        Ok(()) => {
            if writable {
                write_holder(&mut file);
            }
            Ok(Ownership { _lock: Some(file) })
        }
        Err(TryLockError::WouldBlock) => Err(StoreError::InUse {
            path: db_path.to_path_buf(),
            holder: read_holder(&mut file),
        }),
        Err(TryLockError::Error(e)) => Ok(unguarded(&path, &e.to_string())),
    }
}

/// Opens (creating it if needed) the lock file, and says whether it could be opened for writing. A
/// lock file left by a server of another user (root, a service account) may be read-only to this
/// one: the lock works on it all the same, only the pid is not written.
fn open_lock_file(path: &Path) -> io::Result<(File, bool)> {
    let writable = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path);
    match writable {
        Ok(file) => Ok((file, true)),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            Ok((OpenOptions::new().read(true).open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

fn unguarded(path: &Path, reason: &str) -> Ownership {
    log::warn!(
        "cannot lock {}: {reason}; nothing stops a second server on this database",
        path.display()
    );
    Ownership { _lock: None }
}

/// Best effort: the pid only makes the next server's error more helpful.
fn write_holder(file: &mut File) {
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    if let Err(e) = written {
        log::debug!("cannot write this server's pid into its lock file: {e}");
    }
}

/// The pid the holder wrote, if it wrote one we can read.
fn read_holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    // The holder's pid is a few digits; anything longer was not written by a hubbub.
    Read::by_ref(file).take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}
