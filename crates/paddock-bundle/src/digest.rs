//! SHA-256 content digests and the streaming hashers that compute them.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::BundleError;

/// A SHA-256 digest: the identity of a bundle.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// Compares with `expected`; a mismatch is [`BundleError::HashMismatch`].
    pub fn check(&self, expected: &Digest) -> Result<(), BundleError> {
        if self == expected {
            Ok(())
        } else {
            Err(BundleError::HashMismatch {
                expected: expected.to_hex(),
                actual: self.to_hex(),
            })
        }
    }
}

impl From<[u8; 32]> for Digest {
    fn from(b: [u8; 32]) -> Self {
        Digest(b)
    }
}

impl FromStr for Digest {
    type Err = BundleError;

    /// Parses 64 hex characters, optionally prefixed `sha256:`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        match hex::decode_to_slice(hex_part, &mut out) {
            Ok(()) => Ok(Digest(out)),
            Err(_) => Err(BundleError::InvalidDigest {
                input: s.chars().take(80).collect(),
            }),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

/// An incremental SHA-256 with a byte count.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }
}

/// A writer that hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// The inner writer, the digest and the byte count of everything written.
    pub fn finish(self) -> (W, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Computes the digest and size of everything `reader` yields.
pub fn digest_reader(mut reader: impl Read) -> io::Result<(Digest, u64)> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    let len = hasher.len();
    Ok((hasher.finish(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_with_and_without_prefix() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert_eq!(format!("sha256:{d}").parse::<Digest>().unwrap(), d);
        assert_eq!(d.to_hex().to_uppercase().parse::<Digest>().unwrap(), d);
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(66)] {
            let e = bad.parse::<Digest>().unwrap_err();
            assert_eq!(e.code(), "BUNDLE_INVALID_DIGEST");
        }
    }

    #[test]
    fn streaming_hash_matches_one_shot() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (d, n) = digest_reader(&data[..]).unwrap();
        assert_eq!(d, Digest::of(&data));
        assert_eq!(n, data.len() as u64);
        let mut w = HashingWriter::new(Vec::new());
        for chunk in data.chunks(7777) {
            w.write_all(chunk).unwrap();
        }
        let (out, d2, n2) = w.finish();
        assert_eq!((d2, n2), (d, n));
        assert_eq!(out, data);
        assert!(d.check(&Digest::of(b"x")).is_err());
        assert!(d.check(&d).is_ok());
    }
}
