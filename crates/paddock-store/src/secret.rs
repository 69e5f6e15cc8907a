//! Token generation and hashing. Tokens are 256-bit random secrets, so a single SHA-256
//! is the right hash (no password-stretching needed); only the hash is stored.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A fresh random secret: `prefix` followed by 64 hex characters.
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// The stored form of a token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_hashes_stable() {
        let a = generate("pdk_");
        let b = generate("pdk_");
        assert_ne!(a, b);
        assert!(a.starts_with("pdk_") && a.len() == 68);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a).len(), 64);
    }
}
