//! Starting the configured readers' drivers: one task (or, for blocking PC/SC calls, one
//! named OS thread inside the driver) per reader, all reporting into one bounded channel.

use crate::config::{DriverSettings, ReaderSettings};
use id06_readers::{simulated, CancellationToken, ReaderMessage, ReaderSink};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Starts reader number `index`. The task ends when the driver finishes, the channel
/// closes or `shutdown` is cancelled.
pub fn spawn_reader(
    index: usize,
    reader: &ReaderSettings,
    tx: mpsc::Sender<ReaderMessage>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let sink = ReaderSink::new(index, tx);
    let name = reader.name.clone();
    let driver = reader.driver.clone();
    tokio::spawn(async move {
        let result = match driver {
            DriverSettings::Simulated { script, poll, .. } => {
                simulated::run(&name, script, poll, sink, shutdown).await
            }
            DriverSettings::Pcsc { pattern } => {
                let options = id06_readers::pcsc::PcscOptions::new(pattern);
                id06_readers::pcsc::run(&name, options, sink, shutdown).await
            }
            DriverSettings::Pn532 { path, baud, poll } => {
                let options = id06_readers::pn532::Pn532Options::new(path, baud, poll);
                id06_readers::pn532::run(&name, options, sink, shutdown).await
            }
            DriverSettings::Line { path, baud } => {
                let options = id06_readers::line::LineOptions { path, baud };
                id06_readers::line::run(&name, options, sink, shutdown).await
            }
        };
        if result.is_err() {
            tracing::debug!(reader = %name, "reader stopped: the daemon is shutting down");
        }
    })
}
