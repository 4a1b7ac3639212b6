//! # id06d
//!
//! The gateway daemon. See `SPEC.md` for the contract and the README for an overview.
pub mod blocklist;
pub mod clock;
pub mod config;
pub mod debounce;
pub mod decide;
pub mod outbox;
pub mod readers;
pub mod store;
