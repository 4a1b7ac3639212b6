//! The PN532 driver against the emulator over real ptys, and the emulator against libnfc.

use super::emulator::{Emulator, PollAnswer};
use super::{run, Pn532Options};
use crate::{CancellationToken, Observation, ReaderMessage, ReaderSink, Report, SinkClosed};
use id06_protocol::{CardUid, ReaderState};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

fn uid(s: &str) -> CardUid {
    CardUid::parse(s).unwrap()
}

/// Deadlines generous enough for a loaded test machine: these tests are about behaviour,
/// not speed.
fn options(path: &Path) -> Pn532Options {
    let mut o = Pn532Options::new(path, 115_200, Duration::from_millis(20));
    o.ack_timeout = Duration::from_millis(500);
    o.response_timeout = Duration::from_millis(1500);
    o
}

/// A running driver and everything it has reported.
struct Harness {
    rx: mpsc::Receiver<ReaderMessage>,
    seen: Vec<Report>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SinkClosed>>,
}

impl Harness {
    fn start(options: Pn532Options) -> Harness {
        let (tx, rx) = mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            "test",
            options,
            ReaderSink::new(0, tx),
            shutdown.clone(),
        ));
        Harness {
            rx,
            seen: Vec::new(),
            shutdown,
            task,
        }
    }

    /// Waits for a report (after the ones already seen) that satisfies `pred`; returns
    /// its index in `seen`.
    async fn until(&mut self, what: &str, pred: impl Fn(&Report) -> bool) -> usize {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => {
                    self.seen.push(m.report);
                    if pred(self.seen.last().unwrap()) {
                        return self.seen.len() - 1;
                    }
                }
                Ok(None) => panic!(
                    "the driver stopped while waiting for {what}: {:?}",
                    self.seen
                ),
                Err(_) => panic!("timed out waiting for {what}; reports: {:?}", self.seen),
            }
        }
    }

    async fn until_health(&mut self, state: ReaderState) -> usize {
        self.until(
            &format!("health {state:?}"),
            |r| matches!(r, Report::Health { state: s, .. } if *s == state),
        )
        .await
    }

    async fn until_observed(&mut self, o: Observation) -> usize {
        let what = format!("{o:?}");
        self.until(&what, |r| *r == Report::Observed(o.clone()))
            .await
    }

    /// The first `n` observations from index `from` on, waiting for them.
    async fn observations(&mut self, from: usize, n: usize) -> Vec<Observation> {
        loop {
            let got: Vec<Observation> = self.seen[from..]
                .iter()
                .filter_map(|r| match r {
                    Report::Observed(o) => Some(o.clone()),
                    _ => None,
                })
                .take(n)
                .collect();
            if got.len() == n {
                return got;
            }
            self.until("more observations", |r| matches!(r, Report::Observed(_)))
                .await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the driver stops on shutdown");
        assert_eq!(result.expect("the driver does not panic"), Ok(()));
    }
}

fn is_fault(r: &Report) -> bool {
    matches!(r, Report::Observed(Observation::Fault(_)))
}

#[tokio::test]
async fn a_presented_card_is_read_then_released_and_its_absence_seen() {
    let emu = Emulator::start().unwrap();
    let card = uid("04A1B2C3D4E5F6");
    emu.set_card(Some(card));
    let mut h = Harness::start(options(emu.path()));
    let device = h
        .until("the firmware version", |r| matches!(r, Report::Device(_)))
        .await;
    assert_eq!(
        h.seen[device],
        Report::Device("PN532 v1.6 (ISO 14443 A, ISO 14443 B, ISO 18092)".into())
    );
    let ok = h.until_health(ReaderState::Ok).await;
    let read = h.until_observed(Observation::Card(card)).await;
    assert!(device < ok && ok < read);
    emu.set_card(None);
    h.until_observed(Observation::NoCard).await;

    let stats = emu.stats();
    assert!(stats.wake_ups >= 1, "the chip starts asleep: {stats:?}");
    let pos = |code: u8| stats.commands.iter().position(|c| *c == code);
    let (sam, firmware, retries, list, release) =
        (pos(0x14), pos(0x02), pos(0x32), pos(0x4A), pos(0x52));
    assert!(sam < firmware && firmware < retries && retries < list && list < release,
        "wake-up, SAMConfiguration, GetFirmwareVersion, RFConfiguration, InListPassiveTarget, InRelease: {stats:?}");
    assert!(sam.is_some() && release.is_some());
    assert_eq!(stats.nacks, 0);
    assert!(!h.seen.iter().any(is_fault), "{:?}", h.seen);
    h.stop().await;
}

#[tokio::test]
async fn a_waved_card_alternates_reads_absences_and_partial_reads() {
    let emu = Emulator::start().unwrap();
    let card = uid("04A1B2C3D4E5F6");
    emu.script_polls([
        PollAnswer::Card(card),
        PollAnswer::Empty,
        PollAnswer::Card(card),
        PollAnswer::Garbled(card),
        PollAnswer::Truncated(card),
        PollAnswer::Card(card),
        PollAnswer::Empty,
    ]);
    let mut h = Harness::start(options(emu.path()));
    let ok = h.until_health(ReaderState::Ok).await;
    let got = h.observations(ok, 7).await;
    use Observation::*;
    assert_eq!(
        got,
        vec![
            Card(card),
            NoCard,
            Card(card),
            Partial,
            Partial,
            Card(card),
            NoCard
        ]
    );
    // The garbled answer was asked for once more, then given up.
    assert_eq!(emu.stats().nacks, 1);
    assert!(
        !h.seen.iter().any(|r| matches!(
            r,
            Report::Health {
                state: ReaderState::Recovering,
                ..
            }
        )),
        "a waved card is not a lock-up: {:?}",
        h.seen
    );
    h.stop().await;
}

#[tokio::test]
async fn a_locked_up_chip_is_recovered_without_a_restart_and_the_next_card_read() {
    let emu = Emulator::start().unwrap();
    let mut o = options(emu.path());
    o.ack_timeout = Duration::from_millis(150);
    o.response_timeout = Duration::from_millis(300);
    let mut h = Harness::start(o);
    h.until_health(ReaderState::Ok).await;
    h.until_observed(Observation::NoCard).await;

    emu.set_locked_up(true);
    let recovering = h.until_health(ReaderState::Recovering).await;
    // Recovery is retried while the chip stays silent.
    h.until("a second fault", is_fault).await;
    let before = emu.stats();

    let card = uid("04B0B1B2B3B4B5");
    emu.set_card(Some(card));
    emu.set_locked_up(false);
    let ok = h.until_health(ReaderState::Ok).await;
    let read = h.until_observed(Observation::Card(card)).await;
    assert!(recovering < ok && ok < read);
    match &h.seen[recovering] {
        Report::Health { error: Some(e), .. } => assert!(e.contains("no ACK"), "{e}"),
        other => panic!("{other:?}"),
    }
    let after = emu.stats();
    assert!(
        after.wake_ups > before.wake_ups,
        "recovery wakes the chip up"
    );
    assert!(
        after.count(0x14) > before.count(0x14),
        "and configures the SAM again"
    );
    assert!(after.rf_off > before.rf_off, "and cycles the RF field");
    assert!(!h.task.is_finished(), "the driver kept running");
    h.stop().await;
}

#[tokio::test]
async fn noise_split_frames_and_bad_checksums_still_give_the_right_card() {
    let emu = Emulator::start().unwrap();
    let card = uid("08A1B2C3");
    emu.set_card(Some(card));
    emu.set_noise(true);
    emu.set_split(true);
    emu.corrupt_next_responses(3);
    let mut h = Harness::start(options(emu.path()));
    h.until_health(ReaderState::Ok).await;
    let first = h.until_observed(Observation::Card(card)).await;
    // A few more polls through the noise.
    h.until_observed(Observation::Card(card)).await;
    h.until_observed(Observation::Card(card)).await;
    assert_eq!(emu.stats().nacks, 3, "one NACK per corrupted response");
    let observations = h.observations(0, 3).await;
    assert!(
        observations.iter().all(|o| *o == Observation::Card(card)),
        "{observations:?}"
    );
    assert!(
        !h.seen[..first]
            .iter()
            .any(|r| matches!(r, Report::Health { state, .. } if *state != ReaderState::Ok)),
        "{:?}",
        h.seen
    );
    assert!(!h.seen.iter().any(is_fault), "{:?}", h.seen);
    h.stop().await;
}

#[tokio::test]
async fn an_unplugged_adapter_is_absent_and_reopened_when_it_returns() {
    let dir = tempdir();
    let link = dir.join("ttyPN532");
    let first = Emulator::start().unwrap();
    let card = uid("04A1B2C3D4E5F6");
    first.set_card(Some(card));
    std::os::unix::fs::symlink(first.path(), &link).unwrap();
    let mut h = Harness::start(options(&link));
    h.until_observed(Observation::Card(card)).await;

    // Unplug: the pty goes away with the emulator, and so does the device link.
    drop(first);
    std::fs::remove_file(&link).unwrap();
    h.until_health(ReaderState::Absent).await;

    let second = Emulator::start().unwrap();
    let other = uid("04C0C1C2C3C4C5");
    second.set_card(Some(other));
    std::os::unix::fs::symlink(second.path(), &link).unwrap();
    let ok = h.until_health(ReaderState::Ok).await;
    let read = h.until_observed(Observation::Card(other)).await;
    assert!(ok < read);
    h.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_missing_device_is_absent_and_shutdown_stops_the_driver() {
    let dir = tempdir();
    let mut h = Harness::start(options(&dir.join("nothing-here")));
    let absent = h.until_health(ReaderState::Absent).await;
    match &h.seen[absent] {
        Report::Health { error: Some(e), .. } => assert!(e.contains("does not exist"), "{e}"),
        other => panic!("{other:?}"),
    }
    h.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "id06-pn532-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The emulator speaks the real protocol: libnfc's `nfc-list` (Debian `libnfc-bin`), as
/// the reference host, finds the emulated card with its UID.
#[tokio::test]
async fn libnfc_nfc_list_finds_the_emulated_card() {
    let emu = Emulator::start().unwrap();
    let card = uid("04A1B2C3D4E5F6");
    emu.set_card(Some(card));
    let run = tokio::process::Command::new("nfc-list")
        .args(["-t", "1"])
        .env(
            "LIBNFC_DEVICE",
            format!("pn532_uart:{}", emu.path().display()),
        )
        .env("LIBNFC_AUTO_SCAN", "false")
        .env("LIBNFC_INTRUSIVE_SCAN", "false")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("nfc-list finishes")
        .expect("nfc-list runs (Debian package libnfc-bin)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let uid_line = stdout
        .lines()
        .find(|l| l.contains("UID (NFCID1):"))
        .unwrap_or_else(|| panic!("no UID in nfc-list's output:\n{stdout}\n{stderr}"));
    let hex = uid_line.split(':').nth(1).unwrap_or("");
    assert_eq!(CardUid::parse(hex), Ok(card), "{stdout}");
    assert!(
        stdout.contains("1 ISO14443A passive target(s) found"),
        "{stdout}"
    );
    assert!(emu.stats().count(0x4A) >= 1);
}
