//! State shared between the daemon's tasks: counters, reader states, and the signal that
//! wakes the MQTT task. Everything here is either atomic or behind a short-held lock.

use id06_protocol::{DenyReason, ReaderStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

/// Counters since start, for the demo summary, logs and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Taps recorded.
    pub taps: AtomicU64,
    /// Presentations suppressed as duplicates.
    pub duplicates: AtomicU64,
    /// Taps granted.
    pub granted: AtomicU64,
    /// Taps denied, by [`DenyReason::ALL`] index.
    pub denied: [AtomicU64; DenyReason::ALL.len()],
    /// Events acknowledged by the broker on `P/event`.
    pub delivered: AtomicU64,
    /// Events published again (after a reconnect or restart).
    pub redelivered: AtomicU64,
    /// Decisions published on `P/decision`.
    pub decisions_published: AtomicU64,
    /// Decisions not published because the broker was unreachable or the queue full.
    pub decisions_dropped: AtomicU64,
    /// Readers whose driver finished (simulated timelines that reached `end`).
    pub readers_finished: AtomicU64,
    /// Failed attempts to store events.
    pub storage_failures: AtomicU64,
    /// Blocklist updates and snapshots applied.
    pub blocklist_applied: AtomicU64,
    /// Blocklist updates and snapshots rejected (gap, replay, signature, malformed).
    pub blocklist_rejected: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// The counter for a deny reason.
    pub fn denied_for(&self, reason: DenyReason) -> &AtomicU64 {
        let i = DenyReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        &self.denied[i]
    }
}

/// One reader's published state and whether it changed since last published.
#[derive(Debug, Clone)]
pub struct ReaderSlot {
    /// The reader's configured name.
    pub name: String,
    /// The state to publish on `P/reader/{name}`.
    pub status: ReaderStatus,
    /// Changed since the MQTT task last published it.
    pub dirty: bool,
}

/// What the tasks share.
#[derive(Debug)]
pub struct Shared {
    /// Counters.
    pub counters: Counters,
    /// Reader states, by index.
    pub readers: Mutex<Vec<ReaderSlot>>,
    /// Wakes the MQTT task: new events in the outbox, reader states changed.
    pub wake: Notify,
    /// The last storage failure, while it lasts.
    pub storage_error: Mutex<Option<String>>,
    /// What an earlier run lost to a full disk (reported from start).
    pub storage_loss: Mutex<Option<String>>,
    /// The data directory cannot be written any more (removed, replaced, read-only, I/O
    /// errors): the daemon stops (see `storage/watch.rs`).
    pub storage_unusable: Mutex<Option<String>>,
    /// A blocklist gap `[version in force, from_version of the update that did not fit]`.
    pub blocklist_gap: Mutex<Option<[u64; 2]>>,
    /// The retained status should be published again soon.
    pub status_dirty: std::sync::atomic::AtomicBool,
    /// The publishing session is connected to the broker.
    pub broker_connected: std::sync::atomic::AtomicBool,
    /// Liveness of the work loops, for the systemd watchdog.
    pub heartbeat: Heartbeat,
    /// Signalled whenever events leave the outbox acknowledged (for benchmarks and tests
    /// that wait for delivery without spinning).
    pub delivered: Notify,
    /// The taps as they are decided, for the commissioning page.
    pub taps: TapFeed,
}

/// The last taps, and each new one as it is decided (its event as JSON), for the
/// commissioning page. Pushing costs the tap path one copy of the payload and a short
/// lock; nobody listening costs nothing more.
#[derive(Debug)]
pub struct TapFeed {
    live: tokio::sync::broadcast::Sender<std::sync::Arc<[u8]>>,
    recent: Mutex<std::collections::VecDeque<std::sync::Arc<[u8]>>>,
}

impl TapFeed {
    /// How many taps are kept for a page that opens.
    pub const RECENT: usize = 20;

    fn new() -> TapFeed {
        TapFeed {
            live: tokio::sync::broadcast::channel(64).0,
            recent: Mutex::new(std::collections::VecDeque::with_capacity(Self::RECENT)),
        }
    }

    /// A tap was decided: `event` is its event as JSON.
    pub fn push(&self, event: &[u8]) {
        let event: std::sync::Arc<[u8]> = event.into();
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == Self::RECENT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        let _ = self.live.send(event);
    }

    /// The last taps, oldest first.
    pub fn recent(&self) -> Vec<std::sync::Arc<[u8]>> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every tap from now on (a receiver that falls more than 64 behind skips ahead).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<std::sync::Arc<[u8]>> {
        self.live.subscribe()
    }
}

/// Liveness of the daemon's work loops. The watchdog is fed only while both look alive:
/// the tap pipeline is idle (waiting for readers) or finished its last batch recently, and
/// the MQTT task went round its loop recently (it wakes at least for keep-alives).
#[derive(Debug, Default)]
pub struct Heartbeat {
    /// Monotonic ms (since `started`) when the pipeline began its current batch; 0 = idle.
    pub pipeline_busy_since: AtomicU64,
    /// Monotonic ms (since `started`) of the MQTT task's last loop iteration.
    pub mqtt_last_turn: AtomicU64,
    started: std::sync::OnceLock<std::time::Instant>,
}

impl Heartbeat {
    /// Milliseconds since the heartbeat was first used (never 0).
    pub fn now_ms(&self) -> u64 {
        let start = self.started.get_or_init(std::time::Instant::now);
        start.elapsed().as_millis() as u64 + 1
    }

    /// Why the loops do not look alive at `now_ms`, or `None` when they do.
    pub fn stalled(
        &self,
        now_ms: u64,
        pipeline_limit_ms: u64,
        mqtt_limit_ms: u64,
    ) -> Option<String> {
        let busy = self.pipeline_busy_since.load(Ordering::Acquire);
        if busy != 0 && now_ms.saturating_sub(busy) > pipeline_limit_ms {
            return Some(format!(
                "the tap pipeline has been stuck in one batch for {} ms",
                now_ms - busy
            ));
        }
        let mqtt = self.mqtt_last_turn.load(Ordering::Acquire);
        if mqtt != 0 && now_ms.saturating_sub(mqtt) > mqtt_limit_ms {
            return Some(format!(
                "the MQTT task has not moved for {} ms",
                now_ms - mqtt
            ));
        }
        None
    }
}

impl Shared {
    /// Shared state for readers with these names.
    pub fn new(reader_names: &[String]) -> Shared {
        let readers = reader_names
            .iter()
            .map(|name| ReaderSlot {
                name: name.clone(),
                status: ReaderStatus {
                    state: id06_protocol::ReaderState::Absent,
                    hint: None,
                    last_error: None,
                    recoveries: 0,
                    device: None,
                },
                dirty: true,
            })
            .collect();
        Shared {
            counters: Counters::default(),
            readers: Mutex::new(readers),
            wake: Notify::new(),
            storage_error: Mutex::new(None),
            storage_loss: Mutex::new(None),
            storage_unusable: Mutex::new(None),
            blocklist_gap: Mutex::new(None),
            status_dirty: std::sync::atomic::AtomicBool::new(false),
            broker_connected: std::sync::atomic::AtomicBool::new(false),
            heartbeat: Heartbeat::default(),
            delivered: Notify::new(),
            taps: TapFeed::new(),
        }
    }

    /// Asks the MQTT task to publish the retained status again.
    pub fn status_changed(&self) {
        self.status_dirty.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Changes reader `index`'s state with `f`; marks it for publishing if it changed.
    pub fn update_reader(&self, index: usize, f: impl FnOnce(&mut ReaderStatus)) {
        let changed = {
            let Ok(mut readers) = self.readers.lock() else {
                return;
            };
            let Some(slot) = readers.get_mut(index) else {
                return;
            };
            let before = slot.status.clone();
            f(&mut slot.status);
            let changed = slot.status != before;
            slot.dirty |= changed;
            changed
        };
        if changed {
            self.wake.notify_one();
        }
    }

    /// Takes the reader states that changed since the last call (all of them with `all`).
    pub fn take_reader_updates(&self, all: bool) -> Vec<(String, ReaderStatus)> {
        let Ok(mut readers) = self.readers.lock() else {
            return Vec::new();
        };
        readers
            .iter_mut()
            .filter(|s| all || s.dirty)
            .map(|s| {
                s.dirty = false;
                (s.name.clone(), s.status.clone())
            })
            .collect()
    }

    /// A snapshot of every reader's state.
    pub fn reader_states(&self) -> Vec<(String, ReaderStatus)> {
        self.readers
            .lock()
            .map(|r| {
                r.iter()
                    .map(|s| (s.name.clone(), s.status.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_sees_a_stuck_loop_and_not_an_idle_one() {
        let h = Heartbeat::default();
        assert_eq!(
            h.stalled(100_000, 20_000, 40_000),
            None,
            "nothing started yet"
        );
        h.mqtt_last_turn.store(90_000, Ordering::Release);
        assert_eq!(
            h.stalled(100_000, 20_000, 40_000),
            None,
            "idle pipeline, recent MQTT turn"
        );
        h.pipeline_busy_since.store(70_000, Ordering::Release);
        assert!(h
            .stalled(100_000, 20_000, 40_000)
            .unwrap()
            .contains("pipeline"));
        h.pipeline_busy_since.store(0, Ordering::Release);
        assert!(h.stalled(140_000, 20_000, 40_000).unwrap().contains("MQTT"));
    }
}
