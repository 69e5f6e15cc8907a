//! Helpers shared by the integration tests: hostile archives from raw tar headers, trees on
//! disk, a snapshot of what exists around an unpack destination, and a small HTTP server.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Builds a tar stream entry by entry from raw headers (no path validation at all).
#[derive(Default)]
pub struct RawTar {
    pub bytes: Vec<u8>,
}

impl RawTar {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one entry with the exact `path` and `link` bytes given.
    pub fn entry(
        &mut self,
        path: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        data: &[u8],
        mode: u32,
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            assert!(path.len() <= old.name.len() && link.len() <= old.linkname.len());
            old.name[..path.len()].copy_from_slice(path);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// A header whose declared size is `size` but with no data after it (for size checks).
    pub fn header_only(&mut self, path: &[u8], kind: tar::EntryType, size: u64) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.entry(path.as_bytes(), tar::EntryType::Regular, b"", data, 0o644)
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path.as_bytes(), tar::EntryType::Directory, b"", b"", 0o755)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            path.as_bytes(),
            tar::EntryType::Symlink,
            target.as_bytes(),
            b"",
            0o777,
        )
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            path.as_bytes(),
            tar::EntryType::Link,
            target.as_bytes(),
            b"",
            0o644,
        )
    }

    /// The tar with its two zero end blocks.
    pub fn tar(&self) -> Vec<u8> {
        let mut b = self.bytes.clone();
        b.extend(std::iter::repeat_n(0u8, 1024));
        b
    }

    /// The tar, zstd-compressed.
    pub fn zst(&self) -> Vec<u8> {
        zst(&self.tar())
    }
}

pub fn zst(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A scratch area: `root/` holds `outside/secret` (which must never change), and unpacks go
/// to `root/dest`.
pub struct Arena {
    pub tmp: tempfile::TempDir,
}

impl Arena {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/secret"), b"untouched").unwrap();
        Arena { tmp }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn dest(&self) -> PathBuf {
        self.tmp.path().join("dest")
    }

    /// Asserts a refused unpack left nothing: no `dest`, no temp dir, `outside` untouched.
    pub fn assert_untouched(&self) {
        let snap = snapshot(self.root());
        let expected: BTreeMap<String, String> = [
            ("outside".to_string(), "dir".to_string()),
            ("outside/secret".to_string(), "file:untouched".to_string()),
        ]
        .into();
        assert_eq!(
            snap, expected,
            "unpack left something behind or touched outside"
        );
    }

    /// Asserts everything outside `dest` is as before (after a successful unpack).
    pub fn assert_outside_untouched(&self) {
        let snap = snapshot(self.root());
        for (k, v) in &snap {
            if k == "dest" || k.starts_with("dest/") {
                continue;
            }
            assert!(
                (k == "outside" && v == "dir") || (k == "outside/secret" && v == "file:untouched"),
                "unexpected {k}: {v}"
            );
        }
        assert_eq!(
            snap.get("outside/secret").map(String::as_str),
            Some("file:untouched")
        );
    }
}

/// Every path under `root` (relative), with its kind (`dir`, `file:<content>`, `link:<target>`).
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("link:{}", std::fs::read_link(&p).unwrap().display()),
                );
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                let data = std::fs::read(&p).unwrap();
                let shown = if data.len() <= 64 {
                    String::from_utf8_lossy(&data).into_owned()
                } else {
                    format!("{} bytes", data.len())
                };
                out.insert(rel, format!("file:{shown}"));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// A tiny HTTP file server on 127.0.0.1 for fetch tests: counts GETs, records `Range`
/// headers, can ignore ranges, cut a response short, or wait before answering.
pub mod server {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};

    #[derive(Default)]
    pub struct Shared {
        pub files: Mutex<HashMap<String, Vec<u8>>>,
        pub gets: AtomicUsize,
        pub ranges: Mutex<Vec<Option<String>>>,
        pub ignore_range: AtomicBool,
        /// Cut the next response after this many body bytes (then clear).
        pub cut_after: Mutex<Option<usize>>,
        pub delay_ms: AtomicU64,
    }

    pub struct TestServer {
        pub base: String,
        pub shared: Arc<Shared>,
    }

    impl TestServer {
        pub async fn start() -> Self {
            let shared = Arc::new(Shared::default());
            let app = axum::Router::new()
                .route("/f/{name}", axum::routing::get(serve))
                .with_state(shared.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            });
            TestServer {
                base: format!("http://{addr}"),
                shared,
            }
        }

        /// Serves `data` at `/f/<name>` and returns its URL.
        pub fn add(&self, name: &str, data: Vec<u8>) -> String {
            self.shared
                .files
                .lock()
                .unwrap()
                .insert(name.to_string(), data);
            format!("{}/f/{name}", self.base)
        }

        pub fn gets(&self) -> usize {
            self.shared.gets.load(Ordering::SeqCst)
        }

        pub fn ranges(&self) -> Vec<Option<String>> {
            self.shared.ranges.lock().unwrap().clone()
        }
    }

    async fn serve(
        State(s): State<Arc<Shared>>,
        Path(name): Path<String>,
        headers: HeaderMap,
    ) -> Response {
        s.gets.fetch_add(1, Ordering::SeqCst);
        let range = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        s.ranges.lock().unwrap().push(range.clone());
        let delay = s.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let Some(data) = s.files.lock().unwrap().get(&name).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let len = data.len();
        let start = match range {
            Some(r) if !s.ignore_range.load(Ordering::SeqCst) => {
                let n: usize = r
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse().ok())
                    .unwrap();
                if n >= len {
                    return (
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                    )
                        .into_response();
                }
                Some(n)
            }
            _ => None,
        };
        let body_data = data[start.unwrap_or(0)..].to_vec();
        let body_len = body_data.len();
        let cut = s.cut_after.lock().unwrap().take();
        let body = match cut {
            Some(k) => {
                let first = bytes::Bytes::from(body_data[..k.min(body_len)].to_vec());
                let stream = futures_util::stream::iter(vec![
                    Ok(first),
                    Err(std::io::Error::other("connection cut by the test server")),
                ]);
                Body::from_stream(stream)
            }
            None => Body::from(body_data),
        };
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            header::CONTENT_LENGTH,
            body_len.to_string().parse().unwrap(),
        );
        if let Some(n) = start {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                format!("bytes {n}-{}/{len}", len - 1).parse().unwrap(),
            );
        }
        resp
    }
}

/// Deterministic pseudo-random bytes (incompressible enough for tests).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
