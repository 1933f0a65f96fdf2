//! The in-pod agent's Kubernetes side. The agent is the standalone runner's reconciler
//! (`crate::runner`) with another spec source and status sink: its own `MinecraftServer`, followed
//! by a watcher ([`source`]), with secret references read as mounted files ([`secrets`]); status by
//! server-side apply ([`status`]) and Events on transitions ([`events`]); and, as a container's
//! first process, a small init ([`init`]). The contract with the operator is
//! docs/design/pod-contract.md.

pub mod events;
pub mod init;
pub mod secrets;
pub mod source;
pub mod status;

use prometheus::{IntCounter, IntCounterVec, Opts};

/// The field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "atlas-agent";

/// What failed talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No client could be made (no in-cluster config and no kubeconfig).
    #[error(
        "cannot reach the Kubernetes API: {source}; in a pod this needs the service account token, outside one KUBECONFIG"
    )]
    Connect {
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Writing the resource's status failed.
    #[error("writing the status of MinecraftServer {name} failed: {source}")]
    WriteStatus {
        /// The resource.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Publishing an Event failed.
    #[error("publishing the {reason} event failed: {source}")]
    PublishEvent {
        /// The event's reason.
        reason: &'static str,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

impl AgentError {
    /// A short static category (metric label, log field).
    pub fn category(&self) -> &'static str {
        let source = match self {
            Self::Connect { .. } => return "connect",
            Self::WriteStatus { source, .. } | Self::PublishEvent { source, .. } => source,
        };
        match source {
            kube::Error::Api(status) if status.code == 403 => "forbidden",
            kube::Error::Api(status) if status.code == 404 => "not_found",
            kube::Error::Api(status) if status.code == 409 => "conflict",
            kube::Error::Api(_) => "api",
            _ => "unreachable",
        }
    }
}

/// The agent's metrics, beside the runner's on `/metrics`.
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
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let m = Self {
            status_writes: IntCounter::new(
                "atlas_agent_status_writes_total",
                "Writes of the MinecraftServer status that reached the API server.",
            )?,
            status_write_failures: IntCounterVec::new(
                Opts::new(
                    "atlas_agent_status_write_failures_total",
                    "Writes of the MinecraftServer status that failed.",
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
        registry.register(Box::new(m.status_writes.clone()))?;
        registry.register(Box::new(m.status_write_failures.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.events_dropped.clone()))?;
        Ok(m)
    }
}
