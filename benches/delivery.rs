//! Delivery speed, each against a baseline measured in the same run on the same private
//! mosquitto (loopback):
//!
//! - `tap_to_puback`: a tap injected into the running daemon's pipeline until the broker
//!   acknowledged its event on `P/event` (debounce, decide, sled commit + fsync, publish,
//!   PUBACK, outbox removal), against a raw rumqttc QoS 1 publish-to-PUBACK of the same
//!   payload plus one `fdatasync` of the same bytes appended to a file. Goal: at most 1.5×.
//!   A stricter second baseline writes the bytes into a preallocated, already written
//!   region instead (what the daemon's outbox log does: no file size change to sync).
//! - `backlog drain`: 100 000 events waiting in the outbox after an outage, delivered;
//!   against raw rumqttc QoS 1 publishing of the same payloads without persistence.
//!   Goal: at least half the raw rate.
//! - `idle cost`: CPU and resident memory of the `id06d` binary with four simulated readers
//!   polling every 100 ms, and with one OSDP reader online (`ID06D_IDLE_SECS`, default 60;
//!   `ID06D_IDLE_OTHER=path` adds another build with the four simulated readers). Goal:
//!   under 1 % of a core and under 30 MB.
//!
//! Run: `cargo bench -p id06d --bench delivery`.

mod common;

use criterion::Criterion;
use id06_protocol::{CardUid, Event, UtcMillis};
use id06_readers::{Observation, ReaderMessage, Report};
use id06d::config::Config;
use id06d::mqtt::broker::LocalBroker;
use id06d::run::{run, RunOptions};
use id06d::shared::Counters;
use id06d::storage::outbox::Outbox;
use id06d::storage::store::Store;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn sample_event(i: u64) -> Event {
    common::granted_event(uid(i), UtcMillis(1_795_000_000_000 + i as i64))
}

fn uid(i: u64) -> CardUid {
    let b = i.to_be_bytes();
    CardUid::from_bytes(&[0x04, 0xBE, b[3], b[4], b[5], b[6], b[7]]).unwrap()
}

fn config(dir: &Path, port: u16, readers: &str) -> Config {
    let path = dir.join("id06d.toml");
    std::fs::write(
        &path,
        format!("site_id = \"SE-BENCH\"\nterminal_id = \"gate-bench\"\ndata_dir = \"data\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n{readers}"),
    )
    .unwrap();
    Config::load(&path).unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Raw client: one QoS 1 publish, wait for its PUBACK.
async fn raw_publish_puback(
    client: &AsyncClient,
    eventloop: &mut rumqttc::EventLoop,
    payload: &[u8],
) {
    client
        .publish("bench/raw", QoS::AtLeastOnce, false, payload.to_vec())
        .await
        .unwrap();
    loop {
        if let Ok(MqttEvent::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
            return;
        }
    }
}

async fn raw_client(port: u16, id: &str, inflight: u16) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_inflight(inflight);
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    loop {
        if let Ok(MqttEvent::Incoming(Packet::ConnAck(_))) = eventloop.poll().await {
            break;
        }
    }
    (client, eventloop)
}

/// Taps injected into a running daemon (configured with `extra`), each timed until the
/// broker acknowledged its event; benchmarked as `name` in `g`.
fn daemon_latency(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    port: u16,
    dir: &Path,
    extra: &str,
    name: &str,
) -> Vec<Duration> {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = config(dir, port, extra);
    let shutdown = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let daemon = rt.spawn(run(
        cfg,
        RunOptions {
            drain_timeout: Duration::from_secs(2),
            injector: true,
        },
        shutdown.clone(),
        move |r| {
            let _ = tx.send((r.injector.clone().unwrap(), r.shared.clone()));
        },
    ));
    let (injector, shared) = rx.recv().unwrap();
    // Wait for the connection: the first tap's delivery proves it.
    let delivered = |s: &id06d::shared::Shared| Counters::get(&s.counters.delivered);
    let mut n: u64 = 0;
    let tap = |n: &mut u64| {
        *n += 1;
        let before = delivered(&shared);
        let t = Instant::now();
        injector
            .blocking_send(ReaderMessage {
                reader: 0,
                at: std::time::Instant::now(),
                report: Report::Observed(Observation::Card(uid(*n))),
            })
            .unwrap();
        // Park until the MQTT task says events were delivered (no spinning on a core the
        // daemon needs).
        rt.block_on(async {
            loop {
                let notified = shared.delivered.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if delivered(&shared) != before {
                    return;
                }
                notified.await;
            }
        });
        let took = t.elapsed();
        // The card leaves the field (outside the timed part), as a real one does.
        injector
            .blocking_send(ReaderMessage {
                reader: 0,
                at: std::time::Instant::now(),
                report: Report::Observed(Observation::NoCard),
            })
            .unwrap();
        took
    };
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs(1) {
        tap(&mut n);
    }
    let mut ours = Vec::new();
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = tap(&mut n);
                ours.push(d);
                total += d;
            }
            total
        })
    });
    drop(injector);
    shutdown.cancel();
    rt.block_on(daemon).unwrap().unwrap();
    ours
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .try_init();
    }
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let broker = LocalBroker::start(&work.path().join("broker"), "").unwrap();
    let mut report = Vec::new();
    let parts =
        std::env::var("ID06D_DELIVERY_PARTS").unwrap_or_else(|_| "latency,drain,idle".into());

    // ---- tap -> PUBACK -------------------------------------------------------------
    if parts.contains("latency") {
        let dir = work.path().join("latency");
        std::fs::create_dir_all(&dir).unwrap();
        let payload = {
            let mut e = sample_event(1);
            e.seq = 1;
            e.event_id = "gate-bench:1".into();
            e.to_json()
        };
        let mut g = c.benchmark_group("tap_to_puback");
        let mut ours = daemon_latency(&mut g, &rt, broker.port, &dir.join("plain"), "", "daemon");
        // The same with the ledger confirming (nobody confirms here: what it costs is the
        // extra marker per event; resending is set far out of the way).
        let mut confirming = daemon_latency(
            &mut g,
            &rt,
            broker.port,
            &dir.join("confirm"),
            "[ledger]\nconfirm = true\nresend_after_s = 3600\n",
            "daemon_with_ledger_confirm",
        );
        let raw_file_path = dir.join("raw.log");
        let mut raw_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&raw_file_path)
            .unwrap();
        let (client, mut eventloop) =
            rt.block_on(raw_client(broker.port, "bench-raw-latency", 100));
        let mut raw = Vec::new();
        g.bench_function("baseline_raw_publish_puback_plus_fsync", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    raw_file.write_all(&payload).unwrap();
                    raw_file.sync_data().unwrap();
                    rt.block_on(raw_publish_puback(&client, &mut eventloop, &payload));
                    let d = t.elapsed();
                    raw.push(d);
                    total += d;
                }
                total
            })
        });
        // The stricter baseline: the same bytes into a preallocated region, as the outbox
        // log writes them (wrapping within 2 MiB), so fdatasync has no size change to write.
        const REGION: u64 = 2 << 20;
        let prealloc = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("raw-prealloc.log"))
            .unwrap();
        prealloc
            .write_all_at(&vec![0u8; REGION as usize], 0)
            .unwrap();
        prealloc.sync_all().unwrap();
        let mut at = 0u64;
        let mut strict = Vec::new();
        g.bench_function(
            "baseline_raw_publish_puback_plus_fdatasync_preallocated",
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        if at + payload.len() as u64 > REGION {
                            at = 0;
                        }
                        let t = Instant::now();
                        prealloc.write_all_at(&payload, at).unwrap();
                        prealloc.sync_data().unwrap();
                        rt.block_on(raw_publish_puback(&client, &mut eventloop, &payload));
                        let d = t.elapsed();
                        at += payload.len() as u64;
                        strict.push(d);
                        total += d;
                    }
                    total
                })
            },
        );
        g.finish();
        ours.sort();
        confirming.sort();
        raw.sort();
        strict.sort();
        report.push(format!(
            "tap -> PUBACK with [ledger] confirm: median {:?} p99 {:?}; against without: median {:.3}x p99 {:.3}x (goal within 5 %)",
            percentile(&confirming, 0.5), percentile(&confirming, 0.99),
            percentile(&confirming, 0.5).as_secs_f64() / percentile(&ours, 0.5).as_secs_f64(),
            percentile(&confirming, 0.99).as_secs_f64() / percentile(&ours, 0.99).as_secs_f64()
        ));
        report.push(format!(
        "tap -> PUBACK: daemon median {:?} p99 {:?}; raw publish+fsync median {:?} p99 {:?}; ratio median {:.2}x p99 {:.2}x (goal <= 1.5x)",
        percentile(&ours, 0.5), percentile(&ours, 0.99), percentile(&raw, 0.5), percentile(&raw, 0.99),
        percentile(&ours, 0.5).as_secs_f64() / percentile(&raw, 0.5).as_secs_f64(),
        percentile(&ours, 0.99).as_secs_f64() / percentile(&raw, 0.99).as_secs_f64()
    ));
        report.push(format!(
        "tap -> PUBACK against publish + fdatasync into a preallocated file: median {:?} p99 {:?}; ratio median {:.2}x p99 {:.2}x",
        percentile(&strict, 0.5), percentile(&strict, 0.99),
        percentile(&ours, 0.5).as_secs_f64() / percentile(&strict, 0.5).as_secs_f64(),
        percentile(&ours, 0.99).as_secs_f64() / percentile(&strict, 0.99).as_secs_f64()
    ));
    }

    // ---- backlog drain ---------------------------------------------------------------
    if parts.contains("drain") {
        const BACKLOG: u64 = 100_000;
        let dir = work.path().join("drain");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(&dir, broker.port, "");
        {
            let store = Store::open(&cfg.data_dir, &cfg.terminal_id).unwrap();
            let outbox = Outbox::open(&store).unwrap();
            for chunk in (0..BACKLOG).collect::<Vec<_>>().chunks(1000) {
                outbox
                    .commit(chunk.iter().map(|i| sample_event(*i)).collect(), &[])
                    .unwrap();
            }
            store.flush().unwrap();
        }
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let t0 = Instant::now();
        let daemon = rt.spawn(run(
            cfg,
            RunOptions {
                drain_timeout: Duration::from_secs(2),
                injector: false,
            },
            shutdown.clone(),
            move |r| {
                let _ = tx.send((r.outbox.clone(), r.shared.clone()));
            },
        ));
        let (outbox, shared) = rx.recv().unwrap();
        let started = t0.elapsed();
        while Counters::get(&shared.counters.delivered) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let first_delivery = t0.elapsed();
        while outbox.depth() > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let drain = t0.elapsed() - first_delivery;
        shutdown.cancel();
        rt.block_on(daemon).unwrap().unwrap();
        let (client, mut eventloop) = rt.block_on(raw_client(broker.port, "bench-raw-drain", 100));
        let raw_payload = sample_event(1).to_json();
        let t0 = Instant::now();
        rt.block_on(async {
            let feeder = {
                let client = client.clone();
                let p = raw_payload.clone();
                tokio::spawn(async move {
                    for _ in 0..BACKLOG {
                        client
                            .publish("bench/raw", QoS::AtLeastOnce, false, p.clone())
                            .await
                            .unwrap();
                    }
                })
            };
            let mut acked = 0;
            while acked < BACKLOG {
                if let Ok(MqttEvent::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
                    acked += 1;
                }
            }
            feeder.await.unwrap();
        });
        let raw_drain = t0.elapsed();
        let ours_rate = BACKLOG as f64 / drain.as_secs_f64();
        let raw_rate = BACKLOG as f64 / raw_drain.as_secs_f64();
        report.push(format!(
        "backlog drain of {BACKLOG} events: daemon {:.0} events/s ({:.2} s from the first acknowledgement; start-up with the backlog {:.2} s, first delivery at {:.2} s); raw rumqttc QoS 1 {:.0} events/s ({:.2} s); ratio {:.2} (goal >= 0.5)",
            ours_rate, drain.as_secs_f64(), started.as_secs_f64(), first_delivery.as_secs_f64(), raw_rate, raw_drain.as_secs_f64(), ours_rate / raw_rate
        ));
    }

    // ---- idle cost ---------------------------------------------------------------------
    if parts.contains("idle") {
        let secs: u64 = std::env::var("ID06D_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let binary = common::shipped_binary();
        if let Ok(binary) = &binary {
            let mut simulated = String::new();
            for r in 0..4 {
                simulated.push_str(&format!("[[reader]]\nname = \"r{r}\"\nkind = \"simulated\"\nscript = \"r{r}.txt\"\npoll_ms = 100\ndirection = \"in\"\n"));
            }
            let mut runs: Vec<(String, std::path::PathBuf, String)> = vec![(
                "id06d, 4 simulated readers polling at 100 ms".into(),
                binary.clone(),
                simulated.clone(),
            )];
            if let Some(other) = std::env::var_os("ID06D_IDLE_OTHER") {
                runs.push((
                    format!(
                        "other build {}, 4 simulated readers",
                        Path::new(&other).display()
                    ),
                    other.into(),
                    simulated,
                ));
            }
            // One OSDP reader (the emulated reader runs in this process, not the daemon's).
            let osdp = id06_readers::osdp::emulator::Reader::start(0, None).ok();
            if let Some(r) = &osdp {
                runs.push((
                    "id06d, 1 OSDP reader online (secure channel off), line at 9600".into(),
                    binary.clone(),
                    format!(
                        "[[reader]]\nname = \"gate\"\nkind = \"osdp\"\npath = \"{}\"\ndirection = \"in\"\n",
                        r.path().display()
                    ),
                ));
            }
            for (i, (name, bin, readers)) in runs.iter().enumerate() {
                let dir = work.path().join(format!("idle{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                for r in 0..4 {
                    std::fs::write(dir.join(format!("r{r}.txt")), "at 0 absent\n").unwrap();
                }
                let cfg = config(&dir, broker.port, readers);
                let (cpu, rss, peak) = idle_cost(bin, &cfg.source, secs);
                report.push(format!(
                    "idle, {name}, {secs} s: CPU {cpu:.2} % of one core, RSS {rss:.1} MB (peak {peak:.1} MB) (goals < 1 %, < 30 MB)"
                ));
            }
        } else {
            report.push(format!(
                "idle cost not measured: {}",
                binary.err().unwrap_or_default()
            ));
        }
    }
    c.final_summary();
    println!("\n--- measured in this run ---");
    for line in report {
        println!("{line}");
    }
}

/// CPU (% of one core) and RSS/peak RSS (MB) of `binary` running `config` for `secs`
/// seconds after a 3-second start.
fn idle_cost(binary: &Path, config: &Path, secs: u64) -> (f64, f64, f64) {
    let mut child = std::process::Command::new(binary)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start id06d");
    std::thread::sleep(Duration::from_secs(3)); // start-up is not idle time
    let ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(11) + field(12)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let start_ticks = ticks(child.id());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let cpu = ticks(child.id()).saturating_sub(start_ticks) as f64 / hz;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0) as f64
            / 1024.0
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    (
        cpu / t0.elapsed().as_secs_f64() * 100.0,
        kb("VmRSS:"),
        kb("VmHWM:"),
    )
}
