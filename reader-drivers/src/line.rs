//! Line readers: serial readers that print each card's UID as a line of hex
//! (`kind = "line"`).
//!
//! A line ends with CR, LF or CRLF; its text is normalised like every UID (contract §5:
//! `04A1B2C3D4E5F6`, `04:a1:b2:c3:d4:e5:f6` and `04 A1 B2 …` are the same card). A line
//! that is not a UID is garbage: counted, logged at warn level, never a tap. Blank lines
//! are ignored.
//!
//! Such a reader only speaks when it reads a card; it never says that a card has gone. So
//! every line is reported as one complete read ([`Observation::Card`]) and nothing else:
//! the daemon's debouncer ends the presentation once no read of that card has come for
//! `gone_ms`. One line is therefore one tap; a reader that repeats the UID while the card
//! lies on it (some do, every few hundred milliseconds) keeps one presentation alive, and
//! the same card printed again after `gone_ms` but within `repeat_ms` is a duplicate.
//!
//! ```
//! use id06_readers::line::{LineDecoder, LineEvent};
//! use id06_protocol::CardUid;
//!
//! let mut lines = LineDecoder::new();
//! let events = lines.push(b"04:a1:b2:c3:d4:e5:f6\r\nhello\n04A1");
//! assert_eq!(events[0], LineEvent::Card(CardUid::parse("04A1B2C3D4E5F6").unwrap()));
//! assert!(matches!(events[1], LineEvent::Garbage { .. }));
//! assert_eq!(events.len(), 2); // "04A1" waits for its line end
//! assert_eq!(lines.garbage_lines(), 1);
//! ```

// Design: `LineDecoder` is a pure splitter and parser (bytes in, cards and garbage out)
// that keeps at most `MAX_LINE` bytes of an unfinished line; `run` is the thin loop that
// opens the port (with a growing back-off while it cannot), feeds the decoder what it
// reads, and reopens the port when a read fails (the device went away).

use crate::pn532::port::{self, Backoff};
use crate::{CancellationToken, Observation, ReaderSink, Report, SinkClosed};
use id06_protocol::{CardUid, ReaderState};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The longest line taken for a UID; longer ones are garbage (a 10-byte UID with
/// separators is 29 characters).
pub const MAX_LINE: usize = 64;

/// How to reach one line reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineOptions {
    /// Serial device.
    pub path: PathBuf,
    /// Baud rate.
    pub baud: u32,
}

/// What one complete line was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A card's UID.
    Card(CardUid),
    /// Not a UID.
    Garbage {
        /// The line (lossily decoded, cut to `MAX_LINE` bytes), for the log.
        text: String,
        /// Why it is not a UID.
        reason: String,
    },
}

/// Splits a byte stream into lines and parses each as a UID.
#[derive(Debug, Clone, Default)]
pub struct LineDecoder {
    current: Vec<u8>,
    overlong: bool,
    cards: u64,
    garbage: u64,
}

impl LineDecoder {
    /// A decoder at the start of a line.
    pub fn new() -> LineDecoder {
        LineDecoder::default()
    }

    /// Takes bytes as they arrive; returns what the lines they complete were.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<LineEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            if b == b'\r' || b == b'\n' {
                if let Some(event) = self.end_line() {
                    events.push(event);
                }
            } else if self.current.len() < MAX_LINE {
                self.current.push(b);
            } else {
                self.overlong = true;
            }
        }
        events
    }

    fn end_line(&mut self) -> Option<LineEvent> {
        let line = std::mem::take(&mut self.current);
        let overlong = std::mem::replace(&mut self.overlong, false);
        let text = String::from_utf8_lossy(&line).into_owned();
        let event = if overlong {
            LineEvent::Garbage {
                text,
                reason: format!("longer than {MAX_LINE} bytes"),
            }
        } else {
            match std::str::from_utf8(&line) {
                Err(_) => LineEvent::Garbage {
                    text,
                    reason: "not text".into(),
                },
                Ok(s) if s.trim().is_empty() => return None,
                Ok(s) => match CardUid::parse(s) {
                    Ok(uid) => LineEvent::Card(uid),
                    Err(e) => LineEvent::Garbage {
                        text,
                        reason: e.to_string(),
                    },
                },
            }
        };
        match event {
            LineEvent::Card(_) => self.cards += 1,
            LineEvent::Garbage { .. } => self.garbage += 1,
        }
        Some(event)
    }

    /// Lines that were UIDs, so far.
    pub fn card_lines(&self) -> u64 {
        self.cards
    }

    /// Lines that were garbage, so far.
    pub fn garbage_lines(&self) -> u64 {
        self.garbage
    }
}

/// Reads the line reader at `options.path` until `shutdown`: a `Card` observation per UID
/// line, health `ok` while the port is open and `absent` while it cannot be opened (it is
/// reopened with a growing back-off). Returns `Err(SinkClosed)` only when the daemon
/// stopped listening.
pub async fn run(
    name: &str,
    options: LineOptions,
    sink: ReaderSink,
    shutdown: CancellationToken,
) -> Result<(), SinkClosed> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut reported: Option<ReaderState> = None;
    let mut announced = false;
    // Counted over the reader's life, across reopenings.
    let mut garbage: u64 = 0;
    let mut buf = vec![0u8; 256];
    loop {
        let error = match port::open(&options.path, options.baud) {
            Ok(mut stream) => {
                backoff.reset();
                if !announced {
                    announced = true;
                    sink.send(Report::Device(format!(
                        "serial line reader on {} at {} baud",
                        options.path.display(),
                        options.baud
                    )))
                    .await?;
                }
                tracing::info!(reader = %name, path = %options.path.display(), "line reader open");
                reported = Some(ReaderState::Ok);
                sink.health(ReaderState::Ok, None).await?;
                let mut lines = LineDecoder::new();
                loop {
                    let n = tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        r = stream.read(&mut buf) => r,
                    };
                    let n = match n {
                        Ok(0) => break "the serial device closed".to_string(),
                        Ok(n) => n,
                        Err(e) => break format!("reading the serial device failed: {e}"),
                    };
                    for event in lines.push(&buf[..n]) {
                        match event {
                            LineEvent::Card(uid) => {
                                tracing::debug!(reader = %name, card = %uid, "line read");
                                sink.observe(Observation::Card(uid)).await?;
                            }
                            LineEvent::Garbage { text, reason } => {
                                garbage += 1;
                                tracing::warn!(reader = %name, line = ?text, reason = %reason, garbage_lines = garbage, "line reader sent a line that is not a card UID; ignored");
                            }
                        }
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        if reported != Some(ReaderState::Absent) {
            tracing::warn!(reader = %name, error = %error, "line reader not reachable; retrying");
            reported = Some(ReaderState::Absent);
            sink.health(ReaderState::Absent, Some(error)).await?;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff.next_wait()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> CardUid {
        CardUid::parse(s).unwrap()
    }

    use crate::ReaderMessage;
    use tokio::io::AsyncWriteExt;
    use tokio_serial::{SerialPort, SerialStream};

    const WAIT: Duration = Duration::from_secs(20);

    /// The next report from the driver, with a deadline.
    async fn next(rx: &mut tokio::sync::mpsc::Receiver<ReaderMessage>) -> Report {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("a report in time")
            .expect("the driver is running")
            .report
    }

    async fn next_observation(rx: &mut tokio::sync::mpsc::Receiver<ReaderMessage>) -> Observation {
        loop {
            if let Report::Observed(o) = next(rx).await {
                return o;
            }
        }
    }

    #[tokio::test]
    async fn over_a_pty_good_lines_are_cards_garbage_is_not_and_a_lost_port_is_reopened() {
        let dir = std::env::temp_dir().join(format!("id06-line-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("ttyLINE");
        let (mut master, slave) = SerialStream::pair().unwrap();
        std::os::unix::fs::symlink(slave.name().unwrap(), &link).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            "side-door",
            LineOptions {
                path: link.clone(),
                baud: 9600,
            },
            ReaderSink::new(2, tx),
            shutdown.clone(),
        ));
        assert!(matches!(next(&mut rx).await, Report::Device(d) if d.contains("9600 baud")));
        assert_eq!(
            next(&mut rx).await,
            Report::Health {
                state: ReaderState::Ok,
                error: None
            }
        );
        // LF, CR, CRLF, separators and lower case; garbage between them; one line split
        // across two writes.
        master
            .write_all(
                b"04A1B2C3D4E5F6\nnot a card\r04:a1:b2:c3:d4:e5:f7\r\n\x00\x17garbage\n04 a1 b2",
            )
            .await
            .unwrap();
        master.flush().await.unwrap();
        master
            .write_all(b" c3 d4 e5 f8\r\nDEADBEEF\r\n")
            .await
            .unwrap();
        master.flush().await.unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(next_observation(&mut rx).await);
        }
        assert_eq!(
            got,
            vec![
                Observation::Card(uid("04A1B2C3D4E5F6")),
                Observation::Card(uid("04A1B2C3D4E5F7")),
                Observation::Card(uid("04A1B2C3D4E5F8")),
                Observation::Card(uid("DEADBEEF")),
            ],
            "the garbage lines between them are no cards"
        );

        // The adapter goes away: absent; it comes back: ok again and reading.
        drop(master);
        drop(slave);
        std::fs::remove_file(&link).unwrap();
        loop {
            match next(&mut rx).await {
                Report::Health {
                    state: ReaderState::Absent,
                    ..
                } => break,
                Report::Observed(o) => panic!("no observation while unplugged: {o:?}"),
                _ => {}
            }
        }
        let (mut master, slave) = SerialStream::pair().unwrap();
        std::os::unix::fs::symlink(slave.name().unwrap(), &link).unwrap();
        loop {
            if let Report::Health { state, .. } = next(&mut rx).await {
                assert_eq!(state, ReaderState::Ok);
                break;
            }
        }
        master.write_all(b"08A1B2C3\n").await.unwrap();
        master.flush().await.unwrap();
        assert_eq!(
            next_observation(&mut rx).await,
            Observation::Card(uid("08A1B2C3"))
        );

        shutdown.cancel();
        let result = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        assert_eq!(result, Ok(()));
        drop(slave);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cr_lf_and_crlf_end_lines_and_spellings_are_normalised() {
        let mut d = LineDecoder::new();
        let events = d.push(
            b"04A1B2C3D4E5F6\n04:a1:b2:c3:d4:e5:f7\r04 A1 B2 C3 D4 E5 F8\r\ndeadbeef\r\n\r\n",
        );
        assert_eq!(
            events,
            vec![
                LineEvent::Card(uid("04A1B2C3D4E5F6")),
                LineEvent::Card(uid("04A1B2C3D4E5F7")),
                LineEvent::Card(uid("04A1B2C3D4E5F8")),
                LineEvent::Card(uid("DEADBEEF")),
            ]
        );
        assert_eq!((d.card_lines(), d.garbage_lines()), (4, 0));
    }

    #[test]
    fn a_line_split_across_reads_is_one_card() {
        let mut d = LineDecoder::new();
        assert!(d.push(b"04A1B2").is_empty());
        assert!(d.push(b"C3D4E5F6\r").len() == 1);
        assert!(d.push(b"\n").is_empty());
    }

    #[test]
    fn garbage_is_counted_and_never_a_card() {
        let mut d = LineDecoder::new();
        let long = vec![b'A'; MAX_LINE * 3];
        let mut input = b"hello\n04A1B2C\n\xff\xfe04A1B2C3\n04A1B2C3D4\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nDEADBEEF\n");
        let events = d.push(&input);
        assert_eq!(events.len(), 6);
        assert!(events[..5]
            .iter()
            .all(|e| matches!(e, LineEvent::Garbage { .. })));
        assert_eq!(events[5], LineEvent::Card(uid("DEADBEEF")));
        assert_eq!((d.card_lines(), d.garbage_lines()), (1, 5));
        match &events[4] {
            LineEvent::Garbage { reason, text } => {
                assert!(reason.contains("longer"), "{reason}");
                assert_eq!(text.len(), MAX_LINE);
            }
            other => panic!("{other:?}"),
        }
    }
}
