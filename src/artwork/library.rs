//! The artwork library: what the hub knows of every artwork, and the one place that renders
//! and stores it. A report's image is identified by its SHA-256; a hash this replica
//! verified lately costs nothing, a new one is staged once and rendered by one job, and a
//! known one whose objects vanished is rendered again from the next report that brings it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::staging::{Staged, Staging, StagingError};
use super::{ArtworkError, Limits, Processed, object_key};
use crate::blobs::{BlobKey, Blobs};
use crate::store::artwork::{self as rows, ArtworkRecord, StoredFile, StoredSize};
use crate::store::{Store, StoreError};
use crate::telemetry::ArtworkMetrics;

/// Most artwork hashes a replica remembers as verified.
const KNOWN_CAPACITY: u64 = 100_000;

/// What the library needs to know.
#[derive(Debug, Clone, Copy)]
pub struct LibrarySettings {
    pub limits: Limits,
    /// Images decoded at once on this replica.
    pub renders: usize,
    /// Longest one render may take.
    pub render_timeout: Duration,
    /// How long a verified hash is trusted without looking at its objects again (0: never).
    pub verified_for: Duration,
}

/// Why rendering an artwork did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The image will never render: refused before or while decoding.
    #[error("artwork refused: {0}")]
    Refused(#[from] ArtworkError),
    /// The source bytes are gone (staging expired) and the objects are not all there.
    #[error("artwork {0}: no source bytes to render from")]
    NoSource(String),
    /// A part was away (the store, the blob store, staging): worth trying again.
    #[error("{0}")]
    Retry(String),
}

impl From<StoreError> for RenderError {
    fn from(error: StoreError) -> Self {
        Self::Retry(error.to_string())
    }
}

impl From<StagingError> for RenderError {
    fn from(error: StagingError) -> Self {
        Self::Retry(error.to_string())
    }
}

/// What a report's image became at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    pub hash: String,
    /// Unless this replica knows the artwork is rendered and stored: the staging the report
    /// must enqueue the artwork job for, idempotent by (hash, staging), so the reports of one
    /// staged cover make one job, and a cover staged by a report that died before enqueueing
    /// still gets one from the next report.
    pub staging: Option<String>,
}

/// Why a report's image was not taken.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// Not an image the hub renders (told without decoding it).
    #[error(transparent)]
    Refused(#[from] ArtworkError),
    /// Staging is at its budget of bytes: try again later.
    #[error("too many covers are waiting to be rendered")]
    Busy,
    #[error(transparent)]
    Staging(#[from] StagingError),
}

#[derive(Clone)]
pub struct Library {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    blobs: Blobs,
    staging: Staging,
    settings: LibrarySettings,
    renders: Arc<Semaphore>,
    /// Hashes whose row and objects this replica saw lately.
    known: moka::sync::Cache<String, ()>,
    metrics: ArtworkMetrics,
}

impl Library {
    pub fn new(
        store: Store,
        blobs: Blobs,
        staging: Staging,
        settings: LibrarySettings,
        metrics: ArtworkMetrics,
    ) -> Self {
        let known = moka::sync::Cache::builder()
            .max_capacity(KNOWN_CAPACITY)
            .time_to_live(settings.verified_for.max(Duration::from_millis(1)))
            .build();
        Self {
            inner: Arc::new(Inner {
                store,
                blobs,
                staging,
                renders: Arc::new(Semaphore::new(settings.renders.max(1))),
                settings,
                known,
                metrics,
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        self.inner.settings.limits
    }

    pub fn blobs(&self) -> &Blobs {
        &self.inner.blobs
    }

    /// Takes a reported image (already within the byte cap): checks its header, hashes it and,
    /// unless this replica knows it, stages it for the artwork job. Known artwork is neither
    /// staged nor rendered.
    pub async fn offer(&self, bytes: Bytes, account: i64) -> Result<Offered, OfferError> {
        let checked = bytes.clone();
        let limits = self.inner.settings.limits;
        let hash = tokio::task::spawn_blocking(move || {
            super::inspect(&checked, &limits).map(|_| super::hash(&checked))
        })
        .await
        .map_err(|e| StagingError::Local(std::io::Error::other(e)))?;
        let hash = hash.inspect_err(|refused| {
            self.inner
                .metrics
                .refused
                .with_label_values(&[refused.reason()])
                .inc();
        })?;
        if self.is_known(&hash) {
            self.inner.metrics.known.inc();
            return Ok(Offered {
                hash,
                staging: None,
            });
        }
        let max_cover = limits.max_bytes as u64;
        match self
            .inner
            .staging
            .stage(&hash, bytes, account, max_cover)
            .await?
        {
            Staged::New(generation) | Staged::Already(generation) => Ok(Offered {
                hash,
                staging: Some(generation),
            }),
            Staged::Full => Err(OfferError::Busy),
        }
    }

    /// Gives up a staged image (its job is done, or can never succeed).
    async fn unstage(&self, hash: &str) {
        if let Err(error) = self.inner.staging.remove(hash).await {
            tracing::warn!(%error, hash, "could not remove staged artwork");
        }
    }

    fn is_known(&self, hash: &str) -> bool {
        !self.inner.settings.verified_for.is_zero() && self.inner.known.contains_key(hash)
    }

    fn remember(&self, hash: &str) {
        if !self.inner.settings.verified_for.is_zero() {
            self.inner.known.insert(hash.to_owned(), ());
        }
    }

    /// The artwork's row, if it was rendered.
    pub async fn record(&self, hash: &str) -> Result<Option<ArtworkRecord>, StoreError> {
        let mut pooled = self.inner.store.conn().await?;
        rows::find(&mut pooled.conn(), hash).await
    }

    /// Makes sure artwork `hash` is rendered and every object is stored: a row whose objects
    /// are all there costs a check of each; otherwise the staged source is decoded, rendered
    /// and uploaded, and the row written. The staged source is removed once this succeeds or
    /// can never succeed (`last_try`: the job's final attempt).
    /// `attempt` counts from 0: a render that runs out of time is tried once more (the machine
    /// may have been busy), then refused.
    pub async fn render(
        &self,
        hash: &str,
        attempt: u32,
        last_try: bool,
    ) -> Result<ArtworkRecord, RenderError> {
        let outcome = self.render_once(hash, attempt).await;
        let finished = match &outcome {
            Ok(_) | Err(RenderError::Refused(_) | RenderError::NoSource(_)) => true,
            Err(RenderError::Retry(_)) => last_try,
        };
        if finished {
            self.unstage(hash).await;
        }
        if let Err(error) = &outcome {
            let reason = match error {
                RenderError::Refused(refused) => refused.reason(),
                RenderError::NoSource(_) => "no_source",
                RenderError::Retry(_) => "unavailable",
            };
            if !matches!(error, RenderError::Retry(_)) {
                self.inner
                    .metrics
                    .refused
                    .with_label_values(&[reason])
                    .inc();
            }
            tracing::warn!(hash, %error, reason, "artwork not rendered");
        }
        outcome
    }

    async fn render_once(&self, hash: &str, attempt: u32) -> Result<ArtworkRecord, RenderError> {
        let existing = self.record(hash).await?;
        if let Some(record) = &existing
            && self.all_stored(record).await?
        {
            self.inner.metrics.verified.inc();
            self.remember(hash);
            return Ok(record.clone());
        }
        let Some(bytes) = self.inner.staging.load(hash).await? else {
            return Err(RenderError::NoSource(hash.to_owned()));
        };
        let processed = self.process(bytes.clone(), attempt).await?;
        let record = self.store_renditions(hash, bytes.len(), processed).await?;
        let mut pooled = self.inner.store.conn().await?;
        rows::save(&mut pooled.conn(), &record, crate::store::now()).await?;
        self.remember(hash);
        Ok(record)
    }

    /// Whether every object of `record` is in the blob store.
    async fn all_stored(&self, record: &ArtworkRecord) -> Result<bool, RenderError> {
        let checks = record
            .sizes
            .iter()
            .flat_map(|size| &size.files)
            .map(|file| async {
                let key =
                    BlobKey::parse(&file.key).map_err(|e| RenderError::Retry(e.to_string()))?;
                self.inner
                    .blobs
                    .exists(&key)
                    .await
                    .map_err(|e| RenderError::Retry(e.to_string()))
            });
        let found = futures_util::future::try_join_all(checks).await?;
        Ok(!found.is_empty() && found.into_iter().all(|there| there))
    }

    /// Decodes and renders on the blocking pool, at most `renders` at once; the permit stays
    /// with the work, so a render that timed out still counts until it really ends.
    async fn process(&self, bytes: Bytes, attempt: u32) -> Result<Processed, RenderError> {
        let permit = self
            .inner
            .renders
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| RenderError::Retry(e.to_string()))?;
        let limits = self.inner.settings.limits;
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            super::process(&bytes, &limits)
        });
        let timeout = self.inner.settings.render_timeout;
        // Running out of time once may say the machine was busy, not that the image is bad:
        // one more attempt (maybe on another replica) may finish. Twice, it is refused, so an
        // image that always takes too long holds a render slot twice, not for every retry.
        let processed = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| match attempt {
                0 => RenderError::Retry(format!("rendering took over {timeout:?}")),
                _ => RenderError::Refused(ArtworkError::TooSlow),
            })?
            .map_err(|e| RenderError::Retry(e.to_string()))??;
        self.inner.metrics.rendered.inc();
        Ok(processed)
    }

    /// Uploads every rendition (all at once) and describes them for the row.
    async fn store_renditions(
        &self,
        hash: &str,
        source_bytes: usize,
        processed: Processed,
    ) -> Result<ArtworkRecord, RenderError> {
        let mut sizes: Vec<StoredSize> = Vec::new();
        let mut uploads = Vec::new();
        for rendition in processed.renditions {
            let key = object_key(hash, rendition.size, rendition.format);
            let file = StoredFile {
                format: rendition.format.extension().to_owned(),
                key: key.clone(),
                bytes: rendition.bytes.len() as u64,
            };
            match sizes.iter_mut().find(|s| s.size == rendition.size) {
                Some(size) => size.files.push(file),
                None => sizes.push(StoredSize {
                    size: rendition.size.to_owned(),
                    width: rendition.width,
                    height: rendition.height,
                    files: vec![file],
                }),
            }
            let blobs = self.inner.blobs.clone();
            let content_type = rendition.format.content_type();
            let bytes = Bytes::from(rendition.bytes);
            uploads.push(async move {
                let key = BlobKey::parse(&key).map_err(|e| RenderError::Retry(e.to_string()))?;
                blobs
                    .put(&key, bytes, content_type)
                    .await
                    .map_err(|e| RenderError::Retry(e.to_string()))
            });
        }
        let count = uploads.len() as u64;
        futures_util::future::try_join_all(uploads).await?;
        self.inner.metrics.uploaded.inc_by(count);
        Ok(ArtworkRecord {
            hash: hash.to_owned(),
            source_bytes: source_bytes as u64,
            source_width: processed.width,
            source_height: processed.height,
            sizes,
        })
    }
}
