//! `manifest.json`: what a model version is, how to feed it, how it was made and how good it is.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::eval::EvalReport;
use crate::train::arch::{ResNetConfig, VitConfig};
use crate::train::config::TrainConfig;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MODEL_FILE: &str = "model.onnx";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// The name of every exported encoder's input.
pub const INPUT_NAME: &str = "image";
/// Bumped when a field changes meaning; readers refuse versions they do not know.
pub const MANIFEST_FORMAT: u32 = 1;
/// The largest input side a manifest may declare: the server allocates inputs of this size.
pub const MAX_INPUT_SIDE: usize = 1024;
pub const MAX_EMBEDDING_DIMENSIONS: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub architecture: Architecture,
    pub input: InputSpec,
    pub output: OutputSpec,
    pub training: TrainingSummary,
    /// Test-set evaluation of the encoder, when one was run.
    pub evaluation: Option<EvalReport>,
    pub parity: ParityReport,
    /// Where the weights came from: a run folder, or a fine-tune job.
    pub source: String,
    /// The fine-tune job that published this version, if one did: after a crash, the job's
    /// record is reconciled with what it published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_job: Option<String>,
    /// Size and SHA-256 of each file of the version, checked when a server loads it.
    pub files: BTreeMap<String, FileDigest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// The encoder family: "resnet" or "vit"; its sizes are in the field of that name.
    pub encoder: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resnet: Option<ResNetConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vit: Option<VitConfig>,
    pub encoder_parameters: usize,
    /// The projection head, kept in `weights.safetensors` for fine-tuning (not in the ONNX graph).
    pub projector_dims: Vec<usize>,
}

/// Channel layout the model expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Gray,
    Rgb,
}

impl ChannelOrder {
    pub fn for_channels(channels: usize) -> Result<Self> {
        match channels {
            1 => Ok(Self::Gray),
            3 => Ok(Self::Rgb),
            n => anyhow::bail!("models take 1 (gray) or 3 (RGB) channels, not {n}"),
        }
    }
}

/// How an image becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// The ONNX input's name; its shape is `[batch, channels, height, width]`, float32.
    pub name: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub channel_order: ChannelOrder,
    /// Decoded images are resized to `height × width` with this filter.
    pub resize: String,
    /// Pixel values are multiplied by this (1/255: inputs lie in [0, 1]); no mean/std shift.
    pub scale: f32,
}

impl InputSpec {
    /// The values a tensor input may hold: pixels 0..255 times the scale.
    pub fn value_range(&self) -> (f32, f32) {
        // Rounded so that a scale of 1/255 in f32 gives exactly 1.
        (0.0, ((255.0 * self.scale as f64 * 1e6).round() / 1e6) as f32)
    }

    /// The input the trainer's encoders take: an `image` of `channels × height × width` in
    /// [0, 1], resized bilinearly.
    pub fn image(channels: usize, height: usize, width: usize) -> Result<Self> {
        Ok(Self {
            name: INPUT_NAME.into(),
            channels,
            height,
            width,
            channel_order: ChannelOrder::for_channels(channels)?,
            resize: "bilinear".into(),
            scale: 1.0 / 255.0,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub name: String,
    pub dimensions: usize,
    /// Whether the graph itself L2-normalises the embedding.
    pub l2_normalized: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    pub method: String,
    pub loss: String,
    /// The pair strategies applied, in order (`--pairs`), where there were any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pairs: Vec<String>,
    /// The data it was trained on, in words.
    pub data: String,
    pub epochs: usize,
    pub steps: usize,
    pub batch_size: usize,
    /// The full run configuration, so that the encoder can be rebuilt for fine-tuning.
    pub config: TrainConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParityReport {
    /// The largest |candle − ONNX Runtime| over every case.
    pub max_abs_diff: f32,
    pub tolerance: f32,
    pub onnxruntime_version: String,
    pub cases: Vec<ParityCase>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParityCase {
    /// "random" or "images".
    pub input: String,
    pub batch: usize,
    pub max_abs_diff: f32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

impl FileDigest {
    pub fn of_file(path: &Path) -> Result<Self> {
        let (bytes, sha256) = crate::files::sha256_file(path)?;
        Ok(Self { bytes, sha256 })
    }
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    /// A manifest from its JSON text, refused unless it is of the format this program reads.
    pub fn from_json(text: &str) -> Result<Self> {
        let manifest: Self = serde_json::from_str(text).context("not a valid manifest")?;
        anyhow::ensure!(
            manifest.format == MANIFEST_FORMAT,
            "manifest format {}; this program reads format {MANIFEST_FORMAT}",
            manifest.format
        );
        manifest.validate()?;
        Ok(manifest)
    }

    /// Refuses what parses but cannot be served safely: an input the server cannot prepare (or
    /// whose test tensor would not fit in memory), and file names that leave the version's folder.
    fn validate(&self) -> Result<()> {
        super::validate_model_name(&self.name).context("name")?;
        let input = &self.input;
        let order = ChannelOrder::for_channels(input.channels).context("input.channels")?;
        anyhow::ensure!(
            order == input.channel_order,
            "input.channel_order is {:?} for {} channels",
            input.channel_order,
            input.channels
        );
        for (field, side) in [("height", input.height), ("width", input.width)] {
            anyhow::ensure!(
                (1..=MAX_INPUT_SIDE).contains(&side),
                "input.{field} is {side}; models take 1 to {MAX_INPUT_SIDE} pixels a side"
            );
        }
        anyhow::ensure!(input.resize == "bilinear", "input.resize is {:?}; only \"bilinear\" is known", input.resize);
        anyhow::ensure!(
            input.scale > 0.0 && input.scale <= 1.0,
            "input.scale is {}; pixels are scaled by a number in (0, 1]",
            input.scale
        );
        anyhow::ensure!(
            (1..=MAX_EMBEDDING_DIMENSIONS).contains(&self.output.dimensions),
            "output.dimensions is {}; embeddings have 1 to {MAX_EMBEDDING_DIMENSIONS} dimensions",
            self.output.dimensions
        );
        for name in self.files.keys() {
            let plain = Path::new(name).file_name().is_some_and(|f| f == name.as_str()) && !name.starts_with('.');
            anyhow::ensure!(plain, "files: {name:?} is not a plain file name of the version's folder");
        }
        anyhow::ensure!(self.files.contains_key(MODEL_FILE), "files does not list {MODEL_FILE}");
        Ok(())
    }

    /// Checks that every listed file of `dir` has its recorded size and digest.
    pub fn verify_files(&self, dir: &Path) -> Result<()> {
        for (name, expected) in &self.files {
            let actual = FileDigest::of_file(&dir.join(name))?;
            anyhow::ensure!(
                &actual == expected,
                "{} does not match its manifest ({} bytes, sha256 {}; expected {} bytes, sha256 {})",
                dir.join(name).display(),
                actual.bytes,
                actual.sha256,
                expected.bytes,
                expected.sha256
            );
        }
        Ok(())
    }

    /// `[channels, height, width]` of one input image.
    pub fn image_dims(&self) -> [usize; 3] {
        [self.input.channels, self.input.height, self.input.width]
    }
}

/// The current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../models/fmnist-simclr/1/manifest.json");

    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Manifest> {
        let mut value: serde_json::Value = serde_json::from_str(SHIPPED)?;
        edit(&mut value);
        Manifest::from_json(&value.to_string())
    }

    fn refusal(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        format!("{:#}", edited(edit).expect_err("the edited manifest must be refused"))
    }

    #[test]
    fn the_shipped_manifest_is_accepted() -> Result<()> {
        let manifest = Manifest::from_json(SHIPPED)?;
        assert_eq!(manifest.image_dims(), [1, 28, 28]);
        assert_eq!(manifest.input.value_range(), (0.0, 1.0));
        Ok(())
    }

    #[test]
    fn file_names_outside_the_version_folder_are_refused() {
        for name in ["../../etc/passwd", "/etc/shadow", "sub/model.onnx", "..", ".hidden", ""] {
            let message = refusal(|m| {
                m["files"][name] = serde_json::json!({"bytes": 1, "sha256": "00"});
            });
            assert!(message.contains("not a plain file name"), "{name:?}: {message}");
        }
        let message = refusal(|m| {
            m["files"].as_object_mut().unwrap().remove(MODEL_FILE);
        });
        assert!(message.contains("does not list model.onnx"), "{message}");
    }

    #[test]
    fn inputs_the_server_cannot_prepare_are_refused() {
        // A 10⁶ × 10⁶ input would make the server allocate 4 TB for its test inference.
        let message = refusal(|m| m["input"]["height"] = 1_000_000.into());
        assert!(message.contains("input.height is 1000000"), "{message}");
        assert!(refusal(|m| m["input"]["width"] = 0.into()).contains("input.width is 0"));
        assert!(refusal(|m| m["input"]["channels"] = 2.into()).contains("input.channels"));
        assert!(refusal(|m| m["input"]["channels"] = 3.into()).contains("channel_order is Gray for 3 channels"));
        assert!(refusal(|m| m["input"]["scale"] = (-1.0).into()).contains("input.scale is -1"));
        assert!(refusal(|m| m["input"]["scale"] = 1e38.into()).contains("input.scale is 1"));
        assert!(refusal(|m| m["input"]["resize"] = "lanczos".into()).contains("input.resize"));
        assert!(refusal(|m| m["output"]["dimensions"] = 0.into()).contains("output.dimensions is 0"));
        assert!(refusal(|m| m["name"] = "../x".into()).contains("name"));
        assert!(refusal(|m| m["format"] = 2.into()).contains("manifest format 2"));
    }
}
