//! ONNX Runtime: finding its shared library, one process-wide environment, and sessions on the CPU
//! or on an NVIDIA GPU. Export parity checks and the server share this module.
//!
//! The `ort` crate is built with `load-dynamic`: the library is loaded at run time, from
//! `$ORT_DYLIB_PATH` or the project-local `onnxruntime/{cpu,gpu}/` that `scripts/fetch-onnxruntime`
//! fills.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;

pub const ORT_VERSION: &str = "1.31.1";
const LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InferenceDevice {
    Cpu,
    Cuda(i32),
    /// CUDA device 0 when its provider starts, the CPU otherwise.
    Auto,
}

impl FromStr for InferenceDevice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<i32>) {
                Some(Ok(id)) if id >= 0 => Ok(Self::Cuda(id)),
                _ => bail!("unknown device {s:?}: expected cpu, cuda, cuda:N or auto"),
            },
        }
    }
}

impl InferenceDevice {
    fn wants_gpu(self) -> bool {
        !matches!(self, Self::Cpu)
    }
}

/// The execution provider a session actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Provider::Cpu => write!(f, "CPUExecutionProvider"),
            Provider::Cuda(id) => write!(f, "CUDAExecutionProvider:{id}"),
        }
    }
}

struct Runtime {
    environment: Environment,
    library: PathBuf,
}

static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

/// Folders searched for `onnxruntime/<flavour>/`: the working directory, the executable's
/// ancestors (so `target/release/contrastive` finds the project's copy) and this source tree.
fn search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    roots
}

/// The library to load: `$ORT_DYLIB_PATH`, else the GPU build (when a GPU is wanted) or the CPU
/// build under one of [`search_roots`].
pub fn find_library(gpu: bool) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("ORT_DYLIB_PATH points at {}, which does not exist", path.display());
        }
        return Ok(path);
    }
    let flavours: &[&str] = if gpu { &["gpu", "cpu"] } else { &["cpu", "gpu"] };
    let mut tried = Vec::new();
    for flavour in flavours {
        for root in search_roots() {
            let candidate = root.join("onnxruntime").join(flavour).join(LIBRARY_FILE);
            if candidate.is_file() {
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
        }
    }
    bail!(
        "ONNX Runtime {ORT_VERSION} was not found (looked for {}). Run `scripts/fetch-onnxruntime` \
         (add `--gpu` for CUDA) in the project folder, or set ORT_DYLIB_PATH to a {LIBRARY_FILE}",
        tried.join(", ")
    )
}

/// The process-wide environment. The first call picks the library (the GPU build when `gpu`);
/// a process cannot switch libraries afterwards.
fn runtime(gpu: bool) -> Result<&'static Runtime> {
    let runtime = RUNTIME.get_or_init(|| {
        let library = find_library(gpu).map_err(|e| e.to_string())?;
        let builder = ort::init_from(&library)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", library.display()))?;
        let environment =
            builder.with_name("contrastive").build().map_err(|e| format!("cannot start ONNX Runtime: {e}"))?;
        tracing::debug!(library = %library.display(), "ONNX Runtime loaded");
        Ok(Runtime { environment, library })
    });
    runtime.as_ref().map_err(|e| anyhow!("{e}"))
}

/// The ONNX Runtime library this process loaded (after the first session).
pub fn loaded_library() -> Option<&'static Path> {
    RUNTIME.get().and_then(|r| r.as_ref().ok()).map(|r| r.library.as_path())
}

/// Options of one inference session.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    pub device: InferenceDevice,
    /// Threads of one operator; 0 lets ONNX Runtime choose.
    pub intra_threads: usize,
    /// Let idle operator threads spin-wait for work. Off in the server, whose request path needs
    /// the CPU between batches (measured: spinning took about a quarter of a core on 2 cores).
    pub spin: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { device: InferenceDevice::Cpu, intra_threads: 0, spin: true }
    }
}

/// An encoder loaded in ONNX Runtime: `[N, C, H, W]` float images in, `[N, D]` embeddings out.
pub struct OnnxEncoder {
    session: Session,
    provider: Provider,
    input_name: String,
}

/// Where a model comes from.
#[derive(Clone, Copy)]
enum ModelSource<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

impl std::fmt::Display for ModelSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::File(path) => write!(f, "{}", path.display()),
            ModelSource::Bytes(bytes) => write!(f, "an in-memory model of {} bytes", bytes.len()),
        }
    }
}

impl OnnxEncoder {
    pub fn load(model_path: &Path, options: SessionOptions) -> Result<Self> {
        Self::load_from(ModelSource::File(model_path), options)
    }

    /// Loads a model held in memory (an export being checked before it is written).
    pub fn load_bytes(model: &[u8], options: SessionOptions) -> Result<Self> {
        Self::load_from(ModelSource::Bytes(model), options)
    }

    fn load_from(model: ModelSource, options: SessionOptions) -> Result<Self> {
        let runtime = runtime(options.device.wants_gpu())?;
        let (session, provider) = match options.device {
            InferenceDevice::Cpu => (build_session(runtime, model, options, None)?, Provider::Cpu),
            InferenceDevice::Cuda(id) => {
                let session = build_session(runtime, model, options, Some(id)).with_context(|| {
                    format!(
                        "the CUDA execution provider did not start on device {id} (library {}); \
                         run `scripts/fetch-onnxruntime --gpu` and check the CUDA 13 and cuDNN 9 libraries",
                        runtime.library.display()
                    )
                })?;
                (session, Provider::Cuda(id))
            }
            InferenceDevice::Auto => match build_session(runtime, model, options, Some(0)) {
                Ok(session) => (session, Provider::Cuda(0)),
                Err(error) => {
                    tracing::info!(reason = %error, "CUDA unavailable, running on the CPU");
                    (build_session(runtime, model, options, None)?, Provider::Cpu)
                }
            },
        };
        let input_name =
            session.inputs().first().map(|i| i.name().to_string()).ok_or_else(|| anyhow!("{model} has no input"))?;
        if session.outputs().is_empty() {
            bail!("{model} has no output");
        }
        Ok(Self { session, provider, input_name })
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Runs one batch: `images` holds `batch` images of `image_dims` (C, H, W) in row-major order.
    /// Returns the embeddings row-major and their width.
    pub fn run(&mut self, images: &[f32], batch: usize, image_dims: [usize; 3]) -> Result<(Vec<f32>, usize)> {
        let [c, h, w] = image_dims;
        if images.len() != batch * c * h * w {
            bail!("{} values do not make {batch} images of {c}×{h}×{w}", images.len());
        }
        let input = TensorRef::from_array_view(([batch, c, h, w], images))?;
        let outputs = self.session.run(ort::inputs![self.input_name.as_str() => input])?;
        let (shape, values) = outputs[0].try_extract_tensor::<f32>()?;
        let dims: &[i64] = shape;
        match dims {
            [n, d] if *n as usize == batch => Ok((values.to_vec(), *d as usize)),
            _ => bail!("the model returned shape {dims:?} for a batch of {batch}"),
        }
    }
}

/// Starts `device`'s execution provider on a one-node model (Flatten of a `[N, 1, 1, 1]` input)
/// and runs it once; returns the provider it runs on. A server told to use a GPU calls this
/// first, so it refuses to start, with the reason, rather than serve without its models.
pub fn check_device(device: InferenceDevice) -> Result<Provider> {
    use contrastive_export::{Dim, GraphBuilder};
    let build = || -> contrastive_export::Result<Vec<u8>> {
        let mut graph = GraphBuilder::new("device-check");
        let input = graph.input("image", &[Dim::batch(), Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(1)])?;
        let output = graph.node("Flatten", &[&input], "embedding", &[])?;
        graph.output(&output, &[Dim::batch(), Dim::Fixed(1)])?;
        Ok(contrastive_export::to_bytes(&graph.finish(env!("CARGO_PKG_VERSION"), "device check", &[])))
    };
    let model = build().map_err(|e| anyhow!("cannot build the device-check model: {e}"))?;
    let mut encoder = OnnxEncoder::load_bytes(&model, SessionOptions { device, ..SessionOptions::default() })?;
    let (values, _) = encoder.run(&[0.5], 1, [1, 1, 1])?;
    if values != [0.5] {
        bail!("the device check returned {values:?} for [0.5] on {}", encoder.provider());
    }
    Ok(encoder.provider())
}

fn build_session(runtime: &Runtime, model: ModelSource, options: SessionOptions, cuda: Option<i32>) -> Result<Session> {
    let build = || -> ort::Result<Session> {
        let mut builder = Session::builder(&runtime.environment)?;
        if let Some(id) = cuda {
            // Without error_on_failure ORT silently falls back to the CPU. TF32 off: the answers
            // stay the CPU's within 1e-4 (TF32 keeps 10 mantissa bits). cuDNN's heuristic picks
            // each convolution's algorithm: the default exhaustive search benchmarks every
            // algorithm for each new batch size, and the batcher makes many (on an H200,
            // single-image requests ran at 1,757 images/s with the search, 8,914 without).
            let cuda = ort::ep::CUDA::default()
                .with_device_id(id)
                .with_tf32(false)
                .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic);
            builder = builder.with_execution_providers([cuda.build().error_on_failure()])?;
        }
        if options.intra_threads > 0 {
            builder = builder.with_intra_threads(options.intra_threads)?;
        }
        if !options.spin {
            builder = builder.with_intra_op_spinning(false)?;
        }
        match model {
            ModelSource::File(path) => builder.commit_from_file(path),
            ModelSource::Bytes(bytes) => builder.commit_from_memory(bytes),
        }
    };
    build().map_err(|e| anyhow!("ONNX Runtime cannot load {model}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_passes_the_device_check() {
        assert_eq!(check_device(InferenceDevice::Cpu).unwrap(), Provider::Cpu);
    }

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<InferenceDevice>().unwrap(), InferenceDevice::Cpu);
        assert_eq!("cuda".parse::<InferenceDevice>().unwrap(), InferenceDevice::Cuda(0));
        assert_eq!("cuda:3".parse::<InferenceDevice>().unwrap(), InferenceDevice::Cuda(3));
        assert_eq!("auto".parse::<InferenceDevice>().unwrap(), InferenceDevice::Auto);
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x"] {
            assert!(bad.parse::<InferenceDevice>().is_err(), "{bad}");
        }
    }
}
