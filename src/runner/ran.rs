//! What the world last ran on: the server software, Minecraft version and jar digest of the last
//! server that became ready on this data dir (`DATA/.atlas/ran-server.json`). A fresh start (a new
//! runner, a replaced pod) reads it to keep `latest` where it was and to tell a Minecraft version
//! change from a plain start, since a world a newer version touched cannot go back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::{ServerSpec, ServerType};

/// The server the world last ran on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RanServer {
    /// `spec.server` with the version it resolved to (never `latest`).
    pub server: ServerSpec,
    /// The Minecraft version.
    pub minecraft_version: String,
    /// The jar's sha256.
    pub sha256: String,
}

impl RanServer {
    /// What `prepared` runs, when it was resolved (always, once prepared for a start).
    pub(super) fn of(prepared: &super::Prepared) -> Option<Self> {
        let resolved = prepared.resolved.as_ref()?;
        let server = ServerSpec {
            kind: resolved.kind,
            version: resolved.minecraft_version.clone(),
            jar: prepared.spec.server.jar.clone(),
        };
        Some(Self { server, minecraft_version: resolved.minecraft_version.clone(), sha256: resolved.sha256.clone() })
    }

    /// Whether the version is a real one (a custom jar resolved offline is `unknown`).
    pub(super) fn known(&self) -> bool {
        self.minecraft_version != "unknown"
    }

    /// `server` with `latest` pinned to the version the world last ran on, when it is the same
    /// software: `latest` moving on upstream must not upgrade a world behind the admin's back.
    pub(super) fn pin(&self, server: &ServerSpec) -> Option<ServerSpec> {
        (server.version == crate::server::version::LATEST
            && server.kind == self.server.kind
            && server.kind != ServerType::Custom)
            .then(|| ServerSpec { version: self.minecraft_version.clone(), ..server.clone() })
    }
}

fn path(data_dir: &Path) -> PathBuf {
    super::atlas_dir(data_dir).join("ran-server.json")
}

/// The record the data dir holds, if any; one that cannot be read is logged and ignored (the spec
/// then starts as written, as before there was a record).
pub(super) fn load(data_dir: &Path) -> Option<RanServer> {
    let path = path(data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read the record of the server that ran last ({e}); ignoring it");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .inspect_err(|e| {
            tracing::warn!(path = %path.display(), "the record of the server that ran last does not parse ({e}); ignoring it");
        })
        .ok()
}

/// Records `ran` when it differs from the record; a failure is logged (the next fresh start then
/// compares with an older record, and at worst treats a start as a version change).
pub(super) fn save(data_dir: &Path, ran: &RanServer) {
    if load(data_dir).as_ref() == Some(ran) {
        return;
    }
    let path = path(data_dir);
    let result = serde_json::to_vec_pretty(ran).map_err(std::io::Error::other).and_then(|bytes| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    });
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), "cannot record the server that ran: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(kind: &str, version: &str) -> Result<ServerSpec, serde_yaml::Error> {
        serde_yaml::from_str(&format!("{{type: {kind}, version: '{version}'}}"))
    }

    #[test]
    fn latest_is_pinned_to_the_recorded_version_of_the_same_software_only() -> Result<(), Box<dyn std::error::Error>> {
        let ran =
            RanServer { server: server("vanilla", "1.21.4")?, minecraft_version: "1.21.4".into(), sha256: "ab".into() };
        assert_eq!(ran.pin(&server("vanilla", "latest")?), Some(server("vanilla", "1.21.4")?));
        assert_eq!(ran.pin(&server("vanilla", "1.21.5")?), None, "a named version is the admin's choice");
        assert_eq!(ran.pin(&server("paper", "latest")?), None, "another software resolves its own latest");
        Ok(())
    }

    #[test]
    fn the_record_survives_a_new_process() -> Result<(), Box<dyn std::error::Error>> {
        let data = tempfile::tempdir()?;
        std::fs::create_dir_all(data.path().join(".atlas"))?;
        assert_eq!(load(data.path()), None);
        let ran =
            RanServer { server: server("vanilla", "1.21.4")?, minecraft_version: "1.21.4".into(), sha256: "ab".into() };
        save(data.path(), &ran);
        assert_eq!(load(data.path()), Some(ran));
        Ok(())
    }
}
