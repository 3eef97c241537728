//! ContrastiveCrop (Peng, Wang, Wang & You, "Crafting Better Contrastive Views for Siamese
//! Representation Learning", CVPR 2022): crops that stay on the object but rarely on the same
//! part of it.
//!
//! - the object's box comes from the model itself: the encoder's last feature map, summed over
//!   channels, scaled to [0, 1] and up-sampled to the image, thresholded at `k` (paper: 0.1);
//!   the run refreshes the boxes every few epochs (the first epochs use the whole image);
//! - a crop's size and aspect ratio are drawn as in `RandomResizedCrop`; its centre is drawn in
//!   the box from `Beta(α, α)` along each axis with `α < 1` (paper: 0.6), a U-shaped law that
//!   puts centres away from the box's middle, so two views overlap less often: the
//!   centre-suppressed sampling;
//! - the crop is moved inside the image if it sticks out, then resized back.

use rand::RngCore;
use rand_distr::{Beta, Distribution};

use super::crop::{random_crop_box, resized_crop_bilinear, CropBox};
use super::{Image, Transform};

#[derive(Debug, Clone)]
pub struct ContrastiveCrop {
    pub scale: (f32, f32),
    pub ratio: (f32, f32),
    centre: Beta<f32>,
}

impl ContrastiveCrop {
    pub fn new(scale: (f32, f32), ratio: (f32, f32), alpha: f32) -> Self {
        let centre =
            Beta::new(alpha, alpha).unwrap_or_else(|_| panic!("ContrastiveCrop's alpha must be > 0, got {alpha}"));
        Self { scale, ratio, centre }
    }

    /// A crop of an image of `height × width` whose centre is drawn inside `object`.
    pub fn crop_box(&self, height: usize, width: usize, object: CropBox, rng: &mut dyn RngCore) -> CropBox {
        let size = random_crop_box(height, width, self.scale, self.ratio, rng);
        let place = |start: usize, extent: usize, length: usize, limit: usize, rng: &mut dyn RngCore| {
            let centre = start as f32 + self.centre.sample(rng) * extent as f32;
            ((centre - length as f32 / 2.0).round().max(0.0) as usize).min(limit - length)
        };
        let top = place(object.top, object.height, size.height, height, rng);
        let left = place(object.left, object.width, size.width, width, rng);
        CropBox { top, left, ..size }
    }

    /// The same crop with `object` for every image of the view (tests, and runs before the first
    /// boxes exist use the whole image).
    pub fn with_object(&self, object: Option<CropBox>) -> ObjectCrop<'_> {
        ObjectCrop { crop: self, object }
    }
}

/// [`ContrastiveCrop`] bound to one image's object box.
#[derive(Debug)]
pub struct ObjectCrop<'a> {
    crop: &'a ContrastiveCrop,
    object: Option<CropBox>,
}

impl ObjectCrop<'_> {
    pub fn apply(&self, image: &mut Image, rng: &mut dyn RngCore) {
        let (height, width) = (image.shape.height, image.shape.width);
        let object = self.object.unwrap_or(CropBox { top: 0, left: 0, height, width });
        let crop = self.crop.crop_box(height, width, object, rng);
        *image = resized_crop_bilinear(image, crop, height, width);
    }
}

impl Transform for ContrastiveCrop {
    /// Without an object box: the whole image is the object.
    fn apply(&self, image: &mut Image, rng: &mut dyn RngCore) {
        self.with_object(None).apply(image, rng);
    }
}

/// The bounding box of the cells of `heatmap` (`[rows, columns]`, any scale) at or above
/// `threshold` of the way from its minimum to its maximum, scaled to an `height × width` image.
/// A flat map gives the whole image.
pub fn object_box(
    heatmap: &[f32],
    rows: usize,
    columns: usize,
    threshold: f32,
    height: usize,
    width: usize,
) -> CropBox {
    assert_eq!(heatmap.len(), rows * columns, "heatmap of {rows}×{columns} expected");
    let (low, high) = heatmap.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    // A flat (or empty, or non-finite) map has no object to find.
    if high.partial_cmp(&low) != Some(std::cmp::Ordering::Greater) {
        return CropBox { top: 0, left: 0, height, width };
    }
    let cut = low + threshold * (high - low);
    let (mut r0, mut r1, mut c0, mut c1) = (rows, 0, columns, 0);
    for r in 0..rows {
        for c in 0..columns {
            if heatmap[r * columns + c] >= cut {
                (r0, r1, c0, c1) = (r0.min(r), r1.max(r), c0.min(c), c1.max(c));
            }
        }
    }
    // Cell (r, c) covers image rows r·height/rows .. (r+1)·height/rows.
    let top = r0 * height / rows;
    let bottom = ((r1 + 1) * height).div_ceil(rows);
    let left = c0 * width / columns;
    let right = ((c1 + 1) * width).div_ceil(columns);
    CropBox { top, left, height: bottom - top, width: right - left }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn the_box_holds_the_hot_cells_scaled_to_the_image() {
        // A 4×4 map over a 28×28 image, hot in rows 1-2 and columns 2-3.
        let mut heatmap = vec![0.0f32; 16];
        for (r, c) in [(1, 2), (2, 3), (2, 2)] {
            heatmap[r * 4 + c] = 1.0;
        }
        heatmap[0] = 0.05; // below 10 % of the way up
        assert_eq!(object_box(&heatmap, 4, 4, 0.1, 28, 28), CropBox { top: 7, left: 14, height: 14, width: 14 });
        assert_eq!(object_box(&[0.3; 16], 4, 4, 0.1, 28, 28), CropBox { top: 0, left: 0, height: 28, width: 28 });
    }

    #[test]
    fn crops_fit_and_their_centres_avoid_the_middle_of_the_object() {
        let crop = ContrastiveCrop::new((0.04, 0.04), (1.0, 1.0), 0.6);
        let object = CropBox { top: 4, left: 4, height: 20, width: 20 };
        let mut rng = SmallRng::seed_from_u64(3);
        let (mut middle, draws) = (0, 4000);
        for _ in 0..draws {
            let b = crop.crop_box(28, 28, object, &mut rng);
            assert!(b.top + b.height <= 28 && b.left + b.width <= 28, "{b:?}");
            let centre_x = b.left as f32 + b.width as f32 / 2.0;
            if (centre_x - 14.0).abs() < 5.0 {
                middle += 1;
            }
        }
        // Uniform centres would land in the middle half of the box 50 % of the time; Beta(0.6, 0.6)
        // puts P(|u − 0.5| < 0.25) at 0.374 (a million draws with numpy).
        let share = middle as f64 / draws as f64;
        assert!((0.32..0.43).contains(&share), "{share}");
    }
}
