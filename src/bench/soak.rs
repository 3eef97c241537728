//! `contrastive bench soak`: the real server under a long mixed load, to show that memory stays
//! flat and latency steady. Clients send, round-robin: single-image tensors, 16-image PNG
//! batches, 8-image tensor batches, requests refused by design (a tensor outside the model's
//! range, an image over the pixel budget), and requests with a 5 ms deadline that the server
//! must drop. Meanwhile fine-tune jobs run one after another on the same server, each
//! publishing a version that the server then loads. Every interval prints the server's resident
//! memory (from /proc) and the latency percentiles of the successful calls of that interval.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tonic::Code;

use super::serve::{image_input, png_bytes, BenchTarget, ScratchDir};
use super::server_process::ServerProcess;
use crate::data::idx::{load_mnist_format_dir, Split};
use crate::proto::v1::{
    create_job_request, input, CreateJobRequest, EmbedRequest, GetJobRequest, HyperParameters, InlineDataset, Input,
    JobState, LabeledImage, Tensor,
};
use crate::registry::ModelRepository;

/// The model the fine-tune jobs publish (a fresh one, so the default model never changes).
const FINETUNE_OUTPUT: &str = "soak-finetune";
/// A call that takes longer than this counts as hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct SoakOptions {
    /// How long to run
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Seconds between report lines
    #[arg(long, default_value_t = 60.0)]
    pub interval_secs: f64,
    /// The model repository whose model is served (copied: jobs publish into the copy)
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// The model embedded with, and the fine-tunes' base
    #[arg(long, default_value = "fmnist-simclr")]
    pub model: String,
    /// MNIST-format folder whose images are sent and fine-tuned on
    #[arg(long, default_value = "tests/data/fashion-mnist-subset")]
    pub data: PathBuf,
    /// Embedding requests in flight
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// Run fine-tune jobs back to back (at most this many; 0: none)
    #[arg(long, default_value_t = 1000)]
    pub max_jobs: usize,
    /// Labelled images per fine-tune job
    #[arg(long, default_value_t = 200)]
    pub job_images: usize,
    /// Epochs per fine-tune job
    #[arg(long, default_value_t = 3)]
    pub job_epochs: u32,
    /// The server's ONNX Runtime threads per operator
    #[arg(long, default_value_t = 1)]
    pub intra_threads: usize,
    /// The `contrastive` binary to start as the server [default: this executable]
    #[arg(long)]
    pub server_binary: Option<PathBuf>,
}

/// What the load did in one interval.
#[derive(Debug, Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    /// Refusals the load asked for (INVALID_ARGUMENT on a bad input).
    refused: u64,
    /// Calls the 5 ms deadline ended (DEADLINE_EXCEEDED or CANCELLED), or that beat it.
    deadline: u64,
    /// Anything else: a wrong answer, an unexpected status, a hang.
    unexpected: u64,
    first_unexpected: Option<String>,
}

impl Tally {
    fn unexpected(&mut self, what: String) {
        self.unexpected += 1;
        self.first_unexpected.get_or_insert(what);
    }
}

/// One report line.
#[derive(Debug, Clone)]
struct Sample {
    at_min: f64,
    rss_mb: f64,
    p99_ms: f64,
    unexpected: u64,
}

pub fn run(options: &SoakOptions) -> Result<()> {
    validate(options)?;
    let dataset = load_mnist_format_dir(&options.data, Split::Test)?;
    ensure!(dataset.len() >= 16, "{} holds {} test images; the soak needs 16", options.data.display(), dataset.len());
    let scratch = ScratchDir::create()?;
    let models = scratch.0.join("models");
    copy_model(&options.models, &options.model, &models)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let target = BenchTarget {
        server_binary: options.server_binary.as_deref(),
        models: &models,
        model: &options.model,
        intra_threads: options.intra_threads,
    };
    let (server, _metrics) = target.spawn(&scratch.0, &[])?;
    let url = server.url();

    let pngs = (0..16).map(|i| image_input(&dataset, i, true)).collect::<Result<Vec<_>>>()?;
    let tensors = (0..8).map(|i| image_input(&dataset, i, false)).collect::<Result<Vec<_>>>()?;
    let labelled: Vec<LabeledImage> = (0..options.job_images.min(dataset.len()))
        .map(|i| Ok(LabeledImage { image: png_bytes(&dataset, i)?, label: format!("class-{}", dataset.labels[i]) }))
        .collect::<Result<_>>()?;
    let requests = Arc::new(Requests::new(&options.model, pngs, tensors));

    println!(
        "soak: {} for {} min, {} requests in flight, fine-tunes of {} images × {} epochs back to back; server pid {}",
        options.model,
        options.minutes,
        options.in_flight,
        labelled.len(),
        options.job_epochs,
        server.pid()
    );
    println!(
        "{:>6} {:>8} {:>9} {:>8} {:>8} {:>10} {:>8} {:>8} {:>8} {:>6}",
        "minute", "calls/s", "ok", "refused", "deadline", "unexpected", "p50 ms", "p99 ms", "RSS MB", "jobs"
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let jobs = Arc::new(Mutex::new(JobCounts::default()));
    let started = Instant::now();
    let samples = runtime.block_on(async {
        let mut workers = Vec::new();
        for worker in 0..options.in_flight {
            let client = crate::client::embedding_client(&url, None).await?;
            workers.push(tokio::spawn(embed_loop(client, requests.clone(), worker, tally.clone(), stop.clone())));
        }
        let finetune = (options.max_jobs > 0)
            .then(|| tokio::spawn(finetune_loop(url.clone(), options.clone(), labelled, jobs.clone(), stop.clone())));
        let samples = report_loop(options, &server, &tally, &jobs, started).await;
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.await?;
        }
        if let Some(finetune) = finetune {
            finetune.await??;
        }
        anyhow::Ok(samples?)
    })?;
    let jobs = jobs.lock().expect("jobs lock").clone();
    summarise(&samples, &jobs, &server)
}

fn validate(options: &SoakOptions) -> Result<()> {
    ensure!(options.minutes > 0.0, "--minutes {} must be positive", options.minutes);
    ensure!(options.interval_secs >= 1.0, "--interval-secs {} is below 1 s", options.interval_secs);
    ensure!(options.in_flight > 0, "--in-flight must be at least 1");
    ensure!(options.job_images >= 20, "--job-images {} is too few for a fine-tune (20 at least)", options.job_images);
    ensure!(options.job_epochs > 0, "--job-epochs must be at least 1");
    Ok(())
}

/// Copies every version of `model` into a fresh repository at `to`.
fn copy_model(repository: &Path, model: &str, to: &Path) -> Result<()> {
    let source = ModelRepository::new(repository);
    let versions = source.versions(model)?;
    ensure!(!versions.is_empty(), "{} holds no version of {model:?}", repository.display());
    for version in versions {
        let from = source.version_dir(model, version);
        let dest = to.join(model).join(version.to_string());
        std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
        for entry in std::fs::read_dir(&from).with_context(|| format!("cannot list {}", from.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), dest.join(entry.file_name()))
                    .with_context(|| format!("cannot copy {}", entry.path().display()))?;
            }
        }
    }
    Ok(())
}

/// The request mix, one of each kind; workers take them in turn.
struct Requests {
    kinds: Vec<(Kind, EmbedRequest)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Must succeed with one embedding per input.
    Good,
    /// Must be refused with INVALID_ARGUMENT.
    Refused,
    /// Sent with a 5 ms deadline: any of OK, DEADLINE_EXCEEDED, CANCELLED.
    Deadline,
}

impl Requests {
    fn new(model: &str, pngs: Vec<Input>, tensors: Vec<Input>) -> Self {
        let request = |inputs: Vec<Input>| EmbedRequest {
            model: model.to_string(),
            version: 0,
            inputs,
            normalize: Some(true),
            dimensions: 0,
        };
        let out_of_range =
            Input { data: Some(input::Data::Tensor(Tensor { shape: vec![28, 28], values: vec![1e30; 784] })) };
        // A 20000 × 20000 PNG header: refused from its header, before any pixel is decoded.
        let oversized = Input { data: Some(input::Data::Image(png_header(20_000, 20_000))) };
        let single = request(tensors[..1].to_vec());
        Self {
            kinds: vec![
                (Kind::Good, single.clone()),
                (Kind::Good, request(pngs.clone())),
                (Kind::Good, single.clone()),
                (Kind::Good, request(tensors.clone())),
                (Kind::Good, request(pngs[..1].to_vec())),
                (Kind::Refused, request(vec![tensors[0].clone(), out_of_range])),
                (Kind::Good, single),
                (Kind::Deadline, request(pngs)),
                (Kind::Refused, request(vec![oversized])),
                (Kind::Good, request(tensors)),
            ],
        }
    }
}

/// A PNG of `width × height` gray pixels that declares its size but holds almost no pixel data:
/// IHDR, an IDAT of an empty zlib stream, IEND. Its header alone must get it refused.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in
        [(b"IHDR", &ihdr[..]), (b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01][..]), (b"IEND", &[][..])]
    {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32fast::hash(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

type EmbeddingClient = crate::proto::v1::embedding_service_client::EmbeddingServiceClient<crate::client::AuthChannel>;

async fn embed_loop(
    mut client: EmbeddingClient,
    requests: Arc<Requests>,
    worker: usize,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
) {
    let mut turn = worker;
    while !stop.load(Ordering::Relaxed) {
        let (kind, request) = &requests.kinds[turn % requests.kinds.len()];
        turn += 1;
        let mut call = tonic::Request::new(request.clone());
        if *kind == Kind::Deadline {
            call.set_timeout(Duration::from_millis(5));
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.embed(call)).await;
        let elapsed_ms = sent.elapsed().as_secs_f64() * 1e3;
        let mut tally = tally.lock().expect("tally lock");
        match (kind, answer) {
            (_, Err(_)) => tally.unexpected(format!("a call took longer than {CALL_TIMEOUT:?}")),
            (Kind::Good, Ok(Ok(response))) => {
                let embeddings = response.into_inner().embeddings;
                let finite = embeddings.iter().all(|e| !e.values.is_empty() && e.values.iter().all(|v| v.is_finite()));
                if embeddings.len() == request.inputs.len() && finite {
                    tally.latencies_ms.push(elapsed_ms);
                } else {
                    tally.unexpected(format!("{} embeddings for {} inputs", embeddings.len(), request.inputs.len()));
                }
            }
            (Kind::Refused, Ok(Err(status))) if status.code() == Code::InvalidArgument => tally.refused += 1,
            (Kind::Deadline, Ok(Ok(_))) => tally.deadline += 1,
            (Kind::Deadline, Ok(Err(status))) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                tally.deadline += 1
            }
            (kind, Ok(Ok(_))) => tally.unexpected(format!("{kind:?} request answered OK")),
            (kind, Ok(Err(status))) => {
                tally.unexpected(format!("{kind:?} request: {:?} {}", status.code(), status.message()))
            }
        }
    }
}

#[derive(Debug, Default, Clone)]
struct JobCounts {
    succeeded: u64,
    other: Vec<String>,
    running: bool,
}

/// Fine-tune jobs one after another until `stop`.
async fn finetune_loop(
    url: String,
    options: SoakOptions,
    images: Vec<LabeledImage>,
    counts: Arc<Mutex<JobCounts>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut client = crate::client::finetune_client(&url, None).await?;
    for seed in 0..options.max_jobs as u64 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let request = CreateJobRequest {
            base_model: options.model.clone(),
            output_model: FINETUNE_OUTPUT.into(),
            hyper_parameters: Some(HyperParameters { epochs: options.job_epochs, seed, ..Default::default() }),
            data: Some(create_job_request::Data::InlineDataset(InlineDataset { images: images.clone() })),
            // Publish whatever the held-out accuracy: each job should load a new version.
            allow_worse: true,
            ..Default::default()
        };
        let job = client.create_job(request).await.map_err(crate::client::status_error)?.into_inner();
        counts.lock().expect("jobs lock").running = true;
        let state = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if stop.load(Ordering::Relaxed) {
                // The soak is over; the server goes with the job.
                return Ok(());
            }
            let job = client
                .get_job(GetJobRequest { job_id: job.job_id.clone() })
                .await
                .map_err(crate::client::status_error)?
                .into_inner();
            if job.state().is_terminal() {
                break (job.state(), job.error);
            }
        };
        let mut counts = counts.lock().expect("jobs lock");
        counts.running = false;
        match state {
            (JobState::Succeeded, _) => counts.succeeded += 1,
            (state, error) => {
                let message = error.map(|e| e.message).unwrap_or_default();
                counts.other.push(format!("{state:?}: {message}"))
            }
        }
    }
    Ok(())
}

/// Prints a line every interval until the time is up; returns the samples.
async fn report_loop(
    options: &SoakOptions,
    server: &ServerProcess,
    tally: &Mutex<Tally>,
    jobs: &Mutex<JobCounts>,
    started: Instant,
) -> Result<Vec<Sample>> {
    let interval = Duration::from_secs_f64(options.interval_secs);
    let end = started + Duration::from_secs_f64(options.minutes * 60.0);
    let mut samples = Vec::new();
    let mut next = started + interval;
    while next <= end + Duration::from_millis(1) {
        tokio::time::sleep_until(next.into()).await;
        let elapsed = interval.as_secs_f64();
        next += interval;
        if server.wait_exit(Duration::ZERO).is_some() {
            bail!("the server exited during the soak; its log ends:\n{}", server.log());
        }
        let rss_mb = resident_mb(server.pid())?;
        let mut taken = std::mem::take(&mut *tally.lock().expect("tally lock"));
        let calls = taken.latencies_ms.len() as u64 + taken.refused + taken.deadline + taken.unexpected;
        let p50 = percentile(&mut taken.latencies_ms, 0.50);
        let p99 = percentile(&mut taken.latencies_ms, 0.99);
        let jobs = jobs.lock().expect("jobs lock").clone();
        let at_min = started.elapsed().as_secs_f64() / 60.0;
        println!(
            "{:>6.1} {:>8.1} {:>9} {:>8} {:>8} {:>10} {:>8.1} {:>8.1} {:>8.1} {:>6}",
            at_min,
            calls as f64 / elapsed,
            taken.latencies_ms.len(),
            taken.refused,
            taken.deadline,
            taken.unexpected,
            p50,
            p99,
            rss_mb,
            format!("{}{}", jobs.succeeded + jobs.other.len() as u64, if jobs.running { "+1" } else { "" }),
        );
        if let Some(first) = &taken.first_unexpected {
            println!("       unexpected: {first}");
        }
        samples.push(Sample { at_min, rss_mb, p99_ms: p99, unexpected: taken.unexpected });
    }
    Ok(samples)
}

fn summarise(samples: &[Sample], jobs: &JobCounts, server: &ServerProcess) -> Result<()> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        bail!("the soak ended before its first interval");
    };
    let peak = samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max);
    // Memory growth over the second half, where warm-up (allocator pools, the first loaded
    // versions) is over.
    let middle = &samples[samples.len() / 2];
    let slope =
        if last.at_min > middle.at_min { (last.rss_mb - middle.rss_mb) / (last.at_min - middle.at_min) } else { 0.0 };
    let mut p99s: Vec<f64> = samples.iter().map(|s| s.p99_ms).filter(|p| p.is_finite()).collect();
    println!(
        "RSS: first interval {:.1} MB, peak {peak:.1} MB, last {:.1} MB; second half {:+.2} MB/min",
        first.rss_mb, last.rss_mb, slope
    );
    println!(
        "p99 per interval: median {:.1} ms, worst {:.1} ms",
        percentile(&mut p99s.clone(), 0.5),
        percentile(&mut p99s, 1.0)
    );
    println!("fine-tune jobs: {} succeeded, {} did not", jobs.succeeded, jobs.other.len());
    for failure in &jobs.other {
        println!("  {failure}");
    }
    println!("server log: {} bytes of warnings and errors", server.log().len());
    let unexpected: u64 = samples.iter().map(|s| s.unexpected).sum();
    ensure!(unexpected == 0, "{unexpected} calls ended unexpectedly");
    ensure!(jobs.other.is_empty(), "{} fine-tune jobs did not succeed", jobs.other.len());
    Ok(())
}

/// VmRSS of a process, in MB.
fn resident_mb(pid: u32) -> Result<f64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("cannot read the server's /proc status")?;
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .context("the server's /proc status has no VmRSS")?;
    Ok(kb / 1024.0)
}

/// The `q` quantile (nearest rank) of `values`; NaN when there are none.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut values, 0.99), 99.0);
        assert_eq!(percentile(&mut values, 0.5), 50.0);
        assert_eq!(percentile(&mut values, 1.0), 100.0);
        assert_eq!(percentile(&mut [3.0], 0.99), 3.0);
        assert!(percentile(&mut [], 0.5).is_nan());
    }

    #[test]
    fn the_oversized_png_header_reads_as_its_dimensions() {
        let png = png_header(20_000, 300);
        assert_eq!(crate::registry::input::image_dimensions(&png), Ok((20_000, 300)));
    }
}
