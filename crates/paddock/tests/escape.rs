//! The escape suite: one contract of attacks, run against every isolating backend on this
//! machine. Each case asserts containment and a clean, reported outcome. A backend the
//! machine lacks is skipped with a printed reason, except under `CI=true`, where
//! `scripts/test.sh` has installed everything and a missing backend is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use paddock_agent::sandbox::{Limits, RunOutcome, RunRequest, Sandbox};
use paddock_proto::{ErrorCode, NetworkMode, ResultStatus};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn unavailable(name: &str, why: &str) -> Option<Arc<dyn Sandbox>> {
    assert!(!in_ci(), "backend {name} unavailable under CI: {why}");
    eprintln!("skipping {name} backend: {why}");
    None
}

async fn process_backend(scratch: &std::path::Path) -> Option<Arc<dyn Sandbox>> {
    match paddock_agent::sandbox::process::ProcessSandbox::detect(
        env!("CARGO_BIN_EXE_paddock").into(),
        scratch.join("scratch"),
    ) {
        Ok(b) => Some(Arc::new(b)),
        Err(e) => unavailable("process", &e),
    }
}

/// A prepared run: a fresh work directory and the request.
struct Case {
    dir: tempfile::TempDir,
    req: RunRequest,
}

fn case(script: &str) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("work");
    std::fs::create_dir_all(&workdir).unwrap();
    let req = RunRequest {
        task_id: format!("esc{}", uuid::Uuid::new_v4().simple()),
        attempt: 1,
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::from([
            ("PATH".to_string(), PATH.to_string()),
            ("HOME".to_string(), "/work".to_string()),
        ]),
        stdin: None,
        workdir,
        timeout: Duration::from_secs(20),
        kill_grace: Duration::from_millis(300),
        network: NetworkMode::None,
        output_max_chars: 65_536,
        limits: Limits {
            memory_bytes: 128 << 20,
            cpu_millis: 1000,
            pids: 64,
        },
        rootfs: None,
    };
    Case { dir, req }
}

async fn run(b: &Arc<dyn Sandbox>, req: RunRequest) -> RunOutcome {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let out = b
        .run(req, tx, tokio_util::sync::CancellationToken::new())
        .await
        .expect("run starts");
    drain.await.unwrap();
    out
}

macro_rules! escape_suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            async fn backend(dir: &std::path::Path) -> Option<Arc<dyn Sandbox>> {
                $make(dir).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fork_bomb_is_contained() {
                // The bomb rages while the task sleeps; the pids limit holds it, and the task
                // ends either by its timeout or, when the bomb took every pid before `sleep`
                // could start, as a failed fork. Either way: reported, contained, nothing left.
                let marker = 4000 + (uuid::Uuid::new_v4().as_u128() % 5000) as u32;
                let c = case(&format!("bomb() {{ bomb | bomb & }}; bomb; sleep {marker}"));
                let Some(b) = backend(c.dir.path()).await else { return };
                let mut req = c.req.clone();
                req.timeout = Duration::from_secs(3);
                let t0 = Instant::now();
                let out = run(&b, req).await;
                assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
                assert!(
                    matches!(
                        (out.status, out.error_code),
                        (ResultStatus::TimedOut, Some(ErrorCode::TaskTimeout)) | (ResultStatus::Failed, Some(ErrorCode::PidsLimitExceeded))
                    ),
                    "{out:?}"
                );
                // The host still forks fine, and nothing of the bomb is left.
                assert!(std::process::Command::new("true").status().unwrap().success());
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(common::live_processes_with(&format!("sleep {marker}")).is_empty());
                assert!(common::live_processes_with(&format!("bomb; sleep {marker}")).is_empty(), "bomb processes outlived the task");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fork_loop_hits_the_pids_limit() {
                // The shell's own "can't fork" message stays on stderr: the docker backend has
                // no cgroup counter to read after the container is gone and relies on it.
                let c = case("i=0; while [ $i -lt 200 ]; do (sleep 3017 &) || { echo fork-refused; exit 3; }; i=$((i+1)); done; echo all-forked");
                let Some(b) = backend(c.dir.path()).await else { return };
                let mut req = c.req.clone();
                req.limits.pids = 32;
                let out = run(&b, req).await;
                assert_eq!(out.stdout, "fork-refused\n", "{out:?}");
                assert_eq!((out.status, out.exit_code), (ResultStatus::Failed, Some(3)));
                assert_eq!(out.error_code, Some(ErrorCode::PidsLimitExceeded), "{out:?}");
                assert!(common::live_processes_with("sleep 3017").is_empty(), "background sleeps survived the run");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory_hog_is_oom_killed_and_reported() {
                let c = case("dd if=/dev/zero of=/dev/null bs=300M count=1; echo survived");
                let Some(b) = backend(c.dir.path()).await else { return };
                let mut req = c.req.clone();
                req.limits.memory_bytes = 64 << 20;
                let out = run(&b, req).await;
                assert_eq!(out.status, ResultStatus::Failed, "{out:?}");
                assert_eq!(out.error_code, Some(ErrorCode::MemoryLimitExceeded), "{out:?}");
                // The same program within the limit works (so the failure is the limit's).
                let c2 = case("dd if=/dev/zero of=/dev/null bs=8M count=1 2>/dev/null && echo fine");
                let out = run(&b, c2.req.clone()).await;
                assert_eq!((out.status, out.stdout.as_str()), (ResultStatus::Succeeded, "fine\n"), "{out:?}");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cpu_quota_is_honoured() {
                // Busy for 2-3 s of wall time with a quota of half a CPU: CPU time about half
                // the wall time (`times` sums the shell and its children).
                let c = case("end=$(( $(date +%s) + 3 )); while [ $(date +%s) -lt $end ]; do :; done; times");
                let Some(b) = backend(c.dir.path()).await else { return };
                let mut req = c.req.clone();
                req.limits.cpu_millis = 500;
                let out = run(&b, req).await;
                assert_eq!(out.status, ResultStatus::Succeeded, "{out:?}");
                let wall = (out.finished_at_ms - out.started_at_ms) as f64 / 1000.0;
                let cpu: f64 = out
                    .stdout
                    .split_whitespace()
                    .map(|t| {
                        let t = t.trim_end_matches('s');
                        let (m, s) = t.split_once('m').unwrap();
                        m.parse::<f64>().unwrap() * 60.0 + s.parse::<f64>().unwrap()
                    })
                    .sum();
                assert!(cpu > 0.3, "the loop should have used CPU: {cpu} s in {wall} s ({})", out.stdout);
                assert!(cpu <= 0.5 * wall + 0.35, "a 0.5 CPU quota over {wall:.2} s allows about {:.2} s, used {cpu:.2} s", 0.5 * wall);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn output_flood_is_capped_with_bounded_memory() {
                let c = case("head -c 1000000000 /dev/zero | tr '\\0' a; echo done >&2");
                let Some(b) = backend(c.dir.path()).await else { return };
                let rss_before = rss_kib();
                let mut req = c.req.clone();
                req.timeout = Duration::from_secs(60);
                let out = run(&b, req).await;
                let grown = rss_kib().saturating_sub(rss_before);
                assert_eq!(out.status, ResultStatus::Succeeded, "{:?}", out.error_message);
                assert_eq!(out.stdout.len(), 65_536);
                assert!(out.stdout_truncated && !out.stderr_truncated);
                assert_eq!(out.stderr, "done\n");
                assert!(grown < 64 * 1024, "agent memory grew by {grown} KiB for a 1 GB flood");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn timeout_kills_the_whole_tree() {
                let c = case("trap '' TERM; (trap '' TERM; sleep 3011) & sleep 3012 & sleep 3013");
                let Some(b) = backend(c.dir.path()).await else { return };
                let mut req = c.req.clone();
                req.timeout = Duration::from_secs(1);
                let t0 = Instant::now();
                let out = run(&b, req).await;
                assert_eq!((out.status, out.error_code), (ResultStatus::TimedOut, Some(ErrorCode::TaskTimeout)), "{out:?}");
                assert!(t0.elapsed() < Duration::from_secs(6), "took {:?}", t0.elapsed());
                for marker in ["sleep 3011", "sleep 3012", "sleep 3013"] {
                    assert!(common::live_processes_with(marker).is_empty(), "{marker} survived the timeout");
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn writes_outside_work_and_tmp_fail() {
                let marker = format!("paddock-escape-{}", uuid::Uuid::new_v4().simple());
                let c = case(&format!(
                    "for p in /etc/{marker} /usr/{marker} /{marker} /bin/{marker}; do (echo x > $p) 2>/dev/null && echo WROTE $p; done; echo ok > /work/f && echo ok > /tmp/f && echo wrote-work-and-tmp"
                ));
                let Some(b) = backend(c.dir.path()).await else { return };
                let out = run(&b, c.req.clone()).await;
                assert_eq!(out.stdout, "wrote-work-and-tmp\n", "{out:?}");
                assert_eq!(std::fs::read_to_string(c.req.workdir.join("f")).unwrap(), "ok\n");
                for p in ["/etc", "/usr", "/", "/bin"] {
                    assert!(!std::path::Path::new(p).join(&marker).exists());
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn host_secrets_are_unreadable() {
                // A root-only file in a directory the sandbox shows, and the agent's token path.
                let name = format!("paddock-secret-{}", uuid::Uuid::new_v4().simple());
                let secret = std::path::Path::new("/etc").join(&name);
                std::fs::write(&secret, "TOPSECRET").unwrap();
                std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&secret).unwrap().permissions(), 0o600);
                std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
                let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
                let c = case(&format!("cat /etc/{name}; cat {home}/.paddock/agent.json; cat /root/.paddock/agent.json; ls /root; cat /proc/1/environ; echo end"));
                let Some(b) = backend(c.dir.path()).await else { return };
                let out = run(&b, c.req.clone()).await;
                let _ = std::fs::remove_file(&secret);
                assert!(!out.stdout.contains("TOPSECRET") && !out.stderr.contains("TOPSECRET"), "{out:?}");
                assert!(!out.stdout.contains("agentToken"), "{out:?}");
                assert!(!out.stdout.contains("PADDOCK_SANDBOX_SPEC"), "init environment leaked: {out:?}");
                assert!(out.stdout.ends_with("end\n"), "{out:?}");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn network_none_blocks_loopback_to_host() {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = listener.local_addr().unwrap().port();
                listener.set_nonblocking(true).unwrap();
                let c = case(&format!(
                    "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; (echo x > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo CONNECTED; bash -c 'echo x > /dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo CONNECTED; echo end"
                ));
                let Some(b) = backend(c.dir.path()).await else { return };
                let out = run(&b, c.req.clone()).await;
                assert_eq!(out.stdout, "lo\nend\n", "only loopback, and no way to the host's: {out:?}");
                assert!(listener.accept().is_err(), "the host listener got a connection");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn environment_is_exactly_the_requested_one() {
                let c = case("env | sort");
                let Some(b) = backend(c.dir.path()).await else { return };
                let mut req = c.req.clone();
                req.env.insert("ALLOWED".into(), "1".into());
                let out = run(&b, req.clone()).await;
                // The shell adds PWD/SHLVL/_; Docker adds HOSTNAME. Nothing of the agent's own.
                let mut lines: Vec<&str> = out
                    .stdout
                    .lines()
                    .filter(|l| !["PWD=", "SHLVL=", "_=", "HOSTNAME="].iter().any(|p| l.starts_with(p)))
                    .collect();
                lines.sort_unstable();
                let mut expected: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                expected.sort();
                assert_eq!(lines, expected, "{out:?}");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nothing_survives_the_task() {
                let c = case("sleep 3021 & (setsid sleep 3022 &) ; (trap '' HUP; sleep 3023) >/dev/null 2>&1 & echo started");
                let Some(b) = backend(c.dir.path()).await else { return };
                let out = run(&b, c.req.clone()).await;
                assert_eq!((out.status, out.stdout.as_str()), (ResultStatus::Succeeded, "started\n"), "{out:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                for marker in ["sleep 3021", "sleep 3022", "sleep 3023"] {
                    assert!(common::live_processes_with(marker).is_empty(), "{marker} outlived the task");
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn escape_syscalls_are_refused() {
                let c = case("id -u; unshare -U true 2>/dev/null && echo UNSHARED; unshare -n true 2>/dev/null && echo UNSHARED-NET; mount -t tmpfs x /tmp 2>/dev/null && echo MOUNTED; echo end");
                let Some(b) = backend(c.dir.path()).await else { return };
                let out = run(&b, c.req.clone()).await;
                assert_eq!(out.stdout, "65534\nend\n", "{out:?}");
            }
        }
    };
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

async fn docker_backend(_scratch: &std::path::Path) -> Option<Arc<dyn Sandbox>> {
    use paddock_agent::sandbox::docker::{DockerConfig, DockerSandbox};
    // No caps from the config: the suite's RunRequest limits apply as given.
    let cfg = DockerConfig {
        image: "paddock/busybox:test".into(),
        memory_mb: 0,
        cpus: 0.0,
        pids: 0,
        ..DockerConfig::default()
    };
    match DockerSandbox::connect(cfg).await {
        Ok(b) if b.image_present() => Some(Arc::new(b)),
        Ok(_) => unavailable(
            "docker",
            "image paddock/busybox:test missing (scripts/test.sh builds it)",
        ),
        Err(e) => unavailable("docker", &e),
    }
}

async fn oci_backend(scratch: &std::path::Path, runtime: &str) -> Option<Arc<dyn Sandbox>> {
    use paddock_agent::sandbox::oci::{OciConfig, OciSandbox};
    let cfg = OciConfig {
        runtime: Some(runtime.into()),
        state_dir: scratch.join("oci-state"),
    };
    match tokio::task::spawn_blocking(move || OciSandbox::detect(cfg))
        .await
        .unwrap()
    {
        Ok(b) => Some(Arc::new(b)),
        Err(e) => unavailable(&format!("oci/{runtime}"), &e),
    }
}

async fn oci_crun_backend(scratch: &std::path::Path) -> Option<Arc<dyn Sandbox>> {
    oci_backend(scratch, "crun").await
}

async fn oci_runc_backend(scratch: &std::path::Path) -> Option<Arc<dyn Sandbox>> {
    oci_backend(scratch, "runc").await
}

escape_suite!(process, process_backend);
escape_suite!(oci_crun, oci_crun_backend);
escape_suite!(oci_runc, oci_runc_backend);
escape_suite!(docker, docker_backend);
