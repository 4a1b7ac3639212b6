//! The outbox's write-ahead log: the durability point of a tap.
//!
//! Design: sled 0.34 can only make a write durable with its own flush followed by an
//! `fdatasync` (see [`crate::store::Store::flush`]): two waits for the disk per commit. The
//! log makes one enough. A commit appends one record with the journal inserts it makes,
//! `fdatasync`s the log, and then applies the same inserts to sled in memory. sled writes
//! them out in the background; a *checkpoint* (sled flushed and synced, then the log
//! emptied) bounds the log by size and age. On open, the records still in the log are
//! applied to sled again (inserts are idempotent), sled is synced, and the log is emptied.
//!
//! The file is kept at least [`PREALLOC`] bytes long, written with zeros once, and records
//! overwrite it from the start: an `fdatasync` then only writes data (no size or extent
//! change for the file system's journal to commit), as cheap as the disk allows.
//!
//! Record: `len: u32 LE`, `crc32(epoch ‖ payload): u32 LE`, `epoch: u64 LE`, `payload`;
//! payload: `count: u32 LE`, then per insert `key_len: u16 LE`, key, `value_len: u32 LE`,
//! value. The log is the run of valid records from offset 0 that share the first one's
//! epoch. Emptying it zeroes the first header and draws a new random epoch, so records of
//! an earlier epoch further on in the file are never taken for new ones. A torn or corrupt
//! record (a crash in the middle of an append) ends the log: it never reached anyone,
//! because the append had not returned.
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
    epoch: u64,
    oldest: Option<Instant>,
    pinned: bool,
}

/// What [`Wal::open`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The complete records, oldest first.
    pub records: Vec<Vec<Insert>>,
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

/// A decoded log: the complete records of the first record's epoch, the bytes they cover
/// and that epoch (`None` for an empty log).
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The records, oldest first.
    pub records: Vec<Vec<Insert>>,
    /// Bytes from the start that they cover.
    pub len: usize,
    /// Their epoch.
    pub epoch: Option<u64>,
}

/// Decodes a log file's bytes. Never panics; stops at the first record that is short,
/// too long, fails its checksum, does not parse or belongs to another epoch.
pub fn decode(bytes: &[u8]) -> Decoded {
    let mut records = Vec::new();
    let mut at = 0usize;
    let mut epoch = None;
    loop {
        let rest = &bytes[at..];
        let Some(header) = rest.get(..HEADER) else {
            break;
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut e = [0u8; 8];
        e.copy_from_slice(&header[8..16]);
        let e = u64::from_le_bytes(e);
        if len > MAX_RECORD || epoch.is_some_and(|x| x != e) {
            break;
        }
        let Some(payload) = rest.get(HEADER..HEADER + len as usize) else {
            break;
        };
        if crc32fast::hash(&rest[8..HEADER + len as usize]) != crc {
            break;
        }
        let Some(inserts) = payload_inserts(payload) else {
            break;
        };
        epoch = Some(e);
        records.push(inserts);
        at += HEADER + len as usize;
    }
    Decoded {
        records,
        len: at,
        epoch,
    }
}

/// Opens `path` for reading and writing, creating it if missing. A file created here gets
/// the owner of its folder at once, whoever runs the process; a root command additionally
/// hands back everything else it created (sled's files) when it ends
/// ([`crate::store::give_to_owner`]).
fn open_rw(path: &Path) -> std::io::Result<File> {
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

fn new_epoch() -> u64 {
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

impl Wal {
    /// Opens (creating) the log at `path` and returns what it holds; the file is grown to
    /// [`PREALLOC`] bytes of zeros if shorter.
    pub fn open(path: &Path) -> std::io::Result<(Wal, Recovered)> {
        let mut file = open_rw(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let decoded = decode(&bytes);
        // What follows the records (zeros, a torn append, an older epoch's records, or
        // the rest of one that new records partly overwrote) is not part of the log.
        if (bytes.len() as u64) < PREALLOC {
            let zeros = vec![0u8; (PREALLOC - bytes.len() as u64) as usize];
            file.write_all_at(&zeros, bytes.len() as u64)?;
            file.sync_all()?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let wal = Wal {
            path: path.to_path_buf(),
            file,
            len: decoded.len as u64,
            epoch: decoded.epoch.unwrap_or_else(new_epoch),
            oldest: (!decoded.records.is_empty()).then(Instant::now),
            pinned: false,
        };
        Ok((
            wal,
            Recovered {
                records: decoded.records,
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
        self.oldest.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Keeps the log until the process ends: something it holds could not be put
    /// anywhere else, so only a replay at the next start may take it out.
    pub fn pin(&mut self) {
        self.pinned = true;
    }

    /// Whether a checkpoint is due (by size or by the age of the oldest record).
    pub fn checkpoint_due(&self) -> bool {
        !self.pinned
            && (self.len >= CHECKPOINT_BYTES
                || self
                    .oldest
                    .is_some_and(|t| t.elapsed().as_secs() >= CHECKPOINT_SECS))
    }

    /// Empties the log (call only once what it holds is durable elsewhere): zeroes the
    /// first header and starts a new epoch.
    pub fn reset(&mut self) -> std::io::Result<()> {
        if self.len == 0 || self.pinned {
            return Ok(());
        }
        self.file.write_all_at(&[0u8; HEADER], 0)?;
        self.file.sync_data()?;
        self.len = 0;
        self.epoch = new_epoch();
        self.oldest = None;
        Ok(())
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
}

/// The acknowledgement log: which events the broker has acknowledged since the last
/// checkpoint, so that a restart after `kill -9` does not deliver them again.
///
/// An acknowledgement removes the event's pending marker in sled's memory only; without
/// this log a crash would bring back every marker removed since the last checkpoint (and
/// the log replay would too). Entries are appended without a sync: they survive a process
/// crash (the page cache does), and after a power cut the worst case is a redelivery.
/// Applying an acknowledgement is always right, however old, because a `seq` is never
/// reused, so the file needs no epoch: a checkpoint just truncates it.
///
/// Entry: `seq: u64 LE`, `seq ^ ACK_CHECK: u64 LE` (zeros or a torn entry do not pass).
#[derive(Debug)]
pub struct AckLog {
    file: File,
    len: u64,
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
        let (seq, check) = (u64::from_le_bytes(a), u64::from_le_bytes(b));
        if seq == 0 || seq ^ ACK_CHECK != check {
            break;
        }
        out.push(seq);
    }
    out
}

impl AckLog {
    /// Opens (creating) the log at `path` and returns the acknowledged seqs it holds.
    pub fn open(path: &Path) -> std::io::Result<(AckLog, Vec<u64>)> {
        let mut file = open_rw(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let acks = decode_acks(&bytes);
        let len = acks.len() as u64 * 16;
        Ok((
            AckLog {
                file,
                len,
                failed: false,
            },
            acks,
        ))
    }

    /// Notes acknowledged seqs (no sync). A failure is logged once and otherwise only
    /// means redeliveries after a crash.
    pub fn append(&mut self, seqs: &[u64]) {
        let mut bytes = Vec::with_capacity(seqs.len() * 16);
        for seq in seqs {
            bytes.extend_from_slice(&seq.to_le_bytes());
            bytes.extend_from_slice(&(seq ^ ACK_CHECK).to_le_bytes());
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
        if self.len == 0 {
            return Ok(());
        }
        self.file.set_len(0)?;
        self.len = 0;
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

    #[test]
    fn records_come_back_in_order_and_a_torn_append_is_not_part_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let epoch;
        {
            let (mut w, r) = Wal::open(&path).unwrap();
            assert_eq!(r, Recovered::default());
            assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOC);
            w.append(&[ins("a", "1"), ins("b", "")]).unwrap();
            w.append(&[ins("c", "3")]).unwrap();
            epoch = w.epoch;
            // A crash in the middle of a third append.
            let third = encode(epoch, &[ins("d", "4")]);
            w.file
                .write_all_at(&third[..third.len() - 2], w.len)
                .unwrap();
        }
        let (mut w, r) = Wal::open(&path).unwrap();
        assert_eq!(
            r.records,
            vec![vec![ins("a", "1"), ins("b", "")], vec![ins("c", "3")]]
        );
        assert_eq!(w.epoch, epoch, "appends go on in the same epoch");
        // Appends go after the last good record, over the torn bytes.
        w.append(&[ins("e", "5")]).unwrap();
        drop(w);
        let (mut w, r) = Wal::open(&path).unwrap();
        assert_eq!(r.records.len(), 3);
        assert_eq!(r.records[2], vec![ins("e", "5")]);
        w.reset().unwrap();
        assert_ne!(w.epoch, epoch);
        drop(w);
        let (_, r) = Wal::open(&path).unwrap();
        assert!(r.records.is_empty());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            PREALLOC,
            "the file keeps its size"
        );
    }

    #[test]
    fn after_a_reset_older_records_further_on_are_not_taken_for_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (mut w, _) = Wal::open(&path).unwrap();
        // Same sizes, so that old records sit exactly where new ones end.
        for v in ["1", "2", "3"] {
            w.append(&[ins("old", v)]).unwrap();
        }
        w.reset().unwrap();
        w.append(&[ins("new", "1")]).unwrap();
        drop(w);
        let (_, r) = Wal::open(&path).unwrap();
        assert_eq!(r.records, vec![vec![ins("new", "1")]]);
    }

    #[test]
    fn a_flipped_bit_ends_the_log_at_that_record() {
        let mut bytes = encode(7, &[ins("a", "1")]);
        let second = encode(7, &[ins("b", "2")]);
        let at = bytes.len() + HEADER + 5;
        bytes.extend_from_slice(&second);
        bytes.extend_from_slice(&encode(7, &[ins("c", "3")]));
        bytes[at] ^= 0x40;
        let d = decode(&bytes);
        assert_eq!(d.records, vec![vec![ins("a", "1")]]);
        assert_eq!(d.epoch, Some(7));
    }

    #[test]
    fn age_and_size_make_a_checkpoint_due() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(&dir.path().join("w")).unwrap();
        assert!(!w.checkpoint_due());
        w.append(&[ins("k", &"x".repeat(CHECKPOINT_BYTES as usize))])
            .unwrap();
        assert!(w.checkpoint_due(), "by size");
        w.reset().unwrap();
        w.append(&[ins("k", "v")]).unwrap();
        assert!(!w.checkpoint_due());
        w.oldest = Some(Instant::now() - std::time::Duration::from_secs(CHECKPOINT_SECS));
        assert!(w.checkpoint_due(), "by age");
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic_and_cover_a_prefix(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let d = decode(&bytes);
            prop_assert!(d.len <= bytes.len());
        }

        #[test]
        fn records_followed_by_garbage_or_older_records_are_all_found(
            recs in proptest::collection::vec(
                proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..20), proptest::collection::vec(any::<u8>(), 0..40)), 0..5),
                0..6),
            cut in 0usize..16,
            epoch in any::<u64>(),
        ) {
            let mut bytes = Vec::new();
            for r in &recs {
                bytes.extend_from_slice(&encode(epoch, r));
            }
            let clean = bytes.len();
            if recs.is_empty() {
                // An emptied log starts with a zeroed header.
                bytes.extend_from_slice(&[0; HEADER]);
            }
            // A whole record of another epoch, then a torn one of ours.
            bytes.extend_from_slice(&encode(epoch ^ 1, &[(vec![9], vec![9])]));
            let extra = encode(epoch, &[(vec![1, 2, 3], vec![4, 5, 6])]);
            bytes.extend_from_slice(&extra[..cut.min(extra.len() - 1)]);
            let d = decode(&bytes);
            prop_assert_eq!(d.records, recs);
            prop_assert_eq!(d.len, clean);
        }
    }

    #[test]
    fn acknowledgements_come_back_and_garbage_ends_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        {
            let (mut a, acks) = AckLog::open(&path).unwrap();
            assert!(acks.is_empty());
            a.append(&[3, 4]);
            a.append(&[9]);
        }
        let (mut a, acks) = AckLog::open(&path).unwrap();
        assert_eq!(acks, vec![3, 4, 9]);
        a.append(&[10]);
        a.clear().unwrap();
        a.append(&[11]);
        drop(a);
        assert_eq!(AckLog::open(&path).unwrap().1, vec![11]);
        // A torn entry or zeros after the good ones are not acknowledgements.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&12u64.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 24]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(AckLog::open(&path).unwrap().1, vec![11]);
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
        Wal::open(&dir.path().join("w")).unwrap();
        AckLog::open(&dir.path().join("a")).unwrap();
        for name in ["w", "a"] {
            let m = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{name}");
        }
    }
}
