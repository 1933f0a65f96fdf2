//! The apply journal: the plan of a swap, written durably before the first file moves, so an
//! interrupted swap can be undone (or its cleanup finished) by the next open of the store.
//!
//! Every step of a swap is a `rename` whose effect is visible on disk, so undo reads the state of
//! each path rather than a progress counter: undo is idempotent and can itself be interrupted.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::IoError;
use super::extract::sync_dir;
use super::manifest::{FileEntry, PackVersion, Sha256Digest};
use super::path::RelativePath;
use super::store::{Layout, StoreState};

/// Errors reading, writing, undoing or finishing a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The journal does not parse. It is written atomically, so this means outside damage.
    #[error("parse journal {}: {source}", path.display())]
    Parse {
        /// The journal file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl JournalError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Io(_) => "io",
            Self::Parse { .. } => "corrupt-journal",
        }
    }
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_owned();
    move |source| JournalError::Io(IoError { op, path, source })
}

/// The plan of one swap from version `from` (none on a first apply) to version `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Journal {
    /// The version the data dir held before the swap.
    pub from: Option<PackVersion>,
    /// The version the swap installs.
    pub to: PackVersion,
    /// Files of `from` moved out of the data dir into `from`'s store directory, in order.
    pub displace: Vec<RelativePath>,
    /// Directories of `to` moved whole from its store directory into the data dir, where nothing
    /// was, before the files of `install`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub install_dirs: Vec<RelativePath>,
    /// Files moved from `to`'s store directory into the data dir, in order.
    pub install: Vec<RelativePath>,
    /// Preserved files written into the data dir because they were absent.
    pub preserve_writes: Vec<FileEntry>,
    /// Files of `to`'s store directory deleted once the swap is committed (copies of files the
    /// data dir already holds).
    pub discard: Vec<RelativePath>,
    /// The store state the swap commits; the swap is committed exactly when `state.json` says it.
    pub next_state: StoreState,
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fsync, rename, fsync of
/// the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    sync_dir(dir).map_err(io_err("fsync", dir))
}

/// Whether anything (file, directory or link) is at `path`.
pub(crate) fn exists(path: &Path) -> Result<bool, JournalError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        // NotADirectory: an ancestor is a file, so nothing is at `path`.
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(false),
        Err(source) => Err(JournalError::Io(IoError { op: "stat", path: path.to_owned(), source })),
    }
}

/// SHA-256 and size of a file, streamed.
pub(crate) fn hash_file(path: &Path) -> io::Result<(Sha256Digest, u64)> {
    use sha2::Digest;
    let mut file = fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let size = io::copy(&mut file, &mut hasher)?;
    Ok((Sha256Digest(hasher.finalize().into()), size))
}

impl Journal {
    /// Writes the journal durably (before the first step of the swap).
    pub(crate) fn write(&self, layout: &Layout) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|source| JournalError::Parse { path: layout.journal_file(), source })?;
        write_atomic(&layout.journal_file(), &bytes)
    }

    /// The journal of an interrupted swap, if there is one.
    pub(crate) fn read(layout: &Layout) -> Result<Option<Self>, JournalError> {
        let path = layout.journal_file();
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|source| JournalError::Parse { path, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Io(IoError { op: "read", path, source })),
        }
    }

    /// Deletes the journal durably: the swap is over (committed, or undone).
    pub(crate) fn remove(layout: &Layout) -> Result<(), JournalError> {
        let path = layout.journal_file();
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(JournalError::Io(IoError { op: "remove", path, source })),
        }
        sync_dir(layout.root()).map_err(io_err("fsync", layout.root()))
    }

    /// Undoes whatever part of the swap happened, newest step first, and makes it durable. The data
    /// dir then holds `from`'s files again and `to`'s store directory its staged files.
    pub(crate) fn undo(&self, layout: &Layout) -> Result<(), JournalError> {
        let mut touched = Vec::new();
        let to_files = layout.files_dir(&self.to);
        for entry in self.preserve_writes.iter().rev() {
            let target = entry.path.under(layout.data());
            // Only a file with exactly the pack's content is ours to take back: the file was absent
            // when the swap was planned, and the data dir is locked.
            if exists(&target)?
                && hash_file(&target).map(|(d, s)| d == entry.sha256 && s == entry.size).unwrap_or(false)
            {
                fs::remove_file(&target).map_err(io_err("remove", &target))?;
                touched.extend(dirs_within(&target, layout.data()));
            }
        }
        for path in self.install.iter().rev().chain(self.install_dirs.iter().rev()) {
            let target = path.under(layout.data());
            let staged = path.under(&to_files);
            if exists(&target)? && !exists(&staged)? {
                create_parent(&staged)?;
                fs::rename(&target, &staged).map_err(io_err("rename", &target))?;
                touched.extend(dirs_within(&target, layout.data()).chain(dirs_within(&staged, layout.root())));
            }
        }
        if let Some(from) = &self.from {
            let from_files = layout.files_dir(from);
            for path in self.displace.iter().rev() {
                let target = path.under(layout.data());
                let kept = path.under(&from_files);
                if !exists(&kept)? {
                    continue;
                }
                // An install may have left an empty directory where this file was.
                if fs::symlink_metadata(&target).map(|m| m.is_dir()).unwrap_or(false) {
                    fs::remove_dir(&target).map_err(io_err("remove empty directory", &target))?;
                }
                if !exists(&target)? {
                    create_parent(&target)?;
                    fs::rename(&kept, &target).map_err(io_err("rename", &kept))?;
                    touched.extend(dirs_within(&target, layout.data()).chain(dirs_within(&kept, layout.root())));
                }
            }
        }
        sync_all_dirs(touched)
    }

    /// Finishes a committed swap: deletes the discarded copies. Idempotent.
    pub(crate) fn finish(&self, layout: &Layout) -> Result<(), JournalError> {
        let to_files = layout.files_dir(&self.to);
        for path in &self.discard {
            let staged = path.under(&to_files);
            match fs::remove_file(&staged) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(JournalError::Io(IoError { op: "remove", path: staged, source })),
            }
        }
        Ok(())
    }
}

/// The directories from `path`'s parent up to and including `top`: a rename into a directory that
/// `create_dir_all` may just have made (with its parents) is durable once they are all fsynced.
pub(crate) fn dirs_within<'a>(path: &'a Path, top: &'a Path) -> impl Iterator<Item = PathBuf> + 'a {
    path.ancestors().skip(1).take_while(move |d| d.starts_with(top)).map(Path::to_owned)
}

pub(crate) fn create_parent(path: &Path) -> Result<(), JournalError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    }
    Ok(())
}

/// fsyncs each directory once.
pub(crate) fn sync_all_dirs(mut dirs: Vec<PathBuf>) -> Result<(), JournalError> {
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        match sync_dir(&dir) {
            Ok(()) => {}
            // Removed since (an emptied staging directory): nothing to make durable there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(JournalError::Io(IoError { op: "fsync", path: dir, source })),
        }
    }
    Ok(())
}
