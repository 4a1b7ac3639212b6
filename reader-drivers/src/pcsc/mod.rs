//! PC/SC readers through pcscd: `kind = "pcsc"`.
//!
//! Design: pcsc-lite's calls block, so each reader gets a named OS thread (`pcsc-{name}`,
//! the *worker*) that owns one PC/SC context and reports through
//! [`ReaderSink::blocking_send`]. The async [`run`] task around it is the *supervisor*: it
//! cancels the context on shutdown and watches the deadline of every call the worker makes.
//!
//! - The worker finds the first reader whose name contains the configured pattern and waits
//!   for card events with `SCardGetStatusChange` in slices of at most
//!   [`PcscOptions::wait_slice`]. After every return it lists the readers again (pcsc-lite
//!   1.9.9's PnP notification only fires when the reader count changes within one call).
//! - On insertion it connects and reads the UID with GET DATA (`FF CA 00 00 00`, retried
//!   with the length a `6C XX` asks for): a complete read is [`Observation::Card`], a failed
//!   read (`6A 81`, `63 00`, other status words, transmit errors, a card that left during
//!   the read) is [`Observation::Partial`], an empty field is [`Observation::NoCard`].
//! - pcsc is event-driven, but the daemon's debouncer ends a presentation after `gone_ms`
//!   without a read. So while a card stays in the field the worker reads it again every
//!   [`PcscOptions::presence_interval`] (200 ms): each read says "still there" and checks
//!   that reader and card still answer.
//! - Recovery: pcscd gone or restarted (`NoService`, `CommError`, `InvalidHandle`, …) →
//!   `recovering`, the context is released and a new one established with back-off, then
//!   `ok`. A card that stays present but keeps failing reads → `recovering`, reconnect with
//!   a reset (or a power cycle), then `ok`. A call that overruns its deadline (a reader that
//!   stopped answering mid-transmit) is reported by the supervisor as `recovering` at once;
//!   when the call finally returns, the worker starts over with a new context. A call that
//!   never returns cannot be interrupted in-process (pcscd holds the reader's lock), so the
//!   driver keeps saying `recovering` instead of starting threads that would hang the same
//!   way.
//! - Every call into the `pcsc` crate is guarded: its `Error::from_raw` panics in debug
//!   builds on an error code it does not know; that becomes [`PcscError::UnknownCode`] and
//!   is recovered like a lost service.

mod apdu;
mod worker;

#[cfg(test)]
mod tests;

pub use apdu::{get_data, interpret, GetData};

use crate::{CancellationToken, Observation, ReaderSink, Report, SinkClosed};
use id06_protocol::ReaderState;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How a PC/SC reader is found and watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcscOptions {
    /// Substring of the PC/SC reader name (`match` in the configuration).
    pub pattern: String,
    /// How often a card that stays in the field is read again, so that the debouncer knows
    /// it is still there (must be well below the debouncer's `gone_ms`).
    pub presence_interval: Duration,
    /// The longest single wait inside pcscd; the reader list is checked at least this often.
    pub wait_slice: Duration,
    /// How long a call into pcscd may take beyond its own timeout before the reader counts
    /// as not answering.
    pub call_deadline: Duration,
    /// First pause before a new context after pcscd went away; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest pause between attempts to reach pcscd.
    pub backoff_max: Duration,
    /// Failed reads of a card that stays in the field before it is reset.
    pub reset_after: u32,
    /// After pcscd came back, how long the reader may take to reappear before it counts as
    /// absent rather than recovering.
    pub reappear_grace: Duration,
}

impl PcscOptions {
    /// Defaults for a reader whose PC/SC name contains `pattern`.
    pub fn new(pattern: impl Into<String>) -> PcscOptions {
        PcscOptions {
            pattern: pattern.into(),
            presence_interval: Duration::from_millis(200),
            wait_slice: Duration::from_millis(500),
            call_deadline: Duration::from_secs(3),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            reset_after: 3,
            reappear_grace: Duration::from_secs(5),
        }
    }
}

/// A PC/SC call that failed, classified by what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PcscError {
    /// pcscd is not running, or the connection to it is gone: establish a new context.
    #[error("pcscd is not running or cannot be reached ({what}: {source}); start it with `systemctl start pcscd` or run `pcscd`")]
    NoService {
        /// The call.
        what: &'static str,
        /// What pcsc-lite said.
        source: pcsc::Error,
    },
    /// The call failed for another reason (no card, card removed, reader gone, …).
    #[error("{what}: {source}")]
    Failed {
        /// The call.
        what: &'static str,
        /// What pcsc-lite said.
        source: pcsc::Error,
    },
    /// pcsc-lite returned an error code the `pcsc` crate does not know.
    #[error("{what}: pcsc-lite returned an unknown result ({detail})")]
    UnknownCode {
        /// The call.
        what: &'static str,
        /// What the crate said about it.
        detail: String,
    },
    /// The call took longer than its deadline (the reader or pcscd stopped answering).
    #[error("{what}: no answer within {after:?}")]
    NoAnswer {
        /// The call.
        what: &'static str,
        /// Its deadline.
        after: Duration,
    },
}

impl PcscError {
    fn from_call(what: &'static str, source: pcsc::Error) -> PcscError {
        use pcsc::Error as E;
        match source {
            E::NoService | E::ServiceStopped | E::CommError | E::InvalidHandle | E::Shutdown => {
                PcscError::NoService { what, source }
            }
            _ => PcscError::Failed { what, source },
        }
    }

    /// Whether the context is unusable: release it and establish a new one.
    pub fn needs_new_context(&self) -> bool {
        !matches!(self, PcscError::Failed { .. })
    }

    /// pcsc-lite's error, when it gave one.
    pub fn code(&self) -> Option<pcsc::Error> {
        match self {
            PcscError::NoService { source, .. } | PcscError::Failed { source, .. } => Some(*source),
            _ => None,
        }
    }
}

/// Runs one call into the `pcsc` crate, turning a panic inside it (an unknown error code in
/// a debug build, an unexpected protocol value) into [`PcscError::UnknownCode`].
pub(crate) fn guarded<T>(
    what: &'static str,
    call: impl FnOnce() -> Result<T, pcsc::Error>,
) -> Result<T, PcscError> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(PcscError::from_call(what, e)),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "no detail".into());
            Err(PcscError::UnknownCode { what, detail })
        }
    }
}

/// The names of the PC/SC readers pcscd knows, for `id06d readers`. Fails with
/// [`PcscError::NoService`] (its message says to start pcscd) when pcscd is not running,
/// and with [`PcscError::NoAnswer`] when it does not answer within 5 s.
pub fn list_readers() -> Result<Vec<String>, PcscError> {
    const DEADLINE: Duration = Duration::from_secs(5);
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("pcsc-list".into())
        .spawn(move || {
            let result = guarded("connecting to pcscd", || {
                pcsc::Context::establish(pcsc::Scope::User)
            })
            .and_then(|ctx| guarded("listing the PC/SC readers", || ctx.list_readers_owned()))
            .map(|names| {
                names
                    .iter()
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            });
            let _ = tx.send(result);
        });
    if spawned.is_err() {
        return Err(PcscError::UnknownCode {
            what: "listing the PC/SC readers",
            detail: "cannot start a thread".into(),
        });
    }
    rx.recv_timeout(DEADLINE)
        .unwrap_or(Err(PcscError::NoAnswer {
            what: "listing the PC/SC readers",
            after: DEADLINE,
        }))
}

/// State shared by the supervisor and the worker thread.
struct Shared {
    stop: AtomicBool,
    /// Wakes the worker from a back-off pause on shutdown.
    stop_signal: (Mutex<bool>, Condvar),
    /// The worker's current context, so that the supervisor can cancel a wait in it.
    context: Mutex<Option<pcsc::Context>>,
    epoch: Instant,
    /// When the call in progress must have returned, in ms since `epoch`; 0 when idle.
    busy_until: AtomicU64,
    /// What the call in progress is, and its deadline, for the error text.
    busy_what: Mutex<(&'static str, Duration)>,
    /// Set by the supervisor when a call overran its deadline.
    overran: AtomicBool,
    /// The health last reported (by either side), so that only changes are sent.
    health: tokio::sync::Mutex<Option<ReaderState>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            stop_signal: (Mutex::new(false), Condvar::new()),
            context: Mutex::new(None),
            epoch: Instant::now(),
            busy_until: AtomicU64::new(0),
            busy_what: Mutex::new(("", Duration::ZERO)),
            overran: AtomicBool::new(false),
            health: tokio::sync::Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let (lock, cv) = &self.stop_signal;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        let context = self
            .context
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(context) = context {
            let _ = guarded("cancelling the wait", || context.cancel());
        }
    }

    /// Sleeps `d` unless a stop is requested first; whether to go on.
    fn pause(&self, d: Duration) -> bool {
        let (lock, cv) = &self.stop_signal;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = cv
            .wait_timeout_while(guard, d, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        !*stopped
    }
}

/// Watches the PC/SC reader whose name contains `options.pattern` and reports into `sink`
/// until `shutdown` is cancelled or the sink closes. Never returns an error for anything
/// pcscd or the reader does: those become health reports and recovery.
pub async fn run(
    name: &str,
    options: PcscOptions,
    sink: ReaderSink,
    shutdown: CancellationToken,
) -> Result<(), SinkClosed> {
    run_with_feedback(name, options, sink, shutdown, None).await
}

/// Feedback at a PC/SC reader of the ACR122U family: its LED and buzzer pseudo-APDU
/// (`FF 00 40 …`) sent over the card's connection once a tap is recorded.
#[derive(Debug, Clone)]
pub struct PcscFeedback {
    /// The signals for this reader.
    pub signals: Arc<Mutex<crate::feedback::Signals>>,
    /// Send them whatever the reader's name (`feedback = "acr122"`); otherwise only to a
    /// reader whose PC/SC name contains "ACR122".
    pub force: bool,
}

/// [`run`], with feedback at the reader.
pub async fn run_with_feedback(
    name: &str,
    options: PcscOptions,
    sink: ReaderSink,
    shutdown: CancellationToken,
    feedback: Option<PcscFeedback>,
) -> Result<(), SinkClosed> {
    let shared = Arc::new(Shared::new());
    if let Some(f) = &feedback {
        // A signal cancels the worker's wait on pcscd, so that the feedback goes to the
        // reader now, not at the end of the wait (up to `wait_slice`). A signal that comes
        // between two waits is sent at the next one.
        let shared = shared.clone();
        f.signals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_waker(move || {
                let context = shared.context.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = context.as_ref() {
                    let _ = c.cancel();
                }
            });
    }
    let mut restart_pause = Duration::from_secs(1);
    loop {
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        let worker = worker::Worker::new(options.clone(), sink.clone(), shared.clone())
            .with_feedback(feedback.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("pcsc-{name}"))
            .spawn(move || {
                let _ = done_tx.send(worker.run());
            });
        if let Err(e) = spawned {
            report_health(
                &shared,
                &sink,
                ReaderState::Failed,
                format!("cannot start the PC/SC thread: {e}"),
            )
            .await?;
            shutdown.cancelled().await;
            return Ok(());
        }
        let mut watchdog = tokio::time::interval(Duration::from_millis(100));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    shared.request_stop();
                    // A worker stuck in a call that never returns is left behind; the
                    // process is stopping anyway.
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut done_rx).await;
                    return Ok(());
                }
                ended = &mut done_rx => break ended,
                _ = watchdog.tick() => check_deadline(&shared, &sink).await?,
            }
        };
        match ended {
            Ok(result) => return result,
            Err(_) => {
                // The worker panicked (a bug): say so and start a fresh one.
                tracing::error!(reader = %name, "the PC/SC thread stopped unexpectedly; restarting it");
                report_health(
                    &shared,
                    &sink,
                    ReaderState::Recovering,
                    "the PC/SC thread stopped unexpectedly; restarting it".into(),
                )
                .await?;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(restart_pause) => {}
                }
                restart_pause = (restart_pause * 2).min(Duration::from_secs(30));
                *shared.context.lock().unwrap_or_else(|e| e.into_inner()) = None;
                shared.busy_until.store(0, Ordering::SeqCst);
            }
        }
    }
}

/// The supervisor's watchdog: a call past its deadline makes the reader `recovering` now,
/// not when (if ever) the call returns.
async fn check_deadline(shared: &Shared, sink: &ReaderSink) -> Result<(), SinkClosed> {
    let until = shared.busy_until.load(Ordering::SeqCst);
    if until == 0 || shared.now_ms() <= until || shared.overran.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let (what, deadline) = *shared.busy_what.lock().unwrap_or_else(|e| e.into_inner());
    let error = PcscError::NoAnswer {
        what,
        after: deadline,
    }
    .to_string();
    tracing::warn!(error = %error, "PC/SC reader does not answer");
    report_health(shared, sink, ReaderState::Recovering, error.clone()).await?;
    sink.observe(Observation::Fault(error)).await
}

async fn report_health(
    shared: &Shared,
    sink: &ReaderSink,
    state: ReaderState,
    error: String,
) -> Result<(), SinkClosed> {
    let mut health = shared.health.lock().await;
    if *health == Some(state) {
        return Ok(());
    }
    *health = Some(state);
    sink.send(Report::Health {
        state,
        error: Some(error),
    })
    .await
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn a_panic_inside_the_pcsc_crate_becomes_an_error() {
        let r: Result<(), PcscError> = guarded("probing", || -> Result<(), pcsc::Error> {
            panic!("unknown PCSC error code: 0x1234")
        });
        match r {
            Err(e @ PcscError::UnknownCode { .. }) => {
                assert!(e.to_string().contains("0x1234"), "{e}");
                assert!(e.needs_new_context());
            }
            other => panic!("expected UnknownCode, got {other:?}"),
        }
    }

    #[test]
    fn lost_service_needs_a_new_context_other_failures_do_not() {
        for code in [
            pcsc::Error::NoService,
            pcsc::Error::CommError,
            pcsc::Error::InvalidHandle,
            pcsc::Error::ServiceStopped,
        ] {
            let e = guarded("x", || -> Result<(), _> { Err(code) }).unwrap_err();
            assert!(e.needs_new_context(), "{code:?}");
            assert_eq!(e.code(), Some(code));
        }
        for code in [
            pcsc::Error::RemovedCard,
            pcsc::Error::NoSmartcard,
            pcsc::Error::UnknownReader,
            pcsc::Error::Timeout,
        ] {
            let e = guarded("x", || -> Result<(), _> { Err(code) }).unwrap_err();
            assert!(!e.needs_new_context(), "{code:?}");
        }
    }

    #[test]
    fn no_service_says_to_start_pcscd() {
        let e = PcscError::from_call("connecting to pcscd", pcsc::Error::NoService);
        assert!(e.to_string().contains("pcscd is not running"), "{e}");
    }
}
