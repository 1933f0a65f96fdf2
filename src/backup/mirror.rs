//! The capture mirror: a persistent copy of the captured files under `DATA/.atlas/backup-mirror`, brought up
//! to date by copying only what changed, so the pass made with the server's saving off is short.
//!
//! A file is copied when its size or modification time differs from the mirror's copy (the copy carries the
//! source's mtime as it was read before copying), or when the source's mtime is within [`RACY`] of the time
//! the copy was made (the copy's ctime): timestamps have a granularity, so a write right after the copy may
//! leave the same mtime behind (git's "racy clean" rule). Copies are reflinks (FICLONE) where the filesystem
//! shares extents, plain copies elsewhere. Nothing is ever hard-linked: the server rewrites files in place.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use globset::GlobSet;

use super::snapshot::SnapshotError;

/// Where the mirror lives, relative to the data directory.
pub const MIRROR_DIR: &str = ".atlas/backup-mirror";

/// How close to its copy time a source mtime must be for the copy to be distrusted.
pub const RACY: Duration = Duration::from_secs(2);

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Regular files in the mirror after the pass.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Files copied by this pass.
    pub copied: u64,
    /// Bytes copied by this pass.
    pub copied_bytes: u64,
    /// Copies that were reflinks.
    pub reflinked: u64,
    /// Paths removed from the mirror because the source no longer has them (or no longer selects them).
    pub removed: u64,
}

/// What a pass copies: the world directories whole, plus top-level paths matched by `include`, minus
/// `exclude`; `.atlas` never.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The world directories (top-level names).
    pub worlds: Vec<String>,
    /// Extra paths to capture.
    pub include: GlobSet,
    /// Paths left out.
    pub exclude: GlobSet,
}

/// Set to stop a pass early (its future was dropped); the pass then fails with `Interrupted`.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Asks the pass to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn check(&self) -> io::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "the capture was cancelled"));
        }
        Ok(())
    }
}

/// Brings `mirror` up to date with the selected files of `data_dir`. Blocking: run it on a blocking thread.
pub fn sync(
    data_dir: &Path,
    mirror: &Path,
    selection: &Selection,
    stop: &StopFlag,
) -> Result<SyncStats, SnapshotError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Copy { path, source }
    };
    fs::create_dir_all(mirror).map_err(err(mirror))?;
    let mut pass = Pass { from: data_dir, to: mirror, stop, wanted: HashSet::new(), stats: SyncStats::default() };
    for world in &selection.worlds {
        pass.tree(Path::new(world), &|_| true, &selection.exclude)?;
    }
    if !selection.include.is_empty() {
        let mut top =
            fs::read_dir(data_dir).map_err(err(data_dir))?.collect::<Result<Vec<_>, _>>().map_err(err(data_dir))?;
        top.sort_by_key(|e| e.file_name());
        for entry in top {
            let name = entry.file_name();
            // The worlds are already in; `.atlas` holds the runner's state, the mirror and local backups.
            if name == ".atlas" || selection.worlds.iter().any(|w| name == w.as_str()) {
                continue;
            }
            pass.tree(Path::new(&name), &|p| selection.include.is_match(p), &selection.exclude)?;
        }
    }
    pass.prune(Path::new(""))?;
    Ok(pass.stats)
}

struct Pass<'a> {
    from: &'a Path,
    to: &'a Path,
    stop: &'a StopFlag,
    wanted: HashSet<PathBuf>,
    stats: SyncStats,
}

impl Pass<'_> {
    fn tree(&mut self, rel: &Path, keep: &dyn Fn(&Path) -> bool, exclude: &GlobSet) -> Result<(), SnapshotError> {
        if exclude.is_match(rel) {
            return Ok(());
        }
        let source = self.from.join(rel);
        let err = |e| SnapshotError::Copy { path: source.clone(), source: e };
        self.stop.check().map_err(err)?;
        let meta = match fs::symlink_metadata(&source) {
            Ok(meta) => meta,
            // Deleted by the server since its directory was read: it is not part of this capture.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        let target = self.to.join(rel);
        if meta.is_dir() {
            if keep(rel) {
                ensure_dir(&target).map_err(err)?;
                self.want(rel);
            }
            let mut entries = fs::read_dir(&source).map_err(err)?.collect::<Result<Vec<_>, _>>().map_err(err)?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                self.tree(&rel.join(entry.file_name()), keep, exclude)?;
            }
            return Ok(());
        }
        if !keep(rel) {
            return Ok(());
        }
        if let Some(parent) = target.parent() {
            ensure_dir(parent).map_err(err)?;
            // Every directory above a kept file is part of the capture.
            let mut dir = rel.parent();
            while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
                self.want(d);
                dir = d.parent();
            }
        }
        self.want(rel);
        if meta.file_type().is_symlink() {
            let link = fs::read_link(&source).map_err(err)?;
            if fs::read_link(&target).ok().as_ref() != Some(&link) {
                remove_any(&target).map_err(err)?;
                std::os::unix::fs::symlink(link, &target).map_err(err)?;
            }
        } else if meta.is_file() {
            let copy = match fs::symlink_metadata(&target) {
                Ok(have) => !have.is_file() || stale(&meta, &have),
                Err(_) => true,
            };
            if copy {
                if !fs::symlink_metadata(&target).map(|m| m.is_file()).unwrap_or(true) {
                    remove_any(&target).map_err(err)?;
                }
                let reflinked = copy_file(&source, &target, &meta).map_err(err)?;
                self.stats.copied += 1;
                self.stats.copied_bytes += meta.len();
                self.stats.reflinked += u64::from(reflinked);
            }
            self.stats.files += 1;
            self.stats.bytes += fs::symlink_metadata(&target).map(|m| m.len()).map_err(err)?;
        }
        Ok(())
    }

    fn want(&mut self, rel: &Path) {
        self.wanted.insert(rel.to_owned());
    }

    /// Removes what the mirror holds under `rel` that this pass did not select.
    fn prune(&mut self, rel: &Path) -> Result<(), SnapshotError> {
        let dir = self.to.join(rel);
        let err = |e| SnapshotError::Copy { path: dir.clone(), source: e };
        let entries = fs::read_dir(&dir).map_err(err)?.collect::<Result<Vec<_>, _>>().map_err(err)?;
        for entry in entries {
            let child = rel.join(entry.file_name());
            let path = entry.path();
            if !self.wanted.contains(&child) {
                remove_any(&path).map_err(|e| SnapshotError::Copy { path: path.clone(), source: e })?;
                self.stats.removed += 1;
            } else if entry.file_type().map_err(|e| SnapshotError::Copy { path: path.clone(), source: e })?.is_dir() {
                self.prune(&child)?;
            }
        }
        Ok(())
    }
}

/// Whether the mirror's copy `have` may differ from the source `meta`.
fn stale(meta: &fs::Metadata, have: &fs::Metadata) -> bool {
    if meta.len() != have.len() || meta.mtime() != have.mtime() || meta.mtime_nsec() != have.mtime_nsec() {
        return true;
    }
    // The copy's ctime is when it was made (setting its mtime changed it last); a source mtime that close to it
    // cannot prove the source was not written again within the same timestamp tick.
    let mtime = Duration::new(u64::try_from(meta.mtime()).unwrap_or(0), u32::try_from(meta.mtime_nsec()).unwrap_or(0));
    let copied = Duration::new(u64::try_from(have.ctime()).unwrap_or(0), u32::try_from(have.ctime_nsec()).unwrap_or(0));
    mtime + RACY >= copied
}

fn ensure_dir(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => {
            fs::remove_file(path)?;
            fs::create_dir_all(path)
        }
        Err(_) => fs::create_dir_all(path),
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies `source` (whose metadata, read before the copy, is `meta`) over `target`, then gives the copy the
/// source's mode and that mtime. Returns whether the copy is a reflink.
fn copy_file(source: &Path, target: &Path, meta: &fs::Metadata) -> io::Result<bool> {
    let from = fs::File::open(source)?;
    let to = fs::OpenOptions::new().write(true).create(true).truncate(true).open(target)?;
    let reflinked = rustix::fs::ioctl_ficlone(&to, &from).is_ok();
    if !reflinked {
        drop(to);
        // copy_file_range underneath, which also shares extents where the filesystem can.
        fs::copy(source, target)?;
    }
    let to = fs::OpenOptions::new().write(true).open(target)?;
    to.set_permissions(meta.permissions())?;
    let mtime = UNIX_EPOCH
        + Duration::new(u64::try_from(meta.mtime()).unwrap_or(0), u32::try_from(meta.mtime_nsec()).unwrap_or(0));
    to.set_modified(mtime.max(UNIX_EPOCH))?;
    Ok(reflinked)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use globset::GlobSetBuilder;

    fn now() -> Duration {
        std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }

    fn selection(worlds: &[&str]) -> Selection {
        Selection {
            worlds: worlds.iter().map(|w| (*w).to_owned()).collect(),
            include: GlobSetBuilder::new().build().unwrap(),
            exclude: GlobSetBuilder::new().build().unwrap(),
        }
    }

    fn set_mtime(path: &Path, ago: Duration) {
        let file = fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(UNIX_EPOCH + now() - ago).unwrap();
    }

    #[test]
    fn copies_only_what_changed_and_removes_what_went() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, mirror) = (tmp.path().join("data"), tmp.path().join("mirror"));
        fs::create_dir_all(data.join("world/region")).unwrap();
        fs::create_dir_all(data.join("world/empty")).unwrap();
        for i in 0..5 {
            let path = data.join(format!("world/region/r.{i}.0.mca"));
            fs::write(&path, vec![i as u8; 1000]).unwrap();
            set_mtime(&path, Duration::from_secs(60));
        }
        fs::write(data.join("world/gone.dat"), b"x").unwrap();
        let sel = selection(&["world"]);
        let stop = StopFlag::default();
        let first = sync(&data, &mirror, &sel, &stop).unwrap();
        assert_eq!((first.files, first.copied, first.removed), (6, 6, 0));
        // gone.dat was just written: racy, so it is copied again; the old region files are not.
        let second = sync(&data, &mirror, &sel, &stop).unwrap();
        assert_eq!((second.files, second.copied), (6, 1));

        // Same size, new contents, new mtime: copied. A removed file leaves the mirror.
        let changed = data.join("world/region/r.3.0.mca");
        fs::write(&changed, vec![9u8; 1000]).unwrap();
        set_mtime(&changed, Duration::from_secs(30));
        fs::remove_file(data.join("world/gone.dat")).unwrap();
        let third = sync(&data, &mirror, &sel, &stop).unwrap();
        assert_eq!((third.files, third.copied, third.removed), (5, 1, 1));
        assert_eq!(fs::read(mirror.join("world/region/r.3.0.mca")).unwrap(), vec![9u8; 1000]);
        assert!(!mirror.join("world/gone.dat").exists());
        assert!(mirror.join("world/empty").is_dir());

        // A rewrite that keeps size and mtime, within the racy window of the copy, is still caught.
        let racy = data.join("world/region/r.1.0.mca");
        fs::write(&racy, vec![7u8; 1000]).unwrap();
        let stamp = fs::metadata(&racy).unwrap().modified().unwrap();
        sync(&data, &mirror, &sel, &stop).unwrap();
        fs::write(&racy, vec![8u8; 1000]).unwrap();
        fs::OpenOptions::new().write(true).open(&racy).unwrap().set_modified(stamp).unwrap();
        sync(&data, &mirror, &sel, &stop).unwrap();
        assert_eq!(fs::read(mirror.join("world/region/r.1.0.mca")).unwrap(), vec![8u8; 1000]);

        // A world that is no longer selected leaves the mirror.
        let none = sync(&data, &mirror, &selection(&[]), &stop).unwrap();
        assert_eq!(none.files, 0);
        assert!(!mirror.join("world").exists());
        stop.stop();
        assert!(sync(&data, &mirror, &sel, &stop).is_err());
    }
}
