//! Retained state payloads: the gateway's `P/status` and each reader's `P/reader/{name}`.

use serde::{Deserialize, Serialize};

/// `P/status` while the gateway runs.
///
/// The last will (and a clean shutdown) publish [`GatewayStatus::offline_payload`] instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// True while the gateway runs.
    pub online: bool,
    /// The id06d version.
    pub version: String,
    /// When this process started (RFC 3339, UTC).
    pub started_at: crate::UtcMillis,
    /// The stream new taps are recorded in (see [`crate::StreamId`]).
    pub stream: crate::StreamId,
    /// The highest `seq` recorded in `stream` (0 before its first tap).
    pub last_seq: u64,
    /// The blocklist version in use.
    pub blocklist_version: u64,
    /// Seconds since the blocklist was last confirmed; `null` when it never was.
    pub blocklist_age_s: Option<u64>,
    /// Events recorded but not yet acknowledged by the broker.
    pub outbox_depth: u64,
    /// With `[ledger] confirm = true`: the seq of `stream` up to which the ledger confirmed
    /// it stored every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_confirmed_seq: Option<u64>,
    /// With `[ledger] confirm = true`: events (of any stream) the ledger has not confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_unconfirmed: Option<u64>,
    /// Whether the system clock is known to be synchronised.
    pub clock_synced: bool,
    /// Whether the blocklist is older than `max_age_hours`.
    #[serde(default)]
    pub blocklist_stale: bool,
    /// A blocklist update arrived whose `from_version` is ahead of ours: `[the version in
    /// force, that update's from_version]`; cleared by the update or snapshot that closes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocklist_gap: Option<[u64; 2]>,
    /// The last failure to store an event durably (a full or broken disk), while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_error: Option<String>,
    /// Taps an earlier run lost: it stopped while they waited for a full disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_loss: Option<String>,
}

impl GatewayStatus {
    /// The payload of the last will: `{"online":false}`.
    pub fn offline_payload() -> Vec<u8> {
        br#"{"online":false}"#.to_vec()
    }
}

/// A reader's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaderState {
    /// Answering.
    Ok,
    /// Not connected (unplugged, not found, or not yet seen).
    Absent,
    /// Stopped answering; the driver is recovering it.
    Recovering,
    /// Gave up: needs an operator (for example a device that is not a reader).
    Failed,
}

/// What the terminal should tell the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hint {
    /// The card is being waved or read badly: hold it still on the reader.
    HoldSteady,
}

/// `P/reader/{name}`, retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderStatus {
    /// Health.
    pub state: ReaderState,
    /// `hold_steady` while the card is being waved.
    pub hint: Option<Hint>,
    /// The most recent error the driver reported, if any.
    pub last_error: Option<String>,
    /// How many times the driver brought the reader back since start.
    pub recoveries: u64,
    /// What the driver knows about the device (firmware, reader name), when it knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_status_has_the_spec_fields() {
        let s = ReaderStatus {
            state: ReaderState::Recovering,
            hint: Some(Hint::HoldSteady),
            last_error: Some("no answer".into()),
            recoveries: 3,
            device: None,
        };
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "recovering");
        assert_eq!(v["hint"], "hold_steady");
        assert_eq!(v["last_error"], "no answer");
        assert_eq!(v["recoveries"], 3);
        assert!(v.get("device").is_none());
    }

    #[test]
    fn offline_payload_is_the_spec_last_will() {
        let v: serde_json::Value =
            serde_json::from_slice(&GatewayStatus::offline_payload()).unwrap();
        assert_eq!(v, serde_json::json!({"online": false}));
    }
}
