//! # id06d
//!
//! The gateway daemon: reader observations in, debounced taps, local decisions from the
//! blocklist, a durable outbox, and delivery over MQTT. See `docs/contract.md` for the contract.
//!
//! The pipeline, one owner per stage:
//!
//! ```text
//! readers (one task or thread each) ──ReaderMessage──▶ tap pipeline
//!     debouncer ─▶ decide (blocklist index) ─▶ outbox commit (log, fdatasync)
//!         ─▶ decisions ──▶ MQTT task ──▶ P/decision
//!         ─▶ wake      ──▶ MQTT task ──▶ P/event in seq order, outbox entry removed on PUBACK
//! ```
//!
//! The tap pipeline and the MQTT task share one thread with a runtime of its own (`run.rs`).
//!
//! The pure stages take the time as an argument, so their behaviour is a table:
//!
//! ```
//! use id06_protocol::CardUid;
//! use id06_readers::Observation;
//! use id06d::config::DebounceSettings;
//! use id06d::tap::debounce::{Debouncer, Verdict};
//!
//! let card = CardUid::parse("04A1B2C3D4E5F6").unwrap();
//! let mut d = Debouncer::new(DebounceSettings::default());
//! // A card read every 100 ms for two seconds is one tap ...
//! let taps = (0..20)
//!     .filter_map(|i| d.observe(i * 100, 0, &Observation::Card(card)).verdict)
//!     .collect::<Vec<_>>();
//! assert_eq!(taps, vec![Verdict::Tap(card)]);
//! // ... and presenting it again a second later is a duplicate, not a new tap.
//! d.observe(2500, 0, &Observation::NoCard);
//! assert_eq!(d.observe(3000, 0, &Observation::Card(card)).verdict, Some(Verdict::Duplicate(card)));
//! ```
//! Where things live:
//!
//! | folder | concern |
//! | --- | --- |
//! | [`tap`] | the tap path: reader tasks, debouncer, decision, the pipeline that records |
//! | [`storage`] | the data directory: outbox, its write-ahead log and marks, recovery, disk guard |
//! | [`lists`] | national blocklist, site list, their index, signing and MQTT sync |
//! | [`mqtt`] | broker sessions: event delivery, decisions to doors, list inputs, ledger acks, TLS |
//! | [`ops`] | for operators: control socket, metrics, clock |
//! | [`cli`] | one file per command group; `main.rs` only calls [`cli::main`] |
//!
//! [`config`] (the configuration file), [`shared`] (counters and reader states read by
//! `ops`) and [`run`] (`id06d run`: wires the above together) sit at the top.
pub mod cli;
pub mod config;
pub mod lists;
pub mod mqtt;
pub mod ops;
pub mod run;
pub mod shared;
pub mod storage;
pub mod tap;
