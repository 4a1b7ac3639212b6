//! The commissioning page (`[http]`), in a real headless Chromium and over plain HTTP.

use crate::ops::http_get;
use crate::support::browser::Browser;
use crate::support::*;
use id06_readers::pn532::emulator::PtyPeer;
use std::io::{Read, Write};
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

/// The port the daemon said its page is on.
fn page_port(daemon: &Daemon) -> u16 {
    let mut port = 0;
    wait_for(
        "the page's address in the log",
        Duration::from_secs(20),
        || {
            port = daemon
                .log_text()
                .split("commissioning page at http://127.0.0.1:")
                .nth(1)
                .and_then(|t| t.split('/').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            port != 0
        },
    );
    port
}

/// The status code and body of `GET path` with these extra header lines.
fn get(port: u16, path: &str, headers: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[test]
fn a_tap_at_a_reader_appears_live_on_the_page_in_chromium() {
    let rt = runtime();
    let _enter = rt.enter();
    let mut peer = PtyPeer::open().expect("a pty");
    let dir = scratch();
    let broker = broker(dir.path());
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!(
            "[[reader]]\nname = \"gate\"\nkind = \"line\"\npath = \"{}\"\nbaud = 115200\ndirection = \"in\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            peer.path().display()
        ),
    );
    let path = config.path.to_str().unwrap().to_string();
    import_list(&path, "04B10C4ED0000B,blocked\n", &[]);
    let mut daemon = Daemon::start(&config);
    let port = page_port(&daemon);
    let url = format!("http://127.0.0.1:{port}/");
    let mut page = Browser::open(&url, dir.path());
    // The page is up and live before any card is presented.
    let before = page.wait_for_text(
        "the page to show the gateway live",
        &[
            "SE-TEST / gate-test",
            "live",
            "gate",
            "connected",
            "No tap yet",
        ],
    );
    assert!(
        before.contains("v1 · 1 cards"),
        "the list in force: {before}"
    );
    assert_eq!(
        page.eval("document.querySelector('#readers tr[data-reader=\"gate\"] td:nth-child(2)').textContent"),
        "ok",
        "the reader's state"
    );
    // Two cards at the reader: one may pass, one is blocked.
    rt.block_on(peer.write(b"04A1B2C3D4E5F6\n04B10C4ED0000B\n"))
        .unwrap();
    let after = page.wait_for_text(
        "both taps on the page",
        &["04A1B2C3D4E5F6", "04B10C4ED0000B", "Kortet är spärrat"],
    );
    assert!(!after.contains("No tap yet"), "{after}");
    // Newest first, each with its decision.
    let rows = page.eval(
        "[...document.querySelectorAll('#taps tr')].map(r => [r.querySelector('.uid').textContent, r.querySelector('.badge').textContent])",
    );
    assert_eq!(
        rows,
        serde_json::json!([["04B10C4ED0000B", "denied"], ["04A1B2C3D4E5F6", "granted"]])
    );
    // The counts follow within the next status tick.
    page.wait_for_text("the counts", &["2 taps · 1 granted · 1 denied"]);
    assert_eq!(daemon.terminate(), Some(0));
    // With the daemon gone the page says so instead of showing stale data as live.
    page.wait_for_text("the page to notice", &["reconnecting"]);
}

#[test]
fn the_page_reloaded_shows_the_last_taps_and_its_api_and_metrics_answer() {
    let dir = scratch();
    let broker = broker(dir.path());
    write_script(
        dir.path(),
        "s.txt",
        "at 0 present 04A10000000001\nat 300 absent\nat 600 present 04B10000000002\nat 900 absent\nat 1200 end\n",
    );
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        "[[reader]]\nname = \"sim\"\nkind = \"simulated\"\nscript = \"s.txt\"\ndirection = \"in\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut daemon = Daemon::start(&config);
    let port = page_port(&daemon);
    wait_for("two taps", Duration::from_secs(20), || {
        http_get(port, "/api/status").contains("04B10000000002")
    });
    let (code, body) = get(port, "/api/status", "");
    assert_eq!(code, 200);
    let json: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["status"]["site_id"], "SE-TEST");
    assert_eq!(json["status"]["counts"]["taps"], 2);
    assert_eq!(json["taps"][0]["card_uid"], "04A10000000001");
    assert_eq!(json["taps"][1]["seq"], 2);
    let metrics = http_get(port, "/metrics");
    assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
    assert!(metrics.contains("\nid06d_taps_total 2\n"), "{metrics}");
    assert!(
        metrics.contains("id06d_reader_up{reader=\"sim\"}"),
        "{metrics}"
    );
    assert_eq!(get(port, "/nothing-here", "").0, 404);
    // A page opened after the taps shows them from the snapshot.
    let mut page = Browser::open(&format!("http://127.0.0.1:{port}/"), dir.path());
    page.wait_for_text("the earlier taps", &["04A10000000001", "04B10000000002"]);
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_page_on_the_network_needs_a_password_file_and_asks_for_the_password() {
    let dir = scratch();
    let broker = broker(dir.path());
    // Reachable from the network without a password: refused, naming the key and line.
    let open = TestConfig::write(
        dir.path(),
        &broker.url(),
        "[http]\nlisten = \"0.0.0.0:0\"\n",
    );
    let (code, _, err) = id06d(&["check-config", "--config", open.path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("[http] listen") && err.contains("password_file"),
        "{err}"
    );
    assert!(err.contains("id06d.toml:"), "file and line: {err}");
    // A password file that is missing is named by check-config.
    let missing = TestConfig::write(
        dir.path(),
        &broker.url(),
        "[http]\nlisten = \"127.0.0.1:0\"\npassword_file = \"nope.txt\"\n",
    );
    let (code, _, err) = id06d(&["check-config", "--config", missing.path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope.txt"), "{err}");
    // With the password: nothing without it, everything with it.
    std::fs::write(dir.path().join("page.pw"), "gate-pass-42\n").unwrap();
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        "[http]\nlisten = \"127.0.0.1:0\"\npassword_file = \"page.pw\"\n",
    );
    let mut daemon = Daemon::start(&config);
    let port = page_port(&daemon);
    let (code, reply) = get(port, "/", "");
    assert_eq!(code, 401);
    assert!(
        reply.contains("www-authenticate: Basic realm=\"id06d\""),
        "{reply}"
    );
    assert_eq!(get(port, "/metrics", "").0, 401);
    use base64::Engine;
    let auth = |pass: &str| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("installer:{pass}"))
        )
    };
    assert_eq!(get(port, "/api/status", &auth("wrong")).0, 401);
    let (code, page) = get(port, "/", &auth("gate-pass-42"));
    assert_eq!(code, 200);
    assert!(page.contains("<title>id06d</title>"), "{page}");
    assert_eq!(get(port, "/metrics", &auth("gate-pass-42")).0, 200);
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_taken_page_port_is_logged_and_taps_go_on() {
    let dir = scratch();
    let broker = broker(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    write_script(
        dir.path(),
        "s.txt",
        "at 0 present 04A10000000001\nat 300 absent\nat 600 end\n",
    );
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!("[[reader]]\nname = \"sim\"\nkind = \"simulated\"\nscript = \"s.txt\"\ndirection = \"in\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-taken-port", &[&format!("{p}/event")]);
    let mut daemon = Daemon::start(&config);
    wait_for("the tap at the ledger", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() == 1
    });
    assert!(
        daemon
            .log_text()
            .contains(&format!("cannot listen for [http] on 127.0.0.1:{port}")),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.terminate(), Some(0));
}
