//! Card UIDs: parsing, normalising and printing.

use std::fmt;
use std::str::FromStr;

/// The longest UID ISO 14443-3 defines (triple size).
pub const MAX_UID_LEN: usize = 10;

/// A card's UID: 4, 7 or 10 bytes (single, double or triple size, ISO 14443-3).
///
/// Printed as upper-case hex without separators, the one spelling used on the
/// wire and in storage. Parsing accepts the spellings people and readers use
/// (`04:a1:b2…`, `04 A1 B2 …`, `04-a1-…`) and rejects everything else.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardUid {
    len: u8,
    bytes: [u8; MAX_UID_LEN],
}

/// Why a text or a byte string is not a card UID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UidError {
    /// Nothing but separators.
    #[error("the card UID is empty")]
    Empty,
    /// A character that is neither a hex digit nor an accepted separator.
    #[error("the card UID has {found:?} at position {position}; expected hex digits (0-9, A-F)")]
    BadCharacter {
        /// The offending character.
        found: char,
        /// Its position (0-based, in characters) in the input.
        position: usize,
    },
    /// An odd number of hex digits.
    #[error("the card UID has an odd number of hex digits ({digits})")]
    OddDigits {
        /// How many hex digits there were.
        digits: usize,
    },
    /// A byte length other than 4, 7 or 10.
    #[error("the card UID is {bytes} bytes long; ID06 card UIDs are 4, 7 or 10 bytes")]
    BadLength {
        /// The length found.
        bytes: usize,
    },
}

impl CardUid {
    /// A UID from its raw bytes, as a reader returns them.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UidError> {
        match bytes.len() {
            4 | 7 | 10 => {
                let mut b = [0u8; MAX_UID_LEN];
                b[..bytes.len()].copy_from_slice(bytes);
                Ok(CardUid {
                    len: bytes.len() as u8,
                    bytes: b,
                })
            }
            0 => Err(UidError::Empty),
            n => Err(UidError::BadLength { bytes: n }),
        }
    }

    /// Parses any accepted spelling: hex digits, optionally separated by `:`, `-` or white space.
    pub fn parse(text: &str) -> Result<Self, UidError> {
        let mut buf = [0u8; MAX_UID_LEN];
        let mut digits = 0usize;
        let mut high: u8 = 0;
        for (position, c) in text.trim().chars().enumerate() {
            let nibble = match c {
                '0'..='9' => c as u8 - b'0',
                'a'..='f' => c as u8 - b'a' + 10,
                'A'..='F' => c as u8 - b'A' + 10,
                ':' | '-' | ' ' | '\t' => continue,
                found => return Err(UidError::BadCharacter { found, position }),
            };
            if digits / 2 >= MAX_UID_LEN {
                // Keep counting for the error message, but do not overflow.
                digits += 1;
                continue;
            }
            if digits % 2 == 0 {
                high = nibble;
            } else {
                buf[digits / 2] = (high << 4) | nibble;
            }
            digits += 1;
        }
        if digits == 0 {
            return Err(UidError::Empty);
        }
        if digits % 2 == 1 {
            return Err(UidError::OddDigits { digits });
        }
        let n = digits / 2;
        if n > MAX_UID_LEN {
            return Err(UidError::BadLength { bytes: n });
        }
        Self::from_bytes(&buf[..n])
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The length in bytes: 4, 7 or 10.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Always false: a UID has at least 4 bytes. Present for API completeness.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// A compact integer key, unique per UID: the length in the top byte, the bytes below.
    pub fn key(&self) -> u128 {
        let mut k: u128 = 0;
        for b in self.as_bytes() {
            k = (k << 8) | u128::from(*b);
        }
        k | (u128::from(self.len) << 120)
    }

    /// The UID back from [`CardUid::key`].
    pub fn from_key(key: u128) -> Result<Self, UidError> {
        let len = (key >> 120) as usize;
        if !matches!(len, 4 | 7 | 10) {
            return Err(UidError::BadLength { bytes: len });
        }
        let mut b = [0u8; MAX_UID_LEN];
        for (i, slot) in b[..len].iter_mut().enumerate() {
            *slot = (key >> (8 * (len - 1 - i))) as u8;
        }
        Self::from_bytes(&b[..len])
    }
}

impl fmt::Display for CardUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CardUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardUid({self})")
    }
}

impl FromStr for CardUid {
    type Err = UidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for CardUid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CardUid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        CardUid::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalises_the_spellings_people_use() {
        for text in [
            "04A1B2C3D4E5F6",
            "04a1b2c3d4e5f6",
            "04:a1:b2:c3:d4:e5:f6",
            "04 A1 B2 C3 D4 E5 F6",
            " 04-A1-B2-C3-D4-E5-F6\t",
        ] {
            assert_eq!(CardUid::parse(text).unwrap().to_string(), "04A1B2C3D4E5F6");
        }
    }

    #[test]
    fn accepts_exactly_4_7_and_10_bytes() {
        assert_eq!(CardUid::parse("DEADBEEF").unwrap().len(), 4);
        assert_eq!(CardUid::parse("04A1B2C3D4E5F6").unwrap().len(), 7);
        assert_eq!(CardUid::parse("04A1B2C3D4E5F60708A9").unwrap().len(), 10);
        assert_eq!(
            CardUid::parse("04A1B2C3D4"),
            Err(UidError::BadLength { bytes: 5 })
        );
        assert_eq!(
            CardUid::parse("04A1B2C3D4E5F60708A9BB"),
            Err(UidError::BadLength { bytes: 11 })
        );
    }

    #[test]
    fn rejects_garbage_with_the_position() {
        assert_eq!(
            CardUid::parse("04A1xB2"),
            Err(UidError::BadCharacter {
                found: 'x',
                position: 4
            })
        );
        assert_eq!(CardUid::parse("  : "), Err(UidError::Empty));
        assert_eq!(
            CardUid::parse("04A1B2C"),
            Err(UidError::OddDigits { digits: 7 })
        );
        assert!(CardUid::parse(&"A".repeat(10_000)).is_err());
    }

    #[test]
    fn serde_uses_the_canonical_spelling() {
        let uid = CardUid::parse("04:a1:b2:c3").unwrap();
        assert_eq!(serde_json::to_string(&uid).unwrap(), "\"04A1B2C3\"");
        let back: CardUid = serde_json::from_str("\"04a1b2c3\"").unwrap();
        assert_eq!(back, uid);
        assert!(serde_json::from_str::<CardUid>("\"zz\"").is_err());
    }

    proptest! {
        #[test]
        fn key_round_trips_and_is_unique(bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 4),
            proptest::collection::vec(any::<u8>(), 7),
            proptest::collection::vec(any::<u8>(), 10),
        ]) {
            let uid = CardUid::from_bytes(&bytes).unwrap();
            prop_assert_eq!(CardUid::from_key(uid.key()).unwrap(), uid);
            prop_assert_eq!(CardUid::parse(&uid.to_string()).unwrap(), uid);
        }

        #[test]
        fn parse_never_panics(text in ".{0,40}") {
            let _ = CardUid::parse(&text);
        }
    }
}
