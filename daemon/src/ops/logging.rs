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

use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines waiting for stderr at most (a line is 100-300 bytes: at most a few MB). A burst of
/// 5 000 taps logs 5 000 lines in a few hundred ms, which stderr takes as they come.
pub const QUEUED_LINES: usize = 16_384;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because stderr did not take them (0 when the log is written
/// directly, as by the short commands).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the writer thread; dropping it writes out what is queued (when `run` or `demo`
/// returns).
pub struct LogGuard(#[allow(dead_code)] WorkerGuard);

/// Logs with `RUST_LOG`, or `default` when it is unset or invalid, through the writer
/// thread. `None` when a logger was already installed (a test's).
pub fn init_daemon_logging(default: &str) -> Option<LogGuard> {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let counter = writer.error_counter();
    if !install(default, writer) {
        return None;
    }
    let _ = DROPPED.set(counter);
    Some(LogGuard(guard))
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
    use super::newly_dropped;

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
