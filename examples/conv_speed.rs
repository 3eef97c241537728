//! Times forward + backward of the canonical encoder's convolutions (CIFAR-style ResNet on 28x28
//! grayscale, widths 32/64/128) at 512 images with candle's conv2d and with the im2col op, in the
//! same run, and prints the ratio.
//!
//! Run: `cargo run --release --example conv_speed [-- --batch 512 --reps 2]`

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use contrastive::train::arch::conv::{set_default_backend, Conv2d, ConvBackend};
use candle_nn::{VarBuilder, VarMap};

/// One conv layer of the canonical encoder: name, in, out, kernel, stride, padding, input side.
const LAYERS: [(&str, usize, usize, usize, usize, usize, usize); 9] = [
    ("stem 1->32 k3 s1 @28", 1, 32, 3, 1, 1, 28),
    ("block1.conv1 32->32 k3 s1 @28", 32, 32, 3, 1, 1, 28),
    ("block1.conv2 32->32 k3 s1 @28", 32, 32, 3, 1, 1, 28),
    ("block2.conv1 32->64 k3 s2 @28", 32, 64, 3, 2, 1, 28),
    ("block2.conv2 64->64 k3 s1 @14", 64, 64, 3, 1, 1, 14),
    ("block2.shortcut 32->64 k1 s2 @28", 32, 64, 1, 2, 0, 28),
    ("block3.conv1 64->128 k3 s2 @14", 64, 128, 3, 2, 1, 14),
    ("block3.conv2 128->128 k3 s1 @7", 128, 128, 3, 1, 1, 7),
    ("block3.shortcut 64->128 k1 s2 @14", 64, 128, 1, 2, 0, 14),
];

/// Seconds of (forward, backward) per layer, the best of `reps` runs after one warm-up.
fn time_layers(backend: ConvBackend, batch: usize, reps: usize) -> Result<Vec<(f64, f64)>> {
    set_default_backend(backend);
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut times = Vec::new();
    for (i, &(_, c_in, c_out, kernel, stride, padding, side)) in LAYERS.iter().enumerate() {
        let conv = Conv2d::new(vb.pp(format!("conv{i}")), c_in, c_out, kernel, stride, padding)?;
        let input = Tensor::randn(0f32, 1.0, (batch, c_in, side, side), &device)?;
        // The stem's input is data; every other layer's input needs its gradient.
        let input = if i == 0 { input } else { Var::from_tensor(&input)?.into_inner() };
        let mut best = (f64::INFINITY, f64::INFINITY);
        for _ in 0..reps + 1 {
            let start = Instant::now();
            let output = conv.forward(&input)?;
            let forward = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let grads = output.backward()?;
            let backward = start.elapsed().as_secs_f64();
            assert!(grads.get(conv.weight()).is_some());
            best = (best.0.min(forward), best.1.min(backward));
        }
        times.push(best);
    }
    Ok(times)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |v| v.parse().expect(name))
    };
    let (batch, reps) = (flag("--batch", 512), flag("--reps", 2));
    println!("conv layers of the canonical encoder, {batch} images 28x28, f32, best of {reps} (after a warm-up), {} threads", rayon::current_num_threads());
    let candle = time_layers(ConvBackend::Candle, batch, reps)?;
    let im2col = time_layers(ConvBackend::Im2col, batch, reps)?;
    println!("{:<36} {:>10} {:>10} {:>10} {:>10} {:>7}", "layer", "candle fwd", "candle bwd", "im2col fwd", "im2col bwd", "ratio");
    let mut totals = [0.0; 4];
    for (((name, ..), c), m) in LAYERS.iter().zip(&candle).zip(&im2col) {
        println!("{name:<36} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>6.1}x", c.0, c.1, m.0, m.1, (c.0 + c.1) / (m.0 + m.1));
        for (total, t) in totals.iter_mut().zip([c.0, c.1, m.0, m.1]) {
            *total += t;
        }
    }
    let [cf, cb, mf, mb] = totals;
    println!("{:<36} {cf:>10.3} {cb:>10.3} {mf:>10.3} {mb:>10.3} {:>6.1}x", "total (s)", (cf + cb) / (mf + mb));
    println!("im2col forward+backward: {:.3} s for {batch} images ({:.0} images/s); candle: {:.3} s", mf + mb, batch as f64 / (mf + mb), cf + cb);
    Ok(())
}
