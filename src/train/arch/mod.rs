//! Layer 3, architectures: layers, encoders, heads, momentum updates, and one file per method.
//! The fast CPU ops under the layers are the `contrastive-kernels` crate.

pub mod batch_norm;
pub mod context;
pub mod conv;
pub mod conv_bn;
pub mod ema;
pub mod heads;
pub mod init;
pub mod methods;
pub mod resnet;

pub use ema::EmaPairs;
pub use heads::{Mlp, MlpConfig, Prototypes};
pub use methods::{Method, MethodConfig, SupervisedLoss};
pub use resnet::{PatchGrid, ResNet, ResNetConfig};
