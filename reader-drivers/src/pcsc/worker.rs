//! The PC/SC worker: the blocking loop on the reader's own OS thread.

use super::apdu::{self, GetData};
use super::{guarded, PcscError, PcscOptions, Shared};
use crate::{Observation, ReaderSink, Report, SinkClosed};
use id06_protocol::{CardUid, ReaderState};
use pcsc::{
    Card, Context, Disposition, Protocols, ReaderState as Watched, Scope, ShareMode, State,
};
use std::ffi::{CStr, CString};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why watching stopped.
enum End {
    /// Shutdown.
    Stop,
    /// The context is unusable (pcscd went away, a call overran): start over.
    Lost(PcscError),
}

/// Why watching one reader stopped.
enum ReaderEnd {
    /// The reader is no longer listed.
    Gone,
    /// As for the whole session.
    End(End),
}

/// The outcome of one attempt to read the card in the field.
enum Read {
    Uid(CardUid),
    Failed(String),
    Lost(PcscError),
}

/// What the debouncer was last told about the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Nothing,
    Empty,
    Card,
    Failing,
}

pub(super) struct Worker {
    options: PcscOptions,
    sink: ReaderSink,
    shared: Arc<Shared>,
    /// The reader name last reported as the device.
    device: Option<String>,
    /// Whether the reader has been `ok` since start (before that, trouble is `absent`).
    ever_ok: bool,
    /// Since when the driver is recovering from a lost service.
    recovering_since: Option<Instant>,
    /// LED and buzzer of an ACR122U-style reader.
    feedback: Option<super::PcscFeedback>,
}

impl Worker {
    pub(super) fn new(options: PcscOptions, sink: ReaderSink, shared: Arc<Shared>) -> Worker {
        Worker {
            options,
            sink,
            shared,
            device: None,
            ever_ok: false,
            recovering_since: None,
            feedback: None,
        }
    }

    pub(super) fn with_feedback(mut self, feedback: Option<super::PcscFeedback>) -> Worker {
        self.feedback = feedback;
        self
    }

    /// Sends the signals waiting for this reader as ACR122U pseudo-APDUs over the card's
    /// connection (dropped when no card is connected: the worker has left the gate).
    fn give_feedback(&self, reader: &CStr, card: Option<&Card>) {
        let Some(f) = &self.feedback else { return };
        let signals: Vec<crate::feedback::Signal> = {
            let rx = f.signals.lock().unwrap_or_else(|e| e.into_inner());
            std::iter::from_fn(|| rx.try_recv().map(|(_, s)| s)).collect()
        };
        if signals.is_empty() {
            return;
        }
        let acr122 = f.force || reader.to_string_lossy().contains("ACR122");
        let Some(card) = card.filter(|_| acr122) else {
            return;
        };
        for signal in signals {
            let Some(apdu) = apdu::acr122_led_buzzer(&signal) else {
                continue;
            };
            let mut buffer = [0u8; 8];
            if let Err(e) = guarded("the reader's LED and buzzer", || {
                card.transmit(&apdu, &mut buffer).map(|r| r.to_vec())
            }) {
                tracing::debug!(error = %e, "LED and buzzer command failed");
            }
        }
    }

    /// The loop: context, session, recovery, until shutdown or the sink closes.
    pub(super) fn run(mut self) -> Result<(), SinkClosed> {
        let mut backoff = self.options.backoff_min;
        loop {
            if self.shared.stopping() {
                return Ok(());
            }
            let established = self.call("connecting to pcscd", Duration::ZERO, || {
                Context::establish(Scope::User)
            });
            let context = match established {
                Ok(c) => c,
                Err(e) => {
                    self.service_trouble(&e)?;
                    if !self.shared.pause(backoff) {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(self.options.backoff_max);
                    continue;
                }
            };
            *self.lock_context() = Some(context.clone());
            let end = if self.shared.stopping() {
                End::Stop
            } else {
                self.session(&context, &mut backoff)?
            };
            *self.lock_context() = None;
            // Release explicitly (a dead pcscd makes this fail, which is fine).
            let _ = guarded("releasing the context", || {
                context.release().map_err(|(_, e)| e)
            });
            match end {
                End::Stop => return Ok(()),
                End::Lost(e) => {
                    self.service_trouble(&e)?;
                    if !self.shared.pause(backoff) {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(self.options.backoff_max);
                }
            }
        }
    }

    fn lock_context(&self) -> std::sync::MutexGuard<'_, Option<Context>> {
        self.shared
            .context
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// One context: find the reader, watch it, look again when it goes.
    fn session(&mut self, context: &Context, backoff: &mut Duration) -> Result<End, SinkClosed> {
        // Kept across iterations so that pcscd knows the reader count we saw.
        let mut pnp = [Watched::new(pcsc::PNP_NOTIFICATION(), State::UNAWARE)];
        loop {
            if self.shared.stopping() {
                return Ok(End::Stop);
            }
            let names = match self.list(context) {
                Ok(names) => names,
                Err(e) if e.needs_new_context() => return Ok(End::Lost(e)),
                Err(e) => {
                    tracing::debug!(error = %e, "listing PC/SC readers failed");
                    Vec::new()
                }
            };
            let found = names
                .iter()
                .find(|n| n.to_string_lossy().contains(&self.options.pattern))
                .cloned();
            let Some(reader) = found else {
                self.no_reader(&names)?;
                let slice = self.options.wait_slice;
                match self.call("waiting for readers", slice, || {
                    context.get_status_change(slice, &mut pnp)
                }) {
                    Ok(()) => pnp[0].sync_current_state(),
                    Err(e) if e.needs_new_context() => return Ok(End::Lost(e)),
                    Err(e) if e.code() == Some(pcsc::Error::Timeout) => {}
                    Err(e) if e.code() == Some(pcsc::Error::Cancelled) => {}
                    Err(e) => {
                        // Without PnP support this fails at once: wait without it.
                        tracing::debug!(error = %e, "waiting for PC/SC readers failed");
                        if !self.shared.pause(slice) {
                            return Ok(End::Stop);
                        }
                    }
                }
                continue;
            };
            let reader_name = reader.to_string_lossy().into_owned();
            if self.device.as_deref() != Some(&reader_name) {
                self.device = Some(reader_name.clone());
                self.sink.blocking_send(Report::Device(reader_name))?;
            }
            self.health(ReaderState::Ok, None)?;
            self.ever_ok = true;
            self.recovering_since = None;
            *backoff = self.options.backoff_min;
            match self.watch(context, &reader)? {
                ReaderEnd::Gone => {
                    // Unplugged: the next listing decides between absent and another reader.
                    continue;
                }
                ReaderEnd::End(end) => return Ok(end),
            }
        }
    }

    /// Watches `reader` until it goes away, the context is lost or shutdown.
    fn watch(&mut self, context: &Context, reader: &CStr) -> Result<ReaderEnd, SinkClosed> {
        let mut watched = [Watched::new(reader.to_owned(), State::UNAWARE)];
        let mut card: Option<Card> = None;
        let mut told = Told::Nothing;
        let mut next_read: Option<Instant> = None;
        let mut last_count: Option<u32> = None;
        // Failed reads of the card now in the field, and when to reset it next.
        let mut failures = 0u32;
        let mut reset_at = self.options.reset_after.max(1);
        loop {
            if self.shared.stopping() {
                forget_card(&mut card);
                return Ok(ReaderEnd::End(End::Stop));
            }
            let timeout = match next_read {
                Some(at) => at
                    .saturating_duration_since(Instant::now())
                    .min(self.options.wait_slice),
                None => self.options.wait_slice,
            };
            match self.call("waiting for a card", timeout, || {
                context.get_status_change(timeout, &mut watched)
            }) {
                Ok(()) => {}
                Err(e) if e.needs_new_context() => return lost(&mut card, e),
                Err(e) => match e.code() {
                    Some(pcsc::Error::Timeout) | Some(pcsc::Error::Cancelled) => {}
                    Some(pcsc::Error::UnknownReader) | Some(pcsc::Error::ReaderUnavailable) => {
                        forget_card(&mut card);
                        return Ok(ReaderEnd::Gone);
                    }
                    _ => {
                        tracing::debug!(error = %e, "waiting for a card failed");
                        if !self.shared.pause(self.options.wait_slice) {
                            forget_card(&mut card);
                            return Ok(ReaderEnd::End(End::Stop));
                        }
                        continue;
                    }
                },
            }
            if self.shared.stopping() {
                continue;
            }
            self.give_feedback(reader, card.as_ref());
            let state = watched[0].event_state();
            let count = watched[0].event_count();
            watched[0].sync_current_state();
            if state.intersects(State::UNKNOWN | State::UNAVAILABLE) {
                forget_card(&mut card);
                return Ok(ReaderEnd::Gone);
            }
            // pcsc-lite 1.9.9's notifications are unreliable: look at the list every time.
            match self.list(context) {
                Ok(names) if !names.iter().any(|n| n.as_c_str() == reader) => {
                    forget_card(&mut card);
                    return Ok(ReaderEnd::Gone);
                }
                Ok(_) => {}
                Err(e) if e.needs_new_context() => return lost(&mut card, e),
                Err(e) => tracing::debug!(error = %e, "listing PC/SC readers failed"),
            }
            if !state.contains(State::PRESENT) {
                forget_card(&mut card);
                next_read = None;
                failures = 0;
                reset_at = self.options.reset_after.max(1);
                if told != Told::Empty {
                    told = Told::Empty;
                    self.observe(Observation::NoCard)?;
                }
                continue;
            }
            // A card is in the field. Read it when it is new (or was swapped between two
            // waits: the event count moved) and then every presence interval.
            let swapped = last_count.is_some_and(|c| c != count);
            last_count = Some(count);
            if swapped {
                forget_card(&mut card);
                failures = 0;
                reset_at = self.options.reset_after.max(1);
            }
            // A new card is read at once; a card already read, or one whose read failed, at
            // the next presence interval (a failing card is not hammered: pcscd may not have
            // noticed yet that it left).
            let due = matches!(told, Told::Nothing | Told::Empty)
                || swapped
                || next_read.is_none_or(|at| Instant::now() >= at);
            if !due {
                continue;
            }
            let read = if state.contains(State::MUTE) {
                Read::Failed("the card in the field does not answer (mute)".into())
            } else {
                self.read(context, reader, &mut card)
            };
            next_read = Some(Instant::now() + self.options.presence_interval);
            match read {
                Read::Uid(uid) => {
                    told = Told::Card;
                    // Ok again if a reset had made it `recovering` (no report otherwise).
                    self.health(ReaderState::Ok, None)?;
                    failures = 0;
                    reset_at = self.options.reset_after.max(1);
                    self.observe(Observation::Card(uid))?;
                }
                Read::Failed(why) => {
                    tracing::debug!(reason = %why, "card read failed");
                    told = Told::Failing;
                    failures += 1;
                    self.observe(Observation::Partial)?;
                    if failures >= reset_at {
                        reset_at = reset_at.saturating_mul(2).min(1_000);
                        self.health(
                            ReaderState::Recovering,
                            Some(format!(
                                "the card in the field keeps failing to read ({why}); resetting it"
                            )),
                        )?;
                        match self.reset(context, reader, &mut card) {
                            Ok(()) => self.health(ReaderState::Ok, None)?,
                            Err(e) if e.needs_new_context() => return lost(&mut card, e),
                            Err(e) => {
                                tracing::debug!(error = %e, "resetting the card failed");
                            }
                        }
                    }
                }
                Read::Lost(e) => return lost(&mut card, e),
            }
        }
    }

    /// Reads the UID of the card in the field, connecting first if needed.
    fn read(&self, context: &Context, reader: &CStr, card: &mut Option<Card>) -> Read {
        for attempt in 0..2 {
            if card.is_none() {
                match self.call("connecting to the card", Duration::ZERO, || {
                    context.connect(reader, ShareMode::Shared, Protocols::ANY)
                }) {
                    Ok(c) => *card = Some(c),
                    Err(e) if e.needs_new_context() => return Read::Lost(e),
                    // The card left before we could connect, or does not answer.
                    Err(e) => return Read::Failed(e.to_string()),
                }
            }
            let Some(connected) = card.as_ref() else {
                continue;
            };
            match self.get_data(connected) {
                Ok(GetData::Uid(uid)) => return Read::Uid(uid),
                Ok(GetData::Failed(why)) => return Read::Failed(why),
                Ok(GetData::RetryWithLe(_)) => {
                    return Read::Failed("the card kept asking for another length".into())
                }
                Err(e) if e.needs_new_context() => return Read::Lost(e),
                Err(e) => {
                    // The handle is spoilt (card removed, reset by someone else, …).
                    forget_card(card);
                    let again = attempt == 0 && e.code() == Some(pcsc::Error::ResetCard);
                    if !again {
                        return Read::Failed(e.to_string());
                    }
                }
            }
        }
        Read::Failed("the card was reset twice during the read".into())
    }

    /// GET DATA, honouring one `6C XX`.
    fn get_data(&self, card: &Card) -> Result<GetData, PcscError> {
        let mut le = 0u8;
        let mut outcome = GetData::Failed("no answer".into());
        for _ in 0..2 {
            let command = apdu::get_data(le);
            let mut buffer = [0u8; 258];
            let response = self.call("reading the card's UID", Duration::ZERO, || {
                card.transmit(&command, &mut buffer).map(|r| r.to_vec())
            })?;
            outcome = apdu::interpret(&response);
            match outcome {
                GetData::RetryWithLe(n) => le = n,
                _ => return Ok(outcome),
            }
        }
        Ok(outcome)
    }

    /// Resets the card in the field: a warm reset through the open connection, or a power
    /// cycle through a direct connection when there is none.
    fn reset(
        &self,
        context: &Context,
        reader: &CStr,
        card: &mut Option<Card>,
    ) -> Result<(), PcscError> {
        if let Some(c) = card.as_mut() {
            let r = self.call("resetting the card", Duration::ZERO, || {
                c.reconnect(ShareMode::Shared, Protocols::ANY, Disposition::ResetCard)
            });
            if r.is_err() {
                forget_card(card);
            }
            return r;
        }
        let direct = self.call("connecting to the reader", Duration::ZERO, || {
            context.connect(reader, ShareMode::Direct, Protocols::UNDEFINED)
        })?;
        self.call("power-cycling the card", Duration::ZERO, || {
            direct
                .disconnect(Disposition::UnpowerCard)
                .map_err(|(_, e)| e)
        })
    }

    fn list(&self, context: &Context) -> Result<Vec<CString>, PcscError> {
        self.call("listing the PC/SC readers", Duration::ZERO, || {
            context.list_readers_owned()
        })
    }

    /// One call into pcscd under the supervisor's deadline: its own `timeout` (for waits)
    /// plus [`PcscOptions::call_deadline`].
    fn call<T>(
        &self,
        what: &'static str,
        timeout: Duration,
        f: impl FnOnce() -> Result<T, pcsc::Error>,
    ) -> Result<T, PcscError> {
        let deadline = timeout + self.options.call_deadline;
        *self
            .shared
            .busy_what
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (what, deadline);
        self.shared.busy_until.store(
            self.shared.now_ms() + deadline.as_millis() as u64,
            Ordering::SeqCst,
        );
        let result = guarded(what, f);
        self.shared.busy_until.store(0, Ordering::SeqCst);
        if self.shared.overran.swap(false, Ordering::SeqCst) {
            // The supervisor has already said `recovering`; start over with a new context.
            return Err(PcscError::NoAnswer {
                what,
                after: deadline,
            });
        }
        result
    }

    fn observe(&self, observation: Observation) -> Result<(), SinkClosed> {
        self.sink.blocking_send(Report::Observed(observation))
    }

    fn health(&self, state: ReaderState, error: Option<String>) -> Result<(), SinkClosed> {
        let mut health = self.shared.health.blocking_lock();
        if *health == Some(state) {
            return Ok(());
        }
        *health = Some(state);
        if state != ReaderState::Ok {
            tracing::warn!(state = ?state, error = error.as_deref().unwrap_or(""), "PC/SC reader");
        }
        self.sink.blocking_send(Report::Health { state, error })
    }

    /// pcscd is not there or went away.
    fn service_trouble(&mut self, e: &PcscError) -> Result<(), SinkClosed> {
        if self.ever_ok {
            if self.recovering_since.is_none() {
                self.recovering_since = Some(Instant::now());
                self.observe(Observation::Fault(e.to_string()))?;
            }
            self.health(ReaderState::Recovering, Some(e.to_string()))
        } else {
            self.health(ReaderState::Absent, Some(e.to_string()))
        }
    }

    /// pcscd answers but lists no matching reader.
    fn no_reader(&mut self, names: &[CString]) -> Result<(), SinkClosed> {
        if self
            .recovering_since
            .is_some_and(|since| since.elapsed() < self.options.reappear_grace)
        {
            return Ok(()); // pcscd has just come back; give its drivers a moment
        }
        self.recovering_since = None;
        let seen: Vec<String> = names
            .iter()
            .map(|n| format!("{:?}", n.to_string_lossy()))
            .collect();
        let error = if seen.is_empty() {
            format!(
                "no PC/SC reader matches {:?}: pcscd lists no readers",
                self.options.pattern
            )
        } else {
            format!(
                "no PC/SC reader matches {:?}; pcscd lists {}",
                self.options.pattern,
                seen.join(", ")
            )
        };
        self.health(ReaderState::Absent, Some(error))
    }
}

fn lost(card: &mut Option<Card>, e: PcscError) -> Result<ReaderEnd, SinkClosed> {
    forget_card(card);
    Ok(ReaderEnd::End(End::Lost(e)))
}

/// Drops the connection to the card without resetting it.
fn forget_card(card: &mut Option<Card>) {
    if let Some(c) = card.take() {
        let _ = guarded("disconnecting from the card", || {
            c.disconnect(Disposition::LeaveCard).map_err(|(_, e)| e)
        });
    }
}
