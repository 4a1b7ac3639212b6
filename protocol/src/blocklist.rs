//! Blocklist updates (`id06d/blocklist-update/v1`, contract §7) and snapshots
//! (`id06d/blocklist-snapshot/v2`, defined here), with their canonical signing forms.
//!
//! # Updates
//!
//! An update applies only on top of `from_version` and moves the list to `to_version`.
//! An update with `to_version == from_version` and no changes is a *confirmation*: it keeps
//! the list fresh (its age restarts) without changing it.
//!
//! # Snapshots
//!
//! The newest full list is published retained, in parts, so that a gateway that starts
//! from nothing or is stuck behind a gap can catch up:
//!
//! - `{prefix}/blocklist/snapshot` holds the *manifest* (JSON, [`SnapshotManifest`]):
//!   version, number of cards and chunks, the SHA-256 of each chunk, signature.
//! - `{prefix}/blocklist/snapshot/{n}` (n = 0, 1, …) holds chunk n (binary, [`SnapshotChunk`]):
//!   `"ID6C"`, version (u64 BE), index (u32 BE), count (u32 BE), then `count` entries of
//!   UID length (u8), UID bytes, status code (u8; see `CardStatus::code`).
//!
//! A gateway takes a manifest newer than its list (checking its signature when keys are in
//! use), then collects its chunks: each is checked against the manifest's hash for its
//! index the moment it arrives and is kept on disk, so a bogus chunk is dropped at once and
//! holds no memory. Once every chunk is in and the card count matches, the list is
//! replaced. Chunks that the manifest does not name are ignored; a snapshot not newer than
//! the list in use is ignored. The producer publishes the chunks first and the manifest
//! last. (v1 manifests carried one SHA-256 over all chunks, which could only be checked once
//! every chunk had been held; they are no longer accepted.)
//!
//! # Signatures
//!
//! Ed25519 over a canonical text, UTF-8, one `key=value` line each ending in `\n`:
//!
//! ```text
//! id06d/blocklist-update/v1          id06d/blocklist-snapshot/v2
//! from_version=1206                  version=1207
//! to_version=1207                    cards=2000000
//! set=04A1B2C3D4E5F6:blocked         chunks=40
//! clear=0455AA10B2C3D4               chunk=0:<64 lower-case hex digits>
//!                                    chunk=1:<…>  (one line per chunk, in index order)
//! ```
//!
//! UIDs in canonical spelling, statuses in wire spelling, `set` and `clear` lines in the
//! order of the payload's arrays. The signature travels base64-encoded (standard alphabet,
//! with padding) in the payload's `signature` field.

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
    /// `to_version` does not follow `from_version` (equal is allowed only for a confirmation).
    #[error("the update goes from version {from} to {to}; it must move forward (or stay, with no changes, to confirm)")]
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
        let confirmation = self.to_version == self.from_version && self.is_empty();
        if self.to_version <= self.from_version && !confirmation {
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

    /// Whether the update changes no card.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.clear.is_empty()
    }

    /// Whether this is a confirmation of `from_version` (no change, same version).
    pub fn is_confirmation(&self) -> bool {
        self.to_version == self.from_version && self.is_empty()
    }

    /// The bytes a signature covers (see the module documentation).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        use std::fmt::Write;
        let mut s = String::with_capacity(64 + 32 * (self.set.len() + self.clear.len()));
        let _ = write!(
            s,
            "{UPDATE_SCHEMA}\nfrom_version={}\nto_version={}\n",
            self.from_version, self.to_version
        );
        for e in &self.set {
            let _ = writeln!(s, "set={}:{}", e.card_uid, e.status);
        }
        for uid in &self.clear {
            let _ = writeln!(s, "clear={uid}");
        }
        s.into_bytes()
    }
}

/// The schema name of a snapshot manifest.
pub const SNAPSHOT_SCHEMA: &str = "id06d/blocklist-snapshot/v2";

/// The magic at the start of every snapshot chunk.
pub const CHUNK_MAGIC: &[u8; 4] = b"ID6C";

/// Cards per chunk the producer writes (about 450 KB per chunk for 7-byte UIDs).
pub const CARDS_PER_CHUNK: usize = 50_000;

/// The most chunks a manifest may announce (50 million cards at the default chunk size).
pub const MAX_CHUNKS: u32 = 1000;

/// The largest manifest payload accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 128 * 1024;

/// The retained manifest of the newest full blocklist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    /// Always [`SNAPSHOT_SCHEMA`].
    pub schema: String,
    /// The list's version.
    pub version: u64,
    /// How many cards the chunks hold in all.
    pub cards: u64,
    /// How many chunks (topics `…/snapshot/0` … `…/snapshot/{chunks-1}`).
    pub chunks: u32,
    /// SHA-256 of each chunk's payload, in index order, lower-case hex.
    pub chunk_sha256: Vec<String>,
    /// Base64 Ed25519 signature over [`SnapshotManifest::canonical_bytes`], when keys are in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl SnapshotManifest {
    /// Parses and checks a manifest payload on its own.
    pub fn decode(bytes: &[u8]) -> Result<SnapshotManifest, UpdateError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(UpdateError::TooLarge(bytes.len()));
        }
        let m: SnapshotManifest =
            serde_json::from_slice(bytes).map_err(|e| UpdateError::Malformed(e.to_string()))?;
        if m.schema != SNAPSHOT_SCHEMA {
            return Err(UpdateError::WrongSchema(m.schema));
        }
        if m.chunks == 0 || m.chunks > MAX_CHUNKS {
            return Err(UpdateError::Malformed(format!(
                "a snapshot has 1 to {MAX_CHUNKS} chunks, not {}",
                m.chunks
            )));
        }
        if m.chunk_sha256.len() != m.chunks as usize {
            return Err(UpdateError::Malformed(format!(
                "{} chunk hashes for {} chunks",
                m.chunk_sha256.len(),
                m.chunks
            )));
        }
        if let Some(i) = m
            .chunk_sha256
            .iter()
            .position(|h| h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(UpdateError::Malformed(format!(
                "chunk_sha256[{i}] must be 64 hex digits"
            )));
        }
        if m.cards > u64::from(m.chunks) * CARDS_PER_CHUNK as u64 * 4 {
            return Err(UpdateError::Malformed(format!(
                "{} cards cannot be in {} chunks",
                m.cards, m.chunks
            )));
        }
        Ok(m)
    }

    /// Whether `chunk` is this manifest's chunk `index` (by its SHA-256).
    pub fn names_chunk(&self, index: u32, sha256_hex: &str) -> bool {
        self.chunk_sha256
            .get(index as usize)
            .is_some_and(|h| h.eq_ignore_ascii_case(sha256_hex))
    }

    /// The bytes a signature covers (see the module documentation).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        use std::fmt::Write;
        let mut s = format!(
            "{SNAPSHOT_SCHEMA}\nversion={}\ncards={}\nchunks={}\n",
            self.version, self.cards, self.chunks
        );
        for (i, h) in self.chunk_sha256.iter().enumerate() {
            let _ = writeln!(s, "chunk={i}:{}", h.to_ascii_lowercase());
        }
        s.into_bytes()
    }
}

/// One decoded snapshot chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The snapshot version it belongs to.
    pub version: u64,
    /// Its index.
    pub index: u32,
    /// Its cards.
    pub entries: Vec<(CardUid, CardStatus)>,
}

impl SnapshotChunk {
    /// Encodes a chunk.
    pub fn encode(version: u64, index: u32, entries: &[(CardUid, CardStatus)]) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + entries.len() * 9);
        out.extend_from_slice(CHUNK_MAGIC);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&index.to_be_bytes());
        out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for (uid, status) in entries {
            out.push(uid.len() as u8);
            out.extend_from_slice(uid.as_bytes());
            out.push(status.code());
        }
        out
    }

    /// The version and index from a chunk's header, without decoding the entries.
    pub fn peek(bytes: &[u8]) -> Result<(u64, u32), UpdateError> {
        if bytes.len() < 20 || &bytes[..4] != CHUNK_MAGIC {
            return Err(UpdateError::Malformed(
                "not a snapshot chunk (bad magic or too short)".into(),
            ));
        }
        let version = u64::from_be_bytes(bytes[4..12].try_into().unwrap_or_default());
        let index = u32::from_be_bytes(bytes[12..16].try_into().unwrap_or_default());
        Ok((version, index))
    }

    /// Whether a chunk's size fits the card count in its header (each card takes 6 to 12
    /// bytes): a cheap check that turns junk away before it is hashed.
    pub fn plausible(bytes: &[u8]) -> bool {
        if bytes.len() < 20 {
            return false;
        }
        let count = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]) as u64;
        let body = bytes.len() as u64 - 20;
        (count * 6..=count * 12).contains(&body)
    }

    /// Decodes a chunk; every malformation is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<SnapshotChunk, UpdateError> {
        let (version, index) = Self::peek(bytes)?;
        let count = u32::from_be_bytes(bytes[16..20].try_into().unwrap_or_default()) as usize;
        let bad = |m: String| UpdateError::Malformed(format!("chunk {index}: {m}"));
        if count > bytes.len() {
            return Err(bad(format!(
                "claims {count} cards in {} bytes",
                bytes.len()
            )));
        }
        let mut entries = Vec::with_capacity(count);
        let mut rest = &bytes[20..];
        for n in 0..count {
            let (&len, tail) = rest
                .split_first()
                .ok_or_else(|| bad(format!("ends inside card {n}")))?;
            let len = len as usize;
            if tail.len() < len + 1 {
                return Err(bad(format!("ends inside card {n}")));
            }
            let uid =
                CardUid::from_bytes(&tail[..len]).map_err(|e| bad(format!("card {n}: {e}")))?;
            let status = CardStatus::from_code(tail[len])
                .filter(|s| s.is_listed())
                .ok_or_else(|| {
                    bad(format!(
                        "card {n}: status code {} is not a listed status",
                        tail[len]
                    ))
                })?;
            entries.push((uid, status));
            rest = &tail[len + 1..];
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last card", rest.len())));
        }
        Ok(SnapshotChunk {
            version,
            index,
            entries,
        })
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
        let backwards = r#"{"schema":"id06d/blocklist-update/v1","from_version":5,"to_version":4}"#;
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

    #[test]
    fn an_empty_update_at_the_same_version_is_a_confirmation() {
        let ok = r#"{"schema":"id06d/blocklist-update/v1","from_version":5,"to_version":5}"#;
        assert!(BlocklistUpdate::decode(ok.as_bytes())
            .unwrap()
            .is_confirmation());
        let not_empty = r#"{"schema":"id06d/blocklist-update/v1","from_version":5,"to_version":5,"clear":["04A1B2C3"]}"#;
        assert!(matches!(
            BlocklistUpdate::decode(not_empty.as_bytes()),
            Err(UpdateError::NotForward { .. })
        ));
    }

    #[test]
    fn canonical_form_is_the_documented_text() {
        let text = r#"{"schema":"id06d/blocklist-update/v1","from_version":1206,"to_version":1207,
            "set":[{"card_uid":"04:a1:b2:c3:d4:e5:f6","status":"blocked"}],"clear":["0455AA10B2C3D4"]}"#;
        let u = BlocklistUpdate::decode(text.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(u.canonical_bytes()).unwrap(),
            "id06d/blocklist-update/v1\nfrom_version=1206\nto_version=1207\nset=04A1B2C3D4E5F6:blocked\nclear=0455AA10B2C3D4\n"
        );
    }

    #[test]
    fn chunks_round_trip_and_refuse_damage() {
        let entries = vec![
            (CardUid::parse("04A1B2C3").unwrap(), CardStatus::Blocked),
            (
                CardUid::parse("04A1B2C3D4E5F6").unwrap(),
                CardStatus::Produced,
            ),
            (
                CardUid::parse("04A1B2C3D4E5F60708A9").unwrap(),
                CardStatus::Terminated,
            ),
        ];
        let bytes = SnapshotChunk::encode(9, 2, &entries);
        let c = SnapshotChunk::decode(&bytes).unwrap();
        assert_eq!((c.version, c.index, c.entries), (9, 2, entries));
        for cut in 0..bytes.len() {
            assert!(
                SnapshotChunk::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() = CardStatus::Active.code();
        assert!(
            SnapshotChunk::decode(&bad).is_err(),
            "active is never listed"
        );
        let mut long = bytes.clone();
        long.push(0);
        assert!(SnapshotChunk::decode(&long).is_err());
        // The size check: a real chunk passes, junk of the wrong size does not.
        assert!(SnapshotChunk::plausible(&bytes));
        assert!(SnapshotChunk::plausible(&SnapshotChunk::encode(1, 0, &[])));
        let mut junk = SnapshotChunk::encode(1, 0, &[]);
        junk.resize(1 << 20, 0xEE);
        assert!(!SnapshotChunk::plausible(&junk));
        assert!(!SnapshotChunk::plausible(&bytes[..19]));
    }

    #[test]
    fn manifests_are_checked() {
        let good = r#"{"schema":"id06d/blocklist-snapshot/v2","version":3,"cards":10,"chunks":1,"chunk_sha256":["00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"]}"#;
        let m = SnapshotManifest::decode(good.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(m.canonical_bytes()).unwrap(),
            "id06d/blocklist-snapshot/v2\nversion=3\ncards=10\nchunks=1\nchunk=0:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n"
        );
        assert!(m.names_chunk(
            0,
            "00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff"
        ));
        assert!(!m.names_chunk(
            1,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
        ));
        for bad in [
            good.replace("\"chunks\":1", "\"chunks\":0"),
            good.replace("\"chunks\":1", "\"chunks\":2"),
            good.replace("0011", "zz11"),
            good.replace("snapshot/v2", "snapshot/v1"),
            good.replace("\"cards\":10", "\"cards\":1000000"),
        ] {
            assert!(SnapshotManifest::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn chunk_decoding_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut framed = b"ID6C".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = SnapshotChunk::decode(&framed);
            let _ = SnapshotChunk::decode(&bytes);
        }
    }
}
