//! Minecraft versions, ordered as Mojang's version manifest orders them.
//!
//! Versions run from `1.21.11` to year-numbered ones (`26.2`, `26.3-snapshot-9`); no semver rule
//! orders them all, so the manifest's list (newest first) is the order.

use std::cmp::Ordering;

use serde::Deserialize;

/// Mojang's `version_manifest_v2.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionManifest {
    /// The newest release and snapshot.
    pub latest: Latest,
    /// Every version, newest first.
    pub versions: Vec<ManifestVersion>,
}

/// The manifest's `latest` object.
#[derive(Debug, Clone, Deserialize)]
pub struct Latest {
    /// The newest release (what `latest` in a spec means).
    pub release: String,
    /// The newest snapshot.
    pub snapshot: String,
}

/// One version in the manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestVersion {
    /// The version's name (`1.21.4`, `26.2`).
    pub id: String,
    /// `release`, `snapshot`, `old_beta`, `old_alpha`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Where the version document is.
    pub url: String,
    /// The version document's sha1.
    pub sha1: String,
}

impl VersionManifest {
    /// Parses the manifest.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The entry for `id`.
    pub fn get(&self, id: &str) -> Option<&ManifestVersion> {
        self.versions.iter().find(|v| v.id == id)
    }

    /// How `a` compares with `b` by age (`Greater` = newer), or `None` when either is not listed.
    pub fn compare(&self, a: &str, b: &str) -> Option<Ordering> {
        let position = |id: &str| self.versions.iter().position(|v| v.id == id);
        // The list is newest first, so a smaller position is a newer version.
        Some(position(b)?.cmp(&position(a)?))
    }

    /// The newest of `ids` that the manifest lists as a release.
    pub fn newest_release<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        let mut best: Option<(usize, &'a str)> = None;
        for id in ids {
            let Some(position) = self.versions.iter().position(|v| v.id == id && v.kind == "release") else {
                continue;
            };
            if best.is_none_or(|(p, _)| position < p) {
                best = Some((position, id));
            }
        }
        best.map(|(_, id)| id)
    }

    /// `requested` with `latest` replaced by the newest release.
    pub fn resolve<'a>(&'a self, requested: &'a str) -> &'a str {
        if requested == LATEST { &self.latest.release } else { requested }
    }
}

/// What a spec writes for the newest release.
pub const LATEST: &str = "latest";

/// The parts of a version document (`1.21.4.json`) the runner needs.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionDocument {
    /// The version's name.
    pub id: String,
    /// Client and server downloads.
    #[serde(default)]
    pub downloads: Downloads,
    /// The Java the version needs; absent on versions older than 1.17's launcher metadata.
    #[serde(rename = "javaVersion")]
    pub java_version: Option<JavaVersion>,
}

/// `downloads` of a version document.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Downloads {
    /// The dedicated server jar; absent on very old versions.
    pub server: Option<Download>,
}

/// One download.
#[derive(Debug, Clone, Deserialize)]
pub struct Download {
    /// The file's sha1.
    pub sha1: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where it is.
    pub url: String,
}

/// `javaVersion` of a version document.
#[derive(Debug, Clone, Deserialize)]
pub struct JavaVersion {
    /// The Java major version (`21`, `25`).
    #[serde(rename = "majorVersion")]
    pub major_version: u32,
}

impl VersionDocument {
    /// The Java major version the server needs. Documents without `javaVersion` predate Java 16, so
    /// they run on Java 8.
    pub fn java_major(&self) -> u32 {
        self.java_version.as_ref().map_or(8, |j| j.major_version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Result<VersionManifest, serde_json::Error> {
        VersionManifest::parse(include_bytes!("../../tests/data/mojang/version_manifest_v2.json"))
    }

    #[test]
    fn versions_are_ordered_by_the_manifest_not_by_semver() -> Result<(), serde_json::Error> {
        let m = manifest()?;
        assert_eq!(m.compare("1.21.11", "26.2"), Some(Ordering::Less));
        assert_eq!(m.compare("26.2", "26.3-snapshot-9"), Some(Ordering::Less));
        assert_eq!(m.compare("26.3-snapshot-9", "1.21.11"), Some(Ordering::Greater));
        // Semver-ish string comparison would put 1.21.4 after 1.21.11.
        assert_eq!(m.compare("1.21.4", "1.21.11"), Some(Ordering::Less));
        assert_eq!(m.compare("26.2", "26.2"), Some(Ordering::Equal));
        assert_eq!(m.compare("26.2", "9.9.9"), None);
        Ok(())
    }

    #[test]
    fn latest_is_the_newest_release() -> Result<(), serde_json::Error> {
        let m = manifest()?;
        assert_eq!(m.resolve("latest"), "26.2");
        assert_eq!(m.resolve("1.21.4"), "1.21.4");
        assert_eq!(m.latest.snapshot, "26.3-snapshot-9");
        assert_eq!(m.newest_release(["1.21.4", "26.3-snapshot-9", "1.21.11", "26.2-rc-1"]), Some("1.21.11"));
        assert_eq!(m.newest_release(["26.3-snapshot-9"]), None);
        Ok(())
    }

    #[test]
    fn version_documents_name_the_server_jar_and_java() -> Result<(), serde_json::Error> {
        let old: VersionDocument = serde_json::from_slice(include_bytes!("../../tests/data/mojang/1.21.4.json"))?;
        let new: VersionDocument = serde_json::from_slice(include_bytes!("../../tests/data/mojang/26.2.json"))?;
        assert_eq!((old.id.as_str(), old.java_major()), ("1.21.4", 21));
        assert_eq!((new.id.as_str(), new.java_major()), ("26.2", 25));
        let server = old.downloads.server.map(|s| (s.sha1, s.size));
        assert_eq!(server, Some(("4707d00eb834b446575d89a61a11b5d548d8c001".to_owned(), 56_880_250)));
        Ok(())
    }
}
