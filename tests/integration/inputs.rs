//! No message from outside can stop delivery or loosen the list: each finding of the
//! hostile tester reproduced against a real mosquitto and the real daemon, with taps
//! flowing, and the list checked by the decisions the daemon makes afterwards.

use crate::blocklist::{count, decision_at, ticker_config, write_update, A, B, C};
use crate::support::*;
use std::path::Path;
use std::time::Duration;

/// The highest seq on P/event so far.
fn last_seq(sub: &Subscriber, p: &str) -> u64 {
    sub.events(&format!("{p}/event"))
        .iter()
        .map(|e| e.seq)
        .max()
        .unwrap_or(0)
}

/// Waits until taps made after now reach the subscriber.
fn taps_keep_flowing(sub: &Subscriber, p: &str, what: &str) {
    let now = last_seq(sub, p);
    wait_for(
        &format!("taps after {what} to reach the ledger"),
        Duration::from_secs(10),
        || last_seq(sub, p) >= now + 5,
    );
}

/// The first event of `card` after seq `after`.
fn decision_after(sub: &Subscriber, p: &str, card: &str, after: u64) -> id06_protocol::Event {
    let mut found = None;
    wait_for(
        &format!("a tap of {card} after seq {after}"),
        Duration::from_secs(20),
        || {
            found = sub
                .events(&format!("{p}/event"))
                .into_iter()
                .find(|e| e.card_uid.to_string() == card && e.seq > after);
            found.is_some()
        },
    );
    found.unwrap()
}

fn update_json(from: u64, to: u64, set: &[(&str, &str)]) -> Vec<u8> {
    let set: Vec<String> = set
        .iter()
        .map(|(u, s)| format!("{{\"card_uid\":\"{u}\",\"status\":\"{s}\"}}"))
        .collect();
    format!(
        "{{\"schema\":\"id06d/blocklist-update/v1\",\"from_version\":{from},\"to_version\":{to},\"set\":[{}],\"clear\":[]}}",
        set.join(",")
    )
    .into_bytes()
}

struct Gate {
    dir: tempfile::TempDir,
    broker: LocalBroker,
    config: TestConfig,
    sub: Subscriber,
    p: String,
    daemon: Daemon,
}

fn gate(name: &str, extra: &str) -> Gate {
    let dir = scratch();
    let broker = broker(dir.path());
    let config = ticker_config(dir.path(), &broker.url(), extra);
    let p = config.base();
    let sub = Subscriber::start(
        broker.port,
        &format!("ledger-{name}"),
        &[&format!("{p}/event"), &format!("{p}/status")],
    );
    let daemon = Daemon::start(&config);
    daemon.wait_started();
    wait_for("the first taps", Duration::from_secs(20), || {
        last_seq(&sub, &p) >= 3
    });
    Gate {
        dir,
        broker,
        config,
        sub,
        p,
        daemon,
    }
}

fn cfg(g: &Gate) -> String {
    g.config.path.to_str().unwrap().to_string()
}

#[test]
fn a_20_mib_update_changes_nothing_and_delivery_goes_on() {
    let g = gate("huge-update", "");
    let huge = vec![b'x'; 20 << 20];
    publish_raw(g.broker.port, "id06/v1/blocklist/update", huge, false);
    taps_keep_flowing(&g.sub, &g.p, "a 20 MiB update");
    // The list session is still there: a real update after it applies.
    publish_raw(
        g.broker.port,
        "id06/v1/blocklist/update",
        update_json(0, 1, &[(A, "blocked")]),
        false,
    );
    let e = decision_at(&g.sub, &g.p, A, 1);
    assert_eq!(e.reason.map(|r| r.as_str()), Some("blocked"));
    let log = g.daemon.log_text();
    assert_eq!(
        count(&log, "lost the broker"),
        0,
        "no reconnect loop: {log}"
    );
    assert_eq!(count(&log, "MQTT broker unreachable"), 0, "{log}");
}

#[test]
fn a_20_mib_retained_chunk_changes_nothing_across_a_restart() {
    let mut g = gate("huge-chunk", "");
    publish_raw(
        g.broker.port,
        "id06/v1/blocklist/snapshot/3",
        vec![b'x'; 20 << 20],
        true,
    );
    taps_keep_flowing(&g.sub, &g.p, "a 20 MiB retained chunk");
    assert_eq!(g.daemon.terminate(), Some(0));
    g.daemon = Daemon::start(&g.config);
    g.daemon.wait_started();
    taps_keep_flowing(&g.sub, &g.p, "the restart");
    // A real snapshot still applies (its chunk 0 is the only one; topic 3 is not named).
    let csv = g.dir.path().join("full.csv");
    std::fs::write(&csv, format!("{B},terminated\n")).unwrap();
    let (code, _, err) = id06d(&[
        "blocklist",
        "publish-snapshot",
        csv.to_str().unwrap(),
        "--version",
        "7",
        "--config",
        &cfg(&g),
    ]);
    assert_eq!(code, 0, "{err}");
    let e = decision_at(&g.sub, &g.p, B, 7);
    assert_eq!(e.reason.map(|r| r.as_str()), Some("terminated"));
}

#[test]
fn a_burst_of_2000_updates_ends_at_the_right_version() {
    let g = gate("burst", "");
    let topic = "id06/v1/blocklist/update".to_string();
    let messages: Vec<(String, Vec<u8>, bool)> = (0..2000u64)
        .map(|v| {
            // The last update blocks C; all the others confirm nothing but the version.
            let set: &[(&str, &str)] = if v == 1999 { &[(C, "blocked")] } else { &[] };
            (topic.clone(), update_json(v, v + 1, set), false)
        })
        .collect();
    let started = std::time::Instant::now();
    publish_many(g.broker.port, messages);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !g
        .sub
        .last_json(&format!("{}/status", g.p))
        .is_some_and(|s| s["blocklist_version"] == 2000)
    {
        if std::time::Instant::now() > deadline {
            let log = g.daemon.log_text();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(" tap "))
                .rev()
                .take(30)
                .collect();
            panic!("not at version 2000: {tail:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("2000 updates applied in {:?}", started.elapsed());
    let e = decision_at(&g.sub, &g.p, C, 2000);
    assert_eq!(e.reason.map(|r| r.as_str()), Some("blocked"));
    let log = g.daemon.log_text();
    assert_eq!(count(&log, "rejected"), 0, "nothing dropped or refused");
    assert!(g
        .sub
        .last_json(&format!("{}/status", g.p))
        .is_some_and(|s| s.get("blocklist_gap").is_none()));
}

#[test]
fn a_bogus_high_version_chunk_never_blocks_a_signed_snapshot() {
    let dir = scratch();
    let key = dir.path().join("backend.key");
    let (code, out, err) = id06d(&["blocklist", "keygen", "--secret-out", key.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let public = out
        .lines()
        .find(|l| l.starts_with("public_key"))
        .unwrap()
        .to_string();
    let broker = broker(dir.path());
    let mut bogus = b"ID6C".to_vec();
    bogus.extend_from_slice(&u64::MAX.to_be_bytes());
    bogus.extend_from_slice(&999u32.to_be_bytes());
    bogus.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(bogus.len(), 20);
    publish_raw(
        broker.port,
        "id06/v1/blocklist/snapshot/999",
        bogus.clone(),
        true,
    );
    publish_raw(broker.port, "id06/v1/blocklist/snapshot/0", bogus, true);
    let config = ticker_config(
        dir.path(),
        &broker.url(),
        &format!("[blocklist]\n{public}\n"),
    );
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-bogus", &[&format!("{p}/event")]);
    let daemon = Daemon::start(&config);
    daemon.wait_started();
    let csv = dir.path().join("full.csv");
    std::fs::write(&csv, format!("{A},suspended\n")).unwrap();
    let (code, _, err) = id06d(&[
        "blocklist",
        "publish-snapshot",
        csv.to_str().unwrap(),
        "--version",
        "12",
        "--key",
        key.to_str().unwrap(),
        "--config",
        config.path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let e = decision_at(&sub, &p, A, 12);
    assert_eq!(e.reason.map(|r| r.as_str()), Some("suspended"));
}

#[test]
fn a_flood_of_unsigned_megabyte_chunks_holds_no_memory() {
    let dir = scratch();
    let key = dir.path().join("backend.key");
    let (_, out, _) = id06d(&["blocklist", "keygen", "--secret-out", key.to_str().unwrap()]);
    let public = out
        .lines()
        .find(|l| l.starts_with("public_key"))
        .unwrap()
        .to_string();
    let broker = broker(dir.path());
    let config = ticker_config(
        dir.path(),
        &broker.url(),
        &format!("[blocklist]\n{public}\n"),
    );
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-flood", &[&format!("{p}/event")]);
    let daemon = Daemon::start(&config);
    daemon.wait_started();
    // A signed manifest whose chunks are not there yet: the gateway collects chunks now.
    let csv = dir.path().join("full.csv");
    let cards: String = (0..120_000u32)
        .map(|i| format!("{},blocked\n", card(5_000_000 + i)))
        .collect();
    std::fs::write(&csv, cards).unwrap();
    let (code, _, err) = id06d(&[
        "blocklist",
        "publish-snapshot",
        csv.to_str().unwrap(),
        "--version",
        "3",
        "--key",
        key.to_str().unwrap(),
        "--config",
        config.path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    decision_at(&sub, &p, A, 3);
    let baseline = peak_rss(daemon.pid().unwrap());
    // A newer signed manifest whose chunks are not there yet: the gateway collects chunks
    // now. Then 300 bogus 1 MiB chunks on its topics, then its real chunks.
    let entries: Vec<(id06_protocol::CardUid, id06_protocol::CardStatus)> = (0..120_000u32)
        .map(|i| {
            (
                id06_protocol::CardUid::parse(&card(6_000_000 + i)).unwrap(),
                id06_protocol::CardStatus::Blocked,
            )
        })
        .collect();
    let (mut manifest, chunks) =
        id06d::mqtt::publish::snapshot_messages("id06/v1/blocklist/snapshot", 4, &entries);
    let secret = id06d::lists::signing::load_secret_key(&key).unwrap();
    manifest.signature = Some(id06d::lists::signing::sign(
        &secret,
        &manifest.canonical_bytes(),
    ));
    publish_raw(
        broker.port,
        "id06/v1/blocklist/snapshot",
        serde_json::to_vec(&manifest).unwrap(),
        true,
    );
    wait_for(
        "the gateway to collect version 4",
        Duration::from_secs(10),
        || {
            daemon
                .log_text()
                .contains("collecting blocklist snapshot version=4")
        },
    );
    let flood: Vec<(String, Vec<u8>, bool)> = (0..300u32)
        .map(|i| {
            let mut chunk = b"ID6C".to_vec();
            chunk.extend_from_slice(&4u64.to_be_bytes());
            chunk.extend_from_slice(&(i % 3).to_be_bytes());
            chunk.resize(1 << 20, 0xEE);
            (
                format!("id06/v1/blocklist/snapshot/{}", i % 3),
                chunk,
                false,
            )
        })
        .collect();
    publish_many(broker.port, flood);
    taps_keep_flowing(&sub, &p, "300 bogus chunks");
    let log = daemon.log_text();
    let peak = peak_rss(daemon.pid().unwrap());
    eprintln!(
        "peak RSS {} MiB before the flood, {} MiB after ({} rejection lines)",
        baseline >> 20,
        peak >> 20,
        count(&log, "blocklist snapshot chunk")
    );
    let rejected = count(&log, "blocklist snapshot chunk");
    assert!(
        rejected >= 1,
        "the bogus chunks reached the gateway and were refused"
    );
    assert!(
        rejected <= 21,
        "rejections are rate-limited: {rejected} lines"
    );
    assert!(peak < 160 << 20, "peak RSS {} MiB", peak >> 20);
    // The real chunks still complete the snapshot.
    publish_many(
        broker.port,
        chunks
            .into_iter()
            .map(|m| (m.topic, m.payload, true))
            .collect(),
    );
    decision_at(&sub, &p, A, 4);
}

#[test]
fn a_local_import_never_takes_the_backends_versions() {
    let dir = scratch();
    let key = dir.path().join("backend.key");
    let (_, out, _) = id06d(&["blocklist", "keygen", "--secret-out", key.to_str().unwrap()]);
    let public = out
        .lines()
        .find(|l| l.starts_with("public_key"))
        .unwrap()
        .to_string();
    let broker = broker(dir.path());
    let config = ticker_config(
        dir.path(),
        &broker.url(),
        &format!("[blocklist]\n{public}\n"),
    );
    let c = config.path.to_str().unwrap().to_string();
    let k = key.to_str().unwrap().to_string();
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-versions", &[&format!("{p}/event")]);
    let mut daemon = Daemon::start(&config);
    daemon.wait_started();
    let csv = dir.path().join("full.csv");
    std::fs::write(&csv, format!("{C},blocked\n")).unwrap();
    let ok = |args: &[&str]| {
        let (code, _, err) = id06d(args);
        assert_eq!(code, 0, "{args:?}: {err}");
    };
    ok(&[
        "blocklist",
        "publish-snapshot",
        csv.to_str().unwrap(),
        "--version",
        "2000",
        "--key",
        &k,
        "--config",
        &c,
    ]);
    decision_at(&sub, &p, C, 2000);
    let u = write_update(dir.path(), "u1.json", 2000, 2001, &[(A, "blocked")], &[]);
    ok(&[
        "blocklist",
        "publish-update",
        &u,
        "--key",
        &k,
        "--config",
        &c,
    ]);
    decision_at(&sub, &p, A, 2001);
    assert_eq!(daemon.terminate(), Some(0));
    // The operator tries a local import: refused, with the reason, while the key is set.
    std::fs::write(dir.path().join("local.csv"), format!("{B},blocked\n")).unwrap();
    let local = dir.path().join("local.csv");
    let (code, _, err) = id06d(&[
        "blocklist",
        "import",
        local.to_str().unwrap(),
        "--config",
        &c,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("public_key") && err.contains("site-list import"),
        "{err}"
    );
    // The backend's real 2001 -> 2002 terminates B, and it applies.
    let mut daemon = Daemon::start(&config);
    daemon.wait_started();
    let u = write_update(dir.path(), "u2.json", 2001, 2002, &[(B, "terminated")], &[]);
    ok(&[
        "blocklist",
        "publish-update",
        &u,
        "--key",
        &k,
        "--config",
        &c,
    ]);
    let e = decision_at(&sub, &p, B, 2002);
    assert_eq!(e.reason.map(|r| r.as_str()), Some("terminated"));
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn an_import_that_empties_or_shrinks_the_list_or_goes_back_is_refused() {
    let dir = scratch();
    let config = TestConfig::write(dir.path(), "mqtt://127.0.0.1:1", "");
    let c = config.path.to_str().unwrap().to_string();
    let list: String = (0..100u32)
        .map(|i| format!("{},blocked\n", card(i)))
        .collect();
    import_list(&c, &list, &["--version", "4"]);
    let stats = || id06d(&["blocklist", "stats", "--config", &c]).1;
    let write = |name: &str, text: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f.to_str().unwrap().to_string()
    };
    let empty = write("empty.csv", "uid,status\n");
    let (code, _, err) = id06d(&["blocklist", "import", &empty, "--config", &c]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("lists no card") && err.contains("--allow-shrink"),
        "{err}"
    );
    let half: String = (0..50u32)
        .map(|i| format!("{},blocked\n", card(i)))
        .collect();
    let half = write("half.csv", &half);
    let (code, _, err) = id06d(&["blocklist", "import", &half, "--config", &c]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("50 of the 100 listed cards"), "{err}");
    let (code, _, err) = id06d(&[
        "blocklist",
        "import",
        &half,
        "--version",
        "2",
        "--config",
        &c,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("not newer than the list in force (version 4)"),
        "{err}"
    );
    assert!(
        stats().contains("blocklist version 4: 100 listed cards"),
        "{}",
        stats()
    );
    // Said on purpose, it goes.
    let (code, _, err) = id06d(&[
        "blocklist",
        "import",
        &half,
        "--allow-shrink",
        "--config",
        &c,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stats().contains("blocklist version 5: 50 listed cards"),
        "{}",
        stats()
    );
}

#[test]
fn a_dollar_topic_prefix_is_refused_by_check_config() {
    let dir = scratch();
    let config = TestConfig::write(dir.path(), "mqtt://127.0.0.1:1883", "");
    let text = std::fs::read_to_string(&config.path)
        .unwrap()
        .replace("[mqtt]\n", "[mqtt]\ntopic_prefix = \"$SYS/id06\"\n");
    std::fs::write(&config.path, text).unwrap();
    let (code, _, err) = id06d(&["check-config", "--config", config.path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("id06d.toml:") && err.contains("must not start with '$'"),
        "{err}"
    );
}

#[test]
fn an_empty_or_unconfirmed_list_is_warned_about_at_start() {
    let dir = scratch();
    let broker = broker(dir.path());
    let config = ticker_config(
        dir.path(),
        &broker.url(),
        "[access]\nmode = \"site_list\"\n",
    );
    let mut daemon = Daemon::start(&config);
    daemon.wait_started();
    wait_for("the warnings", Duration::from_secs(10), || {
        let log = daemon.log_text();
        log.contains("has never been confirmed") && log.contains("allow list is empty")
    });
    assert_eq!(daemon.terminate(), Some(0));
}

fn site_import(c: &str, dir: &Path, text: &str) -> (i32, String, String) {
    let f = dir.join("site.csv");
    std::fs::write(&f, text).unwrap();
    id06d(&["site-list", "import", f.to_str().unwrap(), "--config", c])
}

#[test]
fn a_site_ban_denies_at_once_and_survives_a_restart_and_a_national_update() {
    let mut g = gate("site-ban", "");
    let c = cfg(&g);
    // While the daemon runs: the ban goes in through the control socket, at once.
    let (code, out, err) = site_import(&c, g.dir.path(), &format!("uid,entry\n{A},ban\n"));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("site list version 1 in force (was 0): 1 banned"),
        "{out}"
    );
    let now = last_seq(&g.sub, &g.p);
    let e = decision_after(&g.sub, &g.p, A, now);
    assert_eq!(e.reason.map(|r| r.as_str()), Some("site_banned"));
    assert_eq!(
        e.card_status.as_str(),
        "unlisted",
        "the national status is untouched"
    );
    assert_eq!(decision_after(&g.sub, &g.p, B, now).reason, None);
    // A national update leaves the site list alone, and the site list the national versions.
    publish_raw(
        g.broker.port,
        "id06/v1/blocklist/update",
        update_json(0, 1, &[(C, "suspended")]),
        false,
    );
    assert_eq!(
        decision_at(&g.sub, &g.p, C, 1).reason.map(|r| r.as_str()),
        Some("suspended")
    );
    assert_eq!(
        decision_at(&g.sub, &g.p, A, 1).reason.map(|r| r.as_str()),
        Some("site_banned")
    );
    // Versions only go forward.
    let f = g.dir.path().join("old.csv");
    std::fs::write(&f, format!("{B},ban\n")).unwrap();
    let (code, _, err) = id06d(&[
        "site-list",
        "import",
        f.to_str().unwrap(),
        "--version",
        "1",
        "--config",
        &c,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("not newer"), "{err}");
    // Across a restart.
    assert_eq!(g.daemon.terminate(), Some(0));
    let (code, out, _) = id06d(&["blocklist", "lookup", A, "--config", &c]);
    assert_eq!(code, 0);
    assert!(
        out.contains("banned from this site") && out.contains("denied: site_banned"),
        "{out}"
    );
    g.daemon = Daemon::start(&g.config);
    g.daemon.wait_started();
    let now = last_seq(&g.sub, &g.p);
    assert_eq!(
        decision_after(&g.sub, &g.p, A, now)
            .reason
            .map(|r| r.as_str()),
        Some("site_banned")
    );
}

#[test]
fn allow_list_mode_admits_only_the_sites_cards_across_a_restart_and_a_national_update() {
    let dir = scratch();
    let broker = broker(dir.path());
    let config = ticker_config(
        dir.path(),
        &broker.url(),
        "[access]\nmode = \"site_list\"\n",
    );
    let c = config.path.to_str().unwrap().to_string();
    // Before the first start: the import makes the data directory.
    let (code, _, err) = site_import(&c, dir.path(), &format!("{A},allow\n{B},allow\n"));
    assert_eq!(code, 0, "{err}");
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-allow", &[&format!("{p}/event")]);
    let mut daemon = Daemon::start(&config);
    daemon.wait_started();
    assert_eq!(decision_after(&sub, &p, A, 0).reason, None);
    assert_eq!(
        decision_after(&sub, &p, C, 0).reason.map(|r| r.as_str()),
        Some("not_on_site_list")
    );
    // The ID06 status still applies: B terminated nationally is denied though allowed.
    publish_raw(
        broker.port,
        "id06/v1/blocklist/update",
        update_json(0, 1, &[(B, "terminated")]),
        false,
    );
    assert_eq!(
        decision_at(&sub, &p, B, 1).reason.map(|r| r.as_str()),
        Some("terminated")
    );
    assert_eq!(daemon.terminate(), Some(0));
    let mut daemon = Daemon::start(&config);
    daemon.wait_started();
    let now = last_seq(&sub, &p);
    assert_eq!(decision_after(&sub, &p, A, now).reason, None);
    assert_eq!(
        decision_after(&sub, &p, C, now).reason.map(|r| r.as_str()),
        Some("not_on_site_list")
    );
    assert_eq!(
        decision_after(&sub, &p, B, now).reason.map(|r| r.as_str()),
        Some("terminated")
    );
    assert_eq!(daemon.terminate(), Some(0));
}
