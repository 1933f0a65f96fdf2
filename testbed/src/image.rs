//! The node's images: the pause image and the base image `scripts/testbed-install.sh` made, and our
//! image, built from the repository's `Dockerfile` by buildah around a given `atlas-runner` binary.
//!
//! No registry is reachable from here, so every image travels as an OCI archive: buildah reads the
//! base from one and writes ours to another, and each bed imports them into its own containerd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{INSTALL_HINT, bin, bin_dir, command_output};

/// An image as an OCI archive.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The reference the node knows it by (`localhost/...:TAG`).
    pub name: String,
    /// The OCI archive (an image layout in a tar).
    pub archive: PathBuf,
    /// The image's config (labels, history) as written in the archive; its sha256 is the image ID
    /// a pod's status reports.
    pub config: PathBuf,
}

fn images_dir() -> PathBuf {
    bin_dir().join("images")
}

fn installed(name: &str) -> Result<BuiltImage> {
    let dir = images_dir();
    let archive = dir.join(format!("{name}.oci.tar"));
    let reference = std::fs::read_to_string(dir.join(format!("{name}.name")))
        .with_context(|| format!("the {name} image is missing from {}: {INSTALL_HINT}", dir.display()))?;
    if !archive.exists() {
        bail!("the {name} image is missing from {}: {INSTALL_HINT}", dir.display());
    }
    Ok(BuiltImage { name: reference.trim().to_owned(), config: archive.with_extension("config.json"), archive })
}

/// The pause image (the pod sandbox), as installed.
pub fn pause_image() -> Result<BuiltImage> {
    installed("pause")
}

/// The base image the bed builds our `Dockerfile` on (in place of its `runtime` stage), as installed.
pub fn base_image() -> Result<BuiltImage> {
    installed("base")
}

/// The repository's `Dockerfile`.
pub fn dockerfile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile")
}

/// Our image: the `Dockerfile` built by buildah with `binary` as the prebuilt `atlas-runner` and the
/// installed base image as its runtime. Cached by the Dockerfile, the binary and the base, so a
/// second bed with the same binary reuses the archive.
///
/// The archive and its config are returned as links (or copies) in `into`, a directory the caller
/// owns (the bed's): the cache keeps only the newest archives, and a bed that started from an older
/// one keeps its own for as long as it needs it.
pub fn our_image(binary: &Path, into: &Path) -> Result<BuiltImage> {
    for _ in 0..3 {
        let cached = cached_image(binary)?;
        if let Some(own) = link_cached(&images_dir(), &cached, into)? {
            return Ok(own);
        }
        // Pruned between its build (or lookup) and the link, by beds of other runs: again.
    }
    bail!("our image was removed from {} three times before this bed could link it", images_dir().display())
}

/// Links (or copies) the cached archive and config of `cached` into `into`; `None` if the cache no
/// longer has them. Under a shared lock of the cache, which a prune takes exclusively.
fn link_cached(cache: &Path, cached: &BuiltImage, into: &Path) -> Result<Option<BuiltImage>> {
    let lock = archives_lock(cache)?;
    lock.lock_shared().with_context(|| format!("lock {}", cache.join(ARCHIVES_LOCK).display()))?;
    if !(cached.archive.exists() && cached.config.exists()) {
        return Ok(None);
    }
    std::fs::create_dir_all(into).with_context(|| format!("create {}", into.display()))?;
    let own = |path: &Path| -> Result<PathBuf> {
        let target = into.join(path.file_name().context("an archive without a file name")?);
        let _ = std::fs::remove_file(&target);
        if std::fs::hard_link(path, &target).is_err() {
            // Another file system: a copy.
            std::fs::copy(path, &target).with_context(|| format!("copy {} to {}", path.display(), target.display()))?;
        }
        Ok(target)
    };
    Ok(Some(BuiltImage { name: cached.name.clone(), archive: own(&cached.archive)?, config: own(&cached.config)? }))
}

const ARCHIVES_LOCK: &str = "archives.lock";

fn archives_lock(cache: &Path) -> Result<std::fs::File> {
    let path = cache.join(ARCHIVES_LOCK);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))
}

/// Our image in the cache, built now if it is not there.
fn cached_image(binary: &Path) -> Result<BuiltImage> {
    let base = base_image()?;
    let dockerfile_text = std::fs::read(dockerfile()).context("read the Dockerfile")?;
    let mut hasher = Sha256::new();
    hasher.update(&dockerfile_text);
    hasher.update(base.name.as_bytes());
    let mut file =
        std::fs::File::open(binary).with_context(|| format!("open the image's binary {}", binary.display()))?;
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("read the image's binary {}", binary.display()))?;
    let key = hex::encode(hasher.finalize())[..16].to_owned();
    let name = format!("localhost/atlas-runner:bed-{key}");
    let archive = images_dir().join(format!("ours-{key}.oci.tar"));
    let config = archive.with_extension("config.json");
    if archive.exists() && config.exists() {
        return Ok(BuiltImage { name, archive, config });
    }
    // One build at a time on the machine: beds of other test runs may want the same image now.
    let lock_path = images_dir().join("build.lock");
    let lock = std::fs::File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("lock {}", lock_path.display()))?;
    if archive.exists() && config.exists() {
        return Ok(BuiltImage { name, archive, config });
    }

    let storage = bin_dir().join("../containers");
    let buildah = |args: &[&str]| -> Command {
        let mut cmd = Command::new("buildah");
        // A storage of the bed's own (not the system's), with the vfs driver: no mount is left on
        // the host, even by a build that is killed.
        cmd.arg("--root")
            .arg(storage.join("storage"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("BUILDAH_ISOLATION", "chroot")
            .stdin(Stdio::null());
        cmd
    };
    let have_base = buildah(&["images", "--quiet", &base.name]).stderr(Stdio::null()).output()?;
    if !have_base.status.success() || have_base.stdout.is_empty() {
        let id =
            command_output(&mut buildah(&["pull", "--quiet", &format!("oci-archive:{}", base.archive.display())]))?;
        command_output(&mut buildah(&["tag", id.trim(), &base.name]))?;
    }

    let context = tempdir("atlas-image-context")?;
    std::fs::copy(binary, context.join("atlas-runner")).context("copy the binary into the build context")?;
    let built = command_output(&mut buildah(&[
        "bud",
        "--pull=never",
        "--network=none",
        "--layers=false",
        // The binary built on the host stands in for the `build` stage (which would compile it).
        &format!("--build-context=build={}", context.display()),
        &format!("--build-arg=RUNTIME_IMAGE={}", base.name),
        &format!("--build-arg=REVISION=bed-{key}"),
        "--file",
        &dockerfile().display().to_string(),
        "--tag",
        &name,
        &context.display().to_string(),
    ]));
    let _ = std::fs::remove_dir_all(&context);
    built.context("buildah bud of the Dockerfile")?;
    let partial = archive.with_extension("partial");
    command_output(&mut buildah(&["push", "--quiet", &name, &format!("oci-archive:{}:{name}", partial.display())]))?;
    // The archive is all the bed needs: the storage keeps only the base.
    let _ = buildah(&["rmi", &name]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    // The config first: the archive's presence says both are there.
    let config_partial = config.with_extension("partial");
    std::fs::write(&config_partial, archive_config(&partial)?)
        .with_context(|| format!("write {}", config_partial.display()))?;
    std::fs::rename(&config_partial, &config).with_context(|| format!("rename to {}", config.display()))?;
    std::fs::rename(&partial, &archive).with_context(|| format!("rename to {}", archive.display()))?;
    prune_old(&images_dir(), &archive);
    Ok(BuiltImage { name, archive, config })
}

/// Imports an OCI archive into the containerd at `socket`, in the namespace the kubelet uses.
pub fn import(socket: &Path, archive: &Path) -> Result<()> {
    let mut cmd = Command::new(bin("ctr")?);
    cmd.arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io", "images", "import", "--all-platforms"])
        .arg(archive);
    command_output(&mut cmd).with_context(|| format!("import {} into the node's containerd", archive.display()))?;
    Ok(())
}

/// Tags the image `name` as `also` in the containerd at `socket` (the kubelet's namespace).
pub fn tag(socket: &Path, name: &str, also: &str) -> Result<()> {
    let mut cmd = Command::new(bin("ctr")?);
    cmd.arg("--address").arg(socket).args(["--namespace", "k8s.io", "images", "tag", "--force", name, also]);
    command_output(&mut cmd).with_context(|| format!("tag {name} as {also} in the node's containerd"))?;
    Ok(())
}

/// The image the repository's chart runs when given no values, as the kubelet names it
/// (`docker.io/library/atlas-runner:<appVersion>`): `image.repository` and `image.tag` of
/// charts/atlas-runner/values.yaml, the tag defaulting to Chart.yaml's `appVersion`.
pub fn chart_default_image() -> Result<String> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/atlas-runner");
    let read = |file: &str| -> Result<serde_yaml::Value> {
        let path = chart.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))
    };
    let (meta, values) = (read("Chart.yaml")?, read("values.yaml")?);
    let repository =
        values["image"]["repository"].as_str().context("the chart's values.yaml has no image.repository")?;
    let tag = match values["image"]["tag"].as_str() {
        Some(tag) if !tag.is_empty() => tag.to_owned(),
        _ => meta["appVersion"].as_str().context("the chart's Chart.yaml has no appVersion")?.to_owned(),
    };
    Ok(format!("{}:{tag}", normalized_repository(repository)))
}

/// A repository as containerd's CRI names it: Docker Hub's by default, `library/` for a bare name.
fn normalized_repository(repository: &str) -> String {
    match repository.split_once('/') {
        None => format!("docker.io/library/{repository}"),
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => repository.to_owned(),
        Some(_) => format!("docker.io/{repository}"),
    }
}

/// The image config inside an OCI archive: index -> manifest -> config.
fn archive_config(archive: &Path) -> Result<Vec<u8>> {
    let read = |member: &str| -> Result<Vec<u8>> {
        let out = Command::new("tar").arg("-xOf").arg(archive).arg(member).stderr(Stdio::piped()).output()?;
        if !out.status.success() {
            bail!("tar -xOf {} {member}: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let index: serde_json::Value = serde_json::from_slice(&read("index.json")?)?;
    let manifest = index["manifests"][0]["digest"].as_str().context("the archive's index names no manifest")?;
    let manifest: serde_json::Value = serde_json::from_slice(&read(&blob(manifest))?)?;
    let config = manifest["config"]["digest"].as_str().context("the manifest names no config")?;
    read(&blob(config))
}

/// Keeps the two newest archives of our image (each is a few hundred MB) in the cache. Beds hold
/// links of their own to the archives they use (see [`our_image`]), which a prune never removes.
fn prune_old(cache: &Path, keep: &Path) {
    let Ok(lock) = archives_lock(cache) else { return };
    if lock.lock().is_err() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    let mut ours: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("ours-"))
                && p.extension().is_some_and(|e| e == "tar")
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    ours.sort();
    ours.reverse();
    for (_, path) in ours.into_iter().skip(2) {
        if path != keep {
            let _ = std::fs::remove_file(path.with_extension("config.json"));
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn tempdir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(crate::unique(prefix));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_chart_repository_is_named_as_containerd_names_it() {
        assert_eq!(normalized_repository("atlas-runner"), "docker.io/library/atlas-runner");
        assert_eq!(normalized_repository("someone/atlas-runner"), "docker.io/someone/atlas-runner");
        assert_eq!(normalized_repository("ghcr.io/someone/atlas-runner"), "ghcr.io/someone/atlas-runner");
        assert_eq!(normalized_repository("localhost:5000/atlas-runner"), "localhost:5000/atlas-runner");
        assert_eq!(normalized_repository("localhost/atlas-runner"), "localhost/atlas-runner");
    }

    #[test]
    fn the_charts_default_image_is_its_app_version() -> Result<()> {
        let chart =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/atlas-runner/Chart.yaml"))?;
        let version = chart.lines().find_map(|l| l.strip_prefix("appVersion:")).context("appVersion")?;
        let version = version.trim().trim_matches('"');
        assert_eq!(chart_default_image()?, format!("docker.io/library/atlas-runner:{version}"));
        Ok(())
    }

    #[test]
    fn a_prune_of_the_cache_leaves_the_archive_a_bed_linked() -> Result<()> {
        let root = tempdir("atlas-image-prune")?;
        let (cache, bed) = (root.join("images"), root.join("atlas-bed-1/image"));
        std::fs::create_dir_all(&cache)?;
        let archive = |key: &str| cache.join(format!("ours-{key}.oci.tar"));
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            std::fs::write(archive(key), format!("layers {key}"))?;
            std::fs::write(archive(key).with_extension("config.json"), format!("config {key}"))?;
            // "a" is the oldest.
            let file = std::fs::File::options().write(true).open(archive(key))?;
            file.set_modified(old + Duration::from_secs(60 * i as u64))?;
        }
        let cached = BuiltImage {
            name: "localhost/atlas-runner:bed-a".to_owned(),
            archive: archive("a"),
            config: archive("a").with_extension("config.json"),
        };
        let own = link_cached(&cache, &cached, &bed)?.context("the cached archive is there")?;
        assert!(own.archive.starts_with(&bed) && own.config.starts_with(&bed));

        prune_old(&cache, &archive("c"));
        assert!(!archive("a").exists(), "the prune kept the oldest archive: it proves nothing");
        assert!(archive("b").exists() && archive("c").exists());
        assert_eq!(std::fs::read_to_string(&own.archive)?, "layers a");
        assert_eq!(std::fs::read_to_string(&own.config)?, "config a");
        // Once pruned, the cache has nothing to link: the caller builds it again.
        assert!(link_cached(&cache, &cached, &root.join("atlas-bed-2/image"))?.is_none());
        std::fs::remove_dir_all(&root)?;
        Ok(())
    }
}
