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
