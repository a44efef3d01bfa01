//! Device sightings written in groups (group commit). Every socket upgrade records its device
//! before the socket opens; one statement per upgrade made a reconnect storm (thousands of
//! sockets of a replica that went away arriving within a second) queue for connections until
//! upgrades were refused with 503. Here the sightings that arrive while one upsert is in
//! flight gather and go, up to [`MAX_BATCH`], in the next one, so a storm costs a few
//! statements and a quiet replica still writes each sighting at once. Each caller waits for
//! the statement that carried its sighting: a socket still opens only once its device is
//! stored, and a failed statement fails every upgrade it carried (503 when the store is away).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::devices::{self, DeviceSighting};
use super::{Store, StoreError};
use crate::domain::{Device, UserId};

/// Most sightings written in one statement.
const MAX_BATCH: usize = 500;

/// Sightings waiting for the writer; upgrades beyond it wait to hand theirs over.
const QUEUE: usize = 10_000;

/// How a sighting's statement ended (shared by every sighting it carried).
pub type Recorded = Result<(), Arc<StoreError>>;

struct Sighting {
    user: UserId,
    device: Device,
    done: oneshot::Sender<Recorded>,
}

/// The replica's sighting writer; cheap to clone.
#[derive(Clone)]
pub struct Sightings {
    queue: mpsc::Sender<Sighting>,
}

impl Sightings {
    /// Starts the writer on the current runtime.
    pub fn start(store: Store) -> Self {
        let (queue, mut incoming) = mpsc::channel::<Sighting>(QUEUE);
        actix_web::rt::spawn(async move {
            while let Some(first) = incoming.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match incoming.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                // Upgrades given up meanwhile (their client left) need no sighting.
                batch.retain(|sighting| !sighting.done.is_closed());
                if batch.is_empty() {
                    continue;
                }
                match guarded_write(&store, &batch).await {
                    Ok(()) => answer(batch, &Ok(())),
                    // The store is away: every upgrade of the batch would have failed alike.
                    Err(error) if error.is_unavailable() || batch.len() == 1 => {
                        answer(batch, &Err(error));
                    }
                    // One bad row must not fail the others: each on its own, then.
                    Err(_) => {
                        for sighting in batch {
                            let outcome =
                                guarded_write(&store, std::slice::from_ref(&sighting)).await;
                            answer(vec![sighting], &outcome);
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    /// Records that `user` was seen on `device` now (created on first sight; name, kind and
    /// last-seen time refreshed after); resolves once that is stored.
    pub async fn record(&self, user: UserId, device: &Device) -> Recorded {
        let (done, stored) = oneshot::channel();
        let sighting = Sighting {
            user,
            device: device.clone(),
            done,
        };
        if self.queue.send(sighting).await.is_err() {
            return Err(Arc::new(StoreError::TaskLost));
        }
        stored
            .await
            .unwrap_or_else(|_| Err(Arc::new(StoreError::TaskLost)))
    }
}

fn answer(batch: Vec<Sighting>, outcome: &Recorded) {
    for sighting in batch {
        let _ = sighting.done.send(outcome.clone());
    }
}

/// [`write`], with a panic in it answered as an error (the writer goes on serving).
async fn guarded_write(store: &Store, batch: &[Sighting]) -> Recorded {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(write(store, batch))
        .catch_unwind()
        .await
    {
        Ok(written) => written.map_err(Arc::new),
        Err(_) => Err(Arc::new(StoreError::TaskLost)),
    }
}

/// One upsert for the batch; a device seen twice in it is written once, as last seen (one
/// statement may not change a row twice). Rows go in key order, so that two replicas writing
/// overlapping batches lock them in the same order (no deadlock).
async fn write(store: &Store, batch: &[Sighting]) -> Result<(), StoreError> {
    let now = super::now();
    let mut latest: BTreeMap<(i64, &str), &Device> = BTreeMap::new();
    for sighting in batch {
        latest.insert(
            (sighting.user.0, sighting.device.id.as_str()),
            &sighting.device,
        );
    }
    let rows: Vec<DeviceSighting<'_>> = latest
        .into_iter()
        .map(|((user_id, device_id), device)| DeviceSighting {
            user_id,
            device_id,
            name: &device.name,
            kind: device.kind.as_str(),
            created_at: now,
            last_seen_at: now,
        })
        .collect();
    let mut pooled = store.conn().await?;
    devices::upsert_many(&mut pooled.conn(), &rows).await
}
