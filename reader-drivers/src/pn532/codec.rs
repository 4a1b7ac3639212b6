//! PN532 host-interface frames (NXP UM0701 §6.2), without I/O: bytes in, frames out, and
//! the encodings of the commands the driver sends.
//!
//! ```text
//! information  00 00 FF LEN LCS TFI data… DCS 00          LEN+LCS ≡ 0, TFI+data+DCS ≡ 0
//! extended     00 00 FF FF FF LENM LENL LCS TFI data… DCS 00
//! ACK          00 00 FF 00 FF 00
//! NACK         00 00 FF FF 00 00
//! error        00 00 FF 01 FF 7F 81 00
//! ```
//!
//! ```
//! use id06_readers::pn532::codec::{Command, Decoded, Decoder, Frame, ACK};
//!
//! let mut decoder = Decoder::new();
//! decoder.feed(&[0x13, 0x37]); // line noise
//! decoder.feed(&ACK[..4]); // half an ACK
//! assert_eq!(decoder.decode(), Decoded::NeedMore);
//! decoder.feed(&ACK[4..]);
//! assert_eq!(decoder.decode(), Decoded::Frame(Frame::Ack));
//! decoder.feed(&Command::GetFirmwareVersion.encode());
//! assert_eq!(
//!     decoder.decode(),
//!     Decoded::Frame(Frame::Information { tfi: 0xD4, data: vec![0x02] })
//! );
//! ```

// Design: the decoder is a scanner over one growing buffer. It looks for the start code
// `00 FF`, then reads the header (normal, extended, ACK or NACK). A header whose length
// checksum is wrong is line noise: the scanner steps one byte past the start code and
// looks again. A frame whose header is right but whose data checksum is wrong is reported
// (`BadChecksum`, so the host can NACK) and, again, the scanner steps only one byte on, so
// that a real frame hidden behind a false start code in the noise is still found. A frame
// that is not complete yet is "need more bytes", the normal outcome between reads; a
// caller that knows nothing more is coming (a deadline passed) calls
// [`Decoder::abandon_candidate`] so that bytes held back for a false start code are
// scanned again. Preamble and postamble zeros are fill, not frame bytes: the scanner skips
// them like any byte before a start code. Nothing in here can panic on any input: every
// index is checked against the buffer's length first.

use std::ops::Range;

/// Frame identifier of host-to-PN532 information frames.
pub const TFI_HOST: u8 = 0xD4;
/// Frame identifier of PN532-to-host information frames.
pub const TFI_CHIP: u8 = 0xD5;
/// Frame identifier of the application-level error frame.
pub const TFI_ERROR: u8 = 0x7F;

/// The ACK frame (also sent by the host to abort the command in progress).
pub const ACK: [u8; 6] = [0x00, 0x00, 0xFF, 0x00, 0xFF, 0x00];
/// The NACK frame: the host asks the PN532 to send its last response again.
pub const NACK: [u8; 6] = [0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00];
/// The application-level error frame (the PN532 could not understand a command).
pub const ERROR_FRAME: [u8; 8] = [0x00, 0x00, 0xFF, 0x01, 0xFF, 0x7F, 0x81, 0x00];
/// The wake-up sequence for HSU from low-VBAT/power-down (`55 55` then zeros); a
/// SAMConfiguration must follow.
pub const WAKE_UP: [u8; 16] = [
    0x55, 0x55, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// The longest information a frame may carry (TFI + data), in bytes. The PN532's buffers
/// hold 265 bytes; extended headers that announce more are treated as line noise so that a
/// false header cannot make the decoder wait for kilobytes that never come.
pub const MAX_INFORMATION_LEN: usize = 300;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Acknowledgement of a command.
    Ack,
    /// Negative acknowledgement: send the last frame again.
    Nack,
    /// The application-level error frame.
    Error,
    /// An information frame (normal or extended).
    Information {
        /// `D4` from the host, `D5` from the PN532.
        tfi: u8,
        /// The bytes after the TFI: command or response code, then parameters.
        data: Vec<u8>,
    },
}

/// What [`Decoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A complete frame with correct checksums.
    Frame(Frame),
    /// A frame whose header was right but whose data checksum was wrong: the host should
    /// send a NACK so the PN532 repeats its response.
    BadChecksum,
    /// No complete frame in the bytes so far: feed more.
    NeedMore,
}

/// Counters of what the decoder has seen, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecoderStats {
    /// Complete frames decoded.
    pub frames: u64,
    /// Frames dropped for a wrong data checksum.
    pub bad_checksums: u64,
    /// Non-zero bytes skipped as line noise (zeros are fill: preamble, postamble, wake-up).
    pub noise_bytes: u64,
}

/// An incremental, resynchronising frame decoder. Feed it bytes as they arrive and call
/// [`Decoder::decode`] until it says [`Decoded::NeedMore`].
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Index in `buf` of the first byte not yet consumed.
    pos: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    last_span: Range<u64>,
    stats: DecoderStats,
}

/// Where the frame whose header starts at the beginning of a slice stands.
enum Candidate {
    /// Not enough bytes to tell.
    Incomplete,
    /// Not a frame: step past the start code.
    NotAFrame,
    /// A complete frame (or a bad checksum) taking `len` bytes from the start code on.
    Complete(Decoded, usize),
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends bytes received from the line.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos >= 4096) {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Drops everything buffered (after flushing the line, for example).
    pub fn clear(&mut self) {
        self.base += self.buf.len() as u64;
        self.buf.clear();
        self.pos = 0;
    }

    /// Bytes held that have not been consumed yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// What the decoder has seen so far.
    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// The stream offsets (counted from the first byte ever fed) of the start code and of
    /// the end (exclusive, postamble not included) of the last frame or bad-checksum
    /// frame returned.
    pub fn last_span(&self) -> Range<u64> {
        self.last_span.clone()
    }

    /// The next frame in the bytes fed so far, skipping line noise.
    pub fn decode(&mut self) -> Decoded {
        loop {
            let rest = &self.buf[self.pos..];
            let Some(start) = find_start_code(rest) else {
                // Keep a trailing 00: it may be the first half of a start code.
                let keep = usize::from(rest.last() == Some(&0x00));
                let skip = rest.len() - keep;
                self.skip(skip);
                return Decoded::NeedMore;
            };
            self.skip(start);
            match candidate(&self.buf[self.pos..]) {
                Candidate::Incomplete => return Decoded::NeedMore,
                Candidate::NotAFrame => self.skip(1),
                Candidate::Complete(decoded, len) => {
                    let at = self.base + self.pos as u64;
                    self.last_span = at..at + len as u64;
                    match decoded {
                        Decoded::Frame(_) => {
                            self.stats.frames += 1;
                            self.pos += len;
                        }
                        _ => {
                            // Step only past the start code: the bytes of a corrupted
                            // frame may hide the start of a good one.
                            self.stats.bad_checksums += 1;
                            self.skip(1);
                        }
                    }
                    return decoded;
                }
            }
        }
    }

    /// Gives up on an incomplete frame at the front of the buffer (its start code was
    /// probably noise, or the rest was lost) so that the bytes after its start code are
    /// scanned again. Returns whether there was one to give up.
    pub fn abandon_candidate(&mut self) -> bool {
        let rest = &self.buf[self.pos..];
        match find_start_code(rest) {
            Some(start) => {
                self.skip(start + 1);
                true
            }
            None => false,
        }
    }

    fn skip(&mut self, n: usize) {
        let end = (self.pos + n).min(self.buf.len());
        let noise = self.buf[self.pos..end].iter().filter(|b| **b != 0).count();
        self.stats.noise_bytes += noise as u64;
        self.pos = end;
    }
}

/// The index of the first `00 FF` in `bytes`.
fn find_start_code(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while from < bytes.len() {
        let i = from + bytes[from..].iter().position(|b| *b == 0x00)?;
        if bytes.get(i + 1) == Some(&0xFF) {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

/// Classifies the bytes from a start code (`00 FF`) on.
fn candidate(b: &[u8]) -> Candidate {
    let (Some(&len), Some(&lcs)) = (b.get(2), b.get(3)) else {
        return Candidate::Incomplete;
    };
    match (len, lcs) {
        (0x00, 0xFF) => return Candidate::Complete(Decoded::Frame(Frame::Ack), 4),
        (0xFF, 0x00) => return Candidate::Complete(Decoded::Frame(Frame::Nack), 4),
        _ => {}
    }
    let (info_len, header) = if (len, lcs) == (0xFF, 0xFF) {
        let (Some(&m), Some(&l), Some(&cs)) = (b.get(4), b.get(5), b.get(6)) else {
            return Candidate::Incomplete;
        };
        if m.wrapping_add(l).wrapping_add(cs) != 0 {
            return Candidate::NotAFrame;
        }
        (usize::from(m) << 8 | usize::from(l), 7)
    } else {
        if len.wrapping_add(lcs) != 0 {
            return Candidate::NotAFrame;
        }
        (usize::from(len), 4)
    };
    if info_len == 0 || info_len > MAX_INFORMATION_LEN {
        return Candidate::NotAFrame;
    }
    let total = header + info_len + 1;
    let Some(frame) = b.get(header..total) else {
        return Candidate::Incomplete;
    };
    let sum = frame.iter().fold(0u8, |s, x| s.wrapping_add(*x));
    if sum != 0 {
        return Candidate::Complete(Decoded::BadChecksum, total);
    }
    let info = &frame[..info_len];
    let tfi = info[0];
    let decoded = if tfi == TFI_ERROR && info_len == 1 {
        Frame::Error
    } else {
        Frame::Information {
            tfi,
            data: info[1..].to_vec(),
        }
    };
    Candidate::Complete(Decoded::Frame(decoded), total)
}

/// A frame cannot carry this much.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a PN532 frame carries at most {MAX_INFORMATION_LEN} bytes; this one would carry {len}")]
pub struct FrameTooLong {
    /// TFI + data length asked for.
    pub len: usize,
}

/// Encodes an information frame (normal up to 255 bytes of TFI + data, extended above).
pub fn encode_information(tfi: u8, data: &[u8]) -> Result<Vec<u8>, FrameTooLong> {
    let len = data.len() + 1;
    if len > MAX_INFORMATION_LEN {
        return Err(FrameTooLong { len });
    }
    let mut out = Vec::with_capacity(len + 10);
    out.extend_from_slice(&[0x00, 0x00, 0xFF]);
    if len <= 0xFF {
        let l = len as u8;
        out.extend_from_slice(&[l, l.wrapping_neg()]);
    } else {
        let (m, l) = ((len >> 8) as u8, len as u8);
        out.extend_from_slice(&[0xFF, 0xFF, m, l, m.wrapping_add(l).wrapping_neg()]);
    }
    out.push(tfi);
    out.extend_from_slice(data);
    let sum = data.iter().fold(tfi, |s, x| s.wrapping_add(*x));
    out.push(sum.wrapping_neg());
    out.push(0x00);
    Ok(out)
}

/// The commands the driver sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `02`: chip, version, revision, supported protocols.
    GetFirmwareVersion,
    /// `14`: SAM mode; `01` normal (no SAM). `timeout` in 50 ms steps (virtual card mode
    /// only), `use_irq` drives the P70_IRQ pin.
    SamConfiguration {
        /// 1 normal, 2 virtual card, 3 wired card, 4 dual card.
        mode: u8,
        /// Virtual card timeout in 50 ms units.
        timeout: u8,
        /// Whether the PN532 drives its IRQ pin.
        use_irq: bool,
    },
    /// `32` item `01`: the RF field on or off (auto RF collision avoidance off).
    RfField {
        /// Field on.
        on: bool,
    },
    /// `32` item `05`: retries; `FF` means for ever, which would make
    /// InListPassiveTarget wait for a card, so the driver sends finite values.
    MaxRetries {
        /// ATR_REQ retries (DEP).
        atr: u8,
        /// PSL_REQ retries (DEP).
        psl: u8,
        /// Passive activation retries (InListPassiveTarget).
        passive_activation: u8,
    },
    /// `4A`: look for up to `max_targets` (1 or 2) passive targets at `baud` (`00`: ISO
    /// 14443 type A, 106 kbps).
    InListPassiveTarget {
        /// 1 or 2.
        max_targets: u8,
        /// Baud rate and modulation (`BrTy`).
        baud: u8,
    },
    /// `52`: release target `target` (`00`: all).
    InRelease {
        /// Target number, 0 for all.
        target: u8,
    },
}

impl Command {
    /// The command code (the response code is one more).
    pub fn code(&self) -> u8 {
        match self {
            Command::GetFirmwareVersion => 0x02,
            Command::SamConfiguration { .. } => 0x14,
            Command::RfField { .. } | Command::MaxRetries { .. } => 0x32,
            Command::InListPassiveTarget { .. } => 0x4A,
            Command::InRelease { .. } => 0x52,
        }
    }

    /// Code and parameters: the frame's data after the TFI.
    pub fn data(&self) -> Vec<u8> {
        let code = self.code();
        match *self {
            Command::GetFirmwareVersion => vec![code],
            Command::SamConfiguration {
                mode,
                timeout,
                use_irq,
            } => vec![code, mode, timeout, u8::from(use_irq)],
            Command::RfField { on } => vec![code, 0x01, u8::from(on)],
            Command::MaxRetries {
                atr,
                psl,
                passive_activation,
            } => vec![code, 0x05, atr, psl, passive_activation],
            Command::InListPassiveTarget { max_targets, baud } => vec![code, max_targets, baud],
            Command::InRelease { target } => vec![code, target],
        }
    }

    /// The whole frame, ready for the line.
    pub fn encode(&self) -> Vec<u8> {
        // A command's data is at most 5 bytes: always fits a normal frame.
        encode_information(TFI_HOST, &self.data()).unwrap_or_default()
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::GetFirmwareVersion => "GetFirmwareVersion",
            Command::SamConfiguration { .. } => "SAMConfiguration",
            Command::RfField { .. } => "RFConfiguration(RF field)",
            Command::MaxRetries { .. } => "RFConfiguration(MaxRetries)",
            Command::InListPassiveTarget { .. } => "InListPassiveTarget",
            Command::InRelease { .. } => "InRelease",
        }
    }
}

/// A response that does not say what the command's response must say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// Too short for what it must hold.
    #[error("the {what} response is truncated ({len} bytes)")]
    Truncated {
        /// Which response.
        what: &'static str,
        /// How long it was.
        len: usize,
    },
    /// A status byte that reports an error (UM0701 table 6-2).
    #[error("the PN532 reported error 0x{0:02X}")]
    Status(u8),
}

/// The answer to GetFirmwareVersion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirmwareVersion {
    /// `0x32` for a PN532.
    pub ic: u8,
    /// Firmware version.
    pub version: u8,
    /// Firmware revision.
    pub revision: u8,
    /// Supported protocols: bit 0 ISO 14443 A, bit 1 ISO 14443 B, bit 2 ISO 18092.
    pub support: u8,
}

impl FirmwareVersion {
    /// Parses the response's parameters (after the response code).
    pub fn parse(params: &[u8]) -> Result<FirmwareVersion, ResponseError> {
        match params {
            [ic, version, revision, support, ..] => Ok(FirmwareVersion {
                ic: *ic,
                version: *version,
                revision: *revision,
                support: *support,
            }),
            _ => Err(ResponseError::Truncated {
                what: "GetFirmwareVersion",
                len: params.len(),
            }),
        }
    }
}

impl std::fmt::Display for FirmwareVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let chip = match self.ic {
            0x32 => "PN532".to_string(),
            0x31 => "PN531".to_string(),
            0x33 => "PN533".to_string(),
            other => format!("PN53x (IC 0x{other:02X})"),
        };
        let protocols: Vec<&str> = [(1, "ISO 14443 A"), (2, "ISO 14443 B"), (4, "ISO 18092")]
            .into_iter()
            .filter(|(bit, _)| self.support & bit != 0)
            .map(|(_, name)| name)
            .collect();
        write!(
            f,
            "{chip} v{}.{} ({})",
            self.version,
            self.revision,
            protocols.join(", ")
        )
    }
}

/// One ISO 14443 type A target from InListPassiveTarget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetA {
    /// The PN532's logical number for it.
    pub target: u8,
    /// SENS_RES (ATQA), as sent.
    pub sens_res: [u8; 2],
    /// SEL_RES (SAK); bit 5 (`0x20`) means ISO 14443-4 compliant.
    pub sel_res: u8,
    /// The UID (NFCID1).
    pub nfcid: Vec<u8>,
    /// The ATS (length byte included) for ISO 14443-4 cards, when sent.
    pub ats: Option<Vec<u8>>,
}

impl TargetA {
    /// Parses InListPassiveTarget's parameters (after the response code) for type A
    /// targets: `NbTg` then, per target, `Tg SENS_RES(2) SEL_RES NFCIDLen NFCID [ATS]`.
    pub fn parse_list(params: &[u8]) -> Result<Vec<TargetA>, ResponseError> {
        let truncated = || ResponseError::Truncated {
            what: "InListPassiveTarget",
            len: params.len(),
        };
        let (&count, mut rest) = params.split_first().ok_or_else(truncated)?;
        let mut targets = Vec::new();
        for _ in 0..count {
            let [target, s0, s1, sel_res, id_len, tail @ ..] = rest else {
                return Err(truncated());
            };
            let id_len = usize::from(*id_len);
            let nfcid = tail.get(..id_len).ok_or_else(truncated)?.to_vec();
            rest = &tail[id_len..];
            let mut ats = None;
            if sel_res & 0x20 != 0 {
                if let Some(&tl) = rest.first() {
                    let tl = usize::from(tl);
                    let bytes = rest.get(..tl.max(1)).ok_or_else(truncated)?;
                    ats = Some(bytes.to_vec());
                    rest = &rest[tl.max(1)..];
                }
            }
            targets.push(TargetA {
                target: *target,
                sens_res: [*s0, *s1],
                sel_res: *sel_res,
                nfcid,
                ats,
            });
        }
        Ok(targets)
    }
}

/// Checks a status byte (the first parameter of InRelease and other `In…` responses).
pub fn check_status(params: &[u8], what: &'static str) -> Result<(), ResponseError> {
    match params.first() {
        None => Err(ResponseError::Truncated { what, len: 0 }),
        Some(s) if s & 0x3F == 0 => Ok(()),
        Some(s) => Err(ResponseError::Status(s & 0x3F)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder) -> Vec<Decoded> {
        let mut out = Vec::new();
        loop {
            match d.decode() {
                Decoded::NeedMore => return out,
                x => out.push(x),
            }
        }
    }

    fn info(tfi: u8, data: &[u8]) -> Decoded {
        Decoded::Frame(Frame::Information {
            tfi,
            data: data.to_vec(),
        })
    }

    #[test]
    fn encodes_the_frames_the_manual_shows() {
        assert_eq!(
            Command::GetFirmwareVersion.encode(),
            [0x00, 0x00, 0xFF, 0x02, 0xFE, 0xD4, 0x02, 0x2A, 0x00]
        );
        assert_eq!(
            Command::SamConfiguration {
                mode: 1,
                timeout: 0x14,
                use_irq: true
            }
            .encode(),
            [0x00, 0x00, 0xFF, 0x05, 0xFB, 0xD4, 0x14, 0x01, 0x14, 0x01, 0x02, 0x00]
        );
        assert_eq!(
            Command::InListPassiveTarget {
                max_targets: 1,
                baud: 0
            }
            .encode(),
            [0x00, 0x00, 0xFF, 0x04, 0xFC, 0xD4, 0x4A, 0x01, 0x00, 0xE1, 0x00]
        );
        assert_eq!(
            Command::InRelease { target: 0 }.encode(),
            [0x00, 0x00, 0xFF, 0x03, 0xFD, 0xD4, 0x52, 0x00, 0xDA, 0x00]
        );
    }

    #[test]
    fn decodes_ack_nack_error_and_the_v1_6_firmware_answer() {
        let mut d = Decoder::new();
        d.feed(&ACK);
        d.feed(&NACK);
        d.feed(&ERROR_FRAME);
        d.feed(&[
            0x00, 0x00, 0xFF, 0x06, 0xFA, 0xD5, 0x03, 0x32, 0x01, 0x06, 0x07, 0xE8, 0x00,
        ]);
        assert_eq!(
            decode_all(&mut d),
            vec![
                Decoded::Frame(Frame::Ack),
                Decoded::Frame(Frame::Nack),
                Decoded::Frame(Frame::Error),
                info(0xD5, &[0x03, 0x32, 0x01, 0x06, 0x07]),
            ]
        );
        let fw = FirmwareVersion::parse(&[0x32, 0x01, 0x06, 0x07]).unwrap();
        assert_eq!(
            fw.to_string(),
            "PN532 v1.6 (ISO 14443 A, ISO 14443 B, ISO 18092)"
        );
        assert_eq!(d.stats().noise_bytes, 0);
    }

    #[test]
    fn extended_frames_round_trip_and_long_data_uses_them() {
        let data: Vec<u8> = (0..280u32).map(|i| i as u8).collect();
        let bytes = encode_information(TFI_CHIP, &data).unwrap();
        assert_eq!(&bytes[..5], &[0x00, 0x00, 0xFF, 0xFF, 0xFF]);
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert_eq!(decode_all(&mut d), vec![info(TFI_CHIP, &data)]);
        // 254 bytes of data + TFI = 255: still a normal frame (LEN FF, LCS 01).
        let bytes = encode_information(TFI_CHIP, &data[..254]).unwrap();
        assert_eq!(&bytes[..5], &[0x00, 0x00, 0xFF, 0xFF, 0x01]);
        d.feed(&bytes);
        assert_eq!(decode_all(&mut d), vec![info(TFI_CHIP, &data[..254])]);
        assert_eq!(
            encode_information(TFI_CHIP, &[0; MAX_INFORMATION_LEN]),
            Err(FrameTooLong {
                len: MAX_INFORMATION_LEN + 1
            })
        );
    }

    #[test]
    fn a_frame_split_into_single_bytes_needs_more_until_the_last() {
        let bytes = encode_information(TFI_CHIP, &[0x4B, 0x00]).unwrap();
        let mut d = Decoder::new();
        // The frame is complete at its DCS; the postamble is fill.
        let complete_at = bytes.len() - 2;
        for (i, b) in bytes.iter().enumerate() {
            d.feed(&[*b]);
            let got = d.decode();
            if i == complete_at {
                assert_eq!(got, info(TFI_CHIP, &[0x4B, 0x00]));
            } else {
                assert_eq!(got, Decoded::NeedMore, "after byte {i}");
            }
        }
    }

    #[test]
    fn resynchronises_after_noise_false_headers_and_a_bad_checksum() {
        let good = encode_information(TFI_CHIP, &[0x4B, 0x00]).unwrap();
        let mut bad = good.clone();
        let dcs = bad.len() - 2;
        bad[dcs] ^= 0x40;
        let mut d = Decoder::new();
        d.feed(&[0x55, 0x55, 0x00, 0x00, 0xFF, 0x03, 0x03]); // false header: LEN+LCS != 0
        d.feed(&[0x00, 0xFF, 0xFF, 0xFF, 0x10, 0x00, 0x00]); // false extended header
        d.feed(&bad);
        d.feed(&[0xFF, 0x00, 0x12]);
        d.feed(&good);
        assert_eq!(
            decode_all(&mut d),
            vec![Decoded::BadChecksum, info(TFI_CHIP, &[0x4B, 0x00])]
        );
        assert_eq!(d.stats().bad_checksums, 1);
        assert!(d.stats().noise_bytes > 0);
    }

    #[test]
    fn a_false_header_in_noise_does_not_hide_a_frame_for_ever() {
        // "00 FF 40 C0" announces 64 bytes that never come; the real ACK is inside them.
        let mut d = Decoder::new();
        d.feed(&[0x00, 0xFF, 0x40, 0xC0, 0x11]);
        d.feed(&ACK);
        assert_eq!(d.decode(), Decoded::NeedMore);
        assert!(d.abandon_candidate());
        assert_eq!(d.decode(), Decoded::Frame(Frame::Ack));
        assert_eq!(d.decode(), Decoded::NeedMore);
    }

    #[test]
    fn spans_count_from_the_first_byte_fed() {
        let mut d = Decoder::new();
        d.feed(&[1, 2, 3]);
        d.feed(&ACK);
        assert_eq!(d.decode(), Decoded::Frame(Frame::Ack));
        assert_eq!(d.last_span(), 4..8);
        d.feed(&ACK);
        assert_eq!(d.decode(), Decoded::Frame(Frame::Ack));
        assert_eq!(d.last_span(), 10..14);
    }

    #[test]
    fn parses_a_desfire_target_with_ats_and_a_bare_one() {
        let params = [
            0x01, 0x01, 0x03, 0x44, 0x20, 0x07, 0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x06,
            0x75, 0x77, 0x81, 0x02, 0x80,
        ];
        let t = TargetA::parse_list(&params).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].nfcid, [0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6]);
        assert_eq!(t[0].ats.as_deref(), Some(&params[13..]));
        let bare = [0x01, 0x01, 0x00, 0x04, 0x08, 0x04, 0xDE, 0xAD, 0xBE, 0xEF];
        assert_eq!(
            TargetA::parse_list(&bare).unwrap()[0].nfcid,
            [0xDE, 0xAD, 0xBE, 0xEF]
        );
        assert_eq!(TargetA::parse_list(&[0x00]).unwrap(), vec![]);
        // Cut anywhere but right after the NFCID (an ATS is optional): truncated.
        for cut in (1..params.len()).filter(|c| *c != 13) {
            assert!(
                TargetA::parse_list(&params[..cut]).is_err(),
                "cut at {cut} must be truncated"
            );
        }
        assert_eq!(TargetA::parse_list(&params[..13]).unwrap()[0].ats, None);
        assert!(TargetA::parse_list(&[]).is_err());
    }

    #[test]
    fn status_bytes() {
        assert_eq!(check_status(&[0x00], "InRelease"), Ok(()));
        assert_eq!(
            check_status(&[0x29], "InRelease"),
            Err(ResponseError::Status(0x29))
        );
        assert!(check_status(&[], "InRelease").is_err());
    }

    /// A valid frame as the decoder must return it, and its bytes on the wire.
    fn arb_frame() -> impl proptest::strategy::Strategy<Value = (Frame, Vec<u8>)> {
        use proptest::prelude::*;
        prop_oneof![
            Just((Frame::Ack, ACK.to_vec())),
            Just((Frame::Nack, NACK.to_vec())),
            Just((Frame::Error, ERROR_FRAME.to_vec())),
            (
                prop_oneof![Just(TFI_HOST), Just(TFI_CHIP), any::<u8>()],
                proptest::collection::vec(any::<u8>(), 0..MAX_INFORMATION_LEN)
            )
                .prop_map(|(tfi, data)| {
                    let bytes = encode_information(tfi, &data).unwrap();
                    let frame = if tfi == TFI_ERROR && data.is_empty() {
                        Frame::Error
                    } else {
                        Frame::Information { tfi, data }
                    };
                    (frame, bytes)
                }),
        ]
    }

    /// Noise rich in `00` and `FF`, so that false start codes and headers are common.
    fn arb_noise(max: usize) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        proptest::collection::vec(prop_oneof![Just(0x00u8), Just(0xFFu8), any::<u8>()], 0..max)
    }

    /// Feeds `bytes` in pieces of `chunk` bytes and drains the decoder, giving up on a
    /// stuck candidate at the end as a driver does at its deadline. Returns every result
    /// but NeedMore, with its span.
    fn drain(bytes: &[u8], chunk: usize) -> Vec<(Decoded, Range<u64>)> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            d.feed(piece);
            loop {
                match d.decode() {
                    Decoded::NeedMore => break,
                    x => out.push((x, d.last_span())),
                }
                assert!(d.buffered() <= bytes.len());
            }
            // Never more held back than the longest frame and one read.
            assert!(d.buffered() <= MAX_INFORMATION_LEN + 8 + chunk.max(1));
        }
        while d.abandon_candidate() {
            loop {
                match d.decode() {
                    Decoded::NeedMore => break,
                    x => out.push((x, d.last_span())),
                }
            }
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_in_arbitrary_pieces_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            chunk in 1usize..64,
        ) {
            let results = drain(&bytes, chunk);
            for (_, span) in results {
                proptest::prop_assert!(span.end <= bytes.len() as u64);
            }
        }

        #[test]
        fn any_valid_frame_in_noise_is_found(
            (frame, wire) in arb_frame(),
            before in arb_noise(600),
            after in arb_noise(40),
            chunk in 1usize..80,
        ) {
            let mut stream = before.clone();
            stream.extend_from_slice(&wire);
            stream.extend_from_slice(&after);
            // The frame's start code follows its preamble byte.
            let start = before.len() as u64 + 1;
            let end = before.len() as u64 + wire.len() as u64 - 1;
            let results = drain(&stream, chunk);
            let found = results.iter().any(|(d, span)| {
                *d == Decoded::Frame(frame.clone()) && span.start == start
            });
            // The only way to miss it: noise before it that forms a complete, valid frame
            // running into it (the line cannot tell that apart from a real frame).
            let swallowed = results.iter().any(|(d, span)| {
                matches!(d, Decoded::Frame(_)) && span.start < start && span.end > start
            });
            proptest::prop_assert!(found || swallowed, "frame {:?} at {}..{} not found: {:?}", frame, start, end, results);
        }

        #[test]
        fn frames_back_to_back_in_any_pieces_all_come_out_in_order(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            chunk in 1usize..40,
        ) {
            let stream: Vec<u8> = frames.iter().flat_map(|(_, w)| w.clone()).collect();
            let got: Vec<Decoded> = drain(&stream, chunk).into_iter().map(|(d, _)| d).collect();
            let want: Vec<Decoded> = frames.into_iter().map(|(f, _)| Decoded::Frame(f)).collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
