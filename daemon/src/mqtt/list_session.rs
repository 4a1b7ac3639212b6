//! The MQTT session that receives the lists: blocklist updates and snapshots.
//!
//! Design: everything the gateway subscribes to comes in on this session, and nothing the
//! gateway must deliver goes out on it. Events, decisions and states go out on the
//! publishing session ([`crate::mqtt::delivery`]), which subscribes to nothing, so no message anyone
//! publishes can get in the way of delivery. This session speaks MQTT 5, which lets the
//! gateway bound what the broker may send it before anything is read:
//!
//! - *Maximum Packet Size* [`MAX_PACKET`]: the broker never sends a bigger message (it drops
//!   it for this client; mosquitto logs that). A list change bigger than that is a
//!   snapshot's job.
//! - *Receive Maximum* [`RECEIVE_MAXIMUM`]: the broker should have at most that many
//!   unacknowledged messages on their way to us.
//! - Messages are handled one at a time, in order, and never dropped: the task that polls
//!   the connection hands each to [`BlocklistSync::handle`] over a channel of
//!   [`HANDOFF`] places and waits when it is full, so a flood waits in the socket and at the
//!   broker, not in our memory.
//!
//! rumqttc acknowledges a message when it reads it (acknowledging only after handling, with
//! its manual acknowledgements, stalled under a burst against mosquitto 2.0). An update
//! acknowledged and lost to a crash before it was applied shows as a gap at the next update
//! (`blocklist_gap` on `P/status`) and is caught up by the next snapshot.
//!
//! The session is persistent (clean start off, a session expiry of [`SESSION_EXPIRY`]),
//! under the client id `{client_id}-lists`, so updates published while the gateway was
//! offline arrive when it is back. It subscribes to the updates and the manifest, to the
//! chunk topics only while a snapshot is being collected, and to the ledger's `P/ack` and
//! `P/replay` ([`crate::mqtt::ledger_inbox`]).

use crate::config::MqttSettings;
use crate::lists::sync::{BlocklistSync, Incoming};
use id06_protocol::Topics;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The largest message the broker may send this session (8 MiB: a snapshot chunk of 50 000
/// cards is about 450 KB, an update of 100 000 changes about 5 MB).
pub const MAX_PACKET: u32 = 8 << 20;
/// Unacknowledged messages the broker may have on their way to us.
pub const RECEIVE_MAXIMUM: u16 = 4;
/// Messages read and waiting to be handled, at most.
pub const HANDOFF: usize = 4;
/// How long the broker keeps the session while the gateway is away (seconds).
pub const SESSION_EXPIRY: u32 = 7 * 24 * 3600;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the session needs.
pub struct ListSession {
    /// Broker settings.
    pub settings: MqttSettings,
    /// The broker password, read from `password_file`.
    pub password: Option<String>,
    /// For `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Topic names.
    pub topics: Topics,
    /// Where the lists go.
    pub sync: BlocklistSync,
    /// Where the ledger's confirmations and replay requests go.
    pub ledger: crate::mqtt::ledger_inbox::LedgerInbox,
    /// Cancelled when the daemon stops.
    pub shutdown: CancellationToken,
}

fn options(
    s: &MqttSettings,
    password: &Option<String>,
    tls: &Option<Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut o = MqttOptions::new(format!("{}-lists", s.client_id), s.host.clone(), s.port);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(SESSION_EXPIRY));
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(Some(MAX_PACKET));
    o.set_receive_maximum(Some(RECEIVE_MAXIMUM));
    // It publishes nothing but subscriptions; see V5_INFLIGHT.
    o.set_outgoing_inflight_upper_limit(crate::mqtt::V5_INFLIGHT);
    if let Some(tls) = tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    if let Some(user) = &s.username {
        o.set_credentials(user.clone(), password.clone().unwrap_or_default());
    }
    o
}

fn describe(e: &ConnectionError, settings: &MqttSettings) -> String {
    let raw = match e {
        ConnectionError::ConnectionRefused(code) => {
            return format!("the broker refused the connection ({code:?}); check username, password_file and client_id");
        }
        other => other.to_string(),
    };
    match settings
        .tls
        .then(|| crate::mqtt::tls::explain(&raw, settings))
        .flatten()
    {
        Some(hint) => format!("TLS: {hint} ({raw})"),
        None => raw,
    }
}

impl ListSession {
    /// Runs until shutdown; reconnects with back-off forever.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut last_error: Option<String> = None;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let (client, eventloop) =
                AsyncClient::new(options(&self.settings, &self.password, &self.tls), 16);
            let (why, connected) = self.connection(&client, eventloop).await;
            let Some(why) = why else { return };
            if connected {
                backoff = BACKOFF_MIN;
            }
            // One line per kind of failure, not one per attempt.
            if last_error.as_deref() != Some(why.as_str()) {
                tracing::warn!(broker = %self.settings.url, "the blocklist session lost the broker: {why}; retrying with back-off (events are not affected)");
                last_error = Some(why);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection. Returns why it ended (`None`: shutdown) and whether it was up.
    ///
    /// The event loop is polled by a task of its own (so that keep-alives go on while a
    /// snapshot is applied), which hands each message over a small channel to this task.
    async fn connection(
        &mut self,
        client: &AsyncClient,
        mut eventloop: EventLoop,
    ) -> (Option<String>, bool) {
        enum Polled {
            Connected,
            Message(rumqttc::v5::mqttbytes::v5::Publish),
            Lost(String),
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Polled>(HANDOFF);
        let settings = self.settings.clone();
        let poller = tokio::spawn(async move {
            loop {
                let next = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Polled::Connected,
                    Ok(Event::Incoming(Packet::Publish(p))) => Polled::Message(p),
                    Ok(_) => continue,
                    Err(e) => Polled::Lost(describe(&e, &settings)),
                };
                let lost = matches!(next, Polled::Lost(_));
                if tx.send(next).await.is_err() || lost {
                    return;
                }
            }
        });
        let mut connected = false;
        let mut chunks_on = false;
        let mut quiet = crate::lists::sync::Quiet::new();
        let chunk_topic = format!("{}/+", self.topics.blocklist_snapshot());
        let end = loop {
            let polled = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let _ = client.try_disconnect();
                    break None;
                }
                p = rx.recv() => p,
            };
            match polled {
                Some(Polled::Connected) => {
                    connected = true;
                    chunks_on = false;
                    tracing::info!(broker = %self.settings.url, "the blocklist session is connected");
                    for topic in [
                        self.topics.blocklist_update(),
                        self.topics.blocklist_snapshot(),
                        self.topics.ack(),
                        self.topics.replay(),
                    ] {
                        let _ = client.subscribe(topic, QoS::AtLeastOnce).await;
                    }
                    // The session may still hold a chunk subscription from before a restart.
                    if !self.sync.wants_chunks() {
                        let _ = client.unsubscribe(chunk_topic.clone()).await;
                    }
                }
                Some(Polled::Message(p)) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if topic == self.topics.ack() {
                        if let Err(line) = self.ledger.ack(&p.payload).await {
                            quiet.warn(&line);
                        }
                    } else if topic == self.topics.replay() {
                        if let Err(line) = self.ledger.replay(&p.payload) {
                            quiet.warn(&line);
                        }
                    } else if let Some(input) = self.route(&topic, p.payload.to_vec()) {
                        self.sync.handle(input).await;
                    }
                }
                Some(Polled::Lost(why)) => break Some(why),
                None => break Some("the connection ended".to_string()),
            }
            if connected {
                let want = self.sync.wants_chunks();
                if want != chunks_on {
                    chunks_on = want;
                    let _ = if want {
                        client
                            .subscribe(chunk_topic.clone(), QoS::AtLeastOnce)
                            .await
                    } else {
                        client.unsubscribe(chunk_topic.clone()).await
                    };
                }
            }
        };
        poller.abort();
        (end, connected)
    }

    fn route(&self, topic: &str, payload: Vec<u8>) -> Option<Incoming> {
        let snapshot = self.topics.blocklist_snapshot();
        if topic == self.topics.blocklist_update() {
            Some(Incoming::Update(payload))
        } else if topic == snapshot {
            (!payload.is_empty()).then_some(Incoming::Manifest(payload))
        } else if topic
            .strip_prefix(&snapshot)
            .is_some_and(|rest| rest.starts_with('/'))
        {
            // An empty payload clears a retained chunk: nothing to take.
            (!payload.is_empty()).then_some(Incoming::Chunk(payload))
        } else {
            tracing::debug!(topic, "message on a topic we did not subscribe to; ignored");
            None
        }
    }
}
