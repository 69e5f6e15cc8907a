//! The statements on every task's path, on a SQLite file: submission, claim (with its
//! `dispatched` events) and completion, run on the writer's `rusqlite` connection
//! ([`crate::writer`]) where they are called, each in one `BEGIN IMMEDIATE` transaction.
//!
//! They are the same statements as the sqlx path PostgreSQL takes (the SQL text is shared,
//! with `$n` written `?n`, SQLite's numbered form), and the store contract suite runs both.

use std::sync::OnceLock;

use rusqlite::{Connection, params};

use paddock_proto::TaskResult;

use crate::tasks::{
    ClaimRequest, ClaimedTask, Handed, INSERT_DISPATCHED_SQL, InsertRow, TaskRow, claim_sql,
    claim_values, claimed_from_row, complete_sql, dispatched_payload, inflight_sql, result_columns,
    task_from_row,
};
use crate::{Dialect, Result};

const INSERT_SQL: &str = "INSERT INTO tasks (id, org_id, kind, required_tag, backend, spec, state, attempt, max_attempts, queue_deadline_at, created_at, updated_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', 0, ?7, ?8, ?9, ?9)";

const EVENT_SQL: &str = "INSERT INTO task_events (id, task_id, attempt, name, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// A `BEGIN IMMEDIATE` transaction, rolled back if dropped uncommitted. Unlike rusqlite's
/// `Transaction`, its `BEGIN` and `COMMIT` are cached statements, not parsed each time.
struct Tx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Tx<'c> {
    fn begin(conn: &'c Connection) -> Result<Self> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(Tx { conn, open: true })
    }

    fn commit(mut self) -> Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open && !self.conn.is_autocommit() {
            // Nothing was committed: undo it (an error here leaves nothing more to do).
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// `sql` with its `$n` placeholders written `?n` (the same numbered parameter for SQLite;
/// rusqlite binds by number only in this form).
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// Inserts queued tasks, all or none.
pub(crate) fn insert_tasks(conn: &mut Connection, rows: &[InsertRow<'_>], now: i64) -> Result<()> {
    let tx = Tx::begin(conn)?;
    insert_rows(tx.conn, rows, now)?;
    tx.commit()?;
    Ok(())
}

/// Inserts queued tasks, then makes `claims` (in order; each sees what the ones before it
/// took), in one transaction: one commit where a submission and its dispatch took two.
/// `payloads[i]` is the `dispatched` event payload of `claims[i]`. Hands `before_commit` each
/// claim's tasks and whether it filled its limit with queued work of its org left over, then
/// commits.
pub(crate) fn insert_and_claim(
    conn: &mut Connection,
    rows: &[InsertRow<'_>],
    now: i64,
    claims: &[ClaimRequest<'_>],
    payloads: &[String],
    before_commit: impl FnOnce(Vec<Vec<ClaimedTask>>, Vec<bool>),
) -> Result<()> {
    let tx = Tx::begin(conn)?;
    insert_rows(tx.conn, rows, now)?;
    let mut claimed = Vec::with_capacity(claims.len());
    for (req, payload) in claims.iter().zip(payloads) {
        claimed.push(claim_in(tx.conn, req, payload)?);
    }
    let mut more = Vec::with_capacity(claims.len());
    for (req, got) in claims.iter().zip(&claimed) {
        more.push(got.len() as u32 >= req.limit && org_has_queued(tx.conn, req.org_id)?);
    }
    before_commit(claimed, more);
    tx.commit()
}

/// Inserts new tasks in one transaction: `handed[i]` `Some`: task `i` dispatched to that
/// agent, with its `dispatched` event (see [`crate::Store::insert_dispatched`]); `None` (or
/// missing): queued.
pub(crate) fn insert_dispatched(
    conn: &mut Connection,
    rows: &[InsertRow<'_>],
    handed: &[Option<Handed>],
    now: i64,
) -> Result<()> {
    static SQL: OnceLock<String> = OnceLock::new();
    let insert_dispatched = SQL.get_or_init(|| numbered(INSERT_DISPATCHED_SQL));
    let tx = Tx::begin(conn)?;
    for (i, r) in rows.iter().enumerate() {
        let Some(h) = handed.get(i).and_then(Option::as_ref) else {
            insert_rows(tx.conn, std::slice::from_ref(r), now)?;
            continue;
        };
        tx.prepare_cached(insert_dispatched)?.execute(params![
            r.id,
            r.task.org_id,
            r.task.spec.kind,
            r.required_tag,
            r.task.spec.sandbox.backend,
            r.spec,
            i64::from(r.task.max_attempts.max(1)),
            h.agent_id,
            h.lease_until,
            r.task.queue_deadline_at,
            now,
        ])?;
        tx.prepare_cached(EVENT_SQL)?.execute(params![
            uuid::Uuid::now_v7().to_string(),
            r.id,
            1_i64,
            "dispatched",
            dispatched_payload(&h.agent_id),
            now,
        ])?;
    }
    tx.commit()
}

/// Whether an org has queued tasks (one probe of the queue's partial index).
fn org_has_queued(tx: &Connection, org_id: &str) -> Result<bool> {
    let mut stmt =
        tx.prepare_cached("SELECT 1 FROM tasks WHERE org_id = ?1 AND state = 'queued' LIMIT 1")?;
    Ok(stmt.exists(params![org_id])?)
}

fn insert_rows(tx: &Connection, rows: &[InsertRow<'_>], now: i64) -> Result<()> {
    let mut stmt = tx.prepare_cached(INSERT_SQL)?;
    for r in rows {
        stmt.execute(params![
            r.id,
            r.task.org_id,
            r.task.spec.kind,
            r.required_tag,
            r.task.spec.sandbox.backend,
            r.spec,
            i64::from(r.task.max_attempts.max(1)),
            r.task.queue_deadline_at,
            now,
        ])?;
    }
    Ok(())
}

/// Claims up to `req.limit` queued tasks for an agent (not an instance's: those go through
/// the sqlx path, with the instance's row) and records their `dispatched` events with
/// `payload`, in one transaction. A claim that finds nothing writes nothing.
pub(crate) fn claim(
    conn: &mut Connection,
    req: &ClaimRequest<'_>,
    payload: &str,
) -> Result<Vec<ClaimedTask>> {
    if claim_sql(Dialect::Sqlite, req).is_none() {
        return Ok(Vec::new());
    }
    let tx = Tx::begin(conn)?;
    let claimed = claim_in(tx.conn, req, payload)?;
    if claimed.is_empty() {
        // Dropping the transaction rolls it back: nothing was written.
        return Ok(claimed);
    }
    tx.commit()?;
    Ok(claimed)
}

/// The claim of [`claim`], inside the caller's transaction.
fn claim_in(tx: &Connection, req: &ClaimRequest<'_>, payload: &str) -> Result<Vec<ClaimedTask>> {
    if req.limit == 0 || req.kinds.is_empty() {
        return Ok(Vec::new());
    }
    let Some(sql) = claim_sql(Dialect::Sqlite, req) else {
        return Ok(Vec::new());
    };
    let mut limit = i64::from(req.limit);
    if let Some(max) = req.org_max_inflight {
        let inflight: i64 = tx
            .prepare_cached(inflight_sql(Dialect::Sqlite))?
            .query_row([req.org_id], |r| r.get(0))?;
        limit = limit.min(i64::from(max) - inflight);
        if limit <= 0 {
            return Ok(Vec::new());
        }
    }
    let mut claimed = Vec::new();
    {
        let mut stmt = tx.prepare_cached(&numbered(&sql))?;
        stmt.raw_bind_parameter(1, req.agent_id)?;
        stmt.raw_bind_parameter(2, req.lease_until)?;
        stmt.raw_bind_parameter(3, req.now)?;
        stmt.raw_bind_parameter(4, req.org_id)?;
        stmt.raw_bind_parameter(5, limit)?;
        for (i, v) in claim_values(req).enumerate() {
            stmt.raw_bind_parameter(6 + i, v)?;
        }
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next()? {
            claimed.push(claimed_from_row(row)?);
        }
    }
    if !claimed.is_empty() {
        let mut stmt = tx.prepare_cached(EVENT_SQL)?;
        let now = paddock_proto::now_ms();
        for c in &claimed {
            stmt.execute(params![
                uuid::Uuid::now_v7().to_string(),
                c.id,
                i64::from(c.attempt),
                "dispatched",
                payload,
                now,
            ])?;
        }
    }
    claimed.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(claimed)
}

/// Stores results of one agent in one transaction; for each, the stored row or `None` when
/// it was not stored (see [`crate::Store::complete_task`]).
pub(crate) fn complete(
    conn: &mut Connection,
    org_id: &str,
    agent_id: &str,
    results: &[TaskResult],
    ttl_ms: i64,
) -> Result<Vec<Option<TaskRow>>> {
    static SQL: OnceLock<String> = OnceLock::new();
    let sql = SQL.get_or_init(|| numbered(complete_sql()));
    let tx = Tx::begin(conn)?;
    let mut stored = Vec::with_capacity(results.len());
    {
        let mut stmt = tx.prepare_cached(sql)?;
        for r in results {
            let (state, json) = result_columns(r)?;
            let now = paddock_proto::now_ms();
            let mut rows = stmt.query(params![
                state.as_str(),
                now,
                r.started_at_ms,
                r.exit_code.map(i64::from),
                r.error_code.map(|c| c.as_str()),
                r.error_message.as_deref(),
                json,
                now + ttl_ms,
                r.task_id,
                org_id,
                i64::from(r.attempt),
                agent_id,
            ])?;
            stored.push(match rows.next()? {
                Some(row) => Some(task_from_row(row)?),
                None => None,
            });
        }
    }
    tx.commit()?;
    Ok(stored)
}
