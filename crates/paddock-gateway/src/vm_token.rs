//! Instance tokens (`VM_TOKEN`, seed 000): short-lived, signed by the gateway, scoped to one
//! instance.
//!
//! Form: `pvm1.<instanceId>.<orgId>.<expiresAtMs>.<hmac>`, where `hmac` is the hex
//! HMAC-SHA256 of everything before it, keyed by `PADDOCK_JWT_SECRET` (or the seed's
//! `JWT_SECRET`) or, when neither is set, by a key the first replica generates and stores in
//! the database so that every replica verifies every token. Nothing is stored per token: a
//! token is valid until it expires, and only while its instance is not terminated or failed
//! (checked by the caller). A connected instance gets a fresh token in `hello_ok`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "pvm1";

/// Why a token was refused (the message never contains the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the form above, or a bad signature.
    #[error("instance token is not valid")]
    Invalid,
    /// Past its expiry.
    #[error("instance token has expired")]
    Expired,
}

/// What a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// Instance id.
    pub instance_id: String,
    /// Org id.
    pub org_id: String,
    /// Expiry, ms since the Unix epoch.
    pub expires_at: i64,
}

/// Signs and verifies instance tokens with one key.
#[derive(Clone)]
pub struct TokenSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

impl TokenSigner {
    /// A signer for `key`.
    pub fn new(key: impl Into<Vec<u8>>) -> TokenSigner {
        TokenSigner { key: key.into() }
    }

    fn mac(&self, body: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(body.as_bytes());
        mac
    }

    /// The hex HMAC of any message (signed download URLs).
    pub fn sign_message(&self, message: &str) -> String {
        hex::encode(self.mac(message).finalize().into_bytes())
    }

    /// A token for an instance, valid until `expires_at`.
    pub fn sign(&self, instance_id: &str, org_id: &str, expires_at: i64) -> String {
        let body = format!("{PREFIX}.{instance_id}.{org_id}.{expires_at}");
        let sig = hex::encode(self.mac(&body).finalize().into_bytes());
        format!("{body}.{sig}")
    }

    /// Checks a token's form, signature (in constant time) and expiry.
    ///
    /// # Errors
    /// [`TokenError`].
    pub fn verify(&self, token: &str, now: i64) -> Result<TokenClaims, TokenError> {
        let (body, sig) = token.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let sig = hex::decode(sig).map_err(|_| TokenError::Invalid)?;
        self.mac(body)
            .verify_slice(&sig)
            .map_err(|_| TokenError::Invalid)?;
        let mut parts = body.split('.');
        let (Some(PREFIX), Some(instance_id), Some(org_id), Some(exp), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Invalid);
        };
        let expires_at: i64 = exp.parse().map_err(|_| TokenError::Invalid)?;
        if expires_at <= now {
            return Err(TokenError::Expired);
        }
        Ok(TokenClaims {
            instance_id: instance_id.to_string(),
            org_id: org_id.to_string(),
            expires_at,
        })
    }
}

/// Compares two byte strings in constant time.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_expiry_and_tampering() {
        let s = TokenSigner::new(b"k1".to_vec());
        let t = s.sign("inst-1", "org-1", 2_000);
        let c = s.verify(&t, 1_000).unwrap();
        assert_eq!(
            c,
            TokenClaims {
                instance_id: "inst-1".into(),
                org_id: "org-1".into(),
                expires_at: 2_000
            }
        );
        assert_eq!(s.verify(&t, 2_000), Err(TokenError::Expired));
        // Another key, another instance, a pushed expiry, garbage: all invalid.
        assert_eq!(
            TokenSigner::new(b"k2".to_vec()).verify(&t, 1_000),
            Err(TokenError::Invalid)
        );
        let other = t.replace("inst-1", "inst-2");
        assert_eq!(s.verify(&other, 1_000), Err(TokenError::Invalid));
        let later = t.replace(".2000.", ".9999999.");
        assert_eq!(s.verify(&later, 1_000), Err(TokenError::Invalid));
        for junk in [
            "",
            ".",
            "pvm1",
            "a.b.c.d.e.f",
            &format!("{t}x"),
            "pvm1.a.b.1.zz",
        ] {
            assert_eq!(s.verify(junk, 1_000), Err(TokenError::Invalid), "{junk}");
        }
        // A well-signed body of the wrong shape is still refused.
        let body = "pvm1.a.b.c.1000";
        let sig = hex::encode(s.mac(body).finalize().into_bytes());
        assert_eq!(
            s.verify(&format!("{body}.{sig}"), 1),
            Err(TokenError::Invalid)
        );
        assert!(!format!("{s:?}").contains("k1"));
    }
}
