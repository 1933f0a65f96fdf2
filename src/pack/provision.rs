//! Applying the pack a spec names: fetch (network, resumable) -> stage (every digest verified) ->
//! plan -> journaled swap, under the data-dir lock. `pack apply` and the runner call this; the
//! runner stops its server between the plan and the swap (see [`apply_spec_gated`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use crate::api::PackSpec;
use crate::metrics::PackMetrics;
use crate::pack::extract::ExtractError;
use crate::pack::source::{self, FetchOptions, SourceError};
use crate::pack::store::StoreError;
use crate::pack::{ApplyError, ApplyReport, DataDirLock, Limits, PackStore, PackVersion, Preserve, Versioning};

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
    /// The fetch failed, so there was no archive to stage (the fetch's error is the one reported).
    #[error("no archive to stage: the fetch failed")]
    NoArchive,
    /// The blocking staging task died.
    #[error("the pack staging task failed")]
    Join,
    /// A rollback would go to another version than the one its caller restarts.
    #[error("the kept previous pack is {}, not {} the rollback was for; the data dir was not changed", show(.found.as_ref()), show(.expected.as_ref()))]
    RollbackTarget {
        /// The version the caller would run after the rollback.
        expected: Option<String>,
        /// The store's previous version.
        found: Option<PackVersion>,
    },
}

fn show(version: Option<&impl std::fmt::Display>) -> String {
    version.map_or_else(|| "no pack".to_owned(), |v| format!("version {v}"))
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
            Self::NoArchive => "network",
            Self::Join => "internal",
            Self::RollbackTarget { .. } => "rollback-target",
        }
    }

    /// Whether trying again later, with the same spec, may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Fetch(e) => e.is_transient(),
            Self::Store(StoreError::Io(_)) | Self::Apply(ApplyError::Io(_) | ApplyError::Swap { .. }) => true,
            Self::CalledOff(_) | Self::NoArchive | Self::Join => true,
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
    // A hub is asked which version it names (a small request, or a 304): its archive is not downloaded
    // again for a version the data dir holds.
    let named = source::name(&pack.source, pack.version.as_deref(), options).await?;
    let (key, named_version) = (named.key.clone(), named.version.as_ref().map(PackVersion::as_str));
    let origin = source::origin(&pack.source);
    if let Some(version) = already_applied(data_dir, &lock, key.as_deref(), named_version, origin.as_deref()).await? {
        tracing::info!(version = %version, "the pack is already applied");
        return Ok(Provisioned::AlreadyCurrent(version));
    }
    // A url source's tar archive is staged while it downloads; anything else (or a stream that
    // broke, or a download already cached) is staged from the downloaded file.
    let mut fetch_options = options.clone();
    let stream = source::streamable(&pack.source, pack.version.as_deref()).map(|(compression, version)| {
        let (tee, reader) = source::tee(8);
        fetch_options.tee = Some(tee);
        (reader, compression, version)
    });
    // Staging hashes and writes the whole pack: a blocking thread, which keeps the store (and its
    // borrow of the lock) from the plan to the swap while this side waits for the gate.
    let (fetched_tx, fetched_rx) = oneshot::channel::<Option<source::Fetched>>();
    let (planned_tx, planned_rx) = oneshot::channel::<PackVersion>();
    let (go_tx, go_rx) = oneshot::channel::<bool>();
    let data_dir: PathBuf = data_dir.to_owned();
    // Set when this future is dropped (a runner shutting down before the gate): the staging task
    // then stops reading the archive and plans nothing.
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let cancelled = Arc::clone(&cancel.0);
    let task = tokio::task::spawn_blocking(move || -> Result<Provisioned, ProvisionError> {
        let (mut store, recovery) = PackStore::open(&data_dir, &lock)?;
        tracing::debug!(?recovery, "pack store opened");
        let limits = Limits::default();
        let (mut staged, mut stream_error) = (None, None);
        if let Some((mut reader, compression, version)) = stream {
            match store.stage_stream(&mut reader, compression, &version, &limits) {
                Err(e) if !reader.verified() => {
                    // Refused before the stream ended, or the stream broke: which one, the fetch
                    // tells (a broken stream leaves a downloaded file to stage instead).
                    tracing::debug!(error = %e, "the streamed download was not staged");
                    stream_error = Some(e);
                }
                // Extraction reads the compressed stream to its end, but only the download's end
                // checks its digest: only a stream read to its end, and verified there, makes the
                // staged version count (whatever a decoder left unread is read here).
                Ok(pack) => match io::copy(&mut reader, &mut io::sink()) {
                    Ok(_) if reader.verified() => staged = Some(Ok(pack)),
                    drained => {
                        store.discard(pack);
                        let source = match drained {
                            Err(e) => e,
                            Ok(_) => io::Error::other("the streamed download ended unverified"),
                        };
                        tracing::debug!(error = %source, "the streamed download was staged but not verified");
                        stream_error = Some(StoreError::ExtractArchive(ExtractError::Corrupt { entry: None, source }));
                    }
                },
                result => staged = Some(result),
            }
        }
        let staged = match staged {
            Some(result) => result,
            None => {
                let Ok(Some(fetched)) = fetched_rx.blocking_recv() else {
                    return Err(ProvisionError::NoArchive);
                };
                match stream_error {
                    // The whole download went to the stream (no file was kept): its refusal stands.
                    Some(e) if !fetched.archive.exists() => Err(e),
                    _ => store.stage_cancellable(
                        &fetched.archive,
                        fetched.format,
                        &Versioning { pinned: fetched.version.clone(), fallback: fetched.fallback_version.clone() },
                        &limits,
                        &cancelled,
                    ),
                }
            }
        };
        let staged = match staged {
            Ok(mut staged) => {
                staged.set_source(key);
                staged.set_origin(origin.clone());
                staged
            }
            Err(StoreError::AlreadyCurrent(version)) => {
                if let Some(origin) = &origin {
                    store.record_origin(origin)?;
                }
                return Ok(Provisioned::AlreadyCurrent(version));
            }
            Err(e) => return Err(e.into()),
        };
        if cancelled.load(Ordering::Acquire) {
            let to = staged.version().clone();
            store.discard(staged);
            return Err(ProvisionError::CalledOff(to));
        }
        let planned = store.plan_apply(staged, &preserve)?;
        let to = planned.to().clone();
        if planned_tx.send(to.clone()).is_err() || !go_rx.blocking_recv().unwrap_or(false) {
            return Err(ProvisionError::CalledOff(to));
        }
        let report = store.swap(planned)?;
        Ok(Provisioned::Applied { report, bytes_downloaded: 0 })
    });
    tracing::info!(pinned = pack.version.as_deref(), "fetching the pack");
    // The hub's answer is the one just named: its blob is fetched without asking again.
    let fetched = source::fetch_named(&pack.source, pack.version.as_deref(), &named, &fetch_options).await;
    // The last sender of the tee: its reader now sees the end of the stream.
    drop(fetch_options);
    let fetched = match fetched {
        Ok(fetched) => fetched,
        Err(e) => {
            let _ = fetched_tx.send(None);
            // The staging thread ends at once (its stream is broken, and there is no file). Should
            // it have planned a swap anyway, it must find the gate gone rather than wait for it.
            drop(go_tx);
            drop(planned_rx);
            let _ = task.await;
            return Err(e.into());
        }
    };
    tracing::info!(archive = %fetched.archive.display(), bytes = fetched.bytes_downloaded, "pack fetched and verified");
    // Unused when the stream was staged.
    let _ = fetched_tx.send(Some(fetched.clone()));
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

/// Sets its flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The version the data dir holds when the state records it was applied from `key` (and it is
/// the version the source names, a pin or a hub's answer, if it names one).
async fn already_applied(
    data_dir: &Path,
    lock: &Arc<DataDirLock>,
    key: Option<&str>,
    named: Option<&str>,
    origin: Option<&str>,
) -> Result<Option<PackVersion>, ProvisionError> {
    let Some(key) = key.map(str::to_owned) else { return Ok(None) };
    let (data_dir, lock, named) = (data_dir.to_owned(), Arc::clone(lock), named.map(str::to_owned));
    let origin = origin.map(str::to_owned);
    tokio::task::spawn_blocking(move || -> Result<Option<PackVersion>, ProvisionError> {
        let (mut store, _) = PackStore::open(&data_dir, &lock)?;
        let state = store.state();
        let same = state.source.as_deref() == Some(key.as_str())
            && named.as_deref().is_none_or(|p| state.current.as_ref().is_some_and(|c| c.as_str() == p));
        let current = if same { state.current.clone() } else { None };
        // A data dir applied before origins were recorded learns its origin here.
        if let (Some(_), Some(origin)) = (&current, &origin) {
            store.record_origin(origin)?;
        }
        Ok(current)
    })
    .await
    .map_err(|_| ProvisionError::Join)?
}

/// Goes back to the previous pack version (no network), recording it in `metrics`. For a data
/// dir whose server is stopped. `expected` is the version the caller will run afterwards: a store
/// whose previous version is another one is left alone ([`ProvisionError::RollbackTarget`]).
pub async fn rollback(
    data_dir: &Path,
    lock: Arc<DataDirLock>,
    expected: Option<&str>,
    metrics: &PackMetrics,
) -> Result<ApplyReport, ProvisionError> {
    let data_dir = data_dir.to_owned();
    let expected = expected.map(str::to_owned);
    let result = tokio::task::spawn_blocking(move || -> Result<ApplyReport, ProvisionError> {
        let (mut store, _) = PackStore::open(&data_dir, &lock)?;
        let found = store.state().previous.clone();
        if found.as_ref().map(PackVersion::as_str) != expected.as_deref() {
            return Err(ProvisionError::RollbackTarget { expected, found });
        }
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

/// The pack version the data dir holds and which pack it is a version of, if any (finishing or
/// undoing an interrupted swap first).
pub async fn held(
    data_dir: &Path,
    lock: Arc<DataDirLock>,
) -> Result<Option<(PackVersion, Option<String>)>, ProvisionError> {
    let data_dir = data_dir.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Option<(PackVersion, Option<String>)>, ProvisionError> {
        let (store, _) = PackStore::open(&data_dir, &lock)?;
        let state = store.state();
        Ok(state.current.clone().map(|version| (version, state.origin.clone())))
    })
    .await
    .map_err(|_| ProvisionError::Join)?
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
