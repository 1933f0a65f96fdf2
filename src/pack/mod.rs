//! The pack engine: builds, extracts, stages and atomically applies versioned server packs into a
//! data dir, keeping the previous version for rollback.
//!
//! The pipeline: an archive fetched by [`source`] (url, hub or mrpack) or a local file -> [`store::PackStore::stage`]
//! (safe extraction, every digest verified against `atlas-pack.json`) -> a [`store::StagedPack`] ->
//! [`store::PackStore::apply`] (a journaled swap; crash-consistent) -> the data dir holds the new
//! version, the store keeps the old one for [`store::PackStore::rollback`].
//!
//! Layout inside the data dir:
//! ```text
//! DATA/.atlas/lock                      one runner per data dir (see [`lock`])
//! DATA/.atlas/packs/state.json          committed state: current version, previous version, preserve globs
//! DATA/.atlas/packs/journal.json        present only while a swap is in flight
//! DATA/.atlas/packs/<version>/atlas-pack.json   the version's manifest
//! DATA/.atlas/packs/<version>/files/    staged files (for the current version: none after the swap;
//!                                       for the previous one: the files that differ from the current)
//! ```

pub mod build;
pub mod extract;
pub mod journal;
pub mod lock;
pub mod manifest;
pub mod path;
pub mod provision;
pub mod store;

pub mod apply;
pub mod source;

pub use apply::{ApplyError, ApplyReport, PlannedSwap, SwapStep};
pub use extract::{ArchiveFormat, Limits};
pub use lock::{DataDirLock, lock, lock_path};
pub use manifest::{Diff, FileEntry, PackManifest, PackVersion, Preserve, Sha256Digest, diff};
pub use path::{RelativePath, sanitize_path};
pub use store::{PackStore, StagedPack, Versioning};

/// A filesystem operation of the pack engine that failed: what was done, to which path. Each
/// module's error wraps it (`Io`), so every such failure reads the same: `rename PATH: reason`.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct IoError {
    /// What was being done.
    pub op: &'static str,
    /// The path it was done to.
    pub path: std::path::PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}
