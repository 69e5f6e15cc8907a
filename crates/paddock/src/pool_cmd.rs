//! `paddock pool run` (the always-on warm-pool supervisor) and `paddock pool reconcile` (one
//! pass, for timer mode). The logic lives in `paddock-pool`; this module parses flags,
//! builds the provider and prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use paddock_pool::provider::command::{CommandConfig, CommandProvider};
use paddock_pool::provider::docker::{DockerConfig, DockerProvider};
use paddock_pool::provider::process::{ProcessConfig, ProcessProvider};
use paddock_pool::{
    ApiConfig, PassReport, PoolApi, PoolDir, PoolSpec, Provider, Secret, Supervisor,
    SupervisorConfig,
};
use tokio_util::sync::CancellationToken;

use crate::client::ApiArgs;

const EXAMPLES: &str = "\
Examples:
  # 2 warm local agents for tasks with selector.tag=ci, at most 4, one task each:
  paddock pool run --pool ci --labels ci --provider process --min 2 --max 4 \\
    --status-out /var/lib/paddock/ci-status.json \\
    --inventory-out /var/lib/paddock/ci-inventory.json

  # Containers instead of processes (a local image; nothing is pulled):
  paddock pool run --pool ci --labels ci --provider docker \\
    --docker-image debian:12-slim --min 1 --max 8

  # Your own machines or VMs; the commands get VM_INSTANCE_ID, VM_TOKEN, CONTROL_PLANE_WS:
  paddock pool run --pool vms --labels vm --provider command --min 1 --max 3 \\
    --create-cmd scripts/vm/bootstrap-local.sh --destroy-cmd scripts/vm/stop-local.sh

  # Timer mode (systemd timer, cron): one pass, the status as JSON on stdout:
  paddock pool reconcile --pool ci --labels ci --provider process --min 2 --max 4 --json

  # What would happen, changing nothing:
  paddock pool reconcile --pool ci --labels ci --provider process \\
    --min 2 --max 4 --target 3 --dry-run

Desired size = min(max, busy + queued + floor), never below min; floor = --target
clamped into [min, max], else --min. Tasks reach the pool with selector.tag = one of
--labels (or pool:<name>). See docs/pools.md.";

/// `paddock pool ...`
#[derive(Debug, Subcommand)]
pub(crate) enum PoolCommand {
    /// Always-on supervisor: a reconcile pass every --interval and whenever the gateway
    /// reports demand or an instance change. SIGTERM/Ctrl-C stop it between passes;
    /// instances stay up.
    #[command(after_help = EXAMPLES)]
    Run(RunArgs),
    /// One reconcile pass (timer mode). Exit code 0 when the pass had no error, 1 otherwise.
    #[command(after_help = EXAMPLES)]
    Reconcile(PoolArgs),
}

/// `paddock pool run`
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Time between passes (also woken early by the gateway's watch stream).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Do not follow the gateway's watch stream (passes every --interval only).
    #[arg(long)]
    no_watch: bool,
}

/// Flags shared by `run` and `reconcile`.
#[derive(Debug, Args)]
pub(crate) struct PoolArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Pool name (unique in the org).
    #[arg(long, env = "PADDOCK_POOL")]
    pool: String,
    /// How instances are made: `process` (local agent processes), `docker` (a container
    /// each), `command` (your --create-cmd/--destroy-cmd).
    #[arg(long, value_parser = ["process", "docker", "command"])]
    provider: String,
    /// Control-plane tags of the pool's agents: tasks select one with `selector.tag`.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Idle floor: instances kept ready with no demand.
    #[arg(long, default_value_t = 0)]
    min: u32,
    /// Ceiling: live instances (anything not yet terminated) never exceed it.
    #[arg(long)]
    max: u32,
    /// Desired size now, clamped into [min, max]; raises the floor.
    #[arg(long)]
    target: Option<u32>,
    /// Tasks per instance before it is destroyed (1 = one job per instance; 0 = unlimited).
    #[arg(long, default_value_t = 1)]
    max_use: u32,
    /// An instance not ready this long after its creation is destroyed (and replaced).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    boot_deadline: Duration,
    /// A disconnected instance is destroyed after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    disconnect_grace: Duration,
    /// An orphan (provider has it and the gateway does not, or the reverse) is removed when
    /// still orphaned this long after it was first seen.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    orphan_grace: Duration,
    /// Plan and print only: no configuration change, no instance created or destroyed.
    #[arg(long)]
    dry_run: bool,
    /// Print each pass's status as JSON (one line per pass for `run`).
    #[arg(long)]
    json: bool,
    /// Write the inventory (every instance, its state and timings) here, atomically.
    #[arg(long, value_name = "PATH")]
    inventory_out: Option<PathBuf>,
    /// Write the status (desired/actual, last reconcile, errors, last plan) here, atomically.
    #[arg(long, value_name = "PATH")]
    status_out: Option<PathBuf>,
    /// Supervisor state (lock, orphan sightings; process records and logs):
    /// `<state-dir>/<pool>/`. Default: ~/.paddock/pools.
    #[arg(long, env = "PADDOCK_POOL_STATE_DIR", value_name = "PATH")]
    state_dir: Option<PathBuf>,
    /// WebSocket URL given to instances instead of the one the gateway advertises.
    #[arg(long, value_name = "URL")]
    control_plane_ws: Option<String>,
    /// Sandbox backend of the agents (`process` and `command` providers; docker instances
    /// always use `host` inside their container).
    #[arg(long, value_parser = ["host", "process", "oci", "docker"])]
    agent_backend: Option<String>,
    /// Executable started as `<program> agent connect` by the process provider (default:
    /// this paddock).
    #[arg(long, value_name = "PATH", hide = true)]
    agent_program: Option<PathBuf>,
    /// process provider: SIGTERM to SIGKILL when destroying an instance.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// docker provider: local image the agent runs in (never pulled).
    #[arg(long, value_name = "IMAGE")]
    docker_image: Option<String>,
    /// command provider: starts an instance's runtime (`sh -c`; env VM_INSTANCE_ID,
    /// VM_TOKEN, CONTROL_PLANE_WS, VM_ORG_ID, VM_MODE=pool, VM_POOL, VM_USER_ID).
    #[arg(long, value_name = "CMD")]
    create_cmd: Option<String>,
    /// command provider: removes an instance's runtime; must succeed if it is gone already.
    #[arg(long, value_name = "CMD")]
    destroy_cmd: Option<String>,
    /// command provider: prints the instance ids it has, one per line (enables orphan
    /// detection).
    #[arg(long, value_name = "CMD")]
    list_cmd: Option<String>,
    /// command provider: longest run of one command.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    command_timeout: Duration,
}

pub(crate) async fn run(cmd: PoolCommand) -> anyhow::Result<i32> {
    match cmd {
        PoolCommand::Run(args) => run_loop(args).await,
        PoolCommand::Reconcile(args) => reconcile(args).await,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl PoolArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if self.pool.is_empty()
            || !self
                .pool
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || self.pool.starts_with('.')
        {
            bail!(
                "--pool {:?}: use letters, digits, '-', '_' and '.'",
                self.pool
            );
        }
        if self.max == 0 {
            bail!("--max must be at least 1");
        }
        if self.min > self.max {
            bail!("--min {} is above --max {}", self.min, self.max);
        }
        match self.provider.as_str() {
            "docker" if self.docker_image.is_none() => {
                bail!("--provider docker needs --docker-image (a local image)")
            }
            "command" if self.create_cmd.is_none() || self.destroy_cmd.is_none() => {
                bail!("--provider command needs --create-cmd and --destroy-cmd")
            }
            _ => Ok(()),
        }
    }

    fn spec(&self) -> PoolSpec {
        PoolSpec {
            provider: self.provider.clone(),
            labels: self
                .labels
                .iter()
                .filter(|l| !l.is_empty())
                .cloned()
                .collect(),
            min: self.min,
            max: self.max,
            target: self.target,
            max_use: self.max_use,
            boot_deadline_ms: ms(self.boot_deadline),
        }
    }

    fn pool_dir(&self) -> PoolDir {
        let state = self.state_dir.clone().unwrap_or_else(|| {
            paddock_agent::settings::home_dir()
                .join(".paddock")
                .join("pools")
        });
        PoolDir::new(&state, &self.pool)
    }

    async fn provider(&self, org: &str, dir: &PoolDir) -> anyhow::Result<Arc<dyn Provider>> {
        let mut agent_env = BTreeMap::new();
        if let Some(b) = &self.agent_backend {
            agent_env.insert("PADDOCK_AGENT_EXEC_BACKEND".to_string(), b.clone());
        }
        Ok(match self.provider.as_str() {
            "process" => {
                let mut cfg = ProcessConfig::for_agent(dir.path().to_path_buf())
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Some(p) = &self.agent_program {
                    cfg.program = p.clone();
                }
                cfg.env = agent_env;
                cfg.grace = self.kill_grace;
                Arc::new(ProcessProvider::new(cfg))
            }
            "docker" => {
                let exe = match &self.agent_program {
                    Some(p) => p.clone(),
                    None => std::env::current_exe().context("finding the paddock executable")?,
                };
                let cfg = DockerConfig {
                    pool: self.pool.clone(),
                    image: self.docker_image.clone().unwrap_or_default(),
                    agent_exe: exe,
                    env: BTreeMap::new(),
                };
                Arc::new(
                    DockerProvider::connect(cfg)
                        .await
                        .map_err(|e| anyhow::anyhow!("docker provider: {e}"))?,
                )
            }
            _ => Arc::new(CommandProvider::new(CommandConfig {
                pool: self.pool.clone(),
                org_id: org.to_string(),
                create_cmd: self.create_cmd.clone().unwrap_or_default(),
                destroy_cmd: self.destroy_cmd.clone().unwrap_or_default(),
                list_cmd: self.list_cmd.clone(),
                timeout: self.command_timeout,
            })),
        })
    }

    /// Connects, builds the provider and the supervisor; holds the pool's lock unless this
    /// is a dry run.
    async fn supervisor(
        &self,
        mode: &str,
        interval: Duration,
        watch: bool,
    ) -> anyhow::Result<(Supervisor, Option<paddock_pool::files::PoolLock>)> {
        self.validate()?;
        let token = self
            .api
            .token
            .clone()
            .context("no API token: pass --token or set PADDOCK_TOKEN (owner or admin)")?;
        let api = PoolApi::connect(ApiConfig {
            base: self.api.api_url.clone(),
            token: Secret::new(token),
            org: self.api.org_id.clone(),
        })
        .await?;
        let dir = self.pool_dir();
        let lock =
            if self.dry_run {
                None
            } else {
                Some(dir.lock().with_context(|| {
                    format!("locking the state directory {}", dir.path().display())
                })?)
            };
        let provider = self.provider(api.org(), &dir).await?;
        let cfg = SupervisorConfig {
            pool: self.pool.clone(),
            spec: Some(self.spec()),
            dry_run: self.dry_run,
            disconnect_grace: self.disconnect_grace,
            orphan_grace: self.orphan_grace,
            interval,
            watch,
            inventory_out: self.inventory_out.clone(),
            status_out: self.status_out.clone(),
            control_plane_ws: self.control_plane_ws.clone(),
            mode: mode.to_string(),
        };
        Ok((Supervisor::new(api, provider, dir, cfg), lock))
    }
}

async fn reconcile(args: PoolArgs) -> anyhow::Result<i32> {
    crate::logging::init("warn,paddock_pool=info", false);
    let (mut sup, _lock) = args.supervisor("reconcile", Duration::ZERO, false).await?;
    let report = sup.pass().await;
    print_pass(&sup, &report, args.json, true)?;
    Ok(if report.ok() { 0 } else { 1 })
}

async fn run_loop(args: RunArgs) -> anyhow::Result<i32> {
    crate::logging::init("warn,paddock_pool=info", false);
    let (mut sup, _lock) = args
        .pool
        .supervisor("run", args.interval, !args.no_watch)
        .await?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        trigger.cancel();
    });
    let json = args.pool.json;
    let dry_run = args.pool.dry_run;
    if !json {
        eprintln!(
            "paddock pool: supervising pool {} ({} provider){}; passes every {}",
            args.pool.pool,
            args.pool.provider,
            if dry_run { ", dry run" } else { "" },
            humantime::format_duration(args.interval)
        );
    }
    let mut print_error = None;
    sup.run(shutdown, |report| {
        if let Err(e) = print_pass_inner(report, json, dry_run, None) {
            print_error = Some(e);
        }
    })
    .await;
    if let Some(e) = print_error {
        return Err(e);
    }
    if !json {
        eprintln!("paddock pool: stopped (instances stay up)");
    }
    Ok(0)
}

fn print_pass(
    sup: &Supervisor,
    report: &PassReport,
    json: bool,
    always: bool,
) -> anyhow::Result<()> {
    print_pass_inner(report, json, always, Some(sup))
}

/// Prints a pass: the status JSON (`--json`; the full status for `reconcile`, one line per
/// pass for `run`), else a summary when the pass planned or failed something (or always).
fn print_pass_inner(
    report: &PassReport,
    json: bool,
    always: bool,
    sup: Option<&Supervisor>,
) -> anyhow::Result<()> {
    if json {
        let v = match sup {
            Some(s) => serde_json::to_string_pretty(&s.status(report))?,
            None => serde_json::to_string(&serde_json::json!({
                "at": report.started_at,
                "dryRun": report.dry_run,
                "ok": report.ok(),
                "plan": report.plan,
                "actions": report.actions,
                "errors": report.errors,
            }))?,
        };
        println!("{v}");
        return Ok(());
    }
    let changed = report.plan.as_ref().is_some_and(|p| !p.is_noop());
    if !(always || changed || !report.ok()) {
        return Ok(());
    }
    if let Some(p) = &report.plan {
        let c = &p.counts;
        println!(
            "{}desired {} (busy {} + queued {} + floor {}, capped to max); live {}: ready {}, busy {}, booting {}, draining {}, disconnected {}, failed {}",
            if report.dry_run { "[dry run] " } else { "" },
            p.desired,
            c.busy,
            p.queued,
            p.floor,
            c.live,
            c.ready,
            c.busy,
            c.booting,
            c.draining,
            c.disconnected,
            c.failed
        );
        let verb = |now: &str, later: &str| {
            if report.dry_run {
                later.to_string()
            } else {
                now.to_string()
            }
        };
        if p.create > 0 {
            println!(
                "  {} {} instance(s)",
                verb("create", "would create"),
                p.create
            );
        }
        for d in &p.destroy {
            println!(
                "  {} {} ({}, {})",
                verb("destroy", "would destroy"),
                d.instance_id,
                d.status,
                d.reason.as_str()
            );
        }
        for id in &p.remove_provider_orphans {
            println!(
                "  {} orphan {id} (provider only)",
                verb("remove", "would remove")
            );
        }
        for o in &p.pending_orphans {
            println!(
                "  orphan {} ({:?}) first seen at {}, removed after {} if still orphaned",
                o.instance_id, o.kind, o.first_seen_at, o.remove_after
            );
        }
        if p.is_noop() {
            println!("  nothing to do");
        }
    }
    for a in report.actions.iter().filter(|a| a.outcome != "done") {
        println!(
            "  {} {} {}: {}",
            a.kind,
            a.instance_id.as_deref().unwrap_or("-"),
            a.outcome,
            a.detail.as_deref().unwrap_or("")
        );
    }
    for e in &report.errors {
        eprintln!("paddock pool: error: {e}");
    }
    Ok(())
}
