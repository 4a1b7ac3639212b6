//! The tap pipeline: reader messages in, durable events out.
//!
//! Runs on its own OS thread (shared with the MQTT task) and owns the debouncer and the
//! outbox writer. It takes every message that is waiting (a burst), debounces and decides
//! each, records all resulting events in one batch with one fsync (group commit), and only
//! then hands the decisions to the MQTT task and logs the taps. If the disk refuses, the events wait in a bounded
//! in-memory queue and are written as soon as the disk accepts them again; the decision is
//! still logged and reported.

use crate::config::{DirectionMode, WhenStale};
use crate::lists::blocklist::Blocklist;
use crate::ops::clock::clock_synced;
use crate::shared::{Counters, Shared};
use crate::storage::outbox::{Committed, Outbox, ToggleRecord};
use crate::tap::debounce::{Debouncer, Verdict};
use crate::tap::decide::toggle_direction;
use id06_protocol::{
    CardUid, Decision, Direction, Event, EventSchema, Hint, ReaderState, UtcMillis,
};
use id06_readers::{ReaderMessage, Report};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The most messages taken in one burst.
const BURST: usize = 512;
/// The most events held in memory while the disk refuses them.
const MAX_UNSTORED: usize = 100_000;

/// A decision for `P/decision`: the event as JSON, and its outbox position once it is
/// durable (0 while the disk refuses it). A durable one's payload is byte for byte the
/// stored event, so the MQTT task may send it on `P/event` too when it is the next one due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// Outbox position of the durable event, 0 if not stored yet.
    pub pos: u64,
    /// The event as JSON.
    pub payload: Vec<u8>,
    /// When it was decided.
    pub at: Instant,
}

/// What the pipeline needs to know about a reader.
/// A decision for the door controllers (`P/decision`): the payload and when it was made.
#[derive(Debug, Clone)]
pub struct DoorDecision {
    /// The event as JSON.
    pub payload: Vec<u8>,
    /// When it was decided.
    pub at: Instant,
}

#[derive(Debug, Clone)]
pub struct ReaderInfo {
    /// Configured name.
    pub name: String,
    /// In, out or toggle.
    pub direction: DirectionMode,
}

/// Everything the pipeline works with.
pub struct Pipeline {
    /// Site id for events.
    pub site_id: String,
    /// Terminal id for events.
    pub terminal_id: String,
    /// Readers by index.
    pub readers: Vec<ReaderInfo>,
    /// The debouncer.
    pub debouncer: Debouncer,
    /// Where events go.
    pub outbox: Outbox,
    /// Where decisions come from: the national list ...
    pub blocklist: Blocklist,
    /// ... and the site's own list,
    pub site_list: crate::lists::site_list::SiteList,
    /// ... with the site's access mode.
    pub access: crate::config::AccessMode,
    /// `[blocklist] max_age_hours`.
    pub max_age_hours: u64,
    /// `[blocklist] when_stale`.
    pub when_stale: WhenStale,
    /// Counters, reader states, wake-up.
    pub shared: Arc<Shared>,
    /// Decisions for `P/decision` (best effort: dropped when full).
    pub decisions: mpsc::Sender<Decided>,
    /// Decisions for `P/decision` (the door session; best effort: dropped when full).
    pub doors: mpsc::Sender<DoorDecision>,
    /// The readers that answer the worker (light, sound, display, door), told once a tap
    /// is durable.
    pub feedback: Vec<crate::tap::readers::ReaderFeedback>,
    /// The zero point of the debouncer's clock.
    pub epoch: Instant,
    /// Whether the clock was synchronised at the last tap (to log changes once).
    pub clock_was_synced: Option<bool>,
    /// The data directory, whose free space is checked before each commit.
    pub data_dir: std::path::PathBuf,
    /// Where the number of taps waiting in memory is recorded.
    pub unstored_record: Option<crate::storage::diskguard::UnstoredRecord>,
}

/// What the reader shows for a recorded tap.
fn signal_for(e: &Event, door: Option<(u8, u32)>) -> id06_readers::feedback::Signal {
    use id06_readers::feedback::Signal;
    match e.reason {
        None => Signal::Granted {
            text: match e.direction {
                id06_protocol::Direction::In => "Välkommen in".to_string(),
                id06_protocol::Direction::Out => "Hej då".to_string(),
            },
            door,
        },
        Some(r) => Signal::Denied {
            text: r.swedish().to_string(),
        },
    }
}

struct Pending {
    event: Event,
    toggle: Option<ToggleRecord>,
    /// Its decision was already published (while the disk refused it).
    announced: bool,
}

impl Pipeline {
    /// Runs until every sender of `rx` is gone (all readers stopped), then writes what is
    /// left and returns.
    ///
    /// Meant for a current-thread runtime shared with the MQTT task (see `run.rs`): a
    /// commit blocks the thread for its `fdatasync`, and the decisions it makes are sent by
    /// the MQTT task on the same thread as soon as this loop waits again, without waking
    /// another core.
    pub async fn run(mut self, mut rx: mpsc::Receiver<ReaderMessage>) {
        let mut unstored: VecDeque<Pending> = VecDeque::new();
        let mut retry_at: Option<Instant> = None;
        loop {
            let first = if unstored.is_empty() {
                match rx.recv().await {
                    Some(m) => Some(m),
                    None => break,
                }
            } else {
                // Events wait for the disk: retry at the deadline even if no reader speaks.
                let wait = retry_at
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .unwrap_or_default();
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(m)) => Some(m),
                    Err(_) => None,
                    Ok(None) => {
                        if let Some(c) = self.store(&mut unstored, &mut retry_at) {
                            self.recorded(c.apply());
                        }
                        if !unstored.is_empty() {
                            tracing::error!(
                                lost = unstored.len(),
                                "shutting down with taps that could not be stored (the disk refused them); they are lost"
                            );
                        }
                        return;
                    }
                }
            };
            let hb = &self.shared.heartbeat;
            hb.pipeline_busy_since
                .store(hb.now_ms(), std::sync::atomic::Ordering::Release);
            let mut toggles_in_batch: HashMap<CardUid, (Direction, i64)> = HashMap::new();
            if let Some(first) = first {
                self.handle(first, &mut unstored, &mut toggles_in_batch);
                for _ in 0..BURST {
                    match rx.try_recv() {
                        Ok(m) => self.handle(m, &mut unstored, &mut toggles_in_batch),
                        Err(_) => break,
                    }
                }
            }
            let committed = if retry_at.is_none_or(|t| Instant::now() >= t) {
                self.store(&mut unstored, &mut retry_at)
            } else {
                None
            };
            // Let the door session and the MQTT task send the decisions and events just
            // made before the database is updated and the next batch taken, even when
            // readers keep this loop busy.
            tokio::task::yield_now().await;
            if let Some(c) = committed {
                self.recorded(c.apply());
            }
            self.shared
                .heartbeat
                .pipeline_busy_since
                .store(0, std::sync::atomic::Ordering::Release);
        }
        if let Some(c) = self.store(&mut unstored, &mut retry_at) {
            self.recorded(c.apply());
        }
    }

    fn handle(
        &mut self,
        m: ReaderMessage,
        unstored: &mut VecDeque<Pending>,
        toggles: &mut HashMap<CardUid, (Direction, i64)>,
    ) {
        let reader = m.reader;
        match m.report {
            Report::Health { state, error } => {
                let name = self.reader_name(reader);
                self.shared.update_reader(reader, |s| {
                    if state == ReaderState::Ok && s.state == ReaderState::Recovering {
                        s.recoveries += 1;
                        tracing::info!(reader = %name, recoveries = s.recoveries, "reader recovered");
                    }
                    if state != ReaderState::Ok {
                        if s.state != state {
                            tracing::warn!(reader = %name, state = ?state, error = error.as_deref().unwrap_or(""), "reader is not ok");
                        }
                        s.last_error = error.clone();
                    } else if let Some(e) = &error {
                        // Answering, with something to say (an OSDP reader's tamper switch).
                        if s.last_error.as_ref() != Some(e) {
                            tracing::warn!(reader = %name, error = %e, "the reader reports a problem");
                        }
                        s.last_error = error.clone();
                    }
                    s.state = state;
                });
            }
            Report::Device(info) => {
                tracing::info!(reader = %self.reader_name(reader), device = %info, "reader found");
                self.shared.update_reader(reader, |s| s.device = Some(info));
            }
            Report::Finished => {
                tracing::info!(reader = %self.reader_name(reader), "reader finished");
                Counters::bump(&self.shared.counters.readers_finished);
            }
            Report::Observed(observation) => {
                let t = m.at.saturating_duration_since(self.epoch).as_millis() as u64;
                let outcome = self.debouncer.observe(t, reader, &observation);
                if let Some(h) = outcome.hold_steady {
                    let name = self.reader_name(reader);
                    tracing::debug!(reader = %name, hold_steady = h, "hint");
                    self.shared
                        .update_reader(reader, |s| s.hint = h.then_some(Hint::HoldSteady));
                    if let Some(f) = self.feedback.iter().find(|f| f.reader == name) {
                        f.sender
                            .send(id06_readers::feedback::Signal::HoldSteady { on: h });
                    }
                }
                match outcome.verdict {
                    None => {}
                    Some(Verdict::Duplicate(uid)) => {
                        Counters::bump(&self.shared.counters.duplicates);
                        tracing::debug!(reader = %self.reader_name(reader), card = %uid, "duplicate presentation, not a tap");
                    }
                    Some(Verdict::Tap(uid)) => {
                        // For benches/tail.rs: the moment the pipeline has the tap.
                        tracing::trace!(target: "id06d::stages", card = %uid, "taken");
                        let elapsed = m.at.elapsed().as_millis() as i64;
                        let occurred_at = UtcMillis(UtcMillis::now().as_millis() - elapsed);
                        if unstored.len() >= MAX_UNSTORED {
                            tracing::error!(card = %uid, "the disk has refused taps for too long; this tap cannot be kept");
                            return;
                        }
                        let pending = self.tap(reader, uid, occurred_at, toggles);
                        unstored.push_back(pending);
                    }
                }
            }
        }
    }

    fn reader_name(&self, reader: usize) -> String {
        self.readers
            .get(reader)
            .map_or_else(|| format!("#{reader}"), |r| r.name.clone())
    }

    fn tap(
        &mut self,
        reader: usize,
        uid: CardUid,
        occurred_at: UtcMillis,
        toggles: &mut HashMap<CardUid, (Direction, i64)>,
    ) -> Pending {
        let index = self.blocklist.index();
        let stale = index.is_stale(occurred_at, self.max_age_hours);
        let site = self.site_list.index();
        let ruling = crate::tap::decide::decide_at_site(
            index.lookup(&uid),
            site.lookup(&uid),
            self.access,
            stale,
            self.when_stale,
        );
        let mode = self
            .readers
            .get(reader)
            .map_or(DirectionMode::In, |r| r.direction);
        let direction = match mode.fixed() {
            Some(d) => d,
            None => {
                let last = match toggles.get(&uid) {
                    Some(v) => Some(*v),
                    None => self.outbox.toggle_state(&uid).unwrap_or_else(|e| {
                        tracing::warn!(card = %uid, "cannot read the toggle state ({e}); counting this tap as in");
                        None
                    }),
                };
                toggle_direction(last, occurred_at.as_millis())
            }
        };
        // Only a granted tap moves the card's in/out state: a denied worker did not pass.
        let toggle = (ruling.decision == Decision::Granted).then_some(ToggleRecord {
            uid,
            direction,
            at_ms: occurred_at.as_millis(),
        });
        if let Some(t) = toggle {
            toggles.insert(uid, (t.direction, t.at_ms));
        }
        let synced = clock_synced();
        if self.clock_was_synced != Some(synced) {
            if synced {
                tracing::info!("the system clock is synchronised");
            } else {
                tracing::warn!(
                    "the system clock is not synchronised; events are marked clock_synced = false"
                );
            }
            self.clock_was_synced = Some(synced);
        }
        let event = Event {
            schema: EventSchema,
            event_id: String::new(),
            stream: self.outbox.stream(),
            seq: 0,
            decision_id: String::new(),
            site_id: self.site_id.clone(),
            terminal_id: self.terminal_id.clone(),
            reader: self.reader_name(reader),
            direction,
            card_uid: uid,
            card_status: ruling.card_status,
            decision: ruling.decision,
            reason: ruling.reason,
            blocklist_version: index.version,
            blocklist_stale: stale,
            occurred_at,
            clock_synced: synced,
        };
        Pending {
            event,
            toggle,
            announced: false,
        }
    }

    /// Writes the waiting events; on success publishes the decisions not yet published and
    /// returns the commit, durable, to be applied to the database (then
    /// [`Pipeline::recorded`]) once they have gone out. When the disk is (nearly) full the
    /// events stay in memory, their decisions are published at once without a `seq`, and
    /// the number waiting is recorded.
    fn store(
        &mut self,
        unstored: &mut VecDeque<Pending>,
        retry_at: &mut Option<Instant>,
    ) -> Option<Committed> {
        if unstored.is_empty() {
            *retry_at = None;
            return None;
        }
        let result = match crate::storage::diskguard::free_bytes(&self.data_dir) {
            Some(free) if free < crate::storage::diskguard::MIN_FREE_BYTES => Err(format!(
                "the disk holding {} is full ({} KiB free; {} KiB are kept free to protect the database)",
                self.data_dir.display(),
                free / 1024,
                crate::storage::diskguard::MIN_FREE_BYTES / 1024
            )),
            _ => {
                let events: Vec<Event> = unstored.iter().map(|p| p.event.clone()).collect();
                let toggles: Vec<ToggleRecord> =
                    unstored.iter().filter_map(|p| p.toggle).collect();
                let announced: Vec<bool> = unstored.iter().map(|p| p.announced).collect();
                let (decisions, doors, counters, shared, feedback) = (
                    &self.decisions,
                    &self.doors,
                    &self.shared.counters,
                    &self.shared,
                    &self.feedback,
                );
                // The decisions go the moment the events are on disk; the database is
                // updated once the MQTT task has sent them.
                self.outbox
                    .commit_durable(events, &toggles)
                    .inspect(|committed| {
                        let recorded = committed.recorded();
                        for ((pos, e), was_announced) in recorded.iter().zip(&announced) {
                            if *was_announced {
                                continue; // its decision went out while the disk was full
                            }
                            // For benches/osdp.rs and tail.rs: the moment the tap is durable.
                            tracing::trace!(target: "id06d::durable", card = %e.card_uid, pos = *pos, "durable");
                            // The worker at the reader first: green means recorded.
                            if let Some(f) = feedback.iter().find(|f| f.reader == e.reader) {
                                f.sender.send(signal_for(e, f.door));
                            }
                            let payload = e.to_json();
                            shared.taps.push(&payload);
                            let at = Instant::now();
                            let door = DoorDecision {
                                payload: payload.clone(),
                                at,
                            };
                            if doors.try_send(door).is_err() {
                                Counters::bump(&counters.decisions_dropped);
                            }
                            // The event itself may go straight from here too (see mqtt/delivery.rs);
                            // if not, it is read back from the outbox.
                            let _ = decisions.try_send(Decided {
                                pos: *pos,
                                payload,
                                at,
                            });
                        }
                    })
                    .map_err(|e| {
                        if matches!(e, crate::storage::store::StoreError::Unusable { .. }) {
                            if let Ok(mut u) = self.shared.storage_unusable.lock() {
                                u.get_or_insert_with(|| e.to_string());
                            }
                        }
                        e.to_string()
                    })
            }
        };
        let shared = self.shared.clone();
        let c = &shared.counters;
        match result {
            Ok(committed) => {
                let late = unstored.iter().filter(|p| p.announced).count();
                unstored.clear();
                *retry_at = None;
                if let Ok(mut e) = self.shared.storage_error.lock() {
                    if e.take().is_some() {
                        tracing::info!(
                            stored_late = late,
                            "the disk accepts events again; the waiting taps are stored"
                        );
                        self.shared.status_changed();
                    }
                }
                self.record_unstored(None);
                Some(committed)
            }
            Err(message) => {
                Counters::bump(&c.storage_failures);
                let changed = self
                    .shared
                    .storage_error
                    .lock()
                    .map(|mut e| {
                        let changed = e.as_deref() != Some(&message);
                        *e = Some(message.clone());
                        changed
                    })
                    .unwrap_or(false);
                if changed {
                    tracing::error!(waiting = unstored.len(), "CANNOT STORE TAPS: {message}; they wait in memory and are stored as soon as the disk accepts them");
                    self.shared.status_changed();
                }
                // The door must not wait for the disk: decide and signal now, without a seq,
                // under an id of its own that the stored event will name as its decision.
                for p in unstored.iter_mut().filter(|p| !p.announced) {
                    p.announced = true;
                    let id = Event::unstored_id_for(
                        &p.event.site_id,
                        &p.event.terminal_id,
                        &p.event.stream,
                        crate::storage::wal::random_u64(),
                    );
                    p.event.decision_id = id.clone();
                    let mut e = p.event.clone();
                    e.seq = 0;
                    e.event_id = id;
                    tracing::warn!(
                        decision_id = %e.event_id,
                        reader = %e.reader,
                        direction = %e.direction,
                        card = %e.card_uid,
                        decision = ?e.decision,
                        reason = e.reason.map_or("", |r| r.as_str()),
                        "tap decided but not yet stored (disk full)"
                    );
                    let payload = e.to_json();
                    self.shared.taps.push(&payload);
                    let door = DoorDecision {
                        payload,
                        at: Instant::now(),
                    };
                    if self.doors.try_send(door).is_err() {
                        Counters::bump(&c.decisions_dropped);
                    }
                }
                let state = crate::storage::diskguard::Unstored {
                    count: unstored.len() as u64,
                    first: unstored
                        .front()
                        .map_or(UtcMillis(0), |p| p.event.occurred_at),
                    last: unstored
                        .back()
                        .map_or(UtcMillis(0), |p| p.event.occurred_at),
                };
                self.record_unstored(Some(state));
                *retry_at = Some(Instant::now() + Duration::from_millis(500));
                None
            }
        }
    }

    /// Taps now in the database: counted, logged, and the MQTT task told (an event it did
    /// not send from its decision is read from the outbox now).
    fn recorded(&self, recorded: Vec<(u64, Event)>) {
        if recorded.is_empty() {
            return;
        }
        let c = &self.shared.counters;
        self.shared.wake.notify_one();
        for (_, e) in &recorded {
            Counters::bump(&c.taps);
            match e.reason {
                None => Counters::bump(&c.granted),
                Some(r) => Counters::bump(c.denied_for(r)),
            }
            tracing::info!(
                seq = e.seq,
                reader = %e.reader,
                direction = %e.direction,
                card = %e.card_uid,
                status = %e.card_status,
                decision = ?e.decision,
                reason = e.reason.map_or("", |r| r.as_str()),
                "tap"
            );
        }
    }

    fn record_unstored(&mut self, state: Option<crate::storage::diskguard::Unstored>) {
        if let Some(r) = &mut self.unstored_record {
            if let Err(e) = r.write(state) {
                tracing::warn!("cannot update unstored.state: {e}");
            }
        }
    }
}
