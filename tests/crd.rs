//! The MinecraftServer CRD on a real kube-apiserver: it installs, every example is accepted, invalid
//! specs are refused by the API server itself with a message naming the field, and `kubectl` shows
//! the docs and columns.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atlas_runner::api::MinecraftServer;
use atlas_testbed::{TestCluster, TestNamespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{CustomResourceExt, Resource};
use serde_json::{Value, json};

mod common;
use common::{ADMIN, install_crd};

fn mcs_api(ns: &TestNamespace) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(
        &MinecraftServer::group(&()),
        &MinecraftServer::version(&()),
        &MinecraftServer::kind(&()),
    );
    let resource = ApiResource::from_gvk_with_plural(&gvk, &MinecraftServer::plural(&()));
    Api::namespaced_with(ns.client.clone(), &ns.name, &resource)
}

/// Server-side apply of a raw document with strict field validation, as `kubectl apply --server-side` does.
async fn apply(api: &Api<DynamicObject>, doc: &Value) -> Result<DynamicObject, kube::Error> {
    let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let params = PatchParams::apply(ADMIN).force().validation_strict();
    api.patch(&name, &params, &Patch::Apply(doc)).await
}

/// The API server's message when it refused the document as invalid; what else happened otherwise.
fn rejection(result: Result<DynamicObject, kube::Error>) -> Result<String, String> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 400 => Ok(status.message),
        // Server-side apply refuses a document that does not fit the schema's types (wrong type,
        // unknown field) while building the typed patch, which the API server reports as a 500.
        Err(kube::Error::Api(status)) if status.message.starts_with("failed to create typed patch object") => {
            Ok(status.message)
        }
        Err(e) => Err(format!("failed for another reason: {e}")),
        Ok(_) => Err("accepted".to_owned()),
    }
}

#[tokio::test]
async fn crd_installs_and_becomes_established() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    install_crd(&cluster.client().await?).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client().await?);
    let crd = crds.get("minecraftservers.atlas.dev").await?;
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["mcs".to_owned()][..]));
    assert!(crd.spec.versions[0].subresources.as_ref().is_some_and(|s| s.status.is_some()), "status subresource");
    Ok(())
}

fn examples() -> Result<Vec<(String, Value)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path)?;
            let doc: Value = serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
            if doc["kind"] == "MinecraftServer" {
                out.push((path.file_name().unwrap_or_default().to_string_lossy().into_owned(), doc));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[tokio::test]
async fn every_example_is_accepted_by_server_side_apply() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    install_crd(&cluster.client().await?).await?;
    let ns = cluster.namespace("examples").await?;
    let api = mcs_api(&ns);
    let examples = examples()?;
    let names: Vec<&str> = examples.iter().map(|(n, _)| n.as_str()).collect();
    for required in ["vanilla.yaml", "paper-hub.yaml", "fabric-mrpack.yaml", "backup-s3.yaml", "paused.yaml"] {
        ensure!(names.contains(&required), "examples/{required} is missing (have {names:?})");
    }
    for (file, doc) in &examples {
        let applied = apply(&api, doc).await.with_context(|| format!("examples/{file} was refused"))?;
        // What the API server stored reads back as our type, and holds what the file said.
        let typed: MinecraftServer = serde_json::from_value(serde_json::to_value(&applied)?)
            .with_context(|| format!("examples/{file} as stored does not parse as MinecraftServer"))?;
        let from_file: MinecraftServer = serde_json::from_value(doc.clone())?;
        assert_eq!(typed.spec, from_file.spec, "examples/{file}: the stored spec differs from the file");
    }
    Ok(())
}

/// A valid spec touching every section, which each case below breaks in one place.
fn base(name: &str) -> Value {
    json!({
        "apiVersion": "atlas.dev/v1alpha1",
        "kind": "MinecraftServer",
        "metadata": {"name": name},
        "spec": {
            "eula": true,
            "server": {"type": "vanilla", "version": "1.21.4"},
            "pack": {"source": {"url": {"url": "https://packs.example/p.tar.zst", "sha256": "a".repeat(64)}},
                     "preserve": ["config/**"]},
            "jvm": {"heap": "2G"},
            "properties": {"motd": "hi"},
            "rcon": {"port": 25575},
            "backup": {"schedule": "0 */6 * * *", "store": {"local": {"path": "/backups"}},
                       "retention": {"keepLast": 3}},
            "storage": {"size": "10Gi", "storageClassName": "fast", "deleteWithServer": false},
            "service": {"type": "ClusterIP", "port": 25565},
            "upgrade": {"window": "Sat,Sun 02:00-06:00", "requireNoPlayers": true}
        }
    })
}

/// Sets `value` at a `/`-separated path under the document (creating objects on the way);
/// `Value::Null` removes the key.
fn set(doc: &mut Value, path: &str, value: Value) {
    let mut parts: Vec<&str> = path.split('/').collect();
    let Some(last) = parts.pop() else { return };
    let mut node = doc;
    for part in parts {
        node = &mut node[part];
    }
    if let Some(map) = node.as_object_mut() {
        if value.is_null() {
            map.remove(last);
        } else {
            map.insert(last.to_owned(), value);
        }
    }
}

struct Case {
    name: &'static str,
    edits: Vec<(&'static str, Value)>,
    /// Every string must appear in the API server's message: the field, then what is wrong.
    expect: &'static [&'static str],
}

fn case(name: &'static str, edits: Vec<(&'static str, Value)>, expect: &'static [&'static str]) -> Case {
    Case { name, edits, expect }
}

fn invalid_specs() -> Vec<Case> {
    let long_name = "x".repeat(53);
    vec![
        case("eula false", vec![("spec/eula", json!(false))], &["spec.eula", "must be true"]),
        case("eula missing", vec![("spec/eula", Value::Null)], &["spec.eula", "Required value"]),
        case("eula wrong type", vec![("spec/eula", json!("yes"))], &["spec.eula", "boolean"]),
        case(
            "two pack sources",
            vec![("spec/pack/source/hub", json!({"url": "https://hub.example", "pack": "p"}))],
            &["spec.pack.source", "exactly one of hub, url or mrpack"],
        ),
        case("no pack source", vec![("spec/pack/source", json!({}))], &["spec.pack.source", "exactly one"]),
        case("heap and heapPercent", vec![("spec/jvm/heapPercent", json!(50))], &["spec.jvm", "not both"]),
        case(
            "heapPercent over 95",
            vec![("spec/jvm/heap", Value::Null), ("spec/jvm/heapPercent", json!(120))],
            &["spec.jvm.heapPercent", "95"],
        ),
        case("heap not a JVM size", vec![("spec/jvm/heap", json!("4GB"))], &["spec.jvm.heap", "should match"]),
        case("rcon port privileged", vec![("spec/rcon/port", json!(80))], &["spec.rcon.port", "1024"]),
        case("game port out of range", vec![("spec/service/port", json!(70000))], &["spec.service.port", "65535"]),
        case(
            "unknown server type",
            vec![("spec/server/type", json!("forge"))],
            &["spec.server.type", "Unsupported value"],
        ),
        case("custom without jar", vec![("spec/server/type", json!("custom"))], &["spec.server.jar", "required"]),
        case(
            "jar escapes data dir",
            vec![("spec/server/type", json!("custom")), ("spec/server/jar", json!("../server.jar"))],
            &["spec.server.jar", "relative path"],
        ),
        case("jar on vanilla", vec![("spec/server/jar", json!("x.jar"))], &["spec.server.jar", "only allowed"]),
        case(
            "sha256 not hex",
            vec![("spec/pack/source/url/sha256", json!("abc"))],
            &["spec.pack.source.url.sha256", "should match '^[0-9a-f]{64}$'"],
        ),
        case(
            "preserve absolute",
            vec![("spec/pack/preserve", json!(["/etc/passwd"]))],
            &["spec.pack.preserve", "relative to the data directory"],
        ),
        case(
            "rcon password in properties",
            vec![("spec/properties/rcon.password", json!("x"))],
            &["spec.properties", "rcon"],
        ),
        case(
            "property wrong type",
            vec![("spec/properties/max-players", json!(20))],
            &["spec.properties.max-players", "string"],
        ),
        case(
            "keepLast zero",
            vec![("spec/backup/retention/keepLast", json!(0))],
            &["spec.backup.retention.keepLast", "greater than or equal to 1"],
        ),
        case(
            "two backup stores",
            vec![("spec/backup/store/s3", json!({"bucket": "backups"}))],
            &["spec.backup.store", "exactly one of s3 or local"],
        ),
        case(
            "schedule not cron",
            vec![("spec/backup/schedule", json!("every hour"))],
            &["spec.backup.schedule", "should match"],
        ),
        case(
            "nodePort on ClusterIP",
            vec![("spec/service/nodePort", json!(30001))],
            &["spec.service.nodePort", "needs type NodePort or LoadBalancer"],
        ),
        case(
            "storage size not a quantity",
            vec![("spec/storage/size", json!("ten gigs"))],
            &["spec.storage.size", "should match"],
        ),
        case("unknown field", vec![("spec/replicas", json!(2))], &["spec.replicas", "not declared in schema"]),
        case("upgrade window not a window", vec![("spec/upgrade/window", json!("weekends"))], &["spec.upgrade.window"]),
        case(
            "deleteWithServer not a boolean",
            vec![("spec/storage/deleteWithServer", json!("yes"))],
            &["spec.storage.deleteWithServer", "boolean"],
        ),
        case("name too long for a StatefulSet", vec![("metadata/name", json!(long_name))], &["metadata.name", "52"]),
    ]
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_api_server_naming_the_field() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    install_crd(&cluster.client().await?).await?;
    let ns = cluster.namespace("invalid").await?;
    let api = mcs_api(&ns);

    // The base is valid, so each rejection below is the case's own doing.
    apply(&api, &base("base")).await.context("the base spec must be accepted")?;

    let cases = invalid_specs();
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut doc = base(&format!("case-{i}"));
        for (path, value) in &case.edits {
            set(&mut doc, path, value.clone());
        }
        match rejection(apply(&api, &doc).await) {
            Err(what) => failures.push(format!("{}: {what}", case.name)),
            Ok(message) => {
                let missing: Vec<_> = case.expect.iter().filter(|s| !message.contains(**s)).collect();
                if !missing.is_empty() {
                    failures.push(format!("{}: message lacks {missing:?}: {message}", case.name));
                }
            }
        }
    }
    if !failures.is_empty() {
        bail!("{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    }
    Ok(())
}

#[tokio::test]
async fn data_losing_changes_to_storage_are_rejected_on_update() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    install_crd(&cluster.client().await?).await?;
    let ns = cluster.namespace("immutable").await?;
    let api = mcs_api(&ns);
    let cases: [(&str, &str, Value, &[&str]); 4] = [
        (
            "storage class changed",
            "spec/storage/storageClassName",
            json!("slow"),
            &["spec.storage.storageClassName", "immutable"],
        ),
        (
            "storage class removed",
            "spec/storage/storageClassName",
            Value::Null,
            &["spec.storage.storageClassName", "immutable"],
        ),
        ("volume shrunk", "spec/storage/size", json!("5Gi"), &["spec.storage.size", "cannot shrink"]),
        ("storage removed", "spec/storage", Value::Null, &["spec.storage", "cannot be removed"]),
    ];
    for (i, (name, path, value, expect)) in cases.into_iter().enumerate() {
        let original = base(&format!("upd-{i}"));
        apply(&api, &original).await.with_context(|| format!("{name}: create"))?;
        let mut changed = original.clone();
        set(&mut changed, path, value);
        let message = rejection(apply(&api, &changed).await).map_err(|what| anyhow::anyhow!("{name}: {what}"))?;
        for s in expect {
            assert!(message.contains(s), "{name}: message lacks {s:?}: {message}");
        }
    }
    // Growing the volume is allowed.
    let mut grown = base("upd-0");
    set(&mut grown, "spec/storage/size", json!("20Gi"));
    apply(&api, &grown).await.context("growing spec.storage.size must be accepted")?;
    Ok(())
}

/// Runs a command until it succeeds (discovery and OpenAPI publishing lag a fresh CRD briefly).
fn run_until_ok(mut make: impl FnMut() -> Result<std::process::Command>) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = make()?.output()?;
        if out.status.success() {
            return Ok(String::from_utf8(out.stdout)?);
        }
        if Instant::now() > deadline {
            bail!("command failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    install_crd(&cluster.client().await?).await?;
    let out = run_until_ok(|| {
        let mut cmd = cluster.kubectl()?;
        cmd.args(["explain", "mcs.spec.pack"]);
        Ok(cmd)
    })?;
    for text in
        ["KIND:", "MinecraftServer", "FIELD: pack", "source", "exactly one of `hub`, `url` or `mrpack`", "preserve"]
    {
        assert!(out.contains(text), "kubectl explain mcs.spec.pack lacks {text:?}:\n{out}");
    }
    let out = run_until_ok(|| {
        let mut cmd = cluster.kubectl()?;
        cmd.args(["explain", "mcs.spec.eula"]);
        Ok(cmd)
    })?;
    assert!(out.contains("Minecraft EULA"), "kubectl explain mcs.spec.eula:\n{out}");
    Ok(())
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    install_crd(&cluster.client().await?).await?;
    let ns = cluster.namespace("columns").await?;
    let api = mcs_api(&ns);
    apply(&api, &base("columns")).await?;
    // Status is written through the status subresource, as the runner will write it.
    let status = json!({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer",
        "status": {"phase": "Running", "serverVersion": "1.21.4", "packVersion": "1.4.2",
                   "players": {"online": 3, "max": 20}}});
    api.patch_status("columns", &PatchParams::apply(ADMIN).force(), &Patch::Apply(&status)).await?;
    let out = run_until_ok(|| {
        let mut cmd = cluster.kubectl()?;
        cmd.args(["get", "mcs", "-n", &ns.name]);
        Ok(cmd)
    })?;
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "PHASE", "SERVER", "PACK", "PLAYERS", "AGE"], "{out}");
    let row: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(&row[..5], ["columns", "Running", "1.21.4", "1.4.2", "3"], "{out}");
    Ok(())
}

#[tokio::test]
async fn the_helm_chart_lints_installs_and_ships_our_crd() -> Result<()> {
    let cluster = TestCluster::shared().await?;
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/atlas-runner");
    let lint = cluster.helm()?.args(["lint", "--strict"]).arg(&chart).output()?;
    assert!(
        lint.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // No --wait: the operator's Deployment never becomes ready on an API server without nodes
    // (tests/operator.rs runs the operator itself; the node bed's end-to-end test waits for it).
    let ns = cluster.namespace("helm").await?;
    let install = cluster
        .helm()?
        .args(["install", &ns.name, "--namespace", &ns.name, "--set", &format!("watchNamespace={}", ns.name)])
        .arg(&chart)
        .output()?;
    assert!(
        install.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    let shown = cluster.helm()?.args(["show", "crds"]).arg(&chart).output()?;
    let shown: CustomResourceDefinition = serde_yaml::from_slice(&shown.stdout).context("helm show crds")?;
    assert_eq!(shown, MinecraftServer::crd(), "the chart ships a CRD that differs from src/api");
    Ok(())
}
