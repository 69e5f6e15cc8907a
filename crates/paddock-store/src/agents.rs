//! Pairing tokens and agents (executors).

use paddock_proto::Capabilities;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, Store, StoreError, json_list, parse_json_list, placeholders, secret};

/// Prefix of pairing tokens.
pub const PAIRING_TOKEN_PREFIX: &str = "pdp_";

/// Lifetime of a pairing token (seed 004: 15 minutes).
pub const PAIRING_TOKEN_TTL_MS: i64 = 15 * 60 * 1000;

/// Why a pairing token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    /// Unknown token.
    #[error("pairing token is not valid")]
    Invalid,
    /// Older than 15 minutes.
    #[error("pairing token has expired")]
    Expired,
    /// Already exchanged.
    #[error("pairing token has already been used")]
    Used,
}

/// An agent as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    /// Agent id.
    pub id: String,
    /// Org.
    pub org_id: String,
    /// Display name.
    pub name: String,
    /// `byon` (paired) or `managed` (issued).
    pub pool: String,
    /// Control-plane tags: the only tags used for routing.
    pub tags: Vec<String>,
    /// Tags the agent reported in `hello` (informational).
    pub reported_tags: Vec<String>,
    /// Capabilities from the last `hello`.
    pub capabilities: Option<Capabilities>,
    /// Agent build version from the last `hello`.
    pub agent_version: Option<String>,
    /// Replica holding the live connection, if connected.
    pub connected_replica: Option<String>,
    /// Last heartbeat seen (ms since epoch).
    pub last_seen_at: Option<i64>,
    /// Revocation time.
    pub revoked_at: Option<i64>,
    /// Creation time.
    pub created_at: i64,
}

const AGENT_COLUMNS: &str = "id, org_id, name, pool, tags, reported_tags, capabilities, agent_version, connected_replica, last_seen_at, revoked_at, created_at";

fn agent_from_row(r: &AnyRow) -> Result<Agent> {
    let caps: String = r.get("capabilities");
    let capabilities = if caps.is_empty() || caps == "null" {
        None
    } else {
        Some(
            serde_json::from_str(&caps).map_err(|e| StoreError::Corrupt {
                what: "agents.capabilities",
                detail: e.to_string(),
            })?,
        )
    };
    Ok(Agent {
        id: r.get("id"),
        org_id: r.get("org_id"),
        name: r.get("name"),
        pool: r.get("pool"),
        tags: parse_json_list("agents.tags", &r.get::<String, _>("tags"))?,
        reported_tags: parse_json_list(
            "agents.reported_tags",
            &r.get::<String, _>("reported_tags"),
        )?,
        capabilities,
        agent_version: r.get("agent_version"),
        connected_replica: r.get("connected_replica"),
        last_seen_at: r.get("last_seen_at"),
        revoked_at: r.get("revoked_at"),
        created_at: r.get("created_at"),
    })
}

impl Store {
    /// Creates a pairing token for an org; returns the secret and its expiry.
    ///
    /// # Errors
    /// Database failure.
    pub async fn create_pairing_token(
        &self,
        org_id: &str,
        created_by: &str,
    ) -> Result<(String, i64)> {
        let token = secret::generate(PAIRING_TOKEN_PREFIX);
        let now = paddock_proto::now_ms();
        let expires_at = now + PAIRING_TOKEN_TTL_MS;
        sqlx::query(
            "INSERT INTO pairing_tokens (id, org_id, token_hash, created_by, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(org_id)
        .bind(secret::hash(&token))
        .bind(created_by)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *self.w().await?)
        .await?;
        Ok((token, expires_at))
    }

    /// Exchanges a pairing token for a new agent: marks the token used (atomically, so two
    /// concurrent exchanges cannot both succeed) and creates the agent. Returns the agent and
    /// its token `<orgId>.<secret>` (shown once, stored hashed).
    ///
    /// # Errors
    /// [`PairingError`] wrapped in `Ok(Err(..))`; database failure as `Err`.
    pub async fn pair_agent(
        &self,
        pairing_token: &str,
        name: &str,
        now: i64,
    ) -> Result<std::result::Result<(Agent, String), PairingError>> {
        let hash = secret::hash(pairing_token);
        let agent_id = uuid::Uuid::new_v4().to_string();
        let claimed: Option<String> = sqlx::query_scalar(
            "UPDATE pairing_tokens SET used_at = $1, agent_id = $2 WHERE token_hash = $3 AND used_at IS NULL AND expires_at > $1 RETURNING org_id",
        )
        .bind(now)
        .bind(&agent_id)
        .bind(&hash)
        .fetch_optional(&mut *self.w().await?)
        .await?;
        let Some(org_id) = claimed else {
            let row =
                sqlx::query("SELECT used_at, expires_at FROM pairing_tokens WHERE token_hash = $1")
                    .bind(&hash)
                    .fetch_optional(&mut *self.w().await?)
                    .await?;
            return Ok(Err(match row {
                None => PairingError::Invalid,
                Some(r) if r.get::<Option<i64>, _>("used_at").is_some() => PairingError::Used,
                Some(_) => PairingError::Expired,
            }));
        };
        let (agent, token) = self
            .insert_agent(&agent_id, &org_id, name, "byon", &[])
            .await?;
        Ok(Ok((agent, token)))
    }

    /// Issues a managed executor (service-to-service, seed 004) with control-plane tags.
    ///
    /// # Errors
    /// Database failure.
    pub async fn issue_managed_agent(
        &self,
        org_id: &str,
        name: &str,
        tags: &[String],
    ) -> Result<(Agent, String)> {
        let id = uuid::Uuid::new_v4().to_string();
        self.insert_agent(&id, org_id, name, "managed", tags).await
    }

    async fn insert_agent(
        &self,
        id: &str,
        org_id: &str,
        name: &str,
        pool: &str,
        tags: &[String],
    ) -> Result<(Agent, String)> {
        let token = format!("{org_id}.{}", secret::generate(""));
        let now = paddock_proto::now_ms();
        sqlx::query(
            "INSERT INTO agents (id, org_id, name, pool, token_hash, tags, reported_tags, capabilities, created_at) VALUES ($1, $2, $3, $4, $5, $6, '[]', 'null', $7)",
        )
        .bind(id)
        .bind(org_id)
        .bind(name)
        .bind(pool)
        .bind(secret::hash(&token))
        .bind(json_list(tags))
        .bind(now)
        .execute(&mut *self.w().await?)
        .await?;
        let agent = self
            .get_agent(org_id, id)
            .await?
            .ok_or(StoreError::Corrupt {
                what: "agents",
                detail: "inserted agent not found".into(),
            })?;
        Ok((agent, token))
    }

    /// Resolves an agent token. Returns the agent even when revoked (the caller reports
    /// `AGENT_REVOKED`); `None` for unknown tokens or a token whose org prefix does not match.
    ///
    /// # Errors
    /// Database failure.
    pub async fn authenticate_agent(&self, token: &str) -> Result<Option<Agent>> {
        let Some((org_prefix, _)) = token.split_once('.') else {
            return Ok(None);
        };
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE token_hash = $1"
        ))
        .bind(secret::hash(token))
        .fetch_optional(&mut *self.w().await?)
        .await?;
        match row {
            Some(r) => {
                let agent = agent_from_row(&r)?;
                Ok((agent.org_id == org_prefix).then_some(agent))
            }
            None => Ok(None),
        }
    }

    /// One agent of an org.
    ///
    /// # Errors
    /// Database failure.
    pub async fn get_agent(&self, org_id: &str, agent_id: &str) -> Result<Option<Agent>> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1 AND org_id = $2"
        ))
        .bind(agent_id)
        .bind(org_id)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    /// One agent by id, whatever its org (internal service endpoints only).
    ///
    /// # Errors
    /// Database failure.
    pub async fn find_agent(&self, agent_id: &str) -> Result<Option<Agent>> {
        let row = sqlx::query(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"))
            .bind(agent_id)
            .fetch_optional(&mut *self.w().await?)
            .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    /// All agents of an org, oldest first.
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_agents(&self, org_id: &str) -> Result<Vec<Agent>> {
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = $1 ORDER BY created_at, id"
        ))
        .bind(org_id)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// Agents of an org that are connected somewhere, not revoked, and seen since `fresh_after`.
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_live_agents(&self, org_id: &str, fresh_after: i64) -> Result<Vec<Agent>> {
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = $1 AND connected_replica IS NOT NULL AND revoked_at IS NULL AND last_seen_at > $2"
        ))
        .bind(org_id)
        .bind(fresh_after)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// Replaces the control-plane tags. Returns the updated agent, `None` if not found.
    ///
    /// # Errors
    /// Database failure.
    pub async fn set_agent_tags(
        &self,
        org_id: &str,
        agent_id: &str,
        tags: &[String],
    ) -> Result<Option<Agent>> {
        sqlx::query("UPDATE agents SET tags = $1 WHERE id = $2 AND org_id = $3")
            .bind(json_list(tags))
            .bind(agent_id)
            .bind(org_id)
            .execute(&mut *self.w().await?)
            .await?;
        self.get_agent(org_id, agent_id).await
    }

    /// Revokes an agent (idempotent). Returns the agent, `None` if not found.
    ///
    /// # Errors
    /// Database failure.
    pub async fn revoke_agent(&self, org_id: &str, agent_id: &str) -> Result<Option<Agent>> {
        sqlx::query(
            "UPDATE agents SET revoked_at = $1 WHERE id = $2 AND org_id = $3 AND revoked_at IS NULL",
        )
        .bind(paddock_proto::now_ms())
        .bind(agent_id)
        .bind(org_id)
        .execute(&mut *self.w().await?)
        .await?;
        self.get_agent(org_id, agent_id).await
    }

    /// Records a live connection and what the agent declared in `hello`.
    ///
    /// # Errors
    /// Database failure.
    pub async fn mark_agent_connected(
        &self,
        agent_id: &str,
        replica: &str,
        capabilities: &Capabilities,
        agent_version: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE agents SET connected_replica = $1, connected_at = $2, last_seen_at = $2, capabilities = $3, reported_tags = $4, agent_version = $5 WHERE id = $6",
        )
        .bind(replica)
        .bind(now)
        .bind(serde_json::to_string(capabilities).unwrap_or_else(|_| "null".into()))
        .bind(json_list(&capabilities.tags))
        .bind(agent_version)
        .bind(agent_id)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(())
    }

    /// Clears the live connection if this replica still holds it.
    ///
    /// # Errors
    /// Database failure.
    pub async fn mark_agent_disconnected(&self, agent_id: &str, replica: &str) -> Result<()> {
        sqlx::query(
            "UPDATE agents SET connected_replica = NULL WHERE id = $1 AND connected_replica = $2",
        )
        .bind(agent_id)
        .bind(replica)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(())
    }

    /// Clears every connection a replica held (on its start-up or shutdown).
    ///
    /// # Errors
    /// Database failure.
    pub async fn clear_replica_connections(&self, replica: &str) -> Result<()> {
        sqlx::query("UPDATE agents SET connected_replica = NULL WHERE connected_replica = $1")
            .bind(replica)
            .execute(&mut *self.w().await?)
            .await?;
        Ok(())
    }

    /// Presence: bumps `last_seen_at` of the given connected agents and extends the leases of
    /// their tasks to `lease_until`, in two statements whatever the number of agents.
    /// Returns the ids among them that have been revoked meanwhile (to disconnect).
    ///
    /// # Errors
    /// Database failure.
    pub async fn touch_agents(
        &self,
        agent_ids: &[String],
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<String>> {
        if agent_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut revoked = Vec::new();
        for chunk in agent_ids.chunks(500) {
            let list = placeholders(2, chunk.len());
            let sql = format!("UPDATE agents SET last_seen_at = $1 WHERE id IN ({list})");
            let mut q = sqlx::query(&sql).bind(now);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&mut *self.w().await?).await?;
            let sql = format!(
                "UPDATE tasks SET lease_expires_at = $1 WHERE agent_id IN ({list}) AND state IN ('dispatched', 'running')"
            );
            let mut q = sqlx::query(&sql).bind(lease_until);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&mut *self.w().await?).await?;
            let list = placeholders(1, chunk.len());
            let sql =
                format!("SELECT id FROM agents WHERE id IN ({list}) AND revoked_at IS NOT NULL");
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            revoked.extend(q.fetch_all(&mut *self.w().await?).await?);
        }
        Ok(revoked)
    }
}
