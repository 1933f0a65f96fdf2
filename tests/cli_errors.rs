//! The one-line errors of the CLI speak of the command that failed: what it did, what it left, what
//! to do next.

mod common;

use std::process::Command;

use anyhow::{Context, Result, ensure};
use common::{binary, error_line, refusing_address};

#[test]
fn each_backup_command_against_an_unreachable_store_speaks_of_what_it_did() -> Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    std::fs::create_dir_all(data.join("world"))?;
    std::fs::write(data.join("world/level.dat"), "level")?;
    // A loopback port nothing listens on, held so that nothing can: connections are refused at once.
    let (refusing, _held) = refusing_address()?;
    let spec = root.path().join("server.yaml");
    std::fs::write(
        &spec,
        format!(
            "eula: true\nserver: {{type: vanilla}}\nbackup:\n  store:\n    s3: {{bucket: bars, prefix: survival/, endpoint: \"http://{refusing}\"}}\n"
        ),
    )?;
    let aborted = "the failed backup was aborted";
    let cases: [(&[&str], &[&str]); 5] = [
        (&["create"], &["reach the backup store", aborted, "try again"]),
        (&["list"], &["list the backups", "is the store reachable? try again"]),
        (&["verify", "20260101T000000.000Z"], &["read the manifest", "nothing was changed"]),
        (&["restore", "20260101T000000.000Z"], &["read the manifest", "nothing live was touched"]),
        (&["prune"], &["list the backups", "prune again"]),
    ];
    for (args, says) in cases {
        let out = Command::new(binary())
            .arg("backup")
            .args(args)
            .arg("--spec")
            .arg(&spec)
            .arg("--data")
            .arg(&data)
            .env("AWS_ACCESS_KEY_ID", "atlas")
            .env("AWS_SECRET_ACCESS_KEY", "not-a-secret")
            .output()?;
        let line = error_line(&out, &format!("backup {}", args.join(" ")))?;
        for text in says {
            ensure!(line.contains(text), "backup {}: {line:?} does not say {text:?}", args[0]);
        }
        // ...and ends with one pointer to the entry of the store that did not answer (a read
        // through the store's retries is `store`, a create's first request `store_unreachable`).
        let pointer = line.rsplit_once("; see docs/troubleshooting.md#").map(|(_, id)| id);
        ensure!(
            matches!(pointer, Some("backup-store" | "backup-store_unreachable"))
                && line.matches("docs/troubleshooting.md").count() == 1,
            "backup {}: {line:?} does not end with its troubleshooting entry",
            args[0]
        );
        if args[0] != "create" {
            // Only a create has a backup to abort.
            ensure!(!line.contains("aborted") && !line.contains("left nothing"), "backup {}: {line:?}", args[0]);
        }
    }
    Ok(())
}

#[test]
fn console_takes_its_options_after_the_command_too() -> Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    std::fs::create_dir_all(&data)?;
    let data = data.to_str().context("utf-8 path")?;
    // No runner: the error names the socket the options chose, the data dir's, not ./.atlas's.
    for args in [&["console", "list", "--data", data][..], &["console", "--data", data, "list"]] {
        let out = Command::new(binary()).args(args).current_dir(root.path()).output()?;
        let line = error_line(&out, &args.join(" "))?;
        ensure!(line.contains(&format!("{data}/.atlas/control.sock")), "{args:?}: {line}");
    }
    // A word the console does not know as an option: clap says how to pass it.
    let out = Command::new(binary()).args(["console", "say", "--loud", "--data", data]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("'-- --loud'"), "{stderr}");
    Ok(())
}

#[test]
fn a_spec_the_runner_refuses_points_at_its_troubleshooting_entry() -> Result<()> {
    let root = tempfile::tempdir()?;
    let spec = root.path().join("server.yaml");
    std::fs::write(&spec, "eula: false\nserver: {type: vanilla}\n")?;
    let out = Command::new(binary())
        .args(["run", "--spec"])
        .arg(&spec)
        .arg("--data")
        .arg(root.path().join("data"))
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()?;
    let line = error_line(&out, "run")?;
    ensure!(line.contains("eula"), "{line:?} does not say what was wrong");
    ensure!(line.ends_with("; see docs/troubleshooting.md#spec-spec_invalid"), "{line:?} does not point at its entry");
    Ok(())
}

#[test]
fn a_data_dir_too_deep_for_the_control_socket_says_to_pass_control() -> Result<()> {
    let root = tempfile::tempdir()?;
    // The default socket, DATA/.atlas/control.sock, past the 107 bytes a unix socket path may have.
    let data = root.path().join("d".repeat(110));
    std::fs::create_dir_all(&data)?;
    let spec = root.path().join("server.yaml");
    std::fs::write(&spec, "eula: true\nserver: {type: vanilla}\n")?;
    let out = Command::new(binary())
        .args(["run", "--spec"])
        .arg(&spec)
        .arg("--data")
        .arg(&data)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()?;
    let line = error_line(&out, "run")?;
    ensure!(line.contains("longer than a unix socket path may be (107)"), "{line:?} does not say what was wrong");
    ensure!(line.contains("pass --control with a shorter path"), "{line:?} does not say what to do");
    Ok(())
}
