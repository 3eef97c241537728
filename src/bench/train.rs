//! `contrastive bench train`: images per second of one training step of each method on the
//! canonical encoder, beside a plain-candle-conv2d SimCLR step measured in the same run, so the
//! ratio holds however loaded the machine is.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};

use contrastive_kernels::Backend;

use crate::data::ImageShape;
use crate::train::arch::MethodConfig;
use crate::train::config::TrainConfig;
use crate::train::Model;

/// Seconds per step of `method` at `batch_size` (two 28×28 grayscale views), the median of
/// `steps` timed steps after one warm-up step.
pub fn step_seconds(
    method: &MethodConfig,
    batch_size: usize,
    steps: usize,
    device: &Device,
    backend: Backend,
) -> Result<f64> {
    let shape = ImageShape::new(1, 28, 28);
    let mut config = TrainConfig::for_method(method.clone(), shape);
    config.batch_size = batch_size;
    let mut model = Model::with_backend(&config, device, backend)?;
    let mut optimizer = model.optimizer();
    let views: Vec<Tensor> = (0..2)
        .map(|_| Tensor::rand(0f32, 1f32, (batch_size, 1, 28, 28), device))
        .collect::<candle_core::Result<_>>()?;
    let labels = Tensor::from_vec((0..batch_size as u32).map(|i| i % 10).collect(), batch_size, device)?;
    let mut times = Vec::new();
    for step in 0..=steps {
        let started = Instant::now();
        let loss = model.method.loss(&views, &labels, 1_000_000)?;
        optimizer.step(&loss.backward()?, 0.01)?;
        model.method.after_step(0.5)?;
        device.synchronize()?;
        if step > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Prints a table of images/s per method and the ratio against the plain-candle baseline.
pub fn run(methods: &[String], batch_size: usize, steps: usize, device: &Device) -> Result<()> {
    let simclr = MethodConfig::default_for("simclr")?;
    let baseline = batch_size as f64 / step_seconds(&simclr, batch_size, steps.min(2), device, Backend::Candle)?;
    println!("batch {batch_size}, two 28×28 views, canonical encoder, {steps} timed steps (median)");
    println!("{:<28} {:>10} {:>8}", "step", "images/s", "ratio");
    println!("{:<28} {:>10.1} {:>8.2}", "simclr (candle conv2d)", baseline, 1.0);
    for name in methods {
        let method = MethodConfig::default_for(name)?;
        let rate = batch_size as f64 / step_seconds(&method, batch_size, steps, device, Backend::Fused)?;
        println!("{:<28} {:>10.1} {:>8.2}", name, rate, rate / baseline);
    }
    Ok(())
}
