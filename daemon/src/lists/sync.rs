//! Keeping the blocklist current from MQTT: updates on `{prefix}/blocklist/update`, the
//! retained snapshot on `{prefix}/blocklist/snapshot` and `…/snapshot/{n}`.
//!
//! Design: the list session ([`crate::mqtt::list_session`]) hands each message here and
//! acknowledges it to the broker only once [`BlocklistSync::handle`] returns, so a message
//! is either applied, rejected with a log line, or delivered again after a restart; never
//! dropped after the broker has been told it arrived. Messages are handled one at a time,
//! in order; a burst waits at the broker, not in memory.
//!
//! A snapshot is taken in two steps. A manifest newer than the list in force, correctly
//! signed when a key is configured, becomes the *pending* snapshot: it is written to
//! `snapshot.staging/` in the data directory and the session subscribes to the chunk topics.
//! Each chunk is checked against the manifest's SHA-256 for its index the moment it arrives
//! and written to the staging folder; anything else is dropped at once (so a bogus chunk of
//! any size or version holds neither memory nor the real snapshot back). When every chunk is
//! there, the list is replaced from the files and the staging folder is emptied. Memory
//! held for an incomplete snapshot is one chunk.

use crate::lists::blocklist::{Blocklist, Rejection, WholeError};
use crate::lists::signing::verify;
use crate::shared::{Counters, Shared};
use ed25519_dalek::VerifyingKey;
use id06_protocol::{
    BlocklistUpdate, CardStatus, CardUid, SnapshotChunk, SnapshotManifest, UtcMillis,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The staging folder's name in the data directory.
pub const STAGING_DIR: &str = "snapshot.staging";

/// The pending snapshot's files: `manifest.json` and `chunk-NNNNN`.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// The staging folder in `data_dir` (created when first used).
    pub fn new(data_dir: &Path) -> Staging {
        Staging {
            dir: data_dir.join(STAGING_DIR),
        }
    }

    fn chunk_path(&self, index: u32) -> PathBuf {
        self.dir.join(format!("chunk-{index:05}"))
    }

    /// The pending manifest, if one is staged (and readable).
    pub fn manifest(&self) -> Option<SnapshotManifest> {
        let bytes = std::fs::read(self.dir.join("manifest.json")).ok()?;
        SnapshotManifest::decode(&bytes).ok()
    }

    /// Starts collecting `m` (what was staged before is removed).
    pub fn start(&self, m: &SnapshotManifest) -> std::io::Result<()> {
        self.clear()?;
        std::fs::create_dir_all(&self.dir)?;
        let bytes = serde_json::to_vec(m).map_err(std::io::Error::other)?;
        std::fs::write(self.dir.join("manifest.json"), bytes)
    }

    /// Keeps chunk `index` (already checked against the manifest).
    pub fn put(&self, index: u32, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".chunk-{index:05}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, self.chunk_path(index))
    }

    /// Whether chunk `index` is staged.
    pub fn has(&self, index: u32) -> bool {
        self.chunk_path(index).exists()
    }

    /// The indexes still missing for `m`.
    pub fn missing(&self, m: &SnapshotManifest) -> Vec<u32> {
        (0..m.chunks).filter(|i| !self.has(*i)).collect()
    }

    /// The size of staged chunk `index` on disk (0 when it is not there).
    pub fn size(&self, index: u32) -> u64 {
        std::fs::metadata(self.chunk_path(index)).map_or(0, |m| m.len())
    }

    /// Chunk `index` as staged.
    pub fn read(&self, index: u32) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.chunk_path(index))
    }

    /// Removes everything staged.
    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Log lines about rejected messages, at most [`Quiet::PER_MINUTE`] a minute; the rest are
/// counted and summed up in one line when the minute is over (a flood of garbage must not
/// flood the journal).
#[derive(Debug)]
pub(crate) struct Quiet {
    window: Instant,
    said: u32,
    held_back: u64,
}

impl Quiet {
    const PER_MINUTE: u32 = 20;

    pub(crate) fn new() -> Quiet {
        Quiet {
            window: Instant::now(),
            said: 0,
            held_back: 0,
        }
    }

    pub(crate) fn warn(&mut self, line: &str) {
        if self.window.elapsed() >= Duration::from_secs(60) {
            if self.held_back > 0 {
                tracing::warn!(
                    "{} more blocklist messages were rejected in the last minute (not logged one by one)",
                    self.held_back
                );
            }
            self.window = Instant::now();
            self.said = 0;
            self.held_back = 0;
        }
        if self.said < Self::PER_MINUTE {
            self.said += 1;
            tracing::warn!("{line}");
        } else {
            self.held_back += 1;
        }
    }
}

/// Takes blocklist messages one at a time.
pub struct BlocklistSync {
    /// The list.
    pub blocklist: Blocklist,
    /// When set, updates and snapshots must be signed with it.
    pub public_key: Option<VerifyingKey>,
    /// Counters, gap, status wake-up.
    pub shared: Arc<Shared>,
    staging: Staging,
    /// The snapshot being collected (its manifest is also in the staging folder, so that a
    /// restart goes on collecting it).
    pending: Option<SnapshotManifest>,
    quiet: Quiet,
    /// The last snapshot version said to be not newer (said once per version).
    said_not_newer: Option<u64>,
}

impl BlocklistSync {
    /// The task's state, with the staging folder in `data_dir`.
    pub fn new(
        blocklist: Blocklist,
        public_key: Option<VerifyingKey>,
        shared: Arc<Shared>,
        data_dir: &Path,
    ) -> BlocklistSync {
        let staging = Staging::new(data_dir);
        let pending = staging.manifest();
        BlocklistSync {
            blocklist,
            public_key,
            shared,
            staging,
            pending,
            quiet: Quiet::new(),
            said_not_newer: None,
        }
    }

    /// Whether a snapshot is pending (the session should receive the chunk topics).
    pub fn wants_chunks(&mut self) -> bool {
        match &self.pending {
            Some(m) if m.version > self.blocklist.index().version => true,
            Some(_) => {
                // The list moved past it (updates): it is of no use any more.
                self.pending = None;
                let _ = self.staging.clear();
                false
            }
            None => false,
        }
    }

    /// Handles one message completely (applied, or refused with a log line).
    pub async fn handle(&mut self, input: Incoming) {
        match input {
            Incoming::Update(bytes) => self.update(bytes).await,
            Incoming::Manifest(bytes) => self.manifest(&bytes),
            Incoming::Chunk(bytes) => self.chunk(&bytes).await,
        }
    }

    fn rejected(&mut self, message: String) {
        Counters::bump(&self.shared.counters.blocklist_rejected);
        self.quiet
            .warn(&format!("{message}; the list in force stays"));
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

    async fn update(&mut self, bytes: Vec<u8>) {
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

    fn manifest(&mut self, bytes: &[u8]) {
        let m = match SnapshotManifest::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                return self.rejected(format!("blocklist snapshot rejected: its manifest: {e}"))
            }
        };
        let have = self.blocklist.index().version;
        if m.version <= have {
            if self.said_not_newer != Some(m.version) {
                self.said_not_newer = Some(m.version);
                tracing::info!(
                    version = m.version,
                    have,
                    "blocklist snapshot not newer than the list in force; ignored"
                );
            }
            return;
        }
        if let Some(key) = &self.public_key {
            if let Err(e) = verify(key, &m.canonical_bytes(), m.signature.as_deref()) {
                return self.rejected(format!(
                    "blocklist snapshot rejected: the manifest of version {}: {e}",
                    m.version
                ));
            }
        }
        if let Some(pending) = &self.pending {
            if *pending == m {
                return; // the same one again (a reconnect)
            }
            if pending.version > m.version {
                tracing::info!(
                    version = m.version,
                    pending = pending.version,
                    "blocklist snapshot older than the one being collected; ignored"
                );
                return;
            }
        }
        if let Err(e) = self.staging.start(&m) {
            return self.rejected(format!(
                "blocklist snapshot {} cannot be collected: {e}",
                m.version
            ));
        }
        self.pending = Some(m.clone());
        tracing::info!(
            version = m.version,
            cards = m.cards,
            chunks = m.chunks,
            "collecting blocklist snapshot"
        );
    }

    async fn chunk(&mut self, bytes: &[u8]) {
        let Some(m) = self.pending.clone() else {
            // Not collecting (the session unsubscribes; these are stragglers).
            tracing::debug!(
                bytes = bytes.len(),
                "blocklist snapshot chunk while no snapshot is pending; ignored"
            );
            return;
        };
        let (version, index) = match SnapshotChunk::peek(bytes) {
            Ok(vi) => vi,
            Err(e) => {
                return self.rejected(format!("blocklist snapshot chunk rejected: {e}"));
            }
        };
        if !SnapshotChunk::plausible(bytes) {
            return self.rejected(format!(
                "blocklist snapshot chunk (version {version}, index {index}, {} bytes) rejected: its size does not fit its card count",
                bytes.len()
            ));
        }
        let hash = crate::lists::signing::sha256_hex(bytes);
        if version != m.version || !m.names_chunk(index, &hash) {
            return self.rejected(format!(
                "blocklist snapshot chunk (version {version}, index {index}, {} bytes) rejected: it is not a chunk of the snapshot being collected (version {}, {} chunks; its hash does not match)",
                bytes.len(),
                m.version,
                m.chunks
            ));
        }
        if self.staging.has(index) {
            return;
        }
        if let Err(e) = self.staging.put(index, bytes) {
            return self.rejected(format!(
                "blocklist snapshot {} chunk {index} cannot be kept: {e}",
                m.version
            ));
        }
        if self.staging.missing(&m).is_empty() {
            self.apply_staged(m).await;
        }
    }

    async fn apply_staged(&mut self, m: SnapshotManifest) {
        let bl = self.blocklist.clone();
        let staging = Staging {
            dir: self.staging.dir.clone(),
        };
        let version = m.version;
        let result = tokio::task::spawn_blocking(move || -> Result<(bool, u64), String> {
            // The chunks are read, checked and stored one at a time: the snapshot is
            // never held whole in memory beside the index in force and the new one.
            let staged_bytes: u64 = (0..m.chunks).map(|i| staging.size(i)).sum();
            // A manifest may announce more cards than were received; size by what is on
            // disk (each card takes at least 6 bytes), not by what it claims.
            let hint = m.cards.min(staged_bytes / 6) as usize;
            // Each chunk is checked again as it is read; the card count is checked after
            // the last one, before anything is switched in (an `Err` stops the write).
            let cards = std::cell::Cell::new(0u64);
            let mut chunks = (0..m.chunks)
                .map(|i| {
                    read_staged(&staging, &m, i)
                        .inspect(|c| cards.set(cards.get() + c.len() as u64))
                })
                .chain(
                    std::iter::once_with(|| {
                        (cards.get() != m.cards).then(|| {
                            Err(format!(
                                "the manifest announces {} cards but the chunks hold {}",
                                m.cards,
                                cards.get()
                            ))
                        })
                    })
                    .flatten(),
                );
            let applied = bl
                .apply_snapshot_from(m.version, &mut chunks, hint, UtcMillis::now())
                .map_err(|e| match e {
                    WholeError::Refused(why) => why,
                    WholeError::Store(e) => format!("it could not be stored: {e}"),
                })?;
            Ok((applied, cards.get()))
        })
        .await;
        self.pending = None;
        let _ = self.staging.clear();
        match result {
            Ok(Ok((true, cards))) => {
                Counters::bump(&self.shared.counters.blocklist_applied);
                tracing::info!(version, cards, "blocklist snapshot applied");
                self.maybe_close_gap(version);
            }
            Ok(Ok((false, _))) => {
                tracing::info!(
                    version,
                    "blocklist snapshot not newer than the list in force"
                )
            }
            Ok(Err(e)) => self.rejected(format!("blocklist snapshot {version} rejected: {e}")),
            Err(e) => self.rejected(format!("blocklist snapshot {version} failed: {e}")),
        }
    }
}

/// Staged chunk `i`, checked against the manifest again (the disk may have changed it).
fn read_staged(
    staging: &Staging,
    m: &SnapshotManifest,
    i: u32,
) -> Result<Vec<(CardUid, CardStatus)>, String> {
    let bytes = staging
        .read(i)
        .map_err(|e| format!("staged chunk {i} cannot be read: {e}"))?;
    if !m.names_chunk(i, &crate::lists::signing::sha256_hex(&bytes)) {
        return Err(format!("staged chunk {i} changed on disk"));
    }
    let c = SnapshotChunk::decode(&bytes).map_err(|e| e.to_string())?;
    if c.version != m.version || c.index != i {
        return Err(format!(
            "chunk {i} says it is chunk {} of version {}",
            c.index, c.version
        ));
    }
    Ok(c.entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lists::signing::{generate_key, sign};
    use id06_protocol::{CardStatus, CardUid};

    fn uid(n: u32) -> CardUid {
        CardUid::from_bytes(&[4, 0xA1, 0, 0, (n >> 16) as u8, (n >> 8) as u8, n as u8]).unwrap()
    }

    /// Chunks and a manifest for `n` cards, as the producer makes them.
    fn produce(version: u64, n: u32) -> (SnapshotManifest, Vec<Vec<u8>>) {
        let entries: Vec<_> = (0..n).map(|i| (uid(i), CardStatus::Blocked)).collect();
        let (m, messages) = crate::mqtt::publish::snapshot_messages("t", version, &entries);
        (m, messages.into_iter().map(|m| m.payload).collect())
    }

    struct Rig {
        _dir: tempfile::TempDir,
        sync: BlocklistSync,
    }

    fn rig(key: Option<VerifyingKey>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::store::Store::open(dir.path(), "t").unwrap();
        let bl = Blocklist::open(&store.db, &store.dir).unwrap();
        let shared = Arc::new(Shared::new(&[]));
        let sync = BlocklistSync::new(bl, key, shared, dir.path());
        Rig { _dir: dir, sync }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_snapshot_is_collected_on_disk_in_any_order_and_applied_when_complete() {
        let mut r = rig(None);
        let (m, chunks) = produce(7, 120_000);
        assert_eq!(chunks.len(), 3);
        runtime().block_on(async {
            assert!(!r.sync.wants_chunks());
            r.sync
                .handle(Incoming::Manifest(serde_json::to_vec(&m).unwrap()))
                .await;
            assert!(r.sync.wants_chunks());
            r.sync.handle(Incoming::Chunk(chunks[2].clone())).await;
            r.sync.handle(Incoming::Chunk(chunks[0].clone())).await;
            assert_eq!(r.sync.blocklist.index().version, 0, "chunk 1 is missing");
            r.sync.handle(Incoming::Chunk(chunks[1].clone())).await;
        });
        let index = r.sync.blocklist.index();
        assert_eq!((index.version, index.len()), (7, 120_000));
        assert!(!r.sync.wants_chunks(), "nothing pending any more");
    }

    #[test]
    fn bogus_chunks_of_any_version_are_dropped_and_never_block_the_real_snapshot() {
        let mut r = rig(None);
        let (m, chunks) = produce(9, 10);
        let mut bogus = SnapshotChunk::encode(u64::MAX, 999, &[]);
        bogus.truncate(20);
        let mut wrong = chunks[0].clone();
        let last = wrong.len() - 1;
        wrong[last] = CardStatus::Suspended.code();
        runtime().block_on(async {
            r.sync.handle(Incoming::Chunk(bogus.clone())).await; // before any manifest
            r.sync
                .handle(Incoming::Manifest(serde_json::to_vec(&m).unwrap()))
                .await;
            r.sync.handle(Incoming::Chunk(bogus)).await;
            r.sync.handle(Incoming::Chunk(wrong)).await;
            r.sync.handle(Incoming::Chunk(vec![0xAB; 1 << 20])).await;
            assert_eq!(r.sync.blocklist.index().version, 0);
            r.sync.handle(Incoming::Chunk(chunks[0].clone())).await;
        });
        assert_eq!(r.sync.blocklist.index().version, 9);
        assert_eq!(
            Counters::get(&r.sync.shared.counters.blocklist_rejected),
            3,
            "each bogus chunk counted once"
        );
    }

    #[test]
    fn a_signed_snapshot_needs_the_right_signature() {
        let key = generate_key().unwrap();
        let mut r = rig(Some(key.verifying_key()));
        let (mut m, chunks) = produce(9, 5);
        runtime().block_on(async {
            r.sync
                .handle(Incoming::Manifest(serde_json::to_vec(&m).unwrap()))
                .await;
            assert!(!r.sync.wants_chunks(), "an unsigned manifest is rejected");
            m.signature = Some(sign(&key, &m.canonical_bytes()));
            r.sync
                .handle(Incoming::Manifest(serde_json::to_vec(&m).unwrap()))
                .await;
            assert!(r.sync.wants_chunks());
            r.sync.handle(Incoming::Chunk(chunks[0].clone())).await;
        });
        assert_eq!(r.sync.blocklist.index().version, 9);
    }

    #[test]
    fn old_snapshots_are_ignored_and_a_newer_one_replaces_the_pending_one() {
        let mut r = rig(None);
        let (m3, c3) = produce(3, 5);
        let (m5, c5) = produce(5, 6);
        runtime().block_on(async {
            r.sync
                .handle(Incoming::Manifest(serde_json::to_vec(&m3).unwrap()))
                .await;
            r.sync
                .handle(Incoming::Manifest(serde_json::to_vec(&m5).unwrap()))
                .await;
            r.sync.handle(Incoming::Chunk(c3[0].clone())).await;
            assert_eq!(r.sync.blocklist.index().version, 0);
            r.sync.handle(Incoming::Chunk(c5[0].clone())).await;
            assert_eq!(r.sync.blocklist.index().version, 5);
            // Version 3 is behind now: its manifest is ignored, nothing is pending.
            r.sync
                .handle(Incoming::Manifest(serde_json::to_vec(&m3).unwrap()))
                .await;
            assert!(!r.sync.wants_chunks());
        });
    }

    #[test]
    fn a_manifest_announcing_more_cards_than_its_chunks_hold_is_rejected_at_the_end() {
        let mut r = rig(None);
        let (mut m, chunks) = produce(4, 5);
        m.cards = 6;
        runtime().block_on(async {
            r.sync
                .handle(Incoming::Manifest(serde_json::to_vec(&m).unwrap()))
                .await;
            r.sync.handle(Incoming::Chunk(chunks[0].clone())).await;
        });
        assert_eq!(r.sync.blocklist.index().version, 0);
        assert!(!r.sync.wants_chunks(), "a rejected snapshot is dropped");
    }
}
