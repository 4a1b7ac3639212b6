//! The data directory: the outbox (sled plus a write-ahead log and a mark file), what a
//! start recovers from them, the store that opens it all, the disk guard and the watcher
//! that notices a data directory replaced or removed under the daemon.
pub mod diskguard;
pub mod mark;
pub mod outbox;
pub mod recovery;
pub mod store;
pub mod wal;
pub mod watch;
