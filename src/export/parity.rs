//! Parity: the same inputs through candle and through ONNX Runtime must give the same embeddings.

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use crate::data::Dataset;
use crate::registry::manifest::{ParityCase, ParityReport};
use crate::runtime::{OnnxEncoder, SessionOptions, ORT_VERSION};
use crate::train::Model;
use contrastive_kernels::l2_normalize;

/// The largest |candle − ONNX Runtime| an export may show.
pub const PARITY_TOLERANCE: f32 = 1e-4;
/// Batch 1, and an odd size that no kernel's vector width divides.
const BATCH_SIZES: [usize; 2] = [1, 7];
const SEED: u64 = 0x5eed;

/// Runs random images and (when given) the first images of `images` through `model`'s encoder in
/// candle and through `onnx_model` in ONNX Runtime on the CPU; fails with the figures when any
/// difference exceeds `tolerance`.
pub fn check_parity(
    model: &Model,
    onnx_model: &[u8],
    l2_normalized: bool,
    images: Option<&Dataset>,
    tolerance: f32,
) -> Result<ParityReport> {
    let shape = model.config.data.image_shape();
    let mut session = OnnxEncoder::load_bytes(onnx_model, SessionOptions { intra_threads: 1, ..Default::default() })?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut cases = Vec::new();
    for &batch in &BATCH_SIZES {
        let random: Vec<f32> = (0..batch * shape.numel()).map(|_| rng.random::<f32>()).collect();
        cases.push(("random", batch, random));
        if let Some(dataset) = images {
            if dataset.shape == shape && dataset.len() >= batch {
                cases.push(("images", batch, dataset.images[..batch * shape.numel()].to_vec()));
            }
        }
    }
    let mut report =
        ParityReport { max_abs_diff: 0.0, tolerance, onnxruntime_version: ORT_VERSION.into(), cases: Vec::new() };
    for (input, batch, pixels) in cases {
        let x = Tensor::from_slice(&pixels, (batch, shape.channels, shape.height, shape.width), &model.device)?;
        let mut expected = model.method.encoder().forward_t(&x, false)?;
        if l2_normalized {
            expected = l2_normalize(&expected)?;
        }
        let expected = expected.flatten_all()?.to_vec1::<f32>()?;
        let (actual, _) = session.run(&pixels, batch, shape.dims())?;
        if actual.len() != expected.len() {
            bail!("ONNX Runtime returned {} values for {input} batch {batch}, candle {}", actual.len(), expected.len());
        }
        let diff = expected.iter().zip(&actual).map(|(a, b)| (a - b).abs()).fold(0.0f32, |m, d| {
            if d.is_nan() {
                f32::INFINITY
            } else {
                m.max(d)
            }
        });
        report.max_abs_diff = report.max_abs_diff.max(diff);
        report.cases.push(ParityCase { input: input.into(), batch, max_abs_diff: diff });
    }
    if report.max_abs_diff > tolerance || !report.max_abs_diff.is_finite() {
        let figures: Vec<String> =
            report.cases.iter().map(|c| format!("{} batch {}: {:.3e}", c.input, c.batch, c.max_abs_diff)).collect();
        bail!(
            "parity check failed: candle and ONNX Runtime differ by up to {:.3e} (tolerance {tolerance:.0e}; {}); nothing was published",
            report.max_abs_diff,
            figures.join(", ")
        );
    }
    Ok(report)
}
