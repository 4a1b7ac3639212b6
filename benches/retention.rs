//! Housekeeping beside live taps (#17 goal 1: nothing slow on the tap's path).
//!
//! The outbox and the blocklist share one sled database, and sled has one lock for the
//! whole process that its batches and transactions hold exclusively. Two kinds of
//! housekeeping run beside the tap pipeline:
//!
//! - `prune`: a data directory holds delivered events older than `keep_days` (an operator
//!   lowered `keep_days`, or a busy site's first prune after an upgrade); the daemon prunes
//!   them on a blocking thread at start and hourly.
//! - `update`: a blocklist update with many changes arrives on the list session.
//! - `compaction`: an update takes the changes past the threshold, and the list is written
//!   whole as a new base (its file, its saved index, the old generation's tree dropped).
//! - `site list`: a site's own list is imported whole (`id06d site-list import`).
//!
//! Here each happens in one process while taps are recorded every 5 ms the way the pipeline
//! records them (the log record synced, then applied to the database, then acknowledged as
//! the MQTT task does), and the same taps are recorded with nothing else going on (`quiet`),
//! in the same run on equal stores. Reported per part: time to durable (what delays the
//! event), time to apply and acknowledge (what delays the next tap), median / p99 / max,
//! and the ratio of each part's worst tap to the quiet part's.
//!
//! Run: `cargo bench -p id06d --bench retention`; `ID06D_PRUNE_EVENTS` (default 100 000)
//! old events, `ID06D_UPDATE_CHANGES` (default 50 000) cards in the update and in the site
//! list (written over one as large),
//! `ID06D_PRUNE_ROUNDS` (default 3) rounds.

mod common;

use common::{env_or, ms};
use id06_protocol::{
    BlocklistUpdate, CardStatus, CardUid, Event, SetEntry, UtcMillis, UPDATE_SCHEMA,
};
use id06d::lists::blocklist::{Blocklist, COMPACT_AFTER};
use id06d::lists::site_list::{SiteEntry, SiteList};
use id06d::storage::outbox::Outbox;
use id06d::storage::store::Store;
use std::time::{Duration, Instant};

const DAY_MS: i64 = 24 * 3600 * 1000;

fn event(n: u64, at: i64) -> Event {
    common::granted_event(
        CardUid::parse(&format!("04{n:012X}")).unwrap(),
        UtcMillis(at),
    )
}

/// An outbox in `dir` holding `old` delivered events dated 30 days ago.
fn filled(dir: &std::path::Path, old: u64) -> (Store, Outbox) {
    let store = Store::open(dir, "gate-north-1").unwrap();
    let outbox = Outbox::open(&store).unwrap();
    let at = UtcMillis::now().as_millis() - 30 * DAY_MS;
    let mut n = 0;
    while n < old {
        let k = (old - n).min(1000);
        let batch = (n..n + k).map(|i| event(i, at)).collect();
        let recorded = outbox.commit(batch, &[]).unwrap();
        let positions: Vec<u64> = recorded.iter().map(|(p, _)| *p).collect();
        outbox.ack_many(&positions).unwrap();
        n += k;
    }
    outbox.checkpoint().unwrap();
    (store, outbox)
}

/// An update from `version` setting `n` cards of their own (blocked).
fn update(version: u64, n: u64) -> BlocklistUpdate {
    BlocklistUpdate {
        schema: UPDATE_SCHEMA.into(),
        from_version: version,
        to_version: version + 1,
        set: (0..n)
            .map(|i| SetEntry {
                card_uid: CardUid::parse(&format!("04{:012X}", (version * n + i) * 7919)).unwrap(),
                status: CardStatus::Blocked,
            })
            .collect(),
        clear: Vec::new(),
        signature: None,
    }
}

struct Taps {
    durable: Vec<Duration>,
    applied: Vec<Duration>,
}

/// Records a tap every 5 ms until `done` says stop (at least `min` taps).
fn record_taps(outbox: &Outbox, min: usize, done: impl Fn() -> bool) -> Taps {
    let mut t = Taps {
        durable: Vec::new(),
        applied: Vec::new(),
    };
    let mut n = 1u64 << 40;
    while t.durable.len() < min || !done() {
        n += 1;
        let t0 = Instant::now();
        let committed = outbox
            .commit_durable(vec![event(n, UtcMillis::now().as_millis())], &[])
            .unwrap();
        let t1 = Instant::now();
        let recorded = committed.apply();
        outbox.ack_many(&[recorded[0].0]).unwrap();
        let t2 = Instant::now();
        t.durable.push(t1 - t0);
        t.applied.push(t2 - t1);
        std::thread::sleep(Duration::from_millis(5).saturating_sub(t0.elapsed()));
    }
    t
}

fn summary(name: &str, d: &mut [Duration]) -> (f64, String) {
    d.sort();
    let at = |p: f64| ms(d[((d.len() - 1) as f64 * p) as usize]);
    let max = ms(d[d.len() - 1]);
    (
        max,
        format!(
            "{name}: median {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} taps)",
            at(0.5),
            at(0.99),
            max,
            d.len()
        ),
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Prune,
    Update,
    Compaction,
    SiteList,
    Quiet,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let old: u64 = env_or("ID06D_PRUNE_EVENTS", 100_000);
    let changes: u64 = env_or("ID06D_UPDATE_CHANGES", 50_000);
    let rounds: usize = env_or("ID06D_PRUNE_ROUNDS", 3);
    let mut report = Vec::new();
    for round in 1..=rounds {
        for load in [
            Load::Prune,
            Load::Update,
            Load::Compaction,
            Load::SiteList,
            Load::Quiet,
        ] {
            let dir = tempfile::tempdir().unwrap();
            eprintln!("round {round}: filling a store with {old} old delivered events");
            let (store, outbox) = filled(dir.path(), old);
            let _checkpoints = outbox.start_checkpoints().unwrap();
            let started = Instant::now();
            let (mut taps, part) = match load {
                Load::Prune => {
                    let pruner = outbox.clone();
                    let cutoff = UtcMillis(UtcMillis::now().as_millis() - 14 * DAY_MS);
                    let thread = std::thread::spawn(move || pruner.prune_delivered(cutoff));
                    let taps = record_taps(&outbox, 20, || thread.is_finished());
                    let (removed, _) = thread.join().unwrap().unwrap();
                    assert_eq!(removed, old, "every old event pruned");
                    let took = ms(started.elapsed());
                    (taps, format!("pruning {old} events ({took:.0} ms)"))
                }
                Load::Update | Load::Compaction => {
                    let list = Blocklist::open(&store.db, dir.path()).unwrap();
                    let mut version = 0;
                    if load == Load::Compaction {
                        // Changes pile up to the threshold; the next update folds them and
                        // the list into a new base.
                        while (version + 1) * changes <= COMPACT_AFTER as u64 {
                            list.apply_update(&update(version, changes), UtcMillis::now())
                                .unwrap();
                            version += 1;
                        }
                    }
                    let update = update(version, changes);
                    let started = Instant::now();
                    let thread = std::thread::spawn(move || {
                        list.apply_update(&update, UtcMillis::now())
                            .map_err(|e| format!("{e:?}"))
                    });
                    let taps = record_taps(&outbox, 20, || thread.is_finished());
                    thread.join().unwrap().unwrap();
                    let took = ms(started.elapsed());
                    let what = if load == Load::Compaction {
                        format!(
                            "a blocklist update of {changes} cards that compacts {} changes ({took:.0} ms)",
                            (version + 1) * changes
                        )
                    } else {
                        format!("a blocklist update of {changes} cards ({took:.0} ms)")
                    };
                    (taps, what)
                }
                Load::SiteList => {
                    let list = SiteList::open(&store.db, dir.path()).unwrap();
                    let entries = |salt: u64| -> Vec<(CardUid, SiteEntry)> {
                        (0..changes)
                            .map(|i| {
                                let uid = format!("04{:012X}", i * 7919 + salt);
                                (CardUid::parse(&uid).unwrap(), SiteEntry::Allow)
                            })
                            .collect()
                    };
                    list.replace(&entries(1), 1, UtcMillis::now()).unwrap();
                    let next = entries(2);
                    let started = Instant::now();
                    let thread = std::thread::spawn(move || {
                        list.replace(&next, 2, UtcMillis::now())
                            .map_err(|e| e.to_string())
                    });
                    let taps = record_taps(&outbox, 20, || thread.is_finished());
                    thread.join().unwrap().unwrap();
                    let took = ms(started.elapsed());
                    (
                        taps,
                        format!("a site list of {changes} cards over another ({took:.0} ms)"),
                    )
                }
                Load::Quiet => (record_taps(&outbox, 400, || true), "quiet".to_string()),
            };
            let (dmax, d) = summary("durable", &mut taps.durable);
            let (amax, a) = summary("applied + acked", &mut taps.applied);
            report.push((
                load,
                dmax,
                amax,
                format!("round {round}, {part}\n  {d}\n  {a}"),
            ));
        }
    }
    println!("\n--- measured in this run ---");
    for (_, _, _, line) in &report {
        println!("{line}");
    }
    let worst = |load: Load, pick: fn(&(Load, f64, f64, String)) -> f64| {
        report
            .iter()
            .filter(|r| r.0 == load)
            .map(pick)
            .fold(0.0, f64::max)
    };
    for (load, name) in [
        (Load::Prune, "pruning"),
        (Load::Update, "an update"),
        (Load::Compaction, "a compaction"),
        (Load::SiteList, "a site list import"),
    ] {
        println!(
            "worst tap during {name} / quiet: durable {:.2}x, applied + acked {:.2}x",
            worst(load, |r| r.1) / worst(Load::Quiet, |r| r.1),
            worst(load, |r| r.2) / worst(Load::Quiet, |r| r.2),
        );
    }
}
