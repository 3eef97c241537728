//! `contrastive`: train contrastive image encoders with candle, export them to ONNX, serve their
//! embeddings over gRPC, and fine-tune them on request.
//!
//! The trainer follows the five layers of the survey of contrastive learning (see
//! `docs/taxonomy.md`): [`train::pairs`], [`train::augment`], [`train::arch`], [`train::loss`],
//! and [`eval`]. Dependencies point one way: [`data`] and [`eval`] under [`train`]; [`registry`]
//! and [`runtime`] under [`export`]; [`serve`] and [`finetune`] beside each other, wired together
//! by [`server`] alone.

pub mod auth;
pub mod bench;
pub mod client;
pub mod data;
pub mod eval;
pub mod export;
pub mod files;
pub mod finetune;
pub mod metrics;
pub mod proto;
pub mod registry;
pub mod runtime;
pub mod serve;
pub mod server;
pub mod train;
