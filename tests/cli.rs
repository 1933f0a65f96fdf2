//! The `atlas-runner` binary as a user runs it, and the generated files it is the source of.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;

fn atlas_runner(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_atlas-runner")).args(args).env_remove("RUST_LOG").output()?)
}

fn repo_file(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))?)
}

#[test]
fn committed_crd_matches_the_types() -> Result<()> {
    let generated = atlas_runner::api::crd_yaml()?;
    for path in ["crds/minecraftservers.atlas.dev.yaml", "charts/atlas-runner/crds/minecraftservers.atlas.dev.yaml"] {
        assert!(
            repo_file(path)? == generated,
            "{path} is stale: the MinecraftServer types changed; run `make crds` and commit the result"
        );
    }
    Ok(())
}

#[test]
fn crd_subcommand_prints_the_crd() -> Result<()> {
    let out = atlas_runner(&["crd"])?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout)?, atlas_runner::api::crd_yaml()?);
    Ok(())
}

#[test]
fn help_lists_exactly_the_subcommands_that_exist() -> Result<()> {
    let out = atlas_runner(&["--help"])?;
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout)?;
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap_or_default()
        .split("Options:")
        .next()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        commands,
        ["run", "agent", "status", "logs", "console", "stop", "restart", "pack", "backup", "crd", "operator", "help"],
        "{help}"
    );
    assert!(help.contains("--log-format"), "{help}");
    Ok(())
}

#[test]
fn json_log_format_writes_one_json_object_per_line() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-runner"))
        .args(["--log-format", "json", "crd"])
        .env("RUST_LOG", "atlas_runner=debug")
        .output()?;
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr)?;
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}: {stderr}"))?;
    let line = lines.iter().find(|l| l["message"] == "rendered the MinecraftServer CRD");
    let line = line.ok_or_else(|| anyhow::anyhow!("no debug line in {stderr}"))?;
    assert_eq!(line["level"], "DEBUG");
    assert!(line["bytes"].as_u64().is_some_and(|b| b > 1000));
    Ok(())
}

#[test]
fn rust_log_is_honoured_and_text_is_the_default() -> Result<()> {
    let quiet = atlas_runner(&["crd"])?;
    assert!(quiet.stderr.is_empty(), "info level must not print the debug line");
    let loud = Command::new(env!("CARGO_BIN_EXE_atlas-runner")).arg("crd").env("RUST_LOG", "debug").output()?;
    let stderr = String::from_utf8(loud.stderr)?;
    assert!(stderr.contains("DEBUG") && stderr.contains("rendered the MinecraftServer CRD"), "{stderr}");
    assert!(!stderr.trim_start().starts_with('{'), "text is the default format: {stderr}");
    Ok(())
}

#[test]
fn a_bad_rust_log_is_a_clear_one_line_error() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-runner")).arg("crd").env("RUST_LOG", "info,[[[").output()?;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr)?;
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("RUST_LOG") && stderr.contains("not a valid log filter"), "{stderr}");
    Ok(())
}
