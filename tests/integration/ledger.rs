//! Nothing lost between the broker and the ledger: confirmation and resending, replays,
//! access control on a real mosquitto, late decisions, and a fleet of gateways with the
//! reference consumer (`ledger/`) through a broker that loses what it queued.

use crate::schemas::{all_received, check_received, Schemas};
use crate::support::*;
use id06_ledger::consumer::{run as consume, Settings};
use id06_ledger::Store as LedgerDb;
use id06_protocol::Event;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// A reader tapping `n` new cards, `step_ms` apart, starting at card `first`.
fn tapping(dir: &Path, name: &str, first: u32, n: u32, step_ms: u32) -> String {
    let mut script = String::new();
    for i in 0..n {
        script.push_str(&format!(
            "at {} present {}\n",
            500 + i * step_ms,
            card(first + i)
        ));
    }
    script.push_str(&format!(
        "at {} absent\nat {} end\n",
        600 + n * step_ms,
        700 + n * step_ms
    ));
    write_script(dir, &format!("{name}.txt"), &script);
    format!("[[reader]]\nname = \"{name}\"\nkind = \"simulated\"\nscript = \"{name}.txt\"\npoll_ms = 10\ndirection = \"in\"\n\n")
}

/// A reference consumer on its own thread; `kill` drops it mid-work, like a crash.
struct Consumer {
    kill: Option<tokio::sync::oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Consumer {
    fn start(port: u16, db: &Path, client_id: &str) -> Consumer {
        let store = LedgerDb::open(db).expect("the ledger database");
        let settings = Settings {
            host: "127.0.0.1".into(),
            port,
            login: None,
            client_id: client_id.into(),
            group: "ledger".into(),
            prefix: "id06/v1".into(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<bool>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let work = consume(settings, store, async {
                    let _ = stop_rx.await;
                });
                tokio::pin!(work);
                tokio::select! {
                    _ = &mut work => {}
                    graceful = rx => {
                        if graceful.unwrap_or(false) {
                            let _ = stop_tx.send(());
                            work.await;
                        }
                        // else: dropped here, mid-work, without a goodbye.
                    }
                }
            });
            rt.shutdown_background();
        });
        Consumer {
            kill: Some(tx),
            thread: Some(thread),
        }
    }

    fn end(&mut self, graceful: bool) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(graceful);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.end(false);
    }
}

fn status(sub: &Subscriber, base: &str) -> Option<serde_json::Value> {
    sub.last_json(&format!("{base}/status"))
}

#[test]
fn unconfirmed_events_are_sent_again_until_the_ledger_confirms_them() {
    let dir = scratch();
    let broker = broker(dir.path());
    let readers = tapping(dir.path(), "gate", 100, 5, 200);
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!("{readers}[ledger]\nconfirm = true\nresend_after_s = 2\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n"),
    );
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-confirm", &[&format!("{p}/#")]);
    let mut daemon = Daemon::start(&config);
    wait_for("5 events", Duration::from_secs(20), || {
        check_delivery(&sub.events(&format!("{p}/event"))).0.len() == 5
    });
    // Nobody confirms: after resend_after_s they come again, same event_id, in order.
    wait_for("the events sent again", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() >= 10
    });
    let events = sub.events(&format!("{p}/event"));
    let (first, again) = check_delivery(&events);
    assert!(again >= 5, "{again} redeliveries");
    let resent: Vec<u64> = events[5..10].iter().map(|e| e.seq).collect();
    assert_eq!(resent, vec![1, 2, 3, 4, 5], "sent again in seq order");
    let stream = first[&1].stream;
    wait_for(
        "the status to show 5 unconfirmed",
        Duration::from_secs(40),
        || status(&sub, &p).is_some_and(|s| s["ledger_unconfirmed"] == 5),
    );
    // The ledger confirms 1..=3, then 4..=5: the resending stops and P/status says so.
    publish_raw(
        broker.port,
        &format!("{p}/ack"),
        format!(r#"{{"stream":"{stream}","seq":3}}"#).into_bytes(),
        false,
    );
    publish_raw(
        broker.port,
        &format!("{p}/ack"),
        format!(r#"{{"stream":"{stream}","seq":5}}"#).into_bytes(),
        false,
    );
    wait_for(
        "the status to show all confirmed",
        Duration::from_secs(10),
        || {
            status(&sub, &p)
                .is_some_and(|s| s["ledger_confirmed_seq"] == 5 && s["ledger_unconfirmed"] == 0)
        },
    );
    // The metrics say it too.
    let port: u16 = daemon
        .log_text()
        .split("metrics at http://127.0.0.1:")
        .nth(1)
        .and_then(|t| t.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the metrics address in the log");
    wait_for(
        "the confirmed seq in the metrics",
        Duration::from_secs(10),
        || {
            let text = crate::ops::http_get(port, "/metrics");
            text.contains("id06d_ledger_confirmed_seq 5")
                && text.contains("id06d_ledger_unconfirmed 0")
        },
    );
    // A hostile or confused ack is ignored with a line.
    publish_raw(
        broker.port,
        &format!("{p}/ack"),
        format!(r#"{{"stream":"{stream}","seq":99}}"#).into_bytes(),
        false,
    );
    wait_for("the bad ack to be refused", Duration::from_secs(10), || {
        daemon.log_text().contains("P/ack ignored: seq 99")
    });
    let seen = sub.events(&format!("{p}/event")).len();
    std::thread::sleep(Duration::from_millis(2500)); // one resend period: nothing more may come
    assert_eq!(
        sub.events(&format!("{p}/event")).len(),
        seen,
        "no resend after the confirmation"
    );
    assert_eq!(daemon.terminate(), Some(0));
    let (code, out, err) = id06d(&["outbox", "stats", "--config", config.path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("confirmed up to seq 5 of this stream; 0 events not confirmed"),
        "{out}"
    );
    let csv = export_events(config.path.to_str().unwrap(), "csv");
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .ends_with("acked_by_broker,stored_by_ledger"));
    assert!(
        csv.lines().skip(1).all(|l| l.ends_with(",yes,yes")),
        "{csv}"
    );
    // Every payload on the wire, the acknowledgements too, is what the schemas say.
    let received: Vec<Received> = all_received(&sub)
        .into_iter()
        .filter(|m| !(m.topic.ends_with("/ack") && m.payload.ends_with(b"99}")))
        .collect();
    let seen = check_received(&Schemas::load(), &config, &received);
    assert!(seen.contains_key("ack"));
    assert!(seen["status"]
        .iter()
        .any(|s| s.get("ledger_unconfirmed").is_some()));
}

#[test]
fn a_replay_sends_a_range_again_and_names_what_is_no_longer_kept() {
    let dir = scratch();
    let broker = broker(dir.path());
    let readers = tapping(dir.path(), "gate", 200, 6, 150);
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!("{readers}[events]\nkeep_days = 1\n"),
    );
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-replay", &[&format!("{p}/#")]);
    // The first six taps happen "30 days ago" (libfaketime), so that retention prunes them.
    let log = dir.path().join("old.log");
    let libfaketime = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libfaketime (Debian: faketime)");
    let mut old = std::process::Command::new(ID06D)
        .args(["run", "--config"])
        .arg(&config.path)
        .env("LD_PRELOAD", libfaketime)
        .env("FAKETIME", "-30d")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start id06d under libfaketime");
    wait_for("6 old events", Duration::from_secs(20), || {
        check_delivery(&sub.events(&format!("{p}/event"))).0.len() == 6
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(old.id() as libc::pid_t, libc::SIGTERM) };
    let status = old.wait().unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Now, at today's date: six new taps; the pruner removes the old six at start.
    let mut daemon = Daemon::start(&config);
    wait_for("6 new events", Duration::from_secs(20), || {
        check_delivery(&sub.events(&format!("{p}/event"))).0.len() == 12
    });
    wait_for("the old events pruned", Duration::from_secs(20), || {
        daemon
            .log_text()
            .contains("pruned delivered events older than keep_days removed=6")
    });
    let stream = sub.events(&format!("{p}/event"))[0].stream;
    let before = sub.events(&format!("{p}/event")).len();
    // Seqs 4..=9: 4..=6 are gone, 7..=9 are sent again.
    publish_raw(
        broker.port,
        &format!("{p}/replay"),
        format!(r#"{{"stream":"{stream}","from_seq":4,"to_seq":9}}"#).into_bytes(),
        false,
    );
    wait_for("the replay result", Duration::from_secs(10), || {
        !sub.json_on(&format!("{p}/replay/result")).is_empty()
    });
    let result = &sub.json_on(&format!("{p}/replay/result"))[0];
    assert_eq!(result["sent"], 3, "{result}");
    assert_eq!(result["missing"], serde_json::json!([[4, 6]]), "{result}");
    let replayed: Vec<u64> = sub.events(&format!("{p}/event"))[before..]
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(replayed, vec![7, 8, 9]);
    let (first, _) = check_delivery(&sub.events(&format!("{p}/event")));
    assert_eq!(
        first.len(),
        12,
        "replays are the same events, same event_id"
    );
    let seen = check_received(&Schemas::load(), &config, &all_received(&sub));
    assert!(seen.contains_key("replay") && seen.contains_key("replayResult"));
    // Malformed or absurd requests: one line each, no effect.
    for bad in [
        "not json".to_string(),
        format!(r#"{{"stream":"{stream}","from_seq":9,"to_seq":4}}"#),
        format!(r#"{{"stream":"{stream}","from_seq":1,"to_seq":99999999}}"#),
        r#"{"stream":"0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95","from_seq":1,"to_seq":2}"#.to_string(),
    ] {
        publish_raw(broker.port, &format!("{p}/replay"), bad.into_bytes(), false);
    }
    wait_for("four refusals", Duration::from_secs(10), || {
        daemon.log_text().matches("P/replay ignored").count() == 4
    });
    assert_eq!(sub.json_on(&format!("{p}/replay/result")).len(), 1);
    assert_eq!(daemon.terminate(), Some(0));
}

/// The example ACL in docs/mosquitto/acl.conf, on a real mosquitto with passwords.
#[test]
fn the_example_acl_keeps_each_terminal_to_its_own_topics() {
    let dir = scratch();
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/mosquitto/acl.conf");
    let passwd = dir.path().join("passwd");
    for (i, user) in ["gate-north-1", "gate-north-2", "ledger", "backend"]
        .iter()
        .enumerate()
    {
        let mut cmd = std::process::Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd
            .args(["-b"])
            .arg(&passwd)
            .args([user.to_string(), format!("pw-{user}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let broker = LocalBroker::start(
        &dir.path().join("broker"),
        &format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n",
            passwd.display(),
            acl.display()
        ),
    )
    .expect("mosquitto with the example ACL");
    let p1 = "id06/v1/SE-0001/gate-north-1";
    let p2 = "id06/v1/SE-0001/gate-north-2";
    let ledger = Subscriber::start_as(
        broker.port,
        "ledger-acl",
        &["id06/v1/+/+/event", "id06/v1/+/+/ack"],
        Some(("ledger", "pw-ledger")),
    );
    let terminal2 = Subscriber::start_as(
        broker.port,
        "gate-2-acl",
        &[&format!("{p2}/ack"), &format!("{p2}/event")],
        Some(("gate-north-2", "pw-gate-north-2")),
    );
    // The real gateway as gate-north-1, with its login: everything it does is allowed.
    let pw = dir.path().join("gate.pw");
    std::fs::write(&pw, "pw-gate-north-1\n").unwrap();
    let readers = tapping(dir.path(), "gate", 300, 3, 150);
    let config_path = dir.path().join("id06d.toml");
    std::fs::write(
        &config_path,
        format!(
            "site_id = \"SE-0001\"\nterminal_id = \"gate-north-1\"\ndata_dir = \"data\"\n\n[mqtt]\nurl = \"{}\"\nusername = \"gate-north-1\"\npassword_file = \"gate.pw\"\n\n{readers}",
            broker.url()
        ),
    )
    .unwrap();
    let config = TestConfig {
        path: config_path,
        site: "SE-0001".into(),
        terminal: "gate-north-1".into(),
    };
    let mut daemon = Daemon::start(&config);
    wait_for(
        "the gateway's events at the ledger",
        Duration::from_secs(20),
        || ledger.events(&format!("{p1}/event")).len() >= 3,
    );
    // gate-north-1's login publishing as gate-north-2, and acks for itself or the other: dropped.
    let login = |user: &str| {
        let mut o = rumqttc::MqttOptions::new(format!("raw-{user}"), "127.0.0.1", broker.port);
        o.set_credentials(user, format!("pw-{user}"));
        o
    };
    let forged = ledger.events(&format!("{p1}/event"))[0].to_json();
    publish_with(
        login("gate-north-1"),
        &format!("{p2}/event"),
        forged.clone(),
    );
    publish_with(login("gate-north-1"), &format!("{p2}/ack"), b"{}".to_vec());
    publish_with(login("gate-north-1"), &format!("{p1}/ack"), b"{}".to_vec());
    // The ledger's own ack reaches the terminal: the one message that must get through.
    publish_with(
        login("ledger"),
        &format!("{p2}/ack"),
        b"{\"probe\":1}".to_vec(),
    );
    wait_for(
        "the ledger's ack at gate-north-2",
        Duration::from_secs(10),
        || !terminal2.on(&format!("{p2}/ack")).is_empty(),
    );
    assert_eq!(
        terminal2.on(&format!("{p2}/ack")).len(),
        1,
        "only the ledger's ack"
    );
    assert!(
        terminal2.on(&format!("{p2}/event")).is_empty(),
        "no forged event"
    );
    assert!(
        ledger.events(&format!("{p2}/event")).is_empty(),
        "no forged event at the ledger"
    );
    assert!(
        ledger.on(&format!("{p1}/ack")).is_empty(),
        "a terminal cannot confirm"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

/// Publishes one message with a login, QoS 1, and waits for the broker's answer.
fn publish_with(o: rumqttc::MqttOptions, topic: &str, payload: Vec<u8>) {
    let (client, mut connection) = rumqttc::Client::new(o, 10);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .expect("queue the publish");
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(_) => break, // mosquitto may also cut a client that publishes where it may not
        }
    }
    let _ = client.disconnect();
}

#[test]
fn decisions_made_while_the_broker_is_away_are_never_published_late() {
    let dir = scratch();
    let mut broker = broker(dir.path());
    let readers = tapping(dir.path(), "gate", 400, 60, 200);
    let config = TestConfig::write(dir.path(), &broker.url(), &readers);
    let p = config.base();
    let door = Subscriber::start(broker.port, "door-late", &[&format!("{p}/decision")]);
    let daemon = Daemon::start(&config);
    wait_for("decisions", Duration::from_secs(20), || {
        door.on(&format!("{p}/decision")).len() >= 3
    });
    broker.stop();
    let outage_start = id06_protocol::UtcMillis::now().as_millis();
    std::thread::sleep(Duration::from_millis(3500));
    let back = id06_protocol::UtcMillis::now().as_millis();
    broker.restart().unwrap();
    wait_for(
        "the late decisions to be counted and said",
        Duration::from_secs(20),
        || {
            daemon
                .log_text()
                .contains("are not published (too late for a door)")
        },
    );
    wait_for(
        "decisions after the outage",
        Duration::from_secs(20),
        || {
            door.events(&format!("{p}/decision"))
                .iter()
                .any(|d| d.occurred_at.as_millis() > back)
        },
    );
    // Decided while the broker was away and more than 2 s before it came back: never sent.
    let late: Vec<Event> = door
        .events(&format!("{p}/decision"))
        .into_iter()
        .filter(|d| {
            let t = d.occurred_at.as_millis();
            t > outage_start + 300 && t < back - 2000 - 300
        })
        .collect();
    assert!(late.is_empty(), "late decisions published: {late:?}");
}

/// A door controller with a persistent session (what the contract tells doors not to do):
/// it connects, collects decisions on its own thread, and disconnects cleanly.
struct Door {
    client: rumqttc::Client,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Door {
    fn connect(port: u16, topic: &str) -> Door {
        let mut o = rumqttc::MqttOptions::new("door-persistent", "127.0.0.1", port);
        o.set_clean_session(false);
        let (client, mut connection) = rumqttc::Client::new(o, 100);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let subscribed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s, sub, topic) = (
            client.clone(),
            seen.clone(),
            subscribed.clone(),
            topic.to_string(),
        );
        let thread = std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = c.try_subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        sub.store(true, std::sync::atomic::Ordering::Release);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if let Ok(e) = Event::from_json(&p.payload) {
                            s.lock().unwrap().push(e.seq);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        wait_for("the door's subscription", Duration::from_secs(10), || {
            subscribed.load(std::sync::atomic::Ordering::Acquire)
        });
        Door {
            client,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<u64> {
        self.seen.lock().unwrap().clone()
    }

    fn disconnect(mut self) -> Vec<u64> {
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen()
    }
}

#[test]
fn a_door_that_was_away_never_gets_a_decision_late() {
    let dir = scratch();
    let broker = broker(dir.path());
    let readers = tapping(dir.path(), "gate", 700, 20, 2000);
    let config = TestConfig::write(dir.path(), &broker.url(), &readers);
    let p = config.base();
    let topic = format!("{p}/decision");
    let ledger = Subscriber::start(broker.port, "ledger-door", &[&format!("{p}/event")]);
    let has_event = |seq: u64| {
        ledger
            .events(&format!("{p}/event"))
            .iter()
            .any(|e| e.seq == seq)
    };
    let mut daemon = Daemon::start(&config);
    let door = Door::connect(broker.port, &topic);
    wait_for("decision 1 at the door", Duration::from_secs(20), || {
        door.seen().contains(&1)
    });
    // Away briefly: the broker keeps the decision for the door's session.
    door.disconnect();
    wait_for("event 2", Duration::from_secs(20), || has_event(2));
    let door = Door::connect(broker.port, &topic);
    wait_for(
        "decision 2, queued for the door",
        Duration::from_secs(10),
        || door.seen().contains(&2),
    );
    // Away for longer than the decision's expiry: the broker drops it.
    door.disconnect();
    wait_for("event 3", Duration::from_secs(20), || has_event(3));
    let published = Instant::now();
    // What is under test is time passing at the broker: nothing to wait for but the clock.
    std::thread::sleep(
        Duration::from_secs(u64::from(id06d::mqtt::door_session::DECISION_EXPIRY_S))
            + Duration::from_millis(1500),
    );
    let door = Door::connect(broker.port, &topic);
    wait_for("event 5", Duration::from_secs(20), || has_event(5));
    wait_for("decision 5 at the door", Duration::from_secs(10), || {
        door.seen().contains(&5)
    });
    let seen = door.disconnect();
    assert!(
        !seen.contains(&3),
        "decision 3 reached the door {:?} after it was made: {seen:?}",
        published.elapsed()
    );
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_fleet_through_a_forgetful_broker_ends_with_every_event_once_in_the_ledger() {
    let dir = scratch();
    // No persistence and a queue of 50 per session: a broker that loses what it holds.
    let mut broker = LocalBroker::start(
        &dir.path().join("broker"),
        "persistence false\nmax_queued_messages 50\n",
    )
    .expect("mosquitto");
    let gateways = 10u32;
    let mut configs = Vec::new();
    let mut daemons = Vec::new();
    for g in 0..gateways {
        let gdir = dir.path().join(format!("g{g}"));
        std::fs::create_dir_all(&gdir).unwrap();
        let readers = tapping(&gdir, "gate", 10_000 * (g + 1), 60, 250);
        let path = gdir.join("id06d.toml");
        std::fs::write(
            &path,
            format!(
                "site_id = \"SE-FLEET\"\nterminal_id = \"gate-{g}\"\ndata_dir = \"data\"\n\n[mqtt]\nurl = \"{}\"\n\n{readers}[ledger]\nconfirm = true\nresend_after_s = 2\n",
                broker.url()
            ),
        )
        .unwrap();
        let config = TestConfig {
            path,
            site: "SE-FLEET".into(),
            terminal: format!("gate-{g}"),
        };
        daemons.push(Daemon::start(&config));
        configs.push(config);
    }
    let db = dir.path().join("ledger.db");
    let mut consumers = vec![
        Consumer::start(broker.port, &db, "ledger-a"),
        Consumer::start(broker.port, &db, "ledger-b"),
    ];
    let mut rng = Rng::from_env_or_time();
    let start = Instant::now();
    let (mut broker_kills, mut consumer_kills) = (0, 0);
    while start.elapsed() < Duration::from_secs(14) {
        std::thread::sleep(rng.millis(1500, 3000));
        if rng.next() % 2 == 0 {
            broker.kill(); // SIGKILL: sessions and queues are gone
            broker_kills += 1;
            std::thread::sleep(rng.millis(100, 800));
            broker.restart().expect("the broker restarts");
        } else {
            let i = (rng.next() % 2) as usize;
            consumers[i].end(false);
            consumer_kills += 1;
            std::thread::sleep(rng.millis(200, 1500));
            consumers[i] = Consumer::start(
                broker.port,
                &db,
                if i == 0 { "ledger-a" } else { "ledger-b" },
            );
        }
    }
    // Every gateway confirmed to the end of its stream.
    let monitor = Subscriber::start(broker.port, "monitor-fleet", &["id06/v1/SE-FLEET/+/status"]);
    let settled = |monitor: &Subscriber| -> usize {
        configs
            .iter()
            .filter(|c| {
                monitor
                    .last_json(&format!("{}/status", c.base()))
                    .is_some_and(|s| {
                        s["online"] == true
                            && s["last_seq"] == 60
                            && s["ledger_confirmed_seq"] == 60
                            && s["ledger_unconfirmed"] == 0
                    })
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while settled(&monitor) < gateways as usize {
        if Instant::now() > deadline {
            let mut ledger = LedgerDb::open(&db).unwrap();
            for (c, d) in configs.iter().zip(&daemons) {
                let s = monitor.last_json(&format!("{}/status", c.base()));
                let log = d.log_text();
                let tail: Vec<&str> = log
                    .lines()
                    .filter(|l| !l.contains(" tap "))
                    .rev()
                    .take(8)
                    .collect();
                eprintln!("{}: {s:?}\n{tail:#?}", c.terminal);
            }
            eprintln!("ledger: {:#?}", ledger.streams().unwrap());
            panic!(
                "only {} of {gateways} gateways confirmed to the end",
                settled(&monitor)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for c in &mut consumers {
        c.end(true);
    }
    for d in &mut daemons {
        assert_eq!(d.terminate(), Some(0));
    }
    // The ledger's database: every event of every stream exactly once, seq 1..=60.
    let mut ledger = LedgerDb::open(&db).unwrap();
    let streams = ledger.streams().unwrap();
    assert_eq!(streams.len(), gateways as usize, "{streams:?}");
    let mut terminals = BTreeSet::new();
    for s in &streams {
        assert_eq!((s.count, s.max_seq, s.contiguous), (60, 60, 60), "{s:?}");
        terminals.insert(s.terminal_id.clone());
    }
    assert_eq!(terminals.len(), gateways as usize);
    assert_eq!(ledger.count().unwrap(), 60 * u64::from(gateways));
    eprintln!(
        "fleet: {gateways} gateways x 60 taps, {broker_kills} broker SIGKILLs, {consumer_kills} consumer kills, all {} events stored once and confirmed",
        60 * gateways
    );
}
