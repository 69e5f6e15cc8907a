//! What a task's container is: its definition (image, argv, environment, user, limits,
//! mounts, network, capabilities, seccomp), its name, the work directory handed to the
//! sandbox user, and how its end is read (OOM kill, the fork-failure heuristic, tini's
//! exec failures).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::{
    ContainerCreateBody, ContainerState, HostConfig, HostConfigLogConfig, Mount, MountType,
    ResourcesUlimits,
};
use paddock_proto::NetworkMode;

use super::super::policy::{RLIMIT_NOFILE, SANDBOX_GID, SANDBOX_HOSTNAME, SANDBOX_UID, WORK_DIR};
use super::super::{RunRequest, SandboxError, safe_name};
use super::DockerSandbox;

/// Docker's smallest memory limit (6 MiB).
pub(super) const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;

/// Docker's smallest CPU quota (0.01 CPU), in thousandths of a CPU.
const MIN_CPU_MILLIS: u64 = 10;

/// One MiB.
pub(super) const MIB: u64 = 1024 * 1024;

/// Options of `/tmp` inside the container.
const TMP_TMPFS_OPTIONS: &str = "rw,nosuid,nodev,size=64m,mode=1777";

impl DockerSandbox {
    /// The container definition for `req`.
    pub(super) fn container_body(&self, req: &RunRequest, workdir: &Path) -> ContainerCreateBody {
        let memory = memory_limit(req.limits.memory_bytes, self.cfg.memory_mb);
        let host_config = HostConfig {
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(nano_cpus(
                req.limits.cpu_millis,
                self.cfg.cpus,
                self.host_cpus,
            )),
            pids_limit: Some(pids_limit(req.limits.pids, self.cfg.pids)),
            ulimits: Some(vec![ResourcesUlimits {
                name: Some("nofile".into()),
                soft: Some(i64::try_from(RLIMIT_NOFILE).unwrap_or(i64::MAX)),
                hard: Some(i64::try_from(RLIMIT_NOFILE).unwrap_or(i64::MAX)),
            }]),
            init: Some(true),
            readonly_rootfs: Some(true),
            mounts: Some(vec![Mount {
                target: Some(WORK_DIR.into()),
                source: Some(workdir.display().to_string()),
                typ: Some(MountType::BIND),
                read_only: Some(false),
                ..Default::default()
            }]),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                TMP_TMPFS_OPTIONS.to_string(),
            )])),
            network_mode: Some(match req.network {
                NetworkMode::None => "none".into(),
                NetworkMode::Default => self.cfg.network_default.clone(),
            }),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec![
                "no-new-privileges".into(),
                format!("seccomp={}", self.seccomp),
            ]),
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            auto_remove: Some(false),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(self.cfg.image.clone()),
            entrypoint: Some(Vec::new()),
            cmd: Some(req.argv.clone()),
            env: Some(req.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: Some(WORK_DIR.into()),
            user: Some(format!("{SANDBOX_UID}:{SANDBOX_GID}")),
            hostname: Some(SANDBOX_HOSTNAME.into()),
            attach_stdin: Some(req.stdin.is_some()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(req.stdin.is_some()),
            stdin_once: Some(req.stdin.is_some()),
            tty: Some(false),
            labels: Some(HashMap::from([
                ("paddock.task-id".to_string(), req.task_id.clone()),
                ("paddock.attempt".to_string(), req.attempt.to_string()),
            ])),
            host_config: Some(host_config),
            ..Default::default()
        }
    }
}

/// The container name of an attempt: `paddock-<task>-<attempt>`, with every character
/// Docker does not allow in a name (`[a-zA-Z0-9_.-]`) replaced by `_`.
pub fn container_name(task_id: &str, attempt: u32) -> String {
    format!("paddock-{}-{attempt}", safe_name(task_id, &['_', '.', '-']))
}

/// Memory limit in bytes: the smaller of the task's limit and the backend's cap (0: none),
/// at least Docker's minimum.
pub(super) fn memory_limit(task_bytes: u64, cfg_mb: u64) -> i64 {
    let mut bytes = task_bytes;
    if cfg_mb > 0 {
        bytes = bytes.min(cfg_mb.saturating_mul(MIB));
    }
    i64::try_from(bytes.max(MIN_MEMORY_BYTES)).unwrap_or(i64::MAX)
}

/// CPU quota in billionths of a CPU: the smallest of the task's limit, the backend's cap
/// (0: none) and the engine host's CPUs (Docker refuses more), at least Docker's minimum.
pub(super) fn nano_cpus(task_millis: u32, cfg_cpus: f64, host_cpus: Option<u64>) -> i64 {
    let mut millis = u64::from(task_millis);
    if cfg_cpus.is_finite() && cfg_cpus > 0.0 {
        // Saturating float-to-int conversion.
        millis = millis.min((cfg_cpus * 1000.0).round() as u64);
    }
    if let Some(cpus) = host_cpus {
        millis = millis.min(cpus.saturating_mul(1000));
    }
    i64::try_from(millis.max(MIN_CPU_MILLIS).saturating_mul(1_000_000)).unwrap_or(i64::MAX)
}

/// Process limit: the smaller of the task's limit and the backend's cap (0: none), at
/// least 1.
pub(super) fn pids_limit(task_pids: u32, cfg_pids: u32) -> i64 {
    let mut pids = task_pids;
    if cfg_pids > 0 {
        pids = pids.min(cfg_pids);
    }
    i64::from(pids.max(1))
}

/// The pids-limit heuristic: what shells and C libraries print when `fork` fails with
/// `EAGAIN` (Docker does not report pids-limit hits).
pub(super) fn looks_like_fork_failure(stderr: &str) -> bool {
    let text = stderr.to_ascii_lowercase();
    text.contains("can't fork")
        || text.contains("cannot fork")
        || (text.contains("fork") && text.contains("resource temporarily unavailable"))
}

pub(super) fn oom_killed(state: &ContainerState) -> bool {
    state.oom_killed == Some(true)
}

/// tini's message when it cannot execute the program (`[FATAL tini (7)] exec x failed:
/// No such file or directory`), without its prefix.
pub(super) fn init_exec_failure(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|line| {
        let rest = line.strip_prefix("[FATAL tini")?;
        let (_, message) = rest.split_once("] ")?;
        (message.starts_with("exec ") && message.contains(" failed"))
            .then(|| message.trim().to_string())
    })
}

/// Hands the work directory to the sandbox user (falling back to mode 0777 when the agent
/// may not chown) and returns its absolute path.
pub(super) fn prepare_workdir(dir: &Path) -> Result<PathBuf, SandboxError> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| SandboxError::Setup(format!("work directory {}: {e}", dir.display())))?;
    match std::os::unix::fs::chown(&dir, Some(SANDBOX_UID), Some(SANDBOX_GID)) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::PermissionsExt;
            tracing::debug!(
                dir = %dir.display(),
                "docker sandbox: cannot chown the work directory; making it mode 0777"
            );
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).map_err(
                |e| SandboxError::Setup(format!("work directory {}: {e}", dir.display())),
            )?;
            Ok(dir)
        }
        Err(e) => Err(SandboxError::Setup(format!(
            "cannot hand the work directory {} to uid {SANDBOX_UID}: {e}",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_are_valid() {
        assert_eq!(container_name("t-1", 2), "paddock-t-1-2");
        assert_eq!(container_name("a/b c:ü", 1), "paddock-a_b_c__-1");
        assert_eq!(
            container_name("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", 3),
            "paddock-0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b-3"
        );
    }

    #[test]
    fn limits_are_the_smaller_of_task_and_backend() {
        assert_eq!(memory_limit(512 * MIB, 256), 256 * MIB as i64);
        assert_eq!(memory_limit(64 * MIB, 256), 64 * MIB as i64);
        assert_eq!(memory_limit(64 * MIB, 0), 64 * MIB as i64);
        assert_eq!(memory_limit(1, 256), MIN_MEMORY_BYTES as i64);
        assert_eq!(nano_cpus(1000, 1.0, Some(2)), 1_000_000_000);
        assert_eq!(nano_cpus(500, 1.0, Some(2)), 500_000_000);
        assert_eq!(nano_cpus(4000, 8.0, Some(2)), 2_000_000_000);
        assert_eq!(nano_cpus(4000, 0.0, None), 4_000_000_000);
        assert_eq!(nano_cpus(1, 1.0, None), 10_000_000);
        assert_eq!(nano_cpus(1000, f64::NAN, None), 1_000_000_000);
        assert_eq!(pids_limit(256, 32), 32);
        assert_eq!(pids_limit(32, 256), 32);
        assert_eq!(pids_limit(32, 0), 32);
    }

    #[test]
    fn fork_failure_heuristic() {
        assert!(looks_like_fork_failure(
            "sh: can't fork: Resource temporarily unavailable\n"
        ));
        assert!(looks_like_fork_failure(
            "bash: fork: retry: Resource temporarily unavailable\n"
        ));
        assert!(looks_like_fork_failure("dash: 1: Cannot fork\n"));
        assert!(!looks_like_fork_failure(
            "Resource temporarily unavailable\n"
        ));
        assert!(!looks_like_fork_failure("error: forked repository\n"));
    }

    #[test]
    fn tini_exec_failures_are_recognised() {
        assert_eq!(
            init_exec_failure("[FATAL tini (7)] exec nope failed: No such file or directory\n")
                .as_deref(),
            Some("exec nope failed: No such file or directory")
        );
        assert_eq!(init_exec_failure("exec nope failed\n"), None);
        assert_eq!(init_exec_failure("[WARN  tini (7)] something\n"), None);
    }
}
