//! Watching the data directory: a gateway whose data directory was removed, replaced or
//! made read-only while it runs must not go on "recording" taps into files nobody will ever
//! read.
//!
//! Design: the files the outbox writes are checked at two moments. Every commit checks,
//! after its `fdatasync` and before any decision goes out, that the log it wrote is still
//! linked and still the file at its path (two `stat` calls, about a microsecond, against a
//! commit's hundreds); so no decision is published with a seq that is not stored. And a
//! watcher task looks every [`WATCH_EVERY`] while the gateway is idle, so that a removed
//! directory is noticed within seconds also when nobody taps; it reports the failure and
//! stops the daemon with a non-zero status, so that systemd restarts it on a sound
//! directory.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// How often the watcher looks.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Whether `file` (open) is still the file at `path`: not deleted, not replaced, not moved
/// away. The reason when it is not.
pub fn still_in_place(file: &File, path: &Path) -> Result<(), String> {
    let open = file
        .metadata()
        .map_err(|e| format!("cannot check {}: {e}", path.display()))?;
    if open.nlink() == 0 {
        return Err(format!(
            "{} was deleted while the daemon had it open (was the data directory removed?)",
            path.display()
        ));
    }
    match std::fs::metadata(path) {
        Ok(now) if (now.dev(), now.ino()) == (open.dev(), open.ino()) => Ok(()),
        Ok(_) => Err(format!(
            "{} is no longer the file the daemon writes to (was the data directory replaced?)",
            path.display()
        )),
        Err(e) => Err(format!(
            "{} cannot be found any more ({e}); was the data directory removed or moved?",
            path.display()
        )),
    }
}

/// Whether the data directory can still be written (a read-only remount, a file system gone
/// read-only after errors). The reason when it cannot.
pub fn writable(dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("{} is not a usable path", dir.display()))?;
    // SAFETY: `c` is a valid NUL-terminated path; statvfs only writes into `st`, which we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(format!(
            "cannot look at the data directory {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    if st.f_flag & libc::ST_RDONLY != 0 {
        return Err(format!(
            "the file system holding the data directory {} is read-only",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_or_replaced_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(still_in_place(&file, &path), Ok(()));
        assert_eq!(writable(dir.path()), Ok(()));
        // Replaced: a new file under the same name.
        std::fs::rename(&path, dir.path().join("g")).unwrap();
        std::fs::write(&path, b"y").unwrap();
        assert!(still_in_place(&file, &path)
            .unwrap_err()
            .contains("no longer the file"));
        // Deleted.
        std::fs::remove_file(dir.path().join("g")).unwrap();
        assert!(still_in_place(&file, &path)
            .unwrap_err()
            .contains("deleted"));
        // Gone with its directory.
        let file = File::open(&path).unwrap();
        drop(dir);
        assert!(still_in_place(&file, &path).is_err());
    }
}
