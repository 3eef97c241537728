//! The instance losses a contrasting method can train with (`--loss` on SimCLR and MoCo v2), each
//! scoring a [`Contrast`] built by the method and rewritten by its pair strategies.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{dcl, dclw, hinge, info_nce};
use crate::train::pairs::Contrast;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum ContrastLoss {
    /// InfoNCE / NT-Xent ([`info_nce`]).
    #[default]
    InfoNce,
    /// Decoupled contrastive loss (Yeh et al. 2022): no positive in the denominator.
    Dcl,
    /// DCL with von Mises–Fisher weights on the positives, width `sigma`.
    Dclw { sigma: f64 },
    /// Max-margin (Shah et al. 2022): each negative a `margin` below the positive.
    Hinge { margin: f64 },
    /// DirectCLR (Jing, Vincent, LeCun, Tian, "Understanding Dimensional Collapse in Contrastive
    /// Self-supervised Learning", ICLR 2022): no projector; InfoNCE on the first `dims`
    /// dimensions of the representation itself. The paper keeps 360 of ResNet-50's 2,048; 32 of
    /// the canonical encoder's 128 is a similar share.
    #[serde(rename = "directclr")]
    DirectClr { dims: usize },
}

impl ContrastLoss {
    pub const NAMES: [&'static str; 5] = ["info-nce", "dcl", "dclw", "hinge", "directclr"];

    /// The papers' defaults (DCLW σ 0.5); the hinge's margin 0.5 is a quarter of the cosine range.
    pub fn default_for(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "info-nce" | "nt-xent" => Self::InfoNce,
            "dcl" => Self::Dcl,
            "dclw" => Self::Dclw { sigma: 0.5 },
            "hinge" => Self::Hinge { margin: 0.5 },
            "directclr" => Self::DirectClr { dims: 32 },
            other => anyhow::bail!("unknown contrastive loss '{other}': expected one of {}", Self::NAMES.join(", ")),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::InfoNce => "info-nce",
            Self::Dcl => "dcl",
            Self::Dclw { .. } => "dclw",
            Self::Hinge { .. } => "hinge",
            Self::DirectClr { .. } => "directclr",
        }
    }

    /// The loss of `contrast` at `temperature` (the hinge has none).
    pub fn loss(&self, contrast: &Contrast, temperature: f64) -> Result<Tensor> {
        match self {
            Self::InfoNce | Self::DirectClr { .. } => info_nce(contrast, temperature),
            Self::Dcl => dcl(contrast, temperature),
            Self::Dclw { sigma } => dclw(contrast, temperature, *sigma),
            Self::Hinge { margin } => hinge(contrast, *margin),
        }
    }

    /// DirectCLR's representation width, where the loss reads the encoder directly.
    pub fn direct_dims(&self) -> Option<usize> {
        match self {
            Self::DirectClr { dims } => Some(*dims),
            _ => None,
        }
    }
}
