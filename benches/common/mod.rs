//! What the benches share: settings from the environment, the daemon binary as it ships,
//! and a subscriber that timestamps what arrives.
#![allow(dead_code)] // each bench uses its part

use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};

/// The environment variable `key` parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The daemon as it ships, for the benches that run it as a process: `ID06D_BENCH_BIN`,
/// or built here with `cargo build --release -p id06d --target-dir target/shipped`.
///
/// Not `target/release/id06d`: `cargo bench` builds that one again with the features the
/// dev-dependencies switch on in shared crates (Unicode tables in the log filter's regex,
/// tokio's test-util, the reader emulators), which is 0.4 MB larger resident than what a
/// gateway runs and would tilt every comparison with a build made by `cargo build`.
pub fn shipped_binary() -> Result<std::path::PathBuf, String> {
    if let Some(bin) = std::env::var_os("ID06D_BENCH_BIN") {
        return Ok(bin.into());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target/shipped");
    eprintln!("building the daemon as it ships: cargo build --release -p id06d --target-dir target/shipped");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "id06d", "--target-dir"])
        .arg(&target)
        .current_dir(&root)
        .status()
        .map_err(|e| format!("cannot run cargo to build the daemon: {e}"))?;
    if !status.success() {
        return Err(format!("building the daemon failed ({status})"));
    }
    Ok(target.join("release/id06d"))
}

/// A granted tap's event as the pipeline drafts it (the outbox gives it its stream and seq).
pub fn granted_event(
    card_uid: id06_protocol::CardUid,
    at: id06_protocol::UtcMillis,
) -> id06_protocol::Event {
    use id06_protocol::{CardStatus, Decision, Direction, Event, EventSchema, StreamId};
    Event {
        schema: EventSchema,
        event_id: String::new(),
        stream: StreamId::from_random([7; 16]),
        seq: 0,
        decision_id: String::new(),
        site_id: "SE-BENCH".into(),
        terminal_id: "gate-bench".into(),
        reader: "r0".into(),
        direction: Direction::In,
        card_uid,
        card_status: CardStatus::Unlisted,
        decision: Decision::Granted,
        reason: None,
        blocklist_version: 1207,
        blocklist_stale: false,
        occurred_at: at,
        clock_synced: true,
    }
}

/// Milliseconds, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Subscribes to `topic` on the broker at `port` (QoS 1) and sends what `map` makes of each
/// message, with its arrival time; `ready` once subscribed. A lost broker fails the run.
pub async fn subscriber<T>(
    port: u16,
    topic: String,
    map: fn(&[u8]) -> Option<T>,
    tx: tokio::sync::mpsc::UnboundedSender<(T, Instant)>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut o = MqttOptions::new(
        format!("bench-sub-{}-{n}", std::process::id()),
        "127.0.0.1",
        port,
    );
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut ev) = AsyncClient::new(o, 1024);
    client
        .subscribe(&topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut ready = Some(ready);
    loop {
        match ev.poll().await {
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                let at = Instant::now();
                if let Some(v) = map(&p.payload) {
                    if tx.send((v, at)).is_err() {
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => panic!("the subscriber lost the broker: {e}"),
        }
    }
}
