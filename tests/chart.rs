//! The Helm chart: `helm lint --strict` with every option off and on, every rendered object accepted
//! by the API server's server-side dry-run (the Prometheus Operator's real CRDs installed for the
//! optional monitoring objects), the values schema refusing bad values, and `manifests/` matching
//! what the chart renders.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use atlas_testbed::TestCluster;
use serde_json::Value;

mod common;
use common::{piped_output, run_piped};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/atlas-runner");

/// Every optional part on.
const EVERYTHING: &[&str] = &[
    "metrics.serviceMonitor.enabled=true",
    "metrics.podMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "replicaCount=2",
    "timeZone=Europe/Paris",
    "agentImage=registry.example/atlas-runner:1.2.3",
    "agentImagePullPolicy=IfNotPresent",
];

fn render(cluster: &TestCluster, release: &str, namespace: &str, values: &[&str]) -> Result<String> {
    let mut cmd = cluster.helm()?;
    cmd.args(["template", release, CHART, "--namespace", namespace, "--include-crds"]);
    for value in values {
        cmd.args(["--set", value]);
    }
    run_piped(&mut cmd, None)
}

fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter().map(|d| d["kind"].as_str().unwrap_or_default().to_owned()).collect()
}

#[tokio::test]
async fn helm_lint_strict_passes_with_every_option_off_and_on() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    run_piped(cluster.helm()?.args(["lint", "--strict", CHART]), None)?;
    let mut cmd = cluster.helm()?;
    cmd.args(["lint", "--strict", CHART, "--set", "watchNamespace=games"]);
    for value in EVERYTHING {
        cmd.args(["--set", value]);
    }
    run_piped(&mut cmd, None)?;
    Ok(())
}

#[tokio::test]
async fn every_rendered_object_passes_the_api_servers_dry_run() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    common::install_monitoring_crds(cluster)?;
    let ns = cluster.namespace("chart-dry-run").await?;
    // Our CRD first (a dry run creates nothing, and objects of a kind not yet served cannot be checked).
    let crd = std::fs::read_to_string(Path::new(CHART).join("crds/minecraftservers.atlas.dev.yaml"))?;
    run_piped(cluster.kubectl()?.args(["apply", "--server-side", "--force-conflicts", "-f", "-"]), Some(&crd))?;

    let defaults = render(cluster, &ns.name, &ns.name, &[])?;
    let mut all = vec![format!("watchNamespace={}", ns.name)];
    all.extend(EVERYTHING.iter().map(|v| (*v).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let everything = render(cluster, &ns.name, &ns.name, &all)?;

    let default_kinds = kinds(&documents(&defaults)?);
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "ConfigMap",
    ] {
        ensure!(default_kinds.iter().any(|k| k == kind), "the default rendering lacks a {kind}: {default_kinds:?}");
    }
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        ensure!(!default_kinds.iter().any(|k| k == kind), "{kind} is on by default");
    }
    let all_kinds = kinds(&documents(&everything)?);
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        ensure!(all_kinds.iter().any(|k| k == kind), "{kind} missing when enabled: {all_kinds:?}");
    }
    ensure!(!all_kinds.iter().any(|k| k == "ClusterRoleBinding"), "watchNamespace still binds cluster-wide");

    // PodMonitors: the operator is granted on them what it does with them, and nothing by default.
    let pod_monitor_verbs = |values: &[&str]| -> Result<Option<Vec<String>>> {
        let docs = documents(&render(cluster, &ns.name, &ns.name, values)?)?;
        let role = docs.iter().find(|d| d["kind"] == "ClusterRole").context("no ClusterRole rendered")?;
        let rules = role["rules"].as_array().context("the ClusterRole's rules")?;
        let rule =
            rules.iter().find(|r| r["resources"].as_array().is_some_and(|rs| rs.iter().any(|x| x == "podmonitors")));
        Ok(rule.map(|r| {
            r["verbs"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        }))
    };
    assert_eq!(pod_monitor_verbs(&[])?, None, "the default install is granted something on PodMonitors");
    assert_eq!(
        pod_monitor_verbs(&["metrics.podMonitor.enabled=true"])?,
        Some(vec!["list".to_owned(), "watch".to_owned(), "create".to_owned(), "patch".to_owned()])
    );
    assert_eq!(
        pod_monitor_verbs(&["metrics.podMonitor.deleteWhenOff=true"])?,
        Some(vec!["list".to_owned(), "delete".to_owned()])
    );

    for (what, rendered) in [("defaults", &defaults), ("everything on", &everything)] {
        let out = run_piped(
            cluster.kubectl()?.args(["apply", "--server-side", "--dry-run=server", "--force-conflicts", "-f", "-"]),
            Some(rendered),
        )
        .with_context(|| format!("server-side dry run of the chart with {what}"))?;
        let accepted = out.lines().filter(|l| l.contains("(server dry run)")).count();
        ensure!(accepted == documents(rendered)?.len(), "{what}: not every object was accepted:\n{out}");
    }
    // The chart's objects applied for real, server-side, as `kubectl apply --server-side` does.
    run_piped(cluster.kubectl()?.args(["apply", "--server-side", "--force-conflicts", "-f", "-"]), Some(&everything))?;
    let deployment = run_piped(
        cluster.kubectl()?.args([
            "get",
            "deployment",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.items[0].spec.template.spec.containers[0].env}",
        ]),
        None,
    )?;
    let env: Value = serde_json::from_str(&deployment)?;
    let value =
        |name: &str| env.as_array().and_then(|a| a.iter().find(|e| e["name"] == name)).map(|e| e["value"].clone());
    assert_eq!(value("ATLAS_AGENT_IMAGE"), Some(Value::from("registry.example/atlas-runner:1.2.3")));
    assert_eq!(value("ATLAS_POD_MONITORS"), Some(Value::from("true")));
    assert_eq!(value("ATLAS_WATCH_NAMESPACE"), Some(Value::from(ns.name.as_str())));
    assert_eq!(value("TZ"), Some(Value::from("Europe/Paris")));
    Ok(())
}

#[tokio::test]
async fn the_values_schema_refuses_bad_values_naming_them() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    for (value, expect) in [
        ("logFormat=xml", "logFormat"),
        ("replicaCount=two", "replicaCount"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.port=70000", "port"),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("colour=blue", "colour"),
    ] {
        let (ok, stdout, stderr) = piped_output(cluster.helm()?.args(["template", "x", CHART, "--set", value]), None)?;
        ensure!(!ok, "--set {value} was accepted:\n{stdout}");
        ensure!(stderr.contains(expect), "--set {value}: the error does not name {expect}: {stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn manifests_hold_the_chart_rendered_with_its_defaults() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/atlas-runner.yaml");
    let committed = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let rendered = render(cluster, "atlas-runner", "atlas-system", &[])?;
    // The file is the rendering after a two-line header saying how it is made and installed.
    let body: String = committed.lines().skip(2).map(|l| format!("{l}\n")).collect();
    ensure!(committed.starts_with("# Generated by `make manifests`"), "manifests/atlas-runner.yaml lost its header");
    if body != rendered {
        bail!("manifests/atlas-runner.yaml is stale: run `make manifests` (it is rendered from charts/atlas-runner)");
    }
    Ok(())
}

#[tokio::test]
async fn the_chart_ships_the_alert_rules_and_the_dashboard_as_they_are_checked() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    let docs = documents(&render(cluster, "atlas", "atlas-system", &["metrics.prometheusRule.enabled=true"])?)?;
    let files = Path::new(CHART).join("files");
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").context("a PrometheusRule")?;
    let alerts: Value = serde_yaml::from_str(&std::fs::read_to_string(files.join("alerts.yaml"))?)?;
    assert_eq!(rule["spec"], alerts, "the PrometheusRule differs from files/alerts.yaml");
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").context("the dashboard ConfigMap")?;
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(config_map["data"]["atlas-runner.json"].as_str().context("the dashboard")?)?;
    let file: Value = serde_json::from_str(&std::fs::read_to_string(files.join("dashboard.json"))?)?;
    assert_eq!(shipped, file);
    Ok(())
}
