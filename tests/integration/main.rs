//! Integration tests against real peers: a real mosquitto per test, the real `id06d`
//! binary, real sled databases in temporary directories. One binary, a module per area.

mod blocklist;
mod cli;
mod faults;
mod identity;
mod inputs;
mod ledger;
mod ops;
mod osdp;
mod package;
mod page;
mod pcsc;
mod pipeline;
mod schemas;
mod serial;
mod support;
mod tls;
