//! The sled database in `data_dir`: opening it with clear errors, and the guard that keeps
//! one terminal's `seq` space from being mixed with another's.
//!
//! Trees:
//! - `meta`: identity of the data directory (`terminal_id`), format version, and the stream
//!   new taps are recorded in (`stream`, `stream_base`; see [`crate::storage::recovery`]).
//! - `journal`: the outbox and event archive, the `seq` counter and the toggle state, in
//!   one tree so that a tap's writes are one atomic batch (see [`crate::storage::outbox`]).
//! - `blocklist_meta` and `blocklist.<generation>`: the blocklist (see [`crate::lists::blocklist`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The on-disk format this build writes. 2: events carry a stream (`id06d/event/v2`).
/// 3: the blocklist's base lives in a file beside sled (`lists/base.rs`); a build that
/// reads format 2 would see an empty list in it, so it must refuse the directory.
pub const FORMAT_VERSION: u64 = 3;

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (usually the running daemon) holds the database.
    #[error("the data directory {0} is in use by another id06d process (is the daemon running?)")]
    InUse(PathBuf),
    /// The data directory belongs to another terminal.
    #[error("the data directory {dir} belongs to terminal {found:?}, but the configuration says terminal_id = {configured:?}; refusing to mix two terminals' event sequences (use a new data_dir for a new terminal)")]
    TerminalMismatch {
        /// The directory.
        dir: PathBuf,
        /// What the store says.
        found: String,
        /// What the configuration says.
        configured: String,
    },
    /// Written by a newer id06d.
    #[error("the data directory {dir} was written by a newer id06d (format {found}, this build reads {FORMAT_VERSION})")]
    TooNew {
        /// The directory.
        dir: PathBuf,
        /// Its format version.
        found: u64,
    },
    /// Written by an id06d before streams, with events this build cannot deliver as they are.
    #[error("the data directory {dir} holds events recorded by id06d 0.1 (format 1, event ids without a stream), which this version cannot deliver as they were recorded; deliver them with id06d 0.1, then move the data directory away (or remove it) and start again")]
    TooOld {
        /// The directory.
        dir: PathBuf,
    },
    /// There is no data directory (a read-only command never creates one).
    #[error("there is no id06d data directory at {0} (has the daemon run with this configuration yet? check data_dir)")]
    Missing(PathBuf),
    /// Not a sled database, or damaged.
    #[error("the database in {dir} cannot be read ({detail}); it is damaged or not an id06d database — move it away to start afresh (its events would be lost) or restore it from a backup")]
    Corrupt {
        /// The directory.
        dir: PathBuf,
        /// What sled said.
        detail: String,
    },
    /// The data directory cannot be written any more: it was removed or replaced, or its
    /// file system went read-only or fails with I/O errors. Restarting on a sound directory
    /// is the only way on.
    #[error("the data directory {dir} cannot be used any more: {detail}")]
    Unusable {
        /// The directory.
        dir: PathBuf,
        /// What happened.
        detail: String,
    },
    /// The file system refused (permissions, full disk, read-only).
    #[error("cannot use the data directory {dir}: {detail}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        detail: String,
    },
}

impl StoreError {
    /// Classifies a sled error that happened while working in `dir`.
    pub fn from_sled(dir: &Path, e: sled::Error) -> StoreError {
        match e {
            sled::Error::Io(io) => {
                let text = io.to_string();
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.raw_os_error() == Some(libc::EWOULDBLOCK)
                    || text.contains("could not acquire lock")
                {
                    StoreError::InUse(dir.to_path_buf())
                } else {
                    StoreError::Io {
                        dir: dir.to_path_buf(),
                        detail: text,
                    }
                }
            }
            sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => StoreError::Corrupt {
                dir: dir.to_path_buf(),
                detail: e.to_string(),
            },
            other => StoreError::Io {
                dir: dir.to_path_buf(),
                detail: other.to_string(),
            },
        }
    }
}

/// The opened database.
#[derive(Clone)]
pub struct Store {
    /// The directory.
    pub dir: PathBuf,
    /// The database.
    pub db: sled::Db,
    /// Identity and format.
    pub meta: sled::Tree,
    /// Outbox, archive, counters, toggle state.
    pub journal: sled::Tree,
    /// sled's log file, for `fdatasync` after sled's own flush (see [`Store::flush`]).
    log: Arc<std::fs::File>,
    /// The database was created by this open (it held no terminal id).
    pub created: bool,
}

impl Store {
    /// Opens the store of an existing data directory, for commands that only read: it
    /// never creates the directory or a database in it.
    pub fn open_existing(dir: &Path, terminal_id: &str) -> Result<Store, StoreError> {
        if !dir.is_dir() || !dir.join("db").join("conf").exists() {
            return Err(StoreError::Missing(dir.to_path_buf()));
        }
        Store::open(dir, terminal_id)
    }

    /// Opens (creating if needed) the store in `dir` for terminal `terminal_id`.
    pub fn open(dir: &Path, terminal_id: &str) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            dir: dir.to_path_buf(),
            detail: format!("cannot create it: {e}"),
        })?;
        let db_path = dir.join("db");
        if db_path.exists() && !db_path.is_dir() {
            return Err(StoreError::Corrupt {
                dir: dir.to_path_buf(),
                detail: format!("{} is a file, not a database folder", db_path.display()),
            });
        }
        // sled panics on some foreign files; never let that reach the operator as a panic.
        let open = || {
            let opened = std::panic::catch_unwind(|| {
                sled::Config::new()
                    .path(&db_path)
                    .cache_capacity(64 * 1024 * 1024)
                    // No background flusher: the outbox log makes taps durable and its
                    // checkpoints flush sled (a flusher thread would keep the disk busy
                    // with sync_file_range beside every commit).
                    .flush_every_ms(None)
                    .open()
            });
            match opened {
                Ok(r) => r.map_err(|e| StoreError::from_sled(dir, e)),
                Err(_) => Err(StoreError::Corrupt {
                    dir: dir.to_path_buf(),
                    detail: "sled could not make sense of its files".into(),
                }),
            }
        };
        // A database just closed in this process can hold its lock a moment longer (sled's
        // I/O threads finish after the handle is dropped): try again briefly before
        // saying that someone else holds it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let db = loop {
            match open() {
                Err(StoreError::InUse(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| StoreError::from_sled(dir, e))
        };
        let meta = tree("meta")?;
        let journal = tree("journal")?;
        let io = |what: &str, e: std::io::Error| StoreError::Io {
            dir: dir.to_path_buf(),
            detail: format!("{what}: {e}"),
        };
        let log = std::fs::File::open(db_path.join("db"))
            .map_err(|e| io("cannot open the database log for syncing", e))?;
        // The directory entries of a new database must survive a power cut too.
        for d in [dir, db_path.as_path()] {
            std::fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("cannot sync the data directory", e))?;
        }
        let mut store = Store {
            dir: dir.to_path_buf(),
            db,
            meta,
            journal,
            log: Arc::new(log),
            created: false,
        };
        store.created = store.check_identity(terminal_id)?;
        Ok(store)
    }

    /// Checks (or, for a new database, records) the terminal and the format; returns whether
    /// the database is new.
    fn check_identity(&self, terminal_id: &str) -> Result<bool, StoreError> {
        let sled_err = |e| StoreError::from_sled(&self.dir, e);
        if let Some(v) = self.meta.get("format").map_err(sled_err)? {
            let found = decode_u64(&v).unwrap_or(u64::MAX);
            if found > FORMAT_VERSION {
                return Err(StoreError::TooNew {
                    dir: self.dir.clone(),
                    found,
                });
            }
            if found < FORMAT_VERSION {
                // Format 1 had no streams: its events cannot be delivered as v2 events.
                // One that never recorded an event is simply taken over. Format 2 is
                // taken over as it is (the blocklist moves its base out at open).
                if found < 2 && self.journal.scan_prefix(b"e").next().is_some() {
                    return Err(StoreError::TooOld {
                        dir: self.dir.clone(),
                    });
                }
                self.meta
                    .insert("format", &FORMAT_VERSION.to_be_bytes())
                    .map_err(sled_err)?;
            }
        }
        match self.meta.get("terminal_id").map_err(sled_err)? {
            Some(found) => {
                let found = String::from_utf8_lossy(&found).into_owned();
                if found != terminal_id {
                    return Err(StoreError::TerminalMismatch {
                        dir: self.dir.clone(),
                        found,
                        configured: terminal_id.to_string(),
                    });
                }
            }
            None => {
                let mut b = sled::Batch::default();
                b.insert("terminal_id", terminal_id.as_bytes());
                b.insert("format", &FORMAT_VERSION.to_be_bytes());
                self.meta.apply_batch(b).map_err(sled_err)?;
                self.flush()?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The stream recorded in the database and its base position, if any.
    pub fn stream(&self) -> Result<Option<(id06_protocol::StreamId, u64)>, StoreError> {
        let sled_err = |e| StoreError::from_sled(&self.dir, e);
        let id = self.meta.get("stream").map_err(sled_err)?;
        let base = self.meta.get("stream_base").map_err(sled_err)?;
        Ok(match (id, base) {
            (Some(id), Some(base)) => {
                let bytes: Option<[u8; 16]> = id.as_ref().try_into().ok();
                bytes
                    .zip(decode_u64(&base))
                    .map(|(b, base)| (id06_protocol::StreamId::from_bytes(b), base))
            }
            _ => None,
        })
    }

    /// Every stream recorded in the database with its base position, oldest first.
    pub fn streams(&self) -> Result<Vec<(id06_protocol::StreamId, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(b"streams/") {
            let (k, v) = item.map_err(|e| StoreError::from_sled(&self.dir, e))?;
            let id: Option<[u8; 16]> = k.get(8..).and_then(|b| b.try_into().ok());
            if let (Some(id), Some(base)) = (id, decode_u64(&v)) {
                out.push((id06_protocol::StreamId::from_bytes(id), base));
            }
        }
        if let Some(current) = self.stream()? {
            if !out.contains(&current) {
                out.push(current);
            }
        }
        out.sort_by_key(|(_, base)| *base);
        Ok(out)
    }

    /// Records the stream new taps go to (durable at the next flush).
    pub fn set_stream(&self, stream: id06_protocol::StreamId, base: u64) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        b.insert("stream", &stream.as_bytes()[..]);
        b.insert("stream_base", &base.to_be_bytes());
        // Every stream this data directory ever used, for confirmations and replays of the
        // older ones.
        let mut key = b"streams/".to_vec();
        key.extend_from_slice(stream.as_bytes());
        b.insert(key, &base.to_be_bytes());
        self.meta
            .apply_batch(b)
            .map_err(|e| StoreError::from_sled(&self.dir, e))
    }

    /// Writes everything to disk and waits until it would survive a power cut.
    ///
    /// sled 0.34 ends its own flush on Linux with `sync_file_range`, which neither writes
    /// the file's metadata (the blocks an appended log just got) nor flushes the disk's
    /// write cache; its true `fsync` would come only from its background thread, which we turn off. So
    /// after sled has written its buffers, `fdatasync` on its log file makes them durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| StoreError::from_sled(&self.dir, e))?;
        self.log.sync_data().map_err(|e| StoreError::Io {
            dir: self.dir.clone(),
            detail: format!("cannot sync the database log: {e}"),
        })
    }
}

/// [`Store::flush`] for code that holds only the `sled::Db` of the store in `dir`: sled's
/// flush, then `fdatasync` on its log file.
pub fn flush_db(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    db.flush().map_err(|e| StoreError::from_sled(dir, e))?;
    let io = |e: std::io::Error| StoreError::Io {
        dir: dir.to_path_buf(),
        detail: format!("cannot sync the database log: {e}"),
    };
    std::fs::File::open(dir.join("db").join("db"))
        .map_err(io)?
        .sync_data()
        .map_err(io)
}

/// A big-endian u64 from stored bytes.
pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

/// A big-endian i64 from stored bytes.
pub fn decode_i64(bytes: &[u8]) -> Option<i64> {
    bytes.try_into().ok().map(i64::from_be_bytes)
}

/// Gives every file and folder under `dir` that belongs to someone other than `dir`'s
/// owner to that owner; returns how many changed hands. Does nothing unless this process
/// runs as root and `dir` belongs to another user: that is an operator's `sudo id06d …` on
/// a stopped gateway, whose new database files would otherwise be root's and unreadable
/// for the daemon's user. (The outbox logs are already given away when created, see
/// `wal.rs`; sled's own files can only be handled here, after sled is closed.)
pub fn give_to_owner(dir: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(0);
    }
    let owner = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if owner.uid() == 0 {
        return Ok(0);
    }
    let mut changed = 0;
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let path = entry?.path();
            let m = std::fs::symlink_metadata(&path)?;
            if m.is_dir() {
                folders.push(path.clone());
            }
            if (m.uid(), m.gid()) != (owner.uid(), owner.gid()) {
                std::os::unix::fs::lchown(&path, Some(owner.uid()), Some(owner.gid()))?;
                changed += 1;
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_says_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), "t1").unwrap();
        match Store::open(dir.path(), "t1") {
            Err(StoreError::InUse(_)) => {}
            Err(other) => panic!("expected InUse, got {other}"),
            Ok(_) => panic!("expected InUse, got a second handle"),
        }
    }

    #[test]
    fn a_changed_terminal_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), "gate-1").unwrap());
        let e = Store::open(dir.path(), "gate-2").err().unwrap();
        assert!(matches!(e, StoreError::TerminalMismatch { .. }), "{e}");
        assert!(e.to_string().contains("gate-1"));
        drop(Store::open(dir.path(), "gate-1").unwrap());
    }

    #[test]
    fn older_formats_are_taken_over_or_refused_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), "t").unwrap();
            s.meta.insert("format", &1u64.to_be_bytes()).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), "t").unwrap();
        assert_eq!(
            s.meta.get("format").unwrap().as_deref(),
            Some(&FORMAT_VERSION.to_be_bytes()[..])
        );
        s.meta.insert("format", &1u64.to_be_bytes()).unwrap();
        s.journal.insert(b"e\0\0\0\0\0\0\0\x01", b"{}").unwrap();
        s.flush().unwrap();
        drop(s);
        let e = Store::open(dir.path(), "t").err().unwrap();
        assert!(matches!(e, StoreError::TooOld { .. }), "{e}");
        assert!(e.to_string().contains("id06d 0.1"));
        // Format 2 with events is taken over; a newer format is refused.
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert("format", &2u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(dir.path(), "t").unwrap();
        assert_eq!(
            s.meta.get("format").unwrap().as_deref(),
            Some(&FORMAT_VERSION.to_be_bytes()[..])
        );
        s.meta
            .insert("format", &(FORMAT_VERSION + 1).to_be_bytes())
            .unwrap();
        s.flush().unwrap();
        drop(s);
        let e = Store::open(dir.path(), "t").err().unwrap();
        assert!(matches!(e, StoreError::TooNew { .. }), "{e}");
    }

    #[test]
    fn a_file_where_the_database_should_be_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"not a database").unwrap();
        let e = Store::open(dir.path(), "t").err().unwrap();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    }
}
