//! The Dockerfile passes hadolint with no rule switched off, and its default build carries what the
//! pod contract asks of the image.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

fn dockerfile() -> Result<String> {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).context("read the Dockerfile")
}

#[test]
fn hadolint_finds_nothing_and_nothing_is_ignored() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hadolint = atlas_testbed::bin("hadolint")?;
    // No configuration file: every rule applies, at hadolint's default failure threshold (info).
    let out = Command::new(&hadolint).arg("--no-color").arg("Dockerfile").current_dir(root).output()?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success() && report.trim().is_empty(), "hadolint Dockerfile:\n{report}");
    for config in [".hadolint.yaml", ".hadolint.yml"] {
        ensure!(!root.join(config).exists(), "{config} would let rules be switched off");
    }
    ensure!(!dockerfile()?.to_lowercase().contains("hadolint"), "the Dockerfile switches a hadolint rule off");

    // hadolint does fail on a bad Dockerfile, so its silence above means something.
    let bad = std::env::temp_dir().join(atlas_testbed::unique("Dockerfile.bad"));
    std::fs::write(&bad, "FROM debian\nRUN apt-get install curl\n")?;
    let out = Command::new(&hadolint).arg("--no-color").arg(&bad).output()?;
    let _ = std::fs::remove_file(&bad);
    ensure!(!out.status.success(), "hadolint passed a Dockerfile with an untagged base and an unpinned apt-get");
    Ok(())
}

#[test]
fn the_default_image_has_both_jres_a_fixed_user_and_the_data_volume() -> Result<()> {
    let text = dockerfile()?;
    let has = |line: &str| text.lines().any(|l| l.trim() == line);
    // Java 21 for 1.21.x, 25 for 26.x, where the runner's Java search looks (each home has `release`).
    ensure!(has("COPY --from=jre21 /opt/java/openjdk /usr/lib/jvm/temurin-21-jre"), "no JRE 21 in /usr/lib/jvm");
    ensure!(has("COPY --from=jre25 /opt/java/openjdk /usr/lib/jvm/temurin-25-jre"), "no JRE 25 in /usr/lib/jvm");
    ensure!(has("USER 10001:10001"), "the image does not run as uid/gid 10001");
    ensure!(has("WORKDIR /data") && has("VOLUME [\"/data\"]"), "/data is not the volume and working dir");
    ensure!(has("ENTRYPOINT [\"/usr/local/bin/atlas-runner\"]"), "the entrypoint is not the binary");
    // A user's `docker build` compiles the binary and uses the Temurin runtime stage by default.
    ensure!(has("ARG BINARY_FROM=build") && has("ARG RUNTIME_IMAGE=runtime"), "the defaults are not a user's build");
    Ok(())
}
