//! The control socket: read-only questions to a running daemon, so that `id06d events
//! export`, `outbox stats`, `blocklist lookup` and `blocklist stats` work while the daemon
//! holds the database (sled allows one process at a time).
//!
//! Design: a Unix stream socket `control.sock` in the data directory (mode 0600, so only
//! the daemon's user and root reach it). A client writes one request line and reads the
//! answer until the daemon closes the connection:
//!
//! - `events-since <unix ms>` → one JSON line per recorded event,
//!   `{"delivered":true,"event":{…}}`, oldest first;
//! - `outbox-stats` → one JSON line
//!   `{"depth":…,"oldest_seq":…,"oldest_at":…,"stream":…,"last_seq":…,"archived":…}`;
//! - `blocklist [uid]` → one JSON line, a [`ListsSummary`]: the national list in force and
//!   the site's own list (with the card's entries when a UID is given).
//!
//! One request writes: `site-list-replace <version> <count>`, then `count` lines
//! `<uid> ban|allow` → `ok <previous version>`; it replaces the site's own list
//! ([`crate::lists::site_list`]), so that a site ban takes effect at once while the daemon runs.
//!
//! Anything else gets `error: …` and the connection is closed. Requests are read with a
//! deadline and a length limit; answers are produced on the blocking pool.

use crate::lists::blocklist::{Blocklist, Summary};
use crate::storage::outbox::{Outbox, OutboxStats};
use id06_protocol::{CardUid, Event, UtcMillis};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The socket's file name inside the data directory.
pub const SOCKET_NAME: &str = "control.sock";
/// The longest request line.
const MAX_REQUEST: u64 = 256;
/// The most cards a site-list replacement may carry over the socket.
const MAX_SITE_CARDS: u64 = 1_000_000;
/// The longest line of a site-list replacement (`<20 hex digits> allow\n`).
const MAX_SITE_LINE: u64 = 64;

/// The site's own list, as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSummary {
    /// Its version (0: never imported).
    pub version: u64,
    /// Cards banned from the site.
    pub banned: u64,
    /// Cards on the allow list.
    pub allowed: u64,
    /// The entry of the card asked about.
    pub entry: Option<crate::lists::site_list::SiteEntry>,
}

impl SiteSummary {
    /// The figures of `index` (and `card`'s entry).
    pub fn of(index: &crate::lists::site_list::SiteIndex, card: Option<&CardUid>) -> SiteSummary {
        let (banned, allowed) = index.counts();
        SiteSummary {
            version: index.version,
            banned: banned as u64,
            allowed: allowed as u64,
            entry: card.and_then(|c| index.lookup(c)),
        }
    }
}

/// The national list and the site's own list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListsSummary {
    /// The national ID06 list.
    pub national: Summary,
    /// The site's own list.
    pub site: SiteSummary,
}
/// How long a client may take to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// The socket path for a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// One exported event, as it travels over the socket and as `events export --format json`
/// prints it: `{"acked_by_broker":…,"stored_by_ledger":…,"event":{…}}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportedEvent {
    /// Whether the broker has acknowledged it.
    #[serde(rename = "acked_by_broker", alias = "delivered")]
    pub delivered: bool,
    /// Whether the ledger confirmed it stored it.
    #[serde(default)]
    pub stored_by_ledger: bool,
    /// The event.
    pub event: Event,
}

/// The outbox figures as they travel over the socket.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteStats {
    /// Events not yet acknowledged.
    pub depth: u64,
    /// Seq of the oldest of them.
    pub oldest_seq: Option<u64>,
    /// When it happened.
    pub oldest_at: Option<UtcMillis>,
    /// The stream new taps are recorded in.
    pub stream: id06_protocol::StreamId,
    /// The highest seq written in it.
    pub last_seq: u64,
    /// Events kept for export.
    pub archived: u64,
    /// The seq of the stream up to which the ledger confirmed everything.
    #[serde(default)]
    pub confirmed_seq: u64,
    /// Events not confirmed by the ledger.
    #[serde(default)]
    pub unconfirmed: u64,
}

impl From<OutboxStats> for RemoteStats {
    fn from(s: OutboxStats) -> RemoteStats {
        RemoteStats {
            depth: s.depth,
            oldest_seq: s.oldest.map(|(seq, _)| seq),
            oldest_at: s.oldest.map(|(_, at)| at),
            stream: s.stream,
            last_seq: s.last_seq,
            archived: s.archived,
            confirmed_seq: s.confirmed_seq,
            unconfirmed: s.unconfirmed,
        }
    }
}

impl From<RemoteStats> for OutboxStats {
    fn from(s: RemoteStats) -> OutboxStats {
        OutboxStats {
            depth: s.depth,
            oldest: s.oldest_seq.zip(s.oldest_at),
            stream: s.stream,
            last_seq: s.last_seq,
            archived: s.archived,
            confirmed_seq: s.confirmed_seq,
            unconfirmed: s.unconfirmed,
        }
    }
}

/// Serves the socket until `shutdown`; removes it at the end. A socket that cannot be made
/// is logged and the daemon runs on without it.
pub async fn serve(
    data_dir: PathBuf,
    outbox: Outbox,
    blocklist: Blocklist,
    site_list: crate::lists::site_list::SiteList,
    shutdown: CancellationToken,
) {
    let path = socket_path(&data_dir);
    // A socket left by a daemon that died: we hold the database lock, so it is not in use.
    let _ = std::fs::remove_file(&path);
    let listener = {
        // Owner only, from the moment it exists.
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = tokio::net::UnixListener::bind(&path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        match bound {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot make the control socket ({e}); `events export` and `outbox stats` will not work while the daemon runs");
                return;
            }
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let outbox = outbox.clone();
                    let blocklist = blocklist.clone();
                    let site_list = site_list.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, outbox, blocklist, site_list).await {
                            tracing::debug!("control socket client: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(
    stream: tokio::net::UnixStream,
    outbox: Outbox,
    blocklist: Blocklist,
    site_list: crate::lists::site_list::SiteList,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut limited = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    match tokio::time::timeout(REQUEST_DEADLINE, limited.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            write.write_all(b"error: no request within 5 s\n").await?;
            return Ok(());
        }
    }
    let request = line.trim();
    let mut words = request.split_whitespace();
    let reply = match (words.next(), words.next(), words.next()) {
        (Some("events-since"), Some(ms), None) => match ms.parse::<i64>() {
            Ok(ms) => {
                let events = tokio::task::spawn_blocking(move || {
                    outbox.events_since(UtcMillis(ms)).map(|events| {
                        let mut out = Vec::new();
                        for (event, delivered, stored_by_ledger) in events {
                            if let Ok(mut line) = serde_json::to_vec(&ExportedEvent {
                                delivered,
                                stored_by_ledger,
                                event,
                            })
                            {
                                line.push(b'\n');
                                out.extend_from_slice(&line);
                            }
                        }
                        out
                    })
                })
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
                events.unwrap_or_else(|e| format!("error: {e}\n").into_bytes())
            }
            Err(_) => format!("error: {ms:?} is not a time in Unix milliseconds\n").into_bytes(),
        },
        (Some("outbox-stats"), None, None) => {
            let stats = tokio::task::spawn_blocking(move || outbox.stats())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            match stats {
                Ok(s) => {
                    let mut line = serde_json::to_vec(&RemoteStats::from(s)).unwrap_or_default();
                    line.push(b'\n');
                    line
                }
                Err(e) => format!("error: {e}\n").into_bytes(),
            }
        }
        (Some("blocklist"), uid, None) => {
            let card = match uid.map(CardUid::parse) {
                None => Ok(None),
                Some(Ok(c)) => Ok(Some(c)),
                Some(Err(e)) => Err(e),
            };
            match card {
                Ok(card) => {
                    let summary = ListsSummary {
                        national: blocklist.index().summary(card.as_ref()),
                        site: SiteSummary::of(&site_list.index(), card.as_ref()),
                    };
                    let mut line = serde_json::to_vec(&summary).unwrap_or_default();
                    line.push(b'\n');
                    line
                }
                Err(e) => format!("error: {e}\n").into_bytes(),
            }
        }
        (Some("site-list-replace"), Some(version), Some(count)) => {
            match (version.parse::<u64>(), count.parse::<u64>()) {
                (Ok(version), Ok(count)) if count <= MAX_SITE_CARDS => {
                    limited
                        .get_mut()
                        .set_limit(count.saturating_mul(MAX_SITE_LINE));
                    match read_site_entries(&mut limited, count).await {
                        Ok(entries) => {
                            let list = site_list.clone();
                            let done = tokio::task::spawn_blocking(move || {
                                list.replace(&entries, version, UtcMillis::now())
                                    .map(|was| (was, entries.len()))
                            })
                            .await
                            .map_err(|e| std::io::Error::other(e.to_string()))?;
                            match done {
                                Ok((was, n)) => {
                                    tracing::info!(version, was, cards = n, "the site list was replaced");
                                    format!("ok {was}\n").into_bytes()
                                }
                                Err(e) => format!("error: {e}\n").into_bytes(),
                            }
                        }
                        Err(e) => format!("error: {e}\n").into_bytes(),
                    }
                }
                _ => format!("error: site-list-replace wants a version and a card count of at most {MAX_SITE_CARDS}\n").into_bytes(),
            }
        }
        _ => format!(
            "error: unknown request {:?} (known: events-since <unix ms>, outbox-stats, blocklist [uid], site-list-replace <version> <count>)\n",
            request.chars().take(64).collect::<String>()
        )
        .into_bytes(),
    };
    write.write_all(&reply).await?;
    write.shutdown().await
}

/// Reads `count` lines `<uid> ban|allow` of a site-list replacement.
async fn read_site_entries(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
    count: u64,
) -> Result<Vec<(CardUid, crate::lists::site_list::SiteEntry)>, String> {
    use crate::lists::site_list::SiteEntry;
    let mut out = Vec::with_capacity(count.min(100_000) as usize);
    let mut line = String::new();
    for n in 0..count {
        line.clear();
        let read = tokio::time::timeout(REQUEST_DEADLINE, reader.read_line(&mut line))
            .await
            .map_err(|_| format!("card {n} of {count} did not arrive within 5 s"))?
            .map_err(|e| e.to_string())?;
        if read == 0 {
            return Err(format!("the list ended after {n} of {count} cards"));
        }
        let mut words = line.split_whitespace();
        let (Some(uid), Some(entry), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("card {n}: expected `<uid> ban|allow`"));
        };
        let uid = CardUid::parse(uid).map_err(|e| format!("card {n}: {e}"))?;
        let entry = match entry {
            "ban" => SiteEntry::Ban,
            "allow" => SiteEntry::Allow,
            other => return Err(format!("card {n}: {other:?} is neither ban nor allow")),
        };
        out.push((uid, entry));
    }
    Ok(out)
}

/// Why asking the running daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon answers on the socket.
    #[error("cannot reach the running daemon's control socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The conversation broke off.
    #[error("the running daemon's control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon said no, or said something this build does not understand.
    #[error("the running daemon answered: {0}")]
    Refused(String),
}

fn ask(data_dir: &Path, request: &str) -> Result<Vec<String>, ControlError> {
    ask_with(data_dir, request, &[])
}

fn ask_with(data_dir: &Path, request: &str, body: &[u8]) -> Result<Vec<String>, ControlError> {
    let path = socket_path(data_dir);
    let mut stream =
        std::os::unix::net::UnixStream::connect(&path).map_err(|source| ControlError::Connect {
            path: path.clone(),
            source,
        })?;
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut lines = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(io)?;
        if let Some(e) = line.strip_prefix("error: ") {
            return Err(ControlError::Refused(e.to_string()));
        }
        lines.push(line);
    }
    Ok(lines)
}

/// The events since `since`, from the daemon running on `data_dir`.
pub fn remote_events_since(
    data_dir: &Path,
    since: UtcMillis,
) -> Result<Vec<(Event, bool, bool)>, ControlError> {
    ask(data_dir, &format!("events-since {}", since.0))?
        .iter()
        .map(|line| {
            serde_json::from_str::<ExportedEvent>(line)
                .map(|e| (e.event, e.delivered, e.stored_by_ledger))
                .map_err(|e| {
                    ControlError::Refused(format!("an event line this build cannot read: {e}"))
                })
        })
        .collect()
}

/// Replaces the site's own list of the daemon running on `data_dir`; returns the version
/// it replaced.
pub fn remote_site_list_replace(
    data_dir: &Path,
    entries: &[(CardUid, crate::lists::site_list::SiteEntry)],
    version: u64,
) -> Result<u64, ControlError> {
    let mut body = Vec::with_capacity(entries.len() * 24);
    for (uid, entry) in entries {
        body.extend_from_slice(format!("{uid} {}\n", entry.as_str()).as_bytes());
    }
    let request = format!("site-list-replace {version} {}", entries.len());
    let lines = ask_with(data_dir, &request, &body)?;
    lines
        .first()
        .and_then(|l| l.strip_prefix("ok "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ControlError::Refused(format!("an answer this build cannot read: {lines:?}"))
        })
}

/// The lists in force (and `card`'s entries), from the daemon running on `data_dir`.
pub fn remote_blocklist(
    data_dir: &Path,
    card: Option<&CardUid>,
) -> Result<ListsSummary, ControlError> {
    let request = match card {
        Some(c) => format!("blocklist {c}"),
        None => "blocklist".to_string(),
    };
    let lines = ask(data_dir, &request)?;
    let line = lines
        .first()
        .ok_or_else(|| ControlError::Refused("no answer".into()))?;
    serde_json::from_str::<ListsSummary>(line)
        .map_err(|e| ControlError::Refused(format!("figures this build cannot read: {e}")))
}

/// The outbox figures, from the daemon running on `data_dir`.
pub fn remote_stats(data_dir: &Path) -> Result<OutboxStats, ControlError> {
    let lines = ask(data_dir, "outbox-stats")?;
    let line = lines
        .first()
        .ok_or_else(|| ControlError::Refused("no answer".into()))?;
    serde_json::from_str::<RemoteStats>(line)
        .map(OutboxStats::from)
        .map_err(|e| ControlError::Refused(format!("figures this build cannot read: {e}")))
}
