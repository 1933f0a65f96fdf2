//! The agent's status sink: the runner's status as `MinecraftServer` status, computed as data
//! ([`build`], pure) and written by server-side apply on `/status` with field manager
//! `atlas-agent`, only when it differs from the agent's part of the object as the watch last showed
//! it (timestamps ignored; what was last written, until the watch shows that write): someone
//! else's edit of an agent field is put back. Player
//! counts are debounced: a change of players alone waits until the count has held still for a
//! while and a while has passed since the last write, so a busy server costs a few writes a minute.
//! Writes that fail (the API server down) are retried with backoff; the runner never waits for them.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{AgentError, AgentMetrics, FIELD_MANAGER};
use crate::api::conditions::{self, reasons};
use crate::api::{LastExit, MinecraftServer, MinecraftServerStatus, Phase, Players, UpdateStatus};
use crate::runner::RunnerStatus;
use crate::troubleshooting::{REASON, with_pointer};

/// How long a change waits so that changes made together (a restart's phases) go in one write.
const COALESCE: Duration = Duration::from_millis(300);
/// A change of players alone is written once the count has not changed for this long...
const PLAYERS_SETTLE: Duration = Duration::from_secs(5);
/// ...and at least this long after the last write: at most six player writes a minute.
const PLAYERS_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// A count that never holds still is written anyway this long after it first changed.
const PLAYERS_MAX_DELAY: Duration = Duration::from_secs(30);
/// The longest wait between two attempts at a failed write.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long the final status (after the server stopped) is tried for before the agent exits.
const FINAL_WRITE: Duration = Duration::from_secs(10);
/// Write-backs (an agent field someone else changed, put back) allowed in [`WRITE_BACK_WINDOW`]
/// before they are spaced out: a writer that keeps changing an agent field (a second agent of a
/// force-deleted pod, a controller) must not turn into a write loop.
const WRITE_BACKS_FREE: usize = 3;
const WRITE_BACK_WINDOW: Duration = Duration::from_secs(60);
/// The spacing of write-backs past the free ones: doubling from the first to the last.
const WRITE_BACK_HOLD: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(300));

/// The agent's share of the status, from the runner's. `previous` are the conditions last written:
/// a condition whose status did not flip keeps its `lastTransitionTime`.
pub fn build(runner: &RunnerStatus, previous: &[Condition], now: &Time) -> MinecraftServerStatus {
    let phase = parse_phase(&runner.phase);
    let mut conditions = Vec::new();
    let mut add = |type_: &str, status: &str, reason: &str, message: String| {
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: one_line(&message),
            last_transition_time,
            observed_generation: runner.observed_generation,
        });
    };

    let running = phase == Some(Phase::Running);
    let (why, message) = if running {
        (reasons::RUNNING, "the server is ready for players".to_owned())
    } else {
        let detail = runner.message.as_deref().map_or_else(String::new, |m| format!(": {m}"));
        (reasons::NOT_RUNNING, format!("the server is {}{detail}", runner.phase))
    };
    add(conditions::READY, if running { "True" } else { "False" }, why, message);

    if runner.pack_wanted {
        match (&runner.pack_problem, &runner.pack_version) {
            (Some(problem), _) => add(conditions::PACK_APPLIED, "False", &problem.reason, problem.message.clone()),
            (None, Some(version)) => {
                add(conditions::PACK_APPLIED, "True", reasons::APPLIED, format!("pack {version} is applied"));
            }
            (None, None) => {
                add(conditions::PACK_APPLIED, "False", reasons::NOT_RUNNING, "the pack is not applied yet".to_owned());
            }
        }
    }

    if runner.next_backup.is_some() || runner.last_backup.is_some() || runner.backup_failure.is_some() {
        match (&runner.backup_failure, &runner.last_backup) {
            (Some(failure), _) => add(
                conditions::BACKUP_HEALTHY,
                "False",
                reasons::BACKUP_FAILED,
                with_pointer(format!("{} ({})", failure.message, failure.reason), "backup", &failure.reason),
            ),
            (None, Some(last)) => add(
                conditions::BACKUP_HEALTHY,
                "True",
                reasons::BACKUP_SUCCEEDED,
                format!("backup {} taken at {}", last.name, last.time),
            ),
            (None, None) => add(
                conditions::BACKUP_HEALTHY,
                "Unknown",
                reasons::NO_BACKUP_YET,
                "no backup has been taken since the agent started".to_owned(),
            ),
        }
    }

    if runner.pack_checked || runner.pack_update_available.is_some() {
        match &runner.pack_update_available {
            Some(version) => {
                let waiting = runner.pack_update_waiting.as_deref().map_or_else(String::new, |w| format!("; {w}"));
                add(
                    conditions::UPDATE_AVAILABLE,
                    "True",
                    reasons::NEW_VERSION,
                    format!("the pack's hub channel names {version}{waiting}"),
                );
            }
            None => add(
                conditions::UPDATE_AVAILABLE,
                "False",
                reasons::UP_TO_DATE,
                "the server runs the version the pack's hub channel names".to_owned(),
            ),
        }
    }

    // The first reason (in a fixed order) names the condition; the message has them all.
    match runner.degraded.iter().next() {
        Some((reason, _)) => {
            let message = runner.degraded.iter().map(|(r, m)| format!("{r}: {m}")).collect::<Vec<_>>().join("; ");
            add(conditions::DEGRADED, "True", reason, with_pointer(message, REASON, reason));
        }
        None => {
            add(conditions::DEGRADED, "False", reasons::HEALTHY, "nothing the server depends on is failing".to_owned())
        }
    }

    let update = (runner.pack_update_available.is_some() || runner.last_update.is_some())
        .then(|| UpdateStatus { available: runner.pack_update_available.clone(), last: runner.last_update.clone() });
    MinecraftServerStatus {
        phase,
        observed_generation: runner.observed_generation,
        server_version: runner.server_version.clone(),
        pack_version: runner.pack_version.clone(),
        players: (runner.server_version.is_some())
            .then_some(Players { online: runner.players_online, max: runner.players_max }),
        last_backup: runner.last_backup.clone(),
        next_backup: runner.next_backup.clone(),
        restarts: runner.restarts,
        last_exit: runner
            .last_exit_reason
            .clone()
            .map(|reason| LastExit { reason, time: runner.last_exit_time.clone().unwrap_or_default() }),
        update,
        conditions,
    }
}

fn parse_phase(name: &str) -> Option<Phase> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

/// Condition messages are one line, and short.
fn one_line(message: &str) -> String {
    let line = message.replace('\n', " ");
    match line.char_indices().nth(1024) {
        Some((end, _)) => format!("{}...", &line[..end]),
        None => line,
    }
}

/// The agent's own fields of a status read from the API server (the operator's conditions left out).
pub fn agent_part(status: &MinecraftServerStatus) -> MinecraftServerStatus {
    let mut mine = status.clone();
    mine.conditions.retain(|c| conditions::AGENT_TYPES.contains(&c.type_.as_str()));
    mine
}

/// How two statuses differ, timestamps ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// Not at all.
    None,
    /// Only in the players online.
    Players,
    /// In something else.
    Other,
}

/// How `new` differs from `old` (`None`: nothing written yet), `lastTransitionTime` ignored.
pub fn difference(old: Option<&MinecraftServerStatus>, new: &MinecraftServerStatus) -> Difference {
    let Some(old) = old else { return Difference::Other };
    let strip = |s: &MinecraftServerStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(jiff::Timestamp::UNIX_EPOCH);
        }
        s.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        s
    };
    let (mut old, new) = (strip(old), strip(new));
    if old == new {
        return Difference::None;
    }
    old.players = new.players;
    if old == new { Difference::Players } else { Difference::Other }
}

/// The players online a status says.
fn online(status: Option<&MinecraftServerStatus>) -> u32 {
    status.and_then(|s| s.players).map_or(0, |p| p.online)
}

/// An object's resourceVersion as a number. Kubernetes calls it opaque, but every API server on
/// etcd gives its revision, which only grows; `None` for anything else.
fn revision(object: &MinecraftServer) -> Option<u64> {
    object.metadata.resource_version.as_deref()?.parse().ok()
}

/// Writes the agent's status of `name` by server-side apply; the object's revision after it.
async fn write(
    api: &Api<MinecraftServer>,
    name: &str,
    status: &MinecraftServerStatus,
) -> Result<Option<u64>, AgentError> {
    let body = serde_json::json!({
        "apiVersion": "atlas.dev/v1alpha1",
        "kind": "MinecraftServer",
        "status": status,
    });
    // Forced: the agent owns these fields (docs/design/pod-contract.md); another manager that set
    // one (an admin's kubectl) loses it rather than blocking every write.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // kube's client has no read timeout by default: a write on a connection gone silent would stop
    // the sink for ever. One that times out is retried like any failed write.
    tokio::time::timeout(WRITE_TIMEOUT, api.patch_status(name, &params, &Patch::Apply(&body)))
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("the API server did not answer in time".into())))
        .map(|object| revision(&object))
        .map_err(|source| AgentError::WriteStatus { name: name.to_owned(), source })
}

/// How long one status write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// Writes the status of `name` from `runner` until `finished`, then once more (the final status,
/// tried for a few seconds). `object` is the resource as the agent's watch shows it: a status equal
/// to its agent part is not written again, and one someone else changed is written back.
pub fn spawn_sink(
    api: Api<MinecraftServer>,
    name: String,
    mut runner: watch::Receiver<RunnerStatus>,
    mut object: watch::Receiver<std::sync::Arc<MinecraftServer>>,
    metrics: AgentMetrics,
    finished: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (written, seen) = {
            let first = object.borrow_and_update();
            (first.status.as_ref().map(agent_part), revision(&first))
        };
        let mut sink = Sink::new(written, seen, metrics);
        loop {
            sink.observe(&object.borrow_and_update());
            let now = Time(jiff::Timestamp::now());
            let wanted = build(&runner.borrow_and_update(), sink.previous_conditions(), &now);
            let due = sink.due(&wanted);
            let wake = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = finished.cancelled() => break,
                changed = runner.changed() => if changed.is_err() { break },
                // The source ends only when the agent does: its last object stays the base.
                changed = object.changed(), if !object.is_closed() => { let _ = changed; }
                () = wake => {
                    // Written as it is now: whatever changed meanwhile goes in the same write.
                    sink.observe(&object.borrow_and_update());
                    let now = Time(jiff::Timestamp::now());
                    let wanted = build(&runner.borrow_and_update(), sink.previous_conditions(), &now);
                    sink.write(&api, &name, wanted).await;
                }
            }
        }
        // The final status: the runner has stopped the server.
        let deadline = Instant::now() + FINAL_WRITE;
        loop {
            let now = Time(jiff::Timestamp::now());
            let wanted = build(&runner.borrow(), sink.previous_conditions(), &now);
            if difference(sink.base(), &wanted) == Difference::None {
                return;
            }
            sink.write(&api, &name, wanted).await;
            if !sink.failed || Instant::now() + sink.retry > deadline {
                return;
            }
            tokio::time::sleep(sink.retry).await;
        }
    })
}

struct Sink {
    /// The status last written (the agent's part).
    written: Option<MinecraftServerStatus>,
    /// The object's revision right after the last write (or when the agent started).
    confirmed: Option<u64>,
    /// The agent's part of the object as the watch showed it after `confirmed`: changed by someone
    /// else since the agent's last write. `None` while the watch has shown nothing newer.
    observed: Option<Option<MinecraftServerStatus>>,
    last_write: Option<Instant>,
    /// The players online last seen, and since when.
    players: Option<(Option<Players>, Instant)>,
    /// Since when a change of players alone has waited to be written.
    players_pending: Option<Instant>,
    /// Since when any other change has waited to be written.
    other_pending: Option<Instant>,
    /// The wait before the next attempt after a failure.
    retry: Duration,
    failed: bool,
    /// When the recent write-backs were made (within [`WRITE_BACK_WINDOW`]).
    write_backs: std::collections::VecDeque<Instant>,
    /// The wait after the last write-back before the next one (zero while they are free).
    write_back_hold: Duration,
    metrics: AgentMetrics,
}

impl Sink {
    /// A sink that last wrote `written` (the agent's part), with the object at revision `confirmed`.
    fn new(written: Option<MinecraftServerStatus>, confirmed: Option<u64>, metrics: AgentMetrics) -> Self {
        Self {
            written,
            confirmed,
            observed: None,
            last_write: None,
            players: None,
            players_pending: None,
            other_pending: None,
            retry: Duration::ZERO,
            failed: false,
            write_backs: std::collections::VecDeque::new(),
            write_back_hold: Duration::ZERO,
            metrics,
        }
    }

    fn previous_conditions(&self) -> &[Condition] {
        self.written.as_ref().map_or(&[], |s| s.conditions.as_slice())
    }

    /// Takes in the object as the watch shows it. Only a revision newer than the agent's last
    /// write says what the object holds now: an older one (the watch lagging behind the write)
    /// would make the agent write what it just wrote.
    fn observe(&mut self, object: &MinecraftServer) {
        if let (Some(seen), Some(confirmed)) = (revision(object), self.confirmed)
            && seen > confirmed
        {
            self.observed = Some(object.status.as_ref().map(agent_part));
        }
    }

    /// What `wanted` is compared with: the agent's part of the object as last seen after the last
    /// write, else what was last written.
    fn base(&self) -> Option<&MinecraftServerStatus> {
        match &self.observed {
            Some(observed) => observed.as_ref(),
            None => self.written.as_ref(),
        }
    }

    /// Whether writing `wanted` would only put back what someone else changed: the agent itself
    /// wants what it last wrote.
    fn is_write_back(&self, wanted: &MinecraftServerStatus) -> bool {
        self.observed.is_some() && difference(self.written.as_ref(), wanted) == Difference::None
    }

    /// When `wanted` should be written, or `None` when it need not be.
    fn due(&mut self, wanted: &MinecraftServerStatus) -> Option<Instant> {
        let due = self.due_by_change(wanted)?;
        match self.write_backs.back() {
            Some(last) if self.is_write_back(wanted) => Some(due.max(*last + self.write_back_hold)),
            _ => Some(due),
        }
    }

    /// When the difference between `wanted` and the object should be written, write-backs aside.
    fn due_by_change(&mut self, wanted: &MinecraftServerStatus) -> Option<Instant> {
        let now = Instant::now();
        match self.players {
            Some((players, _)) if players == wanted.players => {}
            _ => self.players = Some((wanted.players, now)),
        }
        let earliest = match self.last_write {
            Some(at) if self.failed => at + self.retry,
            _ => now,
        };
        match difference(self.base(), wanted) {
            Difference::None => {
                self.players_pending = None;
                self.other_pending = None;
                None
            }
            // From when the difference first appeared: a status that keeps being touched (the
            // player poll) must not put the write off for ever.
            Difference::Other => Some(earliest.max(*self.other_pending.get_or_insert(now) + COALESCE)),
            // Someone joined an empty server: the operator may be about to replace the pod because
            // nobody is online, so this one is not put off.
            Difference::Players if online(self.base()) == 0 && online(Some(wanted)) > 0 => {
                Some(earliest.max(*self.players_pending.get_or_insert(now) + COALESCE))
            }
            Difference::Players => {
                let since = self.players.map_or(now, |(_, since)| since);
                let pending = *self.players_pending.get_or_insert(now);
                let settled = (since + PLAYERS_SETTLE).min(pending + PLAYERS_MAX_DELAY);
                let after_last = self.last_write.map_or(now, |at| at + PLAYERS_MIN_INTERVAL);
                Some(earliest.max(settled).max(after_last))
            }
        }
    }

    async fn write(&mut self, api: &Api<MinecraftServer>, name: &str, wanted: MinecraftServerStatus) {
        if difference(self.base(), &wanted) == Difference::None {
            return;
        }
        self.last_write = Some(Instant::now());
        let write_back = self.is_write_back(&wanted);
        match write(api, name, &wanted).await {
            Ok(revision) => self.written_ok(wanted, revision, write_back),
            Err(e) => {
                self.metrics.status_write_failures.with_label_values(&[e.category()]).inc();
                if !self.failed {
                    tracing::warn!(category = e.category(), "{e}; trying again with backoff, the server runs on");
                }
                self.failed = true;
                self.retry = (self.retry * 2).clamp(Duration::from_millis(500), MAX_RETRY);
            }
        }
    }

    /// After a successful write of `wanted` (a `write_back` or not), the object's revision after it.
    fn written_ok(&mut self, wanted: MinecraftServerStatus, revision: Option<u64>, write_back: bool) {
        // Until the watch shows a newer revision, what was written is what the object holds. A
        // write that changed nothing (a field someone else owns, which the agent's apply cannot
        // take back) keeps the revision: not tried again until the object changes.
        self.confirmed = revision;
        self.observed = None;
        if self.failed {
            tracing::info!("status written again after failed attempts");
        }
        self.metrics.status_writes.inc();
        self.written = Some(wanted);
        self.players_pending = None;
        self.other_pending = None;
        self.failed = false;
        self.retry = Duration::ZERO;
        if write_back {
            let now = Instant::now();
            // Free again only after a quiet spell: no write-back for the hold and a window more.
            let quiet = self
                .write_backs
                .back()
                .is_none_or(|last| now.duration_since(*last) > self.write_back_hold + WRITE_BACK_WINDOW);
            if quiet {
                self.write_backs.clear();
                self.write_back_hold = Duration::ZERO;
            }
            while self.write_backs.front().is_some_and(|at| now.duration_since(*at) > WRITE_BACK_WINDOW) {
                self.write_backs.pop_front();
            }
            self.write_backs.push_back(now);
            if !self.write_back_hold.is_zero() || self.write_backs.len() >= WRITE_BACKS_FREE {
                if self.write_back_hold.is_zero() {
                    tracing::warn!(
                        "someone keeps changing fields of this server's status that its agent writes (see the status's managedFields for who); the agent puts them back at most every {}s now, then less often",
                        WRITE_BACK_HOLD.0.as_secs()
                    );
                }
                self.write_back_hold = (self.write_back_hold * 2).clamp(WRITE_BACK_HOLD.0, WRITE_BACK_HOLD.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Result<Time, jiff::Error> {
        Ok(Time(jiff::Timestamp::from_second(seconds)?))
    }

    fn running() -> RunnerStatus {
        RunnerStatus {
            phase: "Running".into(),
            server_type: Some("vanilla".into()),
            server_version: Some("1.21.4".into()),
            players_max: 20,
            ..RunnerStatus::default()
        }
    }

    fn condition<'a>(status: &'a MinecraftServerStatus, type_: &str) -> Option<&'a Condition> {
        status.conditions.iter().find(|c| c.type_ == type_)
    }

    #[test]
    fn a_transition_time_moves_only_when_the_condition_flips() -> Result<(), Box<dyn std::error::Error>> {
        let first = build(&running(), &[], &at(100)?);
        assert_eq!(condition(&first, conditions::READY).map(|c| c.status.as_str()), Some("True"));
        // Players change: Ready does not flip, its time stays.
        let mut busy = running();
        busy.players_online = 3;
        let second = build(&busy, &first.conditions, &at(200)?);
        assert_eq!(condition(&second, conditions::READY).map(|c| c.last_transition_time.clone()), Some(at(100)?));
        assert_eq!(difference(Some(&first), &second), Difference::Players);
        // The server stops: Ready flips, with the new time.
        let mut stopped = busy.clone();
        stopped.phase = "Stopping".into();
        let third = build(&stopped, &second.conditions, &at(300)?);
        let ready = condition(&third, conditions::READY).ok_or("no Ready")?;
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reasons::NOT_RUNNING));
        assert_eq!(ready.last_transition_time, at(300)?);
        assert_eq!(difference(Some(&second), &third), Difference::Other);
        Ok(())
    }

    #[test]
    fn the_same_status_at_another_time_is_no_difference() -> Result<(), Box<dyn std::error::Error>> {
        let one = build(&running(), &[], &at(100)?);
        let two = build(&running(), &[], &at(900)?);
        assert_ne!(one, two, "the transition times differ");
        assert_eq!(difference(Some(&one), &two), Difference::None);
        assert_eq!(difference(None, &two), Difference::Other);
        Ok(())
    }

    #[test]
    fn degraded_names_the_first_reason_and_tells_them_all() -> Result<(), Box<dyn std::error::Error>> {
        let mut status = running();
        let healthy = build(&status, &[], &at(1)?);
        assert_eq!(condition(&healthy, conditions::DEGRADED).map(|c| c.status.as_str()), Some("False"));
        status.degraded.insert(reasons::PACK_SOURCE_UNREACHABLE.into(), "the hub is down".into());
        status.degraded.insert(reasons::SAVING_LEFT_OFF.into(), "save-on failed".into());
        let degraded = build(&status, &[], &at(1)?);
        let c = condition(&degraded, conditions::DEGRADED).ok_or("no Degraded")?;
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", reasons::PACK_SOURCE_UNREACHABLE));
        assert!(c.message.contains("the hub is down") && c.message.contains("save-on failed"), "{}", c.message);
        assert!(c.message.ends_with("; see docs/troubleshooting.md#reason-PackSourceUnreachable"), "{}", c.message);
        Ok(())
    }

    #[test]
    fn only_what_the_spec_uses_gets_a_condition() -> Result<(), Box<dyn std::error::Error>> {
        let plain = build(&running(), &[], &at(1)?);
        let types: Vec<&str> = plain.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [conditions::READY, conditions::DEGRADED]);
        let mut packed = running();
        packed.pack_wanted = true;
        packed.pack_version = Some("1.2.0".into());
        packed.pack_checked = true;
        packed.pack_update_available = Some("1.3.0".into());
        packed.pack_update_waiting = Some("waiting for spec.pack.update.window".into());
        let status = build(&packed, &[], &at(1)?);
        let update = condition(&status, conditions::UPDATE_AVAILABLE).ok_or("no UpdateAvailable")?;
        assert_eq!(update.status, "True");
        assert!(update.message.contains("1.3.0") && update.message.contains("window"), "{}", update.message);
        assert_eq!(status.update.as_ref().and_then(|u| u.available.as_deref()), Some("1.3.0"));
        assert_eq!(condition(&status, conditions::PACK_APPLIED).map(|c| c.status.as_str()), Some("True"));
        Ok(())
    }

    fn sink(written: Option<MinecraftServerStatus>) -> Result<Sink, prometheus::Error> {
        Ok(Sink::new(written, Some(10), AgentMetrics::register(&prometheus::Registry::new())?))
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_touched_again_and_again_is_still_written_soon() -> Result<(), Box<dyn std::error::Error>> {
        let written = build(&RunnerStatus { phase: "Starting".into(), ..running() }, &[], &at(1)?);
        let mut sink = sink(Some(written))?;
        let wanted = build(&running(), &[], &at(2)?);
        let first = sink.due(&wanted).ok_or("no write due")?;
        // The player poll touches the status every 200 ms: the write is not put off by it.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            let due = sink.due(&wanted).ok_or("no write due")?;
            assert!(due <= first.max(Instant::now()), "put off by {:?}", due - first);
        }
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn players_alone_are_written_at_most_every_ten_seconds() -> Result<(), Box<dyn std::error::Error>> {
        let mut one = running();
        one.players_online = 1;
        let written = build(&one, &[], &at(1)?);
        let mut sink = sink(Some(written))?;
        sink.last_write = Some(Instant::now());
        let mut busy = running();
        busy.players_online = 2;
        let due = sink.due(&build(&busy, &[], &at(2)?)).ok_or("no write due")?;
        assert!(due >= Instant::now() + PLAYERS_MIN_INTERVAL, "due in {:?}", due - Instant::now());
        // The count keeps changing: the write still comes within the longest delay.
        for n in 2..40 {
            tokio::time::advance(Duration::from_secs(1)).await;
            busy.players_online = 1 + n % 3;
            if let Some(due) = sink.due(&build(&busy, &[], &at(2)?)) {
                assert!(due <= Instant::now() + PLAYERS_MAX_DELAY, "put off to {:?}", due - Instant::now());
            }
        }
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_player_joining_an_empty_server_is_written_at_once() -> Result<(), Box<dyn std::error::Error>> {
        let written = build(&running(), &[], &at(1)?);
        let mut sink = sink(Some(written))?;
        sink.last_write = Some(Instant::now());
        let mut joined = running();
        joined.players_online = 1;
        let due = sink.due(&build(&joined, &[], &at(2)?)).ok_or("no write due")?;
        assert!(due <= Instant::now() + COALESCE, "put off by {:?}", due - Instant::now());
        Ok(())
    }

    #[test]
    fn the_operators_conditions_are_not_the_agents() -> Result<(), Box<dyn std::error::Error>> {
        let mut read = build(&running(), &[], &at(1)?);
        read.conditions.push(Condition {
            type_: "WorkloadReady".into(),
            status: "True".into(),
            reason: "Ready".into(),
            message: String::new(),
            last_transition_time: at(1)?,
            observed_generation: None,
        });
        let mine = agent_part(&read);
        assert!(mine.conditions.iter().all(|c| c.type_ != "WorkloadReady"));
        assert_eq!(difference(Some(&mine), &build(&running(), &[], &at(5)?)), Difference::None);
        Ok(())
    }

    fn object(revision: &str, status: &MinecraftServerStatus) -> Result<MinecraftServer, serde_json::Error> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer",
            "metadata": {"name": "s", "resourceVersion": revision},
            "spec": {"eula": true, "server": {"type": "vanilla"}},
            "status": status,
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_field_someone_else_changed_is_written_back() -> Result<(), Box<dyn std::error::Error>> {
        let wanted = build(&running(), &[], &at(1)?);
        let mut sink = sink(Some(wanted.clone()))?;
        assert_eq!(sink.due(&wanted), None);
        // `kubectl edit --subresource=status` sets the phase to Stopped: the watch shows a revision
        // newer than the agent's last write (10).
        let mut edited = wanted.clone();
        edited.phase = Some(Phase::Stopped);
        sink.observe(&object("11", &edited)?);
        let due = sink.due(&wanted).ok_or("the edit is not written back")?;
        assert!(due <= Instant::now() + COALESCE, "put off by {:?}", due - Instant::now());
        // The operator's own conditions alone are no difference.
        let mut theirs = wanted.clone();
        theirs.conditions.push(Condition {
            type_: "WorkloadReady".into(),
            status: "True".into(),
            reason: "PodReady".into(),
            message: String::new(),
            last_transition_time: at(1)?,
            observed_generation: None,
        });
        sink.observe(&object("12", &theirs)?);
        assert_eq!(sink.due(&wanted), None);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_behind_the_last_write_writes_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let wanted = build(&running(), &[], &at(1)?);
        let mut sink = sink(Some(wanted.clone()))?;
        // The object as it was before the agent's write at revision 10.
        let before = build(&RunnerStatus { phase: "Starting".into(), ..running() }, &[], &at(1)?);
        sink.observe(&object("9", &before)?);
        sink.observe(&object("10", &before)?);
        assert_eq!(sink.due(&wanted), None);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_keeps_changing_an_agent_field_gets_write_backs_spaced_out()
    -> Result<(), Box<dyn std::error::Error>> {
        let wanted = build(&running(), &[], &at(1)?);
        let mut sink = sink(Some(wanted.clone()))?;
        let mut edited = wanted.clone();
        edited.phase = Some(Phase::Stopped);
        let mut waits = Vec::new();
        for revision in 0..8u64 {
            // The other writer changes the phase again right after each write-back.
            sink.observe(&object(&(11 + 2 * revision).to_string(), &edited)?);
            let due = sink.due(&wanted).ok_or("the edit is not written back")?;
            waits.push(due.saturating_duration_since(Instant::now()));
            tokio::time::sleep_until(due).await;
            assert!(sink.is_write_back(&wanted));
            sink.written_ok(wanted.clone(), Some(12 + 2 * revision), true);
        }
        // The first few go back at once (within the coalescing), then spaced out, doubling.
        assert!(waits[..WRITE_BACKS_FREE].iter().all(|w| *w <= COALESCE), "{waits:?}");
        assert_eq!(waits[WRITE_BACKS_FREE], WRITE_BACK_HOLD.0, "{waits:?}");
        assert_eq!(waits[WRITE_BACKS_FREE + 1], WRITE_BACK_HOLD.0 * 2, "{waits:?}");
        assert!(waits.windows(2).skip(WRITE_BACKS_FREE).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(waits[7], WRITE_BACK_HOLD.0 * 16, "{waits:?}");
        // A quiet spell (no write-back for the hold and a minute): the next ones are free again.
        tokio::time::sleep(WRITE_BACK_HOLD.1 + WRITE_BACK_WINDOW + Duration::from_secs(1)).await;
        sink.observe(&object("99", &edited)?);
        sink.written_ok(wanted.clone(), Some(100), true);
        sink.observe(&object("101", &edited)?);
        let due = sink.due(&wanted).ok_or("the edit is not written back")?;
        assert!(due.saturating_duration_since(Instant::now()) <= COALESCE);
        // The agent's own changes are never held by it.
        let own = build(&RunnerStatus { phase: "Stopping".into(), ..running() }, &[], &at(1)?);
        sink.write_back_hold = WRITE_BACK_HOLD.1;
        let due = sink.due(&own).ok_or("the agent's own change is not written")?;
        assert!(due.saturating_duration_since(Instant::now()) <= COALESCE);
        Ok(())
    }
}
