//! Frozen features of a dataset: the encoder in evaluation mode, batch after batch.

use candle_core::{Device, Result, Tensor};

use crate::data::Dataset;
use crate::train::arch::ResNet;

/// The encoder's pooled features of every image of `dataset`, `[N, feature_dim]`, computed in
/// evaluation mode (running batch-norm statistics) `batch_size` images at a time.
pub fn encode(encoder: &ResNet, dataset: &Dataset, device: &Device, batch_size: usize) -> Result<Tensor> {
    let shape = dataset.shape;
    let mut chunks = Vec::new();
    for start in (0..dataset.len()).step_by(batch_size.max(1)) {
        let end = (start + batch_size).min(dataset.len());
        let pixels = &dataset.images[start * shape.numel()..end * shape.numel()];
        let x = Tensor::from_slice(pixels, (end - start, shape.channels, shape.height, shape.width), device)?;
        chunks.push(encoder.forward_t(&x, false)?.detach());
    }
    if chunks.is_empty() {
        candle_core::bail!("cannot encode an empty dataset")
    }
    Tensor::cat(&chunks, 0)
}
