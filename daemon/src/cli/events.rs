//! `id06d outbox stats` and `id06d events export`.

use super::{load_config, open_store_or_running, runtime, usage, Failure, DEFAULT_CONFIG};
use crate::storage::outbox::Outbox;
use clap::{Subcommand, ValueEnum};
use id06_protocol::UtcMillis;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(crate) enum OutboxCommand {
    /// Events waiting for delivery and the oldest one's age.
    Stats {
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    Csv,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum EventsCommand {
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

/// Which recorded taps `events export` prints, as given on the command line.
pub(crate) struct Selection {
    pub since: String,
    pub until: Option<String>,
    pub stream: Option<String>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
}

/// `id06d outbox stats`.
pub(super) fn outbox_stats(config: &Path) -> Result<(), Failure> {
    let config = load_config(config)?;
    let stats = match open_store_or_running(&config)? {
        Some(store) => Outbox::open(&store)
            .and_then(|outbox| outbox.stats())
            .map_err(|e| runtime(e.to_string()))?,
        None => crate::ops::control::remote_stats(&config.data_dir)
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

/// `id06d events export`.
pub(super) fn export_command(
    config: &Path,
    selection: Selection,
    format: Format,
) -> Result<(), Failure> {
    let Selection {
        since,
        until,
        stream,
        from_seq,
        to_seq,
    } = selection;
    let config = load_config(config)?;
    let since = parse_since(&since).map_err(usage)?;
    let until = match until {
        Some(u) => Some(parse_since(&u).map_err(|e| usage(e.replace("--since", "--until")))?),
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
        None => crate::ops::control::remote_events_since(&config.data_dir, since)
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
                let line = crate::ops::control::ExportedEvent {
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
