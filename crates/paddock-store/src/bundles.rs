//! Workflow bundles, their versions, and spawns (issue 5; seed 001).
//!
//! Bundle bytes live in the object store (`paddock-bundle`); here is what an org may use
//! (`bundles`: an org owns a digest once it has uploaded those bytes), which bundle is a
//! workflow's current version (`workflow_versions`: pushing an identical bundle with the same
//! runtime and entrypoint keeps the version), and spawns.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, Store};

/// One version of a workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowVersion {
    /// Org.
    pub org_id: String,
    /// Workflow id.
    pub workflow_id: String,
    /// Version, from 1.
    pub version: u64,
    /// SHA-256 of the archive, hex.
    pub digest: String,
    /// Archive size.
    pub size: u64,
    /// `node`, `python`, `shell`, `binary`.
    pub runtime: String,
    /// Entrypoint inside the bundle.
    pub entrypoint: String,
    /// Registration time.
    pub created_at: i64,
}

fn version_from_row(r: &AnyRow) -> WorkflowVersion {
    WorkflowVersion {
        org_id: r.get("org_id"),
        workflow_id: r.get("workflow_id"),
        version: r.get::<i64, _>("version").max(0) as u64,
        digest: r.get("digest"),
        size: r.get::<i64, _>("size").max(0) as u64,
        runtime: r.get("runtime"),
        entrypoint: r.get("entrypoint"),
        created_at: r.get("created_at"),
    }
}

/// A spawn as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnRow {
    /// Spawn id (the seed's `vmId`).
    pub id: String,
    /// Org.
    pub org_id: String,
    /// Workflow.
    pub workflow_id: String,
    /// Version run.
    pub version: u64,
    /// Bundle digest.
    pub digest: String,
    /// The `bundle.run` task.
    pub task_id: String,
    /// The instance it ran on, once known.
    pub instance_id: Option<String>,
    /// The pool serving it, if any.
    pub pool: Option<String>,
    /// Who spawned it (token id).
    pub created_by: String,
    /// Creation.
    pub created_at: i64,
    /// Release (`DELETE /api/spawn/{id}`).
    pub released_at: Option<i64>,
}

fn spawn_from_row(r: &AnyRow) -> SpawnRow {
    SpawnRow {
        id: r.get("id"),
        org_id: r.get("org_id"),
        workflow_id: r.get("workflow_id"),
        version: r.get::<i64, _>("version").max(0) as u64,
        digest: r.get("digest"),
        task_id: r.get("task_id"),
        instance_id: r.get("instance_id"),
        pool: r.get("pool"),
        created_by: r.get("created_by"),
        created_at: r.get("created_at"),
        released_at: r.get("released_at"),
    }
}

const SPAWN_COLUMNS: &str = "id, org_id, workflow_id, version, digest, task_id, instance_id, pool, created_by, created_at, released_at";
const VERSION_COLUMNS: &str =
    "org_id, workflow_id, version, digest, size, runtime, entrypoint, created_at";

impl Store {
    /// Records that an org has uploaded a bundle (idempotent).
    ///
    /// # Errors
    /// Database failure.
    pub async fn record_bundle(&self, org_id: &str, digest: &str, size: u64) -> Result<()> {
        sqlx::query(
            "INSERT INTO bundles (org_id, digest, size, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (org_id, digest) DO NOTHING",
        )
        .bind(org_id)
        .bind(digest)
        .bind(size.min(i64::MAX as u64) as i64)
        .bind(paddock_proto::now_ms())
        .execute(&mut *self.w().await?)
        .await?;
        Ok(())
    }

    /// The size of a bundle the org has uploaded, `None` if it has not.
    ///
    /// # Errors
    /// Database failure.
    pub async fn org_bundle(&self, org_id: &str, digest: &str) -> Result<Option<u64>> {
        let size: Option<i64> =
            sqlx::query_scalar("SELECT size FROM bundles WHERE org_id = $1 AND digest = $2")
                .bind(org_id)
                .bind(digest)
                .fetch_optional(&mut *self.w().await?)
                .await?;
        Ok(size.map(|s| s.max(0) as u64))
    }

    /// Makes `digest` (uploaded by the org) the workflow's current version: a new version,
    /// unless the current one already has this digest, runtime and entrypoint. Returns the
    /// current version and whether it is new.
    ///
    /// # Errors
    /// Database failure.
    pub async fn register_version(
        &self,
        org_id: &str,
        workflow_id: &str,
        digest: &str,
        size: u64,
        runtime: &str,
        entrypoint: &str,
    ) -> Result<(WorkflowVersion, bool)> {
        for _ in 0..5 {
            if let Some(cur) = self.current_version(org_id, workflow_id).await?
                && cur.digest == digest
                && cur.runtime == runtime
                && cur.entrypoint == entrypoint
            {
                return Ok((cur, false));
            }
            let now = paddock_proto::now_ms();
            // The primary key makes two concurrent pushes pick distinct versions: the loser
            // retries on the next number.
            let done = sqlx::query(
                "INSERT INTO workflow_versions (org_id, workflow_id, version, digest, size, runtime, entrypoint, created_at) \
                 SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4, $5, $6, $7 FROM workflow_versions WHERE org_id = $1 AND workflow_id = $2 \
                 ON CONFLICT DO NOTHING",
            )
            .bind(org_id)
            .bind(workflow_id)
            .bind(digest)
            .bind(size.min(i64::MAX as u64) as i64)
            .bind(runtime)
            .bind(entrypoint)
            .bind(now)
            .execute(&mut *self.w().await?)
            .await;
            match done {
                Ok(r) if r.rows_affected() == 1 => {
                    let cur = self.current_version(org_id, workflow_id).await?.ok_or(
                        crate::StoreError::Corrupt {
                            what: "workflow_versions",
                            detail: "inserted version not found".into(),
                        },
                    )?;
                    return Ok((cur, true));
                }
                Ok(_) => continue,
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(crate::StoreError::Corrupt {
            what: "workflow_versions",
            detail: "could not allocate a version after 5 tries".into(),
        })
    }

    /// The workflow's current (highest) version.
    ///
    /// # Errors
    /// Database failure.
    pub async fn current_version(
        &self,
        org_id: &str,
        workflow_id: &str,
    ) -> Result<Option<WorkflowVersion>> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM workflow_versions WHERE org_id = $1 AND workflow_id = $2 ORDER BY version DESC LIMIT 1"
        ))
        .bind(org_id)
        .bind(workflow_id)
        .fetch_optional(&mut *self.w().await?)
        .await?;
        Ok(row.as_ref().map(version_from_row))
    }

    /// A workflow's versions, newest first.
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_versions(
        &self,
        org_id: &str,
        workflow_id: &str,
    ) -> Result<Vec<WorkflowVersion>> {
        let rows = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM workflow_versions WHERE org_id = $1 AND workflow_id = $2 ORDER BY version DESC"
        ))
        .bind(org_id)
        .bind(workflow_id)
        .fetch_all(&mut *self.w().await?)
        .await?;
        Ok(rows.iter().map(version_from_row).collect())
    }

    /// Records a spawn.
    ///
    /// # Errors
    /// Database failure.
    pub async fn insert_spawn(&self, s: &SpawnRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO spawns ({SPAWN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(&s.id)
        .bind(&s.org_id)
        .bind(&s.workflow_id)
        .bind(s.version.min(i64::MAX as u64) as i64)
        .bind(&s.digest)
        .bind(&s.task_id)
        .bind(&s.instance_id)
        .bind(&s.pool)
        .bind(&s.created_by)
        .bind(s.created_at)
        .bind(s.released_at)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(())
    }

    /// One spawn of an org.
    ///
    /// # Errors
    /// Database failure.
    pub async fn get_spawn(&self, org_id: &str, id: &str) -> Result<Option<SpawnRow>> {
        let row = sqlx::query(&format!(
            "SELECT {SPAWN_COLUMNS} FROM spawns WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&mut *self.w().await?)
        .await?;
        Ok(row.as_ref().map(spawn_from_row))
    }

    /// The org's spawns not yet released, newest first.
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_active_spawns(&self, org_id: &str) -> Result<Vec<SpawnRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {SPAWN_COLUMNS} FROM spawns WHERE org_id = $1 AND released_at IS NULL ORDER BY created_at DESC, id"
        ))
        .bind(org_id)
        .fetch_all(&mut *self.w().await?)
        .await?;
        Ok(rows.iter().map(spawn_from_row).collect())
    }

    /// Marks a spawn released. Returns whether it was active.
    ///
    /// # Errors
    /// Database failure.
    pub async fn release_spawn(&self, org_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE spawns SET released_at = $1 WHERE org_id = $2 AND id = $3 AND released_at IS NULL",
        )
        .bind(paddock_proto::now_ms())
        .bind(org_id)
        .bind(id)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation()
                || d.code().as_deref() == Some("23505")
                || d.message().contains("UNIQUE")
        }
        _ => false,
    }
}
