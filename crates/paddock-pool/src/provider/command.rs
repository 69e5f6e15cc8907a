//! The `command` provider: operator commands make and destroy instances (a cloud CLI, a VM
//! script, the seed's `scripts/vm/bootstrap-local.sh`).
//!
//! Each command runs as `sh -c <command>` with the supervisor's environment minus
//! `PADDOCK_TOKEN` (the supervisor's API token is not the instance's business), plus:
//! - create: `VM_INSTANCE_ID`, `VM_ORG_ID`, `VM_USER_ID` (empty), `VM_MODE=pool`, `VM_POOL`,
//!   `VM_TOKEN` (the instance token: secret), `CONTROL_PLANE_WS`. It must start the
//!   runtime (`paddock agent connect`, which reads `VM_TOKEN` and `CONTROL_PLANE_WS`) and
//!   may return before it connects: the instance is ready when its agent connects.
//! - destroy: the same without `VM_TOKEN`. It must be idempotent (succeed when the instance
//!   is already gone).
//! - list (optional): `VM_ORG_ID`, `VM_POOL`, `VM_MODE`; prints the ids of the instances it
//!   has, one per line. Without it, orphan detection is off.
//!
//! A non-zero exit (or a timeout, after which the command's process group is killed) is
//! an error carrying the exit status and the tail of stderr, with the token redacted.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::{
    Launch, Provider, ProviderError, ProviderFuture, ProviderInstance, ProviderResult, safe_id,
    tail,
};
use crate::api::Secret;

/// Characters of stderr kept in an error.
const STDERR_TAIL: usize = 1000;

/// Settings of the command provider.
#[derive(Debug, Clone)]
pub struct CommandConfig {
    /// Pool name (`VM_POOL`).
    pub pool: String,
    /// Org id (`VM_ORG_ID`).
    pub org_id: String,
    /// Starts an instance's runtime.
    pub create_cmd: String,
    /// Removes an instance's runtime (idempotent).
    pub destroy_cmd: String,
    /// Prints the ids of the instances the provider has.
    pub list_cmd: Option<String>,
    /// Longest run of one command.
    pub timeout: Duration,
}

/// Operator commands.
#[derive(Debug, Clone)]
pub struct CommandProvider {
    cfg: CommandConfig,
}

impl CommandProvider {
    /// A provider running `cfg`'s commands.
    pub fn new(cfg: CommandConfig) -> CommandProvider {
        CommandProvider { cfg }
    }

    fn base_env(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("VM_ORG_ID".to_string(), self.cfg.org_id.clone()),
            ("VM_POOL".to_string(), self.cfg.pool.clone()),
            ("VM_MODE".to_string(), "pool".to_string()),
            ("VM_USER_ID".to_string(), String::new()),
        ])
    }

    /// Runs `script` with `env`; returns stdout. `secret` is redacted from errors.
    async fn run(
        &self,
        what: &str,
        script: &str,
        env: &BTreeMap<String, String>,
        secret: Option<&Secret>,
    ) -> ProviderResult<String> {
        let redact = |s: &str| secret.map_or_else(|| s.to_string(), |t| t.redact(s));
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .env_remove("PADDOCK_TOKEN")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| ProviderError::new(format!("{what} command: cannot start sh: {e}")))?;
        let pid = child.id().map(|p| p as i32);
        let out = match tokio::time::timeout(self.cfg.timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(ProviderError::new(format!("{what} command: {e}"))),
            Err(_) => {
                if let Some(pid) = pid {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                return Err(ProviderError::new(format!(
                    "{what} command timed out after {:?}",
                    self.cfg.timeout
                )));
            }
        };
        if !out.status.success() {
            let stderr = redact(&String::from_utf8_lossy(&out.stderr));
            let status = match out.status.code() {
                Some(c) => format!("exit code {c}"),
                None => "killed by a signal".to_string(),
            };
            let stderr = tail(&stderr, STDERR_TAIL);
            return Err(ProviderError::new(if stderr.is_empty() {
                format!("{what} command failed ({status})")
            } else {
                format!("{what} command failed ({status}): {stderr}")
            }));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Provider for CommandProvider {
    fn name(&self) -> &'static str {
        "command"
    }

    fn create<'a>(&'a self, launch: &'a Launch) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let mut env = self.base_env();
            env.extend(launch.env.clone());
            self.run("create", &self.cfg.create_cmd, &env, Some(&launch.token))
                .await
                .map(|_| ())
        })
    }

    fn destroy<'a>(&'a self, instance_id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let mut env = self.base_env();
            env.insert("VM_INSTANCE_ID".into(), instance_id.into());
            self.run("destroy", &self.cfg.destroy_cmd, &env, None)
                .await
                .map(|_| ())
        })
    }

    fn list(&self) -> ProviderFuture<'_, Option<Vec<ProviderInstance>>> {
        Box::pin(async move {
            let Some(list_cmd) = &self.cfg.list_cmd else {
                return Ok(None);
            };
            let out = self.run("list", list_cmd, &self.base_env(), None).await?;
            let mut ids: Vec<String> = out
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if let Some(bad) = ids.iter().find(|id| !safe_id(id)) {
                return Err(ProviderError::new(format!(
                    "list command printed {bad:?}, which is not an instance id"
                )));
            }
            ids.sort();
            ids.dedup();
            Ok(Some(
                ids.into_iter()
                    .map(|instance_id| ProviderInstance {
                        instance_id,
                        running: true,
                        detail: "listed".into(),
                    })
                    .collect(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(dir: &std::path::Path, list: bool) -> CommandProvider {
        let d = dir.display();
        CommandProvider::new(CommandConfig {
            pool: "ci".into(),
            org_id: "org1".into(),
            create_cmd: format!(
                "[ -n \"$VM_TOKEN\" ] || exit 9; \
                 printf '%s %s %s %s %s\\n' \"$VM_INSTANCE_ID\" \"$VM_ORG_ID\" \"$VM_MODE\" \"$VM_POOL\" \"$CONTROL_PLANE_WS\" > {d}/\"$VM_INSTANCE_ID\"; \
                 [ -z \"$PADDOCK_TOKEN\" ] || exit 8"
            ),
            destroy_cmd: format!("rm -f {d}/\"$VM_INSTANCE_ID\"; [ -z \"$VM_TOKEN\" ]"),
            list_cmd: list.then(|| format!("ls {d}")),
            timeout: Duration::from_secs(10),
        })
    }

    fn launch(id: &str, token: &str) -> Launch {
        Launch::new(
            id,
            "org1",
            "ci",
            Secret::new(token),
            "ws://127.0.0.1:9/ws/vm",
            BTreeMap::new(),
        )
    }

    #[tokio::test]
    async fn create_list_destroy_with_the_instance_environment() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path(), true);
        assert_eq!(p.list().await.unwrap(), Some(vec![]));
        p.create(&launch("i1", "tok-aaaa")).await.unwrap();
        p.create(&launch("i2", "tok-bbbb")).await.unwrap();
        let written = std::fs::read_to_string(dir.path().join("i1")).unwrap();
        assert_eq!(written.trim(), "i1 org1 pool ci ws://127.0.0.1:9/ws/vm");
        let ids: Vec<String> = p
            .list()
            .await
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|i| i.instance_id)
            .collect();
        assert_eq!(ids, vec!["i1", "i2"]);
        p.destroy("i1").await.unwrap();
        p.destroy("i1").await.unwrap(); // idempotent
        let ids: Vec<String> = p
            .list()
            .await
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|i| i.instance_id)
            .collect();
        assert_eq!(ids, vec!["i2"]);
    }

    #[tokio::test]
    async fn without_a_list_command_orphan_detection_is_off() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(provider(dir.path(), false).list().await.unwrap(), None);
    }

    #[tokio::test]
    async fn failure_carries_stderr_tail_without_the_token() {
        let p = CommandProvider::new(CommandConfig {
            pool: "ci".into(),
            org_id: "o".into(),
            create_cmd: "echo \"cannot boot with $VM_TOKEN\" >&2; exit 3".into(),
            destroy_cmd: "true".into(),
            list_cmd: Some("echo '../etc'".into()),
            timeout: Duration::from_secs(10),
        });
        let err = p.create(&launch("i1", "tok-secret-123")).await.unwrap_err();
        assert!(err.0.contains("exit code 3"), "{err}");
        assert!(err.0.contains("cannot boot with [redacted]"), "{err}");
        assert!(!err.0.contains("tok-secret-123"), "{err}");
        let err = p.list().await.unwrap_err();
        assert!(err.0.contains("not an instance id"), "{err}");
    }

    #[tokio::test]
    async fn a_hanging_command_times_out() {
        let p = CommandProvider::new(CommandConfig {
            pool: "ci".into(),
            org_id: "o".into(),
            create_cmd: "sleep 30".into(),
            destroy_cmd: "true".into(),
            list_cmd: None,
            timeout: Duration::from_millis(200),
        });
        let err = p.create(&launch("i1", "t")).await.unwrap_err();
        assert!(err.0.contains("timed out"), "{err}");
    }
}
