//! Unpacking a bundle that may be hostile.
//!
//! The archive is read once, as a stream: the compressed bytes are hashed (for
//! [`unpack_verified`]) and counted, the decompressed bytes are counted against a total and a
//! ratio, and each tar entry is checked before anything is written:
//!
//! | refused | code |
//! |---|---|
//! | absolute path | `BUNDLE_PATH_ABSOLUTE` |
//! | any `..` component | `BUNDLE_PATH_TRAVERSAL` |
//! | symlink target absolute, or climbing past the root ([`crate::tree_path`]); hard link to anything but a file unpacked earlier; writing through a link | `BUNDLE_LINK_ESCAPE` |
//! | block/char device, FIFO, sparse or unknown entry type | `BUNDLE_SPECIAL_FILE` |
//! | an entry (or a long-name/PAX header) over its size limit | `BUNDLE_ENTRY_TOO_LARGE` |
//! | more entries than allowed | `BUNDLE_TOO_MANY_ENTRIES` |
//! | decompressed size over the total, or over `max_ratio` times the compressed size | `BUNDLE_DECOMPRESSION_BOMB` |
//! | undecodable zstd or tar, duplicate entries, trailing garbage | `BUNDLE_CORRUPT` |
//! | SHA-256 of the compressed stream not the expected one | `BUNDLE_HASH_MISMATCH` |
//!
//! Writing is safe against links planted by earlier entries: every directory on the way to an
//! entry must be one this unpacker created (it keeps the set), never a link or a file, and
//! files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`. Everything goes into a fresh
//! private directory beside `dest`, renamed onto `dest` only when the whole archive (and its
//! digest) checked out, so a refusal leaves nothing behind. The tar crate's own long-name
//! and PAX handling is bypassed (`raw` entries) because it reads those headers into memory
//! without a bound; here they are capped at [`MAX_META_ENTRY`] bytes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::digest::{Digest, Hasher};
use crate::error::BundleError;
use crate::tree_path::{PathProblem, link_target_stays_inside, normalise_entry};

/// Largest GNU long-name / long-link or PAX extension header accepted.
pub const MAX_META_ENTRY: u64 = 64 * 1024;

/// What an unpack may consume. The defaults suit workflow bundles (sources, scripts,
/// lockfiles, a few binaries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Most entries (files, directories, links, extension headers).
    pub max_entries: u64,
    /// Largest single file.
    pub max_entry_size: u64,
    /// Most decompressed bytes (the whole tar stream, headers and padding included).
    pub max_total_size: u64,
    /// Largest allowed decompressed/compressed ratio ...
    pub max_ratio: u64,
    /// ... enforced once this many bytes have been decompressed (small archives of tiny
    /// files compress far better than their contents would suggest).
    pub ratio_floor: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_entries: 200_000,
            max_entry_size: 4 << 30,
            max_total_size: 8 << 30,
            max_ratio: 250,
            ratio_floor: 64 << 20,
        }
    }
}

/// What an unpack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries read (extension headers included).
    pub entries: u64,
    /// Regular files written (hard links included).
    pub files: u64,
    /// File content bytes written.
    pub bytes: u64,
    /// Compressed bytes read.
    pub compressed: u64,
    /// Decompressed bytes read.
    pub decompressed: u64,
    /// SHA-256 of the compressed stream.
    pub digest: Digest,
}

/// Unpacks the `tar` + `zstd` stream `archive` into `dest`, which must not exist or be an
/// empty directory; its parent must exist. On error nothing is left at `dest`.
pub fn unpack<R: Read>(
    archive: R,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, BundleError> {
    unpack_inner(archive, None, dest, limits)
}

/// Like [`unpack`], and the SHA-256 of the whole compressed stream must be `expected`
/// (checked at the end of the stream, before `dest` appears): `BUNDLE_HASH_MISMATCH`
/// otherwise.
pub fn unpack_verified<R: Read>(
    archive: R,
    expected: &Digest,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, BundleError> {
    unpack_inner(archive, Some(expected), dest, limits)
}

fn unpack_inner<R: Read>(
    archive: R,
    expected: Option<&Digest>,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, BundleError> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".paddock-unpack-")
        .tempdir_in(parent)
        .map_err(|e| BundleError::io(format!("create temp dir in {}", parent.display()), e))?;
    let stats = extract(archive, tmp.path(), limits)?;
    if let Some(expected) = expected {
        stats.digest.check(expected)?;
    }
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| BundleError::io(format!("chmod {}", tmp.path().display()), e))?;
    fs::rename(tmp.path(), dest).map_err(|e| {
        BundleError::io(
            format!(
                "move unpacked bundle to {} (must not exist or be empty)",
                dest.display()
            ),
            e,
        )
    })?;
    // `tmp` now names nothing; dropping it is a no-op.
    Ok(stats)
}

/// Counters shared by the two ends of the decompressor.
struct Meter {
    compressed: u64,
    decompressed: u64,
    hasher: Hasher,
    /// Why a reader stopped, when it was a limit or the source (not the data).
    tripped: Option<BundleError>,
}

type SharedMeter = Rc<RefCell<Meter>>;

/// The compressed side: hashes and counts.
struct RawSide<R> {
    inner: R,
    meter: SharedMeter,
}

impl<R: Read> Read for RawSide<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                let mut m = self.meter.borrow_mut();
                m.compressed += n as u64;
                m.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let msg = e.to_string();
                self.meter.borrow_mut().tripped = Some(BundleError::io(
                    "read bundle",
                    io::Error::new(e.kind(), msg),
                ));
                Err(e)
            }
        }
    }
}

/// The decompressed side: enforces the total and the ratio.
struct DecodedSide<D> {
    inner: D,
    meter: SharedMeter,
    limits: UnpackLimits,
}

impl<D: Read> Read for DecodedSide<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut m = self.meter.borrow_mut();
        m.decompressed += n as u64;
        let reason = if m.decompressed > self.limits.max_total_size {
            Some(format!(
                "more than {} bytes decompressed",
                self.limits.max_total_size
            ))
        } else if m.decompressed > self.limits.ratio_floor
            && m.decompressed > m.compressed.max(1).saturating_mul(self.limits.max_ratio)
        {
            Some(format!(
                "{} bytes from {} compressed, over the {}:1 ratio",
                m.decompressed, m.compressed, self.limits.max_ratio
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            m.tripped = Some(BundleError::DecompressionBomb { reason });
            return Err(io::Error::other("decompression limit"));
        }
        Ok(n)
    }
}

/// Turns a read failure into the reason recorded by the meter, or `BUNDLE_CORRUPT`.
fn read_failure(meter: &SharedMeter, what: &str, e: io::Error) -> BundleError {
    match meter.borrow_mut().tripped.take() {
        Some(err) => err,
        None => BundleError::corrupt(format!("{what}: {e}")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Link,
}

/// The tree being written: what this unpacker created, by normalised relative path.
struct Tree<'a> {
    root: &'a Path,
    kinds: HashMap<PathBuf, Kind>,
}

impl Tree<'_> {
    /// Makes sure every ancestor of `rel` is a directory this unpacker created, creating the
    /// missing ones (archives may omit directory entries).
    fn prepare_parents(&mut self, rel: &Path) -> Result<(), BundleError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut prefix = PathBuf::new();
        for c in parent.components() {
            prefix.push(c);
            match self.kinds.get(&prefix) {
                Some(Kind::Dir) => {}
                Some(Kind::Link) => {
                    return Err(BundleError::LinkEscape {
                        path: rel.display().to_string(),
                        target: format!("(written through the link {})", prefix.display()),
                    });
                }
                Some(Kind::File) => {
                    return Err(BundleError::corrupt(format!(
                        "{} is under {}, which is a file",
                        rel.display(),
                        prefix.display()
                    )));
                }
                None => self.make_dir(&prefix)?,
            }
        }
        Ok(())
    }

    fn make_dir(&mut self, rel: &Path) -> Result<(), BundleError> {
        let abs = self.root.join(rel);
        fs::create_dir(&abs).map_err(|e| BundleError::io(format!("mkdir {}", rel.display()), e))?;
        fs::set_permissions(&abs, fs::Permissions::from_mode(0o755))
            .map_err(|e| BundleError::io(format!("chmod {}", rel.display()), e))?;
        self.kinds.insert(rel.to_path_buf(), Kind::Dir);
        Ok(())
    }

    /// Refuses a second entry at the same path (except a repeated directory).
    fn claim(&self, rel: &Path, kind: Kind) -> Result<bool, BundleError> {
        match self.kinds.get(rel) {
            None => Ok(true),
            Some(Kind::Dir) if kind == Kind::Dir => Ok(false),
            Some(_) => Err(BundleError::corrupt(format!(
                "duplicate entry {}",
                rel.display()
            ))),
        }
    }
}

fn path_error(raw: &Path, problem: PathProblem) -> BundleError {
    let path = raw.display().to_string();
    match problem {
        PathProblem::Absolute => BundleError::PathAbsolute { path },
        PathProblem::Traversal => BundleError::PathTraversal { path },
    }
}

fn trim_nul(mut b: Vec<u8>) -> Vec<u8> {
    while b.last() == Some(&0) {
        b.pop();
    }
    b
}

/// The `path`, `linkpath` and `size` records of a PAX extended header.
#[derive(Default)]
struct PaxRecords {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
}

fn parse_pax(data: &[u8]) -> Result<PaxRecords, BundleError> {
    let mut out = PaxRecords::default();
    let exts = tar::PaxExtensions::new(data);
    for ext in exts {
        let ext = ext.map_err(|e| BundleError::corrupt(format!("bad PAX header: {e}")))?;
        match ext.key_bytes() {
            b"path" => out.path = Some(ext.value_bytes().to_vec()),
            b"linkpath" => out.linkpath = Some(ext.value_bytes().to_vec()),
            b"size" => {
                let v = ext
                    .value()
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| BundleError::corrupt("bad PAX size"))?;
                out.size = Some(v);
            }
            _ => {}
        }
    }
    Ok(out)
}

fn read_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    meter: &SharedMeter,
    what: &str,
) -> Result<Vec<u8>, BundleError> {
    let size = entry.size();
    if size > MAX_META_ENTRY {
        return Err(BundleError::EntryTooLarge {
            path: format!("({what})"),
            size,
            limit: MAX_META_ENTRY,
        });
    }
    let mut data = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut data)
        .map_err(|e| read_failure(meter, what, e))?;
    Ok(data)
}

fn extract<R: Read>(
    archive: R,
    root: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, BundleError> {
    let meter: SharedMeter = Rc::new(RefCell::new(Meter {
        compressed: 0,
        decompressed: 0,
        hasher: Hasher::new(),
        tripped: None,
    }));
    let raw = RawSide {
        inner: archive,
        meter: meter.clone(),
    };
    let decoder = zstd::Decoder::new(raw).map_err(|e| read_failure(&meter, "zstd", e))?;
    let decoded = DecodedSide {
        inner: decoder,
        meter: meter.clone(),
        limits: *limits,
    };
    let mut archive = tar::Archive::new(decoded);
    let mut tree = Tree {
        root,
        kinds: HashMap::from([(PathBuf::new(), Kind::Dir)]),
    };
    let mut stats = UnpackStats {
        entries: 0,
        files: 0,
        bytes: 0,
        compressed: 0,
        decompressed: 0,
        digest: Digest::of(b""),
    };
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax = PaxRecords::default();
    let mut buf = vec![0u8; 256 * 1024];

    let mut entries = archive
        .entries()
        .map_err(|e| read_failure(&meter, "tar", e))?
        .raw(true);
    loop {
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(read_failure(&meter, "tar", e)),
        };
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(BundleError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let etype = entry.header().entry_type();
        match etype {
            tar::EntryType::GNULongName => {
                long_name = Some(trim_nul(read_meta(&mut entry, &meter, "GNU long name")?));
                continue;
            }
            tar::EntryType::GNULongLink => {
                long_link = Some(trim_nul(read_meta(&mut entry, &meter, "GNU long link")?));
                continue;
            }
            tar::EntryType::XHeader => {
                pax = parse_pax(&read_meta(&mut entry, &meter, "PAX header")?)?;
                continue;
            }
            tar::EntryType::XGlobalHeader => {
                read_meta(&mut entry, &meter, "PAX global header")?;
                continue;
            }
            _ => {}
        }
        let raw_path_bytes = match (long_name.take(), pax.path.take()) {
            (_, Some(p)) | (Some(p), None) => p,
            (None, None) => entry.header().path_bytes().into_owned(),
        };
        let raw_link_bytes = match (long_link.take(), pax.linkpath.take()) {
            (_, Some(p)) | (Some(p), None) => Some(p),
            (None, None) => entry.header().link_name_bytes().map(|b| b.into_owned()),
        };
        let size = entry.size();
        if let Some(pax_size) = pax.size.take()
            && pax_size != size
        {
            return Err(BundleError::corrupt(format!(
                "PAX size {pax_size} differs from the header's {size} (not supported)"
            )));
        }
        let raw_path = Path::new(OsStr::from_bytes(&raw_path_bytes));
        let rel = normalise_entry(raw_path).map_err(|p| path_error(raw_path, p))?;
        let shown = || rel.display().to_string();

        match etype {
            tar::EntryType::Directory => {
                if rel.as_os_str().is_empty() {
                    continue;
                }
                tree.prepare_parents(&rel)?;
                if tree.claim(&rel, Kind::Dir)? {
                    tree.make_dir(&rel)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if size > limits.max_entry_size {
                    return Err(BundleError::EntryTooLarge {
                        path: shown(),
                        size,
                        limit: limits.max_entry_size,
                    });
                }
                if rel.as_os_str().is_empty() {
                    return Err(BundleError::corrupt("file entry for the root"));
                }
                tree.prepare_parents(&rel)?;
                tree.claim(&rel, Kind::File)?;
                let executable = entry.header().mode().unwrap_or(0o644) & 0o111 != 0;
                let mode = if executable { 0o755 } else { 0o644 };
                let abs = root.join(&rel);
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&abs)
                    .map_err(|e| BundleError::io(format!("create {}", shown()), e))?;
                tree.kinds.insert(rel.clone(), Kind::File);
                let mut written = 0u64;
                loop {
                    let n = match entry.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(read_failure(&meter, "tar entry", e)),
                    };
                    file.write_all(&buf[..n])
                        .map_err(|e| BundleError::io(format!("write {}", shown()), e))?;
                    written += n as u64;
                }
                if written != size {
                    return Err(BundleError::corrupt(format!(
                        "{} truncated: {written} of {size} bytes",
                        shown()
                    )));
                }
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| BundleError::io(format!("chmod {}", shown()), e))?;
                stats.files += 1;
                stats.bytes += written;
            }
            tar::EntryType::Symlink => {
                let target_bytes = raw_link_bytes.unwrap_or_default();
                let target = Path::new(OsStr::from_bytes(&target_bytes));
                if rel.as_os_str().is_empty() || !link_target_stays_inside(&rel, target) {
                    return Err(BundleError::LinkEscape {
                        path: shown(),
                        target: target.display().to_string(),
                    });
                }
                tree.prepare_parents(&rel)?;
                tree.claim(&rel, Kind::Link)?;
                std::os::unix::fs::symlink(target, root.join(&rel))
                    .map_err(|e| BundleError::io(format!("symlink {}", shown()), e))?;
                tree.kinds.insert(rel.clone(), Kind::Link);
            }
            tar::EntryType::Link => {
                let target_bytes = raw_link_bytes.unwrap_or_default();
                let target_raw = Path::new(OsStr::from_bytes(&target_bytes));
                let escape = || BundleError::LinkEscape {
                    path: shown(),
                    target: target_raw.display().to_string(),
                };
                let target = normalise_entry(target_raw).map_err(|_| escape())?;
                match tree.kinds.get(&target) {
                    Some(Kind::File) => {}
                    Some(Kind::Dir | Kind::Link) => return Err(escape()),
                    None => {
                        return Err(BundleError::corrupt(format!(
                            "hard link {} to {}, which is not an earlier file",
                            shown(),
                            target.display()
                        )));
                    }
                }
                if rel.as_os_str().is_empty() {
                    return Err(escape());
                }
                tree.prepare_parents(&rel)?;
                tree.claim(&rel, Kind::File)?;
                fs::hard_link(root.join(&target), root.join(&rel))
                    .map_err(|e| BundleError::io(format!("hard link {}", shown()), e))?;
                tree.kinds.insert(rel.clone(), Kind::File);
                stats.files += 1;
            }
            other => {
                let kind = match other {
                    tar::EntryType::Char => "character device".to_string(),
                    tar::EntryType::Block => "block device".to_string(),
                    tar::EntryType::Fifo => "fifo".to_string(),
                    tar::EntryType::GNUSparse => "sparse file".to_string(),
                    o => format!("entry type {:?}", o.as_byte() as char),
                };
                return Err(BundleError::SpecialFile {
                    path: shown(),
                    kind,
                });
            }
        }
    }
    // Read to the end: the tar's trailing blocks, any further zstd frames (counted against
    // the limits) and the end of the raw stream, so the digest covers every byte and
    // trailing garbage is refused.
    let mut rest = archive.into_inner();
    loop {
        match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_failure(&meter, "end of stream", e)),
        }
    }
    let DecodedSide { inner, .. } = rest;
    let mut raw = inner.finish().into_inner();
    loop {
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {
                return Err(BundleError::corrupt("trailing bytes after the zstd stream"));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_failure(&meter, "end of stream", e)),
        }
    }
    let m = meter.borrow();
    stats.compressed = m.compressed;
    stats.decompressed = m.decompressed;
    stats.digest = m.hasher.clone().finish();
    Ok(stats)
}
