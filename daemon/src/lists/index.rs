//! The in-memory blocklist index: compact and a single memory access per lookup.
//!
//! Design: an open-addressing hash table of `u64` slots with linear probing. A slot packs a
//! whole entry: the UID (4 or 7 bytes, in the low 56 bits), its length code (top 2 bits;
//! never 0, so an all-zero slot is empty) and the status code (3 bits above the UID). A
//! lookup hashes the UID, reads one cache line and compares. A table is built with 5/3
//! slots per card (a load of 0.6: 13.3 bytes per listed card) and grows when changes
//! push its load past 3/4; the home slot is the hash scaled to the capacity (multiply and
//! shift), so the capacity need not be a power of two. At those loads a probe almost
//! always ends in the home slot's cache line or the next. 10-byte UIDs (rare on ID06
//! cards) live in a small side map. A table is immutable once shared: a change builds a
//! modified copy that the blocklist swaps in, so readers never wait.
//!
//! An index can be saved to a file and read back without rebuilding (see [`IndexFile`]):
//! reading 5 million cards' table is a sequential read, building it is millions of
//! random writes.

use id06_protocol::{CardStatus, CardUid};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

const UID_BITS: u32 = 56;
const UID_MASK: u64 = (1 << UID_BITS) - 1;
const STATUS_SHIFT: u32 = 56;
const STATUS_MASK: u64 = 0b111 << STATUS_SHIFT;
const LEN_SHIFT: u32 = 62;
/// The bits that identify a card in a slot (everything but the status).
const KEY_MASK: u64 = !STATUS_MASK;
/// The smallest table.
const MIN_CAPACITY: usize = 16;

/// The packed key of a 4- or 7-byte UID (length code in the top bits), or `None` for a
/// 10-byte UID.
fn short_key(uid: &CardUid) -> Option<u64> {
    let code: u64 = match uid.len() {
        4 => 1,
        7 => 2,
        _ => return None,
    };
    let mut v: u64 = 0;
    for b in uid.as_bytes() {
        v = (v << 8) | u64::from(*b);
    }
    Some((code << LEN_SHIFT) | (v & UID_MASK))
}

/// The home slot of `key` in a table of `capacity` slots: the key times 2^64/φ (which
/// spreads neighbouring UIDs over the whole word), scaled to the capacity.
#[inline]
fn slot_of(key: u64, capacity: usize) -> usize {
    let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(h) * capacity as u128) >> 64) as usize
}

/// The table size built for `n` cards: a load of 0.6.
fn capacity_for(n: usize) -> usize {
    n.saturating_mul(5).div_ceil(3).max(MIN_CAPACITY)
}

/// Whether `n` cards are too many for `capacity` slots (a load above 3/4).
fn overloaded(n: usize, capacity: usize) -> bool {
    n.saturating_mul(4) > capacity.saturating_mul(3)
}

/// The immutable index.
#[derive(Debug, Clone)]
pub struct CompactIndex {
    slots: Box<[u64]>,
    short_len: usize,
    long: HashMap<u128, CardStatus>,
}

impl Default for CompactIndex {
    fn default() -> Self {
        CompactIndex::with_capacity_for(0)
    }
}

impl CompactIndex {
    /// An empty table sized for `n` cards.
    pub fn with_capacity_for(n: usize) -> CompactIndex {
        CompactIndex {
            slots: vec![0u64; capacity_for(n)].into_boxed_slice(),
            short_len: 0,
            long: HashMap::new(),
        }
    }

    /// Builds an index from entries (a later entry for the same card wins). Statuses that
    /// are not listed (`active`, `unlisted`) are left out.
    pub fn build(
        entries: impl IntoIterator<Item = (CardUid, CardStatus)>,
        size_hint: usize,
    ) -> CompactIndex {
        let mut idx = CompactIndex::with_capacity_for(size_hint);
        idx.extend(entries);
        idx
    }

    /// Adds entries to a table being built (a later entry for the same card wins).
    pub fn extend(&mut self, entries: impl IntoIterator<Item = (CardUid, CardStatus)>) {
        for (uid, status) in entries {
            self.insert_mut(uid, status);
        }
    }

    /// The card's status, or `None` when it is not listed.
    #[inline]
    pub fn lookup(&self, uid: &CardUid) -> Option<CardStatus> {
        match short_key(uid) {
            Some(key) => {
                let capacity = self.slots.len();
                let mut i = slot_of(key, capacity);
                loop {
                    let s = self.slots[i];
                    if s == 0 {
                        return None;
                    }
                    if s & KEY_MASK == key {
                        return CardStatus::from_code(((s & STATUS_MASK) >> STATUS_SHIFT) as u8);
                    }
                    i += 1;
                    if i == capacity {
                        i = 0;
                    }
                }
            }
            None => self.long.get(&uid.key()).copied(),
        }
    }

    /// Listed cards.
    pub fn len(&self) -> usize {
        self.short_len + self.long.len()
    }

    /// Whether nothing is listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes used.
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * 8 + self.long.capacity() * (16 + 8)
    }

    /// Every entry (unordered).
    pub fn iter(&self) -> impl Iterator<Item = (CardUid, CardStatus)> + '_ {
        let short = self
            .slots
            .iter()
            .filter(|s| **s != 0)
            .filter_map(|s| unpack(*s));
        let long = self
            .long
            .iter()
            .filter_map(|(k, s)| CardUid::from_key(*k).ok().map(|u| (u, *s)));
        short.chain(long)
    }

    /// A copy with `set` applied (statuses that are not listed take the card off) and
    /// `clear` removed. The original is untouched.
    pub fn with_changes(&self, set: &[(CardUid, CardStatus)], clear: &[CardUid]) -> CompactIndex {
        let grown = self.short_len + set.len();
        let mut next = if overloaded(grown, self.slots.len()) {
            CompactIndex::build(self.iter(), self.len() + set.len())
        } else {
            self.clone()
        };
        next.apply_mut(set, clear);
        next
    }

    /// Applies changes in place (to a table not shared yet).
    pub fn apply_mut(&mut self, set: &[(CardUid, CardStatus)], clear: &[CardUid]) {
        for uid in clear {
            self.remove_mut(uid);
        }
        for (uid, status) in set {
            self.insert_mut(*uid, *status);
        }
    }

    fn insert_mut(&mut self, uid: CardUid, status: CardStatus) {
        if !status.is_listed() {
            self.remove_mut(&uid);
            return;
        }
        let Some(key) = short_key(&uid) else {
            self.long.insert(uid.key(), status);
            return;
        };
        if overloaded(self.short_len + 1, self.slots.len()) {
            let mut bigger = CompactIndex::with_capacity_for(self.short_len + 1);
            for s in self.slots.iter().filter(|s| **s != 0) {
                bigger.place(*s);
            }
            self.slots = bigger.slots;
        }
        let slot = key | (u64::from(status.code()) << STATUS_SHIFT);
        let capacity = self.slots.len();
        let mut i = slot_of(key, capacity);
        loop {
            let s = self.slots[i];
            if s == 0 {
                self.slots[i] = slot;
                self.short_len += 1;
                return;
            }
            if s & KEY_MASK == key {
                self.slots[i] = slot;
                return;
            }
            i += 1;
            if i == capacity {
                i = 0;
            }
        }
    }

    /// Puts a packed slot into a table known not to contain its key.
    fn place(&mut self, slot: u64) {
        let capacity = self.slots.len();
        let mut i = slot_of(slot & KEY_MASK, capacity);
        while self.slots[i] != 0 {
            i += 1;
            if i == capacity {
                i = 0;
            }
        }
        self.slots[i] = slot;
    }

    fn remove_mut(&mut self, uid: &CardUid) {
        let Some(key) = short_key(uid) else {
            self.long.remove(&uid.key());
            return;
        };
        let capacity = self.slots.len();
        let next = |i: usize| if i + 1 == capacity { 0 } else { i + 1 };
        // Cyclic distance from `from` forward to `to`.
        let dist = |from: usize, to: usize| {
            if to >= from {
                to - from
            } else {
                to + capacity - from
            }
        };
        let mut i = slot_of(key, capacity);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return;
            }
            if s & KEY_MASK == key {
                break;
            }
            i = next(i);
        }
        // Backward-shift deletion: move later members of the probe run into the hole when
        // their home slot is not between the hole and themselves.
        self.slots[i] = 0;
        self.short_len -= 1;
        let mut hole = i;
        let mut j = next(i);
        loop {
            let s = self.slots[j];
            if s == 0 {
                return;
            }
            let home = slot_of(s & KEY_MASK, capacity);
            if dist(home, hole) < dist(home, j) {
                self.slots[hole] = s;
                self.slots[j] = 0;
                hole = j;
            }
            j = next(j);
        }
    }
}

/// The entry in a packed slot.
fn unpack(s: u64) -> Option<(CardUid, CardStatus)> {
    let len = match s >> LEN_SHIFT {
        1 => 4,
        _ => 7,
    };
    let bytes = (s & UID_MASK).to_be_bytes();
    let uid = CardUid::from_bytes(&bytes[8 - len..]).ok()?;
    let status = CardStatus::from_code(((s & STATUS_MASK) >> STATUS_SHIFT) as u8)?;
    Some((uid, status))
}

/// An index saved to a file, to be read back at start without rebuilding.
///
/// Layout, all integers little-endian: the magic `ID06BIX1`; the capacity, the number of
/// occupied slots and the number of 10-byte cards (`u64` each); the slots (`u64` each);
/// each 10-byte card as its key (`u128`) and status code (`u64`); a CRC-32 of everything
/// before it (`u32`). The CRC also names the file: the blocklist records the CRC of the
/// file it wrote for a generation, and a file whose CRC differs (another generation's, a
/// torn write, a disk that lied) is not used.
pub struct IndexFile;

const FILE_MAGIC: &[u8; 8] = b"ID06BIX1";
const FILE_HEADER: usize = 32;
const IO_BLOCK: usize = 1 << 20;

/// A CRC-32 while writing.
struct Summing<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Summing<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.inner.write_all(bytes)
    }
}

impl IndexFile {
    /// Writes `index` to `path` (replacing it) and returns the file's CRC. The file is
    /// written under a temporary name, synced, and renamed into place.
    pub fn write(path: &Path, index: &CompactIndex) -> std::io::Result<u32> {
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp)?;
        let mut out = Summing {
            inner: std::io::BufWriter::with_capacity(IO_BLOCK, file),
            crc: crc32fast::Hasher::new(),
        };
        out.put(FILE_MAGIC)?;
        out.put(&(index.slots.len() as u64).to_le_bytes())?;
        out.put(&(index.short_len as u64).to_le_bytes())?;
        out.put(&(index.long.len() as u64).to_le_bytes())?;
        let mut block = Vec::with_capacity(IO_BLOCK);
        for group in index.slots.chunks(IO_BLOCK / 8) {
            block.clear();
            for s in group {
                block.extend_from_slice(&s.to_le_bytes());
            }
            out.put(&block)?;
        }
        for (key, status) in &index.long {
            out.put(&key.to_le_bytes())?;
            out.put(&u64::from(status.code()).to_le_bytes())?;
        }
        let crc = out.crc.finalize();
        out.inner.write_all(&crc.to_le_bytes())?;
        let file = out.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        Ok(crc)
    }

    /// Reads the index in `path`, which must carry the CRC `expected`. The error says
    /// why the file cannot be used.
    pub fn read(path: &Path, expected: u32) -> Result<CompactIndex, String> {
        let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
        let size = file
            .metadata()
            .map_err(|e| format!("cannot read its size: {e}"))?
            .len();
        let mut head = [0u8; FILE_HEADER];
        file.read_exact(&mut head)
            .map_err(|e| format!("cannot read its header: {e}"))?;
        if &head[..8] != FILE_MAGIC {
            return Err("it is not an index file (bad magic)".into());
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let (capacity, short_len, long_len) = (word(8), word(16), word(24));
        // The sizes must add up to the file's length before anything is allocated.
        let expected_size = capacity
            .checked_mul(8)
            .and_then(|b| b.checked_add(long_len.checked_mul(24)?))
            .and_then(|b| b.checked_add(FILE_HEADER as u64 + 4));
        if expected_size != Some(size)
            || capacity < MIN_CAPACITY as u64
            || short_len > capacity
            || overloaded(short_len as usize, capacity as usize)
        {
            return Err(format!(
                "its header (capacity {capacity}, {short_len} cards, {long_len} long UIDs) does not fit its {size} bytes"
            ));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        let mut slots = vec![0u64; capacity as usize].into_boxed_slice();
        let mut block = vec![0u8; IO_BLOCK];
        let mut occupied = 0u64;
        for group in slots.chunks_mut(IO_BLOCK / 8) {
            let bytes = &mut block[..group.len() * 8];
            file.read_exact(bytes)
                .map_err(|e| format!("cannot read its slots: {e}"))?;
            crc.update(bytes);
            for (s, b) in group.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                *s = u64::from_le_bytes(w);
                occupied += u64::from(*s != 0);
            }
        }
        let mut long = HashMap::with_capacity(long_len as usize);
        let mut entry = [0u8; 24];
        for _ in 0..long_len {
            file.read_exact(&mut entry)
                .map_err(|e| format!("cannot read its long UIDs: {e}"))?;
            crc.update(&entry);
            let mut k = [0u8; 16];
            k.copy_from_slice(&entry[..16]);
            let status = CardStatus::from_code(entry[16])
                .ok_or_else(|| format!("a long UID has the unknown status code {}", entry[16]))?;
            long.insert(u128::from_le_bytes(k), status);
        }
        let mut tail = [0u8; 4];
        file.read_exact(&mut tail)
            .map_err(|e| format!("cannot read its CRC: {e}"))?;
        let stored = u32::from_le_bytes(tail);
        let computed = crc.finalize();
        if stored != computed {
            return Err(format!(
                "its content does not match its CRC (stored {stored:08x}, computed {computed:08x}): torn or damaged"
            ));
        }
        if stored != expected {
            return Err(format!(
                "it was written for another list (CRC {stored:08x}, the list in force names {expected:08x})"
            ));
        }
        if occupied != short_len {
            return Err(format!(
                "its header counts {short_len} cards but {occupied} slots are in use"
            ));
        }
        Ok(CompactIndex {
            slots,
            short_len: short_len as usize,
            long,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn uid(n: u64, len: usize) -> CardUid {
        let b = n.to_be_bytes();
        match len {
            4 => CardUid::from_bytes(&b[4..]).unwrap(),
            7 => CardUid::from_bytes(&b[1..]).unwrap(),
            _ => {
                let mut v = vec![0xAA, 0xBB];
                v.extend_from_slice(&b);
                CardUid::from_bytes(&v).unwrap()
            }
        }
    }

    #[test]
    fn lengths_never_collide() {
        // 00000001 (4 bytes) and 00000000000001 (7 bytes) are different cards.
        let idx = CompactIndex::build([(uid(1, 4), CardStatus::Blocked)], 1);
        assert_eq!(idx.lookup(&uid(1, 4)), Some(CardStatus::Blocked));
        assert_eq!(idx.lookup(&uid(1, 7)), None);
        assert_eq!(idx.lookup(&uid(1, 10)), None);
    }

    #[test]
    fn stays_within_14_bytes_per_card() {
        for n in [1_000usize, 100_000] {
            let idx = CompactIndex::build(
                (0..n as u64).map(|i| (uid(i * 7919, 7), CardStatus::Blocked)),
                n,
            );
            assert_eq!(idx.len(), n);
            assert!(
                idx.memory_bytes() <= 14 * n,
                "{} bytes for {n}",
                idx.memory_bytes()
            );
        }
    }

    fn sample(n: u64) -> CompactIndex {
        let mut idx = CompactIndex::build(
            (0..n).map(|i| {
                (
                    uid(i * 104_729, 7),
                    CardStatus::from_code((i % 4) as u8 + 1).unwrap(),
                )
            }),
            n as usize,
        );
        idx.apply_mut(
            &[
                (uid(1, 10), CardStatus::Suspended),
                (uid(2, 10), CardStatus::Terminated),
                (uid(3, 4), CardStatus::Blocked),
            ],
            &[],
        );
        idx
    }

    fn same(a: &CompactIndex, b: &CompactIndex) -> bool {
        let mut x: Vec<_> = a.iter().collect();
        let mut y: Vec<_> = b.iter().collect();
        x.sort_by_key(|(u, _)| *u);
        y.sort_by_key(|(u, _)| *u);
        x == y
    }

    #[test]
    fn a_saved_index_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocklist.index");
        let idx = sample(20_000);
        let crc = IndexFile::write(&path, &idx).unwrap();
        assert!(!path.with_extension("tmp").exists());
        let back = IndexFile::read(&path, crc).unwrap();
        assert_eq!(back.len(), idx.len());
        assert!(same(&back, &idx));
        assert_eq!(back.lookup(&uid(2, 10)), Some(CardStatus::Terminated));
        assert_eq!(back.lookup(&uid(3, 4)), Some(CardStatus::Blocked));
        assert_eq!(back.lookup(&uid(5, 7)), None);
    }

    #[test]
    fn a_damaged_or_foreign_index_file_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocklist.index");
        let crc = IndexFile::write(&path, &sample(5_000)).unwrap();
        let good = std::fs::read(&path).unwrap();

        let e = IndexFile::read(&path, crc ^ 1).unwrap_err();
        assert!(e.contains("another list"), "{e}");

        let mut flipped = good.clone();
        flipped[FILE_HEADER + 800] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        let e = IndexFile::read(&path, crc).unwrap_err();
        assert!(e.contains("does not match its CRC"), "{e}");

        std::fs::write(&path, &good[..good.len() - 9]).unwrap();
        let e = IndexFile::read(&path, crc).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");

        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        let e = IndexFile::read(&path, crc).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");

        std::fs::write(&path, b"not an index").unwrap();
        assert!(IndexFile::read(&path, crc).is_err());
        std::fs::remove_file(&path).unwrap();
        let e = IndexFile::read(&path, crc).unwrap_err();
        assert!(e.contains("cannot open"), "{e}");
    }

    #[test]
    fn a_table_grows_before_its_load_passes_three_quarters() {
        let mut idx = CompactIndex::with_capacity_for(100);
        let start = idx.slots.len();
        for i in 0..1_000u64 {
            idx.apply_mut(&[(uid(i, 7), CardStatus::Blocked)], &[]);
            assert!(idx.short_len * 4 <= idx.slots.len() * 3);
        }
        assert!(idx.slots.len() > start);
        assert_eq!(idx.len(), 1_000);
        assert!((0..1_000).all(|i| idx.lookup(&uid(i, 7)) == Some(CardStatus::Blocked)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, usize, u8),
        Clear(u64, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small key space so that operations hit the same cards and probe runs collide.
        let len = prop_oneof![Just(4usize), Just(7usize), Just(10usize)];
        prop_oneof![
            (0u64..300, len.clone(), 0u8..6).prop_map(|(k, l, s)| Op::Set(k, l, s)),
            (0u64..300, len).prop_map(|(k, l)| Op::Clear(k, l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec(op(), 0..400)) {
            let mut model: HashMap<CardUid, CardStatus> = HashMap::new();
            let mut idx = CompactIndex::default();
            for o in &ops {
                match *o {
                    Op::Set(k, l, s) => {
                        let status = CardStatus::from_code(s).unwrap();
                        if status.is_listed() { model.insert(uid(k, l), status); } else { model.remove(&uid(k, l)); }
                        idx = idx.with_changes(&[(uid(k, l), status)], &[]);
                    }
                    Op::Clear(k, l) => {
                        model.remove(&uid(k, l));
                        idx = idx.with_changes(&[], &[uid(k, l)]);
                    }
                }
            }
            prop_assert_eq!(idx.len(), model.len());
            for k in 0..300u64 {
                for l in [4usize, 7, 10] {
                    prop_assert_eq!(idx.lookup(&uid(k, l)), model.get(&uid(k, l)).copied());
                }
            }
            let mut listed: Vec<_> = idx.iter().collect();
            listed.sort_by_key(|(u, _)| *u);
            let mut expected: Vec<_> = model.into_iter().collect();
            expected.sort_by_key(|(u, _)| *u);
            prop_assert_eq!(listed, expected);
        }
    }
}
