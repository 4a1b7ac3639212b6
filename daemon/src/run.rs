//! Orchestration: open the store, start the MQTT task, the tap pipeline and the readers,
//! and stop them in order (DESIGN.md §5): readers first, then the pipeline writes what is in
//! flight, then MQTT delivers what it can and says goodbye, then sled is flushed.

use crate::config::Config;
use crate::lists::blocklist::Blocklist;
use crate::mqtt::delivery::MqttTask;
use crate::shared::Shared;
use crate::storage::outbox::Outbox;
use crate::storage::store::{Store, StoreError};
use crate::tap::debounce::Debouncer;
use crate::tap::pipeline::{Pipeline, ReaderInfo};
use crate::tap::readers::spawn_reader;
use id06_protocol::{Topics, UtcMillis};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why the daemon could not run or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The data directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file the configuration points to.
    #[error("{0}")]
    Setup(String),
    /// A critical task died.
    #[error("internal failure: {0}")]
    Internal(String),
}

/// What a running daemon exposes to whoever started it (the CLI, the demo, tests).
pub struct Running {
    /// Counters and reader states.
    pub shared: Arc<Shared>,
    /// The outbox (read-only use).
    pub outbox: Outbox,
    /// The blocklist.
    pub blocklist: Blocklist,
    /// The store.
    pub store: Store,
    /// With [`RunOptions::injector`]: a sender into the tap pipeline, as if from a reader
    /// (benchmarks and tests). Drop every clone before shutdown, or the pipeline waits.
    pub injector: Option<mpsc::Sender<id06_readers::ReaderMessage>>,
}

/// Options that are not in the configuration file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// After shutdown, how long MQTT may keep delivering the outbox.
    pub drain_timeout: Duration,
    /// Hand out a sender into the pipeline in [`Running::injector`].
    pub injector: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            drain_timeout: Duration::from_secs(3),
            injector: false,
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled. `on_started` is called once everything is
/// set up (the store is open, the MQTT task and the readers run).
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
    on_started: impl FnOnce(&Running),
) -> Result<(), RunError> {
    let started_at = UtcMillis::now();
    raise_open_files_limit();
    let store = {
        let dir = config.data_dir.clone();
        let terminal = config.terminal_id.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir, &terminal))
            .await
            .map_err(|e| RunError::Internal(e.to_string()))??
    };
    let outbox = Outbox::open(&store)?;
    outbox.set_ledger_confirm(config.ledger.confirm);
    // Checkpoints (sled flushed and synced) off the tap pipeline's thread.
    let checkpoints = outbox
        .start_checkpoints()
        .map_err(|e| RunError::Internal(format!("cannot start the checkpoint thread: {e}")))?;
    let (unstored_record, lost) = match crate::storage::diskguard::UnstoredRecord::open(
        &config.data_dir,
    ) {
        Ok((r, lost)) => (Some(r), lost),
        Err(e) => {
            tracing::warn!("cannot keep unstored.state in {}: {e}; taps lost to a full disk and a crash would go unreported", config.data_dir.display());
            (None, None)
        }
    };
    let lost_report = lost.map(|l| {
        format!(
            "the previous run stopped with {} tap(s) not yet stored (the disk was full), taken between {} and {}; they are lost",
            l.count, l.first, l.last
        )
    });
    if let Some(r) = &lost_report {
        tracing::error!("{r}");
    }
    let blocklist = Blocklist::open(&store.db, &store.dir)?;
    let site_list = crate::lists::site_list::SiteList::open(&store.db, &store.dir)?;
    let password = match &config.mqtt.password_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| {
                    RunError::Setup(format!(
                        "cannot read [mqtt] password_file {}: {e}",
                        path.display()
                    ))
                })?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        ),
        None => None,
    };
    let tls = if config.mqtt.tls {
        Some(
            crate::mqtt::tls::client_config(&config.mqtt)
                .map_err(|e| RunError::Setup(e.to_string()))?,
        )
    } else {
        None
    };
    if config.blocklist.public_key.is_none() {
        tracing::warn!("no [blocklist] public_key: blocklist updates would be accepted unsigned");
    }
    if config.readers.is_empty() {
        tracing::warn!("no [[reader]] configured: this gateway will record no taps");
    }
    if !crate::ops::clock::clock_synced() {
        tracing::warn!("the system clock is not synchronised (no NTP yet?); events carry clock_synced = false until it is");
    }
    {
        // Scoped: a picture of the list held for the daemon's lifetime would keep the
        // first index (67 MB at 5 million cards) in memory beside every later one.
        let index = blocklist.index();
        tracing::info!(
            terminal = %config.terminal_id,
            site = %config.site_id,
            data_dir = %config.data_dir.display(),
            last_seq = outbox.last_seq(),
            outbox_depth = outbox.depth(),
            blocklist_version = index.version,
            blocklist_cards = index.len(),
            "id06d starting"
        );
    }

    let names: Vec<String> = config.readers.iter().map(|r| r.name.clone()).collect();
    let shared = Arc::new(Shared::new(&names));
    if let Some(r) = lost_report {
        if let Ok(mut e) = shared.storage_loss.lock() {
            *e = Some(r);
        }
    }
    let topics = Topics::new(
        &config.mqtt.topic_prefix,
        &config.site_id,
        &config.terminal_id,
    );

    // Blocklist updates from MQTT.
    let public_key = match &config.blocklist.public_key {
        Some(k) => Some(crate::lists::signing::parse_public_key(k).map_err(RunError::Setup)?),
        None => None,
    };
    let sync = crate::lists::sync::BlocklistSync::new(
        blocklist.clone(),
        public_key,
        shared.clone(),
        &config.data_dir,
    );
    let lists_stop = CancellationToken::new();
    let (replays_tx, replays_rx) = mpsc::channel(crate::mqtt::delivery::REPLAYS_QUEUED);
    let list_session = crate::mqtt::list_session::ListSession {
        ledger: crate::mqtt::ledger_inbox::LedgerInbox {
            outbox: outbox.clone(),
            replays: replays_tx,
        },
        settings: config.mqtt.clone(),
        password: password.clone(),
        tls: tls.clone(),
        topics: topics.clone(),
        sync,
        shutdown: lists_stop.clone(),
    };
    let sync_task = tokio::spawn(list_session.run());

    // MQTT.
    let (decisions_tx, decisions_rx) = mpsc::channel(256);
    let mqtt_stop = CancellationToken::new();
    let (doors_tx, doors_rx) = mpsc::channel(8192);
    let door_session = crate::mqtt::door_session::DoorSession {
        settings: config.mqtt.clone(),
        password: password.clone(),
        tls: tls.clone(),
        topic: topics.decision(),
        decisions: doors_rx,
        shared: shared.clone(),
        shutdown: mqtt_stop.clone(),
    };
    let mqtt = MqttTask {
        settings: config.mqtt.clone(),
        password,
        tls,
        topics,
        outbox: outbox.clone(),
        blocklist: blocklist.clone(),
        max_age_hours: config.blocklist.max_age_hours,
        shared: shared.clone(),
        decisions: decisions_rx,
        started_at,
        shutdown: mqtt_stop.clone(),
        drain_timeout: options.drain_timeout,
        decisions_closed: false,
        ledger: config.ledger,
        replays: replays_rx,
        sent_at: Default::default(),
        replay_jobs: Default::default(),
    };

    // An empty or never-confirmed list decides for everyone: said at start and every hour.
    let list_watch = {
        let (blocklist, site_list) = (blocklist.clone(), site_list.clone());
        let (when_stale, mode) = (config.blocklist.when_stale, config.access.mode);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                every.tick().await;
                for line in list_warnings(&blocklist.index(), &site_list.index(), when_stale, mode)
                {
                    tracing::warn!("{line}");
                }
            }
        })
    };

    // Log lines stderr did not take (see ops::logging), said every few seconds.
    let log_watch = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        let mut said = 0;
        loop {
            every.tick().await;
            crate::ops::logging::report_dropped(&mut said);
        }
    });

    // Delivered events are kept `keep_days` for `events export`, then pruned (hourly).
    let keep_ms = i64::from(config.events.keep_days) * 24 * 3600 * 1000;
    let pruner = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                every.tick().await;
                let outbox = outbox.clone();
                let cutoff = UtcMillis(UtcMillis::now().as_millis() - keep_ms);
                match tokio::task::spawn_blocking(move || outbox.prune_delivered(cutoff)).await {
                    Ok(Ok((removed, kept))) => {
                        if removed > 0 {
                            tracing::info!(removed, "pruned delivered events older than keep_days");
                        }
                        if kept > 0 {
                            tracing::warn!(kept, "{kept} events older than keep_days are kept because the ledger has not confirmed them (P/ack); they hold disk space until it does");
                        }
                    }
                    Ok(Err(e)) => tracing::warn!("cannot prune old events: {e}"),
                    Err(_) => {}
                }
            }
        })
    };

    // Read-only questions from `id06d events export` / `outbox stats` while we hold sled.
    let control_stop = CancellationToken::new();
    let control = tokio::spawn(crate::ops::control::serve(
        store.dir.clone(),
        outbox.clone(),
        blocklist.clone(),
        site_list.clone(),
        control_stop.clone(),
    ));

    // The tap pipeline and the MQTT task, together on their own thread (below).
    let (reader_tx, reader_rx) = mpsc::channel(4096);
    let osdp_lines =
        crate::tap::readers::osdp_lines(&config.readers, &reader_tx).map_err(RunError::Setup)?;
    let (pcsc_feedback, mut pcsc_drivers) = crate::tap::readers::pcsc_feedback(&config.readers);
    let pipeline = Pipeline {
        site_id: config.site_id.clone(),
        terminal_id: config.terminal_id.clone(),
        readers: config
            .readers
            .iter()
            .map(|r| ReaderInfo {
                name: r.name.clone(),
                direction: r.direction,
            })
            .collect(),
        debouncer: Debouncer::new(config.debounce),
        outbox: outbox.clone(),
        blocklist: blocklist.clone(),
        site_list: site_list.clone(),
        access: config.access.mode,
        max_age_hours: config.blocklist.max_age_hours,
        when_stale: config.blocklist.when_stale,
        shared: shared.clone(),
        decisions: decisions_tx,
        doors: doors_tx,
        feedback: osdp_lines
            .feedback
            .iter()
            .cloned()
            .chain(pcsc_feedback)
            .collect(),
        epoch: Instant::now(),
        clock_was_synced: Some(crate::ops::clock::clock_synced()),
        data_dir: config.data_dir.clone(),
        unstored_record,
    };
    // One thread with a runtime of its own runs both: a commit blocks it for the
    // fdatasync, and the decision it makes is on the socket as soon as the pipeline waits
    // again, without waking another core (on a small VM that wake-up cost ~30-50 us, a
    // fifth of the whole tap -> PUBACK time). The MQTT task stops only after the pipeline
    // has written everything it was given, once `stopping` says the daemon is stopping.
    let (pipeline_done_tx, pipeline_done) = tokio::sync::oneshot::channel::<()>();
    let (mqtt_done_tx, mqtt_done) = tokio::sync::oneshot::channel::<String>();
    let stopping = CancellationToken::new();
    let delivery_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Internal(format!("cannot start the delivery runtime: {e}")))?;
    let delivery_thread = {
        let stopping = stopping.clone();
        std::thread::Builder::new()
            .name("tap-delivery".into())
            .spawn(move || {
                delivery_runtime.block_on(async move {
                    // The door session too: a decision reaches its socket on this thread.
                    let doors = tokio::spawn(door_session.run());
                    let mqtt_task = tokio::spawn(mqtt.run());
                    let mqtt_watch = tokio::spawn(async move {
                        let ended = match mqtt_task.await {
                            Ok(()) => "it returned".to_string(),
                            Err(e) => e.to_string(),
                        };
                        let _ = mqtt_done_tx.send(ended);
                    });
                    pipeline.run(reader_rx).await;
                    let _ = pipeline_done_tx.send(());
                    stopping.cancelled().await;
                    mqtt_stop.cancel();
                    let _ = mqtt_watch.await;
                    let _ = doors.await;
                })
            })
            .map_err(|e| RunError::Internal(format!("cannot start the tap pipeline thread: {e}")))?
    };

    // Readers.
    let readers_stop = CancellationToken::new();
    let mut reader_tasks: Vec<_> = config
        .readers
        .iter()
        .enumerate()
        .filter(|(_, r)| !matches!(r.driver, crate::config::DriverSettings::Osdp { .. }))
        .map(|(i, r)| {
            let feedback = pcsc_drivers.get_mut(i).and_then(Option::take);
            spawn_reader(i, r, reader_tx.clone(), readers_stop.clone(), feedback)
        })
        .collect();
    reader_tasks.extend(osdp_lines.spawn(&readers_stop));
    let running = Running {
        shared: shared.clone(),
        outbox: outbox.clone(),
        blocklist: blocklist.clone(),
        store: store.clone(),
        injector: options.injector.then(|| reader_tx.clone()),
    };
    drop(reader_tx);
    // The commissioning page and /metrics.
    let status_source = crate::ops::status::StatusSource {
        shared: shared.clone(),
        outbox: outbox.clone(),
        blocklist: blocklist.clone(),
        site_list: site_list.clone(),
        started_at,
        ledger_confirm: config.ledger.confirm,
        max_age_hours: config.blocklist.max_age_hours,
        access_mode: config.access.mode,
        site_id: config.site_id.clone(),
        terminal_id: config.terminal_id.clone(),
    };
    let mut servers: Vec<Option<tokio::task::JoinHandle<()>>> = Vec::new();
    if let Some(http) = &config.http {
        let password = http.read_password().map_err(RunError::Setup)?;
        let app = crate::ops::http::router(
            status_source.clone(),
            password.as_deref(),
            crate::ops::http::Serves::Everything,
        );
        servers.push(start_server(http.listen, "[http]", app, |addr| {
            tracing::info!(%addr, "commissioning page at http://{addr}/ (metrics at http://{addr}/metrics)")
        }));
    }
    if let Some(addr) = config.metrics_listen {
        let app = crate::ops::http::router(
            status_source.clone(),
            None,
            crate::ops::http::Serves::MetricsOnly,
        );
        servers.push(start_server(
            addr,
            "[metrics]",
            app,
            |addr| tracing::info!(%addr, "metrics at http://{addr}/metrics"),
        ));
    }
    // The data directory, watched while we run (see `storage/watch.rs`).
    let (watch_tx, watch_failed) = tokio::sync::oneshot::channel::<String>();
    let watcher = {
        let (outbox, shared, dir) = (outbox.clone(), shared.clone(), config.data_dir.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::storage::watch::WATCH_EVERY);
            loop {
                every.tick().await;
                let (o, d) = (outbox.clone(), dir.clone());
                // A commit that found the directory unusable, or a look at it now.
                let failed_commit = shared.storage_unusable.lock().ok().and_then(|u| u.clone());
                let checked = match failed_commit {
                    Some(why) => Err(why),
                    None => tokio::task::spawn_blocking(move || {
                        o.check_in_place()
                            .and_then(|()| crate::storage::watch::writable(&d))
                    })
                    .await
                    .unwrap_or(Ok(())),
                };
                if let Err(why) = checked {
                    tracing::error!("THE DATA DIRECTORY IS GONE OR UNUSABLE: {why}; no tap can be stored, stopping so that the service restarts on a sound data directory");
                    if let Ok(mut e) = shared.storage_error.lock() {
                        *e = Some(why.clone());
                    }
                    shared.status_changed();
                    let _ = watch_tx.send(why);
                    return;
                }
            }
        })
    };
    on_started(&running);
    drop(running); // its injector must not keep the pipeline open
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let watchdog = spawn_watchdog(shared.clone());

    // Run until told to stop, or until a critical task dies.
    let mut mqtt_done = mqtt_done;
    let mut watch_failed = watch_failed;
    let failure = tokio::select! {
        _ = shutdown.cancelled() => None,
        Ok(why) = &mut watch_failed => {
            // Let the MQTT task tell the broker (storage_error on P/status) before stopping.
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some(format!("the data directory cannot be used: {why}"))
        }
        done = pipeline_done => match done {
            // Only happens on its own if every reader task ended and dropped its sender
            // (simulated readers that finished): not a failure, keep serving MQTT.
            Ok(()) => tokio::select! {
                _ = shutdown.cancelled() => None,
                r = &mut mqtt_done => Some(format!("the MQTT task stopped: {}", r.unwrap_or_default())),
            },
            Err(_) => Some("the tap pipeline stopped".to_string()),
        },
        r = &mut mqtt_done => Some(format!("the MQTT task stopped: {}", r.unwrap_or_default())),
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopping: readers first, then the outbox, then MQTT");

    readers_stop.cancel();
    for t in reader_tasks {
        let _ = t.await;
    }
    // The pipeline writes what it still holds, then MQTT delivers what it can.
    stopping.cancel();
    let joined = tokio::task::spawn_blocking(move || delivery_thread.join())
        .await
        .map_err(|e| RunError::Internal(e.to_string()))?;
    if joined.is_err() {
        return Err(RunError::Internal(
            "the tap pipeline thread panicked".into(),
        ));
    }
    lists_stop.cancel();
    let _ = sync_task.await;
    pruner.abort();
    list_watch.abort();
    log_watch.abort();
    watcher.abort();
    control_stop.cancel();
    let _ = control.await;
    if let Some(w) = watchdog {
        w.abort();
    }
    for server in servers.into_iter().flatten() {
        server.abort();
    }
    drop(checkpoints);
    if let Err(e) = outbox.checkpoint() {
        if failure.is_none() {
            return Err(e.into());
        }
        tracing::error!("cannot checkpoint the outbox at stop: {e}");
    }
    tracing::info!(
        last_seq = outbox.last_seq(),
        outbox_depth = outbox.depth(),
        "id06d stopped"
    );
    match failure {
        Some(f) => Err(RunError::Internal(f)),
        None => Ok(()),
    }
}

/// Serves `app` on `addr` and says where. A port that cannot be had is an error in the log
/// and no server: the page and the metrics are for people, the taps must go on.
fn start_server(
    addr: std::net::SocketAddr,
    section: &str,
    app: axum::Router,
    announce: impl FnOnce(std::net::SocketAddr),
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = match crate::ops::http::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen for {section} on {addr}: {e}; the gateway runs without it (change {section} listen and restart)");
            return None;
        }
    };
    announce(listener.local_addr().unwrap_or(addr));
    let section = section.to_string();
    Some(tokio::spawn(async move {
        if let Err(e) = crate::ops::http::serve(listener, app).await {
            tracing::error!("the {section} server stopped: {e}");
        }
    }))
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit is
/// 1024): the outbox, three MQTT sessions, readers, the control socket and the metrics
/// endpoint all need descriptors.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65_536);
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// What the lists in force mean for every card, when that is "everyone passes" or
/// "everyone is denied".
pub fn list_warnings(
    national: &crate::lists::blocklist::BlocklistIndex,
    site: &crate::lists::site_list::SiteIndex,
    when_stale: crate::config::WhenStale,
    mode: crate::config::AccessMode,
) -> Vec<String> {
    use crate::config::{AccessMode, WhenStale};
    let mut out = Vec::new();
    if national.confirmed_at.is_none() {
        out.push(match when_stale {
            WhenStale::Allow => "the national blocklist has never been confirmed (no import, update or snapshot yet): every card passes that the site list does not stop (when_stale = \"allow\"; events carry blocklist_stale = true)".to_string(),
            WhenStale::Deny => "the national blocklist has never been confirmed (no import, update or snapshot yet): every card is denied (when_stale = \"deny\")".to_string(),
        });
    } else if national.is_empty() {
        out.push(format!(
            "the national blocklist (version {}) lists no card: every card passes that the site list does not stop",
            national.version
        ));
    }
    if mode == AccessMode::SiteList && site.counts().1 == 0 {
        out.push("[access] mode = \"site_list\" but the site's allow list is empty: every card is denied (import one with `id06d site-list import`)".to_string());
    }
    out
}

/// Feeds the systemd watchdog (when `WatchdogSec=` is set) while the work loops make
/// progress; stops feeding, with a log line, when one of them is stuck, so that systemd
/// restarts the daemon.
fn spawn_watchdog(shared: Arc<Shared>) -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        let mut complained = false;
        loop {
            tick.tick().await;
            let hb = &shared.heartbeat;
            match hb.stalled(hb.now_ms(), 20_000, 45_000) {
                None => {
                    complained = false;
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
                Some(why) => {
                    if !complained {
                        tracing::error!("not feeding the systemd watchdog: {why}");
                        complained = true;
                    }
                }
            }
        }
    }))
}
