//! Objects written as they are made: an export or a backup streams into the store in parts,
//! so memory holds one part, never the object. On S3 a multipart upload of fixed-size parts
//! ([`PART_BYTES`]); locally a temporary file renamed into place when finished. An upload
//! that fails or is dropped unfinished leaves nothing: [`Upload::abort`] aborts the multipart
//! upload (no orphan parts) or deletes the temporary file.

use std::path::PathBuf;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::{BlobError, BlobKey};

/// Bytes per part (S3 wants at least 5 MiB in every part but the last).
pub const PART_BYTES: usize = 8 * 1024 * 1024;

/// An object being written.
pub struct Upload {
    key: BlobKey,
    target: Target,
    buffer: BytesMut,
    written: u64,
}

enum Target {
    Local {
        file: tokio::fs::File,
        temp: PathBuf,
        path: PathBuf,
    },
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        upload_id: String,
        parts: Vec<CompletedPart>,
    },
}

impl Upload {
    pub(super) async fn local(key: BlobKey, path: PathBuf) -> Result<Self, BlobError> {
        let failed = |source| BlobError::Local {
            op: "start writing",
            key: key.as_str().to_owned(),
            source,
        };
        let dir = path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        tokio::fs::create_dir_all(&dir).await.map_err(failed)?;
        let temp = dir.join(format!(
            "{}{}",
            super::local::TEMP_PREFIX,
            crate::auth::random_token(9)
        ));
        let file = tokio::fs::File::create(&temp).await.map_err(failed)?;
        Ok(Self {
            key,
            target: Target::Local { file, temp, path },
            buffer: BytesMut::new(),
            written: 0,
        })
    }

    pub(super) async fn s3(
        key: BlobKey,
        client: aws_sdk_s3::Client,
        bucket: String,
        content_type: &str,
    ) -> Result<Self, BlobError> {
        let started = client
            .create_multipart_upload()
            .bucket(&bucket)
            .key(key.as_str())
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| super::s3::S3Blobs::failed("start writing", key.as_str(), e))?;
        let upload_id = started.upload_id().unwrap_or_default().to_owned();
        Ok(Self {
            key,
            target: Target::S3 {
                client,
                bucket,
                upload_id,
                parts: Vec::new(),
            },
            buffer: BytesMut::with_capacity(PART_BYTES),
            written: 0,
        })
    }

    pub fn key(&self) -> &BlobKey {
        &self.key
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `bytes`; a full part is sent before this returns.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.written += bytes.len() as u64;
        self.buffer.extend_from_slice(bytes);
        while self.buffer.len() >= PART_BYTES {
            let part = self.buffer.split_to(PART_BYTES).freeze();
            self.send(part).await?;
        }
        Ok(())
    }

    async fn send(&mut self, part: Bytes) -> Result<(), BlobError> {
        let key = self.key.as_str().to_owned();
        match &mut self.target {
            Target::Local { file, .. } => {
                file.write_all(&part)
                    .await
                    .map_err(|source| BlobError::Local {
                        op: "write",
                        key,
                        source,
                    })
            }
            Target::S3 {
                client,
                bucket,
                upload_id,
                parts,
            } => {
                let number = i32::try_from(parts.len() + 1).unwrap_or(i32::MAX);
                let sent = client
                    .upload_part()
                    .bucket(bucket.as_str())
                    .key(&key)
                    .upload_id(upload_id.as_str())
                    .part_number(number)
                    .body(ByteStream::from(part))
                    .send()
                    .await
                    .map_err(|e| super::s3::S3Blobs::failed("write a part of", &key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(sent.e_tag().map(str::to_owned))
                        .build(),
                );
                Ok(())
            }
        }
    }

    /// Sends what is left and makes the object whole; returns its size. On failure the
    /// upload is aborted.
    pub async fn finish(mut self) -> Result<u64, BlobError> {
        match self.complete().await {
            Ok(()) => Ok(self.written),
            Err(error) => {
                self.abort().await;
                Err(error)
            }
        }
    }

    async fn complete(&mut self) -> Result<(), BlobError> {
        let rest = self.buffer.split().freeze();
        let key = self.key.as_str().to_owned();
        // A multipart upload needs one part, even an empty one.
        let needs_part = matches!(&self.target, Target::S3 { parts, .. } if parts.is_empty());
        if !rest.is_empty() || needs_part {
            self.send(rest).await?;
        }
        match &mut self.target {
            Target::Local { file, temp, path } => {
                let failed = |source| BlobError::Local {
                    op: "finish writing",
                    key: key.clone(),
                    source,
                };
                file.flush().await.map_err(failed)?;
                file.sync_all().await.map_err(failed)?;
                tokio::fs::rename(&temp, &path).await.map_err(failed)
            }
            Target::S3 {
                client,
                bucket,
                upload_id,
                parts,
            } => {
                client
                    .complete_multipart_upload()
                    .bucket(bucket.as_str())
                    .key(&key)
                    .upload_id(upload_id.as_str())
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(std::mem::take(parts)))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| super::s3::S3Blobs::failed("finish writing", &key, e))?;
                Ok(())
            }
        }
    }

    /// Gives the upload up: nothing of it stays (best effort; logged when that fails).
    pub async fn abort(self) {
        let key = self.key.as_str().to_owned();
        match self.target {
            Target::Local { file, temp, .. } => {
                drop(file);
                if let Err(error) = tokio::fs::remove_file(&temp).await
                    && error.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(%error, key, "could not remove an unfinished upload");
                }
            }
            Target::S3 {
                client,
                bucket,
                upload_id,
                ..
            } => {
                let aborted = client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(&key)
                    .upload_id(upload_id)
                    .send()
                    .await;
                if let Err(error) = aborted {
                    let error = aws_sdk_s3::error::DisplayErrorContext(error);
                    tracing::warn!(%error, key, "could not abort a multipart upload");
                }
            }
        }
    }
}
