//! The pack store under `DATA/.atlas/packs/`: staged versions, their manifests, the committed state,
//! and the recovery of an interrupted swap when the store is opened.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::IoError;
use super::extract::{self, ArchiveFormat, ExtractError, Limits, TarCompression};
use super::journal::{self, Journal, JournalError, write_atomic};
use super::lock::{DataDirLock, lock_path};
use super::manifest::{FileEntry, MANIFEST_FILE, ManifestError, PackManifest, PackVersion, Preserve, RESERVED_DIR};
use super::path::RelativePath;

/// Errors opening the store and staging packs into it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The lock passed in is not this data dir's.
    #[error("the lock {} is not the lock of data dir {}", lock.display(), data_dir.display())]
    WrongLock {
        /// The lock held.
        lock: PathBuf,
        /// The data dir opened.
        data_dir: PathBuf,
    },
    /// `state.json` does not parse.
    #[error("parse {}: {source}", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Recovering an interrupted swap failed; the journal is kept and the next open retries.
    #[error("recover interrupted swap: {0}")]
    Recover(#[source] JournalError),
    /// The archive was refused or is unreadable.
    #[error("extract pack: {0}")]
    ExtractArchive(#[from] ExtractError),
    /// The pack's manifest is invalid.
    #[error("pack manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// A plain archive (no `atlas-pack.json`) staged without a version.
    #[error("the archive has no {MANIFEST_FILE} naming its version; set spec.pack.version")]
    MissingVersion,
    /// The manifest's version is not the one asked for.
    #[error("the pack is version {found}, expected {expected}")]
    VersionMismatch {
        /// Asked for.
        expected: PackVersion,
        /// In the manifest.
        found: PackVersion,
    },
    /// A file whose content does not match the manifest.
    #[error(
        "verify {path}: sha256 {actual} size {actual_size}, the manifest says sha256 {expected} size {expected_size}"
    )]
    VerifyDigest {
        /// The file.
        path: RelativePath,
        /// From the manifest.
        expected: String,
        /// Found.
        actual: String,
        /// From the manifest.
        expected_size: u64,
        /// Found.
        actual_size: u64,
    },
    /// A file the manifest lists and the archive lacks.
    #[error("the manifest lists {0} but the archive does not contain it")]
    MissingFile(RelativePath),
    /// A file in the archive the manifest does not list.
    #[error("the archive contains {0}, which the manifest does not list")]
    UnlistedFile(RelativePath),
    /// This exact version is already the current one: nothing to do.
    #[error("version {0} is already applied")]
    AlreadyCurrent(PackVersion),
    /// A different pack under the name of the current version or of the one kept for rollback.
    #[error("version {0} is applied or kept for rollback with different content; a new pack needs a new version")]
    VersionReused(PackVersion),
}

impl StoreError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Io(_) => "io",
            Self::WrongLock { .. } => "locked",
            Self::State { .. } => "corrupt-store",
            Self::Recover(e) => e.category(),
            Self::ExtractArchive(e) => e.category(),
            Self::Manifest(e) => e.category(),
            Self::MissingVersion | Self::VersionMismatch { .. } | Self::VersionReused(_) => "invalid-pack",
            Self::VerifyDigest { .. } | Self::MissingFile(_) | Self::UnlistedFile(_) => "digest-mismatch",
            Self::AlreadyCurrent(_) => "up-to-date",
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io(IoError { op, path, source })
}

/// The committed state of the store (`state.json`). A swap commits by replacing this file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreState {
    /// The version whose managed files the data dir holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<PackVersion>,
    /// The version before it, kept for rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PackVersion>,
    /// The `preserve` globs the current version was applied with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preserve: Vec<String>,
    /// What the current version was fetched from, when that names its content (`sha256:HEX` of a
    /// url source's archive): the same source is then known applied without fetching it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Which pack the current version came from (see [`crate::pack::source::origin`]), whatever its
    /// version: a start that cannot reach the source runs the version held here only when it is a
    /// version of the spec's pack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Which pack the previous version came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_origin: Option<String>,
}

/// Where things are in the data dir and the store.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    data: PathBuf,
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self { data: data_dir.to_owned(), root: data_dir.join(RESERVED_DIR).join("packs") }
    }
    pub(crate) fn data(&self) -> &Path {
        &self.data
    }
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }
    pub(crate) fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }
    pub(crate) fn journal_file(&self) -> PathBuf {
        self.root.join("journal.json")
    }
    pub(crate) fn version_dir(&self, version: &PackVersion) -> PathBuf {
        self.root.join(version.as_str())
    }
    pub(crate) fn files_dir(&self, version: &PackVersion) -> PathBuf {
        self.version_dir(version).join("files")
    }
    pub(crate) fn manifest_file(&self, version: &PackVersion) -> PathBuf {
        self.version_dir(version).join(MANIFEST_FILE)
    }
    pub(crate) fn copy_tmp(&self) -> PathBuf {
        self.root.join("preserve-copy.tmp")
    }
}

/// What opening the store did about a swap a crash interrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// No swap was in flight.
    Clean,
    /// The swap had not committed: it was undone, the data dir holds `from` (none: no pack).
    RolledBack {
        /// The version the data dir holds again.
        from: Option<PackVersion>,
        /// The version whose swap was undone.
        to: PackVersion,
    },
    /// The swap had committed; its cleanup was finished.
    Completed {
        /// The version the data dir holds.
        to: PackVersion,
    },
}

/// What the store holds, for `pack status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// The applied version, with its manifest.
    pub current: Option<PackManifest>,
    /// The version kept for rollback.
    pub previous: Option<PackVersion>,
    /// The files the current version owns in the data dir (its files minus preserved ones).
    pub owned: Vec<FileEntry>,
    /// The `preserve` globs the current version was applied with.
    pub preserve: Vec<String>,
}

/// What names the version of a pack being staged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versioning {
    /// The version the pack must be (the spec's pin, a hub's or an index's answer): an
    /// `atlas-pack.json` naming another is refused, and a plain archive gets it.
    pub pinned: Option<PackVersion>,
    /// The version a plain archive (no `atlas-pack.json`) gets when nothing is pinned: a url source's
    /// version derived from its sha256. An `atlas-pack.json` names its own.
    pub fallback: Option<PackVersion>,
}

impl Versioning {
    /// Only a pin (or nothing).
    pub fn pinned(version: Option<&PackVersion>) -> Self {
        Self { pinned: version.cloned(), fallback: None }
    }
}

/// A pack extracted into the store with every file verified against its manifest: the only thing
/// [`PackStore::apply`] takes. Made only by [`PackStore::stage`], which hashed every file as it
/// wrote it; the swap therefore does not read them again.
#[derive(Debug)]
pub struct StagedPack {
    pub(crate) manifest: PackManifest,
    pub(crate) root: PathBuf,
    pub(crate) proof: Verified,
    /// What it was fetched from, recorded in the state it commits (see [`StoreState::source`]).
    pub(crate) source: Option<String>,
    /// Which pack it is a version of (see [`StoreState::origin`]).
    pub(crate) origin: Option<String>,
}

/// Proof that this process hashed every staged file of a version while staging it and found it
/// matching the manifest (the files then stayed under the data dir's lock). Only
/// [`PackStore::stage`] makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verified(());

impl StagedPack {
    /// The staged pack's manifest.
    pub fn manifest(&self) -> &PackManifest {
        &self.manifest
    }

    /// The staged pack's version.
    pub fn version(&self) -> &PackVersion {
        &self.manifest.version
    }

    /// Records what the pack was fetched from (see [`StoreState::source`]).
    pub fn set_source(&mut self, source: Option<String>) {
        self.source = source;
    }

    /// Records which pack it is a version of (see [`StoreState::origin`]).
    pub fn set_origin(&mut self, origin: Option<String>) {
        self.origin = origin;
    }
}

/// The pack store of one data dir. Holding one means holding the data dir's lock (the borrow).
#[derive(Debug)]
pub struct PackStore<'lock> {
    pub(crate) layout: Layout,
    pub(crate) state: StoreState,
    _lock: &'lock DataDirLock,
}

impl<'lock> PackStore<'lock> {
    /// Opens (creating if needed) the store of `data_dir`, whose lock the caller holds. A swap a
    /// crash interrupted is undone, or its cleanup finished when it had committed, before this
    /// returns: the data dir then holds exactly one version's managed files. Leftover staging
    /// directories and versions other than the current and previous one are deleted.
    pub fn open(data_dir: &Path, lock: &'lock DataDirLock) -> Result<(Self, Recovery), StoreError> {
        if lock.path() != lock_path(data_dir) {
            return Err(StoreError::WrongLock { lock: lock.path().to_owned(), data_dir: data_dir.to_owned() });
        }
        let layout = Layout::new(data_dir);
        fs::create_dir_all(layout.root()).map_err(io_err("create directory", layout.root()))?;
        let mut state = read_state(&layout)?;
        let recovery = match Journal::read(&layout).map_err(StoreError::Recover)? {
            None => Recovery::Clean,
            Some(j) if state.current.as_ref() == Some(&j.to) => {
                j.finish(&layout).map_err(StoreError::Recover)?;
                Journal::remove(&layout).map_err(StoreError::Recover)?;
                tracing::warn!(version = %j.to, "finished the cleanup of a committed pack swap that was interrupted");
                Recovery::Completed { to: j.to }
            }
            Some(j) => {
                j.undo(&layout).map_err(StoreError::Recover)?;
                Journal::remove(&layout).map_err(StoreError::Recover)?;
                tracing::warn!(from = ?j.from, to = %j.to, "rolled back an interrupted pack swap");
                Recovery::RolledBack { from: j.from, to: j.to }
            }
        };
        state = read_state(&layout).unwrap_or(state);
        let store = Self { layout, state, _lock: lock };
        store.collect_garbage()?;
        Ok((store, recovery))
    }

    /// The committed state.
    pub fn state(&self) -> &StoreState {
        &self.state
    }

    /// Records which pack the current version is a version of, for a data dir applied before origins
    /// were recorded (or by `pack apply` of the same content): the state is rewritten only when it
    /// changes. Nothing happens without a current version.
    pub fn record_origin(&mut self, origin: &str) -> Result<(), StoreError> {
        if self.state.current.is_none() || self.state.origin.as_deref() == Some(origin) {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.origin = Some(origin.to_owned());
        let path = self.layout.state_file();
        let bytes = serde_json::to_vec_pretty(&next).map_err(|source| StoreError::State { path, source })?;
        write_atomic(&self.layout.state_file(), &bytes).map_err(|e| match e {
            JournalError::Io(io) => StoreError::Io(io),
            other => StoreError::Recover(other),
        })?;
        self.state = next;
        Ok(())
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        self.layout.data()
    }

    /// The current and kept versions and what the current one owns.
    pub fn status(&self) -> Result<StoreStatus, StoreError> {
        let current = match &self.state.current {
            Some(v) => Some(self.read_manifest(v)?),
            None => None,
        };
        let preserve = Preserve::new(&self.state.preserve)?;
        let owned = current
            .as_ref()
            .map(|m| m.files.iter().filter(|f| !preserve.matches(&f.path)).cloned().collect())
            .unwrap_or_default();
        Ok(StoreStatus { current, previous: self.state.previous.clone(), owned, preserve: self.state.preserve.clone() })
    }

    /// The manifest of a version in the store.
    pub fn read_manifest(&self, version: &PackVersion) -> Result<PackManifest, StoreError> {
        let path = self.layout.manifest_file(version);
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        Ok(PackManifest::from_json(&bytes)?)
    }

    /// Extracts `archive` into the store and verifies it: with an `atlas-pack.json`, every file
    /// must match it exactly (no file missing, none extra, every sha256 and size); without one
    /// (a plain `.tar.gz` or `.zip`), `version` names the pack and the manifest is made from the
    /// files. Runs while the server runs: the data dir is not touched, and a refused archive
    /// leaves nothing behind.
    pub fn stage(
        &self,
        archive: &Path,
        format: ArchiveFormat,
        version: Option<&PackVersion>,
        limits: &Limits,
    ) -> Result<StagedPack, StoreError> {
        self.stage_with(&Versioning::pinned(version), &mut |dest, policy| {
            extract::extract_file_with(archive, format, dest, limits, policy)
        })
    }

    /// [`PackStore::stage`] that gives up, leaving nothing behind, once `cancel` is set (its caller
    /// went away): staging a large archive on a blocking thread then ends at the next read.
    pub fn stage_cancellable(
        &self,
        archive: &Path,
        format: ArchiveFormat,
        version: &Versioning,
        limits: &Limits,
        cancel: &AtomicBool,
    ) -> Result<StagedPack, StoreError> {
        self.stage_with(version, &mut |dest, policy| {
            let file = fs::File::open(archive).map_err(|source| ExtractError::Corrupt { entry: None, source })?;
            let reader = io::BufReader::with_capacity(256 * 1024, Cancellable { inner: file, cancel });
            match format {
                ArchiveFormat::TarZst => extract::extract_tar_with(reader, TarCompression::Zstd, dest, limits, policy),
                ArchiveFormat::TarGz => extract::extract_tar_with(reader, TarCompression::Gzip, dest, limits, policy),
                ArchiveFormat::Zip => extract::extract_zip_with(reader, dest, limits, policy),
            }
        })
    }

    /// [`PackStore::stage`] of a tar stream read as it arrives (a download in progress): the same
    /// checks, and the pack is complete only if the stream ends cleanly.
    pub fn stage_stream(
        &self,
        stream: impl io::BufRead,
        compression: TarCompression,
        version: &Versioning,
        limits: &Limits,
    ) -> Result<StagedPack, StoreError> {
        let mut stream = Some(stream);
        self.stage_with(version, &mut |dest, policy| match stream.take() {
            Some(stream) => extract::extract_tar_with(stream, compression, dest, limits, policy),
            None => Err(ExtractError::Corrupt { entry: None, source: io::Error::other("the stream was read already") }),
        })
    }

    fn stage_with(&self, version: &Versioning, extract: &mut Extract<'_>) -> Result<StagedPack, StoreError> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
        let staging = self.layout.root().join(format!("staging-{}-{nanos}", std::process::id()));
        let result = self.stage_into(&staging, version, extract);
        if result.is_err()
            && let Err(e) = fs::remove_dir_all(&staging)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %staging.display(), error = %e, "could not remove a refused staging directory");
        }
        result
    }

    fn stage_into(
        &self,
        staging: &Path,
        version: &Versioning,
        extract: &mut Extract<'_>,
    ) -> Result<StagedPack, StoreError> {
        let files_dir = staging.join("files");
        fs::create_dir_all(&files_dir).map_err(io_err("create directory", &files_dir))?;
        let current = match &self.state.current {
            Some(v) => Some(self.read_manifest(v)?),
            None => None,
        };
        let mut policy =
            SkipUnchanged { data: self.layout.data(), current: current.as_ref(), new: None, captured: None };
        let mut extracted = extract(&files_dir, &mut policy)?;
        let captured = policy.captured.take();
        let manifest = match extracted.iter().position(|f| f.path.as_str() == MANIFEST_FILE) {
            Some(index) => {
                let entry = extracted.remove(index);
                let bytes = match captured {
                    Some(bytes) => bytes,
                    None => {
                        let path = entry.path.under(&files_dir);
                        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
                        fs::remove_file(&path).map_err(io_err("remove", &path))?;
                        // Extraction's flush is over: a removal that came back after a crash would
                        // leave a file in the store that no version lists.
                        extract::sync_dir(&files_dir).map_err(io_err("fsync", &files_dir))?;
                        bytes
                    }
                };
                let manifest = PackManifest::from_json(&bytes)?;
                if let Some(expected) = &version.pinned
                    && *expected != manifest.version
                {
                    return Err(StoreError::VersionMismatch {
                        expected: expected.clone(),
                        found: manifest.version.clone(),
                    });
                }
                verify_extracted(&manifest, &extracted)?;
                manifest
            }
            None => {
                let version =
                    version.pinned.as_ref().or(version.fallback.as_ref()).ok_or(StoreError::MissingVersion)?;
                let files =
                    extracted.into_iter().map(|f| FileEntry { path: f.path, sha256: f.sha256, size: f.size }).collect();
                PackManifest::new(version.clone(), None, Vec::new(), files)?
            }
        };
        if let Some(current) = current
            && current.version == manifest.version
        {
            return Err(if current == manifest {
                StoreError::AlreadyCurrent(manifest.version)
            } else {
                StoreError::VersionReused(manifest.version)
            });
        }
        // Extraction made every file and directory it wrote durable before returning, so the swap
        // may rename them into the data dir.
        let bytes = manifest.to_json()?;
        write_atomic(&staging.join(MANIFEST_FILE), &bytes).map_err(StoreError::Recover)?;
        let target = self.layout.version_dir(&manifest.version);
        if self.state.previous.as_ref() == Some(&manifest.version)
            && self.layout.manifest_file(&manifest.version).is_file()
        {
            // The version kept for rollback, staged again: it must stay a rollback target whatever
            // happens next (a crash, a refused plan, a called-off gate), so its directory is never
            // removed; the fresh copies replace its files one rename at a time.
            if self.read_manifest(&manifest.version)? != manifest {
                return Err(StoreError::VersionReused(manifest.version));
            }
            merge_files(&files_dir, &self.layout.files_dir(&manifest.version))?;
            extract::sync_filesystem(&target).map_err(io_err("syncfs", &target))?;
            fs::remove_dir_all(staging).map_err(io_err("remove", staging))?;
            return Ok(StagedPack {
                manifest,
                root: self.layout.root().to_owned(),
                proof: Verified(()),
                source: None,
                origin: None,
            });
        }
        // A leftover of an earlier staging: the fresh, complete staging replaces it.
        if journal::exists(&target).map_err(StoreError::Recover)? {
            fs::remove_dir_all(&target).map_err(io_err("remove", &target))?;
        }
        fs::rename(staging, &target).map_err(io_err("rename", staging))?;
        extract::sync_dir(self.layout.root()).map_err(io_err("fsync", self.layout.root()))?;
        Ok(StagedPack {
            manifest,
            root: self.layout.root().to_owned(),
            proof: Verified(()),
            source: None,
            origin: None,
        })
    }

    /// Removes a staged version that will not be applied (its archive turned out unverified). The
    /// current and previous versions' directories are kept: the store's state names them.
    pub fn discard(&self, staged: StagedPack) {
        let version = staged.version();
        if self.state.current.as_ref() == Some(version) || self.state.previous.as_ref() == Some(version) {
            return;
        }
        let dir = self.layout.version_dir(version);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            // Not fatal: the next open collects it as garbage.
            tracing::warn!(path = %dir.display(), error = %e, "could not remove a discarded staged version");
        }
    }

    /// Deletes staging leftovers and versions that are neither current nor previous.
    fn collect_garbage(&self) -> Result<(), StoreError> {
        let root = self.layout.root();
        for entry in fs::read_dir(root).map_err(io_err("read directory", root))? {
            let entry = entry.map_err(io_err("read directory", root))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let keep = name == "state.json"
                || name == "journal.json"
                || self.state.current.as_ref().is_some_and(|v| v.as_str() == name)
                || self.state.previous.as_ref().is_some_and(|v| v.as_str() == name);
            if keep {
                continue;
            }
            let path = entry.path();
            let result = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(io_err("remove", &path))?;
        }
        Ok(())
    }
}

/// Extracts an archive into the given staging directory under a policy.
type Extract<'a> = dyn FnMut(&Path, &mut dyn extract::Policy) -> Result<Vec<extract::ExtractedFile>, ExtractError> + 'a;

/// The staging policy of an Atlas pack whose `atlas-pack.json` comes before its other files (as
/// `pack build` writes it): every later file is held to the size the manifest declares (one it
/// does not list is refused), and a file whose path, sha256 and size equal the current version's
/// entry, and which the data dir holds, is hashed (and so still verified) but not written, so an
/// update writes only what changed. A manifest later in the archive, or a plain archive, is staged
/// in full.
struct SkipUnchanged<'a> {
    data: &'a Path,
    current: Option<&'a PackManifest>,
    /// The new version's manifest, once captured and parsed.
    new: Option<PackManifest>,
    /// The manifest's bytes, parsed again (and any error reported) by `stage`.
    captured: Option<Vec<u8>>,
}

impl extract::Policy for SkipUnchanged<'_> {
    fn disposition(&mut self, path: &RelativePath, _declared: u64, first: bool) -> extract::Disposition {
        use extract::Disposition;
        if first && path.as_str() == MANIFEST_FILE {
            return Disposition::Capture;
        }
        let (Some(current), Some(new)) = (self.current, &self.new) else { return Disposition::Write };
        match (current.file(path), new.file(path)) {
            (Some(old), Some(entry)) if old == entry => {
                // Deleted by hand (or replaced by a directory or link): the swap puts it back from a
                // staged copy.
                let present = fs::symlink_metadata(path.under(self.data)).is_ok_and(|m| m.is_file());
                if present { Disposition::Discard } else { Disposition::Write }
            }
            _ => Disposition::Write,
        }
    }

    fn captured(&mut self, _path: &RelativePath, bytes: Vec<u8>) {
        self.new = PackManifest::from_json(&bytes).ok();
        self.captured = Some(bytes);
    }

    fn declared(&self, path: &RelativePath) -> extract::Declared {
        match &self.new {
            None => extract::Declared::Nothing,
            Some(manifest) => {
                manifest.file(path).map_or(extract::Declared::Unlisted, |f| extract::Declared::Size(f.size))
            }
        }
    }
}

fn read_state(layout: &Layout) -> Result<StoreState, StoreError> {
    let path = layout.state_file();
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::State { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StoreState::default()),
        Err(source) => Err(StoreError::Io(IoError { op: "read", path, source })),
    }
}

/// A reader that fails once `cancel` is set.
struct Cancellable<'a, R> {
    inner: R,
    cancel: &'a AtomicBool,
}

impl<R: io::Read> io::Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Acquire) {
            // Not `Interrupted`: readers retry that.
            return Err(io::Error::other("staging was called off"));
        }
        self.inner.read(buf)
    }
}

impl<R: io::Seek> io::Seek for Cancellable<'_, R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Moves every file under `from` to the same path under `to`, replacing what is there (a rename,
/// so each path holds the old or the new file at every moment).
fn merge_files(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(to).map_err(io_err("create directory", to))?;
    for entry in fs::read_dir(from).map_err(io_err("read directory", from))? {
        let entry = entry.map_err(io_err("read directory", from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(io_err("stat", &source))?.is_dir() {
            merge_files(&source, &target)?;
        } else {
            fs::rename(&source, &target).map_err(io_err("rename", &source))?;
        }
    }
    Ok(())
}

/// Every file of the manifest was extracted with its digest and size, and nothing else was.
fn verify_extracted(manifest: &PackManifest, extracted: &[extract::ExtractedFile]) -> Result<(), StoreError> {
    let mut got = extracted.iter().peekable();
    for want in &manifest.files {
        // Both are sorted by path.
        if let Some(extra) = got.next_if(|g| g.path < want.path) {
            return Err(StoreError::UnlistedFile(extra.path.clone()));
        }
        match got.next_if(|g| g.path == want.path) {
            None => return Err(StoreError::MissingFile(want.path.clone())),
            Some(g) if g.sha256 != want.sha256 || g.size != want.size => {
                return Err(StoreError::VerifyDigest {
                    path: want.path.clone(),
                    expected: want.sha256.to_string(),
                    actual: g.sha256.to_string(),
                    expected_size: want.size,
                    actual_size: g.size,
                });
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = got.next() {
        return Err(StoreError::UnlistedFile(extra.path.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::build::{BuildOptions, build};
    use crate::pack::lock::lock;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Builds a pack of `files` at `version` under `work`.
    fn pack(work: &Path, version: &str, files: &[(&str, &str)]) -> Result<PathBuf, Box<dyn std::error::Error>> {
        let src = work.join(format!("src-{version}-{}", files.len()));
        for (path, content) in files {
            let file = src.join(path);
            fs::create_dir_all(file.parent().ok_or("no parent")?)?;
            fs::write(file, content)?;
        }
        let out = work.join(format!("{version}-{}.tar.zst", files.len()));
        build(&src, &out, &BuildOptions::new(PackVersion::new(version)?))?;
        Ok(out)
    }

    fn stage(store: &PackStore<'_>, archive: &Path) -> Result<StagedPack, StoreError> {
        store.stage(archive, ArchiveFormat::TarZst, None, &Limits::default())
    }

    #[test]
    fn the_version_kept_for_rollback_survives_being_staged_again() -> TestResult {
        let (work, data) = (tempfile::tempdir()?, tempfile::tempdir()?);
        fs::create_dir_all(data.path().join(RESERVED_DIR))?;
        let held = lock(&lock_path(data.path()))?;
        let (mut store, _) = PackStore::open(data.path(), &held)?;
        let v1 = pack(work.path(), "1.0.0", &[("mods/a.jar", "a-1"), ("mods/b.jar", "b")])?;
        let v2 = pack(work.path(), "2.0.0", &[("mods/a.jar", "a-2"), ("mods/b.jar", "b")])?;
        for archive in [&v1, &v2] {
            let staged = stage(&store, archive)?;
            store.apply(staged, &Preserve::none())?;
        }
        let previous = store.layout.version_dir(&PackVersion::new("1.0.0")?);

        // Another pack under the kept version's name is refused, and the kept one stays.
        let other = pack(work.path(), "1.0.0", &[("mods/a.jar", "not a-1")])?;
        let reused = stage(&store, &other);
        assert!(matches!(reused, Err(StoreError::VersionReused(_))), "{reused:?}");
        assert!(store.layout.manifest_file(&PackVersion::new("1.0.0")?).is_file());

        // The same pack staged again and then not applied (a refused plan, a called-off gate):
        // the kept version is still there to roll back to.
        let staged = stage(&store, &v1)?;
        assert!(previous.join("files/mods/a.jar").is_file());
        drop(staged);
        let report = store.rollback()?;
        assert_eq!(report.to.as_str(), "1.0.0");
        assert_eq!(fs::read_to_string(data.path().join("mods/a.jar"))?, "a-1");

        // And staged again, it applies like any version.
        let staged = stage(&store, &v2)?;
        store.apply(staged, &Preserve::none())?;
        let staged = stage(&store, &v1)?;
        store.apply(staged, &Preserve::none())?;
        assert_eq!(fs::read_to_string(data.path().join("mods/a.jar"))?, "a-1");
        assert_eq!(store.state().previous.as_ref().map(PackVersion::as_str), Some("2.0.0"));
        Ok(())
    }

    #[test]
    fn a_called_off_staging_stops_reading_and_leaves_nothing() -> TestResult {
        let (work, data) = (tempfile::tempdir()?, tempfile::tempdir()?);
        fs::create_dir_all(data.path().join(RESERVED_DIR))?;
        let held = lock(&lock_path(data.path()))?;
        let (store, _) = PackStore::open(data.path(), &held)?;
        let archive = pack(work.path(), "1.0.0", &[("mods/a.jar", "a-1")])?;
        let cancel = AtomicBool::new(true);
        let staged = store.stage_cancellable(
            &archive,
            ArchiveFormat::TarZst,
            &Versioning::default(),
            &Limits::default(),
            &cancel,
        );
        assert!(staged.is_err(), "{staged:?}");
        assert_eq!(fs::read_dir(store.layout.root())?.count(), 0, "something was left in the store");
        cancel.store(false, Ordering::Release);
        store.stage_cancellable(
            &archive,
            ArchiveFormat::TarZst,
            &Versioning::default(),
            &Limits::default(),
            &cancel,
        )?;
        Ok(())
    }

    #[test]
    fn staging_called_off_part_way_stops_and_leaves_nothing() -> TestResult {
        let (work, data) = (tempfile::tempdir()?, tempfile::tempdir()?);
        fs::create_dir_all(data.path().join(RESERVED_DIR))?;
        let held = lock(&lock_path(data.path()))?;
        let (store, _) = PackStore::open(data.path(), &held)?;
        // 2 MiB that zstd cannot shrink, so half the archive holds part of the first file.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: String = (0..2 << 20)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'!' + (seed % 90) as u8)
            })
            .collect();
        let archive = fs::read(pack(work.path(), "1.0.0", &[("mods/a.jar", &noise), ("mods/b.jar", "b")])?)?;
        // The archive arrives through a pipe the test feeds: the first half, then (once the staging is
        // called off) the rest, so the call-off lands while staging is under way.
        let fifo = work.path().join("archive.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU)?;
        let cancel = AtomicBool::new(false);
        let (go, rest) = std::sync::mpsc::channel::<()>();
        let staged = std::thread::scope(|scope| -> Result<_, Box<dyn std::error::Error>> {
            let (fifo, archive) = (&fifo, &archive);
            let feeder = scope.spawn(move || -> io::Result<()> {
                use std::io::Write;
                let mut pipe = fs::OpenOptions::new().write(true).open(fifo)?;
                let (first, second) = archive.split_at(archive.len() / 2);
                // The reader stops reading once it is called off, perhaps before the first half is all
                // read: a broken pipe is how either write may end.
                let _ = pipe.write_all(first);
                let _ = rest.recv();
                let _ = pipe.write_all(second);
                Ok(())
            });
            let staging = scope.spawn(|| {
                store.stage_cancellable(
                    fifo,
                    ArchiveFormat::TarZst,
                    &Versioning::default(),
                    &Limits::default(),
                    &cancel,
                )
            });
            // Part of the first file is extracted: staging is under way.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let under_way = || {
                fs::read_dir(store.layout.root()).into_iter().flatten().flatten().any(|e| {
                    e.file_name().to_string_lossy().starts_with("staging-")
                        && e.path().join("files/mods/a.jar").is_file()
                })
            };
            while !under_way() {
                assert!(std::time::Instant::now() < deadline, "staging never started");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            cancel.store(true, Ordering::Release);
            go.send(())?;
            let staged = staging.join().map_err(|_| "the staging thread panicked")?;
            feeder.join().map_err(|_| "the feeding thread panicked")??;
            Ok(staged)
        })?;
        let err = staged.err().ok_or("staging called off part-way went on to the end")?;
        assert!(err.to_string().contains("called off"), "{err}");
        assert_eq!(fs::read_dir(store.layout.root())?.count(), 0, "something was left in the store");
        Ok(())
    }
}
