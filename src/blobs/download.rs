//! Objects read as they arrive: a restore streams a backup out of the store a chunk at a
//! time (as the SDK or the file yields it), so memory holds a chunk, never the object.

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{BlobError, BlobKey};

/// Bytes read from a local file at a time.
const LOCAL_CHUNK: usize = 256 * 1024;

/// An object being read.
pub struct Download {
    key: BlobKey,
    source: Source,
}

enum Source {
    Local(tokio::fs::File),
    S3(ByteStream),
}

impl Download {
    pub(super) fn local(key: BlobKey, file: tokio::fs::File) -> Self {
        Self {
            key,
            source: Source::Local(file),
        }
    }

    pub(super) fn s3(key: BlobKey, body: ByteStream) -> Self {
        Self {
            key,
            source: Source::S3(body),
        }
    }

    /// The next bytes of the object, or `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BlobError> {
        match &mut self.source {
            Source::Local(file) => {
                let mut chunk = vec![0u8; LOCAL_CHUNK];
                let read = file
                    .read(&mut chunk)
                    .await
                    .map_err(|source| BlobError::Local {
                        op: "read",
                        key: self.key.as_str().to_owned(),
                        source,
                    })?;
                chunk.truncate(read);
                Ok((read > 0).then(|| Bytes::from(chunk)))
            }
            Source::S3(body) => body
                .try_next()
                .await
                .map_err(|e| super::s3::S3Blobs::failed("read", self.key.as_str(), e)),
        }
    }
}
