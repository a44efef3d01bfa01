//! Exports: a listener's data, theirs to take away (`POST /exports`). A job ([`BUILD`]) reads
//! the store in pages (by key, so a page costs the same however deep into the history) and
//! streams what it writes into the blob store as it goes ([`crate::blobs::Upload`]: fixed-size
//! multipart parts on S3), so memory does not grow with the history. When it is done the
//! user's devices get `export_ready` on `devices:{user}`, and `GET /exports/{id}` gives a
//! short-lived download link. A periodic job ([`EXPIRE`]) deletes expired exports.
//!
//! * `plays_csv`: every play, one row each (RFC 4180, a header row). Text cells that a
//!   spreadsheet would read as a formula (starting `=`, `+`, `-`, `@`, tab or carriage return)
//!   are prefixed with `'`.
//! * `account_json`: everything the store holds about the account: profile, preferences,
//!   devices, queue, follows, overlays (never their tokens) and plays.

use std::time::Duration;

use actix::Addr;
use chrono::{NaiveDateTime, TimeDelta};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::blobs::{BlobError, BlobKey, Blobs, Upload};
use crate::domain::UserId;
use crate::jobs::scheduler::Tick;
use crate::jobs::{Failure, Handlers, Job, Kind};
use crate::realtime::events::UserEvent;
use crate::realtime::hub::{Hub, Publish};
use crate::store::exports::{self as rows, Export, ExportedPlay};
use crate::store::{Store, StoreError, devices, follows, overlays, preferences, queue, users};

/// Builds one export.
pub const BUILD: Kind<BuildJob> = Kind::new("export.build");

/// Deletes expired exports (periodic, `exports_sweep_schedule`).
pub const EXPIRE: Kind<Tick> = Kind::new("exports.expire");

/// The name the expiry's schedule runs under.
pub const EXPIRE_JOB: &str = "exports.expire";

/// Plays read per page.
const PAGE: i64 = 2_000;

/// Expired exports one run deletes.
const EXPIRE_BATCH: i64 = 500;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildJob {
    pub id: String,
}

/// What an export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    PlaysCsv,
    AccountJson,
}

impl ExportKind {
    pub const ALL: [Self; 2] = [Self::PlaysCsv, Self::AccountJson];

    pub fn name(self) -> &'static str {
        match self {
            Self::PlaysCsv => "plays_csv",
            Self::AccountJson => "account_json",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::PlaysCsv => "text/csv; charset=utf-8",
            Self::AccountJson => "application/json",
        }
    }

    /// The file name a download gets: `segue-plays-2026-12-02.csv`.
    pub fn file_name(self, created_at: NaiveDateTime) -> String {
        let day = created_at.format("%Y-%m-%d");
        match self {
            Self::PlaysCsv => format!("segue-plays-{day}.csv"),
            Self::AccountJson => format!("segue-account-{day}.json"),
        }
    }
}

/// The object key of export `id`.
pub fn object_key(export: &Export, kind: ExportKind) -> String {
    let extension = match kind {
        ExportKind::PlaysCsv => "csv",
        ExportKind::AccountJson => "json",
    };
    format!("exports/{}/{}.{extension}", export.user_id, export.id)
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("could not encode the export: {0}")]
    Encode(String),
}

/// What the export jobs work with.
#[derive(Clone)]
pub struct Exporter {
    pub store: Store,
    pub blobs: Blobs,
    pub hub: Addr<Hub>,
    /// How long a finished (or failed) export is kept.
    pub keep: Duration,
    /// The jobs port's attempts per job (the last one's failure marks the export failed).
    pub max_attempts: u32,
}

impl Exporter {
    /// Adds the export jobs' handlers to `handlers`.
    pub fn handlers(self, handlers: Handlers) -> Handlers {
        let expiring = self.clone();
        handlers
            .on(&BUILD, move |job: Job<BuildJob>| {
                let exporter = self.clone();
                async move {
                    let last_try = job.attempt + 1 >= exporter.max_attempts;
                    exporter.build(&job.payload.id, last_try).await
                }
            })
            .on(&EXPIRE, move |_: Job<Tick>| {
                let exporter = expiring.clone();
                async move {
                    let deleted = exporter
                        .expire(crate::store::now())
                        .await
                        .map_err(|e| Failure::Retry(crate::error::chain(&e)))?;
                    if deleted > 0 {
                        tracing::info!(deleted, "deleted expired exports");
                    }
                    Ok(())
                }
            })
    }

    fn kept_until(&self, now: NaiveDateTime) -> NaiveDateTime {
        now + TimeDelta::from_std(self.keep).unwrap_or(TimeDelta::days(7))
    }

    async fn build(&self, id: &str, last_try: bool) -> Result<(), Failure> {
        let retry = |e: ExportError| Failure::Retry(crate::error::chain(&e));
        let export = {
            let mut pooled = self.store.conn().await.map_err(|e| retry(e.into()))?;
            let mut conn = pooled.conn();
            let Some(export) = rows::by_id(&mut conn, id)
                .await
                .map_err(|e| retry(e.into()))?
            else {
                return Err(Failure::Permanent(format!("no export {id:?}")));
            };
            // A replayed job for a finished export does nothing.
            if !rows::start(&mut conn, id)
                .await
                .map_err(|e| retry(e.into()))?
            {
                return Ok(());
            }
            export
        };
        let Some(kind) = ExportKind::parse(&export.kind) else {
            return Err(Failure::Permanent(format!(
                "unknown export kind {:?}",
                export.kind
            )));
        };
        match self.write(&export, kind).await {
            Ok((rows_written, bytes, key)) => {
                let now = crate::store::now();
                let mut pooled = self.store.conn().await.map_err(|e| retry(e.into()))?;
                rows::finish(
                    &mut pooled.conn(),
                    id,
                    rows_written,
                    i64::try_from(bytes).unwrap_or(i64::MAX),
                    &key,
                    now,
                    self.kept_until(now),
                )
                .await
                .map_err(|e| retry(e.into()))?;
                self.tell(&export, "done", rows_written, bytes);
                Ok(())
            }
            Err(error) => {
                let why = crate::error::chain(&error);
                if last_try {
                    let now = crate::store::now();
                    let until = self.kept_until(now);
                    let marked = async {
                        let mut pooled = self.store.conn().await?;
                        rows::fail(&mut pooled.conn(), id, &why, now, until).await
                    };
                    if let Err(e) = marked.await {
                        tracing::warn!(error = %e, id, "could not mark an export failed");
                    }
                    self.tell(&export, "failed", 0, 0);
                }
                Err(Failure::Retry(why))
            }
        }
    }

    /// `export_ready` on the user's devices topic, on every replica.
    fn tell(&self, export: &Export, status: &str, rows: i64, bytes: u64) {
        let user = UserId(export.user_id);
        self.hub.do_send(Publish {
            user,
            event: UserEvent::Push {
                topic: format!("devices:{user}"),
                event: "export_ready".into(),
                payload: json!({
                    "id": export.id,
                    "kind": export.kind,
                    "status": status,
                    "rows": rows,
                    "bytes": bytes,
                }),
                revision: None,
            },
        });
    }

    /// Writes the export into the blob store: its rows, bytes and key.
    async fn write(
        &self,
        export: &Export,
        kind: ExportKind,
    ) -> Result<(i64, u64, String), ExportError> {
        let key = object_key(export, kind);
        let blob_key = BlobKey::parse(&key).map_err(|e| ExportError::Encode(e.to_string()))?;
        let mut upload = self.blobs.upload(&blob_key, kind.content_type()).await?;
        let user = UserId(export.user_id);
        let written = match kind {
            ExportKind::PlaysCsv => self.plays_csv(user, &mut upload).await,
            ExportKind::AccountJson => self.account_json(user, &mut upload).await,
        };
        match written {
            Ok(rows) => {
                let bytes = upload.finish().await?;
                Ok((rows, bytes, key))
            }
            Err(error) => {
                upload.abort().await;
                Err(error)
            }
        }
    }

    /// Every play, page by page, as CSV rows.
    async fn plays_csv(&self, user: UserId, upload: &mut Upload) -> Result<i64, ExportError> {
        let mut page = csv_page();
        page.write_record(CSV_HEADER)
            .map_err(|e| ExportError::Encode(e.to_string()))?;
        let mut buffer = into_bytes(page)?;
        let (mut after, mut count) = (0, 0);
        loop {
            let plays = self.page(user, after).await?;
            let Some(last) = plays.last() else { break };
            after = last.id;
            count += plays.len() as i64;
            let mut page = csv_page();
            for play in &plays {
                page.write_record(csv_row(play))
                    .map_err(|e| ExportError::Encode(e.to_string()))?;
            }
            buffer.extend(into_bytes(page)?);
            upload.write(&buffer).await?;
            buffer.clear();
        }
        upload.write(&buffer).await?;
        Ok(count)
    }

    async fn page(&self, user: UserId, after: i64) -> Result<Vec<ExportedPlay>, ExportError> {
        let mut pooled = self.store.conn().await?;
        Ok(rows::plays_page(&mut pooled.conn(), user, after, PAGE).await?)
    }

    /// The account as one JSON object, its plays streamed last.
    async fn account_json(&self, user: UserId, upload: &mut Upload) -> Result<i64, ExportError> {
        let head = self.account(user).await?;
        let mut text =
            serde_json::to_string(&head).map_err(|e| ExportError::Encode(e.to_string()))?;
        // `{…}` → `{…,"plays":[`: the plays follow, page by page.
        text.pop();
        text.push_str(",\"plays\":[");
        upload.write(text.as_bytes()).await?;
        let (mut after, mut count) = (0, 0);
        loop {
            let plays = self.page(user, after).await?;
            let Some(last) = plays.last() else { break };
            after = last.id;
            let mut chunk = Vec::new();
            for play in &plays {
                if count > 0 {
                    chunk.push(b',');
                }
                serde_json::to_writer(&mut chunk, &play_json(play))
                    .map_err(|e| ExportError::Encode(e.to_string()))?;
                count += 1;
            }
            upload.write(&chunk).await?;
        }
        upload.write(b"]}").await?;
        Ok(count)
    }

    /// Everything but the plays.
    async fn account(&self, user: UserId) -> Result<Value, ExportError> {
        let mut pooled = self.store.conn().await?;
        let mut conn = pooled.conn();
        let profile = users::find(&mut conn, user).await?;
        let prefs = preferences::load(&mut conn, user).await?;
        let owned_devices = devices::list(&mut conn, user).await?;
        let stored_queue = queue::load(&mut conn, user).await?;
        let following = follows::following(&mut conn, user).await?;
        let owned_overlays = overlays::list(&mut conn, user).await?;
        let time = |t: NaiveDateTime| t.and_utc().to_rfc3339();
        Ok(json!({
            "format": "segue.account.v1",
            "exported_at": time(crate::store::now()),
            "profile": profile.map(|p| json!({
                "id": p.id,
                "handle": p.handle,
                "display_name": p.display_name,
                "created_at": time(p.created_at),
            })),
            "preferences": prefs,
            "devices": owned_devices.iter().map(|d| json!({
                "device_id": d.device_id,
                "name": d.name,
                "kind": d.kind,
                "created_at": time(d.created_at),
                "last_seen_at": time(d.last_seen_at),
            })).collect::<Vec<_>>(),
            "queue": stored_queue.map(|q| json!({
                "state": q.state,
                "revision": q.revision,
                "updated_by_device": q.updated_by_device,
            })),
            "follows": following.iter().map(|f| json!({
                "id": f.id,
                "handle": f.handle,
                "display_name": f.display_name,
            })).collect::<Vec<_>>(),
            "overlays": owned_overlays.iter().map(|o| json!({
                "id": o.id,
                "name": o.name,
                "created_at": time(o.created_at),
            })).collect::<Vec<_>>(),
        }))
    }

    /// Deletes exports whose time is up: object first, then row (a failure leaves the row
    /// for the next run). Returns how many went.
    pub async fn expire(&self, now: NaiveDateTime) -> Result<usize, ExportError> {
        let expired = {
            let mut pooled = self.store.conn().await?;
            rows::expired(&mut pooled.conn(), now, EXPIRE_BATCH).await?
        };
        let mut deleted = 0;
        for export in expired {
            if let Some(key) = &export.object_key {
                let key = BlobKey::parse(key).map_err(|e| ExportError::Encode(e.to_string()))?;
                self.blobs.delete(&key).await?;
            }
            let mut pooled = self.store.conn().await?;
            rows::delete(&mut pooled.conn(), &export.id).await?;
            deleted += 1;
        }
        Ok(deleted)
    }
}

/// The CSV's columns.
pub const CSV_HEADER: [&str; 9] = [
    "played_at",
    "started_at",
    "listened_ms",
    "track_id",
    "title",
    "artist",
    "album",
    "device_id",
    "device_name",
];

fn csv_page() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .has_headers(false)
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new())
}

fn into_bytes(page: csv::Writer<Vec<u8>>) -> Result<Vec<u8>, ExportError> {
    page.into_inner()
        .map_err(|e| ExportError::Encode(e.to_string()))
}

/// A text cell a spreadsheet will not run: one that would start a formula gets a `'` first.
pub fn formula_safe(text: &str) -> String {
    match text.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{text}"),
        _ => text.to_owned(),
    }
}

fn rfc3339(t: NaiveDateTime) -> String {
    t.and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn csv_row(play: &ExportedPlay) -> [String; 9] {
    let text = |t: &Option<String>| t.as_deref().map(formula_safe).unwrap_or_default();
    [
        rfc3339(play.played_at),
        play.started_at.map(rfc3339).unwrap_or_default(),
        play.listened_ms
            .map(|ms| ms.to_string())
            .unwrap_or_default(),
        formula_safe(&play.track_id),
        text(&play.title),
        text(&play.artist),
        text(&play.album),
        text(&play.device_id),
        text(&play.device_name),
    ]
}

fn play_json(play: &ExportedPlay) -> Value {
    json!({
        "played_at": rfc3339(play.played_at),
        "started_at": play.started_at.map(rfc3339),
        "listened_ms": play.listened_ms,
        "track_id": play.track_id,
        "title": play.title,
        "artist": play.artist,
        "album": play.album,
        "device_id": play.device_id,
        "device_name": play.device_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_that_would_start_a_formula_are_defused() {
        for (raw, safe) in [
            ("=SUM(A1:A9)", "'=SUM(A1:A9)"),
            ("+1", "'+1"),
            ("-2", "'-2"),
            ("@cmd", "'@cmd"),
            ("\tx", "'\tx"),
            ("Plain, \"quoted\"", "Plain, \"quoted\""),
            ("", ""),
        ] {
            assert_eq!(formula_safe(raw), safe, "{raw:?}");
        }
    }

    #[test]
    fn kinds_have_names_types_and_file_names() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 2)
            .unwrap()
            .and_hms_opt(3, 0, 0)
            .unwrap();
        assert_eq!(ExportKind::parse("plays_csv"), Some(ExportKind::PlaysCsv));
        assert_eq!(ExportKind::parse("everything"), None);
        assert_eq!(
            ExportKind::AccountJson.file_name(day),
            "segue-account-2026-12-02.json"
        );
    }
}
