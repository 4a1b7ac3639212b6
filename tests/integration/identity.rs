//! An event's identity never lies: streams, no seq reused after damage, a watched data
//! directory. Each test damages the real files of a real daemon the way a failing SD card,
//! a careless operator or a reinstall does, and checks what the ledger and the door saw:
//!
//! - no `(stream, seq)` is ever published for two different taps (on `P/event` or
//!   `P/decision`);
//! - every tap whose decision was published with a seq reaches `P/event`, unless the daemon's
//!   log names it as lost with the damage that lost it;
//! - the log names the damage in one line.

use crate::support::*;
use id06_protocol::{Event, StreamId};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

/// What identifies a tap, whatever id it was published under.
type Tap = (String, String, id06_protocol::UtcMillis);

fn tap_of(e: &Event) -> Tap {
    (e.reader.clone(), e.card_uid.to_string(), e.occurred_at)
}

/// Every `(stream, seq)` published with a seq, and the tap it named; panics if one names two.
fn identities(sub: &Subscriber, p: &str) -> BTreeMap<(StreamId, u64), Tap> {
    let mut seen: BTreeMap<(StreamId, u64), Tap> = BTreeMap::new();
    for topic in ["event", "decision"] {
        for e in sub.events(&format!("{p}/{topic}")) {
            if e.seq == 0 {
                continue;
            }
            assert_eq!(
                e.event_id,
                Event::event_id_for(&e.site_id, &e.terminal_id, &e.stream, e.seq)
            );
            let tap = tap_of(&e);
            if let Some(before) = seen.insert((e.stream, e.seq), tap.clone()) {
                assert_eq!(
                    before, tap,
                    "seq {} of stream {} was published for two different taps",
                    e.seq, e.stream
                );
            }
        }
    }
    seen
}

/// Decisions published with a seq whose event has not reached `P/event`.
fn undelivered(sub: &Subscriber, p: &str) -> BTreeSet<(StreamId, u64)> {
    let delivered: BTreeSet<(StreamId, u64)> = sub
        .events(&format!("{p}/event"))
        .iter()
        .map(|e| (e.stream, e.seq))
        .collect();
    sub.events(&format!("{p}/decision"))
        .iter()
        .filter(|d| d.seq > 0)
        .map(|d| (d.stream, d.seq))
        .filter(|k| !delivered.contains(k))
        .collect()
}

/// Waits until every decision published with a seq has its event, or only `allowed` ones
/// are missing; returns what is missing.
fn wait_delivered(
    sub: &Subscriber,
    p: &str,
    allowed: impl Fn(&(StreamId, u64)) -> bool,
) -> BTreeSet<(StreamId, u64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let missing = undelivered(sub, p);
        if missing.iter().all(&allowed) {
            return missing;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "decisions published with a seq whose event never arrived: {:?}",
            missing.iter().filter(|k| !allowed(k)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn decided(sub: &Subscriber, p: &str) -> usize {
    sub.on(&format!("{p}/decision")).len()
}

fn streams(sub: &Subscriber, p: &str) -> Vec<StreamId> {
    let mut out: Vec<StreamId> = Vec::new();
    for e in sub.events(&format!("{p}/decision")) {
        if out.last() != Some(&e.stream) && !out.contains(&e.stream) {
            out.push(e.stream);
        }
    }
    out
}

/// A gateway tapping a new card every 30 ms on three readers, a ledger on `P/#`.
struct Rig {
    dir: tempfile::TempDir,
    broker: LocalBroker,
    config: TestConfig,
    sub: Subscriber,
    p: String,
}

impl Rig {
    fn new(name: &str) -> Rig {
        let dir = scratch();
        let broker = broker(dir.path());
        let config = stream_config(dir.path(), &broker.url(), 120, 30, "");
        let p = config.base();
        let sub = Subscriber::start(
            broker.port,
            &format!("ledger-{name}"),
            &[&format!("{p}/event"), &format!("{p}/decision")],
        );
        Rig {
            dir,
            broker,
            config,
            sub,
            p,
        }
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the daemon and lets it decide `n` more taps.
    fn run(&self, n: usize) -> Daemon {
        let before = decided(&self.sub, &self.p);
        let daemon = Daemon::start(&self.config);
        wait_for(
            &format!("{n} more decisions"),
            Duration::from_secs(30),
            || decided(&self.sub, &self.p) >= before + n,
        );
        daemon
    }

    /// Runs the daemon and kills it with -9 while it taps, at a moment its log holds
    /// records (the first record of a checkpoint's log is what some cases damage).
    fn crash_mid_burst(&self) {
        for _ in 0..20 {
            // Past the first checkpoints (every 2 s), so that the mark and the database hold
            // taps too.
            let mut daemon = self.run(300);
            daemon.kill9();
            let wal = std::fs::read(self.data().join("outbox.wal")).unwrap();
            if wal[..16].iter().any(|b| *b != 0) {
                return;
            }
        }
        panic!("the log was empty at every kill");
    }

    /// Runs the daemon after the damage until it has decided more taps, stops it cleanly
    /// and returns its log.
    fn recover(&self) -> String {
        let mut daemon = self.run(30);
        assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_text());
        let log = daemon.log_text();
        // What the start said about the damage, for whoever reads the test's output.
        for line in log.lines().filter(|l| {
            (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains("outbox")
                || l.contains("stream")
        }) {
            eprintln!("  {line}");
        }
        log
    }
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x5A;
    std::fs::write(path, &bytes).unwrap();
}

/// The seqs a log line names as lost: `… held seqs A–B of stream S …` (or `seq A`).
fn named_lost(log: &str) -> Vec<(StreamId, u64, u64)> {
    let mut out = Vec::new();
    for line in log.lines().filter(|l| l.contains(" held seq")) {
        let after = line.split(" held seq").nth(1).unwrap_or("");
        let after = after.trim_start_matches('s').trim_start();
        let range: String = after.split_whitespace().next().unwrap_or("").into();
        let stream = after
            .split("of stream ")
            .nth(1)
            .and_then(|s| s.get(..36))
            .and_then(|s| s.parse().ok());
        let mut bounds = range.split('–').filter_map(|n| n.parse::<u64>().ok());
        if let (Some(stream), Some(a)) = (stream, bounds.next()) {
            out.push((stream, a, bounds.next().unwrap_or(a)));
        }
    }
    out
}

#[test]
fn a_recreated_data_directory_is_a_new_stream_and_no_event_id_repeats() {
    let rig = Rig::new("reinstall");
    let mut daemon = rig.run(20);
    assert_eq!(daemon.terminate(), Some(0));
    std::fs::remove_dir_all(rig.data()).unwrap();
    let log = rig.recover();
    assert!(log.contains("a new data directory"), "{log}");
    identities(&rig.sub, &rig.p);
    assert!(wait_delivered(&rig.sub, &rig.p, |_| false).is_empty());
    let events = rig.sub.events(&format!("{}/event", rig.p));
    let streams: BTreeSet<StreamId> = events.iter().map(|e| e.stream).collect();
    assert_eq!(streams.len(), 2, "two runs, two streams");
    let ids: BTreeSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let (first, _) = check_delivery(
        &events
            .iter()
            .filter(|e| Some(&e.stream) == streams.iter().next())
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert!(first.contains_key(&1));
    assert_eq!(
        ids.len(),
        events
            .iter()
            .map(|e| (e.stream, e.seq))
            .collect::<BTreeSet<_>>()
            .len(),
        "every event_id is distinct"
    );
    // Both streams start at 1 and have no gap.
    for s in &streams {
        let seqs: BTreeSet<u64> = events
            .iter()
            .filter(|e| e.stream == *s)
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect(), "stream {s}");
    }
}

#[test]
fn a_flipped_byte_in_the_first_log_record_is_named_and_the_stream_goes_on() {
    let rig = Rig::new("flip");
    rig.crash_mid_burst();
    flip(&rig.data().join("outbox.wal"), 16 + 9);
    let log = rig.recover();
    let lost = named_lost(&log);
    assert!(
        log.contains("outbox.wal: bytes 0–") && log.contains("are damaged"),
        "{log}"
    );
    assert!(!log.contains("starting a new stream"), "{log}");
    assert_eq!(streams(&rig.sub, &rig.p).len(), 1);
    identities(&rig.sub, &rig.p);
    wait_delivered(&rig.sub, &rig.p, |(s, seq)| {
        lost.iter()
            .any(|(ls, a, b)| ls == s && (a..=b).contains(&seq))
    });
}

#[test]
fn a_log_cut_to_nothing_starts_a_new_stream() {
    let rig = Rig::new("cut");
    rig.crash_mid_burst();
    let old = streams(&rig.sub, &rig.p)[0];
    std::fs::OpenOptions::new()
        .write(true)
        .open(rig.data().join("outbox.wal"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let log = rig.recover();
    assert!(log.contains("outbox.wal was cut to 0 bytes"), "{log}");
    assert!(log.contains("starting a new stream"), "{log}");
    // What may be lost: the old stream's taps after the seq the line names.
    let after: u64 = log
        .split("taps recorded after seq ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the line names the last seq it is sure of");
    let s = streams(&rig.sub, &rig.p);
    assert_eq!(s.len(), 2, "a new stream");
    identities(&rig.sub, &rig.p);
    let missing = wait_delivered(&rig.sub, &rig.p, |(s, seq)| *s == old && *seq > after);
    eprintln!(
        "cut log: {} decided taps after seq {after} were lost",
        missing.len()
    );
    // The new stream starts at 1.
    let new: BTreeSet<u64> = rig
        .sub
        .events(&format!("{}/event", rig.p))
        .iter()
        .filter(|e| e.stream == s[1])
        .map(|e| e.seq)
        .collect();
    assert_eq!(new.iter().next(), Some(&1));
}

#[test]
fn garbage_in_the_acknowledgement_log_only_means_redeliveries() {
    let rig = Rig::new("acks");
    rig.crash_mid_burst();
    let acks = rig.data().join("outbox.acks");
    let len = std::fs::metadata(&acks).unwrap().len().max(64) as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
    std::fs::write(&acks, &garbage).unwrap();
    let log = rig.recover();
    assert!(
        log.contains(&format!("outbox.acks: {len} bytes from byte 0")),
        "{log}"
    );
    assert!(!log.contains("starting a new stream"), "{log}");
    assert_eq!(streams(&rig.sub, &rig.p).len(), 1);
    identities(&rig.sub, &rig.p);
    assert!(wait_delivered(&rig.sub, &rig.p, |_| false).is_empty());
}

#[test]
fn a_database_damaged_after_a_clean_stop_never_gives_a_seq_twice() {
    let rig = Rig::new("sled");
    let mut daemon = rig.run(60);
    assert_eq!(daemon.terminate(), Some(0));
    let db = rig.data().join("db").join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    let at = (len / 2) & !4095;
    let mut bytes = std::fs::read(&db).unwrap();
    for b in &mut bytes[at as usize..(at as usize + 4096).min(len as usize)] {
        *b = 0xA7;
    }
    std::fs::write(&db, &bytes).unwrap();
    let before = decided(&rig.sub, &rig.p);
    let mut daemon = Daemon::start(&rig.config);
    // sled either refuses its files (then the daemon says so and stops) or opens with less.
    wait_for(
        "the daemon to start or refuse",
        Duration::from_secs(20),
        || !daemon.is_running() || daemon.log_text().contains("id06d starting"),
    );
    if !daemon.is_running() {
        let log = daemon.log_text();
        assert!(log.contains("damaged"), "{log}");
        eprintln!(
            "sled refused its damaged files: {}",
            log.lines().last().unwrap_or("")
        );
        // The operator moves the database away; the mark keeps the stream going.
        std::fs::rename(rig.data().join("db"), rig.dir.path().join("db.damaged")).unwrap();
    } else {
        wait_for("new decisions", Duration::from_secs(20), || {
            decided(&rig.sub, &rig.p) >= before + 10
        });
        assert_eq!(daemon.terminate(), Some(0));
        let log = daemon.log_text();
        if log.contains("outbox.mark says") {
            eprintln!(
                "sled opened with less: {}",
                log.lines()
                    .find(|l| l.contains("outbox.mark says"))
                    .unwrap_or("")
            );
        }
    }
    rig.recover();
    assert_eq!(
        streams(&rig.sub, &rig.p).len(),
        1,
        "the mark keeps the stream"
    );
    identities(&rig.sub, &rig.p);
    assert!(wait_delivered(&rig.sub, &rig.p, |_| false).is_empty());
}

#[test]
fn a_removed_database_with_the_log_kept_goes_on_with_the_stream() {
    let rig = Rig::new("nodb");
    rig.crash_mid_burst();
    std::fs::remove_dir_all(rig.data().join("db")).unwrap();
    let log = rig.recover();
    assert!(log.contains("the database in db/ holds no outbox"), "{log}");
    assert!(!log.contains("starting a new stream"), "{log}");
    assert_eq!(streams(&rig.sub, &rig.p).len(), 1);
    identities(&rig.sub, &rig.p);
    // The log's records (everything since the last checkpoint) are replayed; what was
    // checkpointed into the removed database and not yet delivered is gone, as the line says.
    wait_delivered(&rig.sub, &rig.p, |_| {
        log.contains("those not yet delivered are lost")
    });
}

#[test]
fn a_data_directory_removed_while_running_stops_the_daemon() {
    let rig = Rig::new("rmrf");
    let status = Subscriber::start(
        rig.broker.port,
        "monitor-rmrf",
        &[&format!("{}/status", rig.p)],
    );
    let mut daemon = rig.run(30);
    std::fs::remove_dir_all(rig.data()).unwrap();
    // The last decisions before the removal: none after it may carry a seq that was not
    // stored (checked below: every decision with a seq has its event).
    let gone = std::time::Instant::now();
    wait_for("the daemon to stop", Duration::from_secs(10), || {
        !daemon.is_running()
    });
    eprintln!("stopped {:?} after the removal", gone.elapsed());
    let log = daemon.log_text();
    assert!(
        log.contains("THE DATA DIRECTORY IS GONE OR UNUSABLE"),
        "{log}"
    );
    assert_ne!(daemon.exit_code(), Some(0));
    assert!(
        status
            .json_on(&format!("{}/status", rig.p))
            .iter()
            .any(|s| s.get("storage_error").is_some()),
        "storage_error on P/status"
    );
    identities(&rig.sub, &rig.p);
    assert!(wait_delivered(&rig.sub, &rig.p, |_| false).is_empty());
    // Started again it makes a new data directory and a new stream.
    let log = rig.recover();
    assert!(log.contains("a new data directory"), "{log}");
    assert_eq!(streams(&rig.sub, &rig.p).len(), 2);
    identities(&rig.sub, &rig.p);
}

/// The data directory's file system turns read-only while the daemon runs, as one does
/// after I/O errors: the test filesystem (`support/lossyfs.rs`, a real FUSE mount) starts
/// refusing every change with EROFS. (`mount -o remount,ro` itself is refused by the kernel
/// while files are open for writing.)
#[test]
fn a_data_directory_turning_read_only_while_running_stops_the_daemon() {
    let dir = scratch();
    let broker = broker(dir.path());
    let config = stream_config(dir.path(), &broker.url(), 120, 30, "");
    let (disk, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
    std::fs::create_dir_all(disk.join("data")).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    std::os::unix::fs::symlink(mnt.join("data"), dir.path().join("data")).unwrap();
    let mount = LossyMount::mount(&disk, &mnt)
        .expect("mount the test filesystem (needs root and /dev/fuse)");
    let p = config.base();
    let sub = Subscriber::start(
        broker.port,
        "ledger-ro",
        &[
            &format!("{p}/event"),
            &format!("{p}/decision"),
            &format!("{p}/status"),
        ],
    );
    let mut daemon = Daemon::start(&config);
    wait_for("taps", Duration::from_secs(20), || decided(&sub, &p) >= 30);
    mount.handle.set_read_only(true);
    let turned = std::time::Instant::now();
    wait_for("the daemon to stop", Duration::from_secs(10), || {
        !daemon.is_running()
    });
    eprintln!(
        "stopped {:?} after the file system turned read-only",
        turned.elapsed()
    );
    let log = daemon.log_text();
    assert!(
        log.contains("THE DATA DIRECTORY IS GONE OR UNUSABLE"),
        "{log}"
    );
    assert_eq!(
        log.matches("THE DATA DIRECTORY IS GONE OR UNUSABLE")
            .count(),
        1,
        "one line"
    );
    assert_ne!(daemon.exit_code(), Some(0));
    assert!(
        sub.json_on(&format!("{p}/status"))
            .iter()
            .any(|s| s.get("storage_error").is_some()),
        "storage_error on P/status"
    );
    // Writable again, it goes on with the same stream; nothing decided with a seq is missing.
    mount.handle.set_read_only(false);
    let before = decided(&sub, &p);
    let mut daemon = Daemon::start(&config);
    wait_for("more taps", Duration::from_secs(20), || {
        decided(&sub, &p) >= before + 30
    });
    assert_eq!(daemon.terminate(), Some(0));
    assert!(!daemon.log_text().contains("starting a new stream"));
    assert_eq!(streams(&sub, &p).len(), 1);
    identities(&sub, &p);
    assert!(wait_delivered(&sub, &p, |_| false).is_empty());
    drop(mount);
}
