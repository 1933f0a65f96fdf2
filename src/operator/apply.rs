//! Server-side apply of children under the operator's field manager, skipped when the cached object
//! already holds what would be sent, so an idle resync writes nothing.
//!
//! "Already holds" is two checks: the object carries the digest of this exact intent (an
//! annotation), which catches a field the operator stopped sending (server-side apply would remove
//! it), and every field the operator sends still has its value, which catches someone else's edit.

use std::fmt::Debug;

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::Digest;

/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "atlas-operator";
/// The annotation holding the digest of what the operator last applied.
pub const APPLIED_DIGEST: &str = "atlas.dev/applied-digest";

/// Adds the digest of `desired` (as it is before stamping) to its annotations.
pub fn stamp<K: Resource + Serialize>(desired: &mut K) {
    let digest = match serde_json::to_vec(&*desired) {
        Ok(bytes) => hex::encode(&sha2::Sha256::digest(&bytes)[..12]),
        // Serializing plain API types cannot fail; an empty digest only costs one extra apply.
        Err(_) => String::new(),
    };
    desired.annotations_mut().insert(APPLIED_DIGEST.to_owned(), digest);
}

/// Whether `observed` holds everything the stamped `desired` says.
pub fn up_to_date<K: Resource + Serialize>(desired: &K, observed: Option<&K>) -> bool {
    let Some(observed) = observed else { return false };
    if desired.annotations().get(APPLIED_DIGEST) != observed.annotations().get(APPLIED_DIGEST) {
        return false;
    }
    match (serde_json::to_value(desired), serde_json::to_value(observed)) {
        (Ok(d), Ok(o)) => contains(&o, &d),
        _ => false,
    }
}

/// Whether every field of `part` is in `whole` with the same value. Lists must have the same length
/// (their entries are compared in order); quantities are compared by value (`1000m` is `1`).
pub fn contains(whole: &Value, part: &Value) -> bool {
    match (whole, part) {
        (Value::Object(w), Value::Object(p)) => p.iter().all(|(k, pv)| w.get(k).is_some_and(|wv| contains(wv, pv))),
        (Value::Array(w), Value::Array(p)) => w.len() == p.len() && w.iter().zip(p).all(|(wv, pv)| contains(wv, pv)),
        (Value::String(w), Value::String(p)) => w == p || same_quantity(w, p),
        (Value::Number(w), Value::Number(p)) => w.as_f64() == p.as_f64(),
        (w, p) => w == p,
    }
}

/// Whether two strings are the same Kubernetes quantity written differently (the API server
/// canonicalizes `0.5` to `500m`, `1Gi` stays `1Gi`).
fn same_quantity(a: &str, b: &str) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

/// Whether quantity `a` is larger than `b` (false when either does not parse).
pub fn larger(a: &str, b: &str) -> bool {
    matches!((quantity(a), quantity(b)), (Some(x), Some(y)) if x > y && !same_quantity(a, b))
}

fn quantity(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => {
            let exponent: i32 = suffix.strip_prefix(['e', 'E'])?.parse().ok()?;
            10f64.powi(exponent)
        }
    };
    Some(value * scale)
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The cached object already held it: no request was made.
    Unchanged,
    /// A server-side apply was sent.
    Written,
}

/// Stamps `desired` and applies it unless `observed` already holds it. `force` takes over fields
/// another manager set (the operator's children are the operator's).
pub async fn apply<K>(api: &Api<K>, mut desired: K, observed: Option<&K>) -> Result<Applied, kube::Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    stamp(&mut desired);
    if up_to_date(&desired, observed) {
        return Ok(Applied::Unchanged);
    }
    let name = desired.name_any();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired)).await?;
    Ok(Applied::Written)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    fn service(value: Value) -> Service {
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn defaults_the_api_server_adds_do_not_count_as_a_change() {
        let mut desired =
            service(json!({"metadata": {"name": "s"}, "spec": {"ports": [{"name": "minecraft", "port": 25565}]}}));
        stamp(&mut desired);
        let mut observed = serde_json::to_value(&desired).unwrap_or_default();
        observed["metadata"]["uid"] = json!("u");
        observed["spec"]["clusterIP"] = json!("10.0.0.7");
        observed["spec"]["ports"][0]["protocol"] = json!("TCP");
        assert!(up_to_date(&desired, Some(&service(observed.clone()))));

        // Someone else changed a field the operator sets: apply again.
        observed["spec"]["ports"][0]["port"] = json!(25566);
        assert!(!up_to_date(&desired, Some(&service(observed))));
    }

    #[test]
    fn a_field_the_operator_stopped_sending_changes_the_digest() {
        let mut before =
            service(json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 1, "nodePort": 30001}]}}));
        stamp(&mut before);
        let mut after = service(json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 1}]}}));
        stamp(&mut after);
        // Every field `after` sends is in `before` (apart from the digest), yet `before` still holds
        // the node port, which only an apply of `after` removes: the digest tells them apart.
        let mut unstamped = serde_json::to_value(&after).unwrap_or_default();
        unstamped["metadata"]["annotations"] =
            serde_json::to_value(before.metadata.annotations.clone()).unwrap_or_default();
        assert!(contains(&serde_json::to_value(&before).unwrap_or_default(), &unstamped));
        assert!(!up_to_date(&after, Some(&before)));
        assert!(!up_to_date(&after, None));
    }

    #[test]
    fn quantities_compare_by_value() {
        assert!(contains(&json!("500m"), &json!("0.5")));
        assert!(contains(&json!("1"), &json!("1000m")));
        assert!(contains(&json!("1Gi"), &json!("1024Mi")));
        assert!(contains(&json!("6Gi"), &json!("6Gi")));
        assert!(!contains(&json!("6Gi"), &json!("6G")));
        assert!(!contains(&json!("abc"), &json!("abd")));
        assert!(!contains(&json!([1, 2]), &json!([1])), "lists keep their length");
        assert!(larger("20Gi", "10Gi") && larger("1Ti", "1000Gi") && !larger("10Gi", "10240Mi"));
        assert!(!larger("10Gi", "") && !larger("5Gi", "10Gi"));
    }
}
