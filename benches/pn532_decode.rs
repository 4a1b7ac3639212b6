//! PN532 frame decoding throughput on a mixed stream (frames and line noise, fed in
//! serial-read-sized chunks): the resynchronising decoder against a naive decoder written
//! for this benchmark (byte-at-a-time `Vec::remove(0)` on noise, a fresh parse attempt at
//! every position), measured in the same run so that the ratio means something.
//!
//! `cargo bench -p id06-readers --bench pn532_decode`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use id06_readers::pn532::codec::{self, Decoded, Decoder, Frame, ACK, TFI_CHIP};

/// About 1 MiB: responses a host sees (ACKs, empty and card polls, firmware, an extended
/// frame now and then) with runs of noise between them, rich in `00` and `FF` so that
/// false start codes are common.
fn mixed_stream() -> (Vec<u8>, usize) {
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let card = [
        0x4B, 0x01, 0x01, 0x03, 0x44, 0x20, 0x07, 0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x06,
        0x75, 0x77, 0x81, 0x02, 0x80,
    ];
    let long: Vec<u8> = (0..280u32).map(|i| i as u8).collect();
    let mut out = Vec::with_capacity(1 << 20);
    let mut frames = 0;
    while out.len() < 1 << 20 {
        let noise = next() % 24;
        for _ in 0..noise {
            let r = next();
            out.push(match r % 8 {
                0 => 0x00,
                1 => 0xFF,
                _ => (r >> 8) as u8,
            });
        }
        match next() % 10 {
            0..=3 => out.extend_from_slice(&ACK),
            4..=6 => out.extend(codec::encode_information(TFI_CHIP, &[0x4B, 0x00]).unwrap()),
            7 => out.extend(codec::encode_information(TFI_CHIP, &card).unwrap()),
            8 => out.extend(
                codec::encode_information(TFI_CHIP, &[0x03, 0x32, 0x01, 0x06, 0x07]).unwrap(),
            ),
            _ => out.extend(codec::encode_information(TFI_CHIP, &long).unwrap()),
        }
        frames += 1;
    }
    (out, frames)
}

const CHUNK: usize = 64;

fn decode_fast(stream: &[u8]) -> usize {
    let mut d = Decoder::new();
    let mut found = 0;
    for chunk in stream.chunks(CHUNK) {
        d.feed(chunk);
        loop {
            match d.decode() {
                Decoded::NeedMore => break,
                Decoded::Frame(f) => {
                    black_box(&f);
                    found += 1;
                }
                Decoded::BadChecksum => {}
            }
        }
    }
    found
}

/// The naive decoder: what a first attempt tends to look like.
mod naive {
    use super::Frame;

    pub enum Attempt {
        Incomplete,
        No,
        Yes(Frame, usize),
    }

    pub fn attempt(buf: &[u8]) -> Attempt {
        if buf.len() < 4 {
            return Attempt::Incomplete;
        }
        if buf[0] != 0x00 || buf[1] != 0xFF {
            return Attempt::No;
        }
        if buf[2] == 0x00 && buf[3] == 0xFF {
            return Attempt::Yes(Frame::Ack, 4);
        }
        if buf[2] == 0xFF && buf[3] == 0x00 {
            return Attempt::Yes(Frame::Nack, 4);
        }
        let (len, header) = if buf[2] == 0xFF && buf[3] == 0xFF {
            if buf.len() < 7 {
                return Attempt::Incomplete;
            }
            if (buf[4] as u32 + buf[5] as u32 + buf[6] as u32) % 256 != 0 {
                return Attempt::No;
            }
            (((buf[4] as usize) << 8) | buf[5] as usize, 7)
        } else {
            if (buf[2] as u32 + buf[3] as u32) % 256 != 0 {
                return Attempt::No;
            }
            (buf[2] as usize, 4)
        };
        if len == 0 || len > super::codec::MAX_INFORMATION_LEN {
            return Attempt::No;
        }
        if buf.len() < header + len + 1 {
            return Attempt::Incomplete;
        }
        let body: Vec<u8> = buf[header..header + len].to_vec();
        let sum: u32 = body.iter().map(|b| *b as u32).sum::<u32>() + buf[header + len] as u32;
        if sum % 256 != 0 {
            return Attempt::No;
        }
        let frame = if body == [0x7F] {
            Frame::Error
        } else {
            Frame::Information {
                tfi: body[0],
                data: body[1..].to_vec(),
            }
        };
        Attempt::Yes(frame, header + len + 1)
    }

    pub fn decode(stream: &[u8]) -> usize {
        let mut buf: Vec<u8> = Vec::new();
        let mut found = 0;
        for chunk in stream.chunks(super::CHUNK) {
            buf.extend_from_slice(chunk);
            loop {
                match attempt(&buf) {
                    Attempt::Incomplete => break,
                    Attempt::No => {
                        buf.remove(0);
                    }
                    Attempt::Yes(f, len) => {
                        super::black_box(&f);
                        found += 1;
                        buf.drain(..len);
                    }
                }
            }
        }
        found
    }
}

fn bench(c: &mut Criterion) {
    let (stream, frames) = mixed_stream();
    let fast = decode_fast(&stream);
    let slow = naive::decode(&stream);
    // Both find every frame put in (noise may add a few false ones, the same for both).
    assert!(fast >= frames, "decoder found {fast} of {frames}");
    assert_eq!(fast, slow, "both decoders must find the same frames");
    let mut g = c.benchmark_group("pn532_decode_mixed_stream");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("resynchronising_decoder", |b| {
        b.iter(|| decode_fast(black_box(&stream)))
    });
    g.bench_function("naive_baseline", |b| {
        b.iter(|| naive::decode(black_box(&stream)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
