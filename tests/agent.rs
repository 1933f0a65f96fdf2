//! The in-pod agent as a process against the bare API server (the test bed's etcd + kube-apiserver),
//! with the fake Java server and real SeaweedFS, authenticated by a ServiceAccount token bound to the
//! Role of docs/design/pod-contract.md (never admin).

mod agent_bed;
mod common;

use std::time::Duration;

use agent_bed::{Agent, AgentBed, Hub, agent_client, fake_spec, write_secret};
use anyhow::{Context, Result, ensure};
use atlas_runner::api::conditions::{self, reasons};
use atlas_runner::api::{MinecraftServer, Phase};
use atlas_testbed::{TestCluster, TestS3};
use common::{Fixture, fake_server_pack};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

fn phase(object: &MinecraftServer) -> Option<Phase> {
    object.status.as_ref().and_then(|s| s.phase)
}

fn condition<'a>(
    object: &'a MinecraftServer,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    object.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

fn players(object: &MinecraftServer) -> Option<u32> {
    object.status.as_ref().and_then(|s| s.players).map(|p| p.online)
}

fn pack_version(object: &MinecraftServer) -> Option<&str> {
    object.status.as_ref().and_then(|s| s.pack_version.as_deref())
}

fn last_update(object: &MinecraftServer) -> Option<&atlas_runner::api::UpdateOutcome> {
    object.status.as_ref().and_then(|s| s.update.as_ref()).and_then(|u| u.last.as_ref())
}

/// The value under header `name` in the first row of a `kubectl get` table (cells are left-aligned
/// under their header; an empty cell is an empty string).
fn kubectl_column(table: &str, name: &str) -> Option<String> {
    let mut lines = table.lines();
    let header = lines.next()?;
    let row = lines.next()?;
    let start = header.find(name)?;
    let end = header[start..].find(|c: char| c.is_whitespace()).map_or(header.len(), |n| start + n);
    let end = header[end..].find(|c: char| !c.is_whitespace()).map_or(row.len(), |n| end + n);
    Some(row.get(start..end.min(row.len())).unwrap_or("").trim().to_owned())
}

/// A bed on the run's shared API server for server `name`, with its own namespace and fixture.
async fn bed(test: &str, name: &str) -> Result<(AgentBed, Fixture)> {
    let cluster = TestCluster::shared().await?;
    let ns = cluster.namespace(test).await?;
    let fixture = Fixture::new(test)?;
    let bed = AgentBed::new(cluster.kubeconfig(), ns.client.clone(), &ns.name, name, &fixture.root).await?;
    Ok((bed, fixture))
}

/// The server's pid, from the runner's own status on the control socket.
fn server_pid(agent: &Agent) -> Result<u64> {
    agent.runner_status()?["pid"].as_u64().context("no server pid")
}

#[tokio::test]
async fn the_agent_runs_its_resource_and_reports_status_columns_events_and_output() -> Result<()> {
    let (bed, fixture) = bed("agent-run", "survival").await?;
    bed.apply(&fake_spec(&fixture)).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    let running =
        bed.wait(&mut agent, "phase Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let status = running.status.as_ref().context("a status")?;
    assert_eq!(status.observed_generation, running.metadata.generation);
    assert_eq!(status.server_version.as_deref(), Some("1.21.4"));
    let ready = condition(&running, conditions::READY).context("a Ready condition")?;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", reasons::RUNNING));
    let degraded = condition(&running, conditions::DEGRADED).context("a Degraded condition")?;
    assert_eq!(degraded.status, "False");

    // A player joins: the status says so (debounced, so within the settle time of the sink).
    agent.console_soon(&["fake-join", "alice"])?;
    bed.wait(&mut agent, "alice online", Duration::from_secs(30), |o| players(o) == Some(1)).await?;

    // `kubectl get mcs` fills its columns from the status.
    let cluster = TestCluster::shared().await?;
    let out = cluster.kubectl()?.args(["get", "mcs", "-n", &bed.ns, &bed.name]).output()?;
    ensure!(out.status.success(), "kubectl get: {}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let column = |name: &str| kubectl_column(&table, name);
    assert_eq!(
        (column("PHASE"), column("SERVER"), column("PACK"), column("PLAYERS")),
        (Some("Running".into()), Some("1.21.4".into()), Some(String::new()), Some("1".into())),
        "{table}"
    );

    // Events on transitions: the server started once.
    let note = bed.wait_event("Started", Duration::from_secs(20)).await?;
    assert!(note.contains("custom 1.21.4"), "{note}");
    assert_eq!(bed.event_reasons().await?.iter().filter(|r| *r == "Started").count(), 1);

    // The server's output is on the agent's stdout, as JSON lines with the text in `server`.
    let output = agent.output();
    let done = output.iter().find(|l| l.contains("Done (")).context("no Done line on stdout")?;
    let line: Value = serde_json::from_str(done)?;
    assert!(line["server"].as_str().is_some_and(|s| s.contains("Done (")), "{done}");

    // The secrets directory's generated RCON password is the one the server runs with.
    let password = std::fs::read_to_string(bed.secrets.join("survival-rcon/password"))?;
    let properties = std::fs::read_to_string(fixture.data.join("server.properties"))?;
    assert!(properties.contains(&format!("rcon.password={password}")), "{properties}");
    Ok(())
}

/// The agent's status writes so far, from its /metrics.
fn status_writes(agent: &Agent) -> Result<f64> {
    let (_, body) = common::http_get(&agent.metrics_addr, "/metrics")?;
    let line = body.lines().find(|l| l.starts_with("atlas_agent_status_writes_total ")).context("no status writes")?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

#[tokio::test]
async fn an_agent_field_someone_else_edits_is_put_back_with_one_write() -> Result<()> {
    let (bed, fixture) = bed("agent-edit", "edited").await?;
    bed.apply(&fake_spec(&fixture)).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "phase Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    // The first writes settle: three seconds without one.
    let mut settled = status_writes(&agent)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = status_writes(&agent)?;
        if now == settled {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "the agent kept writing\n{}", agent.tail(20));
        settled = now;
    }

    // An admin edits the agent's fields (`kubectl edit --subresource=status` sends the same patch).
    let cluster = TestCluster::shared().await?;
    let edit = r#"{"status": {"phase": "Stopped", "serverVersion": "0.0.1"}}"#;
    let out = cluster
        .kubectl()?
        .args(["patch", "mcs", &bed.name, "-n", &bed.ns, "--subresource=status", "--type=merge", "-p", edit])
        .output()?;
    ensure!(out.status.success(), "kubectl patch: {}", String::from_utf8_lossy(&out.stderr));
    bed.wait(&mut agent, "the edit put back", Duration::from_secs(30), |o| {
        phase(o) == Some(Phase::Running)
            && o.status.as_ref().and_then(|s| s.server_version.as_deref()) == Some("1.21.4")
    })
    .await?;
    // One write put it back; the watch showing that write starts no other.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(status_writes(&agent)?, settled + 1.0, "{}", agent.tail(20));
    Ok(())
}

/// The operator's three conditions as its own code writes them (server-side apply on /status as
/// `atlas-operator`), with `upgrade` as UpgradePending's status and reason.
async fn operator_writes(bed: &AgentBed, upgrade: (&str, &str)) -> Result<()> {
    let generation = bed.get().await?.metadata.generation;
    let condition =
        |type_: &str, status: &str, reason: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: format!("{type_} as the operator says"),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
            observed_generation: generation,
        };
    let conditions = [
        condition("WorkloadReady", "True", "PodReady"),
        condition("SecretsResolved", "True", "Resolved"),
        condition("UpgradePending", upgrade.0, upgrade.1),
    ];
    atlas_runner::operator::status::write(&bed.api(), &bed.name, &conditions).await?;
    Ok(())
}

fn has_condition(object: &MinecraftServer, type_: &str, status: &str) -> bool {
    condition(object, type_).is_some_and(|c| c.status == status)
}

#[tokio::test]
async fn the_agent_and_the_operator_each_keep_the_others_fields_in_full_status_writes() -> Result<()> {
    let (bed, fixture) = bed("agent-managers", "shared").await?;
    bed.apply(&fake_spec(&fixture)).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "phase Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    operator_writes(&bed, ("False", "UpToDate")).await?;
    let operators =
        |o: &MinecraftServer| has_condition(o, "WorkloadReady", "True") && has_condition(o, "SecretsResolved", "True");

    // The agent writes its whole status again, twice (a player joins; the server restarts for a
    // property change): the operator's conditions stay.
    agent.console_soon(&["fake-join", "alice"])?;
    bed.wait(&mut agent, "alice online, the operator's conditions kept", Duration::from_secs(30), |o| {
        players(o) == Some(1) && operators(o) && has_condition(o, "UpgradePending", "False")
    })
    .await?;
    let mut spec = fake_spec(&fixture);
    spec["properties"]["motd"] = "both managers".into();
    let generation = bed.apply(&spec).await?.metadata.generation;
    let restarted = bed
        .wait(&mut agent, "the restart for generation 2 reported", Duration::from_secs(60), |o| {
            phase(o) == Some(Phase::Running)
                && o.status.as_ref().and_then(|s| s.observed_generation) == generation
                && condition(o, conditions::READY).is_some_and(|c| c.observed_generation == generation)
        })
        .await?;
    assert!(operators(&restarted), "{:?}", restarted.status);

    // The operator writes its conditions again: the agent's fields and conditions stay.
    operator_writes(&bed, ("True", "PlayersOnline")).await?;
    let after = bed.get().await?;
    assert!(has_condition(&after, "UpgradePending", "True") && operators(&after), "{:?}", after.status);
    let status = after.status.as_ref().context("a status")?;
    assert_eq!((status.phase, status.observed_generation), (Some(Phase::Running), generation));
    assert_eq!(status.server_version.as_deref(), Some("1.21.4"));
    assert!(has_condition(&after, conditions::READY, "True") && has_condition(&after, conditions::DEGRADED, "False"));
    // And the agent's next write still keeps the operator's newest.
    agent.console_soon(&["fake-leave", "alice"])?;
    let left = bed.wait(&mut agent, "alice gone", Duration::from_secs(40), |o| players(o) == Some(0)).await?;
    assert!(has_condition(&left, "UpgradePending", "True") && operators(&left), "{:?}", left.status);
    Ok(())
}

#[tokio::test]
async fn a_property_change_restarts_the_server_exactly_once() -> Result<()> {
    let (bed, fixture) = bed("agent-respec", "respec").await?;
    let mut spec = fake_spec(&fixture);
    bed.apply(&spec).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let first = server_pid(&agent)?;

    spec["properties"]["motd"] = "changed".into();
    let applied = bed.apply(&spec).await?;
    let generation = applied.metadata.generation;
    bed.wait(&mut agent, "the new generation running", Duration::from_secs(60), |o| {
        phase(o) == Some(Phase::Running) && o.status.as_ref().and_then(|s| s.observed_generation) == generation
    })
    .await?;
    let second = server_pid(&agent)?;
    assert_ne!(first, second, "the server did not restart");
    assert!(std::fs::read_to_string(fixture.data.join("server.properties"))?.contains("motd=changed"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server_pid(&agent)?, second, "the server restarted more than once");
    assert_eq!(agent.logs_with("server process started").len(), 2);
    let now = bed.get().await?;
    assert_eq!(now.status.as_ref().map(|s| s.restarts), Some(0), "a spec restart is not a crash restart");

    // Re-applying the same spec (a new write, no new generation) changes nothing.
    bed.apply(&spec).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server_pid(&agent)?, second);
    Ok(())
}

/// The spec of a server following `pack` on `hub`'s stable channel, with `update` as its policy.
fn hub_spec(fixture: &Fixture, hub: &Hub, update: Value) -> Value {
    let mut spec = fake_spec(fixture);
    spec["pack"] =
        json!({"source": {"hub": {"url": hub.base, "pack": "server", "channel": "stable"}}, "update": update});
    spec
}

/// A fixture whose fake server's jar comes from the pack.
fn pack_fixture(test: &str, fixture: Fixture) -> Result<(Fixture, std::path::PathBuf)> {
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    let dir = fixture.root.join(format!("packs-{test}"));
    std::fs::create_dir_all(&dir)?;
    Ok((fixture, dir))
}

#[tokio::test]
async fn hub_updates_are_backed_up_applied_and_a_crashing_version_is_rolled_back() -> Result<()> {
    let (bed, fixture) = bed("agent-update", "updates").await?;
    let (fixture, packs) = pack_fixture("update", fixture)?;
    let s3 = TestS3::shared().await?;
    let bucket = s3.bucket("agent-update").await?;
    write_secret(&bed.secrets, "s3", "AWS_ACCESS_KEY_ID", &bucket.s3.access_key)?;
    write_secret(&bed.secrets, "s3", "AWS_SECRET_ACCESS_KEY", &bucket.s3.secret_key)?;
    let hub = Hub::start()?;
    hub.publish("server", "stable", "1.0.0", &fake_server_pack(&packs, "1.0.0", &[("mods/a.jar", b"a-1")])?)?;
    let mut spec = hub_spec(&fixture, &hub, json!({"mode": "auto", "interval": "1s"}));
    spec["backup"] = json!({
        "beforeUpdate": true,
        "store": {"s3": {"bucket": bucket.name, "prefix": "updates/", "endpoint": bucket.s3.endpoint,
                          "region": bucket.region, "pathStyle": true, "credentialsSecretRef": {"name": "s3"}}},
    });
    bed.apply(&spec).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    let first = bed
        .wait(&mut agent, "pack 1.0.0 running", Duration::from_secs(60), |o| {
            phase(o) == Some(Phase::Running) && pack_version(o) == Some("1.0.0")
        })
        .await?;
    let applied = condition(&first, conditions::PACK_APPLIED).context("PackApplied")?;
    assert_eq!(applied.status, "True");

    // 2.0.0 on the channel: backed up (to S3, with the keys read from the mounted Secret), swapped
    // in, ready, settled.
    hub.publish("server", "stable", "2.0.0", &fake_server_pack(&packs, "2.0.0", &[("mods/a.jar", b"a-2")])?)?;
    let updated = bed
        .wait(&mut agent, "the update applied", Duration::from_secs(90), |o| {
            last_update(o).is_some_and(|u| u.result == "Applied" && u.to == "2.0.0")
        })
        .await?;
    assert_eq!(pack_version(&updated), Some("2.0.0"));
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-2");
    let backup = updated.status.as_ref().and_then(|s| s.last_backup.clone()).context("no lastBackup")?;
    assert_eq!(condition(&updated, conditions::BACKUP_HEALTHY).map(|c| c.status.as_str()), Some("True"));
    let reasons = bed.event_reasons().await?;
    let position = |reason: &str| reasons.iter().position(|r| r == reason);
    let (backed_up, swapped, done) = (position("BackupSucceeded"), position("PackApplied"), position("UpdateApplied"));
    ensure!(backed_up.is_some() && swapped.is_some() && done.is_some(), "events: {reasons:?}");
    assert!(backed_up < done && swapped < done, "out of order: {reasons:?}");
    let key = format!("updates/manifests/{}.json", backup.name);
    let head = reqwest::Client::builder().no_proxy().build()?.head(bucket.presign("HEAD", &key)?).send().await?;
    assert!(head.status().is_success(), "the backup's manifest is not in the bucket: {}", head.status());

    // 3.0.0's server crashes on start: rolled back to 2.0.0, and the status says why.
    let crash = fake_server_pack(
        &packs,
        "3.0.0",
        &[("mods/a.jar", b"a-3"), ("fake-server.properties", b"crash-on-start=true\n")],
    )?;
    hub.publish("server", "stable", "3.0.0", &crash)?;
    let back = bed
        .wait(&mut agent, "the update rolled back", Duration::from_secs(90), |o| {
            last_update(o).is_some_and(|u| u.result == "RolledBack" && u.to == "3.0.0")
                && phase(o) == Some(Phase::Running)
                && pack_version(o) == Some("2.0.0")
        })
        .await?;
    let outcome = last_update(&back).context("no update outcome")?;
    assert!(outcome.message.as_deref().is_some_and(|m| m.contains("crash")), "{outcome:?}");
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-2");
    let note = bed.wait_event("UpdateRolledBack", Duration::from_secs(20)).await?;
    assert!(note.contains("3.0.0") && note.contains("crash"), "{note}");
    Ok(())
}

/// Writes Secret `name`'s `key` under `secrets` as the kubelet updates a Secret volume: the files in
/// a new directory `..VERSION`, the `..data` symlink swapped to it by a rename, each key a symlink
/// through `..data`.
fn kubelet_secret(secrets: &std::path::Path, name: &str, key: &str, value: &str, version: &str) -> Result<()> {
    let dir = secrets.join(name);
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join(key), value)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    let link = dir.join(key);
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(format!("..data/{key}"), &link)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_rotated_hub_token_is_used_from_the_next_check_without_a_restart() -> Result<()> {
    let (bed, fixture) = bed("agent-rotate", "rotated").await?;
    let (fixture, packs) = pack_fixture("rotate", fixture)?;
    let hub = Hub::start()?;
    hub.publish("server", "stable", "1.0.0", &fake_server_pack(&packs, "1.0.0", &[])?)?;
    kubelet_secret(&bed.secrets, "hub", "token", "first-token\n", "2026_12_07_00_00_00.1")?;
    let mut spec = hub_spec(&fixture, &hub, json!({"mode": "auto", "interval": "1s"}));
    spec["pack"]["source"]["hub"]["tokenSecretRef"] = json!({"name": "hub", "key": "token"});
    bed.apply(&spec).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let pid = server_pid(&agent)?;
    let seen = |token: &str| hub.authorizations.lock().is_ok_and(|a| a.iter().any(|h| h == &format!("Bearer {token}")));
    assert!(seen("first-token"), "{:?}", hub.authorizations.lock().map(|a| a.clone()));

    // The Secret changes in the API; the kubelet swaps the volume's files.
    kubelet_secret(&bed.secrets, "hub", "token", "second-token\n", "2026_12_07_00_01_00.2")?;
    common::wait_for("the hub asked with the new token", Duration::from_secs(30), || {
        seen("second-token").then_some(())
    })?;
    let since = hub.authorizations.lock().map(|a| a.len()).unwrap_or_default();
    std::thread::sleep(Duration::from_secs(3));
    let later: Vec<String> = hub.authorizations.lock().map(|a| a[since..].to_vec()).unwrap_or_default();
    assert!(!later.is_empty() && later.iter().all(|h| h == "Bearer second-token"), "{later:?}");
    assert_eq!(server_pid(&agent)?, pid, "the server was restarted for a rotated token");
    Ok(())
}

#[tokio::test]
async fn an_update_outside_its_window_or_with_players_online_is_reported_and_waits() -> Result<()> {
    let (bed, fixture) = bed("agent-wait", "waits").await?;
    let (fixture, packs) = pack_fixture("wait", fixture)?;
    let hub = Hub::start()?;
    hub.publish("server", "stable", "1.0.0", &fake_server_pack(&packs, "1.0.0", &[])?)?;
    // A window two hours from now (local time, as the agent reads it).
    let now = jiff::Zoned::now();
    let hour = (now.hour() + 2) % 24;
    let window = format!("{hour:02}:00-{hour:02}:30");
    bed.apply(&hub_spec(&fixture, &hub, json!({"mode": "auto", "interval": "1s", "window": window}))).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let pid = server_pid(&agent)?;

    hub.publish("server", "stable", "2.0.0", &fake_server_pack(&packs, "2.0.0", &[("mods/b.jar", b"b")])?)?;
    let waiting = bed
        .wait(&mut agent, "UpdateAvailable", Duration::from_secs(30), |o| {
            condition(o, conditions::UPDATE_AVAILABLE)
                .is_some_and(|c| c.status == "True" && c.message.contains("window"))
        })
        .await?;
    assert_eq!(
        waiting.status.as_ref().and_then(|s| s.update.as_ref()).and_then(|u| u.available.as_deref()),
        Some("2.0.0")
    );
    let note = bed.wait_event("UpdateAvailable", Duration::from_secs(20)).await?;
    assert!(note.contains("2.0.0"), "{note}");

    // The window goes, but players must be gone first, and one is online.
    agent.console_soon(&["fake-join", "alex"])?;
    bed.wait(&mut agent, "alex online", Duration::from_secs(30), |o| players(o) == Some(1)).await?;
    bed.apply(&hub_spec(&fixture, &hub, json!({"mode": "auto", "interval": "1s", "requireNoPlayers": true}))).await?;
    bed.wait(&mut agent, "waiting for players", Duration::from_secs(30), |o| {
        condition(o, conditions::UPDATE_AVAILABLE)
            .is_some_and(|c| c.status == "True" && c.message.contains("no players"))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server_pid(&agent)?, pid, "the server restarted");
    assert_eq!(pack_version(&bed.get().await?), Some("1.0.0"));
    assert!(!fixture.data.join("mods/b.jar").exists());
    assert_eq!(bed.event_reasons().await?.iter().filter(|r| *r == "UpdateAvailable").count(), 1, "told twice");
    Ok(())
}

#[tokio::test]
async fn a_minecraft_version_whose_server_fails_after_touching_the_world_is_undone_from_the_backup() -> Result<()> {
    let (bed, fixture) = bed("agent-version", "version").await?;
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    let jars = fixture.root.join("jars");
    let good = agent_bed::fake_server_jar_with(&jars, "good", "version=1.21.4\n")?;
    let bad = agent_bed::fake_server_jar_with(&jars, "bad", "version=1.21.5\ncrash-after-world=true\n")?;
    let manifest = agent_bed::mojang_stand_in(&[("1.21.4", &good), ("1.21.5", &bad)])?;
    let s3 = TestS3::shared().await?;
    let bucket = s3.bucket("agent-version").await?;
    write_secret(&bed.secrets, "s3", "AWS_ACCESS_KEY_ID", &bucket.s3.access_key)?;
    write_secret(&bed.secrets, "s3", "AWS_SECRET_ACCESS_KEY", &bucket.s3.secret_key)?;
    let mut spec = fake_spec(&fixture);
    spec["server"] = json!({"type": "vanilla", "version": "1.21.4"});
    spec["backup"] = json!({
        "beforeUpdate": true,
        "store": {"s3": {"bucket": bucket.name, "prefix": "v/", "endpoint": bucket.s3.endpoint,
                          "region": bucket.region, "pathStyle": true, "credentialsSecretRef": {"name": "s3"}}},
    });
    bed.apply(&spec).await?;
    let mut agent = Agent::start(&bed, &fixture, &["--mojang-manifest-url", &manifest])?;
    bed.wait(&mut agent, "1.21.4 running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    // World files the server never rewrites by itself, which the new version "upgrades".
    let kept = [("world/region/r.5.5.mca", random_bytes(70_000)), ("world/data/raids.dat", random_bytes(512))];
    for (path, bytes) in &kept {
        let path = fixture.data.join(path);
        std::fs::create_dir_all(path.parent().context("a parent")?)?;
        std::fs::write(path, bytes)?;
    }

    spec["server"]["version"] = "1.21.5".into();
    bed.apply(&spec).await?;
    let back = bed
        .wait(&mut agent, "the version change undone", Duration::from_secs(120), |o| {
            last_update(o).is_some_and(|u| u.kind == "server" && u.result == "RolledBack")
                && phase(o) == Some(Phase::Running)
        })
        .await?;
    let status = back.status.as_ref().context("a status")?;
    assert_eq!(status.server_version.as_deref(), Some("1.21.4"));
    let outcome = last_update(&back).context("no outcome")?;
    let message = outcome.message.clone().unwrap_or_default();
    assert!(message.contains("crash") && message.contains("restored from backup"), "{message}");
    let backup = status.last_backup.as_ref().context("no pre-update backup")?;
    assert!(message.contains(&backup.name), "{message} does not name {}", backup.name);

    // The files the failed server upgraded are back, byte for byte as in the backup (read by GNU tar
    // from the object in the bucket), and the upgraded world is kept aside.
    let scratch = fixture.root.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let archived = agent_bed::backup_files(&bucket, "v/", &backup.name, &scratch)?;
    for (path, bytes) in &kept {
        assert_eq!(std::fs::read(fixture.data.join(path))?, *bytes, "{path} is not as before the update");
        assert_eq!(archived.get(*path), Some(&Some(bytes.clone())), "{path} in the backup archive");
    }
    let aside = std::fs::read_dir(&fixture.data)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .find(|n| n.starts_with("world.before-restore-"))
        .context("the touched world was not kept aside")?;
    let upgraded = std::fs::read(fixture.data.join(&aside).join("region/r.5.5.mca"))?;
    assert!(upgraded.ends_with(b"upgraded-by-1.21.5\n"), "the new server did not touch the world");
    bed.wait_event("RestoreCompleted", Duration::from_secs(20)).await?;
    let note = bed.wait_event("UpdateRolledBack", Duration::from_secs(20)).await?;
    assert!(note.contains("1.21.5"), "{note}");

    // The spec still names 1.21.5; a crash restart runs 1.21.4 again, not the version that failed.
    let pid = server_pid(&agent)?;
    agent.console_soon(&["list"])?;
    // The server dies before it answers: the command's own outcome says nothing.
    let _ = agent.console(&["crash"]);
    common::wait_for("a restart after the crash", Duration::from_secs(60), || {
        agent.runner_status().ok().filter(|s| s["phase"] == "Running" && s["pid"].as_u64() != Some(pid))
    })?;
    assert_eq!(agent.runner_status()?["serverVersion"], "1.21.4");
    Ok(())
}

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

#[tokio::test]
async fn a_restart_with_the_hub_down_starts_the_held_version_and_says_degraded() -> Result<()> {
    let (bed, fixture) = bed("agent-hub-down", "offline").await?;
    let (fixture, packs) = pack_fixture("hub-down", fixture)?;
    let mut hub = Hub::start()?;
    hub.publish("server", "stable", "1.0.0", &fake_server_pack(&packs, "1.0.0", &[("mods/a.jar", b"a-1")])?)?;
    bed.apply(&hub_spec(&fixture, &hub, json!({"mode": "auto", "interval": "1s"}))).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "pack 1.0.0 running", Duration::from_secs(60), |o| {
        phase(o) == Some(Phase::Running) && pack_version(o) == Some("1.0.0")
    })
    .await?;
    agent.signal("TERM")?;
    assert!(agent.wait_exit(Duration::from_secs(30))?.success());

    // The pod restarts while the hub is down: the installed version starts, without waiting.
    hub.stop();
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    let held = bed
        .wait(&mut agent, "the held version running, degraded", Duration::from_secs(60), |o| {
            phase(o) == Some(Phase::Running)
                && condition(o, conditions::DEGRADED)
                    .is_some_and(|c| c.status == "True" && c.reason == reasons::PACK_SOURCE_UNREACHABLE)
        })
        .await?;
    assert_eq!(pack_version(&held), Some("1.0.0"));
    let degraded = condition(&held, conditions::DEGRADED).context("Degraded")?;
    assert!(degraded.message.contains("1.0.0") || degraded.message.contains("hub"), "{}", degraded.message);
    let applied = condition(&held, conditions::PACK_APPLIED).context("PackApplied")?;
    assert_eq!((applied.status.as_str(), applied.reason.as_str()), ("False", reasons::HELD_VERSION));
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-1");
    Ok(())
}

#[tokio::test]
async fn deleting_the_resource_stops_the_server_gracefully_and_the_agent_exits() -> Result<()> {
    let (bed, fixture) = bed("agent-delete", "doomed").await?;
    bed.apply(&fake_spec(&fixture)).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let pid = server_pid(&agent)?;
    bed.api().delete(&bed.name, &Default::default()).await?;
    let status = agent.wait_exit(Duration::from_secs(60))?;
    assert!(status.success(), "the agent exited with {status}");
    assert!(
        !agent.logs_with("MinecraftServer was deleted").is_empty()
            || !agent.logs_with("MinecraftServer is gone").is_empty()
    );
    // Gracefully: the server saved and stopped (its own lines), and no process is left.
    let output = agent.output();
    assert!(output.iter().any(|l| l.contains("Stopping server")), "no graceful stop in the output");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the server process {pid} is still there");
    Ok(())
}

#[tokio::test]
async fn sigterm_marks_not_ready_stops_the_server_writes_the_final_status_and_exits_zero() -> Result<()> {
    let (bed, fixture) = bed("agent-term", "term").await?;
    bed.apply(&fake_spec(&fixture)).await?;
    // The server takes a while to stop, so not-ready can be seen before it is down.
    std::fs::write(fixture.data.join("fake-server.properties"), "hang-on-stop=true\n")?;
    let mut agent = Agent::start(&bed, &fixture, &["--stop-timeout", "2"])?;
    bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    assert_eq!(common::http_get(&agent.metrics_addr, "/readyz")?.0, 200);
    agent.signal("TERM")?;
    common::wait_for("not ready", Duration::from_secs(2), || {
        common::http_get(&agent.metrics_addr, "/readyz").ok().filter(|(code, _)| *code == 503)
    })?;
    let status = agent.wait_exit(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    let last = bed.get().await?;
    assert_eq!(phase(&last), Some(Phase::Stopped), "the final status was not written");
    assert_eq!(condition(&last, conditions::READY).map(|c| c.status.as_str()), Some("False"));
    bed.wait_event("Stopped", Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn the_agents_token_reads_and_writes_only_its_own_server() -> Result<()> {
    let (bed, fixture) = bed("agent-rbac", "mine").await?;
    bed.apply(&fake_spec(&fixture)).await?;
    // Another server in the same namespace, and a Secret.
    let other: Value = json!({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer",
        "metadata": {"name": "theirs"}, "spec": fake_spec(&fixture)});
    bed.api().patch("theirs", &PatchParams::apply(common::ADMIN), &Patch::Apply(&other)).await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(bed.client.clone(), &bed.ns);
    secrets
        .patch(
            "theirs-rcon",
            &PatchParams::apply(common::ADMIN),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "theirs-rcon"},
                "stringData": {"password": "hunter2"}})),
        )
        .await?;

    let client = agent_client(&bed).await?;
    let mine: Api<MinecraftServer> = Api::namespaced(client.clone(), &bed.ns);
    mine.get("mine").await.context("the agent cannot read its own server")?;
    let status = json!({"apiVersion": "atlas.dev/v1alpha1", "kind": "MinecraftServer", "status": {"restarts": 0}});
    mine.patch_status("mine", &PatchParams::apply("atlas-agent").force(), &Patch::Apply(&status))
        .await
        .context("the agent cannot write its own status")?;

    let forbidden = |result: Result<(), kube::Error>, what: &str| -> Result<()> {
        match result {
            Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
            other => anyhow::bail!("{what}: expected 403 Forbidden, got {other:?}"),
        }
    };
    forbidden(mine.get("theirs").await.map(drop), "reading another server")?;
    forbidden(
        mine.patch_status("theirs", &PatchParams::apply("atlas-agent").force(), &Patch::Apply(&status)).await.map(drop),
        "patching another server's status",
    )?;
    forbidden(mine.list(&Default::default()).await.map(drop), "listing every server")?;
    forbidden(
        mine.patch("mine", &PatchParams::apply("atlas-agent").force(), &Patch::Apply(&other)).await.map(drop),
        "changing its own spec",
    )?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &bed.ns);
    forbidden(secrets.get("theirs-rcon").await.map(drop), "reading a Secret")?;
    forbidden(secrets.list(&Default::default()).await.map(drop), "listing Secrets")?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, &bed.ns);
    forbidden(pods.list(&Default::default()).await.map(drop), "listing pods")?;
    Ok(())
}

/// An API server (and etcd) of the test's own, with an agent bed for the server `name` in the
/// namespace `ns`: for tests that stop or compact it, which the run's shared one must not suffer.
async fn private_bed(ns: &str, name: &str, fixture: &Fixture) -> Result<(atlas_testbed::ClusterProcesses, AgentBed)> {
    let cluster = tokio::task::spawn_blocking(atlas_testbed::start_cluster).await??;
    let kubeconfig = kube::config::Kubeconfig::read_from(&cluster.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            ns,
            &PatchParams::apply(common::ADMIN),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
        )
        .await?;
    let bed = AgentBed::new(&cluster.kubeconfig, client, ns, name, &fixture.root).await?;
    Ok((cluster, bed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_running_while_the_api_server_is_down_and_the_status_catches_up() -> Result<()> {
    // A private API server: killing the run's shared one would break every other test.
    let fixture = Fixture::new("agent-outage")?;
    let (mut cluster, bed) = private_bed("outage", "steady", &fixture).await?;
    bed.apply(&fake_spec(&fixture)).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let pid = server_pid(&agent)?;

    tokio::task::block_in_place(|| cluster.kill_apiserver());
    // Meanwhile a player joins: the runner sees it, the status cannot be written.
    agent.console_soon(&["fake-join", "bob"])?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(agent.exited()?.is_none(), "the agent exited while the API server was down\n{}", agent.tail(20));
    let during = agent.runner_status()?;
    assert_eq!((during["pid"].as_u64(), during["phase"].as_str()), (Some(pid), Some("Running")));
    assert_eq!(during["playersOnline"], 1);

    // The container restarts while the API server is still down: the new agent answers its probes
    // at once, and starts the server from the MinecraftServer it saw last instead of waiting.
    agent.signal("TERM")?;
    agent.wait_exit(Duration::from_secs(60))?;
    let mut agent = Agent::start(&bed, &fixture, &["--api-wait-seconds", "3"])?;
    let healthy = common::wait_for("/healthz answering", Duration::from_secs(2), || {
        common::http_get(&agent.metrics_addr, "/healthz").ok()
    })?;
    assert_eq!(healthy.0, 200, "{healthy:?}");
    assert_eq!(common::http_get(&agent.metrics_addr, "/readyz")?.0, 503, "ready before the server runs");
    let restarted = common::wait_for("the server started from the cached spec", Duration::from_secs(60), || {
        agent.runner_status().ok().filter(|s| s["phase"] == "Running")
    })?;
    assert!(agent.exited()?.is_none(), "{}", agent.tail(20));
    let pid = restarted["pid"].as_u64().context("no pid")?;
    assert!(!agent.logs_with("starting the server from the cached MinecraftServer").is_empty());
    agent.console_soon(&["fake-join", "bob"])?;

    tokio::task::block_in_place(|| cluster.restart_apiserver())?;
    bed.wait(&mut agent, "the status caught up", Duration::from_secs(90), |o| players(o) == Some(1)).await?;
    assert_eq!(server_pid(&agent)?, pid, "the server was restarted because the API server blinked");
    assert_eq!(agent.logs_with("server process started").len(), 1);
    // The watch resumed too: a spec change still reaches the server.
    let mut spec = fake_spec(&fixture);
    spec["properties"]["motd"] = "after the outage".into();
    bed.apply(&spec).await?;
    common::wait_for("the spec change after the outage", Duration::from_secs(90), || {
        std::fs::read_to_string(fixture.data.join("server.properties"))
            .ok()
            .filter(|p| p.contains("motd=after the outage"))
    })?;
    Ok(())
}

/// Calls etcd's JSON gateway (`/v3/...`) with curl, as an operator of etcd would: the bed runs no
/// etcdctl, and the gateway is the same API.
fn etcd(url: &str, call: &str, body: &Value) -> Result<Value> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "-X", "POST", &format!("{url}/v3/{call}"), "-d", &body.to_string()])
        .output()?;
    ensure!(out.status.success(), "etcd {call}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The client URL of the bed's etcd, from its command line.
fn etcd_url(cluster: &atlas_testbed::ClusterProcesses) -> Result<String> {
    let pid = cluster.processes.pid("etcd").context("no etcd process")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    String::from_utf8_lossy(&cmdline)
        .split('\0')
        .find_map(|arg| arg.strip_prefix("--listen-client-urls=").map(str::to_owned))
        .context("no --listen-client-urls")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_revision_was_compacted_away_lists_again_and_sees_the_change() -> Result<()> {
    // A private API server and etcd: compacting the run's shared one would touch every other test.
    let fixture = Fixture::new("agent-gone")?;
    let (mut cluster, bed) = private_bed("gone", "compacted", &fixture).await?;
    bed.apply(&fake_spec(&fixture)).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    let running =
        bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let seen = running.metadata.resource_version.clone().context("a resourceVersion")?;
    let pid = server_pid(&agent)?;

    // The agent is frozen while the API server restarts, etcd compacts its history and the spec
    // changes: when it runs again, its watch resumes from a revision etcd no longer has, and only a
    // new listing can show it the change (its old connection died with the API server).
    agent.signal("STOP")?;
    tokio::task::block_in_place(|| cluster.kill_apiserver());
    let url = etcd_url(&cluster)?;
    // The gateway takes keys and values in base64: "/atlas-test/compaction" and "x".
    let key = json!({"key": "L2F0bGFzLXRlc3QvY29tcGFjdGlvbg==", "value": "eA=="});
    let revision = etcd(&url, "kv/put", &key)?["header"]["revision"].as_str().context("etcd's revision")?.to_owned();
    etcd(&url, "kv/compaction", &json!({"revision": revision, "physical": true}))?;
    tokio::task::block_in_place(|| cluster.restart_apiserver())?;
    let mut spec = fake_spec(&fixture);
    spec["properties"]["motd"] = "after the compaction".into();
    bed.apply(&spec).await?;
    // The revision the agent last saw is gone: a watch from it is answered 410 Gone.
    let gone = bed.api().watch(&kube::api::WatchParams::default().timeout(5), &seen).await?;
    futures::pin_mut!(gone);
    let first = format!("{:?}", futures::TryStreamExt::try_next(&mut gone).await);
    assert!(first.contains("410"), "a watch from {seen}: {first}");
    agent.signal("CONT")?;

    common::wait_for("the change seen through the new listing", Duration::from_secs(90), || {
        std::fs::read_to_string(fixture.data.join("server.properties"))
            .ok()
            .filter(|p| p.contains("motd=after the compaction"))
    })?;
    bed.wait(&mut agent, "the new generation observed", Duration::from_secs(60), |o| {
        phase(o) == Some(Phase::Running) && o.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
    })
    .await?;
    assert_ne!(server_pid(&agent)?, pid, "the server was not restarted for the change");
    Ok(())
}

#[tokio::test]
async fn as_pid_1_the_agent_reaps_orphans_and_passes_sigterm_on() -> Result<()> {
    let (bed, fixture) = bed("agent-init", "init").await?;
    bed.apply(&fake_spec(&fixture)).await?;
    // A new PID namespace: the agent is its PID 1, as in a container.
    let mut agent = Agent::start_wrapped(&bed, &fixture, &["unshare", "--pid", "--fork", "--kill-child"], &[])?;
    bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let init = common::wait_for("PID 1 of the namespace", Duration::from_secs(10), || child_of(agent.pid()))?;
    let status = std::fs::read_to_string(format!("/proc/{init}/status"))?;
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).context("NSpid")?;
    assert!(nspid.split_whitespace().last() == Some("1"), "not PID 1 in its namespace: {nspid}");
    assert!(!agent.logs_with("agent starting").is_empty(), "the agent proper did not start under init");

    // An orphan in the namespace: `sh` exits at once, leaving `sleep` to PID 1, which must reap it.
    let out = std::process::Command::new("nsenter")
        .args(["--target", &init.to_string(), "--pid", "--", "sh", "-c", "sleep 1 & exit 0"])
        .output()?;
    ensure!(out.status.success(), "nsenter: {}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let zombies: Vec<u32> = children(init).into_iter().filter(|pid| state(*pid) == Some('Z')).collect();
    assert!(zombies.is_empty(), "PID 1 left zombies: {zombies:?}");

    // SIGTERM to PID 1 reaches the agent: a graceful stop and exit 0.
    let kill = std::process::Command::new("kill").args(["-s", "TERM", &init.to_string()]).status()?;
    ensure!(kill.success());
    let exit = agent.wait_exit(Duration::from_secs(60)).with_context(|| agent.tail(30))?;
    assert!(exit.success(), "{exit}");
    assert!(agent.output().iter().any(|l| l.contains("Stopping server")), "no graceful stop");
    assert_eq!(phase(&bed.get().await?), Some(Phase::Stopped));
    Ok(())
}

#[tokio::test]
async fn as_pid_1_the_agent_lets_a_server_its_agent_left_behind_save_before_it_exits() -> Result<()> {
    let (bed, fixture) = bed("agent-orphan", "orphan").await?;
    bed.apply(&fake_spec(&fixture)).await?;
    let mut agent = Agent::start_wrapped(&bed, &fixture, &["unshare", "--pid", "--fork", "--kill-child"], &[])?;
    bed.wait(&mut agent, "Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let init = common::wait_for("PID 1 of the namespace", Duration::from_secs(10), || child_of(agent.pid()))?;
    let proper = common::wait_for("the agent proper", Duration::from_secs(10), || child_of(init))?;
    // Saving off: from now on only a stop saves the world.
    agent.console_soon(&["save-off"])?;
    let region = fixture.data.join("world/region/r.0.0.mca");
    let before = common::region_generation(&region)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(common::region_generation(&region)? == before, "the world is still being saved");

    // The agent proper dies abnormally: its JVM is left to PID 1, which must stop it gracefully.
    let kill = std::process::Command::new("kill").args(["-s", "KILL", &proper.to_string()]).status()?;
    ensure!(kill.success());
    agent.wait_exit(Duration::from_secs(40)).with_context(|| agent.tail(30))?;
    let after = common::region_generation(&region)?;
    assert!(after > before, "the orphaned server was killed without saving (generation {after})");
    Ok(())
}

/// The pids whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent(*p) == Some(pid))
        .collect()
}

fn child_of(pid: u32) -> Option<u32> {
    children(pid).into_iter().next()
}

/// A process's parent pid and state, from /proc/PID/stat (the command may hold spaces: after the last `)`).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

fn state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

#[tokio::test]
async fn a_secret_the_pod_does_not_mount_keeps_the_mounted_one_in_use_and_says_why() -> Result<()> {
    let (bed, fixture) = bed("agent-unmounted", "unmounted").await?;
    let s3 = TestS3::shared().await?;
    let bucket = s3.bucket("agent-unmounted").await?;
    write_secret(&bed.secrets, "s3", "AWS_ACCESS_KEY_ID", &bucket.s3.access_key)?;
    write_secret(&bed.secrets, "s3", "AWS_SECRET_ACCESS_KEY", &bucket.s3.secret_key)?;
    let mut spec = fake_spec(&fixture);
    let store = |secret: &str| {
        json!({"s3": {"bucket": bucket.name, "prefix": "u/", "endpoint": bucket.s3.endpoint,
                      "region": bucket.region, "pathStyle": true, "credentialsSecretRef": {"name": secret}}})
    };
    spec["backup"] = json!({"store": store("s3")});
    bed.apply(&spec).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "phase Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let pid = server_pid(&agent)?;

    // The admin moves the keys to a Secret this pod does not mount (the operator mounts it only in
    // the next pod): backups go on with the mounted one, and the status says why.
    spec["backup"]["store"] = store("s3-v2");
    let applied = bed.apply(&spec).await?;
    let told = bed
        .wait(&mut agent, "Degraded SecretNotMounted", Duration::from_secs(30), |o| {
            condition(o, conditions::DEGRADED).is_some_and(|c| c.reason == reasons::SECRET_NOT_MOUNTED)
                && o.status.as_ref().and_then(|s| s.observed_generation) == applied.metadata.generation
        })
        .await?;
    let degraded = condition(&told, conditions::DEGRADED).context("Degraded")?;
    assert_eq!(degraded.status, "True");
    assert!(degraded.message.contains("s3-v2") && degraded.message.contains("UpgradePending"), "{}", degraded.message);
    let note = bed.wait_event(reasons::SECRET_NOT_MOUNTED, Duration::from_secs(20)).await?;
    assert!(note.contains("s3-v2"), "{note}");
    let out = std::process::Command::new(common::binary())
        .args(["backup", "create", "--data"])
        .arg(&fixture.data)
        .output()?;
    ensure!(out.status.success(), "backup create: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server_pid(&agent)?, pid, "the server was restarted");
    Ok(())
}

#[tokio::test]
async fn a_spec_the_agent_refuses_is_degraded_told_by_an_event_and_observed() -> Result<()> {
    let (bed, fixture) = bed("agent-refused", "refused").await?;
    let mut spec = fake_spec(&fixture);
    bed.apply(&spec).await?;
    let mut agent = Agent::start(&bed, &fixture, &[])?;
    bed.wait(&mut agent, "phase Running", Duration::from_secs(60), |o| phase(o) == Some(Phase::Running)).await?;
    let pid = server_pid(&agent)?;

    // The CRD's pattern accepts the interval; the agent's check does not (it overflows).
    let mut bad = spec.clone();
    bad["pack"] = json!({"source": {"hub": {"url": "http://127.0.0.1:9", "pack": "p"}},
                         "update": {"interval": "99999999999999999999999s"}});
    let applied = bed.apply(&bad).await?;
    let refused = bed
        .wait(&mut agent, "Degraded SpecRejected, observed", Duration::from_secs(30), |o| {
            condition(o, conditions::DEGRADED).is_some_and(|c| c.reason == reasons::SPEC_REJECTED)
                && o.status.as_ref().and_then(|s| s.observed_generation) == applied.metadata.generation
        })
        .await?;
    let degraded = condition(&refused, conditions::DEGRADED).context("Degraded")?;
    assert!(degraded.message.contains("spec.pack.update.interval"), "{}", degraded.message);
    let note = bed.wait_event(reasons::SPEC_REJECTED, Duration::from_secs(20)).await?;
    assert!(note.contains("interval"), "{note}");
    assert_eq!(server_pid(&agent)?, pid, "the server was restarted for a refused spec");
    // The spec as it was: nothing to refuse any more, and nothing to restart for.
    let applied = bed.apply(&spec).await?;
    bed.wait(&mut agent, "Degraded over", Duration::from_secs(30), |o| {
        condition(o, conditions::DEGRADED).is_some_and(|c| c.status == "False")
            && o.status.as_ref().and_then(|s| s.observed_generation) == applied.metadata.generation
    })
    .await?;

    // The runner refuses this one: a version change with no backup to undo it.
    spec["server"]["version"] = "1.21.5".into();
    let applied = bed.apply(&spec).await?;
    let refused = bed
        .wait(&mut agent, "Degraded SpecRejected, observed", Duration::from_secs(30), |o| {
            condition(o, conditions::DEGRADED).is_some_and(|c| c.reason == reasons::SPEC_REJECTED)
                && o.status.as_ref().and_then(|s| s.observed_generation) == applied.metadata.generation
        })
        .await?;
    let degraded = condition(&refused, conditions::DEGRADED).context("Degraded")?;
    assert!(degraded.message.contains("beforeUpdate"), "{}", degraded.message);
    // The recorder folds a second SpecRejected within minutes into the first one's series.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = bed.events().await?;
        let told = events.iter().filter(|e| e.reason.as_deref() == Some(reasons::SPEC_REJECTED));
        let count: i32 = told.map(|e| e.series.as_ref().map_or(1, |s| s.count)).sum();
        if count >= 2 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "no second SpecRejected Event: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(server_pid(&agent)?, pid, "the server was restarted for a refused spec");
    Ok(())
}
