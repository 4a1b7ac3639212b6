//! # id06d
//!
//! The gateway daemon: reader observations in, debounced taps, local decisions from the
//! blocklist, a durable outbox, and delivery over MQTT. See `SPEC.md` for the contract.
//!
//! The pipeline, one owner per stage:
//!
//! ```text
//! readers (one task or thread each) ──ReaderMessage──▶ tap pipeline thread
//!     debouncer ─▶ decide (blocklist index) ─▶ outbox commit (sled, fsync)
//!         ─▶ decisions ──▶ MQTT task ──▶ P/decision
//!         ─▶ wake      ──▶ MQTT task ──▶ P/event in seq order, outbox entry removed on PUBACK
//! ```
pub mod blocklist;
pub mod blocklist_sync;
pub mod broker;
pub mod clock;
pub mod config;
pub mod debounce;
pub mod decide;
pub mod demo;
pub mod index;
pub mod mqtt;
pub mod outbox;
pub mod pipeline;
pub mod publish;
pub mod readers;
pub mod run;
pub mod shared;
pub mod signing;
pub mod store;
