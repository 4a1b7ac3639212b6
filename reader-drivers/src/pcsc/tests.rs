//! The driver against a real pcscd with vpcd, the test playing the card (`crate::vpcd_card`).
//!
//! Each test runs in a sandbox of its own ([`sandbox`]: private mount and network
//! namespaces, its own pcscd, vpcd and loopback), so the ones that kill pcscd kill only
//! theirs, and nothing outlives the test.

use super::*;
use crate::vpcd_card::{
    pcscd_answers, sandbox, wait_slot_empty, wait_until, CardBehaviour, PcscSandbox, VirtualCard,
    SLOT_0,
};
use crate::ReaderMessage;
use id06_protocol::CardUid;

const WAIT: Duration = Duration::from_secs(10);
const UID4: [u8; 4] = [0x04, 0xA1, 0xB2, 0xC3];
const UID7: [u8; 7] = [0x04, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66];

fn uid(bytes: &[u8]) -> CardUid {
    CardUid::from_bytes(bytes).unwrap()
}

fn card(bytes: &[u8]) -> Report {
    Report::Observed(Observation::Card(uid(bytes)))
}

fn is_health(r: &Report, wanted: ReaderState) -> bool {
    matches!(r, Report::Health { state, .. } if *state == wanted)
}

/// The driver on its own runtime, its reports collected for the test to wait on.
struct Driver {
    rt: tokio::runtime::Runtime,
    reports: Arc<Mutex<Vec<Report>>>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), SinkClosed>>>,
    name: String,
}

impl Driver {
    fn start(name: &str, options: PcscOptions) -> Driver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ReaderMessage>(64);
        let reports = Arc::new(Mutex::new(Vec::new()));
        let collected = reports.clone();
        rt.spawn(async move {
            while let Some(m) = rx.recv().await {
                collected.lock().unwrap().push(m.report);
            }
        });
        let shutdown = CancellationToken::new();
        let sink = ReaderSink::new(0, tx);
        let (n, s) = (name.to_string(), shutdown.clone());
        let task = rt.spawn(async move { run(&n, options, sink, s).await });
        Driver {
            rt,
            reports,
            shutdown,
            task: Some(task),
            name: name.into(),
        }
    }

    /// The driver watching vpcd's first reader.
    fn on_slot0(name: &str) -> Driver {
        Driver::start(name, PcscOptions::new(SLOT_0.reader))
    }

    fn reports(&self) -> Vec<Report> {
        self.reports.lock().unwrap().clone()
    }

    /// How many reports so far (a mark to look at what came after).
    fn mark(&self) -> usize {
        self.reports.lock().unwrap().len()
    }

    fn since(&self, mark: usize) -> Vec<Report> {
        self.reports()[mark..].to_vec()
    }

    /// Waits until a report after `mark` satisfies `pred`; returns its index.
    fn wait_for(&self, what: &str, mark: usize, pred: impl Fn(&Report) -> bool) -> usize {
        let mut found = None;
        let ok = wait_until(WAIT, || {
            found = self.reports()[mark..]
                .iter()
                .position(&pred)
                .map(|i| i + mark);
            found.is_some()
        });
        assert!(
            ok,
            "timed out after {WAIT:?} waiting for {what}; reports since the mark: {:#?}",
            self.since(mark)
        );
        found.unwrap_or_default()
    }

    fn wait_ok(&self, mark: usize) -> usize {
        self.wait_for("health ok", mark, |r| is_health(r, ReaderState::Ok))
    }

    /// Stops the driver; whether `run` returned within `within`.
    fn stop(&mut self, within: Duration) -> bool {
        self.shutdown.cancel();
        let Some(task) = self.task.take() else {
            return true;
        };
        self.rt
            .block_on(async { tokio::time::timeout(within, task).await })
            .is_ok()
    }

    fn thread_running(&self) -> bool {
        let wanted = format!("pcsc-{}", self.name);
        let wanted = &wanted[..wanted.len().min(15)];
        std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks.filter_map(|t| t.ok()).any(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == wanted)
                })
            })
            .unwrap_or(false)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

fn setup() -> PcscSandbox {
    let lock = sandbox().expect("a pcscd of this test's own");
    assert!(
        wait_slot_empty(SLOT_0),
        "pcscd still reports a card in {} from an earlier test",
        SLOT_0.reader
    );
    lock
}

fn insert(behaviour: CardBehaviour) -> VirtualCard {
    VirtualCard::insert(SLOT_0, behaviour).expect("vpcd accepts the virtual card")
}

#[test]
fn a_presented_card_is_reported_with_device_ok_and_its_4_byte_uid() {
    let _pcsc = setup();
    let d = Driver::on_slot0("present");
    let ok = d.wait_ok(0);
    let before_ok = d.reports()[..ok].to_vec();
    assert!(
        before_ok.contains(&Report::Device(SLOT_0.reader.into())),
        "the reader's name comes before ok: {before_ok:?}"
    );
    let mark = d.mark();
    let c = insert(CardBehaviour::uid(&UID4));
    let at = d.wait_for("the card", mark, |r| {
        matches!(
            r,
            Report::Observed(Observation::Card(_) | Observation::Partial)
        )
    });
    assert_eq!(
        d.reports()[at],
        card(&UID4),
        "the first observation is the card"
    );
    c.remove();
    d.wait_for("no card", at, |r| {
        *r == Report::Observed(Observation::NoCard)
    });
}

#[test]
fn a_7_byte_uid_is_read_completely() {
    let _pcsc = setup();
    let d = Driver::on_slot0("uid7");
    d.wait_ok(0);
    let c = insert(CardBehaviour::uid(&UID7));
    d.wait_for("the 7-byte card", 0, |r| *r == card(&UID7));
    drop(c);
    assert!(
        !d.reports()
            .iter()
            .any(|r| matches!(r, Report::Observed(Observation::Card(u)) if *u != uid(&UID7))),
        "no other UID: {:?}",
        d.reports()
    );
}

#[test]
fn two_cards_one_after_the_other_are_both_read() {
    let _pcsc = setup();
    let d = Driver::on_slot0("two");
    d.wait_ok(0);
    let a = insert(CardBehaviour::uid(&UID4));
    let first = d.wait_for("card A", 0, |r| *r == card(&UID4));
    a.remove();
    let gone = d.wait_for("A gone", first, |r| {
        *r == Report::Observed(Observation::NoCard)
    });
    let b = insert(CardBehaviour::uid(&UID7));
    let second = d.wait_for("card B", gone, |r| *r == card(&UID7));
    b.remove();
    d.wait_for("B gone", second, |r| {
        *r == Report::Observed(Observation::NoCard)
    });
    let after_a_left = d.reports()[gone..].to_vec();
    assert!(
        !after_a_left.contains(&card(&UID4)),
        "A is not reported after it left: {after_a_left:?}"
    );
}

#[test]
fn a_card_left_in_the_field_is_read_again_until_it_leaves() {
    let _pcsc = setup();
    let d = Driver::on_slot0("lying");
    d.wait_ok(0);
    let c = insert(CardBehaviour::uid(&UID4));
    let first = d.wait_for("the card", 0, |r| *r == card(&UID4));
    // The debouncer ends a presentation after gone_ms without a read: the driver must
    // keep reading a card that stays.
    let reads = || d.reports().iter().filter(|r| **r == card(&UID4)).count();
    assert!(
        wait_until(WAIT, || reads() >= 3),
        "read again and again: {:?}",
        d.reports()
    );
    let third = d.mark();
    assert!(c.apdus() >= 3, "each report is a real read: {}", c.apdus());
    let between = d.reports()[first..third].to_vec();
    assert!(
        !between.contains(&Report::Observed(Observation::NoCard)),
        "no NoCard while the card lies there: {between:?}"
    );
    c.remove();
    d.wait_for("no card", third, |r| {
        *r == Report::Observed(Observation::NoCard)
    });
}

#[test]
fn a_6c_answer_is_retried_with_the_length_it_asks_for() {
    let _pcsc = setup();
    let d = Driver::on_slot0("6c");
    d.wait_ok(0);
    let c = insert(CardBehaviour::WrongLengthFirst(UID7.to_vec()));
    let at = d.wait_for("the card", 0, |r| {
        matches!(
            r,
            Report::Observed(Observation::Card(_) | Observation::Partial)
        )
    });
    assert_eq!(d.reports()[at], card(&UID7), "read completely at once");
    assert!(c.apdus() >= 2, "asked twice: {}", c.apdus());
}

#[test]
fn failed_reads_6a81_and_6300_are_partial_never_card() {
    let _pcsc = setup();
    for (sw1, sw2) in [(0x6A, 0x81), (0x63, 0x00)] {
        let d = Driver::on_slot0("sw");
        d.wait_ok(0);
        let c = insert(CardBehaviour::Status(sw1, sw2));
        d.wait_for("a partial read", 0, |r| {
            *r == Report::Observed(Observation::Partial)
        });
        c.remove();
        d.wait_for("no card", 0, |r| {
            *r == Report::Observed(Observation::NoCard)
        });
        let reports = d.reports();
        assert!(
            !reports
                .iter()
                .any(|r| matches!(r, Report::Observed(Observation::Card(_)))),
            "{sw1:02X}{sw2:02X} is never a card: {reports:?}"
        );
    }
}

#[test]
fn a_card_that_keeps_failing_is_reset_and_the_reader_recovers() {
    let _pcsc = setup();
    let d = Driver::on_slot0("reset");
    let ok = d.wait_ok(0);
    let c = insert(CardBehaviour::Status(0x63, 0x00));
    let recovering = d.wait_for("recovering", ok, |r| {
        matches!(r, Report::Health { state: ReaderState::Recovering, error: Some(e) } if e.contains("resetting"))
    });
    let partials = d.reports()[..recovering]
        .iter()
        .filter(|r| **r == Report::Observed(Observation::Partial))
        .count();
    assert!(partials >= 3, "reset after repeated failures, not at once");
    d.wait_ok(recovering);
    assert!(
        wait_until(WAIT, || c.controls().contains(&0x02)
            || c.controls().iter().filter(|m| **m == 0x00).count() > 0),
        "vpcd was asked to reset or power off the card: {:?}",
        c.controls()
    );
    c.remove();
    d.wait_for("no card", recovering, |r| {
        *r == Report::Observed(Observation::NoCard)
    });
}

#[test]
fn a_card_removed_in_the_middle_of_the_read_is_partial_then_nocard() {
    let _pcsc = setup();
    let d = Driver::on_slot0("midread");
    d.wait_ok(0);
    let c = insert(CardBehaviour::LeaveMidRead);
    let partial = d.wait_for("a partial read", 0, |r| {
        *r == Report::Observed(Observation::Partial)
    });
    d.wait_for("no card", partial, |r| {
        *r == Report::Observed(Observation::NoCard)
    });
    assert!(c.is_gone(), "the card left by itself");
    assert!(
        !d.reports()
            .iter()
            .any(|r| matches!(r, Report::Observed(Observation::Card(_)))),
        "no card read: {:?}",
        d.reports()
    );
    // And the driver is fine: the next card is read.
    let mark = d.mark();
    let next = insert(CardBehaviour::uid(&UID4));
    d.wait_for("the next card", mark, |r| *r == card(&UID4));
    drop(next);
}

#[test]
fn waving_five_times_in_a_second_gives_a_sensible_sequence() {
    let _pcsc = setup();
    let d = Driver::on_slot0("wave");
    let ok = d.wait_ok(0);
    for _ in 0..5 {
        let c = insert(CardBehaviour::uid(&UID4));
        std::thread::sleep(Duration::from_millis(100)); // the wave: the test's action
        c.remove();
        std::thread::sleep(Duration::from_millis(100));
    }
    // The field ends empty.
    d.wait_for("no card after the waves", ok, |r| {
        *r == Report::Observed(Observation::NoCard)
    });
    let settled = wait_until(WAIT, || {
        d.reports()
            .iter()
            .rev()
            .find(|r| matches!(r, Report::Observed(_)))
            == Some(&Report::Observed(Observation::NoCard))
    });
    assert!(settled, "the last observation is NoCard: {:?}", d.reports());
    let observed: Vec<Observation> = d
        .reports()
        .into_iter()
        .filter_map(|r| match r {
            Report::Observed(o) => Some(o),
            _ => None,
        })
        .collect();
    for o in &observed {
        match o {
            Observation::Card(u) => assert_eq!(*u, uid(&UID4), "{observed:?}"),
            Observation::Partial | Observation::NoCard => {}
            Observation::Fault(f) => panic!("no fault while waving: {f} in {observed:?}"),
        }
    }
    for pair in observed.windows(2) {
        assert!(
            !(pair[0] == Observation::NoCard && pair[1] == Observation::NoCard),
            "NoCard is reported once per absence: {observed:?}"
        );
    }
    assert!(
        !d.reports()
            .iter()
            .any(|r| is_health(r, ReaderState::Recovering)),
        "waving is not a reader fault: {:?}",
        d.reports()
    );
    // Still reading.
    let mark = d.mark();
    let c = insert(CardBehaviour::uid(&UID7));
    d.wait_for("a card after the waves", mark, |r| *r == card(&UID7));
    drop(c);
}

#[test]
fn pcscd_killed_and_restarted_recovering_then_ok_and_the_next_card_is_read() {
    let mut pcsc = setup();
    let d = Driver::on_slot0("restart");
    let ok = d.wait_ok(0);
    pcsc.kill_pcscd().expect("kill pcscd");
    let recovering = d.wait_for("recovering", ok, |r| is_health(r, ReaderState::Recovering));
    pcsc.start_pcscd().expect("restart pcscd");
    let back = d.wait_ok(recovering);
    let between = d.reports()[recovering..back].to_vec();
    assert!(
        !between.iter().any(|r| is_health(r, ReaderState::Absent)),
        "a pcscd restart is recovery, not absence: {between:?}"
    );
    let c = insert(CardBehaviour::uid(&UID4));
    d.wait_for("the next card", back, |r| *r == card(&UID4));
    drop(c);
}

#[test]
fn a_driver_started_before_pcscd_says_absent_then_works() {
    let mut pcsc = setup();
    pcsc.kill_pcscd().expect("kill pcscd");
    let d = Driver::on_slot0("early");
    let absent = d.wait_for("absent", 0, |r| is_health(r, ReaderState::Absent));
    match &d.reports()[absent] {
        Report::Health { error: Some(e), .. } => {
            assert!(e.contains("pcscd is not running"), "says why: {e}")
        }
        other => panic!("absent with a reason, got {other:?}"),
    }
    pcsc.start_pcscd().expect("start pcscd");
    let ok = d.wait_ok(absent);
    let c = insert(CardBehaviour::uid(&UID7));
    d.wait_for("the card", ok, |r| *r == card(&UID7));
    drop(c);
}

#[test]
fn a_mute_card_makes_the_reader_recovering_by_its_deadline() {
    let _pcsc = setup();
    let mut options = PcscOptions::new(SLOT_0.reader);
    options.call_deadline = Duration::from_secs(1);
    let d = Driver::start("mute", options);
    let ok = d.wait_ok(0);
    let c = insert(CardBehaviour::Mute);
    let recovering = d.wait_for("recovering while the call hangs", ok, |r| {
        matches!(r, Report::Health { state: ReaderState::Recovering, error: Some(e) } if e.contains("no answer"))
    });
    assert!(
        !c.is_gone(),
        "reported while the card still holds the call, not after"
    );
    c.remove(); // the hung transmit fails now
    let back = d.wait_ok(recovering);
    let next = insert(CardBehaviour::uid(&UID4));
    d.wait_for("the next card", back, |r| *r == card(&UID4));
    drop(next);
}

#[test]
fn no_matching_reader_is_absent_and_names_the_readers_seen() {
    let _pcsc = setup();
    let d = Driver::start("nomatch", PcscOptions::new("ACR122"));
    let absent = d.wait_for("absent", 0, |r| is_health(r, ReaderState::Absent));
    match &d.reports()[absent] {
        Report::Health { error: Some(e), .. } => {
            assert!(
                e.contains("ACR122") && e.contains(SLOT_0.reader),
                "names the pattern and what is there: {e}"
            )
        }
        other => panic!("absent with a reason, got {other:?}"),
    }
    assert!(!d.reports().iter().any(|r| is_health(r, ReaderState::Ok)));
}

#[test]
fn shutdown_cancels_the_wait_and_ends_the_named_thread() {
    let _pcsc = setup();
    let mut d = Driver::on_slot0("stop");
    d.wait_ok(0);
    assert!(
        d.thread_running(),
        "the worker runs on a thread named pcsc-stop"
    );
    assert!(d.stop(Duration::from_secs(3)), "run returns after shutdown");
    assert!(
        wait_until(WAIT, || !d.thread_running()),
        "the worker thread has ended"
    );
}

#[test]
fn list_readers_names_vpcds_readers_and_says_when_pcscd_is_not_running() {
    let mut pcsc = setup();
    let names = list_readers().expect("pcscd answers");
    assert!(
        names.iter().any(|n| n == SLOT_0.reader),
        "lists vpcd: {names:?}"
    );
    pcsc.kill_pcscd().expect("kill pcscd");
    let e = list_readers().expect_err("no pcscd");
    assert!(e.to_string().contains("pcscd is not running"), "{e}");
    pcsc.start_pcscd().expect("start pcscd");
    assert!(pcscd_answers());
}

#[test]
fn a_sandboxed_test_never_touches_a_pcscd_it_did_not_start() {
    // A process called pcscd in the machine's namespaces (a copy of `sleep`, so as not to
    // disturb a real one an installed gateway may run).
    let dir = std::env::temp_dir().join(format!("id06d-fake-pcscd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("pcscd");
    std::fs::copy("/bin/sleep", &fake).unwrap();
    let mut machines = std::process::Command::new(&fake).arg("60").spawn().unwrap();
    // A sandboxed test starts, kills and restarts its own pcscd ...
    let mut pcsc = setup();
    pcsc.kill_pcscd().expect("kill the test's pcscd");
    assert!(!pcscd_answers());
    pcsc.start_pcscd().expect("start it again");
    drop(pcsc);
    // ... and the machine's "pcscd" is still there.
    assert!(
        machines.try_wait().unwrap().is_none(),
        "the machine's pcscd was killed"
    );
    let _ = machines.kill();
    let _ = machines.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
