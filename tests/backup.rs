//! Backups against real parts: SeaweedFS S3 (the test bed) and the fake Minecraft server
//! (`tests/fixtures/FakeServer.java`) writing its world while a backup is taken over RCON.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atlas_runner::api::Retention;
use atlas_runner::backup::store::{S3Credentials, Store, StoreError};
use atlas_runner::backup::upload::stream_archive;
use atlas_runner::backup::{self, BackupError, CreateOptions, Manifest};
use atlas_runner::rcon::Rcon;
use atlas_testbed::{S3Endpoint, TestBucket, TestS3, free_port, unique};
use common::{DataDir, FakeServer, region_generation, s3_credentials, s3_spec, tree};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload, PutResult, UploadPart};

const PASSWORD: &str = "backup-rcon-secret";

// ---- Fixtures ----

/// A data directory under the target dir, with `level-name=LEVEL`; removed on drop.
fn data_dir(level: &str) -> Result<DataDir> {
    DataDir::new("backup-data", level)
}

/// A small world: a level, the nether and the end, region files with compressible and random bytes, an
/// empty directory, a nested file and an unrelated file outside the world.
fn write_world(data: &Path, level: &str) -> Result<()> {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut noise = |len: usize| {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed & 0xff) as u8
            })
            .collect::<Vec<u8>>()
    };
    for dim in [level.to_owned(), format!("{level}_nether"), format!("{level}_the_end")] {
        let region = data.join(&dim).join("region");
        std::fs::create_dir_all(&region)?;
        std::fs::write(data.join(&dim).join("level.dat"), format!("level {dim}"))?;
        for i in 0..3 {
            let mut bytes = vec![b'a'; 200_000];
            bytes.extend(noise(50_000));
            std::fs::write(region.join(format!("r.{i}.0.mca")), bytes)?;
        }
    }
    std::fs::create_dir_all(data.join(level).join("data/empty"))?;
    std::fs::write(data.join(level).join("data/raids.dat"), noise(1000))?;
    std::fs::write(data.join("ops.json"), "[]")?;
    Ok(())
}

fn credentials(bucket: &TestBucket) -> S3Credentials {
    s3_credentials(&bucket.s3)
}

async fn s3_store(prefix: &str, data: &Path) -> Result<(TestBucket, Store)> {
    let bucket = TestS3::shared().await?.bucket(prefix).await?;
    let store = Store::open(Some(&s3_spec(&bucket, "survival/")), data, Some(credentials(&bucket)))?;
    Ok((bucket, store))
}

/// Starts the fake server in `data` with RCON on `rcon_port`, writing often and slowly, plus
/// `fake_properties` (more `fake-server.properties` lines).
fn start_server(data: &Path, rcon_port: u16, fake_properties: &str) -> Result<FakeServer> {
    std::fs::write(
        data.join("server.properties"),
        format!(
            "server-ip=127.0.0.1\nserver-port={}\nenable-rcon=true\nrcon.port={rcon_port}\n\
             rcon.password={PASSWORD}\nlevel-name=world\n",
            free_port()?
        ),
    )?;
    // Rewrites are frequent and slow, so a copy taken while saving is on would very likely be torn.
    std::fs::write(
        data.join("fake-server.properties"),
        format!("autosave-interval-ms=10\nregion-write-ms=40\n{fake_properties}"),
    )?;
    FakeServer::start(data)
}

// ---- Tests ----

#[tokio::test]
async fn create_list_verify_restore_gives_a_byte_identical_world() -> Result<()> {
    let data = data_dir("survival")?;
    write_world(&data.0, "survival")?;
    let bucket = TestS3::shared().await?.bucket("backup-roundtrip").await?;
    // Credentials from a file, as the standalone runner reads them.
    let creds = data.0.join("s3.env");
    std::fs::write(
        &creds,
        format!("AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n", bucket.s3.access_key, bucket.s3.secret_key),
    )?;
    let mut spec = s3_spec(&bucket, "survival/");
    if let Some(s3) = spec.s3.as_mut() {
        s3.credentials_file = Some(creds.display().to_string());
    }
    let store = Store::open(Some(&spec), &data.0, None)?;
    store.probe().await?;

    let worlds = ["survival", "survival_nether", "survival_the_end"];
    let before: Vec<_> = worlds.iter().map(|w| tree(&data.0.join(w))).collect::<Result<_>>()?;
    let mut options = CreateOptions::new(&data.0);
    options.server_version = Some("1.21.4".to_owned());
    let created = backup::create(&store, &options).await?;
    assert_eq!(created.worlds, worlds);
    assert_eq!(created.files, 3 * 4 + 1);
    assert_eq!(created.server_version.as_deref(), Some("1.21.4"));
    assert!(created.save_off_ms.is_none());
    // The capture mirror stays for the next backup, holding exactly the captured worlds.
    let mirror = data.0.join(".atlas/backup-mirror");
    for world in worlds {
        assert!(tree(&mirror.join(world))? == tree(&data.0.join(world))?, "{world} in the mirror");
    }
    assert!(!mirror.join("ops.json").exists());

    let listed = backup::list(&store).await?;
    assert_eq!(listed, std::slice::from_ref(&created));
    let verified = backup::verify(&store, &created.name, &data.0.join(".atlas/verify")).await?;
    assert_eq!(verified, created);

    // The live world moves on, then the backup comes back.
    std::fs::write(data.0.join("survival/region/r.0.0.mca"), b"overwritten")?;
    std::fs::write(data.0.join("survival/new.dat"), b"new")?;
    std::fs::remove_dir_all(data.0.join("survival_the_end"))?;
    let restored = backup::restore(&store, &created.name, &data.0).await?;
    for (world, expected) in worlds.iter().zip(&before) {
        assert!(tree(&data.0.join(world))? == *expected, "{world} is not byte-identical after restore");
    }
    assert_eq!(restored.previous.len(), 2, "the live overworld and nether are kept aside");
    for aside in &restored.previous {
        assert!(aside.display().to_string().contains(".before-restore-"), "{}", aside.display());
    }
    assert_eq!(std::fs::read(restored.previous[0].join("new.dat"))?, b"new");
    assert!(!data.0.join(".atlas").join(format!("restore-{}", created.name)).exists());
    Ok(())
}

#[tokio::test]
async fn a_backup_of_a_running_server_is_never_torn_and_saving_resumes() -> Result<()> {
    let data = data_dir("world")?;
    let rcon_port = free_port()?;
    let _server = start_server(&data.0, rcon_port, "")?;
    let rcon =
        Rcon::new(SocketAddr::from((Ipv4Addr::LOCALHOST, rcon_port)), PASSWORD.to_owned(), Duration::from_secs(10));
    let (_bucket, store) = s3_store("backup-live", &data.0).await?;

    let mut options = CreateOptions::new(&data.0);
    options.rcon = Some(rcon.clone());
    options.flush_timeout = Duration::from_secs(20);
    for round in 0..3 {
        let created = backup::create(&store, &options).await?;
        let window = created.save_off_ms.context("the save-off window is measured")?;
        assert!(window < 10_000, "round {round}: saving was off for {window} ms");
        // Saving is back on: the server says so when asked to turn it on again.
        let reply = rcon.command("save-on").await?;
        assert!(reply.contains("already turned on"), "round {round}: save-on answered {reply:?}");

        let restore_into = data_dir("world")?;
        backup::restore(&store, &created.name, &restore_into.0).await?;
        let generation = region_generation(&restore_into.0.join("world/region/r.0.0.mca"))
            .with_context(|| format!("round {round}"))?;
        assert!(generation > 0);
    }
    // RCON refusing the password fails the backup before anything is captured or uploaded.
    let before = backup::list(&store).await?.len();
    options.rcon = Some(Rcon::new(rcon.addr(), "wrong".to_owned(), Duration::from_secs(10)));
    let err = backup::create(&store, &options).await.err().context("a wrong RCON password was accepted")?;
    assert_eq!(err.category(), "rcon", "{err:?}");
    assert_eq!(backup::list(&store).await?.len(), before);
    Ok(())
}

#[tokio::test]
async fn a_slow_flush_is_bounded_by_the_flush_timeout_not_the_rcon_timeout() -> Result<()> {
    let data = data_dir("world")?;
    let rcon_port = free_port()?;
    // Autosaves slowed down: each holds the server's thread, which a loaded disk could stretch past the
    // 1 s command timeout before save-off even answers.
    let _server = start_server(&data.0, rcon_port, "flush-ms=3000\nautosave-interval-ms=1000\n")?;
    // A per-command timeout shorter than the flush, as the runner's RCON handle has.
    let rcon =
        Rcon::new(SocketAddr::from((Ipv4Addr::LOCALHOST, rcon_port)), PASSWORD.to_owned(), Duration::from_secs(1));
    let (_bucket, store) = s3_store("backup-slow-flush", &data.0).await?;
    let mut options = CreateOptions::new(&data.0);
    options.rcon = Some(rcon.clone());
    options.flush_timeout = Duration::from_secs(20);
    let created = backup::create(&store, &options).await?;
    assert!(created.save_off_ms.context("window")? >= 3000, "{created:?}");

    options.flush_timeout = Duration::from_millis(500);
    let err = backup::create(&store, &options).await.err().context("a flush over its timeout was accepted")?;
    assert_eq!(err.category(), "flush", "{err:?}");
    // save-on (retried until the server's thread is free again) still ran.
    let reply = rcon.command_with_timeout("save-on", Duration::from_secs(10)).await?;
    assert!(reply.contains("already turned on"), "saving stayed off: {reply:?}");
    Ok(())
}

#[tokio::test]
async fn saving_left_off_by_an_earlier_failed_save_on_is_turned_back_on() -> Result<()> {
    let data = data_dir("world")?;
    let rcon_port = free_port()?;
    let _server = start_server(&data.0, rcon_port, "")?;
    let rcon =
        Rcon::new(SocketAddr::from((Ipv4Addr::LOCALHOST, rcon_port)), PASSWORD.to_owned(), Duration::from_secs(10));
    let (_bucket, store) = s3_store("backup-saving-off", &data.0).await?;
    let gauge = prometheus::IntGauge::new("saving_off", "test")?;
    let mut options = CreateOptions::new(&data.0);
    options.rcon = Some(rcon.clone());
    options.flush_timeout = Duration::from_secs(20);
    options.saving_off = Some(gauge.clone());
    let marker = data.0.join(backup::snapshot::SAVING_OFF_MARKER);

    // Saving off and our marker present: an earlier backup's save-on failed, so this one turns it back on.
    rcon.command("save-off").await?;
    std::fs::create_dir_all(marker.parent().context("marker parent")?)?;
    std::fs::write(&marker, "1")?;
    gauge.set(1);
    backup::create(&store, &options).await?;
    let reply = rcon.command("save-on").await?;
    assert!(reply.contains("already turned on"), "saving stayed off: save-on answered {reply:?}");
    assert!(!marker.exists(), "the marker outlived a successful save-on");
    assert_eq!(gauge.get(), 0);

    // Saving off by someone else (no marker): left off.
    rcon.command("save-off").await?;
    backup::create(&store, &options).await?;
    let reply = rcon.command("save-on").await?;
    assert!(reply.contains("now enabled"), "someone else's save-off was overridden: {reply:?}");
    assert!(!marker.exists());
    assert_eq!(gauge.get(), 0);
    Ok(())
}

#[tokio::test]
async fn a_corrupt_or_truncated_archive_is_refused_before_the_live_world_is_touched() -> Result<()> {
    let data = data_dir("world")?;
    write_world(&data.0, "world")?;
    let (_bucket, store) = s3_store("backup-corrupt", &data.0).await?;
    let created = backup::create(&store, &CreateOptions::new(&data.0)).await?;
    let key = ObjectPath::from(created.archive_key.as_str());
    let good = store.objects.get(&key).await?.bytes().await?;
    std::fs::write(data.0.join("world/live-only.dat"), b"still here")?;
    // The runner's own `.atlas` (staging, scratch) may change; nothing else may.
    let outside_atlas = |dir: &Path| -> Result<BTreeMap<String, Option<Vec<u8>>>> {
        Ok(tree(dir)?.into_iter().filter(|(path, _)| !path.starts_with(".atlas")).collect())
    };
    let live = outside_atlas(&data.0)?;

    let truncated = good.slice(..good.len() - 100);
    let mut flipped = good.to_vec();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x55;
    for (what, bytes, category) in
        [("truncated", truncated, "corrupt_archive"), ("flipped", flipped.into(), "corrupt_archive")]
    {
        store.objects.put(&key, PutPayload::from(bytes)).await?;
        let err = backup::restore(&store, &created.name, &data.0).await.err().context(what)?;
        assert_eq!(err.category(), category, "{what}: {err:#}");
        assert!(
            matches!(err, BackupError::SizeMismatch { .. } | BackupError::DigestMismatch { .. }),
            "{what}: {err:?}"
        );
        let verify = backup::verify(&store, &created.name, &data.0.join(".atlas/verify")).await;
        assert!(verify.is_err(), "{what}: verify accepted it");
        assert!(outside_atlas(&data.0)? == live, "{what}: the live data dir changed");
        let aside = std::fs::read_dir(&data.0)?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("before-restore"));
        assert!(!aside, "{what}: a world was moved aside");
    }
    Ok(())
}

#[tokio::test]
async fn wrong_credentials_and_a_missing_bucket_are_clear_errors() -> Result<()> {
    let data = data_dir("world")?;
    write_world(&data.0, "world")?;
    let bucket = TestS3::shared().await?.bucket("backup-creds").await?;

    let mut wrong = credentials(&bucket);
    wrong.secret_access_key = "not-the-secret".to_owned();
    let store = Store::open(Some(&s3_spec(&bucket, "")), &data.0, Some(wrong))?;
    let err = store.probe().await.err().context("a wrong secret was accepted")?;
    assert!(matches!(err, StoreError::Credentials { .. }), "{err:?}");
    assert_eq!(err.category(), "credentials");
    let err = backup::list(&store).await.err().context("list with a wrong secret")?;
    assert_eq!(err.category(), "credentials", "{err:?}");
    let err = backup::create(&store, &CreateOptions::new(&data.0)).await.err().context("create")?;
    assert_eq!(err.category(), "credentials", "{err:?}");

    let mut missing = bucket.clone();
    missing.name = unique("no-such-bucket").to_lowercase();
    let store = Store::open(Some(&s3_spec(&missing, "")), &data.0, Some(credentials(&bucket)))?;
    let err = store.probe().await.err().context("a missing bucket was accepted")?;
    assert!(matches!(err, StoreError::BucketMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("bucket does not exist"), "{err}");
    let err = backup::create(&store, &CreateOptions::new(&data.0)).await.err().context("create, no bucket")?;
    assert_eq!(err.category(), "bucket_missing", "{err:?}");
    Ok(())
}

fn fake_backup(name: &str, time: jiff::Timestamp) -> Manifest {
    Manifest {
        format: 1,
        name: name.to_owned(),
        time,
        server_version: None,
        pack_version: None,
        worlds: vec!["world".to_owned()],
        roots: vec!["world".to_owned()],
        files: 0,
        raw_bytes: 0,
        archive_bytes: 1,
        archive_sha256: String::new(),
        archive_key: format!("archives/{name}.tar.zst"),
        save_off_ms: None,
        upload_ms: None,
    }
}

#[tokio::test]
async fn a_backup_on_a_local_store_is_created_though_later_backups_list_before_it() -> Result<()> {
    let data = data_dir("world")?;
    write_world(&data.0, "world")?;
    // The default store, a directory: it lists keys in the order the filesystem keeps them, not sorted.
    let store = Store::open(None, &data.0, None)?;
    // Backups named after this one (made on a host whose clock ran ahead, or copied in).
    let mut later = Vec::new();
    for day in 1..=8 {
        let time: jiff::Timestamp = format!("2099-01-{day:02}T00:00:00Z").parse()?;
        let manifest = fake_backup(&backup::backup_name(time), time);
        let key = ObjectPath::from(format!("manifests/{}.json", manifest.name));
        store.objects.put(&key, PutPayload::from(serde_json::to_vec(&manifest)?)).await?;
        later.push(manifest);
    }
    let mut unsorted = false;
    for _ in 0..3 {
        let created = backup::create(&store, &CreateOptions::new(&data.0)).await?;
        let listed = backup::list(&store).await?;
        assert!(listed.contains(&created), "{} is not listed", created.name);
        assert!(store.objects.head(&ObjectPath::from(created.archive_key.as_str())).await.is_ok(), "archive gone");
        // The case this test is about: the listing from the new backup's name on put a later one first.
        let keys: Vec<String> = {
            use futures::TryStreamExt;
            let offset = ObjectPath::from(format!("manifests/{}", created.name));
            store
                .objects
                .list_with_offset(Some(&ObjectPath::from("manifests")), &offset)
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await?
        };
        unsorted |= keys.first() != Some(&format!("manifests/{}.json", created.name));
    }
    assert!(unsorted, "the directory listed every new manifest first: the case was not exercised");
    assert_eq!(backup::list(&store).await?.len(), later.len() + 3);
    Ok(())
}

#[tokio::test]
async fn a_backup_whose_listing_back_fails_is_kept_not_deleted() -> Result<()> {
    let data = data_dir("world")?;
    write_world(&data.0, "world")?;
    let bucket = TestS3::shared().await?.bucket("backup-list-fails").await?;
    let direct = Store::open(Some(&s3_spec(&bucket, "survival/")), &data.0, Some(credentials(&bucket)))?;
    // Through a proxy that answers the check's listing (the only request naming `start-after`) with a 503,
    // every time: the store took the backup, and then could not say it lists it.
    let upstream: SocketAddr = bucket.s3.endpoint.trim_start_matches("http://").parse()?;
    let (proxy, refused) = refusing_proxy(upstream, b"start-after=").await?;
    let through = TestBucket {
        s3: S3Endpoint { endpoint: format!("http://{proxy}"), ..bucket.s3.clone() },
        name: bucket.name.clone(),
        region: bucket.region.clone(),
    };
    let store = Store::open(Some(&s3_spec(&through, "survival/")), &data.0, Some(credentials(&bucket)))?;
    let error = backup::create(&store, &CreateOptions::new(&data.0)).await.err().context("the create succeeded")?;
    assert!(refused.load(Ordering::SeqCst) > 0, "the proxy refused no listing: {error}");
    assert_eq!(error.category(), "unconfirmed", "{error:?}");
    let BackupError::Unconfirmed { name, .. } = &error else { bail!("another error: {error:?}") };
    assert!(error.to_string().contains("it was kept, not deleted"), "{error}");
    // The backup is there, whole: listed, and its archive reads back to the byte.
    let listed = backup::list(&direct).await?;
    assert_eq!(listed.iter().map(|m| &m.name).collect::<Vec<_>>(), [name]);
    backup::verify(&direct, name, &data.0.join(".atlas/verify")).await?;
    Ok(())
}

/// A loopback TCP proxy to `upstream` that passes every request through, except one whose bytes hold
/// `needle`: that one is answered `503 Service Unavailable` and its connection closed. Counts those.
async fn refusing_proxy(upstream: SocketAddr, needle: &'static [u8]) -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                // Requests go one at a time on a connection (no pipelining), so the refused one is answered
                // before the server has anything to say on it.
                let (refuse, mut refusal) = tokio::sync::oneshot::channel::<()>();
                let requests = async move {
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        let n = from_client.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        if buf[..n].windows(needle.len()).any(|w| w == needle) {
                            count.fetch_add(1, Ordering::SeqCst);
                            let _ = refuse.send(());
                            return;
                        }
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let answers = async move {
                    tokio::select! {
                        _ = tokio::io::copy(&mut from_server, &mut to_client) => {}
                        Ok(()) = &mut refusal => {
                            let refusal = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                            let _ = to_client.write_all(refusal).await;
                        }
                    }
                    let _ = to_client.shutdown().await;
                };
                tokio::join!(requests, answers);
            });
        }
    });
    Ok((address, refused))
}

#[tokio::test]
async fn prune_over_a_simulated_month_keeps_exactly_the_expected_set() -> Result<()> {
    month_of_retention(&Store::memory()).await
}

#[tokio::test]
async fn prune_over_a_simulated_month_on_seaweedfs_keeps_exactly_the_expected_set() -> Result<()> {
    let data = data_dir("world")?;
    let (_bucket, store) = s3_store("backup-month", &data.0).await?;
    month_of_retention(&store).await
}

/// A month of backups every 6 hours (small fake ones), pruned by a keep-last/daily/weekly policy.
async fn month_of_retention(store: &Store) -> Result<()> {
    let start: jiff::Timestamp = "2026-10-01T00:00:00Z".parse()?;
    // A backup every 6 hours for October: 124 of them, plus one orphan archive (a crash between upload and
    // manifest) and one archive newer than every manifest (a backup still being written).
    for i in 0..124 {
        let time = start + jiff::SignedDuration::from_hours(6 * i);
        let manifest = fake_backup(&backup::backup_name(time), time);
        store.objects.put(&ObjectPath::from(manifest.archive_key.as_str()), PutPayload::from_static(b"x")).await?;
        let key = ObjectPath::from(format!("manifests/{}.json", manifest.name));
        store.objects.put(&key, PutPayload::from(serde_json::to_vec(&manifest)?)).await?;
    }
    let orphan = format!("archives/{}.tar.zst", backup::backup_name("2026-10-03T01:00:00Z".parse()?));
    let in_progress = format!("archives/{}.tar.zst", backup::backup_name("2026-11-01T00:00:00Z".parse()?));
    // A manifest this version cannot read is skipped by list and never pruned, nor is its archive.
    let unreadable = backup::backup_name("2026-10-02T03:00:00Z".parse()?);
    let garbage = ObjectPath::from(format!("manifests/{unreadable}.json"));
    store.objects.put(&garbage, PutPayload::from_static(b"{\"format\": 99")).await?;
    let unreadable_archive = format!("archives/{unreadable}.tar.zst");
    for key in [&orphan, &in_progress, &unreadable_archive] {
        store.objects.put(&ObjectPath::from(key.as_str()), PutPayload::from_static(b"x")).await?;
    }
    // Two verified backups, both older than the policy keeps: the newer of them is kept all the same.
    let verified = backup::backup_name("2026-10-05T06:00:00Z".parse()?);
    for name in [&verified, &backup::backup_name("2026-10-04T06:00:00Z".parse()?)] {
        store.objects.put(&ObjectPath::from(format!("verified/{name}.json")), PutPayload::from_static(b"{}")).await?;
    }

    let policy = Retention { keep_last: 4, keep_daily: 7, keep_weekly: 4 };
    let pruned = backup::prune(store, &policy).await?;
    let expected: Vec<String> = [
        "2026-10-31T18:00:00Z",
        "2026-10-31T12:00:00Z",
        "2026-10-31T06:00:00Z",
        "2026-10-31T00:00:00Z",
        "2026-10-30T18:00:00Z",
        "2026-10-29T18:00:00Z",
        "2026-10-28T18:00:00Z",
        "2026-10-27T18:00:00Z",
        "2026-10-26T18:00:00Z",
        "2026-10-25T18:00:00Z",
        "2026-10-18T18:00:00Z",
        "2026-10-11T18:00:00Z",
        "2026-10-05T06:00:00Z",
    ]
    .iter()
    .map(|t| Ok(backup::backup_name(t.parse()?)))
    .collect::<Result<_>>()?;
    assert_eq!(pruned.kept, expected);
    assert_eq!(pruned.deleted.len(), 111);
    assert_eq!(pruned.orphans, [orphan]);

    let listed: Vec<String> = backup::list(store).await?.into_iter().map(|m| m.name).collect();
    assert_eq!(listed, expected);
    let archives: Vec<String> = {
        use futures::TryStreamExt;
        let mut keys: Vec<String> = store
            .objects
            .list(Some(&ObjectPath::from("archives")))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await?;
        keys.sort();
        keys.reverse();
        keys
    };
    let mut expected_archives: Vec<String> = expected.iter().map(|n| format!("archives/{n}.tar.zst")).collect();
    expected_archives.insert(0, in_progress);
    expected_archives.push(unreadable_archive);
    assert_eq!(archives, expected_archives);

    assert!(store.objects.head(&garbage).await.is_ok(), "the unreadable manifest was deleted");
    // Pruning again changes nothing.
    let again = backup::prune(store, &policy).await?;
    assert!(again.deleted.is_empty() && again.orphans.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_cancelled_upload_leaves_no_backup_and_the_next_one_succeeds() -> Result<()> {
    // A private SeaweedFS, whose filer tells the multipart uploads in progress.
    let s3 = tokio::task::spawn_blocking(atlas_testbed::start_s3).await??;
    let bucket_name = unique("backup-cancel").to_lowercase();
    atlas_testbed::create_bucket(&s3.endpoint, &bucket_name).await?;
    let bucket =
        TestBucket { s3: s3.endpoint.clone(), name: bucket_name.clone(), region: atlas_testbed::S3_REGION.to_owned() };
    let data = data_dir("world")?;
    write_world(&data.0, "world")?;
    big_capture(&data.0)?;
    let store = Store::open(Some(&s3_spec(&bucket, "survival/")), &data.0, Some(credentials(&bucket)))?;

    // zstd's highest level on random bytes, on one thread, is slow: the upload is still running when it is
    // cancelled.
    let mut slow = CreateOptions::new(&data.0);
    slow.compression_level = 19;
    slow.compression_threads = Some(1);
    let task = {
        let store = store.clone();
        tokio::spawn(async move { backup::create(&store, &slow).await })
    };
    let mirror = data.0.join(".atlas/backup-mirror");
    until("the capture", || mirrored_big_file(&mirror)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3.uploads_in_progress(&bucket_name).await?.is_empty() {
        ensure!(!task.is_finished() && Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(!task.is_finished(), "the backup finished before it was cancelled");
    task.abort();
    assert!(task.await.is_err_and(|e| e.is_cancelled()));
    // The abort of the multipart upload runs on a spawned task: wait for SeaweedFS to have no upload left.
    no_upload_left(&s3, &bucket_name, "a cancelled backup").await?;

    assert!(backup::list(&store).await?.is_empty(), "a cancelled backup left a manifest");
    let objects: Vec<_> = {
        use futures::TryStreamExt;
        store.objects.list(None).try_collect().await?
    };
    assert!(objects.is_empty(), "a cancelled backup left objects: {objects:?}");

    let created = backup::create(&store, &CreateOptions::new(&data.0)).await?;
    assert_eq!(backup::list(&store).await?, [created]);
    Ok(())
}

#[tokio::test]
async fn a_backup_cancelled_while_the_store_starts_its_upload_leaves_no_upload() -> Result<()> {
    // A private SeaweedFS, reached through a proxy that holds back the answer naming a new upload's id until
    // the test lets it go: the store holds the upload, and the backup cannot know its id.
    let s3 = tokio::task::spawn_blocking(atlas_testbed::start_s3).await??;
    let bucket_name = unique("backup-cancel-start").to_lowercase();
    atlas_testbed::create_bucket(&s3.endpoint, &bucket_name).await?;
    let upstream: SocketAddr = s3.endpoint.endpoint.trim_start_matches("http://").parse()?;
    let (proxy, hold) = upload_id_holding_proxy(upstream).await?;
    let held = S3Endpoint { endpoint: format!("http://{proxy}"), ..s3.endpoint.clone() };
    let bucket = TestBucket { s3: held, name: bucket_name.clone(), region: atlas_testbed::S3_REGION.to_owned() };
    let data = data_dir("world")?;
    write_world(&data.0, "world")?;
    let store = Store::open(Some(&s3_spec(&bucket, "survival/")), &data.0, Some(credentials(&bucket)))?;

    let task = {
        let store = store.clone();
        let options = CreateOptions::new(&data.0);
        tokio::spawn(async move { backup::create(&store, &options).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !hold.holding.load(Ordering::SeqCst) || s3.uploads_in_progress(&bucket_name).await?.is_empty() {
        if task.is_finished() {
            bail!("the backup ended before its upload started: {:?}", task.await?);
        }
        ensure!(Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    ensure!(!hold.passed.load(Ordering::SeqCst), "the backup knew its upload's id before it was cancelled");
    // Let the answer go now, to a backup that no longer waits for it.
    hold.release.send_replace(true);
    assert!(task.await.is_err_and(|e| e.is_cancelled()), "the backup finished before it was cancelled");
    no_upload_left(&s3, &bucket_name, "a backup cancelled while its upload started").await?;
    let journal = data.0.join(backup::upload::JOURNAL_DIR);
    until("the upload's record to go", || std::fs::read_dir(&journal).is_ok_and(|mut d| d.next().is_none())).await?;
    Ok(())
}

/// Waits up to 20 s for SeaweedFS to hold no multipart upload in `bucket` (aborts run on spawned tasks).
async fn no_upload_left(s3: &atlas_testbed::S3Processes, bucket: &str, who: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = s3.uploads_in_progress(bucket).await?;
        if left.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{who} left multipart uploads: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What [`upload_id_holding_proxy`] did with the answer naming a multipart upload's id (`<UploadId>`).
struct Hold {
    /// It arrived, and is held back.
    holding: AtomicBool,
    /// It was passed on to the client.
    passed: AtomicBool,
    /// Set to let it (and every later one) go.
    release: tokio::sync::watch::Sender<bool>,
}

/// A loopback TCP proxy to `upstream` passing everything on at once, except an answer naming a multipart
/// upload's id, which it holds until the test releases it.
async fn upload_id_holding_proxy(upstream: SocketAddr) -> Result<(SocketAddr, Arc<Hold>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MARK: &[u8] = b"<UploadId>";
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    let hold = Arc::new(Hold {
        holding: AtomicBool::new(false),
        passed: AtomicBool::new(false),
        release: tokio::sync::watch::Sender::new(false),
    });
    let shared = hold.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let hold = shared.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let requests = tokio::io::copy(&mut from_client, &mut to_server);
                let answers = async {
                    let mut buf = vec![0; 64 * 1024];
                    // The end of the last chunk, so a mark split between two chunks is still seen (before
                    // the id that follows it is passed on).
                    let mut seen: Vec<u8> = Vec::new();
                    loop {
                        let n = from_server.read(&mut buf).await?;
                        if n == 0 {
                            return to_client.shutdown().await;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(MARK.len()).any(|w| w == MARK) {
                            hold.holding.store(true, Ordering::SeqCst);
                            let _ = hold.release.subscribe().wait_for(|released| *released).await;
                            hold.passed.store(true, Ordering::SeqCst);
                        }
                        seen.drain(..seen.len().saturating_sub(MARK.len() - 1));
                        to_client.write_all(&buf[..n]).await?;
                    }
                };
                let _ = tokio::join!(requests, answers);
            });
        }
    });
    Ok((address, hold))
}

/// Whether the capture mirror holds all of `big_capture`'s region file.
fn mirrored_big_file(mirror: &Path) -> bool {
    std::fs::metadata(mirror.join("world/region/r.0.0.mca")).is_ok_and(|m| m.len() == BIG_LEN as u64)
}

// ---- Aborting uploads: a multipart upload wrapped to count what happens to it ----

#[derive(Debug, Default)]
struct Counters {
    parts: AtomicUsize,
    /// Parts answered (by the store, or by the injected failure).
    answered: AtomicUsize,
    /// Parts sent but not answered when the upload was aborted.
    unanswered_at_abort: AtomicUsize,
    completed: AtomicUsize,
    /// Aborts the store has confirmed.
    aborted: AtomicUsize,
}

/// Delegates to a real upload, optionally slowing every part down or failing one of them.
#[derive(Debug)]
struct Watched {
    inner: Box<dyn MultipartUpload>,
    counters: Arc<Counters>,
    fail_part: Option<usize>,
    part_delay: Duration,
}

type BoxedResult<'a, T> = Pin<Box<dyn Future<Output = object_store::Result<T>> + Send + 'a>>;

// Written out by hand: the trait is `#[async_trait]` and this crate does not depend on async-trait.
impl MultipartUpload for Watched {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let n = self.counters.parts.fetch_add(1, Ordering::SeqCst) + 1;
        let inner = self.inner.put_part(data);
        let (fail, delay, counters) = (self.fail_part == Some(n), self.part_delay, self.counters.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let answer = if fail {
                Err(object_store::Error::Generic { store: "watched", source: "injected part failure".into() })
            } else {
                inner.await
            };
            counters.answered.fetch_add(1, Ordering::SeqCst);
            answer
        })
    }

    fn complete<'life0, 'async_trait>(&'life0 mut self) -> BoxedResult<'async_trait, PutResult>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.counters.completed.fetch_add(1, Ordering::SeqCst);
        Box::pin(self.inner.complete())
    }

    fn abort<'life0, 'async_trait>(&'life0 mut self) -> BoxedResult<'async_trait, ()>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let unanswered = self.counters.parts.load(Ordering::SeqCst) - self.counters.answered.load(Ordering::SeqCst);
        self.counters.unanswered_at_abort.store(unanswered, Ordering::SeqCst);
        Box::pin(async move {
            self.inner.abort().await?;
            self.counters.aborted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

const BIG_LEN: usize = 30 * 1024 * 1024;

/// A captured directory with 30 MiB of incompressible bytes: four parts.
fn big_capture(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("world/region"))?;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let bytes: Vec<u8> = (0..BIG_LEN)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect();
    std::fs::write(dir.join("world/region/r.0.0.mca"), bytes)?;
    Ok(())
}

async fn watched_upload(
    store: &Store,
    key: &ObjectPath,
    fail_part: Option<usize>,
    part_delay: Duration,
) -> Result<(Box<dyn MultipartUpload>, Arc<Counters>)> {
    let counters = Arc::new(Counters::default());
    let inner = store.objects.put_multipart(key).await?;
    Ok((Box::new(Watched { inner, counters: counters.clone(), fail_part, part_delay }), counters))
}

/// A private SeaweedFS (whose filer tells the multipart uploads in progress) with a fresh bucket, and a
/// store on it.
async fn private_s3(prefix: &str, data: &Path) -> Result<(atlas_testbed::S3Processes, String, Store)> {
    let s3 = tokio::task::spawn_blocking(atlas_testbed::start_s3).await??;
    let bucket_name = unique(prefix).to_lowercase();
    atlas_testbed::create_bucket(&s3.endpoint, &bucket_name).await?;
    let bucket =
        TestBucket { s3: s3.endpoint.clone(), name: bucket_name.clone(), region: atlas_testbed::S3_REGION.to_owned() };
    let store = Store::open(Some(&s3_spec(&bucket, "survival/")), data, Some(credentials(&bucket)))?;
    Ok((s3, bucket_name, store))
}

#[tokio::test]
async fn a_failed_part_aborts_the_multipart_upload() -> Result<()> {
    let dir = data_dir("world")?;
    big_capture(&dir.0)?;
    let (s3, bucket, store) = private_s3("backup-failed-part", &dir.0).await?;
    let key = ObjectPath::from("archives/failed.tar.zst");
    let (upload, counters) = watched_upload(&store, &key, Some(2), Duration::ZERO).await?;
    // SeaweedFS holds the upload (so the check below can see one go).
    ensure!(s3.uploads_in_progress(&bucket).await?.len() == 1, "the upload did not start");
    let err = stream_archive(upload, "archives/failed.tar.zst", dir.0.clone(), 1).await.err().context("succeeded")?;
    assert_eq!(err.category(), "upload", "{err:?}");
    no_upload_left(&s3, &bucket, "a failed part").await?;
    assert_eq!(counters.aborted.load(Ordering::SeqCst), 1, "{counters:?}");
    assert_eq!(counters.completed.load(Ordering::SeqCst), 0, "{counters:?}");
    assert!(store.objects.head(&key).await.is_err(), "a failed upload left an object");
    Ok(())
}

/// Polls `done` without blocking the runtime, for up to 30 s.
async fn until(what: &str, done: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_cancelled_multipart_upload_is_aborted() -> Result<()> {
    let dir = data_dir("world")?;
    big_capture(&dir.0)?;
    let (s3, bucket, store) = private_s3("backup-cancelled-part", &dir.0).await?;
    let key = ObjectPath::from("archives/cancelled.tar.zst");
    let (upload, counters) = watched_upload(&store, &key, None, Duration::from_millis(300)).await?;
    ensure!(s3.uploads_in_progress(&bucket).await?.len() == 1, "the upload did not start");
    let task = tokio::spawn(stream_archive(upload, "archives/cancelled.tar.zst", dir.0.clone(), 1));
    until("the first part", || counters.parts.load(Ordering::SeqCst) > 0).await?;
    task.abort();
    assert!(task.await.is_err(), "the upload finished before it was cancelled");
    // The abort runs on a spawned task: SeaweedFS holds no upload once it is done.
    no_upload_left(&s3, &bucket, "a cancelled upload").await?;
    until("the abort", || counters.aborted.load(Ordering::SeqCst) == 1).await?;
    // A part's request still on its way could be stored after the abort and open the upload again.
    assert_eq!(counters.unanswered_at_abort.load(Ordering::SeqCst), 0, "aborted with parts in flight: {counters:?}");
    assert_eq!(counters.completed.load(Ordering::SeqCst), 0);
    assert!(store.objects.head(&key).await.is_err(), "a cancelled upload left an object");
    Ok(())
}

#[tokio::test]
async fn seaweedfs_stopped_mid_upload_fails_clearly_leaves_no_upload_and_the_next_backup_succeeds() -> Result<()> {
    // A private SeaweedFS this test can kill and start again.
    let s3 = tokio::task::spawn_blocking(atlas_testbed::start_s3).await??;
    let bucket_name = unique("backup-killed").to_lowercase();
    atlas_testbed::create_bucket(&s3.endpoint, &bucket_name).await?;
    let bucket =
        TestBucket { s3: s3.endpoint.clone(), name: bucket_name.clone(), region: atlas_testbed::S3_REGION.to_owned() };
    let data = data_dir("world")?;
    big_capture(&data.0)?;
    let store = Store::open(Some(&s3_spec(&bucket, "server/")), &data.0, Some(credentials(&bucket)))?;

    // zstd's highest level on random bytes, on one thread, is slow: the upload is still running when the
    // store stops.
    let mut options = CreateOptions::new(&data.0);
    options.compression_level = 19;
    options.compression_threads = Some(1);
    let task = {
        let store = store.clone();
        tokio::spawn(async move { backup::create(&store, &options).await })
    };
    // Stopped once the upload is recorded (started, its id known): what the next backup must abort.
    let journal = data.0.join(backup::upload::JOURNAL_DIR);
    let recorded = || {
        std::fs::read_dir(&journal)
            .is_ok_and(|entries| entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "json")))
    };
    until("the upload's record", recorded).await?;
    ensure!(!task.is_finished(), "the backup finished before the store was stopped");
    let mut s3 = tokio::task::spawn_blocking(move || {
        let mut s3 = s3;
        s3.kill();
        s3
    })
    .await?;

    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(120), task).await??.err().context("the backup succeeded")?;
    assert_eq!(err.category(), "upload", "{err:?}");
    assert!(matches!(err, BackupError::Upload(_) | BackupError::WriteManifest { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "failing took {:?}", started.elapsed());
    // The abort could not reach the store either: the upload is recorded for the next backup to abort.
    assert_eq!(std::fs::read_dir(&journal)?.count(), 1, "the failed upload is not recorded");

    let s3 = tokio::task::spawn_blocking(move || s3.restart().map(|()| s3)).await??;
    // SeaweedFS really holds the upload the failed backup started (so the check below can see one).
    let orphans = s3.uploads_in_progress(&bucket_name).await?;
    assert_eq!(orphans.len(), 1, "uploads in progress after the restart: {orphans:?}");
    assert!(backup::list(&store).await?.is_empty(), "a failed backup left a manifest");

    let created = backup::create(&store, &CreateOptions::new(&data.0)).await?;
    assert_eq!(backup::list(&store).await?, [created]);
    let left = s3.uploads_in_progress(&bucket_name).await?;
    assert!(left.is_empty(), "multipart uploads left in progress: {left:?}");
    assert_eq!(std::fs::read_dir(&journal)?.count(), 0, "the journal still records an upload");
    Ok(())
}
