//! The chart on the test bed's cluster with a node: `helm install` of charts/atlas-runner with our
//! image (built from the Dockerfile, imported into the node), the operator running in its pod with
//! its ServiceAccount, leading through its Lease, and reconciling a MinecraftServer from inside the
//! cluster; `helm uninstall` leaves the world's claim.

mod chart_bed;
mod common;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use atlas_testbed::{TestCluster, TestNamespace};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

/// `helm install` of the chart with the bed's image for the operator and the servers.
fn helm_install(cluster: &TestCluster, ns: &TestNamespace, release: &str) -> Result<String> {
    chart_bed::helm(cluster, ns, "install", release, &chart_bed::bed_values(cluster, ns)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_runs_the_operator_in_the_cluster_and_uninstall_keeps_the_world() -> Result<()> {
    let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
    let ns = cluster.namespace("e2e-chart").await?;
    let release = "atlas";
    let notes = helm_install(cluster, &ns, release)?;
    ensure!(notes.contains("kubectl apply -n"), "NOTES.txt gives no next command:\n{notes}");

    // The Deployment is ready (`--wait`), its pod non-root with the chart's security context.
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let deployment = deployments.get("atlas-atlas-runner").await?;
    assert_eq!(deployment.status.as_ref().and_then(|s| s.ready_replicas), Some(1));
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let operator_pods = pods.list(&ListParams::default().labels("app.kubernetes.io/component=operator")).await?;
    let operator_pod = operator_pods.items.first().context("an operator pod")?;
    let pod_name = operator_pod.metadata.name.clone().context("a pod name")?;
    let security = operator_pod.spec.as_ref().and_then(|s| s.security_context.clone()).context("a security context")?;
    assert_eq!(security.run_as_user, Some(10001));

    // It leads through the Lease in its namespace, under its pod's name.
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let holder = chart_bed::eventually("the operator's Lease", Duration::from_secs(60), || async {
        Ok(leases.get_opt("atlas-runner-operator").await?.and_then(|l| l.spec?.holder_identity))
    })
    .await?;
    ensure!(holder.starts_with(&pod_name), "the Lease is held by {holder}, not {pod_name}");

    // A MinecraftServer applied by a user gets its StatefulSet from the operator in the pod, whose
    // pod runs our image as the agent.
    let servers: Api<atlas_runner::api::MinecraftServer> = Api::namespaced(ns.client.clone(), &ns.name);
    let doc = json!({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer", "metadata": {"name": "inside"},
        "spec": {"eula": true, "server": {"type": "vanilla", "version": "1.21.4"}, "storage": {"size": "1Gi"}}});
    servers.patch("inside", &PatchParams::apply("user").force(), &Patch::Apply(&doc)).await?;
    let statefulsets: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let sts = chart_bed::eventually("the StatefulSet", Duration::from_secs(60), || async {
        Ok(statefulsets.get_opt("inside").await?)
    })
    .await?;
    let container = &sts.spec.as_ref().and_then(|s| s.template.spec.clone()).context("a pod template")?.containers[0];
    assert_eq!(container.image.as_deref(), Some(cluster.nodes()?.image.as_str()));
    assert_eq!(container.image_pull_policy.as_deref(), Some("Never"));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ns.client.clone(), &ns.name);
    let claim = chart_bed::eventually("the claim bound", Duration::from_secs(120), || async {
        Ok(claims
            .get_opt("data-inside-0")
            .await?
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")))
    })
    .await?;

    // helm uninstall removes the operator; the server, its world and its claim stay.
    common::run_piped(
        cluster.helm()?.args(["uninstall", release, "--namespace", &ns.name, "--wait", "--timeout", "120s"]),
        None,
    )?;
    ensure!(deployments.get_opt("atlas-atlas-runner").await?.is_none(), "the operator's Deployment is still there");
    let kept = claims.get("data-inside-0").await?;
    assert_eq!(kept.metadata.uid, claim.metadata.uid);
    assert!(kept.metadata.deletion_timestamp.is_none(), "the claim is being deleted");
    assert!(servers.get_opt("inside").await?.is_some(), "helm uninstall deleted the MinecraftServer");
    Ok(())
}
