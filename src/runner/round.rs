//! The reconciler's rounds. A round is one server's life, as named steps over one context
//! ([`Round`]):
//!
//! ```text
//! prepare -> start -> watch -> { ready | poll | check | spec change | request | shutdown }* -> end
//! ```
//!
//! A spec change is planned first ([`plan_change`], pure) and then applied: nothing, a new update
//! policy, a pack update (staged while the server runs, swapped with it stopped), or one restart.
//! The round ends in what comes next ([`Next`]): another round, a hold, or the runner's exit.
//!
//! A round whose server is the new side of an update (a pack version, a Minecraft version) watches
//! it until it has been ready for the settle period: a crash before that, or no ready in time,
//! undoes the update ([`Reconciler::undo`]): the previous pack, the previous server, and the world
//! from the backup taken before the update when the new server had touched it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::checks::{self, Checked, Checking, UpdateChecks};
use super::events;
use super::held::{self, HeldServer};
use super::observe::{ProcessStats, poll_players, record_exit, report_outcome, report_prepared, unix_now};
use super::prepare::{self, PackUpdate, PrepareError, Prepared, UPGRADE_SERVER, Upgrade};
use super::ran::{self, RanServer};
use super::world::{self, WorldPrint};
use super::{ControlRequest, ReconcilerOptions, Shared, backup};
use crate::api::conditions::reasons;
use crate::api::{MinecraftServerSpec, Phase};
use crate::supervisor::{Backoff, Exit, ExitReason, ServerProcess, SupervisorError, Verdict};

/// How long after a transient failure (the network) a pack update is tried again.
const PACK_RETRY: Duration = Duration::from_secs(30);

/// How long after a failed backup a Minecraft version change is tried again: the backup is taken
/// with the old server stopped, so each try costs the players a restart.
const VERSION_RETRY: Duration = Duration::from_secs(300);

/// When the server is started again: the crash backoff, and when a pack update that failed
/// transiently (the network) is tried again. Kept across rounds: a failed update may have
/// restarted the old server.
struct Pacing {
    backoff: Backoff,
    pack_retry: Option<tokio::time::Instant>,
}

/// What comes after a round.
pub(super) enum Next {
    /// Prepare and start (again).
    Start,
    /// Start what is already prepared (a spec change readied it while the old server ran).
    Run(Box<Prepared>),
    /// Stay down until the spec changes or an admin restarts.
    Hold,
    /// Leave the loop.
    Exit,
}

/// The reconciler: what lives across rounds.
pub(super) struct Reconciler {
    specs: watch::Receiver<super::Desired>,
    shared: Shared,
    requests: mpsc::Receiver<ControlRequest>,
    options: ReconcilerOptions,
    shutdown: CancellationToken,
    pacing: Pacing,
    /// A Minecraft version change undone because its server failed: its spec runs the version
    /// before until the spec names another (kept in the data dir across restarts).
    held_server: Option<HeldServer>,
    /// The generation of the spec taken last.
    taken_generation: Option<i64>,
    /// The spec source's notes on the spec taken last (see [`super::Desired::notes`]).
    notes: std::collections::BTreeMap<&'static str, String>,
    /// The spec taken last, as its source gave it.
    taken: Option<MinecraftServerSpec>,
    /// The spec refused last and why: reported until another spec is taken (a lock, as `observe`
    /// runs where the reconciler is shared with a running update).
    refused: std::sync::Mutex<Option<(MinecraftServerSpec, String)>>,
}

/// One running server and what the round tracks about it.
struct Round {
    prepared: Prepared,
    process: ServerProcess,
    ready: watch::Receiver<bool>,
    // The readiness channel closes when the output ends; it is not waited on after that.
    ready_open: bool,
    is_ready: bool,
    /// The update this server is the new side of, until it has settled.
    upgrade: Option<Box<Upgrade>>,
    /// The world as it was before this (upgrade's) server started.
    world_before: Option<WorldPrint>,
    /// When an upgrade's server must be ready by, and once ready, when it has settled.
    upgrade_deadline: Option<tokio::time::Instant>,
    poll: tokio::time::Interval,
    stats: ProcessStats,
    updates: UpdateChecks,
}

/// What the watch step saw.
enum Happened {
    Exited(Result<Exit, SupervisorError>),
    ReadyChanged { open: bool },
    UpgradeDeadline,
    PackRetryDue,
    PollDue,
    Checks(Checking),
    SpecChanged { open: bool },
    Request(ControlRequest),
    Shutdown,
}

/// How a round goes on after a step.
enum Flow {
    /// Keep watching.
    Continue,
    /// The server exited on its own.
    Exited(Result<Exit, SupervisorError>),
    /// The round is over.
    Done(Next),
}

/// What a spec change asks of the running server.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// Nothing that needs a restart.
    Nothing,
    /// Only `spec.pack.update`: taken without a restart.
    UpdatePolicy,
    /// A new pack (or the version a check found, `due`): staged while the server runs.
    Pack { due: Option<String> },
    /// One restart with the new files readied first.
    Restart,
}

/// Plans a change from what `prepared` runs to `spec`; `due` is the version an update check found,
/// which yields to any change of the spec made meanwhile (that is handled as any spec change, and
/// the next check decides again).
pub(super) fn plan_change(prepared: &Prepared, spec: &MinecraftServerSpec, due: Option<String>) -> Change {
    let policy_only = prepare::only_update_policy_changes(prepared, spec);
    let pack_changes = prepare::pack_changes(prepared, spec);
    let restart = prepared.needs_restart_for(spec);
    let due = due.filter(|_| !pack_changes && !restart && !policy_only);
    if policy_only {
        Change::UpdatePolicy
    } else if due.is_none() && !restart {
        Change::Nothing
    } else if (due.is_some() && spec.pack.is_some()) || pack_changes {
        Change::Pack { due }
    } else {
        Change::Restart
    }
}

impl Reconciler {
    pub(super) fn new(
        specs: watch::Receiver<super::Desired>,
        shared: Shared,
        requests: mpsc::Receiver<ControlRequest>,
        options: ReconcilerOptions,
        shutdown: CancellationToken,
    ) -> Self {
        let pacing = Pacing { backoff: Backoff::new(options.restart), pack_retry: None };
        let held_server = held::load(&options.prepare.data_dir);
        Self {
            specs,
            shared,
            requests,
            options,
            shutdown,
            pacing,
            held_server,
            taken_generation: None,
            notes: std::collections::BTreeMap::new(),
            taken: None,
            refused: std::sync::Mutex::new(None),
        }
    }

    /// Runs rounds until shutdown, then stops the server gracefully.
    pub(super) async fn run(mut self) {
        // Scheduled backups run beside the rounds, for as long as they do.
        let _backups = backup::spawn_scheduler(
            self.specs.clone(),
            self.shared.clone(),
            self.options.prepare.data_dir.clone(),
            self.shutdown.clone(),
        );
        let mut next = Next::Start;
        loop {
            next = match next {
                Next::Exit => return,
                Next::Hold => self.hold().await,
                Next::Start => self.prepare().await,
                Next::Run(prepared) => self.round(*prepared).await,
            };
        }
    }

    /// Stays down until the spec changes, an admin restarts, or the runner exits.
    async fn hold(&mut self) -> Next {
        tokio::select! {
            _ = self.shutdown.cancelled() => Next::Exit,
            changed = self.specs.changed() => if changed.is_ok() { self.pacing.backoff.reset(); Next::Start } else { Next::Exit },
            Some(request) = self.requests.recv() => match request {
                ControlRequest::Restart(reply) => { self.pacing.backoff.reset(); let _ = reply.send(Ok(())); Next::Start }
                ControlRequest::Stop(reply) => { let _ = reply.send(Ok(())); Next::Hold }
            },
        }
    }

    /// Readies the current spec (its pack applied, with no server running).
    async fn prepare(&mut self) -> Next {
        let spec = self.take_spec();
        self.shared.set_phase(Phase::Provisioning, None);
        self.observe();
        // `latest` stays where the world last ran: a new runner (a replaced pod) must not upgrade the
        // world because Mojang published a release meanwhile.
        let ran = ran::load(&self.options.prepare.data_dir).filter(RanServer::known);
        let pinned = ran.as_ref().and_then(|ran| ran.pin(&spec.server));
        if let Some(pinned) = &pinned {
            tracing::info!(
                version = pinned.version,
                "spec.server names latest; keeping the version the world last ran on"
            );
        }
        let prepared = tokio::select! {
            _ = self.shutdown.cancelled() => return Next::Exit,
            prepared = prepare::prepare_as(&spec, &self.options.prepare, pinned.as_ref()) => prepared,
        };
        match prepared {
            Ok(prepared) => match ran {
                Some(ran) if changes_version(&ran.minecraft_version, &prepared.minecraft_version) => {
                    self.version_change_at_start(spec, prepared, ran).await
                }
                _ => Next::Run(Box::new(prepared)),
            },
            Err(e) => {
                tracing::error!(category = e.category(), "{e}");
                if e.is_transient() {
                    self.shared.set_phase(Phase::Pending, Some(format!("{e}; retrying")));
                    self.wait_then_start(Duration::from_secs(10)).await
                } else {
                    let message = crate::troubleshooting::with_pointer_for(e.to_string(), &e);
                    self.shared.set_phase(Phase::Failed, Some(message));
                    Next::Hold
                }
            }
        }
    }

    /// A fresh start whose spec resolves to another Minecraft version than the world last ran on
    /// (the spec changed while no runner ran): an update like one made while the server runs. It
    /// needs `spec.backup.beforeUpdate` (refused otherwise: the version the world ran on starts); the
    /// backup is taken now, with no server running, and a new server that fails is undone.
    async fn version_change_at_start(&mut self, spec: MinecraftServerSpec, mut next: Prepared, ran: RanServer) -> Next {
        let (from, to) = (ran.minecraft_version.clone(), next.minecraft_version.clone());
        let mut before = spec.clone();
        before.server = ran.server.clone();
        let previous = match prepare::prepare_server_as(&before, &self.options.prepare, None, None).await {
            Ok(mut previous) => {
                previous.pack_version.clone_from(&next.pack_version);
                previous.pack_problem.clone_from(&next.pack_problem);
                previous
            }
            Err(e) => {
                // Nothing to go back to: the change is not started blind; a transient cause is retried.
                let message = format!(
                    "Minecraft {from}, which the world last ran on, cannot be readied to go back to if {to} fails: {e}"
                );
                tracing::error!(category = e.category(), "{message}");
                return if e.is_transient() {
                    self.shared.set_phase(Phase::Pending, Some(format!("{message}; retrying")));
                    self.wait_then_start(Duration::from_secs(10)).await
                } else {
                    self.shared.set_phase(Phase::Failed, Some(message));
                    Next::Hold
                };
            }
        };
        if !spec.backup.as_ref().is_some_and(|b| b.before_update) {
            self.refuse(version_change_refused(&from, &to));
            return Next::Run(Box::new(previous));
        }
        tracing::info!(
            from,
            to,
            "the spec changed Minecraft's version while no runner ran; backing the world up first"
        );
        self.shared.set_phase(Phase::Updating, Some(format!("backing the world up before Minecraft {from} -> {to}")));
        let backup = tokio::select! {
            _ = self.shutdown.cancelled() => return Next::Exit,
            backup = self.shared.backups.create_stopped(&self.shared) => backup,
        };
        match backup {
            Ok(manifest) => {
                tracing::info!(from, to, backup = manifest.name, "changing the Minecraft version");
                next.upgrade = Some(Upgrade::server(from, to, Box::new(previous), manifest.name));
                Next::Run(Box::new(next))
            }
            Err(failure) => {
                tracing::error!(
                    category = failure.category,
                    "the backup before the Minecraft version change failed: {failure}; starting {from} and trying again in {VERSION_RETRY:?}"
                );
                self.pacing.pack_retry = Some(tokio::time::Instant::now() + VERSION_RETRY);
                Next::Run(Box::new(previous))
            }
        }
    }

    /// A round: starts a prepared server and watches it until it must be started again, held down,
    /// or the runner exits.
    async fn round(&mut self, prepared: Prepared) -> Next {
        let mut round = match self.start(prepared).await {
            Ok(round) => round,
            Err(next) => return next,
        };
        loop {
            self.note_ready(&mut round);
            let happened = self.watch(&mut round).await;
            match self.handle(&mut round, happened).await {
                Flow::Continue => {}
                Flow::Exited(exit) => return self.end(round, exit).await,
                Flow::Done(next) => return next,
            }
        }
    }

    /// Reports what is about to run and spawns its JVM (never in the middle of a backup's capture or
    /// a restore's swap).
    async fn start(&mut self, mut prepared: Prepared) -> Result<Round, Next> {
        let shared = &self.shared;
        report_prepared(shared, &prepared);
        if let Some((from, to)) = prepared.applied.take() {
            let from = from.map_or_else(String::new, |f| format!(" (was {f})"));
            shared.emit(events::PACK_APPLIED, format!("pack {to} applied{from}"), false);
        }
        checks::clear_update_report(shared, &self.options);
        if let Ok(mut rcon) = shared.rcon.lock() {
            *rcon = Some(prepared.rcon.clone());
        }
        shared.set_phase(Phase::Starting, None);
        let upgrade = prepared.upgrade.take();
        // The world as the old server left it: after a failure, whether the new one touched it.
        let world_before = match &upgrade {
            Some(_) => Some(world::print(&self.options.prepare.data_dir).await),
            None => None,
        };
        // Held until the JVM is spawned.
        let backup_lock = match backup::lock_for_spawn(&self.options.prepare.data_dir, shared, &self.shutdown).await {
            backup::SpawnLock::Held(lock) => lock,
            backup::SpawnLock::Shutdown => return Err(Next::Exit),
        };
        tracing::info!(command = ?prepared.command, "starting the server");
        let spawned = ServerProcess::spawn(&prepared.command, &self.options.prepare.data_dir, shared.logs.clone());
        drop(backup_lock);
        let process = match spawned {
            Ok(process) => process,
            Err(e) => {
                tracing::error!(category = e.category(), "{e}");
                shared.set_phase(Phase::Failed, Some(crate::troubleshooting::with_pointer_for(e.to_string(), &e)));
                return Err(Next::Hold);
            }
        };
        if let Ok(mut started) = shared.started.lock() {
            *started = Some(process.started());
        }
        shared.status.send_modify(|s| s.pid = process.pid());
        let mut poll = tokio::time::interval(self.options.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let upgrade_deadline =
            upgrade.as_ref().map(|_| tokio::time::Instant::now() + self.options.upgrade.ready_timeout);
        Ok(Round {
            ready: process.ready(),
            ready_open: true,
            is_ready: false,
            upgrade,
            world_before,
            upgrade_deadline,
            poll,
            stats: ProcessStats::new(process.pid()),
            updates: UpdateChecks::new(prepared.spec.pack.as_ref()),
            process,
            prepared,
        })
    }

    /// Marks the server Running once it is ready. Checked on every turn, not only when the readiness
    /// channel changes: a server ready before the round first watched would never be marked.
    fn note_ready(&self, round: &mut Round) {
        if !round.is_ready && *round.ready.borrow() {
            round.is_ready = true;
            let after = round.process.started().elapsed();
            tracing::info!(?after, "server is ready");
            self.shared.set_phase(Phase::Running, None);
            self.shared.metrics.last_ready_time.set(unix_now());
            let pack = round.prepared.pack_version.as_deref().map_or_else(String::new, |p| format!(", pack {p}"));
            self.shared.emit(
                events::STARTED,
                format!(
                    "{} {}{pack} ready after {:.1}s",
                    round.prepared.server_type,
                    round.prepared.minecraft_version,
                    after.as_secs_f64()
                ),
                false,
            );
            // An update's server is watched for the settle period before the update counts as done;
            // only then is it what the world runs on.
            if round.upgrade.is_some() {
                round.upgrade_deadline = Some(tokio::time::Instant::now() + self.options.upgrade.settle);
            } else {
                self.record_ran(&round.prepared);
            }
        }
    }

    /// Waits for the next thing that happens to the running server.
    async fn watch(&mut self, round: &mut Round) -> Happened {
        let retry_at = self.pacing.pack_retry;
        let deadline = round.upgrade_deadline;
        tokio::select! {
            exit = round.process.wait() => Happened::Exited(exit),
            changed = round.ready.changed(), if round.ready_open && !round.is_ready => {
                Happened::ReadyChanged { open: changed.is_ok() }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                Happened::UpgradeDeadline
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                Happened::PackRetryDue
            }
            _ = round.poll.tick() => Happened::PollDue,
            checking = round.updates.next() => Happened::Checks(checking),
            changed = self.specs.changed() => Happened::SpecChanged { open: changed.is_ok() },
            Some(request) = self.requests.recv() => Happened::Request(request),
            _ = self.shutdown.cancelled() => Happened::Shutdown,
        }
    }

    /// Acts on what the watch step saw.
    async fn handle(&mut self, round: &mut Round, happened: Happened) -> Flow {
        match happened {
            Happened::Exited(exit) => return Flow::Exited(exit),
            Happened::ReadyChanged { open } => round.ready_open = open,
            Happened::UpgradeDeadline => return self.upgrade_deadline(round).await,
            Happened::PackRetryDue => {
                // Handled as a change of the same spec: the update is tried again.
                self.pacing.pack_retry = None;
                self.specs.mark_changed();
            }
            Happened::PollDue => {
                round.stats.sample(&self.shared.metrics);
                if *round.ready.borrow() {
                    poll_players(&self.shared, &round.prepared.rcon).await;
                }
            }
            Happened::Checks(Checking::Due) => {
                if let Some(pack) = round.prepared.spec.pack.clone() {
                    round.updates.start(pack, &self.options.prepare.data_dir);
                }
            }
            Happened::Checks(Checking::Found(found)) => self.checked(round, found),
            Happened::SpecChanged { open: false } => {}
            Happened::SpecChanged { open: true } => return self.spec_changed(round).await,
            Happened::Request(request) => return Flow::Done(self.requested(round, request).await),
            Happened::Shutdown => {
                self.shared.set_phase(Phase::Stopping, Some("runner shutting down".into()));
                let exit = round.process.stop(Some(&round.prepared.rcon), self.options.stop).await;
                record_exit(&self.shared, &exit, false);
                self.shared.set_phase(Phase::Stopped, None);
                self.shared.emit(events::STOPPED, stopped_message("the runner is shutting down", &exit), false);
                return Flow::Done(Next::Exit);
            }
        }
        Flow::Continue
    }

    /// An update check ended: reports what it found and, when the policy allows applying it now,
    /// makes it due (handled as a change of the same spec).
    fn checked(&mut self, round: &mut Round, found: Checked) {
        round.updates.ended();
        let (Some(plan), Some(pack), Some(context)) =
            (&round.updates.schedule, &round.prepared.spec.pack, &self.options.prepare.pack)
        else {
            return;
        };
        let version = match found {
            Err(e) => {
                context.metrics.update_checks.with_label_values(&["failed"]).inc();
                tracing::warn!("checking the pack's hub channel for a new version failed: {e}");
                self.shared.set_degraded(
                    reasons::PACK_SOURCE_UNREACHABLE,
                    Some(format!("checking the pack's hub channel failed: {e}")),
                );
                return;
            }
            Ok(version) => version,
        };
        // The hub answered: whatever kept it from being reached is over.
        if round.prepared.pack_problem.is_none() {
            self.shared.set_degraded(reasons::PACK_SOURCE_UNREACHABLE, None);
        }
        if version == round.prepared.pack_version {
            context.metrics.update_checks.with_label_values(&["current"]).inc();
            // A version held because the source was down at the start is the one the channel names:
            // nothing is held any more.
            if round.prepared.pack_problem.take().is_some() {
                tracing::info!("the pack's hub channel answers and names the version the data dir holds");
                self.shared.status.send_modify(|s| s.pack_problem = None);
                self.shared.set_degraded(reasons::PACK_SOURCE_UNREACHABLE, None);
            }
            if self.shared.status.borrow().pack_update_available.is_some() {
                checks::clear_update_report(&self.shared, &self.options);
            }
            return;
        }
        let version = version.unwrap_or_default();
        context.metrics.update_checks.with_label_values(&["available"]).inc();
        checks::report_available(&self.shared, &self.options, &version);
        let wait = if !plan.auto {
            Some("spec.pack.update.mode is manual: change the spec to apply it")
        } else if !round.is_ready {
            Some("waiting for the server to be ready")
        } else if let Some(why) = checks::update_waits(plan, &self.shared) {
            Some(why)
        } else if !context.may_update_to(pack, &version) {
            Some("the channel still names the version rolled back after its server failed")
        } else if round.updates.refused.as_deref() == Some(version.as_str()) {
            Some("the channel still names the version refused before")
        } else {
            None
        };
        round.updates.say(&version, round.prepared.pack_version.as_deref(), wait);
        self.shared.status.send_if_modified(|s| {
            let waiting = wait.map(str::to_owned);
            let changed = s.pack_update_waiting != waiting;
            s.pack_update_waiting = waiting;
            changed
        });
        if wait.is_none() {
            round.updates.due = Some(version);
            self.specs.mark_changed();
        }
    }

    /// The spec changed (or an update became due): plan what it asks of the running server, then do it.
    async fn spec_changed(&mut self, round: &mut Round) -> Flow {
        let spec = self.take_spec();
        match plan_change(&round.prepared, &spec, round.updates.due.take()) {
            Change::Nothing => {
                tracing::info!("spec changed; nothing that needs a restart");
                self.observe();
                Flow::Continue
            }
            Change::UpdatePolicy => {
                tracing::info!("spec changed; only spec.pack.update, taken without a restart");
                self.adopt_pack_spec(round, &spec);
                self.observe();
                Flow::Continue
            }
            Change::Pack { due } => self.update_pack(round, spec, due).await,
            Change::Restart => self.restart_for(round, &spec).await,
        }
    }

    /// Runs on with `spec`'s pack spec (the data dir holds its content), without a restart.
    fn adopt_pack_spec(&self, round: &mut Round, spec: &MinecraftServerSpec) {
        round.prepared.spec.pack = spec.pack.clone();
        round.updates.adopt(spec.pack.as_ref(), &self.shared, &self.options);
    }

    /// Readies the new files while the old server still runs, then restarts it once. A new
    /// Minecraft version is an update: backed up first (`spec.backup.beforeUpdate`; a failed backup
    /// calls it off), and undone if its server fails.
    async fn restart_for(&mut self, round: &mut Round, spec: &MinecraftServerSpec) -> Flow {
        let mut next = match prepare::prepare_change(&round.prepared, spec, &self.options.prepare).await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(category = e.category(), "{e}; keeping the running server");
                return Flow::Continue;
            }
        };
        if changes_version(&round.prepared.minecraft_version, &next.minecraft_version) {
            let (from, to) = (round.prepared.minecraft_version.clone(), next.minecraft_version.clone());
            if !spec.backup.as_ref().is_some_and(|b| b.before_update) {
                // Refused: the rest of the spec runs on the Minecraft version that runs now.
                let refusal = version_change_refused(&from, &to);
                let mut pinned = spec.clone();
                pinned.server = round.prepared.spec.server.clone();
                if !round.prepared.needs_restart_for(&pinned) {
                    self.refuse(refusal);
                    return Flow::Continue;
                }
                next = match prepare::prepare_change(&round.prepared, &pinned, &self.options.prepare).await {
                    Ok(next) => next,
                    Err(e) => {
                        tracing::error!(category = e.category(), "{e}; keeping the running server");
                        self.refuse(refusal);
                        return Flow::Continue;
                    }
                };
                self.stop_for_restart(round).await;
                self.refuse(refusal);
                return Flow::Done(Next::Run(Box::new(next)));
            }
            // The backup is taken once the old server has stopped, so it holds the world exactly as
            // the old version left it (the last minutes of play included).
            self.stop_for_restart(round).await;
            tracing::info!(from, to, "backing the world up before the Minecraft version changes");
            self.shared
                .set_phase(Phase::Updating, Some(format!("backing the world up before Minecraft {from} -> {to}")));
            match self.shared.backups.create_stopped(&self.shared).await {
                Ok(manifest) => {
                    tracing::info!(from, to, backup = manifest.name, "changing the Minecraft version");
                    next.upgrade =
                        Some(Upgrade::server(from, to, prepare::fallback_of(&round.prepared), manifest.name));
                    return Flow::Done(Next::Run(Box::new(next)));
                }
                Err(failure) => {
                    tracing::error!(
                        category = failure.category,
                        "the backup before the Minecraft version change failed: {failure}; starting {from} again and trying again in {VERSION_RETRY:?}"
                    );
                    self.pacing.pack_retry = Some(tokio::time::Instant::now() + VERSION_RETRY);
                    return Flow::Done(Next::Run(prepare::fallback_of(&round.prepared)));
                }
            }
        }
        self.stop_for_restart(round).await;
        Flow::Done(Next::Run(Box::new(next)))
    }

    /// Stops the running server for a restart the spec asks for.
    async fn stop_for_restart(&mut self, round: &mut Round) {
        tracing::info!("spec changed; restarting the server once with the new files ready");
        self.shared.set_phase(Phase::Stopping, Some("restarting for a spec change".into()));
        self.observe();
        let exit = round.process.stop(Some(&round.prepared.rcon), self.options.stop).await;
        self.pacing.backoff.reset();
        record_exit(&self.shared, &exit, false);
    }

    /// A new pack (or the version a check found): fetched, staged and verified while the server runs,
    /// which is stopped only for the swap.
    async fn update_pack(&mut self, round: &mut Round, spec: MinecraftServerSpec, due: Option<String>) -> Flow {
        // The update looks the channel up itself: no check may run beside it.
        round.updates.stop().await;
        let (shared, options) = (&self.shared, &self.options);
        // Set once the gate begins (the backup before the update, or the stop): from then on the
        // update runs to its end, even through a shutdown.
        let gated = &AtomicBool::new(false);
        let (rcon, running) = (round.prepared.rcon.clone(), &mut round.process);
        let stop = Box::pin(async move {
            gated.store(true, Ordering::Release);
            shared.set_phase(Phase::Updating, Some("swapping in a new pack version".into()));
            running.stop(Some(&rcon), options.stop).await
        });
        // spec.backup.beforeUpdate: the world as the old version left it, taken through RCON once the
        // new pack is staged and before the server stops.
        let backup = spec.backup.as_ref().is_some_and(|b| b.before_update).then(|| {
            Box::pin(async move {
                gated.store(true, Ordering::Release);
                shared.backups.create_now(shared).await.map(|m| m.name).map_err(|f| f.message)
            }) as futures::future::BoxFuture<'_, _>
        });
        let proceed = due.clone().map(|version| {
            checks::proceed_with(version, round.updates.schedule.clone(), shared, round.prepared.rcon.clone())
        });
        // Fetching and staging can take long: a shutdown meanwhile drops the update (nothing changed
        // yet; the staging task sees its stream and channels gone) and stops the server as any
        // shutdown does.
        let outcome = {
            let update = prepare::update_pack(&round.prepared, &spec, &options.prepare, proceed, backup, stop);
            tokio::pin!(update);
            tokio::select! {
                outcome = &mut update => Some(outcome),
                _ = self.shutdown.cancelled() => {
                    if gated.load(Ordering::Acquire) { Some((&mut update).await) } else { None }
                }
            }
        };
        let Some(outcome) = outcome else {
            tracing::info!("runner shutting down; the pack update was called off before the swap");
            shared.set_phase(Phase::Stopping, Some("runner shutting down".into()));
            let exit = round.process.stop(Some(&round.prepared.rcon), options.stop).await;
            record_exit(shared, &exit, false);
            shared.set_phase(Phase::Stopped, None);
            return Flow::Done(Next::Exit);
        };
        if self.shutdown.is_cancelled()
            && let PackUpdate::Ready { stopped, .. }
            | PackUpdate::Reverted { stopped, .. }
            | PackUpdate::Held { stopped, .. } = &outcome
        {
            // The server stopped for the swap, and the runner is going: start nothing.
            tracing::info!("runner shutting down after the pack swap; not starting a server");
            record_exit(shared, stopped, false);
            shared.set_phase(Phase::Stopped, None);
            return Flow::Done(Next::Exit);
        }
        match outcome {
            PackUpdate::Untouched(Some(e @ PrepareError::Deferred(_))) => {
                tracing::info!("{e}; the next check decides again");
                Flow::Continue
            }
            PackUpdate::Untouched(Some(e)) => {
                tracing::error!(
                    category = e.category(),
                    transient = e.is_transient(),
                    "{e}; keeping the running server"
                );
                if e.is_transient() {
                    self.pacing.pack_retry = Some(tokio::time::Instant::now() + PACK_RETRY);
                } else {
                    // Refused for good: this generation is done with (the log says why).
                    self.observe();
                    if due.is_some() {
                        round.updates.refused = due;
                    }
                }
                Flow::Continue
            }
            PackUpdate::Untouched(None) => {
                // The data dir holds the spec's pack already: restart only for what else changed.
                if round.prepared.needs_restart_besides_pack(&spec) {
                    return self.restart_for(round, &spec).await;
                }
                tracing::info!("spec changed; the data dir holds its pack and nothing else needs a restart");
                self.adopt_pack_spec(round, &spec);
                self.observe();
                Flow::Continue
            }
            PackUpdate::Ready { next, stopped } => {
                self.observe();
                tracing::info!("pack updated; starting the server of the new version");
                self.pacing.backoff.reset();
                record_exit(shared, &stopped, false);
                let to = next.pack_version.as_deref().unwrap_or_default();
                let from = round.prepared.pack_version.as_deref().map_or_else(String::new, |f| format!(" (was {f})"));
                shared.emit(events::PACK_APPLIED, format!("pack {to} applied{from}"), false);
                Flow::Done(Next::Run(next))
            }
            PackUpdate::Reverted { error, stopped } => {
                self.observe();
                tracing::error!(
                    category = error.category(),
                    transient = error.is_transient(),
                    "{error}; starting the previous version again"
                );
                if error.is_transient() {
                    self.pacing.pack_retry = Some(tokio::time::Instant::now() + PACK_RETRY);
                }
                record_exit(shared, &stopped, false);
                let to = due.unwrap_or_else(|| pack_label(&spec));
                let reason = error.category();
                self.rolled_back(
                    prepare::UPGRADE_PACK,
                    reason,
                    round.prepared.pack_version.clone(),
                    to,
                    error.to_string(),
                );
                Flow::Done(Next::Run(Box::new(round.prepared.clone())))
            }
            PackUpdate::Held { reason, stopped } => {
                self.observe();
                tracing::error!("{reason}");
                record_exit(shared, &stopped, false);
                let to = due.unwrap_or_else(|| pack_label(&spec));
                self.rolled_back(
                    prepare::UPGRADE_PACK,
                    "held",
                    round.prepared.pack_version.clone(),
                    to,
                    reason.clone(),
                );
                shared.set_phase(Phase::Failed, Some(reason));
                Flow::Done(Next::Hold)
            }
        }
    }

    /// A control request (stop or restart) while the server runs.
    async fn requested(&mut self, round: &mut Round, request: ControlRequest) -> Next {
        self.shared.set_phase(Phase::Stopping, None);
        let exit = round.process.stop(Some(&round.prepared.rcon), self.options.stop).await;
        record_exit(&self.shared, &exit, false);
        match request {
            ControlRequest::Stop(reply) => {
                self.shared.set_phase(Phase::Stopped, Some("stopped on request".into()));
                self.shared.emit(events::STOPPED, stopped_message("stopped on request", &exit), false);
                let _ = reply.send(exit.map(|_| ()).map_err(|e| e.to_string()));
                Next::Hold
            }
            ControlRequest::Restart(reply) => {
                self.pacing.backoff.reset();
                let _ = reply.send(exit.map(|_| ()).map_err(|e| e.to_string()));
                Next::Start
            }
        }
    }

    /// The server exited on its own: an update whose server had not settled is undone; otherwise a
    /// restart after the crash backoff, or Failed once crashes pass the limit.
    async fn end(&mut self, round: Round, exit: Result<Exit, SupervisorError>) -> Next {
        let Ok(exit) = exit else {
            self.shared.set_phase(Phase::Failed, Some("lost track of the server process".into()));
            return Next::Hold;
        };
        record_exit(&self.shared, &Ok(exit.clone()), true);
        let class = exit.reason.category();
        if let Some(upgrade) = round.upgrade {
            let when = if round.is_ready { "while settling after it was ready" } else { "before it was ready" };
            let why = format!("its server exited ({class}) {when}");
            return self.undo(&round.prepared, upgrade, round.world_before, class, why).await;
        }
        let jitter: f64 = rand::random();
        match self.pacing.backoff.on_exit(Instant::now(), exit.ran_for, exit.reason.is_failure(), jitter) {
            Verdict::RestartAfter(delay) => {
                tracing::warn!(reason = class, ?delay, "server exited; restarting after a delay");
                self.tell_exit(&exit, &format!("restarting in {:.1}s", delay.as_secs_f64()));
                self.shared.set_phase(
                    Phase::Pending,
                    Some(format!("exited ({class}); restarting in {:.1}s", delay.as_secs_f64())),
                );
                self.shared.metrics.restarts.inc();
                self.shared.status.send_modify(|s| s.restarts += 1);
                self.wait_then_start(delay).await
            }
            Verdict::GiveUp { failures } => {
                let message = format!(
                    "{failures} failures within {:?}, the last: {class}; fix the cause and run `atlas-runner restart`",
                    self.options.restart.window,
                );
                let message = crate::troubleshooting::with_pointer(message, "exit", class);
                tracing::error!("{message}");
                self.tell_exit(&exit, "giving up");
                self.shared.set_phase(Phase::Failed, Some(message));
                Next::Hold
            }
        }
    }

    /// An Event for an unexpected exit: OOMKilled for the kernel's OOM killer, Crashed (with its
    /// class) for any other failure; a clean exit is not news.
    fn tell_exit(&self, exit: &Exit, then: &str) {
        let ran = exit.ran_for.as_secs_f64();
        match exit.reason {
            ExitReason::OomKilled => self.shared.emit(
                events::OOM_KILLED,
                format!("the server was killed for the memory limit after {ran:.0}s; {then}"),
                true,
            ),
            reason if reason.is_failure() => self.shared.emit(
                events::CRASHED,
                format!("the server exited ({}) after {ran:.0}s; {then}", reason.category()),
                true,
            ),
            _ => {}
        }
    }

    /// An update's server was not ready in time, or has settled.
    async fn upgrade_deadline(&mut self, round: &mut Round) -> Flow {
        let Some(upgrade) = round.upgrade.take() else {
            round.upgrade_deadline = None;
            return Flow::Continue;
        };
        round.upgrade_deadline = None;
        if round.is_ready {
            // Settled: the update is done.
            self.record_ran(&round.prepared);
            let from = upgrade.from.as_deref().map_or_else(String::new, |f| format!(" from {f}"));
            let what = if upgrade.kind == UPGRADE_SERVER { "Minecraft" } else { "pack" };
            report_outcome(&self.shared, upgrade.kind, upgrade.from.clone(), &upgrade.to, "Applied", None);
            self.shared.emit(
                events::UPDATE_APPLIED,
                format!(
                    "{what} updated{from} to {}; its server has been ready for {:?}",
                    upgrade.to, self.options.upgrade.settle
                ),
                false,
            );
            return Flow::Continue;
        }
        let why = format!("its server was not ready within {:?}", self.options.upgrade.ready_timeout);
        tracing::error!(to = upgrade.to, "{why}; stopping it to undo the update");
        self.shared.set_phase(Phase::Stopping, Some("undoing an update whose server did not become ready".into()));
        let exit = round.process.stop(Some(&round.prepared.rcon), self.options.stop).await;
        record_exit(&self.shared, &exit, false);
        let world_before = round.world_before.take();
        Flow::Done(self.undo(&round.prepared, upgrade, world_before, "not_ready", why).await)
    }

    /// Undoes an update whose server failed (it is stopped): the previous pack version back (or the
    /// previous Minecraft version held), the world restored from the backup taken before the update
    /// when the new server had touched it, and the previous server started again. A touched world
    /// with no backup is left alone when the Minecraft version is the same; with a new Minecraft
    /// version an older server may not load it, so nothing starts and the status says what to do.
    /// `reason` is a static category (the rollback metric's label), `why` the one-line account.
    async fn undo(
        &mut self,
        failed: &Prepared,
        upgrade: Box<Upgrade>,
        world_before: Option<WorldPrint>,
        reason: &'static str,
        why: String,
    ) -> Next {
        let Upgrade { kind, from, to, previous, backup } = *upgrade;
        if kind == UPGRADE_SERVER {
            tracing::error!(to, back_to = from.as_deref(), "the server of Minecraft {to} failed: {why}; going back");
        } else {
            tracing::error!(
                to,
                back_to = from.as_deref(),
                "the server of pack {to} failed: {why}; rolling the pack back"
            );
        }
        if kind == UPGRADE_SERVER {
            self.hold_server(failed.spec.server.clone(), previous.spec.server.clone(), &why);
        } else {
            let back_to = previous.pack_version.as_deref();
            let failed_pack = failed.spec.pack.as_ref().map(|pack| (pack, failed.pack_version.as_deref()));
            if let Err(e) = prepare::roll_back_pack(&self.options.prepare, reason, failed_pack, back_to).await {
                tracing::error!(category = e.category(), "{e}");
                let message = format!("rolling the pack back failed: {e}");
                self.rolled_back(kind, reason, from, to, format!("{why}; {message}"));
                self.shared.set_phase(Phase::Failed, Some(message));
                return Next::Hold;
            }
        }
        let touched = match world_before {
            Some(before) => world::print(&self.options.prepare.data_dir).await != before,
            None => false,
        };
        let world = match (touched, &backup) {
            (false, _) => "the world was not touched".to_owned(),
            (true, Some(name)) => match self.restore_world(&previous.spec, name).await {
                Ok(()) => format!("the world was restored from backup {name}"),
                Err(message) => {
                    let message = format!(
                        "{why}; restoring the world from backup {name} failed: {message}; the world the new server touched is in place: restore a backup with `atlas-runner backup restore`, then `atlas-runner restart`"
                    );
                    self.rolled_back(kind, reason, from, to, message.clone());
                    self.shared.set_phase(Phase::Failed, Some(message));
                    return Next::Hold;
                }
            },
            (true, None) if failed.minecraft_version != previous.minecraft_version => {
                let message = format!(
                    "{why}; it had touched the world and no backup was taken before the update (spec.backup.beforeUpdate), so Minecraft {} may not load it: restore a backup with `atlas-runner backup restore`, then `atlas-runner restart`",
                    previous.minecraft_version
                );
                self.rolled_back(kind, reason, from, to, message.clone());
                self.shared.set_phase(Phase::Failed, Some(message));
                return Next::Hold;
            }
            (true, None) => "the world it touched was kept (same Minecraft version, no backup to restore)".to_owned(),
        };
        self.rolled_back(kind, reason, from, to, format!("{why}; {world}"));
        Next::Run(previous)
    }

    /// Restores the world from `name` in the store `spec` names (the server is stopped).
    async fn restore_world(&self, spec: &MinecraftServerSpec, name: &str) -> Result<(), String> {
        let data_dir = &self.options.prepare.data_dir;
        let store =
            crate::backup::store::Store::open(spec.backup.as_ref().and_then(|b| b.store.as_ref()), data_dir, None)
                .map_err(|e| backup::describe(&e))?;
        tracing::info!(backup = name, "restoring the world from the backup taken before the update");
        let restored = crate::backup::restore(&store, name, data_dir).await.map_err(|e| backup::describe(&e))?;
        let kept = restored.previous.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        self.shared.emit(
            events::RESTORE_COMPLETED,
            format!("world restored from backup {name} (the touched world is kept at {kept})"),
            false,
        );
        Ok(())
    }

    /// Reports an update undone: status and a Warning Event.
    fn rolled_back(&self, kind: &'static str, reason: &'static str, from: Option<String>, to: String, message: String) {
        self.shared.metrics.update_rollbacks.with_label_values(&[kind, reason]).inc();
        let what = if kind == UPGRADE_SERVER { "Minecraft" } else { "pack" };
        let back = from.as_deref().map_or_else(String::new, |f| format!(" back to {f}"));
        self.shared.emit(events::UPDATE_ROLLED_BACK, format!("{what} update to {to} rolled{back}: {message}"), true);
        report_outcome(&self.shared, kind, from, &to, "RolledBack", Some(message));
    }

    /// Holds the spec's server `failed` at `instead` until the spec names another server.
    fn hold_server(&mut self, failed: crate::api::ServerSpec, instead: crate::api::ServerSpec, why: &str) {
        let held = HeldServer { failed, instead, reason: why.to_owned() };
        held::save(&self.options.prepare.data_dir, Some(&held));
        self.held_server = Some(held);
    }

    /// The status describes the generation taken last from now on: its spec was acted on (the
    /// server restarted for it, nothing needed doing, or it was refused for good).
    fn observe(&self) {
        let generation = self.taken_generation;
        self.shared.status.send_if_modified(|s| {
            let changed = s.observed_generation != generation;
            s.observed_generation = generation;
            changed
        });
        // A refusal holds while the refused spec is the one taken (a crash restart takes it again).
        let refused = self.refused.lock().ok().and_then(|mut refused| {
            if refused.as_ref().is_some_and(|(spec, _)| Some(spec) != self.taken.as_ref()) {
                *refused = None;
            }
            refused.as_ref().map(|(_, why)| why.clone())
        });
        let message = refused.or_else(|| self.notes.get(reasons::SPEC_REJECTED).cloned());
        self.shared.set_degraded(reasons::SPEC_REJECTED, message);
    }

    /// The spec taken last is refused for good: observed all the same, Degraded says why until
    /// another spec is taken, and a Warning Event tells it once.
    fn refuse(&self, message: String) {
        tracing::error!(category = "spec_rejected", "{message}");
        let Some(taken) = self.taken.clone() else { return };
        if let Ok(mut refused) = self.refused.lock() {
            if refused.as_ref().is_none_or(|(spec, why)| *spec != taken || *why != message) {
                self.shared.emit(events::SPEC_REJECTED, message.clone(), true);
            }
            *refused = Some((taken, message));
        }
        self.observe();
    }

    /// Records what `prepared` runs as what the world last ran on.
    fn record_ran(&self, prepared: &Prepared) {
        if let Some(ran) = RanServer::of(prepared) {
            ran::save(&self.options.prepare.data_dir, &ran);
        }
    }

    /// Takes the newest spec (see [`Reconciler::observe`] for when the status says so).
    fn take_spec(&mut self) -> MinecraftServerSpec {
        let desired = self.specs.borrow_and_update().clone();
        self.taken_generation = desired.generation;
        self.take_notes(desired.notes);
        self.taken = Some(desired.spec.clone());
        let mut spec = desired.spec;
        // A Minecraft version whose server failed runs the version before until the spec moves on.
        match &self.held_server {
            Some(held) if held.failed == spec.server => {
                tracing::warn!(
                    version = held.failed.version,
                    instead = held.instead.version,
                    "spec.server names the version undone after its server failed ({}); running the version before",
                    held.reason
                );
                spec.server = held.instead.clone();
            }
            Some(_) => {
                tracing::info!("spec.server moved on from the version that failed; forgetting it");
                self.held_server = None;
                held::save(&self.options.prepare.data_dir, None);
            }
            None => {}
        }
        spec
    }

    /// Reports the spec source's notes: `SecretNotMounted` at once, `SpecRejected` when the
    /// generation is observed; a Warning Event for each new one.
    fn take_notes(&mut self, notes: std::collections::BTreeMap<&'static str, String>) {
        for (reason, message) in &notes {
            if self.notes.get(reason) != Some(message) {
                self.shared.emit(reason, message.clone(), true);
            }
        }
        self.shared.set_degraded(reasons::SECRET_NOT_MOUNTED, notes.get(reasons::SECRET_NOT_MOUNTED).cloned());
        self.notes = notes;
    }

    /// Waits `delay` (a spec change cuts it short), then starts again; or exits on shutdown.
    async fn wait_then_start(&mut self, delay: Duration) -> Next {
        tokio::select! {
            _ = self.shutdown.cancelled() => Next::Exit,
            _ = tokio::time::sleep(delay) => Next::Start,
            _ = self.specs.changed() => Next::Start,
        }
    }
}

/// Whether a server of Minecraft `to` replacing one of `from` is a version change (a custom jar
/// resolved offline has no known version, and is not taken for one).
fn changes_version(from: &str, to: &str) -> bool {
    from != to && from != "unknown" && to != "unknown"
}

/// Why a Minecraft version change without `spec.backup.beforeUpdate` is refused.
fn version_change_refused(from: &str, to: &str) -> String {
    format!(
        "spec.server changes Minecraft from {from} to {to} without spec.backup.beforeUpdate: a world a newer version has loaded cannot be taken back without a backup, so {from} keeps running; set spec.backup.beforeUpdate: true (with a reachable store) to change the version"
    )
}

/// "stopped ... (how it ended)" for the Stopped Event.
fn stopped_message(why: &str, exit: &Result<Exit, SupervisorError>) -> String {
    match exit {
        Ok(exit) => format!("the server stopped ({}): {why}", exit.reason.category()),
        Err(e) => format!("the server stopped: {why} ({e})"),
    }
}

/// How to name the pack a spec asks for when no version is known before fetching it.
fn pack_label(spec: &MinecraftServerSpec) -> String {
    spec.pack.as_ref().and_then(|p| p.version.clone()).unwrap_or_else(|| "the spec's pack".to_owned())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::path::Path;

    use super::*;
    use crate::rcon::Rcon;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn spec(extra: &str) -> Result<MinecraftServerSpec, super::super::SpecError> {
        super::super::parse_spec(
            Path::new("s.yaml"),
            &format!("eula: true\nserver: {{type: vanilla, version: '1.21.4'}}\nproperties: {{motd: hi}}\n{extra}"),
        )
    }

    fn running(spec: MinecraftServerSpec) -> Prepared {
        Prepared {
            command: Vec::new(),
            rcon: Rcon::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 25575)), String::new(), Duration::from_secs(1)),
            server_type: "vanilla".into(),
            minecraft_version: "1.21.4".into(),
            max_players: 20,
            spec,
            pack_version: Some("1.0.0".into()),
            pack_problem: None,
            offline: None,
            upgrade: None,
            applied: None,
            resolved: None,
        }
    }

    const HUB: &str = "pack:\n  source:\n    hub: {url: 'http://127.0.0.1:9', pack: p, channel: stable}\n";

    #[test]
    fn a_change_is_planned_from_what_it_touches() -> TestResult {
        let now = running(spec(HUB)?);
        assert_eq!(plan_change(&now, &spec(HUB)?, None), Change::Nothing);
        let backup = format!("{HUB}backup: {{schedule: '@daily'}}\n");
        assert_eq!(plan_change(&now, &spec(&backup)?, None), Change::Nothing, "backups need no restart");
        let policy = format!("{HUB}  update: {{mode: auto}}\n");
        assert_eq!(plan_change(&now, &spec(&policy)?, None), Change::UpdatePolicy);
        let pinned = format!("{HUB}  version: 2.0.0\n");
        assert_eq!(plan_change(&now, &spec(&pinned)?, None), Change::Pack { due: None });
        let jvm = format!("{HUB}jvm: {{heap: 1G}}\n");
        assert_eq!(plan_change(&now, &spec(&jvm)?, None), Change::Restart);
        Ok(())
    }

    #[test]
    fn a_version_a_check_found_yields_to_a_spec_change_made_meanwhile() -> TestResult {
        let now = running(spec(HUB)?);
        let due = Some("2.0.0".to_owned());
        assert_eq!(plan_change(&now, &spec(HUB)?, due.clone()), Change::Pack { due: due.clone() });
        let jvm = format!("{HUB}jvm: {{heap: 1G}}\n");
        assert_eq!(plan_change(&now, &spec(&jvm)?, due.clone()), Change::Restart);
        let policy = format!("{HUB}  update: {{mode: manual}}\n");
        assert_eq!(plan_change(&now, &spec(&policy)?, due), Change::UpdatePolicy);
        Ok(())
    }
}
