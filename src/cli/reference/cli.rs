//! The command-line page, from the clap command tree `atlas-runner` parses with: every visible
//! command with its usage, arguments and options, their defaults, environment variables and values.

use std::fmt::Write;

use clap::{Arg, ArgAction, Command};

use super::markdown::{code, generated, heading, text};

/// How an argument is written: `--data <DIR>`, `-f, --follow`, `<COMMAND>...`.
fn synopsis(arg: &Arg) -> String {
    let takes_value = !matches!(
        arg.get_action(),
        ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count | ArgAction::Help | ArgAction::Version
    );
    let value_names: Vec<String> = match arg.get_value_names() {
        Some(names) => names.iter().map(|n| format!("<{n}>")).collect(),
        None => vec![format!("<{}>", arg.get_id().as_str().to_uppercase())],
    };
    let many = arg.get_num_args().is_some_and(|n| n.max_values() > 1) || matches!(arg.get_action(), ArgAction::Append);
    if arg.is_positional() {
        let dots = if many { "..." } else { "" };
        let last = if arg.is_last_set() { "-- " } else { "" };
        return format!("{last}{}{dots}", value_names.join(" "));
    }
    let mut names = Vec::new();
    if let Some(short) = arg.get_short() {
        names.push(format!("-{short}"));
    }
    if let Some(long) = arg.get_long() {
        names.push(format!("--{long}"));
    }
    let mut out = names.join(", ");
    if takes_value {
        let _ = write!(out, " {}", value_names.join(" "));
    }
    out
}

/// One argument as a list item: how it is written, its help, then its default, environment
/// variable and accepted values.
fn write_arg(page: &mut String, arg: &Arg) {
    let help = arg.get_long_help().or(arg.get_help()).map(|h| text(&h.to_string())).unwrap_or_default();
    let mut notes = Vec::new();
    if arg.is_required_set() {
        notes.push("required".to_owned());
    }
    if matches!(arg.get_action(), ArgAction::Append) && !arg.is_positional() {
        notes.push("repeatable".to_owned());
    }
    let takes_value = !matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count);
    let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
    if takes_value && !defaults.is_empty() {
        notes.push(format!("default {}", code(&defaults.join(","))));
    }
    if let Some(env) = arg.get_env() {
        notes.push(format!("env {}", code(&env.to_string_lossy())));
    }
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| match v.get_help() {
            Some(help) => format!("{} ({})", code(v.get_name()), text(&help.to_string())),
            None => code(v.get_name()),
        })
        .collect();
    if takes_value && !values.is_empty() {
        notes.push(format!("one of {}", values.join(", ")));
    }
    let notes = if notes.is_empty() { String::new() } else { format!(" *({})*", notes.join("; ")) };
    // A help text of several paragraphs stays inside the list item.
    let help = help.trim().replace("\n\n", "\n\n  ").replace('\n', "\n  ");
    let _ = writeln!(page, "- {}{notes}: {help}", code(&synopsis(arg)));
}

/// Arguments a reader gives, in the order clap shows them: not the generated `--help`/`--version`,
/// not hidden ones, and (below the top) not the global options documented once at the top.
fn visible_args(command: &Command, top: bool) -> Vec<&Arg> {
    command
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong))
        .filter(|a| !matches!(a.get_action(), ArgAction::Version))
        .filter(|a| top || !a.is_global_set())
        .collect()
}

/// The anchor of a command: its words joined by `-` (`atlas-runner-pack-apply`).
fn anchor(path: &str) -> String {
    path.replace(' ', "-")
}

fn write_command(page: &mut String, command: &Command, path: &str, depth: usize) {
    page.push_str(&heading((depth + 2).min(5), &code(path), &anchor(path)));
    if let Some(about) = command.get_long_about().or(command.get_about()) {
        let _ = writeln!(page, "{}\n", text(about.to_string().trim()));
    }
    let usage = command.clone().render_usage().to_string();
    let usage = usage.trim_start_matches("Usage:").trim();
    let _ = writeln!(page, "```text\n{usage}\n```\n");
    let args = visible_args(command, depth == 0);
    let (positional, options): (Vec<&Arg>, Vec<&Arg>) = args.into_iter().partition(|a| a.is_positional());
    if !positional.is_empty() {
        page.push_str("Arguments:\n\n");
        for arg in positional {
            write_arg(page, arg);
        }
        page.push('\n');
    }
    if !options.is_empty() {
        page.push_str(if depth == 0 { "Options of every command:\n\n" } else { "Options:\n\n" });
        for arg in options {
            write_arg(page, arg);
        }
        page.push('\n');
    }
    let subcommands: Vec<&Command> = visible_subcommands(command);
    if !subcommands.is_empty() {
        page.push_str("Commands:\n\n");
        for sub in &subcommands {
            let sub_path = format!("{path} {}", sub.get_name());
            let about = sub.get_about().map(|a| text(&a.to_string())).unwrap_or_default();
            let _ = writeln!(page, "- [{}](#{}): {about}", code(sub.get_name()), anchor(&sub_path));
        }
        page.push('\n');
    }
    for sub in subcommands {
        write_command(page, sub, &format!("{path} {}", sub.get_name()), depth + 1);
    }
}

/// Subcommands a reader can use: not hidden ones, not clap's generated `help`.
fn visible_subcommands(command: &Command) -> Vec<&Command> {
    command.get_subcommands().filter(|c| !c.is_hide_set() && c.get_name() != "help").collect()
}

pub(super) fn page(command: &Command) -> String {
    let mut command = command.clone();
    // Building fills in what clap derives (bin names for usage lines, global options below).
    command.build();
    let mut page = String::from("# Command line\n\n");
    page.push_str(&generated("the clap definitions in src/main.rs and src/cli/"));
    page.push_str(
        "Every `atlas-runner` command, as `atlas-runner COMMAND --help` shows it. Logging goes to \
         stderr; `RUST_LOG` sets its filter (for example `RUST_LOG=atlas_runner=debug`).\n\n",
    );
    let name = command.get_name().to_owned();
    write_command(&mut page, &command, &name, 0);
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Parser, Subcommand};

    /// A small tree with what the page must show: a global option, a hidden command, a flag, a
    /// value with a default and an environment variable, an enum, a positional list.
    #[derive(Debug, Parser)]
    #[command(name = "tool")]
    struct Tool {
        /// Log format.
        #[arg(long, global = true, value_enum, default_value = "text")]
        log: Format,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Debug, Clone, clap::ValueEnum)]
    enum Format {
        /// For people.
        Text,
        Json,
    }

    #[derive(Debug, Subcommand)]
    enum Sub {
        /// Greet someone.
        Greet(GreetArgs),
        #[command(hide = true)]
        Secret,
    }

    #[derive(Debug, Args)]
    struct GreetArgs {
        /// Where to write <FILE>.
        #[arg(long, default_value = ".", env = "TOOL_DIR")]
        dir: String,
        /// Shout.
        #[arg(short, long)]
        loud: bool,
        /// Whom.
        names: Vec<String>,
    }

    #[test]
    fn the_page_shows_every_visible_command_and_argument() {
        let page = page(&<Tool as clap::CommandFactory>::command());
        for text in [
            "# Command line",
            "<a id=\"tool-greet\"></a>\n### `tool greet`\n",
            "- [`greet`](#tool-greet): Greet someone",
            "tool greet [OPTIONS] [NAMES]...",
            "- `--log <LOG>` *(default `text`; one of `text` (For people), `json`)*: Log format",
            "- `--dir <DIR>` *(default `.`; env `TOOL_DIR`)*: Where to write &lt;FILE>",
            "- `-l, --loud`: Shout",
            "- `<NAMES>...`: Whom",
        ] {
            assert!(page.contains(text), "the page lacks {text:?}:\n{page}");
        }
        assert!(!page.contains("secret"), "a hidden command is listed:\n{page}");
        assert_eq!(page.matches("--log <LOG>").count(), 1, "a global option is listed once:\n{page}");
        assert!(!page.contains("`-h, --help`"), "the generated --help is listed:\n{page}");
    }
}
