//! # id06d
//!
//! The gateway daemon. See `SPEC.md` for the contract and the README for an overview.
pub mod config;
pub mod readers;
