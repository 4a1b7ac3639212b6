//! MQTT topic names (contract §7).

/// The topic prefix used when the configuration names none.
pub const DEFAULT_TOPIC_PREFIX: &str = "id06/v1";

/// The topics of one gateway: `P = {prefix}/{site_id}/{terminal_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    base: String,
}

impl Topics {
    /// Topics for a prefix, site and terminal.
    pub fn new(prefix: &str, site_id: &str, terminal_id: &str) -> Topics {
        let prefix = prefix.trim_end_matches('/').to_string();
        let base = format!("{prefix}/{site_id}/{terminal_id}");
        Topics { prefix, base }
    }

    /// `P/event`: events from the durable outbox, in `seq` order.
    pub fn event(&self) -> String {
        format!("{}/event", self.base)
    }

    /// `P/decision`: each event the moment it is durable, for door controllers.
    pub fn decision(&self) -> String {
        format!("{}/decision", self.base)
    }

    /// `P/status`: retained gateway status; the last will says offline.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// `P/reader/{name}`: retained reader state.
    pub fn reader(&self, name: &str) -> String {
        format!("{}/reader/{name}", self.base)
    }

    /// `P/ack`: the ledger confirms what it stored (`{"stream", "seq"}`).
    pub fn ack(&self) -> String {
        format!("{}/ack", self.base)
    }

    /// `P/replay`: the ledger asks for a range of events again.
    pub fn replay(&self) -> String {
        format!("{}/replay", self.base)
    }

    /// `P/replay/result`: what a replay sent and which seqs are no longer kept.
    pub fn replay_result(&self) -> String {
        format!("{}/replay/result", self.base)
    }

    /// `{prefix}/blocklist/update`: incremental blocklist updates.
    pub fn blocklist_update(&self) -> String {
        format!("{}/blocklist/update", self.prefix)
    }

    /// `{prefix}/blocklist/snapshot`: the retained full blocklist.
    pub fn blocklist_snapshot(&self) -> String {
        format!("{}/blocklist/snapshot", self.prefix)
    }
}

/// Whether a name may appear as one MQTT topic level: not empty, and free of
/// `/`, the wildcards `+` and `#`, and control characters.
pub fn is_valid_topic_level(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name
            .chars()
            .any(|c| c == '/' || c == '+' || c == '#' || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_spec_topics() {
        let t = Topics::new("id06/v1/", "SE-0001", "gate-north-1");
        assert_eq!(t.event(), "id06/v1/SE-0001/gate-north-1/event");
        assert_eq!(t.decision(), "id06/v1/SE-0001/gate-north-1/decision");
        assert_eq!(t.status(), "id06/v1/SE-0001/gate-north-1/status");
        assert_eq!(
            t.reader("entry"),
            "id06/v1/SE-0001/gate-north-1/reader/entry"
        );
        assert_eq!(t.blocklist_update(), "id06/v1/blocklist/update");
        assert_eq!(t.blocklist_snapshot(), "id06/v1/blocklist/snapshot");
    }

    #[test]
    fn topic_levels_refuse_wildcards_and_separators() {
        assert!(is_valid_topic_level("gate-north-1"));
        for bad in ["", "a/b", "a+", "#", "x\u{0}"] {
            assert!(!is_valid_topic_level(bad), "{bad:?}");
        }
    }
}
