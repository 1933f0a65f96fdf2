//! HTTP for the download APIs: one identified client, retries with backoff, streamed and hashed downloads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde::de::DeserializeOwned;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::ServerError;

/// PaperMC refuses generic user agents and asks for a contact URL; the others get the same one.
pub(crate) const USER_AGENT: &str =
    concat!("atlas-runner/", env!("CARGO_PKG_VERSION"), " (+https://github.com/atlas-runner/atlas-runner)");

/// Metadata documents are small; a bigger answer means the URL points at something else.
const MAX_DOCUMENT: usize = 16 * 1024 * 1024;

/// How often a transient failure is retried, and how long to wait before the first retry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { attempts: 4, backoff: Duration::from_millis(500) }
    }
}

/// What a download must match.
#[derive(Debug, Clone, Default)]
pub(crate) struct Expected {
    pub sha1: Option<String>,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

/// A verified download in a temporary file, waiting to be committed to the cache.
#[derive(Debug)]
pub(crate) struct Downloaded {
    pub temp: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    retry: Retry,
}

impl Http {
    pub fn new(retry: Retry) -> Result<Self, ServerError> {
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            // Between reads, not in total: a server jar takes a while on a slow link.
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(ServerError::HttpClient)?;
        Ok(Self { client, retry })
    }

    /// GETs a small document, retrying transient failures.
    pub async fn get_bytes(&self, url: &str) -> Result<Vec<u8>, ServerError> {
        self.with_retry(url, || self.get_bytes_once(url)).await
    }

    /// GETs and parses a JSON document.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T, ServerError> {
        let bytes = self.get_bytes(url).await?;
        parse_json(url, &bytes)
    }

    /// Streams `url` into a temporary file in `dir`, hashing as it goes, and checks it against
    /// `expected`. On any failure the temporary file is removed.
    pub async fn download(&self, url: &str, dir: &Path, expected: &Expected) -> Result<Downloaded, ServerError> {
        self.with_retry(url, || async move {
            let temp = dir.join(format!(".download-{}-{}.part", std::process::id(), unique()));
            let result = self.download_once(url, &temp, expected).await;
            if result.is_err() {
                // Best effort: a leftover .part file is only wasted space, never used.
                let _ = tokio::fs::remove_file(&temp).await;
            }
            result.map(|sha256| Downloaded { temp, sha256 })
        })
        .await
    }

    async fn with_retry<T, F, Fut>(&self, url: &str, mut once: F) -> Result<T, ServerError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ServerError>>,
    {
        let mut delay = self.retry.backoff;
        let mut attempt = 1;
        loop {
            match once().await {
                Err(e) if matches!(e, ServerError::Fetch { .. }) && attempt < self.retry.attempts => {
                    tracing::debug!(url, attempt, ?delay, "{e}; retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn send(&self, url: &str) -> Result<reqwest::Response, ServerError> {
        let response = self.client.get(url).send().await.map_err(|e| fetch_error(url, &e))?;
        let status = response.status();
        if status.is_success() {
            Ok(response)
        } else if status.is_server_error()
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
        {
            Err(ServerError::Fetch { url: url.to_owned(), reason: format!("HTTP {status}") })
        } else {
            Err(ServerError::FetchStatus { url: url.to_owned(), status: status.as_u16() })
        }
    }

    async fn get_bytes_once(&self, url: &str) -> Result<Vec<u8>, ServerError> {
        let response = self.send(url).await?;
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fetch_error(url, &e))?;
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(ServerError::ParseMetadata {
                    url: url.to_owned(),
                    detail: format!("larger than {MAX_DOCUMENT} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn download_once(&self, url: &str, temp: &Path, expected: &Expected) -> Result<String, ServerError> {
        let response = self.send(url).await?;
        let mut file = tokio::fs::File::create(temp).await.map_err(|e| ServerError::io(temp, e))?;
        let mut sha1 = Sha1::new();
        let mut sha256 = Sha256::new();
        let mut size: u64 = 0;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fetch_error(url, &e))?;
            size += chunk.len() as u64;
            if let Some(want) = expected.size
                && size > want
            {
                return Err(size_mismatch(url, want, size, " or more"));
            }
            sha1.update(&chunk);
            sha256.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| ServerError::io(temp, e))?;
        }
        file.sync_all().await.map_err(|e| ServerError::io(temp, e))?;
        if let Some(want) = expected.size
            && size != want
        {
            return Err(size_mismatch(url, want, size, ""));
        }
        let actual_sha1 = hex::encode(sha1.finalize());
        let actual_sha256 = hex::encode(sha256.finalize());
        check_digest(url, "sha1", expected.sha1.as_deref(), &actual_sha1)?;
        check_digest(url, "sha256", expected.sha256.as_deref(), &actual_sha256)?;
        Ok(actual_sha256)
    }
}

pub(crate) fn parse_json<T: DeserializeOwned>(url: &str, bytes: &[u8]) -> Result<T, ServerError> {
    serde_json::from_slice(bytes).map_err(|e| ServerError::ParseMetadata { url: url.to_owned(), detail: e.to_string() })
}

pub(crate) fn check_digest(
    url: &str,
    algorithm: &'static str,
    expected: Option<&str>,
    actual: &str,
) -> Result<(), ServerError> {
    match expected {
        Some(want) if !want.eq_ignore_ascii_case(actual) => Err(ServerError::VerifyDigest {
            url: url.to_owned(),
            algorithm,
            expected: want.to_ascii_lowercase(),
            actual: actual.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn size_mismatch(url: &str, want: u64, got: u64, more: &str) -> ServerError {
    ServerError::VerifyDigest {
        url: url.to_owned(),
        algorithm: "size",
        expected: format!("{want} bytes"),
        actual: format!("{got} bytes{more}"),
    }
}

fn fetch_error(url: &str, e: &reqwest::Error) -> ServerError {
    // reqwest's own line repeats the URL and stops at "error sending request"; the causes say why.
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    let reason = if causes.is_empty() { e.to_string() } else { causes.join(": ") };
    ServerError::Fetch { url: url.to_owned(), reason }
}

/// A per-process unique suffix for temporary files.
pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
