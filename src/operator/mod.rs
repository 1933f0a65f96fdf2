//! `atlas-runner operator`: the cluster controller. Every `MinecraftServer` becomes a StatefulSet,
//! two Services, the agent's ServiceAccount/Role/RoleBinding and an RCON Secret, as
//! docs/design/pod-contract.md describes. A reconcile is a short list of named steps: gather (the
//! children from the watch caches, the referenced Secrets) -> build (pure, [`children`]) -> apply
//! (server-side apply, skipped when nothing changed, [`apply`]) -> roll out (replace an outdated pod
//! under `spec.upgrade`, [`upgrade`]) -> status (the operator's own conditions, [`status`]).

pub mod apply;
pub mod children;
mod controller;
pub mod gather;
pub mod lease;
pub mod metrics;
pub mod status;
pub mod upgrade;

pub use controller::{Options, run, run_until_signal};

/// A reconcile failed. Permanent errors wait for the spec (or the cluster) to change; transient
/// ones are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object cannot own children (it did not come from the API server).
    #[error("{0}")]
    Build(#[from] children::BuildError),
    /// `spec.upgrade` does not parse.
    #[error("{0}")]
    BadSpec(#[from] upgrade::BadWindow),
    /// Reading an object the reconcile needs failed.
    #[error("reading {kind} {namespace}/{name}: {source}")]
    Read {
        /// The kind read.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Creating the generated RCON Secret failed.
    #[error("creating the RCON Secret {namespace}/{name}: {source}")]
    CreateSecret {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// A server-side apply of a child failed.
    #[error("applying {kind} {namespace}/{name}: {source}")]
    Apply {
        /// The child's kind.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Writing the operator's conditions failed.
    #[error("writing the status of MinecraftServer {namespace}/{name}: {source}")]
    WriteStatus {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting an outdated pod failed.
    #[error("replacing pod {namespace}/{name}: {source}")]
    ReplacePod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// A round got no answer from the API server in time (a connection gone silent); retried.
    #[error("reconciling MinecraftServer {namespace}/{name} got no answer from the API server within {seconds} s")]
    Timeout {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The round's time limit.
        seconds: u64,
    },
}

impl Error {
    /// A short static category: the metric label, the Event reason's stem and the log field.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Build(_) => "invalid_object",
            Self::BadSpec(_) => "bad_spec",
            Self::Read { .. } => "read",
            Self::CreateSecret { .. } => "create_secret",
            Self::Apply { .. } => "apply",
            Self::WriteStatus { .. } => "write_status",
            Self::ReplacePod { .. } => "replace_pod",
            Self::Timeout { .. } => "timeout",
        }
    }

    /// Whether retrying cannot help until something changes: a spec the API server or the operator
    /// refuses, or a permission the operator lacks.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Build(_) | Self::BadSpec(_) => true,
            Self::Timeout { .. } => false,
            Self::Read { source, .. }
            | Self::CreateSecret { source, .. }
            | Self::Apply { source, .. }
            | Self::WriteStatus { source, .. }
            | Self::ReplacePod { source, .. } => {
                matches!(source, kube::Error::Api(status) if matches!(status.code, 400 | 403 | 422))
            }
        }
    }
}

/// The operator could not start, or stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No kubeconfig and not in a pod.
    #[error("no Kubernetes configuration found ({0}): run in a pod with a ServiceAccount, or set KUBECONFIG")]
    Config(#[source] kube::Error),
    /// The API server did not answer, or refused the operator.
    #[error(
        "listing MinecraftServers failed ({0}); check that the API server is reachable and the operator's ClusterRole is bound"
    )]
    Connect(#[source] kube::Error),
    /// The CRD is not installed.
    #[error(
        "the MinecraftServer CRD is not installed: `kubectl apply --server-side -f crds/` (or install the Helm chart) first"
    )]
    NoCrd,
    /// The metrics address could not be bound.
    #[error("cannot listen on {addr} for metrics ({source}); pass another --metrics-addr")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Registering metrics failed.
    #[error("registering the operator's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Leadership was lost; the process exits so that it starts over as a candidate.
    #[error("{0}")]
    Lease(#[from] lease::LeaseError),
    /// `TZ` names no time zone the image knows: both update windows would be read in UTC.
    #[error("{0}; set the chart's timeZone (TZ) to an IANA name such as Europe/Berlin, or leave it empty for UTC")]
    TimeZone(String),
}

impl StartError {
    /// A short static category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Connect(_) => "connect",
            Self::NoCrd => "no_crd",
            Self::Bind { .. } => "bind",
            Self::Metrics(_) => "metrics",
            Self::Lease(_) => "lease_lost",
            Self::TimeZone(_) => "time_zone",
        }
    }
}
