//! Geometric transforms: random resized crop (with bilinear resampling) and horizontal flip.

use rand::{Rng, RngCore};

use super::{Image, Transform};

/// A crop rectangle in pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// torchvision's `RandomResizedCrop`: crop a random area fraction in `scale` with aspect ratio
/// (width / height) in `ratio`, then resize it bilinearly back to the input size, or to an
/// `output` × `output` square (multi-crop's small local crops).
///
/// SimCLR (Chen et al. 2020) found this crop, together with colour distortion, the key
/// augmentation. torchvision's default scale is (0.08, 1); (0.2, 1) suits 28x28 images.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomResizedCrop {
    pub scale: (f32, f32),
    pub ratio: (f32, f32),
    pub output: Option<usize>,
}

impl RandomResizedCrop {
    pub fn new(scale: (f32, f32), ratio: (f32, f32)) -> Self {
        assert!(0.0 < scale.0 && scale.0 <= scale.1, "crop scale {scale:?} must satisfy 0 < min <= max");
        assert!(0.0 < ratio.0 && ratio.0 <= ratio.1, "crop ratio {ratio:?} must satisfy 0 < min <= max");
        Self { scale, ratio, output: None }
    }

    /// The same crop resized to `side` × `side`.
    pub fn with_output(self, side: usize) -> Self {
        assert!(side > 0, "a crop's output side must be positive");
        Self { output: Some(side), ..self }
    }
}

impl Transform for RandomResizedCrop {
    fn apply(&self, image: &mut Image, rng: &mut dyn RngCore) {
        let (height, width) = (image.shape.height, image.shape.width);
        let crop = random_crop_box(height, width, self.scale, self.ratio, rng);
        let (out_height, out_width) = self.output.map_or((height, width), |side| (side, side));
        *image = resized_crop_bilinear(image, crop, out_height, out_width);
    }
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a random area fraction
/// (uniform in `scale`) and log-uniform aspect ratio in `ratio`; if none fits, a centre crop
/// whose aspect ratio is `in_ratio` clamped to `ratio`.
pub fn random_crop_box(
    height: usize,
    width: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut dyn RngCore,
) -> CropBox {
    let area = (height * width) as f32;
    let (log_min, log_max) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_min, log_max).exp();
        let w = (target_area * aspect).sqrt().round() as usize;
        let h = (target_area / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox { top, left, height: h, width: w };
        }
    }
    // Fallback: the largest centre crop with the nearest allowed aspect ratio.
    let in_ratio = width as f32 / height as f32;
    let (h, w) = if in_ratio < ratio.0 {
        (((width as f32 / ratio.0).round() as usize).clamp(1, height), width)
    } else if in_ratio > ratio.1 {
        (height, ((height as f32 * ratio.1).round() as usize).clamp(1, width))
    } else {
        (height, width)
    };
    CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// Crops `crop` out of `image` and resizes it to `out_height x out_width` by bilinear
/// interpolation with PyTorch's `align_corners=False` convention: output pixel `o` samples the
/// source at `(o + 0.5) * in / out - 0.5`, clamped to the crop, so pixel centres line up.
pub fn resized_crop_bilinear(image: &Image, crop: CropBox, out_height: usize, out_width: usize) -> Image {
    assert!(
        crop.height > 0
            && crop.width > 0
            && crop.top + crop.height <= image.shape.height
            && crop.left + crop.width <= image.shape.width,
        "crop {crop:?} does not fit in {:?}",
        image.shape
    );
    let rows = sample_positions(crop.height, out_height, crop.top);
    let cols = sample_positions(crop.width, out_width, crop.left);
    let mut shape = image.shape;
    shape.height = out_height;
    shape.width = out_width;
    let mut out = Vec::with_capacity(shape.numel());
    for c in 0..image.shape.channels {
        let plane = image.plane(c);
        let at = |y: usize, x: usize| plane[y * image.shape.width + x];
        for &(y0, y1, fy) in &rows {
            for &(x0, x1, fx) in &cols {
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                out.push(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    Image::new(shape, out)
}

/// For each output index: the two source indices (offset by `start`) and the weight of the second.
fn sample_positions(in_len: usize, out_len: usize, start: usize) -> Vec<(usize, usize, f32)> {
    let step = in_len as f32 / out_len as f32;
    (0..out_len)
        .map(|o| {
            let src = ((o as f32 + 0.5) * step - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(in_len - 1);
            let i1 = (i0 + 1).min(in_len - 1);
            (start + i0, start + i1, src - i0 as f32)
        })
        .collect()
}

/// Mirrors the image left-right. Wrap it in [`super::RandomApply`] for torchvision's
/// `RandomHorizontalFlip(p)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HorizontalFlip;

impl Transform for HorizontalFlip {
    fn apply(&self, image: &mut Image, _rng: &mut dyn RngCore) {
        let width = image.shape.width;
        for row in image.data.chunks_exact_mut(width) {
            row.reverse();
        }
    }
}

/// Uniform in `[lo, hi)` (exactly `lo` when the range is empty).
pub(crate) fn uniform(rng: &mut dyn RngCore, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageShape;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn ramp(shape: ImageShape) -> Image {
        Image::new(shape, (0..shape.numel()).map(|i| i as f32 / shape.numel() as f32).collect())
    }

    #[test]
    fn flip_reverses_every_row_of_every_channel() {
        let shape = ImageShape::new(2, 2, 3);
        let mut image = Image::new(shape, (0..12).map(|v| v as f32).collect());
        HorizontalFlip.apply(&mut image, &mut SmallRng::seed_from_u64(0));
        assert_eq!(image.data, vec![2., 1., 0., 5., 4., 3., 8., 7., 6., 11., 10., 9.]);
    }

    #[test]
    fn bilinear_upsampling_of_a_ramp_is_linear_inside() {
        // Columns 0..4 of a ramp x/10, upsampled to 8: samples at 0.5 * o - 0.25, clamped to [0, 3].
        let shape = ImageShape::new(1, 1, 6);
        let image = Image::new(shape, (0..6).map(|x| x as f32 / 10.0).collect());
        let out = resized_crop_bilinear(&image, CropBox { top: 0, left: 0, height: 1, width: 4 }, 1, 8);
        let expected = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0].map(|v| v / 10.0);
        for (o, e) in out.data.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{:?} vs {expected:?}", out.data);
        }
    }

    #[test]
    fn bilinear_downsampling_by_two_averages_pairs() {
        // Output o samples 2o + 0.5: the mean of source pixels 2o and 2o + 1; in 2D, of 2x2 blocks.
        let shape = ImageShape::new(1, 4, 8);
        let image = Image::new(shape, (0..32).map(|i| (i % 8) as f32 + 10.0 * (i / 8) as f32).collect());
        let out = resized_crop_bilinear(&image, CropBox { top: 0, left: 0, height: 4, width: 8 }, 2, 4);
        assert_eq!(out.data, vec![5.5, 7.5, 9.5, 11.5, 25.5, 27.5, 29.5, 31.5]);
    }

    #[test]
    fn whole_image_crop_at_same_size_is_identity() {
        let image = ramp(ImageShape::new(3, 5, 7));
        let out = resized_crop_bilinear(&image, CropBox { top: 0, left: 0, height: 5, width: 7 }, 5, 7);
        assert_eq!(out, image);
    }

    #[test]
    fn crop_of_one_pixel_fills_the_output() {
        let image = ramp(ImageShape::new(1, 4, 4));
        let out = resized_crop_bilinear(&image, CropBox { top: 2, left: 1, height: 1, width: 1 }, 4, 4);
        assert!(out.data.iter().all(|&v| v == image.data[2 * 4 + 1]));
    }

    #[test]
    fn sampled_boxes_respect_scale_and_ratio() {
        let mut rng = SmallRng::seed_from_u64(7);
        let (scale, ratio) = ((0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0));
        let mut areas = Vec::new();
        for _ in 0..2000 {
            let b = random_crop_box(28, 28, scale, ratio, &mut rng);
            assert!(b.top + b.height <= 28 && b.left + b.width <= 28 && b.height > 0 && b.width > 0);
            let area = (b.height * b.width) as f32 / 784.0;
            // Rounding each side to whole pixels moves the area and ratio a little.
            assert!((0.2 - 0.08..=1.0).contains(&area), "{b:?}");
            let aspect = b.width as f32 / b.height as f32;
            assert!((0.75 * 0.85..=1.3334 / 0.85).contains(&aspect), "{b:?}");
            areas.push(area);
        }
        // Areas spread over the range: some small, some whole.
        assert!(areas.iter().any(|&a| a < 0.3) && areas.iter().any(|&a| a > 0.9));
    }

    #[test]
    fn impossible_ratio_falls_back_to_a_centre_crop() {
        // Ratio 3 never fits a full-area square crop: the fallback keeps the width and uses
        // height round(28 / 3) = 9, centred at row (28 - 9) / 2 = 9.
        let b = random_crop_box(28, 28, (1.0, 1.0), (3.0, 3.0), &mut SmallRng::seed_from_u64(1));
        assert_eq!(b, CropBox { top: 9, left: 0, height: 9, width: 28 });
    }
}
