//! The PN532 driver: a thin loop over a serial port around [`super::codec`].

// Design: the driver is a loop over three phases.
//
//   open ──► initialise ──► poll ──(no ACK / no response / garbage)──► initialise again
//     ▲          │  ▲                                                  (= recovery: wake-up,
//     │          │  └──────────── fails: Fault, Recovering, back-off ───┘ SAMConfiguration,
//     └── port failed (I/O error, EOF, device file gone): Absent, back-off ─┘ RF off/on)
//
// * open: the device is opened and its input flushed; while that fails the reader is
//   `absent` and the driver retries with a growing back-off (USB serial adapters
//   re-enumerate).
// * initialise: wake-up preamble, SAMConfiguration (normal mode), GetFirmwareVersion
//   (reported once per chip), RFConfiguration MaxRetries (finite, so InListPassiveTarget
//   returns when no card is there) and, when recovering, the RF field off and on. Success
//   is `ok`; failure is a `Fault` observation, `recovering`, and another attempt after a
//   back-off — on the same port, unless the port itself failed.
// * poll: InListPassiveTarget every `poll`; a card read completely is `Card` and is
//   released with InRelease; no target is `NoCard`; a target whose data is unusable, or a
//   corrupted answer or error frame while a card seemed present, is `Partial` (the card is
//   being waved); anything else (no ACK, no response, repeated garbage) is a lock-up.
//
// Every exchange (`Link::transact`) writes the command, waits for the ACK and then the
// response, each with a deadline, and sends one NACK when the response's checksum is bad.
// The port's input is flushed before each command so that a late answer to an abandoned
// command cannot be taken for the answer to the next one.

use super::codec::{
    self, Command, Decoded, Decoder, FirmwareVersion, Frame, ResponseError, TargetA, TFI_CHIP,
};
use super::port::{self, Backoff, PortError};
use crate::{CancellationToken, Observation, ReaderSink, Report, SinkClosed};
use id06_protocol::{CardUid, ReaderState};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_serial::{ClearBuffer, SerialPort, SerialStream};

/// How to reach and drive one PN532.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pn532Options {
    /// Serial device (`/dev/ttyUSB0`, or better a `/dev/serial/by-id/…` name).
    pub path: PathBuf,
    /// Baud rate; the PN532's HSU default is 115200.
    pub baud: u32,
    /// How often to look for a card.
    pub poll: Duration,
    /// How long to wait for a command's ACK. The PN532 acknowledges within milliseconds.
    pub ack_timeout: Duration,
    /// How long to wait for a command's response after its ACK.
    pub response_timeout: Duration,
}

impl Pn532Options {
    /// Options with the default deadlines (ACK 200 ms, response 1 s).
    pub fn new(path: impl Into<PathBuf>, baud: u32, poll: Duration) -> Pn532Options {
        Pn532Options {
            path: path.into(),
            baud,
            poll,
            ack_timeout: Duration::from_millis(200),
            response_timeout: Duration::from_millis(1000),
        }
    }
}

/// What went wrong in one exchange with the chip.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The chip did not acknowledge the command.
    #[error("no ACK to {command} within {timeout:?}")]
    NoAck {
        /// The command.
        command: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// The chip acknowledged but did not answer.
    #[error("no response to {command} within {timeout:?}")]
    NoResponse {
        /// The command.
        command: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// The response's checksum was wrong, and again after a NACK.
    #[error("the response to {0} was corrupted, also when sent again")]
    Garbled(&'static str),
    /// The chip answered with the application-level error frame.
    #[error("the PN532 answered {0} with an error frame")]
    ErrorFrame(&'static str),
    /// The response does not say what it must.
    #[error("bad response to {command}: {source}")]
    BadResponse {
        /// The command.
        command: &'static str,
        /// What is wrong with it.
        source: ResponseError,
    },
    /// The serial port failed (the device went away).
    #[error("the serial port failed: {0}")]
    Port(#[from] io::Error),
}

impl LinkError {
    /// Whether the port itself failed (reopen), rather than the chip (recover).
    fn port_failed(&self) -> bool {
        matches!(self, LinkError::Port(_))
    }

    /// Whether the chip answered, just not usefully (a waved card can cause this).
    fn garbled(&self) -> bool {
        matches!(
            self,
            LinkError::Garbled(_) | LinkError::ErrorFrame(_) | LinkError::BadResponse { .. }
        )
    }
}

/// The open port and the decoder over its input.
struct Link {
    port: SerialStream,
    decoder: Decoder,
    buf: Vec<u8>,
    ack_timeout: Duration,
    response_timeout: Duration,
}

impl Link {
    fn new(port: SerialStream, options: &Pn532Options) -> Link {
        Link {
            port,
            decoder: Decoder::new(),
            buf: vec![0; 512],
            ack_timeout: options.ack_timeout,
            response_timeout: options.response_timeout,
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.port.write_all(bytes).await?;
        self.port.flush().await
    }

    /// The next frame (or bad-checksum report) before `deadline`; `None` when it passed.
    async fn next_frame(&mut self, deadline: Instant) -> io::Result<Option<Decoded>> {
        loop {
            match self.decoder.decode() {
                Decoded::NeedMore => {}
                other => return Ok(Some(other)),
            }
            match tokio::time::timeout_at(deadline, self.port.read(&mut self.buf)).await {
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the serial device closed",
                    ))
                }
                Ok(Ok(n)) => self.decoder.feed(&self.buf[..n]),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    // Nothing more is coming: a start code that is still waiting for its
                    // frame was noise; look at the bytes behind it again.
                    while self.decoder.abandon_candidate() {
                        match self.decoder.decode() {
                            Decoded::NeedMore => {}
                            other => return Ok(Some(other)),
                        }
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Sends `command` and returns its response's parameters (after the response code).
    async fn transact(&mut self, command: &Command) -> Result<Vec<u8>, LinkError> {
        let name = command.name();
        let expected = command.code().wrapping_add(1);
        self.port
            .clear(ClearBuffer::Input)
            .map_err(|e| LinkError::Port(e.into()))?;
        self.decoder.clear();
        self.write(&command.encode()).await?;
        let mut acked = false;
        let mut nacked = false;
        let mut deadline = Instant::now() + self.ack_timeout;
        loop {
            let Some(decoded) = self.next_frame(deadline).await? else {
                return Err(if acked {
                    // Abort the command so that the chip is ready for the next one.
                    self.write(&codec::ACK).await?;
                    LinkError::NoResponse {
                        command: name,
                        timeout: self.response_timeout,
                    }
                } else {
                    LinkError::NoAck {
                        command: name,
                        timeout: self.ack_timeout,
                    }
                });
            };
            match decoded {
                Decoded::Frame(Frame::Ack) => {
                    if !acked {
                        acked = true;
                        deadline = Instant::now() + self.response_timeout;
                    }
                }
                Decoded::Frame(Frame::Error) => return Err(LinkError::ErrorFrame(name)),
                Decoded::Frame(Frame::Information { tfi, data })
                    if tfi == TFI_CHIP && data.first() == Some(&expected) =>
                {
                    return Ok(data[1..].to_vec());
                }
                // Not ours (an echo, a late answer) or a NACK, which the chip never sends;
                // `next_frame` never returns NeedMore.
                Decoded::Frame(_) | Decoded::NeedMore => {}
                Decoded::BadChecksum => {
                    // Our response, corrupted (even if its ACK was lost): ask once more.
                    if nacked {
                        return Err(LinkError::Garbled(name));
                    }
                    nacked = true;
                    acked = true;
                    self.write(&codec::NACK).await?;
                    deadline = Instant::now() + self.response_timeout;
                }
            }
        }
    }

    /// Wake-up, SAMConfiguration, firmware, finite retries and, when recovering, the RF
    /// field off and on.
    async fn initialise(&mut self, cycle_field: bool) -> Result<FirmwareVersion, LinkError> {
        self.write(&codec::WAKE_UP).await?;
        self.transact(&Command::SamConfiguration {
            mode: 0x01,
            timeout: 0x14,
            use_irq: true,
        })
        .await?;
        let params = self.transact(&Command::GetFirmwareVersion).await?;
        let firmware =
            FirmwareVersion::parse(&params).map_err(|source| LinkError::BadResponse {
                command: "GetFirmwareVersion",
                source,
            })?;
        // All finite: FF would make InListPassiveTarget wait until a card comes.
        self.transact(&Command::MaxRetries {
            atr: 0x01,
            psl: 0x01,
            passive_activation: 0x01,
        })
        .await?;
        if cycle_field {
            self.transact(&Command::RfField { on: false }).await?;
            self.transact(&Command::RfField { on: true }).await?;
        }
        Ok(firmware)
    }

    /// One look for a type A card; `Some(target)` when one must be released.
    async fn poll(&mut self) -> Result<(Observation, bool), LinkError> {
        let params = self
            .transact(&Command::InListPassiveTarget {
                max_targets: 1,
                baud: 0x00,
            })
            .await?;
        Ok(match TargetA::parse_list(&params) {
            Ok(targets) => match targets.first() {
                None => (Observation::NoCard, false),
                Some(t) => match CardUid::from_bytes(&t.nfcid) {
                    Ok(uid) => (Observation::Card(uid), true),
                    Err(_) => (Observation::Partial, true),
                },
            },
            // A target was announced but its data is cut short: it left mid-activation.
            Err(_) => (Observation::Partial, params.first().is_some_and(|n| *n > 0)),
        })
    }
}

/// How many corrupted answers in a row still count as a waved card rather than a lock-up.
const GARBLED_AS_PARTIAL: u32 = 3;

/// Why the poll phase ended.
enum Exit {
    /// Shutdown was requested.
    Stop,
    /// The port failed: close it and open it again.
    PortFailed(String),
}

struct Driver<'a> {
    name: &'a str,
    options: &'a Pn532Options,
    sink: &'a ReaderSink,
    shutdown: &'a CancellationToken,
    /// The last health sent, to send changes only.
    reported: Option<(ReaderState, Option<String>)>,
    /// The last device description sent.
    device: Option<String>,
    /// Whether the last observation found something in the field.
    card_present: bool,
    /// Corrupted answers in a row reported as partial reads.
    garbled_in_row: u32,
}

impl Driver<'_> {
    async fn health(
        &mut self,
        state: ReaderState,
        error: Option<String>,
    ) -> Result<(), SinkClosed> {
        let next = Some((state, error.clone()));
        if self.reported != next {
            self.reported = next;
            self.sink.health(state, error).await?;
        }
        Ok(())
    }

    async fn observe(&mut self, observation: Observation) -> Result<(), SinkClosed> {
        self.card_present = matches!(observation, Observation::Card(_) | Observation::Partial);
        if !matches!(observation, Observation::Partial) {
            self.garbled_in_row = 0;
        }
        self.sink.observe(observation).await
    }

    /// Runs `f` unless shutdown comes first.
    async fn or_stop<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            v = f => Some(v),
        }
    }

    /// Waits `d`; false when shutdown came first.
    async fn wait(&self, d: Duration) -> bool {
        self.or_stop(tokio::time::sleep(d)).await.is_some()
    }

    /// Initialises (or recovers) the chip on an open port, then polls it, until the port
    /// fails or shutdown.
    async fn serve(&mut self, link: &mut Link) -> Result<Exit, SinkClosed> {
        let mut recovering = false;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            // Initialise, or recover after a lock-up.
            loop {
                let Some(result) = self.or_stop(link.initialise(recovering)).await else {
                    return Ok(Exit::Stop);
                };
                match result {
                    Ok(firmware) => {
                        let device = firmware.to_string();
                        if self.device.as_deref() != Some(&device) {
                            tracing::info!(reader = %self.name, device = %device, path = %self.options.path.display(), "PN532 ready");
                            self.device = Some(device.clone());
                            self.sink.send(Report::Device(device)).await?;
                        }
                        if recovering {
                            tracing::info!(reader = %self.name, "PN532 answers again");
                        }
                        self.health(ReaderState::Ok, None).await?;
                        backoff.reset();
                        break;
                    }
                    Err(e) if e.port_failed() => return Ok(Exit::PortFailed(e.to_string())),
                    Err(e) => {
                        let text = e.to_string();
                        tracing::warn!(reader = %self.name, error = %text, "PN532 does not answer; recovering");
                        self.observe(Observation::Fault(text.clone())).await?;
                        self.health(ReaderState::Recovering, Some(text)).await?;
                        recovering = true;
                        if !self.options.path.exists() {
                            return Ok(Exit::PortFailed("the device file is gone".into()));
                        }
                        if !self.wait(backoff.next_wait()).await {
                            return Ok(Exit::Stop);
                        }
                    }
                }
            }
            // Poll until something goes wrong.
            let mut ticker = tokio::time::interval(self.options.poll.max(Duration::from_millis(1)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let failure = loop {
                if self.or_stop(ticker.tick()).await.is_none() {
                    return Ok(Exit::Stop);
                }
                let Some(result) = self.or_stop(link.poll()).await else {
                    return Ok(Exit::Stop);
                };
                match result {
                    Ok((observation, release)) => {
                        self.observe(observation).await?;
                        if release {
                            let Some(released) = self
                                .or_stop(link.transact(&Command::InRelease { target: 0 }))
                                .await
                            else {
                                return Ok(Exit::Stop);
                            };
                            match released {
                                Ok(params) => {
                                    if let Err(e) = codec::check_status(&params, "InRelease") {
                                        tracing::debug!(reader = %self.name, error = %e, "InRelease");
                                    }
                                }
                                Err(e) if e.garbled() => {
                                    tracing::debug!(reader = %self.name, error = %e, "InRelease");
                                }
                                Err(e) => break e,
                            }
                        }
                    }
                    Err(e)
                        if e.garbled()
                            && self.card_present
                            && self.garbled_in_row < GARBLED_AS_PARTIAL =>
                    {
                        tracing::debug!(reader = %self.name, error = %e, "partial read");
                        self.garbled_in_row += 1;
                        self.observe(Observation::Partial).await?;
                    }
                    Err(e) => break e,
                }
            };
            let text = failure.to_string();
            self.observe(Observation::Fault(text.clone())).await?;
            if failure.port_failed() {
                return Ok(Exit::PortFailed(text));
            }
            tracing::warn!(reader = %self.name, error = %text, "PN532 stopped answering; recovering");
            self.health(ReaderState::Recovering, Some(text)).await?;
            recovering = true;
        }
    }
}

/// Drives the PN532 at `options.path` until `shutdown`, reporting into `sink`: `Card`
/// for every poll that reads a card, `NoCard` when none is there, `Partial` for a card
/// that cannot be read, `Fault` when the chip does not answer; health `ok`,
/// `recovering` (lock-up, being recovered) and `absent` (device missing, being reopened).
/// Returns `Err(SinkClosed)` only when the daemon stopped listening.
pub async fn run(
    name: &str,
    options: Pn532Options,
    sink: ReaderSink,
    shutdown: CancellationToken,
) -> Result<(), SinkClosed> {
    let mut driver = Driver {
        name,
        options: &options,
        sink: &sink,
        shutdown: &shutdown,
        reported: None,
        device: None,
        card_present: false,
        garbled_in_row: 0,
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    while !shutdown.is_cancelled() {
        let error = match port::open(&options.path, options.baud) {
            Ok(stream) => {
                backoff.reset();
                let mut link = Link::new(stream, &options);
                match driver.serve(&mut link).await? {
                    Exit::Stop => return Ok(()),
                    Exit::PortFailed(text) => {
                        drop(link);
                        tracing::warn!(reader = %name, error = %text, "PN532 port failed; reopening");
                        if options.path.exists() {
                            driver.health(ReaderState::Recovering, Some(text)).await?;
                            if !driver.wait(backoff.next_wait()).await {
                                return Ok(());
                            }
                            continue;
                        }
                        PortError::Missing {
                            path: options.path.clone(),
                        }
                        .to_string()
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        if driver.reported.as_ref().map(|r| r.0) != Some(ReaderState::Absent) {
            tracing::warn!(reader = %name, error = %error, "PN532 not reachable");
        }
        driver.health(ReaderState::Absent, Some(error)).await?;
        if !driver.wait(backoff.next_wait()).await {
            return Ok(());
        }
    }
    Ok(())
}
