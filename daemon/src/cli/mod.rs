//! The `id06d` command line (contract §3), one file per command group. Exit status: 0
//! success, 2 usage or configuration error, 1 runtime failure. Every error is one line on
//! stderr.

mod blocklist;
mod daemon;
pub mod demo;
mod events;
mod site_list;

use self::blocklist::BlocklistCommand;
use self::events::{EventsCommand, OutboxCommand};
use self::site_list::SiteListCommand;
use crate::config::Config;
use crate::storage::store::Store;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where the configuration is when `--config` and `ID06D_CONFIG` do not say.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/id06d/id06d.toml";

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

/// A failure with its exit status.
pub(crate) struct Failure {
    code: u8,
    message: String,
}

pub(crate) fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

pub(crate) fn runtime(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// A short command's log: written to stderr where it is logged (its lines and its error
/// messages stay in order).
pub(crate) fn init_logging(default: &str) {
    crate::ops::logging::install(default, std::io::stderr);
}

/// `id06d ARGS…`: parses the command line, runs the command, and says how it went.
pub fn main() -> ExitCode {
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
        if let Err(e) = crate::storage::store::give_to_owner(dir) {
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

pub(crate) fn load_config(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| usage(e.to_string()))
}

/// The data directory a command opened itself, to hand new files back to its owner at the
/// end (see [`crate::storage::store::give_to_owner`]).
pub(crate) static OPENED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The store of an existing data directory (never created here), or `None` when a running
/// daemon holds it (ask it over the control socket).
pub(crate) fn open_store_or_running(config: &Config) -> Result<Option<Store>, Failure> {
    let _ = OPENED.set(config.data_dir.clone());
    // What the outbox finds damaged when it opens is said on stderr.
    init_logging("warn");
    match Store::open_existing(&config.data_dir, &config.terminal_id) {
        Ok(store) => Ok(Some(store)),
        Err(crate::storage::store::StoreError::InUse(_)) => Ok(None),
        Err(e) => Err(runtime(e.to_string())),
    }
}

pub(crate) fn open_store(config: &Config) -> Result<Store, Failure> {
    let _ = OPENED.set(config.data_dir.clone());
    init_logging("warn");
    Store::open(&config.data_dir, &config.terminal_id).map_err(|e| runtime(e.to_string()))
}

pub(crate) fn tokio_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| runtime(format!("cannot start the async runtime: {e}")))
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => daemon::run(&config),
        Command::Demo => daemon::demo(),
        Command::CheckConfig { config } => daemon::check_config(&config),
        Command::Readers => daemon::readers(),
        Command::Blocklist { command } => blocklist::blocklist(command),
        Command::SiteList {
            command:
                SiteListCommand::Import {
                    file,
                    version,
                    allow_shrink,
                    config,
                },
        } => site_list::import(&file, version, allow_shrink, &config),
        Command::Outbox {
            command: OutboxCommand::Stats { config },
        } => events::outbox_stats(&config),
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
        } => events::export_command(
            &config,
            events::Selection {
                since,
                until,
                stream,
                from_seq,
                to_seq,
            },
            format,
        ),
    }
}

pub(crate) fn read_password(config: &Config) -> Result<Option<String>, Failure> {
    read_broker_password(&config.mqtt)
}

pub(crate) fn read_broker_password(
    mqtt: &crate::config::MqttSettings,
) -> Result<Option<String>, Failure> {
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
