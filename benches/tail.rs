//! Tail latency at a steady rate (#17, goal 1): cards written to a line reader on a pty at
//! `ID06D_TAIL_RATE` per second (default 20) for `ID06D_TAIL_SECS` (default 600), each
//! timed from the moment its line is written until its event arrives at a subscriber of
//! `P/event` on a private mosquitto. Reports the median, p99, p99.9 and maximum, and
//! p99 / median (goal: at most 2).
//!
//! The baseline, in the same run on the same broker and the same kind of pty: a
//! deliberately simple bridge — read the line, append it to a file and `fdatasync`, publish
//! it with QoS 1 from a raw rumqttc client (what a hand-written script does per tap, with
//! the fastest possible parts). Its tail is the machine's own: the pty, the disk's sync,
//! the broker and the scheduler.
//!
//! The daemon is the release binary (`cargo build --release -p id06d` first), run as its
//! own process as on a gateway.
//!
//! A VM's neighbours come and go: `ID06D_TAIL_ROUNDS` (default 10) splits the time into
//! rounds that take turns, so that a noisy minute falls on every part alike.
//! `ID06D_TAIL_OTHER=/path/to/an/older/id06d` adds a third part, another build of the
//! daemon, for a before/after comparison in one run.
//!
//! Run: `cargo bench -p id06d --bench tail` (`ID06D_TAIL_PARTS=id06d` or `=baseline` for
//! one of the two).

#[path = "common/mod.rs"]
mod common;

use common::{env_or, ms, subscriber};
use id06_readers::pn532::emulator::PtyPeer;
use id06d::mqtt::broker::LocalBroker;
use rumqttc::{MqttOptions, QoS};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

const TOPIC_PREFIX: &str = "bench";

/// A 7-byte UID per card, none repeated in a run (no debouncing between them).
fn card(i: u64) -> String {
    format!("04B7{:010X}", i & 0xFF_FFFF_FFFF)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// A client id used once: two clients with one id take turns throwing each other out.
fn unique_id(what: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{what}-{}-{n}", std::process::id())
}

fn uid_in_event(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get("card_uid")?.as_str().map(str::to_string)
}

fn uid_in_line(payload: &[u8]) -> Option<String> {
    Some(String::from_utf8_lossy(payload).trim().to_string())
}

/// One round's cards: `rate` per second for `secs`, numbered from `first_card`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    rate: u64,
    secs: u64,
    first_card: u64,
}

/// Writes one card every `1/rate` s to `peer` for `secs`, then waits for the stragglers;
/// the latency of each card whose message arrived, in the order written.
fn drive(
    rt: &tokio::runtime::Runtime,
    peer: &mut PtyPeer,
    port: u16,
    topic: &str,
    uid_of: fn(&[u8]) -> Option<String>,
    pace: Pace,
) -> (Vec<Duration>, usize) {
    let Pace {
        rate,
        secs,
        first_card,
    } = pace;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let sub = rt.spawn(subscriber(port, topic.to_string(), uid_of, tx, ready_tx));
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("subscribed within 10 s")
            .expect("subscribed");
    });
    let total = rate * secs;
    // The first two seconds warm the caches and the connections: written, not timed.
    let warmup = (rate * 2).min(total / 10);
    let mut written: HashMap<String, Instant> = HashMap::with_capacity(total as usize);
    let mut latencies = Vec::with_capacity(total as usize);
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = Instant::now();
        for i in 0..total {
            tick.tick().await;
            let uid = card(first_card + i);
            let line = format!("{uid}\n");
            if i >= warmup {
                written.insert(uid, Instant::now());
            }
            peer.write(line.as_bytes()).await.expect("write to the pty");
            while let Ok((uid, at)) = rx.try_recv() {
                if let Some(w) = written.get(&uid) {
                    latencies.push(at.duration_since(*w));
                }
            }
            if progress.elapsed() >= Duration::from_secs(60) {
                eprintln!("  … {i} of {total} cards");
                progress = Instant::now();
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while latencies.len() < (total - warmup) as usize {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((uid, at))) => {
                    if let Some(w) = written.get(&uid) {
                        latencies.push(at.duration_since(*w));
                    }
                }
                _ => break,
            }
        }
    });
    sub.abort();
    let missing = (total - warmup) as usize - latencies.len();
    (latencies, missing)
}

/// The hand-written bridge: line → file + fdatasync → QoS 1 publish (waiting for nothing).
fn baseline_bridge(
    device: &Path,
    port: u16,
    dir: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .expect("open the pty");
    // Raw mode, as a serial reader would set it.
    // SAFETY: a valid descriptor and a termios filled by tcgetattr.
    unsafe {
        use std::os::fd::AsRawFd;
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(tty.as_raw_fd(), &mut t);
        libc::cfmakeraw(&mut t);
        libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t);
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("baseline.log"))
        .expect("the baseline's file");
    let mut o = MqttOptions::new(unique_id("tail-baseline"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(o, 1024);
    let connected = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for n in connection.iter() {
                if n.is_err() || stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            }
        })
    };
    let mut lines = std::io::BufReader::new(tty);
    let mut line = String::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let uid = line.trim().to_string();
        if uid.is_empty() {
            continue;
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        log.write_all(line.as_bytes()).expect("append");
        log.sync_data().expect("fdatasync");
        client
            .publish(
                format!("{TOPIC_PREFIX}/baseline"),
                QoS::AtLeastOnce,
                false,
                uid,
            )
            .expect("publish");
    }
    let _ = client.disconnect();
    let _ = connected.join();
}

struct Figures {
    n: usize,
    missing: usize,
    median: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
}

fn figures(mut l: Vec<Duration>, missing: usize) -> Figures {
    l.sort();
    Figures {
        n: l.len(),
        missing,
        median: percentile(&l, 0.5),
        p99: percentile(&l, 0.99),
        p999: percentile(&l, 0.999),
        max: *l.last().expect("at least one card"),
    }
}

fn line(name: &str, f: &Figures) -> String {
    format!(
        "{name}: {} cards ({} missing): median {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; p99/median {:.2}",
        f.n,
        f.missing,
        ms(f.median),
        ms(f.p99),
        ms(f.p999),
        ms(f.max),
        ms(f.p99) / ms(f.median)
    )
}

/// One round of the hand-written bridge.
fn baseline_round(
    rt: &tokio::runtime::Runtime,
    port: u16,
    dir: &Path,
    pace: Pace,
) -> (Vec<Duration>, usize) {
    let _enter = rt.enter();
    let mut peer = PtyPeer::open().expect("a pty");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bridge = {
        let (device, dir, stop) = (peer.path().to_path_buf(), dir.to_path_buf(), stop.clone());
        std::thread::spawn(move || baseline_bridge(&device, port, &dir, stop))
    };
    std::thread::sleep(Duration::from_millis(500));
    let result = drive(
        rt,
        &mut peer,
        port,
        &format!("{TOPIC_PREFIX}/baseline"),
        uid_in_line,
        pace,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(peer); // ends the bridge's read
    let _ = bridge.join();
    result
}

/// One round of a daemon binary, on its data directory in `dir` (kept between rounds).
fn daemon_round(
    rt: &tokio::runtime::Runtime,
    binary: &Path,
    port: u16,
    dir: &Path,
    terminal: &str,
    pace: Pace,
) -> (Vec<Duration>, usize) {
    let _enter = rt.enter();
    let mut peer = PtyPeer::open().expect("a pty");
    std::fs::create_dir_all(dir).expect("the gateway's directory");
    let cfg = dir.join("id06d.toml");
    std::fs::write(
        &cfg,
        format!(
            "site_id = \"SE-BENCH\"\nterminal_id = \"{terminal}\"\ndata_dir = \"data\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic_prefix = \"{TOPIC_PREFIX}\"\n[[reader]]\nname = \"gate\"\nkind = \"line\"\npath = \"{}\"\nbaud = 115200\ndirection = \"in\"\n",
            peer.path().display()
        ),
    )
    .expect("the configuration");
    let mut child = std::process::Command::new(binary)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.join("id06d.log")).expect("the daemon's log"))
        .spawn()
        .expect("start id06d");
    // Started: its control socket takes connections (a command run to ask it before
    // that would open the data directory itself and keep the daemon out).
    let started = Instant::now();
    let socket = dir.join("data/control.sock");
    while started.elapsed() < Duration::from_secs(20)
        && std::os::unix::net::UnixStream::connect(&socket).is_err()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let result = drive(
        rt,
        &mut peer,
        port,
        &format!("{TOPIC_PREFIX}/SE-BENCH/{terminal}/event"),
        uid_in_event,
        pace,
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    if result.1 > 0 {
        let log = std::fs::read_to_string(dir.join("id06d.log")).unwrap_or_default();
        eprintln!("  the daemon's log:\n{log}");
    }
    result
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let secs: u64 = env_or("ID06D_TAIL_SECS", 600);
    let rate: u64 = env_or("ID06D_TAIL_RATE", 20).max(1);
    let rounds: u64 = env_or("ID06D_TAIL_ROUNDS", 10).clamp(1, secs.max(1));
    let parts: String = env_or("ID06D_TAIL_PARTS", "baseline,id06d".to_string());
    let other: Option<std::path::PathBuf> = std::env::var_os("ID06D_TAIL_OTHER").map(Into::into);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let work = tempfile::tempdir().expect("a scratch directory");
    let broker = LocalBroker::start(&work.path().join("broker"), "").expect("mosquitto");
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/id06d");
    let mut report = Vec::new();
    if parts.contains("id06d") && !binary.exists() {
        report.push(format!(
            "id06d not measured: build the release binary first ({} missing; cargo build --release -p id06d)",
            binary.display()
        ));
    }
    let mut runs: Vec<(String, Vec<Duration>, usize)> = Vec::new();
    if parts.contains("baseline") {
        runs.push((
            "baseline (line -> file + fdatasync -> raw QoS 1 publish)".into(),
            Vec::new(),
            0,
        ));
    }
    if parts.contains("id06d") && binary.exists() {
        runs.push((
            "id06d (line -> debounce, decide, outbox commit -> P/event)".into(),
            Vec::new(),
            0,
        ));
    }
    if let Some(o) = &other {
        runs.push((format!("other build {}", o.display()), Vec::new(), 0));
    }
    let per_round = (secs / rounds).max(1);
    eprintln!(
        "tail: {rate} cards/s, {rounds} rounds of {per_round} s for each of {} parts",
        runs.len()
    );
    let mut next_card = 0u64;
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        for (i, (name, latencies, missing)) in runs.iter_mut().enumerate() {
            let pace = Pace {
                rate,
                secs: per_round,
                first_card: next_card,
            };
            let (l, m) = if name.starts_with("baseline") {
                baseline_round(&rt, broker.port, work.path(), pace)
            } else {
                let (bin, terminal) = if name.starts_with("id06d") {
                    (binary.clone(), "gate-bench")
                } else {
                    (other.clone().unwrap_or_default(), "gate-other")
                };
                daemon_round(
                    &rt,
                    &bin,
                    broker.port,
                    &work.path().join(format!("gateway{i}")),
                    terminal,
                    pace,
                )
            };
            next_card += rate * per_round;
            if m > 0 {
                eprintln!(
                    "  {name}: {m} of {} cards did not arrive this round",
                    m + l.len()
                );
            }
            latencies.extend(l);
            *missing += m;
        }
    }
    for (name, latencies, missing) in runs {
        report.push(line(&name, &figures(latencies, missing)));
    }
    drop(broker);
    println!("\n--- measured in this run ---");
    for l in report {
        println!("{l}");
    }
    let _ = std::io::stdout().flush();
}
