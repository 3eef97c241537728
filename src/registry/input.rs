//! A model's input as its manifest describes it ([`InputSpec`]): image bytes decoded, converted
//! to the model's channels, resized (bilinear) to its input size and scaled, laid out as CHW; or
//! a tensor already in that layout, checked. The server's embedding requests and fine-tune jobs
//! both prepare images here. RGB images given to a grayscale model (and the reverse) are
//! converted, not rejected.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader, Limits};

use super::manifest::{ChannelOrder, InputSpec};

/// Pixels one image may have before it is decoded (decompression bombs: a few hundred bytes of
/// PNG can declare 8192 × 8192 pixels). The server's `--max-image-pixels` sets its own.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 4096 * 4096;

/// Width and height from the image's header, without decoding it.
pub fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    reader(bytes)?.into_dimensions().map_err(|e| format!("cannot read the image's header: {e}"))
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, String> {
    if bytes.is_empty() {
        return Err("the image is empty (0 bytes)".into());
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => Ok(reader),
        _ => Err(format!("cannot decode the image: {} bytes in no known format (PNG and JPEG are)", bytes.len())),
    }
}

/// Decodes PNG/JPEG bytes into the model's layout, with the default pixel limit.
pub fn image_to_tensor(bytes: &[u8], spec: &InputSpec, out: &mut Vec<f32>) -> Result<(), String> {
    decode_to_tensor(bytes, spec, DEFAULT_MAX_IMAGE_PIXELS, out)
}

/// Decodes PNG/JPEG bytes into the model's layout, refusing images of more than `max_pixels`
/// (read from the header, before any pixel is decoded) and truncated JPEGs (which the decoder
/// would otherwise complete with grey).
pub fn decode_to_tensor(bytes: &[u8], spec: &InputSpec, max_pixels: u64, out: &mut Vec<f32>) -> Result<(), String> {
    let (width, height) = image_dimensions(bytes)?;
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(format!(
            "the image is {width}×{height} = {pixels} pixels; at most {max_pixels} are decoded per image"
        ));
    }
    let mut reader = reader(bytes)?;
    if reader.format() == Some(ImageFormat::Jpeg) && !ends_with_jpeg_end_marker(bytes) {
        return Err(format!(
            "the JPEG is truncated: its {} bytes do not end with the end-of-image marker",
            bytes.len()
        ));
    }
    let mut limits = Limits::default();
    // RGBA at 8 bits, plus the decoder's own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| format!("cannot decode the image: {e}"))?;
    write_image(&image, spec, out);
    Ok(())
}

/// Whether a JPEG ends with its EOI marker (`FF D9`), trailing zero padding allowed.
fn ends_with_jpeg_end_marker(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    end >= 2 && bytes[end - 2..end] == [0xFF, 0xD9]
}

fn write_image(image: &DynamicImage, spec: &InputSpec, out: &mut Vec<f32>) {
    let (w, h) = (spec.width as u32, spec.height as u32);
    let scale = spec.scale;
    match spec.channel_order {
        ChannelOrder::Gray => {
            let mut gray = image.to_luma8();
            if gray.dimensions() != (w, h) {
                gray = image::imageops::resize(&gray, w, h, FilterType::Triangle);
            }
            out.extend(gray.as_raw().iter().map(|&p| p as f32 * scale));
        }
        ChannelOrder::Rgb => {
            let mut rgb = image.to_rgb8();
            if rgb.dimensions() != (w, h) {
                rgb = image::imageops::resize(&rgb, w, h, FilterType::Triangle);
            }
            // Interleaved HWC to planar CHW.
            for channel in 0..3 {
                out.extend(rgb.as_raw().iter().skip(channel).step_by(3).map(|&p| p as f32 * scale));
            }
        }
    }
}

/// A tensor must already be in the model's layout: `[C, H, W]`, or `[H, W]` for one channel.
pub fn check_tensor(shape: &[u32], values: &[f32], spec: &InputSpec, out: &mut Vec<f32>) -> Result<(), String> {
    let expected = [spec.channels, spec.height, spec.width];
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let fits = shape == expected || (spec.channels == 1 && shape == expected[1..]);
    if !fits {
        return Err(format!("tensor shape {shape:?} does not match the model input {expected:?}"));
    }
    let numel: usize = expected.iter().product();
    if values.len() != numel {
        return Err(format!("tensor of shape {shape:?} needs {numel} values, got {}", values.len()));
    }
    if let Some(position) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("tensor value {position} is {}; values must be finite", values[position]));
    }
    // Far outside the range the model was trained on, activations overflow to NaN or saturate
    // into a zero embedding: refuse rather than answer such an embedding.
    let (low, high) = spec.value_range();
    if let Some(position) = values.iter().position(|&v| !(low..=high).contains(&v)) {
        return Err(format!(
            "tensor value {position} is {}; the model takes values in [{low}, {high}] (pixels scaled by {})",
            values[position], spec.scale
        ));
    }
    out.extend_from_slice(values);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(channels: usize, side: usize) -> InputSpec {
        InputSpec::image(channels, side, side).unwrap()
    }

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        image.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        bytes
    }

    #[test]
    fn gray_png_of_the_right_size_is_pixels_over_255() {
        let pixels: Vec<u8> = (0..16).map(|i| i * 16).collect();
        let image = DynamicImage::ImageLuma8(image::GrayImage::from_raw(4, 4, pixels.clone()).unwrap());
        let mut out = Vec::new();
        image_to_tensor(&png(image), &spec(1, 4), &mut out).unwrap();
        assert_eq!(out.len(), pixels.len());
        for (value, &pixel) in out.iter().zip(&pixels) {
            assert!((value - pixel as f32 / 255.0).abs() < 1e-6, "{value} for pixel {pixel}");
        }
    }

    #[test]
    fn rgb_is_planar_and_gray_models_take_rgb() {
        // One pixel of each channel value: R=255, G=0, B=51.
        let image = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 51])));
        let mut out = Vec::new();
        image_to_tensor(&png(image.clone()), &spec(3, 2), &mut out).unwrap();
        assert_eq!(out[..4], [1.0; 4]);
        assert_eq!(out[4..8], [0.0; 4]);
        assert!(out[8..].iter().all(|&v| (v - 0.2).abs() < 1e-6));
        // To gray with the image crate's weights (0.2126 R + 0.7152 G + 0.0722 B): 255·0.2126 + 51·0.0722 ≈ 58.
        let mut gray = Vec::new();
        image_to_tensor(&png(image), &spec(1, 2), &mut gray).unwrap();
        assert!(gray.iter().all(|&v| (v * 255.0 - 58.0).abs() <= 1.0), "{gray:?}");
    }

    #[test]
    fn refuses_bombs_by_their_header_and_truncated_jpegs() {
        // An 8192 × 8192 black PNG compresses to a few hundred kilobytes.
        let big = DynamicImage::ImageLuma8(image::GrayImage::new(8192, 8192));
        let err = decode_to_tensor(&png(big), &spec(1, 28), 4096 * 4096, &mut Vec::new()).unwrap_err();
        assert!(err.contains("8192×8192 = 67108864 pixels; at most 16777216"), "{err}");
        let mut jpeg = Vec::new();
        let image =
            DynamicImage::ImageLuma8(image::GrayImage::from_fn(64, 64, |x, y| image::Luma([(x * 4 + y) as u8])));
        image.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        assert!(image_to_tensor(&jpeg, &spec(1, 28), &mut Vec::new()).is_ok());
        let err = image_to_tensor(&jpeg[..jpeg.len() / 2], &spec(1, 28), &mut Vec::new()).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let full = png(image);
        assert!(image_to_tensor(&full[..full.len() / 2], &spec(1, 28), &mut Vec::new()).is_err(), "a cut PNG");
    }

    #[test]
    fn resizes_to_the_model_input() {
        let image = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(56, 40, image::Luma([200])));
        let mut out = Vec::new();
        image_to_tensor(&png(image), &spec(1, 28), &mut out).unwrap();
        assert_eq!(out.len(), 28 * 28);
        assert!(out.iter().all(|&v| (v - 200.0 / 255.0).abs() < 1e-6));
    }
}
