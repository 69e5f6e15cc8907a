//! Tasks: submission, claiming by agents, leases, results (first completion wins), output
//! chunks, events, and the reapers' queries.
//!
//! State machine: `queued -> dispatched -> running -> succeeded|failed|timed_out|canceled`.
//! A dispatched or running task whose lease expires goes back to `queued` while attempts
//! remain, else fails with `AGENT_LOST`. A result is stored only if it is for the current
//! attempt and the task is not already finished.

use paddock_proto::{ErrorCode, ResultStatus, TaskResult, TaskSpec};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Connection as _, Row};

use crate::{Dialect, Result, Store, StoreError, placeholders, value_rows};

/// Lifecycle state of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for an eligible agent.
    Queued,
    /// Sent to an agent, not yet accepted.
    Dispatched,
    /// Accepted by an agent.
    Running,
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit, signal, agent lost, queue timeout or could not run.
    Failed,
    /// Killed after its timeout.
    TimedOut,
    /// Canceled.
    Canceled,
}

impl TaskState {
    /// All states, for metrics.
    pub const ALL: [TaskState; 7] = [
        TaskState::Queued,
        TaskState::Dispatched,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::TimedOut,
        TaskState::Canceled,
    ];

    /// Stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Dispatched => "dispatched",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
            TaskState::Canceled => "canceled",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// No further transitions.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            TaskState::Queued | TaskState::Dispatched | TaskState::Running
        )
    }

    fn from_result(status: ResultStatus) -> TaskState {
        match status {
            ResultStatus::Succeeded => TaskState::Succeeded,
            ResultStatus::Failed | ResultStatus::Error => TaskState::Failed,
            ResultStatus::TimedOut => TaskState::TimedOut,
            ResultStatus::Canceled => TaskState::Canceled,
        }
    }
}

/// A task to insert.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its id, when the caller chose it beforehand (from [`new_task_id`], e.g. to wait on it
    /// before it exists); `None`: a new one.
    pub id: Option<String>,
    /// Org.
    pub org_id: String,
    /// Validated spec.
    pub spec: TaskSpec,
    /// Attempts allowed when agents are lost (at least 1).
    pub max_attempts: u32,
    /// The task fails with `QUEUE_TIMEOUT` if not dispatched by then (ms since epoch).
    pub queue_deadline_at: i64,
}

/// A new task id: a UUID v7, so ids sort by submission time.
pub fn new_task_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A stored task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRow {
    /// Task id.
    pub id: String,
    /// Org.
    pub org_id: String,
    /// Kind.
    pub kind: String,
    /// State.
    pub state: TaskState,
    /// Current attempt (0 before the first dispatch).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Agent holding the current attempt.
    pub agent_id: Option<String>,
    /// Spec as submitted.
    pub spec: TaskSpec,
    /// Timestamps (ms since epoch).
    pub created_at: i64,
    /// Dispatch time of the current attempt.
    pub dispatched_at: Option<i64>,
    /// Start time of the current attempt.
    pub started_at: Option<i64>,
    /// End time.
    pub finished_at: Option<i64>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Error code for failures that are not plain non-zero exits.
    pub error_code: Option<String>,
    /// Error detail.
    pub error_message: Option<String>,
    /// The agent's full result, when one was stored.
    pub result: Option<TaskResult>,
    /// When the stored result will be deleted.
    pub expires_at: Option<i64>,
}

/// What an agent with free slots can take.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The agent's org.
    pub org_id: &'a str,
    /// The agent.
    pub agent_id: &'a str,
    /// Its control-plane tags.
    pub tags: &'a [String],
    /// Kinds it runs.
    pub kinds: &'a [String],
    /// Backends it has.
    pub backends: &'a [String],
    /// Most tasks to claim.
    pub limit: u32,
    /// Lease deadline for the claimed attempts.
    pub lease_until: i64,
    /// Per-org cap on dispatched + running tasks, if any.
    pub org_max_inflight: Option<u32>,
    /// Now (ms since epoch).
    pub now: i64,
    /// The agent is an instance's (`agents.pool = 'instance'`): it takes only tasks that
    /// select one of its tags (never untargeted work), and a claim makes the instance
    /// `busy` and counts its uses in the same transaction, or claims nothing if the
    /// instance is no longer `ready`/`busy` or has used up `max_use`.
    pub instance: bool,
}

/// A task claimed for an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedTask {
    /// Task id.
    pub id: String,
    /// The new attempt number.
    pub attempt: u32,
    /// What to run.
    pub spec: TaskSpec,
    /// Submission time (for the dispatch latency histogram).
    pub created_at: i64,
}

/// The agent a new task was sent to before it was stored ([`Store::insert_dispatched`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The agent.
    pub agent_id: String,
    /// Lease deadline of the attempt (ms since epoch).
    pub lease_until: i64,
}

/// Count of tasks in a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCount {
    /// State.
    pub state: TaskState,
    /// Number of tasks.
    pub count: i64,
}

/// A task that left the running states because of a reaper, for logging and waking waiters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapedTask {
    /// Task id.
    pub id: String,
    /// Org.
    pub org_id: String,
}

/// A stored output chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputRow {
    /// Attempt.
    pub attempt: u32,
    /// Sequence within the attempt.
    pub seq: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// Text.
    pub data: String,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRow {
    /// Event id (time-ordered).
    pub id: String,
    /// Attempt.
    pub attempt: u32,
    /// Name.
    pub name: String,
    /// Payload.
    pub payload: serde_json::Value,
    /// Time.
    pub created_at: i64,
}

const TASK_COLUMNS: &str = "id, org_id, kind, state, attempt, max_attempts, agent_id, spec, created_at, dispatched_at, started_at, finished_at, exit_code, error_code, error_message, result, expires_at";

fn corrupt(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

/// A result row of either driver: sqlx's `AnyRow` or the SQLite writer's `rusqlite::Row`,
/// so that one function maps each kind of row.
pub(crate) trait Columns {
    /// A column by name (`NULL` as `None` for `Option` types).
    fn col<T: FromColumn>(&self, name: &str) -> Result<T>;
}

/// A value both drivers decode.
pub(crate) trait FromColumn:
    for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + rusqlite::types::FromSql
{
}
impl<T> FromColumn for T where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + rusqlite::types::FromSql
{
}

impl Columns for AnyRow {
    fn col<T: FromColumn>(&self, name: &str) -> Result<T> {
        Ok(self.try_get(name)?)
    }
}

impl Columns for rusqlite::Row<'_> {
    fn col<T: FromColumn>(&self, name: &str) -> Result<T> {
        Ok(self.get(name)?)
    }
}

pub(crate) fn task_from_row(r: &impl Columns) -> Result<TaskRow> {
    let state: String = r.col("state")?;
    let spec: String = r.col("spec")?;
    let result: Option<String> = r.col("result")?;
    Ok(TaskRow {
        id: r.col("id")?,
        org_id: r.col("org_id")?,
        kind: r.col("kind")?,
        state: TaskState::parse(&state).ok_or_else(|| corrupt("tasks.state", &state))?,
        attempt: r.col::<i64>("attempt")? as u32,
        max_attempts: r.col::<i64>("max_attempts")? as u32,
        agent_id: r.col("agent_id")?,
        spec: serde_json::from_str(&spec).map_err(|e| corrupt("tasks.spec", e))?,
        created_at: r.col("created_at")?,
        dispatched_at: r.col("dispatched_at")?,
        started_at: r.col("started_at")?,
        finished_at: r.col("finished_at")?,
        exit_code: r.col::<Option<i64>>("exit_code")?.map(|c| c as i32),
        error_code: r.col("error_code")?,
        error_message: r.col("error_message")?,
        result: result
            .map(|t| serde_json::from_str(&t).map_err(|e| corrupt("tasks.result", e)))
            .transpose()?,
        expires_at: r.col("expires_at")?,
    })
}

/// A row of a claim's `RETURNING id, attempt, spec, created_at`.
pub(crate) fn claimed_from_row(r: &impl Columns) -> Result<ClaimedTask> {
    let spec: String = r.col("spec")?;
    Ok(ClaimedTask {
        id: r.col("id")?,
        attempt: r.col::<i64>("attempt")? as u32,
        spec: serde_json::from_str(&spec).map_err(|e| corrupt("tasks.spec", e))?,
        created_at: r.col("created_at")?,
    })
}

/// Most rows in one multi-row `INSERT` of tasks (9 bound values each: well under SQLite's
/// and PostgreSQL's limits on bound parameters).
pub const INSERT_CHUNK: usize = 256;

/// A task about to be inserted: its id, the submission, and the derived columns.
pub(crate) struct InsertRow<'a> {
    pub(crate) id: String,
    pub(crate) task: &'a NewTask,
    pub(crate) required_tag: Option<String>,
    pub(crate) spec: String,
}

/// The multi-row `INSERT` of `n` queued tasks, for [`insert_query`].
fn insert_statement(n: usize) -> String {
    let values = value_rows(n, 9, |b| {
        format!(
            "({}, 'queued', 0, {}, ${})",
            placeholders(b, 6),
            placeholders(b + 6, 3),
            b + 8
        )
    });
    format!(
        "INSERT INTO tasks (id, org_id, kind, required_tag, backend, spec, state, attempt, max_attempts, queue_deadline_at, created_at, updated_at) VALUES {values}"
    )
}

/// A new task stored already dispatched to an agent (attempt 1), as a claim would leave it:
/// $1 id, $2 org, $3 kind, $4 required tag, $5 backend, $6 spec, $7 max attempts, $8 agent,
/// $9 lease, $10 queue deadline, $11 now.
pub(crate) const INSERT_DISPATCHED_SQL: &str = "INSERT INTO tasks (id, org_id, kind, required_tag, backend, spec, state, attempt, max_attempts, agent_id, lease_expires_at, queue_deadline_at, created_at, updated_at, dispatched_at) \
     VALUES ($1, $2, $3, $4, $5, $6, 'dispatched', 1, $7, $8, $9, $10, $11, $11, $11)";

/// `sql` with the values $1 to $11 of [`INSERT_DISPATCHED_SQL`] bound: row `r` dispatched
/// to `req`'s agent, with its lease, at its `now`.
fn dispatched_row_query<'q>(
    sql: &'q str,
    r: &'q InsertRow<'q>,
    req: &ClaimRequest<'q>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    bind_task_columns(sqlx::query(sql), r)
        .bind(req.agent_id)
        .bind(req.lease_until)
        .bind(r.task.queue_deadline_at)
        .bind(req.now)
}

/// The multi-row `INSERT` of `sql` (built for `rows.len()` rows), bound.
fn insert_query<'q>(
    sql: &'q str,
    rows: &'q [InsertRow<'q>],
    now: i64,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let mut q = sqlx::query(sql);
    for r in rows {
        q = bind_task_columns(q, r)
            .bind(r.task.queue_deadline_at)
            .bind(now);
    }
    q
}

/// Binds a new task's first seven columns: id, org, kind, required tag, backend, spec and
/// max attempts (the leading values of every insert of a task).
fn bind_task_columns<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    r: &'q InsertRow<'q>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    q.bind(r.id.as_str())
        .bind(r.task.org_id.as_str())
        .bind(r.task.spec.kind.as_str())
        .bind(r.required_tag.as_deref())
        .bind(r.task.spec.sandbox.backend.as_deref())
        .bind(r.spec.as_str())
        .bind(i64::from(r.task.max_attempts.max(1)))
}

impl Store {
    /// Inserts a queued task and returns its id (UUID v7, so ids sort by submission time).
    ///
    /// # Errors
    /// Database failure.
    pub async fn insert_task(&self, task: &NewTask) -> Result<String> {
        let mut ids = self.insert_tasks(std::slice::from_ref(task)).await?;
        ids.pop()
            .ok_or_else(|| corrupt("tasks", "an insert returned no id"))
    }

    /// Inserts queued tasks with multi-row `INSERT`s of up to [`INSERT_CHUNK`] rows, in one
    /// transaction when there is more than one (one commit for a whole batch), and returns their ids in order.
    /// All or none are stored.
    ///
    /// # Errors
    /// Database failure, or a spec that does not serialise.
    pub async fn insert_tasks(&self, tasks: &[NewTask]) -> Result<Vec<String>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let now = paddock_proto::now_ms();
        let (ids, rows) = insert_rows(tasks)?;
        let mut w = self.w().await?;
        if let Some(raw) = w.raw() {
            crate::hot::insert_tasks(raw, &rows, now)?;
            return Ok(ids);
        }
        let statement = insert_statement;
        // One statement is atomic on its own; more need a transaction.
        if rows.len() <= INSERT_CHUNK {
            let sql = statement(rows.len());
            insert_query(&sql, &rows, now).execute(&mut *w).await?;
        } else {
            let mut tx = w.begin().await?;
            for chunk in rows.chunks(INSERT_CHUNK) {
                let sql = statement(chunk.len());
                insert_query(&sql, chunk, now).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Ok(ids)
    }

    /// Inserts queued tasks (as [`Store::insert_tasks`]), then makes `claims` in order (a
    /// claim sees the new tasks and what the claims before it took), hands `before_commit`
    /// each claim's tasks and, per claim, whether it filled its limit with queued work of its
    /// org left over, and returns the new ids.
    ///
    /// On SQLite this is one transaction, so a submission and its dispatch cost one commit,
    /// and `before_commit` runs inside it, before the commit: what it sends leaves while the
    /// commit is written. If the commit then fails, nothing is stored and the error is
    /// returned after `before_commit` ran. On PostgreSQL, where claims run beside inserts on
    /// other connections, it is [`Store::insert_tasks`] followed by [`Store::claim_tasks`]
    /// for each, and `before_commit` runs once they are committed.
    ///
    /// Claims for instance agents are not taken here (they lock the instance's row): use
    /// [`Store::claim_tasks`].
    ///
    /// # Errors
    /// Database failure, or a spec that does not serialise. On SQLite nothing is stored
    /// then; on PostgreSQL the tasks may be stored with some claims not made (and
    /// `before_commit` not called).
    pub async fn insert_tasks_and_claim(
        &self,
        tasks: &[NewTask],
        claims: &[ClaimRequest<'_>],
        before_commit: impl FnOnce(Vec<Vec<ClaimedTask>>, Vec<bool>) + Send,
    ) -> Result<Vec<String>> {
        if claims.iter().any(|c| c.instance) {
            return Err(corrupt(
                "claims",
                "instance claims are made with claim_tasks",
            ));
        }
        if self.dialect == Dialect::Sqlite && !tasks.is_empty() {
            let now = paddock_proto::now_ms();
            let (ids, rows) = insert_rows(tasks)?;
            let payloads: Vec<String> = claims
                .iter()
                .map(|c| dispatched_payload(c.agent_id))
                .collect();
            let mut w = self.w().await?;
            if let Some(raw) = w.raw() {
                crate::hot::insert_and_claim(raw, &rows, now, claims, &payloads, before_commit)?;
                return Ok(ids);
            }
        }
        let ids = self.insert_tasks(tasks).await?;
        let mut claimed = Vec::with_capacity(claims.len());
        for c in claims {
            claimed.push(self.claim_tasks(c).await?);
        }
        let mut more = Vec::with_capacity(claims.len());
        for (c, got) in claims.iter().zip(&claimed) {
            more.push(got.len() as u32 >= c.limit && self.org_has_queued(c.org_id).await?);
        }
        before_commit(claimed, more);
        Ok(ids)
    }

    /// SQLite: stores new tasks that the caller hands to agents itself, without a claim.
    ///
    /// `hand` runs first, holding the writer, sends the tasks it can and says, for each task
    /// in order, which agent it went to ([`Handed`]) or `None`. Then one transaction
    /// inserts each task as it was left: `dispatched` to its agent (attempt 1, leased until
    /// [`Handed::lease_until`], with its `dispatched` event) or `queued`. The sends leave
    /// before any SQL runs, and no write can come between them and the commit, so a result
    /// for one of these tasks is stored only once its row exists (it waits for the writer).
    ///
    /// Each task must carry its id ([`NewTask::id`]): the dispatch names it before its row
    /// exists.
    ///
    /// # Errors
    /// [`StoreError::Unsupported`] on PostgreSQL (a result stored on another connection could
    /// come before the row), a task without an id (`hand` is not called then), database
    /// failure. Nothing is stored on error; `hand` has run unless the error came before it.
    pub async fn insert_dispatched(
        &self,
        tasks: &[NewTask],
        hand: impl FnOnce() -> Vec<Option<Handed>> + Send,
    ) -> Result<Vec<String>> {
        if tasks.iter().any(|t| t.id.is_none()) {
            return Err(StoreError::Unsupported(
                "a task dispatched before it is stored, without its id",
            ));
        }
        let (ids, rows) = insert_rows(tasks)?;
        let mut w = self.w().await?;
        let Some(raw) = w.raw() else {
            return Err(StoreError::Unsupported(
                "tasks dispatched before they are stored, on PostgreSQL",
            ));
        };
        let handed = hand();
        crate::hot::insert_dispatched(raw, &rows, &handed, paddock_proto::now_ms())?;
        Ok(ids)
    }

    /// Stores new tasks, each assigned to an agent of this replica (`assigned[i]`: the claim
    /// that agent would make, limit and all ignored but its eligibility, lease and `now`;
    /// `None` or missing: not assigned), in one transaction, and returns their ids and, per
    /// task, whether it was stored `dispatched` to its agent (attempt 1, with its
    /// `dispatched` event). An assigned task is stored `queued` instead when queued work its
    /// agent would claim is already waiting, so that the older work goes first (through the
    /// claims). The caller sends the dispatches once this returns: after the commit, as a
    /// claim's.
    ///
    /// # Errors
    /// Database failure, or a spec that does not serialise. Nothing is stored then.
    pub async fn insert_assigned(
        &self,
        tasks: &[NewTask],
        assigned: &[Option<ClaimRequest<'_>>],
    ) -> Result<(Vec<String>, Vec<bool>)> {
        let now = paddock_proto::now_ms();
        let (ids, rows) = insert_rows(tasks)?;
        let mut w = self.w().await?;
        if self.dialect == Dialect::Postgres {
            let dispatched = assigned_pg(&mut w, &rows, assigned, now).await?;
            return Ok((ids, dispatched));
        }
        let mut tx = w.begin().await?;
        // Before any new row exists: only older work counts.
        let mut dispatched = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            dispatched.push(match assigned.get(i).and_then(Option::as_ref) {
                Some(req) => !queued_for(&mut tx, req).await?,
                None => false,
            });
        }
        for (i, r) in rows.iter().enumerate() {
            let Some(req) = assigned
                .get(i)
                .and_then(Option::as_ref)
                .filter(|_| dispatched[i])
            else {
                insert_query(&insert_statement(1), std::slice::from_ref(r), now)
                    .execute(&mut *tx)
                    .await?;
                continue;
            };
            dispatched_row_query(INSERT_DISPATCHED_SQL, r, req)
                .execute(&mut *tx)
                .await?;
            insert_events(
                &mut tx,
                &[(r.id.as_str(), 1)],
                "dispatched",
                &dispatched_payload(req.agent_id),
            )
            .await?;
        }
        tx.commit().await?;
        Ok((ids, dispatched))
    }

    /// Whether an org has queued tasks (read on the queue's partial index).
    async fn org_has_queued(&self, org_id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM tasks WHERE org_id = $1 AND state = 'queued' LIMIT 1")
            .bind(org_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// One task of an org.
    ///
    /// # Errors
    /// Database failure or a corrupt row.
    pub async fn get_task(&self, org_id: &str, task_id: &str) -> Result<Option<TaskRow>> {
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND org_id = $2"
        ))
        .bind(task_id)
        .bind(org_id)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(task_from_row).transpose()
    }

    /// Recent tasks of an org, newest first, optionally in one state.
    ///
    /// # Errors
    /// Database failure or a corrupt row.
    pub async fn list_tasks(
        &self,
        org_id: &str,
        state: Option<TaskState>,
        limit: u32,
    ) -> Result<Vec<TaskRow>> {
        let rows =
            match state {
                Some(s) => {
                    // Each group of states is read from its partial index, whose condition is
                    // written out so the planner can use it (the state is a parameter): the
                    // queue in its own order; the tasks in flight (bounded by the agents' slots)
                    // sorted, with SQLite kept off the org's and the primary key's indexes,
                    // which would walk the org's whole history; finished ones by (org, state, id).
                    let sqlite = self.dialect == Dialect::Sqlite;
                    let (filter, order) = match s {
                        TaskState::Queued => (
                            "org_id = $1 AND state = $2 AND state = 'queued'",
                            "created_at DESC, id DESC",
                        ),
                        TaskState::Dispatched | TaskState::Running if sqlite => (
                            "+org_id = $1 AND state = $2 AND state IN ('dispatched', 'running')",
                            "+id DESC",
                        ),
                        TaskState::Dispatched | TaskState::Running => (
                            "org_id = $1 AND state = $2 AND state IN ('dispatched', 'running')",
                            "id DESC",
                        ),
                        _ => (
                            "org_id = $1 AND state = $2 AND expires_at IS NOT NULL",
                            "id DESC",
                        ),
                    };
                    sqlx::query(&format!(
                        "SELECT {TASK_COLUMNS} FROM tasks WHERE {filter} ORDER BY {order} LIMIT $3"
                    ))
                    .bind(org_id)
                    .bind(s.as_str())
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await?
                }
                None => sqlx::query(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE org_id = $1 ORDER BY id DESC LIMIT $2"
                ))
                .bind(org_id)
                .bind(i64::from(limit))
                .fetch_all(&self.read)
                .await?,
            };
        rows.iter().map(task_from_row).collect()
    }

    /// Claims up to `limit` queued tasks the agent is eligible for, oldest first, moving them
    /// to `dispatched` with a new attempt number and a lease. Safe across replicas: on
    /// PostgreSQL rows are locked with `FOR UPDATE SKIP LOCKED` and the per-org in-flight cap
    /// is checked under a per-org transaction-scoped advisory lock; on SQLite the single
    /// writer serialises claims.
    ///
    /// # Errors
    /// Database failure or a corrupt row.
    pub async fn claim_tasks(&self, req: &ClaimRequest<'_>) -> Result<Vec<ClaimedTask>> {
        if req.limit == 0 || req.kinds.is_empty() {
            return Ok(Vec::new());
        }
        let payload = dispatched_payload(req.agent_id);
        let rows = match self.dialect {
            _ if req.instance => {
                let mut w = self.w().await?;
                let mut tx = w.begin().await?;
                if self.dialect == Dialect::Sqlite {
                    // Take the write lock first: a read transaction upgraded to a write
                    // fails at once in WAL mode if another writer got in between.
                    sqlx::query("UPDATE instances SET updated_at = updated_at WHERE id = $1")
                        .bind(req.agent_id)
                        .execute(&mut *tx)
                        .await?;
                }
                // The instance's row, locked: only a `ready`/`busy` instance takes work, and
                // at most its remaining uses.
                let lock = match self.dialect {
                    Dialect::Postgres => " FOR UPDATE",
                    Dialect::Sqlite => "",
                };
                let inst = sqlx::query(&format!(
                    "SELECT status, uses, max_use FROM instances WHERE id = $1{lock}"
                ))
                .bind(req.agent_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(inst) = inst else {
                    tx.rollback().await?;
                    return Ok(Vec::new());
                };
                let status: String = inst.get("status");
                let (uses, max_use): (i64, i64) = (inst.get("uses"), inst.get("max_use"));
                let left = if max_use > 0 {
                    max_use - uses
                } else {
                    i64::MAX
                };
                if !matches!(status.as_str(), "ready" | "busy") || left <= 0 {
                    tx.rollback().await?;
                    return Ok(Vec::new());
                }
                let capped = ClaimRequest {
                    limit: req.limit.min(u32::try_from(left).unwrap_or(u32::MAX)),
                    ..*req
                };
                let rows = claim_rows(&mut tx, self.dialect, &capped).await?;
                if rows.is_empty() {
                    tx.rollback().await?;
                    return Ok(Vec::new());
                }
                let n = rows.len() as i64;
                let gate = sqlx::query(
                    "UPDATE instances SET status = 'busy', uses = uses + $1, busy_at = $2, updated_at = $2 \
                     WHERE id = $3 AND status IN ('ready', 'busy') AND (max_use = 0 OR uses + $1 <= max_use)",
                )
                .bind(n)
                .bind(req.now)
                .bind(req.agent_id)
                .execute(&mut *tx)
                .await?;
                if gate.rows_affected() != 1 {
                    tx.rollback().await?;
                    return Ok(Vec::new());
                }
                insert_dispatched_events(&mut tx, &rows, &payload).await?;
                tx.commit().await?;
                drop(w);
                rows
            }
            Dialect::Postgres => {
                let mut w = self.w().await?;
                let mut tx = w.begin().await?;
                let rows = claim_rows(&mut tx, self.dialect, req).await?;
                insert_dispatched_events(&mut tx, &rows, &payload).await?;
                tx.commit().await?;
                drop(w);
                rows
            }
            Dialect::Sqlite => {
                let mut w = self.w().await?;
                let Some(raw) = w.raw() else {
                    return Err(corrupt("store", "a SQLite store without its writer"));
                };
                return crate::hot::claim(raw, req, &payload);
            }
        };
        let mut claimed = rows
            .iter()
            .map(claimed_from_row)
            .collect::<Result<Vec<_>>>()?;
        claimed.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(claimed)
    }

    /// Undoes a claim whose dispatch could not be sent (the agent's connection closed first):
    /// back to `queued` without consuming the attempt.
    ///
    /// # Errors
    /// Database failure.
    pub async fn release_claim(&self, task_id: &str, attempt: u32) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET state = 'queued', attempt = attempt - 1, agent_id = NULL, lease_expires_at = NULL, dispatched_at = NULL, updated_at = $1 WHERE id = $2 AND attempt = $3 AND state = 'dispatched'",
        )
        .bind(paddock_proto::now_ms())
        .bind(task_id)
        .bind(i64::from(attempt))
        .execute(&mut *self.w().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// An agent hands a task back without a result: it is shutting down (`consume_attempt`:
    /// the attempt may have started and counts) or it refused the dispatch as busy (the
    /// attempt never started and is given back). The task returns to the queue, its queue
    /// deadline pushed to at least `requeue_deadline`. Returns whether it was re-queued.
    ///
    /// # Errors
    /// Database failure.
    pub async fn hand_back_task(
        &self,
        org_id: &str,
        task_id: &str,
        attempt: u32,
        agent_id: &str,
        consume_attempt: bool,
        requeue_deadline: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET state = 'queued', agent_id = NULL, lease_expires_at = NULL, updated_at = $1, \
             attempt = CASE WHEN $2 = 1 THEN attempt ELSE attempt - 1 END, \
             queue_deadline_at = CASE WHEN queue_deadline_at < $3 THEN $3 ELSE queue_deadline_at END \
             WHERE id = $4 AND org_id = $5 AND attempt = $6 AND agent_id = $7 AND state IN ('dispatched', 'running') AND cancel_requested = 0",
        )
        .bind(paddock_proto::now_ms())
        .bind(i64::from(consume_attempt))
        .bind(requeue_deadline)
        .bind(task_id)
        .bind(org_id)
        .bind(i64::from(attempt))
        .bind(agent_id)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// After an agent reconnects: tasks the store says it holds but that it did not list in
    /// `hello` (a `dispatch` or hand-back lost with the old connection) are detached from it
    /// and their lease expired, so the reaper re-queues or fails them like any lost attempt.
    /// Only tasks dispatched before `connected_at` (when this connection's `hello` arrived)
    /// are candidates: the new connection is in the hub before this runs, and a task the
    /// dispatcher hands it meanwhile is not one the agent forgot. Returns how many were
    /// detached.
    ///
    /// # Errors
    /// Database failure.
    pub async fn detach_unlisted_tasks(
        &self,
        org_id: &str,
        agent_id: &str,
        listed: &[String],
        connected_at: i64,
    ) -> Result<u64> {
        let not_in = if listed.is_empty() {
            String::new()
        } else {
            format!(" AND id NOT IN ({})", placeholders(5, listed.len()))
        };
        let sql = format!(
            "UPDATE tasks SET agent_id = NULL, lease_expires_at = 0, updated_at = $1 WHERE org_id = $2 AND agent_id = $3 AND state IN ('dispatched', 'running') AND dispatched_at < $4{not_in}"
        );
        let mut q = sqlx::query(&sql)
            .bind(paddock_proto::now_ms())
            .bind(org_id)
            .bind(agent_id)
            .bind(connected_at);
        for id in listed {
            q = q.bind(id);
        }
        Ok(q.execute(&mut *self.w().await?).await?.rows_affected())
    }

    /// Marks the current attempt as started by its agent (`accepted`).
    ///
    /// # Errors
    /// Database failure.
    pub async fn mark_task_running(
        &self,
        task_id: &str,
        attempt: u32,
        agent_id: &str,
        now: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET state = 'running', started_at = $1, updated_at = $1 WHERE id = $2 AND attempt = $3 AND agent_id = $4 AND state = 'dispatched'",
        )
        .bind(now)
        .bind(task_id)
        .bind(i64::from(attempt))
        .bind(agent_id)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Re-binds a task an agent reports as still running after a reconnect: same attempt,
    /// same org. A task that was re-queued meanwhile (and not yet re-dispatched) is taken
    /// back. Returns `false` when the attempt is no longer the agent's (it should stop it).
    ///
    /// # Errors
    /// Database failure.
    pub async fn rebind_task(
        &self,
        org_id: &str,
        task_id: &str,
        attempt: u32,
        agent_id: &str,
        lease_until: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET agent_id = $1, lease_expires_at = $2, state = CASE WHEN state = 'queued' THEN 'running' ELSE state END, updated_at = $3 \
             WHERE id = $4 AND org_id = $5 AND attempt = $6 AND state IN ('queued', 'dispatched', 'running') AND cancel_requested = 0 AND agent_id = $1",
        )
        .bind(agent_id)
        .bind(lease_until)
        .bind(paddock_proto::now_ms())
        .bind(task_id)
        .bind(org_id)
        .bind(i64::from(attempt))
        .execute(&mut *self.w().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores the result of an attempt if, and only if, it is the current attempt, the task
    /// has not finished, and the reporting agent holds the attempt (after a lease-expiry
    /// re-queue the task remembers its last agent until it is dispatched again, so that agent's
    /// late result still lands): the first completion wins, late or duplicate results are
    /// ignored, and no agent can complete a task it was never given.
    /// Returns whether the result was stored. The result is kept `ttl_ms`.
    ///
    /// # Errors
    /// Database failure.
    pub async fn complete_task(
        &self,
        org_id: &str,
        agent_id: &str,
        result: &TaskResult,
        ttl_ms: i64,
    ) -> Result<bool> {
        let stored = self
            .complete_tasks(org_id, agent_id, std::slice::from_ref(result), ttl_ms)
            .await?;
        Ok(matches!(stored.as_slice(), [Some(_)]))
    }

    /// [`Store::complete_task`] for several results of one agent, in one transaction (one
    /// commit for all that arrived together). Returns, in order, the stored task's row for
    /// each result that was stored (so a waiter need not read it back), `None` for each that
    /// was not.
    ///
    /// # Errors
    /// Database failure (then none is stored), or a corrupt row.
    pub async fn complete_tasks(
        &self,
        org_id: &str,
        agent_id: &str,
        results: &[TaskResult],
        ttl_ms: i64,
    ) -> Result<Vec<Option<TaskRow>>> {
        if results.is_empty() {
            return Ok(Vec::new());
        }
        let mut w = self.w().await?;
        if let Some(raw) = w.raw() {
            return crate::hot::complete(raw, org_id, agent_id, results, ttl_ms);
        }
        let mut stored = Vec::with_capacity(results.len());
        if let [one] = results {
            let row = complete_query(org_id, agent_id, one, ttl_ms)?
                .fetch_optional(&mut *w)
                .await?;
            stored.push(row.as_ref().map(task_from_row).transpose()?);
            return Ok(stored);
        }
        let mut tx = w.begin().await?;
        for r in results {
            let row = complete_query(org_id, agent_id, r, ttl_ms)?
                .fetch_optional(&mut *tx)
                .await?;
            stored.push(row.as_ref().map(task_from_row).transpose()?);
        }
        tx.commit().await?;
        Ok(stored)
    }

    /// Cancels a task. A queued task is finished at once (`Ok(Some(Canceled))`); a dispatched
    /// or running one is flagged so it is never re-dispatched, and the caller tells its agent
    /// (`Ok(Some(Running))`). `Ok(None)`: not found or already finished.
    ///
    /// # Errors
    /// Database failure.
    pub async fn cancel_task(
        &self,
        org_id: &str,
        task_id: &str,
        ttl_ms: i64,
    ) -> Result<Option<(TaskState, Option<String>, u32)>> {
        let now = paddock_proto::now_ms();
        let done = sqlx::query(
            "UPDATE tasks SET state = 'canceled', cancel_requested = 1, finished_at = $1, updated_at = $1, error_code = $2, error_message = 'canceled before dispatch', expires_at = $3 WHERE id = $4 AND org_id = $5 AND state = 'queued'",
        )
        .bind(now)
        .bind(ErrorCode::TaskCanceled.as_str())
        .bind(now + ttl_ms)
        .bind(task_id)
        .bind(org_id)
        .execute(&mut *self.w().await?)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Some((TaskState::Canceled, None, 0)));
        }
        let row = sqlx::query(
            "UPDATE tasks SET cancel_requested = 1, updated_at = $1 WHERE id = $2 AND org_id = $3 AND state IN ('dispatched', 'running') RETURNING agent_id, attempt",
        )
        .bind(now)
        .bind(task_id)
        .bind(org_id)
        .fetch_optional(&mut *self.w().await?)
        .await?;
        Ok(row.map(|r| {
            (
                TaskState::Running,
                r.get::<Option<String>, _>("agent_id"),
                r.get::<i64, _>("attempt") as u32,
            )
        }))
    }

    /// Lease reaper: tasks whose lease expired. Those out of attempts (or canceled) fail with
    /// `AGENT_LOST`; the others go back to the queue, their queue deadline pushed to at least
    /// `requeue_deadline`. Returns (failed, requeued).
    ///
    /// # Errors
    /// Database failure.
    pub async fn expire_leases(
        &self,
        now: i64,
        ttl_ms: i64,
        requeue_deadline: i64,
    ) -> Result<(Vec<ReapedTask>, Vec<ReapedTask>)> {
        let failed = sqlx::query(
            "UPDATE tasks SET state = CASE WHEN cancel_requested = 1 THEN 'canceled' ELSE 'failed' END, \
             error_code = CASE WHEN cancel_requested = 1 THEN $4 ELSE $1 END, \
             error_message = CASE WHEN cancel_requested = 1 THEN 'canceled; the agent was lost before it confirmed' ELSE 'the agent running this task was lost and no attempts remain' END, \
             finished_at = $2, updated_at = $2, expires_at = $3, lease_expires_at = NULL \
             WHERE state IN ('dispatched', 'running') AND lease_expires_at < $2 AND (attempt >= max_attempts OR cancel_requested = 1) RETURNING id, org_id",
        )
        .bind(ErrorCode::AgentLost.as_str())
        .bind(now)
        .bind(now + ttl_ms)
        .bind(ErrorCode::TaskCanceled.as_str())
        .fetch_all(&mut *self.w().await?)
        .await?;
        let requeued = sqlx::query(
            "UPDATE tasks SET state = 'queued', lease_expires_at = NULL, updated_at = $1, queue_deadline_at = CASE WHEN queue_deadline_at < $2 THEN $2 ELSE queue_deadline_at END \
             WHERE state IN ('dispatched', 'running') AND lease_expires_at < $1 RETURNING id, org_id",
        )
        .bind(now)
        .bind(requeue_deadline)
        .fetch_all(&mut *self.w().await?)
        .await?;
        let map = |rows: Vec<AnyRow>| {
            rows.iter()
                .map(|r| ReapedTask {
                    id: r.get("id"),
                    org_id: r.get("org_id"),
                })
                .collect::<Vec<_>>()
        };
        Ok((map(failed), map(requeued)))
    }

    /// Queue reaper: queued tasks past their deadline fail, with `QUEUE_TIMEOUT` if they never
    /// ran, `AGENT_LOST` if they were re-queued after losing their agent.
    ///
    /// # Errors
    /// Database failure.
    pub async fn expire_queued(&self, now: i64, ttl_ms: i64) -> Result<Vec<ReapedTask>> {
        let rows = sqlx::query(
            "UPDATE tasks SET state = 'failed', error_code = CASE WHEN attempt = 0 THEN $1 ELSE $2 END, error_message = CASE WHEN attempt = 0 THEN 'no eligible agent took the task before its queue deadline' ELSE 'the agent running this task was lost and no agent took it again before its deadline' END, finished_at = $3, updated_at = $3, expires_at = $4 \
             WHERE state = 'queued' AND queue_deadline_at < $3 RETURNING id, org_id",
        )
        .bind(ErrorCode::QueueTimeout.as_str())
        .bind(ErrorCode::AgentLost.as_str())
        .bind(now)
        .bind(now + ttl_ms)
        .fetch_all(&mut *self.w().await?)
        .await?;
        Ok(rows
            .iter()
            .map(|r| ReapedTask {
                id: r.get("id"),
                org_id: r.get("org_id"),
            })
            .collect())
    }

    /// Results reaper: deletes finished tasks (with their output and events) whose results
    /// are older than their TTL. Returns how many tasks were deleted.
    ///
    /// # Errors
    /// Database failure.
    pub async fn delete_expired_results(&self, now: i64) -> Result<u64> {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM tasks WHERE expires_at < $1 LIMIT 1000")
                .bind(now)
                .fetch_all(&mut *self.w().await?)
                .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let list = placeholders(1, ids.len());
        let mut w = self.w().await?;
        let mut tx = w.begin().await?;
        for table in ["task_output", "task_events"] {
            let sql = format!("DELETE FROM {table} WHERE task_id IN ({list})");
            let mut q = sqlx::query(&sql);
            for id in &ids {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
        let sql = format!("DELETE FROM tasks WHERE id IN ({list})");
        let mut q = sqlx::query(&sql);
        for id in &ids {
            q = q.bind(id);
        }
        let done = q.execute(&mut *tx).await?;
        tx.commit().await?;
        drop(w);
        Ok(done.rows_affected())
    }

    /// Appends a live output chunk (idempotent on task, attempt and seq).
    ///
    /// # Errors
    /// Database failure.
    pub async fn append_output(
        &self,
        task_id: &str,
        attempt: u32,
        seq: u64,
        stream: &str,
        data: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO task_output (task_id, attempt, seq, stream, data, created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (task_id, attempt, seq) DO NOTHING",
        )
        .bind(task_id)
        .bind(i64::from(attempt))
        .bind(seq as i64)
        .bind(stream)
        .bind(data)
        .bind(paddock_proto::now_ms())
        .execute(&mut *self.w().await?)
        .await?;
        Ok(())
    }

    /// Output chunks of one attempt after `after_seq`, in order.
    ///
    /// # Errors
    /// Database failure.
    pub async fn read_output(
        &self,
        task_id: &str,
        attempt: u32,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<OutputRow>> {
        let rows = sqlx::query(
            "SELECT attempt, seq, stream, data FROM task_output WHERE task_id = $1 AND attempt = $2 AND seq > $3 ORDER BY seq LIMIT $4",
        )
        .bind(task_id)
        .bind(i64::from(attempt))
        .bind(after_seq as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .iter()
            .map(|r| OutputRow {
                attempt: r.get::<i64, _>("attempt") as u32,
                seq: r.get::<i64, _>("seq") as u64,
                stream: r.get("stream"),
                data: r.get("data"),
            })
            .collect())
    }

    /// Records a task event.
    ///
    /// # Errors
    /// Database failure.
    pub async fn add_event(
        &self,
        task_id: &str,
        attempt: u32,
        name: &str,
        payload: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO task_events (id, task_id, attempt, name, payload, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(task_id)
        .bind(i64::from(attempt))
        .bind(name)
        .bind(payload.to_string())
        .bind(paddock_proto::now_ms())
        .execute(&mut *self.w().await?)
        .await?;
        Ok(())
    }

    /// Records one event for each of several tasks in one statement.
    ///
    /// # Errors
    /// Database failure.
    pub async fn add_events(
        &self,
        events: &[(&str, u32)],
        name: &str,
        payload: &serde_json::Value,
    ) -> Result<()> {
        insert_events(&mut *self.w().await?, events, name, &payload.to_string()).await
    }

    /// Events of a task, oldest first.
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_events(&self, task_id: &str) -> Result<Vec<EventRow>> {
        let rows = sqlx::query(
            "SELECT id, attempt, name, payload, created_at FROM task_events WHERE task_id = $1 ORDER BY id",
        )
        .bind(task_id)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                let payload: String = r.get("payload");
                Ok(EventRow {
                    id: r.get("id"),
                    attempt: r.get::<i64, _>("attempt") as u32,
                    name: r.get("name"),
                    payload: serde_json::from_str(&payload)
                        .map_err(|e| corrupt("task_events.payload", e))?,
                    created_at: r.get("created_at"),
                })
            })
            .collect()
    }

    /// Tasks by state, for metrics.
    ///
    /// # Errors
    /// Database failure.
    pub async fn count_tasks_by_state(&self) -> Result<Vec<StateCount>> {
        // One part per partial index (queued, in flight, finished), so no part reads the
        // whole table.
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM tasks WHERE state = 'queued' GROUP BY state \
             UNION ALL SELECT state, COUNT(*) AS n FROM tasks WHERE state IN ('dispatched', 'running') GROUP BY state \
             UNION ALL SELECT state, COUNT(*) AS n FROM tasks WHERE expires_at IS NOT NULL AND state NOT IN ('queued', 'dispatched', 'running') GROUP BY state",
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(StateCount {
                    state: TaskState::parse(&r.get::<String, _>("state"))?,
                    count: r.get("n"),
                })
            })
            .collect())
    }

    /// Orgs that have queued tasks (for the dispatcher's periodic sweep).
    ///
    /// # Errors
    /// Database failure.
    pub async fn orgs_with_queued_tasks(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT org_id FROM tasks WHERE state = 'queued'")
                .fetch_all(&mut *self.w().await?)
                .await?,
        )
    }

    /// Which of `orgs` have queued tasks: one index probe per org (`tasks_queue_order`), so the
    /// cost does not grow with the length of the queue, unlike
    /// [`Store::orgs_with_queued_tasks`], which visits every queued row.
    ///
    /// # Errors
    /// Database failure.
    pub async fn orgs_with_queued_among(&self, orgs: &[&str]) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for chunk in orgs.chunks(200) {
            let sql = (1..=chunk.len())
                .map(|i| {
                    format!(
                        "SELECT ${i} AS org_id WHERE EXISTS (SELECT 1 FROM tasks WHERE org_id = ${i} AND state = 'queued')"
                    )
                })
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for org in chunk {
                q = q.bind(*org);
            }
            found.extend(q.fetch_all(&mut *self.w().await?).await?);
        }
        Ok(found)
    }
}

/// Ids (given or new) and insert rows of new tasks.
fn insert_rows(tasks: &[NewTask]) -> Result<(Vec<String>, Vec<InsertRow<'_>>)> {
    let mut ids = Vec::with_capacity(tasks.len());
    let mut rows = Vec::with_capacity(tasks.len());
    for task in tasks {
        let id = task.id.clone().unwrap_or_else(new_task_id);
        let required_tag = required_tag(task);
        let spec = serde_json::to_string(&task.spec).map_err(|e| corrupt("tasks.spec", e))?;
        rows.push(InsertRow {
            id: id.clone(),
            task,
            required_tag,
            spec,
        });
        ids.push(id);
    }
    Ok((ids, rows))
}

/// The control-plane tag a task requires (stored in `tasks.required_tag`).
fn required_tag(task: &NewTask) -> Option<String> {
    task.spec
        .selector
        .as_ref()
        .and_then(|s| s.required_tag().ok().flatten())
}

/// The payload of a `dispatched` event.
pub(crate) fn dispatched_payload(agent_id: &str) -> String {
    serde_json::json!({ "agentId": agent_id }).to_string()
}

/// One event for each of `events` (task, attempt) in one statement.
async fn insert_events(
    conn: &mut sqlx::AnyConnection,
    events: &[(&str, u32)],
    name: &str,
    payload: &str,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let values = value_rows(events.len(), 6, |b| format!("({})", placeholders(b, 6)));
    let sql = format!(
        "INSERT INTO task_events (id, task_id, attempt, name, payload, created_at) VALUES {values}"
    );
    let now = paddock_proto::now_ms();
    let mut q = sqlx::query(&sql);
    for (task_id, attempt) in events {
        q = q
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(*task_id)
            .bind(i64::from(*attempt))
            .bind(name)
            .bind(payload)
            .bind(now);
    }
    q.execute(conn).await?;
    Ok(())
}

/// The `dispatched` events of claimed rows (`RETURNING id, attempt, ...`), in the claim's
/// transaction.
async fn insert_dispatched_events(
    conn: &mut sqlx::AnyConnection,
    rows: &[AnyRow],
    payload: &str,
) -> Result<()> {
    let claimed: Vec<(String, u32)> = rows
        .iter()
        .map(|r| Ok((r.col("id")?, r.col::<i64>("attempt")? as u32)))
        .collect::<Result<_>>()?;
    let events: Vec<(&str, u32)> = claimed.iter().map(|(id, a)| (id.as_str(), *a)).collect();
    insert_events(conn, &events, "dispatched", payload).await
}

/// The completion statement (built once: `sqlx::query` needs a `&'static str` here).
static COMPLETE_SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The completion statement: $1 state, $2 now, $3 started, $4 exit code, $5 error code,
/// $6 error message, $7 result JSON, $8 expiry, $9 task, $10 org, $11 attempt, $12 agent.
pub(crate) fn complete_sql() -> &'static str {
    COMPLETE_SQL.get_or_init(|| {
        format!(
            "UPDATE tasks SET state = $1, finished_at = $2, updated_at = $2, started_at = COALESCE(started_at, $3), exit_code = $4, error_code = $5, error_message = $6, result = $7, expires_at = $8, lease_expires_at = NULL \
             WHERE id = $9 AND org_id = $10 AND attempt = $11 AND state IN ('queued', 'dispatched', 'running') AND agent_id = $12 \
             RETURNING {TASK_COLUMNS}"
        )
    })
}

/// The new state and the stored JSON of a result.
pub(crate) fn result_columns(result: &TaskResult) -> Result<(TaskState, String)> {
    let json = serde_json::to_string(result).map_err(|e| corrupt("tasks.result", e))?;
    Ok((TaskState::from_result(result.status), json))
}

/// The statement of [`Store::complete_task`] for `result`, bound.
fn complete_query<'q>(
    org_id: &'q str,
    agent_id: &'q str,
    result: &'q TaskResult,
    ttl_ms: i64,
) -> Result<sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>> {
    let (state, json) = result_columns(result)?;
    let now = paddock_proto::now_ms();
    Ok(sqlx::query(complete_sql())
        .bind(state.as_str())
        .bind(now)
        .bind(result.started_at_ms)
        .bind(result.exit_code.map(i64::from))
        .bind(result.error_code.map(|c| c.as_str().to_string()))
        .bind(result.error_message.clone())
        .bind(json)
        .bind(now + ttl_ms)
        .bind(&result.task_id)
        .bind(org_id)
        .bind(i64::from(result.attempt))
        .bind(agent_id))
}

/// An org's dispatched and running tasks ($1 org), for `GATEWAY_ORG_MAX_INFLIGHT`.
///
/// From the in-flight index (`tasks_in_flight`, partial): on SQLite, whose planner has no
/// statistics, `+org_id` keeps it off the org's index, which would visit every task the org
/// ever ran; the in-flight rows of all orgs are bounded by the agents' slots.
pub(crate) fn inflight_sql(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => {
            "SELECT COUNT(*) FROM tasks WHERE org_id = $1 AND state IN ('dispatched', 'running')"
        }
        Dialect::Sqlite => {
            "SELECT COUNT(*) FROM tasks WHERE +org_id = ?1 AND state IN ('dispatched', 'running')"
        }
    }
}

/// The claim statement for `req`, or `None` when it can claim nothing (an instance's agent
/// without tags). Bound values: $1 agent, $2 lease, $3 now, $4 org, $5 limit, then the
/// kinds, tags and backends from $6 on, in that order ([`claim_values`]).
pub(crate) fn claim_sql(dialect: Dialect, req: &ClaimRequest<'_>) -> Option<String> {
    // The pick is a materialised CTE: as a plain `IN (SELECT .. LIMIT)` PostgreSQL may
    // evaluate the subquery more than once and claim past the limit.
    // $1 agent, $2 lease, $3 now, $4 org, $5 limit, then kinds, tags, backends.
    let filter = pick_filter(req, 6)?;
    // SQLite: `+state` keeps the planner off the state index for the outer UPDATE, which
    // would otherwise visit every queued row to find the picked ids (not the primary key).
    let (lock, outer_state) = match dialect {
        Dialect::Postgres => ("FOR UPDATE SKIP LOCKED", "state"),
        Dialect::Sqlite => ("", "+state"),
    };
    Some(format!(
        "WITH picked AS MATERIALIZED (SELECT id FROM tasks WHERE org_id = $4 AND state = 'queued' AND cancel_requested = 0 AND queue_deadline_at > $3 \
             AND {filter} ORDER BY created_at, id LIMIT $5 {lock}) \
             UPDATE tasks SET state = 'dispatched', agent_id = $1, attempt = attempt + 1, lease_expires_at = $2, dispatched_at = $3, started_at = NULL, updated_at = $3 \
             WHERE {outer_state} = 'queued' AND id IN (SELECT id FROM picked) \
             RETURNING id, attempt, spec, created_at"
    ))
}

/// What a claim for `req` may take besides its org, state and deadline: kind, control-plane
/// tag and backend, with the kinds, tags and backends ([`claim_values`]) bound from `$first`
/// on. `None` when it can take nothing (an instance's agent without tags).
fn pick_filter(req: &ClaimRequest<'_>, first: usize) -> Option<String> {
    let mut next = first;
    let kinds = placeholders(next, req.kinds.len());
    next += req.kinds.len();
    let tag_clause = if req.tags.is_empty() {
        if req.instance {
            return None;
        }
        "required_tag IS NULL".to_string()
    } else {
        let p = placeholders(next, req.tags.len());
        next += req.tags.len();
        if req.instance {
            format!("required_tag IN ({p})")
        } else {
            format!("(required_tag IS NULL OR required_tag IN ({p}))")
        }
    };
    let backend_clause = if req.backends.is_empty() {
        "backend IS NULL".to_string()
    } else {
        let p = placeholders(next, req.backends.len());
        format!("(backend IS NULL OR backend IN ({p}))")
    };
    Some(format!(
        "kind IN ({kinds}) AND {tag_clause} AND {backend_clause}"
    ))
}

/// [`Store::insert_assigned`] on PostgreSQL: one statement per assigned task checks for
/// queued work ahead, inserts the task (dispatched or queued) and its event, so a lone
/// submission costs one round trip to the server and no `BEGIN`/`COMMIT` (a statement
/// commits by itself); a batch runs its statements in one transaction.
async fn assigned_pg(
    conn: &mut sqlx::AnyConnection,
    rows: &[InsertRow<'_>],
    assigned: &[Option<ClaimRequest<'_>>],
    now: i64,
) -> Result<Vec<bool>> {
    if rows.len() == 1 {
        return assigned_pg_statements(conn, rows, assigned, now).await;
    }
    let mut tx = conn.begin().await?;
    let dispatched = assigned_pg_statements(&mut tx, rows, assigned, now).await?;
    tx.commit().await?;
    Ok(dispatched)
}

/// The statements of [`assigned_pg`], on `c`.
async fn assigned_pg_statements(
    c: &mut sqlx::AnyConnection,
    rows: &[InsertRow<'_>],
    assigned: &[Option<ClaimRequest<'_>>],
    now: i64,
) -> Result<Vec<bool>> {
    let mut dispatched = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let Some((req, filter)) = assigned
            .get(i)
            .and_then(Option::as_ref)
            .and_then(|req| Some((req, pick_filter(req, 14)?)))
        else {
            insert_query(&insert_statement(1), std::slice::from_ref(r), now)
                .execute(&mut *c)
                .await?;
            dispatched.push(false);
            continue;
        };
        let sql = format!(
            "WITH ahead AS (SELECT EXISTS (SELECT 1 FROM tasks WHERE org_id = $2 AND state = 'queued' AND cancel_requested = 0 AND queue_deadline_at > $11 AND {filter}) AS waiting), \
             t AS (INSERT INTO tasks (id, org_id, kind, required_tag, backend, spec, state, attempt, max_attempts, agent_id, lease_expires_at, queue_deadline_at, created_at, updated_at, dispatched_at) \
               SELECT $1, $2, $3, $4, $5, $6, CASE WHEN waiting THEN 'queued' ELSE 'dispatched' END, CASE WHEN waiting THEN 0 ELSE 1 END, $7, \
               CASE WHEN waiting THEN NULL ELSE $8 END, CASE WHEN waiting THEN NULL ELSE $9 END, $10, $11, $11, CASE WHEN waiting THEN NULL ELSE $11 END FROM ahead \
               RETURNING id, state), \
             e AS (INSERT INTO task_events (id, task_id, attempt, name, payload, created_at) SELECT $12, id, 1, 'dispatched', $13, $11 FROM t WHERE state = 'dispatched') \
             SELECT state FROM t"
        );
        let mut q = dispatched_row_query(&sql, r, req)
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(dispatched_payload(req.agent_id));
        for v in claim_values(req) {
            q = q.bind(v.as_str());
        }
        let state: String = q.fetch_one(&mut *c).await?.try_get("state")?;
        dispatched.push(state == "dispatched");
    }
    Ok(dispatched)
}

/// Whether queued work that `req` would claim is waiting ($1 org, $2 now, then the values
/// of [`claim_values`]).
async fn queued_for(conn: &mut sqlx::AnyConnection, req: &ClaimRequest<'_>) -> Result<bool> {
    let Some(filter) = pick_filter(req, 3) else {
        return Ok(false);
    };
    let sql = format!(
        "SELECT 1 FROM tasks WHERE org_id = $1 AND state = 'queued' AND cancel_requested = 0 AND queue_deadline_at > $2 AND {filter} LIMIT 1"
    );
    let mut q = sqlx::query(&sql).bind(req.org_id).bind(req.now);
    for v in claim_values(req) {
        q = q.bind(v.as_str());
    }
    Ok(q.fetch_optional(conn).await?.is_some())
}

impl ClaimRequest<'_> {
    /// Whether this claim would take `task` if it were queued: the conditions of
    /// [`claim_sql`]'s pick, in memory (keep the two in step), for a new task (not
    /// cancelled). The org's in-flight cap is not looked at. An instance's claim depends on
    /// its instance's row as well: this says no for it.
    pub fn would_take(&self, task: &NewTask) -> bool {
        let tag_ok = match required_tag(task) {
            None => true,
            Some(t) => self.tags.contains(&t),
        };
        let backend_ok = task
            .spec
            .sandbox
            .backend
            .as_ref()
            .is_none_or(|b| self.backends.contains(b));
        !self.instance
            && task.org_id == self.org_id
            && task.queue_deadline_at > self.now
            && self.kinds.contains(&task.spec.kind)
            && tag_ok
            && backend_ok
    }
}

/// The values the claim statement binds from $6 on: kinds, tags, backends.
pub(crate) fn claim_values<'a>(req: &ClaimRequest<'a>) -> impl Iterator<Item = &'a String> {
    req.kinds.iter().chain(req.tags).chain(req.backends)
}

/// The claim through sqlx, inside the caller's transaction (on PostgreSQL the advisory lock
/// and the row locks live until commit). An ordinary claim on SQLite goes through
/// [`crate::hot::claim`] instead.
async fn claim_rows(
    conn: &mut sqlx::AnyConnection,
    dialect: Dialect,
    req: &ClaimRequest<'_>,
) -> Result<Vec<AnyRow>> {
    let mut limit = i64::from(req.limit);
    if let Some(max) = req.org_max_inflight {
        if dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(req.org_id)
                .execute(&mut *conn)
                .await?;
        }
        let inflight: i64 = sqlx::query_scalar(inflight_sql(dialect))
            .bind(req.org_id)
            .fetch_one(&mut *conn)
            .await?;
        limit = limit.min(i64::from(max) - inflight);
        if limit <= 0 {
            return Ok(Vec::new());
        }
    }
    let Some(sql) = claim_sql(dialect, req) else {
        return Ok(Vec::new());
    };
    let mut q = sqlx::query(&sql)
        .bind(req.agent_id)
        .bind(req.lease_until)
        .bind(req.now)
        .bind(req.org_id)
        .bind(limit);
    for v in claim_values(req) {
        q = q.bind(v);
    }
    Ok(q.fetch_all(&mut *conn).await?)
}
