//! What the runner shares with its control and admin endpoints: status, logs, RCON, commands.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

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
    /// The last backup this runner took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<crate::api::BackupRef>,
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
            last_backup: None,
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
        self.metrics.ready.set(i64::from(phase == Phase::Running));
        self.status.send_modify(|s| {
            s.phase = phase_name(phase).to_owned();
            s.message = message;
        });
    }

    /// Whether the server is ready for players.
    pub fn is_ready(&self) -> bool {
        self.status.borrow().phase == phase_name(Phase::Running)
    }

    /// The current RCON handle, if the server has one.
    pub fn rcon(&self) -> Option<Rcon> {
        self.rcon.lock().ok().and_then(|r| r.clone())
    }
}
