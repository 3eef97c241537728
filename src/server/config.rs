//! Server settings from three sources, in rising priority: a TOML file (`--config`), environment
//! variables (`CONTRASTIVE_*`), command-line flags. Every setting has a default, so
//! `contrastive serve` alone serves `models/` on 127.0.0.1:50051.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::finetune::store::StoreLocation;
use crate::runtime::{InferenceDevice, SessionOptions};
use crate::serve::batcher::BatcherConfig;
use crate::serve::embedding::RequestLimits;
use crate::serve::preprocess::DecodeBudget;

/// `contrastive serve` flags; each also reads the environment variable named beside it.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and environment variables win)
    #[arg(long, env = "CONTRASTIVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051]
    #[arg(long, env = "CONTRASTIVE_ADDR")]
    pub addr: Option<SocketAddr>,
    /// OpenAI-compatible HTTP endpoint (POST /v1/embeddings, GET /v1/models, GET /health), or "off"
    /// [default: off]
    #[arg(long, env = "CONTRASTIVE_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// The model repository [default: models]
    #[arg(long, env = "CONTRASTIVE_MODELS")]
    pub models: Option<PathBuf>,
    /// Model served when a request names none [default: the one the repository's .default-model file names, else
    /// the first model by name with a ready version at start, pinned until restart]
    #[arg(long, env = "CONTRASTIVE_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// cpu, cuda, cuda:N or auto [default: cpu]
    #[arg(long, env = "CONTRASTIVE_DEVICE")]
    pub device: Option<String>,
    /// ONNX Runtime threads per operator; 0 lets it choose [default: 0]
    #[arg(long, env = "CONTRASTIVE_INTRA_THREADS")]
    pub intra_threads: Option<usize>,
    /// Images per inference batch [default: 64]
    #[arg(long, env = "CONTRASTIVE_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Longest wait for a batch to fill, in milliseconds [default: 2]
    #[arg(long, env = "CONTRASTIVE_MAX_DELAY_MS")]
    pub max_delay_ms: Option<u64>,
    /// Images that may wait per model version before requests get RESOURCE_EXHAUSTED [default: 1024]
    #[arg(long, env = "CONTRASTIVE_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Inputs allowed in one request [default: 256]
    #[arg(long, env = "CONTRASTIVE_MAX_CLIENT_BATCH")]
    pub max_client_batch: Option<usize>,
    /// Pixels an image may have, read from its header before decoding [default: 16777216]
    #[arg(long, env = "CONTRASTIVE_MAX_IMAGE_PIXELS")]
    pub max_image_pixels: Option<u64>,
    /// Pixels all images of one request may have together [default: 67108864]
    #[arg(long, env = "CONTRASTIVE_MAX_REQUEST_PIXELS")]
    pub max_request_pixels: Option<u64>,
    /// Requests decoding images at once [default: the number of CPUs]
    #[arg(long, env = "CONTRASTIVE_DECODE_CONCURRENCY")]
    pub decode_concurrency: Option<usize>,
    /// Largest request message in bytes [default: 67108864]
    #[arg(long, env = "CONTRASTIVE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Newest loadable versions kept loaded per model [default: 2]
    #[arg(long, env = "CONTRASTIVE_KEEP_VERSIONS")]
    pub keep_versions: Option<usize>,
    /// How often the repository is scanned for new versions, in milliseconds [default: 2000]
    #[arg(long, env = "CONTRASTIVE_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<u64>,
    /// Prometheus /metrics address, or "off" [default: 127.0.0.1:9090]
    #[arg(long, env = "CONTRASTIVE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// PEM certificate chain; with --tls-key, serves TLS
    #[arg(long, env = "CONTRASTIVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key
    #[arg(long, env = "CONTRASTIVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Fine-tune job database and datasets [default: data]
    #[arg(long, env = "CONTRASTIVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Fine-tune job store: sqlite:PATH for one server, or postgres://USER:PASSWORD@HOST:PORT/DATABASE
    /// shared by replicas [default: sqlite:DATA_DIR/jobs.sqlite]
    #[arg(long, env = "CONTRASTIVE_JOB_STORE")]
    pub job_store: Option<String>,
    /// Seconds a job stays with its server without a lease renewal; past it another replica
    /// takes the job over [default: 30]
    #[arg(long, env = "CONTRASTIVE_JOB_LEASE_SECONDS")]
    pub job_lease_seconds: Option<u64>,
    /// File of accepted API keys, one per line; fine-tune RPCs then need `authorization: Bearer <key>`
    #[arg(long, env = "CONTRASTIVE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Require the API key for embedding RPCs too
    #[arg(long, env = "CONTRASTIVE_AUTH_EMBEDDINGS")]
    pub auth_embeddings: Option<bool>,
    /// Folder under which CreateJob may name server-side datasets [default: none allowed]
    #[arg(long, env = "CONTRASTIVE_FINETUNE_DATA_ROOT")]
    pub finetune_data_root: Option<PathBuf>,
    /// Fine-tune jobs running at once [default: 1]
    #[arg(long, env = "CONTRASTIVE_FINETUNE_CONCURRENCY")]
    pub finetune_concurrency: Option<usize>,
    /// Threads a fine-tune job may use [default: 1]
    #[arg(long, env = "CONTRASTIVE_FINETUNE_THREADS")]
    pub finetune_threads: Option<usize>,
    /// Queued or running jobs allowed per client [default: 4]
    #[arg(long, env = "CONTRASTIVE_MAX_JOBS_PER_CLIENT")]
    pub max_jobs_per_client: Option<usize>,
    /// Images allowed in one dataset [default: 10000]
    #[arg(long, env = "CONTRASTIVE_MAX_DATASET_IMAGES")]
    pub max_dataset_images: Option<usize>,
    /// Bytes allowed per encoded image [default: 4194304]
    #[arg(long, env = "CONTRASTIVE_MAX_IMAGE_BYTES")]
    pub max_image_bytes: Option<usize>,
}

/// The same settings in the config file, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    addr: Option<SocketAddr>,
    http_addr: Option<String>,
    models: Option<PathBuf>,
    default_model: Option<String>,
    device: Option<String>,
    intra_threads: Option<usize>,
    max_batch: Option<usize>,
    max_delay_ms: Option<u64>,
    queue_capacity: Option<usize>,
    max_client_batch: Option<usize>,
    max_image_pixels: Option<u64>,
    max_request_pixels: Option<u64>,
    decode_concurrency: Option<usize>,
    max_message_bytes: Option<usize>,
    keep_versions: Option<usize>,
    poll_interval_ms: Option<u64>,
    metrics_addr: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    job_store: Option<String>,
    job_lease_seconds: Option<u64>,
    api_key_file: Option<PathBuf>,
    auth_embeddings: Option<bool>,
    finetune_data_root: Option<PathBuf>,
    finetune_concurrency: Option<usize>,
    finetune_threads: Option<usize>,
    max_jobs_per_client: Option<usize>,
    max_dataset_images: Option<usize>,
    max_image_bytes: Option<usize>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub models: PathBuf,
    pub default_model: Option<String>,
    pub session: SessionOptions,
    pub batcher: BatcherConfig,
    pub limits: RequestLimits,
    pub max_message_bytes: usize,
    pub keep_versions: usize,
    pub poll_interval: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub data_dir: PathBuf,
    pub job_store: StoreLocation,
    pub job_lease: Duration,
    pub api_key_file: Option<PathBuf>,
    pub auth_embeddings: bool,
    pub finetune_data_root: Option<PathBuf>,
    pub finetune_concurrency: usize,
    pub finetune_threads: usize,
    pub max_jobs_per_client: usize,
    pub max_dataset_images: usize,
    pub max_image_bytes: usize,
}

impl ServeSettings {
    pub fn resolve(args: &ServeArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileSettings::default(),
        };
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                args.$field.clone().or(file.$field.clone()).unwrap_or($default)
            };
        }
        let device: InferenceDevice = pick!(device, "cpu".to_string()).parse()?;
        let metrics_addr = match pick!(metrics_addr, "127.0.0.1:9090".to_string()).as_str() {
            "off" | "" => None,
            text => {
                Some(text.parse().with_context(|| format!("--metrics-addr {text:?} is not an address (or \"off\")"))?)
            }
        };
        let http_addr = match pick!(http_addr, "off".to_string()).as_str() {
            "off" | "" => None,
            text => Some(text.parse().with_context(|| format!("--http-addr {text:?} is not an address (or \"off\")"))?),
        };
        let tls = match (args.tls_cert.clone().or(file.tls_cert.clone()), args.tls_key.clone().or(file.tls_key.clone()))
        {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => bail!("TLS needs both a certificate and a key (--tls-cert and --tls-key)"),
        };
        let data_dir = pick!(data_dir, PathBuf::from("data"));
        let job_store = match args.job_store.clone().or(file.job_store.clone()) {
            Some(text) => text.parse().context("--job-store")?,
            None => StoreLocation::Sqlite(data_dir.join("jobs.sqlite")),
        };
        let settings = Self {
            addr: pick!(addr, "127.0.0.1:50051".parse().expect("a valid address")),
            http_addr,
            models: pick!(models, PathBuf::from("models")),
            default_model: args.default_model.clone().or(file.default_model.clone()),
            session: SessionOptions { device, intra_threads: pick!(intra_threads, 0), spin: false },
            batcher: BatcherConfig {
                max_batch: pick!(max_batch, 64),
                max_delay: Duration::from_millis(pick!(max_delay_ms, 2)),
                queue_capacity: pick!(queue_capacity, 1024),
            },
            limits: {
                let defaults = RequestLimits::default();
                RequestLimits {
                    max_client_batch: pick!(max_client_batch, 256),
                    decode: DecodeBudget {
                        max_image_pixels: pick!(max_image_pixels, defaults.decode.max_image_pixels),
                        max_request_pixels: pick!(max_request_pixels, defaults.decode.max_request_pixels),
                    },
                    decode_concurrency: pick!(decode_concurrency, defaults.decode_concurrency),
                    ..defaults
                }
            },
            max_message_bytes: pick!(max_message_bytes, 64 << 20),
            keep_versions: pick!(keep_versions, 2),
            poll_interval: Duration::from_millis(pick!(poll_interval_ms, 2000)),
            metrics_addr,
            tls,
            data_dir,
            job_store,
            job_lease: Duration::from_secs(pick!(job_lease_seconds, 30)),
            api_key_file: args.api_key_file.clone().or(file.api_key_file.clone()),
            auth_embeddings: pick!(auth_embeddings, false),
            finetune_data_root: args.finetune_data_root.clone().or(file.finetune_data_root.clone()),
            finetune_concurrency: pick!(finetune_concurrency, 1),
            finetune_threads: pick!(finetune_threads, 1),
            max_jobs_per_client: pick!(max_jobs_per_client, 4),
            max_dataset_images: pick!(max_dataset_images, 10_000),
            max_image_bytes: pick!(max_image_bytes, 4 << 20),
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("max-batch", self.batcher.max_batch),
            ("queue-capacity", self.batcher.queue_capacity),
            ("max-client-batch", self.limits.max_client_batch),
            ("keep-versions", self.keep_versions),
            ("finetune-concurrency", self.finetune_concurrency),
            ("finetune-threads", self.finetune_threads),
            ("max-message-bytes", self.max_message_bytes),
            ("decode-concurrency", self.limits.decode_concurrency),
            ("max-image-pixels", self.limits.decode.max_image_pixels as usize),
            ("max-request-pixels", self.limits.decode.max_request_pixels as usize),
        ];
        for (name, value) in positive {
            if value == 0 {
                bail!("--{name} must be at least 1");
            }
        }
        if self.tls.is_some() && self.http_addr.is_some() {
            // API keys and images must not cross the network in the clear beside a TLS port.
            bail!("--http-addr serves plain HTTP and cannot be combined with --tls-cert: put the HTTP endpoint behind a TLS-terminating proxy, or serve gRPC only");
        }
        if self.job_lease < Duration::from_secs(3) {
            bail!("--job-lease-seconds must be at least 3 (a server renews its leases several times a lease)");
        }
        if self.poll_interval.is_zero() {
            bail!("--poll-interval-ms must be at least 1");
        }
        Ok(())
    }
}

fn load_file(path: &Path) -> Result<FileSettings> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid config file", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_file_then_flags() {
        let defaults = ServeSettings::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(defaults.addr.to_string(), "127.0.0.1:50051");
        assert_eq!(defaults.models, PathBuf::from("models"));
        assert_eq!(defaults.batcher.max_batch, 64);
        assert_eq!(defaults.limits.max_client_batch, 256);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, "addr = \"0.0.0.0:6000\"\nmax_batch = 32\nmetrics_addr = \"off\"\n").unwrap();
        let args = ServeArgs { config: Some(path.clone()), max_batch: Some(16), ..Default::default() };
        let settings = ServeSettings::resolve(&args).unwrap();
        assert_eq!(settings.addr.to_string(), "0.0.0.0:6000", "from the file");
        assert_eq!(settings.batcher.max_batch, 16, "the flag wins");
        assert_eq!(settings.metrics_addr, None);

        std::fs::write(&path, "adr = \"typo\"\n").unwrap();
        let err = ServeSettings::resolve(&ServeArgs { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("adr"), "{err:#}");
        let err = ServeSettings::resolve(&ServeArgs { max_batch: Some(0), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("--max-batch"), "{err}");
        assert_eq!(defaults.http_addr, None, "the HTTP endpoint is off by default");
        let http =
            ServeSettings::resolve(&ServeArgs { http_addr: Some("127.0.0.1:8080".into()), ..Default::default() });
        assert_eq!(http.unwrap().http_addr, Some("127.0.0.1:8080".parse().unwrap()));
        let err =
            ServeSettings::resolve(&ServeArgs { http_addr: Some("port 80".into()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("--http-addr"), "{err}");
        let err = ServeSettings::resolve(&ServeArgs {
            http_addr: Some("127.0.0.1:8080".into()),
            tls_cert: Some("cert.pem".into()),
            tls_key: Some("key.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("plain HTTP"), "{err}");
        let err = ServeSettings::resolve(&ServeArgs { device: Some("tpu".into()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("tpu"), "{err}");
    }
}
