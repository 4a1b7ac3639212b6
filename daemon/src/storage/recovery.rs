//! What a start makes of the outbox's records: which stream to continue (or whether to
//! start a new one), the highest position ever handed out, and one clear line for every
//! record that is damaged or disagrees with the others.
//!
//! Design: a pure function of what the files held ([`Findings`] → [`Plan`]), so every
//! damage case is a table row in the tests below. The records are
//!
//! - the mark (`outbox.mark`): the exact highest position at the last checkpoint, and the
//!   stream; written twice per checkpoint, in two slots;
//! - the write-ahead log (`outbox.wal`): every commit since that checkpoint, and nothing but
//!   zeros after its last record;
//! - sled (`db/`): everything up to the last checkpoint, maybe more;
//! - the acknowledgement log (`outbox.acks`): positions the broker acknowledged since then.
//!
//! The rule: the highest position is the highest any record holds. It is *known* — and the
//! stream continues — when the mark is sound and the log is whole from it (every record that
//! does not check lies between two that do, so its positions are known too). When it is not
//! known (the log is missing, cut, or ends in bytes that are neither a record nor zeros; the
//! mark is missing or damaged; the broker acknowledged a position nobody recorded), a new
//! stream starts: `seq` begins at 1 under a new identifier, so no `(stream, seq)` can ever
//! name two taps. Events already recorded keep their stream and seq and are still delivered.

use crate::storage::mark::{MarkState, MARK_NAME};
use crate::storage::wal::{Tail, PREALLOC};
use id06_protocol::StreamId;
use std::collections::BTreeSet;

/// The log's file name (also in [`crate::storage::outbox::WAL_NAME`]).
const WAL: &str = "outbox.wal";
/// The acknowledgement log's file name.
const ACKS: &str = "outbox.acks";

/// One record of the write-ahead log, as far as recovery cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Where it starts.
    pub offset: usize,
    /// The smallest event position in it (`None`: it holds no event).
    pub first_pos: Option<u64>,
    /// The highest position handed out when it was written (`m/last_seq`).
    pub last_pos: u64,
}

/// What the write-ahead log held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFindings {
    /// The file did not exist.
    pub created: bool,
    /// Its length when found.
    pub found_len: u64,
    /// Its records, oldest first.
    pub records: Vec<LogRecord>,
    /// Their epoch.
    pub epoch: Option<u64>,
    /// Damaged stretches between good records.
    pub skipped: Vec<(usize, usize)>,
    /// What follows the last good record.
    pub tail: Tail,
}

/// What sled held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledFindings {
    /// The database holds no stream and no event (new, or only a blocklist was imported).
    pub empty: bool,
    /// The stream and base recorded in it.
    pub stream: Option<(StreamId, u64)>,
    /// The highest position in it before the log was replayed.
    pub last_pos: u64,
}

/// Everything a start found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Findings {
    /// The mark.
    pub mark: MarkState,
    /// The write-ahead log.
    pub log: LogFindings,
    /// sled.
    pub sled: SledFindings,
    /// Positions in the acknowledgement log.
    pub acks: BTreeSet<u64>,
    /// Bytes in the acknowledgement log that are not acknowledgements: `(offset, count)`.
    pub acks_unreadable: Option<(u64, u64)>,
}

/// How bad a finding is, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth a line, nothing lost.
    Info,
    /// Something was damaged; nothing recorded is lost because of it.
    Warn,
    /// Recorded taps may be lost, or a record disagrees with the others.
    Error,
}

/// Which stream new taps go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamChoice {
    /// Go on with this stream.
    Continue {
        /// Its identifier.
        stream: StreamId,
        /// Its base position.
        base: u64,
    },
    /// Start a new stream (its identifier is drawn by the caller), with its base at the
    /// highest position known.
    New {
        /// Why, in a few words.
        reason: String,
    },
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The stream.
    pub stream: StreamChoice,
    /// The highest position any record holds.
    pub highest: u64,
    /// One line each, in the order found.
    pub findings: Vec<(Severity, String)>,
}

fn seqs(stream: &StreamId, base: u64, from: u64, to: u64) -> String {
    let (a, b) = (from.saturating_sub(base), to.saturating_sub(base));
    if a == b {
        format!("seq {a} of stream {stream}")
    } else {
        format!("seqs {a}–{b} of stream {stream}")
    }
}

fn acked_in(acks: &BTreeSet<u64>, from: u64, to: u64) -> usize {
    acks.range(from..=to).count()
}

/// Decides, from what a start found, which stream to continue and what to say.
pub fn plan(f: &Findings) -> Plan {
    let mut findings: Vec<(Severity, String)> = Vec::new();
    let mut uncertain: Vec<String> = Vec::new();
    let log_last = f.log.records.iter().map(|r| r.last_pos).max().unwrap_or(0);
    let acks_last = f.acks.iter().next_back().copied().unwrap_or(0);
    let mark = match &f.mark {
        MarkState::Found { mark, note } => {
            if let Some(n) = note {
                findings.push((Severity::Warn, n.clone()));
            }
            Some(*mark)
        }
        MarkState::Damaged(why) => {
            findings.push((
                Severity::Error,
                format!(
                    "{why}: which seqs were handed out since the last checkpoint cannot be checked"
                ),
            ));
            uncertain.push(format!("{MARK_NAME} is damaged"));
            None
        }
        MarkState::Missing => None,
    };
    let mark_last = mark.map_or(0, |m| m.last_pos);
    let highest = [f.sled.last_pos, log_last, acks_last, mark_last]
        .into_iter()
        .max()
        .unwrap_or(0);
    // The stream as the records know it, for naming seqs in the lines below.
    let (known_stream, base) = match (mark, f.sled.stream) {
        (Some(m), _) => (Some(m.stream), m.base),
        (None, Some((s, b))) => (Some(s), b),
        (None, None) => (None, 0),
    };
    let name = |from: u64, to: u64| match known_stream {
        Some(s) => seqs(&s, base, from, to),
        None => format!("positions {from}–{to}"),
    };

    let untouched = f.sled.empty
        && f.log.created
        && f.log.records.is_empty()
        && f.acks.is_empty()
        && f.acks_unreadable.is_none();
    if matches!(f.mark, MarkState::Missing) {
        if untouched {
            return Plan {
                stream: StreamChoice::New {
                    reason: "a new data directory".into(),
                },
                highest,
                findings,
            };
        }
        findings.push((
            Severity::Error,
            format!("{MARK_NAME} is missing from a data directory that holds an outbox: which seqs were handed out cannot be checked"),
        ));
        uncertain.push(format!("{MARK_NAME} is missing"));
    }

    if let Some(m) = mark {
        match f.sled.stream {
            Some((s, _)) if s != m.stream => {
                findings.push((
                    Severity::Error,
                    format!("the database in db/ belongs to stream {s}, but {MARK_NAME} to stream {}: they come from different data directories", m.stream),
                ));
                uncertain.push("the database and the mark disagree".into());
            }
            None if f.sled.empty => findings.push((
                Severity::Error,
                format!(
                    "the database in db/ holds no outbox, but {MARK_NAME} says stream {} reached seq {} at its last checkpoint: the database was removed or replaced; the recorded taps up to then are gone from the archive (those not yet delivered are lost); the stream goes on",
                    m.stream,
                    m.last_pos.saturating_sub(m.base)
                ),
            )),
            _ if f.sled.last_pos < m.last_pos => findings.push((
                Severity::Error,
                format!(
                    "the database in db/ ends at seq {} but {MARK_NAME} says {} were recorded at its last checkpoint: {} are gone from the database (damaged files?); those not yet delivered are lost; the stream goes on from the mark",
                    f.sled.last_pos.saturating_sub(m.base),
                    m.last_pos.saturating_sub(m.base),
                    name(f.sled.last_pos + 1, m.last_pos)
                ),
            )),
            _ => {}
        }
    }

    // The write-ahead log.
    if mark.is_some() || !matches!(f.mark, MarkState::Missing) {
        if f.log.created {
            findings.push((
                Severity::Error,
                format!(
                    "{WAL} is missing: taps recorded after {} (the last checkpoint) may be lost",
                    name(mark_last, mark_last)
                ),
            ));
            uncertain.push(format!("{WAL} is missing"));
        } else if f.log.found_len < PREALLOC {
            findings.push((
                Severity::Error,
                format!(
                    "{WAL} was cut to {} bytes (it is always {} bytes): taps recorded after {} (the last checkpoint) may be lost",
                    f.log.found_len,
                    PREALLOC,
                    name(mark_last.max(log_last), mark_last.max(log_last))
                ),
            ));
            uncertain.push(format!("{WAL} was cut short"));
        }
    }
    let stale = mark.is_some_and(|m| {
        m.prev_epoch != 0 && f.log.epoch == Some(m.prev_epoch) && f.log.epoch != Some(m.epoch)
    });
    for (from, to) in &f.log.skipped {
        let before = f
            .log
            .records
            .iter()
            .filter(|r| r.offset < *from)
            .map(|r| r.last_pos)
            .max()
            .unwrap_or(mark_last);
        let after = f
            .log
            .records
            .iter()
            .find(|r| r.offset >= *to)
            .and_then(|r| r.first_pos);
        match after {
            Some(next) if next > before + 1 => {
                let (lo, hi) = (before + 1, next - 1);
                let (acked, count) = (acked_in(&f.acks, lo, hi) as u64, hi - lo + 1);
                let fate = if acked == count {
                    "all of them acknowledged by the broker before, so none is lost".to_string()
                } else {
                    format!(
                        "{} of them not yet acknowledged by the broker and lost",
                        count - acked
                    )
                };
                findings.push((
                    Severity::Error,
                    format!(
                        "{WAL}: bytes {from}–{to} are damaged; they held {} ({fate}); the records after them are kept",
                        name(lo, hi),
                    ),
                ));
            }
            _ => findings.push((
                Severity::Warn,
                format!("{WAL}: bytes {from}–{to} are damaged; they held no tap that the records around them do not (nothing lost)"),
            )),
        }
    }
    if let Tail::Unreadable(at) = f.log.tail {
        if stale {
            findings.push((
                Severity::Info,
                format!("{WAL}: an emptying of the log was cut short at byte {at}; what it held was already in the database"),
            ));
        } else if !f.log.created && f.log.found_len >= PREALLOC {
            let after = log_last.max(mark_last);
            findings.push((
                Severity::Error,
                format!(
                    "{WAL}: the bytes from {at} are neither a record nor zeros (a commit cut short by a power cut, or damage): taps recorded after {} may be lost",
                    name(after, after)
                ),
            ));
            uncertain.push(format!("{WAL} ends in unreadable bytes"));
        }
    }

    // The acknowledgement log.
    if let Some((at, n)) = f.acks_unreadable {
        findings.push((
            Severity::Warn,
            format!("{ACKS}: {n} bytes from byte {at} are not acknowledgements (damaged or cut short); events the broker acknowledged since the last checkpoint may be delivered again, with the same event_id"),
        ));
    }
    let recorded = f.sled.last_pos.max(log_last).max(mark_last);
    if acks_last > recorded {
        findings.push((
            Severity::Error,
            format!(
                "{ACKS} holds acknowledgements up to position {acks_last}, beyond the last recorded one ({recorded}): records of the log were lost"
            ),
        ));
        uncertain.push(format!("{ACKS} knows more than the log"));
    }

    let stream = match (uncertain.is_empty(), mark, f.sled.stream) {
        (true, Some(m), _) => StreamChoice::Continue {
            stream: m.stream,
            base: m.base,
        },
        (true, None, Some((s, b))) => StreamChoice::Continue { stream: s, base: b },
        _ => StreamChoice::New {
            reason: if uncertain.is_empty() {
                "no stream was recorded".into()
            } else {
                uncertain.join("; ")
            },
        },
    };
    Plan {
        stream,
        highest,
        findings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mark::Mark;

    fn stream() -> StreamId {
        StreamId::from_random([9; 16])
    }

    fn mark(last_pos: u64) -> Mark {
        Mark {
            stream: stream(),
            base: 0,
            last_pos,
            epoch: 77,
            prev_epoch: 76,
        }
    }

    fn rec(offset: usize, first: u64, last: u64) -> LogRecord {
        LogRecord {
            offset,
            first_pos: Some(first),
            last_pos: last,
        }
    }

    /// A sound directory after `kill -9`: checkpoint at 43, the log holds 44–57.
    fn sound() -> Findings {
        Findings {
            mark: MarkState::Found {
                mark: mark(43),
                note: None,
            },
            log: LogFindings {
                created: false,
                found_len: PREALLOC,
                records: vec![rec(0, 44, 50), rec(900, 51, 57)],
                epoch: Some(77),
                skipped: vec![],
                tail: Tail::Clean,
            },
            sled: SledFindings {
                empty: false,
                stream: Some((stream(), 0)),
                last_pos: 43,
            },
            acks: (44..=48).collect(),
            acks_unreadable: None,
        }
    }

    fn continues(p: &Plan) -> bool {
        matches!(p.stream, StreamChoice::Continue { .. })
    }

    fn says(p: &Plan, severity: Severity, words: &str) -> bool {
        p.findings
            .iter()
            .any(|(s, m)| *s == severity && m.contains(words))
    }

    #[test]
    fn a_sound_directory_continues_its_stream_silently() {
        let p = plan(&sound());
        assert!(continues(&p));
        assert_eq!(p.highest, 57);
        assert!(p.findings.is_empty(), "{:?}", p.findings);
    }

    #[test]
    fn a_new_directory_starts_a_stream() {
        let f = Findings {
            mark: MarkState::Missing,
            log: LogFindings {
                created: true,
                found_len: 0,
                records: vec![],
                epoch: None,
                skipped: vec![],
                tail: Tail::Clean,
            },
            sled: SledFindings {
                empty: true,
                stream: None,
                last_pos: 0,
            },
            acks: BTreeSet::new(),
            acks_unreadable: None,
        };
        let p = plan(&f);
        assert_eq!(
            p.stream,
            StreamChoice::New {
                reason: "a new data directory".into()
            }
        );
        assert_eq!(p.highest, 0);
        assert!(p.findings.is_empty());
    }

    #[test]
    fn a_damaged_first_record_is_named_and_the_stream_goes_on() {
        let mut f = sound();
        f.log.records = vec![rec(900, 51, 57)];
        f.log.skipped = vec![(0, 900)];
        let p = plan(&f);
        assert!(continues(&p), "the positions of the lost record are known");
        assert_eq!(p.highest, 57);
        assert!(says(&p, Severity::Error, "seqs 44–50 of stream"));
        assert!(says(&p, Severity::Error, "2 of them not yet acknowledged"));
    }

    #[test]
    fn a_log_cut_to_nothing_starts_a_new_stream_above_every_known_position() {
        let mut f = sound();
        f.log.found_len = 0;
        f.log.records.clear();
        let p = plan(&f);
        assert!(matches!(&p.stream, StreamChoice::New { reason } if reason.contains("cut short")));
        assert_eq!(p.highest, 48, "the acknowledgements say 48 was handed out");
        assert!(says(&p, Severity::Error, "was cut to 0 bytes"));
    }

    #[test]
    fn an_unreadable_end_of_the_log_starts_a_new_stream() {
        let mut f = sound();
        f.log.tail = Tail::Unreadable(1400);
        let p = plan(&f);
        assert!(!continues(&p));
        assert!(says(&p, Severity::Error, "neither a record nor zeros"));
        assert!(says(&p, Severity::Error, "after seq 57 of stream"));
    }

    #[test]
    fn a_log_left_by_a_checkpoint_cut_short_is_not_damage() {
        let mut f = sound();
        f.log.epoch = Some(76);
        f.log.records = vec![rec(0, 40, 43)];
        f.log.tail = Tail::Unreadable(300);
        f.acks.clear();
        let p = plan(&f);
        assert!(continues(&p));
        assert!(says(&p, Severity::Info, "already in the database"));
    }

    #[test]
    fn garbage_in_the_acknowledgement_log_is_said_and_changes_nothing_else() {
        let mut f = sound();
        f.acks.clear();
        f.acks_unreadable = Some((0, 4096));
        let p = plan(&f);
        assert!(continues(&p));
        assert!(says(&p, Severity::Warn, "outbox.acks: 4096 bytes"));
    }

    #[test]
    fn acknowledgements_beyond_every_record_start_a_new_stream() {
        let mut f = sound();
        f.log.records = vec![rec(0, 44, 50)];
        f.acks = (44..=55).collect();
        let p = plan(&f);
        assert!(!continues(&p));
        assert_eq!(p.highest, 55);
        assert!(says(&p, Severity::Error, "beyond the last recorded one"));
    }

    #[test]
    fn a_database_that_lost_its_end_is_named_and_the_stream_goes_on_from_the_mark() {
        // A clean stop at 57, then 4 KiB of sled's file overwritten: sled says 29.
        let mut f = sound();
        f.mark = MarkState::Found {
            mark: mark(57),
            note: None,
        };
        f.log.records.clear();
        f.acks.clear();
        f.sled.last_pos = 29;
        let p = plan(&f);
        assert!(continues(&p));
        assert_eq!(p.highest, 57);
        assert!(says(&p, Severity::Error, "seqs 30–57 of stream"));
    }

    #[test]
    fn a_removed_database_with_the_log_kept_goes_on_with_the_marks_stream() {
        let mut f = sound();
        f.sled = SledFindings {
            empty: true,
            stream: None,
            last_pos: 0,
        };
        let p = plan(&f);
        assert_eq!(
            p.stream,
            StreamChoice::Continue {
                stream: stream(),
                base: 0
            }
        );
        assert_eq!(p.highest, 57);
        assert!(says(
            &p,
            Severity::Error,
            "the database in db/ holds no outbox"
        ));
    }

    #[test]
    fn a_missing_or_damaged_mark_or_a_foreign_database_starts_a_new_stream() {
        let mut f = sound();
        f.mark = MarkState::Missing;
        assert!(!continues(&plan(&f)));
        f.mark = MarkState::Damaged("outbox.mark holds no valid copy".into());
        let p = plan(&f);
        assert!(!continues(&p));
        assert!(says(&p, Severity::Error, "outbox.mark holds no valid copy"));
        let mut f = sound();
        f.sled.stream = Some((StreamId::from_random([1; 16]), 0));
        assert!(!continues(&plan(&f)));
    }

    #[test]
    fn a_missing_log_starts_a_new_stream() {
        let mut f = sound();
        f.log.created = true;
        f.log.found_len = 0;
        f.log.records.clear();
        let p = plan(&f);
        assert!(!continues(&p));
        assert!(says(&p, Severity::Error, "outbox.wal is missing"));
    }
}
