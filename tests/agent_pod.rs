//! The in-pod agent end to end, in a pod of the test bed's cluster: our image (built from the
//! Dockerfile), a plain StatefulSet as docs/design/pod-contract.md describes the operator's (the
//! agent as the container's first process, the contract's environment, Role, security context and
//! Secret mounts), keeping a MinecraftServer whose server is the test suite's fake Java server.

mod agent_bed;
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atlas_runner::api::{MinecraftServer, Phase};
use atlas_testbed::{TestCluster, TestNamespace};
use common::kubectl;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const NAME: &str = "survival";
const POD: &str = "survival-0";
const SECRETS: &str = "/var/run/atlas/secrets";
/// The contract's default grace: 3 x the stop timeout + the final save + 30 s.
const GRACE_SECONDS: u64 = 120;

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_in_a_pod_is_ready_answers_exec_logs_its_server_and_survives_a_pod_delete() -> Result<()> {
    let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
    let image = cluster.nodes()?.image.clone();
    let ns = cluster.namespace("agent-pod").await?;
    let params = PatchParams::apply(common::ADMIN).force();
    common::install_crd(&ns.client).await?;

    // What the operator would make: the agent's account and Role, the generated RCON Secret, and a
    // ConfigMap carrying the fake server's jar (the stand-in for a pack).
    let agent = format!("{NAME}-agent");
    Api::<ServiceAccount>::namespaced(ns.client.clone(), &ns.name)
        .patch(
            &agent,
            &params,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": agent}})),
        )
        .await?;
    Api::<Role>::namespaced(ns.client.clone(), &ns.name)
        .patch(&agent, &params, &Patch::Apply(agent_bed::agent_role(NAME)))
        .await?;
    Api::<RoleBinding>::namespaced(ns.client.clone(), &ns.name)
        .patch(
            &agent,
            &params,
            &Patch::Apply(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": agent},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": agent},
                "subjects": [{"kind": "ServiceAccount", "name": agent, "namespace": ns.name}]}),
            ),
        )
        .await?;
    let password = atlas_testbed::unique("rcon").replace('-', "");
    Api::<Secret>::namespaced(ns.client.clone(), &ns.name)
        .patch(
            &format!("{NAME}-rcon"),
            &params,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{NAME}-rcon")},
                "stringData": {"password": password}})),
        )
        .await?;
    let mut jar: ConfigMap = serde_json::from_value(json!({"metadata": {"name": format!("{NAME}-jar")}}))?;
    jar.binary_data = Some(
        [("fake-server.jar".to_owned(), k8s_openapi::ByteString(std::fs::read(common::fake_server_jar()?)?))].into(),
    );
    Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name).create(&Default::default(), &jar).await?;

    let servers: Api<MinecraftServer> = Api::namespaced(ns.client.clone(), &ns.name);
    let spec = json!({
        "eula": true,
        "server": {"type": "custom", "version": "1.21.4", "jar": "fake-server.jar"},
        "jvm": {"heap": "256M", "flags": "none"},
        "properties": {"motd": "in a pod"},
    });
    servers
        .patch(
            NAME,
            &params,
            &Patch::Apply(json!({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer",
                "metadata": {"name": NAME}, "spec": spec})),
        )
        .await?;
    Api::<StatefulSet>::namespaced(ns.client.clone(), &ns.name)
        .create(&Default::default(), &serde_json::from_value(stateful_set(&image))?)
        .await?;

    // Ready in the resource's status, written by the agent with its own token.
    let first = common::wait_pod_ready(cluster, &ns, POD, None, Duration::from_secs(240)).await?;
    let first_uid = first.metadata.uid.clone().context("no uid")?;
    let running = wait_status(&servers, cluster, &ns, "Ready in the status", |o| {
        ready(o) && o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
    })
    .await?;
    assert_eq!(running.status.as_ref().and_then(|s| s.server_version.as_deref()), Some("1.21.4"));

    // The client commands need no flags in the pod (WORKDIR /data, the default socket).
    let list = kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "atlas-runner", "console", "list"])?;
    ensure!(list.contains("There are 0 of a max of 20 players online"), "console list: {list}");
    let status = kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "atlas-runner", "status"])?;
    ensure!(status.contains("phase:     Running"), "status: {status}");
    let backup = kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "atlas-runner", "backup", "create"])?;
    ensure!(backup.contains("through the runner"), "backup create: {backup}");

    // `kubectl logs` shows the server's own lines (the agent copies them to its stdout).
    let logs = kubectl(cluster, &ns, &["logs", POD, "-c", "server"])?;
    ensure!(logs.contains("Done (") && logs.contains("Starting minecraft server version"), "kubectl logs:\n{logs}");

    // The agent is the container's first process, and the agent proper its child.
    let pid1 = kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "cat", "/proc/1/cmdline"])?;
    ensure!(pid1.starts_with("/usr/local/bin/atlas-runner\0agent"), "PID 1 is {pid1:?}");

    // The world, marked: the replacement pod must start this same world.
    let marker = atlas_testbed::unique("world");
    kubectl(
        cluster,
        &ns,
        &["exec", POD, "-c", "server", "--", "sh", "-c", &format!("echo {marker} > /data/world/e2e-marker")],
    )?;

    // Deleting the pod stops the server gracefully within the grace period: the final status says
    // Stopped after a clean exit, and a Stopped Event.
    let deleted = Instant::now();
    kubectl(cluster, &ns, &["delete", "pod", POD, "--wait=false"])?;
    let stopped = wait_status(&servers, cluster, &ns, "the final status", |o| {
        o.status.as_ref().is_some_and(|s| {
            s.phase == Some(Phase::Stopped) && s.last_exit.as_ref().is_some_and(|e| e.reason == "clean")
        })
    })
    .await?;
    ensure!(stopped.status.is_some());
    let second = common::wait_pod_ready(cluster, &ns, POD, Some(&first_uid), Duration::from_secs(240)).await?;
    ensure!(second.metadata.uid.as_deref() != Some(first_uid.as_str()));
    let took = deleted.elapsed();
    ensure!(took < Duration::from_secs(GRACE_SECONDS), "the old pod took {took:?} to go");
    let events = kubectl(cluster, &ns, &["get", "events.events.k8s.io", "-o", "jsonpath={.items[*].reason}"])?;
    ensure!(events.contains("Stopped") && events.contains("Started"), "events: {events}");

    // The replacement runs the same world, and is Ready again.
    wait_status(&servers, cluster, &ns, "Ready again", ready).await?;
    let kept = kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "cat", "/data/world/e2e-marker"])?;
    assert_eq!(kept.trim(), marker);
    let list = kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "atlas-runner", "console", "list"])?;
    ensure!(list.contains("players online"), "console list in the new pod: {list}");
    Ok(())
}

fn ready(object: &MinecraftServer) -> bool {
    object.status.as_ref().is_some_and(|s| {
        s.phase == Some(Phase::Running) && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The StatefulSet the pod contract describes, with the fake server's jar copied onto the volume by
/// an init container (a pack would bring it).
fn stateful_set(image: &str) -> serde_json::Value {
    let labels = json!({"app.kubernetes.io/name": "minecraft-server", "app.kubernetes.io/instance": NAME});
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    json!({
        "metadata": {"name": NAME, "labels": labels},
        "spec": {
            "serviceName": format!("{NAME}-headless"),
            "replicas": 1,
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": format!("{NAME}-agent"),
                    "automountServiceAccountToken": true,
                    "terminationGracePeriodSeconds": GRACE_SECONDS,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [{
                        "name": "jar",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", "cp /jar/fake-server.jar /data/fake-server.jar"],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "jar", "mountPath": "/jar"}],
                    }],
                    "containers": [{
                        "name": "server",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "args": ["agent"],
                        "env": [
                            {"name": "ATLAS_SERVER_NAME", "value": NAME},
                            {"name": "ATLAS_NAMESPACE", "valueFrom": field("metadata.namespace")},
                            {"name": "ATLAS_POD_NAME", "valueFrom": field("metadata.name")},
                            {"name": "ATLAS_DATA_DIR", "value": "/data"},
                            {"name": "ATLAS_METRICS_ADDR", "value": "0.0.0.0:9100"},
                            {"name": "ATLAS_SECRETS_DIR", "value": SECRETS},
                            {"name": "ATLAS_RCON_PASSWORD_FILE", "value": format!("{SECRETS}/{NAME}-rcon/password")},
                            {"name": "ATLAS_MEMORY_LIMIT_BYTES",
                             "valueFrom": {"resourceFieldRef": {"containerName": "server", "resource": "limits.memory"}}},
                            // No Mojang lookup leaves the pod: a closed loopback port (the custom jar
                            // then gets the runner's fallback Java).
                            {"name": "ATLAS_MOJANG_MANIFEST_URL", "value": "http://127.0.0.1:1/manifest.json"},
                        ],
                        "resources": {"limits": {"memory": "1Gi"}, "requests": {"memory": "512Mi"}},
                        "ports": [{"name": "minecraft", "containerPort": 25565}, {"name": "metrics", "containerPort": 9100}],
                        "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 1, "failureThreshold": 90},
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 1},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                        "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/data"},
                            {"name": "tmp", "mountPath": "/tmp"},
                            {"name": format!("secret-{NAME}-rcon"), "mountPath": format!("{SECRETS}/{NAME}-rcon"), "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "jar", "configMap": {"name": format!("{NAME}-jar")}},
                        {"name": format!("secret-{NAME}-rcon"), "secret": {"secretName": format!("{NAME}-rcon"), "defaultMode": 0o440}},
                    ],
                },
            },
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": atlas_testbed::node::STORAGE_CLASS,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }],
        },
    })
}

async fn wait_status(
    servers: &Api<MinecraftServer>,
    cluster: &TestCluster,
    ns: &TestNamespace,
    what: &str,
    check: impl Fn(&MinecraftServer) -> bool,
) -> Result<MinecraftServer> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let object = servers.get(NAME).await?;
        if check(&object) {
            return Ok(object);
        }
        if Instant::now() > deadline {
            let logs = kubectl(cluster, ns, &["logs", POD, "-c", "server"]).unwrap_or_else(|e| e.to_string());
            bail!("no {what} after 180 s; status {:?}\n{logs}", object.status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
