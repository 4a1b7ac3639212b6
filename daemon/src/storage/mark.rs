//! `outbox.mark`: the data directory's identity and its last checkpoint, kept apart from the
//! database so that damage to one of them is noticed by the other.
//!
//! Design: the outbox has three records of which positions it has handed out — sled (the
//! archive, durable at checkpoints), the write-ahead log (every commit since the last
//! checkpoint) and this mark (the highest position at the last checkpoint, written and
//! synced by every checkpoint). A start trusts the highest and checks them against each other
//! ([`crate::storage::recovery`]). The mark also holds the stream identifier and its base position
//! (see [`id06_protocol::StreamId`]), so a database that was lost or replaced does not
//! silently take the stream with it, and the log's current and previous epochs, which let a
//! start find the log's records when its first one is damaged.
//!
//! The file is two 512-byte slots; each write goes to the slot not holding the newest valid
//! copy and is synced, so a write torn by a power cut leaves the other slot intact. A slot:
//! `magic (8) ‖ generation u64 ‖ stream (16) ‖ base u64 ‖ last_pos u64 ‖ epoch u64 ‖
//! prev_epoch u64 ‖ crc32 of the preceding 64 bytes`, little-endian, zeros after.

use id06_protocol::StreamId;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The mark's file name in the data directory.
pub const MARK_NAME: &str = "outbox.mark";
const MAGIC: &[u8; 8] = b"ID6MARK1";
const SLOT: usize = 512;
const BODY: usize = 64;

/// What a checkpoint records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The stream new taps are recorded in.
    pub stream: StreamId,
    /// The position before the stream's seq 1 (`seq = position - base`).
    pub base: u64,
    /// The highest position handed out at the checkpoint (exact).
    pub last_pos: u64,
    /// The write-ahead log's epoch for appends after the checkpoint.
    pub epoch: u64,
    /// The epoch before it (records of it may still be in the log if the checkpoint was cut
    /// short between writing this mark and emptying the log).
    pub prev_epoch: u64,
}

/// What [`MarkFile::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkState {
    /// No file: a data directory that was never initialised (or lost its mark).
    Missing,
    /// The newest valid copy, and a note if the other slot is damaged.
    Found {
        /// The newest valid copy.
        mark: Mark,
        /// A damaged slot that is not simply empty (a torn write or damage).
        note: Option<String>,
    },
    /// The file exists but holds no valid copy.
    Damaged(String),
}

/// The open mark file.
#[derive(Debug)]
pub struct MarkFile {
    path: PathBuf,
    file: File,
    generation: u64,
}

fn encode(generation: u64, m: &Mark) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..32].copy_from_slice(m.stream.as_bytes());
    b[32..40].copy_from_slice(&m.base.to_le_bytes());
    b[40..48].copy_from_slice(&m.last_pos.to_le_bytes());
    b[48..56].copy_from_slice(&m.epoch.to_le_bytes());
    b[56..64].copy_from_slice(&m.prev_epoch.to_le_bytes());
    let crc = crc32fast::hash(&b[..BODY]);
    b[BODY..BODY + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Decodes one slot: `Ok(None)` for an empty (all zero) slot, `Err` for a damaged one.
fn decode_slot(b: &[u8]) -> Result<Option<(u64, Mark)>, ()> {
    if b.len() < SLOT {
        return if b.iter().all(|x| *x == 0) {
            Ok(None)
        } else {
            Err(())
        };
    }
    if b.iter().all(|x| *x == 0) {
        return Ok(None);
    }
    let crc = u32::from_le_bytes([b[BODY], b[BODY + 1], b[BODY + 2], b[BODY + 3]]);
    if &b[..8] != MAGIC || crc32fast::hash(&b[..BODY]) != crc {
        return Err(());
    }
    let mut stream = [0u8; 16];
    stream.copy_from_slice(&b[16..32]);
    Ok(Some((
        u64_at(b, 8),
        Mark {
            stream: StreamId::from_bytes(stream),
            base: u64_at(b, 32),
            last_pos: u64_at(b, 40),
            epoch: u64_at(b, 48),
            prev_epoch: u64_at(b, 56),
        },
    )))
}

/// Decodes the file's bytes: the newest valid slot and what is wrong with the rest.
pub fn decode(bytes: &[u8]) -> (MarkState, u64) {
    let slots: Vec<&[u8]> = (0..2)
        .map(|i| {
            bytes
                .get(i * SLOT..)
                .map_or(&[][..], |r| &r[..r.len().min(SLOT)])
        })
        .collect();
    let decoded: Vec<_> = slots.iter().map(|s| decode_slot(s)).collect();
    let best = decoded
        .iter()
        .filter_map(|d| d.as_ref().ok().copied().flatten())
        .max_by_key(|(g, _)| *g);
    let damaged: Vec<usize> = (0..2).filter(|i| decoded[*i].is_err()).collect();
    match best {
        Some((generation, mark)) => {
            let note = (!damaged.is_empty()).then(|| {
                format!(
                    "slot {} of {MARK_NAME} is damaged (a write cut short or a bad disk); the other copy (checkpoint {generation}) is used",
                    damaged[0]
                )
            });
            (MarkState::Found { mark, note }, generation)
        }
        None if bytes.iter().all(|b| *b == 0) => (MarkState::Missing, 0),
        None => (
            MarkState::Damaged(format!(
                "{MARK_NAME} holds no valid copy ({} bytes, both slots damaged)",
                bytes.len()
            )),
            0,
        ),
    }
}

impl MarkFile {
    /// Opens `dir/outbox.mark`, creating it (empty slots, synced) when missing, and returns
    /// what it held.
    pub fn open(dir: &Path) -> std::io::Result<(MarkFile, MarkState)> {
        let path = dir.join(MARK_NAME);
        let existed = path.exists();
        let mut file = crate::storage::wal::open_rw(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (state, generation) = decode(&bytes);
        if bytes.len() < 2 * SLOT {
            file.write_all_at(&vec![0u8; 2 * SLOT - bytes.len()], bytes.len() as u64)?;
            file.sync_all()?;
            if !existed {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok((
            MarkFile {
                path,
                file,
                generation,
            },
            state,
        ))
    }

    /// Writes `mark` as the newest copy and waits until it is on disk.
    pub fn write(&mut self, mark: &Mark) -> std::io::Result<()> {
        let generation = self.generation + 1;
        let slot = (generation % 2) as usize;
        self.file
            .write_all_at(&encode(generation, mark), (slot * SLOT) as u64)?;
        self.file.sync_data()?;
        self.generation = generation;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for checks that it is still the one in the data directory).
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mark(last_pos: u64) -> Mark {
        Mark {
            stream: StreamId::from_random([3; 16]),
            base: 0,
            last_pos,
            epoch: 11,
            prev_epoch: 10,
        }
    }

    #[test]
    fn the_newest_copy_wins_and_a_damaged_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, state) = MarkFile::open(dir.path()).unwrap();
        assert_eq!(state, MarkState::Missing);
        f.write(&mark(5)).unwrap();
        f.write(&mark(9)).unwrap();
        drop(f);
        let (mut f, state) = MarkFile::open(dir.path()).unwrap();
        assert_eq!(
            state,
            MarkState::Found {
                mark: mark(9),
                note: None
            }
        );
        f.write(&mark(12)).unwrap();
        drop(f);
        // Flip a byte in the newest copy: the older one is used, and that is said.
        let path = dir.path().join(MARK_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let (_, generation) = decode(&bytes);
        let newest = (generation % 2) as usize * SLOT;
        bytes[newest + 41] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        match MarkFile::open(dir.path()).unwrap().1 {
            MarkState::Found { mark: m, note } => {
                assert_eq!(m, mark(9));
                assert!(note.unwrap().contains("damaged"));
            }
            other => panic!("{other:?}"),
        }
        // Both damaged: said so, never taken for a missing mark.
        let other = SLOT - newest;
        bytes[other + 20] ^= 0x80;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            MarkFile::open(dir.path()).unwrap().1,
            MarkState::Damaged(_)
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = decode(&bytes);
        }
    }
}
