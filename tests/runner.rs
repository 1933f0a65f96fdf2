//! The standalone runner end to end: the built `atlas-runner` binary supervising the fake Java server.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{Fixture, Runner, cli, fake_server_pack, http_get, sha256_hex, wait_for};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn starts_to_ready_and_answers_status_console_and_logs() -> Result<()> {
    let fixture = Fixture::new("ready")?;
    let mut runner = Runner::start(&fixture, &[])?;

    let (code, _) =
        wait_for("the admin port", Duration::from_secs(20), || http_get(&runner.metrics_addr, "/healthz").ok())?;
    assert_eq!(code, 200);
    let status = runner.wait_running()?;
    assert_eq!(status["serverType"], "custom");
    assert_eq!(status["serverVersion"], "1.21.4");
    assert!(status["pid"].as_u64().is_some());
    assert_eq!(http_get(&runner.metrics_addr, "/readyz")?.0, 200);

    // The runner wrote eula.txt and merged server.properties with RCON on and a private password.
    assert!(std::fs::read_to_string(fixture.data.join("eula.txt"))?.contains("eula=true"));
    let props = std::fs::read_to_string(fixture.data.join("server.properties"))?;
    assert!(
        props.contains("enable-rcon=true") && props.contains(&format!("rcon.port={}", fixture.rcon_port)),
        "{props}"
    );
    assert!(props.contains("motd=hello"), "{props}");

    let list = cli(&fixture.data, &["console", "list"])?;
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    assert!(stdout(&list).contains("There are 0 of a max of 20 players online"), "{}", stdout(&list));

    // The options after the command, as `logs` and `status` take them.
    let after =
        Command::new(common::binary()).args(["console", "list", "--json", "--data"]).arg(&fixture.data).output()?;
    assert!(after.status.success(), "{}", String::from_utf8_lossy(&after.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&after.stdout)?;
    assert!(reply["output"].as_str().is_some_and(|o| o.contains("There are 0 of a max")), "{reply}");
    // Words after `--` are the command's, even when they look like options.
    let literal = Command::new(common::binary())
        .args(["console", "--data"])
        .arg(&fixture.data)
        .args(["--", "say", "--json", "is", "a", "word"])
        .output()?;
    assert!(literal.status.success(), "{}", String::from_utf8_lossy(&literal.stderr));
    wait_for("the said line in the log", Duration::from_secs(10), || {
        stdout(&cli(&fixture.data, &["logs", "--tail", "50"]).ok()?).contains("--json is a word").then_some(())
    })?;

    cli(&fixture.data, &["console", "fake-join", "alice"])?;
    let status = runner.wait_status("alice online", Duration::from_secs(10), |s| s["playersOnline"] == 1)?;
    assert_eq!(status["playerNames"][0], "alice");
    let text = stdout(&cli(&fixture.data, &["status"])?);
    assert!(text.contains("phase:     Running") && text.contains("players:   1/20 (alice)"), "{text}");

    // logs shows the history; logs -f also follows new output.
    let logs = stdout(&cli(&fixture.data, &["logs", "--tail", "500"])?);
    assert!(logs.contains("Done ("), "{logs}");
    let mut follow = Command::new(common::binary())
        .args(["logs", "-f", "--tail", "1", "--data"])
        .arg(&fixture.data)
        .stdout(Stdio::piped())
        .spawn()?;
    let reader = BufReader::new(follow.stdout.take().context("stdout")?);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The tail and the subscription are taken together: once the last line arrives, the follower is
    // subscribed. Then make the server print something.
    rx.recv_timeout(Duration::from_secs(10)).context("logs -f showed no tail")?;
    cli(&fixture.data, &["console", "say", "followed-line-42"])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("followed-line-42") {
            seen = true;
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "logs -f did not show the new line");
    Ok(())
}

#[test]
fn a_property_change_in_the_spec_restarts_the_server_once() -> Result<()> {
    let fixture = Fixture::new("respec")?;
    let mut runner = Runner::start(&fixture, &[])?;
    let first = runner.wait_running()?;
    fixture.write_spec("motd: changed")?;
    let second = runner.wait_status("a new server process", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["pid"] != first["pid"]
    })?;
    let props = std::fs::read_to_string(fixture.data.join("server.properties"))?;
    assert!(props.contains("motd=changed"), "{props}");
    // Exactly one restart, and it is not counted as a crash restart.
    std::thread::sleep(Duration::from_secs(2));
    let now = runner.status()?;
    assert_eq!(now["pid"], second["pid"], "the server restarted more than once");
    assert_eq!(now["restarts"], 0);
    assert_eq!(runner.logs_with("server process started").len(), 2);

    // A broken spec is reported and the running server keeps running.
    std::fs::write(&fixture.spec, "spec: [this is not a spec")?;
    wait_for("the bad-spec error", Duration::from_secs(10), || {
        (!runner.logs_with("keeping the running server").is_empty()).then_some(())
    })?;
    let still = runner.status()?;
    assert_eq!((still["phase"].clone(), still["pid"].clone()), ("Running".into(), second["pid"].clone()));
    Ok(())
}

#[test]
fn crashes_restart_with_growing_delays_then_fail() -> Result<()> {
    let fixture = Fixture::new("crash")?;
    fixture.behaviour("crash-on-start=true\n")?;
    let mut runner = Runner::start(&fixture, &["--max-crashes", "4"])?;
    let status = runner.wait_status("phase Failed", Duration::from_secs(60), |s| s["phase"] == "Failed")?;
    assert_eq!(status["lastExitReason"], "crash");
    assert_eq!(status["restarts"], 3);
    assert!(status["message"].as_str().is_some_and(|m| m.contains("4 failures")), "{status}");
    let delays: Vec<f64> = runner
        .logs_with("restarting after a delay")
        .iter()
        .filter_map(|l| l["delay"].as_str().and_then(parse_debug_duration))
        .collect();
    ensure!(delays.len() == 3, "expected 3 restart delays, got {delays:?}");
    ensure!(delays.windows(2).all(|w| w[1] > w[0] * 1.5), "delays do not grow: {delays:?}");

    // An admin restart clears Failed and tries again (and crashes again).
    std::fs::remove_file(fixture.data.join("fake-server.properties"))?;
    let out = cli(&fixture.data, &["restart"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    runner.wait_running()?;
    Ok(())
}

/// Parses tracing's Debug rendering of a Duration (`1.2s`, `250ms`, `1.5µs`).
fn parse_debug_duration(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" | "us" => number / 1e6,
        "ns" => number / 1e9,
        _ => return None,
    })
}

#[test]
fn out_of_memory_is_classified_as_oom() -> Result<()> {
    let fixture = Fixture::new("oom")?;
    fixture.behaviour("oom-on-start=true\n")?;
    let mut runner = Runner::start(&fixture, &["--max-crashes", "1"])?;
    let status = runner.wait_status("phase Failed", Duration::from_secs(60), |s| s["phase"] == "Failed")?;
    assert_eq!(status["lastExitReason"], "oom", "{status}");
    let (_, metrics) = http_get(&runner.metrics_addr, "/metrics")?;
    assert!(metrics.contains("atlas_server_exits_total{reason=\"oom\"} 1"), "{metrics}");
    Ok(())
}

#[test]
fn a_server_that_hangs_on_stop_is_killed_after_the_timeouts() -> Result<()> {
    let fixture = Fixture::new("hang")?;
    fixture.behaviour("hang-on-stop=true\n")?;
    let mut runner = Runner::start(&fixture, &["--stop-timeout", "1"])?;
    let running = runner.wait_running()?;
    let pid = running["pid"].as_u64().context("pid")?;
    let started = Instant::now();
    let out = cli(&fixture.data, &["stop"])?;
    let took = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = runner.status()?;
    assert_eq!(status["phase"], "Stopped");
    assert_eq!(status["lastExitReason"], "killed_on_stop");
    // RCON stop, stdin stop and SIGTERM each waited their second before SIGKILL.
    assert!(took >= Duration::from_secs(3), "stopped too fast: {took:?}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the JVM is still alive");
    // The stages in order: the server saw the RCON stop, then the stdin stop (its console's own line, not
    // RCON's), then the runner gave up on SIGTERM.
    let messages: Vec<String> = runner.logs().iter().filter_map(|l| l["message"].as_str().map(str::to_owned)).collect();
    let stages = [
        "[Rcon: Stopping the server]",
        "server ignored RCON stop; trying stdin",
        "]: Stopping the server",
        "server ignored stop on stdin; sending SIGTERM",
        "server ignored SIGTERM; sending SIGKILL",
    ];
    let at: Vec<Option<usize>> = stages.iter().map(|stage| messages.iter().position(|m| m.contains(stage))).collect();
    assert!(
        at.windows(2).all(|w| matches!(w, [Some(a), Some(b)] if a < b)),
        "stages out of order or missing ({at:?}):\n{}",
        messages.join("\n")
    );
    Ok(())
}

#[test]
fn sigterm_stops_the_server_cleanly_and_exits_zero() -> Result<()> {
    let fixture = Fixture::new("sigterm")?;
    let mut runner = Runner::start(&fixture, &[])?;
    let pid = runner.wait_running()?["pid"].as_u64().context("pid")?;
    Command::new("kill").args(["-s", "TERM", &runner.pid().to_string()]).status()?;
    let exit = runner.wait_exit(Duration::from_secs(30))?;
    assert!(exit.success(), "runner exited with {exit}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the JVM outlived the runner");
    assert!(!runner.logs_with("Stopping the server").is_empty(), "the server did not stop gracefully");
    assert!(!fixture.data.join(".atlas/control.sock").exists(), "the control socket was left behind");
    Ok(())
}

#[test]
fn metrics_pass_promtool_and_readyz_follows_the_server() -> Result<()> {
    let fixture = Fixture::new("metrics")?;
    fixture.behaviour("start-delay-ms=1500\n")?;
    let mut runner = Runner::start(&fixture, &[])?;
    let (code, _) =
        wait_for("/readyz to answer", Duration::from_secs(20), || http_get(&runner.metrics_addr, "/readyz").ok())?;
    assert_eq!(code, 503, "ready before the server is");
    runner.wait_running()?;
    assert_eq!(http_get(&runner.metrics_addr, "/readyz")?.0, 200);
    wait_for("a JVM memory sample", Duration::from_secs(10), || {
        let (_, body) = http_get(&runner.metrics_addr, "/metrics").ok()?;
        body.lines().any(|l| l.starts_with("atlas_jvm_resident_memory_bytes ") && !l.ends_with(" 0")).then_some(())
    })?;
    let (code, body) = http_get(&runner.metrics_addr, "/metrics")?;
    assert_eq!(code, 200);
    for name in [
        "atlas_players_online 0",
        "atlas_server_phase{phase=\"Running\"} 1",
        "atlas_build_info{version=",
        "atlas_rcon_latency_seconds_bucket",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    common::promtool_check(&body)?;
    Ok(())
}

#[test]
fn bad_input_fails_with_one_clear_line() -> Result<()> {
    let fixture = Fixture::new("bad")?;
    let run = |spec: &std::path::Path, extra: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(common::binary())
            .args(["run", "--spec"])
            .arg(spec)
            .arg("--data")
            .arg(&fixture.data)
            .args(["--metrics-addr", &format!("127.0.0.1:{}", common::free_port()?)])
            .args(extra)
            .output()?)
    };
    // A spec that fails to parse: the field and the line are named.
    let bad = fixture.root.join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: MinecraftServer\napiVersion: atlas.dev/v1alpha1\nmetadata: {name: x}\nspec:\n  eula: true\n  server: {type: forge}\n",
    )?;
    let out = run(&bad, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spec.server.type") && err.contains("line 6"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    // eula: false.
    std::fs::write(&bad, "eula: false\nserver: {type: vanilla}\n")?;
    let out = run(&bad, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spec.eula must be true"), "{err}");
    assert!(!fixture.data.join("eula.txt").exists(), "eula.txt written without acceptance");

    // An occupied control socket / data dir and an occupied port.
    let mut first = Runner::start(&fixture, &[])?;
    first.wait_running()?;
    let out = run(&fixture.spec, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("held by another atlas-runner"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    let other = Fixture::new("bad-port")?;
    let out = Command::new(common::binary())
        .args(["run", "--spec"])
        .arg(&other.spec)
        .arg("--data")
        .arg(&other.data)
        .args(["--metrics-addr", &first.metrics_addr])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--metrics-addr"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    Ok(())
}

/// A loopback stand-in for Mojang's API serving the real manifest and 1.21.4 document, rewritten so
/// the 1.21.4 server jar is the fake server (with its sha1, or a wrong one when `corrupt`).
fn mojang_stand_in(corrupt: bool) -> Result<String> {
    use sha1::{Digest, Sha1};
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mojang");
    let jar = std::fs::read(common::fake_server_jar()?)?;
    let base = common::serve_files(|base| {
        let mut sha1 = hex::encode(Sha1::digest(&jar));
        if corrupt {
            sha1 = sha1.chars().rev().collect();
        }
        let mut document: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("1.21.4.json"))?)?;
        document["downloads"]["server"] =
            serde_json::json!({"sha1": sha1, "size": jar.len(), "url": format!("{base}/server.jar")});
        let document = serde_json::to_vec(&document)?;
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join("version_manifest_v2.json"))?)?;
        let entry = manifest["versions"]
            .as_array_mut()
            .and_then(|versions| versions.iter_mut().find(|v| v["id"] == "1.21.4"))
            .context("1.21.4 in the manifest")?;
        entry["url"] = format!("{base}/1.21.4.json").into();
        entry["sha1"] = hex::encode(Sha1::digest(&document)).into();
        let manifest = serde_json::to_vec(&manifest)?;
        Ok([("/manifest.json", manifest), ("/1.21.4.json", document), ("/server.jar", jar.clone())]
            .into_iter()
            .map(|(path, body)| (path.to_owned(), body))
            .collect())
    })?;
    Ok(format!("{base}/manifest.json"))
}

#[test]
fn a_vanilla_server_is_resolved_downloaded_verified_and_run() -> Result<()> {
    let fixture = Fixture::new("vanilla")?;
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    fixture.write_spec_for("{type: vanilla, version: \"1.21.4\"}", "motd: vanilla")?;
    let manifest = mojang_stand_in(false)?;
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &manifest])?;
    let status = runner.wait_running()?;
    assert_eq!((status["serverType"].as_str(), status["serverVersion"].as_str()), (Some("vanilla"), Some("1.21.4")));
    // The jar came from the stand-in into the digest-keyed cache.
    let cached: Vec<_> = std::fs::read_dir(fixture.data.join(".atlas/cache/jars"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".jar"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    Ok(())
}

#[test]
fn a_vanilla_jar_with_the_wrong_digest_is_refused() -> Result<()> {
    let fixture = Fixture::new("vanilla-bad")?;
    fixture.write_spec_for("{type: vanilla, version: \"1.21.4\"}", "motd: vanilla")?;
    let manifest = mojang_stand_in(true)?;
    let mut runner = Runner::start(&fixture, &["--mojang-manifest-url", &manifest])?;
    let status = runner.wait_status("phase Failed", Duration::from_secs(60), |s| s["phase"] == "Failed")?;
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("does not match its published sha1") && message.contains("nothing was cached"),
        "{message}"
    );
    assert!(status.get("pid").is_none(), "a server was started: {status}");
    Ok(())
}

/// A pack's files besides the fake server's jar: path and content.
type PackFiles<'a> = &'a [(&'a str, &'a [u8])];

/// Writes the fixture's spec running the fake server as a custom jar shipped by the pack at `url`.
fn write_pack_spec(fixture: &Fixture, url: &str, sha256: &str) -> Result<()> {
    write_pack_spec_with(fixture, url, sha256, "")
}

/// [`write_pack_spec`] with `more` (YAML lines at spec level, two-space indent) appended.
fn write_pack_spec_with(fixture: &Fixture, url: &str, sha256: &str, more: &str) -> Result<()> {
    write_spec_with_pack_source(fixture, &format!("url: {{url: \"{url}\", sha256: \"{sha256}\"}}"), more)
}

/// The fixture's spec with `source` (one line of YAML) as spec.pack.source, then `more`.
fn write_spec_with_pack_source(fixture: &Fixture, source: &str, more: &str) -> Result<()> {
    let mut spec = format!(
        "apiVersion: atlas.dev/v1alpha1\nkind: MinecraftServer\nmetadata: {{name: test}}\nspec:\n  eula: true\n  server: {{type: custom, version: \"1.21.4\", jar: fake-server.jar}}\n  jvm: {{heap: 256M, flags: none}}\n  rcon: {{port: {}}}\n  properties:\n    server-port: \"{}\"\n  pack:\n    source:\n      {source}\n",
        fixture.rcon_port, fixture.game_port
    );
    spec.push_str(more);
    let tmp = fixture.root.join("server.yaml.tmp");
    std::fs::write(&tmp, spec)?;
    std::fs::rename(&tmp, &fixture.spec)?;
    Ok(())
}

/// A fixture without the fake server's jar (the pack brings it) and packs served from loopback:
/// returns the base URL and each pack's bytes by version.
fn pack_fixture(name: &str, packs: &[(&str, PackFiles<'_>)]) -> Result<(Fixture, String, Vec<Vec<u8>>)> {
    let fixture = Fixture::new(name)?;
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    let dir = fixture.root.join("packs");
    std::fs::create_dir_all(&dir)?;
    let blobs = packs.iter().map(|(v, extra)| fake_server_pack(&dir, v, extra)).collect::<Result<Vec<_>>>()?;
    let served: std::collections::HashMap<String, Vec<u8>> =
        packs.iter().zip(&blobs).map(|((v, _), blob)| (format!("/{v}.tar.zst"), blob.clone())).collect();
    let base = common::serve_files(|_| Ok(served))?;
    Ok((fixture, base, blobs))
}

#[test]
fn the_runner_applies_the_pack_updates_it_with_one_restart_and_keeps_running_on_a_bad_digest() -> Result<()> {
    let (fixture, base, blobs) = pack_fixture(
        "pack-update",
        &[("1.0.0", &[("mods/a.jar", b"a-1"), ("mods/old.jar", b"old")]), ("2.0.0", &[("mods/a.jar", b"a-2")])],
    )?;
    write_pack_spec(&fixture, &format!("{base}/1.0.0.tar.zst"), &sha256_hex(&blobs[0]))?;
    let mut runner = Runner::start(&fixture, &[])?;
    let first = runner.wait_running()?;
    assert_eq!(first["packVersion"], "1.0.0", "{first}");
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-1");
    assert!(fixture.data.join("mods/old.jar").is_file());
    let (_, metrics) = http_get(&runner.metrics_addr, "/metrics")?;
    assert!(metrics.contains("atlas_pack_info{version=\"1.0.0\"} 1"), "{metrics}");

    // A new version: staged while the server runs, then exactly one restart.
    write_pack_spec(&fixture, &format!("{base}/2.0.0.tar.zst"), &sha256_hex(&blobs[1]))?;
    let second = runner.wait_status("pack 2.0.0 running", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["packVersion"] == "2.0.0" && s["pid"] != first["pid"]
    })?;
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-2");
    assert!(!fixture.data.join("mods/old.jar").exists(), "a file the new version dropped stays");
    let staged = runner.logs_with("pack staged; stopping the server");
    let swapped = runner.logs_with("pack swapped in");
    assert!(staged.len() == 1 && swapped.len() == 2, "staged {staged:?} swapped {swapped:?}");
    std::thread::sleep(Duration::from_secs(2));
    let now = runner.status()?;
    assert_eq!((now["pid"].clone(), now["restarts"].clone()), (second["pid"].clone(), 0.into()));
    assert_eq!(runner.logs_with("server process started").len(), 2, "not exactly one restart");

    // A pack whose download fails its digest: the running server is not touched.
    write_pack_spec(&fixture, &format!("{base}/2.0.0.tar.zst"), &sha256_hex(b"something else"))?;
    wait_for("the digest error", Duration::from_secs(20), || {
        (!runner.logs_with("keeping the running server").is_empty()).then_some(())
    })?;
    let still = runner.status()?;
    assert_eq!(
        (still["phase"].clone(), still["pid"].clone(), still["packVersion"].clone()),
        ("Running".into(), second["pid"].clone(), "2.0.0".into())
    );
    let (_, metrics) = http_get(&runner.metrics_addr, "/metrics")?;
    assert!(metrics.contains("atlas_pack_apply_failures_total{category=\"digest-mismatch\"} 1"), "{metrics}");
    Ok(())
}

#[test]
fn a_pack_update_backs_the_world_up_first_and_a_failed_backup_calls_it_off() -> Result<()> {
    let (fixture, base, blobs) = pack_fixture(
        "pack-backup",
        &[("1.0.0", &[("mods/a.jar", b"a-1")]), ("2.0.0", &[("mods/a.jar", b"a-2")]), ("3.0.0", &[])],
    )?;
    let store = fixture.root.join("backups");
    let backup = |path: &std::path::Path| {
        format!("  backup:\n    beforeUpdate: true\n    store: {{local: {{path: \"{}\"}}}}\n", path.display())
    };
    let v = |i: usize| (format!("{base}/{}.0.0.tar.zst", i + 1), sha256_hex(&blobs[i]));
    let (url, sha) = v(0);
    write_pack_spec_with(&fixture, &url, &sha, &backup(&store))?;
    let mut runner = Runner::start(&fixture, &[])?;
    let first = runner.wait_running()?;

    // The update to 2.0.0 takes a backup of the world as 1.0.0 left it, before the server stops.
    let (url, sha) = v(1);
    write_pack_spec_with(&fixture, &url, &sha, &backup(&store))?;
    runner.wait_status("pack 2.0.0 running", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["packVersion"] == "2.0.0" && s["pid"] != first["pid"]
    })?;
    let out = Command::new(common::binary())
        .args(["backup", "list", "--json", "--spec"])
        .arg(&fixture.spec)
        .arg("--data")
        .arg(&fixture.data)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["packVersion"], "1.0.0", "{listed:?}");
    assert!(listed[0]["saveOffMs"].is_u64(), "not taken through RCON: {listed:?}");
    let order: Vec<String> = runner
        .logs()
        .iter()
        .filter_map(|l| l["message"].as_str().map(str::to_owned))
        .filter(|m| m.contains("backed up before the pack update") || m.contains("stopping the server for the swap"))
        .collect();
    assert_eq!(order.len(), 2, "{order:?}");
    assert!(order[0].contains("backed up"), "the server stopped before the backup: {order:?}");

    // A backup that cannot be written calls the update to 3.0.0 off: the server keeps running 2.0.0.
    let running = runner.status()?;
    let blocked = fixture.root.join("not-a-directory");
    std::fs::write(&blocked, b"a file where the store should be")?;
    let (url, sha) = v(2);
    write_pack_spec_with(&fixture, &url, &sha, &backup(&blocked))?;
    wait_for("the failed backup", Duration::from_secs(30), || {
        (!runner.logs_with("the backup before the pack update failed").is_empty()).then_some(())
    })?;
    let still = runner.status()?;
    assert_eq!(
        (still["phase"].clone(), still["pid"].clone(), still["packVersion"].clone()),
        ("Running".into(), running["pid"].clone(), "2.0.0".into())
    );
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-2");
    Ok(())
}

#[test]
fn a_new_pack_version_whose_server_crashes_before_ready_is_rolled_back() -> Result<()> {
    let crash: PackFiles<'_> = &[("mods/a.jar", b"a-2"), ("fake-server.properties", b"crash-on-start=true\n")];
    let (fixture, base, blobs) = pack_fixture("pack-crash", &[("1.0.0", &[("mods/a.jar", b"a-1")]), ("2.0.0", crash)])?;
    write_pack_spec(&fixture, &format!("{base}/1.0.0.tar.zst"), &sha256_hex(&blobs[0]))?;
    let mut runner = Runner::start(&fixture, &[])?;
    let first = runner.wait_running()?;
    write_pack_spec(&fixture, &format!("{base}/2.0.0.tar.zst"), &sha256_hex(&blobs[1]))?;
    wait_for("the rollback", Duration::from_secs(60), || {
        (!runner.logs_with("rolling the pack back").is_empty()).then_some(())
    })?;
    let back = runner.wait_status("pack 1.0.0 running again", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["packVersion"] == "1.0.0" && s["pid"] != first["pid"]
    })?;
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-1");
    assert!(!fixture.data.join("fake-server.properties").exists(), "the new version's file stays");
    let (_, metrics) = http_get(&runner.metrics_addr, "/metrics")?;
    assert!(metrics.contains("atlas_pack_rollbacks_total{reason=\"crash\"} 1"), "{metrics}");
    assert!(metrics.contains("atlas_pack_info{version=\"1.0.0\"} 1"), "{metrics}");
    let out = cli(&fixture.data, &["status"])?;
    assert!(stdout(&out).contains("pack:      1.0.0"), "{}", stdout(&out));
    assert_eq!(back["lastExitReason"], "crash");

    // A later crash of the old version's server restarts it without applying the failed pack again. Had it
    // been applied, its server would have crashed and been rolled back, ending as above: so count the swaps,
    // rollbacks and starts as well.
    let counts = |runner: &Runner| {
        ["pack swapped in", "rolling the pack back", "server process started"].map(|line| runner.logs_with(line).len())
    };
    let before = counts(&runner);
    assert_eq!(before, [3, 1, 3], "1.0.0 applied, 2.0.0 applied and rolled back, three servers started");
    cli(&fixture.data, &["console", "crash"])?;
    runner.wait_status("a restart after the crash", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["pid"] != back["pid"]
    })?;
    assert_eq!(runner.status()?["packVersion"], "1.0.0");
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-1");
    assert_eq!(counts(&runner), [before[0], before[1], before[2] + 1], "the crash restart swapped packs");
    let (_, metrics) = http_get(&runner.metrics_addr, "/metrics")?;
    assert!(metrics.contains("atlas_pack_rollbacks_total{reason=\"crash\"} 1"), "{metrics}");
    Ok(())
}

/// Serves every request a 200 whose body (announced as 64 MiB) trickles in at 1 KiB per 100 ms,
/// until the client goes: a download that outlasts the test. Returns the base URL.
fn serve_slowly() -> Result<String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let head =
                    "HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\nContent-Type: application/octet-stream\r\n\r\n";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                while stream.write_all(&[0u8; 1024]).is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    Ok(base)
}

#[test]
fn sigterm_during_a_long_pack_download_stops_the_server_gracefully() -> Result<()> {
    let (fixture, base, blobs) = pack_fixture("pack-sigterm", &[("1.0.0", &[("mods/a.jar", b"a-1")])])?;
    write_pack_spec(&fixture, &format!("{base}/1.0.0.tar.zst"), &sha256_hex(&blobs[0]))?;
    let mut runner = Runner::start(&fixture, &[])?;
    let pid = runner.wait_running()?["pid"].as_u64().context("pid")?;
    let slow = serve_slowly()?;
    write_pack_spec(&fixture, &format!("{slow}/2.0.0.tar.zst"), &sha256_hex(b"never finishes"))?;
    // The first fetch was 1.0.0's, at start.
    wait_for("the download to start", Duration::from_secs(30), || {
        (runner.logs_with("fetching the pack").len() >= 2).then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill").args(["-s", "TERM", &runner.pid().to_string()]).status()?;
    let exit = runner.wait_exit(Duration::from_secs(30))?;
    assert!(exit.success(), "runner exited with {exit}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the JVM outlived the runner");
    assert!(!runner.logs_with("Stopping the server").is_empty(), "the server did not stop gracefully");
    assert!(!runner.logs_with("the pack update was called off").is_empty(), "SIGTERM came outside the download");
    // Nothing of the called-off update is left to apply: the data dir holds 1.0.0.
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-1");
    Ok(())
}

/// Where the test hub answers for the `server` pack's `stable` channel.
const CHANNEL: &str = "/api/v1/packs/server/channels/stable";

/// The hub's answer naming `version`, whose blob is `blob`, served at `blobs/VERSION.tar.zst`.
fn channel_answer(version: &str, blob: &[u8]) -> Vec<u8> {
    let blob =
        serde_json::json!({"url": format!("blobs/{version}.tar.zst"), "sha256": sha256_hex(blob), "size": blob.len()});
    serde_json::json!({"version": version, "blob": blob}).to_string().into_bytes()
}

#[test]
fn a_followed_hub_channel_is_updated_automatically_once_nobody_is_online() -> Result<()> {
    let fixture = Fixture::new("hub-auto-update")?;
    std::fs::remove_file(fixture.data.join("fake-server.jar"))?;
    let dir = fixture.root.join("packs");
    std::fs::create_dir_all(&dir)?;
    let v1 = fake_server_pack(&dir, "1.0.0", &[("mods/a.jar", b"a-1")])?;
    let v2 = fake_server_pack(&dir, "2.0.0", &[("mods/a.jar", b"a-2")])?;
    let (base, hub, requests) = common::serve_changing_files_logged()?;
    // The channel names `version`, whose answer describes `described`; the hub serves `served` as its blob.
    let publish_as = |version: &str, served: &[u8], described: &[u8]| -> Result<()> {
        let mut files = hub.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        files.insert(format!("/blobs/{version}.tar.zst"), served.to_vec());
        files.insert(CHANNEL.into(), channel_answer(version, described));
        Ok(())
    };
    let publish = |version: &str, blob: &[u8]| publish_as(version, blob, blob);
    publish("1.0.0", &v1)?;
    write_spec_with_pack_source(
        &fixture,
        &format!("hub: {{url: \"{base}\", pack: server, channel: stable}}"),
        "    update: {mode: auto, interval: 1s, requireNoPlayers: true}\n",
    )?;
    let mut runner = Runner::start(&fixture, &[])?;
    let first = runner.wait_running()?;
    assert_eq!(first["packVersion"], "1.0.0", "{first}");

    // Someone is online when the channel moves on: the update is reported and waits for them.
    cli(&fixture.data, &["console", "fake-join", "alex"])?;
    runner.wait_status("a player online", Duration::from_secs(20), |s| s["playersOnline"] == 1)?;
    publish("2.0.0", &v2)?;
    runner.wait_status("the update reported", Duration::from_secs(30), |s| s["packUpdateAvailable"] == "2.0.0")?;
    wait_for("the wait logged", Duration::from_secs(20), || {
        (!runner.logs_with("waiting until no players are online").is_empty()).then_some(())
    })?;
    // Two more checks find the same: nothing changes while the player stays.
    std::thread::sleep(Duration::from_secs(2));
    let waiting = runner.status()?;
    assert_eq!((waiting["packVersion"].clone(), waiting["pid"].clone()), ("1.0.0".into(), first["pid"].clone()));
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-1");
    let (_, metrics) = http_get(&runner.metrics_addr, "/metrics")?;
    assert!(metrics.contains("atlas_pack_update_available{version=\"2.0.0\"} 1"), "{metrics}");
    let human = stdout(&cli(&fixture.data, &["status"])?);
    assert!(human.contains("update:    2.0.0 available"), "{human}");

    // The player leaves: a check applies the new version, with one restart.
    cli(&fixture.data, &["console", "fake-leave", "alex"])?;
    let updated = runner.wait_status("pack 2.0.0 running", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["packVersion"] == "2.0.0" && s["pid"] != first["pid"]
    })?;
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-2");
    assert!(updated.get("packUpdateAvailable").is_none(), "{updated}");
    assert_eq!(runner.logs_with("server process started").len(), 2, "not exactly one restart");

    // Someone online again, and 3.0.0 waits for them. Switching to manual mode then is only a policy
    // change: nothing is fetched or restarted, and 3.0.0 is reported, not applied.
    cli(&fixture.data, &["console", "fake-join", "alex"])?;
    runner.wait_status("a player online", Duration::from_secs(20), |s| s["playersOnline"] == 1)?;
    let v3 = fake_server_pack(&dir, "3.0.0", &[("mods/a.jar", b"a-3")])?;
    publish("3.0.0", &v3)?;
    runner.wait_status("3.0.0 reported", Duration::from_secs(30), |s| s["packUpdateAvailable"] == "3.0.0")?;
    let blobs_fetched = || -> Vec<String> {
        requests.lock().map(|r| r.iter().filter(|p| p.starts_with("/blobs/")).cloned().collect()).unwrap_or_default()
    };
    let fetched_before = blobs_fetched();
    assert!(!fetched_before.iter().any(|p| p.contains("3.0.0")), "3.0.0 was fetched with a player online");
    write_spec_with_pack_source(
        &fixture,
        &format!("hub: {{url: \"{base}\", pack: server, channel: stable}}"),
        "    update: {mode: manual, interval: 1s}\n",
    )?;
    wait_for("the manual policy taken", Duration::from_secs(20), || {
        (!runner.logs_with("spec.pack.update.mode is manual").is_empty()).then_some(())
    })?;
    assert_eq!(runner.logs_with("only spec.pack.update, taken without a restart").len(), 1);
    // Two more checks (1 s apart) find 3.0.0 again and fetch nothing either.
    let checks = requests.lock().map(|r| r.iter().filter(|p| *p == CHANNEL).count()).unwrap_or_default();
    wait_for("two more channel checks", Duration::from_secs(20), || {
        let now = requests.lock().map(|r| r.iter().filter(|p| *p == CHANNEL).count()).unwrap_or_default();
        (now >= checks + 2).then_some(())
    })?;
    assert_eq!(blobs_fetched(), fetched_before, "switching to manual mode fetched a pack");
    let manual = runner.status()?;
    assert_eq!(
        (manual["phase"].clone(), manual["pid"].clone(), manual["packVersion"].clone()),
        ("Running".into(), updated["pid"].clone(), "2.0.0".into())
    );

    // A restart while the channel names a version that cannot be applied (its digest is wrong) starts
    // the version the data dir holds.
    publish_as("4.0.0", &v3, b"not the blob served")?;
    cli(&fixture.data, &["restart"])?;
    let restarted = runner.wait_status("the held version restarted", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["pid"] != updated["pid"]
    })?;
    assert_eq!(restarted["packVersion"], "2.0.0", "{restarted}");
    assert_eq!(std::fs::read(fixture.data.join("mods/a.jar"))?, b"a-2");
    assert_eq!(runner.logs_with("starting the pack version the data dir holds").len(), 1);
    Ok(())
}
