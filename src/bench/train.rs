//! `contrastive bench train`: images per second of one training step of each method on the
//! canonical encoder, beside the PyTorch step of the same network, batch, views and thread count
//! (`bench/torch_step.py`) measured in the same run, so the ratio holds on whatever machine runs
//! it. `--encoder vit` times the same steps on the tiny ViT (no PyTorch column: the reference
//! script builds the ResNet). Also prints each step's FLOPs and the fraction of this machine's fp32 peak, measured in the
//! same run ([`super::cpu`]).
//!
//! Both sides are timed the same way: random images in [0, 1] (augmentation out on both sides),
//! the forward pass of every view, the loss, backward, the optimiser step and the method's
//! after-step work (momentum updates, queues, prototypes); one warm-up step, then the median of
//! `--steps` steps. Each method runs `--rounds` rounds of our step then the reference's, and
//! each side reports the median of its rounds: on a shared machine a whole run of either side
//! can be a fifth off, while steps within a run agree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use contrastive_kernels::Backend;

use super::cpu::{measure_fp32_peak, CpuInfo, ACCUMULATORS};
use crate::data::ImageShape;
use crate::train::arch::{EncoderConfig, MethodConfig, ResNetConfig, VitConfig};
use crate::train::config::TrainConfig;
use crate::train::Model;

/// Whether to run the PyTorch reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reference {
    /// When `python3 -c "import torch"` works.
    Auto,
    On,
    Off,
}

/// `contrastive bench train` options.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchOptions {
    /// Images per batch (each has two views)
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Timed steps per method (after one warm-up step); the median is reported
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Rounds per method, each timing our step then the reference's; each side reports the
    /// median of its rounds (a whole run of either side can be 20 % off on a shared machine)
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Methods to time [default: all]
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// The PyTorch step of the same network beside each method
    #[arg(long, value_enum, default_value_t = Reference::Auto)]
    pub reference: Reference,
    /// The Python interpreter that runs the reference
    #[arg(long, default_value = "python3")]
    pub python: PathBuf,
    /// The encoder: resnet (the canonical one) or vit (the tiny one), NAME[:KEY=VALUE...] as for
    /// `train --encoder`; the PyTorch reference is ResNet only
    #[arg(long, default_value = "resnet")]
    pub encoder: String,
    /// Also time a SimCLR step with candle's own conv2d, batch norm and ReLU (slow: ~20 s a step)
    #[arg(long)]
    pub candle_baseline: bool,
    /// Also time each step's parts (forward and loss, backward, update), each ended by a
    /// device synchronisation, on a line under each method
    #[arg(long)]
    pub phases: bool,
    /// Where the step runs: cpu, cuda or cuda:N (a build with `--features cuda`); the PyTorch
    /// reference runs on the same device
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The reference script, from the source tree or beside the working directory.
fn reference_script() -> Option<PathBuf> {
    let candidates =
        [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/torch_step.py"), PathBuf::from("bench/torch_step.py")];
    candidates.into_iter().find(|p| p.is_file())
}

/// Median seconds of a step, and with `phases` of its parts (each ended by a device
/// synchronisation, so they run a little slower than the whole step, whose kernels overlap the
/// host's work on a GPU).
#[derive(Debug, Clone, Copy)]
pub struct StepTimes {
    pub total: f64,
    /// Forward passes and the loss; the backward pass; the optimiser step and after-step work.
    pub phases: Option<[f64; 3]>,
}

/// A step of `method` on `encoder` (None: the method's default ResNet) at `batch_size` (two 28×28
/// grayscale views, and the method's optimiser for that encoder): the median of `steps` timed
/// steps after one warm-up step (three on a GPU), then with `phases` as many again timed in parts.
pub fn step_times(
    method: &MethodConfig,
    encoder: Option<&EncoderConfig>,
    batch_size: usize,
    steps: usize,
    device: &Device,
    backend: Backend,
    phases: bool,
) -> Result<StepTimes> {
    let shape = ImageShape::new(1, 28, 28);
    let mut config = TrainConfig::for_method(method.clone(), shape);
    if let Some(encoder) = encoder {
        config = config.with_encoder(encoder.clone());
    }
    config.batch_size = batch_size;
    let mut model = Model::with_backend(&config, device, backend)?;
    let mut optimizer = model.optimizer();
    let views: Vec<Tensor> = (0..2)
        .map(|_| Tensor::rand(0f32, 1f32, (batch_size, 1, 28, 28), device))
        .collect::<candle_core::Result<_>>()?;
    let labels = Tensor::from_vec((0..batch_size as u32).map(|i| i % 10).collect(), batch_size, device)?;
    let indices: Vec<usize> = (0..batch_size).collect();
    // The per-epoch work (DeepCluster's, PCL's and HCSC's k-means) runs once, untimed, on the
    // first view's images.
    let images = views[0].flatten_all()?.to_vec1::<f32>()?;
    let classes = (0..10).map(|c| c.to_string()).collect();
    let epoch_data = crate::data::Dataset::new(images, labels.to_vec1::<u32>()?, shape, classes)?;
    model.method.before_epoch(&epoch_data, 0)?;
    // One step; `after_part` is called after its forward and loss (0), backward (1) and update (2).
    let mut step = |after_part: &mut dyn FnMut(usize) -> Result<()>| -> Result<()> {
        let loss = model.method.loss(&views, &labels, &indices, 1_000_000)?;
        after_part(0)?;
        let grads = loss.backward()?;
        after_part(1)?;
        optimizer.step(&grads, 0.01)?;
        model.method.after_step(0.5)?;
        after_part(2)
    };
    // A GPU's first steps load kernels and pick cuDNN algorithms.
    let warmup = if device.is_cuda() { 3 } else { 1 };
    let mut times = Vec::new();
    for done in 0..steps + warmup {
        let started = Instant::now();
        step(&mut |_| Ok(()))?;
        device.synchronize()?;
        if done >= warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let total = median(times);
    if !phases {
        return Ok(StepTimes { total, phases: None });
    }
    let mut parts = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..steps {
        let mut mark = Instant::now();
        step(&mut |part| {
            device.synchronize()?;
            parts[part].push(mark.elapsed().as_secs_f64());
            mark = Instant::now();
            Ok(())
        })?;
    }
    let [forward, backward, update] = parts.map(median);
    Ok(StepTimes { total, phases: Some([forward, backward, update]) })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The PyTorch step's seconds, from `bench/torch_step.py`.
fn reference_seconds(
    python: &Path,
    script: &Path,
    method: &str,
    batch: usize,
    steps: usize,
    threads: usize,
    device: &str,
) -> Result<f64> {
    let output = Command::new(python)
        .arg(script)
        .args(["--method", method, "--batch", &batch.to_string(), "--steps", &steps.to_string()])
        .args(["--threads", &threads.to_string(), "--device", device])
        .output()
        .with_context(|| format!("cannot run {} {}", python.display(), script.display()))?;
    if !output.status.success() {
        bail!("the PyTorch reference failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let value: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("the PyTorch reference printed {:?}, not one JSON line", line.trim()))?;
    value["median_seconds"].as_f64().context("the PyTorch reference's line has no median_seconds")
}

fn torch_available(python: &Path) -> bool {
    Command::new(python).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success())
}

/// FLOPs (2 per multiply-add) of the matrix products of one `height × width` image through the
/// encoder's forward pass: `(first layer, rest)` (the first layer needs no input gradient).
fn encoder_forward_flops(encoder: &EncoderConfig, height: usize, width: usize) -> (f64, f64) {
    match encoder {
        EncoderConfig::ResNet(resnet) => resnet_forward_flops(resnet, height, width),
        EncoderConfig::Vit(vit) => vit_forward_flops(vit, height, width),
    }
}

/// A ViT's products: the patch embedding, then per block the qkv, attention (QKᵀ and the
/// weighted sum of V), output projection and MLP products over T = 1 + patches tokens.
fn vit_forward_flops(vit: &VitConfig, height: usize, width: usize) -> (f64, f64) {
    let patches = (height / vit.patch) * (width / vit.patch);
    let (tokens, dim) = ((1 + patches) as f64, vit.dim as f64);
    let embed = 2.0 * patches as f64 * (vit.in_channels * vit.patch * vit.patch) as f64 * dim;
    let hidden = (vit.dim * vit.mlp_ratio) as f64;
    let block = 2.0 * tokens * dim * 3.0 * dim // qkv
        + 2.0 * 2.0 * tokens * tokens * dim // QKᵀ and weights · V, all heads
        + 2.0 * tokens * dim * dim // output projection
        + 2.0 * 2.0 * tokens * dim * hidden; // MLP
    (embed, vit.depth as f64 * block)
}

/// The ResNet's convolutions.
fn resnet_forward_flops(encoder: &ResNetConfig, height: usize, width: usize) -> (f64, f64) {
    let conv = |c_in: usize, c_out: usize, kernel: usize, h: usize, w: usize| {
        (2 * c_in * c_out * kernel * kernel * h * w) as f64
    };
    let stem = conv(encoder.in_channels, encoder.widths[0], 3, height, width);
    let (mut rest, mut c, mut h, mut w) = (0.0, encoder.widths[0], height, width);
    for ((&width_out, &depth), &stride) in encoder.widths.iter().zip(&encoder.blocks).zip(&encoder.strides) {
        for block in 0..depth {
            let s = if block == 0 { stride } else { 1 };
            let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
            rest += conv(c, width_out, 3, ho, wo) + conv(width_out, width_out, 3, ho, wo);
            if s != 1 || c != width_out {
                rest += conv(c, width_out, 1, ho, wo);
            }
            (c, h, w) = (width_out, ho, wo);
        }
    }
    (stem, rest)
}

/// FLOPs of one training step of `method` on `2 × batch` views: the online encoder forward and
/// backward (the backward computes input and weight gradients: twice the forward, but the stem
/// needs no input gradient), plus a forward of the momentum encoder where the method has one.
/// Heads and losses are under 1 % and left out.
pub fn step_flops(method: &MethodConfig, encoder: &EncoderConfig, batch: usize) -> f64 {
    let (stem, rest) = encoder_forward_flops(encoder, 28, 28);
    let online = 2.0 * stem + 3.0 * rest;
    let target = match method {
        MethodConfig::MocoV2 { .. }
        | MethodConfig::MocoV3 { .. }
        | MethodConfig::Dino { .. }
        | MethodConfig::Pcl { .. }
        | MethodConfig::Hcsc { .. }
        | MethodConfig::Byol { .. } => stem + rest,
        _ => 0.0,
    };
    (2 * batch) as f64 * (online + target)
}

/// The methods `bench/torch_step.py` implements; the others have no PyTorch column.
pub const REFERENCE_METHODS: [&str; 6] = ["simclr", "moco-v2", "byol", "simsiam", "swav", "supcon"];

/// Runs the benchmark and prints its table.
pub fn run(options: &TrainBenchOptions, device: &Device) -> Result<()> {
    anyhow::ensure!(options.batch_size >= 2, "--batch-size must be at least 2");
    let (steps, rounds) = (options.steps.max(1), options.rounds.max(1));
    let methods: Vec<String> = if options.methods.is_empty() {
        MethodConfig::NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        options.methods.clone()
    };
    let configs: Vec<MethodConfig> = methods.iter().map(|m| MethodConfig::default_for(m)).collect::<Result<_>>()?;
    let shape = ImageShape::new(1, 28, 28);
    let encoder = crate::train::config::parse_choice(
        &options.encoder,
        |name| EncoderConfig::default_for(name, shape),
        "encoder",
    )?;
    let is_canonical = encoder == EncoderConfig::from(ResNetConfig::canonical(1));
    let script = reference_script().filter(|_| is_canonical);
    let reference = match options.reference {
        Reference::Off => None,
        Reference::On => Some(script.clone().context(
            "the PyTorch reference (bench/torch_step.py) runs the canonical ResNet, and must be in the source tree or \
             the working folder",
        )?),
        Reference::Auto => script.filter(|_| torch_available(&options.python)),
    };

    let cpu = CpuInfo::detect();
    // The torch device spelling of ours; on a GPU the CPU's peak says nothing about the step.
    let torch_device = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".to_string(),
    };
    let peak = if device.is_cpu() {
        let peak = measure_fp32_peak(cpu.threads, Duration::from_millis(500));
        println!(
            "CPU: {} · {} threads used of {} logical CPUs · {} ({} f32 lanes)",
            cpu.model, cpu.threads, cpu.logical_cpus, cpu.vector_unit, cpu.f32_lanes
        );
        println!(
            "fp32 peak, measured now: {peak:.0} GFLOP/s ({} threads at once, each a loop of fused multiply-adds on {ACCUMULATORS} independent {}-lane registers)",
            cpu.threads, cpu.f32_lanes
        );
        Some(peak)
    } else {
        println!("device: {torch_device} (CPU: {}); % peak is left out on a GPU", cpu.model);
        None
    };
    println!(
        "step: batch {}, two 28×28 views, encoder {}; forward, loss, backward, optimiser and after-step work; random images (no augmentation on either side); median of {steps} steps after {}, median of {rounds} round{} (ours, then the reference's)",
        options.batch_size,
        if is_canonical { "the canonical ResNet".to_string() } else { serde_json::to_string(&encoder)? },
        if device.is_cpu() { "one warm-up" } else { "three warm-ups" },
        if rounds == 1 { "" } else { "s" }
    );
    match (&reference, options.reference) {
        (Some(_), _) => {
            if device.is_cpu() {
                println!(
                    "reference: PyTorch, bench/torch_step.py, same network, batch, views and {} threads",
                    cpu.threads
                )
            } else {
                println!(
                    "reference: PyTorch eager on {torch_device}, bench/torch_step.py, same network, batch and views"
                )
            }
        }
        (None, Reference::Off) => println!("reference: off"),
        (None, _) if !is_canonical => println!("reference: none (bench/torch_step.py runs the canonical ResNet)"),
        (None, _) => println!(
            "reference: PyTorch is not installed for {} (pip install torch); its columns are empty",
            options.python.display()
        ),
    }
    println!();
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10}",
        "method", "images/s", "PyTorch", "ratio", "GFLOP", "% peak", "PyTorch %"
    );
    let mut failed = Vec::new();
    for (name, method) in methods.iter().zip(&configs) {
        // The canonical ResNet stays the method's own (CPC's carries its patch grid).
        let chosen = (!is_canonical).then_some(&encoder);
        // A method that cannot run (on this encoder or device) gets its error as its row; the
        // others still run, and the command fails at the end unless the encoder explains it.
        let script = reference.as_ref().filter(|_| REFERENCE_METHODS.contains(&name.as_str()));
        let (mut ours, mut theirs, mut phases) = (Vec::new(), Vec::new(), None);
        let mut error = None;
        for round in 0..rounds {
            // Phases once: they cost extra steps.
            let times = step_times(
                method,
                chosen,
                options.batch_size,
                steps,
                device,
                Backend::Fused,
                options.phases && round == 0,
            );
            match times {
                Ok(StepTimes { total, phases: parts }) => {
                    ours.push(total);
                    phases = phases.or(parts);
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            let Some(script) = script else { continue };
            match reference_seconds(
                &options.python,
                script,
                name,
                options.batch_size,
                steps,
                cpu.threads,
                &torch_device,
            ) {
                Ok(seconds) => theirs.push(seconds),
                Err(e) => eprintln!("{name}: {e:#}"),
            }
        }
        if let Some(error) = error {
            println!("{name:<10} {:>10}   ({error})", "-");
            if chosen.is_none() {
                failed.push(name.as_str());
            }
            continue;
        }
        let seconds = median(ours);
        let theirs = (!theirs.is_empty()).then(|| median(theirs));
        let flops = step_flops(method, &encoder, options.batch_size);
        let percent = |s: f64| peak.map(|peak| 100.0 * flops / s / 1e9 / peak);
        let blank = || "-".to_string();
        println!(
            "{:<10} {:>10.1} {:>10} {:>10} {:>9.1} {:>10} {:>10}",
            name,
            options.batch_size as f64 / seconds,
            theirs.map_or_else(blank, |t| format!("{:.1}", options.batch_size as f64 / t)),
            theirs.map_or_else(blank, |t| format!("{:.2}", t / seconds)),
            flops / 1e9,
            percent(seconds).map_or_else(blank, |p| format!("{p:.1}%")),
            theirs.and_then(percent).map_or_else(blank, |p| format!("{p:.1}%")),
        );
        if let Some([forward, backward, update]) = phases {
            let ms = |s: f64| 1e3 * s;
            println!(
                "{:<10} {:>10}   forward + loss {:.1} ms, backward {:.1} ms, update {:.1} ms",
                "",
                "",
                ms(forward),
                ms(backward),
                ms(update)
            );
        }
    }
    if options.candle_baseline {
        let simclr = MethodConfig::default_for("simclr")?;
        let seconds =
            step_times(&simclr, None, options.batch_size, steps.min(2), device, Backend::Candle, false)?.total;
        println!(
            "{:<10} {:>10.1}   (SimCLR with candle's own conv2d, batch norm and ReLU; conv2d's input gradient by conv_transpose2d)",
            "candle",
            options.batch_size as f64 / seconds
        );
    }
    println!();
    println!("ratio: PyTorch's step time over ours (above 1: ours is faster); GFLOP: the encoder's convolutions or matrix products in the step (2 per multiply-add; backward = 2 × forward; momentum encoders forward only)");
    anyhow::ensure!(failed.is_empty(), "{} could not run a step (their errors are in the table)", failed.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_step_flops_by_hand() {
        // Per 28×28 image, multiply-adds: stem 1·32·9·784 = 225,792; stage 1: 2 × 32·32·9·784 =
        // 14,450,688; stage 2: 32·64·9·196 + 64·64·9·196 + 32·64·196 = 11,239,424; stage 3:
        // 64·128·9·49 + 128·128·9·49 + 64·128·49 = 11,239,424.
        let (stem, rest) = encoder_forward_flops(&ResNetConfig::canonical(1).into(), 28, 28);
        assert_eq!(stem, 2.0 * 225_792.0);
        assert_eq!(rest, 2.0 * (14_450_688.0 + 11_239_424.0 + 11_239_424.0));
        let simclr = step_flops(&MethodConfig::default_for("simclr").unwrap(), &ResNetConfig::canonical(1).into(), 256);
        assert!((simclr / 1e9 - 113.9).abs() < 0.1, "{simclr}");
    }

    #[test]
    fn tiny_vit_flops_by_hand() {
        // 49 patches of 16 pixels to 128: 100,352 multiply-adds. Per block over 50 tokens:
        // qkv 50·128·384 = 2,457,600; QKᵀ and AV 2·50·50·128 = 640,000; projection 819,200;
        // MLP 2·50·128·512 = 6,553,600; 10,470,400 in all, 4 blocks.
        let (embed, rest) = encoder_forward_flops(&VitConfig::tiny(1, 28, 28).into(), 28, 28);
        assert_eq!(embed, 2.0 * 100_352.0);
        assert_eq!(rest, 2.0 * 4.0 * 10_470_400.0);
    }
}
