//! `mqtts://` against a real mosquitto with TLS listeners, certificates made by `openssl`
//! during the test: a CA, a server certificate for 127.0.0.1, a client certificate, an
//! expired server certificate and a second, unrelated CA.
//!
//! The ledger subscribes on the broker's plain loopback listener; only the gateway's
//! connection is under test.

use crate::support::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs (Debian: openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `name`: `name.pem`, `name.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `name.pem`/`name.key` signed by `ca`, valid for `days` (negative: already
/// expired), for 127.0.0.1 as a server or as a client.
fn make_cert(dir: &Path, ca: &str, name: &str, days: i32, server: bool) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    let ext = if server {
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    } else {
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    };
    std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write the extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            &days.to_string(),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// Everything the tests need, in `dir/pki`.
fn pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    make_ca(&pki, "ca");
    make_ca(&pki, "other-ca");
    make_cert(&pki, "ca", "server", 2, true);
    make_cert(&pki, "ca", "expired", -1, true);
    make_cert(&pki, "ca", "gate", 2, false);
    pki
}

fn passwords(dir: &Path, entries: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("passwords");
    std::fs::write(&path, "").expect("password file");
    for (user, password) in entries {
        let out = Command::new("mosquitto_passwd")
            .args(["-b", path.to_str().expect("utf-8 path"), user, password])
            .output()
            .expect("mosquitto_passwd (Debian: mosquitto)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    path
}

/// A broker whose plain listener is open (for the ledger) and with two TLS listeners: one
/// with the good server certificate that wants a client certificate and a password, one
/// with the expired certificate. Returns (broker, good TLS port, expired TLS port).
fn tls_broker(dir: &Path, pki: &Path, password_file: &Path) -> (LocalBroker, u16, u16) {
    let good = id06d::mqtt::broker::free_port().expect("a free port");
    let expired = id06d::mqtt::broker::free_port().expect("a free port");
    let p = |f: &str| pki.join(f).display().to_string();
    let extra = format!(
        "listener {good} 127.0.0.1\ncafile {ca}\ncertfile {sc}\nkeyfile {sk}\n\
         require_certificate true\nallow_anonymous false\npassword_file {pw}\n\
         listener {expired} 127.0.0.1\ncafile {ca}\ncertfile {ec}\nkeyfile {ek}\n\
         allow_anonymous true\n",
        ca = p("ca.pem"),
        sc = p("server.pem"),
        sk = p("server.key"),
        ec = p("expired.pem"),
        ek = p("expired.key"),
        pw = password_file.display(),
    );
    let broker = LocalBroker::start_with_listeners(&dir.join("broker"), &extra)
        .expect("mosquitto with TLS listeners");
    (broker, good, expired)
}

/// A gateway with one simulated reader that taps `taps` cards, 100 ms apart.
fn gateway(dir: &Path, port: u16, mqtt: &str, taps: u32) -> TestConfig {
    let mut script = String::new();
    for i in 0..taps {
        script.push_str(&format!("at {} present {}\n", i * 100, card(500 + i)));
        script.push_str(&format!("at {} absent\n", i * 100 + 60));
    }
    script.push_str(&format!("at {} end\n", taps * 100 + 100));
    write_script(dir, "taps.txt", &script);
    let config = TestConfig::write(
        dir,
        &format!("mqtts://127.0.0.1:{port}"),
        "[[reader]]\nname = \"gate\"\nkind = \"simulated\"\nscript = \"taps.txt\"\npoll_ms = 10\ndirection = \"in\"\n\n[debounce]\ngone_ms = 40\n",
    );
    let text = std::fs::read_to_string(&config.path)
        .expect("read the configuration")
        .replace("[mqtt]\n", &format!("[mqtt]\n{mqtt}"));
    std::fs::write(&config.path, text).expect("write the configuration");
    config
}

/// Waits until the daemon's log satisfies `cond`; fails with the log.
fn wait_log(daemon: &Daemon, what: &str, cond: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + LONG;
    while !cond(&daemon.log_text()) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {LONG:?} waiting for {what}; the log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn seqs(sub: &Subscriber, p: &str) -> BTreeSet<u64> {
    sub.events(&format!("{p}/event"))
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[test]
fn tls_with_ca_client_certificate_and_password_delivers_every_event() {
    let dir = scratch();
    let pki = pki(dir.path());
    let pw = passwords(dir.path(), &[("gate", "s3cret")]);
    std::fs::write(dir.path().join("mqtt-password"), "s3cret\n").expect("password");
    let (broker, good, _) = tls_broker(dir.path(), &pki, &pw);
    let config = gateway(
        dir.path(),
        good,
        &format!(
            "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\nusername = \"gate\"\npassword_file = \"mqtt-password\"\n",
            pki.join("ca.pem").display(),
            pki.join("gate.pem").display(),
            pki.join("gate.key").display()
        ),
        5,
    );
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-tls", &[&format!("{p}/event")]);
    let mut daemon = Daemon::start(&config);
    wait_for("five events over TLS", LONG, || seqs(&sub, &p).len() >= 5);
    assert_eq!(seqs(&sub, &p), (1..=5).collect());
    assert!(
        daemon.log_text().contains("connected to the MQTT broker"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.terminate(), Some(0));
}

/// One gateway, one data directory: each wrong setting is one clear line while the taps
/// wait in the outbox; with the settings right, every one of them arrives.
#[test]
fn tls_wrong_ca_expired_certificate_missing_client_certificate_and_wrong_password_each_one_line_then_all_delivered(
) {
    let dir = scratch();
    let pki = pki(dir.path());
    let pw = passwords(dir.path(), &[("gate", "s3cret")]);
    std::fs::write(dir.path().join("right-password"), "s3cret\n").expect("password");
    std::fs::write(dir.path().join("wrong-password"), "guess\n").expect("password");
    let (broker, good, expired) = tls_broker(dir.path(), &pki, &pw);
    let f = |name: &str| pki.join(name).display().to_string();
    let client = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"\n",
        f("gate.pem"),
        f("gate.key")
    );
    let login = |file: &str| format!("username = \"gate\"\npassword_file = \"{file}\"\n");
    let cases = [
        (
            "wrong CA",
            good,
            format!(
                "ca_file = \"{}\"\n{client}{}",
                f("other-ca.pem"),
                login("right-password")
            ),
            "not signed by a CA in",
        ),
        (
            "expired server certificate",
            expired,
            format!("ca_file = \"{}\"\n", f("ca.pem")),
            "has expired",
        ),
        (
            "no client certificate",
            good,
            format!("ca_file = \"{}\"\n{}", f("ca.pem"), login("right-password")),
            "the broker wants a client certificate",
        ),
        (
            "wrong password",
            good,
            format!(
                "ca_file = \"{}\"\n{client}{}",
                f("ca.pem"),
                login("wrong-password")
            ),
            "the broker refused the connection",
        ),
    ];
    let mut taps = 0u32;
    let mut p = String::new();
    let sub = Subscriber::start(broker.port, "ledger-tls-faults", &["id06/v1/+/+/event"]);
    for (what, port, mqtt, needle) in &cases {
        taps += 3;
        let config = gateway(dir.path(), *port, mqtt, taps);
        p = config.base();
        let mut daemon = Daemon::start(&config);
        wait_log(&daemon, &format!("the {what} line"), |log| {
            log.contains(needle)
        });
        // It keeps trying (debug lines per attempt) but says it once.
        wait_log(&daemon, &format!("retries after the {what}"), |log| {
            log.matches("MQTT connect failed again").count() >= 2
        });
        let log = daemon.log_text();
        assert_eq!(
            log.matches("MQTT broker unreachable").count(),
            1,
            "{what}: one line per outage:\n{log}"
        );
        assert!(daemon.is_running(), "{what}: no crash");
        assert!(seqs(&sub, &p).is_empty(), "{what}: nothing got through");
        assert_eq!(daemon.terminate(), Some(0), "{what}");
    }
    // The script replays from the start on each run: every run's taps are new events.
    let stored = outbox_stats(&gateway(dir.path(), good, "", 0)).1;
    assert!(
        stored >= 4 * 3,
        "taps stored while the broker was out of reach: {stored}"
    );
    let config = gateway(
        dir.path(),
        good,
        &format!(
            "ca_file = \"{}\"\n{client}{}",
            f("ca.pem"),
            login("right-password")
        ),
        taps,
    );
    let mut daemon = Daemon::start(&config);
    wait_for("every stored event delivered", LONG, || {
        seqs(&sub, &p).len() as u64 >= stored
    });
    // One snapshot: the script goes on tapping, so a second look may hold one more.
    let got = seqs(&sub, &p);
    assert_eq!(got, (1..=got.len() as u64).collect());
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn tls_check_config_reads_the_ca_and_key_files_and_names_a_bad_one() {
    let dir = scratch();
    let pki = pki(dir.path());
    let f = |name: &str| pki.join(name).display().to_string();
    let good = gateway(
        dir.path(),
        8883,
        &format!(
            "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            f("ca.pem"),
            f("gate.pem"),
            f("gate.key")
        ),
        1,
    );
    let path = good.path.to_str().expect("utf-8 path");
    let (code, out, err) = id06d(&["check-config", "--config", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("TLS"), "{out}");

    for (what, mqtt, needle) in [
        (
            "a missing CA file",
            format!("ca_file = \"{}\"\n", f("nowhere.pem")),
            "nowhere.pem: cannot read it",
        ),
        (
            "a key instead of a CA",
            format!("ca_file = \"{}\"\n", f("gate.key")),
            "holds no certificate",
        ),
        (
            "a key that is not the certificate's",
            format!(
                "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
                f("ca.pem"),
                f("gate.pem"),
                f("server.key")
            ),
            "do not go together",
        ),
    ] {
        let bad = gateway(dir.path(), 8883, &mqtt, 1);
        let (code, out, err) = id06d(&[
            "check-config",
            "--config",
            bad.path.to_str().expect("utf-8 path"),
        ]);
        assert_ne!(code, 0, "{what}: {out}");
        assert!(err.contains(needle), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
    }
}
