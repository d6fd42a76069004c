//! A child process whose stderr lines can be awaited: for tests that run
//! `sluice` commands side by side and react to what they print.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitStatus, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

/// How long [`Process`] waits for a line or an exit before failing the test.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Lines written by someone else (a process's stderr, a function's log
/// sink), with a condition variable to wait on.
#[derive(Debug, Default)]
pub struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Lines {
    /// Adds a line and wakes the waiters.
    pub fn push(&self, line: String) {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
        self.changed.notify_all();
    }

    /// Every line so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `pred` holds for the lines so far, checking at each new
    /// line and at least every 50 ms (so `pred` may look at other state);
    /// `None` after `timeout`, else what `pred` returned.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        pred: impl Fn(&[String]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(v) = pred(&lines) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            lines = self
                .changed
                .wait_timeout(lines, left.min(Duration::from_millis(50)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A running process (killed when dropped).
pub struct Process {
    name: String,
    pid: Pid,
    exited: mpsc::Receiver<ExitStatus>,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Lines>,
    stderr_done: mpsc::Receiver<()>,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `command` with stdin closed and stdout and stderr piped;
    /// `name` labels it in failure messages.
    pub fn start(name: &str, mut command: Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stderr = Arc::new(Lines::default());
        let pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        let (done, stderr_done) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.push(line);
            }
            let _ = done.send(());
        });
        let mut pipe = child.stdout.take().expect("piped stdout");
        let (out_tx, stdout) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = String::new();
            let _ = pipe.read_to_string(&mut out);
            let _ = out_tx.send(out);
        });
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"));
        let (tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(status);
            }
        });
        Process {
            name: name.to_owned(),
            pid,
            exited,
            stdout,
            stderr,
            stderr_done,
            status: None,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// Its stderr, labelled, for failure messages.
    pub fn log(&self) -> String {
        format!(
            "--- stderr of {} ---\n{}",
            self.name,
            self.stderr().join("\n")
        )
    }

    /// Waits for a stderr line satisfying `pred` and returns it; panics
    /// (with the log) after [`DEADLINE`].
    pub fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.stderr
            .wait_for(DEADLINE, |lines| lines.iter().find(|l| pred(l)).cloned())
            .unwrap_or_else(|| {
                panic!(
                    "{}: timed out waiting for {what}\n{}",
                    self.name,
                    self.log()
                )
            })
    }

    /// The address of the `/metrics` endpoint the process announced
    /// (`metrics at http://ADDR/metrics`, from `--metrics-addr`).
    pub fn metrics_address(&self) -> String {
        let line = self.wait_line("the metrics address", |l| l.contains("metrics at http://"));
        line.split("http://")
            .nth(1)
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("{}: no address in {line:?}", self.name))
            .to_owned()
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid, signal).unwrap_or_else(|e| panic!("{signal} to {}: {e}", self.name));
    }

    /// Waits for the exit (panics after [`DEADLINE`]) and for the end of
    /// its output; returns the status and stdout.
    pub fn finish(&mut self) -> (ExitStatus, String) {
        let status = self.exited.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            panic!(
                "{} did not exit within {DEADLINE:?}\n{}",
                self.name,
                self.log()
            )
        });
        self.status = Some(status);
        let out = self
            .stdout
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_default();
        let _ = self.stderr_done.recv_timeout(Duration::from_secs(10));
        (status, out)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() && self.exited.try_recv().is_err() {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = self.exited.recv_timeout(Duration::from_secs(10));
        }
    }
}
