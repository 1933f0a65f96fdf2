//! The Atlas pack manifest (`atlas-pack.json`) and the pure diff between two versions' file sets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::path::RelativePath;

/// The manifest's file name, at the root of an Atlas pack archive.
pub const MANIFEST_FILE: &str = "atlas-pack.json";
/// The manifest format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The runner's own directory inside the data dir; no pack may put files there.
pub const RESERVED_DIR: &str = ".atlas";

/// Errors of manifest parsing, validation and `preserve` globs.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The JSON does not parse as a manifest.
    #[error("parse {MANIFEST_FILE}: {0}")]
    Parse(#[source] serde_json::Error),
    /// Serialising failed (not expected for these types).
    #[error("serialise {MANIFEST_FILE}: {0}")]
    Serialise(#[source] serde_json::Error),
    /// A format this runner does not know.
    #[error("{MANIFEST_FILE} has format {0}; this runner reads format {FORMAT_VERSION}")]
    UnsupportedFormat(u32),
    /// The same path listed twice.
    #[error("{MANIFEST_FILE} lists {0} twice")]
    DuplicatePath(RelativePath),
    /// A path listed both as a file and as a parent directory of another file.
    #[error("{MANIFEST_FILE} lists {0} as a file and as a directory")]
    FileDirConflict(RelativePath),
    /// A path under the runner's reserved directory, or the manifest itself.
    #[error("{MANIFEST_FILE} lists {0}, a path reserved for the runner")]
    ReservedPath(RelativePath),
    /// A malformed version string.
    #[error("pack version {0:?} is invalid: use 1-128 characters of A-Z a-z 0-9 . _ + - not starting with '.'")]
    InvalidVersion(String),
    /// A malformed `preserve` glob.
    #[error("preserve glob {pattern:?}: {source}")]
    PreserveGlob {
        /// The glob as given.
        pattern: String,
        /// Why globset refused it.
        #[source]
        source: globset::Error,
    },
    /// A `preserve` glob that is absolute or climbs out with `..`.
    #[error("preserve glob {0:?} must be relative to the data dir without '..'")]
    PreserveEscapes(String),
}

impl ManifestError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Parse(_) | Self::UnsupportedFormat(_) => "invalid-manifest",
            Self::Serialise(_) => "internal",
            Self::DuplicatePath(_) | Self::FileDirConflict(_) | Self::ReservedPath(_) => "invalid-manifest",
            Self::InvalidVersion(_) => "invalid-version",
            Self::PreserveGlob { .. } | Self::PreserveEscapes(_) => "invalid-spec",
        }
    }
}

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

impl FromStr for Sha256Digest {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)?;
        Ok(Self(out))
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// A pack version: also a directory name in the store, hence the strict alphabet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackVersion(String);

impl PackVersion {
    /// Checks `raw`: 1-128 characters of `A-Z a-z 0-9 . _ + -`, not starting with `.`.
    pub fn new(raw: &str) -> Result<Self, ManifestError> {
        let ok = !raw.is_empty()
            && raw.len() <= 128
            && !raw.starts_with('.')
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
        if ok { Ok(Self(raw.to_owned())) } else { Err(ManifestError::InvalidVersion(raw.to_owned())) }
    }

    /// The version string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PackVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for PackVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PackVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::new(&raw).map_err(serde::de::Error::custom)
    }
}

/// The manifest at the root of an Atlas pack: what the pack contains and what it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackManifest {
    /// Manifest format; always [`FORMAT_VERSION`].
    pub format: u32,
    /// The pack's version.
    pub version: PackVersion,
    /// The Minecraft version and mod loader the pack is made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minecraft: Option<MinecraftTarget>,
    /// JVM arguments the pack author recommends (added to the runner's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jvm_args: Vec<String>,
    /// Every file of the pack, sorted by path.
    pub files: Vec<FileEntry>,
}

/// The Minecraft version and loader a pack targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MinecraftTarget {
    /// A Minecraft version, e.g. `1.21.4`.
    pub version: String,
    /// The mod loader, when the pack needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<Loader>,
}

/// A mod loader and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Loader {
    /// `fabric`, `forge`, `neoforge`, `quilt`, `paper`, ...
    pub name: String,
    /// The loader's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// One file of a pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEntry {
    /// Where the file lands, relative to the data dir.
    pub path: RelativePath,
    /// SHA-256 of the content.
    pub sha256: Sha256Digest,
    /// Size in bytes.
    pub size: u64,
}

impl PackManifest {
    /// A manifest of `files` (sorted here), checked by [`PackManifest::validate`].
    pub fn new(
        version: PackVersion,
        minecraft: Option<MinecraftTarget>,
        jvm_args: Vec<String>,
        mut files: Vec<FileEntry>,
    ) -> Result<Self, ManifestError> {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = Self { format: FORMAT_VERSION, version, minecraft, jvm_args, files };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Parses and validates a manifest.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut manifest: Self = serde_json::from_slice(bytes).map_err(ManifestError::Parse)?;
        manifest.files.sort_by(|a, b| a.path.cmp(&b.path));
        manifest.validate()?;
        Ok(manifest)
    }

    /// The manifest as pretty JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, ManifestError> {
        let mut out = serde_json::to_vec_pretty(self).map_err(ManifestError::Serialise)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Checks the format, that no path repeats, that no file is also another's directory, and
    /// that nothing lands in the runner's reserved `.atlas/` or is named like the manifest.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedFormat(self.format));
        }
        let mut files = BTreeSet::new();
        for entry in &self.files {
            if entry.path.first_component() == RESERVED_DIR || entry.path.as_str() == MANIFEST_FILE {
                return Err(ManifestError::ReservedPath(entry.path.clone()));
            }
            if !files.insert(entry.path.as_str()) {
                return Err(ManifestError::DuplicatePath(entry.path.clone()));
            }
        }
        for entry in &self.files {
            if entry.path.ancestors().any(|a| files.contains(a)) {
                return Err(ManifestError::FileDirConflict(entry.path.clone()));
            }
        }
        Ok(())
    }

    /// The entry for `path`, if the pack has it.
    pub fn file(&self, path: &RelativePath) -> Option<&FileEntry> {
        self.files.binary_search_by(|e| e.path.cmp(path)).ok().and_then(|i| self.files.get(i))
    }

    /// Total size of the pack's files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The `preserve` globs of a spec: pack files the user may edit. `*` stays within one directory,
/// `**` matches any depth.
#[derive(Debug, Clone)]
pub struct Preserve {
    patterns: Vec<String>,
    set: GlobSet,
}

impl Preserve {
    /// Compiles the globs; refuses absolute ones and ones with a `..` component.
    pub fn new(patterns: &[String]) -> Result<Self, ManifestError> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            if pattern.starts_with('/') || pattern.split('/').any(|c| c == "..") {
                return Err(ManifestError::PreserveEscapes(pattern.clone()));
            }
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|source| ManifestError::PreserveGlob { pattern: pattern.clone(), source })?;
            builder.add(glob);
        }
        let set =
            builder.build().map_err(|source| ManifestError::PreserveGlob { pattern: patterns.join(", "), source })?;
        Ok(Self { patterns: patterns.to_vec(), set })
    }

    /// No preserved files.
    pub fn none() -> Self {
        Self { patterns: Vec::new(), set: GlobSet::empty() }
    }

    /// Whether `path` is preserved.
    pub fn matches(&self, path: &RelativePath) -> bool {
        self.set.is_match(path.as_str())
    }

    /// The globs as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

/// What turning one version's files into another's takes. Every file of the new version is in
/// exactly one of `added`, `changed`, `unchanged`, `preserved`; `removed` holds old files the new
/// version drops. Preserved paths (matched by [`Preserve`]) are never in `added`, `changed` or
/// `removed`: they are written only where absent, and left in place when a version drops them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// New files the old version did not have.
    pub added: Vec<FileEntry>,
    /// Files both have, with different content (the new entry).
    pub changed: Vec<FileEntry>,
    /// Old files the new version does not have.
    pub removed: Vec<FileEntry>,
    /// Files both have with the same content.
    pub unchanged: Vec<FileEntry>,
    /// New files matched by a `preserve` glob.
    pub preserved: Vec<FileEntry>,
}

/// The diff from `old` to `new` under `preserve`. Pure: no filesystem involved.
pub fn diff(old: &[FileEntry], new: &[FileEntry], preserve: &Preserve) -> Diff {
    let old_by_path: BTreeMap<&RelativePath, &FileEntry> = old.iter().map(|e| (&e.path, e)).collect();
    let new_paths: BTreeSet<&RelativePath> = new.iter().map(|e| &e.path).collect();
    let mut out = Diff::default();
    for entry in new {
        if preserve.matches(&entry.path) {
            out.preserved.push(entry.clone());
            continue;
        }
        match old_by_path.get(&entry.path) {
            None => out.added.push(entry.clone()),
            Some(o) if o.sha256 == entry.sha256 && o.size == entry.size => out.unchanged.push(entry.clone()),
            Some(_) => out.changed.push(entry.clone()),
        }
    }
    for entry in old {
        if !new_paths.contains(&entry.path) && !preserve.matches(&entry.path) {
            out.removed.push(entry.clone());
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::pack::path::sanitize_path;
    use proptest::prelude::*;

    fn entry(path: &str, byte: u8) -> FileEntry {
        FileEntry { path: sanitize_path(path).unwrap(), sha256: Sha256Digest([byte; 32]), size: u64::from(byte) }
    }

    #[test]
    fn manifest_round_trips_and_validates() {
        let m = PackManifest::new(
            PackVersion::new("1.4.2").unwrap(),
            Some(MinecraftTarget {
                version: "1.21.4".into(),
                loader: Some(Loader { name: "fabric".into(), version: Some("0.16.9".into()) }),
            }),
            vec!["-XX:+UseG1GC".into()],
            vec![entry("mods/b.jar", 2), entry("config/a.toml", 1)],
        )
        .unwrap();
        assert_eq!(m.files[0].path.as_str(), "config/a.toml");
        let json = m.to_json().unwrap();
        assert_eq!(PackManifest::from_json(&json).unwrap(), m);
        assert!(m.file(&sanitize_path("mods/b.jar").unwrap()).is_some());
    }

    #[test]
    fn manifest_rejects_bad_sets() {
        let v = || PackVersion::new("1").unwrap();
        let bad = [
            vec![entry("a", 1), entry("a", 2)],
            vec![entry("a", 1), entry("a/b", 2)],
            vec![entry(".atlas/lock", 1)],
            vec![entry(MANIFEST_FILE, 1)],
        ];
        for files in bad {
            assert!(PackManifest::new(v(), None, vec![], files).is_err());
        }
        let escaping = br#"{"format":1,"version":"1","files":[{"path":"../x","sha256":"00","size":1}]}"#;
        assert!(matches!(PackManifest::from_json(escaping), Err(ManifestError::Parse(_))));
        assert!(PackVersion::new("../x").is_err() && PackVersion::new(".hidden").is_err());
        assert!(PackVersion::new("1.4.2+build-7").is_ok());
    }

    #[test]
    fn preserve_globs() {
        let p = Preserve::new(&["server.properties".into(), "config/**".into(), "*.txt".into()]).unwrap();
        let m = |s: &str| p.matches(&sanitize_path(s).unwrap());
        assert!(m("server.properties") && m("config/a") && m("config/x/y/z.toml") && m("a.txt"));
        assert!(!m("mods/a.jar") && !m("sub/a.txt") && !m("configs/a"));
        assert!(Preserve::new(&["../x".into()]).is_err() && Preserve::new(&["/x".into()]).is_err());
    }

    #[test]
    fn diff_classifies() {
        let old = vec![entry("mods/a.jar", 1), entry("mods/b.jar", 2), entry("config/c", 3), entry("d", 4)];
        let new = vec![entry("mods/a.jar", 1), entry("mods/b.jar", 9), entry("config/c", 8), entry("e", 5)];
        let d = diff(&old, &new, &Preserve::new(&["config/**".into()]).unwrap());
        let names = |v: &[FileEntry]| v.iter().map(|e| e.path.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&d.added), ["e"]);
        assert_eq!(names(&d.changed), ["mods/b.jar"]);
        assert_eq!(names(&d.removed), ["d"]);
        assert_eq!(names(&d.unchanged), ["mods/a.jar"]);
        assert_eq!(names(&d.preserved), ["config/c"]);
    }

    fn file_set() -> impl Strategy<Value = BTreeMap<String, u8>> {
        let path = prop_oneof!["[ab]", "(mods|config)/[abc]", "config/[ab]/[xy]", "world/[ab]",];
        proptest::collection::btree_map(path, 0u8..3, 0..10)
    }

    fn to_entries(m: &BTreeMap<String, u8>) -> Vec<FileEntry> {
        m.iter().map(|(p, b)| entry(p, *b)).collect()
    }

    proptest! {
        #[test]
        fn diff_applied_to_old_yields_new(
            old in file_set(),
            new in file_set(),
            globs in proptest::sample::subsequence(vec!["config/**", "*", "mods/a", "world/*"], 0..3),
        ) {
            let preserve = Preserve::new(&globs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
            let (old, new) = (to_entries(&old), to_entries(&new));
            let d = diff(&old, &new, &preserve);
            let managed = |v: &[FileEntry]| -> BTreeMap<RelativePath, Sha256Digest> {
                v.iter().filter(|e| !preserve.matches(&e.path)).map(|e| (e.path.clone(), e.sha256)).collect()
            };
            // Applying the diff to the old managed set gives the new managed set.
            let mut state = managed(&old);
            for e in &d.removed { prop_assert!(state.remove(&e.path).is_some()); }
            for e in &d.changed { prop_assert!(state.insert(e.path.clone(), e.sha256).is_some()); }
            for e in &d.added { prop_assert!(state.insert(e.path.clone(), e.sha256).is_none()); }
            prop_assert_eq!(&state, &managed(&new));
            // Removed never intersects the new version.
            let new_paths: BTreeSet<_> = new.iter().map(|e| e.path.clone()).collect();
            prop_assert!(d.removed.iter().all(|e| !new_paths.contains(&e.path)));
            // Every new file is in exactly one class.
            let mut classed: Vec<_> = [&d.added, &d.changed, &d.unchanged, &d.preserved]
                .iter().flat_map(|v| v.iter().map(|e| e.path.clone())).collect();
            classed.sort();
            prop_assert_eq!(classed, new_paths.into_iter().collect::<Vec<_>>());
            // Preserved files are never written over or removed.
            prop_assert!(d.changed.iter().chain(&d.added).chain(&d.removed).all(|e| !preserve.matches(&e.path)));
            // A version diffed with itself changes nothing.
            let same = diff(&new, &new, &preserve);
            prop_assert!(same.added.is_empty() && same.changed.is_empty() && same.removed.is_empty());
        }
    }
}
