//! Instances (machines, VMs or containers that run one Paddock agent) and the pools that keep
//! them warm (issue 4; seeds 000, 002, 003).
//!
//! An instance's agent row has the instance's id (`agents.pool = 'instance'`), so dispatch,
//! leases and results are the same as for any agent. What is instance-specific lives here:
//! the lifecycle (`starting` → `provisioning` → `ready` ⇄ `busy` → `draining` →
//! `terminated`, with `disconnected` and `failed` on the side), bootstrap attempts with a
//! cooldown, and the pool's ceiling. Every transition is one conditional `UPDATE`, so two
//! gateway replicas (or a replica and a supervisor) can never both trigger a bootstrap or
//! both take the last slot of a pool.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Connection as _, Row};

use crate::{Dialect, Result, Store, StoreError, json_list, parse_json_list};

/// Lifecycle of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Recorded; bootstrap not triggered yet (or waiting for its cooldown).
    Starting,
    /// Bootstrap triggered; waiting for the runtime to connect.
    Provisioning,
    /// Its agent is connected and idle.
    Ready,
    /// Its agent runs a task.
    Busy,
    /// Takes no more work (deregistered, or `max_use` reached): to be destroyed.
    Draining,
    /// Was ready; its agent is gone.
    Disconnected,
    /// Gave up: bootstrap failed `VM_BOOTSTRAP_MAX_ATTEMPTS` times, or the provider failed.
    Failed,
    /// Destroyed.
    Terminated,
}

impl InstanceStatus {
    /// Every status.
    pub const ALL: [InstanceStatus; 8] = [
        InstanceStatus::Starting,
        InstanceStatus::Provisioning,
        InstanceStatus::Ready,
        InstanceStatus::Busy,
        InstanceStatus::Draining,
        InstanceStatus::Disconnected,
        InstanceStatus::Failed,
        InstanceStatus::Terminated,
    ];

    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Starting => "starting",
            InstanceStatus::Provisioning => "provisioning",
            InstanceStatus::Ready => "ready",
            InstanceStatus::Busy => "busy",
            InstanceStatus::Draining => "draining",
            InstanceStatus::Disconnected => "disconnected",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Terminated => "terminated",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<InstanceStatus> {
        InstanceStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// An instance as stored (and as the API shows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Instance id (also its agent's id).
    #[serde(rename = "instanceId")]
    pub id: String,
    /// Org.
    pub org_id: String,
    /// The user it belongs to (mode `user`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The pool it belongs to (mode `pool`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<String>,
    /// `user` or `pool`.
    pub mode: String,
    /// Lifecycle state.
    #[schema(value_type = String)]
    pub status: InstanceStatus,
    /// Provider that makes it (`command`, `process`, `docker`).
    pub provider: String,
    /// Bootstrap attempts so far.
    pub bootstrap_attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Tasks dispatched to it.
    pub uses: u32,
    /// Tasks it may take before it drains (0 = unlimited).
    pub max_use: u32,
    /// Timestamps, ms since the Unix epoch.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// Last bootstrap trigger.
    pub last_bootstrap_at: Option<i64>,
    /// First time its runtime connected.
    pub ready_at: Option<i64>,
    /// Last connection.
    pub connected_at: Option<i64>,
    /// Last disconnection.
    pub disconnected_at: Option<i64>,
    /// Last time it took a task.
    pub busy_at: Option<i64>,
    /// Last time it became idle.
    pub idle_since: Option<i64>,
    /// Destruction.
    pub terminated_at: Option<i64>,
}

impl Instance {
    /// Whether it counts against its pool's ceiling (anything not yet destroyed).
    pub fn is_live(&self) -> bool {
        self.status != InstanceStatus::Terminated
    }
}

const INSTANCE_COLUMNS: &str = "id, org_id, user_id, pool_id, mode, status, provider, bootstrap_attempts, last_error, uses, max_use, created_at, updated_at, last_bootstrap_at, ready_at, connected_at, disconnected_at, busy_at, idle_since, terminated_at";

fn instance_from_row(r: &AnyRow) -> Result<Instance> {
    let status: String = r.get("status");
    Ok(Instance {
        id: r.get("id"),
        org_id: r.get("org_id"),
        user_id: r.get("user_id"),
        pool_id: r.get("pool_id"),
        mode: r.get("mode"),
        status: InstanceStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
            what: "instances.status",
            detail: status.clone(),
        })?,
        provider: r.get("provider"),
        bootstrap_attempts: r.get::<i64, _>("bootstrap_attempts").max(0) as u32,
        last_error: r.get("last_error"),
        uses: r.get::<i64, _>("uses").max(0) as u32,
        max_use: r.get::<i64, _>("max_use").max(0) as u32,
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        last_bootstrap_at: r.get("last_bootstrap_at"),
        ready_at: r.get("ready_at"),
        connected_at: r.get("connected_at"),
        disconnected_at: r.get("disconnected_at"),
        busy_at: r.get("busy_at"),
        idle_since: r.get("idle_since"),
        terminated_at: r.get("terminated_at"),
    })
}

/// A pool as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pool {
    /// Pool id.
    pub id: String,
    /// Org.
    pub org_id: String,
    /// Name, unique in the org.
    pub name: String,
    /// Provider (`command`, `process`, `docker`).
    pub provider: String,
    /// Control-plane tags given to its agents (besides `pool:<name>` and
    /// `instance:<id>`): what tasks select.
    pub labels: Vec<String>,
    /// Idle floor.
    pub min: u32,
    /// Ceiling on live instances.
    pub max: u32,
    /// Desired size, clamped into `[min, max]`.
    pub target: Option<u32>,
    /// Tasks per instance before it is destroyed (0 = unlimited; 1 = one job per instance).
    pub max_use: u32,
    /// An instance not ready this long after it was created is destroyed.
    pub boot_deadline_ms: u64,
    /// Creation time.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
}

impl Pool {
    /// The control-plane tags of one of its instances.
    pub fn instance_tags(&self, instance_id: &str) -> Vec<String> {
        let mut tags = self.labels.clone();
        tags.push(format!("pool:{}", self.name));
        tags.push(format!("instance:{instance_id}"));
        tags.sort();
        tags.dedup();
        tags
    }

    /// The instances this pool should have: `min(max, busy + queued + floor)`, never below
    /// the floor, where the floor is `min` raised to `target` (clamped into `[min, max]`).
    /// The formula ARC scale sets use; the supervisor and the metrics share it.
    pub fn desired(&self, busy: u32, queued: u32) -> u32 {
        let max = self.max.max(self.min);
        let floor = self.target.map_or(self.min, |t| t.clamp(self.min, max));
        busy.saturating_add(queued)
            .saturating_add(floor)
            .min(max)
            .max(floor)
    }

    /// The tags a task may select to be served by this pool.
    pub fn demand_tags(&self) -> Vec<String> {
        let mut tags = self.labels.clone();
        tags.push(format!("pool:{}", self.name));
        tags.sort();
        tags.dedup();
        tags
    }
}

const POOL_COLUMNS: &str = "id, org_id, name, provider, labels, min_size, max_size, target_size, max_use, boot_deadline_ms, created_at, updated_at";

fn pool_from_row(r: &AnyRow) -> Result<Pool> {
    Ok(Pool {
        id: r.get("id"),
        org_id: r.get("org_id"),
        name: r.get("name"),
        provider: r.get("provider"),
        labels: parse_json_list("pools.labels", &r.get::<String, _>("labels"))?,
        min: r.get::<i64, _>("min_size").max(0) as u32,
        max: r.get::<i64, _>("max_size").max(0) as u32,
        target: r
            .get::<Option<i64>, _>("target_size")
            .map(|v| v.max(0) as u32),
        max_use: r.get::<i64, _>("max_use").max(0) as u32,
        boot_deadline_ms: r.get::<i64, _>("boot_deadline_ms").max(0) as u64,
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

/// What `upsert_pool` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPool<'a> {
    /// Name.
    pub name: &'a str,
    /// Provider.
    pub provider: &'a str,
    /// Labels.
    pub labels: &'a [String],
    /// Floor.
    pub min: u32,
    /// Ceiling.
    pub max: u32,
    /// Target.
    pub target: Option<u32>,
    /// Tasks per instance.
    pub max_use: u32,
    /// Boot deadline.
    pub boot_deadline_ms: u64,
}

/// The pool already has `max` live instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the pool already has {live} live instances (max {max})")]
pub struct PoolCapacityError {
    /// Live instances.
    pub live: u32,
    /// Ceiling.
    pub max: u32,
}

/// The answer to a bootstrap request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapDecision {
    /// This caller must run the bootstrap command now (it holds attempt `attempt`).
    Triggered {
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// Connected already (`ready` or `busy`).
    Ready,
    /// A bootstrap is in flight (`provisioning`), or the last one failed and the cooldown
    /// has not passed: retry after this long.
    Wait {
        /// Milliseconds.
        retry_after_ms: u64,
    },
    /// Gave up after the maximum number of attempts; only a forced rebootstrap restarts it.
    Failed,
    /// Draining or terminated: it takes no more work.
    Gone,
}

impl Store {
    /// Creates or updates a pool (by org and name).
    ///
    /// # Errors
    /// Database failure.
    pub async fn upsert_pool(&self, org_id: &str, p: &NewPool<'_>) -> Result<Pool> {
        let now = paddock_proto::now_ms();
        sqlx::query(
            "INSERT INTO pools (id, org_id, name, provider, labels, min_size, max_size, target_size, max_use, boot_deadline_ms, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
             ON CONFLICT (org_id, name) DO UPDATE SET provider = $4, labels = $5, min_size = $6, max_size = $7, target_size = $8, max_use = $9, boot_deadline_ms = $10, updated_at = $11",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(org_id)
        .bind(p.name)
        .bind(p.provider)
        .bind(json_list(p.labels))
        .bind(i64::from(p.min))
        .bind(i64::from(p.max))
        .bind(p.target.map(i64::from))
        .bind(i64::from(p.max_use))
        .bind(p.boot_deadline_ms.min(i64::MAX as u64) as i64)
        .bind(now)
        .execute(&mut *self.w().await?)
        .await?;
        self.get_pool(org_id, p.name)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                what: "pools",
                detail: "upserted pool not found".into(),
            })
    }

    /// A pool by org and name.
    ///
    /// # Errors
    /// Database failure.
    pub async fn get_pool(&self, org_id: &str, name: &str) -> Result<Option<Pool>> {
        let row = sqlx::query(&format!(
            "SELECT {POOL_COLUMNS} FROM pools WHERE org_id = $1 AND name = $2"
        ))
        .bind(org_id)
        .bind(name)
        .fetch_optional(&mut *self.w().await?)
        .await?;
        row.as_ref().map(pool_from_row).transpose()
    }

    /// A pool by id.
    ///
    /// # Errors
    /// Database failure.
    pub async fn get_pool_by_id(&self, pool_id: &str) -> Result<Option<Pool>> {
        let row = sqlx::query(&format!("SELECT {POOL_COLUMNS} FROM pools WHERE id = $1"))
            .bind(pool_id)
            .fetch_optional(&mut *self.w().await?)
            .await?;
        row.as_ref().map(pool_from_row).transpose()
    }

    /// The pools of an org, by name.
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_pools(&self, org_id: &str) -> Result<Vec<Pool>> {
        let rows = sqlx::query(&format!(
            "SELECT {POOL_COLUMNS} FROM pools WHERE org_id = $1 ORDER BY name"
        ))
        .bind(org_id)
        .fetch_all(&mut *self.w().await?)
        .await?;
        rows.iter().map(pool_from_row).collect()
    }

    /// Queued tasks of the pool's org that select one of its labels (`selector.tag`) or
    /// `pool:<name>`: the demand the supervisor scales for.
    ///
    /// # Errors
    /// Database failure.
    pub async fn pool_queued_demand(&self, pool: &Pool, now: i64) -> Result<u32> {
        let tags = pool.demand_tags();
        let list = crate::placeholders(3, tags.len());
        let sql = format!(
            "SELECT COUNT(*) FROM tasks WHERE org_id = $1 AND state = 'queued' AND cancel_requested = 0 AND queue_deadline_at > $2 AND required_tag IN ({list})"
        );
        let mut q = sqlx::query_scalar::<_, i64>(&sql)
            .bind(&pool.org_id)
            .bind(now);
        for t in &tags {
            q = q.bind(t);
        }
        Ok(q.fetch_one(&mut *self.w().await?).await?.max(0) as u32)
    }

    /// Creates a pool member (`starting`) with its agent row, unless the pool already has
    /// `max` live instances. Safe against concurrent callers on both databases.
    ///
    /// # Errors
    /// Database failure; `Ok(Err(_))` when the pool is full.
    pub async fn create_pool_instance(
        &self,
        pool: &Pool,
    ) -> Result<std::result::Result<Instance, PoolCapacityError>> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = paddock_proto::now_ms();
        let mut w = self.w().await?;
        let mut tx = w.begin().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT id FROM pools WHERE id = $1 FOR UPDATE")
                .bind(&pool.id)
                .execute(&mut *tx)
                .await?;
        } else {
            // Take SQLite's write lock before counting.
            sqlx::query("UPDATE pools SET updated_at = updated_at WHERE id = $1")
                .bind(&pool.id)
                .execute(&mut *tx)
                .await?;
        }
        let live: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM instances WHERE pool_id = $1 AND status <> 'terminated'",
        )
        .bind(&pool.id)
        .fetch_one(&mut *tx)
        .await?;
        let live = live.max(0) as u32;
        if live >= pool.max {
            tx.rollback().await?;
            return Ok(Err(PoolCapacityError {
                live,
                max: pool.max,
            }));
        }
        sqlx::query(
            "INSERT INTO instances (id, org_id, pool_id, mode, status, provider, max_use, created_at, updated_at) VALUES ($1, $2, $3, 'pool', 'starting', $4, $5, $6, $6)",
        )
        .bind(&id)
        .bind(&pool.org_id)
        .bind(&pool.id)
        .bind(&pool.provider)
        .bind(i64::from(pool.max_use))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        insert_instance_agent(&mut tx, &id, &pool.org_id, &pool.instance_tags(&id), now).await?;
        tx.commit().await?;
        drop(w);
        let inst = self.find_instance(&id).await?.ok_or(StoreError::Corrupt {
            what: "instances",
            detail: "inserted instance not found".into(),
        })?;
        Ok(Ok(inst))
    }

    /// The live instance of a user (seed 000), created `starting` if there is none.
    ///
    /// # Errors
    /// Database failure.
    pub async fn ensure_user_instance(
        &self,
        org_id: &str,
        user_id: &str,
        provider: &str,
    ) -> Result<Instance> {
        if let Some(inst) = self.user_instance(org_id, user_id).await? {
            return Ok(inst);
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = paddock_proto::now_ms();
        let mut w = self.w().await?;
        let mut tx = w.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO instances (id, org_id, user_id, mode, status, provider, created_at, updated_at) VALUES ($1, $2, $3, 'user', 'starting', $4, $5, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(org_id)
        .bind(user_id)
        .bind(provider)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            let tags = vec![format!("instance:{id}"), format!("user:{user_id}")];
            insert_instance_agent(&mut tx, &id, org_id, &tags, now).await?;
        }
        tx.commit().await?;
        drop(w);
        self.user_instance(org_id, user_id)
            .await?
            .ok_or(StoreError::Corrupt {
                what: "instances",
                detail: "user instance not found after insert".into(),
            })
    }

    /// The live (not terminated) instance of a user.
    ///
    /// # Errors
    /// Database failure.
    pub async fn user_instance(&self, org_id: &str, user_id: &str) -> Result<Option<Instance>> {
        let row = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE org_id = $1 AND user_id = $2 AND terminated_at IS NULL"
        ))
        .bind(org_id)
        .bind(user_id)
        .fetch_optional(&mut *self.w().await?)
        .await?;
        row.as_ref().map(instance_from_row).transpose()
    }

    /// An instance of an org.
    ///
    /// # Errors
    /// Database failure.
    pub async fn get_instance(&self, org_id: &str, id: &str) -> Result<Option<Instance>> {
        Ok(self.find_instance(id).await?.filter(|i| i.org_id == org_id))
    }

    /// An instance by id, whatever its org (token verification).
    ///
    /// # Errors
    /// Database failure.
    pub async fn find_instance(&self, id: &str) -> Result<Option<Instance>> {
        let row = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.w().await?)
        .await?;
        row.as_ref().map(instance_from_row).transpose()
    }

    /// Instances of an org (optionally of one pool), oldest first. Terminated ones are
    /// included only with `include_terminated`.
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_instances(
        &self,
        org_id: &str,
        pool_id: Option<&str>,
        include_terminated: bool,
    ) -> Result<Vec<Instance>> {
        let mut sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE org_id = $1");
        if pool_id.is_some() {
            sql.push_str(" AND pool_id = $2");
        }
        if !include_terminated {
            sql.push_str(" AND status <> 'terminated'");
        }
        sql.push_str(" ORDER BY created_at, id");
        let mut q = sqlx::query(&sql).bind(org_id);
        if let Some(p) = pool_id {
            q = q.bind(p);
        }
        let rows = q.fetch_all(&mut *self.w().await?).await?;
        rows.iter().map(instance_from_row).collect()
    }

    /// Every pool of every org (metrics).
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_all_pools(&self) -> Result<Vec<Pool>> {
        let rows = sqlx::query(&format!(
            "SELECT {POOL_COLUMNS} FROM pools ORDER BY org_id, name"
        ))
        .fetch_all(&mut *self.w().await?)
        .await?;
        rows.iter().map(pool_from_row).collect()
    }

    /// Counts of instances by status (metrics).
    ///
    /// # Errors
    /// Database failure.
    pub async fn count_instances_by_status(&self) -> Result<Vec<(InstanceStatus, u64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM instances GROUP BY status")
            .fetch_all(&mut *self.w().await?)
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let s: String = r.get("status");
            if let Some(st) = InstanceStatus::parse(&s) {
                out.push((st, r.get::<i64, _>("n").max(0) as u64));
            }
        }
        Ok(out)
    }

    /// Asks to bootstrap an instance. Exactly one caller among concurrent ones gets
    /// [`BootstrapDecision::Triggered`] and must run the command. Without `force`, a
    /// trigger needs a `starting` or `disconnected` instance, the cooldown passed since the
    /// last trigger, and attempts left; `force` (rebootstrap) bypasses the cooldown, restarts
    /// the attempt count and also restarts a `failed`, `provisioning` or idle `ready`
    /// instance (never a `busy` one: its task would be lost).
    ///
    /// # Errors
    /// Database failure.
    pub async fn begin_bootstrap(
        &self,
        id: &str,
        now: i64,
        cooldown_ms: u64,
        max_attempts: u32,
        force: bool,
    ) -> Result<BootstrapDecision> {
        let cooldown = cooldown_ms.min(i64::MAX as u64 / 2) as i64;
        let done = if force {
            sqlx::query(
                "UPDATE instances SET status = 'provisioning', bootstrap_attempts = 1, last_bootstrap_at = $1, updated_at = $1 \
                 WHERE id = $2 AND status IN ('starting', 'disconnected', 'failed', 'provisioning', 'ready')",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *self.w().await?)
            .await?
        } else {
            sqlx::query(
                "UPDATE instances SET status = 'provisioning', bootstrap_attempts = bootstrap_attempts + 1, last_bootstrap_at = $1, updated_at = $1 \
                 WHERE id = $2 AND status IN ('starting', 'disconnected') AND bootstrap_attempts < $3 \
                 AND (last_bootstrap_at IS NULL OR last_bootstrap_at + $4 <= $1)",
            )
            .bind(now)
            .bind(id)
            .bind(i64::from(max_attempts))
            .bind(cooldown)
            .execute(&mut *self.w().await?)
            .await?
        };
        let Some(inst) = self.find_instance(id).await? else {
            return Ok(BootstrapDecision::Gone);
        };
        if done.rows_affected() == 1 {
            return Ok(BootstrapDecision::Triggered {
                attempt: inst.bootstrap_attempts,
            });
        }
        Ok(match inst.status {
            InstanceStatus::Ready | InstanceStatus::Busy => BootstrapDecision::Ready,
            InstanceStatus::Draining | InstanceStatus::Terminated => BootstrapDecision::Gone,
            InstanceStatus::Failed => BootstrapDecision::Failed,
            InstanceStatus::Starting | InstanceStatus::Disconnected
                if inst.bootstrap_attempts >= max_attempts =>
            {
                BootstrapDecision::Failed
            }
            InstanceStatus::Starting
            | InstanceStatus::Disconnected
            | InstanceStatus::Provisioning => {
                let since = inst.last_bootstrap_at.map_or(cooldown, |t| now - t);
                BootstrapDecision::Wait {
                    retry_after_ms: (cooldown - since).max(0) as u64,
                }
            }
        })
    }

    /// Records a failed bootstrap attempt (the command failed, or the runtime did not
    /// connect in time): `failed` once `max_attempts` are used, else back to waiting
    /// (`starting`, or `disconnected` if it was ever ready). Only the attempt still current
    /// is recorded. Returns the instance if it changed.
    ///
    /// # Errors
    /// Database failure.
    pub async fn bootstrap_failed(
        &self,
        id: &str,
        attempt: u32,
        error: &str,
        max_attempts: u32,
    ) -> Result<Option<Instance>> {
        let now = paddock_proto::now_ms();
        let done = sqlx::query(
            "UPDATE instances SET last_error = $1, updated_at = $2, status = CASE WHEN bootstrap_attempts >= $3 THEN 'failed' WHEN ready_at IS NULL THEN 'starting' ELSE 'disconnected' END \
             WHERE id = $4 AND status = 'provisioning' AND bootstrap_attempts = $5",
        )
        .bind(error)
        .bind(now)
        .bind(i64::from(max_attempts))
        .bind(id)
        .bind(i64::from(attempt))
        .execute(&mut *self.w().await?)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.find_instance(id).await
    }

    /// The instance's runtime connected: `ready` (or `busy` if it still holds tasks), its
    /// last error cleared. A draining instance stays draining. `None` if it may not connect
    /// (terminated, failed, unknown).
    ///
    /// # Errors
    /// Database failure.
    pub async fn instance_connected(&self, id: &str, now: i64) -> Result<Option<Instance>> {
        sqlx::query(
            "UPDATE instances SET updated_at = $1, connected_at = $1, last_error = NULL, \
             ready_at = COALESCE(ready_at, $1), \
             idle_since = CASE WHEN status = 'draining' THEN idle_since ELSE $1 END, \
             status = CASE WHEN status = 'draining' THEN 'draining' \
                 WHEN EXISTS (SELECT 1 FROM tasks WHERE agent_id = $2 AND state IN ('dispatched', 'running')) THEN 'busy' ELSE 'ready' END \
             WHERE id = $2 AND status IN ('starting', 'provisioning', 'ready', 'busy', 'disconnected', 'draining')",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *self.w().await?)
        .await?;
        let inst = self.find_instance(id).await?;
        Ok(inst.filter(|i| {
            !matches!(
                i.status,
                InstanceStatus::Terminated | InstanceStatus::Failed
            )
        }))
    }

    /// The instance's runtime disconnected: `disconnected` if it was `ready` or `busy` (a
    /// bootstrap in flight, draining or gone stay as they are).
    ///
    /// # Errors
    /// Database failure.
    pub async fn instance_disconnected(&self, id: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE instances SET status = 'disconnected', disconnected_at = $1, updated_at = $1 WHERE id = $2 AND status IN ('ready', 'busy')",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(())
    }

    /// After a task of the instance finished: back to `ready`, or `draining` once it has
    /// taken `max_use` tasks, provided it holds no other task. Returns the new status if it
    /// changed.
    ///
    /// # Errors
    /// Database failure.
    pub async fn instance_task_finished(&self, id: &str) -> Result<Option<InstanceStatus>> {
        let now = paddock_proto::now_ms();
        let done = sqlx::query(
            "UPDATE instances SET updated_at = $1, idle_since = $1, \
             status = CASE WHEN max_use > 0 AND uses >= max_use THEN 'draining' ELSE 'ready' END \
             WHERE id = $2 AND status = 'busy' \
             AND NOT EXISTS (SELECT 1 FROM tasks WHERE agent_id = $2 AND state IN ('dispatched', 'running'))",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *self.w().await?)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        Ok(self.find_instance(id).await?.map(|i| i.status))
    }

    /// Deregisters an instance before it is destroyed: `draining`, so it takes no more
    /// work. Refused (`Ok(Err(status))`) while it is `busy`; the check and the change are
    /// one statement, and a claim makes the instance `busy` in the same transaction, so a
    /// task can never land on a deregistered instance.
    ///
    /// # Errors
    /// Database failure.
    pub async fn deregister_instance(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<std::result::Result<Instance, InstanceStatus>>> {
        let now = paddock_proto::now_ms();
        sqlx::query(
            "UPDATE instances SET status = 'draining', updated_at = $1 WHERE id = $2 AND org_id = $3 AND status IN ('starting', 'provisioning', 'ready', 'disconnected', 'failed')",
        )
        .bind(now)
        .bind(id)
        .bind(org_id)
        .execute(&mut *self.w().await?)
        .await?;
        let Some(inst) = self.get_instance(org_id, id).await? else {
            return Ok(None);
        };
        Ok(Some(match inst.status {
            InstanceStatus::Draining | InstanceStatus::Terminated => Ok(inst),
            other => Err(other),
        }))
    }

    /// Marks an instance destroyed (after its provider removed it) and revokes its agent
    /// so its token can never connect again. Refused (`Ok(Err(status))`) while `busy`.
    /// `error` records why (a failure), if any.
    ///
    /// # Errors
    /// Database failure.
    pub async fn terminate_instance(
        &self,
        org_id: &str,
        id: &str,
        error: Option<&str>,
    ) -> Result<Option<std::result::Result<Instance, InstanceStatus>>> {
        let now = paddock_proto::now_ms();
        let mut w = self.w().await?;
        let mut tx = w.begin().await?;
        let done = sqlx::query(
            "UPDATE instances SET status = 'terminated', terminated_at = $1, updated_at = $1, last_error = COALESCE($2, last_error) WHERE id = $3 AND org_id = $4 AND status NOT IN ('busy', 'terminated')",
        )
        .bind(now)
        .bind(error)
        .bind(id)
        .bind(org_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            sqlx::query("UPDATE agents SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        drop(w);
        let Some(inst) = self.get_instance(org_id, id).await? else {
            return Ok(None);
        };
        Ok(Some(match inst.status {
            InstanceStatus::Terminated => Ok(inst),
            other => Err(other),
        }))
    }

    /// Marks an instance `failed` with a reason (provider failure, boot deadline), unless
    /// it is busy or already gone. Returns whether it changed.
    ///
    /// # Errors
    /// Database failure.
    pub async fn fail_instance(&self, org_id: &str, id: &str, error: &str) -> Result<bool> {
        let now = paddock_proto::now_ms();
        let done = sqlx::query(
            "UPDATE instances SET status = 'failed', last_error = $1, updated_at = $2 WHERE id = $3 AND org_id = $4 AND status NOT IN ('busy', 'terminated', 'failed')",
        )
        .bind(error)
        .bind(now)
        .bind(id)
        .bind(org_id)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Instances in `provisioning` whose last trigger is older than `deadline_ms` (the
    /// runtime never connected): the bootstrap worker records them as failed attempts.
    ///
    /// # Errors
    /// Database failure.
    pub async fn overdue_provisioning(&self, now: i64, deadline_ms: u64) -> Result<Vec<Instance>> {
        let rows = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE status = 'provisioning' AND mode = 'user' AND last_bootstrap_at + $1 <= $2"
        ))
        .bind(deadline_ms.min(i64::MAX as u64 / 2) as i64)
        .bind(now)
        .fetch_all(&mut *self.w().await?)
        .await?;
        rows.iter().map(instance_from_row).collect()
    }

    /// A secret shared by every replica, generated by the first one that asks.
    ///
    /// # Errors
    /// Database failure.
    pub async fn gateway_secret(&self, name: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO gateway_secrets (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(crate::secret::generate(""))
        .bind(paddock_proto::now_ms())
        .execute(&mut *self.w().await?)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM gateway_secrets WHERE name = $1")
                .bind(name)
                .fetch_one(&mut *self.w().await?)
                .await?,
        )
    }
}

/// The agent row of an instance: same id, `pool = 'instance'`, and a token hash no
/// presented token can match (instances authenticate with signed instance tokens).
async fn insert_instance_agent(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    org_id: &str,
    tags: &[String],
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO agents (id, org_id, name, pool, token_hash, tags, reported_tags, capabilities, created_at) VALUES ($1, $2, $3, 'instance', $4, $5, '[]', 'null', $6)",
    )
    .bind(id)
    .bind(org_id)
    .bind(format!("instance-{}", &id[..8.min(id.len())]))
    .bind(format!("instance:{id}"))
    .bind(json_list(tags))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
