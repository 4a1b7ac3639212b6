//! What the ledger sends the gateway: confirmations (`P/ack`) and replay requests
//! (`P/replay`).
//!
//! Design: both arrive on the list session ([`crate::mqtt::list_session`]), bounded in size by
//! it; the payloads are parsed here by pure functions that refuse anything but exactly the
//! documented shape. A confirmation is applied to the outbox at once (it only removes
//! markers); a replay request is checked and handed to the publishing session, which serves
//! it from the archive at a bounded rate beside new taps.

use crate::mqtt::delivery::ReplayRequest;
use crate::storage::outbox::Outbox;
use id06_protocol::StreamId;
use serde::Deserialize;

/// The largest `P/ack` or `P/replay` payload taken.
pub const MAX_PAYLOAD: usize = 1024;
/// The most seqs one replay may ask for.
pub const MAX_REPLAY_SPAN: u64 = 1_000_000;

/// `P/ack`: every seq of `stream` up to `seq` is stored by the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The stream.
    pub stream: StreamId,
    /// The highest seq stored, with every one before it.
    pub seq: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Replay {
    stream: StreamId,
    from_seq: u64,
    to_seq: u64,
}

fn json<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, String> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(format!(
            "{what} of {} bytes (at most {MAX_PAYLOAD})",
            bytes.len()
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("{what} is not valid: {e}"))
}

/// Parses a `P/ack` payload.
pub fn parse_ack(bytes: &[u8]) -> Result<Ack, String> {
    json(bytes, "a confirmation")
}

/// Parses and checks a `P/replay` payload.
pub fn parse_replay(bytes: &[u8]) -> Result<ReplayRequest, String> {
    let r: Replay = json(bytes, "a replay request")?;
    if r.from_seq == 0 || r.from_seq > r.to_seq {
        return Err(format!(
            "a replay request from seq {} to {} is empty or backwards (seqs start at 1)",
            r.from_seq, r.to_seq
        ));
    }
    if r.to_seq - r.from_seq >= MAX_REPLAY_SPAN {
        return Err(format!(
            "a replay request for {} seqs (at most {MAX_REPLAY_SPAN} at a time)",
            r.to_seq - r.from_seq + 1
        ));
    }
    Ok(ReplayRequest {
        stream: r.stream,
        from_seq: r.from_seq,
        to_seq: r.to_seq,
    })
}

/// Takes the ledger's messages.
pub struct LedgerInbox {
    /// Where confirmations go.
    pub outbox: Outbox,
    /// Where replays go (the publishing session).
    pub replays: tokio::sync::mpsc::Sender<ReplayRequest>,
}

impl LedgerInbox {
    /// A `P/ack` payload; returns the line to log when it was refused.
    pub async fn ack(&self, bytes: &[u8]) -> Result<(), String> {
        let ack = parse_ack(bytes).map_err(|e| format!("P/ack ignored: {e}"))?;
        let outbox = self.outbox.clone();
        let done = tokio::task::spawn_blocking(move || outbox.confirm(&ack.stream, ack.seq))
            .await
            .map_err(|e| format!("P/ack failed: {e}"))?;
        match done {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(stream = %ack.stream, seq = ack.seq, events = n, "the ledger confirmed events");
                }
                Ok(())
            }
            Err(e) => Err(format!("P/ack ignored: {e}")),
        }
    }

    /// A `P/replay` payload; returns the line to log when it was refused.
    pub fn replay(&self, bytes: &[u8]) -> Result<(), String> {
        let r = parse_replay(bytes).map_err(|e| format!("P/replay ignored: {e}"))?;
        if !self.outbox.knows_stream(&r.stream) {
            return Err(format!(
                "P/replay ignored: stream {} is not one of this terminal's",
                r.stream
            ));
        }
        self.replays.try_send(r).map_err(|_| {
            format!(
                "P/replay ignored: {} replays are already waiting",
                crate::mqtt::delivery::REPLAYS_QUEUED
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95";

    #[test]
    fn acks_and_replays_are_taken_only_in_their_documented_shape() {
        let ack = parse_ack(format!(r#"{{"stream":"{S}","seq":42}}"#).as_bytes()).unwrap();
        assert_eq!(ack.seq, 42);
        for bad in [
            "".to_string(),
            "{}".to_string(),
            format!(r#"{{"stream":"{S}","seq":-1}}"#),
            format!(r#"{{"stream":"{S}","seq":"42"}}"#),
            format!(r#"{{"stream":"{S}","seq":42,"extra":1}}"#),
            r#"{"stream":"gate","seq":42}"#.to_string(),
            format!(r#"{{"stream":"{S}","seq":42}}{}"#, " ".repeat(MAX_PAYLOAD)),
        ] {
            assert!(parse_ack(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let r = parse_replay(format!(r#"{{"stream":"{S}","from_seq":3,"to_seq":9}}"#).as_bytes())
            .unwrap();
        assert_eq!((r.from_seq, r.to_seq), (3, 9));
        for bad in [
            format!(r#"{{"stream":"{S}","from_seq":9,"to_seq":3}}"#),
            format!(r#"{{"stream":"{S}","from_seq":0,"to_seq":3}}"#),
            format!(r#"{{"stream":"{S}","from_seq":1,"to_seq":18446744073709551615}}"#),
            format!(r#"{{"stream":"{S}","from_seq":1}}"#),
        ] {
            assert!(parse_replay(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
