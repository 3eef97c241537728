//! Keeps the loaded models in step with the repository, and the health status with them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::models::ModelStore;

/// Scans the repository on a plain thread (loading a model is blocking work) and keeps the
/// health status in step: SERVING while the default model has a ready version.
pub struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    pub fn start(
        store: Arc<ModelStore>,
        interval: std::time::Duration,
        health: tonic_health::server::HealthReporter,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Handle::current();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("model poller".into())
                .spawn(move || {
                    let mut serving = None;
                    while !stop.load(Ordering::Acquire) {
                        if let Err(error) = store.scan() {
                            tracing::error!(%error, "cannot scan the model repository");
                        }
                        // Requests that name no model must work: the default has to be ready.
                        let ready = store.default_ready();
                        if serving != Some(ready) {
                            serving = Some(ready);
                            let health = health.clone();
                            runtime.block_on(async move {
                                let status = if ready {
                                    tonic_health::ServingStatus::Serving
                                } else {
                                    tonic_health::ServingStatus::NotServing
                                };
                                health.set_service_status("", status).await;
                                health.set_service_status("contrastive.v1.EmbeddingService", status).await;
                            });
                        }
                        std::thread::park_timeout(interval);
                    }
                })
                .expect("spawn the model poller")
        };
        Self { stop, thread: Some(thread) }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}
