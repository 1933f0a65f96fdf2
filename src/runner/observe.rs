//! What the reconciler learns from a running server and reports: exits, players (RCON `list`), and
//! the JVM's memory and CPU.

use std::time::Instant;

use super::prepare::Prepared;
use super::{Problem, Shared};
use crate::api::conditions::reasons;
use crate::metrics::RunnerMetrics;
use crate::supervisor::{Exit, SupervisorError};

/// Reports what is about to run: versions, the pack's state, and whether a cached jar stands in
/// for an unreachable download API.
pub(super) fn report_prepared(shared: &Shared, prepared: &Prepared) {
    shared.status.send_modify(|s| {
        s.server_type = Some(prepared.server_type.clone());
        s.server_version = Some(prepared.minecraft_version.clone());
        s.players_max = prepared.max_players;
        s.pack_version = prepared.pack_version.clone();
        s.pack_wanted = prepared.spec.pack.is_some();
        s.pack_checked =
            prepared.spec.pack.as_ref().is_some_and(|p| super::update::Schedule::of(p).ok().flatten().is_some());
        s.pack_problem = prepared
            .pack_problem
            .clone()
            .map(|p| Problem { reason: reasons::HELD_VERSION.to_owned(), message: p.message });
    });
    let unreachable = prepared.pack_problem.as_ref().filter(|p| p.reason == "source_unreachable");
    shared.set_degraded(reasons::PACK_SOURCE_UNREACHABLE, unreachable.map(|p| p.message.clone()));
    shared.set_degraded(
        reasons::DOWNLOAD_API_UNREACHABLE,
        prepared.offline.as_ref().map(|why| format!("{why}; running the cached {} jar", prepared.minecraft_version)),
    );
}

/// Records how an update ended (`Applied` or `RolledBack`) in the status.
pub(super) fn report_outcome(
    shared: &Shared,
    kind: &str,
    from: Option<String>,
    to: &str,
    result: &str,
    message: Option<String>,
) {
    let outcome = crate::api::UpdateOutcome {
        kind: kind.to_owned(),
        from,
        to: to.to_owned(),
        result: result.to_owned(),
        message,
        time: jiff::Timestamp::now().to_string(),
    };
    shared.status.send_modify(|s| s.last_update = Some(outcome));
}

/// Records how a server ended: metrics, status, and the log line. `unexpected` marks an exit the
/// runner did not ask for.
pub(super) fn record_exit(shared: &Shared, exit: &Result<Exit, SupervisorError>, unexpected: bool) {
    if let Ok(mut started) = shared.started.lock() {
        *started = None;
    }
    if let Ok(exit) = exit {
        shared.metrics.exits.with_label_values(&[exit.reason.category()]).inc();
        tracing::info!(reason = exit.reason.category(), code = ?exit.info.code, signal = ?exit.info.signal, unexpected, "server exited");
        shared.status.send_modify(|s| {
            s.last_exit_reason = Some(exit.reason.category().to_owned());
            s.last_exit_time = Some(jiff::Timestamp::now().to_string());
            s.pid = None;
            s.players_online = 0;
            s.player_names.clear();
        });
    }
    shared.metrics.players_online.set(0);
    shared.metrics.jvm_resident_memory.set(0);
}

/// Asks the server who is online (RCON `list`) and reports it.
pub(super) async fn poll_players(shared: &Shared, rcon: &crate::rcon::Rcon) {
    let started = Instant::now();
    match rcon.command("list").await {
        Ok(reply) => {
            shared.metrics.rcon_latency.observe(started.elapsed().as_secs_f64());
            if let Some(list) = crate::rcon::parse_list(&reply) {
                shared.metrics.players_online.set(i64::from(list.online));
                shared.metrics.players_max.set(i64::from(list.max));
                shared.status.send_modify(|s| {
                    s.players_online = list.online;
                    s.players_max = list.max;
                    s.player_names = list.names;
                });
            }
        }
        Err(e) => {
            shared.metrics.rcon_failures.with_label_values(&[e.category()]).inc();
            tracing::debug!(error = %e, "RCON list failed");
        }
    }
}

/// Seconds since the Unix epoch, as a metric value.
pub(super) fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Samples the JVM's memory and CPU time.
pub(super) struct ProcessStats {
    pid: Option<sysinfo::Pid>,
    // None where sysinfo cannot read this platform's process table; stats are then not sampled.
    system: Option<sysinfo::System>,
    last_cpu_ms: u64,
}

impl ProcessStats {
    pub(super) fn new(pid: Option<u32>) -> Self {
        Self { pid: pid.map(sysinfo::Pid::from_u32), system: sysinfo::System::new().ok(), last_cpu_ms: 0 }
    }

    pub(super) fn sample(&mut self, metrics: &RunnerMetrics) {
        let (Some(pid), Some(system)) = (self.pid, self.system.as_mut()) else { return };
        system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        if let Some(process) = system.process(pid) {
            metrics.jvm_resident_memory.set(i64::try_from(process.memory()).unwrap_or(i64::MAX));
            let cpu_ms = process.accumulated_cpu_time();
            if cpu_ms > self.last_cpu_ms {
                metrics.jvm_cpu_seconds.inc_by((cpu_ms - self.last_cpu_ms) as f64 / 1000.0);
                self.last_cpu_ms = cpu_ms;
            }
        }
    }
}
