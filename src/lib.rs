//! `contrastive`: train contrastive image encoders with candle, export them to ONNX, serve them.
//!
//! The trainer follows the five layers of the survey (see `TAXONOMY.md`):
//! [`train::pairs`], [`train::augment`], [`train::arch`], [`train::loss`], and [`eval`].

pub mod data;
pub mod eval;
pub mod export;
pub mod registry;
pub mod runtime;
pub mod train;
