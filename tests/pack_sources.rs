//! Pack sources against stand-in servers on loopback: url (digests, Range resume, retries), the hub
//! protocol (channel, pin, relative blob URL, token, ETag) and Modrinth `.mrpack` (env, mirrors,
//! overrides, digests), with fetched packs staged and applied to prove they fit the store.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use atlas_runner::api::{HubSource, MrpackSource, PackSource, SecretKeyRef, UrlSource};
use atlas_runner::pack::build::{BuildOptions, build};
use atlas_runner::pack::source::mrpack::{self, EnvSupport};
use atlas_runner::pack::source::{FetchOptions, Fetched, SourceError, fetch};
use atlas_runner::pack::{ArchiveFormat, Limits, PackStore, PackVersion, Preserve, lock, lock_path};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use common::sha256_hex;
use sha2::Digest;
use tempfile::TempDir;

/// A request as the stand-in server saw it: the path and the headers the tests look at.
type Request = (String, BTreeMap<String, String>);

/// What the stand-in server saw.
#[derive(Debug, Default, Clone)]
struct Seen(Arc<Mutex<Vec<Request>>>);

impl Seen {
    fn record(&self, uri: &Uri, headers: &HeaderMap) {
        let kept = [header::RANGE, header::AUTHORIZATION, header::IF_NONE_MATCH]
            .iter()
            .filter_map(|h| Some((h.as_str().to_owned(), headers.get(h)?.to_str().ok()?.to_owned())))
            .collect();
        if let Ok(mut v) = self.0.lock() {
            v.push((uri.path().to_owned(), kept));
        }
    }
    fn all(&self) -> Vec<Request> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
    fn count(&self, path: &str) -> usize {
        self.all().iter().filter(|(p, _)| p == path).count()
    }
}

/// Serves `router` on an ephemeral loopback port for the rest of the test's runtime.
async fn serve(router: Router) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

/// `body`, honouring a `Range: bytes=N-` request with 206.
fn ranged(headers: &HeaderMap, body: &Bytes) -> Response {
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok());
    match start {
        Some(start) if start < body.len() => {
            let range = format!("bytes {start}-{}/{}", body.len() - 1, body.len());
            (StatusCode::PARTIAL_CONTENT, [(header::CONTENT_RANGE, range)], body.slice(start..)).into_response()
        }
        Some(_) => StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
        None => body.clone().into_response(),
    }
}

/// A body announced at its full length that breaks after `cut` bytes.
fn broken(body: &Bytes, cut: usize) -> Response {
    let head = body.slice(..cut);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(head)]).chain(futures::stream::once(async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Err(std::io::Error::other("connection cut by the test"))
    }));
    use futures::StreamExt;
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    response
}

fn options(data: &Path) -> FetchOptions {
    FetchOptions { base_delay: Duration::from_millis(10), ..FetchOptions::new(data) }
}

fn sha512_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha512::digest(bytes))
}

fn sha1_hex(bytes: &[u8]) -> String {
    use sha1::Digest as _;
    hex::encode(sha1::Sha1::digest(bytes))
}

/// An Atlas pack of `files` at `version`, as bytes.
fn atlas_pack(version: &str, files: &[(&str, &[u8])]) -> Result<Bytes> {
    let dir = TempDir::new()?;
    let src = dir.path().join("src");
    for (path, content) in files {
        let target = src.join(path);
        fs::create_dir_all(target.parent().context("no parent")?)?;
        fs::write(&target, content)?;
    }
    let out = dir.path().join("pack.tar.zst");
    build(&src, &out, &BuildOptions::new(PackVersion::new(version)?))?;
    Ok(fs::read(&out)?.into())
}

/// Stages and applies a fetched pack into `data`.
fn stage_and_apply(data: &Path, fetched: &Fetched) -> Result<PackVersion> {
    let held = lock(&lock_path(data))?;
    let (mut store, _) = PackStore::open(data, &held)?;
    let staged = store.stage(&fetched.archive, fetched.format, fetched.version.as_ref(), &Limits::default())?;
    let report = store.apply(staged, &Preserve::none())?;
    Ok(report.to)
}

/// Incompressible bytes, so an archive is large enough to cut in the middle.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn url_source(url: String, sha256: String) -> PackSource {
    PackSource { hub: None, url: Some(UrlSource { url, sha256 }), mrpack: None }
}

fn partials(dir: &Path) -> Result<Vec<String>> {
    Ok(fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect())
}

#[derive(Clone)]
struct Blob {
    body: Bytes,
    seen: Seen,
    /// Answers left to fail: with 503 (`fail_status`) or with a body cut after `cut` bytes.
    failures: Arc<Mutex<usize>>,
    fail_status: bool,
    cut: usize,
    /// Answer `Range` with 206 (else always 200 with the whole body).
    ranges: bool,
}

async fn blob(State(b): State<Blob>, uri: Uri, headers: HeaderMap) -> Response {
    b.seen.record(&uri, &headers);
    let fail = b
        .failures
        .lock()
        .map(|mut n| {
            let left = *n;
            *n = left.saturating_sub(1);
            left > 0
        })
        .unwrap_or(false);
    match (fail, b.fail_status) {
        (true, true) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        (true, false) => broken(&b.body, b.cut),
        (false, _) if b.ranges => ranged(&headers, &b.body),
        (false, _) => b.body.clone().into_response(),
    }
}

async fn blob_server(body: Bytes, failures: usize, fail_status: bool, cut: usize) -> Result<(SocketAddr, Seen)> {
    blob_server_with(body, failures, fail_status, cut, true).await
}

async fn blob_server_with(
    body: Bytes,
    failures: usize,
    fail_status: bool,
    cut: usize,
    ranges: bool,
) -> Result<(SocketAddr, Seen)> {
    let seen = Seen::default();
    let failures = Arc::new(Mutex::new(failures));
    let state = Blob { body, seen: seen.clone(), failures, fail_status, cut, ranges };
    let addr = serve(Router::new().route("/packs/{name}", axum::routing::get(blob)).with_state(state)).await?;
    Ok((addr, seen))
}

#[tokio::test]
async fn url_fetches_verifies_applies_and_reuses() -> Result<()> {
    let pack = atlas_pack("1.0.0", &[("mods/a.jar", b"jar a"), ("config/a.toml", b"x = 1")])?;
    let (addr, seen) = blob_server(pack.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p-1.0.0.tar.zst"), sha256_hex(&pack));
    let opts = options(data.path());
    let fetched = fetch(&source, None, &opts).await?;
    ensure!(fetched.format == ArchiveFormat::TarZst && fetched.version.is_none());
    ensure!(fetched.bytes_downloaded == pack.len() as u64);
    let progress = opts.progress.snapshot();
    ensure!(progress.bytes == pack.len() as u64 && progress.total_bytes == progress.bytes, "{progress:?}");
    ensure!(fetched.archive == opts.work_dir.join(format!("{}.tar.zst", sha256_hex(&pack))));
    ensure!(fs::read(&fetched.archive)? == pack.as_ref());
    ensure!(stage_and_apply(data.path(), &fetched)?.as_str() == "1.0.0");
    ensure!(fs::read(data.path().join("mods/a.jar"))? == b"jar a");

    // Cached and verified: no network.
    let again = fetch(&source, None, &opts).await?;
    ensure!(again.bytes_downloaded == 0 && again.archive == fetched.archive);
    ensure!(seen.all().len() == 1, "requests: {:?}", seen.all());
    Ok(())
}

#[tokio::test]
async fn url_plain_zip_takes_the_pinned_version() -> Result<()> {
    let archive = zip_of(&[("plugins/p.jar", b"plugin"), ("config/p.yml", b"k: v")])?;
    let (addr, _) = blob_server(archive.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/plugins.zip"), sha256_hex(&archive));
    let unpinned = fetch(&source, None, &options(data.path())).await?;
    ensure!(unpinned.format == ArchiveFormat::Zip && unpinned.version.is_none());
    // Without atlas-pack.json and without a pin, the digest names the version (provisioning uses it).
    let by_digest = format!("sha256-{}", &sha256_hex(&archive)[..12]);
    ensure!(unpinned.fallback_version.as_ref().map(PackVersion::as_str) == Some(by_digest.as_str()));
    // Staged with neither, the store cannot name the version.
    let refused = stage_and_apply(data.path(), &unpinned).err().context("staged without a version")?;
    ensure!(refused.to_string().contains("set spec.pack.version"), "{refused:#}");
    let pinned = fetch(&source, Some("3.0.0"), &options(data.path())).await?;
    ensure!(pinned.version.as_ref().map(PackVersion::as_str) == Some("3.0.0") && pinned.bytes_downloaded == 0);
    ensure!(stage_and_apply(data.path(), &pinned)?.as_str() == "3.0.0");
    ensure!(fs::read(data.path().join("plugins/p.jar"))? == b"plugin");
    Ok(())
}

#[tokio::test]
async fn url_digest_mismatch_is_permanent_and_leaves_nothing() -> Result<()> {
    let pack = atlas_pack("1.0.0", &[("mods/a.jar", b"jar a")])?;
    let (addr, _) = blob_server(pack.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let wrong = sha256_hex(b"something else");
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), wrong.clone());
    let opts = options(data.path());
    let err = fetch(&source, None, &opts).await.err().context("a wrong digest was accepted")?;
    ensure!(matches!(err, SourceError::VerifyDigest { algorithm: "sha256", .. }), "{err:?}");
    ensure!(!err.is_transient() && err.category() == "digest-mismatch");
    let message = err.to_string();
    ensure!(message.contains(&wrong) && message.contains(&sha256_hex(&pack)), "{message}");
    ensure!(fs::read_dir(&opts.work_dir)?.next().is_none(), "left files in {}", opts.work_dir.display());
    Ok(())
}

#[tokio::test]
async fn url_unknown_extension_is_refused() -> Result<()> {
    let data = TempDir::new()?;
    let source = url_source("http://127.0.0.1:9/packs/p.rar".into(), sha256_hex(b"x"));
    let err = fetch(&source, None, &options(data.path())).await.err().context("accepted")?;
    ensure!(matches!(err, SourceError::DetectFormat { .. }) && err.category() == "invalid-spec", "{err:?}");
    let bad = url_source("http://127.0.0.1:9/packs/p.zip".into(), "../../etc".into());
    let err = fetch(&bad, None, &options(data.path())).await.err().context("accepted")?;
    ensure!(matches!(err, SourceError::ParseDigest { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn url_resumes_a_broken_download_with_range() -> Result<()> {
    let noise = noise(300_000);
    let pack = atlas_pack("2.0.0", &[("mods/big.jar", &noise)])?;
    let cut = pack.len() / 2;
    let (addr, seen) = blob_server(pack.clone(), 1, false, cut).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), sha256_hex(&pack));
    let fetched = fetch(&source, None, &options(data.path())).await?;
    let requests = seen.all();
    ensure!(requests.len() == 2, "requests: {requests:?}");
    ensure!(!requests[0].1.contains_key("range"), "first request: {:?}", requests[0]);
    ensure!(requests[1].1.get("range") == Some(&format!("bytes={cut}-")), "second request: {:?}", requests[1]);
    ensure!(fetched.bytes_downloaded == pack.len() as u64);
    ensure!(fs::read(&fetched.archive)? == pack.as_ref());
    ensure!(stage_and_apply(data.path(), &fetched)?.as_str() == "2.0.0");
    ensure!(fs::read(data.path().join("mods/big.jar"))? == noise);
    Ok(())
}

#[tokio::test]
async fn url_restarts_from_zero_when_the_server_ignores_range() -> Result<()> {
    let pack = atlas_pack("2.0.0", &[("mods/big.jar", &noise(300_000))])?;
    let cut = pack.len() / 3;
    let (addr, seen) = blob_server_with(pack.clone(), 1, false, cut, false).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), sha256_hex(&pack));
    let fetched = fetch(&source, None, &options(data.path())).await?;
    let requests = seen.all();
    ensure!(requests.len() == 2 && requests[1].1.get("range") == Some(&format!("bytes={cut}-")), "{requests:?}");
    ensure!(fetched.bytes_downloaded == (cut + pack.len()) as u64);
    ensure!(fs::read(&fetched.archive)? == pack.as_ref());
    Ok(())
}

#[tokio::test]
async fn url_starts_over_when_a_kept_partial_is_stale() -> Result<()> {
    let pack = atlas_pack("1.0.0", &[("a.txt", b"a")])?;
    let (addr, seen) = blob_server(pack.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let opts = options(data.path());
    fs::create_dir_all(&opts.work_dir)?;
    let sha256 = sha256_hex(&pack);
    fs::write(opts.work_dir.join(format!("{sha256}.partial")), b"not the prefix")?;
    let fetched = fetch(&url_source(format!("http://{addr}/packs/p.tar.zst"), sha256), None, &opts).await?;
    ensure!(fs::read(&fetched.archive)? == pack.as_ref());
    let requests = seen.all();
    ensure!(requests.len() == 2 && !requests[1].1.contains_key("range"), "{requests:?}");
    Ok(())
}

#[tokio::test]
async fn url_retries_5xx_then_gives_up_transiently() -> Result<()> {
    let pack = atlas_pack("1.0.0", &[("a.txt", b"a")])?;
    let (addr, seen) = blob_server(pack.clone(), 2, true, 0).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), sha256_hex(&pack));
    let fetched = fetch(&source, None, &options(data.path())).await?;
    ensure!(seen.all().len() == 3 && fs::read(&fetched.archive)? == pack.as_ref());

    let (addr, seen) = blob_server(pack.clone(), 100, true, 0).await?;
    let other = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), sha256_hex(&pack));
    let opts = FetchOptions { retries: 2, ..options(other.path()) };
    let err = fetch(&source, None, &opts).await.err().context("a 503 was accepted")?;
    ensure!(matches!(err, SourceError::Status { status: 503, .. }) && err.is_transient(), "{err:?}");
    ensure!(seen.all().len() == 3, "requests: {:?}", seen.all());
    ensure!(partials(&opts.work_dir)?.is_empty());
    Ok(())
}

// ---- hub ----

#[derive(Clone)]
struct Hub {
    base: String,
    /// Times left to cut the 1.0.0 blob after half its bytes.
    cuts: Arc<Mutex<usize>>,
    seen: Seen,
    v1: Bytes,
    v2: Bytes,
}

const TOKEN: &str = "secret-token";

async fn hub_handler(State(hub): State<Hub>, uri: Uri, headers: HeaderMap) -> Response {
    hub.seen.record(&uri, &headers);
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let answer = |version: &str, url: String, body: &Bytes| {
        serde_json::json!({
            "version": version,
            "blob": {"url": url, "sha256": sha256_hex(body), "size": body.len()},
            "publishedAt": "2026-11-01T00:00:00Z",
        })
        .to_string()
    };
    match uri.path() {
        "/hub/api/v1/packs/modded/channels/stable" => {
            if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some("\"v2\"") {
                return StatusCode::NOT_MODIFIED.into_response();
            }
            let body = answer("2.0.0", "blobs/modded-2.0.0.tar.zst".into(), &hub.v2);
            ([(header::ETAG, "\"v2\""), (header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        "/hub/api/v1/packs/modded/versions/1.0.0" => {
            let url = format!("{}/blobs/modded-1.0.0.tar.zst", hub.base);
            ([(header::CONTENT_TYPE, "application/json")], answer("1.0.0", url, &hub.v1)).into_response()
        }
        "/hub/blobs/modded-1.0.0.tar.zst" => {
            let cut = hub.cuts.lock().map(|mut n| std::mem::replace(&mut *n, 0) > 0).unwrap_or(false);
            if cut { broken(&hub.v1, hub.v1.len() / 2) } else { ranged(&headers, &hub.v1) }
        }
        "/hub/blobs/modded-2.0.0.tar.zst" => ranged(&headers, &hub.v2),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn hub_server() -> Result<(String, Seen, Bytes, Bytes)> {
    hub_server_with(0).await
}

async fn hub_server_with(cuts: usize) -> Result<(String, Seen, Bytes, Bytes)> {
    let v1 = atlas_pack("1.0.0", &[("mods/a.jar", b"a1"), ("mods/big.jar", &noise(200_000))])?;
    let v2 = atlas_pack("2.0.0", &[("mods/a.jar", b"a2"), ("mods/b.jar", b"b2")])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/hub", listener.local_addr()?);
    let seen = Seen::default();
    let state = Hub {
        base: base.clone(),
        cuts: Arc::new(Mutex::new(cuts)),
        seen: seen.clone(),
        v1: v1.clone(),
        v2: v2.clone(),
    };
    let router = Router::new().fallback(hub_handler).with_state(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok((base, seen, v1, v2))
}

fn hub_source(base: &str, token_file: Option<&str>) -> PackSource {
    let hub = HubSource {
        url: base.to_owned(),
        pack: "modded".into(),
        channel: "stable".into(),
        token_secret_ref: None,
        token_file: token_file.map(str::to_owned),
    };
    PackSource { hub: Some(hub), url: None, mrpack: None }
}

#[tokio::test]
async fn hub_channel_with_token_relative_blob_and_etag() -> Result<()> {
    let (base, seen, _, v2) = hub_server().await?;
    let data = TempDir::new()?;
    fs::write(data.path().join("hub.token"), format!("  {TOKEN}\n"))?;
    let source = hub_source(&base, Some("hub.token"));
    let opts = options(data.path());
    let fetched = fetch(&source, None, &opts).await?;
    ensure!(fetched.version.as_ref().map(PackVersion::as_str) == Some("2.0.0"));
    ensure!(fetched.format == ArchiveFormat::TarZst && fetched.bytes_downloaded == v2.len() as u64);
    ensure!(seen.count("/hub/blobs/modded-2.0.0.tar.zst") == 1, "requests: {:?}", seen.all());
    ensure!(opts.work_dir.join("hub-modded-stable.json").is_file());
    ensure!(stage_and_apply(data.path(), &fetched)?.as_str() == "2.0.0");
    ensure!(fs::read(data.path().join("mods/b.jar"))? == b"b2");

    // The channel did not change: 304, the remembered answer, the cached blob.
    let again = fetch(&source, None, &opts).await?;
    ensure!(again.version == fetched.version && again.bytes_downloaded == 0);
    let lookups: Vec<_> = seen.all().into_iter().filter(|(p, _)| p.contains("/channels/")).collect();
    ensure!(lookups.len() == 2, "lookups: {lookups:?}");
    ensure!(lookups[1].1.get("if-none-match").map(String::as_str) == Some("\"v2\""), "{lookups:?}");
    ensure!(lookups[1].1.get("authorization") == Some(&format!("Bearer {TOKEN}")));
    ensure!(seen.count("/hub/blobs/modded-2.0.0.tar.zst") == 1);
    Ok(())
}

#[tokio::test]
async fn hub_pinned_version_with_an_absolute_blob_url_resumed() -> Result<()> {
    let (base, seen, v1, _) = hub_server_with(1).await?;
    let data = TempDir::new()?;
    fs::write(data.path().join("token"), TOKEN)?;
    let fetched = fetch(&hub_source(&base, Some("token")), Some("1.0.0"), &options(data.path())).await?;
    ensure!(fetched.version.as_ref().map(PackVersion::as_str) == Some("1.0.0"));
    ensure!(fs::read(&fetched.archive)? == v1.as_ref());
    ensure!(seen.count("/hub/api/v1/packs/modded/versions/1.0.0") == 1);
    ensure!(seen.count("/hub/api/v1/packs/modded/channels/stable") == 0);
    let blobs: Vec<_> = seen.all().into_iter().filter(|(p, _)| p.contains("/blobs/")).collect();
    ensure!(blobs.len() == 2, "{blobs:?}");
    ensure!(blobs[1].1.get("range") == Some(&format!("bytes={}-", v1.len() / 2)), "{blobs:?}");
    ensure!(stage_and_apply(data.path(), &fetched)?.as_str() == "1.0.0");
    Ok(())
}

#[tokio::test]
async fn hub_token_required() -> Result<()> {
    let (base, seen, _, _) = hub_server().await?;
    let data = TempDir::new()?;
    let err = fetch(&hub_source(&base, None), None, &options(data.path())).await.err().context("no token passed")?;
    ensure!(matches!(err, SourceError::Authorize { status: 401, .. }), "{err:?}");
    ensure!(!err.is_transient() && err.category() == "unauthorized" && err.to_string().contains("token"));
    ensure!(seen.all().len() == 1, "a 401 must not be retried: {:?}", seen.all());

    let missing = fetch(&hub_source(&base, Some("nope.token")), None, &options(data.path())).await.err();
    ensure!(matches!(missing, Some(SourceError::ReadToken { .. })), "{missing:?}");

    let mut secret = hub_source(&base, None);
    if let Some(hub) = &mut secret.hub {
        hub.token_secret_ref = Some(SecretKeyRef { name: "hub".into(), key: "token".into() });
    }
    let err = fetch(&secret, None, &options(data.path())).await.err().context("secret ref accepted")?;
    ensure!(matches!(err, SourceError::ResolveTokenSecret) && err.to_string().contains("tokenFile"), "{err:?}");
    Ok(())
}

// ---- mrpack ----

/// A `.mrpack` (zip) of `entries`.
fn zip_of(entries: &[(&str, &[u8])]) -> Result<Bytes> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, content) in entries {
        writer.start_file(*name, zip::write::SimpleFileOptions::default())?;
        writer.write_all(content)?;
    }
    Ok(writer.finish()?.into_inner().into())
}

fn index_file(path: &str, content: &[u8], server: &str, downloads: &[String]) -> serde_json::Value {
    serde_json::json!({
        "path": path,
        "hashes": {"sha1": sha1_hex(content), "sha512": sha512_hex(content)},
        "env": {"client": "required", "server": server},
        "downloads": downloads,
        "fileSize": content.len(),
    })
}

#[derive(Clone)]
struct Cdn {
    seen: Seen,
    files: Arc<BTreeMap<String, Bytes>>,
}

async fn cdn(State(cdn): State<Cdn>, uri: Uri, headers: HeaderMap) -> Response {
    cdn.seen.record(&uri, &headers);
    match cdn.files.get(uri.path()) {
        Some(body) => ranged(&headers, body),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::test]
async fn mrpack_end_to_end() -> Result<()> {
    // Bound first and kept: the index names URLs on its address.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let jar = b"fabric jar with a plus".as_slice();
    let lib = b"library jar".as_slice();
    let client_only = b"client only".as_slice();
    let index = serde_json::json!({
        "formatVersion": 1,
        "game": "minecraft",
        "versionId": "1.2.0+build.3",
        "name": "Test Pack",
        "files": [
            index_file("mods/fabric-api-0.76.0+1.19.3.jar", jar, "required",
                &[format!("http://{addr}/cdn/fabric-api-0.76.0%2B1.19.3.jar")]),
            // The first mirror is down: the second serves it.
            index_file("./mods/lib.jar", lib, "optional",
                &[format!("http://{addr}/gone/lib.jar"), format!("http://{addr}/cdn/lib.jar")]),
            index_file("mods/client-only.jar", client_only, "unsupported",
                &[format!("http://{addr}/cdn/client-only.jar")]),
        ],
        "dependencies": {"minecraft": "1.19.3", "fabric-loader": "0.15.6"},
    });
    let mrpack = zip_of(&[
        ("modrinth.index.json", index.to_string().as_bytes()),
        ("overrides/config/both.toml", b"from overrides"),
        ("overrides/config/only-overrides.toml", b"client and server"),
        ("server-overrides/config/both.toml", b"from server-overrides"),
        ("server-overrides/server.properties", b"motd=test"),
        ("client-overrides/options.txt", b"client only"),
    ])?;
    let files: BTreeMap<String, Bytes> = [
        ("/cdn/fabric-api-0.76.0%2B1.19.3.jar".to_owned(), Bytes::from_static(jar)),
        ("/cdn/lib.jar".to_owned(), Bytes::from_static(lib)),
        ("/packs/test.mrpack".to_owned(), mrpack.clone()),
    ]
    .into();
    let seen = Seen::default();
    let router = Router::new().fallback(cdn).with_state(Cdn { seen: seen.clone(), files: Arc::new(files) });
    tokio::spawn(async move { axum::serve(listener, router).await });

    let data = TempDir::new()?;
    let source = PackSource {
        hub: None,
        url: None,
        mrpack: Some(MrpackSource {
            url: format!("http://{addr}/packs/test.mrpack"),
            sha512: Some(sha512_hex(&mrpack)),
        }),
    };
    let opts = options(data.path());
    let fetched = fetch(&source, None, &opts).await?;
    ensure!(fetched.version.as_ref().map(PackVersion::as_str) == Some("1.2.0+build.3"));
    ensure!(fetched.format == ArchiveFormat::TarZst);
    ensure!(fetched.bytes_downloaded == (mrpack.len() + jar.len() + lib.len()) as u64);
    ensure!(seen.count("/cdn/client-only.jar") == 0, "an unsupported file was downloaded");
    ensure!(seen.count("/gone/lib.jar") == 1 && seen.count("/cdn/lib.jar") == 1);
    let progress = opts.progress.snapshot();
    ensure!((progress.files, progress.total_files) == (2, 2), "{progress:?}");
    ensure!(progress.bytes == fetched.bytes_downloaded && progress.total_bytes == progress.bytes, "{progress:?}");

    ensure!(stage_and_apply(data.path(), &fetched)?.as_str() == "1.2.0+build.3");
    let d = data.path();
    ensure!(fs::read(d.join("mods/fabric-api-0.76.0+1.19.3.jar"))? == jar);
    ensure!(fs::read(d.join("mods/lib.jar"))? == lib);
    ensure!(!d.join("mods/client-only.jar").exists() && !d.join("options.txt").exists());
    ensure!(fs::read(d.join("config/both.toml"))? == b"from server-overrides");
    ensure!(fs::read(d.join("config/only-overrides.toml"))? == b"client and server");
    ensure!(fs::read(d.join("server.properties"))? == b"motd=test");

    let held = lock(&lock_path(d))?;
    let (store, _) = PackStore::open(d, &held)?;
    let manifest = store.status()?.current.context("no current version")?;
    let minecraft = manifest.minecraft.context("no minecraft target")?;
    ensure!(minecraft.version == "1.19.3");
    let loader = minecraft.loader.context("no loader")?;
    ensure!(loader.name == "fabric" && loader.version.as_deref() == Some("0.15.6"));
    ensure!(manifest.files.len() == 5, "{:?}", manifest.files);
    let leftovers: Vec<_> = fs::read_dir(&opts.work_dir)?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    ensure!(leftovers.iter().all(|n| !n.to_string_lossy().starts_with("mrpack-") || n == "mrpack-files"));
    Ok(())
}

#[tokio::test]
async fn mrpack_refuses_a_file_with_a_wrong_sha512() -> Result<()> {
    let good = b"good".as_slice();
    let evil = b"evil".as_slice();
    // Bound first and kept: the index names URLs on its address.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut bad = index_file("mods/bad.jar", good, "required", &[format!("http://{addr}/cdn/bad.jar")]);
    bad["hashes"]["sha1"] = serde_json::json!(sha1_hex(evil));
    let index = serde_json::json!({
        "formatVersion": 1, "game": "minecraft", "versionId": "1.0.0", "name": "Bad",
        "files": [bad], "dependencies": {"minecraft": "1.19.3"},
    });
    let mrpack = zip_of(&[("modrinth.index.json", index.to_string().as_bytes())])?;
    let files: BTreeMap<String, Bytes> =
        [("/cdn/bad.jar".to_owned(), Bytes::from_static(evil)), ("/p.mrpack".to_owned(), mrpack)].into();
    let router = Router::new().fallback(cdn).with_state(Cdn { seen: Seen::default(), files: Arc::new(files) });
    tokio::spawn(async move { axum::serve(listener, router).await });

    let data = TempDir::new()?;
    let source = PackSource {
        hub: None,
        url: None,
        mrpack: Some(MrpackSource { url: format!("http://{addr}/p.mrpack"), sha512: None }),
    };
    let err = fetch(&source, None, &options(data.path())).await.err().context("a tampered file was accepted")?;
    ensure!(matches!(err, SourceError::VerifyDigest { algorithm: "sha512", .. }), "{err:?}");
    ensure!(!err.is_transient() && err.to_string().contains(&sha512_hex(good)));
    ensure!(!data.path().join("mods").exists());
    Ok(())
}

#[test]
fn mrpack_parses_the_real_all_the_mods_index() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mrpack/all-the-mods.modrinth.index.json");
    let index = mrpack::parse_index(&fs::read(path)?)?;
    ensure!(index.name == "All the Mods" && index.version_id == "0.1.0");
    ensure!(index.files.len() == 211);
    let unsupported: Vec<_> = index.files.iter().filter(|f| !f.on_server()).map(|f| f.path.as_str()).collect();
    ensure!(unsupported.len() == 7 && unsupported.contains(&"mods/replaymod-1.19.3-2.6.10.jar"), "{unsupported:?}");
    let server_only = index
        .files
        .iter()
        .filter(|f| f.env.as_ref().is_some_and(|e| e.client == EnvSupport::Unsupported && f.on_server()))
        .count();
    ensure!(server_only == 2);
    let planned = mrpack::plan(&index)?;
    ensure!(planned.len() == 204);
    ensure!(planned.iter().filter(|f| f.path.as_str().contains('+')).count() == 56);
    let top = |dir: &str| planned.iter().filter(|f| f.path.first_component() == dir).count();
    ensure!((top("mods"), top("resourcepacks"), top("shaderpacks")) == (200, 3, 1));
    // `%2B` stays encoded in the URL the request uses, `+` stays in the path the file lands at.
    let plus = planned.iter().filter(|f| f.urls.iter().any(|u| u.path().contains("%2B"))).count();
    ensure!(plus == 56, "{plus}");
    ensure!(planned.iter().map(|f| f.expected.size.unwrap_or(0)).sum::<u64>() == 346_886_141);
    let minecraft = index.minecraft().context("no minecraft")?;
    ensure!(minecraft.version == "1.19.3");
    ensure!(minecraft.loader.map(|l| (l.name, l.version)) == Some(("fabric".into(), Some("0.15.6".into()))));
    Ok(())
}

/// `apply_spec` of a url pack, with fast retries.
async fn provision(data: &Path, source: &PackSource) -> Result<atlas_runner::pack::provision::Provisioned> {
    use atlas_runner::pack::provision::apply_spec;
    let spec =
        atlas_runner::api::PackSpec { source: source.clone(), version: None, preserve: Vec::new(), update: None };
    fs::create_dir_all(data.join(".atlas"))?;
    let held = Arc::new(lock(&lock_path(data))?);
    let metrics = atlas_runner::metrics::PackMetrics::register(&prometheus::Registry::new())?;
    Ok(apply_spec(&spec, data, held, &options(data), &metrics).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_pack_is_staged_while_it_downloads_and_known_applied_without_a_fetch() -> Result<()> {
    use atlas_runner::pack::provision::Provisioned;
    let noise = noise(300_000);
    let pack = atlas_pack("1.0.0", &[("mods/big.jar", &noise), ("config/a.toml", b"x = 1")])?;
    let (addr, seen) = blob_server(pack.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), sha256_hex(&pack));
    let applied = provision(data.path(), &source).await?;
    ensure!(
        matches!(&applied, Provisioned::Applied { bytes_downloaded, .. } if *bytes_downloaded == pack.len() as u64)
    );
    ensure!(fs::read(data.path().join("mods/big.jar"))? == noise);
    // Streamed into the store: no copy of the archive is kept.
    ensure!(partials(&data.path().join(".atlas/downloads"))?.is_empty());
    ensure!(fs::read_dir(data.path().join(".atlas/downloads"))?.count() == 0);
    // The state records the archive's digest: the same source is applied already, with no request.
    let again = provision(data.path(), &source).await?;
    ensure!(again == Provisioned::AlreadyCurrent(PackVersion::new("1.0.0")?), "{again:?}");
    ensure!(seen.all().len() == 1, "requests: {:?}", seen.all());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_pack_already_applied_is_known_by_its_lookup_without_its_blob() -> Result<()> {
    use atlas_runner::pack::provision::Provisioned;
    let (base, seen, _, v2) = hub_server().await?;
    let data = TempDir::new()?;
    fs::write(data.path().join("token"), TOKEN)?;
    let source = hub_source(&base, Some("token"));
    let applied = provision(data.path(), &source).await?;
    ensure!(
        matches!(&applied, Provisioned::Applied { bytes_downloaded, .. } if *bytes_downloaded == v2.len() as u64),
        "{applied:?}"
    );
    // No cached download to fall back on: only the hub's answer can tell the pack is applied.
    fs::remove_dir_all(data.path().join(".atlas/downloads"))?;
    let again = provision(data.path(), &source).await?;
    ensure!(again == Provisioned::AlreadyCurrent(PackVersion::new("2.0.0")?), "{again:?}");
    ensure!(seen.count("/hub/blobs/modded-2.0.0.tar.zst") == 1, "requests: {:?}", seen.all());
    // One lookup per apply: the blob fetched is the one the lookup named.
    ensure!(seen.count("/hub/api/v1/packs/modded/channels/stable") == 2, "requests: {:?}", seen.all());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_mid_download_is_staged_from_the_retried_download() -> Result<()> {
    let noise = noise(300_000);
    let pack = atlas_pack("2.0.0", &[("mods/big.jar", &noise)])?;
    let (addr, seen) = blob_server(pack.clone(), 1, false, pack.len() / 2).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), sha256_hex(&pack));
    let applied = provision(data.path(), &source).await?;
    ensure!(applied.version().as_str() == "2.0.0", "{applied:?}");
    ensure!(fs::read(data.path().join("mods/big.jar"))? == noise);
    // The streamed attempt kept no file, so the retry started from zero.
    let requests = seen.all();
    ensure!(requests.len() == 2 && !requests[1].1.contains_key("range"), "requests: {requests:?}");
    Ok(())
}

/// A pack refused for its digest: the error says so, and neither the data dir nor the store kept any of it.
fn refused_for_its_digest(data: &Path, err: &impl std::fmt::Display) -> Result<()> {
    ensure!(err.to_string().contains("sha256"), "{err:#}");
    ensure!(!data.join("mods").exists(), "a file of the refused pack reached the data dir");
    let store: Vec<_> = fs::read_dir(data.join(".atlas/packs"))?.filter_map(|e| e.ok()).collect();
    ensure!(store.is_empty(), "left in the store: {:?}", store.iter().map(|e| e.file_name()).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_pack_whose_digest_fails_leaves_nothing_staged() -> Result<()> {
    let pack = atlas_pack("3.0.0", &[("mods/big.jar", &noise(300_000))])?;
    let (addr, _) = blob_server(pack.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), sha256_hex(b"another archive"));
    let err = provision(data.path(), &source).await.err().context("a pack with the wrong digest was applied")?;
    refused_for_its_digest(data.path(), &err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_pack_refused_mid_stream_names_the_entry() -> Result<()> {
    // A tar whose second entry climbs out of the data dir, after enough bytes that the refusal
    // comes while the download still runs.
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in [("mods/big.jar", noise(300_000)), ("../evil.jar", b"evil".to_vec())] {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().context("gnu")?.name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, data.as_slice())?;
    }
    let archive: Bytes = zstd::encode_all(builder.into_inner()?.as_slice(), 3)?.into();
    let (addr, _) = blob_server(archive.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.zst"), sha256_hex(&archive));
    let err = provision(data.path(), &source).await.err().context("an unsafe pack was applied")?;
    ensure!(err.to_string().contains("../evil.jar"), "{err:#}");
    ensure!(!data.path().join("mods").exists() && !data.path().parent().context("parent")?.join("evil.jar").exists());
    Ok(())
}

/// `pack` (a tar.zst) as a tar.gz: gzip's decoder stops reading at the end of its member, before
/// the download's end where the digest is checked.
fn as_tar_gz(pack: &[u8]) -> Result<Bytes> {
    use std::io::Write as _;
    let tar = zstd::decode_all(pack)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    Ok(gz.finish()?.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_tar_gz_whose_digest_fails_is_refused_and_leaves_nothing_staged() -> Result<()> {
    // Over the tee's 1 MiB piece, so the archive is staged while it still downloads.
    let archive = as_tar_gz(&atlas_pack("4.0.0", &[("mods/big.jar", &noise(1_500_000))])?)?;
    ensure!(archive.len() > 1 << 20);
    let (addr, _) = blob_server(archive.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.gz"), sha256_hex(b"another archive"));
    let result = tokio::time::timeout(Duration::from_secs(60), provision(data.path(), &source))
        .await
        .context("applying a tar.gz with a wrong digest hung")?;
    let err = result.err().context("a tar.gz with the wrong digest was applied")?;
    refused_for_its_digest(data.path(), &err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_tar_gz_with_the_right_digest_is_applied() -> Result<()> {
    let noise = noise(1_500_000);
    let archive = as_tar_gz(&atlas_pack("4.0.0", &[("mods/big.jar", &noise)])?)?;
    let (addr, seen) = blob_server(archive.clone(), 0, false, 0).await?;
    let data = TempDir::new()?;
    let source = url_source(format!("http://{addr}/packs/p.tar.gz"), sha256_hex(&archive));
    let applied = tokio::time::timeout(Duration::from_secs(60), provision(data.path(), &source))
        .await
        .context("applying a tar.gz hung")??;
    ensure!(applied.version().as_str() == "4.0.0", "{applied:?}");
    ensure!(fs::read(data.path().join("mods/big.jar"))? == noise);
    ensure!(seen.all().len() == 1, "requests: {:?}", seen.all());
    Ok(())
}
