//! The embedding side of the server: `contrastive.v1.EmbeddingService` ([`embedding`]) over ONNX
//! Runtime sessions with dynamic batching ([`batcher`]), its OpenAI-compatible HTTP face
//! ([`openai`]), the loaded side of the model repository
//! ([`models`]) kept fresh by a [`poller`], and request preprocessing ([`preprocess`]). The
//! server is wired together in [`crate::server`].

pub mod batcher;
pub mod embedding;
pub mod models;
pub mod openai;
pub mod poller;
pub mod preprocess;
