//! The publishing MQTT session (contract §7): one task owns the rumqttc event loop.
//!
//! It publishes events, the status and the reader states (decisions go out on a session of
//! their own, [`crate::mqtt::door_session`], with a message expiry), and subscribes to
//! nothing: the lists come in on a session of their own ([`crate::mqtt::list_session`]), so that
//! nothing anyone publishes can stop delivery. It connects with a clean session (nothing
//! is queued for it; what must be delivered is in the outbox).
//!
//! Design: every connection gets a fresh rumqttc client and event loop, so nothing that
//! rumqttc queued in memory is replayed behind our back; the outbox is the only source of
//! what must be (re)delivered. On each connection the task publishes the retained status
//! and reader states, then streams the outbox from its first unacknowledged position, keeping
//! at most [`WINDOW`] events in flight. rumqttc reports each publish it sends as
//! `Outgoing::Publish(pkid)` in request order, which maps packet ids to outbox positions; an event
//! leaves the outbox only on its PUBACK. Any error ends the connection; the task reconnects
//! with exponential back-off, forever, until shutdown.

use crate::config::MqttSettings;
use crate::lists::blocklist::Blocklist;
use crate::shared::{Counters, Shared};
use crate::storage::outbox::Outbox;
use id06_protocol::{Event, GatewayStatus, Topics, UtcMillis};
use rumqttc::{
    AsyncClient, ConnectionError, Event as MqttEvent, EventLoop, LastWill, MqttOptions, Outgoing,
    Packet, QoS,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Events in flight (published, not yet acknowledged) at most.
pub const WINDOW: usize = 128;
/// Acknowledged events are removed from the outbox in batches of this many.
const ACK_BATCH: usize = 64;
/// Events read from the outbox at a time.
const READ_AHEAD: usize = 256;
/// rumqttc's own in-flight limit; above WINDOW so decisions and states fit beside events.
const INFLIGHT: u16 = 512;
/// Capacity of rumqttc's request channel.
const REQUESTS: usize = 1024;
/// Back-off between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the retained status is refreshed while connected.
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// What the MQTT task needs.
pub struct MqttTask {
    /// Broker settings.
    pub settings: MqttSettings,
    /// The broker password, read from `password_file`.
    pub password: Option<String>,
    /// For `mqtts://`: the TLS client configuration ([`crate::mqtt::tls::client_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Topic names.
    pub topics: Topics,
    /// The outbox to deliver.
    pub outbox: Outbox,
    /// For the status payload.
    pub blocklist: Blocklist,
    /// `[blocklist] max_age_hours`.
    pub max_age_hours: u64,
    /// Counters, reader states, wake-ups.
    pub shared: Arc<Shared>,
    /// The taps just recorded, whose events may go out straight from their payloads.
    pub decisions: mpsc::Receiver<crate::tap::pipeline::Decided>,
    /// When this process started.
    pub started_at: UtcMillis,
    /// Cancelled when the daemon stops: deliver what can be delivered within
    /// `drain_timeout`, publish offline, disconnect.
    pub shutdown: CancellationToken,
    /// How long to keep delivering after shutdown.
    pub drain_timeout: Duration,
    /// Set once `decisions` has closed (the pipeline stopped).
    pub decisions_closed: bool,
    /// `[ledger]`.
    pub ledger: crate::config::LedgerSettings,
    /// Replays the ledger asked for (from the list session).
    pub replays: mpsc::Receiver<ReplayRequest>,
    /// With `confirm`: events the broker acknowledged and the ledger has not confirmed,
    /// with when they were last sent (kept across reconnects; empty at start).
    pub sent_at: std::collections::BTreeMap<u64, Instant>,
    /// Replays being served (empty at start).
    pub replay_jobs: VecDeque<ReplayJob>,
}

/// A range of events the ledger asked for again on `P/replay` (already checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRequest {
    /// The stream.
    pub stream: id06_protocol::StreamId,
    /// The first seq.
    pub from_seq: u64,
    /// The last seq.
    pub to_seq: u64,
}

/// A replay being served.
pub struct ReplayJob {
    request: ReplayRequest,
    /// The next seq to send.
    next: u64,
    sent: u64,
    missing: Vec<(u64, u64)>,
}

/// Replayed events sent per second at most, and in flight at most: a replay of any size
/// cannot starve new taps.
const REPLAY_PER_SECOND: u32 = 500;
const REPLAY_IN_FLIGHT: usize = 32;
/// Replays waiting at most; more are refused with a log line.
pub const REPLAYS_QUEUED: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Event(u64),
    Replay,
    Other,
}

/// Per-connection delivery state.
struct Window {
    /// The next outbox position to read (those before it are in flight or read ahead).
    next: u64,
    /// Tags of the publishes handed to rumqttc, in order, waiting for their pkid.
    unassigned: VecDeque<Tag>,
    /// Event publishes sent, by packet id.
    by_pkid: HashMap<u16, Tag>,
    /// Events published and not yet acknowledged.
    in_flight: usize,
    /// Acknowledged events not yet removed from the outbox.
    acked: Vec<u64>,
    /// Events read from the outbox and not yet published (position, JSON).
    ahead: VecDeque<(u64, Vec<u8>)>,
    /// Positions published and not yet acknowledged (so a resend never sends one twice).
    flying: std::collections::HashSet<u64>,
    /// Replayed events in flight.
    replay_in_flight: usize,
}

enum End {
    Shutdown,
    Lost(String),
}

impl MqttTask {
    fn options(&self) -> MqttOptions {
        let s = &self.settings;
        let mut o = MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
        // Nothing is subscribed: a clean session also drops whatever an older id06d's
        // subscriptions left queued under this client id.
        o.set_clean_session(true);
        o.set_keep_alive(Duration::from_secs(15));
        o.set_inflight(INFLIGHT);
        // Incoming: only acknowledgements and the like. Outgoing: events of a few hundred bytes.
        o.set_max_packet_size(64 * 1024, 1024 * 1024);
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o.set_last_will(LastWill::new(
            self.topics.status(),
            GatewayStatus::offline_payload(),
            QoS::AtLeastOnce,
            true,
        ));
        if let (Some(user), Some(password)) = (&s.username, &self.password) {
            o.set_credentials(user.clone(), password.clone());
        } else if let Some(user) = &s.username {
            o.set_credentials(user.clone(), String::new());
        }
        o
    }

    fn status_payload(&self) -> Vec<u8> {
        let status = crate::ops::status::gateway_status(
            &self.shared,
            &self.outbox,
            &self.blocklist,
            self.started_at,
            self.ledger.confirm,
            self.max_age_hours,
        );
        serde_json::to_vec(&status).unwrap_or_default()
    }

    /// Runs until shutdown. Never returns early: a broker that is away is waited for.
    pub async fn run(mut self) {
        if self.ledger.confirm {
            // Events acknowledged by the broker before this start and not confirmed: sent
            // again `resend_after_s` from now unless the ledger confirms them.
            let now = Instant::now();
            match self.outbox.unconfirmed_sent(0, usize::MAX) {
                Ok(positions) => self.sent_at.extend(positions.into_iter().map(|p| (p, now))),
                Err(e) => tracing::warn!("cannot read the unconfirmed events: {e}"),
            }
        }
        let mut backoff = BACKOFF_MIN;
        let mut failing_since: Option<Instant> = None;
        let mut max_published: u64 = 0;
        loop {
            let hb = &self.shared.heartbeat;
            hb.mqtt_last_turn
                .store(hb.now_ms(), std::sync::atomic::Ordering::Release);
            if self.shutdown.is_cancelled() {
                return;
            }
            let (client, eventloop) = AsyncClient::new(self.options(), REQUESTS);
            match self
                .connection(&client, eventloop, &mut max_published)
                .await
            {
                (End::Shutdown, _) => return,
                (End::Lost(why), was_connected) => {
                    if was_connected {
                        backoff = BACKOFF_MIN;
                        failing_since = None;
                    }
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(
                            broker = %self.settings.url,
                            outbox_depth = self.outbox.depth(),
                            "MQTT broker unreachable: {why}; retrying with back-off, events wait in the outbox"
                        );
                    } else {
                        tracing::debug!(broker = %self.settings.url, "MQTT connect failed again: {why}");
                    }
                }
            }
            // After shutdown there is no point in waiting for a broker that is away.
            if self.shutdown.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection, from connect to loss or shutdown. Returns why it ended and whether
    /// it ever got connected.
    async fn connection(
        &mut self,
        client: &AsyncClient,
        mut eventloop: EventLoop,
        max_published: &mut u64,
    ) -> (End, bool) {
        let mut connected = false;
        let mut window = Window {
            next: 0,
            unassigned: VecDeque::new(),
            by_pkid: HashMap::new(),
            in_flight: 0,
            acked: Vec::with_capacity(ACK_BATCH),
            ahead: VecDeque::new(),
            flying: std::collections::HashSet::new(),
            replay_in_flight: 0,
        };
        let mut next_status = Instant::now() + STATUS_EVERY;
        let mut ledger_tick = tokio::time::interval(Duration::from_millis(100));
        ledger_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut ticks: u64 = 0;
        let mut replay_tokens: u32 = 0;
        let mut confirmed_shown = self
            .outbox
            .confirmed_seq(&self.outbox.stream())
            .unwrap_or(0);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let hb = &self.shared.heartbeat;
            hb.mqtt_last_turn
                .store(hb.now_ms(), std::sync::atomic::Ordering::Release);
            if drain_deadline.is_none() && self.shutdown.is_cancelled() {
                if !connected {
                    return (End::Shutdown, false);
                }
                drain_deadline = Some(Instant::now() + self.drain_timeout);
            }
            if let Some(deadline) = drain_deadline {
                let drained = window.in_flight == 0 && self.outbox.depth() == 0;
                if drained || Instant::now() >= deadline {
                    self.flush_acks(&mut window);
                    self.goodbye(client, &mut eventloop).await;
                    return (End::Shutdown, true);
                }
            }
            let deadline_sleep =
                drain_deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                polled = eventloop.poll() => {
                    match polled {
                        Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                            connected = true;
                            self.shared.broker_connected.store(true, std::sync::atomic::Ordering::Release);
                            // Decisions made while the broker was out of reach: their
                            // events are in the outbox and go out from there (the door
                            // session publishes the decisions themselves).
                            while self.decisions.try_recv().is_ok() {}
                            tracing::info!(broker = %self.settings.url, session_present = ack.session_present, outbox_depth = self.outbox.depth(), "connected to the MQTT broker");
                            window.next = match self.outbox.first_pending() {
                                Ok(Some(pos)) => pos,
                                Ok(None) => self.outbox.last_pos() + 1,
                                Err(e) => return (End::Lost(format!("cannot read the outbox: {e}")), true),
                            };
                            self.shared.status_dirty.store(false, std::sync::atomic::Ordering::Release);
                            self.publish_other(client, &mut window, self.topics.status(), self.status_payload(), true);
                            for (name, status) in self.shared.take_reader_updates(true) {
                                let payload = serde_json::to_vec(&status).unwrap_or_default();
                                self.publish_other(client, &mut window, self.topics.reader(&name), payload, true);
                            }
                            self.fill(client, &mut window, max_published);
                        }
                        Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => {
                            match window.unassigned.pop_front() {
                                Some(tag @ (Tag::Event(_) | Tag::Replay)) => {
                                    if let Tag::Event(pos) = tag {
                                        // For benches/tail.rs: the event is on the socket.
                                        tracing::trace!(target: "id06d::stages", pos, "sent");
                                    }
                                    window.by_pkid.insert(pkid, tag);
                                }
                                Some(Tag::Other) => {}
                                None => tracing::debug!(pkid, "a publish went out that we did not tag"),
                            }
                        }
                        Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                            // Nothing is subscribed; a broker that sends anyway is ignored.
                            tracing::debug!(topic = %p.topic, "a message on the publishing session; ignored");
                        }
                        Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                            match window.by_pkid.remove(&ack.pkid) {
                                Some(Tag::Event(pos)) => {
                                    window.in_flight = window.in_flight.saturating_sub(1);
                                    window.flying.remove(&pos);
                                    window.acked.push(pos);
                                    if self.ledger.confirm {
                                        self.sent_at.insert(pos, Instant::now());
                                    }
                                    // Remove acknowledged events in batches; at once when idle.
                                    if window.acked.len() >= ACK_BATCH || window.in_flight == 0 {
                                        self.flush_acks(&mut window);
                                    }
                                    self.fill(client, &mut window, max_published);
                                }
                                Some(Tag::Replay) => {
                                    window.replay_in_flight = window.replay_in_flight.saturating_sub(1);
                                }
                                _ => {}
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            self.shared.broker_connected.store(false, std::sync::atomic::Ordering::Release);
                            self.flush_acks(&mut window);
                            return (End::Lost(describe(&e, &self.settings)), connected);
                        }
                    }
                }
                // Not while connecting: a branch that is ready would cancel the connection
                // attempt in `poll` over and over (a TLS handshake takes a while).
                decision = self.decisions.recv(), if connected && !self.decisions_closed => {
                    // The events of the decisions just made, straight from their payloads
                    // when they are next due (the door session publishes the decisions).
                    if decision.is_none() {
                        // The pipeline has stopped; never poll a closed channel again.
                        self.decisions_closed = true;
                    }
                    let mut next = decision;
                    while let Some(decided) = next {
                        if connected && drain_deadline.is_none() {
                            self.publish_direct(client, &mut window, max_published, decided);
                        }
                        next = self.decisions.try_recv().ok();
                    }
                    if connected {
                        self.fill(client, &mut window, max_published);
                    }
                }
                _ = self.shared.wake.notified(), if connected => {
                    // New events are in the database: acknowledgements that waited for
                    // them go when nothing else is in flight (as after a PUBACK).
                    if window.in_flight == 0 {
                        self.flush_acks(&mut window);
                    }
                    if connected && self.shared.status_dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
                        self.publish_other(client, &mut window, self.topics.status(), self.status_payload(), true);
                    }
                    if connected {
                        for (name, status) in self.shared.take_reader_updates(false) {
                            let payload = serde_json::to_vec(&status).unwrap_or_default();
                            self.publish_other(client, &mut window, self.topics.reader(&name), payload, true);
                        }
                        self.fill(client, &mut window, max_published);
                    }
                }
                request = self.replays.recv(), if connected && self.replay_jobs.len() < REPLAYS_QUEUED => {
                    if let Some(request) = request {
                        tracing::info!(stream = %request.stream, from_seq = request.from_seq, to_seq = request.to_seq, "replaying events the ledger asked for");
                        self.replay_jobs.push_back(ReplayJob { next: request.from_seq, request, sent: 0, missing: Vec::new() });
                    }
                }
                _ = ledger_tick.tick(), if connected && drain_deadline.is_none() => {
                    ticks += 1;
                    if self.ledger.confirm && ticks % 10 == 0 {
                        self.resend_unconfirmed(&mut window);
                        self.fill(client, &mut window, max_published);
                        // The confirmed seq on P/status, at most once a second.
                        let confirmed = self.outbox.confirmed_seq(&self.outbox.stream()).unwrap_or(confirmed_shown);
                        if confirmed != confirmed_shown {
                            confirmed_shown = confirmed;
                            self.publish_other(client, &mut window, self.topics.status(), self.status_payload(), true);
                        }
                    }
                    replay_tokens = (replay_tokens + REPLAY_PER_SECOND / 10).min(REPLAY_PER_SECOND);
                    self.serve_replays(client, &mut window, &mut replay_tokens);
                }
                _ = tokio::time::sleep_until(next_status) => {
                    next_status = Instant::now() + STATUS_EVERY;
                    if connected {
                        self.publish_other(client, &mut window, self.topics.status(), self.status_payload(), true);
                    }
                }
                _ = self.shutdown.cancelled(), if drain_deadline.is_none() => {}
                _ = tokio::time::sleep_until(deadline_sleep), if drain_deadline.is_some() => {}
            }
        }
    }

    /// Publishes something that is not an event (status, reader state, decision).
    fn publish_other(
        &self,
        client: &AsyncClient,
        window: &mut Window,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> bool {
        match client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
            Ok(()) => {
                window.unassigned.push_back(Tag::Other);
                true
            }
            Err(e) => {
                tracing::debug!("MQTT request queue full, not published: {e}");
                false
            }
        }
    }

    /// Removes the acknowledged events from the outbox (not synced: a lost removal only
    /// means a redelivery).
    fn flush_acks(&self, window: &mut Window) {
        if window.acked.is_empty() {
            return;
        }
        // An event sent from its decision can be acknowledged before the pipeline has put
        // it into the database (it does so after letting it go out): its acknowledgement
        // waits for that, or the event would be pending again once it is put in.
        let applied = self.outbox.last_pos();
        let (ready, early): (Vec<u64>, Vec<u64>) =
            window.acked.drain(..).partition(|p| *p <= applied);
        window.acked = early;
        if ready.is_empty() {
            return;
        }
        match self.outbox.ack_many(&ready) {
            Ok(n) => {
                self.shared
                    .counters
                    .delivered
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                self.shared.delivered.notify_waiters();
            }
            Err(e) => tracing::error!("cannot remove delivered events from the outbox: {e}"),
        }
    }

    /// Sends a just-recorded event on `P/event` straight from its decision when it is the
    /// next one due and the window has room, without waiting to read it back from the
    /// outbox (the outbox makes its acknowledgement wait until the event is in the
    /// database). Anything else is left to [`MqttTask::fill`].
    fn publish_direct(
        &self,
        client: &AsyncClient,
        window: &mut Window,
        max_published: &mut u64,
        decided: crate::tap::pipeline::Decided,
    ) {
        let pos = decided.pos;
        if pos == 0 || pos != window.next || !window.ahead.is_empty() || window.in_flight >= WINDOW
        {
            return;
        }
        if client
            .try_publish(
                self.topics.event(),
                QoS::AtLeastOnce,
                false,
                decided.payload,
            )
            .is_err()
        {
            return;
        }
        window.next = pos + 1;
        window.unassigned.push_back(Tag::Event(pos));
        window.in_flight += 1;
        if pos <= *max_published {
            Counters::bump(&self.shared.counters.redelivered);
        }
        *max_published = (*max_published).max(pos);
    }

    /// Tops the window up from the outbox, reading ahead [`READ_AHEAD`] events at a time.
    fn fill(&self, client: &AsyncClient, window: &mut Window, max_published: &mut u64) {
        while window.in_flight < WINDOW {
            if window.ahead.is_empty() {
                match self.outbox.pending_from(window.next, READ_AHEAD) {
                    Ok(batch) => {
                        let Some(&(last, _)) = batch.last() else {
                            return;
                        };
                        window.next = last + 1;
                        window.ahead.extend(batch);
                    }
                    Err(e) => {
                        tracing::error!("cannot read the outbox: {e}");
                        return;
                    }
                }
            }
            let Some((pos, payload)) = window.ahead.pop_front() else {
                return;
            };
            if window.flying.contains(&pos) {
                continue; // already on its way (a resend moved `next` back past it)
            }
            if client
                .try_publish(self.topics.event(), QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                // rumqttc's queue is full: read this one again next time.
                window.ahead.clear();
                window.next = pos;
                return;
            }
            window.unassigned.push_back(Tag::Event(pos));
            window.flying.insert(pos);
            window.in_flight += 1;
            if pos <= *max_published {
                Counters::bump(&self.shared.counters.redelivered);
            }
            *max_published = (*max_published).max(pos);
        }
    }

    /// With `[ledger] confirm`: puts the events the ledger has not confirmed within
    /// `resend_after_s` of their last sending back into the outbox, so they go out again
    /// in order.
    fn resend_unconfirmed(&mut self, window: &mut Window) {
        let after = Duration::from_secs(self.ledger.resend_after_s);
        let now = Instant::now();
        let due: Vec<u64> = self
            .sent_at
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= after)
            .map(|(pos, _)| *pos)
            .collect();
        if due.is_empty() {
            return;
        }
        let mut again = Vec::with_capacity(due.len());
        for pos in due {
            self.sent_at.remove(&pos);
            match self.outbox.is_unconfirmed(pos) {
                Ok(true) => again.push(pos),
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot read the outbox: {e}"),
            }
        }
        let Some(&first) = again.first() else { return };
        match self.outbox.repend(&again) {
            Ok(n) => {
                tracing::info!(
                    events = n,
                    from_position = first,
                    "sending again events the ledger has not confirmed within resend_after_s"
                );
                window.next = window.next.min(first);
                window.ahead.clear();
            }
            Err(e) => tracing::warn!("cannot put unconfirmed events back into the outbox: {e}"),
        }
    }

    /// Sends replayed events within the replay budget (live events first), and the result
    /// of each finished replay on `P/replay/result`.
    fn serve_replays(&mut self, client: &AsyncClient, window: &mut Window, tokens: &mut u32) {
        while *tokens > 0
            && window.replay_in_flight < REPLAY_IN_FLIGHT
            && window.in_flight < WINDOW / 2
        {
            let done = match self.replay_jobs.front() {
                None => return,
                Some(job) => job.next > job.request.to_seq,
            };
            if done {
                if let Some(ReplayJob {
                    request,
                    sent,
                    missing,
                    ..
                }) = self.replay_jobs.pop_front()
                {
                    let result = serde_json::json!({
                        "stream": request.stream,
                        "from_seq": request.from_seq,
                        "to_seq": request.to_seq,
                        "sent": sent,
                        "missing": missing,
                    });
                    tracing::info!(stream = %request.stream, from_seq = request.from_seq, to_seq = request.to_seq, sent, missing = missing.len(), "replay done");
                    self.publish_other(
                        client,
                        window,
                        self.topics.replay_result(),
                        result.to_string().into_bytes(),
                        false,
                    );
                }
                continue;
            }
            let Some(job) = self.replay_jobs.front_mut() else {
                return;
            };
            let room = (*tokens as usize).min(REPLAY_IN_FLIGHT - window.replay_in_flight);
            let read =
                self.outbox
                    .archived_range(&job.request.stream, job.next, job.request.to_seq, room);
            let (found, missing) = match read {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // Checked when it came in; the stream cannot disappear. Drop the job.
                    job.missing.push((job.next, job.request.to_seq));
                    job.next = job.request.to_seq + 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!("cannot read the archive for a replay: {e}");
                    return;
                }
            };
            job.missing.extend(missing);
            if found.is_empty() {
                job.next = job.request.to_seq + 1;
                continue;
            }
            for (_, payload) in found {
                let seq = Event::from_json(&payload).map(|e| e.seq).unwrap_or(0);
                if client
                    .try_publish(self.topics.event(), QoS::AtLeastOnce, false, payload)
                    .is_err()
                {
                    return; // rumqttc's queue is full: the rest next time
                }
                window.unassigned.push_back(Tag::Replay);
                window.replay_in_flight += 1;
                *tokens = tokens.saturating_sub(1);
                job.sent += 1;
                job.next = seq.max(job.next) + 1;
            }
        }
    }

    /// Clean goodbye: retained offline status, then DISCONNECT (no last will then).
    async fn goodbye(&self, client: &AsyncClient, eventloop: &mut EventLoop) {
        let _ = client.try_publish(
            self.topics.status(),
            QoS::AtLeastOnce,
            true,
            GatewayStatus::offline_payload(),
        );
        let _ = client.try_disconnect();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(MqttEvent::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// One readable sentence for a connection error.
fn describe(e: &ConnectionError, settings: &MqttSettings) -> String {
    let raw = match e {
        ConnectionError::ConnectionRefused(code) => {
            return format!("the broker refused the connection ({code:?}); check username, password_file and client_id");
        }
        ConnectionError::Io(io) => format!("{io}"),
        ConnectionError::NetworkTimeout => {
            "no answer from the broker within the connect timeout".into()
        }
        ConnectionError::FlushTimeout => "the broker stopped reading from us".into(),
        other => other.to_string(),
    };
    // TLS trouble shows in the handshake or, for a refused client certificate under TLS 1.3,
    // only at the first read after it.
    match settings
        .tls
        .then(|| crate::mqtt::tls::explain(&raw, settings))
        .flatten()
    {
        Some(hint) => format!("TLS: {hint} ({raw})"),
        None if matches!(e, ConnectionError::Tls(_)) => format!("TLS handshake failed: {raw}"),
        None => raw,
    }
}
