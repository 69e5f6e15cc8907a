#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use super::*;
use crate::api::Secret;

/// A stand-in for the agent: records its environment, starts a child in a process group of
/// its own (as the agent runs tasks), and waits.
const FAKE_AGENT: &str = r#"env > "$HOME/env"; setsid sleep 300 & echo $! > "$HOME/child"; trap 'exit 0' TERM; while :; do sleep 0.05; done"#;

fn provider(dir: &Path, script: &str, grace: Duration) -> ProcessProvider {
    ProcessProvider::new(ProcessConfig {
        dir: dir.to_path_buf(),
        program: PathBuf::from("/bin/sh"),
        args: vec!["-c".into(), script.into()],
        env: BTreeMap::from([("PADDOCK_AGENT_EXEC_BACKEND".to_string(), "host".to_string())]),
        grace,
    })
}

fn launch(id: &str) -> Launch {
    Launch::new(
        id,
        "org1",
        "ci",
        Secret::new("vmt_topsecret"),
        "ws://127.0.0.1:1/ws/vm",
        BTreeMap::new(),
    )
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pid_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X'))
}

#[test]
fn stat_parsing_survives_odd_command_names() {
    let line = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
    let s = parse_stat(line).unwrap();
    assert_eq!(s.state, 'S');
    assert_eq!(s.ppid, 1);
    assert_eq!(s.pgid, 1234);
    assert_eq!(s.start_time, 98765);
    assert!(parse_stat("garbage").is_none());
}

#[tokio::test]
async fn create_list_destroy_real_processes() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path(), FAKE_AGENT, Duration::from_secs(5));
    assert_eq!(p.list().await.unwrap(), Some(vec![]));

    p.create(&launch("i1")).await.unwrap();
    p.create(&launch("i2")).await.unwrap();
    let rec = p.record("i1").unwrap();
    assert!(process_alive(rec.pid, rec.start_time));
    // Its own process group, so it outlives the supervisor and is signalled as a group.
    assert_eq!(proc_stat(rec.pid).unwrap().pgid, rec.pid);

    let listed = p.list().await.unwrap().unwrap();
    let ids: Vec<&str> = listed.iter().map(|i| i.instance_id.as_str()).collect();
    assert_eq!(ids, vec!["i1", "i2"]);
    assert!(listed.iter().all(|i| i.running));

    // Environment: the instance's variables, the agent settings, a private HOME; not the
    // supervisor's other variables.
    let home = dir.path().join("i1.home");
    wait_for("the env file", || home.join("child").exists()).await;
    let env = std::fs::read_to_string(home.join("env")).unwrap();
    for needle in [
        "VM_INSTANCE_ID=i1",
        "VM_ORG_ID=org1",
        "VM_MODE=pool",
        "VM_POOL=ci",
        "VM_TOKEN=vmt_topsecret",
        "CONTROL_PLANE_WS=ws://127.0.0.1:1/ws/vm",
        "PADDOCK_AGENT_EXEC_BACKEND=host",
    ] {
        assert!(env.contains(needle), "{needle} missing in {env}");
    }
    assert!(env.contains(&format!("HOME={}", home.display())));
    assert!(!env.contains("CARGO_"), "supervisor env leaked: {env}");
    // The token is not on the command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", rec.pid)).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("vmt_topsecret"));
    // ... nor in the record.
    let record_text = std::fs::read_to_string(p.record_path("i1")).unwrap();
    assert!(!record_text.contains("vmt_topsecret"));

    // Destroy takes the agent and its task (in another process group) down.
    let child: i32 = std::fs::read_to_string(home.join("child"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(child));
    p.destroy("i1").await.unwrap();
    assert!(!process_alive(rec.pid, rec.start_time));
    wait_for("the task process to die", || !pid_alive(child)).await;
    assert!(!p.record_path("i1").exists());
    assert!(!home.exists(), "the instance home is removed");
    assert!(p.log_path("i1").exists(), "the log is kept");
    // Idempotent.
    p.destroy("i1").await.unwrap();
    p.destroy("never-existed").await.unwrap();

    let ids: Vec<String> = p
        .list()
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(ids, vec!["i2"]);
    p.destroy("i2").await.unwrap();
}

#[tokio::test]
async fn a_process_ignoring_sigterm_is_killed_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(
        dir.path(),
        "trap '' TERM; while :; do sleep 0.05; done",
        Duration::from_millis(300),
    );
    p.create(&launch("stubborn")).await.unwrap();
    let rec = p.record("stubborn").unwrap();
    p.destroy("stubborn").await.unwrap();
    assert!(!process_alive(rec.pid, rec.start_time));
    assert!(!p.record_path("stubborn").exists());
}

#[tokio::test]
async fn a_dead_process_is_listed_as_not_running_and_destroyed_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path(), "exit 3", Duration::from_secs(1));
    p.create(&launch("short")).await.unwrap();
    let rec = p.record("short").unwrap();
    wait_for("the process to exit", || {
        !process_alive(rec.pid, rec.start_time)
    })
    .await;
    let listed = p.list().await.unwrap().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].running);
    p.destroy("short").await.unwrap();
    assert_eq!(p.list().await.unwrap(), Some(vec![]));
}

#[tokio::test]
async fn a_recycled_pid_is_never_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path(), FAKE_AGENT, Duration::from_secs(1));
    // A live process that is not ours: the record's start time does not match it.
    let mut bystander = tokio::process::Command::new("sleep")
        .arg("300")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = bystander.id().unwrap() as i32;
    let real = proc_stat(pid).unwrap().start_time;
    let forged = ProcessRecord {
        version: 1,
        instance_id: "reused".into(),
        pid,
        start_time: real + 1,
        created_at: 0,
        log: dir.path().join("reused.log"),
    };
    std::fs::write(
        p.record_path("reused"),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    let listed = p.list().await.unwrap().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].running, "a recycled pid is not the instance");
    p.destroy("reused").await.unwrap();
    assert!(pid_alive(pid), "the bystander was signalled");
    assert!(!p.record_path("reused").exists());
    bystander.kill().await.unwrap();
}

#[tokio::test]
async fn creating_twice_keeps_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path(), FAKE_AGENT, Duration::from_secs(1));
    p.create(&launch("once")).await.unwrap();
    let first = p.record("once").unwrap();
    p.create(&launch("once")).await.unwrap();
    assert_eq!(p.record("once").unwrap(), first);
    p.destroy("once").await.unwrap();
}

#[tokio::test]
async fn unsafe_ids_and_foreign_files_are_refused_or_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path(), FAKE_AGENT, Duration::from_secs(1));
    assert!(p.create(&launch("../escape")).await.is_err());
    assert!(p.destroy("../escape").await.is_err());
    std::fs::write(dir.path().join(".orphans.json"), "{}").unwrap();
    std::fs::write(dir.path().join("notes.json"), "not a record").unwrap();
    assert_eq!(p.list().await.unwrap(), Some(vec![]));
}

#[tokio::test]
async fn a_process_without_its_record_is_adopted_and_destroyable() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path(), FAKE_AGENT, Duration::from_secs(5));
    p.create(&launch("stray")).await.unwrap();
    let rec = p.record("stray").unwrap();
    // As if the supervisor died between spawning it and writing the record.
    std::fs::remove_file(p.record_path("stray")).unwrap();
    let listed = p.list().await.unwrap().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].running);
    assert_eq!(p.record("stray").unwrap().pid, rec.pid);
    std::fs::remove_file(p.record_path("stray")).unwrap();
    p.destroy("stray").await.unwrap();
    assert!(!process_alive(rec.pid, rec.start_time));
    assert_eq!(p.list().await.unwrap(), Some(vec![]));
}
