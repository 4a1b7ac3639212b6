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
//! The daemon is the binary as it ships (`common::shipped_binary`: built into
//! `target/shipped`, or `ID06D_BENCH_BIN`), run as its own process as on a gateway,
//! logging as the systemd unit has it (`RUST_LOG=info`, a line per tap; `ID06D_TAIL_LOG`
//! sets another filter) to a file.
//!
//! A VM's neighbours come and go: `ID06D_TAIL_ROUNDS` (default 10) splits the time into
//! rounds that take turns, so that a noisy minute falls on every part alike.
//! `ID06D_TAIL_OTHER=/path/to/an/older/id06d` adds a third part, another build of the
//! daemon, for a before/after comparison in one run; `ID06D_TAIL_OTHER_LOG` gives it its
//! own log filter (the same binary at another log level, say).
//!
//! The floor under both, also in the same run: the disk alone (`disk_round`), doing per
//! tap what the outbox's log does, timed from the write to the sync's return. Where its
//! p99 is above twice the daemon's median, no design that syncs before it publishes can
//! hold p99 within 2x the median on that machine in that run.
//!
//! Run: `cargo bench -p id06d --bench tail` (`ID06D_TAIL_PARTS` picks from
//! `disk,baseline,id06d`, all three by default).
//!
//! `ID06D_TAIL_STAGES=1` has the daemon log each card's way through it (the line read, the
//! pipeline taking the tap, the commit, the event on the socket) and reports where the time
//! of all cards and of the slowest 1 % went. The logging costs a few microseconds per card:
//! use it to find a cause, and the run without it for the figures.

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

/// One timed card: its UID, when its line was written (wall clock, ns) and how long its
/// message took to arrive.
struct Timed {
    uid: String,
    written_ns: i128,
    latency: Duration,
}

/// The wall clock in nanoseconds (what the daemon's log lines are stamped with).
fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
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

impl Pace {
    /// Cards written in the round.
    fn total(&self) -> u64 {
        self.rate * self.secs
    }

    /// The first of them, up to two seconds' worth, warm the caches and the connections:
    /// written, not timed.
    fn warmup(&self) -> u64 {
        (self.rate * 2).min(self.total() / 10)
    }
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
) -> (Vec<Timed>, usize) {
    let Pace {
        rate, first_card, ..
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
    let (total, warmup) = (pace.total(), pace.warmup());
    let mut written: HashMap<String, (Instant, i128)> = HashMap::with_capacity(total as usize);
    let mut latencies: Vec<Timed> = Vec::with_capacity(total as usize);
    let arrived = |written: &HashMap<String, (Instant, i128)>,
                   latencies: &mut Vec<Timed>,
                   uid: String,
                   at: Instant| {
        if let Some((w, wall)) = written.get(&uid) {
            latencies.push(Timed {
                latency: at.duration_since(*w),
                written_ns: *wall,
                uid,
            });
        }
    };
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = Instant::now();
        for i in 0..total {
            tick.tick().await;
            let uid = card(first_card + i);
            let line = format!("{uid}\n");
            if i >= warmup {
                written.insert(uid, (Instant::now(), wall_ns()));
            }
            peer.write(line.as_bytes()).await.expect("write to the pty");
            while let Ok((uid, at)) = rx.try_recv() {
                arrived(&written, &mut latencies, uid, at);
            }
            if progress.elapsed() >= Duration::from_secs(60) {
                eprintln!("  … {i} of {total} cards");
                progress = Instant::now();
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while latencies.len() < (total - warmup) as usize {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((uid, at))) => arrived(&written, &mut latencies, uid, at),
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

fn figures(timed: Vec<Timed>, missing: usize) -> Figures {
    let mut l: Vec<Duration> = timed.into_iter().map(|t| t.latency).collect();
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

/// One part of the run: what it measured over all its rounds.
struct Part {
    name: String,
    timed: Vec<Timed>,
    /// Cards whose message did not arrive.
    missing: usize,
    /// Where each card's time went (daemons, with `ID06D_TAIL_STAGES`).
    stages: Vec<Stages>,
    /// Each round's p99 / median.
    round_ratios: Vec<f64>,
}

impl Part {
    fn new(name: String) -> Part {
        Part {
            name,
            timed: Vec::new(),
            missing: 0,
            stages: Vec::new(),
            round_ratios: Vec::new(),
        }
    }
}

/// Each round's p99 / median and the median of them: one noisy minute of a VM's neighbours
/// moves the p99 of all cards, not the median round.
fn rounds_line(mut ratios: Vec<f64>) -> String {
    let each = ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(" ");
    ratios.sort_by(f64::total_cmp);
    if ratios.is_empty() {
        return "  per round: none".into();
    }
    format!(
        "  per round p99/median: {each}; median round {:.2}",
        percentile(&ratios, 0.5)
    )
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

/// One round of the disk alone: what the outbox's log does per tap (1 000 bytes, about a
/// tap's record, written in place into a file written with zeros beforehand, then
/// `fdatasync`), at the same pace,
/// timed from the write to the sync's return. No tap that waits for its record to be on
/// disk can have a tail below this one.
fn disk_round(dir: &Path, pace: Pace) -> (Vec<Timed>, usize) {
    use std::os::unix::fs::FileExt;
    const FILE: u64 = 2 << 20;
    let record = [0x5au8; 1000];
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("disk-probe"))
        .expect("the probe's file");
    file.write_all_at(&vec![0u8; FILE as usize], 0)
        .expect("zeros");
    file.sync_all().expect("sync");
    let (total, warmup) = (pace.total(), pace.warmup());
    let period = Duration::from_secs(1) / pace.rate as u32;
    let start = Instant::now();
    let mut at = 0u64;
    let mut out = Vec::with_capacity(total as usize);
    for i in 0..total {
        if let Some(wait) = (start + period * i as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if at + record.len() as u64 > FILE {
            at = 0;
        }
        let (written_ns, t0) = (wall_ns(), Instant::now());
        file.write_all_at(&record, at).expect("write");
        file.sync_data().expect("fdatasync");
        let latency = t0.elapsed();
        at += record.len() as u64;
        if i >= warmup {
            out.push(Timed {
                uid: card(pace.first_card + i),
                written_ns,
                latency,
            });
        }
    }
    (out, 0)
}

/// One round of the hand-written bridge.
fn baseline_round(
    rt: &tokio::runtime::Runtime,
    port: u16,
    dir: &Path,
    pace: Pace,
) -> (Vec<Timed>, usize) {
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

/// A daemon part: which binary, its terminal's name and its log filter.
struct Gateway<'a> {
    binary: std::path::PathBuf,
    terminal: &'a str,
    level: &'a str,
}

/// One round of a daemon binary, on its data directory in `dir` (kept between rounds).
fn daemon_round(
    rt: &tokio::runtime::Runtime,
    gateway: &Gateway,
    port: u16,
    dir: &Path,
    pace: Pace,
    stages: Option<&mut Vec<Stages>>,
) -> (Vec<Timed>, usize) {
    let Gateway {
        binary,
        terminal,
        level,
    } = gateway;
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
    let filter = if stages.is_some() {
        format!("{level},id06_readers::line=debug,id06d::stages=trace,id06d::durable=trace")
    } else {
        level.to_string()
    };
    let mut child = std::process::Command::new(binary)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", filter)
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
    let log = std::fs::read_to_string(dir.join("id06d.log")).unwrap_or_default();
    if result.1 > 0 {
        eprintln!("  the daemon's log:\n{log}");
    }
    if let Some(stages) = stages {
        stages.extend(stages_of(&log, &result.0));
    }
    result
}

/// Where one card's time went, in ns, from the daemon's trace lines (`ID06D_TAIL_STAGES`).
#[derive(Debug, Clone, Copy)]
struct Stages {
    total: i128,
    /// [pty -> line read, line read -> pipeline, pipeline -> durable, durable -> on the
    /// socket, on the socket -> at the subscriber]
    parts: [i128; 5],
    /// Whether an outbox checkpoint ran while the card was being committed (taken ->
    /// durable).
    met_checkpoint: bool,
    /// How long before the card was taken the last outbox checkpoint ended.
    after_checkpoint: Option<i128>,
}

const STAGE_NAMES: [&str; 5] = [
    "line written -> read by the reader task",
    "read -> taken by the tap pipeline",
    "taken -> durable (outbox commit)",
    "durable -> event on the socket",
    "on the socket -> at the subscriber",
];

/// Pairs each timed card with its trace lines: "<time> DEBUG line read … card=C",
/// "<time> TRACE taken card=C", "<time> TRACE durable card=C pos=P", "<time> TRACE sent pos=P".
fn stages_of(log: &str, timed: &[Timed]) -> Vec<Stages> {
    let field = |l: &str, name: &str| -> Option<String> {
        Some(
            l.split(&format!(" {name}="))
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_string(),
        )
    };
    let mut read = HashMap::new();
    let mut taken = HashMap::new();
    let mut durable = HashMap::new();
    let mut pos_of = HashMap::new();
    let mut sent = HashMap::new();
    let mut checkpoints: Vec<(i128, i128)> = Vec::new();
    let mut begun: Option<i128> = None;
    for l in log.lines() {
        let Some(at) = l
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_nanosecond())
        else {
            continue;
        };
        if l.contains(" line read ") {
            if let Some(c) = field(l, "card") {
                read.insert(c, at);
            }
        } else if l.contains(" taken ") {
            if let Some(c) = field(l, "card") {
                taken.insert(c, at);
            }
        } else if l.contains(" durable ") {
            if let (Some(c), Some(p)) = (field(l, "card"), field(l, "pos")) {
                durable.insert(c.clone(), at);
                pos_of.insert(c, p);
            }
        } else if l.contains(" sent ") {
            if let Some(p) = field(l, "pos") {
                sent.insert(p, at);
            }
        } else if l.contains(" checkpoint begun") {
            begun = Some(at);
        } else if l.contains(" checkpoint done") {
            if let Some(b) = begun.take() {
                checkpoints.push((b, at));
            }
        }
    }
    timed
        .iter()
        .filter_map(|t| {
            let received = t.written_ns + t.latency.as_nanos() as i128;
            let (r, k, d) = (read.get(&t.uid)?, taken.get(&t.uid)?, durable.get(&t.uid)?);
            let s = sent.get(pos_of.get(&t.uid)?)?;
            Some(Stages {
                total: t.latency.as_nanos() as i128,
                parts: [r - t.written_ns, k - r, d - k, s - d, received - s],
                met_checkpoint: checkpoints.iter().any(|&(b, e)| b <= *d && e >= *k),
                after_checkpoint: checkpoints
                    .iter()
                    .filter(|&&(_, e)| e <= *k)
                    .map(|&(_, e)| k - e)
                    .min(),
            })
        })
        .collect()
}

/// The stages of all cards and of the slowest 1 %: medians, and for the slowest, which
/// stage was furthest above its own median.
fn stage_report(mut all: Vec<Stages>) -> Vec<String> {
    if all.is_empty() {
        return vec!["stages: no card could be paired with the daemon's trace lines".into()];
    }
    let us = |ns: i128| ns as f64 / 1000.0;
    let median_of = |v: &[Stages], i: usize| {
        let mut x: Vec<i128> = v.iter().map(|s| s.parts[i]).collect();
        x.sort();
        percentile(&x, 0.5)
    };
    let p99_of = |v: &[Stages], i: usize| {
        let mut x: Vec<i128> = v.iter().map(|s| s.parts[i]).collect();
        x.sort();
        percentile(&x, 0.99)
    };
    all.sort_by_key(|s| s.total);
    let cut = percentile(&all.iter().map(|s| s.total).collect::<Vec<_>>(), 0.99);
    let slow: Vec<Stages> = all.iter().copied().filter(|s| s.total >= cut).collect();
    let medians: Vec<i128> = (0..5).map(|i| median_of(&all, i)).collect();
    let mut dominant = [0usize; 5];
    for s in &slow {
        let worst = (0..5).max_by_key(|&i| s.parts[i] - medians[i]).unwrap_or(0);
        dominant[worst] += 1;
    }
    let met = |v: &[Stages]| v.iter().filter(|s| s.met_checkpoint).count();
    let mut out = vec![format!(
        "stages of {} cards (slowest 1 %: {} cards at or above {:.2} ms), in us: median / p99 of all; median of the slowest; slowest cards this stage was furthest above its median for",
        all.len(),
        slow.len(),
        us(cut) / 1000.0
    )];
    for (i, name) in STAGE_NAMES.iter().enumerate() {
        out.push(format!(
            "  {name}: {:.0} / {:.0}; {:.0}; {}",
            us(medians[i]),
            us(p99_of(&all, i)),
            us(median_of(&slow, i)),
            dominant[i]
        ));
    }
    out.push(format!(
        "  committed while an outbox checkpoint ran: {} of all cards, {} of the slowest",
        met(&all),
        met(&slow)
    ));
    let after = |v: &[Stages]| {
        let mut x: Vec<i128> = v.iter().filter_map(|s| s.after_checkpoint).collect();
        x.sort();
        let quartile = |p: f64| {
            if x.is_empty() {
                0.0
            } else {
                us(percentile(&x, p)) / 1000.0
            }
        };
        format!(
            "{:.0} / {:.0} / {:.0}",
            quartile(0.25),
            quartile(0.5),
            quartile(0.75)
        )
    };
    out.push(format!(
        "  taken this long after the last checkpoint ended, ms (quartiles): all cards {}; the slowest {}",
        after(&all),
        after(&slow)
    ));
    out
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let secs: u64 = env_or("ID06D_TAIL_SECS", 600);
    let rate: u64 = env_or("ID06D_TAIL_RATE", 20).max(1);
    let rounds: u64 = env_or("ID06D_TAIL_ROUNDS", 10).clamp(1, secs.max(1));
    let parts: String = env_or("ID06D_TAIL_PARTS", "disk,baseline,id06d".to_string());
    let other: Option<std::path::PathBuf> = std::env::var_os("ID06D_TAIL_OTHER").map(Into::into);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let work = tempfile::tempdir().expect("a scratch directory");
    let broker = LocalBroker::start(&work.path().join("broker"), "").expect("mosquitto");
    let mut report = Vec::new();
    let binary = if parts.contains("id06d") {
        common::shipped_binary()
            .map_err(|e| report.push(format!("id06d not measured: {e}")))
            .ok()
    } else {
        None
    };
    let mut runs: Vec<Part> = Vec::new();
    let trace_stages = std::env::var_os("ID06D_TAIL_STAGES").is_some();
    if parts.contains("disk") {
        runs.push(Part::new(
            "disk (1 000 bytes written in place + fdatasync, nothing else)".into(),
        ));
    }
    if parts.contains("baseline") {
        runs.push(Part::new(
            "baseline (line -> file + fdatasync -> raw QoS 1 publish)".into(),
        ));
    }
    if binary.is_some() {
        runs.push(Part::new(
            "id06d (line -> debounce, decide, outbox commit -> P/event)".into(),
        ));
    }
    // Logging as on a gateway (the unit's RUST_LOG=info: a line per tap), or as asked.
    let level: String = env_or("ID06D_TAIL_LOG", "info".to_string());
    let other_level: String = env_or("ID06D_TAIL_OTHER_LOG", level.clone());
    if let Some(o) = &other {
        runs.push(Part::new(format!(
            "other build {} (RUST_LOG={other_level})",
            o.display()
        )));
    }
    let per_round = (secs / rounds).max(1);
    eprintln!(
        "tail: {rate} cards/s, {rounds} rounds of {per_round} s for each of {} parts",
        runs.len()
    );
    let mut next_card = 0u64;
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        for (i, part) in runs.iter_mut().enumerate() {
            let name = &part.name;
            let pace = Pace {
                rate,
                secs: per_round,
                first_card: next_card,
            };
            let (l, m) = if name.starts_with("disk") {
                disk_round(work.path(), pace)
            } else if name.starts_with("baseline") {
                baseline_round(&rt, broker.port, work.path(), pace)
            } else {
                let gateway = if name.starts_with("id06d") {
                    Gateway {
                        binary: binary.clone().unwrap_or_default(),
                        terminal: "gate-bench",
                        level: &level,
                    }
                } else {
                    Gateway {
                        binary: other.clone().unwrap_or_default(),
                        terminal: "gate-other",
                        level: &other_level,
                    }
                };
                daemon_round(
                    &rt,
                    &gateway,
                    broker.port,
                    &work.path().join(format!("gateway{i}")),
                    pace,
                    trace_stages.then_some(&mut part.stages),
                )
            };
            next_card += rate * per_round;
            if m > 0 {
                eprintln!(
                    "  {name}: {m} of {} cards did not arrive this round",
                    m + l.len()
                );
            }
            if !l.is_empty() {
                let mut round: Vec<Duration> = l.iter().map(|t| t.latency).collect();
                round.sort();
                part.round_ratios
                    .push(ms(percentile(&round, 0.99)) / ms(percentile(&round, 0.5)));
            }
            part.timed.extend(l);
            part.missing += m;
        }
    }
    for part in runs {
        report.push(line(&part.name, &figures(part.timed, part.missing)));
        report.push(rounds_line(part.round_ratios));
        if trace_stages && (part.name.starts_with("id06d") || part.name.starts_with("other")) {
            report.extend(stage_report(part.stages));
        }
    }
    drop(broker);
    println!("\n--- measured in this run ---");
    for l in report {
        println!("{l}");
    }
    let _ = std::io::stdout().flush();
}
