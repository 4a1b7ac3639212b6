//! For operators: the control socket the command line talks to while the daemon runs,
//! the metrics endpoint, and the clock-synchronisation check.
pub mod clock;
pub mod control;
pub mod metrics;
