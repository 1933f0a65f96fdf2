//! The runner's backups: on demand (`POST /v1/backup`) and on `spec.backup.schedule`, one at a time, through
//! the running server's RCON, with retention applied after each scheduled success and metrics for both.

use std::error::Error;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::api::conditions::reasons;
use crate::api::{MinecraftServerSpec, Phase};
use crate::backup::cron::Cron;
use crate::backup::store::Store;
use crate::backup::{self, CreateOptions, Manifest};
use crate::metrics::{BackupMetrics, phase_name};

/// Test and benchmark hook: when set to N, a spec with a schedule is backed up every N seconds instead of at
/// the schedule's times (a one-minute cron is the finest real schedule, too slow for tests).
pub const SCHEDULE_SECONDS_ENV: &str = "ATLAS_BACKUP_SCHEDULE_SECONDS";

/// What a backup needs from the runner: the data dir and the current spec.
#[derive(Debug, Clone)]
struct Context {
    data_dir: PathBuf,
    spec: MinecraftServerSpec,
}

/// The runner's backup service, shared with the control API.
#[derive(Debug, Clone)]
pub struct Backups {
    /// The backup metrics on the runner's registry.
    pub metrics: BackupMetrics,
    context: Arc<RwLock<Option<Context>>>,
}

/// A failed backup as the control API reports it: a static category and one line saying what happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackupFailure {
    /// The error's category (the metric label).
    pub category: &'static str,
    /// What went wrong, with its causes, and what to do.
    pub message: String,
}

impl BackupFailure {
    fn new(category: &'static str, message: String) -> Self {
        Self { category, message }
    }

    /// A failure of `op` from `error`, its causes on one line, and what to do about it when that is not
    /// obvious.
    pub fn from_error(op: BackupOp, category: &'static str, error: &dyn Error) -> Self {
        let mut message = describe(error);
        if let Some(hint) = hint(op, category) {
            message.push_str("; ");
            message.push_str(hint);
        }
        Self::new(category, crate::troubleshooting::with_pointer(message, "backup", category))
    }
}

/// The backup command a failure belongs to: its advice speaks of what that command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupOp {
    /// `backup create`, the runner's scheduled and on-demand backups.
    Create,
    /// `backup list`.
    List,
    /// `backup verify`.
    Verify,
    /// `backup restore` (its safety backup included).
    Restore,
    /// `backup prune`, the runner's retention.
    Prune,
}

impl BackupOp {
    /// What a failed run of this command leaves, for the advice on a store that did not answer.
    fn unreachable_hint(self) -> &'static str {
        match self {
            Self::Create => "is the store reachable? the failed backup was aborted and left nothing behind; try again",
            Self::List => "is the store reachable? try again",
            Self::Verify => "is the store reachable? nothing was changed; try again",
            Self::Restore => "is the store reachable? nothing live was touched; try again",
            Self::Prune => {
                "is the store reachable? a backup is deleted manifest first, so none is left half listed; prune again"
            }
        }
    }
}

fn hint(op: BackupOp, category: &str) -> Option<&'static str> {
    Some(match category {
        "not_found" => "`atlas-runner backup list` shows the backups there are",
        "corrupt_archive" if op == BackupOp::Restore => {
            "nothing live was touched; pick another backup from `atlas-runner backup list`"
        }
        "corrupt_archive" => "pick another backup from `atlas-runner backup list`",
        "corrupt_manifest" => "the backup's manifest is damaged; pick another backup",
        "credentials" => "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or spec.backup.store.s3.credentialsFile)",
        "bucket_missing" => "create the bucket, or fix spec.backup.store.s3.bucket, endpoint and prefix",
        "store_unreachable" | "upload" | "store" => op.unreachable_hint(),
        "world_missing" => "check --data and level-name in server.properties",
        "rcon" | "flush" => "is the server healthy? `atlas-runner status` and `atlas-runner logs` tell",
        _ => return None,
    })
}

/// An error and its causes on one line, a cause already quoted by the line not repeated.
pub fn describe(error: &dyn Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

impl Backups {
    /// Creates the service and registers its metrics on `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        Ok(Self { metrics: BackupMetrics::register(registry)?, context: Arc::new(RwLock::new(None)) })
    }

    fn set_context(&self, data_dir: PathBuf, spec: MinecraftServerSpec) {
        if let Ok(mut context) = self.context.write() {
            *context = Some(Context { data_dir, spec });
        }
    }

    fn context(&self) -> Option<Context> {
        self.context.read().ok().and_then(|c| c.clone())
    }

    /// Takes a backup now: through RCON while the server runs, offline while no server process runs, and
    /// refused while one is starting or stopping. Recorded in the metrics either way.
    pub async fn create_now(&self, shared: &Shared) -> Result<Manifest, BackupFailure> {
        self.create(shared, false).await
    }

    /// Takes a backup now with no server process running, whatever the phase says: the reconciler's
    /// backup before a Minecraft version change, taken once the old server has stopped (exact, as
    /// nothing writes the world) and before the new one starts.
    pub(super) async fn create_stopped(&self, shared: &Shared) -> Result<Manifest, BackupFailure> {
        self.create(shared, true).await
    }

    async fn create(&self, shared: &Shared, stopped: bool) -> Result<Manifest, BackupFailure> {
        let started = Instant::now();
        let result = self.create_inner(shared, stopped).await;
        self.metrics.observe(result.as_ref().map_err(|(category, _)| *category), started.elapsed());
        // Saving left off by a `save-on` that failed: the world is not being saved.
        let saving_off = self.metrics.saving_off.get() > 0;
        shared.set_degraded(
            reasons::SAVING_LEFT_OFF,
            saving_off.then(|| {
                "world saving was left off after a backup (save-on failed); the next backup turns it on again, or run `atlas-runner console save-on`".to_owned()
            }),
        );
        match result {
            Ok(manifest) => {
                shared.status.send_modify(|s| {
                    s.last_backup = Some(crate::api::BackupRef {
                        name: manifest.name.clone(),
                        time: manifest.time.to_string(),
                        size_bytes: manifest.archive_bytes,
                    });
                    s.backup_failure = None;
                });
                shared.set_degraded(reasons::STORE_UNREACHABLE, None);
                shared.emit(
                    super::events::BACKUP_SUCCEEDED,
                    format!("backup {} taken ({} bytes)", manifest.name, manifest.archive_bytes),
                    false,
                );
                Ok(manifest)
            }
            Err((category, message)) => {
                tracing::error!(category, "backup failed: {message}");
                if matches!(category, "store_unreachable" | "upload" | "store") {
                    shared.set_degraded(reasons::STORE_UNREACHABLE, Some(format!("the last backup failed: {message}")));
                }
                shared.status.send_modify(|s| {
                    s.backup_failure = Some(super::Problem { reason: category.to_owned(), message: message.clone() });
                });
                shared.emit(super::events::BACKUP_FAILED, format!("backup failed ({category}): {message}"), true);
                Err(BackupFailure::new(category, message))
            }
        }
    }

    async fn create_inner(&self, shared: &Shared, stopped: bool) -> Result<Manifest, (&'static str, String)> {
        let Some(context) = self.context() else {
            return Err(("not_ready", "the runner has not loaded its spec yet; try again in a moment".to_owned()));
        };
        let fail = |e: backup::BackupError| {
            (e.category(), BackupFailure::from_error(BackupOp::Create, e.category(), &e).message)
        };
        let lock = backup::lock(&context.data_dir).map_err(fail)?;
        // Taken before the phase is read: the reconciler spawns the JVM only under the world lock, so a server
        // that is down now stays down until the capture is over (not the upload: the lock goes with the capture).
        let world = world_lock_within(&context.data_dir, WORLD_LOCK_WAIT).await.map_err(fail)?;
        let status = shared.snapshot();
        let backup_spec = context.spec.backup.as_ref();
        let mut options = CreateOptions::from_spec(&context.data_dir, backup_spec);
        options.server_version = status.server_version.clone();
        options.pack_version = status.pack_version.clone();
        let held = stopped || status.phase == phase_name(Phase::Stopped) || status.phase == phase_name(Phase::Failed);
        if status.phase == phase_name(Phase::Running) && !stopped {
            options.rcon = shared.rcon();
            options.saving_off = Some(self.metrics.saving_off.clone());
        } else if status.pid.is_some() || !held {
            // Pending and Provisioning have no JVM yet but are about to start one.
            return Err((
                "server_busy",
                format!("the server is {}; try again when it is Running or stopped", status.phase),
            ));
        }
        let store = Store::open(backup_spec.and_then(|b| b.store.as_ref()), &context.data_dir, None)
            .map_err(|e| (e.category(), BackupFailure::from_error(BackupOp::Create, e.category(), &e).message))?;
        backup::create_locked(&store, &options, &lock, backup::WorldHold::Given(world)).await.map_err(fail)
    }

    /// Applies `spec.backup.retention` to the store.
    async fn prune(&self) -> Result<backup::Pruned, BackupFailure> {
        let Some(context) = self.context() else {
            return Err(BackupFailure::new("not_ready", "the runner has not loaded its spec yet".to_owned()));
        };
        let backup_spec = context.spec.backup.as_ref();
        let store = Store::open(backup_spec.and_then(|b| b.store.as_ref()), &context.data_dir, None)
            .map_err(|e| BackupFailure::from_error(BackupOp::Prune, e.category(), &e))?;
        let retention = backup_spec.map(|b| b.retention.clone()).unwrap_or_default();
        backup::prune(&store, &retention)
            .await
            .map_err(|e| BackupFailure::from_error(BackupOp::Prune, e.category(), &e))
    }
}

/// How long a backup waits for the world lock: the reconciler holds it for the moment of a JVM spawn.
const WORLD_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Takes the world lock, waiting up to `wait` while it is busy.
async fn world_lock_within(
    data_dir: &std::path::Path,
    wait: Duration,
) -> Result<backup::WorldLock, backup::BackupError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match backup::world_lock(data_dir) {
            Err(backup::BackupError::Busy { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// The world lock as the reconciler holds it around spawning the JVM.
pub(super) enum SpawnLock {
    /// Held (or `None` when the lock file cannot be opened: the server starts anyway, with a warning).
    Held(Option<backup::WorldLock>),
    /// The runner is shutting down.
    Shutdown,
}

/// Waits for the data dir's world lock, so the JVM never starts in the middle of a capture or a restore swap.
pub(super) async fn lock_for_spawn(
    data_dir: &std::path::Path,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> SpawnLock {
    let mut told = false;
    loop {
        match backup::world_lock(data_dir) {
            Ok(lock) => return SpawnLock::Held(Some(lock)),
            Err(backup::BackupError::Busy { owner, .. }) => {
                if !told {
                    told = true;
                    tracing::info!(
                        owner,
                        "a backup or restore is running on the data dir; starting the server after it"
                    );
                    shared.set_phase(Phase::Starting, Some("waiting for a backup or restore to finish".to_owned()));
                }
            }
            Err(error) => {
                tracing::warn!(error = %describe(&error), category = error.category(), "cannot take the world lock; starting the server without it");
                return SpawnLock::Held(None);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return SpawnLock::Shutdown,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Stops the scheduler task when dropped.
#[derive(Debug)]
pub struct SchedulerHandle(tokio::task::JoinHandle<()>);

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the backup scheduler for `data_dir`: it follows the spec, and takes a backup at each time of
/// `spec.backup.schedule` until `shutdown` (or until the handle is dropped).
pub fn spawn_scheduler(
    specs: watch::Receiver<super::Desired>,
    shared: Shared,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) -> SchedulerHandle {
    shared.backups.set_context(data_dir.clone(), specs.borrow().spec.clone());
    SchedulerHandle(tokio::spawn(schedule(specs, shared, data_dir, shutdown)))
}

/// When the next scheduled backup is due, or `None` for no schedule.
enum Due {
    Never,
    In(Duration),
}

/// How long from `now` (the clock a parameter, so tests can set it) until `spec`'s schedule is next due.
fn next_due(spec: &MinecraftServerSpec, override_seconds: Option<u64>, now: &jiff::Zoned) -> Result<Due, String> {
    let Some(schedule) = spec.backup.as_ref().and_then(|b| b.schedule.as_deref()) else {
        return Ok(Due::Never);
    };
    let cron = Cron::parse(schedule).map_err(|e| e.to_string())?;
    if let Some(seconds) = override_seconds {
        return Ok(Due::In(Duration::from_secs(seconds.max(1))));
    }
    let Some(next) = cron.next_after(now) else {
        return Err(format!("the backup schedule {schedule:?} never matches a date"));
    };
    let wait = next.timestamp().duration_since(now.timestamp());
    Ok(Due::In(Duration::try_from(wait).unwrap_or(Duration::ZERO)))
}

/// The longest gap between two scheduled backups over the next few weeks, in seconds; 0 without a
/// (valid) schedule.
fn schedule_interval(spec: &MinecraftServerSpec, override_seconds: Option<u64>) -> f64 {
    let Some(schedule) = spec.backup.as_ref().and_then(|b| b.schedule.as_deref()) else { return 0.0 };
    if let Some(seconds) = override_seconds {
        return seconds.max(1) as f64;
    }
    Cron::parse(schedule)
        .ok()
        .and_then(|cron| cron.longest_gap(&jiff::Zoned::now(), 64))
        .map_or(0.0, |gap| gap.as_secs_f64())
}

async fn schedule(
    mut specs: watch::Receiver<super::Desired>,
    shared: Shared,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) {
    let override_seconds = std::env::var(SCHEDULE_SECONDS_ENV).ok().and_then(|s| s.parse::<u64>().ok());
    if let Some(seconds) = override_seconds {
        tracing::warn!(seconds, "{SCHEDULE_SECONDS_ENV} is set: scheduled backups run every {seconds} s");
    }
    loop {
        let spec = specs.borrow_and_update().spec.clone();
        shared.backups.set_context(data_dir.clone(), spec.clone());
        shared.backups.metrics.schedule_interval.set(schedule_interval(&spec, override_seconds));
        let wait = match next_due(&spec, override_seconds, &jiff::Zoned::now()) {
            Ok(Due::In(wait)) => Some(wait),
            Ok(Due::Never) => None,
            Err(message) => {
                // Not fatal: the server runs on, and a corrected spec reschedules.
                tracing::error!(category = "invalid_spec", "{message}; no scheduled backups until the spec is fixed");
                None
            }
        };
        let next =
            wait.and_then(|wait| jiff::Timestamp::now().checked_add(jiff::SignedDuration::try_from(wait).ok()?).ok());
        // Whole seconds: the status changes once per scheduled backup, not on every recomputation.
        let next = next.and_then(|t| jiff::Timestamp::from_second(t.as_second()).ok()).map(|t| t.to_string());
        shared.status.send_if_modified(|s| {
            let changed = s.next_backup != next;
            s.next_backup = next.clone();
            changed
        });
        let sleep = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = specs.changed() => {
                if changed.is_err() { return; }
                continue;
            }
            () = sleep => {}
        }
        tracing::info!("scheduled backup starting");
        let taken = tokio::select! {
            _ = shutdown.cancelled() => return,
            taken = shared.backups.create_now(&shared) => taken,
        };
        // A failure was logged and counted by `create_now`; older backups are never touched after one.
        let Ok(manifest) = taken else { continue };
        tracing::info!(backup = %manifest.name, archive_bytes = manifest.archive_bytes, save_off_ms = ?manifest.save_off_ms, "scheduled backup done");
        match shared.backups.prune().await {
            Ok(pruned) if !pruned.deleted.is_empty() || !pruned.orphans.is_empty() => {
                tracing::info!(
                    deleted = %pruned.deleted.join(","),
                    orphans = pruned.orphans.len(),
                    kept = %pruned.kept.join(","),
                    "old backups pruned"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(category = %e.category, "pruning old backups failed: {e}"),
        }
    }
}

// ---- The CLI's side: `atlas-runner backup create|restore` with or without a runner on the data dir ----

/// Who took a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakenBy {
    /// The runner on the data dir, through its server's RCON.
    Runner,
    /// This process, with no server running (no RCON).
    Offline,
}

fn failure<E: Error>(op: BackupOp, category: &'static str) -> impl Fn(E) -> BackupFailure {
    move |e| BackupFailure::from_error(op, category, &e)
}

fn backup_failure(op: BackupOp) -> impl Fn(backup::BackupError) -> BackupFailure {
    move |e| BackupFailure::from_error(op, e.category(), &e)
}

/// Takes the runner's data dir lock for an offline operation, so no runner starts a server meanwhile.
fn offline_lock(data_dir: &std::path::Path, op: BackupOp) -> Result<crate::pack::DataDirLock, BackupFailure> {
    let what = if op == BackupOp::Restore { "restore" } else { "backup" };
    crate::pack::lock(&crate::pack::lock_path(data_dir)).map_err(|e| {
        BackupFailure::new(
            "busy",
            format!(
                "{}; its control socket {} does not answer, so the {what} cannot go through it",
                describe(&e),
                client::socket_path(data_dir).display()
            ),
        )
    })
}

use crate::http::client::{self, ClientError};

/// Takes a backup of `data_dir`: through the runner when one answers on its control socket (so the
/// server's saving is paused over RCON), else offline with the data dir locked against a runner starting.
pub async fn create_via_runner_or_offline(
    data_dir: &std::path::Path,
    spec: &MinecraftServerSpec,
    store: &Store,
    progress: Arc<backup::Progress>,
) -> Result<(Manifest, TakenBy), BackupFailure> {
    if let Some(manifest) = create_via_runner(data_dir).await? {
        return Ok((manifest, TakenBy::Runner));
    }
    let _runner_lock = offline_lock(data_dir, BackupOp::Create)?;
    let mut options = CreateOptions::from_spec(data_dir, spec.backup.as_ref());
    options.progress = progress;
    let manifest = backup::create(store, &options).await.map_err(backup_failure(BackupOp::Create))?;
    Ok((manifest, TakenBy::Offline))
}

/// Takes a backup through the runner on `data_dir` (which knows its spec and store); `None` when
/// no runner answers on its control socket.
pub async fn create_via_runner(data_dir: &std::path::Path) -> Result<Option<Manifest>, BackupFailure> {
    match client::call(&client::socket_path(data_dir), "POST", "/v1/backup", None).await {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).map_err(failure::<serde_json::Error>(BackupOp::Create, "runner"))?))
        }
        Err(ClientError::Connect { .. }) => Ok(None),
        Err(ClientError::Runner(message)) => Err(BackupFailure::new("runner", message)),
        Err(e) => Err(BackupFailure::from_error(BackupOp::Create, e.category(), &e)),
    }
}

/// What a CLI restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The restored backup and where the replaced worlds were moved.
    pub restored: backup::Restored,
    /// The backup taken of the live world just before it was replaced (with a runner only).
    pub safety: Option<Manifest>,
    /// Whether the runner's server was stopped for the swap and started again.
    pub restarted: bool,
    /// The restore itself succeeded but starting the server again failed: report it and exit non-zero.
    pub restart_failed: Option<BackupFailure>,
}

/// Restores the backup `name` into `data_dir`. The archive is downloaded and checked in full first (while
/// any server keeps running); only then, with a runner on the data dir, is the server stopped through the
/// control socket, a safety backup of the live world taken, the worlds swapped, and the server started again.
/// Without a runner, the data dir is locked against one starting and the worlds are swapped.
pub async fn restore_via_runner_or_offline(
    data_dir: &std::path::Path,
    spec: &MinecraftServerSpec,
    store: &Store,
    name: &str,
    progress: &backup::Progress,
) -> Result<RestoreReport, BackupFailure> {
    // Held from before the stop to after the swap: no capture (a scheduled one included) may read a
    // half-swapped world, and the runner starts no server meanwhile (it spawns the JVM under this lock).
    let lock = backup::lock(data_dir).map_err(backup_failure(BackupOp::Restore))?;
    let world = world_lock_within(data_dir, WORLD_LOCK_WAIT).await.map_err(backup_failure(BackupOp::Restore))?;
    let staged = backup::stage_restore_with_progress(store, name, data_dir, progress)
        .await
        .map_err(backup_failure(BackupOp::Restore))?;
    tracing::info!(backup = name, "backup downloaded and checked; replacing the world");
    let socket = client::socket_path(data_dir);
    let status = match client::call(&socket, "GET", "/v1/status", None).await {
        Ok(bytes) => Some(
            serde_json::from_slice::<super::RunnerStatus>(&bytes)
                .map_err(failure::<serde_json::Error>(BackupOp::Restore, "runner"))?,
        ),
        Err(ClientError::Connect { .. }) => None,
        Err(e) => return Err(BackupFailure::from_error(BackupOp::Restore, e.category(), &e)),
    };
    let Some(status) = status else {
        let _runner_lock = offline_lock(data_dir, BackupOp::Restore)?;
        let restored = staged.swap(&world).await.map_err(backup_failure(BackupOp::Restore))?;
        return Ok(RestoreReport { restored, safety: None, restarted: false, restart_failed: None });
    };

    // A server an admin stopped, or one marked Failed, stays down after the restore.
    let was_up = status.pid.is_some()
        || (status.phase != phase_name(Phase::Stopped) && status.phase != phase_name(Phase::Failed));
    let restart = || async {
        if !was_up {
            return Ok(());
        }
        client::call(&socket, "POST", "/v1/restart", None).await.map(drop).map_err(|e| {
            BackupFailure::new(
                "runner",
                format!("starting the server again failed: {}; run `atlas-runner restart`", describe(&e)),
            )
        })
    };
    if let Err(e) = client::call(&socket, "POST", "/v1/stop", None).await {
        drop((world, lock));
        let mut message = format!("stopping the server for the restore failed: {}; nothing was restored", describe(&e));
        // The stop may have got as far as stopping the server: bring it back if it was up and now is down.
        let down = match client::call(&socket, "GET", "/v1/status", None).await {
            Ok(bytes) => serde_json::from_slice::<super::RunnerStatus>(&bytes).is_ok_and(|s| {
                s.pid.is_none() && (s.phase == phase_name(Phase::Stopped) || s.phase == phase_name(Phase::Failed))
            }),
            Err(_) => false,
        };
        if down {
            match restart().await {
                Ok(()) if was_up => message.push_str("; the server had stopped anyway and is starting again"),
                Ok(()) => {}
                Err(f) => message = format!("{message}; {}", f.message),
            }
        }
        return Err(BackupFailure::new("runner", message));
    }
    tracing::info!("server stopped; taking a safety backup of the live world");
    // The spec's includes too: the restore replaces included files as well as worlds.
    let mut options = CreateOptions::from_spec(data_dir, spec.backup.as_ref());
    options.server_version = status.server_version.clone();
    options.pack_version = status.pack_version.clone();
    let safety = match backup::create_locked(store, &options, &lock, backup::WorldHold::Kept(&world)).await {
        Ok(safety) => safety,
        Err(e) => {
            // The reconciler starts the server only under the world lock.
            drop((world, lock));
            let restarted = restart().await;
            let mut f = backup_failure(BackupOp::Restore)(e);
            f.message = format!("the safety backup failed, so nothing was restored: {}", f.message);
            if let Err(r) = restarted {
                f.message = format!("{}; {}", f.message, r.message);
            }
            return Err(f);
        }
    };
    tracing::info!(safety = %safety.name, "safety backup taken; swapping the worlds");
    let swapped = staged.swap(&world).await;
    drop((world, lock));
    if let Err(e @ backup::BackupError::SwapRollBack { .. }) = swapped {
        // Half restored: starting the server now would load (and save over) a mixed world.
        let mut f = backup_failure(BackupOp::Restore)(e);
        f.message = format!("{}; the server was left stopped", f.message);
        return Err(f);
    }
    let restarted = restart().await;
    if let Ok(restored) = &swapped {
        // The runner tells it (a RestoreCompleted Event in a pod); a runner that cannot hear it
        // changes nothing about the restore.
        let body = serde_json::json!({ "name": restored.manifest.name }).to_string().into_bytes();
        if let Err(e) = client::call(&socket, "POST", "/v1/restored", Some(body)).await {
            tracing::debug!(error = %describe(&e), "the runner was not told of the restore");
        }
    }
    let restored = match swapped {
        Ok(restored) => restored,
        Err(e) => {
            let mut f = backup_failure(BackupOp::Restore)(e);
            if let Err(r) = restarted {
                f.message = format!("{}; {}", f.message, r.message);
            }
            return Err(f);
        }
    };
    Ok(RestoreReport {
        restored,
        safety: Some(safety),
        restarted: was_up && restarted.is_ok(),
        restart_failed: restarted.err(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn spec(schedule: Option<&str>) -> MinecraftServerSpec {
        let backup = schedule.map_or(String::new(), |s| format!("backup: {{schedule: \"{s}\"}}\n"));
        serde_yaml::from_str(&format!("eula: true\nserver: {{type: vanilla}}\n{backup}")).unwrap()
    }

    /// The wait `next_due` gives at the clock reading `now`.
    fn wait(schedule: Option<&str>, override_seconds: Option<u64>, now: &str) -> Option<Duration> {
        match next_due(&spec(schedule), override_seconds, &now.parse().unwrap()).unwrap() {
            Due::In(wait) => Some(wait),
            Due::Never => None,
        }
    }

    const fn hms(h: u64, m: u64, s: u64) -> Duration {
        Duration::from_secs(h * 3600 + m * 60 + s)
    }

    #[test]
    fn the_wait_runs_from_the_clock_to_the_next_scheduled_time() {
        let utc = |t: &str| format!("{t}+00:00[UTC]");
        assert_eq!(wait(Some("0 */6 * * *"), None, &utc("2026-11-26T10:41:30")), Some(hms(1, 18, 30)));
        // Exactly on a scheduled minute: the next one, not now.
        assert_eq!(wait(Some("0 */6 * * *"), None, &utc("2026-11-26T12:00:00")), Some(hms(6, 0, 0)));
        assert_eq!(wait(Some("@daily"), None, &utc("2026-12-31T23:59:59.5")), Some(Duration::from_millis(500)));
        assert_eq!(wait(Some("* * * * *"), None, &utc("2026-11-26T10:41:59")), Some(hms(0, 0, 1)));
        // In the server's local time: the same instant is 01:00 in UTC and 02:00 in Berlin.
        assert_eq!(wait(Some("0 3 * * *"), None, "2026-11-26T01:00:00+00:00[UTC]"), Some(hms(2, 0, 0)));
        assert_eq!(wait(Some("0 3 * * *"), None, "2026-11-26T02:00:00+01:00[Europe/Berlin]"), Some(hms(1, 0, 0)));
    }

    #[test]
    fn the_wait_is_real_time_across_a_clock_change() {
        // Berlin skips 02:00-03:00 on 2026-03-29: from 01:30 to 06:00 local is 3.5 hours, not 4.5.
        assert_eq!(wait(Some("0 6 * * *"), None, "2026-03-29T01:30:00+01:00[Europe/Berlin]"), Some(hms(3, 30, 0)));
        // And repeats 02:00-03:00 on 2026-10-25: from 01:30 to 06:00 local is 5.5 hours.
        assert_eq!(wait(Some("0 6 * * *"), None, "2026-10-25T01:30:00+02:00[Europe/Berlin]"), Some(hms(5, 30, 0)));
    }

    #[test]
    fn no_schedule_waits_forever_and_a_bad_one_is_an_error() {
        assert_eq!(wait(None, None, "2026-11-26T10:00:00+00:00[UTC]"), None);
        let now: jiff::Zoned = "2026-11-26T10:00:00+00:00[UTC]".parse().unwrap();
        let Err(message) = next_due(&spec(Some("0 0 30 2 *")), None, &now) else { panic!("Feb 30 matched") };
        assert!(message.contains("never matches a date"), "{message}");
        let Err(message) = next_due(&spec(Some("every hour")), None, &now) else { panic!("a bad schedule parsed") };
        assert!(message.contains("invalid cron schedule"), "{message}");
        // The test override replaces the times but not the check of the schedule.
        assert_eq!(wait(Some("0 */6 * * *"), Some(2), "2026-11-26T10:41:30+00:00[UTC]"), Some(hms(0, 0, 2)));
        assert_eq!(wait(Some("0 */6 * * *"), Some(0), "2026-11-26T10:41:30+00:00[UTC]"), Some(hms(0, 0, 1)));
        assert!(next_due(&spec(Some("every hour")), Some(2), &now).is_err());
    }
}
