//! PN532 over HSU (a UART, usually through a USB serial adapter): `kind = "pn532"`.
//!
//! - [`codec`]: the frames, sans I/O: a resynchronising decoder and the commands' encodings.
//! - [`driver`]: the thin loop over the serial port that polls for cards, recovers the chip
//!   when it locks up and reopens the device when it goes away.
//! - [`port`]: opening serial ports and listing them (shared with the line reader).
//! - `emulator` (tests and the `test-support` feature): the chip's side, on a pty.

pub mod codec;
pub mod driver;
#[cfg(any(test, feature = "test-support"))]
pub mod emulator;
pub mod port;

pub use driver::{run, Pn532Options};
pub use port::list_ports;

#[cfg(test)]
mod tests;
