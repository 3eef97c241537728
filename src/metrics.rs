//! Prometheus metrics, named by what they measure, served over HTTP at `/metrics`. Every metric
//! of the program is recorded through this module, so the names live in one place.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `contrastive_requests_total` | counter | `rpc`, `code` (gRPC status, `ok` on success) |
//! | `contrastive_request_duration_seconds` | histogram | `rpc` |
//! | `contrastive_queue_duration_seconds` | histogram | `model` |
//! | `contrastive_inference_duration_seconds` | histogram (per batch) | `model` |
//! | `contrastive_batch_size` | histogram (images per batch) | `model` |
//! | `contrastive_queue_depth` | gauge (images waiting) | `model` |
//! | `contrastive_cancelled_chunks_total` | counter | `model` |
//! | `contrastive_models_loaded` | gauge (ready versions) | |
//! | `contrastive_model_version_info` | gauge (1 while loaded) | `model`, `version`, `provider` |
//! | `contrastive_finetune_jobs_total` | counter | `state` (terminal state reached) |
//! | `contrastive_finetune_takeovers_total` | counter (jobs this server took over from one whose lease ran out) | |

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the recorder and, when `listen` is given, the HTTP listener serving `/metrics`.
/// Must run inside the tokio runtime.
pub fn install(listen: Option<SocketAddr>) -> Result<()> {
    let mut builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("contrastive_batch_size".into()), BATCH_BUCKETS)?;
    match listen {
        Some(addr) => {
            builder = builder.with_http_listener(addr);
            builder.install().with_context(|| format!("cannot serve metrics on {addr}"))
        }
        None => {
            builder.install_recorder().context("cannot install the metrics recorder")?;
            Ok(())
        }
    }
}

pub fn request(rpc: &'static str, code: tonic::Code, elapsed: Duration) {
    let code = if code == tonic::Code::Ok { "ok".to_string() } else { format!("{code:?}").to_lowercase() };
    counter!("contrastive_requests_total", "rpc" => rpc, "code" => code).increment(1);
    histogram!("contrastive_request_duration_seconds", "rpc" => rpc).record(elapsed.as_secs_f64());
}

pub fn queue_wait(model: &str, waited: Duration) {
    histogram!("contrastive_queue_duration_seconds", "model" => model.to_string()).record(waited.as_secs_f64());
}

pub fn batch(model: &str, size: usize, inference: Duration) {
    histogram!("contrastive_batch_size", "model" => model.to_string()).record(size as f64);
    histogram!("contrastive_inference_duration_seconds", "model" => model.to_string()).record(inference.as_secs_f64());
}

pub fn queue_depth(model: &str, depth: usize) {
    gauge!("contrastive_queue_depth", "model" => model.to_string()).set(depth as f64);
}

pub fn cancelled_chunks(model: &str, count: usize) {
    if count > 0 {
        counter!("contrastive_cancelled_chunks_total", "model" => model.to_string()).increment(count as u64);
    }
}

pub fn models_loaded(count: usize) {
    gauge!("contrastive_models_loaded").set(count as f64);
}

pub fn model_version(model: &str, version: u64, provider: &str, loaded: bool) {
    gauge!("contrastive_model_version_info", "model" => model.to_string(), "version" => version.to_string(), "provider" => provider.to_string())
        .set(if loaded { 1.0 } else { 0.0 });
}

pub fn finetune_job_finished(state: &'static str) {
    counter!("contrastive_finetune_jobs_total", "state" => state).increment(1);
}

pub fn finetune_job_taken_over() {
    counter!("contrastive_finetune_takeovers_total").increment(1);
}
