//! Every method trained for a few hundred steps on the committed Fashion-MNIST subset.
//!
//! The contrastive methods (SimCLR, MoCo v2, SupCon) must beat the k-NN accuracy of the same
//! encoder at random initialisation by a clear margin. BYOL, SimSiam and SwAV learn more slowly
//! at first (measured here: still at the random-init k-NN after 210 and 600 steps, as in the
//! first epochs of their papers' curves), so for them the test asserts that the loss falls
//! clearly and that the features do not collapse.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use contrastive::data::ImageShape;
use contrastive::train::arch::{MethodConfig, ResNetConfig};
use contrastive::train::config::{DataSource, TrainConfig};
use contrastive::train::trainer::{self, Model, TrainOptions};

fn subset() -> DataSource {
    DataSource::MnistIdx { dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset") }
}

/// A narrower encoder than the canonical one keeps the test quick on two cores.
fn small_config(method: &str) -> TrainConfig {
    let mut config = TrainConfig::for_method(MethodConfig::default_for(method).unwrap(), ImageShape::new(1, 28, 28));
    config.encoder = ResNetConfig { widths: vec![16, 32, 64], ..ResNetConfig::canonical(1) };
    config.projector_dims = vec![64, 32];
    config.data = subset();
    config.batch_size = 64;
    config.epochs = 14; // 15 steps an epoch: 210 steps
    config.monitor.knn_every_epochs = 0;
    if let MethodConfig::MocoV2 { queue_size, .. } = &mut config.method {
        // The momentum encoder makes MoCo start slower: give it 300 steps.
        *queue_size = 512;
        config.epochs = 20;
    }
    if let MethodConfig::Swav { prototypes, freeze_prototypes_steps, .. } = &mut config.method {
        *prototypes = 30;
        *freeze_prototypes_steps = 15;
    }
    config
}

fn knn_accuracy(model: &Model) -> f64 {
    let (train, test) = subset().load().unwrap();
    trainer::evaluate(model, &train, &test.unwrap(), false).unwrap().knn_accuracy
}

/// Trains `method` and returns (k-NN at random init, k-NN after training, logged losses).
fn train_and_measure(method: &str) -> (f64, f64, Vec<f64>) {
    let config = small_config(method);
    let random = knn_accuracy(&Model::new(&config, &Device::Cpu).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let options = TrainOptions {
        run_dir: dir.path().to_path_buf(),
        device: Device::Cpu,
        resume: false,
        stop: Arc::new(AtomicBool::new(false)),
        progress_bar: false,
        final_eval: false,
        stop_at_step: None,
    };
    let state = trainer::train(&config, &options).unwrap();
    assert!(state.finished);
    let trained = knn_accuracy(&Model::load(dir.path(), &Device::Cpu).unwrap());
    let losses: Vec<f64> = state.loss_history.iter().map(|&(_, loss)| loss).collect();
    eprintln!("{method}: k-NN {random:.3} at random init, {trained:.3} after {} steps; loss {:.3} -> {:.3}", state.step, losses[0], losses[losses.len() - 1]);
    (random, trained, losses)
}

fn assert_beats_random_init(method: &str, margin: f64) {
    let (random, trained, _) = train_and_measure(method);
    assert!(trained >= random + margin, "{method}: k-NN {trained:.3} does not beat random init {random:.3} by {margin}");
}

/// The mean of the last three logged losses is at least `drop` below the first logged loss,
/// and the k-NN accuracy stays far above chance (a collapsed encoder scores about 0.1).
fn assert_loss_falls_without_collapse(method: &str, drop: f64) {
    let (random, trained, losses) = train_and_measure(method);
    let end = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(end <= losses[0] - drop, "{method}: loss {:.3} -> {end:.3} did not fall by {drop}", losses[0]);
    assert!(trained >= random - 0.1 && trained > 0.35, "{method}: k-NN {trained:.3} (random init {random:.3}) suggests collapse");
}

#[test]
fn simclr_learns() {
    assert_beats_random_init("simclr", 0.04);
}

#[test]
fn moco_v2_learns() {
    assert_beats_random_init("moco-v2", 0.04);
}

#[test]
fn supcon_learns() {
    assert_beats_random_init("supcon", 0.05);
}

#[test]
fn byol_trains() {
    assert_loss_falls_without_collapse("byol", 0.1);
}

#[test]
fn simsiam_trains() {
    assert_loss_falls_without_collapse("simsiam", 0.3);
}

#[test]
fn swav_trains() {
    assert_loss_falls_without_collapse("swav", 0.5);
}
