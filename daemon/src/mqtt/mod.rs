//! Broker sessions: event delivery in seq order (`delivery`), decisions for door
//! controllers, list inputs, ledger acknowledgements, the broker address and TLS, and the
//! one-shot publishes of the backend-side commands.
pub mod broker;
pub mod delivery;
pub mod door_session;
pub mod ledger_inbox;
pub mod list_session;
pub mod publish;
pub mod tls;

/// The packets a v5 session (decisions, lists) may have in flight. rumqttc allocates a
/// slot for every one up front (65 535 unless told, about 2.8 MB per client, again at
/// every reconnect); mosquitto's `max_inflight_messages` is 20 by default, and the smaller
/// of the two applies.
pub const V5_INFLIGHT: u16 = 64;
