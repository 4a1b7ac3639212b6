//! A PN532 emulator for tests: the chip's side of the HSU protocol on the master end of a
//! pty, so that a driver (ours, or libnfc's as the reference host) talks to it through the
//! pty's slave device exactly as it would to a PN532 on a USB-serial adapter.
//!
//! It answers the commands a host uses to find ISO 14443 A cards (Diagnose,
//! GetFirmwareVersion, Read/WriteRegister, SetParameters, SAMConfiguration,
//! RFConfiguration, InListPassiveTarget, InRelease, InDeselect, …), holds a card in its
//! field as the test says, and misbehaves on request: it sleeps until woken (as a PN532 on
//! HSU does after power-on or a lock-up), stops answering, sends line noise before its
//! frames, splits frames into small writes, corrupts a checksum, or garbles the answers to
//! polls.
//!
//! Compiled for this crate's tests and with the `test-support` feature.

// Design: `Chip` is a pure state machine — host bytes in, the bytes to write back out — with
// the behaviour knobs in `Control`, which the test changes through [`Emulator`] while the
// emulator runs. `serve` is the thin loop between the pty master and `Chip`. The chip
// answers a command with an ACK and then the response, remembers the response for a NACK,
// and ignores everything while it sleeps until it sees the wake-up preamble (`55 55`).

use super::codec::{self, Decoded, Decoder, Frame, TFI_CHIP, TFI_HOST};
use id06_protocol::CardUid;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPort, SerialStream};

/// How the emulator answers one InListPassiveTarget (type A).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollAnswer {
    /// The card is read completely.
    Card(CardUid),
    /// No card.
    Empty,
    /// A card is listed but its data is cut short (it left the field mid-activation).
    Truncated(CardUid),
    /// The answer's data checksum is wrong, on the first transmission and on the resend.
    Garbled(CardUid),
    /// The application-level error frame instead of an answer.
    ErrorFrame,
}

/// What the emulator has seen, for assertions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmulatorStats {
    /// Command codes received and answered, in order.
    pub commands: Vec<u8>,
    /// NACKs received.
    pub nacks: u32,
    /// Wake-up preambles received.
    pub wake_ups: u32,
    /// RFConfiguration "RF field off" commands received.
    pub rf_off: u32,
}

impl EmulatorStats {
    /// How many times command `code` was answered.
    pub fn count(&self, code: u8) -> usize {
        self.commands.iter().filter(|c| **c == code).count()
    }
}

#[derive(Debug, Default)]
struct Control {
    /// The card lying in the field, answered when no scripted answer is queued.
    card: Option<CardUid>,
    /// Answers for the next polls, in order, before `card` applies again.
    polls: VecDeque<PollAnswer>,
    /// Locked up: reads and drops everything.
    silent: bool,
    /// Asleep: ignores frames until it sees the wake-up preamble.
    asleep: bool,
    /// Line noise before every frame written.
    noise: bool,
    /// Frames written a few bytes at a time.
    split: bool,
    /// Responses whose first transmission gets a wrong data checksum.
    corrupt_next: u32,
    stats: EmulatorStats,
}

/// The chip's protocol state.
#[derive(Debug, Default)]
struct Chip {
    decoder: Decoder,
    registers: HashMap<u16, u8>,
    /// The last response as it should be sent again on a NACK.
    last_response: Vec<u8>,
    /// The previous raw byte, to spot `55 55` across reads.
    last_byte: u8,
}

/// One write to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Ack,
    Frame(Vec<u8>),
}

impl Chip {
    /// Takes bytes from the host; returns what to write back.
    fn receive(&mut self, bytes: &[u8], control: &mut Control) -> Vec<Out> {
        let mut prev = self.last_byte;
        let mut woken_at = None;
        for (i, b) in bytes.iter().enumerate() {
            if prev == 0x55 && *b == 0x55 {
                control.stats.wake_ups += 1;
                woken_at = Some(i + 1);
            }
            prev = *b;
        }
        self.last_byte = prev;
        if control.silent {
            self.decoder.clear();
            return Vec::new();
        }
        if control.asleep {
            match woken_at {
                // Asleep: everything before the wake-up is lost.
                Some(at) => {
                    control.asleep = false;
                    self.decoder.clear();
                    self.decoder.feed(&bytes[at..]);
                }
                None => return Vec::new(),
            }
        } else {
            self.decoder.feed(bytes);
        }
        let mut out = Vec::new();
        loop {
            match self.decoder.decode() {
                Decoded::NeedMore => return out,
                // A real chip stays silent on a corrupted command: the host times out.
                Decoded::BadChecksum => {}
                Decoded::Frame(Frame::Nack) => {
                    control.stats.nacks += 1;
                    if !self.last_response.is_empty() {
                        out.push(Out::Frame(self.last_response.clone()));
                    }
                }
                Decoded::Frame(Frame::Ack | Frame::Error) => {}
                Decoded::Frame(Frame::Information { tfi, data }) => {
                    if tfi != TFI_HOST || data.is_empty() {
                        continue;
                    }
                    control.stats.commands.push(data[0]);
                    out.push(Out::Ack);
                    let (good, garbled) = self.answer(&data, control);
                    let mut first = good.clone();
                    if garbled || control.corrupt_next > 0 {
                        if !garbled {
                            control.corrupt_next -= 1;
                        }
                        corrupt_checksum(&mut first);
                    }
                    self.last_response = if garbled { first.clone() } else { good };
                    out.push(Out::Frame(first));
                }
            }
        }
    }

    /// The response frame to a command, and whether it must stay garbled on resends.
    fn answer(&mut self, data: &[u8], control: &mut Control) -> (Vec<u8>, bool) {
        let code = data[0];
        let params = &data[1..];
        let reply = |body: &[u8]| {
            let mut d = vec![code.wrapping_add(1)];
            d.extend_from_slice(body);
            codec::encode_information(TFI_CHIP, &d).unwrap_or_default()
        };
        let frame = match code {
            // Diagnose: the communication test (and others) echo their parameters.
            0x00 => reply(params),
            0x02 => reply(&[0x32, 0x01, 0x06, 0x07]),
            // GetGeneralStatus: no error, field off, no target, SAM status.
            0x04 => reply(&[0x00, 0x00, 0x00, 0x00]),
            0x06 => {
                let values: Vec<u8> = params
                    .chunks_exact(2)
                    .map(|a| {
                        let addr = u16::from_be_bytes([a[0], a[1]]);
                        self.registers.get(&addr).copied().unwrap_or(0)
                    })
                    .collect();
                reply(&values)
            }
            0x08 => {
                for w in params.chunks_exact(3) {
                    self.registers
                        .insert(u16::from_be_bytes([w[0], w[1]]), w[2]);
                }
                reply(&[])
            }
            0x12 | 0x14 => reply(&[]),
            0x16 => reply(&[0x00]),
            0x32 => {
                if params.first() == Some(&0x01) && params.get(1).is_some_and(|v| v & 1 == 0) {
                    control.stats.rf_off += 1;
                }
                reply(&[])
            }
            // InDataExchange, InCommunicateThru: no target answered (status: timeout).
            0x40 | 0x42 => reply(&[0x01]),
            // InDeselect, InRelease, InSelect.
            0x44 | 0x52 | 0x54 => reply(&[0x00]),
            0x4A => {
                let type_a = params.get(1) == Some(&0x00);
                let answer = if type_a {
                    control.polls.pop_front().unwrap_or(match control.card {
                        Some(uid) => PollAnswer::Card(uid),
                        None => PollAnswer::Empty,
                    })
                } else {
                    PollAnswer::Empty
                };
                return match answer {
                    PollAnswer::Empty => (reply(&[0x00]), false),
                    PollAnswer::Card(uid) => (reply(&target_data(&uid)), false),
                    PollAnswer::Truncated(uid) => {
                        let full = target_data(&uid);
                        (reply(&full[..full.len().min(8)]), false)
                    }
                    PollAnswer::Garbled(uid) => (reply(&target_data(&uid)), true),
                    PollAnswer::ErrorFrame => (codec::ERROR_FRAME.to_vec(), false),
                };
            }
            _ => codec::ERROR_FRAME.to_vec(),
        };
        (frame, false)
    }
}

/// InListPassiveTarget's parameters for one card: a MIFARE DESFire (ISO 14443-4, with an
/// ATS) for 7- and 10-byte UIDs, a MIFARE Classic for 4-byte ones.
fn target_data(uid: &CardUid) -> Vec<u8> {
    let id = uid.as_bytes();
    let iso_dep = id.len() != 4;
    let mut d = vec![0x01, 0x01];
    if iso_dep {
        d.extend_from_slice(&[0x03, 0x44, 0x20]);
    } else {
        d.extend_from_slice(&[0x00, 0x04, 0x08]);
    }
    d.push(id.len() as u8);
    d.extend_from_slice(id);
    if iso_dep {
        d.extend_from_slice(&[0x06, 0x75, 0x77, 0x81, 0x02, 0x80]);
    }
    d
}

/// Flips bits in the data checksum of an encoded frame.
fn corrupt_checksum(frame: &mut [u8]) {
    if frame.len() >= 2 {
        let dcs = frame.len() - 2;
        frame[dcs] ^= 0x5A;
    }
}

/// A running emulator on a fresh pty; dropping it stops it and the pty's slave device
/// disappears (like an unplugged USB adapter).
#[derive(Debug)]
pub struct Emulator {
    control: Arc<Mutex<Control>>,
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// Starts an emulator (inside a Tokio runtime) on a new pty. The chip starts asleep,
    /// as after power-on: it answers only after a wake-up preamble.
    pub fn start() -> std::io::Result<Emulator> {
        let (master, slave) = SerialStream::pair().map_err(std::io::Error::from)?;
        let path = slave
            .name()
            .map(PathBuf::from)
            .ok_or_else(|| std::io::Error::other("the pty has no slave name"))?;
        let control = Arc::new(Mutex::new(Control {
            asleep: true,
            ..Control::default()
        }));
        let task = tokio::spawn(serve(master, slave, control.clone()));
        Ok(Emulator {
            control,
            path,
            task,
        })
    }

    /// The device a host opens (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a card in the field (or takes it away).
    pub fn set_card(&self, card: Option<CardUid>) {
        self.control().card = card;
    }

    /// Queues answers for the next polls.
    pub fn script_polls(&self, answers: impl IntoIterator<Item = PollAnswer>) {
        self.control().polls.extend(answers);
    }

    /// Scripted poll answers not used yet.
    pub fn pending_polls(&self) -> usize {
        self.control().polls.len()
    }

    /// Locks the chip up: it drops everything it receives. Unlocking leaves it asleep, so
    /// it answers again only after a wake-up.
    pub fn set_locked_up(&self, locked: bool) {
        let mut c = self.control();
        c.silent = locked;
        if !locked {
            c.asleep = true;
        }
    }

    /// Line noise before every frame written.
    pub fn set_noise(&self, on: bool) {
        self.control().noise = on;
    }

    /// Frames written a few bytes at a time.
    pub fn set_split(&self, on: bool) {
        self.control().split = on;
    }

    /// The next `n` responses are first sent with a wrong data checksum (a NACK gets the
    /// right one).
    pub fn corrupt_next_responses(&self, n: u32) {
        self.control().corrupt_next = n;
    }

    /// What the emulator has seen so far.
    pub fn stats(&self) -> EmulatorStats {
        self.control().stats.clone()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The far end of a pty for line-reader tests: what is written here arrives at the device
/// a driver opened. Dropping it removes the device, like unplugging the reader.
#[derive(Debug)]
pub struct PtyPeer {
    master: SerialStream,
    _slave: SerialStream,
    path: PathBuf,
}

impl PtyPeer {
    /// A new pty (inside a Tokio runtime).
    pub fn open() -> std::io::Result<PtyPeer> {
        let (master, slave) = SerialStream::pair().map_err(std::io::Error::from)?;
        let path = slave
            .name()
            .map(PathBuf::from)
            .ok_or_else(|| std::io::Error::other("the pty has no slave name"))?;
        Ok(PtyPeer {
            master,
            _slave: slave,
            path,
        })
    }

    /// The device a driver opens (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends bytes to the device.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.master.write_all(bytes).await?;
        self.master.flush().await
    }
}

/// Line noise with a false start code (its length checksum is wrong).
const NOISE: [u8; 9] = [0x13, 0x55, 0x00, 0xFF, 0x07, 0x42, 0xFE, 0x00, 0x99];

async fn serve(mut master: SerialStream, slave: SerialStream, control: Arc<Mutex<Control>>) {
    // Holding the slave open keeps the master readable while no host has the device open.
    let _slave = slave;
    let mut chip = Chip::default();
    let mut buf = [0u8; 1024];
    let mut noise_turn: usize = 0;
    loop {
        let n = match master.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (outs, noise, split) = {
            let mut c = control.lock().unwrap_or_else(|e| e.into_inner());
            let outs = chip.receive(&buf[..n], &mut c);
            (outs, c.noise, c.split)
        };
        for out in outs {
            let bytes = match out {
                Out::Ack => codec::ACK.to_vec(),
                Out::Frame(f) => f,
            };
            let mut wire = Vec::new();
            if noise {
                noise_turn = noise_turn.wrapping_add(1);
                wire.extend_from_slice(&NOISE[..1 + noise_turn % NOISE.len()]);
            }
            wire.extend_from_slice(&bytes);
            let result = if split {
                write_slowly(&mut master, &wire).await
            } else {
                master.write_all(&wire).await
            };
            if result.is_err() {
                return;
            }
        }
    }
}

/// Writes in pieces of 1 to 3 bytes with a pause between them, like a slow UART with a
/// host that reads as soon as anything arrives.
async fn write_slowly(master: &mut SerialStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut rest = bytes;
    let mut size = 1;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        master.write_all(piece).await?;
        master.flush().await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
        rest = tail;
        size = size % 3 + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(data: &[u8]) -> Vec<u8> {
        codec::encode_information(TFI_HOST, data).unwrap()
    }

    fn frames(outs: &[Out]) -> Vec<Decoded> {
        let mut d = Decoder::new();
        for o in outs {
            match o {
                Out::Ack => d.feed(&codec::ACK),
                Out::Frame(f) => d.feed(f),
            }
        }
        let mut v = Vec::new();
        loop {
            match d.decode() {
                Decoded::NeedMore => return v,
                x => v.push(x),
            }
        }
    }

    #[test]
    fn sleeps_until_the_wake_up_then_acks_and_answers() {
        let mut chip = Chip::default();
        let mut c = Control {
            asleep: true,
            ..Control::default()
        };
        assert!(chip.receive(&host(&[0x02]), &mut c).is_empty());
        let mut bytes = codec::WAKE_UP.to_vec();
        bytes.extend(host(&[0x02]));
        let outs = chip.receive(&bytes, &mut c);
        assert_eq!(
            frames(&outs),
            vec![
                Decoded::Frame(Frame::Ack),
                Decoded::Frame(Frame::Information {
                    tfi: TFI_CHIP,
                    data: vec![0x03, 0x32, 0x01, 0x06, 0x07]
                })
            ]
        );
        assert_eq!(c.stats.wake_ups, 1);
        assert_eq!(c.stats.commands, vec![0x02]);
    }

    #[test]
    fn a_nack_gets_the_good_response_after_a_corrupted_one() {
        let mut chip = Chip::default();
        let mut c = Control {
            corrupt_next: 1,
            card: Some(CardUid::parse("04A1B2C3D4E5F6").unwrap()),
            ..Control::default()
        };
        let outs = chip.receive(&host(&[0x4A, 0x01, 0x00]), &mut c);
        assert_eq!(
            frames(&outs),
            vec![Decoded::Frame(Frame::Ack), Decoded::BadChecksum]
        );
        let outs = chip.receive(&codec::NACK, &mut c);
        match &frames(&outs)[..] {
            [Decoded::Frame(Frame::Information { data, .. })] => assert_eq!(data[0], 0x4B),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.stats.nacks, 1);
    }

    #[test]
    fn registers_read_back_what_was_written() {
        let mut chip = Chip::default();
        let mut c = Control::default();
        chip.receive(&host(&[0x08, 0x63, 0x02, 0x80, 0x63, 0x03, 0x81]), &mut c);
        let outs = chip.receive(&host(&[0x06, 0x63, 0x03, 0x63, 0x02, 0x63, 0x05]), &mut c);
        assert_eq!(
            frames(&outs)[1],
            Decoded::Frame(Frame::Information {
                tfi: TFI_CHIP,
                data: vec![0x07, 0x81, 0x80, 0x00]
            })
        );
    }
}
