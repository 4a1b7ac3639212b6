//! The redo record of a blocklist update being written, read back after damage: whatever
//! the bytes, decoding must not panic, and what decodes must encode to the same bytes.
#![no_main]

use id06d::lists::pending::PendingUpdate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = PendingUpdate::decode(data) {
        assert_eq!(p.encode(), data);
    }
});
