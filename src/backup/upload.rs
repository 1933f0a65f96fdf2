//! Streams an archive of a directory into a multipart upload with bounded memory, hashing it on the way;
//! an upload that fails or is dropped is aborted, so it leaves no object and no open multipart upload.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartId, MultipartUpload, ObjectStoreExt, PutPayload, PutResult, UploadPart, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::Progress;
use super::archive::{ArchiveError, ArchiveStats, write_archive_counted};
use super::store::Store;

/// Where the ids of multipart uploads in progress are recorded, relative to the data directory.
pub const JOURNAL_DIR: &str = ".atlas/backup-uploads";

/// The size of each uploaded part (S3 needs at least 5 MiB for all but the last).
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// The size of the chunks handed from the compressing thread to the uploader.
const CHUNK_SIZE: usize = 1024 * 1024;
/// Chunks in flight between the compressing thread and the uploader.
const CHANNEL_CHUNKS: usize = 4;
/// Parts uploaded concurrently. Peak buffered memory is about
/// `CHANNEL_CHUNKS * CHUNK_SIZE + (PARALLEL_PARTS + 1) * PART_SIZE` (28 MiB).
const PARALLEL_PARTS: usize = 2;

/// A finished upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// What the archive holds.
    pub stats: ArchiveStats,
    /// The compressed size.
    pub archive_bytes: u64,
    /// The SHA-256 of the compressed archive, lowercase hex.
    pub sha256: String,
}

/// Why an upload failed. The multipart upload has been aborted in every case.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("start the multipart upload of {key}")]
    StartUpload { key: String, source: object_store::Error },
    #[error("upload a part of {key}")]
    UploadPart { key: String, source: object_store::Error },
    #[error("complete the multipart upload of {key}")]
    CompleteUpload { key: String, source: object_store::Error },
    #[error("write the archive of {dir}")]
    WriteArchive { dir: PathBuf, source: ArchiveError },
    #[error("the multipart upload of {key} was closed early")]
    UploadClosed { key: String },
    #[error("the archive writer thread failed")]
    WriterThread { source: tokio::task::JoinError },
    #[error("the task starting the multipart upload of {key} failed")]
    StartTask { key: String, source: tokio::task::JoinError },
    #[error("record the upload in {path}")]
    Journal { path: PathBuf, source: io::Error },
}

impl UploadError {
    /// A short static label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::StartUpload { source, .. }
            | Self::UploadPart { source, .. }
            | Self::CompleteUpload { source, .. } => {
                // A refused key or a missing bucket is not a transient upload failure: say which.
                match super::store::error_category(source) {
                    "credentials" => "credentials",
                    "bucket_missing" => "bucket_missing",
                    _ => "upload",
                }
            }
            Self::WriteArchive { source, .. } => source.category(),
            Self::WriterThread { .. } | Self::StartTask { .. } | Self::UploadClosed { .. } => "internal",
            Self::Journal { .. } => "local_io",
        }
    }
}

/// Hands fixed-size chunks to the uploader; blocks while the channel is full (that is the memory bound).
struct ChannelWriter {
    buf: Vec<u8>,
    tx: mpsc::Sender<Bytes>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_SIZE)));
        self.tx.blocking_send(chunk).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_SIZE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK_SIZE {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Aborts the multipart upload when dropped unfinished (an error, or the future being cancelled).
struct AbortOnDrop(Option<WriteMultipart>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(upload) = self.0.take() {
            abort_in_background(abort_settled(upload), "aborting a cancelled multipart upload failed");
        }
    }
}

/// Runs `abort` on the current runtime without waiting for it (a `Drop` cannot), logging `failed` with
/// its error.
fn abort_in_background(abort: impl Future<Output = object_store::Result<()>> + Send + 'static, failed: &'static str) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(error) = abort.await {
                tracing::warn!(%error, "{failed}");
            }
        });
    }
}

/// Aborts an unfinished upload once the parts already sent have been answered. A part's request that is
/// merely cancelled may still be stored: S3 documents that parts in flight during an abort may succeed, and
/// that the abort may then have to be repeated to free them. Waiting first leaves no part to race the
/// abort. Each part's wait is bounded by the client's request timeout.
async fn abort_settled(mut upload: WriteMultipart) -> object_store::Result<()> {
    // Each failed part is one fewer in flight; wait for the rest.
    while upload.wait_for_capacity(0).await.is_err() {}
    upload.abort().await
}

/// Archives `dir` (tar + zstd at `level`) straight into the object `key` by multipart upload. Where the store
/// has a low-level multipart API, the upload's id is recorded under `journal` until it is completed or
/// aborted, so an upload whose abort could not reach the store is aborted later by [`abort_stale`].
pub async fn upload_archive(
    store: &Store,
    key: &ObjectPath,
    dir: PathBuf,
    level: i32,
    threads: u32,
    journal: &Path,
    progress: Arc<Progress>,
) -> Result<Uploaded, UploadError> {
    let upload = start_upload(store, key, journal).await?;
    stream(upload, key.as_ref(), dir, level, threads, progress).await
}

/// Starts the multipart upload of `key` on a task of its own. The store holds the upload before its answer
/// arrives with the id: a backup cancelled in between would never learn which upload to abort. The task
/// outlives such a cancel, and the upload it started is aborted if nobody claims it.
async fn start_upload(
    store: &Store,
    key: &ObjectPath,
    journal: &Path,
) -> Result<Box<dyn MultipartUpload>, UploadError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (store, key, journal) = (store.clone(), key.clone(), journal.to_owned());
    let shown = key.to_string();
    let task = tokio::spawn(async move {
        let started = begin_upload(&store, &key, &journal).await;
        // Not received (the backup was cancelled): dropped, so aborted.
        let _ = tx.send(started.map(|upload| Unclaimed(Some(upload))));
    });
    let Ok(started) = rx.await else {
        return Err(match task.await {
            Err(source) => UploadError::StartTask { key: shown, source },
            Ok(()) => UploadError::UploadClosed { key: shown },
        });
    };
    started?.0.take().ok_or(UploadError::UploadClosed { key: shown })
}

/// An upload handed from the task that started it; aborted when dropped before it is taken out.
struct Unclaimed(Option<Box<dyn MultipartUpload>>);

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if let Some(mut upload) = self.0.take() {
            let abort = async move { upload.abort().await };
            abort_in_background(abort, "aborting the multipart upload of a cancelled backup failed");
        }
    }
}

async fn begin_upload(
    store: &Store,
    key: &ObjectPath,
    journal: &Path,
) -> Result<Box<dyn MultipartUpload>, UploadError> {
    let start = |source| UploadError::StartUpload { key: key.to_string(), source };
    let Some((multipart, path)) = store.multipart(key) else {
        return store.objects.put_multipart(key).await.map_err(start);
    };
    let id = multipart.create_multipart(&path).await.map_err(start)?;
    let record = journal.join(format!("{}.json", hex::encode(Sha256::digest(id.as_bytes()))));
    let written = write_record(&record, &JournalEntry { key: path.to_string(), id: id.clone() });
    let mut upload = Journaled { store: multipart, path, id, parts: Arc::default(), next: 0, record };
    if let Err(source) = written {
        let _ = upload.abort().await;
        return Err(UploadError::Journal { path: journal.to_owned(), source });
    }
    Ok(Box::new(upload))
}

/// One recorded upload.
#[derive(Debug, Serialize, Deserialize)]
struct JournalEntry {
    key: String,
    id: MultipartId,
}

/// Writes `entry` to `record` whole or not at all: a temporary file, fsynced, renamed into place, the
/// directory fsynced, so a crash never leaves an empty or half record behind under the record's name.
fn write_record(record: &Path, entry: &JournalEntry) -> io::Result<()> {
    let dir = record.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let body = serde_json::to_vec(entry).map_err(io::Error::other)?;
    let mut tmp = record.as_os_str().to_owned();
    tmp.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&body)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, record)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The suffix of a record being written; one left behind was never committed.
const TMP_SUFFIX: &str = ".tmp";

/// Aborts the uploads recorded under `journal` by backups that failed while the store was unreachable (or
/// were killed), forgetting each once the store has no such upload. One that still cannot be aborted stays
/// recorded for the next time; it does not stop this backup. A record that cannot be read is kept and
/// logged (it may name an upload still open: the bucket's AbortIncompleteMultipartUpload rule is the
/// backstop); a temporary one left by a crash mid-write is removed.
pub async fn abort_stale(store: &Store, journal: &Path) {
    let Ok(entries) = std::fs::read_dir(journal) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let read = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<JournalEntry>(&b).map_err(|e| e.to_string()));
        let entry = match read {
            Ok(entry) => entry,
            Err(error) if path.to_string_lossy().ends_with(TMP_SUFFIX) => {
                // Never renamed into place; written right after the upload started, so its upload (if any)
                // is left to the bucket's lifecycle rule.
                tracing::warn!(%error, path = %path.display(), "removing an uncommitted upload record");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    path = %path.display(),
                    "an upload record cannot be read; kept: abort its upload by hand or let the bucket's lifecycle rule do it, then delete it"
                );
                continue;
            }
        };
        let Some((multipart, _)) = store.multipart(&ObjectPath::from("")) else { return };
        match multipart.abort_multipart(&ObjectPath::from(entry.key.as_str()), &entry.id).await {
            Ok(()) => {
                tracing::info!(key = %entry.key, "aborted the multipart upload of an earlier failed backup");
                let _ = std::fs::remove_file(&path);
            }
            Err(object_store::Error::NotFound { .. }) => {
                let _ = std::fs::remove_file(&path);
            }
            Err(error) if error.to_string().contains("NoSuchUpload") => {
                let _ = std::fs::remove_file(&path);
            }
            Err(error) => {
                tracing::warn!(%error, key = %entry.key, "the multipart upload of an earlier failed backup could not be aborted yet");
            }
        }
    }
}

/// A multipart upload through [`MultipartStore`], which knows its id, and whose journal record is removed
/// once it is completed or aborted.
struct Journaled {
    store: Arc<dyn MultipartStore>,
    path: ObjectPath,
    id: MultipartId,
    parts: Arc<Mutex<Vec<Option<PartId>>>>,
    next: usize,
    record: PathBuf,
}

impl std::fmt::Debug for Journaled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journaled").field("path", &self.path).field("id", &self.id).finish_non_exhaustive()
    }
}

type BoxedResult<'a, T> = BoxFuture<'a, object_store::Result<T>>;

// Written out by hand: the trait is `#[async_trait]` and this crate does not depend on async-trait.
impl MultipartUpload for Journaled {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let index = self.next;
        self.next += 1;
        let (store, path, id, parts) = (self.store.clone(), self.path.clone(), self.id.clone(), self.parts.clone());
        Box::pin(async move {
            let part = store.put_part(&path, &id, index, data).await?;
            let mut parts = parts.lock().map_err(|_| object_store::Error::Generic {
                store: "multipart",
                source: "the part list lock was poisoned".into(),
            })?;
            if parts.len() <= index {
                parts.resize(index + 1, None);
            }
            parts[index] = Some(part);
            Ok(())
        })
    }

    fn complete<'life0, 'async_trait>(&'life0 mut self) -> BoxedResult<'async_trait, PutResult>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let parts: Option<Vec<PartId>> =
                self.parts.lock().ok().and_then(|parts| parts.iter().cloned().collect::<Option<Vec<_>>>());
            let Some(parts) = parts else {
                return Err(object_store::Error::Generic { store: "multipart", source: "a part is missing".into() });
            };
            let done = self.store.complete_multipart(&self.path, &self.id, parts).await?;
            let _ = std::fs::remove_file(&self.record);
            Ok(done)
        })
    }

    fn abort<'life0, 'async_trait>(&'life0 mut self) -> BoxedResult<'async_trait, ()>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.store.abort_multipart(&self.path, &self.id).await?;
            let _ = std::fs::remove_file(&self.record);
            Ok(())
        })
    }
}

/// Archives `dir` into an upload already started (`key` names it in errors): the part of
/// [`upload_archive`] that owns the upload, completing it on success and aborting it on every other path.
pub async fn stream_archive(
    upload: Box<dyn MultipartUpload>,
    key: &str,
    dir: PathBuf,
    level: i32,
) -> Result<Uploaded, UploadError> {
    stream(upload, key, dir, level, 1, Arc::default()).await
}

async fn stream(
    upload: Box<dyn MultipartUpload>,
    key: &str,
    dir: PathBuf,
    level: i32,
    threads: u32,
    progress: Arc<Progress>,
) -> Result<Uploaded, UploadError> {
    let shown = key.to_owned();
    let mut guard = AbortOnDrop(Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE)));

    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let writer_dir = dir.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter { buf: Vec::with_capacity(CHUNK_SIZE), tx };
        write_archive_counted(&writer_dir, &mut out, level, threads, &progress)
    });

    let mut hasher = Sha256::new();
    let mut archive_bytes = 0u64;
    let mut part_error = None;
    while let Some(chunk) = rx.recv().await {
        let Some(multipart) = guard.0.as_mut() else { break };
        if let Err(source) = multipart.wait_for_capacity(PARALLEL_PARTS).await {
            part_error = Some(source);
            break;
        }
        hasher.update(&chunk);
        archive_bytes += chunk.len() as u64;
        multipart.put(chunk);
    }
    // Closing the receiver stops the writer thread if the upload broke first.
    drop(rx);
    let written = writer.await;
    let abort = |guard: &mut AbortOnDrop| guard.0.take();

    if let Some(source) = part_error {
        abort_now(abort(&mut guard)).await;
        return Err(UploadError::UploadPart { key: shown, source });
    }
    let stats = match written {
        Ok(Ok(stats)) => stats,
        Ok(Err(source)) => {
            abort_now(abort(&mut guard)).await;
            return Err(UploadError::WriteArchive { dir, source });
        }
        Err(source) => {
            abort_now(abort(&mut guard)).await;
            return Err(UploadError::WriterThread { source });
        }
    };
    // Every full part answered before `finish`, whose own abort on a failed part would cancel the others.
    if let Some(multipart) = guard.0.as_mut()
        && let Err(source) = multipart.wait_for_capacity(0).await
    {
        abort_now(abort(&mut guard)).await;
        return Err(UploadError::UploadPart { key: shown, source });
    }
    let Some(multipart) = guard.0.take() else {
        return Err(UploadError::UploadClosed { key: shown });
    };
    // `finish` sends the last part alone and aborts the upload itself when that or the completion fails.
    multipart.finish().await.map_err(|source| UploadError::CompleteUpload { key: shown, source })?;
    Ok(Uploaded { stats, archive_bytes, sha256: hex::encode(hasher.finalize()) })
}

async fn abort_now(upload: Option<WriteMultipart>) {
    if let Some(upload) = upload
        && let Err(error) = abort_settled(upload).await
    {
        tracing::warn!(%error, "aborting a failed multipart upload failed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_records_are_aborted_unreadable_ones_kept_uncommitted_ones_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let journal = tmp.path().join("journal");
        let store = Store::memory();
        let (multipart, path) = store.multipart(&ObjectPath::from("archives/a.tar.zst")).unwrap();
        let id = multipart.create_multipart(&path).await.unwrap();
        let record = journal.join("good.json");
        write_record(&record, &JournalEntry { key: path.to_string(), id }).unwrap();
        assert!(!journal.join(format!("good.json{TMP_SUFFIX}")).exists());
        std::fs::write(journal.join("empty.json"), b"").unwrap();
        std::fs::write(journal.join(format!("torn.json{TMP_SUFFIX}")), b"{\"ke").unwrap();

        abort_stale(&store, &journal).await;
        assert!(!record.exists(), "an aborted upload's record is forgotten");
        assert!(journal.join("empty.json").exists(), "an unreadable record was deleted blindly");
        assert!(!journal.join(format!("torn.json{TMP_SUFFIX}")).exists());
    }
}
