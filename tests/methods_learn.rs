//! Every method trained for a few hundred steps on the committed Fashion-MNIST subset must beat
//! the k-NN accuracy of the same encoder at random initialisation by a clear margin.
//!
//! The methods without negatives (BYOL, SimSiam) and SwAV get 420 steps instead of 210: they
//! start slower, and with the plain SGD recipe BYOL and SimSiam stayed below the random-init
//! k-NN even then (their defaults now carry the fixes: LARS for BYOL, a 10× faster predictor
//! and weight decay 5e-3 for SimSiam). Margins measured at 420 steps with seeds 0 / 1: BYOL
//! +0.032 / +0.044, SimSiam +0.058 / +0.088, SwAV +0.070 / +0.062; each asserted margin is at
//! most two thirds of the smaller one (500 test images: 0.02 is 10 images).
//!
//! A run's margin depends on the seed more than on anything else: any change in how the kernels
//! round (the implicit-GEMM convolutions, say) moves it by several points. Measured with those
//! kernels, seeds 0 / 1 / 2: SimCLR +0.030 / +0.116 / +0.112 (seed 0's random init scores
//! 0.512, the others 0.498 and 0.474), BYOL +0.004 / +0.076 / +0.038. These two are therefore
//! judged on the mean margin of seeds 0 and 1.
//!
//! The clustering methods and PaCo, 210 steps, seeds 0 / 1: Contrastive Clustering +0.064 /
//! +0.106, PaCo +0.120 / +0.120, DeepCluster (30 clusters, re-clustered every 5 epochs of 15
//! steps) +0.004 / +0.082, so DeepCluster is judged on the mean of the two as well; PCL (300
//! steps, the first 2 epochs warm-up, clusterings of 20 and 50) +0.060 / +0.118; HCSC (the same,
//! levels of 50 and 20) +0.028 / +0.096.
//!
//! MoCo v3 and DINO, 210 steps, seed 0, LARS: +0.032 each (MoCo v3 with SGD −0.066; DINO
//! without batch norm in its head, or with SGD, collapses to −0.08 to −0.15). On a ViT of width 64
//! (random init 0.398, AdamW): SimCLR +0.116, MoCo v3 +0.062 with its frozen patch projection
//! (−0.012 without). DINO on that ViT needs all of its defaults: the teacher held at τ_t 0.04,
//! a learning-rate warm-up over a tenth of the run and 420 steps: +0.072 (with 3 warm-up epochs
//! instead of 2.8, seeds 0 / 1: +0.058 / +0.072); without the warm-up −0.012, after 210 steps
//! −0.006, and with the paper's τ_t warm-up to 0.07 it drifts to uniform outputs (−0.048).
//! DINO's ResNet test keeps 210 steps (τ_t 0.04: +0.050; the warm-up to 0.07: +0.032).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use contrastive::data::ImageShape;
use contrastive::train::arch::{EncoderConfig, MethodConfig, ResNetConfig, VitConfig};
use contrastive::train::config::{parse_choice, DataSource, TrainConfig};
use contrastive::train::loss::ContrastLoss;
use contrastive::train::pairs::PairStrategy;
use contrastive::train::run::{train, TrainOptions};
use contrastive::train::{EvalScope, Model};

fn subset() -> DataSource {
    DataSource::MnistIdx { dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset") }
}

/// A narrower ResNet than the canonical one, with the method's patch grid (CPC's).
fn small_resnet(method: &MethodConfig) -> EncoderConfig {
    ResNetConfig { widths: vec![16, 32, 64], patches: method.patch_grid(), ..ResNetConfig::canonical(1) }.into()
}

/// A narrower encoder than the canonical one keeps the test quick on two cores.
fn small_config(method: &str) -> TrainConfig {
    let mut config = TrainConfig::for_method(MethodConfig::default_for(method).unwrap(), ImageShape::new(1, 28, 28));
    config.encoder = small_resnet(&config.method);
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
    if let MethodConfig::Pcl { queue_size, clusters, warmup_epochs, .. } = &mut config.method {
        // MoCo's settings above, and clusterings at 2 and 5 times the classes after 2 epochs.
        *queue_size = 512;
        *clusters = vec![20, 50];
        *warmup_epochs = 2;
        config.epochs = 20;
    }
    if let MethodConfig::Hcsc { queue_size, clusters, warmup_epochs, .. } = &mut config.method {
        // As PCL: a hierarchy of 50 and 20 clusters after 2 epochs.
        *queue_size = 512;
        *clusters = vec![50, 20];
        *warmup_epochs = 2;
        config.epochs = 20;
    }
    if let MethodConfig::Deepcluster { clusters, recluster_every_epochs } = &mut config.method {
        *clusters = 30; // 10 to a cluster on the ~1,000-image subset, as the paper's 10x over-clustering
        *recluster_every_epochs = 5; // epochs of 15 steps leave a fresh classifier too few
    }
    if matches!(config.method, MethodConfig::Byol { .. } | MethodConfig::Simsiam { .. } | MethodConfig::Swav { .. }) {
        config.epochs = 28; // 420 steps
    }
    config
}

fn knn_accuracy(model: &Model) -> f64 {
    let (train, test) = subset().load().unwrap();
    model.evaluate(&train, &test.unwrap(), EvalScope::KNN).unwrap().knn_accuracy
}

/// `method` with the pair strategies `pairs` (`--pairs` syntax) and the loss `loss`.
fn with_pairs(method: &str, pairs: &str, loss: &str) -> TrainConfig {
    choose_pairs(small_config(method), pairs, loss)
}

/// `config` with the pair strategies `pairs` (`--pairs` syntax) and the loss `loss`.
fn choose_pairs(mut config: TrainConfig, pairs: &str, loss: &str) -> TrainConfig {
    let (chosen_pairs, chosen_loss) = match &mut config.method {
        MethodConfig::Simclr { pairs, loss, .. }
        | MethodConfig::MocoV2 { pairs, loss, .. }
        | MethodConfig::Pcl { pairs, loss, .. } => (pairs, loss),
        other => panic!("{} takes no pair strategies", other.name()),
    };
    *chosen_loss = parse_choice(loss, ContrastLoss::default_for, "loss").unwrap();
    *chosen_pairs = pairs
        .split(',')
        .filter(|spec| !spec.is_empty())
        .map(|spec| parse_choice(spec, PairStrategy::default_for, "pair strategy").unwrap())
        .collect();
    config.augment = config.method.view_augmentations();
    config.validate().unwrap();
    config
}

/// Trains `method` from `seed` and returns (k-NN at random init, k-NN after training).
fn train_and_measure(method: &str, seed: u64) -> (f64, f64) {
    train_config_and_measure(TrainConfig { seed, ..small_config(method) })
}

fn train_config_and_measure(config: TrainConfig) -> (f64, f64) {
    let pairs: Vec<&str> = config.method.pair_strategies().iter().map(PairStrategy::name).collect();
    let method = format!("{} (loss {}, pairs {pairs:?})", config.method.name(), config.method.loss_name());
    let seed = config.seed;
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
    let state = train(&config, &options).unwrap();
    assert!(state.finished);
    let trained = knn_accuracy(&Model::load(dir.path(), &Device::Cpu).unwrap());
    let losses: Vec<f64> = state.loss_history.iter().map(|&(_, loss)| loss).collect();
    eprintln!(
        "{method}, seed {seed}: k-NN {random:.3} at random init, {trained:.3} after {} steps; loss {:.3} -> {:.3}",
        state.progress.step,
        losses[0],
        losses[losses.len() - 1]
    );
    (random, trained)
}

/// Trained with `pairs` and `loss` from seed 0, `method` must beat its random init by `margin`.
fn assert_pairs_beat_random_init(method: &str, pairs: &str, loss: &str, margin: f64) {
    let (random, trained) = train_config_and_measure(with_pairs(method, pairs, loss));
    assert!(
        trained - random >= margin,
        "{method} --pairs {pairs} --loss {loss}: k-NN {trained:.3} is not {margin} above random init's {random:.3}"
    );
}

/// The mean over `seeds` of (trained − random-init k-NN) must reach `margin`.
fn assert_beats_random_init(method: &str, margin: f64, seeds: &[u64]) {
    let margins: Vec<f64> = seeds
        .iter()
        .map(|&seed| {
            let (random, trained) = train_and_measure(method, seed);
            trained - random
        })
        .collect();
    let mean = margins.iter().sum::<f64>() / margins.len() as f64;
    assert!(
        mean >= margin,
        "{method}: k-NN margins over random init {margins:.3?} (seeds {seeds:?}) average below {margin}"
    );
}

#[test]
fn simclr_learns() {
    assert_beats_random_init("simclr", 0.04, &[0, 1]);
}

#[test]
fn moco_v2_learns() {
    assert_beats_random_init("moco-v2", 0.04, &[0]);
}

#[test]
fn supcon_learns() {
    assert_beats_random_init("supcon", 0.05, &[0]);
}

#[test]
fn byol_learns() {
    assert_beats_random_init("byol", 0.02, &[0, 1]);
}

#[test]
fn simsiam_learns() {
    assert_beats_random_init("simsiam", 0.04, &[0]);
}

#[test]
fn swav_learns() {
    assert_beats_random_init("swav", 0.04, &[0]);
}

#[test]
fn deepcluster_learns() {
    assert_beats_random_init("deepcluster", 0.025, &[0, 1]);
}

#[test]
fn contrastive_clustering_learns() {
    assert_beats_random_init("cc", 0.04, &[0]);
}

#[test]
fn paco_learns() {
    assert_beats_random_init("paco", 0.08, &[0]);
}

#[test]
fn pcl_learns() {
    // Seed 0 fell from +0.060 to +0.032 when MoCo's InfoNCE became the general contrast form
    // (the same sums in another order): judged on the mean of seeds 0 and 1 (+0.032 / +0.108),
    // as SimCLR.
    assert_beats_random_init("pcl", 0.04, &[0, 1]);
}

#[test]
fn hcsc_learns() {
    assert_beats_random_init("hcsc", 0.018, &[0]);
}

// Pair strategies and losses (issue 14), seed 0, on the settings above: SimCLR 210 steps,
// MoCo v2 300 steps with a 512-key queue. Margins measured: debiased +0.072, MoCHi +0.060, FNC
// +0.032, NNCLR +0.042, MixCo +0.082, Mixup +0.078, hard pairs (SimCLR) +0.058, DCL +0.046,
// hinge +0.066, DirectCLR +0.110,
// against plain SimCLR's
// +0.030 at this seed (see the top of the file); each asserted margin is about two thirds of
// the measured one.

#[test]
fn simclr_with_debiased_negatives_learns() {
    assert_pairs_beat_random_init("simclr", "debiased", "info-nce", 0.04);
}

#[test]
fn moco_v2_with_hard_negative_mixing_learns() {
    // MoCHi's proportions for the 512-key queue: the hardest 32, 32 mixes and 8 with the query.
    assert_pairs_beat_random_init("moco-v2", "mochi:hardest=32:mixes=32:query_mixes=8", "info-nce", 0.04);
}

#[test]
fn simclr_with_feature_space_hard_pairs_learns() {
    // On SimCLR every candidate is someone's positive, so only the positives are extrapolated
    // (no queue keys to interpolate): +0.058. On MoCo v2 (with the interpolated queue) the
    // k-NN stays at random init's after 300 steps: 0.514 against 0.512 with one coefficient per
    // sample, 0.504 with one per dimension.
    assert_pairs_beat_random_init("simclr", "hard-pairs", "info-nce", 0.04);
}

#[test]
fn simclr_with_false_negative_cancellation_learns() {
    // One support view keeps the test's cost at 1.5 times plain SimCLR's.
    assert_pairs_beat_random_init("simclr", "fnc:support_views=1:false_negatives=2", "info-nce", 0.02);
}

#[test]
fn simclr_with_nearest_neighbour_positives_learns() {
    // A support set of half the ~1,000 images, filled after 4 steps.
    assert_pairs_beat_random_init("simclr", "nnclr:support_size=512", "info-nce", 0.025);
}

#[test]
fn simclr_with_mixed_positives_learns() {
    assert_pairs_beat_random_init("simclr", "mixco", "info-nce", 0.04);
}

#[test]
fn simclr_with_mixup_hard_negatives_learns() {
    assert_pairs_beat_random_init("simclr", "mixup:hardest=16", "info-nce", 0.04);
}

#[test]
fn simclr_with_the_other_losses_learns() {
    for loss in ["dcl", "hinge", "directclr"] {
        assert_pairs_beat_random_init("simclr", "", loss, 0.03);
    }
}

// CMC and the synchronous asymmetric methods (issue 14), 210 steps, seed 0, at their defaults.
// Margins measured: SelfCon +0.038, CMC +0.032, PIRL +0.064, CPC +0.044; asserted about half
// (one seed each keeps CI's time; a kernel change moves a margin by a few points). The
// defaults that got there, measured with `any_method_spec` below: CMC with the paper's one
// crop for both sources −0.018; PIRL at τ 0.2 −0.020 (random bank start) and −0.012
// (bank from the untrained network); CPC with 10-pixel patches every 6 −0.056 (τ 0.2) and
// −0.046 (τ 0.1), 7 every 7 +0.052 from a random init of 0.430.

#[test]
fn selfcon_learns() {
    assert_beats_random_init("selfcon", 0.02, &[0]);
}

#[test]
fn cmc_learns() {
    assert_beats_random_init("cmc", 0.015, &[0]);
}

#[test]
fn pirl_learns() {
    assert_beats_random_init("pirl", 0.035, &[0]);
}

#[test]
fn cpc_learns() {
    assert_beats_random_init("cpc", 0.025, &[0]);
}

#[test]
fn moco_v3_learns() {
    assert_beats_random_init("moco-v3", 0.015, &[0]);
}

#[test]
fn dino_learns() {
    assert_beats_random_init("dino", 0.015, &[0]);
}

/// The small ViT of these tests: the tiny one at width 64 (4 blocks of 4 heads, 4×4 patches).
fn small_vit() -> EncoderConfig {
    VitConfig { dim: 64, ..VitConfig::tiny(1, 28, 28) }.into()
}

fn small_vit_config(method: &str) -> TrainConfig {
    small_config(method).with_encoder(small_vit())
}

#[test]
fn simclr_learns_with_a_vit() {
    let (random, trained) = train_config_and_measure(small_vit_config("simclr"));
    assert!(trained - random >= 0.06, "simclr on a ViT: k-NN {random:.3} at random init, {trained:.3} trained");
}

#[test]
fn moco_v3_learns_with_a_vit() {
    let (random, trained) = train_config_and_measure(small_vit_config("moco-v3"));
    assert!(trained - random >= 0.03, "moco-v3 on a ViT: k-NN {random:.3} at random init, {trained:.3} trained");
}

/// DINO's ViT defaults (τ_t held at 0.04, a warm-up over a tenth of the run, clipping at 3.0)
/// over 420 steps, as measured in the header.
#[test]
fn dino_learns_with_a_vit() {
    let mut config = small_config("dino");
    config.epochs = 28;
    let (random, trained) = train_config_and_measure(config.with_encoder(small_vit()));
    assert!(trained - random >= 0.035, "dino on a ViT: k-NN {random:.3} at random init, {trained:.3} trained");
}

/// Any method spec, `LEARN_SPEC='cmc:two_crops=false' cargo test --release --test methods_learn
/// -- --ignored any_method_spec --nocapture`, with `LEARN_PAIRS`, `LEARN_LOSS` and `LEARN_ENCODER`
/// (`--pairs`, `--loss` and `--encoder` syntax), `LEARN_LR`, `LEARN_WARMUP` (epochs of 15 steps),
/// `LEARN_EPOCHS`, `LEARN_CLIP` (0: off), `LEARN_WD`, `LEARN_WD_END` (a cosine from LEARN_WD) and
/// `LEARN_SEED`: for measuring a setting before it becomes a default.
#[test]
#[ignore = "a measuring tool, run by hand"]
fn any_method_spec() {
    let env = |name: &str| std::env::var(name).ok();
    let spec = env("LEARN_SPEC").expect("LEARN_SPEC=NAME[:KEY=VALUE...]");
    let method = parse_choice(&spec, MethodConfig::default_for, "method").unwrap();
    let mut config = small_config(method.name());
    config.augment = method.view_augmentations();
    config.method = method;
    config.encoder = small_resnet(&config.method);
    if let Some(spec) = env("LEARN_ENCODER") {
        let shape = ImageShape::new(1, 28, 28);
        config = config
            .with_encoder(parse_choice(&spec, |name| EncoderConfig::default_for(name, shape), "encoder").unwrap());
    }
    if let Some(lr) = env("LEARN_LR") {
        config.learning_rate = lr.parse().expect("LEARN_LR is a number");
    }
    if let Some(epochs) = env("LEARN_EPOCHS") {
        config.epochs = epochs.parse().expect("LEARN_EPOCHS is a whole number");
    }
    config.warmup_epochs = match env("LEARN_WARMUP") {
        Some(warmup) => warmup.parse().expect("LEARN_WARMUP is a number of epochs"),
        None => TrainConfig::default_warmup_epochs(&config.method, &config.encoder, config.epochs),
    };
    if let Some(wd) = env("LEARN_WD") {
        config.optimizer.set_weight_decay(wd.parse().expect("LEARN_WD is a number"));
    }
    if let Some(end) = env("LEARN_WD_END") {
        config.weight_decay_end = Some(end.parse().expect("LEARN_WD_END is a number"));
    }
    if let Some(clip) = env("LEARN_CLIP") {
        let max_norm: f64 = clip.parse().expect("LEARN_CLIP is a norm");
        config.gradient_clip = (max_norm > 0.0).then_some(max_norm);
    }
    config.seed = env("LEARN_SEED").map_or(0, |s| s.parse().expect("LEARN_SEED is a number"));
    if env("LEARN_PAIRS").is_some() || env("LEARN_LOSS").is_some() {
        let loss = env("LEARN_LOSS").unwrap_or_else(|| "info-nce".into());
        config = choose_pairs(config, &env("LEARN_PAIRS").unwrap_or_default(), &loss);
    }
    train_config_and_measure(config);
}
