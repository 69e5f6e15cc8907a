//! Orgs (tenants) and their API tokens.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::{Result, Store, secret};

/// Prefix of API tokens, so they are recognisable in secret scanners.
pub const API_TOKEN_PREFIX: &str = "pdk_";

/// An org.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Org {
    /// Org id (UUID).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Creation time (ms since epoch).
    pub created_at: i64,
}

/// Role of an API token within its org.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submits and reads tasks, lists agents.
    Member,
    /// Also manages agents (pairing, tags, revoke) and tokens.
    Admin,
    /// Everything in the org.
    Owner,
}

impl Role {
    /// Stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

/// Who an API token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPrincipal {
    /// Token id (not the secret).
    pub token_id: String,
    /// The token's org.
    pub org_id: String,
    /// The token's role.
    pub role: Role,
}

impl Store {
    /// Creates an org.
    ///
    /// # Errors
    /// Database failure.
    pub async fn create_org(&self, name: &str) -> Result<Org> {
        let org = Org {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            created_at: paddock_proto::now_ms(),
        };
        sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&org.id)
            .bind(&org.name)
            .bind(org.created_at)
            .execute(&mut *self.w().await?)
            .await?;
        Ok(org)
    }

    /// Looks an org up by id.
    ///
    /// # Errors
    /// Database failure.
    pub async fn get_org(&self, id: &str) -> Result<Option<Org>> {
        let row = sqlx::query("SELECT id, name, created_at FROM orgs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.map(|r| Org {
            id: r.get("id"),
            name: r.get("name"),
            created_at: r.get("created_at"),
        }))
    }

    /// Lists orgs, oldest first.
    ///
    /// # Errors
    /// Database failure.
    pub async fn list_orgs(&self) -> Result<Vec<Org>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM orgs ORDER BY created_at, id")
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Org {
                id: r.get("id"),
                name: r.get("name"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    /// Creates an API token; returns its id and the secret (shown once, stored hashed).
    ///
    /// # Errors
    /// Database failure (including an unknown org).
    pub async fn create_api_token(
        &self,
        org_id: &str,
        role: Role,
        name: &str,
    ) -> Result<(String, String)> {
        let id = uuid::Uuid::new_v4().to_string();
        let token = secret::generate(API_TOKEN_PREFIX);
        sqlx::query(
            "INSERT INTO api_tokens (id, org_id, token_hash, role, name, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(org_id)
        .bind(secret::hash(&token))
        .bind(role.as_str())
        .bind(name)
        .bind(paddock_proto::now_ms())
        .execute(&mut *self.w().await?)
        .await?;
        Ok((id, token))
    }

    /// Resolves an API token to its principal; `None` for unknown or revoked tokens.
    ///
    /// # Errors
    /// Database failure.
    pub async fn authenticate_api_token(&self, token: &str) -> Result<Option<ApiPrincipal>> {
        let row = sqlx::query(
            "SELECT id, org_id, role FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(secret::hash(token))
        .fetch_optional(&self.read)
        .await?;
        Ok(row.and_then(|r| {
            let role: String = r.get("role");
            Some(ApiPrincipal {
                token_id: r.get("id"),
                org_id: r.get("org_id"),
                role: Role::parse(&role)?,
            })
        }))
    }

    /// Revokes an API token of an org. Returns whether a token was revoked.
    ///
    /// # Errors
    /// Database failure.
    pub async fn revoke_api_token(&self, org_id: &str, token_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND org_id = $3 AND revoked_at IS NULL",
        )
        .bind(paddock_proto::now_ms())
        .bind(token_id)
        .bind(org_id)
        .execute(&mut *self.w().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
