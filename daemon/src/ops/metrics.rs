//! `GET /metrics`: the gateway's counters and gauges in the Prometheus text format, encoded
//! by `prometheus-client` from the live state at each scrape (a collector, so the tap path
//! keeps its plain atomic counters). Served by [`crate::ops::http`].

use crate::ops::status::StatusSource;
use crate::shared::Counters;
use id06_protocol::{DenyReason, ReaderState, UtcMillis};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The registry with the gateway's collector.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Metrics read from `source` at each scrape.
    pub fn new(source: StatusSource) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Gateway(source)));
        Metrics { registry }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(4096);
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        {
            tracing::warn!("cannot encode the metrics: {e}");
        }
        text
    }
}

struct Gateway(StatusSource);

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("id06d gateway metrics")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Gateway {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let c = &s.shared.counters;
        // Counters: the encoder names them …_total.
        for (name, help, v) in [
            ("id06d_taps", "Taps recorded.", &c.taps),
            (
                "id06d_duplicates",
                "Presentations suppressed as duplicates.",
                &c.duplicates,
            ),
            ("id06d_granted", "Taps granted.", &c.granted),
            (
                "id06d_delivered",
                "Events acknowledged by the broker.",
                &c.delivered,
            ),
            (
                "id06d_redelivered",
                "Events published again after a reconnect or restart.",
                &c.redelivered,
            ),
            (
                "id06d_decisions_dropped",
                "Decisions not published (broker away).",
                &c.decisions_dropped,
            ),
            (
                "id06d_storage_failures",
                "Failed attempts to store taps.",
                &c.storage_failures,
            ),
            (
                "id06d_blocklist_applied",
                "Blocklist updates and snapshots applied.",
                &c.blocklist_applied,
            ),
            (
                "id06d_blocklist_rejected",
                "Blocklist updates and snapshots rejected.",
                &c.blocklist_rejected,
            ),
        ] {
            counter(&mut e, name, help, Counters::get(v))?;
        }
        counter(
            &mut e,
            "id06d_log_lines_dropped",
            "Log lines dropped because stderr (journald) did not take them.",
            crate::ops::logging::dropped_lines(),
        )?;
        {
            let probe = ConstCounter::new(0u64);
            let mut family = e.encode_descriptor(
                "id06d_denied",
                "Taps denied, by reason.",
                None,
                probe.metric_type(),
            )?;
            for r in DenyReason::ALL {
                ConstCounter::new(Counters::get(c.denied_for(r)))
                    .encode(family.encode_family(&[("reason", r.as_str())])?)?;
            }
        }

        let now = UtcMillis::now();
        let status = s.gateway();
        let flag = |b: bool| i64::from(b);
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (name, help, v) in [
            (
                "id06d_outbox_depth",
                "Events waiting for the broker.",
                n(status.outbox_depth),
            ),
            (
                "id06d_outbox_oldest_age_seconds",
                "Age of the oldest waiting event (0: none waits).",
                n(s.oldest_waiting_s(now).unwrap_or(0)),
            ),
            (
                "id06d_ledger_confirmed_seq",
                "The seq of the current stream up to which the ledger confirmed it stored every event (P/ack).",
                n(s.outbox.confirmed_seq(&status.stream).unwrap_or(0)),
            ),
            (
                "id06d_ledger_unconfirmed",
                "Events the ledger has not confirmed (with [ledger] confirm).",
                n(s.outbox.unconfirmed()),
            ),
            (
                "id06d_last_seq",
                "The highest seq recorded in the current stream.",
                n(status.last_seq),
            ),
            (
                "id06d_broker_connected",
                "Whether the publishing session is connected to the broker.",
                flag(s.broker_connected()),
            ),
            (
                "id06d_clock_synced",
                "Whether the system clock is known to be synchronised.",
                flag(status.clock_synced),
            ),
            (
                "id06d_storage_error",
                "Whether taps cannot be stored now (a full or unusable disk).",
                flag(s.storage_error()),
            ),
            (
                "id06d_blocklist_version",
                "Version of the blocklist in force.",
                n(status.blocklist_version),
            ),
            (
                "id06d_blocklist_cards",
                "Listed cards.",
                n(s.blocklist.index().len() as u64),
            ),
            (
                "id06d_blocklist_age_seconds",
                "Seconds since the list was confirmed (-1: never).",
                status.blocklist_age_s.map_or(-1, n),
            ),
            (
                "id06d_blocklist_stale",
                "Whether the blocklist is older than [blocklist] max_age_hours.",
                flag(status.blocklist_stale),
            ),
            (
                "id06d_site_list_version",
                "Version of the site list in force (0: never imported).",
                n(s.site_list.index().version),
            ),
        ] {
            gauge(&mut e, name, help, v)?;
        }

        let readers = s.shared.reader_states();
        {
            let probe = ConstCounter::new(0u64);
            let mut family = e.encode_descriptor(
                "id06d_reader_recoveries",
                "Reader recoveries since start.",
                None,
                probe.metric_type(),
            )?;
            for (name, st) in &readers {
                ConstCounter::new(st.recoveries)
                    .encode(family.encode_family(&[("reader", name.as_str())])?)?;
            }
        }
        {
            let probe = ConstGauge::new(0i64);
            let mut family = e.encode_descriptor(
                "id06d_reader_up",
                "Whether the reader answers (1) or not (0).",
                None,
                probe.metric_type(),
            )?;
            for (name, st) in &readers {
                ConstGauge::new(flag(st.state == ReaderState::Ok))
                    .encode(family.encode_family(&[("reader", name.as_str())])?)?;
            }
        }
        Ok(())
    }
}
