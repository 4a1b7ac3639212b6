//! Blocklist distribution against a real mosquitto: updates, replays, gaps, snapshots,
//! signatures and bad payloads, judged by the decisions the daemon makes afterwards.

use crate::support::*;
use id06_protocol::Event;
use std::path::Path;
use std::time::Duration;

pub(crate) const A: &str = "04A10000000A0A";
pub(crate) const B: &str = "04A10000000B0B";
pub(crate) const C: &str = "04A10000000C0C";

/// A reader that presents A, B and C in turn, a new tap every 300 ms, for two minutes.
pub(crate) fn ticker_config(dir: &Path, url: &str, extra: &str) -> TestConfig {
    let mut script = String::new();
    for k in 0..400u32 {
        let card = [A, B, C][(k % 3) as usize];
        script.push_str(&format!(
            "at {} present {card}\nat {} absent\n",
            k * 300,
            k * 300 + 150
        ));
    }
    write_script(dir, "ticker.txt", &script);
    TestConfig::write(
        dir,
        url,
        &format!(
            "[[reader]]\nname = \"gate\"\nkind = \"simulated\"\nscript = \"ticker.txt\"\npoll_ms = 20\ndirection = \"in\"\n\n[debounce]\ngone_ms = 60\nrepeat_ms = 100\n\n{extra}"
        ),
    )
}

/// Waits for an event for `card` decided with blocklist version `version`.
pub(crate) fn decision_at(sub: &Subscriber, p: &str, card: &str, version: u64) -> Event {
    let mut found = None;
    wait_for(
        &format!("a tap of {card} decided with blocklist version {version}"),
        Duration::from_secs(20),
        || {
            found = sub
                .events(&format!("{p}/event"))
                .into_iter()
                .find(|e| e.card_uid.to_string() == card && e.blocklist_version == version);
            found.is_some()
        },
    );
    found.unwrap()
}

pub(crate) fn status_where(
    sub: &Subscriber,
    p: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = None;
    wait_for(what, Duration::from_secs(20), || {
        last = sub.last_json(&format!("{p}/status"));
        last.as_ref().is_some_and(&cond)
    });
    last.unwrap()
}

pub(crate) fn write_update(
    dir: &Path,
    name: &str,
    from: u64,
    to: u64,
    set: &[(&str, &str)],
    clear: &[&str],
) -> String {
    let set: Vec<String> = set
        .iter()
        .map(|(u, s)| format!("{{\"card_uid\":\"{u}\",\"status\":\"{s}\"}}"))
        .collect();
    let clear: Vec<String> = clear.iter().map(|u| format!("\"{u}\"")).collect();
    let text = format!(
        "{{\"schema\":\"id06d/blocklist-update/v1\",\"from_version\":{from},\"to_version\":{to},\"set\":[{}],\"clear\":[{}]}}",
        set.join(","),
        clear.join(",")
    );
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

pub(crate) fn cli_ok(args: &[&str]) -> String {
    let (code, out, err) = id06d(args);
    assert_eq!(code, 0, "id06d {args:?} failed: {err}");
    out
}

pub(crate) fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn updates_gaps_and_snapshots_over_mqtt_decide_right_and_bad_input_changes_nothing() {
    let dir = scratch();
    let broker = broker(dir.path());
    let config = ticker_config(dir.path(), &broker.url(), "");
    let cfg = config.path.to_str().unwrap().to_string();
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-bl", &[&format!("{p}/#")]);
    let mut daemon = Daemon::start(&config);
    // Start: no list at all (version 0), every card unlisted.
    let e = decision_at(&sub, &p, A, 0);
    assert_eq!(e.card_status.as_str(), "unlisted");
    wait_for(
        "subscribed to blocklist topics",
        Duration::from_secs(10),
        || sub.last_json(&format!("{p}/status")).is_some(),
    );

    // An update in order: A blocked.
    let u1 = write_update(dir.path(), "u1.json", 0, 1, &[(A, "blocked")], &[]);
    cli_ok(&["blocklist", "publish-update", &u1, "--config", &cfg]);
    let e = decision_at(&sub, &p, A, 1);
    assert_eq!(
        (e.card_status.as_str(), e.reason.map(|r| r.as_str())),
        ("blocked", Some("blocked"))
    );
    status_where(&sub, &p, "status version 1", |s| {
        s["blocklist_version"] == 1
    });

    // A replay of the same update: rejected, nothing changes.
    cli_ok(&["blocklist", "publish-update", &u1, "--config", &cfg]);
    wait_for("the replay to be rejected", Duration::from_secs(10), || {
        count(
            &daemon.log_text(),
            "rejected: it goes from version 0 to 1 but this gateway already has version 1",
        ) == 1
    });

    // Malformed and huge payloads: rejected with a log line; the daemon goes on deciding.
    publish_raw(
        broker.port,
        "id06/v1/blocklist/update",
        b"{not json".to_vec(),
        false,
    );
    publish_raw(
        broker.port,
        "id06/v1/blocklist/update",
        br#"{"schema":"id06d/blocklist-update/v1","from_version":1,"to_version":2,"set":[{"card_uid":"04ZZ","status":"blocked"}]}"#.to_vec(),
        false,
    );
    publish_raw(
        broker.port,
        "id06/v1/blocklist/update",
        vec![b' '; 5 << 20],
        false,
    );
    wait_for("three rejections", Duration::from_secs(10), || {
        count(&daemon.log_text(), "blocklist update rejected") >= 3
    });
    let seq_now = sub.events(&format!("{p}/event")).last().unwrap().seq;
    wait_for("taps after the bad input", Duration::from_secs(10), || {
        sub.events(&format!("{p}/event")).last().unwrap().seq > seq_now + 3
    });
    assert!(daemon.is_running());

    // A gap: 5→6 while we have 1. Rejected, and P/status shows the gap.
    let gap = write_update(dir.path(), "gap.json", 5, 6, &[(C, "terminated")], &[]);
    cli_ok(&["blocklist", "publish-update", &gap, "--config", &cfg]);
    let s = status_where(&sub, &p, "the gap in P/status", |s| {
        s.get("blocklist_gap").is_some()
    });
    assert_eq!(s["blocklist_gap"], serde_json::json!([1, 5]));
    assert_eq!(s["blocklist_version"], 1);

    // A snapshot at version 6 closes it.
    let csv = dir.path().join("full.csv");
    std::fs::write(&csv, format!("{A},suspended\n{B},terminated\n")).unwrap();
    cli_ok(&[
        "blocklist",
        "publish-snapshot",
        csv.to_str().unwrap(),
        "--version",
        "6",
        "--config",
        &cfg,
    ]);
    let s = status_where(&sub, &p, "version 6 without a gap", |s| {
        s["blocklist_version"] == 6
    });
    assert!(s.get("blocklist_gap").is_none(), "{s}");
    assert_eq!(
        decision_at(&sub, &p, A, 6).card_status.as_str(),
        "suspended"
    );
    assert_eq!(
        decision_at(&sub, &p, B, 6).reason.map(|r| r.as_str()),
        Some("terminated")
    );
    assert_eq!(
        decision_at(&sub, &p, C, 6).card_status.as_str(),
        "unlisted",
        "the gap update never applied"
    );

    // Later updates apply on top of the snapshot.
    let u7 = write_update(dir.path(), "u7.json", 6, 7, &[], &[A]);
    cli_ok(&["blocklist", "publish-update", &u7, "--config", &cfg]);
    let e = decision_at(&sub, &p, A, 7);
    assert_eq!(
        (e.card_status.as_str(), e.decision),
        ("unlisted", id06_protocol::Decision::Granted)
    );

    // An empty update at the same version confirms the list.
    let confirm = write_update(dir.path(), "confirm.json", 7, 7, &[], &[]);
    cli_ok(&["blocklist", "publish-update", &confirm, "--config", &cfg]);
    wait_for("the confirmation", Duration::from_secs(10), || {
        daemon.log_text().contains("blocklist version confirmed")
    });
    assert_eq!(daemon.terminate(), Some(0));
    // And it is all on disk.
    let out = cli_ok(&["blocklist", "lookup", B, "--config", &cfg]);
    assert!(
        out.contains("terminated") && out.contains("version 7"),
        "{out}"
    );
}

#[test]
fn with_a_public_key_only_signed_updates_and_snapshots_apply() {
    let dir = scratch();
    let broker = broker(dir.path());
    let secret = dir.path().join("secret.key");
    let out = cli_ok(&[
        "blocklist",
        "keygen",
        "--secret-out",
        secret.to_str().unwrap(),
    ]);
    let public = out
        .lines()
        .find(|l| l.starts_with("public_key"))
        .expect("a public_key line");
    let secret_str = secret.to_str().unwrap().to_string();
    let config = ticker_config(
        dir.path(),
        &broker.url(),
        &format!("[blocklist]\n{public}\n"),
    );
    let cfg = config.path.to_str().unwrap().to_string();
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-sig", &[&format!("{p}/#")]);
    let mut daemon = Daemon::start(&config);
    decision_at(&sub, &p, A, 0);

    let u1 = write_update(dir.path(), "u1.json", 0, 1, &[(A, "blocked")], &[]);
    cli_ok(&["blocklist", "publish-update", &u1, "--config", &cfg]);
    wait_for(
        "the unsigned update to be rejected",
        Duration::from_secs(10),
        || daemon.log_text().contains("carries no signature"),
    );
    // A signature by another key.
    let other = dir.path().join("other.key");
    cli_ok(&[
        "blocklist",
        "keygen",
        "--secret-out",
        other.to_str().unwrap(),
    ]);
    cli_ok(&[
        "blocklist",
        "publish-update",
        &u1,
        "--key",
        other.to_str().unwrap(),
        "--config",
        &cfg,
    ]);
    wait_for(
        "the wrongly signed update to be rejected",
        Duration::from_secs(10),
        || {
            daemon
                .log_text()
                .contains("does not match the configured public key")
        },
    );
    // Signed with `sign`, then published as it is.
    let signed = cli_ok(&["blocklist", "sign", &u1, "--key", &secret_str]);
    let signed_path = dir.path().join("signed.json");
    std::fs::write(&signed_path, signed).unwrap();
    cli_ok(&[
        "blocklist",
        "publish-update",
        signed_path.to_str().unwrap(),
        "--config",
        &cfg,
    ]);
    assert_eq!(decision_at(&sub, &p, A, 1).card_status.as_str(), "blocked");

    // Snapshots too.
    let csv = dir.path().join("full.csv");
    std::fs::write(&csv, format!("{B},blocked\n")).unwrap();
    cli_ok(&[
        "blocklist",
        "publish-snapshot",
        csv.to_str().unwrap(),
        "--version",
        "5",
        "--key",
        other.to_str().unwrap(),
        "--config",
        &cfg,
    ]);
    wait_for(
        "the badly signed snapshot to be rejected",
        Duration::from_secs(10),
        || daemon.log_text().contains("blocklist snapshot rejected"),
    );
    cli_ok(&[
        "blocklist",
        "publish-snapshot",
        csv.to_str().unwrap(),
        "--version",
        "6",
        "--key",
        &secret_str,
        "--config",
        &cfg,
    ]);
    assert_eq!(decision_at(&sub, &p, B, 6).card_status.as_str(), "blocked");
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_gateway_started_empty_converges_from_the_retained_snapshot_and_later_updates() {
    let dir = scratch();
    let broker = broker(dir.path());
    let config = ticker_config(dir.path(), &broker.url(), "");
    let cfg = config.path.to_str().unwrap().to_string();
    let p = config.base();
    // The backend published the list before this gateway ever existed: 120 000 cards, three
    // chunks, A and B among them.
    let csv = dir.path().join("national.csv");
    let mut text = format!("{A},produced\n{B},blocked\n");
    for i in 0..120_000u32 {
        text.push_str(&format!("{},terminated\n", card(0x100000 + i)));
    }
    std::fs::write(&csv, text).unwrap();
    cli_ok(&[
        "blocklist",
        "publish-snapshot",
        csv.to_str().unwrap(),
        "--version",
        "10",
        "--config",
        &cfg,
    ]);

    let sub = Subscriber::start(broker.port, "ledger-conv", &[&format!("{p}/#")]);
    let mut daemon = Daemon::start(&config);
    let e = decision_at(&sub, &p, A, 10);
    assert_eq!(e.reason.map(|r| r.as_str()), Some("not_activated"));
    let s = status_where(&sub, &p, "version 10", |s| s["blocklist_version"] == 10);
    assert!(s["blocklist_age_s"].as_u64().unwrap() < 60);

    let u11 = write_update(dir.path(), "u11.json", 10, 11, &[(C, "suspended")], &[B]);
    cli_ok(&["blocklist", "publish-update", &u11, "--config", &cfg]);
    assert_eq!(
        decision_at(&sub, &p, C, 11).card_status.as_str(),
        "suspended"
    );
    assert_eq!(
        decision_at(&sub, &p, B, 11).card_status.as_str(),
        "unlisted"
    );
    assert_eq!(daemon.terminate(), Some(0));
    let out = cli_ok(&["blocklist", "stats", "--config", &cfg]);
    assert!(out.contains("version 11: 120002 listed cards"), "{out}");
}

/// The first tap after a start is decided on the list in force, whether the index is read
/// from the file saved with the list or (the file damaged) rebuilt from the database.
#[test]
fn a_tap_at_start_up_is_decided_on_the_list_whether_its_index_is_read_or_rebuilt() {
    let dir = scratch();
    let broker = broker(dir.path());
    // The card is presented from the first moment the reader is open.
    write_script(
        dir.path(),
        "at-start.txt",
        &format!("at 0 present {A}\nat 400 absent\n"),
    );
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        "[[reader]]\nname = \"gate\"\nkind = \"simulated\"\nscript = \"at-start.txt\"\npoll_ms = 10\ndirection = \"in\"\n",
    );
    let cfg = config.path.to_str().unwrap().to_string();
    let p = config.base();
    let mut csv = format!("{A},suspended\n");
    for i in 0..300_000u32 {
        csv.push_str(&format!("{},terminated\n", card(0x200000 + i)));
    }
    import_list(&cfg, &csv, &[]);
    let index = dir.path().join("data/blocklist.index");
    assert!(index.exists(), "the import saves the index");

    let sub = Subscriber::start(broker.port, "ledger-start", &[&format!("{p}/event")]);
    let start_and_tap = |n: usize| -> String {
        let mut daemon = Daemon::start(&config);
        wait_for("the tap at start", Duration::from_secs(20), || {
            sub.events(&format!("{p}/event")).len() >= n
        });
        let e = sub.events(&format!("{p}/event"))[n - 1].clone();
        assert_eq!(e.card_uid.to_string(), A);
        assert_eq!(e.card_status.as_str(), "suspended", "{e:?}");
        assert_eq!(e.reason.map(|r| r.as_str()), Some("suspended"));
        assert_eq!(e.blocklist_version, 1);
        assert_eq!(daemon.terminate(), Some(0));
        daemon.log_text()
    };

    let log = start_and_tap(1);
    assert!(
        !log.contains("index rebuilt"),
        "read from the saved file:\n{log}"
    );

    // A torn file (a disk that lied): rebuilt from the database, decided the same.
    let bytes = std::fs::read(&index).unwrap();
    std::fs::write(&index, &bytes[..bytes.len() / 2]).unwrap();
    let log = start_and_tap(2);
    assert!(
        log.contains("blocklist index rebuilt from the stored list"),
        "{log}"
    );
    assert!(log.contains("does not fit"), "the reason is named:\n{log}");

    // Saved again by that start: the next one reads it.
    let log = start_and_tap(3);
    assert!(!log.contains("index rebuilt"), "{log}");
}
