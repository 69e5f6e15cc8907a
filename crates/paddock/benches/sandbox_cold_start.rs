//! Cold start of `/bin/true` through each sandbox backend, side by side with the bare tools
//! they compete with, in one run on one machine. Median and p90 of N runs after warm-up.
//!
//! Run: `bench/sandbox.sh` (release build, writes docs/BENCHMARKS.md), or
//! `cargo bench --bench sandbox_cold_start -- [--runs N] [--markdown]`.
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

struct Row {
    name: String,
    what: String,
    samples: Vec<Duration>,
    note: Option<String>,
}

fn stats(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(samples[samples.len() / 2]);
    let p90 = ms(samples[(samples.len() * 9 / 10).min(samples.len() - 1)]);
    (median, p90)
}

fn time_command(mut make: impl FnMut() -> Command, runs: usize) -> Result<Vec<Duration>, String> {
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs + 3 {
        let mut cmd = make();
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
        if i >= 3 {
            out.push(dt);
        }
    }
    Ok(out)
}

async fn time_backend(
    b: &Arc<dyn Sandbox>,
    scratch: &Path,
    runs: usize,
) -> Result<Vec<Duration>, String> {
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs + 3 {
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
            network: NetworkMode::None,
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
        if i >= 3 {
            out.push(dt);
        }
    }
    Ok(out)
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
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let markdown = args.iter().any(|a| a == "--markdown");
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    let mut push = |name: &str, what: &str, r: Result<Vec<Duration>, String>| match r {
        Ok(samples) => rows.push(Row {
            name: name.into(),
            what: what.into(),
            samples,
            note: None,
        }),
        Err(e) => rows.push(Row {
            name: name.into(),
            what: what.into(),
            samples: Vec::new(),
            note: Some(e),
        }),
    };

    // Paddock backends, through the Sandbox trait exactly as the agent calls them.
    let host: Arc<dyn Sandbox> = Arc::new(paddock_agent::sandbox::host::HostSandbox::new());
    push(
        "paddock host",
        "no isolation: process group, caps, timeout",
        {
            // The host backend refuses networkMode none; time it with the default network.
            let b = host.clone();
            let scratch = dir.path().join("host");
            time_backend_net_default(&b, &scratch, runs).await
        },
    );
    let process = paddock_agent::sandbox::process::ProcessSandbox::detect(
        env!("CARGO_BIN_EXE_paddock").into(),
        dir.path().join("process-scratch"),
    );
    push(
        "paddock process",
        "mount+pid+ipc+uts+net ns, cgroup limits, Landlock, seccomp, uid 65534",
        match process {
            Ok(b) => {
                time_backend(
                    &(Arc::new(b) as Arc<dyn Sandbox>),
                    &dir.path().join("process"),
                    runs,
                )
                .await
            }
            Err(e) => Err(e),
        },
    );
    for (name, what, b) in extra_backends(dir.path()).await {
        let scratch = dir.path().join(name.replace(' ', "-"));
        push(
            &name,
            &what,
            match b {
                Ok(b) => time_backend(&b, &scratch, runs).await,
                Err(e) => Err(e),
            },
        );
    }

    // Peers.
    push(
        "bwrap",
        "bwrap --unshare-all --die-with-parent /bin/true",
        if which("bwrap") {
            time_command(
                || {
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
                },
                runs,
            )
        } else {
            Err("bwrap not installed".into())
        },
    );
    for rt in ["crun", "runc"] {
        let r = if which(rt) {
            match busybox_bundle(dir.path(), rt) {
                Ok(bundle) => {
                    let mut n = 0u64;
                    time_command(
                        || {
                            n += 1;
                            let mut c = Command::new(rt);
                            c.args(["--root"])
                                .arg(dir.path().join(format!("state-{rt}")))
                                .args(["run", "--bundle"])
                                .arg(&bundle)
                                .arg(format!("bench-{rt}-{n}"));
                            c
                        },
                        runs,
                    )
                }
                Err(e) => Err(e),
            }
        } else {
            Err(format!("{rt} not installed"))
        };
        push(
            &format!("bare {rt}"),
            &format!("{rt} run (busybox bundle, default spec)"),
            r,
        );
    }
    push(
        "docker run",
        "docker run --rm --network none paddock/busybox:test true",
        if which("docker") {
            time_command(
                || {
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
                },
                runs.min(20),
            )
        } else {
            Err("docker not installed".into())
        },
    );

    if markdown {
        println!("| contender | what it does | median ms | p90 ms | runs |");
        println!("|---|---|---:|---:|---:|");
    }
    for row in &mut rows {
        match &row.note {
            Some(note) => {
                if markdown {
                    println!(
                        "| {} | {} | n/a | n/a | 0 ({}) |",
                        row.name,
                        row.what,
                        note.replace('|', "/")
                    );
                } else {
                    println!("{:<22} unavailable: {note}", row.name);
                }
            }
            None => {
                let n = row.samples.len();
                let (median, p90) = stats(&mut row.samples);
                if markdown {
                    println!(
                        "| {} | {} | {median:.1} | {p90:.1} | {n} |",
                        row.name, row.what
                    );
                } else {
                    println!(
                        "{:<22} median {median:>7.1} ms   p90 {p90:>7.1} ms   ({n} runs)",
                        row.name
                    );
                }
            }
        }
    }
}

async fn time_backend_net_default(
    b: &Arc<dyn Sandbox>,
    scratch: &Path,
    runs: usize,
) -> Result<Vec<Duration>, String> {
    // Same as time_backend with the default network (host cannot do `none`).
    struct NetDefault(Arc<dyn Sandbox>);
    impl Sandbox for NetDefault {
        fn name(&self) -> &'static str {
            self.0.name()
        }
        fn check(
            &self,
            s: &paddock_proto::SandboxSpec,
        ) -> Result<(), paddock_agent::sandbox::SandboxError> {
            self.0.check(s)
        }
        fn run<'a>(
            &'a self,
            mut req: RunRequest,
            output: tokio::sync::mpsc::Sender<paddock_agent::sandbox::OutputChunk>,
            cancel: tokio_util::sync::CancellationToken,
        ) -> paddock_agent::sandbox::BoxFuture<
            'a,
            Result<paddock_agent::sandbox::RunOutcome, paddock_agent::sandbox::SandboxError>,
        > {
            req.network = NetworkMode::Default;
            self.0.run(req, output, cancel)
        }
    }
    time_backend(
        &(Arc::new(NetDefault(b.clone())) as Arc<dyn Sandbox>),
        scratch,
        runs,
    )
    .await
}

/// The container backends, when present on this machine.
/// (name, what it does, the backend or why it is missing).
type Contender = (String, String, Result<Arc<dyn Sandbox>, String>);

async fn extra_backends(dir: &Path) -> Vec<Contender> {
    use paddock_agent::sandbox::docker::{DockerConfig, DockerSandbox};
    use paddock_agent::sandbox::oci::{OciConfig, OciSandbox};
    let mut out: Vec<Contender> = Vec::new();
    for rt in ["crun", "runc"] {
        let cfg = OciConfig {
            runtime: Some(rt.into()),
            state_dir: dir.join(format!("oci-{rt}")),
        };
        let b = tokio::task::spawn_blocking(move || OciSandbox::detect(cfg))
            .await
            .unwrap();
        out.push((
            format!("paddock oci ({rt})"),
            format!("generated OCI spec (host root view, limits, seccomp) run by {rt}, OOM/pids counters, cleanup"),
            b.map(|b| Arc::new(b) as Arc<dyn Sandbox>),
        ));
    }
    let cfg = DockerConfig {
        image: "paddock/busybox:test".into(),
        ..DockerConfig::default()
    };
    out.push((
        "paddock docker".into(),
        "Engine API: create, attach, start, wait, inspect, remove".into(),
        DockerSandbox::connect(cfg)
            .await
            .map(|b| Arc::new(b) as Arc<dyn Sandbox>),
    ));
    out
}
