//! The operator and the agent together on the test bed's node, as a cluster admin and a user meet
//! them: `helm install` of the chart with our image, then a MinecraftServer written as a user
//! writes it, whose pack comes from a pack hub and whose backups go to S3, both served on the bed's
//! host address where the pods reach them. The operator makes the StatefulSet; the agent in the
//! pod provisions the pack, starts the server (the test suite's fake Java server) and reports.

mod agent_bed;
mod chart_bed;
mod common;
mod prometheus_bed;

use std::path::Path;
use std::time::Duration;

use agent_bed::Hub;
use anyhow::{Context, Result, ensure};
use atlas_testbed::{S3Endpoint, TestBucket, TestCluster, TestNamespace};
use chart_bed::{bucket_keys, exec_runner, kubectl, players, ready, wait_server};
use common::fake_server_pack;
use k8s_openapi::api::core::v1::Pod;

/// The pack every server here runs: the fake server's jar as a `custom` server's jar.
const PACK: &str = "e2e";

/// One helm release on the bed, in a namespace of its own, with a pack hub and a bucket the pods
/// reach, and the S3 credentials as a Secret.
struct Release {
    cluster: &'static TestCluster,
    ns: TestNamespace,
    name: String,
    values: Vec<String>,
    hub: Hub,
    s3: S3Endpoint,
    bucket: String,
    scratch: tempfile::TempDir,
}

impl Drop for Release {
    /// The namespace goes with the test (its servers, their operator), so what runs after it has
    /// the machine back; the release's cluster-wide RBAC names this namespace alone.
    fn drop(&mut self) {
        let _ = kubectl(self.cluster, &self.ns, &["delete", "namespace", &self.ns.name, "--wait=false"]);
    }
}

impl Release {
    async fn install(prefix: &str, values: &[&str]) -> Result<Self> {
        let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
        let ns = cluster.namespace(prefix).await?;
        let host = chart_bed::host_address(cluster).await?;
        let scratch = tempfile::tempdir()?;
        let hub = Hub::start_on(host)?;
        // The bed's host takes nothing from pods but the ports a test opens to them.
        let port: u16 = hub.base.rsplit(':').next().and_then(|p| p.parse().ok()).context("the hub's port")?;
        cluster.open_to_pods(port)?;
        hub.publish(PACK, "stable", "1.0.0", &fake_server_pack(scratch.path(), "1.0.0", &[])?)?;
        let s3 = cluster.s3_for_pods().await?;
        let bucket = atlas_testbed::unique(prefix).to_lowercase();
        atlas_testbed::create_bucket(&s3, &bucket).await?;
        // As a user keeps S3 keys: a Secret the spec names.
        kubectl(
            cluster,
            &ns,
            &[
                "create",
                "secret",
                "generic",
                "backup-s3",
                &format!("--from-literal=AWS_ACCESS_KEY_ID={}", s3.access_key),
                &format!("--from-literal=AWS_SECRET_ACCESS_KEY={}", s3.secret_key),
            ],
        )?;
        let mut all = chart_bed::bed_values(cluster, &ns)?;
        all.extend(values.iter().map(|v| (*v).to_owned()));
        // Release names are cluster-wide through the ClusterRole's name: one per namespace.
        let name = ns.name.clone();
        let notes = chart_bed::helm(cluster, &ns, "install", &name, &all)?;
        ensure!(notes.contains("kubectl apply -n"), "NOTES.txt gives no next command:\n{notes}");
        Ok(Self { cluster, ns, name, values: all, hub, s3, bucket, scratch })
    }

    /// A MinecraftServer as a user writes it: the fake server from the hub's pack, daily backups
    /// to the bucket, a small volume.
    fn server_yaml(&self, name: &str) -> String {
        self.server_yaml_in(name, None)
    }

    /// [`Release::server_yaml`] with its volume from `storage_class` (the bed's default when None).
    fn server_yaml_in(&self, name: &str, storage_class: Option<&str>) -> String {
        let class = storage_class.map(|c| format!("\n    storageClassName: {c}")).unwrap_or_default();
        format!(
            r#"apiVersion: atlas.dev/v1alpha1
kind: MinecraftServer
metadata:
  name: {name}
spec:
  eula: true
  server:
    type: custom
    version: "1.21.4"
    jar: fake-server.jar
  pack:
    source:
      hub:
        url: {hub}
        pack: {PACK}
        channel: stable
  jvm:
    heap: 256M
    flags: none
  backup:
    schedule: "@daily"
    store:
      s3:
        bucket: {bucket}
        prefix: {name}/
        endpoint: {endpoint}
        region: us-east-1
        credentialsSecretRef: {{name: backup-s3}}
  resources:
    requests: {{memory: 128Mi}}
    limits: {{memory: 512Mi}}
  storage:
    size: 1Gi{class}
"#,
            hub = self.hub.base,
            bucket = self.bucket,
            endpoint = self.s3.endpoint,
        )
    }

    fn apply_server(&self, name: &str) -> Result<()> {
        chart_bed::kubectl_apply(self.cluster, &self.ns, &self.server_yaml(name))?;
        Ok(())
    }

    async fn wait_ready(&self, name: &str) -> Result<atlas_runner::api::MinecraftServer> {
        wait_server(self.cluster, &self.ns, name, "Ready", Duration::from_secs(300), ready).await
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        kubectl(self.cluster, &self.ns, args)
    }

    fn exec(&self, name: &str, args: &[&str]) -> Result<String> {
        exec_runner(self.cluster, &self.ns, name, args)
    }

    /// The `kubectl get mcs NAME` row: column -> value.
    fn get_mcs(&self, name: &str) -> Result<std::collections::BTreeMap<String, String>> {
        let table = self.kubectl(&["get", "mcs", name])?;
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().context("a header")?.split_whitespace().collect();
        let row: Vec<&str> = lines.next().context("a row")?.split_whitespace().collect();
        Ok(header.iter().zip(row).map(|(h, v)| ((*h).to_owned(), v.to_owned())).collect())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_helm_install_a_users_server_gets_its_pack_runs_shows_its_player_and_backs_up_to_s3() -> Result<()> {
    let release = Release::install("e2e-agent", &[]).await?;
    let name = "survival";
    release.apply_server(name)?;

    // The operator makes the StatefulSet; the agent provisions the hub's pack into the volume,
    // starts the server from the pack's jar and reports Ready for the spec as applied.
    let running = release.wait_ready(name).await?;
    let status = running.status.as_ref().context("a status")?;
    assert_eq!(status.pack_version.as_deref(), Some("1.0.0"));
    assert_eq!(status.server_version.as_deref(), Some("1.21.4"));
    ensure!(
        chart_bed::condition(&running, "PackApplied").is_some_and(|(s, _)| s == "True"),
        "PackApplied: {:?}",
        status.conditions
    );
    let row = release.get_mcs(name)?;
    assert_eq!(row.get("PHASE").map(String::as_str), Some("Running"), "{row:?}");
    assert_eq!(row.get("PACK").map(String::as_str), Some("1.0.0"), "{row:?}");
    assert_eq!(row.get("PLAYERS").map(String::as_str), Some("0"), "{row:?}");
    // The pack's files came from the hub, in the pod's volume.
    release.kubectl(&["exec", &format!("{name}-0"), "-c", "server", "--", "test", "-s", "/data/fake-server.jar"])?;

    // A player joins (the fake server's console command); the status and `kubectl get mcs` show it.
    let joined = release.exec(name, &["console", "fake-join", "Alex"])?;
    ensure!(joined.contains("Alex joined the game"), "fake-join: {joined}");
    let online =
        wait_server(release.cluster, &release.ns, name, "a player in the status", Duration::from_secs(60), |s| {
            players(s) == Some(1)
        })
        .await?;
    assert_eq!(online.status.and_then(|s| s.players).map(|p| p.max), Some(20));
    let row = release.get_mcs(name)?;
    assert_eq!(row.get("PLAYERS").map(String::as_str), Some("1"), "{row:?}");

    // A backup taken in the pod lands in the bucket: listed by curl, read by GNU tar and zstd.
    let out = release.exec(name, &["backup", "create"])?;
    ensure!(out.contains("through the runner"), "backup create: {out}");
    let backed_up =
        wait_server(release.cluster, &release.ns, name, "lastBackup in the status", Duration::from_secs(60), |s| {
            s.status.as_ref().is_some_and(|s| s.last_backup.is_some())
        })
        .await?;
    let backup = backed_up.status.and_then(|s| s.last_backup).context("a last backup")?;
    let keys = bucket_keys(&release.s3, &release.bucket)?;
    let archive = format!("{name}/archives/{}.tar.zst", backup.name);
    ensure!(keys.contains(&archive), "{archive} is not in the bucket: {keys:?}");
    ensure!(
        keys.iter().any(|k| k.starts_with(&format!("{name}/")) && k.contains(&backup.name) && k.ends_with(".json")),
        "no manifest of {} in the bucket: {keys:?}",
        backup.name
    );
    let bucket = TestBucket { s3: release.s3.clone(), name: release.bucket.clone(), region: "us-east-1".to_owned() };
    let files = agent_bed::backup_files(&bucket, &format!("{name}/"), &backup.name, release.scratch.path())?;
    ensure!(files.keys().any(|f| f.starts_with("world/")), "the backup holds no world: {:?}", files.keys());
    wait_server(release.cluster, &release.ns, name, "BackupHealthy=True", Duration::from_secs(30), |s| {
        chart_bed::condition(s, "BackupHealthy").is_some_and(|(s, _)| s == "True")
    })
    .await?;
    Ok(())
}

/// How Prometheus reaches the API server: its address and the kubeconfig's CA and client
/// certificate, as files.
struct ApiAccess {
    server: String,
    tls: serde_json::Value,
}

impl ApiAccess {
    fn from_kubeconfig(path: &Path) -> Result<Self> {
        let config: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
        let cluster = &config["clusters"][0]["cluster"];
        let user = &config["users"][0]["user"];
        // The bed's kubeconfig names its certificate files, which Prometheus reads as they are.
        let file = |object: &serde_json::Value, key: &str| -> Result<String> {
            object[key].as_str().map(str::to_owned).with_context(|| format!("no {key} file in the kubeconfig"))
        };
        Ok(Self {
            server: cluster["server"].as_str().context("no server in the kubeconfig")?.to_owned(),
            tls: serde_json::json!({
                "ca_file": file(cluster, "certificate-authority")?,
                "cert_file": file(user, "client-certificate")?,
                "key_file": file(user, "client-key")?,
            }),
        })
    }

    /// A `kubernetes_sd_configs` entry of `role` in `namespace` (all namespaces when None).
    fn discovery(&self, role: &str, namespace: Option<&str>) -> serde_json::Value {
        let mut sd = serde_json::json!({"role": role, "api_server": self.server, "tls_config": self.tls});
        if let Some(namespace) = namespace {
            sd["namespaces"] = serde_json::json!({"names": [namespace]});
        }
        sd
    }
}

/// A Kubernetes label name as Prometheus's discovery spells it in meta labels.
fn meta_name(label: &str) -> String {
    label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

/// The scrape config the Prometheus Operator generates for a PodMonitor or a ServiceMonitor
/// (`kind`), reduced to what these monitors use: keep the selected pods (or the selected
/// Services' endpoints) and the named port, label targets with `namespace`, `pod` and `job`, then
/// the monitor's own relabelings.
fn monitor_scrape_config(kind: &str, monitor: &serde_json::Value, api: &ApiAccess) -> Result<serde_json::Value> {
    let namespace = monitor["metadata"]["namespace"].as_str().context("a namespace")?;
    let name = monitor["metadata"]["name"].as_str().context("a name")?;
    let spec = &monitor["spec"];
    let (role, object, endpoints_key, port_label) = match kind {
        "PodMonitor" => ("pod", "pod", "podMetricsEndpoints", "__meta_kubernetes_pod_container_port_name"),
        "ServiceMonitor" => ("endpointslice", "service", "endpoints", "__meta_kubernetes_endpointslice_port_name"),
        other => anyhow::bail!("not a monitor: {other}"),
    };
    let endpoint = &spec[endpoints_key][0];
    let mut relabel = Vec::new();
    for (key, value) in spec["selector"]["matchLabels"].as_object().context("matchLabels")? {
        relabel.push(serde_json::json!({
            "action": "keep",
            "source_labels": [format!("__meta_kubernetes_{object}_label_{}", meta_name(key))],
            "regex": value,
        }));
    }
    relabel.push(serde_json::json!({"action": "keep", "source_labels": [port_label], "regex": endpoint["port"]}));
    relabel.push(serde_json::json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}));
    relabel.push(serde_json::json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}));
    // The Prometheus Operator's job label: the monitor's namespace/name for a PodMonitor, the
    // Service's name for a ServiceMonitor.
    relabel.push(if kind == "PodMonitor" {
        serde_json::json!({"target_label": "job", "replacement": format!("{namespace}/{name}")})
    } else {
        serde_json::json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"})
    });
    for own in endpoint["relabelings"].as_array().into_iter().flatten() {
        let mut rule = serde_json::json!({"source_labels": own["sourceLabels"], "target_label": own["targetLabel"]});
        for (from, to) in [("regex", "regex"), ("replacement", "replacement"), ("action", "action")] {
            if !own[from].is_null() {
                rule[to] = own[from].clone();
            }
        }
        relabel.push(rule);
    }
    Ok(serde_json::json!({
        "job_name": format!("{}/{namespace}/{name}/0", if kind == "PodMonitor" { "podMonitor" } else { "serviceMonitor" }),
        "metrics_path": endpoint["path"].as_str().unwrap_or("/metrics"),
        "kubernetes_sd_configs": [api.discovery(role, Some(namespace))],
        "relabel_configs": relabel,
    }))
}

/// The job name of the observability guide's scrape config.
const GUIDE_JOB: &str = "minecraft";

/// The scrape config of docs/guides/observability.md: the YAML block after "does the same with:".
fn guide_scrape_config() -> Result<serde_json::Value> {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/guides/observability.md"))?;
    let after = guide.split_once("does the same with:").context("the guide's Prometheus config")?.1;
    let block = after.split_once("```yaml\n").context("a YAML block")?.1.split_once("```").context("its end")?.0;
    let config: serde_json::Value = serde_yaml::from_str(block)?;
    let job = config["scrape_configs"][0].clone();
    ensure!(job["job_name"] == GUIDE_JOB, "the guide's job is {}", job["job_name"]);
    Ok(job)
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_discovers_the_pods_through_the_api_server_and_every_dashboard_and_alert_expression_evaluates()
-> Result<()> {
    use kube::api::{Api, ApiResource, DynamicObject};
    use kube::core::GroupVersionKind;
    use prometheus_bed::{
        CONTAINER_PANEL, PANELS_OF_A_RUNNING_SERVER, Prometheus, alert_exprs, dashboard, dashboard_queries,
    };

    let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
    common::install_monitoring_crds(cluster)?;
    let release = Release::install(
        "e2e-prom",
        &[
            "metrics.podMonitor.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
        ],
    )
    .await?;
    let name = "survival";
    release.apply_server(name)?;
    release.wait_ready(name).await?;
    let joined = release.exec(name, &["console", "fake-join", "Alex"])?;
    ensure!(joined.contains("Alex joined the game"), "fake-join: {joined}");

    // What the Prometheus Operator would read: the operator's PodMonitor for the server, the
    // chart's ServiceMonitor for the operator and its PrometheusRule.
    let monitoring = |kind: &str, plural: &str| {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind), plural);
        Api::<DynamicObject>::namespaced_with(release.ns.client.clone(), &release.ns.name, &resource)
    };
    let pod_monitor = chart_bed::eventually("the server's PodMonitor", Duration::from_secs(60), || async {
        Ok(monitoring("PodMonitor", "podmonitors").get_opt(name).await?)
    })
    .await?;
    let service_monitors = monitoring("ServiceMonitor", "servicemonitors").list(&Default::default()).await?;
    let service_monitor = service_monitors.items.first().context("the chart's ServiceMonitor")?;
    let rules = monitoring("PrometheusRule", "prometheusrules").list(&Default::default()).await?;
    let rule = rules.items.first().context("the chart's PrometheusRule")?;
    let rule_file = release.scratch.path().join("rules.yaml");
    std::fs::write(&rule_file, serde_yaml::to_string(&rule.data["spec"])?)?;

    let api = ApiAccess::from_kubeconfig(cluster.kubeconfig())?;
    let mut scrape = vec![
        monitor_scrape_config("PodMonitor", &serde_json::to_value(&pod_monitor)?, &api)?,
        monitor_scrape_config("ServiceMonitor", &serde_json::to_value(service_monitor)?, &api)?,
    ];
    // The plain Prometheus config the observability guide gives instead of a PodMonitor, as a user
    // copies it (pointed at this cluster and this namespace).
    let mut guide = guide_scrape_config()?;
    guide["kubernetes_sd_configs"][0] = api.discovery("pod", Some(&release.ns.name));
    scrape.push(guide);
    // The kubelet's cAdvisor, for the container's memory limit (as kube-prometheus scrapes it).
    scrape.push(serde_json::json!({
        "job_name": "kubelet-cadvisor",
        "scheme": "https",
        "metrics_path": "/metrics/cadvisor",
        "tls_config": api.tls,
        "kubernetes_sd_configs": [api.discovery("node", None)],
    }));
    let config = serde_json::json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [rule_file],
        "scrape_configs": scrape,
    });

    // Prometheus runs in the node's network namespace, which routes to the bed's own addresses
    // and nowhere else; the test reaches its API on the node's address.
    let netns = cluster.nodes()?.netns.clone();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(release.ns.client.clone());
    let node = nodes.list(&Default::default()).await?.items.into_iter().next().context("a node")?;
    let node_ip = node
        .status
        .and_then(|s| s.addresses)
        .into_iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .context("the node's InternalIP")?
        .address;
    let listen = format!("{node_ip}:{}", atlas_testbed::free_port()?);
    let prometheus = Prometheus::start_in_netns(&serde_json::to_string(&config)?, &netns, &listen)?;
    let targets = |job: &str| {
        let prometheus = &prometheus;
        let query = format!("up{{job=\"{job}\"}} == 1");
        async move { prometheus.query(&query).await }
    };
    let server_job = format!("{}/{name}", release.ns.name);
    let operator_job = format!("{}-atlas-runner-metrics", release.name);
    let up = chart_bed::eventually(
        "every target up (the server's, the operator's, the kubelet's)",
        Duration::from_secs(90),
        || async {
            let server = targets(&server_job).await?;
            let operator = targets(&operator_job).await?;
            let kubelet = targets("kubelet-cadvisor").await?;
            let guide = targets(GUIDE_JOB).await?;
            Ok((server.len() == 1 && operator.len() == 1 && kubelet.len() == 1 && guide.len() == 1).then_some(()))
        },
    )
    .await;
    if let Err(e) = up {
        let targets = prometheus.api("/api/v1/targets", "").await.map(|t| t.to_string()).unwrap_or_default();
        let log = std::fs::read_to_string(prometheus.processes.dir().join("prometheus.log")).unwrap_or_default();
        return Err(e.context(format!("targets: {targets}\nPrometheus's log:\n{log}")));
    }

    // A backup while Prometheus watches, so its counters move in the window the panels read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    release.exec(name, &["backup", "create"])?;
    chart_bed::eventually("the backup's series and enough samples for rate()", Duration::from_secs(90), || async {
        let backups = prometheus.query("atlas_backup_last_success_timestamp_seconds > 0").await?;
        let samples = prometheus.query("count_over_time(atlas_players_online[1m])").await?;
        let enough =
            samples.first().and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok()).is_some_and(|n| n >= 10.0);
        Ok((!backups.is_empty() && enough).then_some(()))
    })
    .await?;

    // The targets carry what the dashboard's variables select on, found by Grafana's label_values.
    let namespaces = prometheus.api("/api/v1/label/namespace/values?match[]=", "atlas_server_ready").await?;
    assert_eq!(namespaces["data"], serde_json::json!([release.ns.name]));
    let servers = prometheus.api("/api/v1/label/server/values?match[]=", "atlas_server_ready").await?;
    assert_eq!(servers["data"], serde_json::json!([name]));
    let players = prometheus.query(&format!("atlas_players_online{{job=\"{server_job}\"}}")).await?;
    assert_eq!(players.first().and_then(|s| s["value"][1].as_str()), Some("1"), "{players:?}");
    // The guide's config labels the server's target as the PodMonitor does.
    let labels = |job: &str| {
        let query = format!("up{{job=\"{job}\"}}");
        let prometheus = &prometheus;
        async move {
            let up = prometheus.query(&query).await?;
            let metric = up.first().map(|s| s["metric"].clone()).unwrap_or_default();
            Ok::<_, anyhow::Error>(["namespace", "server", "pod"].map(|l| metric[l].as_str().map(str::to_owned)))
        }
    };
    let from_monitor = labels(&server_job).await?;
    assert_eq!(from_monitor, [Some(release.ns.name.clone()), Some(name.to_owned()), Some(format!("{name}-0"))]);
    assert_eq!(labels(GUIDE_JOB).await?, from_monitor);

    let queries = dashboard_queries(&dashboard()?);
    let with_data = prometheus.titles_with_data(&queries).await?;
    // The panels of a running server, and on a cluster the container's limit too.
    for title in PANELS_OF_A_RUNNING_SERVER.into_iter().chain([CONTAINER_PANEL]) {
        ensure!(with_data.contains(title), "panel {title:?} has no data: with data {with_data:?}");
    }
    // The limit the panel draws the JVM against comes from the kubelet's cAdvisor, on the server
    // container's own series (`container="server"`, as the panel selects it).
    let limit = prometheus
        .query(&format!(
            "max by (namespace, pod) (container_spec_memory_limit_bytes{{namespace=\"{}\", pod=\"{name}-0\", container=\"server\"}})",
            release.ns.name
        ))
        .await?;
    assert_eq!(limit.first().and_then(|s| s["value"][1].as_str()), Some("536870912"), "{limit:?}");

    // Every alert expression evaluates, and Prometheus evaluates the PrometheusRule's groups healthy.
    let shipped = alert_exprs(&rule.data["spec"]);
    ensure!(shipped.len() >= 9, "the PrometheusRule holds {} alerts", shipped.len());
    for (alert, expr) in &shipped {
        prometheus.query(expr).await.with_context(|| format!("alert {alert}"))?;
    }
    chart_bed::eventually("every rule evaluated healthy", Duration::from_secs(30), || async {
        let all = prometheus.rules().await?;
        Ok((all.len() == shipped.len()
            && all.iter().all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z"))
        .then_some(()))
    })
    .await?;
    let firing = prometheus
        .query("ALERTS{alertname=~\"AtlasServerDown|AtlasServerCrashLooping|AtlasServerFailed|AtlasBackupFailing|AtlasOperatorReconcileErrors\"}")
        .await?;
    ensure!(firing.is_empty(), "alerts on a healthy server: {firing:?}");
    Ok(())
}

/// A new release of Atlas Runner as a user upgrades to one: `helm upgrade` to a new image tag
/// (the node holds our image under that tag too, as a registry would; the pull policy stays
/// `Never`, so nothing is pulled). Every server pod's template changes with it, and so does the
/// operator's Deployment. The values and the new image.
fn upgraded_values(release: &Release) -> Result<(Vec<String>, String)> {
    let old = &release.cluster.nodes()?.image;
    let (repository, tag) = old.rsplit_once(':').context("an image reference with a tag")?;
    let new_tag = format!("{tag}-next");
    let new = format!("{repository}:{new_tag}");
    release.cluster.tag_image(&new)?;
    let mut values: Vec<String> = release.values.iter().filter(|v| !v.starts_with("image.tag=")).cloned().collect();
    values.push(format!("image.tag={new_tag}"));
    Ok((values, new))
}

/// The image of the server container in a pod (the template the pod runs).
fn pod_image(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.containers.iter().find(|c| c.name == "server")?.image.clone()
}

/// The JVM the agent supervises in `name`'s pod: (pid, seconds since it started).
fn jvm(release: &Release, name: &str) -> Result<(u64, u64)> {
    let status = chart_bed::runner_status(release.cluster, &release.ns, name)?;
    let pid = status["pid"].as_u64().with_context(|| format!("no pid in {status}"))?;
    let uptime = status["uptimeSeconds"].as_u64().with_context(|| format!("no uptimeSeconds in {status}"))?;
    Ok((pid, uptime))
}

fn pending(server: &atlas_runner::api::MinecraftServer) -> Option<(String, String)> {
    chart_bed::condition(server, "UpgradePending")
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_upgrade_with_a_player_online_restarts_nothing_until_the_player_leaves() -> Result<()> {
    let release = Release::install("e2e-upgrade", &[]).await?;
    let name = "survival";
    release.apply_server(name)?;
    release.wait_ready(name).await?;
    let joined = release.exec(name, &["console", "fake-join", "Alex"])?;
    ensure!(joined.contains("Alex joined the game"), "fake-join: {joined}");
    wait_server(release.cluster, &release.ns, name, "a player in the status", Duration::from_secs(60), |s| {
        players(s) == Some(1)
    })
    .await?;
    let pod = chart_bed::live_pod(&release.ns, name).await?.context("the server's pod")?;
    let (pid, uptime) = jvm(&release, name)?;
    let upgraded_at = std::time::Instant::now();

    let (values, new_image) = upgraded_values(&release)?;
    let old_image = pod_image(&pod);
    chart_bed::helm(release.cluster, &release.ns, "upgrade", &release.name, &values)?;

    // The new operator sees the new template and holds it back: a player is online.
    let held = wait_server(release.cluster, &release.ns, name, "UpgradePending=True", Duration::from_secs(120), |s| {
        pending(s).is_some_and(|(status, _)| status == "True")
    })
    .await?;
    assert_eq!(pending(&held).map(|(_, reason)| reason).as_deref(), Some("PlayersOnline"));
    let row = release.get_mcs(name)?;
    assert_eq!(row.get("PLAYERS").map(String::as_str), Some("1"), "{row:?}");
    // Some seconds on, the same pod runs the same JVM, which has kept running all along.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let still = chart_bed::live_pod(&release.ns, name).await?.context("the server's pod")?;
    assert_eq!(still.metadata.uid, pod.metadata.uid, "the pod was replaced with a player online");
    assert_eq!(pod_image(&still), old_image, "the pod with a player runs another image");
    let (pid_now, uptime_now) = jvm(&release, name)?;
    assert_eq!(pid_now, pid, "the JVM was restarted");
    ensure!(
        uptime_now >= uptime + upgraded_at.elapsed().as_secs().saturating_sub(1),
        "the JVM's uptime went from {uptime} s to {uptime_now} s in {:?}",
        upgraded_at.elapsed()
    );

    // The player leaves: the operator replaces the pod, whose server comes back on the new template.
    release.exec(name, &["console", "fake-leave", "Alex"])?;
    let replaced = chart_bed::eventually("a new pod", Duration::from_secs(120), || async {
        Ok(chart_bed::live_pod(&release.ns, name).await?.filter(|p| p.metadata.uid != pod.metadata.uid))
    })
    .await?;
    assert_eq!(pod_image(&replaced).as_deref(), Some(new_image.as_str()));
    let back = wait_server(release.cluster, &release.ns, name, "Ready on the new pod", Duration::from_secs(180), |s| {
        ready(s) && pending(s).is_some_and(|(status, _)| status == "False")
    })
    .await?;
    assert_eq!(back.status.as_ref().and_then(|s| s.pack_version.as_deref()), Some("1.0.0"));
    let (pid_after, _) = jvm(&release, name)?;
    // A new pod: a new JVM (pids restart in each pod's namespace, so compare the pod, not the pid).
    let now = chart_bed::live_pod(&release.ns, name).await?.context("the server's pod")?;
    assert_eq!(now.metadata.uid, replaced.metadata.uid);
    ensure!(pid_after > 0);
    Ok(())
}

/// Local volumes of a test's own, in a storage class of its own: the bed's volumes stay for the
/// other tests. The directories go with the test; the PersistentVolumes are deleted with it.
struct OwnVolumes {
    cluster: &'static TestCluster,
    class: String,
    names: Vec<String>,
    _dirs: tempfile::TempDir,
}

impl OwnVolumes {
    fn new(cluster: &'static TestCluster, count: usize) -> Result<Self> {
        let dirs = tempfile::tempdir()?;
        let class = atlas_testbed::unique("e2e-local");
        let mut yaml = String::new();
        let mut names = Vec::new();
        for i in 0..count {
            let path = dirs.path().join(format!("pv-{i}"));
            std::fs::create_dir_all(&path)?;
            let name = format!("{class}-{i}");
            yaml += &format!(
                "---\napiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {name}}}\nspec:\n  capacity: {{storage: 1Gi}}\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  storageClassName: {class}\n  local: {{path: \"{}\"}}\n  nodeAffinity:\n    required:\n      nodeSelectorTerms:\n      - matchExpressions:\n        - {{key: kubernetes.io/hostname, operator: In, values: [{}]}}\n",
                path.display(),
                atlas_testbed::node::NODE_NAME,
            );
            names.push(name);
        }
        use std::io::Write;
        let mut child = cluster
            .kubectl()?
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        child.stdin.take().context("kubectl's stdin")?.write_all(yaml.as_bytes())?;
        ensure!(child.wait()?.success(), "kubectl apply of the volumes failed");
        Ok(Self { cluster, class, names, _dirs: dirs })
    }
}

impl Drop for OwnVolumes {
    fn drop(&mut self) {
        if let Ok(mut kubectl) = self.cluster.kubectl() {
            let _ = kubectl.args(["delete", "pv", "--wait=false"]).args(&self.names).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_upgrade_with_ten_servers_replaces_the_idle_ones_and_none_that_has_players() -> Result<()> {
    const SERVERS: usize = 10;
    let release = Release::install("e2e-ten", &[]).await?;
    let volumes = OwnVolumes::new(release.cluster, SERVERS)?;
    let names: Vec<String> = (0..SERVERS).map(|i| format!("server-{i}")).collect();
    let documents: Vec<String> = names.iter().map(|n| release.server_yaml_in(n, Some(&volumes.class))).collect();
    let applied = std::time::Instant::now();
    chart_bed::kubectl_apply(release.cluster, &release.ns, &documents.join("---\n"))?;
    for name in &names {
        release.wait_ready(name).await?;
    }
    let all_ready = applied.elapsed();

    // Players on three of them.
    let busy = ["server-1", "server-4", "server-7"];
    for (i, name) in busy.iter().enumerate() {
        let joined = release.exec(name, &["console", "fake-join", &format!("player{i}")])?;
        ensure!(joined.contains("joined the game"), "fake-join on {name}: {joined}");
    }
    for name in busy {
        wait_server(release.cluster, &release.ns, name, "a player in the status", Duration::from_secs(60), |s| {
            players(s) == Some(1)
        })
        .await?;
    }
    let mut before = std::collections::BTreeMap::new();
    for name in &names {
        let pod = chart_bed::live_pod(&release.ns, name).await?.with_context(|| format!("{name}'s pod"))?;
        before.insert(name.clone(), (pod.metadata.uid.clone(), jvm(&release, name)?.0));
    }

    let (values, new_image) = upgraded_values(&release)?;
    let old_image = release.cluster.nodes()?.image.clone();
    let upgraded = std::time::Instant::now();
    chart_bed::helm(release.cluster, &release.ns, "upgrade", &release.name, &values)?;

    // Each idle server gets a pod of the new template and is Ready again.
    for name in names.iter().filter(|n| !busy.contains(&n.as_str())) {
        let old = before[name].0.clone();
        let pod = chart_bed::eventually(&format!("a new pod for {name}"), Duration::from_secs(300), || async {
            Ok(chart_bed::live_pod(&release.ns, name).await?.filter(|p| p.metadata.uid != old))
        })
        .await?;
        assert_eq!(pod_image(&pod).as_deref(), Some(new_image.as_str()), "{name}");
        wait_server(release.cluster, &release.ns, name, "Ready on the new pod", Duration::from_secs(300), |s| {
            ready(s) && pending(s).is_some_and(|(status, _)| status == "False")
        })
        .await?;
    }
    let idle_replaced = upgraded.elapsed();

    // Not one with a player was restarted: the same pod runs the same JVM, the upgrade held.
    for name in busy {
        let server =
            wait_server(release.cluster, &release.ns, name, "UpgradePending=True", Duration::from_secs(60), |s| {
                pending(s).is_some_and(|(status, _)| status == "True")
            })
            .await?;
        assert_eq!(pending(&server).map(|(_, r)| r).as_deref(), Some("PlayersOnline"), "{name}");
        let pod = chart_bed::live_pod(&release.ns, name).await?.with_context(|| format!("{name}'s pod"))?;
        assert_eq!(pod.metadata.uid, before[name].0, "{name} was restarted with a player online");
        assert_eq!(pod_image(&pod).as_deref(), Some(old_image.as_str()), "{name}");
        assert_eq!(jvm(&release, name)?.0, before[name].1, "{name}'s JVM was restarted");
    }
    eprintln!(
        "{SERVERS} servers: all Ready {:.1} s after kubectl apply; the {} idle ones replaced and Ready {:.1} s after helm upgrade",
        all_ready.as_secs_f64(),
        SERVERS - busy.len(),
        idle_replaced.as_secs_f64()
    );
    drop(release);
    Ok(())
}
