//! `contrastive`: train contrastive image encoders with candle, export them to ONNX, serve their
//! embeddings over gRPC, and fine-tune them on request.
//!
//! The trainer follows the five layers of the survey (see `TAXONOMY.md`):
//! [`train::pairs`], [`train::augment`], [`train::arch`], [`train::loss`], and [`eval`].

pub mod client;
pub mod data;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod proto;
pub mod registry;
pub mod runtime;
pub mod serve;
pub mod train;
