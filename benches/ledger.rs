//! The reference ledger consumer's ingest rate: events received, stored in SQLite and
//! confirmed per second, with one and with two instances sharing the load (and one
//! database), against `mosquitto_sub` receiving the same stream from the same private
//! mosquitto in the same run (the broker's own delivery rate, nothing stored).
//!
//! Each round publishes `ID06D_LEDGER_EVENTS` (default 20 000) valid events of ten
//! terminals, QoS 1, as fast as the broker takes them, and times from the first publish
//! until the last one is in the database (or `mosquitto_sub` has printed it).
//!
//! Run: `cargo bench -p id06d --bench ledger`.

use id06_ledger::consumer::{run as consume, Settings};
use id06_ledger::Store;
use id06_protocol::{
    CardStatus, CardUid, Decision, Direction, Event, EventSchema, StreamId, UtcMillis,
};
use id06d::mqtt::broker::LocalBroker;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use std::path::Path;
use std::time::{Duration, Instant};

fn events(n: u64) -> Vec<(String, Vec<u8>)> {
    let streams: Vec<StreamId> = (0..10u8)
        .map(|i| StreamId::from_random([i + 1; 16]))
        .collect();
    (0..n)
        .map(|i| {
            let t = (i % 10) as usize;
            let seq = i / 10 + 1;
            let terminal = format!("gate-{t}");
            let id = Event::event_id_for("SE-BENCH", &terminal, &streams[t], seq);
            let b = i.to_be_bytes();
            let e = Event {
                schema: EventSchema,
                event_id: id.clone(),
                stream: streams[t],
                seq,
                decision_id: id,
                site_id: "SE-BENCH".into(),
                terminal_id: terminal.clone(),
                reader: "entry".into(),
                direction: Direction::In,
                card_uid: CardUid::from_bytes(&[4, 0xBE, b[3], b[4], b[5], b[6], b[7]]).unwrap(),
                card_status: CardStatus::Unlisted,
                decision: Decision::Granted,
                reason: None,
                blocklist_version: 1207,
                blocklist_stale: false,
                occurred_at: UtcMillis(1_795_000_000_000 + i as i64),
                clock_synced: true,
            };
            (format!("id06/v1/SE-BENCH/{terminal}/event"), e.to_json())
        })
        .collect()
}

/// Publishes everything with QoS 1 and waits for the broker's acknowledgements.
async fn publish(port: u16, messages: &[(String, Vec<u8>)]) {
    let mut o = MqttOptions::new(
        format!("bench-gateway-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    o.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    let feed = {
        let client = client.clone();
        let messages = messages.to_vec();
        tokio::spawn(async move {
            for (t, p) in messages {
                client.publish(t, QoS::AtLeastOnce, false, p).await.unwrap();
            }
        })
    };
    let mut acked = 0;
    while acked < messages.len() {
        if let Ok(MqttEvent::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
            acked += 1;
        }
    }
    feed.await.unwrap();
    let _ = client.disconnect().await;
}

/// One round with `instances` consumers on one database; returns events per second.
fn consumer_round(
    rt: &tokio::runtime::Runtime,
    port: u16,
    dir: &Path,
    instances: usize,
    n: u64,
    round: usize,
) -> f64 {
    let db = dir.join(format!("ledger-{instances}-{round}.db"));
    let mut stops = Vec::new();
    let mut threads = Vec::new();
    for i in 0..instances {
        let store = Store::open(&db).unwrap();
        let settings = Settings {
            host: "127.0.0.1".into(),
            port,
            login: None,
            client_id: format!("bench-ledger-{instances}-{round}-{i}"),
            group: format!("bench{instances}r{round}"),
            prefix: "id06/v1".into(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(consume(settings, store, async {
                let _ = rx.await;
            }));
        }));
    }
    // Subscribed when a probe event arrives in the database.
    let probe = events(1);
    let check = Store::open(&db).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while check.count().unwrap() < 1 {
        rt.block_on(publish(port, &probe));
        std::thread::sleep(Duration::from_millis(200));
        assert!(Instant::now() < deadline, "the consumers never subscribed");
    }
    let all: Vec<(String, Vec<u8>)> = events(n + 1).into_iter().skip(1).collect();
    let t = Instant::now();
    rt.block_on(publish(port, &all));
    while check.count().unwrap() < n + 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed();
    for s in stops {
        let _ = s.send(());
    }
    for t in threads {
        t.join().unwrap();
    }
    n as f64 / took.as_secs_f64()
}

/// The same stream into `mosquitto_sub`; returns events per second.
fn baseline_round(rt: &tokio::runtime::Runtime, port: u16, n: u64) -> f64 {
    let mut sub = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            "id06/v1/+/+/event",
            "-C",
            &(n + 1).to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto_sub (Debian: mosquitto-clients)");
    // mosquitto_sub has no ready signal: a probe until it has surely subscribed.
    std::thread::sleep(Duration::from_millis(500));
    rt.block_on(publish(port, &events(1)));
    let all: Vec<(String, Vec<u8>)> = events(n + 1).into_iter().skip(1).collect();
    let t = Instant::now();
    rt.block_on(publish(port, &all));
    let status = sub.wait().unwrap();
    assert!(status.success());
    n as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let n: u64 = std::env::var("ID06D_LEDGER_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let rounds = 3;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let broker = LocalBroker::start(&work.path().join("broker"), "").unwrap();
    let (mut one, mut two, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        raw.push(baseline_round(&rt, broker.port, n));
        one.push(consumer_round(&rt, broker.port, work.path(), 1, n, round));
        two.push(consumer_round(&rt, broker.port, work.path(), 2, n, round));
    }
    let (one, two, raw) = (median(one), median(two), median(raw));
    println!("ledger ingest, {n} events, median of {rounds} rounds:");
    println!("  mosquitto_sub (receive only)     {raw:>9.0} events/s");
    println!(
        "  id06-ledger, 1 instance          {one:>9.0} events/s  ({:.2}x of mosquitto_sub)",
        one / raw
    );
    println!("  id06-ledger, 2 instances, 1 db   {two:>9.0} events/s  ({:.2}x of mosquitto_sub, {:.2}x of one instance)", two / raw, two / one);
}
