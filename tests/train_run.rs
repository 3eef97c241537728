//! The training run a user sees: run folder contents, resuming after a stop, clear errors.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use contrastive::data::ImageShape;
use contrastive::train::arch::{MethodConfig, ResNetConfig};
use contrastive::train::checkpoint;
use contrastive::train::config::{DataSource, TrainConfig};
use contrastive::train::run::{train, TrainOptions};

fn tiny_config(method: &str) -> TrainConfig {
    let mut config = TrainConfig::for_method(MethodConfig::default_for(method).unwrap(), ImageShape::new(1, 28, 28));
    config.encoder = ResNetConfig { widths: vec![8, 16, 16], ..ResNetConfig::canonical(1) }.into();
    config.projector_dims = vec![16, 8];
    config.data =
        DataSource::MnistIdx { dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset") };
    config.train_limit = Some(256);
    config.batch_size = 32;
    config.epochs = 2;
    config.monitor.knn_test_limit = Some(100);
    if let MethodConfig::MocoV2 { queue_size, .. } = &mut config.method {
        *queue_size = 64;
    }
    config
}

fn options(dir: &Path, resume: bool, stop_at_step: Option<usize>) -> TrainOptions {
    TrainOptions {
        run_dir: dir.to_path_buf(),
        device: Device::Cpu,
        resume,
        stop: Arc::new(AtomicBool::new(false)),
        progress_bar: false,
        final_eval: false,
        stop_at_step,
    }
}

fn weights(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join(checkpoint::WEIGHTS_FILE), &Device::Cpu).unwrap()
}

#[test]
fn a_run_folder_holds_config_checkpoint_metrics_and_curves() {
    let dir = tempfile::tempdir().unwrap();
    let state = train(&tiny_config("simclr"), &options(dir.path(), false, None)).unwrap();
    assert!(state.finished);
    assert_eq!(state.progress.step, 2 * (256 / 32));
    assert_eq!(state.knn_history.len(), 2, "k-NN after each epoch");
    for file in [
        checkpoint::CONFIG_FILE,
        checkpoint::WEIGHTS_FILE,
        checkpoint::OPTIMIZER_FILE,
        checkpoint::STATE_FILE,
        checkpoint::METRICS_FILE,
        checkpoint::CURVES_FILE,
    ] {
        assert!(dir.path().join(file).is_file(), "{file} is missing");
    }
    let metrics = std::fs::read_to_string(dir.path().join(checkpoint::METRICS_FILE)).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["loss"].is_number() && l["images_per_second"].is_number()));
    assert!(lines.iter().any(|l| l["knn_accuracy"].is_number()));
    // The config file alone rebuilds the run.
    assert_eq!(TrainConfig::load(&dir.path().join(checkpoint::CONFIG_FILE)).unwrap(), tiny_config("simclr"));
    // Starting again over a finished run is refused rather than overwriting it.
    let err = train(&tiny_config("simclr"), &options(dir.path(), false, None)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn a_stopped_run_resumes_to_the_same_weights_as_an_uninterrupted_one() {
    // MoCo has the most state to carry over: momentum encoder, queue, optimiser momentum.
    let config = tiny_config("moco-v2");
    let straight = tempfile::tempdir().unwrap();
    train(&config, &options(straight.path(), false, None)).unwrap();

    let stopped = tempfile::tempdir().unwrap();
    let state = train(&config, &options(stopped.path(), false, Some(5))).unwrap();
    assert!(!state.finished);
    assert_eq!(
        (state.progress.step, state.progress.epoch, state.progress.batch_in_epoch),
        (5, 0, 5),
        "stopped mid-epoch"
    );
    let state = train(&config, &options(stopped.path(), true, None)).unwrap();
    assert!(state.finished);
    assert_eq!(state.progress.step, 16);

    assert_same_weights(straight.path(), stopped.path());
}

#[test]
fn the_same_seed_trains_the_same_weights() {
    let config = tiny_config("simclr");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(&config, &options(a.path(), false, None)).unwrap();
    train(&config, &options(b.path(), false, None)).unwrap();
    assert_same_weights(a.path(), b.path());
}

/// Every tensor equal to float rounding (the runs are deterministic; the bound only allows for
/// a different summation order in a library kernel).
fn assert_same_weights(a: &Path, b: &Path) {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let diff =
            (ta - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{name} differs by {diff}");
    }
}

#[test]
fn bad_inputs_give_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config("simclr");
    config.data = DataSource::MnistIdx { dir: dir.path().join("nowhere") };
    let err = format!("{:#}", train(&config, &options(&dir.path().join("run"), false, None)).unwrap_err());
    assert!(err.contains("nowhere") && err.contains("dataset-fashion-mnist"), "{err}");

    let mut config = tiny_config("simclr");
    config.batch_size = 1000;
    let err = format!("{:#}", train(&config, &options(&dir.path().join("run2"), false, None)).unwrap_err());
    assert!(err.contains("fewer than one batch"), "{err}");

    let err = MethodConfig::default_for("simclr-v9").unwrap_err().to_string();
    assert!(err.contains("simclr-v9") && err.contains("moco-v2"), "{err}");

    let err =
        format!("{:#}", train(&tiny_config("simclr"), &options(&dir.path().join("run3"), true, None)).unwrap_err());
    assert!(err.contains("config.json"), "{err}");
}

/// The CLI's warm-up default follows `--epochs` for DINO on a ViT (a tenth of the run), an
/// explicit `--warmup-epochs` wins, and a negative one is refused by name.
#[test]
fn the_cli_warms_dino_on_a_vit_up_over_a_tenth_of_its_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let subset = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["train", "--method", "dino:out_dim=16", "--encoder", "vit:dim=16:depth=1:heads=2"];
        args.extend(["--train-limit", "64", "--batch-size", "32", "--epochs", "20", "--stop-at-step", "1"]);
        args.extend(["--knn-every", "0", "--no-final-eval", "--no-progress"]);
        args.extend(extra);
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_contrastive"))
            .args(&args)
            .arg("--data")
            .arg(&subset)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        (output, out)
    };
    let warmup_of = |out: &Path| {
        let config: TrainConfig =
            serde_json::from_str(&std::fs::read_to_string(out.join(checkpoint::CONFIG_FILE)).unwrap()).unwrap();
        config.warmup_epochs
    };
    let (output, out) = run("default", &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(warmup_of(&out), 2.0);
    let (output, out) = run("explicit", &["--warmup-epochs", "0.5"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(warmup_of(&out), 0.5);
    let (output, _) = run("negative", &["--warmup-epochs=-1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("warm-up epochs must be a number >= 0, got -1"), "{stderr}");
}
