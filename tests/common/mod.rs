//! A `contrastive serve` process for end-to-end tests: the real binary on a loopback port (port 0,
//! so tests run in parallel), its own copy of the model repository and data folder, killed when
//! the guard drops. The server's log goes to a file that is printed when a test fails.

#![allow(dead_code)] // each test crate uses part of this

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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

pub struct Server {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// The server's model repository (a copy).
    pub models: PathBuf,
    child: Child,
    _stdout: BufReader<ChildStdout>,
    log: PathBuf,
    dir: TempDir,
}

impl Server {
    /// A server of a copy of the shipped model, with `args` added to the command line.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(true, args)
    }

    /// A server of an empty model repository.
    pub fn start_empty(args: &[&str]) -> Self {
        Self::start_with(false, args)
    }

    fn start_with(with_model: bool, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        if with_model {
            let target = models.join(MODEL).join("1");
            std::fs::create_dir_all(&target).unwrap();
            for entry in std::fs::read_dir(shipped_version_dir()).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
            }
        }
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_contrastive"));
        command.args(["serve", "--addr", "127.0.0.1:0", "--poll-interval-ms", "200"]);
        if !args.contains(&"--metrics-addr") {
            command.args(["--metrics-addr", "off"]);
        }
        command
            .arg("--models")
            .arg(&models)
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = command.spawn().expect("spawn contrastive serve");
        let (addr, stdout) = read_listening_addr(&mut child, &log, Duration::from_secs(30));
        Self { url: format!("http://{addr}"), addr, models, child, _stdout: stdout, log, dir }
    }

    /// Waits (up to 10 s) until grpc.health.v1 reports SERVING for the whole server.
    pub async fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = contrastive::client::health(&self.url, "").await;
            if matches!(&status, Ok(s) if s == "SERVING") {
                return;
            }
            assert!(Instant::now() < deadline, "not SERVING after 10 s (last answer {status:?}); log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A folder that lives as long as the server.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// The process's exit status if it ends within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server process") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

/// Reads the server's first stdout line, `{"listening": "127.0.0.1:PORT"}`, waiting at most
/// `timeout`; kills the child and panics with its log when none comes. Returns the address and
/// the stdout pipe (kept open so the server never writes to a closed pipe).
pub fn read_listening_addr(child: &mut Child, log: &Path, timeout: Duration) -> (String, BufReader<ChildStdout>) {
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    // Read off-thread to bound the wait.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(stdout.read_line(&mut line).map(|_| line));
        stdout
    });
    let line = match rx.recv_timeout(timeout) {
        Ok(Ok(line)) if !line.is_empty() => line,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server printed no address ({other:?}); its log:\n{}", read_log(log));
        }
    };
    let stdout = reader.join().unwrap();
    let value: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("first stdout line {line:?} is not JSON: {e}"));
    let addr = value["listening"].as_str().unwrap_or_else(|| panic!("no \"listening\" in {line:?}")).to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "listening on {addr}");
    (addr, stdout)
}

/// The last 8,000 bytes of a server log: the tail is what explains a failure.
pub fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let start = text.len().saturating_sub(8000);
    let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    text[start..].to_string()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of the server at {} ---\n{}", self.addr, self.log());
        }
    }
}
