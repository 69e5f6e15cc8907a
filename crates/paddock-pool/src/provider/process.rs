//! The `process` provider: each instance is a local agent process (`paddock agent connect`,
//! with the instance token in its environment), for development, tests and single hosts.
//!
//! - The process runs in its own process group, so it survives the supervisor (a crash, a
//!   SIGKILL, a Ctrl-C in the supervisor's terminal) and a restarted supervisor finds it.
//! - Files, under the provider's directory (`<state-dir>/<pool>/`): `<instance>.json`, the
//!   record (`{"version":1,"instanceId","pid","startTime","createdAt","log"}`, where
//!   `startTime` is field 22 of `/proc/<pid>/stat`, so a recycled pid is never mistaken
//!   for the instance); `<instance>.log`, its stdout and stderr (kept after destruction,
//!   for post-mortems); `<instance>.home/`, its `HOME` (work directories), removed on
//!   destruction.
//! - The environment is built, not inherited: `PATH`, `HOME`, `TMPDIR`/`LANG`/`RUST_LOG`/
//!   `DOCKER_HOST` when set, every `PADDOCK_AGENT_*` variable of the supervisor (agent
//!   settings), the configured extras, then the instance's variables (`VM_*`,
//!   `CONTROL_PLANE_WS`). The supervisor's own API token never reaches an instance, and the
//!   instance token is never on a command line (`ps` shows it to every user).
//! - Every process carries `PADDOCK_POOL_PROCESS_DIR=<dir>` in its environment: `list`
//!   adopts (records) a marked process that has no record (a supervisor killed between
//!   spawning and recording it), and `destroy` finds it, so no process escapes.
//! - `destroy` sends SIGTERM to the process group of the agent and of each of its
//!   descendants (tasks run in groups of their own), waits up to the grace, then SIGKILLs
//!   what is left, and removes the record. Processes are matched by pid *and* start time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{
    Launch, Provider, ProviderError, ProviderFuture, ProviderInstance, ProviderResult, safe_id,
};
use crate::files::write_atomic;

/// Set on every instance process to the provider's directory: `list` adopts a marked
/// process that has no record, `destroy` finds it.
pub const MARKER_VAR: &str = "PADDOCK_POOL_PROCESS_DIR";

/// Environment variables of the supervisor passed to instances besides `PADDOCK_AGENT_*`.
const PASSED_VARS: &[&str] = &["TMPDIR", "LANG", "RUST_LOG", "DOCKER_HOST"];

/// Settings of the process provider.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Where records, logs and homes live (`<state-dir>/<pool>`).
    pub dir: PathBuf,
    /// The program (default: this `paddock` executable).
    pub program: PathBuf,
    /// Its arguments (default: `agent connect`).
    pub args: Vec<String>,
    /// Extra environment (e.g. `PADDOCK_AGENT_EXEC_BACKEND`).
    pub env: BTreeMap<String, String>,
    /// SIGTERM to SIGKILL.
    pub grace: Duration,
}

impl ProcessConfig {
    /// Defaults: the current executable as `paddock agent connect`, a 10 s grace.
    ///
    /// # Errors
    /// The current executable cannot be found.
    pub fn for_agent(dir: PathBuf) -> ProviderResult<ProcessConfig> {
        let program = std::env::current_exe()
            .map_err(|e| ProviderError::new(format!("cannot find the paddock executable: {e}")))?;
        Ok(ProcessConfig {
            dir,
            program,
            args: vec!["agent".into(), "connect".into()],
            env: BTreeMap::new(),
            grace: Duration::from_secs(10),
        })
    }
}

/// The on-disk record of one instance's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    /// Format version (1).
    pub version: u32,
    /// Instance id.
    pub instance_id: String,
    /// Process id (also its process group id).
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot): tells a recycled pid apart.
    pub start_time: u64,
    /// When it was started (ms since the epoch).
    pub created_at: i64,
    /// Its log file.
    pub log: PathBuf,
}

/// Local agent processes.
#[derive(Debug, Clone)]
pub struct ProcessProvider {
    cfg: ProcessConfig,
}

impl ProcessProvider {
    /// A provider writing under `cfg.dir`.
    pub fn new(cfg: ProcessConfig) -> ProcessProvider {
        ProcessProvider { cfg }
    }

    /// The record file of an instance.
    pub fn record_path(&self, instance_id: &str) -> PathBuf {
        self.cfg.dir.join(format!("{instance_id}.json"))
    }

    /// The log file of an instance.
    pub fn log_path(&self, instance_id: &str) -> PathBuf {
        self.cfg.dir.join(format!("{instance_id}.log"))
    }

    fn home_path(&self, instance_id: &str) -> PathBuf {
        self.cfg.dir.join(format!("{instance_id}.home"))
    }

    /// The record of an instance, if any.
    pub fn record(&self, instance_id: &str) -> Option<ProcessRecord> {
        read_record(&self.record_path(instance_id))
    }

    fn command(&self, launch: &Launch, home: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.cfg.program);
        cmd.args(&self.cfg.args).env_clear();
        cmd.env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        );
        cmd.env("HOME", home);
        for (k, v) in std::env::vars() {
            if k.starts_with("PADDOCK_AGENT_") || PASSED_VARS.contains(&k.as_str()) {
                cmd.env(k, v);
            }
        }
        cmd.envs(&self.cfg.env);
        cmd.envs(&launch.env);
        // The marker that finds the process even without its record (a supervisor killed
        // between spawning it and writing the record).
        cmd.env(MARKER_VAR, &self.cfg.dir);
        cmd.process_group(0)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(false);
        cmd
    }

    async fn create_impl(&self, launch: &Launch) -> ProviderResult<()> {
        let id = &launch.instance_id;
        if !safe_id(id) {
            return Err(ProviderError::new(format!("unusable instance id {id:?}")));
        }
        if let Some(rec) = self.record(id)
            && process_alive(rec.pid, rec.start_time)
        {
            return Ok(()); // created already
        }
        std::fs::create_dir_all(&self.cfg.dir)
            .map_err(|e| ProviderError::new(format!("creating {}: {e}", self.cfg.dir.display())))?;
        let home = self.home_path(id);
        std::fs::create_dir_all(&home)
            .map_err(|e| ProviderError::new(format!("creating {}: {e}", home.display())))?;
        let log_path = self.log_path(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| ProviderError::new(format!("opening {}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ProviderError::new(format!("log file: {e}")))?;
        let mut cmd = self.command(launch, &home);
        cmd.stdout(log).stderr(log2);
        let mut child = cmd.spawn().map_err(|e| {
            ProviderError::new(format!("cannot start {}: {e}", self.cfg.program.display()))
        })?;
        let Some(pid) = child.id().map(|p| p as i32) else {
            return Err(ProviderError::new("the agent process exited at once"));
        };
        let start_time = match proc_stat(pid) {
            Some(s) => s.start_time,
            None => {
                let _ = child.start_kill();
                return Err(ProviderError::new("the agent process exited at once"));
            }
        };
        let record = ProcessRecord {
            version: 1,
            instance_id: id.clone(),
            pid,
            start_time,
            created_at: now_ms(),
            log: log_path,
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(ProviderError::new)?;
        if let Err(e) = write_atomic(&self.record_path(id), &bytes) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(ProviderError::new(format!("writing the record: {e}")));
        }
        // Reap it when it exits (while this supervisor lives; init does it otherwise).
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        tracing::debug!(instance = %id, pid, "process provider: started");
        Ok(())
    }

    async fn destroy_impl(&self, instance_id: &str) -> ProviderResult<()> {
        if !safe_id(instance_id) {
            return Err(ProviderError::new(format!(
                "unusable instance id {instance_id:?}"
            )));
        }
        let path = self.record_path(instance_id);
        if let Some(rec) = read_record(&path) {
            terminate_tree(rec.pid, rec.start_time, self.cfg.grace).await?;
        }
        for (id, pid, start_time) in marked_processes(&self.cfg.dir) {
            if id == instance_id {
                terminate_tree(pid, start_time, self.cfg.grace).await?;
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ProviderError::new(format!(
                    "removing {}: {e}",
                    path.display()
                )));
            }
        }
        let home = self.home_path(instance_id);
        match std::fs::remove_dir_all(&home) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(home = %home.display(), error = %e, "process provider: could not remove the instance home")
            }
        }
        Ok(())
    }

    fn list_impl(&self) -> ProviderResult<Vec<ProviderInstance>> {
        let entries = match std::fs::read_dir(&self.cfg.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(ProviderError::new(format!(
                    "reading {}: {e}",
                    self.cfg.dir.display()
                )));
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if !safe_id(stem) {
                continue;
            }
            let Some(rec) = read_record(&path) else {
                continue;
            };
            if rec.instance_id != stem {
                continue;
            }
            out.push(ProviderInstance {
                running: process_alive(rec.pid, rec.start_time),
                detail: format!("pid {}", rec.pid),
                instance_id: rec.instance_id,
            });
        }
        // Adopt marked processes that have no record.
        for (id, pid, start_time) in marked_processes(&self.cfg.dir) {
            if out.iter().any(|i| i.instance_id == id) || !safe_id(&id) {
                continue;
            }
            let record = ProcessRecord {
                version: 1,
                instance_id: id.clone(),
                pid,
                start_time,
                created_at: now_ms(),
                log: self.log_path(&id),
            };
            if let Ok(bytes) = serde_json::to_vec_pretty(&record) {
                let _ = write_atomic(&self.record_path(&id), &bytes);
            }
            tracing::info!(instance = %id, pid, "process provider: adopted a process without a record");
            out.push(ProviderInstance {
                running: true,
                detail: format!("pid {pid}"),
                instance_id: id,
            });
        }
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(out)
    }
}

/// Live process-group leaders carrying [`MARKER_VAR`] = `dir`: (instance id, pid, start
/// time).
fn marked_processes(dir: &Path) -> Vec<(String, i32, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let marker = format!("{MARKER_VAR}={}", dir.display());
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Some(st) = proc_stat(pid) else { continue };
        if st.pgid != pid || matches!(st.state, 'Z' | 'X') {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let mut marked = false;
        let mut id = None;
        for var in environ.split(|b| *b == 0) {
            let var = String::from_utf8_lossy(var);
            if var == marker {
                marked = true;
            } else if let Some(v) = var.strip_prefix("VM_INSTANCE_ID=") {
                id = Some(v.to_string());
            }
        }
        if let (true, Some(id)) = (marked, id) {
            out.push((id, pid, st.start_time));
        }
    }
    out
}

impl Provider for ProcessProvider {
    fn name(&self) -> &'static str {
        "process"
    }

    fn create<'a>(&'a self, launch: &'a Launch) -> ProviderFuture<'a, ()> {
        Box::pin(self.create_impl(launch))
    }

    fn destroy<'a>(&'a self, instance_id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(self.destroy_impl(instance_id))
    }

    fn list(&self) -> ProviderFuture<'_, Option<Vec<ProviderInstance>>> {
        Box::pin(async move { self.list_impl().map(Some) })
    }
}

fn read_record(path: &Path) -> Option<ProcessRecord> {
    let bytes = std::fs::read(path).ok()?;
    let rec: ProcessRecord = serde_json::from_slice(&bytes).ok()?;
    (rec.version == 1 && rec.pid > 1).then_some(rec)
}

/// What `/proc/<pid>/stat` tells about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// State letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Parent pid.
    pub ppid: i32,
    /// Process group.
    pub pgid: i32,
    /// Start time, clock ticks after boot.
    pub start_time: u64,
}

/// Reads `/proc/<pid>/stat`.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may contain anything.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field N is fields[N - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Whether `pid` is a live (not zombie) process started at `start_time`.
pub fn process_alive(pid: i32, start_time: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_time == start_time && !matches!(s.state, 'Z' | 'X'))
}

/// The live descendants of `root` (pid and start time), found through `/proc`.
fn descendants(root: i32) -> Vec<(i32, ProcStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut all: Vec<(i32, ProcStat)> = Vec::new();
    for e in entries.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
            && let Some(st) = proc_stat(pid)
        {
            all.push((pid, st));
        }
    }
    let mut found = BTreeSet::from([root]);
    let mut out = Vec::new();
    loop {
        let before = found.len();
        for (pid, st) in &all {
            if found.contains(&st.ppid) && found.insert(*pid) {
                out.push((*pid, *st));
            }
        }
        if found.len() == before {
            return out;
        }
    }
}

/// SIGTERM to the process groups of `pid` (if it is still the process started at
/// `start_time`) and of its descendants, up to `grace` for them to exit, then SIGKILL.
async fn terminate_tree(pid: i32, start_time: u64, grace: Duration) -> ProviderResult<()> {
    if !process_alive(pid, start_time) {
        return Ok(()); // gone, or the pid was recycled: not ours to signal
    }
    let mut procs = vec![(pid, start_time)];
    let mut groups = BTreeSet::from([pid]);
    for (p, st) in descendants(pid) {
        procs.push((p, st.start_time));
        groups.insert(st.pgid);
    }
    let alive = |procs: &[(i32, u64)]| procs.iter().any(|(p, s)| process_alive(*p, *s));
    for g in &groups {
        if *g > 1 {
            let _ = killpg(Pid::from_raw(*g), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while alive(&procs) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if alive(&procs) {
        for g in &groups {
            if *g > 1 {
                let _ = killpg(Pid::from_raw(*g), Signal::SIGKILL);
            }
        }
        for (p, s) in &procs {
            if process_alive(*p, *s) {
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(&procs) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if alive(&procs) {
            return Err(ProviderError::new(format!(
                "process {pid} did not exit after SIGKILL"
            )));
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
#[path = "process_tests.rs"]
mod tests;
