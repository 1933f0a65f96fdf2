//! The README's quick starts, run as written.
//!
//! On a host: `make run`'s command line (read from the Makefile) in a directory holding
//! `examples/vanilla.yaml`, then every command of the README's "While it runs" block through a
//! shell, with the built `atlas-runner` first on `PATH`.
//!
//! Two things differ from a user's machine, both by the runner's own settings: Mojang's API is a
//! loopback stand-in (`ATLAS_MOJANG_MANIFEST_URL`) serving the real manifest and version document
//! with the fake server (a Java 17 jar, as its document then says) as the latest release's jar, and the admin port is a free one
//! (`ATLAS_METRICS_ADDR`) that the `curl` line is pointed at, so parallel runs never collide on 9100.
//!
//! On Kubernetes: every line of the README's two blocks through `sh -c`, from the repository root,
//! with the bed's `helm` and `kubectl` first on `PATH` and `KUBECONFIG` naming the admin kubeconfig
//! of a node bed of the test's own (the install is cluster-wide, as a user's is). Nothing in the pod
//! is changed: its agent fetches `https://piston-meta.mojang.com/...` and `https://piston-data...`
//! as it would anywhere; the bed's DNS points those names at the bed's host address, where the same
//! stand-in's files are served over HTTPS with a certificate of the bed's outside-world CA, which
//! the bed's base image (and so our image) trusts. Nothing leaves the machine: the node has no route
//! off it, and the bed's DNS forwards nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A loopback stand-in for Mojang's API over HTTP (see [`common::mojang_files`]); the manifest's URL.
fn mojang_stand_in() -> Result<String> {
    let base = common::serve_files(|base| common::mojang_files(base, base))?;
    Ok(format!("{base}{}", common::MOJANG_MANIFEST_PATH))
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

const MOJANG_NAMES: [&str; 2] = ["piston-meta.mojang.com", "piston-data.mojang.com"];

/// Runs one README line through `sh` from the repository root with `env` (PATH, KUBECONFIG, helm's
/// homes) as a user's shell has them.
fn user_shell(line: &str, env: &[(&str, std::ffi::OsString)]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", line]).current_dir(repo()).stdin(Stdio::null()).env_remove("RUST_LOG");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// Runs `line` (a `--watch`: it never ends by itself) until a line it prints satisfies `done`, then
/// presses Ctrl-C (SIGINT to its process group). Everything it printed, or an error with it.
fn watch_until(mut cmd: Command, line: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Result<String> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn()?;
    let stdout = child.stdout.take().context("the watch's stdout")?;
    let (send, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for text in BufReader::new(stdout).lines().map_while(Result::ok) {
            if send.send(text).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut seen = String::new();
    let mut finished = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(text) => {
                seen += &text;
                seen.push('\n');
                if done(&text) {
                    finished = true;
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let pgid = format!("-{}", child.id());
    let still_running = matches!(child.try_wait(), Ok(None));
    Command::new("kill").args(["-INT", "--", &pgid]).status()?;
    let out = child.wait_with_output()?;
    ensure!(
        finished,
        "`{line}` did not show what was waited for in {timeout:?} ({}); it printed:\n{seen}{}",
        if still_running { "still watching" } else { "it ended by itself" },
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(seen)
}

/// What a user would look at when the server never gets Running: the MinecraftServer's conditions
/// and events, and the end of the agent's log.
fn diagnosis(env: &[(&str, std::ffi::OsString)]) -> String {
    let mut text = String::from("the server never got Running");
    for line in ["kubectl describe mcs vanilla", "kubectl get pods -A", "kubectl logs vanilla-0 --tail 3"] {
        if let Ok(out) = user_shell(line, env).output() {
            text += &format!(
                "\n$ {line}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    text
}

/// The addresses (`IP:PORT`) on which process `pid` listens for TCP on `port`, as `ss` sees them.
fn listening_on(pid: u32, port: u16) -> Result<Vec<String>> {
    let out = Command::new("ss").args(["-Hltnp", &format!("sport = :{port}")]).output().context("run ss (iproute2)")?;
    ensure!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    let needle = format!("pid={pid},");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect())
}

/// The cluster's side of the quick start: a node bed of this test's own, our image built around the
/// run's image binary (the run's image when there is one), with two local volumes.
fn own_bed() -> Result<atlas_testbed::node::NodeCluster> {
    let binary = std::env::var_os(atlas_testbed::env::IMAGE_BINARY)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(binary()));
    atlas_testbed::node::start_node_cluster(&atlas_testbed::node::NodeOptions { image_binary: binary, volumes: 2 })
}

#[test]
fn the_readmes_kubernetes_quick_start_runs_as_written_on_the_beds_cluster() -> Result<()> {
    let readme = std::fs::read_to_string(repo().join("README.md"))?;
    let install = block_after(&readme, "## Quick start on Kubernetes")?;
    let then = block_after(&readme, "The server is Running once its pod is ready")?;
    // The guide repeats the install: the same text, so the two cannot drift.
    let guide = std::fs::read_to_string(repo().join("docs/getting-started/kubernetes.md"))?;
    let guide_install = block_after(&guide, "## Install with Helm")?;
    ensure!(
        guide_install == install,
        "docs/getting-started/kubernetes.md installs with {guide_install:?}, the README with {install:?}"
    );
    ensure!(install.len() == 3 && then.len() == 3, "the quick start's blocks changed: {install:?} then {then:?}");

    // A cluster of the test's own: the install is cluster-wide (its operator watches every
    // namespace), as a user's is, and must meet no other test's operator.
    let started = Instant::now();
    let bed = own_bed()?;
    eprintln!("node bed {} Ready in {:.1}s", bed.network.name, bed.started_in.as_secs_f64());
    let scratch = tempfile::tempdir()?;

    // Mojang, as the pod's agent reaches it: the real names, resolved by the cluster's DNS to the
    // bed's host address, where HTTPS on 443 answers with a certificate of the outside-world CA.
    let host = bed.network.host_ip;
    let pki = atlas_testbed::pki::Pki::outside_world(&scratch.path().join("pki"))?;
    pki.server("mojang", "mojang stand-in", MOJANG_NAMES.map(str::to_owned).to_vec())?;
    let www = scratch.path().join("www");
    let meta = format!("https://{}", MOJANG_NAMES[0]);
    let data = format!("https://{}", MOJANG_NAMES[1]);
    for (path, body) in common::mojang_files(&meta, &data)? {
        let file = www.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().context("a file in a directory")?)?;
        std::fs::write(file, body)?;
    }
    // On the bed's address only: nothing listens on an address of the machine's own networks.
    let mojang =
        common::HttpsServer::start(&www, &pki.path("mojang.crt"), &pki.path("mojang.key"), &host.to_string(), 443)?;
    ensure!(
        listening_on(mojang.pid(), 443)? == [format!("{host}:443")],
        "the stand-in listens on {:?}, not on the bed's address {host} alone",
        listening_on(mojang.pid(), 443)?
    );
    bed.network.open_to_pods(443)?;
    bed.point_names(&MOJANG_NAMES, host)?;

    // The user's shell: helm and kubectl pointed at the cluster (helm with homes of its own).
    let bin = atlas_testbed::bin_dir();
    let path = std::env::join_paths(
        std::iter::once(bin.clone()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    let helm_home = scratch.path().join("helm");
    let env: Vec<(&str, std::ffi::OsString)> = vec![
        ("PATH", path),
        ("KUBECONFIG", bed.kubeconfig().as_os_str().to_owned()),
        ("HELM_CACHE_HOME", helm_home.join("cache").into_os_string()),
        ("HELM_CONFIG_HOME", helm_home.join("config").into_os_string()),
        ("HELM_DATA_HOME", helm_home.join("data").into_os_string()),
    ];
    for line in &install {
        let step = Instant::now();
        if line.ends_with("--watch") {
            // Watched until the server's row says Running, then Ctrl-C, as a user does.
            let seen = watch_until(user_shell(line, &env), line, Duration::from_secs(180), |row| {
                let words: Vec<&str> = row.split_whitespace().collect();
                words.first() == Some(&"vanilla") && words.contains(&"Running")
            })
            .map_err(|e| e.context(diagnosis(&env)))?;
            ensure!(seen.lines().next().is_some_and(|h| h.contains("PHASE")), "`{line}` printed no header:\n{seen}");
            eprint!("{seen}");
        } else {
            succeeded(line, &user_shell(line, &env).output()?)?;
        }
        eprintln!("`{line}`: {:.1}s", step.elapsed().as_secs_f64());
    }

    let latest = {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(repo().join("tests/data/mojang/version_manifest_v2.json"))?)?;
        manifest["latest"]["release"].as_str().context("no latest release")?.to_owned()
    };
    for line in &then {
        let out = succeeded(line, &user_shell(line, &env).output()?)?;
        eprintln!("$ {line}\n{out}");
        let expect: Vec<String> = match line.split_whitespace().collect::<Vec<_>>()[..] {
            // What its comment says: phase, version (the stand-in's latest release), players,
            // uptime, restarts.
            [.., "atlas-runner", "status"] => vec![
                "phase: Running".into(),
                format!("server: vanilla {latest}"),
                "players: 0/".into(),
                "uptime:".into(),
                "restarts: 0".into(),
            ],
            // The fake server's answer to `list`, through RCON.
            [.., "atlas-runner", "console", "list"] => vec!["players online".into()],
            // The conditions, agent's and operator's, and the agent's Started event.
            ["kubectl", "describe", ..] => {
                vec!["Conditions:".into(), "Type: Ready".into(), "Type: WorkloadReady".into(), "Normal Started".into()]
            }
            _ => bail!("a README command this test does not know: {line}"),
        };
        // Compared with runs of blanks as one space: kubectl aligns its columns as it likes.
        let flat: Vec<String> = out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        let flat = flat.join("\n");
        for text in &expect {
            ensure!(flat.contains(text.as_str()), "`{line}` printed no {text:?}:\n{out}");
        }
    }
    // Nothing in the pod was pointed elsewhere: its agent read Mojang's real URLs.
    let pod_env = succeeded(
        "kubectl get pod",
        &user_shell("kubectl get pod vanilla-0 -o jsonpath='{.spec.containers[*].env}'", &env).output()?,
    )?;
    ensure!(!pod_env.contains("ATLAS_MOJANG"), "the server's pod overrides Mojang's URLs: {pod_env}");
    eprintln!("the Kubernetes quick start ran in {:.1}s", started.elapsed().as_secs_f64());
    // The bed goes with the test (its teardown removes the cluster, the node and its hosts file).
    Ok(())
}
