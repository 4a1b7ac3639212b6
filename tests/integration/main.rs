//! Integration tests against real peers.
