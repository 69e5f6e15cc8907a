//! Paddock's warm-pool supervisor (issue 4; seeds 002, 003): keeps a pool of instances
//! (agents in local processes, containers, or whatever operator commands make) between a
//! floor and a ceiling, sized to the queued demand, one task per instance when `maxUse` is 1,
//! and tears down what finished, failed, never booted or was orphaned.
//!
//! - [`api`]: the gateway's pool API (wire types and an HTTP client). The supervisor is a
//!   client of the gateway like any operator tool.
//! - [`reconcile`]: the pure planner (what to create and destroy, and why).
//! - [`provider`]: how instances are made (`process`, `docker`, `command`).
//! - [`supervisor`]: one pass (observe, plan, act, report) and the always-on loop.
//! - [`report`]: the inventory and status JSON files; [`files`]: atomic writes, the
//!   per-pool state directory, its lock and the persisted orphan sightings.
//!
//! The operator guide is `docs/pools.md`.

pub mod api;
pub mod files;
pub mod provider;
pub mod reconcile;
pub mod report;
pub mod supervisor;

pub use api::{ApiConfig, ApiError, Instance, InstanceStatus, Pool, PoolApi, PoolSpec, Secret};
pub use files::PoolDir;
pub use provider::{Launch, Provider, ProviderError, ProviderInstance};
pub use reconcile::{Plan, PlanConfig};
pub use supervisor::{PassReport, Supervisor, SupervisorConfig};
