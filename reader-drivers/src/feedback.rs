//! Feedback at the reader: what the gate tells the worker once a tap is recorded (light,
//! sound, display, door), from the daemon's pipeline to whichever driver can show it
//! (OSDP readers, ACR122U-style PC/SC readers). The queue never blocks the pipeline: a
//! signal that finds it full is dropped.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What the gate tells the worker at a reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Recorded and may pass: green, one short beep, the text, and the output (the door)
    /// for `open_ms` when one is configured.
    Granted {
        /// The display's text.
        text: String,
        /// The output to pulse, and for how long.
        door: Option<(u8, u32)>,
    },
    /// Recorded and may not pass: red, three beeps, the text (the reason).
    Denied {
        /// The display's text.
        text: String,
    },
    /// The card is being waved or reads keep failing (`hold_steady`): amber blinking
    /// while `on`, back to the reader's own light when it clears.
    HoldSteady {
        /// Whether the hint is set.
        on: bool,
    },
}

/// What a driver runs to be woken when a signal is queued (it may be waiting on something
/// else: a serial line, PC/SC).
type Waker = Box<dyn Fn() + Send + Sync>;

/// Sends [`Signal`]s to one reader (of an OSDP line, or a PC/SC reader). Cheap to clone;
/// never blocks.
#[derive(Clone)]
pub struct SignalSender {
    tx: SyncSender<(usize, Signal)>,
    slot: usize,
    wake: Arc<OnceLock<Waker>>,
}

impl std::fmt::Debug for SignalSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalSender")
            .field("slot", &self.slot)
            .finish()
    }
}

impl SignalSender {
    /// Queues `signal` for the reader and wakes its driver; false when the line's queue is
    /// full or its thread has stopped (the signal is dropped: feedback never holds a tap
    /// up).
    pub fn send(&self, signal: Signal) -> bool {
        match self.tx.try_send((self.slot, signal)) {
            Ok(()) => {
                if let Some(wake) = self.wake.get() {
                    wake();
                }
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// The driver's end of a signal queue.
pub struct Signals {
    rx: Receiver<(usize, Signal)>,
    wake: Arc<OnceLock<Waker>>,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals").finish_non_exhaustive()
    }
}

impl Signals {
    /// The next signal queued, if any.
    pub fn try_recv(&self) -> Option<(usize, Signal)> {
        self.rx.try_recv().ok()
    }

    /// The next signal, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<(usize, Signal)> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Runs `wake` after each signal queued from now on (once; a second call is ignored).
    pub fn set_waker(&self, wake: impl Fn() + Send + Sync + 'static) {
        let _ = self.wake.set(Box::new(wake));
    }
}

/// A signal queue shared by `readers` readers (one OSDP line, or one PC/SC reader): one
/// [`SignalSender`] per reader, and the receiving end for the driver, which gets each
/// signal with the reader's position.
pub fn signals(readers: usize) -> (Vec<SignalSender>, Signals) {
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    let wake: Arc<OnceLock<Waker>> = Arc::default();
    let senders = (0..readers)
        .map(|slot| SignalSender {
            tx: tx.clone(),
            slot,
            wake: wake.clone(),
        })
        .collect();
    (senders, Signals { rx, wake })
}
