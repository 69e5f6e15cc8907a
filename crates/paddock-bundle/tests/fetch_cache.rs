//! Fetching into the cache over real HTTP (a local server on 127.0.0.1): verification,
//! resume, servers that ignore ranges, one download for concurrent fetchers (threads and
//! processes), and the cache's LRU eviction under its cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;

use common::noise;
use common::server::TestServer;
use paddock_bundle::{BundleCache, Digest, Progress, fetch};

fn cache_in(dir: &std::path::Path) -> BundleCache {
    BundleCache::new(dir, 1 << 30).unwrap()
}

#[tokio::test]
async fn fetch_verifies_caches_and_reports_progress() {
    let srv = TestServer::start().await;
    let data = noise(3 << 20, 1);
    let digest = Digest::of(&data);
    let url = srv.add("b", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path());
    let mut seen = Vec::new();
    let got = fetch(&url, &digest, &cache, &mut |p| seen.push(p))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(got.size, data.len() as u64);
    assert_eq!(got.path, cache.path_of(&digest));
    let total = Some(data.len() as u64);
    assert_eq!(seen.first().copied(), Some(Progress { done: 0, total }));
    assert_eq!(
        seen.last().copied(),
        Some(Progress {
            done: data.len() as u64,
            total
        })
    );
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
    assert!(!cache.partial_path(&digest).exists());
    // A second fetch is a cache hit: no request.
    fetch(&url, &digest, &cache, &mut |_| {}).await.unwrap();
    assert_eq!(srv.gets(), 1);
}

#[tokio::test]
async fn wrong_hash_is_refused_and_the_partial_deleted() {
    let srv = TestServer::start().await;
    let data = noise(100_000, 2);
    let url = srv.add("b", data);
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path());
    let wrong = Digest::of(b"not this");
    let err = fetch(&url, &wrong, &cache, &mut |_| {}).await.unwrap_err();
    assert_eq!(err.code(), "BUNDLE_HASH_MISMATCH");
    assert!(!cache.partial_path(&wrong).exists());
    assert!(!cache.contains(&wrong));
    assert!(cache.entries().unwrap().is_empty());
}

#[tokio::test]
async fn http_errors_are_download_failures_without_the_query_string() {
    let srv = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path());
    let url = format!("{}/f/missing?X-Amz-Signature=sekret", srv.base);
    let err = fetch(&url, &Digest::of(b"x"), &cache, &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "BUNDLE_DOWNLOAD_FAILED");
    let msg = err.to_string();
    assert!(msg.contains("404"), "{msg}");
    assert!(!msg.contains("sekret"), "{msg}");
    // Nothing listening.
    let err = fetch(
        "http://127.0.0.1:9/x?sig=sekret",
        &Digest::of(b"x"),
        &cache,
        &mut |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), "BUNDLE_DOWNLOAD_FAILED");
    assert!(!err.to_string().contains("sekret"), "{err}");
}

#[tokio::test]
async fn interrupted_download_resumes_with_a_range_request() {
    let srv = TestServer::start().await;
    let data = noise(4 << 20, 3);
    let digest = Digest::of(&data);
    let url = srv.add("b", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path());
    *srv.shared.cut_after.lock().unwrap() = Some(1 << 20);
    let err = fetch(&url, &digest, &cache, &mut |_| {}).await.unwrap_err();
    assert_eq!(err.code(), "BUNDLE_DOWNLOAD_FAILED");
    let kept = std::fs::metadata(cache.partial_path(&digest))
        .unwrap()
        .len();
    assert!(kept > 0 && kept <= 1 << 20, "{kept}");
    let mut first = None;
    let got = fetch(&url, &digest, &cache, &mut |p| {
        first.get_or_insert(p);
    })
    .await
    .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(srv.ranges(), vec![None, Some(format!("bytes={kept}-"))]);
    assert_eq!(
        first.unwrap().done,
        kept,
        "resumed from the partial's length"
    );
    assert!(!cache.partial_path(&digest).exists());
}

#[tokio::test]
async fn server_ignoring_range_gets_a_full_download() {
    let srv = TestServer::start().await;
    srv.shared.ignore_range.store(true, Ordering::SeqCst);
    let data = noise(1 << 20, 4);
    let digest = Digest::of(&data);
    let url = srv.add("b", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path());
    std::fs::write(cache.partial_path(&digest), &data[..1000]).unwrap();
    let got = fetch(&url, &digest, &cache, &mut |_| {}).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(srv.ranges(), vec![Some("bytes=1000-".to_string())]);
}

#[tokio::test]
async fn corrupt_partial_is_discarded_and_downloaded_again() {
    let srv = TestServer::start().await;
    let data = noise(1 << 20, 5);
    let digest = Digest::of(&data);
    let url = srv.add("b", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_in(dir.path());
    std::fs::write(cache.partial_path(&digest), vec![0xAA; 5000]).unwrap();
    let got = fetch(&url, &digest, &cache, &mut |_| {}).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(srv.ranges(), vec![Some("bytes=5000-".to_string()), None]);
    // A partial as long as the whole file (416 from the server) but wrong: same story.
    let data2 = noise(10_000, 6);
    let d2 = Digest::of(&data2);
    let url2 = srv.add("c", data2.clone());
    std::fs::write(cache.partial_path(&d2), vec![1; 10_000]).unwrap();
    let got = fetch(&url2, &d2, &cache, &mut |_| {}).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fetches_of_one_digest_download_once() {
    let srv = TestServer::start().await;
    srv.shared.delay_ms.store(300, Ordering::SeqCst);
    let data = noise(2 << 20, 7);
    let digest = Digest::of(&data);
    let url = srv.add("b", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        // A cache handle each, as separate agents would have.
        let cache = cache_in(dir.path());
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let got = fetch(&url, &digest, &cache, &mut |_| {}).await.unwrap();
            std::fs::read(&got.path).unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), data);
    }
    assert_eq!(srv.gets(), 1);
}

/// Run by `concurrent_fetches_across_processes` in child processes.
#[tokio::test]
#[ignore = "helper: run as a child process by concurrent_fetches_across_processes"]
async fn child_fetch_helper() {
    let Ok(url) = std::env::var("PADDOCK_TEST_CHILD_URL") else {
        return;
    };
    let digest: Digest = std::env::var("PADDOCK_TEST_CHILD_DIGEST")
        .unwrap()
        .parse()
        .unwrap();
    let cache = cache_in(std::path::Path::new(
        &std::env::var("PADDOCK_TEST_CHILD_CACHE").unwrap(),
    ));
    let got = fetch(&url, &digest, &cache, &mut |_| {}).await.unwrap();
    assert_eq!(Digest::of(&std::fs::read(&got.path).unwrap()), digest);
    let marks = std::env::var("PADDOCK_TEST_CHILD_MARKS").unwrap();
    std::fs::write(format!("{marks}/{}", std::process::id()), b"ok").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_across_processes() {
    let srv = TestServer::start().await;
    srv.shared.delay_ms.store(500, Ordering::SeqCst);
    let data = noise(1 << 20, 8);
    let digest = Digest::of(&data);
    let url = srv.add("b", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let marks = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    for _ in 0..3 {
        children.push(
            tokio::process::Command::new(&exe)
                .args([
                    "child_fetch_helper",
                    "--exact",
                    "--ignored",
                    "--test-threads=1",
                ])
                .env("PADDOCK_TEST_CHILD_URL", &url)
                .env("PADDOCK_TEST_CHILD_DIGEST", digest.to_hex())
                .env("PADDOCK_TEST_CHILD_CACHE", dir.path())
                .env("PADDOCK_TEST_CHILD_MARKS", marks.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let cache = cache_in(dir.path());
    let got = fetch(&url, &digest, &cache, &mut |_| {}).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    for mut c in children {
        assert!(c.wait().await.unwrap().success());
    }
    // Every child really ran its fetch (and verified it).
    assert_eq!(std::fs::read_dir(marks.path()).unwrap().count(), 3);
    assert_eq!(srv.gets(), 1);
}

#[tokio::test]
async fn lru_eviction_keeps_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let cache = BundleCache::new(dir.path(), 3000).unwrap();
    let mut digests = Vec::new();
    for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let data = noise(1000, 100 + i as u64);
        let p = src.path().join(name);
        std::fs::write(&p, &data).unwrap();
        digests.push((Digest::of(&data), p));
    }
    let [a, b, c, d, e] = [0, 1, 2, 3, 4].map(|i| digests[i].clone());
    for x in [&a, &b, &c] {
        cache.insert_file(&x.0, &x.1).await.unwrap();
        assert!(cache.total_size().unwrap() <= 3000);
    }
    // Using a makes b the least recently used.
    assert!(cache.get(&a.0).unwrap().is_some());
    cache.insert_file(&d.0, &d.1).await.unwrap();
    assert!(cache.total_size().unwrap() <= 3000);
    let present: Vec<Digest> = cache.entries().unwrap().iter().map(|e| e.digest).collect();
    assert_eq!(present, vec![c.0, a.0, d.0], "LRU order, b evicted");
    // Then c goes.
    cache.insert_file(&e.0, &e.1).await.unwrap();
    let present: Vec<Digest> = cache.entries().unwrap().iter().map(|e| e.digest).collect();
    assert_eq!(present, vec![a.0, d.0, e.0]);
    assert!(cache.total_size().unwrap() <= 3000);
    // A bundle larger than the whole cap is kept (it is needed now), everything else goes.
    let big = noise(5000, 999);
    let bp = src.path().join("big");
    std::fs::write(&bp, &big).unwrap();
    let bd = Digest::of(&big);
    let got = cache.insert_file(&bd, &bp).await.unwrap();
    assert_eq!(got.size, 5000);
    let present: Vec<Digest> = cache.entries().unwrap().iter().map(|e| e.digest).collect();
    assert_eq!(present, vec![bd]);
    // Inserting a file under the wrong digest is refused.
    let err = cache
        .insert_file(&Digest::of(b"zz"), &bp)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "BUNDLE_HASH_MISMATCH");
    assert!(!cache.contains(&Digest::of(b"zz")));
}
