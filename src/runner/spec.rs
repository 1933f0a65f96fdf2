//! Where the spec comes from. The standalone runner watches a file; the in-pod agent watches its
//! custom resource (`crate::agent`). Either way the reconciler sees a stream of valid specs
//! ([`Desired`]); a bad one is logged and reported, and the running server keeps running.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use crate::api::{MinecraftServer, MinecraftServerSpec};

/// A spec file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read spec {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML does not parse as a MinecraftServer (serde_yaml names the field, line and column).
    #[error("spec {path} is not a valid MinecraftServer: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why.
        source: serde_yaml::Error,
    },
    /// The document parses but breaks a rule the API server would enforce.
    #[error("spec {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

impl SpecError {
    /// A short static category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Read { .. } => "spec_read",
            Self::Parse { .. } => "spec_parse",
            Self::Invalid { .. } => "spec_invalid",
        }
    }
}

/// Reads and checks a spec file.
pub fn load_spec(path: &Path) -> Result<MinecraftServerSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: path.into(), source })?;
    parse_spec(path, &text)
}

/// Parses a spec document: a whole `MinecraftServer` (as `kubectl apply` takes it) or a bare spec.
pub fn parse_spec(path: &Path, text: &str) -> Result<MinecraftServerSpec, SpecError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|source| SpecError::Parse { path: path.into(), source })?;
    let spec_value = if value.get("kind").is_some() { value.get("spec") } else { Some(&value) };
    if let Some(message) = spec_value.and_then(unknown_field) {
        return Err(SpecError::Invalid { path: path.into(), message });
    }
    let spec = if value.get("kind").is_some() {
        let resource: MinecraftServer =
            serde_yaml::from_str(text).map_err(|source| SpecError::Parse { path: path.into(), source })?;
        resource.spec
    } else {
        serde_yaml::from_str(text).map_err(|source| SpecError::Parse { path: path.into(), source })?
    };
    check(&spec).map_err(|message| SpecError::Invalid { path: path.into(), message })?;
    Ok(spec)
}

/// The first field of `spec` the CRD's schema does not have, as a message that says what to do:
/// the API server refuses such a field (kubectl's strict field validation), and a file's must not
/// be dropped without a word (a misspelt `heapPercnt` would run the server with the default heap).
fn unknown_field(spec: &serde_yaml::Value) -> Option<String> {
    use kube::CustomResourceExt;
    let crd = MinecraftServer::crd();
    let schema = crd.spec.versions.first()?.schema.as_ref()?.open_api_v3_schema.as_ref()?;
    let schema = serde_json::to_value(schema).ok()?;
    let (field, known) = first_unknown(spec, &schema["properties"]["spec"], "spec")?;
    let leaf = field.rsplit('.').next().unwrap_or(&field);
    let closest = known.iter().map(|k| (edit_distance(leaf, k), k)).min().filter(|(d, k)| *d <= 2.max(k.len() / 4));
    let hint = match closest {
        Some((_, name)) => format!("did you mean {name}?"),
        None => format!("the fields there are {}", known.join(", ")),
    };
    Some(format!("unknown field {field} ({hint}): fix or remove it; the API server refuses it too"))
}

/// The path of the first key of `value` that `schema` (an OpenAPI schema) has no property for, and
/// the properties it has there.
fn first_unknown(value: &serde_yaml::Value, schema: &serde_json::Value, at: &str) -> Option<(String, Vec<String>)> {
    match value {
        serde_yaml::Value::Mapping(map) => {
            if let Some(properties) = schema.get("properties").and_then(serde_json::Value::as_object) {
                for (key, child) in map {
                    let Some(key) = key.as_str() else { continue };
                    let here = format!("{at}.{key}");
                    match properties.get(key) {
                        Some(schema) => {
                            if let Some(unknown) = first_unknown(child, schema, &here) {
                                return Some(unknown);
                            }
                        }
                        None => return Some((here, properties.keys().cloned().collect())),
                    }
                }
            } else if let Some(values) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                for (key, child) in map {
                    let here = format!("{at}.{}", key.as_str().unwrap_or("?"));
                    if let Some(unknown) = first_unknown(child, values, &here) {
                        return Some(unknown);
                    }
                }
            }
            None
        }
        serde_yaml::Value::Sequence(items) => {
            let schema = schema.get("items")?;
            items.iter().enumerate().find_map(|(i, item)| first_unknown(item, schema, &format!("{at}[{i}]")))
        }
        _ => None,
    }
}

/// The Levenshtein distance between two field names (insertions, deletions and substitutions).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The rules of the CRD that matter before a server starts, for specs that never pass an API server.
fn check(spec: &MinecraftServerSpec) -> Result<(), String> {
    if !spec.eula {
        return Err("spec.eula must be true: set it to accept the Minecraft EULA (https://aka.ms/MinecraftEULA)".into());
    }
    if let Some(pack) = &spec.pack
        && pack.source.get().is_none()
    {
        return Err("spec.pack.source must set exactly one of hub, url or mrpack".into());
    }
    if let Some(policy) = spec.pack.as_ref().and_then(|p| p.update.as_ref()) {
        super::update::Schedule::parse(policy)?;
    }
    if let Some(jvm) = &spec.jvm
        && jvm.heap.is_some()
        && jvm.heap_percent.is_some()
    {
        return Err("spec.jvm: set heap or heapPercent, not both".into());
    }
    for key in ["enable-rcon", "rcon.port", "rcon.password"] {
        if spec.properties.contains_key(key) {
            return Err(format!("spec.properties cannot set {key}: the runner owns RCON; use spec.rcon"));
        }
    }
    Ok(())
}

/// A spec to run, and which generation of its resource it is: what a spec source publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The spec.
    pub spec: MinecraftServerSpec,
    /// `metadata.generation` of the resource it came from (the agent's); `None` for a spec file.
    pub generation: Option<i64>,
    /// Where what runs differs from what the resource says, by Degraded reason (`SpecRejected`: the
    /// generation was refused and `spec` is the one before; `SecretNotMounted`): the reconciler
    /// reports each as a condition and a Warning Event.
    pub notes: std::collections::BTreeMap<&'static str, String>,
}

impl Desired {
    /// A spec with no generation (a file's).
    pub fn from_file(spec: MinecraftServerSpec) -> Self {
        Self { spec, generation: None, notes: std::collections::BTreeMap::new() }
    }
}

/// Checks a spec that comes from elsewhere than a file (a resource the API server validated by its
/// schema): the rules the runner relies on, for a clear error instead of a confusing failure later.
pub fn validate(spec: &MinecraftServerSpec) -> Result<(), String> {
    check(spec)
}

/// Watches a spec file and publishes each new valid spec. Starts with the file's current spec.
#[derive(Debug)]
pub struct FileSpecSource {
    rx: watch::Receiver<Desired>,
}

impl FileSpecSource {
    /// Loads `path` (an error here is fatal: there is nothing to run) and polls it every `interval`.
    pub fn start(path: PathBuf, interval: Duration) -> Result<Self, SpecError> {
        let first = load_spec(&path)?;
        let (tx, rx) = watch::channel(Desired::from_file(first));
        tokio::spawn(async move {
            let mut last_text = std::fs::read_to_string(&path).ok();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if tx.is_closed() {
                    return;
                }
                let text = std::fs::read_to_string(&path).ok();
                if text == last_text {
                    continue;
                }
                last_text = text.clone();
                let Some(text) = text else {
                    tracing::error!(path = %path.display(), "spec file disappeared; keeping the running server");
                    continue;
                };
                match parse_spec(&path, &text) {
                    Ok(spec) => {
                        tx.send_if_modified(|current| {
                            let changed = current.spec != spec;
                            if changed {
                                *current = Desired::from_file(spec);
                            }
                            changed
                        });
                    }
                    Err(e) => tracing::error!(category = e.category(), "{e}; keeping the running server"),
                }
            }
        });
        Ok(Self { rx })
    }

    /// The receiver the reconciler watches.
    pub fn receiver(&self) -> watch::Receiver<Desired> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_field_and_line() {
        let text = "apiVersion: atlas.dev/v1alpha1\nkind: MinecraftServer\nmetadata: {name: x}\nspec:\n  eula: true\n  server:\n    type: forge\n";
        let err = parse_spec(Path::new("s.yaml"), text).map(|_| ()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("spec.server.type") && err.contains("line 7"), "{err}");
        assert!(err.contains("forge") && err.contains("vanilla"), "{err}");
    }

    #[test]
    fn a_bare_spec_and_a_whole_resource_both_parse() -> Result<(), SpecError> {
        let bare = parse_spec(Path::new("s.yaml"), "eula: true\nserver: {type: vanilla, version: '1.21.4'}\n")?;
        let whole = parse_spec(
            Path::new("s.yaml"),
            "kind: MinecraftServer\napiVersion: atlas.dev/v1alpha1\nmetadata: {name: a}\nspec:\n  eula: true\n  server: {type: vanilla, version: '1.21.4'}\n",
        )?;
        assert_eq!(bare, whole);
        Ok(())
    }

    #[test]
    fn a_field_the_crd_does_not_have_is_refused_with_the_one_meant() {
        let refused =
            |text: &str| parse_spec(Path::new("s.yaml"), text).err().map(|e| e.to_string()).unwrap_or_default();
        let err = refused("eula: true\nserver: {type: vanilla}\njvm: {heapPercnt: 50}\n");
        assert!(err.contains("unknown field spec.jvm.heapPercnt (did you mean heapPercent?)"), "{err}");
        assert!(err.starts_with("spec s.yaml: ") && !err.contains('\n'), "{err}");
        // In a whole resource, and below a list; a name far from any gets the list of fields.
        let err = refused(
            "kind: MinecraftServer\nmetadata: {name: a}\nspec:\n  eula: true\n  server: {type: vanilla}\n  zzz: 1\n",
        );
        assert!(err.contains("unknown field spec.zzz (the fields there are ") && err.contains("eula"), "{err}");
        let err = refused("eula: true\nserver: {type: vanilla}\nresources: {claims: [{name: a}, {nmae: b}]}\n");
        assert!(err.contains("unknown field spec.resources.claims[1].nmae (did you mean name?)"), "{err}");
        // The free-form maps keep any key.
        let ok =
            parse_spec(Path::new("s.yaml"), "eula: true\nserver: {type: vanilla}\nproperties: {max-players: '5'}\n");
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("heapPercnt", "heapPercent"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn eula_false_is_refused_with_what_to_do() {
        let err =
            parse_spec(Path::new("s.yaml"), "eula: false\nserver: {type: vanilla}\n").err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("spec.eula must be true")), "{err:?}");
    }
}
