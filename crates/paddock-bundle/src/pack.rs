//! Deterministic packing: a directory tree to `tar` + `zstd`, with the same bytes (and so the
//! same SHA-256) for the same tree, whoever packs it and whenever.
//!
//! The archive format (version 1, documented in the crate docs): GNU tar headers, entries in
//! byte order of their paths (a directory before its contents), paths relative to the tree
//! root without a leading `./`, mtime 0, uid/gid 0, empty owner names, mode 0755 for
//! directories and for files with any execute bit, 0644 for other files, 0777 for symbolic
//! links; then one zstd frame (level 3 by default, with a content checksum). Symbolic links
//! are kept as links when their target is relative and stays inside the tree
//! ([`crate::tree_path`]); anything else that is not a file or a directory is refused.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, HashingWriter};
use crate::error::BundleError;
use crate::tree_path::link_target_stays_inside;

/// The zstd level used unless told otherwise.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// A packed bundle in a temporary file (deleted when this is dropped).
#[derive(Debug)]
pub struct PackedBundle {
    /// The archive.
    pub file: tempfile::NamedTempFile,
    /// SHA-256 of the archive bytes.
    pub digest: Digest,
    /// Size of the archive in bytes.
    pub size: u64,
    /// Number of entries (files, directories, links) packed.
    pub entries: u64,
}

impl PackedBundle {
    /// Where the archive is.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// Packs `dir` into a temporary file in the system temp directory.
pub fn pack(dir: &Path) -> Result<PackedBundle, BundleError> {
    pack_in(dir, &std::env::temp_dir(), DEFAULT_ZSTD_LEVEL)
}

/// Packs `dir` into a temporary file created in `tmp_dir`, at zstd `level`.
pub fn pack_in(dir: &Path, tmp_dir: &Path, level: i32) -> Result<PackedBundle, BundleError> {
    let file = tempfile::Builder::new()
        .prefix(".paddock-bundle-")
        .suffix(".tar.zst")
        .tempfile_in(tmp_dir)
        .map_err(|e| BundleError::io(format!("create temp file in {}", tmp_dir.display()), e))?;
    let out = std::io::BufWriter::with_capacity(1 << 20, file.as_file());
    let (digest, size, entries) = pack_to(dir, out, level)?;
    Ok(PackedBundle {
        file,
        digest,
        size,
        entries,
    })
}

/// Packs `dir` into `out`; returns the digest and size of what was written and the entry
/// count.
pub fn pack_to<W: Write>(
    dir: &Path,
    out: W,
    level: i32,
) -> Result<(Digest, u64, u64), BundleError> {
    let meta = fs::metadata(dir).map_err(|e| pack_err(dir, e.to_string()))?;
    if !meta.is_dir() {
        return Err(pack_err(dir, "not a directory"));
    }
    let mut encoder = zstd::Encoder::new(HashingWriter::new(out), level)
        .map_err(|e| BundleError::io("start zstd encoder", e))?;
    encoder
        .include_checksum(true)
        .map_err(|e| BundleError::io("configure zstd encoder", e))?;
    let mut builder = tar::Builder::new(encoder);
    let mut entries = 0u64;
    append_dir_contents(&mut builder, dir, Path::new(""), &mut entries)?;
    let encoder = builder
        .into_inner()
        .map_err(|e| BundleError::io("finish tar stream", e))?;
    let hashing = encoder
        .finish()
        .map_err(|e| BundleError::io("finish zstd stream", e))?;
    let (mut out, digest, size) = hashing.finish();
    out.flush()
        .map_err(|e| BundleError::io("flush bundle output", e))?;
    Ok((digest, size, entries))
}

fn pack_err(path: &Path, reason: impl Into<String>) -> BundleError {
    BundleError::Pack {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn sorted_names(dir: &Path) -> Result<Vec<OsString>, BundleError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| pack_err(dir, e.to_string()))? {
        names.push(entry.map_err(|e| pack_err(dir, e.to_string()))?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn append_dir_contents<W: Write>(
    builder: &mut tar::Builder<W>,
    abs: &Path,
    rel: &Path,
    entries: &mut u64,
) -> Result<(), BundleError> {
    for name in sorted_names(abs)? {
        let abs_child = abs.join(&name);
        let rel_child: PathBuf = rel.join(&name);
        let meta =
            fs::symlink_metadata(&abs_child).map_err(|e| pack_err(&abs_child, e.to_string()))?;
        let ft = meta.file_type();
        let append_err =
            |e: std::io::Error| BundleError::io(format!("pack {}", rel_child.display()), e);
        *entries += 1;
        if ft.is_dir() {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            builder
                .append_data(&mut h, &rel_child, std::io::empty())
                .map_err(append_err)?;
            append_dir_contents(builder, &abs_child, &rel_child, entries)?;
        } else if ft.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let len = meta.len();
            let mut h = header(tar::EntryType::Regular, mode, len);
            let f = File::open(&abs_child).map_err(|e| pack_err(&abs_child, e.to_string()))?;
            // `take` so a file growing while we read cannot desynchronise the stream; a
            // file shrinking makes `append_data` fail.
            builder
                .append_data(&mut h, &rel_child, f.take(len))
                .map_err(append_err)?;
        } else if ft.is_symlink() {
            let target =
                fs::read_link(&abs_child).map_err(|e| pack_err(&abs_child, e.to_string()))?;
            if !link_target_stays_inside(&rel_child, &target) {
                return Err(BundleError::LinkEscape {
                    path: rel_child.display().to_string(),
                    target: target.display().to_string(),
                });
            }
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            builder
                .append_link(&mut h, &rel_child, &target)
                .map_err(append_err)?;
        } else {
            let kind = if ft.is_block_device() {
                "block device"
            } else if ft.is_char_device() {
                "character device"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else {
                "unknown file type"
            };
            return Err(BundleError::SpecialFile {
                path: rel_child.display().to_string(),
                kind: kind.to_string(),
            });
        }
    }
    Ok(())
}
