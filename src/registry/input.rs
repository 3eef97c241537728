//! A model's input as its manifest describes it ([`InputSpec`]): image bytes decoded, converted
//! to the model's channels, resized (bilinear) to its input size and scaled, laid out as CHW; or
//! a tensor already in that layout, checked. The server's embedding requests and fine-tune jobs
//! both prepare images here. RGB images given to a grayscale model (and the reverse) are
//! converted, not rejected.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits};

use super::manifest::{ChannelOrder, InputSpec};

/// Decoded images may not exceed this many pixels per side (decompression bombs).
const MAX_SIDE: u32 = 8192;
const MAX_DECODE_BYTES: u64 = 256 << 20;

/// Decodes PNG/JPEG bytes into the model's layout.
pub fn image_to_tensor(bytes: &[u8], spec: &InputSpec, out: &mut Vec<f32>) -> Result<(), String> {
    if bytes.is_empty() {
        return Err("the image is empty (0 bytes)".into());
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    if reader.format().is_none() {
        return Err(format!("cannot decode the image: {} bytes in no known format (PNG and JPEG are)", bytes.len()));
    }
    let image = reader.decode().map_err(|e| format!("cannot decode the image: {e}"))?;
    write_image(&image, spec, out);
    Ok(())
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
    fn resizes_to_the_model_input() {
        let image = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(56, 40, image::Luma([200])));
        let mut out = Vec::new();
        image_to_tensor(&png(image), &spec(1, 28), &mut out).unwrap();
        assert_eq!(out.len(), 28 * 28);
        assert!(out.iter().all(|&v| (v - 200.0 / 255.0).abs() < 1e-6));
    }
}
