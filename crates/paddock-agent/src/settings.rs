//! Agent settings: the seed's `VESPID_AGENT_*` variables, renamed `PADDOCK_AGENT_*`. The
//! binary fills this from flags and environment (`paddock agent connect --help`).

use std::path::PathBuf;
use std::time::Duration;

/// Runtime settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Default sandbox backend (`PADDOCK_AGENT_EXEC_BACKEND`, default `host`).
    pub exec_backend: String,
    /// Root of per-run work directories (`PADDOCK_AGENT_WORKDIR_ROOT`, default `~/.paddock/workdir`).
    pub workdir_root: PathBuf,
    /// Output cap per stream for the host backend (`PADDOCK_AGENT_HOST_OUTPUT_MAX_CHARS`, 65536).
    pub host_output_max_chars: usize,
    /// SIGTERM-to-SIGKILL grace (`PADDOCK_AGENT_HOST_KILL_GRACE_MS`, 500).
    pub host_kill_grace: Duration,
    /// Concurrency declared in `hello` (`PADDOCK_AGENT_MAX_IN_FLIGHT`, 10).
    pub max_in_flight: u32,
    /// Self-reported tags (informational only; never used for routing).
    pub reported_tags: Vec<String>,
    /// Extra CA bundle for `wss://`/`https://` (`PADDOCK_AGENT_TLS_CA_FILE`).
    pub tls_ca_file: Option<PathBuf>,
    /// On shutdown, how long running tasks may take before they are stopped and handed back.
    pub shutdown_grace: Duration,
    /// Most a task may use (`PADDOCK_AGENT_SANDBOX_MEMORY_MB`/`_CPUS`/`_PIDS`); tasks may ask
    /// for less.
    pub limits: crate::sandbox::Limits,
    /// Root filesystem for the `process` and `oci` backends (`PADDOCK_AGENT_ROOTFS`); `None`
    /// shows a read-only view of the host's.
    pub rootfs: Option<PathBuf>,
    /// `PADDOCK_AGENT_BUNDLE_CACHE`: digest-addressed bundle cache.
    pub bundle_cache_dir: PathBuf,
    /// `PADDOCK_AGENT_BUNDLE_CACHE_MAX_MB`: its size cap (LRU eviction).
    pub bundle_cache_max_bytes: u64,
}

impl AgentSettings {
    /// Defaults, with the work directory under `home`.
    pub fn with_home(home: &std::path::Path) -> AgentSettings {
        AgentSettings {
            exec_backend: "host".into(),
            workdir_root: home.join(".paddock").join("workdir"),
            host_output_max_chars: 65_536,
            host_kill_grace: Duration::from_millis(500),
            max_in_flight: 10,
            reported_tags: Vec::new(),
            tls_ca_file: None,
            shutdown_grace: Duration::from_secs(30),
            limits: crate::sandbox::Limits::default(),
            rootfs: None,
            bundle_cache_dir: paddock_bundle::DEFAULT_CACHE_DIR.into(),
            bundle_cache_max_bytes: paddock_bundle::DEFAULT_CACHE_MAX_BYTES,
        }
    }
}

/// The user's home directory (`$HOME`), or `/root` as a last resort.
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}
