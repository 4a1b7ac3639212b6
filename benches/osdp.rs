//! Feedback at an OSDP reader (#16): a card presented at a reader (libosdp's peripheral
//! device on a pty, secure channel on) until
//!
//! - its decision is on `P/decision` at a subscriber (published the moment the tap is
//!   durable: the durability point plus one MQTT hop), and
//! - the reader has received the LED command of its feedback (on the wire, through the
//!   OSDP poll cycle at 115200 baud),
//!
//! for `ID06D_OSDP_CARDS` cards (default 200), and feedback minus decision per card.
//! Goal: feedback within 1 ms of durability at the median. The durability point itself is
//! the daemon's own trace line (`id06d::durable`, logged when the outbox commit returns,
//! before the feedback is queued), its wall-clock time set beside the bench's.
//!
//! The daemon is the binary as it ships (built into `target/shipped` by the bench, or
//! `ID06D_BENCH_BIN`).
//! Run: `cargo bench -p id06d --bench osdp`.

mod common;

use id06_readers::osdp::emulator::Reader;
use id06_readers::osdp::libosdp::OsdpCommand;
use id06d::mqtt::broker::LocalBroker;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: [u8; 16] = *b"0123456789:;<=>?";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return format!("{name}: no samples");
    }
    format!(
        "{name}: median {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} cards)",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v[v.len() - 1],
        v.len()
    )
}

fn main() {
    let cards: usize = std::env::var("ID06D_OSDP_CARDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let binary = match common::shipped_binary() {
        Ok(b) => b,
        Err(e) => {
            println!("not measured: {e}");
            return;
        }
    };
    let work = tempfile::tempdir().expect("a scratch directory");
    let broker = LocalBroker::start(&work.path().join("broker"), "").expect("mosquitto");
    let reader = Reader::start(0, Some(KEY)).expect("an OSDP reader");
    std::fs::write(
        work.path().join("gate.scbk"),
        "303132333435363738393a3b3c3d3e3f\n",
    )
    .expect("the key file");
    let cfg = work.path().join("id06d.toml");
    std::fs::write(
        &cfg,
        format!(
            "site_id = \"SE-BENCH\"\nterminal_id = \"gate-bench\"\ndata_dir = \"data\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\ntopic_prefix = \"bench\"\n[[reader]]\nname = \"gate\"\nkind = \"osdp\"\npath = \"{}\"\nbaud = 115200\nscbk_file = \"gate.scbk\"\ndirection = \"in\"\n",
            broker.port,
            reader.path().display()
        ),
    )
    .expect("the configuration");
    let decided: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut o = MqttOptions::new("osdp-bench-sub", "127.0.0.1", broker.port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = Client::new(o, 1024);
    client
        .subscribe("bench/SE-BENCH/gate-bench/decision", QoS::AtMostOnce)
        .expect("subscribe");
    {
        let decided = decided.clone();
        std::thread::spawn(move || {
            for n in connection.iter() {
                match n {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = Instant::now();
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                            if let Some(uid) = v["card_uid"].as_str() {
                                decided
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(uid.to_string(), at);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
    }
    let mut child = std::process::Command::new(&binary)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn,id06d::durable=trace")
        .stderr(std::fs::File::create(work.path().join("id06d.log")).expect("a log"))
        .spawn()
        .expect("start id06d");
    // Online: the reader has been asked for something (its capabilities, then polls).
    let started = Instant::now();
    while reader.received().is_empty() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (mut to_decision, mut to_feedback, mut after_decision) =
        (Vec::new(), Vec::new(), Vec::new());
    // Per card: when it was presented and when its LED command arrived, as wall-clock
    // nanoseconds (to set beside the daemon's log).
    let mut wall: Vec<(String, i128, i128)> = Vec::new();
    let (epoch_instant, epoch_wall) = (Instant::now(), jiff::Timestamp::now());
    let wall_ns = |at: Instant| {
        epoch_wall.as_nanosecond()
            + i128::try_from(at.saturating_duration_since(epoch_instant).as_nanos()).unwrap_or(0)
    };
    for i in 0..cards {
        let uid = [0x04, 0xF0, 0x5D, 0, 0, (i >> 8) as u8, i as u8];
        let text: String = uid.iter().map(|b| format!("{b:02X}")).collect();
        let before = reader.received().len();
        let presented = Instant::now();
        reader.present(&uid);
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut decision, mut feedback) = (None, None);
        while Instant::now() < deadline && (decision.is_none() || feedback.is_none()) {
            if decision.is_none() {
                decision = decided
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&text)
                    .copied();
            }
            if feedback.is_none() {
                feedback = reader
                    .received()
                    .into_iter()
                    .skip(before)
                    .find(|r| matches!(r.command, OsdpCommand::Led(_)))
                    .map(|r| r.at);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if let (Some(d), Some(f)) = (decision, feedback) {
            to_decision.push(d.duration_since(presented).as_secs_f64() * 1000.0);
            to_feedback.push(f.duration_since(presented).as_secs_f64() * 1000.0);
            after_decision.push(
                (f.duration_since(presented).as_secs_f64()
                    - d.duration_since(presented).as_secs_f64())
                    * 1000.0,
            );
            wall.push((text.clone(), wall_ns(presented), wall_ns(f)));
        }
        // Past the debouncer's repeat window for nothing (distinct cards), and the LED's
        // 2 s: the next card starts on a quiet line.
        std::thread::sleep(Duration::from_millis(150));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    // The daemon's durability points: "<timestamp> TRACE durable card=…" (no targets).
    let log = std::fs::read_to_string(work.path().join("id06d.log")).unwrap_or_default();
    let durable: HashMap<String, i128> = log
        .lines()
        .filter(|l| l.contains(" TRACE ") && l.contains(" durable card="))
        .filter_map(|l| {
            let at: jiff::Timestamp = l.split_whitespace().next()?.parse().ok()?;
            let card = l.split("card=").nth(1)?.split_whitespace().next()?;
            Some((card.to_string(), at.as_nanosecond()))
        })
        .collect();
    let (mut to_durable, mut after_durable) = (Vec::new(), Vec::new());
    for (card, presented, led) in &wall {
        if let Some(d) = durable.get(card) {
            to_durable.push((d - presented) as f64 / 1e6);
            after_durable.push((led - d) as f64 / 1e6);
        }
    }
    println!("\n--- measured in this run ---");
    println!(
        "{}",
        summary(
            "card presented -> tap durable (the daemon's trace)",
            to_durable
        )
    );
    println!(
        "{}",
        summary(
            "card presented -> decision on P/decision (durable + one MQTT hop)",
            to_decision
        )
    );
    println!(
        "{}",
        summary("card presented -> LED command at the reader", to_feedback)
    );
    println!(
        "{}",
        summary(
            "LED command at the reader minus decision at the subscriber",
            after_decision
        )
    );
    println!(
        "{}",
        summary(
            "LED command at the reader minus tap durable (goal: median <= 1 ms)",
            after_durable
        )
    );
}
