//! `atlas-runner pack build|status|rollback` as a user runs them.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use atlas_runner::pack::{ArchiveFormat, Limits, PackStore, Preserve, lock, lock_path};

fn atlas(args: &[&str]) -> Result<Output> {
    Ok(Command::new(common::binary()).args(args).output()?)
}

fn ok(out: Output) -> Result<String> {
    anyhow::ensure!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

fn write(dir: &Path, path: &str, content: &str) -> Result<()> {
    let target = dir.join(path);
    fs::create_dir_all(target.parent().context("parent")?)?;
    Ok(fs::write(target, content)?)
}

/// Builds a pack with the CLI and applies it with the library, as the runner will.
fn build_and_apply(root: &Path, data: &Path, version: &str, files: &[(&str, &str)]) -> Result<String> {
    let src = root.join(format!("src-{version}"));
    for (path, content) in files {
        write(&src, path, content)?;
    }
    let out = root.join(format!("pack-{version}.tar.zst"));
    let s = |p: &Path| p.display().to_string();
    let printed = ok(atlas(&[
        "pack",
        "build",
        &s(&src),
        "-o",
        &s(&out),
        "--version",
        version,
        "--minecraft",
        "1.21.4",
        "--loader",
        "fabric@0.16.10",
        "--jvm-arg",
        "-XX:+UseG1GC",
    ])?)?;
    let lock = lock(&lock_path(data))?;
    let (mut store, _) = PackStore::open(data, &lock)?;
    let staged = store.stage(&out, ArchiveFormat::TarZst, None, &Limits::default())?;
    store.apply(staged, &Preserve::none())?;
    Ok(printed)
}

#[test]
fn build_status_and_rollback_from_the_command_line() -> Result<()> {
    // Removed when the guard drops, also when the test fails.
    let root_dir = tempfile::Builder::new().prefix("atlas-pack-cli-").tempdir()?;
    let root = root_dir.path();
    let data = root.join("data");
    fs::create_dir_all(data.join("world"))?;
    fs::write(data.join("world/level.dat"), "the world")?;

    let printed = build_and_apply(root, &data, "1.0.0", &[("mods/a.jar", "a1"), ("mods/b.jar", "b1")])?;
    assert!(printed.contains("version 1.0.0: 2 files"), "{printed}");
    build_and_apply(root, &data, "1.1.0", &[("mods/a.jar", "a2"), ("config/c.toml", "c")])?;

    let s = data.display().to_string();
    let status = ok(atlas(&["pack", "status", "--data", &s])?)?;
    assert!(status.contains("current:  1.1.0 (2 files, minecraft 1.21.4)"), "{status}");
    assert!(status.contains("previous: 1.0.0"), "{status}");
    assert!(status.contains("mods/a.jar") && status.contains("config/c.toml"), "{status}");
    let json: serde_json::Value = serde_json::from_str(&ok(atlas(&["pack", "status", "--data", &s, "--json"])?)?)?;
    assert_eq!(json["current"]["version"], "1.1.0");
    assert_eq!(json["current"]["minecraft"]["loader"]["name"], "fabric");
    assert_eq!(json["current"]["jvmArgs"][0], "-XX:+UseG1GC", "{json}");
    assert_eq!(json["previous"]["version"], "1.0.0");

    let rolled = ok(atlas(&["pack", "rollback", "--data", &s])?)?;
    assert!(rolled.contains("rolled back from 1.1.0 to 1.0.0"), "{rolled}");
    assert_eq!(fs::read_to_string(data.join("mods/a.jar"))?, "a1");
    assert_eq!(fs::read_to_string(data.join("mods/b.jar"))?, "b1");
    assert!(!data.join("config/c.toml").exists(), "a file only 1.1.0 owned survived the rollback");
    assert_eq!(fs::read_to_string(data.join("world/level.dat"))?, "the world");

    // A second rollback has nowhere to go... except back to 1.1.0, which is now the kept version.
    let status = ok(atlas(&["pack", "status", "--data", &s])?)?;
    assert!(status.contains("current:  1.0.0") && status.contains("previous: 1.1.0"), "{status}");
    Ok(())
}

#[test]
fn a_held_data_dir_a_missing_previous_version_and_a_missing_data_dir_are_one_line_errors() -> Result<()> {
    let root_dir = tempfile::Builder::new().prefix("atlas-pack-cli-err-").tempdir()?;
    let root = root_dir.path();
    let data = root.join("data");
    fs::create_dir_all(&data)?;
    let s = data.display().to_string();

    let out = atlas(&["pack", "rollback", "--data", &s])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("no previous pack version to roll back to"), "{err}");
    // ...and what to do instead.
    assert!(err.contains("spec.pack.version") && err.contains("`atlas-runner pack apply`"), "{err}");

    // A data dir that does not exist holds nothing to roll back or show, and is not made by asking.
    let missing = root.join("no-such-data");
    let m = missing.display().to_string();
    for (command, what) in [("rollback", "no pack to roll back"), ("status", "no pack to show")] {
        let out = atlas(&["pack", command, "--data", &m])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "pack {command}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(&format!("the data dir {m} does not exist")) && err.contains(what), "{err}");
        assert!(!missing.exists(), "pack {command} made the data dir");
    }

    let held = lock(&lock_path(&data))?;
    let out = atlas(&["pack", "status", "--data", &s])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("held by another atlas-runner"), "{err}");
    assert!(err.contains(&std::process::id().to_string()), "the error names the holder: {err}");
    drop(held);
    Ok(())
}

/// Every file under `dir` except `.atlas` and `world`, by content.
fn managed_files(dir: &Path) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            if rel == ".atlas" || rel == "world" {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                out.insert(rel, fs::read(&path)?);
            }
        }
        Ok(())
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

#[test]
fn kill_9_at_any_point_of_pack_apply_leaves_exactly_the_old_or_the_new_version() -> Result<()> {
    use atlas_runner::pack::PackVersion;
    use atlas_runner::pack::build::{BuildOptions, build};
    use sha2::Digest;

    let root_dir = tempfile::Builder::new().prefix("atlas-pack-kill-").tempdir()?;
    let root = root_dir.path();
    // v1: 400 files; v2 changes 200 of them, drops 100 and adds 100, so the swap has real work.
    let v1: std::collections::BTreeMap<String, Vec<u8>> =
        (0..400).map(|i| (format!("mods/m{i:03}.jar"), format!("v1 {i} ").repeat(200).into_bytes())).collect();
    let mut v2 = v1.clone();
    for i in 0..200 {
        v2.insert(format!("mods/m{i:03}.jar"), format!("v2 {i} ").repeat(200).into_bytes());
    }
    for i in 300..400 {
        v2.remove(&format!("mods/m{i:03}.jar"));
    }
    for i in 0..100 {
        v2.insert(format!("config/c{i:03}.toml"), format!("c{i}").into_bytes());
    }
    let mut archives = Vec::new();
    for (version, files) in [("1.0.0", &v1), ("2.0.0", &v2)] {
        let src = root.join(format!("src-{version}"));
        for (path, content) in files {
            let target = src.join(path);
            fs::create_dir_all(target.parent().context("parent")?)?;
            fs::write(target, content)?;
        }
        let out = root.join(format!("{version}.tar.zst"));
        build(&src, &out, &BuildOptions::new(PackVersion::new(version)?))?;
        archives.push(out);
    }
    let v2_bytes = fs::read(&archives[1])?;
    let v2_len = v2_bytes.len();
    let sha = hex::encode(sha2::Sha256::digest(&v2_bytes));
    let base = common::serve_files(|_| Ok([("/pack-2.0.0.tar.zst".to_owned(), v2_bytes)].into_iter().collect()))?;
    let spec = root.join("server.yaml");
    fs::write(
        &spec,
        format!(
            "eula: true\nserver: {{type: vanilla}}\npack:\n  source:\n    url: {{url: \"{base}/pack-2.0.0.tar.zst\", sha256: {sha}}}\n"
        ),
    )?;

    // A data dir holding v1 and a world.
    let fresh = |n: usize| -> Result<std::path::PathBuf> {
        let data = root.join(format!("data-{n}"));
        fs::create_dir_all(data.join("world/region"))?;
        fs::write(data.join("world/region/r.0.0.mca"), "the world")?;
        let lock = lock(&lock_path(&data))?;
        let (mut store, _) = PackStore::open(&data, &lock)?;
        let staged = store.stage(&archives[0], ArchiveFormat::TarZst, None, &Limits::default())?;
        store.apply(staged, &Preserve::none())?;
        Ok(data)
    };
    // The apply logs "swapping it in" to stderr just before the journaled swap.
    let textfile = root.join("pack.prom");
    let apply = |data: &Path| {
        let mut command = Command::new(common::binary());
        command.args(["pack", "apply", "--spec"]).arg(&spec).arg("--data").arg(data);
        command.arg("--metrics-textfile").arg(&textfile).env("RUST_LOG", "info");
        common::spawn_watching(&mut command, "swapping it in")
    };

    // One undisturbed run measures the whole apply and the swap at its end.
    let data = fresh(0)?;
    let started = std::time::Instant::now();
    let (mut child, swapping) = apply(&data)?;
    let (schedule, status) = common::KillSchedule::measure(40, started, &mut child, &swapping)?;
    anyhow::ensure!(status.success(), "an undisturbed pack apply failed");
    assert_eq!(managed_files(&data)?, v2);
    // The apply's metrics, as node_exporter's textfile collector would read them.
    let metrics = fs::read_to_string(&textfile)?;
    for line in [
        "atlas_pack_info{version=\"2.0.0\"} 1",
        "atlas_pack_files_written_total 300",
        "atlas_pack_files_removed_total 100",
        &format!("atlas_pack_downloaded_bytes_total {v2_len}"),
        "atlas_pack_apply_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }
    common::promtool_check(&metrics)?;

    // Kills over the whole run (start-up, fetch, staging) and over the swap.
    let (mut old, mut new) = (0, 0);
    let mut recoveries: Vec<String> = Vec::new();
    let runs = schedule.run(
        |n| apply(&fresh(n)?),
        |n, _| {
            let data = root.join(format!("data-{n}"));
            // The next command recovers whatever the kill interrupted.
            let status = ok(atlas(&["pack", "status", "--data", &data.display().to_string(), "--json"])?)?;
            let status: serde_json::Value = serde_json::from_str(&status)?;
            let files = managed_files(&data)?;
            let recovery =
                status["recovery"].as_str().unwrap_or_default().split([' ', '{']).next().unwrap_or_default().to_owned();
            match status["current"]["version"].as_str() {
                Some("1.0.0") => {
                    assert!(files == v1, "run {n}: the store says 1.0.0 but the data dir holds a mix");
                    old += 1;
                }
                Some("2.0.0") => {
                    assert!(files == v2, "run {n}: the store says 2.0.0 but the data dir holds a mix");
                    new += 1;
                }
                other => anyhow::bail!("run {n}: unexpected current version {other:?}"),
            }
            assert_eq!(fs::read_to_string(data.join("world/region/r.0.0.mca"))?, "the world", "run {n}: world touched");
            let _ = fs::remove_dir_all(&data);
            let inside = recovery != "Clean";
            recoveries.push(recovery);
            Ok(inside)
        },
    )?;
    eprintln!(
        "kill -9 over {:?} (swap {:?}): {old} runs left 1.0.0, {new} left 2.0.0; recoveries: {recoveries:?}",
        schedule.full, schedule.step
    );
    assert!(old > 0, "no kill landed before the commit point");
    assert!(recoveries.iter().any(|r| r != "Clean"), "no kill landed inside a swap: {recoveries:?}");
    assert_eq!(old + new, recoveries.len());
    assert!(recoveries.len() == runs && runs >= schedule.runs);
    Ok(())
}

/// Serves `body` at any path to every connection, slowly: `pieces` writes, `pause` apart, so a
/// download lasts long enough for a progress display to draw. Returns the base URL.
fn serve_slowly(body: Vec<u8>, pieces: usize, pause: std::time::Duration) -> Result<String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(head.as_bytes());
                for piece in body.chunks(body.len().div_ceil(pieces.max(1)).max(1)) {
                    std::thread::sleep(pause);
                    if stream.write_all(piece).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(base)
}

/// A spec whose pack (1 MiB of incompressible bytes in 20 files) downloads in about 1.5 s.
fn slow_pack_spec(root: &Path) -> Result<std::path::PathBuf> {
    use atlas_runner::pack::PackVersion;
    use atlas_runner::pack::build::{BuildOptions, build};
    use sha2::Digest;
    let src = root.join("src");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..20 {
        let bytes: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::create_dir_all(src.join("mods"))?;
        fs::write(src.join(format!("mods/m{i:02}.jar")), bytes)?;
    }
    let archive = root.join("pack.tar.zst");
    build(&src, &archive, &BuildOptions::new(PackVersion::new("1.0.0")?))?;
    let bytes = fs::read(&archive)?;
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let base = serve_slowly(bytes, 15, std::time::Duration::from_millis(100))?;
    let spec = root.join("server.yaml");
    fs::write(
        &spec,
        format!(
            "eula: true\nserver: {{type: vanilla}}\npack:\n  source:\n    url: {{url: \"{base}/p.tar.zst\", sha256: {sha}}}\n"
        ),
    )?;
    Ok(spec)
}

/// Runs `atlas-runner ARGS` on a pseudo-terminal (util-linux `script`) and returns what the
/// terminal showed.
fn on_a_terminal(args: &[&str]) -> Result<String> {
    let mut command = String::from(common::binary());
    for arg in args {
        command.push_str(&format!(" '{arg}'"));
    }
    let out = Command::new("script").args(["-qec", &command, "/dev/null"]).env("RUST_LOG", "info").output()?;
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "{command} failed on a terminal:\n{shown}");
    Ok(shown)
}

#[test]
fn pack_apply_on_a_terminal_shows_progress_and_with_json_logs_milestones() -> Result<()> {
    let root = tempfile::tempdir()?;
    let spec = slow_pack_spec(root.path())?;
    let spec = spec.to_str().context("utf-8 path")?;
    let data = root.path().join("data");
    let shown = on_a_terminal(&["pack", "apply", "--spec", spec, "--data", data.to_str().context("utf-8")?])?;
    // A line redrawn in place: bytes of the total, the rate and the time left.
    let progress: Vec<&str> = shown.split('\r').filter(|l| l.contains("MiB/s")).collect();
    anyhow::ensure!(progress.len() >= 2, "no progress line redrawn:\n{shown:?}");
    anyhow::ensure!(
        progress.iter().any(|l| l.contains("/1.0 MiB  ") && l.contains("ETA")),
        "the progress line lacks bytes of the total or an ETA: {progress:?}"
    );
    anyhow::ensure!(shown.contains("applied 1.0.0"), "{shown}");

    // With JSON logs: no progress line, the milestones as log records.
    let data = root.path().join("data-json");
    let args = ["--log-format", "json", "pack", "apply", "--spec", spec, "--data", data.to_str().context("utf-8")?];
    let shown = on_a_terminal(&args)?;
    anyhow::ensure!(!shown.contains("MiB/s"), "a progress line with JSON logs:\n{shown}");
    let messages: Vec<String> = shown
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter_map(|v| v["message"].as_str().map(str::to_owned))
        .collect();
    for milestone in
        ["fetching the pack", "pack fetched and verified", "swapping it in", "pack swapped in", "pack applied"]
    {
        anyhow::ensure!(messages.iter().any(|m| m.contains(milestone)), "no {milestone:?} in {messages:?}");
    }
    Ok(())
}
