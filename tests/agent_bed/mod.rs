//! Test support for the in-pod agent run as a process against a real API server: the CRD, the
//! agent's ServiceAccount with exactly the Role of docs/design/pod-contract.md and a token for it
//! (never admin), the secrets directory as the operator mounts it, the agent process with its logs
//! and its stdout (the server's output), and a pack hub that can be taken down.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atlas_runner::api::MinecraftServer;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::common::{self, Fixture};

use crate::common::{ADMIN, install_crd};

/// The Role of docs/design/pod-contract.md for server `name`, word for word.
pub fn agent_role(name: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": format!("{name}-agent")},
        "rules": [
            {"apiGroups": ["atlas.dev"], "resources": ["minecraftservers"], "resourceNames": [name], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["atlas.dev"], "resources": ["minecraftservers/status"], "resourceNames": [name], "verbs": ["patch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ],
    })
}

/// One server's corner of a cluster: its namespace, its resource's name, the agent's token
/// kubeconfig, and the secrets directory.
pub struct AgentBed {
    /// An admin client.
    pub client: kube::Client,
    /// The namespace.
    pub ns: String,
    /// The MinecraftServer's name.
    pub name: String,
    /// A kubeconfig with the agent's ServiceAccount token (bound to the contract's Role only).
    pub kubeconfig: PathBuf,
    /// The admin kubeconfig.
    pub admin_kubeconfig: PathBuf,
    /// Where the Secrets are "mounted" (`SECRETS/NAME/KEY`).
    pub secrets: PathBuf,
}

impl AgentBed {
    /// Sets up server `name` in the fresh namespace `ns`: the CRD, ServiceAccount `NAME-agent`, the
    /// contract's Role and its RoleBinding, a token, and the generated RCON Secret's file under
    /// `root/secrets`.
    pub async fn new(admin_kubeconfig: &Path, client: kube::Client, ns: &str, name: &str, root: &Path) -> Result<Self> {
        install_crd(&client).await?;
        let agent = format!("{name}-agent");
        let params = PatchParams::apply(ADMIN).force();
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        accounts
            .patch(
                &agent,
                &params,
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": agent}})),
            )
            .await?;
        let roles: Api<Role> = Api::namespaced(client.clone(), ns);
        roles.patch(&agent, &params, &Patch::Apply(agent_role(name))).await?;
        let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
        bindings
            .patch(
                &agent,
                &params,
                &Patch::Apply(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": agent},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": agent},
                    "subjects": [{"kind": "ServiceAccount", "name": agent, "namespace": ns}],
                })),
            )
            .await?;
        let request = TokenRequest {
            spec: TokenRequestSpec { expiration_seconds: Some(3600), ..TokenRequestSpec::default() },
            ..TokenRequest::default()
        };
        let token = accounts
            .create_token_request(&agent, &PostParams::default(), &request)
            .await?
            .status
            .context("the TokenRequest has no status")?
            .token;
        std::fs::create_dir_all(root)?;
        let kubeconfig = root.join("agent-kubeconfig");
        std::fs::write(&kubeconfig, token_kubeconfig(admin_kubeconfig, ns, &token)?)?;
        let secrets = root.join("secrets");
        write_secret(&secrets, &format!("{name}-rcon"), "password", &atlas_testbed::unique("rcon-password"))?;
        Ok(Self {
            client,
            ns: ns.to_owned(),
            name: name.to_owned(),
            kubeconfig,
            admin_kubeconfig: admin_kubeconfig.to_owned(),
            secrets,
        })
    }

    /// The MinecraftServers of the namespace, as the admin.
    pub fn api(&self) -> Api<MinecraftServer> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Applies the resource with `spec` (server-side, as an admin's `kubectl apply --server-side`).
    pub async fn apply(&self, spec: &Value) -> Result<MinecraftServer> {
        let doc = json!({
            "apiVersion": "atlas.dev/v1alpha1",
            "kind": "MinecraftServer",
            "metadata": {"name": self.name},
            "spec": spec,
        });
        Ok(self.api().patch(&self.name, &PatchParams::apply(ADMIN).force(), &Patch::Apply(&doc)).await?)
    }

    /// The resource now.
    pub async fn get(&self) -> Result<MinecraftServer> {
        Ok(self.api().get(&self.name).await?)
    }

    /// Waits until the resource satisfies `check`, failing after `timeout` with the last one seen and
    /// the agent's last log lines.
    pub async fn wait(
        &self,
        agent: &mut Agent,
        what: &str,
        timeout: Duration,
        check: impl Fn(&MinecraftServer) -> bool,
    ) -> Result<MinecraftServer> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(code) = agent.exited()? {
                bail!("the agent exited with {code} while waiting for {what}\n{}", agent.tail(20));
            }
            if let Ok(object) = self.get().await {
                if check(&object) {
                    return Ok(object);
                }
                last = Some(object);
            }
            if Instant::now() > deadline {
                let status = last.as_ref().map(|o| serde_json::to_string_pretty(&o.status).unwrap_or_default());
                bail!("timed out after {timeout:?} waiting for {what}; last status: {status:?}\n{}", agent.tail(25));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Events about the resource (events.k8s.io/v1), oldest first.
    pub async fn events(&self) -> Result<Vec<k8s_openapi::api::events::v1::Event>> {
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        let mut events: Vec<_> = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(self.name.as_str()))
            .collect();
        events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        Ok(events)
    }

    /// The reasons of the Events about the resource, oldest first.
    pub async fn event_reasons(&self) -> Result<Vec<String>> {
        Ok(self.events().await?.into_iter().filter_map(|e| e.reason).collect())
    }

    /// Waits until an Event with `reason` is there, and returns its note.
    pub async fn wait_event(&self, reason: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events().await?;
            if let Some(event) = events.iter().find(|e| e.reason.as_deref() == Some(reason)) {
                return Ok(event.note.clone().unwrap_or_default());
            }
            if Instant::now() > deadline {
                let seen: Vec<_> = events.iter().filter_map(|e| e.reason.clone()).collect();
                bail!("no {reason} Event after {timeout:?}; seen: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Writes `SECRETS/NAME/KEY` as a Secret volume would (the whole Secret under its name).
pub fn write_secret(secrets: &Path, name: &str, key: &str, value: &str) -> Result<()> {
    let dir = secrets.join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(key), value)?;
    Ok(())
}

/// A kubeconfig for the admin kubeconfig's API server, authenticating with `token` only.
fn token_kubeconfig(admin: &Path, ns: &str, token: &str) -> Result<String> {
    let config = kube::config::Kubeconfig::read_from(admin)?;
    let cluster = config.clusters.first().and_then(|c| c.cluster.as_ref()).context("a cluster in the kubeconfig")?;
    let server = cluster.server.clone().context("a server URL")?;
    let ca = cluster.certificate_authority.clone().context("a CA file")?;
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: bed\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: agent\n  context: {{cluster: bed, user: agent, namespace: {ns}}}\ncurrent-context: agent\n"
    ))
}

/// A client that uses only the agent's token.
pub async fn agent_client(bed: &AgentBed) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&bed.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// The fake server as a `custom` server (its jar in the data dir), with test ports.
pub fn fake_spec(fixture: &Fixture) -> Value {
    json!({
        "eula": true,
        "server": {"type": "custom", "version": "1.21.4", "jar": "fake-server.jar"},
        "jvm": {"heap": "256M", "flags": "none"},
        "rcon": {"port": fixture.rcon_port},
        "properties": {"server-port": fixture.game_port.to_string(), "motd": "hello"},
    })
}

/// `atlas-runner agent` as a child process with the agent's token, JSON logs (stderr) and the
/// server's output (stdout) captured; stopped with SIGTERM on drop.
pub struct Agent {
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
    output: Arc<Mutex<Vec<String>>>,
    /// The admin address.
    pub metrics_addr: String,
    /// The data dir.
    pub data: PathBuf,
    /// Holds the refusing port the manifest URL names.
    _refusing: Option<tokio::net::TcpSocket>,
}

impl Agent {
    /// Starts the agent for `bed`'s server on `fixture`'s data dir, with fast test timings and `extra`
    /// arguments.
    pub fn start(bed: &AgentBed, fixture: &Fixture, extra: &[&str]) -> Result<Self> {
        Self::start_wrapped(bed, fixture, &[], extra)
    }

    /// [`Agent::start`] under `wrapper` (a command and its arguments the agent is run by, as
    /// `unshare --pid --fork`).
    pub fn start_wrapped(bed: &AgentBed, fixture: &Fixture, wrapper: &[&str], extra: &[&str]) -> Result<Self> {
        let metrics_addr = format!("127.0.0.1:{}", common::free_port()?);
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(common::binary());
                command
            }
            None => Command::new(common::binary()),
        };
        let has = |flag: &str| extra.contains(&flag);
        // No lookup leaves the machine: unless the test passes its own stand-in, the manifest URL is a
        // loopback port that refuses connections (held for the agent's life).
        let (manifest_url, refusing) = if has("--mojang-manifest-url") {
            (None, None)
        } else {
            let (address, socket) = common::refusing_address()?;
            (Some(format!("http://{address}/manifest.json")), Some(socket))
        };
        command
            .args(["--log-format", "json", "agent", "--name", &bed.name, "--namespace", &bed.ns, "--data"])
            .arg(&fixture.data)
            .arg("--secrets-dir")
            .arg(&bed.secrets)
            .args(["--metrics-addr", &metrics_addr, "--poll-ms", "200", "--restart-delay-ms", "200"])
            .args(if has("--stop-timeout") { &[][..] } else { &["--stop-timeout", "5"][..] })
            .args(if has("--update-settle") { &[][..] } else { &["--update-settle", "2"][..] })
            .args(manifest_url.iter().flat_map(|url| ["--mojang-manifest-url", url.as_str()]))
            .args(extra)
            .env("KUBECONFIG", &bed.kubeconfig)
            .env("RUST_LOG", "info")
            // Nothing of the admin's: the agent gets its own token only.
            .env_remove("ATLAS_TEST_KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let value = serde_json::from_str(&line).unwrap_or(json!({ "raw": line }));
                    if let Ok(mut logs) = logs.lock() {
                        logs.push(value);
                    }
                }
            });
        }
        let output = Arc::new(Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(mut output) = output.lock() {
                        output.push(line);
                    }
                }
            });
        }
        Ok(Self { child, logs, output, metrics_addr, data: fixture.data.clone(), _refusing: refusing })
    }

    /// Log lines (JSON) whose message contains `text`.
    pub fn logs_with(&self, text: &str) -> Vec<Value> {
        self.logs
            .lock()
            .map(|logs| {
                logs.iter()
                    .filter(|l| l["message"].as_str().or(l["raw"].as_str()).is_some_and(|m| m.contains(text)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The agent's stdout lines so far.
    pub fn output(&self) -> Vec<String> {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// The last `n` log lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        logs.iter().rev().take(n).rev().map(Value::to_string).collect::<Vec<_>>().join("\n")
    }

    /// The agent's (or its wrapper's) pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Sends `signal` (`TERM`, `KILL`) to the agent's process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status()?;
        ensure!(status.success(), "kill -s {signal} failed");
        Ok(())
    }

    /// Waits for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        common::wait_for("the agent to exit", timeout, || self.child.try_wait().ok().flatten())
    }

    /// `atlas-runner status --json` through the control socket.
    pub fn runner_status(&self) -> Result<Value> {
        let out = common::cli(&self.data, &["status", "--json"])?;
        ensure!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// [`Agent::console`], tried again for a few seconds while RCON is not up yet (it starts just
    /// after the server says it is ready).
    pub fn console_soon(&self, command: &[&str]) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.console(command) {
                Err(e) if Instant::now() < deadline && e.to_string().contains("RCON") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// `atlas-runner console COMMAND...` through the control socket.
    pub fn console(&self, command: &[&str]) -> Result<String> {
        let mut args = vec!["console"];
        args.extend_from_slice(command);
        let out = common::cli(&self.data, &args)?;
        ensure!(out.status.success(), "console failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-s", "TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(25);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files served over HTTP on loopback until [`Hub::stop`], which closes the port (connections are
/// refused from then on, as with a hub that is down).
pub struct Hub {
    /// `http://ADDRESS:PORT`
    pub base: String,
    /// Path -> body; change it while serving.
    pub files: common::ServedFiles,
    /// The `Authorization` header of every request, in order (empty when there was none).
    pub authorizations: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The path of a hub channel's answer.
pub fn channel_path(pack: &str, channel: &str) -> String {
    format!("/api/v1/packs/{pack}/channels/{channel}")
}

impl Hub {
    /// Starts serving (nothing yet).
    pub fn start() -> Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// Starts serving (nothing yet) on `address` (the node bed's host address for pods to reach).
    pub fn start_on(address: std::net::Ipv4Addr) -> Result<Self> {
        let listener = std::net::TcpListener::bind((address, 0))?;
        let base = format!("http://{}", listener.local_addr()?);
        let files = common::ServedFiles::default();
        let authorizations = Arc::default();
        let (stop, thread) = Self::serve(listener, files.clone(), Arc::clone(&authorizations))?;
        Ok(Self { base, files, authorizations, stop: Some(stop), thread: Some(thread) })
    }

    /// Serves the same files again at the address the stopped hub had: the hub is back.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let listener = std::net::TcpListener::bind(self.base.trim_start_matches("http://"))?;
        let (stop, thread) = Self::serve(listener, self.files.clone(), Arc::clone(&self.authorizations))?;
        (self.stop, self.thread) = (Some(stop), Some(thread));
        Ok(())
    }

    /// Serves `files` on `listener` from a thread of its own until the sender is used.
    fn serve(
        listener: std::net::TcpListener,
        files: common::ServedFiles,
        authorizations: Arc<Mutex<Vec<String>>>,
    ) -> Result<(tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)> {
        let served = files;
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
            let authorization = headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if let Ok(mut seen) = authorizations.lock() {
                seen.push(authorization);
            }
            let body = served.lock().ok().and_then(|files| files.get(uri.path()).cloned());
            async move {
                match body {
                    Some(body) => (axum::http::StatusCode::OK, body),
                    None => (axum::http::StatusCode::NOT_FOUND, Vec::new()),
                }
            }
        });
        listener.set_nonblocking(true)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                }
            });
        });
        Ok((stop_tx, thread))
    }

    /// Publishes `version` of pack `pack` on `channel`, its blob `blob`.
    pub fn publish(&self, pack: &str, channel: &str, version: &str, blob: &[u8]) -> Result<()> {
        let mut files = self.files.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let sha256 = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(blob))
        };
        files.insert(format!("/blobs/{pack}-{version}.tar.zst"), blob.to_vec());
        let answer = json!({
            "version": version,
            "blob": {"url": format!("blobs/{pack}-{version}.tar.zst"), "sha256": sha256, "size": blob.len()},
        });
        files.insert(channel_path(pack, channel), answer.to_string().into_bytes());
        Ok(())
    }

    /// Takes the hub down: its port refuses connections from now on.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A copy of the fake server's jar that behaves as `defaults` says (`crash-after-world=true`...):
/// the resource `fake-server-defaults.properties` added with the JDK's `jar` tool.
pub fn fake_server_jar_with(dir: &Path, name: &str, defaults: &str) -> Result<PathBuf> {
    let work = dir.join(format!("jar-{name}"));
    std::fs::create_dir_all(&work)?;
    let jar = work.join("server.jar");
    std::fs::copy(common::fake_server_jar()?, &jar)?;
    std::fs::write(work.join("fake-server-defaults.properties"), defaults)?;
    common::run_tool(
        Command::new(common::java_tool("jar")?)
            .arg("--update")
            .arg("--file")
            .arg(&jar)
            .arg("-C")
            .arg(&work)
            .arg("fake-server-defaults.properties"),
    )?;
    Ok(jar)
}

/// A loopback stand-in for Mojang's API: the real manifest and the real 1.21.4 version document,
/// rewritten so each listed version's server jar is the given file (with its sha1). Versions besides
/// 1.21.4 reuse 1.21.4's document with their id. Returns the manifest URL.
pub fn mojang_stand_in(versions: &[(&str, &Path)]) -> Result<String> {
    mojang_stand_in_latest(versions, None)
}

/// [`mojang_stand_in`] whose manifest names `latest` (when given) as the newest release.
pub fn mojang_stand_in_latest(versions: &[(&str, &Path)], latest: Option<&str>) -> Result<String> {
    use sha1::{Digest, Sha1};
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mojang");
    let jars: Vec<(String, Vec<u8>)> =
        versions.iter().map(|(v, jar)| Ok(((*v).to_owned(), std::fs::read(jar)?))).collect::<Result<_>>()?;
    let base = common::serve_files(|base| {
        let mut manifest: Value = serde_json::from_slice(&std::fs::read(data.join("version_manifest_v2.json"))?)?;
        let mut files = std::collections::HashMap::new();
        for (version, jar) in &jars {
            let mut document: Value = serde_json::from_slice(&std::fs::read(data.join("1.21.4.json"))?)?;
            document["id"] = version.as_str().into();
            document["downloads"]["server"] = json!({
                "sha1": hex::encode(Sha1::digest(jar)), "size": jar.len(), "url": format!("{base}/{version}/server.jar"),
            });
            let document = serde_json::to_vec(&document)?;
            let entry = manifest["versions"]
                .as_array_mut()
                .and_then(|all| all.iter_mut().find(|v| v["id"] == version.as_str()))
                .with_context(|| format!("{version} in the manifest"))?;
            entry["url"] = format!("{base}/{version}.json").into();
            entry["sha1"] = hex::encode(Sha1::digest(&document)).into();
            files.insert(format!("/{version}.json"), document);
            files.insert(format!("/{version}/server.jar"), jar.clone());
        }
        if let Some(latest) = latest {
            manifest["latest"]["release"] = latest.into();
        }
        files.insert("/manifest.json".to_owned(), serde_json::to_vec(&manifest)?);
        Ok(files)
    })?;
    Ok(format!("{base}/manifest.json"))
}

/// The files of a backup's archive, read by GNU tar and zstd from the object the store holds (a
/// presigned GET with curl), not by our own code: relative path -> bytes.
pub fn backup_files(
    bucket: &atlas_testbed::TestBucket,
    prefix: &str,
    name: &str,
    scratch: &Path,
) -> Result<std::collections::BTreeMap<String, Option<Vec<u8>>>> {
    let url = bucket.presign("GET", &format!("{prefix}archives/{name}.tar.zst"))?;
    let archive = scratch.join(format!("{name}.tar.zst"));
    common::run_tool(Command::new("curl").args(["-sSf", "--noproxy", "*", "-o"]).arg(&archive).arg(url.as_str()))?;
    let out = scratch.join(format!("extract-{name}"));
    std::fs::create_dir_all(&out)?;
    common::run_tool(Command::new("sh").arg("-c").arg(format!(
        "zstd -dc '{}' | tar -x -C '{}'",
        archive.display(),
        out.display()
    )))?;
    common::tree(&out)
}
