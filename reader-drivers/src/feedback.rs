//! Feedback at the reader: what the gate tells the worker once a tap is recorded (light,
//! sound, display, door), from the daemon's pipeline to whichever driver can show it
//! (OSDP readers, ACR122U-style PC/SC readers). The queue never blocks the pipeline: a
//! signal that finds it full is dropped.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

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

/// Sends [`Signal`]s to one reader (of an OSDP line, or a PC/SC reader). Cheap to clone;
/// never blocks.
#[derive(Debug, Clone)]
pub struct SignalSender {
    tx: SyncSender<(usize, Signal)>,
    slot: usize,
}

impl SignalSender {
    /// Queues `signal` for the reader; false when the line's queue is full or its thread
    /// has stopped (the signal is dropped: feedback never holds a tap up).
    pub fn send(&self, signal: Signal) -> bool {
        match self.tx.try_send((self.slot, signal)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// A signal queue shared by `readers` readers (one OSDP line, or one PC/SC reader): one
/// [`SignalSender`] per reader, and the receiving end for the driver, which gets each
/// signal with the reader's position.
pub fn signals(readers: usize) -> (Vec<SignalSender>, Receiver<(usize, Signal)>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    let senders = (0..readers)
        .map(|slot| SignalSender {
            tx: tx.clone(),
            slot,
        })
        .collect();
    (senders, rx)
}
