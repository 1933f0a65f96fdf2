//! Streams an archive of a directory into a multipart upload with bounded memory, hashing it on the way;
//! an upload that fails or is dropped is aborted, so it leaves no object and no open multipart upload.

use std::io::{self, Write};
use std::path::PathBuf;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::archive::{ArchiveError, ArchiveStats, write_archive};

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
            Self::WriterThread { .. } | Self::UploadClosed { .. } => "internal",
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
        if let Some(upload) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(error) = upload.abort().await {
                    tracing::warn!(%error, "aborting a cancelled multipart upload failed");
                }
            });
        }
    }
}

/// Archives `dir` (tar + zstd at `level`) straight into the object `key` by multipart upload.
pub async fn upload_archive(
    store: &dyn ObjectStore,
    key: &ObjectPath,
    dir: PathBuf,
    level: i32,
) -> Result<Uploaded, UploadError> {
    let shown = key.to_string();
    let upload =
        store.put_multipart(key).await.map_err(|source| UploadError::StartUpload { key: shown.clone(), source })?;
    stream_archive(upload, &shown, dir, level).await
}

/// Archives `dir` into an upload already started (`key` names it in errors): the part of
/// [`upload_archive`] that owns the upload, completing it on success and aborting it on every other path.
pub async fn stream_archive(
    upload: Box<dyn MultipartUpload>,
    key: &str,
    dir: PathBuf,
    level: i32,
) -> Result<Uploaded, UploadError> {
    let shown = key.to_owned();
    let mut guard = AbortOnDrop(Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE)));

    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let writer_dir = dir.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter { buf: Vec::with_capacity(CHUNK_SIZE), tx };
        write_archive(&writer_dir, &mut out, level)
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
    let Some(multipart) = guard.0.take() else {
        return Err(UploadError::UploadClosed { key: shown });
    };
    // `finish` aborts the upload itself when it fails.
    multipart.finish().await.map_err(|source| UploadError::CompleteUpload { key: shown, source })?;
    Ok(Uploaded { stats, archive_bytes, sha256: hex::encode(hasher.finalize()) })
}

async fn abort_now(upload: Option<WriteMultipart>) {
    if let Some(upload) = upload
        && let Err(error) = upload.abort().await
    {
        tracing::warn!(%error, "aborting a failed multipart upload failed");
    }
}
