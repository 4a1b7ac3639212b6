//! For operators: the control socket the command line talks to while the daemon runs, the
//! HTTP server (commissioning page and `/metrics`), the gateway's state as they read it,
//! and the clock-synchronisation check.
pub mod clock;
pub mod control;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod status;
