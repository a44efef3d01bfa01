//! The demo catalog, so the web page has something to play: `segue seed-demo` upserts it
//! into the configured store (safe to run again: tracks are replaced by id).

use scoped_futures::ScopedFutureExt;

use crate::domain::TrackId;
use crate::store::catalog::{self, TrackInput};
use crate::store::{self, Store, StoreError};

/// (id, title, artist, album, duration in seconds). Invented, royalty-free names.
const TRACKS: [(&str, &str, &str, &str, i64); 24] = [
    (
        "demo-01",
        "Morning Static",
        "The Quiet Relays",
        "Signal Path",
        214,
    ),
    (
        "demo-02",
        "Cross-Device Love",
        "The Quiet Relays",
        "Signal Path",
        187,
    ),
    (
        "demo-03",
        "Heartbeat Interval",
        "The Quiet Relays",
        "Signal Path",
        241,
    ),
    (
        "demo-04",
        "Revision One",
        "The Quiet Relays",
        "Signal Path",
        199,
    ),
    (
        "demo-05",
        "Lantern Hours",
        "Maribel Okafor",
        "Night Ferry",
        262,
    ),
    (
        "demo-06",
        "Night Ferry",
        "Maribel Okafor",
        "Night Ferry",
        305,
    ),
    (
        "demo-07",
        "Salt and Cedar",
        "Maribel Okafor",
        "Night Ferry",
        228,
    ),
    (
        "demo-08",
        "Harbour Lights",
        "Maribel Okafor",
        "Night Ferry",
        193,
    ),
    (
        "demo-09",
        "Tin Roof Rain",
        "Kettle & Drum",
        "Porchlight",
        176,
    ),
    ("demo-10", "Porchlight", "Kettle & Drum", "Porchlight", 203),
    (
        "demo-11",
        "Two-Step for Sam",
        "Kettle & Drum",
        "Porchlight",
        158,
    ),
    ("demo-12", "Slow River", "Kettle & Drum", "Porchlight", 287),
    ("demo-13", "Glasshouse", "Neon Orchard", "Afterglow", 219),
    ("demo-14", "Afterglow", "Neon Orchard", "Afterglow", 246),
    (
        "demo-15",
        "Velvet Circuit",
        "Neon Orchard",
        "Afterglow",
        231,
    ),
    ("demo-16", "Paper Planets", "Neon Orchard", "Afterglow", 184),
    (
        "demo-17",
        "Blue Hour Waltz",
        "Ines Varga Trio",
        "Small Rooms",
        322,
    ),
    (
        "demo-18",
        "Small Rooms",
        "Ines Varga Trio",
        "Small Rooms",
        276,
    ),
    ("demo-19", "Brushes", "Ines Varga Trio", "Small Rooms", 254),
    (
        "demo-20",
        "Last Tram Home",
        "Ines Varga Trio",
        "Small Rooms",
        298,
    ),
    ("demo-21", "Sunday Static", "Field Notes", "Outdoors", 167),
    ("demo-22", "Pinecone", "Field Notes", "Outdoors", 142),
    ("demo-23", "Long Way Round", "Field Notes", "Outdoors", 233),
    ("demo-24", "Campfire Coda", "Field Notes", "Outdoors", 201),
];

/// The demo tracks, validated like any catalog input.
pub fn tracks() -> Vec<TrackInput> {
    TRACKS
        .iter()
        .filter_map(|(id, title, artist, album, seconds)| {
            Some(TrackInput {
                id: TrackId::parse(id).ok()?,
                title: (*title).to_owned(),
                artist: (*artist).to_owned(),
                album: Some((*album).to_owned()),
                duration_ms: Some(seconds * 1000),
                image_url: None,
            })
        })
        .collect()
}

/// Upserts the demo catalog in one transaction; returns how many tracks were written.
pub async fn seed(store: &Store) -> Result<usize, StoreError> {
    let batch = tracks();
    let mut pooled = store.conn().await?;
    pooled
        .conn()
        .transaction(|conn| {
            async move { catalog::upsert_tracks(conn, &batch, None, store::now()).await }
                .scope_boxed()
        })
        .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_demo_track_is_valid() {
        assert_eq!(super::tracks().len(), super::TRACKS.len());
    }
}
