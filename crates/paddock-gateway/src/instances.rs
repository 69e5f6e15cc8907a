//! Instances on demand (seed 000): a task for a user whose instance is not ready creates the
//! instance, triggers its bootstrap command, and is answered `503 INSTANCE_NOT_READY` with
//! `retryAfterMs`; the client retries until the instance's runtime has connected to
//! `/ws/vm`.
//!
//! The bootstrap command runs here, on the replica that won the trigger
//! ([`paddock_store::Store::begin_bootstrap`] lets exactly one caller win), with the seed's
//! environment: `VM_USER_ID`, `VM_ORG_ID`, `VM_INSTANCE_ID`, `VM_MODE`, `VM_TOKEN` (signed,
//! short-lived, for this instance only), `CONTROL_PLANE_WS`, `VM_TICKET` when given, and
//! `PADDOCK_BIN` (this executable, for local scripts). A non-zero exit or a time-out is a
//! failed attempt; so is a runtime that has not connected `VM_BOOT_TIMEOUT_MS` after the
//! trigger (checked by the reaper). The instance is `ready` when its runtime connects, not
//! when the command exits.

use std::process::Stdio;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use paddock_proto::{ErrorCode, now_ms};
use paddock_store::{ApiPrincipal, BootstrapDecision, Instance, InstanceStatus, Role};
use tokio::io::AsyncReadExt;

use crate::AppState;
use crate::bus::{self, BusEvent};
use crate::error::ApiError;

/// The `instance:` selector value meaning "the caller's own instance".
pub const SELF_INSTANCE: &str = "self";

/// How often a client should poll while a bootstrap is in flight.
const POLL_MS: u64 = 1000;

/// Most bytes of the command's output kept for `lastError`.
const ERROR_TAIL: usize = 2048;

/// The user a request acts for: `X-User-Id` when an owner or admin names one (a product
/// backend acting for its users, as in seed 000), else the API token itself.
///
/// # Errors
/// A member naming another user (`403`), or an empty or overlong header (`400`).
pub(crate) fn acting_user(
    principal: &ApiPrincipal,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let Some(v) = headers.get("x-user-id") else {
        return Ok(format!("token:{}", principal.token_id));
    };
    let user = v
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|u| !u.is_empty() && u.len() <= 200)
        .ok_or_else(|| ApiError::invalid("X-User-Id must be 1 to 200 visible characters"))?;
    if principal.role < Role::Admin {
        return Err(ApiError::forbidden(
            "only owner or admin tokens may act for another user (X-User-Id)",
        ));
    }
    Ok(user.to_string())
}

/// `VM_TICKET`, from the `X-VM-Ticket` header.
pub(crate) fn ticket(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-vm-ticket")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|t| !t.is_empty())
}

/// A `503 INSTANCE_NOT_READY` carrying the instance and when to retry.
pub(crate) fn not_ready(inst: &Instance, retry_after_ms: u64) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::InstanceNotReady,
        format!(
            "instance {} is {} (bootstrap attempt {}); retry after {} ms",
            inst.id,
            inst.status.as_str(),
            inst.bootstrap_attempts,
            retry_after_ms
        ),
    )
    .with_retry_after(retry_after_ms)
    .with_instance(inst)
}

fn failed(inst: &Instance) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::InstanceFailed,
        format!(
            "instance {} failed after {} bootstrap attempts: {}; POST /api/v1/vm/rebootstrap to try again",
            inst.id,
            inst.bootstrap_attempts,
            inst.last_error.as_deref().unwrap_or("unknown error")
        ),
    )
    .with_instance(inst)
}

fn not_configured() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::BootstrapNotConfigured,
        "no bootstrap command is configured (set PADDOCK_BOOTSTRAP_CMD, or provide scripts/vm/bootstrap-local.sh outside production)",
    )
}

/// The caller's instance if it is ready (or busy); otherwise it is created and its bootstrap
/// triggered when allowed, and the answer is the error to send (`INSTANCE_NOT_READY` with
/// `retryAfterMs`, `INSTANCE_FAILED`, `BOOTSTRAP_NOT_CONFIGURED`).
///
/// # Errors
/// As above, or a database failure.
pub(crate) async fn ready_instance(
    state: &AppState,
    org_id: &str,
    user_id: &str,
    ticket: Option<String>,
) -> Result<Instance, ApiError> {
    let existing = state.store.user_instance(org_id, user_id).await?;
    if let Some(inst) = &existing
        && matches!(inst.status, InstanceStatus::Ready | InstanceStatus::Busy)
    {
        return Ok(inst.clone());
    }
    let Some(cmd) = state.cfg.bootstrap_command() else {
        return Err(not_configured());
    };
    let inst = match existing {
        Some(i) => i,
        None => {
            let i = state
                .store
                .ensure_user_instance(org_id, user_id, "command")
                .await?;
            instance_changed(state, &i).await;
            i
        }
    };
    trigger(state, inst, cmd, ticket, false).await
}

/// Forces a bootstrap of the caller's instance (`POST /api/v1/vm/rebootstrap`): bypasses
/// the cooldown and the spent attempts. Returns the instance and whether this call
/// triggered it (`false` when it is connected already).
///
/// # Errors
/// No bootstrap command, or a database failure.
pub(crate) async fn rebootstrap(
    state: &AppState,
    org_id: &str,
    user_id: &str,
    ticket: Option<String>,
) -> Result<(Instance, bool), ApiError> {
    let Some(cmd) = state.cfg.bootstrap_command() else {
        return Err(not_configured());
    };
    let inst = state
        .store
        .ensure_user_instance(org_id, user_id, "command")
        .await?;
    let (decision, fresh) = begin(state, inst, cmd, ticket, true).await?;
    Ok((
        fresh,
        matches!(decision, BootstrapDecision::Triggered { .. }),
    ))
}

/// Asks the store for a bootstrap and, if this caller won it, starts the command. Returns
/// the decision and the instance as it is now.
async fn begin(
    state: &AppState,
    inst: Instance,
    cmd: String,
    ticket: Option<String>,
    force: bool,
) -> Result<(BootstrapDecision, Instance), ApiError> {
    let cfg = &state.cfg.instances;
    let decision = state
        .store
        .begin_bootstrap(
            &inst.id,
            now_ms(),
            cfg.cooldown.as_millis() as u64,
            cfg.max_attempts,
            force,
        )
        .await?;
    let fresh = state.store.find_instance(&inst.id).await?.unwrap_or(inst);
    if let BootstrapDecision::Triggered { attempt } = decision {
        spawn_bootstrap(state, fresh.clone(), attempt, cmd, ticket);
        instance_changed(state, &fresh).await;
    }
    Ok((decision, fresh))
}

async fn trigger(
    state: &AppState,
    inst: Instance,
    cmd: String,
    ticket: Option<String>,
    force: bool,
) -> Result<Instance, ApiError> {
    let cfg = &state.cfg.instances;
    let (decision, fresh) = begin(state, inst, cmd, ticket, force).await?;
    match decision {
        BootstrapDecision::Ready => Ok(fresh),
        BootstrapDecision::Triggered { .. } => Err(not_ready(
            &fresh,
            POLL_MS.min(cfg.boot_timeout.as_millis() as u64),
        )),
        BootstrapDecision::Wait { retry_after_ms } => {
            let retry = if fresh.status == InstanceStatus::Provisioning {
                POLL_MS
            } else {
                retry_after_ms.max(1)
            };
            Err(not_ready(&fresh, retry))
        }
        BootstrapDecision::Failed => Err(failed(&fresh)),
        BootstrapDecision::Gone => Err(not_ready(&fresh, POLL_MS)),
    }
}

/// Runs the bootstrap command in the background for attempt `attempt`.
fn spawn_bootstrap(
    state: &AppState,
    inst: Instance,
    attempt: u32,
    cmd: String,
    ticket: Option<String>,
) {
    let state = state.clone();
    tokio::spawn(async move {
        let outcome = run_command(&state, &inst, &cmd, ticket).await;
        match outcome {
            Ok(()) => tracing::info!(
                instance = %inst.id, attempt,
                "bootstrap command finished; waiting for the runtime to connect"
            ),
            Err(error) => {
                tracing::warn!(instance = %inst.id, attempt, "bootstrap failed: {error}");
                record_failure(&state, &inst.id, attempt, &error).await;
            }
        }
    });
}

/// Records a failed attempt (idempotent per attempt).
pub(crate) async fn record_failure(state: &AppState, instance_id: &str, attempt: u32, error: &str) {
    state.metrics.bootstrap_failures.inc();
    match state
        .store
        .bootstrap_failed(
            instance_id,
            attempt,
            error,
            state.cfg.instances.max_attempts,
        )
        .await
    {
        Ok(Some(inst)) => instance_changed(state, &inst).await,
        Ok(None) => {}
        Err(e) => tracing::warn!(instance = %instance_id, "cannot record bootstrap failure: {e}"),
    }
}

/// A fresh instance token.
pub(crate) fn token_for(state: &AppState, inst: &Instance) -> String {
    let ttl = state.cfg.instances.token_ttl.as_millis() as i64;
    state.signer.sign(&inst.id, &inst.org_id, now_ms() + ttl)
}

/// The environment an instance's runtime needs (seed 000 names).
pub(crate) fn runtime_env(
    state: &AppState,
    inst: &Instance,
    token: &str,
    pool_name: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("VM_USER_ID", inst.user_id.clone().unwrap_or_default()),
        ("VM_ORG_ID", inst.org_id.clone()),
        ("VM_INSTANCE_ID", inst.id.clone()),
        ("VM_MODE", inst.mode.clone()),
        ("VM_TOKEN", token.to_string()),
        ("CONTROL_PLANE_WS", state.cfg.vm_ws_url()),
    ];
    if let Some(p) = pool_name {
        env.push(("VM_POOL", p.to_string()));
    }
    env
}

async fn run_command(
    state: &AppState,
    inst: &Instance,
    cmd: &str,
    ticket: Option<String>,
) -> Result<(), String> {
    let token = token_for(state, inst);
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for (k, v) in runtime_env(state, inst, &token, None) {
        command.env(k, v);
    }
    if let Some(t) = ticket {
        command.env("VM_TICKET", t);
    }
    if let Ok(exe) = std::env::current_exe() {
        command.env("PADDOCK_BIN", exe);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start the bootstrap command: {e}"))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read_tail = |pipe: Option<tokio::process::ChildStdout>| async move {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf).await;
        }
        buf
    };
    let out_task = tokio::spawn(read_tail(stdout.take()));
    let err_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut p) = stderr.take() {
            let _ = p.read_to_end(&mut buf).await;
        }
        buf
    });
    let timeout = state.cfg.instances.boot_timeout;
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("waiting for the bootstrap command: {e}")),
        Err(_) => {
            if let Some(pid) = child.id() {
                kill_group(pid);
            }
            let _ = child.kill().await;
            return Err(format!(
                "bootstrap command still running after {}",
                humantime_ms(timeout)
            ));
        }
    };
    // A script that leaves a background runtime holding the pipes must not block us.
    let grace = Duration::from_millis(500);
    let out = tokio::time::timeout(grace, out_task)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let err = tokio::time::timeout(grace, err_task)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&err).into_owned();
    if text.trim().is_empty() {
        text = String::from_utf8_lossy(&out).into_owned();
    }
    let text = text.replace(&token, "***");
    let text = text.trim();
    let tail = if text.len() > ERROR_TAIL {
        let mut start = text.len() - ERROR_TAIL;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        &text[start..]
    } else {
        text
    };
    let how = match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "was killed by a signal".to_string(),
    };
    Err(if tail.is_empty() {
        format!("bootstrap command {how}")
    } else {
        format!("bootstrap command {how}: {tail}")
    })
}

fn kill_group(pid: u32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // The command runs in its own process group (`process_group(0)`).
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(format!("-{pid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn humantime_ms(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Tells watchers (pool supervisors) and other replicas that an instance changed.
pub(crate) async fn instance_changed(state: &AppState, inst: &Instance) {
    bus::publish(
        state,
        BusEvent::InstanceChanged {
            org: inst.org_id.clone(),
            pool: inst.pool_id.clone(),
        },
    )
    .await;
}

/// Reaper step: instances triggered more than `VM_BOOT_TIMEOUT_MS` ago whose runtime never
/// connected count as failed attempts.
pub(crate) async fn expire_overdue(state: &AppState) -> Result<(), paddock_store::StoreError> {
    let timeout = state.cfg.instances.boot_timeout;
    let overdue = state
        .store
        .overdue_provisioning(now_ms(), timeout.as_millis() as u64)
        .await?;
    for inst in overdue {
        record_failure(
            state,
            &inst.id,
            inst.bootstrap_attempts,
            &format!(
                "the runtime did not connect to /ws/vm within {} of the bootstrap",
                humantime_ms(timeout)
            ),
        )
        .await;
    }
    Ok(())
}
