//! One runner per data dir: an exclusive lock on `DATA/.atlas/lock`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Why the data dir lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{} is held by another atlas-runner (pid {owner}); stop it first or pick another data dir", path.display())]
    Held {
        /// The lock file.
        path: PathBuf,
        /// What the holder wrote in it (its pid), or `unknown`.
        owner: String,
    },
    /// The lock file could not be opened or written.
    #[error("lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl LockError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Held { .. } => "locked",
            Self::Io { .. } => "io",
        }
    }
}

/// Proof that this process holds a data dir's exclusive lock; released on drop. The pack store
/// takes a reference to one, so nothing touches a data dir without it.
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
    path: PathBuf,
}

/// Where a data dir's lock lives: `DATA/.atlas/lock`.
pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join(super::manifest::RESERVED_DIR).join("lock")
}

/// Takes the exclusive lock at `path` (normally [`lock_path`]), creating the file and its directory,
/// and writes this process's pid in it. Fails at once, naming the holder, when another process has it.
pub fn lock(path: &Path) -> Result<DataDirLock, LockError> {
    let io_err = |source| LockError::Io { path: path.to_owned(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut owner = String::new();
            // Best effort: the holder may be writing it right now.
            let _ = file.read_to_string(&mut owner);
            let owner = if owner.trim().is_empty() { "unknown".to_owned() } else { owner.trim().to_owned() };
            return Err(LockError::Held { path: path.to_owned(), owner });
        }
        Err(TryLockError::Error(source)) => return Err(io_err(source)),
    }
    file.set_len(0).map_err(io_err)?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    write!(file, "{}", std::process::id()).map_err(io_err)?;
    Ok(DataDirLock { file, path: path.to_owned() })
}

impl DataDirLock {
    /// Wraps a lock file this process already holds (the runner takes its lock before it knows
    /// about packs). Re-locking the same open file succeeds; a file locked elsewhere fails.
    pub fn adopt(file: File, path: &Path) -> Result<Self, LockError> {
        match file.try_lock() {
            Ok(()) => Ok(Self { file, path: path.to_owned() }),
            Err(TryLockError::WouldBlock) => {
                Err(LockError::Held { path: path.to_owned(), owner: "unknown".to_owned() })
            }
            Err(TryLockError::Error(source)) => Err(LockError::Io { path: path.to_owned(), source }),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open lock file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = lock_path(dir.path());
        let held = lock(&path).unwrap();
        match lock(&path) {
            Err(LockError::Held { owner, .. }) => assert_eq!(owner, std::process::id().to_string()),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(held);
        assert!(lock(&path).is_ok());
    }
}
