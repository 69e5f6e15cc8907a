//! Runs dispatched tasks and keeps, per task, the log of messages owed to the gateway
//! (`accepted`, `output` chunks, then `result` or a hand-back). The session sends each log
//! from a cursor; after a reconnect every cursor goes back to zero and the whole log is sent
//! again (the gateway de-duplicates: output by sequence number, results by attempt). A slot
//! is dropped when the gateway acknowledges its result, so nothing is lost across gateway
//! restarts or network drops, and memory stays bounded by the output caps.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use paddock_proto::{
    AgentMessage, Dispatch, ErrorBody, ErrorCode, KIND_AGENT_EXECUTE, KIND_AGENT_NOOP,
    KIND_BUNDLE_RUN, NetworkMode, Output, ResultStatus, RunningTask, TaskRef, TaskResult, now_ms,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::sandbox::host::HostSandbox;
use crate::sandbox::{RunRequest, Sandbox};
use crate::settings::AgentSettings;

/// Variables every task gets (before the passthrough allowlist and per-task env).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug)]
struct Slot {
    attempt: u32,
    cancel: CancellationToken,
    /// Stop and hand the task back instead of reporting a result.
    hand_back: bool,
    log: Vec<AgentMessage>,
    /// Index of the next log entry to send in the current session.
    sent: usize,
    /// Whether the final message (result or hand-back) is in the log.
    finished: bool,
}

/// The task runner of one agent.
#[derive(Debug)]
pub struct Runner {
    settings: Arc<AgentSettings>,
    backends: BTreeMap<String, Arc<dyn Sandbox>>,
    slots: Mutex<HashMap<String, Slot>>,
    /// When the shutdown grace ends (set once, kept across reconnects).
    drain_until: Mutex<Option<tokio::time::Instant>>,
    /// Wakes the session when a log grows.
    pub changed: Arc<Notify>,
    /// A fresh instance token from `hello_ok` (instances on `/ws/vm`), for the next connect.
    renewed_token: Mutex<Option<String>>,
    /// Removal of finished runs' work directories, after their result is reported (on ext4
    /// with `discard`, removing a directory takes about 3 ms).
    cleanups: crate::sandbox::cleanup::Cleanups,
}

impl std::fmt::Debug for dyn Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Runner {
    /// Waits until every backend has finished the background clean-up of past runs, and
    /// their work directories are removed.
    pub async fn settle(&self) {
        for b in self.backends.values() {
            b.settle().await;
        }
        self.cleanups.settle().await;
    }

    /// Keeps a fresh instance token for the next connection.
    pub fn set_renewed_token(&self, token: String) {
        *lock(&self.renewed_token) = Some(token);
    }

    /// Takes the instance token kept by [`Runner::set_renewed_token`], if any.
    pub fn take_renewed_token(&self) -> Option<String> {
        lock(&self.renewed_token).take()
    }

    /// A runner with only the `host` backend.
    pub fn new(settings: AgentSettings) -> Arc<Runner> {
        Runner::with_backends(settings, vec![Arc::new(HostSandbox::new())])
    }

    /// A runner with these backends (see [`crate::sandbox::detect`]).
    pub fn with_backends(settings: AgentSettings, list: Vec<Arc<dyn Sandbox>>) -> Arc<Runner> {
        let backends: BTreeMap<String, Arc<dyn Sandbox>> = list
            .into_iter()
            .map(|b| (b.name().to_string(), b))
            .collect();
        Arc::new(Runner {
            settings: Arc::new(settings),
            backends,
            slots: Mutex::new(HashMap::new()),
            drain_until: Mutex::new(None),
            changed: Arc::new(Notify::new()),
            renewed_token: Mutex::new(None),
            cleanups: crate::sandbox::cleanup::Cleanups::default(),
        })
    }

    /// Settings in force.
    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    /// Backend names, the configured default first (as declared in `hello`).
    pub fn backend_names(&self) -> Vec<String> {
        let default = &self.settings.exec_backend;
        let mut names = vec![default.clone()];
        names.extend(self.backends.keys().filter(|k| *k != default).cloned());
        names.retain(|n| self.backends.contains_key(n));
        names
    }

    /// Tasks to report in `hello` (running, or holding an unacknowledged result).
    pub fn running(&self) -> Vec<RunningTask> {
        lock(&self.slots)
            .iter()
            .map(|(id, s)| RunningTask {
                task_id: id.clone(),
                attempt: s.attempt,
            })
            .collect()
    }

    /// Number of slots (running or awaiting acknowledgement).
    pub fn len(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Whether nothing is running or owed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts a new session: every log will be sent again from the start.
    pub fn rewind(&self) {
        for s in lock(&self.slots).values_mut() {
            s.sent = 0;
        }
    }

    /// Messages not yet sent in this session. Slots whose hand-back has been sent are
    /// dropped (the gateway does not acknowledge hand-backs).
    pub fn take_unsent(&self) -> Vec<AgentMessage> {
        let mut out = Vec::new();
        let mut slots = lock(&self.slots);
        slots.retain(|_, s| {
            out.extend(s.log[s.sent..].iter().cloned());
            s.sent = s.log.len();
            !(s.finished && s.hand_back)
        });
        out
    }

    /// The gateway acknowledged a result: forget the slot.
    pub fn ack(&self, task_id: &str, attempt: u32) {
        let mut slots = lock(&self.slots);
        if slots
            .get(task_id)
            .is_some_and(|s| s.attempt == attempt && s.finished)
        {
            slots.remove(task_id);
        }
    }

    /// Cancels a running attempt (its result will say `canceled`).
    pub fn cancel(&self, task_id: &str, attempt: u32) {
        if let Some(s) = lock(&self.slots).get(task_id)
            && s.attempt == attempt
        {
            s.cancel.cancel();
        }
    }

    /// The drain deadline, if shutdown has begun.
    pub fn drain_deadline(&self) -> Option<tokio::time::Instant> {
        *lock(&self.drain_until)
    }

    /// Starts draining (once): returns the deadline after which running tasks are handed back.
    pub fn start_drain(&self, grace: std::time::Duration) -> tokio::time::Instant {
        *lock(&self.drain_until).get_or_insert_with(|| tokio::time::Instant::now() + grace)
    }

    /// Refuses a dispatch that could not be decoded: reports an error result for it.
    pub fn refuse(&self, task_id: String, attempt: u32, message: String) {
        let now = now_ms();
        let result = TaskResult {
            task_id: task_id.clone(),
            attempt,
            status: ResultStatus::Error,
            exit_code: None,
            signal: None,
            error_code: Some(ErrorCode::MalformedFrame),
            error_message: Some(message),
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            started_at_ms: now,
            finished_at_ms: now,
        };
        let mut slots = lock(&self.slots);
        if slots.contains_key(&task_id) {
            return;
        }
        slots.insert(
            task_id,
            Slot {
                attempt,
                cancel: CancellationToken::new(),
                hand_back: false,
                log: vec![AgentMessage::Result(result)],
                sent: 0,
                finished: true,
            },
        );
        drop(slots);
        self.changed.notify_one();
    }

    /// Stops every unfinished task and hands it back to the gateway (shutdown past grace).
    pub fn hand_back_all(&self) {
        for s in lock(&self.slots).values_mut() {
            if !s.finished {
                s.hand_back = true;
                s.cancel.cancel();
            }
        }
    }

    fn push(&self, task_id: &str, attempt: u32, msg: AgentMessage, finished: bool) {
        if let Some(s) = lock(&self.slots).get_mut(task_id)
            && s.attempt == attempt
        {
            s.log.push(msg);
            s.finished |= finished;
        }
        self.changed.notify_one();
    }

    /// Answers a dispatch: refuses it (hand-back) when draining or full, otherwise starts it.
    pub fn dispatch(self: &Arc<Self>, d: Dispatch, draining: bool) {
        let task_id = d.task_id.clone();
        let attempt = d.attempt;
        {
            let mut slots = lock(&self.slots);
            if let Some(existing) = slots.get(&task_id) {
                if existing.attempt >= attempt {
                    return; // duplicate dispatch
                }
                // A newer attempt supersedes the old one: stop it before its slot is replaced,
                // or its process would run on untracked.
                existing.cancel.cancel();
            }
            let refuse = if draining {
                Some((ErrorCode::AgentShuttingDown, "agent is shutting down"))
            } else if slots.len() >= self.settings.max_in_flight as usize {
                Some((ErrorCode::AgentBusy, "agent is at maxInFlight"))
            } else {
                None
            };
            let mut slot = Slot {
                attempt,
                cancel: CancellationToken::new(),
                hand_back: refuse.is_some(),
                log: Vec::new(),
                sent: 0,
                finished: refuse.is_some(),
            };
            if let Some((code, message)) = refuse {
                slot.log.push(AgentMessage::Error(ErrorBody {
                    code,
                    message: message.into(),
                    task_id: Some(task_id.clone()),
                    attempt: Some(attempt),
                }));
                slots.insert(task_id, slot);
                drop(slots);
                self.changed.notify_one();
                return;
            }
            // `agent.noop` starts nothing: its result, in the log at once, is all there is to
            // report (no `accepted`: one database write fewer on the gateway; no task spawned:
            // one wake-up fewer here).
            if d.spec.kind == KIND_AGENT_NOOP {
                slot.log
                    .push(AgentMessage::Result(noop_result(&d, now_ms())));
                slot.finished = true;
                slots.insert(task_id, slot);
                drop(slots);
                self.changed.notify_one();
                return;
            }
            slot.log.push(AgentMessage::Accepted(TaskRef {
                task_id: task_id.clone(),
                attempt,
            }));
            let cancel = slot.cancel.clone();
            slots.insert(task_id.clone(), slot);
            drop(slots);
            self.changed.notify_one();
            let runner = self.clone();
            tokio::spawn(async move {
                let result = runner.execute(d, cancel).await;
                runner.finish(&task_id, attempt, result);
            });
        }
    }

    fn finish(&self, task_id: &str, attempt: u32, result: TaskResult) {
        let hand_back = lock(&self.slots).get(task_id).is_some_and(|s| s.hand_back);
        let msg = if hand_back {
            AgentMessage::Error(ErrorBody {
                code: ErrorCode::AgentShuttingDown,
                message: "agent shut down before the task finished; handing it back".into(),
                task_id: Some(task_id.into()),
                attempt: Some(attempt),
            })
        } else {
            AgentMessage::Result(result)
        };
        self.push(task_id, attempt, msg, true);
    }

    async fn execute(&self, d: Dispatch, cancel: CancellationToken) -> TaskResult {
        let started = now_ms();
        let fail = |code: ErrorCode, message: String| TaskResult {
            status: ResultStatus::Error,
            exit_code: None,
            error_code: Some(code),
            error_message: Some(message),
            ..noop_result(&d, started)
        };
        if d.spec.kind == KIND_AGENT_NOOP {
            return noop_result(&d, started);
        }
        if d.spec.kind != KIND_AGENT_EXECUTE && d.spec.kind != KIND_BUNDLE_RUN {
            return fail(
                ErrorCode::KindUnsupported,
                format!("this agent does not run `{}` tasks", d.spec.kind),
            );
        }
        let backend_name = d
            .spec
            .sandbox
            .backend
            .clone()
            .unwrap_or_else(|| self.settings.exec_backend.clone());
        let Some(backend) = self.backends.get(&backend_name).cloned() else {
            return fail(
                ErrorCode::BackendUnsupported,
                format!("backend `{backend_name}` is not available on this agent"),
            );
        };
        if let Err(e) = backend.check(&d.spec.sandbox) {
            return fail(e.code(), e.to_string());
        }
        let workdir = self
            .settings
            .workdir_root
            .join(format!("{}-{}", d.task_id, d.attempt));
        if let Err(e) = std::fs::create_dir_all(&workdir) {
            return fail(
                ErrorCode::SpawnFailed,
                format!("cannot create work directory: {e}"),
            );
        }
        let (argv, task_env, stdin, install) = if d.spec.kind == KIND_BUNDLE_RUN {
            let Some(bundle) = d.spec.bundle.clone() else {
                let _ = std::fs::remove_dir_all(&workdir);
                return fail(ErrorCode::InvalidRequest, "`bundle` is required".into());
            };
            match crate::bundle_run::prepare(
                &bundle,
                &workdir,
                &self.settings.bundle_cache_dir,
                self.settings.bundle_cache_max_bytes,
            )
            .await
            {
                Ok(app) => {
                    let cmds = crate::bundle_run::commands(&bundle, &app);
                    (cmds.run, bundle.env.clone(), None, cmds.install)
                }
                Err((code, message)) => {
                    let _ = std::fs::remove_dir_all(&workdir);
                    return fail(code, message);
                }
            }
        } else {
            let Some(shell) = d.spec.shell.clone() else {
                let _ = std::fs::remove_dir_all(&workdir);
                return fail(ErrorCode::InvalidRequest, "`shell` is required".into());
            };
            (
                shell.command(),
                shell.env.clone(),
                shell.stdin.clone(),
                None,
            )
        };
        let inside = backend
            .workdir_inside()
            .map_or_else(|| workdir.display().to_string(), str::to_string);
        let env = build_env(
            &inside,
            &d,
            &task_env,
            &d.spec.sandbox.env_passthrough_allowlist,
        );
        let timeout = d.spec.timeout_ms.map_or_else(
            || {
                backend
                    .default_timeout()
                    .unwrap_or(std::time::Duration::from_millis(d.spec.timeout_ms()))
            },
            std::time::Duration::from_millis,
        );
        let req = RunRequest {
            task_id: d.task_id.clone(),
            attempt: d.attempt,
            argv,
            env,
            stdin,
            workdir: workdir.clone(),
            timeout,
            kill_grace: self.settings.host_kill_grace,
            network: d.spec.sandbox.network_mode.unwrap_or(NetworkMode::Default),
            output_max_chars: self.settings.host_output_max_chars,
            limits: self.settings.limits.tightened(d.spec.sandbox.limits),
            rootfs: self.settings.rootfs.clone(),
        };
        if let Some(script) = install {
            // Dependencies, installed in the task's own sandbox before the entrypoint.
            let mut step = req.clone();
            step.argv = vec!["/bin/sh".into(), "-c".into(), script];
            step.stdin = None;
            // Its own name: containers and cgroups are named after task and attempt.
            step.task_id = format!("{}-install", d.task_id);
            let (itx, mut irx) = mpsc::channel::<crate::sandbox::OutputChunk>(64);
            let drain = async { while irx.recv().await.is_some() {} };
            let (installed, ()) = tokio::join!(backend.run(step, itx, cancel.clone()), drain);
            let problem = match installed {
                Ok(o) if o.status == ResultStatus::Succeeded => None,
                Ok(o) => Some(format!(
                    "{}{}{}",
                    o.error_message
                        .map(|m| format!("{m}: "))
                        .unwrap_or_default(),
                    tail(&o.stderr, 2048),
                    tail(&o.stdout, 512)
                )),
                Err(e) => Some(e.to_string()),
            };
            if let Some(problem) = problem {
                if !d.spec.sandbox.keep_workdir {
                    let _ = std::fs::remove_dir_all(&workdir);
                }
                return fail(
                    ErrorCode::BundleInstallFailed,
                    format!("installing the bundle's dependencies failed: {problem}"),
                );
            }
        }
        let (tx, mut rx) = mpsc::channel::<crate::sandbox::OutputChunk>(64);
        let forward = async {
            let mut seq = 0u64;
            while let Some(chunk) = rx.recv().await {
                seq += 1;
                self.push(
                    &d.task_id,
                    d.attempt,
                    AgentMessage::Output(Output {
                        task_id: d.task_id.clone(),
                        attempt: d.attempt,
                        seq,
                        stream: chunk.stream,
                        data: chunk.data,
                    }),
                    false,
                );
            }
        };
        let (outcome, ()) = tokio::join!(backend.run(req, tx, cancel), forward);
        if d.spec.sandbox.keep_workdir {
            self.push(
                &d.task_id,
                d.attempt,
                AgentMessage::Event(paddock_proto::Event {
                    task_id: d.task_id.clone(),
                    attempt: d.attempt,
                    name: "workdir_kept".into(),
                    payload: serde_json::json!({ "path": workdir.display().to_string() }),
                }),
                false,
            );
        } else {
            // In the background: the result does not wait for the removal.
            let task = d.task_id.clone();
            self.cleanups.spawn("workdir", move || {
                if let Err(e) = std::fs::remove_dir_all(&workdir) {
                    tracing::warn!(task = %task, "could not remove work directory: {e}");
                }
            });
        }
        match outcome {
            Ok(o) => TaskResult {
                task_id: d.task_id.clone(),
                attempt: d.attempt,
                status: o.status,
                exit_code: o.exit_code,
                signal: o.signal,
                error_code: o.error_code,
                error_message: o.error_message,
                stdout: o.stdout,
                stderr: o.stderr,
                stdout_truncated: o.stdout_truncated,
                stderr_truncated: o.stderr_truncated,
                started_at_ms: o.started_at_ms,
                finished_at_ms: o.finished_at_ms,
            },
            Err(e) => fail(e.code(), e.to_string()),
        }
    }
}

/// The last `max` bytes of `s` (on a character boundary).
fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The task's environment: a minimal base, then allowlisted agent variables, then the
/// task's own variables. Nothing else from the agent's environment leaks in.
fn build_env(
    workdir: &str,
    d: &Dispatch,
    task_env: &BTreeMap<String, String>,
    allowlist: &[String],
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), workdir.to_string());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("PADDOCK_TASK_ID".into(), d.task_id.clone());
    env.insert("PADDOCK_TASK_ATTEMPT".into(), d.attempt.to_string());
    env.insert("PADDOCK_WORKDIR".into(), workdir.to_string());
    for key in allowlist {
        if let Some(v) = std::env::var_os(key) {
            env.insert(key.clone(), v.to_string_lossy().into_owned());
        }
    }
    for (k, v) in task_env {
        env.insert(k.clone(), v.clone());
    }
    env
}

/// The result of an `agent.noop` task: nothing to run, succeeded (the dispatch path alone);
/// also the base of a result that never ran.
fn noop_result(d: &Dispatch, started: i64) -> TaskResult {
    TaskResult {
        task_id: d.task_id.clone(),
        attempt: d.attempt,
        status: ResultStatus::Succeeded,
        exit_code: Some(0),
        signal: None,
        error_code: None,
        error_message: None,
        stdout: String::new(),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        started_at_ms: started,
        finished_at_ms: now_ms(),
    }
}
