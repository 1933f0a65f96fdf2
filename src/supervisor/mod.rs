//! The JVM process: spawn in its own process group, output into a bounded ring buffer and the log,
//! readiness, stop escalation (RCON -> stdin -> SIGTERM -> SIGKILL), and exit classification.

mod backoff;
mod classify;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{broadcast, watch};

pub use backoff::{Backoff, RestartPolicy, Verdict};
pub use classify::{ExitInfo, ExitReason, classify};

use crate::rcon::Rcon;

/// The server's recent output, bounded, with a live feed for followers.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    inner: Arc<Mutex<VecDeque<String>>>,
    capacity: usize,
    live: broadcast::Sender<String>,
}

impl LogBuffer {
    /// A buffer keeping the last `capacity` lines.
    pub fn new(capacity: usize) -> Self {
        let (live, _) = broadcast::channel(1024);
        Self { inner: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))), capacity, live }
    }

    /// Appends a line, dropping the oldest beyond capacity.
    pub fn push(&self, line: String) {
        if let Ok(mut lines) = self.inner.lock() {
            if lines.len() == self.capacity {
                lines.pop_front();
            }
            lines.push_back(line.clone());
        }
        // No follower is not an error.
        let _ = self.live.send(line);
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.inner
            .lock()
            .map(|lines| lines.iter().skip(lines.len().saturating_sub(n)).cloned().collect())
            .unwrap_or_default()
    }

    /// The last `n` lines and a receiver for every line after them, taken atomically so none is
    /// lost or repeated in between.
    pub fn tail_and_follow(&self, n: usize) -> (Vec<String>, broadcast::Receiver<String>) {
        match self.inner.lock() {
            Ok(lines) => {
                let rx = self.live.subscribe();
                (lines.iter().skip(lines.len().saturating_sub(n)).cloned().collect(), rx)
            }
            Err(_) => (Vec::new(), self.live.subscribe()),
        }
    }
}

/// Timeouts of each stop step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopTimeouts {
    /// After RCON `stop`.
    pub rcon: Duration,
    /// After `stop` on stdin.
    pub stdin: Duration,
    /// After SIGTERM, before SIGKILL.
    pub term: Duration,
}

impl Default for StopTimeouts {
    fn default() -> Self {
        Self { rcon: Duration::from_secs(60), stdin: Duration::from_secs(15), term: Duration::from_secs(15) }
    }
}

/// A supervisor failure.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The JVM could not be started.
    #[error("starting the server ({program}) failed: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for the process failed.
    #[error("waiting for the server process failed: {0}")]
    Wait(#[source] std::io::Error),
}

impl SupervisorError {
    /// A short static category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Spawn { .. } => "spawn",
            Self::Wait(_) => "wait",
        }
    }
}

/// A running server JVM.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: Option<u32>,
    started: Instant,
    ready: watch::Receiver<bool>,
    logs: LogBuffer,
    killed_by_us: bool,
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The OS's view.
    pub info: ExitInfo,
    /// The classification.
    pub reason: ExitReason,
    /// How long it ran.
    pub ran_for: Duration,
}

const READY_MARKER: &str = "Done (";

impl ServerProcess {
    /// Starts `command` (program first) in `cwd`, in its own process group so a signal to the runner's
    /// terminal does not reach it and stop escalation owns its fate.
    pub fn spawn(command: &[OsString], cwd: &Path, logs: LogBuffer) -> Result<Self, SupervisorError> {
        let (program, args) = command.split_first().ok_or_else(|| SupervisorError::Spawn {
            program: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        })?;
        let mut child = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SupervisorError::Spawn { program: program.to_string_lossy().into_owned(), source })?;
        let (ready_tx, ready) = watch::channel(false);
        let ready_tx = Arc::new(ready_tx);
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(BufReader::new(out), logs.clone(), Some(ready_tx.clone()))));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(BufReader::new(err), logs.clone(), None)));
        }
        let pid = child.id();
        tracing::info!(pid, "server process started");
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            pid,
            started: Instant::now(),
            ready,
            logs,
            killed_by_us: false,
            pumps,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// When it started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Becomes true once the server printed `Done (`.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Writes a console command to stdin.
    pub async fn write_stdin(&mut self, line: &str) -> std::io::Result<()> {
        match self.stdin.as_mut() {
            Some(stdin) => {
                stdin.write_all(line.as_bytes()).await?;
                stdin.write_all(b"\n").await?;
                stdin.flush().await
            }
            None => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin is closed")),
        }
    }

    /// Waits for the process to end and classifies the exit.
    pub async fn wait(&mut self) -> Result<Exit, SupervisorError> {
        let status = self.child.wait().await.map_err(SupervisorError::Wait)?;
        // The classification needs the last lines: let the pumps drain the pipes (they end at EOF,
        // or are given up on if a grandchild keeps the pipe open). Cancel-safe: a finished pump is
        // never polled again.
        for pump in &mut self.pumps {
            if !pump.is_finished() {
                let _ = tokio::time::timeout(Duration::from_secs(1), pump).await;
            }
        }
        let info = ExitInfo { code: status.code(), signal: status.signal() };
        let reason = classify(info, &self.logs.tail(200), self.killed_by_us);
        Ok(Exit { info, reason, ran_for: self.started.elapsed() })
    }

    /// Stops the server: RCON `stop`, then `stop` on stdin, then SIGTERM, then SIGKILL, each after
    /// its timeout. Returns how it ended.
    pub async fn stop(&mut self, rcon: Option<&Rcon>, timeouts: StopTimeouts) -> Result<Exit, SupervisorError> {
        if let Some(rcon) = rcon {
            match rcon.command("stop").await {
                Ok(_) => {
                    if let Some(exit) = self.wait_for(timeouts.rcon).await? {
                        return Ok(exit);
                    }
                    tracing::warn!(timeout = ?timeouts.rcon, "server ignored RCON stop; trying stdin");
                }
                Err(e) => tracing::warn!(error = %e, "RCON stop failed; trying stdin"),
            }
        }
        if self.write_stdin("stop").await.is_ok() {
            if let Some(exit) = self.wait_for(timeouts.stdin).await? {
                return Ok(exit);
            }
            tracing::warn!(timeout = ?timeouts.stdin, "server ignored stop on stdin; sending SIGTERM");
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if let Some(exit) = self.wait_for(timeouts.term).await? {
            return Ok(exit);
        }
        tracing::warn!(timeout = ?timeouts.term, "server ignored SIGTERM; sending SIGKILL");
        self.killed_by_us = true;
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait().await
    }

    async fn wait_for(&mut self, timeout: Duration) -> Result<Option<Exit>, SupervisorError> {
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(exit) => exit.map(Some),
            Err(_) => Ok(None),
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) else { return };
        // The JVM leads its own process group (spawned with process_group(0)); signal the group so
        // helpers it started go too.
        if let Err(e) = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal) {
            tracing::debug!(error = %e, ?signal, "signalling the server's process group failed");
        }
    }
}

async fn pump<R>(mut reader: R, logs: LogBuffer, ready: Option<Arc<watch::Sender<bool>>>)
where
    R: AsyncBufReadExt + Unpin,
{
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_owned();
                tracing::info!(target: "minecraft", "{line}");
                if let Some(ready) = &ready
                    && line.contains(READY_MARKER)
                {
                    ready.send_replace(true);
                }
                logs.push(line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_buffer_keeps_the_newest_lines() {
        let logs = LogBuffer::new(3);
        for i in 0..5 {
            logs.push(format!("line {i}"));
        }
        assert_eq!(logs.tail(10), ["line 2", "line 3", "line 4"]);
        assert_eq!(logs.tail(1), ["line 4"]);
        let (tail, mut rx) = logs.tail_and_follow(2);
        assert_eq!(tail, ["line 3", "line 4"]);
        logs.push("line 5".into());
        assert_eq!(rx.try_recv().ok().as_deref(), Some("line 5"));
    }
}
