//! The Dockerfile passes hadolint with no rule switched off, and its default runtime (a user's
//! `docker build`: Debian slim with the Temurin stages' JREs) is built here, offline, by buildah from
//! stand-in images tagged as the Dockerfile's bases: the image it makes verifies a TLS certificate
//! chain with the CA certificates of its Temurin stage, speaks UTF-8 and carries what the pod
//! contract asks of the image.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

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
fn a_users_build_compiles_the_binary_and_runs_on_the_runtime_stage_by_default() -> Result<()> {
    let text = dockerfile()?;
    let has = |line: &str| text.lines().any(|l| l.trim() == line);
    // What the build below passes (it has no Rust image to compile in, and buildah 1.28 skips a stage
    // named only by an ARG's default) is what a user's build gets by default: the binary from the
    // `build` stage, on the `runtime` stage.
    ensure!(has("COPY --from=build /atlas-runner /usr/local/bin/atlas-runner"), "the binary is not the build stage's");
    ensure!(has("ARG RUNTIME_IMAGE=runtime"), "the final stage does not derive from the runtime stage by default");
    // Every stage of a plain `docker build .` can be built from the context alone, so the legacy
    // builder (which builds every stage, needed or not) succeeds too.
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    ensure!(stages.iter().all(|l| !l.starts_with("FROM scratch")), "a stage only a named context fills: {stages:?}");
    Ok(())
}

#[test]
fn a_users_build_context_holds_the_sources_but_not_target_or_git() -> Result<()> {
    // buildah reads the repository's .dockerignore as docker does. The context is a small copy of the
    // repository's layout (the real target/ is gigabytes, and a regression would copy it all).
    let work = Work::new()?;
    let context = work.dir.join("context");
    let kept = ["Cargo.toml", "Cargo.lock", "src/main.rs", "testbed/Cargo.toml", "tests/data/mojang/26.2.json"];
    let left_out = [".git", "target/release/atlas-runner", "target/debug/deps/x.rlib", "data/world/level.dat", "x.log"];
    for file in kept.iter().chain(&left_out) {
        let path = context.join(file);
        std::fs::create_dir_all(path.parent().context("no parent")?)?;
        std::fs::write(&path, file)?;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join(".dockerignore"), context.join(".dockerignore"))
        .context("the repository's .dockerignore")?;
    let dockerfile = work.dir.join("Dockerfile.context");
    std::fs::write(&dockerfile, "FROM scratch\nCOPY . /src\n")?;
    let name = "localhost/atlas-runner:context-test";
    work.buildah(&[
        "bud",
        "--pull=never",
        "--network=none",
        "--layers=false",
        "--file",
        &dockerfile.display().to_string(),
        "--tag",
        name,
        &context.display().to_string(),
    ])?;
    let container = work.buildah(&["from", "--quiet", name])?.trim().to_owned();
    let src = PathBuf::from(work.buildah(&["mount", &container])?.trim()).join("src");
    for file in kept {
        ensure!(src.join(file).exists(), "the build context lacks {file}");
    }
    for file in left_out {
        ensure!(!src.join(file).exists(), "the build context holds {file}");
    }
    Ok(())
}

/// The image names the Dockerfile's `FROM` lines default to, for which stand-ins are made.
const DEBIAN: &str = "docker.io/library/debian:bookworm-slim";
const TEMURIN: [(&str, &str); 2] =
    [("21", "docker.io/library/eclipse-temurin:21-jre"), ("25", "docker.io/library/eclipse-temurin:25-jre")];
const IMAGE: &str = "localhost/atlas-runner:dockerfile-test";

#[test]
fn the_default_image_verifies_tls_with_its_temurin_cas_speaks_utf8_and_keeps_the_pod_contract() -> Result<()> {
    let work = Work::new()?;
    // A CA of the test's own stands in for the public ones a Temurin image trusts.
    let pki = atlas_testbed::pki::Pki::create(&work.dir.join("pki"), &[])?;
    let ca = std::fs::read(pki.path("ca.crt"))?;

    // Stand-ins for the bases, like the real ones where it matters: Debian slim (the bed's Debian
    // without its JREs and without any CA certificate, as bookworm-slim ships), and Temurin images
    // holding a JDK home under /opt/java/openjdk and CA certificates laid out as Ubuntu's
    // ca-certificates lays them out (the bundle, and links into /usr/share/ca-certificates).
    work.debian_stand_in()?;
    for (version, name) in TEMURIN {
        work.image_from_scratch(name, |root| {
            std::fs::create_dir_all(root.join("opt/java/openjdk"))?;
            std::fs::write(root.join("opt/java/openjdk/release"), format!("JAVA_VERSION=\"{version}.0.9\"\n"))?;
            std::fs::create_dir_all(root.join("usr/share/ca-certificates/atlas"))?;
            std::fs::write(root.join("usr/share/ca-certificates/atlas/atlas-test-ca.crt"), &ca)?;
            std::fs::create_dir_all(root.join("etc/ssl/certs"))?;
            std::fs::write(root.join("etc/ssl/certs/ca-certificates.crt"), &ca)?;
            std::os::unix::fs::symlink(
                "/usr/share/ca-certificates/atlas/atlas-test-ca.crt",
                root.join("etc/ssl/certs/atlas-test-ca.pem"),
            )?;
            Ok(())
        })?;
    }

    let context = work.dir.join("context");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(common::binary(), context.join("atlas-runner"))?;
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    work.buildah(&[
        "bud",
        "--pull=never",
        "--network=none",
        "--layers=false",
        &format!("--build-context=build={}", context.display()),
        "--build-arg=RUNTIME_IMAGE=runtime",
        "--file",
        &dockerfile.display().to_string(),
        "--tag",
        IMAGE,
        &context.display().to_string(),
    ])
    .context("buildah bud of the Dockerfile's default runtime")?;

    // The runner in the image fetches a pack over HTTPS from a server whose certificate chains to
    // the CA only the Temurin stage's certificates hold.
    let www = work.dir.join("www");
    let pack = work.dir.join("pack");
    std::fs::create_dir_all(&www)?;
    std::fs::create_dir_all(&pack)?;
    std::fs::write(pack.join("hello.txt"), "over TLS\n")?;
    common::run_tool(Command::new("tar").arg("-C").arg(&pack).arg("-czf").arg(www.join("pack.tar.gz")).arg("."))?;
    let sha = common::sha256_hex(&std::fs::read(www.join("pack.tar.gz"))?);
    let server = common::HttpsServer::start(&www, &pki.path("serving.crt"), &pki.path("serving.key"), "127.0.0.1", 0)?;
    let spec = work.dir.join("spec.yaml");
    std::fs::write(
        &spec,
        format!(
            "eula: true\nserver: {{type: vanilla}}\npack:\n  source:\n    url: {{url: \"https://127.0.0.1:{}/pack.tar.gz\", sha256: {sha}}}\n",
            server.port
        ),
    )?;
    let container = work.buildah(&["from", "--quiet", IMAGE])?.trim().to_owned();
    work.buildah(&["copy", &container, &spec.display().to_string(), "/tmp/spec.yaml"])?;
    work.buildah(&[
        "run",
        &container,
        "--",
        "atlas-runner",
        "pack",
        "apply",
        "--spec",
        "/tmp/spec.yaml",
        "--data",
        "/data",
    ])
    .context("the image's runner fetching a pack over HTTPS")?;
    assert_eq!(work.buildah(&["run", &container, "--", "cat", "/data/hello.txt"])?, "over TLS\n");

    // UTF-8 for the JVM's file names.
    assert_eq!(work.buildah(&["run", &container, "--", "sh", "-c", "echo \"$LANG\""])?.trim(), "C.UTF-8");

    // The pod contract: both JREs where the runner's Java search looks, uid/gid 10001, /data.
    let homes = work.buildah(&[
        "run",
        &container,
        "--",
        "cat",
        "/usr/lib/jvm/temurin-21-jre/release",
        "/usr/lib/jvm/temurin-25-jre/release",
    ])?;
    ensure!(homes.contains("JAVA_VERSION=\"21.") && homes.contains("JAVA_VERSION=\"25."), "JRE homes: {homes}");
    assert_eq!(work.buildah(&["run", &container, "--", "id", "-u"])?.trim(), "10001");
    let inspect: serde_json::Value = serde_json::from_str(&work.buildah(&["inspect", "--type", "image", IMAGE])?)?;
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "10001:10001");
    assert_eq!(config["WorkingDir"], "/data");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/local/bin/atlas-runner"]));
    ensure!(config["Volumes"].get("/data").is_some(), "/data is not a volume: {config}");
    Ok(())
}

/// A private buildah storage (vfs: nothing is mounted) and scratch space, removed on drop.
struct Work {
    dir: PathBuf,
}

impl Work {
    fn new() -> Result<Self> {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(atlas_testbed::unique("dockerfile-build"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Runs buildah on the private storage; its stdout, or an error with everything it said.
    fn buildah(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("buildah")
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("BUILDAH_ISOLATION", "chroot")
            .stdin(Stdio::null())
            .output()
            .context("run buildah (apt-get install buildah)")?;
        if !out.status.success() {
            bail!(
                "buildah {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An image `name` of one layer, the files `fill` writes into an empty root.
    fn image_from_scratch(&self, name: &str, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let container = self.buildah(&["from", "--quiet", "scratch"])?.trim().to_owned();
        let root = PathBuf::from(self.buildah(&["mount", &container])?.trim());
        fill(&root)?;
        self.buildah(&["commit", "--quiet", &container, name])?;
        self.buildah(&["rm", &container])?;
        Ok(())
    }

    /// Debian slim: the bed's base image (Debian minbase) without its JREs and CA certificates.
    fn debian_stand_in(&self) -> Result<()> {
        let base = atlas_testbed::image::base_image()?;
        let member = |name: &str| -> Result<serde_json::Value> {
            let out = Command::new("tar").arg("-xOf").arg(&base.archive).arg(name).output()?;
            ensure!(out.status.success(), "tar -xOf {} {name}", base.archive.display());
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let blob = |digest: &serde_json::Value| -> Result<String> {
            Ok(format!("blobs/sha256/{}", digest.as_str().context("no digest")?.trim_start_matches("sha256:")))
        };
        let manifest = member(&blob(&member("index.json")?["manifests"][0]["digest"])?)?;
        let layer = blob(&manifest["layers"][0]["digest"])?;
        self.image_from_scratch(DEBIAN, |root| {
            common::run_tool(
                Command::new("sh")
                    .arg("-c")
                    .arg(
                        "tar -xOf \"$1\" \"$2\" | tar -x -C \"$3\" --exclude=./usr/lib/jvm --exclude=./etc/ssl \
                         --exclude=./usr/share/ca-certificates --exclude='./etc/java-*'",
                    )
                    .arg("sh")
                    .arg(&base.archive)
                    .arg(&layer)
                    .arg(root),
            )
        })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = self.buildah(&["rm", "--all"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
