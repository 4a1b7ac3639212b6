//! A virtual contactless card for tests and benchmarks, played over vpcd's TCP protocol, and
//! a private PC/SC world ([`sandbox`]) in which a test starts, kills and restarts a real
//! pcscd of its own.
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
//! use id06_readers::vpcd_card::{sandbox, CardBehaviour, VirtualCard, SLOT_0};
//!
//! let _pcsc = sandbox().unwrap(); // this thread now has a pcscd of its own
//!
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
    received: Arc<Mutex<Vec<Vec<u8>>>>,
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
        let received = Arc::new(Mutex::new(Vec::new()));
        let apdu_log = received.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vpcd-card-{}", slot.port))
            .spawn(move || serve(reader, behaviour, counter, control_log, apdu_log))
            .map_err(|e| VpcdError {
                port: slot.port,
                message: format!("cannot start the card's thread: {e}"),
            })?;
        Ok(VirtualCard {
            stream,
            apdus,
            controls,
            received,
            thread: Some(thread),
        })
    }

    /// Every command APDU the card has received so far, in order.
    pub fn received_apdus(&self) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
    received: Arc<Mutex<Vec<Vec<u8>>>>,
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
                received
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(apdu.to_vec());
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
    // An ACR122U's LED and buzzer command (the reader answers it, not the card).
    if apdu.len() == 9 && apdu[..3] == [0xFF, 0x00, 0x40] {
        return Reply::Send(vec![0x90, 0x00]);
    }
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

/// A private PC/SC world for one test: the calling thread (and every thread and process it
/// starts afterwards) moves into new mount and network namespaces, with an empty
/// `/run/pcscd` of its own and a loopback interface of its own, and a pcscd is started
/// there. So a test's pcscd and vpcd never meet the machine's (an installed gateway's pcscd
/// keeps running untouched), tests can run side by side, and dropping the sandbox stops the
/// pcscd it started: nothing outlives the test. Needs root (as `./run.sh test` runs).
///
/// Call it before the test starts any thread or process that must see this pcscd (a broker,
/// a daemon, a runtime): those started earlier stay in the machine's namespaces.
#[derive(Debug)]
pub struct PcscSandbox {
    pcscd: Option<Child>,
}

fn io_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Enters a new sandbox on this thread and starts its pcscd (waiting until it lists vpcd's
/// first reader).
pub fn sandbox() -> Result<PcscSandbox, String> {
    use std::ffi::CString;
    // SAFETY: unshare only changes this thread's namespaces; the arguments are flags.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET) } != 0 {
        return Err(io_err(
            "cannot make a private mount and network namespace for the PC/SC test (run the tests as root)",
        ));
    }
    let root = CString::new("/").map_err(|e| e.to_string())?;
    let none = CString::new("none").map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated strings; MS_REC|MS_PRIVATE on "/" only stops our mounts
    // from propagating to the machine's namespace.
    if unsafe {
        libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io_err("cannot make the test's mounts private"));
    }
    std::fs::create_dir_all("/run/pcscd").map_err(|e| format!("cannot create /run/pcscd: {e}"))?;
    let dir = CString::new("/run/pcscd").map_err(|e| e.to_string())?;
    let tmpfs = CString::new("tmpfs").map_err(|e| e.to_string())?;
    let opts = CString::new("mode=0755,size=1m").map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated strings; a tmpfs over /run/pcscd in our namespace only.
    if unsafe {
        libc::mount(
            tmpfs.as_ptr(),
            dir.as_ptr(),
            tmpfs.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    } != 0
    {
        return Err(io_err("cannot mount a private /run/pcscd"));
    }
    let lo = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("cannot run ip (Debian: iproute2): {e}"))?;
    if !lo.success() {
        return Err("cannot bring the test's loopback interface up".into());
    }
    let mut sb = PcscSandbox { pcscd: None };
    sb.start_pcscd()?;
    if wait_until(Duration::from_secs(10), || pcscd_lists(SLOT_0.reader)) {
        Ok(sb)
    } else {
        Err(format!(
            "pcscd runs but does not list {:?} within 10 s: is vsmartcard-vpcd installed?",
            SLOT_0.reader
        ))
    }
}

impl PcscSandbox {
    /// Starts the sandbox's pcscd (after [`PcscSandbox::kill_pcscd`]) and waits until it
    /// answers.
    pub fn start_pcscd(&mut self) -> Result<(), String> {
        self.kill_pcscd()?;
        let child = Command::new("pcscd")
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start pcscd ({e}): install the packages pcscd and vsmartcard-vpcd")
            })?;
        self.pcscd = Some(child);
        if wait_until(Duration::from_secs(10), pcscd_answers) {
            Ok(())
        } else {
            Err("pcscd was started but does not answer within 10 s".into())
        }
    }

    /// Kills the sandbox's pcscd with SIGKILL, as a crash would, and waits until it is gone
    /// (no other pcscd is touched).
    pub fn kill_pcscd(&mut self) -> Result<(), String> {
        if let Some(mut child) = self.pcscd.take() {
            let _ = child.kill();
            let _ = child.wait();
            // A pcscd killed leaves its pid file, which would stop the next one.
            let _ = std::fs::remove_file("/run/pcscd/pcscd.pid");
            let _ = std::fs::remove_file("/run/pcscd/pcscd.comm");
        }
        if wait_until(Duration::from_secs(5), || !pcscd_answers()) {
            Ok(())
        } else {
            Err("the test's pcscd still answers after being killed".into())
        }
    }
}

impl Drop for PcscSandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.pcscd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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
