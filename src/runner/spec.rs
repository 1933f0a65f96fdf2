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
}

impl Desired {
    /// A spec with no generation (a file's).
    pub fn from_file(spec: MinecraftServerSpec) -> Self {
        Self { spec, generation: None }
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
    fn eula_false_is_refused_with_what_to_do() {
        let err =
            parse_spec(Path::new("s.yaml"), "eula: false\nserver: {type: vanilla}\n").err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("spec.eula must be true")), "{err:?}");
    }
}
