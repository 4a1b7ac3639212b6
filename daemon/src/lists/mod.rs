//! Who may pass: the national blocklist and its index, the site list, signed updates and
//! snapshots, and their sync over MQTT.
pub mod base;
pub mod blocklist;
pub mod index;
pub mod pending;
pub mod signing;
pub mod site_list;
pub mod sync;
