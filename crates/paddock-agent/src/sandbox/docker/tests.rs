//! Tests of the `docker` backend against the local engine (on the image
//! `paddock/busybox:test`, imported from the host's busybox when missing), and of the
//! parts of [`super`] that need none.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use bollard::query_parameters::{CreateImageOptionsBuilder, ListContainersOptionsBuilder};
use futures_util::StreamExt;
use paddock_proto::{NetworkMode, Stream};

use super::container::MIB;
use super::*;
use crate::sandbox::policy::{SANDBOX_HOSTNAME, SANDBOX_UID};
use crate::sandbox::testing::{self, PATH, live, run_collect};

/// The image the tests run in: busybox from the host's `busybox-static`, imported.
const TEST_IMAGE: &str = "paddock/busybox:test";
/// What Docker sets when neither the task nor the image sets `PATH`.
const DOCKER_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Serializes building the test image between the tests of this process.
static IMAGE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips (prints why), except under `CI=true` where the docker tests must run.
fn skip(reason: &str) {
    assert!(
        !in_ci(),
        "docker tests cannot run under CI=true: {reason} (start dockerd first)"
    );
    eprintln!("skipping docker test: {reason}");
}

/// Imports `paddock/busybox:test` from `/usr/bin/busybox` when the engine lacks it.
async fn ensure_test_image(docker: &Docker) -> Result<(), String> {
    let _lock = IMAGE_LOCK.lock().await;
    if docker.inspect_image(TEST_IMAGE).await.is_ok() {
        return Ok(());
    }
    let Some(busybox) = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        return Err(format!(
            "image {TEST_IMAGE} is missing and /usr/bin/busybox (busybox-static) is not installed"
        ));
    };
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let bin = root.path().join("bin");
    std::fs::create_dir(&bin).map_err(|e| e.to_string())?;
    std::fs::copy(busybox, bin.join("busybox")).map_err(|e| e.to_string())?;
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| e.to_string())?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(|e| e.to_string())?;
        }
    }
    let tar = std::process::Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["-c", "."])
        .output()
        .map_err(|e| format!("tar: {e}"))?;
    if !tar.status.success() {
        return Err(format!(
            "tar failed: {}",
            String::from_utf8_lossy(&tar.stderr)
        ));
    }
    let (repo, tag) = TEST_IMAGE.split_once(':').unwrap();
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .build();
    let mut progress = std::pin::pin!(docker.create_image(
        Some(options),
        Some(bollard::body_full(tar.stdout.into())),
        None
    ));
    while let Some(item) = progress.next().await {
        item.map_err(|e| format!("importing {TEST_IMAGE}: {e}"))?;
    }
    docker
        .inspect_image(TEST_IMAGE)
        .await
        .map(|_| ())
        .map_err(|e| format!("{TEST_IMAGE} still missing after import: {e}"))
}

/// A backend on the test image, or `None` (test skipped) without a usable engine.
async fn sandbox_with(adjust: impl FnOnce(&mut DockerConfig)) -> Option<DockerSandbox> {
    let mut cfg = DockerConfig {
        image: TEST_IMAGE.into(),
        ..DockerConfig::default()
    };
    adjust(&mut cfg);
    let sandbox = match DockerSandbox::connect(cfg).await {
        Ok(s) => s,
        Err(e) => {
            skip(&e);
            return None;
        }
    };
    if let Err(e) = ensure_test_image(&sandbox.docker).await {
        skip(&e);
        return None;
    }
    Some(sandbox)
}

async fn sandbox() -> Option<DockerSandbox> {
    sandbox_with(|_| {}).await
}

macro_rules! sandbox_or_skip {
    ($e:expr) => {
        match $e.await {
            Some(s) => s,
            None => return,
        }
    };
}

/// Task ids unique to this process, so concurrent runs on one engine do not collide.
fn task_id(name: &str) -> String {
    format!("dkt{}-{name}", std::process::id())
}

fn request(name: &str, dir: &tempfile::TempDir, argv: &[&str]) -> RunRequest {
    RunRequest {
        network: NetworkMode::None,
        ..testing::request(task_id(name), dir.path(), argv)
    }
}

/// Runs `req`, checks that its container is gone, returns the outcome.
async fn run(sandbox: &DockerSandbox, req: RunRequest) -> RunOutcome {
    let task = req.task_id.clone();
    let out = run_collect(sandbox, req, CancellationToken::new())
        .await
        .0
        .unwrap();
    assert_no_containers(sandbox, &task).await;
    out
}

/// Names of the containers (any state) of `task`.
async fn containers_of(sandbox: &DockerSandbox, task: &str) -> Vec<String> {
    let prefix = format!("paddock-{task}");
    let filters = HashMap::from([("name", vec![prefix.as_str()])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let list = sandbox.docker.list_containers(Some(options)).await.unwrap();
    list.into_iter()
        .flat_map(|c| c.names.unwrap_or_default())
        .filter(|n| n.trim_start_matches('/').starts_with(&prefix))
        .collect()
}

async fn assert_no_containers(sandbox: &DockerSandbox, task: &str) {
    let left = containers_of(sandbox, task).await;
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort_unstable();
    lines
}

// ---- without an engine ----

#[test]
fn config_defaults_are_the_seed_profile() {
    let cfg = DockerConfig::default();
    assert_eq!(cfg.image, "node:24-alpine");
    assert_eq!(cfg.network_default, "none");
    assert_eq!(cfg.timeout_ms, 30_000);
    assert_eq!(cfg.memory_mb, 256);
    assert!((cfg.cpus - 1.0).abs() < f64::EPSILON);
    assert_eq!(cfg.pids, 256);
    assert_eq!(cfg.output_max_chars, 65_536);
}

#[tokio::test]
async fn captures_stdout_stderr_and_exit_code() {
    let sb = sandbox_or_skip!(sandbox());
    assert_eq!(sb.name(), "docker");
    let dir = tempfile::tempdir().unwrap();
    let req = request(
        "echo",
        &dir,
        &["/bin/sh", "-c", "echo out; echo err >&2; echo ünï; exit 3"],
    );
    let task = req.task_id.clone();
    let (result, chunks) = run_collect(&sb, req, CancellationToken::new()).await;
    let out = result.unwrap();
    assert_eq!(out.status, ResultStatus::Failed);
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.signal, None);
    assert_eq!(out.error_code, None);
    assert_eq!(out.stdout, "out\nünï\n");
    assert_eq!(out.stderr, "err\n");
    assert!(!out.stdout_truncated && !out.stderr_truncated);
    assert!(out.started_at_ms > 0 && out.finished_at_ms >= out.started_at_ms);
    assert_eq!(live(&chunks, Stream::Stdout), out.stdout);
    assert_eq!(live(&chunks, Stream::Stderr), out.stderr);
    assert_no_containers(&sb, &task).await;

    let out = run(&sb, request("echo-ok", &dir, &["echo", "hello"])).await;
    assert_eq!(out.status, ResultStatus::Succeeded);
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout, "hello\n");
}

#[tokio::test]
async fn death_by_signal_is_reported() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let out = run(&sb, request("sig", &dir, &["/bin/sh", "-c", "kill -9 $$"])).await;
    assert_eq!(out.status, ResultStatus::Failed);
    assert_eq!(out.exit_code, None);
    assert_eq!(out.signal, Some(9));
    assert_eq!(out.error_code, None);
}

/// The container sees exactly the given variables, plus what the engine adds:
/// `HOSTNAME` always, `HOME=/` when not given (runc, user without passwd entry), and
/// Docker's default `PATH` when not given (the test image sets no `Env`).
#[tokio::test]
async fn environment_is_the_given_one_plus_what_docker_adds() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let mut req = request("env", &dir, &["env"]);
    req.env.insert("FOO".into(), "bar baz=qux".into());
    req.env.insert("LANG".into(), "C.UTF-8".into());
    let out = run(&sb, req).await;
    assert_eq!(out.status, ResultStatus::Succeeded);
    assert_eq!(
        sorted_lines(&out.stdout),
        vec![
            "FOO=bar baz=qux".to_string(),
            "HOME=/".to_string(),
            format!("HOSTNAME={SANDBOX_HOSTNAME}"),
            "LANG=C.UTF-8".to_string(),
            format!("PATH={PATH}"),
        ]
    );

    // Without PATH: Docker's default; a given HOME is kept.
    let mut req = request("env2", &dir, &["/bin/env"]);
    req.env = BTreeMap::from([("HOME".to_string(), "/work".to_string())]);
    let out = run(&sb, req).await;
    assert_eq!(out.status, ResultStatus::Succeeded);
    assert_eq!(
        sorted_lines(&out.stdout),
        vec![
            "HOME=/work".to_string(),
            format!("HOSTNAME={SANDBOX_HOSTNAME}"),
            format!("PATH={DOCKER_DEFAULT_PATH}"),
        ]
    );
}

#[tokio::test]
async fn runs_as_nobody_in_work_with_the_sandbox_hostname() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &sb,
        request(
            "ident",
            &dir,
            &["/bin/sh", "-c", "id -u; id -g; pwd; hostname"],
        ),
    )
    .await;
    assert_eq!(out.status, ResultStatus::Succeeded, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        format!("65534\n65534\n/work\n{SANDBOX_HOSTNAME}\n")
    );
}

#[tokio::test]
async fn only_work_and_tmp_are_writable() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let script = "echo data > /work/f && echo work-ok; \
                  echo x > /tmp/t && cat /tmp/t && echo tmp-ok; \
                  if echo x > /etc/x; then echo etc-writable; else echo etc-ro; fi; \
                  if touch /x; then echo root-writable; else echo root-ro; fi";
    let out = run(&sb, request("fs", &dir, &["/bin/sh", "-c", script])).await;
    assert_eq!(out.status, ResultStatus::Succeeded, "{}", out.stderr);
    assert_eq!(out.stdout, "work-ok\nx\ntmp-ok\netc-ro\nroot-ro\n");
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    // The file is on the host, owned by the sandbox user.
    let path = dir.path().join("f");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), SANDBOX_UID);
}

#[tokio::test]
async fn stdin_is_delivered_then_closed() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let mut req = request("stdin", &dir, &["cat"]);
    req.stdin = Some("hello\nwörld".into());
    let out = run(&sb, req).await;
    assert_eq!(out.status, ResultStatus::Succeeded);
    assert_eq!(out.stdout, "hello\nwörld");

    // Without stdin, the process reads EOF at once.
    let out = run(&sb, request("stdin2", &dir, &["cat"])).await;
    assert_eq!(out.status, ResultStatus::Succeeded);
    assert_eq!(out.stdout, "");
}

#[tokio::test]
async fn network_none_has_only_loopback() {
    let sb = sandbox_or_skip!(sandbox_with(|c| c.network_default = "bridge".into()));
    assert!(
        sb.check(&SandboxSpec {
            network_mode: Some(NetworkMode::None),
            ..Default::default()
        })
        .is_ok()
    );
    let dir = tempfile::tempdir().unwrap();
    let devices = |stdout: &str| -> Vec<String> {
        let mut names: Vec<String> = stdout
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(|n| n.trim().to_string())
            .collect();
        names.sort_unstable();
        names
    };
    let out = run(&sb, request("net", &dir, &["cat", "/proc/net/dev"])).await;
    assert_eq!(out.status, ResultStatus::Succeeded);
    assert_eq!(devices(&out.stdout), vec!["lo".to_string()]);

    // networkMode default: the configured network (here bridge) is attached.
    let mut req = request("net2", &dir, &["cat", "/proc/net/dev"]);
    req.network = NetworkMode::Default;
    let out = run(&sb, req).await;
    assert_eq!(out.status, ResultStatus::Succeeded);
    assert_eq!(
        devices(&out.stdout),
        vec!["eth0".to_string(), "lo".to_string()]
    );
}

#[tokio::test]
async fn memory_limit_kill_is_reported() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(
        "oom",
        &dir,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"],
    );
    req.limits.memory_bytes = 64 * MIB;
    let out = run(&sb, req).await;
    assert_eq!(out.status, ResultStatus::Failed);
    assert_eq!(out.error_code, Some(ErrorCode::MemoryLimitExceeded));
    assert_eq!(out.signal, Some(9));
    assert_eq!(
        out.error_message.as_deref(),
        Some("killed: memory limit of 64 MiB exceeded")
    );
}

#[tokio::test]
async fn pids_limit_is_reported() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(
        "pids",
        &dir,
        &[
            "/bin/sh",
            "-c",
            "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; wait",
        ],
    );
    req.limits.pids = 32;
    let start = Instant::now();
    let out = run(&sb, req).await;
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(out.status, ResultStatus::Failed);
    assert_eq!(
        out.error_code,
        Some(ErrorCode::PidsLimitExceeded),
        "{out:?}"
    );
    assert!(out.stderr.contains("fork"), "{}", out.stderr);
}

#[tokio::test]
async fn timeout_stops_the_container() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let mut req = request("timeout", &dir, &["sleep", "100"]);
    req.timeout = Duration::from_secs(1);
    req.kill_grace = Duration::from_secs(5);
    let start = Instant::now();
    let out = run(&sb, req).await;
    let elapsed = start.elapsed();
    // SIGTERM ends `sleep` at once: the grace is not used.
    assert!(elapsed >= Duration::from_secs(1));
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert_eq!(out.status, ResultStatus::TimedOut);
    assert_eq!(out.error_code, Some(ErrorCode::TaskTimeout));
    assert_eq!(
        out.error_message.as_deref(),
        Some("killed after timeout of 1s")
    );
    assert_eq!(out.signal, Some(15));
}

#[tokio::test]
async fn process_ignoring_sigterm_is_killed_after_the_grace() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(
        "noterm",
        &dir,
        &[
            "/bin/sh",
            "-c",
            "trap '' TERM; echo ready; sleep 100; echo survived",
        ],
    );
    // 2 s: the shell must have installed its trap before the timeout, even when the
    // engine is slow to start the container on a loaded machine.
    req.timeout = Duration::from_secs(2);
    req.kill_grace = Duration::from_millis(1000);
    let start = Instant::now();
    let out = run(&sb, req).await;
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(3000),
        "grace not honoured: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert_eq!(out.status, ResultStatus::TimedOut);
    assert_eq!(out.signal, Some(9));
    assert_eq!(out.stdout, "ready\n");
    assert_eq!(
        out.error_message.as_deref(),
        Some("killed after timeout of 2s")
    );
}

/// bollard bounds each request by a client timeout (2 min by default) until the
/// response headers arrive; the engine sends the headers of `wait` at once, so a task
/// may run longer than that timeout.
#[tokio::test]
async fn task_may_outlive_the_client_request_timeout() {
    let mut sb = sandbox_or_skip!(sandbox());
    // Long enough for the set-up requests, even on a loaded machine.
    sb.docker = sb.docker.clone().with_timeout(Duration::from_secs(4));
    let dir = tempfile::tempdir().unwrap();
    let req = request("long", &dir, &["/bin/sh", "-c", "sleep 7; echo done"]);
    let out = run(&sb, req).await;
    assert_eq!(out.status, ResultStatus::Succeeded, "{out:?}");
    assert_eq!(out.stdout, "done\n");
}

#[tokio::test]
async fn cancel_stops_the_container() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        trigger.cancel();
    });
    let req = request("cancel", &dir, &["sleep", "100"]);
    let task = req.task_id.clone();
    let start = Instant::now();
    let (result, _) = run_collect(&sb, req, cancel).await;
    let out = result.unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(out.status, ResultStatus::Canceled);
    assert_eq!(out.error_code, Some(ErrorCode::TaskCanceled));
    assert_no_containers(&sb, &task).await;
}

#[tokio::test]
async fn output_flood_is_capped_and_completes() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let mut req = request("flood", &dir, &["/bin/sh", "-c", "yes | head -c 50000000"]);
    req.output_max_chars = 1_000_000;
    req.timeout = Duration::from_secs(120);
    let cap = sb.config().output_max_chars;
    let task = req.task_id.clone();
    let start = Instant::now();
    let (result, chunks) = run_collect(&sb, req, CancellationToken::new()).await;
    let out = result.unwrap();
    eprintln!("50 MB flood took {:?}", start.elapsed());
    assert_eq!(out.status, ResultStatus::Succeeded);
    // The backend's cap (65536) is below the request's.
    assert_eq!(out.stdout.len(), cap);
    assert_eq!(out.stdout, "y\n".repeat(cap / 2));
    assert!(out.stdout_truncated);
    assert!(!out.stderr_truncated);
    let live: usize = chunks.iter().map(|c| c.data.len()).sum();
    assert_eq!(live, cap);
    assert_no_containers(&sb, &task).await;
}

#[tokio::test]
async fn seccomp_refuses_namespaces() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    // A network namespace needs CAP_SYS_ADMIN too; a user namespace needs no
    // capability, only seccomp stops it (`docker run --security-opt
    // seccomp=unconfined ... unshare -U true` succeeds).
    for (name, flag) in [("seccomp-n", "-n"), ("seccomp-u", "-U")] {
        let out = run(&sb, request(name, &dir, &["unshare", flag, "true"])).await;
        assert_eq!(out.status, ResultStatus::Failed, "unshare {flag}");
        assert_eq!(out.exit_code, Some(1), "unshare {flag}");
        assert!(
            out.stderr.contains("Operation not permitted"),
            "unshare {flag}: {}",
            out.stderr
        );
    }

    // Threads and fork still work (clone without namespace flags, clone3 -> ENOSYS).
    let out = run(
        &sb,
        request(
            "seccomp2",
            &dir,
            &["/bin/sh", "-c", "(echo sub) & wait; echo done"],
        ),
    )
    .await;
    assert_eq!(out.status, ResultStatus::Succeeded, "{}", out.stderr);
    assert_eq!(out.stdout, "sub\ndone\n");
}

#[tokio::test]
async fn missing_program_is_a_spawn_failure() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let req = request(
        "noprog",
        &dir,
        &["/nonexistent/paddock-no-such-program", "x"],
    );
    let task = req.task_id.clone();
    let (result, _) = run_collect(&sb, req, CancellationToken::new()).await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), ErrorCode::SpawnFailed);
    match err {
        SandboxError::SpawnFailed { program, reason } => {
            assert_eq!(program, "/nonexistent/paddock-no-such-program");
            assert!(reason.contains("No such file or directory"), "{reason}");
        }
        other => panic!("expected SpawnFailed, got {other:?}"),
    }
    assert_no_containers(&sb, &task).await;
}

#[tokio::test]
async fn empty_argv_is_invalid() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let (result, _) = run_collect(&sb, request("empty", &dir, &[]), CancellationToken::new()).await;
    assert!(matches!(result, Err(SandboxError::Invalid(_))));
}

#[tokio::test]
async fn missing_image_is_a_setup_error() {
    let sb = sandbox_or_skip!(sandbox_with(
        |c| c.image = "paddock/no-such-image:none".into()
    ));
    assert!(!sb.image_present());
    let dir = tempfile::tempdir().unwrap();
    let req = request("noimage", &dir, &["true"]);
    let task = req.task_id.clone();
    let (result, _) = run_collect(&sb, req, CancellationToken::new()).await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), ErrorCode::SandboxSetupFailed);
    assert_eq!(
        err.to_string(),
        "sandbox set-up failed: image paddock/no-such-image:none not found locally; \
         docker pull/import it"
    );
    assert_no_containers(&sb, &task).await;
}

#[tokio::test]
async fn leftover_container_of_the_same_name_is_replaced() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let req = request("stale", &dir, &["echo", "fresh"]);
    let stale = ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        cmd: Some(vec!["true".into()]),
        ..Default::default()
    };
    sb.docker
        .create_container(
            Some(
                CreateContainerOptionsBuilder::default()
                    .name(&container_name(&req.task_id, req.attempt))
                    .build(),
            ),
            stale,
        )
        .await
        .unwrap();
    let out = run(&sb, req).await;
    assert_eq!(out.status, ResultStatus::Succeeded);
    assert_eq!(out.stdout, "fresh\n");
}

#[tokio::test]
async fn dropping_the_run_removes_the_container() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let req = request("drop", &dir, &["sleep", "100"]);
    let task = req.task_id.clone();
    let (tx, _rx) = mpsc::channel(64);
    let run = sb.run(req, tx, CancellationToken::new());
    assert!(
        tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .is_err(),
        "the run should still be going"
    );
    assert_eq!(
        containers_of(&sb, &task).await.len(),
        1,
        "container was running"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !containers_of(&sb, &task).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "container not removed after drop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cold start of `/bin/true` through the backend next to `docker run --rm`: median of
/// 20. Run by hand: `cargo test -p paddock-agent --lib docker::tests::cold_start --
/// --ignored --nocapture`.
#[tokio::test]
#[ignore = "timing report, run by hand"]
async fn cold_start_timing() {
    let sb = sandbox_or_skip!(sandbox());
    let dir = tempfile::tempdir().unwrap();
    let median = |mut v: Vec<Duration>| {
        v.sort_unstable();
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2
    };
    let mut backend = Vec::new();
    for i in 0..20 {
        let req = request(&format!("cold{i}"), &dir, &["/bin/true"]);
        let start = Instant::now();
        let out = run_collect(&sb, req, CancellationToken::new())
            .await
            .0
            .unwrap();
        backend.push(start.elapsed());
        assert_eq!(out.status, ResultStatus::Succeeded);
    }
    let mut cli = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let status = tokio::process::Command::new("docker")
            .args(["run", "--rm", "--network", "none", TEST_IMAGE, "true"])
            .status()
            .await
            .unwrap();
        cli.push(start.elapsed());
        assert!(status.success());
    }
    eprintln!(
        "cold start /bin/true, median of 20: docker backend {:?}, docker run --rm {:?}",
        median(backend),
        median(cli)
    );
}
