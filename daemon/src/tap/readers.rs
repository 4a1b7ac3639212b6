//! Starting the configured readers' drivers: one task (or, for blocking PC/SC calls, one
//! named OS thread inside the driver) per reader, one thread per OSDP line (the readers
//! that share a `path`), all reporting into one bounded channel.

use crate::config::{DriverSettings, FeedbackMode, ReaderSettings};
use id06_readers::feedback::{self, SignalSender};
use id06_readers::osdp::{self, Bus, BusReader};
use id06_readers::{simulated, CancellationToken, ReaderMessage, ReaderSink};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How the gate answers the worker at one reader.
#[derive(Debug, Clone)]
pub struct ReaderFeedback {
    /// The reader's name (as in its events).
    pub reader: String,
    /// Where its signals go.
    pub sender: SignalSender,
    /// The output pulsed on a granted tap, and for how long (ms).
    pub door: Option<(u8, u32)>,
}

/// The OSDP lines of the configuration, ready to start.
pub struct OsdpLines {
    lines: Vec<(Bus, feedback::Signals)>,
    /// The readers that take feedback.
    pub feedback: Vec<ReaderFeedback>,
}

/// Groups the OSDP readers by line and reads their keys. Readers on one line must agree
/// on its speed.
pub fn osdp_lines(
    readers: &[ReaderSettings],
    tx: &mpsc::Sender<ReaderMessage>,
) -> Result<OsdpLines, String> {
    // Each line, with each reader's feedback mode and door.
    type Door = Option<(u8, u32)>;
    let mut grouped: Vec<(Bus, Vec<(FeedbackMode, Door)>)> = Vec::new();
    for (index, r) in readers.iter().enumerate() {
        let DriverSettings::Osdp {
            path,
            baud,
            address,
            scbk_file,
            reversed,
            feedback,
            door,
        } = &r.driver
        else {
            continue;
        };
        let scbk = match scbk_file {
            Some(f) => Some((osdp::read_scbk(f)?, f.clone())),
            None => None,
        };
        let reader = BusReader {
            name: r.name.clone(),
            address: *address,
            scbk,
            reversed: *reversed,
            sink: ReaderSink::new(index, tx.clone()),
        };
        match grouped.iter_mut().find(|(b, _)| &b.path == path) {
            Some((bus, modes)) => {
                if bus.baud != *baud {
                    return Err(format!(
                        "the OSDP readers on {} must share one baud rate ({} and {})",
                        path.display(),
                        bus.baud,
                        baud
                    ));
                }
                if let Some(other) = bus.readers.iter().find(|o| o.address == *address) {
                    return Err(format!(
                        "readers {:?} and {:?} share OSDP address {address} on {}",
                        other.name,
                        r.name,
                        path.display()
                    ));
                }
                bus.readers.push(reader);
                modes.push((*feedback, *door));
            }
            None => grouped.push((
                Bus {
                    path: path.clone(),
                    baud: *baud,
                    readers: vec![reader],
                },
                vec![(*feedback, *door)],
            )),
        }
    }
    let mut lines = Vec::new();
    let mut feedback = Vec::new();
    for (bus, modes) in grouped {
        let (senders, rx) = feedback::signals(bus.readers.len());
        for ((r, sender), (mode, door)) in bus.readers.iter().zip(senders).zip(modes) {
            if mode == FeedbackMode::Auto || door.is_some() {
                feedback.push(ReaderFeedback {
                    reader: r.name.clone(),
                    sender,
                    door,
                });
            }
        }
        lines.push((bus, rx));
    }
    Ok(OsdpLines { lines, feedback })
}

impl OsdpLines {
    /// Starts one thread per line; each ends when `shutdown` is cancelled.
    pub fn spawn(self, shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
        self.lines
            .into_iter()
            .map(|(bus, rx)| {
                let stop = shutdown.clone();
                tokio::task::spawn_blocking(move || osdp::run(bus, rx, stop))
            })
            .collect()
    }
}

/// The PC/SC readers that take feedback: their senders, and per reader index what its
/// driver needs.
pub fn pcsc_feedback(
    readers: &[ReaderSettings],
) -> (
    Vec<ReaderFeedback>,
    Vec<Option<id06_readers::pcsc::PcscFeedback>>,
) {
    let mut senders = Vec::new();
    let drivers = readers
        .iter()
        .map(|r| match &r.driver {
            DriverSettings::Pcsc { feedback, .. } if *feedback != FeedbackMode::None => {
                let (mut tx, rx) = feedback::signals(1);
                if let Some(sender) = tx.pop() {
                    senders.push(ReaderFeedback {
                        reader: r.name.clone(),
                        sender,
                        door: None,
                    });
                }
                Some(id06_readers::pcsc::PcscFeedback {
                    signals: std::sync::Arc::new(std::sync::Mutex::new(rx)),
                    force: *feedback == FeedbackMode::Acr122,
                })
            }
            _ => None,
        })
        .collect();
    (senders, drivers)
}

/// Starts reader number `index`. The task ends when the driver finishes, the channel
/// closes or `shutdown` is cancelled.
pub fn spawn_reader(
    index: usize,
    reader: &ReaderSettings,
    tx: mpsc::Sender<ReaderMessage>,
    shutdown: CancellationToken,
    feedback: Option<id06_readers::pcsc::PcscFeedback>,
) -> JoinHandle<()> {
    let sink = ReaderSink::new(index, tx);
    let name = reader.name.clone();
    let driver = reader.driver.clone();
    tokio::spawn(async move {
        let result = match driver {
            DriverSettings::Simulated { script, poll, .. } => {
                simulated::run(&name, script, poll, sink, shutdown).await
            }
            DriverSettings::Pcsc { pattern, .. } => {
                let options = id06_readers::pcsc::PcscOptions::new(pattern);
                id06_readers::pcsc::run_with_feedback(&name, options, sink, shutdown, feedback)
                    .await
            }
            DriverSettings::Pn532 { path, baud, poll } => {
                let options = id06_readers::pn532::Pn532Options::new(path, baud, poll);
                id06_readers::pn532::run(&name, options, sink, shutdown).await
            }
            DriverSettings::Line { path, baud } => {
                let options = id06_readers::line::LineOptions { path, baud };
                id06_readers::line::run(&name, options, sink, shutdown).await
            }
            // Started per line by `OsdpLines::spawn`.
            DriverSettings::Osdp { .. } => Ok(()),
        };
        if result.is_err() {
            tracing::debug!(reader = %name, "reader stopped: the daemon is shutting down");
        }
    })
}
