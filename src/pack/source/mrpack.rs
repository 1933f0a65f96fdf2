//! The Modrinth `.mrpack` source: downloads the pack, every server file its `modrinth.index.json`
//! lists (sha512 and sha1 checked), lays `overrides/` then `server-overrides/` over them, and builds
//! the result into an Atlas pack so staging verifies every file again.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use reqwest::{Client, Url};
use serde::Deserialize;
use sha2::Digest;

use super::download::{self, Expected};
use super::{FetchOptions, Fetched, SourceError, check_hex, io_err, parse_url, parse_version};
use crate::api::MrpackSource;
use crate::pack::build::{self, BuildOptions};
use crate::pack::extract::{self, ExtractedFile};
use crate::pack::manifest::{Loader, MANIFEST_FILE, MinecraftTarget, RESERVED_DIR};
use crate::pack::{ArchiveFormat, Limits, RelativePath, sanitize_path};

/// The index file at the root of a `.mrpack`.
pub const INDEX_FILE: &str = "modrinth.index.json";
/// Files downloaded at once.
const PARALLEL_DOWNLOADS: usize = 4;
/// The loaders an index may depend on, and the name the Atlas manifest gives each.
const LOADERS: [(&str, &str); 4] =
    [("fabric-loader", "fabric"), ("quilt-loader", "quilt"), ("forge", "forge"), ("neoforge", "neoforge")];

/// `modrinth.index.json` (format version 1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MrpackIndex {
    /// Always 1.
    pub format_version: u32,
    /// Always `minecraft`.
    pub game: String,
    /// The pack's version.
    pub version_id: String,
    /// The pack's name.
    pub name: String,
    /// A description.
    #[serde(default)]
    pub summary: Option<String>,
    /// The files to download.
    #[serde(default)]
    pub files: Vec<MrpackFile>,
    /// `minecraft` and the loader (`fabric-loader`, `quilt-loader`, `forge`, `neoforge`) with versions.
    #[serde(default)]
    pub dependencies: BTreeMap<String, String>,
}

/// One file of the index.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MrpackFile {
    /// Where it goes, relative to the instance (data) dir.
    pub path: String,
    /// Its digests.
    pub hashes: MrpackHashes,
    /// Which sides need it; omitted: both.
    #[serde(default)]
    pub env: Option<MrpackEnv>,
    /// Mirrors, tried in order.
    pub downloads: Vec<String>,
    /// Bytes.
    pub file_size: u64,
}

/// A file's digests (others than these are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MrpackHashes {
    /// SHA-1, hex.
    pub sha1: String,
    /// SHA-512, hex.
    pub sha512: String,
}

/// Which sides need a file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MrpackEnv {
    /// On the client.
    #[serde(default)]
    pub client: EnvSupport,
    /// On the server.
    #[serde(default)]
    pub server: EnvSupport,
}

/// Whether a side needs a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvSupport {
    /// Needed.
    #[default]
    Required,
    /// Wanted by default, may be left out.
    Optional,
    /// Must not be installed.
    Unsupported,
}

impl MrpackFile {
    /// Whether a server installs it (everything but `env.server: unsupported`).
    pub fn on_server(&self) -> bool {
        self.env.as_ref().is_none_or(|e| e.server != EnvSupport::Unsupported)
    }
}

impl MrpackIndex {
    /// The files a server installs.
    pub fn server_files(&self) -> impl Iterator<Item = &MrpackFile> {
        self.files.iter().filter(|f| f.on_server())
    }

    /// The Minecraft version and loader from `dependencies`.
    pub fn minecraft(&self) -> Option<MinecraftTarget> {
        let version = self.dependencies.get("minecraft")?.clone();
        let loader = LOADERS.iter().find_map(|(key, name)| {
            self.dependencies.get(*key).map(|v| Loader { name: (*name).to_owned(), version: Some(v.clone()) })
        });
        Some(MinecraftTarget { version, loader })
    }
}

/// Parses and checks an index: format 1, game `minecraft`.
pub fn parse_index(bytes: &[u8]) -> Result<MrpackIndex, SourceError> {
    let index: MrpackIndex = serde_json::from_slice(bytes).map_err(SourceError::ParseIndex)?;
    if index.format_version != 1 {
        return Err(SourceError::CheckIndex(format!("formatVersion {} is not supported (1 is)", index.format_version)));
    }
    if index.game != "minecraft" {
        return Err(SourceError::CheckIndex(format!("game {:?} is not minecraft", index.game)));
    }
    Ok(index)
}

/// A server file to download, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Where it lands.
    pub path: RelativePath,
    /// Mirrors, in order.
    pub urls: Vec<Url>,
    /// Its digests and size.
    pub expected: Expected,
}

/// The server files of an index with safe paths, parsed URLs and checked digests.
pub fn plan(index: &MrpackIndex) -> Result<Vec<PlannedFile>, SourceError> {
    index
        .server_files()
        .map(|f| {
            let path = sanitize_path(&f.path).map_err(SourceError::SanitizePath)?;
            if path.first_component() == RESERVED_DIR || path.as_str() == MANIFEST_FILE {
                return Err(SourceError::CheckIndex(format!("{} is reserved for the runner", f.path)));
            }
            if f.downloads.is_empty() {
                return Err(SourceError::CheckIndex(format!("{} has no download URL", f.path)));
            }
            let urls = f.downloads.iter().map(|u| parse_url(u)).collect::<Result<Vec<_>, _>>()?;
            let expected = Expected {
                sha256: None,
                sha512: Some(check_hex(&f.hashes.sha512, 128)?),
                sha1: Some(check_hex(&f.hashes.sha1, 40)?),
                size: Some(f.file_size),
            };
            Ok(PlannedFile { path, urls, expected })
        })
        .collect()
}

/// Downloads one file into the cache, trying each mirror in order.
async fn download_file(
    client: &Client,
    file: &PlannedFile,
    cache: &Path,
    options: &FetchOptions,
) -> Result<u64, SourceError> {
    let sha512 = file.expected.sha512.as_deref().unwrap_or_default();
    let dest = cache.join(sha512);
    let partial = cache.join(format!("{sha512}.partial"));
    let mut last = None;
    for url in &file.urls {
        match download::download(client, url, None, &file.expected, &partial, &dest, options).await {
            Ok(n) => return Ok(n),
            Err(e) => {
                tracing::warn!(url = %url, path = %file.path, error = %e, "mrpack download failed");
                last = Some(e);
            }
        }
    }
    // `plan` refuses files without URLs, so `last` is set here.
    Err(last.unwrap_or_else(|| SourceError::CheckIndex(format!("{} has no download URL", file.path))))
}

/// Downloads the pack and its files and builds them into an Atlas pack.
pub(crate) async fn fetch(
    client: &Client,
    source: &MrpackSource,
    pinned: Option<&str>,
    options: &FetchOptions,
) -> Result<Fetched, SourceError> {
    let url = parse_url(&source.url)?;
    let key = match &source.sha512 {
        Some(sha512) => check_hex(sha512, 128)?,
        None => format!("url-{}", &hex::encode(sha2::Sha256::digest(url.as_str().as_bytes()))[..32]),
    };
    let expected = Expected { sha512: source.sha512.as_deref().map(str::to_ascii_lowercase), ..Expected::default() };
    let mrpack = options.work_dir.join(format!("{key}.mrpack"));
    let partial = options.work_dir.join(format!("{key}.partial"));
    let mut bytes_downloaded = download::download(client, &url, None, &expected, &partial, &mrpack, options).await?;

    let job = options.work_dir.join(format!("mrpack-{key}"));
    let unpacked = job.join("unpacked");
    let tree = job.join("tree");
    let (index, extracted) = {
        let (job, unpacked, mrpack) = (job.clone(), unpacked.clone(), mrpack.clone());
        blocking("unpack mrpack", move || unpack(&mrpack, &job, &unpacked)).await?
    };
    if let Some(pinned) = pinned
        && index.version_id != pinned
    {
        return Err(SourceError::CheckVersion { pinned: pinned.to_owned(), found: index.version_id });
    }
    let version = parse_version(&index.version_id)?;
    let planned = plan(&index)?;
    tracing::info!(
        pack = %index.name,
        version = %version,
        files = planned.len(),
        skipped = index.files.len() - planned.len(),
        "installing mrpack"
    );

    let cache = options.work_dir.join("mrpack-files");
    fs::create_dir_all(&cache).map_err(io_err("create directory", &cache))?;
    let mut seen = HashSet::new();
    let unique: Vec<&PlannedFile> = planned.iter().filter(|f| seen.insert(f.expected.sha512.clone())).collect();
    options.progress.add_total_files(unique.len() as u64);
    // By index: a closure taking `&PlannedFile` makes the whole fetch future fail rustc's
    // higher-ranked Send check once it is spawned (the runner applies packs in a task).
    let (unique, cache) = (&unique, &cache);
    let downloaded: Vec<u64> = futures::stream::iter(0..unique.len())
        .map(|i| async move {
            let Some(f) = unique.get(i) else { return Ok(0) };
            let n = download_file(client, f, cache, options).await?;
            options.progress.add_files(1);
            Ok::<_, SourceError>(n)
        })
        .buffer_unordered(PARALLEL_DOWNLOADS)
        .try_collect()
        .await?;
    bytes_downloaded += downloaded.iter().sum::<u64>();

    let out = options.work_dir.join(format!("{key}.atlas.tar.zst"));
    let build_options = BuildOptions { minecraft: index.minecraft(), ..BuildOptions::new(version.clone()) };
    {
        let (job, out, cache) = (job.clone(), out.clone(), cache.clone());
        blocking("build pack from mrpack", move || {
            assemble(&planned, &cache, &extracted, &unpacked, &tree)?;
            build::build(&tree, &out, &build_options).map_err(SourceError::BuildPack)?;
            // The pack now holds the files: the working copies and cached downloads go.
            for f in &planned {
                if let Some(sha512) = &f.expected.sha512 {
                    let _ = fs::remove_file(cache.join(sha512));
                }
            }
            fs::remove_dir_all(&job).map_err(io_err("remove", &job))
        })
        .await?;
    }
    Ok(Fetched {
        archive: out,
        format: ArchiveFormat::TarZst,
        version: Some(version),
        fallback_version: None,
        bytes_downloaded,
    })
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| SourceError::Join(what))?
}

/// Unpacks the `.mrpack` (safely: the archive extractor's checks apply) into a fresh `unpacked`
/// dir of `job` and reads its index.
fn unpack(mrpack: &Path, job: &Path, unpacked: &Path) -> Result<(MrpackIndex, Vec<ExtractedFile>), SourceError> {
    if job.exists() {
        fs::remove_dir_all(job).map_err(io_err("remove", job))?;
    }
    fs::create_dir_all(unpacked).map_err(io_err("create directory", unpacked))?;
    let extracted = extract::extract_file(mrpack, ArchiveFormat::Zip, unpacked, &Limits::default())
        .map_err(SourceError::ExtractMrpack)?;
    let index_path = unpacked.join(INDEX_FILE);
    let bytes = match fs::read(&index_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::CheckIndex(format!("the archive has no {INDEX_FILE}")));
        }
        Err(e) => return Err(io_err("read", &index_path)(e)),
    };
    Ok((parse_index(&bytes)?, extracted))
}

/// Lays out the pack in `tree`: downloaded files, then `overrides/`, then `server-overrides/`.
fn assemble(
    planned: &[PlannedFile],
    cache: &Path,
    extracted: &[ExtractedFile],
    unpacked: &Path,
    tree: &Path,
) -> Result<(), SourceError> {
    fs::create_dir_all(tree).map_err(io_err("create directory", tree))?;
    for f in planned {
        let from = cache.join(f.expected.sha512.as_deref().unwrap_or_default());
        let to = place(tree, &f.path)?;
        // Several paths may share one download: link, or copy where links are not possible.
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(io_err("copy", &from))?;
        }
    }
    for prefix in ["overrides/", "server-overrides/"] {
        for file in extracted {
            let Some(rest) = file.path.as_str().strip_prefix(prefix) else { continue };
            let rel = sanitize_path(rest).map_err(SourceError::SanitizePath)?;
            let from = file.path.under(unpacked);
            let to = place(tree, &rel)?;
            fs::rename(&from, &to).map_err(io_err("rename", &from))?;
        }
    }
    Ok(())
}

/// The path of `rel` under `tree`, its parent created and any file already there removed.
fn place(tree: &Path, rel: &RelativePath) -> Result<PathBuf, SourceError> {
    let to = rel.under(tree);
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
    }
    match fs::remove_file(&to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", &to)(e)),
        _ => Ok(to),
    }
}
