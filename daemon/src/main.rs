//! The `id06d` command line (contract §3). Exit status: 0 success, 2 usage or configuration
//! error, 1 runtime failure. Every error is one line on stderr.

use clap::{Parser, Subcommand, ValueEnum};
use id06_protocol::{CardUid, UtcMillis};
use id06d::blocklist::{parse_csv, Blocklist};
use id06d::config::Config;
use id06d::outbox::Outbox;
use id06d::store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where the configuration is when `--config` and `ID06D_CONFIG` do not say.
const DEFAULT_CONFIG: &str = "/etc/id06d/id06d.toml";
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "id06d",
    version,
    about = "ID06 card readers to the electronic personnel ledger, over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (what systemd starts).
    Run {
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// The whole pipeline on this machine: simulated readers, a private broker, a ledger.
    Demo,
    /// Validate a configuration and print the effective configuration.
    CheckConfig {
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// List the PC/SC readers and serial ports that can be used.
    Readers,
    /// The local blocklist.
    Blocklist {
        #[command(subcommand)]
        command: BlocklistCommand,
    },
    /// The site's own list: cards banned from this site, and the allow list that
    /// `[access] mode = "site_list"` admits.
    SiteList {
        #[command(subcommand)]
        command: SiteListCommand,
    },
    /// The outbox of events waiting for the broker.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// This terminal's recorded taps.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Subcommand)]
enum BlocklistCommand {
    /// Replace the list from a CSV file of `uid,status` lines.
    /// Only on a gateway without `[blocklist] public_key` (with a key, the national list
    /// comes from the backend alone; ban cards for this site with `site-list import`).
    Import {
        /// The CSV file.
        file: PathBuf,
        /// The new list's version, newer than the one in force (default: the current + 1).
        #[arg(long)]
        version: Option<u64>,
        /// Import also a file that lists no card, or one that takes more than
        /// `[blocklist] import_max_shrink_percent` of the listed cards off the list.
        #[arg(long)]
        allow_shrink: bool,
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// The status of one card, and the list's version and age.
    Lookup {
        /// The card UID (any spelling: 04A1B2…, 04:a1:b2…).
        uid: String,
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Size, version, age and counts per status.
    Stats {
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Make a signing key pair: the secret goes to a file, the public key is printed
    /// (for `[blocklist] public_key`).
    Keygen {
        /// Where to write the secret key (created with mode 0600; never overwritten).
        #[arg(long)]
        secret_out: PathBuf,
    },
    /// Sign an update (JSON file); prints the signed update.
    Sign {
        /// The update, `id06d/blocklist-update/v1` JSON.
        file: PathBuf,
        /// The secret key file from `keygen`.
        #[arg(long)]
        key: PathBuf,
    },
    /// Publish an update (JSON file) to `{prefix}/blocklist/update`.
    PublishUpdate {
        /// The update, `id06d/blocklist-update/v1` JSON.
        file: PathBuf,
        /// Sign it with this secret key first.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The configuration file naming the broker and topic prefix.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Publish a full list (CSV of uid,status) as the retained snapshot.
    PublishSnapshot {
        /// The CSV file.
        file: PathBuf,
        /// The snapshot's version.
        #[arg(long)]
        version: u64,
        /// Sign the manifest with this secret key.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The configuration file naming the broker and topic prefix.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SiteListCommand {
    /// Replace the site list from a CSV file of `uid,ban` / `uid,allow` lines (also while
    /// the daemon runs: it takes effect at once).
    Import {
        /// The CSV file.
        file: PathBuf,
        /// The new site list's version, newer than the one in force (default: the current + 1).
        #[arg(long)]
        version: Option<u64>,
        /// Import also a file that lists no card (an empty site list).
        #[arg(long)]
        allow_shrink: bool,
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Events waiting for delivery and the oldest one's age.
    Stats {
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Csv,
    Json,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print the recorded taps since a time, delivered or not.
    Export {
        /// RFC 3339 time (2026-11-22T06:00:00Z) or a date (2026-11-22, local midnight).
        #[arg(long)]
        since: String,
        /// Only taps before this time (same spellings as --since; a date means its midnight).
        #[arg(long)]
        until: Option<String>,
        /// Only this stream (its UUID, as in `outbox stats`).
        #[arg(long)]
        stream: Option<String>,
        /// Only seqs from this one on.
        #[arg(long)]
        from_seq: Option<u64>,
        /// Only seqs up to this one.
        #[arg(long)]
        to_seq: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: Format,
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// A failure with its exit status.
struct Failure {
    code: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn runtime(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(2),
            };
        }
    };
    if !matches!(cli.command, Command::Run { .. } | Command::Demo) {
        // A command whose output goes into `head` or a closed pipe ends quietly there, as
        // Unix tools do, instead of failing on the write.
        // SAFETY: restoring the default action of SIGPIPE before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = dispatch(cli.command);
    // The store is closed by now. Files a root command created in the daemon user's data
    // directory go to that user, or the daemon could not open them at its next start.
    if let Some(dir) = OPENED.get() {
        if let Err(e) = id06d::store::give_to_owner(dir) {
            eprintln!(
                "id06d: warning: cannot give new files in {} to the directory's owner: {e}",
                dir.display()
            );
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("id06d: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn load_config(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| usage(e.to_string()))
}

/// The data directory a command opened itself, to hand new files back to its owner at the
/// end (see [`id06d::store::give_to_owner`]).
static OPENED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The store of an existing data directory (never created here), or `None` when a running
/// daemon holds it (ask it over the control socket).
fn open_store_or_running(config: &Config) -> Result<Option<Store>, Failure> {
    let _ = OPENED.set(config.data_dir.clone());
    // What the outbox finds damaged when it opens is said on stderr.
    init_logging("warn");
    match Store::open_existing(&config.data_dir, &config.terminal_id) {
        Ok(store) => Ok(Some(store)),
        Err(id06d::store::StoreError::InUse(_)) => Ok(None),
        Err(e) => Err(runtime(e.to_string())),
    }
}

fn open_store(config: &Config) -> Result<Store, Failure> {
    let _ = OPENED.set(config.data_dir.clone());
    init_logging("warn");
    Store::open(&config.data_dir, &config.terminal_id).map_err(|e| runtime(e.to_string()))
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| runtime(format!("cannot start the async runtime: {e}")))
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => {
            init_logging("info");
            let config = load_config(&config)?;
            let rt = tokio_runtime()?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                // Register the handlers before anything else, so that a SIGTERM that comes
                // early is a clean stop, not the default "terminate now".
                let signals = Signals::register()
                    .map_err(|e| runtime(format!("cannot install signal handlers: {e}")))?;
                let cancel = shutdown.clone();
                tokio::spawn(async move {
                    signals.wait().await;
                    cancel.cancel();
                });
                id06d::run::run(config, Default::default(), shutdown, |_| {})
                    .await
                    .map_err(|e| runtime(e.to_string()))
            })
        }
        Command::Demo => {
            init_logging("info,rumqttc=off");
            let rt = tokio_runtime()?;
            rt.block_on(id06d::demo::run_demo()).map_err(runtime)
        }
        Command::CheckConfig { config } => {
            let config = load_config(&config)?;
            let file = config.source.display().to_string();
            // Every file `run` will read is read now, not at the first connection.
            read_password(&config).map_err(|f| usage(format!("{file}: {}", f.message)))?;
            if config.mqtt.tls {
                id06d::tls::client_config(&config.mqtt)
                    .map_err(|e| usage(format!("{file}: [mqtt] {e}")))?;
            }
            let dir = &config.data_dir;
            match std::fs::metadata(dir) {
                Ok(m) if !m.is_dir() => {
                    return Err(usage(format!(
                        "{file}: data_dir {} is not a directory",
                        dir.display()
                    )))
                }
                Ok(_) => {}
                Err(_) => {
                    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
                    if parent.is_some_and(|p| !p.is_dir()) {
                        return Err(usage(format!(
                            "{file}: data_dir {} cannot be created: {} does not exist",
                            dir.display(),
                            parent.map(|p| p.display().to_string()).unwrap_or_default()
                        )));
                    }
                    eprintln!(
                        "note: data_dir {} does not exist yet; `id06d run` creates it",
                        dir.display()
                    );
                }
            }
            if config.readers.is_empty() {
                eprintln!("warning: {file} has no [[reader]]: this gateway will record no taps");
            }
            print!("{}", config.render());
            Ok(())
        }
        Command::Readers => {
            println!("PC/SC readers (kind = \"pcsc\", match = a part of the name):");
            match id06_readers::pcsc::list_readers() {
                Ok(names) if names.is_empty() => {
                    println!("  none: pcscd runs but sees no reader (is one plugged in?)")
                }
                Ok(names) => names.iter().for_each(|n| println!("  {n}")),
                Err(e) => println!("  none: {e}"),
            }
            println!("Serial ports (kind = \"pn532\" or \"line\", path = …):");
            let ports = id06_readers::pn532::list_ports();
            if ports.is_empty() {
                println!("  none found");
            }
            ports.iter().for_each(|p| println!("  {p}"));
            Ok(())
        }
        Command::Blocklist { command } => blocklist(command),
        Command::SiteList {
            command:
                SiteListCommand::Import {
                    file,
                    version,
                    allow_shrink,
                    config,
                },
        } => site_list_import(&file, version, allow_shrink, &config),
        Command::Outbox {
            command: OutboxCommand::Stats { config },
        } => {
            let config = load_config(&config)?;
            let stats = match open_store_or_running(&config)? {
                Some(store) => Outbox::open(&store)
                    .and_then(|outbox| outbox.stats())
                    .map_err(|e| runtime(e.to_string()))?,
                None => id06d::control::remote_stats(&config.data_dir)
                    .map_err(|e| runtime(e.to_string()))?,
            };
            println!(
                "outbox depth:   {} events waiting for the broker",
                stats.depth
            );
            match stats.oldest {
                Some((seq, at)) => {
                    let age = (UtcMillis::now().as_millis() - at.as_millis()).max(0) / 1000;
                    println!("oldest waiting: seq {seq}, occurred {at} ({age} s ago)");
                }
                None => println!("oldest waiting: none"),
            }
            println!("stream:         {}", stats.stream);
            println!("last seq:       {} (in this stream)", stats.last_seq);
            println!("archived:       {} events kept for export", stats.archived);
            println!(
                "ledger:         confirmed up to seq {} of this stream; {} events not confirmed",
                stats.confirmed_seq, stats.unconfirmed
            );
            Ok(())
        }
        Command::Events {
            command:
                EventsCommand::Export {
                    since,
                    until,
                    stream,
                    from_seq,
                    to_seq,
                    format,
                    config,
                },
        } => {
            let config = load_config(&config)?;
            let since = parse_since(&since).map_err(usage)?;
            let until = match until {
                Some(u) => {
                    Some(parse_since(&u).map_err(|e| usage(e.replace("--since", "--until")))?)
                }
                None => None,
            };
            let stream = match stream {
                Some(s) => Some(
                    s.parse::<id06_protocol::StreamId>()
                        .map_err(|e| usage(format!("--stream: {e}")))?,
                ),
                None => None,
            };
            if let (Some(a), Some(b)) = (from_seq, to_seq) {
                if a > b {
                    return Err(usage(format!(
                        "--from-seq {a} is after --to-seq {b}: nothing to export"
                    )));
                }
            }
            let events = match open_store_or_running(&config)? {
                Some(store) => Outbox::open(&store)
                    .and_then(|outbox| outbox.events_since(since))
                    .map_err(|e| runtime(e.to_string()))?,
                // The daemon runs and holds the database: it answers for it.
                None => id06d::control::remote_events_since(&config.data_dir, since)
                    .map_err(|e| runtime(e.to_string()))?,
            };
            let events: Vec<_> = events
                .into_iter()
                .filter(|(e, _, _)| {
                    until.is_none_or(|u| e.occurred_at < u)
                        && stream.is_none_or(|s| e.stream == s)
                        && from_seq.is_none_or(|a| e.seq >= a)
                        && to_seq.is_none_or(|b| e.seq <= b)
                })
                .collect();
            export(&events, format).map_err(|e| runtime(format!("cannot write the export: {e}")))
        }
    }
}

fn parse_since(text: &str) -> Result<UtcMillis, String> {
    if let Ok(t) = UtcMillis::parse(text) {
        return Ok(t);
    }
    let date: jiff::civil::Date = text
        .trim()
        .parse()
        .map_err(|_| format!("--since {text:?} is neither an RFC 3339 time (2026-11-22T06:00:00Z) nor a date (2026-11-22)"))?;
    let tz = stockholm();
    let zoned = date
        .to_zoned(tz)
        .map_err(|e| format!("--since {text:?}: {e}"))?;
    Ok(UtcMillis(zoned.timestamp().as_millisecond()))
}

fn stockholm() -> jiff::tz::TimeZone {
    jiff::tz::TimeZone::get("Europe/Stockholm").unwrap_or(jiff::tz::TimeZone::UTC)
}

fn export(events: &[(id06_protocol::Event, bool, bool)], format: Format) -> std::io::Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match format {
        Format::Json => {
            // The same columns as the CSV: the event, and how far it got.
            for (e, acked, stored) in events {
                let line = id06d::control::ExportedEvent {
                    delivered: *acked,
                    stored_by_ledger: *stored,
                    event: e.clone(),
                };
                serde_json::to_writer(&mut out, &line)?;
                out.write_all(b"\n")?;
            }
        }
        Format::Csv => {
            let tz = stockholm();
            writeln!(out, "event_id,seq,local_time,occurred_at_utc,reader,direction,card_uid,card_status,decision,reason,acked_by_broker,stored_by_ledger")?;
            for (e, delivered, stored) in events {
                let local = e
                    .occurred_at
                    .to_timestamp()
                    .to_zoned(tz.clone())
                    .strftime("%Y-%m-%d %H:%M:%S %Z")
                    .to_string();
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{}",
                    e.event_id,
                    e.seq,
                    local,
                    e.occurred_at,
                    e.reader,
                    e.direction,
                    e.card_uid,
                    e.card_status,
                    match e.decision {
                        id06_protocol::Decision::Granted => "granted",
                        id06_protocol::Decision::Denied => "denied",
                    },
                    e.reason.map_or("", |r| r.as_str()),
                    if *delivered { "yes" } else { "no" },
                    if *stored { "yes" } else { "no" }
                )?;
            }
        }
    }
    out.flush()
}

fn blocklist(command: BlocklistCommand) -> Result<(), Failure> {
    match command {
        BlocklistCommand::Import {
            file,
            version,
            allow_shrink,
            config,
        } => {
            let config = load_config(&config)?;
            if config.blocklist.public_key.is_some() {
                return Err(usage(format!(
                    "nothing imported: {} sets [blocklist] public_key, so the national list comes from the backend's signed snapshots and updates alone (a local import would take a version number the backend may use next); ban a card at this site with `id06d site-list import`",
                    config.source.display()
                )));
            }
            let entries = read_csv(&file, "nothing imported")?;
            let store = open_store(&config)?;
            let bl = Blocklist::open(&store.db, &store.dir).map_err(|e| runtime(e.to_string()))?;
            let index = bl.index();
            let current = index.version;
            let version = version.unwrap_or(current + 1);
            if version <= current {
                return Err(usage(format!(
                    "nothing imported: version {version} is not newer than the list in force (version {current}); list versions only go forward"
                )));
            }
            let shrink = import_shrink(&index, &entries);
            drop(index);
            if !allow_shrink {
                if entries.is_empty() {
                    return Err(usage(format!(
                        "nothing imported: {} lists no card; importing it would let every card pass (say --allow-shrink if that is what you want)",
                        file.display()
                    )));
                }
                let limit = u64::from(config.blocklist.import_max_shrink_percent);
                if shrink.removed * 100 > shrink.listed * limit {
                    return Err(usage(format!(
                        "nothing imported: {} would take {} of the {} listed cards off the list, more than [blocklist] import_max_shrink_percent = {limit} %; check the file, or say --allow-shrink",
                        file.display(),
                        shrink.removed,
                        shrink.listed
                    )));
                }
            }
            eprintln!(
                "importing {} cards as version {version} (the version in force is {current}; {} cards come off the list)",
                entries.len(),
                shrink.removed
            );
            let total = entries.len();
            let big = total >= 200_000;
            let mut last_shown = std::time::Instant::now();
            bl.replace(&entries, version, UtcMillis::now(), |done| {
                if big && (last_shown.elapsed().as_millis() >= 1000 || done == total) {
                    last_shown = std::time::Instant::now();
                    eprintln!(
                        "imported {done} of {total} cards ({}%)",
                        done * 100 / total.max(1)
                    );
                }
            })
            .map_err(|e| runtime(format!("nothing imported: {e}")))?;
            println!(
                "imported {total} listed cards from {} as version {version} (was {current})",
                file.display()
            );
            Ok(())
        }
        BlocklistCommand::Lookup { uid, config } => {
            let config = load_config(&config)?;
            let uid = CardUid::parse(&uid).map_err(|e| usage(format!("{uid:?}: {e}")))?;
            let lists = blocklist_summary(&config, Some(&uid))?;
            let summary = &lists.national;
            let now = UtcMillis::now();
            let status = summary
                .status
                .unwrap_or(id06_protocol::CardStatus::Unlisted);
            let stale = summary.is_stale(now, config.blocklist.max_age_hours);
            println!("card {uid}: {status}");
            println!(
                "blocklist version {}, {}{}",
                summary.version,
                age_text(summary.age_s(now)),
                if stale { " (stale)" } else { "" }
            );
            println!(
                "site list version {}: {}",
                lists.site.version,
                match lists.site.entry {
                    Some(id06d::site_list::SiteEntry::Ban) => "banned from this site",
                    Some(id06d::site_list::SiteEntry::Allow) => "allowed in",
                    None => "not on it",
                }
            );
            let ruling = id06d::decide::decide_at_site(
                summary.status,
                lists.site.entry,
                config.access.mode,
                stale,
                config.blocklist.when_stale,
            );
            match ruling.reason {
                None => println!("a tap now: granted"),
                Some(r) => println!("a tap now: denied: {r}"),
            }
            Ok(())
        }
        BlocklistCommand::Keygen { secret_out } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = id06d::signing::generate_key().map_err(runtime)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&secret_out)
                .map_err(|e| {
                    usage(format!(
                        "cannot create {} (it must not exist yet): {e}",
                        secret_out.display()
                    ))
                })?;
            writeln!(f, "{}", id06d::signing::secret_key_text(&key))
                .map_err(|e| runtime(format!("cannot write {}: {e}", secret_out.display())))?;
            println!(
                "secret key written to {} (keep it on the backend only)",
                secret_out.display()
            );
            println!("public_key = \"{}\"", id06d::signing::public_key_text(&key));
            Ok(())
        }
        BlocklistCommand::Sign { file, key } => {
            let mut update = read_update(&file)?;
            let key = load_key(&key)?;
            update.signature = Some(id06d::signing::sign(&key, &update.canonical_bytes()));
            println!(
                "{}",
                serde_json::to_string_pretty(&update).unwrap_or_default()
            );
            Ok(())
        }
        BlocklistCommand::PublishUpdate { file, key, config } => {
            let mqtt = id06d::config::load_broker(&config).map_err(|e| usage(e.to_string()))?;
            let mut update = read_update(&file)?;
            if let Some(k) = key {
                update.signature = Some(id06d::signing::sign(
                    &load_key(&k)?,
                    &update.canonical_bytes(),
                ));
            }
            // The blocklist's topics depend on the prefix alone.
            let topics = id06_protocol::Topics::new(&mqtt.topic_prefix, "-", "-");
            let payload = serde_json::to_vec(&update).unwrap_or_default();
            let label = format!("update {}→{}", update.from_version, update.to_version);
            publish(
                &mqtt,
                vec![id06d::publish::Message {
                    topic: topics.blocklist_update(),
                    payload,
                    retain: false,
                }],
                &label,
            )
        }
        BlocklistCommand::PublishSnapshot {
            file,
            version,
            key,
            config,
        } => {
            let mqtt = id06d::config::load_broker(&config).map_err(|e| usage(e.to_string()))?;
            let entries = read_csv(&file, "nothing published")?;
            // The blocklist's topics depend on the prefix alone.
            let topics = id06_protocol::Topics::new(&mqtt.topic_prefix, "-", "-");
            let (mut manifest, mut messages) =
                id06d::publish::snapshot_messages(&topics.blocklist_snapshot(), version, &entries);
            if let Some(k) = key {
                manifest.signature = Some(id06d::signing::sign(
                    &load_key(&k)?,
                    &manifest.canonical_bytes(),
                ));
            }
            messages.push(id06d::publish::Message {
                topic: topics.blocklist_snapshot(),
                payload: serde_json::to_vec(&manifest).unwrap_or_default(),
                retain: true,
            });
            let label = format!(
                "snapshot version {version}: {} cards in {} chunk(s)",
                entries.len(),
                manifest.chunks
            );
            publish(&mqtt, messages, &label)
        }
        BlocklistCommand::Stats { config } => {
            let config = load_config(&config)?;
            let lists = blocklist_summary(&config, None)?;
            let summary = &lists.national;
            let now = UtcMillis::now();
            println!(
                "blocklist version {}: {} listed cards",
                summary.version, summary.listed
            );
            for (status, n) in &summary.counts {
                println!("  {:<11} {n}", status.as_str());
            }
            println!(
                "{}{}",
                age_text(summary.age_s(now)),
                if summary.is_stale(now, config.blocklist.max_age_hours) {
                    format!(" — stale (older than {} h)", config.blocklist.max_age_hours)
                } else {
                    String::new()
                }
            );
            println!(
                "site list version {}: {} banned, {} allowed (access mode {})",
                lists.site.version,
                lists.site.banned,
                lists.site.allowed,
                match config.access.mode {
                    id06d::config::AccessMode::Open => "open",
                    id06d::config::AccessMode::SiteList => "site_list",
                }
            );
            Ok(())
        }
    }
}

fn site_list_import(
    file: &Path,
    version: Option<u64>,
    allow_shrink: bool,
    config: &Path,
) -> Result<(), Failure> {
    let config = load_config(config)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    let entries = id06d::site_list::parse_site_csv(&text).map_err(|problems| {
        let shown: Vec<String> = problems
            .iter()
            .take(20)
            .map(|p| format!("{}:{}: {}", file.display(), p.line, p.message))
            .collect();
        usage(format!(
            "nothing imported: {} bad line(s)\n{}",
            problems.len(),
            shown.join("\n")
        ))
    })?;
    if entries.is_empty() && !allow_shrink {
        return Err(usage(format!(
            "nothing imported: {} lists no card; importing it would empty the site list (say --allow-shrink if that is what you want)",
            file.display()
        )));
    }
    let (banned, allowed) = entries.iter().fold((0, 0), |(b, a), (_, e)| match e {
        id06d::site_list::SiteEntry::Ban => (b + 1, a),
        id06d::site_list::SiteEntry::Allow => (b, a + 1),
    });
    let _ = OPENED.set(config.data_dir.clone());
    init_logging("warn");
    let opened = match Store::open(&config.data_dir, &config.terminal_id) {
        Ok(store) => Some(store),
        Err(id06d::store::StoreError::InUse(_)) => None,
        Err(e) => return Err(runtime(e.to_string())),
    };
    let (version, was) = match opened {
        Some(store) => {
            let list = id06d::site_list::SiteList::open(&store.db, &store.dir)
                .map_err(|e| runtime(e.to_string()))?;
            let version = version.unwrap_or(list.index().version + 1);
            let was = list
                .replace(&entries, version, UtcMillis::now())
                .map_err(|e| usage(format!("nothing imported: {e}")))?;
            (version, was)
        }
        None => {
            // The daemon holds the database: it takes the list and uses it at once.
            let version = match version {
                Some(v) => v,
                None => {
                    id06d::control::remote_blocklist(&config.data_dir, None)
                        .map_err(|e| runtime(e.to_string()))?
                        .site
                        .version
                        + 1
                }
            };
            let was = id06d::control::remote_site_list_replace(&config.data_dir, &entries, version)
                .map_err(|e| runtime(format!("nothing imported: {e}")))?;
            (version, was)
        }
    };
    println!(
        "site list version {version} in force (was {was}): {banned} banned, {allowed} allowed, from {}",
        file.display()
    );
    Ok(())
}

/// How many listed cards an import would take off the list.
struct Shrink {
    listed: u64,
    removed: u64,
}

fn import_shrink(
    index: &id06d::blocklist::BlocklistIndex,
    entries: &[(CardUid, id06_protocol::CardStatus)],
) -> Shrink {
    let new: std::collections::HashSet<CardUid> = entries.iter().map(|(u, _)| *u).collect();
    Shrink {
        listed: index.len() as u64,
        removed: index.iter().filter(|(u, _)| !new.contains(u)).count() as u64,
    }
}

/// The lists in force, from the database, or from the running daemon that holds it.
fn blocklist_summary(
    config: &Config,
    card: Option<&CardUid>,
) -> Result<id06d::control::ListsSummary, Failure> {
    match open_store_or_running(config)? {
        Some(store) => {
            let bl = Blocklist::open(&store.db, &store.dir).map_err(|e| runtime(e.to_string()))?;
            let site = id06d::site_list::SiteList::open(&store.db, &store.dir)
                .map_err(|e| runtime(e.to_string()))?;
            Ok(id06d::control::ListsSummary {
                national: bl.index().summary(card),
                site: id06d::control::SiteSummary::of(&site.index(), card),
            })
        }
        None => id06d::control::remote_blocklist(&config.data_dir, card)
            .map_err(|e| runtime(e.to_string())),
    }
}

/// Reads a `uid,status` CSV file; every bad line is named (the first 20 shown).
fn read_csv(
    file: &Path,
    outcome: &str,
) -> Result<Vec<(CardUid, id06_protocol::CardStatus)>, Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    parse_csv(&text).map_err(|problems| {
        let shown: Vec<String> = problems
            .iter()
            .take(20)
            .map(|p| format!("{}:{}: {}", file.display(), p.line, p.message))
            .collect();
        let mut m = format!(
            "{outcome}: {} bad line(s)\n{}",
            problems.len(),
            shown.join("\n")
        );
        if problems.len() > 20 {
            m.push_str(&format!("\n… and {} more", problems.len() - 20));
        }
        usage(m)
    })
}

fn read_password(config: &Config) -> Result<Option<String>, Failure> {
    read_broker_password(&config.mqtt)
}

fn read_broker_password(mqtt: &id06d::config::MqttSettings) -> Result<Option<String>, Failure> {
    match &mqtt.password_file {
        Some(p) => std::fs::read_to_string(p)
            .map(|t| Some(t.trim_end_matches(['\r', '\n']).to_string()))
            .map_err(|e| {
                usage(format!(
                    "cannot read [mqtt] password_file {}: {e}",
                    p.display()
                ))
            }),
        None => Ok(None),
    }
}

fn read_update(file: &Path) -> Result<id06_protocol::BlocklistUpdate, Failure> {
    let bytes =
        std::fs::read(file).map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    id06_protocol::BlocklistUpdate::decode(&bytes)
        .map_err(|e| usage(format!("{}: {e}", file.display())))
}

fn load_key(path: &Path) -> Result<ed25519_dalek::SigningKey, Failure> {
    id06d::signing::load_secret_key(path).map_err(usage)
}

fn publish(
    mqtt: &id06d::config::MqttSettings,
    messages: Vec<id06d::publish::Message>,
    label: &str,
) -> Result<(), Failure> {
    let password = read_broker_password(mqtt)?;
    let rt = tokio_runtime()?;
    let total = messages.len();
    let mut last = std::time::Instant::now();
    rt.block_on(id06d::publish::publish_all(
        mqtt,
        password,
        messages,
        |done, all| {
            if all > 5 && (last.elapsed().as_millis() >= 1000 || done == all) {
                last = std::time::Instant::now();
                eprintln!("published {done} of {all} messages");
            }
        },
    ))
    .map_err(runtime)?;
    println!("published {label} ({total} message(s)) to {}", mqtt.url);
    Ok(())
}

fn age_text(age: Option<u64>) -> String {
    match age {
        None => "never confirmed".into(),
        Some(s) => format!("confirmed {}h {}m {}s ago", s / 3600, s / 60 % 60, s % 60),
    }
}

/// SIGTERM and SIGINT, registered with tokio at once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
