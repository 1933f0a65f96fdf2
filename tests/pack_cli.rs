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
    let root = std::env::temp_dir().join(atlas_testbed::unique("pack-cli"));
    let data = root.join("data");
    fs::create_dir_all(data.join("world"))?;
    fs::write(data.join("world/level.dat"), "the world")?;

    let printed = build_and_apply(&root, &data, "1.0.0", &[("mods/a.jar", "a1"), ("mods/b.jar", "b1")])?;
    assert!(printed.contains("version 1.0.0: 2 files"), "{printed}");
    build_and_apply(&root, &data, "1.1.0", &[("mods/a.jar", "a2"), ("config/c.toml", "c")])?;

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
    let _ = fs::remove_dir_all(&root);
    Ok(())
}

#[test]
fn a_held_data_dir_and_a_missing_previous_version_are_one_line_errors() -> Result<()> {
    let root = std::env::temp_dir().join(atlas_testbed::unique("pack-cli-err"));
    let data = root.join("data");
    fs::create_dir_all(&data)?;
    let s = data.display().to_string();

    let out = atlas(&["pack", "rollback", "--data", &s])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let held = lock(&lock_path(&data))?;
    let out = atlas(&["pack", "status", "--data", &s])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("held by another atlas-runner"), "{err}");
    assert!(err.contains(&std::process::id().to_string()), "the error names the holder: {err}");
    drop(held);
    let _ = fs::remove_dir_all(&root);
    Ok(())
}
