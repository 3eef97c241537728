//! The fine-tune service end to end: the real `contrastive serve` binary on a loopback port, a real
//! gRPC client, Fashion-MNIST images as PNG. Expectations come from outside the server: the class
//! counts of the test subset, the dataset file's SHA-256 computed here from its documented format,
//! the job state machine of the proto, the model folders on disk.
//!
//! Needs the ONNX Runtime library: `scripts/fetch-onnxruntime`.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Dirs;
use contrastive::client::{embedding_client, finetune_client, AuthChannel};
use contrastive::data::idx::{load_mnist_format_dir, Split};
use contrastive::data::Dataset;
use contrastive::proto::v1::embedding_service_client::EmbeddingServiceClient;
use contrastive::proto::v1::fine_tune_service_client::FineTuneServiceClient;
use contrastive::proto::v1::{
    create_job_request, input, job_event, CancelJobRequest, CreateJobRequest, DatasetInfo, EmbedRequest, EmbedResponse,
    GetJobRequest, GetModelRequest, HyperParameters, InlineDataset, Input, Job, JobEvent, JobState, LabeledImage,
    ListJobsRequest, UploadDatasetChunk, VersionState, WatchJobRequest,
};
use contrastive::registry::{Manifest, MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE};
use image::{DynamicImage, GrayImage, ImageFormat};
use sha2::{Digest, Sha256};
use tonic::{Code, Status};

const BASE: &str = "fmnist-simclr";
const SIDE: u32 = 28;
/// Fashion-MNIST classes 0, 2 and 6: the three upper-body garments the base model confuses most.
const CLASSES: [(u32, &str); 3] = [(0, "tshirt"), (2, "pullover"), (6, "shirt")];
/// Their counts in the first 1000 training images (tests/data/fashion-mnist-subset/README.md).
const CLASS_COUNTS: [(&str, u64); 3] = [("tshirt", 107), ("pullover", 86), ("shirt", 100)];
/// Longest wait for any one job to end; far above what the jobs here need.
const JOB_TIMEOUT: Duration = Duration::from_secs(400);

type FineTune = FineTuneServiceClient<AuthChannel>;
type Embedder = EmbeddingServiceClient<AuthChannel>;

// ---------------------------------------------------------------------------------------------
// The server process

/// A running `contrastive serve` with two fine-tune threads; killed when dropped. Its log is
/// printed if a test fails.
struct Server(common::Server);

impl std::ops::Deref for Server {
    type Target = common::Server;
    fn deref(&self) -> &common::Server {
        &self.0
    }
}

impl Server {
    /// Starts the binary on `dirs` with `extra` flags and waits for health SERVING.
    async fn start(dirs: &Dirs, extra: &[&str]) -> Self {
        let mut args = vec!["--finetune-threads", "2"];
        args.extend_from_slice(extra);
        let server = tokio::task::block_in_place(|| common::Server::start_on(dirs, &args));
        server.wait_serving().await;
        Self(server)
    }

    async fn finetune(&self) -> FineTune {
        finetune_client(&self.url, None).await.expect("connect the fine-tune client")
    }

    async fn embedder(&self) -> Embedder {
        embedding_client(&self.url, None).await.expect("connect the embedding client")
    }
}

// ---------------------------------------------------------------------------------------------
// Data

fn fashion_train() -> &'static Dataset {
    static DATA: OnceLock<Dataset> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset");
        let data = load_mnist_format_dir(&dir, Split::Train).expect("the Fashion-MNIST training subset");
        assert_eq!(data.shape.dims(), [1, SIDE as usize, SIDE as usize]);
        data
    })
}

/// One image as PNG bytes: pixels in [0, 1] rounded to 0..255.
fn png(pixels: &[f32]) -> Vec<u8> {
    let bytes: Vec<u8> = pixels.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    let image = GrayImage::from_raw(SIDE, SIDE, bytes).expect("28×28 pixels");
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageLuma8(image).write_to(&mut out, ImageFormat::Png).expect("encode a PNG");
    out.into_inner()
}

/// Every training-subset image of the three classes, labelled by name, in file order.
fn shirts() -> &'static [LabeledImage] {
    static IMAGES: OnceLock<Vec<LabeledImage>> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let data = fashion_train();
        let numel = data.shape.numel();
        data.labels
            .iter()
            .enumerate()
            .filter_map(|(i, label)| {
                let name = CLASSES.iter().find(|(l, _)| l == label)?.1;
                Some(LabeledImage { image: png(&data.images[i * numel..(i + 1) * numel]), label: name.to_string() })
            })
            .collect()
    })
}

/// The first `n` images of class `label`.
fn of_class(label: &str, n: usize) -> Vec<LabeledImage> {
    let images: Vec<LabeledImage> = shirts().iter().filter(|i| i.label == label).take(n).cloned().collect();
    assert_eq!(images.len(), n, "the subset has fewer than {n} {label} images");
    images
}

/// SHA-256 of the dataset file that `images` make, built here from the format documented in
/// src/finetune/datasets.rs: magic, u32 version 1, then (u32 label length, label, u32 image
/// length, image) per image, little-endian.
fn expected_dataset_sha256(images: &[LabeledImage]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"CTRDSET\0");
    hasher.update(1u32.to_le_bytes());
    for image in images {
        hasher.update((image.label.len() as u32).to_le_bytes());
        hasher.update(image.label.as_bytes());
        hasher.update((image.image.len() as u32).to_le_bytes());
        hasher.update(&image.image);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn embed_request(model: &str, images: &[&[u8]]) -> EmbedRequest {
    EmbedRequest {
        model: model.to_string(),
        inputs: images.iter().map(|bytes| Input { data: Some(input::Data::Image(bytes.to_vec())) }).collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Fine-tune calls

/// Streams `images` in chunks of 50, the name in the first chunk.
async fn upload(client: &mut FineTune, name: &str, images: &[LabeledImage]) -> Result<DatasetInfo, Status> {
    let chunks: Vec<UploadDatasetChunk> = images
        .chunks(50)
        .enumerate()
        .map(|(i, chunk)| UploadDatasetChunk {
            name: if i == 0 { name.to_string() } else { String::new() },
            images: chunk.to_vec(),
        })
        .collect();
    client.upload_dataset(tokio_stream::iter(chunks)).await.map(|r| r.into_inner())
}

fn job_request(output_model: &str, data: create_job_request::Data, epochs: u32) -> CreateJobRequest {
    CreateJobRequest {
        base_model: BASE.to_string(),
        output_model: output_model.to_string(),
        hyper_parameters: Some(HyperParameters { epochs, ..Default::default() }),
        data: Some(data),
        ..Default::default()
    }
}

async fn create(client: &mut FineTune, request: CreateJobRequest) -> Job {
    let job = client.create_job(request).await.expect("CreateJob").into_inner();
    assert_eq!(job.state(), JobState::Queued, "a new job is QUEUED: {job:?}");
    assert_eq!(job.job_id.len(), 32, "job id {:?}", job.job_id);
    job
}

/// An open WatchJob stream with the events read from it so far.
struct Watcher {
    stream: tonic::Streaming<JobEvent>,
    events: Vec<JobEvent>,
}

impl Watcher {
    async fn open(client: &mut FineTune, job_id: &str) -> Self {
        let stream =
            client.watch_job(WatchJobRequest { job_id: job_id.to_string() }).await.expect("WatchJob").into_inner();
        Self { stream, events: Vec::new() }
    }

    /// The next event, or None when the stream has ended.
    async fn next(&mut self) -> Option<JobEvent> {
        let event = tokio::time::timeout(JOB_TIMEOUT, self.stream.message())
            .await
            .unwrap_or_else(|_| panic!("no job event in {JOB_TIMEOUT:?} after {:?}", self.events.last()))
            .expect("a WatchJob message")?;
        self.events.push(event.clone());
        Some(event)
    }

    /// Reads until an event satisfies `stop`; panics if the stream ends first.
    async fn until(&mut self, what: &str, stop: impl Fn(&JobEvent) -> bool) -> JobEvent {
        while let Some(event) = self.next().await {
            if stop(&event) {
                return event;
            }
        }
        panic!("the stream ended before {what}; events: {:#?}", self.events.iter().map(describe).collect::<Vec<_>>());
    }

    /// Reads to the end of the stream; returns the job as the last event left it.
    async fn finish(&mut self) -> Job {
        while self.next().await.is_some() {}
        self.events.last().and_then(|e| e.job.clone()).expect("at least one event")
    }
}

fn state_event(event: &JobEvent) -> Option<JobState> {
    match event.event {
        Some(job_event::Event::State(s)) => Some(JobState::try_from(s).expect("a known state")),
        _ => None,
    }
}

fn is_state(state: JobState) -> impl Fn(&JobEvent) -> bool {
    move |event| state_event(event) == Some(state)
}

fn describe(event: &JobEvent) -> String {
    format!("{} {:?}", event.sequence, event.event)
}

/// Creates a job on `data` and follows it to its end.
async fn run_to_end(client: &mut FineTune, output_model: &str, data: create_job_request::Data, epochs: u32) -> Job {
    let job = create(client, job_request(output_model, data, epochs)).await;
    let mut watcher = Watcher::open(client, &job.job_id).await;
    watcher.finish().await
}

fn assert_failed_with(job: &Job, code: Code, words: &[&str]) {
    assert_eq!(job.state(), JobState::Failed, "{job:#?}");
    let error = job.error.as_ref().unwrap_or_else(|| panic!("a FAILED job carries an error: {job:#?}"));
    assert_eq!(error.code, code as i32, "error code of {error:?}");
    for word in words {
        assert!(error.message.contains(word), "{:?} should contain {word:?}", error.message);
    }
    assert!(job.output_version == 0 && !job.finished_at.is_empty(), "{job:#?}");
}

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, words: &[&str]) -> Status {
    let status = result.expect_err("the call should be refused");
    assert_eq!(status.code(), code, "{status:?}");
    for word in words {
        assert!(status.message().contains(word), "{:?} should contain {word:?}", status.message());
    }
    status
}

/// The numbered version folders of `model` in `models`.
fn numbered_versions(models: &Path, model: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(models.join(model)) else { return Vec::new() };
    entries
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u64>().is_ok()))
        .map(|e| e.path())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Upload, train with the defaults, watch, publish, serve the new version at once; a late
/// watcher replays the same history.
#[tokio::test(flavor = "multi_thread")]
async fn job_trains_publishes_and_serves_the_new_version() {
    let dirs = Dirs::with_models();
    let server = Server::start(&dirs, &[]).await;
    let mut client = server.finetune().await;

    let images = shirts();
    let info = upload(&mut client, "shirts", images).await.expect("UploadDataset");
    let expected_counts: HashMap<String, u64> = CLASS_COUNTS.iter().map(|(c, n)| (c.to_string(), *n)).collect();
    assert_eq!(info.size, 293);
    assert_eq!(info.class_counts, expected_counts);
    assert_eq!(info.name, "shirts");
    assert_eq!(info.sha256, expected_dataset_sha256(images), "SHA-256 of the documented file format");
    assert!(info.sha256.len() == 64 && info.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(info.dataset_id.len(), 32);

    // Default hyper-parameters: 90 epochs.
    let request = CreateJobRequest {
        base_model: BASE.into(),
        output_model: "fmnist-shirts".into(),
        data: Some(create_job_request::Data::DatasetId(info.dataset_id.clone())),
        ..Default::default()
    };
    let created = create(&mut client, request).await;
    assert_eq!(created.dataset_id, info.dataset_id);
    let h = created.hyper_parameters.expect("the defaulted hyper-parameters");
    assert_eq!((h.epochs, h.batch_size, h.trainable_stages), (90, 64, Some(1)));

    let mut watcher = Watcher::open(&mut client, &created.job_id).await;
    let job = watcher.finish().await;
    let events = watcher.events.clone();
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=events.len() as u64).collect::<Vec<_>>(), "sequence numbers 1..n without gaps");
    let states: Vec<JobState> = events.iter().filter_map(state_event).collect();
    assert_eq!(states, [JobState::Queued, JobState::Validating, JobState::Running, JobState::Succeeded], "{:#?}", job);
    let position = |f: &dyn Fn(&JobEvent) -> bool| events.iter().position(f).expect("the event is there");
    let epochs: Vec<(usize, u32, f64)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e.event {
            Some(job_event::Event::Epoch(m)) => Some((i, m.epoch, m.train_loss)),
            _ => None,
        })
        .collect();
    assert_eq!(epochs.iter().map(|e| e.1).collect::<Vec<_>>(), (1..=90).collect::<Vec<_>>());
    assert!(epochs.iter().all(|e| e.2.is_finite() && e.2 > 0.0), "SupCon losses are positive and finite: {epochs:?}");
    let before_at = position(&|e| matches!(e.event, Some(job_event::Event::Before(_))));
    let after_at = position(&|e| matches!(e.event, Some(job_event::Event::After(_))));
    let running_at = position(&is_state(JobState::Running));
    assert!(running_at < before_at && before_at < epochs[0].0, "before is measured in RUNNING, ahead of training");
    assert!(epochs[29].0 < after_at && after_at < events.len() - 1, "after is measured after the last epoch");
    // Every event carries the job as it stands: its state matches the last state event so far.
    let mut current = JobState::Unspecified;
    for event in &events {
        current = state_event(event).unwrap_or(current);
        assert_eq!(event.job.as_ref().unwrap().state(), current, "event {}", describe(event));
    }

    assert_eq!(job.state(), JobState::Succeeded, "{job:#?}");
    assert_eq!(job.output_version, 1);
    assert_eq!(job.output_model, "fmnist-shirts");
    assert_eq!(job.base_version, 0, "0 asked for the latest ready version");
    assert_eq!(job.progress, 1.0);
    assert_eq!(job.epochs.len(), 90);
    let (before, after) = (job.before.unwrap(), job.after.unwrap());
    assert!(after.knn_accuracy >= before.knn_accuracy, "before {before:?}, after {after:?}");
    // The figures carry their uncertainty: Wilson intervals around each accuracy, and the paired
    // change (exactly after − before, since both are measured on the same images).
    assert_eq!(before.images, after.images);
    assert!(before.images >= 50, "20 % of each class is held out: {before:?}");
    for evaluation in [&before, &after] {
        let interval = evaluation.knn_accuracy_interval.unwrap();
        assert!(interval.low <= evaluation.knn_accuracy && evaluation.knn_accuracy <= interval.high, "{evaluation:?}");
        assert!(
            interval.high - interval.low > 0.05,
            "{} images leave a wide interval: {interval:?}",
            evaluation.images
        );
    }
    assert!(before.knn_change.is_none());
    let change = after.knn_change.unwrap();
    assert!((change.value - (after.knn_accuracy - before.knn_accuracy)).abs() < 1e-9, "{change:?}");
    let interval = change.interval.unwrap();
    assert!(interval.low <= change.value && change.value <= interval.high, "{change:?}");
    for expected in ["published fmnist-shirts version 1", "held-out k-NN accuracy", "95 % interval", "paired bootstrap"]
    {
        assert!(job.message.contains(expected), "{expected:?} in {:?}", job.message);
    }
    assert!(
        (0.0..=1.0).contains(&before.knn_accuracy) && before.knn_accuracy > 0.34,
        "better than chance on 3 classes: {before:?}"
    );
    assert!(job.error.is_none() && !job.started_at.is_empty() && !job.finished_at.is_empty());
    eprintln!("held-out k-NN {:.4} -> {:.4}", before.knn_accuracy, after.knn_accuracy);

    // The new version serves at once, without a restart, and embeds differently from the base.
    let mut embedder = server.embedder().await;
    let probe = &images[0].image;
    let tuned =
        embedder.embed(embed_request("fmnist-shirts", &[probe])).await.expect("Embed with the new model").into_inner();
    assert_eq!((tuned.model.as_str(), tuned.version), ("fmnist-shirts", 1));
    let base = embedder.embed(embed_request(BASE, &[probe])).await.unwrap().into_inner();
    let (a, b) = (&tuned.embeddings[0].values, &base.embeddings[0].values);
    assert_eq!(a.len(), b.len());
    let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "normalised by default: {norm}");
    assert!(a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) > 1e-3, "the top stage was trained");

    let model = embedder.get_model(GetModelRequest { name: "fmnist-shirts".into() }).await.unwrap().into_inner();
    assert_eq!(model.latest_ready_version, 1);
    let version = model.versions.iter().find(|v| v.version == 1).expect("version 1 listed");
    assert_eq!(version.state(), VersionState::Ready);
    let manifest = version.manifest.as_ref().expect("a manifest summary");
    assert_eq!(manifest.method, "supcon");
    assert_eq!(manifest.epochs, 90);
    assert!(
        (manifest.knn_accuracy - after.knn_accuracy).abs() < 1e-9,
        "the manifest records the held-out figure: {manifest:?}"
    );
    assert!(manifest.source.contains(&created.job_id), "{:?}", manifest.source);

    // A late watcher gets the whole history and the stream ends.
    let mut late = Watcher::open(&mut client, &created.job_id).await;
    late.finish().await;
    assert_eq!(late.events, events, "the late watcher replays the same events");

    let got = client.get_job(GetJobRequest { job_id: created.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(got, job);
    let listed = client
        .list_jobs(ListJobsRequest { state: JobState::Succeeded as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [created.job_id.as_str()]);
    let running = client
        .list_jobs(ListJobsRequest { state: JobState::Running as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(running.jobs.is_empty());
    assert_status(client.get_job(GetJobRequest { job_id: "missing".into() }).await, Code::NotFound, &["missing"]);
    let files: Vec<String> = std::fs::read_dir(dirs.models.join("fmnist-shirts/1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for file in [MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE] {
        assert!(files.iter().any(|f| f == file), "{file} in {files:?}");
    }
}

/// A ViT base fine-tunes as a ResNet one does: `contrastive train --encoder vit` and `export`
/// make the base, a job trains its top stage (the last block and the final norm) and the heads,
/// publishes a ViT version with parity and serves it. The published weights say what trained:
/// the patch embedding, tokens and first block keep the base's values to the bit.
#[tokio::test(flavor = "multi_thread")]
async fn a_vit_base_fine_tunes_its_last_block_and_the_new_version_is_served() {
    let dirs = Dirs::empty();
    let base_version = common::publish_small_vit(&dirs, "vit");

    let server = Server::start(&dirs, &[]).await;
    let mut client = server.finetune().await;
    let request = CreateJobRequest {
        base_model: "vit".into(),
        output_model: "vit-shirts".into(),
        hyper_parameters: Some(HyperParameters { epochs: 3, ..Default::default() }),
        data: Some(inline_of(&shirts()[..120])),
        ..Default::default()
    };
    let created = create(&mut client, request).await;
    let job = Watcher::open(&mut client, &created.job_id).await.finish().await;
    assert_eq!((job.state(), job.output_version), (JobState::Succeeded, 1), "{job:#?}");

    let tuned = dirs.models.join("vit-shirts/1");
    let manifest = Manifest::load(&tuned.join(MANIFEST_FILE)).unwrap();
    assert_eq!((manifest.architecture.encoder.as_str(), manifest.training.method.as_str()), ("vit", "supcon"));
    assert!(manifest.parity.max_abs_diff <= 1e-4, "{:?}", manifest.parity);
    let load = |dir: &Path| candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &candle_core::Device::Cpu).unwrap();
    let (base, trained) = (load(&base_version), load(&tuned));
    let max_change = |key: &str| -> f32 {
        let (a, b) = (&base[key], &trained[key]);
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    };
    let names: BTreeSet<&String> = base.keys().collect();
    assert_eq!(names, trained.keys().collect::<BTreeSet<_>>(), "the same encoder");
    let (kept, moved): (Vec<&String>, Vec<&String>) = names.iter().partition(|name| {
        name.starts_with("encoder.") && !name.starts_with("encoder.blocks.1.") && !name.starts_with("encoder.norm.")
    });
    assert!(
        kept.iter().any(|n| n.contains("patch_embed")) && kept.iter().any(|n| n.contains("blocks.0.")),
        "{names:?}"
    );
    for name in kept {
        assert_eq!(max_change(name), 0.0, "{name} is below the trained stage");
    }
    let last_block: Vec<&&String> = moved.iter().filter(|n| n.starts_with("encoder.blocks.1.")).collect();
    assert!(last_block.iter().any(|name| max_change(name) > 1e-6), "the last block trained: {last_block:?}");

    let mut embedder = server.embedder().await;
    let probe = &shirts()[0].image;
    let response = embedder.embed(embed_request("vit-shirts", &[probe])).await.expect("Embed").into_inner();
    assert_eq!((response.model.as_str(), response.version, response.embeddings[0].values.len()), ("vit-shirts", 1, 32));
}

/// Training runs on its own threads: embedding requests keep answering, unchanged, meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn embeddings_keep_answering_while_a_job_trains() {
    let dirs = Dirs::with_models();
    let server = Server::start(&dirs, &[]).await;
    let mut client = server.finetune().await;
    let mut embedder = server.embedder().await;
    let probes: Vec<&[u8]> = shirts().iter().step_by(37).map(|i| i.image.as_slice()).collect();
    let reference = embedder.embed(embed_request(BASE, &probes)).await.unwrap().into_inner();

    let job = create(
        &mut client,
        job_request(
            "fmnist-busy",
            create_job_request::Data::InlineDataset(InlineDataset { images: shirts().to_vec() }),
            20,
        ),
    )
    .await;
    let mut watcher = Watcher::open(&mut client, &job.job_id).await;
    watcher.until("the first epoch", |e| matches!(e.event, Some(job_event::Event::Epoch(_)))).await;

    let started = Instant::now();
    for i in 0..20 {
        let response: EmbedResponse = embedder
            .embed(embed_request(BASE, &probes))
            .await
            .unwrap_or_else(|s| panic!("Embed {i} during training: {s:?}"))
            .into_inner();
        assert_eq!(response.version, 1);
        assert_eq!(
            response.embeddings, reference.embeddings,
            "request {i}: the served version is unchanged by training"
        );
    }
    eprintln!("20 Embed requests of {} images during training: {:?}", probes.len(), started.elapsed());

    let during = client.get_job(GetJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(during.state(), JobState::Running, "the requests overlapped the training: {during:#?}");
    assert!(during.epochs.len() < 20);
    client.cancel_job(CancelJobRequest { job_id: job.job_id.clone() }).await.expect("CancelJob");
    assert_eq!(watcher.finish().await.state(), JobState::Cancelled);
}

/// CancelJob stops a running job within a step and publishes nothing; a queued job is cancelled at
/// once; a finished job cannot be cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_job_and_publishes_nothing() {
    let dirs = Dirs::with_models();
    let server = Server::start(&dirs, &[]).await;
    let mut client = server.finetune().await;
    let info = upload(&mut client, "shirts", shirts()).await.unwrap();
    let data = || create_job_request::Data::DatasetId(info.dataset_id.clone());

    let job = create(&mut client, job_request("fmnist-cancel", data(), 200)).await;
    let mut watcher = Watcher::open(&mut client, &job.job_id).await;
    watcher.until("RUNNING", is_state(JobState::Running)).await;

    // With one job at a time (the default), a second one waits; cancelling it is immediate.
    let queued = create(&mut client, job_request("fmnist-queued", data(), 1)).await;
    let cancelled = client.cancel_job(CancelJobRequest { job_id: queued.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled, "{cancelled:#?}");

    let asked = Instant::now();
    client.cancel_job(CancelJobRequest { job_id: job.job_id.clone() }).await.expect("CancelJob");
    let end = watcher.finish().await;
    let took = asked.elapsed();
    assert_eq!(end.state(), JobState::Cancelled, "{end:#?}");
    assert!(took < Duration::from_secs(15), "cancelled within a step, took {took:?}");
    assert!(end.epochs.len() < 200 && end.output_version == 0 && end.error.is_none(), "{end:#?}");
    eprintln!("cancel took {took:?} after {} epochs", end.epochs.len());
    let states: Vec<JobState> = watcher.events.iter().filter_map(state_event).collect();
    assert_eq!(states.last(), Some(&JobState::Cancelled));
    assert!(!states.contains(&JobState::Succeeded) && !states.contains(&JobState::Failed), "{states:?}");

    assert!(numbered_versions(&dirs.models, "fmnist-cancel").is_empty(), "a cancelled job publishes no version");
    assert!(numbered_versions(&dirs.models, "fmnist-queued").is_empty());
    for id in [&job.job_id, &queued.job_id] {
        assert_status(
            client.cancel_job(CancelJobRequest { job_id: id.clone() }).await,
            Code::FailedPrecondition,
            &["CANCELLED"],
        );
    }
    assert_status(client.cancel_job(CancelJobRequest { job_id: "missing".into() }).await, Code::NotFound, &["missing"]);
}

/// Datasets that cannot train end the job FAILED with a message that says why.
#[tokio::test(flavor = "multi_thread")]
async fn bad_datasets_fail_the_job_with_precise_messages() {
    let dirs = Dirs::with_models();
    let server = Server::start(&dirs, &["--max-jobs-per-client", "16"]).await;
    let mut client = server.finetune().await;
    let inline = |images: Vec<LabeledImage>| create_job_request::Data::InlineDataset(InlineDataset { images });

    let one_class = run_to_end(&mut client, "bad-one", inline(of_class("tshirt", 20)), 1).await;
    assert_failed_with(&one_class, Code::InvalidArgument, &["1 class", "at least 2"]);

    let few = [of_class("tshirt", 20), of_class("shirt", 3)].concat();
    let info = upload(&mut client, "few", &few).await.unwrap();
    assert_eq!(info.class_counts, HashMap::from([("tshirt".into(), 20), ("shirt".into(), 3)]));
    let too_few = run_to_end(&mut client, "bad-few", create_job_request::Data::DatasetId(info.dataset_id), 1).await;
    assert_failed_with(&too_few, Code::InvalidArgument, &["at least 8", "\"shirt\" (3)"]);

    // The 31st image (index 30) does not decode; upload stores bytes as given, validation decodes.
    let mut broken = [of_class("tshirt", 15), of_class("shirt", 15)].concat();
    broken.push(LabeledImage { image: b"this is not a picture".to_vec(), label: "shirt".into() });
    broken.extend(of_class("pullover", 10));
    let undecodable = run_to_end(&mut client, "bad-image", inline(broken), 1).await;
    assert_failed_with(&undecodable, Code::InvalidArgument, &["image 30", "cannot decode"]);

    for model in ["bad-one", "bad-few", "bad-image"] {
        assert!(numbered_versions(&dirs.models, model).is_empty(), "{model} published nothing");
    }
    let failed = client
        .list_jobs(ListJobsRequest { state: JobState::Failed as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.jobs.len(), 3);
}

/// CreateJob and UploadDataset refuse malformed requests before anything is queued.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_are_refused() {
    let dirs = Dirs::with_models();
    let server = Server::start(&dirs, &["--max-dataset-images", "20"]).await;
    let mut client = server.finetune().await;
    let small = [of_class("tshirt", 10), of_class("shirt", 10)].concat();
    let info = upload(&mut client, "small", &small).await.expect("20 images fit the limit of 20");
    let data = || create_job_request::Data::DatasetId(info.dataset_id.clone());

    let mut request = job_request("out", data(), 1);
    request.base_model.clear();
    assert_status(client.create_job(request).await, Code::InvalidArgument, &["base_model"]);
    assert_status(
        client.create_job(job_request("out", data(), 5000)).await,
        Code::InvalidArgument,
        &["epochs", "5000"],
    );
    assert_status(
        client.create_job(job_request("Bad/Name", data(), 1)).await,
        Code::InvalidArgument,
        &["output_model", "Bad/Name"],
    );
    // A base that could never load is refused at the door, not as a job that fails later.
    let mut request = job_request("out", data(), 1);
    request.base_model = "nope".into();
    assert_status(client.create_job(request).await, Code::NotFound, &["\"nope\" is not in the repository", BASE]);
    let mut request = job_request("out", data(), 1);
    request.base_version = 99;
    assert_status(client.create_job(request).await, Code::NotFound, &["no version 99", "versions: 1"]);
    let mut request = job_request("out", data(), 1);
    request.hyper_parameters.as_mut().unwrap().trainable_stages = Some(9);
    assert_status(client.create_job(request).await, Code::InvalidArgument, &["trainable_stages 9", "3 stages"]);
    let mut request = job_request("out", inline_of(&small), 1);
    request.base_model = "nope".into();
    assert_status(client.create_job(request).await, Code::NotFound, &["nope"]);
    let mut request = job_request("out", data(), 1);
    request.data = None;
    assert_status(client.create_job(request).await, Code::InvalidArgument, &["dataset"]);
    let missing = "0123456789abcdef0123456789abcdef";
    assert_status(
        client.create_job(job_request("out", create_job_request::Data::DatasetId(missing.into()), 1)).await,
        Code::NotFound,
        &[missing],
    );
    assert_status(
        client.create_job(job_request("out", create_job_request::Data::ServerFolder("shirts".into()), 1)).await,
        Code::FailedPrecondition,
        &["--finetune-data-root"],
    );

    let over = [of_class("tshirt", 15), of_class("shirt", 10)].concat();
    let status = upload(&mut client, "too-many", &over).await.expect_err("25 images are over the limit of 20");
    eprintln!("UploadDataset over --max-dataset-images: {:?}: {}", status.code(), status.message());
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_images is 20"), "names the limit: {status:?}");
    assert_status(
        client.create_job(job_request("out", inline_of(&over), 1)).await,
        Code::ResourceExhausted,
        &["max_images is 20"],
    );

    let listed = client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner();
    assert!(listed.jobs.is_empty(), "no refused request left a job: {:?}", listed.jobs);
    let datasets: Vec<_> =
        std::fs::read_dir(dirs.data.join("datasets")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(datasets.len(), 1, "only the accepted upload is stored: {datasets:?}");

    // With a data root, server folders resolve inside it and nowhere else.
    let root_dirs = Dirs::with_models();
    let root = root_dirs.root.path().join("shared-data");
    write_image_folder(&root.join("two"), &[of_class("tshirt", 10), of_class("shirt", 10)].concat());
    let server = Server::start(&root_dirs, &["--finetune-data-root", root.to_str().unwrap()]).await;
    let mut client = server.finetune().await;
    for folder in ["../etc", "/etc", "two/../../etc"] {
        assert_status(
            client.create_job(job_request("out", create_job_request::Data::ServerFolder(folder.into()), 1)).await,
            Code::InvalidArgument,
            &["outside the data root"],
        );
    }
    assert_status(
        client.create_job(job_request("out", create_job_request::Data::ServerFolder("absent".into()), 1)).await,
        Code::InvalidArgument,
        &["\"absent\" does not exist"],
    );
    // The accepted folder becomes a dataset and a job (cancelled here: training it is not the point).
    let job =
        create(&mut client, job_request("from-folder", create_job_request::Data::ServerFolder("two".into()), 1)).await;
    let _ = client.cancel_job(CancelJobRequest { job_id: job.job_id.clone() }).await;
    let end = Watcher::open(&mut client, &job.job_id).await.finish().await;
    assert_eq!(end.state(), JobState::Cancelled, "{end:#?}");
    assert_eq!(end.dataset_id.len(), 32, "the folder was stored as a dataset");
}

fn inline_of(images: &[LabeledImage]) -> create_job_request::Data {
    create_job_request::Data::InlineDataset(InlineDataset { images: images.to_vec() })
}

/// `dir/<class>/<n>.png` for each image.
fn write_image_folder(dir: &Path, images: &[LabeledImage]) {
    for (i, image) in images.iter().enumerate() {
        let class = dir.join(&image.label);
        std::fs::create_dir_all(&class).unwrap();
        std::fs::write(class.join(format!("{i:04}.png")), &image.image).unwrap();
    }
}

/// Starts a server with one job at a time, runs a 200-epoch job into its first epoch, queues a
/// second job behind it and `kill -9`s the server. Returns the folders and the two job ids.
async fn crash_with_a_running_and_a_queued_job() -> (Dirs, String, String) {
    let dirs = Dirs::with_models();
    let server = Server::start(&dirs, &CRASH_FLAGS).await;
    let mut client = server.finetune().await;
    let info = upload(&mut client, "shirts", shirts()).await.unwrap();
    let data = || create_job_request::Data::DatasetId(info.dataset_id.clone());

    let running = create(&mut client, job_request("fmnist-crash", data(), 200)).await;
    let mut watcher = Watcher::open(&mut client, &running.job_id).await;
    watcher.until("the first epoch", |e| matches!(e.event, Some(job_event::Event::Epoch(_)))).await;
    let queued = create(&mut client, job_request("fmnist-after-crash", data(), 200)).await;
    let state = client.get_job(GetJobRequest { job_id: queued.job_id.clone() }).await.unwrap().into_inner().state();
    assert_eq!(state, JobState::Queued, "one job at a time: the second waits");
    server.kill();
    (dirs, running.job_id, queued.job_id)
}

const CRASH_FLAGS: [&str; 2] = ["--finetune-concurrency", "1"];

/// `kill -9` during training: after a restart the running job is FAILED "interrupted", with its
/// history intact, and no half-written version is visible.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_marks_its_running_job_interrupted() {
    let (dirs, running, _queued) = crash_with_a_running_and_a_queued_job().await;
    let server = Server::start(&dirs, &CRASH_FLAGS).await;
    let mut client = server.finetune().await;
    let interrupted = client.get_job(GetJobRequest { job_id: running.clone() }).await.unwrap().into_inner();
    assert_failed_with(&interrupted, Code::Aborted, &["interrupted"]);
    assert!(
        !interrupted.epochs.is_empty() && interrupted.epochs.len() < 200,
        "the epochs before the crash are kept: {interrupted:#?}"
    );
    // Its history ends with FAILED and the stream ends.
    let mut replay = Watcher::open(&mut client, &running).await;
    replay.finish().await;
    let states: Vec<JobState> = replay.events.iter().filter_map(state_event).collect();
    assert_eq!(states, [JobState::Queued, JobState::Validating, JobState::Running, JobState::Failed]);
    let sequences: Vec<u64> = replay.events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=replay.events.len() as u64).collect::<Vec<_>>());

    // No numbered version is incomplete (hidden staging folders may exist: they are not versions).
    for model in
        std::fs::read_dir(&dirs.models).unwrap().map(|e| e.unwrap()).filter(|e| e.file_type().unwrap().is_dir())
    {
        for version in numbered_versions(&dirs.models, model.file_name().to_str().unwrap()) {
            for file in [MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE] {
                assert!(version.join(file).is_file(), "{} lacks {file}", version.display());
            }
        }
    }
    assert!(numbered_versions(&dirs.models, "fmnist-crash").is_empty());
    assert!(numbered_versions(&dirs.models, "fmnist-after-crash").is_empty());
}

/// A job queued when the server was killed runs after the restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_queued_before_a_crash_runs_after_the_restart() {
    let (dirs, _running, queued) = crash_with_a_running_and_a_queued_job().await;
    let server = Server::start(&dirs, &CRASH_FLAGS).await;
    let mut client = server.finetune().await;
    let mut next = Watcher::open(&mut client, &queued).await;
    let ended = |e: &JobEvent| {
        matches!(state_event(e), Some(JobState::Running | JobState::Succeeded | JobState::Failed | JobState::Cancelled))
    };
    let reached = next.until("RUNNING or an end", ended).await;
    assert_eq!(
        state_event(&reached),
        Some(JobState::Running),
        "the queued job runs after the restart: {:#?}",
        reached.job
    );
    client.cancel_job(CancelJobRequest { job_id: queued.clone() }).await.unwrap();
    let end = next.finish().await;
    assert_eq!(end.state(), JobState::Cancelled, "{end:#?}");
    assert!(numbered_versions(&dirs.models, "fmnist-after-crash").is_empty());
}

/// With an API key file, fine-tune RPCs need a key; embedding RPCs do not (by default).
#[tokio::test(flavor = "multi_thread")]
async fn fine_tune_rpcs_need_an_api_key() {
    let dirs = Dirs::with_models();
    let keys = dirs.root.path().join("keys");
    std::fs::write(&keys, "# test keys\nsecret-key-1\n").unwrap();
    let server = Server::start(&dirs, &["--api-key-file", keys.to_str().unwrap()]).await;

    let mut anonymous = server.finetune().await;
    assert_status(anonymous.list_jobs(ListJobsRequest::default()).await, Code::Unauthenticated, &["authorization"]);
    let mut wrong = finetune_client(&server.url, Some("secret-key-2")).await.unwrap();
    assert_status(wrong.list_jobs(ListJobsRequest::default()).await, Code::Unauthenticated, &["not valid"]);
    assert_status(upload(&mut wrong, "x", &of_class("shirt", 2)).await, Code::Unauthenticated, &[]);
    let mut right = finetune_client(&server.url, Some("secret-key-1")).await.unwrap();
    let listed = right.list_jobs(ListJobsRequest::default()).await.expect("ListJobs with the key").into_inner();
    assert!(listed.jobs.is_empty());

    let mut embedder = server.embedder().await;
    let response =
        embedder.embed(embed_request(BASE, &[&shirts()[0].image])).await.expect("Embed needs no key").into_inner();
    assert_eq!((response.version, response.embeddings.len()), (1, 1));
    embedder.get_model(GetModelRequest { name: BASE.into() }).await.expect("GetModel needs no key");
}

/// `contrastive finetune create --data DIR --watch` uploads the folder, follows the job and prints it.
#[tokio::test(flavor = "multi_thread")]
async fn cli_creates_and_watches_a_job() {
    let dirs = Dirs::with_models();
    let server = Server::start(&dirs, &[]).await;
    let folder = dirs.root.path().join("garments");
    let images = [of_class("tshirt", 40), of_class("pullover", 40), of_class("shirt", 40)].concat();
    write_image_folder(&folder, &images);

    let output = tokio::time::timeout(
        JOB_TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_contrastive"))
            .args([
                "finetune",
                "--addr",
                &server.url,
                "create",
                "--base-model",
                BASE,
                "--output-model",
                "cli-model",
                "--data",
            ])
            .arg(&folder)
            .args(["--epochs", "2", "--allow-worse", "--watch"])
            .env_remove("CONTRASTIVE_API_KEY")
            .env_remove("CONTRASTIVE_SERVER")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the CLI finished")
    .expect("run the CLI");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);

    let printed: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("stdout is a sequence of JSON objects ({e}):\n{stdout}"));
    assert_eq!(printed.len(), 2, "the created job, then the finished one:\n{stdout}");
    assert_eq!(printed[0]["state"], "QUEUED");
    let last = printed.last().unwrap();
    assert_eq!(last["state"], "SUCCEEDED", "{last:#}");
    assert_eq!(last["output_model"], "cli-model");
    assert_eq!(last["output_version"], 1);
    assert_eq!(last["allow_worse"], true);
    assert_eq!(last["epochs"].as_array().map(Vec::len), Some(2));
    assert_eq!(last["job_id"], printed[0]["job_id"]);

    let mut embedder = server.embedder().await;
    let model = embedder
        .get_model(GetModelRequest { name: "cli-model".into() })
        .await
        .expect("the CLI's model is served")
        .into_inner();
    assert_eq!(model.latest_ready_version, 1);
    // The CLI uploaded the folder as the server reads folders: classes by name, files by name.
    let mut client = server.finetune().await;
    let job =
        client.get_job(GetJobRequest { job_id: last["job_id"].as_str().unwrap().into() }).await.unwrap().into_inner();
    let stored = std::fs::read(dirs.data.join("datasets").join(format!("{}.ds", job.dataset_id)))
        .expect("the uploaded dataset file");
    let stored_sha256: String = Sha256::digest(&stored).iter().map(|b| format!("{b:02x}")).collect();
    let mut in_folder_order: Vec<(usize, &LabeledImage)> = images.iter().enumerate().collect();
    in_folder_order.sort_by(|(i, a), (j, b)| (&a.label, i).cmp(&(&b.label, j)));
    let in_folder_order: Vec<LabeledImage> = in_folder_order.into_iter().map(|(_, image)| image.clone()).collect();
    assert_eq!(stored_sha256, expected_dataset_sha256(&in_folder_order));
}
