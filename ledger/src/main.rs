//! `id06-ledger`: the reference ledger consumer (see the crate documentation).
//!
//! ```text
//! id06-ledger run --broker mqtt://127.0.0.1:1883 --db ledger.db [--group ledger]
//!                 [--client-id ledger-1] [--prefix id06/v1] [--username U --password-file F]
//! id06-ledger report --db ledger.db
//! ```

use clap::{Parser, Subcommand};
use id06_ledger::consumer::{run, Settings};
use id06_ledger::Store;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "id06-ledger",
    version,
    about = "Reference ledger consumer for id06d"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive events, store them, confirm them, ask for gaps; until SIGTERM or SIGINT.
    Run {
        /// The broker, `mqtt://host[:port]`.
        #[arg(long)]
        broker: String,
        /// The SQLite database (created if missing; instances may share it).
        #[arg(long)]
        db: PathBuf,
        /// The shared-subscription group (the same for every instance).
        #[arg(long, default_value = "ledger")]
        group: String,
        /// This instance's client id (stable across restarts).
        #[arg(long, default_value = "id06-ledger-1")]
        client_id: String,
        /// The gateways' topic prefix.
        #[arg(long, default_value = "id06/v1")]
        prefix: String,
        /// Login name.
        #[arg(long)]
        username: Option<String>,
        /// A file holding the password alone.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// One line per stream: site, terminal, stream, events, contiguous seq, highest seq.
    Report {
        /// The SQLite database.
        #[arg(long)]
        db: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    match cli.command {
        Command::Report { db } => {
            if !db.exists() {
                eprintln!("id06-ledger: there is no database at {}", db.display());
                return ExitCode::from(1);
            }
            let mut store = match Store::open(&db) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("id06-ledger: {e}");
                    return ExitCode::from(1);
                }
            };
            match store.streams() {
                Ok(streams) => {
                    for s in streams {
                        println!(
                            "{} {} {} events={} contiguous={} max={}",
                            s.site_id, s.terminal_id, s.stream, s.count, s.contiguous, s.max_seq
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("id06-ledger: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run {
            broker,
            db,
            group,
            client_id,
            prefix,
            username,
            password_file,
        } => {
            let Some(rest) = broker.strip_prefix("mqtt://") else {
                eprintln!("id06-ledger: --broker {broker:?} must be mqtt://host[:port]");
                return ExitCode::from(2);
            };
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => match p.parse::<u16>() {
                    Ok(p) => (h.to_string(), p),
                    Err(_) => {
                        eprintln!("id06-ledger: --broker {broker:?}: {p:?} is not a port");
                        return ExitCode::from(2);
                    }
                },
                None => (rest.to_string(), 1883),
            };
            let login = match (username, password_file) {
                (Some(u), Some(f)) => match std::fs::read_to_string(&f) {
                    Ok(p) => Some((u, p.trim_end_matches(['\r', '\n']).to_string())),
                    Err(e) => {
                        eprintln!(
                            "id06-ledger: cannot read --password-file {}: {e}",
                            f.display()
                        );
                        return ExitCode::from(2);
                    }
                },
                (Some(u), None) => Some((u, String::new())),
                (None, _) => None,
            };
            let store = match Store::open(&db) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("id06-ledger: {e}");
                    return ExitCode::from(1);
                }
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("id06-ledger: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let settings = Settings {
                host,
                port,
                login,
                client_id,
                group,
                prefix,
            };
            let tally = rt.block_on(async {
                let stop = async {
                    use tokio::signal::unix::{signal, SignalKind};
                    match (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                    ) {
                        (Ok(mut term), Ok(mut int)) => {
                            tokio::select! {
                                _ = term.recv() => {}
                                _ = int.recv() => {}
                            }
                        }
                        _ => std::future::pending::<()>().await,
                    }
                };
                run(settings, store, stop).await
            });
            eprintln!(
                "id06-ledger: received {} events, stored {} new, {} malformed, sent {} confirmations and {} replay requests",
                tally.received, tally.stored, tally.malformed, tally.acks, tally.replays
            );
            ExitCode::SUCCESS
        }
    }
}
