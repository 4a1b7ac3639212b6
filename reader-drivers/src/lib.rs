//! # id06-readers
//!
//! The reader side of id06d. Every driver turns one physical (or simulated) reader into a
//! stream of [`ReaderMessage`]s: raw observations — a card read completely, a card in the
//! field that could not be read, no card, a reader fault — and changes of the reader's
//! health. Drivers do not debounce: turning observations into taps is the daemon's
//! debouncer's job, which is a pure state machine fed with these messages.
//!
//! Binary protocols are implemented as sans-I/O codecs (bytes in, frames out) so that they
//! can be tested and fuzzed without a device; the drivers are thin loops around them.
//! OSDP is the exception: its protocol (and secure channel) is libosdp's, and `osdp` is the
//! loop around it. The other way, [`feedback`] carries what the gate tells the worker
//! (light, sound, display, door) to the drivers that can show it.
//!
//! ```
//! use id06_readers::simulated::Script;
//!
//! let script = Script::parse("at 0 present 04A1B2C3D4E5F6\nat 700 absent\nat 900 end\n").unwrap();
//! assert_eq!(script.end_ms(), Some(900));
//! ```
#![deny(missing_docs)]

pub mod feedback;
pub mod line;
pub mod osdp;
pub mod pcsc;
pub mod pn532;
pub mod simulated;
#[cfg(any(test, feature = "test-support"))]
pub mod vpcd_card;

use id06_protocol::{CardUid, ReaderState};
use std::time::Instant;
use tokio::sync::mpsc;
pub use tokio_util::sync::CancellationToken;

/// What one look at the reader found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A card's UID was read completely.
    Card(CardUid),
    /// A card is in the field but could not be read (moved away mid-read, waved, collision).
    Partial,
    /// No card in the field.
    NoCard,
    /// The reader did not answer properly; the text says how.
    Fault(String),
}

/// What a driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// An observation, to be debounced.
    Observed(Observation),
    /// The reader's health changed.
    Health {
        /// The new state.
        state: ReaderState,
        /// Why, when it is not `ok`.
        error: Option<String>,
    },
    /// What the driver learned about the device (firmware version, PC/SC reader name).
    Device(String),
    /// The reader is done and will report nothing more (a simulated timeline's `end`).
    Finished,
}

/// A report from one reader, stamped with the monotonic time it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderMessage {
    /// The reader's index in the configuration.
    pub reader: usize,
    /// When the observation was made.
    pub at: Instant,
    /// What happened.
    pub report: Report,
}

/// The receiving side went away: the daemon is shutting down, the driver should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the daemon stopped listening to this reader")]
pub struct SinkClosed;

/// Where a driver sends its reports: a bounded channel shared by all readers, tagged with
/// this reader's index. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReaderSink {
    reader: usize,
    tx: mpsc::Sender<ReaderMessage>,
}

impl ReaderSink {
    /// A sink for reader number `reader`.
    pub fn new(reader: usize, tx: mpsc::Sender<ReaderMessage>) -> ReaderSink {
        ReaderSink { reader, tx }
    }

    /// The reader's index.
    pub fn reader(&self) -> usize {
        self.reader
    }

    fn message(&self, at: Instant, report: Report) -> ReaderMessage {
        ReaderMessage {
            reader: self.reader,
            at,
            report,
        }
    }

    /// Sends a report stamped now (from async code).
    pub async fn send(&self, report: Report) -> Result<(), SinkClosed> {
        self.send_at(Instant::now(), report).await
    }

    /// Sends a report stamped with the time it was observed (from async code).
    pub async fn send_at(&self, at: Instant, report: Report) -> Result<(), SinkClosed> {
        self.tx
            .send(self.message(at, report))
            .await
            .map_err(|_| SinkClosed)
    }

    /// Sends a report stamped now, from a blocking OS thread (never call from async code).
    pub fn blocking_send(&self, report: Report) -> Result<(), SinkClosed> {
        self.tx
            .blocking_send(self.message(Instant::now(), report))
            .map_err(|_| SinkClosed)
    }

    /// Shorthand for an observation.
    pub async fn observe(&self, observation: Observation) -> Result<(), SinkClosed> {
        self.send(Report::Observed(observation)).await
    }

    /// Shorthand for a health change.
    pub async fn health(
        &self,
        state: ReaderState,
        error: Option<String>,
    ) -> Result<(), SinkClosed> {
        self.send(Report::Health { state, error }).await
    }
}
