//! Frozen features of a dataset: an encoder in evaluation mode, batch after batch.

use candle_core::{Device, Result, Tensor};

use crate::data::Dataset;

/// `forward`'s features of every image of `dataset`, `[N, feature_dim]`, `batch_size` images
/// at a time. `forward` takes `[n, C, H, W]` images (an encoder in evaluation mode).
pub fn encode(
    dataset: &Dataset,
    device: &Device,
    batch_size: usize,
    forward: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let shape = dataset.shape;
    let mut chunks = Vec::new();
    for start in (0..dataset.len()).step_by(batch_size.max(1)) {
        let end = (start + batch_size).min(dataset.len());
        let pixels = &dataset.images[start * shape.numel()..end * shape.numel()];
        let x = Tensor::from_slice(pixels, (end - start, shape.channels, shape.height, shape.width), device)?;
        chunks.push(forward(&x)?.detach());
    }
    if chunks.is_empty() {
        candle_core::bail!("cannot encode an empty dataset")
    }
    Tensor::cat(&chunks, 0)
}
