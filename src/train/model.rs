//! A method with its parameters, built from a run config: what the training loop trains, what
//! evaluation encodes with, what export turns into ONNX and what fine-tune jobs start from.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use contrastive_kernels::Backend;

use super::arch::init::seeded_var_builder;
use super::arch::methods::{self, Method, MethodParts};
use super::augment::contrastive_crop::object_box;
use super::augment::crop::CropBox;
use super::checkpoint;
use super::config::TrainConfig;
use super::loader::{BatchLoader, LoaderConfig};
use super::optim::Optimizer;
use crate::data::Dataset;
use crate::eval::{self, EvalReport};

/// Images encoded at once when computing features for evaluation.
const ENCODE_BATCH: usize = 512;

pub struct Model {
    pub config: TrainConfig,
    pub varmap: VarMap,
    pub method: Box<dyn Method>,
    pub device: Device,
}

/// Which figures [`Model::evaluate`] computes beyond the k-NN accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalScope {
    pub linear_probe: bool,
    /// Alignment and uniformity of two augmented views of the test images.
    pub alignment: bool,
    /// Test images as queries against the training images.
    pub retrieval: bool,
    /// k-means of the test images' features against their labels.
    pub clustering: bool,
    /// k-NN accuracy of many-, medium- and few-shot classes (long-tailed training splits).
    pub shots: bool,
}

impl EvalScope {
    pub const KNN: Self =
        Self { linear_probe: false, alignment: false, retrieval: false, clustering: false, shots: false };
    pub const FULL: Self =
        Self { linear_probe: true, alignment: true, retrieval: true, clustering: true, shots: false };
}

impl Model {
    /// Builds the networks with fresh, seeded weights and the fast CPU kernels.
    pub fn new(config: &TrainConfig, device: &Device) -> Result<Self> {
        Self::with_backend(config, device, Backend::default())
    }

    /// [`Model::new`] with the layers running `backend` (benchmarks compare the two).
    pub fn with_backend(config: &TrainConfig, device: &Device, backend: Backend) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let method = methods::build(
            &config.method,
            &MethodParts {
                vb: seeded_var_builder(&varmap, config.seed, device),
                varmap: &varmap,
                encoder: &config.encoder,
                projector_dims: &config.projector_dims,
                seed: config.seed,
                backend,
            },
        )?;
        Ok(Self { config: config.clone(), varmap, method, device: device.clone() })
    }

    /// Rebuilds the model of a run folder and loads its latest checkpoint.
    pub fn load(run_dir: &Path, device: &Device) -> Result<Self> {
        let config = TrainConfig::load(&run_dir.join(checkpoint::CONFIG_FILE))?;
        let mut model = Self::new(&config, device)?;
        let buffers = checkpoint::load_weights(run_dir, &model.varmap, device)?;
        model.method.load_buffers(&buffers)?;
        Ok(model)
    }

    /// The run's optimiser over every trainable parameter (see [`Model::optimizer_over`]).
    pub fn optimizer(&self) -> Optimizer {
        self.optimizer_over(methods::trainable_vars(&self.varmap))
    }

    /// The run's optimiser over `params` (fine-tuning trains a subset), with the method's
    /// learning-rate multipliers (a faster predictor for SimSiam) and gradient clip.
    pub fn optimizer_over(&self, params: Vec<(String, Var)>) -> Optimizer {
        let mut optimizer = Optimizer::new(self.config.optimizer.clone(), params)
            .with_gradient_clip(self.config.gradient_clip)
            .with_weight_decay_schedule(self.config.weight_decay_end);
        for (prefix, factor) in self.config.method.learning_rate_scales() {
            optimizer.scale_learning_rate(prefix, factor);
        }
        optimizer
    }

    /// The encoder's features of every image, in evaluation mode, `[N, feature_dim]`.
    pub fn encode(&self, dataset: &Dataset) -> Result<Tensor> {
        let encoder = self.method.encoder();
        Ok(eval::encode(dataset, &self.device, ENCODE_BATCH, |x| encoder.forward_t(x, false))?)
    }

    /// The field's protocol on frozen encoder features: weighted k-NN (k = 200, T = 0.1) of the
    /// `test` images against the `train` images, plus what `scope` asks for: a linear probe, and
    /// alignment/uniformity (Wang & Isola 2020) of two augmented views of the test images.
    pub fn evaluate(&self, train: &Dataset, test: &Dataset, scope: EvalScope) -> Result<EvalReport> {
        Ok(self.evaluate_with_outcomes(train, test, scope)?.0)
    }

    /// [`Self::evaluate`], and whether the k-NN classifies each `test` image right: the
    /// per-image outcomes behind its accuracy, for paired comparisons of two models.
    pub fn evaluate_with_outcomes(
        &self,
        train: &Dataset,
        test: &Dataset,
        scope: EvalScope,
    ) -> Result<(EvalReport, Vec<bool>)> {
        let (train_features, test_features) = (self.encode(train)?, self.encode(test)?);
        let classes = train.num_classes();
        let knn_outcomes = eval::knn_outcomes(
            &train_features,
            &train.labels,
            &test_features,
            &test.labels,
            classes,
            &eval::KnnConfig::default(),
        )?;
        let mut report = EvalReport {
            knn_accuracy: eval::accuracy_of(&knn_outcomes),
            linear_probe_accuracy: None,
            alignment: None,
            uniformity: None,
            retrieval: None,
            clustering: None,
            cluster_head: None,
            shots: None,
        };
        if scope.linear_probe {
            let probe = eval::linear_probe(
                &train_features,
                &train.labels,
                &test_features,
                &test.labels,
                classes,
                &eval::ProbeConfig::default(),
            )?;
            report.linear_probe_accuracy = Some(probe.test_accuracy);
        }
        if scope.retrieval {
            let report_of = eval::retrieval(&train_features, &train.labels, &test_features, &test.labels, classes)?;
            report.retrieval = Some(report_of);
        }
        if scope.shots {
            report.shots = Some(eval::shot_accuracy(&knn_outcomes, &test.labels, &train.labels, classes)?);
        }
        if scope.clustering {
            report.clustering = Some(eval::clustering(&test_features, &test.labels, classes, self.config.seed)?);
            if let Some(clusters) = self.method.cluster_assignments(&test_features)? {
                report.cluster_head = Some(eval::partition_scores(&test.labels, &clusters.to_vec1::<u32>()?)?);
            }
        }
        if scope.alignment {
            let (a, b) = self.augmented_pair_features(test)?;
            report.alignment = Some(eval::alignment(&a, &b, 2.0)?);
            report.uniformity = Some(eval::uniformity(&a, 2.0)?);
        }
        Ok((report, knn_outcomes))
    }

    /// Each image's object box for ContrastiveCrop: the bounding box of the encoder's last feature
    /// map, summed over channels, where it reaches `threshold` of its range (evaluation mode).
    pub fn object_boxes(&self, dataset: &Dataset, threshold: f32) -> Result<Vec<CropBox>> {
        let encoder = self.method.encoder().as_resnet().context("ContrastiveCrop needs a ResNet encoder")?;
        let heatmaps = eval::encode(dataset, &self.device, ENCODE_BATCH, |x| {
            encoder.feature_map_t(x, false)?.sum(1)?.flatten_from(1)
        })?;
        let (_, rows, columns) = encoder
            .feature_map_t(
                &Tensor::zeros(
                    (1, dataset.shape.channels, dataset.shape.height, dataset.shape.width),
                    DType::F32,
                    &self.device,
                )?,
                false,
            )?
            .sum(1)?
            .dims3()?;
        let (height, width) = (dataset.shape.height, dataset.shape.width);
        Ok(heatmaps
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            .iter()
            .map(|map| object_box(map, rows, columns, threshold, height, width))
            .collect())
    }

    /// Features of two augmented views of (up to 2,048 of) the images, for alignment.
    fn augmented_pair_features(&self, dataset: &Dataset) -> Result<(Tensor, Tensor)> {
        let subset = Arc::new(dataset.head(2048));
        let config = LoaderConfig {
            batch_size: subset.len(),
            seed: self.config.seed ^ 0xa11,
            shuffle: false,
            drop_last: false,
            prefetch: 1,
            object_boxes: None,
        };
        let pipelines = super::loader::view_pipelines(&self.config.augment);
        let batch =
            BatchLoader::spawn(subset.clone(), pipelines, config, 0).next().context("no batch for alignment")?;
        let mut features = Vec::new();
        for view in &batch.views {
            let images = Dataset { images: view.clone(), ..(*subset).clone() };
            features.push(contrastive_kernels::l2_normalize(&self.encode(&images)?)?);
        }
        Ok((features[0].clone(), features[1].clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageShape;
    use crate::train::arch::MethodConfig;
    use crate::train::arch::ResNetConfig;

    #[test]
    fn object_boxes_lie_in_the_image_and_follow_the_object() {
        let shape = ImageShape::new(1, 28, 28);
        let mut config = TrainConfig::for_method(MethodConfig::default_for("simclr").unwrap(), shape);
        config.encoder = ResNetConfig { widths: vec![8, 16, 16], ..ResNetConfig::canonical(1) }.into();
        let model = Model::new(&config, &Device::Cpu).unwrap();
        // A bright square in the top-left corner of a black image, and a plain image.
        let mut images = vec![0f32; 2 * 784];
        for y in 2..10 {
            for x in 2..10 {
                images[y * 28 + x] = 1.0;
            }
        }
        images[784..].fill(0.5);
        let data = Dataset::new(images, vec![0, 0], shape, vec!["x".into()]).unwrap();
        let boxes = model.object_boxes(&data, 0.1).unwrap();
        for b in &boxes {
            assert!(b.height > 0 && b.width > 0 && b.top + b.height <= 28 && b.left + b.width <= 28, "{b:?}");
        }
        // The square's box starts at the top left; the plain image's heatmap is flat except at the
        // borders (zero padding), so its box is large.
        assert!(boxes[0].top < 10 && boxes[0].left < 10, "{:?}", boxes[0]);
    }
}
