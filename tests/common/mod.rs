//! Shared test support: the fake Minecraft server (compiled from Java source at test time) run on its
//! own, and a harness that runs the built `atlas-runner` binary as a user would.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atlas_testbed::unique;
use sha2::{Digest, Sha256};

pub use atlas_testbed::free_port;

/// A loopback address nothing listens on, and the socket that holds its port: bound but never listening,
/// so every connection is refused at once and no other socket can take the port while the socket lives
/// (a port from [`free_port`] is free only until someone else binds it).
pub fn refusing_address() -> Result<(std::net::SocketAddr, tokio::net::TcpSocket)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    Ok((socket.local_addr()?, socket))
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A JDK tool from `$JAVA_HOME/bin` or `PATH`.
pub fn java_tool(name: &str) -> Result<PathBuf> {
    let from_home = std::env::var_os("JAVA_HOME").map(|home| PathBuf::from(home).join("bin").join(name));
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).collect::<Vec<_>>())
        .unwrap_or_default();
    from_home.into_iter().chain(on_path).find(|candidate| candidate.is_file()).with_context(|| {
        format!(
            "`{name}` is not in $JAVA_HOME/bin or on PATH: install a JDK 17 or newer \
             (Debian: `apt-get install openjdk-17-jdk-headless`) or set JAVA_HOME"
        )
    })
}

pub fn run_tool(command: &mut Command) -> Result<()> {
    let out = command.output().with_context(|| format!("run {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `FakeServer.java` compiled with `javac --release 17` and packed into an executable jar. The jar is kept
/// under the target dir, named by the source's hash, so test processes share it until the source changes.
pub fn fake_server_jar() -> Result<PathBuf> {
    static JAR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    JAR.get_or_init(|| build_fake_server_jar().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn build_fake_server_jar() -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/FakeServer.java");
    let digest = hex::encode(Sha256::digest(std::fs::read(&source).context("read FakeServer.java")?));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fake-server-{}", &digest[..16]));
    let jar = dir.join("fake-server.jar");
    if jar.is_file() {
        return Ok(jar);
    }
    // Built aside and renamed into place, so a concurrent test process never sees half a jar.
    let staging = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("fake-server-build"));
    let classes = staging.join("classes");
    std::fs::create_dir_all(&classes)?;
    run_tool(
        Command::new(java_tool("javac")?)
            .args(["--release", "17", "-Xlint:all", "-Werror", "-d"])
            .arg(&classes)
            .arg(&source),
    )?;
    let manifest = staging.join("manifest.txt");
    std::fs::write(&manifest, "Main-Class: FakeServer\n")?;
    run_tool(
        Command::new(java_tool("jar")?)
            .arg("--create")
            .arg("--file")
            .arg(staging.join("fake-server.jar"))
            .arg("--manifest")
            .arg(&manifest)
            .arg("-C")
            .arg(&classes)
            .arg("."),
    )?;
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process won the race; its jar is as good as ours.
        let _ = std::fs::remove_dir_all(&staging);
    }
    ensure!(jar.is_file(), "{} was not created", jar.display());
    Ok(jar)
}

/// The fake server (`java -jar fake-server.jar nogui`) run on its own in a data dir that holds its
/// `server.properties`, every output line collected; killed and reaped on drop, whatever the test's outcome.
pub struct FakeServer {
    child: Child,
    stdin: Option<ChildStdin>,
    log: Arc<Mutex<Vec<String>>>,
}

impl FakeServer {
    /// Starts the fake server in `data` and waits until RCON listens (like vanilla, after "Done").
    pub fn start(data: &Path) -> Result<Self> {
        let mut child = Command::new(java_tool("java")?)
            .args(["-Xmx64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-jar"])
            .arg(fake_server_jar()?)
            .arg("nogui")
            .current_dir(data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start the fake server")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        collect_lines(child.stdout.take().context("fake server stdout")?, "", log.clone());
        collect_lines(child.stderr.take().context("fake server stderr")?, "stderr: ", log.clone());
        let stdin = child.stdin.take();
        let mut server = Self { child, stdin, log };
        // Generous: the JVMs of parallel tests share two cores.
        server.wait_for_line("Done (", Duration::from_secs(60))?;
        server.wait_for_line("RCON running on", Duration::from_secs(60))?;
        Ok(server)
    }

    /// Every line printed so far, stderr's prefixed `stderr: `.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().map(|lines| lines.clone()).unwrap_or_default()
    }

    /// [`FakeServer::log_lines`] joined.
    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Polls the output until a line contains `needle` and returns it; fails early if the process exits.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("fake server exited ({status}) before printing {needle:?}:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("fake server did not print {needle:?} within {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("fake server still running after {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `command` on the server's console (its stdin).
    pub fn console(&mut self, command: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("fake server stdin is closed")?;
        writeln!(stdin, "{command}")?;
        Ok(stdin.flush()?)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Collects the lines of `stream` into `log` (each with `prefix`) on a thread of its own until it ends.
fn collect_lines(stream: impl Read + Send + 'static, prefix: &'static str, log: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Ok(mut lines) = log.lock() {
                lines.push(format!("{prefix}{line}"));
            }
        }
    });
}

/// A data dir with the fake server jar in it and a spec file next to it.
pub struct Fixture {
    /// Holds the temp dir.
    pub root: PathBuf,
    /// The data dir.
    pub data: PathBuf,
    /// The spec file.
    pub spec: PathBuf,
    /// The RCON port the spec sets.
    pub rcon_port: u16,
    /// The game port the spec sets.
    pub game_port: u16,
}

impl Fixture {
    /// A fixture whose spec runs the fake server as a `custom` server.
    pub fn new(name: &str) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("atlas-{name}-{}-{}", std::process::id(), free_port()?));
        let data = root.join("data");
        std::fs::create_dir_all(&data)?;
        std::fs::copy(fake_server_jar()?, data.join("fake-server.jar"))?;
        let fixture =
            Self { spec: root.join("server.yaml"), root, data, rcon_port: free_port()?, game_port: free_port()? };
        fixture.write_spec("motd: hello")?;
        Ok(fixture)
    }

    /// Writes the spec with `properties` (YAML mapping lines at two-space indent, joined by `\n`).
    pub fn write_spec(&self, properties: &str) -> Result<()> {
        self.write_spec_for("{type: custom, version: \"1.21.4\", jar: fake-server.jar}", properties)
    }

    /// Writes the spec with `server` (a YAML flow mapping for `spec.server`) and `properties`.
    pub fn write_spec_for(&self, server: &str, properties: &str) -> Result<()> {
        let props: String = properties.lines().map(|l| format!("    {l}\n")).collect();
        let spec = format!(
            "apiVersion: atlas.dev/v1alpha1\nkind: MinecraftServer\nmetadata: {{name: test}}\nspec:\n  eula: true\n  server: {server}\n  jvm: {{heap: 256M, flags: none}}\n  rcon: {{port: {}}}\n  properties:\n    server-port: \"{}\"\n{props}",
            self.rcon_port, self.game_port
        );
        // Write then rename, so the runner never reads half a file.
        let tmp = self.root.join("server.yaml.tmp");
        std::fs::write(&tmp, spec)?;
        std::fs::rename(&tmp, &self.spec)?;
        Ok(())
    }

    /// Writes `fake-server.properties` (the fake server's test behaviour).
    pub fn behaviour(&self, text: &str) -> Result<()> {
        Ok(std::fs::write(self.data.join("fake-server.properties"), text)?)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `atlas-runner run` as a child process, JSON logs captured, killed on drop.
pub struct Runner {
    child: Child,
    /// Holds the port of the stand-in manifest URL that refuses every connection.
    _refusing: Option<tokio::net::TcpSocket>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The admin address.
    pub metrics_addr: String,
    /// The data dir.
    pub data: PathBuf,
}

/// The built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_atlas-runner")
}

/// Runs a CLI subcommand against a data dir.
pub fn cli(data: &Path, args: &[&str]) -> Result<Output> {
    // `--data` goes right after the subcommand: `console` takes the rest of the line as the command.
    let (subcommand, rest) = args.split_first().context("a subcommand")?;
    Ok(Command::new(binary()).arg(subcommand).arg("--data").arg(data).args(rest).output()?)
}

impl Runner {
    /// Starts the runner on `fixture` with fast test timings plus `extra` arguments.
    pub fn start(fixture: &Fixture, extra: &[&str]) -> Result<Self> {
        Self::start_with_env(fixture, extra, &[])
    }

    /// [`Runner::start`] with extra environment variables.
    pub fn start_with_env(fixture: &Fixture, extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        // No Mojang lookups leave the machine: unless a test passes its own stand-in, the version manifest
        // URL points at a loopback port that refuses connections.
        let (manifest_url, refusing) = if extra.contains(&"--mojang-manifest-url") {
            (None, None)
        } else {
            let (address, socket) = refusing_address()?;
            (Some(format!("http://{address}/manifest.json")), Some(socket))
        };
        let mut child = Command::new(binary())
            .args(["--log-format", "json", "run", "--spec"])
            .arg(&fixture.spec)
            .arg("--data")
            .arg(&fixture.data)
            .args(["--metrics-addr", &metrics_addr, "--poll-ms", "200", "--spec-poll-ms", "200"])
            .args(if extra.contains(&"--stop-timeout") { &[][..] } else { &["--stop-timeout", "5"][..] })
            .args(["--restart-delay-ms", "200"])
            .args(manifest_url.iter().flat_map(|url| ["--mojang-manifest-url", url.as_str()]))
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let value = serde_json::from_str(&line).unwrap_or(serde_json::json!({ "raw": line }));
                    if let Ok(mut logs) = logs.lock() {
                        logs.push(value);
                    }
                }
            });
        }
        Ok(Self { child, _refusing: refusing, logs, metrics_addr, data: fixture.data.clone() })
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Log lines whose message contains `text`.
    pub fn logs_with(&self, text: &str) -> Vec<serde_json::Value> {
        self.logs()
            .into_iter()
            .filter(|l| l["message"].as_str().or(l["raw"].as_str()).is_some_and(|m| m.contains(text)))
            .collect()
    }

    /// `atlas-runner status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = cli(&self.data, &["status", "--json"])?;
        if !out.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until the status satisfies `check`.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let result = wait_for(what, timeout, || {
            if let Ok(Some(code)) = self.child.try_wait() {
                return Some(Err(anyhow::anyhow!("runner exited with {code} while waiting for {what}")));
            }
            self.status().ok().filter(|s| check(s)).map(Ok)
        });
        match result {
            Ok(inner) => inner,
            Err(e) => {
                let tail: Vec<String> = self.logs().iter().rev().take(15).map(|l| l.to_string()).collect();
                Err(e.context(format!("last status: {:?}\nlast logs:\n{}", self.status().ok(), tail.join("\n"))))
            }
        }
    }

    /// Waits until the server is Running.
    pub fn wait_running(&mut self) -> Result<serde_json::Value> {
        self.wait_status("phase Running", Duration::from_secs(60), |s| s["phase"] == "Running")
    }

    /// The runner's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the runner to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        wait_for("the runner to exit", timeout, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // SIGTERM first so the runner stops its server; SIGKILL if it does not finish.
        let _ = Command::new("kill").args(["-s", "TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP GET over loopback with a plain TCP socket (status code, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status code")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

/// The generation of a consistent region file, or an error saying how it is torn (format documented in
/// FakeServer.java).
pub fn region_generation(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    ensure!(bytes.len() >= 52 && &bytes[..8] == b"ATLASMCA", "{} has no region header", path.display());
    let generation = u64::from_be_bytes(bytes[8..16].try_into()?);
    let len = usize::try_from(u32::from_be_bytes(bytes[16..20].try_into()?))?;
    ensure!(bytes.len() == 52 + len, "region file is {} bytes, header says {}", bytes.len(), 52 + len);
    ensure!(Sha256::digest(&bytes[52..])[..] == bytes[20..52], "region file generation {generation} is torn");
    Ok(generation)
}

/// Serves fixed files over HTTP on loopback from a background thread for the rest of the test
/// process. `files` gets the base URL (`http://127.0.0.1:PORT`), since documents often link to their
/// own server, and returns path -> body. Returns the base URL.
pub fn serve_files(files: impl FnOnce(&str) -> Result<std::collections::HashMap<String, Vec<u8>>>) -> Result<String> {
    let (base, served) = serve_changing_files()?;
    let files = files(&base)?;
    served.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.extend(files);
    Ok(base)
}

/// Files a test may change while they are served: path -> body.
pub type ServedFiles = Arc<Mutex<std::collections::HashMap<String, Vec<u8>>>>;

/// The path of every request a stand-in answered, in order.
pub type RequestLog = Arc<Mutex<Vec<String>>>;

/// Like [`serve_files`], starting empty: returns the base URL and the files, which the test fills and
/// changes as it goes.
pub fn serve_changing_files() -> Result<(String, ServedFiles)> {
    serve_changing_files_logged().map(|(base, files, _)| (base, files))
}

/// [`serve_changing_files`], also returning the path of every request served.
pub fn serve_changing_files_logged() -> Result<(String, ServedFiles, RequestLog)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let files = ServedFiles::default();
    let requests = RequestLog::default();
    let (served, seen) = (files.clone(), requests.clone());
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        if let Ok(mut seen) = seen.lock() {
            seen.push(uri.path().to_owned());
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
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                let _ = axum::serve(listener, app).await;
            }
        })
    });
    Ok((base, files, requests))
}

/// Every file and directory under `root` (relative paths), with each file's bytes.
pub fn tree(root: &Path) -> Result<std::collections::BTreeMap<String, Option<Vec<u8>>>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Option<Vec<u8>>>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?.display().to_string();
            if path.is_dir() {
                out.insert(rel, None);
                walk(root, &path, out)?;
            } else {
                out.insert(rel, Some(std::fs::read(&path)?));
            }
        }
        Ok(())
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// Fails unless `promtool check metrics` (Prometheus' own linter, from the test bed) accepts `body`.
pub fn promtool_check(body: &str) -> Result<()> {
    let mut check = Command::new(atlas_testbed::bin("promtool")?)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    Write::write_all(&mut check.stdin.take().context("promtool's stdin")?, body.as_bytes())?;
    let out = check.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A backup store spec for `bucket` of the test bed's S3, under `prefix`.
pub fn s3_spec(bucket: &atlas_testbed::TestBucket, prefix: &str) -> atlas_runner::api::BackupStore {
    atlas_runner::api::BackupStore {
        s3: Some(atlas_runner::api::S3Store {
            bucket: bucket.name.clone(),
            prefix: prefix.to_owned(),
            endpoint: Some(bucket.s3.endpoint.clone()),
            region: bucket.region.clone(),
            path_style: Some(true),
            credentials_secret_ref: None,
            credentials_file: None,
        }),
        local: None,
    }
}

// ---- Files, digests and one-line errors ----

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A shell command line run in `dir` by bash, failing on any failing part of a pipe (archives are made the
/// way a person types them).
pub fn sh(dir: &Path, line: &str) -> Result<()> {
    run_tool(Command::new("bash").args(["-o", "pipefail", "-ec"]).arg(line).current_dir(dir))
}

/// The files under `root`, `.atlas` left out: path -> bytes.
pub fn files_under(root: &Path) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
    Ok(tree(root)?
        .into_iter()
        .filter(|(path, _)| path != ".atlas" && !path.starts_with(".atlas/"))
        .filter_map(|(path, content)| content.map(|c| (path, c)))
        .collect())
}

/// [`files_under`] by content digest, for trees too big to keep two of.
pub fn file_digests(root: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    Ok(files_under(root)?.into_iter().map(|(path, content)| (path, sha256_hex(&content))).collect())
}

/// The files of a data dir from [`data_dir`] that no pack owns: a world and a file of the user's.
pub fn user_files() -> std::collections::BTreeMap<String, Vec<u8>> {
    [("world/level.dat", &b"level"[..]), ("notes.txt", b"mine")]
        .into_iter()
        .map(|(path, content)| (path.to_owned(), content.to_vec()))
        .collect()
}

/// A data dir `root/name` holding [`user_files`].
pub fn data_dir(root: &Path, name: &str) -> Result<PathBuf> {
    let data = root.join(name);
    for (path, content) in user_files() {
        let target = data.join(path);
        std::fs::create_dir_all(target.parent().context("a parent")?)?;
        std::fs::write(target, content)?;
    }
    Ok(data)
}

/// The one `atlas-runner: ...` line a failed command printed on stderr; `what` names the command.
pub fn error_line(out: &Output, what: &str) -> Result<String> {
    ensure!(!out.status.success(), "{what} succeeded:\n{}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("atlas-runner: ")).collect();
    ensure!(lines.len() == 1, "{what}: expected one error line, got:\n{stderr}");
    Ok(lines[0].to_owned())
}

// ---- Backups: a data dir and S3 keys ----

/// A data directory under the target dir with `level-name=LEVEL` in its `server.properties`; removed on drop.
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// A fresh one, named after `prefix`.
    pub fn new(prefix: &str, level: &str) -> Result<Self> {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique(prefix));
        std::fs::create_dir_all(&path)?;
        std::fs::write(path.join("server.properties"), format!("level-name={level}\n"))?;
        Ok(Self(path))
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The key pair of an S3 endpoint of the test bed.
pub fn s3_credentials(s3: &atlas_testbed::S3Endpoint) -> atlas_runner::backup::store::S3Credentials {
    atlas_runner::backup::store::S3Credentials {
        access_key_id: s3.access_key.clone(),
        secret_access_key: s3.secret_key.clone(),
        session_token: None,
    }
}

// ---- kill -9 at many points of a command ----

/// Spawns `command` with its stderr read on a thread of its own: the receiver gets the instant of each line
/// holding `needle` (a log line the command prints just before the step a test kills it in).
pub fn spawn_watching(
    command: &mut Command,
    needle: &'static str,
) -> Result<(Child, std::sync::mpsc::Receiver<Instant>)> {
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(needle) {
                let _ = tx.send(Instant::now());
            }
        }
    });
    Ok((child, rx))
}

/// Where a kill -9 test kills its command: `runs` kills, the even ones spread over a whole run (`full`, so
/// start-up and everything before the step are hit too), the odd ones over the step itself (`step`, from the
/// line [`spawn_watching`] watches for); then, should none have landed inside the step (a loaded machine's
/// timing), up to `runs` more aimed at it.
#[derive(Debug, Clone, Copy)]
pub struct KillSchedule {
    /// Kills in the first round, and at most as many aimed ones after it.
    pub runs: usize,
    /// How long an undisturbed run took.
    pub full: Duration,
    /// How long its step took, from the line before it to the end of the run.
    pub step: Duration,
}

impl KillSchedule {
    /// Measures one undisturbed run of `child`, started at `started`: its whole length and its step's. Returns
    /// how it exited, for the caller to check.
    pub fn measure(
        runs: usize,
        started: Instant,
        child: &mut Child,
        step_begins: &std::sync::mpsc::Receiver<Instant>,
    ) -> Result<(Self, ExitStatus)> {
        let status = child.wait()?;
        let ended = Instant::now();
        let began = step_begins.recv_timeout(Duration::from_secs(5)).context("the step's line never came")?;
        Ok((Self { runs, full: ended - started, step: ended - began }, status))
    }

    /// Runs the schedule: `start(n)` spawns run `n` (with [`spawn_watching`]), which is killed as scheduled;
    /// `check(n, status)` checks what the kill left and says whether it landed inside the step. Returns how
    /// many runs there were.
    pub fn run(
        &self,
        mut start: impl FnMut(usize) -> Result<(Child, std::sync::mpsc::Receiver<Instant>)>,
        mut check: impl FnMut(usize, ExitStatus) -> Result<bool>,
    ) -> Result<usize> {
        let mut inside = false;
        let mut runs = 0;
        for n in 1..=self.runs * 2 {
            let aimed = n > self.runs;
            if aimed && inside {
                break;
            }
            let (mut child, step_begins) = start(n)?;
            if n % 2 == 0 && !aimed {
                std::thread::sleep(self.full.mul_f64(n as f64 / self.runs as f64));
            } else if let Ok(at) = step_begins.recv_timeout(Duration::from_secs(30)) {
                let offset = self.step.mul_f64(1.2 * (n % self.runs) as f64 / self.runs as f64);
                std::thread::sleep(offset.saturating_sub(at.elapsed()));
            }
            let _ = child.kill(); // SIGKILL
            let status = child.wait()?;
            inside |= check(n, status)?;
            runs += 1;
        }
        Ok(runs)
    }
}

/// Where Mojang's version manifest is on `piston-meta.mojang.com` (the runner's default URL's path).
pub const MOJANG_MANIFEST_PATH: &str = "/mc/game/version_manifest_v2.json";

/// Mojang's API as the runner reads it: the real manifest and the latest release's real version
/// document (tests/data/mojang), with the fake server (built for Java 17) as that release's server
/// jar, its sha1 and size in the document, whose sha1 is in the manifest. Files are at the URL paths
/// Mojang uses (the manifest at [`MOJANG_MANIFEST_PATH`], the document under `/v1/packages/SHA1/`,
/// the jar under `/v1/objects/SHA1/`), and links in them name the hosts `meta` and `data`
/// (`https://piston-meta.mojang.com` and `https://piston-data.mojang.com` for the real names, or one
/// loopback base for both). Returns path -> body.
pub fn mojang_files(meta: &str, data: &str) -> Result<std::collections::HashMap<String, Vec<u8>>> {
    use sha1::Sha1;
    let sha1 = |bytes: &[u8]| hex::encode(Sha1::digest(bytes));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mojang");
    let jar = std::fs::read(fake_server_jar()?)?;
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("version_manifest_v2.json"))?)?;
    let latest = manifest["latest"]["release"].as_str().context("no latest release")?.to_owned();
    let mut document: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(format!("{latest}.json")))?)?;
    let jar_path = format!("/v1/objects/{}/server.jar", sha1(&jar));
    document["downloads"]["server"] =
        serde_json::json!({"sha1": sha1(&jar), "size": jar.len(), "url": format!("{data}{jar_path}")});
    // The jar served is the fake server, built for Java 17: its document says so, so the runner picks
    // any JDK 17+ there is instead of needing the real release's Java 25.
    document["javaVersion"]["majorVersion"] = 17.into();
    let document = serde_json::to_vec(&document)?;
    let document_path = format!("/v1/packages/{}/{latest}.json", sha1(&document));
    let entry = manifest["versions"]
        .as_array_mut()
        .and_then(|versions| versions.iter_mut().find(|v| v["id"] == latest.as_str()))
        .context("the latest release in the manifest")?;
    entry["url"] = format!("{meta}{document_path}").into();
    entry["sha1"] = sha1(&document).into();
    let manifest = serde_json::to_vec(&manifest)?;
    Ok([(MOJANG_MANIFEST_PATH.to_owned(), manifest), (document_path, document), (jar_path, jar)].into_iter().collect())
}

/// Python's HTTPS file server (`http.server` behind `ssl`) serving `root` on `address:port` (port 0:
/// a free one) with the certificate `cert` and its key `key`; stopped on drop.
pub struct HttpsServer {
    child: Child,
    /// The port it listens on.
    pub port: u16,
}

impl HttpsServer {
    pub fn start(root: &Path, cert: &str, key: &str, address: &str, port: u16) -> Result<Self> {
        let script = "import http.server, ssl, sys\n\
            handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=sys.argv[1])\n\
            server = http.server.ThreadingHTTPServer((sys.argv[4], int(sys.argv[5])), handler)\n\
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            context.load_cert_chain(sys.argv[2], sys.argv[3])\n\
            server.socket = context.wrap_socket(server.socket, server_side=True)\n\
            print(server.server_address[1], flush=True)\n\
            server.serve_forever()\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(root)
            .args([cert, key, address, &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start python3's HTTPS server")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
        let Ok(port) = line.trim().parse() else {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            let _ = child.wait();
            bail!("python3's HTTPS server on {address}:{port} did not start: {}", err.trim());
        };
        // Its request log is not read: it must not fill a pipe nobody empties.
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut BufReader::new(stderr), &mut std::io::sink()));
        }
        Ok(Self { child, port })
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kubectl --namespace NS ARGS...` on a bed's cluster: its stdout, or an error with all it printed.
pub fn kubectl(
    cluster: &atlas_testbed::TestCluster,
    ns: &atlas_testbed::TestNamespace,
    args: &[&str],
) -> Result<String> {
    let out = cluster.kubectl()?.args(["--namespace", &ns.name]).args(args).output()?;
    ensure!(
        out.status.success(),
        "kubectl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---- The CRD on an API server ----

/// The field manager the tests apply resources with (an admin's).
pub const ADMIN: &str = "atlas-runner-tests";

/// Installs the CRD by server-side apply (idempotent, so every test may call it) and waits until
/// the API server reports it Established.
pub async fn install_crd(client: &kube::Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use kube::api::{Api, Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = atlas_runner::api::MinecraftServer::crd();
    let name = crd.metadata.name.clone().context("CRD has a name")?;
    crds.patch(&name, &PatchParams::apply(ADMIN).force(), &Patch::Apply(&crd)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let crd = crds.get(&name).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "CRD {name} not Established after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- Packs of the fake server ----

/// The fake server's files as a pack version: its jar (a custom server's jar from the pack), and
/// `extra` files.
pub fn fake_server_pack(dir: &Path, version: &str, extra: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    use atlas_runner::pack::PackVersion;
    use atlas_runner::pack::build::{BuildOptions, build};
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&src)?;
    std::fs::copy(fake_server_jar()?, src.join("fake-server.jar"))?;
    for (path, content) in extra {
        let target = src.join(path);
        std::fs::create_dir_all(target.parent().context("a parent")?)?;
        std::fs::write(target, content)?;
    }
    let out = dir.join(format!("{version}.tar.zst"));
    build(&src, &out, &BuildOptions::new(PackVersion::new(version)?))?;
    Ok(std::fs::read(out)?)
}

/// Waits until the pod `name` (one other than `not_uid`, and not being deleted) is Ready; after
/// `timeout`, fails with what `kubectl describe` and its logs say.
pub async fn wait_pod_ready(
    cluster: &atlas_testbed::TestCluster,
    ns: &atlas_testbed::TestNamespace,
    name: &str,
    not_uid: Option<&str>,
    timeout: Duration,
) -> Result<k8s_openapi::api::core::v1::Pod> {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(cluster.client().await?, &ns.name);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pod) = pods.get_opt(name).await? {
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready && pod.metadata.uid.as_deref() != not_uid && pod.metadata.deletion_timestamp.is_none() {
                return Ok(pod);
            }
        }
        if Instant::now() > deadline {
            let describe = kubectl(cluster, ns, &["describe", "pod", name]).unwrap_or_else(|e| e.to_string());
            let logs = kubectl(cluster, ns, &["logs", name, "--all-containers"]).unwrap_or_else(|e| e.to_string());
            bail!("{name} was not Ready after {timeout:?}:\n{describe}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `cmd` with `stdin` (or none) as its input: whether it succeeded, its stdout and its stderr.
pub fn piped_output(cmd: &mut Command, stdin: Option<&str>) -> Result<(bool, String, String)> {
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {cmd:?}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

/// [`piped_output`] that must succeed: its stdout, or an error with all it printed.
pub fn run_piped(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let (ok, stdout, stderr) = piped_output(cmd, stdin)?;
    ensure!(ok, "{cmd:?} failed: {stdout}{stderr}");
    Ok(stdout)
}

/// The Prometheus Operator's CRDs (cached by the bed's install script) on `cluster`, served: the
/// chart's monitors and rules install, and the operator makes PodMonitors.
pub fn install_monitoring_crds(cluster: &atlas_testbed::TestCluster) -> Result<()> {
    let dir = atlas_testbed::bin_dir().join("prometheus-operator-crds");
    ensure!(dir.is_dir(), "{} is missing: run `make testbed` (scripts/testbed-install.sh)", dir.display());
    run_piped(cluster.kubectl()?.args(["apply", "--server-side", "--force-conflicts", "-f"]).arg(&dir), None)?;
    for kind in ["podmonitors", "servicemonitors", "prometheusrules"] {
        let crd = format!("crd/{kind}.monitoring.coreos.com");
        run_piped(cluster.kubectl()?.args(["wait", "--for=condition=Established", "--timeout=60s", &crd]), None)?;
    }
    Ok(())
}
