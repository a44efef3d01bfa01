//! Objects in an S3-compatible bucket through `aws-sdk-s3`. For a custom endpoint (R2, MinIO,
//! s3s-fs) the client uses path-style addressing and sends and checks checksums only where
//! the API requires them: since aws-sdk-s3 1.69 it adds CRC32 checksums by default, which
//! some non-AWS stores reject. Every call is bounded in time.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};

use super::{BlobError, BlobKey};

/// Longest a presigned URL may last (the SDK refuses more than a week).
const MAX_PRESIGNED: Duration = Duration::from_secs(7 * 86_400);

/// Where the bucket is and how to reach it.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// A non-AWS endpoint (`https://<account>.r2.cloudflarestorage.com`, `http://127.0.0.1:9000`);
    /// `None` means AWS.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    /// A CDN (or public bucket) in front of the bucket: object URLs are `<base>/<key>`
    /// instead of presigned.
    pub public_base_url: Option<String>,
}

#[derive(Clone)]
pub struct S3Blobs {
    client: aws_sdk_s3::Client,
    bucket: Arc<str>,
    public_base: Option<Arc<str>>,
}

impl S3Blobs {
    pub fn new(settings: &S3Settings) -> Self {
        let credentials = Credentials::new(
            &settings.access_key_id,
            settings.secret_access_key.expose_secret(),
            None,
            None,
            "segue-settings",
        );
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(2))
            .operation_attempt_timeout(Duration::from_secs(10))
            .operation_timeout(Duration::from_secs(30))
            .build();
        let mut config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(credentials)
            .timeout_config(timeouts)
            .force_path_style(true);
        if let Some(endpoint) = &settings.endpoint {
            config = config
                .endpoint_url(endpoint)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Self {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket: settings.bucket.as_str().into(),
            public_base: settings
                .public_base_url
                .as_deref()
                .map(|base| base.trim_end_matches('/').into()),
        }
    }

    /// The SDK's client (tests create buckets with it).
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub(super) fn failed(op: &'static str, key: &str, error: impl std::error::Error) -> BlobError {
        BlobError::S3 {
            op,
            key: key.to_owned(),
            detail: DisplayErrorContext(error).to_string(),
        }
    }

    pub async fn put(
        &self,
        key: &BlobKey,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<(), BlobError> {
        self.client
            .put_object()
            .bucket(&*self.bucket)
            .key(key.as_str())
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| Self::failed("write", key.as_str(), e))?;
        Ok(())
    }

    pub async fn get(&self, key: &BlobKey) -> Result<Option<Bytes>, BlobError> {
        let object = match self
            .client
            .get_object()
            .bucket(&*self.bucket)
            .key(key.as_str())
            .send()
            .await
        {
            Ok(object) => object,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(Self::failed("read", key.as_str(), e)),
        };
        let body = object
            .body
            .collect()
            .await
            .map_err(|e| Self::failed("read", key.as_str(), e))?;
        Ok(Some(body.into_bytes()))
    }

    pub async fn download(&self, key: &BlobKey) -> Result<Option<super::Download>, BlobError> {
        match self
            .client
            .get_object()
            .bucket(&*self.bucket)
            .key(key.as_str())
            .send()
            .await
        {
            Ok(object) => Ok(Some(super::Download::s3(key.clone(), object.body))),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(e) => Err(Self::failed("read", key.as_str(), e)),
        }
    }

    pub async fn exists(&self, key: &BlobKey) -> Result<bool, BlobError> {
        match self
            .client
            .head_object()
            .bucket(&*self.bucket)
            .key(key.as_str())
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(false),
            Err(e) => Err(Self::failed("look up", key.as_str(), e)),
        }
    }

    pub async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        self.client
            .delete_object()
            .bucket(&*self.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|e| Self::failed("delete", key.as_str(), e))?;
        Ok(())
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&*self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Self::failed("list", prefix, e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        Ok(keys)
    }

    /// A URL presigned for `ttl` (at most a week) that downloads the object as a file named
    /// `filename` (never the CDN: downloads are private).
    pub async fn download_url(
        &self,
        key: &BlobKey,
        ttl: Duration,
        filename: &str,
    ) -> Result<String, BlobError> {
        let presigning = PresigningConfig::expires_in(ttl.min(MAX_PRESIGNED))
            .map_err(|e| Self::failed("sign a URL for", key.as_str(), e))?;
        let signed = self
            .client
            .get_object()
            .bucket(&*self.bucket)
            .key(key.as_str())
            .response_content_disposition(format!("attachment; filename=\"{filename}\""))
            .presigned(presigning)
            .await
            .map_err(|e| Self::failed("sign a URL for", key.as_str(), e))?;
        Ok(signed.uri().to_owned())
    }

    /// `<public base>/<key>` when a CDN fronts the bucket, else a URL presigned for `ttl`
    /// (at most a week).
    pub async fn url(&self, key: &BlobKey, ttl: Duration) -> Result<String, BlobError> {
        if let Some(base) = &self.public_base {
            return Ok(format!("{base}/{key}"));
        }
        let presigning = PresigningConfig::expires_in(ttl.min(MAX_PRESIGNED))
            .map_err(|e| Self::failed("sign a URL for", key.as_str(), e))?;
        let signed = self
            .client
            .get_object()
            .bucket(&*self.bucket)
            .key(key.as_str())
            .presigned(presigning)
            .await
            .map_err(|e| Self::failed("sign a URL for", key.as_str(), e))?;
        Ok(signed.uri().to_owned())
    }
}
