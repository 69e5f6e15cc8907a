//! Paddock's durable state: orgs, tokens, agents, tasks, output and events.
//!
//! One schema and one set of queries for SQLite (the embedded default) and PostgreSQL (the
//! scale-out store), through sqlx's `Any` driver. The schema sticks to portable types (TEXT,
//! BIGINT milliseconds, JSON as TEXT), so the same migration files run on both. The one
//! dialect difference that matters, claiming queued tasks across replicas, is handled in
//! [`tasks`] (`FOR UPDATE SKIP LOCKED` plus a per-org advisory lock on PostgreSQL).

pub mod agents;
pub mod bundles;
pub mod instances;
pub mod orgs;
pub mod secret;
pub mod tasks;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use agents::{Agent, PairingError};
pub use bundles::{SpawnRow, WorkflowVersion};
pub use instances::{
    BootstrapDecision, Instance, InstanceStatus, NewPool, Pool, PoolCapacityError,
};
pub use orgs::{ApiPrincipal, Org, Role};
pub use tasks::{
    ClaimRequest, ClaimedTask, EventRow, INSERT_CHUNK, NewTask, OutputRow, ReapedTask, StateCount,
    TaskRow, TaskState, new_task_id,
};

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite file (embedded default).
    Sqlite,
    /// PostgreSQL (several gateway replicas may share it).
    Postgres,
}

/// A store failure. Messages never contain secrets (tokens are hashed before any query).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is not understood.
    #[error("unsupported database url (expected sqlite:// or postgres://): {0}")]
    BadUrl(String),
    /// A query failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Stored JSON could not be decoded (corrupt row).
    #[error("corrupt stored value in {what}: {detail}")]
    Corrupt {
        /// Which column.
        what: &'static str,
        /// Decoder message.
        detail: String,
    },
}

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Embedded migrations: (version, name, SQL). Append only.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "core", include_str!("../migrations/0001_core.sql")),
    (
        2,
        "instances",
        include_str!("../migrations/0002_instances.sql"),
    ),
    (3, "bundles", include_str!("../migrations/0003_bundles.sql")),
    (
        4,
        "queue_order",
        include_str!("../migrations/0004_queue_order.sql"),
    ),
];

/// Handle to the database. Cheap to clone.
///
/// On a SQLite file, writes (and everything not marked as a read) go through one connection:
/// SQLite has one writer at a time, and several writer connections in one process only meet
/// `SQLITE_BUSY` and sleep in the busy handler (1 ms, then longer), while each commit also
/// invalidates the other connections' page caches. A few read-only connections serve the
/// frequent reads (task reads, lists, output, events). On PostgreSQL both are one pool.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    read: AnyPool,
    dialect: Dialect,
}

/// Read-only connections beside the writer on a SQLite file.
const SQLITE_READERS: u32 = 4;

/// Per-connection settings of a SQLite file: WAL, `synchronous=NORMAL` (a commit is durable
/// against a process crash at once and against power loss from the next checkpoint), a busy
/// timeout for the readers and other processes, foreign keys, and no memory map (it is
/// remapped in every connection each time the file grows).
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON; PRAGMA mmap_size=0;";

impl Store {
    /// Connects to `url` (`sqlite://path`, `sqlite::memory:`, `postgres://...`) and applies
    /// pending migrations. A SQLite file is created if missing and put in WAL mode.
    ///
    /// # Errors
    /// Unreachable database, bad URL or a failed migration.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else {
            return Err(StoreError::BadUrl(redact_url(url)));
        };
        let url = match dialect {
            Dialect::Sqlite if !url.contains("mode=") && !url.contains(":memory:") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let opts = AnyConnectOptions::from_str(&url)?;
        let sqlite_pool = |max: u32| {
            AnyPoolOptions::new()
                .acquire_timeout(Duration::from_secs(10))
                .max_connections(max)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(SQLITE_PRAGMAS).await?;
                        Ok(())
                    })
                })
        };
        let (pool, read) = match dialect {
            Dialect::Sqlite => {
                let pool = sqlite_pool(1).connect_with(opts.clone()).await?;
                // An in-memory database exists once per connection: the writer serves all.
                let read = if url.contains(":memory:") {
                    pool.clone()
                } else {
                    sqlite_pool(SQLITE_READERS).connect_lazy_with(opts)
                };
                (pool, read)
            }
            Dialect::Postgres => {
                let pool = AnyPoolOptions::new()
                    .acquire_timeout(Duration::from_secs(10))
                    .max_connections(16)
                    .connect_with(opts)
                    .await?;
                (pool.clone(), pool)
            }
        };
        let store = Store {
            pool,
            read,
            dialect,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database kind.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The underlying pool (for health checks).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Cheap liveness query, for `/readyz`.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        if self.dialect == Dialect::Postgres {
            // Replicas starting together must not race on the schema.
            conn.execute("SELECT pg_advisory_lock(726163)").await?;
        }
        let outcome = async {
            conn.execute(
                "CREATE TABLE IF NOT EXISTS paddock_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
            )
            .await?;
            for (version, name, sql) in MIGRATIONS {
                let done: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM paddock_migrations WHERE version = $1")
                        .bind(*version)
                        .fetch_optional(&mut *conn)
                        .await?;
                if done.is_some() {
                    continue;
                }
                tracing::info!(version, name, "applying migration");
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                tx.execute(*sql).await?;
                sqlx::query(
                    "INSERT INTO paddock_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                )
                .bind(*version)
                .bind(*name)
                .bind(paddock_proto::now_ms())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(())
        }
        .await;
        if self.dialect == Dialect::Postgres {
            conn.execute("SELECT pg_advisory_unlock(726163)").await?;
        }
        Ok(outcome?)
    }
}

/// A database URL with any password removed, safe to log.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Placeholders `$start, $start+1, ...` for an `IN (...)` list of `n` values.
pub(crate) fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `VALUES` rows of a multi-row statement: `rows` rows of `width` bound values each;
/// `row` writes one row given its first placeholder's number (`$1`, `$1 + width`, ...).
pub(crate) fn value_rows(rows: usize, width: usize, row: impl Fn(usize) -> String) -> String {
    (0..rows)
        .map(|i| row(1 + i * width))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn json_list(values: &[String]) -> String {
    serde_json::to_string(values).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn parse_json_list(what: &'static str, text: &str) -> Result<Vec<String>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn placeholder_lists() {
        assert_eq!(placeholders(3, 2), "$3, $4");
        assert_eq!(placeholders(1, 0), "");
    }
}

#[cfg(feature = "testing")]
pub mod testing;

impl Store {
    /// Runs the migrator again (tests: it must be a no-op on an up-to-date schema).
    ///
    /// # Errors
    /// Database failure.
    #[doc(hidden)]
    pub async fn migrate_again_for_tests(&self) -> Result<()> {
        self.migrate().await
    }
}
