#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use super::*;
use crate::api::Secret;

const IMAGE: &str = "paddock/busybox:test";

/// A provider whose "agent" is a script that prints its environment and waits; `None`
/// (test skipped, with the reason printed) when no engine or image is present, except under
/// `CI=true`, where that fails the test.
async fn provider(pool: &str, dir: &std::path::Path) -> Option<DockerProvider> {
    let script = dir.join("fake-agent");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"args: $*\"\nenv | sort\nwhile :; do sleep 1; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = DockerConfig {
        pool: pool.into(),
        image: IMAGE.into(),
        agent_exe: script,
        env: BTreeMap::from([("PADDOCK_AGENT_LOG_LEVEL".to_string(), "debug".to_string())]),
    };
    match DockerProvider::connect(cfg).await {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "docker provider tests need dockerd and {IMAGE} under CI=true: {e}"
            );
            eprintln!("SKIPPED: docker provider tests: {e}");
            None
        }
    }
}

fn launch(id: &str, pool: &str) -> Launch {
    Launch::new(
        id,
        "org1",
        pool,
        Secret::new("vmt_dockersecret"),
        "ws://127.0.0.1:1/ws/vm",
        BTreeMap::new(),
    )
}

fn unique_pool() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

#[test]
fn container_names_are_sanitised() {
    assert_eq!(container_name("ci", "abc-1"), "paddock-pool-ci-abc-1");
    assert_eq!(container_name("c i/x", "a:b"), "paddock-pool-c_i_x-a_b");
}

#[tokio::test]
async fn containers_are_created_listed_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = unique_pool();
    let Some(p) = provider(&pool, dir.path()).await else {
        return;
    };
    assert_eq!(p.list().await.unwrap(), Some(vec![]));
    p.create(&launch("c1", &pool)).await.unwrap();
    p.create(&launch("c1", &pool)).await.unwrap(); // idempotent
    let listed = p.list().await.unwrap().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].instance_id, "c1");
    assert!(listed[0].running, "{listed:?}");

    let name = p.container_name("c1");
    let info = p.docker().inspect_container(&name, None).await.unwrap();
    let config = info.config.unwrap();
    let labels = config.labels.unwrap();
    assert_eq!(labels["paddock.pool"], pool);
    assert_eq!(labels["paddock.instance"], "c1");
    let env = config.env.unwrap();
    for needle in [
        "VM_INSTANCE_ID=c1",
        "VM_MODE=pool",
        "CONTROL_PLANE_WS=ws://127.0.0.1:1/ws/vm",
        "PADDOCK_AGENT_EXEC_BACKEND=host",
        "PADDOCK_AGENT_LOG_LEVEL=debug",
    ] {
        assert!(env.iter().any(|e| e == needle), "{needle} missing: {env:?}");
    }
    let cmd = config.cmd.unwrap();
    assert_eq!(cmd, vec![AGENT_PATH, "agent", "connect"]);
    assert!(!cmd.iter().any(|a| a.contains("vmt_dockersecret")));
    let host = info.host_config.unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("host"));
    let mounts = host.mounts.unwrap();
    assert!(
        mounts.iter().all(|m| m.read_only == Some(true)),
        "{mounts:?}"
    );

    // The host executable really runs inside the image, with the instance environment.
    let deadline = Instant::now() + Duration::from_secs(20);
    let logs = loop {
        let logs = container_logs(&p, &name).await;
        if logs.contains("VM_POOL=") || Instant::now() > deadline {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(logs.contains("args: agent connect"), "{logs}");
    assert!(logs.contains(&format!("VM_POOL={pool}")), "{logs}");

    p.destroy("c1").await.unwrap();
    p.destroy("c1").await.unwrap(); // idempotent
    assert_eq!(p.list().await.unwrap(), Some(vec![]));
}

#[tokio::test]
async fn an_exited_container_is_listed_as_not_running_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = unique_pool();
    let Some(p) = provider(&pool, dir.path()).await else {
        return;
    };
    p.create(&launch("c2", &pool)).await.unwrap();
    p.docker()
        .kill_container(
            &p.container_name("c2"),
            None::<bollard::query_parameters::KillContainerOptions>,
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = p.list().await.unwrap().unwrap();
        assert_eq!(listed.len(), 1);
        if !listed[0].running {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {listed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.destroy("c2").await.unwrap();
    assert_eq!(p.list().await.unwrap(), Some(vec![]));
}

async fn container_logs(p: &DockerProvider, name: &str) -> String {
    use futures_util::StreamExt;
    let options = bollard::query_parameters::LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .build();
    let mut stream = p.docker().logs(name, Some(options));
    let mut out = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        out.push_str(&chunk.to_string());
    }
    out
}
