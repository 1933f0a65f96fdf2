//! The reconciler shared by `run` and (later) `agent`: a spec source in, a status out, and in between
//! prepare -> start -> watch -> restart or stop.

pub mod backup;
mod prepare;
mod spec;
mod state;
pub mod update;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use prepare::{PackContext, PackUpdate, PrepareError, PrepareOptions, Prepared, prepare};
pub use spec::{FileSpecSource, SpecError, load_spec, parse_spec};
pub use state::{ControlRequest, RunnerStatus, Shared};

use crate::api::{MinecraftServerSpec, Phase};
use crate::metrics::RunnerMetrics;
use crate::supervisor::{Backoff, Exit, LogBuffer, RestartPolicy, ServerProcess, StopTimeouts, Verdict};

/// How the reconciler behaves.
#[derive(Debug, Clone)]
pub struct ReconcilerOptions {
    /// Preparation (resolution, files, Java).
    pub prepare: PrepareOptions,
    /// Stop escalation timeouts.
    pub stop: StopTimeouts,
    /// Restart pacing and the crash limit.
    pub restart: RestartPolicy,
    /// How often players and process stats are sampled.
    pub poll: Duration,
}

/// Creates the shared state and the channel the control API sends requests on.
pub fn shared(registry: prometheus::Registry) -> prometheus::Result<(Shared, mpsc::Receiver<ControlRequest>)> {
    let metrics = RunnerMetrics::register(&registry)?;
    let backups = backup::Backups::register(&registry)?;
    let (requests, rx) = mpsc::channel(16);
    let (status, _) = watch::channel(RunnerStatus::default());
    let shared = Shared {
        logs: LogBuffer::new(2000),
        status,
        rcon: Arc::new(Mutex::new(None)),
        requests,
        metrics,
        registry,
        started: Arc::new(Mutex::new(None)),
        backups,
    };
    Ok((shared, rx))
}

/// How long after a transient failure (the network) a pack update is tried again.
const PACK_RETRY: Duration = Duration::from_secs(30);

/// When the server is started again: the crash backoff, and when a pack update that failed
/// transiently (the network) is tried again. Kept across servers: a failed update may have
/// restarted the old one.
struct Pacing {
    backoff: Backoff,
    pack_retry: Option<tokio::time::Instant>,
}

enum Next {
    /// Prepare and start (again).
    Start,
    /// Start what is already prepared (a spec change readied it while the old server ran).
    Run(Box<Prepared>),
    /// Stay down until the spec changes or an admin restarts.
    Hold,
    /// Leave the loop.
    Exit,
}

/// Runs the reconciler until `shutdown`, then stops the server gracefully.
pub async fn reconcile(
    mut specs: watch::Receiver<MinecraftServerSpec>,
    shared: Shared,
    mut requests: mpsc::Receiver<ControlRequest>,
    options: ReconcilerOptions,
    shutdown: CancellationToken,
) {
    let mut pacing = Pacing { backoff: Backoff::new(options.restart), pack_retry: None };
    // Scheduled backups run beside the loop, for as long as it does.
    let _backups =
        backup::spawn_scheduler(specs.clone(), shared.clone(), options.prepare.data_dir.clone(), shutdown.clone());
    let mut next = Next::Start;
    loop {
        match next {
            Next::Exit => return,
            Next::Hold => {
                next = tokio::select! {
                    _ = shutdown.cancelled() => Next::Exit,
                    changed = specs.changed() => if changed.is_ok() { pacing.backoff.reset(); Next::Start } else { Next::Exit },
                    Some(request) = requests.recv() => match request {
                        ControlRequest::Restart(reply) => { pacing.backoff.reset(); let _ = reply.send(Ok(())); Next::Start }
                        ControlRequest::Stop(reply) => { let _ = reply.send(Ok(())); Next::Hold }
                    },
                };
            }
            Next::Start => {
                let spec = specs.borrow_and_update().clone();
                shared.set_phase(Phase::Provisioning, None);
                let prepared = tokio::select! {
                    _ = shutdown.cancelled() => { next = Next::Exit; continue; }
                    prepared = prepare(&spec, &options.prepare) => prepared,
                };
                let prepared = match prepared {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(category = e.category(), "{e}");
                        next = if e.is_transient() {
                            shared.set_phase(Phase::Pending, Some(format!("{e}; retrying")));
                            wait_or_shutdown(Duration::from_secs(10), &shutdown, &mut specs).await
                        } else {
                            shared.set_phase(Phase::Failed, Some(e.to_string()));
                            Next::Hold
                        };
                        continue;
                    }
                };
                next = run_once(prepared, &mut specs, &shared, &mut requests, &options, &shutdown, &mut pacing).await;
            }
            Next::Run(prepared) => {
                next = run_once(*prepared, &mut specs, &shared, &mut requests, &options, &shutdown, &mut pacing).await;
            }
        }
    }
}

async fn wait_or_shutdown(
    delay: Duration,
    shutdown: &CancellationToken,
    specs: &mut watch::Receiver<MinecraftServerSpec>,
) -> Next {
    tokio::select! {
        _ = shutdown.cancelled() => Next::Exit,
        _ = tokio::time::sleep(delay) => Next::Start,
        _ = specs.changed() => Next::Start,
    }
}

/// Starts a prepared server and watches it until it must be started again, held down, or the
/// runner exits.
async fn run_once(
    mut prepared: Prepared,
    specs: &mut watch::Receiver<MinecraftServerSpec>,
    shared: &Shared,
    requests: &mut mpsc::Receiver<ControlRequest>,
    options: &ReconcilerOptions,
    shutdown: &CancellationToken,
    pacing: &mut Pacing,
) -> Next {
    shared.status.send_modify(|s| {
        s.server_type = Some(prepared.server_type.clone());
        s.server_version = Some(prepared.minecraft_version.clone());
        s.players_max = prepared.max_players;
        s.pack_version = prepared.pack_version.clone();
    });
    clear_update_report(shared, options);
    if let Ok(mut rcon) = shared.rcon.lock() {
        *rcon = Some(prepared.rcon.clone());
    }
    shared.set_phase(Phase::Starting, None);
    // Held until the JVM is spawned: it must not start in the middle of a capture or a restore swap.
    let backup_lock = match backup::lock_for_spawn(&options.prepare.data_dir, shared, shutdown).await {
        backup::SpawnLock::Held(lock) => lock,
        backup::SpawnLock::Shutdown => return Next::Exit,
    };
    tracing::info!(command = ?prepared.command, "starting the server");
    let spawned = ServerProcess::spawn(&prepared.command, &options.prepare.data_dir, shared.logs.clone());
    drop(backup_lock);
    let mut process = match spawned {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(category = e.category(), "{e}");
            shared.set_phase(Phase::Failed, Some(e.to_string()));
            return Next::Hold;
        }
    };
    if let Ok(mut started) = shared.started.lock() {
        *started = Some(process.started());
    }
    shared.status.send_modify(|s| s.pid = process.pid());
    let mut ready = process.ready();
    let mut poll = tokio::time::interval(options.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stats = ProcessStats::new(process.pid());
    // The readiness channel closes when the output ends; stop selecting on it then.
    let mut ready_open = true;
    // After a pack update: what to go back to if this server fails before it is ready.
    let mut fallback = prepared.fallback.clone();

    let mut is_ready = false;
    // spec.pack.update: a pack that follows a hub channel is checked for a new version while the
    // server runs; each check is a task of its own, so a slow hub holds nothing up.
    let mut schedule = update_schedule(&prepared);
    let mut checks = check_ticker(schedule.as_ref());
    let (check_tx, mut check_rx) = mpsc::channel(1);
    let mut check: Option<CheckTask> = None;
    // The version a check found to apply now: handled as a change of the same spec.
    let mut update_due: Option<String> = None;
    // A version whose update was refused for good (a bad digest, an unsafe archive): not fetched again.
    let mut refused: Option<String> = None;
    let mut last_said: Option<String> = None;

    let (exit, after) = loop {
        // Checked on every turn, not only in the branch below: that branch is disabled once the
        // value is true, so a server ready before the loop first ran would never be marked Running.
        if !is_ready && *ready.borrow() {
            is_ready = true;
            fallback = None;
            tracing::info!(after = ?process.started().elapsed(), "server is ready");
            shared.set_phase(Phase::Running, None);
            shared.metrics.last_ready_time.set(unix_now());
        }
        tokio::select! {
            exit = process.wait() => break (exit, None),
            changed = ready.changed(), if ready_open && !is_ready => {
                ready_open = changed.is_ok();
            }
            _ = tokio::time::sleep_until(pacing.pack_retry.unwrap_or_else(tokio::time::Instant::now)), if pacing.pack_retry.is_some() => {
                // Handled as a change of the same spec: the update is tried again.
                pacing.pack_retry = None;
                specs.mark_changed();
            }
            _ = poll.tick() => {
                stats.sample(&shared.metrics);
                if *ready.borrow() {
                    poll_players(shared, &prepared.rcon).await;
                }
            }
            _ = checks.tick(), if schedule.is_some() && check.is_none() => {
                if let Some(pack) = prepared.spec.pack.clone() {
                    check = Some(CheckTask::spawn(pack, &options.prepare.data_dir, check_tx.clone()));
                }
            }
            Some(found) = check_rx.recv() => {
                check = None;
                let (Some(plan), Some(pack), Some(context)) = (&schedule, &prepared.spec.pack, &options.prepare.pack) else { continue };
                let version = match found {
                    Err(e) => {
                        context.metrics.update_checks.with_label_values(&["failed"]).inc();
                        tracing::warn!("checking the pack's hub channel for a new version failed: {e}");
                        continue;
                    }
                    Ok(version) => version,
                };
                let reported = shared.status.borrow().pack_update_available.clone();
                if version == prepared.pack_version {
                    context.metrics.update_checks.with_label_values(&["current"]).inc();
                    if reported.is_some() {
                        clear_update_report(shared, options);
                    }
                    continue;
                }
                let version = version.unwrap_or_default();
                context.metrics.update_checks.with_label_values(&["available"]).inc();
                if reported.as_ref() != Some(&version) {
                    // The new series first, then the old one goes: a scrape never finds none.
                    context.metrics.update_available.with_label_values(&[version.as_str()]).set(1.0);
                    if let Some(old) = &reported {
                        let _ = context.metrics.update_available.remove_label_values(&[old.as_str()]);
                    }
                    shared.status.send_modify(|s| s.pack_update_available = Some(version.clone()));
                }
                let wait = if !plan.auto {
                    Some("spec.pack.update.mode is manual: change the spec to apply it")
                } else if !is_ready {
                    Some("waiting for the server to be ready")
                } else if let Some(why) = update_waits(plan, shared) {
                    Some(why)
                } else if !context.may_update_to(pack, &version) {
                    Some("the channel still names the version rolled back after its server failed")
                } else if refused.as_deref() == Some(version.as_str()) {
                    Some("the channel still names the version refused before")
                } else {
                    None
                };
                let said = format!("{version}: {}", wait.unwrap_or("updating"));
                if last_said.as_deref() != Some(said.as_str()) {
                    tracing::info!(from = prepared.pack_version.as_deref(), to = %version, "the pack's hub channel names a new version; {}", wait.unwrap_or("updating"));
                    last_said = Some(said);
                }
                if wait.is_none() {
                    update_due = Some(version);
                    specs.mark_changed();
                }
            }
            changed = specs.changed() => {
                if changed.is_err() { continue; }
                let spec = specs.borrow_and_update().clone();
                // An update a check found yields to a change of the spec made meanwhile: that one is
                // handled as any spec change, and the next check decides again.
                let due = update_due.take().filter(|_| {
                    !prepare::pack_changes(&prepared, &spec)
                        && !prepared.needs_restart_for(&spec)
                        && !prepare::only_update_policy_changes(&prepared, &spec)
                });
                if prepare::only_update_policy_changes(&prepared, &spec) {
                    tracing::info!("spec changed; only spec.pack.update, taken without a restart");
                    (schedule, checks) = adopt_pack_spec(&mut prepared, spec.pack.as_ref(), shared, options);
                    last_said = None;
                    continue;
                }
                if due.is_none() && !prepared.needs_restart_for(&spec) {
                    tracing::info!("spec changed; nothing that needs a restart");
                    continue;
                }
                if (due.is_some() && spec.pack.is_some()) || prepare::pack_changes(&prepared, &spec) {
                    // The update looks the channel up itself: no check may run beside it.
                    if let Some(check) = check.take() {
                        check.stop().await;
                    }
                    // Fetch, stage and verify the new pack while the server runs; it is stopped
                    // only for the swap.
                    // Set once the gate begins (the backup before the update, or the stop): from then
                    // on the update runs to its end, even through a shutdown.
                    let gated = &AtomicBool::new(false);
                    let (rcon, running) = (prepared.rcon.clone(), &mut process);
                    let stop = Box::pin(async move {
                        gated.store(true, Ordering::Release);
                        shared.set_phase(Phase::Updating, Some("swapping in a new pack version".into()));
                        running.stop(Some(&rcon), options.stop).await
                    });
                    // spec.backup.beforeUpdate: the world as the old version left it, taken through RCON
                    // once the new pack is staged and before the server stops.
                    let backup = spec.backup.as_ref().is_some_and(|b| b.before_update).then(|| {
                        Box::pin(async move {
                            gated.store(true, Ordering::Release);
                            shared.backups.create_now(shared).await.map(|m| m.name).map_err(|f| f.message)
                        }) as futures::future::BoxFuture<'_, _>
                    });
                    // Fetching and staging can take long: a shutdown meanwhile drops the update (nothing
                    // changed yet; the staging task sees its stream and channels gone) and stops the
                    // server as any shutdown does.
                    let outcome = {
                        // An update a check found goes ahead only with the version it found, and only
                        // while the policy still allows it: the download took time, and players are
                        // asked again.
                        let (plan, rcon) = (schedule.clone(), prepared.rcon.clone());
                        let proceed = due.clone().map(|version| -> prepare::Proceed<'_> {
                            Box::new(move |to: crate::pack::PackVersion| {
                                Box::pin(async move {
                                    if to.as_str() != version {
                                        return Err(format!("the channel names {to} now, not {version}"));
                                    }
                                    poll_players(shared, &rcon).await;
                                    match plan.as_ref().and_then(|plan| update_waits(plan, shared)) {
                                        Some(why) => Err(why.to_owned()),
                                        None => Ok(()),
                                    }
                                })
                            })
                        });
                        let update = prepare::update_pack(&prepared, &spec, &options.prepare, proceed, backup, stop);
                        tokio::pin!(update);
                        tokio::select! {
                            outcome = &mut update => Some(outcome),
                            _ = shutdown.cancelled() => {
                                if gated.load(Ordering::Acquire) { Some((&mut update).await) } else { None }
                            }
                        }
                    };
                    let Some(outcome) = outcome else {
                        tracing::info!("runner shutting down; the pack update was called off before the swap");
                        shared.set_phase(Phase::Stopping, Some("runner shutting down".into()));
                        let exit = process.stop(Some(&prepared.rcon), options.stop).await;
                        record_exit(shared, &exit, false);
                        shared.set_phase(Phase::Stopped, None);
                        break (exit, Some(Next::Exit));
                    };
                    if shutdown.is_cancelled()
                        && let PackUpdate::Ready { stopped, .. } | PackUpdate::Reverted { stopped, .. } | PackUpdate::Held { stopped, .. } = &outcome
                    {
                        // The server stopped for the swap, and the runner is going: start nothing.
                        tracing::info!("runner shutting down after the pack swap; not starting a server");
                        record_exit(shared, stopped, false);
                        shared.set_phase(Phase::Stopped, None);
                        return Next::Exit;
                    }
                    match outcome {
                        PackUpdate::Untouched(Some(e @ PrepareError::Deferred(_))) => {
                            tracing::info!("{e}; the next check decides again");
                            continue;
                        }
                        PackUpdate::Untouched(Some(e)) => {
                            tracing::error!(category = e.category(), transient = e.is_transient(), "{e}; keeping the running server");
                            if e.is_transient() {
                                pacing.pack_retry = Some(tokio::time::Instant::now() + PACK_RETRY);
                            } else if due.is_some() {
                                refused = due;
                            }
                            continue;
                        }
                        PackUpdate::Untouched(None) => {
                            // The data dir holds the spec's pack already: restart only for what else
                            // changed.
                            if !prepared.needs_restart_besides_pack(&spec) {
                                tracing::info!("spec changed; the data dir holds its pack and nothing else needs a restart");
                                (schedule, checks) = adopt_pack_spec(&mut prepared, spec.pack.as_ref(), shared, options);
                                last_said = None;
                                continue;
                            }
                        }
                        PackUpdate::Ready { next, stopped } => {
                            tracing::info!("pack updated; starting the server of the new version");
                            pacing.backoff.reset();
                            record_exit(shared, &stopped, false);
                            return Next::Run(next);
                        }
                        PackUpdate::Reverted { error, stopped } => {
                            tracing::error!(category = error.category(), transient = error.is_transient(), "{error}; starting the previous version again");
                            if error.is_transient() {
                                pacing.pack_retry = Some(tokio::time::Instant::now() + PACK_RETRY);
                            }
                            record_exit(shared, &stopped, false);
                            return Next::Run(Box::new(prepared.clone()));
                        }
                        PackUpdate::Held { reason, stopped } => {
                            tracing::error!("{reason}");
                            record_exit(shared, &stopped, false);
                            shared.set_phase(Phase::Failed, Some(reason));
                            return Next::Hold;
                        }
                    }
                }
                // Ready the new files while the old server still runs, then restart once.
                match prepare::prepare_change(&prepared, &spec, &options.prepare).await {
                    Ok(next) => {
                        tracing::info!("spec changed; restarting the server once with the new files ready");
                        shared.set_phase(Phase::Stopping, Some("restarting for a spec change".into()));
                        let exit = process.stop(Some(&prepared.rcon), options.stop).await;
                        pacing.backoff.reset();
                        record_exit(shared, &exit, false);
                        return Next::Run(Box::new(next));
                    }
                    Err(e) => tracing::error!(category = e.category(), "{e}; keeping the running server"),
                }
            }
            Some(request) = requests.recv() => {
                shared.set_phase(Phase::Stopping, None);
                let exit = process.stop(Some(&prepared.rcon), options.stop).await;
                match request {
                    ControlRequest::Stop(reply) => {
                        record_exit(shared, &exit, false);
                        shared.set_phase(Phase::Stopped, Some("stopped on request".into()));
                        let _ = reply.send(exit.map(|_| ()).map_err(|e| e.to_string()));
                        return Next::Hold;
                    }
                    ControlRequest::Restart(reply) => {
                        record_exit(shared, &exit, false);
                        pacing.backoff.reset();
                        let _ = reply.send(exit.map(|_| ()).map_err(|e| e.to_string()));
                        return Next::Start;
                    }
                }
            }
            _ = shutdown.cancelled() => {
                shared.set_phase(Phase::Stopping, Some("runner shutting down".into()));
                let exit = process.stop(Some(&prepared.rcon), options.stop).await;
                record_exit(shared, &exit, false);
                shared.set_phase(Phase::Stopped, None);
                break (exit, Some(Next::Exit));
            }
        }
    };
    if let Some(next) = after {
        return next;
    }
    // The server exited on its own.
    let Ok(exit) = exit else {
        shared.set_phase(Phase::Failed, Some("lost track of the server process".into()));
        return Next::Hold;
    };
    record_exit(shared, &Ok(exit.clone()), true);
    if let Some(previous) = fallback {
        // The new pack version's server never became ready: back to the version that ran.
        let reason = exit.reason.category();
        tracing::error!(
            reason,
            pack = prepared.pack_version.as_deref(),
            back_to = previous.pack_version.as_deref(),
            "the server of the new pack version exited before it was ready; rolling the pack back"
        );
        let back_to = previous.pack_version.as_deref();
        let failed = prepared.spec.pack.as_ref().map(|pack| (pack, prepared.pack_version.as_deref()));
        return match prepare::roll_back_pack(&options.prepare, reason, failed, back_to).await {
            Ok(()) => Next::Run(previous),
            Err(e) => {
                tracing::error!(category = e.category(), "{e}");
                shared.set_phase(Phase::Failed, Some(format!("rolling the pack back failed: {e}")));
                Next::Hold
            }
        };
    }
    let jitter: f64 = rand::random();
    match pacing.backoff.on_exit(Instant::now(), exit.ran_for, exit.reason.is_failure(), jitter) {
        Verdict::RestartAfter(delay) => {
            tracing::warn!(reason = exit.reason.category(), ?delay, "server exited; restarting after a delay");
            shared.set_phase(
                Phase::Pending,
                Some(format!("exited ({}); restarting in {:.1}s", exit.reason.category(), delay.as_secs_f64())),
            );
            shared.metrics.restarts.inc();
            shared.status.send_modify(|s| s.restarts += 1);
            wait_or_shutdown(delay, shutdown, specs).await
        }
        Verdict::GiveUp { failures } => {
            let message = format!(
                "{failures} failures within {:?}, the last: {}; fix the cause and run `atlas-runner restart`",
                options.restart.window,
                exit.reason.category()
            );
            tracing::error!("{message}");
            shared.set_phase(Phase::Failed, Some(message));
            Next::Hold
        }
    }
}

/// Why an update a check found must wait now, if it must: outside `window`, or with players online
/// and `requireNoPlayers`.
fn update_waits(plan: &update::Schedule, shared: &Shared) -> Option<&'static str> {
    if !plan.window_allows(&jiff::Zoned::now()) {
        Some("waiting for spec.pack.update.window")
    } else if plan.require_no_players && shared.status.borrow().players_online > 0 {
        Some("waiting until no players are online (spec.pack.update.requireNoPlayers)")
    } else {
        None
    }
}

/// Nothing is reported as an available pack update any more.
fn clear_update_report(shared: &Shared, options: &ReconcilerOptions) {
    shared.status.send_modify(|s| s.pack_update_available = None);
    if let Some(context) = &options.prepare.pack {
        context.metrics.update_available.reset();
    }
}

/// Runs on with `pack` as the running server's pack spec (the data dir holds its content): its update
/// checks replace the old ones, and with none, nothing stays reported available.
fn adopt_pack_spec(
    prepared: &mut Prepared,
    pack: Option<&crate::api::PackSpec>,
    shared: &Shared,
    options: &ReconcilerOptions,
) -> (Option<update::Schedule>, tokio::time::Interval) {
    prepared.spec.pack = pack.cloned();
    let schedule = update_schedule(prepared);
    if schedule.is_none() {
        clear_update_report(shared, options);
    }
    let ticker = check_ticker(schedule.as_ref());
    (schedule, ticker)
}

/// The update checks the running server's pack asks for (none if its policy cannot be read: the spec
/// check refuses such a spec before it runs).
fn update_schedule(prepared: &Prepared) -> Option<update::Schedule> {
    prepared.spec.pack.as_ref().and_then(|pack| update::Schedule::of(pack).ok().flatten())
}

/// Ticks every check interval, the first one interval from now.
fn check_ticker(schedule: Option<&update::Schedule>) -> tokio::time::Interval {
    let every = schedule.map_or(update::DEFAULT_INTERVAL, |s| s.interval);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// One look at what the pack's hub channel names, sent on its channel; stopped when dropped.
struct CheckTask(tokio::task::JoinHandle<()>);

/// What a check found: the version the channel names, or why it could not tell.
type Checked = Result<Option<String>, String>;

impl CheckTask {
    fn spawn(pack: crate::api::PackSpec, data_dir: &std::path::Path, found: mpsc::Sender<Checked>) -> Self {
        let fetch = crate::pack::source::FetchOptions::new(data_dir);
        Self(tokio::spawn(async move {
            let named = crate::pack::source::name(&pack.source, None, &fetch).await;
            let _ = found.send(named.map(|n| n.version.map(|v| v.to_string())).map_err(|e| e.to_string())).await;
        }))
    }

    /// Stops the check and waits until it has.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for CheckTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn record_exit(shared: &Shared, exit: &Result<Exit, crate::supervisor::SupervisorError>, unexpected: bool) {
    if let Ok(mut started) = shared.started.lock() {
        *started = None;
    }
    if let Ok(exit) = exit {
        shared.metrics.exits.with_label_values(&[exit.reason.category()]).inc();
        tracing::info!(reason = exit.reason.category(), code = ?exit.info.code, signal = ?exit.info.signal, unexpected, "server exited");
        shared.status.send_modify(|s| {
            s.last_exit_reason = Some(exit.reason.category().to_owned());
            s.pid = None;
            s.players_online = 0;
            s.player_names.clear();
        });
    }
    shared.metrics.players_online.set(0);
    shared.metrics.jvm_resident_memory.set(0);
}

async fn poll_players(shared: &Shared, rcon: &crate::rcon::Rcon) {
    let started = Instant::now();
    match rcon.command("list").await {
        Ok(reply) => {
            shared.metrics.rcon_latency.observe(started.elapsed().as_secs_f64());
            if let Some(list) = crate::rcon::parse_list(&reply) {
                shared.metrics.players_online.set(i64::from(list.online));
                shared.metrics.players_max.set(i64::from(list.max));
                shared.status.send_modify(|s| {
                    s.players_online = list.online;
                    s.players_max = list.max;
                    s.player_names = list.names;
                });
            }
        }
        Err(e) => {
            shared.metrics.rcon_failures.with_label_values(&[e.category()]).inc();
            tracing::debug!(error = %e, "RCON list failed");
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Samples the JVM's memory and CPU time.
struct ProcessStats {
    pid: Option<sysinfo::Pid>,
    // None where sysinfo cannot read this platform's process table; stats are then not sampled.
    system: Option<sysinfo::System>,
    last_cpu_ms: u64,
}

impl ProcessStats {
    fn new(pid: Option<u32>) -> Self {
        Self { pid: pid.map(sysinfo::Pid::from_u32), system: sysinfo::System::new().ok(), last_cpu_ms: 0 }
    }

    fn sample(&mut self, metrics: &RunnerMetrics) {
        let (Some(pid), Some(system)) = (self.pid, self.system.as_mut()) else { return };
        system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        if let Some(process) = system.process(pid) {
            metrics.jvm_resident_memory.set(i64::try_from(process.memory()).unwrap_or(i64::MAX));
            let cpu_ms = process.accumulated_cpu_time();
            if cpu_ms > self.last_cpu_ms {
                metrics.jvm_cpu_seconds.inc_by((cpu_ms - self.last_cpu_ms) as f64 / 1000.0);
                self.last_cpu_ms = cpu_ms;
            }
        }
    }
}

/// Where the runner keeps its state inside the data dir.
pub fn atlas_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join(".atlas")
}
