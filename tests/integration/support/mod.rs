//! Shared test support: a real mosquitto, the real `id06d` binary as a child process, and a
//! ledger-side MQTT subscriber that records what arrives. Everything waits for conditions
//! with deadlines; nothing sleeps a fixed time to "let things settle".

#![allow(dead_code)]

pub mod browser;
pub mod lossyfs;
pub use id06d::mqtt::broker::LocalBroker;
pub use lossyfs::LossyMount;
use rumqttc::{Client, Event as MqttEvent, MqttOptions, Packet, QoS};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The daemon binary Cargo built for these tests.
pub const ID06D: &str = env!("CARGO_BIN_EXE_id06d");

/// Waits until `cond` holds, or panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory for one test, removed at the end.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("id06d-test-")
        .tempdir()
        .expect("a temporary directory")
}

/// Starts a private mosquitto for one test.
pub fn broker(dir: &Path) -> LocalBroker {
    LocalBroker::start(&dir.join("broker"), "").expect("mosquitto starts")
}

/// A configuration file for one test.
pub struct TestConfig {
    pub path: PathBuf,
    pub site: String,
    pub terminal: String,
}

impl TestConfig {
    /// Writes `id06d.toml` in `dir` with the given broker URL and `extra` TOML (readers,
    /// sections) appended.
    pub fn write(dir: &Path, broker_url: &str, extra: &str) -> TestConfig {
        let path = dir.join("id06d.toml");
        let text = format!(
            "site_id = \"SE-TEST\"\nterminal_id = \"gate-test\"\ndata_dir = \"data\"\n\n[mqtt]\nurl = \"{broker_url}\"\n\n{extra}\n"
        );
        std::fs::write(&path, text).expect("write config");
        TestConfig {
            path,
            site: "SE-TEST".into(),
            terminal: "gate-test".into(),
        }
    }

    /// `P` for this configuration.
    pub fn base(&self) -> String {
        format!("id06/v1/{}/{}", self.site, self.terminal)
    }
}

/// Runs `id06d ARGS…` to completion; returns (exit code, stdout, stderr).
pub fn id06d(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(ID06D)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run id06d");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The daemon as a child process (`id06d run`), its log in a file.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `id06d run --config path`.
    pub fn start(config: &TestConfig) -> Daemon {
        Daemon::start_under(config, &[])
    }

    /// Starts `WRAPPER… id06d run --config path`, for a wrapper that execs its command
    /// (`prlimit --nofile=1024:1024 --`), so that the child is the daemon.
    pub fn start_under(config: &TestConfig, wrapper: &[&str]) -> Daemon {
        let dir = config.path.parent().expect("config dir");
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let log = dir.join(format!("daemon-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        Daemon::spawn(config, wrapper, log, Stdio::from(file))
    }

    /// Starts `id06d run --config path` with its stderr on a pipe, the read end returned
    /// (`log_text` is empty for such a daemon).
    pub fn start_piped(config: &TestConfig) -> (Daemon, std::process::ChildStderr) {
        let mut d = Daemon::spawn(config, &[], PathBuf::new(), Stdio::piped());
        let stderr = d
            .child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .expect("the daemon's stderr");
        (d, stderr)
    }

    fn spawn(config: &TestConfig, wrapper: &[&str], log: PathBuf, stderr: Stdio) -> Daemon {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(ID06D);
                c
            }
            None => Command::new(ID06D),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&config.path)
            .env("RUST_LOG", "info,id06d=debug,rumqttc=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start id06d");
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// Waits until this daemon has set up (and handles signals).
    pub fn wait_started(&self) {
        wait_for("the daemon to start", Duration::from_secs(20), || {
            self.log_text().contains("id06d starting")
        });
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child process by pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("id06d did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Its exit code once it has exited on its own (`None` while it runs, or for a signal).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .and_then(|s| s.code())
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One message as the subscriber received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// Which connection of the subscriber it arrived on (0, 1, … after reconnects).
    pub connection: u32,
}

/// A ledger-side subscriber with a persistent session, on its own thread.
pub struct Subscriber {
    pub messages: Arc<Mutex<Vec<Received>>>,
    client: Client,
}

impl Subscriber {
    /// Connects as `client_id` to the broker on `port` and subscribes to `filters`; returns
    /// once the subscription is acknowledged.
    pub fn start(port: u16, client_id: &str, filters: &[&str]) -> Subscriber {
        Self::start_as(port, client_id, filters, None)
    }

    /// Like [`Subscriber::start`], logging in with a user name and password.
    pub fn start_as(
        port: u16,
        client_id: &str,
        filters: &[&str],
        login: Option<(&str, &str)>,
    ) -> Subscriber {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut connection) = Client::new(o, 100);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(Mutex::new(false));
        let m = messages.clone();
        let s = subscribed.clone();
        let c = client.clone();
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        std::thread::spawn(move || {
            let mut conn_no: u32 = 0;
            let mut first = true;
            for event in connection.iter() {
                match event {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        if !first {
                            conn_no += 1;
                        }
                        first = false;
                        for f in &filters {
                            let _ = c.try_subscribe(f.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                        *s.lock().unwrap() = true;
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        m.lock().unwrap().push(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            connection: conn_no,
                        });
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        wait_for("the subscription", Duration::from_secs(10), || {
            *subscribed.lock().unwrap()
        });
        Subscriber { messages, client }
    }

    /// Every message on `topic` so far.
    pub fn on(&self, topic: &str) -> Vec<Received> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.topic == topic)
            .cloned()
            .collect()
    }

    /// Every message on `topic` so far, decoded as JSON.
    pub fn json_on(&self, topic: &str) -> Vec<serde_json::Value> {
        self.on(topic)
            .iter()
            .map(|r| serde_json::from_slice(&r.payload).expect("JSON payload"))
            .collect()
    }

    /// The newest message on `topic`, as JSON.
    pub fn last_json(&self, topic: &str) -> Option<serde_json::Value> {
        self.json_on(topic).pop()
    }

    /// Events received on `topic` (each arrival, duplicates included), decoded.
    pub fn events(&self, topic: &str) -> Vec<id06_protocol::Event> {
        self.on(topic)
            .iter()
            .map(|r| id06_protocol::Event::from_json(&r.payload).expect("a valid id06d/event/v1"))
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// Writes a simulated reader timeline.
pub fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write script");
    p
}

/// A 7-byte UID for card number `n` (`04` + 12 hex digits).
pub fn card(n: u32) -> String {
    format!("04{:012X}", n)
}

/// Publishes one raw message (QoS 1) and waits for the broker's acknowledgement.
pub fn publish_raw(port: u16, topic: &str, payload: Vec<u8>, retain: bool) {
    let mut o = MqttOptions::new(format!("raw-{}", std::process::id()), "127.0.0.1", port);
    o.set_max_packet_size(64 << 20, 64 << 20);
    let (client, mut connection) = Client::new(o, 10);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .expect("queue the publish");
    for event in connection.iter() {
        match event {
            Ok(MqttEvent::Incoming(Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("publishing to {topic} failed: {e}"),
        }
    }
    let _ = client.disconnect();
}

/// Publishes `messages` (topic, payload, retain) with QoS 1 on one connection, as fast as
/// the broker takes them, and waits until every one is acknowledged.
pub fn publish_many(port: u16, messages: Vec<(String, Vec<u8>, bool)>) {
    let mut o = MqttOptions::new(format!("burst-{}", std::process::id()), "127.0.0.1", port);
    o.set_max_packet_size(64 << 20, 64 << 20);
    o.set_inflight(100);
    let (client, mut connection) = Client::new(o, 1000);
    let total = messages.len();
    let feeder = std::thread::spawn(move || {
        for (topic, payload, retain) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .expect("queue the publish");
        }
        client
    });
    let mut acked = 0;
    for event in connection.iter() {
        match event {
            Ok(MqttEvent::Incoming(Packet::PubAck(_))) => {
                acked += 1;
                if acked == total {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("publishing failed after {acked} of {total}: {e}"),
        }
    }
    if let Ok(client) = feeder.join() {
        let _ = client.disconnect();
    }
}

/// The peak resident memory of a process, in bytes (VmHWM).
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A tmpfs mounted on a fresh directory for one test (needs root, as CI and the README's
/// test command run); unmounted when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(parent: &Path, name: &str, options: &str) -> Tmpfs {
        let path = parent.join(name);
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (run the tests as root, as ./run.sh test does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the file system of `dir` until at most `leave` bytes are free; returns the filler.
pub fn fill_disk(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&filler)
        .unwrap();
    let block = vec![0xA5u8; 256 * 1024];
    while id06d::storage::diskguard::free_bytes(dir).unwrap() > leave {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
    filler
}

/// A small deterministic random generator for fault schedules (the seed is printed).
pub struct Rng(pub u64);

impl Rng {
    pub fn from_env_or_time() -> Rng {
        let seed = std::env::var("ID06D_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        eprintln!("chaos seed: {seed} (set ID06D_CHAOS_SEED={seed} to repeat this schedule)");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration between `lo` and `hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// The seqs received on P/event: every arrival must decode, equal seqs must carry the same
/// event, and first arrivals must come in seq order. Returns first arrivals by seq and the
/// number of redeliveries.
pub fn check_delivery(
    events: &[id06_protocol::Event],
) -> (std::collections::BTreeMap<u64, id06_protocol::Event>, usize) {
    let mut first: std::collections::BTreeMap<u64, id06_protocol::Event> =
        std::collections::BTreeMap::new();
    let mut redeliveries = 0;
    let mut highest = 0u64;
    for e in events {
        match first.get(&e.seq) {
            Some(prev) => {
                assert_eq!(prev, e, "seq {} was reused for a different event", e.seq);
                redeliveries += 1;
            }
            None => {
                assert_eq!(
                    e.seq,
                    highest + 1,
                    "new events must arrive in seq order without a gap (got {} after {})",
                    e.seq,
                    highest
                );
                highest = e.seq;
                first.insert(e.seq, e.clone());
            }
        }
    }
    (first, redeliveries)
}

pub fn outbox_stats(config: &TestConfig) -> (u64, u64) {
    let (code, out, err) = id06d(&["outbox", "stats", "--config", config.path.to_str().unwrap()]);
    assert_eq!(code, 0, "outbox stats: {err}");
    let num = |label: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap_or_else(|| panic!("no {label} in {out}"))
    };
    (num("outbox depth"), num("last seq"))
}

/// Writes `csv` (uid,status lines) next to the configuration and imports it with
/// `id06d blocklist import [EXTRA…]`, which must succeed; returns what it printed.
pub fn import_list(config: &str, csv: &str, extra: &[&str]) -> String {
    let path = Path::new(config).with_file_name("list.csv");
    std::fs::write(&path, csv).expect("write the list");
    let list = path.to_str().expect("a UTF-8 path");
    let mut args = vec!["blocklist", "import", list];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--config", config]);
    let (code, out, err) = id06d(&args);
    assert_eq!(code, 0, "blocklist import: {err}");
    out
}

/// `id06d events export --since 2020-01-01 --format FORMAT`, which must succeed.
pub fn export_events(config: &str, format: &str) -> String {
    let (code, out, err) = id06d(&[
        "events",
        "export",
        "--since",
        "2020-01-01",
        "--format",
        format,
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "events export --format {format}: {err}");
    out
}

/// Three readers, each presenting a new card every `step_ms` for `secs` seconds.
pub fn stream_config(dir: &Path, url: &str, secs: u64, step_ms: u64, extra: &str) -> TestConfig {
    let mut readers = String::new();
    for r in 0..3u64 {
        let mut script = String::new();
        let n = secs * 1000 / step_ms;
        for i in 0..n {
            let t = i * step_ms + r * step_ms / 3;
            script.push_str(&format!(
                "at {t} present {}\n",
                card((r as u32 + 1) * 1_000_000 + i as u32)
            ));
        }
        script.push_str(&format!(
            "at {} absent\nat {} end\n",
            n * step_ms + 100,
            n * step_ms + 200
        ));
        write_script(dir, &format!("r{r}.txt"), &script);
        readers.push_str(&format!(
            "[[reader]]\nname = \"r{r}\"\nkind = \"simulated\"\nscript = \"r{r}.txt\"\npoll_ms = 10\ndirection = \"{}\"\n\n",
            ["in", "out", "toggle"][r as usize]
        ));
    }
    TestConfig::write(dir, url, &format!("{readers}{extra}"))
}

/// Waits until the subscriber has every seq from 1 to `last`, then checks order and
/// redeliveries; returns the number of redeliveries.
pub fn assert_all_delivered(sub: &Subscriber, p: &str, last: u64) -> usize {
    wait_for(
        &format!("every seq 1..={last} on P/event"),
        Duration::from_secs(60),
        || {
            sub.events(&format!("{p}/event"))
                .iter()
                .map(|e| e.seq)
                .collect::<BTreeSet<_>>()
                .len() as u64
                >= last
        },
    );
    let (first, redeliveries) = check_delivery(&sub.events(&format!("{p}/event")));
    assert_eq!(
        first.len() as u64,
        last,
        "seq 1..={last}, nothing missing, nothing extra"
    );
    redeliveries
}

/// Builds the Debian package of the binary under test into `dir` with
/// `packaging/build-deb.sh` (as `version`, or Cargo.toml's); the .deb's path.
pub fn build_deb(dir: &Path, version: Option<&str>) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut build = Command::new(repo.join("packaging/build-deb.sh"));
    build.args(["--binary", ID06D]);
    if let Some(v) = version {
        build.args(["--version", v]);
    }
    let out = build
        .arg("--out")
        .arg(dir)
        .output()
        .expect("run build-deb.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
