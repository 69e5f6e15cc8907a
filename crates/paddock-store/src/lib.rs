//! Paddock's durable state: orgs, tokens, agents, tasks, output and events.
//!
//! One schema and one set of queries for SQLite (the embedded default) and PostgreSQL (the
//! scale-out store), through sqlx's `Any` driver. The schema sticks to portable types (TEXT,
//! BIGINT milliseconds, JSON as TEXT), so the same migration files run on both. The one
//! dialect difference that matters, claiming queued tasks across replicas, is handled in
//! [`tasks`] (`FOR UPDATE SKIP LOCKED` plus a per-org advisory lock on PostgreSQL).

pub mod agents;
pub mod bundles;
mod hot;
pub mod instances;
pub mod orgs;
pub mod secret;
pub mod tasks;
mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Connection, Executor};

use writer::{SQLITE_PRAGMAS, SqliteShared, Writer};

pub use agents::{Agent, PairingError};
pub use bundles::{SpawnRow, WorkflowVersion};
pub use instances::{
    BootstrapDecision, Instance, InstanceStatus, NewPool, Pool, PoolCapacityError,
};
pub use orgs::{ApiPrincipal, Org, Role};
pub use tasks::{
    ClaimRequest, ClaimedTask, EventRow, Handed, INSERT_CHUNK, NewTask, OutputRow, ReapedTask,
    StateCount, TaskRow, TaskState, new_task_id,
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
    /// A statement on the SQLite writer's own connection failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store could not start a thread or make its scratch directory.
    #[error("store i/o error: {0}")]
    Io(String),
    /// A call the store does not support (on this database, or with these arguments).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
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

/// A migration's SQL: one text for both databases, or one for each.
enum Sql {
    Portable(&'static str),
    PerDialect {
        sqlite: &'static str,
        postgres: &'static str,
    },
}

impl Sql {
    fn text(&self, dialect: Dialect) -> &'static str {
        match (self, dialect) {
            (Sql::Portable(sql), _) => sql,
            (Sql::PerDialect { sqlite, .. }, Dialect::Sqlite) => sqlite,
            (Sql::PerDialect { postgres, .. }, Dialect::Postgres) => postgres,
        }
    }
}

/// Embedded migrations: (version, name, SQL). Append only.
const MIGRATIONS: &[(i64, &str, Sql)] = &[
    (
        1,
        "core",
        Sql::Portable(include_str!("../migrations/0001_core.sql")),
    ),
    (
        2,
        "instances",
        Sql::Portable(include_str!("../migrations/0002_instances.sql")),
    ),
    (
        3,
        "bundles",
        Sql::Portable(include_str!("../migrations/0003_bundles.sql")),
    ),
    (
        4,
        "queue_order",
        Sql::Portable(include_str!("../migrations/0004_queue_order.sql")),
    ),
    (
        5,
        "partial_indexes",
        Sql::Portable(include_str!("../migrations/0005_partial_indexes.sql")),
    ),
    (
        6,
        "events_by_task",
        Sql::PerDialect {
            sqlite: include_str!("../migrations/0006_events_by_task.sqlite.sql"),
            postgres: include_str!("../migrations/0006_events_by_task.postgres.sql"),
        },
    ),
    (
        7,
        "one_in_flight_index",
        Sql::Portable(include_str!("../migrations/0007_one_in_flight_index.sql")),
    ),
    (
        8,
        "finished_by_org",
        Sql::Portable(include_str!("../migrations/0008_finished_by_org.sql")),
    ),
];

/// Handle to the database. Cheap to clone.
///
/// On a SQLite file, every write goes through one writer ([`writer`]: a held connection
/// behind an async lock, with a `rusqlite` connection beside it for the statements on each
/// task's path): SQLite has one writer at a time, and several writer connections in one
/// process only meet `SQLITE_BUSY` and sleep in the busy handler (1 ms, then longer), while
/// each commit also invalidates the other connections' page caches. A few read-only
/// connections serve the frequent reads (task reads, lists, output, events). On PostgreSQL
/// both are one pool.
#[derive(Clone, Debug)]
pub struct Store {
    /// PostgreSQL: the pool. SQLite: the readers (writes go through `sqlite`).
    pool: AnyPool,
    read: AnyPool,
    dialect: Dialect,
    sqlite: Option<Arc<SqliteShared>>,
}

/// Read-only connections beside the writer on a SQLite file.
const SQLITE_READERS: u32 = 4;

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
        // `sqlite::memory:` stands for a private file in a scratch directory removed with
        // the store: the writer's two connections and the readers must see one database.
        let mut scratch = None;
        let url = match dialect {
            Dialect::Sqlite if url.contains(":memory:") => {
                let dir = tempfile::Builder::new()
                    .prefix("paddock-memory-")
                    .tempdir()
                    .map_err(|e| StoreError::Io(e.to_string()))?;
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("paddock.db").display()
                );
                scratch = Some(dir);
                url
            }
            Dialect::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let opts = AnyConnectOptions::from_str(&url)?;
        let (pool, sqlite) = match dialect {
            Dialect::Sqlite => {
                let path = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
                    .get_filename()
                    .to_path_buf();
                // The writer first: it creates the file and puts it in WAL mode.
                let mut conn = sqlx::AnyConnection::connect_with(&opts).await?;
                conn.execute(SQLITE_PRAGMAS).await?;
                let shared = SqliteShared::open(&path, conn, scratch).await?;
                let readers = AnyPoolOptions::new()
                    .acquire_timeout(Duration::from_secs(10))
                    .max_connections(SQLITE_READERS)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(SQLITE_PRAGMAS).await?;
                            // Writes belong to the writer: one here would fail, not contend.
                            conn.execute("PRAGMA query_only=1").await?;
                            Ok(())
                        })
                    })
                    .connect_lazy_with(opts);
                (readers, Some(shared))
            }
            Dialect::Postgres => {
                let pool = AnyPoolOptions::new()
                    .acquire_timeout(Duration::from_secs(10))
                    .max_connections(16)
                    .connect_with(opts)
                    .await?;
                (pool, None)
            }
        };
        let store = Store {
            read: pool.clone(),
            pool,
            dialect,
            sqlite,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The write handle: the SQLite writer (queued behind the one lock) or a pooled
    /// PostgreSQL connection.
    pub(crate) async fn w(&self) -> Result<Writer<'_>> {
        match &self.sqlite {
            Some(s) => Ok(s.lock().await),
            None => Ok(Writer::Pooled(self.pool.acquire().await?)),
        }
    }

    /// The database kind.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The underlying pool (PostgreSQL: every connection; SQLite: the readers).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Cheap liveness query, for `/readyz`.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.w().await?)
            .await?;
        Ok(())
    }

    /// Closes the pool (the SQLite writer closes with the last handle).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.w().await?;
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
                tx.execute(sql.text(self.dialect)).await?;
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
