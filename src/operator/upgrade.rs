//! When the server's pod is replaced. The StatefulSet updates with `OnDelete`, so a new pod template
//! (a new image after `helm upgrade`, new resources, another Secret) reaches the pod only when the
//! operator deletes it, which it does only under `spec.upgrade`: inside the window and with nobody
//! online. Pure: the caller passes the objects, the player count and the time.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;

use crate::api::{MinecraftServer, UpgradePolicy};
use crate::runner::update::Window;

/// The label the StatefulSet controller puts on each pod: the revision of the template it runs.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// What to do about the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// No pod (paused, or not created yet): nothing to replace.
    NoPod,
    /// The StatefulSet has not yet worked out the revision of its latest template; look again soon.
    Settling,
    /// The pod runs the latest template.
    UpToDate,
    /// The pod is being deleted already.
    Replacing,
    /// The pod is out of date and the policy allows replacing it now.
    Replace {
        /// The revision the pod runs.
        from: String,
        /// The revision it will run.
        to: String,
    },
    /// The pod is out of date and the policy says wait.
    Wait {
        /// A short reason (the condition's reason): `PlayersOnline` or `OutsideWindow`.
        reason: &'static str,
        /// What it waits for, for people.
        message: String,
    },
}

/// A policy whose window does not parse (the CRD's pattern should have refused it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.upgrade.window {window:?}: {reason}; write it like \"Sat,Sun 02:00-06:00\" or \"03:00-05:00\"")]
pub struct BadWindow {
    /// The window as written.
    pub window: String,
    /// Why it does not parse.
    pub reason: String,
}

/// How long a pod whose container runs but whose readiness probe fails still counts as serving
/// what the agent last said: a probe that times out a few times on a busy node says nothing about
/// the players on the server, a pod not ready for this long does not serve anyone.
pub const NOT_READY_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

/// Whether anyone can be playing on the server's pod, and how many are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// The pod is not serving: not running (pending, crash-looping, its container not started),
    /// not ready for longer than [`NOT_READY_GRACE`], restarted since it was ready, or the agent's
    /// `Ready` condition is not True. Nobody can be playing on it.
    Down,
    /// Ready, with the agent's player count for the current generation.
    Players(u32),
    /// Ready, but the agent's status does not speak for the current generation yet: its count
    /// may be stale.
    Unknown,
    /// Running, but not ready since a moment ago: for `left` more it counts as the agent last said
    /// (`online`, `None` when its count does not speak for the current generation), then as Down.
    Faltering {
        /// The agent's player count, as [`Serving::Players`] (or `None`, as [`Serving::Unknown`]).
        online: Option<u32>,
        /// What is left of the grace.
        left: std::time::Duration,
    },
}

/// What `server`'s status and its StatefulSet say about the pod. A status the agent wrote before
/// it died stays behind (3 players for ever), so the StatefulSet's readiness, which the kubelet's
/// probe keeps current, decides first.
pub fn serving(server: &MinecraftServer, sts: Option<&StatefulSet>) -> Serving {
    let pod_ready = sts.and_then(|s| s.status.as_ref()).and_then(|s| s.ready_replicas).unwrap_or(0) > 0;
    if pod_ready { agent_serving(server) } else { Serving::Down }
}

/// What the agent's own status says: its player count while its `Ready` is True for the current
/// generation, Unknown while it is True for an older one, else Down.
pub fn agent_serving(server: &MinecraftServer) -> Serving {
    let status = server.status.as_ref();
    let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == crate::api::conditions::READY));
    match ready {
        Some(ready) if ready.status == "True" => {
            let current =
                ready.observed_generation.is_some() && ready.observed_generation == server.metadata.generation;
            if current {
                Serving::Players(status.and_then(|s| s.players).map_or(0, |p| p.online))
            } else {
                Serving::Unknown
            }
        }
        _ => Serving::Down,
    }
}

/// What a pod the StatefulSet does not count ready says, read from the pod itself (`now` is the
/// operator's clock). A pod whose containers all run (started) and whose `Ready` condition went
/// False less than [`NOT_READY_GRACE`] ago, with no container started since, is Faltering: its
/// readiness probe failed, but the agent that wrote the status is the one still running, so its
/// players are probably still on it. Anything else is Down at once: a pod not running, a
/// container waiting (CrashLoopBackOff) or restarted since the pod was ready (its agent has not
/// spoken since: the status is an old one), or not ready for longer than the grace.
pub fn serving_not_ready(server: &MinecraftServer, pod: &Pod, now: jiff::Timestamp) -> Serving {
    let online = match agent_serving(server) {
        Serving::Players(online) => Some(online),
        Serving::Unknown => None,
        Serving::Down | Serving::Faltering { .. } => return Serving::Down,
    };
    let Some(status) = pod.status.as_ref() else { return Serving::Down };
    if status.phase.as_deref() != Some("Running") {
        return Serving::Down;
    }
    let containers = status.container_statuses.as_deref().unwrap_or_default();
    let started: Option<Vec<jiff::Timestamp>> = containers
        .iter()
        .map(|c| {
            let running = c.state.as_ref()?.running.as_ref()?;
            (c.started != Some(false)).then_some(())?;
            running.started_at.as_ref().map(|t| t.0)
        })
        .collect();
    let Some(started) = started.filter(|s| !s.is_empty()) else { return Serving::Down };
    let Some(ready) = status.conditions.as_deref().unwrap_or_default().iter().find(|c| c.type_ == "Ready") else {
        return Serving::Down;
    };
    if ready.status == "True" {
        // The StatefulSet's count lags the pod's: the pod serves.
        return online.map_or(Serving::Unknown, Serving::Players);
    }
    let Some(since) = ready.last_transition_time.as_ref().map(|t| t.0) else { return Serving::Down };
    if started.iter().any(|s| *s >= since) {
        return Serving::Down;
    }
    let elapsed = now.duration_since(since);
    let grace = jiff::SignedDuration::try_from(NOT_READY_GRACE).unwrap_or(jiff::SignedDuration::ZERO);
    match grace.checked_sub(elapsed).and_then(|left| std::time::Duration::try_from(left).ok()) {
        // A transition time ahead of the operator's clock (skew) counts as now.
        Some(left) if !left.is_zero() => Serving::Faltering { online, left: left.min(NOT_READY_GRACE) },
        _ => Serving::Down,
    }
}

/// Decides about the pod of `sts` given who is online and the time (the operator's local time).
pub fn decide(
    sts: &StatefulSet,
    pod: Option<&PartialObjectMeta<Pod>>,
    serving: Serving,
    policy: &UpgradePolicy,
    now: &jiff::Zoned,
) -> Result<Rollout, BadWindow> {
    let window = match &policy.window {
        Some(text) => Some(Window::parse(text).map_err(|reason| BadWindow { window: text.clone(), reason })?),
        None => None,
    };
    let Some(pod) = pod else { return Ok(Rollout::NoPod) };
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(Rollout::Replacing);
    }
    let status = sts.status.as_ref();
    let observed = status.and_then(|s| s.observed_generation);
    let update_revision = status.and_then(|s| s.update_revision.clone());
    let (Some(to), true) = (update_revision, observed.is_some() && observed == sts.metadata.generation) else {
        return Ok(Rollout::Settling);
    };
    let from = pod.metadata.labels.as_ref().and_then(|l| l.get(REVISION_LABEL)).cloned().unwrap_or_default();
    if from == to {
        return Ok(Rollout::UpToDate);
    }
    // Nobody can be playing on a pod that does not serve, and the new template may be its fix (a
    // bad image that `helm upgrade` replaces): neither the window nor a stale count holds it.
    let players_online = match serving {
        Serving::Down => return Ok(Rollout::Replace { from, to }),
        Serving::Players(online) => Some(online),
        Serving::Unknown => None,
        Serving::Faltering { online, .. } => online,
    };
    if let Some(window) = &window
        && !window.contains(now.weekday(), minute_of_day(now))
    {
        let text = policy.window.as_deref().unwrap_or_default();
        return Ok(Rollout::Wait {
            reason: crate::api::conditions::reasons::OUTSIDE_WINDOW,
            message: format!("a new pod template waits for spec.upgrade.window ({text}, operator time)"),
        });
    }
    let Some(players_online) = players_online.or((!policy.require_no_players).then_some(0)) else {
        return Ok(Rollout::Wait {
            reason: crate::api::conditions::reasons::PLAYERS_UNKNOWN,
            message: "a new pod template waits for the agent to report players for the current generation".to_owned(),
        });
    };
    if policy.require_no_players && players_online > 0 {
        let who = if players_online == 1 { "1 player is".to_owned() } else { format!("{players_online} players are") };
        return Ok(Rollout::Wait {
            reason: crate::api::conditions::reasons::PLAYERS_ONLINE,
            message: format!("a new pod template waits until nobody is online ({who} online)"),
        });
    }
    Ok(Rollout::Replace { from, to })
}

fn minute_of_day(now: &jiff::Zoned) -> u16 {
    // jiff keeps hours in 0..=23 and minutes in 0..=59.
    u16::try_from(i32::from(now.hour()) * 60 + i32::from(now.minute())).unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sts(generation: i64, observed: i64, update_revision: &str) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "s", "generation": generation},
            "spec": {"selector": {}, "template": {}},
            "status": {"replicas": 1, "observedGeneration": observed, "updateRevision": update_revision},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn pod(revision: &str) -> PartialObjectMeta<Pod> {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "s-0", "labels": {REVISION_LABEL: revision}},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(text: &str) -> jiff::Zoned {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    // 2026-12-05 is a Saturday.
    const SAT_3AM: &str = "2026-12-05T03:00:00+00:00[UTC]";
    const SAT_NOON: &str = "2026-12-05T12:00:00+00:00[UTC]";

    #[test]
    fn an_up_to_date_pod_is_left_alone() {
        let policy = UpgradePolicy::default();
        assert_eq!(
            decide(&sts(2, 2, "r2"), Some(&pod("r2")), Serving::Players(5), &policy, &at(SAT_NOON)),
            Ok(Rollout::UpToDate)
        );
        assert_eq!(decide(&sts(2, 2, "r2"), None, Serving::Players(0), &policy, &at(SAT_NOON)), Ok(Rollout::NoPod));
    }

    #[test]
    fn a_template_the_statefulset_has_not_observed_yet_is_not_judged() {
        let policy = UpgradePolicy::default();
        assert_eq!(
            decide(&sts(3, 2, "r2"), Some(&pod("r1")), Serving::Players(0), &policy, &at(SAT_NOON)),
            Ok(Rollout::Settling)
        );
    }

    #[test]
    fn players_online_hold_the_pod_by_default() {
        let policy = UpgradePolicy::default();
        let wait = decide(&sts(2, 2, "r2"), Some(&pod("r1")), Serving::Players(3), &policy, &at(SAT_NOON));
        assert!(
            matches!(&wait, Ok(Rollout::Wait { reason: "PlayersOnline", message }) if message.contains("3 players")),
            "{wait:?}"
        );
        let go = decide(&sts(2, 2, "r2"), Some(&pod("r1")), Serving::Players(0), &policy, &at(SAT_NOON));
        assert_eq!(go, Ok(Rollout::Replace { from: "r1".to_owned(), to: "r2".to_owned() }));
        let anyway = UpgradePolicy { require_no_players: false, ..policy };
        assert!(matches!(
            decide(&sts(2, 2, "r2"), Some(&pod("r1")), Serving::Players(3), &anyway, &at(SAT_NOON)),
            Ok(Rollout::Replace { .. })
        ));
    }

    #[test]
    fn the_window_holds_the_pod_outside_it() {
        let policy = UpgradePolicy { window: Some("Sat 02:00-06:00".to_owned()), require_no_players: true };
        let outside = decide(&sts(2, 2, "r2"), Some(&pod("r1")), Serving::Players(0), &policy, &at(SAT_NOON));
        assert!(matches!(outside, Ok(Rollout::Wait { reason: "OutsideWindow", .. })), "{outside:?}");
        let inside = decide(&sts(2, 2, "r2"), Some(&pod("r1")), Serving::Players(0), &policy, &at(SAT_3AM));
        assert!(matches!(inside, Ok(Rollout::Replace { .. })), "{inside:?}");
        // Inside the window with someone online: still waits.
        let busy = decide(&sts(2, 2, "r2"), Some(&pod("r1")), Serving::Players(1), &policy, &at(SAT_3AM));
        assert!(matches!(busy, Ok(Rollout::Wait { reason: "PlayersOnline", .. })), "{busy:?}");
    }

    #[test]
    fn a_pod_being_deleted_is_not_deleted_again() {
        let mut p = pod("r1");
        p.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH));
        let policy = UpgradePolicy::default();
        assert_eq!(
            decide(&sts(2, 2, "r2"), Some(&p), Serving::Players(0), &policy, &at(SAT_NOON)),
            Ok(Rollout::Replacing)
        );
    }

    #[test]
    fn a_bad_window_says_how_to_write_one() {
        let policy = UpgradePolicy { window: Some("Caturday 02:00-03:00".to_owned()), require_no_players: true };
        let err = decide(&sts(1, 1, "r"), None, Serving::Players(0), &policy, &at(SAT_NOON))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("Caturday") && err.contains("Sat,Sun 02:00-06:00"), "{err}");
    }

    #[test]
    fn a_pod_that_does_not_serve_is_replaced_at_once_whatever_the_window_or_the_last_count() {
        let policy = UpgradePolicy { window: Some("Sat 02:00-06:00".to_owned()), require_no_players: true };
        let down = decide(&sts(2, 2, "r2"), Some(&pod("r1")), Serving::Down, &policy, &at(SAT_NOON));
        assert_eq!(down, Ok(Rollout::Replace { from: "r1".to_owned(), to: "r2".to_owned() }));
        // A count that does not speak for the current generation is not trusted to be zero.
        let policy = UpgradePolicy::default();
        let unknown = decide(&sts(2, 2, "r2"), Some(&pod("r1")), Serving::Unknown, &policy, &at(SAT_NOON));
        assert!(
            matches!(unknown, Ok(Rollout::Wait { reason: crate::api::conditions::reasons::PLAYERS_UNKNOWN, .. })),
            "{unknown:?}"
        );
    }

    fn server(ready: Option<(&str, i64)>, generation: i64, online: u32) -> MinecraftServer {
        let conditions: Vec<serde_json::Value> = ready
            .map(|(status, observed)| {
                json!({"type": "Ready", "status": status, "reason": "Running", "message": "",
                "lastTransitionTime": "2026-12-05T12:00:00Z", "observedGeneration": observed})
            })
            .into_iter()
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer",
            "metadata": {"name": "s", "generation": generation},
            "spec": {"eula": true, "server": {"type": "vanilla"}},
            "status": {"players": {"online": online, "max": 20}, "conditions": conditions},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ready_sts(ready: i32) -> StatefulSet {
        let mut s = sts(2, 2, "r2");
        if let Some(status) = s.status.as_mut() {
            status.ready_replicas = Some(ready);
        }
        s
    }

    #[test]
    fn players_count_only_from_a_ready_pod_and_a_current_ready_condition() {
        let live = server(Some(("True", 3)), 3, 2);
        assert_eq!(serving(&live, Some(&ready_sts(1))), Serving::Players(2));
        // The agent died with 2 players in its last status: the StatefulSet says the pod is not Ready.
        assert_eq!(serving(&live, Some(&ready_sts(0))), Serving::Down);
        assert_eq!(serving(&server(Some(("False", 3)), 3, 2), Some(&ready_sts(1))), Serving::Down);
        assert_eq!(serving(&server(None, 3, 2), Some(&ready_sts(1))), Serving::Down);
        // Ready, but written for an older generation.
        assert_eq!(serving(&server(Some(("True", 2)), 3, 0), Some(&ready_sts(1))), Serving::Unknown);
    }

    /// A pod as the kubelet reports it: `phase`, its one container (`running_since`, or waiting in
    /// CrashLoopBackOff when `None`), and its Ready condition (`ready`, since `ready_since`).
    fn kubelet_pod(phase: &str, running_since: Option<&str>, ready: &str, ready_since: &str) -> Pod {
        let state = match running_since {
            Some(since) => json!({"running": {"startedAt": since}}),
            None => json!({"waiting": {"reason": "CrashLoopBackOff"}}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": "s-0"},
            "status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": ready_since}],
                "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": ready == "True",
                    "restartCount": 0, "started": running_since.is_some(), "state": state}],
            },
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ts(text: &str) -> jiff::Timestamp {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_running_pod_not_ready_for_a_moment_keeps_its_players_until_the_grace_ends() {
        let live = server(Some(("True", 3)), 3, 2);
        let flapping = kubelet_pod("Running", Some("2026-12-05T10:00:00Z"), "False", "2026-12-05T12:00:00Z");
        let faltering = serving_not_ready(&live, &flapping, ts("2026-12-05T12:00:30Z"));
        assert_eq!(faltering, Serving::Faltering { online: Some(2), left: std::time::Duration::from_secs(90) });
        let policy = UpgradePolicy::default();
        let wait = decide(&sts(2, 2, "r2"), Some(&pod("r1")), faltering, &policy, &at(SAT_NOON));
        assert!(matches!(wait, Ok(Rollout::Wait { reason: "PlayersOnline", .. })), "{wait:?}");
        // Once the grace is over it does not serve anyone: replaced.
        assert_eq!(serving_not_ready(&live, &flapping, ts("2026-12-05T12:02:00Z")), Serving::Down);
        // The StatefulSet's count lagging a pod that is Ready again: the agent's count.
        let ready = kubelet_pod("Running", Some("2026-12-05T10:00:00Z"), "True", "2026-12-05T12:00:00Z");
        assert_eq!(serving_not_ready(&live, &ready, ts("2026-12-05T12:00:30Z")), Serving::Players(2));
    }

    #[test]
    fn a_pod_that_does_not_run_or_restarted_is_down_at_once_whatever_the_agent_last_said() {
        let live = server(Some(("True", 3)), 3, 2);
        let now = ts("2026-12-05T12:00:30Z");
        let pending = kubelet_pod("Pending", None, "False", "2026-12-05T12:00:00Z");
        assert_eq!(serving_not_ready(&live, &pending, now), Serving::Down);
        let crash_looping = kubelet_pod("Running", None, "False", "2026-12-05T12:00:00Z");
        assert_eq!(serving_not_ready(&live, &crash_looping, now), Serving::Down);
        // The container started after the pod went not ready: a new agent that has not written yet.
        let restarted = kubelet_pod("Running", Some("2026-12-05T12:00:10Z"), "False", "2026-12-05T12:00:00Z");
        assert_eq!(serving_not_ready(&live, &restarted, now), Serving::Down);
        // The agent's own Ready is not True.
        let flapping = kubelet_pod("Running", Some("2026-12-05T10:00:00Z"), "False", "2026-12-05T12:00:00Z");
        assert_eq!(serving_not_ready(&server(Some(("False", 3)), 3, 2), &flapping, now), Serving::Down);
        // Its count for an older generation: not trusted, as on a ready pod.
        let faltering = serving_not_ready(&server(Some(("True", 2)), 3, 0), &flapping, now);
        assert!(matches!(faltering, Serving::Faltering { online: None, .. }), "{faltering:?}");
    }
}
