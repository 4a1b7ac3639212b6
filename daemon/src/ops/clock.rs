//! Whether the system clock is known to be synchronised (contract §7 `clock_synced`).

/// Asks the kernel (adjtimex, read-only) whether NTP has synchronised the clock. A terminal
/// without a real-time clock boots at some old date and is unsynchronised until NTP runs.
pub fn clock_synced() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's time state into a zeroed
    // struct that we own; it has no other effect.
    let (state, status) = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        let state = libc::adjtimex(&mut tx);
        (state, tx.status)
    };
    state >= 0 && state != libc::TIME_ERROR && status & libc::STA_UNSYNC == 0
}
