//! The server as Python users meet it: the official `openai` package against the
//! OpenAI-compatible endpoint, and the grpcio client example in examples/python. Expectations
//! come from the Rust gRPC client on the same images.
//!
//! Needs `scripts/setup-python` (a .venv with openai, grpcio and grpcio-tools) and the ONNX
//! Runtime library (`scripts/fetch-onnxruntime`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{max_abs_diff, Dirs, Server, MODEL};
use contrastive::data::idx::{load_mnist_format_dir, Split};
use contrastive::proto::v1::{input, EmbedRequest, Input};

/// The project's .venv Python; a missing one fails with the command that makes it.
fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup-python (it installs openai, grpcio and grpcio-tools)",
        python.display()
    );
    python
}

fn run_python(args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(python()).args(args).output().expect("start python");
    assert!(
        output.status.success(),
        "python {args:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `count` test-subset images of each of `classes` as PNG files under `dir/<class>/`, and the
/// (class, path) of each.
fn write_pngs(dir: &Path, classes: &[usize], count: usize) -> Vec<(usize, PathBuf)> {
    let data = load_mnist_format_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset"),
        Split::Test,
    )
    .expect("the Fashion-MNIST test subset");
    let mut written = Vec::new();
    for &class in classes {
        let folder = dir.join(format!("class{class}"));
        std::fs::create_dir_all(&folder).unwrap();
        for index in (0..data.len()).filter(|&i| data.labels[i] as usize == class).take(count) {
            let pixels: Vec<u8> = data.image(index).iter().map(|v| (v * 255.0).round() as u8).collect();
            let path = folder.join(format!("{index}.png"));
            image::GrayImage::from_raw(28, 28, pixels).unwrap().save(&path).unwrap();
            written.push((class, path));
        }
    }
    written
}

async fn grpc_embeddings(server: &Server, key: Option<&str>, paths: &[PathBuf]) -> Vec<Vec<f32>> {
    let mut client = contrastive::client::embedding_client(&server.url, key).await.unwrap();
    let inputs = paths.iter().map(|p| Input { data: Some(input::Data::Image(std::fs::read(p).unwrap())) }).collect();
    let response = client.embed(EmbedRequest { inputs, ..Default::default() }).await.unwrap().into_inner();
    response.embeddings.into_iter().map(|e| e.values).collect()
}

fn rows(value: &serde_json::Value) -> Vec<Vec<f32>> {
    let rows = value.as_array().unwrap_or_else(|| panic!("not a list of rows: {value}"));
    rows.iter().map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()).collect()
}

/// `openai.OpenAI(base_url=..., api_key=...).embeddings.create(model=..., input=[data_uri])`
/// returns the gRPC embeddings (≤ 1e-5), in float, base64 and the package's default format.
#[tokio::test(flavor = "multi_thread")]
async fn the_openai_package_gets_the_grpc_embeddings() {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), "python-key\n").unwrap();
    let server = Server::start(&[
        "--http-addr",
        "127.0.0.1:0",
        "--api-key-file",
        keys.path().to_str().unwrap(),
        "--auth-embeddings",
        "true",
    ]);
    server.wait_serving().await;
    let images = write_pngs(&server.scratch().join("images"), &[0, 6], 3);
    let paths: Vec<PathBuf> = images.into_iter().map(|(_, p)| p).collect();
    let expected = grpc_embeddings(&server, Some("python-key"), &paths).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_embeddings.py");
    let base_url = format!("http://{}/v1", server.http.as_ref().unwrap());
    let mut args = vec![script.as_os_str(), base_url.as_ref(), "python-key".as_ref(), MODEL.as_ref()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let answer: serde_json::Value = serde_json::from_str(&run_python(&args)).unwrap();

    for format in ["float", "base64", "default"] {
        let got = rows(&answer[format]);
        let diff = max_abs_diff(&got, &expected);
        assert!(diff <= 1e-5, "{format}: max |openai - grpc| = {diff}");
    }
    assert_eq!(answer["model"], format!("{MODEL}:1"));
    assert_eq!(answer["models"], serde_json::json!([MODEL, format!("{MODEL}:1")]));
    let errors = &answer["errors"];
    assert_eq!(errors["bad_base64"][0], 400, "{errors}");
    assert!(errors["bad_base64"][1].as_str().unwrap().contains("input[0]"), "{errors}");
    assert_eq!(errors["unknown_model"][0], 404, "{errors}");
    assert_eq!(errors["wrong_key"][0], 401, "{errors}");
}

/// examples/python/contrastive_client.py: stubs generated from proto/, a folder embedded, then a
/// fine-tune uploaded, created and watched to its end.
#[tokio::test(flavor = "multi_thread")]
async fn the_python_client_example_embeds_and_fine_tunes() {
    let dirs = Dirs::with_models();
    let server = Server::start_on(&dirs, &[]);
    server.wait_serving().await;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/contrastive_client.py");

    let flat = server.scratch().join("flat");
    let images = write_pngs(&server.scratch().join("by-class"), &[0, 6], 2);
    std::fs::create_dir_all(&flat).unwrap();
    for (_, path) in &images {
        std::fs::copy(path, flat.join(path.file_name().unwrap())).unwrap();
    }
    let output =
        run_python(&[example.as_os_str(), "--addr".as_ref(), server.addr.as_ref(), "embed".as_ref(), flat.as_os_str()]);
    let answer: serde_json::Value = serde_json::from_str(&output).unwrap();
    assert_eq!(answer["model"], MODEL);
    let mut paths: Vec<PathBuf> = images.iter().map(|(_, p)| flat.join(p.file_name().unwrap())).collect();
    paths.sort();
    let expected = grpc_embeddings(&server, None, &paths).await;
    let got: Vec<Vec<f32>> = paths
        .iter()
        .map(|p| rows(&serde_json::json!([answer["embeddings"][p.file_name().unwrap().to_str().unwrap()]]))[0].clone())
        .collect();
    assert!(max_abs_diff(&got, &expected) <= 1e-6, "the example's embeddings are the server's");

    // Two classes of 12 (the job needs 8 per class after its hold-out), one epoch.
    let folder = server.scratch().join("tune");
    write_pngs(&folder, &[0, 6], 12);
    let output = run_python(&[
        example.as_os_str(),
        "--addr".as_ref(),
        server.addr.as_ref(),
        "finetune".as_ref(),
        folder.as_os_str(),
        "--base-model".as_ref(),
        MODEL.as_ref(),
        "--output-model".as_ref(),
        "py-tuned".as_ref(),
        "--epochs".as_ref(),
        "1".as_ref(),
        "--allow-worse".as_ref(),
    ]);
    let lines: Vec<serde_json::Value> = output.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["images"], 24, "{output}");
    assert!(lines.iter().any(|l| l["state"] == "JOB_STATE_RUNNING"), "{output}");
    assert!(lines.iter().any(|l| l.get("epoch").is_some()), "epoch events are printed: {output}");
    let summary = lines.last().unwrap();
    assert_eq!(summary["state"], "JOB_STATE_SUCCEEDED", "{output}");
    assert_eq!(summary["output_version"], 1, "{output}");
    assert!(dirs.models.join("py-tuned/1/model.onnx").is_file(), "the version is published");
}
