//! The controller's wiring: watch caches, the reconcile round, the error policy, leadership and the
//! admin endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::apply::{self, Applied, FIELD_MANAGER};
use super::children::{self, CHILD_SELECTOR, Children, Existing, Identity, Settings};
use super::gather::{self, Caches, SecretState};
use super::lease::{Elector, LeaseSettings};
use super::metrics::OperatorMetrics;
use super::status::{self, SECRETS_RESOLVED, UPGRADE_PENDING};
use super::upgrade::{self, Rollout};
use super::{Error, StartError};
use crate::api::MinecraftServer;
use crate::api::conditions::events;

/// `atlas-runner operator`'s settings (flags, or the environment the chart sets).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The image server pods run (the agent). The chart sets the operator's own image.
    #[arg(long, env = "ATLAS_AGENT_IMAGE")]
    pub agent_image: String,
    /// The server pods' imagePullPolicy (Always, IfNotPresent, Never). Default: Kubernetes' own.
    #[arg(long, env = "ATLAS_AGENT_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_image_pull_policy: Option<String>,
    /// Reconcile the MinecraftServers of this namespace only. Default: every namespace.
    #[arg(long, env = "ATLAS_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "ATLAS_OPERATOR_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    pub metrics_addr: SocketAddr,
    /// Make a PodMonitor for every server (needs the Prometheus Operator's CRDs; without them this
    /// is logged and ignored).
    #[arg(long, env = "ATLAS_POD_MONITORS")]
    pub pod_monitors: bool,
    /// Without `--pod-monitors`: delete the PodMonitors the operator made while they were on (once,
    /// at start; needs `list` and `delete` on PodMonitors).
    #[arg(long, env = "ATLAS_DELETE_POD_MONITORS")]
    pub delete_pod_monitors: bool,
    /// Run as a candidate for the leader Lease, so that several replicas can run and one works.
    #[arg(long, env = "ATLAS_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// The leader Lease's namespace. Default: the pod's namespace (POD_NAMESPACE), else the
    /// kubeconfig's.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// The leader Lease's name.
    #[arg(long, default_value = "atlas-runner-operator")]
    pub lease_name: String,
    /// Seconds between two reconciles of an unchanged server (an idle resync writes nothing).
    #[arg(long, env = "ATLAS_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// How many servers are reconciled at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
}

/// How long a permanent error waits before the next try when nothing changes meanwhile.
const PERMANENT_RETRY: Duration = Duration::from_secs(600);
/// The longest backoff after transient errors.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often a server whose Secrets are missing is looked at again (Secrets are not watched).
const SECRET_RETRY: Duration = Duration::from_secs(15);
/// How long rounds in flight get to finish after SIGTERM (the pod's grace period is 30 s).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// How often a pod waiting for `spec.upgrade` is looked at again (the window opens with time).
const UPGRADE_RETRY: Duration = Duration::from_secs(60);
/// How long one round may take: a handful of requests, each answered in well under a second.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

struct Context {
    client: Client,
    settings: Settings,
    caches: Caches,
    /// True once the PodMonitor CRD is served and its cache has listed: rounds make PodMonitors
    /// (when asked to) only then.
    pod_monitors_served: tokio::sync::watch::Receiver<bool>,
    recorder: Recorder,
    metrics: OperatorMetrics,
    resync: Duration,
    /// Consecutive transient failures per server, for the backoff.
    failures: Mutex<HashMap<ObjectRef<MinecraftServer>, u32>>,
    /// The conditions last written per server, with the resourceVersion the server had in the
    /// cache when they were: until the cache shows a newer version, it cannot know of the write,
    /// and a round it triggers (a child's event) must not write the same again.
    written: Mutex<HashMap<ObjectRef<MinecraftServer>, Written>>,
    /// The last Secret check per server, with the generation and time it was made: a round the
    /// agent's player count starts need not GET every Secret again.
    secret_checks: Mutex<HashMap<ObjectRef<MinecraftServer>, SecretChecks>>,
    /// The permanent failure last published as a `ReconcileFailed` Event per server, until a
    /// round succeeds.
    reported: Mutex<HashMap<ObjectRef<MinecraftServer>, String>>,
    /// The claim size last made sure of per server, for the generation and pod it was.
    claim_checks: Mutex<HashMap<ObjectRef<MinecraftServer>, ClaimCheck>>,
    /// The servers as cached: entries of the maps above for servers no longer there are dropped.
    servers: Store<MinecraftServer>,
    /// When those maps were last pruned.
    pruned: Mutex<Instant>,
}

/// The generation, the size asked for and the pod's uid when a server's claim was last seen to
/// hold that size.
type ClaimCheck = (Option<i64>, String, Option<String>);

/// A server's Secret checks, for the generation and at the time they were made.
type SecretChecks = (Option<i64>, Instant, Vec<gather::SecretCheck>);

/// How long a check that found every Secret present is reused for the same generation.
const SECRET_CHECK_TTL: Duration = Duration::from_secs(60);
/// How often the per-server maps are pruned of deleted servers.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The resourceVersion a server had when its conditions were written, and those conditions.
type Written = (Option<String>, Vec<Condition>);

impl Context {
    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<MinecraftServer>, u32>> {
        // A poisoned map only loses backoff counts.
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<MinecraftServer>, Written>> {
        // A poisoned map only costs a repeated status write.
        self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn secret_checks(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<MinecraftServer>, SecretChecks>> {
        // A poisoned map only costs Secret reads.
        self.secret_checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reported(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<MinecraftServer>, String>> {
        // A poisoned map only costs a repeated Event.
        self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn claim_checks(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<MinecraftServer>, ClaimCheck>> {
        // A poisoned map only costs claim reads.
        self.claim_checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops what the per-server maps hold about servers the cache no longer has (deleted), at
    /// most once a [`PRUNE_EVERY`]: a round never runs for a deleted server to clean up after it.
    fn prune(&self) {
        {
            let mut pruned = self.pruned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if pruned.elapsed() < PRUNE_EVERY {
                return;
            }
            *pruned = Instant::now();
        }
        let known = |key: &ObjectRef<MinecraftServer>| self.servers.get(key).is_some();
        self.failures().retain(|key, _| known(key));
        self.written().retain(|key, _| known(key));
        self.secret_checks().retain(|key, _| known(key));
        self.claim_checks().retain(|key, _| known(key));
        self.reported().retain(|key, _| known(key));
    }

    async fn publish(&self, server: &MinecraftServer, type_: EventType, reason: &str, action: &str, note: String) {
        let note = event_note(&note);
        let event =
            Event { type_, reason: reason.to_owned(), note: Some(note), action: action.to_owned(), secondary: None };
        match self.recorder.publish(&event, &server.object_ref(&())).await {
            Ok(()) => self.metrics.wrote("event"),
            Err(e) => tracing::warn!(server = %server.name_any(), %reason, error = %e, "publishing an Event failed"),
        }
    }
}

/// The API server refuses an Event whose note is longer than 1024 bytes (an API error quoted
/// whole easily is): one line, cut on a character boundary.
fn event_note(note: &str) -> String {
    const LIMIT: usize = 1024;
    let line = note.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() <= LIMIT {
        return line;
    }
    let mut end = LIMIT - 3;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &line[..end])
}

fn read_error(kind: &'static str, namespace: &str, name: &str) -> impl FnOnce(kube::Error) -> Error {
    let (namespace, name) = (namespace.to_owned(), name.to_owned());
    move |source| Error::Read { kind, namespace, name, source }
}

/// Applies one child and counts the write.
async fn apply_child<K>(
    ctx: &Context,
    kind: &'static str,
    api: Api<K>,
    desired: K,
    observed: Option<&K>,
) -> Result<(), Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let (namespace, name) = (desired.namespace().unwrap_or_default(), desired.name_any());
    match apply::apply(&api, desired, observed).await {
        Ok(Applied::Unchanged) => Ok(()),
        Ok(Applied::Written) => {
            ctx.metrics.wrote("apply");
            tracing::info!(kind, %namespace, %name, "applied");
            Ok(())
        }
        Err(source) => Err(Error::Apply { kind, namespace, name, source }),
    }
}

/// [`apply_child`] of a namespaced kind of a fixed type.
async fn apply_in<K>(
    ctx: &Context,
    namespace: &str,
    kind: &'static str,
    desired: K,
    observed: Option<&K>,
) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    apply_child(ctx, kind, Api::namespaced(ctx.client.clone(), namespace), desired, observed).await
}

fn random_password() -> String {
    rand::rng().sample_iter(&rand::distr::Alphanumeric).take(32).map(char::from).collect()
}

/// One reconcile of one server: gather -> build -> apply -> roll out -> status.
async fn reconcile(server: Arc<MinecraftServer>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.prune();
    let result = round(&server, &ctx).await;
    ctx.metrics.reconciles.inc();
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures().remove(&ObjectRef::from_obj(&*server));
        ctx.reported().remove(&ObjectRef::from_obj(&*server));
    }
    result
}

async fn round(server: &MinecraftServer, ctx: &Context) -> Result<Action, Error> {
    if server.metadata.deletion_timestamp.is_some() {
        // Owner references hand the children to the garbage collector; the claim stays (Retain).
        return Ok(Action::await_change());
    }
    let id = Identity::of(server)?;
    let gathered = gather(ctx, server, &id).await?;
    let built = if ctx.settings.pod_monitors && !*ctx.pod_monitors_served.borrow() {
        let settings = Settings { pod_monitors: false, ..ctx.settings.clone() };
        children::build(server, &settings, &gathered.existing)?
    } else {
        children::build(server, &ctx.settings, &gathered.existing)?
    };
    apply_children(ctx, server, &id, built, &gathered).await?;
    let (rollout, grace_ends) = roll_out(ctx, server, &id, &gathered).await?;
    report(ctx, server, &id, &gathered, &rollout).await?;
    Ok(match rollout {
        _ if !gathered.secrets_ok() => Action::requeue(SECRET_RETRY),
        Rollout::Wait { .. } => Action::requeue(grace_ends.map_or(UPGRADE_RETRY, |ends| ends.min(UPGRADE_RETRY))),
        Rollout::Settling | Rollout::Replacing => Action::requeue(Duration::from_secs(5)),
        _ => Action::requeue(ctx.resync),
    })
}

/// What a round reads before it builds anything.
struct Gathered {
    /// The children as the caches hold them.
    observed: gather::Observed,
    /// Each referenced Secret's state.
    secrets: Vec<gather::SecretCheck>,
    /// What the StatefulSet holds that cannot change.
    existing: Existing,
}

impl Gathered {
    fn secrets_ok(&self) -> bool {
        self.secrets.iter().all(|c| c.state == SecretState::Present)
    }
}

/// Gather: the children as cached, every referenced Secret as the API server holds it, and the
/// generated RCON Secret created when it is missing.
async fn gather(ctx: &Context, server: &MinecraftServer, id: &Identity) -> Result<Gathered, Error> {
    let ns = id.namespace.as_str();
    let observed = ctx.caches.observe(id);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let uses = children::secret_uses(&id.name, &server.spec);
    let key = ObjectRef::from_obj(server);
    let generation = server.metadata.generation;
    let cached = ctx.secret_checks().get(&key).and_then(|(seen, at, checks)| {
        let fresh = *seen == generation && at.elapsed() < SECRET_CHECK_TTL;
        let present = checks.iter().all(|c| c.state == SecretState::Present);
        // A missing Secret is looked for again every round: it may have been created since.
        (fresh && present).then(|| checks.clone())
    });
    let fresh = cached.is_none();
    let mut secrets = match cached {
        Some(checks) => checks,
        None => {
            let reads = uses.len();
            let checks = gather::check_secrets(&api, uses).await.map_err(read_error("Secret", ns, &id.name))?;
            ctx.metrics.read("secret", reads);
            checks
        }
    };
    for check in secrets.iter_mut().filter(|c| c.usage.generated && c.state == SecretState::Missing) {
        // Created once with a fresh password and never written again: a password is not rotated
        // by accident, and an existing Secret of that name (the user's) is taken as it is.
        let secret = children::rcon_secret(id, &random_password());
        let params = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PostParams::default() };
        match api.create(&params, &secret).await {
            Ok(_) => {
                ctx.metrics.wrote("create");
                tracing::info!(namespace = %ns, name = %check.usage.name, "created the RCON Secret");
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => {
                return Err(Error::CreateSecret { namespace: ns.to_owned(), name: check.usage.name.clone(), source });
            }
        }
        check.state = SecretState::Present;
    }
    // Kept with the RCON Secret just created counted present: the next round (the one its own
    // writes start) need not read it again.
    if fresh {
        ctx.secret_checks().insert(key, (generation, Instant::now(), secrets.clone()));
    }
    let existing = Existing {
        claim_templates: observed.stateful_set.as_ref().and_then(|s| s.spec.as_ref()?.volume_claim_templates.clone()),
    };
    Ok(Gathered { observed, secrets, existing })
}

/// Apply: the agent's RBAC before the pod that uses it; the StatefulSet only once every Secret it
/// mounts exists (a pod with a volume that cannot mount never starts).
async fn apply_children(
    ctx: &Context,
    server: &MinecraftServer,
    id: &Identity,
    built: Children,
    gathered: &Gathered,
) -> Result<(), Error> {
    let (ns, seen) = (id.namespace.as_str(), &gathered.observed);
    apply_in(ctx, ns, "ServiceAccount", built.service_account, seen.service_account.as_deref()).await?;
    apply_in(ctx, ns, "Role", built.role, seen.role.as_deref()).await?;
    apply_in(ctx, ns, "RoleBinding", built.role_binding, seen.role_binding.as_deref()).await?;
    apply_in(ctx, ns, "Service", built.headless_service, seen.headless_service.as_deref()).await?;
    apply_in(ctx, ns, "Service", built.game_service, seen.game_service.as_deref()).await?;
    if let Some(monitor) = built.pod_monitor {
        let api = Api::namespaced_with(ctx.client.clone(), ns, &children::pod_monitor_resource());
        apply_child(ctx, "PodMonitor", api, monitor, seen.pod_monitor.as_deref()).await?;
    }
    if !gathered.secrets_ok() {
        return Ok(());
    }
    apply_in(ctx, ns, "StatefulSet", built.stateful_set, seen.stateful_set.as_deref()).await?;
    // Only a size grown past the claim template's can need the claim itself asked for more.
    let template_size = gathered.existing.claim_templates.as_ref().and_then(|t| {
        t.first()?.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?.get("storage").map(|q| q.0.clone())
    });
    let wanted_size = children::storage_size(&server.spec);
    if template_size.is_some_and(|t| apply::larger(&wanted_size, &t)) {
        // Once the claim holds the size, it is not read again for the same spec and pod: a claim
        // comes anew only with a new pod (the StatefulSet makes both).
        let key = ObjectRef::from_obj(server);
        let pod = seen.pod.as_ref().and_then(|p| p.metadata.uid.clone());
        let check = (server.metadata.generation, wanted_size.clone(), pod);
        if ctx.claim_checks().get(&key) != Some(&check) && grow_claim(ctx, id, &wanted_size).await? {
            ctx.claim_checks().insert(key, check);
        }
    }
    Ok(())
}

/// Roll out: an outdated pod is replaced when `spec.upgrade` allows. Also returns when to look
/// again because a grace ends: a pod that went not ready a moment ago ([`upgrade::Serving::Faltering`]).
async fn roll_out(
    ctx: &Context,
    server: &MinecraftServer,
    id: &Identity,
    gathered: &Gathered,
) -> Result<(Rollout, Option<Duration>), Error> {
    let spec = &server.spec;
    let policy = spec.upgrade.clone().unwrap_or_default();
    let observed = &gathered.observed;
    let now = jiff::Zoned::now();
    let judge = |server: &MinecraftServer, pod: Option<&Pod>| match &observed.stateful_set {
        Some(sts) if !spec.paused => {
            let mut serving = upgrade::serving(server, Some(sts));
            if let (upgrade::Serving::Down, Some(pod)) = (serving, pod) {
                serving = upgrade::serving_not_ready(server, pod, now.timestamp());
            }
            upgrade::decide(sts, observed.pod.as_deref(), serving, &policy, &now).map(|rollout| (rollout, serving))
        }
        _ => Ok((Rollout::NoPod, upgrade::Serving::Down)),
    };
    let (mut rollout, mut serving) = judge(server, None)?;
    // The StatefulSet counts the pod not ready while the agent's last status says it serves: the
    // pod itself tells a readiness probe that failed a moment ago (the players are likely still
    // on) from a pod that does not run. Read only then, so a steady round reads nothing.
    let mut pod = None;
    if matches!(rollout, Rollout::Replace { .. })
        && serving == upgrade::Serving::Down
        && upgrade::agent_serving(server) != upgrade::Serving::Down
    {
        pod = read_pod(ctx, id).await?;
        (rollout, serving) = judge(server, pod.as_ref())?;
    }
    // The cache may be behind the agent's last write (a player who just joined): the count a
    // deletion rests on is read again from the API server first.
    if matches!(rollout, Rollout::Replace { .. }) && policy.require_no_players && serving != upgrade::Serving::Down {
        let servers: Api<MinecraftServer> = Api::namespaced(ctx.client.clone(), &id.namespace);
        let fresh = servers.get(&id.name).await.map_err(|source| Error::Read {
            kind: "MinecraftServer",
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            source,
        })?;
        ctx.metrics.read("server", 1);
        (rollout, serving) = judge(&fresh, pod.as_ref())?;
    }
    if let (Rollout::Replace { from, to }, Some(pod)) = (&rollout, &observed.pod) {
        replace_pod(ctx, server, id, pod, from, to).await?;
    }
    let grace_ends = match serving {
        // A moment after the grace, so that the next round sees it over.
        upgrade::Serving::Faltering { left, .. } if matches!(rollout, Rollout::Wait { .. }) => {
            Some(left + Duration::from_secs(1))
        }
        _ => None,
    };
    Ok((rollout, grace_ends))
}

/// The server's pod, whole (the cache holds its metadata only). The chart grants pods `list`, not
/// `get`: a list by name is the same one read.
async fn read_pod(ctx: &Context, id: &Identity) -> Result<Option<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &id.namespace);
    let name = id.pod();
    let params = ListParams::default().fields(&format!("metadata.name={name}"));
    let list = pods.list(&params).await.map_err(read_error("Pod", &id.namespace, &name))?;
    ctx.metrics.read("pod", 1);
    Ok(list.items.into_iter().next())
}

/// Status: the operator's three conditions, written only when they say something new.
async fn report(
    ctx: &Context,
    server: &MinecraftServer,
    id: &Identity,
    gathered: &Gathered,
    rollout: &Rollout,
) -> Result<(), Error> {
    let verdicts = [
        status::workload_verdict(server.spec.paused, gathered.secrets_ok(), gathered.observed.stateful_set.as_deref()),
        status::secrets_verdict(&id.namespace, &gathered.secrets),
        status::upgrade_verdict(rollout),
    ];
    let previous = server.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let wanted = status::conditions(&verdicts, &previous, server.metadata.generation, jiff::Timestamp::now());
    let key = ObjectRef::from_obj(server);
    let version = server.metadata.resource_version.clone();
    let already_written = {
        let mut written = ctx.written();
        // Once the cache holds a newer version, it knows of the write: the entry has done its job.
        if written.get(&key).is_some_and(|(seen, _)| *seen != version) {
            written.remove(&key);
        }
        written.get(&key).is_some_and(|(_, sent)| !status::changed(&wanted, sent))
    };
    if !status::changed(&wanted, &previous) || already_written {
        return Ok(());
    }
    let api: Api<MinecraftServer> = Api::namespaced(ctx.client.clone(), &id.namespace);
    status::write(&api, &id.name, &wanted).await.map_err(|source| Error::WriteStatus {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        source,
    })?;
    ctx.metrics.wrote("status");
    ctx.written().insert(key, (version, wanted));
    announce(ctx, server, &verdicts, &previous).await;
    Ok(())
}

/// Events on transitions only: a Secret problem appearing or going away, a pod starting to wait.
async fn announce(ctx: &Context, server: &MinecraftServer, verdicts: &[status::Verdict], previous: &[Condition]) {
    for verdict in verdicts {
        let now_bad = match verdict.kind {
            SECRETS_RESOLVED => !verdict.status,
            UPGRADE_PENDING => verdict.status,
            _ => continue,
        };
        if !status::flipped(verdict.kind, verdict.status, previous) {
            continue;
        }
        let was_reported = previous.iter().any(|c| c.type_ == verdict.kind);
        match (verdict.kind, now_bad) {
            (SECRETS_RESOLVED, true) => {
                ctx.publish(server, EventType::Warning, verdict.reason, "ResolveSecrets", verdict.message.clone())
                    .await;
            }
            (SECRETS_RESOLVED, false) if was_reported => {
                ctx.publish(
                    server,
                    EventType::Normal,
                    events::SECRETS_RESOLVED,
                    "ResolveSecrets",
                    verdict.message.clone(),
                )
                .await;
            }
            (UPGRADE_PENDING, true) => {
                ctx.publish(server, EventType::Normal, events::UPGRADE_PENDING, "ReplacePod", verdict.message.clone())
                    .await;
            }
            _ => {}
        }
    }
}

async fn replace_pod(
    ctx: &Context,
    server: &MinecraftServer,
    id: &Identity,
    pod: &PartialObjectMeta<Pod>,
    from: &str,
    to: &str,
) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &id.namespace);
    // The uid precondition makes sure only the outdated pod goes, never its replacement.
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: pod.metadata.uid.clone(), resource_version: None }),
        ..DeleteParams::default()
    };
    match pods.delete(&id.pod(), &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => return Ok(()),
        Err(source) => return Err(Error::ReplacePod { namespace: id.namespace.clone(), name: id.pod(), source }),
    }
    ctx.metrics.wrote("delete");
    ctx.metrics.pods_replaced.inc();
    tracing::info!(namespace = %id.namespace, pod = %id.pod(), %from, %to, "replacing the pod to roll out a new template");
    let note = format!("deleted pod {} (revision {from}) so that it comes back with revision {to}", id.pod());
    ctx.publish(server, EventType::Normal, events::REPLACING_POD, "ReplacePod", note).await;
    Ok(())
}

/// Grows the pod's claim when `spec.storage.size` grew past it (a StatefulSet's claim template
/// cannot change, so the claim is asked directly; the storage class must allow expansion). False
/// when there is no claim yet.
async fn grow_claim(ctx: &Context, id: &Identity, size: &str) -> Result<bool, Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &id.namespace);
    let name = id.claim();
    let found = claims.get_opt(&name).await.map_err(read_error("PersistentVolumeClaim", &id.namespace, &name))?;
    ctx.metrics.read("claim", 1);
    let Some(claim) = found else { return Ok(false) };
    let current = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_default();
    if !apply::larger(size, &current) {
        return Ok(true);
    }
    let patch = serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"resources": {"requests": {"storage": size}}},
    });
    claims.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await.map_err(|source| {
        Error::Apply { kind: "PersistentVolumeClaim", namespace: id.namespace.clone(), name: name.clone(), source }
    })?;
    ctx.metrics.wrote("apply");
    tracing::info!(namespace = %id.namespace, claim = %name, from = %current, to = %size, "asked for a larger volume");
    Ok(true)
}

/// Whether `note` is news for `key`: not the failure last reported for it. Remembers it.
fn first_report<K: Eq + std::hash::Hash>(reported: &mut HashMap<K, String>, key: K, note: &str) -> bool {
    if reported.get(&key).is_some_and(|last| last == note) {
        return false;
    }
    reported.insert(key, note.to_owned());
    true
}

fn error_policy(server: Arc<MinecraftServer>, error: &Error, ctx: Arc<Context>) -> Action {
    let category = error.category();
    ctx.metrics.errors.with_label_values(&[category]).inc();
    let name = server.name_any();
    let namespace = server.namespace().unwrap_or_default();
    if error.is_permanent() {
        tracing::warn!(%namespace, %name, category, error = %error, "reconcile failed; waiting for a change");
        let note = error.to_string();
        // An Event when the failure starts or changes, not at every retry of the same one.
        if first_report(&mut ctx.reported(), ObjectRef::from_obj(&*server), &note) {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                ctx.publish(&server, EventType::Warning, events::RECONCILE_FAILED, "Reconcile", note).await;
            });
        }
        return Action::requeue(PERMANENT_RETRY);
    }
    let failures = {
        let mut map = ctx.failures();
        let count = map.entry(ObjectRef::from_obj(&*server)).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    // 1 s, 2 s, 4 s ... up to 5 minutes, with up to 25% jitter so servers failing together spread out.
    let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(MAX_BACKOFF);
    let jitter = base.mul_f64(rand::rng().random_range(0.0..0.25));
    tracing::warn!(%namespace, %name, category, failures, retry_in = ?(base + jitter), error = %error, "reconcile failed; retrying");
    Action::requeue(base + jitter)
}

fn cached<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    // Managed fields are dropped from the caches: the operator never reads them, and they are
    // about half of each object.
    let stream = reflector::reflector(
        writer,
        watcher(api, config).default_backoff().modify(|o: &mut K| {
            o.meta_mut().managed_fields = None;
        }),
    )
    .touched_objects();
    (reader, stream)
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run_until_signal(options: Options) -> Result<(), StartError> {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("signal received; stopping");
            trigger.cancel();
        }
    });
    let result = run(options, shutdown).await;
    signals.abort();
    result
}

/// Runs the operator until `shutdown` (then `Ok`), or until it loses the leader Lease.
pub async fn run(options: Options, shutdown: CancellationToken) -> Result<(), StartError> {
    // The pods get the same TZ: a name the operator cannot read would leave both windows in UTC.
    if let Some(problem) = crate::runner::update::unknown_time_zone() {
        return Err(StartError::TimeZone(problem));
    }
    let time_zone = std::env::var("TZ").ok().filter(|zone| !zone.is_empty());
    let client = Client::try_default().await.map_err(StartError::Config)?;
    let scope = options.watch_namespace.as_deref();
    let servers_api: Api<MinecraftServer> = scoped(&client, scope);
    match servers_api.list(&ListParams::default().limit(1)).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Err(StartError::NoCrd),
        Err(e) => return Err(StartError::Connect(e)),
    }
    let registry = prometheus::Registry::new();
    let metrics = OperatorMetrics::register(&registry)?;

    let settings = Settings {
        image: options.agent_image.clone(),
        image_pull_policy: options.agent_image_pull_policy.clone(),
        pod_monitors: options.pod_monitors,
        time_zone,
    };
    let resync = Duration::from_secs(options.resync_seconds.max(1));

    let children_config = watcher::Config::default().labels(CHILD_SELECTOR).any_semantic();
    let (servers, servers_stream) = cached(servers_api, watcher::Config::default().any_semantic());
    let (stateful_sets, sts_stream) = cached::<StatefulSet>(scoped(&client, scope), children_config.clone());
    let (services, svc_stream) = cached::<Service>(scoped(&client, scope), children_config.clone());
    let (service_accounts, sa_stream) = cached::<ServiceAccount>(scoped(&client, scope), children_config.clone());
    let (roles, role_stream) = cached::<Role>(scoped(&client, scope), children_config.clone());
    let (role_bindings, rb_stream) = cached::<RoleBinding>(scoped(&client, scope), children_config.clone());
    // Pods are read for their revision label only: a metadata-only watch.
    let (pods, pod_stream) = cached(scoped::<PartialObjectMeta<Pod>>(&client, scope), children_config.clone());

    let admin_listener = tokio::net::TcpListener::bind(options.metrics_addr)
        .await
        .map_err(|source| StartError::Bind { addr: options.metrics_addr, source })?;
    let admin = {
        let router = admin_router(registry, metrics.clone(), servers.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(admin_listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
        })
    };

    let identity = format!(
        "{}-{}",
        std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "atlas-operator".to_owned()),
        random_password().get(..6).unwrap_or("000000").to_lowercase()
    );
    let mut elector = options.leader_elect.then(|| {
        let namespace = options.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        Elector::new(client.clone(), LeaseSettings::new(namespace, options.lease_name.clone(), identity.clone()))
    });
    if let Some(elector) = &mut elector
        && !elector.acquire(&shutdown).await
    {
        let _ = admin.await;
        return Ok(());
    }
    metrics.leader.set(1);

    let monitors_api: Api<DynamicObject> = {
        let resource = children::pod_monitor_resource();
        match scope {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        }
    };
    // The Prometheus Operator may be installed after Atlas Runner: its CRD is looked for at every
    // resync until it is served, and only then is the PodMonitor cache started. `served` turns
    // true once that cache has listed; every server is reconciled then, to get its PodMonitor.
    let (served_tx, served) = tokio::sync::watch::channel(false);
    let (pod_monitor_store, pod_monitor_stream, discovery) = if options.pod_monitors {
        let writer = reflector::store::Writer::<DynamicObject>::new(children::pod_monitor_resource());
        let reader = writer.as_reader();
        let (found_tx, mut found) = tokio::sync::watch::channel(false);
        let (api, config) = (monitors_api.clone(), children_config.clone());
        let start = async move {
            let _ = found.wait_for(|found| *found).await;
        };
        let stream =
            futures::stream::once(start).flat_map(move |()| watcher(api.clone(), config.clone()).default_backoff());
        let stream = reflector::reflector(writer, stream).touched_objects();
        let (client, store) = (client.clone(), reader.clone());
        let discovery = tokio::spawn(async move {
            let mut told = false;
            while !pod_monitor_crd_exists(&client, &mut told).await {
                tokio::time::sleep(resync).await;
            }
            let _ = found_tx.send(true);
            let _ = store.wait_until_ready().await;
            tracing::info!("the PodMonitor CRD is served; making a PodMonitor for every server");
            let _ = served_tx.send(true);
        });
        (Some(reader), Some(stream), discovery)
    } else if options.delete_pod_monitors {
        // Turned off: the PodMonitors made while it was on go (when the CRD is served at all).
        let client = client.clone();
        let discovery = tokio::spawn(async move {
            let mut told = true;
            if pod_monitor_crd_exists(&client, &mut told).await {
                remove_pod_monitors(&monitors_api).await;
            }
        });
        (None, None, discovery)
    } else {
        (None, None, tokio::spawn(async {}))
    };

    let ctx = Arc::new(Context {
        client: client.clone(),
        settings,
        caches: Caches {
            stateful_sets,
            services,
            service_accounts,
            roles,
            role_bindings,
            pods,
            pod_monitors: pod_monitor_store,
        },
        pod_monitors_served: served.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "atlas-operator".to_owned(), instance: Some(identity) },
        ),
        metrics: metrics.clone(),
        resync,
        failures: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
        secret_checks: Mutex::new(HashMap::new()),
        claim_checks: Mutex::new(HashMap::new()),
        reported: Mutex::new(HashMap::new()),
        servers: servers.clone(),
        pruned: Mutex::new(Instant::now()),
    });

    // Reconciling against caches still filling would re-apply what already exists, so reconciles
    // wait until every cache has listed once. One task waits on the caches and tells the others
    // through a watch channel: a Store's readiness wakes only one of several concurrent waiters.
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let ready_watch = ready_rx.clone();
    let waiter = {
        let caches = ctx.caches.clone();
        tokio::spawn(async move {
            wait_ready(&caches).await;
            let _ = ready_tx.send(true);
        })
    };
    // The agent writes its status up to six times a minute per server; only what a round reads
    // from it (the generation, players, the agent's Ready) starts one.
    let servers_stream = servers_stream.predicate_filter(round_trigger, PredicateConfig::default());
    let mut controller = Controller::for_stream(servers_stream, servers)
        .owns_stream(sts_stream)
        .owns_stream(svc_stream)
        .owns_stream(sa_stream)
        .owns_stream(role_stream)
        .owns_stream(rb_stream)
        .watches_stream(pod_stream, |pod: PartialObjectMeta<Pod>| {
            // A server's pod is owned by its StatefulSet; the instance label names the server.
            let namespace = pod.namespace().unwrap_or_default();
            pod.labels()
                .get("app.kubernetes.io/instance")
                .map(|name| ObjectRef::<MinecraftServer>::new(name).within(&namespace))
        })
        .with_config(ControllerConfig::default().concurrency(options.concurrency));
    if let Some(stream) = pod_monitor_stream {
        let mut served = served.clone();
        let all = futures::stream::once(async move {
            let _ = served.wait_for(|served| *served).await;
        });
        controller = controller.owns_stream_with(stream, children::pod_monitor_resource()).reconcile_all_on(all);
    }
    let stopping = shutdown.clone();
    let reconciles = controller
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            move |server, ctx: Arc<Context>| {
                let mut ready = ready_rx.clone();
                let stopping = stopping.clone();
                async move {
                    // A graceful shutdown stops feeding the caches and waits for running rounds:
                    // a round still waiting for them must give up, or the two wait for each other.
                    let ready = tokio::select! {
                        ready = ready.wait_for(|ready| *ready) => ready.is_ok(),
                        () = stopping.cancelled() => false,
                    };
                    if !ready {
                        return Ok(Action::await_change());
                    }
                    // kube's client has no read timeout by default (it would also cut watches): a
                    // round on a connection gone silent would hold one of the concurrency slots
                    // for ever.
                    let (namespace, name) = (server.namespace().unwrap_or_default(), server.name_any());
                    match tokio::time::timeout(ROUND_TIMEOUT, reconcile(server, ctx)).await {
                        Ok(result) => result,
                        Err(_) => Err(Error::Timeout { namespace, name, seconds: ROUND_TIMEOUT.as_secs() }),
                    }
                }
            },
            error_policy,
            ctx,
        )
        .for_each(|_| futures::future::ready(()));
    let controller = tokio::spawn(reconciles);
    tracing::info!(namespace = scope.unwrap_or("(all)"), image = %options.agent_image, pod_monitors = options.pod_monitors, "operator started");

    let outcome = match &mut elector {
        Some(elector) => elector.hold(&shutdown).await,
        None => {
            shutdown.cancelled().await;
            Ok(())
        }
    };
    if outcome.is_err() {
        controller.abort();
        shutdown.cancel();
    }
    // Rounds in flight finish (a status write, an apply); one stuck on an unanswered request does
    // not hold the exit past the pod's grace period. Before the caches have listed no round has
    // written anything, and kube-runtime's graceful shutdown would wait for its own cache, which
    // it no longer feeds: stop at once then.
    let abort = controller.abort_handle();
    let grace = if *ready_watch.borrow() { SHUTDOWN_GRACE } else { Duration::ZERO };
    if tokio::time::timeout(grace, controller).await.is_err() {
        tracing::info!(seconds = grace.as_secs(), "rounds still running at shutdown; stopping them");
        abort.abort();
    }
    waiter.abort();
    discovery.abort();
    metrics.leader.set(0);
    if let (Ok(()), Some(elector)) = (&outcome, &mut elector) {
        elector.release().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
    outcome.map_err(StartError::from)
}

/// What of a MinecraftServer a round depends on, hashed: the spec (by its generation), and the
/// agent's player count and Ready condition (the upgrade gate). Any other status write, the
/// agent's or the operator's own, starts no round.
fn round_trigger(server: &MinecraftServer) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let status = server.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == crate::api::conditions::READY))
        .map(|c| (c.status.clone(), c.observed_generation));
    let players = status.and_then(|s| s.players).map(|p| p.online);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&server.metadata.uid, server.metadata.generation, server.metadata.deletion_timestamp.is_some(), players, ready)
        .hash(&mut hasher);
    Some(hasher.finish())
}

async fn wait_ready(caches: &Caches) {
    let _ = caches.stateful_sets.wait_until_ready().await;
    let _ = caches.services.wait_until_ready().await;
    let _ = caches.service_accounts.wait_until_ready().await;
    let _ = caches.roles.wait_until_ready().await;
    let _ = caches.role_bindings.wait_until_ready().await;
    let _ = caches.pods.wait_until_ready().await;
    // Not the PodMonitors': their cache starts only once their CRD is served, and rounds make
    // none until it has listed.
}

/// Whether the Prometheus Operator's PodMonitor CRD is served. Says so (once: `told`) when not.
async fn pod_monitor_crd_exists(client: &Client, told: &mut bool) -> bool {
    let gvk = kube::core::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor");
    match kube::discovery::pinned_kind(client, &gvk).await {
        Ok(_) => true,
        Err(e) => {
            if !*told {
                tracing::warn!(error = %e, "PodMonitors were asked for but the Prometheus Operator's PodMonitor CRD is not served; making none until it is (looked for at every resync)");
                *told = true;
            }
            false
        }
    }
}

/// Deletes the PodMonitors the operator made (labelled as its children, owned by a server): they
/// were turned off.
async fn remove_pod_monitors(api: &Api<DynamicObject>) {
    let listed = match api.list(&ListParams::default().labels(CHILD_SELECTOR)).await {
        Ok(list) => list.items,
        Err(e) => {
            tracing::warn!(error = %e, "PodMonitors are turned off, but listing the ones made before failed; delete them with `kubectl delete podmonitors -l app.kubernetes.io/managed-by=atlas-runner`");
            return;
        }
    };
    for monitor in listed {
        let owned = monitor.metadata.owner_references.iter().flatten().any(|o| {
            o.kind == "MinecraftServer" && o.api_version.starts_with("atlas.dev/") && o.controller == Some(true)
        });
        let (Some(namespace), Some(name)) = (monitor.metadata.namespace.clone(), monitor.metadata.name.clone()) else {
            continue;
        };
        if !owned {
            continue;
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(api.clone().into_client(), &namespace, &children::pod_monitor_resource());
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(%namespace, %name, "PodMonitors are turned off; deleted the one made before"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => tracing::warn!(%namespace, %name, error = %e, "deleting a PodMonitor made before failed"),
        }
    }
}

#[derive(Clone)]
struct AdminState {
    registry: prometheus::Registry,
    metrics: OperatorMetrics,
    servers: Store<MinecraftServer>,
}

fn admin_router(
    registry: prometheus::Registry,
    metrics: OperatorMetrics,
    servers: Store<MinecraftServer>,
) -> axum::Router {
    use axum::extract::State;
    use axum::http::header;
    use axum::response::IntoResponse;
    use axum::routing::get;
    async fn render(State(state): State<AdminState>) -> axum::response::Response {
        let servers = state.servers.state();
        state.metrics.count_servers(servers.iter().map(|s| &**s));
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::render(&state.registry))
            .into_response()
    }
    axum::Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .with_state(AdminState { registry, metrics, servers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: serde_json::Value) -> Result<MinecraftServer, serde_json::Error> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer",
            "metadata": {"name": "s", "namespace": "n", "uid": "u1", "generation": 3, "resourceVersion": "10"},
            "spec": {"eula": true, "server": {"type": "vanilla"}},
            "status": status,
        }))
    }

    #[test]
    fn only_what_a_round_reads_from_the_status_starts_one() -> Result<(), serde_json::Error> {
        let ready = |online: u32, phase: &str| {
            serde_json::json!({"phase": phase, "players": {"online": online, "max": 20},
                "lastBackup": {"name": format!("b-{phase}"), "time": "2026-12-06T00:00:00Z", "sizeBytes": 1},
                "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": "",
                                "lastTransitionTime": "2026-12-06T00:00:00Z", "observedGeneration": 3}]})
        };
        let before = round_trigger(&server(ready(0, "Running"))?);
        // The agent's other fields (a backup, a phase with the same Ready), a new resourceVersion:
        // no round.
        let mut other = server(ready(0, "Updating"))?;
        other.metadata.resource_version = Some("11".into());
        assert_eq!(round_trigger(&other), before);
        // Players, the agent's Ready, the generation: a round.
        assert_ne!(round_trigger(&server(ready(1, "Running"))?), before);
        let mut newer = server(ready(0, "Running"))?;
        newer.metadata.generation = Some(4);
        assert_ne!(round_trigger(&newer), before);
        let not_ready = serde_json::json!({"players": {"online": 0, "max": 20},
            "conditions": [{"type": "Ready", "status": "False", "reason": "NotRunning", "message": "",
                            "lastTransitionTime": "2026-12-06T00:00:00Z", "observedGeneration": 3}]});
        assert_ne!(round_trigger(&server(not_ready)?), before);
        Ok(())
    }

    #[test]
    fn a_permanent_failure_is_reported_once_until_it_changes() {
        let mut reported = HashMap::new();
        assert!(first_report(&mut reported, "a", "forbidden"));
        assert!(!first_report(&mut reported, "a", "forbidden"), "the same failure again");
        assert!(first_report(&mut reported, "b", "forbidden"), "another server");
        assert!(first_report(&mut reported, "a", "invalid"), "another failure");
        // A round that succeeds forgets it: failing again is news.
        reported.remove("a");
        assert!(first_report(&mut reported, "a", "invalid"));
    }

    #[test]
    fn an_event_note_is_one_line_the_api_server_takes() {
        assert_eq!(event_note("a\n  b"), "a b");
        let long = "é".repeat(2000);
        let note = event_note(&long);
        assert!(note.len() <= 1024 && note.ends_with("..."), "{}", note.len());
    }
}
