//! Gaussian blur, as SimCLR and BYOL use it: sigma drawn per image, kernel about 10% of the
//! image side, separable, reflect padding at the borders.

use rand::RngCore;

use super::crop::uniform;
use super::{Image, Transform};

/// Blurs with a Gaussian of standard deviation drawn uniformly from `sigma` (pixels).
///
/// `kernel_size: None` picks SimCLR's rule, 10% of the smaller image side made odd and at
/// least 3 (3 for 28x28 and 32x32, 23 for 224x224). Like torchvision's `gaussian_blur`, the
/// kernel is `exp(-x^2 / (2 sigma^2))` sampled at integer offsets and normalised to sum 1, and
/// borders are reflected (`... 2 1 | 0 1 2 ...`). Wrap it in [`super::RandomApply`].
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianBlur {
    pub sigma: (f32, f32),
    pub kernel_size: Option<usize>,
}

impl GaussianBlur {
    pub fn new(sigma: (f32, f32)) -> Self {
        assert!(0.0 < sigma.0 && sigma.0 <= sigma.1, "blur sigma {sigma:?} must satisfy 0 < min <= max");
        Self { sigma, kernel_size: None }
    }
}

impl Transform for GaussianBlur {
    fn apply(&self, image: &mut Image, rng: &mut dyn RngCore) {
        let size = self.kernel_size.unwrap_or_else(|| default_kernel_size(image.shape.height, image.shape.width));
        let sigma = uniform(rng, self.sigma.0, self.sigma.1);
        blur_separable(image, &gaussian_kernel(size, sigma));
    }
}

/// 10% of the smaller side, rounded down, made odd (+1 if even), at least 3.
pub fn default_kernel_size(height: usize, width: usize) -> usize {
    let k = height.min(width) / 10;
    (k + (k + 1) % 2).max(3)
}

/// A normalised 1-D Gaussian of odd length `size`, centred on the middle tap.
pub fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    assert!(size % 2 == 1, "Gaussian kernel size {size} must be odd");
    let half = (size / 2) as f32;
    let weights: Vec<f32> = (0..size).map(|i| (-0.5 * ((i as f32 - half) / sigma).powi(2)).exp()).collect();
    let total: f32 = weights.iter().sum();
    weights.into_iter().map(|w| w / total).collect()
}

/// Convolves every channel with `kernel` along rows, then along columns, reflecting at borders.
///
/// Both passes are written as `out += weight * shifted_source` over whole rows, which keeps the
/// inner loops contiguous and cheap even without full optimisation.
pub fn blur_separable(image: &mut Image, kernel: &[f32]) {
    let (height, width) = (image.shape.height, image.shape.width);
    let radius = kernel.len() / 2;
    let mut padded_row = vec![0.0; width + 2 * radius];
    let mut horizontal = vec![0.0; height * width];
    for plane in image.data.chunks_exact_mut(height * width) {
        // Rows: pad each with reflected values, then sum shifted copies.
        for (row, out) in plane.chunks_exact(width).zip(horizontal.chunks_exact_mut(width)) {
            for (p, value) in padded_row.iter_mut().enumerate() {
                *value = row[reflect(p as isize - radius as isize, width)];
            }
            out.fill(0.0);
            for (k, &weight) in kernel.iter().enumerate() {
                out.iter_mut().zip(&padded_row[k..k + width]).for_each(|(o, &v)| *o += weight * v);
            }
        }
        // Columns: each output row sums whole reflected source rows.
        for (y, out) in plane.chunks_exact_mut(width).enumerate() {
            out.fill(0.0);
            for (k, &weight) in kernel.iter().enumerate() {
                let source = reflect(y as isize + k as isize - radius as isize, height);
                let source_row = &horizontal[source * width..(source + 1) * width];
                out.iter_mut().zip(source_row).for_each(|(o, &v)| *o += weight * v);
            }
            // A convex combination of values in [0, 1]; clamp away rounding.
            out.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
        }
    }
}

/// Index `i` reflected into `0..len` without repeating the edge (PyTorch's "reflect" mode).
fn reflect(i: isize, len: usize) -> usize {
    if (0..len as isize).contains(&i) {
        return i as usize; // the common case, without a division
    }
    if len == 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let m = i.rem_euclid(period);
    (if m < len as isize { m } else { period - m }) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageShape;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn kernel_sizes_follow_the_ten_percent_rule() {
        assert_eq!(default_kernel_size(28, 28), 3);
        assert_eq!(default_kernel_size(32, 32), 3);
        assert_eq!(default_kernel_size(96, 96), 9);
        assert_eq!(default_kernel_size(224, 224), 23);
        assert_eq!(default_kernel_size(8, 8), 3);
    }

    #[test]
    fn kernel_matches_the_gaussian_formula() {
        // size 3, sigma 1: weights e^-0.5, 1, e^-0.5 over their sum.
        let k = gaussian_kernel(3, 1.0);
        let e = (-0.5f32).exp();
        let total = 1.0 + 2.0 * e;
        assert!((k[0] - e / total).abs() < 1e-7 && (k[1] - 1.0 / total).abs() < 1e-7 && k[0] == k[2]);
    }

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        let got: Vec<usize> = (-3..8).map(|i| reflect(i, 5)).collect();
        assert_eq!(got, vec![3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
    }

    #[test]
    fn constant_image_stays_constant() {
        let mut image = Image::new(ImageShape::new(3, 9, 7), vec![0.37; 3 * 63]);
        GaussianBlur { sigma: (0.1, 2.0), kernel_size: Some(5) }.apply(&mut image, &mut SmallRng::seed_from_u64(4));
        assert!(image.data.iter().all(|&v| (v - 0.37).abs() < 1e-6));
    }

    #[test]
    fn impulse_keeps_its_mass_and_spreads_as_the_outer_product() {
        let shape = ImageShape::new(1, 11, 11);
        let mut data = vec![0.0; 121];
        data[5 * 11 + 5] = 1.0;
        let mut image = Image::new(shape, data);
        let kernel = gaussian_kernel(5, 1.5);
        blur_separable(&mut image, &kernel);
        let mass: f32 = image.data.iter().sum();
        assert!((mass - 1.0).abs() < 1e-5, "{mass}");
        // The blurred impulse is the kernel's outer product around the centre.
        for dy in 0..5 {
            for dx in 0..5 {
                let got = image.data[(3 + dy) * 11 + 3 + dx];
                assert!((got - kernel[dy] * kernel[dx]).abs() < 1e-7);
            }
        }
    }
}
