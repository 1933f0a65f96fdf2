//! Applying a staged pack, and rolling back: plan (diff + checks of the data dir), verify the
//! files to install, then a journaled swap made of renames, committed by replacing `state.json`.
//!
//! The swap is the only part during which the server must be stopped; the caller stops it, and
//! holds the data dir's lock (a [`PackStore`] borrows it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::IoError;
use super::journal::{self, Journal, JournalError, exists, hash_file, write_atomic};
use super::manifest::{FileEntry, ManifestError, PackManifest, PackVersion, Preserve, diff};
use super::path::RelativePath;
use super::store::{Layout, PackStore, StagedPack, StoreError, StoreState};

/// A step of the swap, passed to the test hook of [`PackStore::apply_with_hook`] just before
/// the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapStep<'a> {
    /// Writing the journal.
    WriteJournal,
    /// Moving an old version's file out of the data dir into the store.
    Displace(&'a RelativePath),
    /// Moving a new version's file from the store into the data dir.
    Install(&'a RelativePath),
    /// Moving a new version's whole directory from the store into the data dir, where nothing is.
    InstallDir(&'a RelativePath),
    /// Writing an absent preserved file.
    WritePreserved(&'a RelativePath),
    /// fsyncing the directories the swap changed.
    SyncDirs,
    /// Replacing `state.json`: the commit point.
    Commit,
    /// Deleting copies the store no longer needs.
    Cleanup,
    /// Deleting the journal.
    RemoveJournal,
}

/// Errors of apply and rollback.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The staged pack belongs to another store, or its directory has gone.
    #[error("the staged pack {0} is not in this store; stage it again")]
    NotStaged(PackVersion),
    /// A file no pack version owns is where the new version puts one.
    #[error("{path}: {reason}; move it away or list it in preserve")]
    Conflict {
        /// The path in the data dir.
        path: RelativePath,
        /// What is there.
        reason: &'static str,
    },
    /// A file to install does not match the manifest: nothing was changed.
    #[error("verify {path} before the swap: {reason}")]
    VerifyDigest {
        /// The file.
        path: RelativePath,
        /// What was wrong.
        reason: String,
    },
    /// Rollback asked with no previous version.
    #[error(
        "there is no previous pack version to roll back to (the store keeps the version an update replaced, and no \
         update has replaced one here); to change versions, pin the one you want in spec.pack.version and run \
         `atlas-runner pack apply`"
    )]
    NoPrevious,
    /// A filesystem operation failed before the swap began: nothing was changed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Invalid `preserve` globs.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A step of the swap failed; it was undone (`rolled_back`), or, when the undo failed too, the
    /// journal stays and the next open of the store undoes it.
    #[error("swap to {to} failed ({}): {source}", if *rolled_back { "rolled back" } else { "rollback pending: the next open of the store finishes it" })]
    Swap {
        /// The version being installed.
        to: PackVersion,
        /// Whether the data dir is back to the old version already.
        rolled_back: bool,
        /// The failure.
        #[source]
        source: JournalError,
    },
    /// The test hook stopped the swap, as a crash would: nothing was undone.
    #[error("swap to {to} interrupted before step {step}")]
    Interrupted {
        /// The version being installed.
        to: PackVersion,
        /// The step's index (0 = writing the journal).
        step: usize,
    },
}

impl ApplyError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::NotStaged(_) => "not-staged",
            Self::Conflict { .. } => "conflict",
            Self::VerifyDigest { .. } => "digest-mismatch",
            Self::NoPrevious => "no-previous",
            Self::Io(_) => "io",
            Self::Store(e) => e.category(),
            Self::Manifest(e) => e.category(),
            Self::Swap { .. } => "swap-failed",
            Self::Interrupted { .. } => "interrupted",
        }
    }
}

/// What an apply or rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The version the data dir held before.
    pub from: Option<PackVersion>,
    /// The version it holds now.
    pub to: PackVersion,
    /// Files written into the data dir (new and changed ones).
    pub installed: Vec<RelativePath>,
    /// Files of the old version removed from the data dir (kept in the store for rollback).
    pub removed: Vec<RelativePath>,
    /// Preserved files written because they were absent.
    pub preserved_written: Vec<RelativePath>,
    /// Files already in the data dir with exactly the new version's content, now owned by it.
    pub adopted: Vec<RelativePath>,
    /// Files left as they were.
    pub unchanged: usize,
}

/// The hook type of [`PackStore::apply_with_hook`]: called before each step; an error stops the
/// swap there as a crash would.
pub type StepHook<'h> = dyn FnMut(usize, SwapStep<'_>) -> Result<(), ()> + 'h;

/// A swap planned against the data dir and checked, ready to run: the slow parts (the diff, the
/// checks of the data dir, the verification of files staged by an earlier process) are done, so
/// running it ([`PackStore::swap`]) is only renames and a few fsyncs. Made by
/// [`PackStore::plan_apply`] and [`PackStore::plan_rollback`] while the server still runs.
#[derive(Debug)]
#[must_use = "a planned swap does nothing until it is run with PackStore::swap"]
pub struct PlannedSwap {
    journal: Journal,
    report: ApplyReport,
    root: PathBuf,
    /// The files under each of `journal.install_dirs`, installed one by one instead should
    /// something appear at the directory's place before the swap.
    dir_files: Vec<Vec<RelativePath>>,
}

impl PlannedSwap {
    /// What the swap will do.
    pub fn report(&self) -> &ApplyReport {
        &self.report
    }

    /// The version the swap installs.
    pub fn to(&self) -> &PackVersion {
        &self.journal.to
    }

    /// The version the swap replaces.
    pub fn from(&self) -> Option<&PackVersion> {
        self.journal.from.as_ref()
    }
}

impl PackStore<'_> {
    /// Applies a staged pack: the data dir ends up holding exactly its managed files, the files of
    /// the version it replaces are moved into the store (the previous version, for rollback), files
    /// no version owns are never touched, and `preserve` files are written only where absent.
    /// Refuses, before changing anything, when a file no version owns is in the way. The caller
    /// must have stopped the server and hold the data dir's lock. [`PackStore::plan_apply`] and
    /// [`PackStore::swap`] are its two halves, for a caller that stops the server in between.
    pub fn apply(&mut self, staged: StagedPack, preserve: &Preserve) -> Result<ApplyReport, ApplyError> {
        self.apply_with_hook(staged, preserve, &mut |_, _| Ok(()))
    }

    /// [`PackStore::apply`] with a hook called before every step of the swap; for crash tests.
    #[doc(hidden)]
    pub fn apply_with_hook(
        &mut self,
        staged: StagedPack,
        preserve: &Preserve,
        hook: &mut StepHook<'_>,
    ) -> Result<ApplyReport, ApplyError> {
        let planned = self.plan_apply(staged, preserve)?;
        self.swap_with_hook(planned, hook)
    }

    /// Plans the swap to a staged pack and checks everything it can before the swap (the server
    /// may run meanwhile): the diff, what is in the way in the data dir. Files staged by this
    /// process were verified while staged and are not read again. Changes nothing in the data dir.
    pub fn plan_apply(&self, staged: StagedPack, preserve: &Preserve) -> Result<PlannedSwap, ApplyError> {
        let to = staged.manifest.version.clone();
        if staged.root != self.layout.root() || !self.layout.manifest_file(&to).is_file() {
            return Err(ApplyError::NotStaged(to));
        }
        let from = match &self.state.current {
            Some(v) => Some((v.clone(), self.read_manifest(v)?)),
            None => None,
        };
        let next_state = StoreState {
            current: Some(to.clone()),
            previous: from.as_ref().map(|(v, _)| v.clone()),
            preserve: preserve.patterns().to_vec(),
            source: staged.source.clone(),
            origin: staged.origin.clone(),
            previous_origin: self.state.current.as_ref().and(self.state.origin.clone()),
        };
        // The proof that stage hashed every file it wrote: nothing to read again.
        let _: super::store::Verified = staged.proof;
        self.plan_swap(from, &staged.manifest, preserve, next_state, false)
    }

    /// Goes back to the previous version, from the store alone (no network). Its files are
    /// verified before anything changes; the current version becomes the previous one.
    pub fn rollback(&mut self) -> Result<ApplyReport, ApplyError> {
        self.rollback_with_hook(&mut |_, _| Ok(()))
    }

    /// [`PackStore::rollback`] with a step hook; for crash tests.
    #[doc(hidden)]
    pub fn rollback_with_hook(&mut self, hook: &mut StepHook<'_>) -> Result<ApplyReport, ApplyError> {
        let planned = self.plan_rollback()?;
        self.swap_with_hook(planned, hook)
    }

    /// Plans the swap back to the previous version and verifies every file it will install from
    /// the store (written by an earlier swap, perhaps by an earlier process). Changes nothing in
    /// the data dir.
    pub fn plan_rollback(&self) -> Result<PlannedSwap, ApplyError> {
        let (Some(current), Some(previous)) = (self.state.current.clone(), self.state.previous.clone()) else {
            return Err(ApplyError::NoPrevious);
        };
        let from = self.read_manifest(&current)?;
        let to = self.read_manifest(&previous)?;
        let preserve = Preserve::new(&self.state.preserve)?;
        let next_state = StoreState {
            current: Some(previous),
            previous: Some(current.clone()),
            preserve: self.state.preserve.clone(),
            // Not recorded for the previous version: the next fetch of any source stages it.
            source: None,
            origin: self.state.previous_origin.clone(),
            previous_origin: self.state.origin.clone(),
        };
        self.plan_swap(Some((current, from)), &to, &preserve, next_state, true)
    }

    fn plan_swap(
        &self,
        from: Option<(PackVersion, PackManifest)>,
        to: &PackManifest,
        preserve: &Preserve,
        next_state: StoreState,
        verify: bool,
    ) -> Result<PlannedSwap, ApplyError> {
        let (journal, report) = plan(&self.layout, from.as_ref(), to, preserve, next_state)?;
        if verify {
            verify_sources(&self.layout, &journal, to)?;
        }
        clear_stale_displace_targets(&self.layout, &journal)?;
        let mut journal = journal;
        let dir_files = group_install_dirs(&self.layout, &mut journal)?;
        Ok(PlannedSwap { journal, report, root: self.layout.root().to_owned(), dir_files })
    }

    /// Runs a planned swap: the journal, the renames, the commit (`state.json` replaced), then the
    /// cleanup the server need not wait for. This is the only part during which the server must be
    /// stopped. Refuses a plan made for another store or before another swap changed this one.
    pub fn swap(&mut self, planned: PlannedSwap) -> Result<ApplyReport, ApplyError> {
        self.swap_with_hook(planned, &mut |_, _| Ok(()))
    }

    /// [`PackStore::swap`] with a step hook; for crash tests.
    #[doc(hidden)]
    pub fn swap_with_hook(&mut self, planned: PlannedSwap, hook: &mut StepHook<'_>) -> Result<ApplyReport, ApplyError> {
        let PlannedSwap { mut journal, report, root, dir_files } = planned;
        if root != self.layout.root() || journal.from != self.state.current {
            return Err(ApplyError::NotStaged(journal.to));
        }
        // The server ran since the plan: a directory it made where the plan found none gets the
        // pack's files one by one, once checked as the plan checks any existing directory.
        let (mut dirs, mut one_by_one) = (Vec::with_capacity(journal.install_dirs.len()), Vec::new());
        let displaced: BTreeSet<&str> = journal.displace.iter().map(RelativePath::as_str).collect();
        let mut dirs_ok = HashSet::new();
        for (dir, files) in std::mem::take(&mut journal.install_dirs).into_iter().zip(dir_files) {
            if exists(&dir.under(self.layout.data())).map_err(|e| ApplyError::Store(StoreError::Recover(e)))? {
                for file in &files {
                    check_parents(self.layout.data(), file, &displaced, &mut dirs_ok)?;
                    if exists(&file.under(self.layout.data())).map_err(|e| ApplyError::Store(StoreError::Recover(e)))? {
                        return Err(ApplyError::Conflict {
                            path: file.clone(),
                            reason: "a file no pack version owns appeared where the new version puts one",
                        });
                    }
                }
                one_by_one.extend(files);
            } else {
                dirs.push(dir);
            }
        }
        journal.install.extend(one_by_one);
        journal.install_dirs = dirs;
        let mut step = 0usize;
        let mut at = |s: SwapStep<'_>| -> Result<(), ApplyError> {
            let index = step;
            step += 1;
            hook(index, s).map_err(|()| ApplyError::Interrupted { to: journal.to.clone(), step: index })
        };
        // The swap proper starts here and ends at "pack swapped in" (bench/pack_apply.py measures
        // between the two lines).
        tracing::info!(
            from = journal.from.as_ref().map(PackVersion::as_str),
            to = %journal.to,
            install = journal.install.len(),
            install_dirs = journal.install_dirs.len(),
            displace = journal.displace.len(),
            "pack staged and verified; swapping it in"
        );
        at(SwapStep::WriteJournal)?;
        journal.write(&self.layout).map_err(|source| ApplyError::Swap {
            to: journal.to.clone(),
            rolled_back: true,
            source,
        })?;
        match run_steps(&self.layout, &journal, &mut at) {
            Ok(()) => {}
            Err(StepError::Hook(e)) => return Err(e),
            Err(StepError::Io(source)) => {
                let rolled_back = match journal.undo(&self.layout).and_then(|()| Journal::remove(&self.layout)) {
                    Ok(()) => true,
                    Err(undo) => {
                        tracing::error!(error = %undo, "undoing a failed pack swap failed; the next open retries");
                        false
                    }
                };
                return Err(ApplyError::Swap { to: journal.to.clone(), rolled_back, source });
            }
        }
        self.state = journal.next_state.clone();
        tracing::info!(to = %journal.to, "pack swapped in");
        // Committed: what follows is cleanup, which the next open also finishes.
        let cleanup = (|| -> Result<(), StepError> {
            // Cleanup before the journal goes, so a crash in between leaves it to the next open.
            at(SwapStep::Cleanup).map_err(StepError::Hook)?;
            journal.finish(&self.layout)?;
            at(SwapStep::RemoveJournal).map_err(StepError::Hook)?;
            Journal::remove(&self.layout)?;
            Ok(())
        })();
        match cleanup {
            Ok(()) => {}
            Err(StepError::Hook(e)) => return Err(e),
            Err(StepError::Io(e)) => {
                tracing::warn!(error = %e, "pack swap committed; its cleanup failed and is retried on the next open")
            }
        }
        Ok(report)
    }
}

enum StepError {
    Hook(ApplyError),
    Io(JournalError),
}

impl From<JournalError> for StepError {
    fn from(e: JournalError) -> Self {
        Self::Io(e)
    }
}

/// The swap proper, up to and including the commit.
fn run_steps(
    layout: &Layout,
    journal: &Journal,
    at: &mut dyn FnMut(SwapStep<'_>) -> Result<(), ApplyError>,
) -> Result<(), StepError> {
    let data = layout.data();
    let mut touched: Vec<PathBuf> = Vec::new();
    if let Some(from) = &journal.from {
        let from_files = layout.files_dir(from);
        for path in &journal.displace {
            at(SwapStep::Displace(path)).map_err(StepError::Hook)?;
            let source = path.under(data);
            let kept = path.under(&from_files);
            journal::create_parent(&kept)?;
            match fs::rename(&source, &kept) {
                Ok(()) => {}
                // Already gone (deleted by hand): nothing to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(journal::io_err("rename", &source)(e).into()),
            }
            touched.extend(journal::dirs_within(&kept, layout.root()));
            touched.extend(journal::dirs_within(&source, data));
        }
    }
    let to_files = layout.files_dir(&journal.to);
    for path in &journal.install_dirs {
        at(SwapStep::InstallDir(path)).map_err(StepError::Hook)?;
        let staged = path.under(&to_files);
        let target = path.under(data);
        journal::create_parent(&target)?;
        rename_no_replace(&staged, &target).map_err(journal::io_err("rename", &staged))?;
        touched.extend(journal::dirs_within(&staged, layout.root()));
        touched.extend(journal::dirs_within(&target, data));
    }
    for path in &journal.install {
        at(SwapStep::Install(path)).map_err(StepError::Hook)?;
        let staged = path.under(&to_files);
        let target = path.under(data);
        journal::create_parent(&target)?;
        if fs::symlink_metadata(&target).map(|m| m.is_dir()).unwrap_or(false) {
            remove_empty_tree(&target)?;
        }
        fs::rename(&staged, &target).map_err(journal::io_err("rename", &staged))?;
        touched.extend(journal::dirs_within(&staged, layout.root()));
        touched.extend(journal::dirs_within(&target, data));
    }
    for entry in &journal.preserve_writes {
        at(SwapStep::WritePreserved(&entry.path)).map_err(StepError::Hook)?;
        let target = entry.path.under(data);
        if exists(&target)? {
            continue;
        }
        let tmp = layout.copy_tmp();
        let staged = entry.path.under(&to_files);
        fs::copy(&staged, &tmp).map_err(journal::io_err("copy", &staged))?;
        fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(journal::io_err("fsync", &tmp))?;
        journal::create_parent(&target)?;
        fs::rename(&tmp, &target).map_err(journal::io_err("rename", &tmp))?;
        touched.extend(journal::dirs_within(&target, data));
    }
    at(SwapStep::SyncDirs).map_err(StepError::Hook)?;
    journal::sync_all_dirs(touched)?;
    at(SwapStep::Commit).map_err(StepError::Hook)?;
    let bytes = serde_json::to_vec_pretty(&journal.next_state)
        .map_err(|source| JournalError::Parse { path: layout.state_file(), source })?;
    write_atomic(&layout.state_file(), &bytes)?;
    Ok(())
}

/// Whether every file under `dir` is one the swap moves away (and there is no link).
fn holds_only(data: &Path, dir: &Path, displaced: &BTreeSet<&str>) -> bool {
    match tree_files(dir) {
        Ok(Some(tree)) => tree.files.iter().all(|path| relative_in(data, path, displaced)),
        _ => false,
    }
}

/// The regular files of a tree, and whether it has an empty directory.
struct TreeFiles {
    files: Vec<PathBuf>,
    empty_dir: bool,
}

/// The tree at `dir`; `None` when it holds anything but regular files and directories (a link).
fn tree_files(dir: &Path) -> Result<Option<TreeFiles>, IoError> {
    let mut tree = TreeFiles { files: Vec::new(), empty_dir: false };
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        let read_err = |source| IoError { op: "read directory", path: next.clone(), source };
        let mut empty = true;
        for entry in fs::read_dir(&next).map_err(read_err)? {
            empty = false;
            let entry = entry.map_err(read_err)?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|source| IoError { op: "stat", path: path.clone(), source })?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                tree.files.push(path);
            } else {
                return Ok(None);
            }
        }
        tree.empty_dir |= empty;
    }
    Ok(Some(tree))
}

/// Whether `path`, relative to `root`, is in `set`.
fn relative_in(root: &Path, path: &Path, set: &BTreeSet<&str>) -> bool {
    path.strip_prefix(root).ok().and_then(Path::to_str).is_some_and(|rel| set.contains(rel))
}

/// Removes a tree of empty directories; fails (leaving the rest) when anything else is in it.
fn remove_empty_tree(dir: &Path) -> Result<(), JournalError> {
    for entry in fs::read_dir(dir).map_err(journal::io_err("read directory", dir))? {
        let path = entry.map_err(journal::io_err("read directory", dir))?.path();
        remove_empty_tree(&path)?;
    }
    fs::remove_dir(dir).map_err(journal::io_err("remove empty directory", dir))
}

/// Diffs the versions and checks the data dir: what to move where, and what the report will say.
/// Changes nothing.
fn plan(
    layout: &Layout,
    from: Option<&(PackVersion, PackManifest)>,
    to: &PackManifest,
    preserve: &Preserve,
    next_state: StoreState,
) -> Result<(Journal, ApplyReport), ApplyError> {
    let data = layout.data();
    let to_files = layout.files_dir(&to.version);
    let stat_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ApplyError::Io(IoError { op: "stat", path, source })
    };
    let old_files: &[FileEntry] = from.map(|(_, m)| m.files.as_slice()).unwrap_or(&[]);
    let d = diff(old_files, &to.files, preserve);

    let mut displace = Vec::new();
    // Whether each ancestor directory of a displaced file is a real directory: a rename through a link
    // would move a file from outside the data dir into the store (and collection would delete it).
    let mut real_dirs: HashMap<&str, bool> = HashMap::new();
    for entry in d.changed.iter().chain(&d.removed) {
        for ancestor in entry.path.ancestors() {
            let real = match real_dirs.get(ancestor) {
                Some(real) => *real,
                None => {
                    let dir = data.join(ancestor);
                    let real = match fs::symlink_metadata(&dir) {
                        Ok(meta) => meta.is_dir(),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                        Err(e) => return Err(stat_err(&dir)(e)),
                    };
                    real_dirs.insert(ancestor, real);
                    real
                }
            };
            if !real {
                let path = super::path::sanitize_path(ancestor).unwrap_or_else(|_| entry.path.clone());
                return Err(ApplyError::Conflict {
                    path,
                    reason: "a link or file is where the pack has a directory, and packs never follow links",
                });
            }
        }
        match fs::symlink_metadata(entry.path.under(data)) {
            Ok(meta) if meta.is_dir() => {
                return Err(ApplyError::Conflict {
                    path: entry.path.clone(),
                    reason: "a directory is where the pack has a file",
                });
            }
            Ok(_) => displace.push(entry.path.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(stat_err(&entry.path.under(data))(e)),
        }
    }
    let displaced: BTreeSet<&str> = displace.iter().map(RelativePath::as_str).collect();
    let mut dirs_ok = HashSet::new();
    let mut check_parents = |path: &RelativePath| check_parents(data, path, &displaced, &mut dirs_ok);

    let mut install = Vec::new();
    let mut discard = Vec::new();
    let mut adopted = Vec::new();
    for entry in &d.added {
        check_parents(&entry.path)?;
        let target = entry.path.under(data);
        match fs::symlink_metadata(&target) {
            // Absent, or under a file of the old version that this swap moves away first.
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
                install.push(entry.path.clone())
            }
            Err(e) => return Err(stat_err(&target)(e)),
            // A directory of the old version's files, all moved away first (a directory that
            // becomes a file); install removes the emptied directories.
            Ok(meta) if meta.is_dir() && holds_only(data, &target, &displaced) => install.push(entry.path.clone()),
            Ok(meta) if meta.is_file() && hash_file(&target).ok() == Some((entry.sha256, entry.size)) => {
                adopted.push(entry.path.clone());
                discard.push(entry.path.clone());
            }
            Ok(_) => {
                return Err(ApplyError::Conflict {
                    path: entry.path.clone(),
                    reason: "a file no pack version owns is where the new version puts one",
                });
            }
        }
    }
    for entry in &d.changed {
        check_parents(&entry.path)?;
        install.push(entry.path.clone());
    }
    let mut unchanged = 0;
    for entry in &d.unchanged {
        let target = entry.path.under(data);
        let present = exists(&target).map_err(|e| ApplyError::Store(StoreError::Recover(e)))?;
        if !present && exists(&entry.path.under(&to_files)).map_err(|e| ApplyError::Store(StoreError::Recover(e)))? {
            // Deleted by hand from the data dir: the new version puts it back.
            check_parents(&entry.path)?;
            install.push(entry.path.clone());
        } else {
            unchanged += 1;
            // Staging writes no copy of an unchanged file the data dir holds; a copy made anyway
            // (a plain archive, a manifest late in the archive) is deleted after the commit.
            if exists(&entry.path.under(&to_files)).map_err(|e| ApplyError::Store(StoreError::Recover(e)))? {
                discard.push(entry.path.clone());
            }
        }
    }
    let mut preserve_writes = Vec::new();
    for entry in &d.preserved {
        let absent = !exists(&entry.path.under(data)).map_err(|e| ApplyError::Store(StoreError::Recover(e)))?;
        // A previous version's store directory may not hold it; then there is nothing to write.
        let source = exists(&entry.path.under(&to_files)).map_err(|e| ApplyError::Store(StoreError::Recover(e)))?;
        if absent && source {
            check_parents(&entry.path)?;
            preserve_writes.push(entry.clone());
        }
    }
    let report = ApplyReport {
        from: from.map(|(v, _)| v.clone()),
        to: to.version.clone(),
        installed: install.clone(),
        removed: d.removed.iter().map(|e| e.path.clone()).collect(),
        preserved_written: preserve_writes.iter().map(|e| e.path.clone()).collect(),
        adopted,
        unchanged,
    };
    let journal = Journal {
        from: from.map(|(v, _)| v.clone()),
        to: to.version.clone(),
        displace,
        install_dirs: Vec::new(),
        install,
        preserve_writes,
        discard,
        next_state,
    };
    Ok((journal, report))
}

/// Moves into `journal.install_dirs` the outermost directories of the new version under which the
/// data dir has nothing at all: each is installed by one rename of its staged directory rather
/// than a rename per file (a first apply of 20,000 files becomes a few renames). A directory
/// qualifies only if every file staged under it is one the swap installs (no preserved file, whose
/// staged copy the store keeps, and nothing else), checked by reading the staged tree. Returns the
/// files each directory covers, taken out of `journal.install`.
fn group_install_dirs(layout: &Layout, journal: &mut Journal) -> Result<Vec<Vec<RelativePath>>, ApplyError> {
    let data = layout.data();
    let to_files = layout.files_dir(&journal.to);
    // Directories holding a staged file the swap does not move: never moved whole.
    let mut pinned: BTreeSet<&str> = BTreeSet::new();
    for path in journal.preserve_writes.iter().map(|e| &e.path).chain(&journal.discard) {
        pinned.extend(path.ancestors());
    }
    let mut absent: HashMap<String, bool> = HashMap::new();
    let mut chosen: Vec<String> = Vec::new();
    let mut covered: HashMap<String, Vec<RelativePath>> = HashMap::new();
    let mut rest = Vec::new();
    for path in &journal.install {
        let mut dir_for = None;
        for ancestor in path.ancestors() {
            let is_absent = match absent.get(ancestor) {
                Some(a) => *a,
                None => {
                    let a = !exists(&data.join(ancestor)).map_err(|e| ApplyError::Store(StoreError::Recover(e)))?;
                    absent.insert(ancestor.to_owned(), a);
                    a
                }
            };
            if is_absent && !pinned.contains(ancestor) {
                dir_for = Some(ancestor);
                break;
            }
        }
        match dir_for {
            Some(dir) => {
                if !covered.contains_key(dir) {
                    chosen.push(dir.to_owned());
                }
                covered.entry(dir.to_owned()).or_default().push(path.clone());
            }
            None => rest.push(path.clone()),
        }
    }
    let mut dirs = Vec::new();
    let mut dir_files = Vec::new();
    for dir in chosen {
        let files = covered.remove(&dir).unwrap_or_default();
        let wanted: BTreeSet<&str> = files.iter().map(RelativePath::as_str).collect();
        let staged = to_files.join(&dir);
        let whole = match super::path::sanitize_path(&dir) {
            Ok(relative) if holds_exactly(&to_files, &staged, &wanted)? => Some(relative),
            _ => None,
        };
        match whole {
            Some(relative) => {
                dirs.push(relative);
                dir_files.push(files);
            }
            None => rest.extend(files),
        }
    }
    journal.install = rest;
    journal.install_dirs = dirs;
    Ok(dir_files)
}

/// Whether the staged tree at `dir` (under `root`) holds regular files and directories only, no
/// empty directory (which the pack does not list, so the data dir should not get it), and its files
/// are exactly `wanted` (paths relative to `root`).
fn holds_exactly(root: &Path, dir: &Path, wanted: &BTreeSet<&str>) -> Result<bool, ApplyError> {
    Ok(match tree_files(dir)? {
        Some(tree) => {
            !tree.empty_dir
                && tree.files.len() == wanted.len()
                && tree.files.iter().all(|path| relative_in(root, path, wanted))
        }
        None => false,
    })
}

/// Checks that every ancestor directory of `path` in the data dir is a real directory or absent (a
/// file of the old version the swap moves away first excepted): a rename through a link or a file
/// is refused. `dirs_ok` remembers the ancestors already found fine.
fn check_parents(
    data: &Path,
    path: &RelativePath,
    displaced: &BTreeSet<&str>,
    dirs_ok: &mut HashSet<String>,
) -> Result<(), ApplyError> {
    for ancestor in path.ancestors() {
        if displaced.contains(ancestor) || dirs_ok.contains(ancestor) {
            continue;
        }
        let dir = data.join(ancestor);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(_) => {
                let path = super::path::sanitize_path(ancestor).unwrap_or_else(|_| path.clone());
                return Err(ApplyError::Conflict {
                    path,
                    reason: "a file or link is where the pack needs a directory",
                });
            }
            Err(source) => return Err(ApplyError::Io(IoError { op: "stat", path: dir, source })),
        }
        dirs_ok.insert(ancestor.to_owned());
    }
    Ok(())
}

/// Renames `from` to `to` unless something is at `to` (`renameat2(RENAME_NOREPLACE)`): a plain
/// rename would silently replace an empty directory there. A filesystem without the flag gets a
/// plain rename, after the check the caller made.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => fs::rename(from, to),
        Err(errno) => Err(errno.into()),
    }
}

/// Hashes every file the swap will install from the store; any mismatch stops the apply before
/// the data dir changes.
fn verify_sources(layout: &Layout, journal: &Journal, to: &PackManifest) -> Result<(), ApplyError> {
    let to_files = layout.files_dir(&to.version);
    let expected = journal.install.iter().filter_map(|p| to.file(p)).chain(&journal.preserve_writes);
    for entry in expected {
        let staged = entry.path.under(&to_files);
        match hash_file(&staged) {
            Ok((sha256, size)) if sha256 == entry.sha256 && size == entry.size => {}
            Ok((sha256, size)) => {
                return Err(ApplyError::VerifyDigest {
                    path: entry.path.clone(),
                    reason: format!(
                        "sha256 {sha256} size {size}, the manifest says sha256 {} size {}",
                        entry.sha256, entry.size
                    ),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ApplyError::VerifyDigest {
                    path: entry.path.clone(),
                    reason: "missing from the store".into(),
                });
            }
            Err(source) => return Err(ApplyError::Io(IoError { op: "read", path: staged, source })),
        }
    }
    Ok(())
}

/// Before the journal exists: a stale copy in the old version's store directory where a displaced
/// file will go would make undo ambiguous, so it goes. (The current version's store directory
/// holds no managed file: those live in the data dir.)
fn clear_stale_displace_targets(layout: &Layout, journal: &Journal) -> Result<(), ApplyError> {
    let Some(from) = &journal.from else { return Ok(()) };
    let from_files = layout.files_dir(from);
    for path in &journal.displace {
        let kept = path.under(&from_files);
        match fs::remove_file(&kept) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(ApplyError::Io(IoError { op: "remove", path: kept, source })),
        }
    }
    Ok(())
}
