//! Test support for the chart's dashboard and alert rules on a real Prometheus (Debian's): the
//! expressions as Grafana and Prometheus would run them, and a Prometheus process with a config,
//! on loopback or inside the node bed's network namespace.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use atlas_testbed::{Processes, free_port};
use serde_json::Value;

use crate::common::{http_get, wait_for};

pub const FILES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/atlas-runner/files");

pub fn alert_rules() -> Result<Value> {
    Ok(serde_yaml::from_str(&std::fs::read_to_string(Path::new(FILES).join("alerts.yaml"))?)?)
}

/// Every alerting rule as (alert name, expression).
pub fn alert_exprs(rules: &Value) -> Vec<(String, String)> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| Some((r["alert"].as_str()?.to_owned(), r["expr"].as_str()?.to_owned())))
        .collect()
}

/// The panels whose series exist once a server runs, has a player and has backed up, and an
/// operator reconciles it: all but those that need a crash, a failure, a rollback or an update
/// check, and [`CONTAINER_PANEL`].
pub const PANELS_OF_A_RUNNING_SERVER: [&str; 18] = [
    "Players online",
    "Phase",
    "Ready",
    "Last ready",
    "CPU",
    "RCON latency (p99)",
    "Newest backup's age",
    "Backup size",
    "Backup duration",
    "Save-off window",
    "Saving off",
    "Upload throughput",
    "Pack version",
    "Pack apply duration (p90)",
    "Reconciles",
    "Servers by phase",
    "Reconcile errors",
    "Restarts",
];

/// The panel whose series come from a kubelet's cAdvisor (the container's memory limit).
pub const CONTAINER_PANEL: &str = "Memory against the container limit";

pub fn dashboard() -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(Path::new(FILES).join("dashboard.json"))?)?)
}

/// Every panel's targets, as (panel title, expression).
pub fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| t["expr"].as_str().map(|e| (title.clone(), e.to_owned())))
        })
        .collect()
}

/// Grafana's variables as a query sees them with "All" selected and a 1 minute interval.
pub fn substitute(expr: &str) -> String {
    expr.replace("${server:regex}", ".+")
        .replace("$namespace", ".+")
        .replace("$server", ".+")
        .replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Prometheus (Debian's) with a config, stopped with the test.
pub struct Prometheus {
    pub processes: Processes,
    /// `ADDRESS:PORT` of its HTTP API.
    pub url: String,
}

impl Prometheus {
    /// Debian's Prometheus on a free loopback port.
    pub fn start(config: &str) -> Result<Self> {
        let program = which("prometheus").context("prometheus is missing: `apt-get install prometheus` (Debian)")?;
        Self::start_with(&program, config, &format!("127.0.0.1:{}", free_port()?), None)
    }

    /// The test bed's Prometheus, whose build has the Kubernetes discovery Debian's leaves out,
    /// inside the network namespace `netns` (`nsenter --net`), listening on `listen`: it reaches
    /// nothing but what the namespace routes to.
    pub fn start_in_netns(config: &str, netns: &str, listen: &str) -> Result<Self> {
        Self::start_with(&atlas_testbed::bin("prometheus")?, config, listen, Some(netns))
    }

    fn start_with(program: &Path, config: &str, listen: &str, netns: Option<&str>) -> Result<Self> {
        let mut processes = Processes::new("atlas-prometheus")?;
        let dir = processes.dir().to_path_buf();
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let mut args = vec![
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={listen}"),
            "--log.level=warn".to_owned(),
        ];
        match netns {
            Some(netns) => {
                let nsenter = which("nsenter").context("nsenter (util-linux) is missing")?;
                let mut wrapped = vec![format!("--net={netns}"), program.display().to_string()];
                wrapped.append(&mut args);
                processes.spawn("prometheus", &nsenter, wrapped)?;
            }
            None => processes.spawn("prometheus", program, args)?,
        }
        let url = listen.to_owned();
        let log = dir.join("prometheus.log");
        wait_for("Prometheus ready", Duration::from_secs(60), || {
            processes.check_alive("prometheus").ok()?;
            http_get(&url, "/-/ready").ok().filter(|(code, _)| *code == 200)
        })
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
        Ok(Self { processes, url })
    }

    /// A GET on the HTTP API; `query` is URL-encoded and appended to `path`.
    pub async fn api(&self, path: &str, query: &str) -> Result<Value> {
        let encoded: String = query
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let url = format!("http://{}{path}{encoded}", self.url);
        let response = reqwest::Client::builder().no_proxy().build()?.get(&url).send().await?;
        let code = response.status();
        let body = response.text().await?;
        serde_json::from_str(&body).with_context(|| format!("{path}: {code} {body}"))
    }

    /// Evaluates `expr` now: the result list, or the error Prometheus gives.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let answer = self.api("/api/v1/query?query=", expr).await?;
        if answer["status"] != "success" {
            bail!("{}: {}", answer["errorType"], answer["error"]);
        }
        Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Evaluates every `(title, expr)` of `queries` now, its variables substituted: the titles
    /// whose query returned data, or an error listing each query Prometheus refused.
    pub async fn titles_with_data(&self, queries: &[(String, String)]) -> Result<std::collections::BTreeSet<String>> {
        let mut failures = Vec::new();
        let mut with_data = std::collections::BTreeSet::new();
        for (title, expr) in queries {
            match self.query(&substitute(expr)).await {
                Ok(result) if !result.is_empty() => {
                    with_data.insert(title.clone());
                }
                Ok(_) => {}
                Err(e) => failures.push(format!("{title}: {e}\n  {expr}")),
            }
        }
        if !failures.is_empty() {
            bail!("dashboard queries Prometheus refused:\n{}", failures.join("\n"));
        }
        Ok(with_data)
    }

    /// Every rule Prometheus loaded, as its rules API reports them (health, lastError).
    pub async fn rules(&self) -> Result<Vec<Value>> {
        let answer = self.api("/api/v1/rules", "").await?;
        Ok(answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect())
    }
}
