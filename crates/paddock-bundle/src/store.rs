//! Bundles in object storage, through the `object_store` crate: a local directory (the
//! embedded default) or any S3-compatible server.
//!
//! # Configuration: `PADDOCK_OBJECT_STORE_URL`
//!
//! | form | store |
//! |---|---|
//! | `file:///var/lib/paddock/objects` (or a plain absolute path) | a local directory, created if missing |
//! | `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION&allow_http=true\|false]` | an S3 bucket; `endpoint` for MinIO, Garage, s3s-fs... (path-style requests); `region` defaults to `us-east-1`; `allow_http` defaults to true when `endpoint` is `http://` |
//!
//! S3 credentials are never part of the URL: they come from the environment as for every
//! AWS client (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`;
//! other `AWS_*` settings the `object_store` crate knows are honoured too, the URL's wins).
//! They are never logged nor put in errors, and [`BundleStore`]'s `Debug` leaves them out.
//!
//! # Keys
//!
//! `[PREFIX/]bundles/sha256/<hex>.tar.zst`. An object's key is its content's digest, so a
//! put of a digest already present uploads nothing ([`PutOutcome::AlreadyPresent`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::cache::{BundleCache, CachedBundle};
use crate::digest::{Digest, Hasher};
use crate::error::BundleError;
use crate::fetch::{Progress, ProgressFn};

/// The environment variable holding the object store URL.
pub const OBJECT_STORE_URL_ENV: &str = "PADDOCK_OBJECT_STORE_URL";

/// The object store used when [`OBJECT_STORE_URL_ENV`] is unset.
pub const DEFAULT_OBJECT_STORE_URL: &str = "file:///var/lib/paddock/objects";

/// Multipart chunk size for uploads (S3 wants at least 5 MiB per part but the last).
const PART_SIZE: usize = 8 << 20;

/// Which kind of store, and where (no credentials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// A local directory.
    Local {
        /// Its root.
        root: PathBuf,
    },
    /// An S3-compatible bucket.
    S3 {
        /// The bucket.
        bucket: String,
        /// The endpoint, when not AWS.
        endpoint: Option<String>,
        /// The region.
        region: String,
    },
}

/// Where a bundle can be fetched from, for the spawn config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleLocation {
    /// A presigned GET URL (S3): hand it to [`crate::fetch`] as it is.
    Presigned {
        /// The URL; its query string is a credential: never log it.
        url: String,
        /// How long it stays valid.
        expires_in: Duration,
    },
    /// A file of the local store: the gateway serves it under a short-lived signed URL of
    /// its own (signing is the gateway's job).
    Local {
        /// The file.
        path: PathBuf,
        /// Its key in the store.
        key: String,
    },
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The bundle was uploaded.
    Uploaded {
        /// Bytes sent.
        bytes: u64,
    },
    /// An object with this digest (and size) was already there; nothing was sent.
    AlreadyPresent {
        /// Its size.
        size: u64,
    },
}

/// Bundles by digest in one object store.
#[derive(Clone)]
pub struct BundleStore {
    store: Arc<dyn ObjectStore>,
    s3: Option<Arc<AmazonS3>>,
    local: Option<Arc<LocalFileSystem>>,
    backend: StoreBackend,
    prefix: String,
}

impl fmt::Debug for BundleStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundleStore")
            .field("backend", &self.backend)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn config_err(reason: impl Into<String>) -> BundleError {
    BundleError::StoreConfig {
        reason: reason.into(),
    }
}

fn store_err(op: &'static str, e: object_store::Error) -> BundleError {
    BundleError::Store {
        op,
        reason: e.to_string(),
    }
}

impl BundleStore {
    /// The store named by `PADDOCK_OBJECT_STORE_URL`, or [`DEFAULT_OBJECT_STORE_URL`].
    pub fn from_env() -> Result<Self, BundleError> {
        match std::env::var(OBJECT_STORE_URL_ENV) {
            Ok(u) if !u.trim().is_empty() => Self::from_url(&u),
            _ => Self::from_url(DEFAULT_OBJECT_STORE_URL),
        }
    }

    /// A store from its URL (see the module docs for the forms).
    pub fn from_url(url: &str) -> Result<Self, BundleError> {
        let url = url.trim();
        if url.starts_with('/') {
            return Self::local(Path::new(url));
        }
        let parsed = url::Url::parse(url).map_err(|e| config_err(format!("{e}")))?;
        match parsed.scheme() {
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|()| config_err("file:// URL must name an absolute path"))?;
                Self::local(&path)
            }
            "s3" => Self::s3_from_url(&parsed),
            other => Err(config_err(format!(
                "unsupported scheme {other:?} (expected file:// or s3://)"
            ))),
        }
    }

    /// A store in the local directory `root` (created if missing).
    pub fn local(root: &Path) -> Result<Self, BundleError> {
        if !root.is_absolute() {
            return Err(config_err("local store path must be absolute"));
        }
        std::fs::create_dir_all(root)
            .map_err(|e| BundleError::io(format!("create {}", root.display()), e))?;
        let fs =
            Arc::new(LocalFileSystem::new_with_prefix(root).map_err(|e| store_err("open", e))?);
        Ok(BundleStore {
            store: fs.clone(),
            s3: None,
            local: Some(fs),
            backend: StoreBackend::Local {
                root: root.to_path_buf(),
            },
            prefix: String::new(),
        })
    }

    fn s3_from_url(url: &url::Url) -> Result<Self, BundleError> {
        let bucket = url
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| config_err("s3:// URL needs a bucket: s3://BUCKET"))?
            .to_string();
        let prefix = url.path().trim_matches('/').to_string();
        let mut endpoint = None;
        let mut region = "us-east-1".to_string();
        let mut allow_http = None;
        for (k, v) in url.query_pairs() {
            match &*k {
                "endpoint" => endpoint = Some(v.into_owned()),
                "region" => region = v.into_owned(),
                "allow_http" => {
                    allow_http = Some(
                        v.parse::<bool>()
                            .map_err(|_| config_err("allow_http must be true or false"))?,
                    )
                }
                other => {
                    return Err(config_err(format!(
                        "unknown s3 URL parameter {other:?} (credentials go in AWS_* variables)"
                    )));
                }
            }
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_region(&region)
            .with_virtual_hosted_style_request(false);
        if let Some(ep) = &endpoint {
            b = b.with_endpoint(ep);
        }
        let allow_http = allow_http.unwrap_or_else(|| {
            endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
        });
        b = b.with_allow_http(allow_http);
        let s3 = Arc::new(b.build().map_err(|e| config_err(e.to_string()))?);
        Ok(BundleStore {
            store: s3.clone(),
            s3: Some(s3),
            local: None,
            backend: StoreBackend::S3 {
                bucket,
                endpoint,
                region,
            },
            prefix,
        })
    }

    /// Which store this is.
    pub fn backend(&self) -> &StoreBackend {
        &self.backend
    }

    /// The underlying object store (for tools and tests).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The key of the bundle `digest`: `[PREFIX/]bundles/sha256/<hex>.tar.zst`.
    pub fn key(&self, digest: &Digest) -> String {
        let k = format!("bundles/sha256/{}.tar.zst", digest.to_hex());
        if self.prefix.is_empty() {
            k
        } else {
            format!("{}/{k}", self.prefix)
        }
    }

    fn path(&self, digest: &Digest) -> ObjectPath {
        ObjectPath::from(self.key(digest))
    }

    /// The stored bundle's size, or `None` when absent.
    pub async fn head(&self, digest: &Digest) -> Result<Option<u64>, BundleError> {
        match self.store.head(&self.path(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("head", e)),
        }
    }

    /// Uploads the archive at `file` as the bundle `digest`, unless an object of that digest
    /// and size is already there. The file is hashed as it is sent: if it is not `digest`,
    /// the upload is aborted (`BUNDLE_HASH_MISMATCH`) and nothing is stored.
    pub async fn put_file(
        &self,
        file: &Path,
        digest: &Digest,
        progress: ProgressFn<'_>,
    ) -> Result<PutOutcome, BundleError> {
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| BundleError::io(format!("open {}", file.display()), e))?;
        let size = f
            .metadata()
            .await
            .map_err(|e| BundleError::io(format!("stat {}", file.display()), e))?
            .len();
        if self.head(digest).await? == Some(size) {
            progress(Progress {
                done: size,
                total: Some(size),
            });
            return Ok(PutOutcome::AlreadyPresent { size });
        }
        let upload = self
            .store
            .put_multipart(&self.path(digest))
            .await
            .map_err(|e| store_err("put", e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        progress(Progress {
            done: 0,
            total: Some(size),
        });
        loop {
            let n = match f.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(BundleError::io(format!("read {}", file.display()), e));
                }
            };
            if let Err(e) = writer.wait_for_capacity(4).await {
                let _ = writer.abort().await;
                return Err(store_err("put", e));
            }
            writer.write(&buf[..n]);
            hasher.update(&buf[..n]);
            progress(Progress {
                done: hasher.len(),
                total: Some(size),
            });
        }
        let sent = hasher.len();
        if let Err(e) = hasher.finish().check(digest) {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.finish().await.map_err(|e| store_err("put", e))?;
        Ok(PutOutcome::Uploaded { bytes: sent })
    }

    /// The stored bytes of bundle `digest`, as a stream (not verified: see
    /// [`BundleStore::fetch_into_cache`]).
    pub async fn get(
        &self,
        digest: &Digest,
    ) -> Result<BoxStream<'static, Result<Bytes, BundleError>>, BundleError> {
        match self.store.get(&self.path(digest)).await {
            Ok(r) => Ok(r.into_stream().map_err(|e| store_err("get", e)).boxed()),
            Err(object_store::Error::NotFound { .. }) => Err(BundleError::NotFound {
                digest: digest.to_hex(),
            }),
            Err(e) => Err(store_err("get", e)),
        }
    }

    /// Reads bundle `digest` straight from the store into `cache`, verified while streaming
    /// (`BUNDLE_HASH_MISMATCH` and nothing cached when the stored object is not `digest`).
    /// For hosts that reach the store directly; others use [`crate::fetch`] with
    /// [`BundleStore::locate`]'s URL.
    pub async fn fetch_into_cache(
        &self,
        digest: &Digest,
        cache: &BundleCache,
    ) -> Result<CachedBundle, BundleError> {
        if let Some(hit) = cache.get(digest)? {
            return Ok(hit);
        }
        let _lock = cache.lock_digest(digest).await?;
        if let Some(hit) = cache.get(digest)? {
            return Ok(hit);
        }
        let partial = cache.partial_path(digest);
        let io_err = |e| BundleError::io(format!("write {}", partial.display()), e);
        let mut out = tokio::fs::File::create(&partial).await.map_err(io_err)?;
        let mut hasher = Hasher::new();
        let mut stream = self.get(digest).await?;
        let result: Result<(), BundleError> = async {
            use tokio::io::AsyncWriteExt;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                out.write_all(&chunk).await.map_err(io_err)?;
                hasher.update(&chunk);
            }
            out.sync_all().await.map_err(io_err)?;
            hasher.finish().check(digest)
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        cache.commit(digest, &partial)
    }

    /// Deletes bundle `digest` (absent is fine).
    pub async fn delete(&self, digest: &Digest) -> Result<(), BundleError> {
        match self.store.delete(&self.path(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err("delete", e)),
        }
    }

    /// Where a fetcher can get bundle `digest`: a presigned GET URL valid for `expires_in`
    /// on S3, the file on the local store. Fails `BUNDLE_NOT_FOUND` when absent.
    pub async fn locate(
        &self,
        digest: &Digest,
        expires_in: Duration,
    ) -> Result<BundleLocation, BundleError> {
        if self.head(digest).await?.is_none() {
            return Err(BundleError::NotFound {
                digest: digest.to_hex(),
            });
        }
        let path = self.path(digest);
        if let Some(s3) = &self.s3 {
            let url = s3
                .signed_url(reqwest::Method::GET, &path, expires_in)
                .await
                .map_err(|e| store_err("presign", e))?;
            return Ok(BundleLocation::Presigned {
                url: url.to_string(),
                expires_in,
            });
        }
        let local = self
            .local
            .as_ref()
            .ok_or_else(|| config_err("store is neither local nor S3"))?;
        let file = local
            .path_to_filesystem(&path)
            .map_err(|e| store_err("locate", e))?;
        Ok(BundleLocation::Local {
            path: file,
            key: self.key(digest),
        })
    }
}
