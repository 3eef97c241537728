//! Photometric transforms, following torchvision's tensor functional ops: colour jitter
//! (brightness, contrast, saturation, hue), grayscale, solarize.

use rand::seq::SliceRandom;
use rand::RngCore;

use super::crop::uniform;
use super::{Image, Transform};

/// ITU-R 601-2 luma weights, as torchvision's `rgb_to_grayscale` uses them.
pub const LUMA_WEIGHTS: [f32; 3] = [0.2989, 0.587, 0.114];

/// torchvision's `ColorJitter`: brightness, contrast and saturation factors drawn uniformly
/// from `[max(0, 1 - s), 1 + s]`, a hue shift from `[-hue, hue]` (in turns of the colour
/// wheel), applied in a random order. Saturation and hue only apply to RGB images; a
/// strength of 0 leaves that property alone. Wrap it in [`super::RandomApply`] for the
/// usual `p = 0.8`.
#[derive(Debug, Clone, PartialEq)]
pub struct ColorJitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl Transform for ColorJitter {
    fn apply(&self, image: &mut Image, rng: &mut dyn RngCore) {
        let is_rgb = image.shape.channels == 3;
        let factor = |rng: &mut dyn RngCore, s: f32| uniform(rng, (1.0 - s).max(0.0), 1.0 + s);
        let brightness = (self.brightness > 0.0).then(|| factor(rng, self.brightness));
        let contrast = (self.contrast > 0.0).then(|| factor(rng, self.contrast));
        let saturation = (is_rgb && self.saturation > 0.0).then(|| factor(rng, self.saturation));
        let hue = (is_rgb && self.hue > 0.0).then(|| uniform(rng, -self.hue, self.hue));
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        for op in order {
            match op {
                0 => brightness.into_iter().for_each(|f| adjust_brightness(image, f)),
                1 => contrast.into_iter().for_each(|f| adjust_contrast(image, f)),
                2 => saturation.into_iter().for_each(|f| adjust_saturation(image, f)),
                _ => hue.into_iter().for_each(|h| adjust_hue(image, h)),
            }
        }
    }
}

/// Multiplies every value by `factor`, clamped to `[0, 1]` (blend with black).
pub fn adjust_brightness(image: &mut Image, factor: f32) {
    image.data.iter_mut().for_each(|v| *v = (*v * factor).clamp(0.0, 1.0));
}

/// Blends with the mean gray level: `factor * x + (1 - factor) * mean(gray(image))`, clamped.
pub fn adjust_contrast(image: &mut Image, factor: f32) {
    let gray = grayscale_plane(image);
    let mean = gray.iter().sum::<f32>() / gray.len().max(1) as f32;
    image.data.iter_mut().for_each(|v| *v = (factor * *v + (1.0 - factor) * mean).clamp(0.0, 1.0));
}

/// Blends each pixel with its own gray level: `factor * rgb + (1 - factor) * gray`, clamped.
/// A no-op on one-channel images.
pub fn adjust_saturation(image: &mut Image, factor: f32) {
    if image.shape.channels != 3 {
        return;
    }
    let gray = grayscale_plane(image);
    for channel in image.data.chunks_exact_mut(gray.len()) {
        for (v, g) in channel.iter_mut().zip(&gray) {
            *v = (factor * *v + (1.0 - factor) * g).clamp(0.0, 1.0);
        }
    }
}

/// Rotates the hue by `shift` turns (in `[-0.5, 0.5]`) through HSV. A no-op on one channel.
pub fn adjust_hue(image: &mut Image, shift: f32) {
    if image.shape.channels != 3 {
        return;
    }
    let plane = image.shape.height * image.shape.width;
    let (r, rest) = image.data.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for i in 0..plane {
        let (h, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
        (r[i], g[i], b[i]) = hsv_to_rgb((h + shift).rem_euclid(1.0), s, v);
    }
}

/// RGB in `[0, 1]` to hue (turns, `[0, 1)`), saturation and value, as torchvision's `_rgb2hsv`.
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let chroma = max - min;
    if chroma == 0.0 {
        return (0.0, 0.0, max);
    }
    let saturation = chroma / max;
    let sixths = if max == r {
        (g - b) / chroma
    } else if max == g {
        2.0 + (b - r) / chroma
    } else {
        4.0 + (r - g) / chroma
    };
    ((sixths / 6.0 + 1.0).rem_euclid(1.0), saturation, max)
}

/// Inverse of [`rgb_to_hsv`], as torchvision's `_hsv2rgb`.
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let sector = (h * 6.0).floor();
    let f = h * 6.0 - sector;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match (sector as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// The gray level of each pixel (one plane): luma for RGB, the image itself for one channel.
pub fn grayscale_plane(image: &Image) -> Vec<f32> {
    let plane = image.shape.height * image.shape.width;
    if image.shape.channels != 3 {
        return image.data[..plane].to_vec();
    }
    let [wr, wg, wb] = LUMA_WEIGHTS;
    (0..plane).map(|i| wr * image.data[i] + wg * image.data[plane + i] + wb * image.data[2 * plane + i]).collect()
}

/// Replaces RGB with its luma in all three channels (shape unchanged, like torchvision's
/// `RandomGrayscale`). A no-op on one-channel images. Wrap it in [`super::RandomApply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grayscale;

impl Transform for Grayscale {
    fn apply(&self, image: &mut Image, _rng: &mut dyn RngCore) {
        if image.shape.channels != 3 {
            return;
        }
        let gray = grayscale_plane(image);
        for channel in image.data.chunks_exact_mut(gray.len()) {
            channel.iter_mut().zip(&gray).for_each(|(v, g)| *v = g.clamp(0.0, 1.0));
        }
    }
}

/// Inverts every value at or above `threshold`: `x -> 1 - x` (BYOL's second view,
/// Grill et al. 2020). Wrap it in [`super::RandomApply`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Solarize {
    pub threshold: f32,
}

impl Transform for Solarize {
    fn apply(&self, image: &mut Image, _rng: &mut dyn RngCore) {
        for v in image.data.iter_mut().filter(|v| **v >= self.threshold) {
            *v = 1.0 - *v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageShape;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn rgb(pixels: &[[f32; 3]]) -> Image {
        let n = pixels.len();
        let mut data = vec![0.0; 3 * n];
        for (i, p) in pixels.iter().enumerate() {
            (data[i], data[n + i], data[2 * n + i]) = (p[0], p[1], p[2]);
        }
        Image::new(ImageShape::new(3, 1, n), data)
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn unit_factors_leave_the_image_unchanged() {
        let original = rgb(&[[0.1, 0.5, 0.9], [0.3, 0.3, 0.2], [1.0, 0.0, 0.4]]);
        let mut image = original.clone();
        adjust_brightness(&mut image, 1.0);
        adjust_contrast(&mut image, 1.0);
        adjust_saturation(&mut image, 1.0);
        assert!(close(&image.data, &original.data, 1e-6));
        adjust_hue(&mut image, 0.0);
        assert!(close(&image.data, &original.data, 1e-5));
        // Zero strengths draw factor exactly 1 and shift 0.
        let jitter = ColorJitter { brightness: 0.0, contrast: 0.0, saturation: 0.0, hue: 0.0 };
        jitter.apply(&mut image, &mut SmallRng::seed_from_u64(3));
        assert!(close(&image.data, &original.data, 1e-5));
    }

    #[test]
    fn brightness_and_contrast_by_hand() {
        let mut image = Image::new(ImageShape::new(1, 1, 4), vec![0.0, 0.2, 0.4, 0.6]);
        adjust_brightness(&mut image, 2.0);
        assert!(close(&image.data, &[0.0, 0.4, 0.8, 1.0], 1e-6));
        // Mean 0.55; factor 0.5: 0.5 x + 0.275.
        adjust_contrast(&mut image, 0.5);
        assert!(close(&image.data, &[0.275, 0.475, 0.675, 0.775], 1e-6));
        // Factor 0 gives the flat mean.
        adjust_contrast(&mut image, 0.0);
        assert!(close(&image.data, &[0.55; 4], 1e-6));
    }

    #[test]
    fn saturation_zero_gives_luma_and_grayscale_matches() {
        let original = rgb(&[[1.0, 0.0, 0.0], [0.2, 0.4, 0.6]]);
        let luma = [0.2989, 0.2989 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6];
        let mut desaturated = original.clone();
        adjust_saturation(&mut desaturated, 0.0);
        let mut gray = original.clone();
        Grayscale.apply(&mut gray, &mut SmallRng::seed_from_u64(0));
        for image in [&desaturated, &gray] {
            for channel in image.data.chunks(2) {
                assert!(close(channel, &luma, 1e-6), "{:?}", image.data);
            }
        }
    }

    #[test]
    fn hsv_round_trip_and_known_values() {
        assert_eq!(rgb_to_hsv(1.0, 0.0, 0.0), (0.0, 1.0, 1.0));
        let (h, s, v) = rgb_to_hsv(0.0, 0.5, 0.5); // cyan at half value
        assert!((h - 0.5).abs() < 1e-6 && s == 1.0 && v == 0.5);
        for &(r, g, b) in &[(0.2, 0.4, 0.6), (0.9, 0.1, 0.5), (0.3, 0.3, 0.3), (0.0, 1.0, 0.2)] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let back = hsv_to_rgb(h, s, v);
            assert!(close(&[back.0, back.1, back.2], &[r, g, b], 1e-5), "{back:?}");
        }
    }

    #[test]
    fn hue_shift_by_a_third_rotates_primaries() {
        // Red -> green -> blue, each a third of a turn apart.
        let mut image = rgb(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]);
        adjust_hue(&mut image, 1.0 / 3.0);
        assert!(close(&image.data, &[0.0, 0.0, 1.0, 0.0, 0.0, 1.0], 1e-5), "{:?}", image.data);
    }

    #[test]
    fn saturation_and_hue_skip_one_channel_images() {
        let original = Image::new(ImageShape::new(1, 1, 3), vec![0.1, 0.5, 0.9]);
        let mut image = original.clone();
        adjust_saturation(&mut image, 0.0);
        adjust_hue(&mut image, 0.3);
        Grayscale.apply(&mut image, &mut SmallRng::seed_from_u64(0));
        assert_eq!(image, original);
    }

    #[test]
    fn solarize_inverts_values_at_or_above_threshold() {
        let mut image = Image::new(ImageShape::new(1, 1, 5), vec![0.0, 0.3, 0.5, 0.8, 1.0]);
        Solarize { threshold: 0.5 }.apply(&mut image, &mut SmallRng::seed_from_u64(0));
        assert!(close(&image.data, &[0.0, 0.3, 0.5, 0.2, 0.0], 1e-6));
    }
}
