//! Keeping the database away from a full disk, and remembering taps that could not be
//! stored.
//!
//! sled treats a failed write as fatal for the open database (every later operation
//! returns the same error until it is reopened), so the pipeline never lets it get there:
//! before each commit it checks the free space, and below [`MIN_FREE_BYTES`] it holds taps
//! in memory instead (still deciding and publishing decisions) until space returns.
//!
//! While taps wait, their number and time span are written to `unstored.state`, a small
//! file allocated at start, so that writing it never needs new disk space. If the process
//! dies while taps wait, the next start reads the file and reports exactly what was lost.

use id06_protocol::UtcMillis;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Space kept free below the database (sled's own bookkeeping and acknowledgements need
/// a little, and its writes must never fail).
pub const MIN_FREE_BYTES: u64 = 8 * 1024 * 1024;

const RECORD_LEN: usize = 64;
const MAGIC: &[u8; 8] = b"ID6UNST1";

/// Bytes available to an unprivileged writer on the file system of `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we own from a valid C string path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// What `unstored.state` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unstored {
    /// Taps waiting in memory.
    pub count: u64,
    /// The first of them.
    pub first: UtcMillis,
    /// The last of them.
    pub last: UtcMillis,
}

/// The pre-allocated record of taps waiting in memory.
pub struct UnstoredRecord {
    file: File,
    last_written: Option<Unstored>,
}

impl UnstoredRecord {
    /// Opens (creating and allocating) `dir/unstored.state`; returns it and what a previous
    /// run left in it (taps that were lost when it stopped).
    pub fn open(dir: &Path) -> std::io::Result<(UnstoredRecord, Option<Unstored>)> {
        let path = dir.join("unstored.state");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut buf = [0u8; RECORD_LEN];
        let previous = match file.read_exact(&mut buf) {
            Ok(()) => decode(&buf),
            Err(_) => None,
        };
        let mut record = UnstoredRecord {
            file,
            last_written: Some(Unstored {
                count: 1,
                first: UtcMillis(0),
                last: UtcMillis(0),
            }),
        };
        // Allocate the record's blocks now, while there is space: zeros = nothing waits.
        record.write(None)?;
        Ok((record, previous))
    }

    /// Records what waits (`None`: nothing). Only writes when it changed.
    pub fn write(&mut self, state: Option<Unstored>) -> std::io::Result<()> {
        if self.last_written == state {
            return Ok(());
        }
        let mut buf = [0u8; RECORD_LEN];
        if let Some(s) = state {
            buf[..8].copy_from_slice(MAGIC);
            buf[8..16].copy_from_slice(&s.count.to_be_bytes());
            buf[16..24].copy_from_slice(&s.first.as_millis().to_be_bytes());
            buf[24..32].copy_from_slice(&s.last.as_millis().to_be_bytes());
        }
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.last_written = state;
        Ok(())
    }
}

fn decode(buf: &[u8; RECORD_LEN]) -> Option<Unstored> {
    if &buf[..8] != MAGIC {
        return None;
    }
    let n = |r: std::ops::Range<usize>| buf[r].try_into().ok().map(i64::from_be_bytes);
    let count = u64::from_be_bytes(buf[8..16].try_into().ok()?);
    (count > 0).then_some(Unstored {
        count,
        first: UtcMillis(n(16..24)?),
        last: UtcMillis(n(24..32)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_left_by_a_dead_run_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, previous) = UnstoredRecord::open(dir.path()).unwrap();
        assert_eq!(previous, None);
        let waiting = Unstored {
            count: 3,
            first: UtcMillis(1000),
            last: UtcMillis(2000),
        };
        r.write(Some(waiting)).unwrap();
        drop(r); // the process dies with taps waiting
        let (r, previous) = UnstoredRecord::open(dir.path()).unwrap();
        assert_eq!(previous, Some(waiting));
        drop(r);
        let (_, previous) = UnstoredRecord::open(dir.path()).unwrap();
        assert_eq!(previous, None, "reported once, then cleared");
    }

    #[test]
    fn free_space_is_known_for_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).is_some());
        assert_eq!(free_bytes(Path::new("/nonexistent/dir")), None);
    }
}
