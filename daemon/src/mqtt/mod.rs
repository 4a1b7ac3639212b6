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
