//! The operator's metrics: reconciles and their errors by category, reconcile duration, API writes,
//! pod replacements, leadership, and servers by phase.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::api::MinecraftServer;
use crate::metrics::{PHASES, phase_name};

/// Every error category a reconcile can end with (see `operator::Error::category`), so each series
/// exists from the start and `rate()` sees the first error.
pub const ERROR_CATEGORIES: [&str; 7] =
    ["invalid_object", "bad_spec", "read", "create_secret", "apply", "write_status", "replace_pod"];

/// The kinds of API writes the operator counts.
pub const WRITE_KINDS: [&str; 5] = ["apply", "create", "delete", "status", "event"];

/// The kinds of objects the operator reads from the API server itself, outside its watch caches.
pub const READ_KINDS: [&str; 4] = ["secret", "server", "pod", "claim"];

/// The operator's metrics.
#[derive(Debug, Clone)]
pub struct OperatorMetrics {
    /// Reconciles finished, successful or not.
    pub reconciles: IntCounter,
    /// Reconciles that failed, by error category.
    pub errors: IntCounterVec,
    /// How long reconciles took.
    pub duration: Histogram,
    /// Requests that changed something in the API server, by kind.
    pub writes: IntCounterVec,
    /// Reads outside the watch caches, by the kind of object read.
    pub reads: IntCounterVec,
    /// Pods deleted so that they come back with a new template.
    pub pods_replaced: IntCounter,
    /// Servers whose pod waits for `spec.upgrade` to allow its replacement.
    pub upgrades_pending: IntGauge,
    /// 1 while this replica holds the leader lease.
    pub leader: IntGauge,
    /// Servers by `status.phase` (`Unknown` before the agent reports one).
    pub servers: GaugeVec,
}

impl OperatorMetrics {
    /// Creates the metrics and registers them on `registry`, as one collector (so the reference
    /// page reads every family from it, a vec with no series yet included).
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            reconciles: IntCounter::new("atlas_operator_reconciles_total", "Reconciles finished, successful or not.")?,
            errors: IntCounterVec::new(
                Opts::new("atlas_operator_reconcile_errors_total", "Reconciles that failed, by category."),
                &["category"],
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new("atlas_operator_reconcile_duration_seconds", "Time one reconcile took.")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            writes: IntCounterVec::new(
                Opts::new("atlas_operator_api_writes_total", "Writes the operator sent to the API server, by kind."),
                &["kind"],
            )?,
            reads: IntCounterVec::new(
                Opts::new(
                    "atlas_operator_api_reads_total",
                    "Objects the operator read from the API server outside its watch caches, by kind.",
                ),
                &["kind"],
            )?,
            pods_replaced: IntCounter::new(
                "atlas_operator_pods_replaced_total",
                "Server pods deleted so that they come back with a new template.",
            )?,
            upgrades_pending: IntGauge::new(
                "atlas_operator_upgrades_pending",
                "Servers whose pod waits for spec.upgrade to allow its replacement.",
            )?,
            leader: IntGauge::new("atlas_operator_leader", "1 while this replica holds the leader lease.")?,
            servers: GaugeVec::new(
                Opts::new("atlas_operator_servers", "MinecraftServers by status phase."),
                &["phase"],
            )?,
        };
        registry.register(Box::new(m.clone()))?;
        for category in ERROR_CATEGORIES {
            m.errors.with_label_values(&[category]);
        }
        for kind in WRITE_KINDS {
            m.writes.with_label_values(&[kind]);
        }
        for kind in READ_KINDS {
            m.reads.with_label_values(&[kind]);
        }
        m.count_servers(std::iter::empty());
        Ok(m)
    }

    fn parts(&self) -> [&dyn Collector; 9] {
        [
            &self.reconciles,
            &self.errors,
            &self.duration,
            &self.writes,
            &self.reads,
            &self.pods_replaced,
            &self.upgrades_pending,
            &self.leader,
            &self.servers,
        ]
    }

    /// Counts `count` reads of `kind` (one of [`READ_KINDS`]).
    pub fn read(&self, kind: &'static str, count: usize) {
        self.reads.with_label_values(&[kind]).inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// Counts one write of `kind` (one of [`WRITE_KINDS`]).
    pub fn wrote(&self, kind: &'static str) {
        self.writes.with_label_values(&[kind]).inc();
    }

    /// Sets `atlas_operator_servers` and `atlas_operator_upgrades_pending` from the servers the
    /// operator sees.
    pub fn count_servers<'a>(&self, servers: impl IntoIterator<Item = &'a MinecraftServer>) {
        let mut counts = [0u32; PHASES.len() + 1];
        let mut pending = 0;
        for server in servers {
            let conditions = server.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
            if conditions.iter().any(|c| c.type_ == super::status::UPGRADE_PENDING && c.status == "True") {
                pending += 1;
            }
            let phase = server.status.as_ref().and_then(|s| s.phase);
            let index = phase.and_then(|p| PHASES.iter().position(|q| *q == p)).unwrap_or(PHASES.len());
            counts[index] += 1;
        }
        for (index, phase) in PHASES.iter().enumerate() {
            self.servers.with_label_values(&[phase_name(*phase)]).set(f64::from(counts[index]));
        }
        self.servers.with_label_values(&["Unknown"]).set(f64::from(counts[PHASES.len()]));
        self.upgrades_pending.set(pending);
    }
}

impl Collector for OperatorMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().iter().flat_map(|part| part.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.parts().iter().flat_map(|part| part.collect()).collect()
    }
}
