//! The consistent snapshot: bring the capture mirror up to date, pause the server's saving over RCON, flush,
//! copy what changed since, and resume saving on every path, so compression and upload happen from the mirror
//! with the server saving normally.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use globset::{Glob, GlobSet, GlobSetBuilder};
use prometheus::IntGauge;

use super::mirror;
use crate::rcon::{Rcon, RconError};
use crate::server::properties::parse_properties;

/// Where earlier versions staged a fresh copy per backup, relative to the data directory; removed when found.
pub const STAGING_DIR: &str = ".atlas/backup-staging";

/// What to capture besides the world directories.
#[derive(Debug, Clone, Default)]
pub struct CaptureRules {
    /// Globs (relative to the data directory) of extra files to capture.
    pub include: Vec<String>,
    /// Globs of files left out, worlds included.
    pub exclude: Vec<String>,
}

/// A finished capture in local staging.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The mirror directory; it holds the captured paths in the data directory's layout.
    pub dir: PathBuf,
    /// The world directories captured (`world`, `world_nether`, `world_the_end`).
    pub worlds: Vec<String>,
    /// Regular files captured.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// How long saving was off (from `save-off` sent to `save-on` answered); `None` without RCON.
    pub save_off_window: Option<Duration>,
}

/// Why a snapshot failed. Saving has been turned back on (or its failure logged) in every case.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("read {path}")]
    ReadProperties { path: PathBuf, source: io::Error },
    #[error("the world directory {path} does not exist")]
    MissingWorld { path: PathBuf },
    #[error("invalid glob {glob:?}")]
    InvalidGlob { glob: String, source: globset::Error },
    #[error("RCON save-off")]
    SaveOff { source: RconError },
    #[error("RCON save-all flush")]
    Flush { source: RconError },
    #[error("the server did not confirm the save within {timeout:?}")]
    FlushTimeout { timeout: Duration },
    #[error("the server did not confirm the save: {reply:?}")]
    FlushNotConfirmed { reply: String },
    #[error("RCON save-on (saving may still be off on the server)")]
    SaveOn { source: RconError },
    #[error("write the saving-off marker {path}")]
    WriteMarker { path: PathBuf, source: io::Error },
    #[error("copy {path} to staging")]
    Copy { path: PathBuf, source: io::Error },
    #[error("the capture thread failed")]
    CaptureThread { source: tokio::task::JoinError },
}

impl SnapshotError {
    /// A short static label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::ReadProperties { .. } | Self::MissingWorld { .. } => "world_missing",
            Self::InvalidGlob { .. } => "invalid_spec",
            Self::SaveOff { .. } | Self::Flush { .. } | Self::SaveOn { .. } => "rcon",
            Self::FlushTimeout { .. } | Self::FlushNotConfirmed { .. } => "flush",
            Self::Copy { .. } => "capture",
            Self::WriteMarker { .. } => "local_io",
            Self::CaptureThread { .. } => "internal",
        }
    }
}

/// The world directories of the server in `data_dir`: `level-name` from `server.properties` (default
/// `world`), which must exist, plus its `_nether` and `_the_end` siblings when present.
pub fn world_dirs(data_dir: &Path) -> Result<Vec<String>, SnapshotError> {
    let path = data_dir.join("server.properties");
    let level = match fs::read_to_string(&path) {
        Ok(text) => parse_properties(&text).get("level-name").map(|l| l.trim().to_owned()).unwrap_or_default(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(SnapshotError::ReadProperties { path, source }),
    };
    let level = if level.is_empty() { "world".to_owned() } else { level };
    if !data_dir.join(&level).is_dir() {
        return Err(SnapshotError::MissingWorld { path: data_dir.join(&level) });
    }
    let mut worlds = vec![level.clone()];
    for suffix in ["_nether", "_the_end"] {
        let dir = format!("{level}{suffix}");
        if data_dir.join(&dir).is_dir() {
            worlds.push(dir);
        }
    }
    Ok(worlds)
}

fn glob_set(globs: &[String]) -> Result<GlobSet, SnapshotError> {
    let mut builder = GlobSetBuilder::new();
    for glob in globs {
        builder.add(Glob::new(glob).map_err(|source| SnapshotError::InvalidGlob { glob: glob.clone(), source })?);
    }
    builder.build().map_err(|source| SnapshotError::InvalidGlob { glob: globs.join(","), source })
}

/// Present while this program holds the server's saving off, relative to the data directory: written before
/// `save-off`, removed once `save-on` succeeded. Found while saving is already off, it says an earlier backup's
/// `save-on` failed, so turning saving back on is ours to do (and nobody else's choice is overridden).
pub const SAVING_OFF_MARKER: &str = ".atlas/backup-saving-off";

/// Waits between `save-on` attempts: a server busy with a long tick or a dropped connection gets a few seconds.
const SAVE_ON_BACKOFF: [Duration; 3] = [Duration::from_millis(500), Duration::from_secs(1), Duration::from_secs(2)];

/// Turns saving back on: now with [`SaveOnGuard::restore`], or from a spawned task when dropped (the snapshot
/// future was cancelled). Success removes the marker and clears the gauge; failure leaves both set.
struct SaveOnGuard {
    rcon: Option<Rcon>,
    marker: PathBuf,
    saving_off: Option<IntGauge>,
}

impl SaveOnGuard {
    /// Saving is someone else's business after all: no `save-on`, no marker, gauge cleared.
    fn disarm(&mut self) {
        self.rcon = None;
        remove_marker(&self.marker);
        if let Some(gauge) = &self.saving_off {
            gauge.set(0);
        }
    }

    async fn restore(mut self) -> Result<(), SnapshotError> {
        match self.rcon.take() {
            Some(rcon) => resume_saving(rcon, self.marker.clone(), self.saving_off.take()).await,
            None => Ok(()),
        }
    }
}

impl Drop for SaveOnGuard {
    fn drop(&mut self) {
        if let Some(rcon) = self.rcon.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (marker, gauge) = (self.marker.clone(), self.saving_off.take());
            runtime.spawn(async move {
                if let Err(error) = resume_saving(rcon, marker, gauge).await {
                    tracing::error!(%error, category = error.category(), "turning saving back on failed");
                }
            });
        }
    }
}

/// Sends `save-on`, retrying with backoff; on success removes the marker and clears the gauge.
async fn resume_saving(rcon: Rcon, marker: PathBuf, saving_off: Option<IntGauge>) -> Result<(), SnapshotError> {
    let mut waits = SAVE_ON_BACKOFF.iter();
    loop {
        match rcon.command("save-on").await {
            Ok(_) => {
                remove_marker(&marker);
                if let Some(gauge) = &saving_off {
                    gauge.set(0);
                }
                return Ok(());
            }
            Err(error) => match waits.next() {
                Some(wait) => {
                    tracing::warn!(%error, category = error.category(), retry_in_ms = wait.as_millis() as u64, "RCON save-on failed; retrying");
                    tokio::time::sleep(*wait).await;
                }
                // The marker stays: the next backup finds saving off, knows it was us, and turns it back on.
                None => return Err(SnapshotError::SaveOn { source: error }),
            },
        }
    }
}

fn remove_marker(marker: &Path) {
    match fs::remove_file(marker) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // Harmless but worth a line: the next backup would turn saving on even if an admin had turned it off.
        Err(error) => tracing::warn!(%error, path = %marker.display(), "removing the saving-off marker failed"),
    }
}

/// Stops a mirror pass still running on its blocking thread when the snapshot future is dropped.
struct StopOnDrop(mirror::StopFlag);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Captures the worlds and included files of `data_dir` into `mirror` (see [`super::mirror`]): a first pass
/// with the server saving normally brings the mirror up to date; with `rcon`, saving is then turned off and
/// flushed (waiting for "Saved the game" up to `flush_timeout`), a second pass copies only what changed since,
/// and saving is turned back on (with retries), on every path. If saving was already off before, it is left
/// off, unless [`SAVING_OFF_MARKER`] says an earlier backup turned it off and failed to turn it back on.
/// `saving_off` is 1 while saving is held off and stays 1 when `save-on` failed.
pub async fn snapshot(
    data_dir: &Path,
    mirror: &Path,
    rules: &CaptureRules,
    rcon: Option<&Rcon>,
    flush_timeout: Duration,
    saving_off: Option<&IntGauge>,
) -> Result<Capture, SnapshotError> {
    let worlds = world_dirs(data_dir)?;
    let selection = mirror::Selection {
        worlds: worlds.clone(),
        include: glob_set(&rules.include)?,
        exclude: glob_set(&rules.exclude)?,
    };
    let stop = StopOnDrop(mirror::StopFlag::default());
    let pass = || {
        let (data_dir, mirror, selection, stop) =
            (data_dir.to_owned(), mirror.to_owned(), selection.clone(), stop.0.clone());
        async move {
            tokio::task::spawn_blocking(move || mirror::sync(&data_dir, &mirror, &selection, &stop))
                .await
                .map_err(|source| SnapshotError::CaptureThread { source })?
        }
    };
    let started = Instant::now();
    let first = pass().await?;
    tracing::info!(
        files = first.files,
        copied = first.copied,
        copied_bytes = first.copied_bytes,
        reflinked = first.reflinked,
        removed = first.removed,
        took_ms = started.elapsed().as_millis() as u64,
        "backup mirror brought up to date with saving on"
    );
    let Some(rcon) = rcon else {
        return Ok(Capture {
            dir: mirror.to_owned(),
            worlds,
            files: first.files,
            bytes: first.bytes,
            save_off_window: None,
        });
    };

    let marker = data_dir.join(SAVING_OFF_MARKER);
    let ours_before = marker.exists();
    // Written before `save-off`, so even a crash right after it leaves the marker behind.
    let write = |path: &Path| {
        fs::create_dir_all(path.parent().unwrap_or(data_dir))?;
        fs::write(path, std::process::id().to_string())
    };
    write(&marker).map_err(|source| SnapshotError::WriteMarker { path: marker.clone(), source })?;
    if let Some(gauge) = saving_off {
        gauge.set(1);
    }
    let started = Instant::now();
    let mut guard = SaveOnGuard { rcon: Some(rcon.clone()), marker, saving_off: saving_off.cloned() };
    let captured = async {
        let reply = rcon.command("save-off").await.map_err(|source| SnapshotError::SaveOff { source })?;
        if reply.contains("already turned off") {
            if ours_before {
                tracing::warn!(
                    "saving was still off after an earlier backup's failed save-on; it is turned back on after this one"
                );
            } else {
                // Someone else turned saving off; turning it back on would be a surprise.
                guard.disarm();
            }
        }
        // A big world's flush outlasts the handle's per-command timeout (the runner's is a few seconds).
        let reply =
            rcon.command_with_timeout("save-all flush", flush_timeout).await.map_err(|source| match source {
                RconError::Timeout { operation: "command", .. } => {
                    SnapshotError::FlushTimeout { timeout: flush_timeout }
                }
                source => SnapshotError::Flush { source },
            })?;
        if !reply.contains("Saved the game") {
            return Err(SnapshotError::FlushNotConfirmed { reply });
        }
        pass().await
    }
    .await;
    let resumed = guard.restore().await;
    let window = started.elapsed();
    if let (Err(_), Err(error)) = (&captured, &resumed) {
        // The capture's error is the one returned; this one must not vanish: saving may still be off.
        tracing::error!(%error, category = error.category(), "turning saving back on failed");
    }
    let second = captured?;
    resumed?;
    tracing::info!(
        window_ms = window.as_millis() as u64,
        files = second.files,
        bytes = second.bytes,
        copied = second.copied,
        copied_bytes = second.copied_bytes,
        "world captured with saving off"
    );
    Ok(Capture {
        dir: mirror.to_owned(),
        worlds,
        files: second.files,
        bytes: second.bytes,
        save_off_window: Some(window),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, path.display().to_string()).unwrap();
    }

    #[tokio::test]
    async fn captures_the_worlds_and_includes_without_excludes() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        fs::write(data.join("server.properties"), "motd=x\nlevel-name=realm\n").unwrap();
        for file in [
            "realm/level.dat",
            "realm/session.lock",
            "realm_nether/DIM-1/region/r.0.0.mca",
            "config/mod.toml",
            "config/cache/big.bin",
            "logs/latest.log",
            ".atlas/state.json",
        ] {
            touch(&data.join(file));
        }
        fs::create_dir_all(data.join("realm/empty")).unwrap();
        let rules = CaptureRules {
            include: vec!["config/**".to_owned()],
            exclude: vec!["**/session.lock".to_owned(), "config/cache/**".to_owned()],
        };
        let staging = data.join(STAGING_DIR).join("one");
        let capture = snapshot(data, &staging, &rules, None, Duration::from_secs(1), None).await.unwrap();
        assert_eq!(capture.worlds, ["realm", "realm_nether"]);
        assert_eq!(capture.files, 3);
        assert!(capture.save_off_window.is_none());
        assert!(staging.join("realm/level.dat").is_file());
        assert!(staging.join("realm/empty").is_dir());
        assert!(staging.join("realm_nether/DIM-1/region/r.0.0.mca").is_file());
        assert!(staging.join("config/mod.toml").is_file());
        assert!(!staging.join("realm/session.lock").exists());
        assert!(!staging.join("config/cache/big.bin").exists());
        assert!(!staging.join("logs").exists() && !staging.join(".atlas").exists());
    }

    #[test]
    fn a_missing_world_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = world_dirs(tmp.path()).unwrap_err();
        assert_eq!(err.category(), "world_missing");
    }
}
