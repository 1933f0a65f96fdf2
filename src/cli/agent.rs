//! `atlas-runner agent`: the in-pod agent. The standalone runner's process ([`Runtime`]) fed by its
//! own `MinecraftServer` instead of a file, reporting through the resource's status and Events, with
//! the server's output on stdout for `kubectl logs`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use atlas_runner::agent::secrets::SecretFiles;
use atlas_runner::agent::source::{ResourceSource, SpecCache};
use atlas_runner::agent::{AgentError, AgentMetrics, FIELD_MANAGER, events, status};
use atlas_runner::api::MinecraftServer;
use atlas_runner::telemetry::LogFormat;
use clap::{Args, ValueEnum};
use kube::Api;

use super::run::{Runtime, ServerArgs};

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The MinecraftServer this agent keeps.
    #[arg(long, env = "ATLAS_SERVER_NAME")]
    name: String,
    /// Its namespace.
    #[arg(long, env = "ATLAS_NAMESPACE")]
    namespace: String,
    /// The server's data directory (the pod's volume).
    #[arg(long, env = "ATLAS_DATA_DIR", default_value = "/data")]
    data: PathBuf,
    /// Where the Secrets the spec references are mounted (`DIR/SECRET/KEY`).
    #[arg(long, env = "ATLAS_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// The RCON password file, when the operator names it (else from the spec's Secret reference,
    /// or the generated `NAME-rcon` Secret, under --secrets-dir).
    #[arg(long, env = "ATLAS_RCON_PASSWORD_FILE")]
    rcon_password_file: Option<PathBuf>,
    /// The container's memory limit in bytes (the downward API's `limits.memory`): the heap is
    /// sized from it; without it, from the cgroup.
    #[arg(long, env = "ATLAS_MEMORY_LIMIT_BYTES")]
    memory_limit_bytes: Option<u64>,
    /// How long the agent waits for the API server at start before it starts the server from the
    /// MinecraftServer it last saw (kept in DATA/.atlas/resource.json), so a container restarted
    /// during an API-server outage does not leave the server down.
    #[arg(long, env = "ATLAS_API_WAIT_SECONDS", default_value_t = 20)]
    api_wait_seconds: u64,
    /// The pod's name, which signs the agent's Events (default: the host name).
    #[arg(long, env = "ATLAS_POD_NAME")]
    pod_name: Option<String>,
    /// Where the server's output goes besides `atlas-runner logs`: `log` writes each line to stdout
    /// (with --log-format json as a JSON line with the text in `server`, for `kubectl logs`), `none`
    /// keeps it in the runner only.
    #[arg(long, value_enum, default_value_t = ServerOutput::Log)]
    server_output: ServerOutput,
    #[command(flatten)]
    server: ServerArgs,
}

/// Where the server's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServerOutput {
    /// To stdout.
    Log,
    /// Nowhere besides the runner's buffer.
    None,
}

/// How long the final status and Events may take once the server has stopped.
const FINAL_REPORT: Duration = Duration::from_secs(15);

pub(crate) async fn run(args: AgentArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let runtime = Runtime::open(&args.data, args.server, args.memory_limit_bytes).await?;
    let client = kube::Client::try_default().await.map_err(|source| AgentError::Connect { source })?;
    let api: Api<MinecraftServer> = Api::namespaced(client.clone(), &args.namespace);
    let metrics = AgentMetrics::register(&runtime.shared.registry)?;
    tracing::info!(name = args.name, namespace = args.namespace, "agent starting");

    let secrets = SecretFiles::new(args.secrets_dir, &args.name, args.rcon_password_file);
    // Deleting the resource stops the server and ends the agent, as a signal does.
    let cache = SpecCache::new(&args.data, Duration::from_secs(args.api_wait_seconds));
    let source = tokio::select! {
        source = ResourceSource::start(api.clone(), &args.name, secrets, runtime.shutdown.clone(), &runtime.shutdown, Some(cache)) => source,
        () = super::run::wait_for_signal() => None,
    };
    let Some(source) = source else {
        tracing::info!("agent stopped before its MinecraftServer was found");
        return Ok(());
    };

    let finished = tokio_util::sync::CancellationToken::new();
    let sink = status::spawn_sink(
        api,
        args.name.clone(),
        runtime.shared.status.subscribe(),
        source.object.clone(),
        metrics.clone(),
        finished.clone(),
    );
    let reporter = kube::runtime::events::Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: args.pod_name.clone().or_else(|| std::env::var("HOSTNAME").ok()),
    };
    let recorder = events::spawn_recorder(
        client,
        reporter,
        source.object.clone(),
        runtime.shared.events.subscribe(),
        metrics,
        finished.clone(),
    );
    let output = (args.server_output == ServerOutput::Log).then(|| echo_server_output(&runtime, log_format));

    let served = runtime.serve(source.specs.clone()).await;
    // The server is stopped: the final status and what is left of the Events, then exit.
    finished.cancel();
    if let Some(output) = output {
        output.abort();
    }
    let reported = tokio::time::timeout(FINAL_REPORT, async {
        let _ = sink.await;
        let _ = recorder.await;
    })
    .await;
    if reported.is_err() {
        tracing::warn!("the final status or Events could not be written in time");
    }
    drop(source);
    served.context("the agent failed")
}

/// Copies the server's output to stdout as it comes (the agent's own log goes to stderr): raw lines
/// for text logs, JSON lines with the text in `server` for JSON logs.
fn echo_server_output(runtime: &Runtime, log_format: LogFormat) -> tokio::task::JoinHandle<()> {
    let (_, mut lines) = runtime.shared.logs.tail_and_follow(0);
    tokio::spawn(async move {
        loop {
            let line = match lines.recv().await {
                Ok(line) => line,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    format!("[atlas-runner: {n} lines skipped]")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let mut out = std::io::stdout().lock();
            let _ = match log_format {
                // The shape of the agent's own JSON log lines (which go to stderr).
                LogFormat::Json => writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "timestamp": jiff::Timestamp::now().to_string(),
                        "level": "INFO",
                        "target": "minecraft",
                        "server": line,
                    })
                ),
                LogFormat::Text => writeln!(out, "{line}"),
            };
        }
    })
}
