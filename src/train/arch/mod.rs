//! Layer 3, architectures: layers, encoders (ResNet, ViT), heads, momentum updates, and one file per method.
//! The fast CPU ops under the layers are the `contrastive-kernels` crate.

pub mod batch_norm;
pub mod context;
pub mod conv;
pub mod conv_bn;
pub mod ema;
pub mod encoder;
pub mod heads;
pub mod init;
pub mod methods;
pub mod resnet;
pub mod vit;

pub use ema::EmaPairs;
pub use encoder::{Encoder, EncoderConfig};
pub use heads::{Mlp, MlpConfig, Prototypes, WeightNormLinear};
pub use methods::{Method, MethodConfig, MultiCrop, SupervisedLoss};
pub use resnet::{PatchGrid, ResNet, ResNetConfig};
pub use vit::{Vit, VitConfig};
