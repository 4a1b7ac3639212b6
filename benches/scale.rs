//! The gateway at national scale (#17, goals 2 and 3): a national list of
//! `ID06D_SCALE_CARDS` cards (default 5 000 000), against the same gateway with an empty
//! list in the same run.
//!
//! - **Start**: from spawning the daemon to the first tap decided — a listed card written
//!   to a line reader on a pty every 5 ms from the moment of the spawn, timed until its
//!   decision arrives on `P/decision` at a subscriber (so the time includes opening the
//!   store, the list, the reader and the broker session; the empty list's time is that
//!   floor). The decision must carry the card's listed status: a tap decided before the
//!   list is in force would say `unlisted` and fails the run.
//! - **Memory**: VmRSS one second after that first decision, and what the list adds per
//!   listed card.
//! - **Snapshot**: with the daemon running on the list, a whole new list of the same size
//!   (every card's status changed) is published as the retained snapshot with
//!   `id06d blocklist publish-snapshot`; the daemon's peak RSS (VmHWM, reset just before)
//!   until the new version is in force, and the time it took.
//!
//! `ID06D_SCALE_ROUNDS` (default 5) start rounds alternate the parts. `ID06D_SCALE_OTHER`
//! names another build of the daemon, measured on the same two data directories for a
//! before/after comparison in one run.
//!
//! The daemon is the binary as it ships (built into `target/shipped` by the bench, or
//! `ID06D_BENCH_BIN`).
//! Run: `cargo bench -p id06d --bench scale` (about 3 minutes at 5 million cards).

#[path = "common/mod.rs"]
mod common;

use common::{env_or, ms, subscriber};
use id06_readers::pn532::emulator::PtyPeer;
use id06d::mqtt::broker::LocalBroker;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PREFIX: &str = "scale";
const SITE: &str = "SE-SCALE";
const STATUSES: [&str; 4] = ["blocked", "terminated", "suspended", "produced"];

/// Card `i` of the list: 7-byte UIDs spread over the whole range.
fn card(i: u64) -> String {
    format!(
        "04{:012X}",
        i.wrapping_mul(2_654_435_761) & 0xFFFF_FFFF_FFFF
    )
}

/// Writes the list as CSV, card `i` with status `i + shift`.
fn write_list(path: &Path, cards: u64, shift: u64) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("the list file"));
    for i in 0..cards {
        writeln!(out, "{},{}", card(i), STATUSES[((i + shift) % 4) as usize]).expect("write");
    }
    out.flush().expect("flush the list");
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One gateway: its directory, configuration and reader.
struct Gateway {
    dir: PathBuf,
    terminal: String,
    peer: PtyPeer,
}

impl Gateway {
    fn new(root: &Path, name: &str, port: u16) -> Gateway {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("the gateway's directory");
        let peer = PtyPeer::open().expect("a pty");
        let gw = Gateway {
            dir,
            terminal: format!("gate-{name}"),
            peer,
        };
        std::fs::write(
            gw.config(),
            format!(
                "site_id = \"{SITE}\"\nterminal_id = \"{}\"\ndata_dir = \"data\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic_prefix = \"{PREFIX}\"\n[blocklist]\nmax_age_hours = 100000\n[[reader]]\nname = \"gate\"\nkind = \"line\"\npath = \"{}\"\nbaud = 115200\ndirection = \"in\"\n",
                gw.terminal,
                gw.peer.path().display()
            ),
        )
        .expect("the configuration");
        gw
    }

    fn config(&self) -> PathBuf {
        self.dir.join("id06d.toml")
    }

    fn topic(&self, what: &str) -> String {
        format!("{PREFIX}/{SITE}/{}/{what}", self.terminal)
    }

    fn cli(&self, binary: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new(binary)
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .expect("run id06d");
        assert!(
            out.status.success(),
            "id06d {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A running daemon and what its start measured.
struct Started {
    child: std::process::Child,
    to_first_decision: Duration,
    rss_kb: u64,
}

/// Starts `binary` on `gw` and writes `probe` to its reader every 5 ms until the probe's
/// decision arrives; the decision must say `expect` for the card's status.
fn start(
    rt: &tokio::runtime::Runtime,
    binary: &Path,
    gw: &mut Gateway,
    port: u16,
    probe: &str,
    expect: &str,
) -> Started {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let sub = rt.spawn(subscriber(
        port,
        gw.topic("decision"),
        |p: &[u8]| serde_json::from_slice::<serde_json::Value>(p).ok(),
        tx,
        ready_tx,
    ));
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("subscribed within 10 s")
            .expect("subscribed");
    });
    let log = std::fs::File::create(gw.dir.join("id06d.log")).expect("the daemon's log");
    let spawned = Instant::now();
    let child = std::process::Command::new(binary)
        .args(["run", "--config"])
        .arg(gw.config())
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()
        .expect("start id06d");
    let line = format!("{probe}\n");
    let decided = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "no decision for {probe} within 60 s; see {}",
                gw.dir.join("id06d.log").display()
            );
            gw.peer
                .write(line.as_bytes())
                .await
                .expect("write to the pty");
            let wait = tokio::time::sleep(Duration::from_millis(5));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    got = rx.recv() => {
                        let Some((v, at)) = got else { break };
                        if v["card_uid"] == probe {
                            assert_eq!(
                                v["card_status"], expect,
                                "the first tap at start was decided on the wrong list: {v}"
                            );
                            return at;
                        }
                    }
                }
            }
        }
    });
    sub.abort();
    std::thread::sleep(Duration::from_secs(1));
    let rss_kb = proc_status_kb(child.id(), "VmRSS:");
    Started {
        to_first_decision: decided.duration_since(spawned),
        rss_kb,
        child,
    }
}

fn stop(mut child: std::process::Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let cards: u64 = env_or("ID06D_SCALE_CARDS", 5_000_000u64).max(10);
    let rounds: usize = env_or("ID06D_SCALE_ROUNDS", 5usize).max(1);
    let other: Option<PathBuf> = std::env::var_os("ID06D_SCALE_OTHER").map(Into::into);
    let binary = match common::shipped_binary() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("scale: not measured: {e}");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _enter = rt.enter();
    let work = tempfile::tempdir().expect("a scratch directory");
    let broker = LocalBroker::start(&work.path().join("broker"), "").expect("mosquitto");
    let port = broker.port;

    eprintln!("scale: writing a list of {cards} cards");
    let list = work.path().join("list.csv");
    write_list(&list, cards, 0);
    let probe_i = cards / 3;
    let probe = card(probe_i);
    let listed = STATUSES[(probe_i % 4) as usize];

    let mut binaries = vec![("id06d", binary.clone())];
    if let Some(o) = &other {
        binaries.push(("other build", o.clone()));
    }
    // Each build gets gateways of its own (data directory formats differ between builds),
    // the list imported by that build.
    let mut gateways: Vec<[Gateway; 2]> = Vec::new();
    for (b, (name, bin)) in binaries.iter().enumerate() {
        let empty = Gateway::new(work.path(), &format!("empty{b}"), port);
        let full = Gateway::new(work.path(), &format!("full{b}"), port);
        let imported = Instant::now();
        full.cli(
            bin,
            &["blocklist", "import", list.to_str().unwrap_or_default()],
        );
        eprintln!(
            "scale: {name} imported the list in {:.1} s; {} of data",
            imported.elapsed().as_secs_f64(),
            du(&full.dir.join("data"))
        );
        gateways.push([empty, full]);
    }
    // (build, list) → start times (ms) and RSS (kB)
    let mut starts: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for (name, _) in &binaries {
        for list in ["empty list", "national list"] {
            starts.push((format!("{name}, {list}"), Vec::new(), Vec::new()));
        }
    }
    for round in 0..rounds {
        eprintln!("scale: start round {} of {rounds}", round + 1);
        for (b, (_, bin)) in binaries.iter().enumerate() {
            for (l, gw) in gateways[b].iter_mut().enumerate() {
                let expect = if l == 0 { "unlisted" } else { listed };
                let s = start(&rt, bin, gw, port, &probe, expect);
                let row = &mut starts[b * 2 + l];
                row.1.push(ms(s.to_first_decision));
                row.2.push(s.rss_kb as f64);
                stop(s.child);
            }
        }
    }
    let full = &mut gateways[0][1];

    // A whole new list while running on the old one.
    eprintln!("scale: publishing a new snapshot of {cards} cards");
    let snapshot = work.path().join("snapshot.csv");
    write_list(&snapshot, cards, 1);
    let s = start(&rt, &binary, full, port, &probe, listed);
    let pid = s.child.id();
    // Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let rss_before = proc_status_kb(pid, "VmRSS:");
    let published = Instant::now();
    full.cli(
        &binary,
        &[
            "blocklist",
            "publish-snapshot",
            snapshot.to_str().unwrap_or_default(),
            "--version",
            "2",
        ],
    );
    let sent = published.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !full
        .cli(&binary, &["blocklist", "stats"])
        .contains("version 2")
    {
        assert!(
            Instant::now() < deadline,
            "the snapshot was not applied within 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let applied = published.elapsed();
    let peak = proc_status_kb(pid, "VmHWM:");
    let rss_after = proc_status_kb(pid, "VmRSS:");
    stop(s.child);
    // The new list is in force at the next start too.
    let again = start(
        &rt,
        &binary,
        full,
        port,
        &probe,
        STATUSES[((probe_i + 1) % 4) as usize],
    );
    let restart_ms = ms(again.to_first_decision);
    stop(again.child);

    let mut report = vec![
        format!("scale: {cards} listed cards, {rounds} start rounds (median, min, max)"),
        String::new(),
        "| start to the first tap decided | median | min | max | RSS after (median) |".into(),
        "| --- | --- | --- | --- | --- |".into(),
    ];
    for (name, times, rss) in &starts {
        let mut t = times.clone();
        t.sort_by(f64::total_cmp);
        report.push(format!(
            "| {name} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} MB |",
            median(times.clone()),
            t[0],
            t[t.len() - 1],
            median(rss.clone()) / 1024.0
        ));
    }
    for (b, (name, _)) in binaries.iter().enumerate() {
        let e = median(starts[b * 2].2.clone());
        let f = median(starts[b * 2 + 1].2.clone());
        let te = median(starts[b * 2].1.clone());
        let tf = median(starts[b * 2 + 1].1.clone());
        report.push(format!(
            "{name}: the list adds {:.1} bytes of RSS per card (goal <= 32) and {:.0} ms to the start (national/empty {:.2})",
            (f - e) * 1024.0 / cards as f64,
            tf - te,
            tf / te
        ));
    }
    report.push(String::new());
    report.push(format!(
        "snapshot of {cards} cards received and applied while running: peak RSS {:.1} MB (goal < 200), RSS {:.1} MB before and {:.1} MB after; published in {:.1} s, in force after {:.1} s; next start to the first tap decided {restart_ms:.0} ms (on the new list)",
        peak as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        sent.as_secs_f64(),
        applied.as_secs_f64(),
    ));
    drop(broker);
    println!("{}", report.join("\n"));
}

fn du(dir: &Path) -> String {
    fn size(p: &Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|d| d.flatten().map(|e| size(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    format!("{:.1} MB", size(dir) as f64 / 1e6)
}
