//! Datasets held in memory as `f32` pixels in `[0, 1]`, channel-first (CHW), one label each.

pub mod idx;
pub mod image_folder;
pub mod long_tail;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// Channels, height and width of every image in a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    pub fn new(channels: usize, height: usize, width: usize) -> Self {
        Self { channels, height, width }
    }
    /// Number of `f32` values in one image.
    pub fn numel(&self) -> usize {
        self.channels * self.height * self.width
    }
    /// `[channels, height, width]`, as candle tensors want it.
    pub fn dims(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

/// A labelled image dataset, fully in memory.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `len * shape.numel()` pixels in `[0, 1]`, image after image, each CHW.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub shape: ImageShape,
    /// Class names indexed by label.
    pub class_names: Vec<String>,
}

impl Dataset {
    pub fn new(images: Vec<f32>, labels: Vec<u32>, shape: ImageShape, class_names: Vec<String>) -> Result<Self> {
        ensure!(
            images.len() == labels.len() * shape.numel(),
            "dataset has {} pixel values for {} labels of shape {:?}",
            images.len(),
            labels.len(),
            shape
        );
        ensure!(
            labels.iter().all(|&l| (l as usize) < class_names.len()),
            "a label is outside the {} class names",
            class_names.len()
        );
        Ok(Self { images, labels, shape, class_names })
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
    /// The pixels of image `i`, CHW.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.shape.numel();
        &self.images[i * n..(i + 1) * n]
    }
    /// A new dataset with the images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut images = Vec::with_capacity(indices.len() * self.shape.numel());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        Self { images, labels, shape: self.shape, class_names: self.class_names.clone() }
    }
    /// The first `n` images (all of them if there are fewer).
    pub fn head(&self, n: usize) -> Self {
        let indices: Vec<usize> = (0..n.min(self.len())).collect();
        self.subset(&indices)
    }
}
