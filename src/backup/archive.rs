//! The archive format: a tar of a captured directory, compressed with zstd, written and read as streams.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// What a finished archive holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Regular files.
    pub files: u64,
    /// Their total size before compression.
    pub raw_bytes: u64,
}

/// Why an archive could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("start the zstd encoder")]
    StartEncoder { source: io::Error },
    #[error("walk {path}")]
    WalkDir { path: PathBuf, source: io::Error },
    #[error("append {path} to the archive")]
    AppendEntry { path: PathBuf, source: io::Error },
    #[error("finish the archive")]
    FinishArchive { source: io::Error },
    #[error("read the archive (corrupt or truncated)")]
    ReadArchive { source: io::Error },
    #[error("the archive holds {path}, outside the backed-up directories")]
    UnexpectedEntry { path: String },
    #[error("extract {path}")]
    ExtractEntry { path: String, source: io::Error },
}

impl ArchiveError {
    /// A short static label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::StartEncoder { .. } | Self::FinishArchive { .. } => "compress",
            Self::WalkDir { .. } | Self::AppendEntry { .. } => "read_capture",
            Self::ReadArchive { .. } | Self::UnexpectedEntry { .. } => "corrupt_archive",
            Self::ExtractEntry { .. } => "extract",
        }
    }
}

/// Writes a zstd-compressed tar of everything under `dir` (names relative to it, in sorted order, symlinks
/// stored as links) into `out`, and returns what it held. Blocking: run it on a blocking thread.
pub fn write_archive<W: Write>(dir: &Path, out: W, level: i32) -> Result<ArchiveStats, ArchiveError> {
    write_archive_counted(dir, out, level, 1, &super::Progress::default())
}

/// [`write_archive`] compressing on `threads` threads (zstd's workers; the output is one ordinary zstd
/// stream either way), adding each file's size to `progress` once it is archived.
pub fn write_archive_counted<W: Write>(
    dir: &Path,
    out: W,
    level: i32,
    threads: u32,
    progress: &super::Progress,
) -> Result<ArchiveStats, ArchiveError> {
    let mut encoder = zstd::Encoder::new(out, level).map_err(|source| ArchiveError::StartEncoder { source })?;
    if threads > 1 {
        encoder.multithread(threads).map_err(|source| ArchiveError::StartEncoder { source })?;
    }
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    let mut stats = ArchiveStats::default();
    append_tree(&mut builder, dir, Path::new(""), &mut stats, progress)?;
    let encoder = builder.into_inner().map_err(|source| ArchiveError::FinishArchive { source })?;
    let mut out = encoder.finish().map_err(|source| ArchiveError::FinishArchive { source })?;
    out.flush().map_err(|source| ArchiveError::FinishArchive { source })?;
    Ok(stats)
}

fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    stats: &mut ArchiveStats,
    progress: &super::Progress,
) -> Result<(), ArchiveError> {
    let dir = root.join(rel);
    let walk = |source| ArchiveError::WalkDir { path: dir.clone(), source };
    let mut entries = fs::read_dir(&dir).map_err(walk)?.collect::<Result<Vec<_>, _>>().map_err(walk)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = rel.join(entry.file_name());
        let path = entry.path();
        let kind = entry.file_type().map_err(|source| ArchiveError::WalkDir { path: path.clone(), source })?;
        let append = |source| ArchiveError::AppendEntry { path: path.clone(), source };
        if kind.is_dir() {
            builder.append_dir(&name, &path).map_err(append)?;
            append_tree(builder, root, &name, stats, progress)?;
        } else {
            let size = if kind.is_file() { entry.metadata().map_err(append)?.len() } else { 0 };
            if kind.is_file() {
                stats.files += 1;
                stats.raw_bytes += size;
            }
            builder.append_path_with_name(&path, &name).map_err(append)?;
            progress.add(size);
        }
    }
    Ok(())
}

/// Reads a zstd tar to its end, checking that it decompresses and parses, and returns what it holds.
pub fn check_archive<R: Read>(input: R) -> Result<ArchiveStats, ArchiveError> {
    let read = |source| ArchiveError::ReadArchive { source };
    let decoder = zstd::Decoder::new(input).map_err(read)?;
    let mut archive = tar::Archive::new(decoder);
    let mut stats = ArchiveStats::default();
    for entry in archive.entries().map_err(read)? {
        let mut entry = entry.map_err(read)?;
        if entry.header().entry_type().is_file() {
            stats.files += 1;
            stats.raw_bytes += io::copy(&mut entry, &mut io::sink()).map_err(read)?;
        }
    }
    // Whatever follows the tar's end marker must still be a complete zstd frame: read it out.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(read)?;
    Ok(stats)
}

/// Extracts a zstd tar into `dest` (which must exist), accepting only entries under one of `roots`
/// (top-level names) and refusing absolute paths and `..`.
pub fn extract_archive<R: Read>(input: R, dest: &Path, roots: &[String]) -> Result<ArchiveStats, ArchiveError> {
    let read = |source| ArchiveError::ReadArchive { source };
    let decoder = zstd::Decoder::new(input).map_err(read)?;
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(false);
    let mut stats = ArchiveStats::default();
    for entry in archive.entries().map_err(read)? {
        let mut entry = entry.map_err(read)?;
        let path = entry.path().map_err(read)?.into_owned();
        let shown = path.display().to_string();
        let mut components = path.components();
        let top_ok = match components.next() {
            Some(Component::Normal(top)) => roots.iter().any(|r| top == r.as_str()),
            _ => false,
        };
        if !top_ok || components.any(|c| !matches!(c, Component::Normal(_))) {
            return Err(ArchiveError::UnexpectedEntry { path: shown });
        }
        if entry.header().entry_type().is_file() {
            stats.files += 1;
            stats.raw_bytes += entry.size();
        }
        let unpacked =
            entry.unpack_in(dest).map_err(|source| ArchiveError::ExtractEntry { path: shown.clone(), source })?;
        if !unpacked {
            return Err(ArchiveError::UnexpectedEntry { path: shown });
        }
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(read)?;
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("world/region")).unwrap();
        fs::write(dir.join("world/level.dat"), b"level").unwrap();
        fs::write(dir.join("world/region/r.0.0.mca"), vec![7u8; 100_000]).unwrap();
    }

    #[test]
    fn round_trips_and_refuses_truncation() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        sample(&src);
        let mut bytes = Vec::new();
        let stats = write_archive(&src, &mut bytes, 3).unwrap();
        assert_eq!(stats, ArchiveStats { files: 2, raw_bytes: 100_005 });
        assert_eq!(check_archive(&bytes[..]).unwrap(), stats);
        let dest = tmp.path().join("dest");
        fs::create_dir_all(&dest).unwrap();
        extract_archive(&bytes[..], &dest, &["world".to_owned()]).unwrap();
        assert_eq!(fs::read(dest.join("world/region/r.0.0.mca")).unwrap(), vec![7u8; 100_000]);
        assert!(check_archive(&bytes[..bytes.len() - 5]).is_err());
        let other = tmp.path().join("other");
        fs::create_dir_all(&other).unwrap();
        assert!(matches!(
            extract_archive(&bytes[..], &other, &["nether".to_owned()]),
            Err(ArchiveError::UnexpectedEntry { .. })
        ));
    }
}
