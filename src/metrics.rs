//! The Prometheus registry and the runner's metrics. Each component registers its own struct on an
//! explicit registry; `/metrics` renders it.
//!
//! Each struct is itself one [`Collector`] over all of its metrics and is registered as such, so the
//! list of its parts is the one place a metric is added: what `/metrics` exports and what the
//! reference docs list (from [`Collector::desc`] and [`Collector::collect`], which name a metric vec
//! that has no series yet, where a gathered registry leaves it out) cannot drift apart.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::api::Phase;
use crate::supervisor::ExitReason;

/// Every phase, for the one-hot `atlas_server_phase` gauge.
pub const PHASES: [Phase; 8] = [
    Phase::Pending,
    Phase::Provisioning,
    Phase::Starting,
    Phase::Running,
    Phase::Updating,
    Phase::Stopping,
    Phase::Stopped,
    Phase::Failed,
];

/// The name of a phase as status and metrics spell it.
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Provisioning => "Provisioning",
        Phase::Starting => "Starting",
        Phase::Running => "Running",
        Phase::Updating => "Updating",
        Phase::Stopping => "Stopping",
        Phase::Stopped => "Stopped",
        Phase::Failed => "Failed",
    }
}

/// The descriptors of several metrics, for a struct's [`Collector::desc`].
fn descs<'a>(parts: &[&'a dyn Collector]) -> Vec<&'a Desc> {
    parts.iter().flat_map(|part| part.desc()).collect()
}

/// The families of several metrics, for a struct's [`Collector::collect`].
fn families(parts: &[&dyn Collector]) -> Vec<MetricFamily> {
    parts.iter().flat_map(|part| part.collect()).collect()
}

/// The runner's metrics.
#[derive(Debug, Clone)]
pub struct RunnerMetrics {
    /// Players online.
    pub players_online: IntGauge,
    /// The server's player limit.
    pub players_max: IntGauge,
    /// 1 for the current phase, 0 for the others.
    pub phase: GaugeVec,
    /// 1 while the server is ready for players.
    pub ready: IntGauge,
    /// Restarts after unexpected exits.
    pub restarts: IntCounter,
    /// Exits by reason.
    pub exits: IntCounterVec,
    /// The JVM's resident memory.
    pub jvm_resident_memory: IntGauge,
    /// CPU time the JVM used.
    pub jvm_cpu_seconds: prometheus::Counter,
    /// RCON round-trip latency.
    pub rcon_latency: Histogram,
    /// RCON failures.
    pub rcon_failures: IntCounterVec,
    /// Unix time the server last became ready.
    pub last_ready_time: Gauge,
    /// Atlas Runner's version, as a constant label; always 1.
    build_info: IntGauge,
}

impl RunnerMetrics {
    /// Creates the metrics and registers them (and `atlas_build_info`) on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            players_online: IntGauge::new("atlas_players_online", "Players online, from RCON list.")?,
            players_max: IntGauge::new("atlas_players_max", "The server's player limit, from RCON list.")?,
            phase: GaugeVec::new(
                Opts::new("atlas_server_phase", "1 for the server's current phase, else 0."),
                &["phase"],
            )?,
            ready: IntGauge::new("atlas_server_ready", "1 while the server is ready for players.")?,
            restarts: IntCounter::new("atlas_server_restarts_total", "Restarts after unexpected exits.")?,
            exits: IntCounterVec::new(Opts::new("atlas_server_exits_total", "Server exits by reason."), &["reason"])?,
            jvm_resident_memory: IntGauge::new(
                "atlas_jvm_resident_memory_bytes",
                "Resident memory of the server JVM.",
            )?,
            jvm_cpu_seconds: prometheus::Counter::new(
                "atlas_jvm_cpu_seconds_total",
                "CPU time used by the server JVM.",
            )?,
            rcon_latency: Histogram::with_opts(
                HistogramOpts::new("atlas_rcon_latency_seconds", "RCON command round-trip time.")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )?,
            rcon_failures: IntCounterVec::new(
                Opts::new("atlas_rcon_failures_total", "RCON commands that failed, by category."),
                &["category"],
            )?,
            last_ready_time: Gauge::new(
                "atlas_server_last_ready_timestamp_seconds",
                "Unix time the server last became ready.",
            )?,
            build_info: IntGauge::with_opts(
                Opts::new("atlas_build_info", "Atlas Runner's version; always 1.")
                    .const_label("version", env!("CARGO_PKG_VERSION")),
            )?,
        };
        for reason in ExitReason::ALL {
            m.exits.with_label_values(&[reason.category()]);
        }
        m.build_info.set(1);
        m.set_phase(Phase::Pending);
        registry.register(Box::new(m.clone()))?;
        Ok(m)
    }

    fn parts(&self) -> [&dyn Collector; 12] {
        [
            &self.players_online,
            &self.players_max,
            &self.phase,
            &self.ready,
            &self.restarts,
            &self.exits,
            &self.jvm_resident_memory,
            &self.jvm_cpu_seconds,
            &self.rcon_latency,
            &self.rcon_failures,
            &self.last_ready_time,
            &self.build_info,
        ]
    }

    /// Sets the one-hot phase gauge.
    pub fn set_phase(&self, current: Phase) {
        for phase in PHASES {
            self.phase.with_label_values(&[phase_name(phase)]).set(if phase == current { 1.0 } else { 0.0 });
        }
    }
}

impl Collector for RunnerMetrics {
    fn desc(&self) -> Vec<&Desc> {
        descs(&self.parts())
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families(&self.parts())
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

/// The pack engine's metrics.
#[derive(Debug, Clone)]
pub struct PackMetrics {
    /// How long fetch + stage + swap took.
    pub apply_duration: Histogram,
    /// Bytes downloaded for packs.
    pub downloaded_bytes: IntCounter,
    /// Files written into the data dir by pack swaps.
    pub files_written: IntCounter,
    /// Files removed from the data dir by pack swaps.
    pub files_removed: IntCounter,
    /// Failed applies by category.
    pub failures: IntCounterVec,
    /// 1 for the applied pack version.
    pub info: GaugeVec,
    /// Automatic rollbacks of a pack update, by why (the new version's server failed before it
    /// was ready, or could not be prepared).
    pub rollbacks: IntCounterVec,
    /// Checks of a hub channel for a new pack version, by result (`current`, `available`, `failed`).
    pub update_checks: IntCounterVec,
    /// 1 for the version the channel names when it is not the applied one; no series otherwise.
    pub update_available: GaugeVec,
}

impl PackMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            apply_duration: Histogram::with_opts(
                HistogramOpts::new("atlas_pack_apply_duration_seconds", "Time to fetch, verify and swap in a pack.")
                    .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0]),
            )?,
            downloaded_bytes: IntCounter::new("atlas_pack_downloaded_bytes_total", "Bytes downloaded for packs.")?,
            files_written: IntCounter::new("atlas_pack_files_written_total", "Files written by pack swaps.")?,
            files_removed: IntCounter::new("atlas_pack_files_removed_total", "Files removed by pack swaps.")?,
            failures: IntCounterVec::new(
                Opts::new("atlas_pack_apply_failures_total", "Failed pack applies, by category."),
                &["category"],
            )?,
            info: GaugeVec::new(Opts::new("atlas_pack_info", "1 for the applied pack version."), &["version"])?,
            rollbacks: IntCounterVec::new(
                Opts::new("atlas_pack_rollbacks_total", "Pack updates rolled back automatically, by reason."),
                &["reason"],
            )?,
            update_checks: IntCounterVec::new(
                Opts::new("atlas_pack_update_checks_total", "Checks of the pack's hub channel, by result."),
                &["result"],
            )?,
            update_available: GaugeVec::new(
                Opts::new("atlas_pack_update_available", "1 for the version the hub channel names, when not applied."),
                &["version"],
            )?,
        };
        registry.register(Box::new(m.clone()))?;
        Ok(m)
    }

    fn parts(&self) -> [&dyn Collector; 9] {
        [
            &self.apply_duration,
            &self.downloaded_bytes,
            &self.files_written,
            &self.files_removed,
            &self.failures,
            &self.info,
            &self.rollbacks,
            &self.update_checks,
            &self.update_available,
        ]
    }

    /// Marks `version` as the applied one.
    pub fn set_version(&self, version: &str) {
        self.info.reset();
        self.info.with_label_values(&[version]).set(1.0);
    }
}

impl Collector for PackMetrics {
    fn desc(&self) -> Vec<&Desc> {
        descs(&self.parts())
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families(&self.parts())
    }
}

/// Backup metrics: the runner's scheduled and on-demand backups, or one CLI run (textfile).
#[derive(Debug, Clone)]
pub struct BackupMetrics {
    /// How long whole backups took (snapshot, archive, upload, manifest).
    pub duration: Histogram,
    /// The size of the last successful backup's archive.
    pub size: IntGauge,
    /// How long saving was off during the last successful backup.
    pub save_off: Gauge,
    /// Unix time of the last successful backup.
    pub last_success: Gauge,
    /// Failed backups by category.
    pub failures: IntCounterVec,
    /// Archive bytes uploaded by successful backups.
    pub uploaded_bytes: IntCounter,
    /// Time spent compressing and uploading those bytes (throughput = bytes / seconds).
    pub upload_seconds: prometheus::Counter,
    /// 1 while a backup holds the server's saving off, and after a `save-on` that failed (alert on it).
    pub saving_off: IntGauge,
    /// The longest time between two runs of `spec.backup.schedule` (0 without a schedule): how old
    /// the newest backup may get when every scheduled backup succeeds.
    pub schedule_interval: Gauge,
}

impl BackupMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            duration: Histogram::with_opts(
                HistogramOpts::new("atlas_backup_duration_seconds", "Time to take a whole backup, successful or not.")
                    .buckets(vec![1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0]),
            )?,
            size: IntGauge::new("atlas_backup_size_bytes", "Archive size of the last successful backup.")?,
            save_off: Gauge::new(
                "atlas_backup_save_off_seconds",
                "How long the server's saving was off during the last successful backup.",
            )?,
            last_success: Gauge::new(
                "atlas_backup_last_success_timestamp_seconds",
                "Unix time of the last successful backup.",
            )?,
            failures: IntCounterVec::new(
                Opts::new("atlas_backup_failures_total", "Failed backups, by category."),
                &["category"],
            )?,
            uploaded_bytes: IntCounter::new(
                "atlas_backup_uploaded_bytes_total",
                "Archive bytes uploaded by successful backups.",
            )?,
            upload_seconds: prometheus::Counter::new(
                "atlas_backup_upload_seconds_total",
                "Time spent compressing and uploading successful backups' archives.",
            )?,
            saving_off: IntGauge::new(
                "atlas_backup_saving_off",
                "1 while a backup holds the server's saving off, and after turning it back on failed.",
            )?,
            schedule_interval: Gauge::new(
                "atlas_backup_schedule_interval_seconds",
                "The longest time between two scheduled backups (0 without a schedule).",
            )?,
        };
        registry.register(Box::new(m.clone()))?;
        Ok(m)
    }

    fn parts(&self) -> [&dyn Collector; 9] {
        [
            &self.duration,
            &self.size,
            &self.save_off,
            &self.last_success,
            &self.failures,
            &self.uploaded_bytes,
            &self.upload_seconds,
            &self.saving_off,
            &self.schedule_interval,
        ]
    }

    /// Records a finished backup: its manifest on success, its error category on failure.
    pub fn observe(&self, outcome: Result<&crate::backup::Manifest, &'static str>, took: std::time::Duration) {
        self.duration.observe(took.as_secs_f64());
        match outcome {
            Ok(manifest) => {
                self.size.set(i64::try_from(manifest.archive_bytes).unwrap_or(i64::MAX));
                self.save_off.set(manifest.save_off_ms.unwrap_or(0) as f64 / 1000.0);
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                self.last_success.set(now.map_or(0.0, |d| d.as_secs_f64()));
                self.uploaded_bytes.inc_by(manifest.archive_bytes);
                self.upload_seconds.inc_by(manifest.upload_ms.unwrap_or(0) as f64 / 1000.0);
            }
            Err(category) => self.failures.with_label_values(&[category]).inc(),
        }
    }
}

impl Collector for BackupMetrics {
    fn desc(&self) -> Vec<&Desc> {
        descs(&self.parts())
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families(&self.parts())
    }
}

/// The in-pod agent's metrics, beside the runner's on its `/metrics`.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Status writes that reached the API server.
    pub status_writes: IntCounter,
    /// Status writes that failed, by category.
    pub status_write_failures: IntCounterVec,
    /// Events published, by reason.
    pub events: IntCounterVec,
    /// Events dropped because they could not be published in time.
    pub events_dropped: IntCounter,
}

impl AgentMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            status_writes: IntCounter::new(
                "atlas_agent_status_writes_total",
                "Writes of the MinecraftServer status that reached the API server.",
            )?,
            status_write_failures: IntCounterVec::new(
                Opts::new(
                    "atlas_agent_status_write_failures_total",
                    "Writes of the MinecraftServer status that failed, by category.",
                ),
                &["category"],
            )?,
            events: IntCounterVec::new(
                Opts::new("atlas_agent_events_total", "Kubernetes Events published, by reason."),
                &["reason"],
            )?,
            events_dropped: IntCounter::new(
                "atlas_agent_events_dropped_total",
                "Events dropped because the API server could not take them in time.",
            )?,
        };
        registry.register(Box::new(m.clone()))?;
        Ok(m)
    }

    fn parts(&self) -> [&dyn Collector; 4] {
        [&self.status_writes, &self.status_write_failures, &self.events, &self.events_dropped]
    }
}

impl Collector for AgentMetrics {
    fn desc(&self) -> Vec<&Desc> {
        descs(&self.parts())
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families(&self.parts())
    }
}
