//! Workflow bundles: a directory tree packed into one content-addressed archive, stored in
//! object storage, fetched, verified, cached and unpacked on the host that runs it.
//!
//! | module | what it holds |
//! |---|---|
//! | [`pack`] | deterministic `tar` + `zstd` packing: same tree, same bytes, same digest |
//! | [`unpack`] | streaming unpack that refuses hostile archives, each refusal with its code |
//! | [`digest`] | SHA-256 digests and streaming hashers |
//! | [`fetch`] | resumable HTTP(S) download into the cache, verified while streaming |
//! | [`cache`] | the digest-addressed, size-capped LRU cache, safe across processes |
//! | [`store`] | bundles in a local directory or S3 through `object_store`, presigned URLs |
//! | [`error`] | [`BundleError`] and its stable codes |
//!
//! # Archive format, version 1
//!
//! A bundle is one zstd frame (with content checksum) holding a tar stream with GNU headers.
//! Entries are sorted by the bytes of their path (a directory before what it holds); paths
//! are relative, without `./`; mtime, uid and gid are 0 and owner names empty; modes are
//! 0755 (directories, files with an execute bit), 0644 (other files), 0777 (symbolic links).
//! Only files, directories and relative symbolic links that stay inside the tree appear.
//! The bundle's identity is the SHA-256 of the compressed bytes, as hex.

pub mod cache;
pub mod digest;
pub mod error;
pub mod fetch;
pub mod pack;
pub mod store;
mod tree_path;
pub mod unpack;

pub use cache::{
    BundleCache, CacheEntry, CacheOptions, CachedBundle, DEFAULT_CACHE_DIR,
    DEFAULT_CACHE_MAX_BYTES, DEFAULT_PARTIAL_MAX_AGE, PartialEntry,
};
pub use digest::Digest;
pub use error::BundleError;
pub use fetch::{Progress, ProgressFn, fetch, fetch_with};
pub use pack::{PackedBundle, pack, pack_in, pack_to};
pub use store::{
    BundleLocation, BundleStore, DEFAULT_OBJECT_STORE_URL, OBJECT_STORE_URL_ENV, PutOutcome,
    StoreBackend,
};
pub use unpack::{UnpackLimits, UnpackStats, unpack, unpack_verified};
