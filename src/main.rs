//! `atlas-runner`: the command line. Parses arguments, sets up logging and calls into the library.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use atlas_runner::telemetry::{self, LogFormat};
use clap::{Parser, Subcommand};

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
    /// Print the MinecraftServer CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(cli.log_format, "info") {
        let _ = writeln!(std::io::stderr(), "atlas-runner: {e}");
        return ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "atlas-runner failed");
            let _ = writeln!(std::io::stderr(), "atlas-runner: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd => {
            let yaml = atlas_runner::api::crd_yaml().context("render the CRD")?;
            tracing::debug!(bytes = yaml.len(), "rendered the MinecraftServer CRD");
            std::io::stdout().write_all(yaml.as_bytes()).context("write the CRD to stdout")?;
        }
    }
    Ok(())
}
