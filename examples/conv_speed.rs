//! Times forward + backward of the canonical encoder's convolutions (CIFAR-style ResNet on 28x28
//! grayscale, widths 32/64/128) at 512 images with candle's conv2d and with the im2col op, in the
//! same run, and prints the ratio.
//!
//! `--encoder` instead times the whole encoder's forward + backward, as `resnet.rs` writes it and
//! as replicas with the fused activations and with fused conv + batch norm.
//!
//! `--step` times the whole SimCLR training step (batch/2 images, two views), as `contrastive
//! bench train` does but without its slow baseline.
//!
//! Run: `cargo run --release --example conv_speed [-- --batch 512 --reps 2 --im2col-only | --encoder | --step]`

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use contrastive::train::arch::activation::add_relu;
use contrastive::train::arch::batch_norm::BatchNorm2d;
use contrastive::train::arch::conv::{set_default_backend, Conv2d, ConvBackend};
use contrastive::train::arch::conv_bn::conv_bn_t;
use contrastive::train::arch::resnet::{ResNet, ResNetConfig};

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

/// The canonical encoder rebuilt from this crate's layers with the fused activations:
/// batch norm + ReLU in one op, residual sum + ReLU in one op; with `conv_bn`, each conv and its
/// batch norm in one op too.
struct FusedEncoder {
    conv_bn: bool,
    stem: (Conv2d, BatchNorm2d),
    blocks: Vec<Block>,
}

/// conv1, bn1, conv2, bn2, and the projection shortcut if the shape changes.
type Block = (Conv2d, BatchNorm2d, Conv2d, BatchNorm2d, Option<(Conv2d, BatchNorm2d)>);

impl FusedEncoder {
    fn new(vb: VarBuilder, conv_bn: bool) -> Result<Self> {
        let stem = (Conv2d::new(vb.pp("stem.conv"), 1, 32, 3, 1, 1)?, BatchNorm2d::new(vb.pp("stem.bn"), 32)?);
        let mut blocks = Vec::new();
        for (i, (c_in, c_out, stride)) in [(32, 32, 1), (32, 64, 2), (64, 128, 2)].into_iter().enumerate() {
            let vb = vb.pp(format!("block{i}"));
            let shortcut = match stride != 1 || c_in != c_out {
                true => Some((
                    Conv2d::new(vb.pp("sc.conv"), c_in, c_out, 1, stride, 0)?,
                    BatchNorm2d::new(vb.pp("sc.bn"), c_out)?,
                )),
                false => None,
            };
            blocks.push((
                Conv2d::new(vb.pp("conv1"), c_in, c_out, 3, stride, 1)?,
                BatchNorm2d::new(vb.pp("bn1"), c_out)?,
                Conv2d::new(vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
                BatchNorm2d::new(vb.pp("bn2"), c_out)?,
                shortcut,
            ));
        }
        Ok(Self { conv_bn, stem, blocks })
    }

    fn layer(&self, conv: &Conv2d, bn: &BatchNorm2d, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if self.conv_bn {
            return Ok(conv_bn_t(conv, bn, x, train, relu)?);
        }
        let z = conv.forward(x)?;
        Ok(if relu { bn.forward_t_relu(&z, train)? } else { bn.forward_t(&z, train)? })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.layer(&self.stem.0, &self.stem.1, x, train, true)?;
        for (conv1, bn1, conv2, bn2, shortcut) in &self.blocks {
            let y = self.layer(conv1, bn1, &h, train, true)?;
            let y = self.layer(conv2, bn2, &y, train, false)?;
            let identity = match shortcut {
                Some((conv, bn)) => self.layer(conv, bn, &h, train, false)?,
                None => h.clone(),
            };
            h = add_relu(&y, &identity)?;
        }
        Ok(h.flatten_from(2)?.mean(D::Minus1)?)
    }
}

/// Seconds of (forward, backward) of the whole canonical encoder (convs, batch norms, ReLUs,
/// pooling) in training mode, and the CPU seconds of both, the best of `reps` runs after one
/// warm-up: `ResNet` as written in
/// `resnet.rs` at fusion level 0, else [`FusedEncoder`] (level 2: with fused conv + batch norm).
fn time_encoder(fusion: u8, batch: usize, reps: usize) -> Result<(f64, f64, f64)> {
    set_default_backend(ConvBackend::Im2col);
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let (resnet, fused_encoder) = match fusion {
        0 => (Some(ResNet::new(vb, &ResNetConfig::canonical(1))?), None),
        level => (None, Some(FusedEncoder::new(vb, level >= 2)?)),
    };
    let images = Tensor::randn(0f32, 1.0, (batch, 1, 28, 28), &device)?;
    let mut best = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for _ in 0..reps + 1 {
        let cpu_start = cpu_seconds();
        let start = Instant::now();
        let features = match (&resnet, &fused_encoder) {
            (Some(net), _) => net.forward_t(&images, true)?,
            (_, Some(net)) => net.forward_t(&images, true)?,
            _ => unreachable!(),
        };
        let forward = start.elapsed().as_secs_f64();
        let start = Instant::now();
        features.sum_all()?.backward()?;
        let backward = start.elapsed().as_secs_f64();
        best = (best.0.min(forward), best.1.min(backward), best.2.min(cpu_seconds() - cpu_start));
    }
    Ok(best)
}

/// Seconds of the SimCLR step's phases (forward and loss, backward, optimizer update), each the
/// best of `reps` after a warm-up step; built as `contrastive::train::bench` builds its step.
fn step_phases(batch: usize, reps: usize) -> Result<[f64; 3]> {
    use contrastive::data::ImageShape;
    use contrastive::train::arch::methods::{self, MethodConfig};
    use contrastive::train::{config::TrainConfig, optim::Optimizer, trainer::Model};
    let device = Device::Cpu;
    let mut config = TrainConfig::for_method(MethodConfig::default_for("simclr")?, ImageShape::new(1, 28, 28));
    config.batch_size = batch;
    let mut model = Model::new(&config, &device)?;
    let mut optimizer = Optimizer::new(config.optimizer.clone(), methods::trainable_vars(&model.varmap));
    let views = [
        Tensor::rand(0f32, 1f32, (batch, 1, 28, 28), &device)?,
        Tensor::rand(0f32, 1f32, (batch, 1, 28, 28), &device)?,
    ];
    let labels = Tensor::zeros(batch, DType::U32, &device)?;
    let mut best = [f64::INFINITY; 3];
    for _ in 0..reps + 1 {
        let start = Instant::now();
        let loss = model.method.loss(&views, &labels, 1_000_000)?;
        let forward = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let grads = loss.backward()?;
        let backward = start.elapsed().as_secs_f64();
        let start = Instant::now();
        optimizer.step(&grads, 0.01)?;
        let update = start.elapsed().as_secs_f64();
        for (b, t) in best.iter_mut().zip([forward, backward, update]) {
            *b = b.min(t);
        }
    }
    Ok(best)
}

/// User + system CPU seconds of this process so far (Linux; 0 elsewhere). On a shared machine
/// the CPU time of a run varies less than its wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |v| v.parse().expect(name))
    };
    let (batch, reps) = (flag("--batch", 512), flag("--reps", 2));
    if args.iter().any(|a| a == "--step") {
        // The whole SimCLR step as `contrastive bench train` times it, without its slow baseline.
        let simclr = contrastive::train::arch::methods::MethodConfig::default_for("simclr")?;
        let seconds = contrastive::train::bench::step_seconds(&simclr, batch / 2, reps, &Device::Cpu)?;
        println!(
            "SimCLR step, batch {} (two views), im2col convs: {seconds:.3} s, {:.1} images/s",
            batch / 2,
            (batch / 2) as f64 / seconds
        );
        let [loss, backward, update] = step_phases(batch / 2, reps)?;
        println!(
            "  phases (best of {reps}): forward + loss {loss:.3} s, backward {backward:.3} s, optimizer {update:.3} s"
        );
        return Ok(());
    }
    if args.iter().any(|a| a == "--encoder") {
        for (fusion, name) in
            [(0, "resnet.rs ResNet"), (1, "replica, fused activations"), (2, "replica, fused conv+BN+act.")]
        {
            let (forward, backward, cpu) = time_encoder(fusion, batch, reps)?;
            println!("canonical encoder ({name}), {batch} images, training mode: forward {forward:.3} s, backward {backward:.3} s, total {:.3} s ({cpu:.2} CPU s)", forward + backward);
        }
        return Ok(());
    }
    println!(
        "conv layers of the canonical encoder, {batch} images 28x28, f32, best of {reps} (after a warm-up), {} threads",
        rayon::current_num_threads()
    );
    // `--im2col-only` skips the slow baseline (for profiling).
    let candle = match args.iter().any(|a| a == "--im2col-only") {
        true => vec![(f64::NAN, f64::NAN); LAYERS.len()],
        false => time_layers(ConvBackend::Candle, batch, reps)?,
    };
    let im2col = time_layers(ConvBackend::Im2col, batch, reps)?;
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "layer", "candle fwd", "candle bwd", "im2col fwd", "im2col bwd", "ratio"
    );
    let mut totals = [0.0; 4];
    for (((name, ..), c), m) in LAYERS.iter().zip(&candle).zip(&im2col) {
        println!(
            "{name:<36} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>6.1}x",
            c.0,
            c.1,
            m.0,
            m.1,
            (c.0 + c.1) / (m.0 + m.1)
        );
        for (total, t) in totals.iter_mut().zip([c.0, c.1, m.0, m.1]) {
            *total += t;
        }
    }
    let [cf, cb, mf, mb] = totals;
    println!("{:<36} {cf:>10.3} {cb:>10.3} {mf:>10.3} {mb:>10.3} {:>6.1}x", "total (s)", (cf + cb) / (mf + mb));
    println!(
        "im2col forward+backward: {:.3} s for {batch} images ({:.0} images/s); candle: {:.3} s",
        mf + mb,
        batch as f64 / (mf + mb),
        cf + cb
    );
    Ok(())
}
