//! Test support for the chart on the test bed's node: `helm install`/`upgrade` of charts/atlas-runner
//! with the bed's image, kubectl in a namespace, a pack hub the pods reach (on the bed's host
//! address, where the pods' S3 is too), waits on a MinecraftServer and its pod, and the bucket
//! listed by curl's own SigV4 (not our S3 code).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlas_runner::api::{MinecraftServer, Phase};
use atlas_testbed::{S3Endpoint, TestCluster, TestNamespace};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/atlas-runner");

/// The values that point the chart at the bed: its image for the operator and the servers, never
/// pulled (the node has it imported and no registry to pull from), and the test's namespace only.
pub fn bed_values(cluster: &TestCluster, ns: &TestNamespace) -> Result<Vec<String>> {
    let image = &cluster.nodes()?.image;
    let (repository, tag) = image.rsplit_once(':').context("an image reference with a tag")?;
    Ok(vec![
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        "image.pullPolicy=Never".to_owned(),
        "agentImagePullPolicy=Never".to_owned(),
        format!("watchNamespace={}", ns.name),
    ])
}

/// `helm install` (or `upgrade`, by `verb`) of the chart with `values` (`--set` pairs), waiting
/// for the operator's Deployment.
pub fn helm(cluster: &TestCluster, ns: &TestNamespace, verb: &str, release: &str, values: &[String]) -> Result<String> {
    let mut cmd = cluster.helm()?;
    cmd.args([verb, release, CHART, "--namespace", &ns.name]);
    for value in values {
        cmd.args(["--set", value]);
    }
    run_piped(cmd.args(["--wait", "--timeout", "180s"]), None)
}

pub use crate::common::kubectl;
use crate::common::run_piped;

/// `kubectl apply -f -` of a document a user would write.
pub fn kubectl_apply(cluster: &TestCluster, ns: &TestNamespace, yaml: &str) -> Result<String> {
    run_piped(cluster.kubectl()?.args(["--namespace", &ns.name, "apply", "-f", "-"]), Some(yaml))
}

/// Polls `check` every 250 ms until it gives a value or `timeout` passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The bed's host address: where the pods' S3 listens, and where a test serves what pods fetch.
pub async fn host_address(cluster: &'static TestCluster) -> Result<Ipv4Addr> {
    let s3 = cluster.s3_for_pods().await?;
    let url: reqwest::Url = s3.endpoint.parse()?;
    url.host_str()
        .and_then(|h| h.parse().ok())
        .with_context(|| format!("the pods' S3 endpoint {} has no IPv4 host", s3.endpoint))
}

/// Every key in `bucket`, listed by curl with its own SigV4 signing (ListObjectsV2).
pub fn bucket_keys(s3: &S3Endpoint, bucket: &str) -> Result<Vec<String>> {
    let body = run_piped(
        Command::new("curl").args([
            "-sSf",
            "--noproxy",
            "*",
            "--aws-sigv4",
            &format!("aws:amz:{}:s3", atlas_testbed::S3_REGION),
            "--user",
            &format!("{}:{}", s3.access_key, s3.secret_key),
            &format!("{}/{bucket}?list-type=2", s3.endpoint),
        ]),
        None,
    )?;
    Ok(body
        .split("<Key>")
        .skip(1)
        .filter_map(|part| part.split_once("</Key>").map(|(key, _)| key.to_owned()))
        .collect())
}

/// The value of condition `kind` on `server`: (status, reason).
pub fn condition(server: &MinecraftServer, kind: &str) -> Option<(String, String)> {
    let status = server.status.as_ref()?;
    status.conditions.iter().find(|c| c.type_ == kind).map(|c| (c.status.clone(), c.reason.clone()))
}

/// Running, Ready=True, and the agent acted on the current generation.
pub fn ready(server: &MinecraftServer) -> bool {
    server.status.as_ref().is_some_and(|s| {
        s.phase == Some(Phase::Running)
            && s.observed_generation == server.metadata.generation
            && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Players online as the status reports them.
pub fn players(server: &MinecraftServer) -> Option<u32> {
    server.status.as_ref().and_then(|s| s.players).map(|p| p.online)
}

/// Waits until `name` passes `check`; the timeout's error shows the status and the pod's log.
pub async fn wait_server(
    cluster: &TestCluster,
    ns: &TestNamespace,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&MinecraftServer) -> bool,
) -> Result<MinecraftServer> {
    let servers: Api<MinecraftServer> = Api::namespaced(ns.client.clone(), &ns.name);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(object) = servers.get_opt(name).await? {
            if check(&object) {
                return Ok(object);
            }
            let failed = object.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Failed));
            if failed || Instant::now() > deadline {
                let pod = format!("{name}-0");
                let describe = kubectl(cluster, ns, &["describe", "pod", &pod]).unwrap_or_else(|e| e.to_string());
                let logs = kubectl(cluster, ns, &["logs", &pod, "-c", "server", "--tail", "60"])
                    .unwrap_or_else(|e| e.to_string());
                let when = if failed { "the server Failed".to_owned() } else { format!("after {timeout:?}") };
                bail!("{name}: no {what}: {when}; status {:?}\n{describe}\n{logs}", object.status);
            }
        } else if Instant::now() > deadline {
            bail!("{name}: no {what} after {timeout:?}: the resource does not exist");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The pod `NAME-0`, when it exists and is not being deleted.
pub async fn live_pod(ns: &TestNamespace, name: &str) -> Result<Option<Pod>> {
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    Ok(pods.get_opt(&format!("{name}-0")).await?.filter(|p| p.metadata.deletion_timestamp.is_none()))
}

/// `kubectl exec NAME-0 -c server -- atlas-runner ARGS...`.
pub fn exec_runner(cluster: &TestCluster, ns: &TestNamespace, name: &str, args: &[&str]) -> Result<String> {
    let pod = format!("{name}-0");
    let mut all = vec!["exec", pod.as_str(), "-c", "server", "--", "atlas-runner"];
    all.extend_from_slice(args);
    kubectl(cluster, ns, &all)
}

/// The agent's view of its server (`atlas-runner status --json` in the pod).
pub fn runner_status(cluster: &TestCluster, ns: &TestNamespace, name: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&exec_runner(cluster, ns, name, &["status", "--json"])?)?)
}
