//! # id06-protocol
//!
//! The wire types of id06d, the gateway between ID06 card readers at a construction-site
//! entrance and the electronic personnel ledger: card UIDs, card status, the decision, the
//! tap event (`id06d/event/v1`), the MQTT topics, the retained status payloads and the
//! blocklist update (`id06d/blocklist-update/v1`). No I/O, no async: everything here is
//! plain data and its (de)serialisation, shared by the daemon, its tools and its tests.
//!
//! ```
//! use id06_protocol::{CardUid, Topics};
//!
//! // Readers and people spell UIDs in many ways; there is one canonical form.
//! let uid = CardUid::parse("04:a1:b2:c3:d4:e5:f6").unwrap();
//! assert_eq!(uid.to_string(), "04A1B2C3D4E5F6");
//!
//! let topics = Topics::new("id06/v1", "SE-0001", "gate-north-1");
//! assert_eq!(topics.event(), "id06/v1/SE-0001/gate-north-1/event");
//! ```
#![deny(missing_docs)]

pub mod blocklist;
mod card;
mod event;
mod status;
mod stream;
mod topics;
mod uid;

pub use blocklist::{
    BlocklistUpdate, SetEntry, SnapshotChunk, SnapshotManifest, UpdateError, CARDS_PER_CHUNK,
    SNAPSHOT_SCHEMA, UPDATE_SCHEMA,
};
pub use card::{CardStatus, Decision, DenyReason, Direction, UnknownStatus};
pub use event::{Event, EventSchema, UtcMillis, EVENT_SCHEMA};
pub use status::{GatewayStatus, Hint, ReaderState, ReaderStatus};
pub use stream::{StreamId, StreamIdError};
pub use topics::{is_valid_topic_level, Topics, DEFAULT_TOPIC_PREFIX};
pub use uid::{CardUid, UidError, MAX_UID_LEN};
