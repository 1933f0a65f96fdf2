//! The operator against a real API server with no nodes: the test bed's etcd + kube-apiserver, plus
//! kube-controller-manager running only its garbage collector and StatefulSet controller (so owner
//! references really collect children, and StatefulSets really make claims and pods, which stay
//! Pending without a node). The operator runs as a process, as `atlas-runner operator`, with a
//! ServiceAccount token bound to the ClusterRole the chart renders and nothing else.
//!
//! The agent is not in these pods (nothing runs them); where a test needs what the agent reports
//! (players online), it writes that status field as the agent would, under the agent's field manager.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use atlas_runner::api::MinecraftServer;
use atlas_testbed::{Processes, TestCluster, TestNamespace, bin, free_port, unique};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

mod common;
use common::run_piped;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/atlas-runner");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
const IMAGE: &str = "atlas-runner:test";

// ---------------------------------------------------------------------------------------------------
// Support: the chart installed into a namespace, a token for its ServiceAccount, the operator process

/// Waits for an async check with a deadline.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            let why = last_error.map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `helm template` of the chart, with the CRD, as release `release` in `namespace`.
fn render(cluster: &TestCluster, release: &str, namespace: &str, values: &[&str]) -> Result<String> {
    let mut cmd = cluster.helm()?;
    cmd.args(["template", release, CHART, "--namespace", namespace, "--include-crds"]);
    for value in values {
        cmd.args(["--set", value]);
    }
    run_piped(&mut cmd, None)
}

/// The chart installed into a fresh namespace (objects applied server-side by kubectl, as the
/// plain-YAML install does), and a kubeconfig holding a token of its ServiceAccount.
struct Installed<'c> {
    cluster: &'c TestCluster,
    ns: TestNamespace,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl<'c> Installed<'c> {
    async fn new(prefix: &str, values: &[&str]) -> Result<Installed<'static>> {
        Installed::on(TestCluster::shared().await?, prefix, values).await
    }

    /// [`Installed::new`] on `cluster` rather than the run's shared one.
    async fn on(cluster: &'c TestCluster, prefix: &str, values: &[&str]) -> Result<Self> {
        let ns = cluster.namespace(prefix).await?;
        let release = ns.name.clone();
        let mut all = vec![format!("watchNamespace={}", ns.name)];
        all.extend(values.iter().map(|v| (*v).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let rendered = render(cluster, &release, &ns.name, &all)?;
        run_piped(
            cluster.kubectl()?.args(["apply", "--server-side", "--force-conflicts", "-f", "-"]),
            Some(&rendered),
        )?;
        run_piped(
            cluster.kubectl()?.args([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/minecraftservers.atlas.dev",
            ]),
            None,
        )?;
        let dir = std::env::temp_dir().join(unique("atlas-operator-test"));
        std::fs::create_dir_all(&dir)?;
        let account = format!("{release}-atlas-runner");
        let token = run_piped(
            cluster.kubectl()?.args(["create", "token", &account, "-n", &ns.name, "--duration", "2h"]),
            None,
        )?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, token_kubeconfig(cluster.kubeconfig(), token.trim())?)?;
        Ok(Self { cluster, ns, dir, kubeconfig })
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ns.client.clone(), &self.ns.name)
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        run_piped(self.cluster.kubectl()?.args(args).args(["-n", &self.ns.name]), stdin)
    }

    fn start_operator(&self, extra: &[&str]) -> Result<Operator> {
        Operator::start(self, extra)
    }
}

/// A kubeconfig for the same API server and CA as the admin one, authenticating with `token`.
fn token_kubeconfig(admin: &Path, token: &str) -> Result<String> {
    let config: Value = serde_yaml::from_str(&std::fs::read_to_string(admin)?)?;
    let cluster = &config["clusters"][0]["cluster"];
    let server = cluster["server"].as_str().context("admin kubeconfig server")?;
    let ca = cluster["certificate-authority"].as_str().context("admin kubeconfig CA")?;
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: bed\n  cluster: {{server: {server}, certificate-authority: {ca}}}\n\
         users:\n- name: operator\n  user: {{token: {token}}}\ncontexts:\n- name: operator\n  context: {{cluster: bed, user: operator}}\n\
         current-context: operator\n"
    ))
}

/// `atlas-runner operator` as a child process with the chart's credentials; logs to a file.
struct Operator {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl Operator {
    fn start(installed: &Installed<'_>, extra: &[&str]) -> Result<Self> {
        Self::start_with_image(installed, IMAGE, extra)
    }

    fn start_with_image(installed: &Installed<'_>, image: &str, extra: &[&str]) -> Result<Self> {
        Self::start_with(installed, &installed.kubeconfig, image, extra)
    }

    fn start_with(installed: &Installed<'_>, kubeconfig: &Path, image: &str, extra: &[&str]) -> Result<Self> {
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let log = installed.dir.join(format!("operator-{}.log", unique("run")));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_atlas-runner"))
            .args(["--log-format", "json", "operator", "--agent-image", image])
            .args(["--watch-namespace", &installed.ns.name, "--lease-namespace", &installed.ns.name])
            .args(["--metrics-addr", &metrics])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", std::env::var("ATLAS_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info".to_owned()))
            .env_remove("POD_NAMESPACE")
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()?;
        Ok(Self { child, log, metrics })
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> Result<String> {
        http_get(&self.metrics, "/metrics")
    }

    /// The value of a sample line (`name{labels}`) on /metrics.
    fn sample(&self, series: &str) -> Result<f64> {
        let body = self.metrics()?;
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .with_context(|| format!("no {series} on /metrics:\n{body}"))?
            .parse()
            .map_err(|e| anyhow!("{series}: {e}"))
    }

    fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let _ = Command::new("kill").args(["-s", "TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the operator did not stop within 20 s of SIGTERM:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The test harness shows this only for a test that failed.
        let logs = self.logs();
        let tail: Vec<&str> = logs.lines().rev().take(400).collect();
        eprintln!("operator log (last 40 lines):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
    ensure!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body.to_owned())
}

/// kube-controller-manager with only the garbage collector and the StatefulSet controller, once
/// per test process. It takes the usual leader Lease: a bed that already runs a controller-manager
/// (a node bed) keeps its own, and this one stands by.
fn controllers(cluster: &TestCluster) -> Result<()> {
    static STARTED: OnceLock<std::result::Result<Mutex<Processes>, String>> = OnceLock::new();
    let started = STARTED.get_or_init(|| {
        let start = || -> Result<Processes> {
            let mut processes = Processes::new("atlas-kcm")?;
            processes.spawn(
                "kube-controller-manager",
                &bin("kube-controller-manager")?,
                [
                    format!("--kubeconfig={}", cluster.kubeconfig().display()),
                    "--controllers=garbagecollector,statefulset".to_owned(),
                    "--secure-port=0".to_owned(),
                    "--use-service-account-credentials=false".to_owned(),
                    "--concurrent-gc-syncs=5".to_owned(),
                ],
            )?;
            Ok(processes)
        };
        start().map(Mutex::new).map_err(|e| format!("{e:#}"))
    });
    started.as_ref().map(|_| ()).map_err(|e| anyhow!("starting kube-controller-manager: {e}"))
}

fn example(name: &str) -> Result<String> {
    Ok(std::fs::read_to_string(Path::new(EXAMPLES).join(name))?)
}

fn server_doc(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer", "metadata": {"name": name}, "spec": spec})
}

/// Server-side apply of a MinecraftServer as a user (`kubectl apply --server-side`) would.
async fn apply_server(installed: &Installed<'_>, doc: &Value) -> Result<MinecraftServer> {
    let name = doc["metadata"]["name"].as_str().context("a name")?.to_owned();
    let api: Api<MinecraftServer> = installed.api();
    Ok(api.patch(&name, &PatchParams::apply("user").force(), &Patch::Apply(doc)).await?)
}

async fn wait_object<K>(api: &Api<K>, name: &str, what: &str, check: impl Fn(&K) -> bool) -> Result<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(what, Duration::from_secs(60), || async { Ok(api.get_opt(name).await?.filter(|o| check(o))) }).await
}

fn condition(server: &MinecraftServer, kind: &str) -> Option<(String, String, String)> {
    server
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_condition(
    installed: &Installed<'_>,
    name: &str,
    kind: &str,
    status: &str,
    reason: &str,
) -> Result<MinecraftServer> {
    let api: Api<MinecraftServer> = installed.api();
    wait_object(&api, name, &format!("{name}: {kind}={status} ({reason})"), |s| {
        condition(s, kind).is_some_and(|(st, r, _)| st == status && r == reason)
    })
    .await
}

fn pod_spec(sts: &StatefulSet) -> Result<&k8s_openapi::api::core::v1::PodSpec> {
    sts.spec.as_ref().and_then(|s| s.template.spec.as_ref()).context("a pod template")
}

fn mount_of<'a>(spec: &'a k8s_openapi::api::core::v1::PodSpec, secret: &str) -> Option<&'a str> {
    let volume = spec
        .volumes
        .as_ref()?
        .iter()
        .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret))?;
    spec.containers[0]
        .volume_mounts
        .as_ref()?
        .iter()
        .find(|m| m.name == volume.name && m.read_only == Some(true))
        .map(|m| m.mount_path.as_str())
}

fn env_of(spec: &k8s_openapi::api::core::v1::PodSpec) -> BTreeMap<String, String> {
    spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| {
            let value = e.value.clone().unwrap_or_else(|| {
                let from = e.value_from.as_ref();
                from.and_then(|f| f.field_ref.as_ref().map(|r| format!("fieldRef:{}", r.field_path)))
                    .or_else(|| {
                        from.and_then(|f| f.resource_field_ref.as_ref().map(|r| format!("resource:{}", r.resource)))
                    })
                    .unwrap_or_default()
            });
            (e.name.clone(), value)
        })
        .collect()
}

/// What every server's children hold, whatever the spec: names, owner, labels, the agent's RBAC and
/// the pod as docs/design/pod-contract.md says.
async fn check_contract(installed: &Installed<'_>, server: &MinecraftServer) -> Result<StatefulSet> {
    let name = server.name_any();
    let uid = server.uid().context("a uid")?;
    let owned = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true) && o.kind == "MinecraftServer")
            && meta.labels.as_ref().is_some_and(|l| {
                l.get("app.kubernetes.io/instance") == Some(&name)
                    && l.get("app.kubernetes.io/managed-by").map(String::as_str) == Some("atlas-runner")
            })
    };
    let sts: StatefulSet = wait_object(&installed.api(), &name, &format!("StatefulSet {name}"), |_| true).await?;
    ensure!(owned(&sts.metadata), "{name}: StatefulSet not owned/labelled: {:?}", sts.metadata);
    let managers: Vec<String> =
        sts.metadata.managed_fields.iter().flatten().filter_map(|m| m.manager.clone()).collect();
    ensure!(managers.contains(&"atlas-operator".to_owned()), "{name}: managers {managers:?}");
    let spec = sts.spec.as_ref().context("a StatefulSet spec")?;
    assert_eq!(spec.service_name.as_deref(), Some(format!("{name}-headless").as_str()));
    assert_eq!(spec.update_strategy.as_ref().and_then(|u| u.type_.as_deref()), Some("OnDelete"));
    let claims = spec.volume_claim_templates.as_ref().context("a claim template")?;
    assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));

    let pod = pod_spec(&sts)?;
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some(IMAGE));
    assert_eq!(container.args.as_deref(), Some(&["agent".to_owned()][..]));
    assert_eq!(pod.service_account_name.as_deref(), Some(format!("{name}-agent").as_str()));
    let env = env_of(pod);
    assert_eq!(env.get("ATLAS_SERVER_NAME"), Some(&name));
    assert_eq!(env.get("ATLAS_NAMESPACE").map(String::as_str), Some("fieldRef:metadata.namespace"));
    assert_eq!(env.get("ATLAS_POD_NAME").map(String::as_str), Some("fieldRef:metadata.name"));
    assert_eq!(env.get("ATLAS_DATA_DIR").map(String::as_str), Some("/data"));
    assert_eq!(env.get("ATLAS_SECRETS_DIR").map(String::as_str), Some("/var/run/atlas/secrets"));
    assert_eq!(env.get("ATLAS_MEMORY_LIMIT_BYTES").map(String::as_str), Some("resource:limits.memory"));
    // The operator's TZ (UTC in these tests, as Operator::start sets it): both windows in one zone.
    assert_eq!(env.get("TZ").map(String::as_str), Some("UTC"));
    let security = container.security_context.as_ref().context("a security context")?;
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_owned()]));
    let pod_security = pod.security_context.as_ref().context("a pod security context")?;
    assert_eq!((pod_security.run_as_user, pod_security.fs_group), (Some(10001), Some(10001)));
    assert_eq!(pod_security.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
    for (probe, path) in [
        (&container.startup_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
        (&container.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).context("an HTTP probe")?;
        assert_eq!(get.path.as_deref(), Some(path));
    }
    let rcon = env.get("ATLAS_RCON_PASSWORD_FILE").context("ATLAS_RCON_PASSWORD_FILE")?;
    let rcon_secret = rcon.trim_start_matches("/var/run/atlas/secrets/").split('/').next().unwrap_or_default();
    ensure!(mount_of(pod, rcon_secret).is_some(), "{name}: the RCON Secret {rcon_secret} is not mounted");

    let agent = format!("{name}-agent");
    let sa: ServiceAccount = wait_object(&installed.api(), &agent, "the agent's ServiceAccount", |_| true).await?;
    ensure!(owned(&sa.metadata));
    let role: Role = wait_object(&installed.api(), &agent, "the agent's Role", |_| true).await?;
    ensure!(owned(&role.metadata));
    let rules = serde_json::to_value(&role.rules)?;
    assert_eq!(
        rules,
        json!([
            {"apiGroups": ["atlas.dev"], "resources": ["minecraftservers"], "resourceNames": [name], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["atlas.dev"], "resources": ["minecraftservers/status"], "resourceNames": [name], "verbs": ["patch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ]),
        "{name}: the agent's Role"
    );
    let binding: RoleBinding = wait_object(&installed.api(), &agent, "the agent's RoleBinding", |_| true).await?;
    ensure!(owned(&binding.metadata));
    assert_eq!(binding.role_ref.name, agent);
    let headless: Service =
        wait_object(&installed.api(), &format!("{name}-headless"), "the headless Service", |_| true).await?;
    ensure!(owned(&headless.metadata));
    assert_eq!(headless.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()), Some("None"));
    let ports: Vec<_> = headless
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.name)
        .collect();
    assert_eq!(ports, ["minecraft", "metrics"]);
    let game: Service = wait_object(&installed.api(), &name, "the game Service", |_| true).await?;
    ensure!(owned(&game.metadata));
    Ok(sts)
}

async fn create_secret(installed: &Installed<'_>, name: &str, data: &[(&str, &str)]) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": data.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
    }))?;
    installed.api::<Secret>().create(&PostParams::default(), &secret).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn the_operator_builds_each_examples_children_with_only_the_charts_rbac() -> Result<()> {
    let installed = Installed::new("op-examples", &[]).await?;
    create_secret(&installed, "pack-hub", &[("token", "hub-token")]).await?;
    create_secret(&installed, "backup-s3", &[("AWS_ACCESS_KEY_ID", "id"), ("AWS_SECRET_ACCESS_KEY", "key")]).await?;
    let _operator = installed.start_operator(&[])?;
    let mut servers = BTreeMap::new();
    for file in ["vanilla.yaml", "paper-hub.yaml", "fabric-mrpack.yaml", "backup-s3.yaml", "paused.yaml"] {
        installed.kubectl(&["apply", "--server-side", "-f", "-"], Some(&example(file)?))?;
        let doc: Value = serde_yaml::from_str(&example(file)?)?;
        let name = doc["metadata"]["name"].as_str().context("a name")?.to_owned();
        servers.insert(file, name);
    }
    let api: Api<MinecraftServer> = installed.api();
    for (file, name) in &servers {
        let server = api.get(name).await?;
        let sts = check_contract(&installed, &server).await.with_context(|| format!("examples/{file}"))?;
        let spec = sts.spec.as_ref().context("spec")?;
        let pod = pod_spec(&sts)?;
        let claim = &spec.volume_claim_templates.as_ref().context("claims")?[0];
        let claim_size = claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone());
        let game: Service = installed.api().get(name).await?;
        let game_type = game.spec.as_ref().and_then(|s| s.type_.clone());
        match *file {
            "vanilla.yaml" => {
                assert_eq!(spec.replicas, Some(1));
                assert_eq!(claim_size.as_deref(), Some("10Gi"));
                assert_eq!(game_type.as_deref(), Some("ClusterIP"));
                // No RCON Secret named: one is generated, once, with a strong password.
                let secret: Secret = installed.api().get("vanilla-rcon").await?;
                let password = secret.data.as_ref().and_then(|d| d.get("password")).context("a password")?;
                assert_eq!(password.0.len(), 32);
                assert_eq!(mount_of(pod, "vanilla-rcon"), Some("/var/run/atlas/secrets/vanilla-rcon"));
            }
            "paper-hub.yaml" => {
                assert_eq!(mount_of(pod, "pack-hub"), Some("/var/run/atlas/secrets/pack-hub"));
                let limits = pod.containers[0].resources.as_ref().and_then(|r| r.limits.clone()).unwrap_or_default();
                assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("6Gi"));
                assert_eq!(game_type.as_deref(), Some("LoadBalancer"));
                assert_eq!(claim_size.as_deref(), Some("20Gi"));
            }
            "fabric-mrpack.yaml" => assert_eq!(claim_size.as_deref(), Some("30Gi")),
            "backup-s3.yaml" => assert_eq!(mount_of(pod, "backup-s3"), Some("/var/run/atlas/secrets/backup-s3")),
            "paused.yaml" => {
                assert_eq!(spec.replicas, Some(0));
                assert_eq!(claim.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()), Some("standard"));
            }
            other => bail!("no expectations for {other}"),
        }
        let policy = spec.persistent_volume_claim_retention_policy.as_ref().context("a retention policy")?;
        assert_eq!((policy.when_deleted.as_deref(), policy.when_scaled.as_deref()), (Some("Retain"), Some("Retain")));
        let server = wait_condition(&installed, name, "SecretsResolved", "True", "Resolved").await?;
        assert_eq!(condition(&server, "UpgradePending").map(|c| c.0), Some("False".to_owned()));
        // No node runs the pod: not ready (Progressing without a StatefulSet controller, PodNotReady
        // when another test of this process started one).
        let workload = condition(&server, "WorkloadReady").context("WorkloadReady")?;
        let reasons: &[&str] = if *file == "paused.yaml" { &["Paused"] } else { &["Progressing", "PodNotReady"] };
        ensure!(workload.0 == "False" && reasons.contains(&workload.1.as_str()), "{file}: WorkloadReady {workload:?}");
        // The operator wrote its own conditions only: nothing the agent owns.
        let status = server.status.as_ref().context("a status")?;
        assert!(status.phase.is_none() && status.players.is_none(), "{file}: {status:?}");
    }
    Ok(())
}

fn minimal(extra: Value) -> Value {
    let mut spec = json!({"eula": true, "server": {"type": "vanilla", "version": "1.21.4"}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    spec
}

#[tokio::test]
async fn a_spec_change_updates_the_statefulset_and_leaves_the_rcon_secret_alone() -> Result<()> {
    let installed = Installed::new("op-change", &[]).await?;
    let _operator = installed.start_operator(&[])?;
    apply_server(&installed, &server_doc("change", minimal(json!({"resources": {"limits": {"memory": "2Gi"}}}))))
        .await?;
    let sts_api: Api<StatefulSet> = installed.api();
    let before = wait_object(&sts_api, "change", "the StatefulSet", |_| true).await?;
    let secrets: Api<Secret> = installed.api();
    let secret = wait_object(&secrets, "change-rcon", "the RCON Secret", |_| true).await?;

    // A change the agent handles inside the pod (properties) does not touch the pod template: the
    // StatefulSet keeps its generation, so an OnDelete pod is never replaced for it.
    apply_server(
        &installed,
        &server_doc(
            "change",
            minimal(json!({"resources": {"limits": {"memory": "2Gi"}}, "properties": {"motd": "hi"}})),
        ),
    )
    .await?;
    wait_condition(&installed, "change", "SecretsResolved", "True", "Resolved").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sts_api.get("change").await?.metadata.generation, before.metadata.generation);

    // A change the pod needs: the StatefulSet follows, the Service too, the Secret stays as it was.
    apply_server(
        &installed,
        &server_doc(
            "change",
            minimal(
                json!({"resources": {"limits": {"memory": "3Gi"}}, "service": {"type": "NodePort", "nodePort": 31565}}),
            ),
        ),
    )
    .await?;
    let after = wait_object(&sts_api, "change", "the StatefulSet with 3Gi", |s| {
        pod_spec(s)
            .ok()
            .and_then(|p| p.containers[0].resources.as_ref()?.limits.as_ref()?.get("memory").cloned())
            .map(|q| q.0)
            == Some("3Gi".to_owned())
    })
    .await?;
    assert!(after.metadata.generation > before.metadata.generation);
    let service: Api<Service> = installed.api();
    wait_object(&service, "change", "a NodePort Service on 31565", |s| {
        let spec = s.spec.as_ref();
        spec.and_then(|s| s.type_.as_deref()) == Some("NodePort")
            && spec.and_then(|s| s.ports.as_ref()).is_some_and(|p| p[0].node_port == Some(31565))
    })
    .await?;
    let unchanged = secrets.get("change-rcon").await?;
    assert_eq!(unchanged.metadata.uid, secret.metadata.uid);
    assert_eq!(
        unchanged.metadata.resource_version, secret.metadata.resource_version,
        "the RCON Secret was written again"
    );
    assert_eq!(unchanged.data, secret.data);

    // Back to ClusterIP: the node port the operator set goes with it.
    apply_server(&installed, &server_doc("change", minimal(json!({"resources": {"limits": {"memory": "3Gi"}}}))))
        .await?;
    wait_object(&service, "change", "a ClusterIP Service", |s| {
        s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ClusterIP")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn paused_scales_to_zero_and_keeps_the_claim() -> Result<()> {
    let installed = Installed::new("op-pause", &[]).await?;
    controllers(installed.cluster)?;
    let _operator = installed.start_operator(&[])?;
    apply_server(&installed, &server_doc("pausing", minimal(json!({"storage": {"size": "1Gi"}})))).await?;
    // The StatefulSet controller makes the claim and the pod (which stays Pending: no node).
    let claims: Api<PersistentVolumeClaim> = installed.api();
    let claim = wait_object(&claims, "data-pausing-0", "the claim", |_| true).await?;
    let pods: Api<Pod> = installed.api();
    wait_object(&pods, "pausing-0", "the pod", |_| true).await?;

    apply_server(&installed, &server_doc("pausing", minimal(json!({"storage": {"size": "1Gi"}, "paused": true}))))
        .await?;
    let sts_api: Api<StatefulSet> = installed.api();
    wait_object(&sts_api, "pausing", "replicas 0", |s| s.spec.as_ref().and_then(|s| s.replicas) == Some(0)).await?;
    eventually("the pod gone", Duration::from_secs(60), || async {
        Ok(pods.get_opt("pausing-0").await?.is_none().then_some(()))
    })
    .await?;
    wait_condition(&installed, "pausing", "WorkloadReady", "False", "Paused").await?;
    let kept = claims.get("data-pausing-0").await?;
    assert_eq!(kept.metadata.uid, claim.metadata.uid, "the claim was replaced");
    assert!(kept.metadata.deletion_timestamp.is_none(), "the claim is being deleted");

    // Unpaused: the same claim comes back into use.
    apply_server(&installed, &server_doc("pausing", minimal(json!({"storage": {"size": "1Gi"}, "paused": false}))))
        .await?;
    wait_object(&pods, "pausing-0", "the pod again", |_| true).await?;
    assert_eq!(claims.get("data-pausing-0").await?.metadata.uid, claim.metadata.uid);
    Ok(())
}

#[tokio::test]
async fn deleting_a_server_collects_its_children_and_keeps_the_claim_unless_asked() -> Result<()> {
    let installed = Installed::new("op-delete", &[]).await?;
    controllers(installed.cluster)?;
    let _operator = installed.start_operator(&[])?;
    apply_server(&installed, &server_doc("kept", minimal(json!({"storage": {"size": "1Gi"}})))).await?;
    apply_server(
        &installed,
        &server_doc("gone", minimal(json!({"storage": {"size": "1Gi", "deleteWithServer": true}}))),
    )
    .await?;
    let claims: Api<PersistentVolumeClaim> = installed.api();
    for name in ["kept", "gone"] {
        wait_object(&claims, &format!("data-{name}-0"), "the claim", |_| true).await?;
        wait_object(&installed.api::<Secret>(), &format!("{name}-rcon"), "the RCON Secret", |_| true).await?;
        wait_object(&installed.api::<RoleBinding>(), &format!("{name}-agent"), "the RoleBinding", |_| true).await?;
    }
    let kept_claim = claims.get("data-kept-0").await?;
    let api: Api<MinecraftServer> = installed.api();
    for name in ["kept", "gone"] {
        api.delete(name, &DeleteParams::default()).await?;
    }
    for name in ["kept", "gone"] {
        let agent = format!("{name}-agent");
        eventually(&format!("{name}'s children collected"), Duration::from_secs(90), || async {
            let left = [
                installed.api::<StatefulSet>().get_opt(name).await?.map(|_| "StatefulSet"),
                installed.api::<Service>().get_opt(name).await?.map(|_| "Service"),
                installed.api::<Service>().get_opt(&format!("{name}-headless")).await?.map(|_| "headless Service"),
                installed.api::<ServiceAccount>().get_opt(&agent).await?.map(|_| "ServiceAccount"),
                installed.api::<Role>().get_opt(&agent).await?.map(|_| "Role"),
                installed.api::<RoleBinding>().get_opt(&agent).await?.map(|_| "RoleBinding"),
                installed.api::<Secret>().get_opt(&format!("{name}-rcon")).await?.map(|_| "RCON Secret"),
                installed.api::<Pod>().get_opt(&format!("{name}-0")).await?.map(|_| "pod"),
            ];
            Ok(left.iter().all(Option::is_none).then_some(()))
        })
        .await?;
    }
    // The world's claim outlives its server by default; `deleteWithServer` lets it go.
    eventually("data-gone-0 deleted", Duration::from_secs(90), || async {
        Ok(claims.get_opt("data-gone-0").await?.is_none_or(|c| c.metadata.deletion_timestamp.is_some()).then_some(()))
    })
    .await?;
    let kept = claims.get("data-kept-0").await?;
    assert_eq!(kept.metadata.uid, kept_claim.metadata.uid);
    assert!(kept.metadata.deletion_timestamp.is_none());
    Ok(())
}

async fn events_for(installed: &Installed<'_>, name: &str) -> Result<Vec<Event>> {
    let events: Api<Event> = installed.api();
    let list = events.list(&ListParams::default()).await?;
    Ok(list.items.into_iter().filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)).collect())
}

#[tokio::test]
async fn a_missing_secret_is_a_condition_and_an_event_while_others_reconcile() -> Result<()> {
    let installed = Installed::new("op-secret", &[]).await?;
    let _operator = installed.start_operator(&[])?;
    let hub = json!({"pack": {"source": {"hub": {"url": "https://hub.example", "pack": "p", "tokenSecretRef": {"name": "hub-token", "key": "token"}}}}});
    apply_server(&installed, &server_doc("broken", minimal(hub.clone()))).await?;
    apply_server(&installed, &server_doc("healthy", minimal(json!({})))).await?;

    let broken = wait_condition(&installed, "broken", "SecretsResolved", "False", "SecretMissing").await?;
    let message = condition(&broken, "SecretsResolved").map(|c| c.2).unwrap_or_default();
    assert!(message.contains("hub-token") && message.contains("spec.pack.source.hub.tokenSecretRef"), "{message}");
    assert_eq!(condition(&broken, "WorkloadReady").map(|c| c.1).as_deref(), Some("SecretsUnresolved"));
    // The pod is not created with a volume that cannot mount: no StatefulSet yet.
    assert!(installed.api::<StatefulSet>().get_opt("broken").await?.is_none());
    let warning = eventually("a SecretMissing Event", Duration::from_secs(30), || async {
        Ok(events_for(&installed, "broken").await?.into_iter().find(|e| e.reason.as_deref() == Some("SecretMissing")))
    })
    .await?;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(warning.note.as_deref().is_some_and(|n| n.contains("hub-token")));

    // The other server is not held up.
    check_contract(&installed, &installed.api::<MinecraftServer>().get("healthy").await?).await?;
    wait_condition(&installed, "healthy", "SecretsResolved", "True", "Resolved").await?;

    // A Secret without the key is named as such; with it, the StatefulSet appears.
    create_secret(&installed, "hub-token", &[("other", "x")]).await?;
    wait_condition(&installed, "broken", "SecretsResolved", "False", "SecretKeyMissing").await?;
    installed.api::<Secret>().delete("hub-token", &DeleteParams::default()).await?;
    create_secret(&installed, "hub-token", &[("token", "t")]).await?;
    wait_condition(&installed, "broken", "SecretsResolved", "True", "Resolved").await?;
    let sts = check_contract(&installed, &installed.api::<MinecraftServer>().get("broken").await?).await?;
    assert_eq!(mount_of(pod_spec(&sts)?, "hub-token"), Some("/var/run/atlas/secrets/hub-token"));
    eventually("a SecretsResolved Event", Duration::from_secs(30), || async {
        Ok(events_for(&installed, "broken").await?.into_iter().find(|e| e.reason.as_deref() == Some("SecretsResolved")))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_idle_resync_writes_nothing() -> Result<()> {
    let installed = Installed::new("op-idle", &[]).await?;
    // The StatefulSet controller makes the pods and the StatefulSets' status: the rounds they start
    // (a pod's event, a StatefulSet's status) must write nothing either.
    controllers(installed.cluster)?;
    let operator = installed.start_operator(&["--resync-seconds", "3"])?;
    for i in 0..5 {
        let extra =
            json!({"service": {"type": "NodePort"}, "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}});
        apply_server(&installed, &server_doc(&format!("idle-{i}"), minimal(extra))).await?;
    }
    for i in 0..5 {
        wait_condition(&installed, &format!("idle-{i}"), "SecretsResolved", "True", "Resolved").await?;
    }
    let pods: Api<Pod> = installed.api();
    for i in 0..5 {
        wait_object(&pods, &format!("idle-{i}-0"), "the pod", |_| true).await?;
    }
    // Let the first rounds (and the reconciles their own writes trigger) settle.
    let writes = |op: &Operator| -> Result<f64> {
        ["apply", "create", "delete", "status", "event"]
            .iter()
            .map(|k| op.sample(&format!("atlas_operator_api_writes_total{{kind=\"{k}\"}}")))
            .sum()
    };
    // The first rounds (and the rounds their own writes trigger) settle within a few seconds:
    // wait until a whole resync period passes without a write.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut settled = writes(&operator)?;
    loop {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let now = writes(&operator)?;
        if now == settled {
            break;
        }
        ensure!(Instant::now() < deadline, "the operator kept writing for a minute:\n{}", operator.logs());
        settled = now;
    }
    let reconciles = operator.sample("atlas_operator_reconciles_total")?;
    let versions = |list: Vec<StatefulSet>| list.into_iter().map(|s| s.metadata.resource_version).collect::<Vec<_>>();
    let before = versions(installed.api::<StatefulSet>().list(&ListParams::default()).await?.items);
    // Two resyncs of every server (5 each) at 3 s.
    eventually("two resyncs", Duration::from_secs(30), || {
        let now = operator.sample("atlas_operator_reconciles_total");
        async move { Ok((now? >= reconciles + 10.0).then_some(())) }
    })
    .await?;
    assert_eq!(writes(&operator)?, settled, "an idle resync wrote:\n{}", operator.logs());
    promtool_check(&operator.metrics()?)?;
    assert_eq!(versions(installed.api::<StatefulSet>().list(&ListParams::default()).await?.items), before);

    // Someone else's edit to a field the operator owns is put back at the next round.
    let patch = json!({"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 5}}}});
    installed.api::<StatefulSet>().patch("idle-0", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_object(&installed.api::<StatefulSet>(), "idle-0", "the grace period put back", |s| {
        pod_spec(s).ok().and_then(|p| p.termination_grace_period_seconds) == Some(120)
    })
    .await?;
    Ok(())
}

async fn lease_holder(installed: &Installed<'_>) -> Result<Option<String>> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = installed.api();
    Ok(leases.get_opt("atlas-runner-operator").await?.and_then(|l| l.spec?.holder_identity).filter(|h| !h.is_empty()))
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_the_other_takes_over() -> Result<()> {
    let installed = Installed::new("op-leader", &[]).await?;
    let mut first = installed.start_operator(&[])?;
    let first_holder = eventually("a leader", Duration::from_secs(30), || lease_holder(&installed)).await?;
    let second = installed.start_operator(&[])?;
    eventually("the second replica standing by", Duration::from_secs(30), || {
        let logs = second.logs();
        async move { Ok(logs.contains("another replica leads; standing by").then_some(())) }
    })
    .await?;
    assert_eq!(first.sample("atlas_operator_leader")?, 1.0);
    assert_eq!(second.sample("atlas_operator_leader")?, 0.0);

    // Only the leader reconciles.
    apply_server(&installed, &server_doc("led", minimal(json!({})))).await?;
    wait_condition(&installed, "led", "SecretsResolved", "True", "Resolved").await?;
    assert!(first.logs().contains("\"name\":\"led-agent\""), "the leader did not apply");
    assert!(!second.logs().contains("\"applied\""), "the stand-by applied:\n{}", second.logs());

    // A leader stopped gracefully gives the Lease up; the other takes it at once and works.
    let status = first.stop()?;
    assert!(status.success(), "the leader exited with {status}:\n{}", first.logs());
    assert!(first.logs().contains("released the leader Lease"));
    let second_holder = eventually("a new leader", Duration::from_secs(15), || {
        let holder = lease_holder(&installed);
        let previous = first_holder.clone();
        async move { Ok(holder.await?.filter(|h| *h != previous)) }
    })
    .await?;
    assert!(second.logs().contains(&second_holder), "the new holder is not the second replica");
    apply_server(&installed, &server_doc("led-later", minimal(json!({})))).await?;
    wait_condition(&installed, "led-later", "SecretsResolved", "True", "Resolved").await?;

    // A leader killed outright (no release) is replaced once its Lease runs out (15 s).
    let mut third = installed.start_operator(&[])?;
    eventually("the third replica standing by", Duration::from_secs(30), || {
        let logs = third.logs();
        async move { Ok(logs.contains("another replica leads; standing by").then_some(())) }
    })
    .await?;
    drop(second);
    let third_holder = eventually("a leader after the kill", Duration::from_secs(45), || {
        let holder = lease_holder(&installed);
        let previous = second_holder.clone();
        async move { Ok(holder.await?.filter(|h| *h != previous)) }
    })
    .await?;
    assert!(third.logs().contains(&third_holder));
    assert_eq!(third.sample("atlas_operator_leader")?, 1.0);
    third.stop()?;
    Ok(())
}

/// A loopback TCP proxy to `upstream` that forwards until frozen, then holds every connection open
/// and silent: an API server (or the path to it) that stops answering without closing anything.
struct FreezingProxy {
    address: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    fn start(upstream: std::net::SocketAddr) -> Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = std::net::TcpStream::connect(upstream) else { continue };
                for (mut from, mut to) in
                    [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())]
                        .into_iter()
                        .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut buffer = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buffer) {
                            if n == 0 || flag.load(Ordering::Acquire) {
                                break;
                            }
                            if to.write_all(&buffer[..n]).is_err() {
                                break;
                            }
                        }
                        // Frozen: keep both ends open and say nothing more.
                        while flag.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    });
                }
            }
        });
        Ok(Self { address, frozen })
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::Release);
    }
}

#[tokio::test]
async fn a_leader_whose_api_server_goes_silent_steps_down_before_its_lease_runs_out() -> Result<()> {
    let installed = Installed::new("op-silent", &[]).await?;
    let config = std::fs::read_to_string(&installed.kubeconfig)?;
    let server = config
        .split_whitespace()
        .find_map(|word| word.trim_end_matches(',').strip_prefix("https://").map(str::to_owned))
        .context("the kubeconfig's server")?;
    let upstream: std::net::SocketAddr = server.parse().context("the server address")?;
    let proxy = FreezingProxy::start(upstream)?;
    let proxied = installed.dir.join("kubeconfig-proxied");
    std::fs::write(&proxied, config.replace(&server, &proxy.address.to_string()))?;
    let mut leader = Operator::start_with(&installed, &proxied, IMAGE, &[])?;
    eventually("a leader", Duration::from_secs(30), || lease_holder(&installed)).await?;
    ensure!(leader.child.try_wait()?.is_none(), "the operator exited:\n{}", leader.logs());

    // Every connection goes silent: renewals get no answer. The leader must stop leading before a
    // stand-by may take the Lease (15 s after the last renewal), so it exits within the renew
    // deadline (10 s after the last renewal, which was at most 2 s before the freeze).
    proxy.freeze();
    let frozen_at = Instant::now();
    let status = loop {
        if let Some(status) = leader.child.try_wait()? {
            break status;
        }
        ensure!(
            frozen_at.elapsed() < Duration::from_secs(14),
            "the leader still runs 14 s after its API server went silent:\n{}",
            leader.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "a leader that lost its Lease exits non-zero");
    assert!(leader.logs().contains("renew deadline"), "{}", leader.logs());
    Ok(())
}

#[tokio::test]
async fn a_lease_touched_by_someone_else_stays_with_its_leader() -> Result<()> {
    let installed = Installed::new("op-touched", &[]).await?;
    let mut leader = installed.start_operator(&[])?;
    let holder = eventually("a leader", Duration::from_secs(30), || lease_holder(&installed)).await?;
    // Someone annotates the Lease over and over (as `kubectl annotate` would): renewals that read it
    // before such a write get 409 Conflict, which is no loss of leadership.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = installed.api();
    let until = Instant::now() + Duration::from_secs(8);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let patch = json!({"metadata": {"annotations": {"touched-by": n.to_string()}}});
        leases.patch("atlas-runner-operator", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    ensure!(leader.child.try_wait()?.is_none(), "the leader exited after {n} touches:\n{}", leader.logs());
    assert_eq!(lease_holder(&installed).await?, Some(holder));
    assert_eq!(leader.sample("atlas_operator_leader")?, 1.0);
    leader.stop()?;
    Ok(())
}

/// Writes `status.players` as the agent does (server-side apply on /status as `atlas-agent`).
async fn set_players(installed: &Installed<'_>, name: &str, online: u32) -> Result<()> {
    let api: Api<MinecraftServer> = installed.api();
    let generation = api.get(name).await?.metadata.generation;
    let patch = json!({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer",
        "status": {"players": {"online": online, "max": 20}, "observedGeneration": generation,
                   "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": "ready",
                                   "lastTransitionTime": "2026-12-01T00:00:00Z", "observedGeneration": generation}]}});
    api.patch_status(name, &PatchParams::apply("atlas-agent").force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Marks pod `NAME-0` Running and Ready as a kubelet would (the bed runs none), and waits until
/// the StatefulSet counts it ready.
async fn pod_ready(installed: &Installed<'_>, name: &str) -> Result<()> {
    let pods: Api<Pod> = installed.api();
    let patch = json!({"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T00:00:00Z"}]}});
    pods.patch_status(&format!("{name}-0"), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let sts_api: Api<StatefulSet> = installed.api();
    wait_object(&sts_api, name, "the pod counted ready", |s| {
        s.status.as_ref().and_then(|st| st.ready_replicas).unwrap_or(0) == 1
    })
    .await?;
    Ok(())
}

fn revision(pod: &Pod) -> Option<String> {
    pod.labels().get("controller-revision-hash").cloned()
}

#[tokio::test]
async fn a_new_image_replaces_the_pod_only_once_nobody_is_online() -> Result<()> {
    let installed = Installed::new("op-upgrade", &[]).await?;
    controllers(installed.cluster)?;
    let mut operator = installed.start_operator(&[])?;
    apply_server(&installed, &server_doc("upgraded", minimal(json!({"storage": {"size": "1Gi"}})))).await?;
    let pods: Api<Pod> = installed.api();
    let old = wait_object(&pods, "upgraded-0", "the pod", |_| true).await?;
    pod_ready(&installed, "upgraded").await?;
    set_players(&installed, "upgraded", 2).await?;

    // `helm upgrade` to a new image restarts the operator with another ATLAS_AGENT_IMAGE.
    operator.stop()?;
    let operator = Operator::start_with_image(&installed, "atlas-runner:next", &[])?;
    let sts_api: Api<StatefulSet> = installed.api();
    let sts = wait_object(&sts_api, "upgraded", "the new template observed", |s| {
        pod_spec(s).ok().and_then(|p| p.containers[0].image.clone()).as_deref() == Some("atlas-runner:next")
            && s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation
    })
    .await?;
    let new_revision = sts.status.as_ref().and_then(|s| s.update_revision.clone()).context("an update revision")?;
    assert_ne!(Some(new_revision.clone()), revision(&old));
    let pending = wait_condition(&installed, "upgraded", "UpgradePending", "True", "PlayersOnline").await?;
    let message = condition(&pending, "UpgradePending").map(|c| c.2).unwrap_or_default();
    assert!(message.contains("2 players"), "{message}");
    eventually("an UpgradePending Event", Duration::from_secs(30), || async {
        Ok(events_for(&installed, "upgraded")
            .await?
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("UpgradePending")))
    })
    .await?;
    // Players online: the old pod keeps running (OnDelete; the operator waits).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pods.get("upgraded-0").await?.metadata.uid,
        old.metadata.uid,
        "the pod was replaced with players online"
    );
    assert_eq!(operator.sample("atlas_operator_pods_replaced_total")?, 0.0);
    assert_eq!(operator.sample("atlas_operator_upgrades_pending")?, 1.0);

    // The last player leaves: the pod is replaced and comes back with the new template.
    set_players(&installed, "upgraded", 0).await?;
    let new = wait_object(&pods, "upgraded-0", "the pod on the new revision", |p| {
        p.metadata.uid != old.metadata.uid && revision(p).as_deref() == Some(new_revision.as_str())
    })
    .await?;
    assert_eq!(new.spec.as_ref().map(|s| s.containers[0].image.clone()), Some(Some("atlas-runner:next".to_owned())));
    wait_condition(&installed, "upgraded", "UpgradePending", "False", "UpToDate").await?;
    assert_eq!(operator.sample("atlas_operator_pods_replaced_total")?, 1.0);
    eventually("a ReplacingPod Event", Duration::from_secs(30), || async {
        Ok(events_for(&installed, "upgraded").await?.into_iter().find(|e| e.reason.as_deref() == Some("ReplacingPod")))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_upgrade_window_holds_the_pod_outside_it() -> Result<()> {
    let installed = Installed::new("op-window", &[]).await?;
    controllers(installed.cluster)?;
    let mut operator = installed.start_operator(&[])?;
    // A window that is never now: an hour that ended a minute ago, on today's weekday only.
    let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
    let end = now.checked_sub(jiff::SignedDuration::from_mins(1))?;
    let start = end.checked_sub(jiff::SignedDuration::from_hours(1))?;
    // The days name the day a window opens on.
    let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][start.weekday().to_monday_zero_offset() as usize];
    let window = format!("{day} {:02}:{:02}-{:02}:{:02}", start.hour(), start.minute(), end.hour(), end.minute());
    let spec = minimal(json!({"storage": {"size": "1Gi"}, "upgrade": {"window": window, "requireNoPlayers": true}}));
    apply_server(&installed, &server_doc("windowed", spec)).await?;
    let pods: Api<Pod> = installed.api();
    let old = wait_object(&pods, "windowed-0", "the pod", |_| true).await?;
    pod_ready(&installed, "windowed").await?;
    set_players(&installed, "windowed", 0).await?;
    operator.stop()?;
    // The operator reads the window in its own time zone: UTC here, as the chart's default.
    let _operator = Operator::start_with_image(&installed, "atlas-runner:next", &[])?;
    let pending = wait_condition(&installed, "windowed", "UpgradePending", "True", "OutsideWindow").await?;
    let message = condition(&pending, "UpgradePending").map(|c| c.2).unwrap_or_default();
    assert!(message.contains(&window), "{message}");
    assert_eq!(pods.get("windowed-0").await?.metadata.uid, old.metadata.uid);

    // The window made to include now: replaced.
    let spec = minimal(json!({"storage": {"size": "1Gi"}, "upgrade": {"window": "00:00-00:00"}}));
    apply_server(&installed, &server_doc("windowed", spec)).await?;
    // The agent reports on the new generation: until it does, its count is not trusted.
    wait_condition(&installed, "windowed", "UpgradePending", "True", "PlayersUnknown").await?;
    assert_eq!(pods.get("windowed-0").await?.metadata.uid, old.metadata.uid);
    set_players(&installed, "windowed", 0).await?;
    wait_object(&pods, "windowed-0", "the replaced pod", |p| p.metadata.uid != old.metadata.uid).await?;
    Ok(())
}

#[tokio::test]
async fn a_pod_that_does_not_serve_is_replaced_at_once_whatever_its_last_status_said() -> Result<()> {
    let installed = Installed::new("op-down", &[]).await?;
    controllers(installed.cluster)?;
    let mut operator = installed.start_operator(&[])?;
    let spec = minimal(json!({"storage": {"size": "1Gi"}, "upgrade": {"window": "Mon 03:00-03:01"}}));
    apply_server(&installed, &server_doc("down", spec)).await?;
    let pods: Api<Pod> = installed.api();
    let old = wait_object(&pods, "down-0", "the pod", |_| true).await?;
    // The agent's last status said 3 players and Ready, then it died: the pod never became (or
    // no longer is) Ready, so nobody can be playing on it.
    set_players(&installed, "down", 3).await?;
    operator.stop()?;
    let _operator = Operator::start_with_image(&installed, "atlas-runner:next", &[])?;
    wait_object(&pods, "down-0", "the pod replaced outside the window", |p| p.metadata.uid != old.metadata.uid).await?;
    Ok(())
}

/// Marks pod `NAME-0` as a kubelet does when its readiness probe fails while its container keeps
/// running (started ten minutes before): Running, Ready False since `since`. Waits until the
/// StatefulSet counts it not ready.
async fn pod_not_ready_since(installed: &Installed<'_>, name: &str, since: jiff::Timestamp) -> Result<()> {
    let pods: Api<Pod> = installed.api();
    let started = since.checked_sub(jiff::SignedDuration::from_mins(10))?;
    let patch = json!({"status": {"phase": "Running",
        "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady",
                        "lastTransitionTime": since.to_string()}],
        "containerStatuses": [{"name": "server", "image": IMAGE, "imageID": "", "ready": false, "started": true,
                               "restartCount": 0, "state": {"running": {"startedAt": started.to_string()}}}]}});
    pods.patch_status(&format!("{name}-0"), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let sts_api: Api<StatefulSet> = installed.api();
    wait_object(&sts_api, name, "the pod counted not ready", |s| {
        s.status.as_ref().and_then(|st| st.ready_replicas).unwrap_or(0) == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_pod_whose_probe_failed_a_moment_ago_keeps_its_players_until_the_grace_ends() -> Result<()> {
    let installed = Installed::new("op-flap", &[]).await?;
    controllers(installed.cluster)?;
    let mut operator = installed.start_operator(&[])?;
    apply_server(&installed, &server_doc("flap", minimal(json!({"storage": {"size": "1Gi"}})))).await?;
    let pods: Api<Pod> = installed.api();
    let old = wait_object(&pods, "flap-0", "the pod", |_| true).await?;
    pod_ready(&installed, "flap").await?;
    set_players(&installed, "flap", 2).await?;
    // The readiness probe times out a few times on a busy node: the container keeps running.
    pod_not_ready_since(&installed, "flap", jiff::Timestamp::now()).await?;
    operator.stop()?;
    let _operator = Operator::start_with_image(&installed, "atlas-runner:next", &[])?;
    let pending = wait_condition(&installed, "flap", "UpgradePending", "True", "PlayersOnline").await?;
    let message = condition(&pending, "UpgradePending").map(|c| c.2).unwrap_or_default();
    assert!(message.contains("2 players"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pods.get("flap-0").await?.metadata.uid, old.metadata.uid, "replaced with players on it");

    // Not ready since 15 s short of the grace (two minutes): the operator looks again by itself
    // when the grace ends (no event comes then), and nobody being served, replaces the pod, well
    // before its usual minute between looks at a waiting upgrade.
    let marked = Instant::now();
    let since = jiff::Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(105))?;
    pod_not_ready_since(&installed, "flap", since).await?;
    wait_object(&pods, "flap-0", "the pod replaced after the grace", |p| p.metadata.uid != old.metadata.uid).await?;
    let took = marked.elapsed();
    assert!(
        took > Duration::from_secs(10) && took < Duration::from_secs(45),
        "replaced {took:?} after its grace had 15 s left: not when the grace ended"
    );
    Ok(())
}

fn promtool_check(body: &str) -> Result<()> {
    run_piped(Command::new(bin("promtool")?).args(["check", "metrics"]), Some(body)).map(|_| ())
}

#[test]
fn without_a_cluster_the_operator_says_how_to_give_it_one() -> Result<()> {
    let dir = std::env::temp_dir().join(unique("atlas-no-cluster"));
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-runner"))
        .args(["operator", "--agent-image", IMAGE])
        .env("KUBECONFIG", dir.join("missing-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("KUBECONFIG") && err.contains("ServiceAccount"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");

    // The image of the server pods is required (the chart always sets it).
    let out =
        Command::new(env!("CARGO_BIN_EXE_atlas-runner")).arg("operator").env_remove("ATLAS_AGENT_IMAGE").output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--agent-image"), "{err}");
    Ok(())
}

#[test]
fn an_unknown_time_zone_stops_the_operator_and_says_what_to_set() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-runner"))
        .args(["operator", "--agent-image", IMAGE])
        .env("TZ", "Mars/Olympus")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("TZ=\"Mars/Olympus\"") && err.contains("timeZone") && err.contains("Europe/Berlin"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    Ok(())
}

/// The PodMonitors of the test's namespace.
fn pod_monitors(installed: &Installed<'_>) -> Api<kube::api::DynamicObject> {
    let resource = kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor"),
        "podmonitors",
    );
    Api::namespaced_with(installed.ns.client.clone(), &installed.ns.name, &resource)
}

#[tokio::test]
async fn with_podmonitors_enabled_each_server_gets_one_scraping_its_metrics_port() -> Result<()> {
    common::install_monitoring_crds(TestCluster::shared().await?)?;
    // The chart's RBAC with PodMonitors on (the rule for them is there only then).
    let installed = Installed::new("op-podmonitor", &["metrics.podMonitor.enabled=true"]).await?;
    let _operator = installed.start_operator(&["--pod-monitors"])?;
    let server = apply_server(&installed, &server_doc("scraped", minimal(json!({})))).await?;
    let monitors = pod_monitors(&installed);
    let monitor =
        eventually("the PodMonitor", Duration::from_secs(60), || async { Ok(monitors.get_opt("scraped").await?) })
            .await?;
    let owner = monitor.metadata.owner_references.as_ref().and_then(|o| o.first()).context("an owner")?;
    assert_eq!(Some(owner.uid.clone()), server.uid());
    let spec = &monitor.data["spec"];
    assert_eq!(spec["selector"]["matchLabels"]["app.kubernetes.io/instance"], "scraped");
    let endpoint = &spec["podMetricsEndpoints"][0];
    assert_eq!((endpoint["port"].as_str(), endpoint["path"].as_str()), (Some("metrics"), Some("/metrics")));
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "server");
    Ok(())
}

#[tokio::test]
async fn podmonitors_turned_off_are_deleted_and_others_left_alone() -> Result<()> {
    common::install_monitoring_crds(TestCluster::shared().await?)?;
    let installed = Installed::new("op-podmonitor-off", &["metrics.podMonitor.enabled=true"]).await?;
    let mut operator = installed.start_operator(&["--pod-monitors"])?;
    apply_server(&installed, &server_doc("scraped", minimal(json!({})))).await?;
    let monitors = pod_monitors(&installed);
    eventually("the PodMonitor", Duration::from_secs(60), || async { Ok(monitors.get_opt("scraped").await?) }).await?;
    // Someone's own PodMonitor, with our labels but no server owning it.
    let theirs = json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": {"name": "theirs", "labels": {"app.kubernetes.io/managed-by": "atlas-runner",
                                                  "app.kubernetes.io/component": "server"}},
        "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "metrics"}]}});
    monitors.patch("theirs", &PatchParams::apply("someone"), &Patch::Apply(&theirs)).await?;
    operator.stop()?;

    // `helm upgrade --set metrics.podMonitor.enabled=false,metrics.podMonitor.deleteWhenOff=true`:
    // the chart's rules for deleting them, and the operator restarted with --delete-pod-monitors.
    let off = [
        format!("watchNamespace={}", installed.ns.name),
        "metrics.podMonitor.enabled=false".to_owned(),
        "metrics.podMonitor.deleteWhenOff=true".to_owned(),
    ];
    let off: Vec<&str> = off.iter().map(String::as_str).collect();
    let rendered = render(installed.cluster, &installed.ns.name, &installed.ns.name, &off)?;
    run_piped(
        installed.cluster.kubectl()?.args(["apply", "--server-side", "--force-conflicts", "-f", "-"]),
        Some(&rendered),
    )?;
    let operator = installed.start_operator(&["--delete-pod-monitors"])?;
    eventually("the PodMonitor deleted", Duration::from_secs(60), || async {
        Ok(monitors.get_opt("scraped").await?.is_none().then_some(()))
    })
    .await?;
    assert!(monitors.get_opt("theirs").await?.is_some(), "a PodMonitor no server owns was deleted");
    assert!(operator.logs().contains("deleted the one made before"), "{}", operator.logs());
    Ok(())
}

/// The Prometheus Operator installed after Atlas Runner: the operator looks for the PodMonitor CRD
/// again at each resync and makes the PodMonitors then, with no restart. On an API server of the
/// test's own, since the shared one has the CRD from the other PodMonitor tests.
#[tokio::test]
async fn podmonitors_are_made_once_the_prometheus_operator_is_installed_after_us() -> Result<()> {
    let cluster = TestCluster::private().await?;
    let installed = Installed::on(&cluster, "op-podmonitor-later", &["metrics.podMonitor.enabled=true"]).await?;
    let operator = installed.start_operator(&["--pod-monitors", "--resync-seconds", "3"])?;
    apply_server(&installed, &server_doc("scraped", minimal(json!({})))).await?;
    let sets: Api<StatefulSet> = installed.api();
    eventually("the StatefulSet", Duration::from_secs(60), || async { Ok(sets.get_opt("scraped").await?) }).await?;
    eventually("the warning that no PodMonitor CRD is served", Duration::from_secs(30), || async {
        Ok(operator.logs().contains("PodMonitor CRD is not served").then_some(()))
    })
    .await?;

    common::install_monitoring_crds(&cluster)?;
    let monitors = pod_monitors(&installed);
    let monitor =
        eventually("the PodMonitor", Duration::from_secs(60), || async { Ok(monitors.get_opt("scraped").await?) })
            .await?;
    assert_eq!(monitor.data["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"], "scraped");
    Ok(())
}

/// A StorageClass that allows expansion (cluster-wide; made once per test process).
async fn expandable_class(installed: &Installed<'_>) -> Result<String> {
    let name = "atlas-test-expandable";
    let classes: Api<k8s_openapi::api::storage::v1::StorageClass> = Api::all(installed.ns.client.clone());
    let class = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
        "provisioner": "example.com/none", "allowVolumeExpansion": true});
    classes.patch(name, &PatchParams::apply("atlas-tests").force(), &Patch::Apply(&class)).await?;
    Ok(name.to_owned())
}

#[tokio::test]
async fn a_grown_claim_is_read_once_and_a_refused_growth_is_one_event() -> Result<()> {
    let installed = Installed::new("op-claim", &[]).await?;
    controllers(installed.cluster)?;
    let class = expandable_class(&installed).await?;
    let operator = installed.start_operator(&["--resync-seconds", "3"])?;
    let spec = |size: &str| minimal(json!({"storage": {"size": size, "storageClassName": class}}));
    apply_server(&installed, &server_doc("growing", spec("1Gi"))).await?;
    let claims: Api<PersistentVolumeClaim> = installed.api();
    wait_object(&claims, "data-growing-0", "the claim", |_| true).await?;

    // The claim is not bound (no provisioner here): the API server refuses to resize it, for good.
    let events = || operator.sample("atlas_operator_api_writes_total{kind=\"event\"}");
    let before = events()?;
    apply_server(&installed, &server_doc("growing", spec("2Gi"))).await?;
    let failed = eventually("a ReconcileFailed Event", Duration::from_secs(60), || async {
        Ok(events_for(&installed, "growing")
            .await?
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ReconcileFailed")))
    })
    .await?;
    assert!(failed.note.as_deref().unwrap_or_default().contains("data-growing-0"), "{failed:?}");
    // Rounds the agent's status starts fail the same way: no Event for each. (The Event is counted
    // once its write has returned, a moment after the API server shows it.)
    eventually("the Event counted", Duration::from_secs(10), || async { Ok((events()? > before).then_some(())) })
        .await?;
    let published = events()?;
    let errors = operator.sample("atlas_operator_reconcile_errors_total{category=\"apply\"}")?;
    for online in 1..=3 {
        set_players(&installed, "growing", online).await?;
        let seen = errors + f64::from(online);
        eventually("the round failing again", Duration::from_secs(30), || async {
            Ok((operator.sample("atlas_operator_reconcile_errors_total{category=\"apply\"}")? >= seen).then_some(()))
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(events()?, published, "an Event for each retry of the same failure:\n{}", operator.logs());

    // Bound, as a provisioner would make it: the claim grows, and is not read again at each resync.
    let bound = json!({"status": {"phase": "Bound", "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]}});
    claims.patch_status("data-growing-0", &PatchParams::default(), &Patch::Merge(&bound)).await?;
    set_players(&installed, "growing", 0).await?;
    wait_object(&claims, "data-growing-0", "the claim asked for 2Gi", |c| {
        c.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.as_str())
            == Some("2Gi")
    })
    .await?;
    let reads = || operator.sample("atlas_operator_api_reads_total{kind=\"claim\"}");
    let reconciles = operator.sample("atlas_operator_reconciles_total")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = reads()?;
    eventually("two resyncs", Duration::from_secs(30), || async {
        Ok((operator.sample("atlas_operator_reconciles_total")? >= reconciles + 3.0).then_some(()))
    })
    .await?;
    assert_eq!(reads()?, settled, "the claim was read again at a resync:\n{}", operator.logs());
    Ok(())
}

#[tokio::test]
async fn an_operator_stopped_while_its_caches_fill_exits_promptly() -> Result<()> {
    let installed = Installed::new("op-early-stop", &[]).await?;
    for i in 0..30 {
        apply_server(&installed, &server_doc(&format!("early-{i}"), minimal(json!({})))).await?;
    }
    for attempt in 0..3 {
        let mut operator = installed.start_operator(&[])?;
        // SIGTERM as soon as it leads: its rounds are then waiting for the caches to list.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !operator.logs().contains("became the leader") {
            ensure!(Instant::now() < deadline, "attempt {attempt}: no leadership:\n{}", operator.logs());
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = Instant::now();
        let status = operator.stop()?;
        assert!(status.success(), "attempt {attempt}: exited with {status}:\n{}", operator.logs());
        assert!(started.elapsed() < Duration::from_secs(10), "attempt {attempt}: took {:?}", started.elapsed());
    }
    Ok(())
}
