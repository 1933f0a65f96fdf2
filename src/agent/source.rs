//! The agent's spec source: its own `MinecraftServer`, followed by a kube-runtime watcher restricted
//! to its name (`fieldSelector=metadata.name=NAME`, which is what lets the Role grant list and
//! watch by resource name). The watcher resumes after a watch expires and re-lists after the API
//! server comes back; a re-listed object whose spec did not change changes nothing, so the server
//! never restarts because the API server blinked. Each new spec has its secret references pointed
//! at their files and is checked before the reconciler sees it; a bad one is logged and the running
//! server keeps running. The resource's deletion stops the agent.

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

/// A spec from `object`: its secret references pointed at their files, then checked.
fn desired(object: &MinecraftServer, secrets: &SecretFiles) -> Result<Desired, String> {
    let mut spec = object.spec.clone();
    secrets.dereference(&mut spec);
    validate(&spec)?;
    Ok(Desired { spec, generation: object.metadata.generation })
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
    pub async fn start(
        api: Api<MinecraftServer>,
        name: &str,
        secrets: SecretFiles,
        deleted: CancellationToken,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        let mut errors = ErrorLog { since: None, told: None };
        let mut told_missing = false;
        let first = loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return None,
                event = stream.next() => event,
            };
            match event {
                Some(Ok(Event::Apply(object) | Event::InitApply(object))) => {
                    errors.ok();
                    if deleting(&object) {
                        tracing::warn!("the MinecraftServer is being deleted; not starting a server");
                        continue;
                    }
                    match desired(&object, &secrets) {
                        Ok(desired) => break (object, desired),
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
        let task = tokio::spawn(follow(stream, secrets, specs_tx, object_tx, errors, deleted));
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
        match desired(&seen, &secrets) {
            Ok(new) => {
                specs.send_if_modified(|current| {
                    let changed = *current != new;
                    if changed {
                        tracing::info!(generation = ?new.generation, "the MinecraftServer's spec changed");
                        *current = new;
                    }
                    changed
                });
            }
            Err(message) => tracing::error!(
                category = "spec_invalid",
                generation = ?seen.metadata.generation,
                "{message}; keeping the running server"
            ),
        }
        object.send_replace(Arc::new(seen));
    }
}
