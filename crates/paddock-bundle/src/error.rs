//! The one error type of this crate, with a stable code per failure.
//!
//! Codes are spelled once, in [`BundleError::code`], and never renamed once shipped: the agent
//! reports them in task results and the CLI prints them. Messages never contain secrets: URLs
//! are reduced to scheme, host and path before they are put in an error (a presigned URL's
//! query string is a credential), and object-store credentials are never formatted.

use std::path::PathBuf;

/// A bundle failure.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// An archive entry has an absolute path.
    #[error("archive entry has an absolute path: {path:?}")]
    PathAbsolute {
        /// The entry's path as written in the archive.
        path: String,
    },
    /// An archive entry's path climbs out of the tree with `..`.
    #[error("archive entry climbs out of the tree: {path:?}")]
    PathTraversal {
        /// The entry's path as written in the archive.
        path: String,
    },
    /// A symbolic or hard link points outside the tree (absolute, or `..` past the root), or
    /// an entry would be written through a link.
    #[error("link {path:?} points outside the tree: {target:?}")]
    LinkEscape {
        /// The link's path.
        path: String,
        /// Where it points.
        target: String,
    },
    /// A device, FIFO, socket or other entry that is neither a file, a directory nor a link.
    #[error("special file refused ({kind}): {path:?}")]
    SpecialFile {
        /// The entry's path.
        path: String,
        /// What it is (`character device`, `fifo`, ...).
        kind: String,
    },
    /// One entry is larger than the per-entry limit.
    #[error("entry {path:?} is {size} bytes, over the {limit}-byte limit")]
    EntryTooLarge {
        /// The entry's path.
        path: String,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The archive has more entries than allowed.
    #[error("archive has more than {limit} entries")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// The compressed stream expands too far: past the total limit, or past the allowed ratio.
    #[error("decompression bomb refused: {reason}")]
    DecompressionBomb {
        /// Which limit tripped, with the figures.
        reason: String,
    },
    /// The archive cannot be decoded (zstd, tar headers, duplicate or inconsistent entries).
    #[error("corrupt bundle: {reason}")]
    Corrupt {
        /// What was wrong.
        reason: String,
    },
    /// The content's SHA-256 is not the expected one. Whatever was written has been deleted.
    #[error("bundle hash mismatch: expected sha256 {expected}, got {actual}")]
    HashMismatch {
        /// The expected digest (hex).
        expected: String,
        /// The digest of what was received (hex).
        actual: String,
    },
    /// A digest string is not 64 hex characters (optionally prefixed `sha256:`).
    #[error("invalid sha256 digest: {input:?}")]
    InvalidDigest {
        /// The rejected input (truncated).
        input: String,
    },
    /// The tree to pack cannot be packed (not a directory, unreadable, ...).
    #[error("cannot pack {path}: {reason}")]
    Pack {
        /// The offending path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A download failed (connection, HTTP status, interrupted body). A partial download is
    /// kept in the cache for the next attempt to resume.
    #[error("download from {url} failed: {reason}")]
    Download {
        /// The URL without its query string.
        url: String,
        /// Why.
        reason: String,
    },
    /// `PADDOCK_OBJECT_STORE_URL` (or the string given) is not understood.
    #[error("invalid object store url: {reason}")]
    StoreConfig {
        /// Why (never includes credentials).
        reason: String,
    },
    /// The object store refused or failed an operation.
    #[error("object store {op} failed: {reason}")]
    Store {
        /// The operation (`put`, `get`, ...).
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// No object with this digest in the store.
    #[error("no bundle with sha256 {digest} in the store")]
    NotFound {
        /// The digest (hex).
        digest: String,
    },
    /// A local file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl BundleError {
    /// The stable, machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            BundleError::PathAbsolute { .. } => "BUNDLE_PATH_ABSOLUTE",
            BundleError::PathTraversal { .. } => "BUNDLE_PATH_TRAVERSAL",
            BundleError::LinkEscape { .. } => "BUNDLE_LINK_ESCAPE",
            BundleError::SpecialFile { .. } => "BUNDLE_SPECIAL_FILE",
            BundleError::EntryTooLarge { .. } => "BUNDLE_ENTRY_TOO_LARGE",
            BundleError::TooManyEntries { .. } => "BUNDLE_TOO_MANY_ENTRIES",
            BundleError::DecompressionBomb { .. } => "BUNDLE_DECOMPRESSION_BOMB",
            BundleError::Corrupt { .. } => "BUNDLE_CORRUPT",
            BundleError::HashMismatch { .. } => "BUNDLE_HASH_MISMATCH",
            BundleError::InvalidDigest { .. } => "BUNDLE_INVALID_DIGEST",
            BundleError::Pack { .. } => "BUNDLE_PACK_FAILED",
            BundleError::Download { .. } => "BUNDLE_DOWNLOAD_FAILED",
            BundleError::StoreConfig { .. } => "BUNDLE_STORE_CONFIG",
            BundleError::Store { .. } => "BUNDLE_STORE_FAILED",
            BundleError::NotFound { .. } => "BUNDLE_NOT_FOUND",
            BundleError::Io { .. } => "BUNDLE_IO",
        }
    }

    /// Every code this crate can return, for documentation and tests.
    pub const CODES: &'static [&'static str] = &[
        "BUNDLE_PATH_ABSOLUTE",
        "BUNDLE_PATH_TRAVERSAL",
        "BUNDLE_LINK_ESCAPE",
        "BUNDLE_SPECIAL_FILE",
        "BUNDLE_ENTRY_TOO_LARGE",
        "BUNDLE_TOO_MANY_ENTRIES",
        "BUNDLE_DECOMPRESSION_BOMB",
        "BUNDLE_CORRUPT",
        "BUNDLE_HASH_MISMATCH",
        "BUNDLE_INVALID_DIGEST",
        "BUNDLE_PACK_FAILED",
        "BUNDLE_DOWNLOAD_FAILED",
        "BUNDLE_STORE_CONFIG",
        "BUNDLE_STORE_FAILED",
        "BUNDLE_NOT_FOUND",
        "BUNDLE_IO",
    ];

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BundleError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(reason: impl Into<String>) -> Self {
        BundleError::Corrupt {
            reason: reason.into(),
        }
    }
}

/// A URL reduced to what may be logged: scheme, host, port and path; never the query string
/// (a presigned URL's signature) nor user info.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{}://{host}{port}{}", u.scheme(), u.path())
        }
        Err(_) => "<unparsable url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_prefixed() {
        let mut seen = std::collections::HashSet::new();
        for c in BundleError::CODES {
            assert!(c.starts_with("BUNDLE_"), "{c}");
            assert!(seen.insert(*c), "duplicate code {c}");
        }
    }

    #[test]
    fn redacted_urls_drop_query_and_userinfo() {
        let u =
            "https://user:pw@s3.example:9000/b/k.tar.zst?X-Amz-Signature=abc&X-Amz-Credential=AKIA";
        let r = redact_url(u);
        assert_eq!(r, "https://s3.example:9000/b/k.tar.zst");
        assert!(!r.contains("AKIA") && !r.contains("pw"));
        assert_eq!(redact_url("not a url"), "<unparsable url>");
    }
}
