//! 2. Augmentation: how the views are made.
//!
//! A view is an image passed through a [`Pipeline`] of random [`Transform`]s. Images are CHW
//! `f32` in `[0, 1]` with 1 or 3 channels; every transform keeps the shape and the value range.
//! Transforms follow torchvision's definitions, so the recipes of SimCLR (Chen et al. 2020) and
//! BYOL (Grill et al. 2020) carry over: see [`AugmentConfig`]. All randomness comes from the
//! `rng` passed in, so a seeded rng gives a reproducible view.

pub mod blur;
pub mod color;
pub mod contrastive_crop;
pub mod crop;
pub mod patches;
pub mod synthesis;

use std::fmt;

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, ImageShape};

pub use blur::GaussianBlur;
pub use color::{ColorJitter, Grayscale, Solarize};
pub use contrastive_crop::ContrastiveCrop;
pub use crop::{CropBox, HorizontalFlip, RandomResizedCrop};

/// One image, CHW `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub shape: ImageShape,
    pub data: Vec<f32>,
}

impl Image {
    pub fn new(shape: ImageShape, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), shape.numel(), "image data does not match shape {shape:?}");
        Self { shape, data }
    }
    /// The `height * width` values of channel `c`.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.shape.height * self.shape.width;
        &self.data[c * n..(c + 1) * n]
    }
}

/// One step of a view pipeline. Must keep the image's shape and keep values in `[0, 1]`.
pub trait Transform: Send + Sync + fmt::Debug {
    fn apply(&self, image: &mut Image, rng: &mut dyn RngCore);
}

/// Applies `inner` with probability `p` (torchvision's `RandomApply`).
#[derive(Debug)]
pub struct RandomApply {
    pub p: f32,
    pub inner: Box<dyn Transform>,
}

impl RandomApply {
    pub fn new(p: f32, inner: impl Transform + 'static) -> Self {
        Self { p, inner: Box::new(inner) }
    }
}

impl Transform for RandomApply {
    fn apply(&self, image: &mut Image, rng: &mut dyn RngCore) {
        if rng.random::<f32>() < self.p {
            self.inner.apply(image, rng);
        }
    }
}

/// The solarize threshold BYOL uses (on `[0, 1]` pixels).
pub const SOLARIZE_THRESHOLD: f32 = 0.5;

/// Everything that defines a view pipeline; it is saved with a training run's config.
///
/// The pipeline, in order: random resized crop (skipped when `crop_scale == (1, 1)`),
/// horizontal flip with `flip_p`, colour jitter with `jitter_p` (brightness, contrast,
/// saturation, hue strengths; saturation and hue act only on RGB), grayscale with
/// `grayscale_p` (RGB only), Gaussian blur with `blur_p` and sigma in `blur_sigma`
/// (kernel 10% of the image side), solarize at 0.5 with `solarize_p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Area fraction range of the random crop.
    pub crop_scale: (f32, f32),
    /// Aspect-ratio (width / height) range of the random crop.
    pub crop_ratio: (f32, f32),
    pub flip_p: f32,
    pub jitter_p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub grayscale_p: f32,
    pub blur_p: f32,
    pub blur_sigma: (f32, f32),
    pub solarize_p: f32,
    /// Centre-suppressed crops on the object's box instead of random resized crops
    /// ([`contrastive_crop`]), with the crop's scale and ratio above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contrastive_crop: Option<ContrastiveCropConfig>,
    /// Probability of pasting the image's foreground onto another training image first
    /// ([`synthesis`]); the foreground is the pixels above `synthesis_threshold`.
    #[serde(default)]
    pub synthesis_p: f32,
    #[serde(default = "default_synthesis_threshold")]
    pub synthesis_threshold: f32,
    /// Side of the square view the crop is resized to (multi-crop's local crops); the image's
    /// own size when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_size: Option<usize>,
}

/// ContrastiveCrop's settings (Peng et al. 2022 defaults: α 0.6, k 0.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContrastiveCropConfig {
    /// `Beta(α, α)` law of the crop centre in the box; below 1 it avoids the middle.
    pub alpha: f32,
    /// Heatmap cells at or above this fraction of its range are the object.
    pub heatmap_threshold: f32,
    /// Recompute the boxes from the encoder every this many epochs, from epoch `warmup_epochs`.
    pub refresh_every_epochs: usize,
    pub warmup_epochs: usize,
}

impl Default for ContrastiveCropConfig {
    fn default() -> Self {
        Self { alpha: 0.6, heatmap_threshold: 0.1, refresh_every_epochs: 1, warmup_epochs: 1 }
    }
}

fn default_synthesis_threshold() -> f32 {
    0.1
}

impl AugmentConfig {
    /// SimCLR's recipe (Chen et al. 2020, appendix A) for small images: crop scale (0.2, 1)
    /// instead of (0.08, 1) because 28x28 and 32x32 images lose too much otherwise, flip 0.5,
    /// colour jitter p 0.8 with strength 0.4 (hue 0.1), grayscale 0.2, and no blur (SimCLR
    /// drops it for CIFAR-sized images).
    pub fn simclr() -> Self {
        Self {
            crop_scale: (0.2, 1.0),
            crop_ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: 0.0,
            blur_sigma: (0.1, 2.0),
            solarize_p: 0.0,
            contrastive_crop: None,
            synthesis_p: 0.0,
            synthesis_threshold: default_synthesis_threshold(),
            output_size: None,
        }
    }

    /// A multi-crop local view (Caron et al. 2020, SwAV): SimCLR's recipe on a crop of
    /// `scale` of the image's area, resized to `side` × `side`.
    pub fn local_crop(side: usize, scale: (f32, f32)) -> Self {
        Self { crop_scale: scale, output_size: Some(side), ..Self::simclr() }
    }

    /// BYOL's first view (Grill et al. 2020, table 6): SimCLR's crop, flip and grayscale,
    /// jitter p 0.8 with brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, blur always,
    /// never solarize.
    pub fn byol_view_a() -> Self {
        Self { saturation: 0.2, blur_p: 1.0, solarize_p: 0.0, ..Self::simclr() }
    }

    /// BYOL's second view: as [`Self::byol_view_a`] but blur p 0.1 and solarize p 0.2.
    pub fn byol_view_b() -> Self {
        Self { blur_p: 0.1, solarize_p: 0.2, ..Self::byol_view_a() }
    }

    /// Refuses settings the samplers cannot draw from (an empty or inverted range, a probability
    /// outside [0, 1]), naming the field and its value.
    pub fn validate(&self) -> anyhow::Result<()> {
        // `max` None: no upper bound.
        let range = |name: &str, (low, high): (f32, f32), max: Option<f32>| {
            let bound = max.map_or(String::new(), |max| format!(" <= {max}"));
            anyhow::ensure!(
                low > 0.0 && low <= high && high <= max.unwrap_or(f32::INFINITY),
                "augmentation: {name} must satisfy 0 < min <= max{bound}, got [{low}, {high}]"
            );
            Ok(())
        };
        range("crop_scale", self.crop_scale, Some(1.0))?;
        range("crop_ratio", self.crop_ratio, None)?;
        range("blur_sigma", self.blur_sigma, None)?;
        let probabilities = [
            ("flip_p", self.flip_p),
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p", self.blur_p),
            ("solarize_p", self.solarize_p),
            ("synthesis_p", self.synthesis_p),
            ("synthesis_threshold", self.synthesis_threshold),
        ];
        for (name, p) in probabilities {
            anyhow::ensure!((0.0..=1.0).contains(&p), "augmentation: {name} must be in [0, 1], got {p}");
        }
        for (name, strength) in
            [("brightness", self.brightness), ("contrast", self.contrast), ("saturation", self.saturation)]
        {
            anyhow::ensure!(
                strength >= 0.0 && strength.is_finite(),
                "augmentation: {name} must be a strength >= 0, got {strength}"
            );
        }
        anyhow::ensure!((0.0..=0.5).contains(&self.hue), "augmentation: hue must be in [0, 0.5], got {}", self.hue);
        anyhow::ensure!(self.output_size != Some(0), "augmentation: output_size must be at least 1 pixel");
        Ok(())
    }

    /// No augmentation: the pipeline returns the image unchanged.
    pub fn none() -> Self {
        Self {
            crop_scale: (1.0, 1.0),
            crop_ratio: (1.0, 1.0),
            flip_p: 0.0,
            jitter_p: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
            grayscale_p: 0.0,
            blur_p: 0.0,
            blur_sigma: (0.1, 2.0),
            solarize_p: 0.0,
            contrastive_crop: None,
            synthesis_p: 0.0,
            synthesis_threshold: default_synthesis_threshold(),
            output_size: None,
        }
    }

    /// Mild crop (scale 0.5 to 1) and flip only, for fine-tuning on little labelled data.
    pub fn weak() -> Self {
        Self { crop_scale: (0.5, 1.0), crop_ratio: (3.0 / 4.0, 4.0 / 3.0), flip_p: 0.5, ..Self::none() }
    }
}

/// A view pipeline: transforms applied in order, after the steps that need more than the image
/// (pasting onto another training image, a crop on the image's object box).
#[derive(Debug, Default)]
pub struct Pipeline {
    synthesis: Option<(f32, f32)>,
    object_crop: Option<ContrastiveCrop>,
    transforms: Vec<Box<dyn Transform>>,
    /// The views' side when the crop resizes them to a square of their own.
    output_size: Option<usize>,
}

impl Pipeline {
    /// A custom pipeline.
    pub fn new(transforms: Vec<Box<dyn Transform>>) -> Self {
        Self { synthesis: None, object_crop: None, transforms, output_size: None }
    }

    /// The pipeline [`AugmentConfig`] describes; steps whose probability or strength is 0 are
    /// left out.
    pub fn from_config(config: &AugmentConfig) -> Self {
        let mut steps: Vec<Box<dyn Transform>> = Vec::new();
        let object_crop = config
            .contrastive_crop
            .as_ref()
            .map(|c| ContrastiveCrop::new(config.crop_scale, config.crop_ratio, c.alpha));
        if (config.crop_scale != (1.0, 1.0) || config.output_size.is_some()) && object_crop.is_none() {
            let crop = RandomResizedCrop::new(config.crop_scale, config.crop_ratio);
            steps.push(Box::new(match config.output_size {
                Some(side) => crop.with_output(side),
                None => crop,
            }));
        }
        if config.flip_p > 0.0 {
            steps.push(Box::new(RandomApply::new(config.flip_p, HorizontalFlip)));
        }
        let jitter = ColorJitter {
            brightness: config.brightness,
            contrast: config.contrast,
            saturation: config.saturation,
            hue: config.hue,
        };
        if config.jitter_p > 0.0
            && [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue].iter().any(|&s| s > 0.0)
        {
            steps.push(Box::new(RandomApply::new(config.jitter_p, jitter)));
        }
        if config.grayscale_p > 0.0 {
            steps.push(Box::new(RandomApply::new(config.grayscale_p, Grayscale)));
        }
        if config.blur_p > 0.0 {
            steps.push(Box::new(RandomApply::new(config.blur_p, GaussianBlur::new(config.blur_sigma))));
        }
        if config.solarize_p > 0.0 {
            steps.push(Box::new(RandomApply::new(config.solarize_p, Solarize { threshold: SOLARIZE_THRESHOLD })));
        }
        let synthesis = (config.synthesis_p > 0.0).then_some((config.synthesis_p, config.synthesis_threshold));
        Self { synthesis, object_crop, transforms: steps, output_size: config.output_size }
    }

    /// The shape of this pipeline's views of `input`-shaped images.
    pub fn output_shape(&self, input: ImageShape) -> ImageShape {
        match self.output_size {
            Some(side) => ImageShape::new(input.channels, side, side),
            None => input,
        }
    }

    /// Appends a step.
    pub fn push(&mut self, transform: impl Transform + 'static) {
        self.transforms.push(Box::new(transform));
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.transforms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.transforms.is_empty()
    }

    /// Runs every step on `image` in place.
    pub fn apply_image(&self, image: &mut Image, rng: &mut dyn RngCore) {
        let shape = image.shape;
        for transform in &self.transforms {
            transform.apply(image, rng);
        }
        debug_assert_eq!(image.shape, self.output_shape(shape), "the pipeline's steps changed the view's shape");
    }

    /// A new view of `pixels` (CHW, `shape`): same shape, values in `[0, 1]`. Without a
    /// training set, image synthesis is skipped and ContrastiveCrop takes the whole image.
    pub fn apply(&self, pixels: &[f32], shape: ImageShape, rng: &mut dyn RngCore) -> Vec<f32> {
        let mut image = Image::new(shape, pixels.to_vec());
        if let Some(crop) = &self.object_crop {
            crop.with_object(None).apply(&mut image, rng);
        }
        self.apply_image(&mut image, rng);
        image.data
    }

    /// A new view of training image `index`: pasted onto another of `dataset`'s images (image
    /// synthesis), cropped on its `object` box (ContrastiveCrop) when the pipeline has those steps.
    pub fn apply_in(
        &self,
        dataset: &Dataset,
        index: usize,
        object: Option<CropBox>,
        rng: &mut dyn RngCore,
    ) -> Vec<f32> {
        let mut image = Image::new(dataset.shape, dataset.image(index).to_vec());
        if let Some((p, threshold)) = self.synthesis {
            if dataset.len() > 1 && rng.random::<f32>() < p {
                let other = (index + rng.random_range(1..dataset.len())) % dataset.len();
                image = synthesis::paste_foreground(&image, dataset.image(other), threshold);
            }
        }
        if let Some(crop) = &self.object_crop {
            crop.with_object(object).apply(&mut image, rng);
        }
        self.apply_image(&mut image, rng);
        image.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    /// A smooth, non-symmetric test image with values spread over [0, 1].
    fn test_image(shape: ImageShape) -> Vec<f32> {
        let (h, w) = (shape.height as f32, shape.width as f32);
        (0..shape.numel())
            .map(|i| {
                let (c, y, x) = (i / (shape.height * shape.width), (i / shape.width) % shape.height, i % shape.width);
                (0.5 + 0.45 * ((x as f32 / w * 5.0 + c as f32).sin() * (y as f32 / h * 3.0).cos())).clamp(0.0, 1.0)
            })
            .collect()
    }

    fn all_configs() -> Vec<AugmentConfig> {
        let heavy =
            AugmentConfig { blur_p: 1.0, solarize_p: 0.5, grayscale_p: 0.5, jitter_p: 1.0, ..AugmentConfig::simclr() };
        vec![
            AugmentConfig::simclr(),
            AugmentConfig::byol_view_a(),
            AugmentConfig::byol_view_b(),
            AugmentConfig::weak(),
            AugmentConfig::none(),
            heavy,
        ]
    }

    #[test]
    fn outputs_keep_shape_and_range_for_gray_and_rgb() {
        for shape in [ImageShape::new(1, 28, 28), ImageShape::new(3, 32, 32), ImageShape::new(3, 20, 12)] {
            let pixels = test_image(shape);
            for config in all_configs() {
                let pipeline = Pipeline::from_config(&config);
                let mut rng = SmallRng::seed_from_u64(11);
                for _ in 0..50 {
                    let view = pipeline.apply(&pixels, shape, &mut rng);
                    assert_eq!(view.len(), shape.numel());
                    assert!(view.iter().all(|v| (0.0..=1.0).contains(v)), "{config:?} left [0, 1]");
                }
            }
        }
    }

    #[test]
    fn same_seed_same_view_different_seed_different_view() {
        let shape = ImageShape::new(3, 16, 16);
        let pixels = test_image(shape);
        let pipeline = Pipeline::from_config(&AugmentConfig::byol_view_b());
        let view = |seed| pipeline.apply(&pixels, shape, &mut SmallRng::seed_from_u64(seed));
        assert_eq!(view(5), view(5));
        assert_ne!(view(5), view(6));
    }

    #[test]
    fn zero_probabilities_and_full_crop_are_identity() {
        let shape = ImageShape::new(3, 10, 10);
        let pixels = test_image(shape);
        let none = Pipeline::from_config(&AugmentConfig::none());
        assert!(none.is_empty());
        assert_eq!(none.apply(&pixels, shape, &mut SmallRng::seed_from_u64(0)), pixels);
        // An explicit crop with scale (1, 1) and ratio (1, 1) on a square image, every
        // probability 0 but strengths set: still the identity.
        let explicit = Pipeline::new(vec![
            Box::new(RandomResizedCrop::new((1.0, 1.0), (1.0, 1.0))),
            Box::new(RandomApply::new(0.0, HorizontalFlip)),
            Box::new(RandomApply::new(0.0, ColorJitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1 })),
            Box::new(RandomApply::new(0.0, Grayscale)),
            Box::new(RandomApply::new(0.0, GaussianBlur::new((0.1, 2.0)))),
            Box::new(RandomApply::new(0.0, Solarize { threshold: 0.5 })),
        ]);
        assert_eq!(explicit.apply(&pixels, shape, &mut SmallRng::seed_from_u64(1)), pixels);
    }

    #[test]
    fn certain_flip_reverses_rows() {
        let shape = ImageShape::new(1, 2, 3);
        let mut pipeline = Pipeline::default();
        pipeline.push(RandomApply::new(1.0, HorizontalFlip));
        let out = pipeline.apply(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], shape, &mut SmallRng::seed_from_u64(0));
        assert_eq!(out, vec![0.2, 0.1, 0.0, 0.5, 0.4, 0.3]);
    }

    #[test]
    fn random_apply_fires_at_its_rate() {
        let shape = ImageShape::new(1, 1, 2);
        let flip = RandomApply::new(0.8, HorizontalFlip);
        let mut rng = SmallRng::seed_from_u64(9);
        let fired = (0..10_000)
            .filter(|_| {
                let mut image = Image::new(shape, vec![0.0, 1.0]);
                flip.apply(&mut image, &mut rng);
                image.data[0] == 1.0
            })
            .count();
        assert!((7_700..8_300).contains(&fired), "{fired}");
    }

    fn tiny_dataset() -> Dataset {
        // Three 1×2×2 images: a bright pixel on black, and two plain backgrounds.
        let images = vec![0.9, 0.0, 0.0, 0.0, 0.4, 0.4, 0.4, 0.4, 0.7, 0.7, 0.7, 0.7];
        Dataset::new(images, vec![0, 1, 2], ImageShape::new(1, 2, 2), vec!["a".into(), "b".into(), "c".into()]).unwrap()
    }

    #[test]
    fn synthesis_pastes_the_foreground_onto_another_training_image() {
        let data = tiny_dataset();
        let pipeline = Pipeline::from_config(&AugmentConfig { synthesis_p: 1.0, ..AugmentConfig::none() });
        let mut seen = std::collections::HashSet::new();
        for seed in 0..50 {
            let view = pipeline.apply_in(&data, 0, None, &mut SmallRng::seed_from_u64(seed));
            assert_eq!(view[0], 0.9, "the object stays");
            assert!(view[1..] == [0.4; 3] || view[1..] == [0.7; 3], "another image's background: {view:?}");
            seen.insert(view[1].to_bits());
        }
        assert_eq!(seen.len(), 2, "both other images serve as backgrounds");
    }

    #[test]
    fn without_context_steps_a_view_in_the_dataset_is_the_plain_view() {
        let data = tiny_dataset();
        let pipeline = Pipeline::from_config(&AugmentConfig::simclr());
        for index in 0..3 {
            let plain = pipeline.apply(data.image(index), data.shape, &mut SmallRng::seed_from_u64(4));
            assert_eq!(pipeline.apply_in(&data, index, None, &mut SmallRng::seed_from_u64(4)), plain);
        }
    }

    #[test]
    fn contrastive_crop_replaces_the_random_resized_crop() {
        let config =
            AugmentConfig { contrastive_crop: Some(ContrastiveCropConfig::default()), ..AugmentConfig::simclr() };
        let pipeline = Pipeline::from_config(&config);
        assert_eq!(pipeline.len(), 3, "flip, jitter, grayscale; the crop is the object crop");
        let shape = ImageShape::new(1, 28, 28);
        let view = pipeline.apply(&test_image(shape), shape, &mut SmallRng::seed_from_u64(2));
        assert_eq!(view.len(), shape.numel());
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<AugmentConfig>(&json).unwrap(), config);
    }

    #[test]
    fn config_round_trips_through_json_and_views_differ() {
        for config in all_configs() {
            let json = serde_json::to_string(&config).unwrap();
            assert_eq!(serde_json::from_str::<AugmentConfig>(&json).unwrap(), config);
        }
        let (a, b) = (AugmentConfig::byol_view_a(), AugmentConfig::byol_view_b());
        assert_eq!((a.blur_p, a.solarize_p, b.blur_p, b.solarize_p), (1.0, 0.0, 0.1, 0.2));
        assert_eq!(Pipeline::from_config(&AugmentConfig::weak()).len(), 2);
        assert_eq!(Pipeline::from_config(&AugmentConfig::simclr()).len(), 4);
    }
}
