//! 3. Architectures: encoders, heads, momentum updates.

pub mod activation;
pub mod batch_norm;
pub mod conv;
pub mod conv_bn;
pub mod fused_batch_norm;
pub mod im2col;
pub mod matmul_avx512;
pub mod ema;
pub mod heads;
pub mod init;
pub mod methods;
pub mod resnet;

pub use ema::EmaPairs;
pub use heads::{Mlp, MlpConfig, Prototypes};
pub use resnet::{ResNet, ResNetConfig};
pub use methods::{Method, MethodConfig};
