//! `atlas-runner backup ...` as a user runs it, against real SeaweedFS: offline, and through a running
//! runner supervising the fake server (`tests/fixtures/FakeServer.java`).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use atlas_runner::backup::Manifest;
use atlas_testbed::{TestBucket, TestS3};
use common::{Fixture, Runner, binary, error_line, http_get, promtool_check, tree, wait_for};

/// Appends `spec.backup` with the bucket's store (credentials from a file) and `extra` lines (4-space indent).
fn add_backup_spec(fixture: &Fixture, bucket: &TestBucket, extra: &str) -> Result<()> {
    let creds = fixture.root.join("s3.env");
    std::fs::write(
        &creds,
        format!("AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n", bucket.s3.access_key, bucket.s3.secret_key),
    )?;
    let mut spec = std::fs::read_to_string(&fixture.spec)?;
    spec.push_str(&format!(
        "  backup:\n    store:\n      s3: {{bucket: {}, prefix: cli/, endpoint: \"{}\", region: {}, pathStyle: true, credentialsFile: \"{}\"}}\n{extra}",
        bucket.name,
        bucket.s3.endpoint,
        bucket.region,
        creds.display()
    ));
    std::fs::write(&fixture.spec, spec)?;
    Ok(())
}

/// `atlas-runner backup SUBCOMMAND --spec S --data D ARGS...`, with no AWS variables in the environment.
fn backup_cli(fixture: &Fixture, subcommand: &str, args: &[&str]) -> Result<Output> {
    Ok(Command::new(binary())
        .args(["backup", subcommand, "--spec"])
        .arg(&fixture.spec)
        .arg("--data")
        .arg(&fixture.data)
        .args(args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("RUST_LOG", "warn")
        .output()?)
}

fn ok(out: Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The value of the sample `name` (no labels) in Prometheus text, if there is one.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Fails unless `metrics` has `atlas_backup_last_success_timestamp_seconds` and it is within a few
/// minutes of now (a missing line must not pass for a set one).
fn assert_recent_success(metrics: &str) -> Result<()> {
    let name = "atlas_backup_last_success_timestamp_seconds";
    let value = sample(metrics, name).with_context(|| format!("no {name} sample:\n{metrics}"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    ensure!((now - value).abs() < 300.0, "{name} is {value}, now is {now}");
    Ok(())
}

/// The files of a backup's archive (`NAME.tar.zst` in `bucket`), extracted with the `tar` and `zstd`
/// crates, not the runner's own reader, into `into`.
async fn extract_backup(bucket: &TestBucket, manifest: &Manifest, into: &Path) -> Result<()> {
    let archive = s3_get(bucket, &format!("cli/{}", manifest.archive_key)).await?;
    let decoder = zstd::stream::read::Decoder::new(std::io::Cursor::new(archive))?;
    tar::Archive::new(decoder).unpack(into).with_context(|| format!("unpack {}", manifest.name))?;
    Ok(())
}

fn write_world(data: &Path) -> Result<()> {
    for (dim, files) in [("world", 40), ("world_nether", 5)] {
        std::fs::create_dir_all(data.join(dim).join("region"))?;
        std::fs::write(data.join(dim).join("level.dat"), format!("level of {dim}"))?;
        for i in 0..files {
            let bytes: Vec<u8> = (0..20_000u32).map(|b| (b.wrapping_mul(i + 7) >> 3) as u8).collect();
            std::fs::write(data.join(dim).join(format!("region/r.{i}.0.mca")), bytes)?;
        }
    }
    std::fs::create_dir_all(data.join("world/data/empty"))?;
    Ok(())
}

async fn s3_get(bucket: &TestBucket, key: &str) -> Result<bytes::Bytes> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let response = client.get(bucket.presign("GET", key)?).send().await?.error_for_status()?;
    Ok(response.bytes().await?)
}

async fn s3_put(bucket: &TestBucket, key: &str, body: bytes::Bytes) -> Result<()> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    client.put(bucket.presign("PUT", key)?).body(body).send().await?.error_for_status()?;
    Ok(())
}

#[tokio::test]
async fn create_list_verify_restore_through_the_cli_gives_a_byte_identical_world() -> Result<()> {
    let fixture = Fixture::new("backup-cli")?;
    let bucket = TestS3::shared().await?.bucket("backup-cli").await?;
    add_backup_spec(&fixture, &bucket, "    retention: {keepLast: 1}\n")?;
    write_world(&fixture.data)?;
    let before = (tree(&fixture.data.join("world"))?, tree(&fixture.data.join("world_nether"))?);

    let textfile = fixture.root.join("backup.prom");
    let textfile_arg = textfile.display().to_string();
    let created: Manifest = serde_json::from_str(&ok(
        backup_cli(&fixture, "create", &["--json", "--metrics-textfile", &textfile_arg])?,
        "create",
    )?)?;
    assert_eq!(created.worlds, ["world", "world_nether"]);
    // The run's metrics, as node_exporter's textfile collector reads them.
    let metrics = std::fs::read_to_string(&textfile)?;
    for line in [
        "atlas_backup_duration_seconds_count 1".to_owned(),
        format!("atlas_backup_size_bytes {}", created.archive_bytes),
        format!("atlas_backup_uploaded_bytes_total {}", created.archive_bytes),
        "atlas_backup_save_off_seconds 0".to_owned(),
    ] {
        assert!(metrics.contains(&line), "the textfile lacks {line:?}:\n{metrics}");
    }
    assert_recent_success(&metrics)?;
    promtool_check(&metrics)?;
    assert_eq!(created.files, 47);
    assert!(created.save_off_ms.is_none(), "no runner, so no RCON: {created:?}");
    let listed: Vec<Manifest> = serde_json::from_str(&ok(backup_cli(&fixture, "list", &["--json"])?, "list")?)?;
    assert_eq!(listed, std::slice::from_ref(&created));
    let table = ok(backup_cli(&fixture, "list", &[])?, "list")?;
    assert!(table.starts_with("NAME") && table.contains(&created.name), "{table}");
    let verified = ok(backup_cli(&fixture, "verify", &[&created.name])?, "verify")?;
    assert!(verified.contains("is intact") && verified.contains(&created.archive_sha256), "{verified}");

    // The world moves on; the restore brings back exactly what was backed up.
    std::fs::write(fixture.data.join("world/region/r.0.0.mca"), b"overwritten")?;
    std::fs::write(fixture.data.join("world/new.dat"), b"new")?;
    std::fs::remove_dir_all(fixture.data.join("world_nether"))?;
    let restored = ok(backup_cli(&fixture, "restore", &[&created.name])?, "restore")?;
    assert!(restored.contains(&format!("restored {}", created.name)), "{restored}");
    assert!(tree(&fixture.data.join("world"))? == before.0, "the overworld differs after the restore");
    assert!(tree(&fixture.data.join("world_nether"))? == before.1, "the nether differs after the restore");

    // Errors are one line that says what to do.
    let line = error_line(&backup_cli(&fixture, "verify", &["20260101T000000.000Z"])?, "verify of a missing backup")?;
    assert!(line.contains("no backup named 20260101T000000.000Z") && line.contains("backup list"), "{line}");
    // A bucket that does not exist: a clear error before anything is captured.
    let spec = std::fs::read_to_string(&fixture.spec)?;
    std::fs::write(&fixture.spec, spec.replace(&format!("bucket: {}", bucket.name), "bucket: no-such-bucket-here"))?;
    let line = error_line(&backup_cli(&fixture, "create", &[])?, "create into a missing bucket")?;
    assert!(line.contains("bucket does not exist") && line.contains("create the bucket"), "{line}");
    std::fs::write(&fixture.spec, spec)?;

    // A truncated archive is refused before the live world is touched.
    let key = format!("cli/{}", created.archive_key);
    let good = s3_get(&bucket, &key).await?;
    s3_put(&bucket, &key, good.slice(..good.len() - 100)).await?;
    std::fs::write(fixture.data.join("world/live.dat"), b"live")?;
    let live = tree(&fixture.data.join("world"))?;
    let line = error_line(&backup_cli(&fixture, "restore", &[&created.name])?, "restore of a truncated archive")?;
    assert!(line.contains("truncated") && line.contains("nothing live was touched"), "{line}");
    assert!(tree(&fixture.data.join("world"))? == live, "the live world changed");
    let line = error_line(&backup_cli(&fixture, "verify", &[&created.name])?, "verify of a truncated archive")?;
    assert!(line.contains("truncated"), "{line}");

    // prune applies spec.backup.retention (keepLast 1): the newer backup stays, the older one goes.
    let newer: Manifest = serde_json::from_str(&ok(backup_cli(&fixture, "create", &["--json"])?, "create")?)?;
    let pruned: serde_json::Value = serde_json::from_str(&ok(backup_cli(&fixture, "prune", &["--json"])?, "prune")?)?;
    assert_eq!(pruned["kept"], serde_json::json!([newer.name]), "{pruned}");
    assert_eq!(pruned["deleted"], serde_json::json!([created.name]), "{pruned}");
    let listed: Vec<Manifest> = serde_json::from_str(&ok(backup_cli(&fixture, "list", &["--json"])?, "list")?)?;
    assert_eq!(listed, [newer]);
    Ok(())
}

#[tokio::test]
async fn restore_through_a_running_runner_stops_takes_a_safety_backup_and_restarts() -> Result<()> {
    let fixture = Fixture::new("backup-runner")?;
    fixture.behaviour("autosave-interval-ms=50\nregion-write-ms=20\n")?;
    let bucket = TestS3::shared().await?.bucket("backup-runner").await?;
    add_backup_spec(&fixture, &bucket, "")?;
    let mut runner = Runner::start(&fixture, &[])?;
    let first_pid = runner.wait_running()?["pid"].as_u64().context("a pid")?;

    // Through the runner: saving paused over RCON, the window measured.
    let created: Manifest = serde_json::from_str(&ok(backup_cli(&fixture, "create", &["--json"])?, "create")?)?;
    let window = created.save_off_ms.context("a backup through the runner measures the save-off window")?;
    assert_eq!(runner.status()?["lastBackup"]["name"], created.name.as_str(), "status shows the last backup");
    // Bounded, not instant: save-off, the flush and save-on each wait for a write in progress.
    assert!(window < 30_000, "saving was off for {window} ms");
    assert_eq!(created.server_version.as_deref(), Some("1.21.4"));
    // The capture mirror the backup was archived from holds a whole region file, never a torn one.
    common::region_generation(&fixture.data.join(".atlas/backup-mirror/world/region/r.0.0.mca"))
        .context("the mirrored region file")?;

    std::fs::write(fixture.data.join("world/after-backup.dat"), b"made after the backup")?;
    let out = ok(backup_cli(&fixture, "restore", &[&created.name, "--json"])?, "restore")?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(report["restarted"], true, "{report}");
    let safety = report["safetyBackup"].as_str().context("a safety backup")?.to_owned();
    let previous = report["previous"][0].as_str().context("the replaced world kept aside")?.to_owned();

    assert!(!fixture.data.join("world/after-backup.dat").exists(), "the world was not replaced");
    assert_eq!(std::fs::read(Path::new(&previous).join("after-backup.dat"))?, b"made after the backup");
    let status = runner.wait_running()?;
    let second_pid = status["pid"].as_u64().context("a pid")?;
    assert_ne!(first_pid, second_pid, "the server was not restarted");
    // The first server was stopped gracefully (over RCON, a clean exit the runner expected), not killed
    // or crashed, and exactly once.
    assert_eq!(runner.logs_with("[Rcon: Stopping the server]").len(), 1, "the server was not stopped over RCON");
    let exits: Vec<(String, bool)> = runner
        .logs_with("server exited")
        .iter()
        .map(|l| (l["reason"].as_str().unwrap_or_default().to_owned(), l["unexpected"] == true))
        .collect();
    assert_eq!(exits, [("clean".to_owned(), false)], "how the first server ended");

    // The safety backup is a complete backup of the replaced world: its archive holds exactly the world
    // the restore moved aside.
    let listed: Vec<Manifest> = serde_json::from_str(&ok(backup_cli(&fixture, "list", &["--json"])?, "list")?)?;
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [safety.as_str(), created.name.as_str()]);
    ok(backup_cli(&fixture, "verify", &[&safety])?, "verify the safety backup")?;
    let safety_manifest = &listed[0];
    assert_eq!(safety_manifest.worlds, ["world"], "{safety_manifest:?}");
    let extracted = fixture.root.join("safety-extracted");
    extract_backup(&bucket, safety_manifest, &extracted).await?;
    let replaced = tree(Path::new(&previous))?;
    assert!(
        replaced.contains_key("after-backup.dat") && replaced.contains_key("region/r.0.0.mca"),
        "{:?}",
        replaced.keys()
    );
    assert!(tree(&extracted.join("world"))? == replaced, "the safety backup differs from the replaced world");

    // The runner's metrics count the one backup it took; the CLI took the safety backup itself.
    let (_, body) = http_get(&runner.metrics_addr, "/metrics")?;
    assert!(body.contains("atlas_backup_duration_seconds_count 1"), "{body}");
    assert_recent_success(&body)?;
    promtool_check(&body)?;
    Ok(())
}

#[tokio::test]
async fn the_runner_starts_no_server_while_a_capture_or_restore_holds_the_world_but_does_during_an_upload() -> Result<()>
{
    let fixture = Fixture::new("backup-spawn-lock")?;
    let mut runner = Runner::start(&fixture, &[])?;
    let first = runner.wait_running()?;
    // A backup that is uploading holds the backup lock only: a restart is not held back by it.
    let uploading = atlas_runner::backup::lock(&fixture.data)?;
    ok(common::cli(&fixture.data, &["restart"])?, "restart")?;
    runner.wait_status("restarted during an upload", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["pid"] != first["pid"]
    })?;
    drop(uploading);

    ok(common::cli(&fixture.data, &["stop"])?, "stop")?;
    // What a capture or a restore swap holds.
    let world = atlas_runner::backup::world_lock(&fixture.data)?;
    ok(common::cli(&fixture.data, &["restart"])?, "restart")?;
    wait_for("the runner waiting for the lock", Duration::from_secs(30), || {
        (!runner.logs_with("a backup or restore is running on the data dir").is_empty()).then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let status = runner.status()?;
    assert!(status["pid"].is_null(), "a server started under the world lock: {status}");
    drop(world);
    runner.wait_running()?;
    Ok(())
}

#[tokio::test]
async fn scheduled_backups_run_in_the_runner_prune_and_survive_failures() -> Result<()> {
    let fixture = Fixture::new("backup-schedule")?;
    let bucket = TestS3::shared().await?.bucket("backup-schedule").await?;
    add_backup_spec(&fixture, &bucket, "    schedule: \"*/5 * * * *\"\n    retention: {keepLast: 2}\n")?;
    let mut runner = Runner::start_with_env(&fixture, &[], &[("ATLAS_BACKUP_SCHEDULE_SECONDS", "1")])?;
    let server = runner.wait_running()?;
    // Retention runs after each success: the third backup's prune keeps exactly the two newest.
    let pruned = wait_for("the first prune", Duration::from_secs(90), || {
        runner.logs_with("old backups pruned").into_iter().next()
    })?;
    let done: Vec<String> = runner
        .logs_with("scheduled backup done")
        .iter()
        .filter_map(|l| l["backup"].as_str().map(str::to_owned))
        .collect();
    ensure!(done.len() >= 3, "pruned before three backups: {done:?}");
    assert_eq!(pruned["kept"], format!("{},{}", done[2], done[1]), "{pruned}");
    assert_eq!(pruned["deleted"], done[0].as_str(), "{pruned}");
    let listed: Vec<Manifest> = serde_json::from_str(&ok(backup_cli(&fixture, "list", &["--json"])?, "list")?)?;
    assert!(!listed.iter().any(|m| m.name == done[0]), "the pruned backup is still listed");
    assert!(listed.iter().all(|m| m.save_off_ms.is_some()), "scheduled backups go through RCON");
    // What the "backup too old" alert compares the newest backup's age with.
    let (_, body) = http_get(&runner.metrics_addr, "/metrics")?;
    assert!(body.contains("\natlas_backup_schedule_interval_seconds 1\n"), "{body}");

    // The server cannot save: backups fail (with the store working, so a prune would succeed), are counted,
    // and delete nothing.
    std::fs::write(fixture.data.join("fake-save-fails"), b"")?;
    let failures = |runner: &Runner| -> Option<u64> {
        let (_, body) = http_get(&runner.metrics_addr, "/metrics").ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix("atlas_backup_failures_total{category=\"flush\"} "))
            .and_then(|n| n.parse().ok())
    };
    wait_for("a counted failure", Duration::from_secs(30), || failures(&runner).filter(|n| *n >= 1))?;
    let store = atlas_runner::backup::store::Store::open(
        Some(&common::s3_spec(&bucket, "cli/")),
        &fixture.data,
        Some(atlas_runner::backup::store::S3Credentials {
            access_key_id: bucket.s3.access_key.clone(),
            secret_access_key: bucket.s3.secret_key.clone(),
            session_token: None,
        }),
    )?;
    let names = |m: Vec<Manifest>| m.into_iter().map(|m| m.name).collect::<Vec<_>>();
    let before = names(atlas_runner::backup::list(&store).await?);
    wait_for("two more failures", Duration::from_secs(30), || failures(&runner).filter(|n| *n >= 3))?;
    assert!(!runner.logs_with("backup failed").is_empty());
    assert_eq!(names(atlas_runner::backup::list(&store).await?), before, "a failed backup deleted backups");
    assert!(!before.is_empty());

    // The server ran on through the failures, and once it can save again the schedule takes backups again.
    let now = runner.status()?;
    assert_eq!((&now["phase"], &now["pid"]), (&"Running".into(), &server["pid"]), "{now}");
    let done = |runner: &Runner| runner.logs_with("scheduled backup done").len();
    let succeeded = done(&runner);
    std::fs::remove_file(fixture.data.join("fake-save-fails"))?;
    wait_for("a scheduled backup after the failures", Duration::from_secs(60), || {
        (done(&runner) > succeeded).then_some(())
    })?;
    let newest = runner.logs_with("scheduled backup done").last().and_then(|l| l["backup"].as_str().map(str::to_owned));
    let listed = names(atlas_runner::backup::list(&store).await?);
    assert!(newest.is_some() && listed.first() == newest.as_ref(), "{newest:?} is not the newest of {listed:?}");
    assert!(!before.contains(&listed[0]), "no new backup: {listed:?}");
    let now = runner.status()?;
    assert_eq!((&now["phase"], &now["pid"]), (&"Running".into(), &server["pid"]), "{now}");
    Ok(())
}

/// Every world and included file of the restore-kill test, each either as the backup holds it (new) or as
/// the live data dir held it before the restore (old).
struct RestoreStates {
    worlds: Vec<(String, Tree, Tree)>,
    files: Vec<(String, Vec<u8>, Vec<u8>)>,
}

type Tree = std::collections::BTreeMap<String, Option<Vec<u8>>>;

/// How a restore killed at some point left a data dir.
#[derive(Debug, Default)]
struct Seen {
    new: usize,
    old: usize,
    /// A restored copy moved next to a live path, not yet exchanged with it.
    pending: bool,
    /// Worlds that are new.
    new_worlds: usize,
}

impl RestoreStates {
    /// Fails unless every world path holds the whole old or the whole new world, and every included file
    /// the old or the new file; a world replaced must be kept aside whole. Says how many are which.
    fn check(&self, data: &Path) -> Result<Seen> {
        let mut seen = Seen::default();
        let names: Vec<String> = std::fs::read_dir(data)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        for (world, old, new) in &self.worlds {
            let live = tree(&data.join(world)).with_context(|| format!("{world} is missing"))?;
            let asides: Vec<Tree> = names
                .iter()
                .filter(|n| n.starts_with(&format!("{world}.before-restore-")))
                .map(|n| tree(&data.join(n)))
                .collect::<Result<_>>()?;
            if live == *new {
                seen.new += 1;
                seen.new_worlds += 1;
                ensure!(asides.iter().any(|t| t == old), "{world} was replaced but the old world is not kept aside");
            } else if live == *old {
                seen.old += 1;
                seen.pending |= asides.iter().any(|t| t == new);
            } else {
                anyhow::bail!("{world} is neither the old nor the new world: {:?}", live.keys().collect::<Vec<_>>());
            }
        }
        for (path, old, new) in &self.files {
            let live = std::fs::read(data.join(path)).with_context(|| format!("{path} is missing"))?;
            if live == *new {
                seen.new += 1;
            } else if live == *old {
                seen.old += 1;
            } else {
                anyhow::bail!("{path} is neither the old nor the new file");
            }
        }
        Ok(seen)
    }
}

/// Copies the tree at `from` to `to` (files and directories only).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn a_restore_killed_at_any_point_of_its_swap_leaves_each_world_old_or_new() -> Result<()> {
    let root = tempfile::Builder::new().prefix("atlas-restore-kill-").tempdir()?;
    let root = root.path();
    let template = root.join("template");
    let worlds = ["world", "world_nether", "world_the_end"];
    // Many included files: the swap replaces them one by one, after the worlds, so it lasts long enough for
    // kills to land inside it.
    let configs = 800;
    let write = |data: &Path, what: &str| -> Result<()> {
        std::fs::create_dir_all(data)?;
        std::fs::write(data.join("server.properties"), "level-name=world\n")?;
        for world in worlds {
            std::fs::create_dir_all(data.join(world).join("region"))?;
            std::fs::write(data.join(world).join("level.dat"), format!("{what} level of {world}"))?;
            for i in 0..10 {
                std::fs::write(data.join(world).join(format!("region/r.{i}.0.mca")), format!("{what} {world} {i}"))?;
            }
        }
        std::fs::create_dir_all(data.join("config"))?;
        for i in 0..configs {
            std::fs::write(data.join(format!("config/c{i:03}.toml")), format!("{what} config {i}"))?;
        }
        Ok(())
    };
    write(&template, "new")?;
    let spec = root.join("server.yaml");
    std::fs::write(
        &spec,
        format!(
            "eula: true\nserver: {{type: vanilla}}\nbackup:\n  store: {{local: {{path: \"{}\"}}}}\n  include: [\"config/**\"]\n",
            root.join("store").display()
        ),
    )?;
    let cli = |subcommand: &str, data: &Path, args: &[&str]| {
        let mut command = Command::new(binary());
        command.args(["backup", subcommand, "--spec"]).arg(&spec).arg("--data").arg(data).args(args);
        command
    };
    let created: Manifest = serde_json::from_str(&ok(cli("create", &template, &["--json"]).output()?, "create")?)?;
    assert_eq!(created.worlds, worlds);
    let new: Vec<Tree> = worlds.iter().map(|w| tree(&template.join(w))).collect::<Result<_>>()?;
    // The live data dir moves on: every file changes, the overworld gains a file, the nether loses one.
    write(&template, "old")?;
    std::fs::write(template.join("world/old-only.dat"), "old")?;
    std::fs::remove_file(template.join("world_nether/region/r.9.0.mca"))?;
    std::fs::remove_dir_all(template.join(".atlas"))?;
    let states = RestoreStates {
        worlds: worlds
            .iter()
            .zip(new)
            .map(|(w, new)| Ok((w.to_string(), tree(&template.join(w))?, new)))
            .collect::<Result<_>>()?,
        files: (0..configs)
            .map(|i| {
                let path = format!("config/c{i:03}.toml");
                Ok((path.clone(), std::fs::read(template.join(&path))?, format!("new config {i}").into_bytes()))
            })
            .collect::<Result<_>>()?,
    };
    let total = states.worlds.len() + states.files.len();

    // `backup restore` with no runner on the data dir: it logs "replacing the world" just before the swap.
    let restore = |data: &Path| {
        let mut command = cli("restore", data, &[&created.name]);
        common::spawn_watching(command.env("RUST_LOG", "info"), "replacing the world")
    };

    // One undisturbed run measures the whole restore and the swap at its end.
    let data = root.join("data-0");
    copy_tree(&template, &data)?;
    let started = std::time::Instant::now();
    let (mut child, swapping) = restore(&data)?;
    let (schedule, status) = common::KillSchedule::measure(40, started, &mut child, &swapping)?;
    ensure!(status.success(), "an undisturbed restore failed");
    let seen = states.check(&data)?;
    ensure!(seen.new == total, "an undisturbed restore left {seen:?}");

    // Kills over the whole restore (download and extraction leave the old world) and over the swap.
    use std::os::unix::process::ExitStatusExt;
    let (mut before, mut inside, mut after, mut among_worlds) = (0, 0, 0, 0);
    schedule.run(
        |n| {
            let data = root.join(format!("data-{n}"));
            copy_tree(&template, &data)?;
            restore(&data)
        },
        |n, status| {
            let data = root.join(format!("data-{n}"));
            let seen = states.check(&data).with_context(|| format!("run {n}, killed: {:?}", status.signal()))?;
            let landed_inside = match (seen.new, seen.old) {
                (0, _) if !seen.pending => {
                    before += 1;
                    false
                }
                (new, 0) if new == total => {
                    after += 1;
                    false
                }
                _ => {
                    inside += 1;
                    true
                }
            };
            // Worlds are swapped first: a kill between two of them leaves some worlds new and some old.
            // Counted to be told, not asserted: see the note at the end.
            if seen.new_worlds < states.worlds.len() && (seen.new_worlds > 0 || seen.pending) {
                among_worlds += 1;
            }
            let _ = std::fs::remove_dir_all(&data);
            Ok(landed_inside)
        },
    )?;
    eprintln!(
        "kill -9 over {:?} (swap {:?}): {before} before the swap, {inside} inside it ({among_worlds} among the \
         worlds), {after} after it",
        schedule.full, schedule.step
    );
    ensure!(before > 0, "no kill landed before the swap");
    ensure!(inside > 0, "no kill landed inside a swap");
    // What this test does not prove: a kill among the worlds' own steps. The three worlds take six steps (a
    // rename aside and an exchange each) of a few microseconds in all, far less than the time a kill takes to
    // land here, so kills seldom fall among them (measured: 2 of 60 kills aimed over the swap's first 2 ms,
    // none in two ordinary runs). The state after each of those steps is proven by the unit test
    // `a_swap_killed_before_any_of_its_steps_leaves_each_path_old_or_new` in src/backup/mod.rs, which stops
    // the same swap before every step as a kill would; here the checks above hold for whichever kills did.
    Ok(())
}
