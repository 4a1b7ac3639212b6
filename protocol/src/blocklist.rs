//! Blocklist updates, schema `id06d/blocklist-update/v1` (SPEC §7).

use crate::{CardStatus, CardUid};
use serde::{Deserialize, Serialize};

/// The schema name every v1 update carries.
pub const UPDATE_SCHEMA: &str = "id06d/blocklist-update/v1";

/// The largest update payload accepted, in bytes. A bigger change is a snapshot's job.
pub const MAX_UPDATE_BYTES: usize = 4 * 1024 * 1024;

/// One card set to a status by an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetEntry {
    /// The card.
    pub card_uid: CardUid,
    /// Its new status; `active` takes the card off the list.
    pub status: CardStatus,
}

/// An incremental blocklist update: applies only on top of `from_version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlocklistUpdate {
    /// Always [`UPDATE_SCHEMA`].
    pub schema: String,
    /// The version this update applies on top of.
    pub from_version: u64,
    /// The version after it.
    pub to_version: u64,
    /// Cards put on the list (or changed).
    #[serde(default)]
    pub set: Vec<SetEntry>,
    /// Cards taken off the list.
    #[serde(default)]
    pub clear: Vec<CardUid>,
    /// Base64 Ed25519 signature over the canonical payload, when keys are in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Why an update payload was refused before it was even looked at against the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// Larger than [`MAX_UPDATE_BYTES`].
    #[error("the update is {0} bytes; the most accepted is {MAX_UPDATE_BYTES}")]
    TooLarge(usize),
    /// Not valid JSON of the schema (bad UID, unknown status, unknown key, wrong type …).
    #[error("the update is malformed: {0}")]
    Malformed(String),
    /// A different schema.
    #[error("the update's schema is {0:?}, not {UPDATE_SCHEMA:?}")]
    WrongSchema(String),
    /// `to_version` does not follow `from_version`.
    #[error("the update goes from version {from} to {to}; it must move forward")]
    NotForward {
        /// from_version
        from: u64,
        /// to_version
        to: u64,
    },
    /// The same card appears twice.
    #[error("the update names card {0} more than once")]
    DuplicateCard(CardUid),
    /// `unlisted` is a result, never something to set.
    #[error("the update sets card {0} to \"unlisted\"; use \"clear\" to take a card off the list")]
    SetUnlisted(CardUid),
}

impl BlocklistUpdate {
    /// Parses and checks the payload on its own (not against the store).
    pub fn decode(bytes: &[u8]) -> Result<BlocklistUpdate, UpdateError> {
        if bytes.len() > MAX_UPDATE_BYTES {
            return Err(UpdateError::TooLarge(bytes.len()));
        }
        let update: BlocklistUpdate =
            serde_json::from_slice(bytes).map_err(|e| UpdateError::Malformed(e.to_string()))?;
        update.check()?;
        Ok(update)
    }

    /// The structural checks of [`BlocklistUpdate::decode`].
    pub fn check(&self) -> Result<(), UpdateError> {
        if self.schema != UPDATE_SCHEMA {
            return Err(UpdateError::WrongSchema(self.schema.clone()));
        }
        if self.to_version <= self.from_version {
            return Err(UpdateError::NotForward {
                from: self.from_version,
                to: self.to_version,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(self.set.len() + self.clear.len());
        for e in &self.set {
            if e.status == CardStatus::Unlisted {
                return Err(UpdateError::SetUnlisted(e.card_uid));
            }
            if !seen.insert(e.card_uid) {
                return Err(UpdateError::DuplicateCard(e.card_uid));
            }
        }
        for uid in &self.clear {
            if !seen.insert(*uid) {
                return Err(UpdateError::DuplicateCard(*uid));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_spec_example() {
        let text = r#"{"schema":"id06d/blocklist-update/v1","from_version":1206,"to_version":1207,
            "set":[{"card_uid":"04A1B2C3D4E5F6","status":"blocked"}],"clear":["0455AA10B2C3D4"]}"#;
        let u = BlocklistUpdate::decode(text.as_bytes()).unwrap();
        assert_eq!(u.to_version, 1207);
        assert_eq!(u.set[0].status, CardStatus::Blocked);
        assert_eq!(u.clear[0].to_string(), "0455AA10B2C3D4");
    }

    #[test]
    fn refuses_bad_updates_with_a_reason() {
        let base = |s: &str| {
            format!(
                r#"{{"schema":"id06d/blocklist-update/v1","from_version":1,"to_version":2,{s}}}"#
            )
        };
        let bad_uid = base(r#""set":[{"card_uid":"XYZ","status":"blocked"}]"#);
        assert!(matches!(
            BlocklistUpdate::decode(bad_uid.as_bytes()),
            Err(UpdateError::Malformed(_))
        ));
        let bad_status = base(r#""set":[{"card_uid":"04A1B2C3","status":"lost"}]"#);
        assert!(matches!(
            BlocklistUpdate::decode(bad_status.as_bytes()),
            Err(UpdateError::Malformed(_))
        ));
        let twice =
            base(r#""set":[{"card_uid":"04A1B2C3","status":"blocked"}],"clear":["04a1b2c3"]"#);
        assert!(matches!(
            BlocklistUpdate::decode(twice.as_bytes()),
            Err(UpdateError::DuplicateCard(_))
        ));
        let backwards = r#"{"schema":"id06d/blocklist-update/v1","from_version":5,"to_version":5}"#;
        assert!(matches!(
            BlocklistUpdate::decode(backwards.as_bytes()),
            Err(UpdateError::NotForward { .. })
        ));
        let huge = vec![b' '; MAX_UPDATE_BYTES + 1];
        assert!(matches!(
            BlocklistUpdate::decode(&huge),
            Err(UpdateError::TooLarge(_))
        ));
        assert!(BlocklistUpdate::decode(b"\xff\x00").is_err());
    }
}
