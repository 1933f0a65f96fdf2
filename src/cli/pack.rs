//! `atlas-runner pack`: build, apply, inspect and roll back packs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use atlas_runner::runner;
use atlas_runner::telemetry::LogFormat;
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub(crate) enum PackCommand {
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

#[derive(Debug, Args)]
pub(crate) struct PackBuildArgs {
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
pub(crate) struct PackApplyArgs {
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
pub(crate) struct PackDataArgs {
    /// The server's data directory.
    #[arg(long)]
    data: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(command: PackCommand, log_format: LogFormat) -> anyhow::Result<()> {
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
            existing_data_dir(&args.data, "to show")?;
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
            existing_data_dir(&args.data, "to roll back")?;
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

/// Refuses a data dir that does not exist: a command that reads what is there would make an empty one (its
/// lock file) and report on that.
fn existing_data_dir(data: &Path, what: &str) -> anyhow::Result<()> {
    if !data.is_dir() {
        bail!(
            "the data dir {} does not exist, so there is no pack {what}; give the server's data directory with --data",
            data.display()
        );
    }
    Ok(())
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
        super::write_metrics_textfile(path, &registry)?;
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
