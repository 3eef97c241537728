//! `contrastive bench serve`: embedding throughput of the gRPC server as a ratio of in-process
//! ONNX Runtime throughput measured in the same run (the ceiling: batch 64, no network, no
//! decoding), so the figures hold on a shared, noisy machine.
//!
//! Rows: the in-process baseline, then the real server binary on loopback with (a)
//! `request_batch`-image requests and (b) single-image requests, 64 in flight, which only dynamic
//! batching turns into full batches. A baseline segment runs before the server starts and after
//! every server row (the server sits idle meanwhile), and each row is divided by the mean of the
//! segments either side of it, so load that others put on the machine during the run cancels.
//! Two load generators: a tonic client in this process (always), and `h2load` (nghttp2) posting
//! a gRPC-framed body, which costs the server's CPUs much less. Both are checked first: the
//! server's embeddings must match in-process ONNX Runtime, and h2load's responses must carry
//! embedding-sized payloads, since gRPC errors arrive as HTTP 200 with a `grpc-status` trailer.
//!
//! Beside the figures the run records where CPU time went (this process, the server, h2load)
//! and the server's own view from its Prometheus metrics (mean batch size, ONNX Runtime busy
//! time), the first things to look at when (b) falls short.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Context, Result};
use prost::Message;

use super::server_process::{ServerCommand, ServerProcess};
use crate::data::idx::{load_mnist_format_dir, Split};
use crate::data::Dataset;
use crate::proto::v1::{input, EmbedRequest, Input, Tensor};
use crate::registry::manifest::MODEL_FILE;
use crate::registry::ModelRepository;
use crate::runtime::{InferenceDevice, OnnxEncoder, SessionOptions};

/// Which load generators drive the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generator {
    /// The tonic client, plus h2load when it is on PATH.
    Auto,
    /// The tonic client in this process only.
    Tonic,
    /// h2load only (it must be installed; the tonic client still checks the answers once).
    H2load,
}

/// `contrastive bench serve` options. `Default` gives the same values as the flags' defaults.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ServeBenchOptions {
    /// The model repository the server loads
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// The model to embed with
    #[arg(long, default_value = "fmnist-simclr")]
    pub model: String,
    /// Its version; 0 takes the newest in the repository
    #[arg(long, default_value_t = 0)]
    pub version: u64,
    /// MNIST-format folder whose test images are sent
    #[arg(long, default_value = "tests/data/fashion-mnist-subset")]
    pub data: PathBuf,
    /// Send PNG bytes (decoded by the server) instead of float tensors
    #[arg(long)]
    pub png: bool,
    /// Images per request in (a), and the batch size of the in-process baseline
    #[arg(long, default_value_t = 64)]
    pub request_batch: usize,
    /// Requests in flight in (a); each holds request_batch images of the server's queue
    #[arg(long, default_value_t = 4)]
    pub batch_in_flight: usize,
    /// Single-image requests in flight in (b)
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// ONNX Runtime threads per operator, in-process and in the server
    #[arg(long, default_value_t = 2)]
    pub intra_threads: usize,
    /// The server's --max-batch
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// The server's --max-delay-ms
    #[arg(long, default_value_t = 2)]
    pub max_delay_ms: u64,
    /// Measured seconds per server row; each baseline segment gets half of it
    #[arg(long, default_value_t = 8.0)]
    pub duration_secs: f64,
    /// Unmeasured seconds before each measurement
    #[arg(long, default_value_t = 1.5)]
    pub warmup_secs: f64,
    /// Load generators
    #[arg(long, value_enum, default_value_t = Generator::Auto)]
    pub generator: Generator,
    /// Worker threads of the tonic client's async runtime
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// The `contrastive` binary to start as the server [default: this executable]
    #[arg(long)]
    pub server_binary: Option<PathBuf>,
    /// Where ONNX Runtime runs, in this process and in the server: cpu, cuda or cuda:N (the GPU
    /// build of ONNX Runtime, `scripts/fetch-onnxruntime --gpu`)
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl Default for ServeBenchOptions {
    fn default() -> Self {
        Self {
            models: PathBuf::from("models"),
            model: "fmnist-simclr".into(),
            version: 0,
            data: PathBuf::from("tests/data/fashion-mnist-subset"),
            png: false,
            request_batch: 64,
            batch_in_flight: 4,
            in_flight: 64,
            intra_threads: 2,
            max_batch: 64,
            max_delay_ms: 2,
            duration_secs: 8.0,
            warmup_secs: 1.5,
            generator: Generator::Auto,
            client_threads: 1,
            server_binary: None,
            device: "cpu".into(),
        }
    }
}

/// The targets the issue sets, as fractions of the in-process figure.
const TARGET_BATCHED: f64 = 0.95;
const TARGET_SINGLE: f64 = 0.8;
/// Linux reports process CPU time in clock ticks of 1/100 s (USER_HZ) on every architecture.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;
/// The longest the server may take to print its address and load the model.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the benchmark and prints its tables to stdout.
pub fn run(options: &ServeBenchOptions) -> Result<()> {
    validate(options)?;
    let repository = ModelRepository::new(&options.models);
    let version = match options.version {
        0 => *repository
            .versions(&options.model)?
            .last()
            .with_context(|| format!("{} holds no version of {:?}", options.models.display(), options.model))?,
        v => v,
    };
    let manifest = repository.manifest(&options.model, version)?;
    let model_path = repository.version_dir(&options.model, version).join(MODEL_FILE);
    let dataset = load_mnist_format_dir(&options.data, Split::Test)?;
    ensure!(
        dataset.shape.dims() == manifest.image_dims(),
        "{} holds images of {:?} but {}:{version} takes {:?}",
        options.data.display(),
        dataset.shape.dims(),
        options.model,
        manifest.image_dims()
    );
    let workload = Workload::new(&dataset, options, version)?;
    let h2load = match options.generator {
        Generator::Tonic => None,
        Generator::Auto => find_on_path("h2load"),
        Generator::H2load => Some(
            find_on_path("h2load")
                .context("--generator h2load: h2load is not on PATH (Debian: apt-get install nghttp2-client)")?,
        ),
    };
    let scratch = ScratchDir::create()?;
    let half = options.duration_secs / 2.0;
    let device: InferenceDevice = options.device.parse().context("--device")?;
    let session = SessionOptions { device, intra_threads: options.intra_threads, ..SessionOptions::default() };

    eprintln!("baseline: in-process ONNX Runtime on {}, batch {}, {half:.1} s", options.device, options.request_batch);
    let mut baseline = Baseline::load(&model_path, session, &workload)?;
    // On a GPU, the answers must also be the CPU's (the server's are checked against the baseline).
    let gpu_vs_cpu = if device == InferenceDevice::Cpu {
        None
    } else {
        let cpu = SessionOptions { device: InferenceDevice::Cpu, ..session };
        let on_cpu = Baseline::load(&model_path, cpu, &workload)?;
        Some(max_abs_difference(&baseline.expected.concat(), &on_cpu.expected.concat()))
    };
    let mut segments = vec![baseline.measure(secs(options.warmup_secs), secs(half))?];
    // The session is warm after the first segment; later ones need only a moment to settle.
    let segment_warmup = secs(options.warmup_secs.min(0.5));

    let server = BenchServer::spawn(options, &scratch.0)?;
    eprintln!("server {} (pid {}) is serving", server.process.addr(), server.process.pid());
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(options.client_threads).enable_all().build()?;
    let response_len =
        runtime.block_on(verify(&server.url(), &workload, &baseline.expected, &options.model, version))?;

    let mut rows = Vec::new();
    let phases = [
        (Load::Batched, &workload.batched, options.batch_in_flight),
        (Load::Single, &workload.single, options.in_flight),
    ];
    if options.generator != Generator::H2load {
        for (load, requests, in_flight) in phases {
            eprintln!("{}, tonic, {in_flight} in flight", load.label(options.request_batch));
            let measured = runtime.block_on(tonic_load(
                &server,
                requests.clone(),
                in_flight,
                secs(options.warmup_secs),
                secs(options.duration_secs),
            ))?;
            rows.push(Row { load, generator: "tonic", measured });
            segments.push(baseline.measure(segment_warmup, secs(half))?);
        }
    }
    if let Some(h2load) = &h2load {
        for (load, requests, in_flight) in phases {
            eprintln!("{}, h2load, {in_flight} in flight", load.label(options.request_batch));
            let run = H2loadRun {
                program: h2load,
                scratch: &scratch.0,
                body: grpc_frame(&requests[0]),
                images_per_request: requests[0].inputs.len(),
                expected_response_len: response_len[load as usize],
                in_flight,
                warmup: secs(options.warmup_secs),
                duration: secs(options.duration_secs),
            };
            rows.push(Row { load, generator: "h2load", measured: run.measure(&server)? });
            segments.push(baseline.measure(segment_warmup, secs(half))?);
        }
    }
    drop(runtime);
    drop(server);
    print_report(options, &manifest.name, version, h2load.as_deref(), &segments, &rows);
    if let Some(difference) = gpu_vs_cpu {
        println!(
            "{} vs CPU, the first batch's L2-normalised embeddings: max |difference| {difference:.2e} (target ≤ 1e-4): {}",
            options.device,
            if difference <= 1e-4 { "ok" } else { "OVER" }
        );
    }
    Ok(())
}

/// The largest element-wise difference between two runs of values.
fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn validate(options: &ServeBenchOptions) -> Result<()> {
    let counts = [
        ("request-batch", options.request_batch),
        ("batch-in-flight", options.batch_in_flight),
        ("in-flight", options.in_flight),
        ("max-batch", options.max_batch),
        ("client-threads", options.client_threads),
    ];
    for (name, value) in counts {
        ensure!(value > 0, "--{name} must be at least 1");
    }
    ensure!(
        options.duration_secs >= 0.5,
        "--duration-secs {} is too short to measure; use at least 0.5",
        options.duration_secs
    );
    ensure!(options.warmup_secs >= 0.0, "--warmup-secs {} is negative", options.warmup_secs);
    Ok(())
}

fn secs(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds)
}

/// The two request shapes sent to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// (a) `request_batch` images per request.
    Batched = 0,
    /// (b) one image per request.
    Single = 1,
}

impl Load {
    fn label(self, request_batch: usize) -> String {
        match self {
            Load::Batched => format!("(a) {request_batch}-image requests"),
            Load::Single => "(b) 1-image requests".into(),
        }
    }
}

/// The images, as in-process batches and as the requests of (a) and (b).
struct Workload {
    dims: [usize; 3],
    batch: usize,
    /// Whole batches of `batch` images, row-major.
    batches: Vec<Vec<f32>>,
    batched: Arc<Vec<EmbedRequest>>,
    single: Arc<Vec<EmbedRequest>>,
}

impl Workload {
    fn new(dataset: &Dataset, options: &ServeBenchOptions, version: u64) -> Result<Self> {
        let batch = options.request_batch;
        ensure!(
            dataset.len() >= batch,
            "{} holds {} test images; --request-batch {batch} needs at least that many",
            options.data.display(),
            dataset.len()
        );
        let inputs = (0..dataset.len()).map(|i| image_input(dataset, i, options.png)).collect::<Result<Vec<_>>>()?;
        let request = |inputs: &[Input]| EmbedRequest {
            model: options.model.clone(),
            version,
            inputs: inputs.to_vec(),
            normalize: Some(true),
            dimensions: 0,
        };
        let whole = dataset.len() / batch;
        let numel = dataset.shape.numel();
        Ok(Self {
            dims: dataset.shape.dims(),
            batch,
            batches: (0..whole).map(|b| dataset.images[b * batch * numel..(b + 1) * batch * numel].to_vec()).collect(),
            batched: Arc::new(inputs.chunks_exact(batch).map(request).collect()),
            single: Arc::new(inputs.chunks(1).map(request).collect()),
        })
    }
}

/// Image `i` of `dataset` as a request input: its float tensor, or (`png`) PNG bytes of its pixels.
pub(super) fn image_input(dataset: &Dataset, i: usize, png: bool) -> Result<Input> {
    let data = if png {
        input::Data::Image(png_bytes(dataset, i)?)
    } else {
        let [c, h, w] = dataset.shape.dims();
        input::Data::Tensor(Tensor { shape: vec![c as u32, h as u32, w as u32], values: dataset.image(i).to_vec() })
    };
    Ok(Input { data: Some(data) })
}

/// Image `i` of a grayscale `dataset` as the PNG file a client would send or upload.
pub(super) fn png_bytes(dataset: &Dataset, i: usize) -> Result<Vec<u8>> {
    let [c, h, w] = dataset.shape.dims();
    ensure!(c == 1, "PNGs are sent as grayscale; the dataset has {c} channels");
    let pixels: Vec<u8> = dataset.image(i).iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    let mut bytes = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut bytes),
        &pixels,
        w as u32,
        h as u32,
        image::ExtendedColorType::L8,
    )
    .with_context(|| format!("cannot encode image {i} as PNG"))?;
    Ok(bytes)
}

/// What one row measured.
#[derive(Debug, Default)]
struct Measured {
    images_per_s: f64,
    /// Latency of each measured request (each batch, in-process), milliseconds.
    latencies_ms: Vec<f64>,
    /// Requests that failed (gRPC error or non-2xx), by what went wrong.
    errors: Vec<(String, usize)>,
    /// CPU cores busy, on average over the measurement: the load generator, the server.
    generator_cpu: Option<f64>,
    server_cpu: Option<f64>,
    /// From the server's metrics: images per ONNX Runtime batch, fraction of time ORT ran.
    mean_batch: Option<f64>,
    ort_busy: Option<f64>,
    /// Mean of the server's own `Timing.total_ms` (tonic only).
    server_total_ms: Option<f64>,
}

/// The baseline: whole batches through ONNX Runtime in this process.
struct Baseline<'a> {
    encoder: OnnxEncoder,
    workload: &'a Workload,
    next: usize,
    /// The L2-normalised embeddings of the first batch, to check the server's answers against.
    expected: Vec<Vec<f32>>,
}

impl<'a> Baseline<'a> {
    fn load(model: &Path, session: SessionOptions, workload: &'a Workload) -> Result<Self> {
        ensure!(!workload.batches.is_empty(), "no whole batch of {} images to run", workload.batch);
        let mut encoder = OnnxEncoder::load(model, session)?;
        let (first, dimensions) = encoder.run(&workload.batches[0], workload.batch, workload.dims)?;
        let expected = first
            .chunks(dimensions)
            .map(|row| {
                let norm = (row.iter().map(|v| v * v).sum::<f32>() + 1e-24).sqrt();
                row.iter().map(|v| v / norm).collect()
            })
            .collect();
        Ok(Self { encoder, workload, next: 0, expected })
    }

    fn run_one(&mut self) -> Result<()> {
        let batches = &self.workload.batches;
        self.encoder.run(&batches[self.next % batches.len()], self.workload.batch, self.workload.dims)?;
        self.next += 1;
        Ok(())
    }

    /// One segment: batches for `duration` after `warmup`.
    fn measure(&mut self, warmup: Duration, duration: Duration) -> Result<Measured> {
        let warm = Instant::now();
        while warm.elapsed() < warmup {
            self.run_one()?;
        }
        let cpu = ProcessCpu::of_self();
        let start = Instant::now();
        let mut latencies_ms = Vec::new();
        while start.elapsed() < duration {
            let began = Instant::now();
            self.run_one()?;
            latencies_ms.push(began.elapsed().as_secs_f64() * 1e3);
        }
        let wall = start.elapsed().as_secs_f64();
        Ok(Measured {
            images_per_s: (latencies_ms.len() * self.workload.batch) as f64 / wall,
            latencies_ms,
            generator_cpu: cpu.and_then(|cpu| cpu.cores_since(wall)),
            ..Measured::default()
        })
    }
}

/// The server binary on loopback (the harness the end-to-end tests use too), with its metrics
/// address for the server's own view of a row.
struct BenchServer {
    process: ServerProcess,
    metrics: SocketAddr,
}

impl BenchServer {
    fn spawn(options: &ServeBenchOptions, scratch: &Path) -> Result<Self> {
        let target = BenchTarget {
            server_binary: options.server_binary.as_deref(),
            models: &options.models,
            model: &options.model,
            intra_threads: options.intra_threads,
        };
        let batching = [
            "--max-batch".to_string(),
            options.max_batch.to_string(),
            "--max-delay-ms".to_string(),
            options.max_delay_ms.to_string(),
            "--device".to_string(),
            options.device.clone(),
        ];
        let (process, metrics) = target.spawn(scratch, &batching)?;
        Ok(Self { process, metrics })
    }

    fn url(&self) -> String {
        self.process.url()
    }

    fn cpu(&self) -> Option<ProcessCpu> {
        ProcessCpu::of_pid(self.process.pid())
    }

    fn metrics(&self) -> Option<ServerMetrics> {
        scrape_metrics(self.metrics).map_err(|error| eprintln!("warning: {error:#}")).ok()
    }
}

/// The server a benchmark starts: `model` of the repository `models` as the default model, job
/// state and logs in a scratch folder, metrics on a free port.
pub(super) struct BenchTarget<'a> {
    /// The `contrastive` binary; `None`: this executable.
    pub server_binary: Option<&'a Path>,
    pub models: &'a Path,
    pub model: &'a str,
    pub intra_threads: usize,
}

impl BenchTarget<'_> {
    /// Starts the server with `extra` arguments and waits until it is SERVING; returns it with
    /// its metrics address.
    pub fn spawn(&self, scratch: &Path, extra: &[String]) -> Result<(ServerProcess, SocketAddr)> {
        let binary = match self.server_binary {
            Some(path) => path.to_path_buf(),
            None => std::env::current_exe().context("cannot find this executable to start as the server")?,
        };
        let metrics = free_port().context("cannot find a free port for the server's metrics")?;
        let mut command = ServerCommand::new(binary, scratch.join("server.log"))
            .args(["--metrics-addr", &metrics.to_string(), "--models"])
            .arg(self.models)
            .args(["--default-model", self.model])
            .args(["--intra-threads", &self.intra_threads.to_string()])
            .args(extra)
            // Fine-tune job state stays out of the working folder.
            .arg("--data-dir")
            .arg(scratch.join("data"));
        command.log_level = "warn".into();
        command.start_timeout = SERVER_START_TIMEOUT;
        let process = ServerProcess::spawn(&command)?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(process.wait_serving(SERVER_START_TIMEOUT))?;
        Ok((process, metrics))
    }
}

/// A loopback port free a moment ago (the server binds it right after).
fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Sends the first request of (a) and of (b) and checks the embeddings against in-process
/// ONNX Runtime. Returns the encoded size of each response, gRPC frame included.
async fn verify(
    url: &str,
    workload: &Workload,
    expected: &[Vec<f32>],
    model: &str,
    version: u64,
) -> Result<[usize; 2]> {
    let mut client = crate::client::embedding_client(url, None).await?;
    let mut lengths = [0; 2];
    for (load, request, expected) in
        [(Load::Batched, &workload.batched[0], expected), (Load::Single, &workload.single[0], &expected[..1])]
    {
        let response = client
            .embed(request.clone())
            .await
            .map_err(crate::client::status_error)
            .context("the check request failed")?
            .into_inner();
        ensure!(
            response.model == model && response.version == version,
            "the server answered with {}:{}, not {model}:{version}",
            response.model,
            response.version
        );
        ensure!(
            response.embeddings.len() == expected.len(),
            "{} embeddings for {} images",
            response.embeddings.len(),
            expected.len()
        );
        for (i, (got, want)) in response.embeddings.iter().zip(expected).enumerate() {
            ensure!(
                got.values.len() == want.len(),
                "embedding {i} has {} values, not {}",
                got.values.len(),
                want.len()
            );
            let diff = max_abs_difference(&got.values, want);
            ensure!(diff < 1e-3, "the server's embedding of image {i} differs from in-process ONNX Runtime by {diff}");
        }
        lengths[load as usize] = grpc_frame(&response).len();
    }
    Ok(lengths)
}

/// Drives the server with `in_flight` concurrent tonic calls over one HTTP/2 connection.
async fn tonic_load(
    server: &BenchServer,
    requests: Arc<Vec<EmbedRequest>>,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Measured> {
    struct Done {
        finished: Instant,
        latency: Duration,
        images: usize,
        server_total_ms: f64,
    }
    let client = crate::client::embedding_client(&server.url(), None).await?;
    let started = tokio::time::Instant::now();
    let (window_start, window_end) = (started + warmup, started + warmup + duration);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..in_flight {
        let (mut client, requests, stop) = (client.clone(), requests.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut done, mut errors) = (Vec::new(), Vec::new());
            let mut next = task;
            while !stop.load(Ordering::Relaxed) {
                let request = requests[next % requests.len()].clone();
                next += in_flight;
                let images = request.inputs.len();
                let began = Instant::now();
                let result = client.embed(request).await;
                let finished = Instant::now();
                match result {
                    Ok(response) => {
                        let response = response.into_inner();
                        let server_total_ms = response.timing.map_or(f64::NAN, |t| t.total_ms);
                        done.push(Done {
                            finished,
                            latency: finished - began,
                            images: response.embeddings.len().min(images),
                            server_total_ms,
                        });
                    }
                    Err(status) => errors.push((finished, format!("{:?}", status.code()))),
                }
            }
            (done, errors)
        }));
    }
    tokio::time::sleep_until(window_start).await;
    let (cpu, server_cpu, metrics) = (ProcessCpu::of_self(), server.cpu(), server.metrics());
    tokio::time::sleep_until(window_end).await;
    let wall = (tokio::time::Instant::now() - window_start).as_secs_f64();
    let (cpu, server_cpu, metrics) = (
        cpu.and_then(|c| c.cores_since(wall)),
        server_cpu.and_then(|c| c.cores_since(wall)),
        metrics.zip(server.metrics()).map(|(before, after)| after.since(&before, wall)),
    );
    stop.store(true, Ordering::Relaxed);

    let (window_start, window_end) = (window_start.into_std(), window_end.into_std());
    let in_window = |t: Instant| t >= window_start && t <= window_end;
    let mut measured = Measured { generator_cpu: cpu, server_cpu, ..Measured::default() };
    (measured.mean_batch, measured.ort_busy) = metrics.map_or((None, None), |(batch, busy)| (Some(batch), Some(busy)));
    let (mut images, mut server_total, mut errors) = (0, Vec::new(), std::collections::BTreeMap::new());
    for task in tasks {
        let (done, failed) = task.await?;
        for d in done.into_iter().filter(|d| in_window(d.finished)) {
            images += d.images;
            measured.latencies_ms.push(d.latency.as_secs_f64() * 1e3);
            server_total.push(d.server_total_ms);
        }
        for (_, code) in failed.into_iter().filter(|(t, _)| in_window(*t)) {
            *errors.entry(code).or_insert(0) += 1;
        }
    }
    measured.images_per_s = images as f64 / duration.as_secs_f64();
    measured.server_total_ms =
        (!server_total.is_empty()).then(|| server_total.iter().sum::<f64>() / server_total.len() as f64);
    measured.errors = errors.into_iter().collect();
    Ok(measured)
}

/// A gRPC message frame: a 0 byte (not compressed), the length as big-endian u32, the message.
fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// One h2load run: the same framed request, `in_flight` streams on one connection.
struct H2loadRun<'a> {
    program: &'a Path,
    scratch: &'a Path,
    body: Vec<u8>,
    images_per_request: usize,
    /// A successful response's size; an error response (trailers only) carries no data.
    expected_response_len: usize,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
}

impl H2loadRun<'_> {
    fn measure(&self, server: &BenchServer) -> Result<Measured> {
        let body_path = self.scratch.join(format!("body-{}.bin", self.images_per_request));
        let log_path = self.scratch.join(format!("h2load-{}.log", self.images_per_request));
        std::fs::write(&body_path, &self.body).with_context(|| format!("cannot write {}", body_path.display()))?;
        let url = format!("{}/contrastive.v1.EmbeddingService/Embed", server.url());
        let children_cpu = ProcessCpu::of_self();
        let launched = Instant::now();
        let child = Command::new(self.program)
            .arg(format!("-D{}ms", self.duration.as_millis()))
            .arg(format!("--warm-up-time={}ms", self.warmup.as_millis()))
            .args(["-c1", "-t1", &format!("-m{}", self.in_flight)])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .arg("-d")
            .arg(&body_path)
            .arg("--log-file")
            .arg(&log_path)
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        let window_start_epoch = SystemTime::now() + self.warmup;
        std::thread::sleep(self.warmup);
        let (server_cpu, metrics) = (server.cpu(), server.metrics());
        std::thread::sleep(self.duration);
        let wall = self.duration.as_secs_f64();
        let server_cpu = server_cpu.and_then(|c| c.cores_since(wall));
        let metrics = metrics.zip(server.metrics()).map(|(before, after)| after.since(&before, wall));
        let output = child.wait_with_output().context("h2load did not finish")?;
        let total_wall = launched.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "h2load failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let summary =
            parse_h2load_summary(&stdout).with_context(|| format!("cannot read h2load's summary:\n{stdout}"))?;
        ensure!(summary.succeeded > 0, "h2load completed no request:\n{stdout}");
        // Every response must carry an embedding payload: gRPC errors are HTTP 200 without data.
        let per_response = summary.data_bytes as f64 / summary.succeeded as f64;
        ensure!(
            per_response >= 0.9 * self.expected_response_len as f64,
            "h2load's responses carry {per_response:.0} data bytes each where an embedding response has {}: the server answered with gRPC errors",
            self.expected_response_len
        );
        let log = std::fs::read_to_string(&log_path)
            .with_context(|| format!("cannot read h2load's log {}", log_path.display()))?;
        let start_us = window_start_epoch.duration_since(UNIX_EPOCH)?.as_micros() as u64;
        let end_us = start_us + self.duration.as_micros() as u64;
        let mut measured = Measured {
            images_per_s: summary.req_per_s * self.images_per_request as f64,
            latencies_ms: parse_h2load_log(&log, start_us, end_us),
            generator_cpu: children_cpu.and_then(|c| c.children_cores_since(total_wall)),
            server_cpu,
            ..Measured::default()
        };
        (measured.mean_batch, measured.ort_busy) =
            metrics.map_or((None, None), |(batch, busy)| (Some(batch), Some(busy)));
        let failed = summary.failed + summary.errored;
        if failed > 0 {
            measured.errors.push(("h2load failed/errored".into(), failed as usize));
        }
        Ok(measured)
    }
}

/// The figures read from h2load's summary.
#[derive(Debug, PartialEq)]
struct H2loadSummary {
    req_per_s: f64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    /// Bytes of DATA frames received.
    data_bytes: u64,
}

/// Reads `finished in …, N req/s, …`, `requests: … N succeeded, N failed, N errored …` and
/// `traffic: … (N) data` from h2load's output.
fn parse_h2load_summary(text: &str) -> Result<H2loadSummary> {
    let line = |prefix: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix)).ok_or_else(|| anyhow!("no line starting {prefix:?}"))
    };
    let finished = line("finished in")?;
    let req_per_s = finished
        .split(", ")
        .find_map(|part| part.strip_suffix(" req/s"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow!("no req/s in {finished:?}"))?;
    let requests = line("requests:")?;
    let count = |word: &str| -> Result<u64> {
        requests
            .split(',')
            .find_map(|part| part.trim().strip_suffix(word).and_then(|n| n.trim().parse().ok()))
            .ok_or_else(|| anyhow!("no {word:?} count in {requests:?}"))
    };
    let traffic = line("traffic:")?;
    let data_bytes = traffic
        .split(", ")
        .find(|part| part.ends_with(" data"))
        .and_then(|part| part.split_once('(')?.1.split_once(')')?.0.parse().ok())
        .ok_or_else(|| anyhow!("no data bytes in {traffic:?}"))?;
    Ok(H2loadSummary {
        req_per_s,
        succeeded: count("succeeded")?,
        failed: count("failed")?,
        errored: count("errored")?,
        data_bytes,
    })
}

/// Latencies (ms) of the 2xx requests in h2load's `--log-file` (start µs since the epoch, status,
/// µs to the end of the response) that ended within `[start_us, end_us]`.
fn parse_h2load_log(log: &str, start_us: u64, end_us: u64) -> Vec<f64> {
    log.lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let began: u64 = fields.next()?.trim().parse().ok()?;
            let status: i32 = fields.next()?.trim().parse().ok()?;
            let elapsed: u64 = fields.next()?.trim().parse().ok()?;
            let ended = began + elapsed;
            ((200..300).contains(&status) && ended >= start_us && ended <= end_us).then_some(elapsed as f64 / 1e3)
        })
        .collect()
}

/// CPU time of a process: its own and that of the children it has waited for.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcessCpu {
    own_secs: f64,
    children_secs: f64,
    taken: Instant,
    pid: Option<u32>,
}

impl ProcessCpu {
    fn of_self() -> Option<Self> {
        Self::read(None)
    }

    fn of_pid(pid: u32) -> Option<Self> {
        Self::read(Some(pid))
    }

    fn read(pid: Option<u32>) -> Option<Self> {
        let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |pid| format!("/proc/{pid}/stat"));
        let (own_secs, children_secs) = parse_stat_cpu(&std::fs::read_to_string(path).ok()?)?;
        Some(Self { own_secs, children_secs, taken: Instant::now(), pid })
    }

    /// Cores kept busy by the process itself since this reading, over `wall` seconds.
    fn cores_since(self, wall: f64) -> Option<f64> {
        Some((Self::read(self.pid)?.own_secs - self.own_secs) / wall)
    }

    /// Cores kept busy by children reaped since this reading, over `wall` seconds.
    fn children_cores_since(self, wall: f64) -> Option<f64> {
        Some((Self::read(self.pid)?.children_secs - self.children_secs) / wall)
    }
}

/// `(utime + stime, cutime + cstime)` in seconds from a `/proc/<pid>/stat` line (fields 14–17;
/// the command name in parentheses may itself hold spaces, so fields count from the last `)`).
fn parse_stat_cpu(stat: &str) -> Option<(f64, f64)> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = |field: usize| fields.get(field - 3)?.parse::<f64>().ok();
    Some(((ticks(14)? + ticks(15)?) / CLOCK_TICKS_PER_SEC, (ticks(16)? + ticks(17)?) / CLOCK_TICKS_PER_SEC))
}

/// Running totals of the server's batch histograms.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ServerMetrics {
    batches: f64,
    images: f64,
    inference_secs: f64,
}

impl ServerMetrics {
    /// Mean images per batch and the fraction of `wall` that ONNX Runtime ran, since `before`.
    fn since(&self, before: &ServerMetrics, wall: f64) -> (f64, f64) {
        let batches = self.batches - before.batches;
        ((self.images - before.images) / batches.max(1.0), (self.inference_secs - before.inference_secs) / wall)
    }
}

fn scrape_metrics(addr: SocketAddr) -> Result<ServerMetrics> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("cannot reach the server's metrics on {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    // HTTP/1.0: the body comes whole, never chunked.
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text).with_context(|| format!("cannot read the metrics from {addr}"))?;
    Ok(ServerMetrics {
        batches: metric_total(&text, "contrastive_batch_size_count"),
        images: metric_total(&text, "contrastive_batch_size_sum"),
        inference_secs: metric_total(&text, "contrastive_inference_duration_seconds_sum"),
    })
}

/// The sum over all label sets of the Prometheus samples named `name`.
fn metric_total(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series.split('{').next()? == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The `p`-th percentile (0 < p ≤ 100) by nearest rank: the smallest value with at least p% of
/// the values at or below it. NaN for no values.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|path| path.is_file())
}

/// A benchmark's scratch folder (server logs, h2load's files, published versions), removed
/// afterwards.
pub(super) struct ScratchDir(pub(super) PathBuf);

impl ScratchDir {
    pub(super) fn create() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("contrastive-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Row {
    load: Load,
    generator: &'static str,
    measured: Measured,
}

fn print_report(
    options: &ServeBenchOptions,
    model: &str,
    version: u64,
    h2load: Option<&Path>,
    segments: &[Measured],
    rows: &[Row],
) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let generators = match (options.generator, h2load) {
        (Generator::H2load, Some(path)) => format!("h2load ({})", path.display()),
        (_, Some(path)) => format!(
            "tonic client in this process ({} runtime thread(s)); h2load ({})",
            options.client_threads,
            path.display()
        ),
        (_, None) => {
            format!("tonic client in this process ({} runtime thread(s)); h2load not on PATH", options.client_threads)
        }
    };
    println!(
        "contrastive bench serve: {model}:{version} on {cores} cores (load average {load}), ONNX Runtime on {} with {} intra-op threads",
        options.device, options.intra_threads
    );
    println!(
        "server: --max-batch {} --max-delay-ms {}; inputs: Fashion-MNIST test images as {}; {:.1} s measured after {:.1} s warm-up",
        options.max_batch,
        options.max_delay_ms,
        if options.png { "PNG bytes" } else { "float tensors" },
        options.duration_secs,
        options.warmup_secs
    );
    println!(
        "in flight: (a) {} requests of {} images, (b) {} requests of 1 image, one HTTP/2 connection; generators: {generators}",
        options.batch_in_flight, options.request_batch, options.in_flight
    );
    let rates: Vec<String> = segments.iter().map(|s| format!("{:.0}", s.images_per_s)).collect();
    println!(
        "baseline segments (in-process batch {}, before the server and after each row), images/s: {}",
        options.request_batch,
        rates.join(", ")
    );
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>6} {:>8} {:>8} {:>6} {:>8} {:>7} {:>6} {:>6}  errors",
        "row",
        "generator",
        "images/s",
        "baseline",
        "ratio",
        "p50 ms",
        "p99 ms",
        "batch",
        "ORT busy",
        "gen CPU",
        "server",
        "srv ms"
    );
    let mean = segments.iter().map(|s| s.images_per_s).sum::<f64>() / segments.len() as f64;
    let all = Measured {
        images_per_s: mean,
        latencies_ms: segments.iter().flat_map(|s| s.latencies_ms.iter().copied()).collect(),
        generator_cpu: Some(segments.iter().filter_map(|s| s.generator_cpu).sum::<f64>() / segments.len() as f64),
        ..Measured::default()
    };
    print_row(&format!("baseline in-process, batch {}", options.request_batch), "-", &all, mean);
    let mut verdicts = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        // Segment i ran just before this row and segment i + 1 just after it.
        let around = segments.get(i + 1).map_or(mean, |after| segments[i].images_per_s.midpoint(after.images_per_s));
        print_row(&format!("server {}", row.load.label(options.request_batch)), row.generator, &row.measured, around);
        let (target, name) = match row.load {
            Load::Batched => (TARGET_BATCHED, "(a)"),
            Load::Single => (TARGET_SINGLE, "(b)"),
        };
        let ratio = row.measured.images_per_s / around;
        let verdict = if ratio >= target && row.measured.errors.is_empty() { "meets" } else { "misses" };
        verdicts.push(format!("target {name} ≥ {target:.2} with {}: {ratio:.3} {verdict}", row.generator));
    }
    println!();
    println!("baseline: mean of the in-process segments just before and after the row; batch: mean images per ONNX Runtime batch;");
    println!("ORT busy: fraction of the time the server's ONNX Runtime ran; gen CPU: cores the load generator kept busy (baseline: this");
    println!(
        "process); server: cores the server kept busy; srv ms: mean of the server's own Timing.total_ms (tonic only)."
    );
    for verdict in verdicts {
        println!("{verdict}");
    }
    for warning in busy_machine_warnings(segments, options.intra_threads) {
        println!("warning: {warning}");
    }
}

/// Signs that others loaded the machine during the run: then a process with more threads (the
/// server) wins a larger share of the cores than the baseline, and the ratios mislead.
fn busy_machine_warnings(segments: &[Measured], intra_threads: usize) -> Vec<String> {
    let rates: Vec<f64> = segments.iter().map(|s| s.images_per_s).collect();
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let (min, max) = rates.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    let mut warnings = Vec::new();
    if (max - min) / mean > 0.15 {
        warnings.push(format!("the baseline segments range from {min:.0} to {max:.0} images/s: the machine's speed changed during the run"));
    }
    let cores: Vec<f64> = segments.iter().filter_map(|s| s.generator_cpu).collect();
    let cores = cores.iter().sum::<f64>() / cores.len().max(1) as f64;
    if intra_threads > 0 && cores < 0.85 * intra_threads as f64 {
        warnings.push(format!("the in-process baseline kept only {cores:.2} cores busy with {intra_threads} intra-op threads: others are using the CPUs"));
    }
    warnings
}

fn print_row(label: &str, generator: &str, m: &Measured, baseline: f64) {
    let opt = |value: Option<f64>, digits: usize| value.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"));
    let errors = if m.errors.is_empty() {
        "0".to_string()
    } else {
        m.errors.iter().map(|(what, n)| format!("{n} {what}")).collect::<Vec<_>>().join(", ")
    };
    println!(
        "{:<34} {:>9} {:>9.0} {:>9.0} {:>6.3} {:>8.2} {:>8.2} {:>6} {:>8} {:>7} {:>6} {:>6}  {}",
        label,
        generator,
        m.images_per_s,
        baseline,
        m.images_per_s / baseline,
        percentile(&m.latencies_ms, 50.0),
        percentile(&m.latencies_ms, 99.0),
        opt(m.mean_batch, 1),
        opt(m.ort_busy, 2),
        opt(m.generator_cpu, 2),
        opt(m.server_cpu, 2),
        opt(m.server_total_ms, 2),
        errors
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: ServeBenchOptions,
    }

    #[test]
    fn default_matches_the_flags() {
        assert_eq!(Cli::parse_from(["bench"]).options, ServeBenchOptions::default());
        let options = Cli::parse_from(["bench", "--max-delay-ms", "5", "--generator", "h2load", "--png"]).options;
        assert_eq!((options.max_delay_ms, options.generator, options.png), (5, Generator::H2load, true));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        // 4 values: p50 is rank ceil(2) = 2, p99 rank ceil(3.96) = 4.
        assert_eq!(percentile(&[4.0, 1.0, 3.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[4.0, 1.0, 3.0, 2.0], 99.0), 4.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn grpc_frame_is_flag_length_message() {
        let request = EmbedRequest { model: "m".into(), ..Default::default() };
        // Field 1 (string, wire type 2): tag 0x0a, length 1, "m".
        assert_eq!(grpc_frame(&request), [0, 0, 0, 0, 3, 0x0a, 1, b'm']);
        let big = EmbedRequest { model: "x".repeat(300), ..Default::default() };
        let frame = grpc_frame(&big);
        // 300 bytes need a 2-byte varint length: 1 + 2 + 300 = 303 = 0x012f.
        assert_eq!(frame[..5], [0, 0, 0, 0x01, 0x2f]);
        assert_eq!(EmbedRequest::decode(&frame[5..]).unwrap(), big);
    }

    #[test]
    fn reads_h2load_output() {
        let text = "\
finished in 9.50s, 2345.67 req/s, 12.00MB/s
requests: 23457 total, 23457 started, 23456 done, 23450 succeeded, 6 failed, 1 errored, 0 timeout
status codes: 23450 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 12.50MB (13107200) total, 1.19KB (1221) headers (space savings 95.36%), 12.40MB (13000000) data
                     min         max         mean         sd        +/- sd
time for request:      412us     12.03ms      2.61ms       836us    71.24%
";
        let summary = parse_h2load_summary(text).unwrap();
        assert_eq!(
            summary,
            H2loadSummary { req_per_s: 2345.67, succeeded: 23450, failed: 6, errored: 1, data_bytes: 13_000_000 }
        );
        assert!(parse_h2load_summary("finished in 1s, 10 req/s, 1MB/s\n").is_err());

        // Started at 1000 µs; kept: 2xx responses ending within [1500, 3000] µs.
        let log = "1000\t200\t600\n1000\t200\t400\n2000\t-1\t500\n2500\t200\t500\n2600\t200\t500\n";
        assert_eq!(parse_h2load_log(log, 1500, 3000), [0.6, 0.5]);
    }

    #[test]
    fn reads_proc_stat_and_prometheus_text() {
        // Field 2 holds a space and a ')'; utime 250, stime 50, cutime 7, cstime 3 ticks.
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 50 7 3 20 0 4 0 100 1000 50";
        assert_eq!(parse_stat_cpu(stat), Some((3.0, 0.1)));
        let text = "# TYPE contrastive_batch_size summary\n\
contrastive_batch_size_bucket{model=\"a:1\",le=\"64\"} 9\n\
contrastive_batch_size_sum{model=\"a:1\"} 300\n\
contrastive_batch_size_sum{model=\"b:2\"} 20\n\
contrastive_batch_size_count{model=\"a:1\"} 5\n";
        assert_eq!(metric_total(text, "contrastive_batch_size_sum"), 320.0);
        assert_eq!(metric_total(text, "contrastive_batch_size_count"), 5.0);
        assert_eq!(metric_total(text, "contrastive_batch_size"), 0.0);
        let before = ServerMetrics { batches: 5.0, images: 300.0, inference_secs: 1.0 };
        let after = ServerMetrics { batches: 15.0, images: 940.0, inference_secs: 2.5 };
        assert_eq!(after.since(&before, 2.0), (64.0, 0.75));
    }
}
