//! A virtual contactless card for tests and benchmarks, played over vpcd's TCP protocol, and
//! helpers that start, kill and restart a real pcscd.
//!
//! vpcd (package `vsmartcard-vpcd`) is a pcscd reader driver that makes two readers,
//! `Virtual PCD 00 00` and `Virtual PCD 00 01`, and waits on 127.0.0.1:35963 and :35964
//! for a card to connect. The card is "in the field" while its TCP connection is open.
//! Every message either way is a 2-byte big-endian length and a payload; a 1-byte payload
//! from vpcd is a control message (`00` power off, `01` power on, `02` reset — no reply;
//! `04` — reply with the ATR), anything longer is a command APDU to answer with a
//! response APDU.
//!
//! ```no_run
//! use id06_readers::vpcd_card::{ensure_pcscd, CardBehaviour, VirtualCard, SLOT_0};
//!
//! ensure_pcscd().unwrap();
//! let card = VirtualCard::insert(SLOT_0, CardBehaviour::uid(&[0x04, 0xA1, 0xB2, 0xC3])).unwrap();
//! // … the reader "Virtual PCD 00 00" now holds a card whose UID is 04A1B2C3 …
//! card.remove();
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// vpcd's first slot (reader `Virtual PCD 00 00`).
pub const SLOT_0: Slot = Slot {
    port: 35963,
    reader: "Virtual PCD 00 00",
};
/// vpcd's second slot (reader `Virtual PCD 00 01`).
pub const SLOT_1: Slot = Slot {
    port: 35964,
    reader: "Virtual PCD 00 01",
};

/// One of vpcd's readers: the TCP port its card connects to and the PC/SC name it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The reader's PC/SC name.
    pub reader: &'static str,
}

/// The ATR our virtual card sends: a contactless storage card as PC/SC part 3 describes it
/// (what an ACR122U reports for a MIFARE card).
pub const ATR: [u8; 20] = [
    0x3B, 0x8F, 0x80, 0x01, 0x80, 0x4F, 0x0C, 0xA0, 0x00, 0x00, 0x03, 0x06, 0x03, 0x00, 0x01, 0x00,
    0x00, 0x00, 0x00, 0x6A,
];

/// How the card answers GET DATA (`FF CA 00 00 Le`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardBehaviour {
    /// `UID 90 00` (honouring Le: a shorter Le than the UID gets `6C len`).
    Uid(Vec<u8>),
    /// First answers `6C len` whatever Le was, then `UID 90 00` once asked with Le = len.
    WrongLengthFirst(Vec<u8>),
    /// Answers with this status word and no data (`6A 81`, `63 00`, …).
    Status(u8, u8),
    /// Closes the connection instead of answering: the card leaves in the middle of the read.
    LeaveMidRead,
    /// Never answers the APDU (keeps the connection open): a mute card.
    Mute,
}

impl CardBehaviour {
    /// A card that answers with this UID.
    pub fn uid(uid: &[u8]) -> CardBehaviour {
        CardBehaviour::Uid(uid.to_vec())
    }
}

/// What went wrong talking to vpcd.
#[derive(Debug, thiserror::Error)]
#[error("virtual card on port {port}: {message}")]
pub struct VpcdError {
    /// The slot's port.
    pub port: u16,
    /// What happened.
    pub message: String,
}

/// A card in a vpcd slot, answering on its own thread until removed or dropped.
#[derive(Debug)]
pub struct VirtualCard {
    stream: TcpStream,
    apdus: Arc<AtomicUsize>,
    controls: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl VirtualCard {
    /// Puts a card into `slot` (waits up to 10 s for vpcd to listen, as it does once pcscd
    /// has loaded it).
    pub fn insert(slot: Slot, behaviour: CardBehaviour) -> Result<VirtualCard, VpcdError> {
        Self::insert_within(slot, behaviour, Duration::from_secs(10))
    }

    /// Like [`VirtualCard::insert`] with a chosen deadline for vpcd to listen.
    pub fn insert_within(
        slot: Slot,
        behaviour: CardBehaviour,
        wait: Duration,
    ) -> Result<VirtualCard, VpcdError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], slot.port));
        let deadline = Instant::now() + wait;
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(VpcdError {
                        port: slot.port,
                        message: format!("vpcd does not listen (is pcscd running?): {e}"),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let _ = stream.set_nodelay(true);
        let reader = stream.try_clone().map_err(|e| VpcdError {
            port: slot.port,
            message: e.to_string(),
        })?;
        let apdus = Arc::new(AtomicUsize::new(0));
        let counter = apdus.clone();
        let controls = Arc::new(Mutex::new(Vec::new()));
        let control_log = controls.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vpcd-card-{}", slot.port))
            .spawn(move || serve(reader, behaviour, counter, control_log))
            .map_err(|e| VpcdError {
                port: slot.port,
                message: format!("cannot start the card's thread: {e}"),
            })?;
        Ok(VirtualCard {
            stream,
            apdus,
            controls,
            thread: Some(thread),
        })
    }

    /// How many command APDUs the card has received so far.
    pub fn apdus(&self) -> usize {
        self.apdus.load(Ordering::SeqCst)
    }

    /// The control messages vpcd has sent so far (`00` off, `01` on, `02` reset, `04` ATR).
    pub fn controls(&self) -> Vec<u8> {
        self.controls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the card's connection has ended (vpcd closed it, or the card left mid-read).
    pub fn is_gone(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Takes the card out of the field (closes the connection).
    pub fn remove(mut self) {
        self.close();
    }

    fn close(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VirtualCard {
    fn drop(&mut self) {
        self.close();
    }
}

fn read_message(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    quick_ack(stream);
    let mut payload = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Acknowledges at once what vpcd sent (Linux delays ACKs by up to 40 ms otherwise, and
/// with Nagle on vpcd's side that delay lands in every APDU round trip).
fn quick_ack(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn write_message(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(payload.len())
        .map_err(|_| std::io::Error::other("message longer than 65535 bytes"))?;
    let mut frame = Vec::with_capacity(payload.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)
}

/// The card's side of the conversation, until the connection ends.
fn serve(
    mut stream: TcpStream,
    behaviour: CardBehaviour,
    apdus: Arc<AtomicUsize>,
    controls: Arc<Mutex<Vec<u8>>>,
) {
    let mut told_length = false;
    while let Ok(message) = read_message(&mut stream) {
        if let [control] = message.as_slice() {
            controls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(*control);
        }
        match message.as_slice() {
            [0x04] => {
                if write_message(&mut stream, &ATR).is_err() {
                    return;
                }
            }
            [_] | [] => {} // power off / on / reset: no reply
            apdu => {
                apdus.fetch_add(1, Ordering::SeqCst);
                let reply = match answer(apdu, &behaviour, &mut told_length) {
                    Reply::Send(r) => r,
                    Reply::Leave => {
                        let _ = stream.shutdown(Shutdown::Both);
                        return;
                    }
                    Reply::Silence => continue,
                };
                if write_message(&mut stream, &reply).is_err() {
                    return;
                }
            }
        }
    }
}

enum Reply {
    Send(Vec<u8>),
    Leave,
    Silence,
}

fn answer(apdu: &[u8], behaviour: &CardBehaviour, told_length: &mut bool) -> Reply {
    let is_get_data = apdu.len() == 5 && apdu[..4] == [0xFF, 0xCA, 0x00, 0x00];
    if !is_get_data {
        return Reply::Send(vec![0x6D, 0x00]); // instruction not supported
    }
    let le = apdu[4] as usize;
    let with_uid = |uid: &[u8]| {
        let mut r = uid.to_vec();
        r.extend_from_slice(&[0x90, 0x00]);
        r
    };
    match behaviour {
        CardBehaviour::Uid(uid) => {
            if le != 0 && le < uid.len() {
                Reply::Send(vec![0x6C, uid.len() as u8])
            } else {
                Reply::Send(with_uid(uid))
            }
        }
        CardBehaviour::WrongLengthFirst(uid) => {
            if !*told_length || le != uid.len() {
                *told_length = true;
                Reply::Send(vec![0x6C, uid.len() as u8])
            } else {
                Reply::Send(with_uid(uid))
            }
        }
        CardBehaviour::Status(a, b) => Reply::Send(vec![*a, *b]),
        CardBehaviour::LeaveMidRead => Reply::Leave,
        CardBehaviour::Mute => Reply::Silence,
    }
}

/// Exclusive use of pcscd and vpcd's slots, held by one test at a time across threads *and*
/// processes (several test binaries, or several people's `cargo test`, share one pcscd).
/// It is an abstract Unix socket name: the kernel frees it when the holder exits, even by
/// a crash, so it never goes stale.
#[derive(Debug)]
pub struct PcscTestLock {
    _held: std::os::unix::net::UnixListener,
}

/// Waits (up to 15 minutes) for exclusive use of pcscd and vpcd.
pub fn exclusive() -> Result<PcscTestLock, String> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
    let name = UnixAddr::from_abstract_name(b"id06d-pcsc-tests").map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(15 * 60);
    loop {
        match UnixListener::bind_addr(&name) {
            Ok(held) => return Ok(PcscTestLock { _held: held }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                return Err(format!(
                    "cannot get exclusive use of pcscd for this test: {e}"
                ))
            }
        }
    }
}

/// The pcscd this process started, if any (kept so that it can be killed and reaped).
static PCSCD: Mutex<Option<Child>> = Mutex::new(None);

const PID_FILE: &str = "/run/pcscd/pcscd.pid";

/// Whether pcscd answers (a PC/SC context can be established).
pub fn pcscd_answers() -> bool {
    std::panic::catch_unwind(|| pcsc::Context::establish(pcsc::Scope::User).is_ok())
        .unwrap_or(false)
}

/// Whether pcscd lists the reader `name`.
pub fn pcscd_lists(name: &str) -> bool {
    std::panic::catch_unwind(|| {
        pcsc::Context::establish(pcsc::Scope::User)
            .and_then(|c| c.list_readers_owned())
            .map(|names| names.iter().any(|n| n.to_string_lossy() == name))
            .unwrap_or(false)
    })
    .unwrap_or(false)
}

/// Whether pcscd reports a card in `slot` (false when pcscd or the reader is not there).
pub fn slot_has_card(slot: Slot) -> bool {
    std::panic::catch_unwind(|| {
        let Ok(context) = pcsc::Context::establish(pcsc::Scope::User) else {
            return false;
        };
        let Ok(name) = std::ffi::CString::new(slot.reader) else {
            return false;
        };
        let mut states = [pcsc::ReaderState::new(name, pcsc::State::UNAWARE)];
        context
            .get_status_change(Duration::ZERO, &mut states)
            .is_ok()
            && states[0].event_state().contains(pcsc::State::PRESENT)
    })
    .unwrap_or(false)
}

/// Waits (up to 5 s) until pcscd reports `slot` empty, so that a test starts from an empty
/// field and the previous test's card is not mistaken for this one's; whether it did.
pub fn wait_slot_empty(slot: Slot) -> bool {
    wait_until(Duration::from_secs(5), || !slot_has_card(slot))
}

/// Waits until `cond` holds, up to `timeout`; whether it did.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts pcscd (in the foreground, as a child of this process, without systemd) unless one
/// is running, and waits until it lists vpcd's first reader.
pub fn ensure_pcscd() -> Result<(), String> {
    if !pcscd_answers() {
        start_pcscd()?;
    }
    if wait_until(Duration::from_secs(10), || pcscd_lists(SLOT_0.reader)) {
        Ok(())
    } else {
        Err(format!(
            "pcscd runs but does not list {:?} within 10 s: is vsmartcard-vpcd installed?",
            SLOT_0.reader
        ))
    }
}

/// Starts a pcscd child process and waits until it answers (no check whether one runs).
pub fn start_pcscd() -> Result<(), String> {
    let mut slot = PCSCD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(mut old) = slot.take() {
        let _ = old.kill();
        let _ = old.wait();
    }
    let child = Command::new("pcscd")
        .arg("-f")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot start pcscd ({e}): install the packages pcscd and vsmartcard-vpcd")
        })?;
    *slot = Some(child);
    drop(slot);
    if wait_until(Duration::from_secs(10), pcscd_answers) {
        Ok(())
    } else {
        Err("pcscd was started but does not answer within 10 s".into())
    }
}

/// Live pcscd processes (by `/proc/*/comm`; zombies do not count).
fn pcscd_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // "pid (comm) state …"
                let comm_ok = stat.contains("(pcscd)");
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                comm_ok && !state.starts_with('Z') && !state.starts_with('X')
            })
        })
        .collect()
}

/// Kills every pcscd with SIGKILL, as a crash would, and waits until they are gone.
pub fn kill_pcscd() -> Result<(), String> {
    let mut slot = PCSCD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(mut child) = slot.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(slot);
    // Not ours (started by an earlier test run or by hand): kill by pid. A zombie left
    // behind counts as dead, but its pid file would stop a new pcscd: remove it.
    let others = pcscd_pids();
    for pid in &others {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    if !wait_until(Duration::from_secs(5), || pcscd_pids().is_empty()) {
        return Err(format!("pcscd (pids {others:?}) did not die"));
    }
    if !others.is_empty() {
        let _ = std::fs::remove_file(PID_FILE);
    }
    if wait_until(Duration::from_secs(5), || !pcscd_answers()) {
        Ok(())
    } else {
        Err("pcscd still answers after being killed (is it socket-activated by systemd?)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_get_data_by_behaviour() {
        let get = |le: u8| vec![0xFF, 0xCA, 0x00, 0x00, le];
        let uid = vec![0x04, 0xA1, 0xB2, 0xC3];
        let mut told = false;
        let sent = |r: Reply| match r {
            Reply::Send(v) => v,
            _ => panic!("expected an answer"),
        };
        assert_eq!(
            sent(answer(&get(0), &CardBehaviour::Uid(uid.clone()), &mut told)),
            vec![0x04, 0xA1, 0xB2, 0xC3, 0x90, 0x00]
        );
        assert_eq!(
            sent(answer(&get(2), &CardBehaviour::Uid(uid.clone()), &mut told)),
            vec![0x6C, 0x04]
        );
        let b = CardBehaviour::WrongLengthFirst(uid.clone());
        assert_eq!(sent(answer(&get(4), &b, &mut told)), vec![0x6C, 0x04]);
        assert_eq!(
            sent(answer(&get(4), &b, &mut told)),
            vec![0x04, 0xA1, 0xB2, 0xC3, 0x90, 0x00]
        );
        assert!(matches!(
            answer(&get(0), &CardBehaviour::LeaveMidRead, &mut told),
            Reply::Leave
        ));
        assert!(matches!(
            answer(&get(0), &CardBehaviour::Mute, &mut told),
            Reply::Silence
        ));
        assert_eq!(
            sent(answer(&[0x00, 0xA4, 0x04, 0x00], &b, &mut told)),
            vec![0x6D, 0x00]
        );
    }
}
