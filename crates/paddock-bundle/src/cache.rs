//! The local bundle cache: complete, verified archives by digest, size-capped with LRU
//! eviction, shared safely by concurrent fetchers in one process and across processes.
//!
//! Layout under the cache directory (default [`DEFAULT_CACHE_DIR`]):
//!
//! ```text
//! sha256/<hex>.tar.zst   complete, verified bundles (appear only by atomic rename)
//! partial/<hex>.part     a download in progress or interrupted (resumed next time)
//! locks/<hex>.lock       one lock file per digest: held (flock) by whoever downloads it
//! evict.lock             held (flock) while evicting
//! ```
//!
//! A reader never sees partial data: a bundle is written under `partial/`, verified, then
//! renamed into `sha256/`. The last access time is the bundle file's mtime, set by the cache
//! on every hit; eviction removes the least recently used bundles until the total fits the
//! cap (the bundle just inserted is never evicted, even when it alone is over the cap).
//! Lookups return an open file, so eviction by another process cannot pull a bundle from
//! under a reader. `flock` locks belong to open file descriptions, so two fetchers in one
//! process exclude each other exactly as two processes do.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::digest::{Digest, digest_reader};
use crate::error::BundleError;

/// Where bundles are cached unless configured otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/paddock/bundles";

/// The default cap on the cache's total size: 10 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 10 << 30;

/// A digest-addressed, size-capped bundle cache in a directory.
#[derive(Debug, Clone)]
pub struct BundleCache {
    dir: PathBuf,
    max_bytes: u64,
}

/// A verified bundle in the cache, opened for reading.
#[derive(Debug)]
pub struct CachedBundle {
    /// Its digest.
    pub digest: Digest,
    /// Its path (may be evicted later; `file` stays readable).
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The open file, positioned at the start.
    pub file: File,
}

/// One bundle in the cache, as listed by [`BundleCache::entries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When the cache last handed it out.
    pub last_access: SystemTime,
}

/// A held per-digest lock (released on drop).
#[derive(Debug)]
pub(crate) struct DigestLock {
    _file: File,
}

impl BundleCache {
    /// A cache in `dir` (created if missing) holding at most `max_bytes` of bundles.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, BundleError> {
        let dir = dir.into();
        for sub in ["sha256", "partial", "locks"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p)
                .map_err(|e| BundleError::io(format!("create cache dir {}", p.display()), e))?;
        }
        Ok(BundleCache { dir, max_bytes })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size cap in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Where the complete bundle with this digest lives (whether or not it is there).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("sha256")
            .join(format!("{}.tar.zst", digest.to_hex()))
    }

    /// Where a download of this digest in progress is kept.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("partial")
            .join(format!("{}.part", digest.to_hex()))
    }

    /// The cached bundle, opened, with its access time updated; `None` when absent.
    pub fn get(&self, digest: &Digest) -> Result<Option<CachedBundle>, BundleError> {
        let path = self.path_of(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BundleError::io(format!("open {}", path.display()), e)),
        };
        let size = file
            .metadata()
            .map_err(|e| BundleError::io(format!("stat {}", path.display()), e))?
            .len();
        // The access time is the mtime, which only the cache sets (atime is often off).
        file.set_modified(SystemTime::now())
            .map_err(|e| BundleError::io(format!("touch {}", path.display()), e))?;
        Ok(Some(CachedBundle {
            digest: *digest,
            path,
            size,
            file,
        }))
    }

    /// Whether the bundle is cached (does not count as an access).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path_of(digest).is_file()
    }

    /// Copies `src` into the cache as the bundle `digest`, verifying it on the way
    /// (`BUNDLE_HASH_MISMATCH` and nothing cached otherwise). Used to seed the cache with a
    /// bundle packed on this machine.
    pub async fn insert_file(
        &self,
        digest: &Digest,
        src: &Path,
    ) -> Result<CachedBundle, BundleError> {
        let _lock = self.lock_digest(digest).await?;
        if let Some(hit) = self.get(digest)? {
            return Ok(hit);
        }
        let partial = self.partial_path(digest);
        let (src, part) = (src.to_path_buf(), partial.clone());
        let got = tokio::task::spawn_blocking(move || -> Result<Digest, BundleError> {
            fs::copy(&src, &part).map_err(|e| {
                BundleError::io(format!("copy {} into the cache", src.display()), e)
            })?;
            let f = File::open(&part)
                .map_err(|e| BundleError::io(format!("open {}", part.display()), e))?;
            let (d, _) = digest_reader(f)
                .map_err(|e| BundleError::io(format!("read {}", part.display()), e))?;
            Ok(d)
        })
        .await
        .map_err(|e| BundleError::io("cache insert task", io::Error::other(e.to_string())))??;
        if let Err(e) = got.check(digest) {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
        self.commit(digest, &partial)
    }

    /// Every cached bundle, least recently used first.
    pub fn entries(&self) -> Result<Vec<CacheEntry>, BundleError> {
        let dir = self.dir.join("sha256");
        let mut out = Vec::new();
        let rd = fs::read_dir(&dir)
            .map_err(|e| BundleError::io(format!("list {}", dir.display()), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| BundleError::io(format!("list {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".tar.zst")) else {
                continue;
            };
            let Ok(digest) = hex.parse::<Digest>() else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(BundleError::io(format!("stat {hex}"), e)),
            };
            out.push(CacheEntry {
                digest,
                size: meta.len(),
                last_access: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        out.sort_by(|a, b| {
            a.last_access
                .cmp(&b.last_access)
                .then(a.digest.cmp(&b.digest))
        });
        Ok(out)
    }

    /// Total size of the cached bundles.
    pub fn total_size(&self) -> Result<u64, BundleError> {
        Ok(self.entries()?.iter().map(|e| e.size).sum())
    }

    /// Removes least recently used bundles (never `keep`) until the total fits the cap;
    /// returns the evicted digests. Holds the cache-wide eviction lock meanwhile.
    pub fn evict(&self, keep: Option<&Digest>) -> Result<Vec<Digest>, BundleError> {
        let lock_path = self.dir.join("evict.lock");
        let lock = open_lock_file(&lock_path)?;
        lock.lock()
            .map_err(|e| BundleError::io(format!("lock {}", lock_path.display()), e))?;
        let entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        let mut evicted = Vec::new();
        for e in entries {
            if total <= self.max_bytes {
                break;
            }
            if Some(&e.digest) == keep {
                continue;
            }
            match fs::remove_file(self.path_of(&e.digest)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(BundleError::io(format!("evict {}", e.digest), err));
                }
            }
            tracing::debug!(digest = %e.digest, size = e.size, "evicted bundle from cache");
            total = total.saturating_sub(e.size);
            evicted.push(e.digest);
        }
        Ok(evicted)
    }

    /// Takes the per-digest lock (waits for another holder, in this or another process).
    pub(crate) async fn lock_digest(&self, digest: &Digest) -> Result<DigestLock, BundleError> {
        let path = self
            .dir
            .join("locks")
            .join(format!("{}.lock", digest.to_hex()));
        let file = open_lock_file(&path)?;
        let file = match file.try_lock() {
            Ok(()) => file,
            Err(_) => tokio::task::spawn_blocking(move || {
                file.lock()
                    .map(|()| file)
                    .map_err(|e| BundleError::io(format!("lock {}", path.display()), e))
            })
            .await
            .map_err(|e| BundleError::io("lock task", io::Error::other(e.to_string())))??,
        };
        Ok(DigestLock { _file: file })
    }

    /// Moves a verified partial download into place, evicts over the cap and opens it.
    pub(crate) fn commit(
        &self,
        digest: &Digest,
        partial: &Path,
    ) -> Result<CachedBundle, BundleError> {
        let path = self.path_of(digest);
        fs::rename(partial, &path)
            .map_err(|e| BundleError::io(format!("move {} into the cache", digest), e))?;
        let hit = self.get(digest)?.ok_or_else(|| {
            BundleError::io(
                format!("open {}", path.display()),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })?;
        self.evict(Some(digest))?;
        Ok(hit)
    }
}

fn open_lock_file(path: &Path) -> Result<File, BundleError> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| BundleError::io(format!("open lock {}", path.display()), e))
}
