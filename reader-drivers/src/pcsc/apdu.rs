//! GET DATA (UID), PC/SC part 3's pseudo-APDU `FF CA 00 00 Le`, as pure functions.

use id06_protocol::CardUid;

/// The command: GET DATA for the UID with the given Le (`00`: as long as it is).
pub fn get_data(le: u8) -> [u8; 5] {
    [0xFF, 0xCA, 0x00, 0x00, le]
}

/// What a GET DATA response means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetData {
    /// A complete UID.
    Uid(CardUid),
    /// `6C XX`: wrong length, ask again with Le = XX.
    RetryWithLe(u8),
    /// The read failed; the text says how (for logs and the reader's `last_error`).
    Failed(String),
}

/// Interprets a response APDU (data followed by SW1 SW2).
pub fn interpret(response: &[u8]) -> GetData {
    let Some(split) = response.len().checked_sub(2) else {
        return GetData::Failed(format!(
            "the reader answered GET DATA with {} byte(s), too short for a status word",
            response.len()
        ));
    };
    let (data, sw) = response.split_at(split);
    match (sw[0], sw[1]) {
        // 62 82: end of data reached before Le bytes; some readers say so for Le > UID length.
        (0x90, 0x00) | (0x62, 0x82) => match CardUid::from_bytes(data) {
            Ok(uid) => GetData::Uid(uid),
            Err(e) => GetData::Failed(format!("the card's answer is not a UID: {e}")),
        },
        (0x6C, le) => GetData::RetryWithLe(le),
        (0x6A, 0x81) => GetData::Failed("the reader does not support GET DATA (6A81)".into()),
        (0x63, 0x00) => GetData::Failed("the reader could not read the card (6300)".into()),
        (sw1, sw2) => GetData::Failed(format!(
            "the reader answered GET DATA with status {sw1:02X}{sw2:02X}"
        )),
    }
}

/// The ACR122U's LED and buzzer pseudo-APDU for a signal: `FF 00 40 P2 04 T1 T2 N L`, where
/// P2's bits are (0) final red, (1) final green, (2) red mask, (3) green mask, (4) initial
/// red blinking state, (5) initial green blinking state, (6) red blinking, (7) green
/// blinking; T1 and T2 in 100 ms; N repetitions; L = 1: the buzzer sounds during T1.
pub fn acr122_led_buzzer(signal: &crate::feedback::Signal) -> Option<Vec<u8>> {
    use crate::feedback::Signal;
    let (p2, t1, t2, times, buzz) = match signal {
        // Green once for 500 ms with one beep.
        Signal::Granted { .. } => (0xA0, 5, 1, 1, 1),
        // Red three times with three beeps.
        Signal::Denied { .. } => (0x50, 2, 2, 3, 1),
        // Red and green (amber) blinking, quietly.
        Signal::HoldSteady { on: true } => (0xF0, 3, 3, 5, 0),
        Signal::HoldSteady { on: false } => return None,
    };
    Some(vec![0xFF, 0x00, 0x40, p2, 0x04, t1, t2, times, buzz])
}

#[cfg(test)]
mod tests {
    #[test]
    fn acr122_led_and_buzzer_per_signal() {
        use crate::feedback::Signal;
        let granted = Signal::Granted {
            text: String::new(),
            door: None,
        };
        assert_eq!(
            super::acr122_led_buzzer(&granted).unwrap(),
            [0xFF, 0x00, 0x40, 0xA0, 0x04, 0x05, 0x01, 0x01, 0x01]
        );
        let denied = Signal::Denied {
            text: String::new(),
        };
        assert_eq!(super::acr122_led_buzzer(&denied).unwrap()[3], 0x50);
        assert_eq!(
            super::acr122_led_buzzer(&Signal::HoldSteady { on: true }).unwrap()[3],
            0xF0
        );
        assert!(super::acr122_led_buzzer(&Signal::HoldSteady { on: false }).is_none());
    }

    use super::*;

    fn uid(s: &str) -> CardUid {
        CardUid::parse(s).unwrap()
    }

    #[test]
    fn every_status_word_has_a_meaning() {
        let failed = |r: GetData, needle: &str| match r {
            GetData::Failed(why) => assert!(why.contains(needle), "{why}"),
            other => panic!("expected a failed read, got {other:?}"),
        };
        assert_eq!(
            interpret(&[0x04, 0xA1, 0xB2, 0xC3, 0x90, 0x00]),
            GetData::Uid(uid("04A1B2C3"))
        );
        assert_eq!(
            interpret(&[0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x90, 0x00]),
            GetData::Uid(uid("04A1B2C3D4E5F6"))
        );
        assert_eq!(
            interpret(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x90, 0x00]),
            GetData::Uid(uid("0102030405060708090A"))
        );
        assert_eq!(
            interpret(&[0x04, 0xA1, 0xB2, 0xC3, 0x62, 0x82]),
            GetData::Uid(uid("04A1B2C3"))
        );
        assert_eq!(interpret(&[0x6C, 0x07]), GetData::RetryWithLe(7));
        failed(interpret(&[0x6A, 0x81]), "6A81");
        failed(interpret(&[0x63, 0x00]), "6300");
        failed(interpret(&[0x6F, 0x00]), "6F00");
        failed(interpret(&[0x90, 0x00]), "not a UID");
        failed(interpret(&[1, 2, 3, 0x90, 0x00]), "3 bytes");
        failed(interpret(&[0x90]), "too short");
        failed(interpret(&[]), "too short");
    }

    #[test]
    fn the_command_is_get_data_for_the_uid() {
        assert_eq!(get_data(0), [0xFF, 0xCA, 0x00, 0x00, 0x00]);
        assert_eq!(get_data(7), [0xFF, 0xCA, 0x00, 0x00, 0x07]);
    }
}
