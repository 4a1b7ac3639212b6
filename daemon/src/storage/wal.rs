//! The outbox's write-ahead log: the durability point of a tap.
//!
//! Design: sled 0.34 can only make a write durable with its own flush followed by an
//! `fdatasync` (see [`crate::storage::store::Store::flush`]): two waits for the disk per commit. The
//! log makes one enough. A commit appends one record with the journal inserts it makes,
//! `fdatasync`s the log, and then applies the same inserts to sled in memory. sled writes
//! them out in the background; a *checkpoint* (sled flushed and synced, the mark written,
//! then the log emptied) bounds the log by size and age. On open, the records still in the
//! log are applied to sled again (inserts are idempotent) and a checkpoint follows.
//!
//! The file is kept at least [`PREALLOC`] bytes long, written with zeros once, and records
//! overwrite it from the start: an `fdatasync` then only writes data (no size or extent
//! change for the file system's journal to commit), as cheap as the disk allows.
//!
//! Record: `len: u32 LE`, `crc32(epoch ‖ payload): u32 LE`, `epoch: u64 LE`, `payload`;
//! payload: `count: u32 LE`, then per insert `key_len: u16 LE`, key, `value_len: u32 LE`,
//! value. The log is the run of valid records from offset 0 that share one epoch, and after
//! its last record the file holds only zeros: emptying the log zeroes every byte records
//! used and draws a new random epoch. So a reader can tell a clean end (zeros) from damage:
//!
//! - a record that does not check, with records of the same epoch after it, is damage in
//!   the middle: the scan finds the next record by its epoch bytes and goes on, and the
//!   record's neighbours say exactly which positions were lost ([`Scan::skipped`]);
//! - non-zero bytes after the last good record are a torn append (a power cut during a
//!   commit that had not returned) or a damaged last record, which cannot be told apart:
//!   [`Scan::tail`] says so and the outbox starts a new stream rather than guess
//!   ([`crate::storage::recovery`]).
//!
//! Replaying an insert that sled already had is harmless; the pending marker of an event
//! that was delivered after the record was written comes back, and [`AckLog`] removes it
//! again (where that log was lost, in a power cut, the event is delivered twice with the
//! same `event_id`, which at-least-once allows).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One journal insert: key and value.
pub type Insert = (Vec<u8>, Vec<u8>);

/// A checkpoint is due once the log is this long ...
pub const CHECKPOINT_BYTES: u64 = 1 << 20;
/// ... or its oldest record this old (seconds).
pub const CHECKPOINT_SECS: u64 = 2;
/// The log file is kept at least this long (zeros beyond the records).
pub const PREALLOC: u64 = 2 << 20;
/// Largest record accepted when reading (a corrupt length ends the log).
const MAX_RECORD: u32 = 64 << 20;
/// Record header: length, checksum, epoch.
const HEADER: usize = 16;

/// The open log.
#[derive(Debug)]
pub struct Wal {
    path: PathBuf,
    file: File,
    len: u64,
    /// One past the last byte that may not be zero (what emptying the log must zero).
    dirty_to: u64,
    epoch: u64,
    oldest: Option<Instant>,
    pinned: bool,
}

/// Encodes one record of `epoch`.
pub fn encode(epoch: u64, inserts: &[Insert]) -> Vec<u8> {
    let body: usize = inserts.iter().map(|(k, v)| 6 + k.len() + v.len()).sum();
    let mut record = Vec::with_capacity(HEADER + 4 + body);
    record.extend_from_slice(&[0; 8]);
    record.extend_from_slice(&epoch.to_le_bytes());
    record.extend_from_slice(&(inserts.len() as u32).to_le_bytes());
    for (k, v) in inserts {
        record.extend_from_slice(&(k.len() as u16).to_le_bytes());
        record.extend_from_slice(k);
        record.extend_from_slice(&(v.len() as u32).to_le_bytes());
        record.extend_from_slice(v);
    }
    let len = (record.len() - HEADER) as u32;
    let crc = crc32fast::hash(&record[8..]);
    record[..4].copy_from_slice(&len.to_le_bytes());
    record[4..8].copy_from_slice(&crc.to_le_bytes());
    record
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if bytes.len() < n {
        return None;
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Some(head)
}

fn payload_inserts(mut p: &[u8]) -> Option<Vec<Insert>> {
    let count = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?);
    let mut out = Vec::with_capacity((count as usize).min(4096));
    for _ in 0..count {
        let kl = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?) as usize;
        let k = take(&mut p, kl)?.to_vec();
        let vl = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
        let v = take(&mut p, vl)?.to_vec();
        out.push((k, v));
    }
    p.is_empty().then_some(out)
}

/// The record starting at `at`, if one starts there and checks: its epoch, inserts and size.
fn record_at(bytes: &[u8], at: usize) -> Option<(u64, Vec<Insert>, usize)> {
    let rest = bytes.get(at..)?;
    let header = rest.get(..HEADER)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let mut e = [0u8; 8];
    e.copy_from_slice(&header[8..16]);
    if len > MAX_RECORD {
        return None;
    }
    let end = HEADER + len as usize;
    let payload = rest.get(HEADER..end)?;
    if crc32fast::hash(&rest[8..end]) != crc {
        return None;
    }
    Some((u64::from_le_bytes(e), payload_inserts(payload)?, end))
}

/// The first offset after `from` where a record of one of `epochs` starts and checks.
fn next_record_of(bytes: &[u8], from: usize, epochs: &[u64]) -> Option<usize> {
    if epochs.is_empty() {
        return None;
    }
    let patterns: Vec<[u8; 8]> = epochs.iter().map(|e| e.to_le_bytes()).collect();
    let mut at = from;
    while at + HEADER <= bytes.len() {
        let field = &bytes[at + 8..at + HEADER];
        if patterns.iter().any(|p| p == field) && record_at(bytes, at).is_some() {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// One record found in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where it starts in the file.
    pub offset: usize,
    /// Its inserts.
    pub inserts: Vec<Insert>,
}

/// What follows the last good record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Only zeros: the log ends cleanly.
    Clean,
    /// Bytes from this offset are neither zeros nor a record: a torn append or damage.
    Unreadable(usize),
}

/// A decoded log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The records, oldest first.
    pub records: Vec<Record>,
    /// Where the last good record ends (appends would continue here).
    pub len: usize,
    /// The records' epoch (`None` for an empty log).
    pub epoch: Option<u64>,
    /// Damaged stretches `[from, to)` between good records that the scan jumped over.
    pub skipped: Vec<(usize, usize)>,
    /// What follows the last good record.
    pub tail: Tail,
    /// One past the last non-zero byte.
    pub dirty_to: usize,
}

/// Decodes a log file's bytes. Never panics. `hints` are epochs the log may be in (from
/// the mark): they let the scan find the records when the first one is damaged.
pub fn decode(bytes: &[u8], hints: &[u64]) -> Scan {
    let dirty_to = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    let mut epoch: Option<u64> = None;
    let mut at = 0usize;
    let tail = loop {
        if at >= dirty_to {
            break Tail::Clean;
        }
        if let Some((e, inserts, size)) = record_at(bytes, at) {
            if epoch.is_none_or(|x| x == e) {
                epoch = Some(e);
                records.push(Record {
                    offset: at,
                    inserts,
                });
                at += size;
                continue;
            }
        }
        // Not a record of this log here. Further on, a record of the log's epoch (or, before
        // the first good record, of an epoch the mark names) means damage in between.
        let wanted: Vec<u64> = match epoch {
            Some(e) => vec![e],
            None => hints.to_vec(),
        };
        match next_record_of(bytes, at + 1, &wanted) {
            Some(next) => {
                skipped.push((at, next));
                at = next;
            }
            None => break Tail::Unreadable(at),
        }
    };
    let len = match tail {
        Tail::Unreadable(from) => from,
        Tail::Clean => at,
    };
    Scan {
        records,
        len,
        epoch,
        skipped,
        tail,
        dirty_to: dirty_to.max(len),
    }
}

/// Opens `path` for reading and writing, creating it if missing. A file created here gets
/// the owner of its folder at once, whoever runs the process; a root command additionally
/// hands back everything else it created (sled's files) when it ends
/// ([`crate::storage::store::give_to_owner`]).
pub(crate) fn open_rw(path: &Path) -> std::io::Result<File> {
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if !existed {
        use std::os::unix::fs::MetadataExt;
        if let Some(parent) = path.parent() {
            let (dir, me) = (std::fs::metadata(parent)?, file.metadata()?);
            if (dir.uid(), dir.gid()) != (me.uid(), me.gid()) {
                // Only root can give a file away; for anyone else the owners already match.
                if let Err(e) = std::os::unix::fs::fchown(&file, Some(dir.uid()), Some(dir.gid())) {
                    tracing::warn!(path = %path.display(), "cannot give the new file to the owner of its folder: {e}");
                }
            }
        }
    }
    Ok(file)
}

/// A fresh random epoch.
pub fn new_epoch() -> u64 {
    random_u64()
}

/// 64 random bits (the clock's nanoseconds where the system has no entropy source).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No entropy source: the clock still differs from any earlier epoch.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        return nanos;
    }
    u64::from_le_bytes(b)
}

/// What [`Wal::open`] found besides the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The decoded log.
    pub scan: Scan,
    /// The file did not exist.
    pub created: bool,
    /// Its length before it was grown to [`PREALLOC`] (shorter than that: it was cut).
    pub found_len: u64,
}

impl Wal {
    /// Opens (creating) the log at `path` and returns what it holds; the file is grown to
    /// [`PREALLOC`] bytes of zeros if shorter. `hints`: see [`decode`].
    pub fn open(path: &Path, hints: &[u64]) -> std::io::Result<(Wal, Opened)> {
        let created = !path.exists();
        let mut file = open_rw(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let scan = decode(&bytes, hints);
        let found_len = bytes.len() as u64;
        if found_len < PREALLOC {
            let zeros = vec![0u8; (PREALLOC - found_len) as usize];
            file.write_all_at(&zeros, found_len)?;
            file.sync_all()?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let wal = Wal {
            path: path.to_path_buf(),
            file,
            len: scan.len as u64,
            dirty_to: scan.dirty_to as u64,
            epoch: scan.epoch.unwrap_or_else(new_epoch),
            oldest: (!scan.records.is_empty()).then(Instant::now),
            pinned: false,
        };
        Ok((
            wal,
            Opened {
                scan,
                created,
                found_len,
            },
        ))
    }

    /// Appends one record and waits until it is on disk. A failed append is overwritten by
    /// the next one (and, being unfinished, is not part of the log if the process dies).
    pub fn append(&mut self, inserts: &[Insert]) -> std::io::Result<()> {
        let record = encode(self.epoch, inserts);
        self.file.write_all_at(&record, self.len)?;
        self.file.sync_data()?;
        self.len += record.len() as u64;
        self.dirty_to = self.dirty_to.max(self.len);
        self.oldest.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Keeps the log until the process ends: something it holds could not be put
    /// anywhere else, so only a replay at the next start may take it out.
    pub fn pin(&mut self) {
        self.pinned = true;
    }

    /// Whether [`Wal::pin`] was called.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Whether a checkpoint is due (by size or by the age of the oldest record).
    pub fn checkpoint_due(&self) -> bool {
        !self.pinned
            && (self.len >= CHECKPOINT_BYTES
                || self
                    .oldest
                    .is_some_and(|t| t.elapsed().as_secs() >= CHECKPOINT_SECS))
    }

    /// Due and left so for as long again: no commit came to find it due (an idle gateway's
    /// checkpoint thread takes it then, not in the middle of a run of taps).
    pub fn checkpoint_overdue(&self) -> bool {
        !self.pinned
            && self
                .oldest
                .is_some_and(|t| t.elapsed().as_secs() >= 2 * CHECKPOINT_SECS)
    }

    /// Empties the log (call only once what it holds is durable elsewhere and the mark
    /// names `epoch`): zeroes every byte records used, syncs, and continues in `epoch`.
    pub fn reset(&mut self, epoch: u64) -> std::io::Result<()> {
        if self.pinned {
            return Ok(());
        }
        if self.dirty_to > 0 {
            let zeros = vec![0u8; self.dirty_to as usize];
            self.file.write_all_at(&zeros, 0)?;
            self.file.sync_data()?;
        }
        self.len = 0;
        self.dirty_to = 0;
        self.epoch = epoch;
        self.oldest = None;
        Ok(())
    }

    /// The epoch appends are written in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for checks that it is still the one in the data directory).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The acknowledgement log: which events the broker has acknowledged since the last
/// checkpoint, so that a restart after `kill -9` does not deliver them again.
///
/// An acknowledgement removes the event's pending marker in sled's memory only; without
/// this log a crash would bring back every marker removed since the last checkpoint (and
/// the log replay would too). Entries are appended without a sync: they survive a process
/// crash (the page cache does), and after a power cut the worst case is a redelivery.
/// Applying an acknowledgement is always right, however old, because an outbox position is
/// never reused, so the file needs no epoch: a checkpoint just truncates it.
///
/// Entry: `position: u64 LE`, `position ^ ACK_CHECK: u64 LE` (zeros or a torn entry do not
/// pass).
#[derive(Debug)]
pub struct AckLog {
    file: File,
    len: u64,
    /// Bytes after the good entries (damage, or a torn entry) that a clear must remove.
    junk: bool,
    failed: bool,
}

const ACK_CHECK: u64 = 0x1d06_ac4e_d5ee_0001;

/// Decodes an acknowledgement log; stops at the first entry that does not check.
pub fn decode_acks(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    for entry in bytes.chunks_exact(16) {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&entry[..8]);
        b.copy_from_slice(&entry[8..]);
        let (pos, check) = (u64::from_le_bytes(a), u64::from_le_bytes(b));
        if pos == 0 || pos ^ ACK_CHECK != check {
            break;
        }
        out.push(pos);
    }
    out
}

/// What [`AckLog::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckScan {
    /// The acknowledged positions.
    pub acks: Vec<u64>,
    /// Bytes after them that are not acknowledgements: `(offset, count)`.
    pub unreadable: Option<(u64, u64)>,
}

impl AckLog {
    /// Opens (creating) the log at `path` and returns the acknowledged positions it holds.
    pub fn open(path: &Path) -> std::io::Result<(AckLog, AckScan)> {
        let mut file = open_rw(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let acks = decode_acks(&bytes);
        let len = acks.len() as u64 * 16;
        let rest = bytes.len() as u64 - len;
        Ok((
            AckLog {
                file,
                len,
                junk: rest > 0,
                failed: false,
            },
            AckScan {
                acks,
                unreadable: (rest > 0).then_some((len, rest)),
            },
        ))
    }

    /// Notes acknowledged positions (no sync). A failure is logged once and otherwise only
    /// means redeliveries after a crash.
    pub fn append(&mut self, positions: &[u64]) {
        let mut bytes = Vec::with_capacity(positions.len() * 16);
        for pos in positions {
            bytes.extend_from_slice(&pos.to_le_bytes());
            bytes.extend_from_slice(&(pos ^ ACK_CHECK).to_le_bytes());
        }
        match self.file.write_all_at(&bytes, self.len) {
            Ok(()) => self.len += bytes.len() as u64,
            Err(e) => {
                if !self.failed {
                    tracing::warn!("cannot note acknowledgements in the outbox's ack log ({e}); after a crash they are delivered again");
                    self.failed = true;
                }
            }
        }
    }

    /// Empties the log (once the acknowledgements in it are durable in sled).
    pub fn clear(&mut self) -> std::io::Result<()> {
        if self.len == 0 && !self.junk {
            return Ok(());
        }
        self.file.set_len(0)?;
        self.len = 0;
        self.junk = false;
        self.failed = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ins(k: &str, v: &str) -> Insert {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn inserts(scan: &Scan) -> Vec<Vec<Insert>> {
        scan.records.iter().map(|r| r.inserts.clone()).collect()
    }

    #[test]
    fn records_come_back_in_order_and_an_emptied_log_is_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let epoch;
        {
            let (mut w, opened) = Wal::open(&path, &[]).unwrap();
            assert!(opened.created && opened.scan.records.is_empty());
            assert_eq!(opened.scan.tail, Tail::Clean);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOC);
            w.append(&[ins("a", "1"), ins("b", "")]).unwrap();
            w.append(&[ins("c", "3")]).unwrap();
            epoch = w.epoch;
        }
        let (mut w, opened) = Wal::open(&path, &[]).unwrap();
        assert_eq!(
            inserts(&opened.scan),
            vec![vec![ins("a", "1"), ins("b", "")], vec![ins("c", "3")]]
        );
        assert_eq!(opened.scan.tail, Tail::Clean);
        assert!(opened.scan.skipped.is_empty());
        assert_eq!(w.epoch, epoch, "appends go on in the same epoch");
        w.append(&[ins("e", "5")]).unwrap();
        w.reset(42).unwrap();
        assert_eq!(w.epoch, 42);
        drop(w);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes.iter().all(|b| *b == 0),
            "emptying zeroes every byte used"
        );
        assert_eq!(bytes.len() as u64, PREALLOC, "the file keeps its size");
    }

    #[test]
    fn a_torn_append_shows_as_an_unreadable_tail() {
        let mut bytes = encode(7, &[ins("a", "1")]);
        let good = bytes.len();
        let torn = encode(7, &[ins("b", "2")]);
        bytes.extend_from_slice(&torn[..torn.len() - 3]);
        bytes.extend_from_slice(&[0u8; 100]);
        let s = decode(&bytes, &[]);
        assert_eq!(inserts(&s), vec![vec![ins("a", "1")]]);
        assert_eq!(s.tail, Tail::Unreadable(good));
        assert_eq!(s.len, good);
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_skipped_and_named() {
        let recs: Vec<Vec<u8>> = (0..4)
            .map(|i| encode(7, &[ins("k", &format!("value {i}"))]))
            .collect();
        let bytes: Vec<u8> = recs.concat();
        // One flipped byte in each place a record can be hit: length, checksum, epoch, payload.
        for hit in [0, 5, 10, HEADER + 3] {
            let mut damaged = bytes.clone();
            damaged[recs[0].len() + hit] ^= 0x10;
            let s = decode(&damaged, &[]);
            let values: Vec<_> = s.records.iter().map(|r| r.inserts[0].1.clone()).collect();
            assert_eq!(
                values,
                vec![
                    b"value 0".to_vec(),
                    b"value 2".to_vec(),
                    b"value 3".to_vec()
                ],
                "hit at {hit}"
            );
            assert_eq!(
                s.skipped,
                vec![(recs[0].len(), recs[0].len() + recs[1].len())]
            );
            assert_eq!(s.tail, Tail::Clean);
        }
    }

    #[test]
    fn a_damaged_first_record_is_found_past_with_the_marks_epochs() {
        let bytes: Vec<u8> = (0..3)
            .map(|i| encode(99, &[ins("k", &format!("{i}"))]))
            .collect::<Vec<_>>()
            .concat();
        let mut damaged = bytes.clone();
        damaged[9] ^= 0x01; // the first record's epoch
        let blind = decode(&damaged, &[]);
        assert!(blind.records.is_empty());
        assert_eq!(blind.tail, Tail::Unreadable(0));
        let hinted = decode(&damaged, &[5, 99]);
        assert_eq!(hinted.records.len(), 2);
        assert_eq!(hinted.skipped.len(), 1);
        assert_eq!(hinted.epoch, Some(99));
        assert_eq!(hinted.tail, Tail::Clean);
    }

    #[test]
    fn a_checkpoint_and_its_zeroing_keep_older_records_from_coming_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (mut w, _) = Wal::open(&path, &[]).unwrap();
        for v in ["1", "2", "3"] {
            w.append(&[ins("old", v)]).unwrap();
        }
        w.reset(8).unwrap();
        w.append(&[ins("new", "1")]).unwrap();
        drop(w);
        let (_, opened) = Wal::open(&path, &[]).unwrap();
        assert_eq!(inserts(&opened.scan), vec![vec![ins("new", "1")]]);
        assert_eq!(opened.scan.tail, Tail::Clean);
    }

    #[test]
    fn a_cut_file_is_reported_with_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        drop(Wal::open(&path, &[]).unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let (_, opened) = Wal::open(&path, &[]).unwrap();
        assert!(!opened.created);
        assert_eq!(opened.found_len, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOC);
    }

    #[test]
    fn age_and_size_make_a_checkpoint_due() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(&dir.path().join("w"), &[]).unwrap();
        assert!(!w.checkpoint_due());
        w.append(&[ins("k", &"x".repeat(CHECKPOINT_BYTES as usize))])
            .unwrap();
        assert!(w.checkpoint_due(), "by size");
        w.reset(3).unwrap();
        w.append(&[ins("k", "v")]).unwrap();
        assert!(!w.checkpoint_due());
        w.oldest = Some(Instant::now() - std::time::Duration::from_secs(CHECKPOINT_SECS));
        assert!(w.checkpoint_due(), "by age");
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic_and_cover_a_prefix(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            hint in any::<u64>(),
        ) {
            let s = decode(&bytes, &[hint]);
            prop_assert!(s.len <= bytes.len().max(s.len));
            prop_assert!(s.dirty_to <= bytes.len());
        }

        #[test]
        fn records_then_zeros_decode_cleanly_and_a_flip_anywhere_is_never_silent(
            recs in proptest::collection::vec(
                proptest::collection::vec((proptest::collection::vec(any::<u8>(), 1..20), proptest::collection::vec(any::<u8>(), 0..40)), 1..5),
                1..6),
            epoch in any::<u64>(),
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut bytes = Vec::new();
            for r in &recs {
                bytes.extend_from_slice(&encode(epoch, r));
            }
            let used = bytes.len();
            bytes.extend_from_slice(&[0u8; 64]);
            let s = decode(&bytes, &[epoch]);
            prop_assert_eq!(inserts(&s), recs.clone());
            prop_assert_eq!(s.tail, Tail::Clean);
            prop_assert_eq!(s.len, used);
            // Any one flipped bit in the records: the scan either skips a stretch or ends
            // in an unreadable tail; it never reports a clean log with a record missing.
            let mut damaged = bytes.clone();
            damaged[flip.index(used)] ^= 1 << bit;
            let d = decode(&damaged, &[epoch]);
            let lost = d.records.len() < recs.len();
            prop_assert!(!lost || !d.skipped.is_empty() || d.tail != Tail::Clean);
        }
    }

    #[test]
    fn acknowledgements_come_back_and_garbage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        {
            let (mut a, scan) = AckLog::open(&path).unwrap();
            assert!(scan.acks.is_empty() && scan.unreadable.is_none());
            a.append(&[3, 4]);
            a.append(&[9]);
        }
        let (mut a, scan) = AckLog::open(&path).unwrap();
        assert_eq!(scan.acks, vec![3, 4, 9]);
        a.append(&[10]);
        a.clear().unwrap();
        a.append(&[11]);
        drop(a);
        assert_eq!(AckLog::open(&path).unwrap().1.acks, vec![11]);
        // A torn entry or garbage after the good ones is no acknowledgement, and is said.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&12u64.to_le_bytes());
        bytes.extend_from_slice(&[0xEEu8; 24]);
        std::fs::write(&path, &bytes).unwrap();
        let (mut a, scan) = AckLog::open(&path).unwrap();
        assert_eq!(scan.acks, vec![11]);
        assert_eq!(scan.unreadable, Some((16, 32)));
        // Clearing removes the garbage too.
        a.clear().unwrap();
        drop(a);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_acks_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let acks = decode_acks(&bytes);
            prop_assert!(acks.len() * 16 <= bytes.len());
            prop_assert!(acks.iter().all(|s| *s != 0));
        }
    }

    #[test]
    fn a_new_log_belongs_to_the_owner_of_its_folder() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // A folder owned by someone else, as the daemon's data directory is for root.
        std::os::unix::fs::chown(dir.path(), Some(4242), Some(4343))
            .unwrap_or_else(|e| panic!("the tests run as root (see README); chown failed: {e}"));
        Wal::open(&dir.path().join("w"), &[]).unwrap();
        AckLog::open(&dir.path().join("a")).unwrap();
        for name in ["w", "a"] {
            let m = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{name}");
        }
    }
}
