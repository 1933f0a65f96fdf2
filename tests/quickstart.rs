//! The README's quick start on a host, run as written: `make run`'s command line (read from the
//! Makefile) in a directory holding `examples/vanilla.yaml`, then every command of the README's
//! "While it runs" block through a shell, with the built `atlas-runner` first on `PATH`.
//!
//! Two things differ from a user's machine, both by the runner's own settings: Mojang's API is a
//! loopback stand-in (`ATLAS_MOJANG_MANIFEST_URL`) serving the real manifest and version document
//! with the fake server (a Java 17 jar, as its document then says) as the latest release's jar, and the admin port is a free one
//! (`ATLAS_METRICS_ADDR`) that the `curl` line is pointed at, so parallel runs never collide on 9100.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::{binary, free_port, wait_for};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The commands of the fenced block that follows `after` in `text`, comments and blank lines left out.
fn block_after(text: &str, after: &str) -> Result<Vec<String>> {
    let start = text.find(after).with_context(|| format!("no {after:?} in the README"))?;
    let rest = &text[start..];
    let open = rest.find("```sh\n").context("no ```sh block after it")? + "```sh\n".len();
    let close = rest[open..].find("```").context("an unclosed block")? + open;
    Ok(rest[open..close]
        .lines()
        .map(|line| line.split(" # ").next().unwrap_or(line).trim().to_owned())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect())
}

/// The arguments `make run` gives the binary: the `run:` recipe after `--`, with DATA at its default.
fn make_run_args(makefile: &str) -> Result<String> {
    let default = makefile
        .lines()
        .find_map(|l| l.strip_prefix("DATA ?= "))
        .context("no `DATA ?=` default in the Makefile")?
        .trim();
    let recipe = makefile
        .split("\nrun:\n")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .context("no `run:` target in the Makefile")?;
    let (_, args) = recipe.split_once(" -- ").context("the run recipe passes no arguments after --")?;
    Ok(args.replace("$(DATA)", default))
}

/// A loopback stand-in for Mojang's API: the real manifest and the latest release's real version
/// document, whose server jar is the fake server (with its sha1).
fn mojang_stand_in() -> Result<String> {
    use sha1::{Digest, Sha1};
    let data = repo().join("tests/data/mojang");
    let jar = std::fs::read(common::fake_server_jar()?)?;
    let base = common::serve_files(|base| {
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join("version_manifest_v2.json"))?)?;
        let latest = manifest["latest"]["release"].as_str().context("no latest release")?.to_owned();
        let mut document: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join(format!("{latest}.json")))?)?;
        document["downloads"]["server"] = serde_json::json!({
            "sha1": hex::encode(Sha1::digest(&jar)), "size": jar.len(), "url": format!("{base}/server.jar")
        });
        // The jar served is the fake server, built for Java 17: its document says so, so the runner
        // picks any JDK 17+ the machine has instead of needing the real release's Java 25.
        document["javaVersion"]["majorVersion"] = 17.into();
        let document = serde_json::to_vec(&document)?;
        let entry = manifest["versions"]
            .as_array_mut()
            .and_then(|versions| versions.iter_mut().find(|v| v["id"] == latest.as_str()))
            .context("the latest release in the manifest")?;
        entry["url"] = format!("{base}/{latest}.json").into();
        entry["sha1"] = hex::encode(Sha1::digest(&document)).into();
        let manifest = serde_json::to_vec(&manifest)?;
        Ok([
            ("/manifest.json".to_owned(), manifest),
            (format!("/{latest}.json"), document),
            ("/server.jar".to_owned(), jar),
        ]
        .into_iter()
        .collect())
    })?;
    Ok(format!("{base}/manifest.json"))
}

/// The runner `make run` starts, stopped by SIGTERM (as Ctrl-C would) on drop.
struct Running(Child);

impl Running {
    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let status = wait_for("the runner to exit", Duration::from_secs(60), || self.0.try_wait().ok().flatten())?;
        Ok(status)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs one README line through `sh` in `dir`, with the built binary first on PATH.
fn shell(dir: &Path, line: &str) -> Result<Output> {
    let bin_dir = Path::new(binary()).parent().context("the binary's directory")?;
    let path = std::env::join_paths(
        std::iter::once(bin_dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    Ok(Command::new("sh").args(["-c", line]).current_dir(dir).env("PATH", path).env_remove("RUST_LOG").output()?)
}

fn succeeded(line: &str, out: &Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "`{line}` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

fn wait_running(dir: &Path) -> Result<()> {
    wait_for("the server to be Running", Duration::from_secs(90), || {
        let out = shell(dir, "atlas-runner status --data ./data --json").ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (status["phase"] == "Running").then_some(())
    })
}

#[test]
fn the_readmes_host_quick_start_runs_as_written() -> Result<()> {
    let readme = std::fs::read_to_string(repo().join("README.md"))?;
    let makefile = std::fs::read_to_string(repo().join("Makefile"))?;
    let args = make_run_args(&makefile)?;
    // The README says what `make run` runs; it must be what the Makefile runs.
    let quick = block_after(&readme, "## Quick start on a host")?;
    ensure!(quick == ["make run", "make test"], "the quick start's two commands changed: {quick:?}");
    let said = readme
        .lines()
        .find_map(|l| l.strip_prefix("make run").and_then(|r| r.split_once("# = cargo run --release -- ")))
        .map(|(_, said)| said.trim().to_owned())
        .context("the README no longer says what `make run` runs")?;
    ensure!(said == args, "the README says `make run` runs `{said}`, the Makefile runs `{args}`");

    let dir = tempfile::tempdir()?;
    std::fs::create_dir(dir.path().join("examples"))?;
    std::fs::copy(repo().join("examples/vanilla.yaml"), dir.path().join("examples/vanilla.yaml"))?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let words: Vec<&str> = args.split_whitespace().collect();
    let mut runner = Running(
        Command::new(binary())
            .args(&words)
            .current_dir(dir.path())
            .env("ATLAS_MOJANG_MANIFEST_URL", mojang_stand_in()?)
            .env("ATLAS_METRICS_ADDR", &metrics)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_running(dir.path())?;

    let lines = block_after(&readme, "While it runs")?;
    ensure!(lines.len() >= 7, "the README's block has {} commands: {lines:?}", lines.len());
    let mut backup = None::<String>;
    for written in &lines {
        let mut line = written.replace("127.0.0.1:9100", &metrics);
        if line.contains(" NAME ") {
            let name = backup.as_deref().context("`backup restore NAME` before any backup was created")?;
            line = line.replace(" NAME ", &format!(" {name} "));
        }
        let out = succeeded(&line, &shell(dir.path(), &line)?)?;
        let expect: &[&str] = match written.split_whitespace().take(3).collect::<Vec<_>>()[..] {
            ["atlas-runner", "status", ..] => &["Running"],
            ["atlas-runner", "console", ..] => &["players online"],
            ["atlas-runner", "logs", ..] => &["Done ("],
            ["curl", ..] => &["atlas_server_ready 1"],
            ["atlas-runner", "backup", "create"] => {
                let name = out.strip_prefix("created ").and_then(|r| r.split_whitespace().next());
                backup = Some(name.with_context(|| format!("no backup name in {out:?}"))?.to_owned());
                &["through the runner"]
            }
            ["atlas-runner", "backup", "list"] => &[],
            ["atlas-runner", "backup", "restore"] => &[],
            _ => bail!("a README command this test does not know: {written}"),
        };
        for text in expect {
            ensure!(out.contains(text), "`{line}` printed no {text:?}:\n{out}");
        }
        if written.contains("backup list") {
            let name = backup.as_deref().context("a list before any backup")?;
            ensure!(out.contains(name), "`{line}` does not list {name}:\n{out}");
        }
        if written.contains("backup restore") {
            // Stopped, swapped and started again: the world from before is kept aside.
            let kept = std::fs::read_dir(dir.path().join("data"))?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("world.before-restore-"));
            ensure!(kept, "the restore kept no world.before-restore-*");
            wait_running(dir.path())?;
        }
    }
    // Ctrl-C (SIGTERM here) stops it gracefully.
    let status = runner.terminate()?;
    ensure!(status.success(), "the runner exited with {status} on SIGTERM");
    Ok(())
}

#[test]
fn the_block_reader_leaves_comments_out() -> Result<()> {
    let text = "x\n## Here\n```sh\n# a comment\nmake run            # = cargo run\n\nmake test\n```\n";
    assert_eq!(block_after(text, "## Here")?, ["make run", "make test"]);
    let makefile = "DATA ?= ./data\nrun:\n\t$(CARGO) run --release --locked -- run --spec x.yaml --data $(DATA)\n";
    assert_eq!(make_run_args(makefile)?, "run --spec x.yaml --data ./data");
    Ok(())
}
