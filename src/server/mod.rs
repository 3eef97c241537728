//! `contrastive serve`: the one place that wires the server together: the embedding service
//! ([`crate::serve`]) and its OpenAI-compatible HTTP endpoint, the fine-tune service
//! ([`crate::finetune`]), `grpc.health.v1`, server reflection (v1 and v1alpha), Prometheus
//! metrics ([`crate::metrics`]), TLS, API keys ([`crate::auth`]) and a graceful shutdown.
//! Neither service knows the other: a fine-tune publishes into the model repository, and the
//! repository tells the serving side.

pub mod config;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use self::config::ServeSettings;
use crate::auth::ApiKeys;
use crate::finetune::datasets::{DatasetLimits, DatasetStore};
use crate::finetune::runner::{JobRunner, RunnerSettings};
use crate::finetune::service::FineTuneApi;
use crate::finetune::store::{JobStore, StoreLocation};
use crate::metrics;
use crate::proto::v1::embedding_service_server::EmbeddingServiceServer;
use crate::proto::v1::fine_tune_service_server::FineTuneServiceServer;
use crate::registry::ModelRepository;
use crate::runtime::InferenceDevice;
use crate::serve::embedding::EmbeddingApi;
use crate::serve::models::{LoadOptions, ModelStore};
use crate::serve::poller::Poller;

/// The addresses the server listens on, once bound (useful with port 0).
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub grpc: SocketAddr,
    /// The OpenAI-compatible HTTP endpoint, when on.
    pub http: Option<SocketAddr>,
}

/// Serves until SIGTERM or Ctrl-C, then stops accepting, lets in-flight requests finish, drains
/// the batch queues and returns. `on_listening` receives the bound addresses.
pub async fn run(settings: ServeSettings, on_listening: impl FnOnce(Listening)) -> Result<()> {
    if let InferenceDevice::Cuda(id) = settings.session.device {
        let provider = tokio::task::block_in_place(|| crate::runtime::check_device(settings.session.device))
            .with_context(|| format!("--device cuda:{id}: cannot run models on the GPU"))?;
        tracing::info!(%provider, "GPU checked");
    }
    metrics::install(settings.metrics_addr)?;
    let listener =
        TcpListener::bind(settings.addr).await.with_context(|| format!("cannot listen on {}", settings.addr))?;
    let local_addr = listener.local_addr()?;
    let http_listener = match settings.http_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (HTTP)"))?),
        None => None,
    };
    let listening =
        Listening { grpc: local_addr, http: http_listener.as_ref().map(TcpListener::local_addr).transpose()? };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<EmbeddingServiceServer<EmbeddingApi>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    // v1 and v1alpha (grpcurl 1.8 and Python's grpcio-reflection still ask v1alpha), each
    // listing every service the server has, both reflection versions included.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;

    let repository = ModelRepository::new(&settings.models);
    // Replicas sharing a job store share the repository and data folder too: what looks
    // abandoned may be another server's work in progress unless it is old.
    let leftover_age = match settings.job_store {
        StoreLocation::Postgres(_) => Duration::from_secs(3600),
        StoreLocation::Sqlite(_) => Duration::ZERO,
    };
    match repository.remove_abandoned_staging(leftover_age) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed staging folders of interrupted publishes"),
        Err(error) => tracing::warn!(%error, "cannot clean staging folders"),
    }
    let load =
        LoadOptions { session: settings.session, batcher: settings.batcher, keep_versions: settings.keep_versions };
    let store = Arc::new(ModelStore::new(repository.clone(), load, settings.default_model.clone()));
    if let Err(error) = tokio::task::block_in_place(|| store.scan()) {
        tracing::error!(%error, "cannot scan the model repository");
    }
    // A version published in this process (a fine-tune) is served before its job reports
    // success, rather than at the next poll.
    let published_store = Arc::downgrade(&store);
    repository.on_publish(move |name, version| {
        let Some(store) = published_store.upgrade() else { return };
        if let Err(error) = store.scan() {
            tracing::warn!(model = name, version, %error, "rescan after publishing failed; the poller will pick it up");
        }
    });
    let poller = Poller::start(store.clone(), settings.poll_interval, health.clone());

    let api_keys = match &settings.api_key_file {
        Some(path) => ApiKeys::from_file(path)?,
        None => ApiKeys::open(),
    };
    let embedding_keys = if settings.auth_embeddings { api_keys.clone() } else { ApiKeys::open() };
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let embedding_api = EmbeddingApi::new(store.clone(), settings.limits, stopping.clone());
    let http = http_listener.map(|listener| {
        let app =
            crate::serve::openai::router(embedding_api.clone(), embedding_keys.clone(), settings.max_message_bytes);
        let mut stopping = stopping.clone();
        // Small responses must not wait for Nagle's algorithm (see the gRPC listener below).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopping.wait_for(|stopping| *stopping).await;
                })
                .await
        })
    });
    let embedding = EmbeddingServiceServer::new(embedding_api)
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes);
    let embedding = tonic::service::interceptor::InterceptedService::new(embedding, move |r| embedding_keys.check(r));

    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("cannot create the data folder {}", settings.data_dir.display()))?;
    let jobs = Arc::new(tokio::task::block_in_place(|| JobStore::connect(&settings.job_store))?);
    let dataset_limits = DatasetLimits {
        max_images: settings.max_dataset_images,
        max_image_bytes: settings.max_image_bytes,
        ..DatasetLimits::default()
    };
    let datasets = Arc::new(DatasetStore::new(settings.data_dir.join("datasets"), dataset_limits));
    match datasets.remove_unfinished_uploads(leftover_age) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed the temporary files of uploads a stopped server left unfinished"),
        Err(error) => tracing::warn!(%error, "cannot clean unfinished uploads"),
    }
    let runner_settings = RunnerSettings {
        concurrency: settings.finetune_concurrency,
        threads: settings.finetune_threads,
        lease: settings.job_lease,
        ..RunnerSettings::default()
    };
    let runner = JobRunner::start(jobs, datasets, repository, runner_settings)?;
    let finetune_api = FineTuneApi::new(
        runner.clone(),
        api_keys.clone(),
        settings.finetune_data_root.clone(),
        settings.max_jobs_per_client,
    );
    let finetune = FineTuneServiceServer::new(finetune_api)
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes);
    let finetune = tonic::service::interceptor::InterceptedService::new(finetune, move |r| api_keys.check(r));

    let mut builder = Server::builder();
    if let Some((cert, key)) = &settings.tls {
        let cert =
            std::fs::read(cert).with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?;
        let key = std::fs::read(key).with_context(|| format!("cannot read the TLS key {}", key.display()))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .context("invalid TLS certificate or key")?;
    }
    tracing::info!(addr = %local_addr, http = ?listening.http, models = %settings.models.display(), tls = settings.tls.is_some(), "serving");
    on_listening(listening);
    let (signalled_tx, signalled) = tokio::sync::oneshot::channel::<()>();
    let shutdown = {
        let health = health.clone();
        let runner = runner.clone();
        async move {
            shutdown_signal().await;
            // Fine-tune jobs stop now, not after the drain: on a shared job store another
            // replica takes a running job over at once.
            tokio::task::spawn_blocking(move || runner.shutdown());
            // Load balancers stop sending; open streams stop reading.
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            health.set_not_serving::<EmbeddingServiceServer<EmbeddingApi>>().await;
            let _ = stopping_tx.send(true);
            let _ = signalled_tx.send(());
        }
    };
    // Small responses must not wait for Nagle's algorithm and delayed ACKs (tonic's own
    // tcp_nodelay setting does not apply to a listener it is handed): measured, single-image
    // requests ran at 0.3 of in-process speed without it.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(embedding)
        .add_service(finetune)
        .serve_with_incoming_shutdown(incoming, shutdown);
    // In-flight requests get DRAIN_LIMIT after the signal; a client that holds a connection
    // open longer does not keep the process alive.
    let drain_limit = async {
        if signalled.await.is_ok() {
            tokio::time::sleep(DRAIN_LIMIT).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result.context("the gRPC server failed")?,
        _ = drain_limit => tracing::warn!(seconds = DRAIN_LIMIT.as_secs(), "connections still open after the drain limit; closing them"),
    }

    if let Some(http) = http {
        match tokio::time::timeout(DRAIN_LIMIT, http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the HTTP endpoint failed"),
            Ok(Err(error)) => tracing::warn!(%error, "the HTTP endpoint panicked"),
            Err(_) => tracing::warn!("HTTP connections still open after the drain limit; closing them"),
        }
    }
    tracing::info!("stopped accepting; draining queues");
    // Waits for the shutdown started at the signal (it holds the workers until they end).
    tokio::task::block_in_place(|| runner.shutdown());
    poller.stop();
    store.clear();
    tracing::info!("shut down");
    Ok(())
}

/// How long in-flight work may take after SIGTERM.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
