//! Packs made by the tools people use (GNU tar, zstd, Info-ZIP's zip, Python's tarfile, shutil and
//! zipfile), run at test time: every usual way of archiving a directory applies to the same tree
//! through `atlas-runner pack apply`, and what these tools can make that is unsafe is refused with
//! the data dir left as it was.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use atlas_runner::pack::store::StoreError;
use atlas_runner::pack::{ArchiveFormat, Limits, PackStore, PackVersion, lock, lock_path};
use common::{binary, data_dir, files_under, run_tool, serve_files, sh, sha256_hex, tree, user_files};

/// The pack's files: nested directories, an empty file, a name with a space.
const FILES: &[(&str, &[u8])] = &[
    ("mods/a.jar", b"jar a"),
    ("mods/b.jar", b"jar b"),
    ("config/x.toml", b"x = 1"),
    ("config/deep/er/y.json", b"{}"),
    ("config/empty.txt", b""),
    ("server.properties", b"motd=from the pack"),
    ("world datapacks/readme.txt", b"a name with a space"),
];

fn write_files(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    for (path, content) in files {
        let target = dir.join(path);
        fs::create_dir_all(target.parent().context("parent")?)?;
        fs::write(&target, content)?;
    }
    Ok(())
}

fn python(dir: &Path, script: &str) -> Result<()> {
    run_tool(Command::new("python3").arg("-c").arg(script).current_dir(dir))
}

fn expected(files: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
    files.iter().map(|(p, c)| ((*p).to_owned(), c.to_vec())).collect()
}

/// `atlas-runner pack apply` of the pack `source` (YAML of `spec.pack.source`, plus `version` when
/// given) into `data`: stdout on success, the one-line error on failure.
fn pack_apply(root: &Path, data: &Path, source: &str, version: Option<&str>) -> Result<Result<String, String>> {
    let spec = root.join(format!("spec-{}.yaml", sha256_hex(source.as_bytes())));
    let version = version.map(|v| format!("  version: \"{v}\"\n")).unwrap_or_default();
    fs::write(&spec, format!("eula: true\nserver: {{type: vanilla}}\npack:\n  source:\n    {source}\n{version}"))?;
    let out = Command::new(binary()).args(["pack", "apply", "--spec"]).arg(&spec).arg("--data").arg(data).output()?;
    Ok(if out.status.success() {
        Ok(String::from_utf8(out.stdout)?)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    })
}

/// Each way of archiving `pack/` and the archive it makes, made in `root`.
fn usual_archives(root: &Path) -> Result<Vec<(&'static str, &'static str)>> {
    let cases = [
        ("GNU tar -C pack -czf gnu.tar.gz .", "tar -C pack -czf gnu.tar.gz .", "gnu.tar.gz"),
        ("GNU tar -C pack -cf - . | zstd", "tar -C pack -cf - . | zstd -q -o piped.tar.zst", "piped.tar.zst"),
        (
            "tar -czf x.tar.gz mods config ...",
            "cd pack && tar -czf ../named.tar.gz mods config server.properties 'world datapacks'",
            "named.tar.gz",
        ),
        ("cd pack && zip -r ../x.zip .", "cd pack && zip -qr ../info.zip .", "info.zip"),
    ];
    let mut made = Vec::new();
    for (how, line, file) in cases {
        sh(root, line).with_context(|| how.to_owned())?;
        made.push((how, file));
    }
    python(root, "import shutil; shutil.make_archive('shutil', 'gztar', root_dir='pack')")?;
    made.push(("Python shutil.make_archive(gztar, root_dir)", "shutil.tar.gz"));
    // Python's tarfile adding the directory as `.`, as scripts that pack a directory do.
    python(root, "import tarfile\nwith tarfile.open('tarfile.tar.gz', 'w:gz') as t: t.add('pack', arcname='.')")?;
    made.push(("Python tarfile add(dir, arcname='.')", "tarfile.tar.gz"));
    Ok(made)
}

#[test]
fn every_usual_way_of_archiving_a_directory_applies_the_same_tree() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    write_files(&root.join("pack"), FILES)?;
    let archives = usual_archives(root)?;
    let listing = |file: &str| -> Result<String> {
        let out = Command::new("tar").arg("-tf").arg(root.join(file)).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The forms this test is about: a `./` root entry and `./`-prefixed names.
    ensure!(
        listing("gnu.tar.gz")?.lines().next() == Some("./"),
        "GNU tar wrote no ./ entry:\n{}",
        listing("gnu.tar.gz")?
    );
    ensure!(listing("shutil.tar.gz")?.contains("./mods/a.jar"), "{}", listing("shutil.tar.gz")?);

    let blobs: HashMap<String, Vec<u8>> =
        archives.iter().map(|(_, file)| Ok((format!("/{file}"), fs::read(root.join(file))?))).collect::<Result<_>>()?;
    let digests: HashMap<String, String> = blobs.iter().map(|(k, v)| (k.clone(), sha256_hex(v))).collect();
    let base = serve_files(|_| Ok(blobs))?;
    for (i, (how, file)) in archives.iter().enumerate() {
        let data = data_dir(root, &format!("data-{i}"))?;
        let source = format!("url: {{url: \"{base}/{file}\", sha256: {}}}", digests[&format!("/{file}")]);
        match pack_apply(root, &data, &source, Some("1.0.0"))? {
            Ok(printed) => ensure!(printed.contains("1.0.0"), "{how}: {printed}"),
            Err(e) => bail!("{how}: pack apply failed: {e}"),
        }
        let mut want = expected(FILES);
        want.extend(user_files());
        let got = files_under(&data)?;
        ensure!(got == want, "{how}: the data dir holds {:?}", got.keys().collect::<Vec<_>>());
    }
    Ok(())
}

/// A `.mrpack` (a zip) with `modrinth.index.json` and overrides, made with Python's zipfile, whose
/// `writestr` keeps names as given: here all `./`-prefixed, after a `./` root entry.
const MRPACK_SCRIPT: &str = r#"
import json, sys, zipfile
prefix = sys.argv[2]
index = {"formatVersion": 1, "game": "minecraft", "versionId": "2.0.0", "name": "dots",
         "files": [], "dependencies": {"minecraft": "1.21.4"}}
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    if prefix:
        z.writestr("./", "")
    z.writestr(prefix + "modrinth.index.json", json.dumps(index))
    z.writestr(prefix + "overrides/", "")
    z.writestr(prefix + "overrides/config/x.toml", "x = 1")
    z.writestr(prefix + "overrides/mods/a.jar", "jar a")
    z.writestr(prefix + "server-overrides/server.properties", "motd=server")
"#;

#[test]
fn a_mrpack_whose_entries_start_with_dot_slash_applies_like_one_without() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    let mut blobs = HashMap::new();
    for (name, prefix) in [("dots.mrpack", "./"), ("plain.mrpack", "")] {
        run_tool(Command::new("python3").args(["-c", MRPACK_SCRIPT, name, prefix]).current_dir(root))?;
        blobs.insert(format!("/{name}"), fs::read(root.join(name))?);
    }
    let base = serve_files(|_| Ok(blobs))?;
    let mut trees = Vec::new();
    for name in ["dots.mrpack", "plain.mrpack"] {
        let data = data_dir(root, &format!("data-{name}"))?;
        if let Err(e) = pack_apply(root, &data, &format!("mrpack: {{url: \"{base}/{name}\"}}"), None)? {
            bail!("{name}: pack apply failed: {e}");
        }
        let got = files_under(&data)?;
        for (path, content) in
            [("config/x.toml", "x = 1"), ("mods/a.jar", "jar a"), ("server.properties", "motd=server")]
        {
            ensure!(got.get(path).map(Vec::as_slice) == Some(content.as_bytes()), "{name}: {path} in {got:?}");
        }
        trees.push(got);
    }
    ensure!(trees[0] == trees[1], "the ./ form applied another tree: {:?} vs {:?}", trees[0].keys(), trees[1].keys());
    Ok(())
}

#[test]
fn pack_build_of_dot_packs_the_directory_and_never_its_own_output() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    write_files(&root.join("src"), FILES)?;
    let build = |cwd: &Path, dir: &str, out: &str| -> Result<Vec<u8>> {
        let out_path = cwd.join(out);
        let result = Command::new(binary())
            .args(["pack", "build", dir, "-o", out, "--version", "1.0.0"])
            .current_dir(cwd)
            .output()?;
        ensure!(result.status.success(), "pack build {dir}: {}", String::from_utf8_lossy(&result.stderr));
        Ok(fs::read(out_path)?)
    };
    // The same directory spelt three ways packs to the same bytes (builds are deterministic).
    let reference = build(root, "src", "a.tar.zst")?;
    ensure!(build(root, "./src/.", "b.tar.zst")? == reference, "pack build ./src/. differs");
    ensure!(build(root, "src/", "c.tar.zst")? == reference, "pack build src/ differs");
    // Inside the directory, writing the pack there, twice: the second build does not take in the first.
    let src = root.join("src");
    ensure!(build(&src, ".", "pack.tar.zst")? == reference, "pack build . differs");
    ensure!(build(&src, ".", "pack.tar.zst")? == reference, "a second pack build . took in the first pack");
    // And what it built applies to exactly the files.
    let data = data_dir(root, "data")?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = PackStore::open(&data, &guard)?;
    let staged = store.stage(&src.join("pack.tar.zst"), ArchiveFormat::TarZst, None, &Limits::default())?;
    store.apply(staged, &atlas_runner::pack::Preserve::none())?;
    let mut want = expected(FILES);
    want.extend(user_files());
    ensure!(files_under(&data)? == want);
    Ok(())
}

/// Unsafe archives the same tools make: (how, shell line or Python script, archive, what the error
/// must name).
fn unsafe_archives(root: &Path) -> Result<Vec<(&'static str, &'static str, String)>> {
    write_files(&root.join("outside"), &[("escape.txt", b"outside the pack")])?;
    let abs = root.join("outside/escape.txt");
    let abs = abs.to_str().context("utf-8 path")?;
    // Made after the usual `./` entry and a good file, so the check is not only on the first entry.
    let shell = [
        (
            "GNU tar -P with ./../",
            "cd pack && tar -P -czf ../dotdot.tar.gz . ./../outside/escape.txt".to_owned(),
            "dotdot.tar.gz",
            "./../outside/escape.txt",
        ),
        ("GNU tar -P with an absolute path", format!("tar -C pack -P -czf abs.tar.gz . {abs}"), "abs.tar.gz", abs),
        (
            "GNU tar of a tree with a symlink",
            "mkdir -p sym/mods && echo a > sym/mods/a.jar && ln -s /etc sym/mods/etc && tar -C sym -czf symlink.tar.gz ."
                .to_owned(),
            "symlink.tar.gz",
            "./mods/etc",
        ),
        (
            "GNU tar of a tree with a hard link",
            "mkdir -p hard && echo a > hard/a && ln hard/a hard/b && tar -C hard -cf - . | zstd -q -o hardlink.tar.zst"
                .to_owned(),
            "hardlink.tar.zst",
            "hardlink",
        ),
        (
            "GNU tar of a tree with a fifo",
            "mkdir -p fifo && mkfifo fifo/pipe && tar -C fifo -czf fifo.tar.gz .".to_owned(),
            "fifo.tar.gz",
            "./pipe",
        ),
        (
            "zip -y of a tree with a symlink",
            "mkdir -p zsym && echo a > zsym/a && ln -s /etc/passwd zsym/passwd && cd zsym && zip -qry ../symlink.zip ."
                .to_owned(),
            "symlink.zip",
            "passwd",
        ),
    ];
    let mut made = Vec::new();
    for (how, line, file, names) in shell {
        sh(root, &line).with_context(|| how.to_owned())?;
        made.push((how, file, names.to_owned()));
    }
    let scripts = [
        (
            "Python tarfile: a character device",
            "import tarfile, io\nwith tarfile.open('chardev.tar.gz', 'w:gz') as t:\n t.add('pack', arcname='.')\n i = tarfile.TarInfo('./dev/null'); i.type = tarfile.CHRTYPE; i.devmajor, i.devminor = 1, 3; t.addfile(i)",
            "chardev.tar.gz",
            "./dev/null",
        ),
        (
            "Python tarfile: ./ then ../",
            "import tarfile, io\nwith tarfile.open('tf-dotdot.tar.gz', 'w:gz') as t:\n t.add('pack', arcname='.')\n i = tarfile.TarInfo('./../escape.txt'); i.size = 1; t.addfile(i, io.BytesIO(b'x'))",
            "tf-dotdot.tar.gz",
            "./../escape.txt",
        ),
        (
            "Python tarfile: a file named ./",
            "import tarfile, io\nwith tarfile.open('tf-rootfile.tar.gz', 'w:gz') as t:\n i = tarfile.TarInfo('./'); i.size = 1; t.addfile(i, io.BytesIO(b'x'))",
            "tf-rootfile.tar.gz",
            "\"./\"",
        ),
        (
            "Python zipfile: ./ then ../",
            "import zipfile\nwith zipfile.ZipFile('zf-dotdot.zip', 'w') as z:\n z.writestr('./', '')\n z.writestr('./mods/a.jar', 'a')\n z.writestr('./../escape.txt', 'x')",
            "zf-dotdot.zip",
            "./../escape.txt",
        ),
    ];
    for (how, script, file, names) in scripts {
        python(root, script).with_context(|| how.to_owned())?;
        made.push((how, file, names.to_owned()));
    }
    Ok(made)
}

#[test]
fn unsafe_archives_made_by_the_same_tools_are_refused_and_change_nothing() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    write_files(&root.join("pack"), FILES)?;
    let cases = unsafe_archives(root)?;
    let data = data_dir(root, "data")?;
    let guard = lock(&lock_path(&data))?;
    let (store, _) = PackStore::open(&data, &guard)?;
    let before = tree(&data)?;
    for (how, file, names) in cases {
        let format = ArchiveFormat::from_file_name(file).context("format")?;
        match store.stage(&root.join(file), format, Some(&PackVersion::new("9")?), &Limits::default()) {
            Ok(staged) => bail!("{how}: accepted as {}", staged.version()),
            Err(e) => {
                let message = e.to_string();
                eprintln!("{how}: {message}");
                ensure!(message.contains(&names), "{how}: {message:?} does not name {names:?}");
                ensure!(
                    matches!(&e, StoreError::ExtractArchive(x) if x.category() == "unsafe-entry"),
                    "{how}: refused for another reason: {message}"
                );
            }
        }
        ensure!(tree(&data)? == before, "{how}: the data dir changed");
    }
    ensure!(fs::read(root.join("outside/escape.txt"))? == b"outside the pack");
    Ok(())
}

#[test]
fn a_plain_archive_at_a_url_needs_no_version_its_digest_names_one() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    write_files(&root.join("pack"), FILES)?;
    // The minimal spec: a url and its sha256. A tar (staged while it downloads) and a zip (staged
    // from the downloaded file), then a changed pack, then an Atlas pack that names its own version.
    sh(root, "tar -C pack -czf v1.tar.gz . && cd pack && zip -qr ../v1.zip .")?;
    write_files(&root.join("pack"), &[("mods/a.jar", b"jar a, second edition")])?;
    sh(root, "tar -C pack -czf v2.tar.gz .")?;
    let built = Command::new(binary())
        .args(["pack", "build", "pack", "-o", "named.tar.zst", "--version", "3.1.0"])
        .current_dir(root)
        .output()?;
    ensure!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let files = ["v1.tar.gz", "v1.zip", "v2.tar.gz", "named.tar.zst"];
    let blobs: HashMap<String, Vec<u8>> =
        files.iter().map(|f| Ok((format!("/{f}"), fs::read(root.join(f))?))).collect::<Result<_>>()?;
    let digest = |file: &str| sha256_hex(&blobs[&format!("/{file}")]);
    let base = serve_files({
        let blobs = blobs.clone();
        |_| Ok(blobs)
    })?;
    let source = |file: &str| format!("url: {{url: \"{base}/{file}\", sha256: {}}}", digest(file));
    let status = |data: &Path| -> Result<serde_json::Value> {
        let out = Command::new(binary()).args(["pack", "status", "--json", "--data"]).arg(data).output()?;
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let current = |data: &Path| -> Result<String> {
        let s = status(data)?;
        s["current"]["version"].as_str().map(str::to_owned).with_context(|| format!("no current version in {s}"))
    };

    for first in ["v1.tar.gz", "v1.zip"] {
        let data = data_dir(root, &format!("data-{first}"))?;
        let want = format!("sha256-{}", &digest(first)[..12]);
        let applied = pack_apply(root, &data, &source(first), None)?.map_err(anyhow::Error::msg)?;
        ensure!(applied.contains(&want), "{first}: {applied}");
        ensure!(current(&data)? == want, "{first}: pack status shows {}", current(&data)?);
        // The same spec again: already applied, nothing fetched.
        let again = pack_apply(root, &data, &source(first), None)?.map_err(anyhow::Error::msg)?;
        ensure!(again.contains("already"), "{first} again: {again}");
        // A new archive is a new version; the first is kept for rollback.
        pack_apply(root, &data, &source("v2.tar.gz"), None)?.map_err(anyhow::Error::msg)?;
        let s = status(&data)?;
        ensure!(s["current"]["version"] == format!("sha256-{}", &digest("v2.tar.gz")[..12]), "{s}");
        ensure!(s["previous"]["version"] == want.as_str(), "{s}");
        ensure!(files_under(&data)?["mods/a.jar"] == b"jar a, second edition");
    }
    // An archive with atlas-pack.json names its own version.
    let data = data_dir(root, "data-named")?;
    pack_apply(root, &data, &source("named.tar.zst"), None)?.map_err(anyhow::Error::msg)?;
    ensure!(current(&data)? == "3.1.0");
    Ok(())
}
