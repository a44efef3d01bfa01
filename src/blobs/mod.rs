//! Object storage for artwork and exports: a port with two implementations and one
//! acceptance suite (`tests/api/blobs.rs`). [`LocalBlobs`] keeps objects in a directory under
//! `$SEGUE_DATA_DIR` (the embedded default; written to a temporary file, synced, then renamed
//! into place, so a reader never sees half an object); [`S3Blobs`] keeps them in an
//! S3-compatible bucket through `aws-sdk-s3`, set up so that non-AWS stores (R2, MinIO,
//! s3s-fs) accept it (path-style addressing, checksums only where required).
//!
//! Keys are content-addressed by their users (`artwork/<sha256>/<size>.webp`), so writing one
//! twice is harmless.

mod download;
mod local;
mod s3;
mod upload;

use std::time::Duration;

use bytes::Bytes;

pub use self::download::Download;
pub use self::local::LocalBlobs;
pub use self::s3::{S3Blobs, S3Settings};
pub use self::upload::{PART_BYTES, Upload};

/// Longest key accepted.
const MAX_KEY_BYTES: usize = 512;

/// A key that may not name an object: empty, too long, absolute, with `..` or an empty
/// segment, or with characters outside `[A-Za-z0-9._-/]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} cannot name an object: use 1 to 512 of [A-Za-z0-9._-] in /-separated segments")]
pub struct BadKey(pub String);

/// An object's key, checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobKey(String);

impl BlobKey {
    pub fn parse(raw: &str) -> Result<Self, BadKey> {
        let bad = || BadKey(raw.to_owned());
        if raw.is_empty() || raw.len() > MAX_KEY_BYTES {
            return Err(bad());
        }
        for segment in raw.split('/') {
            let allowed = segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if segment.is_empty() || segment == "." || segment == ".." || !allowed {
                return Err(bad());
            }
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The store failed: which operation, and why.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the local blob directory failed to {op} {key}: {source}")]
    Local {
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the object store failed to {op} {key}: {detail}")]
    S3 {
        op: &'static str,
        key: String,
        detail: String,
    },
}

/// Where a client can fetch an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobUrl {
    /// The hub serves it (the local store).
    Hub,
    /// A presigned URL, valid for a while, or the public base (a CDN) plus the key.
    External(String),
}

/// The object store of this hub.
#[derive(Clone)]
pub enum Blobs {
    Local(LocalBlobs),
    S3(S3Blobs),
}

impl Blobs {
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Local(_) => "local",
            Self::S3(_) => "s3",
        }
    }

    /// Stores `bytes` under `key` (replacing what was there).
    pub async fn put(
        &self,
        key: &BlobKey,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<(), BlobError> {
        match self {
            Self::Local(local) => local.put(key, bytes).await,
            Self::S3(s3) => s3.put(key, bytes, content_type).await,
        }
    }

    /// Starts writing an object in parts (see [`Upload`]); it replaces what `key` held once
    /// finished.
    pub async fn upload(&self, key: &BlobKey, content_type: &str) -> Result<Upload, BlobError> {
        match self {
            Self::Local(local) => Upload::local(key.clone(), local.path(key)).await,
            Self::S3(s3) => {
                Upload::s3(
                    key.clone(),
                    s3.client().clone(),
                    s3.bucket().to_owned(),
                    content_type,
                )
                .await
            }
        }
    }

    /// The object's bytes, or `None` when there is none.
    pub async fn get(&self, key: &BlobKey) -> Result<Option<Bytes>, BlobError> {
        match self {
            Self::Local(local) => local.get(key).await,
            Self::S3(s3) => s3.get(key).await,
        }
    }

    /// The object to read a chunk at a time (see [`Download`]), or `None` when there is none.
    pub async fn download(&self, key: &BlobKey) -> Result<Option<Download>, BlobError> {
        match self {
            Self::Local(local) => local.download(key).await,
            Self::S3(s3) => s3.download(key).await,
        }
    }

    /// Whether the object is there (without reading it).
    pub async fn exists(&self, key: &BlobKey) -> Result<bool, BlobError> {
        match self {
            Self::Local(local) => local.exists(key).await,
            Self::S3(s3) => s3.exists(key).await,
        }
    }

    /// Deletes the object; deleting one that is not there is no error.
    pub async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        match self {
            Self::Local(local) => local.delete(key).await,
            Self::S3(s3) => s3.delete(key).await,
        }
    }

    /// The keys under `prefix` (a key prefix ending in `/`, or empty for all), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let mut keys = match self {
            Self::Local(local) => local.list(prefix).await?,
            Self::S3(s3) => s3.list(prefix).await?,
        };
        keys.sort();
        Ok(keys)
    }

    /// Where a client can fetch the object for the next `ttl`.
    pub async fn url(&self, key: &BlobKey, ttl: Duration) -> Result<BlobUrl, BlobError> {
        match self {
            Self::Local(_) => Ok(BlobUrl::Hub),
            Self::S3(s3) => s3.url(key, ttl).await.map(BlobUrl::External),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_relative_segments_of_safe_characters() {
        for good in [
            "a",
            "artwork/ab12/thumb.webp",
            "exports/2026-12-02/u_1.json.gz",
        ] {
            assert!(BlobKey::parse(good).is_ok(), "{good}");
        }
        let long = "a".repeat(513);
        for bad in [
            "", "/abs", "a//b", "../up", "a/../b", "a/./b", "a/", "sp ace", "ü", "a\\b", &long,
        ] {
            assert!(BlobKey::parse(bad).is_err(), "{bad:?}");
        }
    }
}
