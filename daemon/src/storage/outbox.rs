//! The durable outbox and event archive.
//!
//! Every tap becomes an [`Event`] at the next *position*, written to the `journal` tree and
//! synced to disk before anyone hears of it. Positions count every event this data
//! directory ever recorded and are never reused; the event's `seq` is its position within
//! the current stream (`seq = position - base`, see [`crate::storage::recovery`]). Keys in `journal`:
//!
//! | key                       | value                                   |
//! | ------------------------- | --------------------------------------- |
//! | `e` + position (u64 BE)   | the event's JSON, kept `keep_days`      |
//! | `p` + position (u64 BE)   | empty: not yet acknowledged by broker   |
//! | `u` + position (u64 BE)   | empty: not yet confirmed by the ledger  |
//! | `c` + stream (16 bytes)   | the seq the ledger confirmed (u64 BE)   |
//! | `t` + card UID bytes      | toggle state: direction byte, ms (BE)   |
//! | `m/last_seq`              | the highest position ever written       |
//!
//! `u` markers exist only with `[ledger] confirm = true`: an event then stays in the archive
//! (and is sent again) until the ledger confirms it on `P/ack`, whatever the broker did.
//!
//! One tap's writes (and a whole burst's) are one record in the write-ahead log
//! ([`crate::storage::wal`]), synced with one `fdatasync` (a group commit); that is the durability
//! point, and the decisions go out right then. The same writes then go into sled in memory,
//! one insert at a time (a sled batch would make sled write its buffer out beside every
//! commit); checkpoints (sled flushed and synced, [`crate::storage::mark`] written, the log emptied)
//! bound the log, and a start replays what the log still holds and checks the records
//! against each other ([`crate::storage::recovery`]).
//!
//! Measured on the development VM (ext4 on virtio, `benches/pipeline.rs`,
//! `benches/delivery.rs`): with sled's own flush plus an `fdatasync` per commit, tap to
//! broker acknowledgement took 556 µs median; with the log, 310–320 µs, against 175–225 µs
//! for a bare publish-to-PUBACK plus one `fdatasync`.

use crate::storage::mark::{Mark, MarkFile, MarkState};
use crate::storage::recovery::{
    Findings, LogFindings, LogRecord, Severity, SledFindings, StreamChoice,
};
use crate::storage::store::{decode_i64, decode_u64, Store, StoreError};
use crate::storage::wal::{AckLog, Insert, Wal};
use id06_protocol::{CardUid, Direction, Event, StreamId, UtcMillis};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

/// The write-ahead log's file name in the data directory.
pub const WAL_NAME: &str = "outbox.wal";
/// The acknowledgement log's file name in the data directory.
pub const ACKS_NAME: &str = "outbox.acks";

const EVENT: u8 = b'e';
const PENDING: u8 = b'p';
const UNCONFIRMED: u8 = b'u';
const CONFIRMED: u8 = b'c';
const TOGGLE: u8 = b't';
const LAST_SEQ: &[u8] = b"m/last_seq";

fn key(prefix: u8, pos: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&pos.to_be_bytes());
    k
}

fn pos_of(key: &[u8]) -> Option<u64> {
    key.get(1..9).and_then(decode_u64)
}

fn toggle_key(uid: &CardUid) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + uid.len());
    k.push(TOGGLE);
    k.extend_from_slice(uid.as_bytes());
    k
}

/// A fresh random stream identifier.
pub fn new_stream_id() -> StreamId {
    let mut b = [0u8; 16];
    if getrandom::getrandom(&mut b).is_err() {
        // No entropy source: the clock and the process id are the next best thing.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        b = (nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    StreamId::from_random(b)
}

/// A toggle-state change to record with a batch: the card's last granted direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToggleRecord {
    /// The card.
    pub uid: CardUid,
    /// The direction of its tap.
    pub direction: Direction,
    /// Wall-clock time of the tap, ms since the epoch.
    pub at_ms: i64,
}

/// Why a ledger confirmation was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    /// Not a stream of this data directory.
    #[error("stream {0} is not one of this terminal's streams")]
    UnknownStream(StreamId),
    /// More than was ever recorded in that stream.
    #[error("seq {seq} of stream {stream} was never recorded (the stream ends at seq {last})")]
    Beyond {
        /// The stream.
        stream: StreamId,
        /// What was confirmed.
        seq: u64,
        /// What the stream holds.
        last: u64,
    },
    /// The database refused.
    #[error("{0}")]
    Store(String),
}

/// Outbox depth and age, for `outbox stats` and `P/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Events not yet acknowledged by the broker.
    pub depth: u64,
    /// The oldest of them: its seq (within its stream) and time.
    pub oldest: Option<(u64, UtcMillis)>,
    /// The stream new taps are recorded in.
    pub stream: StreamId,
    /// The highest seq recorded in that stream.
    pub last_seq: u64,
    /// Events kept in the archive (delivered or not).
    pub archived: u64,
    /// The seq of the current stream up to which the ledger confirmed it stored everything.
    pub confirmed_seq: u64,
    /// Events the ledger has not confirmed yet (with `[ledger] confirm = true`).
    pub unconfirmed: u64,
}

/// The log and the mark: changed together, under one lock, by commits and checkpoints.
struct Logs {
    wal: Wal,
    mark: MarkFile,
    /// A commit is durable in the log and not yet in the database ([`Committed`]): no
    /// checkpoint may empty the log until it is.
    unapplied: bool,
}

/// The outbox. Cheap to clone; one writer (the tap pipeline), any number of readers.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    stream: StreamId,
    base: u64,
    last_pos: Arc<AtomicU64>,
    depth: Arc<AtomicU64>,
    logs: Arc<Mutex<Logs>>,
    /// Held while recorded events go into the database; an acknowledgement waits for it
    /// (an event sent from its decision can be acknowledged before it is in the database).
    applying: Arc<Mutex<()>>,
    /// Acknowledgements since the last checkpoint (see [`AckLog`]).
    acks: Arc<Mutex<AckLog>>,
    /// `[ledger] confirm`: keep events until the ledger confirms them.
    confirm: Arc<std::sync::atomic::AtomicBool>,
    /// Events not yet confirmed by the ledger.
    unconfirmed: Arc<AtomicU64>,
    /// Every stream of this data directory and its base position, oldest first.
    streams: Arc<Vec<(StreamId, u64)>>,
    /// Where a commit that finds a checkpoint due asks for it, once
    /// [`Outbox::start_checkpoints`] runs them on a thread of their own; until then (and
    /// after it stopped) the commit checkpoints itself.
    checkpointer: Arc<OnceLock<SyncSender<Checkpoint>>>,
}

/// Events durable in the outbox's log and not yet in its database (see
/// [`Outbox::commit_durable`]): applied by [`Committed::apply`], or when dropped.
pub struct Committed {
    outbox: Outbox,
    recorded: Vec<(u64, Event)>,
    /// The log record's inserts and the last position, until applied.
    unapplied: Option<(Vec<Insert>, u64)>,
}

impl Committed {
    /// The events as recorded, with their positions.
    pub fn recorded(&self) -> &[(u64, Event)] {
        &self.recorded
    }

    /// Puts the events into the database (readable with [`Outbox::pending_from`],
    /// acknowledgeable); returns them.
    pub fn apply(mut self) -> Vec<(u64, Event)> {
        self.apply_now();
        std::mem::take(&mut self.recorded)
    }

    fn apply_now(&mut self) {
        if let Some((inserts, pos)) = self.unapplied.take() {
            self.outbox.apply_committed(&inserts, pos);
        }
    }
}

impl Drop for Committed {
    fn drop(&mut self) {
        self.apply_now();
    }
}

/// Logs its message (trace, target `id06d::stages`) when dropped: the end of a stretch of
/// work that has more than one way out.
struct TraceOnDrop(&'static str);

impl Drop for TraceOnDrop {
    fn drop(&mut self) {
        tracing::trace!(target: "id06d::stages", "{}", self.0);
    }
}

/// A message to the checkpoint thread.
enum Checkpoint {
    /// A commit found one due.
    Due,
    /// Stop (the daemon is stopping; its last checkpoint is made by the caller).
    Stop,
}

/// The checkpoint thread; stops it when dropped.
#[derive(Debug)]
pub struct Checkpoints {
    tx: SyncSender<Checkpoint>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        let _ = self.tx.send(Checkpoint::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The highest position sled knows: `m/last_seq`, or the last archived event.
fn last_pos_in(j: &sled::Tree) -> Result<u64, sled::Error> {
    let from_meta = j.get(LAST_SEQ)?.and_then(|v| decode_u64(&v)).unwrap_or(0);
    let from_archive = j
        .scan_prefix([EVENT])
        .next_back()
        .transpose()?
        .and_then(|(k, _)| pos_of(&k))
        .unwrap_or(0);
    Ok(from_meta.max(from_archive))
}

/// A log record as recovery sees it: its first event position and `m/last_seq`.
fn log_record(offset: usize, inserts: &[Insert], before: u64) -> LogRecord {
    let first_pos = inserts
        .iter()
        .filter(|(k, _)| k.first() == Some(&EVENT))
        .filter_map(|(k, _)| pos_of(k))
        .min();
    let last_pos = inserts
        .iter()
        .find(|(k, _)| k.as_slice() == LAST_SEQ)
        .and_then(|(_, v)| decode_u64(v))
        .unwrap_or(before);
    LogRecord {
        offset,
        first_pos,
        last_pos,
    }
}

impl Outbox {
    /// Opens the outbox in `store`: replays the write-ahead log and the acknowledgement log
    /// into the database, checks them against the mark and the database, says in the log
    /// what is damaged, chooses the stream ([`crate::storage::recovery::plan`]) and checkpoints.
    pub fn open(store: &Store) -> Result<Outbox, StoreError> {
        let sled_err = |e| StoreError::from_sled(&store.dir, e);
        let io_err = |what: &str, e: std::io::Error| StoreError::Io {
            dir: store.dir.clone(),
            detail: format!("{what}: {e}"),
        };
        let j = &store.journal;
        let (mark, mark_state) = MarkFile::open(&store.dir).map_err(|e| {
            io_err(
                &format!("the outbox's mark {}", crate::storage::mark::MARK_NAME),
                e,
            )
        })?;
        let hints = match &mark_state {
            MarkState::Found { mark, .. } => vec![mark.epoch, mark.prev_epoch],
            _ => Vec::new(),
        };
        let sled_last = last_pos_in(j).map_err(sled_err)?;
        // Taps whose record is in the log may not have reached sled's file, or only in
        // part (a commit puts its inserts into sled one by one): apply every record again,
        // oldest first. Re-applying is idempotent except that it restores the pending
        // marker of an event acknowledged after its record was written; the
        // acknowledgement log below takes it out again (if that log was lost in a power
        // cut, the event is delivered again with the same event_id, which at-least-once
        // allows; skipping a record instead could lose one).
        let (wal, opened) = Wal::open(&store.dir.join(WAL_NAME), &hints)
            .map_err(|e| io_err(&format!("the outbox's write-ahead log {WAL_NAME}"), e))?;
        let mut records = Vec::with_capacity(opened.scan.records.len());
        let mut before = 0;
        for r in &opened.scan.records {
            for (k, v) in &r.inserts {
                j.insert(k.as_slice(), v.as_slice()).map_err(sled_err)?;
            }
            let rec = log_record(r.offset, &r.inserts, before);
            before = rec.last_pos;
            records.push(rec);
        }
        // Then the acknowledgements noted since the last checkpoint (the replay may just
        // have restored their pending markers).
        let (acks, ack_scan) = AckLog::open(&store.dir.join(ACKS_NAME))
            .map_err(|e| io_err(&format!("the outbox's acknowledgement log {ACKS_NAME}"), e))?;
        for pos in &ack_scan.acks {
            j.remove(key(PENDING, *pos)).map_err(sled_err)?;
        }
        let findings = Findings {
            mark: mark_state,
            log: LogFindings {
                created: opened.created,
                found_len: opened.found_len,
                records,
                epoch: opened.scan.epoch,
                skipped: opened.scan.skipped.clone(),
                tail: opened.scan.tail,
            },
            sled: SledFindings {
                empty: store.stream()?.is_none() && sled_last == 0,
                stream: store.stream()?,
                last_pos: sled_last,
            },
            acks: ack_scan.acks.iter().copied().collect(),
            acks_unreadable: ack_scan.unreadable,
        };
        let plan = crate::storage::recovery::plan(&findings);
        for (severity, line) in &plan.findings {
            match severity {
                Severity::Info => tracing::info!("{line}"),
                Severity::Warn => tracing::warn!("{line}"),
                Severity::Error => tracing::error!("{line}"),
            }
        }
        let last_pos = plan.highest.max(last_pos_in(j).map_err(sled_err)?);
        let (stream, base) = match plan.stream {
            StreamChoice::Continue { stream, base } => (stream, base),
            StreamChoice::New { reason } => {
                let stream = new_stream_id();
                if reason == "a new data directory" {
                    tracing::info!(%stream, "a new data directory: taps are recorded in stream {stream} from seq 1");
                } else {
                    tracing::error!(
                        %stream,
                        "starting a new stream {stream} (seq from 1) so that no seq is ever given to two taps: {reason}; events already recorded keep their stream and seq and are still delivered"
                    );
                }
                (stream, last_pos)
            }
        };
        if store.stream()? != Some((stream, base)) {
            store.set_stream(stream, base)?;
        }
        j.insert(LAST_SEQ, &last_pos.to_be_bytes())
            .map_err(sled_err)?;
        if !opened.scan.records.is_empty() || !ack_scan.acks.is_empty() {
            tracing::info!(
                records = opened.scan.records.len(),
                acknowledgements = ack_scan.acks.len(),
                "replayed the outbox logs into the database"
            );
        }
        let mut depth = 0u64;
        for item in j.scan_prefix([PENDING]) {
            item.map_err(sled_err)?;
            depth += 1;
        }
        let mut unconfirmed = 0u64;
        for item in j.scan_prefix([UNCONFIRMED]) {
            item.map_err(sled_err)?;
            unconfirmed += 1;
        }
        let streams = store.streams()?;
        let outbox = Outbox {
            store: store.clone(),
            stream,
            base,
            last_pos: Arc::new(AtomicU64::new(last_pos)),
            depth: Arc::new(AtomicU64::new(depth)),
            logs: Arc::new(Mutex::new(Logs {
                wal,
                mark,
                unapplied: false,
            })),
            applying: Arc::new(Mutex::new(())),
            acks: Arc::new(Mutex::new(acks)),
            confirm: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            unconfirmed: Arc::new(AtomicU64::new(unconfirmed)),
            streams: Arc::new(streams),
            checkpointer: Arc::new(OnceLock::new()),
        };
        outbox.checkpoint()?;
        Ok(outbox)
    }

    fn err(&self, e: sled::Error) -> StoreError {
        StoreError::from_sled(&self.store.dir, e)
    }

    /// The stream new taps are recorded in.
    pub fn stream(&self) -> StreamId {
        self.stream
    }

    /// The highest position written so far (0 before the first event).
    pub fn last_pos(&self) -> u64 {
        self.last_pos.load(Ordering::Acquire)
    }

    /// The highest seq recorded in the current stream (0 before its first event).
    pub fn last_seq(&self) -> u64 {
        self.last_pos().saturating_sub(self.base)
    }

    /// Events waiting for the broker's acknowledgement.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Acquire)
    }

    /// A card's last recorded direction at this terminal, for `toggle` readers.
    pub fn toggle_state(&self, uid: &CardUid) -> Result<Option<(Direction, i64)>, StoreError> {
        let v = self
            .store
            .journal
            .get(toggle_key(uid))
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| {
            let dir = match v.first()? {
                b'i' => Direction::In,
                b'o' => Direction::Out,
                _ => return None,
            };
            Some((dir, decode_i64(v.get(1..9)?)?))
        }))
    }

    /// Records `events` durably: gives them the next positions and seqs (setting `stream`,
    /// `seq`, `event_id`, and `decision_id` where it is empty), writes them and the toggle
    /// changes as one log record, and syncs it to disk. Returns the events as recorded with
    /// their positions. On error nothing is recorded and no position is used up.
    pub fn commit(
        &self,
        events: Vec<Event>,
        toggles: &[ToggleRecord],
    ) -> Result<Vec<(u64, Event)>, StoreError> {
        self.commit_then(events, toggles, |_| {})
    }

    /// [`Outbox::commit`], calling `on_durable` with the recorded events the moment they
    /// are on disk, before they are readable with [`Outbox::pending_from`].
    pub fn commit_then(
        &self,
        events: Vec<Event>,
        toggles: &[ToggleRecord],
        on_durable: impl FnOnce(&[(u64, Event)]),
    ) -> Result<Vec<(u64, Event)>, StoreError> {
        let committed = self.commit_durable(events, toggles)?;
        on_durable(committed.recorded());
        Ok(committed.apply())
    }

    /// The first half of [`Outbox::commit`]: the events are durable (in the log, synced)
    /// when this returns, and reach the database, readable with [`Outbox::pending_from`],
    /// when the returned [`Committed`] is applied or dropped. In between the caller lets
    /// the decisions and the events go out (the tap pipeline yields to the MQTT task), so
    /// that updating the database is not on a tap's way to the broker.
    pub fn commit_durable(
        &self,
        events: Vec<Event>,
        toggles: &[ToggleRecord],
    ) -> Result<Committed, StoreError> {
        let mut committed = Committed {
            outbox: self.clone(),
            recorded: Vec::with_capacity(events.len()),
            unapplied: None,
        };
        if events.is_empty() && toggles.is_empty() {
            return Ok(committed);
        }
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let confirm = self.confirm.load(Ordering::Acquire);
        let mut pos = self.last_pos();
        let mut inserts: Vec<Insert> = Vec::with_capacity(events.len() * 2 + toggles.len() + 1);
        for mut e in events {
            pos += 1;
            e.stream = self.stream;
            e.seq = pos - self.base;
            e.event_id = Event::event_id_for(&e.site_id, &e.terminal_id, &self.stream, e.seq);
            if e.decision_id.is_empty() {
                e.decision_id = e.event_id.clone();
            }
            // The event before its pending marker: a reader that sees the marker finds
            // the event.
            inserts.push((key(EVENT, pos).to_vec(), e.to_json()));
            inserts.push((key(PENDING, pos).to_vec(), Vec::new()));
            if confirm {
                inserts.push((key(UNCONFIRMED, pos).to_vec(), Vec::new()));
            }
            committed.recorded.push((pos, e));
        }
        for t in toggles {
            let mut v = Vec::with_capacity(9);
            v.push(match t.direction {
                Direction::In => b'i',
                Direction::Out => b'o',
            });
            v.extend_from_slice(&t.at_ms.to_be_bytes());
            inserts.push((toggle_key(&t.uid), v));
        }
        inserts.push((LAST_SEQ.to_vec(), pos.to_be_bytes().to_vec()));
        // The durability point: one record, one fdatasync, in the file that is still the
        // data directory's (a log that was deleted or replaced under us stores nothing).
        logs.wal.append(&inserts).map_err(|e| self.wal_err(e))?;
        crate::storage::watch::still_in_place(logs.wal.file(), logs.wal.path()).map_err(
            |detail| StoreError::Io {
                dir: self.store.dir.clone(),
                detail,
            },
        )?;
        logs.unapplied = true;
        drop(logs);
        let n = committed.recorded.len() as u64;
        self.depth.fetch_add(n, Ordering::AcqRel);
        if confirm {
            self.unconfirmed.fetch_add(n, Ordering::AcqRel);
        }
        committed.unapplied = Some((inserts, pos));
        Ok(committed)
    }

    /// The second half of a commit: its records into the database, then `last_pos`.
    fn apply_committed(&self, inserts: &[Insert], pos: u64) {
        let applying = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let mut failed = false;
        // One insert at a time, not a sled batch (the log record already makes them all
        // or nothing; a batch would make sled write its buffer out beside every commit).
        for (k, v) in inserts {
            if let Err(e) = self.store.journal.insert(k.as_slice(), v.as_slice()) {
                // The events are durable in the log and their decisions are out: they
                // keep their seqs and reach the database when the log is replayed at
                // the next start. Until then no checkpoint may empty the log.
                failed = true;
                tracing::error!(
                    "cannot add recorded events to the database ({}); they are safe in {WAL_NAME} and are delivered after a restart",
                    self.err(e)
                );
                break;
            }
        }
        // Only now: whoever reads last_pos and then the pending markers finds them all.
        self.last_pos.store(pos, Ordering::Release);
        drop(applying);
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.unapplied = false;
        if failed {
            logs.wal.pin();
        }
        if logs.wal.checkpoint_due() {
            // Off the tap's path where a checkpoint thread runs (the next commit waits for
            // the log only if it comes before the checkpoint is done).
            let handed_over = match self.checkpointer.get() {
                Some(tx) => match tx.try_send(Checkpoint::Due) {
                    Ok(()) | Err(TrySendError::Full(_)) => true,
                    Err(TrySendError::Disconnected(_)) => false,
                },
                None => false,
            };
            if !handed_over {
                if let Err(e) = self.checkpoint_locked(&mut logs) {
                    // The taps are safe in the log; the next commit tries again.
                    tracing::warn!("outbox checkpoint failed: {e}");
                }
            }
        }
    }

    /// Runs checkpoints on a thread of their own from now on (the daemon does; a command
    /// that commits checkpoints in its commits): when a commit finds one due, and when the
    /// log's oldest record has waited twice [`crate::storage::wal::CHECKPOINT_SECS`] (no
    /// commit came to find it due: an idle gateway). Dropping the handle stops the thread; commits then checkpoint
    /// themselves again.
    pub fn start_checkpoints(&self) -> std::io::Result<Checkpoints> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Checkpoint>(1);
        if self.checkpointer.set(tx.clone()).is_err() {
            return Err(std::io::Error::other(
                "the outbox's checkpoints already run on a thread",
            ));
        }
        let outbox = self.clone();
        let thread = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || loop {
                let asked = match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                    Ok(Checkpoint::Due) => true,
                    Err(RecvTimeoutError::Timeout) => false,
                    Ok(Checkpoint::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                };
                let mut logs = outbox.logs.lock().unwrap_or_else(|e| e.into_inner());
                let due = if asked {
                    logs.wal.checkpoint_due()
                } else {
                    logs.wal.checkpoint_overdue()
                };
                if due {
                    if let Err(e) = outbox.checkpoint_locked(&mut logs) {
                        // The taps are safe in the log; tried again when due.
                        tracing::warn!("outbox checkpoint failed: {e}");
                    }
                }
            })?;
        Ok(Checkpoints {
            tx,
            thread: Some(thread),
        })
    }

    fn wal_err(&self, e: std::io::Error) -> StoreError {
        let detail = format!("the outbox's write-ahead log {WAL_NAME}: {e}");
        let dir = self.store.dir.clone();
        // A full disk passes (the pipeline waits for space); a read-only or failing file
        // system does not.
        match e.raw_os_error() {
            Some(libc::EROFS) | Some(libc::EIO) | Some(libc::EBADF) => {
                StoreError::Unusable { dir, detail }
            }
            _ => StoreError::Io { dir, detail },
        }
    }

    fn checkpoint_locked(&self, logs: &mut Logs) -> Result<(), StoreError> {
        if logs.wal.is_pinned() || logs.unapplied {
            // Applied later, or at the next start: the next commit checkpoints.
            return Ok(());
        }
        // No acknowledgement between the flush and clearing their log: each is either in
        // the flushed database or still in the log.
        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        tracing::trace!(target: "id06d::stages", "checkpoint begun");
        let _done = TraceOnDrop("checkpoint done");
        self.store.flush()?;
        // The mark first: once it names the next epoch and the exact last position, the
        // log may be emptied (a crash in between leaves a log of the previous epoch, whose
        // records the database already holds).
        let epoch = crate::storage::wal::new_epoch();
        let mark = Mark {
            stream: self.stream,
            base: self.base,
            last_pos: self.last_pos(),
            epoch,
            prev_epoch: logs.wal.epoch(),
        };
        logs.mark.write(&mark).map_err(|e| StoreError::Io {
            dir: self.store.dir.clone(),
            detail: format!("the outbox's mark {}: {e}", crate::storage::mark::MARK_NAME),
        })?;
        logs.wal.reset(epoch).map_err(|e| self.wal_err(e))?;
        if let Err(e) = acks.clear() {
            // Harmless: acknowledgements applied again at the next start are still true.
            tracing::warn!("cannot empty the outbox's acknowledgement log {ACKS_NAME}: {e}");
        }
        Ok(())
    }

    /// Makes sled hold everything durably, writes the mark and empties the log (at a clean
    /// stop, so that the next start has nothing to replay).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        self.checkpoint_locked(&mut logs)
    }

    /// Whether the data directory's files are still the ones this outbox writes to (not
    /// deleted, replaced or moved away); the reason when they are not.
    pub fn check_in_place(&self) -> Result<(), String> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        crate::storage::watch::still_in_place(logs.wal.file(), logs.wal.path())?;
        crate::storage::watch::still_in_place(logs.mark.file(), logs.mark.path())
    }

    /// Up to `limit` undelivered events at positions `>= from`, in order, as JSON.
    pub fn pending_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let j = &self.store.journal;
        let mut positions = Vec::with_capacity(limit.min(1024));
        for item in j.range(key(PENDING, from)..key(PENDING, u64::MAX)) {
            if positions.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(|e| self.err(e))?;
            if let Some(pos) = pos_of(&k) {
                positions.push(pos);
            }
        }
        let (Some(&first), Some(&last)) = (positions.first(), positions.last()) else {
            return Ok(Vec::new());
        };
        // One ordered pass over the events in the same range (a merge, not a get each).
        let mut out = Vec::with_capacity(positions.len());
        let mut wanted = positions.iter().copied().peekable();
        for item in j.range(key(EVENT, first)..=key(EVENT, last)) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let Some(pos) = pos_of(&k) else { continue };
            while wanted.peek().is_some_and(|w| *w < pos) {
                let lost = wanted.next().unwrap_or_default();
                tracing::error!(
                    position = lost,
                    "outbox entry without its event; dropping it"
                );
                self.ack(lost)?;
            }
            if wanted.peek() == Some(&pos) {
                wanted.next();
                out.push((pos, v.to_vec()));
            }
        }
        for lost in wanted {
            tracing::error!(
                position = lost,
                "outbox entry without its event; dropping it"
            );
            self.ack(lost)?;
        }
        Ok(out)
    }

    /// Removes several acknowledged events from the outbox in one go; returns how many
    /// were still in it.
    pub fn ack_many(&self, positions: &[u64]) -> Result<u64, StoreError> {
        let j = &self.store.journal;
        let _applied = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0u64;
        let mut unique = positions.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        acks.append(&unique);
        // One remove at a time, not a sled batch: a batch makes sled write its buffer out
        // at once, and a removal lost in a power cut only means a redelivery.
        for pos in &unique {
            if j.remove(key(PENDING, *pos))
                .map_err(|e| self.err(e))?
                .is_some()
            {
                removed += 1;
            }
        }
        if removed > 0 {
            self.depth.fetch_sub(removed, Ordering::AcqRel);
        }
        Ok(removed)
    }

    /// The first undelivered position, if any.
    pub fn first_pending(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .store
            .journal
            .scan_prefix([PENDING])
            .next()
            .transpose()
            .map_err(|e| self.err(e))?
            .and_then(|(k, _)| pos_of(&k)))
    }

    /// The broker acknowledged the event at `pos`: it leaves the outbox (the archive keeps
    /// it). Not synced on its own: losing an acknowledgement in a crash means one
    /// redelivery.
    pub fn ack(&self, pos: u64) -> Result<bool, StoreError> {
        Ok(self.ack_many(&[pos])? == 1)
    }

    /// An archived event by position.
    pub fn event(&self, pos: u64) -> Result<Option<Event>, StoreError> {
        let v = self
            .store
            .journal
            .get(key(EVENT, pos))
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| Event::from_json(&v).ok()))
    }

    /// `[ledger] confirm`: from now on, recorded events wait for the ledger's confirmation.
    pub fn set_ledger_confirm(&self, on: bool) {
        self.confirm.store(on, Ordering::Release);
    }

    /// Whether events wait for the ledger's confirmation.
    pub fn ledger_confirm(&self) -> bool {
        self.confirm.load(Ordering::Acquire)
    }

    /// Events the ledger has not confirmed yet.
    pub fn unconfirmed(&self) -> u64 {
        self.unconfirmed.load(Ordering::Acquire)
    }

    /// Whether `stream` is one of this data directory's streams.
    pub fn knows_stream(&self, stream: &StreamId) -> bool {
        self.streams.iter().any(|(s, _)| s == stream)
    }

    /// A stream's positions: its base and its last position.
    fn span(&self, stream: &StreamId) -> Option<(u64, u64)> {
        let i = self.streams.iter().position(|(s, _)| s == stream)?;
        let base = self.streams[i].1;
        let last = self
            .streams
            .get(i + 1)
            .map_or_else(|| self.last_pos(), |(_, next)| *next);
        Some((base, last))
    }

    /// The seq of `stream` up to which the ledger confirmed it stored everything.
    pub fn confirmed_seq(&self, stream: &StreamId) -> Result<u64, StoreError> {
        let mut k = vec![CONFIRMED];
        k.extend_from_slice(stream.as_bytes());
        Ok(self
            .store
            .journal
            .get(k)
            .map_err(|e| self.err(e))?
            .and_then(|v| decode_u64(&v))
            .unwrap_or(0))
    }

    /// The ledger says it stored every event of `stream` up to `seq`: they need not be sent
    /// again. Returns how many events this confirmed for the first time. Not synced on its
    /// own: a confirmation lost in a crash means those events are sent again (same
    /// `event_id`).
    pub fn confirm(&self, stream: &StreamId, seq: u64) -> Result<u64, ConfirmError> {
        let (base, last) = self
            .span(stream)
            .ok_or(ConfirmError::UnknownStream(*stream))?;
        let last_seq = last.saturating_sub(base);
        if seq > last_seq {
            return Err(ConfirmError::Beyond {
                stream: *stream,
                seq,
                last: last_seq,
            });
        }
        let store = |e: sled::Error| ConfirmError::Store(self.err(e).to_string());
        let j = &self.store.journal;
        let before = self
            .confirmed_seq(stream)
            .map_err(|e| ConfirmError::Store(e.to_string()))?;
        if seq <= before {
            return Ok(0);
        }
        let mut removed = 0u64;
        let from = key(UNCONFIRMED, base + before + 1);
        let to = key(UNCONFIRMED, base + seq);
        let positions: Vec<sled::IVec> = j
            .range(from..=to)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(store)?;
        for k in positions {
            if j.remove(k).map_err(store)?.is_some() {
                removed += 1;
            }
        }
        let mut k = vec![CONFIRMED];
        k.extend_from_slice(stream.as_bytes());
        j.insert(k, &seq.to_be_bytes()).map_err(store)?;
        if removed > 0 {
            self.unconfirmed.fetch_sub(removed, Ordering::AcqRel);
        }
        Ok(removed)
    }

    /// Whether the event at `pos` still waits for the ledger's confirmation.
    pub fn is_unconfirmed(&self, pos: u64) -> Result<bool, StoreError> {
        self.store
            .journal
            .contains_key(key(UNCONFIRMED, pos))
            .map_err(|e| self.err(e))
    }

    /// Up to `limit` positions, from `from` on, of events the broker acknowledged but the
    /// ledger has not confirmed.
    pub fn unconfirmed_sent(&self, from: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let j = &self.store.journal;
        let mut out = Vec::new();
        for item in j.range(key(UNCONFIRMED, from)..key(UNCONFIRMED, u64::MAX)) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(|e| self.err(e))?;
            if let Some(pos) = pos_of(&k) {
                if !j.contains_key(key(PENDING, pos)).map_err(|e| self.err(e))? {
                    out.push(pos);
                }
            }
        }
        Ok(out)
    }

    /// Puts events back into the outbox (to be sent again, in order); returns how many were
    /// not already waiting.
    pub fn repend(&self, positions: &[u64]) -> Result<u64, StoreError> {
        let j = &self.store.journal;
        let mut added = 0u64;
        for pos in positions {
            if !j.contains_key(key(EVENT, *pos)).map_err(|e| self.err(e))? {
                continue;
            }
            if j.insert(key(PENDING, *pos), &[])
                .map_err(|e| self.err(e))?
                .is_none()
            {
                added += 1;
            }
        }
        self.depth.fetch_add(added, Ordering::AcqRel);
        Ok(added)
    }

    /// The archived events of `stream` from `from_seq` to `to_seq` (at most `limit`), as
    /// `(position, JSON)`, and the seqs in that range the archive no longer holds, as
    /// ranges. `None` when the stream is not one of this terminal's.
    #[allow(clippy::type_complexity)]
    pub fn archived_range(
        &self,
        stream: &StreamId,
        from_seq: u64,
        to_seq: u64,
        limit: usize,
    ) -> Result<Option<(Vec<(u64, Vec<u8>)>, Vec<(u64, u64)>)>, StoreError> {
        let Some((base, last)) = self.span(stream) else {
            return Ok(None);
        };
        let last_seq = last.saturating_sub(base);
        let (from, to) = (from_seq.max(1), to_seq.min(last_seq));
        let mut found = Vec::new();
        let mut missing: Vec<(u64, u64)> = Vec::new();
        if from > to {
            return Ok(Some((found, missing)));
        }
        let mut expect = from;
        for item in self
            .store
            .journal
            .range(key(EVENT, base + from)..=key(EVENT, base + to))
        {
            if found.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.err(e))?;
            let Some(pos) = pos_of(&k) else { continue };
            let seq = pos - base;
            if seq > expect {
                missing.push((expect, seq - 1));
            }
            expect = seq + 1;
            found.push((pos, v.to_vec()));
        }
        if found.len() < limit && expect <= to {
            missing.push((expect, to));
        }
        Ok(Some((found, missing)))
    }

    /// The oldest event waiting for the broker: its seq (within its stream) and time.
    pub fn oldest_pending(&self) -> Result<Option<(u64, UtcMillis)>, StoreError> {
        Ok(match self.first_pending()? {
            Some(pos) => self.event(pos)?.map(|e| (e.seq, e.occurred_at)),
            None => None,
        })
    }

    /// Depth, oldest pending event and archive size (a scan of the archive).
    pub fn stats(&self) -> Result<OutboxStats, StoreError> {
        let oldest = self.oldest_pending()?;
        let mut archived = 0u64;
        for item in self.store.journal.scan_prefix([EVENT]) {
            item.map_err(|e| self.err(e))?;
            archived += 1;
        }
        Ok(OutboxStats {
            depth: self.depth(),
            oldest,
            stream: self.stream,
            last_seq: self.last_seq(),
            archived,
            confirmed_seq: self.confirmed_seq(&self.stream)?,
            unconfirmed: self.unconfirmed(),
        })
    }

    /// Archived events with `occurred_at >= since`, in the order they were recorded, each
    /// with whether the broker has acknowledged it and whether the ledger confirmed it.
    pub fn events_since(&self, since: UtcMillis) -> Result<Vec<(Event, bool, bool)>, StoreError> {
        let mut confirmed: std::collections::HashMap<StreamId, u64> =
            std::collections::HashMap::new();
        let mut out = Vec::new();
        for item in self.store.journal.scan_prefix([EVENT]) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let Ok(e) = Event::from_json(&v) else {
                tracing::warn!(key = ?k, "an archived event cannot be decoded; skipped");
                continue;
            };
            if e.occurred_at >= since {
                let Some(pos) = pos_of(&k) else { continue };
                let pending = self
                    .store
                    .journal
                    .contains_key(key(PENDING, pos))
                    .map_err(|e| self.err(e))?;
                let upto = match confirmed.get(&e.stream) {
                    Some(c) => *c,
                    None => {
                        let c = self.confirmed_seq(&e.stream)?;
                        confirmed.insert(e.stream, c);
                        c
                    }
                };
                let stored = e.seq <= upto;
                out.push((e, !pending, stored));
            }
        }
        Ok(out)
    }

    /// Removes delivered events older than `cutoff` from the archive; returns how many
    /// were removed and how many older ones are kept because the ledger has not confirmed
    /// them (with `[ledger] confirm = true`). Undelivered events are never removed.
    ///
    /// One removal at a time, never a sled batch: a batch holds sled's exclusive lock until
    /// it is all applied, and the taps recorded meanwhile wait for it (100 000 old events
    /// held the tap pipeline up to 0.9 s; `cargo bench -p id06d --bench retention`). A
    /// removal lost in a crash is made again at the next prune.
    pub fn prune_delivered(&self, cutoff: UtcMillis) -> Result<(u64, u64), StoreError> {
        let j = &self.store.journal;
        let confirm = self.ledger_confirm();
        let mut removed = 0u64;
        let mut kept_unconfirmed = 0u64;
        for item in j.scan_prefix([EVENT]) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let Some(pos) = pos_of(&k) else { continue };
            // Not a break at the first recent one: an event dated in the future (a clock
            // that was wrong once) must not keep older ones from going.
            let old = Event::from_json(&v).map_or(true, |e| e.occurred_at < cutoff);
            if !old {
                continue;
            }
            if j.contains_key(key(PENDING, pos)).map_err(|e| self.err(e))? {
                continue;
            }
            if j.contains_key(key(UNCONFIRMED, pos))
                .map_err(|e| self.err(e))?
            {
                if confirm {
                    kept_unconfirmed += 1;
                    continue;
                }
                // Confirmation is off now: a marker of an earlier setting goes with its
                // event, before it (a crash in between leaves an old event to prune).
                if j.remove(key(UNCONFIRMED, pos))
                    .map_err(|e| self.err(e))?
                    .is_some()
                {
                    self.unconfirmed.fetch_sub(1, Ordering::AcqRel);
                }
            }
            j.remove(k).map_err(|e| self.err(e))?;
            removed += 1;
        }
        Ok((removed, kept_unconfirmed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use id06_protocol::{CardStatus, Decision, EventSchema};

    pub(crate) fn draft(uid: &str, at: i64) -> Event {
        Event {
            schema: EventSchema,
            event_id: String::new(),
            stream: StreamId::from_bytes([0; 16]),
            seq: 0,
            decision_id: String::new(),
            site_id: "SE-1".into(),
            terminal_id: "t1".into(),
            reader: "entry".into(),
            direction: Direction::In,
            card_uid: CardUid::parse(uid).unwrap(),
            card_status: CardStatus::Unlisted,
            decision: Decision::Granted,
            reason: None,
            blocklist_version: 0,
            blocklist_stale: false,
            occurred_at: UtcMillis(at),
            clock_synced: true,
        }
    }

    #[test]
    fn seq_starts_at_one_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), "t1").unwrap();
            let o = Outbox::open(&store).unwrap();
            let got = o
                .commit(vec![draft("04A1B2C3", 1), draft("04A1B2C4", 2)], &[])
                .unwrap();
            assert_eq!(got.iter().map(|e| e.1.seq).collect::<Vec<_>>(), vec![1, 2]);
            let stream = o.stream();
            assert_eq!(got[1].1.stream, stream);
            assert_eq!(got[1].1.event_id, format!("SE-1:t1:{stream}:2"));
            assert_eq!(got[1].1.decision_id, got[1].1.event_id);
            // Deliver everything: the outbox is empty, but seq must not restart.
            o.ack(1).unwrap();
            o.ack(2).unwrap();
            assert_eq!(o.depth(), 0);
        }
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        assert_eq!(o.last_seq(), 2);
        let got = o.commit(vec![draft("04A1B2C3", 3)], &[]).unwrap();
        assert_eq!(got[0].1.seq, 3);
    }

    #[test]
    fn a_recreated_data_directory_is_a_new_stream() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = Store::open(dir.path(), "t1").unwrap();
            let o = Outbox::open(&store).unwrap();
            o.commit(vec![draft("04A1B2C3", 1)], &[]).unwrap();
            o.stream()
        };
        std::fs::remove_dir_all(dir.path()).unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        assert_ne!(o.stream(), first);
        let got = o.commit(vec![draft("04A1B2C3", 2)], &[]).unwrap();
        assert_eq!((got[0].1.seq, got[0].1.stream), (1, o.stream()));
    }

    #[test]
    fn a_log_cut_short_starts_a_new_stream_and_keeps_the_old_events_deliverable() {
        let dir = tempfile::tempdir().unwrap();
        let old = {
            let store = Store::open(dir.path(), "t1").unwrap();
            let o = Outbox::open(&store).unwrap();
            o.commit((0..5).map(|i| draft("04A1B2C3", i)).collect(), &[])
                .unwrap();
            o.checkpoint().unwrap();
            o.commit((5..8).map(|i| draft("04A1B2C3", i)).collect(), &[])
                .unwrap();
            o.stream()
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(WAL_NAME))
            .unwrap()
            .set_len(0)
            .unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        assert_ne!(
            o.stream(),
            old,
            "which seqs of the old stream exist is not known"
        );
        assert_eq!(o.last_seq(), 0);
        let new = o.commit(vec![draft("04A1B2C3", 9)], &[]).unwrap();
        assert_eq!(new[0].1.seq, 1);
        assert!(new[0].0 > 5, "positions are never reused");
        // The old stream's events that were checkpointed are still there, in order, first.
        let pending: Vec<Event> = o
            .pending_from(0, 100)
            .unwrap()
            .iter()
            .map(|(_, json)| Event::from_json(json).unwrap())
            .collect();
        let old_seqs: Vec<u64> = pending
            .iter()
            .filter(|e| e.stream == old)
            .map(|e| e.seq)
            .collect();
        assert_eq!(&old_seqs[..5], &[1, 2, 3, 4, 5]);
        assert_eq!(pending.last().unwrap().stream, o.stream());
        // And the next start continues the new stream.
        drop(o);
        drop(store);
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        assert_eq!(o.last_seq(), 1);
    }

    #[test]
    fn pending_is_in_seq_order_and_ack_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        let drafts = (0..300).map(|i| draft("04A1B2C3", i)).collect();
        o.commit(drafts, &[]).unwrap();
        assert_eq!(o.depth(), 300);
        let first: Vec<u64> = o.pending_from(1, 5).unwrap().iter().map(|p| p.0).collect();
        assert_eq!(first, vec![1, 2, 3, 4, 5]);
        assert!(o.ack(3).unwrap());
        assert!(!o.ack(3).unwrap(), "a second ack changes nothing");
        assert_eq!(
            o.ack_many(&[3, 250, 251, 251]).unwrap(),
            2,
            "only what was pending counts"
        );
        assert_eq!(o.depth(), 297);
        let next: Vec<u64> = o.pending_from(2, 3).unwrap().iter().map(|p| p.0).collect();
        assert_eq!(next, vec![2, 4, 5]);
        let json = &o.pending_from(300, 1).unwrap()[0].1;
        assert_eq!(Event::from_json(json).unwrap().seq, 300);
        // The depth is recovered on reopening after a checkpoint (a clean stop).
        o.checkpoint().unwrap();
        drop(o);
        let o = Outbox::open(&store).unwrap();
        assert_eq!(o.depth(), 297);
        assert_eq!(o.first_pending().unwrap(), Some(1));
    }

    #[test]
    fn a_due_checkpoint_runs_on_the_checkpoint_thread_and_in_the_commit_once_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        let log_len = |o: &Outbox| o.logs.lock().unwrap().wal.len();
        let due = |o: &Outbox| o.logs.lock().unwrap().wal.checkpoint_due();
        let wait = |what: &str, cond: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while !cond() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let thread = o.start_checkpoints().unwrap();
        assert!(o.start_checkpoints().is_err(), "one checkpoint thread");
        // An idle gateway: one tap, then nothing; the thread checkpoints the overdue log.
        o.commit(vec![draft("04A1B2C3", 1)], &[]).unwrap();
        assert!(log_len(&o) > 0);
        wait("the idle log checkpointed by the thread", &|| {
            log_len(&o) == 0
        });
        // A busy one: the commit that finds a checkpoint due hands it to the thread.
        o.commit(vec![draft("04A1B2C3", 2)], &[]).unwrap();
        wait("a checkpoint due", &|| due(&o));
        o.commit(vec![draft("04A1B2C3", 3)], &[]).unwrap();
        wait("the due log checkpointed by the thread", &|| {
            log_len(&o) == 0
        });
        drop(thread);
        // Without the thread, the commit that finds one due checkpoints before it returns.
        o.commit(vec![draft("04A1B2C3", 4)], &[]).unwrap();
        wait("a checkpoint due", &|| due(&o));
        o.commit(vec![draft("04A1B2C3", 5)], &[]).unwrap();
        assert_eq!(log_len(&o), 0);
        assert_eq!(o.last_seq(), 5);
        assert_eq!(o.depth(), 5);
    }

    #[test]
    fn a_durable_commit_is_kept_in_the_log_until_it_is_applied_then_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        let log_len = |o: &Outbox| o.logs.lock().unwrap().wal.len();
        let committed = o
            .commit_durable(vec![draft("04A1B2C3", 1), draft("04A1B2C4", 2)], &[])
            .unwrap();
        assert_eq!(
            committed.recorded().iter().map(|r| r.0).collect::<Vec<_>>(),
            [1, 2]
        );
        // Durable, counted, not yet in the database: not readable, and no checkpoint may
        // empty the log that holds them.
        assert_eq!(o.depth(), 2);
        assert_eq!(o.last_seq(), 0);
        assert!(o.pending_from(1, 10).unwrap().is_empty());
        o.checkpoint().unwrap();
        assert!(log_len(&o) > 0, "the log still holds the commit");
        let recorded = committed.apply();
        assert_eq!(recorded.len(), 2);
        assert_eq!(o.last_seq(), 2);
        assert_eq!(o.pending_from(1, 10).unwrap().len(), 2);
        o.checkpoint().unwrap();
        assert_eq!(log_len(&o), 0, "applied: the checkpoint empties the log");
        // Dropped without apply (a caller that returns early): applied all the same.
        drop(o.commit_durable(vec![draft("04A1B2C5", 3)], &[]).unwrap());
        assert_eq!(o.last_seq(), 3);
        assert_eq!(o.pending_from(3, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_stop_without_checkpoint_replays_the_logs_and_loses_nothing_acknowledged_or_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), "t1").unwrap();
            let o = Outbox::open(&store).unwrap();
            o.commit((0..10).map(|i| draft("04A1B2C3", i)).collect(), &[])
                .unwrap();
            o.checkpoint().unwrap();
            o.ack_many(&[1, 2]).unwrap();
            o.checkpoint().unwrap();
            o.commit((10..20).map(|i| draft("04A1B2C3", i)).collect(), &[])
                .unwrap();
            o.ack_many(&[3, 11]).unwrap();
            // Stop without a checkpoint. (Dropping the handles is not a power cut: sled
            // may still write what it holds. Whatever it wrote, the replay must leave
            // every unacknowledged event pending; kill -9 in the middle of taps is in
            // tests/integration/faults.rs.)
        }
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        assert_eq!(o.last_seq(), 20);
        let pending: Vec<u64> = o
            .pending_from(1, 100)
            .unwrap()
            .iter()
            .map(|p| p.0)
            .collect();
        // Every acknowledgement sticks (1 and 2 by the checkpoint, 3 and 11 by the
        // acknowledgement log, also though the replay of 11's record restored its marker);
        // everything else is still pending.
        let expected: Vec<u64> = (4..=10).chain(12..=20).collect();
        assert_eq!(pending, expected);
        assert_eq!(o.depth(), pending.len() as u64);
    }

    #[test]
    fn toggle_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        let uid = CardUid::parse("04A1B2C3").unwrap();
        assert_eq!(o.toggle_state(&uid).unwrap(), None);
        let t = ToggleRecord {
            uid,
            direction: Direction::Out,
            at_ms: 1234,
        };
        o.commit(vec![draft("04A1B2C3", 1)], &[t]).unwrap();
        assert_eq!(o.toggle_state(&uid).unwrap(), Some((Direction::Out, 1234)));
    }

    #[test]
    fn pruning_keeps_undelivered_and_recent_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        o.commit((1..=4).map(|i| draft("04A1B2C3", i * 100)).collect(), &[])
            .unwrap();
        o.ack(1).unwrap();
        o.ack(3).unwrap();
        o.ack(4).unwrap();
        // Events 1..3 are older than the cutoff; 2 is undelivered and stays.
        assert_eq!(o.prune_delivered(UtcMillis(350)).unwrap(), (2, 0));
        let left: Vec<u64> = o
            .events_since(UtcMillis(0))
            .unwrap()
            .iter()
            .map(|(e, _, _)| e.seq)
            .collect();
        assert_eq!(left, vec![2, 4]);
        assert_eq!(o.stats().unwrap().oldest, Some((2, UtcMillis(200))));
    }

    #[test]
    fn with_confirmation_events_stay_until_the_ledger_confirms_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        o.set_ledger_confirm(true);
        o.commit((1..=6).map(|i| draft("04A1B2C3", i * 100)).collect(), &[])
            .unwrap();
        assert_eq!(o.unconfirmed(), 6);
        o.ack_many(&[1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(o.depth(), 0, "the broker has them all");
        assert_eq!(o.unconfirmed_sent(0, 100).unwrap(), vec![1, 2, 3, 4, 5, 6]);
        // The ledger stored 1..=4.
        let stream = o.stream();
        assert_eq!(o.confirm(&stream, 4).unwrap(), 4);
        assert_eq!(
            o.confirm(&stream, 3).unwrap(),
            0,
            "going back changes nothing"
        );
        assert_eq!(o.confirmed_seq(&stream).unwrap(), 4);
        assert_eq!(o.unconfirmed(), 2);
        assert!(matches!(
            o.confirm(&stream, 7),
            Err(ConfirmError::Beyond { last: 6, .. })
        ));
        let other = StreamId::from_random([1; 16]);
        assert!(matches!(
            o.confirm(&other, 1),
            Err(ConfirmError::UnknownStream(_))
        ));
        // Not confirmed in time: back into the outbox, in order.
        assert_eq!(o.repend(&[5, 6]).unwrap(), 2);
        assert_eq!(o.depth(), 2);
        let again: Vec<u64> = o.pending_from(0, 10).unwrap().iter().map(|p| p.0).collect();
        assert_eq!(again, vec![5, 6]);
        // Pruning keeps what the ledger has not confirmed, and says how much.
        o.ack_many(&[5, 6]).unwrap();
        assert_eq!(o.prune_delivered(UtcMillis(10_000)).unwrap(), (4, 2));
        // The export knows which the ledger stored.
        let stored: Vec<(u64, bool, bool)> = o
            .events_since(UtcMillis(0))
            .unwrap()
            .iter()
            .map(|(e, acked, stored)| (e.seq, *acked, *stored))
            .collect();
        assert_eq!(stored, vec![(5, true, false), (6, true, false)]);
        // The count survives a reopening.
        o.checkpoint().unwrap();
        drop(o);
        let o = Outbox::open(&store).unwrap();
        assert_eq!(o.unconfirmed(), 2);
    }

    #[test]
    fn a_replay_range_names_what_the_archive_no_longer_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        o.commit((1..=10).map(|i| draft("04A1B2C3", i * 100)).collect(), &[])
            .unwrap();
        o.ack_many(&(1..=10).collect::<Vec<_>>()).unwrap();
        // 1..=4 pruned.
        assert_eq!(o.prune_delivered(UtcMillis(450)).unwrap(), (4, 0));
        let stream = o.stream();
        let (found, missing) = o.archived_range(&stream, 2, 8, 100).unwrap().unwrap();
        let seqs: Vec<u64> = found.iter().map(|(p, _)| *p).collect();
        assert_eq!(seqs, vec![5, 6, 7, 8]);
        assert_eq!(missing, vec![(2, 4)]);
        // A limit stops early and says nothing about what it did not look at.
        let (found, missing) = o.archived_range(&stream, 5, 10, 2).unwrap().unwrap();
        assert_eq!((found.len(), missing.len()), (2, 0));
        // Beyond the stream's end is not "missing", it never existed.
        let (found, missing) = o.archived_range(&stream, 9, 50, 100).unwrap().unwrap();
        assert_eq!((found.len(), missing), (2, vec![]));
        assert!(o
            .archived_range(&StreamId::from_random([2; 16]), 1, 2, 10)
            .unwrap()
            .is_none());
    }

    #[test]
    fn an_event_dated_in_the_future_does_not_stop_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t1").unwrap();
        let o = Outbox::open(&store).unwrap();
        // 2 was recorded while the clock was a year ahead.
        let times = [100, 10_000_000_000_000, 300, 400];
        o.commit(times.iter().map(|t| draft("04A1B2C3", *t)).collect(), &[])
            .unwrap();
        o.ack_many(&[1, 2, 3, 4]).unwrap();
        assert_eq!(o.prune_delivered(UtcMillis(1000)).unwrap(), (3, 0));
        let left: Vec<u64> = o
            .events_since(UtcMillis(0))
            .unwrap()
            .iter()
            .map(|(e, _, _)| e.seq)
            .collect();
        assert_eq!(left, vec![2]);
    }
}
