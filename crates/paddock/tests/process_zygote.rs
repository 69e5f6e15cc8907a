//! The `process` backend's zygote (`paddock __sandbox-zygote`): each run gets namespaces
//! nobody else had, a killed zygote fails the runs it held (and only those) and is replaced,
//! and dropping the backend leaves no process behind. Needs root; skipped with a reason
//! elsewhere, a failure under `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paddock_agent::sandbox::process::ProcessSandbox;
use paddock_agent::sandbox::{Limits, RunOutcome, RunRequest, Sandbox, SandboxError};
use paddock_proto::{NetworkMode, ResultStatus};

fn backend(dir: &std::path::Path) -> Option<Arc<ProcessSandbox>> {
    match ProcessSandbox::detect(env!("CARGO_BIN_EXE_paddock").into(), dir.join("scratch")) {
        Ok(b) => Some(Arc::new(b)),
        Err(e) => {
            assert!(
                std::env::var("CI").is_err(),
                "process backend unavailable under CI: {e}"
            );
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn request(dir: &std::path::Path, script: &str, network: NetworkMode) -> RunRequest {
    let workdir = dir.join(format!("w{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&workdir).unwrap();
    RunRequest {
        task_id: format!("zyg{}", uuid::Uuid::new_v4().simple()),
        attempt: 1,
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
        stdin: None,
        workdir,
        timeout: Duration::from_secs(20),
        kill_grace: Duration::from_millis(300),
        network,
        output_max_chars: 65_536,
        limits: Limits::default(),
        rootfs: None,
    }
}

async fn run(b: &Arc<ProcessSandbox>, req: RunRequest) -> Result<RunOutcome, SandboxError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let out = b
        .run(req, tx, tokio_util::sync::CancellationToken::new())
        .await;
    drain.await.unwrap();
    out
}

/// The zygotes that are children of this test process.
fn my_zygotes() -> Vec<i32> {
    let me = std::process::id().to_string();
    common::live_processes_with("__sandbox-zygote")
        .into_iter()
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 4 (after the parenthesised name) is the parent pid.
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .is_some_and(|ppid| ppid == me)
        })
        .collect()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_gets_namespaces_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let Some(b) = backend(dir.path()) else { return };
    let host: Vec<String> = ["net", "ipc", "uts"]
        .iter()
        .map(|k| {
            std::fs::read_link(format!("/proc/self/ns/{k}"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    let mut seen = HashSet::new();
    // Namespace inode numbers are reused once a namespace is gone, so uniqueness is checked
    // among runs alive at the same time: each prints its namespaces and then sleeps. First
    // runs started 40 ms apart (spares made while the zygote is idle), then a burst (no
    // spare ready for most of them).
    let script =
        "readlink /proc/self/ns/net /proc/self/ns/ipc /proc/self/ns/uts; hostname; sleep 3";
    let mut handles = Vec::new();
    for i in 0..8 {
        let b = b.clone();
        let req = request(dir.path(), script, NetworkMode::None);
        handles.push(tokio::spawn(async move { run(&b, req).await.unwrap() }));
        if i < 4 {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    let mut outputs = Vec::new();
    for h in handles {
        outputs.push(h.await.unwrap());
    }
    for out in &outputs {
        assert_eq!(out.status, ResultStatus::Succeeded, "{out:?}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 4, "{:?}", out.stdout);
        for (i, ns) in lines[..3].iter().enumerate() {
            assert_ne!(*ns, host[i], "a run shares the host's namespace {ns}");
            assert!(seen.insert(ns.to_string()), "namespace {ns} used twice");
        }
        assert_eq!(lines[3], "paddock");
    }
    // With the default network, a run shares the host's network namespace (but still has
    // IPC and UTS of its own).
    let out = run(
        &b,
        request(
            dir.path(),
            "readlink /proc/self/ns/net /proc/self/ns/ipc",
            NetworkMode::Default,
        ),
    )
    .await
    .unwrap();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], host[0], "{out:?}");
    assert_ne!(lines[1], host[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_zygote_fails_its_runs_and_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let Some(b) = backend(dir.path()) else { return };
    let ok = run(&b, request(dir.path(), "echo first", NetworkMode::None))
        .await
        .unwrap();
    assert_eq!(ok.stdout, "first\n");
    let zygotes = my_zygotes();
    assert_eq!(zygotes.len(), 1, "one zygote per backend: {zygotes:?}");
    let marker = format!("sleep {}", 6000 + uuid::Uuid::new_v4().as_u128() % 3000);
    let long = {
        let b = b.clone();
        let req = request(dir.path(), &marker, NetworkMode::None);
        tokio::spawn(async move { run(&b, req).await })
    };
    wait_until("the long run started", || {
        !common::live_processes_with(&marker).is_empty()
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(zygotes[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("the run ends when its zygote dies")
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    match ended {
        Ok(out) => assert_ne!(out.status, ResultStatus::Succeeded, "{out:?}"),
        Err(e) => assert!(e.to_string().contains("zygote"), "{e}"),
    }
    b.settle().await;
    wait_until("the run's processes are gone", || {
        common::live_processes_with(&marker).is_empty()
    })
    .await;
    // The next run starts a new zygote and succeeds.
    let again = run(&b, request(dir.path(), "echo again", NetworkMode::None))
        .await
        .unwrap();
    assert_eq!(again.status, ResultStatus::Succeeded, "{again:?}");
    assert_eq!(again.stdout, "again\n");
    let now = my_zygotes();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], zygotes[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_backend_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let Some(b) = backend(dir.path()) else { return };
    let marker = format!("sleep {}", 9000 + uuid::Uuid::new_v4().as_u128() % 3000);
    let long = {
        let b = b.clone();
        let req = request(dir.path(), &marker, NetworkMode::None);
        tokio::spawn(async move { run(&b, req).await })
    };
    wait_until("the run started", || {
        !common::live_processes_with(&marker).is_empty()
    })
    .await;
    assert_eq!(my_zygotes().len(), 1);
    long.abort();
    let _ = long.await;
    drop(b);
    wait_until("zygote and run gone", || {
        common::live_processes_with(&marker).is_empty() && my_zygotes().is_empty()
    })
    .await;
}
