//! An OSDP door reader for tests: libosdp's peripheral device (PD) mode on one end of a
//! pty, the other end's path for the daemon. It presents cards when told, answers status
//! queries with the tamper and power state it is given, and records every command the
//! control panel sends it (LED, buzzer, text, output) with the time it arrived.

use libosdp::{
    Channel, ChannelError, OsdpCommand, OsdpEvent, OsdpEventCardRead, OsdpFlag, OsdpStatusReport,
    OsdpStatusReportType, PdCapEntity, PdCapability, PdId, PdInfoBuilder, PeripheralDevice,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A command the reader received.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    /// The command.
    pub command: OsdpCommand,
}

enum Ask {
    PowerCycle(Duration),
    Card(Vec<u8>),
    Wiegand(Vec<u8>, usize),
    Status { tamper: bool, power_failure: bool },
}

/// The emulated reader; dropping it unplugs it (the pty goes away).
pub struct Reader {
    path: PathBuf,
    asks: Sender<Ask>,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    slave: i32,
}

struct Master(i32);

impl Channel for Master {
    fn get_id(&self) -> i32 {
        1000 + self.0
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        // SAFETY: valid buffer; our descriptor.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {
                    Err(ChannelError::WouldBlock)
                }
                // No one has the other end open yet (EIO on a master): nothing to read.
                _ => Err(ChannelError::WouldBlock),
            };
        }
        Ok(n as usize)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        // SAFETY: valid buffer; our descriptor.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(ChannelError::WouldBlock);
        }
        Ok(n as usize)
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
    fn close(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

fn raw_nonblocking(fd: i32) {
    // SAFETY: `fd` is open; `t` is filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Opens a pty pair, both ends raw and non-blocking: (master, slave, the slave's path).
fn pty() -> std::io::Result<(i32, i32, PathBuf)> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: out-pointers to two ints; no name, termios or window size.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    raw_nonblocking(master);
    raw_nonblocking(slave);
    // Not inherited by the processes a test starts (a daemon holding a copy of the master
    // would keep the line alive after the reader is unplugged).
    for fd in [master, slave] {
        // SAFETY: `fd` is open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: `master` is an open pty master.
    let name = unsafe { libc::ptsname(master) };
    if name.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ptsname returned a NUL-terminated string.
    let path = PathBuf::from(
        unsafe { std::ffi::CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned(),
    );
    Ok((master, slave, path))
}

/// Several readers on one line (RS-485 multi-drop): what the control panel sends reaches
/// every reader, what any reader answers reaches the control panel. Dropping it unplugs
/// the line.
pub struct Line {
    path: PathBuf,
    readers: Vec<Reader>,
    stop: Arc<AtomicBool>,
    hub: Option<std::thread::JoinHandle<()>>,
    fds: (i32, i32),
}

impl Line {
    /// Readers at the given addresses, with their keys.
    pub fn start(readers: &[(u8, Option<[u8; 16]>)]) -> std::io::Result<Line> {
        let readers: Vec<Reader> = readers
            .iter()
            .map(|(a, k)| Reader::start(*a, *k))
            .collect::<std::io::Result<_>>()?;
        let (master, slave, path) = pty()?;
        let stop = Arc::new(AtomicBool::new(false));
        let ends: Vec<i32> = readers.iter().map(|r| r.slave).collect();
        let hub = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut fds: Vec<libc::pollfd> = std::iter::once(master)
                    .chain(ends.iter().copied())
                    .map(|fd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Acquire) {
                    // SAFETY: `fds` is a valid array of pollfd.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5) };
                    if n <= 0 {
                        continue;
                    }
                    if fds.iter().all(|p| p.revents & libc::POLLIN == 0) {
                        // Only hang-ups (no one has the line open yet): do not spin.
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    for (i, p) in fds.iter().enumerate() {
                        if p.revents & libc::POLLIN == 0 {
                            continue;
                        }
                        // SAFETY: valid buffer; open descriptors.
                        let r = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
                        if r <= 0 {
                            continue;
                        }
                        let to: Vec<i32> = if i == 0 { ends.clone() } else { vec![master] };
                        for fd in to {
                            // SAFETY: valid buffer of `r` bytes.
                            unsafe { libc::write(fd, buf.as_ptr().cast(), r as usize) };
                        }
                    }
                }
            })
        };
        Ok(Line {
            path,
            readers,
            stop,
            hub: Some(hub),
            fds: (master, slave),
        })
    }

    /// The device the daemon opens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reader number `i` (in the order given to [`Line::start`]).
    pub fn reader(&self, i: usize) -> &Reader {
        &self.readers[i]
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.hub.take() {
            let _ = h.join();
        }
        self.readers.clear();
        // SAFETY: our descriptors, closed once.
        unsafe {
            libc::close(self.fds.0);
            libc::close(self.fds.1);
        }
    }
}

/// The reader's OSDP side on `master`: its identity, capabilities and key, and a command
/// callback that records what it is told.
fn peripheral(
    address: u8,
    key: Option<[u8; 16]>,
    master: i32,
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<Mutex<(bool, bool)>>,
) -> std::io::Result<PeripheralDevice> {
    let mut info = PdInfoBuilder::new()
        .address(i32::from(address))
        .and_then(|b| b.baud_rate(9600))
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .id(&PdId::from_number(address))
        .capability(PdCapability::CommunicationSecurity(PdCapEntity::new(1, 1)))
        .capability(PdCapability::CardDataFormat(PdCapEntity::new(1, 0)))
        .capability(PdCapability::Readers(PdCapEntity::new(0, 1)))
        .capability(PdCapability::OutputControl(PdCapEntity::new(1, 1)))
        .capability(PdCapability::LedControl(PdCapEntity::new(1, 1)))
        .capability(PdCapability::AudibleOutput(PdCapEntity::new(1, 1)))
        .capability(PdCapability::TextOutput(PdCapEntity::new(1, 1)));
    if let Some(k) = key {
        info = info.flag(OsdpFlag::EnforceSecure).secure_channel_key(k);
    }
    let mut pd = PeripheralDevice::new(info, Box::new(Master(master)))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    pd.set_command_callback(move |cmd: &mut OsdpCommand| {
        if let OsdpCommand::Status(s) = cmd {
            let (tamper, power) = *status.lock().unwrap_or_else(|e| e.into_inner());
            s.nr_entries = 2;
            s.report[0] = u8::from(tamper);
            s.report[1] = u8::from(power);
        }
        received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Received {
                at: Instant::now(),
                command: cmd.clone(),
            });
        0
    });
    Ok(pd)
}

impl Reader {
    /// A reader at `address`, with `key` as its secure channel base key (none: it accepts
    /// a line in the clear), that can drive a door output, an LED, a buzzer and a display.
    pub fn start(address: u8, key: Option<[u8; 16]>) -> std::io::Result<Reader> {
        let (master, slave, path) = pty()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new((false, false)));
        let boot = {
            let (received, status) = (received.clone(), status.clone());
            move || peripheral(address, key, master, received.clone(), status.clone())
        };
        let mut pd = Some(boot()?);
        let (asks, rx): (Sender<Ask>, Receiver<Ask>) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if let Some(pd) = pd.as_mut() {
                        pd.refresh();
                    }
                    while let Ok(ask) = rx.try_recv() {
                        let event = match ask {
                            Ask::PowerCycle(off) => {
                                // Off: no answers, whatever comes in is lost; then a fresh
                                // start (no session, like a reader that rebooted).
                                drop(pd.take());
                                let until = Instant::now() + off;
                                let mut sink = [0u8; 256];
                                while Instant::now() < until && !stop.load(Ordering::Acquire) {
                                    // SAFETY: valid buffer; our descriptor.
                                    unsafe {
                                        libc::read(master, sink.as_mut_ptr().cast(), sink.len())
                                    };
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                                pd = boot().ok();
                                continue;
                            }
                            Ask::Card(uid) => OsdpEvent::CardRead(OsdpEventCardRead::new_raw(uid)),
                            Ask::Wiegand(data, bits) => {
                                match OsdpEventCardRead::new_wiegand(bits, data) {
                                    Ok(read) => OsdpEvent::CardRead(read),
                                    Err(_) => continue,
                                }
                            }
                            Ask::Status {
                                tamper,
                                power_failure,
                            } => {
                                *status.lock().unwrap_or_else(|e| e.into_inner()) =
                                    (tamper, power_failure);
                                let mut report = [0u8; 64];
                                report[0] = u8::from(tamper);
                                report[1] = u8::from(power_failure);
                                OsdpEvent::Status(OsdpStatusReport {
                                    type_: OsdpStatusReportType::Local,
                                    nr_entries: 2,
                                    report,
                                })
                            }
                        };
                        if let Some(pd) = pd.as_mut() {
                            let _ = pd.notify_event(event);
                        }
                    }
                    // Like a reader's microcontroller, answer as soon as a command is in
                    // (a fixed sleep here would add up to a millisecond to every exchange).
                    super::wait_readable(master, -1, Duration::from_millis(1));
                }
                drop(pd);
                // SAFETY: our descriptor, closed once: unplugs the reader.
                unsafe { libc::close(master) };
            })
        };
        Ok(Reader {
            path,
            asks,
            received,
            stop,
            thread: Some(thread),
            slave,
        })
    }

    /// The device the daemon opens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Switches the reader off for `off` (the line stays: it just stops answering) and
    /// on again, as a reader that lost power or rebooted.
    pub fn power_cycle(&self, off: Duration) {
        let _ = self.asks.send(Ask::PowerCycle(off));
    }

    /// Presents a card: one card read with `uid`'s bytes as raw data.
    pub fn present(&self, uid: &[u8]) {
        let _ = self.asks.send(Ask::Card(uid.to_vec()));
    }

    /// A Wiegand read of `bits` bits (not a UID: a credential the gate cannot use).
    pub fn present_wiegand(&self, data: &[u8], bits: usize) {
        let _ = self.asks.send(Ask::Wiegand(data.to_vec(), bits));
    }

    /// Reports the reader's tamper switch and power state.
    pub fn report_status(&self, tamper: bool, power_failure: bool) {
        let _ = self.asks.send(Ask::Status {
            tamper,
            power_failure,
        });
    }

    /// Every command received so far (status queries and the like included).
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(self.slave) };
    }
}
