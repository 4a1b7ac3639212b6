//! Stream identifiers: which run of sequence numbers an event belongs to.
//!
//! A gateway's data directory holds one *stream*: a random 128-bit identifier drawn when the
//! directory is initialised (or when the gateway cannot be sure which sequence numbers it
//! has already handed out) and never drawn again. `seq` counts within a stream from 1, so
//! `(stream, seq)` names one tap forever, also across reinstalls, new SD cards and restored
//! images. On the wire it is written as a UUID (version 4, lower-case hex with dashes).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A stream identifier: 16 random bytes, shown as a version-4 UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId([u8; 16]);

/// Why a text is not a stream identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a stream identifier (a UUID such as 0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95)")]
pub struct StreamIdError(pub String);

impl StreamId {
    /// A stream identifier from 16 random bytes; the UUID version (4) and variant bits are
    /// set, which leaves 122 random bits.
    pub fn from_random(mut bytes: [u8; 16]) -> StreamId {
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        StreamId(bytes)
    }

    /// The identifier as stored (16 bytes).
    pub fn from_bytes(bytes: [u8; 16]) -> StreamId {
        StreamId(bytes)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({self})")
    }
}

impl FromStr for StreamId {
    type Err = StreamIdError;

    /// Parses the UUID form (either case); nothing else.
    fn from_str(text: &str) -> Result<StreamId, StreamIdError> {
        let bad = || StreamIdError(text.chars().take(64).collect());
        let t = text.as_bytes();
        if t.len() != 36 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        let mut n = 0;
        let mut i = 0;
        while i < 36 {
            if matches!(i, 8 | 13 | 18 | 23) {
                if t[i] != b'-' {
                    return Err(bad());
                }
                i += 1;
                continue;
            }
            let hi = (t[i] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (t[i + 1] as char).to_digit(16).ok_or_else(bad)?;
            out[n] = (hi * 16 + lo) as u8;
            n += 1;
            i += 2;
        }
        Ok(StreamId(out))
    }
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prints_as_a_version_4_uuid() {
        let s = StreamId::from_random([0xff; 16]);
        assert_eq!(s.to_string(), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let z = StreamId::from_random([0; 16]);
        assert_eq!(z.to_string(), "00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn refuses_what_is_not_a_uuid() {
        for bad in [
            "",
            "0f9c2b7e5d414c8a9e3b2a6d1f0c7b95",
            "0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b9",
            "0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b9g",
            "0f9c2b7e+5d41-4c8a-9e3b-2a6d1f0c7b95",
            "0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95 ",
            "é0f9c2b7-5d41-4c8a-9e3b-2a6d1f0c7b9",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn text_round_trips(bytes in any::<[u8; 16]>()) {
            let s = StreamId::from_random(bytes);
            let text = s.to_string();
            prop_assert_eq!(text.parse::<StreamId>().unwrap(), s);
            prop_assert_eq!(text.to_uppercase().parse::<StreamId>().unwrap(), s);
            let json = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<StreamId>(&json).unwrap(), s);
        }

        #[test]
        fn any_text_parses_or_fails_without_panic(text in ".{0,40}") {
            let _ = text.parse::<StreamId>();
        }
    }
}
