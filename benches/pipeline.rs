//! Benchmarks of the tap pipeline's pure parts and of the outbox, each beside a baseline
//! measured in the same run:
//!
//! - `debounce/*`: observations per second through the [`Debouncer`], against the "script"
//!   debouncer a site would otherwise run (a tap when the UID differs from the reader's
//!   last one or two seconds have passed), on the same stream of observations.
//! - `tap/*`: deciding a tap and encoding its event, against encoding alone.
//! - `outbox/*`: recording a tap durably (sled batch + fsync), one at a time and in bursts of
//!   100, against writing the same bytes to a plain file with one `fdatasync` per commit.
//!
//! Run: `cargo bench -p id06d --bench pipeline`.

mod common;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use id06_protocol::{CardStatus, CardUid, Decision, Event, UtcMillis};
use id06_readers::Observation;
use id06d::config::{DebounceSettings, WhenStale};
use id06d::lists::blocklist::Blocklist;
use id06d::storage::outbox::Outbox;
use id06d::storage::store::Store;
use id06d::tap::debounce::Debouncer;
use id06d::tap::decide::decide;
use std::collections::HashMap;
use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

/// A morning on four readers polled every 100 ms: cards presented for 300-1500 ms, some
/// waved (partial reads), gaps between workers. Deterministic.
fn observation_stream(n: usize) -> Vec<(u64, usize, Observation)> {
    let mut out = Vec::with_capacity(n);
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut t = [0u64; 4];
    let mut worker = 0u32;
    while out.len() < n {
        let r = (next() % 4) as usize;
        worker += 1;
        let uid = CardUid::from_bytes(&[
            0x04,
            0xA1,
            0,
            0,
            (worker >> 16) as u8,
            (worker >> 8) as u8,
            worker as u8,
        ])
        .unwrap();
        let waved = next() % 10 == 0;
        if waved {
            for i in 0..6 {
                out.push((
                    t[r],
                    r,
                    if i % 2 == 0 {
                        Observation::Partial
                    } else {
                        Observation::NoCard
                    },
                ));
                t[r] += 100;
            }
        }
        for _ in 0..(3 + next() % 12) {
            out.push((t[r], r, Observation::Card(uid)));
            t[r] += 100;
        }
        for _ in 0..(2 + next() % 10) {
            out.push((t[r], r, Observation::NoCard));
            t[r] += 100;
        }
    }
    out.truncate(n);
    // Interleave readers by time, as the pipeline sees them.
    out.sort_by_key(|(t, r, _)| (*t, *r));
    out
}

/// The script approach: per reader, remember the last UID and when it was tapped.
struct ScriptDebouncer {
    last: HashMap<usize, (String, u64)>,
}

impl ScriptDebouncer {
    fn observe(&mut self, t: u64, reader: usize, o: &Observation) -> bool {
        let Observation::Card(uid) = o else {
            return false;
        };
        let uid = uid.to_string();
        match self.last.get(&reader) {
            Some((last, at)) if *last == uid && t - at < 2000 => false,
            _ => {
                self.last.insert(reader, (uid, t));
                true
            }
        }
    }
}

fn debounce(c: &mut Criterion) {
    let stream = observation_stream(100_000);
    let mut g = c.benchmark_group("debounce");
    g.throughput(Throughput::Elements(stream.len() as u64));
    g.bench_function("debouncer", |b| {
        b.iter(|| {
            let mut d = Debouncer::new(DebounceSettings::default());
            let mut taps = 0u64;
            for (t, r, o) in &stream {
                taps += d.observe(*t, *r, o).verdict.is_some() as u64;
            }
            black_box(taps)
        })
    });
    g.bench_function("baseline_script_debouncer", |b| {
        b.iter(|| {
            let mut d = ScriptDebouncer {
                last: HashMap::new(),
            };
            let mut taps = 0u64;
            for (t, r, o) in &stream {
                taps += d.observe(*t, *r, o) as u64;
            }
            black_box(taps)
        })
    });
    g.finish();
}

fn sample_event(uid: CardUid, status: CardStatus) -> Event {
    let ruling = decide(
        status.is_listed().then_some(status),
        false,
        WhenStale::Allow,
    );
    Event {
        card_status: ruling.card_status,
        decision: ruling.decision,
        reason: ruling.reason,
        ..common::granted_event(uid, UtcMillis(1_795_000_000_000))
    }
}

fn tap(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let bl = Blocklist::open(&db, dir.path()).unwrap();
    let listed: Vec<(CardUid, CardStatus)> = (0..10_000u32)
        .map(|i| {
            (
                CardUid::from_bytes(&[0x04, 0xB1, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8])
                    .unwrap(),
                CardStatus::Blocked,
            )
        })
        .collect();
    bl.replace(&listed, 1, UtcMillis::now(), |_| {}).unwrap();
    let uid = CardUid::parse("04B10000000123").unwrap();
    let prepared = sample_event(uid, CardStatus::Blocked);
    let mut g = c.benchmark_group("tap");
    g.bench_function("decide_and_encode", |b| {
        b.iter(|| {
            let index = bl.index();
            let now = UtcMillis(1_795_000_000_000);
            let stale = index.is_stale(now, 48);
            let ruling = decide(index.lookup(black_box(&uid)), stale, WhenStale::Allow);
            let mut e = prepared.clone();
            e.card_status = ruling.card_status;
            e.decision = ruling.decision;
            e.reason = ruling.reason;
            e.seq = 42;
            e.event_id = Event::event_id_for(&e.site_id, &e.terminal_id, &e.stream, 42);
            black_box(e.to_json())
        })
    });
    g.bench_function("baseline_encode_only", |b| {
        b.iter(|| black_box(black_box(&prepared).to_json()))
    });
    g.finish();
    assert_eq!(prepared.decision, Decision::Denied);
}

fn outbox(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data"), "bench").unwrap();
    let ob = Outbox::open(&store).unwrap();
    let uid = CardUid::parse("04A1B2C3D4E5F6").unwrap();
    let event = sample_event(uid, CardStatus::Unlisted);
    let bytes = event.to_json();
    let raw_path = dir.path().join("raw.log");
    let mut raw = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&raw_path)
        .unwrap();
    let mut g = c.benchmark_group("outbox");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(5));
    for burst in [1usize, 100] {
        g.throughput(Throughput::Elements(burst as u64));
        g.bench_function(format!("commit_{burst}"), |b| {
            b.iter_batched(
                || vec![event.clone(); burst],
                |events| black_box(ob.commit(events, &[]).unwrap()),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("baseline_raw_fsync_{burst}"), |b| {
            b.iter(|| {
                for _ in 0..burst {
                    raw.write_all(&bytes).unwrap();
                }
                raw.sync_data().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, debounce, tap, outbox);
criterion_main!(benches);
