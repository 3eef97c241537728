//! `contrastive`: train contrastive image encoders, evaluate them, benchmark the trainer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};

use contrastive::bench;
use contrastive::data::ImageShape;
use contrastive::export::ExportOptions;
use contrastive::registry::ModelRepository;
use contrastive::server::config::{ServeArgs, ServeSettings};
use contrastive::train::arch::{EncoderConfig, MethodConfig, SupervisedLoss};
use contrastive::train::checkpoint;
use contrastive::train::config::{parse_choice, with_settings, DataSource, TrainConfig};
use contrastive::train::loss::ContrastLoss;
use contrastive::train::optim::OptimizerConfig;
use contrastive::train::pairs::PairStrategy;
use contrastive::train::run::TrainOptions;
use contrastive::train::{EvalScope, Model};

#[derive(Parser)]
#[command(
    name = "contrastive",
    version,
    about = "Train contrastive image encoders, export them to ONNX and serve their embeddings"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an encoder with a contrastive method (or resume a run).
    Train(Box<TrainArgs>),
    /// Evaluate a run's encoder: k-NN, linear probe, alignment, uniformity, retrieval, clustering; and raw pixels' k-NN, retrieval and clustering.
    Eval(EvalArgs),
    /// Export a run's encoder to ONNX, check parity against ONNX Runtime, publish it as a model version.
    Export(ExportArgs),
    /// Serve embeddings (and fine-tune jobs) over gRPC from the model repository.
    Serve(Box<ServeArgs>),
    /// Embed image files with a running server; prints JSON.
    Embed(EmbedArgs),
    /// Ask a running server's grpc.health.v1 whether it is SERVING (exit 0) or not (exit 1).
    Health(HealthArgs),
    /// Supervised-contrastive fine-tune jobs on a running server.
    Finetune(contrastive::finetune::client::FinetuneArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct EmbedArgs {
    /// Server address; with several (repeated or comma-separated), or a name that resolves to
    /// several servers (a headless Kubernetes Service), the requests go to them in turn
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "CONTRASTIVE_SERVER", value_delimiter = ',')]
    addr: Vec<String>,
    /// Files per request: the files go in requests of this many, sent at once [default: all in one]
    #[arg(long)]
    batch_size: Option<usize>,
    /// Model name [default: the server's default model]
    #[arg(long, default_value = "")]
    model: String,
    /// Model version [default: the latest ready]
    #[arg(long, default_value_t = 0)]
    version: u64,
    /// Keep the first N dimensions (then normalise)
    #[arg(long, default_value_t = 0)]
    dimensions: u32,
    /// Return the raw embedding, not L2-normalised
    #[arg(long)]
    no_normalize: bool,
    /// API key, sent as `authorization: Bearer <key>`
    #[arg(long, env = "CONTRASTIVE_API_KEY")]
    api_key: Option<String>,
    /// PNG or JPEG files
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct HealthArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "CONTRASTIVE_SERVER")]
    addr: String,
    /// Service to ask about [default: the whole server]
    #[arg(long, default_value = "")]
    service: String,
}

#[derive(Args)]
struct ExportArgs {
    /// The run folder whose latest checkpoint is exported
    #[arg(long)]
    checkpoint: PathBuf,
    /// Model name in the repository (lowercase letters, digits, '-', '_', '.')
    #[arg(long)]
    name: String,
    /// The model repository
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Version to publish [default: the latest + 1]
    #[arg(long)]
    version: Option<u64>,
    /// L2-normalise the embedding inside the ONNX graph
    #[arg(long)]
    l2_normalize: bool,
    /// Largest |candle − ONNX Runtime| difference allowed
    #[arg(long, default_value_t = contrastive::export::PARITY_TOLERANCE)]
    tolerance: f32,
}

#[derive(Args)]
struct DataArgs {
    /// Folder of MNIST-format IDX files [default: the Debian package's Fashion-MNIST]
    #[arg(long, conflicts_with = "image_folder")]
    data: Option<PathBuf>,
    /// Image-folder dataset: ROOT/<class>/*.png|jpg, or ROOT/train/... and ROOT/test/...
    #[arg(long)]
    image_folder: Option<PathBuf>,
    /// Side of the square images an image folder is resized to
    #[arg(long, default_value_t = 28, requires = "image_folder")]
    image_size: usize,
    /// Channels an image folder is converted to (1: grayscale, 3: RGB)
    #[arg(long, default_value_t = 1, requires = "image_folder")]
    channels: usize,
}

impl DataArgs {
    fn source(&self) -> Result<Option<DataSource>> {
        if let Some(root) = &self.image_folder {
            if !matches!(self.channels, 1 | 3) {
                bail!("--channels must be 1 or 3, got {}", self.channels);
            }
            let shape = ImageShape::new(self.channels, self.image_size, self.image_size);
            return Ok(Some(DataSource::ImageFolder { root: root.clone(), shape }));
        }
        Ok(self.data.clone().map(|dir| DataSource::MnistIdx { dir }))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerName {
    Sgd,
    Lars,
    Adamw,
}

#[derive(Args)]
struct TrainArgs {
    /// The method, NAME[:KEY=VALUE...] with any of its parameters (as in the run's config.json):
    /// simclr, moco-v2, moco-v3 (:frozen_patch_embedding=true, for a ViT), byol, dino
    /// (:out_dim=1024:local_crops=0:local_size=12:teacher_temperature=0.04:teacher_warmup=0.3),
    /// simsiam, swav (:prototypes=100:local_crops=0:local_size=12), deepcluster, pcl, hcsc, cc
    /// (contrastive clustering),
    /// selfcon (:exit_stage=2:single_view=false:labels=false), cmc (:two_crops=true), pirl
    /// (:negatives=4096:bank_momentum=0.5:jigsaw_weight=0.5:grid=3), cpc
    /// (:patch=14:stride=7:prediction_steps=1:context_layers=2), supcon or paco
    #[arg(long, default_value = "simclr")]
    method: String,
    /// The loss, NAME[:KEY=VALUE...]. For simclr, moco-v2, pcl, selfcon, cmc, pirl and cpc: info-nce,
    /// dcl, dclw (:sigma=0.5), hinge (:margin=0.5) or directclr (:dims=32, simclr only). For
    /// supcon: supcon,
    /// or a long-tail variant: kcl (k positives per anchor), tsc (class targets spread on the
    /// sphere), bcl (class-averaged, with class centres) or hybrid (SupCon moving to a
    /// classifier's cross-entropy)
    #[arg(long, value_name = "NAME")]
    loss: Option<String>,
    /// Pair strategies for simclr, moco-v2 and pcl, applied in order, NAME[:KEY=VALUE...][,...]:
    /// debiased (:class_prior=0.1), mochi (:hardest=256:mixes=256:query_mixes=64, moco-v2 only),
    /// hard-pairs (:positive_alpha=2:negative_alpha=1.6), fnc
    /// (:support_views=2:false_negatives=5:attract=false), nnclr (:support_size=4096), mixco
    /// (:alpha=1), mixup (:alpha=1:hardest=64)
    #[arg(long, value_name = "LIST")]
    pairs: Option<String>,
    /// The encoder, NAME[:KEY=VALUE...]: resnet (:widths=[32,64,128]:blocks=[1,1,1]:strides=[1,2,2])
    /// or vit (:patch=4:dim=128:depth=4:heads=4:mlp_ratio=4; trained with AdamW unless --optimizer
    /// says otherwise)
    #[arg(long, default_value = "resnet")]
    encoder: String,
    /// Run folder for the config, checkpoints, metrics.jsonl and curves.png [default: runs/METHOD,
    /// with -LOSS, -PAIRS and -ENCODER appended when given]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Peak learning rate [default: the method's]
    #[arg(long)]
    lr: Option<f64>,
    /// [default: the method's: LARS for BYOL, MoCo v3 and DINO, SGD with momentum 0.9 for the
    /// others; AdamW for a ViT]
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerName>,
    /// [default: the method's with its optimiser, else 1.5e-6 for LARS and 5e-4 for SGD and AdamW]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Weight decay at the end of training, reached from --weight-decay by a half cosine (DINO's
    /// ViT recipe: 0.04 → 0.4) [default: constant]
    #[arg(long)]
    weight_decay_end: Option<f64>,
    /// Epochs over which the learning rate rises linearly from 0 (fractions allowed)
    /// [default: a tenth of --epochs for dino on a vit, 0 otherwise]
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// Scale each parameter's gradient down to this L2 norm where it is longer (0: off)
    /// [default: 3.0 for dino on a vit, off otherwise]
    #[arg(long, value_name = "NORM")]
    clip_grad: Option<f64>,
    /// Softmax temperature of the method's loss, where it has one (cc: the instance-level one;
    /// dino: the student's)
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on the first N images only
    #[arg(long)]
    train_limit: Option<usize>,
    /// Change the augmentation of every view but multi-crop's local crops (which take the
    /// method's local_scale), KEY=VALUE[:KEY=VALUE...] with the fields of the run's config.json,
    /// e.g. crop_scale=[0.4,1]:blur_p=0.5 (crop_scale, crop_ratio, flip_p, jitter_p, brightness,
    /// contrast, saturation, hue, grayscale_p, blur_p, blur_sigma, solarize_p)
    #[arg(long, value_name = "SETTINGS")]
    augment: Option<String>,
    /// Crop each view around the object the encoder finds, centres away from its middle
    /// (ContrastiveCrop; boxes refreshed every epoch after the first)
    #[arg(long)]
    contrastive_crop: bool,
    /// Paste each view's foreground onto another training image with probability P first
    /// (image synthesis; the foreground is the pixels above 0.1)
    #[arg(long, value_name = "P")]
    image_synthesis: Option<f32>,
    /// Train on a long-tailed split: class c keeps n_max * RATIO^(-c/(C-1)) images (e.g. 100)
    #[arg(long, value_name = "RATIO")]
    long_tail: Option<f64>,
    /// Start from the weights of a run folder, a model version's folder or a weights file of
    /// the same method and encoder (e.g. train a published model longer), with a fresh
    /// optimiser and schedule
    #[arg(long, value_name = "PATH", conflicts_with = "resume")]
    init_from: Option<PathBuf>,
    /// Evaluate k-NN every N epochs (0: only at the end)
    #[arg(long, default_value_t = 1)]
    knn_every: usize,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Skip the linear probe and alignment/uniformity at the end
    #[arg(long)]
    no_final_eval: bool,
    #[arg(long)]
    no_progress: bool,
    /// Stop with a checkpoint after this many steps in total (continue later with --resume)
    #[arg(long)]
    stop_at_step: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    /// Run folder written by `contrastive train`
    #[arg(long)]
    checkpoint: PathBuf,
    /// Evaluate on other data than the run's
    #[command(flatten)]
    data: DataArgs,
    /// k-NN only (no linear probe, alignment, uniformity, retrieval, clustering, raw-pixel reference)
    #[arg(long)]
    knn_only: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Images/s of one training step of each method beside PyTorch's, with FLOPs and % of peak.
    Train(Box<contrastive::bench::train::TrainBenchOptions>),
    /// Embedding throughput and latency of the gRPC server vs. in-process ONNX Runtime.
    Serve(Box<contrastive::bench::serve::ServeBenchOptions>),
    /// The server under a long mixed load with fine-tunes: RSS and p99 latency every interval.
    Soak(Box<contrastive::bench::soak::SoakOptions>),
    /// Fine-tune jobs on confusable classes: k-NN of never-uploaded images before and after, over several draws.
    Finetune(Box<contrastive::bench::finetune::FinetuneBenchOptions>),
}

// glibc's allocator returns each large freed tensor to the kernel and page-faults it back in on
// the next step; mimalloc keeps the memory, which measurably speeds up training.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the same index in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the allocator for the rest of the process. By default mimalloc (3, the
/// bundled one) hands memory that stays free for a second back to the kernel, and a training
/// step frees and reallocates its large tensors every step: those came back as fresh pages that
/// the kernel zeroes. `bench train` on two AMD EPYC cores, old and new build alternated: idle,
/// MoCo v2 148 → 166-175 images/s (SimCLR and the ViT within noise); beside a training run,
/// where steps are slower and more memory sits free past the delay (a third of a ViT step was
/// page zeroing in `perf`), SimCLR 101-111 → 128-133, MoCo v2 56-62 → 83-86, the ViT 27-33 →
/// 37-39. Training commands only: the server keeps the default, so that its memory shrinks
/// again after a fine-tune job.
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option; mimalloc reads it at each purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda_device(ordinal),
            _ => bail!("unknown device '{spec}': expected cpu, cuda or cuda:N"),
        },
    }
}

fn cuda_device(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        bail!("this build has no CUDA support: rebuild with `cargo build --release --features cuda`");
    }
    Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let command = Cli::parse().command;
    if matches!(command, Command::Train(_) | Command::Eval(_) | Command::Bench(BenchCommand::Train(_))) {
        keep_freed_memory();
    }
    match command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Export(args) => export(args),
        Command::Serve(args) => serve(*args),
        Command::Embed(args) => async_runtime()?.block_on(embed(args)),
        Command::Health(args) => async_runtime()?.block_on(health(args)),
        Command::Finetune(args) => async_runtime()?.block_on(contrastive::finetune::client::run(args)),
        Command::Bench(BenchCommand::Train(options)) => bench::train::run(&options, &parse_device(&options.device)?),
        Command::Bench(BenchCommand::Serve(options)) => bench::serve::run(&options),
        Command::Bench(BenchCommand::Soak(options)) => bench::soak::run(&options),
        Command::Bench(BenchCommand::Finetune(options)) => bench::finetune::run(&options),
    }
}

fn train(args: Box<TrainArgs>) -> Result<()> {
    let device = parse_device(&args.device)?;
    let mut default_dir = method_name(&args.method).to_string();
    for choice in [&args.loss, &args.pairs].into_iter().flatten() {
        let names: Vec<&str> = choice.split(',').map(|c| c.split(':').next().unwrap_or_default().trim()).collect();
        default_dir = format!("{default_dir}-{}", names.join("+"));
    }
    let encoder = method_name(&args.encoder);
    if encoder != "resnet" {
        default_dir = format!("{default_dir}-{encoder}");
    }
    let run_dir = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(default_dir));
    let config =
        if args.resume { TrainConfig::load(&run_dir.join(checkpoint::CONFIG_FILE))? } else { build_config(&args)? };
    let stop = Arc::new(AtomicBool::new(false));
    let handler_stop = stop.clone();
    ctrlc::set_handler(move || {
        if handler_stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130); // a second Ctrl-C stops at once
        }
        eprintln!("\nstopping after this step; a checkpoint will be saved (Ctrl-C again to quit now)");
    })?;
    let options = TrainOptions {
        run_dir: run_dir.clone(),
        device,
        resume: args.resume,
        stop: stop.clone(),
        progress_bar: !args.no_progress,
        final_eval: !args.no_final_eval,
        stop_at_step: args.stop_at_step,
    };
    let state = contrastive::train::run::train(&config, &options)?;
    if !state.finished {
        eprintln!(
            "stopped after {} steps; resume with: contrastive train --out {} --resume",
            state.progress.step,
            run_dir.display()
        );
        std::process::exit(if stop.load(Ordering::SeqCst) { 130 } else { 0 });
    }
    let summary = serde_json::json!({
        "run": run_dir,
        "method": config.method.name(),
        "epochs": state.progress.epoch,
        "train_seconds": state.progress.train_seconds,
        "knn_history": state.knn_history,
        "final_eval": state.final_eval,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn async_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn serve(args: ServeArgs) -> Result<()> {
    let settings = ServeSettings::resolve(&args)?;
    async_runtime()?.block_on(contrastive::server::run(settings, |listening| {
        // One machine-readable line, so scripts and tests learn the ports when they were 0.
        let mut line = serde_json::json!({ "listening": listening.grpc.to_string() });
        if let Some(http) = listening.http {
            line["http"] = http.to_string().into();
        }
        println!("{line}");
    }))
}

async fn embed(args: EmbedArgs) -> Result<()> {
    use contrastive::proto::v1::{input::Data, EmbedRequest, Input};
    let mut inputs = Vec::new();
    for file in &args.files {
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        inputs.push(Input { data: Some(Data::Image(bytes)) });
    }
    let batch_size = match args.batch_size {
        Some(0) => bail!("--batch-size must be at least 1"),
        Some(n) => n,
        None => inputs.len(),
    };
    let clients = contrastive::client::embedding_clients(&args.addr, args.api_key.as_deref()).await?;
    // Every request at once, to the servers in turn; one a server cannot take (UNAVAILABLE: it
    // stopped) goes to the next.
    let requests = inputs.chunks(batch_size).enumerate().map(|(i, chunk)| {
        let request = EmbedRequest {
            model: args.model.clone(),
            version: args.version,
            inputs: chunk.to_vec(),
            normalize: Some(!args.no_normalize),
            dimensions: args.dimensions,
        };
        let clients = &clients;
        async move {
            let mut attempt = 0;
            loop {
                let (_, client) = &clients[(i + attempt) % clients.len()];
                match client.clone().embed(request.clone()).await {
                    Ok(response) => return Ok(response.into_inner()),
                    Err(status) if status.code() == tonic::Code::Unavailable && attempt + 1 < clients.len() => {
                        attempt += 1
                    }
                    Err(status) => return Err(status),
                }
            }
        }
    });
    let responses = futures_util::future::try_join_all(requests).await.map_err(contrastive::client::status_error)?;
    let first = responses.first().context("no files to embed")?;
    if let Some(other) = responses.iter().find(|r| (&r.model, r.version) != (&first.model, first.version)) {
        bail!(
            "the servers answered with {} version {} and {} version {}: a new version was being rolled out; run again",
            first.model,
            first.version,
            other.model,
            other.version
        );
    }
    let embeddings: Vec<_> = args
        .files
        .iter()
        .zip(responses.iter().flat_map(|r| &r.embeddings))
        .map(|(file, e)| serde_json::json!({ "file": file, "embedding": e.values }))
        .collect();
    // The slowest request's timing: what the whole call waited for.
    let timing =
        responses.iter().filter_map(|r| r.timing).max_by(|a, b| a.total_ms.total_cmp(&b.total_ms)).unwrap_or_default();
    let out = serde_json::json!({
        "model": first.model,
        "version": first.version,
        "embeddings": embeddings,
        "requests": responses.len(),
        "timing_ms": { "queue": timing.queue_ms, "inference": timing.inference_ms, "total": timing.total_ms },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn health(args: HealthArgs) -> Result<()> {
    let status = contrastive::client::health(&args.addr, &args.service).await?;
    println!("{status}");
    if status != "SERVING" {
        std::process::exit(1);
    }
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let repo = ModelRepository::new(&args.models);
    let options = ExportOptions {
        name: args.name,
        version: args.version,
        l2_normalize: args.l2_normalize,
        tolerance: args.tolerance,
    };
    let manifest = contrastive::export::export_checkpoint(&args.checkpoint, &repo, &options)?;
    let summary = serde_json::json!({
        "model": manifest.name,
        "version": manifest.version,
        "path": repo.version_dir(&manifest.name, manifest.version),
        "embedding_dimensions": manifest.output.dimensions,
        "parity_max_abs_diff": manifest.parity.max_abs_diff,
        "evaluation": manifest.evaluation,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// The method's name in a `--method NAME[:KEY=VALUE...]` value.
fn method_name(spec: &str) -> &str {
    spec.split(':').next().unwrap_or_default().trim()
}

fn build_config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut method = parse_choice(&args.method, MethodConfig::default_for, "method")?;
    let name = method.name();
    if let Some(t) = args.temperature {
        match &mut method {
            MethodConfig::Simclr { temperature, .. }
            | MethodConfig::MocoV2 { temperature, .. }
            | MethodConfig::Pcl { temperature, .. }
            | MethodConfig::Hcsc { temperature, .. }
            | MethodConfig::Swav { temperature, .. }
            | MethodConfig::Supcon { temperature, .. }
            | MethodConfig::Paco { temperature, .. }
            | MethodConfig::Selfcon { temperature, .. }
            | MethodConfig::Cmc { temperature, .. }
            | MethodConfig::Pirl { temperature, .. }
            | MethodConfig::Cpc { temperature, .. }
            | MethodConfig::MocoV3 { temperature, .. }
            | MethodConfig::Dino { student_temperature: temperature, .. }
            | MethodConfig::Cc { instance_temperature: temperature, .. } => *temperature = t,
            _ => bail!("--temperature does not apply to {name}"),
        }
    }
    if let Some(spec) = &args.loss {
        match &mut method {
            MethodConfig::Supcon { loss, .. } => *loss = parse_choice(spec, SupervisedLoss::default_for, "loss")?,
            other => match other.instance_loss_mut() {
                Some(loss) => *loss = parse_choice(spec, ContrastLoss::default_for, "loss")?,
                None => bail!(
                    "--loss applies to --method simclr, moco-v2, pcl, selfcon, cmc, pirl, cpc and supcon, not to {name}"
                ),
            },
        }
    }
    if let Some(list) = &args.pairs {
        match &mut method {
            MethodConfig::Simclr { pairs, .. }
            | MethodConfig::MocoV2 { pairs, .. }
            | MethodConfig::Pcl { pairs, .. } => {
                *pairs = list
                    .split(',')
                    .map(|spec| parse_choice(spec.trim(), PairStrategy::default_for, "pair strategy"))
                    .collect::<Result<_>>()?
            }
            _ => bail!("--pairs applies to --method simclr, moco-v2 and pcl, not to {name}"),
        }
    }
    let data = args.data.source()?.unwrap_or_else(DataSource::fashion_mnist);
    let input = match &data {
        DataSource::ImageFolder { shape, .. } => *shape,
        DataSource::MnistIdx { .. } => ImageShape::new(1, 28, 28),
    };
    let mut config = TrainConfig::for_method(method, input);
    // The method's default encoder keeps what the method set in it (CPC's patch grid).
    let current = config.encoder.clone();
    let encoder = parse_choice(
        &args.encoder,
        |name| if name == current.name() { Ok(current.clone()) } else { EncoderConfig::default_for(name, input) },
        "encoder",
    )?;
    if encoder != current {
        config = config.with_encoder(encoder);
    }
    if let EncoderConfig::Vit(vit) = &mut config.encoder {
        // Position embeddings are learned for the training images' patch grid.
        let patch = vit.patch.max(1);
        vit.position_grid = [input.height / patch, input.width / patch];
    }
    config.data = data;
    config.epochs = args.epochs;
    config.batch_size = args.batch_size;
    if let Some(name) = args.optimizer {
        let optimizer = match name {
            OptimizerName::Sgd => OptimizerConfig::sgd(0.9, 5e-4),
            OptimizerName::Lars => OptimizerConfig::lars(1.5e-6),
            OptimizerName::Adamw => OptimizerConfig::adamw(5e-4),
        };
        // Another optimiser than the method's needs its own learning-rate scale.
        if std::mem::discriminant(&optimizer) != std::mem::discriminant(&config.optimizer) {
            config.learning_rate = optimizer.default_learning_rate();
            config.optimizer = optimizer;
        }
    }
    if let Some(weight_decay) = args.weight_decay {
        config.optimizer.set_weight_decay(weight_decay);
    }
    config.weight_decay_end = args.weight_decay_end;
    if let Some(lr) = args.lr {
        config.learning_rate = lr;
    }
    config.warmup_epochs = args
        .warmup_epochs
        .unwrap_or_else(|| TrainConfig::default_warmup_epochs(&config.method, &config.encoder, config.epochs));
    if let Some(max_norm) = args.clip_grad {
        anyhow::ensure!(max_norm >= 0.0 && max_norm.is_finite(), "--clip-grad is a norm >= 0 (0: off), got {max_norm}");
        config.gradient_clip = (max_norm > 0.0).then_some(max_norm);
    }
    config.seed = args.seed;
    config.train_limit = args.train_limit;
    config.long_tail = args.long_tail;
    config.init_from = args.init_from.clone();
    if let Some(p) = args.image_synthesis {
        anyhow::ensure!((0.0..=1.0).contains(&p), "--image-synthesis is a probability in [0, 1], got {p}");
    }
    for view in &mut config.augment {
        if let (Some(settings), None) = (&args.augment, view.output_size) {
            *view = with_settings(view, settings, "augmentation")
                .with_context(|| format!("invalid --augment '{settings}'"))?;
        }
        if args.contrastive_crop {
            view.contrastive_crop = Some(Default::default());
        }
        if let Some(p) = args.image_synthesis {
            view.synthesis_p = p;
        }
    }
    config.monitor.knn_every_epochs = args.knn_every;
    config.validate()?;
    Ok(config)
}

fn eval(args: EvalArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let model = Model::load(&args.checkpoint, &device)?;
    let source = args.data.source()?.unwrap_or_else(|| model.config.data.clone());
    let (train_set, test_set) = source.load()?;
    let train_set = model.config.long_tail_split(train_set)?;
    let test_set = test_set
        .context("evaluation needs a test split: use an IDX folder or an image folder with train/ and test/")?;
    let shots = model.config.long_tail.is_some();
    let scope =
        if args.knn_only { EvalScope { shots, ..EvalScope::KNN } } else { EvalScope { shots, ..EvalScope::FULL } };
    let report = model.evaluate(&train_set, &test_set, scope)?;
    let mut out = serde_json::json!({ "model": report });
    if !args.knn_only {
        out["raw_pixels"] = serde_json::to_value(contrastive::eval::raw_pixel_report(&train_set, &test_set)?)?;
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Index 15 is the purge delay: mimalloc 3's options.c gives it a default of 1000 ms (2's:
    /// 10), and setting it turns purging off (−1).
    #[test]
    fn the_purge_delay_option_is_found_and_turned_off() {
        // SAFETY: reads and sets a plain integer option.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
        keep_freed_memory();
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, -1);
    }
}
