//! Signed, short-lived access tokens (HS256 JWTs), and the derivation of a refresh token's
//! successor.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

use crate::domain::{DeviceId, UserId};
use crate::settings::Settings;

/// Clock skew tolerated between replicas when checking `exp`.
const LEEWAY_SECS: u64 = 5;

/// What an access token says about its bearer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user id, as a string (the JWT convention for `sub`).
    pub sub: String,
    /// The device the login was made from.
    pub did: String,
    /// The refresh-token family (the login session) this token belongs to.
    pub sid: String,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expires at, seconds since the epoch.
    pub exp: u64,
}

/// Keys and lifetime for access tokens; built once at start-up.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    /// Keys the HMAC that derives a refresh token's successor from it (see
    /// [`successor_of`](Self::successor_of)).
    successor: Hmac<Sha256>,
    /// Keys the HMAC that signs download links the hub serves itself (see
    /// [`sign_link`](Self::sign_link)).
    links: Hmac<Sha256>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenKeysError {
    #[error("could not read or write the token key file {path}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the token key file {path} is too short; delete it to have a new key generated")]
    ShortKey { path: String },
}

impl TokenKeys {
    /// Uses `SEGUE_JWT_SECRET` when set; otherwise a key kept in the data directory,
    /// generated on first start.
    pub fn from_settings(settings: &Settings) -> Result<Self, TokenKeysError> {
        let secret = match &settings.jwt_secret {
            Some(secret) => secret.expose_secret().as_bytes().to_vec(),
            None => load_or_create_key(&settings.token_key_path())?,
        };
        Ok(Self::from_secret(
            &secret,
            Duration::from_secs(settings.access_token_ttl_secs),
        ))
    }

    pub fn from_secret(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A key of its own for successors, derived from the secret, so that no value made for
        // one purpose can stand for another. SHA-512 gives exactly one HMAC-SHA256 block.
        let successor_key = Sha512::new()
            .chain_update(b"segue refresh-token successor\0")
            .chain_update(secret)
            .finalize();
        let links_key = Sha512::new()
            .chain_update(b"segue download link\0")
            .chain_update(secret)
            .finalize();
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
            successor: <Hmac<Sha256> as KeyInit>::new(&successor_key),
            links: <Hmac<Sha256> as KeyInit>::new(&links_key),
        }
    }

    /// The signature of a download link for `what` valid until `expires` (Unix seconds):
    /// URL-safe base64 of an HMAC with a key of its own.
    pub fn sign_link(&self, what: &str, expires: u64) -> String {
        let mut mac = self.links.clone();
        mac.update(what.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Whether `signature` signs `what` until `expires`, and `expires` is not past `now`
    /// (compared in constant time).
    pub fn verify_link(&self, what: &str, expires: u64, signature: &str, now: u64) -> bool {
        let Ok(presented) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        let mut mac = self.links.clone();
        mac.update(what.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        expires >= now && mac.verify_slice(&presented).is_ok()
    }

    /// The refresh token that succeeds `presented` when it is spent: an HMAC of it, so that
    /// presenting the same token again during the grace gives the same successor without the
    /// hub ever storing a usable token (only hashes are stored). 256 bits, URL-safe base64.
    pub fn successor_of(&self, presented: &str) -> String {
        let mut mac = self.successor.clone();
        mac.update(presented.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Lifetime of the tokens this issues.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Signs an access token for `user` on `device` in login session `family`.
    pub fn issue(
        &self,
        user: UserId,
        device: &DeviceId,
        family: &str,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or_default();
        let claims = AccessClaims {
            sub: user.to_string(),
            did: device.as_str().to_owned(),
            sid: family.to_owned(),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// Checks signature, algorithm and expiry.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
    }

    /// Checks a token and turns its claims into typed ids.
    pub fn identify(&self, token: &str) -> Result<Identity, TokenError> {
        let claims = self.verify(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid,
        })?;
        let user_id = claims
            .sub
            .parse()
            .map(UserId)
            .map_err(|_| TokenError::Invalid)?;
        let device_id = DeviceId::parse(&claims.did).map_err(|_| TokenError::Invalid)?;
        Ok(Identity {
            user_id,
            device_id,
            session: claims.sid,
            expires_at: claims.exp,
        })
    }
}

/// Who presented a valid access token: the user, the device the login was made from, and the
/// login session (refresh-token family), which logout revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub session: String,
    /// When the token expires, seconds since the epoch (its `exp`).
    pub expires_at: u64,
}

/// Why an access token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is not valid")]
    Invalid,
}

/// Reads the generated key, or creates it (readable by the owner only).
fn load_or_create_key(path: &Path) -> Result<Vec<u8>, TokenKeysError> {
    let io_error = |source| TokenKeysError::KeyFile {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read(path) {
        Ok(key) if key.len() >= 32 => return Ok(key),
        Ok(_) => {
            return Err(TokenKeysError::ShortKey {
                path: path.display().to_string(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(e)),
    }
    if let Some(dir) = path.parent() {
        crate::store::create_private_dir(dir).map_err(io_error)?;
    }
    let key = crate::auth::random_token(48).into_bytes();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            std::io::Write::write_all(&mut file, &key).map_err(io_error)?;
            Ok(key)
        }
        // Another process started at the same moment and wrote it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::read(path).map_err(io_error)
        }
        Err(e) => Err(io_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_signature_holds_for_its_target_until_it_expires() {
        let keys = keys();
        let signature = keys.sign_link("exp_1", 1_000);
        assert!(keys.verify_link("exp_1", 1_000, &signature, 999));
        assert!(keys.verify_link("exp_1", 1_000, &signature, 1_000));
        assert!(
            !keys.verify_link("exp_1", 1_000, &signature, 1_001),
            "expired"
        );
        assert!(
            !keys.verify_link("exp_2", 1_000, &signature, 0),
            "another target"
        );
        assert!(
            !keys.verify_link("exp_1", 2_000, &signature, 0),
            "another expiry"
        );
        assert!(!keys.verify_link("exp_1", 1_000, "not-base64!", 0));
        assert_ne!(
            signature,
            keys.successor_of("exp_1\n1000"),
            "a key of its own"
        );
    }

    #[test]
    fn a_successor_is_fixed_by_the_token_and_the_key_and_reveals_neither() {
        let keys = keys();
        let other = TokenKeys::from_secret(
            b"another-secret-another-secret-0123",
            Duration::from_secs(60),
        );
        let successor = keys.successor_of("token-a");
        assert_eq!(successor, keys.successor_of("token-a"));
        assert_ne!(successor, keys.successor_of("token-b"));
        assert_ne!(successor, other.successor_of("token-a"));
        assert_eq!(successor.len(), 43);
        assert!(!successor.contains("token"));
    }

    fn keys() -> TokenKeys {
        TokenKeys::from_secret(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60))
    }

    #[test]
    fn an_issued_token_verifies_with_its_claims() {
        let device = DeviceId::generate();
        let token = keys().issue(UserId(7), &device, "fam").unwrap_or_default();
        let claims = keys().verify(&token).map_err(|e| e.to_string());
        let claims = claims.expect("token verifies");
        assert_eq!(claims.sub, "7");
        assert_eq!(claims.did, device.as_str());
        assert_eq!(claims.sid, "fam");
    }

    #[test]
    fn a_token_signed_with_another_key_is_rejected() {
        let other = TokenKeys::from_secret(
            b"another-key-another-key-another-key",
            Duration::from_secs(60),
        );
        let token = other
            .issue(UserId(7), &DeviceId::generate(), "fam")
            .unwrap_or_default();
        assert_eq!(keys().identify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn an_expired_token_is_reported_as_expired() {
        let keys = keys();
        let claims = AccessClaims {
            sub: "7".into(),
            did: "d1".into(),
            sid: "fam".into(),
            iat: 1_000,
            exp: 1_060,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding)
            .unwrap_or_default();
        assert_eq!(keys.identify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn garbage_is_an_invalid_token() {
        assert_eq!(keys().identify("not.a.jwt"), Err(TokenError::Invalid));
    }

    #[test]
    fn the_key_file_is_created_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("segue-key-{}", crate::auth::random_token(6)));
        let path = dir.join("token.key");
        let first = load_or_create_key(&path).map_err(|e| e.to_string());
        let second = load_or_create_key(&path).map_err(|e| e.to_string());
        assert!(first.as_ref().is_ok_and(|k| k.len() >= 32));
        assert_eq!(first, second);
        let _ = std::fs::remove_dir_all(dir);
    }
}
