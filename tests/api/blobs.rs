//! The object store port's acceptance suite, on both implementations: a local directory and
//! a real S3-compatible server on loopback (`s3s-fs`), then what only one of them does.

use std::time::{Duration, Instant};

use bytes::Bytes;
use segue::blobs::{BlobError, BlobKey, BlobUrl, Blobs, LocalBlobs, S3Blobs};

use crate::helpers::{PrivateS3, temp_dir};

/// A store for one test, and what keeps it alive.
pub struct Store {
    pub blobs: Blobs,
    _s3: Option<PrivateS3>,
    dir: std::path::PathBuf,
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn local() -> Store {
    let dir = temp_dir("blobs");
    Store {
        blobs: Blobs::Local(LocalBlobs::new(dir.join("blobs"))),
        _s3: None,
        dir,
    }
}

pub fn s3() -> Store {
    let server = PrivateS3::start("segue-test");
    Store {
        blobs: Blobs::S3(S3Blobs::new(&server.settings("segue-test"))),
        _s3: Some(server),
        dir: temp_dir("blobs-unused"),
    }
}

/// Generates one test per store from `async fn name(store: Store)`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[actix_web::test]
                async fn local() {
                    super::$name(super::local()).await;
                }

                #[actix_web::test]
                async fn s3() {
                    super::$name(super::s3()).await;
                }
            }
        )*
    };
}

fn key(raw: &str) -> BlobKey {
    BlobKey::parse(raw).unwrap()
}

on_both_stores!(
    an_object_is_written_read_replaced_and_deleted,
    keys_are_listed_by_prefix,
    a_large_object_round_trips_intact,
    an_upload_in_parts_is_one_object_once_finished,
    an_aborted_upload_leaves_nothing,
);

/// Bytes that differ from part to part, so a part in the wrong place shows.
fn patterned(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

async fn an_upload_in_parts_is_one_object_once_finished(store: Store) {
    let blobs = &store.blobs;
    let k = key("exports/1/exp_parts.csv");
    let mut upload = blobs.upload(&k, "text/csv").await.unwrap();
    // Writes of odd sizes that add up to two full parts and a bit.
    let mut all = Vec::new();
    for (n, len) in [
        1,
        3 * 1024 * 1024 + 7,
        5 * 1024 * 1024,
        9 * 1024 * 1024 - 3,
        1_000,
    ]
    .into_iter()
    .enumerate()
    {
        let chunk = patterned(len, n as u32);
        upload.write(&chunk).await.unwrap();
        all.extend(chunk);
    }
    assert!(all.len() > 2 * segue::blobs::PART_BYTES);
    assert!(
        !blobs.exists(&k).await.unwrap(),
        "visible only once finished"
    );
    assert_eq!(upload.written(), all.len() as u64);
    assert_eq!(upload.finish().await.unwrap(), all.len() as u64);
    let back = blobs.get(&k).await.unwrap().unwrap();
    assert_eq!(back.len(), all.len());
    assert!(back == all, "the same bytes in the same order");
    // An empty upload makes an empty object.
    let empty = key("exports/1/empty.csv");
    let upload = blobs.upload(&empty, "text/csv").await.unwrap();
    assert_eq!(upload.finish().await.unwrap(), 0);
    assert_eq!(blobs.get(&empty).await.unwrap().unwrap().len(), 0);
}

async fn an_aborted_upload_leaves_nothing(store: Store) {
    let blobs = &store.blobs;
    let k = key("exports/1/exp_aborted.csv");
    // What the store keeps on disk: the S3 server's files, or the local directory's.
    let files = || match &store._s3 {
        Some(server) => server.files(),
        None => {
            let mut found = Vec::new();
            let mut dirs = vec![store.dir.clone()];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = entry.path();
                    if path.is_dir() {
                        dirs.push(path);
                    } else {
                        found.push(path);
                    }
                }
            }
            found
        }
    };
    let before = files();
    let mut upload = blobs.upload(&k, "text/csv").await.unwrap();
    upload
        .write(&patterned(segue::blobs::PART_BYTES + 10, 1))
        .await
        .unwrap();
    assert!(
        files().len() > before.len(),
        "a part is kept while uploading"
    );
    upload.abort().await;
    assert!(!blobs.exists(&k).await.unwrap());
    assert_eq!(files(), before, "no object, no part, no temporary file");
}

async fn an_object_is_written_read_replaced_and_deleted(store: Store) {
    let blobs = &store.blobs;
    let k = key("artwork/ab12/thumb.webp");
    assert_eq!(blobs.get(&k).await.unwrap(), None, "nothing there yet");
    assert!(!blobs.exists(&k).await.unwrap());
    let every_byte: Bytes = (0..=255u8).cycle().take(4096).collect::<Vec<_>>().into();
    blobs
        .put(&k, every_byte.clone(), "image/webp")
        .await
        .unwrap();
    assert!(blobs.exists(&k).await.unwrap());
    assert_eq!(blobs.get(&k).await.unwrap(), Some(every_byte));
    blobs
        .put(&k, Bytes::from_static(b"second"), "image/webp")
        .await
        .unwrap();
    assert_eq!(
        blobs.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"second")),
        "replaced"
    );
    blobs.delete(&k).await.unwrap();
    assert!(!blobs.exists(&k).await.unwrap());
    assert_eq!(blobs.get(&k).await.unwrap(), None);
    blobs.delete(&k).await.unwrap();
}

async fn keys_are_listed_by_prefix(store: Store) {
    let blobs = &store.blobs;
    for k in [
        "exports/1/a.json",
        "exports/1/b.json",
        "exports/2/a.json",
        "artwork/x/large.jpg",
    ] {
        blobs
            .put(&key(k), Bytes::from_static(b"{}"), "application/json")
            .await
            .unwrap();
    }
    assert_eq!(
        blobs.list("exports/1/").await.unwrap(),
        vec!["exports/1/a.json", "exports/1/b.json"]
    );
    assert_eq!(blobs.list("").await.unwrap().len(), 4);
    assert!(blobs.list("nothing/").await.unwrap().is_empty());
}

async fn a_large_object_round_trips_intact(store: Store) {
    let blobs = &store.blobs;
    let k = key("backups/2026-12-02/dump.sql.gz");
    let big: Bytes = (0..6 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<_>>()
        .into();
    blobs
        .put(&k, big.clone(), "application/gzip")
        .await
        .unwrap();
    let back = blobs.get(&k).await.unwrap().unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "the same bytes");
}

#[actix_web::test]
async fn the_local_store_leaves_no_partial_files() {
    let store = local();
    let blobs = &store.blobs;
    for n in 0..20 {
        blobs
            .put(
                &key(&format!("artwork/{n}/small.jpg")),
                Bytes::from(vec![n as u8; 1000]),
                "image/jpeg",
            )
            .await
            .unwrap();
    }
    let mut files = 0;
    let mut dirs = vec![store.dir.join("blobs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
            } else {
                assert!(!entry.file_name().to_string_lossy().starts_with(".tmp-"));
                files += 1;
            }
        }
    }
    assert_eq!(files, 20);
    assert_eq!(
        blobs
            .url(&key("artwork/1/small.jpg"), Duration::from_secs(60))
            .await
            .unwrap(),
        BlobUrl::Hub,
        "the hub serves local objects itself"
    );
}

#[actix_web::test]
async fn an_s3_url_is_presigned_and_a_tampered_one_refused() {
    let store = s3();
    let blobs = &store.blobs;
    let k = key("artwork/cafe/medium.jpg");
    blobs
        .put(&k, Bytes::from_static(b"jpeg bytes"), "image/jpeg")
        .await
        .unwrap();
    let BlobUrl::External(url) = blobs.url(&k, Duration::from_secs(300)).await.unwrap() else {
        panic!("a bucket's objects are fetched from the bucket");
    };
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let fetched = reqwest::get(&url).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(
        fetched.bytes().await.unwrap(),
        Bytes::from_static(b"jpeg bytes")
    );
    let tampered = url.replace("medium.jpg", "large.jpg");
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);

    let server = PrivateS3::start("cdn");
    let settings = segue::blobs::S3Settings {
        public_base_url: Some("https://cdn.example.com/art/".into()),
        ..server.settings("cdn")
    };
    let fronted = Blobs::S3(S3Blobs::new(&settings));
    assert_eq!(
        fronted.url(&k, Duration::from_secs(300)).await.unwrap(),
        BlobUrl::External("https://cdn.example.com/art/artwork/cafe/medium.jpg".into())
    );
}

#[actix_web::test]
async fn with_the_object_store_gone_calls_fail_quickly_and_say_so() {
    let mut server = PrivateS3::start("gone");
    let blobs = Blobs::S3(S3Blobs::new(&server.settings("gone")));
    let k = key("artwork/1/thumb.webp");
    blobs
        .put(&k, Bytes::from_static(b"x"), "image/webp")
        .await
        .unwrap();
    server.halt();
    let asked = Instant::now();
    let error = blobs
        .put(&k, Bytes::from_static(b"y"), "image/webp")
        .await
        .unwrap_err();
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        matches!(error, BlobError::S3 { op: "write", .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("artwork/1/thumb.webp"),
        "{error}"
    );
    server.resume();
    assert_eq!(
        blobs.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"x")),
        "back, intact"
    );
}
