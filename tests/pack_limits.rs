//! What bounds a pack's expansion: the sizes its manifest declares, the largest file and total,
//! the volume's free space, and, for an archive without a manifest, an expansion ratio that real
//! content (a void world's region files) passes and a stream of zeros does not, whether zstd, gzip
//! or zip packed it.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use atlas_runner::pack::extract::ExtractError;
use atlas_runner::pack::store::StoreError;
use atlas_runner::pack::{ArchiveFormat, Limits, PackStore, PackVersion, lock, lock_path};
use common::{binary, data_dir, file_digests, run_tool, serve_files, sh, sha256_hex, tree, user_files};

// ---- A void world in the Anvil format, generated here ----

/// Named binary tag writing: just what a chunk needs.
struct Nbt(Vec<u8>);

impl Nbt {
    fn name(&mut self, tag: u8, name: &str) {
        self.0.push(tag);
        self.string(name);
    }
    fn string(&mut self, s: &str) {
        self.0.extend((s.len() as u16).to_be_bytes());
        self.0.extend(s.as_bytes());
    }
    fn int(&mut self, name: &str, v: i32) {
        self.name(3, name);
        self.0.extend(v.to_be_bytes());
    }
    fn long(&mut self, name: &str, v: i64) {
        self.name(4, name);
        self.0.extend(v.to_be_bytes());
    }
    fn byte(&mut self, name: &str, v: i8) {
        self.name(1, name);
        self.0.extend(v.to_be_bytes());
    }
    fn text(&mut self, name: &str, v: &str) {
        self.name(8, name);
        self.string(v);
    }
    fn longs(&mut self, name: &str, values: &[i64]) {
        self.name(12, name);
        self.0.extend((values.len() as i32).to_be_bytes());
        for v in values {
            self.0.extend(v.to_be_bytes());
        }
    }
    /// A list header: element tag and count; the elements follow.
    fn list(&mut self, name: &str, tag: u8, len: usize) {
        self.name(9, name);
        self.0.push(tag);
        self.0.extend((len as i32).to_be_bytes());
    }
    fn compound(&mut self, name: &str) {
        self.name(10, name);
    }
    fn end(&mut self) {
        self.0.push(0);
    }
}

/// A chunk of a void world as Minecraft 1.21 saves it: 24 sections of air in the void biome, flat
/// heightmaps, no entities or ticks.
fn void_chunk(x: i32, z: i32) -> Vec<u8> {
    let mut n = Nbt(Vec::new());
    n.compound("");
    n.int("DataVersion", 3953);
    n.int("xPos", x);
    n.int("yPos", -4);
    n.int("zPos", z);
    n.text("Status", "minecraft:full");
    n.long("LastUpdate", 120_000 + i64::from(x) * 7 + i64::from(z));
    n.long("InhabitedTime", 0);
    n.byte("isLightOn", 1);
    n.list("sections", 10, 24);
    for y in -4..20 {
        n.byte("Y", y);
        n.compound("block_states");
        n.list("palette", 10, 1);
        n.text("Name", "minecraft:air");
        n.end();
        n.end();
        n.compound("biomes");
        n.list("palette", 8, 1);
        n.string("minecraft:the_void");
        n.end();
        n.end();
    }
    n.compound("Heightmaps");
    for map in ["MOTION_BLOCKING", "MOTION_BLOCKING_NO_LEAVES", "OCEAN_FLOOR", "WORLD_SURFACE"] {
        n.longs(map, &[0; 37]);
    }
    n.end();
    n.list("block_entities", 10, 0);
    n.compound("structures");
    n.compound("References");
    n.end();
    n.compound("starts");
    n.end();
    n.end();
    n.list("PostProcessing", 9, 24);
    for _ in 0..24 {
        n.0.push(0);
        n.0.extend(0i32.to_be_bytes());
    }
    n.list("fluid_ticks", 10, 0);
    n.list("block_ticks", 10, 0);
    n.end();
    n.0
}

/// A region file of 32x32 void chunks stored uncompressed (`region-file-compression=none`, a server
/// setting since 1.20.5): the location and timestamp tables, then each chunk's length, compression
/// type 3 and NBT, padded to 4 KiB sectors.
fn void_region(rx: i32, rz: i32) -> Vec<u8> {
    let (mut locations, mut timestamps, mut body) = (vec![0u8; 4096], vec![0u8; 4096], Vec::new());
    let mut sector = 2u32;
    for i in 0..1024usize {
        let (x, z) = (rx * 32 + (i % 32) as i32, rz * 32 + (i / 32) as i32);
        let nbt = void_chunk(x, z);
        let mut record = ((nbt.len() + 1) as u32).to_be_bytes().to_vec();
        record.push(3);
        record.extend(nbt);
        let sectors = record.len().div_ceil(4096);
        record.resize(sectors * 4096, 0);
        locations[4 * i..4 * i + 4].copy_from_slice(&((sector << 8) | sectors as u32).to_be_bytes());
        timestamps[4 * i..4 * i + 4].copy_from_slice(&(1_700_000_000 + i as u32).to_be_bytes());
        body.extend(record);
        sector += sectors as u32;
    }
    [locations, timestamps, body].concat()
}

/// A void lobby world of 16 region files (about 130 MiB) under `dir/lobby/`.
fn write_void_world(dir: &Path) -> Result<()> {
    let region = dir.join("lobby/region");
    fs::create_dir_all(&region)?;
    fs::write(dir.join("lobby/level.dat"), b"a level.dat stand-in")?;
    for r in 0..16 {
        let (rx, rz) = (r % 4 - 2, r / 4 - 2);
        fs::write(region.join(format!("r.{rx}.{rz}.mca")), void_region(rx, rz))?;
    }
    Ok(())
}

// ---- Tests ----

#[test]
fn a_void_world_applies_from_a_plain_tar_gz_a_zip_a_tar_zst_and_an_atlas_pack() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    write_void_world(&root.join("pack"))?;
    sh(
        root,
        "tar -C pack -czf void.tar.gz . && tar -C pack -cf - . | zstd -q -o void.tar.zst \
         && (cd pack && zip -qr ../void.zip .)",
    )?;
    let built = Command::new(binary())
        .args(["pack", "build", "pack", "-o", "void-atlas.tar.zst", "--version", "1.0.0"])
        .current_dir(root)
        .output()?;
    ensure!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let files = ["void.tar.gz", "void.zip", "void.tar.zst", "void-atlas.tar.zst"];
    let blobs: HashMap<String, Vec<u8>> =
        files.iter().map(|f| Ok((format!("/{f}"), fs::read(root.join(f))?))).collect::<Result<_>>()?;
    let expanded: u64 = tree(&root.join("pack"))?.values().flatten().map(|c| c.len() as u64).sum();
    for file in files {
        let ratio = expanded / blobs[&format!("/{file}")].len() as u64;
        eprintln!("{file}: {expanded} bytes at {ratio}:1");
    }
    // The old guard (100:1 after 64 MiB) refused both plain archives.
    let plain = blobs["/void.tar.zst"].len() as u64;
    ensure!(expanded > 64 << 20 && expanded / plain > 100, "the world is not the kind the old guard refused");
    let digests: HashMap<String, String> = blobs.iter().map(|(k, v)| (k.clone(), sha256_hex(v))).collect();
    let base = serve_files(|_| Ok(blobs))?;
    let want = file_digests(&root.join("pack"))?;
    for file in files {
        let data = data_dir(root, &format!("data-{file}"))?;
        let spec = root.join(format!("{file}.yaml"));
        fs::write(
            &spec,
            format!(
                "eula: true\nserver: {{type: vanilla}}\npack:\n  source:\n    url: {{url: \"{base}/{file}\", sha256: {}}}\n",
                digests[&format!("/{file}")]
            ),
        )?;
        let out =
            Command::new(binary()).args(["pack", "apply", "--spec"]).arg(&spec).arg("--data").arg(&data).output()?;
        ensure!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let mut got = file_digests(&data)?;
        for (path, content) in user_files() {
            ensure!(got.remove(&path) == Some(sha256_hex(&content)), "{file}: {path} is not as it was");
        }
        ensure!(got == want, "{file}: the data dir holds another tree");
    }
    Ok(())
}

/// Stages `archive` into a fresh data dir with `limits`: the refusal, and that the data dir is as
/// it was.
fn refused(root: &Path, archive: &Path, limits: &Limits) -> Result<StoreError> {
    let data = data_dir(root, &atlas_testbed::unique("data"))?;
    let before = tree(&data)?;
    let guard = lock(&lock_path(&data))?;
    let (store, _) = PackStore::open(&data, &guard)?;
    let format = ArchiveFormat::from_file_name(&archive.to_string_lossy()).context("format")?;
    let error = match store.stage(archive, format, Some(&PackVersion::new("9")?), limits) {
        Ok(staged) => bail!("{}: accepted as {}", archive.display(), staged.version()),
        Err(e) => e,
    };
    let mut after = tree(&data)?;
    // Opening the store made its directory; a refused staging leaves nothing in it.
    after.retain(|path, _| !path.starts_with(".atlas"));
    ensure!(after == before, "the data dir changed");
    ensure!(fs::read_dir(data.join(".atlas/packs"))?.count() == 0, "a refused staging left something in the store");
    Ok(error)
}

#[test]
fn a_stream_of_zeros_without_a_manifest_is_still_refused_as_a_bomb() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    // 1 GiB of zeros (a sparse file, so it costs no disk here) packed by GNU tar and zstd: about
    // 32000:1.
    sh(root, "mkdir bomb && truncate -s 1G bomb/zeros.bin && tar -C bomb -cf - . | zstd -q -o bomb.tar.zst")?;
    match refused(root, &root.join("bomb.tar.zst"), &Limits::default())? {
        StoreError::ExtractArchive(e @ ExtractError::Bomb { .. }) => {
            ensure!(e.to_string().contains("atlas-runner pack build"), "{e}");
            Ok(())
        }
        other => bail!("refused for another reason: {other}"),
    }
}

#[test]
fn a_stream_of_zeros_packed_by_gzip_or_zip_is_refused_as_a_bomb_too() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    // Deflate never passes about 1030:1, zeros included, so zstd's limit would let these through.
    sh(
        root,
        "mkdir bomb && truncate -s 256M bomb/zeros.bin && tar -C bomb -czf bomb.tar.gz . \
         && (cd bomb && zip -q ../bomb.zip zeros.bin)",
    )?;
    for archive in ["bomb.tar.gz", "bomb.zip"] {
        match refused(root, &root.join(archive), &Limits::default())? {
            StoreError::ExtractArchive(ExtractError::Bomb { expanded, compressed, ratio, .. }) => {
                ensure!(ratio == Limits::default().max_ratio_deflate, "{archive}: the limit was {ratio}");
                ensure!(expanded / compressed > ratio && expanded < 256 << 20, "{archive}: {expanded} / {compressed}");
            }
            other => bail!("{archive}: refused for another reason: {other}"),
        }
    }
    Ok(())
}

/// Writes an Atlas pack by hand with Python's tarfile, piped to zstd: the manifest first, declaring
/// `declared` bytes for `big.bin`, then `big.bin` with `actual` zero bytes.
fn lying_pack(root: &Path, name: &str, declared: u64, actual: u64) -> Result<PathBuf> {
    let script = format!(
        r#"
import hashlib, io, json, sys, tarfile
manifest = json.dumps({{"format": 1, "version": "9", "files": [
    {{"path": "big.bin", "sha256": hashlib.sha256(b"\0" * {declared}).hexdigest(), "size": {declared}}}]}}).encode()
class Zeros(io.RawIOBase):
    def __init__(self, n): self.n = n
    def readable(self): return True
    def readinto(self, b):
        k = min(len(b), self.n); b[:k] = bytes(k); self.n -= k; return k
with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as t:
    i = tarfile.TarInfo("atlas-pack.json"); i.size = len(manifest); t.addfile(i, io.BytesIO(manifest))
    i = tarfile.TarInfo("big.bin"); i.size = {actual}; t.addfile(i, io.BufferedReader(Zeros({actual})))
"#
    );
    let out = root.join(name);
    run_tool(
        Command::new("bash")
            .args(["-o", "pipefail", "-ec"])
            .arg(format!("python3 -c '{}' | zstd -q -o {}", script.replace('\'', "'\\''"), out.display()))
            .current_dir(root),
    )?;
    Ok(out)
}

#[test]
fn an_atlas_pack_is_held_to_the_sizes_its_manifest_declares_not_to_a_ratio() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    // Zeros the manifest declares: 200 MiB at thousands to one, no ratio applies.
    let honest = lying_pack(root, "honest.tar.zst", 200 << 20, 200 << 20)?;
    {
        let data = data_dir(root, "data")?;
        let guard = lock(&lock_path(&data))?;
        let (store, _) = PackStore::open(&data, &guard)?;
        let staged = store.stage(&honest, ArchiveFormat::TarZst, None, &Limits::default())?;
        ensure!(staged.manifest().total_size() == 200 << 20);
    }
    // A file bigger than its entry in the manifest is refused before a byte of it is written.
    match refused(root, &lying_pack(root, "liar.tar.zst", 10, 256 << 20)?, &Limits::default())? {
        StoreError::ExtractArchive(ExtractError::SizeMismatch { name, size, declared }) => {
            ensure!(name == "big.bin" && size == 256 << 20 && declared == 10);
        }
        other => bail!("refused for another reason: {other}"),
    }
    Ok(())
}

/// `atlas-runner pack apply` of `source` into a data dir on a private tmpfs of `size` bytes (a
/// mount namespace of an unprivileged user namespace, gone with the process), filled up to leave
/// `free` bytes: nothing else writes there, so its free space is known. The error line, and what
/// the tmpfs held afterwards.
fn apply_on_a_small_volume(root: &Path, source: &str, size: u64, free: u64) -> Result<(String, String)> {
    let spec = root.join(format!("spec-{size}-{free}.yaml"));
    fs::write(&spec, format!("eula: true\nserver: {{type: vanilla}}\npack:\n  source:\n    {source}\n"))?;
    let mount = root.join(format!("volume-{size}-{free}"));
    fs::create_dir_all(&mount)?;
    let script = r#"
set -e
mount -t tmpfs -o size="$SIZE" tmpfs "$VOLUME"
mkdir -p "$VOLUME/data/world" && echo live > "$VOLUME/data/world/level.dat"
head -c "$(( $(stat -f -c '%a*%S' "$VOLUME") - FREE ))" /dev/zero > "$VOLUME/filler"
"$BIN" pack apply --spec "$SPEC" --data "$VOLUME/data" && echo "applied"
echo "store holds $(find "$VOLUME/data/.atlas/packs" -mindepth 1 -maxdepth 1 | wc -l) entries"
find "$VOLUME/data" -path "$VOLUME/data/.atlas" -prune -o -type f -print | sed "s|^$VOLUME/data/||" | sort
"#;
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script])
        .env("SIZE", size.to_string())
        .env("FREE", free.to_string())
        .env("VOLUME", &mount)
        .env("BIN", binary())
        .env("SPEC", &spec)
        .output()
        .context("unshare (util-linux) is needed to mount a private tmpfs")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !stderr.contains("unshare:") && !stderr.contains("mount:"),
        "a private tmpfs needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1): {stderr}"
    );
    ensure!(!stderr.contains("head:"), "filling the volume failed: {stderr}");
    let line = stderr.lines().filter(|l| l.starts_with("atlas-runner: ")).collect::<Vec<_>>().join("\n");
    Ok((line, String::from_utf8(out.stdout)?))
}

/// What a volume of `size` bytes keeps free: the smaller of the fixed reserve and a share of it.
fn reserve_of(size: u64) -> u64 {
    let limits = Limits::default();
    limits.min_free_bytes.min(size / 100 * limits.min_free_percent)
}

#[test]
fn a_pack_that_would_fill_the_volume_is_refused_and_leaves_nothing() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    // 10 files of 16 MiB of numbered lines: they compress (about 10 MiB in all), far from a ratio
    // that could be taken for a bomb.
    fs::create_dir_all(root.join("big"))?;
    for i in 0..10 {
        let text: String = (0..(16 << 20) / 32).map(|j| format!("part {i:02} line {j:018}\n")).collect::<String>();
        ensure!(text.len() == 16 << 20);
        fs::write(root.join(format!("big/part{i}.bin")), text)?;
    }
    sh(root, "tar -C big -cf - . | zstd -q -o big.tar.zst")?;
    let archive = fs::read(root.join("big.tar.zst"))?;
    let listing = Command::new("tar").arg("-tf").arg(root.join("big.tar.zst")).output()?;
    let first = String::from_utf8(listing.stdout)?.lines().find(|l| l.ends_with(".bin")).context("no file")?.to_owned();
    let digest = sha256_hex(&archive);
    // The download lands on the volume first.
    let downloaded = archive.len() as u64;
    let base = serve_files(|_| Ok(HashMap::from([("/big.tar.zst".to_owned(), archive)])))?;
    let source = format!("url: {{url: \"{base}/big.tar.zst\", sha256: {digest}}}");
    let untouched = "store holds 0 entries\nworld/level.dat\n";
    // A 256 MiB volume keeps 5 % of it free, not all 256 MiB.
    let size = 256 << 20;
    let reserve = reserve_of(size);
    ensure!(reserve < 16 << 20, "the reserve of a small volume is {reserve}");

    // Less room above the reserve than one file: the first file is refused, nothing is written.
    let (error, after) = apply_on_a_small_volume(root, &source, size, reserve + downloaded + (8 << 20))?;
    ensure!(error.contains(&format!("archive entry {first:?} needs 16777216 bytes")), "{error:?}, then:\n{after}");
    ensure!(error.contains(&format!("of which {reserve} stay for the running server")), "{error}");
    ensure!(after == untouched, "the volume holds:\n{after}");

    // Room for two files above the reserve: the third does not fit, and the two written go again.
    let (error, after) = apply_on_a_small_volume(root, &source, size, reserve + downloaded + (40 << 20))?;
    ensure!(
        error.contains("needs 16777216 bytes") && !error.contains(&format!("{first:?}")),
        "{error:?}, then:\n{after}"
    );
    ensure!(after == untouched, "the volume holds:\n{after}");
    Ok(())
}

#[test]
fn a_small_pack_applies_on_a_small_volume_with_little_room_left() -> Result<()> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    fs::create_dir_all(root.join("pack/config"))?;
    fs::write(root.join("pack/config/server.toml"), "motd = \"hello\"\n".repeat(50))?;
    sh(root, "tar -C pack -czf small.tar.gz .")?;
    let archive = fs::read(root.join("small.tar.gz"))?;
    let digest = sha256_hex(&archive);
    let base = serve_files(|_| Ok(HashMap::from([("/small.tar.gz".to_owned(), archive)])))?;
    let source = format!("url: {{url: \"{base}/small.tar.gz\", sha256: {digest}}}");
    // A 64 MiB volume with 8 MiB free: far under a fixed 256 MiB, well over its 5 %.
    let size = 64 << 20;
    ensure!(reserve_of(size) < 4 << 20);
    let (error, after) = apply_on_a_small_volume(root, &source, size, 8 << 20)?;
    ensure!(error.is_empty(), "{error}");
    ensure!(
        after.starts_with("applied ") && after.ends_with("\nconfig/server.toml\nworld/level.dat\n"),
        "the volume holds:\n{after}"
    );
    Ok(())
}
