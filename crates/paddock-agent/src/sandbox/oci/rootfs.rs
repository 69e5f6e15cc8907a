//! The root file system of a container: the host view (an empty, read-only root with the
//! [`policy::root_entries`] of the host bound into it and its top-level symlinks
//! recreated), a `rootfs` directory used as is, or a tarball extracted once into a cache;
//! and handing the work directory to the sandbox user.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use paddock_proto::now_ms;

use super::super::policy::{self, RootEntry};
use super::fnv1a;
use super::runtime::clean_command;

/// Mount points created in a root this backend builds (host view, extracted tarballs).
const MOUNT_POINTS: &[&str] = &["proc", "dev", "tmp", "work"];

/// Makes `path` and everything below it (not following symlinks) owned by `uid:gid`.
pub(super) fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut stack = vec![path.to_path_buf()];
    while let Some(current) = stack.pop() {
        std::os::unix::fs::lchown(&current, Some(uid), Some(gid))?;
        let meta = fs::symlink_metadata(&current)?;
        if meta.is_dir() {
            for entry in fs::read_dir(&current)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Creates the empty root of the host view: symlinks for the host's top-level links, mount
/// points for the bound directories and the fresh mounts. Returns the directories to bind.
pub(super) fn build_host_view(root: &Path) -> io::Result<Vec<String>> {
    fs::DirBuilder::new().mode(0o755).create(root)?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
    let mut dirs = Vec::new();
    for entry in policy::root_entries(Path::new("/")) {
        match entry {
            RootEntry::Dir(name) => {
                fs::DirBuilder::new().mode(0o755).create(root.join(&name))?;
                dirs.push(name);
            }
            RootEntry::Link(name, target) => {
                std::os::unix::fs::symlink(&target, root.join(&name))?;
            }
        }
    }
    for name in MOUNT_POINTS {
        create_mount_point(&root.join(name))?;
    }
    Ok(dirs)
}

/// Creates a mount point directory. `tmp` gets mode 1777: runc gives a tmpfs the mode of
/// the directory it is mounted on, whatever the `mode=` option says.
fn create_mount_point(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(path)?;
    if path.file_name().is_some_and(|n| n == "tmp") {
        fs::set_permissions(path, fs::Permissions::from_mode(0o1777))?;
    }
    Ok(())
}

/// The root directory for a `rootfs` request: the directory itself, or the extraction of a
/// tarball (cached).
pub(super) fn resolve_rootfs(path: &Path, cache: &Path) -> Result<PathBuf, String> {
    let meta = fs::metadata(path).map_err(|err| format!("rootfs {}: {err}", path.display()))?;
    if meta.is_dir() {
        return std::path::absolute(path)
            .map_err(|err| format!("rootfs {}: {err}", path.display()));
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    [".tar.gz", ".tgz", ".tar"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
        .ok_or_else(|| {
            format!(
                "rootfs {} is neither a directory nor a .tar, .tar.gz or .tgz file",
                path.display()
            )
        })?;
    let canonical =
        fs::canonicalize(path).map_err(|err| format!("rootfs {}: {err}", path.display()))?;
    let digest = tarball_digest(&canonical, &meta, cache)?;
    let dest = cache.join(format!("sha256-{digest}"));
    if dest.is_dir() {
        return Ok(dest);
    }
    extract_tarball(&canonical, cache, &dest)?;
    Ok(dest)
}

/// The SHA-256 of a tarball, the key of the extraction cache: identical tarballs share one
/// extraction wherever they live, and changed content gets a new one. The digest is
/// remembered per file identity ([`rootfs_cache_key`]) next to the cache, so an unchanged
/// tarball is hashed once, not on every run.
fn tarball_digest(canonical: &Path, meta: &fs::Metadata, cache: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let memo_dir = cache.with_file_name("rootfs-digests");
    let memo = memo_dir.join(format!("{:016x}", rootfs_cache_key(canonical, meta)));
    if let Ok(known) = fs::read_to_string(&memo)
        && known.len() == 64
        && known.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(known);
    }
    let mut file = fs::File::open(canonical)
        .map_err(|err| format!("rootfs {}: {err}", canonical.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|err| format!("reading {}: {err}", canonical.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hex::encode(hasher.finalize());
    if fs::create_dir_all(&memo_dir).is_ok() {
        let tmp = memo.with_extension("tmp");
        if fs::write(&tmp, &digest).is_ok() {
            let _ = fs::rename(&tmp, &memo);
        }
    }
    Ok(digest)
}

/// Identity of a tarball file (canonical path, size, mtime, inode, device): the key under
/// which its digest is remembered.
fn rootfs_cache_key(canonical: &Path, meta: &fs::Metadata) -> u64 {
    let mut key = canonical.as_os_str().as_encoded_bytes().to_vec();
    for n in [
        meta.len(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.ino(),
        meta.dev(),
    ] {
        key.extend_from_slice(&n.to_le_bytes());
    }
    fnv1a(&key)
}

/// Extracts `tarball` into a temporary directory of `cache`, adds the mount points and
/// renames it to `dest` (another run may have won the race: then its result is used).
fn extract_tarball(tarball: &Path, cache: &Path, dest: &Path) -> Result<(), String> {
    let tmp = cache.join(format!(
        ".extract-{}-{}-{}",
        std::process::id(),
        now_ms(),
        fnv1a(dest.as_os_str().as_encoded_bytes())
    ));
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(|err| format!("cannot create {}: {err}", tmp.display()))?;
    let result = (|| {
        let out = clean_command("tar")
            .arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(&tmp)
            .arg("--numeric-owner")
            .output()
            .map_err(|err| format!("cannot run tar: {err}"))?;
        if !out.status.success() {
            return Err(format!(
                "extracting {} failed: {}",
                tarball.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
            .map_err(|err| format!("chmod {}: {err}", tmp.display()))?;
        for name in MOUNT_POINTS {
            let point = tmp.join(name);
            if fs::symlink_metadata(&point).is_err() {
                create_mount_point(&point)
                    .map_err(|err| format!("cannot create {}: {err}", point.display()))?;
            }
        }
        match fs::rename(&tmp, dest) {
            Ok(()) => Ok(()),
            Err(_) if dest.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(err) => Err(format!("cannot rename to {}: {err}", dest.display())),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}
