//! The test bed's cluster runs pods as a real one does: a StatefulSet of our image (built from the
//! Dockerfile) with a volume claim bound to a local PersistentVolume, a readiness probe on `/readyz`,
//! a ServiceAccount token used from inside the pod to read its own object, a Service reaching the
//! pod through kube-proxy, and data on the volume that outlives the pod. And the node's network
//! namespace has no default route, so nothing a pod sends can leave the machine; its DNS answers
//! only the cluster's names and those a test points at the bed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atlas_testbed::{TestCluster, TestNamespace, unique};
use common::kubectl;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::PostParams;
use sha2::{Digest, Sha256};

const NAME: &str = "smoke";
const POD: &str = "smoke-0";

#[tokio::test(flavor = "multi_thread")]
async fn a_statefulset_of_our_image_reads_itself_serves_through_kube_proxy_and_keeps_its_volume() -> Result<()> {
    let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
    let image = cluster.nodes()?.image.clone();
    let ns = cluster.namespace("smoke").await?;
    let create = PostParams::default();

    Api::<ServiceAccount>::namespaced(ns.client.clone(), &ns.name).create(&create, &object(service_account())?).await?;
    Api::<Role>::namespaced(ns.client.clone(), &ns.name).create(&create, &object(role())?).await?;
    Api::<RoleBinding>::namespaced(ns.client.clone(), &ns.name).create(&create, &object(role_binding())?).await?;
    Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name).create(&create, &fixture_config_map()?).await?;
    Api::<Service>::namespaced(ns.client.clone(), &ns.name).create(&create, &object(node_port_service())?).await?;
    Api::<StatefulSet>::namespaced(ns.client.clone(), &ns.name).create(&create, &object(stateful_set(&image))?).await?;

    let pods = Api::<Pod>::namespaced(ns.client.clone(), &ns.name);
    let first = common::wait_pod_ready(cluster, &ns, POD, None, Duration::from_secs(180)).await?;
    let first_uid = first.metadata.uid.clone().context("the pod has no uid")?;

    // Its ServiceAccount token, used from inside the pod, read the pod's own object.
    let selfget = kubectl(cluster, &ns, &["logs", POD, "-c", "selfget"])?;
    ensure!(
        selfget.contains(&format!("selfget: HTTP 200 pod {}/{POD} uid {first_uid}", ns.name)),
        "the pod did not read its own object with its token: {selfget}"
    );

    // Ready means the probe on /readyz passed: the runner's, with the fake server up under it.
    let probe = first.spec.as_ref().and_then(|s| s.containers[0].readiness_probe.clone()).context("no probe")?;
    assert_eq!(probe.http_get.as_ref().and_then(|h| h.path.as_deref()), Some("/readyz"));

    // The claim is bound to one of the bed's local volumes.
    let claim =
        Api::<PersistentVolumeClaim>::namespaced(ns.client.clone(), &ns.name).get(&format!("data-{POD}")).await?;
    assert_eq!(claim.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Bound"));
    let volume_name = claim.spec.as_ref().and_then(|s| s.volume_name.clone()).context("the claim names no volume")?;
    let volume = Api::<PersistentVolume>::all(ns.client.clone()).get(&volume_name).await?;
    let spec = volume.spec.context("the volume has no spec")?;
    assert!(spec.local.is_some(), "{volume_name} is not a local volume");
    assert_eq!(spec.storage_class_name.as_deref(), Some(atlas_testbed::node::STORAGE_CLASS));

    // A Service reaches the pod through kube-proxy: the node's port, from the host, answers /readyz.
    let service = Api::<Service>::namespaced(ns.client.clone(), &ns.name).get(NAME).await?;
    let node_port = service.spec.and_then(|s| s.ports).and_then(|p| p[0].node_port).context("no node port")?;
    let node_ip = node_internal_ip(&ns).await?;
    let (status, body) = common::http_get(&format!("{node_ip}:{node_port}"), "/readyz")?;
    assert_eq!(status, 200, "GET /readyz through the NodePort Service: {body}");

    // The pod runs our image as built from the Dockerfile, as the Dockerfile's user.
    let config_path = PathBuf::from(&cluster.nodes()?.image_config);
    let config_bytes =
        std::fs::read(&config_path).with_context(|| format!("read the image's config {}", config_path.display()))?;
    let image_id = hex::encode(Sha256::digest(&config_bytes));
    let status = first.status.as_ref().and_then(|s| s.container_statuses.clone()).context("no container status")?;
    let server = status.iter().find(|c| c.name == "server").context("no server container status")?;
    ensure!(server.image_id.ends_with(&image_id), "the pod's image {} is not ours ({image_id})", server.image_id);
    let config: serde_json::Value = serde_json::from_slice(&config_bytes)?;
    assert_eq!(config["config"]["Labels"]["org.opencontainers.image.title"], "atlas-runner");
    assert_eq!(config["config"]["User"], "10001:10001");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/local/bin/atlas-runner"]));
    assert_eq!(config["config"]["WorkingDir"], "/data");
    let history = config["history"].to_string();
    ensure!(history.contains("atlas-runner"), "the image's history does not show the Dockerfile's steps: {history}");
    assert_eq!(kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "id", "-u"])?.trim(), "10001");
    // The JVM names files in UTF-8 (the image's LANG), so a world or plugin path is not limited to ASCII.
    let java = "for j in /usr/lib/jvm/*/bin/java; do exec \"$j\" -XshowSettings:properties -version 2>&1; done";
    let properties = kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "sh", "-c", java])?;
    ensure!(
        properties.contains("sun.jnu.encoding = UTF-8"),
        "the JVM's file name encoding is not UTF-8:\n{properties}"
    );

    // The pod's DNS is the bed's CoreDNS behind the kube-dns Service, never the host's resolver.
    let resolv = kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "cat", "/etc/resolv.conf"])?;
    ensure!(resolv.lines().any(|l| l.trim() == "nameserver 10.0.0.10"), "pod resolv.conf: {resolv}");

    // S3 is reachable from the pod: the runner in it lists a fresh bucket of the bed's S3 with
    // SigV4-signed requests, and the same list with a wrong secret is refused by S3 itself.
    let s3 = cluster.s3_for_pods().await?;
    let bucket = unique("smoke").to_lowercase();
    atlas_testbed::create_bucket(&s3, &bucket).await?;
    let spec = backup_spec(&s3.endpoint, &bucket);
    let write_spec = format!("printf '%s' '{spec}' > /tmp/backup.yaml");
    kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "sh", "-c", &write_spec])?;
    let list = |secret: &str| {
        kubectl(
            cluster,
            &ns,
            &[
                "exec",
                POD,
                "-c",
                "server",
                "--",
                "env",
                &format!("AWS_ACCESS_KEY_ID={}", s3.access_key),
                &format!("AWS_SECRET_ACCESS_KEY={secret}"),
                "atlas-runner",
                "backup",
                "list",
                "--spec",
                "/tmp/backup.yaml",
                "--data",
                "/data",
            ],
        )
    };
    list(&s3.secret_key).context("backup list from the pod against the bed's S3")?;
    let refused = list("not-the-secret").err().map(|e| format!("{e:#}")).unwrap_or_default();
    ensure!(
        refused.contains("403") || refused.to_lowercase().contains("signature"),
        "a wrong secret was not refused: {refused}"
    );

    // Data written to the volume outlives the pod.
    let marker = unique("marker");
    kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "sh", "-c", &format!("echo {marker} > /data/marker")])?;
    pods.delete(POD, &Default::default()).await?;
    let second = common::wait_pod_ready(cluster, &ns, POD, Some(&first_uid), Duration::from_secs(180)).await?;
    let second_uid = second.metadata.uid.clone().context("the pod has no uid")?;
    assert_ne!(second_uid, first_uid);
    assert_eq!(kubectl(cluster, &ns, &["exec", POD, "-c", "server", "--", "cat", "/data/marker"])?.trim(), marker);
    let selfget = kubectl(cluster, &ns, &["logs", POD, "-c", "selfget"])?;
    ensure!(selfget.contains(&format!("uid {second_uid}")), "the new pod did not read itself: {selfget}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_network_namespace_has_no_default_route() -> Result<()> {
    let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
    let netns = &cluster.nodes()?.netns;
    let mut routes = String::new();
    for family in ["-4", "-6"] {
        let out = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["ip", family, "route", "show", "table", "all"])
            .output()?;
        ensure!(out.status.success(), "ip route in {netns}: {}", String::from_utf8_lossy(&out.stderr));
        routes += &String::from_utf8_lossy(&out.stdout);
    }
    ensure!(!routes.is_empty(), "no routes read from {netns}");
    // This bed's slot S, from the node's address 10.213.S.2.
    let ns = cluster.namespace("routes").await?;
    let node_ip: std::net::Ipv4Addr = node_internal_ip(&ns).await?.parse()?;
    let slot = node_ip.octets()[2];
    let (link, pods) = (format!("10.213.{slot}."), format!("10.214.{slot}."));
    for route in routes.lines() {
        let destination = route.split_whitespace().find(|w| !matches!(*w, "local" | "broadcast" | "unicast"));
        // Only the bed's own networks: the link to the host (10.213.S.0/30), the pods (10.214.S.0/24)
        // and loopback. No default, no 0.0.0.0/0, no other bed's range, no IPv6 at all (it is off
        // in the namespace).
        ensure!(
            destination.is_some_and(|d| d.starts_with(&link) || d.starts_with(&pods) || d.starts_with("127.")),
            "a route to somewhere other than the bed {slot}: {route}\n{routes}"
        );
    }
    Ok(())
}

/// The node reaches, of the host's services, only the ports opened to it (the API server's, the
/// pods' S3, and what a test opens): a service the host binds to a wildcard address is refused at
/// once over the bed's link. And the host never forwards for the link.
#[tokio::test(flavor = "multi_thread")]
async fn the_node_reaches_on_the_host_only_the_ports_opened_to_it() -> Result<()> {
    let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
    let nodes = cluster.nodes()?;
    let bed = nodes.bed.clone().context("the bed did not say its name")?;
    let ns = cluster.namespace("host-ports").await?;
    let node_ip: std::net::Ipv4Addr = node_internal_ip(&ns).await?.parse()?;
    let [a, b, c, _] = node_ip.octets();
    let host_ip = std::net::Ipv4Addr::new(a, b, c, 1);

    let closed = std::net::TcpListener::bind("0.0.0.0:0")?;
    let opened = std::net::TcpListener::bind("0.0.0.0:0")?;
    cluster.open_to_pods(opened.local_addr()?.port())?;
    let connect = |port: u16| -> Result<bool> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", nodes.netns))
            .args(["timeout", "10", "bash", "-c", &format!("exec 3<>/dev/tcp/{host_ip}/{port}")])
            .output()?;
        Ok(out.status.success())
    };
    ensure!(connect(opened.local_addr()?.port())?, "the node could not reach a port opened to it");
    ensure!(!connect(closed.local_addr()?.port())?, "the node reached a host service bound to 0.0.0.0");

    let forwarding = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{bed}/forwarding"))?;
    assert_eq!(forwarding.trim(), "0", "the host forwards for {bed}");
    Ok(())
}

/// A name a test points at an address resolves in a pod (through the pod's resolv.conf, search
/// domains and all) to that address, through the bed's DNS reading its hosts file; a name nobody
/// pointed gets no answer, and the cluster's own names still resolve.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_pointed_at_the_bed_resolves_in_pods_and_others_do_not() -> Result<()> {
    let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
    let image = cluster.nodes()?.image.clone();
    let ns = cluster.namespace("names").await?;
    let pod: Pod = object(serde_json::json!({
        "metadata": {"name": "resolver"},
        "spec": {"containers": [{"name": "sleep", "image": image, "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]},
    }))?;
    let pods = Api::<Pod>::namespaced(ns.client.clone(), &ns.name);
    pods.create(&PostParams::default(), &pod).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pods
        .get("resolver")
        .await?
        .status
        .unwrap_or_default()
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
    {
        ensure!(Instant::now() < deadline, "the resolver pod was not Ready after 120 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Names of this test's own (other tests may point theirs), at an address of TEST-NET-1: only
    // resolved here, never dialled.
    let name = format!("{}.example", ns.name);
    let other = format!("not-{}.example", ns.name);
    let address = std::net::Ipv4Addr::new(192, 0, 2, 7);
    cluster.point_names(&[&name], address)?;
    let getent = |host: &str| -> Result<(bool, String)> {
        let out = cluster
            .kubectl()?
            .args(["--namespace", &ns.name, "exec", "resolver", "--", "getent", "hosts", host])
            .output()?;
        Ok((
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        ))
    };
    // CoreDNS rereads the file within a second.
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let (found, answer) = getent(&name)?;
        if found {
            break answer;
        }
        ensure!(Instant::now() < deadline, "{name} did not resolve in the pod after 30 s: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    ensure!(answer.split_whitespace().next() == Some("192.0.2.7"), "{name} resolved to something else: {answer}");
    let (found, answer) = getent(&other)?;
    ensure!(!found, "{other}, pointed nowhere, resolved: {answer}");
    let (found, answer) = getent("kubernetes.default")?;
    ensure!(found && answer.starts_with("10.0.0.1 "), "the cluster's own names stopped resolving: {answer}");
    Ok(())
}

/// The API server calls a webhook at the pod behind its Service, over the bed's link, never at the
/// Service's ClusterIP (only the node's namespace knows those; from the host a dial would take the
/// default route off the machine). And the host has no route into the Service range at all.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_calls_a_webhook_at_its_pod_and_the_host_routes_no_service_address() -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    let cluster = TestCluster::with_nodes(Path::new(common::binary())).await?;
    let image = cluster.nodes()?.image.clone();

    // Read from the host's routing table: no packet is sent.
    for address in ["10.0.0.1", "10.0.0.10", "10.0.0.254"] {
        let out = Command::new("ip").args(["-4", "route", "get", address]).output()?;
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(!out.status.success() && said.contains("No route to host"), "the host routes {address}: {said}");
    }

    // A pod behind a Service, with nothing listening on the target port: a call fails at once, and
    // its error says where the API server dialled.
    let ns = cluster.namespace("webhook").await?;
    let create = PostParams::default();
    let labels = serde_json::json!({"app": "webhook-target"});
    let pod: Pod = object(serde_json::json!({
        "metadata": {"name": "target", "labels": labels},
        "spec": {"containers": [{"name": "sleep", "image": image, "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]},
    }))?;
    let pods = Api::<Pod>::namespaced(ns.client.clone(), &ns.name);
    pods.create(&create, &pod).await?;
    let service: Service = object(serde_json::json!({
        "metadata": {"name": "target"},
        "spec": {"selector": labels, "ports": [{"port": 443, "targetPort": 8443}]},
    }))?;
    let service = Api::<Service>::namespaced(ns.client.clone(), &ns.name).create(&create, &service).await?;
    let cluster_ip = service.spec.and_then(|s| s.cluster_ip).context("the Service has no ClusterIP")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let pod_ip = loop {
        let status = pods.get("target").await?.status.unwrap_or_default();
        let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        if let (true, Some(ip)) = (ready, status.pod_ip) {
            break ip;
        }
        ensure!(Instant::now() < deadline, "the webhook's pod was not Ready after 120 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // The webhook sees only labelled ConfigMaps of this namespace: other tests never meet it.
    let webhooks = Api::<ValidatingWebhookConfiguration>::all(ns.client.clone());
    let webhook_name = unique("atlas-bed-probe");
    let webhook: ValidatingWebhookConfiguration = object(serde_json::json!({
        "metadata": {"name": webhook_name},
        "webhooks": [{
            "name": "probe.bed.atlas.dev",
            "clientConfig": {"service": {"namespace": ns.name, "name": "target", "path": "/validate", "port": 443}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
            "objectSelector": {"matchLabels": {"atlas-bed-probe": "yes"}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
        }],
    }))?;
    webhooks.create(&create, &webhook).await?;
    let called = call_webhook(&ns, &pod_ip, &cluster_ip).await;
    webhooks.delete(&webhook_name, &Default::default()).await?;
    let called = called?;
    ensure!(
        called.contains(&format!("{pod_ip}:8443")),
        "the API server did not dial the webhook at its pod {pod_ip}:8443: {called}"
    );
    Ok(())
}

/// Creates labelled ConfigMaps until the webhook is called (its configuration reaches the API
/// server's cache a moment after it is created); returns the error naming where it was dialled.
async fn call_webhook(ns: &TestNamespace, pod_ip: &str, cluster_ip: &str) -> Result<String> {
    let maps = Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let map: ConfigMap =
            object(serde_json::json!({"metadata": {"name": unique("probe"), "labels": {"atlas-bed-probe": "yes"}}}))?;
        match maps.create(&PostParams::default(), &map).await {
            Err(e) if e.to_string().contains("failed calling webhook") => {
                let said = e.to_string();
                ensure!(!said.contains(cluster_ip), "the API server dialled the Service's ClusterIP: {said}");
                if said.contains(pod_ip) {
                    return Ok(said);
                }
                // Until the endpoints reach its cache, the API server says the Service has none.
            }
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        if Instant::now() > deadline {
            bail!("the webhook was not called within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Objects

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    Ok(serde_json::from_value(value)?)
}

fn labels() -> serde_json::Value {
    serde_json::json!({"app": NAME})
}

fn service_account() -> serde_json::Value {
    serde_json::json!({"metadata": {"name": NAME}})
}

/// The pod may read only itself.
fn role() -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": NAME},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "resourceNames": [POD], "verbs": ["get"]}],
    })
}

fn role_binding() -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": NAME},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME}],
    })
}

/// The fake server's jar, the SelfGet client's jar and the runner's spec.
fn fixture_config_map() -> Result<ConfigMap> {
    use k8s_openapi::ByteString;
    let spec = "apiVersion: atlas.dev/v1alpha1\nkind: MinecraftServer\nmetadata: {name: smoke}\nspec:\n  eula: true\n  \
                server: {type: custom, version: \"1.21.4\", jar: fake-server.jar}\n  jvm: {heap: 256M, flags: none}\n";
    let mut map: ConfigMap = object(serde_json::json!({
        "metadata": {"name": format!("{NAME}-fixture")},
        "data": {"server.yaml": spec},
    }))?;
    map.binary_data = Some(
        [
            ("fake-server.jar".to_owned(), ByteString(std::fs::read(common::fake_server_jar()?)?)),
            ("selfget.jar".to_owned(), ByteString(std::fs::read(selfget_jar()?)?)),
        ]
        .into(),
    );
    Ok(map)
}

/// A spec whose backups go to `bucket` of the S3 at `endpoint` (credentials from the environment).
fn backup_spec(endpoint: &str, bucket: &str) -> String {
    format!(
        "apiVersion: atlas.dev/v1alpha1\nkind: MinecraftServer\nmetadata: {{name: smoke}}\nspec:\n  eula: true\n  \
         server: {{type: custom, version: \"1.21.4\", jar: fake-server.jar}}\n  backup:\n    schedule: \"0 * * * *\"\n    \
         store: {{s3: {{bucket: {bucket}, endpoint: \"{endpoint}\", region: {region}, pathStyle: true}}}}\n",
        region = atlas_testbed::S3_REGION
    )
}

fn node_port_service() -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": NAME},
        "spec": {
            "type": "NodePort",
            "selector": labels(),
            "ports": [{"name": "metrics", "port": 9100, "targetPort": "metrics"}],
        },
    })
}

fn stateful_set(image: &str) -> serde_json::Value {
    let mounts = serde_json::json!([
        {"name": "data", "mountPath": "/data"},
        {"name": "fixture", "mountPath": "/fixture"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]);
    // The pod contract's security context (docs/design/pod-contract.md), so the node shows it works.
    let container_security = serde_json::json!({
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
    });
    serde_json::json!({
        "metadata": {"name": NAME},
        "spec": {
            "serviceName": NAME,
            "replicas": 1,
            "selector": {"matchLabels": labels()},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "serviceAccountName": NAME,
                    "securityContext": {
                        "runAsUser": 10001, "runAsGroup": 10001, "runAsNonRoot": true,
                        "fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch",
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "initContainers": [{
                        "name": "selfget",
                        "image": image,
                        "imagePullPolicy": "Never",
                        // The JREs are where the runner looks (/usr/lib/jvm/NAME/), not on PATH.
                        "command": ["sh", "-c",
                            "cp /fixture/fake-server.jar /data/fake-server.jar && \
                             for java in /usr/lib/jvm/*/bin/java; do exec \"$java\" -cp /fixture/selfget.jar SelfGet; done"],
                        "securityContext": container_security,
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "volumeMounts": mounts,
                    }],
                    "containers": [{
                        "name": "server",
                        "image": image,
                        "imagePullPolicy": "Never",
                        // No Mojang lookup leaves the pod: the manifest URL is a closed loopback port,
                        // so the custom jar gets the runner's fallback Java (21).
                        "args": ["run", "--spec", "/fixture/server.yaml", "--data", "/data",
                                 "--metrics-addr", "0.0.0.0:9100",
                                 "--mojang-manifest-url", "http://127.0.0.1:1/manifest.json"],
                        "ports": [{"name": "metrics", "containerPort": 9100}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 1},
                        "volumeMounts": mounts,
                        "securityContext": container_security,
                    }],
                    "volumes": [
                        {"name": "fixture", "configMap": {"name": format!("{NAME}-fixture")}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
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

// ---------------------------------------------------------------------------------------------------
// Helpers

async fn node_internal_ip(ns: &TestNamespace) -> Result<String> {
    let node = Api::<Node>::all(ns.client.clone()).get(atlas_testbed::node::NODE_NAME).await?;
    node.status
        .and_then(|s| s.addresses)
        .and_then(|a| a.into_iter().find(|a| a.type_ == "InternalIP"))
        .map(|a| a.address)
        .context("the node has no InternalIP")
}

/// `tests/fixtures/SelfGet.java` compiled for Java 17 into a jar, kept under the target dir.
fn selfget_jar() -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/SelfGet.java");
    let digest = hex::encode(Sha256::digest(std::fs::read(&source)?));
    let jar = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("selfget-{}.jar", &digest[..16]));
    if jar.is_file() {
        return Ok(jar);
    }
    let staging = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("selfget-build"));
    let classes = staging.join("classes");
    std::fs::create_dir_all(&classes)?;
    common::run_tool(
        Command::new(common::java_tool("javac")?)
            .args(["--release", "17", "-Xlint:all", "-Werror", "-d"])
            .arg(&classes)
            .arg(&source),
    )?;
    let built = staging.join("selfget.jar");
    common::run_tool(
        Command::new(common::java_tool("jar")?)
            .arg("--create")
            .arg("--file")
            .arg(&built)
            .arg("-C")
            .arg(&classes)
            .arg("."),
    )?;
    std::fs::rename(&built, &jar)?;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(jar)
}
