//! OSDP door readers: the daemon as control panel, a real OSDP peripheral device (libosdp's
//! PD mode) on the other end of a pty as the reader.

use crate::support::*;
use id06_readers::osdp::emulator::{Reader, Received};
use id06_readers::osdp::libosdp::{OsdpCommand, OsdpLedColor};
use std::time::Duration;

const KEY: &str = "303132333435363738393a3b3c3d3e3f";
const GRANTED: [u8; 7] = [0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6];
const BLOCKED: [u8; 7] = [0x04, 0xB1, 0x0C, 0x4E, 0xD0, 0x00, 0x0B];

fn key() -> [u8; 16] {
    let mut k = [0u8; 16];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16).unwrap();
    }
    k
}

fn osdp_config(dir: &std::path::Path, url: &str, reader: &Reader, key_text: &str) -> TestConfig {
    std::fs::write(dir.join("gate.scbk"), key_text).unwrap();
    TestConfig::write(
        dir,
        url,
        &format!(
            "[debounce]\nflap_limit = 2\n\n[[reader]]\nname = \"gate\"\nkind = \"osdp\"\npath = \"{}\"\nscbk_file = \"gate.scbk\"\ndoor_output = 0\nopen_ms = 1500\ndirection = \"in\"\n",
            reader.path().display()
        ),
    )
}

fn reader_state(sub: &Subscriber, topic: &str) -> (String, String) {
    sub.last_json(topic)
        .map(|v| {
            (
                v["state"].as_str().unwrap_or("").to_string(),
                v["last_error"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_default()
}

/// Waits up to `secs` seconds for the reader's state on `topic` to be `state`.
fn wait_reader(sub: &Subscriber, topic: &str, state: &str, what: &str, secs: u64) {
    wait_for(what, Duration::from_secs(secs), || {
        reader_state(sub, topic).0 == state
    });
}

/// The feedback commands (LED, buzzer, output, text) received since `from`.
fn feedback(reader: &Reader, from: usize) -> Vec<OsdpCommand> {
    reader
        .received()
        .into_iter()
        .skip(from)
        .map(|r: Received| r.command)
        .filter(|c| {
            matches!(
                c,
                OsdpCommand::Led(_)
                    | OsdpCommand::Buzzer(_)
                    | OsdpCommand::Output(_)
                    | OsdpCommand::Text(_)
            )
        })
        .collect()
}

#[test]
fn osdp_card_reads_are_taps_and_the_reader_shows_green_opens_the_door_or_shows_red() {
    let reader = Reader::start(0, Some(key())).expect("an OSDP reader on a pty");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = osdp_config(dir.path(), &broker.url(), &reader, KEY);
    let path = config.path.to_str().unwrap().to_string();
    import_list(&path, "04B10C4ED0000B,blocked\n", &[]);
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(broker.port, "ledger-osdp", &[&format!("{p}/event"), &topic]);
    let mut daemon = Daemon::start(&config);
    wait_reader(&sub, &topic, "ok", "the reader online", 30);
    let device = sub.last_json(&topic).unwrap()["device"].clone();
    assert!(
        device.as_str().unwrap_or("").contains("secure channel"),
        "{device}"
    );

    // A card that may pass: one event, then green, one beep, the door, the greeting.
    let before = reader.received().len();
    reader.present(&GRANTED);
    wait_for("the granted event", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() == 1
    });
    let events = sub.events(&format!("{p}/event"));
    assert_eq!(events[0].card_uid.to_string(), "04A1B2C3D4E5F6");
    assert_eq!(events[0].reader, "gate");
    assert_eq!(events[0].decision, id06_protocol::Decision::Granted);
    wait_for("the granted feedback", Duration::from_secs(20), || {
        feedback(&reader, before).len() >= 4
    });
    let got = feedback(&reader, before);
    match &got[..] {
        [OsdpCommand::Led(led), OsdpCommand::Buzzer(b), OsdpCommand::Output(o), OsdpCommand::Text(t)] =>
        {
            assert_eq!(led.temporary.on_color, OsdpLedColor::Green);
            assert_eq!(b.rep_count, 1, "one beep");
            assert_eq!((o.output_no, o.timer_count), (0, 15), "the door for 1.5 s");
            assert_eq!(t.data, b"Valkommen in");
        }
        other => panic!("granted feedback: {other:?}"),
    }

    // A blocked card: red, three beeps, the reason, never the door.
    let before = reader.received().len();
    reader.present(&BLOCKED);
    wait_for("the denied event", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() == 2
    });
    let events = sub.events(&format!("{p}/event"));
    assert_eq!(events[1].reason.map(|r| r.as_str()), Some("blocked"));
    wait_for("the denied feedback", Duration::from_secs(20), || {
        feedback(&reader, before).len() >= 3
    });
    // (A door command would come before the text: the list is exact.)
    let got = feedback(&reader, before);
    match &got[..] {
        [OsdpCommand::Led(led), OsdpCommand::Buzzer(b), OsdpCommand::Text(t)] => {
            assert_eq!(led.temporary.on_color, OsdpLedColor::Red);
            assert_eq!(b.rep_count, 3, "three beeps");
            assert_eq!(t.data, b"Kortet ar sparrat");
        }
        other => panic!("denied feedback: {other:?}"),
    }

    // Reads the gate cannot use, again and again (a 26-bit credential): hold steady, amber
    // blinking; then a good read clears it.
    let before = reader.received().len();
    for _ in 0..6 {
        reader.present_wiegand(&[0x12, 0x34, 0x56, 0x40], 26);
    }
    wait_for("the hold-steady hint", Duration::from_secs(20), || {
        sub.last_json(&topic)
            .is_some_and(|v| v["hint"] == "hold_steady")
    });
    wait_for("the amber light", Duration::from_secs(20), || {
        feedback(&reader, before).iter().any(|c| {
            matches!(c, OsdpCommand::Led(l) if l.temporary.on_color == OsdpLedColor::Amber && l.temporary.control_code == 2)
        })
    });
    let before = reader.received().len();
    reader.present(&[0x04, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66]);
    wait_for("the amber light cancelled", Duration::from_secs(20), || {
        feedback(&reader, before)
            .iter()
            .any(|c| matches!(c, OsdpCommand::Led(l) if l.temporary.control_code == 1))
    });

    // Tamper: the reader's state says so.
    reader.report_status(true, false);
    wait_for("the tamper report", Duration::from_secs(20), || {
        reader_state(&sub, &topic).1.contains("tamper")
    });

    // Unplugged: absent, and the daemon goes on.
    drop(reader);
    wait_reader(&sub, &topic, "absent", "the reader absent", 20);
    assert!(daemon.is_running());
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn osdp_with_the_wrong_key_is_one_clear_error_on_the_reader_topic_and_no_crash() {
    let reader = Reader::start(0, Some(key())).expect("an OSDP reader on a pty");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = osdp_config(
        dir.path(),
        &broker.url(),
        &reader,
        "00000000000000000000000000000000\n",
    );
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(broker.port, "ledger-osdp-key", &[&topic]);
    let mut daemon = Daemon::start(&config);
    wait_for("the key error", Duration::from_secs(30), || {
        let (state, error) = reader_state(&sub, &topic);
        state == "failed" && error.contains("gate.scbk")
    });
    reader.present(&GRANTED);
    assert!(daemon.is_running());
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_bad_osdp_key_file_is_a_configuration_error_naming_it() {
    let dir = scratch();
    std::fs::write(dir.path().join("gate.scbk"), "not a key").unwrap();
    let config = TestConfig::write(
        dir.path(),
        "mqtt://127.0.0.1:1",
        "[[reader]]\nname = \"gate\"\nkind = \"osdp\"\npath = \"/dev/null\"\nscbk_file = \"gate.scbk\"\ndirection = \"in\"\n",
    );
    let (code, _, err) = id06d(&["check-config", "--config", config.path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("gate.scbk") && err.contains("32 hex digits"),
        "{err}"
    );
}

#[test]
fn two_osdp_readers_on_one_line_each_tap_and_get_their_own_feedback() {
    let mut other_key = key();
    other_key[0] ^= 0xFF;
    let line = id06_readers::osdp::emulator::Line::start(&[(0, Some(key())), (1, Some(other_key))])
        .expect("an OSDP line with two readers");
    let dir = scratch();
    let broker = broker(dir.path());
    std::fs::write(dir.path().join("entry.scbk"), KEY).unwrap();
    let other_hex: String = other_key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.path().join("exit.scbk"), other_hex).unwrap();
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!(
            "[[reader]]\nname = \"entry\"\nkind = \"osdp\"\npath = \"{0}\"\naddress = 0\nscbk_file = \"entry.scbk\"\ndirection = \"in\"\n\n[[reader]]\nname = \"exit\"\nkind = \"osdp\"\npath = \"{0}\"\naddress = 1\nscbk_file = \"exit.scbk\"\ndirection = \"out\"\n",
            line.path().display()
        ),
    );
    import_list(
        config.path.to_str().unwrap(),
        "04B10C4ED0000B,blocked\n",
        &[],
    );
    let p = config.base();
    let sub = Subscriber::start(
        broker.port,
        "ledger-osdp-bus",
        &[&format!("{p}/event"), &format!("{p}/reader/+")],
    );
    let mut daemon = Daemon::start(&config);
    for name in ["entry", "exit"] {
        wait_for(&format!("{name} online"), Duration::from_secs(30), || {
            reader_state(&sub, &format!("{p}/reader/{name}")).0 == "ok"
        });
    }
    let (entry, exit) = (line.reader(0), line.reader(1));
    let (entry_before, exit_before) = (entry.received().len(), exit.received().len());
    exit.present(&GRANTED);
    wait_for("the exit's event", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() == 1
    });
    let events = sub.events(&format!("{p}/event"));
    assert_eq!(events[0].reader, "exit");
    assert_eq!(events[0].direction.as_str(), "out");
    wait_for("the exit's feedback", Duration::from_secs(20), || {
        feedback(exit, exit_before).len() >= 3
    });
    match &feedback(exit, exit_before)[..] {
        [OsdpCommand::Led(led), OsdpCommand::Buzzer(_), OsdpCommand::Text(t)] => {
            assert_eq!(led.temporary.on_color, OsdpLedColor::Green);
            assert_eq!(t.data, b"Hej da");
        }
        other => panic!("the exit's feedback: {other:?}"),
    }
    entry.present(&BLOCKED);
    wait_for("the entry's event", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() == 2
    });
    assert_eq!(sub.events(&format!("{p}/event"))[1].reader, "entry");
    wait_for("the entry's feedback", Duration::from_secs(20), || {
        feedback(entry, entry_before).len() >= 3
    });
    // Each reader got its own answer only: red at the entry, green at the exit.
    let colors = |r: &Reader, from: usize| -> Vec<OsdpLedColor> {
        feedback(r, from)
            .into_iter()
            .filter_map(|c| match c {
                OsdpCommand::Led(l) => Some(l.temporary.on_color),
                _ => None,
            })
            .collect()
    };
    assert_eq!(colors(entry, entry_before), vec![OsdpLedColor::Red]);
    assert_eq!(colors(exit, exit_before), vec![OsdpLedColor::Green]);
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn with_the_broker_away_the_osdp_reader_still_shows_green_and_opens_the_door() {
    let reader = Reader::start(0, Some(key())).expect("an OSDP reader on a pty");
    let dir = scratch();
    // Nothing listens on port 1: the gateway never reaches a broker.
    let config = osdp_config(dir.path(), "mqtt://127.0.0.1:1", &reader, KEY);
    let mut daemon = Daemon::start(&config);
    // The card is held to the reader until the gate answers (reads before the line is up
    // are not taps; later ones belong to the same presentation).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while feedback(&reader, 0).len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "no feedback with the broker away: {:?}",
            feedback(&reader, 0)
        );
        reader.present(&GRANTED);
        std::thread::sleep(Duration::from_millis(300));
    }
    match &feedback(&reader, 0)[..] {
        [OsdpCommand::Led(led), OsdpCommand::Buzzer(_), OsdpCommand::Output(o), OsdpCommand::Text(_), ..] =>
        {
            assert_eq!(led.temporary.on_color, OsdpLedColor::Green);
            assert_eq!(o.output_no, 0);
        }
        other => panic!("feedback with the broker away: {other:?}"),
    }
    // Recorded, waiting for the broker.
    assert_eq!(daemon.terminate(), Some(0));
    let (depth, last_seq) = outbox_stats(&config);
    assert_eq!((depth, last_seq), (1, 1));
}

/// A reader unplugged and plugged back in, the way a USB serial adapter's
/// `/dev/serial/by-id/…` link comes back pointing at a new device: `absent` while it is
/// away, `ok` again with a fresh secure channel once it is back, and its taps and feedback
/// go on.
#[test]
fn an_osdp_reader_unplugged_and_plugged_back_is_absent_then_online_and_taps_again() {
    let dir = scratch();
    let broker = broker(dir.path());
    let link = dir.path().join("usb-gate-reader");
    let first = Reader::start(0, Some(key())).expect("an OSDP reader on a pty");
    std::os::unix::fs::symlink(first.path(), &link).unwrap();
    std::fs::write(dir.path().join("gate.scbk"), KEY).unwrap();
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!(
            "[[reader]]\nname = \"gate\"\nkind = \"osdp\"\npath = \"{}\"\nscbk_file = \"gate.scbk\"\ndirection = \"in\"\n",
            link.display()
        ),
    );
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(
        broker.port,
        "ledger-replug",
        &[&format!("{p}/event"), &topic],
    );
    let mut daemon = Daemon::start(&config);
    wait_reader(&sub, &topic, "ok", "the reader online", 30);
    first.present(&GRANTED);
    wait_for("the first tap", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() == 1
    });

    drop(first);
    wait_reader(&sub, &topic, "absent", "the reader absent", 20);
    let second = Reader::start(0, Some(key())).expect("the reader back");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(second.path(), &link).unwrap();
    wait_reader(&sub, &topic, "ok", "the reader online again", 30);
    let device = sub.last_json(&topic).unwrap()["device"].clone();
    assert!(
        device.as_str().unwrap_or("").contains("secure channel"),
        "{device}"
    );
    let before = second.received().len();
    second.present(&BLOCKED);
    wait_for("the tap after the replug", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() == 2
    });
    let events = sub.events(&format!("{p}/event"));
    assert_eq!(events[1].card_uid.to_string(), "04B10C4ED0000B");
    wait_for("its feedback", Duration::from_secs(20), || {
        !feedback(&second, before).is_empty()
    });
    assert!(daemon.is_running());
    assert_eq!(daemon.terminate(), Some(0));
}

/// A reader that sends the UID's bytes last first (`reversed = true`), and cards presented
/// in quick succession: each read is one tap, with the UID the right way round, in order.
#[test]
fn cards_read_in_quick_succession_at_a_reversed_osdp_reader_are_each_one_tap_in_order() {
    let reader = Reader::start(0, None).expect("an OSDP reader on a pty");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!(
            "[[reader]]\nname = \"gate\"\nkind = \"osdp\"\npath = \"{}\"\nreversed = true\ndirection = \"in\"\n",
            reader.path().display()
        ),
    );
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(
        broker.port,
        "ledger-reversed",
        &[&format!("{p}/event"), &topic],
    );
    let mut daemon = Daemon::start(&config);
    wait_reader(&sub, &topic, "ok", "the reader online", 30);
    let cards: Vec<[u8; 7]> = (0..8u8)
        .map(|i| [0x04, 0x5A, 0x11, 0x22, 0x33, 0x44, 0x10 + i])
        .collect();
    for c in &cards {
        let mut sent = *c;
        sent.reverse();
        reader.present(&sent);
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("eight taps", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() >= 8
    });
    let got: Vec<String> = sub
        .events(&format!("{p}/event"))
        .iter()
        .map(|e| e.card_uid.to_string())
        .collect();
    let want: Vec<String> = cards
        .iter()
        .map(|c| c.iter().map(|b| format!("{b:02X}")).collect())
        .collect();
    assert_eq!(got, want);
    assert_eq!(daemon.terminate(), Some(0));
}

/// A reader that loses power on a line that stays open (an RS-485 bus, a reader rebooted):
/// `absent` while it is silent, and back `ok` with a new secure channel within seconds of
/// its return — not after libosdp's default five minutes — and its cards are taps again.
#[test]
fn an_osdp_reader_that_reboots_on_an_open_line_is_back_within_seconds() {
    let reader = Reader::start(0, Some(key())).expect("an OSDP reader on a pty");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = osdp_config(dir.path(), &broker.url(), &reader, KEY);
    let p = config.base();
    let topic = format!("{p}/reader/gate");
    let sub = Subscriber::start(
        broker.port,
        "ledger-reboot",
        &[&format!("{p}/event"), &topic],
    );
    let mut daemon = Daemon::start(&config);
    wait_reader(&sub, &topic, "ok", "the reader online", 30);
    // Off long enough for libosdp to give the reader up (8 unanswered polls, ~9 s).
    reader.power_cycle(Duration::from_secs(12));
    wait_reader(&sub, &topic, "absent", "the reader absent", 30);
    // Back within the 12 s off + 5 s retry + the handshake (libosdp's own default: 300 s).
    wait_reader(&sub, &topic, "ok", "the reader online again", 25);
    reader.present(&GRANTED);
    wait_for("a tap after the reboot", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() == 1
    });
    assert_eq!(daemon.terminate(), Some(0));
}
