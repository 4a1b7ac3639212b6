//! The consumer's MQTT side: receive, store in batches, confirm, ask for gaps.
//!
//! Design: one task owns the connection. Events are taken as they come and stored in a
//! batch once no more arrive within [`BATCH_WAIT`] (or [`BATCH_MAX`] are waiting): one
//! transaction, then one `P/ack` per stream the batch touched, with the stream's
//! contiguous seq. The broker acknowledges a message when it is read; what is read and then
//! lost in a crash before the commit is not confirmed, so the gateway sends it again after
//! its `resend_after_s`. Once a second, gaps that stayed open for [`crate::GAP_WAIT`] are
//! asked for on `P/replay`.

use crate::{Store, GAP_WAIT, REPLAY_EVERY};
use id06_protocol::{Event, StreamId};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A batch is stored once no event came for this long ...
pub const BATCH_WAIT: Duration = Duration::from_millis(20);
/// ... or this many are waiting.
pub const BATCH_MAX: usize = 500;

/// How to reach the broker and where to store.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Login, if the broker wants one.
    pub login: Option<(String, String)>,
    /// This instance's client id (keep it stable: the session is persistent).
    pub client_id: String,
    /// The shared-subscription group all instances use.
    pub group: String,
    /// The gateways' `topic_prefix`.
    pub prefix: String,
}

/// What the consumer did, for its log and its tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Events received (redeliveries included).
    pub received: u64,
    /// Events stored for the first time.
    pub stored: u64,
    /// Payloads that were not an id06d event.
    pub malformed: u64,
    /// `P/ack` messages sent.
    pub acks: u64,
    /// `P/replay` messages sent.
    pub replays: u64,
}

/// Where a stream's `P/ack` and `P/replay` go.
fn base(prefix: &str, site: &str, terminal: &str) -> String {
    format!("{prefix}/{site}/{terminal}")
}

/// Runs until `stop` resolves.
pub async fn run(
    settings: Settings,
    mut store: Store,
    stop: impl std::future::Future<Output = ()>,
) -> Tally {
    tokio::pin!(stop);
    let mut tally = Tally::default();
    let mut o = MqttOptions::new(
        settings.client_id.clone(),
        settings.host.clone(),
        settings.port,
    );
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((user, password)) = &settings.login {
        o.set_credentials(user.clone(), password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    let filter = format!("$share/{}/{}/+/+/event", settings.group, settings.prefix);
    let mut batch: Vec<Event> = Vec::new();
    let mut gaps: HashMap<StreamId, (Instant, Option<Instant>)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut failing = false;
    loop {
        let wait = if batch.is_empty() {
            Duration::from_secs(3600)
        } else {
            BATCH_WAIT
        };
        tokio::select! {
            _ = &mut stop => break,
            polled = eventloop.poll() => match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    failing = false;
                    tracing::info!(filter, "connected; subscribing");
                    let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    tally.received += 1;
                    match Event::from_json(&p.payload) {
                        Ok(e) => batch.push(e),
                        Err(e) => {
                            tally.malformed += 1;
                            tracing::warn!(topic = %p.topic, "not an id06d event: {e}");
                        }
                    }
                    if batch.len() >= BATCH_MAX {
                        commit(&mut store, &client, &settings, &mut batch, &mut tally).await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!("broker unreachable: {e}; retrying");
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
            _ = tokio::time::sleep(wait), if !batch.is_empty() => {
                commit(&mut store, &client, &settings, &mut batch, &mut tally).await;
            }
            _ = tick.tick() => {
                ask_for_gaps(&mut store, &client, &settings, &mut gaps, &mut tally).await;
            }
        }
    }
    if !batch.is_empty() {
        commit(&mut store, &client, &settings, &mut batch, &mut tally).await;
    }
    let _ = client.disconnect().await;
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    tally
}

/// Stores the batch, then confirms each stream it touched.
async fn commit(
    store: &mut Store,
    client: &AsyncClient,
    settings: &Settings,
    batch: &mut Vec<Event>,
    tally: &mut Tally,
) {
    match store.insert(batch) {
        Ok(new) => tally.stored += new as u64,
        Err(e) => {
            // Nothing is confirmed; the gateway sends these again.
            tracing::error!("cannot store {} events: {e}", batch.len());
            batch.clear();
            return;
        }
    }
    let touched: HashSet<StreamId> = batch.iter().map(|e| e.stream).collect();
    batch.clear();
    for stream in touched {
        match store.advance(&stream) {
            Ok(Some(state)) if state.contiguous > 0 => {
                let topic = format!(
                    "{}/ack",
                    base(&settings.prefix, &state.site_id, &state.terminal_id)
                );
                let payload = serde_json::json!({"stream": stream, "seq": state.contiguous});
                if client
                    .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
                    .await
                    .is_ok()
                {
                    tally.acks += 1;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!("cannot read stream {stream}: {e}"),
        }
    }
}

/// Asks for the first gap of every stream whose gap has stayed open for [`GAP_WAIT`].
async fn ask_for_gaps(
    store: &mut Store,
    client: &AsyncClient,
    settings: &Settings,
    gaps: &mut HashMap<StreamId, (Instant, Option<Instant>)>,
    tally: &mut Tally,
) {
    let streams = match store.streams() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot read the streams: {e}");
            return;
        }
    };
    let now = Instant::now();
    for state in streams {
        let gap = match store.first_gap(&state.stream) {
            Ok(g) => g,
            Err(_) => continue,
        };
        let Some((from, to)) = gap else {
            gaps.remove(&state.stream);
            continue;
        };
        let (since, asked) = gaps.entry(state.stream).or_insert((now, None));
        let due = now.duration_since(*since) >= GAP_WAIT
            && asked.is_none_or(|t| now.duration_since(t) >= REPLAY_EVERY);
        if !due {
            continue;
        }
        *asked = Some(now);
        let topic = format!(
            "{}/replay",
            base(&settings.prefix, &state.site_id, &state.terminal_id)
        );
        let payload = serde_json::json!({"stream": state.stream, "from_seq": from, "to_seq": to});
        tracing::info!(stream = %state.stream, from, to, "asking for a gap again");
        if client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .is_ok()
        {
            tally.replays += 1;
        }
    }
}
