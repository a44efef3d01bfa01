//! The pipeline's jobs: applying a report, and telling plays their artwork is ready.

use chrono::DateTime;
use scoped_futures::ScopedFutureExt;
use serde_json::{Value, json};

use super::{Pipeline, PlayJob};
use crate::domain::{Device, UserId};
use crate::presence::plays::PlayTracker;
use crate::presence::{NowPlaying, REST_OWNER, instance_id, now_ms};
use crate::realtime::events::{ReplicaEvent, UserEvent};
use crate::realtime::hub::{Announce, Publish};
use crate::realtime::presence::PipelinePlaying;
use crate::store::artwork::{self as rows, ArtworkRecord};
use crate::store::catalog::{self, Reported, TrackView};
use crate::store::ingests::{self, Applied};
use crate::store::{StoreError, devices, plays};

/// How long after a playing track's expected end its presence lasts without another report.
const END_GRACE_MS: i64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the presence registry failed: {0}")]
    Registry(String),
    #[error("stored play state is unreadable: {0}")]
    Corrupt(String),
}

impl From<diesel::result::Error> for PipelineError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Store(StoreError::Query(error))
    }
}

/// What applying a report did.
#[derive(Debug)]
struct Outcome {
    track_id: String,
    /// Whether this is the device's newest report (an older one, applied late, is recorded
    /// but not shown).
    newest: bool,
    /// The track's artwork changed (cached copies of the track are stale).
    artwork_changed: bool,
}

fn timestamp(ms: i64) -> chrono::NaiveDateTime {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.naive_utc())
        .unwrap_or_else(crate::store::now)
}

impl Pipeline {
    /// Applies one report: its effects in the store happen once per ingest id; what is shown
    /// (presence, the `track` push) is shown again by a replay, which is harmless.
    pub async fn apply_play(&self, job: &PlayJob) -> Result<(), PipelineError> {
        let user = UserId(job.user);
        let outcome = self.record(job).await?;
        if outcome.artwork_changed {
            self.tracks_changed(vec![outcome.track_id.clone()]).await;
        }
        let mut track = self.track(&outcome.track_id).await?;
        if let (Some(hash), Some(found)) = (&job.artwork, &track)
            && found.artwork.is_none()
        {
            // Shown without artwork for now: the artwork job tells this device when it is
            // ready. If it became ready meanwhile, this play takes its own notice back.
            let mut pooled = self.store.conn().await?;
            let mut conn = pooled.conn();
            let now = crate::store::now();
            rows::wait_for(&mut conn, hash, user, &job.device_id, &found.id, now).await?;
            if rows::find(&mut conn, hash).await?.is_some() {
                rows::take_waiters(&mut conn, hash, Some((user, &job.device_id))).await?;
                drop(pooled);
                self.tracks_changed(vec![outcome.track_id.clone()]).await;
                track = self.track(&outcome.track_id).await?;
            }
        }
        if !outcome.newest {
            return Ok(());
        }
        let device = self.device(user, &job.device_id).await?;
        let report = &job.report;
        let now_playing = NowPlaying {
            track_id: outcome.track_id,
            progress_ms: report.progress_ms,
            is_playing: report.is_playing,
            at: job.received_at,
            track,
        };
        self.show(
            user,
            device,
            now_playing,
            Some(&job.ingest_id),
            report.source.as_deref(),
        );
        Ok(())
    }

    /// The report's effects in the store, in one transaction under the device's lock.
    async fn record(&self, job: &PlayJob) -> Result<Outcome, PipelineError> {
        let user = UserId(job.user);
        let report = &job.report;
        let match_key =
            super::normalise::match_key(&report.artist, &report.title, report.album.as_deref());
        let reported = Reported {
            isrc: report.isrc.as_deref(),
            match_key: &match_key,
            title: &report.title,
            artist: &report.artist,
            album: report.album.as_deref(),
            duration_ms: Some(report.duration_ms),
        };
        let lock = format!("ingest:{}:{}", job.user, job.device_id);
        let mut pooled = self.store.conn().await?;
        pooled
            .conn()
            .transaction(|conn| {
                async move {
                    conn.lock_keys_for_transaction(&[lock]).await?;
                    let state = ingests::tracker(conn, user, &job.device_id).await?;
                    let newest = state.as_ref().is_none_or(|(at, _)| *at <= job.received_at);
                    if let Some(applied) = ingests::applied(conn, &job.ingest_id).await? {
                        return Ok(Outcome {
                            track_id: applied.track_id,
                            newest,
                            artwork_changed: false,
                        });
                    }
                    let now = crate::store::now();
                    let track_id = catalog::find_or_create_reported(conn, &reported, now).await?;
                    let artwork_changed = match &job.artwork {
                        Some(hash) => rows::attach(conn, &track_id, hash).await?,
                        None => false,
                    };
                    let mut counted = false;
                    if newest {
                        let mut tracker: PlayTracker = match &state {
                            Some((_, json)) => serde_json::from_str(json)
                                .map_err(|e| PipelineError::Corrupt(e.to_string()))?,
                            None => PlayTracker::default(),
                        };
                        let heard = NowPlaying {
                            track_id: track_id.clone(),
                            progress_ms: report.progress_ms,
                            is_playing: report.is_playing,
                            at: job.received_at,
                            track: None,
                        };
                        let duration = report.duration_ms;
                        let duration_of = |id: &str| (id == track_id.as_str()).then_some(duration);
                        if let Some(played) =
                            tracker.report(Some(&heard), job.received_at, duration_of)
                        {
                            plays::record_at(
                                conn,
                                user,
                                &played,
                                &job.device_id,
                                timestamp(job.received_at),
                            )
                            .await?;
                            counted = true;
                        }
                        let json = serde_json::to_string(&tracker)
                            .map_err(|e| PipelineError::Corrupt(e.to_string()))?;
                        ingests::save_tracker(conn, user, &job.device_id, job.received_at, &json)
                            .await?;
                    }
                    let applied = Applied {
                        track_id: track_id.clone(),
                        counted,
                    };
                    ingests::mark_applied(
                        conn,
                        &job.ingest_id,
                        user,
                        &job.device_id,
                        &applied,
                        now,
                    )
                    .await?;
                    Ok::<_, PipelineError>(Outcome {
                        track_id,
                        newest,
                        artwork_changed,
                    })
                }
                .scope_boxed()
            })
            .await
    }

    /// The track as the store has it now (not from a cache: its artwork may just have come).
    async fn track(&self, id: &str) -> Result<Option<TrackView>, PipelineError> {
        let mut pooled = self.store.conn().await?;
        Ok(catalog::find_tracks(&mut pooled.conn(), &[id]).await?.pop())
    }

    /// The device as the store knows it (name and kind), or a plain one.
    async fn device(&self, user: UserId, device_id: &str) -> Result<Device, PipelineError> {
        let mut pooled = self.store.conn().await?;
        let record = devices::find(&mut pooled.conn(), user, device_id).await?;
        let device = match record {
            Some(d) => Device::parse(Some(&d.device_id), Some(&d.name), Some(&d.kind)),
            None => Device::parse(Some(device_id), None, None),
        };
        device.map_err(|e| PipelineError::Corrupt(e.to_string()))
    }

    /// Drops every replica's cached copies of `ids`.
    async fn tracks_changed(&self, ids: Vec<String>) {
        self.queues.forget_tracks(&ids).await;
        self.hub
            .do_send(Announce(ReplicaEvent::TracksChanged { ids }));
    }

    /// Shows what `device` plays: its presence entry (kept to the track's expected end while
    /// playing) and a `track` push on `devices:{user}`.
    fn show(
        &self,
        user: UserId,
        device: Device,
        now_playing: NowPlaying,
        ingest_id: Option<&str>,
        source: Option<&str>,
    ) {
        let remaining = now_playing
            .track
            .as_ref()
            .and_then(|t| t.duration_ms)
            .map(|d| (d - now_playing.progress_ms).max(0));
        let lasts_until = match (now_playing.is_playing, remaining) {
            (true, Some(remaining)) => Some(now_playing.at + remaining + END_GRACE_MS),
            _ => None,
        };
        let payload: Value = json!({
            "device_id": device.id.as_str(),
            "ingest_id": ingest_id,
            "source": source,
            "track_id": now_playing.track_id,
            "track": now_playing.track,
            "progress_ms": now_playing.progress_ms,
            "is_playing": now_playing.is_playing,
            "at": now_playing.at,
        });
        self.presence.do_send(PipelinePlaying {
            user,
            device,
            now_playing,
            lasts_until,
        });
        self.hub.do_send(Publish {
            user,
            event: UserEvent::Push {
                topic: format!("devices:{user}"),
                event: "track".into(),
                payload,
                revision: None,
            },
        });
    }

    /// Artwork `record` is stored: every play that showed its track without it is shown
    /// again, with it, if the device still plays that track.
    pub async fn artwork_ready(&self, record: &ArtworkRecord) -> Result<(), PipelineError> {
        let waiters = {
            let mut pooled = self.store.conn().await?;
            rows::take_waiters(&mut pooled.conn(), &record.hash, None).await?
        };
        if waiters.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<String> = waiters.iter().map(|w| w.track_id.clone()).collect();
        ids.sort();
        ids.dedup();
        self.tracks_changed(ids).await;
        for waiter in waiters {
            let user = UserId(waiter.user);
            let snapshot = self
                .registry
                .snapshot(user)
                .await
                .map_err(|e| PipelineError::Registry(e.to_string()))?;
            let instance = instance_id(&waiter.device_id, REST_OWNER);
            let Some(entry) = snapshot.entries.get(&instance) else {
                continue;
            };
            let Some(playing) = entry.now_playing.as_ref() else {
                continue;
            };
            if playing.track_id != waiter.track_id || !entry.is_live(now_ms()) {
                continue;
            }
            let mut now_playing = playing.clone();
            now_playing.track = self.track(&waiter.track_id).await?;
            let device =
                Device::parse(Some(&entry.device_id), Some(&entry.name), Some(&entry.kind))
                    .map_err(|e| PipelineError::Corrupt(e.to_string()))?;
            self.show(user, device, now_playing, None, None);
        }
        Ok(())
    }

    /// Artwork `hash` will not render: nobody waits for it any more.
    pub async fn artwork_refused(&self, hash: &str) {
        let taken = async {
            let mut pooled = self.store.conn().await?;
            rows::take_waiters(&mut pooled.conn(), hash, None).await
        };
        if let Err(error) = taken.await {
            tracing::warn!(%error, hash, "could not clear the plays waiting for refused artwork");
        }
    }
}
