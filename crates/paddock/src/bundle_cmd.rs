//! `paddock bundle push|fetch`: workflow bundles (seed 001).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Api, ApiArgs, decode};

/// Workflow bundles: content-addressed archives of a directory, run by `POST /api/spawn`.
///
/// Examples:
///   paddock bundle push ./my-flow --workflow nightly --runtime node --entrypoint index.js
///   paddock bundle fetch "$BUNDLE_URL" "$BUNDLE_HASH" /opt/workflow
#[derive(Debug, Subcommand)]
pub(crate) enum BundleCommand {
    /// Pack DIR (deterministic tar + zstd), upload it unless the gateway already has it, and
    /// make it the workflow's current version.
    Push(PushArgs),
    /// Download a bundle (resuming), verify its SHA-256, cache it, and unpack it into DEST
    /// (which must not exist). The stand-in for the seed's `bundle-fetch.sh`.
    Fetch(FetchArgs),
}

#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The directory to pack.
    dir: PathBuf,
    /// Workflow id (letters, digits, `-`, `_`, `.`).
    #[arg(long)]
    workflow: String,
    /// How to run it.
    #[arg(long, value_parser = ["node", "python", "shell", "binary"])]
    runtime: String,
    /// Entrypoint, relative to DIR.
    #[arg(long)]
    entrypoint: String,
    /// Pack and print the digest; upload nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct FetchArgs {
    /// Bundle URL (a presigned or signed URL: it is never printed).
    url: String,
    /// Expected SHA-256 (hex).
    hash: String,
    /// Where to unpack (must not exist).
    dest: PathBuf,
    /// Cache directory.
    #[arg(long, env = "PADDOCK_AGENT_BUNDLE_CACHE", default_value = paddock_bundle::DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Cache size cap in MiB (least recently used bundles are evicted).
    #[arg(long, env = "PADDOCK_AGENT_BUNDLE_CACHE_MAX_MB", default_value_t = 10 * 1024)]
    cache_max_mb: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// A progress line on stderr at most every 10 %.
fn progress_printer(what: &'static str) -> impl FnMut(u64, Option<u64>) {
    let mut last = None::<u64>;
    move |done, total| {
        let Some(total) = total.filter(|t| *t > 0) else {
            return;
        };
        let pct = done.saturating_mul(100) / total;
        if last.is_none_or(|l| pct >= l + 10 || (pct == 100 && l != 100)) {
            eprint!("\r{what}: {pct:>3}% ({done} of {total} bytes)");
            if pct == 100 {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
            last = Some(pct);
        }
    }
}

pub(crate) async fn run(cmd: BundleCommand) -> anyhow::Result<i32> {
    match cmd {
        BundleCommand::Push(a) => push(a).await,
        BundleCommand::Fetch(a) => fetch(a).await,
    }
}

async fn push(a: PushArgs) -> anyhow::Result<i32> {
    if !a.dir.join(&a.entrypoint).is_file() {
        anyhow::bail!(
            "entrypoint {} is not a file inside {}",
            a.entrypoint,
            a.dir.display()
        );
    }
    let dir = a.dir.clone();
    let packed = tokio::task::spawn_blocking(move || paddock_bundle::pack(&dir))
        .await?
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    let digest = packed.digest.to_hex();
    if a.dry_run {
        let v = json!({"digest": digest, "size": packed.size, "entries": packed.entries, "uploaded": false, "dryRun": true});
        print_result(&v, a.json);
        return Ok(0);
    }
    let api = Api::connect(&a.api).await?;
    let path = api.org_path(&format!("/bundles/{digest}"));
    let have = api.builder(Method::GET, &path).send().await?;
    let uploaded = if have.status().is_success() {
        eprintln!("bundle {digest} is already on the gateway: nothing uploaded");
        false
    } else {
        let file = tokio::fs::File::open(packed.path()).await?;
        let total = packed.size;
        let mut show = progress_printer("upload");
        let mut done = 0u64;
        let stream = tokio_util::io::ReaderStream::new(file).map(move |chunk| {
            if let Ok(c) = &chunk {
                done += c.len() as u64;
                show(done, Some(total));
            }
            chunk
        });
        let resp = api
            .builder(Method::PUT, &path)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", total)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .context("uploading the bundle")?;
        decode(resp).await?;
        true
    };
    let v = api
        .request(
            Method::POST,
            &api.org_path(&format!("/workflows/{}/versions", a.workflow)),
            Some(&json!({"digest": digest, "runtime": a.runtime, "entrypoint": a.entrypoint})),
        )
        .await?;
    let mut out = v.clone();
    out["uploaded"] = Value::Bool(uploaded);
    out["entries"] = json!(packed.entries);
    print_result(&out, a.json);
    Ok(0)
}

fn print_result(v: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    for (k, val) in v.as_object().into_iter().flatten() {
        match val {
            Value::String(s) => println!("{k}: {s}"),
            other => println!("{k}: {other}"),
        }
    }
}

async fn fetch(a: FetchArgs) -> anyhow::Result<i32> {
    let digest: paddock_bundle::Digest = a
        .hash
        .parse()
        .map_err(|e: paddock_bundle::BundleError| anyhow::anyhow!("{}: {e}", e.code()))?;
    let cache = paddock_bundle::BundleCache::new(&a.cache_dir, a.cache_max_mb.max(1) << 20)
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    let mut show = progress_printer("download");
    let cached = paddock_bundle::fetch(&a.url, &digest, &cache, &mut |p| show(p.done, p.total))
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    let dest = a.dest.clone();
    let file = cached.file;
    let stats = tokio::task::spawn_blocking(move || {
        paddock_bundle::unpack_verified(file, &digest, &dest, &Default::default())
    })
    .await?
    .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    let v = json!({
        "digest": digest.to_hex(),
        "dest": a.dest.display().to_string(),
        "entries": stats.entries,
        "files": stats.files,
        "bytes": stats.bytes,
    });
    print_result(&v, a.json);
    Ok(0)
}
