//! Applying the pack a spec names: fetch (network, resumable) -> stage (every digest verified) ->
//! plan -> journaled swap, under the data-dir lock. `pack apply` and the runner call this; the
//! runner stops its server between the plan and the swap (see [`apply_spec_gated`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::oneshot;

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

impl Provisioned {
    /// The version the data dir holds now.
    pub fn version(&self) -> &PackVersion {
        match self {
            Self::Applied { report, .. } => &report.to,
            Self::AlreadyCurrent(v) => v,
        }
    }
}

/// Called with the version about to be swapped in, once it is staged and planned: stops the server
/// and says whether to go on. Boxed: the runner's gate borrows its server process.
pub type Gate<'a> = Box<dyn FnOnce(PackVersion) -> BoxFuture<'a, bool> + Send + 'a>;

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
    /// The caller called the swap off (its server did not stop); the data dir was not changed.
    #[error("the swap to pack {0} was called off before it began")]
    CalledOff(PackVersion),
    /// The blocking staging task died.
    #[error("the pack staging task failed")]
    Join,
}

impl ProvisionError {
    /// A short static category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Fetch(e) => e.category(),
            Self::Store(e) => e.category(),
            Self::Apply(e) => e.category(),
            Self::Preserve(_) => "preserve",
            Self::CalledOff(_) => "called-off",
            Self::Join => "internal",
        }
    }

    /// Whether trying again later, with the same spec, may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Fetch(e) => e.is_transient(),
            Self::Store(StoreError::Io { .. }) | Self::Apply(ApplyError::Io { .. } | ApplyError::Swap { .. }) => true,
            Self::CalledOff(_) | Self::Join => true,
            _ => false,
        }
    }
}

/// Fetches, stages and applies `pack` into `data_dir` (the caller holds `lock`), recording the
/// outcome in `metrics`. `options.progress` can be polled meanwhile. For a data dir no server runs on.
pub async fn apply_spec(
    pack: &PackSpec,
    data_dir: &Path,
    lock: Arc<DataDirLock>,
    options: &FetchOptions,
    metrics: &PackMetrics,
) -> Result<Provisioned, ProvisionError> {
    apply_spec_gated(pack, data_dir, lock, options, metrics, Box::new(|_| Box::pin(std::future::ready(true)))).await
}

/// [`apply_spec`] for a data dir a server runs on: fetch, stage and plan while it runs, then
/// `gate` (given the version about to be swapped in) stops it and says whether to go on; the swap
/// follows at once. When fetching, verifying or planning fails, or the version is already
/// applied, `gate` is not called: the running server is left alone. `gate` returning false calls
/// the swap off ([`ProvisionError::CalledOff`]) with the data dir unchanged.
pub async fn apply_spec_gated(
    pack: &PackSpec,
    data_dir: &Path,
    lock: Arc<DataDirLock>,
    options: &FetchOptions,
    metrics: &PackMetrics,
    gate: Gate<'_>,
) -> Result<Provisioned, ProvisionError> {
    let started = std::time::Instant::now();
    let result = apply_spec_inner(pack, data_dir, lock, options, gate).await;
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
    lock: Arc<DataDirLock>,
    options: &FetchOptions,
    gate: Gate<'_>,
) -> Result<Provisioned, ProvisionError> {
    let preserve = Preserve::new(&pack.preserve)?;
    tracing::info!(pinned = pack.version.as_deref(), "fetching the pack");
    let fetched = source::fetch(&pack.source, pack.version.as_deref(), options).await?;
    tracing::info!(archive = %fetched.archive.display(), bytes = fetched.bytes_downloaded, "pack fetched; staging");
    // Staging hashes and writes the whole pack: a blocking thread, which keeps the store (and its
    // borrow of the lock) from the plan to the swap while this side waits for the gate.
    let (planned_tx, planned_rx) = oneshot::channel::<PackVersion>();
    let (go_tx, go_rx) = oneshot::channel::<bool>();
    let data_dir: PathBuf = data_dir.to_owned();
    let archive = fetched.archive.clone();
    let (format, version) = (fetched.format, fetched.version.clone());
    let task = tokio::task::spawn_blocking(move || -> Result<Provisioned, ProvisionError> {
        let (mut store, recovery) = PackStore::open(&data_dir, &lock)?;
        tracing::debug!(?recovery, "pack store opened");
        let staged = match store.stage(&archive, format, version.as_ref(), &Limits::default()) {
            Ok(staged) => staged,
            Err(StoreError::AlreadyCurrent(version)) => return Ok(Provisioned::AlreadyCurrent(version)),
            Err(e) => return Err(e.into()),
        };
        let planned = store.plan_apply(staged, &preserve)?;
        let to = planned.to().clone();
        if planned_tx.send(to.clone()).is_err() || !go_rx.blocking_recv().unwrap_or(false) {
            return Err(ProvisionError::CalledOff(to));
        }
        let report = store.swap(planned)?;
        Ok(Provisioned::Applied { report, bytes_downloaded: 0 })
    });
    if let Ok(to) = planned_rx.await {
        let go = gate(to).await;
        // The task waits for this answer; it is gone only if it died.
        let _ = go_tx.send(go);
    }
    let outcome = task.await.map_err(|_| ProvisionError::Join)??;
    Ok(match outcome {
        Provisioned::Applied { report, .. } => {
            tracing::info!(to = %report.to, installed = report.installed.len(), removed = report.removed.len(), "pack applied");
            Provisioned::Applied { report, bytes_downloaded: fetched.bytes_downloaded }
        }
        other => other,
    })
}

/// Goes back to the previous pack version (no network), recording it in `metrics`. For a data
/// dir whose server is stopped.
pub async fn rollback(
    data_dir: &Path,
    lock: Arc<DataDirLock>,
    metrics: &PackMetrics,
) -> Result<ApplyReport, ProvisionError> {
    let data_dir = data_dir.to_owned();
    let result = tokio::task::spawn_blocking(move || -> Result<ApplyReport, ProvisionError> {
        let (mut store, _) = PackStore::open(&data_dir, &lock)?;
        Ok(store.rollback()?)
    })
    .await
    .map_err(|_| ProvisionError::Join)
    .and_then(|r| r);
    match &result {
        Ok(report) => metrics.set_version(report.to.as_str()),
        Err(e) => metrics.failures.with_label_values(&[e.category()]).inc(),
    }
    result
}

/// The pack version the data dir holds, if any (finishing or undoing an interrupted swap first).
pub async fn current_version(data_dir: &Path, lock: Arc<DataDirLock>) -> Result<Option<PackVersion>, ProvisionError> {
    let data_dir = data_dir.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Option<PackVersion>, ProvisionError> {
        let (store, _) = PackStore::open(&data_dir, &lock)?;
        Ok(store.state().current.clone())
    })
    .await
    .map_err(|_| ProvisionError::Join)?
}
