//! The supervisor's files: atomic writes (temp file + rename), the per-pool state directory
//! with its lock and the persisted orphan sightings.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::reconcile::Sighting;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed,
/// then renamed over `path`. Readers see the old or the new content, never a part.
///
/// # Errors
/// I/O failure (the temporary file is removed).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Version of the sightings file.
const SIGHTINGS_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SightingsFile {
    version: u32,
    sightings: BTreeMap<String, Sighting>,
}

/// The state directory of one pool: `<state-dir>/<pool>/`.
#[derive(Debug, Clone)]
pub struct PoolDir {
    dir: PathBuf,
}

/// A held supervisor lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct PoolLock {
    _lock: Flock<std::fs::File>,
}

impl PoolDir {
    /// The directory of `pool` under `state_dir`.
    pub fn new(state_dir: &Path, pool: &str) -> PoolDir {
        PoolDir {
            dir: state_dir.join(pool),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn sightings_path(&self) -> PathBuf {
        self.dir.join(".orphans.json")
    }

    /// Takes the pool's supervisor lock (`.lock`, `flock`), so two supervisors never act
    /// on one pool from this host.
    ///
    /// # Errors
    /// Another process holds it, or I/O failure.
    pub fn lock(&self) -> std::io::Result<PoolLock> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "another supervisor holds {} (one supervisor per pool and state directory)",
                        path.display()
                    ),
                )
            } else {
                std::io::Error::from(e)
            }
        })?;
        Ok(PoolLock { _lock: lock })
    }

    /// The orphan sightings of earlier passes (empty when none were saved or the file is
    /// unreadable).
    pub fn load_sightings(&self) -> BTreeMap<String, Sighting> {
        std::fs::read(self.sightings_path())
            .ok()
            .and_then(|b| serde_json::from_slice::<SightingsFile>(&b).ok())
            .filter(|f| f.version == SIGHTINGS_VERSION)
            .map(|f| f.sightings)
            .unwrap_or_default()
    }

    /// Saves the sightings for the next pass (or the next supervisor).
    ///
    /// # Errors
    /// I/O failure.
    pub fn save_sightings(&self, sightings: &BTreeMap<String, Sighting>) -> std::io::Result<()> {
        let file = SightingsFile {
            version: SIGHTINGS_VERSION,
            sightings: sightings.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        write_atomic(&self.sightings_path(), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::OrphanKind;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/status.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("status.json")]);
    }

    #[test]
    fn sightings_round_trip_and_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let pd = PoolDir::new(dir.path(), "ci");
        assert!(pd.load_sightings().is_empty());
        let mut s = BTreeMap::new();
        s.insert(
            "i1".to_string(),
            Sighting {
                kind: OrphanKind::GatewayOnly,
                first_seen_at: 42,
            },
        );
        pd.save_sightings(&s).unwrap();
        assert_eq!(pd.load_sightings(), s);

        let held = pd.lock().unwrap();
        let err = pd.lock().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        drop(held);
        pd.lock().unwrap();
    }
}
