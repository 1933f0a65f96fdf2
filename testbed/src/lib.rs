//! The real parts Atlas Runner's tests run against: etcd + kube-apiserver and SeaweedFS S3.
//!
//! One bed serves a whole test run. `atlas-testbed run -- cargo test` starts it once and hands its
//! addresses to the tests through `ATLAS_TEST_*` variables; when those are absent (a lone
//! `cargo test NAME`), the first test that asks starts a private bed for its process. Either way every
//! process is started in its own process group and watched by a reaper that kills the group when the
//! owning process is gone, so a run leaves nothing behind even when it is killed.
//!
//! Tests get isolation, not separate beds: [`TestCluster::namespace`] makes a fresh namespace and
//! [`TestS3::bucket`] a fresh bucket.
//!
//! A test that needs pods asks [`TestCluster::with_nodes`] for a cluster with a node (see [`node`]):
//! the one `atlas-testbed run --nodes` started, else a private one. A test that needs only objects
//! keeps the bare API server, which starts in a second.

use std::ffi::{OsStr, OsString};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub mod image;
pub mod node;
pub mod pki;

/// Environment variables through which a running bed is handed to the tests.
pub mod env {
    /// Directory holding the installed binaries (kube-apiserver, etcd, kubectl, helm, weed, promtool).
    pub const BIN: &str = "ATLAS_TEST_BIN";
    /// Path of an admin kubeconfig for the shared API server.
    pub const KUBECONFIG: &str = "ATLAS_TEST_KUBECONFIG";
    /// `http://127.0.0.1:PORT` of the shared S3 endpoint.
    pub const S3_ENDPOINT: &str = "ATLAS_TEST_S3_ENDPOINT";
    /// Access key of the shared S3 endpoint's admin identity.
    pub const S3_ACCESS_KEY: &str = "ATLAS_TEST_S3_ACCESS_KEY";
    /// Secret key of the shared S3 endpoint's admin identity.
    pub const S3_SECRET_KEY: &str = "ATLAS_TEST_S3_SECRET_KEY";
    /// With a node (`atlas-testbed run --nodes`): an admin kubeconfig for the cluster with the node
    /// (a cluster of its own, beside the bare API server of [`KUBECONFIG`]).
    pub const NODE_KUBECONFIG: &str = "ATLAS_TEST_NODE_KUBECONFIG";
    /// With a node: our image's name as the node knows it (pods use it
    /// with `imagePullPolicy: Never`).
    pub const IMAGE: &str = "ATLAS_TEST_IMAGE";
    /// With a node: the path of our image's config (labels, history) as built from the Dockerfile.
    pub const IMAGE_CONFIG: &str = "ATLAS_TEST_IMAGE_CONFIG";
    /// With a node: the `atlas-runner` binary our image was built around (absolute), so a test that
    /// starts a bed of its own reuses the run's image instead of building another.
    pub const IMAGE_BINARY: &str = "ATLAS_TEST_IMAGE_BINARY";
    /// With a node: an S3 endpoint pods reach (`http://ADDRESS:PORT`, the node bed's host address;
    /// the tests reach it too). A SeaweedFS of its own beside the loopback one of [`S3_ENDPOINT`],
    /// whose virtual-hosted `BUCKET.localhost` names only loopback can serve.
    pub const S3_POD_ENDPOINT: &str = "ATLAS_TEST_S3_POD_ENDPOINT";
    /// Access key of [`S3_POD_ENDPOINT`].
    pub const S3_POD_ACCESS_KEY: &str = "ATLAS_TEST_S3_POD_ACCESS_KEY";
    /// Secret key of [`S3_POD_ENDPOINT`].
    pub const S3_POD_SECRET_KEY: &str = "ATLAS_TEST_S3_POD_SECRET_KEY";
    /// With a node: the node's network namespace as a path (`nsenter --net=PATH ip route`).
    pub const NODE_NETNS: &str = "ATLAS_TEST_NODE_NETNS";
    /// With a node: the node bed's name (`atlas-bed-S`: its host link, cgroup and nftables table).
    pub const NODE_BED: &str = "ATLAS_TEST_NODE_BED";
    /// With a node: the hosts file the bed's cluster DNS reads before the cluster's names
    /// ([`super::TestCluster::point_names`]).
    pub const NODE_HOSTS: &str = "ATLAS_TEST_NODE_HOSTS";
    /// With a node: the socket of the node's containerd ([`super::TestCluster::tag_image`]).
    pub const NODE_CONTAINERD: &str = "ATLAS_TEST_NODE_CONTAINERD";
    /// Read when starting a bed without a node: the API server's Service address range (default
    /// [`super::SERVICE_CIDR`]; the operator's bench needs room for 1,000 Services). A node bed
    /// ignores it.
    pub const SERVICE_CIDR: &str = "ATLAS_TEST_SERVICE_CIDR";
}

/// The region SeaweedFS answers for; any value is accepted, this one is conventional.
pub const S3_REGION: &str = "us-east-1";

pub(crate) const INSTALL_HINT: &str = "run `make testbed` (scripts/testbed-install.sh) to build and cache it";

/// Where the installed binaries are: `$ATLAS_TEST_BIN`, else `~/.cache/atlas-runner/test-bin`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(env::BIN) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/atlas-runner/test-bin")
}

/// The path of an installed test-bed binary, or an error that says how to install it.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if path.exists() {
        Ok(path)
    } else {
        bail!("test-bed binary '{name}' is missing from {}: {INSTALL_HINT}", bin_dir().display())
    }
}

/// Runs `cmd` with stdin closed and returns its stdout; when it cannot start or fails, an error that
/// names the command and carries what it said.
pub fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A free TCP port for a server a test starts later, never handed out twice by this process. It is
/// taken below the kernel's ephemeral range: a port the kernel picks (a `bind` to port 0, an outgoing
/// connection) would otherwise be free to take it between this check and the server's own bind,
/// and a server that cannot bind its port fails (a JVM crash-looping on "Address already in use").
pub fn free_port() -> Result<u16> {
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next().and_then(|low| low.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low);
    if high <= low + 1000 {
        // An unusual range: let the kernel pick, as before.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind a free loopback port")?;
        return Ok(listener.local_addr()?.port());
    }
    let mut handed = HANDED.lock().map_err(|_| anyhow!("the port list lock was poisoned"))?;
    // A small xorshift seeded by the clock and the process: test processes pick different ports.
    let mut seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        ^ (handed.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for _ in 0..1000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = low + (seed % u64::from(high - low)) as u16;
        // Free on every address: a server binding *:PORT needs that, not just loopback.
        if !handed.contains(&port) && TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            handed.push(port);
            return Ok(port);
        }
    }
    bail!("no free port found in {low}..{high}")
}

/// Polls `ready` until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} was not ready after {timeout:?}")
}

fn port_open(ip: Ipv4Addr, port: u16) -> bool {
    let addr = SocketAddr::from((ip, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A unique-enough suffix for namespaces, buckets and directories within one run.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos & 0xffff)
}

/// Whether this process runs as root (its effective uid, the second field of `Uid:` in
/// /proc/self/status, is 0).
pub fn running_as_root() -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1));
    Ok(euid == Some("0"))
}

/// How long a stopped process may take to exit after SIGTERM before it gets SIGKILL. SeaweedFS needs
/// about 4 s (more on a busy machine) to stop its servers.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// The processes a bed owns. Each runs in its own process group; [`Processes::stop`] kills the groups
/// and a reaper does the same if the owner dies first.
#[derive(Debug)]
pub struct Processes {
    dir: PathBuf,
    children: Vec<(String, Child)>,
    reapers: Vec<Child>,
    // False for a node bed's processes: the bed's own reaper stops them (see `node`).
    owner_reapers: bool,
}

impl Processes {
    /// A bed rooted at a fresh directory under the system temp dir.
    pub fn new(name: &str) -> Result<Self> {
        Self::new_in(std::env::temp_dir().join(unique(name)))
    }

    /// A bed rooted at `dir` (created if missing), which [`Processes::stop`] removes.
    pub fn new_in(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self { dir, children: Vec::new(), reapers: Vec::new(), owner_reapers: true })
    }

    /// Starts no reaper per process: for processes a reaper of their own already stops when the
    /// owner dies (a node bed's, whose reaper kills every process naming the bed's directory).
    pub fn reaped_by_bed(mut self) -> Self {
        self.owner_reapers = false;
        self
    }

    /// The bed's working directory (data, certificates, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `program` in its own process group with output to `DIR/NAME.log`, and a reaper that
    /// kills the group once this process exits.
    pub fn spawn<I, S>(&mut self, name: &str, program: &Path, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let pgid = child.id();
        self.children.push((name.to_owned(), child));
        if !self.owner_reapers {
            return Ok(());
        }
        // The reaper outlives a SIGKILLed owner: it polls the owner's pid and then stops the group,
        // giving it the same grace as [`Processes::stop`].
        let reaper = format!(
            "while kill -0 {owner} 2>/dev/null; do sleep 1; done; kill -TERM -{pgid} 2>/dev/null; \
             i=0; while [ $i -lt {grace} ] && kill -0 -{pgid} 2>/dev/null; do sleep 1; i=$((i+1)); done; \
             kill -KILL -{pgid} 2>/dev/null; rm -rf '{dir}'",
            owner = std::process::id(),
            grace = STOP_GRACE.as_secs(),
            dir = self.dir.display()
        );
        let reaper = Command::new("sh")
            .args(["-c", &reaper])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("start the reaper")?;
        self.reapers.push(reaper);
        Ok(())
    }

    /// The PID of the process started as `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.iter().find(|(n, _)| n == name).map(|(_, child)| child.id())
    }

    /// Fails with the tail of the process's log if it has exited.
    pub fn check_alive(&mut self, name: &str) -> Result<()> {
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name)
            && let Some(status) = child.try_wait()?
        {
            bail!("{name} exited with {status}:\n{}", self.log_tail(name, 20));
        }
        Ok(())
    }

    /// The last `lines` lines of the log of the process started as `name` (errors quote it: the
    /// directory holding the log goes with the bed).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Kills the process group of `name`, keeping the bed's directory (its data) for a restart.
    pub fn kill(&mut self, name: &str) {
        if let Some(index) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(index);
            let _ = quiet_kill("KILL", &child.id().to_string());
            let _ = child.wait();
        }
    }

    /// Kills every process group and removes the bed's directory: SIGTERM to all at once, then one
    /// shared [`STOP_GRACE`] for all of them, then SIGKILL to what is left.
    pub fn stop(&mut self) {
        for (_, child) in self.children.iter().rev() {
            let _ = quiet_kill("TERM", &child.id().to_string());
        }
        let deadline = Instant::now() + STOP_GRACE;
        for (_, child) in self.children.iter_mut().rev() {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = quiet_kill("KILL", &child.id().to_string());
            let _ = child.wait();
        }
        self.children.clear();
        for reaper in &mut self.reapers {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        self.reapers.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn quiet_kill(signal: &str, pgid: &str) -> std::io::Result<std::process::ExitStatus> {
    // `--` keeps procps' kill from reading the negative process-group id as an option.
    Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------------
// Kubernetes: etcd + kube-apiserver with a small PKI and an admin kubeconfig

/// A running etcd + kube-apiserver pair.
#[derive(Debug)]
pub struct ClusterProcesses {
    /// The processes; dropping this stops them.
    pub processes: Processes,
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://ADDRESS:PORT` of the API server.
    pub server: String,
    /// The certificates: more clients (a node's components) are signed here.
    pub pki: pki::Pki,
    apiserver_args: Vec<String>,
}

impl ClusterProcesses {
    /// Kills kube-apiserver at once, as an outage would; etcd (the cluster's data) keeps running for
    /// [`ClusterProcesses::restart_apiserver`].
    pub fn kill_apiserver(&mut self) {
        self.processes.kill("kube-apiserver");
    }

    /// Starts kube-apiserver again on the same address, port, certificates and etcd, and waits until
    /// it is ready.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        let apiserver = bin("kube-apiserver")?;
        self.processes.spawn("kube-apiserver", &apiserver, self.apiserver_args.clone())?;
        wait_apiserver_ready(&mut self.processes, &self.kubeconfig)
    }
}

/// How [`start_cluster_with`] starts the API server.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// The one address the API server listens on and advertises (the `kubernetes` Service's endpoint).
    pub address: Ipv4Addr,
    /// A cluster that runs pods: `Node,RBAC` authorization with `NodeRestriction`, the
    /// `ServiceAccount` admission plugin (a controller-manager makes the accounts), a front-proxy CA
    /// and a client certificate for the kubelets. Without it the ServiceAccount admission plugin is
    /// off, since no controller would ever create the `default` account pods wait for.
    pub nodes: bool,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self { address: Ipv4Addr::LOCALHOST, nodes: false }
    }
}

/// The range Services get their virtual addresses from; `.1` is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";

/// Starts etcd and kube-apiserver on free loopback ports and waits until `/readyz` answers ok.
pub fn start_cluster() -> Result<ClusterProcesses> {
    start_cluster_with(&ApiOptions::default(), Processes::new("atlas-cluster")?)
}

/// Starts etcd (on loopback) and kube-apiserver as `options` say, owned by `processes`, and waits
/// until `/readyz` answers ok.
pub fn start_cluster_with(options: &ApiOptions, mut processes: Processes) -> Result<ClusterProcesses> {
    let etcd_bin = bin("etcd")?;
    let apiserver_bin = bin("kube-apiserver")?;
    let dir = processes.dir().to_path_buf();
    let pki = pki::Pki::create(&dir.join("pki"), &[options.address.to_string(), "10.0.0.1".to_owned()])?;

    let (client_port, peer_port) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    processes.spawn(
        "etcd",
        &etcd_bin,
        [
            "--name=default".to_owned(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".to_owned(),
            "--log-level=error".to_owned(),
        ],
    )?;
    wait_until("etcd", Duration::from_secs(30), || port_open(Ipv4Addr::LOCALHOST, client_port))?;
    processes.check_alive("etcd")?;

    let api_port = free_port()?;
    let p = |name: &str| pki.path(name);
    let mut args = vec![
        format!("--etcd-servers={client_url}"),
        format!("--cert-dir={}", dir.join("apiserver-certs").display()),
        format!("--tls-cert-file={}", p("serving.crt")),
        format!("--tls-private-key-file={}", p("serving.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        format!("--secure-port={api_port}"),
        format!("--bind-address={}", options.address),
        format!("--advertise-address={}", options.address),
        // A /24 unless the caller needs more Services (the operator's bench makes 1,000 on a bed
        // without a node). A node bed always has SERVICE_CIDR: its DNS address, its host route
        // keeping the range off the machine and its checks are made for that range.
        format!(
            "--service-cluster-ip-range={}",
            match std::env::var(env::SERVICE_CIDR) {
                Ok(range) if !options.nodes => range,
                _ => SERVICE_CIDR.to_owned(),
            }
        ),
        "--allow-privileged=true".to_owned(),
        "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        "--profiling=false".to_owned(),
        // Webhooks, conversion webhooks and aggregated APIs are dialled at their Service's endpoints
        // (pod addresses, routed over a node bed's link), never at a ClusterIP: the host has no route
        // into the Service range but its default one, which leaves the machine.
        "--enable-aggregator-routing=true".to_owned(),
        "--v=0".to_owned(),
    ];
    if options.nodes {
        // The API server reaches kubelets (logs, exec) as a client the kubelets' webhook authorizes.
        pki.client("apiserver-kubelet-client", "kube-apiserver-kubelet-client", &["system:masters"])?;
        args.extend([
            "--authorization-mode=Node,RBAC".to_owned(),
            "--enable-admission-plugins=NodeRestriction".to_owned(),
            format!("--kubelet-client-certificate={}", p("apiserver-kubelet-client.crt")),
            format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            format!("--kubelet-certificate-authority={}", p("ca.crt")),
            "--kubelet-preferred-address-types=InternalIP".to_owned(),
            // Without a front-proxy CA, controller-manager and scheduler log a missing client-ca bundle.
            format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
            "--requestheader-allowed-names=front-proxy-client".to_owned(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".to_owned(),
            "--requestheader-group-headers=X-Remote-Group".to_owned(),
            "--requestheader-username-headers=X-Remote-User".to_owned(),
            format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
            format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
        ]);
    } else {
        args.extend(["--authorization-mode=RBAC".to_owned(), "--disable-admission-plugins=ServiceAccount".to_owned()]);
    }
    processes.spawn("kube-apiserver", &apiserver_bin, args.clone())?;

    let server = format!("https://{}:{api_port}", options.address);
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, pki.kubeconfig(&server, "admin"))?;
    wait_apiserver_ready(&mut processes, &kubeconfig)?;
    Ok(ClusterProcesses { processes, kubeconfig, server, pki, apiserver_args: args })
}

fn wait_apiserver_ready(processes: &mut Processes, kubeconfig: &Path) -> Result<()> {
    let dir = processes.dir().to_path_buf();
    let kubectl = bin("kubectl")?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        processes.check_alive("kube-apiserver")?;
        let ready = Command::new(&kubectl)
            .args(["--kubeconfig", &kubeconfig.display().to_string(), "get", "--raw", "/readyz"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success() && out.stdout.starts_with(b"ok"));
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("kube-apiserver was not ready after 90 s; see {}", dir.join("kube-apiserver.log").display());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------------------
// S3: SeaweedFS `weed mini`

/// How to reach an S3 endpoint.
#[derive(Debug, Clone)]
pub struct S3Endpoint {
    /// `http://ADDRESS:PORT` (loopback, or the node bed's host address when pods must reach it)
    pub endpoint: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

/// A running SeaweedFS.
#[derive(Debug)]
pub struct S3Processes {
    /// The processes; dropping this stops them.
    pub processes: Processes,
    /// Where and how to reach it.
    pub endpoint: S3Endpoint,
    /// The filer's HTTP address (`http://127.0.0.1:PORT`): SeaweedFS keeps each multipart upload in
    /// progress there as a directory `/buckets/BUCKET/.uploads/ID/` (S3's ListMultipartUploads reads it).
    pub filer: String,
    ip: Ipv4Addr,
    s3_port: u16,
    args: Vec<String>,
}

impl S3Processes {
    /// The port S3 listens on.
    pub fn s3_port(&self) -> u16 {
        self.s3_port
    }

    /// Kills SeaweedFS at once, as an outage would, keeping its data for [`S3Processes::restart`].
    pub fn kill(&mut self) {
        self.processes.kill("weed");
    }

    /// Starts SeaweedFS again on the same ports and data, and waits until S3 answers.
    pub fn restart(&mut self) -> Result<()> {
        let weed = bin("weed")?;
        spawn_weed(&mut self.processes, &weed, &self.args)?;
        wait_s3_ready(&mut self.processes, self.ip, self.s3_port, &self.endpoint)
    }

    /// The ids of the multipart uploads in progress in `bucket`, read from the filer.
    pub async fn uploads_in_progress(&self, bucket: &str) -> Result<Vec<String>> {
        let url = format!("{}/buckets/{bucket}/.uploads/?limit=10000", self.filer);
        let client = reqwest::Client::builder().no_proxy().build()?;
        let response = client.get(&url).header("Accept", "application/json").send().await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {body}");
        }
        let listing: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("GET {url}: {body}"))?;
        Ok(listing["Entries"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| e["FullPath"].as_str().map(|p| p.rsplit('/').next().unwrap_or(p).to_owned()))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Starts `weed mini` with an S3 identity on free loopback ports and waits until S3 answers.
/// Virtual-hosted-style requests work on `BUCKET.localhost:PORT` (path-style ones on any host).
pub fn start_s3() -> Result<S3Processes> {
    start_s3_on(Ipv4Addr::LOCALHOST, Some("localhost"))
}

/// [`start_s3`] with `domain` as the host name suffix of virtual-hosted-style requests; `None`, as
/// SeaweedFS ships, reads every request's bucket from its path.
pub fn start_s3_with_domain(domain: Option<&str>) -> Result<S3Processes> {
    start_s3_on(Ipv4Addr::LOCALHOST, domain)
}

/// Starts `weed mini` with an S3 identity on free ports of `ip` (an address of this machine), with
/// `domain` as in [`start_s3_with_domain`], and waits until S3 answers.
pub fn start_s3_on(ip: Ipv4Addr, domain: Option<&str>) -> Result<S3Processes> {
    let weed = bin("weed")?;
    let mut processes = Processes::new("atlas-s3")?;
    let dir = processes.dir().to_path_buf();
    let access_key = "atlas-test".to_owned();
    let secret_key = unique("secret");
    let config = serde_json::json!({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]});
    std::fs::write(dir.join("s3.json"), serde_json::to_vec(&config)?)?;
    std::fs::create_dir_all(dir.join("data"))?;

    // weed mini opens a port for every component; pin each one to a free port.
    let s3_port = free_port()?;
    let filer_port = free_port()?;
    // Its glog files and the filer's and S3's local sockets would otherwise land in /tmp and stay there.
    let mut args = vec![
        format!("-logdir={}", dir.display()),
        "mini".to_owned(),
        format!("-dir={}", dir.join("data").display()),
        format!("-filer.localSocket={}", dir.join("filer.sock").display()),
        format!("-s3.localSocket={}", dir.join("s3.sock").display()),
        format!("-ip={ip}"),
        format!("-ip.bind={ip}"),
        format!("-s3.config={}", dir.join("s3.json").display()),
        "-admin.ui=false".to_owned(),
        "-webdav=false".to_owned(),
        // On by default: the master would report to telemetry.seaweedfs.com, off the machine.
        "-master.telemetry=false".to_owned(),
        // Every bucket is a collection with a volume of its own, and left at 0 the volume count is
        // free disk space / 128 MB: on a nearly full disk a dozen buckets in, writes fail with
        // InternalError. Volumes are sparse files that grow as written, so a fixed count costs nothing.
        "-volume.max=500".to_owned(),
        format!("-s3.port={s3_port}"),
        format!("-filer.port={filer_port}"),
    ];
    if let Some(domain) = domain {
        args.push(format!("-s3.domainName={domain}"));
    }
    for flag in [
        "master.port",
        "master.port.grpc",
        "filer.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "admin.port",
        "admin.port.grpc",
    ] {
        args.push(format!("-{flag}={}", free_port()?));
    }
    spawn_weed(&mut processes, &weed, &args)?;

    let endpoint = S3Endpoint { endpoint: format!("http://{ip}:{s3_port}"), access_key, secret_key };
    wait_s3_ready(&mut processes, ip, s3_port, &endpoint)?;
    Ok(S3Processes { processes, endpoint, filer: format!("http://{ip}:{filer_port}"), ip, s3_port, args })
}

/// Starts `weed` with `args` and a /tmp of its own: SeaweedFS puts its components' gRPC sockets at
/// fixed paths in /tmp (`/tmp/seaweedfs-s3-grpc-PORT.sock`, ...; no flag moves them) and removes them
/// only when it exits cleanly, so each one killed (an outage test, a reaper's SIGKILL) left them on
/// the machine. In a mount namespace of its own (inside a user namespace when not root), a
/// tmpfs covers /tmp and the bed's directory is bound back at its path (through an open descriptor,
/// since the tmpfs hides it when the directory is under /tmp); both go when it exits.
fn spawn_weed(processes: &mut Processes, weed: &Path, args: &[String]) -> Result<()> {
    const PRIVATE_TMP: &str = r#"exec 3<"$0" && mount -t tmpfs -o mode=1777 atlas-s3-tmp /tmp && mkdir -p "$0" \
        && mount --no-canonicalize --bind /proc/self/fd/3 "$0" && exec 3<&- && exec "$@""#;
    // Root makes the mount namespace itself: a user namespace may be refused it (AppArmor's
    // restriction on unprivileged ones), and would only stand between weed and its files.
    let user = if running_as_root()? { &[][..] } else { &["--user", "--map-root-user"][..] };
    let mut wrapped: Vec<OsString> =
        user.iter().chain(&["--mount", "--propagation", "private", "--"]).map(OsString::from).collect();
    // `exec` keeps the process (and its group, which stop and the reaper signal) the one started.
    wrapped.extend(["sh", "-c", PRIVATE_TMP].map(OsString::from));
    wrapped.push(processes.dir().as_os_str().to_owned());
    wrapped.push(weed.as_os_str().to_owned());
    wrapped.extend(args.iter().map(OsString::from));
    processes.spawn("weed", Path::new("unshare"), wrapped)
}

fn wait_s3_ready(processes: &mut Processes, ip: Ipv4Addr, s3_port: u16, endpoint: &S3Endpoint) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        processes.check_alive("weed")?;
        // A bucket create is the real readiness signal: the filer and a volume must be up for it.
        // A fresh name each time: a restarted SeaweedFS still has the buckets made before.
        if port_open(ip, s3_port)
            && create_bucket_blocking(endpoint, &unique("atlas-ready-probe").to_lowercase()).is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("SeaweedFS S3 was not ready after 60 s; see {}", processes.dir().join("weed.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn s3_bucket(endpoint: &S3Endpoint, name: &str) -> Result<(rusty_s3::Bucket, rusty_s3::Credentials)> {
    let url: url::Url = endpoint.endpoint.parse()?;
    let bucket = rusty_s3::Bucket::new(url, rusty_s3::UrlStyle::Path, name.to_owned(), S3_REGION)?;
    Ok((bucket, rusty_s3::Credentials::new(&endpoint.access_key, &endpoint.secret_key)))
}

/// Creates a bucket with a SigV4-signed `PUT /{bucket}`.
pub async fn create_bucket(endpoint: &S3Endpoint, name: &str) -> Result<()> {
    use rusty_s3::S3Action;
    let (bucket, credentials) = s3_bucket(endpoint, name)?;
    let url = bucket.create_bucket(&credentials).sign(Duration::from_secs(60));
    let response = reqwest::Client::builder().no_proxy().build()?.put(url).send().await?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        bail!("create bucket {name}: {status}: {body}");
    }
    Ok(())
}

fn create_bucket_blocking(endpoint: &S3Endpoint, name: &str) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(create_bucket(endpoint, name))
}

// ---------------------------------------------------------------------------------------------------
// What tests use

/// The shared Kubernetes API server of this test run.
#[derive(Debug)]
pub struct TestCluster {
    kubeconfig: PathBuf,
    nodes: Option<NodeInfo>,
    // Held only when this process started a private bed; the reaper stops it at exit.
    _private: Option<ClusterProcesses>,
    private_nodes: Option<node::NodeCluster>,
    pod_s3: OnceLock<std::result::Result<(S3Endpoint, Option<S3Processes>), String>>,
}

/// What a cluster with a node adds to a bare API server.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Our image's name as the node knows it.
    pub image: String,
    /// Our image's config (as built from the Dockerfile).
    pub image_config: PathBuf,
    /// The node's network namespace as a path (`nsenter --net=PATH`).
    pub netns: String,
    /// The node bed's name (`atlas-bed-S`: the host end of its link, its cgroup, its nftables table),
    /// when the bed said it.
    pub bed: Option<String>,
    /// The hosts file of the bed's cluster DNS, when the bed said it.
    pub hosts: Option<PathBuf>,
    /// The socket of the node's containerd, when the bed said it.
    pub containerd: Option<PathBuf>,
}

/// A fresh namespace on the shared API server, with a client for it.
#[derive(Clone)]
pub struct TestNamespace {
    /// A client for the API server (admin).
    pub client: kube::Client,
    /// The namespace's name.
    pub name: String,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace").field("name", &self.name).finish_non_exhaustive()
    }
}

static CLUSTER: OnceLock<std::result::Result<TestCluster, String>> = OnceLock::new();
static NODE_CLUSTER: OnceLock<std::result::Result<TestCluster, String>> = OnceLock::new();
static S3: OnceLock<std::result::Result<TestS3, String>> = OnceLock::new();

impl TestCluster {
    fn bare(kubeconfig: PathBuf, private: Option<ClusterProcesses>) -> Self {
        Self { kubeconfig, nodes: None, _private: private, private_nodes: None, pod_s3: OnceLock::new() }
    }

    /// An API server of the caller's own, started now and stopped when dropped: for a test that
    /// needs a cluster without what other tests install cluster-wide (a CRD, a webhook).
    pub async fn private() -> Result<TestCluster> {
        let processes = tokio::task::spawn_blocking(start_cluster).await??;
        Ok(TestCluster::bare(processes.kubeconfig.clone(), Some(processes)))
    }

    /// The run's API server: the one named by `ATLAS_TEST_KUBECONFIG`, else a private one started now.
    pub async fn shared() -> Result<&'static TestCluster> {
        tokio::task::spawn_blocking(|| {
            CLUSTER
                .get_or_init(|| {
                    if let Some(path) = std::env::var_os(env::KUBECONFIG) {
                        return Ok(TestCluster::bare(PathBuf::from(path), None));
                    }
                    start_cluster()
                        .map(|c| TestCluster::bare(c.kubeconfig.clone(), Some(c)))
                        .map_err(|e| format!("{e:#}"))
                })
                .as_ref()
                .map_err(|e| anyhow!("starting the test cluster failed: {e}"))
        })
        .await?
    }

    /// The run's cluster with a node that runs pods: the one `atlas-testbed run --nodes` started
    /// (named by `ATLAS_TEST_NODE_KUBECONFIG`, `ATLAS_TEST_IMAGE` and friends), else a private one started now, whose image is
    /// built from the Dockerfile around `binary` (a test passes `env!("CARGO_BIN_EXE_atlas-runner")`).
    pub async fn with_nodes(binary: &Path) -> Result<&'static TestCluster> {
        let binary = binary.to_path_buf();
        tokio::task::spawn_blocking(move || {
            NODE_CLUSTER
                .get_or_init(|| {
                    let from_env = (
                        std::env::var_os(env::NODE_KUBECONFIG),
                        std::env::var(env::IMAGE),
                        std::env::var_os(env::IMAGE_CONFIG),
                        std::env::var(env::NODE_NETNS),
                    );
                    if let (Some(kubeconfig), Ok(image), Some(config), Ok(netns)) = from_env {
                        let mut cluster = TestCluster::bare(PathBuf::from(kubeconfig), None);
                        let bed = std::env::var(env::NODE_BED).ok();
                        let hosts = std::env::var_os(env::NODE_HOSTS).map(PathBuf::from);
                        let containerd = std::env::var_os(env::NODE_CONTAINERD).map(PathBuf::from);
                        cluster.nodes = Some(NodeInfo {
                            image,
                            image_config: PathBuf::from(config),
                            netns,
                            bed,
                            hosts,
                            containerd,
                        });
                        return Ok(cluster);
                    }
                    let options = node::NodeOptions { image_binary: binary, volumes: 8 };
                    node::start_node_cluster(&options)
                        .map(|c| {
                            let mut cluster = TestCluster::bare(c.kubeconfig().to_path_buf(), None);
                            cluster.nodes = Some(NodeInfo {
                                image: c.image.name.clone(),
                                image_config: c.image.config.clone(),
                                netns: c.network.netns_path().display().to_string(),
                                bed: Some(c.network.name.clone()),
                                hosts: Some(c.network.node_dir().join(node::HOSTS_FILE)),
                                containerd: Some(c.network.node_dir().join(node::CONTAINERD_SOCKET)),
                            });
                            cluster.private_nodes = Some(c);
                            cluster
                        })
                        .map_err(|e| format!("{e:#}"))
                })
                .as_ref()
                .map_err(|e| anyhow!("starting the test cluster with a node failed: {e}"))
        })
        .await?
    }

    /// The node's part: our image, its config, the node's network namespace; an error for a bare
    /// API server (get the cluster from [`TestCluster::with_nodes`]).
    pub fn nodes(&self) -> Result<&NodeInfo> {
        self.nodes.as_ref().context("this cluster has no node: get it from TestCluster::with_nodes")
    }

    /// An S3 endpoint pods can reach (and so can the test): the run's (`ATLAS_TEST_S3_POD_*`), else,
    /// for a private bed, one started now on its host address.
    pub async fn s3_for_pods(&'static self) -> Result<S3Endpoint> {
        self.nodes()?;
        // Starting S3 blocks (and runs a small runtime of its own): off the test's runtime.
        tokio::task::spawn_blocking(move || self.s3_for_pods_blocking()).await?
    }

    fn s3_for_pods_blocking(&self) -> Result<S3Endpoint> {
        self.pod_s3
            .get_or_init(|| {
                let from_env = (
                    std::env::var(env::S3_POD_ENDPOINT),
                    std::env::var(env::S3_POD_ACCESS_KEY),
                    std::env::var(env::S3_POD_SECRET_KEY),
                );
                if let (Ok(endpoint), Ok(access_key), Ok(secret_key)) = from_env {
                    return Ok((S3Endpoint { endpoint, access_key, secret_key }, None));
                }
                let Some(private) = &self.private_nodes else {
                    return Err(format!(
                        "{} is not set: run the tests under `atlas-testbed run --nodes`",
                        env::S3_POD_ENDPOINT
                    ));
                };
                start_s3_on(private.network.host_ip, None)
                    .and_then(|s| {
                        private.network.open_to_pods(s.s3_port())?;
                        Ok((s.endpoint.clone(), Some(s)))
                    })
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map(|(endpoint, _)| endpoint.clone())
            .map_err(|e| anyhow!("starting S3 for pods failed: {e}"))
    }

    /// Lets the node and its pods open TCP connections to `port` on the bed's host address, where a
    /// test serves them something (everything else of the host is closed to them).
    pub fn open_to_pods(&self, port: u16) -> Result<()> {
        let bed = self.nodes()?.bed.as_deref().with_context(|| {
            format!(
                "{} is not set: the bed's host ports cannot be opened (run under atlas-testbed run --nodes)",
                env::NODE_BED
            )
        })?;
        node::open_port(bed, port)
    }

    /// Tags our image in the node's containerd as `also` too (`localhost/atlas-runner:NEW`), as a
    /// registry would hold a new release: a `helm upgrade` to that tag then changes every pod's
    /// image and pulls nothing.
    pub fn tag_image(&self, also: &str) -> Result<()> {
        let nodes = self.nodes()?;
        let socket = nodes.containerd.as_deref().with_context(|| {
            format!(
                "{} is not set: the node's images cannot be tagged (run under atlas-testbed run --nodes)",
                env::NODE_CONTAINERD
            )
        })?;
        image::tag(socket, &nodes.image, also)
    }

    /// Makes the cluster's DNS answer `names` (outside names: Mojang's, a pack hub's) with `address`,
    /// an address of the bed where the test serves them (see [`node::point_names`]).
    pub fn point_names(&self, names: &[&str], address: Ipv4Addr) -> Result<()> {
        let hosts = self.nodes()?.hosts.as_deref().with_context(|| {
            format!(
                "{} is not set: the bed's DNS cannot be told names (run under atlas-testbed run --nodes)",
                env::NODE_HOSTS
            )
        })?;
        node::point_names(hosts, names, address)
    }

    /// The admin kubeconfig's path.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A new client (clients are bound to the runtime that made them, so each test makes its own).
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates a fresh namespace named after `prefix`. On a cluster with a node, it also waits for
    /// the namespace's `default` ServiceAccount, without which no pod is admitted.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
        let client = self.client().await?;
        let name = unique(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        kube::Api::<Namespace>::all(client.clone()).create(&Default::default(), &ns).await?;
        if self.nodes.is_some() {
            let accounts = kube::Api::<ServiceAccount>::namespaced(client.clone(), &name);
            let deadline = Instant::now() + Duration::from_secs(60);
            while accounts.get_opt("default").await?.is_none() {
                if Instant::now() > deadline {
                    bail!("namespace {name} got no default ServiceAccount in 60 s: is the controller-manager running?");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(TestNamespace { client, name })
    }

    /// `kubectl` pointed at this cluster.
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = Command::new(bin("kubectl")?);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        Ok(cmd)
    }

    /// `helm` pointed at this cluster, with its caches in a private directory.
    pub fn helm(&self) -> Result<Command> {
        let mut cmd = Command::new(bin("helm")?);
        let home = std::env::temp_dir().join(unique("helm-home"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        Ok(cmd)
    }
}

/// The shared S3 endpoint of this test run.
#[derive(Debug)]
pub struct TestS3 {
    endpoint: S3Endpoint,
    _private: Option<S3Processes>,
}

/// A fresh, empty bucket on the shared S3 endpoint.
#[derive(Debug, Clone)]
pub struct TestBucket {
    /// Where and how to reach the endpoint.
    pub s3: S3Endpoint,
    /// The bucket's name.
    pub name: String,
    /// The region to sign for.
    pub region: String,
}

impl TestS3 {
    /// The run's S3 endpoint: the one named by `ATLAS_TEST_S3_*`, else a private one started now.
    pub async fn shared() -> Result<&'static TestS3> {
        tokio::task::spawn_blocking(|| {
            S3.get_or_init(|| {
                let from_env = (
                    std::env::var(env::S3_ENDPOINT),
                    std::env::var(env::S3_ACCESS_KEY),
                    std::env::var(env::S3_SECRET_KEY),
                );
                if let (Ok(endpoint), Ok(access_key), Ok(secret_key)) = from_env {
                    return Ok(TestS3 { endpoint: S3Endpoint { endpoint, access_key, secret_key }, _private: None });
                }
                start_s3()
                    .map(|s| TestS3 { endpoint: s.endpoint.clone(), _private: Some(s) })
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow!("starting the test S3 endpoint failed: {e}"))
        })
        .await?
    }

    /// The endpoint and credentials.
    pub fn endpoint(&self) -> &S3Endpoint {
        &self.endpoint
    }

    /// Creates a fresh bucket named after `prefix` (lowercase letters, digits and dashes).
    pub async fn bucket(&self, prefix: &str) -> Result<TestBucket> {
        let name = unique(prefix).to_lowercase();
        create_bucket(&self.endpoint, &name).await?;
        Ok(TestBucket { s3: self.endpoint.clone(), name, region: S3_REGION.to_owned() })
    }
}

impl TestBucket {
    /// A presigned URL for `method` on `key` in this bucket (GET, PUT, DELETE, HEAD).
    pub fn presign(&self, method: &str, key: &str) -> Result<url::Url> {
        use rusty_s3::S3Action;
        let (bucket, credentials) = s3_bucket(&self.s3, &self.name)?;
        let ttl = Duration::from_secs(300);
        Ok(match method {
            "GET" => bucket.get_object(Some(&credentials), key).sign(ttl),
            "PUT" => bucket.put_object(Some(&credentials), key).sign(ttl),
            "DELETE" => bucket.delete_object(Some(&credentials), key).sign(ttl),
            "HEAD" => bucket.head_object(Some(&credentials), key).sign(ttl),
            other => bail!("presign: unsupported method {other}"),
        })
    }
}
