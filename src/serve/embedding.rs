//! `contrastive.v1.EmbeddingService`: validation, preprocessing on the blocking pool, the dynamic
//! batcher, post-processing (truncation, L2 normalisation) and per-RPC metrics.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::batcher::BatchError;
use super::models::{LoadedVersion, LookupError, ModelStore, VersionStatus};
use super::preprocess::{preprocess_all, DecodeBudget, PreprocessError};
use crate::metrics;
use crate::proto::v1::embedding_service_server::EmbeddingService;
use crate::proto::v1::{
    embed_stream_response, EmbedRequest, EmbedResponse, EmbedStreamRequest, EmbedStreamResponse, Embedding,
    Error as ProtoError, GetModelRequest, ListModelsRequest, ListModelsResponse, ManifestSummary, ModelInfo, Timing,
    VersionInfo, VersionState,
};

/// Limits on what one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_client_batch: usize,
    /// Requests one stream may have in flight at once.
    pub max_stream_in_flight: usize,
    pub decode: DecodeBudget,
    /// Requests decoding images at once; the others wait (their memory is the risk).
    pub decode_concurrency: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_client_batch: 256,
            max_stream_in_flight: 64,
            decode: DecodeBudget::default(),
            decode_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

#[derive(Clone)]
pub struct EmbeddingApi {
    store: Arc<ModelStore>,
    limits: RequestLimits,
    /// Turns true when the server starts shutting down: open streams stop reading.
    shutdown: watch::Receiver<bool>,
    /// Permits to decode images, `decode_concurrency` of them.
    decode_slots: Arc<tokio::sync::Semaphore>,
}

/// Sets its flag when dropped: a request future that tonic drops (the client cancelled, or its
/// deadline passed) tells the blocking work it started to stop.
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Counts a call in the request metrics when it ends, also when tonic drops it unfinished (the
/// client cancelled or its deadline passed): those count as CANCELLED.
struct CallMetric {
    rpc: &'static str,
    started: Instant,
    code: Option<tonic::Code>,
}

impl CallMetric {
    fn start(rpc: &'static str) -> Self {
        Self { rpc, started: Instant::now(), code: None }
    }

    fn finish<T>(mut self, result: &Result<T, Status>) {
        self.code = Some(result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok));
    }
}

impl Drop for CallMetric {
    fn drop(&mut self) {
        metrics::request(self.rpc, self.code.unwrap_or(tonic::Code::Cancelled), self.started.elapsed());
    }
}

/// What the stream's writer receives, in request order.
enum StreamItem {
    Pending(tokio::task::JoinHandle<EmbedStreamResponse>),
    /// The stream cannot go on (undecodable message, shutdown): sent after earlier answers.
    End(Status),
}

impl EmbeddingApi {
    pub fn new(store: Arc<ModelStore>, limits: RequestLimits, shutdown: watch::Receiver<bool>) -> Self {
        let decode_slots = Arc::new(tokio::sync::Semaphore::new(limits.decode_concurrency.max(1)));
        Self { store, limits, shutdown, decode_slots }
    }

    /// One request as a front door (gRPC `Embed`, the HTTP `/v1/embeddings`) answers it,
    /// counted in the request metrics under `call`.
    pub async fn embed_call(&self, call: &'static str, request: EmbedRequest) -> Result<EmbedResponse, Status> {
        let metric = CallMetric::start(call);
        let result = self.embed_request(request).await;
        metric.finish(&result);
        result
    }

    /// Whether the default model is ready (what health checks report).
    pub fn is_serving(&self) -> bool {
        self.store.default_ready()
    }

    async fn embed_request(&self, request: EmbedRequest) -> Result<EmbedResponse, Status> {
        let received = Instant::now();
        if request.inputs.is_empty() {
            return Err(Status::invalid_argument("the request has no inputs"));
        }
        if request.inputs.len() > self.limits.max_client_batch {
            return Err(Status::invalid_argument(format!(
                "the request has {} inputs; at most {} are allowed per request (max_client_batch)",
                request.inputs.len(),
                self.limits.max_client_batch
            )));
        }
        let model = self.store.resolve(&request.model, request.version).map_err(lookup_status)?;
        let width = model.manifest.output.dimensions;
        let dimensions = request.dimensions as usize;
        if dimensions > width {
            return Err(Status::invalid_argument(format!(
                "dimensions {dimensions} exceeds the embedding size of {} ({width})",
                model.name
            )));
        }
        let count = request.inputs.len();
        let spec = model.manifest.input.clone();
        let inputs = request.inputs;
        // Tensors are only checked and copied: inline. Image decoding is CPU work: the blocking pool.
        let all_tensors = inputs.iter().all(|i| matches!(i.data, Some(crate::proto::v1::input::Data::Tensor(_))));
        let budget = self.limits.decode;
        let abandoned = Arc::new(AtomicBool::new(false));
        let images = if all_tensors {
            preprocess_all(&inputs, &spec, budget, &abandoned)
        } else {
            let slot =
                self.decode_slots.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
            let _abandon = AbandonOnDrop(abandoned.clone());
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                preprocess_all(&inputs, &spec, budget, &abandoned)
            })
            .await
            .map_err(|e| Status::internal(format!("preprocessing panicked: {e}")))?
        }
        .map_err(|e| match e {
            PreprocessError::Abandoned => Status::cancelled(e.to_string()),
            e => Status::invalid_argument(e.to_string()),
        })?;
        let output = model.batcher.embed(images, count).await.map_err(batch_status)?;
        // Inputs in range give finite embeddings; a model that still answers NaN or all zeros
        // for an input must not have that answered as success.
        for (index, row) in output.embeddings.chunks(output.dimensions).enumerate() {
            let norm_squared: f32 = row.iter().map(|v| v * v).sum();
            if !norm_squared.is_finite() || norm_squared == 0.0 {
                let what = if norm_squared.is_finite() { "all zeros" } else { "not finite" };
                return Err(Status::invalid_argument(format!("input {index}: the model's embedding is {what}")));
            }
        }
        metrics::queue_wait(&format!("{}:{}", model.name, model.version), output.queue);

        let keep = if dimensions == 0 { output.dimensions } else { dimensions };
        let normalize = request.normalize.unwrap_or(true);
        let embeddings = output
            .embeddings
            .chunks(output.dimensions)
            .map(|row| {
                let mut values = row[..keep].to_vec();
                if normalize {
                    contrastive_kernels::l2_normalize_slice(&mut values);
                }
                Embedding { values }
            })
            .collect();
        Ok(EmbedResponse {
            model: model.name.clone(),
            version: model.version,
            embeddings,
            timing: Some(Timing {
                queue_ms: output.queue.as_secs_f64() * 1e3,
                inference_ms: output.inference.as_secs_f64() * 1e3,
                total_ms: received.elapsed().as_secs_f64() * 1e3,
            }),
        })
    }
}

/// Resolves once the shutdown flag is set (never, if its sender is gone without setting it).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn lookup_status(error: LookupError) -> Status {
    match error {
        LookupError::NoModels => Status::unavailable(error.to_string()),
        _ => Status::not_found(error.to_string()),
    }
}

fn batch_status(error: BatchError) -> Status {
    match error {
        BatchError::QueueFull { .. } => Status::resource_exhausted(error.to_string()),
        BatchError::TooLarge { .. } => Status::invalid_argument(error.to_string()),
        BatchError::Stopped(_) => Status::unavailable(error.to_string()),
        BatchError::Inference(_) => Status::internal(error.to_string()),
    }
}

type EmbedStreamOutput = Pin<Box<dyn Stream<Item = Result<EmbedStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EmbeddingService for EmbeddingApi {
    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        self.embed_call("Embed", request.into_inner()).await.map(Response::new)
    }

    type EmbedStreamStream = EmbedStreamOutput;

    /// Requests run concurrently (up to `max_stream_in_flight`); responses leave in request order.
    /// A message that cannot be decoded, or a server shutdown, ends the stream with a status
    /// after the answers to the requests before it.
    async fn embed_stream(
        &self,
        request: Request<Streaming<EmbedStreamRequest>>,
    ) -> Result<Response<Self::EmbedStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let (pending_tx, mut pending_rx) = mpsc::channel::<StreamItem>(self.limits.max_stream_in_flight);
        let (out_tx, out_rx) = mpsc::channel(self.limits.max_stream_in_flight);
        let api = self.clone();
        let mut shutdown = self.shutdown.clone();
        let reader = tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = incoming.next() => message,
                    _ = stopping(&mut shutdown) => {
                        let _ = pending_tx.send(StreamItem::End(Status::unavailable("the server is shutting down"))).await;
                        break;
                    }
                };
                let message = match message {
                    None => break,
                    Some(Ok(message)) => message,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "embed stream message refused");
                        let _ = pending_tx.send(StreamItem::End(status)).await;
                        break;
                    }
                };
                let api = api.clone();
                let handle = tokio::spawn(async move {
                    let metric = CallMetric::start("EmbedStream");
                    let id = message.id;
                    let result = match message.request {
                        Some(request) => api.embed_request(request).await,
                        None => Err(Status::invalid_argument("stream message without a request")),
                    };
                    metric.finish(&result);
                    let result = match result {
                        Ok(response) => embed_stream_response::Result::Response(response),
                        Err(status) => embed_stream_response::Result::Error(ProtoError {
                            code: status.code() as i32,
                            message: status.message().to_string(),
                        }),
                    };
                    EmbedStreamResponse { id, result: Some(result) }
                });
                if pending_tx.send(StreamItem::Pending(handle)).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(item) = pending_rx.recv().await {
                let (response, last) = match item {
                    StreamItem::Pending(handle) => match handle.await {
                        Ok(response) => (Ok(response), false),
                        Err(e) => (Err(Status::internal(format!("a stream request failed: {e}"))), true),
                    },
                    StreamItem::End(status) => (Err(status), true),
                };
                if out_tx.send(response).await.is_err() {
                    reader.abort(); // the client went away
                    break;
                }
                if last {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn list_models(&self, _request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let default = self.store.default_model();
        let models = self
            .store
            .snapshot()
            .into_iter()
            .map(|(name, versions)| model_info(&name, &versions, default.as_deref()))
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn get_model(&self, request: Request<GetModelRequest>) -> Result<Response<ModelInfo>, Status> {
        let default = self.store.default_model();
        let name = match request.into_inner().name {
            name if name.is_empty() => default.clone().ok_or_else(|| Status::unavailable("no model is loaded yet"))?,
            name => name,
        };
        let snapshot = self.store.snapshot();
        let versions = snapshot.get(&name).ok_or_else(|| {
            let available = snapshot.keys().cloned().collect::<Vec<_>>().join(", ");
            Status::not_found(format!("model {name:?} is not in the repository (available: {available})"))
        })?;
        Ok(Response::new(model_info(&name, versions, default.as_deref())))
    }
}

fn model_info(
    name: &str,
    versions: &std::collections::BTreeMap<u64, VersionStatus>,
    default: Option<&str>,
) -> ModelInfo {
    let latest_ready_version =
        versions.iter().rev().find(|(_, s)| matches!(s, VersionStatus::Ready(_))).map_or(0, |(v, _)| *v);
    ModelInfo {
        name: name.to_string(),
        is_default: default == Some(name),
        latest_ready_version,
        versions: versions
            .iter()
            .map(|(&version, status)| match status {
                VersionStatus::Ready(loaded) => version_info(loaded),
                VersionStatus::Failed { reason, .. } => VersionInfo {
                    version,
                    state: VersionState::Failed as i32,
                    error: reason.clone(),
                    ..Default::default()
                },
            })
            .collect(),
    }
}

fn version_info(loaded: &LoadedVersion) -> VersionInfo {
    let m = &loaded.manifest;
    let evaluation = m.evaluation.as_ref();
    VersionInfo {
        version: loaded.version,
        state: VersionState::Ready as i32,
        error: String::new(),
        input_shape: m.image_dims().iter().map(|&d| d as u32).collect(),
        channel_order: format!("{:?}", m.input.channel_order).to_lowercase(),
        embedding_dimensions: m.output.dimensions as u32,
        execution_provider: loaded.provider.to_string(),
        manifest: Some(ManifestSummary {
            method: m.training.method.clone(),
            loss: m.training.loss.clone(),
            data: m.training.data.clone(),
            epochs: m.training.epochs as u32,
            knn_accuracy: evaluation.map_or(0.0, |e| e.knn_accuracy),
            linear_probe_accuracy: evaluation.and_then(|e| e.linear_probe_accuracy).unwrap_or(0.0),
            parity_max_abs_diff: m.parity.max_abs_diff as f64,
            created_at: m.created_at.clone(),
            source: m.source.clone(),
        }),
    }
}
