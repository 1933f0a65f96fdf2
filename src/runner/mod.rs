//! The reconciler shared by `run` and (later) `agent`: a spec source in, a status out, and in between
//! rounds of prepare -> start -> watch -> restart or stop (see [`round`]).

pub mod backup;
mod checks;
mod held;
mod observe;
mod prepare;
mod round;
mod spec;
mod state;
pub mod update;
mod world;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use crate::api::conditions::events;
pub use prepare::{PackContext, PackUpdate, PrepareError, PrepareOptions, Prepared, Upgrade, prepare};
pub use spec::{Desired, FileSpecSource, SpecError, load_spec, parse_spec, validate};
pub use state::{ControlRequest, Problem, RunnerEvent, RunnerStatus, Shared};

use crate::metrics::RunnerMetrics;
use crate::supervisor::{LogBuffer, RestartPolicy, StopTimeouts};

/// How the reconciler behaves.
#[derive(Debug, Clone)]
pub struct ReconcilerOptions {
    /// Preparation (resolution, files, Java).
    pub prepare: PrepareOptions,
    /// Stop escalation timeouts.
    pub stop: StopTimeouts,
    /// Restart pacing and the crash limit.
    pub restart: RestartPolicy,
    /// How often players and process stats are sampled.
    pub poll: Duration,
    /// When an update's new server counts as failed.
    pub upgrade: UpgradePolicy,
}

/// When the new server of an update (a pack version, a Minecraft version) counts as failed, which
/// undoes the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradePolicy {
    /// It must be ready within this long of its start.
    pub ready_timeout: Duration,
    /// Once ready, it must run this long without exiting before the update counts as done.
    pub settle: Duration,
}

impl Default for UpgradePolicy {
    fn default() -> Self {
        Self { ready_timeout: Duration::from_secs(900), settle: Duration::from_secs(120) }
    }
}

/// Creates the shared state and the channel the control API sends requests on.
pub fn shared(registry: prometheus::Registry) -> prometheus::Result<(Shared, mpsc::Receiver<ControlRequest>)> {
    let metrics = RunnerMetrics::register(&registry)?;
    let backups = backup::Backups::register(&registry)?;
    let (requests, rx) = mpsc::channel(16);
    let (status, _) = watch::channel(RunnerStatus::default());
    let shared = Shared {
        logs: LogBuffer::new(2000),
        status,
        rcon: Arc::new(Mutex::new(None)),
        requests,
        metrics,
        registry,
        started: Arc::new(Mutex::new(None)),
        backups,
        events: tokio::sync::broadcast::channel(64).0,
        shutting_down: Arc::default(),
    };
    Ok((shared, rx))
}

/// Runs the reconciler until `shutdown`, then stops the server gracefully.
pub async fn reconcile(
    specs: watch::Receiver<Desired>,
    shared: Shared,
    requests: mpsc::Receiver<ControlRequest>,
    options: ReconcilerOptions,
    shutdown: CancellationToken,
) {
    round::Reconciler::new(specs, shared, requests, options, shutdown).run().await;
}

/// Where the runner keeps its state inside the data dir.
pub fn atlas_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join(".atlas")
}
