//! One contract for every object store: each case runs on the local directory store and on
//! a real S3 server (s3s-fs, started by `scripts/test.sh`, which exports
//! `PADDOCK_TEST_S3_URL` and the `AWS_*` keys). Without `PADDOCK_TEST_S3_URL` the S3 half is
//! skipped with a printed reason, except under `CI=true`, where it fails.
//!
//! For the local store, the gateway's signed URL is stood in for by a small HTTP server
//! serving the file [`BundleStore::locate`] names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::noise;
use common::server::TestServer;
use futures_util::StreamExt;
use paddock_bundle::{
    BundleCache, BundleLocation, BundleStore, Digest, PutOutcome, StoreBackend, UnpackLimits,
    fetch, pack_in, unpack_verified,
};

/// The S3 store under test, or `None` (skipped) outside CI without a server.
fn s3_store() -> Option<BundleStore> {
    let Ok(url) = std::env::var("PADDOCK_TEST_S3_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!(
                "PADDOCK_TEST_S3_URL is not set under CI: run the tests through scripts/test.sh"
            );
        }
        eprintln!("skipping S3 case: PADDOCK_TEST_S3_URL is not set (scripts/test.sh sets it)");
        return None;
    };
    Some(BundleStore::from_url(&url).expect("PADDOCK_TEST_S3_URL"))
}

struct Local {
    _dir: tempfile::TempDir,
    store: BundleStore,
}

fn local_store() -> Local {
    let dir = tempfile::tempdir().unwrap();
    let store = BundleStore::from_url(&format!("file://{}", dir.path().display())).unwrap();
    Local { _dir: dir, store }
}

/// Runs `case` on both stores.
macro_rules! contract {
    ($name:ident) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn local() {
                let l = local_store();
                super::$name(&l.store).await;
            }

            #[tokio::test]
            async fn s3() {
                if let Some(s) = s3_store() {
                    super::$name(&s).await;
                }
            }
        }
    };
}

/// A fresh bundle file (unique content per call, so cases never share a key).
fn bundle(size: usize) -> (tempfile::NamedTempFile, Digest, Vec<u8>) {
    let seed = u64::from(std::process::id()) << 32
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    let data = noise(size, seed);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &data).unwrap();
    (f, Digest::of(&data), data)
}

async fn read_all(store: &BundleStore, d: &Digest) -> Vec<u8> {
    let mut s = store.get(d).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// A URL a fetcher can use: presigned on S3, served by a stand-in gateway for the local store.
async fn fetch_url(store: &BundleStore, d: &Digest, gateway: &TestServer) -> String {
    match store.locate(d, Duration::from_secs(300)).await.unwrap() {
        BundleLocation::Presigned { url, .. } => {
            assert!(matches!(store.backend(), StoreBackend::S3 { .. }));
            assert!(url.contains("X-Amz-Signature="), "not presigned");
            url
        }
        BundleLocation::Local { path, key } => {
            assert!(matches!(store.backend(), StoreBackend::Local { .. }));
            assert_eq!(key, store.key(d));
            gateway.add(&d.to_hex(), std::fs::read(path).unwrap())
        }
    }
}

async fn put_get_round_trip(store: &BundleStore) {
    let (f, d, data) = bundle(11 << 20); // more than one multipart part
    assert_eq!(store.head(&d).await.unwrap(), None);
    let mut last = None;
    let out = store
        .put_file(f.path(), &d, &mut |p| last = Some(p))
        .await
        .unwrap();
    assert_eq!(
        out,
        PutOutcome::Uploaded {
            bytes: data.len() as u64
        }
    );
    assert_eq!(last.unwrap().done, data.len() as u64);
    assert_eq!(store.head(&d).await.unwrap(), Some(data.len() as u64));
    assert_eq!(read_all(store, &d).await, data);
    assert_eq!(
        store.key(&d),
        format!("bundles/sha256/{}.tar.zst", d.to_hex())
    );
    store.delete(&d).await.unwrap();
    assert_eq!(store.head(&d).await.unwrap(), None);
    let err = store.get(&d).await.err().unwrap();
    assert_eq!(err.code(), "BUNDLE_NOT_FOUND");
    store.delete(&d).await.unwrap();
}
contract!(put_get_round_trip);

async fn put_is_idempotent(store: &BundleStore) {
    // Re-pushing an identical tree uploads nothing.
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("main.sh"), noise(1000, rand_seed())).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let p1 = pack_in(tree.path(), out_dir.path(), 3).unwrap();
    let first = store
        .put_file(p1.path(), &p1.digest, &mut |_| {})
        .await
        .unwrap();
    assert!(matches!(first, PutOutcome::Uploaded { .. }));
    let p2 = pack_in(tree.path(), out_dir.path(), 3).unwrap();
    assert_eq!(p2.digest, p1.digest);
    let second = store
        .put_file(p2.path(), &p2.digest, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(second, PutOutcome::AlreadyPresent { size: p1.size });
    store.delete(&p1.digest).await.unwrap();
}
contract!(put_is_idempotent);

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn put_of_a_file_that_is_not_its_digest_stores_nothing(store: &BundleStore) {
    let (f, _, _) = bundle(10_000);
    let claimed = Digest::of(format!("other {}", rand_seed()).as_bytes());
    let err = store
        .put_file(f.path(), &claimed, &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "BUNDLE_HASH_MISMATCH");
    assert_eq!(store.head(&claimed).await.unwrap(), None);
}
contract!(put_of_a_file_that_is_not_its_digest_stores_nothing);

async fn located_url_fetches_and_resumes(store: &BundleStore) {
    let gateway = TestServer::start().await;
    let (f, d, data) = bundle(3 << 20);
    store.put_file(f.path(), &d, &mut |_| {}).await.unwrap();
    let url = fetch_url(store, &d, &gateway).await;
    // Full fetch.
    let c1 = tempfile::tempdir().unwrap();
    let cache = BundleCache::new(c1.path(), 1 << 30).unwrap();
    let got = fetch(&url, &d, &cache, &mut |_| {}).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    // Resume from a partial file: the first progress report starts at its length.
    let c2 = tempfile::tempdir().unwrap();
    let cache2 = BundleCache::new(c2.path(), 1 << 30).unwrap();
    std::fs::write(cache2.partial_path(&d), &data[..1 << 20]).unwrap();
    let mut first = None;
    let got = fetch(&url, &d, &cache2, &mut |p| {
        first.get_or_insert(p);
    })
    .await
    .unwrap();
    assert_eq!(
        first.unwrap().done,
        1 << 20,
        "download resumed from the partial"
    );
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    // And straight from the store.
    let c3 = tempfile::tempdir().unwrap();
    let cache3 = BundleCache::new(c3.path(), 1 << 30).unwrap();
    let got = store.fetch_into_cache(&d, &cache3).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    store.delete(&d).await.unwrap();
    let err = store.locate(&d, Duration::from_secs(60)).await.unwrap_err();
    assert_eq!(err.code(), "BUNDLE_NOT_FOUND");
}
contract!(located_url_fetches_and_resumes);

async fn tampered_object_is_refused(store: &BundleStore) {
    let gateway = TestServer::start().await;
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("run.sh"), noise(50_000, rand_seed())).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let p = pack_in(tree.path(), out_dir.path(), 3).unwrap();
    store
        .put_file(p.path(), &p.digest, &mut |_| {})
        .await
        .unwrap();
    // Someone rewrites the stored object (same size, one byte flipped).
    let mut bytes = std::fs::read(p.path()).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    let key = object_store::path::Path::from(store.key(&p.digest));
    store.object_store().put(&key, bytes.into()).await.unwrap();
    let url = fetch_url(store, &p.digest, &gateway).await;
    let c = tempfile::tempdir().unwrap();
    let cache = BundleCache::new(c.path(), 1 << 30).unwrap();
    let err = fetch(&url, &p.digest, &cache, &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "BUNDLE_HASH_MISMATCH");
    assert!(!cache.partial_path(&p.digest).exists(), "partial deleted");
    assert!(!cache.contains(&p.digest));
    let err = store.fetch_into_cache(&p.digest, &cache).await.unwrap_err();
    assert_eq!(err.code(), "BUNDLE_HASH_MISMATCH");
    assert!(!cache.partial_path(&p.digest).exists());
    // Unpacking the tampered stream directly is refused too, leaving nothing.
    let mut stream = store.get(&p.digest).await.unwrap();
    let mut tampered = Vec::new();
    while let Some(c) = stream.next().await {
        tampered.extend_from_slice(&c.unwrap());
    }
    let dest_parent = tempfile::tempdir().unwrap();
    let dest = dest_parent.path().join("run");
    let err =
        unpack_verified(&tampered[..], &p.digest, &dest, &UnpackLimits::default()).unwrap_err();
    assert!(
        matches!(err.code(), "BUNDLE_HASH_MISMATCH" | "BUNDLE_CORRUPT"),
        "{}",
        err.code()
    );
    assert_eq!(std::fs::read_dir(dest_parent.path()).unwrap().count(), 0);
    store.delete(&p.digest).await.unwrap();
}
contract!(tampered_object_is_refused);

#[test]
fn store_urls() {
    let e = |u: &str| BundleStore::from_url(u).unwrap_err().code();
    assert_eq!(e("ftp://x"), "BUNDLE_STORE_CONFIG");
    assert_eq!(e("s3://"), "BUNDLE_STORE_CONFIG");
    assert_eq!(e("s3://b?secret_access_key=x"), "BUNDLE_STORE_CONFIG");
    assert_eq!(e("relative/path"), "BUNDLE_STORE_CONFIG");
    let s = BundleStore::from_url("s3://bkt/pre/fix?endpoint=http://127.0.0.1:1&region=eu-west-3")
        .unwrap();
    assert_eq!(
        s.backend(),
        &StoreBackend::S3 {
            bucket: "bkt".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            region: "eu-west-3".into()
        }
    );
    let d = Digest::of(b"k");
    assert_eq!(
        s.key(&d),
        format!("pre/fix/bundles/sha256/{}.tar.zst", d.to_hex())
    );
    let dbg = format!("{s:?}");
    if let Ok(secret) = std::env::var("AWS_SECRET_ACCESS_KEY") {
        assert!(!dbg.contains(&secret));
    }
    let dir = tempfile::tempdir().unwrap();
    let l = BundleStore::from_url(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(
        l.backend(),
        &StoreBackend::Local {
            root: dir.path().to_path_buf()
        }
    );
}
