//! The `docker` provider: each instance is a container running the agent, through the
//! Docker Engine API (`bollard`).
//!
//! - Name `paddock-pool-<pool>-<instance>`, labels `paddock.pool`, `paddock.instance`,
//!   `paddock.org`; `list` finds them by the `paddock.pool` label (any state: an exited
//!   container is reported as not running, and is still destroyed).
//! - The agent is the host's `paddock` executable, bind-mounted read-only at
//!   `/paddock/bin/paddock`, together with the host's `/usr`, `/lib`, `/lib64` and `/etc`
//!   (read-only): the executable finds its libraries whatever the image, so any local image
//!   works (`paddock/busybox:test`) and nothing is pulled from a registry.
//! - Host network, so the agent reaches a gateway on loopback; Docker's init as PID 1
//!   (signals, zombies); the agent runs tasks with the `host` backend inside the container
//!   (the container is the isolation); `HOME=/home/paddock` inside.
//! - The environment is the instance's (`VM_*`, `CONTROL_PLANE_WS`), the agent settings and
//!   `PADDOCK_AGENT_*` variables of the supervisor; the instance token is never on a
//!   command line. Docker keeps the environment in the container's configuration, readable
//!   by whoever may use the Docker socket (who can also exec into the container).
//! - `destroy` removes the container (force); "no such container" is success.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};

use super::{
    Launch, Provider, ProviderError, ProviderFuture, ProviderInstance, ProviderResult, safe_id,
};

/// Where the agent executable is mounted in the container.
pub const AGENT_PATH: &str = "/paddock/bin/paddock";

/// Host directories mounted read-only so the host executable runs in any image.
const HOST_DIRS: &[&str] = &["/usr", "/lib", "/lib64", "/etc"];

/// Settings of the docker provider.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Pool name.
    pub pool: String,
    /// Local image.
    pub image: String,
    /// The host's `paddock` executable.
    pub agent_exe: PathBuf,
    /// Extra environment of the agent.
    pub env: BTreeMap<String, String>,
}

/// Containers on the local engine.
#[derive(Debug, Clone)]
pub struct DockerProvider {
    cfg: DockerConfig,
    docker: Docker,
}

fn engine_error(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

impl DockerProvider {
    /// Connects to the engine (`DOCKER_HOST` or the local socket) and checks the image.
    ///
    /// # Errors
    /// The engine is unreachable or the image is missing.
    pub async fn connect(cfg: DockerConfig) -> ProviderResult<DockerProvider> {
        let docker = Docker::connect_with_defaults()
            .map_err(|e| ProviderError::new(format!("dockerd is not reachable: {e}")))?;
        let docker = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
            .await
            .map_err(|_| ProviderError::new("dockerd is not reachable: no answer within 5s"))?
            .map_err(|e| ProviderError::new(format!("dockerd is not reachable: {e}")))?;
        tokio::time::timeout(Duration::from_secs(5), docker.ping())
            .await
            .map_err(|_| ProviderError::new("dockerd is not reachable: no answer within 5s"))?
            .map_err(|e| ProviderError::new(format!("dockerd is not reachable: {e}")))?;
        if let Err(e) = docker.inspect_image(&cfg.image).await {
            return Err(ProviderError::new(format!(
                "image {} is not in the local engine ({}); it is never pulled: `docker pull` or `docker import` it first",
                cfg.image,
                engine_error(&e)
            )));
        }
        if !cfg.agent_exe.is_file() {
            return Err(ProviderError::new(format!(
                "agent executable {} not found",
                cfg.agent_exe.display()
            )));
        }
        Ok(DockerProvider { cfg, docker })
    }

    /// The container name of an instance.
    pub fn container_name(&self, instance_id: &str) -> String {
        container_name(&self.cfg.pool, instance_id)
    }

    /// The engine client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    fn body(&self, launch: &Launch) -> ContainerCreateBody {
        let mut mounts = vec![Mount {
            target: Some(AGENT_PATH.into()),
            source: Some(self.cfg.agent_exe.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        }];
        for dir in HOST_DIRS {
            // Docker resolves a symbolic link given as source (merged /usr: /lib -> usr/lib).
            if std::path::Path::new(dir).exists() {
                mounts.push(Mount {
                    target: Some((*dir).into()),
                    source: Some((*dir).into()),
                    typ: Some(MountType::BIND),
                    read_only: Some(true),
                    ..Default::default()
                });
            }
        }
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        env.insert("HOME".into(), "/home/paddock".into());
        for (k, v) in std::env::vars() {
            if k.starts_with("PADDOCK_AGENT_") {
                env.insert(k, v);
            }
        }
        env.extend(self.cfg.env.clone());
        // The container is the isolation: tasks run on the host backend inside it.
        env.insert("PADDOCK_AGENT_EXEC_BACKEND".into(), "host".into());
        env.insert("PADDOCK_AGENT_BACKENDS".into(), "host".into());
        env.extend(launch.env.clone());
        let host_config = HostConfig {
            mounts: Some(mounts),
            network_mode: Some("host".into()),
            init: Some(true),
            auto_remove: Some(false),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(self.cfg.image.clone()),
            entrypoint: Some(Vec::new()),
            cmd: Some(vec![AGENT_PATH.into(), "agent".into(), "connect".into()]),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(HashMap::from([
                ("paddock.pool".to_string(), self.cfg.pool.clone()),
                ("paddock.instance".to_string(), launch.instance_id.clone()),
                ("paddock.org".to_string(), launch.org_id.clone()),
            ])),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    async fn create_impl(&self, launch: &Launch) -> ProviderResult<()> {
        if !safe_id(&launch.instance_id) {
            return Err(ProviderError::new(format!(
                "unusable instance id {:?}",
                launch.instance_id
            )));
        }
        let name = self.container_name(&launch.instance_id);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = self
            .docker
            .create_container(Some(options), self.body(launch))
            .await;
        match created {
            Ok(_) => {}
            // Created by an earlier attempt: start it (idempotent create).
            Err(e) if status_of(&e) == Some(409) => {}
            Err(e) => {
                return Err(ProviderError::new(format!(
                    "creating container {name}: {}",
                    launch.redact(&engine_error(&e))
                )));
            }
        }
        if let Err(e) = self.docker.start_container(&name, None).await
            && status_of(&e) != Some(304)
        {
            return Err(ProviderError::new(format!(
                "starting container {name}: {}",
                launch.redact(&engine_error(&e))
            )));
        }
        Ok(())
    }

    async fn destroy_impl(&self, instance_id: &str) -> ProviderResult<()> {
        let name = self.container_name(instance_id);
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            // Removal already in progress: the container is going.
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(ProviderError::new(format!(
                "removing container {name}: {}",
                engine_error(&e)
            ))),
        }
    }

    async fn list_impl(&self) -> ProviderResult<Vec<ProviderInstance>> {
        let label = format!("paddock.pool={}", self.cfg.pool);
        let filters = HashMap::from([("label", vec![label.as_str()])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| ProviderError::new(format!("listing containers: {}", engine_error(&e))))?;
        let mut out = Vec::new();
        for c in list {
            let labels = c.labels.unwrap_or_default();
            if labels.get("paddock.pool") != Some(&self.cfg.pool) {
                continue;
            }
            let Some(id) = labels.get("paddock.instance") else {
                continue;
            };
            let running = c.state.as_ref().is_some_and(|s| s.to_string() == "running");
            out.push(ProviderInstance {
                instance_id: id.clone(),
                running,
                detail: format!(
                    "container {}",
                    c.id.as_deref().map_or("?", |i| &i[..12.min(i.len())])
                ),
            });
        }
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(out)
    }
}

/// `paddock-pool-<pool>-<instance>`, with characters Docker refuses in names replaced.
pub fn container_name(pool: &str, instance_id: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("paddock-pool-{}-{}", clean(pool), clean(instance_id))
}

impl Provider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn create<'a>(&'a self, launch: &'a Launch) -> ProviderFuture<'a, ()> {
        Box::pin(self.create_impl(launch))
    }

    fn destroy<'a>(&'a self, instance_id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(self.destroy_impl(instance_id))
    }

    fn list(&self) -> ProviderFuture<'_, Option<Vec<ProviderInstance>>> {
        Box::pin(async move { self.list_impl().await.map(Some) })
    }
}

#[cfg(test)]
#[path = "docker_tests.rs"]
mod tests;
