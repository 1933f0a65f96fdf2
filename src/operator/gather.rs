//! The dereference step of a reconcile: the children as the watch caches hold them, and whether
//! every Secret the spec references exists with the keys the agent reads (Secrets are read, never
//! watched: the operator's role grants `get` on Secrets, not `list`/`watch`).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};

use super::children::{Identity, SecretUse};

/// Whether a referenced Secret can be mounted as the agent expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretState {
    /// It exists with every key.
    Present,
    /// It does not exist.
    Missing,
    /// It exists without these keys.
    MissingKeys(Vec<String>),
}

/// A referenced Secret and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretCheck {
    /// The reference.
    pub usage: SecretUse,
    /// What the API server holds.
    pub state: SecretState,
}

/// Reads each referenced Secret and checks its keys.
pub async fn check_secrets(api: &Api<Secret>, uses: Vec<SecretUse>) -> Result<Vec<SecretCheck>, kube::Error> {
    let mut checks = Vec::with_capacity(uses.len());
    for usage in uses {
        let state = match api.get_opt(&usage.name).await? {
            None => SecretState::Missing,
            Some(secret) => {
                let data = secret.data.unwrap_or_default();
                let missing: Vec<String> = usage.keys.iter().filter(|k| !data.contains_key(*k)).cloned().collect();
                if missing.is_empty() { SecretState::Present } else { SecretState::MissingKeys(missing) }
            }
        };
        checks.push(SecretCheck { usage, state });
    }
    Ok(checks)
}

/// The watch caches of the children (labelled as the operator labels them).
#[derive(Debug, Clone)]
pub struct Caches {
    /// StatefulSets.
    pub stateful_sets: Store<StatefulSet>,
    /// Services (game and headless).
    pub services: Store<Service>,
    /// The agents' ServiceAccounts.
    pub service_accounts: Store<ServiceAccount>,
    /// The agents' Roles.
    pub roles: Store<Role>,
    /// The agents' RoleBindings.
    pub role_bindings: Store<RoleBinding>,
    /// Server pods, metadata only (the revision label and deletion are all the operator reads).
    pub pods: Store<PartialObjectMeta<Pod>>,
    /// PodMonitors, when the operator makes them.
    pub pod_monitors: Option<Store<DynamicObject>>,
}

/// The children of one server as the caches hold them.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The StatefulSet.
    pub stateful_set: Option<Arc<StatefulSet>>,
    /// The game Service.
    pub game_service: Option<Arc<Service>>,
    /// The headless Service.
    pub headless_service: Option<Arc<Service>>,
    /// The agent's ServiceAccount.
    pub service_account: Option<Arc<ServiceAccount>>,
    /// The agent's Role.
    pub role: Option<Arc<Role>>,
    /// The agent's RoleBinding.
    pub role_binding: Option<Arc<RoleBinding>>,
    /// The pod.
    pub pod: Option<Arc<PartialObjectMeta<Pod>>>,
    /// The PodMonitor.
    pub pod_monitor: Option<Arc<DynamicObject>>,
}

impl Caches {
    /// Looks up every child of the server `id`.
    pub fn observe(&self, id: &Identity) -> Observed {
        fn key<K: kube::Resource<DynamicType = ()>>(name: &str, ns: &str) -> ObjectRef<K> {
            ObjectRef::new(name).within(ns)
        }
        let ns = id.namespace.as_str();
        Observed {
            stateful_set: self.stateful_sets.get(&key(&id.name, ns)),
            game_service: self.services.get(&key(&id.name, ns)),
            headless_service: self.services.get(&key(&id.headless(), ns)),
            service_account: self.service_accounts.get(&key(&id.agent(), ns)),
            role: self.roles.get(&key(&id.agent(), ns)),
            role_binding: self.role_bindings.get(&key(&id.agent(), ns)),
            pod: self.pods.get(&key(&id.pod(), ns)),
            pod_monitor: self.pod_monitors.as_ref().and_then(|store| {
                store.get(&ObjectRef::new_with(&id.name, super::children::pod_monitor_resource()).within(ns))
            }),
        }
    }
}
