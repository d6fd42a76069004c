//! The function's stdout and stderr, relayed to the host a line at a time,
//! and the barrier that keeps them ahead of the results.
//!
//! Each stream is read by a thread of its own, while results arrive over
//! the Runtime API on another: without a barrier, a function that prints,
//! then answers, could have its answer on the channel before its last
//! lines, and the host (its log, Lambda's `LogType=Tail`, the `REPORT`
//! line printed after the answer) would see them out of order. A result
//! first [`settles`](LogRelays::settle) the relays: it waits until every
//! byte already in the pipes has been read and its complete lines sent.

use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sluice_protocol::LogStream;

/// The longest line relayed as one; a longer one is cut into pieces.
pub(crate) const MAX_LOG_LINE: usize = 16 * 1024;

/// How long a result waits at most for the relays: a function that keeps
/// writing from another thread never lets the pipes run dry.
const SETTLE_LIMIT: Duration = Duration::from_millis(50);

/// One relayed stream, as the barrier sees it.
struct Relay {
    /// A duplicate of the pipe's read end, polled (never read) by
    /// [`LogRelays::settle`].
    fd: OwnedFd,
    /// Held by the relay thread from the moment it reads until the lines
    /// read are sent; `true` once the stream ended.
    ended: Mutex<bool>,
    /// Signalled after each read.
    progress: Condvar,
}

/// The relays of one function's output streams.
#[derive(Clone, Default)]
pub(crate) struct LogRelays {
    relays: Arc<Mutex<Vec<Arc<Relay>>>>,
}

impl LogRelays {
    /// Relay `pipe` (one of the function's output streams) line by line to
    /// `send` on a thread of its own; `done` hears when the stream ended.
    pub(crate) fn relay<P>(
        &self,
        mut pipe: P,
        stream: LogStream,
        send: impl Fn(LogStream, Vec<u8>) + Send + 'static,
        done: mpsc::Sender<()>,
    ) -> std::io::Result<()>
    where
        P: Read + AsFd + Send + 'static,
    {
        let relay = Arc::new(Relay {
            fd: pipe.as_fd().try_clone_to_owned()?,
            ended: Mutex::new(false),
            progress: Condvar::new(),
        });
        self.relays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(relay.clone());
        thread::Builder::new()
            .name("agent-logs".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut pending = Vec::new();
                loop {
                    wait_readable(&relay.fd);
                    let mut ended = relay.ended.lock().unwrap_or_else(|p| p.into_inner());
                    let n = loop {
                        match pipe.read(&mut buf) {
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            other => break other.unwrap_or(0),
                        }
                    };
                    pending.extend_from_slice(&buf[..n]);
                    for line in take_lines(&mut pending, n == 0) {
                        send(stream, line);
                    }
                    *ended = n == 0;
                    relay.progress.notify_all();
                    if n == 0 {
                        break;
                    }
                }
                let _ = done.send(());
            })?;
        Ok(())
    }

    /// Wait (at most [`SETTLE_LIMIT`]) until what the function wrote so far
    /// has been relayed: every pipe empty, with no read in progress. A
    /// line not yet ended by a newline stays behind.
    pub(crate) fn settle(&self) {
        // Only `relay` takes this lock, before the function runs.
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + SETTLE_LIMIT;
        for relay in relays.iter() {
            let mut ended = relay.ended.lock().unwrap_or_else(|p| p.into_inner());
            while !*ended && has_data(&relay.fd) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                ended = relay
                    .progress
                    .wait_timeout(ended, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}

/// Block until `fd` has data or its writers are gone.
fn wait_readable(fd: &OwnedFd) {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    while let Err(nix::errno::Errno::EINTR) = poll(&mut fds, PollTimeout::NONE) {}
}

/// Whether the pipe holds unread bytes now (a pipe whose writers are gone
/// and that is empty does not).
fn has_data(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
}

/// The complete lines at the front of `pending` (without their `\n` or
/// `\r\n`), pieces of [`MAX_LOG_LINE`] bytes of a longer one, and at the
/// end of the stream (`ended`) whatever is left.
fn take_lines(pending: &mut Vec<u8>, ended: bool) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut start = 0;
    loop {
        let rest = &pending[start..];
        let window = &rest[..rest.len().min(MAX_LOG_LINE)];
        let (line, used) = match window.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], i + 1),
            None if window.len() == MAX_LOG_LINE => (window, MAX_LOG_LINE),
            None if ended && !rest.is_empty() => (rest, rest.len()),
            None => break,
        };
        let mut line = line;
        while let [head @ .., b'\r'] = line {
            line = head;
        }
        lines.push(line.to_vec());
        start += used;
    }
    pending.drain(..start);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_pieces_and_the_rest_at_the_end() {
        let mut p = b"one\r\ntwo\nthr".to_vec();
        assert_eq!(
            take_lines(&mut p, false),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        assert_eq!(p, b"thr");
        p.extend_from_slice(b"ee\n\nfour");
        assert_eq!(take_lines(&mut p, false), vec![b"three".to_vec(), vec![]]);
        assert_eq!(take_lines(&mut p, true), vec![b"four".to_vec()]);
        assert!(p.is_empty());
        assert!(take_lines(&mut p, true).is_empty());

        let mut long = vec![b'x'; MAX_LOG_LINE * 2 + 3];
        long.push(b'\n');
        let lines = take_lines(&mut long, false);
        let lens: Vec<usize> = lines.iter().map(Vec::len).collect();
        assert_eq!(lens, [MAX_LOG_LINE, MAX_LOG_LINE, 3]);
        assert!(long.is_empty());
    }

    /// What was written before `settle` has been sent when it returns,
    /// every time, however the threads are scheduled.
    #[test]
    fn settle_returns_after_the_lines_written_before_it() {
        let relays = LogRelays::default();
        let (rd, mut wr) = std::io::pipe().unwrap();
        let sent = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let (done_tx, done_rx) = mpsc::channel();
        let s = sent.clone();
        relays
            .relay(
                rd,
                LogStream::Stdout,
                move |_, line| s.lock().unwrap().push(line),
                done_tx,
            )
            .unwrap();
        for i in 0..200 {
            writeln!(wr, "line {i}").unwrap();
            relays.settle();
            let got = sent.lock().unwrap();
            assert_eq!(
                got.len(),
                i + 1,
                "line {i} not relayed before settle returned"
            );
            assert_eq!(got[i], format!("line {i}").into_bytes());
        }
        // A line without its newline waits for the end of the stream.
        write!(wr, "last").unwrap();
        relays.settle();
        assert_eq!(sent.lock().unwrap().len(), 200);
        drop(wr);
        done_rx.recv().unwrap();
        assert_eq!(sent.lock().unwrap().last().unwrap(), b"last");
        // An ended stream does not hold a result up.
        relays.settle();
    }
}
