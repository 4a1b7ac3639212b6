//! The decision for a tap (contract §5) and the direction of a `toggle` reader's tap (contract §4).
//! Pure functions: the blocklist lookup and the clock are the caller's.

use crate::config::{AccessMode, WhenStale};
use crate::lists::site_list::SiteEntry;
use id06_protocol::{CardStatus, Decision, DenyReason, Direction};

/// A decision with what it was based on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ruling {
    /// The card's status: its blocklist entry, or `unlisted`.
    pub card_status: CardStatus,
    /// Granted or denied.
    pub decision: Decision,
    /// Why denied.
    pub reason: Option<DenyReason>,
}

/// Decides a tap from the card's blocklist entry (`None`: not on the list) and whether the
/// list is stale, at a site without a list of its own.
pub fn decide(listed: Option<CardStatus>, stale: bool, when_stale: WhenStale) -> Ruling {
    decide_at_site(listed, None, AccessMode::Open, stale, when_stale)
}

/// Decides a tap from the card's national blocklist entry, its entry on the site's own list
/// and the site's access mode. The ID06 status comes first (a card the national list denies
/// is denied whatever the site says); then a site ban; then, in `site_list` mode, a card
/// the site has not allowed; then a stale list with `when_stale = "deny"`.
pub fn decide_at_site(
    listed: Option<CardStatus>,
    site: Option<SiteEntry>,
    mode: AccessMode,
    stale: bool,
    when_stale: WhenStale,
) -> Ruling {
    let card_status = listed.unwrap_or(CardStatus::Unlisted);
    let denied = |reason| Ruling {
        card_status,
        decision: Decision::Denied,
        reason: Some(reason),
    };
    match card_status {
        CardStatus::Blocked => denied(DenyReason::Blocked),
        CardStatus::Terminated => denied(DenyReason::Terminated),
        CardStatus::Suspended => denied(DenyReason::Suspended),
        CardStatus::Produced => denied(DenyReason::NotActivated),
        CardStatus::Active | CardStatus::Unlisted => {
            if site == Some(SiteEntry::Ban) {
                denied(DenyReason::SiteBanned)
            } else if mode == AccessMode::SiteList && site != Some(SiteEntry::Allow) {
                denied(DenyReason::NotOnSiteList)
            } else if stale && when_stale == WhenStale::Deny {
                denied(DenyReason::BlocklistStale)
            } else {
                Ruling {
                    card_status,
                    decision: Decision::Granted,
                    reason: None,
                }
            }
        }
    }
}

/// After this long since a card's last tap at this terminal, a toggle tap is `in` again.
pub const TOGGLE_RESET_MS: i64 = 12 * 3600 * 1000;

/// A toggle reader's direction for a card, from the card's last recorded tap at this
/// terminal (`(direction, wall-clock ms)`), at wall-clock time `now_ms`.
pub fn toggle_direction(last: Option<(Direction, i64)>, now_ms: i64) -> Direction {
    match last {
        None => Direction::In,
        Some((_, at)) if now_ms.saturating_sub(at) > TOGGLE_RESET_MS => Direction::In,
        Some((dir, _)) => dir.flipped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_list_applies_after_the_national_status() {
        use AccessMode::{Open, SiteList};
        use SiteEntry::{Allow, Ban};
        let allow = WhenStale::Allow;
        let reason = |listed, site, mode, stale, when| {
            decide_at_site(listed, site, mode, stale, when).reason
        };
        // The ID06 status first: an allowed card that is terminated stays out.
        assert_eq!(
            reason(
                Some(CardStatus::Terminated),
                Some(Allow),
                SiteList,
                false,
                allow
            ),
            Some(DenyReason::Terminated)
        );
        assert_eq!(
            reason(None, Some(Ban), Open, false, allow),
            Some(DenyReason::SiteBanned)
        );
        assert_eq!(
            reason(None, Some(Ban), SiteList, false, allow),
            Some(DenyReason::SiteBanned)
        );
        assert_eq!(
            reason(None, None, SiteList, false, allow),
            Some(DenyReason::NotOnSiteList)
        );
        assert_eq!(reason(None, Some(Allow), SiteList, false, allow), None);
        assert_eq!(
            reason(Some(CardStatus::Active), None, Open, false, allow),
            None
        );
        assert_eq!(
            reason(None, Some(Allow), SiteList, true, WhenStale::Deny),
            Some(DenyReason::BlocklistStale)
        );
        assert_eq!(
            decide_at_site(None, Some(Ban), Open, false, allow).card_status,
            CardStatus::Unlisted,
            "card_status stays the national status"
        );
    }

    #[test]
    fn decisions_follow_the_spec_table() {
        use CardStatus::*;
        let table = [
            (None, Unlisted, Decision::Granted, None),
            (Some(Active), Active, Decision::Granted, None),
            (
                Some(Blocked),
                Blocked,
                Decision::Denied,
                Some(DenyReason::Blocked),
            ),
            (
                Some(Terminated),
                Terminated,
                Decision::Denied,
                Some(DenyReason::Terminated),
            ),
            (
                Some(Suspended),
                Suspended,
                Decision::Denied,
                Some(DenyReason::Suspended),
            ),
            (
                Some(Produced),
                Produced,
                Decision::Denied,
                Some(DenyReason::NotActivated),
            ),
        ];
        for (listed, status, decision, reason) in table {
            for when_stale in [WhenStale::Allow, WhenStale::Deny] {
                let r = decide(listed, false, when_stale);
                assert_eq!(
                    (r.card_status, r.decision, r.reason),
                    (status, decision, reason)
                );
            }
        }
    }

    #[test]
    fn a_stale_list_applies_when_stale() {
        let allow = decide(None, true, WhenStale::Allow);
        assert_eq!(allow.decision, Decision::Granted);
        let deny = decide(None, true, WhenStale::Deny);
        assert_eq!(deny.decision, Decision::Denied);
        assert_eq!(deny.reason, Some(DenyReason::BlocklistStale));
        // A listed card keeps its own reason.
        let blocked = decide(Some(CardStatus::Blocked), true, WhenStale::Deny);
        assert_eq!(blocked.reason, Some(DenyReason::Blocked));
    }

    #[test]
    fn toggle_alternates_and_resets_after_twelve_hours() {
        assert_eq!(toggle_direction(None, 0), Direction::In);
        assert_eq!(
            toggle_direction(Some((Direction::In, 0)), 1000),
            Direction::Out
        );
        assert_eq!(
            toggle_direction(Some((Direction::Out, 0)), 1000),
            Direction::In
        );
        assert_eq!(
            toggle_direction(Some((Direction::In, 0)), TOGGLE_RESET_MS),
            Direction::Out
        );
        assert_eq!(
            toggle_direction(Some((Direction::In, 0)), TOGGLE_RESET_MS + 1),
            Direction::In
        );
    }
}
