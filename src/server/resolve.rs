//! Resolution: from `spec.server` to a verified jar on disk, the Minecraft version and its Java.
//!
//! vanilla: Mojang's manifest -> version document (sha1-checked) -> server jar (sha1 and size).
//! paper: PaperMC's Fill v3 API -> latest build -> `server:default` download (sha256 and size).
//! fabric: Fabric meta v2 -> stable loader and installer -> the server launcher jar (no digest).
//! custom: a jar inside the data dir. Every jar is cached by sha256; when an API is unreachable a
//! cached jar for the same (software, version) starts the server.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use super::ServerError;
use super::cache::{IndexEntry, JarCache, sha256_file};
use super::http::{Expected, Http, Retry, check_digest, parse_json};
use super::version::{LATEST, VersionDocument, VersionManifest};
use crate::api::{ServerSpec, ServerType};

/// The base URLs of the download APIs; point them at mirrors or test stand-ins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrls {
    /// Mojang's version manifest (the full URL of `version_manifest_v2.json`).
    pub mojang_manifest: String,
    /// PaperMC's Fill API (without `/v3`).
    pub paper_api: String,
    /// Fabric's meta API (without `/v2`).
    pub fabric_meta: String,
}

impl Default for BaseUrls {
    fn default() -> Self {
        Self {
            mojang_manifest: "https://piston-meta.mojang.com/mc/game/version_manifest_v2.json".into(),
            paper_api: "https://fill.papermc.io".into(),
            fabric_meta: "https://meta.fabricmc.net".into(),
        }
    }
}

/// What a server spec resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedServer {
    /// The server software.
    pub kind: ServerType,
    /// The Minecraft version (what `latest` became; `unknown` for a custom jar resolved offline).
    pub minecraft_version: String,
    /// The jar to run, absolute.
    pub jar: PathBuf,
    /// The Java major version the Minecraft version needs.
    pub java_major: u32,
    /// The jar's sha256.
    pub sha256: String,
    /// Why a cached jar stands in for a download (the download API was unreachable), if one does.
    pub offline: Option<String>,
}

/// Resolves server software to cached, verified jars.
#[derive(Debug, Clone)]
pub struct Resolver {
    urls: BaseUrls,
    http: Http,
    cache: JarCache,
}

/// The Java a custom jar gets when its Minecraft version cannot be looked up.
const FALLBACK_JAVA: u32 = 21;

impl Resolver {
    /// A resolver using `urls`, caching jars in `cache_dir` (normally `DATA/.atlas/cache/jars`,
    /// created if missing).
    pub fn new(urls: BaseUrls, cache_dir: PathBuf) -> Result<Self, ServerError> {
        let urls = BaseUrls {
            mojang_manifest: urls.mojang_manifest,
            paper_api: urls.paper_api.trim_end_matches('/').to_owned(),
            fabric_meta: urls.fabric_meta.trim_end_matches('/').to_owned(),
        };
        Ok(Self { urls, http: Http::new(Retry::default())?, cache: JarCache::open(&cache_dir)? })
    }

    /// The same resolver retrying transient failures `attempts` times in all, waiting `backoff`
    /// before the first retry and twice as long before each next one.
    pub fn with_retry(mut self, attempts: u32, backoff: std::time::Duration) -> Result<Self, ServerError> {
        self.http = Http::new(Retry { attempts: attempts.max(1), backoff })?;
        Ok(self)
    }

    /// Resolves the software and Minecraft version, downloads (or reuses the cached) jar verified
    /// against the published digest.
    pub async fn resolve(&self, server: &ServerSpec, data_dir: &Path) -> Result<ResolvedServer, ServerError> {
        let version = server.version.as_str();
        let online = match server.kind {
            ServerType::Custom => return self.resolve_custom(server, data_dir).await,
            ServerType::Vanilla => self.resolve_vanilla(version).await,
            ServerType::Paper => self.resolve_paper(version).await,
            ServerType::Fabric => self.resolve_fabric(version).await,
        };
        match online {
            Err(e) if matches!(e, ServerError::Fetch { .. }) => self.cached(server.kind, version, e).await,
            other => other,
        }
    }

    /// Falls back to the cache when an API is unreachable.
    async fn cached(&self, kind: ServerType, version: &str, cause: ServerError) -> Result<ResolvedServer, ServerError> {
        let offline = |source| ServerError::Offline { software: kind.as_str(), version: version.to_owned(), source };
        let Some(entry) = self.cache.lookup(kind, version) else {
            return Err(offline(Box::new(cause)));
        };
        if !self.cache.is_intact(&entry.sha256).await {
            return Err(offline(Box::new(cause)));
        }
        tracing::warn!(
            software = kind.as_str(),
            requested = version,
            version = entry.version,
            "{cause}; starting from the cached jar"
        );
        Ok(ResolvedServer {
            kind,
            minecraft_version: entry.version,
            jar: self.cache.jar_path(&entry.sha256),
            java_major: entry.java_major,
            sha256: entry.sha256,
            offline: Some(cause.to_string()),
        })
    }

    async fn manifest(&self) -> Result<VersionManifest, ServerError> {
        self.http.get_json(&self.urls.mojang_manifest).await
    }

    /// The version document of `id`, checked against the manifest's sha1.
    async fn version_document(
        &self,
        software: ServerType,
        manifest: &VersionManifest,
        id: &str,
    ) -> Result<VersionDocument, ServerError> {
        let entry = manifest.get(id).ok_or_else(|| ServerError::UnknownVersion {
            software: software.as_str(),
            version: id.to_owned(),
            hint: "it is not in Mojang's version manifest; use a listed version (like 1.21.4 or 26.2) or latest".into(),
        })?;
        let bytes = self.http.get_bytes(&entry.url).await?;
        check_digest(&entry.url, "sha1", Some(&entry.sha1), &sha1_hex(&bytes))?;
        parse_json(&entry.url, &bytes)
    }

    async fn resolve_vanilla(&self, requested: &str) -> Result<ResolvedServer, ServerError> {
        let manifest = self.manifest().await?;
        let version = manifest.resolve(requested).to_owned();
        let document = self.version_document(ServerType::Vanilla, &manifest, &version).await?;
        let server = document.downloads.server.clone().ok_or_else(|| ServerError::UnknownVersion {
            software: "vanilla",
            version: version.clone(),
            hint: "Mojang publishes no server jar for it; pick a newer version".into(),
        })?;
        let upstream = format!("sha1:{}", server.sha1.to_ascii_lowercase());
        let expected = Expected { sha1: Some(server.sha1.clone()), sha256: None, size: Some(server.size) };
        self.fetch_jar(ServerType::Vanilla, version, document.java_major(), upstream, &server.url, expected).await
    }

    async fn resolve_paper(&self, requested: &str) -> Result<ResolvedServer, ServerError> {
        let manifest = self.manifest().await?;
        let version = if requested == LATEST { self.paper_latest(&manifest).await? } else { requested.to_owned() };
        let url = format!("{}/v3/projects/paper/versions/{version}/builds/latest", self.urls.paper_api);
        let build: PaperBuild = match self.http.get_json(&url).await {
            Err(ServerError::FetchStatus { status: 404, .. }) => {
                return Err(ServerError::UnknownVersion {
                    software: "paper",
                    version,
                    hint:
                        "PaperMC publishes no build for it; pick a version listed at https://papermc.io/downloads/paper"
                            .into(),
                });
            }
            other => other?,
        };
        let download = build.downloads.get("server:default").ok_or_else(|| ServerError::ParseMetadata {
            url: url.clone(),
            detail: format!("build {} has no server:default download", build.id),
        })?;
        if !build.channel.eq_ignore_ascii_case("stable") {
            tracing::warn!(
                version,
                build = build.id,
                channel = build.channel,
                "the newest Paper build is not a stable one"
            );
        }
        let java_major = self.version_document(ServerType::Paper, &manifest, &version).await?.java_major();
        let sha256 = download.checksums.sha256.to_ascii_lowercase();
        let expected = Expected { sha1: None, sha256: Some(sha256.clone()), size: download.size };
        let upstream = format!("sha256:{sha256}");
        self.fetch_jar(ServerType::Paper, version, java_major, upstream, &download.url, expected).await
    }

    /// The newest Minecraft release PaperMC builds for, by Mojang's order.
    async fn paper_latest(&self, manifest: &VersionManifest) -> Result<String, ServerError> {
        let url = format!("{}/v3/projects/paper", self.urls.paper_api);
        let project: PaperProject = self.http.get_json(&url).await?;
        let mut listed = project.versions.0.iter().flat_map(|(_, versions)| versions.iter().map(String::as_str));
        match manifest.newest_release(listed.clone()) {
            Some(v) => Ok(v.to_owned()),
            // No release in Mojang's list: take PaperMC's own newest-first order.
            None => listed
                .next()
                .map(str::to_owned)
                .ok_or(ServerError::ParseMetadata { url, detail: "the project lists no versions".into() }),
        }
    }

    async fn resolve_fabric(&self, requested: &str) -> Result<ResolvedServer, ServerError> {
        let manifest = self.manifest().await?;
        let version = manifest.resolve(requested).to_owned();
        let java_major = self.version_document(ServerType::Fabric, &manifest, &version).await?.java_major();
        let base = &self.urls.fabric_meta;
        let loaders: Vec<FabricLoaderEntry> =
            self.http.get_json(&format!("{base}/v2/versions/loader/{version}")).await?;
        let loader = pick_stable(loaders.iter().map(|l| &l.loader)).ok_or_else(|| ServerError::UnknownVersion {
            software: "fabric",
            version: version.clone(),
            hint: "Fabric publishes no loader for it yet; pick an older version or wait".into(),
        })?;
        let installers: Vec<FabricComponent> = self.http.get_json(&format!("{base}/v2/versions/installer")).await?;
        let installer = pick_stable(installers.iter()).ok_or_else(|| ServerError::ParseMetadata {
            url: format!("{base}/v2/versions/installer"),
            detail: "no installer versions listed".into(),
        })?;
        let url = format!("{base}/v2/versions/loader/{version}/{}/{}/server/jar", loader.version, installer.version);
        // Fabric publishes no digest for the launcher jar: it is checked by nothing but TLS, then
        // cached by the sha256 computed while downloading, which is recorded and re-checked on reuse.
        let upstream = format!("fabric-loader:{} fabric-installer:{}", loader.version, installer.version);
        self.fetch_jar(ServerType::Fabric, version, java_major, upstream, &url, Expected::default()).await
    }

    /// Reuses the cached jar from `upstream`, or downloads, verifies and caches it.
    async fn fetch_jar(
        &self,
        kind: ServerType,
        version: String,
        java_major: u32,
        upstream: String,
        url: &str,
        expected: Expected,
    ) -> Result<ResolvedServer, ServerError> {
        let cached = match (&expected.sha256, self.cache.lookup_upstream(kind, &version, &upstream)) {
            (Some(sha256), _) => Some(sha256.clone()),
            (None, Some(entry)) => Some(entry.sha256),
            (None, None) => None,
        };
        let sha256 = match cached {
            Some(sha256) if self.cache.is_intact(&sha256).await => {
                tracing::debug!(software = kind.as_str(), version, "using the cached jar");
                sha256
            }
            _ => {
                tracing::info!(software = kind.as_str(), version, url, "downloading the server jar");
                let downloaded = self.http.download(url, self.cache.dir(), &expected).await?;
                self.cache.commit(&downloaded.temp, &downloaded.sha256)?;
                downloaded.sha256
            }
        };
        self.cache.record(IndexEntry {
            kind,
            version: version.clone(),
            sha256: sha256.clone(),
            java_major,
            upstream,
        })?;
        Ok(ResolvedServer {
            kind,
            minecraft_version: version,
            jar: self.cache.jar_path(&sha256),
            java_major,
            sha256,
            offline: None,
        })
    }

    async fn resolve_custom(&self, server: &ServerSpec, data_dir: &Path) -> Result<ResolvedServer, ServerError> {
        let rel = server.jar.as_deref().ok_or_else(|| ServerError::CustomJar {
            path: data_dir.to_path_buf(),
            reason: "spec.server.jar is required when spec.server.type is custom".into(),
        })?;
        let jar = custom_jar_path(data_dir, rel)?;
        let (version, java_major) = match self.manifest().await {
            Ok(manifest) => {
                let version = manifest.resolve(&server.version).to_owned();
                let java = match self.version_document(ServerType::Custom, &manifest, &version).await {
                    Ok(document) => document.java_major(),
                    Err(e) => {
                        tracing::warn!(version, "{e}; assuming Java {FALLBACK_JAVA} for the custom jar");
                        FALLBACK_JAVA
                    }
                };
                (version, java)
            }
            Err(e) => {
                tracing::warn!("{e}; assuming Java {FALLBACK_JAVA} for the custom jar");
                let version = if server.version == LATEST { "unknown".to_owned() } else { server.version.clone() };
                (version, FALLBACK_JAVA)
            }
        };
        let sha256 = {
            let jar = jar.clone();
            tokio::task::spawn_blocking(move || sha256_file(&jar)).await
        };
        let sha256 = match sha256 {
            Ok(Ok(digest)) => digest,
            Ok(Err(e)) => return Err(ServerError::io(&jar, e)),
            Err(e) => return Err(ServerError::io(&jar, std::io::Error::other(e))),
        };
        Ok(ResolvedServer {
            kind: ServerType::Custom,
            minecraft_version: version,
            jar,
            java_major,
            sha256,
            offline: None,
        })
    }
}

/// The absolute path of a custom jar, which must exist and stay inside the data dir (symlinks
/// included).
fn custom_jar_path(data_dir: &Path, rel: &str) -> Result<PathBuf, ServerError> {
    let joined = data_dir.join(rel);
    let jar = std::fs::canonicalize(&joined).map_err(|e| ServerError::CustomJar {
        path: joined.clone(),
        reason: format!("{e}; ship it in the pack or place it in the data directory"),
    })?;
    let root = std::fs::canonicalize(data_dir).map_err(|e| ServerError::io(data_dir, e))?;
    if !jar.starts_with(&root) {
        return Err(ServerError::CustomJar {
            path: joined,
            reason: "it resolves outside the data directory; keep spec.server.jar inside it".into(),
        });
    }
    if !jar.is_file() {
        return Err(ServerError::CustomJar { path: joined, reason: "it is not a regular file".into() });
    }
    Ok(jar)
}

fn sha1_hex(bytes: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    hex::encode(Sha1::digest(bytes))
}

fn pick_stable<'a>(mut list: impl Iterator<Item = &'a FabricComponent> + Clone) -> Option<&'a FabricComponent> {
    list.clone().find(|c| c.stable).or_else(|| {
        let first = list.next()?;
        tracing::warn!(version = first.version, "Fabric lists no stable version; using the newest");
        Some(first)
    })
}

/// `GET /v3/projects/paper/versions/{version}/builds/latest`.
#[derive(Debug, Deserialize)]
struct PaperBuild {
    id: u64,
    #[serde(default)]
    channel: String,
    downloads: std::collections::BTreeMap<String, PaperDownload>,
}

#[derive(Debug, Deserialize)]
struct PaperDownload {
    checksums: PaperChecksums,
    size: Option<u64>,
    url: String,
}

#[derive(Debug, Deserialize)]
struct PaperChecksums {
    sha256: String,
}

/// `GET /v3/projects/paper`.
#[derive(Debug, Deserialize)]
struct PaperProject {
    versions: OrderedGroups,
}

/// PaperMC's `versions` object: version groups to versions, newest first. The order is the
/// information, so it is read as a list rather than a map.
#[derive(Debug, Default)]
struct OrderedGroups(Vec<(String, Vec<String>)>);

impl<'de> Deserialize<'de> for OrderedGroups {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Groups;
        impl<'de> Visitor<'de> for Groups {
            type Value = OrderedGroups;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of version groups to version lists")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedGroups, A::Error> {
                let mut groups = Vec::new();
                while let Some(entry) = map.next_entry::<String, Vec<String>>()? {
                    groups.push(entry);
                }
                Ok(OrderedGroups(groups))
            }
        }
        deserializer.deserialize_map(Groups)
    }
}

/// An entry of `GET /v2/versions/loader/{game}`.
#[derive(Debug, Deserialize)]
struct FabricLoaderEntry {
    loader: FabricComponent,
}

/// A loader or installer version.
#[derive(Debug, Deserialize)]
struct FabricComponent {
    version: String,
    #[serde(default)]
    stable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_version_groups_keep_their_order() -> Result<(), serde_json::Error> {
        let project: PaperProject = serde_json::from_str(
            r#"{"project":{"id":"paper","name":"Paper"},"versions":{"26.2":["26.2","26.2-rc-1"],"1.21":["1.21.11","1.21.4"]}}"#,
        )?;
        let all: Vec<&str> = project.versions.0.iter().flat_map(|(_, v)| v.iter().map(String::as_str)).collect();
        assert_eq!(all, ["26.2", "26.2-rc-1", "1.21.11", "1.21.4"]);
        Ok(())
    }

    #[test]
    fn custom_jars_must_stay_inside_the_data_dir() -> anyhow::Result<()> {
        let root_dir = crate::server::test_dir("custom-jar")?;
        let root = root_dir.path();
        let data = root.join("data");
        std::fs::create_dir_all(data.join("jars"))?;
        std::fs::write(data.join("jars/server.jar"), b"jar")?;
        std::fs::write(root.join("outside.jar"), b"jar")?;
        assert!(custom_jar_path(&data, "jars/server.jar")?.is_absolute());
        let escaped = custom_jar_path(&data, "../outside.jar").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(escaped.contains("outside the data directory"), "{escaped}");
        std::os::unix::fs::symlink(root.join("outside.jar"), data.join("link.jar"))?;
        assert!(custom_jar_path(&data, "link.jar").is_err());
        let missing = custom_jar_path(&data, "nope.jar").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("nope.jar") && missing.contains("place it in the data directory"), "{missing}");
        Ok(())
    }
}
