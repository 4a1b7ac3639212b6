//! Keeping the blocklist current from MQTT: updates on `{prefix}/blocklist/update`, the
//! retained snapshot on `{prefix}/blocklist/snapshot` and `…/snapshot/{n}`.
//!
//! Design: the MQTT task forwards raw payloads here and goes on; this task checks them
//! (shape, signature, version), applies them through [`Blocklist`] on a blocking thread, and
//! reports what happened in the log, the counters and `P/status` (the gap). Snapshot chunks
//! are collected by [`SnapshotAssembler`], a pure state machine.

use crate::blocklist::{Blocklist, Rejection};
use crate::shared::{Counters, Shared};
use crate::signing::verify;
use ed25519_dalek::VerifyingKey;
use id06_protocol::{
    BlocklistUpdate, CardStatus, CardUid, SnapshotChunk, SnapshotManifest, UpdateError, UtcMillis,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A payload from the broker.
#[derive(Debug)]
pub enum Incoming {
    /// From `{prefix}/blocklist/update`.
    Update(Vec<u8>),
    /// From `{prefix}/blocklist/snapshot`.
    Manifest(Vec<u8>),
    /// From `{prefix}/blocklist/snapshot/{n}`.
    Chunk(Vec<u8>),
}

/// The most chunk bytes held while a snapshot is being collected.
const MAX_BUFFERED: usize = 512 * 1024 * 1024;

/// Collects a snapshot's chunks until the manifest's set is complete.
#[derive(Debug, Default)]
pub struct SnapshotAssembler {
    manifest: Option<SnapshotManifest>,
    /// Chunks of the version being collected, by index.
    chunks: BTreeMap<u32, Vec<u8>>,
    /// The version `chunks` belong to.
    chunks_version: Option<u64>,
    buffered: usize,
}

/// A complete, verified snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its version.
    pub version: u64,
    /// Its cards.
    pub entries: Vec<(CardUid, CardStatus)>,
}

impl SnapshotAssembler {
    /// Takes a manifest. Manifests not newer than `have` are ignored.
    pub fn manifest(&mut self, m: SnapshotManifest, have: u64) {
        if m.version <= have {
            return;
        }
        if self.chunks_version != Some(m.version) {
            self.chunks.clear();
            self.buffered = 0;
            self.chunks_version = Some(m.version);
        }
        self.manifest = Some(m);
    }

    /// Takes a chunk. Chunks of versions not newer than `have`, or older than the one
    /// being collected, are ignored.
    pub fn chunk(&mut self, bytes: Vec<u8>, have: u64) -> Result<(), UpdateError> {
        let (version, index) = SnapshotChunk::peek(&bytes)?;
        if version <= have {
            return Ok(());
        }
        match self.chunks_version {
            Some(v) if version < v => return Ok(()),
            Some(v) if version == v => {}
            _ => {
                // A newer snapshot is arriving: start over for it.
                self.chunks.clear();
                self.buffered = 0;
                self.chunks_version = Some(version);
                if self.manifest.as_ref().is_some_and(|m| m.version != version) {
                    self.manifest = None;
                }
            }
        }
        if self.buffered + bytes.len() > MAX_BUFFERED {
            return Err(UpdateError::TooLarge(self.buffered + bytes.len()));
        }
        self.buffered += bytes.len();
        if let Some(old) = self.chunks.insert(index, bytes) {
            self.buffered -= old.len();
        }
        Ok(())
    }

    /// The snapshot, once the manifest and all its chunks are here and check out. On a
    /// failed check the collected chunks are dropped (they will be sent again only as a new
    /// snapshot) and the error says why.
    pub fn take_complete(
        &mut self,
        key: Option<&VerifyingKey>,
    ) -> Option<Result<Snapshot, String>> {
        let m = self.manifest.as_ref()?;
        if self.chunks_version != Some(m.version) || self.chunks.len() < m.chunks as usize {
            return None;
        }
        if (0..m.chunks).any(|i| !self.chunks.contains_key(&i)) {
            return None;
        }
        let m = self.manifest.take()?;
        let chunks = std::mem::take(&mut self.chunks);
        self.buffered = 0;
        self.chunks_version = None;
        Some(Self::verify(&m, &chunks, key))
    }

    fn verify(
        m: &SnapshotManifest,
        chunks: &BTreeMap<u32, Vec<u8>>,
        key: Option<&VerifyingKey>,
    ) -> Result<Snapshot, String> {
        if let Some(key) = key {
            verify(key, &m.canonical_bytes(), m.signature.as_deref())?;
        }
        let mut hasher = Sha256::new();
        for i in 0..m.chunks {
            if let Some(c) = chunks.get(&i) {
                hasher.update(c);
            }
        }
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if digest != m.sha256.to_ascii_lowercase() {
            return Err(format!(
                "its chunks do not match the manifest's sha256 (got {digest})"
            ));
        }
        let mut entries = Vec::with_capacity(m.cards.min(50_000_000) as usize);
        for i in 0..m.chunks {
            let Some(bytes) = chunks.get(&i) else {
                return Err(format!("chunk {i} is missing"));
            };
            let c = SnapshotChunk::decode(bytes).map_err(|e| e.to_string())?;
            entries.extend(c.entries);
        }
        if entries.len() as u64 != m.cards {
            return Err(format!(
                "the manifest announces {} cards but the chunks hold {}",
                m.cards,
                entries.len()
            ));
        }
        Ok(Snapshot {
            version: m.version,
            entries,
        })
    }
}

/// The task.
pub struct BlocklistSync {
    /// The list.
    pub blocklist: Blocklist,
    /// When set, updates and snapshots must be signed with it.
    pub public_key: Option<VerifyingKey>,
    /// Counters, gap, status wake-up.
    pub shared: Arc<Shared>,
}

impl BlocklistSync {
    /// Runs until the channel closes.
    pub async fn run(self, mut rx: mpsc::Receiver<Incoming>) {
        let mut assembler = SnapshotAssembler::default();
        while let Some(input) = rx.recv().await {
            let have = self.blocklist.index().version;
            match input {
                Incoming::Update(bytes) => self.update(bytes).await,
                Incoming::Manifest(bytes) => match SnapshotManifest::decode(&bytes) {
                    Ok(m) => {
                        if m.version <= have {
                            tracing::debug!(
                                version = m.version,
                                have,
                                "snapshot not newer than the list in force; ignored"
                            );
                        }
                        assembler.manifest(m, have);
                    }
                    Err(e) => self.rejected(format!("blocklist snapshot manifest rejected: {e}")),
                },
                Incoming::Chunk(bytes) => {
                    if let Err(e) = assembler.chunk(bytes, have) {
                        self.rejected(format!("blocklist snapshot chunk rejected: {e}"));
                    }
                }
            }
            if let Some(result) = assembler.take_complete(self.public_key.as_ref()) {
                match result {
                    Ok(snapshot) => self.snapshot(snapshot).await,
                    Err(e) => self.rejected(format!("blocklist snapshot rejected: {e}")),
                }
            }
        }
    }

    fn rejected(&self, message: String) {
        Counters::bump(&self.shared.counters.blocklist_rejected);
        tracing::warn!("{message}; the list in force stays");
    }

    fn set_gap(&self, gap: Option<[u64; 2]>) {
        if let Ok(mut g) = self.shared.blocklist_gap.lock() {
            *g = gap;
        }
        self.shared.status_changed();
    }

    /// Clears the gap once the version in force reaches the missing update's start.
    fn maybe_close_gap(&self, version: u64) {
        let close = self
            .shared
            .blocklist_gap
            .lock()
            .map(|g| g.is_some_and(|[_, from]| version >= from))
            .unwrap_or(false);
        if close {
            tracing::info!(version, "the blocklist gap is closed");
            self.set_gap(None);
        } else {
            self.shared.status_changed();
        }
    }

    async fn update(&self, bytes: Vec<u8>) {
        let update = match BlocklistUpdate::decode(&bytes) {
            Ok(u) => u,
            Err(e) => return self.rejected(format!("blocklist update rejected: {e}")),
        };
        if let Some(key) = &self.public_key {
            if let Err(e) = verify(key, &update.canonical_bytes(), update.signature.as_deref()) {
                return self.rejected(format!(
                    "blocklist update {}→{} rejected: {e}",
                    update.from_version, update.to_version
                ));
            }
        }
        let bl = self.blocklist.clone();
        let (from, to, changes) = (
            update.from_version,
            update.to_version,
            update.set.len() + update.clear.len(),
        );
        let result =
            tokio::task::spawn_blocking(move || bl.apply_update(&update, UtcMillis::now())).await;
        match result {
            Ok(Ok(version)) => {
                Counters::bump(&self.shared.counters.blocklist_applied);
                if from == to {
                    tracing::info!(version, "blocklist version confirmed");
                } else {
                    tracing::info!(from, to, changes, "blocklist update applied");
                }
                self.maybe_close_gap(version);
            }
            Ok(Err(r)) => {
                if let Rejection::Gap { have, from } = r {
                    self.set_gap(Some([have, from]));
                }
                self.rejected(format!("blocklist update {from}→{to} rejected: {r}"));
            }
            Err(e) => self.rejected(format!("blocklist update {from}→{to} failed: {e}")),
        }
    }

    async fn snapshot(&self, snapshot: Snapshot) {
        let bl = self.blocklist.clone();
        let version = snapshot.version;
        let cards = snapshot.entries.len();
        let result = tokio::task::spawn_blocking(move || {
            bl.apply_snapshot(snapshot.version, &snapshot.entries, UtcMillis::now())
        })
        .await;
        match result {
            Ok(Ok(true)) => {
                Counters::bump(&self.shared.counters.blocklist_applied);
                tracing::info!(version, cards, "blocklist snapshot applied");
                self.maybe_close_gap(version);
            }
            Ok(Ok(false)) => tracing::debug!(version, "snapshot not newer than the list in force"),
            Ok(Err(e)) => self.rejected(format!(
                "blocklist snapshot {version} could not be stored: {e}"
            )),
            Err(e) => self.rejected(format!("blocklist snapshot {version} failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{generate_key, sign};

    fn uid(n: u32) -> CardUid {
        CardUid::from_bytes(&[4, 0xA1, 0, 0, (n >> 16) as u8, (n >> 8) as u8, n as u8]).unwrap()
    }

    /// Chunks and a manifest for `n` cards, as the producer makes them.
    fn produce(version: u64, n: u32, per_chunk: usize) -> (SnapshotManifest, Vec<Vec<u8>>) {
        let entries: Vec<_> = (0..n).map(|i| (uid(i), CardStatus::Blocked)).collect();
        let chunks: Vec<Vec<u8>> = entries
            .chunks(per_chunk)
            .enumerate()
            .map(|(i, c)| SnapshotChunk::encode(version, i as u32, c))
            .collect();
        let mut h = Sha256::new();
        for c in &chunks {
            h.update(c);
        }
        let m = SnapshotManifest {
            schema: id06_protocol::SNAPSHOT_SCHEMA.into(),
            version,
            cards: n as u64,
            chunks: chunks.len() as u32,
            sha256: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            signature: None,
        };
        (m, chunks)
    }

    #[test]
    fn assembles_in_any_order_and_only_when_complete() {
        let (m, chunks) = produce(7, 25, 10);
        let mut a = SnapshotAssembler::default();
        a.chunk(chunks[2].clone(), 0).unwrap();
        assert!(a.take_complete(None).is_none(), "no manifest yet");
        a.manifest(m, 0);
        a.chunk(chunks[0].clone(), 0).unwrap();
        assert!(a.take_complete(None).is_none(), "chunk 1 missing");
        a.chunk(chunks[1].clone(), 0).unwrap();
        let s = a.take_complete(None).unwrap().unwrap();
        assert_eq!((s.version, s.entries.len()), (7, 25));
    }

    #[test]
    fn a_damaged_chunk_or_a_wrong_count_is_refused() {
        let (m, mut chunks) = produce(7, 5, 10);
        let last = chunks[0].len() - 1;
        chunks[0][last] = CardStatus::Suspended.code();
        let mut a = SnapshotAssembler::default();
        a.manifest(m.clone(), 0);
        a.chunk(chunks[0].clone(), 0).unwrap();
        assert!(a
            .take_complete(None)
            .unwrap()
            .unwrap_err()
            .contains("sha256"));
        let (mut m2, chunks2) = produce(8, 5, 10);
        m2.cards = 6;
        a.manifest(m2, 0);
        a.chunk(chunks2[0].clone(), 0).unwrap();
        assert!(a
            .take_complete(None)
            .unwrap()
            .unwrap_err()
            .contains("announces 6"));
    }

    #[test]
    fn old_snapshots_and_stale_chunks_are_ignored() {
        let (m, chunks) = produce(3, 5, 10);
        let mut a = SnapshotAssembler::default();
        a.manifest(m, 3);
        a.chunk(chunks[0].clone(), 3).unwrap();
        assert!(
            a.take_complete(None).is_none(),
            "version 3 is not newer than 3"
        );
        // Chunks of an older snapshot left retained do not disturb a newer one.
        let (m5, chunks5) = produce(5, 5, 10);
        let (_, chunks4) = produce(4, 5, 10);
        a.manifest(m5, 0);
        a.chunk(chunks4[0].clone(), 0).unwrap();
        assert!(a.take_complete(None).is_none());
        a.chunk(chunks5[0].clone(), 0).unwrap();
        assert_eq!(a.take_complete(None).unwrap().unwrap().version, 5);
    }

    #[test]
    fn a_signed_snapshot_needs_the_right_signature() {
        let key = generate_key().unwrap();
        let (mut m, chunks) = produce(9, 5, 10);
        let mut a = SnapshotAssembler::default();
        a.manifest(m.clone(), 0);
        a.chunk(chunks[0].clone(), 0).unwrap();
        let err = a
            .take_complete(Some(&key.verifying_key()))
            .unwrap()
            .unwrap_err();
        assert!(err.contains("no signature"), "{err}");
        m.signature = Some(sign(&key, &m.canonical_bytes()));
        a.manifest(m, 0);
        a.chunk(chunks[0].clone(), 0).unwrap();
        assert!(a.take_complete(Some(&key.verifying_key())).unwrap().is_ok());
    }
}
