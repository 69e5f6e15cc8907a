//! The OCI runtime binary: finding it, the hugetlb mount crun needs on hybrid cgroup hosts,
//! running its short commands (`kill`, `delete`), stopping a container (SIGTERM, grace,
//! SIGKILL, then the runtime's process group), reading the errors it logged, and the
//! cleanup after every run.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::super::SandboxError;
use super::super::cgroup::{self, Cgroup};
use super::super::cleanup::Cleanups;
use super::super::supervise::signal_group;

/// Bound on one `kill`/`delete`/`list` invocation of the runtime.
const RUNTIME_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the runtime may take to exit after the container got SIGKILL, before its own
/// process group is killed.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Directories searched for the runtime after `PATH` (runc lives in `/usr/sbin` on Debian).
const SEARCH_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// `PATH` of the runtime process (its environment is not the task's).
const RUNTIME_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where crun needs the hugetlb controller mounted on hybrid cgroup hosts.
const HUGETLB_V1_MOUNT: &str = "/sys/fs/cgroup/hugetlb";

/// Serialises the check-then-mount of the hugetlb hierarchy within this process.
static HUGETLB_LOCK: Mutex<()> = Mutex::new(());

pub(super) fn resolve_runtime(runtime: Option<&Path>) -> Result<PathBuf, String> {
    match runtime {
        Some(path) if path.components().count() > 1 => {
            if path.is_file() {
                Ok(path.to_path_buf())
            } else {
                Err(format!("OCI runtime {} not found", path.display()))
            }
        }
        Some(name) => find_in_path(name)
            .ok_or_else(|| format!("OCI runtime {} not found in PATH", name.display())),
        None => find_in_path(Path::new("crun"))
            .or_else(|| find_in_path(Path::new("runc")))
            .ok_or_else(|| "no OCI runtime found: neither crun nor runc is in PATH".to_string()),
    }
}

/// Which runtime this is (they differ in small ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RuntimeKind {
    Crun,
    Runc,
    Other,
}

/// What a runtime says about itself.
pub(super) struct RuntimeInfo {
    /// First line of `<runtime> --version`.
    pub(super) version: String,
    pub(super) kind: RuntimeKind,
    /// `crun`, `runc`, or the file name of another runtime.
    pub(super) name: String,
    /// `run --keep` is supported.
    pub(super) keep: bool,
}

/// `program` with the environment of the runtime's processes (only [`RUNTIME_PATH_ENV`])
/// and no standard input.
pub(super) fn clean_command(program: impl AsRef<OsStr>) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear()
        .env("PATH", RUNTIME_PATH_ENV)
        .stdin(Stdio::null());
    cmd
}

/// `<runtime> <global> <args>` whose output is not wanted.
fn runtime_command_line(
    runtime: &Path,
    global: &[OsString],
    args: &[&str],
) -> std::process::Command {
    let mut cmd = clean_command(runtime);
    cmd.args(global).args(args).stdout(Stdio::null());
    cmd
}

/// Asks the runtime its version (which must succeed) and whether `run` has `--keep`.
pub(super) fn probe(runtime: &Path) -> Result<RuntimeInfo, String> {
    let version = clean_command(runtime)
        .arg("--version")
        .output()
        .map_err(|err| format!("cannot run {} --version: {err}", runtime.display()))?;
    if !version.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            runtime.display(),
            version.status,
            String::from_utf8_lossy(&version.stderr).trim()
        ));
    }
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let kind = if version.starts_with("crun") {
        RuntimeKind::Crun
    } else if version.starts_with("runc") {
        RuntimeKind::Runc
    } else {
        RuntimeKind::Other
    };
    let name = match kind {
        RuntimeKind::Crun => "crun".to_string(),
        RuntimeKind::Runc => "runc".to_string(),
        RuntimeKind::Other => runtime.file_name().map_or_else(
            || "oci-runtime".into(),
            |n| n.to_string_lossy().into_owned(),
        ),
    };
    let help = clean_command(runtime)
        .args(["run", "--help"])
        .output()
        .map_err(|err| format!("cannot run {} run --help: {err}", runtime.display()))?;
    let keep = String::from_utf8_lossy(&help.stdout).contains("--keep")
        || String::from_utf8_lossy(&help.stderr).contains("--keep");
    Ok(RuntimeInfo {
        version,
        kind,
        name,
        keep,
    })
}

/// An executable file named `name` in `PATH` or [`SEARCH_DIRS`].
pub(super) fn find_in_path(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SEARCH_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// crun 1.8 fails on hybrid hosts (controllers on v1, an empty cgroup2 at
/// `/sys/fs/cgroup/unified`) unless hugetlb, which the kernel leaves on the v2 hierarchy,
/// is mounted as a v1 hierarchy. Mounts it when cgroup v1 is in use and no v1 hierarchy
/// has it yet.
pub(super) fn ensure_hugetlb_v1() -> Result<(), String> {
    let _lock = HUGETLB_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cgroups = fs::read_to_string("/proc/cgroups").unwrap_or_default();
    let hugetlb_enabled = cgroups.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 4 && f[0] == "hugetlb" && f[3] == "1"
    });
    if !hugetlb_enabled {
        return Ok(());
    }
    let mounts = cgroup::mounts();
    let v1_in_use = mounts.iter().any(|m| m.is_v1_with("memory"));
    if !v1_in_use {
        return Ok(());
    }
    let hugetlb_mounted = mounts
        .iter()
        .any(|m| m.is_v1_with("hugetlb") || m.mount_point == Path::new(HUGETLB_V1_MOUNT));
    if hugetlb_mounted {
        return Ok(());
    }
    fs::create_dir_all(HUGETLB_V1_MOUNT).map_err(|err| {
        format!(
            "crun needs the hugetlb cgroup v1 hierarchy: cannot create {HUGETLB_V1_MOUNT}: {err} \
             (run: mkdir -p {HUGETLB_V1_MOUNT} && mount -t cgroup -o hugetlb cgroup {HUGETLB_V1_MOUNT})"
        )
    })?;
    nix::mount::mount(
        Some("cgroup"),
        HUGETLB_V1_MOUNT,
        Some("cgroup"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("hugetlb"),
    )
    .map_err(|err| {
        format!(
            "crun needs the hugetlb cgroup v1 hierarchy: mounting it at {HUGETLB_V1_MOUNT} \
             failed: {err} (run: mount -t cgroup -o hugetlb cgroup {HUGETLB_V1_MOUNT})"
        )
    })?;
    tracing::info!("mounted the hugetlb cgroup v1 hierarchy at {HUGETLB_V1_MOUNT} for crun");
    Ok(())
}

/// The error for a runtime that failed before the task ran.
pub(super) fn setup_error(program: &str, errors: &[String]) -> SandboxError {
    let text = errors.join("; ");
    if text.contains(program) && text.contains("exec") {
        SandboxError::SpawnFailed {
            program: program.to_string(),
            reason: text,
        }
    } else {
        SandboxError::Setup(text)
    }
}

/// Messages of the error entries of a runtime's JSON log.
pub(super) fn runtime_errors(log: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(log) else {
        return Vec::new();
    };
    parse_runtime_errors(&text)
}

fn parse_runtime_errors(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| {
            matches!(
                entry.get("level").and_then(|l| l.as_str()),
                Some("error" | "fatal" | "panic")
            )
        })
        .map(|entry| {
            entry
                .get("msg")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown runtime error")
                .to_string()
        })
        .collect()
}

/// Signals a running container.
pub(super) struct Killer<'a> {
    pub(super) runtime: &'a Path,
    pub(super) global: &'a [OsString],
    pub(super) id: &'a str,
    pub(super) owned: Option<&'a Cgroup>,
    pub(super) run_pid: Pid,
}

impl Killer<'_> {
    /// SIGTERM to every process of the container; waits up to `grace` for the runtime to
    /// exit; SIGKILL; waits up to [`KILL_WAIT`]; then kills the runtime's process group.
    pub(super) async fn terminate(
        &self,
        child: &mut Child,
        grace: Duration,
    ) -> io::Result<ExitStatus> {
        self.signal(Signal::SIGTERM).await;
        let now = Instant::now();
        let deadline = now
            .checked_add(grace)
            .unwrap_or(now + Duration::from_secs(86_400));
        if let Ok(status) = tokio::time::timeout_at(deadline, child.wait()).await {
            return status;
        }
        self.signal(Signal::SIGKILL).await;
        if let Ok(status) = tokio::time::timeout(KILL_WAIT, child.wait()).await {
            return status;
        }
        tracing::warn!(
            container = %self.id,
            "oci sandbox: runtime still running after SIGKILL; killing its process group"
        );
        signal_group(self.run_pid, Signal::SIGKILL);
        child.wait().await
    }

    async fn signal(&self, signal: Signal) {
        let name = signal.as_str();
        match self.owned {
            // crun without a cgroup manager: every process of the cgroup but crun itself,
            // the container's init included, once. (Also asking crun to signal the init
            // delivered SIGTERM to it twice, and a shell trap ran twice.)
            Some(cgroups) => cgroups.signal_all(signal, Some(self.run_pid)),
            None => {
                if !runtime_command(self.runtime, self.global, &["kill", "--all", self.id, name])
                    .await
                {
                    runtime_command(self.runtime, self.global, &["kill", self.id, name]).await;
                }
            }
        }
    }
}

/// Runs `<runtime> <global> <args>`, bounded by [`RUNTIME_COMMAND_TIMEOUT`]. Whether it
/// succeeded.
async fn runtime_command(runtime: &Path, global: &[OsString], args: &[&str]) -> bool {
    let mut cmd = Command::from(runtime_command_line(runtime, global, args));
    cmd.stderr(Stdio::piped()).kill_on_drop(true);
    match tokio::time::timeout(RUNTIME_COMMAND_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => true,
        Ok(Ok(out)) => {
            tracing::debug!(
                args = ?args,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "oci runtime command failed"
            );
            false
        }
        Ok(Err(err)) => {
            tracing::debug!(args = ?args, error = %err, "oci runtime command could not run");
            false
        }
        Err(_) => {
            tracing::warn!(args = ?args, "oci runtime command timed out");
            false
        }
    }
}

/// Blocking [`runtime_command`].
pub(super) fn runtime_command_blocking(runtime: &Path, global: &[OsString], args: &[&str]) -> bool {
    let child = runtime_command_line(runtime, global, args)
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let deadline = std::time::Instant::now() + RUNTIME_COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// What has to go after a run: the container, the owned cgroups, the bundle.
#[derive(Debug)]
pub(super) struct Cleanup {
    pub(super) runtime: PathBuf,
    pub(super) global: Vec<OsString>,
    pub(super) state_root: PathBuf,
    pub(super) id: String,
    pub(super) bundle: PathBuf,
    pub(super) owned: Option<Cgroup>,
}

impl Cleanup {
    /// Blocking.
    pub(super) fn run(&self) {
        if let Some(cgroups) = &self.owned {
            cgroups.signal_all(Signal::SIGKILL, None);
        }
        if self.state_root.join(&self.id).exists()
            && !runtime_command_blocking(&self.runtime, &self.global, &["delete", "-f", &self.id])
        {
            tracing::warn!(container = %self.id, "oci sandbox: delete -f failed");
        }
        if let Some(cgroups) = &self.owned {
            cgroups.remove();
        }
        match fs::remove_dir_all(&self.bundle) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(bundle = %self.bundle.display(), error = %err, "cannot remove bundle");
            }
        }
    }
}

/// Hands the cleanup to the background [`Cleanups`] when dropped (`Drop` cannot wait),
/// unless it was taken.
pub(super) struct CleanupGuard {
    pub(super) cleanups: Cleanups,
    pub(super) job: Option<Cleanup>,
}

impl CleanupGuard {
    pub(super) fn take(&mut self) -> Option<Cleanup> {
        self.job.take()
    }

    /// Runs the cleanup now and waits for it.
    pub(super) async fn finish(&mut self) {
        if let Some(job) = self.job.take() {
            let _ = tokio::task::spawn_blocking(move || job.run()).await;
        }
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.cleanups.spawn("oci", move || job.run());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_log_errors_are_parsed() {
        let log = "{\"level\":\"warning\",\"msg\":\"meh\"}\n\
                   {\"msg\":\"executable file `/x` not found\",\"level\":\"error\",\"time\":\"t\"}\n\
                   not json\n\
                   {\"level\":\"error\",\"msg\":\"runc run failed: exec: \\\"/x\\\": no such file\"}\n";
        let errors = parse_runtime_errors(log);
        assert_eq!(errors.len(), 2);
        assert!(matches!(
            setup_error("/x", &errors),
            SandboxError::SpawnFailed { .. }
        ));
        assert!(matches!(
            setup_error("/y", &["mount failed".to_string()]),
            SandboxError::Setup(_)
        ));
        assert!(parse_runtime_errors("").is_empty());
    }
}
