//! The redo record of a list write on its way into the database: a blocklist update's
//! changes, or a site list written whole (`site_list.rs`, generation 0).
//!
//! An update's per-card changes go into sled one insert at a time, not in one sled
//! transaction: sled 0.34 has a single lock for the whole process, which its transactions
//! and batches hold exclusively while they are applied, and the tap pipeline's writes to
//! the outbox would wait for all of a 50 000-card update (measured: up to 0.37 s;
//! `cargo bench -p id06d --bench retention`). What makes the update all-or-nothing instead
//! is this record: written and synced before the first change, it holds every change and
//! the version they lead to; the update is in force once one small batch has set the
//! version and removed the record. A start that finds the record writes its changes again
//! (they are idempotent) and finishes the update; a record made for another generation of
//! the list (a snapshot replaced the list since) is dropped.
//!
//! Layout: format (1 byte, [`FORMAT`]), generation, version, confirmation time (8 bytes
//! each, big-endian), count (4 bytes), then per change the UID's length (1 byte), the UID
//! and the stored code (1 byte), and a CRC-32 of everything before it (4 bytes).

use crate::storage::store::{flush_db, StoreError};
use id06_protocol::CardUid;
use std::path::Path;

/// The layout written by this version.
pub const FORMAT: u8 = 1;

const HEADER: usize = 1 + 8 + 8 + 8 + 4;

/// An update whose changes may be in the database only in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpdate {
    /// The list generation whose changes tree the update writes to.
    pub generation: u64,
    /// The version the update leads to.
    pub to_version: u64,
    /// When the list was confirmed by it (milliseconds since the epoch).
    pub confirmed_at: i64,
    /// The cards and their stored codes (a status code, or the "cleared" code), in the
    /// order they are written.
    pub changes: Vec<(CardUid, u8)>,
}

impl PendingUpdate {
    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.changes.len() * 9 + 4);
        out.push(FORMAT);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.to_version.to_be_bytes());
        out.extend_from_slice(&self.confirmed_at.to_be_bytes());
        out.extend_from_slice(&(self.changes.len() as u32).to_be_bytes());
        for (uid, code) in &self.changes {
            out.push(uid.len() as u8);
            out.extend_from_slice(uid.as_bytes());
            out.push(*code);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Reads a record back; what is wrong with it otherwise.
    pub fn decode(bytes: &[u8]) -> Result<PendingUpdate, String> {
        let body_len = bytes
            .len()
            .checked_sub(4)
            .filter(|n| *n >= HEADER)
            .ok_or_else(|| format!("{} bytes, too short for a record", bytes.len()))?;
        let (body, crc) = bytes.split_at(body_len);
        let crc = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != crc {
            return Err("its checksum does not match".into());
        }
        if body[0] != FORMAT {
            return Err(format!("format {} is not {FORMAT}", body[0]));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let count = u32::from_be_bytes([body[25], body[26], body[27], body[28]]) as usize;
        // Each change takes at least three bytes: a count larger than that is a lie.
        if count > (body.len() - HEADER) / 3 {
            return Err(format!(
                "{count} changes cannot fit in {} bytes",
                body.len()
            ));
        }
        let mut changes = Vec::with_capacity(count);
        let mut at = HEADER;
        for n in 0..count {
            let len = *body
                .get(at)
                .ok_or_else(|| format!("change {n} is cut off"))? as usize;
            let uid = body
                .get(at + 1..at + 1 + len)
                .ok_or_else(|| format!("change {n} is cut off"))?;
            let code = *body
                .get(at + 1 + len)
                .ok_or_else(|| format!("change {n} is cut off"))?;
            let uid = CardUid::from_bytes(uid).map_err(|e| format!("change {n}: {e}"))?;
            changes.push((uid, code));
            at += len + 2;
        }
        if at != body.len() {
            return Err(format!("{} bytes after the last change", body.len() - at));
        }
        Ok(PendingUpdate {
            generation: u64_at(1),
            to_version: u64_at(9),
            confirmed_at: u64_at(17) as i64,
            changes,
        })
    }
}

/// Stores `record` under `key` in `meta` and syncs it: nothing of the write it describes may
/// reach the disk before it.
pub(crate) fn begin(
    db: &sled::Db,
    dir: &Path,
    meta: &sled::Tree,
    key: &[u8],
    record: &PendingUpdate,
) -> Result<(), StoreError> {
    meta.insert(key, record.encode())
        .map_err(|e| StoreError::from_sled(dir, e))?;
    flush_db(db, dir)
}

/// Ends a write: the `values` (the list's version and time) set and the record under `key`
/// removed in one small batch, synced. With a record that could not be read, `values` is
/// the version 0 that says the list's contents are not known.
pub(crate) fn end(
    db: &sled::Db,
    dir: &Path,
    meta: &sled::Tree,
    key: &[u8],
    values: &[(&[u8], [u8; 8])],
) -> Result<(), StoreError> {
    let mut flip = sled::Batch::default();
    for (k, v) in values {
        flip.insert(*k, &v[..]);
    }
    flip.remove(key);
    meta.apply_batch(flip)
        .map_err(|e| StoreError::from_sled(dir, e))?;
    flush_db(db, dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> PendingUpdate {
        PendingUpdate {
            generation: 3,
            to_version: 1208,
            confirmed_at: 1_795_000_000_000,
            changes: vec![
                (CardUid::parse("04A1B2C3D4E5F6").unwrap(), 2),
                (CardUid::parse("04A1B2C3").unwrap(), 0xFF),
            ],
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let p = sample();
        assert_eq!(PendingUpdate::decode(&p.encode()), Ok(p));
    }

    #[test]
    fn a_damaged_or_cut_record_is_refused_with_the_reason() {
        let bytes = sample().encode();
        let mut flipped = bytes.clone();
        flipped[HEADER + 2] ^= 0x40;
        assert!(PendingUpdate::decode(&flipped)
            .unwrap_err()
            .contains("checksum"));
        assert!(PendingUpdate::decode(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .contains("checksum"));
        assert!(PendingUpdate::decode(&bytes[..10])
            .unwrap_err()
            .contains("too short"));
        // A well-formed checksum over a lying count.
        let mut lying = bytes[..bytes.len() - 4].to_vec();
        lying[25..29].copy_from_slice(&1000u32.to_be_bytes());
        let crc = crc32fast::hash(&lying);
        lying.extend_from_slice(&crc.to_be_bytes());
        assert!(PendingUpdate::decode(&lying)
            .unwrap_err()
            .contains("cannot fit"));
    }

    proptest! {
        #[test]
        fn any_record_round_trips(
            generation: u64,
            to_version: u64,
            confirmed_at: i64,
            changes in proptest::collection::vec(
                (prop_oneof![Just(4usize), Just(7), Just(10)], any::<[u8; 10]>(), any::<u8>()),
                0..50,
            ),
        ) {
            let changes = changes
                .into_iter()
                .map(|(len, b, code)| (CardUid::from_bytes(&b[..len]).unwrap(), code))
                .collect();
            let p = PendingUpdate { generation, to_version, confirmed_at, changes };
            prop_assert_eq!(PendingUpdate::decode(&p.encode()), Ok(p));
        }

        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PendingUpdate::decode(&bytes);
        }
    }
}
