//! Retention pruning beside live taps (#17 goal 1: nothing slow on the tap's path).
//!
//! A data directory holds delivered events older than `keep_days` (an operator lowered
//! `keep_days`, or a busy site's first prune after an upgrade). The daemon prunes them on a
//! blocking thread at start and hourly while the tap pipeline goes on recording. Here the
//! same happens in one process: taps are recorded every 5 ms the way the pipeline records
//! them (the log record synced, then applied to the database, then acknowledged as the
//! MQTT task does), once while `prune_delivered` runs and once with no prune, in the same
//! run on equal stores. Reported per part: time to durable (what delays the event), time
//! to apply and acknowledge (what delays the next tap), median / p99 / max, and the ratio
//! of the pruning part's max to the quiet part's.
//!
//! Run: `cargo bench -p id06d --bench retention`; `ID06D_PRUNE_EVENTS` (default 100 000)
//! old events, `ID06D_PRUNE_ROUNDS` (default 3) alternating rounds.

mod common;

use common::{env_or, ms};
use id06_protocol::{
    CardStatus, CardUid, Decision, Direction, Event, EventSchema, StreamId, UtcMillis,
};
use id06d::storage::outbox::Outbox;
use id06d::storage::store::Store;
use std::time::{Duration, Instant};

const DAY_MS: i64 = 24 * 3600 * 1000;

fn event(n: u64, at: i64) -> Event {
    Event {
        schema: EventSchema,
        event_id: String::new(),
        stream: StreamId::from_random([7; 16]),
        seq: 0,
        decision_id: String::new(),
        site_id: "SE-0001".into(),
        terminal_id: "gate-north-1".into(),
        reader: "entry".into(),
        direction: Direction::In,
        card_uid: CardUid::parse(&format!("04{:012X}", n)).unwrap(),
        card_status: CardStatus::Unlisted,
        decision: Decision::Granted,
        reason: None,
        blocklist_version: 1207,
        blocklist_stale: false,
        occurred_at: UtcMillis(at),
        clock_synced: true,
    }
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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let old: u64 = env_or("ID06D_PRUNE_EVENTS", 100_000);
    let rounds: usize = env_or("ID06D_PRUNE_ROUNDS", 3);
    let mut report = Vec::new();
    for round in 1..=rounds {
        for pruning in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            eprintln!("round {round}: filling a store with {old} old delivered events");
            let (_store, outbox) = filled(dir.path(), old);
            let _checkpoints = outbox.start_checkpoints().unwrap();
            let (mut taps, prune) = if pruning {
                let pruner = outbox.clone();
                let cutoff = UtcMillis(UtcMillis::now().as_millis() - 14 * DAY_MS);
                let started = Instant::now();
                let thread = std::thread::spawn(move || {
                    let got = pruner.prune_delivered(cutoff).unwrap();
                    (got, started.elapsed())
                });
                let taps = record_taps(&outbox, 20, || thread.is_finished());
                let ((removed, _), took) = thread.join().unwrap();
                assert_eq!(removed, old, "every old event pruned");
                (taps, Some(took))
            } else {
                (record_taps(&outbox, 400, || true), None)
            };
            let part = match prune {
                Some(took) => format!("round {round}, pruning {old} events ({:.0} ms)", ms(took)),
                None => format!("round {round}, no prune"),
            };
            let (dmax, d) = summary("durable", &mut taps.durable);
            let (amax, a) = summary("applied + acked", &mut taps.applied);
            report.push((pruning, dmax, amax, format!("{part}\n  {d}\n  {a}")));
        }
    }
    println!("\n--- measured in this run ---");
    for (_, _, _, line) in &report {
        println!("{line}");
    }
    let worst = |pruning: bool, pick: fn(&(bool, f64, f64, String)) -> f64| {
        report
            .iter()
            .filter(|r| r.0 == pruning)
            .map(pick)
            .fold(0.0, f64::max)
    };
    println!(
        "worst tap while pruning / without: durable {:.2}x, applied + acked {:.2}x",
        worst(true, |r| r.1) / worst(false, |r| r.1),
        worst(true, |r| r.2) / worst(false, |r| r.2),
    );
}
