//! Artwork: a cover image as reported, turned into the eight renditions the hub serves: four
//! sizes (boxes of 128, 300, 640 and 1200 px, never upscaled), each as lossy WebP and as
//! progressive JPEG. Untrusted input is checked before it is decoded: the byte size, then the
//! dimensions from the header alone, then the decoder runs under limits, so a decompression
//! bomb costs a header read. Re-encoding drops EXIF (GPS included); animated input gives its
//! first frame; transparency is flattened onto white.
//!
//! [`process`] is CPU work: run it on the blocking pool ([`library::Library`] does, one at
//! a time per permit). The artwork job keeps one row per artwork and stores the renditions
//! through the blob port; the source waits in [`staging`] between the report and the job.

pub mod library;
pub mod staging;

use std::io::Cursor;
use std::time::{Duration, Instant};

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageFormat, ImageReader};

/// The sizes served: name and the box the image is fitted into.
pub const SIZES: [(&str, u32); 4] = [
    ("thumb", 128),
    ("small", 300),
    ("medium", 640),
    ("large", 1200),
];

/// Encoded formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Webp,
    Jpeg,
}

impl Format {
    pub const ALL: [Format; 2] = [Format::Webp, Format::Jpeg];

    pub fn extension(self) -> &'static str {
        match self {
            Self::Webp => "webp",
            Self::Jpeg => "jpg",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Webp => "image/webp",
            Self::Jpeg => "image/jpeg",
        }
    }

    pub fn from_extension(ext: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.extension() == ext)
    }
}

/// What input is accepted.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest input, in bytes (`SEGUE_ARTWORK_MAX_BYTES`).
    pub max_bytes: usize,
    /// Largest width or height.
    pub max_side: u32,
    /// Most pixels (width × height).
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            max_side: 10_000,
            max_pixels: 40_000_000,
        }
    }
}

/// Why an image was refused; each names what was wrong, for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtworkError {
    #[error("the image is {bytes} bytes, more than the {max} allowed")]
    TooLarge { bytes: usize, max: usize },
    #[error("the image is not JPEG, PNG or WebP")]
    UnknownFormat,
    #[error("the image is {width}×{height}, more than allowed")]
    TooManyPixels { width: u32, height: u32 },
    #[error("the image could not be read: {0}")]
    Unreadable(String),
    #[error("a rendition could not be made: {0}")]
    Encoding(String),
    #[error("rendering ran out of time twice")]
    TooSlow,
}

impl ArtworkError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::UnknownFormat => "unknown_format",
            Self::TooManyPixels { .. } => "too_many_pixels",
            Self::Unreadable(_) => "unreadable",
            Self::Encoding(_) => "encoding",
            Self::TooSlow => "too_slow",
        }
    }
}

/// One stored rendition.
#[derive(Debug, Clone)]
pub struct Rendition {
    pub size: &'static str,
    pub format: Format,
    pub width: u32,
    pub height: u32,
    pub bytes: Vec<u8>,
}

/// Where the time of one [`process`] went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub decode: Duration,
    pub resize: Duration,
    pub encode: Duration,
}

/// An image, processed.
#[derive(Debug, Clone)]
pub struct Processed {
    pub width: u32,
    pub height: u32,
    pub renditions: Vec<Rendition>,
    pub timings: Timings,
}

/// An artwork as clients see it: URLs of every rendition, relative to the hub.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArtworkView {
    pub hash: String,
    pub width: u32,
    pub height: u32,
    pub sizes: Vec<SizeView>,
}

/// One size: its box name, its own dimensions, and a URL per format.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SizeView {
    pub size: String,
    pub width: u32,
    pub height: u32,
    pub webp: String,
    pub jpeg: String,
}

impl ArtworkView {
    pub fn of(record: &crate::store::artwork::ArtworkRecord) -> Self {
        let url = |size: &str, format: Format| {
            format!("/artwork/{}/{size}.{}", record.hash, format.extension())
        };
        Self {
            hash: record.hash.clone(),
            width: record.source_width,
            height: record.source_height,
            sizes: record
                .sizes
                .iter()
                .map(|s| SizeView {
                    size: s.size.clone(),
                    width: s.width,
                    height: s.height,
                    webp: url(&s.size, Format::Webp),
                    jpeg: url(&s.size, Format::Jpeg),
                })
                .collect(),
        }
    }
}

/// Whether `hash` looks like an artwork identity (64 lowercase hex digits).
pub fn is_hash(hash: &str) -> bool {
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The size box named `name`.
pub fn size_named(name: &str) -> Option<(&'static str, u32)> {
    SIZES.into_iter().find(|(n, _)| *n == name)
}

/// The artwork's identity: the SHA-256 of its bytes, in hex.
pub fn hash(bytes: &[u8]) -> String {
    crate::auth::sha256_hex(bytes)
}

/// The object key of one rendition of artwork `hash`.
pub fn object_key(hash: &str, size: &str, format: Format) -> String {
    format!("artwork/{hash}/{size}.{}", format.extension())
}

/// `(width, height)` fitted into a `side` × `side` box, never larger than it was.
pub fn fit(width: u32, height: u32, side: u32) -> (u32, u32) {
    let longest = width.max(height);
    if longest <= side {
        return (width, height);
    }
    let scale = |n: u32| {
        let scaled = (u64::from(n) * u64::from(side) + u64::from(longest) / 2) / u64::from(longest);
        u32::try_from(scaled).unwrap_or(side).max(1)
    };
    (scale(width), scale(height))
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ArtworkError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ArtworkError::Unreadable(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => Err(ArtworkError::Unreadable(
            "the JPEG is truncated (no end-of-image marker)".into(),
        )),
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => Ok(reader),
        _ => Err(ArtworkError::UnknownFormat),
    }
}

/// Whether a JPEG ends with its end-of-image marker (padding after it allowed). The decoder
/// itself fills a truncated JPEG in with grey rather than failing.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let end = bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |last| last + 1);
    bytes.get(..end).is_some_and(|b| b.ends_with(&[0xff, 0xd9]))
}

/// What can be told of `bytes` without decoding them: within the byte cap, a JPEG (complete),
/// PNG or WebP, and not too many pixels by its header. Returns the claimed dimensions. The
/// edge checks this before it stages anything; [`process`] checks it again.
pub fn inspect(bytes: &[u8], limits: &Limits) -> Result<(u32, u32), ArtworkError> {
    if bytes.len() > limits.max_bytes {
        return Err(ArtworkError::TooLarge {
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    // The header alone says how big the picture claims to be.
    let (width, height) = reader(bytes)?
        .into_dimensions()
        .map_err(|e| ArtworkError::Unreadable(e.to_string()))?;
    let too_many = width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels;
    if too_many || width == 0 || height == 0 {
        return Err(ArtworkError::TooManyPixels { width, height });
    }
    Ok((width, height))
}

/// Checks `bytes` and makes every rendition of them.
pub fn process(bytes: &[u8], limits: &Limits) -> Result<Processed, ArtworkError> {
    inspect(bytes, limits)?;
    let started = Instant::now();
    let mut decoder = reader(bytes)?;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    // RGBA at the largest accepted size, and the decoder's own working space.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    decoder.limits(decoder_limits);
    let decoded = decoder
        .decode()
        .map_err(|e| ArtworkError::Unreadable(e.to_string()))?;
    let rgb = flatten(decoded);
    let (width, height) = (rgb.width(), rgb.height());
    let source = Image::from_vec_u8(width, height, rgb.into_raw(), PixelType::U8x3)
        .map_err(|e| ArtworkError::Encoding(e.to_string()))?;
    let mut timings = Timings {
        decode: started.elapsed(),
        ..Timings::default()
    };
    let mut resizer = Resizer::new();
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    let mut renditions = Vec::with_capacity(SIZES.len() * 2);
    for (size, side) in SIZES {
        let resizing = Instant::now();
        let (w, h) = fit(width, height, side);
        let pixels = if (w, h) == (width, height) {
            source.buffer().to_vec()
        } else {
            let mut target = Image::new(w, h, PixelType::U8x3);
            resizer
                .resize(&source, &mut target, &options)
                .map_err(|e| ArtworkError::Encoding(e.to_string()))?;
            target.into_vec()
        };
        timings.resize += resizing.elapsed();
        let encoding = Instant::now();
        renditions.push(Rendition {
            size,
            format: Format::Webp,
            width: w,
            height: h,
            bytes: webp::Encoder::from_rgb(&pixels, w, h).encode(80.0).to_vec(),
        });
        renditions.push(Rendition {
            size,
            format: Format::Jpeg,
            width: w,
            height: h,
            bytes: jpeg(&pixels, w, h)?,
        });
        timings.encode += encoding.elapsed();
    }
    Ok(Processed {
        width,
        height,
        renditions,
        timings,
    })
}

/// RGB, any transparency laid over white.
fn flatten(image: DynamicImage) -> image::RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    let mut rgb = image::RgbImage::new(width, height);
    for (out, pixel) in rgb.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = pixel.0;
        let over = |c: u8| {
            let c = u16::from(c) * u16::from(a) + 255 * (255 - u16::from(a));
            u8::try_from(c / 255).unwrap_or(255)
        };
        out.0 = [over(r), over(g), over(b)];
    }
    rgb
}

fn jpeg(pixels: &[u8], width: u32, height: u32) -> Result<Vec<u8>, ArtworkError> {
    let too_big = || ArtworkError::Encoding(format!("{width}×{height} is too big for JPEG"));
    let (w, h) = (
        u16::try_from(width).map_err(|_| too_big())?,
        u16::try_from(height).map_err(|_| too_big())?,
    );
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, 85);
    encoder.set_progressive(true);
    encoder
        .encode(pixels, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| ArtworkError::Encoding(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_fit_their_box_and_are_never_upscaled() {
        assert_eq!(fit(1500, 1500, 300), (300, 300));
        assert_eq!(fit(3000, 1500, 1200), (1200, 600));
        assert_eq!(fit(1000, 3000, 128), (43, 128));
        assert_eq!(fit(100, 80, 1200), (100, 80));
        assert_eq!(fit(5000, 1, 128), (128, 1));
    }

    #[test]
    fn the_hash_is_the_sha256_of_the_bytes() {
        assert_eq!(
            hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            object_key("ab", "thumb", Format::Jpeg),
            "artwork/ab/thumb.jpg"
        );
    }
}
