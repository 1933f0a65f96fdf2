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

pub use crate::metrics::AgentMetrics;

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
