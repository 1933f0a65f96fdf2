//! `pack build`: writes an Atlas pack (a tar.zst with `atlas-pack.json` first, at its root) from a
//! directory, streaming every file and hashing it on the way.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::IoError;
use super::manifest::{
    FileEntry, MANIFEST_FILE, ManifestError, MinecraftTarget, PackManifest, PackVersion, RESERVED_DIR, Sha256Digest,
};
use super::path::{PathError, sanitize_path};

/// Errors building a pack.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading the source directory or writing the archive failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A link, device or other non-regular file in the source directory.
    #[error("{} is not a regular file or directory; packs may not contain links or devices", .0.display())]
    NotRegular(PathBuf),
    /// A file name that is not UTF-8 or not a safe relative path.
    #[error("{}: {reason}", path.display())]
    BadName {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file changed between hashing and archiving.
    #[error("{} changed while the pack was being built", .0.display())]
    Changed(PathBuf),
    /// The manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl BuildError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Io(_) => "io",
            Self::NotRegular(_) | Self::BadName { .. } => "invalid-source",
            Self::Changed(_) => "source-changed",
            Self::Manifest(e) => e.category(),
        }
    }
}

/// What to put in the manifest besides the files.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The pack's version.
    pub version: PackVersion,
    /// The Minecraft version and loader.
    pub minecraft: Option<MinecraftTarget>,
    /// Recommended JVM arguments.
    pub jvm_args: Vec<String>,
    /// zstd level (3 is zstd's default).
    pub level: i32,
}

impl BuildOptions {
    /// Options with just a version.
    pub fn new(version: PackVersion) -> Self {
        Self { version, minecraft: None, jvm_args: Vec::new(), level: 3 }
    }
}

/// Builds the pack of every file under `dir` (except `.atlas/` and an old `atlas-pack.json`) into
/// `out`, written atomically (a temporary file renamed into place). Deterministic: sorted entries,
/// zeroed owners and times. Returns the manifest written.
pub fn build(dir: &Path, out: &Path, options: &BuildOptions) -> Result<PackManifest, BuildError> {
    let tmp = out.with_extension("partial");
    // `pack build . -o pack.tar.zst` writes the pack inside the directory it packs: an earlier
    // output there (or a leftover temporary file) is not one of the pack's files. Known by inode,
    // whatever the spelling of either path.
    let skip =
        Skip([out, tmp.as_path()].iter().filter_map(|p| fs::metadata(p).ok()).map(|m| (m.dev(), m.ino())).collect());
    let mut files = Vec::new();
    walk(dir, dir, &skip, &mut files)?;
    let mut entries = Vec::with_capacity(files.len());
    for (rel, path) in &files {
        let (sha256, size) = hash(path)?;
        entries.push(FileEntry { path: rel.clone(), sha256, size });
    }
    let manifest =
        PackManifest::new(options.version.clone(), options.minecraft.clone(), options.jvm_args.clone(), entries)?;
    let result = write_archive(dir, &tmp, &manifest, options.level);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fs::rename(&tmp, out).map_err(|source| BuildError::Io(IoError { op: "rename", path: out.to_owned(), source }))?;
    Ok(manifest)
}

fn write_archive(dir: &Path, tmp: &Path, manifest: &PackManifest, level: i32) -> Result<(), BuildError> {
    let io_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Io(IoError { op, path, source })
    };
    let file = File::create(tmp).map_err(io_err("create", tmp))?;
    let encoder = zstd::stream::write::Encoder::new(BufWriter::new(file), level).map_err(io_err("compress", tmp))?;
    let mut tar = tar::Builder::new(encoder);
    let json = manifest.to_json()?;
    let mut head = tar_header(json.len() as u64);
    tar.append_data(&mut head, MANIFEST_FILE, json.as_slice()).map_err(io_err("write", tmp))?;
    for entry in &manifest.files {
        let path = entry.path.under(dir);
        let source = File::open(&path).map_err(io_err("open", &path))?;
        let mut hashing = HashingReader { inner: source.take(entry.size), hasher: sha2::Sha256::new(), read: 0 };
        let mut head = tar_header(entry.size);
        tar.append_data(&mut head, entry.path.as_str(), &mut hashing).map_err(io_err("write", tmp))?;
        let digest = Sha256Digest(hashing.hasher.finalize().into());
        if digest != entry.sha256 || hashing.read != entry.size {
            return Err(BuildError::Changed(path));
        }
    }
    let encoder = tar.into_inner().map_err(io_err("write", tmp))?;
    let writer = encoder.finish().map_err(io_err("compress", tmp))?;
    let file = writer
        .into_inner()
        .map_err(|e| BuildError::Io(IoError { op: "write", path: tmp.to_owned(), source: e.into_error() }))?;
    file.sync_all().map_err(io_err("fsync", tmp))
}

fn tar_header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

fn hash(path: &Path) -> Result<(Sha256Digest, u64), BuildError> {
    let mut file =
        File::open(path).map_err(|source| BuildError::Io(IoError { op: "open", path: path.to_owned(), source }))?;
    let mut hasher = sha2::Sha256::new();
    let size = io::copy(&mut file, &mut hasher)
        .map_err(|source| BuildError::Io(IoError { op: "read", path: path.to_owned(), source }))?;
    Ok((Sha256Digest(hasher.finalize().into()), size))
}

/// Files left out of a pack, by device and inode.
struct Skip(Vec<(u64, u64)>);

impl Skip {
    fn contains(&self, entry: &fs::DirEntry) -> bool {
        !self.0.is_empty() && entry.metadata().is_ok_and(|m| self.0.contains(&(m.dev(), m.ino())))
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    skip: &Skip,
    out: &mut Vec<(super::path::RelativePath, PathBuf)>,
) -> Result<(), BuildError> {
    let read = fs::read_dir(dir)
        .map_err(|source| BuildError::Io(IoError { op: "read directory", path: dir.to_owned(), source }))?;
    for entry in read {
        let entry =
            entry.map_err(|source| BuildError::Io(IoError { op: "read directory", path: dir.to_owned(), source }))?;
        let path = entry.path();
        let file_type =
            entry.file_type().map_err(|source| BuildError::Io(IoError { op: "stat", path: path.clone(), source }))?;
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let Some(rel_str) = rel.to_str() else {
            return Err(BuildError::BadName { path, reason: "the name is not UTF-8".into() });
        };
        if rel_str == RESERVED_DIR || rel_str == MANIFEST_FILE || skip.contains(&entry) {
            continue;
        }
        if file_type.is_dir() {
            walk(root, &path, skip, out)?;
        } else if file_type.is_file() {
            let rel = sanitize_path(rel_str)
                .map_err(|e: PathError| BuildError::BadName { path: path.clone(), reason: e.to_string() })?;
            out.push((rel, path));
        } else {
            return Err(BuildError::NotRegular(path));
        }
    }
    Ok(())
}
