//! Artwork processing: the eight renditions of a cover, in the right formats and sizes, and
//! hostile images (malformed, truncated, oversized, decompression bombs) refused cheaply.

use std::io::Cursor;
use std::time::{Duration, Instant};

use segue::artwork::{self, ArtworkError, Format, Limits};

/// A `width` × `height` JPEG with a gradient (so it compresses like a picture, not a flat fill).
pub fn jpeg(width: u16, height: u16) -> Vec<u8> {
    let mut pixels = Vec::with_capacity(usize::from(width) * usize::from(height) * 3);
    for y in 0..height {
        for x in 0..width {
            pixels.extend([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8]);
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(&pixels, width, height, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    out
}

/// A small PNG with transparency.
fn png_with_alpha(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbaImage::from_fn(width, height, |x, _| {
        image::Rgba([200, 0, 0, if x % 2 == 0 { 0 } else { 255 }])
    });
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A PNG whose header claims `width` × `height` and whose data is a few bytes: what a
/// decompression bomb looks like before it is inflated.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 6, 0, 0, 0]);
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(kind);
        png.extend(data);
        let mut crc_input = kind.to_vec();
        crc_input.extend(data);
        png.extend(crc32(&crc_input).to_be_bytes());
    };
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_cover_becomes_four_sizes_in_webp_and_jpeg() {
    let processed = artwork::process(&jpeg(1500, 1000), &Limits::default()).unwrap();
    assert_eq!((processed.width, processed.height), (1500, 1000));
    assert_eq!(processed.renditions.len(), 8);
    let expected = [
        ("thumb", 128, 85),
        ("small", 300, 200),
        ("medium", 640, 427),
        ("large", 1200, 800),
    ];
    for (size, w, h) in expected {
        for format in Format::ALL {
            let rendition = processed
                .renditions
                .iter()
                .find(|r| r.size == size && r.format == format)
                .unwrap_or_else(|| panic!("{size} {format:?}"));
            assert_eq!(
                (rendition.width, rendition.height),
                (w, h),
                "{size} {format:?}"
            );
            let decoded = image::load_from_memory(&rendition.bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (w, h));
            let guessed = image::guess_format(&rendition.bytes).unwrap();
            let wanted = match format {
                Format::Webp => image::ImageFormat::WebP,
                Format::Jpeg => image::ImageFormat::Jpeg,
            };
            assert_eq!(guessed, wanted);
        }
    }
    let large_jpeg = &processed
        .renditions
        .iter()
        .find(|r| r.size == "large" && r.format == Format::Jpeg)
        .unwrap()
        .bytes;
    // A progressive JPEG has an SOF2 marker.
    assert!(
        large_jpeg.windows(2).any(|w| w == [0xff, 0xc2]),
        "progressive"
    );
}

#[test]
fn a_small_image_is_never_upscaled_and_transparency_lies_on_white() {
    let processed = artwork::process(&png_with_alpha(100, 80), &Limits::default()).unwrap();
    assert!(
        processed
            .renditions
            .iter()
            .all(|r| (r.width, r.height) == (100, 80))
    );
    let jpeg = processed
        .renditions
        .iter()
        .find(|r| r.format == Format::Jpeg)
        .unwrap();
    let decoded = image::load_from_memory(&jpeg.bytes).unwrap().into_rgb8();
    let clear = decoded.get_pixel(0, 0).0;
    assert!(
        clear.iter().all(|c| *c > 230),
        "a transparent pixel is white: {clear:?}"
    );
}

#[test]
fn hostile_images_are_refused_with_a_reason() {
    let limits = Limits::default();
    let cover = jpeg(400, 400);
    type Case = (&'static str, Vec<u8>, fn(&ArtworkError) -> bool);
    let cases: Vec<Case> = vec![
        ("not an image", b"hello, this is text".to_vec(), |e| {
            matches!(e, ArtworkError::UnknownFormat)
        }),
        (
            "a GIF",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            |e| matches!(e, ArtworkError::UnknownFormat),
        ),
        ("truncated", cover[..cover.len() / 3].to_vec(), |e| {
            matches!(e, ArtworkError::Unreadable(_))
        }),
        ("header only", cover[..40].to_vec(), |e| {
            matches!(e, ArtworkError::Unreadable(_))
        }),
        ("a bomb", png_claiming(60_000, 60_000), |e| {
            matches!(e, ArtworkError::TooManyPixels { .. })
        }),
        ("a strip", png_claiming(100_000, 1), |e| {
            matches!(e, ArtworkError::TooManyPixels { .. })
        }),
        ("zero pixels", png_claiming(0, 10), |e| {
            matches!(e, ArtworkError::TooManyPixels { .. })
                || matches!(e, ArtworkError::Unreadable(_))
        }),
    ];
    for (what, bytes, expected) in cases {
        let started = Instant::now();
        let error = match artwork::process(&bytes, &limits) {
            Ok(_) => panic!("{what} was accepted"),
            Err(error) => error,
        };
        assert!(expected(&error), "{what}: {error}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{what} refused cheaply"
        );
    }
    let small = Limits {
        max_bytes: 1_000,
        ..limits
    };
    assert!(matches!(
        artwork::process(&cover, &small).map(|_| ()),
        Err(ArtworkError::TooLarge { max: 1_000, .. })
    ));
}
