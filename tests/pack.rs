//! The pack engine against real archives on a real filesystem: build, apply, update, preserve,
//! rollback, every extraction rejection, and a swap interrupted at every step.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use atlas_runner::pack::build::{BuildOptions, build};
use atlas_runner::pack::store::{Recovery, StoreError};
use atlas_runner::pack::{
    ApplyError, ArchiveFormat, DataDirLock, Limits, PackStore, PackVersion, Preserve, lock, lock_path,
};
use sha2::Digest;

/// Writes `files` under `dir`.
fn write_tree(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    for (path, content) in files {
        let target = dir.join(path);
        fs::create_dir_all(target.parent().context("no parent")?)?;
        fs::write(&target, content)?;
    }
    Ok(())
}

/// Every entry under `dir` (directories, files by content digest, links by target), `.atlas` included
/// unless `skip_atlas`.
fn tree(dir: &Path, skip_atlas: bool) -> Result<BTreeMap<String, String>> {
    fn walk(root: &Path, dir: &Path, skip: bool, out: &mut BTreeMap<String, String>) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            if skip && rel == ".atlas" {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_symlink() {
                out.insert(rel, format!("link:{}", fs::read_link(&path)?.display()));
            } else if kind.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, skip, out)?;
            } else {
                out.insert(rel, hex::encode(sha2::Sha256::digest(fs::read(&path)?)));
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, skip_atlas, &mut out)?;
    Ok(out)
}

/// Only the files (no directories) of a tree.
fn files_of(tree: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    tree.iter().filter(|(_, v)| *v != "dir").map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The files a pack version manages: all but the preserved `config/` (kept when a version drops it).
fn managed(tree: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    files_of(tree).into_iter().filter(|(k, _)| !k.starts_with("config/")).collect()
}

/// The paths whose entries differ between two trees.
fn differing(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}

fn version(v: &str) -> Result<PackVersion> {
    Ok(PackVersion::new(v)?)
}

/// Builds a pack of `files` as `version` into `out_dir/<version>.tar.zst`.
fn pack(out_dir: &Path, v: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let src = out_dir.join(format!("src-{v}"));
    fs::create_dir_all(&src)?;
    write_tree(&src, files)?;
    let out = out_dir.join(format!("{v}.tar.zst"));
    build(&src, &out, &BuildOptions::new(version(v)?))?;
    Ok(out)
}

fn preserve() -> Result<Preserve> {
    Ok(Preserve::new(&["server.properties".to_owned(), "config/**".to_owned()])?)
}

const V1: &[(&str, &[u8])] = &[
    ("mods/a.jar", b"a-1"),
    ("mods/b.jar", b"b-1"),
    ("config/x.toml", b"x = 1"),
    ("server.properties", b"motd=pack"),
    ("libraries/deep/lib.jar", b"lib-1"),
];

const V2: &[(&str, &[u8])] = &[
    ("mods/a.jar", b"a-2"),
    ("mods/c.jar", b"c-2"),
    ("config/x.toml", b"x = 2"),
    ("config/new.toml", b"new = 2"),
    ("server.properties", b"motd=pack2"),
    ("libraries/deep/lib.jar", b"lib-1"),
];

/// A data dir with a world and a file the user added.
fn data_dir(root: &Path) -> Result<PathBuf> {
    let data = root.join("data");
    write_tree(&data, &[("world/level.dat", b"level"), ("world/region/r.0.0.mca", b"region"), ("notes.txt", b"mine")])?;
    Ok(data)
}

fn open<'l>(data: &Path, lock: &'l DataDirLock) -> Result<(PackStore<'l>, Recovery)> {
    Ok(PackStore::open(data, lock)?)
}

fn stage_and_apply(store: &mut PackStore<'_>, archive: &Path) -> Result<atlas_runner::pack::ApplyReport> {
    let staged = store.stage(archive, ArchiveFormat::TarZst, None, &Limits::default())?;
    Ok(store.apply(staged, &preserve()?)?)
}

fn read(data: &Path, path: &str) -> Result<Vec<u8>> {
    fs::read(data.join(path)).with_context(|| path.to_owned())
}

#[test]
fn build_apply_update_preserve_and_rollback() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = data_dir(tmp.path())?;
    let world_before = tree(&data.join("world"), false)?;
    let (p1, p2) = (pack(tmp.path(), "1.0.0", V1)?, pack(tmp.path(), "2.0.0", V2)?);
    let guard = lock(&lock_path(&data))?;
    let (mut store, recovery) = open(&data, &guard)?;
    ensure!(recovery == Recovery::Clean);

    let report = stage_and_apply(&mut store, &p1)?;
    ensure!(report.from.is_none() && report.installed.len() == 3, "{report:?}");
    ensure!(report.preserved_written.len() == 2, "{report:?}");
    ensure!(read(&data, "mods/a.jar")? == b"a-1" && read(&data, "server.properties")? == b"motd=pack");
    // The user edits a preserved file.
    fs::write(data.join("server.properties"), b"motd=mine")?;

    let report = stage_and_apply(&mut store, &p2)?;
    ensure!(report.removed.iter().map(|p| p.as_str()).collect::<Vec<_>>() == ["mods/b.jar"], "{report:?}");
    ensure!(!data.join("mods/b.jar").exists(), "the dropped mod stays");
    ensure!(read(&data, "mods/a.jar")? == b"a-2" && read(&data, "mods/c.jar")? == b"c-2");
    ensure!(read(&data, "server.properties")? == b"motd=mine", "a preserved file was overwritten");
    ensure!(read(&data, "config/x.toml")? == b"x = 1", "a preserved file was overwritten");
    ensure!(read(&data, "config/new.toml")? == b"new = 2", "an absent preserved file was not written");
    ensure!(read(&data, "notes.txt")? == b"mine" && tree(&data.join("world"), false)? == world_before);
    let status = store.status()?;
    ensure!(status.current.as_ref().map(|m| m.version.as_str()) == Some("2.0.0"));
    ensure!(status.previous.as_ref().map(|v| v.as_str()) == Some("1.0.0"));
    ensure!(status.owned.len() == 3, "{:?}", status.owned);

    // Rollback needs no archive: delete them.
    fs::remove_file(&p1)?;
    fs::remove_file(&p2)?;
    let report = store.rollback()?;
    ensure!(report.to.as_str() == "1.0.0", "{report:?}");
    ensure!(read(&data, "mods/a.jar")? == b"a-1" && read(&data, "mods/b.jar")? == b"b-1");
    ensure!(!data.join("mods/c.jar").exists(), "a file of the rolled-back version stays");
    ensure!(read(&data, "server.properties")? == b"motd=mine" && read(&data, "notes.txt")? == b"mine");
    ensure!(tree(&data.join("world"), false)? == world_before);
    // And forward again, from the store alone.
    store.rollback()?;
    ensure!(read(&data, "mods/a.jar")? == b"a-2" && !data.join("mods/b.jar").exists());
    ensure!(store.state().current.as_ref().map(|v| v.as_str()) == Some("2.0.0"));
    drop(store);
    // A reopened store sees the same.
    let (store, recovery) = open(&data, &guard)?;
    ensure!(recovery == Recovery::Clean && store.state().previous.as_ref().map(|v| v.as_str()) == Some("1.0.0"));
    Ok(())
}

#[test]
fn reapplying_the_current_version_is_a_no_op_and_a_reused_version_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = data_dir(tmp.path())?;
    let p1 = pack(tmp.path(), "1", V1)?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    stage_and_apply(&mut store, &p1)?;
    let again = store.stage(&p1, ArchiveFormat::TarZst, None, &Limits::default());
    ensure!(matches!(again, Err(StoreError::AlreadyCurrent(_))), "{again:?}");
    let other = tmp.path().join("other");
    fs::create_dir_all(&other)?;
    let p1b = pack(&other, "1", V2)?;
    let reused = store.stage(&p1b, ArchiveFormat::TarZst, None, &Limits::default());
    ensure!(matches!(reused, Err(StoreError::VersionReused(_))), "{reused:?}");
    Ok(())
}

#[test]
fn an_unowned_file_in_the_way_is_refused_and_an_identical_one_adopted() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = data_dir(tmp.path())?;
    write_tree(&data, &[("mods/a.jar", b"the user's own a")])?;
    let p1 = pack(tmp.path(), "1", V1)?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    let before = tree(&data, false)?;
    match stage_and_apply(&mut store, &p1).map_err(|e| e.downcast::<ApplyError>()) {
        Err(Ok(ApplyError::Conflict { path, .. })) => ensure!(path.as_str() == "mods/a.jar"),
        other => bail!("expected a conflict, got {other:?}"),
    }
    // The refused version is staged but not applied; only the store changed.
    ensure!(
        files_of(&tree(&data, true)?)
            == files_of(&before).into_iter().filter(|(k, _)| !k.starts_with(".atlas")).collect()
    );
    fs::write(data.join("mods/a.jar"), b"a-1")?;
    let report = stage_and_apply(&mut store, &p1)?;
    ensure!(report.adopted.iter().map(|p| p.as_str()).collect::<Vec<_>>() == ["mods/a.jar"], "{report:?}");
    Ok(())
}

#[test]
fn a_link_where_the_pack_has_a_directory_is_never_followed_to_move_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = data_dir(tmp.path())?;
    let p1 = pack(tmp.path(), "1", &[("mods/a.jar", b"a-1"), ("mods/b.jar", b"b-1")])?;
    // Version 2 drops every mod: only removals under mods/, nothing the pack writes there.
    let p2 = pack(tmp.path(), "2", &[("config/c.toml", b"c-2")])?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    stage_and_apply(&mut store, &p1)?;
    // The admin moves mods/ elsewhere and links it back: the files are the pack's, the directory is not ours.
    let outside = tmp.path().join("elsewhere");
    fs::rename(data.join("mods"), &outside)?;
    std::os::unix::fs::symlink(&outside, data.join("mods"))?;
    let before = tree(&outside, false)?;
    match stage_and_apply(&mut store, &p2).map_err(|e| e.downcast::<ApplyError>()) {
        Err(Ok(ApplyError::Conflict { path, .. })) => ensure!(path.as_str() == "mods", "{path}"),
        other => bail!("expected a conflict on mods, got {other:?}"),
    }
    ensure!(tree(&outside, false)? == before, "files behind the link were moved");
    ensure!(store.status()?.current.map(|m| m.version.as_str().to_owned()).as_deref() == Some("1"));
    Ok(())
}

/// The files under a version's store directory (what staging wrote), relative to it.
fn staged_files(data: &Path, v: &str) -> Result<Vec<String>> {
    let dir = data.join(".atlas/packs").join(v).join("files");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    Ok(files_of(&tree(&dir, false)?).into_keys().collect())
}

#[test]
fn an_update_stages_only_changed_files_and_still_verifies_the_rest() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = data_dir(tmp.path())?;
    let (p1, p2) = (pack(tmp.path(), "1.0.0", V1)?, pack(tmp.path(), "2.0.0", V2)?);
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    stage_and_apply(&mut store, &p1)?;
    // An unchanged file deleted by hand still gets a staged copy, and comes back.
    fs::remove_file(data.join("libraries/deep/lib.jar"))?;
    let staged = store.stage(&p2, ArchiveFormat::TarZst, None, &Limits::default())?;
    let written = staged_files(&data, "2.0.0")?;
    // Unchanged and present: not written. The preserved config/x.toml changed, so it is staged
    // (the swap writes it only where absent).
    ensure!(
        written
            == [
                "config/new.toml",
                "config/x.toml",
                "libraries/deep/lib.jar",
                "mods/a.jar",
                "mods/c.jar",
                "server.properties"
            ],
        "{written:?}"
    );
    // The plan is made (and checked) while a server could still run; the swap is only renames.
    let planned = store.plan_apply(staged, &preserve()?)?;
    ensure!(planned.to().as_str() == "2.0.0" && planned.from().map(|v| v.as_str()) == Some("1.0.0"));
    ensure!(store.state().current.as_ref().map(|v| v.as_str()) == Some("1.0.0"), "planning changed the state");
    let report = store.swap(planned)?;
    ensure!(report.installed.iter().any(|p| p.as_str() == "libraries/deep/lib.jar"), "{report:?}");
    ensure!(read(&data, "libraries/deep/lib.jar")? == b"lib-1");
    ensure!(read(&data, "mods/a.jar")? == b"a-2" && !data.join("mods/b.jar").exists());

    // An archive whose unchanged entry does not match its manifest is refused, though that entry
    // is never written.
    let manifest = store.read_manifest(&version("2.0.0")?)?;
    let mut forged = manifest.clone();
    forged.version = version("3.0.0")?;
    let json = forged.to_json()?;
    let mut entries = vec![file("atlas-pack.json", &json)];
    let contents: BTreeMap<&str, &[u8]> = V2.iter().copied().collect();
    for entry in &forged.files {
        let name = entry.path.as_str();
        let content = if name == "libraries/deep/lib.jar" { b"lib-X".as_slice() } else { contents[name] };
        entries.push(file(name, content));
    }
    let bad = tmp.path().join("forged.tar.zst");
    fs::write(&bad, zst(&raw_tar(&entries)?)?)?;
    let before = tree(&data, true)?;
    match store.stage(&bad, ArchiveFormat::TarZst, None, &Limits::default()) {
        Err(StoreError::VerifyDigest { path, .. }) => ensure!(path.as_str() == "libraries/deep/lib.jar"),
        other => bail!("expected a digest mismatch, got {other:?}"),
    }
    ensure!(tree(&data, true)? == before, "a refused pack changed the data dir");
    Ok(())
}

/// A raw tar entry: the name is written into the header as is, so `..` and `/` survive.
struct RawEntry<'a> {
    name: &'a str,
    kind: tar::EntryType,
    data: &'a [u8],
    link: Option<&'a str>,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> RawEntry<'a> {
    RawEntry { name, kind: tar::EntryType::Regular, data, link: None }
}

fn raw_tar(entries: &[RawEntry<'_>]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let name = entry.name.as_bytes();
        header.as_gnu_mut().context("gnu")?.name[..name.len()].copy_from_slice(name);
        header.set_entry_type(entry.kind);
        header.set_size(entry.data.len() as u64);
        header.set_mode(0o644);
        if let Some(link) = entry.link {
            header.as_gnu_mut().context("gnu")?.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        builder.append(&header, entry.data)?;
    }
    Ok(builder.into_inner()?)
}

fn zst(bytes: &[u8]) -> Result<Vec<u8>> {
    Ok(zstd::encode_all(bytes, 3)?)
}

fn gz(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes)?;
    Ok(e.finish()?)
}

fn zip_archive(entries: &[(&str, &[u8])], symlink: Option<(&str, &str)>) -> Result<Vec<u8>> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        w.start_file(*name, options)?;
        w.write_all(data)?;
    }
    if let Some((name, target)) = symlink {
        w.add_symlink(name, target, options)?;
    }
    Ok(w.finish()?.into_inner())
}

/// Each case: file name, bytes, the text the error must contain, and limits.
/// A refused archive: file name, bytes, what the error must say, limits.
type BadArchive = (&'static str, Vec<u8>, &'static str, Limits);

fn bad_archives() -> Result<Vec<BadArchive>> {
    use tar::EntryType as T;
    let d = Limits::default();
    let small = Limits { max_entry_size: 1000, ..Limits::default() };
    let bomb_limits = Limits { ratio_floor: 0, max_ratio_zstd: 20, max_ratio_deflate: 20, ..Limits::default() };
    let total_limits = Limits { max_total_size: 1500, ..Limits::default() };
    let ok = raw_tar(&[file("mods/ok.jar", b"ok"), file("mods/ok2.jar", &[7u8; 4096])])?;
    let ok_zst = zst(&ok)?;
    let zeros: &'static [u8] = Box::leak(vec![0u8; 4 << 20].into_boxed_slice());
    let mut cases = vec![
        ("dotdot.tar.zst", zst(&raw_tar(&[file("mods/../../escape.jar", b"x")])?)?, "mods/../../escape.jar", d.clone()),
        ("dotdot-tail.tar.zst", zst(&raw_tar(&[file("a/..", b"x")])?)?, "a/..", d.clone()),
        ("absolute.tar.zst", zst(&raw_tar(&[file("/etc/cron.d/evil", b"x")])?)?, "/etc/cron.d/evil", d.clone()),
        (
            "symlink.tar.zst",
            zst(&raw_tar(&[RawEntry { name: "mods/link", kind: T::Symlink, data: b"", link: Some("/etc") }])?)?,
            "mods/link",
            d.clone(),
        ),
        (
            "symlink-inside.tar.zst",
            zst(&raw_tar(&[file("a", b"x"), RawEntry { name: "b", kind: T::Symlink, data: b"", link: Some("a") }])?)?,
            "\"b\" is a symlink",
            d.clone(),
        ),
        (
            "hardlink.tar.zst",
            zst(&raw_tar(&[
                file("a", b"x"),
                RawEntry { name: "mods/hard", kind: T::Link, data: b"", link: Some("a") },
            ])?)?,
            "mods/hard",
            d.clone(),
        ),
        (
            "chardev.tar.zst",
            zst(&raw_tar(&[RawEntry { name: "dev/null", kind: T::Char, data: b"", link: None }])?)?,
            "dev/null",
            d.clone(),
        ),
        (
            "blockdev.tar.zst",
            zst(&raw_tar(&[RawEntry { name: "dev/sda", kind: T::Block, data: b"", link: None }])?)?,
            "dev/sda",
            d.clone(),
        ),
        (
            "fifo.tar.zst",
            zst(&raw_tar(&[RawEntry { name: "pipe", kind: T::Fifo, data: b"", link: None }])?)?,
            "pipe",
            d.clone(),
        ),
        (
            "duplicate.tar.zst",
            zst(&raw_tar(&[file("mods/a.jar", b"1"), file("./mods/a.jar", b"2")])?)?,
            "./mods/a.jar",
            d.clone(),
        ),
        (
            "file-then-dir.tar.zst",
            zst(&raw_tar(&[file("mods", b"1"), file("mods/a.jar", b"2")])?)?,
            "mods/a.jar",
            d.clone(),
        ),
        ("large.tar.zst", zst(&raw_tar(&[file("mods/big.jar", &[1u8; 5000])])?)?, "mods/big.jar", small),
        ("total.tar.zst", zst(&raw_tar(&[file("a", &[1u8; 1000]), file("b", &[1u8; 1000])])?)?, "\"b\"", total_limits),
        ("bomb.tar.zst", zst(&raw_tar(&[file("zeros.bin", zeros)])?)?, "zeros.bin", bomb_limits.clone()),
        ("bomb.tar.gz", gz(&raw_tar(&[file("zeros.bin", zeros)])?)?, "zeros.bin", bomb_limits),
        ("truncated.tar.zst", ok_zst[..ok_zst.len() - 20].to_vec(), "read archive", d.clone()),
        (
            "corrupt.tar.zst",
            {
                let mut c = ok_zst.clone();
                let mid = c.len() / 2;
                c[mid] ^= 0xff;
                c[mid + 1] ^= 0x55;
                c
            },
            "read archive",
            d.clone(),
        ),
        ("garbage.tar.zst", b"this is not zstd at all".to_vec(), "read archive", d.clone()),
        ("dotdot.tar.gz", gz(&raw_tar(&[file("../escape", b"x")])?)?, "../escape", d.clone()),
        (
            "truncated.tar.gz",
            {
                let g = gz(&ok)?;
                g[..g.len() / 2].to_vec()
            },
            "read archive",
            d.clone(),
        ),
        ("dotdot.zip", zip_archive(&[("../../escape.txt", b"x")], None)?, "../../escape.txt", d.clone()),
        ("absolute.zip", zip_archive(&[("/abs.txt", b"x")], None)?, "/abs.txt", d.clone()),
        ("symlink.zip", zip_archive(&[("a.txt", b"x")], Some(("mods/link", "/etc/passwd")))?, "mods/link", d.clone()),
        (
            "truncated.zip",
            {
                let z = zip_archive(&[("a.txt", b"xxxx")], None)?;
                z[..z.len() - 10].to_vec()
            },
            "read archive",
            d.clone(),
        ),
        (
            "reserved.tar.zst",
            zst(&raw_tar(&[file(".atlas/packs/state.json", b"{}")])?)?,
            ".atlas/packs/state.json",
            d.clone(),
        ),
    ];
    // zip writers refuse duplicate names: rename one entry in place (same length, same CRC).
    let mut dup_zip = zip_archive(&[("mods/a.jar", b"1"), ("mods/b.jar", b"2")], None)?;
    for i in 0..dup_zip.len().saturating_sub(10) {
        if &dup_zip[i..i + 10] == b"mods/b.jar" {
            dup_zip[i..i + 10].copy_from_slice(b"mods/a.jar");
        }
    }
    cases.push(("duplicate.zip", dup_zip, "mods/a.jar", Limits::default()));
    // A manifest that does not match the files.
    let manifest = |files: &str| format!(r#"{{"format":1,"version":"9","files":[{files}]}}"#).into_bytes();
    let good = format!(r#"{{"path":"a","sha256":"{}","size":1}}"#, hex::encode(sha2::Sha256::digest(b"x")));
    let wrong = format!(r#"{{"path":"a","sha256":"{}","size":1}}"#, hex::encode(sha2::Sha256::digest(b"y")));
    let m_good: &'static [u8] = Box::leak(manifest(&good).into_boxed_slice());
    let m_wrong: &'static [u8] = Box::leak(manifest(&wrong).into_boxed_slice());
    cases.push((
        "digest.tar.zst",
        zst(&raw_tar(&[file("atlas-pack.json", m_wrong), file("a", b"x")])?)?,
        "verify a",
        d.clone(),
    ));
    cases.push((
        "unlisted.tar.zst",
        zst(&raw_tar(&[file("atlas-pack.json", m_good), file("a", b"x"), file("mods/extra.jar", b"e")])?)?,
        "mods/extra.jar",
        d.clone(),
    ));
    cases.push(("missing.tar.zst", zst(&raw_tar(&[file("atlas-pack.json", m_good)])?)?, "lists a", d));
    Ok(cases)
}

#[test]
fn every_rejected_archive_leaves_the_data_dir_byte_for_byte() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = data_dir(tmp.path())?;
    let p1 = pack(tmp.path(), "1", V1)?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    stage_and_apply(&mut store, &p1)?;
    let before = tree(&data, false)?;
    let cases = bad_archives()?;
    ensure!(cases.len() >= 25);
    for (name, bytes, expect, limits) in cases {
        let archive = tmp.path().join(name);
        fs::write(&archive, &bytes)?;
        let format = ArchiveFormat::from_file_name(name).ok_or_else(|| anyhow!("format of {name}"))?;
        let pinned = version("9")?;
        match store.stage(&archive, format, Some(&pinned), &limits) {
            Ok(staged) => bail!("{name}: accepted as {}", staged.version()),
            Err(e) => {
                let message = format!("{e}");
                ensure!(message.contains(expect), "{name}: error {message:?} does not name {expect:?}");
                eprintln!("{name}: [{}] {message}", e.category());
            }
        }
        ensure!(tree(&data, false)? == before, "{name}: the data dir changed");
    }
    Ok(())
}

#[test]
fn good_archives_of_every_format_stage_and_apply() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = data_dir(tmp.path())?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    let t = raw_tar(&[
        RawEntry { name: "mods/", kind: tar::EntryType::Directory, data: b"", link: None },
        file("./mods/a.jar", b"a"),
        file("config/c.toml", b"c"),
    ])?;
    let archives = [
        ("p.tar.gz", gz(&t)?, "g"),
        ("p.zip", zip_archive(&[("mods/a.jar", b"a"), ("config/c.toml", b"c")], None)?, "z"),
        ("p.tar.zst", zst(&t)?, "s"),
    ];
    for (name, bytes, v) in archives {
        let archive = tmp.path().join(name);
        fs::write(&archive, bytes)?;
        let format = ArchiveFormat::from_file_name(name).context("format")?;
        let staged = store.stage(&archive, format, Some(&version(v)?), &Limits::default())?;
        ensure!(staged.manifest().files.len() == 2, "{name}: {:?}", staged.manifest());
        store.apply(staged, &Preserve::none())?;
        ensure!(read(&data, "mods/a.jar")? == b"a" && read(&data, "config/c.toml")? == b"c");
    }
    // A plain archive needs a version.
    let archive = tmp.path().join("p.tar.gz");
    ensure!(matches!(
        store.stage(&archive, ArchiveFormat::TarGz, None, &Limits::default()),
        Err(StoreError::MissingVersion)
    ));
    Ok(())
}

/// A v1 -> v2 update big enough for many steps: many changed, removed and added files, a file that
/// becomes a directory, a preserved file.
fn crash_packs(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let mut v1: Vec<(String, Vec<u8>)> = Vec::new();
    let mut v2: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..12 {
        v1.push((format!("mods/changed-{i}.jar"), format!("old {i}").into_bytes()));
        v2.push((format!("mods/changed-{i}.jar"), format!("new {i}").into_bytes()));
    }
    for i in 0..8 {
        v1.push((format!("mods/dropped-{i}.jar"), format!("dropped {i}").into_bytes()));
        v2.push((format!("mods/added/deep/{i}.jar"), format!("added {i}").into_bytes()));
        v1.push((format!("libs/same-{i}.jar"), format!("same {i}").into_bytes()));
        v2.push((format!("libs/same-{i}.jar"), format!("same {i}").into_bytes()));
    }
    v1.push(("kubejs".into(), b"a file".to_vec()));
    v2.push(("kubejs/startup.js".into(), b"now a directory".to_vec()));
    v2.push(("config/fresh.toml".into(), b"preserved".to_vec()));
    let as_refs = |v: &[(String, Vec<u8>)]| v.iter().map(|(p, c)| (p.clone(), c.clone())).collect::<Vec<_>>();
    let write = |name: &str, files: Vec<(String, Vec<u8>)>| -> Result<PathBuf> {
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, c)| (p.as_str(), c.as_slice())).collect();
        pack(dir, name, &refs)
    };
    Ok((write("1", as_refs(&v1))?, write("2", as_refs(&v2))?))
}

fn fresh_data_with_v1(root: &Path, p1: &Path) -> Result<PathBuf> {
    let data = data_dir(root)?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    stage_and_apply(&mut store, p1)?;
    Ok(data)
}

#[test]
fn a_swap_interrupted_at_any_step_recovers_to_exactly_old_or_new() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (p1, p2) = crash_packs(tmp.path())?;
    // The two legal outcomes, from clean runs.
    let clean = tmp.path().join("clean");
    let data = fresh_data_with_v1(&clean, &p1)?;
    let old_tree = files_of(&tree(&data, true)?);
    {
        let guard = lock(&lock_path(&data))?;
        let (mut store, _) = open(&data, &guard)?;
        stage_and_apply(&mut store, &p2)?;
    }
    let new_tree = files_of(&tree(&data, true)?);
    ensure!(old_tree != new_tree);

    let (mut outcomes_old, mut outcomes_new) = (0, 0);
    let mut crash_at = 0usize;
    loop {
        let run = tmp.path().join(format!("run-{crash_at}"));
        let data = fresh_data_with_v1(&run, &p1)?;
        let world = tree(&data.join("world"), false)?;
        let guard = lock(&lock_path(&data))?;
        let finished = {
            let (mut store, _) = open(&data, &guard)?;
            let staged = store.stage(&p2, ArchiveFormat::TarZst, None, &Limits::default())?;
            let mut hook =
                |step: usize, _: atlas_runner::pack::SwapStep<'_>| if step == crash_at { Err(()) } else { Ok(()) };
            match store.apply_with_hook(staged, &preserve()?, &mut hook) {
                Ok(_) => true,
                Err(ApplyError::Interrupted { step, .. }) if step == crash_at => false,
                Err(e) => bail!("crash point {crash_at}: {e}"),
            }
            // The store is dropped without cleanup, as a killed process would leave it.
        };
        if finished {
            break;
        }
        let (store, recovery) = open(&data, &guard)?;
        let now = files_of(&tree(&data, true)?);
        let current = store.state().current.as_ref().map(|v| v.as_str().to_owned());
        if now == old_tree {
            ensure!(current.as_deref() == Some("1"), "crash point {crash_at}: old files but state says {current:?}");
            ensure!(matches!(recovery, Recovery::RolledBack { .. } | Recovery::Clean), "{recovery:?}");
            outcomes_old += 1;
        } else if now == new_tree {
            ensure!(current.as_deref() == Some("2"), "crash point {crash_at}: new files but state says {current:?}");
            outcomes_new += 1;
        } else {
            let diff: Vec<_> =
                now.keys().filter(|k| old_tree.get(*k) != now.get(*k) && new_tree.get(*k) != now.get(*k)).collect();
            bail!("crash point {crash_at}: a mix of versions after recovery ({recovery:?}): {diff:?}");
        }
        ensure!(tree(&data.join("world"), false)? == world, "crash point {crash_at}: the world changed");
        ensure!(!data.join(".atlas/packs/journal.json").exists());
        // The store still works: the update (re-staged if it was rolled back) or a rollback goes through.
        drop(store);
        let (mut store, _) = open(&data, &guard)?;
        if current.as_deref() == Some("1") {
            stage_and_apply(&mut store, &p2)?;
        } else {
            store.rollback()?;
            let after = managed(&tree(&data, true)?);
            ensure!(
                after == managed(&old_tree),
                "crash point {crash_at}: rollback after recovery: {:?}",
                differing(&after, &managed(&old_tree))
            );
        }
        crash_at += 1;
    }
    eprintln!("{crash_at} crash points: {outcomes_old} recovered to old, {outcomes_new} to new");
    ensure!(crash_at >= 30, "only {crash_at} crash points");
    ensure!(outcomes_old > 0 && outcomes_new > 0);
    Ok(())
}

#[test]
fn a_rollback_interrupted_at_any_step_recovers_to_exactly_one_version() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (p1, p2) = crash_packs(tmp.path())?;
    let mut crash_at = 0usize;
    let mut trees: Option<(BTreeMap<String, String>, BTreeMap<String, String>)> = None;
    loop {
        let run = tmp.path().join(format!("run-{crash_at}"));
        let data = fresh_data_with_v1(&run, &p1)?;
        let guard = lock(&lock_path(&data))?;
        let (old_tree, new_tree) = {
            let before = files_of(&tree(&data, true)?);
            let (mut store, _) = open(&data, &guard)?;
            stage_and_apply(&mut store, &p2)?;
            (before, files_of(&tree(&data, true)?))
        };
        trees.get_or_insert((old_tree.clone(), new_tree.clone()));
        let finished = {
            let (mut store, _) = open(&data, &guard)?;
            let mut hook =
                |step: usize, _: atlas_runner::pack::SwapStep<'_>| if step == crash_at { Err(()) } else { Ok(()) };
            match store.rollback_with_hook(&mut hook) {
                Ok(_) => true,
                Err(ApplyError::Interrupted { .. }) => false,
                Err(e) => bail!("crash point {crash_at}: {e}"),
            }
        };
        let (store, _) = open(&data, &guard)?;
        let now = managed(&tree(&data, true)?);
        let current = store.state().current.as_ref().map(|v| v.as_str().to_owned());
        let expected = &managed(if current.as_deref() == Some("1") { &old_tree } else { &new_tree });
        // The preserved file v2 wrote stays either way (a version that drops it leaves it).
        ensure!(read(&data, "config/fresh.toml")? == b"preserved");
        ensure!(
            &now == expected,
            "crash point {crash_at}: state says {current:?} but the files differ: {:?}",
            differing(&now, expected)
        );
        if finished {
            break;
        }
        crash_at += 1;
    }
    ensure!(crash_at >= 30, "only {crash_at} crash points");
    Ok(())
}

/// The steps of a swap, spelled for comparison.
fn step_name(step: atlas_runner::pack::SwapStep<'_>) -> String {
    use atlas_runner::pack::SwapStep as S;
    match step {
        S::Install(path) => format!("install {path}"),
        S::InstallDir(path) => format!("install dir {path}"),
        S::Displace(path) => format!("displace {path}"),
        S::WritePreserved(path) => format!("preserve {path}"),
        other => format!("{other:?}"),
    }
}

#[test]
fn a_first_apply_moves_whole_directories_and_a_directory_made_since_the_plan_gets_files_one_by_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let p1 = pack(tmp.path(), "1", V1)?;
    let installs = |steps: &[String]| -> Vec<String> {
        let mut v: Vec<String> =
            steps.iter().filter(|s| s.starts_with("install") || s.starts_with("preserve")).cloned().collect();
        v.sort();
        v
    };

    // Nothing where the pack's directories go: one rename each; preserved files are still copies.
    let data = data_dir(&tmp.path().join("cold"))?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    let staged = store.stage(&p1, ArchiveFormat::TarZst, None, &Limits::default())?;
    let mut steps = Vec::new();
    let report = store.apply_with_hook(staged, &preserve()?, &mut |_, step| {
        steps.push(step_name(step));
        Ok(())
    })?;
    ensure!(
        installs(&steps)
            == ["install dir libraries", "install dir mods", "preserve config/x.toml", "preserve server.properties"],
        "{steps:?}"
    );
    ensure!(report.installed.len() == 3, "the report still names every file: {:?}", report.installed);
    for (path, content) in V1 {
        ensure!(read(&data, path)? == *content, "{path}");
    }
    // The update after it moves files one by one, as before.
    let p2 = pack(tmp.path(), "2", V2)?;
    stage_and_apply(&mut store, &p2)?;
    ensure!(read(&data, "mods/c.jar")? == b"c-2" && !data.join("mods/b.jar").exists());
    store.rollback()?;
    ensure!(read(&data, "mods/b.jar")? == b"b-1" && !data.join("mods/c.jar").exists());
    drop(store);

    // The server made mods/ (with a file of its own) between the plan and the swap: that directory
    // gets the pack's files one by one and keeps the server's file.
    let data = data_dir(&tmp.path().join("raced"))?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    let staged = store.stage(&p1, ArchiveFormat::TarZst, None, &Limits::default())?;
    let planned = store.plan_apply(staged, &preserve()?)?;
    write_tree(&data, &[("mods/server-made.jar", b"mine")])?;
    let mut steps = Vec::new();
    store.swap_with_hook(planned, &mut |_, step| {
        steps.push(step_name(step));
        Ok(())
    })?;
    ensure!(
        installs(&steps)
            == [
                "install dir libraries",
                "install mods/a.jar",
                "install mods/b.jar",
                "preserve config/x.toml",
                "preserve server.properties"
            ],
        "{steps:?}"
    );
    ensure!(read(&data, "mods/server-made.jar")? == b"mine" && read(&data, "mods/a.jar")? == b"a-1");
    drop(store);

    // What appeared is checked as the plan checks any directory: a link there, or a file where the
    // pack puts one, refuses the swap with nothing changed.
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir_all(&elsewhere)?;
    for (case, make) in [
        (
            "link",
            &(|data: &Path| Ok(std::os::unix::fs::symlink(&elsewhere, data.join("mods"))?))
                as &dyn Fn(&Path) -> Result<()>,
        ),
        ("file", &|data: &Path| write_tree(data, &[("mods/a.jar", b"the admin's")])),
    ] {
        let data = data_dir(&tmp.path().join(case))?;
        let guard = lock(&lock_path(&data))?;
        let (mut store, _) = open(&data, &guard)?;
        let staged = store.stage(&p1, ArchiveFormat::TarZst, None, &Limits::default())?;
        let planned = store.plan_apply(staged, &preserve()?)?;
        make(&data)?;
        let before = tree(&data, true)?;
        match store.swap(planned) {
            Err(ApplyError::Conflict { path, .. }) => {
                ensure!(path.as_str() == if case == "link" { "mods" } else { "mods/a.jar" }, "{case}: {path}")
            }
            other => bail!("{case}: expected a conflict, got {other:?}"),
        }
        ensure!(tree(&data, true)? == before, "{case}: the refused swap changed the data dir");
        ensure!(store.state().current.is_none(), "{case}");
    }
    ensure!(fs::read_dir(&elsewhere)?.next().is_none(), "files went through the link");
    Ok(())
}

#[test]
fn an_empty_directory_in_an_archive_is_not_moved_into_the_data_dir() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = data_dir(tmp.path())?;
    let empty_dir = RawEntry { name: "mods/empty/", kind: tar::EntryType::Directory, data: b"", link: None };
    let archive = tmp.path().join("p.tar.zst");
    fs::write(&archive, zst(&raw_tar(&[file("mods/a.jar", b"a"), empty_dir])?)?)?;
    let guard = lock(&lock_path(&data))?;
    let (mut store, _) = open(&data, &guard)?;
    let staged = store.stage(&archive, ArchiveFormat::TarZst, Some(&version("1")?), &Limits::default())?;
    let mut steps = Vec::new();
    store.apply_with_hook(staged, &Preserve::none(), &mut |_, step| {
        steps.push(step_name(step));
        Ok(())
    })?;
    ensure!(steps.iter().any(|s| s == "install mods/a.jar") && !steps.iter().any(|s| s.starts_with("install dir")));
    ensure!(read(&data, "mods/a.jar")? == b"a" && !data.join("mods/empty").exists(), "{steps:?}");
    Ok(())
}

#[test]
fn a_first_apply_interrupted_at_any_step_recovers_to_no_pack_or_the_whole_pack() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let p1 = pack(tmp.path(), "1", V1)?;
    let empty = files_of(&tree(&data_dir(&tmp.path().join("before"))?, true)?);
    let (mut crash_at, mut dir_steps) = (0usize, 0usize);
    loop {
        let data = data_dir(&tmp.path().join(format!("run-{crash_at}")))?;
        let guard = lock(&lock_path(&data))?;
        let finished = {
            let (mut store, _) = open(&data, &guard)?;
            let staged = store.stage(&p1, ArchiveFormat::TarZst, None, &Limits::default())?;
            let mut hook = |step: usize, s: atlas_runner::pack::SwapStep<'_>| {
                if matches!(s, atlas_runner::pack::SwapStep::InstallDir(_)) && step == crash_at {
                    dir_steps += 1;
                }
                if step == crash_at { Err(()) } else { Ok(()) }
            };
            match store.apply_with_hook(staged, &preserve()?, &mut hook) {
                Ok(_) => true,
                Err(ApplyError::Interrupted { step, .. }) if step == crash_at => false,
                Err(e) => bail!("crash point {crash_at}: {e}"),
            }
        };
        let (store, _) = open(&data, &guard)?;
        let now = files_of(&tree(&data, true)?);
        match store.state().current.as_ref().map(PackVersion::as_str) {
            None => ensure!(now == empty, "crash point {crash_at}: no version but {:?}", differing(&now, &empty)),
            Some("1") => {
                for (path, content) in V1 {
                    ensure!(read(&data, path)? == *content, "crash point {crash_at}: {path}");
                }
                ensure!(now.len() == empty.len() + V1.len(), "crash point {crash_at}: {now:?}");
            }
            other => bail!("crash point {crash_at}: state says {other:?}"),
        }
        if finished {
            break;
        }
        crash_at += 1;
    }
    ensure!(dir_steps == 2 && crash_at >= 6, "{crash_at} crash points, {dir_steps} before a directory rename");
    Ok(())
}
