//! `contrastive bench finetune`: does a fine-tune job help on images it never saw?
//!
//! The scenario of a retrieval team: 100 labelled images each of three classes the default model
//! confuses (T-shirt/top, pullover, shirt), drawn at random from the Fashion-MNIST training set,
//! become a job with the server's defaults (or the flags' values). The job runs as the server
//! runs it ([`crate::finetune::job`]: validation, SupCon training, the quality guard, export and
//! publish into a scratch repository). Then the base and the new version embed, through ONNX
//! Runtime as served, 900 other images of the same classes that were never uploaded, and each is
//! classified by weighted k-NN against the uploaded images' embeddings (the gallery a retrieval
//! backend would hold): with k = 20, a neighbourhood of a 300-image gallery, and with the
//! field's k = 200 (made for 50,000-image galleries, here two thirds of the gallery votes).
//! Several draws give the spread: the gain is only believable beyond it.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::serve::{png_bytes, ScratchDir};
use crate::data::idx::{load_mnist_format_dir, Split, FASHION_MNIST_DIR};
use crate::data::Dataset;
use crate::eval::{knn_accuracy, KnnConfig};
use crate::finetune::datasets::LabeledImage;
use crate::finetune::job::{self, JobSpec, JobStop};
use crate::finetune::parameters::JobParameters;
use crate::proto::v1::HyperParameters;
use crate::registry::{ModelRepository, MODEL_FILE};
use crate::runtime::{OnnxEncoder, SessionOptions};

/// `contrastive bench finetune` options; hyper-parameters left out take the server's defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneBenchOptions {
    /// Model repository holding the base model
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// Base model [default: the repository's default model]
    #[arg(long)]
    pub base_model: Option<String>,
    /// Folder of the Fashion-MNIST IDX files
    #[arg(long, default_value = FASHION_MNIST_DIR)]
    pub data: PathBuf,
    /// Random draws of uploaded and unseen images
    #[arg(long, default_value_t = 5)]
    pub draws: usize,
    /// Labelled images uploaded per class
    #[arg(long, default_value_t = 100)]
    pub uploaded_per_class: usize,
    /// Never-uploaded images scored per class
    #[arg(long, default_value_t = 300)]
    pub unseen_per_class: usize,
    /// Classes of the scenario, by Fashion-MNIST index (0 T-shirt/top, 2 pullover, 6 shirt)
    #[arg(long, value_delimiter = ',', default_value = "0,2,6")]
    pub classes: Vec<u32>,
    /// Threads the job trains with
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long)]
    pub epochs: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<u32>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub trainable_stages: Option<u32>,
}

impl FinetuneBenchOptions {
    fn hyper_parameters(&self, seed: u64) -> HyperParameters {
        HyperParameters {
            epochs: self.epochs.unwrap_or(0),
            batch_size: self.batch_size.unwrap_or(0),
            learning_rate: self.learning_rate.unwrap_or(0.0),
            temperature: self.temperature.unwrap_or(0.0),
            trainable_stages: self.trainable_stages,
            seed,
            holdout_fraction: 0.0,
        }
    }
}

/// One draw's k-NN accuracies on the unseen images, before and after, for each k of [`KS`].
struct DrawResult {
    before: [f64; 2],
    after: [f64; 2],
    published: bool,
    seconds: f64,
}

/// The k of the weighted k-NN (T = 0.1): the primary figure first.
const KS: [usize; 2] = [20, 200];

pub fn run(options: &FinetuneBenchOptions) -> Result<()> {
    ensure!(options.draws > 0, "--draws must be at least 1");
    ensure!(options.classes.len() >= 2, "--classes needs at least two classes");
    let repository = ModelRepository::new(&options.models);
    let base_model = match &options.base_model {
        Some(name) => name.clone(),
        None => repository
            .default_model_marker()
            .context("no --base-model and the repository names no default model (.default-model)")?,
    };
    let train = load_mnist_format_dir(&options.data, Split::Train).with_context(|| {
        format!("Fashion-MNIST under {} (apt-get install dataset-fashion-mnist)", options.data.display())
    })?;
    let parameters = JobParameters::from_proto(Some(&options.hyper_parameters(0)))?;
    println!(
        "fine-tune of {base_model}: {} uploaded and {} unseen images per class of classes {:?}, {} draws, {} threads",
        options.uploaded_per_class, options.unseen_per_class, options.classes, options.draws, options.threads
    );
    println!(
        "job: epochs {}, batch {}, learning rate {}, temperature {}, trainable stages {:?}, hold-out {}",
        parameters.epochs,
        parameters.batch_size,
        parameters.learning_rate,
        parameters.temperature,
        parameters.trainable_stages,
        parameters.holdout_fraction
    );
    println!("k-NN accuracy of unseen images against the uploaded ones (weighted k-NN, T = 0.1):");
    println!(
        "{:>5} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>9} {:>7}",
        "draw", "k=20", "tuned", "gain", "k=200", "tuned", "gain", "published", "seconds"
    );
    let mut results = Vec::new();
    for draw in 0..options.draws {
        let r = run_draw(options, &repository, &base_model, &train, draw as u64)?;
        println!(
            "{:>5} | {:>8.4} {:>8.4} {:>+8.4} | {:>8.4} {:>8.4} {:>+8.4} | {:>9} {:>7.1}",
            draw,
            r.before[0],
            r.after[0],
            r.after[0] - r.before[0],
            r.before[1],
            r.after[1],
            r.after[1] - r.before[1],
            if r.published { "yes" } else { "refused" },
            r.seconds
        );
        results.push(r);
    }
    for (i, k) in KS.iter().enumerate() {
        let gains: Vec<f64> = results.iter().map(|r| r.after[i] - r.before[i]).collect();
        let (mean, sd) = mean_std(&gains);
        let (min, max) = gains.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &g| (lo.min(g), hi.max(g)));
        let before = mean_std(&results.iter().map(|r| r.before[i]).collect::<Vec<_>>()).0;
        let after = mean_std(&results.iter().map(|r| r.after[i]).collect::<Vec<_>>()).0;
        println!(
            "k = {k}: base {before:.4}, tuned {after:.4}, gain {mean:+.4} ± {sd:.4} (sd over draws; min {min:+.4}, max {max:+.4})"
        );
    }
    let seconds = mean_std(&results.iter().map(|r| r.seconds).collect::<Vec<_>>()).0;
    let published = results.iter().filter(|r| r.published).count();
    println!("{seconds:.0} s per job; {published} of {} published", results.len());
    Ok(())
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance =
        if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, variance.sqrt())
}

fn run_draw(
    options: &FinetuneBenchOptions,
    repository: &ModelRepository,
    base_model: &str,
    train: &Dataset,
    seed: u64,
) -> Result<DrawResult> {
    // Disjoint uploaded and unseen images of each class, drawn with this seed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0000 + seed);
    let (mut uploaded, mut unseen) = (Vec::new(), Vec::new());
    for &class in &options.classes {
        let mut members: Vec<usize> = (0..train.len()).filter(|&i| train.labels[i] == class).collect();
        ensure!(
            members.len() >= options.uploaded_per_class + options.unseen_per_class,
            "class {class} has only {} images",
            members.len()
        );
        members.shuffle(&mut rng);
        uploaded.extend_from_slice(&members[..options.uploaded_per_class]);
        unseen.extend_from_slice(&members[options.uploaded_per_class..][..options.unseen_per_class]);
    }
    let images: Vec<LabeledImage> = uploaded
        .iter()
        .map(|&i| {
            Ok(LabeledImage { bytes: png_bytes(train, i)?, label: train.class_names[train.labels[i] as usize].clone() })
        })
        .collect::<Result<_>>()?;

    // The job as the server runs it: the base from the repository, the new version published
    // into a scratch repository (removed after the draw).
    let scratch = ScratchDir::create()?;
    let scratch_repository = ModelRepository::new(&scratch.0);
    let (base_version, _) = repository.resolve(base_model, 0)?;
    let spec = JobSpec {
        job_id: format!("bench-{seed}"),
        base_model: base_model.to_string(),
        base_version,
        output_model: "bench-tuned".into(),
        output_version: None,
        dataset_id: format!("draw-{seed}"),
        parameters: JobParameters::from_proto(Some(&options.hyper_parameters(seed)))?,
        allow_worse: false,
    };
    let started = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(options.threads).build()?;
    let outcome = pool.install(|| -> Result<Option<u64>> {
        let prepared = job::prepare(repository, &spec, &images, 8).map_err(stop_error)?;
        match job::train_and_publish(&scratch_repository, &spec, prepared, &AtomicBool::new(false), &mut |_| Ok(())) {
            Ok(published) => Ok(Some(published.version)),
            Err(JobStop::Failed { kind: job::FailureKind::FailedPrecondition, .. }) => Ok(None),
            Err(stop) => Err(stop_error(stop)),
        }
    })?;
    let seconds = started.elapsed().as_secs_f64();

    // Served embeddings: each version's model.onnx through ONNX Runtime.
    let gallery = train.subset(&uploaded);
    let queries = train.subset(&unseen);
    let score = |repository: &ModelRepository, name: &str, version: u64| -> Result<[f64; 2]> {
        let path = repository.version_dir(name, version).join(MODEL_FILE);
        let mut encoder = OnnxEncoder::load(&path, SessionOptions::default())?;
        let embed = |data: &Dataset, encoder: &mut OnnxEncoder| -> Result<Tensor> {
            let (values, width) = encoder.run(&data.images, data.len(), data.shape.dims())?;
            Ok(Tensor::from_vec(values, (data.len(), width), &Device::Cpu)?)
        };
        let (g, q) = (embed(&gallery, &mut encoder)?, embed(&queries, &mut encoder)?);
        let accuracy = |k: usize| {
            let config = KnnConfig { k, ..KnnConfig::default() };
            knn_accuracy(&g, &gallery.labels, &q, &queries.labels, train.num_classes(), &config)
        };
        Ok([accuracy(KS[0])?, accuracy(KS[1])?])
    };
    let before = score(repository, base_model, base_version)?;
    let after = match outcome {
        Some(version) => score(&scratch_repository, "bench-tuned", version)?,
        None => before, // refused: the served model stays the base
    };
    Ok(DrawResult { before, after, published: outcome.is_some(), seconds })
}

fn stop_error(stop: JobStop) -> anyhow::Error {
    match stop {
        JobStop::Cancelled => anyhow::anyhow!("the job was cancelled"),
        JobStop::Failed { message, .. } => anyhow::anyhow!("the job failed: {message}"),
    }
}
