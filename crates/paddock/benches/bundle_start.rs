//! Time to the first instruction of a bundle's entrypoint, as the agent runs a `bundle.run`
//! task: from the call into `paddock_agent::bundle_run` (the runner's first step for a
//! bundle) to the first line of the entrypoint, which prints `date +%s%N`. Each sample does
//! what the runner does: create the work directory, `bundle_run::prepare` (the digest cache,
//! fetch + verify on a miss, unpack with `unpack_verified`), `bundle_run::commands`, then
//! `Sandbox::run` of `/bin/sh app/main.sh` on the backend.
//!
//! Contenders: {small ~100 KB, large ~20 MB bundle} x {`host`, `process` backend} x
//! {cache hit (the bundle already in the agent's digest cache), cold (removed from the cache
//! before each sample: fetched over loopback HTTP from a server in this process, verified
//! while streaming, then unpacked)}. Round-robin (each round runs every contender once, in
//! a new shuffled order, so all see the same machine load and no contender always follows
//! the same one), 2 warm-up rounds; median and p90.
//!
//! ```text
//! bundle_start [--runs 20] [--dir /var/tmp] [--markdown]
//! ```
//!
//! Run through `bench/bundle_start.sh` (release build, appends to `docs/BENCHMARKS.md`).
//! Needs root for the `process` backend (listed as missing otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use paddock_agent::bundle_run;
use paddock_agent::sandbox::{Limits, RunRequest, Sandbox};
use paddock_bundle::{BundleCache, Digest};
use paddock_proto::{BundleTask, NetworkMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WARMUP: usize = 2;

/// A backend by name, or why it is missing.
type Backend = (&'static str, Result<Arc<dyn Sandbox>, String>);
const CACHE_MAX_BYTES: u64 = 10 << 30;
/// The entrypoint: its first instruction reads the clock.
const ENTRYPOINT: &str = "date +%s%N\necho ok\n";

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A bundle source tree: `main.sh`, `blobs` incompressible files of `blob` bytes (assets,
/// binaries) and `texts` small source files.
fn make_tree(root: &Path, blobs: usize, blob: usize, texts: usize) -> u64 {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(root.join("main.sh"), ENTRYPOINT).unwrap();
    let mut files = 1;
    for i in 0..blobs {
        let dir = root.join(format!("assets/{:02}", i % 8));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("blob{i}.bin")), noise(blob, i as u64 + 7)).unwrap();
        files += 1;
    }
    let line =
        "export function handler(event) { return { status: 200, body: JSON.stringify(event) }; }\n";
    for i in 0..texts {
        let dir = root.join(format!("src/mod{:02}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        let text: String = (0..20 + i % 30)
            .map(|j| format!("// {i}.{j}\n{line}"))
            .collect();
        std::fs::write(dir.join(format!("f{i}.js")), text).unwrap();
        files += 1;
    }
    files
}

struct Bundle {
    name: &'static str,
    digest: Digest,
    bytes: Vec<u8>,
    files: u64,
}

fn build_bundle(dir: &Path, name: &'static str, blobs: usize, blob: usize, texts: usize) -> Bundle {
    let tree = dir.join(format!("tree-{name}"));
    let files = make_tree(&tree, blobs, blob, texts);
    let packed = paddock_bundle::pack_in(&tree, dir, 3).unwrap();
    let bytes = std::fs::read(packed.path()).unwrap();
    std::fs::remove_dir_all(&tree).unwrap();
    Bundle {
        name,
        digest: packed.digest,
        bytes,
        files,
    }
}

/// A loopback HTTP/1.1 server answering `GET /<name>` with that bundle (one request per
/// connection).
async fn serve(bundles: HashMap<String, Arc<Vec<u8>>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bundles = Arc::new(bundles);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let _ = sock.set_nodelay(true);
            let bundles = bundles.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req);
                let path = text.split(' ').nth(1).unwrap_or("/");
                let Some(body) = bundles.get(path.trim_start_matches('/')) else {
                    let _ = sock
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if sock.write_all(head.as_bytes()).await.is_ok() {
                    let _ = sock.write_all(body).await;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

struct Contender {
    bundle: usize,
    backend: &'static str,
    cold: bool,
    /// Time to the entrypoint's first instruction.
    first: Vec<Duration>,
    /// Of which: work directory + `bundle_run::prepare`.
    prepare: Vec<Duration>,
    error: Option<String>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// One sample: what the runner does for a `bundle.run` task, up to the entrypoint.
async fn sample(
    sandbox: &Arc<dyn Sandbox>,
    task: &BundleTask,
    cache_dir: &Path,
    workdir: &Path,
    i: usize,
) -> Result<(Duration, Duration), String> {
    let t0_ns = now_ns();
    let t0 = Instant::now();
    std::fs::create_dir_all(workdir).map_err(|e| e.to_string())?;
    let app = bundle_run::prepare(task, workdir, cache_dir, CACHE_MAX_BYTES)
        .await
        .map_err(|(code, msg)| format!("{code:?}: {msg}"))?;
    let prepared = t0.elapsed();
    let cmds = bundle_run::commands(task, &app);
    let inside = sandbox
        .workdir_inside()
        .map_or_else(|| workdir.display().to_string(), str::to_string);
    let req = RunRequest {
        task_id: format!("bench{i}"),
        attempt: 1,
        argv: cmds.run,
        env: BTreeMap::from([
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), inside),
            ("LANG".into(), "C.UTF-8".into()),
        ]),
        stdin: None,
        workdir: workdir.to_path_buf(),
        timeout: Duration::from_secs(60),
        kill_grace: Duration::from_millis(500),
        network: NetworkMode::Default,
        output_max_chars: 65_536,
        limits: Limits::default(),
        rootfs: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let out = sandbox
        .run(req, tx, tokio_util::sync::CancellationToken::new())
        .await
        .map_err(|e| e.to_string())?;
    drain.await.unwrap();
    if out.exit_code != Some(0) {
        return Err(format!("{out:?}"));
    }
    let first_ns: u128 = out
        .stdout
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("no timestamp in {:?}", out.stdout))?;
    let first = Duration::from_nanos(u64::try_from(first_ns.saturating_sub(t0_ns)).unwrap());
    Ok((first, prepared))
}

fn stats(samples: &[Duration]) -> (f64, f64) {
    let mut s = samples.to_vec();
    s.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(s[s.len() / 2]),
        ms(s[(s.len() * 9 / 10).min(s.len() - 1)]),
    )
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
    let runs: usize = arg("--runs").and_then(|n| n.parse().ok()).unwrap_or(20);
    let base = PathBuf::from(arg("--dir").unwrap_or_else(|| "/var/tmp".into()));
    let markdown = args.iter().any(|a| a == "--markdown");
    let dir = tempfile::Builder::new()
        .prefix("paddock-bundle-start-")
        .tempdir_in(&base)
        .unwrap();

    let bundles = [
        build_bundle(dir.path(), "small", 8, 10_000, 20),
        build_bundle(dir.path(), "large", 36, 512 * 1024, 300),
    ];
    let url = serve(
        bundles
            .iter()
            .map(|b| (b.name.to_string(), Arc::new(b.bytes.clone())))
            .collect(),
    )
    .await;

    let mut backends: Vec<Backend> = vec![(
        "host",
        Ok(Arc::new(paddock_agent::sandbox::host::HostSandbox::new()) as Arc<dyn Sandbox>),
    )];
    backends.push((
        "process",
        paddock_agent::sandbox::process::ProcessSandbox::detect(
            env!("CARGO_BIN_EXE_paddock").into(),
            dir.path().join("work"),
        )
        .map(|b| Arc::new(b) as Arc<dyn Sandbox>)
        .map_err(|e| e.to_string()),
    ));

    let mut all = Vec::new();
    for (bi, _) in bundles.iter().enumerate() {
        for (name, b) in &backends {
            for cold in [false, true] {
                all.push(Contender {
                    bundle: bi,
                    backend: name,
                    cold,
                    first: Vec::new(),
                    prepare: Vec::new(),
                    error: b.as_ref().err().cloned(),
                });
            }
        }
    }
    let tasks: Vec<BundleTask> = bundles
        .iter()
        .map(|b| BundleTask {
            url: format!("{url}/{}", b.name),
            sha256: b.digest.to_hex(),
            size: b.bytes.len() as u64,
            runtime: "shell".into(),
            entrypoint: "main.sh".into(),
            ..Default::default()
        })
        .collect();

    let mut n = 0usize;
    let mut order: Vec<usize> = (0..all.len()).collect();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..runs + WARMUP {
        // A new order each round (Fisher-Yates), so that no contender always follows the
        // same one (a `process` run after a `host` run, a small unpack after a large one).
        for i in (1..order.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        for &ci in &order {
            let c = &mut all[ci];
            if c.error.is_some() {
                continue;
            }
            let sandbox = backends
                .iter()
                .find(|(name, _)| *name == c.backend)
                .and_then(|(_, b)| b.as_ref().ok())
                .unwrap()
                .clone();
            // One cache per contender; a hit finds the bundle there (fetched in the first
            // warm-up round), a cold sample has it removed first.
            let cache_dir = dir.path().join(format!("cache{ci}"));
            let digest = bundles[c.bundle].digest;
            if c.cold && cache_dir.exists() {
                let cache = BundleCache::new(&cache_dir, CACHE_MAX_BYTES).unwrap();
                let _ = std::fs::remove_file(cache.path_of(&digest));
            }
            n += 1;
            let workdir = dir.path().join("work").join(format!("run{n}"));
            let got = sample(&sandbox, &tasks[c.bundle], &cache_dir, &workdir, n).await;
            sandbox.settle().await;
            let _ = std::fs::remove_dir_all(&workdir);
            match got {
                Ok((first, prepare)) if round >= WARMUP => {
                    c.first.push(first);
                    c.prepare.push(prepare);
                }
                Ok(_) => {}
                Err(e) => c.error = Some(e),
            }
        }
    }

    if markdown {
        for b in &bundles {
            println!(
                "- `{}`: {:.1} KB bundle, {} files",
                b.name,
                b.bytes.len() as f64 / 1000.0,
                b.files
            );
        }
        println!();
        println!(
            "| bundle | backend | bundle in the digest cache | to first instruction: median ms | p90 ms | of which prepare (fetch, verify, unpack): median ms | runs |"
        );
        println!("|---|---|---|---:|---:|---:|---:|");
    }
    for c in &all {
        let b = &bundles[c.bundle];
        let cache = if c.cold {
            "no: fetched over loopback HTTP"
        } else {
            "yes (hit)"
        };
        match (&c.error, c.first.is_empty()) {
            (Some(e), _) => {
                let e = e.replace('|', "/");
                if markdown {
                    println!(
                        "| {} | {} | {cache} | missing: {e} | | | 0 |",
                        b.name, c.backend
                    );
                } else {
                    println!("{} {} {cache}: missing: {e}", b.name, c.backend);
                }
            }
            (None, true) => println!("{} {} {cache}: no samples", b.name, c.backend),
            (None, false) => {
                let (median, p90) = stats(&c.first);
                let (prep, _) = stats(&c.prepare);
                if markdown {
                    println!(
                        "| {} | {} | {cache} | {median:.1} | {p90:.1} | {prep:.1} | {} |",
                        b.name,
                        c.backend,
                        c.first.len()
                    );
                } else {
                    println!(
                        "{} {} {cache}: median {median:.1} ms, p90 {p90:.1} ms (prepare {prep:.1} ms), {} runs",
                        b.name,
                        c.backend,
                        c.first.len()
                    );
                }
            }
        }
    }
}
