//! Verify + unpack throughput of a ~200 MB bundle: `paddock_bundle::unpack_verified` (one
//! streaming pass: SHA-256 of the compressed bytes, zstd, tar, checks, writes) against
//! `sha256sum` followed by `tar --zstd -xf` on the same file (two passes), plus the time to
//! pack the tree. Run through `bench/bundle.sh`, which appends the table to
//! `docs/BENCHMARKS.md`.
//!
//! ```text
//! unpack [--size-mb 200] [--runs 5] [--dir /var/tmp] [--markdown]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use paddock_bundle::{Digest, UnpackLimits, pack_in, unpack_verified};

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

/// A source tree: mostly incompressible files (binaries, assets) and some text, in nested
/// directories, sized so the bundle is about `mb` MB.
fn make_tree(root: &Path, mb: usize) -> (u64, u64) {
    let mut files = 0u64;
    let mut bytes = 0u64;
    let big = 512 * 1024;
    let n_big = mb * 1_000_000 / big;
    for i in 0..n_big {
        let dir = root.join(format!("assets/{:02}", i % 16));
        std::fs::create_dir_all(&dir).unwrap();
        let data = noise(big, i as u64 + 1);
        std::fs::write(dir.join(format!("blob{i}.bin")), &data).unwrap();
        files += 1;
        bytes += data.len() as u64;
    }
    let line = b"export function handler(event) { return { status: 200, body: JSON.stringify(event) }; }\n";
    for i in 0..2000 {
        let dir = root.join(format!("src/mod{:02}", i % 40));
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = Vec::new();
        for j in 0..(20 + i % 50) {
            text.extend_from_slice(format!("// {i}.{j}\n").as_bytes());
            text.extend_from_slice(line);
        }
        std::fs::write(dir.join(format!("f{i}.js")), &text).unwrap();
        files += 1;
        bytes += text.len() as u64;
    }
    (files, bytes)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut size_mb = 200usize;
    let mut runs = 5usize;
    let mut markdown = false;
    let mut base = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mb" => size_mb = args.next().unwrap().parse().unwrap(),
            "--runs" => runs = args.next().unwrap().parse().unwrap(),
            "--dir" => base = args.next().unwrap().into(),
            "--markdown" => markdown = true,
            "--bench" => {}
            _ => {}
        }
    }
    let work = tempfile::Builder::new()
        .prefix("paddock-bundle-bench-")
        .tempdir_in(&base)
        .unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let (files, tree_bytes) = make_tree(&tree, size_mb);

    let mut pack_times = Vec::new();
    let mut packed = None;
    for _ in 0..runs.min(3) {
        let t = Instant::now();
        let p = pack_in(&tree, work.path(), 3).unwrap();
        pack_times.push(t.elapsed());
        packed = Some(p);
    }
    let packed = packed.unwrap();
    let bundle = packed.path().to_path_buf();
    let size = packed.size;
    let digest: Digest = packed.digest;
    eprintln!(
        "tree: {files} files, {:.1} MB; bundle {:.1} MB, sha256 {digest}",
        tree_bytes as f64 / 1e6,
        size as f64 / 1e6
    );

    let limits = UnpackLimits::default();
    let run_dir = work.path().join("runs");
    std::fs::create_dir(&run_dir).unwrap();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..=runs {
        // Alternate, one warm-up round each (page cache warm for both).
        let dest = run_dir.join(format!("ours{i}"));
        let t = Instant::now();
        let f = std::fs::File::open(&bundle).unwrap();
        unpack_verified(
            std::io::BufReader::with_capacity(1 << 20, f),
            &digest,
            &dest,
            &limits,
        )
        .unwrap();
        let el = t.elapsed();
        std::fs::remove_dir_all(&dest).unwrap();
        if i > 0 {
            ours.push(el);
        }

        let dest = run_dir.join(format!("theirs{i}"));
        std::fs::create_dir(&dest).unwrap();
        let t = Instant::now();
        let out = Command::new("sha256sum").arg(&bundle).output().unwrap();
        assert!(out.status.success());
        let sum = String::from_utf8_lossy(&out.stdout);
        assert!(sum.starts_with(&digest.to_hex()));
        let st = Command::new("tar")
            .arg("--zstd")
            .arg("-xf")
            .arg(&bundle)
            .arg("-C")
            .arg(&dest)
            .status()
            .unwrap();
        assert!(st.success());
        let el = t.elapsed();
        std::fs::remove_dir_all(&dest).unwrap();
        if i > 0 {
            theirs.push(el);
        }
    }
    let rows = [
        (
            "paddock `unpack_verified` (one pass: sha256 + zstd + tar + checks)",
            median(ours),
        ),
        (
            "`sha256sum` then `tar --zstd -xf` (two passes)",
            median(theirs),
        ),
        (
            "paddock `pack_in` (tree to bundle, zstd level 3)",
            median(pack_times),
        ),
    ];
    let mb = size as f64 / 1e6;
    if markdown {
        println!(
            "Bundle: {:.1} MB ({files} files, {:.1} MB unpacked), median of {runs} runs.\n",
            mb,
            tree_bytes as f64 / 1e6
        );
        println!("| contender | median s | bundle MB/s |");
        println!("|---|---:|---:|");
        for (name, d) in rows {
            println!(
                "| {name} | {:.3} | {:.0} |",
                d.as_secs_f64(),
                mb / d.as_secs_f64()
            );
        }
    } else {
        for (name, d) in rows {
            println!(
                "{name}: {:.3} s, {:.0} MB/s",
                d.as_secs_f64(),
                mb / d.as_secs_f64()
            );
        }
    }
}
