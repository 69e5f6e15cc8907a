//! Helpers shared by the integration tests: hostile archives from raw tar headers, trees on
//! disk, a snapshot of what exists around an unpack destination, and a small HTTP server.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Builds a tar stream entry by entry from raw headers (no path validation at all).
#[derive(Default)]
pub struct RawTar {
    pub bytes: Vec<u8>,
}

impl RawTar {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one entry with the exact `path` and `link` bytes given.
    pub fn entry(
        &mut self,
        path: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        data: &[u8],
        mode: u32,
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            assert!(path.len() <= old.name.len() && link.len() <= old.linkname.len());
            old.name[..path.len()].copy_from_slice(path);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// A header whose declared size is `size` but with no data after it (for size checks).
    pub fn header_only(&mut self, path: &[u8], kind: tar::EntryType, size: u64) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.entry(path.as_bytes(), tar::EntryType::Regular, b"", data, 0o644)
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path.as_bytes(), tar::EntryType::Directory, b"", b"", 0o755)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            path.as_bytes(),
            tar::EntryType::Symlink,
            target.as_bytes(),
            b"",
            0o777,
        )
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            path.as_bytes(),
            tar::EntryType::Link,
            target.as_bytes(),
            b"",
            0o644,
        )
    }

    /// The tar with its two zero end blocks.
    pub fn tar(&self) -> Vec<u8> {
        let mut b = self.bytes.clone();
        b.extend(std::iter::repeat_n(0u8, 1024));
        b
    }

    /// The tar, zstd-compressed.
    pub fn zst(&self) -> Vec<u8> {
        zst(&self.tar())
    }
}

pub fn zst(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A scratch area: `root/` holds `outside/secret` (which must never change), and unpacks go
/// to `root/dest`.
pub struct Arena {
    pub tmp: tempfile::TempDir,
}

impl Arena {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/secret"), b"untouched").unwrap();
        Arena { tmp }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn dest(&self) -> PathBuf {
        self.tmp.path().join("dest")
    }

    /// Asserts a refused unpack left nothing: no `dest`, no temp dir, `outside` untouched.
    pub fn assert_untouched(&self) {
        let snap = snapshot(self.root());
        let expected: BTreeMap<String, String> = [
            ("outside".to_string(), "dir".to_string()),
            ("outside/secret".to_string(), "file:untouched".to_string()),
        ]
        .into();
        assert_eq!(
            snap, expected,
            "unpack left something behind or touched outside"
        );
    }

    /// Asserts everything outside `dest` is as before (after a successful unpack).
    pub fn assert_outside_untouched(&self) {
        let snap = snapshot(self.root());
        for (k, v) in &snap {
            if k == "dest" || k.starts_with("dest/") {
                continue;
            }
            assert!(
                (k == "outside" && v == "dir") || (k == "outside/secret" && v == "file:untouched"),
                "unexpected {k}: {v}"
            );
        }
        assert_eq!(
            snap.get("outside/secret").map(String::as_str),
            Some("file:untouched")
        );
    }
}

/// Every path under `root` (relative), with its kind (`dir`, `file:<content>`, `link:<target>`).
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("link:{}", std::fs::read_link(&p).unwrap().display()),
                );
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                let data = std::fs::read(&p).unwrap();
                let shown = if data.len() <= 64 {
                    String::from_utf8_lossy(&data).into_owned()
                } else {
                    format!("{} bytes", data.len())
                };
                out.insert(rel, format!("file:{shown}"));
            }
        }
    }
    walk(root, root, &mut out);
    out
}
