//! `atlas-runner`: the command line. Parses arguments, sets up logging and calls into the library.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use atlas_runner::telemetry::{self, LogFormat};
use clap::{CommandFactory, Parser, Subcommand};

mod cli;

use cli::agent::AgentArgs;
use cli::backup::BackupCommand;
use cli::client::{ClientArgs, ConsoleArgs, LogsArgs};
use cli::pack::PackCommand;
use cli::run::RunArgs;

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
    /// Keep a MinecraftServer resource's server inside its pod (the in-pod agent).
    Agent(Box<AgentArgs>),
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
    /// Write the book's generated reference pages (`make reference`).
    #[command(hide = true)]
    Reference(cli::reference::ReferenceArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A container's first process: act as its init, with the agent proper as the child. Before any
    // thread starts, so the signal mask it sets holds for the whole process.
    if matches!(cli.command, Command::Agent(_)) {
        if atlas_runner::agent::init::needed() {
            return atlas_runner::agent::init::run();
        }
        atlas_runner::agent::init::unblock_signals();
    }
    if let Err(e) = telemetry::init(cli.log_format, "info") {
        let _ = writeln!(std::io::stderr(), "atlas-runner: {e}");
        return ExitCode::from(2);
    }
    if matches!(cli.command, Command::Run(_) | Command::Agent(_))
        && let Some(problem) = atlas_runner::runner::update::unknown_time_zone()
    {
        tracing::warn!(
            "{problem}: update windows and backup schedules are read in UTC; set TZ to an IANA name such as Europe/Berlin"
        );
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

/// The error and its causes on one line, ending with a pointer to the troubleshooting entry of the
/// first of them that has one. Our error messages often quote their source already, so a cause whose
/// text the line already holds is not repeated.
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
    let pointer = error.chain().find_map(atlas_runner::troubleshooting::pointer_for);
    let line = line.replace('\n', " ");
    match pointer {
        Some(pointer) if !line.contains(atlas_runner::troubleshooting::PAGE) => format!("{line}; {pointer}"),
        _ => line,
    }
}

async fn run(command: Command, log_format: LogFormat) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => cli::run::run(args).await,
        Command::Agent(args) => cli::agent::run(*args, log_format).await,
        Command::Status(args) => cli::client::status(&args).await,
        Command::Logs(args) => cli::client::logs(&args).await,
        Command::Console(args) => cli::client::console(&args).await,
        Command::Stop(args) => cli::client::lifecycle(&args, "/v1/stop", "stopped").await,
        Command::Restart(args) => cli::client::lifecycle(&args, "/v1/restart", "restarting").await,
        Command::Pack(command) => cli::pack::run(command, log_format).await,
        Command::Backup(command) => cli::backup::run(command, log_format).await,
        Command::Operator(options) => Ok(atlas_runner::operator::run_until_signal(options).await?),
        Command::Reference(args) => cli::reference::run(&args, &Cli::command()),
        Command::Crd => {
            let yaml = atlas_runner::api::crd_yaml().context("render the CRD")?;
            tracing::debug!(bytes = yaml.len(), "rendered the MinecraftServer CRD");
            std::io::stdout().write_all(yaml.as_bytes()).context("write the CRD to stdout")?;
            Ok(())
        }
    }
}
