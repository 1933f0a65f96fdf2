//! The agent's spec source: its own `MinecraftServer`, followed by a kube-runtime watcher restricted
//! to its name (`fieldSelector=metadata.name=NAME`, which is what lets the Role grant list and
//! watch by resource name). The watcher resumes after a watch expires and re-lists after the API
//! server comes back; a re-listed object whose spec did not change changes nothing, so the server
//! never restarts because the API server blinked. Each new spec has its secret references pointed
//! at their files and is checked before the reconciler sees it; a bad one is logged, reported
//! (Degraded `SpecRejected`, a Warning Event, its generation observed) and the running server keeps
//! running. The resource's deletion stops the agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::secrets::SecretFiles;
use crate::api::MinecraftServer;
use crate::api::conditions::reasons;
use crate::runner::{Desired, validate};

/// How often a watch that keeps failing is logged again.
const REPEAT_WARNING: Duration = Duration::from_secs(60);

/// The followed resource: the specs the reconciler runs, and the object as last seen.
#[derive(Debug)]
pub struct ResourceSource {
    /// Each new valid spec, with its generation.
    pub specs: watch::Receiver<Desired>,
    /// The resource as last seen (its uid names it in Events).
    pub object: watch::Receiver<Arc<MinecraftServer>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ResourceSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A spec from `object`: its secret references pointed at their files (those the pod does not
/// mount keep `previous`'s, with a note), then checked.
fn desired(object: &MinecraftServer, secrets: &SecretFiles, previous: Option<&Desired>) -> Result<Desired, String> {
    let mut spec = object.spec.clone();
    let unmounted = secrets.dereference(&mut spec, previous.map(|p| &p.spec));
    validate(&spec)?;
    let mut notes = std::collections::BTreeMap::new();
    if !unmounted.is_empty() {
        notes.insert(reasons::SECRET_NOT_MOUNTED, unmounted.join("; "));
    }
    Ok(Desired { spec, generation: object.metadata.generation, notes })
}

/// The last valid resource, kept in the data dir (`DATA/.atlas/resource.json`) so that an agent
/// started while the API server does not answer (a container restart during an outage) starts the
/// installed server instead of waiting for the network.
#[derive(Debug, Clone)]
pub struct SpecCache {
    path: std::path::PathBuf,
    wait: Duration,
}

impl SpecCache {
    /// The cache in `data_dir`, used after `wait` without an answer from the API server.
    pub fn new(data_dir: &std::path::Path, wait: Duration) -> Self {
        Self { path: crate::runner::atlas_dir(data_dir).join("resource.json"), wait }
    }

    fn load(&self) -> Option<MinecraftServer> {
        let bytes = std::fs::read(&self.path).ok()?;
        serde_json::from_slice(&bytes)
            .inspect_err(|e| tracing::warn!(path = %self.path.display(), "the cached MinecraftServer does not parse ({e}); ignoring it"))
            .ok()
    }

    /// Keeps `object`'s identity and spec (not its status, nor the managed fields).
    fn save(&self, object: &MinecraftServer) {
        let mut kept = object.clone();
        kept.status = None;
        kept.metadata.managed_fields = None;
        let result = serde_json::to_vec(&kept).map_err(std::io::Error::other).and_then(|bytes| {
            let tmp = self.path.with_extension("tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &self.path)
        });
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), "cannot cache the MinecraftServer: {e}");
        }
    }
}

/// Whether `object` is being deleted.
fn deleting(object: &MinecraftServer) -> bool {
    object.metadata.deletion_timestamp.is_some()
}

/// Logs a watch error: the first one, then once a minute while they go on.
struct ErrorLog {
    since: Option<Instant>,
    told: Option<Instant>,
}

impl ErrorLog {
    fn failed(&mut self, error: &watcher::Error) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if self.told.is_none_or(|t| now.duration_since(t) >= REPEAT_WARNING) {
            tracing::warn!(
                for_seconds = now.duration_since(since).as_secs(),
                "watching the MinecraftServer failed: {error}; retrying with backoff, the server runs on"
            );
            self.told = Some(now);
        }
    }

    fn ok(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(after_seconds = since.elapsed().as_secs(), "watching the MinecraftServer again");
        }
        self.told = None;
    }
}

impl ResourceSource {
    /// Waits until the resource `name` exists with a valid spec (`None` when `shutdown` comes first),
    /// then follows it. Its deletion cancels `deleted`.
    ///
    /// With `cache`, a resource seen before starts from its cached spec when the API server has not
    /// answered within the cache's wait; the watch goes on and takes over once it answers (a
    /// resource deleted meanwhile then stops the server).
    pub async fn start(
        api: Api<MinecraftServer>,
        name: &str,
        secrets: SecretFiles,
        deleted: CancellationToken,
        shutdown: &CancellationToken,
        cache: Option<SpecCache>,
    ) -> Option<Self> {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        let mut errors = ErrorLog { since: None, told: None };
        let mut told_missing = false;
        let cached = cache.as_ref().and_then(SpecCache::load).filter(|o| o.metadata.name.as_deref() == Some(name));
        let cache_due = tokio::time::sleep(cache.as_ref().map_or(Duration::MAX, |c| c.wait));
        tokio::pin!(cache_due);
        // Whether the API server has answered: then it decides, never the cache.
        let mut answered = false;
        let first = loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return None,
                event = stream.next() => event,
                () = &mut cache_due, if cached.is_some() && !answered => {
                    let Some(object) = cached.clone() else { continue };
                    match desired(&object, &secrets, None) {
                        Ok(desired) => {
                            tracing::warn!(
                                generation = ?desired.generation,
                                "the API server does not answer; starting the server from the cached MinecraftServer"
                            );
                            break (object, desired);
                        }
                        Err(message) => {
                            tracing::error!(category = "spec_invalid", "the cached MinecraftServer: {message}");
                            answered = true;
                            continue;
                        }
                    }
                }
            };
            if matches!(event, Some(Ok(Event::Apply(_) | Event::InitApply(_) | Event::InitDone | Event::Delete(_)))) {
                answered = true;
            }
            match event {
                Some(Ok(Event::Apply(object) | Event::InitApply(object))) => {
                    errors.ok();
                    if deleting(&object) {
                        tracing::warn!("the MinecraftServer is being deleted; not starting a server");
                        continue;
                    }
                    match desired(&object, &secrets, None) {
                        Ok(desired) => {
                            if let Some(cache) = &cache {
                                cache.save(&object);
                            }
                            break (object, desired);
                        }
                        Err(message) => {
                            tracing::error!(category = "spec_invalid", "{message}; waiting for a valid spec")
                        }
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    errors.ok();
                    if !told_missing {
                        tracing::info!(name, "waiting for the MinecraftServer to exist");
                        told_missing = true;
                    }
                }
                // A (re-)list begins: whether the API server answers, its next event tells.
                Some(Ok(Event::Init)) => {}
                Some(Ok(Event::Delete(_))) => errors.ok(),
                Some(Err(e)) => errors.failed(&e),
                None => return None,
            }
        };
        let (object, first) = first;
        tracing::info!(generation = ?first.generation, "following the MinecraftServer");
        let (specs_tx, specs) = watch::channel(first);
        let (object_tx, object) = watch::channel(Arc::new(object));
        let task = tokio::spawn(follow(stream, secrets, specs_tx, object_tx, errors, deleted, cache));
        Some(Self { specs, object, task })
    }
}

async fn follow(
    mut stream: futures::stream::BoxStream<'static, watcher::Result<Event<MinecraftServer>>>,
    secrets: SecretFiles,
    specs: watch::Sender<Desired>,
    object: watch::Sender<Arc<MinecraftServer>>,
    mut errors: ErrorLog,
    deleted: CancellationToken,
    cache: Option<SpecCache>,
) {
    // Whether the current listing (Init .. InitDone) has shown the resource: a re-list after the API
    // server came back that lacks it means it was deleted meanwhile.
    let mut listed = true;
    while let Some(event) = stream.next().await {
        let seen = match event {
            Ok(Event::Init) => {
                listed = false;
                continue;
            }
            Ok(Event::InitDone) => {
                errors.ok();
                if !listed {
                    tracing::warn!("the MinecraftServer is gone; stopping the server");
                    deleted.cancel();
                    return;
                }
                continue;
            }
            Ok(Event::Delete(_)) => {
                tracing::warn!("the MinecraftServer was deleted; stopping the server");
                deleted.cancel();
                return;
            }
            Ok(Event::Apply(seen) | Event::InitApply(seen)) => seen,
            Err(e) => {
                errors.failed(&e);
                continue;
            }
        };
        errors.ok();
        listed = true;
        if deleting(&seen) {
            tracing::warn!("the MinecraftServer is being deleted; stopping the server");
            deleted.cancel();
            return;
        }
        let previous = specs.borrow().clone();
        match desired(&seen, &secrets, Some(&previous)) {
            Ok(new) => {
                if let Some(cache) = &cache
                    && new.spec != previous.spec
                {
                    cache.save(&seen);
                }
                specs.send_if_modified(|current| {
                    let changed = *current != new;
                    if changed {
                        tracing::info!(generation = ?new.generation, "the MinecraftServer's spec changed");
                        *current = new;
                    }
                    changed
                });
            }
            Err(message) => {
                tracing::error!(
                    category = "spec_invalid",
                    generation = ?seen.metadata.generation,
                    "{message}; keeping the running server"
                );
                // Refused for good: the reconciler keeps the spec it runs, observes the generation
                // and reports why (Degraded SpecRejected, a Warning Event).
                let mut refused = previous;
                refused.generation = seen.metadata.generation;
                refused.notes.insert(reasons::SPEC_REJECTED, format!("{message}; the server runs the spec before"));
                specs.send_if_modified(|current| {
                    let changed = *current != refused;
                    *current = refused;
                    changed
                });
            }
        }
        object.send_replace(Arc::new(seen));
    }
}
