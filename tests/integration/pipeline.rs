//! The whole pipeline against a real mosquitto: simulated readers → debouncer → decision →
//! sled outbox → MQTT, and the daemon's guarantees across `kill -9` and broker outages.

use crate::support::*;
use id06_protocol::{Event, UtcMillis};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const C1: &str = "04A10000000001";
const C2: &str = "04B10000000002"; // blocked
const C3: &str = "04B10000000003"; // suspended
const C4: &str = "04A10000000004"; // toggles
const C5: &str = "04B10000000005"; // produced
const C6: &str = "04B10000000006"; // terminated

fn rush_config(dir: &std::path::Path, url: &str) -> TestConfig {
    write_script(
        dir,
        "entry.txt",
        &format!("at 0 present {C1}\nat 300 absent\nat 600 present {C1}\nat 800 absent\nat 1000 present {C2}\nat 1200 absent\n"),
    );
    write_script(
        dir,
        "exit.txt",
        &format!("at 300 present {C3}\nat 500 absent\nat 1500 present {C5}\nat 1700 absent\nat 2200 present {C6}\nat 2400 absent\n"),
    );
    write_script(
        dir,
        "turnstile.txt",
        &format!("at 150 present {C4}\nat 350 absent\nat 1250 present {C4}\nat 1450 absent\nat 2600 present {C4}\nat 2800 absent\n"),
    );
    TestConfig::write(
        dir,
        url,
        r#"
[[reader]]
name = "entry"
kind = "simulated"
script = "entry.txt"
poll_ms = 20
direction = "in"

[[reader]]
name = "exit"
kind = "simulated"
script = "exit.txt"
poll_ms = 20
direction = "out"

[[reader]]
name = "turnstile"
kind = "simulated"
script = "turnstile.txt"
poll_ms = 20
direction = "toggle"

[debounce]
gone_ms = 200
repeat_ms = 800
"#,
    )
}

fn import_blocklist(config: &TestConfig) {
    let out = import_list(
        config.path.to_str().unwrap(),
        &format!("uid,status\n{C2},blocked\n{C3},suspended\n{C5},produced\n{C6},terminated\n"),
        &["--version", "42"],
    );
    assert!(out.contains("imported 4 listed cards"), "{out}");
}

#[test]
fn a_scripted_rush_produces_exactly_the_expected_events_in_order() {
    let dir = scratch();
    let broker = broker(dir.path());
    let config = rush_config(dir.path(), &broker.url());
    import_blocklist(&config);
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-1", &[&format!("{p}/#")]);
    let mut daemon = Daemon::start(&config);

    wait_for("8 events on P/event", Duration::from_secs(20), || {
        sub.on(&format!("{p}/event")).len() >= 8
    });
    wait_for("8 decisions", Duration::from_secs(5), || {
        sub.on(&format!("{p}/decision")).len() >= 8
    });
    let events = sub.events(&format!("{p}/event"));
    let expected = [
        ("entry", "in", C1, "unlisted", "granted", None),
        ("turnstile", "in", C4, "unlisted", "granted", None),
        ("exit", "out", C3, "suspended", "denied", Some("suspended")),
        ("entry", "in", C2, "blocked", "denied", Some("blocked")),
        ("turnstile", "out", C4, "unlisted", "granted", None),
        (
            "exit",
            "out",
            C5,
            "produced",
            "denied",
            Some("not_activated"),
        ),
        (
            "exit",
            "out",
            C6,
            "terminated",
            "denied",
            Some("terminated"),
        ),
        ("turnstile", "in", C4, "unlisted", "granted", None),
    ];
    assert_eq!(
        events.len(),
        8,
        "exactly one event per tap, no duplicate: {events:#?}"
    );
    let synced = id06d::ops::clock::clock_synced();
    let mut last_time = UtcMillis(0);
    for (i, (e, (reader, dir_, uid, status, decision, reason))) in
        events.iter().zip(expected).enumerate()
    {
        let v: serde_json::Value = serde_json::to_value(e).unwrap();
        let seq = i as u64 + 1;
        assert_eq!(v["schema"], "id06d/event/v2");
        assert_eq!(e.seq, seq);
        assert_eq!(e.stream, events[0].stream);
        assert_eq!(e.event_id, format!("SE-TEST:gate-test:{}:{seq}", e.stream));
        assert_eq!(e.decision_id, e.event_id);
        assert_eq!(e.site_id, "SE-TEST");
        assert_eq!(e.terminal_id, "gate-test");
        assert_eq!(
            (
                v["reader"].as_str().unwrap(),
                v["direction"].as_str().unwrap(),
                v["card_uid"].as_str().unwrap()
            ),
            (reader, dir_, uid),
            "event {seq}"
        );
        assert_eq!(v["card_status"], status, "event {seq}");
        assert_eq!(v["decision"], decision, "event {seq}");
        assert_eq!(v["reason"].as_str(), reason, "event {seq}");
        assert_eq!(e.blocklist_version, 42);
        assert!(!e.blocklist_stale);
        assert_eq!(e.clock_synced, synced);
        assert!(e.occurred_at > last_time, "occurred_at increases");
        last_time = e.occurred_at;
    }
    // P/decision carries the same events.
    let decisions = sub.events(&format!("{p}/decision"));
    assert_eq!(decisions, events);
    // The duplicate tap on the entry reader was recognised and not published.
    assert!(daemon.log_text().contains("duplicate presentation"));

    // Retained status and reader states.
    let status = sub.last_json(&format!("{p}/status")).expect("a status");
    assert_eq!(status["online"], true);
    assert_eq!(status["blocklist_version"], 42);
    assert!(status["blocklist_age_s"].as_u64().unwrap() < 600);
    assert!(status["outbox_depth"].is_u64());
    assert!(status["version"].is_string());
    assert!(UtcMillis::parse(status["started_at"].as_str().unwrap()).is_ok());
    assert_eq!(status["clock_synced"], synced);
    for name in ["entry", "exit", "turnstile"] {
        let r = sub
            .last_json(&format!("{p}/reader/{name}"))
            .expect("a reader state");
        assert_eq!(r["state"], "ok", "{name}");
        assert_eq!(r["recoveries"], 0);
    }
    // A subscriber arriving later gets the retained states.
    let late = Subscriber::start(
        broker.port,
        "late-1",
        &[&format!("{p}/status"), &format!("{p}/reader/+")],
    );
    wait_for(
        "retained status and readers",
        Duration::from_secs(5),
        || {
            late.on(&format!("{p}/status")).iter().any(|r| r.retain)
                && late
                    .on(&format!("{p}/reader/exit"))
                    .iter()
                    .any(|r| r.retain)
        },
    );

    // kill -9: the broker publishes the last will.
    daemon.kill9();
    wait_for("the last will", Duration::from_secs(30), || {
        sub.last_json(&format!("{p}/status")) == Some(serde_json::json!({"online": false}))
    });
    drop(late);

    // Toggle state survives the restart: the turnstile's C4 was last "in", so its first tap
    // after the restart (the timeline replays) is "out".
    let mut daemon = Daemon::start(&config);
    wait_for("taps after the restart", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event"))
            .iter()
            .any(|e| e.seq > 8 && e.reader == "turnstile")
    });
    let after: Vec<Event> = sub
        .events(&format!("{p}/event"))
        .into_iter()
        .filter(|e| e.seq > 8 && e.reader == "turnstile")
        .collect();
    assert_eq!(after[0].direction.as_str(), "out");
    assert_eq!(daemon.terminate(), Some(0));
    assert_eq!(
        sub.last_json(&format!("{p}/status")),
        Some(serde_json::json!({"online": false})),
        "a clean stop says offline too"
    );
}

fn burst_config(dir: &std::path::Path, url: &str, cards: u32, step_ms: u32) -> TestConfig {
    let mut script = String::new();
    for i in 0..cards {
        script.push_str(&format!("at {} present {}\n", i * step_ms, card(1000 + i)));
    }
    script.push_str(&format!(
        "at {} absent\nat {} end\n",
        cards * step_ms,
        cards * step_ms + 200
    ));
    write_script(dir, "burst.txt", &script);
    let mut script2 = String::new();
    for i in 0..cards {
        script2.push_str(&format!(
            "at {} present {}\n",
            i * step_ms + step_ms / 2,
            card(5000 + i)
        ));
    }
    script2.push_str(&format!(
        "at {} absent\nat {} end\n",
        cards * step_ms + step_ms,
        cards * step_ms + 300
    ));
    write_script(dir, "burst2.txt", &script2);
    TestConfig::write(
        dir,
        url,
        r#"
[[reader]]
name = "a"
kind = "simulated"
script = "burst.txt"
poll_ms = 10
direction = "in"

[[reader]]
name = "b"
kind = "simulated"
script = "burst2.txt"
poll_ms = 10
direction = "out"
"#,
    )
}

#[test]
fn kill_9_in_a_burst_loses_nothing_and_never_reuses_a_seq() {
    let dir = scratch();
    let broker = broker(dir.path());
    let config = burst_config(dir.path(), &broker.url(), 80, 40);
    let p = config.base();
    let sub = Subscriber::start(
        broker.port,
        "ledger-kill",
        &[&format!("{p}/event"), &format!("{p}/decision")],
    );
    let mut daemon = Daemon::start(&config);
    wait_for("the burst to be under way", Duration::from_secs(20), || {
        sub.on(&format!("{p}/decision")).len() >= 40
    });
    daemon.kill9();
    // Everything whose decision was published had been recorded durably.
    let decided: Vec<Event> = sub.events(&format!("{p}/decision"));
    let max_decided = decided.iter().map(|e| e.seq).max().unwrap();

    // Restart: the timelines play again from the start (160 new taps). Counted on P/event:
    // decisions are best effort (one made more than 2 s before the broker connection is up,
    // as on a loaded machine, is not published), events are not.
    let mut daemon = Daemon::start(&config);
    wait_for("the second run's taps", Duration::from_secs(30), || {
        sub.events(&format!("{p}/event"))
            .iter()
            .map(|e| e.seq)
            .filter(|seq| *seq > max_decided)
            .collect::<BTreeSet<_>>()
            .len()
            >= 160
    });
    assert_eq!(daemon.terminate(), Some(0));
    let (depth, last_seq) = outbox_stats(&config);
    assert_eq!(depth, 0, "everything delivered before the clean stop");
    wait_for("every seq on P/event", Duration::from_secs(10), || {
        sub.events(&format!("{p}/event"))
            .iter()
            .map(|e| e.seq)
            .collect::<BTreeSet<_>>()
            .len() as u64
            >= last_seq
    });
    let (first, redeliveries) = check_delivery(&sub.events(&format!("{p}/event")));
    assert_eq!(
        first.len() as u64,
        last_seq,
        "seq 1..={last_seq} without a gap"
    );
    for d in &decided {
        assert_eq!(
            first.get(&d.seq),
            Some(d),
            "decided event {} delivered unchanged",
            d.seq
        );
    }
    // The second run's events continue the sequence: no seq of the first run reused.
    let second_run: Vec<&Event> = first.values().filter(|e| e.seq > max_decided).collect();
    assert!(second_run.len() >= 160);
    eprintln!(
        "kill -9 test: {} events, {} decided before the kill, {} redelivered",
        last_seq,
        decided.len(),
        redeliveries
    );
}

#[test]
fn a_broker_outage_in_a_burst_delivers_everything_in_order() {
    let dir = scratch();
    let mut broker = broker(dir.path());
    let config = burst_config(dir.path(), &broker.url(), 100, 40);
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-outage", &[&format!("{p}/event")]);
    let mut daemon = Daemon::start(&config);
    wait_for("the burst to be under way", Duration::from_secs(20), || {
        sub.on(&format!("{p}/event")).len() >= 30
    });
    broker.stop();
    // Taps go on while the broker is away; wait until the daemon has noticed.
    wait_for(
        "the daemon to notice the outage",
        Duration::from_secs(20),
        || daemon.log_text().contains("MQTT broker unreachable"),
    );
    // The outage lasts while 20 more taps are recorded.
    let taps_at_outage = daemon.log_text().matches("tap seq=").count();
    wait_for("20 taps during the outage", Duration::from_secs(20), || {
        daemon.log_text().matches("tap seq=").count() >= taps_at_outage + 20
    });
    broker.restart().expect("broker restarts");
    wait_for("the readers to finish", Duration::from_secs(30), || {
        daemon.log_text().matches("reader finished").count() >= 2
    });
    // 200 taps in all; wait for all of them to arrive.
    wait_for("all 200 events", Duration::from_secs(30), || {
        sub.events(&format!("{p}/event"))
            .iter()
            .map(|e| e.seq)
            .collect::<BTreeSet<_>>()
            .len()
            >= 200
    });
    assert_eq!(daemon.terminate(), Some(0));
    let (depth, last_seq) = outbox_stats(&config);
    assert_eq!((depth, last_seq), (0, 200));
    let received = sub.events(&format!("{p}/event"));
    let (first, redeliveries) = check_delivery(&received);
    assert_eq!(first.len(), 200);
    // Within each connection of the subscriber, events arrive in seq order.
    let arrivals = sub.on(&format!("{p}/event"));
    let mut by_conn: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (r, e) in arrivals.iter().zip(&received) {
        by_conn.entry(r.connection).or_default().push(e.seq);
    }
    for (conn, seqs) in &by_conn {
        let firsts: Vec<u64> = {
            let mut seen = BTreeSet::new();
            seqs.iter().copied().filter(|s| seen.insert(*s)).collect()
        };
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "connection {conn}: {seqs:?}"
        );
    }
    eprintln!(
        "outage test: 200 events, {redeliveries} redelivered, {} subscriber connections",
        by_conn.len()
    );
}

#[test]
fn the_daemon_waits_for_an_unreachable_broker_and_then_delivers() {
    let dir = scratch();
    let mut broker = broker(dir.path());
    let config = burst_config(dir.path(), &broker.url(), 10, 50);
    let p = config.base();
    // The ledger's persistent session exists before the outage, as it would on a site.
    let sub = Subscriber::start(broker.port, "ledger-late", &[&format!("{p}/event")]);
    broker.stop();
    let mut daemon = Daemon::start(&config);
    wait_for(
        "the daemon to say the broker is unreachable",
        Duration::from_secs(20),
        || daemon.log_text().contains("MQTT broker unreachable"),
    );
    wait_for("the readers to finish", Duration::from_secs(20), || {
        daemon.log_text().matches("reader finished").count() >= 2
    });
    assert!(
        daemon.is_running(),
        "an unreachable broker is not a reason to exit"
    );
    broker.restart().expect("broker starts");
    wait_for("the 20 waiting events", Duration::from_secs(30), || {
        sub.on(&format!("{p}/event")).len() >= 20
    });
    let (first, _) = check_delivery(&sub.events(&format!("{p}/event")));
    assert_eq!(first.len(), 20);
    assert_eq!(daemon.terminate(), Some(0));
}
