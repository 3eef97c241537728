//! Fault injection: the real `contrastive serve` binary on loopback, driven as a hostile or unlucky
//! client or operator would (empty model folders, kill -9 at chosen points, corrupt and repaired
//! versions, extreme tensors, decompression bombs, truncated images, cancelled calls), then
//! checked from outside. Each test reproduces one defect found that way and guards its fix.
//!
//! Needs the ONNX Runtime library: `scripts/fetch-onnxruntime`.

mod common;

use std::io::Cursor;
use std::time::{Duration, Instant};

use common::{publish_copy, Dirs, Server, MODEL};

use contrastive::client::{embedding_client, finetune_client, AuthChannel};
use contrastive::proto::v1::embedding_service_client::EmbeddingServiceClient;
use contrastive::proto::v1::{
    input, EmbedRequest, GetJobRequest, GetModelRequest, Input, JobState, LabeledImage, Tensor, UploadDatasetChunk,
    VersionState,
};
use contrastive::registry::{Manifest, ModelRepository, MANIFEST_FILE, MODEL_FILE};
use image::{DynamicImage, GrayImage, ImageFormat};
use tonic::Code;

type Client = EmbeddingServiceClient<AuthChannel>;

fn tensor(values: Vec<f32>) -> Input {
    Input { data: Some(input::Data::Tensor(Tensor { shape: vec![1, 28, 28], values })) }
}

fn image(bytes: Vec<u8>) -> Input {
    Input { data: Some(input::Data::Image(bytes)) }
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    bytes
}

/// A 28 × 28 gray image with some structure.
fn picture() -> DynamicImage {
    DynamicImage::ImageLuma8(GrayImage::from_fn(28, 28, |x, y| image::Luma([(x * 9 + y * 5) as u8])))
}

fn request(inputs: Vec<Input>) -> EmbedRequest {
    EmbedRequest { inputs, ..Default::default() }
}

async fn serving(dirs: &Dirs, args: &[&str]) -> (Server, Client) {
    let server = Server::start_on(dirs, args);
    server.wait_serving().await;
    let client = embedding_client(&server.url, None).await.unwrap();
    (server, client)
}

async fn embed_code(client: &mut Client, request: EmbedRequest) -> Result<(), (Code, String)> {
    client.embed(request).await.map(|_| ()).map_err(|s| (s.code(), s.message().to_string()))
}

/// Waits until `check` holds, polling every 50 ms for at most `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 1. An empty model folder (an operator's `mkdir`, or a fine-tune's output model that sorts
/// first, killed before it published) must neither become the default nor break requests that
/// name no model.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_model_folder_does_not_take_over_the_default() {
    let dirs = Dirs::with_models();
    let (server, mut client) = serving(&dirs, &[]).await;
    std::fs::create_dir(dirs.models.join("aaa")).unwrap();
    // Two poll intervals: the new folder has been scanned.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let response = client.embed(request(vec![tensor(vec![0.5; 784])])).await.unwrap().into_inner();
    assert_eq!(response.model, MODEL);
    assert_eq!(contrastive::client::health(&server.url, "").await.unwrap(), "SERVING");
    let listed = client.list_models(contrastive::proto::v1::ListModelsRequest {}).await.unwrap().into_inner();
    let default: Vec<_> = listed.models.iter().filter(|m| m.is_default).map(|m| m.name.as_str()).collect();
    assert_eq!(default, [MODEL]);

    // Restarted with the empty folder already there: still the model with a ready version.
    drop(server);
    let (_server, mut client) = serving(&dirs, &[]).await;
    assert_eq!(client.embed(request(vec![tensor(vec![0.5; 784])])).await.unwrap().into_inner().model, MODEL);
}

/// 2. A server killed after a fine-tune's version became visible, before the job recorded it:
/// at the next start the job is SUCCEEDED with that version, not FAILED "interrupted".
#[tokio::test(flavor = "multi_thread")]
async fn a_version_published_before_a_crash_belongs_to_its_job() {
    let dirs = Dirs::with_models();
    let server = Server::start_on(&dirs, &["--finetune-threads", "1"]);
    server.wait_serving().await;
    let mut finetune = finetune_client(&server.url, None).await.unwrap();
    let png = encode(picture(), ImageFormat::Png);
    let images: Vec<LabeledImage> = (0..40)
        .map(|i| LabeledImage { image: png.clone(), label: if i % 2 == 0 { "a" } else { "b" }.into() })
        .collect();
    let job = finetune
        .create_job(contrastive::proto::v1::CreateJobRequest {
            base_model: MODEL.into(),
            output_model: "crashed".into(),
            hyper_parameters: Some(contrastive::proto::v1::HyperParameters { epochs: 1000, ..Default::default() }),
            data: Some(contrastive::proto::v1::create_job_request::Data::InlineDataset(
                contrastive::proto::v1::InlineDataset { images },
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    eventually(Duration::from_secs(60), "the job runs", async || {
        let get = GetJobRequest { job_id: job.job_id.clone() };
        finetune.get_job(get).await.unwrap().into_inner().state() == JobState::Running
    })
    .await;
    server.kill();
    // What the rename left behind: a complete version whose manifest names the job.
    let target = ModelRepository::new(&dirs.models).version_dir("crashed", 1);
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(common::shipped_version_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    let path = target.join(MANIFEST_FILE);
    let mut manifest: Manifest = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest.name = "crashed".into();
    manifest.fine_tune_job = Some(job.job_id.clone());
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();

    let server = Server::start_on(&dirs, &[]);
    server.wait_serving().await;
    let mut finetune = finetune_client(&server.url, None).await.unwrap();
    let recovered = finetune.get_job(GetJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(recovered.state(), JobState::Succeeded, "{recovered:?}");
    assert_eq!(recovered.output_version, 1);
    assert_eq!(ModelRepository::new(&dirs.models).versions("crashed").unwrap(), vec![1], "no second version");
}

/// 3. Tensor values far outside [0, 1] used to give NaN or all-zero "embeddings" with OK.
#[tokio::test(flavor = "multi_thread")]
async fn extreme_tensor_values_are_refused_by_name() {
    let dirs = Dirs::with_models();
    let (_server, mut client) = serving(&dirs, &[]).await;
    for value in [3.4e38f32, 1e20, -1.0, 1.5] {
        let (code, message) =
            embed_code(&mut client, request(vec![tensor(vec![0.5; 784]), tensor(vec![value; 784])])).await.unwrap_err();
        assert_eq!(code, Code::InvalidArgument, "{value}: {message}");
        assert!(message.starts_with("input 1: tensor value 0 is"), "{value}: {message}");
        assert!(message.contains("[0, 1]"), "{message}");
    }
    assert!(embed_code(&mut client, request(vec![tensor(vec![1.0; 784]), tensor(vec![0.0; 784])])).await.is_ok());
}

/// 4. Decompression bombs: refused from their header (no decode), alone and in bulk; a request
/// over the per-request budget is refused whole; memory stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn decompression_bombs_cost_no_decoding() {
    let dirs = Dirs::with_models();
    let (server, client) = serving(&dirs, &["--max-image-pixels", "4000000", "--max-request-pixels", "5000000"]).await;
    let bomb = encode(DynamicImage::ImageLuma8(GrayImage::new(8192, 8192)), ImageFormat::Png);
    assert!(bomb.len() < 400_000, "an 8192² PNG is small on the wire ({} bytes)", bomb.len());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut client, bomb) = (client.clone(), bomb.clone());
        tasks.push(tokio::spawn(async move { embed_code(&mut client, request(vec![image(bomb)])).await }));
    }
    for task in tasks {
        let (code, message) = task.await.unwrap().unwrap_err();
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("8192×8192 = 67108864 pixels; at most 4000000"), "{message}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "refused from the header: {:?}", started.elapsed());
    // Two images within the per-image budget, over the per-request one.
    let medium = encode(DynamicImage::ImageLuma8(GrayImage::new(1600, 1600)), ImageFormat::Png);
    let (code, message) =
        embed_code(&mut client.clone(), request(vec![image(medium.clone()), image(medium)])).await.unwrap_err();
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("5120000 pixels in all; at most 5000000"), "{message}");
    let rss = resident_megabytes(server.pid());
    assert!(rss < 400.0, "resident memory {rss:.0} MB after the bombs");
}

fn resident_megabytes(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb / 1024.0
}

/// 5. A refused version used to stay refused until a restart, even once its files were fixed.
#[tokio::test(flavor = "multi_thread")]
async fn a_repaired_version_is_loaded_without_a_restart() {
    let dirs = Dirs::with_models();
    let (_server, mut client) = serving(&dirs, &[]).await;
    publish_copy(&dirs.models, 2, |staging| {
        let model = staging.join(MODEL_FILE);
        let mut bytes = std::fs::read(&model).unwrap();
        bytes[100] ^= 0xff; // digest mismatch
        std::fs::write(&model, bytes).unwrap();
    });
    let version_state = async |client: &mut Client| {
        let info = client.get_model(GetModelRequest { name: MODEL.into() }).await.unwrap().into_inner();
        info.versions.iter().find(|v| v.version == 2).map(|v| (v.state(), v.error.clone()))
    };
    eventually(Duration::from_secs(10), "version 2 refused", async || {
        matches!(version_state(&mut client).await, Some((VersionState::Failed, _)))
    })
    .await;
    let (_, reason) = version_state(&mut client).await.unwrap();
    assert!(reason.contains("fmnist-simclr/2/model.onnx"), "{reason}");
    assert!(!reason.contains(dirs.models.to_str().unwrap()), "the server's paths stay private: {reason}");
    // The operator copies the right file in.
    let shipped = common::shipped_version_dir().join(MODEL_FILE);
    std::fs::copy(shipped, ModelRepository::new(&dirs.models).version_dir(MODEL, 2).join(MODEL_FILE)).unwrap();
    eventually(Duration::from_secs(10), "version 2 served", async || {
        let mut request = request(vec![tensor(vec![0.5; 784])]);
        request.version = 2;
        client.embed(request).await.is_ok()
    })
    .await;
}

/// 6. kill -9 in the middle of an upload left its temporary file for ever.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_cut_by_kill_9_leaves_nothing_after_a_restart() {
    let dirs = Dirs::with_models();
    let server = Server::start_on(&dirs, &[]);
    server.wait_serving().await;
    let mut finetune = finetune_client(&server.url, None).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let png = encode(picture(), ImageFormat::Png);
    tx.send(UploadDatasetChunk { name: "cut".into(), images: vec![LabeledImage { image: png, label: "a".into() }] })
        .await
        .unwrap();
    let upload =
        tokio::spawn(async move { finetune.upload_dataset(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let datasets = dirs.data.join("datasets");
    let partial = || {
        std::fs::read_dir(&datasets)
            .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".ds.partial")))
            .unwrap_or(false)
    };
    eventually(Duration::from_secs(10), "the upload's temporary file", async || partial()).await;
    server.kill();
    drop(tx);
    let _ = upload.await;
    assert!(partial(), "kill -9 leaves the temporary file");
    let server = Server::start_on(&dirs, &[]);
    server.wait_serving().await;
    assert!(!partial(), "removed at start");
    assert!(server.log().contains("removed the temporary files of uploads"), "and logged");
}

/// 7. Smaller defects: truncated JPEGs were embedded, `bearer` in lower case was refused, and
/// cancelled calls were missing from the request metrics.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_images_lowercase_bearer_and_cancelled_calls() {
    let dirs = Dirs::with_models();
    let keys = dirs.root.path().join("keys");
    std::fs::write(&keys, "the-key\n").unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let args = ["--api-key-file", keys.to_str().unwrap(), "--auth-embeddings", "true", "--metrics-addr", &metrics_addr];
    let server = Server::start_on(&dirs, &args);
    server.wait_serving().await;
    let channel = contrastive::client::connect(&server.url).await.unwrap();
    let lowercase = tonic::metadata::MetadataValue::from_static("bearer the-key");
    let mut client = EmbeddingServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", lowercase.clone());
        Ok(r)
    });
    let jpeg = encode(picture(), ImageFormat::Jpeg);
    assert!(client.embed(request(vec![image(jpeg.clone())])).await.is_ok(), "lower-case bearer");
    // Cut after its header: the decoder used to fill the missing rows with grey.
    let large = DynamicImage::ImageLuma8(GrayImage::from_fn(256, 256, |x, y| image::Luma([(x * 3 + y * 7) as u8])));
    let jpeg = encode(large, ImageFormat::Jpeg);
    let status = client.embed(request(vec![image(jpeg[..jpeg.len() / 2].to_vec())])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("input 0: the JPEG is truncated"), "{}", status.message());

    // A call its client gives up on while it waits for a decoding slot.
    let heavy = encode(
        DynamicImage::ImageLuma8(GrayImage::from_fn(3000, 3000, |x, y| image::Luma([(x ^ y) as u8]))),
        ImageFormat::Png,
    );
    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut client = client.clone();
        let mut request = tonic::Request::new(request(vec![image(heavy.clone())]));
        request.set_timeout(Duration::from_millis(150));
        calls.push(tokio::spawn(async move { client.embed(request).await }));
    }
    for call in calls {
        let _ = call.await.unwrap();
    }
    let url = format!("http://{metrics_addr}/metrics");
    eventually(Duration::from_secs(10), "cancelled calls counted", async || {
        let text = http_get(&url).await;
        text.lines().any(|l| l.starts_with("contrastive_requests_total") && l.contains("code=\"cancelled\""))
    })
    .await;
}

/// A minimal HTTP/1.0 GET (the metrics endpoint), without an HTTP client dependency.
async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let Ok(mut stream) = tokio::net::TcpStream::connect(host).await else { return String::new() };
    let _ = stream.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await;
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text
}
