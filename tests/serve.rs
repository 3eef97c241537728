//! `contrastive serve` end to end: the real binary on a loopback port and a real gRPC client.
//! Expectations come from outside the server: ONNX Runtime run in this process on the same
//! model file, the candle encoder rebuilt from the version's weights, hand-computed norms.
//!
//! Needs the ONNX Runtime library: `scripts/fetch-onnxruntime`.

mod common;

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::{free_port, http_get_metrics, max_abs_diff, publish_copy, shipped_version_dir, Server, MODEL};
use contrastive::data::idx::{load_mnist_format_dir, Split};
use contrastive::data::Dataset;
use contrastive::proto::v1::embedding_service_client::EmbeddingServiceClient;
use contrastive::proto::v1::{
    embed_stream_response, input, EmbedRequest, EmbedResponse, EmbedStreamRequest, GetModelRequest, Input, VersionState,
};
use contrastive::registry::manifest::FileDigest;
use contrastive::registry::{Manifest, MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE};
use contrastive::runtime::{OnnxEncoder, SessionOptions};
use contrastive::train::checkpoint;
use contrastive::train::Model;
use image::{DynamicImage, GrayImage, ImageFormat};
use tonic::Code;

const SIDE: usize = 28;
const PIXELS: usize = SIDE * SIDE;
const WIDTH: usize = 128;

type Client = EmbeddingServiceClient<contrastive::client::AuthChannel>;

// ---------------------------------------------------------------------------------------------
// Independent expectations

fn test_images() -> &'static Dataset {
    static DATA: OnceLock<Dataset> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset");
        let data = load_mnist_format_dir(&dir, Split::Test).expect("the Fashion-MNIST test subset");
        assert_eq!(data.shape.dims(), [1, SIDE, SIDE]);
        data
    })
}

fn manifest() -> Manifest {
    Manifest::load(&shipped_version_dir().join(MANIFEST_FILE)).unwrap()
}

/// The shipped model in this process's own ONNX Runtime: `[N, 128]` raw embeddings of `images`.
fn ort_embeddings(images: &[f32]) -> Vec<Vec<f32>> {
    static ENCODER: OnceLock<Mutex<OnnxEncoder>> = OnceLock::new();
    let encoder = ENCODER.get_or_init(|| {
        Mutex::new(
            OnnxEncoder::load(&shipped_version_dir().join(MODEL_FILE), SessionOptions::default())
                .expect("load model.onnx in-process"),
        )
    });
    let count = images.len() / PIXELS;
    let (values, width) = encoder.lock().unwrap().run(images, count, [1, SIDE, SIDE]).unwrap();
    assert_eq!(width, WIDTH);
    values.chunks(width).map(<[f32]>::to_vec).collect()
}

/// The candle encoder rebuilt from the version's weights file, in evaluation mode.
fn candle_embeddings(images: &[f32]) -> Vec<Vec<f32>> {
    let manifest = manifest();
    let mut model = Model::new(&manifest.training.config, &Device::Cpu).unwrap();
    let buffers =
        checkpoint::load_weights_file(&shipped_version_dir().join(WEIGHTS_FILE), &model.varmap, &Device::Cpu).unwrap();
    model.method.load_buffers(&buffers).unwrap();
    let count = images.len() / PIXELS;
    let x = candle_core::Tensor::from_slice(images, (count, 1, SIDE, SIDE), &Device::Cpu).unwrap();
    let out = model.method.encoder().forward_t(&x, false).unwrap();
    out.flatten_all().unwrap().to_vec1::<f32>().unwrap().chunks(WIDTH).map(<[f32]>::to_vec).collect()
}

/// What the server's preprocessing makes of encoded bytes, computed here.
fn preprocessed(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    contrastive::registry::input::image_to_tensor(bytes, &manifest().input, &mut out).unwrap();
    assert_eq!(out.len(), PIXELS);
    out
}

fn unit(values: &[f32]) -> Vec<f32> {
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    values.iter().map(|v| v / norm).collect()
}

fn norm(values: &[f32]) -> f32 {
    values.iter().map(|v| v * v).sum::<f32>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b))
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Image `i` of the test subset, CHW in [0, 1].
fn image(i: usize) -> &'static [f32] {
    test_images().image(i)
}

fn images(range: std::ops::Range<usize>) -> Vec<f32> {
    range.flat_map(|i| image(i).iter().copied()).collect()
}

fn tensor_input(pixels: &[f32]) -> Input {
    tensor_input_shaped(vec![1, SIDE as u32, SIDE as u32], pixels.to_vec())
}

fn tensor_input_shaped(shape: Vec<u32>, values: Vec<f32>) -> Input {
    Input { data: Some(input::Data::Tensor(contrastive::proto::v1::Tensor { shape, values })) }
}

fn image_input(bytes: Vec<u8>) -> Input {
    Input { data: Some(input::Data::Image(bytes)) }
}

fn gray(pixels: &[f32]) -> GrayImage {
    GrayImage::from_raw(SIDE as u32, SIDE as u32, pixels.iter().map(|v| (v * 255.0).round() as u8).collect()).unwrap()
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    bytes
}

fn png(pixels: &[f32]) -> Vec<u8> {
    encode(DynamicImage::ImageLuma8(gray(pixels)), ImageFormat::Png)
}

fn raw_request(inputs: Vec<Input>) -> EmbedRequest {
    EmbedRequest { inputs, normalize: Some(false), ..Default::default() }
}

fn rows(response: &EmbedResponse) -> Vec<Vec<f32>> {
    response.embeddings.iter().map(|e| e.values.clone()).collect()
}

async fn client(server: &Server) -> Client {
    contrastive::client::embedding_client(&server.url, None).await.unwrap()
}

async fn serving(args: &[&str]) -> (Server, Client) {
    let server = Server::start(args);
    server.wait_serving().await;
    let client = client(&server).await;
    (server, client)
}

async fn embed(client: &mut Client, request: EmbedRequest) -> EmbedResponse {
    client.embed(request).await.unwrap_or_else(|status| panic!("Embed failed: {status:?}")).into_inner()
}

async fn embed_err(client: &mut Client, request: EmbedRequest) -> tonic::Status {
    match client.embed(request).await {
        Ok(response) => {
            panic!("Embed succeeded where it should fail: {} embeddings", response.into_inner().embeddings.len())
        }
        Err(status) => status,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. What the server computes

#[tokio::test(flavor = "multi_thread")]
async fn tensor_embeddings_match_onnx_runtime_and_candle() {
    let (_server, mut client) = serving(&[]).await;
    let pixels = images(0..4);
    let inputs: Vec<Input> = (0..4).map(|i| tensor_input(image(i))).collect();

    let response = embed(&mut client, raw_request(inputs.clone())).await;
    assert_eq!(response.model, MODEL);
    assert_eq!(response.version, 1);
    let served = rows(&response);
    assert_eq!(served.len(), 4);
    assert!(served.iter().all(|row| row.len() == WIDTH));

    let ort = ort_embeddings(&pixels);
    let diff = max_abs_diff(&served, &ort);
    assert!(diff <= 1e-5, "max |server − in-process ONNX Runtime| = {diff}");
    let candle = candle_embeddings(&pixels);
    let diff = max_abs_diff(&served, &candle);
    assert!(diff <= 1e-4, "max |server − candle| = {diff}");
    // A real image's embedding is not trivially small: the comparisons above mean something.
    assert!(served.iter().all(|row| norm(row) > 0.1), "norms {:?}", served.iter().map(|r| norm(r)).collect::<Vec<_>>());

    let timing = response.timing.expect("timing");
    assert!(timing.inference_ms > 0.0, "{timing:?}");
    assert!(timing.total_ms >= timing.inference_ms, "{timing:?}");
    assert!(timing.queue_ms >= 0.0, "{timing:?}");

    // normalize is on by default: unit rows, the raw rows scaled.
    let normalized = embed(&mut client, EmbedRequest { inputs: inputs.clone(), ..Default::default() }).await;
    let normalized = rows(&normalized);
    for row in &normalized {
        assert!((norm(row) - 1.0).abs() < 1e-5, "norm {}", norm(row));
    }
    let expected: Vec<Vec<f32>> = ort.iter().map(|r| unit(r)).collect();
    assert!(max_abs_diff(&normalized, &expected) < 1e-5);

    // dimensions: 16 keeps the first 16 raw values, then normalises them.
    let truncated = embed(&mut client, EmbedRequest { inputs, dimensions: 16, ..Default::default() }).await;
    let truncated = rows(&truncated);
    let expected: Vec<Vec<f32>> = ort.iter().map(|r| unit(&r[..16])).collect();
    for row in &truncated {
        assert_eq!(row.len(), 16);
        assert!((norm(row) - 1.0).abs() < 1e-5, "norm {}", norm(row));
    }
    let diff = max_abs_diff(&truncated, &expected);
    assert!(diff < 1e-5, "truncated rows are not the first 16 raw values scaled: {diff}");
}

#[tokio::test(flavor = "multi_thread")]
async fn png_jpeg_and_rgb_images_are_preprocessed_as_the_manifest_says() {
    let (_server, mut client) = serving(&[]).await;
    let pngs: Vec<Vec<u8>> = (4..6).map(|i| png(image(i))).collect();
    let jpeg = encode(DynamicImage::ImageLuma8(gray(image(6))), ImageFormat::Jpeg);
    // 56×56 RGB: every gray pixel doubled in each direction, R = G = B.
    let gray7 = gray(image(7));
    let rgb = image::RgbImage::from_fn(56, 56, |x, y| {
        let p = gray7.get_pixel(x / 2, y / 2).0[0];
        image::Rgb([p, p, p])
    });
    let rgb_png = encode(DynamicImage::ImageRgb8(rgb), ImageFormat::Png);

    let all = [pngs[0].clone(), pngs[1].clone(), jpeg.clone(), rgb_png.clone()];
    let response = embed(&mut client, raw_request(all.iter().cloned().map(image_input).collect())).await;
    let served = rows(&response);
    assert_eq!(served.len(), 4);

    let tensors: Vec<f32> = all.iter().flat_map(|bytes| preprocessed(bytes)).collect();
    let diff = max_abs_diff(&served, &ort_embeddings(&tensors));
    assert!(diff <= 1e-5, "max |server − in-process ONNX Runtime on the same preprocessing| = {diff}");

    // A lossless PNG of an image is that image: same tensor (up to the f32 scale), same embedding.
    let png_tensor = preprocessed(&pngs[0]);
    let pixel_diff = png_tensor.iter().zip(image(4)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(pixel_diff < 1e-6, "PNG pixels differ from the source image by {pixel_diff}");
    let direct = ort_embeddings(image(4));
    assert!(max_abs_diff(&served[..1], &direct) < 1e-4);
    // The RGB image was converted to gray and resized, not rejected: it stays close to its source.
    let similarity = cosine(&served[3], &ort_embeddings(image(7))[0]);
    assert!(similarity > 0.9, "the upscaled RGB copy embeds far from its source: cosine {similarity}");
}

// ---------------------------------------------------------------------------------------------
// 2. EmbedStream

#[tokio::test(flavor = "multi_thread")]
async fn embed_stream_answers_every_request_in_order() {
    let (_server, mut client) = serving(&[]).await;
    const INVALID: usize = 7;
    let requests: Vec<EmbedStreamRequest> = (0..20)
        .map(|i| {
            let count = if i == INVALID { 0 } else { 1 + i % 3 };
            let inputs = (0..count).map(|k| tensor_input(image(i + k))).collect();
            EmbedStreamRequest {
                id: format!("r{i}"),
                request: Some(EmbedRequest { inputs, normalize: Some(i % 2 == 0), ..Default::default() }),
            }
        })
        .collect();
    let mut stream = client.embed_stream(tokio_stream::iter(requests.clone())).await.unwrap().into_inner();
    let mut responses = Vec::new();
    while let Some(response) = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a stream response in 20 s")
        .unwrap()
    {
        responses.push(response);
    }
    assert_eq!(responses.len(), 20);
    let ids: Vec<&str> = responses.iter().map(|r| r.id.as_str()).collect();
    let expected_ids: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    assert_eq!(ids, expected_ids);

    for (i, (response, request)) in responses.into_iter().zip(requests).enumerate() {
        match response.result.expect("a result") {
            embed_stream_response::Result::Error(error) => {
                assert_eq!(i, INVALID, "r{i} failed: {error:?}");
                assert_eq!(error.code, Code::InvalidArgument as i32, "{error:?}");
                assert!(error.message.contains("no inputs"), "{error:?}");
            }
            embed_stream_response::Result::Response(streamed) => {
                assert_ne!(i, INVALID, "the empty request r{i} succeeded");
                let unary = embed(&mut client, request.request.unwrap()).await;
                assert_eq!((streamed.model.as_str(), streamed.version), (MODEL, 1));
                assert_eq!(streamed.embeddings.len(), 1 + i % 3);
                let diff = max_abs_diff(&rows(&streamed), &rows(&unary));
                assert!(diff < 1e-5, "r{i}: stream and unary differ by {diff}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Bad requests

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_and_the_server_keeps_serving() {
    let (_server, mut client) = serving(&["--max-client-batch", "8", "--max-message-bytes", "200000"]).await;
    let good = || raw_request(vec![tensor_input(image(0))]);
    let reference = ort_embeddings(image(0));
    let mut nan = image(0).to_vec();
    nan[5] = f32::NAN;
    let noise: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();

    let cases: Vec<(&str, EmbedRequest, Code, Vec<&str>)> = vec![
        (
            "undecodable image",
            raw_request(vec![image_input(b"definitely not a PNG".to_vec())]),
            Code::InvalidArgument,
            vec!["input 0", "decode"],
        ),
        (
            "undecodable second image",
            raw_request(vec![tensor_input(image(0)), image_input(vec![0x89, b'P', b'N', b'G', 1, 2, 3])]),
            Code::InvalidArgument,
            vec!["input 1"],
        ),
        (
            "wrong tensor shape",
            raw_request(vec![tensor_input_shaped(vec![1, 27, 28], vec![0.5; 27 * 28])]),
            Code::InvalidArgument,
            vec!["input 0", "[1, 27, 28]"],
        ),
        (
            "too few tensor values",
            raw_request(vec![tensor_input_shaped(vec![1, 28, 28], vec![0.5; 100])]),
            Code::InvalidArgument,
            vec!["784"],
        ),
        ("NaN", raw_request(vec![tensor_input(&nan)]), Code::InvalidArgument, vec!["input 0", "value 5", "NaN"]),
        ("empty inputs", raw_request(Vec::new()), Code::InvalidArgument, vec!["no inputs"]),
        ("input without data", raw_request(vec![Input { data: None }]), Code::InvalidArgument, vec!["input 0"]),
        (
            "over max_client_batch",
            raw_request((0..9).map(|i| tensor_input(image(i))).collect()),
            Code::InvalidArgument,
            vec!["9 inputs", "at most 8"],
        ),
        (
            "unknown model",
            EmbedRequest { model: "no-such-model".into(), ..good() },
            Code::NotFound,
            vec!["no-such-model"],
        ),
        ("unknown version", EmbedRequest { version: 9, ..good() }, Code::NotFound, vec!["version 9"]),
        ("too many dimensions", EmbedRequest { dimensions: 500, ..good() }, Code::InvalidArgument, vec!["500", "128"]),
    ];
    for (what, request, code, words) in cases {
        let status = embed_err(&mut client, request).await;
        assert_eq!(status.code(), code, "{what}: {status:?}");
        for word in words {
            assert!(status.message().contains(word), "{what}: {:?} does not mention {word:?}", status.message());
        }
        let after = embed(&mut client, good()).await;
        assert!(max_abs_diff(&rows(&after), &reference) <= 1e-5, "after {what}");
    }

    // Over --max-message-bytes: tonic refuses the message before the service sees it.
    let status = embed_err(&mut client, raw_request(vec![image_input(noise)])).await;
    // tonic 0.14 answers OUT_OF_RANGE ("decoded message length too large"); gRPC suggests RESOURCE_EXHAUSTED.
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "oversized message: {status:?}");
    let after = embed(&mut client, good()).await;
    assert!(max_abs_diff(&rows(&after), &reference) <= 1e-5, "after the oversized message");
}

// ---------------------------------------------------------------------------------------------
// 4. Overload

#[tokio::test(flavor = "multi_thread")]
async fn overload_is_refused_and_accepted_requests_stay_correct() {
    let (_server, client) =
        serving(&["--queue-capacity", "4", "--max-batch", "2", "--max-delay-ms", "20", "--max-client-batch", "4"])
            .await;
    let pixels = images(10..12);
    let reference = ort_embeddings(&pixels);
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut client = client.clone();
            let request = raw_request(vec![tensor_input(&pixels[..PIXELS]), tensor_input(&pixels[PIXELS..])]);
            tokio::spawn(async move { client.embed(request).await.map(tonic::Response::into_inner) })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(30), futures_join(tasks))
        .await
        .expect("64 requests finish within 30 s");
    let (mut ok, mut exhausted) = (0, 0);
    for result in results {
        match result {
            Ok(response) => {
                ok += 1;
                let diff = max_abs_diff(&rows(&response), &reference);
                assert!(diff <= 1e-5, "an accepted request under load is wrong by {diff}");
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                exhausted += 1;
                assert!(status.message().contains("capacity 4"), "{status:?}");
            }
            Err(status) => panic!("unexpected failure under load: {status:?}"),
        }
    }
    eprintln!("overload: {ok} OK, {exhausted} RESOURCE_EXHAUSTED in {:?}", started.elapsed());
    assert!(ok >= 1, "no request was served");
    assert!(exhausted >= 1, "no request was refused with a queue of 4 images ({ok} OK)");
}

async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("a request task panicked"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 5. Hot loading

#[tokio::test(flavor = "multi_thread")]
async fn new_versions_load_while_serving_and_broken_ones_are_refused() {
    let (server, mut client) = serving(&[]).await;
    let request = || raw_request(vec![tensor_input(image(3))]);
    let v1 = embed(&mut client, request()).await;
    assert_eq!(v1.version, 1);

    publish_copy(&server.models, 2, |_| {});
    let deadline = Instant::now() + Duration::from_secs(10);
    let v2 = loop {
        let response = embed(&mut client, request()).await;
        if response.version == 2 {
            break response;
        }
        assert_eq!(response.version, 1);
        assert!(Instant::now() < deadline, "version 2 not served 10 s after it was published; log:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(max_abs_diff(&rows(&v2), &rows(&v1)) <= 1e-5, "version 2 has version 1's files");

    // Version 3: garbage in place of the graph, with digests that match the garbage, so it passes
    // the file check and fails in ONNX Runtime. Version 4: a graph that does not match its digest.
    publish_copy(&server.models, 3, |dir| {
        let garbage = b"this is not an ONNX graph".repeat(100);
        std::fs::write(dir.join(MODEL_FILE), &garbage).unwrap();
        let path = dir.join(MANIFEST_FILE);
        let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let digest = FileDigest::of_file(&dir.join(MODEL_FILE)).unwrap();
        manifest["files"][MODEL_FILE] = serde_json::to_value(digest).unwrap();
        std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    });
    publish_copy(&server.models, 4, |dir| {
        let mut graph = std::fs::read(dir.join(MODEL_FILE)).unwrap();
        let last = graph.len() - 1;
        graph[last] ^= 0xff;
        std::fs::write(dir.join(MODEL_FILE), graph).unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = client.get_model(GetModelRequest { name: MODEL.into() }).await.unwrap().into_inner();
        if info.versions.iter().any(|v| v.version == 4) && info.versions.iter().any(|v| v.version == 3) {
            break info;
        }
        assert!(Instant::now() < deadline, "versions 3 and 4 not reported 10 s after publishing: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(info.name, MODEL);
    assert_eq!(info.latest_ready_version, 2, "{info:?}");
    let state = |version: u64| {
        info.versions
            .iter()
            .find(|v| v.version == version)
            .unwrap_or_else(|| panic!("no version {version} in {info:?}"))
    };
    for (version, words) in [(3, "ONNX Runtime cannot load"), (4, "does not match its manifest")] {
        let v = state(version);
        assert_eq!(v.state, VersionState::Failed as i32, "version {version}: {v:?}");
        assert!(v.error.contains(words), "version {version}: error {:?} lacks {words:?}", v.error);
    }
    let ready = state(2);
    assert_eq!(ready.state, VersionState::Ready as i32);
    assert_eq!(ready.input_shape, vec![1, 28, 28]);
    assert_eq!(ready.embedding_dimensions, WIDTH as u32);

    let latest = embed(&mut client, request()).await;
    assert_eq!(latest.version, 2, "the newest ready version still answers");
    let status = embed_err(&mut client, EmbedRequest { version: 3, ..request() }).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("refused"), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// 6. Health and shutdown

#[tokio::test(flavor = "multi_thread")]
async fn health_follows_the_repository() {
    let server = Server::start_empty(&[]);
    let status = contrastive::client::health(&server.url, "").await.unwrap();
    assert_eq!(status, "NOT_SERVING");
    let mut client = client(&server).await;
    let status = embed_err(&mut client, raw_request(vec![tensor_input(image(0))])).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Still not serving a few polls later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(contrastive::client::health(&server.url, "").await.unwrap(), "NOT_SERVING");

    publish_copy(&server.models, 1, |_| {});
    let published = Instant::now();
    server.wait_serving().await;
    assert!(published.elapsed() < Duration::from_secs(5), "SERVING only after {:?}", published.elapsed());
    assert_eq!(contrastive::client::health(&server.url, "contrastive.v1.EmbeddingService").await.unwrap(), "SERVING");
    let response = embed(&mut client, raw_request(vec![tensor_input(image(0))])).await;
    assert!(max_abs_diff(&rows(&response), &ort_embeddings(image(0))) <= 1e-5);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_queued_requests_finish_then_exits_zero() {
    // A long batching delay keeps the requests queued in the server when the signal arrives.
    let (server, mut client) = serving(&["--max-delay-ms", "200"]).await;
    let reference = ort_embeddings(image(5));
    embed(&mut client, raw_request(vec![tensor_input(image(5))])).await; // the connection is up

    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let result =
                    client.embed(raw_request(vec![tensor_input(image(5))])).await.map(tonic::Response::into_inner);
                (result, Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let kill = std::process::Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    let signalled = Instant::now();

    let results = tokio::time::timeout(Duration::from_secs(10), futures_join(tasks))
        .await
        .expect("requests answered within 10 s");
    for (i, (result, answered)) in results.into_iter().enumerate() {
        let response =
            result.unwrap_or_else(|status| panic!("request {i} was not served through shutdown: {status:?}"));
        assert!(max_abs_diff(&rows(&response), &reference) <= 1e-5);
        // Otherwise the test would not have exercised the drain.
        assert!(answered > signalled, "request {i} was answered before the signal was sent");
    }
    let exit = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(10)));
    let exit = exit.unwrap_or_else(|| panic!("still running 10 s after SIGTERM; log:\n{}", server.log()));
    assert!(exit.success(), "exit status {exit:?} after SIGTERM; log:\n{}", server.log());
    assert!(signalled.elapsed() < Duration::from_secs(10));
    assert!(server.log().contains("shut down"), "log:\n{}", server.log());
}

// ---------------------------------------------------------------------------------------------
// 7. API keys

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_gate_embeddings() {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), "# test keys\nthe-right-key\n").unwrap();
    let server = Server::start(&["--api-key-file", keys.path().to_str().unwrap(), "--auth-embeddings", "true"]);
    server.wait_serving().await; // health needs no key
    let request = || raw_request(vec![tensor_input(image(1))]);

    let mut anonymous = contrastive::client::embedding_client(&server.url, None).await.unwrap();
    let status = embed_err(&mut anonymous, request()).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut wrong = contrastive::client::embedding_client(&server.url, Some("the-wrong-key")).await.unwrap();
    let status = embed_err(&mut wrong, request()).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let mut right = contrastive::client::embedding_client(&server.url, Some("the-right-key")).await.unwrap();
    let response = embed(&mut right, request()).await;
    assert!(max_abs_diff(&rows(&response), &ort_embeddings(image(1))) <= 1e-5);
}

// ---------------------------------------------------------------------------------------------
// 8. Metrics

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_batches_and_models() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let (_server, mut client) = serving(&["--metrics-addr", &metrics_addr]).await;
    for i in 0..3 {
        embed(&mut client, raw_request(vec![tensor_input(image(i)), tensor_input(image(i + 1))])).await;
    }
    embed_err(&mut client, raw_request(Vec::new())).await;

    let text = tokio::task::spawn_blocking(move || http_get_metrics(&metrics_addr)).await.unwrap();
    assert!(text.starts_with("HTTP/1."), "{text}");
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).map(str::to_string);
    let ok = line("contrastive_requests_total{rpc=\"Embed\",code=\"ok\"}")
        .unwrap_or_else(|| panic!("no ok counter in\n{text}"));
    assert_eq!(ok.rsplit(' ').next().unwrap(), "3", "{ok}");
    let refused = line("contrastive_requests_total{rpc=\"Embed\",code=\"invalidargument\"}")
        .unwrap_or_else(|| panic!("no error counter in\n{text}"));
    assert_eq!(refused.rsplit(' ').next().unwrap(), "1", "{refused}");
    assert!(text.contains("contrastive_batch_size_bucket"), "{text}");
    assert!(text.lines().any(|l| l == "contrastive_models_loaded 1"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("contrastive_model_version_info")
            && l.contains("provider=\"CPUExecutionProvider\"")
            && l.ends_with(" 1")),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Reflection

/// Lists the services and describes EmbeddingService through one reflection version (`v1` and
/// `v1alpha` have the same messages in different packages).
macro_rules! reflect {
    ($version:ident, $url:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;

        let mut reflection = ServerReflectionClient::new(contrastive::client::connect($url).await.unwrap());
        let ask = |request| ServerReflectionRequest { host: String::new(), message_request: Some(request) };
        let questions = vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol("contrastive.v1.EmbeddingService".into())),
        ];
        let mut answers = reflection.server_reflection_info(tokio_stream::iter(questions)).await.unwrap().into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("the first answer is not a service list");
        };
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("the second answer is not a file descriptor");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        (names, files.file_descriptor_proto)
    }};
}

/// grpcurl 1.8 and Python's grpcio-reflection ask `v1alpha`; newer clients `v1`.
#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services_in_both_versions() {
    let server = Server::start(&[]);
    let v1 = reflect!(v1, &server.url);
    let v1alpha = reflect!(v1alpha, &server.url);
    assert_eq!(v1, v1alpha, "both versions describe the same services");
    let (names, files) = v1;
    for expected in [
        "contrastive.v1.EmbeddingService",
        "contrastive.v1.FineTuneService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    let service = files
        .iter()
        .map(|bytes| <prost_types::FileDescriptorProto as prost::Message>::decode(bytes.as_slice()).unwrap())
        .flat_map(|file| file.service)
        .find(|s| s.name() == "EmbeddingService")
        .expect("EmbeddingService in the described file");
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, ["Embed", "EmbedStream", "ListModels", "GetModel"]);
}

/// grpcurl itself (1.8 asks `v1alpha`, 1.9 `v1` first), where one is installed: the binaries
/// named by `CONTRASTIVE_GRPCURL` (a PATH-style list), else `grpcurl` on PATH; skipped without.
#[test]
fn grpcurl_lists_and_describes_the_services() {
    let binaries: Vec<std::path::PathBuf> = match std::env::var_os("CONTRASTIVE_GRPCURL") {
        Some(list) => std::env::split_paths(&list).collect(),
        None => std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join("grpcurl"))
            .filter(|path| path.is_file())
            .take(1)
            .collect(),
    };
    if binaries.is_empty() {
        eprintln!("skipped: no grpcurl (set CONTRASTIVE_GRPCURL=/path/to/grpcurl[:another] or put one on PATH)");
        return;
    }
    let server = Server::start(&[]);
    for grpcurl in &binaries {
        let run = |args: &[&str]| {
            let output = std::process::Command::new(grpcurl)
                .arg("-plaintext")
                .arg(&server.addr)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", grpcurl.display()));
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(
                output.status.success(),
                "{} {args:?}: {}",
                grpcurl.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            text
        };
        let services = run(&["list"]);
        for expected in ["contrastive.v1.EmbeddingService", "contrastive.v1.FineTuneService", "grpc.health.v1.Health"] {
            assert!(
                services.lines().any(|l| l == expected),
                "{}: {expected} missing from {services}",
                grpcurl.display()
            );
        }
        let described = run(&["describe", "contrastive.v1.EmbeddingService"]);
        assert!(described.contains("rpc Embed ( .contrastive.v1.EmbedRequest )"), "{described}");
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Command line clients

/// `contrastive embed` with two servers (and a third address nothing listens on) and one file per
/// request: eight requests sent at once, four to each server in turn (their own request counters
/// say so), the unreachable one left out with a warning, and the embeddings in the files' order.
#[tokio::test(flavor = "multi_thread")]
async fn cli_embed_spreads_requests_over_several_servers() {
    let metrics: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let (first, _client) = serving(&["--metrics-addr", &metrics[0]]).await;
    let (second, _client) = serving(&["--metrics-addr", &metrics[1]]).await;
    let files: Vec<PathBuf> = (0..8)
        .map(|i| {
            let path = first.scratch().join(format!("{i}.png"));
            std::fs::write(&path, png(image(i))).unwrap();
            path
        })
        .collect();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_contrastive"))
        .args(["embed", "--batch-size", "1", "--addr", &format!("{},{}", first.url, second.url)])
        .args(["--addr", &format!("http://127.0.0.1:{}", free_port())])
        .args(&files)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "embed failed: {}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["requests"], 8, "{json}");
    let served: Vec<Vec<f32>> = json["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect();
    let expected: Vec<Vec<f32>> = ort_embeddings(&images(0..8)).iter().map(|r| unit(r)).collect();
    assert!(max_abs_diff(&served, &expected) < 1e-4, "in the files' order");

    let answered: Vec<u64> = tokio::task::spawn_blocking(move || {
        metrics
            .iter()
            .map(|addr| {
                let text = http_get_metrics(addr);
                let counter = "contrastive_requests_total{rpc=\"Embed\",code=\"ok\"}";
                text.lines()
                    .find(|l| l.starts_with(counter))
                    .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect()
    })
    .await
    .unwrap();
    assert_eq!(answered, [4, 4]);
    let warning = String::from_utf8_lossy(&output.stderr);
    assert!(warning.contains("warning: cannot connect to http://127.0.0.1:"), "{warning}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_embed_and_health_talk_to_the_server() {
    let (server, _client) = serving(&[]).await;
    let a = server.scratch().join("a.png");
    let b = server.scratch().join("b.png");
    std::fs::write(&a, png(image(8))).unwrap();
    std::fs::write(&b, png(image(9))).unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_contrastive"))
        .args(["embed", "--addr", &server.url])
        .arg(&a)
        .arg(&b)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "embed failed: {}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    assert_eq!(json["version"], 1, "{json}");
    assert_eq!(json["model"], MODEL, "{json}");
    let embeddings = json["embeddings"].as_array().expect("an embeddings array");
    assert_eq!(embeddings.len(), 2);
    let served: Vec<Vec<f32>> = embeddings
        .iter()
        .map(|e| e["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect();
    for row in &served {
        assert_eq!(row.len(), WIDTH);
        assert!((norm(row) - 1.0).abs() < 1e-5, "norm {}", norm(row));
    }
    assert_eq!(embeddings[0]["file"], a.to_str().unwrap());
    let expected: Vec<Vec<f32>> = ort_embeddings(&images(8..10)).iter().map(|r| unit(r)).collect();
    assert!(max_abs_diff(&served, &expected) < 1e-4);

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_contrastive"))
        .args(["health", "--addr", &server.url])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "health: {output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");

    // And a server with nothing to serve: NOT_SERVING, exit status 1.
    let empty = Server::start_empty(&[]);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_contrastive"))
        .args(["health", "--addr", &empty.url])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "health of an empty server: {output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "NOT_SERVING");
}

// ---------------------------------------------------------------------------------------------
// 11. The OpenAI-compatible HTTP endpoint

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `POST /v1/embeddings` with `body`, optionally with an API key.
async fn post_embeddings(server: &Server, key: Option<&str>, body: serde_json::Value) -> (u16, serde_json::Value) {
    let addr = server.http.clone().expect("the server was started with --http-addr");
    let authorization = key.map(|key| format!("Bearer {key}"));
    tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = authorization.iter().map(|a| ("Authorization", a.as_str())).collect();
        common::http_json(&addr, "POST", "/v1/embeddings", &headers, &body.to_string())
    })
    .await
    .unwrap()
}

fn data_rows(answer: &serde_json::Value) -> Vec<Vec<f32>> {
    let data = answer["data"].as_array().unwrap_or_else(|| panic!("no data in {answer}"));
    data.iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i, "{item}");
            assert_eq!(item["object"], "embedding", "{item}");
            match &item["embedding"] {
                serde_json::Value::String(text) => {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap();
                    bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
                }
                values => values.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect(),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_embeddings_equal_the_grpc_ones() {
    let (server, mut client) = serving(&["--http-addr", "127.0.0.1:0"]).await;
    let (a, b) = (png(image(8)), png(image(9)));
    let grpc = embed(
        &mut client,
        EmbedRequest { inputs: vec![image_input(a.clone()), image_input(b.clone())], ..Default::default() },
    )
    .await;
    let expected = rows(&grpc);
    // Independent of the gRPC path too: ONNX Runtime in this process, then unit length.
    let ort: Vec<Vec<f32>> =
        ort_embeddings(&[preprocessed(&a), preprocessed(&b)].concat()).iter().map(|r| unit(r)).collect();
    assert!(max_abs_diff(&expected, &ort) <= 1e-5);

    let inputs = serde_json::json!([base64(&a), format!("data:image/png;base64,{}", base64(&b))]);
    let (status, answer) = post_embeddings(&server, None, serde_json::json!({ "model": MODEL, "input": inputs })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], format!("{MODEL}:1"));
    assert!(answer["usage"]["prompt_tokens"].is_u64(), "{answer}");
    let floats = data_rows(&answer);
    assert!(max_abs_diff(&floats, &expected) <= 1e-5, "float answers equal gRPC's");

    let body = serde_json::json!({ "model": format!("{MODEL}:1"), "input": inputs, "encoding_format": "base64" });
    let (status, answer) = post_embeddings(&server, None, body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["data"][0]["embedding"].is_string(), "base64 answers are strings");
    assert_eq!(data_rows(&answer), expected, "base64 carries the exact f32 values");

    // `dimensions` truncates and re-normalises, as gRPC's does.
    let truncated =
        embed(&mut client, EmbedRequest { inputs: vec![image_input(a.clone())], dimensions: 16, ..Default::default() })
            .await;
    let body = serde_json::json!({ "model": "", "input": base64(&a), "dimensions": 16 });
    let (status, answer) = post_embeddings(&server, None, body).await;
    assert_eq!(status, 200, "{answer}");
    let rows16 = data_rows(&answer);
    assert_eq!(rows16[0].len(), 16);
    assert!(max_abs_diff(&rows16, &rows(&truncated)) <= 1e-5);
    assert!((norm(&rows16[0]) - 1.0).abs() < 1e-5);

    let addr = server.http.clone().unwrap();
    let (status, models) =
        tokio::task::spawn_blocking(move || common::http_json(&addr, "GET", "/v1/models", &[], "")).await.unwrap();
    assert_eq!(status, 200, "{models}");
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [MODEL.to_string(), format!("{MODEL}:1")]);
    assert!(models["data"][0]["created"].as_u64().unwrap() > 1_700_000_000, "from the manifest: {models}");
    let addr = server.http.clone().unwrap();
    let (status, health) =
        tokio::task::spawn_blocking(move || common::http_json(&addr, "GET", "/health", &[], "")).await.unwrap();
    assert_eq!((status, health), (200, serde_json::json!({ "status": "ok" })));
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_errors_name_the_input_with_http_codes() {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), "the-right-key\n").unwrap();
    let key_file = keys.path().to_str().unwrap();
    let server = Server::start(&[
        "--http-addr",
        "127.0.0.1:0",
        "--api-key-file",
        key_file,
        "--auth-embeddings",
        "true",
        "--max-client-batch",
        "4",
        "--max-message-bytes",
        "20000",
    ]);
    server.wait_serving().await;
    let good = base64(&png(image(3)));
    let key = Some("the-right-key");

    let cases = [
        (None, serde_json::json!({ "model": MODEL, "input": good }), 401, "Bearer"),
        (Some("wrong"), serde_json::json!({ "model": MODEL, "input": good }), 401, "not valid"),
        (key, serde_json::json!({ "model": MODEL, "input": [good, "%%%"] }), 400, "input[1]: not base64"),
        (key, serde_json::json!({ "model": MODEL, "input": [good, base64(b"not an image")] }), 400, "input 1"),
        (key, serde_json::json!({ "model": MODEL, "input": [[101, 102]] }), 400, "input[0] is not a string"),
        (key, serde_json::json!({ "model": MODEL }), 400, "input is required"),
        (key, serde_json::json!({ "model": MODEL, "input": [] }), 400, "no inputs"),
        (key, serde_json::json!({ "model": MODEL, "input": vec![good.clone(); 5] }), 400, "at most 4"),
        (key, serde_json::json!({ "model": "nope", "input": good }), 404, "nope"),
        (key, serde_json::json!({ "model": format!("{MODEL}:7"), "input": good }), 404, "7"),
        (key, serde_json::json!({ "model": MODEL, "input": good, "dimensions": 4096 }), 400, "dimensions"),
        (key, serde_json::json!({ "model": MODEL, "input": "A".repeat(30_000) }), 413, "limit"),
    ];
    for (key, body, expected_status, expected_message) in cases {
        let (status, answer) = post_embeddings(&server, key, body.clone()).await;
        let message = answer["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message in {answer}"));
        assert_eq!(status, expected_status, "{body} -> {answer}");
        assert!(message.contains(expected_message), "{body}: {message:?} should contain {expected_message:?}");
        assert!(answer["error"]["type"].is_string(), "{answer}");
    }
    let (status, answer) = post_embeddings(&server, key, serde_json::json!({ "model": MODEL, "input": good })).await;
    assert_eq!(status, 200, "the right key passes: {answer}");

    let addr = server.http.clone().unwrap();
    let (status, answer) =
        tokio::task::spawn_blocking(move || common::http_json(&addr, "GET", "/v2/anything", &[], "")).await.unwrap();
    assert_eq!(status, 404);
    assert!(answer["error"]["message"].as_str().unwrap().contains("/v1/embeddings"), "{answer}");
    let addr = server.http.clone().unwrap();
    let (status, answer) = tokio::task::spawn_blocking(move || {
        common::http_json(&addr, "POST", "/v1/embeddings", &[("Authorization", "Bearer the-right-key")], "{not json")
    })
    .await
    .unwrap();
    assert_eq!(status, 400);
    assert!(answer["error"]["message"].as_str().unwrap().contains("not JSON"), "{answer}");
}

// ---------------------------------------------------------------------------------------------
// Streams and queues at their limits.

#[tokio::test(flavor = "multi_thread")]
async fn embed_stream_reports_a_message_it_cannot_decode() {
    let (_server, mut client) = serving(&["--max-message-bytes", "200000"]).await;
    let oversized: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let requests = vec![
        EmbedStreamRequest { id: "r0".into(), request: Some(raw_request(vec![tensor_input(image(0))])) },
        EmbedStreamRequest { id: "r1".into(), request: Some(raw_request(vec![image_input(oversized)])) },
        EmbedStreamRequest { id: "r2".into(), request: Some(raw_request(vec![tensor_input(image(1))])) },
    ];
    let mut stream = client.embed_stream(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("r0's response");
    assert_eq!(first.id, "r0");
    // r1 cannot be decoded: the client must learn that, not see a clean end after r0.
    match stream.message().await {
        Err(status) => assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "{status:?}"),
        Ok(next) => panic!("after r0 the stream went on with {next:?} and no error"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_open_streams() {
    let (server, mut client) = serving(&[]).await;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    sender
        .send(EmbedStreamRequest { id: "r0".into(), request: Some(raw_request(vec![tensor_input(image(0))])) })
        .await
        .unwrap();
    let mut stream =
        client.embed_stream(tokio_stream::wrappers::ReceiverStream::new(receiver)).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().expect("r0's response").id, "r0");

    // The client keeps its side open, as a long-lived stream does.
    std::process::Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(None)) => {}
        Ok(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(Ok(Some(more))) => panic!("an unexpected response {more:?}"),
        Err(_) => panic!("the stream was still open 10 s after SIGTERM"),
    }
    let exit = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(10)));
    assert!(exit.is_some_and(|e| e.success()), "exit {exit:?} after SIGTERM with a stream open");
    drop(sender);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_larger_than_the_queue_is_refused_for_good() {
    let (_server, mut client) = serving(&["--queue-capacity", "4"]).await;
    let status = embed_err(&mut client, raw_request((0..5).map(|i| tensor_input(image(i))).collect())).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains('4') && status.message().contains('5'), "{status:?}");
}

/// A ViT goes the whole way: `contrastive train --encoder vit` for a few steps, `contrastive
/// export` (parity checked there), the ONNX checker's full check (the `onnx` package of the
/// project's .venv), then a server serves it beside nothing else, as it serves a ResNet, and its
/// embeddings are the candle encoder's, rebuilt from the version's weights.
#[tokio::test(flavor = "multi_thread")]
async fn a_trained_vit_exports_passes_the_onnx_checker_and_is_served() {
    let dirs = common::Dirs::empty();
    let version = common::publish_small_vit(&dirs, "vit");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(version.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest.architecture.encoder, "vit");
    assert_eq!(manifest.output.dimensions, 32);
    assert!(manifest.parity.max_abs_diff <= 1e-4, "{:?}", manifest.parity);

    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup-python", python.display());
    let check = "import sys, onnx; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True); print('ok')";
    let output =
        std::process::Command::new(&python).args(["-c", check]).arg(version.join(MODEL_FILE)).output().unwrap();
    assert!(output.status.success(), "onnx.checker: {}", String::from_utf8_lossy(&output.stderr));

    let server = Server::start_on(&dirs, &[]);
    server.wait_serving().await;
    let mut client = client(&server).await;
    let inputs: Vec<Input> = (0..5).map(|i| tensor_input(image(i))).collect();
    let response = embed(&mut client, raw_request(inputs)).await;
    assert_eq!((response.model.as_str(), response.version), ("vit", 1));
    let served = rows(&response);

    let mut model = Model::new(&manifest.training.config, &Device::Cpu).unwrap();
    let buffers = checkpoint::load_weights_file(&version.join(WEIGHTS_FILE), &model.varmap, &Device::Cpu).unwrap();
    model.method.load_buffers(&buffers).unwrap();
    let x = candle_core::Tensor::from_slice(&images(0..5), (5, 1, SIDE, SIDE), &Device::Cpu).unwrap();
    let expected = model.method.encoder().forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let diff = max_abs_diff(&served, &expected);
    assert!(diff <= 1e-4, "max |server − candle| = {diff}");
    assert!(served.iter().all(|row| norm(row) > 0.1), "real images give non-trivial embeddings");
}
