//! The in-memory blocklist index: compact and a single memory access per lookup.
//!
//! Design: an open-addressing hash table of `u64` slots with linear probing. A slot packs a
//! whole entry: the UID (4 or 7 bytes, in the low 56 bits), its length code (top 2 bits;
//! never 0, so an all-zero slot is empty) and the status code (3 bits above the UID). A
//! lookup hashes the UID, reads one cache line and compares; at a load factor of at most
//! one half the probe almost always ends in that line. Capacity is a power of two of at
//! least twice the entries: 16-32 bytes per listed card. 10-byte UIDs (rare on ID06 cards)
//! live in a small side map. The table is immutable once built: a change builds a modified
//! copy that the blocklist swaps in, so readers never wait.

use id06_protocol::{CardStatus, CardUid};
use std::collections::HashMap;

const UID_BITS: u32 = 56;
const UID_MASK: u64 = (1 << UID_BITS) - 1;
const STATUS_SHIFT: u32 = 56;
const STATUS_MASK: u64 = 0b111 << STATUS_SHIFT;
const LEN_SHIFT: u32 = 62;
/// The bits that identify a card in a slot (everything but the status).
const KEY_MASK: u64 = !STATUS_MASK;

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

/// Fibonacci hashing: the top `bits` bits of the key times 2^64/φ.
#[inline]
fn slot_of(key: u64, shift: u32) -> usize {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize
}

/// The immutable index.
#[derive(Debug, Clone)]
pub struct CompactIndex {
    slots: Box<[u64]>,
    /// 64 - log2(capacity).
    shift: u32,
    short_len: usize,
    long: HashMap<u128, CardStatus>,
}

impl Default for CompactIndex {
    fn default() -> Self {
        CompactIndex::with_capacity_for(0)
    }
}

impl CompactIndex {
    fn with_capacity_for(n: usize) -> CompactIndex {
        let capacity = (n.saturating_mul(2)).max(16).next_power_of_two();
        CompactIndex {
            slots: vec![0u64; capacity].into_boxed_slice(),
            shift: 64 - capacity.trailing_zeros(),
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
        for (uid, status) in entries {
            idx.insert_mut(uid, status);
        }
        idx
    }

    /// The card's status, or `None` when it is not listed.
    #[inline]
    pub fn lookup(&self, uid: &CardUid) -> Option<CardStatus> {
        match short_key(uid) {
            Some(key) => {
                let mask = self.slots.len() - 1;
                let mut i = slot_of(key, self.shift);
                loop {
                    let s = self.slots[i];
                    if s == 0 {
                        return None;
                    }
                    if s & KEY_MASK == key {
                        return CardStatus::from_code(((s & STATUS_MASK) >> STATUS_SHIFT) as u8);
                    }
                    i = (i + 1) & mask;
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
        let short = self.slots.iter().filter(|s| **s != 0).filter_map(|s| {
            let len = match s >> LEN_SHIFT {
                1 => 4,
                _ => 7,
            };
            let v = s & UID_MASK;
            let bytes = v.to_be_bytes();
            let uid = CardUid::from_bytes(&bytes[8 - len..]).ok()?;
            let status = CardStatus::from_code(((s & STATUS_MASK) >> STATUS_SHIFT) as u8)?;
            Some((uid, status))
        });
        let long = self
            .long
            .iter()
            .filter_map(|(k, s)| CardUid::from_key(*k).ok().map(|u| (u, *s)));
        short.chain(long)
    }

    /// A copy with `set` applied (statuses that are not listed take the card off) and
    /// `clear` removed. The original is untouched.
    pub fn with_changes(&self, set: &[(CardUid, CardStatus)], clear: &[CardUid]) -> CompactIndex {
        let grown = self.len() + set.len();
        let mut next = if grown * 2 > self.slots.len() {
            CompactIndex::build(self.iter(), grown)
        } else {
            self.clone()
        };
        for uid in clear {
            next.remove_mut(uid);
        }
        for (uid, status) in set {
            next.insert_mut(*uid, *status);
        }
        next
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
        if (self.short_len + 1) * 2 > self.slots.len() {
            let mut bigger = CompactIndex::with_capacity_for(self.short_len + 1);
            for s in self.slots.iter().filter(|s| **s != 0) {
                bigger.place(*s);
            }
            self.slots = bigger.slots;
            self.shift = bigger.shift;
        }
        let slot = key | (u64::from(status.code()) << STATUS_SHIFT);
        let mask = self.slots.len() - 1;
        let mut i = slot_of(key, self.shift);
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
            i = (i + 1) & mask;
        }
    }

    /// Puts a packed slot into a table known not to contain its key.
    fn place(&mut self, slot: u64) {
        let mask = self.slots.len() - 1;
        let mut i = slot_of(slot & KEY_MASK, self.shift);
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    fn remove_mut(&mut self, uid: &CardUid) {
        let Some(key) = short_key(uid) else {
            self.long.remove(&uid.key());
            return;
        };
        let mask = self.slots.len() - 1;
        let mut i = slot_of(key, self.shift);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return;
            }
            if s & KEY_MASK == key {
                break;
            }
            i = (i + 1) & mask;
        }
        // Backward-shift deletion: move later members of the probe run into the hole when
        // their home slot is not between the hole and themselves.
        self.slots[i] = 0;
        self.short_len -= 1;
        let mut hole = i;
        let mut j = (i + 1) & mask;
        loop {
            let s = self.slots[j];
            if s == 0 {
                return;
            }
            let home = slot_of(s & KEY_MASK, self.shift);
            // Distance from home to j and from home to the hole, cyclically.
            let d_j = j.wrapping_sub(home) & mask;
            let d_hole = hole.wrapping_sub(home) & mask;
            if d_hole < d_j {
                self.slots[hole] = s;
                self.slots[j] = 0;
                hole = j;
            }
            j = (j + 1) & mask;
        }
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
    fn stays_within_32_bytes_per_card() {
        for n in [1_000usize, 100_000] {
            let idx = CompactIndex::build(
                (0..n as u64).map(|i| (uid(i * 7919, 7), CardStatus::Blocked)),
                n,
            );
            assert_eq!(idx.len(), n);
            assert!(
                idx.memory_bytes() <= 32 * n,
                "{} bytes for {n}",
                idx.memory_bytes()
            );
        }
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
