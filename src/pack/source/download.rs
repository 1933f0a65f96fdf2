//! One verified download: streamed to a `.partial` file while hashed, resumed with `Range`, retried
//! with backoff, checked, renamed into place.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{Client, StatusCode, Url};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Tee;
use super::{FetchOptions, Progress, SourceError, io_err};

/// What a download must hash to (lowercase hex digests) and weigh. Unset members are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    /// SHA-256.
    pub sha256: Option<String>,
    /// SHA-512.
    pub sha512: Option<String>,
    /// SHA-1.
    pub sha1: Option<String>,
    /// Size in bytes.
    pub size: Option<u64>,
}

impl Expected {
    /// Whether anything identifies the content (so a cached file can be trusted).
    pub(crate) fn has_digest(&self) -> bool {
        self.sha256.is_some() || self.sha512.is_some() || self.sha1.is_some()
    }
}

/// The hashers an [`Expected`] asks for.
struct Hashes {
    sha256: Option<Sha256>,
    sha512: Option<Sha512>,
    sha1: Option<Sha1>,
    size: u64,
}

impl Hashes {
    fn new(expected: &Expected) -> Self {
        Self {
            sha256: expected.sha256.as_ref().map(|_| Sha256::new()),
            sha512: expected.sha512.as_ref().map(|_| Sha512::new()),
            sha1: expected.sha1.as_ref().map(|_| Sha1::new()),
            size: 0,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.sha256 {
            h.update(bytes);
        }
        if let Some(h) = &mut self.sha512 {
            h.update(bytes);
        }
        if let Some(h) = &mut self.sha1 {
            h.update(bytes);
        }
        self.size += bytes.len() as u64;
    }

    /// The first mismatch with `expected`, if any.
    fn check(self, expected: &Expected, url: &Url) -> Result<(), SourceError> {
        if let Some(want) = expected.size
            && want != self.size
        {
            return Err(SourceError::VerifySize { url: url.to_string(), expected: want, actual: self.size });
        }
        let digests = [
            ("sha256", &expected.sha256, self.sha256.map(|h| hex::encode(h.finalize()))),
            ("sha512", &expected.sha512, self.sha512.map(|h| hex::encode(h.finalize()))),
            ("sha1", &expected.sha1, self.sha1.map(|h| hex::encode(h.finalize()))),
        ];
        for (algorithm, want, got) in digests {
            if let (Some(want), Some(got)) = (want, got)
                && !want.eq_ignore_ascii_case(&got)
            {
                return Err(SourceError::VerifyDigest {
                    url: url.to_string(),
                    algorithm,
                    expected: want.clone(),
                    actual: got,
                });
            }
        }
        Ok(())
    }
}

/// Hashes a whole file.
async fn hash_file(path: &Path, hashes: &mut Hashes) -> Result<(), SourceError> {
    let mut file = tokio::fs::File::open(path).await.map_err(io_err("open", path))?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).await.map_err(io_err("read", path))?;
        if n == 0 {
            return Ok(());
        }
        hashes.update(&buf[..n]);
    }
}

async fn remove_if_exists(path: &Path) -> Result<(), SourceError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Runs `attempt` until it succeeds, fails permanently, or `options.retries` retries are spent,
/// sleeping `base_delay * 2^n` between tries.
pub(crate) async fn retry<T, F, Fut>(options: &FetchOptions, what: &str, mut attempt: F) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SourceError>>,
{
    let mut n = 0;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && n < options.retries => {
                let delay = options.delay(n);
                tracing::warn!(what, error = %e, category = e.category(), retry_in_ms = delay.as_millis() as u64, "transient failure; retrying");
                tokio::time::sleep(delay).await;
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Downloads `url` to `dest`, checked against `expected`, through `partial`. A `dest` already there
/// with the expected digests is reused without network. Returns the bytes received.
pub(crate) async fn download(
    client: &Client,
    url: &Url,
    token: Option<&str>,
    expected: &Expected,
    partial: &Path,
    dest: &Path,
    options: &FetchOptions,
) -> Result<u64, SourceError> {
    let tee = options.tee.as_ref();
    if expected.has_digest() && tokio::fs::try_exists(dest).await.map_err(io_err("stat", dest))? {
        let mut hashes = Hashes::new(expected);
        hash_file(dest, &mut hashes).await?;
        if hashes.check(expected, url).is_ok() {
            tracing::debug!(url = %url, path = %dest.display(), "reusing a verified download");
            return Ok(0);
        }
    }
    remove_if_exists(dest).await?;
    if !expected.has_digest() {
        // Nothing to check a leftover prefix against: start over.
        remove_if_exists(partial).await?;
    }
    let received = AtomicU64::new(0);
    let counted = AtomicU64::new(0);
    if let Some(size) = expected.size {
        options.progress.add_total_bytes(size);
        counted.store(size, Ordering::Relaxed);
    }
    let tally = Tally { received: &received, progress: &options.progress, counted: &counted };
    let result = retry(options, url.as_str(), || async {
        let result = attempt(client, url, token, expected, partial, tally, tee).await;
        if let (Err(_), Some(tee)) = (&result, tee) {
            // A retry resumes or starts over: the consumer has a broken stream.
            tee.abort();
        }
        result
    })
    .await;
    if result.is_err() {
        // A failed download is not part of the total any more (a mirror may serve it instead).
        options.progress.sub_total_bytes(counted.load(Ordering::Relaxed));
    }
    if let Err(e) = &result
        && !e.is_transient()
    {
        // A permanent failure: the partial file is worthless (a transient one is kept to resume).
        remove_if_exists(partial).await?;
    }
    result?;
    if tee.is_some_and(Tee::is_verified) {
        // The archive went to the tee's consumer only: there is no file to keep.
        remove_if_exists(partial).await?;
        return Ok(received.into_inner());
    }
    tokio::fs::rename(partial, dest).await.map_err(io_err("rename", partial))?;
    Ok(received.into_inner())
}

/// Where an attempt counts what it receives.
#[derive(Clone, Copy)]
struct Tally<'a> {
    received: &'a AtomicU64,
    progress: &'a Progress,
    /// What the download added to the progress total (0: nothing yet).
    counted: &'a AtomicU64,
}

/// The size of the pieces a download hands to its [`Tee`].
const TEE_PIECE: usize = 1 << 20;

/// One try: resume `partial` when the server honours `Range`, else start over.
async fn attempt(
    client: &Client,
    url: &Url,
    token: Option<&str>,
    expected: &Expected,
    partial: &Path,
    tally: Tally<'_>,
    tee: Option<&Tee>,
) -> Result<(), SourceError> {
    let mut have = match tokio::fs::metadata(partial).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err("stat", partial)(e)),
    };
    if let Some(size) = expected.size
        && have > size
    {
        remove_if_exists(partial).await?;
        have = 0;
    }
    let mut request = client.get(url.clone());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if have > 0 {
        request = request.header(RANGE, format!("bytes={have}-"));
    }
    let request_err = |source| SourceError::Request { url: url.to_string(), source };
    let response = request.send().await.map_err(request_err)?;
    let status = response.status();
    let resume = match status {
        StatusCode::PARTIAL_CONTENT if have > 0 => {
            let range = response.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
            if !range.starts_with(&format!("bytes {have}-")) {
                return Err(SourceError::Status { url: url.to_string(), status: status.as_u16() });
            }
            true
        }
        StatusCode::OK => false,
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
            // The partial file is no prefix of this content: drop it; the retry starts over.
            remove_if_exists(partial).await?;
            return Err(SourceError::Truncated { url: url.to_string(), expected: have, received: 0 });
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(SourceError::Authorize { url: url.to_string(), status: status.as_u16() });
        }
        _ => return Err(SourceError::Status { url: url.to_string(), status: status.as_u16() }),
    };
    let mut hashes = Hashes::new(expected);
    // The consumer reads the archive from its start: a resumed download is not teed. A teed
    // attempt writes no file (the consumer has the bytes; writing them too would double the disk
    // traffic of a cold apply), so when it breaks the next attempt starts from zero.
    let tee = match tee {
        Some(tee) if resume => {
            tee.abort();
            None
        }
        Some(tee) if tee.is_open() => Some(tee),
        _ => None,
    };
    let mut file = if resume {
        hash_file(partial, &mut hashes).await?;
        tracing::info!(url = %url, offset = have, "resuming a broken download");
        tokio::fs::OpenOptions::new().append(true).open(partial).await.map_err(io_err("open", partial))?
    } else {
        tokio::fs::File::create(partial).await.map_err(io_err("create", partial))?
    };
    let announced = response.content_length().map(|n| n + hashes.size);
    if let Some(total) = announced
        && tally.counted.compare_exchange(0, total, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        tally.progress.add_total_bytes(total);
    }
    let mut body = response.bytes_stream();
    let mut pending = bytes::BytesMut::with_capacity(if tee.is_some() { TEE_PIECE * 2 } else { 0 });
    let mut writer = tokio::io::BufWriter::with_capacity(256 * 1024, &mut file);
    let outcome = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(request_err)?;
            if tee.is_none() {
                writer.write_all(&chunk).await.map_err(io_err("write", partial))?;
            }
            hashes.update(&chunk);
            if let Some(tee) = tee {
                // Handed on in large pieces: one wake-up of the consumer per MiB, not per packet.
                pending.extend_from_slice(&chunk);
                if pending.len() >= TEE_PIECE {
                    tee.send(pending.split().freeze()).await;
                }
            }
            tally.received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            tally.progress.add_bytes(chunk.len() as u64);
            if let Some(size) = expected.size
                && hashes.size > size
            {
                return Err(SourceError::VerifySize { url: url.to_string(), expected: size, actual: hashes.size });
            }
        }
        Ok(())
    }
    .await;
    // Keep what arrived, even after an error: the next try resumes from it.
    writer.flush().await.map_err(io_err("write", partial))?;
    outcome?;
    if let Some(tee) = tee
        && !pending.is_empty()
    {
        tee.send(pending.split().freeze()).await;
    }
    if let Some(announced) = announced
        && hashes.size < announced
    {
        return Err(SourceError::Truncated { url: url.to_string(), expected: announced, received: hashes.size });
    }
    if let Some(size) = expected.size
        && hashes.size < size
    {
        return Err(SourceError::Truncated { url: url.to_string(), expected: size, received: hashes.size });
    }
    // No fsync: a download is never trusted from disk without its digest (a kept file is hashed
    // again before reuse, a resumed one checked in full), and staging flushes the filesystem
    // before anything of it reaches the data dir.
    match hashes.check(expected, url) {
        Err(SourceError::VerifyDigest { .. }) if resume => {
            remove_if_exists(partial).await?;
            Err(SourceError::VerifyResumed { url: url.to_string() })
        }
        Ok(()) => {
            if let Some(tee) = tee {
                tee.verified();
            }
            Ok(())
        }
        result => result,
    }
}
