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
//!
//! Partial downloads count toward the cap. One is only ever written by the holder of its
//! digest's lock, so a partial whose lock can be taken is an interrupted download: opening
//! the cache and every eviction pass remove those older than
//! [`CacheOptions::partial_max_age`] (default [`DEFAULT_PARTIAL_MAX_AGE`]), and eviction
//! removes younger ones too, in the same LRU order as bundles (their mtime is their last
//! write), when the cap needs it. A partial being written (its lock held) is never removed.
//! Lookups return an open file, so eviction by another process cannot pull a bundle from
//! under a reader. `flock` locks belong to open file descriptions, so two fetchers in one
//! process exclude each other exactly as two processes do.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::digest::{Digest, digest_reader};
use crate::error::BundleError;

/// Where bundles are cached unless configured otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/paddock/bundles";

/// The default cap on the cache's total size: 10 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 10 << 30;

/// How long an interrupted download is kept for resuming unless configured otherwise: 24 h.
pub const DEFAULT_PARTIAL_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The bounds of a [`BundleCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// Cap on the total size of cached bundles and partial downloads, in bytes.
    pub max_bytes: u64,
    /// A partial download not written for this long, and not being written, is removed.
    pub partial_max_age: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            partial_max_age: DEFAULT_PARTIAL_MAX_AGE,
        }
    }
}

/// A digest-addressed, size-capped bundle cache in a directory.
#[derive(Debug, Clone)]
pub struct BundleCache {
    dir: PathBuf,
    opts: CacheOptions,
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

/// One partial download in the cache, as listed by [`BundleCache::partials`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialEntry {
    /// The digest being downloaded.
    pub digest: Digest,
    /// Bytes downloaded so far.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// A held per-digest lock (released on drop).
#[derive(Debug)]
pub(crate) struct DigestLock {
    _file: File,
}

impl BundleCache {
    /// A cache in `dir` (created if missing) holding at most `max_bytes` of bundles and
    /// partial downloads, with the other options at their defaults.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, BundleError> {
        Self::with_options(
            dir,
            CacheOptions {
                max_bytes,
                ..CacheOptions::default()
            },
        )
    }

    /// A cache in `dir` (created if missing) bounded by `opts`. Removes the stale partial
    /// downloads it finds (see the module docs).
    pub fn with_options(dir: impl Into<PathBuf>, opts: CacheOptions) -> Result<Self, BundleError> {
        let dir = dir.into();
        for sub in ["sha256", "partial", "locks"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p)
                .map_err(|e| BundleError::io(format!("create cache dir {}", p.display()), e))?;
        }
        let cache = BundleCache { dir, opts };
        cache.remove_stale_partials()?;
        Ok(cache)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size cap in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.opts.max_bytes
    }

    /// The options the cache was opened with.
    pub fn options(&self) -> CacheOptions {
        self.opts
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

    /// The files `<digest hex><suffix>` of the cache's subdirectory `sub`, with their size
    /// and mtime; other names, and files removed meanwhile, are skipped.
    fn list(&self, sub: &str, suffix: &str) -> Result<Vec<(Digest, u64, SystemTime)>, BundleError> {
        let dir = self.dir.join(sub);
        let mut out = Vec::new();
        let rd = fs::read_dir(&dir)
            .map_err(|e| BundleError::io(format!("list {}", dir.display()), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| BundleError::io(format!("list {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(suffix)) else {
                continue;
            };
            let Ok(digest) = hex.parse::<Digest>() else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(BundleError::io(format!("stat {sub}/{hex}"), e)),
            };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((digest, meta.len(), modified));
        }
        out.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Every cached bundle, least recently used first.
    pub fn entries(&self) -> Result<Vec<CacheEntry>, BundleError> {
        Ok(self
            .list("sha256", ".tar.zst")?
            .into_iter()
            .map(|(digest, size, last_access)| CacheEntry {
                digest,
                size,
                last_access,
            })
            .collect())
    }

    /// Every partial download (in progress or interrupted), least recently written first.
    pub fn partials(&self) -> Result<Vec<PartialEntry>, BundleError> {
        Ok(self
            .list("partial", ".part")?
            .into_iter()
            .map(|(digest, size, modified)| PartialEntry {
                digest,
                size,
                modified,
            })
            .collect())
    }

    /// Total size of what counts toward the cap: cached bundles and partial downloads.
    pub fn total_size(&self) -> Result<u64, BundleError> {
        let bundles: u64 = self.entries()?.iter().map(|e| e.size).sum();
        let partials: u64 = self.partials()?.iter().map(|p| p.size).sum();
        Ok(bundles + partials)
    }

    /// Removes the partial downloads older than the options' `partial_max_age` that nobody
    /// is writing (their digest's lock is free); returns their digests.
    pub fn remove_stale_partials(&self) -> Result<Vec<Digest>, BundleError> {
        let now = SystemTime::now();
        let is_stale = |modified: SystemTime| {
            now.duration_since(modified).unwrap_or_default() >= self.opts.partial_max_age
        };
        let mut removed = Vec::new();
        for p in self.partials()? {
            if !is_stale(p.modified) {
                continue;
            }
            if self.remove_partial_if(&p.digest, is_stale)? {
                tracing::debug!(digest = %p.digest, size = p.size, "removed stale partial download");
                removed.push(p.digest);
            }
        }
        Ok(removed)
    }

    /// Removes the partial download of `digest` if its lock is free and, checked under the
    /// lock, its mtime passes `cond`. Whether it was removed.
    fn remove_partial_if(
        &self,
        digest: &Digest,
        cond: impl Fn(SystemTime) -> bool,
    ) -> Result<bool, BundleError> {
        // Held by a fetch: it is being written (or about to be resumed).
        let Some(_lock) = self.try_lock_digest(digest)? else {
            return Ok(false);
        };
        let path = self.partial_path(digest);
        let modified = match fs::metadata(&path) {
            Ok(m) => m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(BundleError::io(format!("stat {}", path.display()), e)),
        };
        // Written since it was listed: a fetch came and went.
        if !cond(modified) {
            return Ok(false);
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BundleError::io(format!("remove {}", path.display()), e)),
        }
    }

    /// Removes stale partial downloads, then least recently used bundles (never `keep`) and
    /// partial downloads nobody is writing, until the total fits the cap; returns the
    /// evicted bundles' digests. Holds the cache-wide eviction lock meanwhile.
    pub fn evict(&self, keep: Option<&Digest>) -> Result<Vec<Digest>, BundleError> {
        let lock_path = self.dir.join("evict.lock");
        let lock = open_lock_file(&lock_path)?;
        lock.lock()
            .map_err(|e| BundleError::io(format!("lock {}", lock_path.display()), e))?;
        self.remove_stale_partials()?;
        let bundles = self.entries()?;
        let partials = self.partials()?;
        let mut total: u64 = bundles.iter().map(|e| e.size).sum::<u64>()
            + partials.iter().map(|p| p.size).sum::<u64>();
        // One LRU order over both: a bundle's last use, a partial's last write.
        let mut candidates: Vec<(SystemTime, Digest, u64, bool)> = bundles
            .iter()
            .map(|e| (e.last_access, e.digest, e.size, false))
            .chain(
                partials
                    .iter()
                    .map(|p| (p.modified, p.digest, p.size, true)),
            )
            .collect();
        candidates.sort();
        let mut evicted = Vec::new();
        for (_, digest, size, is_partial) in candidates {
            if total <= self.opts.max_bytes {
                break;
            }
            if is_partial {
                if self.remove_partial_if(&digest, |_| true)? {
                    tracing::debug!(%digest, size, "evicted partial download from cache");
                    total = total.saturating_sub(size);
                }
                continue;
            }
            if Some(&digest) == keep {
                continue;
            }
            match fs::remove_file(self.path_of(&digest)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(BundleError::io(format!("evict {digest}"), err));
                }
            }
            tracing::debug!(%digest, size, "evicted bundle from cache");
            total = total.saturating_sub(size);
            evicted.push(digest);
        }
        Ok(evicted)
    }

    fn lock_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("locks")
            .join(format!("{}.lock", digest.to_hex()))
    }

    /// Takes the per-digest lock if nobody holds it; `None` when someone does.
    fn try_lock_digest(&self, digest: &Digest) -> Result<Option<DigestLock>, BundleError> {
        let path = self.lock_path(digest);
        let file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(DigestLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(BundleError::io(format!("lock {}", path.display()), e))
            }
        }
    }

    /// Takes the per-digest lock (waits for another holder, in this or another process).
    pub(crate) async fn lock_digest(&self, digest: &Digest) -> Result<DigestLock, BundleError> {
        let path = self.lock_path(digest);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    /// Writes `len` bytes as `path`, last modified `age` ago.
    fn write_aged(path: &Path, len: usize, age: Duration) {
        fs::write(path, vec![7u8; len]).unwrap();
        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    /// Holds `digest`'s lock the way a fetch writing its partial does (another open file
    /// description, as another process would).
    fn hold_lock(cache: &BundleCache, digest: &Digest) -> File {
        let f = open_lock_file(&cache.lock_path(digest)).unwrap();
        f.lock().unwrap();
        f
    }

    #[test]
    fn opening_removes_old_unlocked_partials_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BundleCache::new(dir.path(), 1 << 30).unwrap();
        let (old, fresh, locked) = (digest(1), digest(2), digest(3));
        write_aged(&cache.partial_path(&old), 100, 25 * HOUR);
        write_aged(&cache.partial_path(&fresh), 100, HOUR);
        write_aged(&cache.partial_path(&locked), 100, 48 * HOUR);
        let _writer = hold_lock(&cache, &locked);

        let reopened = BundleCache::new(dir.path(), 1 << 30).unwrap();
        assert_eq!(reopened.options().partial_max_age, DEFAULT_PARTIAL_MAX_AGE);
        assert!(!cache.partial_path(&old).exists(), "old, unlocked: removed");
        assert!(
            cache.partial_path(&fresh).exists(),
            "fresh: kept for resuming"
        );
        assert!(
            cache.partial_path(&locked).exists(),
            "being written: never removed"
        );
        let left: Vec<Digest> = reopened
            .partials()
            .unwrap()
            .iter()
            .map(|p| p.digest)
            .collect();
        assert_eq!(left, vec![locked, fresh], "least recently written first");
    }

    #[test]
    fn the_max_age_is_an_option_and_eviction_applies_it() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CacheOptions {
            max_bytes: 1 << 30,
            partial_max_age: Duration::from_secs(60),
        };
        let cache = BundleCache::with_options(dir.path(), opts).unwrap();
        let (old, fresh) = (digest(1), digest(2));
        write_aged(&cache.partial_path(&old), 10, Duration::from_secs(120));
        write_aged(&cache.partial_path(&fresh), 10, Duration::from_secs(5));
        // The eviction pass (after every insert) sweeps too, without reopening.
        assert_eq!(cache.evict(None).unwrap(), Vec::<Digest>::new());
        assert!(!cache.partial_path(&old).exists());
        assert!(cache.partial_path(&fresh).exists());
        assert_eq!(cache.remove_stale_partials().unwrap(), Vec::<Digest>::new());
    }

    #[test]
    fn partials_count_toward_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BundleCache::new(dir.path(), 3000).unwrap();
        let (bundle, writing, interrupted) = (digest(1), digest(2), digest(3));
        write_aged(&cache.path_of(&bundle), 2000, HOUR);
        write_aged(&cache.partial_path(&writing), 1500, 3 * HOUR);
        let _writer = hold_lock(&cache, &writing);
        assert_eq!(cache.total_size().unwrap(), 3500);

        // Over the cap with the partial being written: it stays, the bundle goes (though
        // the partial is older).
        assert_eq!(cache.evict(None).unwrap(), vec![bundle]);
        assert!(cache.partial_path(&writing).exists());
        assert_eq!(cache.total_size().unwrap(), 1500);

        // An interrupted partial, written before the bundle was last used, goes first.
        write_aged(&cache.path_of(&bundle), 1000, HOUR);
        write_aged(&cache.partial_path(&interrupted), 1000, 2 * HOUR);
        assert_eq!(cache.total_size().unwrap(), 3500);
        assert_eq!(cache.evict(None).unwrap(), Vec::<Digest>::new());
        assert!(!cache.partial_path(&interrupted).exists());
        assert!(cache.contains(&bundle));
        assert!(cache.partial_path(&writing).exists());
        assert_eq!(cache.total_size().unwrap(), 2500);
    }
}
