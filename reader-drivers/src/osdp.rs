//! OSDP door readers (`kind = "osdp"`): id06d is the control panel (CP) of an OSDP line
//! (SIA OSDP 2.2, RS-485 or a serial adapter), the readers are its peripheral devices (PDs).
//!
//! The protocol — polling, framing, checksums, the secure channel — is the C libosdp
//! library's, through its Rust binding (`libosdp`); this module is the loop around it.
//! One line (one `path`) is one [`Bus`] with one thread: libosdp must be driven by
//! `refresh()` every few milliseconds and calls back from inside it, so the thread owns the
//! control panel, reads commands for the readers from a channel, and sends what the readers
//! report to the daemon through their [`ReaderSink`]s.
//!
//! What a reader reports:
//! - a card read (raw bits, the card's UID/CSN) → [`Observation::Card`], once per read, like
//!   a line reader: the daemon's debouncer ends the presentation after `gone_ms`. Readers
//!   that send the UID's bytes in reverse order are configured with `reversed`.
//! - online → health `ok`; no answer at its address → `absent`; answers on the line but no
//!   session while a secure channel key is configured → `failed`, naming the key file
//!   (libosdp tries again every 5 s, see `.cargo/config.toml`); tamper and power reports → the reader's
//!   `last_error`.
//! - the line itself gone (adapter unplugged) → `absent` for every reader on it, and the
//!   line is opened again with a back-off.
//!
//! What it is told ([`Signal`]): the LED, the buzzer, a text on the display where the reader
//! has one, and a timed output (the door) — each sent only when the reader declared the
//! capability (a command a PD refuses makes libosdp drop the PD and try it again later).

use crate::feedback::{Signal, Signals};
use crate::{Observation, ReaderSink, Report};
use id06_protocol::{CardUid, ReaderState};
/// The OSDP library, for callers that look at commands (the emulator's users).
pub use libosdp;
use libosdp::{
    Channel, ChannelError, ControlPanel, ControlPanelBuilder, OsdpCommand, OsdpCommandBuzzer,
    OsdpCommandLed, OsdpCommandOutput, OsdpCommandText, OsdpEvent, OsdpFlag, OsdpLedColor,
    OsdpLedParams, OsdpStatusReportType, PdCapEntity, PdCapability, PdInfoBuilder,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long the line's thread sleeps at most when nothing happens (it wakes at once for
/// a reader's answer or a signal): libosdp polls each reader every 50 ms, so a poll goes
/// out at most this late.
const REFRESH: Duration = Duration::from_millis(5);
/// After a command is queued, how long the line is watched for the end of the exchange in
/// flight (so that the command goes out the moment the line is free, not at the next
/// tick), and how often signals are looked at meanwhile.
const URGENT: Duration = Duration::from_millis(100);
const URGENT_TICK: Duration = Duration::from_micros(250);
/// How long a reader may take to come online after the line is opened before it is
/// reported as not answering.
const GRACE: Duration = Duration::from_secs(3);

/// One reader on a line.
#[derive(Debug, Clone)]
pub struct BusReader {
    /// The reader's name (for logs).
    pub name: String,
    /// Its OSDP address (0–126).
    pub address: u8,
    /// The secure channel base key, and the file it came from (for messages).
    pub scbk: Option<([u8; 16], PathBuf)>,
    /// The reader sends the UID's bytes last first.
    pub reversed: bool,
    /// Where its reports go.
    pub sink: ReaderSink,
}

/// One OSDP line and the readers on it.
#[derive(Debug, Clone)]
pub struct Bus {
    /// The serial device.
    pub path: PathBuf,
    /// Its speed.
    pub baud: u32,
    /// The readers, each at its own address.
    pub readers: Vec<BusReader>,
}

/// Reads a secure channel base key: 32 hex digits (spaces and a trailing newline
/// allowed), nothing else. The error says what is wrong, not the key.
pub fn read_scbk(path: &Path) -> Result<[u8; 16], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the OSDP key file {}: {e}", path.display()))?;
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() != 32 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "the OSDP key file {} must hold 32 hex digits (a 16-byte SCBK), it holds {} characters",
            path.display(),
            digits.len()
        ));
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("the OSDP key file {} is not hex", path.display()))?;
    }
    Ok(key)
}

/// The UID in a card read: the raw bits' bytes (reversed when the reader sends them so).
/// A read of whole bytes only: a Wiegand credential (26, 35, 37 bits …) is not a UID, and a
/// read that announces more bits than it carries is damaged.
pub fn uid_of_card_read(data: &[u8], nr_bits: usize, reversed: bool) -> Option<CardUid> {
    if nr_bits % 8 != 0 || nr_bits / 8 > data.len() {
        return None;
    }
    let mut bytes = data[..nr_bits / 8].to_vec();
    if reversed {
        bytes.reverse();
    }
    CardUid::from_bytes(&bytes).ok()
}

/// A libosdp channel over a non-blocking tty descriptor. A read or write that fails for
/// any reason but "nothing yet" marks the line broken.
struct Line {
    fd: Arc<AtomicI32>,
    id: i32,
    broken: Arc<AtomicBool>,
    bytes_in: Arc<AtomicU64>,
}

impl Line {
    /// One read or write on the open descriptor: the bytes moved, or what went wrong.
    fn on_fd(&self, call: impl FnOnce(i32) -> isize) -> Result<usize, ChannelError> {
        let fd = self.fd.load(Ordering::Acquire);
        if fd < 0 {
            return Err(ChannelError::TransportError);
        }
        usize::try_from(call(fd)).map_err(|_| self.fail())
    }

    fn fail(&self) -> ChannelError {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted
        {
            ChannelError::WouldBlock
        } else {
            self.broken.store(true, Ordering::Release);
            ChannelError::TransportError
        }
    }
}

impl Channel for Line {
    fn get_id(&self) -> i32 {
        self.id
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is ours until closed.
        let n = self.on_fd(|fd| unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })?;
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is ours until closed.
        self.on_fd(|fd| unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) })
    }

    // libosdp calls this before each send to drop stale input; stale bytes fail their
    // checksum anyway.
    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }

    fn close(&mut self) -> Result<(), ChannelError> {
        close_fd(&self.fd);
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        close_fd(&self.fd);
    }
}

fn close_fd(fd: &AtomicI32) {
    let fd = fd.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: a descriptor we opened and nobody else closes (swapped out above).
        unsafe { libc::close(fd) };
    }
}

fn baud_constant(baud: u32) -> Option<libc::speed_t> {
    Some(match baud {
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        _ => return None,
    })
}

/// Opens the line raw, non-blocking, at `baud`.
fn open_line(path: &Path, baud: u32) -> std::io::Result<i32> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("the path holds a NUL byte"))?;
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is open; `t` is filled by tcgetattr before it is changed.
    let set = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            libc::cfmakeraw(&mut t);
            if let Some(speed) = baud_constant(baud) {
                libc::cfsetispeed(&mut t, speed);
                libc::cfsetospeed(&mut t, speed);
            }
            t.c_cflag |= libc::CLOCAL | libc::CREAD;
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    if let Err(e) = set {
        // SAFETY: closing what we opened.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    Ok(fd)
}

/// libosdp's description of one reader.
fn pd_info(r: &BusReader, baud: u32) -> Result<PdInfoBuilder, String> {
    let mut b = PdInfoBuilder::new()
        .name(&r.name)
        .and_then(|b| b.address(i32::from(r.address)))
        .and_then(|b| b.baud_rate(baud as i32))
        .map_err(|e| format!("reader {}: {e}", r.name))?;
    if let Some((key, _)) = &r.scbk {
        // Never fall back to a line in the clear when a key is configured.
        b = b.flag(OsdpFlag::EnforceSecure).secure_channel_key(*key);
    }
    Ok(b)
}

/// A reader's health as last reported, to report only changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Health(ReaderState, Option<String>);

fn report(sink: &ReaderSink, last: &mut Option<Health>, now: Health) {
    if last.as_ref() != Some(&now) {
        let _ = sink.blocking_send(Report::Health {
            state: now.0,
            error: now.1.clone(),
        });
        *last = Some(now);
    }
}

fn has(cp: &ControlPanel, pd: i32, cap: PdCapability) -> bool {
    let none = match cap {
        PdCapability::LedControl(_) => PdCapability::LedControl(PdCapEntity::default()),
        PdCapability::AudibleOutput(_) => PdCapability::AudibleOutput(PdCapEntity::default()),
        PdCapability::TextOutput(_) => PdCapability::TextOutput(PdCapEntity::default()),
        PdCapability::OutputControl(_) => PdCapability::OutputControl(PdCapEntity::default()),
        _ => return false,
    };
    cp.get_capability(pd, cap).is_ok_and(|c| c != none)
}

/// An LED state left as it is (control code 0: no operation).
const UNCHANGED: OsdpLedParams = OsdpLedParams {
    control_code: 0,
    on_count: 0,
    off_count: 0,
    on_color: OsdpLedColor::None,
    off_color: OsdpLedColor::None,
    timer_count: 0,
};

fn led(color: OsdpLedColor, tenths: u8) -> OsdpCommand {
    OsdpCommand::Led(OsdpCommandLed {
        reader: 0,
        led_number: 0,
        // Temporary: steady `color` for `tenths` × 100 ms, then back to the permanent state.
        temporary: OsdpLedParams {
            control_code: 2,
            on_count: tenths,
            off_count: 0,
            on_color: color,
            off_color: OsdpLedColor::None,
            timer_count: u16::from(tenths),
        },
        permanent: UNCHANGED,
    })
}

/// Amber, 300 ms on and off, for at most 10 s (renewed while the hint holds); or the
/// temporary state cancelled.
fn hold_steady_led(on: bool) -> OsdpCommand {
    OsdpCommand::Led(OsdpCommandLed {
        reader: 0,
        led_number: 0,
        temporary: if on {
            OsdpLedParams {
                control_code: 2,
                on_count: 3,
                off_count: 3,
                on_color: OsdpLedColor::Amber,
                off_color: OsdpLedColor::None,
                timer_count: 100,
            }
        } else {
            OsdpLedParams {
                control_code: 1, // cancel: the permanent state at once
                ..UNCHANGED
            }
        },
        permanent: UNCHANGED,
    })
}

fn buzzer(on_tenths: u8, off_tenths: u8, times: u8) -> OsdpCommand {
    OsdpCommand::Buzzer(OsdpCommandBuzzer {
        reader: 0,
        control_code: 2, // the default tone
        on_count: on_tenths,
        off_count: off_tenths,
        rep_count: times,
    })
}

fn text(line: &str) -> OsdpCommand {
    // At most 32 bytes on the wire; ASCII where the display may not know UTF-8.
    let mut data: Vec<u8> = line
        .chars()
        .map(|c| match c {
            'å' | 'ä' => 'a',
            'Å' | 'Ä' => 'A',
            'ö' => 'o',
            'Ö' => 'O',
            c if c.is_ascii() && !c.is_ascii_control() => c,
            _ => '?',
        })
        .map(|c| c as u8)
        .collect();
    data.truncate(32);
    OsdpCommand::Text(OsdpCommandText {
        reader: 0,
        control_code: 3, // temporary text, no wrap
        temp_time: 3,    // seconds
        offset_row: 1,
        offset_col: 1,
        data,
    })
}

/// The commands for `signal`, those the reader can take.
fn commands(cp: &ControlPanel, pd: i32, signal: &Signal) -> Vec<OsdpCommand> {
    let mut out = Vec::new();
    let (color, beeps, words, door) = match signal {
        Signal::Granted { text, door } => (OsdpLedColor::Green, buzzer(1, 0, 1), text, *door),
        Signal::Denied { text } => (OsdpLedColor::Red, buzzer(2, 1, 3), text, None),
        Signal::HoldSteady { on } => {
            if has(cp, pd, PdCapability::LedControl(PdCapEntity::default())) {
                out.push(hold_steady_led(*on));
            }
            return out;
        }
    };
    if has(cp, pd, PdCapability::LedControl(PdCapEntity::default())) {
        out.push(led(color, 20));
    }
    if has(cp, pd, PdCapability::AudibleOutput(PdCapEntity::default())) {
        out.push(beeps);
    }
    if let Some((output, ms)) = door {
        if has(cp, pd, PdCapability::OutputControl(PdCapEntity::default())) {
            out.push(OsdpCommand::Output(OsdpCommandOutput {
                output_no: output,
                control_code: 5, // on for the timer, then off
                timer_count: u16::try_from(ms.div_ceil(100)).unwrap_or(u16::MAX),
            }));
        }
    }
    if !words.is_empty() && has(cp, pd, PdCapability::TextOutput(PdCapEntity::default())) {
        out.push(text(words));
    }
    out
}

/// Runs the line until `stop`: opens it (again, with a back-off, whenever it fails),
/// drives the control panel, reports what the readers say, sends them `signals`.
/// Blocking: run it on a thread of its own.
pub fn run(bus: Bus, signals: Signals, stop: CancellationToken) {
    // A signal rings this bell, so that the thread can wait on the line and the bell
    // together: it sleeps until the reader answers, a signal comes, or libosdp's next
    // poll is due.
    let bell = match Bell::new() {
        Ok(b) => Arc::new(b),
        Err(e) => {
            tracing::error!(line = %bus.path.display(), "cannot set up the OSDP line's wake-up pipe: {e}");
            return;
        }
    };
    {
        let bell = bell.clone();
        signals.set_waker(move || bell.ring());
    }
    let mut health: Vec<Option<Health>> = vec![None; bus.readers.len()];
    let mut backoff = Duration::from_millis(250);
    let line_id = {
        static NEXT: AtomicI32 = AtomicI32::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
    while !stop.is_cancelled() {
        let fd = match open_line(&bus.path, bus.baud) {
            Ok(fd) => fd,
            Err(e) => {
                for (r, h) in bus.readers.iter().zip(health.iter_mut()) {
                    report(
                        &r.sink,
                        h,
                        Health(
                            ReaderState::Absent,
                            Some(format!(
                                "cannot open the OSDP line {}: {e}",
                                bus.path.display()
                            )),
                        ),
                    );
                }
                sleep_unless(&stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let broken = Arc::new(AtomicBool::new(false));
        let bytes_in = Arc::new(AtomicU64::new(0));
        let line = Line {
            fd: Arc::new(AtomicI32::new(fd)),
            id: line_id,
            broken: broken.clone(),
            bytes_in: bytes_in.clone(),
        };
        let pds: Result<Vec<PdInfoBuilder>, String> =
            bus.readers.iter().map(|r| pd_info(r, bus.baud)).collect();
        let built = pds.and_then(|pds| {
            ControlPanelBuilder::new()
                .add_channel(Box::new(line), pds)
                .build()
                .map_err(|e| e.to_string())
        });
        let mut cp = match built {
            Ok(cp) => cp,
            Err(e) => {
                for (r, h) in bus.readers.iter().zip(health.iter_mut()) {
                    report(
                        &r.sink,
                        h,
                        Health(
                            ReaderState::Failed,
                            Some(format!(
                                "OSDP control panel for {}: {e}",
                                bus.path.display()
                            )),
                        ),
                    );
                }
                sleep_unless(&stop, Duration::from_secs(5));
                continue;
            }
        };
        tracing::info!(line = %bus.path.display(), readers = bus.readers.len(), "OSDP line open");
        // libosdp keeps the callback for good: it only hands what it sees to this loop
        // (a reader's sink held there would keep the daemon's channel open forever).
        let (seen_tx, seen) = std::sync::mpsc::channel::<(usize, OsdpEvent)>();
        cp.set_event_callback(move |pd: i32, event: OsdpEvent| {
            if let Ok(i) = usize::try_from(pd) {
                let _ = seen_tx.send((i, event));
            }
            0
        });
        let opened = Instant::now();
        let mut ever_online = false;
        let mut urgent_until: Option<Instant> = None;
        let (mut line_was_readable, mut consumed_before) = (false, 0u64);
        loop {
            if stop.is_cancelled() {
                return;
            }
            cp.refresh();
            while let Ok((i, event)) = seen.try_recv() {
                if let Some(r) = bus.readers.get(i) {
                    forward(r, event);
                }
            }
            if broken.load(Ordering::Acquire) {
                for (r, h) in bus.readers.iter().zip(health.iter_mut()) {
                    report(
                        &r.sink,
                        h,
                        Health(
                            ReaderState::Absent,
                            Some(format!("the OSDP line {} went away", bus.path.display())),
                        ),
                    );
                }
                break;
            }
            backoff = Duration::from_millis(250);
            // Something answered on this line since it was opened, and no reader on it has
            // come online: a reader that answers but does not come online refuses the key.
            // (libosdp then waits before it tries again, so "answered" must
            // not mean "answered lately".)
            // Once a reader was online, a silence is a reader gone, not a key refused.
            ever_online |= (0..bus.readers.len()).any(|i| cp.is_online(i as i32));
            let line_answers = bytes_in.load(Ordering::Relaxed) > 0 && !ever_online;
            for (i, (r, h)) in bus.readers.iter().zip(health.iter_mut()).enumerate() {
                let pd = i as i32;
                if cp.is_online(pd) {
                    if !matches!(h, Some(Health(ReaderState::Ok, _))) {
                        let _ = r.sink.blocking_send(Report::Device(format!(
                            "OSDP address {} on {} at {} baud{}",
                            r.address,
                            bus.path.display(),
                            bus.baud,
                            if cp.is_sc_active(pd) {
                                ", secure channel"
                            } else {
                                ""
                            }
                        )));
                    }
                    if !matches!(h, Some(Health(ReaderState::Ok, _))) {
                        report(&r.sink, h, Health(ReaderState::Ok, None));
                    }
                } else if opened.elapsed() >= GRACE {
                    let why = match (&r.scbk, line_answers) {
                        (Some((_, file)), true) => Health(
                            ReaderState::Failed,
                            Some(format!(
                                "the reader at OSDP address {} answers but refuses the secure channel: the key in {} is not its key (tried again every few seconds)",
                                r.address,
                                file.display()
                            )),
                        ),
                        _ => Health(
                            ReaderState::Absent,
                            Some(format!(
                                "no answer from OSDP address {} on {}",
                                r.address,
                                bus.path.display()
                            )),
                        ),
                    };
                    report(&r.sink, h, why);
                }
            }
            // Wait for the next refresh, or for a signal: a decision's feedback goes on the
            // wire at once, not at the next tick. While commands wait for an exchange in
            // flight to end, wait for the line's answer instead.
            let wait = match urgent_until {
                Some(until) if Instant::now() < until => URGENT_TICK,
                _ => {
                    urgent_until = None;
                    REFRESH
                }
            };
            // Input that libosdp left unread (noise while it expects nothing) would make the
            // line look readable for ever: then wait on the bell alone until it reads.
            let consumed = bytes_in.load(Ordering::Relaxed);
            let watch = if line_was_readable && consumed == consumed_before {
                -1
            } else {
                fd
            };
            consumed_before = consumed;
            line_was_readable = wait_readable(watch, bell.fd(), wait);
            bell.quiet();
            let mut next = signals.try_recv();
            while let Some((slot, signal)) = next {
                let pd = slot as i32;
                if cp.is_online(pd) {
                    for command in commands(&cp, pd, &signal) {
                        match cp.send_command(pd, command) {
                            Ok(()) => urgent_until = Some(Instant::now() + URGENT),
                            Err(e) => {
                                tracing::warn!(reader = %bus.readers.get(slot).map_or("?", |r| r.name.as_str()), "OSDP command not queued: {e}")
                            }
                        }
                    }
                }
                next = signals.try_recv();
            }
        }
        drop(cp);
        sleep_unless(&stop, backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Waits until the line `fd` has input, the bell `bell` rang, or `timeout` passes (a
/// line that hung up is waited on as a plain sleep; the next refresh finds out; a
/// negative `fd` or `bell` is not watched). Returns whether the line has input. (The
/// emulated reader waits on its end of the pty with it too.)
pub(crate) fn wait_readable(fd: i32, bell: i32, timeout: Duration) -> bool {
    let mut p = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: bell,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let t = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: two valid pollfds and a valid timespec; no signal mask.
    let n = unsafe { libc::ppoll(p.as_mut_ptr(), 2, &t, std::ptr::null()) };
    let hung_up = p[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
    if n > 0 && hung_up && p[1].revents & libc::POLLIN == 0 {
        std::thread::sleep(timeout.min(URGENT_TICK * 4));
    }
    n > 0 && p[0].revents & libc::POLLIN != 0
}

/// A non-blocking pipe that wakes the line's thread.
struct Bell {
    read: i32,
    write: i32,
}

impl Bell {
    fn new() -> std::io::Result<Bell> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Bell {
            read: fds[0],
            write: fds[1],
        })
    }

    fn fd(&self) -> i32 {
        self.read
    }

    /// Wakes the thread (a full pipe already will).
    fn ring(&self) {
        // SAFETY: one byte from a valid buffer to our descriptor.
        unsafe { libc::write(self.write, [1u8].as_ptr().cast(), 1) };
    }

    /// Empties the pipe.
    fn quiet(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: valid buffer; our non-blocking descriptor.
        while unsafe { libc::read(self.read, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

impl Drop for Bell {
    fn drop(&mut self) {
        // SAFETY: our descriptors, closed once.
        unsafe {
            libc::close(self.read);
            libc::close(self.write);
        }
    }
}

/// What a reader reported, to the daemon.
fn forward(r: &BusReader, event: OsdpEvent) {
    match event {
        OsdpEvent::CardRead(c) => match uid_of_card_read(&c.data, c.nr_bits, r.reversed) {
            Some(uid) => {
                let _ = r
                    .sink
                    .blocking_send(Report::Observed(Observation::Card(uid)));
            }
            None => {
                tracing::warn!(reader = %r.name, bits = c.nr_bits, "an OSDP card read that is not a 4-, 7- or 10-byte UID; ignored");
                let _ = r.sink.blocking_send(Report::Observed(Observation::Partial));
            }
        },
        OsdpEvent::Status(s) if s.type_ == OsdpStatusReportType::Local => {
            let tamper = s.nr_entries > 0 && s.report[0] != 0;
            let power = s.nr_entries > 1 && s.report[1] != 0;
            let what = match (tamper, power) {
                (true, true) => Some("tamper: the reader's case is open; power failure"),
                (true, false) => Some("tamper: the reader's case is open"),
                (false, true) => Some("power failure at the reader"),
                (false, false) => None,
            };
            let _ = r.sink.blocking_send(Report::Health {
                state: ReaderState::Ok,
                error: what.map(str::to_string),
            });
        }
        _ => {}
    }
}

fn sleep_unless(stop: &CancellationToken, d: Duration) {
    let until = Instant::now() + d;
    while !stop.is_cancelled() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
    }
}

#[cfg(any(test, feature = "test-support"))]
pub mod emulator;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_read_is_the_uid_in_order_or_reversed() {
        let data = [0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6];
        assert_eq!(
            uid_of_card_read(&data, 56, false).unwrap().to_string(),
            "04A1B2C3D4E5F6"
        );
        assert_eq!(
            uid_of_card_read(&data, 56, true).unwrap().to_string(),
            "F6E5D4C3B2A104"
        );
        // 26-bit Wiegand and other lengths are not a UID.
        assert!(uid_of_card_read(&[1, 2, 3, 4], 26, false).is_none());
        assert!(uid_of_card_read(&[], 0, false).is_none());
        // More bits announced than bytes sent: damaged.
        assert!(uid_of_card_read(&data[..4], 56, false).is_none());
        // Fewer: the announced ones.
        assert_eq!(
            uid_of_card_read(&data, 32, false).unwrap().to_string(),
            "04A1B2C3"
        );
    }

    #[test]
    fn a_key_file_is_32_hex_digits_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("osdp-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "000102030405060708090a0b0c0d0e0f\n").unwrap();
        assert_eq!(read_scbk(&good).unwrap()[15], 0x0f);
        for (name, text) in [
            ("short", "0001"),
            ("nothex", "zz0102030405060708090a0b0c0d0e0f"),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            let e = read_scbk(&p).unwrap_err();
            assert!(e.contains(p.to_str().unwrap()), "{e}");
        }
        assert!(read_scbk(&dir.join("missing"))
            .unwrap_err()
            .contains("cannot read"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
