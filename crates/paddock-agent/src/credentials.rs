//! The agent's stored credentials (`~/.paddock/agent.json`, mode 0600), written once at
//! pairing and reused by later `paddock agent connect` runs. Format version 1:
//! `{"version":1,"apiBase":..,"gatewayWsUrl":..,"agentId":..,"orgId":..,"agentToken":..}`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Current file format version.
pub const CREDENTIALS_VERSION: u32 = 1;

/// Stored agent credentials.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    /// File format version.
    pub version: u32,
    /// HTTP base URL of the gateway.
    pub api_base: String,
    /// Executor WebSocket URL.
    pub gateway_ws_url: String,
    /// Agent id.
    pub agent_id: String,
    /// Org id.
    pub org_id: String,
    /// Agent token `<orgId>.<secret>`.
    pub agent_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("api_base", &self.api_base)
            .field("gateway_ws_url", &self.gateway_ws_url)
            .field("agent_id", &self.agent_id)
            .field("org_id", &self.org_id)
            .field("agent_token", &"<redacted>")
            .finish()
    }
}

/// Errors reading or writing the credentials file.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid JSON of the expected shape.
    #[error("{path}: not a valid agent credentials file: {detail}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Decoder message.
        detail: String,
    },
}

/// Default location: `~/.paddock/agent.json`.
pub fn default_path(home: &Path) -> PathBuf {
    home.join(".paddock").join("agent.json")
}

/// Reads credentials; `Ok(None)` when the file does not exist.
///
/// # Errors
/// Unreadable or invalid file.
pub fn load(path: &Path) -> Result<Option<Credentials>, CredentialsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CredentialsError::Io {
                path: path.into(),
                source,
            });
        }
    };
    let creds: Credentials =
        serde_json::from_str(&text).map_err(|e| CredentialsError::Invalid {
            path: path.into(),
            detail: e.to_string(),
        })?;
    if creds.version != CREDENTIALS_VERSION {
        return Err(CredentialsError::Invalid {
            path: path.into(),
            detail: format!("unsupported version {}", creds.version),
        });
    }
    Ok(Some(creds))
}

/// Writes credentials atomically with mode 0600 (directory 0700).
///
/// # Errors
/// File system error.
pub fn store(path: &Path, creds: &Credentials) -> Result<(), CredentialsError> {
    let io = |source| CredentialsError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let json = serde_json::to_vec_pretty(creds).unwrap_or_default();
    f.write_all(&json).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_0600_and_redacted_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path(dir.path());
        assert!(load(&path).unwrap().is_none());
        let c = Credentials {
            version: 1,
            api_base: "http://x".into(),
            gateway_ws_url: "ws://x/ws/executor".into(),
            agent_id: "a".into(),
            org_id: "o".into(),
            agent_token: "o.supersecret".into(),
        };
        store(&path, &c).unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), c);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{c:?}").contains("supersecret"));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(load(&path), Err(CredentialsError::Invalid { .. })));
    }
}
