//! Argon2id password hashing, run on the blocking pool: one hash costs tens of milliseconds
//! of CPU, which must not stall the single-threaded worker serving other requests.

use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

use crate::domain::Password;

/// A hash of a random password, verified against when the handle does not exist, so that a
/// login for an unknown handle takes as long as one with a wrong password.
static DUMMY_HASH: LazyLock<Option<String>> = LazyLock::new(|| {
    Argon2::default()
        .hash_password(crate::auth::random_token(16).as_bytes())
        .ok()
        .map(|hash| hash.to_string())
});

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("the hashing task was cancelled")]
    Cancelled,
}

/// Hashes a password into a PHC string (`$argon2id$v=19$...`) with a fresh salt.
pub async fn hash_password(password: Password) -> Result<String, PasswordError> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.expose().as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|e| PasswordError::Hash(e.to_string()))
    })
    .await
    .map_err(|_| PasswordError::Cancelled)?
}

/// Checks `password` against a stored PHC string; with no stored hash (unknown account) it
/// spends the same effort and answers false.
pub async fn verify_password(
    password: String,
    stored: Option<String>,
) -> Result<bool, PasswordError> {
    tokio::task::spawn_blocking(move || {
        let known = stored.is_some();
        let hash = stored.or_else(|| DUMMY_HASH.clone()).unwrap_or_default();
        let parsed = PasswordHash::new(&hash).map_err(|e| PasswordError::Hash(e.to_string()))?;
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        Ok(known && matches)
    })
    .await
    .map_err(|_| PasswordError::Cancelled)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hashed_password_verifies_and_a_wrong_one_does_not() {
        let password = Password::parse("correct horse".into());
        let hash = hash_password(password.expect("valid password")).await;
        let hash = hash.expect("hashing works");
        assert!(hash.starts_with("$argon2id$"));
        assert!(matches!(
            verify_password("correct horse".into(), Some(hash.clone())).await,
            Ok(true)
        ));
        assert!(matches!(
            verify_password("wrong horse".into(), Some(hash)).await,
            Ok(false)
        ));
    }

    #[tokio::test]
    async fn an_unknown_account_never_verifies() {
        assert!(matches!(
            verify_password("anything at all".into(), None).await,
            Ok(false)
        ));
    }
}
