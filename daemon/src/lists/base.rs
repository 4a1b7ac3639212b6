//! The base of a blocklist generation, on disk beside sled: the list as it was written
//! whole, in chunks of the snapshot chunk encoding (`id06_protocol::SnapshotChunk`).
//!
//! Why not in sled: sled 0.34 keeps the values it has written or read in its page cache
//! whatever `cache_capacity` says, so 40 MB of chunks for 5 million cards cost 90–120 MB
//! of resident memory for the daemon's lifetime (measured with heaptrack during a snapshot:
//! `Tree::insert` held 45 MB, dropping the old generation pulled another 43 MB back in). A
//! plain file costs page cache, which the kernel reclaims, not the daemon's memory.
//!
//! Layout: the magic `ID06BAS1`, then per chunk its length (`u32`, little-endian), its
//! bytes and their CRC-32 (`u32`). The number of chunks is recorded in sled with the
//! generation, so a file cut short after a whole chunk is told from a complete one. The
//! file is synced, and its directory, before the generation that names it is flipped in.

use id06_protocol::SnapshotChunk;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"ID06BAS1";
/// No chunk is larger (a chunk of 50 000 ten-byte UIDs takes 600 kB).
const MAX_CHUNK: u32 = 64 << 20;

/// Writes a base file chunk by chunk.
pub struct BaseWriter {
    out: BufWriter<std::fs::File>,
    path: PathBuf,
    chunks: u64,
}

impl BaseWriter {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: &Path) -> std::io::Result<BaseWriter> {
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        out.write_all(MAGIC)?;
        Ok(BaseWriter {
            out,
            path: path.to_path_buf(),
            chunks: 0,
        })
    }

    /// Appends one encoded chunk.
    pub fn append(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(chunk.len())
            .ok()
            .filter(|l| *l <= MAX_CHUNK)
            .ok_or_else(|| std::io::Error::other("a blocklist chunk larger than 64 MiB"))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(chunk)?;
        self.out.write_all(&crc32fast::hash(chunk).to_le_bytes())?;
        self.chunks += 1;
        Ok(())
    }

    /// Syncs the file and its directory; returns the number of chunks written.
    pub fn finish(self) -> std::io::Result<u64> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(self.chunks)
    }
}

/// Reads the base file at `path`, which must hold `chunks` chunks, handing each decoded
/// chunk to `each`. The error says what is wrong and where.
pub fn read_base(
    path: &Path,
    chunks: u64,
    mut each: impl FnMut(SnapshotChunk),
) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut input = std::io::BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    input
        .read_exact(&mut magic)
        .map_err(|e| format!("cannot read its header: {e}"))?;
    if &magic != MAGIC {
        return Err("it is not a blocklist base file (bad magic)".into());
    }
    let mut offset = 8u64;
    let mut bytes = Vec::new();
    for n in 0..chunks {
        let mut word = [0u8; 4];
        input
            .read_exact(&mut word)
            .map_err(|e| format!("chunk {n} of {chunks} is missing ({e})"))?;
        let len = u32::from_le_bytes(word);
        if len > MAX_CHUNK || offset + 8 + u64::from(len) > size {
            return Err(format!(
                "chunk {n} at byte {offset} claims {len} bytes, past the end of the file"
            ));
        }
        bytes.resize(len as usize, 0);
        input
            .read_exact(&mut bytes)
            .map_err(|e| format!("chunk {n} cannot be read: {e}"))?;
        input
            .read_exact(&mut word)
            .map_err(|e| format!("chunk {n}'s CRC cannot be read: {e}"))?;
        if crc32fast::hash(&bytes) != u32::from_le_bytes(word) {
            return Err(format!(
                "chunk {n} at byte {offset} does not match its CRC: damaged"
            ));
        }
        let chunk = SnapshotChunk::decode(&bytes)
            .map_err(|e| format!("chunk {n} at byte {offset} cannot be decoded: {e}"))?;
        each(chunk);
        offset += 8 + u64::from(len);
    }
    if offset != size {
        return Err(format!(
            "{} bytes follow its {chunks} chunks",
            size.saturating_sub(offset)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use id06_protocol::{CardStatus, CardUid};

    fn chunk(n: u32, cards: u32) -> Vec<u8> {
        let entries: Vec<_> = (0..cards)
            .map(|i| {
                let b = (n * 1000 + i).to_be_bytes();
                (CardUid::from_bytes(&b).unwrap(), CardStatus::Blocked)
            })
            .collect();
        SnapshotChunk::encode(3, n, &entries)
    }

    fn write(path: &Path, chunks: &[Vec<u8>]) {
        let mut w = BaseWriter::create(path).unwrap();
        for c in chunks {
            w.append(c).unwrap();
        }
        assert_eq!(w.finish().unwrap(), chunks.len() as u64);
    }

    #[test]
    fn chunks_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.base");
        write(&path, &[chunk(0, 10), chunk(1, 0), chunk(2, 7)]);
        let mut seen = Vec::new();
        read_base(&path, 3, |c| seen.push((c.index, c.entries.len()))).unwrap();
        assert_eq!(seen, vec![(0, 10), (1, 0), (2, 7)]);
    }

    #[test]
    fn damage_is_named_never_read_as_cards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.base");
        write(&path, &[chunk(0, 10), chunk(1, 10)]);
        let good = std::fs::read(&path).unwrap();
        let read = |bytes: &[u8], chunks: u64| {
            std::fs::write(&path, bytes).unwrap();
            let mut n = 0;
            read_base(&path, chunks, |_| n += 1).map(|_| n)
        };
        assert_eq!(read(&good, 2), Ok(2));
        let e = read(&good, 3).unwrap_err();
        assert!(e.contains("chunk 2 of 3 is missing"), "{e}");
        let e = read(&good, 1).unwrap_err();
        assert!(e.contains("follow its 1 chunks"), "{e}");
        let mut flipped = good.clone();
        flipped[30] ^= 0x10;
        let e = read(&flipped, 2).unwrap_err();
        assert!(
            e.contains("chunk 0 at byte 8 does not match its CRC"),
            "{e}"
        );
        let e = read(&good[..good.len() - 3], 2).unwrap_err();
        assert!(e.contains("chunk 1"), "{e}");
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = read(&huge, 2).unwrap_err();
        assert!(e.contains("past the end"), "{e}");
        let e = read(b"nonsense", 0).unwrap_err();
        assert!(e.contains("bad magic"), "{e}");
    }
}
