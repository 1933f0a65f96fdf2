//! `atlas-runner run`: the standalone runner. Also what every runner process shares with the in-pod
//! agent ([`ServerArgs`], [`Runtime`]): the data dir's lock, the control socket and admin port, the
//! reconciler, and graceful shutdown on SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use atlas_runner::http::{self, client};
use atlas_runner::runner::{
    self, ControlRequest, Desired, FileSpecSource, PrepareOptions, ReconcilerOptions, Shared, UpgradePolicy,
};
use atlas_runner::server::{BaseUrls, JavaSearch};
use atlas_runner::supervisor::{RestartPolicy, StopTimeouts};
use clap::Args;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The MinecraftServer spec file (a whole resource, as for `kubectl apply`, or just its spec).
    #[arg(long)]
    spec: PathBuf,
    /// The server's data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// How often the spec file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    spec_poll_ms: u64,
    #[command(flatten)]
    server: ServerArgs,
}

/// How a runner process runs its server: the flags `run` and `agent` share.
#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9100", env = "ATLAS_METRICS_ADDR")]
    pub(crate) metrics_addr: SocketAddr,
    /// The control socket (default: DATA/.atlas/control.sock).
    #[arg(long)]
    control: Option<PathBuf>,
    /// A Java installation (JAVA_HOME-style directory) to consider; repeatable. JAVA_HOME,
    /// /usr/lib/jvm and PATH are searched too.
    #[arg(long = "java")]
    java: Vec<PathBuf>,
    /// Mojang's version manifest URL (a mirror).
    #[arg(long, env = "ATLAS_MOJANG_MANIFEST_URL")]
    mojang_manifest_url: Option<String>,
    /// PaperMC's API base URL (a mirror).
    #[arg(long, env = "ATLAS_PAPER_API_URL")]
    paper_api_url: Option<String>,
    /// Fabric's meta API base URL (a mirror).
    #[arg(long, env = "ATLAS_FABRIC_META_URL")]
    fabric_meta_url: Option<String>,
    /// Seconds to wait after each stop step (RCON stop, stdin stop, SIGTERM) before the next.
    #[arg(long, default_value_t = 30)]
    stop_timeout: u64,
    /// Mark the server Failed after this many crashes within --crash-window.
    #[arg(long, default_value_t = 5)]
    max_crashes: usize,
    /// The window crashes are counted in, in seconds.
    #[arg(long, default_value_t = 600)]
    crash_window: u64,
    /// The first restart delay in milliseconds; it doubles per crash up to 5 minutes.
    #[arg(long, default_value_t = 1000)]
    restart_delay_ms: u64,
    /// How often players and JVM stats are sampled, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    poll_ms: u64,
    /// After a pack or Minecraft version update, the new server must be ready within this many
    /// seconds, or the update is undone.
    #[arg(long, default_value_t = 900)]
    update_ready_timeout: u64,
    /// After a pack or Minecraft version update, the new server must run this many seconds after it
    /// is ready without exiting, or the update is undone.
    #[arg(long, default_value_t = 120)]
    update_settle: u64,
    /// The cgroup filesystem the memory limit is read from.
    #[arg(long, default_value = "/sys/fs/cgroup", hide = true)]
    cgroup_root: PathBuf,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let runtime = Runtime::open(&args.data, args.server, None).await?;
    let specs = FileSpecSource::start(args.spec.clone(), Duration::from_millis(args.spec_poll_ms))?;
    runtime.serve(specs.receiver()).await
}

/// A runner process's parts, opened before its spec source starts: the data dir (locked), the
/// control socket and admin port (bound), the shared state and the reconciler's options.
pub(crate) struct Runtime {
    data_dir: PathBuf,
    socket: PathBuf,
    /// The control socket's server, answering from the start too (`atlas-runner status` would
    /// otherwise hang on a bound socket nobody serves).
    control: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The admin port's server (`/metrics`, `/healthz`, `/readyz`), answering from the start: the
    /// agent may wait for the API server before the reconciler runs, and kubelet's probes must
    /// not time out meanwhile.
    admin: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Cancelled once the server has stopped: the endpoints stop serving then.
    stopped: CancellationToken,
    metrics_addr: SocketAddr,
    /// What the reconciler shares with the endpoints (and the agent's status sink).
    pub(crate) shared: Shared,
    requests: mpsc::Receiver<ControlRequest>,
    options: ReconcilerOptions,
    /// Cancelled to stop the server gracefully and end the process.
    pub(crate) shutdown: CancellationToken,
}

impl Runtime {
    /// Locks `data` (one runner per data dir), binds the control socket and the admin port.
    /// `memory_limit` overrides the cgroup's (the pod's limit from the downward API).
    pub(crate) async fn open(data: &Path, args: ServerArgs, memory_limit: Option<u64>) -> anyhow::Result<Self> {
        let atlas_dir = runner::atlas_dir(data);
        std::fs::create_dir_all(&atlas_dir).with_context(|| format!("create {}", atlas_dir.display()))?;
        let data_dir = std::fs::canonicalize(data).with_context(|| format!("resolve {}", data.display()))?;
        // One runner per data dir; the pack engine relies on the same lock.
        let lock = Arc::new(atlas_runner::pack::lock(&atlas_runner::pack::lock_path(&data_dir))?);
        let socket = args.control.clone().unwrap_or_else(|| client::socket_path(&data_dir));
        let control_listener = bind_control_socket(&socket).await?;
        let admin_listener = tokio::net::TcpListener::bind(args.metrics_addr).await.with_context(|| {
            format!(
                "cannot listen on {} for metrics: is another runner using it? pass --metrics-addr",
                args.metrics_addr
            )
        })?;
        let (shared, requests) = runner::shared(prometheus::Registry::new())?;
        let mut base_urls = BaseUrls::default();
        if let Some(url) = args.mojang_manifest_url {
            base_urls.mojang_manifest = url;
        }
        if let Some(url) = args.paper_api_url {
            base_urls.paper_api = url;
        }
        if let Some(url) = args.fabric_meta_url {
            base_urls.fabric_meta = url;
        }
        let stop = Duration::from_secs(args.stop_timeout);
        let options = ReconcilerOptions {
            prepare: PrepareOptions {
                data_dir: data_dir.clone(),
                base_urls,
                java: JavaSearch::with_extra(args.java),
                cgroup_root: args.cgroup_root,
                memory_limit,
                // spec.pack is applied under the lock held above; its metrics are served on /metrics.
                pack: Some(
                    runner::PackContext::new(lock, atlas_runner::metrics::PackMetrics::register(&shared.registry)?)
                        .remembering(&data_dir),
                ),
            },
            stop: StopTimeouts { rcon: stop, stdin: stop, term: stop },
            restart: RestartPolicy {
                base: Duration::from_millis(args.restart_delay_ms),
                max_failures: args.max_crashes,
                window: Duration::from_secs(args.crash_window),
                ..RestartPolicy::default()
            },
            poll: Duration::from_millis(args.poll_ms),
            upgrade: UpgradePolicy {
                ready_timeout: Duration::from_secs(args.update_ready_timeout),
                settle: Duration::from_secs(args.update_settle),
            },
        };
        let stopped = CancellationToken::new();
        let admin = {
            let stopped = stopped.clone();
            let router = http::admin_router(shared.clone());
            tokio::spawn(async move {
                axum::serve(admin_listener, router).with_graceful_shutdown(stopped.cancelled_owned()).await
            })
        };
        let control = {
            let stopped = stopped.clone();
            let router = http::control_router(shared.clone());
            tokio::spawn(async move {
                axum::serve(control_listener, router).with_graceful_shutdown(stopped.cancelled_owned()).await
            })
        };
        Ok(Self {
            data_dir,
            socket,
            control,
            admin,
            stopped,
            metrics_addr: args.metrics_addr,
            shared,
            requests,
            options,
            shutdown: CancellationToken::new(),
        })
    }

    /// Serves the control socket and the admin port and runs the reconciler on `specs` until
    /// shutdown (SIGTERM, Ctrl-C, or the token cancelled), which stops the server gracefully.
    pub(crate) async fn serve(self, specs: watch::Receiver<Desired>) -> anyhow::Result<()> {
        let Self { data_dir, socket, control, admin, stopped, metrics_addr, shared, requests, options, shutdown } =
            self;
        // The endpoints serve until the server has stopped, not merely until shutdown begins: /readyz
        // says not ready (rather than refusing connections) and `status` answers while it stops.
        tracing::info!(data = %data_dir.display(), metrics = %metrics_addr, control = %socket.display(), "runner started");

        let reconciler = tokio::spawn(runner::reconcile(specs, shared.clone(), requests, options, shutdown.clone()));
        let signals = {
            let (shutdown, shared) = (shutdown.clone(), shared.clone());
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("signal received; stopping the server gracefully");
                // Not ready from now on, before the server is asked to stop.
                shared.begin_shutdown();
                shutdown.cancel();
            })
        };
        let reconciled = reconciler.await.context("the reconciler task failed");
        shared.begin_shutdown();
        shutdown.cancel();
        stopped.cancel();
        signals.abort();
        // Followers of `logs -f` hold connections open; graceful shutdown waits for them briefly only.
        let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), control).await;
        let _ = std::fs::remove_file(&socket);
        tracing::info!("runner stopped");
        reconciled
    }
}

/// Waits for SIGTERM or SIGINT.
pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

async fn bind_control_socket(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    // Linux's sun_path holds 108 bytes with the closing NUL; a data dir deep in a tree meets it.
    const SOCKET_PATH_MAX: usize = 107;
    let length = socket.as_os_str().len();
    if length > SOCKET_PATH_MAX {
        bail!(
            "control socket {} is {length} bytes, longer than a unix socket path may be ({SOCKET_PATH_MAX}): \
             pass --control with a shorter path, such as /run/atlas-runner/NAME.sock",
            socket.display()
        );
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!("control socket {} is in use by another runner; stop it first or pass --control", socket.display());
        }
        // Left behind by a runner that died: nobody answers, so it is safe to replace.
        std::fs::remove_file(socket).with_context(|| format!("remove stale {}", socket.display()))?;
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener =
        tokio::net::UnixListener::bind(socket).with_context(|| format!("bind control socket {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
