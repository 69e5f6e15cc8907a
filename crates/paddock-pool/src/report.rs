//! The machine-readable outputs: the inventory (`--inventory-out`: every instance with its
//! state and timings) and the status (`--status-out`: desired and actual counts, the last
//! reconcile, errors, the last plan). Both are versioned JSON, written atomically, and hold
//! no secret (instance tokens never reach them).

use serde::{Deserialize, Serialize};

use crate::api::{Instance, InstanceStatus};
use crate::provider::ProviderInstance;
use crate::reconcile::{Counts, Plan, PlanConfig};

/// Format version of both files.
pub const REPORT_VERSION: u32 = 1;

/// What happened to one planned action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Action {
    /// `create`, `destroy` or `removeOrphan`.
    pub kind: String,
    /// The instance (none when a create was refused before one existed).
    pub instance_id: Option<String>,
    /// Why (`drained`, `scaleDown`, `demand` ...).
    pub reason: String,
    /// `done`, `skipped` (refused safely: busy, pool full) or `failed`.
    pub outcome: String,
    /// Why it was skipped or failed.
    pub detail: Option<String>,
}

impl Action {
    /// Whether it failed.
    pub fn failed(&self) -> bool {
        self.outcome == "failed"
    }
}

/// The provider's side of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSide {
    /// Whether its runtime runs.
    pub running: bool,
    /// Where it is.
    pub detail: String,
}

/// One instance in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryEntry {
    /// Instance id.
    pub instance_id: String,
    /// Lifecycle state.
    pub status: InstanceStatus,
    /// Tasks taken.
    pub uses: u32,
    /// Tasks allowed.
    pub max_use: u32,
    /// Bootstrap attempts.
    pub bootstrap_attempts: u32,
    /// Last error.
    pub last_error: Option<String>,
    /// Creation (ms since the epoch).
    pub created_at: i64,
    /// First connection.
    pub ready_at: Option<i64>,
    /// Last task taken.
    pub busy_at: Option<i64>,
    /// Idle since.
    pub idle_since: Option<i64>,
    /// Last disconnection.
    pub disconnected_at: Option<i64>,
    /// Destruction.
    pub terminated_at: Option<i64>,
    /// Creation to first connection, ms.
    pub boot_ms: Option<i64>,
    /// Age at `generatedAt`, ms.
    pub age_ms: i64,
    /// What the provider has for it (`null`: nothing, or the provider cannot list).
    pub provider: Option<ProviderSide>,
}

/// `--inventory-out`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// Format version.
    pub version: u32,
    /// Pool name.
    pub pool: String,
    /// Org id.
    pub org_id: String,
    /// Provider.
    pub provider: String,
    /// When it was written (ms since the epoch).
    pub generated_at: i64,
    /// The gateway's live instances of the pool.
    pub instances: Vec<InventoryEntry>,
    /// What the provider has that the gateway does not list as live (orphans).
    pub provider_only: Vec<ProviderInstance>,
}

impl Inventory {
    /// Joins the gateway's instances with the provider's list.
    pub fn build(
        pool: &str,
        org_id: &str,
        provider_name: &str,
        instances: &[Instance],
        provider: Option<&[ProviderInstance]>,
        now: i64,
    ) -> Inventory {
        let live: Vec<&Instance> = instances
            .iter()
            .filter(|i| i.status != InstanceStatus::Terminated)
            .collect();
        let entries = live
            .iter()
            .map(|i| InventoryEntry {
                instance_id: i.instance_id.clone(),
                status: i.status,
                uses: i.uses,
                max_use: i.max_use,
                bootstrap_attempts: i.bootstrap_attempts,
                last_error: i.last_error.clone(),
                created_at: i.created_at,
                ready_at: i.ready_at,
                busy_at: i.busy_at,
                idle_since: i.idle_since,
                disconnected_at: i.disconnected_at,
                terminated_at: i.terminated_at,
                boot_ms: i.ready_at.map(|r| r - i.created_at),
                age_ms: (now - i.created_at).max(0),
                provider: provider.and_then(|p| {
                    p.iter()
                        .find(|x| x.instance_id == i.instance_id)
                        .map(|x| ProviderSide {
                            running: x.running,
                            detail: x.detail.clone(),
                        })
                }),
            })
            .collect();
        let provider_only = provider
            .map(|p| {
                p.iter()
                    .filter(|x| !live.iter().any(|i| i.instance_id == x.instance_id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Inventory {
            version: REPORT_VERSION,
            pool: pool.to_string(),
            org_id: org_id.to_string(),
            provider: provider_name.to_string(),
            generated_at: now,
            instances: entries,
            provider_only,
        }
    }
}

/// An error with its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimedError {
    /// When (ms since the epoch).
    pub at: i64,
    /// What.
    pub message: String,
}

/// Totals since the supervisor started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Passes run.
    pub passes: u64,
    /// Instances created (provider create succeeded).
    pub created: u64,
    /// Instances destroyed and terminated.
    pub destroyed: u64,
    /// Provider-only orphans removed.
    pub orphans_removed: u64,
    /// Provider create failures.
    pub create_failures: u64,
    /// Passes that recorded errors.
    pub failed_passes: u64,
}

/// `--status-out`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Format version.
    pub version: u32,
    /// Pool name.
    pub pool: String,
    /// Org id.
    pub org_id: String,
    /// Provider.
    pub provider: String,
    /// `run` (always-on) or `reconcile` (one pass).
    pub mode: String,
    /// Nothing was changed (`--dry-run`).
    pub dry_run: bool,
    /// The supervisor's process id.
    pub pid: u32,
    /// Start of the last pass (ms since the epoch).
    pub last_reconcile_at: i64,
    /// Its duration.
    pub last_reconcile_ms: i64,
    /// Whether the last pass had no error.
    pub ok: bool,
    /// The policy used.
    pub config: Option<PlanConfig>,
    /// Desired size.
    pub desired: Option<u32>,
    /// Counts before the last pass acted.
    pub actual: Option<Counts>,
    /// Queued demand.
    pub queued: Option<u32>,
    /// The last plan.
    pub last_plan: Option<Plan>,
    /// What the last pass did.
    pub last_actions: Vec<Action>,
    /// Errors of the last pass.
    pub errors: Vec<String>,
    /// The latest errors of any pass (at most 20).
    pub recent_errors: Vec<TimedError>,
    /// Totals since start.
    pub totals: Totals,
}
