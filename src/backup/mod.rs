//! World backups: consistent snapshots archived to an object store, listed, verified, restored and pruned.
//!
//! Layout in the store (under the configured prefix): `archives/NAME.tar.zst` and `manifests/NAME.json`.
//! The manifest is written last: a backup without its manifest does not exist, and is removed by `prune`.

pub mod archive;
pub mod cron;
pub mod mirror;
pub mod retention;
pub mod snapshot;
pub mod store;
pub mod upload;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::TryStreamExt;
use jiff::Timestamp;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::api::{BackupSpec, Retention};
use crate::rcon::Rcon;
use archive::{ArchiveError, ArchiveStats};
use snapshot::{CaptureRules, SnapshotError};
use store::{Store, StoreError};
use upload::UploadError;

const MANIFEST_DIR: &str = "manifests";
const ARCHIVE_DIR: &str = "archives";
/// `verified/NAME.json`, written after `verify` read the backup back whole (and removed when a later `verify`
/// finds it corrupt): retention never deletes the newest such backup. Creating a backup does not count
/// (nothing is read back then).
const VERIFIED_DIR: &str = "verified";
const MANIFEST_FORMAT: u32 = 1;

/// The record of one complete backup, stored as `manifests/NAME.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// The manifest format version.
    pub format: u32,
    /// The backup's name (its UTC time, `20261126T090710.123Z`).
    pub name: String,
    /// When the capture was taken.
    pub time: Timestamp,
    /// The Minecraft server version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// The pack version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_version: Option<String>,
    /// The world directories in the archive; restore swaps these.
    pub worlds: Vec<String>,
    /// Every top-level name in the archive (the worlds plus included paths).
    pub roots: Vec<String>,
    /// Regular files archived.
    pub files: u64,
    /// Their total size.
    pub raw_bytes: u64,
    /// The archive's size.
    pub archive_bytes: u64,
    /// The archive's SHA-256, lowercase hex.
    pub archive_sha256: String,
    /// The archive's key, relative to the store's prefix.
    pub archive_key: String,
    /// How long the server's saving was off, in milliseconds (absent without RCON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_off_ms: Option<u64>,
    /// How long compressing and uploading the archive took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_ms: Option<u64>,
}

/// Why a backup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("take the snapshot")]
    Snapshot(#[from] SnapshotError),
    #[error("upload the archive")]
    Upload(#[from] UploadError),
    #[error("prepare the local directory {path}")]
    LocalDir { path: PathBuf, source: std::io::Error },
    #[error("write the manifest {key}")]
    WriteManifest { key: String, source: object_store::Error },
    #[error("the archive is intact, but recording that in {key} failed")]
    RecordVerified { key: String, source: object_store::Error },
    #[error("list the backups")]
    ListBackups { source: StoreError },
    #[error(
        "the store took the manifest {key} but does not list it back at {location}, so `backup list` and retention \
         would never see the backup; {}. Check the bucket, the endpoint and pathStyle (a service that does not read \
         the bucket from the host name stores such requests elsewhere)",
        if *removed { "it was deleted again" } else { "deleting it failed too, so its objects may remain there" }
    )]
    NotListedBack { key: String, location: String, removed: bool },
    #[error(
        "the backup {name} was written, but listing it back at {location} failed, so whether `backup list` and \
         retention see it is not known; it was kept, not deleted: once the store answers, `atlas-runner backup \
         list` shows whether it is there"
    )]
    Unconfirmed { name: String, location: String, source: Box<StoreError> },
    #[error("read the manifest {key}")]
    ReadManifest { key: String, source: object_store::Error },
    #[error("parse the manifest {key}")]
    ParseManifest { key: String, source: serde_json::Error },
    #[error("no backup named {name}")]
    NotFound { name: String },
    #[error("download the archive {key}")]
    Download { key: String, source: object_store::Error },
    #[error("write the downloaded archive to {path}")]
    SaveDownload { path: PathBuf, source: std::io::Error },
    #[error("the archive {key} is {actual} bytes, the manifest says {expected}: truncated or replaced")]
    SizeMismatch { key: String, expected: u64, actual: u64 },
    #[error("the archive {key} has SHA-256 {actual}, the manifest says {expected}: corrupt or replaced")]
    DigestMismatch { key: String, expected: String, actual: String },
    #[error("check the archive {key}")]
    CheckArchive { key: String, source: ArchiveError },
    #[error("the archive {key} holds {actual} files, the manifest says {expected}")]
    FileCountMismatch { key: String, expected: u64, actual: u64 },
    #[error("the manifest of {name} names {root:?}, not a plain top-level directory of the archive")]
    UnsafeManifest { name: String, root: String },
    #[error("swap the restored {world} into place (everything changed was put back)")]
    SwapWorld { world: String, source: std::io::Error },
    #[error(
        "swap the restored {} into place failed, and putting the live files back failed too; the data dir is half restored: do not start the server until this is fixed by hand: {}",
        path.display(),
        failures.join("; ")
    )]
    SwapRollBack { path: PathBuf, source: std::io::Error, failures: Vec<String> },
    #[error("delete {key}")]
    Delete { key: String, source: object_store::Error },
    #[error("a blocking task failed")]
    Thread { source: tokio::task::JoinError },
    #[error("another backup or restore is running on this data dir (pid {owner}, lock {path}); wait for it to finish")]
    Busy { path: PathBuf, owner: String },
    #[error("lock {path}")]
    Lock { path: PathBuf, source: std::io::Error },
}

impl BackupError {
    /// A short static label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Store(e) | Self::ListBackups { source: e } => e.category(),
            Self::Snapshot(e) => e.category(),
            Self::Upload(e) => e.category(),
            Self::LocalDir { .. } | Self::SaveDownload { .. } | Self::SwapWorld { .. } => "local_io",
            Self::WriteManifest { .. } => "upload",
            Self::ReadManifest { .. } | Self::Download { .. } | Self::Delete { .. } | Self::RecordVerified { .. } => {
                "store"
            }
            Self::ParseManifest { .. } | Self::UnsafeManifest { .. } => "corrupt_manifest",
            Self::NotListedBack { .. } => "not_listed_back",
            Self::Unconfirmed { .. } => "unconfirmed",
            Self::NotFound { .. } => "not_found",
            Self::SizeMismatch { .. }
            | Self::DigestMismatch { .. }
            | Self::CheckArchive { .. }
            | Self::FileCountMismatch { .. } => "corrupt_archive",
            Self::SwapRollBack { .. } => "restore_incomplete",
            Self::Thread { .. } => "internal",
            Self::Busy { .. } => "busy",
            Self::Lock { .. } => "local_io",
        }
    }
}

/// Where the lock that serialises backups and restores of one data dir lives, relative to it.
pub const LOCK_FILE: &str = ".atlas/backup.lock";

/// Where the lock held while something reads or replaces the live world lives, relative to the data dir:
/// a capture's mirror passes and a restore's swap. The runner starts the JVM only under it.
pub const WORLD_LOCK_FILE: &str = ".atlas/world.lock";

/// Proof that this process is the only one backing up or restoring a data dir; released on drop.
#[derive(Debug)]
pub struct BackupLock {
    _file: std::fs::File,
}

/// Proof that no server starts and no other capture or restore touches the live world; released on drop.
#[derive(Debug)]
pub struct WorldLock {
    _file: std::fs::File,
}

/// How [`create_locked`] holds the world lock over its capture.
#[derive(Debug)]
pub enum WorldHold<'a> {
    /// Take it for the capture and release it before the upload.
    Take,
    /// The caller took it (before reading the server's phase): release it after the capture.
    Given(WorldLock),
    /// The caller holds it beyond this backup (a restore's safety backup).
    Kept(&'a WorldLock),
}

/// Takes the data dir's backup lock, failing at once (naming the holder's pid) when another process or
/// task holds it: two backups would fight over the mirror, and a restore must not race a capture. Held for
/// a whole backup, upload included.
pub fn lock(data_dir: &Path) -> Result<BackupLock, BackupError> {
    lock_file(&data_dir.join(LOCK_FILE)).map(|file| BackupLock { _file: file })
}

/// Takes the data dir's world lock, failing at once (naming the holder's pid) when it is held. Held only
/// while the live world is read into the mirror or replaced, so a server that crashes during an upload is
/// restarted without waiting for it.
pub fn world_lock(data_dir: &Path) -> Result<WorldLock, BackupError> {
    lock_file(&data_dir.join(WORLD_LOCK_FILE)).map(|file| WorldLock { _file: file })
}

fn lock_file(path: &Path) -> Result<std::fs::File, BackupError> {
    use std::io::{Read, Seek, Write};
    let io = |source| BackupError::Lock { path: path.to_owned(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = if owner.trim().is_empty() { "unknown".to_owned() } else { owner.trim().to_owned() };
            return Err(BackupError::Busy { path: path.to_owned(), owner });
        }
        Err(std::fs::TryLockError::Error(source)) => return Err(io(source)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// What a long backup operation is doing, for a progress display: polled, never waited on.
#[derive(Debug, Default)]
pub struct Progress {
    stage: std::sync::atomic::AtomicU8,
    done: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
}

/// The stage a [`Progress`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Nothing measurable yet (capturing).
    Preparing,
    /// Archiving and uploading: bytes of world archived.
    Uploading,
    /// Downloading an archive: bytes downloaded.
    Downloading,
}

impl Progress {
    /// Starts `stage` with `total` bytes to go.
    pub fn start(&self, stage: Stage, total: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stage.store(stage as u8, Relaxed);
        self.done.store(0, Relaxed);
        self.total.store(total, Relaxed);
    }

    /// Counts `bytes` more done.
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The stage, bytes done and bytes in all.
    pub fn snapshot(&self) -> (Stage, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let stage = match self.stage.load(Relaxed) {
            1 => Stage::Uploading,
            2 => Stage::Downloading,
            _ => Stage::Preparing,
        };
        (stage, self.done.load(Relaxed), self.total.load(Relaxed))
    }
}

/// What `create` needs besides the store.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The server's data directory.
    pub data_dir: PathBuf,
    /// Extra includes and excludes.
    pub rules: CaptureRules,
    /// zstd level (1-19).
    pub compression_level: i32,
    /// The running server's RCON; `None` when no server runs (`--no-rcon`).
    pub rcon: Option<Rcon>,
    /// How long to wait for `save-all flush` to be confirmed.
    pub flush_timeout: Duration,
    /// Recorded in the manifest.
    pub server_version: Option<String>,
    /// Recorded in the manifest.
    pub pack_version: Option<String>,
    /// Where the upload reports how far it got.
    pub progress: std::sync::Arc<Progress>,
    /// zstd worker threads; `None` picks [`default_threads`].
    pub compression_threads: Option<u32>,
    /// Set to 1 while the snapshot holds the server's saving off, left at 1 when turning it back on failed.
    pub saving_off: Option<prometheus::IntGauge>,
}

/// Compression threads when none are configured: every core (up to 4) with no server running; with one
/// running, one core fewer, so the archive never competes with the server's tick thread for the last one.
pub fn default_threads(server_running: bool) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = if server_running { cores.saturating_sub(1) } else { cores };
    u32::try_from(cores.clamp(1, 4)).unwrap_or(1)
}

/// The most zstd workers `level` may use within the memory target (128 MiB RSS for the whole process, of
/// which the upload's buffers take about 28 MiB). Each worker has its own match tables and job buffers, and
/// both grow with the level: about 6 MiB per worker up to level 5 (chain and hash logs up to 18, 4 MiB jobs),
/// about 35 MiB at levels 6 to 9 (logs up to 21, jobs of 16-32 MiB), and from level 10 one compressor
/// alone needs 40 to 90 MiB (logs 22-24, an 8 MiB window at 17 and above), so it gets no workers beside it.
pub fn max_threads_for_level(level: i32) -> u32 {
    match level {
        ..=5 => 4,
        6..=9 => 2,
        _ => 1,
    }
}

impl CreateOptions {
    /// Defaults for `data_dir`: no includes, level 3, no RCON, a 60 s flush timeout.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            rules: CaptureRules::default(),
            compression_level: 3,
            rcon: None,
            flush_timeout: Duration::from_secs(60),
            server_version: None,
            pack_version: None,
            progress: std::sync::Arc::default(),
            compression_threads: None,
            saving_off: None,
        }
    }

    /// The options `spec.backup` asks for (includes, excludes, compression level); defaults without one.
    pub fn from_spec(data_dir: impl Into<PathBuf>, spec: Option<&BackupSpec>) -> Self {
        let mut options = Self::new(data_dir);
        if let Some(spec) = spec {
            options.rules = CaptureRules { include: spec.include.clone(), exclude: spec.exclude.clone() };
            options.compression_level = i32::from(spec.compression_level);
        }
        options
    }
}

fn manifest_key(name: &str) -> ObjectPath {
    ObjectPath::from(format!("{MANIFEST_DIR}/{name}.json"))
}

fn verified_key(name: &str) -> ObjectPath {
    ObjectPath::from(format!("{VERIFIED_DIR}/{name}.json"))
}

/// What `verified/NAME.json` holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerifiedRecord {
    name: String,
    verified_at: Timestamp,
    archive_sha256: String,
}

/// Every object under `dir/` in the store.
async fn list_dir(store: &Store, dir: &str) -> Result<Vec<object_store::ObjectMeta>, BackupError> {
    store
        .objects
        .list(Some(&ObjectPath::from(dir)))
        .try_collect()
        .await
        .map_err(|source| BackupError::ListBackups { source: store::classify(source) })
}

/// The names of the backups with a `verified/` record.
async fn verified_names(store: &Store) -> Result<BTreeSet<String>, BackupError> {
    let objects = list_dir(store, VERIFIED_DIR).await?;
    Ok(objects
        .iter()
        .filter_map(|m| m.location.filename().and_then(|f| f.strip_suffix(".json")).map(str::to_owned))
        .collect())
}

fn archive_key(name: &str) -> ObjectPath {
    ObjectPath::from(format!("{ARCHIVE_DIR}/{name}.tar.zst"))
}

/// A backup name for `time`: sortable, unique to the millisecond, safe as a key and a file name.
pub fn backup_name(time: Timestamp) -> String {
    format!("{}{:03}Z", time.strftime("%Y%m%dT%H%M%S."), time.subsec_millisecond())
}

fn local_dir(path: &Path) -> Result<(), BackupError> {
    std::fs::create_dir_all(path).map_err(|source| BackupError::LocalDir { path: path.to_owned(), source })
}

/// Takes a backup: snapshot into the data dir's capture mirror, stream the archive of the mirror to the store,
/// write the manifest last.
/// Fails with [`BackupError::Busy`] while another backup or restore of the data dir runs.
pub async fn create(store: &Store, options: &CreateOptions) -> Result<Manifest, BackupError> {
    let lock = lock(&options.data_dir)?;
    create_locked(store, options, &lock, WorldHold::Take).await
}

/// [`create`] under a lock the caller already holds (a restore's safety backup).
pub async fn create_locked(
    store: &Store,
    options: &CreateOptions,
    _lock: &BackupLock,
    world: WorldHold<'_>,
) -> Result<Manifest, BackupError> {
    // Wrong credentials or a missing bucket fail here, before the server's saving is paused.
    store.probe().await?;
    // An earlier backup that failed while the store was down could not abort its upload then; it can now.
    upload::abort_stale(store, &options.data_dir.join(upload::JOURNAL_DIR)).await;
    let time = Timestamp::now();
    let name = backup_name(time);
    let legacy = options.data_dir.join(snapshot::STAGING_DIR);
    // Earlier versions staged a full copy per backup here; the mirror replaced it.
    if legacy.exists() {
        tokio::fs::remove_dir_all(&legacy)
            .await
            .map_err(|source| BackupError::LocalDir { path: legacy.clone(), source })?;
    }
    // The mirror persists between backups (that is what keeps the save-off pass short); the lock makes this
    // the only capture writing it.
    let mirror = options.data_dir.join(mirror::MIRROR_DIR);
    create_from_mirror(store, options, &name, time, &mirror, world).await
}

async fn create_from_mirror(
    store: &Store,
    options: &CreateOptions,
    name: &str,
    time: Timestamp,
    staging: &Path,
    world: WorldHold<'_>,
) -> Result<Manifest, BackupError> {
    let held = match world {
        WorldHold::Take => Some(world_lock(&options.data_dir)?),
        WorldHold::Given(lock) => Some(lock),
        WorldHold::Kept(_) => None,
    };
    let capture = snapshot::snapshot(
        &options.data_dir,
        staging,
        &options.rules,
        options.rcon.as_ref(),
        options.flush_timeout,
        options.saving_off.as_ref(),
    )
    .await;
    // The upload reads the mirror only: the live world is free again (a crashed server may restart).
    drop(held);
    let capture = capture?;
    let mut roots = Vec::new();
    let entries =
        std::fs::read_dir(staging).map_err(|source| BackupError::LocalDir { path: staging.into(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| BackupError::LocalDir { path: staging.into(), source })?;
        roots.push(entry.file_name().to_string_lossy().into_owned());
    }
    roots.sort();

    let key = archive_key(name);
    let journal = options.data_dir.join(upload::JOURNAL_DIR);
    let upload_started = std::time::Instant::now();
    let progress = options.progress.clone();
    progress.start(Stage::Uploading, capture.bytes);
    let wanted = options.compression_threads.unwrap_or_else(|| default_threads(options.rcon.is_some()));
    let threads = wanted.clamp(1, max_threads_for_level(options.compression_level));
    if threads < wanted {
        tracing::info!(
            wanted,
            threads,
            level = options.compression_level,
            "compression threads capped by the level's memory"
        );
    }
    let uploaded =
        upload::upload_archive(store, &key, staging.to_owned(), options.compression_level, threads, &journal, progress)
            .await?;
    let upload_ms = u64::try_from(upload_started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: name.to_owned(),
        time,
        server_version: options.server_version.clone(),
        pack_version: options.pack_version.clone(),
        worlds: capture.worlds,
        roots,
        files: uploaded.stats.files,
        raw_bytes: uploaded.stats.raw_bytes,
        archive_bytes: uploaded.archive_bytes,
        archive_sha256: uploaded.sha256,
        archive_key: key.to_string(),
        save_off_ms: capture.save_off_window.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
        upload_ms: Some(upload_ms),
    };
    // Serializing plain data with string keys cannot fail.
    let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    let size = body.len() as u64;
    let mkey = manifest_key(name);
    store
        .objects
        .put(&mkey, PutPayload::from(body))
        .await
        .map_err(|source| BackupError::WriteManifest { key: mkey.to_string(), source })?;
    match listed_back(store, name, size).await {
        Ok(true) => {}
        Ok(false) => {
            // Whatever the store did with them, these objects are no backup anyone will find: remove them
            // where they went (a `DELETE` of the key reaches the place its `PUT` did).
            let mut removed = true;
            for key in [&mkey, &key] {
                if let Err(e) = store.objects.delete(key).await {
                    tracing::warn!(key = %key, error = %e, "could not delete an object of a backup not listed back");
                    removed = false;
                }
            }
            return Err(BackupError::NotListedBack {
                key: mkey.to_string(),
                location: store.location.clone(),
                removed,
            });
        }
        // The listing failed (after the client's own retries): that says nothing about the backup, which is
        // complete and most likely listed; deleting it could lose the only good one.
        Err(source) => {
            let (name, location, source) = (name.to_owned(), store.location.clone(), Box::new(source));
            return Err(BackupError::Unconfirmed { name, location, source });
        }
    }
    tracing::info!(
        backup = %manifest.name,
        files = manifest.files,
        archive_bytes = manifest.archive_bytes,
        store = %store.location,
        "backup created"
    );
    Ok(manifest)
}

/// Finds the manifest just written as [`list`] finds backups, by listing `manifests/` from the backup's name
/// on (on S3, one request: only later backups follow it). A read of the key itself would not do: a store
/// that files a misaddressed write under another bucket (an S3 service that does not read the bucket from
/// the host name takes the first path segment for it) answers a read of the same key from the same wrong
/// place, while the listing `backup list` and retention make finds nothing.
async fn listed_back(store: &Store, name: &str, size: u64) -> Result<bool, StoreError> {
    let key = manifest_key(name);
    let offset = ObjectPath::from(format!("{MANIFEST_DIR}/{name}"));
    let mut listing = store.objects.list_with_offset(Some(&ObjectPath::from(MANIFEST_DIR)), &offset);
    // Every key to the end: listings are not sorted everywhere (a local directory lists in the order the
    // filesystem keeps it), so a later backup's manifest listed first says nothing about this one.
    while let Some(meta) = listing.try_next().await.map_err(store::classify)? {
        if meta.location == key {
            return Ok(meta.size == size);
        }
    }
    Ok(false)
}

/// The complete backups in the store, newest first.
pub async fn list(store: &Store) -> Result<Vec<Manifest>, BackupError> {
    Ok(list_all(store).await?.0)
}

/// The readable manifests, newest first, and the names of every manifest object, readable or not.
async fn list_all(store: &Store) -> Result<(Vec<Manifest>, BTreeSet<String>), BackupError> {
    let objects = list_dir(store, MANIFEST_DIR).await?;
    let mut manifests = Vec::with_capacity(objects.len());
    let mut names = BTreeSet::new();
    for meta in objects {
        let Some(name) = meta.location.filename().and_then(|f| f.strip_suffix(".json")) else { continue };
        names.insert(name.to_owned());
        match read_manifest(store.objects.as_ref(), &meta.location).await {
            Ok(manifest) => manifests.push(manifest),
            // Deleted since the listing (a concurrent prune): it is gone, as it should be.
            Err(BackupError::NotFound { .. }) => {}
            // One unreadable manifest must not hide the other backups; it is reported, and never pruned.
            Err(error @ BackupError::ParseManifest { .. }) => {
                tracing::warn!(%error, category = error.category(), "skipping an unreadable backup manifest");
            }
            Err(error) => return Err(error),
        }
    }
    manifests.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.name.cmp(&a.name)));
    Ok((manifests, names))
}

async fn read_manifest(objects: &dyn ObjectStore, key: &ObjectPath) -> Result<Manifest, BackupError> {
    let shown = key.to_string();
    let bytes = match objects.get(key).await {
        Ok(got) => got.bytes().await,
        Err(e) => Err(e),
    };
    let bytes = bytes.map_err(|source| match source {
        object_store::Error::NotFound { .. } => BackupError::NotFound {
            name: key.filename().and_then(|f| f.strip_suffix(".json")).unwrap_or(&shown).to_owned(),
        },
        source => BackupError::ReadManifest { key: shown.clone(), source },
    })?;
    serde_json::from_slice(&bytes).map_err(|source| BackupError::ParseManifest { key: shown, source })
}

/// The manifest of the backup `name`.
pub async fn manifest(store: &Store, name: &str) -> Result<Manifest, BackupError> {
    read_manifest(store.objects.as_ref(), &manifest_key(name)).await
}

/// Downloads the archive of `manifest` to `path`, checking its size and SHA-256 against the manifest.
async fn download_checked(
    store: &Store,
    manifest: &Manifest,
    path: &Path,
    progress: &Progress,
) -> Result<(), BackupError> {
    progress.start(Stage::Downloading, manifest.archive_bytes);
    let key = ObjectPath::from(manifest.archive_key.as_str());
    let download = |source| BackupError::Download { key: manifest.archive_key.clone(), source };
    let save = |source| BackupError::SaveDownload { path: path.to_owned(), source };
    let mut stream = store.objects.get(&key).await.map_err(download)?.into_stream();
    let mut file = tokio::fs::File::create(path).await.map_err(save)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.try_next().await.map_err(download)? {
        hasher.update(&chunk);
        size += chunk.len() as u64;
        progress.add(chunk.len() as u64);
        file.write_all(&chunk).await.map_err(save)?;
    }
    file.flush().await.map_err(save)?;
    file.sync_all().await.map_err(save)?;
    if size != manifest.archive_bytes {
        return Err(BackupError::SizeMismatch {
            key: manifest.archive_key.clone(),
            expected: manifest.archive_bytes,
            actual: size,
        });
    }
    let actual = hex::encode(hasher.finalize());
    if actual != manifest.archive_sha256 {
        return Err(BackupError::DigestMismatch {
            key: manifest.archive_key.clone(),
            expected: manifest.archive_sha256.clone(),
            actual,
        });
    }
    Ok(())
}

fn check_counts(manifest: &Manifest, stats: ArchiveStats) -> Result<(), BackupError> {
    if stats.files != manifest.files {
        return Err(BackupError::FileCountMismatch {
            key: manifest.archive_key.clone(),
            expected: manifest.files,
            actual: stats.files,
        });
    }
    Ok(())
}

/// Downloads the backup `name` into `scratch` (a local directory, emptied of the download afterwards) and
/// checks its size, SHA-256, and that the zstd tar reads to its end with the manifest's file count.
pub async fn verify(store: &Store, name: &str, scratch: &Path) -> Result<Manifest, BackupError> {
    verify_with_progress(store, name, scratch, &Progress::default()).await
}

/// [`verify`], reporting the download on `progress`.
pub async fn verify_with_progress(
    store: &Store,
    name: &str,
    scratch: &Path,
    progress: &Progress,
) -> Result<Manifest, BackupError> {
    let manifest = manifest(store, name).await?;
    local_dir(scratch)?;
    let file = scratch.join(format!("verify-{name}.tar.zst"));
    let result = async {
        download_checked(store, &manifest, &file, progress).await?;
        tracing::info!(
            backup = name,
            bytes = manifest.archive_bytes,
            "archive downloaded, digest checked; reading it through"
        );
        let path = file.clone();
        let key = manifest.archive_key.clone();
        let stats = tokio::task::spawn_blocking(move || {
            let input = std::fs::File::open(&path).map_err(|source| ArchiveError::ReadArchive { source })?;
            archive::check_archive(std::io::BufReader::new(input))
        })
        .await
        .map_err(|source| BackupError::Thread { source })?
        .map_err(|source| BackupError::CheckArchive { key, source })?;
        check_counts(&manifest, stats)?;
        // Written only now: retention keeps the newest backup with this record.
        let record = VerifiedRecord {
            name: manifest.name.clone(),
            verified_at: Timestamp::now(),
            archive_sha256: manifest.archive_sha256.clone(),
        };
        // Serializing plain data with string keys cannot fail.
        let body = serde_json::to_vec_pretty(&record).unwrap_or_default();
        let key = verified_key(name);
        store
            .objects
            .put(&key, PutPayload::from(body))
            .await
            .map(drop)
            .map_err(|source| BackupError::RecordVerified { key: key.to_string(), source })
    }
    .await;
    let _ = tokio::fs::remove_file(&file).await;
    if let Err(error) = &result
        && error.category() == "corrupt_archive"
    {
        // It no longer reads back: retention must not hold on to it as the last good one.
        if let Err(error) = delete(store, &verified_key(name)).await {
            tracing::warn!(%error, backup = name, "removing the verified record of a corrupt backup failed");
        }
    }
    result.map(|()| manifest)
}

/// What `restore` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The restored backup.
    pub manifest: Manifest,
    /// Where each replaced world was moved (`world.before-restore-NAME`).
    pub previous: Vec<PathBuf>,
}

/// Restores the backup `name` into `data_dir`: [`stage_restore`] then [`StagedRestore::swap`], under the
/// data dir's backup and world locks. The server must not be running.
pub async fn restore(store: &Store, name: &str, data_dir: &Path) -> Result<Restored, BackupError> {
    let _lock = lock(data_dir)?;
    let staged = stage_restore(store, name, data_dir).await?;
    staged.swap(&world_lock(data_dir)?).await
}

/// A backup downloaded, checked (size, SHA-256, file count) and fully extracted into
/// `DATA/.atlas/restore-NAME`, ready to be swapped in. Nothing live has changed yet, so the server may keep
/// running while it is staged; dropping it removes the staging directory.
#[derive(Debug)]
pub struct StagedRestore {
    manifest: Manifest,
    data_dir: PathBuf,
    work: PathBuf,
}

impl StagedRestore {
    /// The backup being restored.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Swaps each world directory in whole, the live one kept as `<world>.before-restore-<time>`, then each
    /// included non-world file, the live one kept under `.atlas/before-restore-<time>/`; each by an atomic
    /// exchange, so no path is ever missing. A failed swap puts back everything it changed; when even that
    /// fails, [`BackupError::SwapRollBack`] says where things are, and the server must not be started. The
    /// server must not be running, and `_world` keeps a capture (or the runner's start) out meanwhile.
    pub async fn swap(self, _world: &WorldLock) -> Result<Restored, BackupError> {
        let (manifest, data_dir, tree) = (self.manifest.clone(), self.data_dir.clone(), self.work.join("tree"));
        let stamp = Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
        let previous = tokio::task::spawn_blocking(move || swap_in(&manifest, &data_dir, &tree, &stamp))
            .await
            .map_err(|source| BackupError::Thread { source })??;
        Ok(Restored { manifest: self.manifest.clone(), previous })
    }
}

impl Drop for StagedRestore {
    fn drop(&mut self) {
        // Blocking, but only a rename-emptied tree (after a swap) or a restore abandoned on an error path.
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Downloads the backup `name` and checks it in full into `DATA/.atlas/restore-NAME`. A missing, corrupt or
/// truncated archive fails here, before anything live is touched.
pub async fn stage_restore(store: &Store, name: &str, data_dir: &Path) -> Result<StagedRestore, BackupError> {
    stage_restore_with_progress(store, name, data_dir, &Progress::default()).await
}

/// [`stage_restore`], reporting the download on `progress`.
pub async fn stage_restore_with_progress(
    store: &Store,
    name: &str,
    data_dir: &Path,
    progress: &Progress,
) -> Result<StagedRestore, BackupError> {
    let manifest = manifest(store, name).await?;
    // The digest covers the archive, not the manifest: its names become paths, so they must be plain names.
    for root in manifest.worlds.iter().chain(&manifest.roots) {
        let plain = !root.is_empty() && !root.contains(['/', '\\']) && root != "." && root != ".." && root != ".atlas";
        if !plain || !manifest.roots.contains(root) {
            return Err(BackupError::UnsafeManifest { name: name.to_owned(), root: root.clone() });
        }
    }
    let work = data_dir.join(".atlas").join(format!("restore-{name}"));
    if work.exists() {
        tokio::fs::remove_dir_all(&work)
            .await
            .map_err(|source| BackupError::LocalDir { path: work.clone(), source })?;
    }
    let tree = work.join("tree");
    local_dir(&tree)?;
    // From here the guard removes the work directory on every error path.
    let staged = StagedRestore { manifest, data_dir: data_dir.to_owned(), work };
    let file = staged.work.join("archive.tar.zst");
    download_checked(store, &staged.manifest, &file, progress).await?;
    tracing::info!(
        backup = name,
        bytes = staged.manifest.archive_bytes,
        "archive downloaded, digest checked; extracting it"
    );
    let (path, dest, roots, key) =
        (file.clone(), tree.clone(), staged.manifest.roots.clone(), staged.manifest.archive_key.clone());
    let stats = tokio::task::spawn_blocking(move || {
        let input = std::fs::File::open(&path).map_err(|source| ArchiveError::ReadArchive { source })?;
        archive::extract_archive(std::io::BufReader::new(input), &dest, &roots)
    })
    .await
    .map_err(|source| BackupError::Thread { source })?
    .map_err(|source| BackupError::CheckArchive { key, source })?;
    check_counts(&staged.manifest, stats)?;
    let _ = tokio::fs::remove_file(&file).await;
    Ok(staged)
}

/// One change the swap made to the live data directory, undone in reverse order on a failure.
#[derive(Debug)]
enum SwapStep {
    /// `from` was renamed to `to`.
    Renamed { from: PathBuf, to: PathBuf },
    /// `a` and `b` were exchanged.
    Exchanged { a: PathBuf, b: PathBuf },
}

/// Swaps the restored `tree` into `data_dir`, in one blocking pass. Worlds are replaced whole, the live one
/// kept as `<world>.before-restore-<stamp>`; included (non-world) files are replaced one by one, each live one
/// kept under `.atlas/before-restore-<stamp>/`. Every replacement is a rename of the restored path next to
/// the live one followed by an atomic exchange (`renameat2(RENAME_EXCHANGE)`), so a kill at any point leaves
/// the live path whole, old or new, never missing. Any failure undoes every step taken.
fn swap_in(manifest: &Manifest, data_dir: &Path, tree: &Path, stamp: &str) -> Result<Vec<PathBuf>, BackupError> {
    swap_in_steps(manifest, data_dir, tree, &unused_stamp(manifest, data_dir, stamp), &mut || {})
}

/// `stamp`, or `stamp-2`, `stamp-3`... the first that names no kept path yet. The stamp is to the second, and
/// a restore killed part-way leaves what it kept under its stamp: a second restore within that second must
/// not rename over it (a kept file would be replaced, a kept world would make the swap fail).
fn unused_stamp(manifest: &Manifest, data_dir: &Path, stamp: &str) -> String {
    let taken = |candidate: &str| {
        let extras = data_dir.join(".atlas").join(format!("before-restore-{candidate}"));
        std::fs::symlink_metadata(extras).is_ok()
            || manifest.worlds.iter().any(|world| {
                std::fs::symlink_metadata(data_dir.join(format!("{world}.before-restore-{candidate}"))).is_ok()
            })
    };
    let mut candidate = stamp.to_owned();
    let mut n = 1;
    while taken(&candidate) {
        n += 1;
        candidate = format!("{stamp}-{n}");
    }
    candidate
}

/// [`swap_in`] calling `step` before each rename or exchange, so a test can stop it at each one as a kill would.
fn swap_in_steps(
    manifest: &Manifest,
    data_dir: &Path,
    tree: &Path,
    stamp: &str,
    step: &mut dyn FnMut(),
) -> Result<Vec<PathBuf>, BackupError> {
    // Everything is extracted and checked: from here on the live data directory changes.
    let extras_aside = data_dir.join(".atlas").join(format!("before-restore-{stamp}"));
    let mut steps = Vec::new();
    let mut previous = Vec::new();
    let mut swap = || -> Result<(), (PathBuf, std::io::Error)> {
        for world in &manifest.worlds {
            let aside = data_dir.join(format!("{world}.before-restore-{stamp}"));
            if place(&tree.join(world), &data_dir.join(world), &aside, false, &mut steps, step)? {
                previous.push(aside);
            }
        }
        let mut extras = false;
        for root in manifest.roots.iter().filter(|r| !manifest.worlds.contains(r)) {
            extras |= place(&tree.join(root), &data_dir.join(root), &extras_aside.join(root), true, &mut steps, step)?;
        }
        if extras {
            previous.push(extras_aside.clone());
        }
        Ok(())
    };
    let Err((path, source)) = swap() else { return Ok(previous) };
    let failures = roll_back(&steps);
    if failures.is_empty() {
        return Err(BackupError::SwapWorld { world: path.display().to_string(), source });
    }
    Err(BackupError::SwapRollBack { path, source, failures })
}

/// Puts the restored `staged` at `live`. With `live` present, `staged` is first renamed to `aside` (on the same
/// filesystem) and then exchanged with `live`, so `aside` ends up holding the replaced one; returns whether
/// something was replaced. With `merge`, directories present on both sides are merged entry by entry
/// (includes), else replaced whole (worlds).
fn place(
    staged: &Path,
    live: &Path,
    aside: &Path,
    merge: bool,
    steps: &mut Vec<SwapStep>,
    step: &mut dyn FnMut(),
) -> Result<bool, (PathBuf, std::io::Error)> {
    fn at(path: &Path) -> impl FnOnce(std::io::Error) -> (PathBuf, std::io::Error) + '_ {
        move |e| (path.to_owned(), e)
    }
    let is_dir = std::fs::symlink_metadata(staged).map_err(at(staged))?.is_dir();
    let live_meta = match std::fs::symlink_metadata(live) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err((live.to_owned(), e)),
    };
    match live_meta {
        None => {
            step();
            std::fs::rename(staged, live).map_err(at(live))?;
            steps.push(SwapStep::Renamed { from: staged.to_owned(), to: live.to_owned() });
            Ok(false)
        }
        Some(meta) if merge && is_dir && meta.is_dir() => {
            let mut replaced = false;
            for entry in std::fs::read_dir(staged).map_err(at(staged))? {
                let name = entry.map_err(at(staged))?.file_name();
                replaced |= place(&staged.join(&name), &live.join(&name), &aside.join(&name), merge, steps, step)?;
            }
            Ok(replaced)
        }
        Some(_) => {
            if let Some(parent) = aside.parent() {
                std::fs::create_dir_all(parent).map_err(at(parent))?;
            }
            step();
            std::fs::rename(staged, aside).map_err(at(aside))?;
            steps.push(SwapStep::Renamed { from: staged.to_owned(), to: aside.to_owned() });
            step();
            exchange(aside, live).map_err(at(live))?;
            steps.push(SwapStep::Exchanged { a: aside.to_owned(), b: live.to_owned() });
            Ok(true)
        }
    }
}

/// Exchanges two paths atomically (`renameat2(RENAME_EXCHANGE)`). On a filesystem without it, falls back to
/// three renames through a temporary name (not atomic: a kill in between leaves `b` at `b.exchanging`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(()),
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
            tracing::warn!(path = %b.display(), "the filesystem cannot exchange paths atomically; swapping by renames");
            let mut tmp = b.as_os_str().to_owned();
            tmp.push(".exchanging");
            let tmp = PathBuf::from(tmp);
            std::fs::rename(b, &tmp)?;
            if let Err(e) = std::fs::rename(a, b) {
                let _ = std::fs::rename(&tmp, b);
                return Err(e);
            }
            std::fs::rename(&tmp, a)
        }
        Err(errno) => Err(errno.into()),
    }
}

/// Undoes `steps` newest first; returns what could not be undone (each saying where things are now).
fn roll_back(steps: &[SwapStep]) -> Vec<String> {
    let mut failures = Vec::new();
    for step in steps.iter().rev() {
        let (undone, what) = match step {
            SwapStep::Renamed { from, to } => {
                (std::fs::rename(to, from), format!("{} (to be moved back to {})", to.display(), from.display()))
            }
            SwapStep::Exchanged { a, b } => (
                exchange(a, b),
                format!(
                    "{} holds the restored copy and {} the live one (to be exchanged back)",
                    b.display(),
                    a.display()
                ),
            ),
        };
        if let Err(e) = undone {
            failures.push(format!("{what}: {e}"));
        }
    }
    failures
}

/// What `prune` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Backups kept, newest first.
    pub kept: Vec<String>,
    /// Backups deleted, newest first.
    pub deleted: Vec<String>,
    /// Archive keys without a manifest that were removed.
    pub orphans: Vec<String>,
}

/// Applies `policy`: deletes the backups retention does not keep, oldest first, each by its manifest first
/// and its archive second, then removes archives that have no manifest and are older than the newest backup.
///
/// Why this order: deleting the manifest first makes a backup disappear atomically; a crash between the two
/// deletes leaves an orphan archive, which is not a backup (nothing lists or restores it) and which the next
/// prune removes. The reverse order could leave a manifest whose archive is gone: a listed backup that cannot
/// be restored. Oldest first, so an interrupted prune has removed the least valuable backups. Orphans newer
/// than the newest manifest are left alone: they may be a backup still being written.
pub async fn prune(store: &Store, policy: &Retention) -> Result<Pruned, BackupError> {
    let (manifests, manifest_names) = list_all(store).await?;
    let verified = verified_names(store).await?;
    let candidates: Vec<_> = manifests
        .iter()
        .map(|m| retention::Candidate { name: m.name.clone(), time: m.time, verified: verified.contains(&m.name) })
        .collect();
    let plan = retention::plan(&candidates, policy);
    for name in plan.delete.iter().rev() {
        let Some(doomed) = manifests.iter().find(|m| &m.name == name) else { continue };
        delete(store, &manifest_key(name)).await?;
        delete(store, &ObjectPath::from(doomed.archive_key.as_str())).await?;
        if verified.contains(name) {
            delete(store, &verified_key(name)).await?;
        }
        tracing::info!(backup = %name, "backup pruned");
    }

    let mut orphans = Vec::new();
    let kept_archives: Vec<&str> =
        manifests.iter().filter(|m| plan.keep.contains(&m.name)).map(|m| m.archive_key.as_str()).collect();
    if let Some(newest) = manifests.first() {
        let archives = list_dir(store, ARCHIVE_DIR).await?;
        for meta in archives {
            let key = meta.location.to_string();
            let name = meta.location.filename().and_then(|f| f.strip_suffix(".tar.zst")).unwrap_or_default();
            let has_manifest = manifest_names.contains(name) && !plan.delete.iter().any(|d| d == name);
            if kept_archives.contains(&key.as_str()) || has_manifest || key.as_str() >= newest.archive_key.as_str() {
                continue;
            }
            delete(store, &meta.location).await?;
            orphans.push(key);
        }
    }
    Ok(Pruned { kept: plan.keep, deleted: plan.delete, orphans })
}

async fn delete(store: &Store, key: &ObjectPath) -> Result<(), BackupError> {
    match store.objects.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(BackupError::Delete { key: key.to_string(), source }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "b".to_owned(),
            time: Timestamp::UNIX_EPOCH,
            server_version: None,
            pack_version: None,
            worlds: vec!["world".to_owned(), "world_nether".to_owned()],
            roots: vec!["config".to_owned(), "world".to_owned(), "world_nether".to_owned()],
            files: 0,
            raw_bytes: 0,
            archive_bytes: 0,
            archive_sha256: String::new(),
            archive_key: String::new(),
            save_off_ms: None,
            upload_ms: None,
        }
    }

    /// A live data dir (worlds and config) and a restored tree beside it.
    fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let (data, tree) = (tmp.path().join("data"), tmp.path().join("data/.atlas/restore-b/tree"));
        write(&data.join("world/level.dat"), "live");
        write(&data.join("world/live-only.dat"), "live");
        write(&data.join("config/a.toml"), "live a");
        write(&data.join("config/untouched.toml"), "live u");
        write(&tree.join("world/level.dat"), "restored");
        write(&tree.join("world_nether/level.dat"), "restored nether");
        write(&tree.join("config/a.toml"), "restored a");
        write(&tree.join("config/sub/new.toml"), "restored new");
        (tmp, data, tree)
    }

    #[test]
    fn compression_threads_shrink_as_the_level_grows() {
        assert_eq!(max_threads_for_level(1), 4);
        assert_eq!(max_threads_for_level(3), 4);
        assert_eq!(max_threads_for_level(5), 4);
        assert_eq!(max_threads_for_level(6), 2);
        assert_eq!(max_threads_for_level(9), 2);
        assert_eq!(max_threads_for_level(10), 1);
        assert_eq!(max_threads_for_level(19), 1);
        assert!((1..=22).all(|l| max_threads_for_level(l) >= max_threads_for_level(l + 1)));
    }

    #[test]
    fn swap_replaces_worlds_whole_and_included_files_one_by_one_keeping_the_old_ones() {
        let (_tmp, data, tree) = fixture();
        let previous = swap_in(&manifest(), &data, &tree, "T").unwrap();
        assert_eq!(read(&data.join("world/level.dat")), "restored");
        assert!(!data.join("world/live-only.dat").exists());
        assert_eq!(read(&data.join("world_nether/level.dat")), "restored nether");
        assert_eq!(read(&data.join("config/a.toml")), "restored a");
        assert_eq!(read(&data.join("config/sub/new.toml")), "restored new");
        assert_eq!(read(&data.join("config/untouched.toml")), "live u");
        assert_eq!(previous, [data.join("world.before-restore-T"), data.join(".atlas/before-restore-T")]);
        assert_eq!(read(&data.join("world.before-restore-T/live-only.dat")), "live");
        assert_eq!(read(&data.join(".atlas/before-restore-T/config/a.toml")), "live a");
    }

    #[test]
    fn a_swap_killed_before_any_of_its_steps_leaves_each_path_old_or_new() {
        /// What a path holds: a file's text, or a directory's files (relative path -> text).
        fn state(path: &Path) -> Option<std::collections::BTreeMap<String, String>> {
            fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
                for entry in std::fs::read_dir(dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        walk(root, &path, out);
                    } else {
                        out.insert(path.strip_prefix(root).unwrap().display().to_string(), read(&path));
                    }
                }
            }
            let meta = std::fs::symlink_metadata(path).ok()?;
            let mut out = std::collections::BTreeMap::new();
            if meta.is_dir() {
                walk(path, path, &mut out)
            } else {
                out.insert(String::new(), read(path));
            }
            Some(out)
        }
        // The worlds and included files, each as it was live (old) and as the backup has it (new).
        let paths = ["world", "world_nether", "config/a.toml", "config/sub/new.toml", "config/untouched.toml"];
        let (_tmp, data, tree) = fixture();
        write(&data.join("world_nether/level.dat"), "live nether");
        let old: Vec<_> = paths.iter().map(|p| state(&data.join(p))).collect();
        let new: Vec<_> = paths.iter().map(|p| state(&tree.join(p)).or_else(|| state(&data.join(p)))).collect();
        /// Thrown by the step hook: the swap stops there, undoing nothing, as a killed process would.
        struct Killed;
        let mut kill_at = 0;
        loop {
            let (_tmp, data, tree) = fixture();
            write(&data.join("world_nether/level.dat"), "live nether");
            let mut n = 0;
            let mut step = || {
                if n == kill_at {
                    std::panic::resume_unwind(Box::new(Killed));
                }
                n += 1;
            };
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                swap_in_steps(&manifest(), &data, &tree, "T", &mut step)
            }));
            let mut new_ones = 0;
            for (i, path) in paths.iter().enumerate() {
                let now = state(&data.join(path));
                assert!(now == old[i] || now == new[i], "killed at step {kill_at}: {path} is {now:?}");
                new_ones += usize::from(now == new[i] && new[i] != old[i]);
            }
            // Nothing live is lost: a replaced world is kept aside whole.
            for (i, world) in paths[..2].iter().enumerate() {
                if state(&data.join(world)) == new[i] {
                    assert_eq!(state(&data.join(format!("{world}.before-restore-T"))), old[i], "{world} at {kill_at}");
                }
            }
            match run {
                Ok(swapped) => {
                    swapped.unwrap();
                    assert_eq!(new_ones, 4, "a finished swap");
                    break;
                }
                Err(payload) => assert!(payload.is::<Killed>(), "the swap panicked by itself at step {kill_at}"),
            }
            kill_at += 1;
        }
        // Two worlds replaced (a rename aside and an exchange each), an included file replaced, and a
        // directory of them added (one rename).
        assert_eq!(kill_at, 2 + 2 + 2 + 1);
    }

    #[test]
    fn a_second_restore_within_the_same_second_keeps_what_the_first_kept() {
        let (_tmp, data, tree) = fixture();
        // A restore killed part-way within this second kept the live world and an included file under "T".
        write(&data.join("world.before-restore-T/level.dat"), "kept by the first");
        write(&data.join(".atlas/before-restore-T/config/a.toml"), "kept a by the first");
        let previous = swap_in(&manifest(), &data, &tree, "T").unwrap();
        assert_eq!(previous, [data.join("world.before-restore-T-2"), data.join(".atlas/before-restore-T-2")]);
        assert_eq!(read(&data.join("world.before-restore-T/level.dat")), "kept by the first");
        assert_eq!(read(&data.join(".atlas/before-restore-T/config/a.toml")), "kept a by the first");
        assert_eq!(read(&data.join("world.before-restore-T-2/level.dat")), "live");
        assert_eq!(read(&data.join(".atlas/before-restore-T-2/config/a.toml")), "live a");
        assert_eq!(read(&data.join("world/level.dat")), "restored");
        // Only the included file's kept copy under "T" (no world): still another stamp.
        let (_tmp, data, tree) = fixture();
        write(&data.join(".atlas/before-restore-T/config/a.toml"), "kept a by the first");
        swap_in(&manifest(), &data, &tree, "T").unwrap();
        assert_eq!(read(&data.join(".atlas/before-restore-T/config/a.toml")), "kept a by the first");
        assert_eq!(read(&data.join(".atlas/before-restore-T-2/config/a.toml")), "live a");
    }

    #[test]
    fn a_failed_swap_puts_everything_back() {
        let (_tmp, data, tree) = fixture();
        // The included file's aside directory cannot be made: the swap fails after the worlds were swapped.
        // (Given its stamp, as swap_in would pick another one past a path in the way.)
        write(&data.join(".atlas/before-restore-T/config"), "in the way");
        let err = swap_in_steps(&manifest(), &data, &tree, "T", &mut || {}).unwrap_err();
        assert!(matches!(err, BackupError::SwapWorld { .. }), "{err:?}");
        assert_eq!(read(&data.join("world/level.dat")), "live");
        assert_eq!(read(&data.join("world/live-only.dat")), "live");
        assert!(!data.join("world_nether").exists());
        assert!(!data.join("world.before-restore-T").exists());
        assert_eq!(read(&data.join("config/a.toml")), "live a");
        assert_eq!(read(&tree.join("world/level.dat")), "restored");
        assert_eq!(read(&tree.join("world_nether/level.dat")), "restored nether");
        assert_eq!(read(&tree.join("config/a.toml")), "restored a");
    }
}
