//! A filesystem that forgets what was not synced: the power-cut model for the tests.
//!
//! A FUSE filesystem over a backing directory. Names (create, mkdir, rename, unlink) reach
//! the backing directory at once, but file contents do not: writes and truncations stay in
//! memory until the file is `fsync`ed or `fdatasync`ed, and [`LossyFs::power_cut`] throws
//! away every unsynced byte. What the backing directory holds after a cut is therefore
//! exactly what a disk that honours flushes and nothing else would hold — stricter than
//! ext4, which usually writes dirty pages out within seconds, and which is the point: a
//! program that forgets an `fdatasync` loses data here every time.
//!
//! Limits, on purpose (it serves the daemon's data directory, nothing else): no
//! hard links, no symlinks, no mmap coherence with other mounts, renaming a directory does
//! not move the inodes of what is inside it, and inodes are never forgotten.

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PAGE: u64 = 4096;
/// Attributes and names may be cached by the kernel only briefly: sizes change in memory.
const TTL: Duration = Duration::ZERO;

/// A file's contents as the program sees them, ahead of the backing file.
struct Shadow {
    data: Vec<u8>,
    /// Pages written since the last sync.
    dirty: BTreeSet<u64>,
    /// The length changed since the last sync.
    resized: bool,
}

#[derive(Default)]
struct State {
    /// Inode -> path relative to the backing directory ("" is the root).
    paths: HashMap<u64, PathBuf>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
    /// Files with contents not (all) in the backing file yet.
    shadows: HashMap<u64, Shadow>,
    /// Syncs that reached the backing directory, for the test's report.
    syncs: u64,
    /// Every change is refused with EROFS, as by a file system that went read-only after
    /// I/O errors (a plain `mount -o remount,ro` is refused while files are open for writing).
    read_only: bool,
}

/// The shared state of a mounted [`LossyFs`].
#[derive(Clone)]
pub struct LossyHandle {
    state: Arc<Mutex<State>>,
}

impl LossyHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Syncs seen so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Turns the file system read-only (every change fails with EROFS), or writable again.
    pub fn set_read_only(&self, on: bool) {
        self.lock().read_only = on;
    }

    fn refuses(&self) -> bool {
        self.lock().read_only
    }
}

struct LossyFs {
    root: PathBuf,
    handle: LossyHandle,
}

/// A mounted lossy filesystem; dropping it unmounts (after a power cut, nothing unsynced
/// reaches the backing directory).
pub struct LossyMount {
    pub handle: LossyHandle,
    session: Option<BackgroundSession>,
}

impl LossyMount {
    /// Mounts a lossy view of `backing` at `mountpoint` (both directories must exist).
    pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<LossyMount> {
        let mut state = State {
            next: 2,
            ..State::default()
        };
        state.paths.insert(1, PathBuf::new());
        state.by_path.insert(PathBuf::new(), 1);
        let handle = LossyHandle {
            state: Arc::new(Mutex::new(state)),
        };
        let fs = LossyFs {
            root: backing.to_path_buf(),
            handle: handle.clone(),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("id06d-lossyfs".into()),
            MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(LossyMount {
            handle,
            session: Some(session),
        })
    }

    /// The power goes: every byte not synced is gone, then the filesystem is unmounted.
    /// Returns how many bytes were thrown away (unsynced pages of 4 KiB). Kill the program
    /// using it first.
    pub fn power_cut(mut self) -> u64 {
        let lost = {
            let mut s = self.handle.lock();
            let lost = s
                .shadows
                .values()
                .map(|sh| sh.dirty.len() as u64 * PAGE)
                .sum();
            s.shadows.clear();
            lost
        };
        self.unmount();
        lost
    }

    fn unmount(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

impl Drop for LossyMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn kind_of(meta: &std::fs::Metadata) -> FileType {
    FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

fn answer_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn answer_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

impl LossyFs {
    /// Removes a name (file or directory, by `how`) and forgets its inode and contents.
    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        how: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), Errno> {
        let mut s = self.handle.lock();
        let rel = self.path_of(&s, parent)?.join(name);
        how(&self.backing(&rel)).map_err(|e| errno(&e))?;
        Self::forget_path(&mut s, &rel);
        Ok(())
    }

    /// Makes a name (file, directory, node, by `how`) and gives it an inode.
    fn make(
        &self,
        parent: INodeNo,
        name: &OsStr,
        how: impl FnOnce(&Path) -> Result<(), Errno>,
    ) -> Result<FileAttr, Errno> {
        let mut s = self.handle.lock();
        let rel = self.path_of(&s, parent)?.join(name);
        how(&self.backing(&rel))?;
        let ino = Self::ino_for(&mut s, &rel);
        self.attr(&s, ino, &rel)
    }

    fn backing(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn path_of(&self, s: &State, ino: INodeNo) -> Result<PathBuf, Errno> {
        s.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn ino_for(s: &mut State, rel: &Path) -> u64 {
        if let Some(&ino) = s.by_path.get(rel) {
            return ino;
        }
        let ino = s.next;
        s.next += 1;
        s.paths.insert(ino, rel.to_path_buf());
        s.by_path.insert(rel.to_path_buf(), ino);
        ino
    }

    fn forget_path(s: &mut State, rel: &Path) {
        if let Some(ino) = s.by_path.remove(rel) {
            s.paths.remove(&ino);
            s.shadows.remove(&ino);
        }
    }

    fn attr(&self, s: &State, ino: u64, rel: &Path) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.backing(rel)).map_err(|e| errno(&e))?;
        let size = s
            .shadows
            .get(&ino)
            .map_or(meta.len(), |sh| sh.data.len() as u64);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind_of(&meta),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    /// The file's contents in memory (read from the backing file the first time).
    fn shadow<'a>(&self, s: &'a mut State, ino: u64, rel: &Path) -> Result<&'a mut Shadow, Errno> {
        match s.shadows.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let data = std::fs::read(self.backing(rel)).map_err(|e| errno(&e))?;
                Ok(e.insert(Shadow {
                    data,
                    dirty: BTreeSet::new(),
                    resized: false,
                }))
            }
        }
    }

    /// Writes what is unsynced of one file to the backing file and syncs it.
    fn sync(&self, s: &mut State, ino: u64, rel: &Path) -> Result<(), Errno> {
        let Some(sh) = s.shadows.get_mut(&ino) else {
            return Ok(());
        };
        if sh.dirty.is_empty() && !sh.resized {
            return Ok(());
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.backing(rel))
            .map_err(|e| errno(&e))?;
        for &page in &sh.dirty {
            let start = (page * PAGE) as usize;
            if start >= sh.data.len() {
                continue;
            }
            let end = (start + PAGE as usize).min(sh.data.len());
            file.write_all_at(&sh.data[start..end], start as u64)
                .map_err(|e| errno(&e))?;
        }
        file.set_len(sh.data.len() as u64).map_err(|e| errno(&e))?;
        file.sync_all().map_err(|e| errno(&e))?;
        sh.dirty.clear();
        sh.resized = false;
        s.syncs += 1;
        Ok(())
    }

    fn entry_reply(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let mut s = self.handle.lock();
        let rel = self.path_of(&s, parent)?.join(name);
        std::fs::symlink_metadata(self.backing(&rel)).map_err(|e| errno(&e))?;
        let ino = Self::ino_for(&mut s, &rel);
        self.attr(&s, ino, &rel)
    }
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        answer_entry(reply, self.entry_reply(parent, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.handle.lock();
        match self
            .path_of(&s, ino)
            .and_then(|rel| self.attr(&s, ino.0, &rel))
        {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        let mut s = self.handle.lock();
        let result = (|| {
            let rel = self.path_of(&s, ino)?;
            let path = self.backing(&rel);
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| errno(&e))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::chown(&path, uid, gid).map_err(|e| errno(&e))?;
            }
            if let Some(size) = size {
                let sh = self.shadow(&mut s, ino.0, &rel)?;
                let old = sh.data.len() as u64;
                sh.data.resize(size as usize, 0);
                sh.resized = true;
                // A shrink then a grow must not bring old bytes back at the next sync.
                if size > old {
                    for page in old / PAGE..size.div_ceil(PAGE) {
                        sh.dirty.insert(page);
                    }
                }
            }
            self.attr(&s, ino.0, &rel)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        let result = self.make(parent, name, |path| {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| Errno::EINVAL)?;
            // SAFETY: a valid NUL-terminated path; mknod has no other memory effects.
            let rc = unsafe { libc::mknod(c.as_ptr(), mode & !umask, libc::dev_t::from(rdev)) };
            if rc != 0 {
                return Err(errno(&std::io::Error::last_os_error()));
            }
            Ok(())
        });
        answer_entry(reply, result);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        let result = self.make(parent, name, |path| {
            std::fs::create_dir(path).map_err(|e| errno(&e))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !umask))
                .map_err(|e| errno(&e))
        });
        answer_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        answer_empty(
            reply,
            self.remove(parent, name, |p| std::fs::remove_file(p)),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        answer_empty(reply, self.remove(parent, name, |p| std::fs::remove_dir(p)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        let mut s = self.handle.lock();
        let result = (|| {
            let from = self.path_of(&s, parent)?.join(name);
            let to = self.path_of(&s, newparent)?.join(newname);
            std::fs::rename(self.backing(&from), self.backing(&to)).map_err(|e| errno(&e))?;
            Self::forget_path(&mut s, &to);
            if let Some(ino) = s.by_path.remove(&from) {
                s.paths.insert(ino, to.clone());
                s.by_path.insert(to, ino);
            }
            Ok(())
        })();
        answer_empty(reply, result);
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.handle.lock();
        let result = (|| {
            if let Some(sh) = s.shadows.get(&ino.0) {
                let start = (offset as usize).min(sh.data.len());
                let end = (start + size as usize).min(sh.data.len());
                return Ok(sh.data[start..end].to_vec());
            }
            let rel = self.path_of(&s, ino)?;
            let file = std::fs::File::open(self.backing(&rel)).map_err(|e| errno(&e))?;
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return Err(errno(&e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        })();
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        let mut s = self.handle.lock();
        let result = (|| {
            let rel = self.path_of(&s, ino)?;
            let sh = self.shadow(&mut s, ino.0, &rel)?;
            let end = offset as usize + data.len();
            if end > sh.data.len() {
                sh.data.resize(end, 0);
                sh.resized = true;
            }
            sh.data[offset as usize..end].copy_from_slice(data);
            if !data.is_empty() {
                for page in offset / PAGE..=(end as u64 - 1) / PAGE {
                    sh.dirty.insert(page);
                }
            }
            Ok(data.len() as u32)
        })();
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a sync.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        let mut s = self.handle.lock();
        let result = self
            .path_of(&s, ino)
            .and_then(|rel| self.sync(&mut s, ino.0, &rel));
        answer_empty(reply, result);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.handle.lock();
        let result = (|| {
            let rel = self.path_of(&s, ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, OsStr::new(".").to_os_string()),
                (ino.0, FileType::Directory, OsStr::new("..").to_os_string()),
            ];
            for entry in std::fs::read_dir(self.backing(&rel)).map_err(|e| errno(&e))? {
                let entry = entry.map_err(|e| errno(&e))?;
                let kind = entry
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                let child = Self::ino_for(&mut s, &rel.join(entry.file_name()));
                entries.push((child, kind, entry.file_name()));
            }
            Ok(entries)
        })();
        match result {
            Ok(entries) => {
                for (i, (child, kind, name)) in
                    entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Names reach the backing directory at once.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let c = match std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()) {
            Ok(c) => c,
            Err(_) => return reply.error(Errno::EINVAL),
        };
        // SAFETY: statvfs fills the zeroed struct from a valid NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return reply.error(errno(&std::io::Error::last_os_error()));
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if self.handle.refuses() {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        let result = self.make(parent, name, |path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| errno(&e))?;
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode(mode & !umask & 0o7777),
            )
            .map_err(|e| errno(&e))
        });
        match result {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }
}
