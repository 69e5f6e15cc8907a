//! The supervisor: one reconcile pass (observe, plan, act, report) and the always-on loop
//! around it.
//!
//! One pass:
//! 1. `PUT` the pool's configuration (first pass, when flags gave one; never in a dry run).
//! 2. Ask the provider what it has, *then* the gateway (`GET .../pools/{name}`): an
//!    instance's gateway record always exists before its runtime, so a runtime listed first
//!    is never mistaken for an orphan because of the order.
//! 3. Plan ([`crate::reconcile::plan`]) with the orphan sightings persisted in the state
//!    directory.
//! 4. Act, unless `dry_run`:
//!    - destroy, for each planned instance: **deregister** (the gateway moves it to
//!      `draining` in one statement that refuses a `busy` instance with `409
//!      INSTANCE_BUSY`; a claim makes an instance busy in the same transaction, so no
//!      task can land on it afterwards), **re-check** the answer (it must be `draining` or
//!      `terminated`, else nothing is destroyed), **destroy** in the provider, then
//!      **terminate** (which revokes its token). A failure leaves it `draining`: the next
//!      pass retries;
//!    - remove provider-only orphans past their grace (provider destroy only);
//!    - create: `POST .../instances` (the gateway enforces `max` atomically: `409
//!      POOL_AT_CAPACITY` ends creation for this pass), then the provider's create; when
//!      that fails the instance is marked `failed`, destroyed and terminated.
//! 5. Write `--inventory-out` and `--status-out` (atomically).
//!
//! [`Supervisor::run`] repeats passes every interval and whenever the gateway's watch
//! stream reports a change (a task queued, an instance changed state). Shutdown is
//! observed between passes only: a pass always completes, and instances stay up.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::{
    ApiError, INSTANCE_BUSY, Instance, InstanceStatus, POOL_AT_CAPACITY, PoolApi, PoolSpec,
    PoolState,
};
use crate::files::{PoolDir, write_atomic};
use crate::provider::{Launch, Provider, ProviderInstance};
use crate::reconcile::{self, Destroy, DestroyReason, Plan, PlanConfig, PlanInput};
use crate::report::{Action, Inventory, REPORT_VERSION, Status, TimedError, Totals};

/// Largest `PADDOCK_AGENT_MAX_IN_FLIGHT` the supervisor sets from `maxUse`.
const MAX_IN_FLIGHT_CAP: u32 = 64;

/// How many errors the status keeps across passes.
const RECENT_ERRORS: usize = 20;

/// Settings of a supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Pool name.
    pub pool: String,
    /// Configuration to `PUT` before the first pass (`None`: use the gateway's).
    pub spec: Option<PoolSpec>,
    /// Plan and report only: no `PUT`/`POST`, no create, no destroy, no state written.
    pub dry_run: bool,
    /// A `disconnected` instance is destroyed after this long.
    pub disconnect_grace: Duration,
    /// An orphan is removed this long after it was first seen.
    pub orphan_grace: Duration,
    /// Time between passes of [`Supervisor::run`].
    pub interval: Duration,
    /// Follow the gateway's watch stream to wake early.
    pub watch: bool,
    /// Where to write the inventory.
    pub inventory_out: Option<PathBuf>,
    /// Where to write the status.
    pub status_out: Option<PathBuf>,
    /// Replaces the WebSocket URL the gateway hands out (a runtime that reaches the
    /// gateway by another address).
    pub control_plane_ws: Option<String>,
    /// `run` or `reconcile`, for the status file.
    pub mode: String,
}

/// What one pass saw and did.
#[derive(Debug, Clone)]
pub struct PassReport {
    /// Start (ms since the epoch).
    pub started_at: i64,
    /// End.
    pub finished_at: i64,
    /// Nothing was changed.
    pub dry_run: bool,
    /// The policy planned with.
    pub config: Option<PlanConfig>,
    /// The plan (none when the gateway could not be read).
    pub plan: Option<Plan>,
    /// What was done.
    pub actions: Vec<Action>,
    /// Errors.
    pub errors: Vec<String>,
    /// The gateway's instances after the pass.
    pub instances: Vec<Instance>,
    /// The provider's list after the pass.
    pub provider: Option<Vec<ProviderInstance>>,
}

impl PassReport {
    /// Whether the pass had no error.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// A warm-pool supervisor for one pool.
pub struct Supervisor {
    api: PoolApi,
    provider: Arc<dyn Provider>,
    dir: PoolDir,
    cfg: SupervisorConfig,
    spec_applied: bool,
    totals: Totals,
    recent_errors: VecDeque<TimedError>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("pool", &self.cfg.pool)
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Supervisor {
    /// A supervisor acting through `api` and `provider`, keeping its state in `dir`.
    pub fn new(
        api: PoolApi,
        provider: Arc<dyn Provider>,
        dir: PoolDir,
        cfg: SupervisorConfig,
    ) -> Supervisor {
        Supervisor {
            api,
            provider,
            dir,
            cfg,
            spec_applied: false,
            totals: Totals::default(),
            recent_errors: VecDeque::new(),
        }
    }

    /// Totals since start.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    fn plan_config(&self, state: &PoolState) -> PlanConfig {
        let p = &state.pool;
        PlanConfig {
            min: p.min,
            max: p.max,
            target: p.target,
            max_use: p.max_use,
            boot_deadline_ms: p.boot_deadline_ms,
            disconnect_grace_ms: ms(self.cfg.disconnect_grace),
            orphan_grace_ms: ms(self.cfg.orphan_grace),
        }
    }

    /// The gateway's view, with the flags' configuration overlaid in a dry run (what would
    /// happen with these flags), or a new empty pool when a dry run names a pool that does
    /// not exist yet.
    async fn observe_gateway(&self) -> Result<PoolState, ApiError> {
        match self.api.get_pool(&self.cfg.pool).await {
            Ok(mut state) => {
                if self.cfg.dry_run
                    && let Some(spec) = &self.cfg.spec
                {
                    let mut pool = spec.as_pool(&self.cfg.pool);
                    pool.id = state.pool.id.clone();
                    pool.org_id = state.pool.org_id.clone();
                    state.pool = pool;
                }
                Ok(state)
            }
            Err(e) if self.cfg.dry_run && e.status() == Some(404) => match &self.cfg.spec {
                Some(spec) => Ok(PoolState {
                    pool: spec.as_pool(&self.cfg.pool),
                    instances: Vec::new(),
                    demand: Default::default(),
                }),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Runs one pass and writes the output files.
    pub async fn pass(&mut self) -> PassReport {
        let started_at = now_ms();
        let mut report = PassReport {
            started_at,
            finished_at: started_at,
            dry_run: self.cfg.dry_run,
            config: None,
            plan: None,
            actions: Vec::new(),
            errors: Vec::new(),
            instances: Vec::new(),
            provider: None,
        };
        self.pass_inner(&mut report).await;
        report.finished_at = now_ms();
        self.record(&report);
        report
    }

    async fn pass_inner(&mut self, report: &mut PassReport) {
        if !self.cfg.dry_run
            && !self.spec_applied
            && let Some(spec) = &self.cfg.spec
        {
            match self.api.put_pool(&self.cfg.pool, spec).await {
                Ok(_) => self.spec_applied = true,
                Err(e) => {
                    report
                        .errors
                        .push(format!("configuring pool {}: {e}", self.cfg.pool));
                    return;
                }
            }
        }
        let provider_list = match self.provider.list().await {
            Ok(list) => list,
            Err(e) => {
                report.errors.push(format!(
                    "provider {}: listing instances: {e} (orphan detection skipped)",
                    self.provider.name()
                ));
                None
            }
        };
        let state = match self.observe_gateway().await {
            Ok(s) => s,
            Err(e) => {
                report
                    .errors
                    .push(format!("reading pool {}: {e}", self.cfg.pool));
                report.provider = provider_list;
                return;
            }
        };
        let config = self.plan_config(&state);
        report.config = Some(config);
        let sightings = self.dir.load_sightings();
        let plan = reconcile::plan(&PlanInput {
            config,
            instances: &state.instances,
            queued: state.demand.queued,
            provider: provider_list.as_deref(),
            sightings: &sightings,
            now: now_ms(),
        });
        report.instances = state.instances.clone();
        report.provider = provider_list;
        if self.cfg.dry_run {
            report.plan = Some(plan);
            return;
        }
        if plan.is_noop() {
            if plan.sightings != sightings
                && let Err(e) = self.dir.save_sightings(&plan.sightings)
            {
                report.errors.push(format!("saving orphan sightings: {e}"));
            }
            report.plan = Some(plan);
            return;
        }
        self.act(&plan, &config, report).await;
        let mut sightings = plan.sightings.clone();
        for a in &report.actions {
            if a.outcome == "done"
                && let Some(id) = &a.instance_id
            {
                sightings.remove(id);
            }
        }
        if let Err(e) = self.dir.save_sightings(&sightings) {
            report.errors.push(format!("saving orphan sightings: {e}"));
        }
        report.plan = Some(plan);
        // The inventory shows the state after acting.
        let list_after = self.provider.list().await.ok().flatten();
        if let Ok(after) = self.api.get_pool(&self.cfg.pool).await {
            report.instances = after.instances;
        }
        if list_after.is_some() {
            report.provider = list_after;
        }
    }

    async fn act(&mut self, plan: &Plan, config: &PlanConfig, report: &mut PassReport) {
        let destroys = join_all(plan.destroy.iter().map(|d| self.destroy_one(d, config))).await;
        for a in destroys {
            if a.outcome == "done" {
                self.totals.destroyed += 1;
            }
            if let (true, Some(d)) = (a.failed(), &a.detail) {
                report.errors.push(format!(
                    "destroying {}: {d}",
                    a.instance_id.as_deref().unwrap_or("?")
                ));
            }
            report.actions.push(a);
        }
        for id in &plan.remove_provider_orphans {
            let action = match self.provider.destroy(id).await {
                Ok(()) => {
                    self.totals.orphans_removed += 1;
                    tracing::info!(instance = %id, "pool: removed a provider-only orphan");
                    action("removeOrphan", Some(id), "providerOnly", "done", None)
                }
                Err(e) => {
                    report.errors.push(format!("removing orphan {id}: {e}"));
                    action(
                        "removeOrphan",
                        Some(id),
                        "providerOnly",
                        "failed",
                        Some(e.0),
                    )
                }
            };
            report.actions.push(action);
        }
        if plan.create > 0 {
            let creates = join_all((0..plan.create).map(|_| self.create_one(config.max_use))).await;
            for a in creates {
                match a.outcome.as_str() {
                    "done" => self.totals.created += 1,
                    "failed" => {
                        if a.instance_id.is_some() {
                            self.totals.create_failures += 1;
                        }
                        report.errors.push(format!(
                            "creating an instance: {}",
                            a.detail.as_deref().unwrap_or("failed")
                        ));
                    }
                    _ => {}
                }
                report.actions.push(a);
            }
        }
    }

    /// Deregister, re-check, destroy, terminate.
    async fn destroy_one(&self, d: &Destroy, config: &PlanConfig) -> Action {
        let id = d.instance_id.as_str();
        let reason = d.reason.as_str();
        let deregistered = match self.api.deregister(id).await {
            Ok(inst) => Some(inst),
            Err(e) if e.code() == Some(INSTANCE_BUSY) => {
                return action(
                    "destroy",
                    Some(id),
                    reason,
                    "skipped",
                    Some("busy: it runs a task (never destroyed while busy)".into()),
                );
            }
            // The gateway no longer knows it: only the provider's side is left.
            Err(e) if e.status() == Some(404) => None,
            Err(e) => return action("destroy", Some(id), reason, "failed", Some(e.to_string())),
        };
        if let Some(inst) = &deregistered
            && !matches!(
                inst.status,
                InstanceStatus::Draining | InstanceStatus::Terminated
            )
        {
            return action(
                "destroy",
                Some(id),
                reason,
                "skipped",
                Some(format!("still {} after deregistration", inst.status)),
            );
        }
        if let Err(e) = self.provider.destroy(id).await {
            return action(
                "destroy",
                Some(id),
                reason,
                "failed",
                Some(format!("provider: {e}")),
            );
        }
        if deregistered
            .as_ref()
            .is_some_and(|i| i.status != InstanceStatus::Terminated)
        {
            let why = match d.reason {
                DestroyReason::BootDeadline => Some(format!(
                    "boot deadline exceeded: not ready {} ms after creation",
                    config.boot_deadline_ms
                )),
                DestroyReason::Orphan => {
                    Some("orphan: the provider has no runtime for this instance".to_string())
                }
                DestroyReason::Disconnected => Some(format!(
                    "disconnected for more than {} ms",
                    config.disconnect_grace_ms
                )),
                _ => None,
            };
            if let Err(e) = self.api.terminate(id, why.as_deref()).await {
                return action(
                    "destroy",
                    Some(id),
                    reason,
                    "failed",
                    Some(format!("destroyed, but terminate failed: {e}")),
                );
            }
        }
        tracing::info!(instance = %id, reason, "pool: destroyed an instance");
        action("destroy", Some(id), reason, "done", None)
    }

    /// POST an instance, then create its runtime; on provider failure: fail, destroy,
    /// terminate.
    async fn create_one(&self, max_use: u32) -> Action {
        let created = match self.api.create_instance(&self.cfg.pool).await {
            Ok(c) => c,
            Err(e) if e.code() == Some(POOL_AT_CAPACITY) => {
                return action(
                    "create",
                    None,
                    "demand",
                    "skipped",
                    Some("pool at capacity".into()),
                );
            }
            Err(e) => return action("create", None, "demand", "failed", Some(e.to_string())),
        };
        let id = created.instance.instance_id.clone();
        let ws = self
            .cfg
            .control_plane_ws
            .clone()
            .unwrap_or_else(|| created.control_plane_ws.clone());
        let org = if created.instance.org_id.is_empty() {
            self.api.org().to_string()
        } else {
            created.instance.org_id.clone()
        };
        let mut env = created.env.0.clone();
        if max_use > 0 {
            // An instance never holds more tasks at once than it may take in its life.
            env.insert(
                "PADDOCK_AGENT_MAX_IN_FLIGHT".into(),
                max_use.min(MAX_IN_FLIGHT_CAP).to_string(),
            );
        }
        let launch = Launch::new(&id, &org, &self.cfg.pool, created.token.clone(), &ws, env);
        match self.provider.create(&launch).await {
            Ok(()) => {
                tracing::info!(instance = %id, "pool: created an instance");
                action("create", Some(&id), "demand", "done", None)
            }
            Err(e) => {
                let msg = launch.redact(&format!("provider {}: {e}", self.provider.name()));
                let mut detail = msg.clone();
                if let Err(e) = self.api.fail(&id, &msg).await {
                    detail.push_str(&format!("; marking it failed: {e}"));
                }
                if let Err(e) = self.provider.destroy(&id).await {
                    detail.push_str(&format!("; cleaning up: {e}"));
                } else if let Err(e) = self.api.terminate(&id, Some(&msg)).await {
                    detail.push_str(&format!("; terminating: {e}"));
                }
                action("create", Some(&id), "demand", "failed", Some(detail))
            }
        }
    }

    fn record(&mut self, report: &PassReport) {
        self.totals.passes += 1;
        if !report.ok() {
            self.totals.failed_passes += 1;
        }
        for e in &report.errors {
            tracing::warn!(pool = %self.cfg.pool, error = %e, "pool: reconcile error");
            self.recent_errors.push_back(TimedError {
                at: report.finished_at,
                message: e.clone(),
            });
            while self.recent_errors.len() > RECENT_ERRORS {
                self.recent_errors.pop_front();
            }
        }
        if let Some(path) = &self.cfg.inventory_out {
            let inv = self.inventory(report);
            if let Err(e) = serde_json::to_vec_pretty(&inv)
                .map_err(std::io::Error::other)
                .and_then(|b| write_atomic(path, &b))
            {
                tracing::warn!(path = %path.display(), error = %e, "pool: cannot write the inventory");
            }
        }
        if let Some(path) = &self.cfg.status_out {
            let status = self.status(report);
            if let Err(e) = serde_json::to_vec_pretty(&status)
                .map_err(std::io::Error::other)
                .and_then(|b| write_atomic(path, &b))
            {
                tracing::warn!(path = %path.display(), error = %e, "pool: cannot write the status");
            }
        }
    }

    /// The inventory of a pass.
    pub fn inventory(&self, report: &PassReport) -> Inventory {
        Inventory::build(
            &self.cfg.pool,
            self.api.org(),
            self.provider.name(),
            &report.instances,
            report.provider.as_deref(),
            report.finished_at,
        )
    }

    /// The status after a pass.
    pub fn status(&self, report: &PassReport) -> Status {
        Status {
            version: REPORT_VERSION,
            pool: self.cfg.pool.clone(),
            org_id: self.api.org().to_string(),
            provider: self.provider.name().to_string(),
            mode: self.cfg.mode.clone(),
            dry_run: self.cfg.dry_run,
            pid: std::process::id(),
            last_reconcile_at: report.started_at,
            last_reconcile_ms: report.finished_at - report.started_at,
            ok: report.ok(),
            config: report.config,
            desired: report.plan.as_ref().map(|p| p.desired),
            actual: report.plan.as_ref().map(|p| p.counts),
            queued: report.plan.as_ref().map(|p| p.queued),
            last_plan: report.plan.clone(),
            last_actions: report.actions.clone(),
            errors: report.errors.clone(),
            recent_errors: self.recent_errors.iter().cloned().collect(),
            totals: self.totals,
        }
    }

    /// Runs passes every interval and on watch events until `shutdown`; `on_pass` sees each
    /// pass. A pass in progress completes before the loop ends; instances stay up.
    pub async fn run(&mut self, shutdown: CancellationToken, mut on_pass: impl FnMut(&PassReport)) {
        let wake = Arc::new(Notify::new());
        let watcher = self.cfg.watch.then(|| {
            tokio::spawn(watch_loop(
                self.api.clone(),
                self.cfg.pool.clone(),
                wake.clone(),
            ))
        });
        loop {
            let report = self.pass().await;
            on_pass(&report);
            if shutdown.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.interval) => {}
                _ = wake.notified() => {
                    // Let a burst of events settle into one pass.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
        if let Some(w) = watcher {
            w.abort();
        }
    }
}

fn action(
    kind: &str,
    id: Option<&str>,
    reason: &str,
    outcome: &str,
    detail: Option<String>,
) -> Action {
    Action {
        kind: kind.into(),
        instance_id: id.map(str::to_string),
        reason: reason.into(),
        outcome: outcome.into(),
        detail,
    }
}

/// Follows the pool's watch stream, waking the loop on every change; reconnects with
/// backoff, and wakes once per (re)connection for what may have been missed.
async fn watch_loop(api: PoolApi, pool: String, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(500);
    let mut warned = false;
    loop {
        let connected_at = std::time::Instant::now();
        let result = api.watch(&pool, || wake.notify_one()).await;
        match result {
            Ok(()) => {
                tracing::debug!(pool = %pool, "pool: watch stream ended");
                // Changes may be missed until it is back.
                wake.notify_one();
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(pool = %pool, error = %e, "pool: watch stream unavailable; relying on the interval");
            }
            Err(e) => tracing::debug!(pool = %pool, error = %e, "pool: watch stream failed"),
        }
        if connected_at.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
