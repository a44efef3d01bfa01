//! One new cover (a 1500×1500 JPEG) turned into its eight renditions and stored: the time of
//! decode, resize, encode and upload, each the median of several runs, on one core (the hub
//! processes artwork one at a time per permit). Uploads go to a local directory and, when
//! `s3s-fs` is installed (`scripts/test.sh` does), to an S3-compatible server on loopback.
//!
//! `cargo bench --bench artwork` (`-- --runs N` for another count).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use segue::artwork::{self, Limits};
use segue::blobs::{BlobKey, Blobs, LocalBlobs, S3Blobs, S3Settings};

fn cover(side: u16) -> Vec<u8> {
    let mut pixels = Vec::with_capacity(usize::from(side) * usize::from(side) * 3);
    for y in 0..side {
        for x in 0..side {
            let (x, y) = (u32::from(x), u32::from(y));
            pixels.extend([
                (x * 7 % 256) as u8,
                (y * 3 % 256) as u8,
                ((x * y) % 251) as u8,
            ]);
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(&pixels, side, side, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    out
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

async fn upload(blobs: &Blobs, processed: &artwork::Processed, hash: &str) -> Duration {
    let started = Instant::now();
    for r in &processed.renditions {
        let key = BlobKey::parse(&artwork::object_key(hash, r.size, r.format)).unwrap();
        blobs
            .put(&key, Bytes::from(r.bytes.clone()), r.format.content_type())
            .await
            .unwrap();
    }
    started.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(9);
    let input = cover(1500);
    let hash = artwork::hash(&input);
    let (mut decode, mut resize, mut encode, mut total) = (vec![], vec![], vec![], vec![]);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        let processed = artwork::process(&input, &Limits::default()).unwrap();
        total.push(started.elapsed());
        decode.push(processed.timings.decode);
        resize.push(processed.timings.resize);
        encode.push(processed.timings.encode);
        last = Some(processed);
    }
    let processed = last.unwrap();
    let stored: usize = processed.renditions.iter().map(|r| r.bytes.len()).sum();
    println!(
        "1500×1500 JPEG ({} KiB) → 8 renditions ({} KiB): decode {:.1} ms, resize {:.1} ms, encode {:.1} ms, all {:.1} ms (median of {runs})",
        input.len() / 1024,
        stored / 1024,
        median(decode),
        median(resize),
        median(encode),
        median(total),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("segue-bench-artwork-{}", std::process::id()));
        let local = Blobs::Local(LocalBlobs::new(dir.clone()));
        let times: Vec<Duration> = {
            let mut t = vec![];
            for _ in 0..runs {
                t.push(upload(&local, &processed, &hash).await);
            }
            t
        };
        println!(
            "upload of the 8 to a local directory: {:.1} ms (median)",
            median(times)
        );
        let _ = std::fs::remove_dir_all(&dir);
        let s3s = std::env::var_os("SEGUE_S3S_FS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/segue-tools/bin/s3s-fs")
            });
        if !s3s.is_file() {
            println!("upload to S3: skipped ({} is not installed)", s3s.display());
            return;
        }
        let root = dir.with_extension("s3");
        std::fs::create_dir_all(root.join("bench")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = std::process::Command::new(&s3s)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                "AK",
                "--secret-key",
                "SKSKSKSK",
            ])
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let s3 = Blobs::S3(S3Blobs::new(&S3Settings {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            bucket: "bench".into(),
            region: "us-east-1".into(),
            access_key_id: "AK".into(),
            secret_access_key: "SKSKSKSK".into(),
            public_base_url: None,
        }));
        let mut times = vec![];
        for _ in 0..runs {
            times.push(upload(&s3, &processed, &hash).await);
        }
        println!(
            "upload of the 8 to s3s-fs on loopback: {:.1} ms (median)",
            median(times)
        );
        let _ = server.kill();
        let _ = server.wait();
        let _ = std::fs::remove_dir_all(&root);
    });
}
