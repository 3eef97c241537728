//! One file per method, each a combination of the pieces in `pairs/`, `augment/`, `arch/` and
//! `loss/`. Every method fits one interface: given a batch of augmented views (and labels, which
//! only supervised methods read), return the loss; after the optimiser step, update whatever is
//! not trained by gradient (momentum encoders, queues, prototypes).
//!
//! | method  | architecture class        | second branch            | pairs              | loss              |
//! |---------|---------------------------|--------------------------|--------------------|-------------------|
//! | SimCLR  | synchronous symmetric     | shared weights           | in-batch negatives | NT-Xent           |
//! | SupCon  | synchronous symmetric     | shared weights           | label positives    | SupCon (L_out)    |
//! |  … KCL  | synchronous symmetric     | shared weights           | k label positives  | SupCon            |
//! |  … TSC  | synchronous symmetric     | shared weights           | k label positives  | SupCon + targets  |
//! |  … BCL  | synchronous symmetric     | shared weights           | labels + centres   | class-averaged    |
//! |  hybrid | synchronous symmetric     | shared weights + classifier | label positives | SupCon → CE       |
//! | PaCo    | synchronous symmetric     | shared weights + centres | labels + centres   | PaCo              |
//! | MoCo v2 | asynchronous symmetric    | momentum encoder         | memory queue       | InfoNCE (queue)   |
//! | MoCo v3 | asynchronous asymmetric   | momentum encoder; predictor | in-batch keys   | InfoNCE × 2τ      |
//! | BYOL    | asynchronous asymmetric   | EMA target + predictor   | positives only     | normalised MSE    |
//! | DINO    | asynchronous asymmetric   | EMA teacher, centred     | positives only     | teacher–student cross-entropy |
//! | SimSiam | asynchronous asymmetric   | stop-gradient + predictor| positives only     | negative cosine   |
//! | SwAV    | clustering                | shared weights           | swapped codes      | swapped prediction|
//! | DeepCluster | clustering            | none (pseudo-labels)     | k-means clusters   | cross-entropy     |
//! | PCL     | clustering (EM on MoCo v2) | momentum encoder        | queue + k-means prototypes | ProtoNCE  |
//! | HCSC    | clustering (on MoCo v2) | momentum encoder         | selected queue + hierarchical prototypes | selective ProtoNCE |
//! | CC      | clustering                | shared weights + cluster head | in-batch instances and clusters | NT-Xent + cluster contrast |
//! | SelfCon | synchronous asymmetric    | sub-network exit head    | in-batch, both exits | InfoNCE (multi-positive) |
//! | CMC     | synchronous, one encoder per source | edge-map encoder | across sources     | cross-view InfoNCE |
//! | PIRL    | synchronous asymmetric    | jigsaw branch            | memory bank        | InfoNCE (bank)    |
//! | CPC v2  | synchronous asymmetric    | causal context network   | patch codes of the batch | InfoNCE (predicted codes) |
//!
//! SimCLR, MoCo v2, PCL, SelfCon, CMC, PIRL and CPC build a [`crate::train::pairs::Contrast`]
//! and so take any instance loss (`--loss`: InfoNCE, DCL, DCLW, hinge; DirectCLR on SimCLR);
//! SimCLR, MoCo v2 and PCL (whose instance part is its MoCo's) also take any stack of pair
//! strategies (`--pairs`: debiased, MoCHi, feature-space hard pairs, FNC, NNCLR, MixCo, Mixup
//! hard negatives).

pub mod byol;
pub mod cc;
pub mod cmc;
pub mod cpc;
pub mod deepcluster;
pub mod dino;
pub mod hcsc;
pub mod moco;
pub mod moco_v3;
pub mod paco;
pub mod pcl;
pub mod pirl;
pub mod selfcon;
pub mod simclr;
pub mod simsiam;
pub mod supcon;
pub mod swav;

pub use supcon::SupervisedLoss;

use candle_core::{Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use contrastive_kernels::Backend;
use serde::{Deserialize, Serialize};

use super::{Encoder, EncoderConfig, Mlp, MlpConfig, PatchGrid};
use crate::data::{Dataset, ImageShape};
use crate::train::augment::patches::grid_starts;
use crate::train::augment::AugmentConfig;
use crate::train::loss::ContrastLoss;
use crate::train::pairs::PairStrategy;

/// Name prefix of the parameters that are not trained by gradient (momentum targets).
pub const TARGET_PREFIX: &str = "target.";

/// A method and its hyper-parameters; the name is the `--method` value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum MethodConfig {
    Simclr {
        temperature: f64,
        /// The instance loss (`--loss`): InfoNCE (NT-Xent) unless chosen.
        #[serde(default)]
        loss: ContrastLoss,
        /// Pair strategies applied in order (`--pairs`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pairs: Vec<PairStrategy>,
    },
    #[serde(rename = "moco-v2")]
    MocoV2 {
        temperature: f64,
        queue_size: usize,
        momentum: f64,
        #[serde(default)]
        loss: ContrastLoss,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pairs: Vec<PairStrategy>,
    },
    /// MoCo v3 (Chen, Xie & He 2021): a predictor on the query branch, in-batch keys from the
    /// momentum branch, no queue.
    #[serde(rename = "moco-v3")]
    MocoV3 {
        temperature: f64,
        /// Momentum of the key branch at the start; it rises to 1 on a cosine schedule.
        base_momentum: f64,
        predictor_hidden: usize,
        /// A ViT's patch projection stays at its random start (the paper's §4.2); a ResNet has
        /// none and ignores it. On the test subset it turns a ViT's k-NN margin over random
        /// init from −0.012 to +0.062.
        #[serde(default)]
        frozen_patch_embedding: bool,
    },
    /// DINO (Caron et al. 2021): self-distillation from an EMA teacher whose outputs are centred
    /// and sharpened.
    Dino {
        /// K, the head's outputs.
        out_dim: usize,
        student_temperature: f64,
        /// τ_t after its warm-up, and where the warm-up starts.
        teacher_temperature: f64,
        warmup_teacher_temperature: f64,
        /// Share of the run over which τ_t rises linearly (DINO: 30 of 100 epochs).
        teacher_warmup: f64,
        /// Momentum of the teacher at the start; it rises to 1 on a cosine schedule.
        base_momentum: f64,
        /// m of the centre's running mean.
        center_momentum: f64,
        /// Share of the run during which the student's last layer stays fixed (DINO: the first
        /// epoch of 100), which steadies the start.
        freeze_last_layer: f64,
        /// Local crops besides the two global views; only the student sees them.
        #[serde(flatten)]
        multi_crop: MultiCrop,
    },
    Byol {
        base_momentum: f64,
        predictor_hidden: usize,
        /// Learning-rate multiplier of the predictor (see [`MethodConfig::learning_rate_scales`]).
        #[serde(default = "unit_scale")]
        predictor_lr_scale: f64,
    },
    Simsiam {
        predictor_hidden: usize,
        #[serde(default = "unit_scale")]
        predictor_lr_scale: f64,
    },
    Swav {
        prototypes: usize,
        temperature: f64,
        epsilon: f64,
        sinkhorn_iterations: usize,
        freeze_prototypes_steps: usize,
        /// Local crops besides the two global views; they predict the global views' codes but
        /// compute none.
        #[serde(flatten)]
        multi_crop: MultiCrop,
    },
    Supcon {
        temperature: f64,
        /// The loss reads the encoder's output (the served embedding) rather than the projection
        /// head's. Khosla et al. train through a head; fine-tunes judged by k-NN retrieval on
        /// the embedding gain twice as much without one (measured in the README).
        #[serde(default)]
        on_embedding: bool,
        /// SupCon or one of its long-tail variants.
        #[serde(default)]
        loss: SupervisedLoss,
    },
    /// Prototypical Contrastive Learning (Li et al. 2021): MoCo v2 plus ProtoNCE over k-means
    /// prototypes of several granularities.
    Pcl {
        temperature: f64,
        queue_size: usize,
        momentum: f64,
        /// The K of each clustering.
        clusters: Vec<usize>,
        /// Epochs of InfoNCE alone before the first clustering.
        warmup_epochs: usize,
        /// The instance part of ProtoNCE (`--loss`) and the pair strategies of its MoCo
        /// (`--pairs`); the prototype term is unchanged.
        #[serde(default)]
        loss: ContrastLoss,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pairs: Vec<PairStrategy>,
    },
    /// Hierarchical Contrastive Selective Coding (Guo et al. 2022): MoCo v2 with hierarchical
    /// prototypes and instance and prototype selection.
    Hcsc {
        temperature: f64,
        queue_size: usize,
        momentum: f64,
        /// Clusters per level, finest first, decreasing.
        clusters: Vec<usize>,
        warmup_epochs: usize,
    },
    /// DeepCluster (Caron et al. 2018): k-means pseudo-labels each epoch, a classifier on them.
    Deepcluster {
        /// k-means clusters; the paper over-clusters (10× the classes).
        clusters: usize,
        /// Cluster again (and re-initialise the classifier) every this many epochs; the paper
        /// does it every epoch, which on a small set leaves the new classifier too few steps.
        #[serde(default = "one_epoch")]
        recluster_every_epochs: usize,
    },
    /// Contrastive Clustering (Li et al. 2021): instance- and cluster-level contrast.
    Cc {
        /// One cluster per class, as in the paper (set from the data when a run starts).
        clusters: usize,
        instance_temperature: f64,
        cluster_temperature: f64,
    },
    /// SelfCon (Bae et al. 2023): a sub-network's exit head on an intermediate stage contrasted
    /// with the full network's head.
    Selfcon {
        temperature: f64,
        /// The stage (from 1) after which the exit path branches off; before the last stage.
        exit_stage: usize,
        /// SelfCon-S: one view, whose two exits are each other's only positive. Default
        /// SelfCon-M: two views, four positives per image.
        #[serde(default)]
        single_view: bool,
        /// The paper's supervised form: the vectors of same-class images are positives too.
        #[serde(default)]
        labels: bool,
        #[serde(default)]
        loss: ContrastLoss,
    },
    /// Contrastive Multiview Coding (Tian et al. 2020): the image and its edge map, one encoder
    /// each, contrasted across sources.
    Cmc {
        temperature: f64,
        /// The edge source reads the sample's second view; false: the image's own view, as
        /// the paper.
        two_crops: bool,
        #[serde(default)]
        loss: ContrastLoss,
    },
    /// PIRL (Misra & van der Maaten 2020): a jigsaw branch and an image branch contrasted with a
    /// memory bank of image representations.
    Pirl {
        temperature: f64,
        /// Bank entries drawn as negatives each step.
        negatives: usize,
        /// μ of the bank's running average.
        bank_momentum: f64,
        /// λ, the jigsaw branch's share of the loss.
        jigsaw_weight: f64,
        /// Cells per side of the jigsaw.
        grid: usize,
        #[serde(default)]
        loss: ContrastLoss,
    },
    /// CPC v2 (Hénaff et al. 2020): a grid of patch codes, a causal context network over rows,
    /// predictions of lower rows' codes.
    Cpc {
        temperature: f64,
        /// Patch side and stride in pixels (the encoder's patch grid).
        patch: usize,
        stride: usize,
        /// Rows predicted ahead.
        prediction_steps: usize,
        context_layers: usize,
        #[serde(default)]
        loss: ContrastLoss,
    },
    /// Parametric contrastive learning (Cui et al. 2021): SupCon plus learnable class centres.
    Paco {
        temperature: f64,
        /// Weight of the sample positives; the class centre weighs `beta`.
        alpha: f64,
        beta: f64,
        classes: usize,
    },
}

impl MethodConfig {
    pub const NAMES: [&'static str; 17] = [
        "simclr",
        "moco-v2",
        "moco-v3",
        "byol",
        "dino",
        "simsiam",
        "swav",
        "deepcluster",
        "pcl",
        "hcsc",
        "cc",
        "selfcon",
        "cmc",
        "pirl",
        "cpc",
        "supcon",
        "paco",
    ];

    /// The defaults for `name` (one of [`MethodConfig::NAMES`]), tuned for small images.
    pub fn default_for(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "simclr" => Self::Simclr { temperature: 0.2, loss: ContrastLoss::InfoNce, pairs: Vec::new() },
            "moco-v2" | "moco" => Self::MocoV2 {
                temperature: 0.2,
                queue_size: 4096,
                momentum: 0.99,
                loss: ContrastLoss::InfoNce,
                pairs: Vec::new(),
            },
            // The paper's τ for ViTs (0.2), starting momentum (0.99) and frozen patch projection.
            "moco-v3" => Self::MocoV3 {
                temperature: 0.2,
                base_momentum: 0.99,
                predictor_hidden: 256,
                frozen_patch_embedding: true,
            },
            "byol" => Self::Byol { base_momentum: 0.99, predictor_hidden: 128, predictor_lr_scale: 1.0 },
            // The reference code's temperatures (τ_t held at 0.04; `teacher_temperature=0.07`
            // gives the paper's warm-up from 0.04 over the first 30 %, which drifted to uniform
            // outputs on a small ViT and trailed on a ResNet: `docs/taxonomy.md`) and centre
            // momentum; K and the teacher's momentum sized for a few epochs of 60,000 small images.
            "dino" => Self::Dino {
                out_dim: 1024,
                student_temperature: 0.1,
                teacher_temperature: 0.04,
                warmup_teacher_temperature: 0.04,
                teacher_warmup: 0.3,
                base_momentum: 0.996,
                center_momentum: 0.9,
                freeze_last_layer: 0.1,
                multi_crop: MultiCrop::default(),
            },
            "simsiam" => Self::Simsiam { predictor_hidden: 32, predictor_lr_scale: 10.0 },
            "swav" => Self::Swav {
                prototypes: 100,
                temperature: 0.1,
                epsilon: 0.05,
                sinkhorn_iterations: 3,
                freeze_prototypes_steps: 100,
                multi_crop: MultiCrop::default(),
            },
            "deepcluster" => Self::Deepcluster { clusters: 100, recluster_every_epochs: 1 },
            // MoCo v2's settings; clusterings at 2, 5 and 10 times the classes, over-clustered as
            // in the paper (which clusters ImageNet's 1.28 M images into 25,000 to 100,000). The
            // paper warms up for a tenth of its 200 epochs; runs of a few epochs here cannot spare
            // one, and a random-init encoder's features already cluster (its k-NN is 0.77).
            "pcl" => Self::Pcl {
                temperature: 0.2,
                queue_size: 4096,
                momentum: 0.99,
                clusters: vec![20, 50, 100],
                warmup_epochs: 0,
                loss: ContrastLoss::InfoNce,
                pairs: Vec::new(),
            },
            // PCL's settings; a hierarchy of 100, 50 and 20 clusters (the paper: 3000-2000-1000
            // on ImageNet).
            "hcsc" => Self::Hcsc {
                temperature: 0.2,
                queue_size: 4096,
                momentum: 0.99,
                clusters: vec![100, 50, 20],
                warmup_epochs: 0,
            },
            // The paper's temperatures (τ_I = 0.5, τ_C = 1).
            "cc" => Self::Cc { clusters: 10, instance_temperature: 0.5, cluster_temperature: 1.0 },
            // SimCLR's temperature; the exit after the second-to-last stage, as the paper's
            // best ResNet exit (after its third of four block groups).
            "selfcon" => Self::Selfcon {
                temperature: 0.2,
                exit_stage: 2,
                single_view: false,
                labels: false,
                loss: ContrastLoss::InfoNce,
            },
            // Each source from its own crop: with the paper's one crop for both, the encoders
            // agree on the sources' shared content only, and 210 steps on the test subset left
            // the k-NN 0.018 below random init's (+0.032 with two crops).
            "cmc" => Self::Cmc { temperature: 0.2, two_crops: true, loss: ContrastLoss::InfoNce },
            // The paper's bank momentum 0.5 and λ 0.5; 4,096 negatives (its 32,000 are 2.5 % of
            // ImageNet, this is 7 % of Fashion-MNIST, MoCo's queue here); a 3×3 jigsaw. τ 0.1,
            // near the paper's 0.07: at the in-batch methods' 0.2 the k-NN on the test subset
            // stayed below random init's after 210 steps (−0.012; +0.064 at 0.1).
            "pirl" => Self::Pirl {
                temperature: 0.1,
                negatives: 4096,
                bank_momentum: 0.5,
                jigsaw_weight: 0.5,
                grid: 3,
                loss: ContrastLoss::InfoNce,
            },
            // A 3×3 grid of 14×14 patches every 7 pixels on 28×28: half-overlapping, as the
            // paper's 64-pixel patches every 32 (on the test subset, 210 steps: +0.044 k-NN over
            // random init; 10-pixel patches every 6 lost 0.046, 7 every 7 gained 0.052 from a
            // random init 0.07 lower). One row ahead (two leave one row of contexts) and τ 0.1.
            "cpc" => Self::Cpc {
                temperature: 0.1,
                patch: 14,
                stride: 7,
                prediction_steps: 1,
                context_layers: 2,
                loss: ContrastLoss::InfoNce,
            },
            "supcon" => Self::Supcon { temperature: 0.1, on_embedding: false, loss: SupervisedLoss::Supcon },
            // The paper's α and β; τ as SupCon's here, so the two compare on one footing.
            "paco" => Self::Paco { temperature: 0.1, alpha: 0.05, beta: 1.0, classes: 10 },
            other => anyhow::bail!("unknown method '{other}': expected one of {}", Self::NAMES.join(", ")),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Simclr { .. } => "simclr",
            Self::MocoV2 { .. } => "moco-v2",
            Self::MocoV3 { .. } => "moco-v3",
            Self::Byol { .. } => "byol",
            Self::Dino { .. } => "dino",
            Self::Simsiam { .. } => "simsiam",
            Self::Swav { .. } => "swav",
            Self::Deepcluster { .. } => "deepcluster",
            Self::Pcl { .. } => "pcl",
            Self::Hcsc { .. } => "hcsc",
            Self::Cc { .. } => "cc",
            Self::Selfcon { .. } => "selfcon",
            Self::Cmc { .. } => "cmc",
            Self::Pirl { .. } => "pirl",
            Self::Cpc { .. } => "cpc",
            Self::Supcon { .. } => "supcon",
            Self::Paco { .. } => "paco",
        }
    }

    /// The loss the method trains with, for manifests and logs.
    pub fn loss_name(&self) -> &'static str {
        match self {
            Self::Simclr { loss: ContrastLoss::InfoNce, .. } => "nt-xent",
            Self::MocoV2 { loss: ContrastLoss::InfoNce, .. } => "info-nce-queue",
            Self::Selfcon { loss: ContrastLoss::InfoNce, .. } => "selfcon-info-nce",
            Self::Cmc { loss: ContrastLoss::InfoNce, .. } => "cmc-cross-view-info-nce",
            Self::Pirl { loss: ContrastLoss::InfoNce, .. } => "pirl-memory-bank-info-nce",
            Self::Cpc { loss: ContrastLoss::InfoNce, .. } => "cpc-info-nce",
            Self::Simclr { loss, .. }
            | Self::MocoV2 { loss, .. }
            | Self::Selfcon { loss, .. }
            | Self::Cmc { loss, .. }
            | Self::Pirl { loss, .. }
            | Self::Cpc { loss, .. } => loss.name(),
            Self::MocoV3 { .. } => "info-nce-in-batch-2tau",
            Self::Byol { .. } => "byol-normalized-mse",
            Self::Dino { .. } => "dino-self-distillation",
            Self::Simsiam { .. } => "simsiam-negative-cosine",
            Self::Swav { .. } => "swav-swapped-prediction",
            Self::Deepcluster { .. } => "pseudo-label-cross-entropy",
            Self::Pcl { loss: ContrastLoss::InfoNce, .. } => "proto-nce",
            Self::Pcl { loss, .. } => loss.name(),
            Self::Hcsc { .. } => "selective-proto-nce",
            Self::Cc { .. } => "nt-xent+cluster-contrast",
            Self::Supcon { loss, .. } => loss.name(),
            Self::Paco { .. } => "paco",
        }
    }

    /// The pair strategies the method applies (`--pairs`), empty for most methods.
    pub fn pair_strategies(&self) -> &[PairStrategy] {
        match self {
            Self::Simclr { pairs, .. } | Self::MocoV2 { pairs, .. } | Self::Pcl { pairs, .. } => pairs,
            _ => &[],
        }
    }

    /// The instance loss of the methods that score a [`crate::train::pairs::Contrast`]
    /// (`--loss`), None for the others.
    pub fn instance_loss(&self) -> Option<&ContrastLoss> {
        match self {
            Self::Simclr { loss, .. }
            | Self::MocoV2 { loss, .. }
            | Self::Selfcon { loss, .. }
            | Self::Cmc { loss, .. }
            | Self::Pirl { loss, .. }
            | Self::Cpc { loss, .. }
            | Self::Pcl { loss, .. } => Some(loss),
            _ => None,
        }
    }

    pub fn instance_loss_mut(&mut self) -> Option<&mut ContrastLoss> {
        match self {
            Self::Simclr { loss, .. }
            | Self::MocoV2 { loss, .. }
            | Self::Selfcon { loss, .. }
            | Self::Cmc { loss, .. }
            | Self::Pirl { loss, .. }
            | Self::Cpc { loss, .. }
            | Self::Pcl { loss, .. } => Some(loss),
            _ => None,
        }
    }

    /// Checks the method's choice of loss and pair strategies against each other.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(loss) = self.instance_loss() {
            anyhow::ensure!(
                loss.direct_dims().is_none() || matches!(self, Self::Simclr { .. }),
                "--loss directclr contrasts the representation without a projector; --method {} keeps its \
                 projector (use simclr)",
                self.name()
            );
        }
        match self {
            Self::Simclr { loss, pairs, .. } => PairStrategy::validate_all(pairs, self.name(), false, loss.name()),
            Self::MocoV2 { loss, pairs, .. } | Self::Pcl { loss, pairs, .. } => {
                PairStrategy::validate_all(pairs, self.name(), true, loss.name())
            }
            _ => Ok(()),
        }
    }

    /// The patch grid the method's encoder embeds images by: CPC's, None for the others.
    pub fn patch_grid(&self) -> Option<PatchGrid> {
        match self {
            Self::Cpc { patch, stride, .. } => Some(PatchGrid { size: *patch, stride: *stride }),
            _ => None,
        }
    }

    /// Checks the choices that depend on the encoder and the image size, so that a run refuses
    /// them before it writes anything: SelfCon's exit stage, PIRL's jigsaw and CPC's patch grid.
    /// SelfCon and CPC are built on the ResNet's stages and patch pooling.
    pub fn validate_for(&self, encoder: &EncoderConfig, shape: ImageShape) -> anyhow::Result<()> {
        let side = shape.height.min(shape.width);
        if matches!(self, Self::Selfcon { .. } | Self::Cpc { .. }) && encoder.as_resnet().is_none() {
            anyhow::bail!("{} needs --encoder resnet, not {}", self.name(), encoder.name())
        }
        if let Some(multi_crop) = self.multi_crop() {
            multi_crop.validate(self.name(), encoder)?;
        }
        match self {
            Self::Selfcon { exit_stage, .. } => selfcon::check_exit_stage(*exit_stage, encoder.stages())?,
            Self::Pirl { grid, .. } => {
                anyhow::ensure!(
                    *grid >= 2 && side / grid >= 1,
                    "pirl: a {grid}×{grid} jigsaw needs a grid of at least 2 and cells of at least one pixel on a \
                     {}×{} image",
                    shape.height,
                    shape.width
                );
                if let Some(patch) = encoder.patch_side() {
                    anyhow::ensure!(
                        side / grid >= patch,
                        "pirl: the {}-pixel cells of a {grid}×{grid} jigsaw are smaller than the encoder's {patch}-pixel \
                         patches",
                        side / grid
                    );
                }
            }
            Self::Cpc { patch, stride, prediction_steps, .. } => {
                let rows = grid_starts(shape.height, *patch, *stride).len();
                let columns = grid_starts(shape.width, *patch, *stride).len();
                anyhow::ensure!(
                    rows > 0 && columns > 0,
                    "cpc: no {patch}×{patch} patch every {stride} pixels fits a {}×{} image",
                    shape.height,
                    shape.width
                );
                anyhow::ensure!(
                    *prediction_steps >= 1 && rows > *prediction_steps,
                    "cpc: {patch}-pixel patches every {stride} pixels make {rows} rows, which leave no row to \
                     predict {prediction_steps} rows ahead (prediction_steps must be 1 to {})",
                    rows.saturating_sub(1)
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Sets the number of classes of the methods and losses that learn one centre, target or
    /// logit per class; the run calls it with its data's class count.
    pub fn set_classes(&mut self, count: usize) {
        match self {
            Self::Paco { classes, .. } | Self::Cc { clusters: classes, .. } => *classes = count,
            Self::Supcon { loss, .. } => {
                if let Some(classes) = loss.classes_mut() {
                    *classes = count;
                }
            }
            _ => {}
        }
    }

    /// Learning-rate multipliers by parameter-name prefix. The predictor of BYOL and SimSiam
    /// must adapt faster than the encoder it predicts: SimSiam keeps its learning rate fixed
    /// while the encoder's decays (Chen & He 2021, §4.1), and Tian et al. 2021 (DirectPred)
    /// show that a relatively faster predictor is what lets the encoder learn. BYOL keeps 1:
    /// LARS's steps are already relative to each layer's norm. The measurements behind both
    /// defaults are in `docs/taxonomy.md`.
    pub fn learning_rate_scales(&self) -> Vec<(&'static str, f64)> {
        match self {
            Self::Byol { predictor_lr_scale, .. } | Self::Simsiam { predictor_lr_scale, .. } => {
                vec![("predictor.", *predictor_lr_scale)]
            }
            _ => Vec::new(),
        }
    }

    /// Whether the method reads labels.
    pub fn is_supervised(&self) -> bool {
        matches!(self, Self::Supcon { .. } | Self::Paco { .. } | Self::Selfcon { labels: true, .. })
    }

    /// The augmentation of each view. BYOL's second view adds solarisation (Grill et al. 2020);
    /// blur is left out everywhere since it erases 28×28 images.
    /// Pair strategies that read support views (FNC) add that many views, augmented like the
    /// others.
    pub fn view_augmentations(&self) -> Vec<AugmentConfig> {
        match self {
            Self::Byol { .. } => {
                vec![AugmentConfig::simclr(), AugmentConfig { solarize_p: 0.2, ..AugmentConfig::simclr() }]
            }
            _ => {
                let mut views = vec![AugmentConfig::simclr(); 2 + self.support_views()];
                views.extend(self.multi_crop().map(MultiCrop::augmentations).unwrap_or_default());
                views
            }
        }
    }

    /// The multi-crop settings of the methods that take local crops (DINO, SwAV).
    pub fn multi_crop(&self) -> Option<&MultiCrop> {
        match self {
            Self::Dino { multi_crop, .. } | Self::Swav { multi_crop, .. } => Some(multi_crop),
            _ => None,
        }
    }

    /// Views per image: two, plus the pair strategies' support views and multi-crop's local
    /// crops.
    pub fn view_count(&self) -> usize {
        2 + self.support_views() + self.multi_crop().map_or(0, |m| m.local_crops)
    }

    /// Extra views per image beyond the two contrasted ones.
    pub fn support_views(&self) -> usize {
        self.pair_strategies().iter().map(PairStrategy::support_views).sum()
    }
}

/// Multi-crop (Caron et al. 2020, SwAV §3.2; DINO uses it too): besides the two global views,
/// `local_crops` small crops per image, `local_size` pixels square, cut from `local_scale` of
/// the image's area. They are cheap views that must agree with the global ones; no target is
/// computed from them. The loader gives each its own size and `Branch::project_views` runs
/// them in one forward pass of their own.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MultiCrop {
    #[serde(default)]
    pub local_crops: usize,
    #[serde(default = "default_local_size")]
    pub local_size: usize,
    #[serde(default = "default_local_scale")]
    pub local_scale: (f32, f32),
}

impl Default for MultiCrop {
    /// No local crops; when asked for, 12-pixel crops of 5–40 % of the image.
    fn default() -> Self {
        Self { local_crops: 0, local_size: default_local_size(), local_scale: default_local_scale() }
    }
}

impl MultiCrop {
    /// The local crops' augmentations (none when `local_crops` is 0).
    pub fn augmentations(&self) -> Vec<AugmentConfig> {
        vec![AugmentConfig::local_crop(self.local_size, self.local_scale); self.local_crops]
    }

    /// Refuses a scale outside (0, 1] and crops smaller than a ViT's patches, naming `method`.
    fn validate(&self, method: &str, encoder: &EncoderConfig) -> anyhow::Result<()> {
        if self.local_crops == 0 {
            return Ok(());
        }
        let (low, high) = self.local_scale;
        anyhow::ensure!(
            0.0 < low && low <= high && high <= 1.0,
            "{method}: local_scale must satisfy 0 < min <= max <= 1, got [{low}, {high}]"
        );
        anyhow::ensure!(self.local_size >= 1, "{method}: local_size must be at least 1 pixel");
        if let Some(side) = encoder.patch_side() {
            anyhow::ensure!(
                self.local_size >= side,
                "{method}: {}-pixel local crops are smaller than the encoder's {side}-pixel patches",
                self.local_size
            );
        }
        Ok(())
    }
}

/// Local crops of 12 pixels: 96/224 of DINO's image side is 11.7 of 28.
fn default_local_size() -> usize {
    12
}

/// DINO's and SwAV's local crop scale.
fn default_local_scale() -> (f32, f32) {
    (0.05, 0.4)
}

fn unit_scale() -> f64 {
    1.0
}

fn one_epoch() -> usize {
    1
}

/// What the trainer needs from a method.
pub trait Method {
    fn config(&self) -> &MethodConfig;

    /// The loss of one batch. `views[v]` holds view `v` of every sample, `[N, C, H, W]`;
    /// `labels` is `[N]` (u32); `indices` are the samples' positions in the training set (for
    /// per-image state such as pseudo-labels). `step` counts optimiser steps from 0.
    fn loss(&mut self, views: &[Tensor], labels: &Tensor, indices: &[usize], step: usize) -> Result<Tensor>;

    /// Work before each epoch with the whole training set (DeepCluster's k-means). Called again
    /// when a run resumes within the epoch, so a method whose work depends on the weights keeps
    /// what it computed in its buffers.
    fn before_epoch(&mut self, _train: &Dataset, _epoch: usize) -> Result<()> {
        Ok(())
    }

    /// Work after each optimiser step; `progress` is the fraction of training done.
    fn after_step(&mut self, _progress: f64) -> Result<()> {
        Ok(())
    }

    /// The method's own clustering of encoder `features` (`[N, feature_dim]`, evaluation mode):
    /// the cluster index of each row, where the method has a cluster head.
    fn cluster_assignments(&self, _features: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The online encoder, whose pooled features are the embedding.
    fn encoder(&self) -> &Encoder;

    /// The online encoder, to freeze its lower stages (see [`Encoder::freeze_stages`]).
    fn encoder_mut(&mut self) -> &mut Encoder;

    /// State that is neither a parameter nor a running statistic (MoCo's queue), for checkpoints.
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    fn load_buffers(&mut self, _buffers: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

/// The networks a method is built from: one `VarMap` holds every parameter and running statistic,
/// named `encoder.*`, `projector.*`, `predictor.*`, `prototypes.*` and `target.*`.
pub struct MethodParts<'a> {
    pub vb: VarBuilder<'a>,
    pub varmap: &'a VarMap,
    pub encoder: &'a EncoderConfig,
    /// The projection head's sizes after the encoder, e.g. `[128, 64]` for 128→128→64.
    pub projector_dims: &'a [usize],
    /// The run's seed, for state that is drawn at random but is not a variable.
    pub seed: u64,
    /// Which implementation the layers run (see [`Backend`]).
    pub backend: Backend,
}

impl MethodParts<'_> {
    pub fn projector_config(&self) -> MlpConfig {
        let mut dims = vec![self.encoder.feature_dim()];
        dims.extend_from_slice(self.projector_dims);
        MlpConfig::new(&dims)
    }

    /// The online branch: encoder and projector.
    pub fn branch(&self, projector: &MlpConfig) -> Result<Branch> {
        Branch::new(self.vb.clone(), self.encoder, projector, self.backend)
    }

    /// A momentum copy of the online branch under [`TARGET_PREFIX`], starting equal to it.
    pub fn target_branch(&self, projector: &MlpConfig) -> Result<(Branch, super::EmaPairs)> {
        let target =
            Branch::new(self.vb.pp(TARGET_PREFIX.trim_end_matches('.')), self.encoder, projector, self.backend)?;
        let all = named_vars(self.varmap);
        let online: Vec<_> = trainable_vars(self.varmap)
            .into_iter()
            .filter(|(n, _)| n.starts_with("encoder.") || n.starts_with("projector."))
            .collect();
        let ema = super::EmaPairs::new(&online, &all, TARGET_PREFIX)?;
        Ok((target, ema))
    }
}

#[cfg(test)]
impl<'a> MethodParts<'a> {
    /// Small parts for unit tests: a projector to 8 then 4 after the encoder, seed 0, candle's
    /// own layers, on the CPU.
    pub(crate) fn for_test(varmap: &'a VarMap, encoder: &'a EncoderConfig) -> Self {
        let vb = VarBuilder::from_varmap(varmap, candle_core::DType::F32, &candle_core::Device::Cpu);
        Self { vb, varmap, encoder, projector_dims: &[8, 4], seed: 0, backend: Backend::Candle }
    }
}

/// Builds the method that `config` names.
pub fn build(config: &MethodConfig, parts: &MethodParts) -> Result<Box<dyn Method>> {
    Ok(match config {
        MethodConfig::Simclr { .. } => Box::new(simclr::SimClr::new(config.clone(), parts)?),
        MethodConfig::MocoV2 { .. } => Box::new(moco::MocoV2::new(config.clone(), parts)?),
        MethodConfig::MocoV3 { .. } => Box::new(moco_v3::MocoV3::new(config.clone(), parts)?),
        MethodConfig::Byol { .. } => Box::new(byol::Byol::new(config.clone(), parts)?),
        MethodConfig::Dino { .. } => Box::new(dino::Dino::new(config.clone(), parts)?),
        MethodConfig::Simsiam { .. } => Box::new(simsiam::SimSiam::new(config.clone(), parts)?),
        MethodConfig::Swav { .. } => Box::new(swav::Swav::new(config.clone(), parts)?),
        MethodConfig::Supcon { .. } => Box::new(supcon::SupCon::new(config.clone(), parts)?),
        MethodConfig::Paco { .. } => Box::new(paco::Paco::new(config.clone(), parts)?),
        MethodConfig::Pcl { .. } => Box::new(pcl::Pcl::new(config.clone(), parts)?),
        MethodConfig::Hcsc { .. } => Box::new(hcsc::Hcsc::new(config.clone(), parts)?),
        MethodConfig::Deepcluster { .. } => Box::new(deepcluster::DeepCluster::new(config.clone(), parts)?),
        MethodConfig::Cc { .. } => Box::new(cc::ContrastiveClustering::new(config.clone(), parts)?),
        MethodConfig::Selfcon { .. } => Box::new(selfcon::SelfCon::new(config.clone(), parts)?),
        MethodConfig::Cmc { .. } => Box::new(cmc::Cmc::new(config.clone(), parts)?),
        MethodConfig::Pirl { .. } => Box::new(pirl::Pirl::new(config.clone(), parts)?),
        MethodConfig::Cpc { .. } => Box::new(cpc::Cpc::new(config.clone(), parts)?),
    })
}

/// An encoder followed by a projection head.
pub struct Branch {
    pub encoder: Encoder,
    pub projector: Mlp,
}

impl Branch {
    pub fn new(vb: VarBuilder, encoder: &EncoderConfig, projector: &MlpConfig, backend: Backend) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), encoder, backend)?,
            projector: Mlp::new(vb.pp("projector"), projector, backend)?,
        })
    }

    /// Projections of every view, one forward pass over each run of consecutive views of the
    /// same size (one large batch keeps the matrix products efficient; multi-crop's global and
    /// local crops go through separately, as in SwAV and DINO); one `[N, D]` tensor per view.
    pub fn project_views(&self, views: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let mut projections = Vec::with_capacity(views.len());
        let mut start = 0;
        while start < views.len() {
            let size = views[start].dims().get(2..).unwrap_or_default();
            let same = views[start..].iter().take_while(|v| v.dims().get(2..).unwrap_or_default() == size).count();
            let group = &views[start..start + same];
            let z = self.projector.forward_t(&self.encoder.forward_t(&Tensor::cat(group, 0)?, train)?, train)?;
            projections.extend(z.chunk(same, 0)?);
            start += same;
        }
        Ok(projections)
    }

    /// As [`Branch::project_views`], but batch norm sees each view in `groups` separate groups
    /// of samples: consecutive ones, or those of `shuffle = (order, inverse)` (MoCo's shuffled BN).
    pub fn project_views_grouped(
        &self,
        views: &[Tensor],
        groups: usize,
        shuffle: Option<&(Tensor, Tensor)>,
    ) -> Result<Vec<Tensor>> {
        views
            .iter()
            .map(|view| {
                let x = match shuffle {
                    Some((order, _)) => view.index_select(order, 0)?,
                    None => view.clone(),
                };
                let parts = x
                    .chunk(groups, 0)?
                    .iter()
                    .map(|part| self.projector.forward_t(&self.encoder.forward_t(part, true)?, true))
                    .collect::<Result<Vec<_>>>()?;
                let z = Tensor::cat(&parts, 0)?;
                match shuffle {
                    Some((_, inverse)) => z.index_select(inverse, 0),
                    None => Ok(z),
                }
            })
            .collect()
    }
}

/// Every variable of the map with its name, sorted by name so that orders are reproducible.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<_> =
        varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The batch-norm running statistics under a name prefix, held still during forward passes
/// whose batches must not move them: PIRL's encoder also sees jigsaw patches, whose statistics
/// are not those of the whole images it serves.
pub struct RunningStats(Vec<Var>);

impl RunningStats {
    pub fn of(varmap: &VarMap, prefix: &str) -> Self {
        Self(
            named_vars(varmap)
                .into_iter()
                .filter(|(n, _)| n.starts_with(prefix) && (n.ends_with("running_mean") || n.ends_with("running_var")))
                .map(|(_, var)| var)
                .collect(),
        )
    }

    /// Runs `forward` and puts the statistics back as they were before it.
    pub fn held<T>(&self, forward: impl FnOnce() -> Result<T>) -> Result<T> {
        let saved = self.0.iter().map(|var| var.as_tensor().copy()).collect::<Result<Vec<_>>>()?;
        let out = forward()?;
        self.0.iter().zip(&saved).try_for_each(|(var, saved)| var.set(saved))?;
        Ok(out)
    }
}

/// The parameters trained by gradient: everything but momentum targets and running statistics.
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    named_vars(varmap)
        .into_iter()
        .filter(|(name, _)| {
            !name.starts_with(TARGET_PREFIX) && !name.ends_with("running_mean") && !name.ends_with("running_var")
        })
        .collect()
}
