//! The command line as an operator uses it: configuration errors, the blocklist and outbox
//! commands, and what they say while the daemon holds the data directory.

use crate::support::*;
use std::time::Duration;

const BASE: &str = "site_id = \"SE-1\"\nterminal_id = \"t-1\"\ndata_dir = \"data\"\n";

fn write(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("c.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let dir = scratch();
    let cfg = write(dir.path(), &format!("{BASE}[[reader]]\nname = \"entry\"\nkind = \"pcsc\"\nmatch = \"ACR\"\ndirection = \"in\"\n"));
    let (code, out, err) = id06d(&["check-config", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("client_id    = \"id06d-t-1\""), "{out}");
    assert!(out.contains("gone_ms        = 500"), "{out}");
    assert!(out.contains("no public_key"), "{out}");
}

#[test]
fn configuration_mistakes_are_one_line_naming_the_line_and_exit_2() {
    let dir = scratch();
    let cases = [
        (format!("{BASE}[debounce]\ngone_mss = 5\n"), ":5:", "gone_mss"),
        (format!("{BASE}[debounce]\ngone_ms = \"fast\"\n"), ":5:", "invalid type"),
        (
            format!("{BASE}[[reader]]\nname = \"a\"\nkind = \"pcsc\"\nmatch = \"x\"\ndirection = \"in\"\n[[reader]]\nname = \"a\"\nkind = \"pcsc\"\nmatch = \"y\"\ndirection = \"in\"\n"),
            ":10:",
            "used twice",
        ),
        ("site_id = \"x\"\n".to_string(), "c.toml", "missing field"),
    ];
    for (text, line, needle) in cases {
        let cfg = write(dir.path(), &text);
        let (code, _, err) = id06d(&["check-config", "--config", &cfg]);
        assert_eq!(code, 2, "{text}: {err}");
        let err = err.trim_end();
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(err.contains(line) && err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = id06d(&["check-config", "--config", "/nonexistent/id06d.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/id06d.toml"), "{err}");
    let (code, _, _) = id06d(&["frobnicate"]);
    assert_eq!(code, 2, "usage errors exit 2");
}

#[test]
fn blocklist_import_lookup_and_stats() {
    let dir = scratch();
    let cfg = write(dir.path(), BASE);
    let out = import_list(
        &cfg,
        "04A1B2C3D4E5F6,blocked\n04:a1:b2:c3,suspended\nDEADBEEF,active\n",
        &[],
    );
    assert!(
        out.contains("imported 2 listed cards") && out.contains("version 1"),
        "{out}"
    );
    let (code, out, _) = id06d(&[
        "blocklist",
        "lookup",
        "04 a1 b2 c3 d4 e5 f6",
        "--config",
        &cfg,
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("card 04A1B2C3D4E5F6: blocked"), "{out}");
    assert!(out.contains("version 1"), "{out}");
    let (_, out, _) = id06d(&["blocklist", "lookup", "DEADBEEF", "--config", &cfg]);
    assert!(out.contains("unlisted"), "{out}");
    let (code, _, err) = id06d(&["blocklist", "lookup", "xyz", "--config", &cfg]);
    assert_eq!(code, 2);
    assert!(err.contains("\"xyz\""), "{err}");
    let (_, out, _) = id06d(&["blocklist", "stats", "--config", &cfg]);
    assert!(
        out.contains("2 listed cards") && out.contains("blocked     1"),
        "{out}"
    );

    // A bad file imports nothing and names every bad line.
    let csv = dir.path().join("list.csv");
    std::fs::write(&csv, "04A1B2C3D4E5F6,terminated\nbad line\n04A1B2C3,lost\n").unwrap();
    let (code, _, err) = id06d(&[
        "blocklist",
        "import",
        csv.to_str().unwrap(),
        "--config",
        &cfg,
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("list.csv:2:") && err.contains("list.csv:3:"),
        "{err}"
    );
    let (_, out, _) = id06d(&["blocklist", "lookup", "04A1B2C3D4E5F6", "--config", &cfg]);
    assert!(
        out.contains("blocked") && out.contains("version 1"),
        "the old list stays: {out}"
    );
}

#[test]
fn commands_say_plainly_when_the_daemon_holds_the_data_directory() {
    let dir = scratch();
    let broker = broker(dir.path());
    write_script(dir.path(), "s.txt", "at 0 absent\n");
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        "[[reader]]\nname = \"r\"\nkind = \"simulated\"\nscript = \"s.txt\"\ndirection = \"in\"\n",
    );
    let mut daemon = Daemon::start(&config);
    wait_for("the daemon to start", Duration::from_secs(10), || {
        daemon.log_text().contains("id06d starting")
    });
    // A command that writes cannot share the database with the daemon: it says so at once.
    let csv = dir.path().join("l.csv");
    std::fs::write(&csv, "04A1B2C3D4E5F6,blocked\n").unwrap();
    let started = std::time::Instant::now();
    let (code, _, err) = id06d(&[
        "blocklist",
        "import",
        csv.to_str().unwrap(),
        "--config",
        config.path.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("in use by another id06d process"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it does not hang"
    );
    assert_eq!(daemon.terminate(), Some(0));
    let (code, out, err) = id06d(&["outbox", "stats", "--config", config.path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("outbox depth:   0"), "{out}");
}

#[test]
fn a_data_directory_of_another_terminal_is_refused() {
    let dir = scratch();
    let cfg = write(dir.path(), BASE);
    import_list(&cfg, "04A1B2C3D4E5F6,blocked\n", &[]);
    let (code, _, err) = id06d(&["outbox", "stats", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    let cfg = write(dir.path(), &BASE.replace("t-1", "t-2"));
    let (code, _, err) = id06d(&["outbox", "stats", "--config", &cfg]);
    assert_eq!(code, 1);
    assert!(err.contains("belongs to terminal \"t-1\""), "{err}");
}

/// An installer's `sudo id06d blocklist import …` (or an inspector's `events export`) on a
/// stopped gateway: every file it creates in the daemon user's data directory must belong
/// to that user afterwards, or the daemon could not open its own database at the next start.
#[test]
fn a_root_command_leaves_every_file_to_the_data_directory_owner() {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch();
    let cfg = write(dir.path(), BASE);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(4242), Some(4343))
        .unwrap_or_else(|e| panic!("the tests run as root (see README); chown failed: {e}"));
    import_list(&cfg, "04A1B2C3D4E5F6,blocked\n", &[]);
    export_events(&cfg, "csv");
    let mut seen = Vec::new();
    let mut folders = vec![data.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            if m.is_dir() {
                folders.push(path.clone());
            }
            assert_eq!(
                (m.uid(), m.gid()),
                (4242, 4343),
                "{} belongs to the data directory's owner",
                path.display()
            );
            seen.push(path);
        }
    }
    assert!(
        seen.iter().any(|p| p.ends_with("db/db")) && seen.len() >= 4,
        "the commands created the database: {seen:?}"
    );
}

#[test]
fn read_only_commands_never_create_a_data_directory() {
    let dir = scratch();
    let cfg = write(dir.path(), BASE);
    let data = dir.path().join("data");
    for args in [
        vec!["outbox", "stats"],
        vec!["events", "export", "--since", "2026-01-01"],
        vec!["blocklist", "stats"],
        vec!["blocklist", "lookup", "04A1B2C3D4E5F6"],
    ] {
        let mut full = args.clone();
        full.extend_from_slice(&["--config", &cfg]);
        let (code, out, err) = id06d(&full);
        assert_eq!(code, 1, "{args:?}: {out}");
        assert!(
            err.contains("there is no id06d data directory at") && err.contains("data"),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!data.exists(), "{args:?} created {}", data.display());
    }
    // An empty directory is no data directory either, and stays empty.
    std::fs::create_dir(&data).unwrap();
    let (code, _, err) = id06d(&["outbox", "stats", "--config", &cfg]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
}

#[test]
fn config_defaults_to_the_documented_place_and_id06d_config() {
    let dir = scratch();
    let cfg = write(dir.path(), BASE);
    import_list(&cfg, "04A1B2C3D4E5F6,blocked\n", &[]);
    // Without --config: ID06D_CONFIG, else /etc/id06d/id06d.toml (named when missing).
    let out = std::process::Command::new(ID06D)
        .args(["outbox", "stats"])
        .env("ID06D_CONFIG", &cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !std::path::Path::new("/etc/id06d/id06d.toml").exists() {
        let out = std::process::Command::new(ID06D)
            .args(["outbox", "stats"])
            .env_remove("ID06D_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("/etc/id06d/id06d.toml"));
    }
}

#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let dir = scratch();
    let cfg = write(dir.path(), BASE);
    import_list(&cfg, "04A1B2C3D4E5F6,blocked\n", &[]);
    for args in [
        vec!["outbox", "stats", "--config", &cfg],
        vec!["blocklist", "stats", "--config", &cfg],
        vec!["check-config", "--config", &cfg],
    ] {
        let mut child = std::process::Command::new(ID06D)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader goes away before anything is written
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
}

#[test]
fn check_config_reads_what_run_will_read() {
    let dir = scratch();
    let readers =
        "[[reader]]\nname = \"entry\"\nkind = \"pcsc\"\nmatch = \"ACR\"\ndirection = \"in\"\n";
    // A password file that is not there.
    let cfg = write(
        dir.path(),
        &format!("{BASE}[mqtt]\nusername = \"gate\"\npassword_file = \"nope.pw\"\n{readers}"),
    );
    let (code, _, err) = id06d(&["check-config", "--config", &cfg]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("c.toml") && err.contains("password_file") && err.contains("nope.pw"),
        "{err}"
    );
    // A data_dir that is a file.
    std::fs::write(dir.path().join("data"), b"x").unwrap();
    let cfg = write(dir.path(), &format!("{BASE}{readers}"));
    let (code, _, err) = id06d(&["check-config", "--config", &cfg]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("data_dir") && err.contains("not a directory"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("data")).unwrap();
    // No reader: it passes, with a warning.
    let cfg = write(dir.path(), BASE);
    let (code, _, err) = id06d(&["check-config", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no [[reader]]"), "{err}");
}

#[test]
fn the_backend_side_commands_need_only_the_broker() {
    let dir = scratch();
    let broker = broker(dir.path());
    // A file with only [mqtt]: enough to publish an update.
    let cfg = write(dir.path(), &format!("[mqtt]\nurl = \"{}\"\n", broker.url()));
    let update = dir.path().join("u.json");
    std::fs::write(
        &update,
        r#"{"schema":"id06d/blocklist-update/v1","from_version":0,"to_version":1,"set":[],"clear":[]}"#,
    )
    .unwrap();
    let (code, out, err) = id06d(&[
        "blocklist",
        "publish-update",
        update.to_str().unwrap(),
        "--config",
        &cfg,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published update 0→1"), "{out}");
    // Its mistakes are still named.
    let bad = write(dir.path(), "[mqtt]\nurl = \"http://x\"\n");
    let (code, _, err) = id06d(&[
        "blocklist",
        "publish-update",
        update.to_str().unwrap(),
        "--config",
        &bad,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("c.toml:2") && err.contains("mqtt://"), "{err}");
}
