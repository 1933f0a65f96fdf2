//! `spec.pack.update` while a server runs: a pack that follows a hub channel is checked for a new
//! version every interval, each check a task of its own so a slow hub holds nothing up. What a check
//! finds is reported; in auto mode, and when the policy allows it now, it becomes due.

use tokio::sync::mpsc;

use super::observe::poll_players;
use super::{ReconcilerOptions, Shared, update};
use crate::api::PackSpec;

/// What a check found: the version the channel names, or why it could not tell.
pub(super) type Checked = Result<Option<String>, String>;

/// What happened to the update checks.
pub(super) enum Checking {
    /// It is time for a check.
    Due,
    /// A check ended.
    Found(Checked),
}

/// The update checks of one running server.
pub(super) struct UpdateChecks {
    /// The checks its pack asks for (none for a pack that cannot change under the same spec).
    pub(super) schedule: Option<update::Schedule>,
    ticker: tokio::time::Interval,
    found_tx: mpsc::Sender<Checked>,
    found_rx: mpsc::Receiver<Checked>,
    task: Option<CheckTask>,
    /// The version a check found to apply now: handled as a change of the same spec.
    pub(super) due: Option<String>,
    /// A version whose update was refused for good (a bad digest, an unsafe archive): not fetched again.
    pub(super) refused: Option<String>,
    /// What was last logged about a found version, so each new finding is logged once.
    last_said: Option<String>,
}

impl UpdateChecks {
    /// The checks `pack` asks for.
    pub(super) fn new(pack: Option<&PackSpec>) -> Self {
        let schedule = schedule_of(pack);
        let (found_tx, found_rx) = mpsc::channel(1);
        Self {
            ticker: ticker(schedule.as_ref()),
            schedule,
            found_tx,
            found_rx,
            task: None,
            due: None,
            refused: None,
            last_said: None,
        }
    }

    /// Waits until a check is due or one ended. Cancel-safe.
    pub(super) async fn next(&mut self) -> Checking {
        tokio::select! {
            _ = self.ticker.tick(), if self.schedule.is_some() && self.task.is_none() => Checking::Due,
            Some(found) = self.found_rx.recv() => Checking::Found(found),
        }
    }

    /// Starts a check of `pack` (none runs already: [`UpdateChecks::next`] says when).
    pub(super) fn start(&mut self, pack: PackSpec, data_dir: &std::path::Path) {
        self.task = Some(CheckTask::spawn(pack, data_dir, self.found_tx.clone()));
    }

    /// A check ended; the next one may start on the next tick.
    pub(super) fn ended(&mut self) {
        self.task = None;
    }

    /// Stops a check in flight and waits until it has (a pack update looks the channel up itself).
    pub(super) async fn stop(&mut self) {
        if let Some(check) = self.task.take() {
            check.stop().await;
        }
    }

    /// Runs on with `pack` as the running server's pack spec: its checks replace the old ones, and with
    /// none, nothing stays reported available.
    pub(super) fn adopt(&mut self, pack: Option<&PackSpec>, shared: &Shared, options: &ReconcilerOptions) {
        self.schedule = schedule_of(pack);
        if self.schedule.is_none() {
            clear_update_report(shared, options);
        }
        self.ticker = ticker(self.schedule.as_ref());
        self.last_said = None;
    }

    /// Logs what a check found and what happens to it, once per finding.
    pub(super) fn say(&mut self, version: &str, from: Option<&str>, wait: Option<&str>) {
        let said = format!("{version}: {}", wait.unwrap_or("updating"));
        if self.last_said.as_deref() != Some(said.as_str()) {
            tracing::info!(from, to = %version, "the pack's hub channel names a new version; {}", wait.unwrap_or("updating"));
            self.last_said = Some(said);
        }
    }
}

/// Reports that the channel names `version`, which the running server does not hold: status and
/// `atlas_pack_update_available`.
pub(super) fn report_available(shared: &Shared, options: &ReconcilerOptions, version: &str) {
    let reported = shared.status.borrow().pack_update_available.clone();
    if reported.as_deref() == Some(version) {
        return;
    }
    if let Some(context) = &options.prepare.pack {
        // The new series first, then the old one goes: a scrape never finds none.
        context.metrics.update_available.with_label_values(&[version]).set(1.0);
        if let Some(old) = &reported {
            let _ = context.metrics.update_available.remove_label_values(&[old.as_str()]);
        }
    }
    shared.status.send_modify(|s| s.pack_update_available = Some(version.to_owned()));
    shared.emit(super::events::UPDATE_AVAILABLE, format!("the pack's hub channel names version {version}"), false);
}

/// Nothing is reported as an available pack update any more.
pub(super) fn clear_update_report(shared: &Shared, options: &ReconcilerOptions) {
    shared.status.send_modify(|s| {
        s.pack_update_available = None;
        s.pack_update_waiting = None;
    });
    if let Some(context) = &options.prepare.pack {
        context.metrics.update_available.reset();
    }
}

/// Why an update a check found must wait now, if it must: outside `window`, or with players online
/// and `requireNoPlayers`.
pub(super) fn update_waits(plan: &update::Schedule, shared: &Shared) -> Option<&'static str> {
    if !plan.window_allows(&jiff::Zoned::now()) {
        Some("waiting for spec.pack.update.window")
    } else if plan.require_no_players && shared.status.borrow().players_online > 0 {
        Some("waiting until no players are online (spec.pack.update.requireNoPlayers)")
    } else {
        None
    }
}

/// Asked once an update a check found is staged: it goes ahead only with the version it found, and
/// only while the policy still allows it (the download took time, and players are asked again).
pub(super) fn proceed_with<'a>(
    version: String,
    plan: Option<update::Schedule>,
    shared: &'a Shared,
    rcon: crate::rcon::Rcon,
) -> super::prepare::Proceed<'a> {
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
}

/// The update checks `pack` asks for (none if its policy cannot be read: the spec check refuses
/// such a spec before it runs).
fn schedule_of(pack: Option<&PackSpec>) -> Option<update::Schedule> {
    pack.and_then(|pack| update::Schedule::of(pack).ok().flatten())
}

/// Ticks every check interval, the first one interval from now.
fn ticker(schedule: Option<&update::Schedule>) -> tokio::time::Interval {
    let every = schedule.map_or(update::DEFAULT_INTERVAL, |s| s.interval);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// One look at what the pack's hub channel names, sent on its channel; stopped when dropped.
struct CheckTask(tokio::task::JoinHandle<()>);

impl CheckTask {
    fn spawn(pack: PackSpec, data_dir: &std::path::Path, found: mpsc::Sender<Checked>) -> Self {
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
