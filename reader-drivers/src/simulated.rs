//! A simulated reader that plays a timeline (contract §4), for the demo, tests and benchmarks.
//!
//! ```text
//! # comment
//! at 0     present 04A1B2C3D4E5F6   # from now on every poll reads this card completely
//! at 700   absent                   # no card
//! at 900   partial                  # a card is in the field but cannot be read (waving)
//! at 950   fault                    # the reader stops answering ...
//! at 3000  recover                  # ... until now
//! at 9000  end                      # the reader is done
//! ```
//!
//! Parsing and "what does the reader see at time t" are pure; [`run`] is the thin loop
//! that polls the timeline at `poll_ms` like a polling hardware driver would.

use crate::{CancellationToken, Observation, ReaderSink, Report, SinkClosed};
use id06_protocol::{CardUid, ReaderState};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// What the reader's field holds from a step on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A card that every poll reads completely.
    Present(CardUid),
    /// No card.
    Absent,
    /// A card that cannot be read.
    Partial,
    /// The reader stops answering.
    Fault,
    /// The reader answers again (the field is empty).
    Recover,
    /// The reader is done.
    End,
}

/// A parsed timeline: steps at non-decreasing times, in milliseconds from the start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Script {
    steps: Vec<(u64, Step)>,
}

/// A line of a timeline that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ScriptError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

/// What the reader sees at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A poll would return this.
    Observed(Observation),
    /// The reader is not answering.
    Faulted,
    /// The timeline has ended.
    Ended,
}

impl Script {
    /// Parses a timeline.
    pub fn parse(text: &str) -> Result<Script, ScriptError> {
        let mut steps: Vec<(u64, Step)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| ScriptError { line, message };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let words: Vec<&str> = content.split_whitespace().collect();
            if words[0] != "at" {
                return Err(err(format!(
                    "expected \"at <ms> <step>\", found {:?}",
                    words[0]
                )));
            }
            let at: u64 = words
                .get(1)
                .ok_or_else(|| err("\"at\" needs a time in milliseconds".into()))?
                .parse()
                .map_err(|_| err(format!("{:?} is not a time in milliseconds", words[1])))?;
            let verb = *words
                .get(2)
                .ok_or_else(|| err(format!("nothing happens at {at}")))?;
            let step = match verb {
                "present" => {
                    let uid_text = words.get(3..).map(|w| w.join("")).unwrap_or_default();
                    if uid_text.is_empty() {
                        return Err(err("\"present\" needs a card UID".into()));
                    }
                    let uid = CardUid::parse(&uid_text).map_err(|e| err(e.to_string()))?;
                    Step::Present(uid)
                }
                other => {
                    if words.len() > 3 {
                        return Err(err(format!("\"{other}\" takes no argument")));
                    }
                    match other {
                        "absent" => Step::Absent,
                        "partial" => Step::Partial,
                        "fault" => Step::Fault,
                        "recover" => Step::Recover,
                        "end" => Step::End,
                        _ => {
                            return Err(err(format!(
                                "unknown step {other:?}; expected present, absent, partial, fault, recover or end"
                            )))
                        }
                    }
                }
            };
            if let Some((last, last_step)) = steps.last() {
                if *last_step == Step::End {
                    return Err(err("nothing may follow \"end\"".into()));
                }
                if at < *last {
                    return Err(err(format!(
                        "time {at} is before the previous step's time {last}"
                    )));
                }
            }
            steps.push((at, step));
        }
        Ok(Script { steps })
    }

    /// Reads and parses a timeline file; errors name the file and line.
    pub fn load(path: &Path) -> Result<Script, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the timeline {}: {e}", path.display()))?;
        Script::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The steps.
    pub fn steps(&self) -> &[(u64, Step)] {
        &self.steps
    }

    /// When the timeline ends, if it does.
    pub fn end_ms(&self) -> Option<u64> {
        self.steps
            .iter()
            .find(|(_, s)| *s == Step::End)
            .map(|(t, _)| *t)
    }

    /// What a poll at `t` ms finds. Before the first step the field is empty.
    pub fn field_at(&self, t: u64) -> Field {
        let idx = self.steps.partition_point(|(at, _)| *at <= t);
        match idx.checked_sub(1).map(|i| &self.steps[i].1) {
            None | Some(Step::Absent) | Some(Step::Recover) => Field::Observed(Observation::NoCard),
            Some(Step::Present(uid)) => Field::Observed(Observation::Card(*uid)),
            Some(Step::Partial) => Field::Observed(Observation::Partial),
            Some(Step::Fault) => Field::Faulted,
            Some(Step::End) => Field::Ended,
        }
    }
}

/// Plays `script` into `sink`, polling every `poll`, until the timeline ends or `shutdown`.
pub async fn run(
    name: &str,
    script: Script,
    poll: Duration,
    sink: ReaderSink,
    shutdown: CancellationToken,
) -> Result<(), SinkClosed> {
    sink.send(Report::Device(format!("simulated reader {name}")))
        .await?;
    sink.health(ReaderState::Ok, None).await?;
    let start = Instant::now();
    let mut ticker = tokio::time::interval(poll.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut faulted = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let t = now.duration_since(start).as_millis() as u64;
        match script.field_at(t) {
            Field::Ended => {
                sink.send(Report::Finished).await?;
                return Ok(());
            }
            Field::Faulted => {
                if !faulted {
                    faulted = true;
                    sink.health(
                        ReaderState::Recovering,
                        Some("the reader stopped answering (simulated fault)".into()),
                    )
                    .await?;
                }
                sink.send_at(
                    now.into_std(),
                    Report::Observed(Observation::Fault("no answer (simulated)".into())),
                )
                .await?;
            }
            Field::Observed(observation) => {
                if faulted {
                    faulted = false;
                    sink.health(ReaderState::Ok, None).await?;
                }
                sink.send_at(now.into_std(), Report::Observed(observation))
                    .await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = "# comment
at 0     present 04A1B2C3D4E5F6   # from now on every poll reads this card completely
at 700   absent                   # no card
at 900   partial                  # a card is in the field but cannot be read (waving)
at 950   fault                    # the reader stops answering ...
at 3000  recover                  # ... until now
at 9000  end                      # the reader is done (the demo then finishes)
";

    #[test]
    fn parses_the_spec_example() {
        let s = Script::parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(s.steps().len(), 6);
        assert_eq!(s.end_ms(), Some(9000));
        let uid = CardUid::parse("04A1B2C3D4E5F6").unwrap();
        assert_eq!(s.field_at(0), Field::Observed(Observation::Card(uid)));
        assert_eq!(s.field_at(699), Field::Observed(Observation::Card(uid)));
        assert_eq!(s.field_at(700), Field::Observed(Observation::NoCard));
        assert_eq!(s.field_at(920), Field::Observed(Observation::Partial));
        assert_eq!(s.field_at(2000), Field::Faulted);
        assert_eq!(s.field_at(3000), Field::Observed(Observation::NoCard));
        assert_eq!(s.field_at(9000), Field::Ended);
    }

    #[test]
    fn field_is_empty_before_the_first_step() {
        let s = Script::parse("at 500 present DEADBEEF").unwrap();
        assert_eq!(s.field_at(0), Field::Observed(Observation::NoCard));
        assert_eq!(s.end_ms(), None);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("at 0 present\n", 1, "needs a card UID"),
            ("\n\nat x absent\n", 3, "not a time"),
            ("at 5 absent\nat 4 absent\n", 2, "before the previous"),
            ("at 0 dance\n", 1, "unknown step"),
            ("at 0 end\nat 1 absent\n", 2, "follow"),
            ("at 0 present 04ZZ\n", 1, "position"),
            ("present 04A1B2C3\n", 1, "expected"),
            ("at 0 absent now\n", 1, "takes no argument"),
        ];
        for (text, line, needle) in cases {
            let e = Script::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}");
            assert!(e.message.contains(needle), "{text:?}: {}", e.message);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn run_plays_the_timeline_and_finishes() {
        let script =
            Script::parse("at 0 present 04A1B2C3\nat 250 fault\nat 450 recover\nat 600 end")
                .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let sink = ReaderSink::new(3, tx);
        run(
            "t",
            script,
            Duration::from_millis(100),
            sink,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let mut reports = Vec::new();
        while let Ok(m) = rx.try_recv() {
            assert_eq!(m.reader, 3);
            reports.push(m.report);
        }
        let uid = CardUid::parse("04A1B2C3").unwrap();
        assert!(reports.contains(&Report::Observed(Observation::Card(uid))));
        assert!(reports.contains(&Report::Health {
            state: ReaderState::Recovering,
            error: Some("the reader stopped answering (simulated fault)".into())
        }));
        assert!(reports
            .iter()
            .any(|r| matches!(r, Report::Observed(Observation::Fault(_)))));
        assert_eq!(reports.last(), Some(&Report::Finished));
        let oks = reports
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Report::Health {
                        state: ReaderState::Ok,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(oks, 2, "ok at start and after recover: {reports:?}");
    }
}
