//! PC/SC readers through the whole daemon: a real pcscd with vpcd's virtual readers, the test
//! playing the card over vpcd's TCP protocol (`id06_readers::vpcd_card`), events checked on
//! `P/event` of a real mosquitto.
//!
//! Each test has a pcscd, a vpcd and a loopback of its own (`vpcd_card::sandbox`: private
//! mount and network namespaces), so they run side by side and never touch the machine's
//! pcscd; the sandbox stops its pcscd when the test ends.
//! pcscd notices a card coming or going by polling vpcd every 400 ms; the tests wait for
//! conditions, never for that period.

use crate::support::*;
use id06_protocol::CardUid;
use id06_readers::vpcd_card::{
    sandbox, wait_slot_empty, CardBehaviour, PcscSandbox, VirtualCard, SLOT_0,
};
use std::path::Path;
use std::time::{Duration, Instant};

const UID4: [u8; 4] = [0x04, 0xA1, 0xB2, 0xC3];
const UID7: [u8; 7] = [0x04, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66];
const LONG: Duration = Duration::from_secs(30);

fn uid(bytes: &[u8]) -> CardUid {
    CardUid::from_bytes(bytes).expect("a valid UID")
}

/// A pcscd of the test's own (in its own mount and network namespaces, see
/// `vpcd_card::sandbox`), showing vpcd's first reader with no card in it. Everything the
/// test starts afterwards — broker, daemon, ledger — runs in those namespaces too.
fn setup() -> PcscSandbox {
    let lock = sandbox().expect("a pcscd of this test's own");
    assert!(wait_slot_empty(SLOT_0), "vpcd's first reader is empty");
    lock
}

/// The debouncer's waving window, widened to the pace at which vpcd lets a card come and
/// go (every pass costs at least one of pcscd's 400 ms polls in and one out).
const WAVING: &str = "[debounce]\nflap_window_ms = 5000\n";

fn pcsc_config(dir: &Path, url: &str, extra: &str) -> TestConfig {
    TestConfig::write(
        dir,
        url,
        &format!(
            r#"
[[reader]]
name = "turnstile"
kind = "pcsc"
match = "{}"
direction = "in"

{extra}
"#,
            SLOT_0.reader
        ),
    )
}

fn insert(behaviour: CardBehaviour) -> VirtualCard {
    VirtualCard::insert(SLOT_0, behaviour).expect("vpcd takes the virtual card")
}

/// The card lies on the reader for `time` (the test's action, not a wait for the daemon).
fn present(bytes: &[u8], time: Duration) {
    let card = insert(CardBehaviour::uid(bytes));
    std::thread::sleep(time);
    card.remove();
    assert!(wait_slot_empty(SLOT_0), "pcscd sees the card go");
}

struct Gate {
    sub: Subscriber,
    daemon: Daemon,
    base: String,
    _broker: LocalBroker,
    _dir: tempfile::TempDir,
}

impl Gate {
    fn start(client: &str) -> Gate {
        Gate::start_with(client, "")
    }

    /// With `extra` configuration (sections) after the reader.
    fn start_with(client: &str, extra: &str) -> Gate {
        let dir = scratch();
        let broker = broker(dir.path());
        let config = pcsc_config(dir.path(), &broker.url(), extra);
        let base = config.base();
        let sub = Subscriber::start(
            broker.port,
            client,
            &[
                &format!("{base}/event"),
                &format!("{base}/decision"),
                &format!("{base}/reader/turnstile"),
            ],
        );
        let daemon = Daemon::start(&config);
        Gate {
            sub,
            daemon,
            base,
            _broker: broker,
            _dir: dir,
        }
    }

    fn events(&self) -> Vec<id06_protocol::Event> {
        self.sub.events(&format!("{}/event", self.base))
    }

    fn reader_topic(&self) -> String {
        format!("{}/reader/turnstile", self.base)
    }

    fn reader(&self) -> serde_json::Value {
        self.sub
            .last_json(&self.reader_topic())
            .unwrap_or(serde_json::Value::Null)
    }

    fn reader_state(&self) -> String {
        self.reader()["state"].as_str().unwrap_or("").to_string()
    }

    fn wait_state(&self, state: &str) {
        wait_for(&format!("the reader to be {state}"), LONG, || {
            self.reader_state() == state
        });
    }

    fn wait_event_of(&self, bytes: &[u8]) {
        let wanted = uid(bytes);
        wait_for(&format!("an event for {wanted}"), LONG, || {
            self.events().iter().any(|e| e.card_uid == wanted)
        });
    }

    fn uids(&self) -> Vec<CardUid> {
        self.events().iter().map(|e| e.card_uid).collect()
    }
}

#[test]
fn pcsc_two_cards_presented_for_a_second_each_are_one_event_each_with_the_right_uid() {
    let _pcsc = setup();
    let mut gate = Gate::start("ledger-pcsc-two");
    gate.wait_state("ok");
    assert_eq!(gate.reader()["device"], SLOT_0.reader);

    present(&UID4, Duration::from_secs(1));
    gate.wait_event_of(&UID4);
    present(&UID7, Duration::from_secs(1));
    gate.wait_event_of(&UID7);

    // A card lying for a second is read about five times; the second card's event marks
    // the end, so nothing more of the first can still be on its way.
    let events = gate.events();
    assert_eq!(gate.uids(), vec![uid(&UID4), uid(&UID7)], "{events:?}");
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    for e in &events {
        assert_eq!(e.reader, "turnstile");
        assert_eq!(e.direction.as_str(), "in");
    }
    assert_eq!(gate.daemon.terminate(), Some(0));
}

#[test]
fn pcsc_waved_card_is_one_tap_and_the_hold_steady_hint() {
    let _pcsc = setup();
    let mut gate = Gate::start_with("ledger-pcsc-wave", WAVING);
    gate.wait_state("ok");

    // Five passes through the field: the first is read, the other four leave while the
    // reader is still reading them. pcscd looks at vpcd's slot every 400 ms, so a pass here
    // lasts until the reader has touched the card and pcscd has seen it go: five passes
    // take about 4 s instead of the one second a hand needs (see `pcsc_config_waving`).
    let started = Instant::now();
    let first = insert(CardBehaviour::uid(&UID4));
    wait_for("the first pass to be read", LONG, || first.apdus() >= 1);
    first.remove();
    assert!(wait_slot_empty(SLOT_0), "pcscd sees the card go");
    for _ in 0..4 {
        let pass = insert(CardBehaviour::LeaveMidRead);
        wait_for("the reader to touch the card", LONG, || pass.is_gone());
        drop(pass);
        assert!(wait_slot_empty(SLOT_0), "pcscd sees the card go");
    }
    let waving = started.elapsed();
    wait_for("the hold_steady hint", LONG, || {
        gate.sub
            .json_on(&gate.reader_topic())
            .iter()
            .any(|v| v["hint"] == "hold_steady")
    });
    eprintln!("five passes took {waving:?}");
    assert!(wait_slot_empty(SLOT_0));

    // Another card marks the end: everything of the waving has been processed before it.
    present(&UID7, Duration::from_millis(600));
    gate.wait_event_of(&UID7);
    assert_eq!(
        gate.uids(),
        vec![uid(&UID4), uid(&UID7)],
        "one tap for the waving"
    );
    assert!(gate.daemon.is_running());
    assert_eq!(gate.daemon.terminate(), Some(0));
}

#[test]
fn pcsc_card_removed_in_the_middle_of_the_read_is_no_event_and_no_crash() {
    let _pcsc = setup();
    let mut gate = Gate::start("ledger-pcsc-midread");
    gate.wait_state("ok");

    let card = insert(CardBehaviour::LeaveMidRead);
    wait_for("the card to leave during the read", LONG, || card.is_gone());
    drop(card);
    assert!(wait_slot_empty(SLOT_0), "pcscd sees the card go");

    present(&UID4, Duration::from_millis(600));
    gate.wait_event_of(&UID4);
    assert_eq!(gate.uids(), vec![uid(&UID4)], "only the card that was read");
    assert!(gate.daemon.is_running(), "no crash");
    assert_eq!(gate.daemon.terminate(), Some(0));
}

#[test]
fn pcsc_pcscd_killed_and_restarted_the_reader_comes_back_by_itself() {
    let mut pcsc = setup();
    let mut gate = Gate::start("ledger-pcsc-restart");
    gate.wait_state("ok");
    present(&UID4, Duration::from_millis(600));
    gate.wait_event_of(&UID4);

    pcsc.kill_pcscd().expect("pcscd killed");
    gate.wait_state("recovering");
    assert!(
        gate.reader()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("pcscd")),
        "says what is wrong: {}",
        gate.reader()
    );
    let restarted = Instant::now();
    pcsc.start_pcscd().expect("pcscd restarted");
    gate.wait_state("ok");
    let back = restarted.elapsed();
    present(&UID7, Duration::from_millis(600));
    gate.wait_event_of(&UID7);
    eprintln!(
        "reader ok {back:?} after pcscd restarted, next card's event {:?} after",
        restarted.elapsed()
    );
    assert!(
        gate.reader()["recoveries"].as_u64() >= Some(1),
        "{}",
        gate.reader()
    );
    assert_eq!(gate.uids(), vec![uid(&UID4), uid(&UID7)]);
    assert!(gate.daemon.is_running(), "no daemon restart");
    assert_eq!(gate.daemon.terminate(), Some(0));
}

#[test]
fn pcsc_daemon_started_before_pcscd_waits_then_works() {
    let mut pcsc = setup();
    pcsc.kill_pcscd().expect("pcscd stopped");
    let mut gate = Gate::start("ledger-pcsc-early");
    // The retained state may first show the reader absent before its driver has said
    // anything; what counts is that it soon says why.
    wait_for("the reader absent, saying why", LONG, || {
        gate.reader_state() == "absent"
            && gate.reader()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("pcscd is not running"))
    });
    pcsc.start_pcscd().expect("pcscd started");
    gate.wait_state("ok");
    assert!(wait_slot_empty(SLOT_0));
    present(&UID7, Duration::from_millis(600));
    gate.wait_event_of(&UID7);
    assert_eq!(gate.uids(), vec![uid(&UID7)]);
    assert_eq!(gate.daemon.terminate(), Some(0));
}

#[test]
fn pcsc_readers_command_lists_vpcd_and_says_plainly_when_pcscd_is_not_running() {
    let mut pcsc = setup();
    let (code, out, err) = id06d(&["readers"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(SLOT_0.reader), "{out}");
    assert!(out.contains("Serial ports"), "{out}");
    pcsc.kill_pcscd().expect("pcscd stopped");
    let (code, out, err) = id06d(&["readers"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pcscd is not running"), "{out}");
    assert!(!out.contains(SLOT_0.reader), "{out}");
    pcsc.start_pcscd().expect("pcscd started");
}

/// The LED and buzzer commands (`FF 00 40 …`) the card's reader was sent.
fn led_commands(card: &VirtualCard) -> Vec<Vec<u8>> {
    card.received_apdus()
        .into_iter()
        .filter(|a| a.starts_with(&[0xFF, 0x00, 0x40]))
        .collect()
}

#[test]
fn pcsc_acr122_feedback_green_and_one_beep_for_a_granted_tap() {
    let _pcsc = setup();
    let gate = Gate::start_with("ledger-pcsc-acr-green", "feedback = \"acr122\"\n");
    gate.wait_state("ok");
    let card = insert(CardBehaviour::uid(&UID7));
    gate.wait_event_of(&UID7);
    wait_for("the LED and buzzer command", LONG, || {
        !led_commands(&card).is_empty()
    });
    assert_eq!(
        led_commands(&card),
        vec![vec![0xFF, 0x00, 0x40, 0xA0, 0x04, 0x05, 0x01, 0x01, 0x01]],
        "green once with one beep, after the GET DATA that read the card"
    );
    card.remove();
}

#[test]
fn pcsc_acr122_feedback_red_and_three_beeps_for_a_denied_tap() {
    let _pcsc = setup();
    // Only the site's allow list may pass, and it is empty: every tap is denied.
    let gate = Gate::start_with(
        "ledger-pcsc-acr-red",
        "feedback = \"acr122\"\n\n[access]\nmode = \"site_list\"\n",
    );
    gate.wait_state("ok");
    let card = insert(CardBehaviour::uid(&UID4));
    gate.wait_event_of(&UID4);
    wait_for("the LED and buzzer command", LONG, || {
        !led_commands(&card).is_empty()
    });
    assert_eq!(
        led_commands(&card),
        vec![vec![0xFF, 0x00, 0x40, 0x50, 0x04, 0x02, 0x02, 0x03, 0x01]],
        "red three times with three beeps"
    );
    assert_eq!(
        gate.events()[0].reason.map(|r| r.as_str()),
        Some("not_on_site_list")
    );
    card.remove();
}
