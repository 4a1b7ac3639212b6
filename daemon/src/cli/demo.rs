//! `id06d demo`: a simulated morning rush through the real pipeline, on this machine.
//!
//! Two simulated readers (an `in` reader at the entry, an `out` reader at the exit) play a
//! rush with every case the gateway handles: normal taps, a card left on the reader, a
//! wobbling card, a waved card, a duplicate tap, blocked, terminated, suspended and
//! never-activated cards, and an exit reader that locks up. Halfway through, the broker
//! goes down for a few seconds; taps go on and their events wait in the outbox. A private
//! mosquitto is the broker, and a ledger-side subscriber prints what the ledger receives.

use crate::config::Config;
use crate::lists::blocklist::Blocklist;
use crate::mqtt::broker::LocalBroker;
use crate::run::{run, RunOptions};
use crate::shared::Counters;
use crate::storage::store::Store;
use id06_protocol::{CardStatus, CardUid, DenyReason, Event, ReaderStatus, Topics, UtcMillis};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const ENTRY: &str = "\
# The entry reader (direction in).
at 0     present 04A10000000001   # Anna: one tap
at 600   absent
at 1200  present 04A10000000002   # Bo
at 1700  absent
at 2400  present 04B10000000001   # a blocked card
at 2900  absent
at 3500  present 04A10000000003   # Cecilia leaves her card on the reader for 2.5 s: one tap
at 6000  absent
at 6600  present 04A10000000004   # David's card wobbles (away 300 ms): one tap
at 6900  absent
at 7200  present 04A10000000004
at 7700  absent
at 9000  partial                    # Erik waves his card past the reader ...
at 9100  absent
at 9200  partial
at 9300  absent
at 9400  partial
at 9500  absent
at 9800  present 04A10000000005   # ... then holds it still: one tap
at 10300 absent
at 11000 present 04B10000000002   # a terminated card
at 11500 absent
at 13000 end
";

const EXIT: &str = "\
# The exit reader (direction out).
at 500   present 04B10000000003   # a card suspended for an unpaid fee
at 1000  absent
at 2000  present 04A10000000006   # Fatima checks out
at 2500  absent
at 3200  present 04A10000000006   # ... and taps again at once: a duplicate, suppressed
at 3600  absent
at 4300  present 04B10000000004   # produced but never activated
at 4800  absent
at 6000  present 04A10000000001   # Anna checks out (the broker is down right now)
at 6500  absent
at 10000 fault                    # the reader locks up ...
at 11500 recover                  # ... and its driver brings it back
at 12000 present 04A10000000002   # Bo checks out
at 12500 absent
at 13000 end
";

const BLOCKLIST: &[(&str, CardStatus)] = &[
    ("04B10000000001", CardStatus::Blocked),
    ("04B10000000002", CardStatus::Terminated),
    ("04B10000000003", CardStatus::Suspended),
    ("04B10000000004", CardStatus::Produced),
];

/// The broker is down between these times (ms from the start of the rush).
const OUTAGE: (u64, u64) = (4600, 7000);

#[derive(Default)]
struct Ledger {
    /// Events by seq, first arrival.
    events: BTreeMap<u64, Event>,
    /// Arrivals of an event_id seen before.
    redeliveries: u64,
    /// Payloads that were not valid events.
    malformed: u64,
}

fn say(line: &str) {
    println!("{line}");
}

/// Runs the demo; returns a one-line error for the CLI.
pub async fn run_demo() -> Result<(), String> {
    let work = tempfile::Builder::new()
        .prefix("id06d-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let dir = work.path().to_path_buf();
    say("id06d demo — a simulated morning rush through the real pipeline");
    say("");

    let broker_dir = dir.join("broker");
    let mut broker = tokio::task::spawn_blocking(move || LocalBroker::start(&broker_dir, ""))
        .await
        .map_err(|e| e.to_string())??;
    say(&format!(
        "broker   mosquitto listening on {} (private, loopback only)",
        broker.url()
    ));

    std::fs::write(dir.join("entry.txt"), ENTRY).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("exit.txt"), EXIT).map_err(|e| e.to_string())?;
    let config_text = format!(
        "site_id = \"SE-DEMO\"\nterminal_id = \"gate-demo\"\ndata_dir = \"data\"\n\n[mqtt]\nurl = \"{}\"\n\n[[reader]]\nname = \"entry\"\nkind = \"simulated\"\nscript = \"entry.txt\"\npoll_ms = 100\ndirection = \"in\"\n\n[[reader]]\nname = \"exit\"\nkind = \"simulated\"\nscript = \"exit.txt\"\npoll_ms = 100\ndirection = \"out\"\n",
        broker.url()
    );
    let config_path = dir.join("id06d.toml");
    std::fs::write(&config_path, &config_text).map_err(|e| e.to_string())?;
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;

    // The list the site's backend would have sent: one card of each denied status.
    {
        let store =
            Store::open(&config.data_dir, &config.terminal_id).map_err(|e| e.to_string())?;
        let bl = Blocklist::open(&store.db, &store.dir).map_err(|e| e.to_string())?;
        let entries: Vec<(CardUid, CardStatus)> = BLOCKLIST
            .iter()
            .filter_map(|(u, s)| CardUid::parse(u).ok().map(|u| (u, *s)))
            .collect();
        bl.replace(&entries, 1207, UtcMillis::now(), |_| {})
            .map_err(|e| e.to_string())?;
        say(&format!(
            "list     blocklist version 1207 with {} cards (blocked, terminated, suspended, never activated)",
            entries.len()
        ));
    }

    let topics = Topics::new(
        &config.mqtt.topic_prefix,
        &config.site_id,
        &config.terminal_id,
    );
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let ledger_stop = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let ledger_task = tokio::spawn(ledger_subscriber(
        broker.port,
        topics.clone(),
        ledger.clone(),
        ready.clone(),
        ledger_stop.clone(),
    ));
    // Wait until the ledger is subscribed, so it sees everything from the first tap.
    let ready_deadline = Instant::now() + Duration::from_secs(10);
    while !ready.load(Ordering::Acquire) {
        if Instant::now() > ready_deadline {
            return Err("the ledger subscriber could not subscribe to the broker".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    say("ledger   subscribed to the gateway's events");
    say("");

    let shutdown = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(run(
        config.clone(),
        RunOptions {
            drain_timeout: Duration::from_secs(5),
            injector: false,
        },
        shutdown.clone(),
        move |running| {
            let _ = started_tx.send((running.shared.clone(), running.outbox.clone()));
        },
    ));
    let (shared, outbox) = started_rx
        .await
        .map_err(|_| "the daemon did not start".to_string())?;
    let start = Instant::now();

    // The outage, on the rush's clock.
    let mut down = false;
    let mut up_again = false;
    let deadline = start + Duration::from_secs(60);
    loop {
        let t = start.elapsed().as_millis() as u64;
        if !down && t >= OUTAGE.0 {
            down = true;
            broker = tokio::task::spawn_blocking(move || {
                broker.stop();
                broker
            })
            .await
            .map_err(|e| e.to_string())?;
            say(
                "broker   ✗ DOWN (simulated outage): taps go on, events wait in the durable outbox",
            );
        }
        if down && !up_again && t >= OUTAGE.1 {
            up_again = true;
            let depth = outbox.depth();
            broker = tokio::task::spawn_blocking(move || {
                let r = broker.restart();
                (broker, r)
            })
            .await
            .map(|(b, r)| r.map(|_| b))
            .map_err(|e| e.to_string())??;
            say(&format!(
                "broker   ✓ back: {depth} events waiting in the outbox are delivered, in order"
            ));
        }
        let c = &shared.counters;
        let finished = Counters::get(&c.readers_finished) >= 2;
        let taps = Counters::get(&c.taps);
        let received = ledger.lock().map(|l| l.events.len() as u64).unwrap_or(0);
        if finished && up_again && outbox.depth() == 0 && received >= taps {
            break;
        }
        if Instant::now() > deadline {
            say("demo     gave up waiting for delivery after 60 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    shutdown.cancel();
    daemon
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    ledger_stop.cancel();
    let _ = ledger_task.await;

    // Reader states as the terminal would show them.
    let readers: Vec<(String, ReaderStatus)> = shared.reader_states();
    let c = &shared.counters;
    let l = ledger
        .lock()
        .map_err(|_| "ledger state poisoned".to_string())?;
    let seqs: Vec<u64> = l.events.keys().copied().collect();
    let in_order_no_gap = seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1);
    say("");
    say("summary");
    say(&format!(
        "  taps recorded          {}",
        Counters::get(&c.taps)
    ));
    say(&format!(
        "  duplicates suppressed  {}",
        Counters::get(&c.duplicates)
    ));
    say(&format!(
        "  granted                {}",
        Counters::get(&c.granted)
    ));
    let denied: u64 = DenyReason::ALL
        .iter()
        .map(|r| Counters::get(c.denied_for(*r)))
        .sum();
    let by_reason: Vec<String> = DenyReason::ALL
        .iter()
        .filter(|r| Counters::get(c.denied_for(**r)) > 0)
        .map(|r| format!("{} {}", Counters::get(c.denied_for(*r)), r.as_str()))
        .collect();
    say(&format!(
        "  denied                 {denied} ({})",
        by_reason.join(", ")
    ));
    say(&format!(
        "  delivered to ledger    {} events, seq 1..{} {}, {} redelivered (same event_id)",
        l.events.len(),
        seqs.last().copied().unwrap_or(0),
        if in_order_no_gap {
            "without a gap"
        } else {
            "WITH GAPS"
        },
        l.redeliveries
    ));
    say(&format!(
        "  decisions published    {} ({} dropped while the broker was down)",
        Counters::get(&c.decisions_published),
        Counters::get(&c.decisions_dropped)
    ));
    for (name, s) in readers {
        say(&format!(
            "  reader {name:<6}          {:?}, {} recoveries{}",
            s.state,
            s.recoveries,
            s.last_error
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        ));
    }
    if l.malformed > 0 {
        say(&format!("  malformed payloads     {}", l.malformed));
    }
    drop(l);
    broker.stop();
    if !in_order_no_gap || Counters::get(&c.taps) == 0 {
        return Err("the ledger did not receive every event".into());
    }
    Ok(())
}

/// The ledger vendor's side: a persistent subscriber that prints what arrives.
async fn ledger_subscriber(
    port: u16,
    topics: Topics,
    ledger: Arc<Mutex<Ledger>>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut o = MqttOptions::new("demo-ledger", "127.0.0.1", port);
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let reader_topic = format!("{}/+", topics.reader("x").trim_end_matches("/x"));
    loop {
        let polled = tokio::select! {
            _ = stop.cancelled() => return,
            p = eventloop.poll() => p,
        };
        match polled {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_subscribe(topics.event(), QoS::AtLeastOnce);
                let _ = client.try_subscribe(reader_topic.clone(), QoS::AtLeastOnce);
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                ready.store(true, Ordering::Release);
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                if p.topic == topics.event() {
                    let Ok(mut l) = ledger.lock() else { return };
                    match Event::from_json(&p.payload) {
                        Ok(e) => {
                            let seq = e.seq;
                            if let std::collections::btree_map::Entry::Vacant(slot) =
                                l.events.entry(seq)
                            {
                                // The event_id is site:terminal:stream:seq; the stream is
                                // shortened here to keep the line readable.
                                let stream = e.stream.to_string();
                                say(&format!(
                                    "ledger   ← stream {}… seq {:<3} {:<3} {:<5} {}  {}",
                                    &stream[..8],
                                    e.seq,
                                    e.direction.as_str(),
                                    e.reader,
                                    e.card_uid,
                                    match e.reason {
                                        None => "granted".to_string(),
                                        Some(r) => format!("DENIED ({r})"),
                                    }
                                ));
                                slot.insert(e);
                            } else {
                                l.redeliveries += 1;
                            }
                        }
                        Err(_) => l.malformed += 1,
                    }
                } else if let Ok(s) = serde_json::from_slice::<ReaderStatus>(&p.payload) {
                    let name = p.topic.rsplit('/').next().unwrap_or("?");
                    let hint = if s.hint.is_some() {
                        " — shows \"hold the card still\""
                    } else {
                        ""
                    };
                    let line =
                        format!("terminal reader {name}: {:?}{hint}", s.state).to_lowercase();
                    if shown.insert(name.to_string(), line.clone()).as_ref() != Some(&line) {
                        say(&line);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => {
                // The broker is away (the outage): try again shortly.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        }
    }
}
