//! `atlas-runner backup`: create, list, verify, restore and prune world backups.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use atlas_runner::runner;
use atlas_runner::runner::backup::BackupOp;
use atlas_runner::telemetry::LogFormat;
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
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
pub(crate) struct BackupArgs {
    /// The MinecraftServer spec file; `spec.backup` names the store (default: DATA/.atlas/backups).
    /// S3 credentials come from spec.backup.store.s3.credentialsFile or AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY. `create` needs none when a runner runs on the data dir (in a pod).
    #[arg(long)]
    spec: Option<PathBuf>,
    /// The server's data directory.
    #[arg(long, default_value = ".")]
    data: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct BackupCreateArgs {
    #[command(flatten)]
    backup: BackupArgs,
    /// Also write the backup's metrics in the Prometheus text format to this file (for
    /// node_exporter's textfile collector), replacing it atomically.
    #[arg(long)]
    metrics_textfile: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct BackupNameArgs {
    /// The backup's name, as `backup list` shows it.
    name: String,
    #[command(flatten)]
    backup: BackupArgs,
}

pub(crate) async fn run(command: BackupCommand, log_format: LogFormat) -> anyhow::Result<()> {
    use atlas_runner::backup as lib;
    use atlas_runner::runner::backup::{self as ops, BackupFailure, TakenBy};
    let fail = |op| move |e: lib::BackupError| BackupFailure::from_error(op, e.category(), &e);
    let progress = std::sync::Arc::new(lib::Progress::default());
    match command {
        BackupCommand::Create(args) if args.backup.spec.is_none() => {
            // No spec: only the runner on the data dir knows the store (a pod's agent).
            let Some(manifest) = ops::create_via_runner(&args.backup.data).await? else {
                bail!(
                    "no runner answers on {}: pass --spec FILE to back up offline",
                    atlas_runner::http::client::socket_path(&args.backup.data).display()
                );
            };
            if args.backup.json {
                return super::print_json(&manifest);
            }
            let how = manifest.save_off_ms.map_or_else(
                || "through the runner, server not running".to_owned(),
                |ms| format!("through the runner, saving off for {ms} ms"),
            );
            writeln!(
                std::io::stdout(),
                "created {} ({how}): {} files, {} -> {} archive",
                manifest.name,
                manifest.files,
                mib(manifest.raw_bytes),
                mib(manifest.archive_bytes)
            )?;
        }
        BackupCommand::Create(args) => {
            let (spec, store) = backup_store(&args.backup, BackupOp::Create)?;
            let registry = prometheus::Registry::new();
            let metrics = atlas_runner::metrics::BackupMetrics::register(&registry)?;
            let started = std::time::Instant::now();
            let line = BackupProgressLine::show(&progress, log_format);
            let taken = ops::create_via_runner_or_offline(&args.backup.data, &spec, &store, progress.clone()).await;
            drop(line);
            let outcome = taken.as_ref().map(|(m, _)| m).map_err(|f| f.category);
            metrics.observe(outcome, started.elapsed());
            if let Some(path) = &args.metrics_textfile {
                super::write_metrics_textfile(path, &registry)?;
            }
            let (manifest, by) = taken?;
            if args.backup.json {
                return super::print_json(&manifest);
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
            let (_, store) = backup_store(&args, BackupOp::List)?;
            let manifests = lib::list(&store).await.map_err(fail(BackupOp::List))?;
            if args.json {
                return super::print_json(&manifests);
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
            let (_, store) = backup_store(&args.backup, BackupOp::Verify)?;
            let scratch = runner::atlas_dir(&args.backup.data).join("verify");
            let line = BackupProgressLine::show(&progress, log_format);
            let verified = lib::verify_with_progress(&store, &args.name, &scratch, &progress).await;
            drop(line);
            let manifest = verified.map_err(fail(BackupOp::Verify))?;
            if args.backup.json {
                return super::print_json(&manifest);
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
            let (spec, store) = backup_store(&args.backup, BackupOp::Restore)?;
            let line = BackupProgressLine::show(&progress, log_format);
            let report =
                ops::restore_via_runner_or_offline(&args.backup.data, &spec, &store, &args.name, &progress).await;
            drop(line);
            let report = report?;
            let previous: Vec<String> = report.restored.previous.iter().map(|p| p.display().to_string()).collect();
            if args.backup.json {
                super::print_json(&serde_json::json!({
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
            let (spec, store) = backup_store(&args, BackupOp::Prune)?;
            let retention = spec.backup.as_ref().map(|b| b.retention.clone()).unwrap_or_default();
            let pruned = lib::prune(&store, &retention).await.map_err(fail(BackupOp::Prune))?;
            if args.json {
                return super::print_json(&serde_json::json!({
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

/// The spec and the store of a `backup` subcommand.
fn backup_store(
    args: &BackupArgs,
    op: BackupOp,
) -> anyhow::Result<(atlas_runner::api::MinecraftServerSpec, atlas_runner::backup::store::Store)> {
    use atlas_runner::runner::backup::BackupFailure;
    let Some(spec) = &args.spec else {
        bail!("pass --spec FILE: the server's spec names the backup store (spec.backup.store)");
    };
    let spec = runner::load_spec(spec)?;
    if !args.data.is_dir() {
        bail!("the data dir {} does not exist; pass the server's --data DIR", args.data.display());
    }
    let store =
        atlas_runner::backup::store::Store::open(spec.backup.as_ref().and_then(|b| b.store.as_ref()), &args.data, None)
            .map_err(|e| BackupFailure::from_error(op, e.category(), &e))?;
    Ok((spec, store))
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
