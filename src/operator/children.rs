//! The children of a `MinecraftServer` as pure functions of its spec and the operator's settings:
//! the StatefulSet and its pod, the two Services, the agent's ServiceAccount, Role and RoleBinding,
//! the generated RCON Secret and an optional PodMonitor. No client, no clock, no randomness: what
//! docs/design/pod-contract.md promises the agent is decided here, and snapshot-tested.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceFieldSelector, SeccompProfile, Secret, SecretVolumeSource, SecurityContext,
    Service, ServiceAccount, ServicePort, ServiceSpec as CoreServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};

use crate::api::{GROUP, MinecraftServer, MinecraftServerSpec, ServiceType};

/// The data directory inside the pod (the volume's mount point and the image's WORKDIR).
pub const DATA_DIR: &str = "/data";
/// Where every referenced Secret is mounted, one directory per Secret.
pub const SECRETS_DIR: &str = "/var/run/atlas/secrets";
/// The game port inside the pod.
pub const GAME_PORT: i32 = 25565;
/// The agent's admin port: `/metrics`, `/healthz`, `/readyz`.
pub const METRICS_PORT: i32 = 9100;
/// The uid and gid the server runs as (the image's user).
pub const USER_ID: i64 = 10001;
/// The server container's name.
pub const CONTAINER: &str = "server";
/// The volume claim template's name; the pod's claim is `data-NAME-0`.
pub const CLAIM_TEMPLATE: &str = "data";
/// Three stop timeouts of 30 s (RCON `stop`, stdin `stop`, SIGTERM) and the final save, plus 30 s.
pub const TERMINATION_GRACE_SECONDS: i64 = 120;
/// The storage size when the spec names none (the spec's own default).
const DEFAULT_STORAGE: &str = "10Gi";
/// The password key of the generated RCON Secret.
pub const RCON_PASSWORD_KEY: &str = "password";
/// The Secret volumes' mode: readable by the owner and the pod's fsGroup (10001), nobody else.
const SECRET_MODE: i32 = 0o440;

/// What the operator itself was configured with (the chart's values), as opposed to the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The image the server pod runs (`ATLAS_AGENT_IMAGE`; the operator's own image by default).
    pub image: String,
    /// The pod's `imagePullPolicy`; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Build a PodMonitor for every server (the chart enabled it and the CRD exists).
    pub pod_monitors: bool,
    /// The operator's `TZ` (the chart's `timeZone`), passed to the pods: the agent reads
    /// `spec.pack.update.window` in the same zone the operator reads `spec.upgrade.window` in.
    pub time_zone: Option<String>,
}

/// Why children could not be built: the object did not come from the API server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A name, namespace or uid is missing.
    #[error("the MinecraftServer has no metadata.{0}: only objects read from the API server can own children")]
    MissingMetadata(&'static str),
}

/// The name and namespace of a server, and the owner reference its children carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// A controller owner reference to the server (garbage collection deletes children with it).
    pub owner: OwnerReference,
}

impl Identity {
    /// Reads the identity of an object the API server returned.
    pub fn of(server: &MinecraftServer) -> Result<Self, BuildError> {
        let name = server.metadata.name.clone().ok_or(BuildError::MissingMetadata("name"))?;
        let namespace = server.metadata.namespace.clone().ok_or(BuildError::MissingMetadata("namespace"))?;
        let owner = server.controller_owner_ref(&()).ok_or(BuildError::MissingMetadata("uid"))?;
        Ok(Self { name, namespace, owner })
    }

    /// The ServiceAccount, Role and RoleBinding of the agent.
    pub fn agent(&self) -> String {
        format!("{}-agent", self.name)
    }

    /// The headless Service the StatefulSet is governed by.
    pub fn headless(&self) -> String {
        format!("{}-headless", self.name)
    }

    /// The pod (one replica).
    pub fn pod(&self) -> String {
        format!("{}-0", self.name)
    }

    /// The pod's volume claim.
    pub fn claim(&self) -> String {
        format!("{CLAIM_TEMPLATE}-{}-0", self.name)
    }

    /// The generated RCON Secret (used when the spec references none).
    pub fn rcon_secret(&self) -> String {
        format!("{}-rcon", self.name)
    }

    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.name)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// The labels of every child and of the pod.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    let mut labels = selector(name);
    labels.insert("app.kubernetes.io/managed-by".to_owned(), "atlas-runner".to_owned());
    labels.insert("app.kubernetes.io/component".to_owned(), "server".to_owned());
    labels
}

/// The label selector of a server's pod: the `name` + `instance` pair.
pub fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "minecraft-server".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
    ])
}

/// The label selector that finds every child the operator made (its watches use it).
pub const CHILD_SELECTOR: &str = "app.kubernetes.io/managed-by=atlas-runner,app.kubernetes.io/component=server";

/// A Secret the pod mounts, and which of its keys the spec needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretUse {
    /// The Secret's name.
    pub name: String,
    /// The keys the agent reads.
    pub keys: BTreeSet<String>,
    /// The spec fields that reference it (for messages); `generated` for the operator's own.
    pub fields: Vec<&'static str>,
    /// The operator creates it (the RCON password when the spec names no Secret).
    pub generated: bool,
}

/// Every Secret the pod mounts, by name, with the keys each must hold.
pub fn secret_uses(name: &str, spec: &MinecraftServerSpec) -> Vec<SecretUse> {
    let mut uses: BTreeMap<String, SecretUse> = BTreeMap::new();
    let mut add = |secret: &str, keys: &[&str], field: &'static str, generated: bool| {
        let entry = uses.entry(secret.to_owned()).or_insert_with(|| SecretUse {
            name: secret.to_owned(),
            keys: BTreeSet::new(),
            fields: Vec::new(),
            generated,
        });
        entry.keys.extend(keys.iter().map(|k| (*k).to_owned()));
        entry.fields.push(field);
    };
    match spec.rcon.as_ref().and_then(|r| r.password_secret_ref.as_ref()) {
        Some(r) => add(&r.name, &[&r.key], "spec.rcon.passwordSecretRef", false),
        None => add(&format!("{name}-rcon"), &[RCON_PASSWORD_KEY], "generated", true),
    }
    if let Some(r) = spec.pack.as_ref().and_then(|p| p.source.hub.as_ref()).and_then(|h| h.token_secret_ref.as_ref()) {
        add(&r.name, &[&r.key], "spec.pack.source.hub.tokenSecretRef", false);
    }
    let s3 = spec.backup.as_ref().and_then(|b| b.store.as_ref()).and_then(|s| s.s3.as_ref());
    if let Some(r) = s3.and_then(|s| s.credentials_secret_ref.as_ref()) {
        add(
            &r.name,
            &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
            "spec.backup.store.s3.credentialsSecretRef",
            false,
        );
    }
    uses.into_values().collect()
}

/// The file the agent reads the RCON password from.
pub fn rcon_password_file(name: &str, spec: &MinecraftServerSpec) -> String {
    match spec.rcon.as_ref().and_then(|r| r.password_secret_ref.as_ref()) {
        Some(r) => format!("{SECRETS_DIR}/{}/{}", r.name, r.key),
        None => format!("{SECRETS_DIR}/{name}-rcon/{RCON_PASSWORD_KEY}"),
    }
}

/// A Secret's volume name: the Secret's name when it is a DNS label short enough, else a digest of
/// it (Secret names may hold dots and run to 253 characters; volume names may not).
fn secret_volume(secret: &str) -> String {
    let label_like =
        secret.len() <= 56 && secret.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if label_like {
        format!("secret-{secret}")
    } else {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(secret.as_bytes());
        format!("secret-{}", &hex::encode(digest)[..16])
    }
}

/// What the StatefulSet already holds that a StatefulSet cannot change: Kubernetes refuses updates
/// to `volumeClaimTemplates`, so a grown `spec.storage.size` goes to the claim itself instead.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Existing {
    /// The volume claim templates of the StatefulSet as it exists.
    pub claim_templates: Option<Vec<PersistentVolumeClaim>>,
}

/// The StatefulSet: one replica (none when paused), `OnDelete` updates, the claim kept unless the
/// spec opts in to deleting it with the server.
pub fn stateful_set(
    id: &Identity,
    spec: &MinecraftServerSpec,
    settings: &Settings,
    existing: &Existing,
) -> StatefulSet {
    let delete_with_server = spec.storage.as_ref().is_some_and(|s| s.delete_with_server);
    let claim_templates = existing.claim_templates.clone().unwrap_or_else(|| vec![claim_template(id, spec)]);
    StatefulSet {
        metadata: id.meta(id.name.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(if spec.paused { 0 } else { 1 }),
            selector: LabelSelector { match_labels: Some(selector(&id.name)), ..LabelSelector::default() },
            service_name: Some(id.headless()),
            // The operator decides when the pod is replaced (spec.upgrade), never the StatefulSet.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_owned()),
                rolling_update: None,
            }),
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some(if delete_with_server { "Delete" } else { "Retain" }.to_owned()),
                when_scaled: Some("Retain".to_owned()),
            }),
            volume_claim_templates: Some(claim_templates),
            template: pod_template(id, spec, settings),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// The storage size the spec asks for.
pub fn storage_size(spec: &MinecraftServerSpec) -> String {
    spec.storage.as_ref().map_or_else(|| DEFAULT_STORAGE.to_owned(), |s| s.size.clone())
}

fn claim_template(id: &Identity, spec: &MinecraftServerSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(CLAIM_TEMPLATE.to_owned()),
            labels: Some(labels(&id.name)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(storage_size(spec)))])),
                limits: None,
            }),
            storage_class_name: spec.storage.as_ref().and_then(|s| s.storage_class_name.clone()),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.into()), value_from: None }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.to_owned(), api_version: None }),
            ..EnvVarSource::default()
        }),
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

/// The server pod, as docs/design/pod-contract.md describes it.
pub fn pod_template(id: &Identity, spec: &MinecraftServerSpec, settings: &Settings) -> PodTemplateSpec {
    let secrets = secret_uses(&id.name, spec);
    let mut volumes =
        vec![Volume { name: "tmp".to_owned(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() }];
    let mut mounts = vec![
        VolumeMount { name: CLAIM_TEMPLATE.to_owned(), mount_path: DATA_DIR.to_owned(), ..VolumeMount::default() },
        VolumeMount { name: "tmp".to_owned(), mount_path: "/tmp".to_owned(), ..VolumeMount::default() },
    ];
    for secret in &secrets {
        let volume = secret_volume(&secret.name);
        volumes.push(Volume {
            name: volume.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                default_mode: Some(SECRET_MODE),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: volume,
            mount_path: format!("{SECRETS_DIR}/{}", secret.name),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let mut env = vec![
        env("ATLAS_SERVER_NAME", id.name.clone()),
        env_field("ATLAS_NAMESPACE", "metadata.namespace"),
        env_field("ATLAS_POD_NAME", "metadata.name"),
        env("ATLAS_DATA_DIR", DATA_DIR),
        env("ATLAS_METRICS_ADDR", format!("0.0.0.0:{METRICS_PORT}")),
        env("ATLAS_SECRETS_DIR", SECRETS_DIR),
        env("ATLAS_RCON_PASSWORD_FILE", rcon_password_file(&id.name, spec)),
        EnvVar {
            name: "ATLAS_MEMORY_LIMIT_BYTES".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                resource_field_ref: Some(ResourceFieldSelector {
                    container_name: Some(CONTAINER.to_owned()),
                    resource: "limits.memory".to_owned(),
                    divisor: None,
                }),
                ..EnvVarSource::default()
            }),
        },
    ];
    if let Some(zone) = &settings.time_zone {
        env.push(EnvVar { name: "TZ".to_owned(), value: Some(zone.clone()), value_from: None });
    }
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(vec!["agent".to_owned()]),
        env: Some(env),
        ports: Some(vec![port("minecraft", GAME_PORT), port("metrics", METRICS_PORT)]),
        resources: Some(resources(spec)),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), add: None }),
            ..SecurityContext::default()
        }),
        // A first start may install a large pack: 90 x 10 s = 15 minutes before liveness counts.
        startup_probe: Some(probe("/healthz", 10, 90)),
        readiness_probe: Some(probe("/readyz", 10, 3)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        ..Container::default()
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels(&id.name)), ..ObjectMeta::default() }),
        spec: Some(PodSpec {
            service_account_name: Some(id.agent()),
            automount_service_account_token: Some(true),
            // Service links would put every Service of the namespace into the environment.
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(USER_ID),
                run_as_group: Some(USER_ID),
                fs_group: Some(USER_ID),
                // A world holds many files: relabel them only when the volume's root is not ours yet.
                fs_group_change_policy: Some("OnRootMismatch".to_owned()),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), localhost_profile: None }),
                ..PodSecurityContext::default()
            }),
            containers: vec![container],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    }
}

fn service_port(name: &str, number: i32, node_port: Option<i32>) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: number,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        node_port,
        ..ServicePort::default()
    }
}

/// The game Service: type, port, node port and annotations from `spec.service`.
pub fn game_service(id: &Identity, spec: &MinecraftServerSpec) -> Service {
    let (kind, port, node_port, annotations) = match &spec.service {
        Some(s) => (s.kind, i32::from(s.port), s.node_port.map(i32::from), s.annotations.clone()),
        None => (ServiceType::ClusterIP, GAME_PORT, None, BTreeMap::new()),
    };
    let kind = match kind {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    let mut metadata = id.meta(id.name.clone());
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations);
    }
    Service {
        metadata,
        spec: Some(CoreServiceSpec {
            type_: Some(kind.to_owned()),
            selector: Some(selector(&id.name)),
            ports: Some(vec![service_port("minecraft", port, node_port)]),
            ..CoreServiceSpec::default()
        }),
        status: None,
    }
}

/// The headless Service that governs the StatefulSet; it lists the pod even while not ready, so
/// metrics are scraped while the server starts.
pub fn headless_service(id: &Identity) -> Service {
    Service {
        metadata: id.meta(id.headless()),
        spec: Some(CoreServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(&id.name)),
            ports: Some(vec![service_port("minecraft", GAME_PORT, None), service_port("metrics", METRICS_PORT, None)]),
            ..CoreServiceSpec::default()
        }),
        status: None,
    }
}

/// The agent's ServiceAccount.
pub fn service_account(id: &Identity) -> ServiceAccount {
    ServiceAccount { metadata: id.meta(id.agent()), ..ServiceAccount::default() }
}

fn rule(group: &str, resource: &str, names: Option<&str>, verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        resource_names: names.map(|n| vec![n.to_owned()]),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        non_resource_urls: None,
    }
}

/// The agent's Role: its own resource and status by name, and Events. No Secrets, no pods.
pub fn role(id: &Identity) -> Role {
    Role {
        metadata: id.meta(id.agent()),
        rules: Some(vec![
            rule(GROUP, "minecraftservers", Some(&id.name), &["get", "list", "watch"]),
            rule(GROUP, "minecraftservers/status", Some(&id.name), &["patch"]),
            rule("events.k8s.io", "events", None, &["create", "patch"]),
        ]),
    }
}

/// Binds the agent's Role to its ServiceAccount.
pub fn role_binding(id: &Identity) -> RoleBinding {
    RoleBinding {
        metadata: id.meta(id.agent()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: id.agent(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: id.agent(),
            namespace: Some(id.namespace.clone()),
            api_group: None,
        }]),
    }
}

/// The generated RCON Secret, holding `password`. Created once; the operator never writes it again.
pub fn rcon_secret(id: &Identity, password: &str) -> Secret {
    Secret {
        metadata: id.meta(id.rcon_secret()),
        string_data: Some(BTreeMap::from([(RCON_PASSWORD_KEY.to_owned(), password.to_owned())])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// The Prometheus Operator's PodMonitor kind.
pub fn pod_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor"),
        "podmonitors",
    )
}

/// A PodMonitor scraping the pod's `metrics` port, with the server's name as the `server` label.
pub fn pod_monitor(id: &Identity) -> DynamicObject {
    let mut object = DynamicObject::new(&id.name, &pod_monitor_resource()).within(&id.namespace);
    object.metadata = id.meta(id.name.clone());
    object.data = serde_json::json!({
        "spec": {
            "selector": {"matchLabels": selector(&id.name)},
            // The dashboard and the alerts select servers by `namespace` and `server`.
            "podMetricsEndpoints": [{
                "port": "metrics",
                "path": "/metrics",
                "relabelings": [{
                    "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                    "targetLabel": "server",
                }],
            }],
        }
    });
    object
}

/// Every child the operator applies for a server (the RCON Secret is created apart, once).
#[derive(Debug, Clone)]
pub struct Children {
    /// The agent's ServiceAccount.
    pub service_account: ServiceAccount,
    /// The agent's Role.
    pub role: Role,
    /// The agent's RoleBinding.
    pub role_binding: RoleBinding,
    /// The headless Service.
    pub headless_service: Service,
    /// The game Service.
    pub game_service: Service,
    /// The StatefulSet.
    pub stateful_set: StatefulSet,
    /// The PodMonitor, when enabled.
    pub pod_monitor: Option<DynamicObject>,
}

/// Builds every child of `server`.
pub fn build(server: &MinecraftServer, settings: &Settings, existing: &Existing) -> Result<Children, BuildError> {
    let id = Identity::of(server)?;
    let spec = &server.spec;
    Ok(Children {
        service_account: service_account(&id),
        role: role(&id),
        role_binding: role_binding(&id),
        headless_service: headless_service(&id),
        game_service: game_service(&id, spec),
        stateful_set: stateful_set(&id, spec, settings, existing),
        pod_monitor: settings.pod_monitors.then(|| pod_monitor(&id)),
    })
}

/// The memory limit of a server whose spec sets none, when its heap is not fixed either.
const DEFAULT_MEMORY_LIMIT: &str = "3Gi";
/// The memory request that goes with it.
const DEFAULT_MEMORY_REQUEST: &str = "2Gi";

/// The container's resources: the spec's, with a memory limit when it sets none. Without one the
/// downward API gives the node's allocatable memory as `limits.memory`, and the agent would size
/// a default heap (70%, committed at start) from the whole node for a pod the scheduler counted
/// as using nothing. A request alone becomes the limit too; a fixed `jvm.heap` gets room for it.
pub fn resources(spec: &MinecraftServerSpec) -> k8s_openapi::api::core::v1::ResourceRequirements {
    let mut resources = spec.resources.clone().unwrap_or_default();
    let limits = resources.limits.get_or_insert_with(Default::default);
    if limits.contains_key("memory") {
        return resources;
    }
    let requested = resources.requests.as_ref().and_then(|r| r.get("memory")).cloned();
    let heap = spec.jvm.as_ref().and_then(|j| j.heap.as_deref()).and_then(crate::server::jvm::parse_size);
    let limit = match (&requested, heap) {
        (Some(request), _) => request.clone(),
        (None, Some(heap)) => {
            // The smallest limit whose headroom (the agent's rule) leaves `heap` for the heap.
            let mib = 1024 * 1024;
            let needed = (heap + 256 * mib).max(heap.saturating_mul(100) / 85 + mib);
            let needed = needed.div_ceil(mib).max(3 * 1024);
            Quantity(format!("{needed}Mi"))
        }
        (None, None) => Quantity(DEFAULT_MEMORY_LIMIT.to_owned()),
    };
    limits.insert("memory".to_owned(), limit);
    if requested.is_none() {
        resources
            .requests
            .get_or_insert_with(Default::default)
            .insert("memory".to_owned(), Quantity(DEFAULT_MEMORY_REQUEST.to_owned()));
    }
    resources
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A server as the API server returns it: name, namespace and uid set.
    pub(crate) fn server(name: &str, spec_yaml: &str) -> MinecraftServer {
        let spec: MinecraftServerSpec = serde_yaml::from_str(spec_yaml).unwrap_or_else(|e| panic!("spec: {e}"));
        let mut server = MinecraftServer::new(name, spec);
        server.metadata.namespace = Some("games".to_owned());
        server.metadata.uid = Some("0d6f3a52-8d4e-4d0b-9a59-3c1b7c1e2f10".to_owned());
        server
    }

    fn settings() -> Settings {
        Settings {
            image: "atlas-runner:0.1.0".to_owned(),
            image_pull_policy: None,
            pod_monitors: false,
            time_zone: None,
        }
    }

    const MINIMAL: &str = "eula: true\nserver: {type: vanilla}\n";

    const FULL: &str = r#"
eula: true
server: {type: paper, version: "1.21.4"}
pack:
  source:
    hub: {url: "https://hub.example", pack: survival, channel: stable, tokenSecretRef: {name: pack-hub, key: token}}
  update: {mode: auto, window: "Sat 02:00-06:00", requireNoPlayers: true}
jvm: {heapPercent: 70}
rcon: {port: 25575, passwordSecretRef: {name: admin.secrets, key: rcon}}
backup:
  schedule: "0 */6 * * *"
  store: {s3: {bucket: backups, prefix: survival/, endpoint: "http://s3.example", credentialsSecretRef: {name: backup-s3}}}
paused: false
resources:
  requests: {cpu: "2", memory: 6Gi}
  limits: {memory: 6Gi}
storage: {size: 20Gi, storageClassName: fast, deleteWithServer: true}
service: {type: NodePort, port: 25565, nodePort: 30565, annotations: {example.com/lb: "yes"}}
upgrade: {window: "Sun 04:00-05:00", requireNoPlayers: true}
"#;

    fn json(value: &impl serde::Serialize) -> serde_json::Value {
        serde_json::to_value(value).unwrap_or_else(|e| panic!("serialize: {e}"))
    }

    /// The children in the order the operator applies them, as one document per snapshot.
    fn documents(children: &Children) -> BTreeMap<&'static str, serde_json::Value> {
        let mut out = BTreeMap::from([
            ("1-serviceaccount", json(&children.service_account)),
            ("2-role", json(&children.role)),
            ("3-rolebinding", json(&children.role_binding)),
            ("4-service-headless", json(&children.headless_service)),
            ("5-service-game", json(&children.game_service)),
            ("6-statefulset", json(&children.stateful_set)),
        ]);
        if let Some(monitor) = &children.pod_monitor {
            out.insert("7-podmonitor", json(monitor));
        }
        out
    }

    #[test]
    fn a_minimal_spec_builds_the_contracts_children() -> Result<(), BuildError> {
        let children = build(&server("survival", MINIMAL), &settings(), &Existing::default())?;
        insta::assert_yaml_snapshot!("minimal", documents(&children));
        Ok(())
    }

    #[test]
    fn a_full_spec_builds_every_child_with_its_options() -> Result<(), BuildError> {
        let settings = Settings {
            image_pull_policy: Some("IfNotPresent".to_owned()),
            pod_monitors: true,
            time_zone: Some("Europe/Berlin".to_owned()),
            ..settings()
        };
        let children = build(&server("survival", FULL), &settings, &Existing::default())?;
        insta::assert_yaml_snapshot!("full", documents(&children));
        Ok(())
    }

    #[test]
    fn the_rcon_secret_holds_the_password_given() {
        let id = Identity::of(&server("survival", MINIMAL)).unwrap_or_else(|e| panic!("{e}"));
        let secret = rcon_secret(&id, "s3cr3t");
        assert_eq!(secret.metadata.name.as_deref(), Some("survival-rcon"));
        assert_eq!(secret.string_data.and_then(|d| d.get("password").cloned()).as_deref(), Some("s3cr3t"));
        assert_eq!(secret.metadata.owner_references.map(|o| o[0].name.clone()).as_deref(), Some("survival"));
    }

    #[test]
    fn paused_scales_to_zero_and_keeps_the_claim() -> Result<(), BuildError> {
        let sts = build(
            &server("archive", "eula: true\nserver: {type: vanilla}\npaused: true\n"),
            &settings(),
            &Existing::default(),
        )?
        .stateful_set;
        let spec = sts.spec.unwrap_or_default();
        assert_eq!(spec.replicas, Some(0));
        let policy = spec.persistent_volume_claim_retention_policy.unwrap_or_default();
        assert_eq!((policy.when_deleted.as_deref(), policy.when_scaled.as_deref()), (Some("Retain"), Some("Retain")));
        assert_eq!(spec.volume_claim_templates.map(|v| v.len()), Some(1));
        Ok(())
    }

    #[test]
    fn an_existing_claim_template_is_kept_when_the_size_grows() -> Result<(), BuildError> {
        let small = build(
            &server("s", "eula: true\nserver: {type: vanilla}\nstorage: {size: 5Gi}\n"),
            &settings(),
            &Existing::default(),
        )?;
        let templates = small.stateful_set.spec.and_then(|s| s.volume_claim_templates);
        let existing = Existing { claim_templates: templates.clone() };
        let grown = build(
            &server("s", "eula: true\nserver: {type: vanilla}\nstorage: {size: 50Gi}\n"),
            &settings(),
            &existing,
        )?;
        assert_eq!(grown.stateful_set.spec.and_then(|s| s.volume_claim_templates), templates);
        Ok(())
    }

    #[test]
    fn secrets_are_mounted_once_each_with_the_keys_they_must_hold() {
        let spec: MinecraftServerSpec = serde_yaml::from_str(
            "eula: true\nserver: {type: vanilla}\nrcon: {passwordSecretRef: {name: shared, key: rcon}}\n\
             pack: {source: {hub: {url: 'https://h', pack: p, tokenSecretRef: {name: shared, key: hub}}}}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let uses = secret_uses("s", &spec);
        assert_eq!(uses.len(), 1, "one Secret referenced twice is one volume: {uses:?}");
        assert_eq!(uses[0].keys, BTreeSet::from(["hub".to_owned(), "rcon".to_owned()]));
        assert_eq!(rcon_password_file("s", &spec), "/var/run/atlas/secrets/shared/rcon");
        let generated = secret_uses("s", &serde_yaml::from_str(MINIMAL).unwrap_or_else(|e| panic!("{e}")));
        assert!(generated[0].generated && generated[0].name == "s-rcon");
    }

    #[test]
    fn volume_names_stay_valid_for_any_secret_name() {
        assert_eq!(secret_volume("backup-s3"), "secret-backup-s3");
        let dotted = secret_volume("admin.secrets");
        assert!(dotted.starts_with("secret-") && dotted.len() == 23 && !dotted.contains('.'), "{dotted}");
        assert_ne!(dotted, secret_volume("admin.secret"));
        assert!(secret_volume(&"a".repeat(253)).len() <= 63);
    }

    #[test]
    fn an_object_without_a_uid_cannot_own_children() {
        let mut s = server("x", MINIMAL);
        s.metadata.uid = None;
        assert_eq!(build(&s, &settings(), &Existing::default()).err(), Some(BuildError::MissingMetadata("uid")));
    }

    #[test]
    fn a_spec_without_a_memory_limit_gets_one_the_heap_fits_in() -> Result<(), Box<dyn std::error::Error>> {
        let memory = |yaml: &str| -> Result<(Option<String>, Option<String>), Box<dyn std::error::Error>> {
            let spec: MinecraftServerSpec =
                serde_yaml::from_str(&format!("eula: true\nserver: {{type: vanilla}}\n{yaml}"))?;
            let r = resources(&spec);
            let get = |m: Option<&BTreeMap<String, Quantity>>| m.and_then(|m| m.get("memory")).map(|q| q.0.clone());
            Ok((get(r.requests.as_ref()), get(r.limits.as_ref())))
        };
        // Nothing set: a request the scheduler counts, and a limit the default heap is a share of.
        assert_eq!(memory("")?, (Some("2Gi".into()), Some("3Gi".into())));
        // A request alone is the limit too.
        assert_eq!(memory("resources: {requests: {memory: 6Gi}}")?, (Some("6Gi".into()), Some("6Gi".into())));
        // A fixed heap gets room for itself and the JVM's other memory.
        let (_, limit) = memory("jvm: {heap: 8G}")?;
        let limit = limit.ok_or("no limit")?;
        let mib: u64 = limit.trim_end_matches("Mi").parse()?;
        let heap = 8 * 1024 * 1024 * 1024;
        let bytes = mib * 1024 * 1024;
        assert!(bytes - crate::server::jvm::headroom(bytes) >= heap, "{limit} leaves less than 8G of heap");
        // A limit the admin set is theirs.
        assert_eq!(memory("resources: {limits: {memory: 1Gi}}")?, (None, Some("1Gi".into())));
        Ok(())
    }
}
