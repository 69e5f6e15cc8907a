//! The one writer of a SQLite file, and the write handle every store method takes.
//!
//! SQLite has one writer at a time. The store keeps that writer as a single held connection
//! behind an async mutex ([`SqliteWriter`]), so writes queue in the process instead of
//! meeting `SQLITE_BUSY` and sleeping in SQLite's busy handler, and no pool tests the
//! connection on every release (sqlx pings a pooled connection each time it is returned: one
//! more round trip to its worker thread per statement).
//!
//! The writer holds two connections to the same file under that one lock:
//! - `sqlx`, for the ordinary statements, shared with PostgreSQL through sqlx's `Any` driver;
//! - `raw`, a `rusqlite` connection for the statements on every task's path (submission,
//!   claim, completion). It runs where it is called, on the caller's thread: a sqlx statement
//!   on SQLite is a message to the connection's own thread and back, two thread wake-ups,
//!   which cost more than the statement itself (tens of microseconds each on these VMs).
//!
//! Commits never run a checkpoint (a checkpoint `fsync`s; the commits themselves do not: WAL
//! with `synchronous=NORMAL`): both writer connections have automatic checkpoints off, and a
//! background thread with its own connection checkpoints after every [`CHECKPOINT_EVERY`]
//! write transactions, in two passes: one beside the writer, which copies almost every frame
//! into the database file, then one holding the writer lock, which copies the few frames
//! written meanwhile. The WAL is then wholly in the database file when the next write
//! begins, so that write starts the WAL over from its beginning instead of appending: without
//! the second pass the WAL is never complete at that moment and grows without end (seen:
//! 1.1 GB in 20 s of round trips, the kernel zeroing each new page of it). After a long
//! burst the WAL file is cut back to [`WAL_SIZE_LIMIT`].
//!
//! On PostgreSQL the write handle is a pooled connection, as before.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};

use sqlx::AnyConnection;
use sqlx::pool::PoolConnection;

use crate::Result;

/// Write transactions between two passive checkpoints (SQLite's own default is a checkpoint
/// once the WAL holds 1,000 pages; a task's path writes a few pages per transaction).
pub(crate) const CHECKPOINT_EVERY: u32 = 256;

/// Size the WAL file is cut back to when it starts over (`journal_size_limit`).
const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// Statements kept prepared on the raw connection (the claim's text varies with the number
/// of kinds, tags and backends an agent declares).
const RAW_STATEMENT_CACHE: usize = 64;

/// Per-connection settings of a SQLite file: WAL, `synchronous=NORMAL` (a commit is durable
/// against a process crash at once and against power loss from the next checkpoint), a busy
/// timeout for the readers and other processes, foreign keys, and no memory map (it is
/// remapped in every connection each time the file grows).
pub(crate) const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON; PRAGMA mmap_size=0;";

/// The writer connections of a SQLite file; held only through [`Writer`].
pub(crate) struct SqliteWriter {
    pub(crate) sqlx: AnyConnection,
    pub(crate) raw: rusqlite::Connection,
}

/// What the store keeps for a SQLite file besides its pools.
pub(crate) struct SqliteShared {
    pub(crate) writer: Arc<tokio::sync::Mutex<SqliteWriter>>,
    checkpointer: Checkpointer,
    /// For `sqlite::memory:`: the private directory of the file standing in for it, removed
    /// with the last handle.
    _scratch: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for SqliteShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteShared").finish_non_exhaustive()
    }
}

impl SqliteShared {
    /// Opens the writer connections of `path` (created if missing, put in WAL mode) and
    /// starts the checkpointer.
    pub(crate) async fn open(
        path: &Path,
        sqlx: AnyConnection,
        scratch: Option<tempfile::TempDir>,
    ) -> Result<Arc<SqliteShared>> {
        let writer_pragmas =
            format!("PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={WAL_SIZE_LIMIT};");
        let raw = open_raw(path)?;
        raw.set_prepared_statement_cache_capacity(RAW_STATEMENT_CACHE);
        raw.execute_batch(&writer_pragmas)?;
        let mut sqlx = sqlx;
        sqlx::Executor::execute(&mut sqlx, writer_pragmas.as_str()).await?;
        let writer = Arc::new(tokio::sync::Mutex::new(SqliteWriter { sqlx, raw }));
        let checkpointer = Checkpointer::start(path.to_path_buf(), writer.clone())?;
        Ok(Arc::new(SqliteShared {
            writer,
            checkpointer,
            _scratch: scratch,
        }))
    }

    pub(crate) async fn lock(&self) -> Writer<'_> {
        Writer::Sqlite {
            guard: self.writer.lock().await,
            checkpointer: &self.checkpointer,
        }
    }
}

/// A connection of `path` with the store's settings.
pub(crate) fn open_raw(path: &Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(SQLITE_PRAGMAS)?;
    Ok(conn)
}

/// The write handle: on SQLite the writer lock (both connections), on PostgreSQL a pooled
/// connection. Derefs to the sqlx connection; [`Writer::raw`] gives the SQLite one.
pub(crate) enum Writer<'a> {
    Pooled(PoolConnection<sqlx::Any>),
    Sqlite {
        guard: tokio::sync::MutexGuard<'a, SqliteWriter>,
        checkpointer: &'a Checkpointer,
    },
}

impl Writer<'_> {
    /// The raw SQLite connection, on SQLite.
    pub(crate) fn raw(&mut self) -> Option<&mut rusqlite::Connection> {
        match self {
            Writer::Pooled(_) => None,
            Writer::Sqlite { guard, .. } => Some(&mut guard.raw),
        }
    }
}

impl Deref for Writer<'_> {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match self {
            Writer::Pooled(c) => c,
            Writer::Sqlite { guard, .. } => &guard.sqlx,
        }
    }
}

impl DerefMut for Writer<'_> {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            Writer::Pooled(c) => c,
            Writer::Sqlite { guard, .. } => &mut guard.sqlx,
        }
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        if let Writer::Sqlite { checkpointer, .. } = self {
            checkpointer.wrote();
        }
    }
}

/// Runs checkpoints on its own thread and connection, so that no commit runs one (see the
/// module's documentation for the two passes). Stops when the store is dropped.
pub(crate) struct Checkpointer {
    since: AtomicU32,
    tx: mpsc::Sender<()>,
}

impl Checkpointer {
    fn start(path: PathBuf, writer: Arc<tokio::sync::Mutex<SqliteWriter>>) -> Result<Checkpointer> {
        let conn = open_raw(&path)?;
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("paddock-checkpoint".into())
            .spawn(move || {
                // Ends when the sender (the store) is dropped.
                while rx.recv().is_ok() {
                    // Requests that arrived during a checkpoint are served by it.
                    while rx.try_recv().is_ok() {}
                    let checkpoint =
                        || conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    // Beside the writer: the bulk of the frames.
                    let mut done = checkpoint();
                    if done.is_ok() {
                        // Writes wait (in the async lock, not in SQLite) for the rest.
                        let _writes = writer.blocking_lock();
                        done = checkpoint();
                    }
                    if let Err(e) = done {
                        tracing::warn!("checkpoint of {} failed: {e}", path.display());
                    }
                }
            })
            .map_err(|e| crate::StoreError::Io(e.to_string()))?;
        Ok(Checkpointer {
            since: AtomicU32::new(0),
            tx,
        })
    }

    /// One more write transaction; every [`CHECKPOINT_EVERY`], a checkpoint is asked for.
    fn wrote(&self) {
        if self.since.fetch_add(1, Ordering::Relaxed) + 1 >= CHECKPOINT_EVERY {
            self.since.store(0, Ordering::Relaxed);
            let _ = self.tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::{NewTask, Store};

    /// With automatic checkpoints off on the writer, only the checkpointer moves pages from
    /// the WAL into the database file: it must grow once enough transactions are written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpointer_moves_the_wal_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = dir.path().join("paddock.db");
        let store = Store::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let org = store
            .create_org("acme")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let size = || std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
        let before = size();
        let spec: paddock_proto::TaskSpec =
            serde_json::from_value(serde_json::json!({"kind": "agent.noop"}))
                .unwrap_or_else(|e| panic!("{e}"));
        // `n` write transactions, one task each.
        let write = |n: u32| {
            let (store, org_id, spec) = (&store, &org.id, &spec);
            async move {
                for _ in 0..n {
                    store
                        .insert_task(&NewTask {
                            id: None,
                            org_id: org_id.clone(),
                            spec: spec.clone(),
                            max_attempts: 1,
                            queue_deadline_at: paddock_proto::now_ms() + 60_000,
                        })
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
        };
        write(2 * super::CHECKPOINT_EVERY).await;
        let t0 = Instant::now();
        while size() <= before {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no checkpoint: the database file stayed at {before} bytes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The WAL starts over after each checkpoint: writing four times as much again
        // leaves it about the size it had (a checkpointer lagging under load may let it
        // double), where a WAL that never starts over grows at least fivefold.
        let wal = || {
            std::fs::metadata(dir.path().join("paddock.db-wal"))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let wal_before = wal();
        assert!(wal_before > 0);
        write(8 * super::CHECKPOINT_EVERY).await;
        let wal_after = wal();
        assert!(
            wal_after < 4 * wal_before,
            "the WAL grew from {wal_before} to {wal_after} bytes: it never starts over"
        );
    }
}
