//! The RCON client against a fake Minecraft server that speaks RCON as vanilla does
//! (`tests/fixtures/FakeServer.java`, compiled here), and that fake checked with a real RCON client from
//! PyPI (`mcrcon`). Needs a JDK 17+ and Python 3 with venv; a missing one fails the test and says what to
//! install.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atlas_runner::rcon::{MAX_COMMAND_LEN, PlayerList, Rcon, RconClient, RconError, parse_list};
use atlas_testbed::{free_port, unique};
use common::{FakeServer, region_generation, run_tool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PASSWORD: &str = "s3cret-rcon";
/// Generous: the JVMs of parallel tests share two cores.
const RCON_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(60);

// ---- The fake server's data dir ----

/// A server data dir with a `server.properties` on free loopback ports; removed on drop.
struct DataDir {
    path: PathBuf,
    rcon_port: u16,
}

impl DataDir {
    fn new() -> Result<Self> {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("fake-server-data"));
        std::fs::create_dir_all(&path)?;
        let (game_port, rcon_port) = (free_port()?, free_port()?);
        std::fs::write(
            path.join("server.properties"),
            format!(
                "server-ip=127.0.0.1\nserver-port={game_port}\nenable-rcon=true\nrcon.port={rcon_port}\n\
                 rcon.password={PASSWORD}\nmax-players=20\nmotd=Atlas test\n"
            ),
        )?;
        Ok(Self { path, rcon_port })
    }

    fn rcon_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.rcon_port))
    }

    fn region_file(&self) -> PathBuf {
        self.path.join("world/region/r.0.0.mca")
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The reply `echo-long count` must produce (mirrors `FakeServer.echoLine`).
fn echo_long(count: usize) -> String {
    (1..=count)
        .map(|i| format!("echo-long line {i} of {count}: the quick brown fox jumps over the lazy dog"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- The client against the fake server ----

#[tokio::test]
async fn login_list_and_fake_joins() -> Result<()> {
    let data = DataDir::new()?;
    let _server = FakeServer::start(&data.path)?;
    let mut client = RconClient::connect(data.rcon_addr(), PASSWORD, RCON_TIMEOUT).await?;

    let empty = client.command("list").await?;
    assert_eq!(empty, "There are 0 of a max of 20 players online: ");
    assert_eq!(parse_list(&empty), Some(PlayerList { online: 0, max: 20, names: vec![] }));

    assert_eq!(client.command("fake-join Alice").await?, "Alice joined the game");
    client.command("fake-join Bob").await?;
    let two = parse_list(&client.command("list").await?);
    assert_eq!(two, Some(PlayerList { online: 2, max: 20, names: vec!["Alice".into(), "Bob".into()] }));

    client.command("fake-leave Alice").await?;
    let one = parse_list(&client.command("/list").await?);
    assert_eq!(one, Some(PlayerList { online: 1, max: 20, names: vec!["Bob".into()] }));

    // Vanilla joins a command's messages with no separator, and `say` answers nothing.
    assert_eq!(
        client.command("frobnicate").await?,
        "Unknown or incomplete command, see below for errorfrobnicate<--[HERE]"
    );
    assert_eq!(client.command("say hello from rcon").await?, "");
    Ok(())
}

#[tokio::test]
async fn wrong_password_is_refused() -> Result<()> {
    let data = DataDir::new()?;
    let server = FakeServer::start(&data.path)?;
    // The fake logs each RCON connection when it opens and when it closes, as vanilla does.
    let connections = |what: &str| {
        server.log_lines().iter().filter(|l| l.contains("Thread RCON Client") && l.ends_with(what)).count()
    };
    let err = RconClient::connect(data.rcon_addr(), "not-the-password", RCON_TIMEOUT).await;
    match err {
        Err(err @ RconError::Auth) => assert_eq!(err.category(), "auth"),
        other => bail!("expected an auth error, got {other:?}"),
    }
    // The handle reports the same, and does not retry a refused password: one connection, not two.
    let rcon = Rcon::new(data.rcon_addr(), String::new(), RCON_TIMEOUT);
    assert!(matches!(rcon.command("list").await, Err(RconError::Auth)));
    assert!(matches!(rcon.command("list").await, Err(RconError::Auth)), "the second command");
    // Every connection made is closed by now (the server closes a refused one): wait until the log shows
    // them all closed, then count them.
    let deadline = Instant::now() + RCON_TIMEOUT;
    while connections("shutting down") < connections("started") || connections("started") < 3 {
        ensure!(Instant::now() < deadline, "connections never closed:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(connections("started"), 3, "one connection per refused login:\n{}", server.log_text());
    Ok(())
}

#[tokio::test]
async fn multi_packet_reply_is_reassembled_exactly() -> Result<()> {
    let data = DataDir::new()?;
    let _server = FakeServer::start(&data.path)?;
    let mut client = RconClient::connect(data.rcon_addr(), PASSWORD, RCON_TIMEOUT).await?;

    let expected = echo_long(2000);
    assert!(expected.len() > 30 * 4096, "the reply must span many packets");
    let reply = client.command("echo-long 2000").await?;
    assert_eq!(reply.lines().count(), 2000);
    assert!(reply == expected, "reassembled reply differs from the expected 2000 lines");

    // Nothing of it is left on the connection for the next command.
    assert_eq!(parse_list(&client.command("list").await?).map(|l| l.online), Some(0));
    assert_eq!(client.command("echo-long 1").await?, echo_long(1));
    Ok(())
}

#[tokio::test]
async fn too_long_command_is_refused_before_sending() -> Result<()> {
    let data = DataDir::new()?;
    let _server = FakeServer::start(&data.path)?;
    let mut client = RconClient::connect(data.rcon_addr(), PASSWORD, RCON_TIMEOUT).await?;

    let too_long = format!("say {}", "a".repeat(MAX_COMMAND_LEN - 3));
    match client.command(&too_long).await {
        Err(err @ RconError::CommandTooLong { len: 1447 }) => assert_eq!(err.category(), "too_long"),
        other => bail!("expected CommandTooLong, got {other:?}"),
    }
    // Nothing was sent, so the connection still works, and the longest command Minecraft reads is fine.
    let longest = format!("say {}", "a".repeat(MAX_COMMAND_LEN - 4));
    assert_eq!(client.command(&longest).await?, "");
    assert!(client.command("list").await?.starts_with("There are 0"));

    let rcon = Rcon::new(data.rcon_addr(), PASSWORD.to_owned(), RCON_TIMEOUT);
    assert!(matches!(rcon.command(&too_long).await, Err(RconError::CommandTooLong { len: 1447 })));
    Ok(())
}

#[tokio::test]
async fn rcon_reconnects_after_the_server_restarts() -> Result<()> {
    let data = DataDir::new()?;
    let mut first = FakeServer::start(&data.path)?;
    let rcon = Rcon::new(data.rcon_addr(), PASSWORD.to_owned(), RCON_TIMEOUT);
    assert_eq!(rcon.addr(), data.rcon_addr());
    rcon.command("fake-join Alice").await?;
    assert_eq!(parse_list(&rcon.command("list").await?).map(|l| l.online), Some(1));

    // A graceful stop over RCON: the reply arrives, then the server exits 0 and the connection closes.
    assert_eq!(rcon.command("stop").await?, "Stopping the server");
    assert!(first.wait_for_exit(START_TIMEOUT)?.success(), "{}", first.log_text());
    drop(first);

    let second = FakeServer::start(&data.path)?;
    let list = parse_list(&rcon.command("list").await?);
    assert_eq!(list.map(|l| l.online), Some(0), "the handle talks to the new server");

    // The server dies under the connection: the handle reconnects once, finds nothing, and says so.
    drop(second);
    let down = rcon.command("list").await;
    assert!(matches!(&down, Err(RconError::Connect { .. })), "{down:?}");

    let _third = FakeServer::start(&data.path)?;
    assert!(rcon.command("list").await?.starts_with("There are 0"));
    // Clones share the connection.
    assert!(rcon.clone().command("list").await?.starts_with("There are 0"));
    Ok(())
}

// ---- Failures without a server ----

#[tokio::test]
async fn connect_error_when_nothing_listens() -> Result<()> {
    let (addr, _held) = common::refusing_address()?;
    match RconClient::connect(addr, PASSWORD, RCON_TIMEOUT).await {
        Err(err @ RconError::Connect { .. }) => {
            assert_eq!(err.category(), "connect");
            assert!(err.to_string().contains("enable-rcon=true"), "{err}");
            assert!(std::error::Error::source(&err).is_some(), "the I/O error is chained");
        }
        other => bail!("expected a connect error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn login_times_out_when_the_server_never_answers() -> Result<()> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let silent = tokio::spawn(async move {
        let accepted = listener.accept().await;
        std::future::pending::<()>().await;
        drop(accepted);
    });
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let result = RconClient::connect(addr, PASSWORD, timeout).await;
    let elapsed = started.elapsed();
    silent.abort();
    match result {
        Err(err @ RconError::Timeout { operation: "login", .. }) => assert_eq!(err.category(), "timeout"),
        other => bail!("expected a login timeout, got {other:?}"),
    }
    assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(2), "took {elapsed:?}");
    Ok(())
}

#[tokio::test]
async fn command_times_out_when_the_server_stops_answering() -> Result<()> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    // Accepts the login like Minecraft, then never answers again.
    let stalled = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut login = [0u8; 64];
        let read = socket.read(&mut login).await?;
        anyhow::ensure!(read >= 12, "short login packet");
        let id = i32::from_le_bytes(login[4..8].try_into()?);
        let mut reply = Vec::new();
        for field in [10, id, 2] {
            reply.extend_from_slice(&i32::to_le_bytes(field));
        }
        reply.extend_from_slice(&[0, 0]);
        socket.write_all(&reply).await?;
        std::future::pending::<()>().await;
        Ok(())
    });
    let mut client = RconClient::connect(addr, PASSWORD, RCON_TIMEOUT).await?;
    let result = client.command_with_timeout("list", Duration::from_millis(300)).await;
    assert!(matches!(result, Err(RconError::Timeout { operation: "command", .. })), "{result:?}");
    // The connection may hold half a reply now: it is abandoned rather than reused.
    assert!(matches!(client.command("list").await, Err(RconError::Io(_))));
    stalled.abort();
    Ok(())
}

// ---- The fixture itself ----

#[tokio::test]
async fn fake_server_saves_only_while_saving_is_on() -> Result<()> {
    let data = DataDir::new()?;
    let mut server = FakeServer::start(&data.path)?;
    let rcon = Rcon::new(data.rcon_addr(), PASSWORD.to_owned(), RCON_TIMEOUT);
    let region = data.region_file();

    // Read only once saving is off: an autosave rewrites the file in place.
    assert_eq!(rcon.command("save-off").await?, "Automatic saving is now disabled");
    assert_eq!(rcon.command("save-off").await?, "Saving is already turned off");
    let frozen = region_generation(&region)?;
    // Several autosave periods (200 ms) pass without a write.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(region_generation(&region)?, frozen, "the world was written while saving was off");

    assert_eq!(rcon.command("save-all flush").await?, "Saving the game (this may take a moment!)Saved the game");
    assert_eq!(region_generation(&region)?, frozen + 1);

    assert_eq!(rcon.command("save-on").await?, "Automatic saving is now enabled");
    let deadline = Instant::now() + Duration::from_secs(10);
    while region_generation(&region).unwrap_or(0) <= frozen + 1 {
        ensure!(Instant::now() < deadline, "autosave did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The console runs the same commands and logs their output.
    server.console("fake-join Carol")?;
    server.console("list")?;
    server.wait_for_line("There are 1 of a max of 20 players online: Carol", RCON_TIMEOUT)?;
    server.wait_for_line("[Rcon: Saved the game]", RCON_TIMEOUT)?;
    server.console("stop")?;
    let status = server.wait_for_exit(START_TIMEOUT)?;
    assert!(status.success(), "{status}");
    let log = server.log_text();
    let order = ["Stopping the server", "Saving worlds", "ThreadedAnvilChunkStorage: All dimensions are saved"];
    let positions: Vec<Option<usize>> = order.iter().map(|line| log.find(line)).collect();
    assert!(positions.windows(2).all(|w| matches!(w, [Some(a), Some(b)] if a < b)), "{log}");
    region_generation(&region)?;
    Ok(())
}

// ---- The fixture against a real client ----

/// A venv with `mcrcon` from PyPI, cached under `~/.cache/atlas-runner/mcrcon-venv`.
fn mcrcon_python() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    let venv = home.join(".cache/atlas-runner/mcrcon-venv");
    let python = venv.join("bin/python");
    let ready = || Command::new(&python).args(["-c", "import mcrcon"]).output().is_ok_and(|o| o.status.success());
    if ready() {
        return Ok(python);
    }
    let _ = std::fs::remove_dir_all(&venv);
    let python3 = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("python3")).find(|p| p.is_file()))
        .context("python3 is not on PATH: install Python 3 (Debian: `apt-get install python3 python3-venv`)")?;
    run_tool(Command::new(python3).args(["-m", "venv"]).arg(&venv)).context(
        "create a venv: install the venv module and pip (Debian: `apt-get install python3-venv python3-pip`)",
    )?;
    run_tool(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "mcrcon==0.7.0",
    ]))
    .context("pip install mcrcon (needs pip in the venv and access to PyPI)")?;
    ensure!(ready(), "mcrcon was installed into {} but cannot be imported", venv.display());
    Ok(python)
}

const MCRCON_SCRIPT: &str = r#"
import json, sys
from mcrcon import MCRcon, MCRconException
host, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with MCRcon(host, password, port=port) as rcon:
    listing = rcon.command("list")
    echoed = rcon.command("echo-long 500")
lines = echoed.split("\n")
assert listing.startswith("There are 0 of a max of 20 players online:"), listing
assert len(lines) == 500, len(lines)
assert lines[-1] == "echo-long line 500 of 500: the quick brown fox jumps over the lazy dog", lines[-1]
try:
    with MCRcon(host, "wrong", port=port) as rcon:
        rcon.command("list")
    raise SystemExit("a wrong password was accepted")
except MCRconException:
    pass
print(json.dumps({"list": listing, "echo": echoed}))
"#;

#[tokio::test]
async fn real_mcrcon_client_agrees_with_the_fixture() -> Result<()> {
    let python = mcrcon_python()?;
    let data = DataDir::new()?;
    let _server = FakeServer::start(&data.path)?;
    let out = Command::new(python)
        .args(["-c", MCRCON_SCRIPT, "127.0.0.1", &data.rcon_port.to_string(), PASSWORD])
        .output()
        .context("run python with mcrcon")?;
    ensure!(
        out.status.success(),
        "mcrcon failed against the fake server ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(seen["echo"].as_str() == Some(echo_long(500).as_str()), "mcrcon saw a different echo-long reply");

    // Our client sees exactly what the reference client saw.
    let mut client = RconClient::connect(data.rcon_addr(), PASSWORD, RCON_TIMEOUT).await?;
    assert_eq!(Some(client.command("list").await?.as_str()), seen["list"].as_str());
    assert_eq!(Some(client.command("echo-long 500").await?.as_str()), seen["echo"].as_str());
    Ok(())
}
