//! What the runner shares with its control and admin endpoints: status, logs, RCON, commands.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::api::Phase;
use crate::metrics::{RunnerMetrics, phase_name};
use crate::rcon::Rcon;
use crate::supervisor::LogBuffer;

/// The runner's status, as `atlas-runner status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerStatus {
    /// Lifecycle phase (`Pending`, `Provisioning`, `Starting`, `Running`, `Stopping`, `Stopped`, `Failed`).
    pub phase: String,
    /// Why the runner is in this phase, when it is worth saying (a Failed reason, a bad spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The server software.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_type: Option<String>,
    /// The Minecraft version running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// The pack version applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_version: Option<String>,
    /// The version the pack's hub channel names when it is not the applied one (`spec.pack.update`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_update_available: Option<String>,
    /// Players online.
    #[serde(default)]
    pub players_online: u32,
    /// The player limit.
    #[serde(default)]
    pub players_max: u32,
    /// Names of the players online.
    #[serde(default)]
    pub player_names: Vec<String>,
    /// Seconds since the current server process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    /// The server process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Restarts after unexpected exits.
    #[serde(default)]
    pub restarts: u32,
    /// Why the server last exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_reason: Option<String>,
    /// When the server last exited (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_time: Option<String>,
    /// The last backup this runner took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<crate::api::BackupRef>,
    /// Why the last backup failed, when it did (cleared by the next success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_failure: Option<Problem>,
    /// When the next scheduled backup is due (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_backup: Option<String>,
    /// The spec generation the runner acts on (the resource's `metadata.generation`; none for a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether the spec names a pack (the data dir may hold one anyway).
    #[serde(default)]
    pub pack_wanted: bool,
    /// Why the data dir does not hold the spec's pack, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_problem: Option<Problem>,
    /// Whether the pack follows a hub channel with update checks.
    #[serde(default)]
    pub pack_checked: bool,
    /// Why an available pack update is not applied now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_update_waiting: Option<String>,
    /// How the last pack or server update went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<crate::api::UpdateOutcome>,
    /// What is wrong while the server runs on: a reason (`PackSourceUnreachable`,
    /// `DownloadApiUnreachable`, `StoreUnreachable`, `SavingLeftOff`) and what it means.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub degraded: BTreeMap<String, String>,
}

/// Something that went wrong, as a reason or category and one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// A short static word (an error category or a condition reason).
    pub reason: String,
    /// What went wrong and what to do.
    pub message: String,
}

impl Default for RunnerStatus {
    fn default() -> Self {
        Self {
            phase: phase_name(Phase::Pending).to_owned(),
            message: None,
            server_type: None,
            server_version: None,
            pack_version: None,
            pack_update_available: None,
            players_online: 0,
            players_max: 0,
            player_names: Vec::new(),
            uptime_seconds: None,
            pid: None,
            restarts: 0,
            last_exit_reason: None,
            last_exit_time: None,
            last_backup: None,
            backup_failure: None,
            next_backup: None,
            observed_generation: None,
            pack_wanted: false,
            pack_problem: None,
            pack_checked: false,
            pack_update_waiting: None,
            last_update: None,
            degraded: BTreeMap::new(),
        }
    }
}

/// A request from the control API to the reconciler.
#[derive(Debug)]
pub enum ControlRequest {
    /// Stop the server and keep it stopped until a restart.
    Stop(oneshot::Sender<Result<(), String>>),
    /// Stop (if running) and start again, clearing a Failed state.
    Restart(oneshot::Sender<Result<(), String>>),
}

/// State shared between the reconciler and the HTTP endpoints.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The server's recent output.
    pub logs: LogBuffer,
    /// The current status.
    pub status: watch::Sender<RunnerStatus>,
    /// RCON to the current server, once prepared.
    pub rcon: Arc<Mutex<Option<Rcon>>>,
    /// Requests to the reconciler.
    pub requests: mpsc::Sender<ControlRequest>,
    /// Metrics.
    pub metrics: RunnerMetrics,
    /// The registry `/metrics` renders.
    pub registry: prometheus::Registry,
    /// When the current server process started.
    pub started: Arc<Mutex<Option<Instant>>>,
    /// Backups on demand and on schedule.
    pub backups: super::backup::Backups,
    /// Transitions worth telling (Kubernetes Events in a pod); nobody need listen.
    pub events: broadcast::Sender<RunnerEvent>,
    /// Set once the runner is going down: it reports not ready from then on, whatever the phase.
    pub shutting_down: Arc<AtomicBool>,
}

/// A transition worth telling an admin: the in-pod agent publishes these as Kubernetes Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerEvent {
    /// A CamelCase reason (`Started`, `Crashed`, `UpdateRolledBack`...).
    pub reason: &'static str,
    /// What happened, in one line.
    pub message: String,
    /// Whether it is bad news.
    pub warning: bool,
}

impl Shared {
    /// The current status with the uptime filled in.
    pub fn snapshot(&self) -> RunnerStatus {
        let mut status = self.status.borrow().clone();
        status.uptime_seconds = self.started.lock().ok().and_then(|s| s.map(|t| t.elapsed().as_secs()));
        status
    }

    /// Changes the phase (status and metrics), with an optional message.
    pub fn set_phase(&self, phase: Phase, message: Option<String>) {
        self.metrics.set_phase(phase);
        self.metrics.ready.set(i64::from(phase == Phase::Running && !self.shutting_down.load(Ordering::Acquire)));
        self.status.send_modify(|s| {
            s.phase = phase_name(phase).to_owned();
            s.message = message;
        });
    }

    /// Whether the server is ready for players (and the runner is not going down).
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire) && self.status.borrow().phase == phase_name(Phase::Running)
    }

    /// Reports not ready from now on (the runner is going down), before the server is stopped.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.metrics.ready.set(0);
    }

    /// Tells a transition: logged, and sent to whoever listens (the agent's Event recorder).
    pub fn emit(&self, reason: &'static str, message: impl Into<String>, warning: bool) {
        let message = message.into();
        if warning {
            tracing::warn!(event = reason, "{message}");
        } else {
            tracing::info!(event = reason, "{message}");
        }
        // Nobody listening (the standalone runner) is fine.
        let _ = self.events.send(RunnerEvent { reason, message, warning });
    }

    /// Marks (`Some`) or clears (`None`) one reason the server runs degraded.
    pub fn set_degraded(&self, reason: &str, message: Option<String>) {
        self.status.send_if_modified(|s| match message {
            Some(message) => s.degraded.insert(reason.to_owned(), message.clone()).as_ref() != Some(&message),
            None => s.degraded.remove(reason).is_some(),
        });
    }

    /// The current RCON handle, if the server has one.
    pub fn rcon(&self) -> Option<Rcon> {
        self.rcon.lock().ok().and_then(|r| r.clone())
    }
}
