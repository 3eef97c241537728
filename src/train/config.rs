//! The run configuration: everything that describes a training run, written to `config.json` in
//! the run folder so that a checkpoint can be rebuilt, resumed, evaluated and exported.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::arch::{EncoderConfig, MethodConfig, ResNetConfig};
use super::augment::AugmentConfig;
use super::optim::OptimizerConfig;
use crate::data::{self, Dataset, ImageShape};

/// Where the images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "kebab-case")]
pub enum DataSource {
    /// MNIST-format IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-…`), e.g. Fashion-MNIST.
    MnistIdx { dir: PathBuf },
    /// `root/<class>/*.png|jpg`, or `root/train/<class>/…` and `root/test/<class>/…`; images are
    /// converted and resized to `shape`.
    ImageFolder { root: PathBuf, shape: ImageShape },
}

impl DataSource {
    pub fn fashion_mnist() -> Self {
        Self::MnistIdx { dir: PathBuf::from(data::idx::FASHION_MNIST_DIR) }
    }

    /// The shape of the images the encoder takes.
    pub fn image_shape(&self) -> ImageShape {
        match self {
            Self::MnistIdx { .. } => ImageShape::new(1, data::idx::IMAGE_SIDE, data::idx::IMAGE_SIDE),
            Self::ImageFolder { shape, .. } => *shape,
        }
    }

    /// The training set and, where there is one, the test set.
    pub fn load(&self) -> Result<(Dataset, Option<Dataset>)> {
        match self {
            Self::MnistIdx { dir } => {
                let train = data::idx::load_mnist_format_dir(dir, data::idx::Split::Train)?;
                let test = data::idx::load_mnist_format_dir(dir, data::idx::Split::Test)?;
                Ok((train, Some(test)))
            }
            Self::ImageFolder { root, shape } => {
                let (train_dir, test_dir) = (root.join("train"), root.join("test"));
                if train_dir.is_dir() && test_dir.is_dir() {
                    let train = data::image_folder::load_image_folder(&train_dir, *shape)?;
                    let test = data::image_folder::load_image_folder(&test_dir, *shape)?;
                    ensure!(
                        train.class_names == test.class_names,
                        "{} and {} must hold the same class folders",
                        train_dir.display(),
                        test_dir.display()
                    );
                    Ok((train, Some(test)))
                } else {
                    Ok((data::image_folder::load_image_folder(root, *shape)?, None))
                }
            }
        }
    }
}

/// How often and how the trainer measures k-NN accuracy during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorConfig {
    /// Evaluate k-NN after every this many epochs (0: never during training).
    pub knn_every_epochs: usize,
    /// Use at most this many training images as the k-NN memory bank (all when `None`).
    pub knn_train_limit: Option<usize>,
    /// Use at most this many test images (all when `None`).
    pub knn_test_limit: Option<usize>,
    /// Log the loss every this many steps.
    pub log_every_steps: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self { knn_every_epochs: 1, knn_train_limit: None, knn_test_limit: None, log_every_steps: 10 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub method: MethodConfig,
    pub encoder: EncoderConfig,
    /// Projection head sizes after the encoder's feature, e.g. `[128, 64]`.
    pub projector_dims: Vec<usize>,
    /// One augmentation pipeline per view.
    pub augment: Vec<AugmentConfig>,
    pub optimizer: OptimizerConfig,
    /// Peak learning rate (after warm-up), for `batch_size`.
    pub learning_rate: f64,
    pub warmup_epochs: f64,
    /// Bound on each parameter's gradient norm ([`super::optim::Optimizer::with_gradient_clip`]); none by
    /// default, 3.0 for DINO on a ViT as the paper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_clip: Option<f64>,
    /// Weight decay at the end of training, reached from the optimiser's by a half cosine
    /// ([`super::optim::Optimizer::with_weight_decay_schedule`]); none: constant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay_end: Option<f64>,
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub data: DataSource,
    /// Use only the first this many training images (quick runs and tests).
    pub train_limit: Option<usize>,
    /// Train on a long-tailed split at this imbalance ratio (see [`data::long_tail`]); the
    /// evaluation then reports many/medium/few-shot accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_tail: Option<f64>,
    /// Start from these weights (a run folder, a model version's folder or a weights file)
    /// instead of a random initialisation: a longer run of a trained model with a new
    /// schedule. The optimiser state and the step count start fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    pub monitor: MonitorConfig,
}

impl TrainConfig {
    /// The defaults for a method on Fashion-MNIST-sized images: the canonical encoder, a
    /// 128→128→64 projector, cosine decay, and the method's optimiser (see
    /// [`TrainConfig::default_optimizer`]).
    pub fn for_method(method: MethodConfig, input: ImageShape) -> Self {
        let patches = method.patch_grid();
        let encoder: EncoderConfig = ResNetConfig { patches, ..ResNetConfig::canonical(input.channels) }.into();
        let optimizer = Self::default_optimizer(&method, &encoder);
        let gradient_clip = Self::default_gradient_clip(&method, &encoder);
        let epochs = 3;
        Self {
            gradient_clip,
            warmup_epochs: Self::default_warmup_epochs(&method, &encoder, epochs),
            weight_decay_end: None,
            augment: method.view_augmentations(),
            learning_rate: optimizer.default_learning_rate(),
            optimizer,
            method,
            encoder,
            projector_dims: vec![128, 64],
            epochs,
            batch_size: 256,
            seed: 0,
            data: DataSource::fashion_mnist(),
            train_limit: None,
            long_tail: None,
            init_from: None,
            monitor: MonitorConfig::default(),
        }
    }

    /// The same run with another encoder, and that encoder's default optimiser and learning rate.
    pub fn with_encoder(mut self, encoder: EncoderConfig) -> Self {
        self.optimizer = Self::default_optimizer(&self.method, &encoder);
        self.learning_rate = self.optimizer.default_learning_rate();
        self.gradient_clip = Self::default_gradient_clip(&self.method, &encoder);
        self.warmup_epochs = Self::default_warmup_epochs(&self.method, &encoder, self.epochs);
        self.encoder = encoder;
        self
    }

    /// DINO on a ViT warms its learning rate up over the first tenth of the run (the paper's
    /// 10 of 100 epochs): on the test subset, without it, or with the teacher's τ_t warm-up
    /// in its place, the small ViT drifts to uniform outputs (`docs/taxonomy.md`). A share, so
    /// it follows `--epochs`; nothing else warms up by default.
    pub fn default_warmup_epochs(method: &MethodConfig, encoder: &EncoderConfig, epochs: usize) -> f64 {
        match (method, encoder) {
            (MethodConfig::Dino { .. }, EncoderConfig::Vit(_)) => epochs as f64 / 10.0,
            _ => 0.0,
        }
    }

    /// DINO's ViT recipe clips each parameter's gradient at norm 3.0 (Caron et al. 2021,
    /// `--clip_grad`); nothing else clips by default.
    pub fn default_gradient_clip(method: &MethodConfig, encoder: &EncoderConfig) -> Option<f64> {
        match (method, encoder) {
            (MethodConfig::Dino { .. }, EncoderConfig::Vit(_)) => Some(3.0),
            _ => None,
        }
    }

    /// SGD with momentum 0.9 and weight decay 5e-4 (the PyTorch reference recipe), except:
    /// BYOL trains with LARS and weight decay 1.5e-6 (Grill et al. 2020, appendix C), and
    /// SimSiam with weight decay 5e-3: with the plain recipe both stay below a random-init
    /// encoder's k-NN on short schedules (the measurements are in `docs/taxonomy.md`).
    /// A ViT trains with AdamW and weight decay 0.05 whatever the method, as DeiT, DINO and
    /// MoCo v3 train theirs: attention layers do not train well with plain SGD.
    pub fn default_optimizer(method: &MethodConfig, encoder: &EncoderConfig) -> OptimizerConfig {
        match method {
            _ if matches!(encoder, EncoderConfig::Vit(_)) => OptimizerConfig::adamw(0.05),
            MethodConfig::Byol { .. } | MethodConfig::MocoV3 { .. } | MethodConfig::Dino { .. } => {
                OptimizerConfig::lars(1.5e-6)
            }
            MethodConfig::Simsiam { .. } => OptimizerConfig::sgd(0.9, 5e-3),
            _ => OptimizerConfig::sgd(0.9, 5e-4),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.encoder.validate()?;
        ensure!(
            self.batch_size >= 2,
            "batch size must be at least 2 (contrastive losses need negatives), got {}",
            self.batch_size
        );
        ensure!(self.epochs >= 1, "epochs must be at least 1");
        ensure!(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            "learning rate must be positive, got {}",
            self.learning_rate
        );
        ensure!(
            self.warmup_epochs >= 0.0 && self.warmup_epochs.is_finite(),
            "warm-up epochs must be a number >= 0, got {}",
            self.warmup_epochs
        );
        if let Some(max_norm) = self.gradient_clip {
            ensure!(
                max_norm > 0.0 && max_norm.is_finite(),
                "the gradient clip must be a positive norm, got {max_norm}"
            );
        }
        if let Some(end) = self.weight_decay_end {
            ensure!(end >= 0.0 && end.is_finite(), "the final weight decay must be ≥ 0, got {end}");
        }
        ensure!(!self.projector_dims.is_empty(), "the projector needs at least one layer size");
        if let Some(ratio) = self.long_tail {
            ensure!(ratio >= 1.0 && ratio.is_finite(), "the long-tail imbalance ratio must be at least 1, got {ratio}");
        }
        self.method.validate()?;
        self.method.validate_for(&self.encoder, self.data.image_shape())?;
        if let Some(side) = self.encoder.patch_side() {
            let shape = self.data.image_shape();
            ensure!(
                side <= shape.height.min(shape.width),
                "the encoder's {side}-pixel patches do not fit a {}×{} image",
                shape.height,
                shape.width
            );
        }
        if let Some(grid) = self.method.patch_grid() {
            let patches = self.encoder.as_resnet().and_then(|resnet| resnet.patches);
            ensure!(
                patches == Some(grid),
                "{} embeds images by a grid of {}-pixel patches every {} pixels; the encoder config must have \
                 the same \"patches\" (it has {:?})",
                self.method.name(),
                grid.size,
                grid.stride,
                patches
            );
        }
        ensure!(
            self.encoder.as_resnet().is_some() || self.augment.iter().all(|a| a.contrastive_crop.is_none()),
            "ContrastiveCrop finds objects in the ResNet's last feature map: it needs --encoder resnet, not {}",
            self.encoder.name()
        );
        ensure!(
            self.augment.iter().all(|a| a.contrastive_crop.is_none() || a.output_size.is_none()),
            "ContrastiveCrop cuts views of the image's own size: it cannot make multi-crop's local crops"
        );
        let views = self.method.view_count();
        ensure!(
            self.augment.len() == views,
            "{} trains on {views} views (two, plus the pair strategies' support views and the local crops); got \
             {} augmentation pipelines",
            self.method.name(),
            self.augment.len()
        );
        // After the method's own checks, which name a multi-crop setting by its method.
        for view in &self.augment {
            view.validate()?;
        }
        Ok(())
    }

    /// The training images the run learns from: the long-tailed split when asked for (drawn
    /// from the seed, so evaluation sees the same one), else all of them.
    pub fn long_tail_split(&self, train: Dataset) -> Result<Dataset> {
        match self.long_tail {
            Some(ratio) => train.long_tailed(ratio, self.seed),
            None => Ok(train),
        }
    }

    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        crate::files::write_durably(path, serde_json::to_string_pretty(self)?.as_bytes())
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read run config {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid run config", path.display()))
    }
}

/// A choice written `NAME[:KEY=VALUE...]` on the command line (`mochi:hardest=128:mixes=64`):
/// the defaults `default_for(NAME)` with each KEY set to VALUE (a number, true/false, a JSON
/// array, or text). `what` names the option in errors ("pair strategy", "loss").
pub fn parse_choice<T: Serialize + DeserializeOwned>(
    spec: &str,
    default_for: impl Fn(&str) -> Result<T>,
    what: &str,
) -> Result<T> {
    let (name, settings) = spec.split_once(':').unwrap_or((spec, ""));
    let name = name.trim();
    let mut value = serde_json::to_value(default_for(name)?)?;
    set_fields(&mut value, settings, &format!("{what} {name}"))?;
    serde_json::from_value(value).with_context(|| format!("invalid parameters for {what} '{spec}'"))
}

/// `base` with each field named in `settings`, `KEY=VALUE[:KEY=VALUE...]`, set to its VALUE
/// (as in [`parse_choice`]); an unknown KEY is refused with the fields there are. `what` names
/// the thing set in errors ("augmentation").
pub fn with_settings<T: Serialize + DeserializeOwned>(base: &T, settings: &str, what: &str) -> Result<T> {
    let mut value = serde_json::to_value(base)?;
    set_fields(&mut value, settings, what)?;
    serde_json::from_value(value).with_context(|| format!("invalid {what} '{settings}'"))
}

fn set_fields(value: &mut serde_json::Value, settings: &str, what: &str) -> Result<()> {
    let parts: Vec<&str> = settings.split(':').filter(|part| !part.trim().is_empty()).collect();
    let Some(fields) = value.as_object_mut() else {
        return match parts.first() {
            Some(part) => bail!("{what} takes no parameters, got '{part}'"),
            None => Ok(()),
        };
    };
    for part in parts {
        let Some((key, raw)) = part.split_once('=') else {
            bail!("{what}: expected KEY=VALUE after ':', got '{part}'")
        };
        let key = key.trim();
        if key == "name" || !fields.contains_key(key) {
            let known: Vec<&str> = fields.keys().map(String::as_str).filter(|k| *k != "name").collect();
            match known.is_empty() {
                true => bail!("{what} takes no parameters, got '{key}'"),
                false => bail!("{what} has no parameter '{key}'; its parameters: {}", known.join(", ")),
            }
        }
        let raw = raw.trim();
        let parsed = serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_string()));
        fields.insert(key.to_string(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::pairs::PairStrategy;

    #[test]
    fn a_choice_takes_its_defaults_and_the_parameters_given() {
        let mochi =
            parse_choice("mochi:hardest=128:query_mixes=0", PairStrategy::default_for, "pair strategy").unwrap();
        assert_eq!(mochi, PairStrategy::Mochi { hardest: 128, mixes: 256, query_mixes: 0 });
        let fnc = parse_choice("fnc:attract=true", PairStrategy::default_for, "pair strategy").unwrap();
        assert_eq!(fnc, PairStrategy::Fnc { support_views: 2, false_negatives: 5, attract: true });
    }

    /// Choices that depend on the encoder or the image size are refused by `validate`, which a
    /// run calls before it creates its folder.
    #[test]
    fn choices_that_do_not_fit_the_encoder_or_image_are_refused() {
        let refused = |spec: &str| {
            let method = parse_choice(spec, MethodConfig::default_for, "method").unwrap();
            TrainConfig::for_method(method, ImageShape::new(1, 28, 28)).validate().unwrap_err().to_string()
        };
        assert!(refused("selfcon:exit_stage=3").contains("exit_stage must be in 1..=2"));
        assert!(refused("cpc:patch=29").contains("no 29×29 patch"));
        assert!(refused("cpc:prediction_steps=3").contains("make 3 rows"));
        assert!(refused("pirl:grid=1").contains("1×1 jigsaw"));
        let mut cpc = TrainConfig::for_method(MethodConfig::default_for("cpc").unwrap(), ImageShape::new(1, 28, 28));
        cpc.validate().unwrap();
        cpc.encoder = ResNetConfig::canonical(1).into();
        assert!(cpc.validate().unwrap_err().to_string().contains("\"patches\""));

        // The ViT: methods and options built on ResNet feature maps refuse it, naming both.
        let shape = ImageShape::new(1, 28, 28);
        let with_vit = |spec: &str| {
            let method = parse_choice(spec, MethodConfig::default_for, "method").unwrap();
            TrainConfig::for_method(method, shape).with_encoder(EncoderConfig::default_for("vit", shape).unwrap())
        };
        assert_eq!(with_vit("selfcon").validate().unwrap_err().to_string(), "selfcon needs --encoder resnet, not vit");
        assert_eq!(with_vit("cpc").validate().unwrap_err().to_string(), "cpc needs --encoder resnet, not vit");
        let mut crop = with_vit("simclr");
        crop.validate().unwrap();
        assert!(matches!(crop.optimizer, OptimizerConfig::AdamW { .. }), "a ViT trains with AdamW by default");
        assert_eq!(crop.gradient_clip, None);
        assert_eq!(with_vit("dino").gradient_clip, Some(3.0), "DINO's ViT recipe clips at 3.0");
        let dino = TrainConfig::for_method(MethodConfig::default_for("dino").unwrap(), shape);
        assert_eq!(dino.gradient_clip, None, "the ResNet recipe does not clip");
        // DINO on a ViT warms up over a tenth of the run; the ResNet and other methods do not.
        assert_eq!(with_vit("dino").warmup_epochs, 0.3);
        assert_eq!(dino.warmup_epochs, 0.0);
        assert_eq!(crop.warmup_epochs, 0.0);
        let mut long = TrainConfig::for_method(MethodConfig::default_for("dino").unwrap(), shape);
        long.epochs = 30;
        assert_eq!(long.with_encoder(EncoderConfig::default_for("vit", shape).unwrap()).warmup_epochs, 3.0);
        let mut unwarmed = with_vit("dino");
        unwarmed.warmup_epochs = -1.0;
        assert!(unwarmed.validate().unwrap_err().to_string().contains("warm-up epochs must be a number >= 0, got -1"));
        let mut clipped = with_vit("dino");
        clipped.gradient_clip = Some(-1.0);
        assert!(clipped.validate().unwrap_err().to_string().contains("positive norm, got -1"));
        let mut decayed = with_vit("dino");
        decayed.weight_decay_end = Some(-0.4);
        assert!(decayed.validate().unwrap_err().to_string().contains("final weight decay must be ≥ 0, got -0.4"));
        crop.augment[0].contrastive_crop = Some(Default::default());
        assert!(crop.validate().unwrap_err().to_string().contains("ContrastiveCrop"));
        assert!(with_vit("pirl:grid=9")
            .validate()
            .unwrap_err()
            .to_string()
            .contains("smaller than the encoder's 4-pixel"));

        // Multi-crop: DINO's local crops add views; a ViT needs them at least a patch wide, and
        // ContrastiveCrop cannot cut them.
        let local = with_vit("dino:local_crops=4");
        assert_eq!(local.augment.len(), 6);
        assert_eq!(local.augment[5].output_size, Some(12));
        local.validate().unwrap();
        let err = with_vit("dino:local_crops=2:local_size=3").validate().unwrap_err().to_string();
        assert!(err.contains("3-pixel local crops are smaller than the encoder's 4-pixel patches"), "{err}");
        let mut crop = local.clone();
        crop.augment[4].contrastive_crop = Some(Default::default());
        crop.encoder = ResNetConfig::canonical(1).into();
        assert!(crop.validate().unwrap_err().to_string().contains("cannot make multi-crop's local crops"));

        // A SwAV or DINO config written before multi-crop reads with none; the settings sit
        // beside the method's other parameters in config.json.
        let old: MethodConfig = serde_json::from_str(
            r#"{"name": "swav", "prototypes": 100, "temperature": 0.1, "epsilon": 0.05,
                "sinkhorn_iterations": 3, "freeze_prototypes_steps": 100}"#,
        )
        .unwrap();
        assert_eq!(old, MethodConfig::default_for("swav").unwrap());
        let json = serde_json::to_value(MethodConfig::default_for("dino").unwrap()).unwrap();
        assert_eq!((json["local_crops"].as_u64(), json["local_size"].as_u64()), (Some(0), Some(12)));

        // SwAV takes the same settings, checked the same way.
        let swav = with_vit("swav:local_crops=6:local_size=16:local_scale=[0.1,0.5]");
        assert_eq!(swav.augment.len(), 8);
        assert_eq!((swav.augment[7].output_size, swav.augment[7].crop_scale), (Some(16), (0.1, 0.5)));
        swav.validate().unwrap();
        let err = with_vit("swav:local_crops=2:local_scale=[0.5,0.1]").validate().unwrap_err().to_string();
        assert!(err.contains("swav: local_scale must satisfy 0 < min <= max <= 1, got [0.5, 0.1]"), "{err}");
    }

    /// Every method's default run passes validation, its views' augmentation included.
    #[test]
    fn every_method_default_is_valid() {
        let shape = ImageShape::new(1, 28, 28);
        for name in MethodConfig::NAMES {
            let config = TrainConfig::for_method(MethodConfig::default_for(name).unwrap(), shape);
            config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// Settings replace only the fields they name; a bad one is refused with the fields there are.
    #[test]
    fn settings_change_the_named_fields_only() {
        let base = AugmentConfig::simclr();
        let changed = with_settings(&base, "crop_scale=[0.4, 1]:blur_p=0.5", "augmentation").unwrap();
        assert_eq!(changed, AugmentConfig { crop_scale: (0.4, 1.0), blur_p: 0.5, ..base.clone() });
        assert_eq!(with_settings(&base, "", "augmentation").unwrap(), base);
        let err = with_settings(&base, "blur=1", "augmentation").unwrap_err().to_string();
        assert!(
            err.starts_with("augmentation has no parameter 'blur'; its parameters: ") && err.contains("crop_scale")
        );
        let err = with_settings(&base, "blur_p", "augmentation").unwrap_err().to_string();
        assert!(err.contains("expected KEY=VALUE"), "{err}");
        let mut inverted = base.clone();
        inverted.crop_scale = (0.9, 0.2);
        let err = inverted.validate().unwrap_err().to_string();
        assert_eq!(err, "augmentation: crop_scale must satisfy 0 < min <= max <= 1, got [0.9, 0.2]");
        let err = AugmentConfig { crop_ratio: (2.0, 0.5), ..base.clone() }.validate().unwrap_err().to_string();
        assert_eq!(err, "augmentation: crop_ratio must satisfy 0 < min <= max, got [2, 0.5]");
        let err = AugmentConfig { hue: 0.7, ..base.clone() }.validate().unwrap_err().to_string();
        assert_eq!(err, "augmentation: hue must be in [0, 0.5], got 0.7");
        let err = AugmentConfig { contrast: -1.0, ..base }.validate().unwrap_err().to_string();
        assert_eq!(err, "augmentation: contrast must be a strength >= 0, got -1");
    }

    #[test]
    fn a_wrong_parameter_is_named_with_the_known_ones() {
        let err = |spec| parse_choice(spec, PairStrategy::default_for, "pair strategy").unwrap_err();
        let e = err("mochi:hard=3").to_string();
        assert!(e.contains("'hard'") && e.contains("hardest"), "{e}");
        let e = format!("{:#}", err("mochi:hardest=many"));
        assert!(e.contains("mochi:hardest=many"), "{e}");
        let e = err("mochi:hardest").to_string();
        assert!(e.contains("KEY=VALUE"), "{e}");
        let e = err("nearest").to_string();
        assert!(e.contains("unknown pair strategy 'nearest'"), "{e}");
    }
}
