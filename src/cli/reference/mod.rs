//! `atlas-runner reference` (hidden): writes the book's reference pages (docs/reference/) from the
//! code itself: the CRD's schema, the clap command tree, the metrics each component registers, the
//! condition types and reasons in `src/api`, and the Helm chart's values schema. It is a hidden
//! subcommand of the binary rather than a separate generator because the clap tree lives here, in
//! the binary crate; `make reference` runs it and `tests/docs.rs` fails when a page is stale.

mod cli;
mod conditions;
mod markdown;
mod metrics;
mod schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct ReferenceArgs {
    /// The directory the pages are written to; `.md` files in it that are no longer generated are
    /// removed.
    #[arg(long)]
    out: PathBuf,
    /// The Helm chart whose `values.schema.json` (and `values.yaml`, for defaults) the values page
    /// is made from. No page when the chart has no schema.
    #[arg(long, default_value = "charts/atlas-runner")]
    chart: PathBuf,
}

/// Every generated page: file name to contents.
pub(crate) fn pages(command: &clap::Command, chart: &Path) -> anyhow::Result<BTreeMap<&'static str, String>> {
    let mut pages = BTreeMap::new();
    pages.insert("minecraftserver.md", schema::crd_page()?);
    pages.insert("cli.md", cli::page(command));
    pages.insert("metrics.md", metrics::page()?);
    if let Some(page) = conditions::page()? {
        pages.insert("conditions.md", page);
    }
    if let Some(page) = schema::helm_page(chart)? {
        pages.insert("helm-values.md", page);
    }
    Ok(pages)
}

pub(crate) fn run(args: &ReferenceArgs, command: &clap::Command) -> anyhow::Result<()> {
    let pages = pages(command, &args.chart)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    for entry in std::fs::read_dir(&args.out).with_context(|| format!("read {}", args.out.display()))? {
        let path = entry?.path();
        let generated = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| pages.contains_key(n));
        if path.extension().is_some_and(|e| e == "md") && !generated {
            std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
    }
    for (name, text) in &pages {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::Parser;

    /// Every `atlas-runner` command line in the `sh` blocks of a Markdown text, without a leading
    /// `sudo -u USER` and a trailing `# comment`, as words.
    fn commands(markdown: &str) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut in_sh = false;
        for line in markdown.lines() {
            let trimmed = line.trim();
            if let Some(fence) = trimmed.strip_prefix("```") {
                in_sh = !in_sh && (fence == "sh" || fence == "bash");
                continue;
            }
            if !in_sh {
                continue;
            }
            let code = trimmed.split(" #").next().unwrap_or_default();
            let mut words: Vec<String> = code.split_whitespace().map(str::to_owned).collect();
            if words.first().is_some_and(|w| w == "sudo") && words.get(1).is_some_and(|w| w == "-u") {
                words.drain(..3);
            }
            if words.first().is_some_and(|w| w == "atlas-runner") {
                out.push(words);
            }
        }
        out
    }

    fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                markdown_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }

    /// The book and the README show only commands and options that exist: each one parses as the
    /// binary parses its arguments (the commands themselves are run by the tests the guides cite).
    #[test]
    fn every_command_the_book_shows_parses() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = vec![repo.join("README.md")];
        markdown_files(&repo.join("docs"), &mut files);
        let mut checked = 0;
        let mut failures = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for words in commands(&text) {
                checked += 1;
                if let Err(e) = crate::Cli::try_parse_from(&words) {
                    // `--version` and `--help` end parsing by design; they are still valid lines.
                    if !matches!(e.kind(), clap::error::ErrorKind::DisplayVersion | clap::error::ErrorKind::DisplayHelp)
                    {
                        failures.push(format!("{}: `{}`: {}", file.display(), words.join(" "), e.kind()));
                    }
                }
            }
        }
        assert!(checked > 20, "only {checked} commands found in the book");
        assert!(failures.is_empty(), "commands in the book that do not parse:\n{}", failures.join("\n"));
    }

    #[test]
    fn commands_are_read_from_sh_blocks_only() {
        let text = "```sh\nsudo -u minecraft atlas-runner status --data /d   # a comment\nmake build\n```\n\
                    ```text\natlas-runner [OPTIONS] <COMMAND>\n```\n";
        assert_eq!(commands(text), [["atlas-runner", "status", "--data", "/d"]]);
    }
}
