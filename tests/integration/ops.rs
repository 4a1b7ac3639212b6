//! What an installer relies on: the Prometheus endpoint, the Debian package, and the
//! systemd unit as systemd's own tools judge it.

use crate::support::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The whole response, or "" while nothing listens yet.
pub(crate) fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // One write: the request line must not reach the server in pieces by accident.
    if s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .is_err()
    {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn metrics_count_taps_decisions_and_delivery() {
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
        "[[reader]]\nname = \"gate\"\nkind = \"simulated\"\nscript = \"s.txt\"\ndirection = \"in\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    import_list(
        config.path.to_str().unwrap(),
        "04B10000000002,suspended\n",
        &[],
    );
    let mut daemon = Daemon::start(&config);
    // Port 0: the daemon picks a free port and logs it (no race with other tests' ports).
    let mut port = 0u16;
    wait_for(
        "the metrics address in the log",
        Duration::from_secs(20),
        || {
            port = daemon
                .log_text()
                .split("metrics at http://127.0.0.1:")
                .nth(1)
                .and_then(|t| t.split('/').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            port != 0
        },
    );
    let mut text = String::new();
    wait_for(
        "two delivered taps in the metrics",
        Duration::from_secs(20),
        || {
            text = http_get(port, "/metrics");
            text.contains("id06d_delivered_total 2")
        },
    );
    assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
    for line in [
        "id06d_taps_total 2",
        "id06d_granted_total 1",
        "id06d_denied_total{reason=\"suspended\"} 1",
        "id06d_outbox_depth 0",
        "id06d_blocklist_version 1",
        "id06d_blocklist_cards 1",
        "id06d_reader_recoveries_total{reader=\"gate\"} 0",
        "id06d_broker_connected 1",
        "id06d_storage_error 0",
        "id06d_last_seq 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(http_get(port, "/other").starts_with("HTTP/1.0 404"));
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn the_debian_package_holds_the_binary_unit_config_and_user_setup() {
    let dir = scratch();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let deb = build_deb(dir.path(), None).display().to_string();
    let contents = Command::new("dpkg-deb")
        .args(["--contents", &deb])
        .output()
        .unwrap();
    let contents = String::from_utf8_lossy(&contents.stdout);
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/id06d"),
        ("-rw-r--r--", "./lib/systemd/system/id06d.service"),
        ("-rw-r--r--", "./etc/id06d/id06d.toml"),
        ("-rw-r--r--", "./usr/share/doc/id06d/README.md"),
        ("-rw-r--r--", "./usr/share/doc/id06d/copyright"),
        ("-rw-r--r--", "./usr/share/doc/id06d/changelog.gz"),
        ("-rw-r--r--", "./usr/share/doc/id06d/contract.md"),
        ("-rw-r--r--", "./usr/share/doc/id06d/asyncapi.yaml"),
        (
            "-rw-r--r--",
            "./usr/share/doc/id06d/schemas/event.schema.json",
        ),
        (
            "-rw-r--r--",
            "./usr/share/doc/id06d/examples/mosquitto-acl.conf",
        ),
        ("-rw-r--r--", "./usr/share/man/man8/id06d.8.gz"),
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) missing from\n{contents}"
        );
    }
    let field = |f: &str| {
        let o = Command::new("dpkg-deb")
            .args(["--field", &deb, f])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "id06d");
    assert!(field("Depends").contains("libc6") && field("Depends").contains("adduser"));
    assert!(field("Depends").contains("init-system-helpers"));
    assert!(field("Recommends").contains("mosquitto"));
    let x = dir.path().join("x");
    let st = Command::new("dpkg-deb")
        .args(["--control", &deb])
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(x.join("conffiles")).unwrap().trim(),
        "/etc/id06d/id06d.toml"
    );
    let postinst = std::fs::read_to_string(x.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group"), "{postinst}");
    // Debian's own checker has nothing to say about it.
    let lintian = Command::new("lintian")
        .args(["--tag-display-limit", "0", &deb])
        .output()
        .expect("lintian runs (Debian: lintian; ./run.sh test installs it)");
    let said = String::from_utf8_lossy(&lintian.stdout);
    let complaints: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(complaints.is_empty(), "lintian: {complaints:#?}");
    // The packaged example configuration asks for this gate's identity, and is valid once
    // it has it.
    let cfg = dir.path().join("id06d.toml");
    let shipped = std::fs::read_to_string(root.join("systemd/id06d.toml")).unwrap();
    std::fs::write(&cfg, &shipped).unwrap();
    let (code, _, err) = id06d(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("site_id"), "{err}");
    std::fs::write(
        &cfg,
        shipped
            .replace("# site_id     = ", "site_id     = ")
            .replace("# terminal_id = ", "terminal_id = "),
    )
    .unwrap();
    let (code, _, err) = id06d(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn systemd_accepts_the_unit_and_rates_its_exposure_below_2() {
    let dir = scratch();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Point the unit at the binary under test (systemd checks that it exists).
    let unit = std::fs::read_to_string(root.join("systemd/id06d.service"))
        .unwrap()
        .replace("/usr/bin/id06d", ID06D);
    let path = dir.path().join("id06d.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian: systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("id06d.service:"),
        "systemd complains about the unit: {text}"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for id06d.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in\n{text}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score < 2.0, "exposure {score}");
}

#[test]
fn events_export_outbox_stats_and_blocklist_lookups_work_while_the_daemon_runs_and_after_it_stopped(
) {
    let dir = scratch();
    let broker = broker(dir.path());
    write_script(
        dir.path(),
        "s.txt",
        "at 0 present 04A10000000001\nat 300 absent\nat 600 present 04B10000000002\nat 900 absent\nat 1200 present 04C10000000003\nat 1500 absent\nat 1800 end\n",
    );
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        "[[reader]]\nname = \"gate\"\nkind = \"simulated\"\nscript = \"s.txt\"\ndirection = \"in\"\n",
    );
    let path = config.path.to_str().unwrap().to_string();
    import_list(&path, "04B10000000002,suspended\n", &[]);
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-export", &[&format!("{p}/event")]);
    let mut daemon = Daemon::start(&config);
    wait_for("three delivered events", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() >= 3
    });
    // The MQTT task removes acknowledged events from the outbox just after the PUBACK.
    let stats = || id06d(&["outbox", "stats", "--config", &path]);
    wait_for("the outbox to be empty", Duration::from_secs(20), || {
        stats().1.contains("outbox depth:   0")
    });
    let (code, out, err) = stats();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("last seq:       3"), "{out}");

    let export = |format: &str| export_events(&path, format);
    let running_csv = export("csv");
    let lines: Vec<&str> = running_csv.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three taps:\n{running_csv}");
    assert!(lines[0].starts_with("event_id,seq,local_time,occurred_at_utc"));
    for (i, line) in lines[1..].iter().enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        assert!(
            fields[0].starts_with("SE-TEST:gate-test:")
                && fields[0].ends_with(&format!(":{}", i + 1)),
            "{line}"
        );
        assert!(
            fields[2].ends_with("CET") || fields[2].ends_with("CEST"),
            "Stockholm time: {line}"
        );
        assert!(fields[3].ends_with('Z'), "UTC beside it: {line}");
        assert_eq!(fields[10], "yes", "delivered: {line}");
    }
    assert!(lines[2].contains(",denied,suspended,"), "{}", lines[2]);
    let json = export("json");
    // The same columns as the CSV: the event, acknowledged by the broker, stored by the ledger.
    let lines: Vec<id06d::ops::control::ExportedEvent> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("an exported event per line"))
        .collect();
    assert_eq!(
        lines.iter().map(|l| l.event.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        json.lines()
            .all(|l| l.contains("\"acked_by_broker\":true")
                && l.contains("\"stored_by_ledger\":false")),
        "{json}"
    );
    // Narrowed: a seq range, a stream, a time window.
    let narrowed = |extra: &[&str]| {
        let mut args = vec![
            "events",
            "export",
            "--since",
            "2020-01-01",
            "--config",
            &path,
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = id06d(&args);
        assert_eq!(code, 0, "{extra:?}: {err}");
        out.lines().count() - 1
    };
    assert_eq!(narrowed(&["--from-seq", "2", "--to-seq", "2"]), 1);
    assert_eq!(narrowed(&["--from-seq", "2"]), 2);
    let stream = lines[0].event.stream.to_string();
    assert_eq!(narrowed(&["--stream", &stream]), 3);
    assert_eq!(
        narrowed(&["--stream", "0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95"]),
        0
    );
    assert_eq!(narrowed(&["--until", "2020-01-02"]), 0);
    let (code, _, err) = id06d(&[
        "events",
        "export",
        "--since",
        "2020-01-01",
        "--from-seq",
        "3",
        "--to-seq",
        "2",
        "--config",
        &path,
    ]);
    assert_eq!(code, 2, "{err}");

    // The blocklist in force, from the running daemon.
    let lookup = || {
        let (code, out, err) = id06d(&["blocklist", "lookup", "04B10000000002", "--config", &path]);
        assert_eq!(code, 0, "lookup: {err}");
        out
    };
    let bl_stats = || {
        let (code, out, err) = id06d(&["blocklist", "stats", "--config", &path]);
        assert_eq!(code, 0, "blocklist stats: {err}");
        out
    };
    let running_lookup = lookup();
    assert!(
        running_lookup
            .starts_with("card 04B10000000002: suspended\nblocklist version 1, confirmed "),
        "{running_lookup}"
    );
    let running_stats = bl_stats();
    assert!(
        running_stats.starts_with("blocklist version 1: 1 listed cards\n"),
        "{running_stats}"
    );
    assert!(
        running_stats.contains("  suspended   1\n"),
        "{running_stats}"
    );
    assert!(
        running_stats.contains("  blocked     0\n"),
        "{running_stats}"
    );
    let (code, _, err) = id06d(&["blocklist", "lookup", "not-a-uid", "--config", &path]);
    assert_eq!(code, 2, "a bad UID is a usage error: {err}");

    // Anything but a known request gets one error line; the daemon carries on.
    {
        use std::io::{Read, Write};
        let mut s =
            std::os::unix::net::UnixStream::connect(dir.path().join("data/control.sock")).unwrap();
        s.write_all(b"drop-everything\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("error: unknown request"), "{reply}");
    }
    assert!(daemon.is_running());
    assert_eq!(daemon.terminate(), Some(0));
    assert!(
        !dir.path().join("data/control.sock").exists(),
        "the socket goes with the daemon"
    );
    assert_eq!(
        export("csv"),
        running_csv,
        "the same export from the database itself"
    );
    let first_line = |t: &str| t.lines().next().unwrap_or_default().to_string();
    assert_eq!(first_line(&lookup()), first_line(&running_lookup));
    assert_eq!(first_line(&bl_stats()), first_line(&running_stats));
}

#[test]
fn two_thousand_idle_metrics_connections_stop_neither_taps_nor_the_control_socket() {
    // This test opens thousands of sockets itself.
    // SAFETY: getrlimit/setrlimit on this test process's own limits.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(8192);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let dir = scratch();
    let broker = broker(dir.path());
    let config = stream_config(
        dir.path(),
        &broker.url(),
        600,
        100,
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let path = config.path.to_str().unwrap().to_string();
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-idle-http", &[&format!("{p}/event")]);
    // The daemon under systemd's default soft limit of 1024 descriptors.
    let mut daemon = Daemon::start_under(&config, &["prlimit", "--nofile=1024:1024", "--"]);
    let mut port = 0u16;
    wait_for(
        "the metrics address in the log",
        Duration::from_secs(20),
        || {
            port = daemon
                .log_text()
                .split("metrics at http://127.0.0.1:")
                .nth(1)
                .and_then(|t| t.split('/').next())
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            port != 0
        },
    );
    // 2000 connections that send nothing, opened at once; those beyond the endpoint's
    // limit and the kernel's backlog hang in the handshake.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let idle: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let attempts: Vec<_> = (0..2000)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio::net::TcpStream::connect(addr),
                ))
            })
            .collect();
        let mut open = Vec::new();
        for a in attempts {
            if let Ok(Ok(Ok(s))) = a.await {
                open.push(s);
            }
        }
        open
    });
    eprintln!("{} idle connections open", idle.len());
    let before = sub.events(&format!("{p}/event")).len();
    wait_for("taps delivered meanwhile", Duration::from_secs(20), || {
        sub.events(&format!("{p}/event")).len() >= before + 20
    });
    let (code, out, err) = id06d(&["outbox", "stats", "--config", &path]);
    assert_eq!(code, 0, "the control socket answers: {err}");
    assert!(out.contains("last seq"), "{out}");
    drop(idle);
    drop(rt);
    wait_for("/metrics again", Duration::from_secs(20), || {
        http_get(port, "/metrics").contains("id06d_taps_total")
    });
    assert_eq!(daemon.terminate(), Some(0));
    let text = daemon.log_text();
    assert!(!text.contains("Too many open files"), "{text}");
}
