//! The alert rules and the Grafana dashboard: promtool checks the rules and fires each alert in
//! its unit tests, and a real Prometheus (Debian's) scrapes a real runner supervising the test
//! server (with a pack and scheduled backups) and a real operator, loads the rules, and evaluates
//! every expression of the dashboard and of the alerts. The scrape targets carry the labels the
//! operator's PodMonitors give a server pod (`namespace`, `server`); the node bed's end-to-end test
//! does the same through Kubernetes service discovery.

mod common;
mod prometheus_bed;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use atlas_testbed::{Processes, TestCluster, bin, free_port};
use common::{Fixture, Runner, http_get, wait_for};
use kube::api::{Api, Patch, PatchParams};
use prometheus_bed::{
    FILES, PANELS_OF_A_RUNNING_SERVER, Prometheus, alert_exprs, alert_rules, dashboard, dashboard_queries, which,
};
use serde_json::{Value, json};

const ALERT_TESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/prometheus/alerts-test.yaml");

fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new(bin("promtool")?).args(args).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "promtool {}: {text}", args.join(" "));
    Ok(text)
}

fn alert_names(rules: &Value) -> Vec<String> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_and_each_alert_fires_in_a_unit_test() -> Result<()> {
    let file = Path::new(FILES).join("alerts.yaml");
    promtool(&["check", "rules", &file.display().to_string()])?;
    promtool(&["test", "rules", ALERT_TESTS])?;

    // Every alert has a case that expects it to fire (promtool passes a file that tests nothing).
    let tests: Value = serde_yaml::from_str(&std::fs::read_to_string(ALERT_TESTS)?)?;
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|c| c["alertname"].as_str().map(str::to_owned))
        .collect();
    let names = alert_names(&alert_rules()?);
    for required in [
        "AtlasServerDown",
        "AtlasServerCrashLooping",
        "AtlasServerFailed",
        "AtlasBackupTooOld",
        "AtlasBackupFailing",
        "AtlasBackupSavingLeftOff",
        "AtlasUpdateRolledBack",
        "AtlasVolumeNearlyFull",
        "AtlasOperatorReconcileErrors",
    ] {
        ensure!(names.iter().any(|n| n == required), "no {required} alert");
    }
    for name in &names {
        ensure!(fired.contains(name), "no unit test fires {name}");
    }
    Ok(())
}

#[test]
fn the_dashboard_is_current_grafana_json_with_its_variables() -> Result<()> {
    let dashboard = dashboard()?;
    ensure!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 39),
        "schemaVersion {}",
        dashboard["schemaVersion"]
    );
    let variables = dashboard["templating"]["list"].as_array().context("variables")?;
    let variable = |name: &str| variables.iter().find(|v| v["name"] == name).cloned().unwrap_or_default();
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    for name in ["namespace", "server"] {
        assert_eq!(variable(name)["type"], "query", "{name}");
        assert_eq!(variable(name)["datasource"]["uid"], "${datasource}", "{name}");
        assert_eq!(variable(name)["multi"], true, "{name}");
    }
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut ids = BTreeSet::new();
    for panel in panels {
        ensure!(ids.insert(panel["id"].as_u64().context("a panel id")?), "duplicate panel id {}", panel["id"]);
        ensure!(panel["gridPos"]["w"].as_u64().is_some(), "{} has no gridPos", panel["title"]);
        for target in panel["targets"].as_array().into_iter().flatten() {
            // The data source is the variable, so the dashboard imports into any Grafana.
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        }
    }
    // Everything the issue asks the dashboard to show has a panel.
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Players online",
        "Phase",
        "Restarts",
        "Exits by class",
        "Memory against the container limit",
        "CPU",
        "Newest backup's age",
        "Backup size",
        "Backup duration",
        "Save-off window",
        "Pack version",
        "Update checks and outcomes",
        "RCON latency (p99)",
        "Reconcile errors",
    ] {
        ensure!(titles.contains(&wanted), "no panel {wanted:?} in {titles:?}");
    }
    Ok(())
}

/// The metric names an expression reads (`atlas_*` and the few it takes from Kubernetes).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b'"');
        if word_start
            && (expr[i..].starts_with("atlas_")
                || expr[i..].starts_with("kubelet_")
                || expr[i..].starts_with("container_"))
        {
            let end = expr[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(expr.len(), |n| i + n);
            names.insert(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every `"atlas_..."` string literal in the sources under `dir`: the names metrics are registered by.
fn registered_names(dir: &Path) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            names.extend(registered_names(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)?;
            for (i, _) in text.match_indices("\"atlas_") {
                let rest = &text[i + 1..];
                if let Some(end) = rest.find('"') {
                    let name = &rest[..end];
                    if name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
                        names.insert(name.to_owned());
                    }
                }
            }
        }
    }
    Ok(names)
}

/// Polls an async check every 200 ms until it gives a value or `timeout` passes.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A runner serving the test server with a pack and backups every 2 s to its local store.
fn runner_with_backups_and_a_pack() -> Result<(Fixture, Runner)> {
    use atlas_runner::pack::PackVersion;
    use atlas_runner::pack::build::{BuildOptions, build};
    let fixture = Fixture::new("monitoring")?;
    let src = fixture.root.join("pack-src");
    std::fs::create_dir_all(src.join("config"))?;
    std::fs::write(src.join("config/motd.txt"), "hello")?;
    let blob = fixture.root.join("pack.tar.zst");
    build(&src, &blob, &BuildOptions::new(PackVersion::new("1.0.0")?))?;
    let bytes = std::fs::read(&blob)?;
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let base = common::serve_files(|_| Ok([("/pack.tar.zst".to_owned(), bytes)].into_iter().collect()))?;
    let mut spec = std::fs::read_to_string(&fixture.spec)?;
    spec.push_str(&format!(
        "  pack:\n    source:\n      url: {{url: \"{base}/pack.tar.zst\", sha256: \"{sha256}\"}}\n  backup:\n    schedule: \"0 */6 * * *\"\n"
    ));
    std::fs::write(&fixture.spec, spec)?;
    let mut runner = Runner::start_with_env(&fixture, &[], &[("ATLAS_BACKUP_SCHEDULE_SECONDS", "2")])?;
    runner.wait_running()?;
    wait_for("a scheduled backup", Duration::from_secs(60), || {
        let (_, body) = http_get(&runner.metrics_addr, "/metrics").ok()?;
        body.lines()
            .any(|l| l.starts_with("atlas_backup_last_success_timestamp_seconds ") && !l.ends_with(" 0"))
            .then_some(())
    })?;
    Ok((fixture, runner))
}

/// The operator (admin credentials: its RBAC is tests/operator.rs's business) watching a namespace
/// with one server in it, so its metrics have data.
async fn operator_with_a_server() -> Result<(Processes, String)> {
    let cluster = TestCluster::shared().await?;
    let client = cluster.client().await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client);
    use kube::CustomResourceExt;
    crds.patch(
        "minecraftservers.atlas.dev",
        &PatchParams::apply("atlas-runner-tests").force(),
        &Patch::Apply(&atlas_runner::api::MinecraftServer::crd()),
    )
    .await?;
    let ns = cluster.namespace("monitoring").await?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let mut processes = Processes::new("atlas-monitoring-operator")?;
    let kubeconfig = cluster.kubeconfig().display().to_string();
    // `env` sets KUBECONFIG for the one process (the bed's Processes start programs as they are).
    let env = which("env").context("no `env` on PATH")?;
    processes.spawn(
        "operator",
        &env,
        [
            format!("KUBECONFIG={kubeconfig}"),
            env!("CARGO_BIN_EXE_atlas-runner").to_owned(),
            "operator".to_owned(),
            "--agent-image=atlas-runner:test".to_owned(),
            format!("--watch-namespace={}", ns.name),
            format!("--lease-namespace={}", ns.name),
            format!("--metrics-addr={metrics}"),
        ],
    )?;
    let api: Api<atlas_runner::api::MinecraftServer> = Api::namespaced(ns.client.clone(), &ns.name);
    let doc = json!({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer", "metadata": {"name": "survival"},
                     "spec": {"eula": true, "server": {"type": "vanilla"}}});
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match api.patch("survival", &PatchParams::apply("user").force(), &Patch::Apply(&doc)).await {
            Ok(_) => break,
            // Right after it is applied, the CRD may not be served yet.
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return Err(e.into()),
        }
    }
    wait_for("the operator's first reconcile", Duration::from_secs(60), || {
        let (_, body) = http_get(&metrics, "/metrics").ok()?;
        body.lines().any(|l| l.starts_with("atlas_operator_reconciles_total ") && !l.ends_with(" 0")).then_some(())
    })?;
    Ok((processes, metrics))
}

#[tokio::test]
async fn every_dashboard_and_alert_expression_evaluates_on_a_real_prometheus() -> Result<()> {
    let (_fixture, runner) = runner_with_backups_and_a_pack()?;
    let (_operator, operator_metrics) = operator_with_a_server().await?;

    // Every atlas_* series the dashboard and the alerts read is one the code exports: seen on
    // /metrics, or registered in src/ (a labelled family shows on /metrics only once it has a
    // series, and this run has no crash, rollback or RCON failure). Histograms add their suffixes.
    let mut exported = registered_names(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))?;
    for name in exported.clone() {
        for suffix in ["_bucket", "_sum", "_count"] {
            exported.insert(format!("{name}{suffix}"));
        }
    }
    for addr in [&runner.metrics_addr, &operator_metrics] {
        let (_, body) = http_get(addr, "/metrics")?;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            if let Some(name) = line.split(['{', ' ']).next() {
                exported.insert(name.to_owned());
            }
        }
    }
    let dashboard = dashboard()?;
    let queries = dashboard_queries(&dashboard);
    let rules = alert_rules()?;
    let alert_exprs = alert_exprs(&rules);
    let mut unknown = BTreeMap::new();
    for (title, expr) in queries.iter().chain(&alert_exprs) {
        for name in metric_names(expr).into_iter().filter(|n| n.starts_with("atlas_")) {
            if !exported.contains(&name) {
                unknown.insert(name, title.clone());
            }
        }
    }
    ensure!(unknown.is_empty(), "expressions read series nothing exports: {unknown:?}");

    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [\"{rules}\"]\n\
         scrape_configs:\n\
         - job_name: minecraft\n  static_configs:\n  - targets: [\"{runner}\"]\n    labels: {{namespace: games, server: survival, pod: survival-0}}\n\
         - job_name: atlas-operator\n  static_configs:\n  - targets: [\"{operator}\"]\n    labels: {{namespace: atlas-system, pod: atlas-runner-0}}\n",
        rules = Path::new(FILES).join("alerts.yaml").display(),
        runner = runner.metrics_addr,
        operator = operator_metrics,
    );
    let prometheus = Prometheus::start(&config)?;
    eventually("both targets up, and enough samples for rate()", Duration::from_secs(60), || async {
        let up = prometheus.query("sum(up)").await.ok()?;
        let samples = prometheus.query("count_over_time(atlas_players_online[1m])").await.ok()?;
        let enough =
            samples.first().and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok()).is_some_and(|n| n >= 5.0);
        (up.first().and_then(|s| s["value"][1].as_str()) == Some("2") && enough).then_some(())
    })
    .await?;

    // The variables' queries (Grafana's label_values) find the server.
    let namespaces = prometheus.api("/api/v1/label/namespace/values?match[]=", "atlas_server_ready").await?;
    assert_eq!(namespaces["data"], json!(["games"]));
    let servers =
        prometheus.api("/api/v1/label/server/values?match[]=", "atlas_server_ready{namespace=~\"games\"}").await?;
    assert_eq!(servers["data"], json!(["survival"]));

    let with_data = prometheus.titles_with_data(&queries).await?;
    // Panels with data here: everything but what needs an event this run does not have (a crash,
    // a failure, a rollback, an update check) or a cluster (the container's limit).
    for title in PANELS_OF_A_RUNNING_SERVER {
        ensure!(
            with_data.contains(title),
            "panel {title:?} has no data:\n{:?}",
            queries.iter().filter(|q| q.0 == title).collect::<Vec<_>>()
        );
    }

    for (alert, expr) in &alert_exprs {
        prometheus.query(expr).await.with_context(|| format!("alert {alert}"))?;
    }
    // Prometheus itself evaluates the rule file it loaded: every rule healthy.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = prometheus.api("/api/v1/rules", "").await?;
        let all: Vec<Value> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if all.len() == alert_exprs.len() && all.iter().all(|r| r["health"] == "ok") {
            break;
        }
        ensure!(Instant::now() < deadline, "Prometheus reports a rule that does not evaluate: {all:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Nothing is wrong with this server: the alerts that need no `for:` stay quiet. (The backup
    // age alert is left out: backups every 2 s make its threshold 3 s, which a slow backup crosses.)
    let firing = prometheus
        .query("ALERTS{alertname=~\"AtlasServerCrashLooping|AtlasBackupFailing|AtlasUpdateRolledBack\"}")
        .await?;
    ensure!(firing.is_empty(), "alerts on a healthy server: {firing:?}");
    drop(prometheus.processes);
    Ok(())
}
