//! The operator's own status conditions (`WorkloadReady`, `SecretsResolved`, `UpgradePending`),
//! computed as data and written by server-side apply on `/status` under the operator's field
//! manager. The agent owns every other status field and condition; the operator never sends them,
//! and skips the write when its conditions say what they already say.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::apply::FIELD_MANAGER;
use super::gather::{SecretCheck, SecretState};
use super::upgrade::Rollout;
use crate::api::MinecraftServer;
pub use crate::api::conditions::{
    OPERATOR_TYPES as OWN_CONDITIONS, SECRETS_RESOLVED, UPGRADE_PENDING, WORKLOAD_READY, reasons,
};
use crate::troubleshooting::{REASON, with_pointer};

/// A condition without its transition time, which [`conditions`] fills in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The condition type.
    pub kind: &'static str,
    /// True or false.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

/// `SecretsResolved`, from the checks of every referenced Secret.
pub fn secrets_verdict(namespace: &str, checks: &[SecretCheck]) -> Verdict {
    let problems: Vec<String> = checks
        .iter()
        .filter_map(|c| {
            let fields = c.usage.fields.join(", ");
            match &c.state {
                SecretState::Present => None,
                SecretState::Missing => Some(format!("Secret {namespace}/{} ({fields}) does not exist", c.usage.name)),
                SecretState::MissingKeys(keys) => Some(format!(
                    "Secret {namespace}/{} ({fields}) has no key {}",
                    c.usage.name,
                    keys.join(", no key ")
                )),
            }
        })
        .collect();
    if problems.is_empty() {
        return Verdict {
            kind: SECRETS_RESOLVED,
            status: true,
            reason: reasons::RESOLVED,
            message: format!("all {} referenced Secrets exist with their keys", checks.len()),
        };
    }
    let missing_only = checks.iter().all(|c| !matches!(c.state, SecretState::MissingKeys(_)));
    let reason = if missing_only { reasons::SECRET_MISSING } else { reasons::SECRET_KEY_MISSING };
    let message = format!("{}; the pod is created or updated once it is fixed", problems.join("; "));
    Verdict { kind: SECRETS_RESOLVED, status: false, reason, message: with_pointer(message, REASON, reason) }
}

/// `WorkloadReady`, from the StatefulSet as it exists (if it does).
pub fn workload_verdict(paused: bool, secrets_ok: bool, sts: Option<&StatefulSet>) -> Verdict {
    let verdict =
        |status, reason, message: &str| Verdict { kind: WORKLOAD_READY, status, reason, message: message.to_owned() };
    if paused {
        return verdict(false, reasons::PAUSED, "spec.paused is true: scaled to zero, the volume is kept");
    }
    const PROGRESSING: &str = "the StatefulSet controller has not observed the latest spec yet";
    let Some(sts) = sts else {
        // Just created (or about to be): the same verdict as a StatefulSet not yet observed, so a
        // new server's conditions are written once, not once per step.
        return if secrets_ok {
            verdict(false, reasons::PROGRESSING, PROGRESSING)
        } else {
            verdict(false, reasons::SECRETS_UNRESOLVED, "the StatefulSet waits for the referenced Secrets")
        };
    };
    let status = sts.status.as_ref();
    let observed = status.and_then(|s| s.observed_generation);
    if observed.is_none() || observed < sts.metadata.generation {
        return verdict(false, reasons::PROGRESSING, PROGRESSING);
    }
    if status.and_then(|s| s.ready_replicas).unwrap_or(0) >= 1 {
        verdict(true, reasons::POD_READY, "the server's pod is ready")
    } else {
        let message = "waiting for the server's pod to be ready".to_owned();
        Verdict {
            kind: WORKLOAD_READY,
            status: false,
            reason: reasons::POD_NOT_READY,
            message: with_pointer(message, REASON, reasons::POD_NOT_READY),
        }
    }
}

/// `UpgradePending`, from the rollout decision.
pub fn upgrade_verdict(rollout: &Rollout) -> Verdict {
    let verdict = |status, reason, message: String| Verdict { kind: UPGRADE_PENDING, status, reason, message };
    match rollout {
        Rollout::Wait { reason, message } => verdict(true, reason, with_pointer(message.clone(), REASON, reason)),
        Rollout::Replace { to, .. } => {
            verdict(false, reasons::REPLACING, format!("replacing the pod with revision {to}"))
        }
        Rollout::Replacing => verdict(false, reasons::REPLACING, "the pod is being replaced".to_owned()),
        Rollout::UpToDate | Rollout::Settling | Rollout::NoPod => {
            verdict(false, reasons::UP_TO_DATE, "the pod runs the latest template".to_owned())
        }
    }
}

/// The conditions to write: each verdict, keeping the previous transition time when its status
/// did not flip.
pub fn conditions(
    verdicts: &[Verdict],
    previous: &[Condition],
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|v| {
            let status = if v.status { "True" } else { "False" };
            let since = previous
                .iter()
                .find(|c| c.type_ == v.kind && c.status == status)
                .map_or(Time(now), |c| c.last_transition_time.clone());
            Condition {
                type_: v.kind.to_owned(),
                status: status.to_owned(),
                reason: v.reason.to_owned(),
                message: v.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Whether `wanted` differs from what `previous` holds for the same types (transition times aside).
pub fn changed(wanted: &[Condition], previous: &[Condition]) -> bool {
    wanted.iter().any(|w| {
        !previous.iter().any(|p| {
            p.type_ == w.type_
                && p.status == w.status
                && p.reason == w.reason
                && p.message == w.message
                && p.observed_generation == w.observed_generation
        })
    })
}

/// Whether the condition of type `kind` flipped to (or first appeared with) `status`.
pub fn flipped(kind: &str, status: bool, previous: &[Condition]) -> bool {
    let status = if status { "True" } else { "False" };
    previous.iter().find(|c| c.type_ == kind).is_none_or(|c| c.status != status)
}

/// Writes the operator's conditions, and nothing else, on `/status`.
pub async fn write(api: &Api<MinecraftServer>, name: &str, conditions: &[Condition]) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": "atlas.dev/v1alpha1",
        "kind": "MinecraftServer",
        "metadata": {"name": name},
        "status": {"conditions": conditions},
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::operator::children::SecretUse;
    use std::collections::BTreeSet;

    fn check(name: &str, state: SecretState) -> SecretCheck {
        SecretCheck {
            usage: SecretUse {
                name: name.to_owned(),
                keys: BTreeSet::from(["token".to_owned()]),
                fields: vec!["spec.pack.source.hub.tokenSecretRef"],
                generated: false,
            },
            state,
        }
    }

    #[test]
    fn a_missing_secret_names_the_secret_and_the_field() {
        let v = secrets_verdict("games", &[check("ok", SecretState::Present), check("pack-hub", SecretState::Missing)]);
        assert!(!v.status && v.reason == "SecretMissing", "{v:?}");
        assert!(v.message.contains("games/pack-hub") && v.message.contains("tokenSecretRef"), "{}", v.message);
        let keys = secrets_verdict("games", &[check("pack-hub", SecretState::MissingKeys(vec!["token".to_owned()]))]);
        assert_eq!(keys.reason, "SecretKeyMissing");
        assert!(keys.message.contains("has no key token"), "{}", keys.message);
        assert!(secrets_verdict("games", &[check("ok", SecretState::Present)]).status);
        // Each ends with a pointer to its troubleshooting entry.
        assert!(v.message.ends_with("; see docs/troubleshooting.md#reason-SecretMissing"), "{}", v.message);
        assert!(keys.message.ends_with("; see docs/troubleshooting.md#reason-SecretKeyMissing"), "{}", keys.message);
    }

    #[test]
    fn transition_times_move_only_when_the_status_flips() {
        let t0 = jiff::Timestamp::from_second(1_000).unwrap_or_default();
        let t1 = jiff::Timestamp::from_second(2_000).unwrap_or_default();
        let not_ready = workload_verdict(false, true, None);
        let first = conditions(std::slice::from_ref(&not_ready), &[], Some(1), t0);
        assert_eq!(first[0].last_transition_time, Time(t0));

        // Same status, other reason: the time stays, but it is a change worth writing.
        let pod_not_ready = Verdict { reason: "PodNotReady", ..not_ready.clone() };
        let second = conditions(&[pod_not_ready], &first, Some(1), t1);
        assert_eq!(second[0].last_transition_time, Time(t0));
        assert!(changed(&second, &first));

        // Nothing new: nothing to write.
        let again = conditions(&[not_ready], &first, Some(1), t1);
        assert!(!changed(&again, &first));

        // A flip takes the new time.
        let ready = Verdict { kind: WORKLOAD_READY, status: true, reason: "PodReady", message: String::new() };
        let flipped_now = conditions(&[ready], &first, Some(1), t1);
        assert_eq!(flipped_now[0].last_transition_time, Time(t1));
        assert!(flipped(WORKLOAD_READY, true, &first) && !flipped(WORKLOAD_READY, false, &first));
    }

    #[test]
    fn paused_is_not_ready_and_says_why() {
        let v = workload_verdict(true, true, None);
        assert_eq!((v.status, v.reason), (false, "Paused"));
    }
}
