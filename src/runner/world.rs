//! Whether a server touched the world: a fingerprint of the world directories (every file's path,
//! size and modification time), taken before an update's new server starts and compared once it
//! failed. An older server may not load a world a newer one has written to, so a touched world is
//! restored from the backup taken before the update.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The world directories' files, each with its size and modification time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct WorldPrint(BTreeMap<PathBuf, (u64, Option<SystemTime>)>);

/// Fingerprints the world of the server in `data_dir` (none yet: an empty print).
pub(super) async fn print(data_dir: &Path) -> WorldPrint {
    let data_dir = data_dir.to_owned();
    tokio::task::spawn_blocking(move || print_blocking(&data_dir)).await.unwrap_or_default()
}

fn print_blocking(data_dir: &Path) -> WorldPrint {
    let mut files = BTreeMap::new();
    // No world directory yet (a first start): nothing to fingerprint.
    let worlds = crate::backup::snapshot::world_dirs(data_dir).unwrap_or_default();
    let mut stack: Vec<PathBuf> = worlds.iter().map(|w| data_dir.join(w)).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(data_dir).map(Path::to_path_buf).unwrap_or(path);
                files.insert(rel, (meta.len(), meta.modified().ok()));
            }
        }
    }
    WorldPrint(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_to_any_world_file_changes_the_print() -> Result<(), Box<dyn std::error::Error>> {
        let data = tempfile::tempdir()?;
        let empty = print(data.path()).await;
        assert_eq!(empty, WorldPrint::default());
        std::fs::create_dir_all(data.path().join("world/region"))?;
        std::fs::write(data.path().join("world/level.dat"), b"one")?;
        let first = print(data.path()).await;
        assert_ne!(first, empty, "a new world is a touched world");
        assert_eq!(print(data.path()).await, first, "the same world prints the same");
        std::fs::write(data.path().join("world/region/r.0.0.mca"), b"chunk")?;
        assert_ne!(print(data.path()).await, first, "a new region file touches the world");
        // Files outside the world do not count.
        let world = print(data.path()).await;
        std::fs::write(data.path().join("server.properties"), "motd=x\n")?;
        assert_eq!(print(data.path()).await, world);
        Ok(())
    }
}
