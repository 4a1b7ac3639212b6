//! Card status as ID06 defines it, and the gateway's decision about a tap.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A card's status, as the ID06 card register defines it, plus `unlisted` for a card that
/// is not on the local blocklist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardStatus {
    /// Valid and activated. Never stored on the blocklist.
    Active,
    /// Issued but never activated by its holder: it does not work yet.
    Produced,
    /// Blocked (spärrat); can be re-activated.
    Blocked,
    /// Terminated (terminerat); permanent, a new card must be ordered.
    Terminated,
    /// Stopped for an unpaid card fee; works again once paid.
    Suspended,
    /// Not on the local blocklist: passes.
    Unlisted,
}

impl CardStatus {
    /// Every status, in a fixed order (used for counters and reports).
    pub const ALL: [CardStatus; 6] = [
        CardStatus::Active,
        CardStatus::Produced,
        CardStatus::Blocked,
        CardStatus::Terminated,
        CardStatus::Suspended,
        CardStatus::Unlisted,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CardStatus::Active => "active",
            CardStatus::Produced => "produced",
            CardStatus::Blocked => "blocked",
            CardStatus::Terminated => "terminated",
            CardStatus::Suspended => "suspended",
            CardStatus::Unlisted => "unlisted",
        }
    }

    /// Whether a card with this status is held on the blocklist (every status but
    /// `active` and `unlisted`).
    pub fn is_listed(self) -> bool {
        !matches!(self, CardStatus::Active | CardStatus::Unlisted)
    }

    /// A one-byte code for compact storage; stable, never reuse a value.
    pub fn code(self) -> u8 {
        match self {
            CardStatus::Active => 0,
            CardStatus::Produced => 1,
            CardStatus::Blocked => 2,
            CardStatus::Terminated => 3,
            CardStatus::Suspended => 4,
            CardStatus::Unlisted => 5,
        }
    }

    /// The status for a code from [`CardStatus::code`].
    pub fn from_code(code: u8) -> Option<CardStatus> {
        CardStatus::ALL.get(code as usize).copied()
    }
}

impl fmt::Display for CardStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status word that is not one of ID06's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown card status {0:?}; expected one of active, produced, blocked, terminated, suspended"
)]
pub struct UnknownStatus(pub String);

impl FromStr for CardStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        CardStatus::ALL
            .iter()
            .copied()
            .find(|c| c.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// Whether the card may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The card may pass.
    Granted,
    /// The card may not pass; the event carries the reason.
    Denied,
}

/// Why a card was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The card is blocked (spärrat).
    Blocked,
    /// The card is terminated (terminerat).
    Terminated,
    /// The card is suspended for an unpaid fee.
    Suspended,
    /// The card was produced but never activated.
    NotActivated,
    /// The blocklist is older than `max_age_hours` and `when_stale = "deny"` (only on a
    /// gateway configured so).
    BlocklistStale,
    /// The card is banned from this site by the site's own list.
    SiteBanned,
    /// The gateway admits only the cards on the site's allow list, and this one is not.
    NotOnSiteList,
}

impl DenyReason {
    /// Every reason, in a fixed order (used for counters and reports).
    pub const ALL: [DenyReason; 7] = [
        DenyReason::Blocked,
        DenyReason::Terminated,
        DenyReason::Suspended,
        DenyReason::NotActivated,
        DenyReason::BlocklistStale,
        DenyReason::SiteBanned,
        DenyReason::NotOnSiteList,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Blocked => "blocked",
            DenyReason::Terminated => "terminated",
            DenyReason::Suspended => "suspended",
            DenyReason::NotActivated => "not_activated",
            DenyReason::BlocklistStale => "blocklist_stale",
            DenyReason::SiteBanned => "site_banned",
            DenyReason::NotOnSiteList => "not_on_site_list",
        }
    }
}

impl DenyReason {
    /// A short Swedish sentence for the worker at the reader (a display, the page).
    pub fn swedish(self) -> &'static str {
        match self {
            DenyReason::Blocked => "Kortet är spärrat",
            DenyReason::Terminated => "Kortet är avslutat",
            DenyReason::Suspended => "Kortet är avstängt",
            DenyReason::NotActivated => "Kortet är inte aktiverat",
            DenyReason::BlocklistStale => "Spärrlistan är för gammal",
            DenyReason::SiteBanned => "Spärrad på arbetsplatsen",
            DenyReason::NotOnSiteList => "Inte anmäld på arbetsplatsen",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which way the worker passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Checking in.
    In,
    /// Checking out.
    Out,
}

impl Direction {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    /// The other direction.
    pub fn flipped(self) -> Direction {
        match self {
            Direction::In => Direction::Out,
            Direction::Out => Direction::In,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for s in CardStatus::ALL {
            assert_eq!(CardStatus::from_code(s.code()), Some(s));
            assert_eq!(s.as_str().parse::<CardStatus>().unwrap(), s);
        }
        assert_eq!(CardStatus::from_code(200), None);
    }

    #[test]
    fn status_parse_is_case_insensitive_and_rejects_unknown_words() {
        assert_eq!(
            " Blocked ".parse::<CardStatus>().unwrap(),
            CardStatus::Blocked
        );
        assert!("spärrad".parse::<CardStatus>().is_err());
    }

    #[test]
    fn only_non_active_statuses_are_listed() {
        assert!(!CardStatus::Active.is_listed());
        assert!(!CardStatus::Unlisted.is_listed());
        assert!(CardStatus::Produced.is_listed());
        assert!(CardStatus::Blocked.is_listed());
        assert!(CardStatus::Terminated.is_listed());
        assert!(CardStatus::Suspended.is_listed());
    }
}
