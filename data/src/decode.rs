//! Decoding bytes into an 8-bit RGB image, with the checks a training run needs: the format is taken
//! from the content (not the file name), the pixel count is checked against a limit from the header
//! before anything is decoded, and every colour type is converted to RGB8:
//! grayscale is replicated, 16-bit is rounded to 8-bit, CMYK JPEG is converted by the decoder, and
//! alpha is composited over white (so hidden colour under transparent pixels never leaks in).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::BadReason;

/// The formats this crate decodes.
pub(crate) fn is_supported(format: ImageFormat) -> bool {
    matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
    )
}

/// Image dimensions from the header only (no pixel decoded).
pub fn probe_dimensions(bytes: &[u8]) -> Result<(u32, u32), BadReason> {
    let format = detect_format(bytes)?;
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let decoder = reader
        .into_decoder()
        .map_err(|e| BadReason::Corrupt(e.to_string()))?;
    Ok(decoder.dimensions())
}

fn detect_format(bytes: &[u8]) -> Result<ImageFormat, BadReason> {
    if bytes.is_empty() {
        return Err(BadReason::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| BadReason::NotAnImage)?;
    if !is_supported(format) {
        return Err(BadReason::Unsupported(format!("{format:?}")));
    }
    Ok(format)
}

/// Decodes an image file's bytes into RGB8, refusing images above `pixel_limit` pixels.
pub fn decode_rgb(bytes: &[u8], pixel_limit: u64) -> Result<RgbImage, BadReason> {
    let format = detect_format(bytes)?;
    if format == ImageFormat::Jpeg && !jpeg_has_end_marker(bytes) {
        // zune-jpeg fills a truncated scan with grey instead of failing; a JPEG whose data stops
        // before the end-of-image marker is truncated, and training on a half-grey image is worse than
        // skipping it.
        return Err(BadReason::Corrupt(
            "JPEG data ends before the end-of-image marker (truncated file)".into(),
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    // Decoder allocations for the largest allowed image (RGBA16 output plus working buffers).
    limits.max_alloc = Some(pixel_limit.saturating_mul(16).max(64 << 20));
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .map_err(|e| BadReason::Corrupt(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > pixel_limit {
        return Err(BadReason::TooLarge {
            width,
            height,
            limit: pixel_limit,
        });
    }
    if width == 0 || height == 0 {
        return Err(BadReason::Corrupt(format!(
            "zero-sized image {width}x{height}"
        )));
    }
    let image = DynamicImage::from_decoder(decoder).map_err(|e| match e {
        image::ImageError::Limits(_) => BadReason::TooLarge {
            width,
            height,
            limit: pixel_limit,
        },
        other => BadReason::Corrupt(other.to_string()),
    })?;
    Ok(to_rgb8(image))
}

/// Converts any decoded image to RGB8 (alpha composited over white).
pub fn to_rgb8(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return match image {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => other.to_rgb8(),
        };
    }
    let rgba = image.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for px in rgba.as_raw().chunks_exact(4) {
        let a = u32::from(px[3]);
        for &c in &px[..3] {
            // c * a/255 + 255 * (1 - a/255), rounded.
            out.push(((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    RgbImage::from_raw(w, h, out).expect("buffer has w*h*3 bytes")
}

/// True when the JPEG stream ends its last scan: the last end-of-image marker (FF D9) comes after the
/// last start-of-scan marker (FF DA). Entropy-coded data cannot contain either byte pair (0xFF is
/// stuffed), so a file cut inside its last scan fails this, even when an EXIF thumbnail earlier in the
/// file has its own markers, and bytes appended after the end marker do not matter.
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let last = |marker: u8| {
        bytes
            .windows(2)
            .rposition(|w| w[0] == 0xFF && w[1] == marker)
    };
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        (None, Some(_)) => true,
        _ => false,
    }
}
