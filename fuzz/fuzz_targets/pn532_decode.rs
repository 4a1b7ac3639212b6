//! The PN532 frame decoder on arbitrary input: it never panics, holds back at most one
//! frame's worth of bytes, and finds a valid frame embedded in arbitrary noise.
//!
//! Input layout: byte 0 picks the read size, bytes 1-3 pick where the embedded frame goes,
//! how long it is and its TFI; the rest is both the raw stream (first check) and the noise
//! and frame data (second check).

#![no_main]

use id06_readers::pn532::codec::{
    encode_information, Decoded, Decoder, Frame, MAX_INFORMATION_LEN, TFI_ERROR,
};
use libfuzzer_sys::fuzz_target;
use std::ops::Range;

/// Feeds `bytes` in reads of `chunk` bytes, drains the decoder, then gives up on stuck
/// candidates as the driver does at a deadline.
fn drain(bytes: &[u8], chunk: usize) -> Vec<(Decoded, Range<u64>)> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk) {
        d.feed(piece);
        loop {
            match d.decode() {
                Decoded::NeedMore => break,
                x => {
                    let span = d.last_span();
                    assert!(span.start < span.end && span.end <= bytes.len() as u64);
                    out.push((x, span));
                }
            }
        }
        assert!(d.buffered() <= MAX_INFORMATION_LEN + 8 + chunk);
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

fuzz_target!(|data: &[u8]| {
    let [c, at, len, tfi, rest @ ..] = data else {
        return;
    };
    let chunk = usize::from(*c % 64) + 1;

    // 1. The input as it stands.
    drain(rest, chunk);

    // 2. A valid frame built from the input, with the input's bytes as noise around it.
    let split = usize::from(*at) * rest.len() / 256;
    let (before, tail) = rest.split_at(split);
    let payload = &tail[..usize::from(*len).min(tail.len())];
    let after = &tail[payload.len()..];
    let Ok(wire) = encode_information(*tfi, payload) else {
        return;
    };
    let frame = if *tfi == TFI_ERROR && payload.is_empty() {
        Frame::Error
    } else {
        Frame::Information {
            tfi: *tfi,
            data: payload.to_vec(),
        }
    };
    let mut stream = before.to_vec();
    stream.extend_from_slice(&wire);
    stream.extend_from_slice(after);
    let start = before.len() as u64 + 1;
    let results = drain(&stream, chunk);
    let found = results
        .iter()
        .any(|(d, span)| *d == Decoded::Frame(frame.clone()) && span.start == start);
    // The only excuse: noise before it that forms a complete valid frame running into it.
    let swallowed = results
        .iter()
        .any(|(d, span)| matches!(d, Decoded::Frame(_)) && span.start < start && span.end > start);
    assert!(found || swallowed, "frame at {start} lost: {results:?}");
});
