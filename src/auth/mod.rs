//! Accounts and tokens: password hashing, signed access tokens, rotating refresh tokens, and
//! the check that a login session has not been revoked.

pub mod fast_path;
mod password;
mod sessions;
mod tokens;

pub use password::{PasswordError, Passwords};
pub use sessions::Sessions;
pub use tokens::{AccessClaims, Identity, TokenError, TokenKeys, TokenKeysError};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// `bytes` random bytes from the OS-seeded generator, as URL-safe base64.
pub fn random_token(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    URL_SAFE_NO_PAD.encode(buffer)
}

/// How a refresh token is stored: SHA-256, since the token itself carries 256 random bits and
/// needs no slow hash; a database leak then yields nothing usable.
pub fn hash_refresh_token(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

/// The SHA-256 of `bytes`, in lowercase hex: how the hub names artwork, overlay tokens it
/// keeps only as hashes, and ids derived from what a client sent.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_differ_and_have_the_expected_length() {
        let a = random_token(32);
        let b = random_token(32);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
    }

    #[test]
    fn refresh_token_hashes_are_stable_and_do_not_contain_the_token() {
        let hash = hash_refresh_token("abc");
        assert_eq!(hash, hash_refresh_token("abc"));
        assert_ne!(hash, hash_refresh_token("abd"));
        assert!(!hash.contains("abc"));
    }
}
