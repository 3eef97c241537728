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

/// `contrastive train` on the subset for one step of a small DINO ViT (four views: two global,
/// two 8-pixel local crops) with `extra` flags; the output and the run's config when it ran.
fn train_cli(dir: &Path, name: &str, extra: &[&str]) -> (std::process::Output, Option<TrainConfig>) {
    let subset = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset");
    let out = dir.join(name);
    let mut args = vec!["train", "--method", "dino:out_dim=16:local_crops=2:local_size=8"];
    args.extend(["--encoder", "vit:dim=16:depth=1:heads=2", "--train-limit", "64", "--batch-size", "32"]);
    args.extend(["--epochs", "20", "--stop-at-step", "1", "--knn-every", "0", "--no-final-eval", "--no-progress"]);
    args.extend(extra);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_contrastive"))
        .args(&args)
        .arg("--data")
        .arg(&subset)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let config = std::fs::read_to_string(out.join(checkpoint::CONFIG_FILE)).ok().map(|text| {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_str(&text).unwrap()
    });
    (output, config)
}

fn refused(output: &std::process::Output, words: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains(words), "{words:?} in {stderr}");
}

/// The CLI's warm-up default follows `--epochs` for DINO on a ViT (a tenth of the run), an
/// explicit `--warmup-epochs` wins, and a negative one is refused by name.
#[test]
fn the_cli_warms_dino_on_a_vit_up_over_a_tenth_of_its_epochs() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(train_cli(dir.path(), "default", &[]).1.unwrap().warmup_epochs, 2.0);
    assert_eq!(train_cli(dir.path(), "explicit", &["--warmup-epochs", "0.5"]).1.unwrap().warmup_epochs, 0.5);
    let (output, config) = train_cli(dir.path(), "negative", &["--warmup-epochs=-1"]);
    refused(&output, "warm-up epochs must be a number >= 0, got -1");
    assert!(config.is_none(), "a refused run leaves no run folder behind");
}

/// `--augment` changes the global views and leaves the local crops to the method; a field that
/// does not exist, an inverted range and a probability above 1 are refused by name.
#[test]
fn the_cli_sets_the_global_views_augmentation() {
    let dir = tempfile::tempdir().unwrap();
    let config = train_cli(dir.path(), "stronger", &["--augment", "crop_scale=[0.4,1]:blur_p=0.5:hue=0"]).1.unwrap();
    assert_eq!(config.augment.len(), 4);
    for global in &config.augment[..2] {
        assert_eq!((global.crop_scale, global.blur_p, global.hue), ((0.4, 1.0), 0.5, 0.0));
        assert_eq!(global.flip_p, 0.5, "the fields not named keep the method's values");
    }
    for local in &config.augment[2..] {
        assert_eq!((local.crop_scale, local.blur_p, local.output_size), ((0.05, 0.4), 0.0, Some(8)));
    }
    let (output, _) = train_cli(dir.path(), "typo", &["--augment", "crop=[0.4,1]"]);
    refused(&output, "augmentation has no parameter 'crop'; its parameters: ");
    refused(&output, "crop_scale");
    refused(&train_cli(dir.path(), "inverted", &["--augment", "crop_scale=[0.9,0.2]"]).0, "crop_scale must satisfy");
    refused(&train_cli(dir.path(), "likely", &["--augment", "flip_p=2"]).0, "flip_p must be in [0, 1], got 2");
}

/// `bench train` times our step and the reference's once per round and reports each side's
/// median over the rounds. The reference interpreter here is a stand-in script that logs each
/// call and answers 2, 6 and then 4 seconds: the median is 4 s, so 8 images give 2.0 images/s.
#[test]
fn bench_train_reports_the_median_of_its_rounds_for_both_sides() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let python = dir.path().join("python");
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> {calls}\nn=$(wc -l < {calls})\n\
         case $n in 1) s=2;; 2) s=6;; *) s=4;; esac\n\
         echo \"{{\\\"median_seconds\\\": $s}}\"\n",
        calls = calls.display()
    );
    std::fs::write(&python, script).unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_contrastive"))
        .args(["bench", "train", "--methods", "simclr", "--batch-size", "8", "--steps", "1", "--rounds", "3"])
        .args(["--reference", "on", "--python"])
        .arg(&python)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("median of 3 rounds"), "{stdout}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(calls.lines().count(), 3, "{calls}");
    assert!(calls.lines().all(|line| line.contains("--method simclr --batch 8 --steps 1")), "{calls}");
    let row: Vec<&str> = stdout.lines().find(|l| l.starts_with("simclr")).unwrap().split_whitespace().collect();
    assert_eq!(row[2], "2.0", "PyTorch images/s in {row:?}");
    // Ours is printed to 0.1 images/s, the ratio to 0.01.
    let (ours, ratio): (f64, f64) = (row[1].parse().unwrap(), row[3].parse().unwrap());
    assert!((ratio - 4.0 * ours / 8.0).abs() < 0.05 * 4.0 / 8.0 + 0.005, "ratio in {row:?}");
}

/// `init_from` starts a new run from another run's weights (every variable and buffer as
/// saved, the step count at 0) and records where they came from; weights of another shape are
/// refused by name before the new run writes anything.
#[test]
fn a_run_can_start_from_another_runs_weights() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    train(&tiny_config("simclr"), &options(&first, false, None)).unwrap();

    let mut config = tiny_config("simclr");
    config.init_from = Some(first.clone());
    config.seed = 7;
    let second = dir.path().join("second");
    let state = train(&config, &options(&second, false, Some(0))).unwrap();
    assert_eq!(state.progress.step, 0);
    let (a, b) = (weights(&first), weights(&second));
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let same = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "{name} is not the first run's");
    }
    assert_eq!(TrainConfig::load(&second.join(checkpoint::CONFIG_FILE)).unwrap().init_from, Some(first.clone()));
    // A model version's weights file works the same way (the folder or the file itself).
    let mut from_file = config.clone();
    from_file.init_from = Some(first.join(checkpoint::WEIGHTS_FILE));
    train(&from_file, &options(&dir.path().join("third"), false, Some(0))).unwrap();

    let mut wider = tiny_config("simclr");
    wider.encoder = ResNetConfig { widths: vec![8, 16, 32], ..ResNetConfig::canonical(1) }.into();
    wider.init_from = Some(first.clone());
    let refused = dir.path().join("refused");
    let err = format!("{:#}", train(&wider, &options(&refused, false, None)).unwrap_err());
    assert!(err.contains("cannot start from") && err.contains("has shape"), "{err}");
    assert!(!refused.join(checkpoint::CONFIG_FILE).exists(), "the refused run wrote its config");
}
