//! Providers: how an instance's runtime is made, found and destroyed.
//!
//! The interface is deliberately small (three operations) so that later providers (QEMU
//! VMs, CI runners) fit: [`Provider::create`] starts the runtime of an instance the gateway
//! has already recorded, [`Provider::destroy`] removes it (idempotent: destroying what is
//! not there succeeds), and [`Provider::list`] reports what the provider actually has for
//! this pool, which is how orphans are found. A provider never talks to the gateway; the
//! supervisor does.

pub mod command;
pub mod docker;
pub mod process;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::api::Secret;

/// What a provider needs to start one instance's runtime.
#[derive(Clone)]
pub struct Launch {
    /// Instance id.
    pub instance_id: String,
    /// Org id.
    pub org_id: String,
    /// Pool name.
    pub pool: String,
    /// The instance token (secret): the runtime presents it on `/ws/vm`.
    pub token: Secret,
    /// The WebSocket URL the runtime connects to.
    pub control_plane_ws: String,
    /// The runtime's environment: `VM_INSTANCE_ID`, `VM_ORG_ID`, `VM_USER_ID`, `VM_MODE`,
    /// `VM_POOL`, `VM_TOKEN`, `CONTROL_PLANE_WS` (and whatever else the gateway gave).
    pub env: BTreeMap<String, String>,
}

impl Launch {
    /// Builds a launch; the well-known variables are always set from the fields, whatever
    /// `env` held.
    pub fn new(
        instance_id: &str,
        org_id: &str,
        pool: &str,
        token: Secret,
        control_plane_ws: &str,
        mut env: BTreeMap<String, String>,
    ) -> Launch {
        env.insert("VM_INSTANCE_ID".into(), instance_id.into());
        env.insert("VM_ORG_ID".into(), org_id.into());
        env.entry("VM_USER_ID".into()).or_default();
        env.insert("VM_MODE".into(), "pool".into());
        env.insert("VM_POOL".into(), pool.into());
        env.insert("VM_TOKEN".into(), token.expose().into());
        env.insert("CONTROL_PLANE_WS".into(), control_plane_ws.into());
        Launch {
            instance_id: instance_id.into(),
            org_id: org_id.into(),
            pool: pool.into(),
            token,
            control_plane_ws: control_plane_ws.into(),
            env,
        }
    }

    /// `text` with the token replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        self.token.redact(text)
    }
}

impl fmt::Debug for Launch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Launch")
            .field("instance_id", &self.instance_id)
            .field("org_id", &self.org_id)
            .field("pool", &self.pool)
            .field("control_plane_ws", &self.control_plane_ws)
            .finish_non_exhaustive()
    }
}

/// One instance as the provider has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderInstance {
    /// Instance id.
    pub instance_id: String,
    /// Whether its runtime runs (a record of a dead process, an exited container: `false`;
    /// it is still there to be destroyed).
    pub running: bool,
    /// Where it is (`pid 1234`, a container id): for the inventory.
    pub detail: String,
}

/// A provider failure. Messages never contain the instance token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProviderError(pub String);

impl ProviderError {
    /// An error from anything displayable.
    pub fn new(msg: impl fmt::Display) -> ProviderError {
        ProviderError(msg.to_string())
    }
}

/// Result of a provider operation.
pub type ProviderResult<T> = Result<T, ProviderError>;

/// A boxed future (the trait is used as `dyn Provider`).
pub type ProviderFuture<'a, T> = Pin<Box<dyn Future<Output = ProviderResult<T>> + Send + 'a>>;

/// How a pool's instances are made and destroyed.
pub trait Provider: Send + Sync {
    /// The provider's name (`process`, `docker`, `command`).
    fn name(&self) -> &'static str;

    /// Starts the runtime of an instance the gateway recorded. On error, the supervisor
    /// marks the instance failed, calls [`Provider::destroy`] and terminates it.
    fn create<'a>(&'a self, launch: &'a Launch) -> ProviderFuture<'a, ()>;

    /// Removes the instance's runtime. Idempotent: an instance that is not there is
    /// destroyed already.
    fn destroy<'a>(&'a self, instance_id: &'a str) -> ProviderFuture<'a, ()>;

    /// What the provider has for this pool; `None` when it cannot tell (then orphan
    /// detection is off).
    fn list(&self) -> ProviderFuture<'_, Option<Vec<ProviderInstance>>>;
}

/// The last `max_chars` characters of `text` (on a character boundary), trimmed.
pub(crate) fn tail(text: &str, max_chars: usize) -> String {
    let text = text.trim();
    let count = text.chars().count();
    if count <= max_chars {
        return text.to_string();
    }
    let skip = count - max_chars;
    format!("...{}", text.chars().skip(skip).collect::<String>())
}

/// Whether `s` is usable as an instance id in file and container names.
pub(crate) fn safe_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_sets_the_well_known_variables_and_hides_the_token() {
        let mut env = BTreeMap::new();
        env.insert("VM_MODE".into(), "user".into());
        env.insert("EXTRA".into(), "1".into());
        let l = Launch::new(
            "i1",
            "o1",
            "ci",
            Secret::new("tok_secret"),
            "ws://x/ws/vm",
            env,
        );
        assert_eq!(l.env["VM_MODE"], "pool");
        assert_eq!(l.env["VM_TOKEN"], "tok_secret");
        assert_eq!(l.env["VM_USER_ID"], "");
        assert_eq!(l.env["EXTRA"], "1");
        assert_eq!(l.env["CONTROL_PLANE_WS"], "ws://x/ws/vm");
        assert!(!format!("{l:?}").contains("tok_secret"));
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("  abc  ", 10), "abc");
        assert_eq!(tail("abcdef", 3), "...def");
        assert_eq!(tail("ééééé", 2), "...éé");
    }

    #[test]
    fn safe_ids() {
        assert!(safe_id("0190c2f4-7a1b-7c3d-9e8f-0123456789ab"));
        assert!(!safe_id("../x"));
        assert!(!safe_id(".hidden"));
        assert!(!safe_id(""));
        assert!(!safe_id("a b"));
    }
}
