//! A `contrastive serve` process for end-to-end tests: the real binary through the harness the
//! serving benchmark uses too ([`contrastive::bench::ServerProcess`]), on a loopback port (port 0,
//! so tests run in parallel), with its own copy of the model repository and data folder. Its log
//! is printed when a test fails.

#![allow(dead_code)] // each test crate uses part of this

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use contrastive::bench::{ServerCommand, ServerProcess};
use contrastive::registry::{ModelRepository, MANIFEST_FILE};
use tempfile::TempDir;

pub const MODEL: &str = "fmnist-simclr";

/// The shipped model version folder.
pub fn shipped_version_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(MODEL).join("1")
}

/// Publishes the shipped model's files as `version` of `MODEL` into `models`, its manifest's
/// version rewritten; `tamper` may change the staged files before they become visible.
pub fn publish_copy(models: &Path, version: u64, tamper: impl FnOnce(&Path)) {
    ModelRepository::new(models)
        .publish(MODEL, Some(version), |staging, v| {
            for entry in std::fs::read_dir(shipped_version_dir())? {
                let entry = entry?;
                std::fs::copy(entry.path(), staging.join(entry.file_name()))?;
            }
            let path = staging.join(MANIFEST_FILE);
            let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            manifest["version"] = serde_json::json!(v);
            std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)?;
            tamper(staging);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cannot publish {MODEL} version {version}: {e:#}"));
}

/// A model repository and a data folder that outlive a server process, so a test can kill one
/// server and start another on the same folders.
pub struct Dirs {
    pub root: TempDir,
    pub models: PathBuf,
    pub data: PathBuf,
}

impl Dirs {
    /// A repository holding the shipped model's version 1 only, so that tests do not change
    /// when a newer version ships.
    pub fn with_models() -> Self {
        let dirs = Self::empty();
        copy_tree(&shipped_version_dir(), &dirs.models.join(MODEL).join("1"));
        dirs
    }

    /// An empty model repository.
    pub fn empty() -> Self {
        let root = tempfile::tempdir().expect("a temporary folder");
        let models = root.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let data = root.path().join("data");
        Self { root, models, data }
    }
}

/// Trains a small ViT (width 32, 2 blocks) for one epoch of 128 subset images with the real
/// `contrastive train`, exports it with `contrastive export` as `name` version 1 into `dirs`'s
/// repository (parity checked there), and returns the version folder.
pub fn publish_small_vit(dirs: &Dirs, name: &str) -> PathBuf {
    let run = dirs.root.path().join(format!("run-{name}"));
    let subset = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fashion-mnist-subset");
    let cli = |args: &[&str], paths: &[(&str, &Path)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_contrastive"));
        command.args(args);
        for (flag, path) in paths {
            command.arg(flag).arg(path);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "contrastive {args:?}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let mut train = vec!["train", "--encoder", "vit:dim=32:depth=2:heads=2:mlp_ratio=2", "--train-limit", "128"];
    train.extend(["--batch-size", "32", "--epochs", "1", "--knn-every", "0", "--no-final-eval", "--no-progress"]);
    cli(&train, &[("--data", &subset), ("--out", &run)]);
    cli(&["export", "--name", name], &[("--checkpoint", &run), ("--models", &dirs.models)]);
    dirs.models.join(name).join("1")
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

pub struct Server {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// `127.0.0.1:PORT` of the OpenAI-compatible HTTP endpoint, when started with `--http-addr`.
    pub http: Option<String>,
    /// The server's model repository.
    pub models: PathBuf,
    process: ServerProcess,
    /// Folders this server owns (none when a test passed its own).
    own_dirs: Option<Dirs>,
    scratch: PathBuf,
}

impl Server {
    /// A server of a copy of the shipped model, with `args` added to the command line.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(Dirs::with_models(), args)
    }

    /// A server of an empty model repository.
    pub fn start_empty(args: &[&str]) -> Self {
        Self::start_with(Dirs::empty(), args)
    }

    fn start_with(dirs: Dirs, args: &[&str]) -> Self {
        let mut server = Self::start_on(&dirs, args);
        server.own_dirs = Some(dirs);
        server
    }

    /// A server on folders the test keeps (to restart a server on them).
    pub fn start_on(dirs: &Dirs, args: &[&str]) -> Self {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = dirs.root.path().join(format!("server-{}.log", STARTS.fetch_add(1, Ordering::Relaxed)));
        let mut command = ServerCommand::new(env!("CARGO_BIN_EXE_contrastive"), log)
            .args(["--poll-interval-ms", "200", "--models"])
            .arg(&dirs.models)
            .arg("--data-dir")
            .arg(&dirs.data)
            .args(args.iter().copied());
        if !args.contains(&"--metrics-addr") {
            command = command.args(["--metrics-addr", "off"]);
        }
        let process = ServerProcess::spawn(&command).unwrap_or_else(|e| panic!("{e:#}"));
        Self {
            url: process.url(),
            addr: process.addr().to_string(),
            http: process.http_addr().map(|addr| addr.to_string()),
            models: dirs.models.clone(),
            process,
            own_dirs: None,
            scratch: dirs.root.path().to_path_buf(),
        }
    }

    /// Waits (up to 30 s) until grpc.health.v1 reports SERVING for the whole server.
    pub async fn wait_serving(&self) {
        if let Err(error) = self.process.wait_serving(Duration::from_secs(30)).await {
            panic!("{error:#}\nlog:\n{}", self.log());
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A folder that lives as long as the server's folders.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// The process's exit status if it ends within `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill(&self) {
        self.process.kill();
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking() {
            eprintln!("--- log of the server at {} ---\n{}", self.addr, self.log());
        }
    }
}

/// One HTTP/1.1 exchange on a fresh connection (blocking): the status code and the body as
/// JSON (`Null` when the body is not JSON).
pub fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8(answer).expect("a UTF-8 answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {answer:?}"));
    let status =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line of {head:?}"));
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

/// The largest |a − b| over two tables of rows of the same shape.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row widths differ");
            x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max)
        })
        .fold(0.0, f32::max)
}

/// A loopback port nothing listens on now (for a listener a test starts next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The Prometheus text a server exposes at `addr` (retried for up to 5 s while it starts).
pub fn http_get_metrics(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(mut stream) => {
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
                let mut text = String::new();
                stream.read_to_string(&mut text).unwrap();
                return text;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("cannot connect to the metrics listener at {addr}: {e}"),
        }
    }
}
