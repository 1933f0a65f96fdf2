//! The jar cache: jars stored by sha256 (`<sha256>.jar`) and a small index of what each resolved to.
//!
//! The index maps (software, Minecraft version) to a jar, the Java it needs, and the upstream
//! identity it came from (a published digest, or Fabric's loader and installer versions), so a
//! start can reuse a jar without downloading it, and can start offline. Entries are kept in the
//! order they were last resolved; the last one of a software is what `latest` means offline.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ServerError;
use super::files::atomic_write;
use crate::api::ServerType;

const INDEX: &str = "index.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IndexEntry {
    pub kind: ServerType,
    pub version: String,
    pub sha256: String,
    pub java_major: u32,
    pub upstream: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    entries: Vec<IndexEntry>,
}

#[derive(Debug, Clone)]
pub(crate) struct JarCache {
    dir: PathBuf,
}

impl JarCache {
    /// Opens (creating) the cache at `dir`; the path is made absolute so jars handed out are too.
    pub fn open(dir: &Path) -> Result<Self, ServerError> {
        std::fs::create_dir_all(dir).map_err(|e| ServerError::io(dir, e))?;
        let dir = std::fs::canonicalize(dir).map_err(|e| ServerError::io(dir, e))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn jar_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.jar"))
    }

    /// The entry for (kind, version); for `latest`, the most recently resolved one of that kind.
    pub fn lookup(&self, kind: ServerType, version: &str) -> Option<IndexEntry> {
        let index = self.read_index();
        let latest = version == super::version::LATEST;
        index.entries.into_iter().rev().find(|e| e.kind == kind && (latest || e.version == version))
    }

    /// The entry for (kind, version) if it came from `upstream`.
    pub fn lookup_upstream(&self, kind: ServerType, version: &str, upstream: &str) -> Option<IndexEntry> {
        self.lookup(kind, version).filter(|e| e.upstream == upstream)
    }

    /// Whether the jar named by `sha256` is present and still has that digest. A damaged one is
    /// removed so it is downloaded again.
    pub async fn is_intact(&self, sha256: &str) -> bool {
        let path = self.jar_path(sha256);
        let hashed = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || sha256_file(&path)).await
        };
        match hashed {
            Ok(Ok(actual)) if actual == sha256 => true,
            Ok(Ok(actual)) => {
                tracing::warn!(path = %path.display(), actual, "cached jar is damaged; removing it");
                let _ = std::fs::remove_file(&path);
                false
            }
            _ => false,
        }
    }

    /// Moves a verified download into place under its digest.
    pub fn commit(&self, temp: &Path, sha256: &str) -> Result<PathBuf, ServerError> {
        let path = self.jar_path(sha256);
        std::fs::rename(temp, &path).map_err(|e| ServerError::io(&path, e))?;
        sync_dir(&self.dir)?;
        Ok(path)
    }

    /// Records what (kind, version) resolved to, as the most recent entry.
    pub fn record(&self, entry: IndexEntry) -> Result<(), ServerError> {
        // Read-modify-write without a lock: two runners sharing a cache may drop each other's
        // entry, which costs a download, never a wrong jar (jars are named by digest).
        let mut index = self.read_index();
        index.entries.retain(|e| !(e.kind == entry.kind && e.version == entry.version));
        index.entries.push(entry);
        let path = self.dir.join(INDEX);
        let body = serde_json::to_vec_pretty(&index).map_err(|e| ServerError::io(&path, e.into()))?;
        atomic_write(&path, &body, None)
    }

    fn read_index(&self) -> Index {
        let path = self.dir.join(INDEX);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "jar cache index is unreadable ({e}); starting a new one");
                Index::default()
            }),
            Err(_) => Index::default(),
        }
    }
}

pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), ServerError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ServerError::io(dir, e))
}
