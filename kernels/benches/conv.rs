//! Forward + backward of each convolution of the canonical encoder (CIFAR-style ResNet on 28×28
//! grayscale, widths 32/64/128) with candle's `conv2d` and with this crate's im2col op, in the
//! same run, with the ratio. Where the time goes in a training step is `contrastive bench train`.
//!
//! Run: `cargo bench -p contrastive-kernels --bench conv [-- --batch 512 --reps 2 --ours-only]`

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};

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
fn time_layers(fused: bool, batch: usize, reps: usize) -> Result<Vec<(f64, f64)>> {
    let device = Device::Cpu;
    let mut times = Vec::new();
    for (i, &(_, c_in, c_out, kernel, stride, padding, side)) in LAYERS.iter().enumerate() {
        let weight = Var::randn(0f32, 0.1, (c_out, c_in, kernel, kernel), &device)?;
        let input = Tensor::randn(0f32, 1.0, (batch, c_in, side, side), &device)?;
        // The stem's input is data; every other layer's input needs its gradient.
        let input = if i == 0 { input } else { Var::from_tensor(&input)?.into_inner() };
        let mut best = (f64::INFINITY, f64::INFINITY);
        for _ in 0..reps + 1 {
            let start = Instant::now();
            let output = match fused {
                true => contrastive_kernels::conv2d(&input, &weight, stride, padding)?,
                false => input.conv2d(&weight, padding, stride, 1, 1)?,
            };
            let forward = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let grads = output.backward()?;
            let backward = start.elapsed().as_secs_f64();
            assert!(grads.get(&weight).is_some());
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
    println!(
        "conv layers of the canonical encoder, {batch} images, f32, best of {reps} after a warm-up, {} threads",
        rayon::current_num_threads()
    );
    // `--ours-only` skips candle's slow layers (for profiling this crate's).
    let ours = time_layers(true, batch, reps)?;
    let candle = match args.iter().any(|a| a == "--ours-only") {
        true => vec![(f64::NAN, f64::NAN); LAYERS.len()],
        false => time_layers(false, batch, reps)?,
    };
    println!("{:<36} {:>19} {:>19} {:>7}", "layer", "candle fwd/bwd s", "im2col fwd/bwd s", "ratio");
    let (mut total_candle, mut total_ours) = (0.0, 0.0);
    for ((name, ..), (c, o)) in LAYERS.iter().zip(candle.iter().zip(&ours)) {
        let (tc, to) = (c.0 + c.1, o.0 + o.1);
        total_candle += tc;
        total_ours += to;
        println!("{name:<36} {:>9.4}/{:<9.4} {:>9.4}/{:<9.4} {:>7.2}", c.0, c.1, o.0, o.1, tc / to);
    }
    println!("{:<36} {:>19.4} {:>19.4} {:>7.2}", "all layers", total_candle, total_ours, total_candle / total_ours);
    Ok(())
}
