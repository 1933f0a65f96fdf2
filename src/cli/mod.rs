//! One module per command family; `main.rs` parses and dispatches to them.

pub(crate) mod agent;
pub(crate) mod backup;
pub(crate) mod client;
pub(crate) mod pack;
pub(crate) mod reference;
pub(crate) mod run;

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Writes a registry in the Prometheus text format for node_exporter's textfile collector, replacing
/// the file atomically so the collector never reads half of it.
pub(crate) fn write_metrics_textfile(path: &Path, registry: &prometheus::Registry) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, atlas_runner::metrics::render(registry))
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
