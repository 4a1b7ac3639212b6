//! From raw reader observations to taps (contract §6).
//!
//! Design: a pure state machine, one state per reader, fed with `(time in ms, reader,
//! observation)`. It never reads a clock and never sleeps, so every rule is a table test.
//!
//! - A *presentation* is keyed by (reader, card). It starts with the card's first complete
//!   read and emits exactly one tap; it lasts while the card keeps being read and ends once
//!   the card has not been read for `gone_ms`. Several presentations can be open on one
//!   reader at once: two cards in a wallet that the reader reads alternately give two taps,
//!   not a tap per alternation.
//! - A new presentation of the same card on the same reader within `repeat_ms` of that
//!   card's last tap there is a *duplicate*: reported to be counted, not a tap.
//! - A reader *fault* (no answer) says nothing about the card: open presentations are kept
//!   alive through it, so a card lying on a reader that hiccups stays one tap.
//! - *Waving*: `flap_limit` presence changes within `flap_window_ms` since the last complete
//!   read, or `flap_limit` failed reads in a row (unreadable card, faults), set the
//!   `hold_steady` hint. A complete read clears it, and so does a quiet field (no change and
//!   no failure for `flap_window_ms`).

use crate::config::DebounceSettings;
use id06_protocol::CardUid;
use id06_readers::Observation;
use std::collections::{HashMap, VecDeque};

/// What one observation amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A new presentation: one tap, to be decided and recorded.
    Tap(CardUid),
    /// A new presentation too soon after the same card's last tap on this reader.
    Duplicate(CardUid),
}

/// The result of feeding one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// A tap or a duplicate, when a presentation started.
    pub verdict: Option<Verdict>,
    /// `Some(new value)` when the reader's `hold_steady` hint changed.
    pub hold_steady: Option<bool>,
}

#[derive(Debug, Clone)]
struct Presentation {
    uid: CardUid,
    last_read: u64,
}

#[derive(Debug, Clone, Default)]
struct ReaderDebounce {
    /// Open presentations (usually zero or one; two when two cards share the field).
    open: Vec<Presentation>,
    /// Each card's last tap on this reader, for `repeat_ms`; pruned as it ages out.
    last_tap: HashMap<CardUid, u64>,
    /// `last_tap` is pruned when it grows past this (twice its size after the last prune,
    /// so that a morning rush of thousands of cards costs O(1) per tap, not a full scan).
    prune_above: usize,
    /// Whether the previous observation found something in the field.
    field_occupied: bool,
    /// Times of presence changes since the last complete read, within the flap window.
    changes: VecDeque<u64>,
    /// Failed reads (partial reads, faults) in a row.
    failures: u32,
    hold_steady: bool,
}

/// The debouncer for all readers of a gateway.
#[derive(Debug, Clone)]
pub struct Debouncer {
    settings: DebounceSettings,
    readers: Vec<ReaderDebounce>,
}

impl Debouncer {
    /// A debouncer with these settings and no history.
    pub fn new(settings: DebounceSettings) -> Debouncer {
        Debouncer {
            settings,
            readers: Vec::new(),
        }
    }

    /// Whether reader `reader` currently shows the `hold_steady` hint.
    pub fn hold_steady(&self, reader: usize) -> bool {
        self.readers.get(reader).is_some_and(|r| r.hold_steady)
    }

    /// Feeds one observation made at `t` (monotonic milliseconds) on reader `reader`.
    pub fn observe(&mut self, t: u64, reader: usize, observation: &Observation) -> Outcome {
        if reader >= self.readers.len() {
            self.readers
                .resize_with(reader + 1, ReaderDebounce::default);
        }
        let s = self.settings;
        let r = &mut self.readers[reader];
        // Presentations whose card has been away for gone_ms have ended.
        r.open.retain(|p| t.saturating_sub(p.last_read) < s.gone_ms);
        // Forget taps that no longer make a duplicate.
        if r.last_tap.len() > r.prune_above.max(64) {
            r.last_tap
                .retain(|_, at| t.saturating_sub(*at) < s.repeat_ms);
            r.prune_above = 2 * r.last_tap.len();
        }
        while r
            .changes
            .front()
            .is_some_and(|c| t.saturating_sub(*c) >= s.flap_window_ms)
        {
            r.changes.pop_front();
        }

        let mut out = Outcome::default();
        match observation {
            Observation::Card(uid) => {
                r.field_occupied = true;
                r.changes.clear();
                r.failures = 0;
                if r.hold_steady {
                    r.hold_steady = false;
                    out.hold_steady = Some(false);
                }
                if let Some(p) = r.open.iter_mut().find(|p| p.uid == *uid) {
                    p.last_read = t;
                } else {
                    r.open.push(Presentation {
                        uid: *uid,
                        last_read: t,
                    });
                    let recent = r
                        .last_tap
                        .get(uid)
                        .is_some_and(|at| t.saturating_sub(*at) < s.repeat_ms);
                    if recent {
                        out.verdict = Some(Verdict::Duplicate(*uid));
                    } else {
                        r.last_tap.insert(*uid, t);
                        out.verdict = Some(Verdict::Tap(*uid));
                    }
                }
            }
            Observation::Partial => {
                if !r.field_occupied {
                    r.changes.push_back(t);
                }
                r.field_occupied = true;
                r.failures = r.failures.saturating_add(1);
            }
            Observation::NoCard => {
                if r.field_occupied {
                    r.changes.push_back(t);
                }
                r.field_occupied = false;
                r.failures = 0;
            }
            Observation::Fault(_) => {
                // Unknown field: keep open presentations alive through the fault.
                for p in &mut r.open {
                    p.last_read = t;
                }
                r.failures = r.failures.saturating_add(1);
            }
        }

        let troubled = r.changes.len() >= s.flap_limit as usize || r.failures >= s.flap_limit;
        if troubled && !r.hold_steady {
            r.hold_steady = true;
            out.hold_steady = Some(true);
        } else if r.hold_steady && r.changes.is_empty() && r.failures == 0 {
            r.hold_steady = false;
            out.hold_steady = Some(false);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::*;

    fn uid(s: &str) -> CardUid {
        CardUid::parse(s).unwrap()
    }

    const A: &str = "04A1B2C3D4E5F6";
    const B: &str = "04B0B1B2B3B4B5";

    /// Feeds `(t, reader, observation)` rows and returns `(t, reader, outcome)` for every row
    /// whose outcome is not empty.
    fn play(rows: &[(u64, usize, Observation)]) -> Vec<(u64, usize, Outcome)> {
        play_with(DebounceSettings::default(), rows)
    }

    fn play_with(
        settings: DebounceSettings,
        rows: &[(u64, usize, Observation)],
    ) -> Vec<(u64, usize, Outcome)> {
        let mut d = Debouncer::new(settings);
        rows.iter()
            .map(|(t, r, o)| (*t, *r, d.observe(*t, *r, o)))
            .filter(|(_, _, o)| *o != Outcome::default())
            .collect()
    }

    fn taps(out: &[(u64, usize, Outcome)]) -> Vec<(u64, usize, Verdict)> {
        out.iter()
            .filter_map(|(t, r, o)| o.verdict.map(|v| (*t, *r, v)))
            .collect()
    }

    fn hints(out: &[(u64, usize, Outcome)]) -> Vec<(u64, bool)> {
        out.iter()
            .filter_map(|(t, _, o)| o.hold_steady.map(|h| (*t, h)))
            .collect()
    }

    /// A card read every `step` ms from `from` to `to` (exclusive) on reader 0.
    fn reads(card: &str, from: u64, to: u64, step: u64) -> Vec<(u64, usize, Observation)> {
        (from..to)
            .step_by(step as usize)
            .map(|t| (t, 0, Card(uid(card))))
            .collect()
    }

    fn empty(from: u64, to: u64, step: u64) -> Vec<(u64, usize, Observation)> {
        (from..to)
            .step_by(step as usize)
            .map(|t| (t, 0, NoCard))
            .collect()
    }

    #[test]
    fn one_presentation_is_one_tap() {
        let mut rows = reads(A, 0, 800, 100);
        rows.extend(empty(800, 2000, 100));
        assert_eq!(taps(&play(&rows)), vec![(0, 0, Verdict::Tap(uid(A)))]);
    }

    #[test]
    fn a_wobble_within_gone_ms_is_the_same_presentation() {
        // Last read at 200, next at 600: away for 400 ms (< gone_ms 500).
        let mut rows = reads(A, 0, 300, 100);
        rows.extend(empty(300, 600, 100));
        rows.extend(reads(A, 600, 1000, 100));
        assert_eq!(taps(&play(&rows)), vec![(0, 0, Verdict::Tap(uid(A)))]);
    }

    #[test]
    fn a_card_left_on_the_reader_is_one_tap() {
        // Ten minutes on the reader, read every 100 ms.
        let rows = reads(A, 0, 600_000, 100);
        assert_eq!(taps(&play(&rows)), vec![(0, 0, Verdict::Tap(uid(A)))]);
    }

    #[test]
    fn same_card_within_repeat_ms_is_a_duplicate_and_after_it_a_new_tap() {
        let mut rows = reads(A, 0, 200, 100); // tap at 0
        rows.extend(empty(200, 1000, 100)); // presentation ends at 600
        rows.extend(reads(A, 1000, 1200, 100)); // 1000 < 5000: duplicate
        rows.extend(empty(1200, 5000, 100));
        rows.extend(reads(A, 5000, 5200, 100)); // 5000 - 0 >= repeat_ms: new tap
        assert_eq!(
            taps(&play(&rows)),
            vec![
                (0, 0, Verdict::Tap(uid(A))),
                (1000, 0, Verdict::Duplicate(uid(A))),
                (5000, 0, Verdict::Tap(uid(A))),
            ]
        );
    }

    #[test]
    fn a_duplicate_left_lying_is_one_duplicate() {
        let mut rows = reads(A, 0, 100, 100);
        rows.extend(empty(100, 1000, 100));
        rows.extend(reads(A, 1000, 9000, 100));
        assert_eq!(
            taps(&play(&rows)),
            vec![
                (0, 0, Verdict::Tap(uid(A))),
                (1000, 0, Verdict::Duplicate(uid(A)))
            ]
        );
    }

    #[test]
    fn the_same_card_on_the_other_reader_is_a_new_tap() {
        let rows = vec![
            (0, 0, Card(uid(A))),
            (100, 1, Card(uid(A))),
            (200, 0, Card(uid(A))),
            (200, 1, Card(uid(A))),
        ];
        assert_eq!(
            taps(&play(&rows)),
            vec![(0, 0, Verdict::Tap(uid(A))), (100, 1, Verdict::Tap(uid(A)))]
        );
    }

    #[test]
    fn two_cards_alternating_on_one_reader_are_two_taps() {
        // A wallet with two cards: the reader reads one, then the other, alternately.
        let rows: Vec<_> = (0..40u64)
            .map(|i| (i * 100, 0, Card(uid(if i % 2 == 0 { A } else { B }))))
            .collect();
        assert_eq!(
            taps(&play(&rows)),
            vec![(0, 0, Verdict::Tap(uid(A))), (100, 0, Verdict::Tap(uid(B)))]
        );
    }

    #[test]
    fn two_cards_one_after_the_other_are_two_taps() {
        let mut rows = reads(A, 0, 300, 100);
        rows.extend(empty(300, 400, 100));
        rows.extend(reads(B, 400, 700, 100));
        assert_eq!(
            taps(&play(&rows)),
            vec![(0, 0, Verdict::Tap(uid(A))), (400, 0, Verdict::Tap(uid(B)))]
        );
    }

    #[test]
    fn waving_sets_hold_steady_and_a_good_read_clears_it() {
        // In the field, out, in, out ... without a complete read: 4 changes by t=300.
        let rows = vec![
            (0, 0, Partial),
            (100, 0, NoCard),
            (200, 0, Partial),
            (300, 0, NoCard),
            (400, 0, Partial),
            (500, 0, Card(uid(A))),
            (600, 0, Card(uid(A))),
        ];
        let out = play(&rows);
        assert_eq!(hints(&out), vec![(300, true), (500, false)]);
        assert_eq!(taps(&out), vec![(500, 0, Verdict::Tap(uid(A)))]);
    }

    #[test]
    fn slow_changes_outside_the_window_do_not_set_the_hint() {
        let rows: Vec<_> = (0..8u64)
            .map(|i| (i * 1000, 0, if i % 2 == 0 { Partial } else { NoCard }))
            .collect();
        assert_eq!(hints(&play(&rows)), vec![]);
    }

    #[test]
    fn repeated_read_failures_set_the_hint_and_a_quiet_field_clears_it() {
        let mut rows: Vec<_> = (0..5u64).map(|i| (i * 100, 0, Partial)).collect();
        rows.extend(empty(500, 3000, 100));
        let out = play(&rows);
        // 4th failure at 300 sets it; the field empties at 500 (one change) and the
        // change ages out of the 2000 ms window at 2500.
        assert_eq!(hints(&out), vec![(300, true), (2500, false)]);
        assert_eq!(taps(&out), vec![]);
    }

    #[test]
    fn a_reader_fault_keeps_a_lying_card_one_tap() {
        let mut rows = reads(A, 0, 500, 100);
        rows.extend(
            (500..3500)
                .step_by(100)
                .map(|t| (t, 0, Fault("timeout".into()))),
        );
        rows.extend(reads(A, 3500, 4000, 100));
        let out = play(&rows);
        assert_eq!(taps(&out), vec![(0, 0, Verdict::Tap(uid(A)))]);
        // A lock-up is "the reader is locking up": the hint comes on, then goes with a read.
        assert_eq!(hints(&out), vec![(800, true), (3500, false)]);
    }

    #[test]
    fn a_waved_card_with_an_occasional_read_is_one_tap() {
        // Partial reads with one complete read among them, all within gone_ms of each other.
        let rows = vec![
            (0, 0, Partial),
            (100, 0, NoCard),
            (200, 0, Card(uid(A))),
            (300, 0, NoCard),
            (400, 0, Partial),
            (500, 0, Card(uid(A))),
            (600, 0, NoCard),
        ];
        assert_eq!(taps(&play(&rows)), vec![(200, 0, Verdict::Tap(uid(A)))]);
    }

    #[test]
    fn settings_are_honoured() {
        let s = DebounceSettings {
            gone_ms: 100,
            repeat_ms: 1000,
            flap_limit: 2,
            flap_window_ms: 500,
        };
        let rows = vec![
            (0, 0, Card(uid(A))),
            (150, 0, Card(uid(A))), // gone for 150 >= 100: new presentation, duplicate
            (1000, 0, Card(uid(A))), // new presentation, 1000 >= repeat: tap
            (1200, 0, NoCard),
            (1300, 0, Partial), // 2 changes: hint
        ];
        let out = play_with(s, &rows);
        assert_eq!(
            taps(&out),
            vec![
                (0, 0, Verdict::Tap(uid(A))),
                (150, 0, Verdict::Duplicate(uid(A))),
                (1000, 0, Verdict::Tap(uid(A))),
            ]
        );
        assert_eq!(hints(&out), vec![(1300, true)]);
    }

    #[test]
    fn a_morning_rush_of_many_cards_keeps_every_duplicate_and_stays_bounded() {
        let mut d = Debouncer::new(DebounceSettings::default());
        let card = |i: u32| CardUid::from_bytes(&i.to_be_bytes()).unwrap();
        let mut t = 0;
        // 2000 workers, one card every 2 ms, each taken away before the next.
        for round in 0..3u64 {
            for i in 0..2000u32 {
                let o = d.observe(t, 0, &Card(card(i)));
                let expected = if round == 1 {
                    // Again within repeat_ms (4 s after the first tap): a duplicate.
                    Some(Verdict::Duplicate(card(i)))
                } else {
                    Some(Verdict::Tap(card(i)))
                };
                assert_eq!(o.verdict, expected, "round {round}, card {i}");
                d.observe(t + 1, 0, &NoCard);
                t += 2;
                if i == 1999 && round == 1 {
                    // A break longer than repeat_ms before the third round.
                    t += DebounceSettings::default().repeat_ms;
                }
            }
        }
        assert!(d.readers[0].last_tap.len() <= 2 * 2000 + 64);
    }

    #[test]
    fn memory_of_old_taps_is_bounded() {
        let mut d = Debouncer::new(DebounceSettings::default());
        for i in 0..10_000u64 {
            let card = CardUid::from_bytes(&(i as u32).to_be_bytes()).unwrap();
            d.observe(i * 1000, 0, &Card(card));
        }
        assert!(d.readers[0].last_tap.len() <= 70);
        assert!(d.readers[0].open.len() <= 1);
    }
}
