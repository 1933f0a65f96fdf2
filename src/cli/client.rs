//! The control-socket clients: `status`, `logs`, `console`, `stop`, `restart`.

use std::io::Write;
use std::path::PathBuf;

use atlas_runner::http::{ConsoleReply, ConsoleRequest, client};
use atlas_runner::runner::RunnerStatus;
use clap::Args;
use http_body_util::BodyExt;

#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
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
pub(crate) struct LogsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Keep printing new lines.
    #[arg(short, long)]
    follow: bool,
    /// How many recent lines to print first.
    #[arg(long, default_value_t = 100)]
    tail: usize,
}

// The options may come before or after the command's words (`console list --data ./data`), as for
// the other client commands; a word that looks like an option and belongs to the Minecraft command
// goes after `--` (`console --data ./data -- say --json`), as clap's own error for it shows.
#[derive(Debug, Args)]
#[command(after_help = CONSOLE_HELP)]
pub(crate) struct ConsoleArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The command and its arguments (`list`, `say hello`); options may come before or after it.
    /// Words of the command that look like options (`say --json`) go after `--`.
    #[arg(value_name = "COMMAND", required_unless_present = "literal", allow_negative_numbers = true)]
    command: Vec<String>,
    /// Words after `--`, taken as they are.
    #[arg(last = true, value_name = "WORDS")]
    literal: Vec<String>,
}

/// How the console's words are split between the runner and the server, for `console --help`.
const CONSOLE_HELP: &str = "The options above are the runner's wherever they stand, between the command's words \
too: `console say hello --json world` sends `say hello world` and prints JSON, and `console say -h` prints this \
help. Words of the command that look like options go after `--`: `console -- say -h --json`.";

impl ConsoleArgs {
    /// The console command as the server gets it.
    fn line(&self) -> String {
        self.command.iter().chain(&self.literal).map(String::as_str).collect::<Vec<_>>().join(" ")
    }
}

pub(crate) async fn status(args: &ClientArgs) -> anyhow::Result<()> {
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
    if let Some(problem) = &status.pack_problem {
        writeln!(out, "pack held: {}", problem.message)?;
    }
    if let Some(version) = &status.pack_update_available {
        let waiting = status.pack_update_waiting.as_deref().map_or_else(String::new, |w| format!(" ({w})"));
        writeln!(out, "update:    {version} available{waiting}")?;
    }
    if let Some(last) = &status.last_update {
        let what = if last.kind == "server" { "Minecraft" } else { "pack" };
        let from = last.from.as_deref().map_or_else(String::new, |f| format!(" from {f}"));
        let why = last.message.as_deref().map_or_else(String::new, |m| format!(": {m}"));
        writeln!(out, "last update: {what}{from} to {} {}{why}", last.to, last.result)?;
    }
    for (reason, message) in &status.degraded {
        writeln!(out, "degraded:  {reason}: {message}")?;
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
    if let Some(failure) = &status.backup_failure {
        writeln!(out, "backup failed: {}", failure.message)?;
    }
    if let Some(next) = &status.next_backup {
        writeln!(out, "next backup: {next}")?;
    }
    Ok(())
}

pub(crate) async fn logs(args: &LogsArgs) -> anyhow::Result<()> {
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

pub(crate) async fn console(args: &ConsoleArgs) -> anyhow::Result<()> {
    let request = ConsoleRequest { command: args.line() };
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

pub(crate) async fn lifecycle(args: &ClientArgs, path: &str, done: &str) -> anyhow::Result<()> {
    let bytes = client::call(&args.socket(), "POST", path, None).await?;
    let status: RunnerStatus = serde_json::from_slice(&bytes)?;
    if args.json {
        print_status(&status, true)
    } else {
        writeln!(std::io::stdout(), "{done}; phase {}", status.phase)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Console {
        #[command(flatten)]
        args: ConsoleArgs,
    }

    fn parse(words: &[&str]) -> Result<ConsoleArgs, clap::Error> {
        Console::try_parse_from(std::iter::once("console").chain(words.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn the_options_go_before_or_after_the_command() -> anyhow::Result<()> {
        for words in [&["list", "--data", "./data"][..], &["--data", "./data", "list"], &["--data=./data", "list"]] {
            let args = parse(words)?;
            anyhow::ensure!(
                args.line() == "list" && args.client.socket() == client::socket_path("./data".as_ref()),
                "{args:?}"
            );
        }
        let args = parse(&["say", "hello", "--json", "world", "--control", "/run/c.sock"])?;
        anyhow::ensure!(args.line() == "say hello world" && args.client.json, "{args:?}");
        anyhow::ensure!(args.client.socket() == std::path::Path::new("/run/c.sock"));
        // Negative numbers are words of the command.
        anyhow::ensure!(parse(&["setblock", "0", "-60", "0", "stone"])?.line() == "setblock 0 -60 0 stone");
        Ok(())
    }

    #[test]
    fn words_after_double_dash_are_the_commands_own() -> anyhow::Result<()> {
        let args = parse(&["--data", "d", "--", "say", "--json", "--data", "x"])?;
        anyhow::ensure!(args.line() == "say --json --data x" && !args.client.json, "{args:?}");
        anyhow::ensure!(args.client.data == std::path::Path::new("d"));
        anyhow::ensure!(parse(&["say", "hi", "--", "-x"])?.line() == "say hi -x");
        Ok(())
    }

    #[test]
    fn the_help_says_options_between_the_words_are_the_runners() -> anyhow::Result<()> {
        // What the help says, the parser does.
        let args = parse(&["say", "hello", "--json", "world"])?;
        anyhow::ensure!(args.line() == "say hello world" && args.client.json, "{args:?}");
        anyhow::ensure!(parse(&["--", "say", "-h", "--json"])?.line() == "say -h --json");
        let help = parse(&["say", "-h"]).err().context("-h sent to the server")?;
        anyhow::ensure!(help.kind() == clap::error::ErrorKind::DisplayHelp, "{help}");
        let help = help.to_string();
        for said in ["`console say hello --json world` sends `say hello world`", "`console -- say -h --json`"] {
            anyhow::ensure!(help.contains(said), "the help does not say {said:?}:\n{help}");
        }
        Ok(())
    }

    #[test]
    fn an_option_the_console_does_not_know_shows_the_double_dash_form() -> anyhow::Result<()> {
        let error = parse(&["say", "--loud"]).err().context("--loud accepted")?.to_string();
        anyhow::ensure!(error.contains("-- --loud"), "{error}");
        anyhow::ensure!(parse(&[]).is_err() && parse(&["--data", "d"]).is_err(), "no command accepted");
        Ok(())
    }
}
