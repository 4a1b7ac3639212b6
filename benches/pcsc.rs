//! Card inserted → event durable, through a real pcscd with vpcd (the bench plays the card over
//! vpcd's TCP protocol), against baselines measured in the same run on the same stack:
//!
//! - `get_data_round_trip`: one bare GET DATA (`FF CA 00 00 00`) transmit to a connected card;
//! - `bare_client_insert_to_uid`: the least a client can do for a UID: block in
//!   `SCardGetStatusChange` until the card is there, connect, GET DATA (what a pyscard script
//!   does), timed from the card's insertion;
//! - `daemon_insert_to_durable`: the whole daemon in this process (PC/SC driver thread,
//!   debouncer, decision, sled commit + fsync), timed from the card's insertion until the
//!   tap is counted, which happens only after its event is durable.
//!
//! Most of an insertion's latency is pcscd's own polling of the reader driver (every
//! 400 ms for vpcd), which both insertion arms pay alike; the ratio of the two is what the
//! daemon adds.
//!
//! Needs pcscd and vsmartcard-vpcd (started here if pcscd is not running).
//! Run: `cargo bench -p id06d --bench pcsc`.

use criterion::Criterion;
use id06_readers::vpcd_card::{sandbox, wait_slot_empty, CardBehaviour, VirtualCard, SLOT_0};
use id06d::config::Config;
use id06d::mqtt::broker::LocalBroker;
use id06d::run::{run, RunOptions};
use id06d::shared::Counters;
use pcsc::{Context, Protocols, ReaderState, Scope, ShareMode, State};
use std::ffi::CString;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn summary(name: &str, samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let (median, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    println!(
        "{name}: median {median:?} p99 {p99:?} ({} samples)",
        samples.len()
    );
    (median, p99)
}

/// A 7-byte UID unique to `n` (so that no tap is a duplicate of an earlier one).
fn uid(n: u32) -> Vec<u8> {
    let b = n.to_be_bytes();
    vec![0x04, 0xB0, 0x00, b[0], b[1], b[2], b[3]]
}

fn insert(n: u32) -> VirtualCard {
    VirtualCard::insert(SLOT_0, CardBehaviour::uid(&uid(n))).expect("vpcd takes the card")
}

fn remove(card: VirtualCard) {
    card.remove();
    assert!(wait_slot_empty(SLOT_0), "pcscd sees the card go");
}

fn main() {
    let _pcsc = sandbox().expect("a pcscd of the benchmark's own");
    assert!(wait_slot_empty(SLOT_0));
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let reader = CString::new(SLOT_0.reader).expect("a reader name");
    let context = Context::establish(Scope::User).expect("a PC/SC context");
    let mut n = 0u32;
    let mut group = c.benchmark_group("pcsc");

    // ---- bare GET DATA ------------------------------------------------------------
    let mut get_data = Vec::new();
    {
        let card = insert(0);
        let connected = (|| loop {
            if let Ok(c) = context.connect(&reader, ShareMode::Shared, Protocols::ANY) {
                return c;
            }
            std::thread::sleep(Duration::from_millis(5));
        })();
        let mut buffer = [0u8; 64];
        group.bench_function("get_data_round_trip", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let r = connected
                        .transmit(&[0xFF, 0xCA, 0x00, 0x00, 0x00], &mut buffer)
                        .expect("GET DATA");
                    let d = t.elapsed();
                    assert_eq!(&r[r.len() - 2..], &[0x90, 0x00]);
                    get_data.push(d);
                    total += d;
                }
                total
            })
        });
        drop(connected);
        remove(card);
    }

    // ---- a bare client: wait, connect, GET DATA -----------------------------------
    let mut bare = Vec::new();
    group.bench_function("bare_client_insert_to_uid", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let mut states = [ReaderState::new(reader.clone(), State::UNAWARE)];
                context
                    .get_status_change(Duration::ZERO, &mut states)
                    .expect("reader state");
                states[0].sync_current_state();
                let t = Instant::now();
                let card = insert(n);
                while !states[0].event_state().contains(State::PRESENT) {
                    states[0].sync_current_state();
                    context
                        .get_status_change(Duration::from_secs(5), &mut states)
                        .expect("a state change");
                }
                let connected = context
                    .connect(&reader, ShareMode::Shared, Protocols::ANY)
                    .expect("connect");
                let mut buffer = [0u8; 64];
                let r = connected
                    .transmit(&[0xFF, 0xCA, 0x00, 0x00, 0x00], &mut buffer)
                    .expect("GET DATA");
                let d = t.elapsed();
                assert_eq!(&r[..r.len() - 2], uid(n).as_slice());
                bare.push(d);
                total += d;
                drop(connected);
                remove(card);
            }
            total
        })
    });

    // ---- the daemon ---------------------------------------------------------------
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let work = tempfile::tempdir().expect("a scratch directory");
    let broker = LocalBroker::start(&work.path().join("broker"), "").expect("mosquitto");
    let path = work.path().join("id06d.toml");
    std::fs::write(
        &path,
        format!(
            "site_id = \"SE-BENCH\"\nterminal_id = \"gate-bench\"\ndata_dir = \"data\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n[[reader]]\nname = \"turnstile\"\nkind = \"pcsc\"\nmatch = \"{}\"\ndirection = \"in\"\n",
            broker.port, SLOT_0.reader
        ),
    )
    .expect("write the configuration");
    let config = Config::load(&path).expect("the configuration");
    let shutdown = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let daemon = rt.spawn(run(
        config,
        RunOptions {
            drain_timeout: Duration::from_secs(2),
            injector: false,
        },
        shutdown.clone(),
        move |r| {
            let _ = tx.send(r.shared.clone());
        },
    ));
    let shared = rx.recv().expect("the daemon starts");
    let taps = || Counters::get(&shared.counters.taps);
    // The driver is ready once it has read a first card.
    let card = insert(1_000_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while taps() == 0 {
        assert!(Instant::now() < deadline, "the daemon reads no card");
        std::thread::sleep(Duration::from_millis(5));
    }
    remove(card);
    let mut ours = Vec::new();
    group.bench_function("daemon_insert_to_durable", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let before = taps();
                let t = Instant::now();
                let card = insert(n);
                while taps() == before {
                    std::thread::sleep(Duration::from_micros(200));
                }
                let d = t.elapsed();
                ours.push(d);
                total += d;
                remove(card);
            }
            total
        })
    });
    group.finish();
    shutdown.cancel();
    let _ = rt.block_on(daemon);

    println!();
    summary("bare GET DATA round trip", &mut get_data);
    let (bm, bp) = summary("bare client, insert -> UID", &mut bare);
    let (om, op) = summary("daemon, insert -> event durable", &mut ours);
    println!(
        "daemon / bare client: median {:.2}x, p99 {:.2}x; the daemon adds {:?} at the median",
        om.as_secs_f64() / bm.as_secs_f64(),
        op.as_secs_f64() / bp.as_secs_f64(),
        om.saturating_sub(bm)
    );
}
