//! Server software resolution against loopback stand-ins for Mojang's, PaperMC's and Fabric's APIs
//! (serving the real document shapes), and Java selection among Java homes the tests make.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use atlas_runner::api::{ServerSpec, ServerType};
use atlas_runner::server::{BaseUrls, JavaSearch, Resolver, ServerError, find_java};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use common::sha256_hex;
use serde_json::{Value, json};
use sha1::Sha1;
use sha2::Digest;

const FABRIC_LOADER: &str = "0.17.2";
const FABRIC_INSTALLER: &str = "1.1.0";

/// What the stand-in serves and what it saw.
struct Api {
    documents: HashMap<String, Vec<u8>>,
    jars: HashMap<String, Vec<u8>>,
    corrupt_jars: AtomicBool,
    jar_requests: AtomicUsize,
    paper_user_agents: Mutex<Vec<String>>,
}

struct StandIn {
    base: String,
    api: Arc<Api>,
}

fn sha1_hex(bytes: &[u8]) -> String {
    hex::encode(Sha1::digest(bytes))
}

fn fake_jar(name: &str) -> Vec<u8> {
    // Big enough to arrive in several chunks.
    format!("PK fake server jar {name}\n").repeat(8000).into_bytes()
}

fn testdata(name: &str) -> Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mojang").join(name);
    Ok(serde_json::from_slice(&std::fs::read(&path).with_context(|| path.display().to_string())?)?)
}

impl StandIn {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let mut documents = HashMap::new();
        let mut jars = HashMap::new();

        // Mojang: the real manifest and version documents, pointed at this server.
        let mut manifest = testdata("version_manifest_v2.json")?;
        for version in ["1.21.4", "26.2"] {
            let jar_name = format!("vanilla-{version}.jar");
            let jar = fake_jar(&jar_name);
            let mut document = testdata(&format!("{version}.json"))?;
            document["downloads"]["server"] =
                json!({"sha1": sha1_hex(&jar), "size": jar.len(), "url": format!("{base}/jars/{jar_name}")});
            let document = serde_json::to_vec(&document)?;
            let entry = manifest["versions"]
                .as_array_mut()
                .and_then(|versions| versions.iter_mut().find(|v| v["id"] == version))
                .context("version in the manifest")?;
            entry["url"] = json!(format!("{base}/mojang/v1/packages/{version}.json"));
            entry["sha1"] = json!(sha1_hex(&document));
            documents.insert(format!("/mojang/v1/packages/{version}.json"), document);
            jars.insert(jar_name, jar);
        }
        documents.insert("/mojang/version_manifest_v2.json".into(), serde_json::to_vec(&manifest)?);

        // PaperMC Fill v3: the project (groups newest first) and each version's latest build.
        let project = json!({
            "project": {"id": "paper", "name": "Paper"},
            "versions": {"26.2": ["26.2", "26.2-rc-2"], "1.21": ["1.21.11", "1.21.4"]}
        });
        documents.insert("/paper/v3/projects/paper".into(), serde_json::to_vec(&project)?);
        for (version, build) in [("1.21.4", 232), ("26.2", 17)] {
            let jar_name = format!("paper-{version}-{build}.jar");
            let jar = fake_jar(&jar_name);
            let body = json!({
                "id": build,
                "time": "2026-08-10T12:00:00Z",
                "channel": "STABLE",
                "commits": [{"sha": "abc", "time": "2026-08-10T11:00:00Z", "message": "Fix things"}],
                "downloads": {
                    "server:default": {
                        "name": jar_name,
                        "checksums": {"sha256": sha256_hex(&jar)},
                        "size": jar.len(),
                        "url": format!("{base}/jars/{jar_name}")
                    }
                }
            });
            documents.insert(
                format!("/paper/v3/projects/paper/versions/{version}/builds/latest"),
                serde_json::to_vec(&body)?,
            );
            jars.insert(jar_name, jar);
        }

        // Fabric meta v2: a newer unstable loader and installer listed first, as Fabric does.
        for version in ["1.21.4", "26.2"] {
            let loader = |v: &str, stable: bool| {
                json!({
                    "loader": {"separator": ".", "build": 1, "maven": format!("net.fabricmc:fabric-loader:{v}"), "version": v, "stable": stable},
                    "intermediary": {"maven": format!("net.fabricmc:intermediary:{version}"), "version": version, "stable": true},
                    "launcherMeta": {"version": 2, "min_java_version": 8}
                })
            };
            let loaders = json!([loader("0.18.0-beta.1", false), loader(FABRIC_LOADER, true), loader("0.16.9", true)]);
            documents.insert(format!("/fabric/v2/versions/loader/{version}"), serde_json::to_vec(&loaders)?);
            let path = format!("/fabric/v2/versions/loader/{version}/{FABRIC_LOADER}/{FABRIC_INSTALLER}/server/jar");
            jars.insert(path.clone(), fake_jar(&path));
        }
        let installer = |v: &str, stable: bool| {
            json!({"url": format!("https://maven.fabricmc.net/net/fabricmc/fabric-installer/{v}/fabric-installer-{v}.jar"),
                   "maven": format!("net.fabricmc:fabric-installer:{v}"), "version": v, "stable": stable})
        };
        let installers = json!([installer("1.1.1", false), installer(FABRIC_INSTALLER, true)]);
        documents.insert("/fabric/v2/versions/installer".into(), serde_json::to_vec(&installers)?);

        let api = Arc::new(Api {
            documents,
            jars,
            corrupt_jars: AtomicBool::new(false),
            jar_requests: AtomicUsize::new(0),
            paper_user_agents: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new().fallback(serve).with_state(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { base, api })
    }

    fn urls(&self) -> BaseUrls {
        BaseUrls {
            mojang_manifest: format!("{}/mojang/version_manifest_v2.json", self.base),
            paper_api: format!("{}/paper", self.base),
            fabric_meta: format!("{}/fabric/", self.base),
        }
    }

    fn jar(&self, name: &str) -> Result<&[u8]> {
        self.api.jars.get(name).map(Vec::as_slice).context("a served jar")
    }
}

async fn serve(State(api): State<Arc<Api>>, headers: HeaderMap, uri: Uri) -> Response {
    let path = uri.path();
    if path.starts_with("/paper/") {
        let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("");
        api.paper_user_agents.lock().map(|mut agents| agents.push(agent.to_owned())).ok();
        if !agent.contains("atlas-runner/") {
            return (StatusCode::FORBIDDEN, "a descriptive User-Agent is required").into_response();
        }
    }
    if let Some(document) = api.documents.get(path) {
        return ([(header::CONTENT_TYPE, "application/json")], document.clone()).into_response();
    }
    let jar_key = path.strip_prefix("/jars/").unwrap_or(path);
    if let Some(jar) = api.jars.get(jar_key) {
        api.jar_requests.fetch_add(1, Ordering::SeqCst);
        let mut body = jar.clone();
        if api.corrupt_jars.load(Ordering::SeqCst) {
            // Same size, different bytes: only the digest can tell.
            body[100] ^= 0xff;
        }
        return Response::new(Body::from(body));
    }
    if path.starts_with("/paper/") {
        return (StatusCode::NOT_FOUND, r#"{"error":"not_found","message":"Version not found."}"#).into_response();
    }
    if path.starts_with("/fabric/v2/versions/loader/") && !path.ends_with("/jar") {
        return ([(header::CONTENT_TYPE, "application/json")], "[]").into_response();
    }
    (StatusCode::NOT_FOUND, format!("no stand-in for {path}")).into_response()
}

/// Base URLs where nothing listens, and the socket that holds their port: bound but never listening, so
/// every connection is refused and no other socket can take the port while the test runs.
fn unreachable_urls() -> Result<(BaseUrls, tokio::net::TcpSocket)> {
    let (address, socket) = common::refusing_address()?;
    let base = format!("http://{address}");
    let urls = BaseUrls {
        mojang_manifest: format!("{base}/mojang/version_manifest_v2.json"),
        paper_api: format!("{base}/paper"),
        fabric_meta: format!("{base}/fabric"),
    };
    Ok((urls, socket))
}

/// A fresh directory with an empty `data/` in it, removed when the returned guard drops.
fn fresh_dir(name: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix(&format!("atlas-server-it-{name}-")).tempdir()?;
    std::fs::create_dir_all(dir.path().join("data"))?;
    Ok(dir)
}

fn resolver(urls: BaseUrls, dir: &Path) -> Result<Resolver> {
    Ok(Resolver::new(urls, dir.join("data/.atlas/cache/jars"))?.with_retry(2, Duration::from_millis(10))?)
}

fn spec(kind: ServerType, version: &str) -> ServerSpec {
    ServerSpec { kind, version: version.into(), jar: None }
}

/// Names in the cache dir, sorted.
fn cache_listing(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("data/.atlas/cache/jars"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

#[tokio::test]
async fn vanilla_jar_is_downloaded_verified_cached_and_reused() -> Result<()> {
    let api = StandIn::start().await?;
    let tmp = fresh_dir("vanilla")?;
    let dir = tmp.path();
    let resolver = resolver(api.urls(), dir)?;
    let resolved = resolver.resolve(&spec(ServerType::Vanilla, "1.21.4"), &dir.join("data")).await?;
    let jar = api.jar("vanilla-1.21.4.jar")?;
    assert_eq!(resolved.kind, ServerType::Vanilla);
    assert_eq!(resolved.minecraft_version, "1.21.4");
    assert_eq!(resolved.java_major, 21);
    assert_eq!(resolved.sha256, sha256_hex(jar));
    assert!(resolved.jar.is_absolute());
    assert_eq!(resolved.jar.file_name().and_then(|n| n.to_str()), Some(format!("{}.jar", resolved.sha256).as_str()));
    assert_eq!(std::fs::read(&resolved.jar)?, jar);
    assert_eq!(cache_listing(dir)?, [format!("{}.jar", resolved.sha256), "index.json".to_owned()]);

    // A second start reuses the cached jar.
    let again = resolver.resolve(&spec(ServerType::Vanilla, "1.21.4"), &dir.join("data")).await?;
    assert_eq!(again, resolved);
    assert_eq!(api.api.jar_requests.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn year_numbered_versions_need_java_25_and_latest_is_the_newest_release() -> Result<()> {
    let api = StandIn::start().await?;
    let tmp = fresh_dir("latest")?;
    let dir = tmp.path();
    let resolver = resolver(api.urls(), dir)?;
    let data = dir.join("data");
    let v26 = resolver.resolve(&spec(ServerType::Vanilla, "26.2"), &data).await?;
    assert_eq!((v26.minecraft_version.as_str(), v26.java_major), ("26.2", 25));
    let latest = resolver.resolve(&spec(ServerType::Vanilla, "latest"), &data).await?;
    assert_eq!(latest, v26);
    let paper = resolver.resolve(&spec(ServerType::Paper, "latest"), &data).await?;
    assert_eq!((paper.minecraft_version.as_str(), paper.java_major), ("26.2", 25));
    assert_eq!(std::fs::read(&paper.jar)?, api.jar("paper-26.2-17.jar")?);
    let fabric = resolver.resolve(&spec(ServerType::Fabric, "latest"), &data).await?;
    assert_eq!((fabric.minecraft_version.as_str(), fabric.java_major), ("26.2", 25));
    Ok(())
}

#[tokio::test]
async fn paper_jar_is_checked_by_its_sha256_and_requested_with_a_contact_user_agent() -> Result<()> {
    let api = StandIn::start().await?;
    let tmp = fresh_dir("paper")?;
    let dir = tmp.path();
    let resolved = resolver(api.urls(), dir)?.resolve(&spec(ServerType::Paper, "1.21.4"), &dir.join("data")).await?;
    let jar = api.jar("paper-1.21.4-232.jar")?;
    assert_eq!(
        (resolved.kind, resolved.minecraft_version.as_str(), resolved.java_major),
        (ServerType::Paper, "1.21.4", 21)
    );
    assert_eq!(resolved.sha256, sha256_hex(jar));
    assert_eq!(std::fs::read(&resolved.jar)?, jar);
    let agents = api.api.paper_user_agents.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(!agents.is_empty());
    for agent in agents {
        assert!(agent.starts_with("atlas-runner/") && agent.contains("(+https://"), "User-Agent {agent:?}");
    }
    Ok(())
}

#[tokio::test]
async fn fabric_launcher_uses_the_stable_loader_and_installer_and_records_its_digest() -> Result<()> {
    let api = StandIn::start().await?;
    let tmp = fresh_dir("fabric")?;
    let dir = tmp.path();
    let resolver = resolver(api.urls(), dir)?;
    let resolved = resolver.resolve(&spec(ServerType::Fabric, "1.21.4"), &dir.join("data")).await?;
    let jar = api.jar(&format!("/fabric/v2/versions/loader/1.21.4/{FABRIC_LOADER}/{FABRIC_INSTALLER}/server/jar"))?;
    assert_eq!((resolved.kind, resolved.java_major), (ServerType::Fabric, 21));
    assert_eq!(resolved.sha256, sha256_hex(jar));
    assert_eq!(std::fs::read(&resolved.jar)?, jar);
    let index = std::fs::read_to_string(dir.join("data/.atlas/cache/jars/index.json"))?;
    assert!(index.contains(&resolved.sha256), "{index}");
    // Reused while Fabric still lists the same loader and installer.
    resolver.resolve(&spec(ServerType::Fabric, "1.21.4"), &dir.join("data")).await?;
    assert_eq!(api.api.jar_requests.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn digest_mismatch_is_refused_and_nothing_is_cached() -> Result<()> {
    let api = StandIn::start().await?;
    api.api.corrupt_jars.store(true, Ordering::SeqCst);
    let tmp = fresh_dir("mismatch")?;
    let dir = tmp.path();
    let resolver = resolver(api.urls(), dir)?;
    for (kind, published) in [
        (ServerType::Vanilla, sha1_hex(api.jar("vanilla-1.21.4.jar")?)),
        (ServerType::Paper, sha256_hex(api.jar("paper-1.21.4-232.jar")?)),
    ] {
        let err = match resolver.resolve(&spec(kind, "1.21.4"), &dir.join("data")).await {
            Ok(r) => bail!("a corrupt jar was accepted: {r:?}"),
            Err(e) => e,
        };
        assert!(matches!(err, ServerError::VerifyDigest { .. }), "{err:?}");
        assert!(!err.is_transient());
        assert_eq!(err.category(), "digest");
        let text = err.to_string();
        assert!(text.contains(&format!("expected {published}")) && text.contains("got "), "{text}");
        assert!(text.contains("nothing was cached"), "{text}");
    }
    assert_eq!(cache_listing(dir)?, Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn unreachable_api_starts_from_the_cached_jar() -> Result<()> {
    let api = StandIn::start().await?;
    let tmp = fresh_dir("offline")?;
    let dir = tmp.path();
    let data = dir.join("data");
    let online = resolver(api.urls(), dir)?;
    let paper = online.resolve(&spec(ServerType::Paper, "1.21.4"), &data).await?;
    let vanilla = online.resolve(&spec(ServerType::Vanilla, "latest"), &data).await?;

    let (urls, _closed) = unreachable_urls()?;
    let offline = resolver(urls, dir)?;
    // The same jar, marked as standing in for an unreachable API (the status says so).
    let cached = |resolved: atlas_runner::server::ResolvedServer| {
        assert!(resolved.offline.as_deref().is_some_and(|why| why.contains("cannot reach")), "{resolved:?}");
        atlas_runner::server::ResolvedServer { offline: None, ..resolved }
    };
    assert_eq!(cached(offline.resolve(&spec(ServerType::Paper, "1.21.4"), &data).await?), paper);
    // `latest` offline is the most recently resolved version of that software.
    assert_eq!(cached(offline.resolve(&spec(ServerType::Paper, "latest"), &data).await?), paper);
    assert_eq!(cached(offline.resolve(&spec(ServerType::Vanilla, "latest"), &data).await?), vanilla);
    assert_eq!(vanilla.minecraft_version, "26.2");
    Ok(())
}

#[tokio::test]
async fn unreachable_api_without_a_cached_jar_is_a_clear_transient_error() -> Result<()> {
    let tmp = fresh_dir("offline-empty")?;
    let dir = tmp.path();
    let (urls, _closed) = unreachable_urls()?;
    let err = match resolver(urls.clone(), dir)?.resolve(&spec(ServerType::Vanilla, "1.21.4"), &dir.join("data")).await
    {
        Ok(r) => bail!("resolved without an API or a cache: {r:?}"),
        Err(e) => e,
    };
    assert!(matches!(err, ServerError::Offline { .. }), "{err:?}");
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(text.contains("vanilla 1.21.4") && text.contains("no jar for it is cached"), "{text}");
    assert!(text.contains(&urls.mojang_manifest), "{text}");
    Ok(())
}

#[tokio::test]
async fn unknown_versions_are_permanent_errors() -> Result<()> {
    let api = StandIn::start().await?;
    let tmp = fresh_dir("unknown")?;
    let dir = tmp.path();
    let resolver = resolver(api.urls(), dir)?;
    for kind in [ServerType::Vanilla, ServerType::Paper, ServerType::Fabric] {
        let version = if kind == ServerType::Paper { "1.21.11" } else { "9.9.9" };
        match resolver.resolve(&spec(kind, version), &dir.join("data")).await {
            Err(e @ ServerError::UnknownVersion { .. }) => {
                assert!(!e.is_transient());
                assert!(e.to_string().contains(version), "{e}");
            }
            other => bail!("{kind:?} {version}: expected an unknown-version error, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn custom_jar_is_taken_from_the_data_dir_with_the_versions_java() -> Result<()> {
    let api = StandIn::start().await?;
    let tmp = fresh_dir("custom")?;
    let dir = tmp.path();
    let data = dir.join("data");
    std::fs::write(data.join("server.jar"), b"custom jar")?;
    let custom = ServerSpec { kind: ServerType::Custom, version: "26.2".into(), jar: Some("server.jar".into()) };
    let resolved = resolver(api.urls(), dir)?.resolve(&custom, &data).await?;
    assert_eq!(resolved.jar, std::fs::canonicalize(data.join("server.jar"))?);
    assert_eq!((resolved.minecraft_version.as_str(), resolved.java_major), ("26.2", 25));
    assert_eq!(resolved.sha256, sha256_hex(b"custom jar"));

    let (urls, _closed) = unreachable_urls()?;
    let offline = resolver(urls, dir)?;
    let latest = ServerSpec { version: "latest".into(), ..custom };
    let resolved = offline.resolve(&latest, &data).await?;
    assert_eq!((resolved.minecraft_version.as_str(), resolved.java_major), ("unknown", 21));
    Ok(())
}

/// A Java home `name` under `jvm`: a `bin/java` script printing what `java -version` prints for `version`,
/// and, with `release`, the `release` file a JDK ships. Returns the `java` binary's canonical path.
fn java_home(jvm: &Path, name: &str, version: &str, release: bool) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let home = jvm.join(name);
    std::fs::create_dir_all(home.join("bin"))?;
    if release {
        std::fs::write(
            home.join("release"),
            format!("IMPLEMENTOR=\"Test\"\nJAVA_VERSION=\"{version}\"\nOS_NAME=\"Linux\"\n"),
        )?;
    }
    let java = home.join("bin/java");
    std::fs::write(
        &java,
        format!(
            "#!/bin/sh\necho 'openjdk version \"{version}\" 2025-04-15' >&2\necho 'OpenJDK Runtime Environment' >&2\n"
        ),
    )?;
    std::fs::set_permissions(&java, std::fs::Permissions::from_mode(0o755))?;
    Ok(std::fs::canonicalize(java)?)
}

/// A search of `jvm` only: this machine's own Javas (`JAVA_HOME`, `/usr/lib/jvm`, `PATH`) play no part.
fn only(jvm: &Path) -> JavaSearch {
    JavaSearch { java_home: None, paths: vec![], jvm_dirs: vec![jvm.to_owned()], path_var: None }
}

#[test]
fn find_java_picks_the_exact_major_or_the_oldest_newer_one() -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("atlas-server-it-java-").tempdir()?;
    let jvm = tmp.path().join("jvm");
    let java17 = java_home(&jvm, "java-17-openjdk", "17.0.15", true)?;
    let java25 = java_home(&jvm, "temurin-25-jdk", "25.0.1", true)?;
    let chosen = |major: u32| -> Result<(u32, PathBuf)> {
        let java = find_java(major, &only(&jvm))?;
        Ok((java.major, java.path))
    };
    assert_eq!(chosen(17)?, (17, java17.clone()));
    assert_eq!(chosen(25)?, (25, java25.clone()));
    // No 21: the oldest newer one, not the newest.
    java_home(&jvm, "zulu-26", "26", true)?;
    assert_eq!(chosen(21)?, (25, java25.clone()));

    // A 21 without a `release` file is known by running `java -version`, and then wins for 21.
    let java21 = java_home(&jvm, "jdk-21-no-release", "21.0.2", false)?;
    assert_eq!(chosen(21)?, (21, java21.clone()));
    assert_eq!(chosen(18)?, (21, java21.clone()));
    assert_eq!(chosen(17)?, (17, java17.clone()));
    assert_eq!(chosen(25)?, (25, java25.clone()));

    // JAVA_HOME comes before the directories searched when both have the major needed.
    let elsewhere = tmp.path().join("elsewhere");
    let home25 = java_home(&elsewhere, "my-25", "25.0.2", true)?;
    let search = JavaSearch { java_home: home25.parent().and_then(Path::parent).map(Path::to_owned), ..only(&jvm) };
    assert_eq!(find_java(25, &search)?.path, home25);
    assert_eq!(find_java(21, &search)?.path, java21);
    Ok(())
}

#[test]
fn find_java_names_the_needed_and_found_versions_when_none_fits() -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("atlas-server-it-java-").tempdir()?;
    let jvm = tmp.path().join("jvm");
    let java17 = java_home(&jvm, "java-17-openjdk", "17.0.15", true)?;
    let java21 = java_home(&jvm, "jdk-21", "21.0.2", false)?;
    // Not a Java home: skipped, not an error.
    std::fs::create_dir_all(jvm.join("not-a-jdk"))?;
    match find_java(25, &only(&jvm)) {
        Err(e @ ServerError::FindJava { .. }) => {
            let text = e.to_string();
            assert!(text.contains("no Java 25"), "{text}");
            for (major, java) in [(17, &java17), (21, &java21)] {
                assert!(text.contains(&format!("{major} ({})", java.display())), "{major}: {text}");
            }
            assert_eq!(e.category(), "java");
        }
        other => bail!("expected no Java 25, got {other:?}"),
    }
    // Nothing at all: the error says so.
    match find_java(21, &only(&tmp.path().join("empty"))) {
        Err(e @ ServerError::FindJava { .. }) => assert!(e.to_string().contains("found: none"), "{e}"),
        other => bail!("expected no Java at all, got {other:?}"),
    }
    Ok(())
}
