//! The backbone a method trains and the server serves: a ResNet or a ViT, chosen per run
//! (`--encoder resnet|vit[:KEY=VALUE...]`) and recorded in the run config and the manifest.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use contrastive_export::{GraphBuilder, Result as ExportResult};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use contrastive_kernels::Backend;

use super::resnet::{ResNet, ResNetConfig};
use super::vit::{Vit, VitConfig};
use crate::data::ImageShape;

/// The encoder's architecture and sizes. In JSON, an object with `"name": "resnet"` or
/// `"name": "vit"` beside the sizes; one without a name is a ResNet (run configs and manifests
/// written before the ViT existed).
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderConfig {
    ResNet(ResNetConfig),
    Vit(VitConfig),
}

/// The serialised form: the sizes with the architecture's name beside them.
#[derive(Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
enum Named<T, U> {
    Resnet(T),
    Vit(U),
}

impl Serialize for EncoderConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::ResNet(config) => Named::<_, &VitConfig>::Resnet(config).serialize(serializer),
            Self::Vit(config) => Named::<&ResNetConfig, _>::Vit(config).serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for EncoderConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(deserializer)?;
        if let Some(fields) = value.as_object_mut() {
            fields.entry("name").or_insert_with(|| "resnet".into());
        }
        match serde_json::from_value(value).map_err(serde::de::Error::custom)? {
            Named::Resnet(config) => Ok(Self::ResNet(config)),
            Named::Vit(config) => Ok(Self::Vit(config)),
        }
    }
}

impl From<ResNetConfig> for EncoderConfig {
    fn from(config: ResNetConfig) -> Self {
        Self::ResNet(config)
    }
}

impl From<VitConfig> for EncoderConfig {
    fn from(config: VitConfig) -> Self {
        Self::Vit(config)
    }
}

impl EncoderConfig {
    /// The default sizes of the architecture `name` for images of `shape`: the canonical
    /// ResNet or the tiny ViT.
    pub fn default_for(name: &str, shape: ImageShape) -> anyhow::Result<Self> {
        match name {
            "resnet" => Ok(ResNetConfig::canonical(shape.channels).into()),
            "vit" => Ok(VitConfig::tiny(shape.channels, shape.height, shape.width).into()),
            other => anyhow::bail!("unknown encoder '{other}'; the encoders: resnet, vit"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::ResNet(_) => "resnet",
            Self::Vit(_) => "vit",
        }
    }

    pub fn feature_dim(&self) -> usize {
        match self {
            Self::ResNet(config) => config.feature_dim(),
            Self::Vit(config) => config.feature_dim(),
        }
    }

    pub fn in_channels(&self) -> usize {
        match self {
            Self::ResNet(config) => config.in_channels,
            Self::Vit(config) => config.in_channels,
        }
    }

    /// The same architecture and sizes for images of `channels` channels (CMC's edge encoder).
    pub fn with_in_channels(&self, channels: usize) -> Self {
        match self {
            Self::ResNet(config) => Self::ResNet(ResNetConfig { in_channels: channels, ..config.clone() }),
            Self::Vit(config) => Self::Vit(VitConfig { in_channels: channels, ..config.clone() }),
        }
    }

    /// The units a fine-tune freezes from the bottom: a ResNet's stages, a ViT's blocks.
    pub fn stages(&self) -> usize {
        match self {
            Self::ResNet(config) => config.widths.len(),
            Self::Vit(config) => config.depth,
        }
    }

    /// Which unit of [`EncoderConfig::stages`] a variable of the encoder belongs to, from its
    /// name under the encoder: 1 to `stages()`; 0 for the input layers (the ResNet's stem, the
    /// ViT's embeddings) and `stages() + 1` for the layers after the last (the ViT's norm).
    pub fn stage_of(&self, variable: &str) -> usize {
        let numbered = |prefix: &str| {
            variable.strip_prefix(prefix).and_then(|rest| rest.split('.').next()).and_then(|n| n.parse::<usize>().ok())
        };
        match self {
            Self::ResNet(_) => numbered("stage").unwrap_or(0),
            Self::Vit(config) => match numbered("blocks.") {
                Some(block) => block + 1,
                None if variable.starts_with("norm.") => config.depth + 1,
                None => 0,
            },
        }
    }

    /// The side of the patches the encoder reads, where it reads patches: a ViT's, or those of
    /// a ResNet that embeds a grid of patches (CPC's). Every input must be at least this wide.
    pub fn patch_side(&self) -> Option<usize> {
        match self {
            Self::ResNet(config) => config.patches.map(|grid| grid.size),
            Self::Vit(config) => Some(config.patch),
        }
    }

    /// The ResNet's sizes, for the methods and options built on its feature maps.
    pub fn as_resnet(&self) -> Option<&ResNetConfig> {
        match self {
            Self::ResNet(config) => Some(config),
            Self::Vit(_) => None,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            Self::ResNet(config) => config.validate(),
            Self::Vit(config) => config.validate(),
        }
    }
}

/// A built encoder: `[N, C, H, W]` images to `[N, feature_dim]` features.
#[derive(Debug, Clone)]
pub enum Encoder {
    ResNet(ResNet),
    Vit(Vit),
}

impl Encoder {
    /// The encoder `config` names, its variables under `vb`. `backend` chooses the ResNet's
    /// convolution kernels; the ViT runs candle's matrix products.
    pub fn new(vb: VarBuilder, config: &EncoderConfig, backend: Backend) -> Result<Self> {
        Ok(match config {
            EncoderConfig::ResNet(config) => Self::ResNet(ResNet::new(vb, config, backend)?),
            EncoderConfig::Vit(config) => Self::Vit(Vit::new(vb, config)?),
        })
    }

    pub fn config(&self) -> EncoderConfig {
        match self {
            Self::ResNet(net) => net.config.clone().into(),
            Self::Vit(net) => net.config.clone().into(),
        }
    }

    pub fn feature_dim(&self) -> usize {
        match self {
            Self::ResNet(net) => net.feature_dim(),
            Self::Vit(net) => net.feature_dim(),
        }
    }

    /// The embedding, `[N, feature_dim]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::ResNet(net) => net.forward_t(x, train),
            Self::Vit(net) => net.forward_t(x, train),
        }
    }

    /// Freezes the lowest `stages` units (see [`EncoderConfig::stages`]) for training.
    pub fn freeze_stages(&mut self, stages: Option<usize>) {
        match self {
            Self::ResNet(net) => net.freeze_stages(stages),
            Self::Vit(net) => net.freeze_blocks(stages),
        }
    }

    /// The ResNet, for the methods and options built on its feature maps.
    pub fn as_resnet(&self) -> Option<&ResNet> {
        match self {
            Self::ResNet(net) => Some(net),
            Self::Vit(_) => None,
        }
    }

    /// The encoder in evaluation mode as ONNX nodes reading `input` (`[N, C, H, W]` of `height`
    /// × `width`); returns the `[N, feature_dim]` feature value.
    pub fn to_onnx(&self, g: &mut GraphBuilder, input: &str, height: usize, width: usize) -> ExportResult<String> {
        match self {
            Self::ResNet(net) => net.to_onnx(g, input, height, width),
            Self::Vit(net) => net.to_onnx(g, input, height, width),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_without_a_name_are_resnets_and_round_trip() -> anyhow::Result<()> {
        let old = r#"{"in_channels":1,"widths":[8,16],"blocks":[1,1],"strides":[1,2]}"#;
        let config: EncoderConfig = serde_json::from_str(old)?;
        let expected =
            ResNetConfig { widths: vec![8, 16], blocks: vec![1, 1], strides: vec![1, 2], ..ResNetConfig::canonical(1) };
        assert_eq!(config, expected.clone().into());
        let json = serde_json::to_value(&config)?;
        assert_eq!(json["name"], "resnet");
        assert_eq!(serde_json::from_value::<EncoderConfig>(json)?, config);

        let vit: EncoderConfig = VitConfig::tiny(1, 28, 28).into();
        let json = serde_json::to_value(&vit)?;
        assert_eq!(json["name"], "vit");
        assert_eq!(json["position_grid"], serde_json::json!([7, 7]));
        assert_eq!(serde_json::from_value::<EncoderConfig>(json)?, vit);
        Ok(())
    }

    #[test]
    fn variables_belong_to_the_stage_their_name_says() {
        let resnet: EncoderConfig = ResNetConfig::canonical(1).into();
        assert_eq!(resnet.stage_of("stem.conv.weight"), 0);
        assert_eq!(resnet.stage_of("stage2.block1.bn1.weight"), 2);
        let vit: EncoderConfig = VitConfig::tiny(1, 28, 28).into();
        assert_eq!(vit.stage_of("pos_embed"), 0);
        assert_eq!(vit.stage_of("patch_embed.weight"), 0);
        assert_eq!(vit.stage_of("blocks.0.attn.qkv.weight"), 1);
        assert_eq!(vit.stage_of("blocks.3.mlp.fc2.bias"), 4);
        assert_eq!(vit.stage_of("norm.weight"), 5);
    }

    #[test]
    fn unknown_encoders_name_the_known_ones() {
        let err = EncoderConfig::default_for("vgg", ImageShape::new(1, 28, 28)).unwrap_err().to_string();
        assert_eq!(err, "unknown encoder 'vgg'; the encoders: resnet, vit");
    }
}
