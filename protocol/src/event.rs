//! The tap event, schema `id06d/event/v2` (docs/contract.md), and its timestamp.

use crate::{CardStatus, CardUid, Decision, DenyReason, Direction, StreamId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The schema name every event carries. v2 added `stream` and `decision_id` and made
/// `event_id` unique across sites, terminals and reinstalls.
pub const EVENT_SCHEMA: &str = "id06d/event/v2";

/// A point in time, UTC, with millisecond precision; on the wire as
/// RFC 3339 with milliseconds and `Z` (`2026-11-22T06:58:03.120Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcMillis(pub i64);

impl UtcMillis {
    /// Now, from the system clock.
    pub fn now() -> UtcMillis {
        UtcMillis(jiff::Timestamp::now().as_millisecond())
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// Parses RFC 3339 (any offset, any precision; truncated to milliseconds).
    pub fn parse(text: &str) -> Result<UtcMillis, String> {
        text.trim()
            .parse::<jiff::Timestamp>()
            .map(|t| UtcMillis(t.as_millisecond()))
            .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
    }

    /// As a jiff timestamp (for time-zone conversions).
    pub fn to_timestamp(self) -> jiff::Timestamp {
        jiff::Timestamp::from_millisecond(self.0).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }
}

impl fmt::Display for UtcMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3}", self.to_timestamp())
    }
}

impl Serialize for UtcMillis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UtcMillis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        UtcMillis::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Marker for the `schema` field: serialises as [`EVENT_SCHEMA`] and refuses anything else,
/// so a payload of another version is never mistaken for this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventSchema;

impl Serialize for EventSchema {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(EVENT_SCHEMA)
    }
}

impl<'de> Deserialize<'de> for EventSchema {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text == EVENT_SCHEMA {
            Ok(EventSchema)
        } else {
            Err(serde::de::Error::custom(format!(
                "schema {text:?} is not {EVENT_SCHEMA:?}"
            )))
        }
    }
}

/// One tap, as recorded in the outbox and published on `P/event` and `P/decision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Always [`EVENT_SCHEMA`].
    pub schema: EventSchema,
    /// `site_id:terminal_id:stream:seq` ([`Event::event_id_for`]); unique across sites,
    /// terminals and reinstalls; consumers de-duplicate redeliveries by it. A decision
    /// published before its tap could be stored (a full disk) has `seq` 0 and an id ending
    /// in `unstored-` and 16 hex digits ([`Event::unstored_id_for`]).
    pub event_id: String,
    /// The stream the tap was recorded in (one per data directory, see [`StreamId`]).
    pub stream: StreamId,
    /// Within `stream`, from 1, without gaps, never reused; 0 on a decision whose tap is not
    /// stored yet.
    pub seq: u64,
    /// The `event_id` under which this tap's decision went out on `P/decision`: the same as
    /// `event_id`, except for a tap decided while the disk was full, whose decision went out
    /// with an `unstored-…` id before the event could be stored.
    pub decision_id: String,
    /// The construction site's identifier in the ledger.
    pub site_id: String,
    /// The gateway's identifier.
    pub terminal_id: String,
    /// The configured reader name.
    pub reader: String,
    /// `in` or `out` (a `toggle` reader's taps resolve to one of these).
    pub direction: Direction,
    /// The card.
    pub card_uid: CardUid,
    /// The card's status from the local blocklist (`unlisted` when not on it).
    pub card_status: CardStatus,
    /// Granted or denied.
    pub decision: Decision,
    /// Why it was denied; `null` when granted.
    pub reason: Option<DenyReason>,
    /// The version of the blocklist the decision was made with.
    pub blocklist_version: u64,
    /// Whether the list was older than `max_age_hours`.
    pub blocklist_stale: bool,
    /// When the card was presented.
    pub occurred_at: UtcMillis,
    /// False when the system clock was not known to be synchronised.
    pub clock_synced: bool,
}

impl Event {
    /// The event id of `seq` in `stream` at a site's terminal: `site:terminal:stream:seq`.
    /// Site and terminal ids never contain `:` (the configuration refuses it).
    pub fn event_id_for(site_id: &str, terminal_id: &str, stream: &StreamId, seq: u64) -> String {
        format!("{site_id}:{terminal_id}:{stream}:{seq}")
    }

    /// The id of a decision published before its tap could be stored:
    /// `site:terminal:stream:unstored-NNNNNNNNNNNNNNNN` (`nonce` random, 16 hex digits). It
    /// can never equal a stored event's id, whose last part is a decimal number.
    pub fn unstored_id_for(
        site_id: &str,
        terminal_id: &str,
        stream: &StreamId,
        nonce: u64,
    ) -> String {
        format!("{site_id}:{terminal_id}:{stream}:unstored-{nonce:016x}")
    }

    /// Encodes to the JSON published on the wire.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a JSON event; any deviation from the schema is an error.
    pub fn from_json(bytes: &[u8]) -> Result<Event, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95";

    fn sample() -> Event {
        let stream: StreamId = STREAM.parse().unwrap();
        let id = Event::event_id_for("SE-0001", "gate-north-1", &stream, 42);
        Event {
            schema: EventSchema,
            event_id: id.clone(),
            stream,
            seq: 42,
            decision_id: id,
            site_id: "SE-0001".into(),
            terminal_id: "gate-north-1".into(),
            reader: "entry".into(),
            direction: Direction::In,
            card_uid: CardUid::parse("04A1B2C3D4E5F6").unwrap(),
            card_status: CardStatus::Unlisted,
            decision: Decision::Granted,
            reason: None,
            blocklist_version: 1207,
            blocklist_stale: false,
            occurred_at: UtcMillis::parse("2026-11-22T06:58:03.120Z").unwrap(),
            clock_synced: true,
        }
    }

    #[test]
    fn encodes_exactly_the_documented_example() {
        let documented = r#"{
          "schema": "id06d/event/v2",
          "event_id": "SE-0001:gate-north-1:0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95:42",
          "stream": "0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95", "seq": 42,
          "decision_id": "SE-0001:gate-north-1:0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95:42",
          "site_id": "SE-0001", "terminal_id": "gate-north-1", "reader": "entry",
          "direction": "in", "card_uid": "04A1B2C3D4E5F6", "card_status": "unlisted",
          "decision": "granted", "reason": null, "blocklist_version": 1207,
          "blocklist_stale": false, "occurred_at": "2026-11-22T06:58:03.120Z",
          "clock_synced": true }"#;
        let ours: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(documented).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(Event::from_json(&sample().to_json()).unwrap(), sample());
    }

    #[test]
    fn ids_differ_by_site_terminal_stream_and_seq_and_unstored_ids_never_look_stored() {
        let a: StreamId = STREAM.parse().unwrap();
        let b = StreamId::from_random([7; 16]);
        let ids = [
            Event::event_id_for("S1", "t1", &a, 1),
            Event::event_id_for("S2", "t1", &a, 1),
            Event::event_id_for("S1", "t2", &a, 1),
            Event::event_id_for("S1", "t1", &b, 1),
            Event::event_id_for("S1", "t1", &a, 2),
            Event::unstored_id_for("S1", "t1", &a, 1),
        ];
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        let unstored = Event::unstored_id_for("S1", "t1", &a, 0xabc);
        assert!(
            unstored.ends_with(":unstored-0000000000000abc"),
            "{unstored}"
        );
        let last = unstored.rsplit(':').next().unwrap();
        assert!(last.parse::<u64>().is_err());
    }

    #[test]
    fn denied_event_carries_snake_case_reason() {
        let mut e = sample();
        e.decision = Decision::Denied;
        e.card_status = CardStatus::Produced;
        e.reason = Some(DenyReason::NotActivated);
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["reason"], "not_activated");
        assert_eq!(v["card_status"], "produced");
        assert_eq!(v["decision"], "denied");
    }

    #[test]
    fn timestamps_always_have_milliseconds_and_z() {
        assert_eq!(UtcMillis(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            UtcMillis::parse("2026-11-22T07:58:03.1+01:00")
                .unwrap()
                .to_string(),
            "2026-11-22T06:58:03.100Z"
        );
        assert!(UtcMillis::parse("yesterday").is_err());
    }

    #[test]
    fn refuses_other_schemas_and_unknown_fields() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["schema"] = "id06d/event/v1".into();
        assert!(Event::from_json(v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["name"] = "Anna".into();
        assert!(Event::from_json(v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["stream"] = "gate-north-1".into();
        assert!(Event::from_json(v.to_string().as_bytes()).is_err());
    }
}
