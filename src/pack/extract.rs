//! Safe extraction of pack archives (`.tar.zst`, `.tar.gz`, `.zip`) into an empty staging directory.
//!
//! Every entry is checked before a byte of it is written: its path must sanitise (no `..`, not
//! absolute; a `./` prefix is dropped, and a `./` directory entry is the destination itself), it
//! must be a regular file or a directory (no links, devices or fifos), it must not repeat or
//! collide with another entry, and sizes and the expansion ratio must stay within
//! [`Limits`]. Truncated and corrupt streams are errors. Files are hashed while written; a
//! [`Policy`] may have a file hashed and discarded instead (content the caller already holds) or
//! handed over in memory (a pack's manifest). An accepted archive's files are durable when
//! extraction returns: the filesystem is flushed (`syncfs`) while the files are written and once at
//! the end, rather than a flush per file.

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use sha2::Digest;

use super::manifest::Sha256Digest;
use super::path::{PathError, RelativePath, names_root, sanitize_path};

/// The archive formats a pack may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// A zstd-compressed tar (the Atlas pack format).
    TarZst,
    /// A gzip-compressed tar.
    TarGz,
    /// A zip archive (also the container of `.mrpack`).
    Zip,
}

impl ArchiveFormat {
    /// The format a file name's extension says, if any.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".tar.zst") || lower.ends_with(".tzst") {
            Some(Self::TarZst)
        } else if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
            Some(Self::TarGz)
        } else if lower.ends_with(".zip") || lower.ends_with(".mrpack") {
            Some(Self::Zip)
        } else {
            None
        }
    }
}

/// Bounds on what an archive may expand to. What bounds a pack is its size: its manifest's declared
/// sizes (every file of an Atlas pack is held to its entry, and a file it does not list is refused,
/// before a byte is written), the largest file and total below, and the volume's free space. The
/// expansion ratio only judges archives without a manifest, and only a stream almost wholly of one
/// repeated byte, the stuff of bombs, exceeds it: the emptiest real content (a void world's region
/// files with uncompressed chunks) stays well under. The limit depends on the compression, since
/// their ceilings differ by thirty times: the void world is about 650:1 at zstd's default level
/// (1300:1 at its highest) against 30000:1 for zeros, and about 170:1 as deflate (gzip, zip)
/// against deflate's ceiling of about 1030:1, which zeros reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest single file, in bytes.
    pub max_entry_size: u64,
    /// Largest total of all files, in bytes.
    pub max_total_size: u64,
    /// Most entries (files and directories).
    pub max_entries: u64,
    /// Largest accepted ratio of expanded bytes to compressed bytes the decoder consumed so far,
    /// for a zstd archive (`.tar.zst`) whose manifest did not declare its files...
    pub max_ratio_zstd: u64,
    /// ...for a deflate archive (`.tar.gz`, `.zip`; deflate never passes about 1030:1, so a limit
    /// at zstd's would never trigger)...
    pub max_ratio_deflate: u64,
    /// ...checked only once this many bytes have been expanded, so small, very compressible
    /// packs (a few config files) are not mistaken for bombs.
    pub ratio_floor: u64,
    /// Free bytes the destination's volume keeps, at most: a file that would leave less is refused
    /// before it is written. The running server's world shares the volume, and must still be able to
    /// save...
    pub min_free_bytes: u64,
    /// ...but on a small volume only this share of its size, in percent (the smaller of the two
    /// holds): a small volume holds a small world, whose saves need room in proportion, and a fixed
    /// 256 MiB would refuse even a tiny pack on a 1 GiB volume a third full.
    pub min_free_percent: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entry_size: 2 << 30,
            max_total_size: 32 << 30,
            max_entries: 500_000,
            max_ratio_zstd: 5000,
            max_ratio_deflate: 400,
            ratio_floor: 64 << 20,
            min_free_bytes: 256 << 20,
            min_free_percent: 5,
        }
    }
}

/// A regular file read by extraction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedFile {
    /// Where it landed (or would have), relative to the destination.
    pub path: RelativePath,
    /// SHA-256 of its content.
    pub sha256: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
    /// What was done with it: only [`Disposition::Write`] files are under the destination.
    pub disposition: Disposition,
}

/// What extraction does with a regular file, decided from its path and declared size before any
/// of its bytes are read. Every file is hashed and held to the limits whatever its disposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Written under the destination.
    Write,
    /// Hashed and dropped: the caller already holds this content (an unchanged file of the version
    /// in place), so writing it would only be deleted again.
    Discard,
    /// Hashed and handed to [`Policy::captured`] instead of written (a small file the caller reads
    /// itself, such as a pack's manifest). Files over [`CAPTURE_LIMIT`] are written instead.
    Capture,
}

/// The largest file [`Disposition::Capture`] keeps in memory.
pub const CAPTURE_LIMIT: u64 = 64 << 20;

/// What the archive declared about a file before its entry (in a pack's manifest, read first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// Nothing declares the archive's files: the limits and the expansion ratio bound them.
    Nothing,
    /// The file's size: an entry of another size is refused before a byte is written.
    Size(u64),
    /// The declaration does not list this file: it is refused.
    Unlisted,
}

/// Decides, entry by entry, what extraction does with each regular file.
pub trait Policy {
    /// The disposition of the file at `path` declaring `declared` bytes; `first`: it is the
    /// archive's first regular file (directories may come before it).
    fn disposition(&mut self, path: &RelativePath, declared: u64, first: bool) -> Disposition;
    /// The content of a file this policy asked to capture, once it is read in full.
    fn captured(&mut self, path: &RelativePath, bytes: Vec<u8>);
    /// What the archive declared about the file at `path`, asked before its entry is read.
    fn declared(&self, _path: &RelativePath) -> Declared {
        Declared::Nothing
    }
}

/// The policy that writes every file.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteAll;

impl Policy for WriteAll {
    fn disposition(&mut self, _: &RelativePath, _: u64, _: bool) -> Disposition {
        Disposition::Write
    }
    fn captured(&mut self, _: &RelativePath, _: Vec<u8>) {}
}

/// Why an archive was refused or could not be extracted. Entry names are as the archive spells them.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The entry's path is absolute, has `..`, or is otherwise unsafe.
    #[error("archive entry {name:?}: {source}")]
    UnsafePath {
        /// The entry's name.
        name: String,
        /// What is wrong with it.
        #[source]
        source: PathError,
    },
    /// The entry's name is not UTF-8.
    #[error("archive entry {name:?}: the name is not UTF-8")]
    NotUtf8 {
        /// The entry's name, lossily decoded.
        name: String,
    },
    /// A symbolic link or a hard link.
    #[error("archive entry {name:?} is a {kind}; packs may not contain links")]
    Link {
        /// The entry's name.
        name: String,
        /// `symlink` or `hardlink`.
        kind: &'static str,
    },
    /// A device, fifo, socket or other non-regular entry.
    #[error("archive entry {name:?} is a {kind}; packs may hold only regular files and directories")]
    SpecialFile {
        /// The entry's name.
        name: String,
        /// What kind of entry.
        kind: &'static str,
    },
    /// The same path twice, or a path both a file and a directory.
    #[error("archive entry {name:?} repeats or collides with an earlier entry")]
    Duplicate {
        /// The entry's name.
        name: String,
    },
    /// One entry over [`Limits::max_entry_size`].
    #[error("archive entry {name:?} is {size} bytes, over the limit of {limit}")]
    EntryTooLarge {
        /// The entry's name.
        name: String,
        /// Its size (declared or reached).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The archive expands past [`Limits::max_total_size`] or has too many entries.
    #[error("archive entry {name:?} takes the archive past its limit of {limit} {what}")]
    ArchiveTooLarge {
        /// The entry that crossed the limit.
        name: String,
        /// The limit.
        limit: u64,
        /// `bytes` or `entries`.
        what: &'static str,
    },
    /// The expansion ratio says decompression bomb.
    #[error(
        "archive entry {name:?}: {expanded} bytes expanded from {compressed} compressed, over the ratio limit of {ratio}; refusing a likely decompression bomb (if this is real content, make the pack with `atlas-runner pack build`: its manifest declares every size, and then no ratio applies)"
    )]
    Bomb {
        /// The entry being expanded.
        name: String,
        /// Bytes expanded so far.
        expanded: u64,
        /// Compressed bytes read so far.
        compressed: u64,
        /// The ratio limit.
        ratio: u64,
    },
    /// A file the archive's manifest does not list.
    #[error("archive entry {name:?} is not listed in the pack's manifest")]
    Undeclared {
        /// The entry's name.
        name: String,
    },
    /// A file whose size is not the one the archive's manifest declares.
    #[error("archive entry {name:?} is {size} bytes, the pack's manifest says {declared}")]
    SizeMismatch {
        /// The entry's name.
        name: String,
        /// Its size (declared by its entry, or reached).
        size: u64,
        /// The manifest's size.
        declared: u64,
    },
    /// The volume would be left with less free space than [`Limits::min_free_bytes`] (or, on a small
    /// volume, [`Limits::min_free_percent`] of it).
    #[error(
        "archive entry {name:?} needs {needed} bytes, and the volume of {} has {free} free of which {reserve} stay for the running server; free some space on it",
        path.display()
    )]
    NoSpace {
        /// The entry that would not fit.
        name: String,
        /// Its size.
        needed: u64,
        /// Free bytes on the volume.
        free: u64,
        /// What stays free on this volume.
        reserve: u64,
        /// The destination.
        path: PathBuf,
    },
    /// A tar entry or zip feature this extractor does not take (sparse files, ...).
    #[error("archive entry {name:?} has unsupported type {kind}")]
    Unsupported {
        /// The entry's name.
        name: String,
        /// The type, as the archive names it.
        kind: String,
    },
    /// The stream is truncated or corrupt (compression, tar or zip structure, checksum).
    #[error("read archive{}: {source}", entry.as_deref().map(|n| format!(" (at entry {n:?})")).unwrap_or_default())]
    Corrupt {
        /// The entry being read, when known.
        entry: Option<String>,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// An entry ended before its declared size.
    #[error("archive entry {name:?} is truncated: {actual} of {declared} bytes")]
    Truncated {
        /// The entry's name.
        name: String,
        /// Size its header declares.
        declared: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The destination is not an empty directory.
    #[error("extraction destination {0} is not an empty directory")]
    DestinationNotEmpty(PathBuf),
    /// Writing the destination failed.
    #[error("write {path}: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl ExtractError {
    /// Short static category, used as log field and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::UnsafePath { .. }
            | Self::NotUtf8 { .. }
            | Self::Link { .. }
            | Self::SpecialFile { .. }
            | Self::Duplicate { .. }
            | Self::Unsupported { .. } => "unsafe-entry",
            Self::EntryTooLarge { .. } | Self::ArchiveTooLarge { .. } | Self::Bomb { .. } => "too-large",
            Self::Undeclared { .. } | Self::SizeMismatch { .. } => "digest-mismatch",
            Self::NoSpace { .. } => "no-space",
            Self::Corrupt { .. } | Self::Truncated { .. } => "corrupt-archive",
            Self::DestinationNotEmpty(_) | Self::Write { .. } => "io",
        }
    }
}

/// Extracts `archive` (a file in `format`) into `dest`, an existing empty directory.
pub fn extract_file(
    archive: &Path,
    format: ArchiveFormat,
    dest: &Path,
    limits: &Limits,
) -> Result<Vec<ExtractedFile>, ExtractError> {
    extract_file_with(archive, format, dest, limits, &mut WriteAll)
}

/// [`extract_file`] with a [`Policy`] deciding what is written.
pub fn extract_file_with(
    archive: &Path,
    format: ArchiveFormat,
    dest: &Path,
    limits: &Limits,
    policy: &mut dyn Policy,
) -> Result<Vec<ExtractedFile>, ExtractError> {
    let file = File::open(archive).map_err(|source| ExtractError::Corrupt { entry: None, source })?;
    let reader = io::BufReader::with_capacity(256 * 1024, file);
    match format {
        ArchiveFormat::TarZst => extract_tar_with(reader, TarCompression::Zstd, dest, limits, policy),
        ArchiveFormat::TarGz => extract_tar_with(reader, TarCompression::Gzip, dest, limits, policy),
        ArchiveFormat::Zip => extract_zip_with(reader, dest, limits, policy),
    }
}

/// The compression around a tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarCompression {
    /// zstd (`.tar.zst`).
    Zstd,
    /// gzip (`.tar.gz`).
    Gzip,
}

/// Extracts a compressed tar stream into `dest`, an existing empty directory. Streams: memory use
/// does not depend on the archive's size. The decoder reads straight from `reader`'s buffer.
pub fn extract_tar<R: BufRead>(
    reader: R,
    compression: TarCompression,
    dest: &Path,
    limits: &Limits,
) -> Result<Vec<ExtractedFile>, ExtractError> {
    extract_tar_with(reader, compression, dest, limits, &mut WriteAll)
}

/// [`extract_tar`] with a [`Policy`] deciding what is written.
pub fn extract_tar_with<R: BufRead>(
    reader: R,
    compression: TarCompression,
    dest: &Path,
    limits: &Limits,
    policy: &mut dyn Policy,
) -> Result<Vec<ExtractedFile>, ExtractError> {
    check_empty_dir(dest)?;
    with_disk(dest, |disk| read_tar(reader, compression, dest, limits, policy, disk))
}

fn read_tar<R: BufRead>(
    reader: R,
    compression: TarCompression,
    dest: &Path,
    limits: &Limits,
    policy: &mut dyn Policy,
    disk: &mut Disk,
) -> Result<Vec<ExtractedFile>, ExtractError> {
    let compressed = Rc::new(Cell::new(0u64));
    let counting = CountingReader { inner: reader, count: Rc::clone(&compressed) };
    let corrupt = |entry: Option<&str>| {
        let entry = entry.map(str::to_owned);
        move |source| ExtractError::Corrupt { entry, source }
    };
    let decoder: Box<dyn Read> = match compression {
        TarCompression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(counting).map_err(corrupt(None))?),
        // Every member: a .tar.gz may be several gzip members end to end (bgzip and parallel
        // compressors write them), and the first alone would end at a header boundary unnoticed.
        TarCompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(counting)),
    };
    let ratio = match compression {
        TarCompression::Zstd => limits.max_ratio_zstd,
        TarCompression::Gzip => limits.max_ratio_deflate,
    };
    let mut writer = Writer::new(dest, limits, compressed, ratio, policy, disk)?;
    let mut archive = tar::Archive::new(decoder);
    for entry in archive.entries().map_err(corrupt(None))? {
        let mut entry = entry.map_err(corrupt(writer.last_name()))?;
        let raw_name = entry.path_bytes();
        let name = match std::str::from_utf8(&raw_name) {
            Ok(name) => name.to_owned(),
            Err(_) => return Err(ExtractError::NotUtf8 { name: String::from_utf8_lossy(&raw_name).into_owned() }),
        };
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular | T::Continuous => {
                let declared = entry.header().size().map_err(corrupt(Some(&name)))?;
                writer.file(&name, declared, &mut entry)?;
            }
            T::Directory => writer.dir(&name)?,
            T::Symlink => return Err(ExtractError::Link { name, kind: "symlink" }),
            T::Link => return Err(ExtractError::Link { name, kind: "hardlink" }),
            T::Char => return Err(ExtractError::SpecialFile { name, kind: "character device" }),
            T::Block => return Err(ExtractError::SpecialFile { name, kind: "block device" }),
            T::Fifo => return Err(ExtractError::SpecialFile { name, kind: "fifo" }),
            // A pax global header carries defaults for later entries, no file.
            T::XGlobalHeader => continue,
            other => return Err(ExtractError::Unsupported { name, kind: format!("{other:?}") }),
        }
    }
    // Read the compressed stream to its end, so a truncated or corrupt tail (which tar's end
    // marker would hide) is still an error, and trailing junk still counts against the limits.
    let mut rest = archive.into_inner();
    let budget = limits.max_total_size.saturating_sub(writer.total) + 1;
    let drained = io::copy(&mut (&mut rest).take(budget), &mut io::sink()).map_err(corrupt(None))?;
    if drained >= budget {
        return Err(ExtractError::ArchiveTooLarge {
            name: "(after the last entry)".into(),
            limit: limits.max_total_size,
            what: "bytes",
        });
    }
    writer.finish()
}

/// Extracts a zip archive into `dest`, an existing empty directory. Zip needs `Seek` (its index is
/// at the end), so network sources download to a file first.
pub fn extract_zip<R: Read + Seek>(
    reader: R,
    dest: &Path,
    limits: &Limits,
) -> Result<Vec<ExtractedFile>, ExtractError> {
    extract_zip_with(reader, dest, limits, &mut WriteAll)
}

/// [`extract_zip`] with a [`Policy`] deciding what is written.
pub fn extract_zip_with<R: Read + Seek>(
    mut reader: R,
    dest: &Path,
    limits: &Limits,
    policy: &mut dyn Policy,
) -> Result<Vec<ExtractedFile>, ExtractError> {
    check_empty_dir(dest)?;
    let corrupt = |entry: Option<&str>| {
        let entry = entry.map(str::to_owned);
        move |source| ExtractError::Corrupt { entry, source }
    };
    let zip_corrupt = |entry: Option<&str>| {
        let entry = entry.map(str::to_owned);
        move |e: zip::result::ZipError| ExtractError::Corrupt { entry, source: io::Error::other(e) }
    };
    let archive_len = reader.seek(SeekFrom::End(0)).map_err(corrupt(None))?;
    // The zip crate keys entries by name, silently keeping one of two same-named entries; read
    // the central directory's names ourselves so a duplicate is refused, by name.
    if let Some(name) = zip_duplicate_name(&mut reader).map_err(corrupt(None))? {
        return Err(ExtractError::Duplicate { name });
    }
    reader.seek(SeekFrom::Start(0)).map_err(corrupt(None))?;
    let mut archive = zip::ZipArchive::new(reader).map_err(zip_corrupt(None))?;
    let compressed = Rc::new(Cell::new(archive_len));
    with_disk(dest, |disk| {
        // Entries are deflated or stored (the only methods this build reads): deflate's limit holds.
        let mut writer = Writer::new(dest, limits, compressed, limits.max_ratio_deflate, policy, disk)?;
        for index in 0..archive.len() {
            let mut file = archive.by_index(index).map_err(zip_corrupt(writer.last_name()))?;
            let name = file.name().to_owned();
            const S_IFMT: u32 = 0o170000;
            let kind = match file.unix_mode().map(|m| m & S_IFMT) {
                None | Some(0) | Some(0o100000) | Some(0o040000) => None,
                Some(0o120000) => return Err(ExtractError::Link { name, kind: "symlink" }),
                Some(0o020000) => Some("character device"),
                Some(0o060000) => Some("block device"),
                Some(0o010000) => Some("fifo"),
                Some(0o140000) => Some("socket"),
                Some(_) => Some("unknown file type"),
            };
            if let Some(kind) = kind {
                return Err(ExtractError::SpecialFile { name, kind });
            }
            if file.is_dir() {
                writer.dir(&name)?;
            } else {
                let declared = file.size();
                writer.file(&name, declared, &mut file)?;
            }
        }
        writer.finish()
    })
}

/// The first name the zip's central directory lists twice. `None` for a zip64 directory, whose
/// layout this scan does not read (the zip crate still parses it).
fn zip_duplicate_name<R: Read + Seek>(reader: &mut R) -> io::Result<Option<String>> {
    let len = reader.seek(SeekFrom::End(0))?;
    let tail_len = len.min(22 + 65_535);
    reader.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::new();
    reader.take(tail_len).read_to_end(&mut tail)?;
    let Some(eocd) = tail.windows(4).rposition(|w| w == [0x50, 0x4b, 0x05, 0x06]) else {
        return Ok(None); // Not a zip at all: the zip crate says so, with its own error.
    };
    let field = |at: usize, n: usize| -> Option<u64> {
        let bytes = tail.get(eocd + at..eocd + at + n)?;
        Some(bytes.iter().rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    let (Some(count), Some(size), Some(offset)) = (field(10, 2), field(12, 4), field(16, 4)) else {
        return Ok(None);
    };
    if count == 0xffff || offset == 0xffff_ffff || size > 64 << 20 {
        return Ok(None);
    }
    reader.seek(SeekFrom::Start(offset))?;
    let mut dir = Vec::new();
    reader.take(size).read_to_end(&mut dir)?;
    let mut seen = HashSet::new();
    let mut at = 0usize;
    while dir.get(at..at + 4) == Some(&[0x50, 0x4b, 0x01, 0x02]) {
        let le16 = |o: usize| dir.get(at + o..at + o + 2).map(|b| usize::from(b[0]) | usize::from(b[1]) << 8);
        let (Some(name_len), Some(extra_len), Some(comment_len)) = (le16(28), le16(30), le16(32)) else {
            break;
        };
        let Some(name) = dir.get(at + 46..at + 46 + name_len) else { break };
        let name = String::from_utf8_lossy(name).into_owned();
        // `a` and `a/` (file and directory) collide on disk as well.
        if !seen.insert(name.trim_end_matches('/').to_owned()) {
            return Ok(Some(name));
        }
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(None)
}

fn check_empty_dir(dest: &Path) -> Result<(), ExtractError> {
    let mut entries = fs::read_dir(dest).map_err(|source| ExtractError::Write { path: dest.to_owned(), source })?;
    if entries.next().is_some() {
        return Err(ExtractError::DestinationNotEmpty(dest.to_owned()));
    }
    Ok(())
}

/// Counts bytes read from the compressed stream, for the expansion ratio.
struct CountingReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for CountingReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.count.set(self.count.get() + n as u64);
        self.inner.consume(n);
    }
}

/// Writes checked entries under the destination and enforces the limits across entries.
struct Writer<'a> {
    dest: &'a Path,
    limits: &'a Limits,
    policy: &'a mut dyn Policy,
    compressed: Rc<Cell<u64>>,
    /// The expansion ratio limit of the archive's compression.
    max_ratio: u64,
    total: u64,
    entries: u64,
    files: HashSet<RelativePath>,
    dirs: HashSet<String>,
    out: Vec<ExtractedFile>,
    last: Option<String>,
    disk: &'a mut Disk,
    space: Space,
}

/// Bytes written between two looks at the volume's free space: other writers share it, and the
/// files in flight to the writing thread (a few MiB) are not counted yet.
const SPACE_CHECK_EVERY: u64 = 16 << 20;

/// The destination volume's free space, as last asked (statvfs), less what was written since.
#[derive(Debug)]
struct Space {
    dest: PathBuf,
    /// [`Limits::min_free_bytes`] and [`Limits::min_free_percent`].
    max_reserve: u64,
    percent: u64,
    /// What stays free: the smaller of the two bounds, for this volume's size.
    reserve: u64,
    free: u64,
    written_since: u64,
}

impl Space {
    fn new(dest: &Path, limits: &Limits) -> Result<Self, ExtractError> {
        let mut space = Self {
            dest: dest.to_owned(),
            max_reserve: limits.min_free_bytes,
            percent: limits.min_free_percent,
            reserve: limits.min_free_bytes,
            free: 0,
            written_since: 0,
        };
        space.refresh()?;
        Ok(space)
    }

    fn refresh(&mut self) -> Result<(), ExtractError> {
        let stat = nix::sys::statvfs::statvfs(&self.dest)
            .map_err(|e| ExtractError::Write { path: self.dest.clone(), source: io::Error::from(e) })?;
        // Blocks an unprivileged writer may use, as `df` shows them.
        self.free = stat.blocks_available().saturating_mul(stat.fragment_size());
        let size = stat.blocks().saturating_mul(stat.fragment_size());
        self.reserve = self.max_reserve.min(size / 100 * self.percent);
        self.written_since = 0;
        Ok(())
    }

    /// Counts `needed` more bytes to write, refusing them when the volume would keep less than the
    /// reserve.
    fn take(&mut self, name: &str, needed: u64) -> Result<(), ExtractError> {
        let fits = |s: &Self| s.written_since.saturating_add(needed).saturating_add(s.reserve) <= s.free;
        if !fits(self) || self.written_since >= SPACE_CHECK_EVERY {
            self.refresh()?;
            if !fits(self) {
                return Err(ExtractError::NoSpace {
                    name: name.to_owned(),
                    needed,
                    free: self.free,
                    reserve: self.reserve,
                    path: self.dest.clone(),
                });
            }
        }
        self.written_since += needed;
        Ok(())
    }
}

impl<'a> Writer<'a> {
    fn new(
        dest: &'a Path,
        limits: &'a Limits,
        compressed: Rc<Cell<u64>>,
        max_ratio: u64,
        policy: &'a mut dyn Policy,
        disk: &'a mut Disk,
    ) -> Result<Self, ExtractError> {
        Ok(Self {
            dest,
            limits,
            policy,
            compressed,
            max_ratio,
            total: 0,
            entries: 0,
            files: HashSet::new(),
            dirs: HashSet::new(),
            out: Vec::new(),
            last: None,
            disk,
            space: Space::new(dest, limits)?,
        })
    }

    fn last_name(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// Counts an entry against [`Limits::max_entries`].
    fn count(&mut self, name: &str) -> Result<(), ExtractError> {
        self.last = Some(name.to_owned());
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ExtractError::ArchiveTooLarge {
                name: name.to_owned(),
                limit: self.limits.max_entries,
                what: "entries",
            });
        }
        Ok(())
    }

    fn admit(&mut self, name: &str) -> Result<RelativePath, ExtractError> {
        self.count(name)?;
        let path = sanitize_path(name).map_err(|source| ExtractError::UnsafePath { name: name.to_owned(), source })?;
        // No ancestor of this entry may be a file.
        if path.ancestors().any(|a| self.files.contains(a)) {
            return Err(ExtractError::Duplicate { name: name.to_owned() });
        }
        Ok(path)
    }

    fn dir(&mut self, name: &str) -> Result<(), ExtractError> {
        // `./` (GNU tar's `-C DIR .`, Python's shutil) is the directory archived: the destination,
        // which exists. Only a directory may name it; a file there is refused by `admit` below.
        if names_root(name) {
            return self.count(name);
        }
        let path = self.admit(name)?;
        if self.files.contains(&path) {
            return Err(ExtractError::Duplicate { name: name.to_owned() });
        }
        self.disk.send(Op::Dir(path.under(self.dest)))?;
        for a in path.ancestors() {
            self.dirs.insert(a.to_owned());
        }
        self.dirs.insert(path.as_str().to_owned());
        Ok(())
    }

    fn file(&mut self, name: &str, declared: u64, reader: &mut dyn Read) -> Result<(), ExtractError> {
        let path = self.admit(name)?;
        if self.files.contains(&path) || self.dirs.contains(path.as_str()) {
            return Err(ExtractError::Duplicate { name: name.to_owned() });
        }
        let limit = self.limits.max_entry_size;
        if declared > limit {
            return Err(ExtractError::EntryTooLarge { name: name.to_owned(), size: declared, limit });
        }
        // A file the manifest declared may hold exactly its declared bytes, and no ratio applies.
        let manifest_size = match self.policy.declared(&path) {
            Declared::Nothing => None,
            Declared::Unlisted => return Err(ExtractError::Undeclared { name: name.to_owned() }),
            Declared::Size(size) if size != declared => {
                return Err(ExtractError::SizeMismatch { name: name.to_owned(), size: declared, declared: size });
            }
            Declared::Size(size) => Some(size),
        };
        let target = path.under(self.dest);
        // Directory entries before it (a tar of `.` starts with `./`) carry no content to skip.
        let disposition = match self.policy.disposition(&path, declared, self.out.is_empty()) {
            Disposition::Capture if declared > CAPTURE_LIMIT => Disposition::Write,
            d => d,
        };
        if disposition == Disposition::Write {
            // Reading stops at the declared size (below), so this is all the file can take.
            self.space.take(name, declared)?;
            self.disk.send(Op::File(target))?;
        }
        for a in path.ancestors() {
            self.dirs.insert(a.to_owned());
        }
        self.files.insert(path.clone());
        let mut captured = match disposition {
            // Bounded by CAPTURE_LIMIT above.
            Disposition::Capture => Vec::with_capacity(usize::try_from(declared).unwrap_or(0)),
            _ => Vec::new(),
        };
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        let mut limited = reader.take(declared.saturating_add(1));
        loop {
            let mut buf = self.disk.buffer();
            let n = read_full(&mut limited, &mut buf)
                .map_err(|source| ExtractError::Corrupt { entry: Some(name.to_owned()), source })?;
            if n == 0 {
                self.disk.spare.push(buf);
                break;
            }
            let chunk = &buf[..n];
            size += n as u64;
            self.total += n as u64;
            if size > limit {
                return Err(ExtractError::EntryTooLarge { name: name.to_owned(), size, limit });
            }
            if self.total > self.limits.max_total_size {
                return Err(ExtractError::ArchiveTooLarge {
                    name: name.to_owned(),
                    limit: self.limits.max_total_size,
                    what: "bytes",
                });
            }
            if let Some(declared) = manifest_size
                && size > declared
            {
                return Err(ExtractError::SizeMismatch { name: name.to_owned(), size, declared });
            }
            let compressed = self.compressed.get().max(1);
            if manifest_size.is_none()
                && self.total > self.limits.ratio_floor
                && self.total / compressed > self.max_ratio
            {
                return Err(ExtractError::Bomb {
                    name: name.to_owned(),
                    expanded: self.total,
                    compressed,
                    ratio: self.max_ratio,
                });
            }
            hasher.update(chunk);
            match disposition {
                Disposition::Write => self.disk.send(Op::Data(buf, n))?,
                Disposition::Capture => {
                    captured.extend_from_slice(chunk);
                    self.disk.spare.push(buf);
                }
                Disposition::Discard => self.disk.spare.push(buf),
            }
        }
        if size != declared {
            return Err(ExtractError::Truncated { name: name.to_owned(), declared, actual: size });
        }
        if disposition == Disposition::Capture {
            self.policy.captured(&path, captured);
        }
        self.out.push(ExtractedFile { path, sha256: Sha256Digest(hasher.finalize().into()), size, disposition });
        Ok(())
    }

    fn finish(self) -> Result<Vec<ExtractedFile>, ExtractError> {
        let mut out = self.out;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}

/// Fills `buf` from `reader` as far as it goes; fewer bytes only at the end of the stream.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The bytes of one piece of file content handed to the writing thread.
const CHUNK: usize = 128 * 1024;
/// Pieces in flight to the writing thread: bounds the memory the split costs (2 MiB) while giving
/// the reading side room to run ahead of a write that waits.
const CHUNKS_IN_FLIGHT: usize = 16;

/// Filesystem work, in archive order, from the thread reading an archive to the one writing it.
enum Op {
    /// Create a directory (and its parents).
    Dir(PathBuf),
    /// Create a new file (and its parent directories); the `Data` that follows is its content.
    File(PathBuf),
    /// The first `.1` bytes of the buffer, appended to the file created last.
    Data(Vec<u8>, usize),
    /// The archive was read in full and accepted: make everything durable.
    Finish,
}

/// Bytes written between two flushes started during extraction.
const FLUSH_EVERY: u64 = 64 << 20;

/// The reading side's end of the writing thread: sends [`Op`]s and reuses the buffers written.
struct Disk {
    ops: SyncSender<Op>,
    written: Receiver<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    dest: PathBuf,
    /// A send failed: the writing thread stopped on an error of its own.
    writer_gone: bool,
}

impl Disk {
    fn send(&mut self, op: Op) -> Result<(), ExtractError> {
        // The writing thread only goes away early on an error of its own, which `with_disk` returns.
        self.ops.send(op).map_err(|_| {
            self.writer_gone = true;
            ExtractError::Write { path: self.dest.clone(), source: io::Error::other("the writing thread stopped") }
        })
    }

    fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().or_else(|| self.written.try_recv().ok()).unwrap_or_else(|| vec![0; CHUNK])
    }
}

/// Runs `read` (which reads and checks an archive) on this thread while another does its
/// filesystem work, as `zstd -d | tar -x` splits decompression from writing: the reading side
/// decompresses, checks and hashes, the writing side spends its time in the kernel. A third thread
/// flushes the filesystem (syncfs) every [`FLUSH_EVERY`] bytes, so the disk works while the archive
/// is still read and the final flush, once `read` accepted the archive, finds little left to write.
/// (syncfs flushes the whole filesystem, a running server's world included: that only writes its
/// data out sooner, and an I/O error anywhere on the filesystem fails the staging, as it would the
/// final flush.) On success everything extracted is durable.
///
/// Which error is returned: the reading side's (the archive refused, or unreadable), unless it is
/// only that the writer stopped; then the flusher's (an I/O error there explains the writer's), then
/// the writer's.
fn with_disk<T>(dest: &Path, read: impl FnOnce(&mut Disk) -> Result<T, ExtractError>) -> Result<T, ExtractError> {
    let io_error = |source| ExtractError::Write { path: dest.to_owned(), source };
    // Opened before the first write, so its syncfs reports any writeback error of the extraction.
    let filesystem = File::open(dest).map_err(io_error)?;
    let filesystem = &filesystem;
    std::thread::scope(|scope| {
        let (ops, ops_rx) = sync_channel(CHUNKS_IN_FLIGHT);
        let (written_tx, written) = sync_channel(CHUNKS_IN_FLIGHT + 2);
        let (flush, flush_rx) = sync_channel::<()>(1);
        let flushing = std::thread::Builder::new()
            .name("pack-flusher".into())
            .spawn_scoped(scope, move || flush_rx.iter().try_for_each(|()| syncfs(filesystem)))
            .map_err(io_error)?;
        let writing = std::thread::Builder::new()
            .name("pack-writer".into())
            .spawn_scoped(scope, move || write_ops(ops_rx, written_tx, flush, (filesystem, dest)))
            .map_err(io_error)?;
        let mut disk = Disk { ops, written, spare: Vec::new(), dest: dest.to_owned(), writer_gone: false };
        let read = read(&mut disk);
        if read.is_ok() {
            // A send that fails means the writer stopped on an error, returned below.
            let _ = disk.send(Op::Finish);
        }
        let writer_gone = disk.writer_gone;
        // Dropping the sender lets the writing thread finish.
        drop(disk);
        let written = writing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let flushed = flushing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        if read.is_err() && !writer_gone {
            return read;
        }
        flushed.map_err(io_error)?;
        written?;
        read
    })
}

/// Flushes everything written to the filesystem holding `dir` (syncfs(2)).
fn syncfs(dir: &File) -> io::Result<()> {
    nix::unistd::syncfs(dir).map_err(io::Error::from)
}

/// The writing thread: carries out `ops` until they end or one fails, handing each written buffer
/// back for reuse. Files are created with `create_new`, never following or replacing anything.
fn write_ops(
    ops: Receiver<Op>,
    written: SyncSender<Vec<u8>>,
    flush: SyncSender<()>,
    (filesystem, dest): (&File, &Path),
) -> Result<(), ExtractError> {
    let mut current: Option<(File, PathBuf)> = None;
    let mut unflushed = 0u64;
    // Directories made so far: most files share their parent with the one before.
    let mut made: HashSet<PathBuf> = HashSet::new();
    let mut make_dir = |path: &Path| -> Result<(), ExtractError> {
        if !made.contains(path) {
            fs::create_dir_all(path).map_err(|source| ExtractError::Write { path: path.to_owned(), source })?;
            made.insert(path.to_owned());
        }
        Ok(())
    };
    for op in ops {
        match op {
            Op::Dir(path) => {
                current = None;
                make_dir(&path)?;
            }
            Op::File(path) => {
                if let Some(parent) = path.parent() {
                    make_dir(parent)?;
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&path)
                    .map_err(|source| ExtractError::Write { path: path.clone(), source })?;
                current = Some((file, path));
            }
            Op::Data(buf, len) => {
                let Some((file, path)) = current.as_mut() else {
                    return Err(ExtractError::Write {
                        path: dest.to_owned(),
                        source: io::Error::other("file content with no file to write it to"),
                    });
                };
                file.write_all(&buf[..len]).map_err(|source| ExtractError::Write { path: path.clone(), source })?;
                // A full return channel only means enough spares: drop this one.
                let _ = written.try_send(buf);
                unflushed += len as u64;
                if unflushed >= FLUSH_EVERY {
                    // A flush still running covers these bytes well enough: never wait for it.
                    let _ = flush.try_send(());
                    unflushed = 0;
                }
            }
            Op::Finish => {
                current = None;
                syncfs(filesystem).map_err(|source| ExtractError::Write { path: dest.to_owned(), source })?;
            }
        }
    }
    Ok(())
}

/// fsyncs a directory, making the names in it durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Flushes everything written to the filesystem holding `path` (syncfs(2)): one call makes a whole
/// tree durable, files and directories, far faster than an fsync per file.
pub(crate) fn sync_filesystem(path: &Path) -> io::Result<()> {
    syncfs(&File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tar_gz_of_several_gzip_members_is_extracted_whole() -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut tar = tar::Builder::new(Vec::new());
        for (name, content) in [("mods/a.jar", &b"first"[..]), ("mods/b.jar", &b"second"[..])] {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, content)?;
        }
        let bytes = tar.into_inner()?;
        // The second entry's header starts after the first header and its padded data.
        let (first, second) = bytes.split_at(1024);
        let mut archive = Vec::new();
        for part in [first, second] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(part)?;
            archive.extend(gz.finish()?);
        }
        let dir = tempfile::tempdir()?;
        let files = extract_tar(&archive[..], TarCompression::Gzip, dir.path(), &Limits::default())?;
        anyhow::ensure!(files.len() == 2, "{files:?}");
        anyhow::ensure!(fs::read(dir.path().join("mods/b.jar"))? == b"second");
        // Junk after the last member is an error, as after a zstd frame.
        archive.extend_from_slice(b"junk");
        let junk = tempfile::tempdir()?;
        let result = extract_tar(&archive[..], TarCompression::Gzip, junk.path(), &Limits::default());
        anyhow::ensure!(matches!(result, Err(ExtractError::Corrupt { .. })), "{result:?}");
        Ok(())
    }

    #[test]
    fn an_error_of_the_writing_thread_is_the_error_returned_and_stops_the_reading_side() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let blocker = dir.path().join("mods");
        fs::write(&blocker, b"a file where the archive needs a directory")?;
        let mut sent = 0u64;
        let result: Result<(), ExtractError> = with_disk(dir.path(), |disk| {
            disk.send(Op::File(blocker.join("a.jar")))?;
            // The reading side goes on until a send fails: the writer stopped. Bounded, so a writer that
            // never stops fails the count below instead of hanging the test.
            for _ in 0..CHUNKS_IN_FLIGHT * 4 {
                disk.send(Op::Data(vec![1; CHUNK], CHUNK))?;
                sent += 1;
            }
            Ok(())
        });
        match result {
            Err(ExtractError::Write { path, source }) => {
                anyhow::ensure!(path == blocker, "the error names {}", path.display());
                anyhow::ensure!(source.kind() != io::ErrorKind::Other, "the reading side's error won: {source}");
            }
            other => anyhow::bail!("expected the writer's error, got {other:?}"),
        }
        anyhow::ensure!(sent <= CHUNKS_IN_FLIGHT as u64 + 1, "{sent} chunks sent after the writer stopped");
        Ok(())
    }
}
