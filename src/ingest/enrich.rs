//! The pipeline's jobs: applying a report, and telling plays their artwork is ready.

use chrono::DateTime;
use scoped_futures::ScopedFutureExt;
use serde_json::{Value, json};

use super::{Pipeline, PlayJob};
use crate::artwork::ArtworkView;
use crate::domain::{Device, UserId};
use crate::presence::plays::PlayTracker;
use crate::presence::{NowPlaying, REST_OWNER, instance_id, now_ms};
use crate::realtime::events::{ReplicaEvent, UserEvent};
use crate::realtime::hub::Announce;
use crate::realtime::presence::PipelinePlaying;
use crate::store::artwork::{self as rows, ArtworkRecord};
use crate::store::catalog::{self, Reported, TrackView};
use crate::store::ingests::{self, Applied};
use crate::store::reports::{self, Said};
use crate::store::{StoreError, devices, plays};

/// How long after a playing track's expected end its presence lasts without another report,
/// and after which a play nobody reported the end of is ended by the sweep.
pub const END_GRACE_MS: i64 = 30_000;

/// Silent devices one sweep looks at.
const SWEEP_BATCH: i64 = 1_000;

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
    /// The catalog track changed (reports agreed on something it lacked): cached copies
    /// of it are stale.
    catalog_changed: bool,
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
        if outcome.catalog_changed {
            self.tracks_changed(vec![outcome.track_id.clone()]).await;
        }
        let mut track = self.view_for(user, &outcome.track_id, &job.report).await?;
        if let (Some(hash), Some(found)) = (&job.artwork, &track)
            && found.artwork.as_ref().is_none_or(|a| a.hash != *hash)
            && self
                .wait_for_artwork(user, &job.device_id, &outcome.track_id, hash)
                .await?
        {
            track = self.view_for(user, &outcome.track_id, &job.report).await?;
        }
        if !outcome.newest {
            return Ok(());
        }
        let device = {
            let mut pooled = self.store.conn().await?;
            devices::known_or_plain(&mut pooled.conn(), user, &job.device_id).await?
        };
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

    /// Notes that this play shows its track without the report's artwork `hash` yet (the
    /// artwork job tells it when that is ready). If it became ready meanwhile, the play takes
    /// its own notice back and keeps the artwork as its account's: true then.
    async fn wait_for_artwork(
        &self,
        user: UserId,
        device_id: &str,
        track_id: &str,
        hash: &str,
    ) -> Result<bool, PipelineError> {
        let mut pooled = self.store.conn().await?;
        let mut conn = pooled.conn();
        let now = crate::store::now();
        rows::wait_for(&mut conn, hash, user, device_id, track_id, now).await?;
        if rows::find(&mut conn, hash).await?.is_none() {
            return Ok(false);
        }
        rows::take_waiters(&mut conn, hash, Some((user, device_id))).await?;
        reports::set_artwork(&mut conn, track_id, user, hash, now).await?;
        let changed = reports::corroborate(&mut conn, track_id, Said::cover(hash)).await?;
        drop(pooled);
        if changed {
            self.tracks_changed(vec![track_id.to_owned()]).await;
        }
        Ok(true)
    }

    /// The report's effects in the store, in one transaction under the device's lock.
    async fn record(&self, job: &PlayJob) -> Result<Outcome, PipelineError> {
        let user = UserId(job.user);
        let report = &job.report;
        let match_key =
            super::normalise::match_key(&report.artist, &report.title, report.album.as_deref());
        // A new track keeps only what its match key says (the words without credits).
        let (title, artist) = (
            super::normalise::uncredited(&report.title),
            super::normalise::uncredited(&report.artist),
        );
        let album = report.album.as_deref().map(super::normalise::uncredited);
        let reported = Reported {
            isrc: report.isrc.as_deref(),
            match_key: &match_key,
            title: &title,
            artist: &artist,
            album: album.as_deref().filter(|a| !a.is_empty()),
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
                            catalog_changed: false,
                        });
                    }
                    let now = crate::store::now();
                    let track_id =
                        catalog::find_or_create_reported(conn, &reported, user, now).await?;
                    let said = Said {
                        isrc: report.isrc.as_deref(),
                        duration_ms: Some(report.duration_ms),
                        artwork: None,
                    };
                    reports::record(conn, &track_id, user, said, now).await?;
                    // A cover that rendered already is this account's at once; one that has
                    // not waits for the artwork job.
                    let mut rendered = None;
                    if let Some(hash) = &job.artwork
                        && rows::find(conn, hash).await?.is_some()
                    {
                        reports::set_artwork(conn, &track_id, user, hash, now).await?;
                        rendered = Some(hash.as_str());
                    }
                    let said = Said {
                        artwork: rendered,
                        ..said
                    };
                    let catalog_changed = reports::corroborate(conn, &track_id, said).await?;
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
                        let ends_at = tracker.expected_end();
                        ingests::save_tracker(
                            conn,
                            user,
                            &job.device_id,
                            job.received_at,
                            &json,
                            ends_at,
                        )
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
                        catalog_changed,
                    })
                }
                .scope_boxed()
            })
            .await
    }

    /// The track as `user`'s report shows it: the catalog's track (read from the store, not a
    /// cache: artwork may just have come) in the report's own words and length, with the
    /// artwork this account sent once it rendered, else the catalog's.
    async fn view_for(
        &self,
        user: UserId,
        id: &str,
        report: &super::Report,
    ) -> Result<Option<TrackView>, PipelineError> {
        let mut pooled = self.store.conn().await?;
        let mut conn = pooled.conn();
        let Some(mut track) = catalog::find_tracks(&mut conn, &[id]).await?.pop() else {
            return Ok(None);
        };
        if let Some(own) = reports::own_artwork(&mut conn, id, user).await? {
            track.artwork = Some(ArtworkView::of(&own));
        }
        track.title.clone_from(&report.title);
        track.artist.clone_from(&report.artist);
        track.album.clone_from(&report.album);
        track.duration_ms = Some(report.duration_ms);
        Ok(Some(track))
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
            push: UserEvent::Push {
                topic: format!("devices:{user}"),
                event: "track".into(),
                payload,
                revision: None,
            },
        });
    }

    /// Artwork `record` is stored: it becomes the artwork of every account whose play waited
    /// for it, and each such play is shown again, with it, if its device still plays that
    /// track. A waiting play is forgotten only once it was told, so an error on the way
    /// (the job retries) loses nobody.
    pub async fn artwork_ready(&self, record: &ArtworkRecord) -> Result<(), PipelineError> {
        let waiters = {
            let mut pooled = self.store.conn().await?;
            rows::waiters(&mut pooled.conn(), &record.hash).await?
        };
        if waiters.is_empty() {
            return Ok(());
        }
        let mut changed = Vec::new();
        {
            let mut pooled = self.store.conn().await?;
            let mut conn = pooled.conn();
            let now = crate::store::now();
            for waiter in &waiters {
                let user = UserId(waiter.user);
                reports::set_artwork(&mut conn, &waiter.track_id, user, &record.hash, now).await?;
                let said = Said::cover(&record.hash);
                if reports::corroborate(&mut conn, &waiter.track_id, said).await? {
                    changed.push(waiter.track_id.clone());
                }
            }
        }
        if !changed.is_empty() {
            changed.sort();
            changed.dedup();
            self.tracks_changed(changed).await;
        }
        // Each waiter is told and forgotten on its own: one that fails stays for the retry,
        // and does not keep the others from being told.
        let artwork = ArtworkView::of(record);
        let mut failed = None;
        for waiter in waiters {
            let told = async {
                self.tell(&waiter, &artwork).await?;
                let mut pooled = self.store.conn().await?;
                rows::forget_waiter(&mut pooled.conn(), &record.hash, &waiter).await?;
                Ok::<_, PipelineError>(())
            };
            if let Err(error) = told.await {
                tracing::warn!(%error, user = waiter.user, "a play waiting for artwork was not told");
                failed.get_or_insert(error);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Shows `waiter`'s play again with `artwork`, if its device still plays that track.
    async fn tell(
        &self,
        waiter: &rows::Waiter,
        artwork: &ArtworkView,
    ) -> Result<(), PipelineError> {
        let user = UserId(waiter.user);
        let snapshot = self
            .registry
            .snapshot(user)
            .await
            .map_err(|e| PipelineError::Registry(e.to_string()))?;
        let instance = instance_id(&waiter.device_id, REST_OWNER);
        let Some(entry) = snapshot.entries.get(&instance) else {
            return Ok(());
        };
        let Some(playing) = entry.now_playing.as_ref() else {
            return Ok(());
        };
        if playing.track_id != waiter.track_id || !entry.is_live(now_ms()) {
            return Ok(());
        }
        let Some(mut track) = playing.track.clone() else {
            return Ok(());
        };
        track.artwork = Some(artwork.clone());
        let mut now_playing = playing.clone();
        now_playing.track = Some(track);
        let device = Device::parse(Some(&entry.device_id), Some(&entry.name), Some(&entry.kind))
            .map_err(|e| PipelineError::Corrupt(e.to_string()))?;
        self.show(user, device, now_playing, None, None);
        Ok(())
    }

    /// Ends the plays of devices that fell silent: a play nobody reported the end of is ended
    /// at its track's expected end (once [`END_GRACE_MS`] more passed without a report) and
    /// counted if it was listened to long enough. Returns how many plays it ended.
    pub async fn sweep_silent(&self, now_ms: i64) -> Result<usize, PipelineError> {
        let silent = {
            let mut pooled = self.store.conn().await?;
            ingests::silent(&mut pooled.conn(), now_ms - END_GRACE_MS, SWEEP_BATCH).await?
        };
        let mut ended = 0;
        for (user, device_id) in silent {
            if self.end_silent(UserId(user), &device_id, now_ms).await? {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Ends one silent device's play, under the lock its reports take. The device's newest
    /// report time becomes the end's (plus the grace), so a report received before it and
    /// applied only now (a queue running behind) counts as older: it neither restarts the
    /// play nor counts it again.
    async fn end_silent(
        &self,
        user: UserId,
        device_id: &str,
        now_ms: i64,
    ) -> Result<bool, PipelineError> {
        let lock = format!("ingest:{}:{device_id}", user.0);
        let idle = serde_json::to_string(&PlayTracker::default())
            .map_err(|e| PipelineError::Corrupt(e.to_string()))?;
        let mut pooled = self.store.conn().await?;
        pooled
            .conn()
            .transaction(|conn| {
                async move {
                    conn.lock_keys_for_transaction(&[lock]).await?;
                    let Some((reported_at, json)) = ingests::tracker(conn, user, device_id).await?
                    else {
                        return Ok(false);
                    };
                    let mut tracker: PlayTracker = serde_json::from_str(&json)
                        .map_err(|e| PipelineError::Corrupt(e.to_string()))?;
                    let Some(end) = tracker.expected_end() else {
                        return Ok(false);
                    };
                    if now_ms < end + END_GRACE_MS {
                        return Ok(false);
                    }
                    if let Some(played) = tracker.finish(end, &|_| None) {
                        plays::record_at(conn, user, &played, device_id, timestamp(end)).await?;
                    }
                    let ended_at = reported_at.max(end + END_GRACE_MS);
                    ingests::save_tracker(conn, user, device_id, ended_at, &idle, None).await?;
                    Ok::<_, PipelineError>(true)
                }
                .scope_boxed()
            })
            .await
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
