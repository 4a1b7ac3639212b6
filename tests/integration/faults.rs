//! Zero loss under faults (contract §8): a continuous stream of taps through the real daemon and
//! a real mosquitto while things break for real — `kill -9` of the daemon, broker restarts
//! and a long outage, refused credentials, a full disk — and bad input that must not hurt.
//!
//! `ID06D_SOAK_SECS` makes the chaos run last that long (default 25 s);
//! `ID06D_CHAOS_SEED` repeats a fault schedule.

use crate::support::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[test]
fn chaos_kill_9_and_broker_restarts_lose_no_tap() {
    let soak = std::env::var("ID06D_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25u64);
    let dir = scratch();
    let mut broker = broker(dir.path());
    // Enough timeline for the whole run: restarted daemons replay it from the start.
    let config = stream_config(dir.path(), &broker.url(), soak + 30, 90, "");
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-chaos", &[&format!("{p}/event")]);
    let mut rng = Rng::from_env_or_time();
    let mut daemon = Daemon::start(&config);
    let (mut crashes, mut broker_restarts, mut long_outages) = (0, 0, 0);
    let start = Instant::now();
    let mut long_outage_done = false;
    while start.elapsed() < Duration::from_secs(soak) {
        std::thread::sleep(rng.millis(300, 2500)); // a random moment in the stream
        match rng.next() % 3 {
            0 => {
                daemon.kill9();
                crashes += 1;
                std::thread::sleep(rng.millis(0, 400));
                daemon = Daemon::start(&config);
            }
            1 => {
                broker.stop();
                broker_restarts += 1;
                std::thread::sleep(rng.millis(100, 1500));
                broker.restart().expect("broker restarts");
            }
            _ if !long_outage_done && start.elapsed() > Duration::from_secs(soak / 3) => {
                // A long stretch without a broker while taps go on.
                long_outage_done = true;
                long_outages += 1;
                broker.stop();
                std::thread::sleep(Duration::from_secs(6));
                broker.restart().expect("broker restarts");
            }
            _ => {
                // Both at once: the daemon dies while the broker is away.
                broker.stop();
                daemon.kill9();
                crashes += 1;
                broker_restarts += 1;
                daemon = Daemon::start(&config);
                std::thread::sleep(rng.millis(100, 1000));
                broker.restart().expect("broker restarts");
            }
        }
    }
    assert!(
        daemon.is_running(),
        "the daemon must survive every broker fault"
    );
    // Stop cleanly. Whatever the last fault left undelivered goes out on the next start:
    // start again until a clean stop finds the outbox empty.
    let mut last;
    let mut runs = 0;
    loop {
        daemon.wait_started();
        assert_eq!(daemon.terminate(), Some(0));
        let (depth, l) = outbox_stats(&config);
        last = l;
        if depth == 0 {
            break;
        }
        runs += 1;
        assert!(runs <= 5, "the outbox never drained ({depth} left)");
        daemon = Daemon::start(&config);
        wait_for("the waiting events", Duration::from_secs(30), || {
            sub.events(&format!("{p}/event"))
                .iter()
                .map(|e| e.seq)
                .collect::<BTreeSet<_>>()
                .len() as u64
                >= l
        });
    }
    let redeliveries = assert_all_delivered(&sub, &p, last);
    eprintln!(
        "chaos: {last} taps over {soak} s, {crashes} kill -9, {broker_restarts} broker restarts, {long_outages} long outage(s), {redeliveries} redeliveries (same event_id), no gap"
    );
    assert!(last > 100, "the stream really ran ({last} taps)");
}

#[test]
fn a_refused_login_is_retried_until_the_broker_accepts_and_nothing_is_lost() {
    let dir = scratch();
    let passwords = dir.path().join("broker-passwords");
    let set_password = |user: &str, password: &str| {
        let out = std::process::Command::new("mosquitto_passwd")
            .args(["-b", passwords.to_str().unwrap(), user, password])
            .output()
            .expect("mosquitto_passwd (Debian: mosquitto)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(&passwords, "").unwrap();
    set_password("ledger", "ledger-secret");
    set_password("gate", "the-old-password");
    let mut broker = LocalBroker::start(
        &dir.path().join("broker"),
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            passwords.display()
        ),
    )
    .expect("mosquitto starts");
    std::fs::write(dir.path().join("mqtt-password"), "the-new-password\n").unwrap();
    let config = stream_config(dir.path(), &broker.url(), 4, 200, "");
    // Credentials go in [mqtt]: rewrite the file with them.
    let text = std::fs::read_to_string(&config.path).unwrap().replace(
        "[mqtt]\n",
        "[mqtt]\nusername = \"gate\"\npassword_file = \"mqtt-password\"\n",
    );
    std::fs::write(&config.path, text).unwrap();
    let p = config.base();
    let sub = Subscriber::start_as(
        broker.port,
        "ledger-login",
        &[&format!("{p}/event")],
        Some(("ledger", "ledger-secret")),
    );
    let mut daemon = Daemon::start(&config);
    wait_for("the refusal in the log", Duration::from_secs(20), || {
        daemon
            .log_text()
            .contains("the broker refused the connection")
    });
    wait_for("taps recorded meanwhile", Duration::from_secs(20), || {
        daemon.log_text().matches("tap seq=").count() >= 20
    });
    assert!(
        sub.on(&format!("{p}/event")).is_empty(),
        "nothing got through with the wrong password"
    );
    assert_eq!(
        daemon.log_text().matches("MQTT broker unreachable").count(),
        1,
        "one line per outage, not one per retry"
    );
    // The site fixes the broker's password; the broker restarts and the daemon gets in.
    set_password("gate", "the-new-password");
    broker.stop();
    broker.restart().expect("broker restarts");
    wait_for("the readers to finish", Duration::from_secs(20), || {
        daemon.log_text().matches("reader finished").count() >= 3
    });
    assert_eq!(daemon.terminate(), Some(0));
    let (depth, last) = outbox_stats(&config);
    assert_eq!(depth, 0);
    assert_all_delivered(&sub, &p, last);
}

#[test]
fn a_full_disk_keeps_deciding_and_stores_the_taps_when_space_returns() {
    let dir = scratch();
    let broker = broker(dir.path());
    let disk = Tmpfs::mount(dir.path(), "disk", "size=48m");
    let config = stream_config(dir.path(), &broker.url(), 120, 150, "");
    let text = std::fs::read_to_string(&config.path).unwrap().replace(
        "data_dir = \"data\"",
        &format!("data_dir = \"{}/data\"", disk.path.display()),
    );
    std::fs::write(&config.path, text).unwrap();
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-disk", &[&format!("{p}/#")]);
    let mut daemon = Daemon::start(&config);
    wait_for(
        "taps before the disk fills",
        Duration::from_secs(20),
        || sub.on(&format!("{p}/event")).len() >= 10,
    );

    // The disk fills up (another program's logs, say).
    let filler = fill_disk(&disk.path, 2 << 20);
    wait_for(
        "the storage failure on P/status",
        Duration::from_secs(20),
        || {
            sub.last_json(&format!("{p}/status"))
                .is_some_and(|s| s.get("storage_error").is_some())
        },
    );
    assert!(daemon.log_text().contains("CANNOT STORE TAPS"));
    let unstored_decisions = |sub: &Subscriber| {
        sub.events(&format!("{p}/decision"))
            .iter()
            .filter(|e| e.seq == 0)
            .count()
    };
    wait_for(
        "decisions while the disk is full",
        Duration::from_secs(20),
        || unstored_decisions(&sub) >= 10,
    );
    // Each unstored decision has an id of its own that no stored event can have.
    let unstored_ids = |sub: &Subscriber| -> Vec<String> {
        sub.events(&format!("{p}/decision"))
            .into_iter()
            .filter(|e| e.seq == 0)
            .map(|e| e.event_id)
            .collect()
    };
    let ids = unstored_ids(&sub);
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "{ids:?}"
    );
    assert!(ids.iter().all(|id| id.contains(":unstored-")), "{ids:?}");

    // Space returns: the waiting taps are stored and delivered, with real seqs, in order.
    std::fs::remove_file(&filler).unwrap();
    wait_for(
        "the storage error to clear",
        Duration::from_secs(20),
        || {
            sub.last_json(&format!("{p}/status"))
                .is_some_and(|s| s.get("storage_error").is_none() && s["online"] == true)
        },
    );
    let stored_late = daemon.log_text().contains("the waiting taps are stored");
    assert!(stored_late);
    // The events stored late name the decisions that went out for them, one each.
    let ids = unstored_ids(&sub);
    wait_for(
        "the events of the unstored decisions",
        Duration::from_secs(20),
        || {
            let named: BTreeSet<String> = sub
                .events(&format!("{p}/event"))
                .into_iter()
                .filter(|e| e.decision_id != e.event_id)
                .map(|e| e.decision_id)
                .collect();
            ids.iter().all(|id| named.contains(id))
        },
    );

    // Full again, and this time the daemon dies before space returns.
    let filler = fill_disk(&disk.path, 2 << 20);
    let before = unstored_decisions(&sub);
    wait_for("more decisions while full", Duration::from_secs(20), || {
        unstored_decisions(&sub) >= before + 5
    });
    daemon.kill9();
    let announced = unstored_decisions(&sub) - before;
    // What the dead process decided without storing since space last returned, by its own
    // log (a decision can be decided and counted but not yet have reached the subscriber).
    let dead_log = daemon.log_text();
    let decided_unstored = dead_log
        .rsplit("the waiting taps are stored")
        .next()
        .unwrap_or("")
        .matches("tap decided but not yet stored")
        .count();
    assert!(
        announced <= decided_unstored,
        "announced {announced}, logged {decided_unstored}"
    );
    std::fs::remove_file(&filler).unwrap();
    let mut daemon = Daemon::start(&config);
    wait_for("the loss report", Duration::from_secs(20), || {
        daemon.log_text().contains("the previous run stopped with")
    });
    let log = daemon.log_text();
    let reported: usize = log
        .split("the previous run stopped with ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a count in the report");
    assert!(
        reported >= 1 && reported <= decided_unstored,
        "reported {reported}, decided without storing {decided_unstored} ({announced} announced)"
    );
    wait_for("the loss on P/status", Duration::from_secs(20), || {
        sub.last_json(&format!("{p}/status"))
            .is_some_and(|s| s.get("storage_loss").is_some())
    });
    assert_eq!(daemon.terminate(), Some(0));
    // Every stored tap reached the ledger, without a gap.
    let (depth, last) = outbox_stats(&config);
    assert_eq!(depth, 0);
    assert_all_delivered(&sub, &p, last);
    drop(disk);
}

#[test]
fn bad_surroundings_give_one_clear_error_and_never_a_panic() {
    let dir = scratch();
    write_script(dir.path(), "s.txt", "at 0 present 04A1B2C3\n");
    let reader =
        "[[reader]]\nname = \"r\"\nkind = \"simulated\"\nscript = \"s.txt\"\ndirection = \"in\"\n";
    let config = TestConfig::write(dir.path(), "mqtt://127.0.0.1:1", reader);
    let cfg = config.path.to_str().unwrap();

    // A foreign file where the database should be.
    std::fs::create_dir_all(dir.path().join("data/db")).unwrap();
    std::fs::write(
        dir.path().join("data/db/conf"),
        b"\x00\x01garbage, not sled's",
    )
    .unwrap();
    std::fs::write(dir.path().join("data/db/db"), vec![0xEEu8; 70_000]).unwrap();
    let (code, _, err) = id06d(&["run", "--config", cfg]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("data") && !err.contains("panicked"), "{err}");
    assert_eq!(
        err.trim_end()
            .lines()
            .filter(|l| l.starts_with("id06d:"))
            .count(),
        1,
        "{err}"
    );

    // A read-only data directory.
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let ro = Tmpfs::mount(dir.path(), "data", "size=1m,ro");
    let (code, _, err) = id06d(&["run", "--config", cfg]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Read-only") || err.contains("read-only"),
        "{err}"
    );
    drop(ro);
}

#[test]
fn a_broker_that_sends_garbage_does_not_hurt() {
    let dir = scratch();
    // Not a broker: accepts, sends garbage or half a packet, hangs up.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let reply: &[u8] = match i % 3 {
                0 => b"\xff\xfe\xfd garbage \x00\x00",
                1 => &[0x20, 0x02, 0x00], // a CONNACK cut in the middle
                _ => &[0x20, 0x7f, 0x01], // a CONNACK that claims 127 bytes
            };
            let _ = s.write_all(reply);
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let config = stream_config(dir.path(), &format!("mqtt://127.0.0.1:{port}"), 3, 100, "");
    let mut daemon = Daemon::start(&config);
    wait_for(
        "several garbage connections",
        Duration::from_secs(30),
        || served.load(std::sync::atomic::Ordering::Relaxed) >= 4,
    );
    wait_for("the readers to finish", Duration::from_secs(20), || {
        daemon.log_text().matches("reader finished").count() >= 3
    });
    assert!(daemon.is_running());
    assert_eq!(daemon.terminate(), Some(0));
    let (depth, last) = outbox_stats(&config);
    assert!(last >= 60, "taps were recorded: {last}");
    assert_eq!(depth, last, "and wait in the outbox for a real broker");
    assert!(!daemon.log_text().contains("panicked"));
}

/// mosquitto killed with SIGKILL at random moments while taps stream. A broker that dies
/// that way can lose messages it has already acknowledged (they were only in its memory);
/// those are the broker's losses, not the gateway's. The gateway keeps a record of every
/// event and whether the broker acknowledged it, so the two can be told apart: every seq
/// must be in the gateway's record, and every seq the ledger never saw must be one the broker
/// acknowledged.
#[test]
fn broker_kill_9_losses_are_the_brokers_never_the_gateways() {
    let dir = scratch();
    let mut broker = broker(dir.path());
    let config = stream_config(dir.path(), &broker.url(), 40, 90, "");
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-sigkill", &[&format!("{p}/event")]);
    let mut rng = Rng::from_env_or_time();
    let mut daemon = Daemon::start(&config);
    let mut kills = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(rng.millis(300, 2000));
        broker.kill();
        kills += 1;
        std::thread::sleep(rng.millis(50, 800));
        broker.restart().expect("broker restarts");
    }
    assert!(
        daemon.is_running(),
        "the daemon survives every broker crash"
    );
    assert_eq!(daemon.terminate(), Some(0));
    // Whatever the last crash left undelivered goes out on the next start.
    let mut last;
    let mut runs = 0;
    loop {
        let (depth, l) = outbox_stats(&config);
        last = l;
        if depth == 0 {
            break;
        }
        runs += 1;
        assert!(runs <= 5, "the outbox never drained ({depth} left)");
        daemon = Daemon::start(&config);
        daemon.wait_started();
        // The readers' 40-second script starts again with each start and keeps adding
        // taps: on a loaded machine a poll may not see the outbox empty until it ends.
        wait_for("the outbox to drain", Duration::from_secs(60), || {
            id06d(&["outbox", "stats", "--config", config.path.to_str().unwrap()])
                .1
                .contains("outbox depth:   0")
        });
        assert_eq!(daemon.terminate(), Some(0));
    }
    // The ledger may still be receiving the last redeliveries: wait until it is quiet.
    let mut seen = 0;
    wait_for("the ledger to be quiet", Duration::from_secs(30), || {
        let now = sub.on(&format!("{p}/event")).len();
        let quiet = now == seen;
        seen = now;
        std::thread::sleep(Duration::from_millis(300));
        quiet
    });
    let received: BTreeSet<u64> = sub
        .events(&format!("{p}/event"))
        .iter()
        .map(|e| e.seq)
        .collect();
    // The gateway's own record: seq and whether the broker acknowledged it.
    let csv = export_events(config.path.to_str().unwrap(), "csv");
    let record: Vec<(u64, bool)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].parse().expect("a seq"), f[10] == "yes")
        })
        .collect();
    assert_eq!(
        record.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "the gateway recorded every seq once, without a gap"
    );
    let lost_by_broker: Vec<u64> = record
        .iter()
        .filter(|(seq, _)| !received.contains(seq))
        .map(|(seq, acked)| {
            assert!(
                *acked,
                "seq {seq} never reached the ledger and the broker never acknowledged it: the gateway lost it"
            );
            *seq
        })
        .collect();
    eprintln!(
        "broker kill -9: {last} taps, {kills} broker crashes, {} events reached the ledger, {} acknowledged by the broker and then lost in its crashes {:?}",
        received.len(),
        lost_by_broker.len(),
        lost_by_broker
    );
    assert!(last > 100, "the stream really ran ({last} taps)");
}

/// Power cuts: the data directory sits on a filesystem that keeps file contents in memory
/// until they are synced (`support::lossyfs`), and a cut throws away everything unsynced —
/// after `kill -9`, as when the power goes. Every decision published with a `seq` promised
/// the tap was durable: after the cuts that event must reach the ledger with exactly that
/// content, every seq from 1 to the last must arrive, no seq may be given twice, and the
/// gateway's own record (`events export`) must still hold every tap. Every other cut comes
/// while the broker is away, so that undelivered events sit through outbox checkpoints.
#[test]
fn power_cuts_lose_no_tap_whose_decision_was_published() {
    let dir = scratch();
    let mut broker = broker(dir.path());
    let cuts: u32 = std::env::var("ID06D_POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let config = stream_config(dir.path(), &broker.url(), 60 + 4 * u64::from(cuts), 90, "");
    let p = config.base();
    let sub = Subscriber::start(
        broker.port,
        "ledger-power",
        &[&format!("{p}/event"), &format!("{p}/decision")],
    );
    // data -> mnt/data: the daemon's data directory is on the lossy filesystem over disk/.
    let (disk, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
    std::fs::create_dir_all(disk.join("data")).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    std::os::unix::fs::symlink(mnt.join("data"), dir.path().join("data")).unwrap();
    let mut rng = Rng::from_env_or_time();
    let (mut lost_bytes, mut syncs) = (0u64, 0u64);
    let decided = |sub: &Subscriber| {
        sub.events(&format!("{p}/decision"))
            .iter()
            .filter(|d| d.seq > 0)
            .count()
    };
    let mut outages = 0;
    for cut in 0..cuts {
        let mount = LossyMount::mount(&disk, &mnt)
            .expect("mount the lossy filesystem (needs root and /dev/fuse)");
        let before = decided(&sub);
        let mut daemon = Daemon::start(&config);
        wait_for(
            "taps decided after the restart",
            Duration::from_secs(30),
            || decided(&sub) >= before + 3,
        );
        let broker_away = cut % 2 == 1;
        if broker_away {
            broker.stop();
            outages += 1;
            // Long enough for at least one checkpoint (every 2 s) with events pending.
            std::thread::sleep(rng.millis(2200, 3500));
        } else {
            std::thread::sleep(rng.millis(0, 2500)); // a random moment in the stream
        }
        daemon.kill9();
        syncs += mount.handle.syncs();
        lost_bytes += mount.power_cut();
        if broker_away {
            broker.restart().expect("broker restarts");
        }
    }
    // Power back for good: run until a clean stop finds the outbox empty.
    let mount = LossyMount::mount(&disk, &mnt).expect("mount the lossy filesystem");
    // Every seq promised by a decision before the power came back, delivered first.
    let promised_before = sub
        .events(&format!("{p}/decision"))
        .iter()
        .map(|e| e.seq)
        .max()
        .unwrap_or(0);
    let mut daemon = Daemon::start(&config);
    let last = loop {
        daemon.wait_started();
        wait_for("the recovered events", Duration::from_secs(30), || {
            sub.events(&format!("{p}/event"))
                .iter()
                .map(|e| e.seq)
                .max()
                .unwrap_or(0)
                >= promised_before
        });
        assert_eq!(daemon.terminate(), Some(0));
        let (depth, last) = outbox_stats(&config);
        if depth == 0 {
            break last;
        }
        daemon = Daemon::start(&config);
    };
    let redeliveries = assert_all_delivered(&sub, &p, last);
    let (delivered, _) = check_delivery(&sub.events(&format!("{p}/event")));
    let decisions = sub.events(&format!("{p}/decision"));
    let promised: Vec<_> = decisions.iter().filter(|d| d.seq > 0).collect();
    for d in &promised {
        assert_eq!(
            delivered.get(&d.seq),
            Some(*d),
            "the decision for seq {} was published, so its tap was durable; the ledger must get exactly that event",
            d.seq
        );
    }
    // The gateway's own record, for an inspector: every tap, exactly as delivered.
    let json = export_events(config.path.to_str().unwrap(), "json");
    let archived: Vec<id06_protocol::Event> = json
        .lines()
        .map(|l| {
            let line: id06d::ops::control::ExportedEvent =
                serde_json::from_str(l).expect("an exported event");
            assert!(line.delivered, "acked by the broker: {l}");
            line.event
        })
        .collect();
    assert_eq!(
        archived.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "the gateway's record keeps every seq once"
    );
    for e in &archived {
        assert_eq!(
            delivered.get(&e.seq),
            Some(e),
            "the record of seq {} differs from what the ledger got",
            e.seq
        );
    }
    drop(mount);
    eprintln!(
        "power cuts: {cuts} cuts after kill -9 ({outages} with the broker away), {} KiB of unsynced writes thrown away, {syncs} syncs, {} decisions with a seq, {last} taps delivered without a gap, {redeliveries} redeliveries",
        lost_bytes / 1024,
        promised.len()
    );
    assert!(
        promised.len() as u64 >= u64::from(cuts) * 3,
        "the stream really ran"
    );
}
