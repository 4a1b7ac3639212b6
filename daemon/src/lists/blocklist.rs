//! The blocklist: stored durably beside and in sled, served from an in-memory index that
//! is swapped whole on every change, so a lookup sees the old list or the new one and
//! never waits for a writer.
//!
//! Storage: `blocklist_meta` (sled) holds the current generation, version, confirmation
//! time and what names the generation's files. A generation is the list as it was written
//! whole — its *base*, in `{data_dir}/blocklist.<generation>.base` (see
//! [`crate::lists::base`] for why a file) — plus the per-card changes of later updates
//! in the sled tree `blocklist.<generation>` (`d` + UID bytes → status code, or `0xFF`
//! for "taken off"). When the changes pile up (more than [`COMPACT_AFTER`]) the list is
//! written whole as a new generation. A whole write syncs the new generation's files
//! and then flips the pointer in one batch, so a crash mid-import leaves the old list in
//! force; files and trees of other generations are removed at open.
//!
//! Start-up: rebuilding the index of 5 million cards takes millions of random writes, so
//! every whole write also saves the new base's index to `{data_dir}/blocklist.index`
//! ([`IndexFile`]) and records its CRC in the batch that flips the generation. At open, a
//! file with the recorded CRC is read back (a sequential read) and the changes are
//! applied on top; any other file (missing, torn, another generation's) is ignored, the
//! index is rebuilt from the base, and the file is written again.
//!
//! Data directories written before the base moved out of sled keep their base as blobs
//! in the generation's tree (`b` + chunk number → chunk); they are read once and written
//! out as a new generation at the first open.

use crate::lists::base::{read_base, BaseWriter};
use crate::lists::index::{CompactIndex, IndexFile};
use crate::lists::pending::{self, PendingUpdate};
use crate::storage::store::{decode_i64, decode_u64, StoreError};
use arc_swap::ArcSwap;
use id06_protocol::{BlocklistUpdate, CardStatus, CardUid, SnapshotChunk, UtcMillis};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const GENERATION: &[u8] = b"generation";
/// Chunks in the current generation's base file (absent: the base is in sled, as written
/// by earlier versions).
const BASE_CHUNKS: &[u8] = b"base_chunks";
const BASE: u8 = b'b';
const DELTA: u8 = b'd';
const CLEARED: u8 = 0xFF;
const BLOB_CARDS: usize = 50_000;
/// Per-card changes kept beside the base before the list is rewritten whole.
pub const COMPACT_AFTER: usize = 200_000;
const VERSION: &[u8] = b"version";
const CONFIRMED_AT: &[u8] = b"confirmed_at";
/// The redo record of an update being written ([`crate::lists::pending`]).
const PENDING_UPDATE: &[u8] = b"pending_update";
/// The CRC of the index file saved for the current generation's base.
const INDEX_CRC: &[u8] = b"index_crc";
/// Cards in the current generation's base (sizes the index when it is rebuilt).
const BASE_CARDS: &[u8] = b"base_cards";
/// The saved index, in the data directory.
pub const INDEX_FILE: &str = "blocklist.index";

/// Where the cards of a whole write come from, chunk by chunk; an `Err` stops the write
/// before anything changes (the message says why).
pub type ChunkSource<'a> = &'a mut dyn Iterator<Item = Result<Vec<(CardUid, CardStatus)>, String>>;

/// Why a whole list was not written.
#[derive(Debug, thiserror::Error)]
pub enum WholeError {
    /// The cards offered were refused (by the chunk source).
    #[error("{0}")]
    Refused(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl WholeError {
    /// As a storage error (for writes whose chunks are never refused: a slice, the index
    /// in force).
    fn into_store(self, dir: &Path) -> StoreError {
        match self {
            WholeError::Store(e) => e,
            WholeError::Refused(detail) => StoreError::Corrupt {
                dir: dir.to_path_buf(),
                detail,
            },
        }
    }
}

/// The index of a whole write: built from the cards as they are written, or one already
/// built (a compaction writes out the index in force).
#[derive(Clone, Copy)]
enum IndexOf<'a> {
    Build { cards_hint: usize },
    Given(&'a CompactIndex),
}

/// An immutable picture of the list, for lookups.
#[derive(Debug, Default, Clone)]
pub struct BlocklistIndex {
    entries: Arc<CompactIndex>,
    /// The list's version.
    pub version: u64,
    /// When the list was last confirmed (imported, updated or confirmed by an update).
    pub confirmed_at: Option<UtcMillis>,
}

impl BlocklistIndex {
    /// The card's entry, or `None` when it is not listed.
    #[inline]
    pub fn lookup(&self, uid: &CardUid) -> Option<CardStatus> {
        self.entries.lookup(uid)
    }

    /// How many cards are listed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every listed card with its status.
    pub fn iter(&self) -> impl Iterator<Item = (CardUid, CardStatus)> + '_ {
        self.entries.iter()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Heap bytes the index uses.
    pub fn memory_bytes(&self) -> usize {
        self.entries.memory_bytes()
    }

    /// Seconds since confirmation at `now`, or `None` when never confirmed.
    pub fn age_s(&self, now: UtcMillis) -> Option<u64> {
        self.confirmed_at
            .map(|c| (now.as_millis().saturating_sub(c.as_millis()).max(0) / 1000) as u64)
    }

    /// Whether the list is older than `max_age_hours` at `now` (a list never confirmed is).
    pub fn is_stale(&self, now: UtcMillis, max_age_hours: u64) -> bool {
        self.age_s(now)
            .is_none_or(|age| age > max_age_hours.saturating_mul(3600))
    }

    /// Counts per status.
    pub fn counts(&self) -> HashMap<CardStatus, u64> {
        let mut m = HashMap::new();
        for (_, s) in self.entries.iter() {
            *m.entry(s).or_insert(0) += 1;
        }
        m
    }
}

/// What `id06d blocklist lookup` and `stats` show, from this process or (over the control
/// socket) from the running daemon.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// The list's version.
    pub version: u64,
    /// When it was last confirmed, Unix milliseconds.
    pub confirmed_at_ms: Option<i64>,
    /// Listed cards.
    pub listed: u64,
    /// Listed cards per status, in [`CardStatus::ALL`] order, listed statuses only.
    pub counts: Vec<(CardStatus, u64)>,
    /// The status of the card asked about (`unlisted` when not on the list).
    pub status: Option<CardStatus>,
}

impl Summary {
    /// The same index as a picture without entries, for its age and staleness.
    fn as_index(&self) -> BlocklistIndex {
        BlocklistIndex {
            entries: Arc::default(),
            version: self.version,
            confirmed_at: self.confirmed_at_ms.map(UtcMillis),
        }
    }

    /// Seconds since confirmation at `now`.
    pub fn age_s(&self, now: UtcMillis) -> Option<u64> {
        self.as_index().age_s(now)
    }

    /// Whether the list is older than `max_age_hours` at `now`.
    pub fn is_stale(&self, now: UtcMillis, max_age_hours: u64) -> bool {
        self.as_index().is_stale(now, max_age_hours)
    }
}

impl BlocklistIndex {
    /// Version, age, counts, and the status of `card` if one is asked about.
    pub fn summary(&self, card: Option<&CardUid>) -> Summary {
        let counts = self.counts();
        Summary {
            version: self.version,
            confirmed_at_ms: self.confirmed_at.map(|c| c.as_millis()),
            listed: self.len() as u64,
            counts: CardStatus::ALL
                .iter()
                .filter(|s| s.is_listed())
                .map(|s| (*s, counts.get(s).copied().unwrap_or(0)))
                .collect(),
            status: card.map(|c| self.lookup(c).unwrap_or(CardStatus::Unlisted)),
        }
    }
}

/// Why an update was not applied. The list in force stays as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The payload itself is bad.
    #[error("{0}")]
    Invalid(String),
    /// Missing or wrong signature.
    #[error("the signature check failed: {0}")]
    Signature(String),
    /// It starts after our version: updates are missing.
    #[error("it applies on version {from} but this gateway has version {have}: updates are missing (waiting for a snapshot or the missing updates)")]
    Gap {
        /// Our version.
        have: u64,
        /// The update's from_version.
        from: u64,
    },
    /// It is at or behind our version.
    #[error("it goes from version {from} to {to} but this gateway already has version {have} (a replay or an old update)")]
    Old {
        /// Our version.
        have: u64,
        /// from_version
        from: u64,
        /// to_version
        to: u64,
    },
    /// The database refused.
    #[error("it could not be stored: {0}")]
    Storage(String),
}

/// The blocklist: its sled trees and the current index.
#[derive(Clone)]
pub struct Blocklist {
    db: sled::Db,
    dir: std::path::PathBuf,
    meta: sled::Tree,
    current: Arc<ArcSwap<BlocklistIndex>>,
    /// One writer at a time; lookups never take it. Holds the number of per-card changes
    /// stored beside the base.
    writer: Arc<std::sync::Mutex<usize>>,
    /// Changes kept beside the base before a rewrite ([`COMPACT_AFTER`]).
    compact_after: usize,
    /// Whether the index at open was read from the saved file (`false`: rebuilt).
    read_saved_index: Arc<std::sync::atomic::AtomicBool>,
}

/// A bad line in an imported CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvProblem {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses `uid,status` lines. Blank lines, `#` comments and a header line are skipped;
/// `active` entries mean "not listed". Returns every problem, not just the first.
pub fn parse_csv(text: &str) -> Result<Vec<(CardUid, CardStatus)>, Vec<CsvProblem>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut first_seen: HashMap<CardUid, usize> = HashMap::new();
    let mut header_allowed = true;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.trim().trim_start_matches('\u{feff}');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let mut fields = content.split(',').map(str::trim);
        let (Some(uid), Some(status), None) = (fields.next(), fields.next(), fields.next()) else {
            problems.push(CsvProblem {
                line,
                message: "expected two fields: uid,status".into(),
            });
            continue;
        };
        let is_header = header_allowed
            && (uid.eq_ignore_ascii_case("uid") || uid.eq_ignore_ascii_case("card_uid"));
        header_allowed = false;
        if is_header {
            continue;
        }
        let uid = match CardUid::parse(uid.trim_matches('"')) {
            Ok(u) => u,
            Err(e) => {
                problems.push(CsvProblem {
                    line,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let status = match status.trim_matches('"').parse::<CardStatus>() {
            Ok(CardStatus::Unlisted) | Err(_) => {
                problems.push(CsvProblem {
                    line,
                    message: format!(
                        "unknown status {status:?}; expected active, produced, blocked, terminated or suspended"
                    ),
                });
                continue;
            }
            Ok(s) => s,
        };
        if let Some(first) = first_seen.insert(uid, line) {
            problems.push(CsvProblem {
                line,
                message: format!("card {uid} is already on line {first}"),
            });
            continue;
        }
        if status.is_listed() {
            out.push((uid, status));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

impl Blocklist {
    /// Opens the blocklist in `db` and builds the index.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<Blocklist, StoreError> {
        let err = |e| StoreError::from_sled(dir, e);
        let meta = db.open_tree("blocklist_meta").map_err(err)?;
        let generation = meta
            .get(GENERATION)
            .map_err(err)?
            .and_then(|v| decode_u64(&v))
            .unwrap_or(0);
        // Drop generations left behind by an import that did not finish.
        let current_name = tree_name(generation);
        for name in db.tree_names() {
            if name.starts_with(b"blocklist.") && name.as_ref() != current_name.as_bytes() {
                db.drop_tree(&name).map_err(err)?;
            }
        }
        let bl = Blocklist {
            db: db.clone(),
            dir: dir.to_path_buf(),
            meta,
            current: Arc::new(ArcSwap::from_pointee(BlocklistIndex::default())),
            writer: Arc::new(std::sync::Mutex::new(0)),
            compact_after: COMPACT_AFTER,
            read_saved_index: Arc::default(),
        };
        bl.remove_stray_files(generation);
        bl.finish_pending()?;
        let (index, deltas) = bl.build_index()?;
        bl.current.store(Arc::new(index));
        *bl.writer.lock().unwrap_or_else(|p| p.into_inner()) = deltas;
        if bl.meta_u64(BASE_CHUNKS)?.is_none() && !bl.index().is_empty() {
            bl.move_base_out_of_sled()?;
        }
        Ok(bl)
    }

    fn err(&self, e: sled::Error) -> StoreError {
        StoreError::from_sled(&self.dir, e)
    }

    fn generation(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(GENERATION)?.unwrap_or(0))
    }

    /// Whether the index was read from the saved file at open (rather than rebuilt).
    pub fn opened_from_saved_index(&self) -> bool {
        self.read_saved_index
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn index_path(&self) -> std::path::PathBuf {
        self.dir.join(INDEX_FILE)
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        Ok(self
            .meta
            .get(key)
            .map_err(|e| self.err(e))?
            .and_then(|v| decode_u64(&v)))
    }

    fn base_path(&self, generation: u64) -> std::path::PathBuf {
        self.dir.join(format!("{}.base", tree_name(generation)))
    }

    /// Removes the files of other generations and of writes that did not finish.
    fn remove_stray_files(&self, generation: u64) {
        let index = INDEX_FILE.as_bytes();
        let current = self.base_path(generation);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.as_encoded_bytes();
            let stray_base = name.starts_with(b"blocklist.")
                && name.ends_with(b".base")
                && entry.path() != current;
            let stray_index = name.starts_with(index) && name != index;
            if stray_base || stray_index {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Writes a base kept in sled by an earlier version out as a new generation.
    fn move_base_out_of_sled(&self) -> Result<(), StoreError> {
        let _deltas = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let index = self.index();
        let now = index.confirmed_at.unwrap_or(UtcMillis(0));
        self.rewrite(&index, now)
            .map_err(|e| e.into_store(&self.dir))?;
        tracing::info!(
            cards = index.len(),
            "the stored blocklist moved to {} (written by an earlier version inside the database)",
            self.base_path(self.generation()?).display()
        );
        Ok(())
    }

    /// Writes `index` (the list in force) whole as a new generation, streamed from the
    /// index itself (the writer lock held).
    fn rewrite(&self, index: &BlocklistIndex, now: UtcMillis) -> Result<(), WholeError> {
        let mut all = index.entries.iter();
        let mut chunks = std::iter::from_fn(|| {
            let chunk: Vec<_> = all.by_ref().take(BLOB_CARDS).collect();
            (!chunk.is_empty()).then_some(Ok(chunk))
        });
        let given = IndexOf::Given(&index.entries);
        self.write_whole(&mut chunks, given, index.version, now, &mut |_| {})
            .map(|_| ())
    }

    /// The base's index: read from the saved file when it is the one recorded for this
    /// generation, rebuilt from the base (and saved again) otherwise.
    fn base_index(&self, generation: u64, tree: &sled::Tree) -> Result<CompactIndex, StoreError> {
        let started = std::time::Instant::now();
        let path = self.index_path();
        let recorded = self.meta_u64(INDEX_CRC)?;
        let why = match recorded {
            Some(crc) => match IndexFile::read(&path, crc as u32) {
                Ok(index) => {
                    self.read_saved_index
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(
                        cards = index.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "blocklist index read from {}",
                        path.display()
                    );
                    return Ok(index);
                }
                Err(why) => why,
            },
            None => "none was saved for this list".to_string(),
        };
        let hint = self.meta_u64(BASE_CARDS)?.unwrap_or(0) as usize;
        let mut index = CompactIndex::with_capacity_for(hint);
        let corrupt = |detail: String| StoreError::Corrupt {
            dir: self.dir.clone(),
            detail,
        };
        match self.meta_u64(BASE_CHUNKS)? {
            Some(chunks) => {
                let base = self.base_path(generation);
                read_base(&base, chunks, |chunk| index.extend(chunk.entries)).map_err(|e| {
                    corrupt(format!(
                        "the blocklist's stored base {} cannot be read: {e}",
                        base.display()
                    ))
                })?;
            }
            None => {
                for item in tree.scan_prefix([BASE]) {
                    let (_, v) = item.map_err(|e| self.err(e))?;
                    let chunk = SnapshotChunk::decode(&v).map_err(|e| {
                        corrupt(format!("a stored blocklist blob cannot be read: {e}"))
                    })?;
                    index.extend(chunk.entries);
                }
            }
        }
        if !index.is_empty() {
            tracing::info!(
                cards = index.len(),
                ms = started.elapsed().as_millis() as u64,
                "blocklist index rebuilt from the stored list ({}: {why}); saving it for the next start",
                path.display()
            );
            match IndexFile::write(&path, &index) {
                Ok(crc) => {
                    self.meta
                        .insert(INDEX_CRC, &u64::from(crc).to_be_bytes())
                        .map_err(|e| self.err(e))?;
                }
                Err(e) => tracing::warn!(
                    "cannot save the blocklist index to {}: {e}; the next start rebuilds it again",
                    path.display()
                ),
            }
        }
        Ok(index)
    }

    /// The index from the base and the changes; also says how many changes there are.
    fn build_index(&self) -> Result<(BlocklistIndex, usize), StoreError> {
        let generation = self.generation()?;
        let tree = self
            .db
            .open_tree(tree_name(generation))
            .map_err(|e| self.err(e))?;
        let mut set = Vec::new();
        let mut clear = Vec::new();
        for item in tree.scan_prefix([DELTA]) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let Ok(uid) = CardUid::from_bytes(&k[1..]) else {
                tracing::warn!("a stored blocklist change cannot be decoded; skipped");
                continue;
            };
            match v.first() {
                Some(&CLEARED) => clear.push(uid),
                Some(c) => match CardStatus::from_code(*c) {
                    Some(status) => set.push((uid, status)),
                    None => {
                        tracing::warn!(card = %uid, "a stored blocklist change has an unknown status; skipped")
                    }
                },
                None => {}
            }
        }
        let deltas = set.len() + clear.len();
        let mut entries = self.base_index(generation, &tree)?;
        entries.apply_mut(&set, &clear);
        let entries = Arc::new(entries);
        let version = self.meta_u64(VERSION)?.unwrap_or(0);
        let confirmed_at = self
            .meta
            .get(CONFIRMED_AT)
            .map_err(|e| self.err(e))?
            .and_then(|v| decode_i64(&v))
            .map(UtcMillis);
        Ok((
            BlocklistIndex {
                entries,
                version,
                confirmed_at,
            },
            deltas,
        ))
    }

    /// Swaps in a new index; the old one is freed here, by the writer, once no lookup holds
    /// it any more (so that no lookup ever pays for freeing tens of megabytes).
    fn publish(&self, index: BlocklistIndex) {
        let old = self.current.swap(Arc::new(index));
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(old);
    }

    /// The current index (lock-free).
    pub fn index(&self) -> Arc<BlocklistIndex> {
        self.current.load_full()
    }

    /// Replaces the whole list with `entries` as `version`, confirmed at `now`. Atomic:
    /// until the final pointer flip the old list stays in force, on disk and in memory.
    /// `progress` is called with the number of entries written so far.
    pub fn replace(
        &self,
        entries: &[(CardUid, CardStatus)],
        version: u64,
        now: UtcMillis,
        mut progress: impl FnMut(usize),
    ) -> Result<(), StoreError> {
        let mut chunks = entries.chunks(BLOB_CARDS).map(|c| Ok(c.to_vec()));
        self.replace_from(&mut chunks, entries.len(), version, now, &mut progress)
            .map_err(|e| e.into_store(&self.dir))
    }

    /// Replaces the whole list with the cards `chunks` yields, chunk by chunk, as
    /// `version`: each chunk is stored and indexed as it comes, so the list is never held
    /// whole in memory beside the index. `cards_hint` sizes the new index (it grows if
    /// more come). An `Err` from `chunks`, or a storage failure, leaves the list in force
    /// as it was.
    pub fn replace_from(
        &self,
        chunks: ChunkSource<'_>,
        cards_hint: usize,
        version: u64,
        now: UtcMillis,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(), WholeError> {
        let mut deltas = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let built = self.write_whole(
            chunks,
            IndexOf::Build { cards_hint },
            version,
            now,
            progress,
        )?;
        *deltas = 0;
        self.publish(BlocklistIndex {
            entries: Arc::new(built.unwrap_or_default()),
            version,
            confirmed_at: Some(now),
        });
        Ok(())
    }

    /// Writes the list whole as a new generation and flips to it (the writer lock held);
    /// returns the index it built, if it was asked to build one.
    fn write_whole(
        &self,
        chunks: ChunkSource<'_>,
        index: IndexOf<'_>,
        version: u64,
        now: UtcMillis,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Option<CompactIndex>, WholeError> {
        let old = self.generation()?;
        let new = old + 1;
        let base = self.base_path(new);
        let written = self.write_base(new, &base, chunks, index, version, progress);
        let (built, cards, base_chunks) = match written {
            Ok(w) => w,
            Err(e) => {
                // Leave nothing half-written behind (open removes it too, should this fail).
                let _ = std::fs::remove_file(&base);
                let _ = self.db.drop_tree(tree_name(new));
                return Err(e);
            }
        };
        // Save the new base's index before the flip, so the flip can name it; a failure
        // only costs the next start a rebuild.
        let path = self.index_path();
        let fresh = path.with_extension("index.new");
        let saved = match built.as_ref().or(match index {
            IndexOf::Given(i) => Some(i),
            IndexOf::Build { .. } => None,
        }) {
            Some(i) => match IndexFile::write(&fresh, i) {
                Ok(crc) => Some(crc),
                Err(e) => {
                    tracing::warn!(
                        "cannot save the blocklist index to {}: {e}; the next start rebuilds it",
                        path.display()
                    );
                    None
                }
            },
            None => None,
        };
        let mut flip = sled::Batch::default();
        flip.insert(GENERATION, &new.to_be_bytes());
        flip.insert(VERSION, &version.to_be_bytes());
        flip.insert(CONFIRMED_AT, &now.as_millis().to_be_bytes());
        flip.insert(BASE_CARDS, &(cards as u64).to_be_bytes());
        flip.insert(BASE_CHUNKS, &base_chunks.to_be_bytes());
        // An update left half-written is older than a list written whole.
        flip.remove(PENDING_UPDATE);
        match saved {
            Some(crc) => flip.insert(INDEX_CRC, &u64::from(crc).to_be_bytes()),
            None => flip.remove(INDEX_CRC),
        }
        self.meta.apply_batch(flip).map_err(|e| self.err(e))?;
        crate::storage::store::flush_db(&self.db, &self.dir)?;
        if saved.is_some() {
            if let Err(e) = std::fs::rename(&fresh, &path) {
                tracing::warn!(
                    "cannot put the saved blocklist index in place at {}: {e}; the next start rebuilds it",
                    path.display()
                );
            }
        }
        self.db.drop_tree(tree_name(old)).map_err(|e| self.err(e))?;
        let _ = std::fs::remove_file(self.base_path(old));
        Ok(built)
    }

    /// Writes the chunks to the base file of generation `generation` (building the index
    /// if asked) and gives it an empty tree of changes; returns the index, the number of
    /// cards and the number of chunks written.
    fn write_base(
        &self,
        generation: u64,
        base: &Path,
        chunks: ChunkSource<'_>,
        index: IndexOf<'_>,
        version: u64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(Option<CompactIndex>, usize, u64), WholeError> {
        let io = |e: std::io::Error| StoreError::Io {
            dir: self.dir.clone(),
            detail: format!("cannot write the blocklist's base {}: {e}", base.display()),
        };
        self.db
            .open_tree(tree_name(generation))
            .and_then(|t| t.clear())
            .map_err(|e| self.err(e))?;
        let mut out = BaseWriter::create(base).map_err(io)?;
        let mut built = match index {
            IndexOf::Build { cards_hint } => Some(CompactIndex::with_capacity_for(cards_hint)),
            IndexOf::Given(_) => None,
        };
        let mut written = 0usize;
        for (n, chunk) in chunks.enumerate() {
            let chunk = chunk.map_err(WholeError::Refused)?;
            out.append(&SnapshotChunk::encode(version, n as u32, &chunk))
                .map_err(io)?;
            written += chunk.len();
            if let Some(b) = built.as_mut() {
                b.extend(chunk);
            }
            progress(written);
        }
        let base_chunks = out.finish().map_err(io)?;
        Ok((built, written, base_chunks))
    }

    /// Applies an update (already checked on its own, signature included) on top of the
    /// list in force: durably and all or nothing in the database (see
    /// [`crate::lists::pending`]), then swapped in memory. Returns the new version.
    pub fn apply_update(&self, update: &BlocklistUpdate, now: UtcMillis) -> Result<u64, Rejection> {
        let mut deltas = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let storage = |e: StoreError| Rejection::Storage(e.to_string());
        // An update that the disk refused half-way is finished first: its changes may be
        // in the database in part.
        match self.finish_pending().map_err(storage)? {
            Pending::None => {}
            Pending::Finished(p) => {
                *deltas += p.changes.len();
                let next = index_after(&self.index(), &p);
                self.publish(next);
            }
            Pending::Damaged => {
                let current = self.index();
                let entries = current.entries.clone();
                let confirmed_at = current.confirmed_at;
                drop(current);
                self.publish(BlocklistIndex {
                    entries,
                    version: 0,
                    confirmed_at,
                });
            }
        }
        let current = self.index();
        let have = current.version;
        if update.from_version != have {
            return Err(if update.from_version > have {
                Rejection::Gap {
                    have,
                    from: update.from_version,
                }
            } else {
                Rejection::Old {
                    have,
                    from: update.from_version,
                    to: update.to_version,
                }
            });
        }
        // Cleared cards first, then set ones, as the index applies them: a card in both
        // ends up set, in memory and in the database alike.
        let mut changes: Vec<(CardUid, u8)> =
            Vec::with_capacity(update.clear.len() + update.set.len());
        changes.extend(update.clear.iter().map(|uid| (*uid, CLEARED)));
        changes.extend(update.set.iter().map(|e| {
            let code = if e.status.is_listed() {
                e.status.code()
            } else {
                CLEARED
            };
            (e.card_uid, code)
        }));
        let pending = PendingUpdate {
            generation: self.generation().map_err(storage)?,
            to_version: update.to_version,
            confirmed_at: now.as_millis(),
            changes,
        };
        if !pending.changes.is_empty() {
            // A confirmation (no changes) is the version's flip alone.
            pending::begin(&self.db, &self.dir, &self.meta, PENDING_UPDATE, &pending)
                .map_err(storage)?;
        }
        self.write_changes(&pending).map_err(storage)?;
        let next = index_after(&current, &pending);
        drop(current); // the writer's own reference must not keep the old index alive
        *deltas += pending.changes.len();
        if *deltas > self.compact_after {
            // Fold the changes into a new base; on failure the changes stay valid as
            // they are.
            match self.rewrite(&next, now) {
                Ok(()) => *deltas = 0,
                Err(e) => tracing::warn!("cannot compact the stored blocklist: {e}"),
            }
        }
        self.publish(next);
        Ok(update.to_version)
    }

    /// Writes the changes of an update whose redo record is durable into its generation's
    /// tree, one insert each, then sets the version and removes the record in one small
    /// batch; synced between and after, so that the version never says more is in force
    /// than the disk holds.
    fn write_changes(&self, p: &PendingUpdate) -> Result<(), StoreError> {
        let tree = self
            .db
            .open_tree(tree_name(p.generation))
            .map_err(|e| self.err(e))?;
        for (uid, code) in &p.changes {
            tree.insert(delta_key(uid), &[*code])
                .map_err(|e| self.err(e))?;
        }
        if !p.changes.is_empty() {
            crate::storage::store::flush_db(&self.db, &self.dir)?;
        }
        let values = [
            (VERSION, p.to_version.to_be_bytes()),
            (CONFIRMED_AT, p.confirmed_at.to_be_bytes()),
        ];
        pending::end(&self.db, &self.dir, &self.meta, PENDING_UPDATE, &values)
    }

    /// Finishes an update found half-written in the database (the gateway stopped, or the
    /// disk refused a write, while it was being written).
    fn finish_pending(&self) -> Result<Pending, StoreError> {
        let Some(bytes) = self.meta.get(PENDING_UPDATE).map_err(|e| self.err(e))? else {
            return Ok(Pending::None);
        };
        match PendingUpdate::decode(&bytes) {
            Ok(p) if p.generation == self.generation()? => {
                self.write_changes(&p)?;
                tracing::info!(
                    version = p.to_version,
                    changes = p.changes.len(),
                    "finished a blocklist update that was being written when the gateway stopped"
                );
                Ok(Pending::Finished(p))
            }
            Ok(_) => {
                // The list was replaced whole since: the update is history.
                self.meta.remove(PENDING_UPDATE).map_err(|e| self.err(e))?;
                crate::storage::store::flush_db(&self.db, &self.dir)?;
                Ok(Pending::None)
            }
            Err(why) => {
                // Which of its changes reached the disk is unknown: the list keeps its
                // cards but no version, so that no update is applied on top of it and the
                // next snapshot replaces it.
                tracing::error!(
                    "the blocklist update being written when the gateway stopped cannot be read back ({why}); the list keeps its cards but its version is now 0 until the next snapshot replaces it"
                );
                let values = [(VERSION, 0u64.to_be_bytes())];
                pending::end(&self.db, &self.dir, &self.meta, PENDING_UPDATE, &values)?;
                Ok(Pending::Damaged)
            }
        }
    }

    /// Replaces the list with a verified snapshot, unless it is not newer than the list in
    /// force. Returns whether it was applied.
    pub fn apply_snapshot(
        &self,
        version: u64,
        entries: &[(CardUid, CardStatus)],
        now: UtcMillis,
    ) -> Result<bool, StoreError> {
        if version <= self.index().version {
            return Ok(false);
        }
        self.replace(entries, version, now, |_| {})?;
        Ok(true)
    }

    /// [`Blocklist::apply_snapshot`] with the cards streamed chunk by chunk (see
    /// [`Blocklist::replace_from`]).
    pub fn apply_snapshot_from(
        &self,
        version: u64,
        chunks: ChunkSource<'_>,
        cards_hint: usize,
        now: UtcMillis,
    ) -> Result<bool, WholeError> {
        if version <= self.index().version {
            return Ok(false);
        }
        self.replace_from(chunks, cards_hint, version, now, &mut |_| {})?;
        Ok(true)
    }
}

fn tree_name(generation: u64) -> String {
    format!("blocklist.{generation}")
}

/// The key of a card's change in a generation's tree.
fn delta_key(uid: &CardUid) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + uid.len());
    k.push(DELTA);
    k.extend_from_slice(uid.as_bytes());
    k
}

/// The list in force once the update `p` is: `current` with its changes, its version and
/// its time (the same changes, in the same order, as the database holds).
fn index_after(current: &BlocklistIndex, p: &PendingUpdate) -> BlocklistIndex {
    let entries = if p.changes.is_empty() {
        current.entries.clone()
    } else {
        let mut set = Vec::new();
        let mut clear = Vec::new();
        for (uid, code) in &p.changes {
            if *code == CLEARED {
                clear.push(*uid);
            } else if let Some(status) = CardStatus::from_code(*code) {
                set.push((*uid, status));
            }
        }
        Arc::new(current.entries.with_changes(&set, &clear))
    };
    BlocklistIndex {
        entries,
        version: p.to_version,
        confirmed_at: Some(UtcMillis(p.confirmed_at)),
    }
}

/// What [`Blocklist::finish_pending`] found.
enum Pending {
    /// No update was half-written.
    None,
    /// An update was half-written and is now in the database.
    Finished(PendingUpdate),
    /// A half-written update's record could not be read: the version was set to 0.
    Damaged,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_accepts_header_comments_and_spellings() {
        let text = "uid,status\n# a comment\n\n04:a1:b2:c3, blocked\n04A1B2C4,Terminated\n04A1B2C5,active\n";
        let got = parse_csv(text).unwrap();
        assert_eq!(got.len(), 2, "active is not listed");
        assert_eq!(got[0].0.to_string(), "04A1B2C3");
        assert_eq!(got[1].1, CardStatus::Terminated);
    }

    #[test]
    fn csv_reports_every_bad_line_by_number() {
        let text = "04A1B2C3,blocked\nnonsense\n04ZZ,blocked\n04A1B2C4,lost\n04a1b2c3,suspended\n04A1B2C5,unlisted\n";
        let problems = parse_csv(text).unwrap_err();
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6]);
        assert!(problems[3].message.contains("line 1"));
    }

    #[test]
    fn replace_is_visible_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let a = CardUid::parse("04A1B2C3").unwrap();
        let b = CardUid::parse("04A1B2C3D4E5F6").unwrap();
        assert_eq!(bl.index().lookup(&a), None);
        assert!(bl.index().is_stale(UtcMillis(0), 48));
        bl.replace(&[(a, CardStatus::Blocked)], 7, UtcMillis(1_000), |_| {})
            .unwrap();
        assert_eq!(bl.index().lookup(&a), Some(CardStatus::Blocked));
        bl.replace(&[(b, CardStatus::Produced)], 8, UtcMillis(2_000), |_| {})
            .unwrap();
        assert_eq!(bl.index().lookup(&a), None, "a replace is a whole new list");
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let idx = bl.index();
        assert_eq!(idx.lookup(&b), Some(CardStatus::Produced));
        assert_eq!(idx.version, 8);
        assert_eq!(idx.age_s(UtcMillis(5_000)), Some(3));
        assert!(!idx.is_stale(UtcMillis(5_000), 1));
        assert!(idx.is_stale(UtcMillis(2_000 + 3600 * 1000 + 1000), 1));
    }

    #[test]
    fn the_saved_index_is_read_at_open_and_a_bad_one_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert!(!bl.opened_from_saved_index(), "nothing saved yet");
        let cards: Vec<_> = (0..120_000u32)
            .map(|i| {
                let b = i.to_be_bytes();
                let uid = CardUid::from_bytes(&[0x04, 0x10, b[0], b[1], b[2], b[3], 0x80]).unwrap();
                (uid, CardStatus::ALL[1 + (i % 4) as usize])
            })
            .collect();
        bl.replace(&cards, 3, UtcMillis(0), |_| {}).unwrap();
        let changed = cards[7].0;
        let upd = update(3, 4, &[(&changed.to_string(), CardStatus::Active)], &[]);
        bl.apply_update(&upd, UtcMillis(1)).unwrap();
        drop(bl);
        let path = dir.path().join(INDEX_FILE);
        let check = |bl: &Blocklist| {
            let idx = bl.index();
            assert_eq!(idx.version, 4);
            assert_eq!(idx.len(), cards.len() - 1);
            assert_eq!(
                idx.lookup(&changed),
                None,
                "the change on top of the saved base"
            );
            for (uid, status) in cards.iter().skip(8).step_by(997) {
                assert_eq!(idx.lookup(uid), Some(*status));
            }
        };
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert!(bl.opened_from_saved_index());
        check(&bl);
        drop(bl);
        // Damaged: rebuilt from sled, right all the same, and saved again.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert!(!bl.opened_from_saved_index());
        check(&bl);
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert!(
            bl.opened_from_saved_index(),
            "saved again after the rebuild"
        );
        check(&bl);
        drop(bl);
        // Missing, and another list's file in its place: the same.
        std::fs::remove_file(&path).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert!(!bl.opened_from_saved_index());
        check(&bl);
        drop(bl);
        let other = CompactIndex::build([(cards[0].0, CardStatus::Suspended)], 1);
        IndexFile::write(&path, &other).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert!(!bl.opened_from_saved_index());
        check(&bl);
        drop(bl);
        // Both copies damaged: a clear error naming the base, never a list with cards missing.
        std::fs::write(&path, b"torn").unwrap();
        let base = dir.path().join("blocklist.1.base");
        let mut bytes = std::fs::read(&base).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&base, &bytes).unwrap();
        let e = Blocklist::open(&db, dir.path()).err().unwrap().to_string();
        assert!(e.contains("blocklist.1.base") && e.contains("CRC"), "{e}");
    }

    #[test]
    fn a_base_kept_in_sled_by_an_earlier_version_moves_to_its_file_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let a = CardUid::parse("04A1B2C3").unwrap();
        let b = CardUid::parse("04A1B2C3D4E5F6").unwrap();
        // What 0.2.0 wrote: generation 3, its base as a blob, one change beside it.
        let meta = db.open_tree("blocklist_meta").unwrap();
        meta.insert(GENERATION, &3u64.to_be_bytes()).unwrap();
        meta.insert(VERSION, &9u64.to_be_bytes()).unwrap();
        meta.insert(CONFIRMED_AT, &5_000i64.to_be_bytes()).unwrap();
        let old = db.open_tree("blocklist.3").unwrap();
        let blob =
            SnapshotChunk::encode(9, 0, &[(a, CardStatus::Blocked), (b, CardStatus::Produced)]);
        old.insert([BASE, 0, 0, 0, 0], blob).unwrap();
        let mut k = vec![DELTA];
        k.extend_from_slice(b.as_bytes());
        old.insert(k, &[CLEARED]).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let check = |bl: &Blocklist| {
            let idx = bl.index();
            assert_eq!(idx.version, 9);
            assert_eq!(idx.confirmed_at, Some(UtcMillis(5_000)));
            assert_eq!(idx.lookup(&a), Some(CardStatus::Blocked));
            assert_eq!(idx.lookup(&b), None, "the change applied");
            assert_eq!(idx.len(), 1);
        };
        check(&bl);
        assert!(dir.path().join("blocklist.4.base").exists());
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"blocklist.3"));
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert!(bl.opened_from_saved_index());
        check(&bl);
    }

    #[test]
    fn a_refused_streamed_snapshot_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let a = CardUid::parse("04A1B2C3").unwrap();
        let b = CardUid::parse("04A1B2C4").unwrap();
        bl.replace(&[(a, CardStatus::Blocked)], 1, UtcMillis(0), |_| {})
            .unwrap();
        let mut chunks = vec![
            Ok(vec![(b, CardStatus::Suspended)]),
            Err("chunk 1 changed on disk".to_string()),
        ]
        .into_iter();
        let e = bl
            .apply_snapshot_from(2, &mut chunks, 2, UtcMillis(5))
            .unwrap_err();
        assert!(
            matches!(e, WholeError::Refused(ref w) if w.contains("changed on disk")),
            "{e}"
        );
        assert_eq!(bl.index().version, 1);
        assert_eq!(bl.index().lookup(&b), None);
        let names: Vec<_> = db.tree_names();
        assert!(
            !names.iter().any(|n| n.as_ref() == b"blocklist.2"),
            "nothing half-written left"
        );
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert!(bl.opened_from_saved_index());
        assert_eq!(bl.index().version, 1);
        assert_eq!(bl.index().lookup(&a), Some(CardStatus::Blocked));
        assert_eq!(bl.index().lookup(&b), None);
        // A good stream applies.
        let mut chunks = vec![Ok(vec![(b, CardStatus::Suspended)])].into_iter();
        assert!(bl
            .apply_snapshot_from(2, &mut chunks, 1, UtcMillis(5))
            .unwrap());
        assert_eq!(bl.index().lookup(&a), None);
        assert_eq!(bl.index().lookup(&b), Some(CardStatus::Suspended));
    }

    #[test]
    fn an_unfinished_import_leaves_the_old_list() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let a = CardUid::parse("04A1B2C3").unwrap();
        bl.replace(&[(a, CardStatus::Blocked)], 1, UtcMillis(0), |_| {})
            .unwrap();
        // Simulate a crash after writing a new generation but before the flip.
        let orphan = db.open_tree("blocklist.2").unwrap();
        orphan
            .insert(a.as_bytes(), &[CardStatus::Suspended.code()])
            .unwrap();
        std::fs::write(dir.path().join("blocklist.2.base"), b"half").unwrap();
        std::fs::write(dir.path().join("blocklist.index.new"), b"half").unwrap();
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert_eq!(bl.index().lookup(&a), Some(CardStatus::Blocked));
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"blocklist.2"));
        assert!(!dir.path().join("blocklist.2.base").exists());
        assert!(!dir.path().join("blocklist.index.new").exists());
        assert!(dir.path().join("blocklist.1.base").exists());
        assert!(dir.path().join("blocklist.index").exists());
    }

    fn update(from: u64, to: u64, set: &[(&str, CardStatus)], clear: &[&str]) -> BlocklistUpdate {
        BlocklistUpdate {
            schema: id06_protocol::UPDATE_SCHEMA.into(),
            from_version: from,
            to_version: to,
            set: set
                .iter()
                .map(|(u, s)| id06_protocol::SetEntry {
                    card_uid: CardUid::parse(u).unwrap(),
                    status: *s,
                })
                .collect(),
            clear: clear.iter().map(|u| CardUid::parse(u).unwrap()).collect(),
            signature: None,
        }
    }

    #[test]
    fn updates_apply_only_on_their_version_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let a = CardUid::parse("04A1B2C3").unwrap();
        bl.replace(&[(a, CardStatus::Blocked)], 5, UtcMillis(0), |_| {})
            .unwrap();
        assert_eq!(
            bl.apply_update(&update(7, 8, &[], &[]), UtcMillis(1)),
            Err(Rejection::Gap { have: 5, from: 7 })
        );
        assert!(matches!(
            bl.apply_update(&update(4, 5, &[], &["04A1B2C3"]), UtcMillis(1)),
            Err(Rejection::Old { .. })
        ));
        assert_eq!(
            bl.index().lookup(&a),
            Some(CardStatus::Blocked),
            "rejections change nothing"
        );
        let u = update(
            5,
            6,
            &[("04A1B2C3D4E5F6", CardStatus::Suspended)],
            &["04A1B2C3"],
        );
        assert_eq!(bl.apply_update(&u, UtcMillis(2_000)), Ok(6));
        // A confirmation keeps the version and refreshes the age.
        assert_eq!(
            bl.apply_update(&update(6, 6, &[], &[]), UtcMillis(9_000)),
            Ok(6)
        );
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let idx = bl.index();
        assert_eq!(idx.version, 6);
        assert_eq!(idx.confirmed_at, Some(UtcMillis(9_000)));
        assert_eq!(idx.lookup(&a), None);
        assert_eq!(
            idx.lookup(&CardUid::parse("04A1B2C3D4E5F6").unwrap()),
            Some(CardStatus::Suspended)
        );
    }

    /// A blocklist in a new directory, replaced by `cards` as version 5.
    fn list_at_5(cards: &[(CardUid, CardStatus)]) -> (tempfile::TempDir, sled::Db, Blocklist) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        bl.replace(cards, 5, UtcMillis(0), |_| {}).unwrap();
        (dir, db, bl)
    }

    /// An update left half-written: its redo record durable and `written` of its changes
    /// in the tree, as a crash between the two leaves it.
    fn half_written(bl: &Blocklist, p: &PendingUpdate, written: usize) {
        bl.meta.insert(PENDING_UPDATE, p.encode()).unwrap();
        let tree = bl.db.open_tree(tree_name(p.generation)).unwrap();
        for (uid, code) in &p.changes[..written] {
            tree.insert(delta_key(uid), &[*code]).unwrap();
        }
        bl.db.flush().unwrap();
    }

    #[test]
    fn an_update_cut_short_by_a_crash_is_finished_at_the_next_start() {
        let a = CardUid::parse("04A1B2C3").unwrap();
        let b = CardUid::parse("04A1B2C3D4E5F6").unwrap();
        let c = CardUid::parse("04A1B2C3D4E5F7").unwrap();
        let (dir, db, bl) = list_at_5(&[(a, CardStatus::Blocked)]);
        let p = PendingUpdate {
            generation: bl.generation().unwrap(),
            to_version: 6,
            confirmed_at: 7_000,
            changes: vec![
                (a, CLEARED),
                (b, CardStatus::Suspended.code()),
                (c, CardStatus::Terminated.code()),
            ],
        };
        half_written(&bl, &p, 1);
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let idx = bl.index();
        assert_eq!(idx.version, 6);
        assert_eq!(idx.confirmed_at, Some(UtcMillis(7_000)));
        assert_eq!(idx.lookup(&a), None);
        assert_eq!(idx.lookup(&b), Some(CardStatus::Suspended));
        assert_eq!(idx.lookup(&c), Some(CardStatus::Terminated));
        assert_eq!(bl.meta.get(PENDING_UPDATE).unwrap(), None, "record removed");
        // The next update applies on top of the finished one.
        let u = update(6, 7, &[("04A1B2C3", CardStatus::Produced)], &[]);
        assert_eq!(bl.apply_update(&u, UtcMillis(8_000)), Ok(7));
    }

    #[test]
    fn an_update_the_disk_refused_half_way_is_finished_before_the_next_one() {
        let a = CardUid::parse("04A1B2C3").unwrap();
        let (_dir, _db, bl) = list_at_5(&[]);
        let p = PendingUpdate {
            generation: bl.generation().unwrap(),
            to_version: 6,
            confirmed_at: 7_000,
            changes: vec![(a, CardStatus::Blocked.code())],
        };
        half_written(&bl, &p, 0);
        assert_eq!(bl.index().version, 5, "not in force while half-written");
        // The same update sent again is now old; the list holds it.
        assert!(matches!(
            bl.apply_update(
                &update(5, 6, &[("04A1B2C3", CardStatus::Blocked)], &[]),
                UtcMillis(8_000)
            ),
            Err(Rejection::Old { have: 6, .. })
        ));
        assert_eq!(bl.index().lookup(&a), Some(CardStatus::Blocked));
        assert_eq!(
            bl.apply_update(&update(6, 7, &[], &["04A1B2C3"]), UtcMillis(9_000)),
            Ok(7)
        );
        assert_eq!(bl.index().lookup(&a), None);
    }

    #[test]
    fn a_half_written_update_of_a_list_since_replaced_is_dropped() {
        let a = CardUid::parse("04A1B2C3").unwrap();
        let (dir, db, bl) = list_at_5(&[]);
        let older = PendingUpdate {
            generation: bl.generation().unwrap() + 7,
            to_version: 6,
            confirmed_at: 7_000,
            changes: vec![(a, CardStatus::Blocked.code())],
        };
        bl.meta.insert(PENDING_UPDATE, older.encode()).unwrap();
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert_eq!(bl.index().version, 5);
        assert_eq!(bl.index().lookup(&a), None);
        assert_eq!(bl.meta.get(PENDING_UPDATE).unwrap(), None);
    }

    #[test]
    fn a_damaged_update_record_keeps_the_cards_without_a_version_until_a_snapshot() {
        let a = CardUid::parse("04A1B2C3").unwrap();
        let (dir, db, bl) = list_at_5(&[(a, CardStatus::Blocked)]);
        bl.meta
            .insert(PENDING_UPDATE, &b"not a record"[..])
            .unwrap();
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert_eq!(bl.index().version, 0, "which changes landed is unknown");
        assert_eq!(bl.index().lookup(&a), Some(CardStatus::Blocked));
        assert!(matches!(
            bl.apply_update(&update(5, 6, &[], &[]), UtcMillis(1)),
            Err(Rejection::Gap { have: 0, from: 5 })
        ));
        assert!(bl.apply_snapshot(6, &[], UtcMillis(2)).unwrap());
        assert_eq!(bl.index().version, 6);
    }

    #[test]
    fn a_card_both_cleared_and_set_in_one_update_is_set_before_and_after_a_restart() {
        let a = CardUid::parse("04A1B2C3").unwrap();
        let (dir, db, bl) = list_at_5(&[]);
        let u = update(5, 6, &[("04A1B2C3", CardStatus::Blocked)], &["04A1B2C3"]);
        assert_eq!(bl.apply_update(&u, UtcMillis(1)), Ok(6));
        assert_eq!(bl.index().lookup(&a), Some(CardStatus::Blocked));
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        assert_eq!(bl.index().lookup(&a), Some(CardStatus::Blocked));
    }

    #[test]
    fn changes_are_folded_into_a_new_base_when_they_pile_up() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let mut bl = Blocklist::open(&db, dir.path()).unwrap();
        bl.compact_after = 3;
        let a = CardUid::parse("04A1B2C3").unwrap();
        bl.replace(&[(a, CardStatus::Blocked)], 1, UtcMillis(0), |_| {})
            .unwrap();
        let generation = bl.generation().unwrap();
        bl.apply_update(
            &update(1, 2, &[("04A1B2C4", CardStatus::Produced)], &[]),
            UtcMillis(1),
        )
        .unwrap();
        assert_eq!(
            bl.generation().unwrap(),
            generation,
            "one change: kept as a change"
        );
        let u = update(
            2,
            3,
            &[
                ("04A1B2C5", CardStatus::Blocked),
                ("04A1B2C6", CardStatus::Blocked),
            ],
            &["04A1B2C3"],
        );
        bl.apply_update(&u, UtcMillis(2)).unwrap();
        assert_eq!(
            bl.generation().unwrap(),
            generation + 1,
            "four changes: rewritten whole"
        );
        drop(bl);
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let idx = bl.index();
        assert_eq!((idx.version, idx.len()), (3, 3));
        assert_eq!(idx.lookup(&a), None);
        assert_eq!(
            *bl.writer.lock().unwrap(),
            0,
            "no changes left beside the new base"
        );
    }

    #[test]
    fn an_older_snapshot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let bl = Blocklist::open(&db, dir.path()).unwrap();
        let a = CardUid::parse("04A1B2C3").unwrap();
        assert!(bl
            .apply_snapshot(3, &[(a, CardStatus::Blocked)], UtcMillis(0))
            .unwrap());
        assert!(!bl.apply_snapshot(3, &[], UtcMillis(0)).unwrap());
        assert!(!bl.apply_snapshot(2, &[], UtcMillis(0)).unwrap());
        assert_eq!(bl.index().lookup(&a), Some(CardStatus::Blocked));
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        fn card(n: u8) -> String {
            format!("04A1B2C3D4E5{n:02X}")
        }

        fn changes() -> impl Strategy<Value = Vec<(u8, u8)>> {
            // (card number, status code or 9 = clear)
            proptest::collection::vec((0u8..20, prop_oneof![1u8..5, Just(9u8)]), 0..12)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]
            /// Applying any sequence of valid updates equals applying the final state.
            #[test]
            fn a_sequence_of_updates_equals_its_final_state(steps in proptest::collection::vec(changes(), 1..6)) {
                let dir = tempfile::tempdir().unwrap();
                let db = sled::open(dir.path().join("db")).unwrap();
                let bl = Blocklist::open(&db, dir.path()).unwrap();
                let mut model: HashMap<String, CardStatus> = HashMap::new();
                for (i, step) in steps.iter().enumerate() {
                    let mut seen = std::collections::HashSet::new();
                    let mut set = Vec::new();
                    let mut clear = Vec::new();
                    for (n, code) in step {
                        if !seen.insert(*n) { continue; }
                        if *code == 9 {
                            clear.push(card(*n));
                            model.remove(&card(*n));
                        } else {
                            let s = CardStatus::from_code(*code).unwrap();
                            set.push((card(*n), s));
                            model.insert(card(*n), s);
                        }
                    }
                    let set_refs: Vec<(&str, CardStatus)> = set.iter().map(|(u, s)| (u.as_str(), *s)).collect();
                    let clear_refs: Vec<&str> = clear.iter().map(|u| u.as_str()).collect();
                    let u = update(i as u64, i as u64 + 1, &set_refs, &clear_refs);
                    prop_assert!(bl.apply_update(&u, UtcMillis(i as i64)).is_ok());
                }
                // The same final state as a fresh list built from the model ...
                let fresh_dir = tempfile::tempdir().unwrap();
                let fresh_db = sled::open(fresh_dir.path().join("db")).unwrap();
                let fresh = Blocklist::open(&fresh_db, fresh_dir.path()).unwrap();
                let entries: Vec<(CardUid, CardStatus)> = model.iter().map(|(u, s)| (CardUid::parse(u).unwrap(), *s)).collect();
                fresh.replace(&entries, steps.len() as u64, UtcMillis(0), |_| {}).unwrap();
                // ... in memory and after a rebuild from sled.
                drop(bl);
                let reopened = Blocklist::open(&db, dir.path()).unwrap();
                for n in 0..20u8 {
                    let uid = CardUid::parse(&card(n)).unwrap();
                    prop_assert_eq!(reopened.index().lookup(&uid), fresh.index().lookup(&uid));
                }
                prop_assert_eq!(reopened.index().len(), model.len());
                prop_assert_eq!(reopened.index().version, steps.len() as u64);
            }
        }
    }
}
