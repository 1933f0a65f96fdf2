//! Updates that can be undone and starts that never wait for the network, in the standalone runner
//! (`atlas-runner run`, the built binary) with the fake Java server: the same reconciler the in-pod
//! agent runs (tests/agent.rs shows it there).

mod agent_bed;
mod common;

use std::time::Duration;

use agent_bed::Hub;
use anyhow::{Context, Result};
use common::{Fixture, Runner, fake_server_pack};

/// Writes the fixture's spec: the fake server's settings with `server` (a YAML flow mapping) and
/// `more` (YAML lines at spec level, two-space indent) appended.
fn write_spec(fixture: &Fixture, server: &str, more: &str) -> Result<()> {
    let spec = format!(
        "apiVersion: atlas.dev/v1alpha1\nkind: MinecraftServer\nmetadata: {{name: test}}\nspec:\n  eula: true\n  server: {server}\n  jvm: {{heap: 256M, flags: none}}\n  rcon: {{port: {}}}\n  properties:\n    server-port: \"{}\"\n{more}",
        fixture.rcon_port, fixture.game_port
    );
    let tmp = fixture.root.join("server.yaml.tmp");
    std::fs::write(&tmp, spec)?;
    std::fs::rename(&tmp, &fixture.spec)?;
    Ok(())
}

const CUSTOM: &str = "{type: custom, version: \"1.21.4\", jar: fake-server.jar}";

/// The spec's pack: the fake server's pack on `hub`'s stable channel, checked every second.
fn hub_pack(hub: &Hub) -> String {
    format!(
        "  pack:\n    source:\n      hub: {{url: \"{}\", pack: server, channel: stable}}\n    update: {{mode: auto, interval: 1s}}\n",
        hub.base
    )
}

/// A fixture without the fake server's jar (its packs bring it) and a directory for the packs.
fn pack_fixture(name: &str) -> Result<(Fixture, std::path::PathBuf)> {
    let fixture = Fixture::new(name)?;
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    let dir = fixture.root.join("packs");
    std::fs::create_dir_all(&dir)?;
    Ok((fixture, dir))
}

#[test]
fn a_new_version_that_crashes_while_settling_is_rolled_back() -> Result<()> {
    let (fixture, packs) = pack_fixture("settle-crash")?;
    let hub = Hub::start()?;
    hub.publish("server", "stable", "1.0.0", &fake_server_pack(&packs, "1.0.0", &[("mods/a.jar", b"a-1")])?)?;
    write_spec(&fixture, CUSTOM, &hub_pack(&hub))?;
    let mut runner = Runner::start(&fixture, &["--update-settle", "6"])?;
    runner.wait_running()?;

    // 2.0.0's server becomes ready, then crashes a second later: inside the settle period.
    let crashes = fake_server_pack(
        &packs,
        "2.0.0",
        &[("mods/a.jar", b"a-2"), ("fake-server.properties", b"crash-after-ready-ms=1000\n")],
    )?;
    hub.publish("server", "stable", "2.0.0", &crashes)?;
    let back = runner.wait_status("the update rolled back", Duration::from_secs(90), |s| {
        s["lastUpdate"]["result"] == "RolledBack" && s["phase"] == "Running" && s["packVersion"] == "1.0.0"
    })?;
    let message = back["lastUpdate"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("while settling") && message.contains("crash"), "{message}");
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-1");
    assert_eq!(runner.logs_with("pack update to 2.0.0 rolled back to 1.0.0").len(), 1);
    // Not tried again while the channel names it.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(runner.status()?["packVersion"], "1.0.0");
    assert_eq!(runner.logs_with("rolling the pack back").len(), 1);
    Ok(())
}

#[test]
fn a_new_version_whose_server_never_becomes_ready_is_rolled_back_after_the_timeout() -> Result<()> {
    let (fixture, packs) = pack_fixture("never-ready")?;
    let hub = Hub::start()?;
    hub.publish("server", "stable", "1.0.0", &fake_server_pack(&packs, "1.0.0", &[])?)?;
    write_spec(&fixture, CUSTOM, &hub_pack(&hub))?;
    let mut runner = Runner::start(&fixture, &["--update-ready-timeout", "4"])?;
    runner.wait_running()?;
    let stuck = fake_server_pack(&packs, "2.0.0", &[("fake-server.properties", b"never-ready=true\n")])?;
    hub.publish("server", "stable", "2.0.0", &stuck)?;
    let back = runner.wait_status("the update rolled back", Duration::from_secs(90), |s| {
        s["lastUpdate"]["result"] == "RolledBack" && s["phase"] == "Running" && s["packVersion"] == "1.0.0"
    })?;
    let message = back["lastUpdate"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("not ready within 4s"), "{message}");
    let (_, metrics) = common::http_get(&runner.metrics_addr, "/metrics")?;
    assert!(metrics.contains("atlas_pack_rollbacks_total{reason=\"not_ready\"} 1"), "{metrics}");
    Ok(())
}

#[test]
fn a_fresh_runner_with_the_hub_down_starts_the_held_version_and_says_degraded() -> Result<()> {
    let (fixture, packs) = pack_fixture("held-start")?;
    let mut hub = Hub::start()?;
    hub.publish("server", "stable", "1.0.0", &fake_server_pack(&packs, "1.0.0", &[("mods/a.jar", b"a-1")])?)?;
    write_spec(&fixture, CUSTOM, &hub_pack(&hub))?;
    let mut runner = Runner::start(&fixture, &[])?;
    runner.wait_running()?;
    drop(runner);

    hub.stop();
    let mut runner = Runner::start(&fixture, &[])?;
    let held = runner.wait_running()?;
    assert_eq!(held["packVersion"], "1.0.0", "{held}");
    let degraded = held["degraded"]["PackSourceUnreachable"].as_str().context("no PackSourceUnreachable")?;
    assert!(degraded.contains("1.0.0"), "{degraded}");
    assert_eq!(held["packProblem"]["reason"], "HeldVersion", "{held}");
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-1");
    let text = String::from_utf8(common::cli(&fixture.data, &["status"])?.stdout)?;
    assert!(text.contains("degraded:  PackSourceUnreachable:") && text.contains("pack held:"), "{text}");

    // The hub is back, naming the version the data dir holds: nothing is held or degraded any more,
    // and the server was not restarted for it.
    hub.restart()?;
    let healed = runner.wait_status("the hub answering again", Duration::from_secs(30), |s| {
        s.get("degraded").is_none() && s.get("packProblem").is_none()
    })?;
    assert_eq!(healed["pid"], held["pid"]);
    Ok(())
}

#[test]
fn a_fresh_start_with_the_download_api_down_runs_the_cached_jar_and_says_degraded() -> Result<()> {
    let fixture = Fixture::new("cached-jar")?;
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    let manifest = agent_bed::mojang_stand_in(&[("1.21.4", &common::fake_server_jar()?)])?;
    write_spec(&fixture, "{type: vanilla, version: \"1.21.4\"}", "")?;
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &manifest])?;
    let online = runner.wait_running()?;
    assert!(online.get("degraded").is_none(), "{online}");
    drop(runner);

    // Mojang's API unreachable now (a closed port): the cached jar starts, and the status says so.
    let (address, _refusing) = common::refusing_address()?;
    let closed = format!("http://{address}/manifest.json");
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &closed])?;
    let offline = runner.wait_running()?;
    assert_eq!(offline["serverVersion"], "1.21.4");
    let why = offline["degraded"]["DownloadApiUnreachable"].as_str().context("no DownloadApiUnreachable")?;
    assert!(why.contains("cached") && why.contains("1.21.4"), "{why}");
    Ok(())
}

/// Takes the fake server jar out of the data dir and stands in for Mojang's API with 1.21.4 (the fake
/// server) and 1.21.5 (the fake server with `new_properties` too): the manifest's URL.
fn two_versions(fixture: &Fixture, new_properties: &str) -> Result<String> {
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    let jars = fixture.root.join("jars");
    let old = agent_bed::fake_server_jar_with(&jars, "old", "version=1.21.4\n")?;
    let new = agent_bed::fake_server_jar_with(&jars, "new", &format!("version=1.21.5\n{new_properties}"))?;
    agent_bed::mojang_stand_in(&[("1.21.4", &old), ("1.21.5", &new)])
}

/// A file of the world, written now, to find again after a restore.
/// The spec of every test of a failing version change: beforeUpdate backups, to the default local store.
const BEFORE_UPDATE: &str = "  backup: {beforeUpdate: true}\n";

/// A server running 1.21.4 with [`BEFORE_UPDATE`] backups, whose 1.21.5 (in the manifest returned)
/// crashes once it has touched the world; and a world file to find again after an undo.
fn on_1_21_4_before_a_failing_1_21_5(name: &str) -> Result<(Fixture, String, Runner, std::path::PathBuf)> {
    let fixture = Fixture::new(name)?;
    let manifest = two_versions(&fixture, "crash-after-world=true\n")?;
    write_spec(&fixture, "{type: vanilla, version: \"1.21.4\"}", BEFORE_UPDATE)?;
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &manifest])?;
    runner.wait_running()?;
    let kept = a_world_file(&fixture)?;
    Ok((fixture, manifest, runner, kept))
}

fn a_world_file(fixture: &Fixture) -> Result<std::path::PathBuf> {
    let kept = fixture.data.join("world/data/raids.dat");
    std::fs::create_dir_all(kept.parent().context("a parent")?)?;
    std::fs::write(&kept, b"raids as they were")?;
    Ok(kept)
}

/// Waits until the change to 1.21.5 is undone, 1.21.4 runs again on the world restored from its
/// backup (`kept` as it was), and returns that status.
fn undone_from_backup(runner: &mut Runner, kept: &std::path::Path) -> Result<serde_json::Value> {
    let back = runner.wait_status("the version change undone", Duration::from_secs(90), |s| {
        s["lastUpdate"]["kind"] == "server" && s["lastUpdate"]["result"] == "RolledBack" && s["phase"] == "Running"
    })?;
    assert_eq!(back["serverVersion"], "1.21.4");
    let message = back["lastUpdate"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("restored from backup"), "{message}");
    assert_eq!(std::fs::read(kept)?, b"raids as they were");
    Ok(back)
}

#[test]
fn a_minecraft_version_whose_server_fails_is_undone_from_a_local_backup_and_held_across_restarts() -> Result<()> {
    let (fixture, manifest, mut runner, kept) = on_1_21_4_before_a_failing_1_21_5("version-undo")?;

    write_spec(&fixture, "{type: vanilla, version: \"1.21.5\"}", BEFORE_UPDATE)?;
    let back = undone_from_backup(&mut runner, &kept)?;
    let listed = std::process::Command::new(common::binary())
        .args(["backup", "list", "--json", "--spec"])
        .arg(&fixture.spec)
        .arg("--data")
        .arg(&fixture.data)
        .output()?;
    anyhow::ensure!(listed.status.success(), "backup list: {}", String::from_utf8_lossy(&listed.stderr));
    let backups: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    let name = back["lastBackup"]["name"].as_str().context("no lastBackup")?;
    assert!(backups.as_array().is_some_and(|b| b.iter().any(|m| m["name"] == name)), "{backups}");

    // A new runner on the same data dir (the spec still names 1.21.5) runs 1.21.4: the hold is kept.
    drop(runner);
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &manifest])?;
    let again = runner.wait_running()?;
    assert_eq!(again["serverVersion"], "1.21.4", "{again}");
    assert!(!runner.logs_with("names the version undone after its server failed").is_empty());
    // Naming another version forgets the hold.
    write_spec(&fixture, "{type: vanilla, version: \"1.21.4\"}", BEFORE_UPDATE)?;
    common::wait_for("the hold forgotten", Duration::from_secs(20), || {
        (!fixture.data.join(".atlas/held-server.json").exists()).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_fresh_start_keeps_latest_on_the_version_the_world_ran_on() -> Result<()> {
    let fixture = Fixture::new("latest-pinned")?;
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    let jars = fixture.root.join("jars");
    let old = agent_bed::fake_server_jar_with(&jars, "old", "version=1.21.4\n")?;
    let new = agent_bed::fake_server_jar_with(&jars, "new", "version=1.21.5\n")?;
    let versions = [("1.21.4", old.as_path()), ("1.21.5", new.as_path())];
    let before = agent_bed::mojang_stand_in_latest(&versions, Some("1.21.4"))?;
    write_spec(&fixture, "{type: vanilla, version: latest}", "")?;
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &before])?;
    assert_eq!(runner.wait_running()?["serverVersion"], "1.21.4");
    drop(runner);

    // Mojang publishes 1.21.5; the next start (a replaced pod, a restarted host) keeps the world on
    // 1.21.4: `latest` moving on is no reason to upgrade a world with no backup and no undo.
    let after = agent_bed::mojang_stand_in_latest(&versions, Some("1.21.5"))?;
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &after])?;
    let again = runner.wait_running()?;
    assert_eq!(again["serverVersion"], "1.21.4", "{again}");
    assert!(again.get("lastUpdate").is_none_or(serde_json::Value::is_null), "{again}");
    Ok(())
}

#[test]
fn a_version_changed_while_no_runner_ran_is_an_update_that_is_undone_from_its_backup() -> Result<()> {
    let (fixture, manifest, runner, kept) = on_1_21_4_before_a_failing_1_21_5("version-while-down")?;
    drop(runner);

    // The version changes while no runner runs (a pod being replaced); the next start backs the
    // world up, runs 1.21.5, and undoes it when its server fails after touching the world.
    write_spec(&fixture, "{type: vanilla, version: \"1.21.5\"}", BEFORE_UPDATE)?;
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &manifest])?;
    undone_from_backup(&mut runner, &kept)?;
    // On the series the AtlasUpdateRolledBack alert and the dashboard read.
    let (_, metrics) = common::http_get(&runner.metrics_addr, "/metrics")?;
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("atlas_update_rollbacks_total{kind=\"server\""))
        .with_context(|| format!("no server rollback counted:\n{metrics}"))?;
    assert!(counted.ends_with(" 1"), "{counted}");
    Ok(())
}

#[test]
fn a_version_change_without_before_update_is_refused_and_says_why() -> Result<()> {
    let fixture = Fixture::new("version-refused")?;
    let manifest = two_versions(&fixture, "")?;
    write_spec(&fixture, "{type: vanilla, version: \"1.21.4\"}", "")?;
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &manifest])?;
    let first = runner.wait_running()?;
    let pid = first["pid"].clone();

    // While the server runs: refused, the server keeps running (same process), Degraded says why.
    write_spec(&fixture, "{type: vanilla, version: \"1.21.5\"}", "")?;
    let refused = runner.wait_status("the change refused", Duration::from_secs(30), |s| {
        s["degraded"]["SpecRejected"].as_str().is_some()
    })?;
    assert_eq!(refused["serverVersion"], "1.21.4");
    assert_eq!(refused["pid"], pid, "the server was restarted for a refused change");
    let why = refused["degraded"]["SpecRejected"].as_str().unwrap_or_default();
    assert!(why.contains("beforeUpdate") && why.contains("1.21.5"), "{why}");
    drop(runner);

    // At a fresh start too: the version the world ran on starts.
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &manifest])?;
    let again = runner.wait_running()?;
    assert_eq!(again["serverVersion"], "1.21.4", "{again}");
    assert!(again["degraded"]["SpecRejected"].as_str().is_some(), "{again}");

    // Back to the version that runs: nothing is refused any more.
    write_spec(&fixture, "{type: vanilla, version: \"1.21.4\"}", "")?;
    runner.wait_status("the refusal over", Duration::from_secs(30), |s| {
        s["degraded"].get("SpecRejected").is_none() && s["phase"] == "Running"
    })?;
    Ok(())
}
