//! Pack sources: fetches the pack a spec names (an archive URL, a pack hub, a Modrinth `.mrpack`) to
//! local disk, streamed and verified, ready for [`crate::pack::PackStore::stage`].
//!
//! Every download goes through [`download`]: streamed to a `.partial` file while hashed, resumed with
//! `Range` after a broken transfer, retried with exponential backoff on transient failures, checked
//! against the digests the source publishes and only then renamed into place.

mod download;
pub mod hub;
pub mod mrpack;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use crate::api::{PackSource, PackSourceRef};
use crate::pack::IoError;
use crate::pack::build::BuildError;
use crate::pack::extract::ExtractError;
use crate::pack::manifest::ManifestError;
use crate::pack::path::PathError;
use crate::pack::{ArchiveFormat, PackVersion};

pub use download::Expected;

/// A pack fetched to local disk, ready for `PackStore::stage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The archive, inside [`FetchOptions::work_dir`].
    pub archive: PathBuf,
    /// Its format.
    pub format: ArchiveFormat,
    /// The version the source names (hub, mrpack, or a pinned url archive); `None`: the archive's
    /// `atlas-pack.json` names it, or else [`Fetched::fallback_version`].
    pub version: Option<PackVersion>,
    /// The version of an unpinned url archive without `atlas-pack.json`: [`digest_version`] of its
    /// sha256.
    pub fallback_version: Option<PackVersion>,
    /// Bytes received over the network by this fetch (0 when everything was cached).
    pub bytes_downloaded: u64,
}

/// Where and how to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Downloads land here (normally `DATA/.atlas/downloads`); partial files stay here for resume.
    pub work_dir: PathBuf,
    /// The data dir, against which relative token files are resolved.
    pub data_dir: PathBuf,
    /// Retries of a transient failure, after the first attempt.
    pub retries: u32,
    /// The first retry's delay, doubled for each next one.
    pub base_delay: Duration,
    /// Live counters a progress display may poll while the fetch runs.
    pub progress: Arc<Progress>,
    /// Where a url source's archive is handed as it downloads (see [`tee`]); for url sources only
    /// (every download of a fetch would be teed).
    pub tee: Option<Tee>,
}

/// Live counters of a fetch. Totals grow as they become known (a size from the source, a
/// `Content-Length`, an index's file list).
#[derive(Debug, Default)]
pub struct Progress {
    bytes: AtomicU64,
    total_bytes: AtomicU64,
    files: AtomicU64,
    total_files: AtomicU64,
}

/// A reading of [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressSnapshot {
    /// Bytes received so far (a restarted download counts again).
    pub bytes: u64,
    /// Bytes expected, as far as known.
    pub total_bytes: u64,
    /// Files of a `.mrpack` downloaded.
    pub files: u64,
    /// Files of a `.mrpack` to download.
    pub total_files: u64,
}

impl Progress {
    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            bytes: self.bytes.load(Ordering::Relaxed),
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
            total_files: self.total_files.load(Ordering::Relaxed),
        }
    }
    pub(crate) fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_total_bytes(&self, n: u64) {
        self.total_bytes.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn sub_total_bytes(&self, n: u64) {
        self.total_bytes.fetch_sub(n, Ordering::Relaxed);
    }
    pub(crate) fn add_files(&self, n: u64) {
        self.files.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_total_files(&self, n: u64) {
        self.total_files.fetch_add(n, Ordering::Relaxed);
    }
}

impl FetchOptions {
    /// The defaults for a data dir: `DATA/.atlas/downloads`, 4 retries from 500 ms.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            work_dir: data_dir.join(crate::pack::manifest::RESERVED_DIR).join("downloads"),
            data_dir: data_dir.to_owned(),
            retries: 4,
            base_delay: Duration::from_millis(500),
            progress: Arc::default(),
            tee: None,
        }
    }

    /// The delay before retry number `attempt` (0-based), capped at a minute.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        self.base_delay.saturating_mul(1u32 << attempt.min(16)).min(Duration::from_secs(60))
    }
}

/// A url source's archive bytes handed, as they arrive, to a consumer on another thread, so the
/// pack is staged while it downloads (as `curl | zstd -d | tar -x` overlaps its stages). Only an
/// uninterrupted first attempt from byte 0 is teed, and it writes no file. The reader ends the stream (EOF) only once the
/// whole download matched its published digest; an interrupted, resumed, reused or failed download
/// is an error for the reader, whose caller then stages the downloaded file instead. A bounded
/// channel: the download waits for the consumer, and memory stays bounded.
pub fn tee(chunks: usize) -> (Tee, TeeReader) {
    let (tx, rx) = tokio::sync::mpsc::channel(chunks.max(1));
    let state = Arc::new(AtomicU8::new(TEE_OPEN));
    (Tee { tx, state: Arc::clone(&state) }, TeeReader { rx, state, current: bytes::Bytes::new() })
}

const TEE_OPEN: u8 = 0;
const TEE_VERIFIED: u8 = 1;
const TEE_ABORTED: u8 = 2;

/// The download's end of [`tee`].
#[derive(Debug, Clone)]
pub struct Tee {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    state: Arc<AtomicU8>,
}

impl Tee {
    pub(crate) async fn send(&self, chunk: bytes::Bytes) {
        if self.state.load(Ordering::Acquire) == TEE_OPEN {
            // The reader gone (it refused the pack) is no reason to stop the download.
            let _ = self.tx.send(chunk).await;
        }
    }
    pub(crate) fn verified(&self) {
        let _ = self.state.compare_exchange(TEE_OPEN, TEE_VERIFIED, Ordering::AcqRel, Ordering::Acquire);
    }
    pub(crate) fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) == TEE_OPEN
    }
    pub(crate) fn is_verified(&self) -> bool {
        self.state.load(Ordering::Acquire) == TEE_VERIFIED
    }
    pub(crate) fn abort(&self) {
        let _ = self.state.compare_exchange(TEE_OPEN, TEE_ABORTED, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The consumer's end of [`tee`]: a blocking [`io::BufRead`] of the archive as it downloads.
#[derive(Debug)]
pub struct TeeReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    state: Arc<AtomicU8>,
    current: bytes::Bytes,
}

impl TeeReader {
    /// Whether the stream was whole and its digest verified (once the reader saw its end).
    pub fn verified(&self) -> bool {
        self.state.load(Ordering::Acquire) == TEE_VERIFIED
    }
}

impl io::Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let available = io::BufRead::fill_buf(self)?;
            let n = buf.len().min(available.len());
            buf[..n].copy_from_slice(&available[..n]);
            n
        };
        io::BufRead::consume(self, n);
        Ok(n)
    }
}

/// The downloaded chunks are the buffer: a decoder reads them where they are.
impl io::BufRead for TeeReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                // Every sender is gone: the fetch is over (an empty buffer: the end of the stream).
                None if self.verified() => return Ok(&[]),
                None => return Err(io::Error::other("the streamed download was interrupted or not used")),
            }
        }
        Ok(&self.current)
    }
    fn consume(&mut self, n: usize) {
        let n = n.min(self.current.len());
        bytes::Buf::advance(&mut self.current, n);
    }
}

/// What a source names now, known before its archive is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// Equal keys name equal content: `sha256:HEX` of an archive (a url source's, or the blob a hub
    /// names), `sha512:HEX` of an `.mrpack` whose digest the spec gives. `None`: only a fetch tells (an
    /// `.mrpack` without a digest can change under the same URL).
    pub key: Option<String>,
    /// The version, where it is known before the fetch: a hub's answer, or the pin.
    pub version: Option<PackVersion>,
    /// A hub's answer, which [`fetch_named`] downloads without asking again.
    hub_answer: Option<hub::HubAnswer>,
}

/// Which pack a source names, whatever version: a hub's pack (any channel or pin), an archive URL, an
/// `.mrpack` URL. Recorded with each applied version, so a start that cannot reach the source can
/// tell whether the data dir holds a version of the same pack. `None` when the source is invalid.
pub fn origin(source: &PackSource) -> Option<String> {
    Some(match source.get()? {
        PackSourceRef::Hub(hub) => format!("hub {} {}", hub.url.trim_end_matches('/'), hub.pack),
        PackSourceRef::Url(url) => format!("url {}", url.url),
        PackSourceRef::Mrpack(mrpack) => format!("mrpack {}", mrpack.url),
    })
}

/// The key of an archive whose sha256 is `hex` ([`Named::key`]).
fn sha256_key(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// Asks what `source` names now, downloading no archive: a url or an `.mrpack` is named by the spec
/// alone, a hub by looking up its channel (with `If-None-Match`) or the pinned version.
pub async fn name(source: &PackSource, pinned: Option<&str>, options: &FetchOptions) -> Result<Named, SourceError> {
    let version = pinned.map(parse_version).transpose()?;
    match source.get().ok_or(SourceError::SelectSource)? {
        PackSourceRef::Url(url) => {
            Ok(Named { key: Some(sha256_key(&check_hex(&url.sha256, 64)?)), version, hub_answer: None })
        }
        PackSourceRef::Mrpack(mrpack) => {
            let key = mrpack.sha512.as_deref().map(|hex| check_hex(hex, 128)).transpose()?;
            Ok(Named { key: key.map(|hex| format!("sha512:{hex}")), version, hub_answer: None })
        }
        PackSourceRef::Hub(hub) => {
            tokio::fs::create_dir_all(&options.work_dir)
                .await
                .map_err(io_err("create directory", &options.work_dir))?;
            let token = hub::token(hub, options)?;
            let answer = hub::lookup(&client()?, hub, pinned, token.as_deref(), options).await?;
            Ok(Named {
                key: Some(sha256_key(&check_hex(&answer.blob.sha256, 64)?)),
                version: Some(parse_version(&answer.version)?),
                hub_answer: Some(answer),
            })
        }
    }
}

/// For a url source of a tar archive: the compression and what names its version, known before the
/// download, so its archive can be staged while it downloads ([`tee`]).
pub fn streamable(
    source: &PackSource,
    pinned: Option<&str>,
) -> Option<(crate::pack::extract::TarCompression, crate::pack::Versioning)> {
    use crate::pack::extract::TarCompression;
    let PackSourceRef::Url(url) = source.get()? else { return None };
    let compression = match format_of(&parse_url(&url.url).ok()?)? {
        ArchiveFormat::TarZst => TarCompression::Zstd,
        ArchiveFormat::TarGz => TarCompression::Gzip,
        ArchiveFormat::Zip => return None,
    };
    let pinned = match pinned.map(parse_version) {
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return None,
        None => None,
    };
    let fallback = Some(digest_version(&url.sha256).ok()?);
    Some((compression, crate::pack::Versioning { pinned, fallback }))
}

/// Hex digits of the sha256 in [`digest_version`]: 48 bits, so two archives of one server meet
/// under one version only by a chance nobody will see (and then staging refuses the second as a
/// reused version; it never replaces the first).
const DIGEST_VERSION_HEX: usize = 12;

/// The version of a url archive that names none (no `atlas-pack.json`, no `spec.pack.version`):
/// `sha256-` and the first 12 hex digits of its sha256 (`sha256-9f86d081884c`).
pub fn digest_version(sha256_hex: &str) -> Result<PackVersion, SourceError> {
    let hex = check_hex(sha256_hex, 64)?;
    parse_version(&format!("sha256-{}", &hex[..DIGEST_VERSION_HEX]))
}

/// Errors fetching a pack.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The spec's source does not name exactly one of hub, url or mrpack.
    #[error("the pack source must set exactly one of hub, url or mrpack")]
    SelectSource,
    /// A URL in the spec or a hub answer does not parse.
    #[error("invalid URL {url:?}: {reason}")]
    ParseUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The archive's format cannot be told from its URL.
    #[error("cannot tell the archive format of {url} (expected .tar.zst, .tar.gz, .zip or .mrpack)")]
    DetectFormat {
        /// The URL.
        url: String,
    },
    /// A digest in the spec or a hub answer is not lowercase hex of the right length.
    #[error("invalid digest {value:?}: expected {len} hex digits")]
    ParseDigest {
        /// The digest as given.
        value: String,
        /// Hex digits expected.
        len: usize,
    },
    /// Building the HTTP client failed.
    #[error("build HTTP client: {0}")]
    BuildClient(#[source] reqwest::Error),
    /// The request failed before or while the answer came (connect, timeout, broken body).
    #[error("fetch {url}: {source}")]
    Request {
        /// The URL.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an unexpected status.
    #[error("fetch {url}: HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// 401/403: the token is missing, wrong or lacks access.
    #[error("fetch {url}: HTTP {status}; check the hub token (tokenFile)")]
    Authorize {
        /// The URL.
        url: String,
        /// 401 or 403.
        status: u16,
    },
    /// The body ended before its announced length.
    #[error("fetch {url}: the body ended after {received} of {expected} bytes")]
    Truncated {
        /// The URL.
        url: String,
        /// Bytes announced.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// The download's digest is not the published one; the file was deleted.
    #[error("verify {url}: {algorithm} is {actual}, expected {expected}")]
    VerifyDigest {
        /// The URL.
        url: String,
        /// `sha256`, `sha512` or `sha1`.
        algorithm: &'static str,
        /// Published.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// A download resumed onto a kept partial file does not verify: the kept prefix was stale. It
    /// was deleted; the retry starts from zero.
    #[error("verify {url}: the resumed download does not match; starting over")]
    VerifyResumed {
        /// The URL.
        url: String,
    },
    /// The download's size is not the published one; the file was deleted.
    #[error("verify {url}: {actual} bytes, expected {expected}")]
    VerifySize {
        /// The URL.
        url: String,
        /// Published.
        expected: u64,
        /// Received (at least).
        actual: u64,
    },
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The hub token file cannot be read or is empty.
    #[error("read hub token file {}: {source}", path.display())]
    ReadToken {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A `tokenSecretRef` without a `tokenFile` on a standalone runner.
    #[error("hub tokenSecretRef is only read on a cluster; a standalone runner needs tokenFile")]
    ResolveTokenSecret,
    /// A hub answer does not parse.
    #[error("parse hub answer from {url}: {source}")]
    ParseHubAnswer {
        /// The URL asked.
        url: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A version (pinned, from a hub or an index) is not a valid pack version.
    #[error("pack version: {0}")]
    ParseVersion(#[source] ManifestError),
    /// The source's version is not the pinned one.
    #[error("the source has version {found}, the spec pins {pinned}")]
    CheckVersion {
        /// From the spec.
        pinned: String,
        /// From the source.
        found: String,
    },
    /// The `.mrpack` cannot be unpacked.
    #[error("unpack mrpack: {0}")]
    ExtractMrpack(#[source] ExtractError),
    /// `modrinth.index.json` is missing or does not parse.
    #[error("parse modrinth.index.json: {0}")]
    ParseIndex(#[source] serde_json::Error),
    /// `modrinth.index.json` parses but is not something we install.
    #[error("modrinth.index.json: {0}")]
    CheckIndex(String),
    /// An index file path is unsafe.
    #[error("mrpack file path: {0}")]
    SanitizePath(#[source] PathError),
    /// Turning the downloaded files into an Atlas pack failed.
    #[error("build pack from mrpack: {0}")]
    BuildPack(#[source] BuildError),
    /// A blocking task died.
    #[error("{0} task failed")]
    Join(&'static str),
}

impl SourceError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::SelectSource
            | Self::ParseUrl { .. }
            | Self::ParseDigest { .. }
            | Self::DetectFormat { .. }
            | Self::ResolveTokenSecret => "invalid-spec",
            Self::BuildClient(_) | Self::Join(_) => "internal",
            Self::Request { .. } | Self::Truncated { .. } | Self::VerifyResumed { .. } => "network",
            Self::Status { .. } => "http-status",
            Self::Authorize { .. } | Self::ReadToken { .. } => "unauthorized",
            Self::VerifyDigest { .. } | Self::VerifySize { .. } => "digest-mismatch",
            Self::Io(_) => "io",
            Self::ParseHubAnswer { .. } => "invalid-response",
            Self::ParseVersion(_) | Self::CheckVersion { .. } => "invalid-version",
            Self::ExtractMrpack(e) => e.category(),
            Self::ParseIndex(_) | Self::CheckIndex(_) => "invalid-pack",
            Self::SanitizePath(e) => e.category(),
            Self::BuildPack(e) => e.category(),
        }
    }

    /// Whether retrying later may succeed without a change to the spec or the source.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Request { source, .. } => !source.is_builder(),
            Self::Truncated { .. } | Self::VerifyResumed { .. } | Self::Io(_) | Self::Join(_) => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SourceError {
    let path = path.to_owned();
    move |source| SourceError::Io(IoError { op, path, source })
}

pub(crate) fn parse_url(raw: &str) -> Result<reqwest::Url, SourceError> {
    let url =
        reqwest::Url::parse(raw).map_err(|e| SourceError::ParseUrl { url: raw.to_owned(), reason: e.to_string() })?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(SourceError::ParseUrl { url: raw.to_owned(), reason: format!("scheme {other} is not http(s)") }),
    }
}

/// The archive format the last segment of a URL's path says.
pub(crate) fn format_of(url: &reqwest::Url) -> Option<ArchiveFormat> {
    let name = url.path_segments().and_then(|mut s| s.next_back()).unwrap_or("");
    ArchiveFormat::from_file_name(name)
}

pub(crate) fn extension(format: ArchiveFormat) -> &'static str {
    match format {
        ArchiveFormat::TarZst => "tar.zst",
        ArchiveFormat::TarGz => "tar.gz",
        ArchiveFormat::Zip => "zip",
    }
}

pub(crate) fn client() -> Result<reqwest::Client, SourceError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("atlas-runner/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(SourceError::BuildClient)
}

/// `value` lowercased, if it is `len` hex digits (it names files, so nothing else may pass).
pub(crate) fn check_hex(value: &str, len: usize) -> Result<String, SourceError> {
    if value.len() == len && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(SourceError::ParseDigest { value: value.to_owned(), len })
    }
}

pub(crate) fn parse_version(raw: &str) -> Result<PackVersion, SourceError> {
    PackVersion::new(raw).map_err(SourceError::ParseVersion)
}

/// Fetches the pack a spec names. `pinned` is spec.pack.version.
pub async fn fetch(source: &PackSource, pinned: Option<&str>, options: &FetchOptions) -> Result<Fetched, SourceError> {
    fetch_as(source, pinned, None, options).await
}

/// [`fetch`] of what [`name`] found: a hub is not asked again.
pub async fn fetch_named(
    source: &PackSource,
    pinned: Option<&str>,
    named: &Named,
    options: &FetchOptions,
) -> Result<Fetched, SourceError> {
    fetch_as(source, pinned, named.hub_answer.as_ref(), options).await
}

async fn fetch_as(
    source: &PackSource,
    pinned: Option<&str>,
    answered: Option<&hub::HubAnswer>,
    options: &FetchOptions,
) -> Result<Fetched, SourceError> {
    tokio::fs::create_dir_all(&options.work_dir).await.map_err(io_err("create directory", &options.work_dir))?;
    let client = client()?;
    match source.get().ok_or(SourceError::SelectSource)? {
        PackSourceRef::Url(url) => fetch_url(&client, &url.url, &url.sha256, pinned, options).await,
        PackSourceRef::Hub(hub) => hub::fetch(&client, hub, pinned, answered, options).await,
        PackSourceRef::Mrpack(mrpack) => mrpack::fetch(&client, mrpack, pinned, options).await,
    }
}

async fn fetch_url(
    client: &reqwest::Client,
    raw: &str,
    sha256: &str,
    pinned: Option<&str>,
    options: &FetchOptions,
) -> Result<Fetched, SourceError> {
    let url = parse_url(raw)?;
    let format = format_of(&url).ok_or_else(|| SourceError::DetectFormat { url: raw.to_owned() })?;
    let version = pinned.map(parse_version).transpose()?;
    let sha256 = check_hex(sha256, 64)?;
    let expected = Expected { sha256: Some(sha256.clone()), ..Expected::default() };
    let archive = options.work_dir.join(format!("{sha256}.{}", extension(format)));
    let partial = options.work_dir.join(format!("{sha256}.partial"));
    let bytes_downloaded = download::download(client, &url, None, &expected, &partial, &archive, options).await?;
    let fallback_version = Some(digest_version(&sha256)?);
    Ok(Fetched { archive, format, version, fallback_version, bytes_downloaded })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let options = FetchOptions::new(Path::new("/data"));
        assert_eq!(options.work_dir, Path::new("/data/.atlas/downloads"));
        let delays: Vec<_> = (0..4).map(|n| options.delay(n).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000]);
        assert_eq!(options.delay(40), Duration::from_secs(60));
    }

    #[test]
    fn digests_that_name_files_are_hex_only() {
        assert_eq!(check_hex(&"AB".repeat(32), 64).ok(), Some("ab".repeat(32)));
        assert!(check_hex("../../etc/passwd", 16).is_err());
        assert!(check_hex(&"a".repeat(63), 64).is_err());
    }

    #[test]
    fn format_comes_from_the_url_path_not_the_query() -> Result<(), SourceError> {
        assert_eq!(format_of(&parse_url("https://x/a/p.tar.zst?sig=1.zip")?), Some(ArchiveFormat::TarZst));
        assert_eq!(format_of(&parse_url("https://x/p.mrpack")?), Some(ArchiveFormat::Zip));
        assert_eq!(format_of(&parse_url("https://x/download")?), None);
        assert!(parse_url("file:///etc/p.zip").is_err());
        Ok(())
    }

    #[test]
    fn a_digest_names_a_version() {
        let hex = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        assert_eq!(digest_version(hex).map(|v| v.as_str().to_owned()).ok().as_deref(), Some("sha256-9f86d081884c"));
        assert!(digest_version("9f86d081").is_err());
    }

    #[test]
    fn transient_or_permanent() {
        let status = |status| SourceError::Status { url: "u".into(), status };
        assert!(status(503).is_transient() && status(429).is_transient());
        assert!(!status(404).is_transient());
        assert!(!SourceError::Authorize { url: "u".into(), status: 401 }.is_transient());
        let mismatch = SourceError::VerifyDigest {
            url: "u".into(),
            algorithm: "sha256",
            expected: "a".into(),
            actual: "b".into(),
        };
        assert!(!mismatch.is_transient() && mismatch.category() == "digest-mismatch");
    }
}
