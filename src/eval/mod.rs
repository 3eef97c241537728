//! Layer 5, the application layer: how good an encoder is, measured on frozen features.
//!
//! The field's protocol (see `docs/taxonomy.md`):
//! a weighted k-NN classifier ([`knn_accuracy`]), a linear probe ([`linear_probe`]), the
//! alignment / uniformity pair of Wang & Isola 2020 ([`alignment`], [`uniformity`]),
//! retrieval of training images by test images ([`retrieval`]), k-means clustering of the
//! features scored against the labels ([`clustering`], on [`kmeans`]), many/medium/few-shot
//! accuracy after a long-tailed training split ([`shots`]), and the uncertainty of
//! a held-out figure and of a paired change ([`uncertainty`]).
//! Every function takes features as `[N, D]` candle tensors on any device and L2-normalises
//! them itself, so callers pass the backbone's raw features.

pub mod alignment;
pub mod clustering;
pub mod features;
pub mod kmeans;
pub mod knn;
pub mod linear_probe;
pub mod retrieval;
pub mod shots;
pub mod uncertainty;

pub use alignment::{alignment, uniformity};
pub use clustering::{clustering, partition_scores, ClusteringReport};
pub use features::encode;
pub use knn::{accuracy_of, knn_accuracy, knn_outcomes, knn_predict, KnnConfig};
pub use linear_probe::{linear_probe, ProbeConfig, ProbeResult};
pub use retrieval::{retrieval, RetrievalReport};
pub use shots::{shot_accuracy, ShotAccuracy};

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The evaluation figures the trainer logs and stores in a run's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Test accuracy of the weighted k-NN classifier ([`knn_accuracy`]).
    pub knn_accuracy: f64,
    /// Test accuracy of a linear classifier on the frozen, normalised features.
    pub linear_probe_accuracy: Option<f64>,
    /// `E‖f(x)−f(x⁺)‖²` over positive pairs ([`alignment`]); lower is better.
    pub alignment: Option<f64>,
    /// `log E e^{−2‖f(x)−f(y)‖²}` ([`uniformity`]); lower is better.
    pub uniformity: Option<f64>,
    /// Test images as queries against the training images ([`retrieval`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<RetrievalReport>,
    /// k-means of the test images' features, scored against their labels ([`clustering`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clustering: Option<ClusteringReport>,
    /// The method's own cluster head's assignments of the test images, scored the same way
    /// (methods with a cluster head: Contrastive Clustering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_head: Option<ClusteringReport>,
    /// k-NN accuracy by training frequency, for long-tailed training splits ([`shot_accuracy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shots: Option<ShotAccuracy>,
}

/// The reference an encoder should beat: k-NN, retrieval and clustering on the raw pixels (each
/// image flattened to one vector), under the same protocol as the encoder's features.
pub fn raw_pixel_report(train: &crate::data::Dataset, test: &crate::data::Dataset) -> Result<EvalReport> {
    let pixels =
        |d: &crate::data::Dataset| Tensor::from_slice(&d.images, (d.len(), d.shape.numel()), &candle_core::Device::Cpu);
    let (train_pixels, test_pixels) = (pixels(train)?, pixels(test)?);
    let classes = train.num_classes();
    let knn_accuracy =
        knn_accuracy(&train_pixels, &train.labels, &test_pixels, &test.labels, classes, &KnnConfig::default())?;
    let retrieval = retrieval(&train_pixels, &train.labels, &test_pixels, &test.labels, classes)?;
    let clustering = clustering(&test_pixels, &test.labels, classes, 0)?;
    Ok(EvalReport {
        knn_accuracy,
        linear_probe_accuracy: None,
        alignment: None,
        uniformity: None,
        retrieval: Some(retrieval),
        clustering: Some(clustering),
        cluster_head: None,
        shots: None,
    })
}

/// Rows of a `[N, D]` matrix scaled to unit L2 norm, as `F32`; zero rows stay zero.
pub(crate) fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    ensure!(x.rank() == 2, "features must be a [N, D] matrix, got shape {:?}", x.shape());
    Ok(contrastive_kernels::l2_normalize(&x.to_dtype(DType::F32)?)?)
}

/// Checks that `features` has one row per label and that every label is below `num_classes`.
pub(crate) fn check_labels(what: &str, features: &Tensor, labels: &[u32], num_classes: usize) -> Result<()> {
    ensure!(features.rank() == 2, "{what} features must be a [N, D] matrix, got shape {:?}", features.shape());
    let rows = features.dim(0)?;
    ensure!(rows == labels.len(), "{what} features have {rows} rows but there are {} labels", labels.len());
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= num_classes) {
        anyhow::bail!("{what} label {bad} is not below num_classes = {num_classes}");
    }
    Ok(())
}
