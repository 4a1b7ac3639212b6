//! # id06-ledger
//!
//! A reference ledger consumer for id06d: what a ledger vendor's collector has to do so that
//! no tap is lost between the gateway and the ledger's database.
//!
//! - It subscribes to `$share/{group}/{prefix}/+/+/event` with a persistent session, so two
//!   or more instances share the load and a restarted one picks up where it was.
//! - It stores each event in SQLite idempotently by `event_id` (a redelivery or a replay is
//!   a no-op), in batches, one transaction each.
//! - Only after its own commit it publishes `P/ack` `{"stream", "seq"}` with the highest seq
//!   of that stream it holds *without a gap* ([`Store::advance`]); the gateway keeps and
//!   re-sends everything above that.
//! - A gap that stays open for [`GAP_WAIT`] is asked for again on `P/replay`.
//!
//! Several instances may share one database file (SQLite in WAL mode): the table then holds
//! every event of every stream exactly once, and `seq` orders each stream.
//!
//! ```
//! use id06_ledger::Store;
//! let store = Store::open(std::path::Path::new(":memory:")).unwrap();
//! assert_eq!(store.count().unwrap(), 0);
//! ```

use id06_protocol::{Event, StreamId};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::time::Duration;

/// A gap that stays open this long is asked for again.
pub const GAP_WAIT: Duration = Duration::from_secs(3);
/// The same gap is not asked for again sooner than this.
pub const REPLAY_EVERY: Duration = Duration::from_secs(10);

/// One stream of one terminal, as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// The site.
    pub site_id: String,
    /// The terminal.
    pub terminal_id: String,
    /// The stream.
    pub stream: StreamId,
    /// The highest seq held with every one before it.
    pub contiguous: u64,
    /// The highest seq held.
    pub max_seq: u64,
    /// Events held.
    pub count: u64,
}

/// The ledger's database.
pub struct Store {
    db: Connection,
}

/// Why the database failed.
#[derive(Debug, thiserror::Error)]
#[error("the ledger database: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

impl Store {
    /// Opens (creating) the database at `path` (`:memory:` for a private one).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Connection::open(path)?;
        db.busy_timeout(Duration::from_secs(10))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (
                 event_id    TEXT PRIMARY KEY,
                 site_id     TEXT NOT NULL,
                 terminal_id TEXT NOT NULL,
                 stream      TEXT NOT NULL,
                 seq         INTEGER NOT NULL,
                 payload     TEXT NOT NULL,
                 stored_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             );
             CREATE UNIQUE INDEX IF NOT EXISTS events_by_stream ON events (stream, seq);
             CREATE TABLE IF NOT EXISTS streams (
                 stream      TEXT PRIMARY KEY,
                 site_id     TEXT NOT NULL,
                 terminal_id TEXT NOT NULL,
                 contiguous  INTEGER NOT NULL DEFAULT 0
             );",
        )?;
        Ok(Store { db })
    }

    /// Stores `events` in one transaction; returns how many were new (the rest were
    /// redeliveries or replays of events already stored).
    pub fn insert(&mut self, events: &[Event]) -> Result<usize, StoreError> {
        let tx = self.db.transaction()?;
        let mut new = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO events (event_id, site_id, terminal_id, stream, seq, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut stream = tx.prepare_cached(
                "INSERT OR IGNORE INTO streams (stream, site_id, terminal_id) VALUES (?1, ?2, ?3)",
            )?;
            for e in events {
                let payload = String::from_utf8_lossy(&e.to_json()).into_owned();
                new += insert.execute(params![
                    e.event_id,
                    e.site_id,
                    e.terminal_id,
                    e.stream.to_string(),
                    e.seq as i64,
                    payload
                ])?;
                stream.execute(params![e.stream.to_string(), e.site_id, e.terminal_id])?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    /// Moves `stream`'s contiguous seq up as far as the stored events allow and returns it
    /// with the stream's site and terminal (`None` for a stream never seen).
    pub fn advance(&mut self, stream: &StreamId) -> Result<Option<StreamState>, StoreError> {
        let key = stream.to_string();
        let row: Option<(String, String, i64)> = self
            .db
            .query_row(
                "SELECT site_id, terminal_id, contiguous FROM streams WHERE stream = ?1",
                [&key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((site_id, terminal_id, from)) = row else {
            return Ok(None);
        };
        let mut contiguous = from as u64;
        {
            let mut next = self.db.prepare_cached(
                "SELECT seq FROM events WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT 1000",
            )?;
            loop {
                let seqs: Vec<i64> = next
                    .query_map(params![key, contiguous as i64], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                let mut gap = false;
                for s in &seqs {
                    if *s as u64 == contiguous + 1 {
                        contiguous += 1;
                    } else {
                        gap = true;
                        break;
                    }
                }
                if gap || seqs.len() < 1000 {
                    break;
                }
            }
        }
        if contiguous > from as u64 {
            self.db.execute(
                "UPDATE streams SET contiguous = max(contiguous, ?2) WHERE stream = ?1",
                params![key, contiguous as i64],
            )?;
        }
        let (max_seq, count): (i64, i64) = self.db.query_row(
            "SELECT coalesce(max(seq), 0), count(*) FROM events WHERE stream = ?1",
            [&key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Some(StreamState {
            site_id,
            terminal_id,
            stream: *stream,
            contiguous,
            max_seq: max_seq as u64,
            count: count as u64,
        }))
    }

    /// The first gap of `stream` after its contiguous seq: `(from, to)` missing.
    pub fn first_gap(&self, stream: &StreamId) -> Result<Option<(u64, u64)>, StoreError> {
        let key = stream.to_string();
        let contiguous: Option<i64> = self
            .db
            .query_row(
                "SELECT contiguous FROM streams WHERE stream = ?1",
                [&key],
                |r| r.get(0),
            )
            .optional()?;
        let Some(c) = contiguous else { return Ok(None) };
        let next: Option<i64> = self.db.query_row(
            "SELECT min(seq) FROM events WHERE stream = ?1 AND seq > ?2",
            params![key, c],
            |r| r.get(0),
        )?;
        Ok(next
            .filter(|n| *n > c + 1)
            .map(|n| (c as u64 + 1, n as u64 - 1)))
    }

    /// Every stream the ledger has seen.
    pub fn streams(&mut self) -> Result<Vec<StreamState>, StoreError> {
        let ids: Vec<String> = self
            .db
            .prepare("SELECT stream FROM streams ORDER BY site_id, terminal_id, stream")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for id in ids {
            if let Ok(stream) = id.parse::<StreamId>() {
                if let Some(s) = self.advance(&stream)? {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }

    /// Events stored.
    pub fn count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .db
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
        Ok(n as u64)
    }
}

pub mod consumer;

#[cfg(test)]
mod tests {
    use super::*;
    use id06_protocol::{CardStatus, CardUid, Decision, Direction, EventSchema, UtcMillis};

    fn event(stream: &StreamId, seq: u64) -> Event {
        let id = Event::event_id_for("S", "t", stream, seq);
        Event {
            schema: EventSchema,
            event_id: id.clone(),
            stream: *stream,
            seq,
            decision_id: id,
            site_id: "S".into(),
            terminal_id: "t".into(),
            reader: "r".into(),
            direction: Direction::In,
            card_uid: CardUid::parse("04A1B2C3").unwrap(),
            card_status: CardStatus::Unlisted,
            decision: Decision::Granted,
            reason: None,
            blocklist_version: 1,
            blocklist_stale: false,
            occurred_at: UtcMillis(seq as i64),
            clock_synced: true,
        }
    }

    #[test]
    fn events_are_stored_once_and_the_contiguous_seq_stops_at_a_gap() {
        let mut store = Store::open(Path::new(":memory:")).unwrap();
        let s = StreamId::from_random([1; 16]);
        let batch: Vec<Event> = [1, 2, 3, 5, 6].iter().map(|n| event(&s, *n)).collect();
        assert_eq!(store.insert(&batch).unwrap(), 5);
        assert_eq!(
            store.insert(&batch[..2]).unwrap(),
            0,
            "redeliveries are no-ops"
        );
        let st = store.advance(&s).unwrap().unwrap();
        assert_eq!((st.contiguous, st.max_seq, st.count), (3, 6, 5));
        assert_eq!(store.first_gap(&s).unwrap(), Some((4, 4)));
        store.insert(&[event(&s, 4)]).unwrap();
        assert_eq!(store.advance(&s).unwrap().unwrap().contiguous, 6);
        assert_eq!(store.first_gap(&s).unwrap(), None);
        assert!(store
            .advance(&StreamId::from_random([2; 16]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn two_connections_on_one_file_store_every_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut a = Store::open(&path).unwrap();
        let mut b = Store::open(&path).unwrap();
        let s = StreamId::from_random([3; 16]);
        let all: Vec<Event> = (1..=2000).map(|n| event(&s, n)).collect();
        let (odd, even): (Vec<Event>, Vec<Event>) =
            all.iter().cloned().partition(|e| e.seq % 2 == 1);
        a.insert(&odd).unwrap();
        b.insert(&even).unwrap();
        a.insert(&even[..100]).unwrap();
        assert_eq!(a.count().unwrap(), 2000);
        assert_eq!(b.advance(&s).unwrap().unwrap().contiguous, 2000);
    }
}
