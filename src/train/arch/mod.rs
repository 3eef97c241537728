//! 3. Architectures: encoders, heads, momentum updates.

pub mod activation;
pub mod batch_norm;
pub mod conv;
pub mod conv_bn;
pub mod ema;
pub mod fused_batch_norm;
pub mod heads;
pub mod im2col;
pub mod init;
pub mod matmul_avx512;
pub mod methods;
pub mod resnet;

pub use ema::EmaPairs;
pub use heads::{Mlp, MlpConfig, Prototypes};
pub use methods::{Method, MethodConfig};
pub use resnet::{ResNet, ResNetConfig};
