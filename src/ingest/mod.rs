//! The now-playing pipeline: a player reports what it plays (`POST /ingest/plays`), and off
//! the request path a worker enriches it and every device, friend and overlay sees it.
//!
//! 1. The edge ([`crate::http::ingest`]) validates the report ([`report`]), hashes the image
//!    if there is one and stages it unless this replica knows it
//!    ([`crate::artwork::library`]), then enqueues [`PLAY`] (critical priority, idempotent
//!    by ingest id) and, for newly staged artwork, [`ARTWORK`]. It answers 202 once the play
//!    job is durably queued.
//! 2. [`PLAY`] ([`enrich`]) normalises the report ([`normalise`]), finds or creates the
//!    catalog track, counts the play under the once-per-play rules (state in the store, so
//!    any worker continues where the last report left off), marks the ingest id applied (all
//!    in one transaction: a replayed job changes nothing twice), then writes the device's
//!    presence and pushes `track` on `devices:{user}`.
//! 3. [`ARTWORK`] renders the image once per hash and tells every play that showed the track
//!    without it: presence again, and `track` again, now with artwork.
//! 4. [`SWEEP`] (periodic) ends the plays of devices that fell silent, at their tracks' ends.
//!
//! What a report says (its words, length, ISRC, cover) is its account's own: that account's
//! devices, friends and overlays see it; the catalog track takes an ISRC, a length or artwork
//! only once two accounts report the same, and keeps what it has ([`crate::store::reports`]).

pub mod enrich;
pub mod normalise;
pub mod report;

use actix::Addr;
use serde::{Deserialize, Serialize};

use crate::artwork::library::{Library, RenderError};
use crate::jobs::scheduler::Tick;
use crate::jobs::{Failure, Handlers, Job, Kind};
use crate::presence::AnyRegistry;
use crate::realtime::hub::Hub;
use crate::realtime::presence::Presence;
use crate::realtime::queue::Queues;
use crate::store::Store;

pub use report::{Report, ReportInput};

/// Applies one report.
pub const PLAY: Kind<PlayJob> = Kind::new("ingest.play");

/// Renders one artwork (by hash) and tells the plays waiting for it.
pub const ARTWORK: Kind<ArtworkJob> = Kind::new("artwork.render");

/// Ends the plays of devices that fell silent mid-track (periodic, `play_sweep_schedule`).
pub const SWEEP: Kind<Tick> = Kind::new("ingest.sweep");

/// The name the sweep's schedule runs under.
pub const SWEEP_JOB: &str = "ingest.sweep";

/// A report, as queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlayJob {
    pub ingest_id: String,
    pub user: i64,
    pub device_id: String,
    /// When the hub received the report, in milliseconds since the epoch: the report's time
    /// for the once-per-play rules and for ordering a device's reports.
    pub received_at: i64,
    pub report: Report,
    /// The SHA-256 of the report's image, if it brought one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artwork: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtworkJob {
    pub hash: String,
}

/// What the pipeline's jobs work with.
#[derive(Clone)]
pub struct Pipeline {
    pub store: Store,
    pub library: Library,
    pub hub: Addr<Hub>,
    pub presence: Addr<Presence>,
    pub registry: AnyRegistry,
    pub queues: Queues,
    /// The jobs port's attempts per job (the artwork job's last one gives up its source).
    pub max_attempts: u32,
}

impl Pipeline {
    /// Adds the pipeline's job handlers to `handlers`.
    pub fn handlers(self, handlers: Handlers) -> Handlers {
        let plays = self.clone();
        let sweeps = self.clone();
        handlers
            .on(&PLAY, move |job: Job<PlayJob>| {
                let pipeline = plays.clone();
                async move {
                    // The whole chain: a dead letter should say which query failed, and why.
                    pipeline
                        .apply_play(&job.payload)
                        .await
                        .map_err(|e| Failure::Retry(crate::error::chain(&e)))
                }
            })
            .on(&SWEEP, move |_: Job<Tick>| {
                let pipeline = sweeps.clone();
                async move {
                    let ended = pipeline
                        .sweep_silent(crate::presence::now_ms())
                        .await
                        .map_err(|e| Failure::Retry(crate::error::chain(&e)))?;
                    if ended > 0 {
                        tracing::info!(ended, "ended the plays of silent devices");
                    }
                    Ok(())
                }
            })
            .on(&ARTWORK, move |job: Job<ArtworkJob>| {
                let pipeline = self.clone();
                async move {
                    let hash = job.payload.hash;
                    if !crate::artwork::is_hash(&hash) {
                        return Err(Failure::Permanent(format!("not an artwork hash: {hash:?}")));
                    }
                    let last_try = job.attempt + 1 >= pipeline.max_attempts;
                    match pipeline.library.render(&hash, job.attempt, last_try).await {
                        Ok(record) => pipeline
                            .artwork_ready(&record)
                            .await
                            .map_err(|e| Failure::Retry(e.to_string())),
                        Err(RenderError::Refused(_) | RenderError::NoSource(_)) => {
                            // An outcome, not a failure (the library logged and counted the
                            // reason): the plays stay recorded and shown, without the image.
                            pipeline.artwork_refused(&hash).await;
                            Ok(())
                        }
                        Err(RenderError::Retry(why)) => {
                            // The last attempt gave its source up: nobody will be told.
                            if last_try {
                                pipeline.artwork_refused(&hash).await;
                            }
                            Err(Failure::Retry(why))
                        }
                    }
                }
            })
    }
}
