//! Trained encoder → ONNX graph → parity check against ONNX Runtime → a new version in the model
//! repository. The embedding is the backbone feature; the projection head stays in
//! `weights.safetensors` for fine-tuning.

pub mod parity;

use std::path::Path;

use anyhow::{Context, Result};
use contrastive_export::{onnx::ModelProto, Dim, GraphBuilder};

use crate::data::{Dataset, ImageShape};
use crate::eval::EvalReport;
use crate::registry::manifest::{Architecture, FileDigest, InputSpec, OutputSpec, TrainingSummary, INPUT_NAME};
use crate::registry::{Manifest, ModelRepository, MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE};
use crate::train::arch::{Encoder, EncoderConfig};
use crate::train::{checkpoint, Model};

pub use parity::{check_parity, PARITY_TOLERANCE};

pub const OUTPUT_NAME: &str = "embedding";

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub name: String,
    /// `None`: the next version.
    pub version: Option<u64>,
    /// Put the L2 normalisation inside the graph.
    pub l2_normalize: bool,
    pub tolerance: f32,
}

impl ExportOptions {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), version: None, l2_normalize: false, tolerance: PARITY_TOLERANCE }
    }
}

/// What the manifest says about where a model came from.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub source: String,
    pub evaluation: Option<EvalReport>,
    pub epochs: usize,
    pub steps: usize,
    /// The training data in words, when it was not the run config's data source.
    pub data: Option<String>,
    /// The fine-tune job publishing the version, recorded in its manifest.
    pub fine_tune_job: Option<String>,
}

/// The encoder as an ONNX model: `image` `[batch, C, H, W]` in, `embedding` `[batch, D]` out.
pub fn encoder_graph(
    encoder: &Encoder,
    shape: ImageShape,
    l2_normalize: bool,
    metadata: &[(String, String)],
) -> Result<ModelProto> {
    let mut g = GraphBuilder::new("encoder");
    let dims = [Dim::batch(), Dim::Fixed(shape.channels), Dim::Fixed(shape.height), Dim::Fixed(shape.width)];
    let input = g.input(INPUT_NAME, &dims)?;
    let features = encoder.to_onnx(&mut g, &input, shape.height, shape.width)?;
    let embedding = if l2_normalize {
        // x / sqrt(Σx² + ε²), as contrastive_kernels::l2_normalize.
        let sum_sq =
            g.node("ReduceSumSquare", &[&features], "l2.sum_sq", &[("axes", contrastive_export::Attr::Ints(vec![1]))])?;
        let eps = g.initializer("l2.eps_sq", &[], &[contrastive_kernels::L2_EPS_SQUARED as f32])?;
        let shifted = g.node("Add", &[&sum_sq, &eps], "l2.shifted", &[])?;
        let norm = g.node("Sqrt", &[&shifted], "l2.norm", &[])?;
        g.node("Div", &[&features, &norm], OUTPUT_NAME, &[])?
    } else {
        g.node("Identity", &[&features], OUTPUT_NAME, &[])?
    };
    g.output(&embedding, &[Dim::batch(), Dim::Fixed(encoder.feature_dim())])?;
    let doc = "Contrastive image encoder: images scaled to [0, 1] in, backbone features out.";
    Ok(g.finish(env!("CARGO_PKG_VERSION"), doc, metadata))
}

/// Exports `model`'s encoder, checks parity, and publishes it as a new version of
/// `options.name` with its weights and manifest. Parity uses random inputs and, when given, the
/// first images of `images`. Returns the published manifest.
pub fn publish_model(
    repo: &ModelRepository,
    model: &Model,
    options: &ExportOptions,
    provenance: &Provenance,
    images: Option<&Dataset>,
) -> Result<Manifest> {
    let config = &model.config;
    let shape = config.data.image_shape();
    let encoder = model.method.encoder();
    let input = InputSpec::image(shape.channels, shape.height, shape.width)?;
    let channel_order = input.channel_order;
    let metadata = vec![
        ("name".to_string(), options.name.clone()),
        ("method".to_string(), config.method.name().to_string()),
        (
            "input".to_string(),
            format!("{}x{}x{} {channel_order:?}, scaled to [0, 1]", shape.channels, shape.height, shape.width),
        ),
        ("embedding_dimensions".to_string(), encoder.feature_dim().to_string()),
    ];
    let graph = encoder_graph(encoder, shape, options.l2_normalize, &metadata)?;
    let onnx_bytes = contrastive_export::to_bytes(&graph);
    let parity = check_parity(model, &onnx_bytes, options.l2_normalize, images, options.tolerance)?;

    let mut manifest = Manifest {
        format: crate::registry::manifest::MANIFEST_FORMAT,
        name: options.name.clone(),
        version: 0,
        created_at: crate::registry::manifest::now_rfc3339(),
        architecture: Architecture {
            encoder: config.encoder.name().into(),
            resnet: config.encoder.as_resnet().cloned(),
            vit: match &config.encoder {
                EncoderConfig::Vit(vit) => Some(vit.clone()),
                EncoderConfig::ResNet(_) => None,
            },
            encoder_parameters: encoder_parameters(model),
            projector_dims: config.projector_dims.clone(),
        },
        input,
        output: OutputSpec {
            name: OUTPUT_NAME.into(),
            dimensions: encoder.feature_dim(),
            l2_normalized: options.l2_normalize,
        },
        training: TrainingSummary {
            method: config.method.name().into(),
            loss: config.method.loss_name().into(),
            pairs: config.method.pair_strategies().iter().map(|p| p.name().to_string()).collect(),
            data: provenance.data.clone().unwrap_or_else(|| describe_data(config)),
            epochs: provenance.epochs,
            steps: provenance.steps,
            batch_size: config.batch_size,
            config: config.clone(),
        },
        evaluation: provenance.evaluation.clone(),
        parity,
        source: provenance.source.clone(),
        fine_tune_job: provenance.fine_tune_job.clone(),
        files: Default::default(),
    };
    let weights = checkpoint::weight_tensors(&model.varmap, &model.method.buffers()?);
    let version = repo.publish(&options.name, options.version, |dir, version| {
        std::fs::write(dir.join(MODEL_FILE), &onnx_bytes)
            .with_context(|| format!("cannot write {}", dir.join(MODEL_FILE).display()))?;
        candle_core::safetensors::save(&weights, dir.join(WEIGHTS_FILE)).context("cannot write the weights")?;
        for file in [MODEL_FILE, WEIGHTS_FILE] {
            manifest.files.insert(file.to_string(), FileDigest::of_file(&dir.join(file))?);
        }
        manifest.version = version;
        std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_string_pretty(&manifest)?)?;
        Ok(())
    })?;
    debug_assert_eq!(manifest.version, version);
    Ok(manifest)
}

/// `contrastive export`: a run folder's latest checkpoint to a new model version. Parity uses the
/// run's test images when its data can be loaded here.
pub fn export_checkpoint(run_dir: &Path, repo: &ModelRepository, options: &ExportOptions) -> Result<Manifest> {
    let model = Model::load(run_dir, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot load the checkpoint in {}", run_dir.display()))?;
    let state = checkpoint::load_state(run_dir)?;
    let images = match model.config.data.load() {
        Ok((train, test)) => Some(test.unwrap_or(train)),
        Err(error) => {
            tracing::warn!(%error, "the run's data cannot be loaded here: parity uses random inputs only");
            None
        }
    };
    let provenance = Provenance {
        source: format!("run folder {}", run_dir.display()),
        evaluation: state.final_eval.clone(),
        epochs: state.progress.epoch,
        steps: state.progress.step,
        data: None,
        fine_tune_job: None,
    };
    publish_model(repo, &model, options, &provenance, images.as_ref())
}

fn encoder_parameters(model: &Model) -> usize {
    let vars = model.varmap.data().lock().expect("varmap lock");
    vars.iter()
        .filter(|(name, _)| {
            name.starts_with("encoder.") && !name.ends_with("running_mean") && !name.ends_with("running_var")
        })
        .map(|(_, var)| var.elem_count())
        .sum()
}

fn describe_data(config: &crate::train::config::TrainConfig) -> String {
    use crate::train::config::DataSource;
    let tail = config.long_tail.map(|ratio| format!(", long-tailed at imbalance {ratio}")).unwrap_or_default();
    let limit = tail + &config.train_limit.map(|n| format!(", first {n} training images")).unwrap_or_default();
    match &config.data {
        DataSource::MnistIdx { dir } => format!("MNIST-format IDX files in {}{limit}", dir.display()),
        DataSource::ImageFolder { root, .. } => format!("image folder {}{limit}", root.display()),
    }
}
