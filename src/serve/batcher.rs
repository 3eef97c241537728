//! Dynamic batching for one model version: requests' images queue up and a worker thread runs
//! them through ONNX Runtime in batches of up to `max_batch` images, waiting at most `max_delay`
//! after the first one for others to join. The ONNX Runtime call never runs on the async reactor.
//!
//! A request larger than `max_batch` is split into chunks that keep their order; the queue is
//! bounded in images and refuses a request that does not fit; a chunk whose requester has gone
//! (cancelled, deadline passed) is dropped before it reaches the model.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use crate::metrics;
use crate::runtime::OnnxEncoder;

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Images that may wait in the queue.
    pub queue_capacity: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self { max_batch: 64, max_delay: Duration::from_millis(2), queue_capacity: 1024 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchError {
    #[error("the queue of {model} is full ({queued} images waiting, capacity {capacity}); retry later")]
    QueueFull { model: String, queued: usize, capacity: usize },
    #[error("the request has {count} images but the queue of {model} holds at most {capacity}; send smaller requests")]
    TooLarge { model: String, count: usize, capacity: usize },
    #[error("{0} is shutting down")]
    Stopped(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// The embeddings of one request, row-major, with where its time went.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub embeddings: Vec<f32>,
    pub dimensions: usize,
    /// Time spent waiting in the queue, summed over the request's chunks.
    pub queue: Duration,
    /// ONNX Runtime time of the batches that carried the request.
    pub inference: Duration,
}

struct Chunk {
    images: Vec<f32>,
    count: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Result<ChunkOutput, BatchError>>,
}

struct ChunkOutput {
    embeddings: Vec<f32>,
    dimensions: usize,
    queue: Duration,
    inference: Duration,
}

pub struct Batcher {
    label: String,
    sender: Option<Sender<Chunk>>,
    queued: Arc<AtomicUsize>,
    config: BatcherConfig,
    image_len: usize,
    worker: Option<JoinHandle<()>>,
}

impl Batcher {
    /// Starts the worker thread that owns `encoder`. `label` names the model version in logs and
    /// metrics (`name:version`).
    pub fn start(label: String, encoder: OnnxEncoder, image_dims: [usize; 3], config: BatcherConfig) -> Self {
        let (sender, receiver) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (label, queued) = (label.clone(), queued.clone());
            std::thread::Builder::new()
                .name(format!("batch {label}"))
                .spawn(move || run_worker(&label, encoder, image_dims, config, &receiver, &queued))
                .expect("spawn the batch worker")
        };
        let image_len = image_dims.iter().product();
        Self { label, sender: Some(sender), queued, config, image_len, worker: Some(worker) }
    }

    /// Images waiting now.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Embeds `images` (`count` preprocessed images, row-major). Dropping the future withdraws
    /// the chunks that have not run yet.
    pub async fn embed(&self, images: Vec<f32>, count: usize) -> Result<BatchOutput, BatchError> {
        debug_assert_eq!(images.len(), count * self.image_len);
        let sender = self.sender.as_ref().ok_or_else(|| BatchError::Stopped(self.label.clone()))?;
        // Reserve room for the whole request, or refuse it whole.
        let capacity = self.config.queue_capacity;
        if count > capacity {
            return Err(BatchError::TooLarge { model: self.label.clone(), count, capacity });
        }
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + count <= capacity).then_some(queued + count)
            })
            .map_err(|queued| BatchError::QueueFull { model: self.label.clone(), queued, capacity })?;
        metrics::queue_depth(&self.label, self.queue_depth());

        let enqueued = Instant::now();
        let mut replies = Vec::new();
        let per_chunk = self.config.max_batch * self.image_len;
        for (i, chunk_images) in images.chunks(per_chunk).enumerate() {
            let (reply, receiver) = oneshot::channel();
            let chunk =
                Chunk { images: chunk_images.to_vec(), count: chunk_images.len() / self.image_len, enqueued, reply };
            if sender.send(chunk).is_err() {
                // The worker is gone: release what was not sent.
                let unsent = count - i * self.config.max_batch;
                self.queued.fetch_sub(unsent, Ordering::AcqRel);
                return Err(BatchError::Stopped(self.label.clone()));
            }
            replies.push(receiver);
        }

        let mut output =
            BatchOutput { embeddings: Vec::new(), dimensions: 0, queue: Duration::ZERO, inference: Duration::ZERO };
        for receiver in replies {
            let chunk = receiver.await.map_err(|_| BatchError::Stopped(self.label.clone()))??;
            output.embeddings.extend_from_slice(&chunk.embeddings);
            output.dimensions = chunk.dimensions;
            output.queue += chunk.queue;
            output.inference += chunk.inference;
        }
        Ok(output)
    }
}

impl Drop for Batcher {
    /// Closes the queue and waits until the worker has answered every chunk already queued.
    fn drop(&mut self) {
        self.sender.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        metrics::queue_depth(&self.label, 0);
    }
}

fn run_worker(
    label: &str,
    mut encoder: OnnxEncoder,
    image_dims: [usize; 3],
    config: BatcherConfig,
    receiver: &Receiver<Chunk>,
    queued: &AtomicUsize,
) {
    let mut pending: Option<Chunk> = None;
    loop {
        let first = match pending.take() {
            Some(chunk) => chunk,
            None => match receiver.recv() {
                Ok(chunk) => chunk,
                Err(_) => break, // closed and drained
            },
        };
        // Gather more until the batch is full or the first chunk has waited max_delay.
        let deadline = first.enqueued + config.max_delay;
        let mut size = first.count;
        let mut batch = vec![first];
        while size < config.max_batch {
            match receiver.recv_deadline(deadline) {
                Ok(chunk) if size + chunk.count > config.max_batch => {
                    pending = Some(chunk);
                    break;
                }
                Ok(chunk) => {
                    size += chunk.count;
                    batch.push(chunk);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        queued.fetch_sub(size, Ordering::AcqRel);
        metrics::queue_depth(label, queued.load(Ordering::Relaxed));

        let before = batch.len();
        batch.retain(|chunk| !chunk.reply.is_closed());
        metrics::cancelled_chunks(label, before - batch.len());
        if batch.is_empty() {
            continue;
        }
        run_batch(label, &mut encoder, image_dims, batch);
    }
}

fn run_batch(label: &str, encoder: &mut OnnxEncoder, image_dims: [usize; 3], batch: Vec<Chunk>) {
    let started = Instant::now();
    let size: usize = batch.iter().map(|c| c.count).sum();
    let mut images = Vec::with_capacity(size * image_dims.iter().product::<usize>());
    for chunk in &batch {
        images.extend_from_slice(&chunk.images);
    }
    let result = encoder.run(&images, size, image_dims);
    let inference = started.elapsed();
    metrics::batch(label, size, inference);
    match result {
        Ok((embeddings, dimensions)) => {
            let mut offset = 0;
            for chunk in batch {
                let rows = &embeddings[offset * dimensions..(offset + chunk.count) * dimensions];
                offset += chunk.count;
                let output =
                    ChunkOutput { embeddings: rows.to_vec(), dimensions, queue: started - chunk.enqueued, inference };
                let _ = chunk.reply.send(Ok(output));
            }
        }
        Err(error) => {
            tracing::error!(model = label, %error, "inference failed");
            for chunk in batch {
                let _ = chunk.reply.send(Err(BatchError::Inference(error.to_string())));
            }
        }
    }
}
