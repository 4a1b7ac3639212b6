//! Serial readers through the whole daemon over real ptys: a PN532 emulator
//! (`kind = "pn532"`) and a line reader (`kind = "line"`), events checked on `P/event`.

use crate::support::*;
use id06_protocol::CardUid;
use id06_readers::pn532::emulator::{Emulator, PollAnswer, PtyPeer};
use std::path::Path;
use std::time::Duration;

const C1: &str = "04A1B2C3D4E5F6";
const C2: &str = "04C0C1C2C3C4C5";
const C3: &str = "04D0D1D2D3D4D5";

fn uid(s: &str) -> CardUid {
    CardUid::parse(s).unwrap()
}

/// A runtime for the emulator's pty task; the daemon is a child process.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

fn pn532_config(dir: &Path, url: &str, device: &Path) -> TestConfig {
    TestConfig::write(
        dir,
        url,
        &format!(
            r#"
[[reader]]
name = "gate"
kind = "pn532"
path = "{}"
baud = 115200
poll_ms = 30
direction = "in"

[debounce]
gone_ms = 300
repeat_ms = 2000
"#,
            device.display()
        ),
    )
}

/// The reader topic's state, or "".
fn reader_state(sub: &Subscriber, topic: &str) -> String {
    sub.last_json(topic)
        .and_then(|v| v["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn pn532_card_presented_through_noise_split_frames_and_a_bad_checksum_is_one_event() {
    let rt = runtime();
    let _enter = rt.enter();
    let emu = Emulator::start().expect("a pty for the emulator");
    emu.set_noise(true);
    emu.set_split(true);
    emu.corrupt_next_responses(2);
    emu.set_card(Some(uid(C1)));

    let dir = scratch();
    let broker = broker(dir.path());
    let config = pn532_config(dir.path(), &broker.url(), emu.path());
    let p = config.base();
    let sub = Subscriber::start(
        broker.port,
        "ledger-pn532",
        &[&format!("{p}/event"), &format!("{p}/reader/+")],
    );
    let mut daemon = Daemon::start(&config);
    wait_for("the card's event", Duration::from_secs(30), || {
        !sub.events(&format!("{p}/event")).is_empty()
    });
    // The card keeps lying on the reader for many more polls: still one tap.
    let polls = emu.stats().count(0x4A);
    wait_for("30 more polls", Duration::from_secs(30), || {
        emu.stats().count(0x4A) >= polls + 30
    });
    let events = sub.events(&format!("{p}/event"));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].card_uid, uid(C1));
    assert_eq!(events[0].reader, "gate");
    assert_eq!(events[0].direction.as_str(), "in");
    assert_eq!(emu.stats().nacks, 2);
    let state = sub
        .last_json(&format!("{p}/reader/gate"))
        .expect("a reader state");
    assert_eq!(state["state"], "ok");
    assert_eq!(
        state["device"],
        "PN532 v1.6 (ISO 14443 A, ISO 14443 B, ISO 18092)"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn pn532_locked_up_is_recovered_without_a_restart_and_the_next_card_read() {
    let rt = runtime();
    let _enter = rt.enter();
    let emu = Emulator::start().expect("a pty for the emulator");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = pn532_config(dir.path(), &broker.url(), emu.path());
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(
        broker.port,
        "ledger-lockup",
        &[&format!("{p}/event"), &topic],
    );
    let mut daemon = Daemon::start(&config);
    wait_for("the reader to be ok", Duration::from_secs(30), || {
        reader_state(&sub, &topic) == "ok"
    });

    emu.set_locked_up(true);
    wait_for(
        "the reader to be recovering",
        Duration::from_secs(30),
        || reader_state(&sub, &topic) == "recovering",
    );
    // It stays locked up through several recovery attempts.
    let wake_ups = emu.stats().wake_ups;
    wait_for("two more wake-up attempts", Duration::from_secs(30), || {
        emu.stats().wake_ups >= wake_ups + 2
    });
    assert_eq!(reader_state(&sub, &topic), "recovering");

    emu.set_card(Some(uid(C2)));
    emu.set_locked_up(false);
    wait_for("the next card's event", Duration::from_secs(30), || {
        sub.events(&format!("{p}/event"))
            .iter()
            .any(|e| e.card_uid == uid(C2))
    });
    let state = sub.last_json(&topic).expect("a reader state");
    assert_eq!(state["state"], "ok");
    assert_eq!(state["recoveries"], 1);
    assert!(daemon.is_running(), "recovered without a restart");
    assert!(daemon.log_text().contains("reader recovered"));
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn pn532_waved_card_is_one_tap_and_the_hold_steady_hint() {
    let rt = runtime();
    let _enter = rt.enter();
    let emu = Emulator::start().expect("a pty for the emulator");
    // One complete read, then the card flickers in and out without being read.
    let mut answers = vec![PollAnswer::Card(uid(C3))];
    for _ in 0..4 {
        answers.push(PollAnswer::Empty);
        answers.push(PollAnswer::Truncated(uid(C3)));
    }
    answers.push(PollAnswer::Empty);
    emu.script_polls(answers);

    let dir = scratch();
    let broker = broker(dir.path());
    let config = pn532_config(dir.path(), &broker.url(), emu.path());
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(broker.port, "ledger-wave", &[&format!("{p}/event"), &topic]);
    let mut daemon = Daemon::start(&config);
    wait_for("the hold_steady hint", Duration::from_secs(30), || {
        sub.json_on(&topic)
            .iter()
            .any(|v| v["hint"] == "hold_steady")
    });
    wait_for(
        "the scripted polls to be used",
        Duration::from_secs(30),
        || emu.pending_polls() == 0,
    );
    // And a few polls of an empty field after them.
    let polls = emu.stats().count(0x4A);
    wait_for("10 more polls", Duration::from_secs(30), || {
        emu.stats().count(0x4A) >= polls + 10
    });
    let events = sub.events(&format!("{p}/event"));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].card_uid, uid(C3));
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn line_reader_lines_are_events_and_garbage_is_none() {
    let rt = runtime();
    let _enter = rt.enter();
    let mut peer = PtyPeer::open().expect("a pty");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!(
            r#"
[[reader]]
name = "side"
kind = "line"
path = "{}"
baud = 9600
direction = "out"

[debounce]
gone_ms = 200
repeat_ms = 1000
"#,
            peer.path().display()
        ),
    );
    let p = config.base();
    let topic = format!("{p}/reader/side");
    let sub = Subscriber::start(broker.port, "ledger-line", &[&format!("{p}/event"), &topic]);
    let mut daemon = Daemon::start(&config);
    wait_for("the line reader to be ok", Duration::from_secs(30), || {
        reader_state(&sub, &topic) == "ok"
    });
    rt.block_on(peer.write(b"04A1B2C3D4E5F6\r\nthis is no card\n\x00\x01\x02\r"))
        .unwrap();
    rt.block_on(peer.write(b"04:c0:c1:c2:c3:c4:c5\n")).unwrap();
    wait_for("two events", Duration::from_secs(30), || {
        sub.events(&format!("{p}/event")).len() >= 2
    });
    let events = sub.events(&format!("{p}/event"));
    let cards: Vec<CardUid> = events.iter().map(|e| e.card_uid).collect();
    assert_eq!(cards, vec![uid(C1), uid(C2)]);
    assert!(events.iter().all(|e| e.reader == "side"));
    let log = daemon.log_text();
    assert_eq!(
        log.matches("not a card UID").count(),
        2,
        "both garbage lines are logged: {log}"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

/// A line reader named "gate" on `peer`'s pty.
fn line_reader(peer: &PtyPeer) -> String {
    format!(
        "[[reader]]\nname = \"gate\"\nkind = \"line\"\npath = \"{}\"\nbaud = 115200\ndirection = \"in\"\n",
        peer.path().display()
    )
}

#[test]
fn a_burst_of_5000_cards_on_a_line_reader_is_5000_events_and_5000_decisions() {
    let rt = runtime();
    let _enter = rt.enter();
    let mut peer = PtyPeer::open().expect("a pty");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = TestConfig::write(dir.path(), &broker.url(), &line_reader(&peer));
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(
        broker.port,
        "ledger-burst-5000",
        &[&format!("{p}/event"), &format!("{p}/decision"), &topic],
    );
    let mut daemon = Daemon::start(&config);
    wait_for("the line reader to be ok", Duration::from_secs(30), || {
        reader_state(&sub, &topic) == "ok"
    });
    // Give the decision session its connection before the burst (decisions are not kept
    // for a broker the gateway has not reached yet).
    wait_for("the decision session", Duration::from_secs(10), || {
        daemon
            .log_text()
            .contains("the decision session is connected")
    });
    let lines: String = (0..5000u32)
        .map(|i| format!("{}\n", card(8_000_000 + i)))
        .collect();
    let started = std::time::Instant::now();
    rt.block_on(peer.write(lines.as_bytes())).unwrap();
    wait_for(
        "5000 events and 5000 decisions",
        Duration::from_secs(120),
        || {
            sub.on(&format!("{p}/event")).len() >= 5000
                && sub.on(&format!("{p}/decision")).len() >= 5000
        },
    );
    eprintln!("5000 taps: events and decisions in {:?}", started.elapsed());
    let (first, _) = check_delivery(&sub.events(&format!("{p}/event")));
    assert_eq!(first.len(), 5000);
    let decided: std::collections::BTreeSet<u64> = sub
        .events(&format!("{p}/decision"))
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(decided, (1..=5000).collect(), "a decision for every tap");
    assert_eq!(daemon.terminate(), Some(0));
    assert!(!daemon.log_text().contains("not published"), "none dropped");
}

#[test]
fn taps_are_recorded_while_nothing_reads_the_daemons_log() {
    // journald that hangs, or a pipe nobody drains: the daemon's stderr stops taking
    // lines after 64 KiB. The taps (and their log lines, a few hundred bytes each) go on.
    let rt = runtime();
    let _enter = rt.enter();
    let mut peer = PtyPeer::open().expect("a pty");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = TestConfig::write(dir.path(), &broker.url(), &line_reader(&peer));
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(
        broker.port,
        "ledger-log-unread",
        &[&format!("{p}/event"), &topic],
    );
    let (mut daemon, stderr) = Daemon::start_piped(&config);
    wait_for("the line reader to be ok", Duration::from_secs(30), || {
        reader_state(&sub, &topic) == "ok"
    });
    // 1 000 taps log far more than the pipe holds (about 360 "tap" lines fill it).
    let taps = 1000u32;
    for chunk in (0..taps).collect::<Vec<_>>().chunks(50) {
        let lines: String = chunk
            .iter()
            .map(|i| format!("{}\n", card(9_000_000 + i)))
            .collect();
        rt.block_on(peer.write(lines.as_bytes())).unwrap();
    }
    wait_for("an event for every tap", Duration::from_secs(120), || {
        sub.on(&format!("{p}/event")).len() >= taps as usize
    });
    let (first, _) = check_delivery(&sub.events(&format!("{p}/event")));
    assert_eq!(first.len(), taps as usize);
    // The log was held back, not lost: once read, every tap has its line.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut text);
        text
    });
    assert_eq!(daemon.terminate(), Some(0));
    let log = reader.join().expect("the log reader");
    let tap_lines = log
        .lines()
        .filter(|l| l.contains(" tap ") && l.contains("seq="))
        .count();
    assert_eq!(tap_lines, taps as usize, "a log line for every tap");
}
