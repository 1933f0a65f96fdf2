//! `atlas-runner`: the command line. Parses arguments, sets up logging and calls into the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use atlas_runner::http::{self, ConsoleReply, ConsoleRequest, client};
use atlas_runner::runner::{self, FileSpecSource, PrepareOptions, ReconcilerOptions, RunnerStatus};
use atlas_runner::server::{BaseUrls, JavaSearch};
use atlas_runner::supervisor::{RestartPolicy, StopTimeouts};
use atlas_runner::telemetry::{self, LogFormat};
use clap::{Args, Parser, Subcommand};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

/// Runs Minecraft servers on Kubernetes and on plain hosts.
#[derive(Debug, Parser)]
#[command(name = "atlas-runner", version, about, propagate_version = true)]
struct Cli {
    /// Log format: `text` for people, `json` for log collectors. `RUST_LOG` sets the filter.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ATLAS_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server from a spec file and keep it healthy (the standalone runner).
    Run(RunArgs),
    /// Show the running server's status.
    Status(ClientArgs),
    /// Show the server's recent output; `-f` follows it.
    Logs(LogsArgs),
    /// Run a console command on the server (through RCON) and print the reply.
    Console(ConsoleArgs),
    /// Stop the server gracefully; the runner stays up until `restart`.
    Stop(ClientArgs),
    /// Restart the server (also after it was stopped or marked Failed).
    Restart(ClientArgs),
    /// Build, inspect and roll back server packs.
    #[command(subcommand)]
    Pack(PackCommand),
    /// Take, list, verify, restore and prune world backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Print the MinecraftServer CustomResourceDefinition as YAML.
    Crd,
    /// Run the cluster operator: every MinecraftServer becomes a StatefulSet, Services, RBAC and Secrets.
    Operator(atlas_runner::operator::Options),
}

#[derive(Debug, Subcommand)]
enum PackCommand {
    /// Build an Atlas pack (a tar.zst with `atlas-pack.json`) from a directory.
    #[command(disable_version_flag = true)]
    Build(PackBuildArgs),
    /// Fetch, verify and apply the pack a spec names into a data dir, once.
    Apply(PackApplyArgs),
    /// Show the applied pack version, the one kept for rollback, and the files each owns.
    Status(PackDataArgs),
    /// Go back to the previous pack version (no network needed).
    Rollback(PackDataArgs),
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Back the world up now: through the runner (RCON save-off/flush/save-on) when one runs on the
    /// data dir, else offline.
    Create(BackupCreateArgs),
    /// List the complete backups, newest first.
    List(BackupArgs),
    /// Download a backup and check its digest and every file in it.
    Verify(BackupNameArgs),
    /// Replace the world with a backup: checked in full first; with a runner, the server is stopped,
    /// a safety backup taken, the worlds swapped and the server started again.
    Restore(BackupNameArgs),
    /// Delete the backups spec.backup.retention does not keep (never the newest).
    Prune(BackupArgs),
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// The MinecraftServer spec file; `spec.backup` names the store (default: DATA/.atlas/backups).
    /// S3 credentials come from spec.backup.store.s3.credentialsFile or AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY.
    #[arg(long)]
    spec: PathBuf,
    /// The server's data directory.
    #[arg(long)]
    data: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct BackupCreateArgs {
    #[command(flatten)]
    backup: BackupArgs,
    /// Also write the backup's metrics in the Prometheus text format to this file (for
    /// node_exporter's textfile collector), replacing it atomically.
    #[arg(long)]
    metrics_textfile: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BackupNameArgs {
    /// The backup's name, as `backup list` shows it.
    name: String,
    #[command(flatten)]
    backup: BackupArgs,
}

#[derive(Debug, Args)]
struct PackBuildArgs {
    /// The directory whose files make the pack (paths inside it are the paths in the data dir).
    dir: PathBuf,
    /// The pack file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// The pack's version.
    #[arg(long)]
    version: String,
    /// The Minecraft version the pack is made for.
    #[arg(long)]
    minecraft: Option<String>,
    /// The mod loader, as NAME or NAME@VERSION (`fabric@0.16.10`).
    #[arg(long, requires = "minecraft")]
    loader: Option<String>,
    /// A recommended JVM argument; repeatable.
    #[arg(long = "jvm-arg", allow_hyphen_values = true)]
    jvm_args: Vec<String>,
}

#[derive(Debug, Args)]
struct PackApplyArgs {
    /// The MinecraftServer spec file whose `spec.pack` is applied.
    #[arg(long)]
    spec: PathBuf,
    /// Also write the apply's metrics in the Prometheus text format to this file (for
    /// node_exporter's textfile collector), replacing it atomically.
    #[arg(long)]
    metrics_textfile: Option<PathBuf>,
    #[command(flatten)]
    data: PackDataArgs,
}

#[derive(Debug, Args)]
struct PackDataArgs {
    /// The server's data directory.
    #[arg(long)]
    data: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The MinecraftServer spec file (a whole resource, as for `kubectl apply`, or just its spec).
    #[arg(long)]
    spec: PathBuf,
    /// The server's data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9100", env = "ATLAS_METRICS_ADDR")]
    metrics_addr: SocketAddr,
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
    /// How often the spec file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    spec_poll_ms: u64,
    /// The cgroup filesystem the memory limit is read from.
    #[arg(long, default_value = "/sys/fs/cgroup", hide = true)]
    cgroup_root: PathBuf,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// The server's data directory (finds DATA/.atlas/control.sock).
    #[arg(long, default_value = ".")]
    data: PathBuf,
    /// The control socket, instead of --data.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl ClientArgs {
    fn socket(&self) -> PathBuf {
        self.control.clone().unwrap_or_else(|| client::socket_path(&self.data))
    }
}

#[derive(Debug, Args)]
struct LogsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Keep printing new lines.
    #[arg(short, long)]
    follow: bool,
    /// How many recent lines to print first.
    #[arg(long, default_value_t = 100)]
    tail: usize,
}

#[derive(Debug, Args)]
struct ConsoleArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The command and its arguments (`list`, `say hello`).
    #[arg(required = true, trailing_var_arg = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(cli.log_format, "info") {
        let _ = writeln!(std::io::stderr(), "atlas-runner: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "atlas-runner: starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, cli.log_format)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "atlas-runner: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Our error messages often quote their source already, so a
/// cause whose text the line already holds is not repeated.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

async fn run(command: Command, log_format: LogFormat) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run_server(args).await,
        Command::Status(args) => status(&args).await,
        Command::Logs(args) => logs(&args).await,
        Command::Console(args) => console(&args).await,
        Command::Stop(args) => lifecycle(&args, "/v1/stop", "stopped").await,
        Command::Restart(args) => lifecycle(&args, "/v1/restart", "restarting").await,
        Command::Pack(command) => pack(command, log_format).await,
        Command::Backup(command) => backup(command, log_format).await,
        Command::Operator(options) => Ok(atlas_runner::operator::run_until_signal(options).await?),
        Command::Crd => {
            let yaml = atlas_runner::api::crd_yaml().context("render the CRD")?;
            tracing::debug!(bytes = yaml.len(), "rendered the MinecraftServer CRD");
            std::io::stdout().write_all(yaml.as_bytes()).context("write the CRD to stdout")?;
            Ok(())
        }
    }
}

async fn run_server(args: RunArgs) -> anyhow::Result<()> {
    let atlas_dir = runner::atlas_dir(&args.data);
    std::fs::create_dir_all(&atlas_dir).with_context(|| format!("create {}", atlas_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data).with_context(|| format!("resolve {}", args.data.display()))?;
    // One runner per data dir; the pack engine relies on the same lock.
    let lock = std::sync::Arc::new(atlas_runner::pack::lock(&atlas_runner::pack::lock_path(&data_dir))?);
    let socket = args.control.clone().unwrap_or_else(|| client::socket_path(&data_dir));
    let control_listener = bind_control_socket(&socket).await?;
    let admin_listener = tokio::net::TcpListener::bind(args.metrics_addr).await.with_context(|| {
        format!("cannot listen on {} for metrics: is another runner using it? pass --metrics-addr", args.metrics_addr)
    })?;

    let specs = FileSpecSource::start(args.spec.clone(), Duration::from_millis(args.spec_poll_ms))?;
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
            // spec.pack is applied under the lock held above; its metrics are served on /metrics.
            pack: Some(runner::PackContext::new(
                lock.clone(),
                atlas_runner::metrics::PackMetrics::register(&shared.registry)?,
            )),
        },
        stop: StopTimeouts { rcon: stop, stdin: stop, term: stop },
        restart: RestartPolicy {
            base: Duration::from_millis(args.restart_delay_ms),
            max_failures: args.max_crashes,
            window: Duration::from_secs(args.crash_window),
            ..RestartPolicy::default()
        },
        poll: Duration::from_millis(args.poll_ms),
    };

    let shutdown = CancellationToken::new();
    let admin = {
        let shutdown = shutdown.clone();
        let router = http::admin_router(shared.clone());
        tokio::spawn(async move {
            axum::serve(admin_listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
        })
    };
    let control = {
        let shutdown = shutdown.clone();
        let router = http::control_router(shared.clone());
        tokio::spawn(async move {
            axum::serve(control_listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
        })
    };
    tracing::info!(data = %data_dir.display(), metrics = %args.metrics_addr, control = %socket.display(), "runner started");

    let reconciler = tokio::spawn(runner::reconcile(specs.receiver(), shared, requests, options, shutdown.clone()));
    let signals = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; stopping the server gracefully");
            shutdown.cancel();
        })
    };
    reconciler.await.context("the reconciler task failed")?;
    shutdown.cancel();
    signals.abort();
    // Followers of `logs -f` hold connections open; graceful shutdown waits for them briefly only.
    let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), control).await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("runner stopped");
    Ok(())
}

async fn wait_for_signal() {
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

async fn pack_apply(args: PackApplyArgs, log_format: LogFormat) -> anyhow::Result<()> {
    use atlas_runner::pack::{self, provision};
    let spec = runner::load_spec(&args.spec)?;
    let Some(pack_spec) = &spec.pack else {
        bail!("{} has no spec.pack: nothing to apply", args.spec.display());
    };
    std::fs::create_dir_all(runner::atlas_dir(&args.data.data))
        .with_context(|| format!("create {}", args.data.data.display()))?;
    let lock = std::sync::Arc::new(pack::lock(&pack::lock_path(&args.data.data))?);
    let registry = prometheus::Registry::new();
    let metrics = atlas_runner::metrics::PackMetrics::register(&registry)?;
    let options = pack::source::FetchOptions::new(&args.data.data);
    let progress = (log_format == LogFormat::Text).then(|| show_progress(&options.progress)).flatten();
    let outcome = provision::apply_spec(pack_spec, &args.data.data, lock, &options, &metrics).await;
    if let Some(progress) = progress {
        progress.abort();
        let _ = writeln!(std::io::stderr());
    }
    if let Some(path) = &args.metrics_textfile {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, atlas_runner::metrics::render(&registry))
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    }
    let outcome = outcome?;
    let mut out = std::io::stdout().lock();
    match outcome {
        provision::Provisioned::AlreadyCurrent(version) if args.data.json => {
            writeln!(out, "{}", serde_json::json!({"version": version, "changed": false}))?;
        }
        provision::Provisioned::AlreadyCurrent(version) => writeln!(out, "already at {version}; nothing to do")?,
        provision::Provisioned::Applied { report, bytes_downloaded } => {
            if args.data.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"version": report.to, "from": report.from, "changed": true,
                        "installed": report.installed.len(), "removed": report.removed.len(),
                        "preservedWritten": report.preserved_written.len(), "bytesDownloaded": bytes_downloaded})
                )?;
            } else {
                let from = report.from.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string);
                writeln!(
                    out,
                    "applied {} (was {from}): {} files written, {} removed, {} preserved files written, {bytes_downloaded} bytes downloaded",
                    report.to,
                    report.installed.len(),
                    report.removed.len(),
                    report.preserved_written.len()
                )?;
            }
        }
    }
    Ok(())
}

/// On a terminal, a progress line (bytes, rate, files, ETA) redrawn while the pack downloads; elsewhere
/// the apply logs its milestones instead.
fn show_progress(
    progress: &std::sync::Arc<atlas_runner::pack::source::Progress>,
) -> Option<tokio::task::JoinHandle<()>> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let progress = progress.clone();
    Some(tokio::spawn(async move {
        let started = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = progress.snapshot();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let rate = now.bytes as f64 / secs;
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let eta = if now.total_bytes > now.bytes && rate > 0.0 {
                format!(" ETA {:.0}s", (now.total_bytes - now.bytes) as f64 / rate)
            } else {
                String::new()
            };
            let files =
                if now.total_files > 0 { format!(" {}/{} files", now.files, now.total_files) } else { String::new() };
            let _ = write!(
                std::io::stderr(),
                "\r{:.1}/{:.1} MiB  {:.1} MiB/s{files}{eta}   ",
                mib(now.bytes),
                mib(now.total_bytes),
                rate / (1024.0 * 1024.0)
            );
        }
    }))
}

async fn pack(command: PackCommand, log_format: LogFormat) -> anyhow::Result<()> {
    use atlas_runner::pack::{self, PackStore, PackVersion, build};
    // Locked per arm: a stdout lock must not be held across the apply's awaits.
    match command {
        PackCommand::Build(args) => {
            let mut out = std::io::stdout().lock();
            let mut options = build::BuildOptions::new(PackVersion::new(&args.version)?);
            options.jvm_args = args.jvm_args;
            options.minecraft = args.minecraft.map(|version| pack::manifest::MinecraftTarget {
                version,
                loader: args.loader.map(|l| {
                    let (name, version) =
                        l.split_once('@').map_or((l.clone(), None), |(n, v)| (n.to_owned(), Some(v.to_owned())));
                    pack::manifest::Loader { name, version }
                }),
            });
            let manifest = build::build(&args.dir, &args.output, &options)?;
            let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
            writeln!(
                out,
                "built {} version {}: {} files, {bytes} bytes",
                args.output.display(),
                manifest.version,
                manifest.files.len()
            )?;
        }
        PackCommand::Apply(args) => return pack_apply(args, log_format).await,
        PackCommand::Status(args) => {
            let mut out = std::io::stdout().lock();
            let lock = pack::lock(&pack::lock_path(&args.data))?;
            let (store, recovery) = PackStore::open(&args.data, &lock)?;
            let status = store.status()?;
            let previous = match &status.previous {
                Some(v) => Some(store.read_manifest(v)?),
                None => None,
            };
            if args.json {
                let value = serde_json::json!({
                    "recovery": format!("{recovery:?}"),
                    "current": status.current,
                    "owned": status.owned,
                    "preserve": status.preserve,
                    "previous": previous,
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
                return Ok(());
            }
            match &status.current {
                None => writeln!(out, "current:  none (no pack applied)")?,
                Some(m) => {
                    let target = m.minecraft.as_ref().map(|t| format!(", minecraft {}", t.version)).unwrap_or_default();
                    writeln!(out, "current:  {} ({} files{target})", m.version, m.files.len())?;
                }
            }
            match &previous {
                None => writeln!(out, "previous: none")?,
                Some(m) => writeln!(
                    out,
                    "previous: {} ({} files; `atlas-runner pack rollback` returns to it)",
                    m.version,
                    m.files.len()
                )?,
            }
            if !status.preserve.is_empty() {
                writeln!(out, "preserve: {}", status.preserve.join(", "))?;
            }
            writeln!(out, "owned by the current version ({} files):", status.owned.len())?;
            for file in &status.owned {
                writeln!(out, "  {}  {} bytes  sha256:{}", file.path.as_str(), file.size, file.sha256)?;
            }
            if let Some(m) = &previous {
                writeln!(out, "owned by the previous version ({} files):", m.files.len())?;
                for file in &m.files {
                    writeln!(out, "  {}  {} bytes  sha256:{}", file.path.as_str(), file.size, file.sha256)?;
                }
            }
        }
        PackCommand::Rollback(args) => {
            let mut out = std::io::stdout().lock();
            let lock = pack::lock(&pack::lock_path(&args.data))?;
            let (mut store, _) = PackStore::open(&args.data, &lock)?;
            let report = store.rollback()?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"from": report.from, "to": report.to, "installed": report.installed.len(), "removed": report.removed.len()})
                )?;
            } else {
                let from = report.from.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string);
                writeln!(
                    out,
                    "rolled back from {from} to {}: {} files written, {} removed",
                    report.to,
                    report.installed.len(),
                    report.removed.len()
                )?;
            }
        }
    }
    Ok(())
}

async fn status(args: &ClientArgs) -> anyhow::Result<()> {
    let bytes = client::call(&args.socket(), "GET", "/v1/status", None).await?;
    let status: RunnerStatus = serde_json::from_slice(&bytes)?;
    print_status(&status, args.json)
}

fn print_status(status: &RunnerStatus, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, status)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "phase:     {}", status.phase)?;
    if let Some(message) = &status.message {
        writeln!(out, "message:   {message}")?;
    }
    if let (Some(kind), Some(version)) = (&status.server_type, &status.server_version) {
        writeln!(out, "server:    {kind} {version}")?;
    }
    if let Some(pack) = &status.pack_version {
        writeln!(out, "pack:      {pack}")?;
    }
    if let Some(version) = &status.pack_update_available {
        writeln!(out, "update:    {version} available")?;
    }
    let names =
        if status.player_names.is_empty() { String::new() } else { format!(" ({})", status.player_names.join(", ")) };
    writeln!(out, "players:   {}/{}{names}", status.players_online, status.players_max)?;
    if let Some(uptime) = status.uptime_seconds {
        writeln!(out, "uptime:    {}h{:02}m{:02}s", uptime / 3600, uptime / 60 % 60, uptime % 60)?;
    }
    writeln!(out, "restarts:  {}", status.restarts)?;
    if let Some(reason) = &status.last_exit_reason {
        writeln!(out, "last exit: {reason}")?;
    }
    if let Some(backup) = &status.last_backup {
        writeln!(out, "backup:    {} ({} bytes)", backup.name, backup.size_bytes)?;
    }
    Ok(())
}

async fn logs(args: &LogsArgs) -> anyhow::Result<()> {
    let path = format!("/v1/logs?tail={}&follow={}", args.tail, args.follow);
    let response = client::request(&args.client.socket(), "GET", &path, None).await?;
    let mut body = response.into_body();
    let mut out = std::io::stdout();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if args.client.json {
                for line in String::from_utf8_lossy(&data).lines() {
                    writeln!(out, "{}", serde_json::json!({ "line": line }))?;
                }
            } else {
                out.write_all(&data)?;
            }
            out.flush()?;
        }
    }
    Ok(())
}

async fn console(args: &ConsoleArgs) -> anyhow::Result<()> {
    let request = ConsoleRequest { command: args.command.join(" ") };
    let bytes = client::call(&args.client.socket(), "POST", "/v1/console", Some(serde_json::to_vec(&request)?)).await?;
    let reply: ConsoleReply = serde_json::from_slice(&bytes)?;
    let mut out = std::io::stdout();
    if args.client.json {
        writeln!(out, "{}", serde_json::to_string(&reply)?)?;
    } else if !reply.output.is_empty() {
        writeln!(out, "{}", reply.output.trim_end())?;
    }
    Ok(())
}

async fn lifecycle(args: &ClientArgs, path: &str, done: &str) -> anyhow::Result<()> {
    let bytes = client::call(&args.socket(), "POST", path, None).await?;
    let status: RunnerStatus = serde_json::from_slice(&bytes)?;
    if args.json {
        print_status(&status, true)
    } else {
        writeln!(std::io::stdout(), "{done}; phase {}", status.phase)?;
        Ok(())
    }
}

/// The spec and the store of a `backup` subcommand.
fn backup_store(
    args: &BackupArgs,
) -> anyhow::Result<(atlas_runner::api::MinecraftServerSpec, atlas_runner::backup::store::Store)> {
    use atlas_runner::runner::backup::BackupFailure;
    let spec = runner::load_spec(&args.spec)?;
    if !args.data.is_dir() {
        bail!("the data dir {} does not exist; pass the server's --data DIR", args.data.display());
    }
    let store =
        atlas_runner::backup::store::Store::open(spec.backup.as_ref().and_then(|b| b.store.as_ref()), &args.data, None)
            .map_err(|e| BackupFailure::from_error(e.category(), &e))?;
    Ok((spec, store))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// On a terminal, a progress line (stage, bytes, rate, ETA) redrawn while a backup uploads or downloads;
/// elsewhere the backup logs its milestones instead. Dropping the handle stops it.
struct BackupProgressLine(Option<tokio::task::JoinHandle<()>>);

impl BackupProgressLine {
    fn show(progress: &std::sync::Arc<atlas_runner::backup::Progress>, log_format: LogFormat) -> Self {
        use atlas_runner::backup::Stage;
        use std::io::IsTerminal;
        if log_format != LogFormat::Text || !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let progress = progress.clone();
        Self(Some(tokio::spawn(async move {
            // The stage, when this line first saw it, and how much was done then: the rate counts from there.
            let mut stage_started = (Stage::Preparing, std::time::Instant::now(), 0);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (stage, done, total) = progress.snapshot();
                if stage != stage_started.0 {
                    stage_started = (stage, std::time::Instant::now(), done);
                }
                let label = match stage {
                    Stage::Preparing => {
                        let _ = write!(
                            std::io::stderr(),
                            "\rcapturing... {:.0}s   ",
                            stage_started.1.elapsed().as_secs_f64()
                        );
                        continue;
                    }
                    Stage::Uploading => "archiving and uploading",
                    Stage::Downloading => "downloading",
                };
                let secs = stage_started.1.elapsed().as_secs_f64().max(0.001);
                let rate = done.saturating_sub(stage_started.2) as f64 / secs;
                let eta = if total > done && rate > 0.0 {
                    format!("  ETA {:.0}s", (total - done) as f64 / rate)
                } else {
                    String::new()
                };
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                let _ = write!(
                    std::io::stderr(),
                    "\r{label} {:.1}/{:.1} MiB  {:.1} MiB/s{eta}   ",
                    mib(done),
                    mib(total),
                    rate / (1024.0 * 1024.0)
                );
            }
        })))
    }
}

impl Drop for BackupProgressLine {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            let _ = writeln!(std::io::stderr());
        }
    }
}

async fn backup(command: BackupCommand, log_format: LogFormat) -> anyhow::Result<()> {
    use atlas_runner::backup as lib;
    use atlas_runner::runner::backup::{self as ops, BackupFailure, TakenBy};
    let fail = |e: lib::BackupError| BackupFailure::from_error(e.category(), &e);
    let progress = std::sync::Arc::new(lib::Progress::default());
    match command {
        BackupCommand::Create(args) => {
            let (spec, store) = backup_store(&args.backup)?;
            let registry = prometheus::Registry::new();
            let metrics = atlas_runner::metrics::BackupMetrics::register(&registry)?;
            let started = std::time::Instant::now();
            let line = BackupProgressLine::show(&progress, log_format);
            let taken = ops::create_via_runner_or_offline(&args.backup.data, &spec, &store, progress.clone()).await;
            drop(line);
            let outcome = taken.as_ref().map(|(m, _)| m).map_err(|f| f.category);
            metrics.observe(outcome, started.elapsed());
            if let Some(path) = &args.metrics_textfile {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, atlas_runner::metrics::render(&registry))
                    .with_context(|| format!("write {}", tmp.display()))?;
                std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
            }
            let (manifest, by) = taken?;
            if args.backup.json {
                return print_json(&manifest);
            }
            let how = match (by, manifest.save_off_ms) {
                (TakenBy::Runner, Some(ms)) => format!("through the runner, saving off for {ms} ms"),
                (TakenBy::Runner, None) => "through the runner, server not running".to_owned(),
                (TakenBy::Offline, _) => "offline, no runner on the data dir".to_owned(),
            };
            writeln!(
                std::io::stdout(),
                "created {} ({how}): {} files, {} -> {} archive, in {}",
                manifest.name,
                manifest.files,
                mib(manifest.raw_bytes),
                mib(manifest.archive_bytes),
                store.location
            )?;
        }
        BackupCommand::List(args) => {
            let (_, store) = backup_store(&args)?;
            let manifests = lib::list(&store).await.map_err(fail)?;
            if args.json {
                return print_json(&manifests);
            }
            let mut out = std::io::stdout().lock();
            if manifests.is_empty() {
                writeln!(out, "no backups in {}", store.location)?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<22} {:<20} {:>8} {:>12} {:>12} {:>9}  SERVER",
                "NAME", "TIME", "FILES", "WORLD", "ARCHIVE", "SAVE-OFF"
            )?;
            for m in &manifests {
                let save_off = m.save_off_ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"));
                writeln!(
                    out,
                    "{:<22} {:<20} {:>8} {:>12} {:>12} {:>9}  {}",
                    m.name,
                    m.time.strftime("%Y-%m-%d %H:%M:%SZ").to_string(),
                    m.files,
                    mib(m.raw_bytes),
                    mib(m.archive_bytes),
                    save_off,
                    m.server_version.as_deref().unwrap_or("-")
                )?;
            }
        }
        BackupCommand::Verify(args) => {
            let (_, store) = backup_store(&args.backup)?;
            let scratch = runner::atlas_dir(&args.backup.data).join("verify");
            let line = BackupProgressLine::show(&progress, log_format);
            let verified = lib::verify_with_progress(&store, &args.name, &scratch, &progress).await;
            drop(line);
            let manifest = verified.map_err(fail)?;
            if args.backup.json {
                return print_json(&manifest);
            }
            writeln!(
                std::io::stdout(),
                "{} is intact: {} bytes with sha256 {}, {} files ({}) read back",
                manifest.name,
                manifest.archive_bytes,
                manifest.archive_sha256,
                manifest.files,
                mib(manifest.raw_bytes)
            )?;
        }
        BackupCommand::Restore(args) => {
            let (spec, store) = backup_store(&args.backup)?;
            let line = BackupProgressLine::show(&progress, log_format);
            let report =
                ops::restore_via_runner_or_offline(&args.backup.data, &spec, &store, &args.name, &progress).await;
            drop(line);
            let report = report?;
            let previous: Vec<String> = report.restored.previous.iter().map(|p| p.display().to_string()).collect();
            if args.backup.json {
                print_json(&serde_json::json!({
                    "restored": report.restored.manifest.name,
                    "worlds": report.restored.manifest.worlds,
                    "previous": previous,
                    "safetyBackup": report.safety.as_ref().map(|m| &m.name),
                    "restarted": report.restarted,
                    "restartError": report.restart_failed.as_ref().map(|f| &f.message),
                }))?;
                // Restored, but the server is down: that must not look like success.
                return report.restart_failed.map_or(Ok(()), |f| Err(f.into()));
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "restored {} ({})",
                report.restored.manifest.name,
                report.restored.manifest.worlds.join(", ")
            )?;
            if let Some(safety) = &report.safety {
                writeln!(out, "safety backup of the replaced world: {}", safety.name)?;
            }
            for p in &previous {
                writeln!(out, "what was replaced is kept at {p}")?;
            }
            if report.restarted {
                writeln!(out, "the server is starting again")?;
            }
            if let Some(failure) = report.restart_failed {
                return Err(failure.into());
            }
        }
        BackupCommand::Prune(args) => {
            let (spec, store) = backup_store(&args)?;
            let retention = spec.backup.as_ref().map(|b| b.retention.clone()).unwrap_or_default();
            let pruned = lib::prune(&store, &retention).await.map_err(fail)?;
            if args.json {
                return print_json(&serde_json::json!({
                    "kept": pruned.kept, "deleted": pruned.deleted, "orphans": pruned.orphans,
                }));
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "kept {}, deleted {}, removed {} orphan archives",
                pruned.kept.len(),
                pruned.deleted.len(),
                pruned.orphans.len()
            )?;
            for name in &pruned.deleted {
                writeln!(out, "deleted {name}")?;
            }
        }
    }
    Ok(())
}
