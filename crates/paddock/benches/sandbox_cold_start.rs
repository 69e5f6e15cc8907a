//! Cold start of `/bin/true` through each sandbox backend, side by side with the bare tools
//! they compete with, in one run on one machine: N rounds, each running every contender once
//! (so that all of them see the same machine load), after 3 warm-up rounds; median and p90.
//!
//! Run: `bench/sandbox.sh` (release build, writes docs/BENCHMARKS.md), or
//! `cargo bench --bench sandbox_cold_start -- [--runs N] [--markdown] [--only NAME,...]`.
//! Needs root, and for the peers: bwrap, crun, runc, dockerd with `paddock/busybox:test`
//! (`scripts/test.sh` sets all of these up). A contender that is missing is listed as such.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paddock_agent::sandbox::{Limits, RunRequest, Sandbox};
use paddock_proto::NetworkMode;

fn stats(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(samples[samples.len() / 2]);
    let p90 = ms(samples[(samples.len() * 9 / 10).min(samples.len() - 1)]);
    (median, p90)
}

/// One contender: how to time one run of it.
enum How {
    /// A backend, through the `Sandbox` trait as the agent calls it (`net_default`: with
    /// the default network, for `host`, which refuses `none`).
    Backend {
        sandbox: Arc<dyn Sandbox>,
        scratch: PathBuf,
        net_default: bool,
    },
    /// A command line, run to completion.
    Command(Box<dyn FnMut() -> Command>),
    /// Not available here, and why.
    Missing(String),
}

struct Contender {
    name: String,
    what: String,
    how: How,
    /// At most this many measured runs (docker run is slow).
    max_runs: usize,
    samples: Vec<Duration>,
}

fn time_command(cmd: &mut Command) -> Result<Duration, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let o = cmd.output().map_err(|e| e.to_string())?;
    let dt = t0.elapsed();
    if !o.status.success() {
        return Err(format!(
            "{:?}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(dt)
}

async fn time_backend(
    b: &Arc<dyn Sandbox>,
    scratch: &Path,
    i: usize,
    net_default: bool,
) -> Result<Duration, String> {
    let workdir = scratch.join(format!("w{i}"));
    std::fs::create_dir_all(&workdir).unwrap();
    let req = RunRequest {
        task_id: format!("bench{i}"),
        attempt: 1,
        argv: vec!["/bin/true".into()],
        env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
        stdin: None,
        workdir: workdir.clone(),
        timeout: Duration::from_secs(30),
        kill_grace: Duration::from_millis(500),
        // The host backend refuses networkMode none; it is timed with the default network.
        network: if net_default {
            NetworkMode::Default
        } else {
            NetworkMode::None
        },
        output_max_chars: 65_536,
        limits: Limits::default(),
        rootfs: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let t0 = Instant::now();
    let o = b
        .run(req, tx, tokio_util::sync::CancellationToken::new())
        .await
        .map_err(|e| e.to_string())?;
    let dt = t0.elapsed();
    drain.await.unwrap();
    let _ = std::fs::remove_dir_all(&workdir);
    if o.exit_code != Some(0) {
        return Err(format!("{o:?}"));
    }
    Ok(dt)
}

/// A minimal OCI bundle running /bin/true from a busybox rootfs, for bare crun/runc.
fn busybox_bundle(dir: &Path, runtime: &str) -> Result<PathBuf, String> {
    let bundle = dir.join(format!("bundle-{runtime}"));
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .map_err(|e| format!("busybox: {e}"))?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/true")).unwrap();
    let spec = Command::new(runtime)
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .map_err(|e| e.to_string())?;
    if !spec.status.success() {
        return Err(String::from_utf8_lossy(&spec.stderr).into());
    }
    let path = bundle.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["process"]["terminal"] = false.into();
    v["process"]["args"] = serde_json::json!(["/bin/true"]);
    std::fs::write(&path, v.to_string()).unwrap();
    Ok(bundle)
}

fn which(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs: usize = arg("--runs").and_then(|n| n.parse().ok()).unwrap_or(50);
    // `--only a,b`: just the contenders whose name contains one of these (for profiling).
    let only: Option<Vec<String>> =
        arg("--only").map(|s| s.split(',').map(str::to_string).collect());
    let want = |name: &str| {
        only.as_ref()
            .is_none_or(|o| o.iter().any(|w| name.contains(w.as_str())))
    };
    let markdown = args.iter().any(|a| a == "--markdown");
    let dir = tempfile::tempdir().unwrap();
    let mut all = contenders(dir.path(), runs).await;
    all.retain(|c| want(&c.name));

    // Round-robin: round i runs every contender once, so that all of them see the same
    // machine load (other builds come and go); the first WARMUP rounds are not counted.
    const WARMUP: usize = 3;
    for i in 0..runs + WARMUP {
        for c in &mut all {
            if i >= c.max_runs + WARMUP {
                continue;
            }
            let result = match &mut c.how {
                How::Missing(_) => continue,
                How::Backend {
                    sandbox,
                    scratch,
                    net_default,
                } => time_backend(sandbox, scratch, i, *net_default).await,
                How::Command(make) => time_command(&mut make()),
            };
            match result {
                Ok(dt) if i >= WARMUP => c.samples.push(dt),
                Ok(_) => {}
                Err(e) => {
                    c.how = How::Missing(e);
                    c.samples.clear();
                }
            }
        }
    }

    if markdown {
        println!("| contender | what it does | median ms | p90 ms | runs |");
        println!("|---|---|---:|---:|---:|");
    }
    for c in &mut all {
        match &c.how {
            How::Missing(note) => {
                if markdown {
                    println!(
                        "| {} | {} | n/a | n/a | 0 ({}) |",
                        c.name,
                        c.what,
                        note.replace('|', "/")
                    );
                } else {
                    println!("{:<22} unavailable: {note}", c.name);
                }
            }
            _ => {
                let n = c.samples.len();
                let (median, p90) = stats(&mut c.samples);
                if markdown {
                    println!("| {} | {} | {median:.1} | {p90:.1} | {n} |", c.name, c.what);
                } else {
                    println!(
                        "{:<22} median {median:>7.1} ms   p90 {p90:>7.1} ms   ({n} runs)",
                        c.name
                    );
                }
            }
        }
    }
}

/// Every contender, in table order: the paddock backends (through the `Sandbox` trait,
/// exactly as the agent calls them), then the peers.
async fn contenders(dir: &Path, runs: usize) -> Vec<Contender> {
    use paddock_agent::sandbox::docker::{DockerConfig, DockerSandbox};
    use paddock_agent::sandbox::oci::{OciConfig, OciSandbox};
    let contender = |name: &str, what: &str, how: How| Contender {
        name: name.into(),
        what: what.into(),
        how,
        max_runs: runs,
        samples: Vec::new(),
    };
    let backend = |b: Result<Arc<dyn Sandbox>, String>, scratch: &str, net_default: bool| match b {
        Ok(sandbox) => How::Backend {
            sandbox,
            scratch: dir.join(scratch),
            net_default,
        },
        Err(e) => How::Missing(e),
    };
    let mut out = vec![
        contender(
            "paddock host",
            "no isolation: process group, caps, timeout",
            backend(
                Ok(Arc::new(paddock_agent::sandbox::host::HostSandbox::new())),
                "host",
                true,
            ),
        ),
        contender(
            "paddock process",
            "mount+pid+ipc+uts+net ns, cgroup limits, Landlock, seccomp, uid 65534",
            backend(
                paddock_agent::sandbox::process::ProcessSandbox::detect(
                    env!("CARGO_BIN_EXE_paddock").into(),
                    dir.join("process-scratch"),
                )
                .map(|b| Arc::new(b) as Arc<dyn Sandbox>),
                "process",
                false,
            ),
        ),
    ];
    for rt in ["crun", "runc"] {
        let cfg = OciConfig {
            runtime: Some(rt.into()),
            state_dir: dir.join(format!("oci-{rt}")),
        };
        let b = tokio::task::spawn_blocking(move || OciSandbox::detect(cfg))
            .await
            .unwrap()
            .map(|b| Arc::new(b) as Arc<dyn Sandbox>);
        out.push(contender(
            &format!("paddock oci ({rt})"),
            &format!(
                "generated OCI spec (host root view, limits, seccomp) run by {rt}, OOM/pids counters, cleanup"
            ),
            backend(b, &format!("oci-{rt}-runs"), false),
        ));
    }
    let cfg = DockerConfig {
        image: "paddock/busybox:test".into(),
        ..DockerConfig::default()
    };
    out.push(contender(
        "paddock docker",
        "Engine API: create, attach, start, wait, inspect, remove",
        backend(
            DockerSandbox::connect(cfg)
                .await
                .map(|b| Arc::new(b) as Arc<dyn Sandbox>),
            "docker",
            false,
        ),
    ));

    // Peers.
    out.push(contender(
        "bwrap",
        "bwrap --unshare-all --die-with-parent /bin/true",
        if which("bwrap") {
            How::Command(Box::new(|| {
                let mut c = Command::new("bwrap");
                c.args([
                    "--unshare-all",
                    "--die-with-parent",
                    "--ro-bind",
                    "/usr",
                    "/usr",
                    "--symlink",
                    "usr/bin",
                    "/bin",
                    "--symlink",
                    "usr/lib",
                    "/lib",
                    "--symlink",
                    "usr/lib64",
                    "/lib64",
                    "--proc",
                    "/proc",
                    "--dev",
                    "/dev",
                    "--tmpfs",
                    "/tmp",
                    "/bin/true",
                ]);
                c
            }))
        } else {
            How::Missing("bwrap not installed".into())
        },
    ));
    for rt in ["crun", "runc"] {
        let how = if which(rt) {
            match busybox_bundle(dir, rt) {
                Ok(bundle) => {
                    let state = dir.join(format!("state-{rt}"));
                    let mut n = 0u64;
                    How::Command(Box::new(move || {
                        n += 1;
                        let mut c = Command::new(rt);
                        c.arg("--root")
                            .arg(&state)
                            .args(["run", "--bundle"])
                            .arg(&bundle)
                            .arg(format!("bench-{rt}-{n}"));
                        c
                    }))
                }
                Err(e) => How::Missing(e),
            }
        } else {
            How::Missing(format!("{rt} not installed"))
        };
        out.push(contender(
            &format!("bare {rt}"),
            &format!("{rt} run (busybox bundle, default spec)"),
            how,
        ));
    }
    let mut docker_run = contender(
        "docker run",
        "docker run --rm --network none paddock/busybox:test true",
        if which("docker") {
            How::Command(Box::new(|| {
                let mut c = Command::new("docker");
                c.args([
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    "paddock/busybox:test",
                    "true",
                ]);
                c
            }))
        } else {
            How::Missing("docker not installed".into())
        },
    );
    docker_run.max_runs = runs.min(20);
    out.push(docker_run);
    out
}
