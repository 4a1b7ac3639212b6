//! The MQTT session that publishes decisions for doors (`P/decision`).
//!
//! Design: a decision is only worth anything for a few seconds; minutes later it would open
//! a door at the wrong time. So decisions go out on an MQTT 5 session of their own, each
//! with a *Message Expiry Interval* of [`DECISION_EXPIRY_S`]: the broker drops it if it
//! cannot hand it to a subscriber within that time (a door whose persistent session was
//! away never gets it late), without the door needing a synchronised clock. The session
//! runs as a task on the tap-delivery thread (see `run.rs`), so a decision reaches its
//! socket without waking another core. It subscribes to nothing and uses a clean start.
//!
//! While the broker is out of reach, decisions are not kept: one made at most
//! [`DECISION_FRESH`] before the connection comes up is still sent, the others are counted
//! and said in one log line; their events are in the outbox and go out on `P/event`.

use crate::config::MqttSettings;
use crate::shared::{Counters, Shared};
use crate::tap::pipeline::DoorDecision;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The broker drops a decision it could not deliver within this many seconds.
pub const DECISION_EXPIRY_S: u32 = 3;
/// A decision made while connecting is still sent if it is at most this old.
pub const DECISION_FRESH: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the session needs.
pub struct DoorSession {
    /// Broker settings.
    pub settings: MqttSettings,
    /// The broker password, read from `password_file`.
    pub password: Option<String>,
    /// For `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `P/decision`.
    pub topic: String,
    /// Decisions, from the publishing session.
    pub decisions: mpsc::Receiver<DoorDecision>,
    /// Counters.
    pub shared: Arc<Shared>,
    /// Cancelled when the daemon stops.
    pub shutdown: CancellationToken,
}

impl DoorSession {
    fn options(&self) -> MqttOptions {
        let s = &self.settings;
        let mut o = MqttOptions::new(format!("{}-doors", s.client_id), s.host.clone(), s.port);
        o.set_clean_start(true);
        o.set_keep_alive(Duration::from_secs(15));
        o.set_max_packet_size(Some(64 * 1024));
        // See V5_INFLIGHT.
        o.set_outgoing_inflight_upper_limit(crate::mqtt::V5_INFLIGHT);
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        if let Some(user) = &s.username {
            o.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        o
    }

    /// Runs until shutdown or until the decisions channel closes.
    ///
    /// The connection is polled by a task of its own, so that this one can wait for room in
    /// rumqttc's queue: a burst of decisions is sent, not dropped, while the broker is there.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut said_unreachable = false;
        loop {
            let (client, mut eventloop) = AsyncClient::new(self.options(), 1024);
            let (up_tx, mut up_rx) = mpsc::channel::<Result<(), String>>(4);
            let poller = tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if up_tx.send(Ok(())).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = up_tx.send(Err(e.to_string())).await;
                            return;
                        }
                    }
                }
            });
            let mut connected = false;
            let lost = loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => {
                        let _ = client.try_disconnect();
                        poller.abort();
                        return;
                    }
                    up = up_rx.recv() => match up {
                        Some(Ok(())) => {
                            connected = true;
                            said_unreachable = false;
                            tracing::info!(broker = %self.settings.url, "the decision session is connected");
                            backoff = BACKOFF_MIN;
                            // Decisions made while connecting: the last moments' still go.
                            let mut late = 0u64;
                            while let Ok(d) = self.decisions.try_recv() {
                                if d.at.elapsed() <= DECISION_FRESH {
                                    self.publish(&client, d).await;
                                } else {
                                    late += 1;
                                    Counters::bump(&self.shared.counters.decisions_dropped);
                                }
                            }
                            if late > 0 {
                                tracing::warn!(late, "{late} decisions made while the broker was out of reach are not published (too late for a door); their events are in the outbox and follow on P/event");
                            }
                        }
                        Some(Err(why)) => break why,
                        None => break "the connection ended".to_string(),
                    },
                    decision = self.decisions.recv(), if connected => match decision {
                        Some(d) => self.publish(&client, d).await,
                        None => {
                            let _ = client.try_disconnect();
                            poller.abort();
                            return;
                        }
                    },
                }
            };
            poller.abort();
            if !said_unreachable {
                tracing::warn!(broker = %self.settings.url, "the decision session lost the broker: {lost}; decisions are not queued meanwhile");
                said_unreachable = true;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn publish(&self, client: &AsyncClient, d: DoorDecision) {
        let properties = PublishProperties {
            message_expiry_interval: Some(DECISION_EXPIRY_S),
            ..Default::default()
        };
        match client
            .publish_with_properties(
                self.topic.clone(),
                QoS::AtLeastOnce,
                false,
                d.payload,
                properties,
            )
            .await
        {
            Ok(()) => Counters::bump(&self.shared.counters.decisions_published),
            Err(_) => Counters::bump(&self.shared.counters.decisions_dropped),
        }
    }
}
