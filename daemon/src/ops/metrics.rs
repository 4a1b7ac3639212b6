//! The optional Prometheus endpoint (`[metrics] listen`): `GET /metrics` in the text
//! exposition format. Meant for loopback; a tiny HTTP/1.0 responder, no framework.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections are taken at a time (the rest wait in
//! the kernel's backlog, holding none of our file descriptors), each gets 5 s to send its
//! request and 5 s to take the answer, and a failing `accept` (no file descriptors left)
//! waits before trying again instead of spinning. So idle or slow clients cannot use up
//! the descriptors the outbox, the MQTT sessions and the control socket need.

use crate::lists::blocklist::Blocklist;
use crate::shared::{Counters, Shared};
use crate::storage::outbox::Outbox;
use id06_protocol::{DenyReason, ReaderState, UtcMillis};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the endpoint reports from.
#[derive(Clone)]
pub struct MetricsSource {
    /// Counters and reader states.
    pub shared: Arc<Shared>,
    /// Outbox depth and age.
    pub outbox: Outbox,
    /// Blocklist version and age.
    pub blocklist: Blocklist,
}

impl MetricsSource {
    /// The exposition text.
    pub fn render(&self) -> String {
        let c = &self.shared.counters;
        let mut s = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter("id06d_taps_total", "Taps recorded.", Counters::get(&c.taps));
        counter(
            "id06d_duplicates_total",
            "Presentations suppressed as duplicates.",
            Counters::get(&c.duplicates),
        );
        counter(
            "id06d_granted_total",
            "Taps granted.",
            Counters::get(&c.granted),
        );
        counter(
            "id06d_delivered_total",
            "Events acknowledged by the broker.",
            Counters::get(&c.delivered),
        );
        counter(
            "id06d_redelivered_total",
            "Events published again after a reconnect or restart.",
            Counters::get(&c.redelivered),
        );
        counter(
            "id06d_decisions_dropped_total",
            "Decisions not published (broker away).",
            Counters::get(&c.decisions_dropped),
        );
        counter(
            "id06d_storage_failures_total",
            "Failed attempts to store taps.",
            Counters::get(&c.storage_failures),
        );
        counter(
            "id06d_blocklist_applied_total",
            "Blocklist updates and snapshots applied.",
            Counters::get(&c.blocklist_applied),
        );
        counter(
            "id06d_blocklist_rejected_total",
            "Blocklist updates and snapshots rejected.",
            Counters::get(&c.blocklist_rejected),
        );
        let _ = writeln!(
            s,
            "# HELP id06d_denied_total Taps denied, by reason.\n# TYPE id06d_denied_total counter"
        );
        for r in DenyReason::ALL {
            let _ = writeln!(
                s,
                "id06d_denied_total{{reason=\"{}\"}} {}",
                r.as_str(),
                Counters::get(c.denied_for(r))
            );
        }
        let now = UtcMillis::now();
        let _ = writeln!(s, "# HELP id06d_outbox_depth Events waiting for the broker.\n# TYPE id06d_outbox_depth gauge\nid06d_outbox_depth {}", self.outbox.depth());
        let oldest = self
            .outbox
            .stats()
            .ok()
            .and_then(|st| st.oldest)
            .map_or(0, |(_, at)| {
                (now.as_millis() - at.as_millis()).max(0) / 1000
            });
        let _ = writeln!(s, "# HELP id06d_outbox_oldest_age_seconds Age of the oldest waiting event.\n# TYPE id06d_outbox_oldest_age_seconds gauge\nid06d_outbox_oldest_age_seconds {oldest}");
        let confirmed = self
            .outbox
            .confirmed_seq(&self.outbox.stream())
            .unwrap_or(0);
        let _ = writeln!(s, "# HELP id06d_ledger_confirmed_seq The seq of the current stream up to which the ledger confirmed it stored every event (P/ack).\n# TYPE id06d_ledger_confirmed_seq gauge\nid06d_ledger_confirmed_seq {confirmed}");
        let _ = writeln!(s, "# HELP id06d_ledger_unconfirmed Events the ledger has not confirmed (with [ledger] confirm).\n# TYPE id06d_ledger_unconfirmed gauge\nid06d_ledger_unconfirmed {}", self.outbox.unconfirmed());
        let _ = writeln!(s, "# HELP id06d_last_seq The highest seq recorded in the current stream.\n# TYPE id06d_last_seq gauge\nid06d_last_seq {}", self.outbox.last_seq());
        let flag = |b: bool| u8::from(b);
        let _ = writeln!(s, "# HELP id06d_broker_connected Whether the publishing session is connected to the broker.\n# TYPE id06d_broker_connected gauge\nid06d_broker_connected {}", flag(self.shared.broker_connected.load(std::sync::atomic::Ordering::Acquire)));
        let _ = writeln!(s, "# HELP id06d_clock_synced Whether the system clock is known to be synchronised.\n# TYPE id06d_clock_synced gauge\nid06d_clock_synced {}", flag(crate::ops::clock::clock_synced()));
        let storage_error = self
            .shared
            .storage_error
            .lock()
            .map(|e| e.is_some())
            .unwrap_or(true);
        let _ = writeln!(s, "# HELP id06d_storage_error Whether taps cannot be stored now (a full or unusable disk).\n# TYPE id06d_storage_error gauge\nid06d_storage_error {}", flag(storage_error));
        let index = self.blocklist.index();
        let _ = writeln!(s, "# HELP id06d_blocklist_version Version of the blocklist in force.\n# TYPE id06d_blocklist_version gauge\nid06d_blocklist_version {}", index.version);
        let _ = writeln!(s, "# HELP id06d_blocklist_cards Listed cards.\n# TYPE id06d_blocklist_cards gauge\nid06d_blocklist_cards {}", index.len());
        let age = index.age_s(now).map_or(-1, |a| a as i64);
        let _ = writeln!(s, "# HELP id06d_blocklist_age_seconds Seconds since the list was confirmed (-1: never).\n# TYPE id06d_blocklist_age_seconds gauge\nid06d_blocklist_age_seconds {age}");
        let _ = writeln!(s, "# HELP id06d_reader_recoveries_total Reader recoveries since start.\n# TYPE id06d_reader_recoveries_total counter");
        let readers = self.shared.reader_states();
        for (name, st) in &readers {
            let _ = writeln!(
                s,
                "id06d_reader_recoveries_total{{reader=\"{name}\"}} {}",
                st.recoveries
            );
        }
        let _ = writeln!(s, "# HELP id06d_reader_up Whether the reader answers (1) or not (0).\n# TYPE id06d_reader_up gauge");
        for (name, st) in &readers {
            let _ = writeln!(
                s,
                "id06d_reader_up{{reader=\"{name}\"}} {}",
                u8::from(st.state == ReaderState::Ok)
            );
        }
        s
    }
}

/// Binds the endpoint's socket (port 0 picks a free port; the log says which).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Connections served at a time, at most.
pub const MAX_CONNECTIONS: usize = 32;
const CLIENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `GET /metrics` on a bound socket until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, source: MetricsSource) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut complained: Option<std::time::Instant> = None;
    loop {
        // Take a connection only when one can be served.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (mut stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                if complained.is_none_or(|t| t.elapsed().as_secs() >= 60) {
                    tracing::warn!("the metrics endpoint cannot take connections: {e}");
                    complained = Some(std::time::Instant::now());
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = [0u8; 1024];
            let Ok(Ok(n)) =
                tokio::time::timeout(CLIENT_DEADLINE, read_head(&mut stream, &mut buf)).await
            else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) =
                if request.starts_with("GET /metrics ") || request.starts_with("GET /metrics\r") {
                    ("200 OK", source.render())
                } else {
                    ("404 Not Found", "only /metrics is here\n".to_string())
                };
            let response = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(CLIENT_DEADLINE, async {
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

/// Reads a request until the end of its head (an empty line), the end of the stream or a
/// full buffer: a client may send the request line in several pieces, and answering
/// after the first one would judge a half-read path and reset the client's later writes.
async fn read_head(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let got = stream.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..n].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::read_head;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_sent_in_pieces_is_read_to_the_end_of_its_head() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let n = read_head(&mut server, &mut buf).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        for piece in ["GET /met", "rics HTTP/1.0\r\n", "\r\n"] {
            client.write_all(piece.as_bytes()).await.unwrap();
            // Let the reader take this piece on its own before the next one arrives.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(reader.await.unwrap(), "GET /metrics HTTP/1.0\r\n\r\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_closes_early_gives_what_it_sent() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /x").await.unwrap();
        drop(client);
        let mut buf = [0u8; 256];
        assert_eq!(read_head(&mut server, &mut buf).await.unwrap(), 6);
    }
}
