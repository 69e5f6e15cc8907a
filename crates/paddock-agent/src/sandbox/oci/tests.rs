//! Tests of the `oci` backend against the runtimes installed here (crun, runc), and of the
//! parts of [`super`] that need none.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant as StdInstant};

use nix::sys::signal::kill;
use paddock_proto::Stream;

use super::runtime::find_in_path;
use super::*;
use crate::sandbox::cgroup::OWNED_CONTROLLERS;
use crate::sandbox::testing::{self, PATH, live, run_collect};

const MIB: u64 = 1024 * 1024;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A detected backend with its own state directory.
struct Rt {
    sandbox: OciSandbox,
    _state: tempfile::TempDir,
}

/// Every runtime installed here (crun, runc), each with a fresh state directory. None
/// installed (or not root): prints why and returns nothing, except under `CI=true`,
/// where that (or an installed runtime that cannot be used) is a failure.
fn runtimes() -> Vec<Rt> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let mut found = Vec::new();
    let mut problems = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        problems.push("the OCI backend tests need root".to_string());
    } else {
        for name in ["crun", "runc"] {
            if find_in_path(Path::new(name)).is_none() {
                eprintln!("{name} is not installed; its OCI tests are skipped");
                continue;
            }
            let state = tempfile::tempdir().unwrap();
            match OciSandbox::detect(OciConfig {
                runtime: Some(name.into()),
                state_dir: state.path().join(".oci"),
            }) {
                Ok(sandbox) => found.push(Rt {
                    sandbox,
                    _state: state,
                }),
                Err(err) => problems.push(format!("{name}: {err}")),
            }
        }
        if found.is_empty() && problems.is_empty() {
            problems.push("neither crun nor runc is installed".to_string());
        }
    }
    if !problems.is_empty() {
        let text = problems.join("; ");
        assert!(!ci, "OCI backend tests cannot run under CI: {text}");
        eprintln!("OCI backend tests partly or fully skipped: {text}");
    }
    found
}

fn request(dir: &tempfile::TempDir, argv: &[&str]) -> RunRequest {
    let task_id = format!(
        "t{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    testing::request(task_id, dir.path(), argv)
}

fn sh(dir: &tempfile::TempDir, script: &str) -> RunRequest {
    request(dir, &["/bin/sh", "-c", script])
}

/// Runs `req`, checks that nothing of the container is left, returns the outcome.
async fn run(sandbox: &OciSandbox, req: RunRequest) -> RunOutcome {
    let name = sanitize_name(&format!("{}-{}", req.task_id, req.attempt));
    let result = run_collect(sandbox, req, CancellationToken::new()).await.0;
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(err) => panic!("[{}] run failed: {err}", sandbox.runtime_name()),
    };
    assert_clean(sandbox, &name).await;
    outcome
}

/// Container ids the runtime still lists.
fn listed(sandbox: &OciSandbox) -> String {
    let out = std::process::Command::new(sandbox.runtime_path())
        .arg("--root")
        .arg(sandbox.state_root())
        .arg("list")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Once the backend's background clean-ups are done, no container, bundle or cgroup of
/// run `name` is left.
async fn assert_clean(sandbox: &OciSandbox, name: &str) {
    sandbox.settle().await;
    let leftovers = leftovers(sandbox, name);
    assert!(
        leftovers.is_empty(),
        "[{}] left behind: {leftovers:?}",
        sandbox.runtime_name()
    );
}

fn leftovers(sandbox: &OciSandbox, name: &str) -> Vec<String> {
    let id = format!("paddock-{name}");
    let mut left = Vec::new();
    if listed(sandbox).contains(&id) {
        left.push(format!("container {id}"));
    }
    let bundle = sandbox.state_dir.join("bundles").join(name);
    if bundle.exists() {
        left.push(format!("bundle {}", bundle.display()));
    }
    if sandbox.state_root().join(&id).exists() {
        left.push(format!("state of {id}"));
    }
    for controller in OWNED_CONTROLLERS {
        if let Some(dir) = sandbox.cgroups.container_dir(controller, &id) {
            left.push(format!("cgroup {}", dir.display()));
        }
    }
    left
}

fn tag(sandbox: &OciSandbox) -> &str {
    sandbox.runtime_name()
}

/// Interface names in a `/proc/net/dev` text.
fn interfaces(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .collect();
    names.sort_unstable();
    names
}

#[tokio::test]
async fn captures_output_and_exit_status() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let req = sh(&dir, "echo out; echo err >&2; echo ünï");
        let name = sanitize_name(&format!("{}-1", req.task_id));
        let (result, chunks) = run_collect(sb, req, CancellationToken::new()).await;
        let out = result.unwrap();
        assert_clean(sb, &name).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
        assert_eq!(out.exit_code, Some(0));
        assert_eq!(out.signal, None);
        assert_eq!(out.error_code, None);
        assert_eq!(out.stdout, "out\nünï\n", "[{}]", tag(sb));
        assert_eq!(out.stderr, "err\n", "[{}]", tag(sb));
        assert!(out.started_at_ms > 0 && out.finished_at_ms >= out.started_at_ms);
        assert_eq!(live(&chunks, Stream::Stdout), out.stdout);
        assert_eq!(live(&chunks, Stream::Stderr), out.stderr);

        let out = run(sb, sh(&dir, "exit 7")).await;
        assert_eq!(out.status, ResultStatus::Failed, "[{}]", tag(sb));
        assert_eq!(out.exit_code, Some(7));
        assert_eq!(out.signal, None);
        assert_eq!(out.error_code, None);
        assert_eq!(out.error_message, None);
    }
}

#[tokio::test]
async fn environment_is_exactly_the_given_one() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(&dir, &["/usr/bin/env"]);
        req.env.insert("FOO".into(), "bar baz".into());
        req.env.insert("HOME".into(), "/work".into());
        let out = run(sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
        let mut lines: Vec<&str> = out.stdout.lines().collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            vec![
                "FOO=bar baz".to_string(),
                "HOME=/work".to_string(),
                format!("PATH={PATH}")
            ],
            "[{}]",
            tag(sb)
        );
    }
}

#[tokio::test]
async fn runs_as_nobody_in_work_with_the_sandbox_hostname() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let out = run(sb, sh(&dir, "id -u; id -g; id -G; pwd; hostname")).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
        assert_eq!(
            out.stdout,
            "65534\n65534\n65534\n/work\npaddock\n",
            "[{}]",
            tag(sb)
        );
    }
}

#[tokio::test]
async fn only_work_and_tmp_are_writable_and_secrets_are_hidden() {
    let script = "echo hi > /work/f && cat /work/f
        touch /etc/x 2>/dev/null && echo etc-writable
        touch /usr/x 2>/dev/null && echo usr-writable
        touch /x 2>/dev/null && echo root-writable
        touch /tmp/x && echo tmp-ok
        for d in /root /home /var /srv /mnt /sys; do test -e $d && echo visible:$d; done
        test -r /proc/self/status && echo proc-ok
        test -c /dev/null && echo dev-ok
        cat /proc/kcore 2>/dev/null | head -c 1 | wc -c
        echo x 2>/dev/null > /proc/sys/kernel/hostname || echo proc-sys-ro";
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let out = run(sb, sh(&dir, script)).await;
        assert_eq!(
            out.stdout,
            "hi\ntmp-ok\nproc-ok\ndev-ok\n0\nproc-sys-ro\n",
            "[{}] {out:?}",
            tag(sb)
        );
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    }
}

#[tokio::test]
async fn network_none_has_only_loopback() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(&dir, &["cat", "/proc/net/dev"]);
        req.network = NetworkMode::None;
        let out = run(sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
        assert_eq!(interfaces(&out.stdout), vec!["lo"], "[{}]", tag(sb));
    }
}

#[tokio::test]
async fn network_default_shares_the_host() {
    let host = interfaces(&fs::read_to_string("/proc/net/dev").unwrap());
    if host.iter().all(|i| i == "lo") {
        eprintln!("the host has no interface besides lo; nothing to compare");
        return;
    }
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let out = run(sb, request(&dir, &["cat", "/proc/net/dev"])).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
        assert_eq!(interfaces(&out.stdout), host, "[{}]", tag(sb));
    }
}

#[tokio::test]
async fn memory_limit_kill_is_reported() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        for argv in [
            vec!["dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"],
            // The shell (PID 1) survives; only dd is killed.
            vec![
                "/bin/sh",
                "-c",
                "dd if=/dev/zero of=/dev/null bs=300M count=1; echo after",
            ],
        ] {
            let mut req = request(&dir, &argv);
            req.limits.memory_bytes = 64 * MIB;
            let out = run(sb, req).await;
            assert_eq!(out.status, ResultStatus::Failed, "[{}] {out:?}", tag(sb));
            assert_eq!(
                out.error_code,
                Some(ErrorCode::MemoryLimitExceeded),
                "[{}] {out:?}",
                tag(sb)
            );
            assert_eq!(
                out.error_message.as_deref(),
                Some("killed: over the 64 MiB memory limit")
            );
        }
        // Within the limit nothing is reported.
        let mut req = request(
            &dir,
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1"],
        );
        req.limits.memory_bytes = 64 * MIB;
        let out = run(sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
        assert_eq!(out.error_code, None);
    }
}

#[tokio::test]
async fn pids_limit_is_reported() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let mut req = sh(
            &dir,
            "i=0; while [ $i -lt 64 ]; do sleep 30 & i=$((i + 1)); done; wait",
        );
        req.limits.pids = 32;
        req.timeout = Duration::from_secs(10);
        let start = StdInstant::now();
        let out = run(sb, req).await;
        assert!(start.elapsed() < Duration::from_secs(20));
        assert!(
            matches!(out.status, ResultStatus::Failed | ResultStatus::TimedOut),
            "[{}] {out:?}",
            tag(sb)
        );
        if out.status == ResultStatus::Failed {
            assert_eq!(
                out.error_code,
                Some(ErrorCode::PidsLimitExceeded),
                "[{}] {out:?}",
                tag(sb)
            );
            assert_eq!(
                out.error_message.as_deref(),
                Some("could not start a process: the limit of 32 processes was reached")
            );
        }
        assert!(
            out.stderr.to_lowercase().contains("fork"),
            "[{}] {out:?}",
            tag(sb)
        );

        // A task that survives the failed forks and runs into its timeout.
        let mut req = sh(
            &dir,
            "i=0; while [ $i -lt 40 ]; do (sleep 30 &) 2>/dev/null; i=$((i + 1)); done; exec sleep 30",
        );
        req.limits.pids = 16;
        req.timeout = Duration::from_secs(1);
        req.kill_grace = Duration::from_millis(200);
        let out = run(sb, req).await;
        assert_eq!(out.status, ResultStatus::TimedOut, "[{}] {out:?}", tag(sb));
        assert_eq!(out.error_code, Some(ErrorCode::TaskTimeout));
        assert_eq!(
            out.error_message.as_deref(),
            Some("killed after timeout of 1s (the limit of 16 processes had been reached)"),
            "[{}]",
            tag(sb)
        );
    }
}

#[tokio::test]
async fn timeout_kills_init_that_ignores_sigterm() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        // `sleep` as PID 1 has no handler: SIGTERM is dropped, SIGKILL after the grace.
        let mut req = request(&dir, &["sleep", "100"]);
        req.timeout = Duration::from_millis(500);
        req.kill_grace = Duration::from_millis(700);
        let start = StdInstant::now();
        let out = run(sb, req).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1200),
            "[{}] {elapsed:?}",
            tag(sb)
        );
        assert!(
            elapsed < Duration::from_secs(8),
            "[{}] {elapsed:?}",
            tag(sb)
        );
        assert_eq!(out.status, ResultStatus::TimedOut, "[{}] {out:?}", tag(sb));
        assert_eq!(out.error_code, Some(ErrorCode::TaskTimeout));
        assert_eq!(
            out.error_message.as_deref(),
            Some("killed after timeout of 500ms")
        );
        assert_eq!(out.signal, Some(Signal::SIGKILL as i32), "[{}]", tag(sb));
    }
}

#[tokio::test]
async fn timeout_kills_a_child_that_ignores_sigterm() {
    // The timeout clock starts when the runtime is spawned, so on a loaded machine the
    // shell may not have installed its trap yet after a short timeout: give it 2 s.
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let mut req = sh(&dir, "trap '' TERM; sleep 100 & echo started; wait");
        req.timeout = Duration::from_secs(2);
        req.kill_grace = Duration::from_millis(700);
        let start = StdInstant::now();
        let out = run(sb, req).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(2700),
            "[{}] {elapsed:?}",
            tag(sb)
        );
        assert!(
            elapsed < Duration::from_secs(10),
            "[{}] {elapsed:?}",
            tag(sb)
        );
        assert_eq!(out.status, ResultStatus::TimedOut, "[{}] {out:?}", tag(sb));
        assert_eq!(out.stdout, "started\n", "[{}] {out:?}", tag(sb));

        // A task that handles SIGTERM ends within the grace: the signal reached it.
        let mut req = sh(&dir, "trap 'echo term; exit 3' TERM; sleep 100 & wait");
        req.timeout = Duration::from_secs(2);
        req.kill_grace = Duration::from_secs(10);
        let start = StdInstant::now();
        let out = run(sb, req).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed < Duration::from_secs(8),
            "[{}] {elapsed:?}",
            tag(sb)
        );
        assert_eq!(out.status, ResultStatus::TimedOut, "[{}] {out:?}", tag(sb));
        assert_eq!(out.stdout, "term\n", "[{}] {out:?}", tag(sb));
        assert_eq!(out.exit_code, Some(3), "[{}] {out:?}", tag(sb));
    }
}

#[tokio::test]
async fn cancel_stops_the_container() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            trigger.cancel();
        });
        let mut req = request(&dir, &["sleep", "100"]);
        req.kill_grace = Duration::from_millis(300);
        let name = sanitize_name(&format!("{}-1", req.task_id));
        let start = StdInstant::now();
        let (result, _) = run_collect(sb, req, cancel).await;
        let out = result.unwrap();
        assert!(start.elapsed() < Duration::from_secs(6), "[{}]", tag(sb));
        assert_eq!(out.status, ResultStatus::Canceled, "[{}] {out:?}", tag(sb));
        assert_eq!(out.error_code, Some(ErrorCode::TaskCanceled));
        assert_clean(sb, &name).await;
    }
}

#[tokio::test]
async fn dropping_the_run_removes_the_container() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let req = sh(&dir, "echo up; sleep 100");
        let name = sanitize_name(&format!("{}-1", req.task_id));
        let (tx, mut rx) = mpsc::channel(64);
        let mut fut = sb.run(req, tx, CancellationToken::new());
        let first = async move { rx.recv().await };
        tokio::select! {
            chunk = first => assert_eq!(chunk.unwrap().data, "up\n"),
            _ = &mut fut => panic!("the run ended early"),
        }
        drop(fut);
        let deadline = StdInstant::now() + Duration::from_secs(15);
        while !leftovers(sb, &name).is_empty() && StdInstant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_clean(sb, &name).await;
    }
}

#[tokio::test]
async fn detect_removes_containers_left_by_a_crashed_agent() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let req = sh(&dir, "echo up; sleep 100");
        let name = sanitize_name(&format!("{}-1", req.task_id));
        let (tx, mut rx) = mpsc::channel(64);
        let mut fut = sb.run(req, tx, CancellationToken::new());
        tokio::select! {
            chunk = rx.recv() => assert_eq!(chunk.unwrap().data, "up\n"),
            _ = &mut fut => panic!("the run ended early"),
        }
        // A crash: the future is forgotten, nothing is cleaned up, the runtime is killed.
        let id = format!("paddock-{name}");
        let runtime_pid = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.contains(&id) && cmdline.contains("\0run\0")
            })
            .unwrap();
        std::mem::forget(fut);
        kill(Pid::from_raw(runtime_pid), Signal::SIGKILL).unwrap();
        assert!(!leftovers(sb, &name).is_empty());

        let again = OciSandbox::detect(OciConfig {
            runtime: Some(sb.runtime_path().to_path_buf()),
            state_dir: sb.state_dir.clone(),
        })
        .unwrap();
        assert_clean(&again, &name).await;
    }
}

#[tokio::test]
async fn output_flood_is_capped_and_completes() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let mut req = sh(&dir, "head -c 50000000 /dev/zero | tr '\\0' a");
        req.output_max_chars = 1000;
        req.timeout = Duration::from_secs(60);
        let name = sanitize_name(&format!("{}-1", req.task_id));
        let (result, chunks) = run_collect(sb, req, CancellationToken::new()).await;
        let out = result.unwrap();
        assert_clean(sb, &name).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "[{}]", tag(sb));
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.stdout.chars().all(|c| c == 'a'));
        assert!(out.stdout_truncated);
        assert!(!out.stderr_truncated);
        let live: usize = chunks.iter().map(|c| c.data.len()).sum();
        assert_eq!(live, 1000);
    }
}

#[tokio::test]
async fn stdin_is_delivered_then_closed() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(&dir, &["cat"]);
        req.stdin = Some("hello\nwörld".into());
        let out = run(sb, req).await;
        assert_eq!(out.stdout, "hello\nwörld", "[{}] {out:?}", tag(sb));
        let out = run(sb, request(&dir, &["cat"])).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.stdout, "");
    }
}

#[tokio::test]
async fn seccomp_and_privileges_are_applied() {
    let script = "grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd|CapAmb):' /proc/self/status
        unshare -U true 2>/dev/null && echo unshare-allowed
        mount -t tmpfs none /tmp 2>/dev/null && echo mount-allowed
        if [ -x /usr/bin/perl ] && [ \"$(uname -m)\" = x86_64 ]; then
          perl -e '$r = syscall(56, 0x10000000 | 17, 0, 0, 0, 0); exit 0 if $r == 0;
                   print $r < 0 ? \"clone-newuser: $!\\n\" : \"clone-newuser allowed\\n\";
                   $r = syscall(435, 0, 0); print \"clone3: $!\\n\"'
        fi";
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let out = run(sb, sh(&dir, script)).await;
        let mut expected = "Seccomp:\t2\nNoNewPrivs:\t1\nCapEff:\t0000000000000000\n\
                            CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n"
            .to_string();
        let mut lines: Vec<&str> = out.stdout.lines().collect();
        let perl = Path::new("/usr/bin/perl").exists() && cfg!(target_arch = "x86_64");
        if perl {
            expected.push_str(
                "clone-newuser: Operation not permitted\nclone3: Function not implemented\n",
            );
        }
        lines.sort_by_key(|l| {
            [
                "NoNewPrivs",
                "Seccomp",
                "CapEff",
                "CapBnd",
                "CapAmb",
                "clone-",
                "clone3",
            ]
            .iter()
            .position(|p| l.starts_with(p))
        });
        let mut want: Vec<&str> = expected.lines().collect();
        want.sort_by_key(|l| {
            [
                "NoNewPrivs",
                "Seccomp",
                "CapEff",
                "CapBnd",
                "CapAmb",
                "clone-",
                "clone3",
            ]
            .iter()
            .position(|p| l.starts_with(p))
        });
        assert_eq!(lines, want, "[{}] {out:?}", tag(sb));
    }
}

/// A minimal root: busybox-static as /bin/busybox and /bin/sh.
fn busybox_root(dir: &Path) -> bool {
    let busybox = Path::new("/usr/bin/busybox");
    if !busybox.exists() {
        return false;
    }
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).unwrap();
    fs::write(dir.join("marker"), "from-rootfs\n").unwrap();
    true
}

#[tokio::test]
async fn rootfs_directory_and_cached_tarball() {
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("root");
    if !busybox_root(&root) {
        eprintln!("busybox is not installed; rootfs test skipped");
        return;
    }
    let tarball = src.path().join("mini.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-czf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let argv = [
        "/bin/busybox",
        "sh",
        "-c",
        "busybox cat /marker; busybox test -e /usr/bin || echo no-usr; busybox id -u",
    ];
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();

        let mut req = request(&dir, &argv);
        req.rootfs = Some(root.clone());
        let out = run(sb, req).await;
        assert_eq!(
            out.stdout,
            "from-rootfs\nno-usr\n65534\n",
            "[{}] {out:?}",
            tag(sb)
        );

        let cache = sb.state_dir.join("rootfs");
        let cached = || -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = fs::read_dir(&cache)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            v.sort();
            v
        };
        assert!(cached().is_empty());
        let mut req = request(&dir, &argv);
        req.rootfs = Some(tarball.clone());
        let out = run(sb, req).await;
        assert_eq!(
            out.stdout,
            "from-rootfs\nno-usr\n65534\n",
            "[{}] {out:?}",
            tag(sb)
        );
        let first = cached();
        assert_eq!(first.len(), 1, "{first:?}");
        // Keyed by the tarball's SHA-256, as `sha256sum` computes it.
        let sum = std::process::Command::new("sha256sum")
            .arg(&tarball)
            .output()
            .unwrap();
        let sum = String::from_utf8_lossy(&sum.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        assert_eq!(
            first[0].file_name().unwrap().to_string_lossy(),
            format!("sha256-{sum}")
        );
        let inode = fs::metadata(&first[0]).unwrap().ino();

        // Second run: the extraction is reused.
        let mut req = request(&dir, &argv);
        req.rootfs = Some(tarball.clone());
        let out = run(sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(cached(), first);
        assert_eq!(fs::metadata(&first[0]).unwrap().ino(), inode);

        // The same content under another name and a newer mtime: the same extraction.
        let copy = dir.path().join("copy-of-mini.tar.gz");
        fs::copy(&tarball, &copy).unwrap();
        let file = fs::OpenOptions::new().append(true).open(&copy).unwrap();
        file.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        drop(file);
        let mut req = request(&dir, &argv);
        req.rootfs = Some(copy);
        let out = run(sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(
            cached(),
            first,
            "identical content must share one extraction"
        );

        // Changed content is extracted again.
        fs::write(root.join(format!("extra-{}", tag(sb))), "x").unwrap();
        let status = std::process::Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-czf")
            .arg(&tarball)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        let mut req = request(&dir, &argv);
        req.rootfs = Some(tarball.clone());
        let out = run(sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(cached().len(), 2);
    }
}

#[tokio::test]
async fn device_nodes_outside_the_allow_list_cannot_be_opened() {
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("root");
    if !busybox_root(&root) {
        eprintln!("busybox is not installed; device test skipped");
        return;
    }
    // /dev/fuse's numbers, world-writable: anyone may open /dev/fuse, so only the device
    // cgroup stands in the way (EPERM before any driver is looked up).
    nix::sys::stat::mknod(
        &root.join("fuse"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(10, 229),
    )
    .unwrap();
    fs::set_permissions(root.join("fuse"), fs::Permissions::from_mode(0o666)).unwrap();
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(
            &dir,
            &["/bin/busybox", "sh", "-c", "exec 3<>/fuse && echo opened"],
        );
        req.rootfs = Some(root.clone());
        let out = run(sb, req).await;
        assert_eq!(out.status, ResultStatus::Failed, "[{}] {out:?}", tag(sb));
        assert!(
            out.stderr.contains("Operation not permitted"),
            "[{}] {out:?}",
            tag(sb)
        );
    }
}

#[tokio::test]
async fn setup_and_spawn_failures_are_errors() {
    let src = tempfile::tempdir().unwrap();
    let broken = src.path().join("broken");
    fs::create_dir_all(broken.join("work")).unwrap();
    // `/proc` cannot be mounted on a regular file.
    fs::write(broken.join("proc"), "not a directory").unwrap();
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();

        let req = request(&dir, &["/nonexistent/paddock-no-such-program", "x"]);
        let name = sanitize_name(&format!("{}-1", req.task_id));
        let (result, _) = run_collect(sb, req, CancellationToken::new()).await;
        match result {
            Err(SandboxError::SpawnFailed { program, reason }) => {
                assert_eq!(program, "/nonexistent/paddock-no-such-program");
                assert!(!reason.is_empty());
            }
            other => panic!("[{}] expected SpawnFailed, got {other:?}", tag(sb)),
        }
        assert_clean(sb, &name).await;

        let mut req = request(&dir, &["/bin/true"]);
        req.rootfs = Some(broken.clone());
        let name = sanitize_name(&format!("{}-1", req.task_id));
        let (result, _) = run_collect(sb, req, CancellationToken::new()).await;
        let err = result.unwrap_err();
        assert_eq!(
            err.code(),
            ErrorCode::SandboxSetupFailed,
            "[{}] {err:?}",
            tag(sb)
        );
        assert_clean(sb, &name).await;

        let mut req = request(&dir, &["/bin/true"]);
        req.rootfs = Some(src.path().join("nothing-here.tar"));
        let (result, _) = run_collect(sb, req, CancellationToken::new()).await;
        assert!(matches!(result, Err(SandboxError::Setup(_))), "{result:?}");

        let (result, _) = run_collect(sb, request(&dir, &[]), CancellationToken::new()).await;
        assert!(matches!(result, Err(SandboxError::Invalid(_))));
    }
}

#[tokio::test]
async fn a_task_exiting_128_plus_n_is_reported_as_signal_n() {
    for rt in runtimes() {
        let sb = &rt.sandbox;
        let dir = tempfile::tempdir().unwrap();
        let out = run(sb, sh(&dir, "sh -c 'kill -9 $$'")).await;
        assert_eq!(out.status, ResultStatus::Failed);
        assert_eq!(out.exit_code, None);
        assert_eq!(out.signal, Some(9), "[{}] {out:?}", tag(sb));
    }
}

#[test]
fn names_are_sanitised() {
    assert_eq!(sanitize_name("task/1 ü-2"), "task_1__-2");
    assert_eq!(sanitize_name(".hidden-1"), "_hidden-1");
    let long = sanitize_name(&"x".repeat(300));
    assert_eq!(long.len(), 96);
    assert_ne!(long, sanitize_name(&"x".repeat(301)));
}

#[test]
fn check_accepts_every_network_mode() {
    let sandbox = OciSandbox {
        runtime: PathBuf::from("/usr/bin/crun"),
        runtime_name: "crun".into(),
        runtime_version: "crun version 1.8.1".into(),
        kind: RuntimeKind::Crun,
        keep: false,
        state_dir: PathBuf::from("/nonexistent"),
        cgroups: CgroupLayout::default(),
        host_view: (PathBuf::from("/nonexistent/hostview"), Vec::new()),
        cleanups: Cleanups::default(),
    };
    assert_eq!(sandbox.name(), "oci");
    for mode in [None, Some(NetworkMode::None), Some(NetworkMode::Default)] {
        sandbox
            .check(&SandboxSpec {
                network_mode: mode,
                ..Default::default()
            })
            .unwrap();
    }
}
