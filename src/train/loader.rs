//! Batches of augmented views, made by a background thread while the training step runs.
//!
//! Randomness is seeded, and never shared between images, so batches do not depend on
//! thread timing: the visiting order depends only on `(seed, epoch)` and each view of an
//! image only on `(seed, epoch, dataset index, view index)`.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use candle_core::{Device, Tensor};

use super::augment::crop::CropBox;
use super::augment::{AugmentConfig, Pipeline};
use crate::data::{Dataset, ImageShape};

/// How a [`BatchLoader`] cuts and orders an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Visit the dataset in a random order (seeded by `seed` and the epoch) instead of 0, 1, 2, ...
    pub shuffle: bool,
    /// Leave out the last batch when it would be smaller than `batch_size`.
    pub drop_last: bool,
    /// How many finished batches may wait for the consumer (at least 1 is used).
    pub prefetch: usize,
    /// Each training image's object box, for ContrastiveCrop (the whole image when `None`).
    pub object_boxes: Option<Arc<Vec<CropBox>>>,
}

/// One batch: every pipeline's view of the same images.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// One entry per pipeline; each holds `indices.len()` views of its shape, image after image
    /// (CHW each), ready for a `[batch, channels, height, width]` tensor.
    pub views: Vec<Vec<f32>>,
    pub labels: Vec<u32>,
    /// The dataset index of each image.
    pub indices: Vec<usize>,
    /// The shape of each pipeline's views: the images' own, or a multi-crop local crop's.
    pub shapes: Vec<ImageShape>,
}

impl Batch {
    /// Each view as a `[batch, channels, height, width]` tensor on `device`.
    pub fn view_tensors(&self, device: &Device) -> candle_core::Result<Vec<Tensor>> {
        self.views
            .iter()
            .zip(&self.shapes)
            .map(|(v, s)| Tensor::from_slice(v, (self.len(), s.channels, s.height, s.width), device))
            .collect()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// One augmentation pipeline per view, as the run config describes them.
pub fn view_pipelines(augment: &[AugmentConfig]) -> Vec<Arc<Pipeline>> {
    augment.iter().map(|a| Arc::new(Pipeline::from_config(a))).collect()
}

/// Number of batches one epoch yields.
pub fn batches_per_epoch(len: usize, batch_size: usize, drop_last: bool) -> usize {
    assert!(batch_size > 0, "batch size must be positive");
    if drop_last {
        len / batch_size
    } else {
        len.div_ceil(batch_size)
    }
}

/// The order in which an epoch visits the dataset: a seeded permutation, or `0..len`.
pub fn epoch_order(len: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        order.shuffle(&mut SmallRng::seed_from_u64(mix_seed(&[seed, SHUFFLE_STREAM, epoch as u64])));
    }
    order
}

/// The rng seed for view `view` of dataset image `index` in `epoch`.
pub fn view_seed(seed: u64, epoch: usize, index: usize, view: usize) -> u64 {
    mix_seed(&[seed, VIEW_STREAM, epoch as u64, index as u64, view as u64])
}

/// Makes the batch of `indices` synchronously: each pipeline's view of each image.
///
/// Images are augmented in parallel on rayon's pool when the batch is big enough to be
/// worth it; the result is the same either way.
pub fn make_batch(
    dataset: &Dataset,
    pipelines: &[Arc<Pipeline>],
    indices: &[usize],
    seed: u64,
    epoch: usize,
    object_boxes: Option<&[CropBox]>,
) -> Batch {
    let parallel = indices.len() * dataset.shape.numel() >= PARALLEL_MIN_VALUES;
    make_batch_with(dataset, pipelines, indices, seed, epoch, object_boxes, parallel)
}

fn make_batch_with(
    dataset: &Dataset,
    pipelines: &[Arc<Pipeline>],
    indices: &[usize],
    seed: u64,
    epoch: usize,
    object_boxes: Option<&[CropBox]>,
    parallel: bool,
) -> Batch {
    let shapes: Vec<ImageShape> = pipelines.iter().map(|p| p.output_shape(dataset.shape)).collect();
    let views = (0..pipelines.len())
        .map(|v| {
            let numel = shapes[v].numel();
            let view_into = |dst: &mut [f32], &index: &usize| {
                let mut rng = SmallRng::seed_from_u64(view_seed(seed, epoch, index, v));
                let object = object_boxes.map(|boxes| boxes[index]);
                dst.copy_from_slice(&pipelines[v].apply_in(dataset, index, object, &mut rng));
            };
            let mut out = vec![0.0; indices.len() * numel];
            if parallel {
                out.par_chunks_mut(numel).zip(indices).for_each(|(dst, i)| view_into(dst, i));
            } else {
                out.chunks_mut(numel).zip(indices).for_each(|(dst, i)| view_into(dst, i));
            }
            out
        })
        .collect();
    let labels = indices.iter().map(|&i| dataset.labels[i]).collect();
    Batch { views, labels, indices: indices.to_vec(), shapes }
}

/// Yields one epoch of [`Batch`]es, made ahead by a background thread.
///
/// Dropping the loader early stops the thread: it notices at its next send and exits.
/// If the thread panics, the panic resurfaces in [`Iterator::next`].
pub struct BatchLoader {
    receiver: Option<Receiver<Batch>>,
    worker: Option<JoinHandle<()>>,
    remaining: usize,
}

impl BatchLoader {
    /// Starts making the batches of `epoch`.
    pub fn spawn(dataset: Arc<Dataset>, pipelines: Vec<Arc<Pipeline>>, config: LoaderConfig, epoch: usize) -> Self {
        let total = batches_per_epoch(dataset.len(), config.batch_size, config.drop_last);
        let (sender, receiver) = sync_channel(config.prefetch.max(1));
        let worker = thread::Builder::new()
            .name(format!("batch-loader-epoch-{epoch}"))
            .spawn(move || {
                let order = epoch_order(dataset.len(), config.seed, epoch, config.shuffle);
                for indices in order.chunks(config.batch_size).take(total) {
                    let boxes = config.object_boxes.as_deref().map(Vec::as_slice);
                    let batch = make_batch(&dataset, &pipelines, indices, config.seed, epoch, boxes);
                    if sender.send(batch).is_err() {
                        return; // the loader was dropped
                    }
                }
            })
            .expect("cannot spawn the batch loader thread");
        Self { receiver: Some(receiver), worker: Some(worker), remaining: total }
    }

    /// Same as the free function [`batches_per_epoch`].
    pub fn batches_per_epoch(len: usize, batch_size: usize, drop_last: bool) -> usize {
        batches_per_epoch(len, batch_size, drop_last)
    }
}

impl Iterator for BatchLoader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        match self.receiver.as_ref()?.recv() {
            Ok(batch) => {
                self.remaining -= 1;
                Some(batch)
            }
            Err(_) => {
                // The worker is gone: finished, or panicked.
                self.receiver = None;
                if let Some(Err(panic)) = self.worker.take().map(JoinHandle::join) {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for BatchLoader {}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Closing the channel first makes a blocked `send` fail, so the join cannot hang.
        drop(self.receiver.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Below this many values per view a batch is augmented on the loader thread alone:
/// rayon's hand-off costs more than it saves, and the training step wants the cores.
const PARALLEL_MIN_VALUES: usize = 1 << 20;

/// Stream tags so the shuffle and the views never draw from the same seed.
const SHUFFLE_STREAM: u64 = 0x5348_5546; // "SHUF"
const VIEW_STREAM: u64 = 0x5649_4557; // "VIEW"

/// Folds `parts` into one well-mixed seed with SplitMix64 (Steele, Lea & Flood 2014).
pub(crate) fn mix_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0x243F_6A88_85A3_08D3, |hash, &part| splitmix64(hash ^ part))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    /// `len` 2x3x3 images; image `i` holds values derived from `i`, label `i % 3`.
    fn dataset(len: usize) -> Arc<Dataset> {
        let shape = ImageShape::new(2, 3, 3);
        let images = (0..len * shape.numel()).map(|v| (v % 97) as f32 / 96.0).collect();
        let labels = (0..len).map(|i| (i % 3) as u32).collect();
        Arc::new(Dataset::new(images, labels, shape, vec!["a".into(), "b".into(), "c".into()]).unwrap())
    }

    fn config(batch_size: usize, seed: u64) -> LoaderConfig {
        LoaderConfig { batch_size, seed, shuffle: true, drop_last: false, prefetch: 2, object_boxes: None }
    }

    fn simclr_pair() -> Vec<Arc<Pipeline>> {
        vec![
            Arc::new(Pipeline::from_config(&AugmentConfig::simclr())),
            Arc::new(Pipeline::from_config(&AugmentConfig::simclr())),
        ]
    }

    #[test]
    fn batch_counts() {
        assert_eq!(batches_per_epoch(10, 3, false), 4);
        assert_eq!(batches_per_epoch(10, 3, true), 3);
        assert_eq!(batches_per_epoch(9, 3, true), 3);
        assert_eq!(batches_per_epoch(0, 3, false), 0);
        assert_eq!(BatchLoader::batches_per_epoch(2, 3, true), 0);
    }

    #[test]
    fn same_seed_same_batches() {
        let data = dataset(50);
        let a: Vec<Batch> = BatchLoader::spawn(data.clone(), simclr_pair(), config(8, 3), 1).collect();
        let b: Vec<Batch> = BatchLoader::spawn(data.clone(), simclr_pair(), config(8, 3), 1).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 7);
        // The two views of an image differ (independent draws), and another seed changes things.
        assert_ne!(a[0].views[0], a[0].views[1]);
        let c: Vec<Batch> = BatchLoader::spawn(data, simclr_pair(), config(8, 4), 1).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn every_index_once_per_epoch_and_epochs_reorder() {
        let data = dataset(23);
        let epoch_indices = |epoch| -> Vec<usize> {
            let loader = BatchLoader::spawn(data.clone(), vec![], config(5, 9), epoch);
            assert_eq!(loader.len(), 5);
            loader.flat_map(|b| b.indices).collect()
        };
        let (first, second) = (epoch_indices(0), epoch_indices(1));
        assert_ne!(first, second);
        for order in [first, second] {
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..23).collect::<Vec<_>>());
        }
    }

    #[test]
    fn drop_last_and_no_shuffle() {
        let data = dataset(10);
        let cfg = LoaderConfig { shuffle: false, drop_last: true, ..config(4, 0) };
        let batches: Vec<Batch> = BatchLoader::spawn(data, vec![], cfg, 0).collect();
        let indices: Vec<Vec<usize>> = batches.iter().map(|b| b.indices.clone()).collect();
        assert_eq!(indices, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(batches[1].labels, vec![1, 2, 0, 1]);
    }

    #[test]
    fn identity_views_are_the_images_in_batch_order() {
        let data = dataset(12);
        let identity = vec![Arc::new(Pipeline::from_config(&AugmentConfig::none()))];
        for batch in BatchLoader::spawn(data.clone(), identity, config(5, 1), 0) {
            let expected: Vec<f32> = batch.indices.iter().flat_map(|&i| data.image(i).to_vec()).collect();
            assert_eq!(batch.views[0], expected);
            assert_eq!(batch.labels, batch.indices.iter().map(|&i| data.labels[i]).collect::<Vec<_>>());
        }
    }

    /// Multi-crop: a local-crop pipeline's views have its own square size, the others the
    /// images' (the dataset's images are 2×3×3); the whole image resized to 2×2 is sampled
    /// bilinearly at half-pixel centres.
    #[test]
    fn local_crops_have_their_own_size() -> candle_core::Result<()> {
        let data = dataset(4);
        let whole_to_two = AugmentConfig { crop_scale: (1.0, 1.0), output_size: Some(2), ..AugmentConfig::none() };
        let pipelines = vec![
            Arc::new(Pipeline::from_config(&AugmentConfig::none())),
            Arc::new(Pipeline::from_config(&whole_to_two)),
        ];
        let batch = make_batch(&data, &pipelines, &[0, 1, 2], 0, 0, None);
        assert_eq!(batch.shapes, vec![ImageShape::new(2, 3, 3), ImageShape::new(2, 2, 2)]);
        let tensors = batch.view_tensors(&Device::Cpu)?;
        assert_eq!(tensors[0].dims(), &[3, 2, 3, 3]);
        assert_eq!(tensors[1].dims(), &[3, 2, 2, 2]);
        // Output pixel (0, 0) samples the input at (0.25, 0.25): 9/16 of pixel (0, 0), 3/16 of
        // (0, 1) and of (1, 0), 1/16 of (1, 1).
        let image = data.image(1);
        let expected = (9.0 * image[0] + 3.0 * image[1] + 3.0 * image[3] + image[4]) / 16.0;
        let got = batch.views[1][2 * 4]; // image 1 (second in the batch), channel 0, pixel (0, 0)
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        Ok(())
    }

    #[test]
    fn views_do_not_depend_on_batching() {
        // Same (seed, epoch, index, view) gives the same view whatever the batch size.
        let data = dataset(30);
        let per_index = |batch_size| -> HashMap<usize, (Vec<f32>, Vec<f32>)> {
            let numel = data.shape.numel();
            let mut out = HashMap::new();
            for b in BatchLoader::spawn(data.clone(), simclr_pair(), config(batch_size, 5), 2) {
                for (k, &i) in b.indices.iter().enumerate() {
                    let view = |v: usize| b.views[v][k * numel..(k + 1) * numel].to_vec();
                    out.insert(i, (view(0), view(1)));
                }
            }
            out
        };
        assert_eq!(per_index(4), per_index(11));
    }

    #[test]
    fn dropping_mid_epoch_returns_promptly() {
        // 2000 batches would take a while; the worker must stop at its next send.
        let data = dataset(2000);
        let cfg = LoaderConfig { prefetch: 1, ..config(1, 0) };
        let start = Instant::now();
        let mut loader = BatchLoader::spawn(data, simclr_pair(), cfg, 0);
        assert!(loader.next().is_some());
        thread::sleep(Duration::from_millis(20)); // let the worker block on a full channel
        drop(loader);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }

    #[test]
    fn worker_panic_resurfaces_in_next() {
        #[derive(Debug)]
        struct Explode;
        impl crate::train::augment::Transform for Explode {
            fn apply(&self, _: &mut crate::train::augment::Image, _: &mut dyn rand::RngCore) {
                panic!("transform exploded");
            }
        }
        let pipeline = Arc::new(Pipeline::new(vec![Box::new(Explode)]));
        let mut loader = BatchLoader::spawn(dataset(4), vec![pipeline], config(2, 0), 0);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loader.next()));
        assert!(caught.is_err());
    }

    /// Throughput of view making; `cargo test --lib data::loader -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_augmentation_throughput() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/fashion-mnist-subset"));
        let gray = Arc::new(crate::data::idx::load_mnist_format_dir(dir, crate::data::idx::Split::Train).unwrap());
        let rgb_shape = ImageShape::new(3, 32, 32);
        let rgb = Arc::new(
            Dataset::new(vec![0.5; 1000 * rgb_shape.numel()], vec![0; 1000], rgb_shape, vec!["x".into()]).unwrap(),
        );
        let byol = vec![
            Arc::new(Pipeline::from_config(&AugmentConfig::byol_view_a())),
            Arc::new(Pipeline::from_config(&AugmentConfig::byol_view_b())),
        ];
        let indices: Vec<usize> = (0..256).collect();
        for (name, data, pipelines) in [("1x28x28 simclr", &gray, simclr_pair()), ("3x32x32 byol", &rgb, byol)] {
            for parallel in [false, true] {
                let start = Instant::now();
                for epoch in 0..10 {
                    make_batch_with(data, &pipelines, &indices, 0, epoch, None, parallel);
                }
                let per_batch = start.elapsed() / 10;
                eprintln!("{name}, 256 images x 2 views, parallel={parallel}: {per_batch:?} per batch");
            }
        }
    }
}
