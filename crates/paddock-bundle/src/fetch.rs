//! Downloading a bundle by URL into the cache: resumable, verified while streaming, once per
//! digest however many fetchers ask at the same time.
//!
//! 1. A cache hit returns at once.
//! 2. Otherwise the per-digest lock is taken (another fetcher of the same digest, in this or
//!    another process, finishes first and this one then finds it cached).
//! 3. A partial file from an earlier, interrupted attempt is hashed and the rest requested
//!    with `Range: bytes=<len>-`. A server that ignores the range (`200`) gets a full
//!    download from zero; one that answers `416` has nothing more to give, so the partial is
//!    checked as it is.
//! 4. Every byte received is hashed as it is written. A wrong digest deletes the partial and
//!    fails `BUNDLE_HASH_MISMATCH` (after one clean retry from zero if the attempt had resumed,
//!    in case the old partial was the bad part). A broken connection keeps the partial for
//!    the next attempt: `BUNDLE_DOWNLOAD_FAILED`.
//! 5. The verified file is renamed into the cache, which then evicts down to its cap.

use std::io::SeekFrom;
use std::path::Path;
use std::sync::OnceLock;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::cache::{BundleCache, CachedBundle};
use crate::digest::{Digest, Hasher};
use crate::error::{BundleError, redact_url};

/// How far a download has got, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the bundle present so far (resumed bytes included).
    pub done: u64,
    /// The bundle's size, when the server said.
    pub total: Option<u64>,
}

/// A progress callback; called after each chunk.
pub type ProgressFn<'a> = &'a mut (dyn FnMut(Progress) + Send);

fn default_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap_or_default()
    })
}

/// Fetches the bundle `expected` from `url` (HTTP or HTTPS) into `cache` and returns it
/// opened. See the module docs for the steps.
pub async fn fetch(
    url: &str,
    expected: &Digest,
    cache: &BundleCache,
    progress: ProgressFn<'_>,
) -> Result<CachedBundle, BundleError> {
    fetch_with(default_client(), url, expected, cache, progress).await
}

/// [`fetch`] with a caller-provided HTTP client (TLS roots, proxies, timeouts).
pub async fn fetch_with(
    client: &reqwest::Client,
    url: &str,
    expected: &Digest,
    cache: &BundleCache,
    progress: ProgressFn<'_>,
) -> Result<CachedBundle, BundleError> {
    if let Some(hit) = cache.get(expected)? {
        progress(Progress {
            done: hit.size,
            total: Some(hit.size),
        });
        return Ok(hit);
    }
    let _lock = cache.lock_digest(expected).await?;
    if let Some(hit) = cache.get(expected)? {
        progress(Progress {
            done: hit.size,
            total: Some(hit.size),
        });
        return Ok(hit);
    }
    let partial = cache.partial_path(expected);
    let resumed = partial_len(&partial).await > 0;
    match download(client, url, expected, &partial, progress).await {
        // The old partial may have been the bad part: one clean attempt from zero (the
        // mismatch deleted it).
        Err(BundleError::HashMismatch { .. }) if resumed => {
            tracing::warn!(
                url = %redact_url(url),
                digest = %expected,
                "resumed download did not verify; downloading again from the start"
            );
            download(client, url, expected, &partial, progress).await?;
        }
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    cache.commit(expected, &partial)
}

async fn partial_len(partial: &Path) -> u64 {
    tokio::fs::metadata(partial).await.map_or(0, |m| m.len())
}

fn download_err(url: &str, reason: impl Into<String>) -> BundleError {
    BundleError::Download {
        url: redact_url(url),
        reason: reason.into(),
    }
}

/// Parses `Content-Range: bytes START-END/TOTAL` into (START, TOTAL).
fn content_range(resp: &reqwest::Response) -> Option<(u64, Option<u64>)> {
    let v = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// One download attempt into `partial`, resuming from its current length. On success the
/// partial holds exactly the bundle `expected`.
async fn download(
    client: &reqwest::Client,
    url: &str,
    expected: &Digest,
    partial: &Path,
    progress: ProgressFn<'_>,
) -> Result<(), BundleError> {
    let io_err = |what: &str, e| BundleError::io(format!("{what} {}", partial.display()), e);
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(partial)
        .await
        .map_err(|e| io_err("open", e))?;
    let mut have = file.metadata().await.map_err(|e| io_err("stat", e))?.len();
    let mut hasher = Hasher::new();
    if have > 0 {
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = have;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = file
                .read(&mut buf[..want])
                .await
                .map_err(|e| io_err("read", e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
    }
    let resumed = have > 0;

    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| download_err(url, e.without_url().to_string()))?;
    let status = resp.status();
    let mut total: Option<u64>;
    if resumed && status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        // Nothing past what we hold: the partial is either the whole bundle or junk.
        drop(resp);
        file.sync_all().await.map_err(|e| io_err("sync", e))?;
        return finish(hasher, expected, partial, have, Some(have), progress).await;
    } else if resumed && status == reqwest::StatusCode::PARTIAL_CONTENT {
        match content_range(&resp) {
            Some((start, t)) if start == have => total = t,
            _ => {
                return Err(download_err(
                    url,
                    "206 response does not continue from the partial file",
                ));
            }
        }
    } else if status.is_success() && status != reqwest::StatusCode::PARTIAL_CONTENT {
        if resumed {
            tracing::debug!(
                url = %redact_url(url),
                "server ignored the range request; downloading from the start"
            );
            file.set_len(0).await.map_err(|e| io_err("truncate", e))?;
            hasher = Hasher::new();
            have = 0;
        }
        total = resp.content_length();
    } else {
        return Err(download_err(url, format!("HTTP {status}")));
    }
    if total.is_none() {
        total = resp.content_length().map(|l| l + have);
    }
    file.seek(SeekFrom::Start(have))
        .await
        .map_err(|e| io_err("seek", e))?;
    progress(Progress { done: have, total });
    let mut stream = resp.bytes_stream();
    let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // Keep what we have for the next attempt.
                let _ = writer.flush().await;
                return Err(download_err(
                    url,
                    format!("interrupted after {have} bytes: {}", e.without_url()),
                ));
            }
        };
        writer
            .write_all(&chunk)
            .await
            .map_err(|e| io_err("write", e))?;
        hasher.update(&chunk);
        have += chunk.len() as u64;
        progress(Progress { done: have, total });
    }
    writer.flush().await.map_err(|e| io_err("flush", e))?;
    writer
        .get_ref()
        .sync_all()
        .await
        .map_err(|e| io_err("sync", e))?;
    finish(hasher, expected, partial, have, total, progress).await
}

async fn finish(
    hasher: Hasher,
    expected: &Digest,
    partial: &Path,
    have: u64,
    total: Option<u64>,
    progress: ProgressFn<'_>,
) -> Result<(), BundleError> {
    let got = hasher.finish();
    if let Err(e) = got.check(expected) {
        let _ = tokio::fs::remove_file(partial).await;
        return Err(e);
    }
    progress(Progress { done: have, total });
    Ok(())
}
