//! A `contrastive serve` child process on loopback, as the serving benchmark and the end-to-end
//! tests start it: port 0, the address read from the first stdout line
//! (`{"listening": "127.0.0.1:PORT"}`), stderr into a log file whose tail explains failures,
//! killed when dropped.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// How a server is started.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// The `contrastive` executable.
    pub binary: PathBuf,
    /// Arguments after `serve --addr 127.0.0.1:0`.
    pub args: Vec<OsString>,
    /// The server's stderr goes here.
    pub log: PathBuf,
    /// `RUST_LOG` for the server.
    pub log_level: String,
    /// The longest the server may take to print its address.
    pub start_timeout: Duration,
}

impl ServerCommand {
    pub fn new(binary: impl Into<PathBuf>, log: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            args: Vec::new(),
            log: log.into(),
            log_level: "info".into(),
            start_timeout: Duration::from_secs(60),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

pub struct ServerProcess {
    child: Mutex<Child>,
    pid: u32,
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts the server and waits for its address. The server's stdout is drained by a thread
    /// after the first line, so it never writes into a full or closed pipe.
    pub fn spawn(command: &ServerCommand) -> Result<Self> {
        ensure!(
            command.binary.is_file(),
            "the server binary {} does not exist (build it with `cargo build --release`)",
            command.binary.display()
        );
        let log = std::fs::File::create(&command.log)
            .with_context(|| format!("cannot create the server log {}", command.log.display()))?;
        let mut child = Command::new(&command.binary);
        // The command line says everything: no CONTRASTIVE_* setting leaks in from the caller.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CONTRASTIVE_") {
                child.env_remove(name);
            }
        }
        let mut child = child
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(&command.args)
            .env("RUST_LOG", &command.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start the server {}", command.binary.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (line_tx, line_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = line_tx.send(lines.next());
            lines.for_each(drop);
        });
        let pid = child.id();
        let mut server = Self {
            child: Mutex::new(child),
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: None,
            log: command.log.clone(),
        };
        let line = match line_rx.recv_timeout(command.start_timeout) {
            Ok(Some(Ok(line))) => line,
            _ => {
                let status = server.try_wait();
                let exited = status.map(|s| format!(" (it exited: {s})")).unwrap_or_default();
                bail!(
                    "the server {} printed no address within {:?}{exited}{}",
                    command.binary.display(),
                    command.start_timeout,
                    server.log_tail_note()
                )
            }
        };
        (server.addr, server.http_addr) = parse_listening(&line)
            .with_context(|| format!("the server's first line {line:?} is not {{\"listening\":\"ADDR\"}}"))?;
        Ok(server)
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI-compatible HTTP endpoint's address, when the server was started with one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn try_wait(&self) -> Option<ExitStatus> {
        self.child.lock().expect("child lock").try_wait().expect("poll the server process")
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill(&self) {
        let mut child = self.child.lock().expect("child lock");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits until grpc.health.v1 reports SERVING for the whole server.
    pub async fn wait_serving(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                bail!("the server exited ({status}) before serving{}", self.log_tail_note());
            }
            let answer = crate::client::health(&self.url(), "").await;
            if matches!(&answer, Ok(status) if status == "SERVING") {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the server on {} was not SERVING after {timeout:?} (last answer {answer:?}){}",
                    self.addr,
                    self.log_tail_note()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process's exit status if it ends within `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last 8,000 bytes of the server's log: the tail is what explains a failure.
    pub fn log(&self) -> String {
        read_log_tail(&self.log, 8000)
    }

    fn log_tail_note(&self) -> String {
        let text = read_log_tail(&self.log, 2000);
        let lines: Vec<&str> = text.lines().collect();
        match lines.len() {
            0 => String::new(),
            n => format!("; its log ends:\n{}", lines[n.saturating_sub(10)..].join("\n")),
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The addresses in the server's `{"listening":"127.0.0.1:PORT"}` line: gRPC, and HTTP when the
/// line has `"http"`.
pub fn parse_listening(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let grpc = value.get("listening")?.as_str()?.parse().ok()?;
    let http = match value.get("http") {
        None => None,
        Some(http) => Some(http.as_str()?.parse().ok()?),
    };
    Some((grpc, http))
}

/// The last `bytes` bytes of a file (from a character boundary), or "" when it cannot be read.
fn read_log_tail(path: &Path, bytes: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let start = text.len().saturating_sub(bytes);
    let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_listening_line() {
        let grpc: SocketAddr = "127.0.0.1:5051".parse().unwrap();
        assert_eq!(parse_listening(r#"{"listening":"127.0.0.1:5051"}"#), Some((grpc, None)));
        assert_eq!(
            parse_listening(r#"{"listening":"127.0.0.1:5051","http":"127.0.0.1:8080"}"#),
            Some((grpc, Some("127.0.0.1:8080".parse().unwrap())))
        );
        assert_eq!(parse_listening(r#"{"listening":"127.0.0.1:5051","http":"x"}"#), None);
        assert_eq!(parse_listening(r#"{"listening":"nowhere"}"#), None);
        assert_eq!(parse_listening("serving"), None);
    }
}
