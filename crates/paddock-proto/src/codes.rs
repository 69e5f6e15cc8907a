//! Stable error codes. They appear in API error bodies (`{"code": ..., "message": ...}`),
//! in protocol `error` messages and in task results. A code, once shipped, keeps its
//! spelling and meaning; add new ones, never rename.

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident => $text:literal ),+ $(,)?) => {
        /// A stable, machine-readable error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum ErrorCode {
            $( $(#[$doc])* #[serde(rename = $text)] $variant, )+
            /// A code this build does not know (sent by a newer peer).
            #[serde(other, rename = "UNKNOWN")]
            Unknown,
        }

        impl ErrorCode {
            /// Every known code, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),+];

            /// The code as it is spelled on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)+
                    ErrorCode::Unknown => "UNKNOWN",
                }
            }
        }
    };
}

error_codes! {
    /// The request body or parameters are invalid.
    InvalidRequest => "INVALID_REQUEST",
    /// Missing, malformed or unknown credentials.
    Unauthorized => "UNAUTHORIZED",
    /// The credentials are valid but their role does not allow this operation.
    Forbidden => "FORBIDDEN",
    /// The credentials belong to another org than the one addressed.
    OrgMismatch => "ORG_MISMATCH",
    /// `X-Org-Id` header is missing on an org-scoped endpoint.
    OrgHeaderRequired => "ORG_HEADER_REQUIRED",
    /// The addressed resource does not exist (or is not visible to the caller).
    NotFound => "NOT_FOUND",
    /// Unexpected server-side failure; details are in the server log only.
    Internal => "INTERNAL",
    /// The service is shutting down or its database is unreachable.
    Unavailable => "UNAVAILABLE",
    /// The gateway role does not serve this endpoint (`edge` vs `brain`).
    RoleNotServed => "ROLE_NOT_SERVED",
    /// No connected agent can run the task (selector, kind or backend).
    NoAgentAvailable => "NO_AGENT_AVAILABLE",
    /// The host backend cannot enforce `networkMode: "none"`.
    HostNetworkModeUnsupported => "HOST_NETWORK_MODE_UNSUPPORTED",
    /// The agent running the task disappeared and the task ran out of attempts.
    AgentLost => "AGENT_LOST",
    /// The task was not picked up before its queue deadline.
    QueueTimeout => "QUEUE_TIMEOUT",
    /// The task ran past its timeout and was killed.
    TaskTimeout => "TASK_TIMEOUT",
    /// The task was canceled by a user or by shutdown.
    TaskCanceled => "TASK_CANCELED",
    /// The agent could not start the task's process.
    SpawnFailed => "SPAWN_FAILED",
    /// The task's kind is not supported by the agent.
    KindUnsupported => "KIND_UNSUPPORTED",
    /// The task was killed for exceeding its memory limit (OOM in its cgroup).
    MemoryLimitExceeded => "MEMORY_LIMIT_EXCEEDED",
    /// The task hit its process-count limit (fork failed).
    PidsLimitExceeded => "PIDS_LIMIT_EXCEEDED",
    /// The sandbox could not be set up (namespaces, mounts, cgroups, runtime).
    SandboxSetupFailed => "SANDBOX_SETUP_FAILED",
    /// The requested sandbox backend is not available on the agent.
    BackendUnsupported => "BACKEND_UNSUPPORTED",
    /// The agent is at its `maxInFlight` and refused a dispatch.
    AgentBusy => "AGENT_BUSY",
    /// Pairing token unknown.
    PairingTokenInvalid => "PAIRING_TOKEN_INVALID",
    /// Pairing token older than its 15 minute lifetime.
    PairingTokenExpired => "PAIRING_TOKEN_EXPIRED",
    /// Pairing token already exchanged.
    PairingTokenUsed => "PAIRING_TOKEN_USED",
    /// The agent has been revoked; its token no longer works.
    AgentRevoked => "AGENT_REVOKED",
    /// A WebSocket frame exceeded the size limit.
    FrameTooLarge => "FRAME_TOO_LARGE",
    /// A WebSocket frame was not a valid protocol message.
    MalformedFrame => "MALFORMED_FRAME",
    /// The peer speaks a protocol version this build does not.
    ProtocolVersionUnsupported => "PROTOCOL_VERSION_UNSUPPORTED",
    /// A message arrived that is not valid in the current session state.
    ProtocolViolation => "PROTOCOL_VIOLATION",
    /// The agent is shutting down and handed the task back.
    AgentShuttingDown => "AGENT_SHUTTING_DOWN",
    /// The gateway is not configured for this request (missing service token, ...).
    GatewayNotConfigured => "GATEWAY_NOT_CONFIGURED",
    /// The caller's instance is not ready yet; it is being bootstrapped. Retry after
    /// `retryAfterMs`.
    InstanceNotReady => "INSTANCE_NOT_READY",
    /// The instance gave up after `VM_BOOTSTRAP_MAX_ATTEMPTS` failed bootstraps; see
    /// `lastError`, then `POST /api/v1/vm/rebootstrap`.
    InstanceFailed => "INSTANCE_FAILED",
    /// No bootstrap command is configured (`PADDOCK_BOOTSTRAP_CMD`), so no instance can be
    /// made for the caller.
    BootstrapNotConfigured => "BOOTSTRAP_NOT_CONFIGURED",
    /// The instance is running a task; it cannot be deregistered or destroyed now.
    InstanceBusy => "INSTANCE_BUSY",
    /// The instance is terminated or failed; its token no longer works.
    InstanceGone => "INSTANCE_GONE",
    /// The instance token is unknown, badly signed, or for another instance.
    InstanceTokenInvalid => "INSTANCE_TOKEN_INVALID",
    /// The instance token has expired.
    InstanceTokenExpired => "INSTANCE_TOKEN_EXPIRED",
    /// The pool already has `max` live instances.
    PoolAtCapacity => "POOL_AT_CAPACITY",
    /// Bundle refused: an entry has an absolute path.
    BundlePathAbsolute => "BUNDLE_PATH_ABSOLUTE",
    /// Bundle refused: an entry's path climbs out with `..`.
    BundlePathTraversal => "BUNDLE_PATH_TRAVERSAL",
    /// Bundle refused: a symbolic or hard link points outside the tree.
    BundleLinkEscape => "BUNDLE_LINK_ESCAPE",
    /// Bundle refused: a device, FIFO or other special entry.
    BundleSpecialFile => "BUNDLE_SPECIAL_FILE",
    /// Bundle refused: an entry over the size limit.
    BundleEntryTooLarge => "BUNDLE_ENTRY_TOO_LARGE",
    /// Bundle refused: more entries than the limit.
    BundleTooManyEntries => "BUNDLE_TOO_MANY_ENTRIES",
    /// Bundle refused: it decompresses past the ratio or total limit.
    BundleDecompressionBomb => "BUNDLE_DECOMPRESSION_BOMB",
    /// Bundle refused: not a valid archive.
    BundleCorrupt => "BUNDLE_CORRUPT",
    /// The bundle's bytes do not have the expected SHA-256; nothing was kept.
    BundleHashMismatch => "BUNDLE_HASH_MISMATCH",
    /// A digest is not 64 hex digits.
    BundleInvalidDigest => "BUNDLE_INVALID_DIGEST",
    /// A directory could not be packed.
    BundlePackFailed => "BUNDLE_PACK_FAILED",
    /// The bundle could not be downloaded.
    BundleDownloadFailed => "BUNDLE_DOWNLOAD_FAILED",
    /// The object store is misconfigured.
    BundleStoreConfig => "BUNDLE_STORE_CONFIG",
    /// The object store failed.
    BundleStoreFailed => "BUNDLE_STORE_FAILED",
    /// No such bundle (or not one this org uploaded).
    BundleNotFound => "BUNDLE_NOT_FOUND",
    /// Local I/O failed while handling a bundle.
    BundleIo => "BUNDLE_IO",
    /// Installing the bundle's dependencies failed (`npm ci`, `pip install`).
    BundleInstallFailed => "BUNDLE_INSTALL_FAILED",
    /// The bundle is larger than the gateway accepts.
    BundleTooLarge => "BUNDLE_TOO_LARGE",
    /// The workflow has no registered bundle.
    WorkflowNotFound => "WORKFLOW_NOT_FOUND",
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate code {code}");
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, *code);
        }
    }

    #[test]
    fn unknown_code_decodes_as_unknown() {
        let c: ErrorCode = serde_json::from_str("\"SOMETHING_NEW\"").unwrap();
        assert_eq!(c, ErrorCode::Unknown);
    }
}
