//! Leader election by a `coordination.k8s.io` Lease, so two replicas can run and one reconciles.
//!
//! The holder renews the Lease every `renew_every`; another replica takes it once it has seen no
//! change to it for `duration`, measured on its own clock (as client-go does: clocks of two nodes
//! need not agree). Writes go through the Lease's resourceVersion, so two candidates never both win.
//! A holder that cannot renew for `renew_deadline` (shorter than `duration`) gives up first, so two
//! leaders never overlap.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

/// How the Lease is held.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The Lease's namespace (the operator's own).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// Who holds it: unique per replica.
    pub identity: String,
    /// How long a holder that stopped renewing keeps it.
    pub duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the holder renews and candidates retry.
    pub retry_every: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// Leadership was lost.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another replica holds the Lease now.
    #[error("lost the leader Lease {namespace}/{name} to {holder}")]
    TakenOver {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// Who holds it now.
        holder: String,
    },
    /// The Lease could not be renewed in time.
    #[error("could not renew the leader Lease {namespace}/{name} for {seconds} s (last error: {source})")]
    RenewDeadline {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The renew deadline.
        seconds: u64,
        /// The last error.
        source: kube::Error,
    },
}

/// One replica's view of the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The Lease's resourceVersion when last seen to change, and when that was on our clock.
    seen: Option<(String, Instant)>,
}

fn lease_api_error(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

impl Elector {
    /// An elector for `settings` (nothing is written until [`Elector::acquire`]).
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        Self { api: Api::namespaced(client, &settings.namespace), settings, seen: None }
    }

    /// The identity this replica holds the Lease under.
    pub fn identity(&self) -> &str {
        &self.settings.identity
    }

    /// Takes or renews the Lease if it is ours to take. `Ok(None)` when we hold it now, else the
    /// holder that keeps it.
    async fn try_take(&mut self) -> Result<Option<String>, kube::Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let me = self.settings.identity.clone();
        let seconds = i32::try_from(self.settings.duration.as_secs()).unwrap_or(15);
        let Some(lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.settings.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.saw(created.metadata.resource_version);
                    Ok(None)
                }
                Err(e) if lease_api_error(&e) == Some(409) => Ok(Some("another replica".to_owned())),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.seen.as_ref().is_none_or(|(v, _)| *v != version) {
            self.seen = Some((version, Instant::now()));
        }
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.duration, Duration::from_secs);
        let unchanged_for = self.seen.as_ref().map_or(Duration::ZERO, |(_, at)| at.elapsed());
        let ours = holder.as_deref() == Some(me.as_str());
        if let Some(holder) = &holder
            && !ours
            && unchanged_for < duration
        {
            return Ok(Some(holder.clone()));
        }
        let mut next = lease;
        next.spec = Some(LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(seconds),
            acquire_time: if ours { spec.acquire_time } else { Some(now.clone()) },
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!ours)),
            ..spec
        });
        match self.api.replace(&self.settings.name, &PostParams::default(), &next).await {
            Ok(written) => {
                self.saw(written.metadata.resource_version);
                Ok(None)
            }
            // Someone wrote it since we read it: they won this round.
            Err(e) if lease_api_error(&e) == Some(409) => {
                Ok(Some(holder.unwrap_or_else(|| "another replica".to_owned())))
            }
            Err(e) => Err(e),
        }
    }

    fn saw(&mut self, version: Option<String>) {
        self.seen = Some((version.unwrap_or_default(), Instant::now()));
    }

    /// Waits until this replica holds the Lease. `false` when `shutdown` came first.
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> bool {
        let mut logged: Option<String> = None;
        loop {
            match self.try_take().await {
                Ok(None) => {
                    tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "became the leader");
                    return true;
                }
                Ok(Some(holder)) => {
                    if logged.as_deref() != Some(holder.as_str()) {
                        tracing::info!(lease = %self.settings.name, %holder, "another replica leads; standing by");
                        logged = Some(holder);
                    }
                }
                Err(e) => tracing::warn!(lease = %self.settings.name, error = %e, "reading the leader Lease failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(self.settings.retry_every) => {}
            }
        }
    }

    /// Renews the Lease until `shutdown` (then `Ok`) or until leadership is lost.
    pub async fn hold(&mut self, shutdown: &CancellationToken) -> Result<(), LeaseError> {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.settings.retry_every) => {}
            }
            match self.try_take().await {
                Ok(None) => renewed = Instant::now(),
                Ok(Some(holder)) => {
                    return Err(LeaseError::TakenOver {
                        namespace: self.settings.namespace.clone(),
                        name: self.settings.name.clone(),
                        holder,
                    });
                }
                Err(source) if renewed.elapsed() >= self.settings.renew_deadline => {
                    return Err(LeaseError::RenewDeadline {
                        namespace: self.settings.namespace.clone(),
                        name: self.settings.name.clone(),
                        seconds: self.settings.renew_deadline.as_secs(),
                        source,
                    });
                }
                Err(e) => {
                    tracing::warn!(lease = %self.settings.name, error = %e, "renewing the leader Lease failed; retrying")
                }
            }
        }
    }

    /// Gives the Lease up so another replica takes over at once instead of after `duration`.
    pub async fn release(&mut self) {
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else { return Ok(()) };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            self.api.replace(&self.settings.name, &PostParams::default(), &lease).await.map(|_| ())
        }
        .await;
        match result {
            Ok(()) => tracing::info!(lease = %self.settings.name, "released the leader Lease"),
            Err(e) => tracing::warn!(lease = %self.settings.name, error = %e, "releasing the leader Lease failed"),
        }
    }
}
