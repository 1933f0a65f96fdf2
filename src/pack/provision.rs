//! Applying the pack a spec names: fetch (network, resumable) -> stage (every digest verified) ->
//! journaled swap, under the data-dir lock. The standalone `pack apply` and, later, the runner call this.

use std::path::Path;

use crate::api::PackSpec;
use crate::metrics::PackMetrics;
use crate::pack::source::{self, FetchOptions, SourceError};
use crate::pack::store::StoreError;
use crate::pack::{ApplyError, ApplyReport, DataDirLock, Limits, PackStore, PackVersion, Preserve};

/// What applying did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisioned {
    /// A new version was swapped in.
    Applied {
        /// What the swap did.
        report: ApplyReport,
        /// Bytes downloaded for it.
        bytes_downloaded: u64,
    },
    /// The data dir already holds this exact version.
    AlreadyCurrent(PackVersion),
}

/// Applying the spec's pack failed; the data dir holds the version it held before.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Fetching the pack failed.
    #[error(transparent)]
    Fetch(#[from] SourceError),
    /// Staging or opening the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The swap failed (and was rolled back).
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// `preserve` does not parse.
    #[error(transparent)]
    Preserve(#[from] crate::pack::manifest::ManifestError),
}

impl ProvisionError {
    /// A short static category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Fetch(e) => e.category(),
            Self::Store(e) => e.category(),
            Self::Apply(e) => e.category(),
            Self::Preserve(_) => "preserve",
        }
    }
}

/// Fetches, stages and applies `pack` into `data_dir` (the caller holds `lock`), recording the
/// outcome in `metrics`. `options.progress` can be polled meanwhile.
pub async fn apply_spec(
    pack: &PackSpec,
    data_dir: &Path,
    lock: &DataDirLock,
    options: &FetchOptions,
    metrics: &PackMetrics,
) -> Result<Provisioned, ProvisionError> {
    let started = std::time::Instant::now();
    let result = apply_spec_inner(pack, data_dir, lock, options).await;
    metrics.apply_duration.observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(Provisioned::Applied { report, bytes_downloaded }) => {
            metrics.downloaded_bytes.inc_by(*bytes_downloaded);
            metrics.files_written.inc_by(report.installed.len() as u64 + report.preserved_written.len() as u64);
            metrics.files_removed.inc_by(report.removed.len() as u64);
            metrics.set_version(report.to.as_str());
        }
        Ok(Provisioned::AlreadyCurrent(version)) => metrics.set_version(version.as_str()),
        Err(e) => metrics.failures.with_label_values(&[e.category()]).inc(),
    }
    result
}

async fn apply_spec_inner(
    pack: &PackSpec,
    data_dir: &Path,
    lock: &DataDirLock,
    options: &FetchOptions,
) -> Result<Provisioned, ProvisionError> {
    let preserve = Preserve::new(&pack.preserve)?;
    tracing::info!(pinned = pack.version.as_deref(), "fetching the pack");
    let fetched = source::fetch(&pack.source, pack.version.as_deref(), options).await?;
    tracing::info!(archive = %fetched.archive.display(), bytes = fetched.bytes_downloaded, "pack fetched; staging");
    let (mut store, recovery) = PackStore::open(data_dir, lock)?;
    tracing::debug!(?recovery, "pack store opened");
    let staged = match store.stage(&fetched.archive, fetched.format, fetched.version.as_ref(), &Limits::default()) {
        Ok(staged) => staged,
        Err(StoreError::AlreadyCurrent(version)) => return Ok(Provisioned::AlreadyCurrent(version)),
        Err(e) => return Err(e.into()),
    };
    tracing::info!("pack staged and verified; swapping it in");
    let report = store.apply(staged, &preserve)?;
    tracing::info!(to = %report.to, installed = report.installed.len(), removed = report.removed.len(), "pack applied");
    Ok(Provisioned::Applied { report, bytes_downloaded: fetched.bytes_downloaded })
}
