//! A Minecraft version change undone because its server failed, remembered in the data dir
//! (`DATA/.atlas/held-server.json`): until the spec names another server, every start (a crash
//! restart, a new runner, a new pod) runs the version that worked instead of failing again on a
//! world it may already have touched.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::ServerSpec;

/// The server spec that failed and the one that runs instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct HeldServer {
    /// `spec.server` as the spec names it, whose server failed.
    pub failed: ServerSpec,
    /// The server spec that ran before, which runs instead.
    pub instead: ServerSpec,
    /// Why it was undone.
    pub reason: String,
}

fn path(data_dir: &Path) -> PathBuf {
    super::atlas_dir(data_dir).join("held-server.json")
}

/// The hold the data dir records, if any. One that cannot be read is logged and ignored: the spec
/// then runs as written.
pub(super) fn load(data_dir: &Path) -> Option<HeldServer> {
    let path = path(data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read the held server version ({e}); ignoring it");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(held) => Some(held),
        Err(e) => {
            tracing::warn!(path = %path.display(), "the held server version does not parse ({e}); ignoring it");
            None
        }
    }
}

/// Records `held` (or forgets the hold with `None`). A failure is logged: the hold then lasts only
/// as long as this process.
pub(super) fn save(data_dir: &Path, held: Option<&HeldServer>) {
    let path = path(data_dir);
    let result = match held {
        Some(held) => serde_json::to_vec_pretty(held).map_err(std::io::Error::other).and_then(|bytes| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)
        }),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), "cannot record the held server version: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_survives_a_new_process_and_is_forgotten_on_request() -> Result<(), Box<dyn std::error::Error>> {
        let data = tempfile::tempdir()?;
        std::fs::create_dir_all(data.path().join(".atlas"))?;
        assert_eq!(load(data.path()), None);
        let server = |version: &str| -> Result<ServerSpec, serde_yaml::Error> {
            serde_yaml::from_str(&format!("{{type: vanilla, version: '{version}'}}"))
        };
        let held = HeldServer { failed: server("1.21.5")?, instead: server("1.21.4")?, reason: "crash".into() };
        save(data.path(), Some(&held));
        assert_eq!(load(data.path()), Some(held));
        save(data.path(), None);
        assert_eq!(load(data.path()), None);
        std::fs::write(data.path().join(".atlas/held-server.json"), "{not json")?;
        assert_eq!(load(data.path()), None, "a damaged record must not stop the runner");
        Ok(())
    }
}
