//! The daemon's log output: lines go to stderr (journald under systemd) from a thread of
//! their own, never from the thread that records a tap.
//!
//! Why: a write to stderr blocks once the reader of the other end stops taking lines (a
//! journald that hangs or restarts; a pipe nobody drains). Written from where they are
//! logged, the tap pipeline's "tap" line would stop the pipeline there: measured, a daemon
//! whose stderr pipe was not read recorded 470 of 1 500 taps and then nothing. Here the
//! lines wait in a bounded queue ([`QUEUED_LINES`]); when it is full, new lines are dropped,
//! counted ([`dropped_lines`], `id06d_log_lines_dropped_total`) and said in one line once
//! stderr takes lines again. Taps, decisions and events never wait for the log.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

/// Lines waiting for stderr at most (a line is 100-300 bytes: at most a few MB). A burst of
/// 5 000 taps logs 5 000 lines in under a second, which a working stderr takes as they
/// come. The queue grows and shrinks with what waits in it: an idle gateway holds none of
/// it (tracing-appender's queue, allocated up front, cost 0.5 MB of idle RSS at this size).
pub const QUEUED_LINES: usize = 16_384;

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far because stderr did not take them (0 when the log is written
/// directly, as by the short commands).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Msg {
    Line(Vec<u8>),
    /// Write out what is queued before this, then say so and stop.
    Stop(Sender<()>),
}

/// Hands each formatted line to the writer thread, or drops and counts it when
/// [`QUEUED_LINES`] already wait.
struct Queue {
    tx: Sender<Msg>,
    queued: Arc<AtomicUsize>,
}

/// One log line being formatted; queued when the formatter is done with it.
struct Line<'q> {
    queue: &'q Queue,
    bytes: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.bytes.is_empty() {
            return;
        }
        let queued = &self.queue.queued;
        if queued.fetch_add(1, Ordering::AcqRel) >= QUEUED_LINES {
            queued.fetch_sub(1, Ordering::AcqRel);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let line = std::mem::take(&mut self.bytes);
        if self.queue.tx.send(Msg::Line(line)).is_err() {
            // The writer thread is gone (the daemon is stopping).
            queued.fetch_sub(1, Ordering::AcqRel);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'q> tracing_subscriber::fmt::MakeWriter<'q> for Queue {
    type Writer = Line<'q>;

    fn make_writer(&'q self) -> Line<'q> {
        Line {
            queue: self,
            bytes: Vec::new(),
        }
    }
}

/// Keeps the writer thread; dropping it writes out what is queued (when `run` or `demo`
/// returns), waiting at most a second for a stderr that does not take it.
pub struct LogGuard(Sender<Msg>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (done, written) = channel();
        if self.0.send(Msg::Stop(done)).is_ok() {
            let _ = written.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// Logs with `RUST_LOG`, or `default` when it is unset or invalid, through the writer
/// thread. `None` when a logger was already installed (a test's), or when the thread
/// cannot be started (then lines are written where they are logged).
pub fn init_daemon_logging(default: &str) -> Option<LogGuard> {
    let (tx, rx) = channel::<Msg>();
    let queued = Arc::new(AtomicUsize::new(0));
    let taken = queued.clone();
    let writer = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            let mut stderr = std::io::stderr();
            while let Ok(msg) = rx.recv() {
                match msg {
                    Msg::Line(line) => {
                        // A line stderr refuses is lost as it would be when written in place.
                        let _ = stderr.write_all(&line);
                        taken.fetch_sub(1, Ordering::AcqRel);
                    }
                    Msg::Stop(done) => {
                        let _ = stderr.flush();
                        let _ = done.send(());
                        return;
                    }
                }
            }
        });
    if writer.is_err() {
        install(default, std::io::stderr);
        return None;
    }
    let guard = LogGuard(tx.clone());
    install(default, Queue { tx, queued }).then_some(guard)
}

/// Installs the log format every command uses (no targets; colours on a terminal) with
/// `RUST_LOG`, or `default` when it is unset or invalid, writing to `writer`. False when a
/// logger was already installed.
pub(crate) fn install<W>(default: &str, writer: W) -> bool
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init()
        .is_ok()
}

/// Says, once stderr takes lines again, how many were dropped since the last time it was
/// said; `said` is what was said before. Called every few seconds by the daemon.
pub fn report_dropped(said: &mut u64) {
    if let Some(dropped) = newly_dropped(dropped_lines(), said) {
        tracing::warn!(
            dropped,
            total = *said,
            "log lines were dropped: stderr (journald) did not take them in time; taps were recorded meanwhile"
        );
        // The warning itself may have been dropped too: counted, not said again.
        *said = dropped_lines();
    }
}

/// How many lines were dropped since `said`, if any; `said` moves to `now`.
fn newly_dropped(now: u64, said: &mut u64) -> Option<u64> {
    let new = now.checked_sub(*said).filter(|n| *n > 0)?;
    *said = now;
    Some(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    #[test]
    fn lines_past_the_queue_are_dropped_and_counted_and_taken_ones_make_room() {
        let (tx, rx) = channel();
        let queue = Queue {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
        };
        let log = |text: &str| {
            let mut line = queue.make_writer();
            line.write_all(text.as_bytes()).unwrap();
        };
        let before = dropped_lines();
        for n in 0..QUEUED_LINES + 5 {
            log(&format!("line {n}\n"));
        }
        assert_eq!(dropped_lines() - before, 5);
        assert_eq!(queue.queued.load(Ordering::Acquire), QUEUED_LINES);
        // The writer takes one: room for one more, the rest still dropped.
        let Ok(Msg::Line(first)) = rx.recv() else {
            panic!("a line first")
        };
        assert_eq!(first, b"line 0\n");
        queue.queued.fetch_sub(1, Ordering::AcqRel);
        log("kept\n");
        log("dropped\n");
        assert_eq!(dropped_lines() - before, 6);
        let last = rx.try_iter().last();
        assert!(matches!(last, Some(Msg::Line(l)) if l == b"kept\n"));
    }

    #[test]
    fn dropped_lines_are_said_once_each() {
        let mut said = 0;
        assert_eq!(newly_dropped(0, &mut said), None);
        assert_eq!(newly_dropped(7, &mut said), Some(7));
        assert_eq!(said, 7);
        assert_eq!(
            newly_dropped(7, &mut said),
            None,
            "nothing new: nothing said"
        );
        assert_eq!(newly_dropped(9, &mut said), Some(2));
        assert_eq!(said, 9);
    }
}
