//! Export → ONNX Runtime → parity for every encoder shape the trainer builds, and the export's
//! failure modes: each leaves the model repository unchanged.
//!
//! Needs the ONNX Runtime library: `scripts/fetch-onnxruntime` (the README's test command runs it).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use contrastive::data::ImageShape;
use contrastive::export::{self, ExportOptions, Provenance};
use contrastive::registry::manifest::ChannelOrder;
use contrastive::registry::{ModelRepository, MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE};
use contrastive::runtime::{OnnxEncoder, SessionOptions};
use contrastive::train::arch::{EncoderConfig, MethodConfig, PatchGrid, ResNetConfig, VitConfig};
use contrastive::train::checkpoint::{self, RunState};
use contrastive::train::config::{DataSource, TrainConfig};
use contrastive::train::fit::Progress;
use contrastive::train::Model;
use rand::{Rng, SeedableRng};

fn subset_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset")
}

fn config(encoder: impl Into<EncoderConfig>, data: DataSource) -> TrainConfig {
    let mut config = TrainConfig::for_method(MethodConfig::default_for("simclr").unwrap(), data.image_shape());
    config.encoder = encoder.into();
    config.projector_dims = vec![32, 16];
    config.data = data;
    config
}

/// A model whose batch norms have non-trivial scales, shifts and running statistics, so that
/// folding them into the convolutions is really exercised; and whose ViT norms, biases and
/// tokens are far from their zero-or-one starts.
fn model_with_random_statistics(config: &TrainConfig, seed: u64) -> Model {
    let model = Model::new(config, &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, var) in model.varmap.data().lock().unwrap().iter() {
        let n = var.elem_count();
        let values: Vec<f32> = if name.ends_with("running_var") {
            (0..n).map(|_| rng.random_range(0.2..2.0)).collect()
        } else if name.ends_with("running_mean")
            || name.ends_with("bn.bias")
            || name.ends_with("bn1.bias")
            || name.ends_with("bn2.bias")
        {
            (0..n).map(|_| rng.random_range(-0.5..0.5)).collect()
        } else if (name.contains("bn") || name.contains("norm")) && name.ends_with("weight") {
            (0..n).map(|_| rng.random_range(0.5..1.5)).collect()
        } else if name.ends_with(".bias") || name.ends_with("_token") || name.ends_with("pos_embed") {
            (0..n).map(|_| rng.random_range(-0.5..0.5)).collect()
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    model
}

fn provenance() -> Provenance {
    Provenance { source: "test".into(), evaluation: None, epochs: 0, steps: 0, data: None, fine_tune_job: None }
}

/// Independent of the export's own check: reload the published file and compare with candle.
fn assert_served_model_matches_candle(dir: &Path, model: &Model, shape: ImageShape, l2: bool) {
    let mut session = OnnxEncoder::load(&dir.join(MODEL_FILE), SessionOptions::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for batch in [1usize, 5] {
        let pixels: Vec<f32> = (0..batch * shape.numel()).map(|_| rng.random::<f32>()).collect();
        let x = Tensor::from_slice(&pixels, (batch, shape.channels, shape.height, shape.width), &Device::Cpu).unwrap();
        let mut expected = model.method.encoder().forward_t(&x, false).unwrap();
        if l2 {
            let norm = expected.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
            expected = expected.broadcast_div(&norm).unwrap();
        }
        let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (actual, dim) = session.run(&pixels, batch, shape.dims()).unwrap();
        assert_eq!(dim, model.method.encoder().feature_dim());
        let diff = expected.iter().zip(&actual).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "batch {batch}: max |candle − ORT| = {diff}");
        if l2 {
            for row in actual.chunks(dim) {
                let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5, "row norm {norm}");
            }
        }
    }
}

#[test]
fn every_encoder_variant_exports_with_parity() {
    let gray = DataSource::MnistIdx { dir: subset_dir() };
    let rgb = DataSource::ImageFolder { root: "unused".into(), shape: ImageShape::new(3, 20, 20) };
    let variants: [(&str, EncoderConfig, DataSource); 6] = [
        ("canonical", ResNetConfig::canonical(1).into(), gray.clone()),
        // Two blocks per stage: identity shortcuts inside a stage, projections between stages.
        (
            "deeper",
            ResNetConfig {
                widths: vec![8, 16, 24],
                blocks: vec![2, 2, 2],
                strides: vec![1, 2, 2],
                in_channels: 1,
                patches: None,
            }
            .into(),
            gray.clone(),
        ),
        // RGB input, four stages, a stride-2 first stage and an odd input size.
        (
            "rgb",
            ResNetConfig {
                widths: vec![8, 8, 16, 16],
                blocks: vec![1, 1, 1, 1],
                strides: vec![2, 1, 2, 1],
                in_channels: 3,
                patches: None,
            }
            .into(),
            rgb.clone(),
        ),
        // CPC's encoder: the mean of the codes of 16 overlapping 10×10 patches (Slice, Concat,
        // Reshape and ReduceMean around the body).
        (
            "patches",
            ResNetConfig { patches: Some(PatchGrid { size: 10, stride: 6 }), ..ResNetConfig::canonical(1) }.into(),
            gray.clone(),
        ),
        // A ViT: Conv patch embedding, Expand of the class token, attention (Reshape, Transpose,
        // Gather, MatMul, Softmax), erf GELU, LayerNormalization, Gather of the class token.
        (
            "vit",
            VitConfig { dim: 32, depth: 2, heads: 4, mlp_ratio: 2, ..VitConfig::tiny(1, 28, 28) }.into(),
            gray.clone(),
        ),
        // RGB 20×20 in 7-pixel patches: a 2×2 grid that drops the last 6 pixels of each side.
        (
            "vit-rgb",
            VitConfig { patch: 7, dim: 24, depth: 1, heads: 3, mlp_ratio: 4, ..VitConfig::tiny(3, 20, 20) }.into(),
            rgb,
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let repo = ModelRepository::new(tmp.path().join("models"));
    let images =
        contrastive::data::idx::load_mnist_format_dir(&subset_dir(), contrastive::data::idx::Split::Test).unwrap();
    for (i, (label, encoder, data)) in variants.into_iter().enumerate() {
        let shape = data.image_shape();
        let model = model_with_random_statistics(&config(encoder.clone(), data), i as u64);
        let l2 = label == "deeper";
        let options = ExportOptions { l2_normalize: l2, ..ExportOptions::new(label) };
        let manifest = export::publish_model(&repo, &model, &options, &provenance(), Some(&images)).unwrap();
        assert_eq!(manifest.version, 1, "{label}");
        assert!(manifest.parity.max_abs_diff < 1e-4, "{label}: {:?}", manifest.parity);
        let real_image_cases = manifest.parity.cases.iter().filter(|c| c.input == "images").count();
        assert_eq!(
            real_image_cases,
            if shape.channels == 1 { 2 } else { 0 },
            "{label}: real images when their shape fits"
        );
        assert!(
            manifest.parity.cases.iter().any(|c| c.batch == 1) && manifest.parity.cases.iter().any(|c| c.batch == 7)
        );
        assert_eq!(
            manifest.input.channel_order,
            if shape.channels == 1 { ChannelOrder::Gray } else { ChannelOrder::Rgb }
        );
        assert_eq!(manifest.output.dimensions, encoder.feature_dim());
        assert_eq!(manifest.architecture.encoder, encoder.name());
        match encoder {
            EncoderConfig::ResNet(resnet) => assert_eq!(manifest.architecture.resnet.as_ref(), Some(&resnet)),
            EncoderConfig::Vit(vit) => assert_eq!(manifest.architecture.vit.as_ref(), Some(&vit)),
        }
        let dir = repo.version_dir(label, 1);
        manifest.verify_files(&dir).unwrap();
        assert_served_model_matches_candle(&dir, &model, shape, l2);

        // The weights file rebuilds the same encoder, projection head included.
        let rebuilt = Model::new(&manifest.training.config, &Device::Cpu).unwrap();
        checkpoint::load_weights_file(&dir.join(WEIGHTS_FILE), &rebuilt.varmap, &Device::Cpu).unwrap();
        assert!(rebuilt.varmap.data().lock().unwrap().keys().any(|k| k.starts_with("projector.")));
        assert_served_model_matches_candle(&dir, &rebuilt, shape, l2);
    }
}

#[test]
fn canonical_encoder_is_about_307k_parameters_in_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = ModelRepository::new(tmp.path());
    let model =
        Model::new(&config(ResNetConfig::canonical(1), DataSource::MnistIdx { dir: subset_dir() }), &Device::Cpu)
            .unwrap();
    let manifest = export::publish_model(&repo, &model, &ExportOptions::new("m"), &provenance(), None).unwrap();
    assert_eq!(manifest.architecture.encoder_parameters, 306_784);
    let text = std::fs::read_to_string(repo.version_dir("m", 1).join(MANIFEST_FILE)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["architecture", "input", "output", "training", "evaluation", "parity", "created_at", "files"] {
        assert!(json.get(key).is_some(), "manifest lacks {key}");
    }
    assert_eq!(json["input"]["scale"].as_f64().unwrap() as f32, 1.0 / 255.0);
}

fn tiny_run_dir(dir: &Path) -> TrainConfig {
    let config = config(
        ResNetConfig { widths: vec![8, 8, 8], ..ResNetConfig::canonical(1) },
        DataSource::MnistIdx { dir: subset_dir() },
    );
    let model = Model::new(&config, &Device::Cpu).unwrap();
    config.save(&dir.join(checkpoint::CONFIG_FILE)).unwrap();
    let progress = Progress { epoch: 2, step: 20, ..Default::default() };
    let state = RunState { progress, finished: true, ..Default::default() };
    checkpoint::save(dir, &model.varmap, &model.method.buffers().unwrap(), &Default::default(), &state).unwrap();
    config
}

fn listing(root: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        walk(root).into_iter().map(|p| p.strip_prefix(root).unwrap().display().to_string()).collect();
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            out.push(entry.path());
            if entry.path().is_dir() {
                out.extend(walk(&entry.path()));
            }
        }
    }
    out
}

#[test]
fn export_from_a_run_folder_then_versions_count_up() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    tiny_run_dir(&run);
    let repo = ModelRepository::new(tmp.path().join("models"));
    let first = export::export_checkpoint(&run, &repo, &ExportOptions::new("tiny")).unwrap();
    let second = export::export_checkpoint(&run, &repo, &ExportOptions::new("tiny")).unwrap();
    assert_eq!((first.version, second.version), (1, 2));
    assert_eq!((first.training.epochs, first.training.steps), (2, 20));
    assert!(first.parity.cases.iter().any(|c| c.input == "images"), "the run's own test images are used");
    assert_eq!(repo.versions("tiny").unwrap(), vec![1, 2]);
}

#[test]
fn failures_leave_the_repository_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    tiny_run_dir(&run);
    let models = tmp.path().join("models");
    let repo = ModelRepository::new(&models);
    export::export_checkpoint(&run, &repo, &ExportOptions::new("tiny")).unwrap();
    let before = listing(&models);

    // An existing version.
    let err = export::export_checkpoint(&run, &repo, &ExportOptions { version: Some(1), ..ExportOptions::new("tiny") })
        .unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    // A parity bound no export can meet: the error carries the figures.
    let err = export::export_checkpoint(&run, &repo, &ExportOptions { tolerance: -1.0, ..ExportOptions::new("tiny") })
        .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("parity check failed") && message.contains("random batch 7"), "{message}");
    // A bad model name.
    assert!(export::export_checkpoint(&run, &repo, &ExportOptions::new("../escape")).is_err());
    assert_eq!(listing(&models), before);

    // A corrupt checkpoint.
    let weights = run.join(checkpoint::WEIGHTS_FILE);
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = export::export_checkpoint(&run, &repo, &ExportOptions::new("tiny")).unwrap_err();
    assert!(format!("{err:#}").contains("cannot load the checkpoint"), "{err:#}");
    // A missing run folder.
    let err = export::export_checkpoint(&tmp.path().join("nope"), &repo, &ExportOptions::new("tiny")).unwrap_err();
    assert!(format!("{err:#}").contains("nope"), "{err:#}");
    assert_eq!(listing(&models), before);

    // A models "folder" that is a file.
    std::fs::write(&weights, &bytes).unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let err = export::export_checkpoint(&run, &ModelRepository::new(&file), &ExportOptions::new("tiny")).unwrap_err();
    assert!(format!("{err:#}").contains("is not a folder"), "{err:#}");
}

#[test]
fn a_graph_with_an_unknown_operator_is_refused_by_name() {
    let mut g = contrastive_export::GraphBuilder::new("g");
    let x = g.input("x", &[contrastive_export::Dim::batch(), contrastive_export::Dim::Fixed(4)]).unwrap();
    let y = g.node("FancyAttentionV9", &[&x], "y", &[]).unwrap();
    g.output(&y, &[contrastive_export::Dim::batch(), contrastive_export::Dim::Fixed(4)]).unwrap();
    let bytes = contrastive_export::to_bytes(&g.finish("", "", &[]));
    let err = OnnxEncoder::load_bytes(&bytes, SessionOptions::default()).err().expect("ONNX Runtime refuses the op");
    assert!(err.to_string().contains("FancyAttentionV9"), "{err}");
}
